//! L4 forwarding for `tcp` listeners: accept, pick an upstream (trying the next one when a
//! connection fails), then copy both ways with half-close and an idle timeout.
//!
//! A registered route without a live instance holds new connections until one registers
//! (see [`crate::registration`]); a stream to an upstream that leaves a pool with
//! `on_change = "reset"` is closed.
//!
//! `tls` listeners terminate TLS first and forward the plain bytes; `tls-passthrough`
//! listeners read the ClientHello's server name, pick the pool by it, and forward every
//! byte (the ClientHello included) untouched.
//!
//! Between a plain TCP client (`tcp` and `tls-passthrough` listeners) and a plain TCP
//! upstream, a direction that carries bulk data moves it with splice(2), and its bytes no
//! longer enter this process ([`splice`]); otherwise (short exchanges, TLS terminated
//! here, a TLS or unix-socket upstream, or no pipe to be had) they are copied through
//! buffers.

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::ListenerConfig;
use crate::listener::{IdleTimeout, Incoming};
use crate::routing::Published;
use crate::shutdown::Shutdown;
use crate::state::Protocol;
use crate::telemetry::{Metrics, OpenConnection, Telemetry};
use crate::tls::sni::{peek_client_hello, Hello};
use crate::tls::{AcceptError, Tls};
use crate::upstream::{ConnectError, InFlight, UpstreamStream};
use crate::workers::Workers;

mod copy;
mod spare;
mod splice;

/// A client stream [`forward`] can take.
trait ClientStream: AsyncRead + AsyncWrite + Unpin + Sized {
    /// The stream as plain TCP, when its bytes need no processing on the way (so they can
    /// be spliced); otherwise it is handed back.
    fn plain(client: IdleTimeout<Self>) -> Result<IdleTimeout<TcpStream>, IdleTimeout<Self>>;
}

impl ClientStream for TcpStream {
    fn plain(client: IdleTimeout<Self>) -> Result<IdleTimeout<TcpStream>, IdleTimeout<Self>> {
        Ok(client)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientStream for tokio_rustls::server::TlsStream<S> {
    fn plain(client: IdleTimeout<Self>) -> Result<IdleTimeout<TcpStream>, IdleTimeout<Self>> {
        Err(client)
    }
}

/// Serves `socket` on every worker (see [`crate::workers`]) until shutdown, with one
/// `max_connections` limit for all of them: a connection is accepted, forwarded and copied
/// on one thread, the upstream connection included.
pub fn serve_on(
    workers: &'static Workers,
    socket: &std::net::TcpListener,
    config: Arc<ListenerConfig>,
    state: Published,
    shutdown: Shutdown,
    tls: Arc<Tls>,
    telemetry: Arc<Telemetry>,
) -> std::io::Result<()> {
    let limit = Arc::new(Semaphore::new(config.max_connections));
    workers.accept_each(socket, || {
        let (config, state, shutdown, tls, telemetry, limit) = (
            config.clone(),
            state.clone(),
            shutdown.clone(),
            tls.clone(),
            telemetry.clone(),
            limit.clone(),
        );
        move |socket, seat| async move {
            match Incoming::new(socket, Some(seat)) {
                Ok(incoming) => {
                    serve_limited(incoming, config, state, shutdown, tls, telemetry, limit).await
                }
                Err(e) => {
                    tracing::error!(listener = %config.name, error = %e, "worker cannot serve listener")
                }
            }
        }
    })
}

/// Serves `listener` on this runtime until shutdown; open streams are left to finish (up
/// to the drain timeout). `tls` terminates the connections of `tls` listeners.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ListenerConfig>,
    state: Published,
    shutdown: Shutdown,
    tls: Arc<Tls>,
    telemetry: Arc<Telemetry>,
) {
    let incoming = match Incoming::local(listener) {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::error!(listener = %config.name, error = %e, "listener could not be registered");
            return;
        }
    };
    let limit = Arc::new(Semaphore::new(config.max_connections));
    serve_limited(incoming, config, state, shutdown, tls, telemetry, limit).await
}

/// Accepts while `limit` has a permit: over `max_connections`, new connections wait in the
/// kernel's backlog until one ends.
async fn serve_limited(
    incoming: Incoming,
    config: Arc<ListenerConfig>,
    state: Published,
    shutdown: Shutdown,
    tls: Arc<Tls>,
    telemetry: Arc<Telemetry>,
    limit: Arc<Semaphore>,
) {
    let connections = telemetry
        .metrics()
        .listener(&config.name, config.protocol.as_str());
    let terminate = if config.protocol == Protocol::Tls {
        match tls.server_config(&[]) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(listener = %config.name, error = %e, "TLS setup failed; listener not serving");
                return;
            }
        }
    } else {
        None
    };
    let name = config.name.clone();
    let shared = Arc::new(StreamListener {
        config,
        state,
        tls,
        telemetry,
        terminate,
    });
    // One wait for shutdown for the whole loop: a new one per connection would register
    // (and remove) a waiter under the shutdown token's lock, which every worker shares.
    let stopped = shutdown.triggered();
    tokio::pin!(stopped);
    // Counted by the drain until the loop ends (see the HTTP accept loop).
    let _accepting = shutdown.track();
    loop {
        // Before every accept: a draining process leaves waiting connections to its
        // successor (see the HTTP accept loop).
        if shutdown.is_triggered() {
            return;
        }
        // Biased: what is ready is taken without polling the shutdown wait (which takes
        // its lock); once the loop waits, both are polled.
        let permit = tokio::select! {
            biased;
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = &mut stopped => return,
        };
        let accepted = tokio::select! {
            biased;
            accepted = incoming.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stopped => return,
        };
        let client = accepted.client;
        let _ = accepted.set_nodelay();
        let shared = shared.clone();
        let open = connections.open();
        incoming.spawn(&shutdown, accepted, move |stream, load| async move {
            let (_permit, _load) = (permit, load);
            // Forwarding waits on the client from the start (the copy in either direction
            // waits for readiness): registered at once.
            let stream = match stream.into_registered() {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(listener = %shared.config.name, %client, error = %e, "tcp connection not registered");
                    return;
                }
            };
            let StreamListener {
                config,
                state,
                tls,
                telemetry,
                terminate,
            } = &*shared;
            let metrics = telemetry.metrics();
            let result = match (config.protocol, terminate) {
                (Protocol::TlsPassthrough, _) => {
                    passthrough(stream, config, state, metrics, &open).await
                }
                // Boxed: a TLS connection's state (the handshake, then the TLS stream) is
                // large, and inline it would be part of every connection's task, which is
                // copied several times over while it is spawned.
                (_, Some(server_config)) => {
                    crate::boxed::pinned(|| async {
                        match tls
                            .accept(
                                IdleTimeout::new(stream, config.idle_timeout),
                                server_config,
                                metrics,
                                config.header_timeout,
                            )
                            .await
                        {
                            Ok(stream) => {
                                forward(stream, config, state, metrics, &open, None, &[]).await
                            }
                            Err(AcceptError::ChallengeAnswered) => Ok(()),
                            Err(e) => Err(e.to_string()),
                        }
                    })
                    .await
                }
                _ => forward(stream, config, state, metrics, &open, None, &[]).await,
            };
            if let Err(reason) = result {
                tracing::warn!(listener = %config.name, %client, %reason, "tcp connection not forwarded");
            }
        });
    }
}

/// What every connection of one stream listener shares, made once per listener (per
/// worker): a new connection takes one reference to it instead of one to each part.
struct StreamListener {
    config: Arc<ListenerConfig>,
    state: Published,
    tls: Arc<Tls>,
    telemetry: Arc<Telemetry>,
    /// The TLS server configuration of a `tls` listener.
    terminate: Option<Arc<rustls::ServerConfig>>,
}

/// Reads the ClientHello, then forwards it and the rest to the pool its server name picks.
async fn passthrough(
    mut client: tokio::net::TcpStream,
    config: &ListenerConfig,
    state: &Published,
    metrics: &Metrics,
    open: &OpenConnection,
) -> Result<(), String> {
    let (hello_bytes, hello) = peek_client_hello(&mut client, config.header_timeout)
        .await
        .map_err(|e| format!("reading the ClientHello: {e}"))?;
    let sni = match hello {
        Hello::ClientHello(sni) => sni,
        Hello::NotTls => return Err("not a TLS ClientHello".into()),
    };
    forward(
        client,
        config,
        state,
        metrics,
        open,
        sni.as_deref(),
        &hello_bytes,
    )
    .await
}

/// Connects to the listener's pool (by `sni` on passthrough listeners), sends `prefix`
/// (bytes already read from the client), then copies both ways; the bytes moved are
/// counted in `open`'s listener.
async fn forward<S: ClientStream>(
    client: S,
    config: &ListenerConfig,
    state: &Published,
    metrics: &Metrics,
    open: &OpenConnection,
    sni: Option<&str>,
    prefix: &[u8],
) -> Result<(), String> {
    let slot = state
        .with_routing(|r| r.tcp_slot_for_sni(&config.name, sni))
        .ok_or_else(|| match sni {
            Some(name) => format!("no tcp route for server name {name:?} on this listener"),
            None => "no tcp route for this listener".to_string(),
        })?;
    let pool = crate::registration::ready_pool(&slot, metrics)
        .await
        .map_err(|e| format!("pool {:?}: {e}", slot.load().name))?;
    let candidates = pool
        .candidates()
        .map_err(|e| format!("pool {:?}: {e:?}", pool.name))?;
    let mut last: Option<ConnectError> = None;
    let mut connected: Option<(UpstreamStream, InFlight)> = None;
    for upstream in candidates {
        let in_flight = upstream.start();
        let started = std::time::Instant::now();
        match pool.open(&upstream.address, pool.connect_timeout).await {
            Ok(stream) => {
                metrics.upstream_connected(&pool.name, started.elapsed());
                upstream.record_success();
                connected = Some((stream, in_flight));
                break;
            }
            Err(e) => {
                metrics.upstream_connect_failed(&pool.name);
                upstream.record_failure(&pool);
                tracing::warn!(pool = %pool.name, upstream = %upstream.address, error = %e, "upstream connection failed");
                last = Some(e);
            }
        }
    }
    let Some((mut upstream, in_flight)) = connected else {
        return Err(last.map_or_else(|| "no upstream".to_string(), |e| e.to_string()));
    };
    if !prefix.is_empty() {
        upstream
            .write_all(prefix)
            .await
            .map_err(|e| format!("stream to {} ended: {e}", in_flight.upstream().address))?;
    }
    let client = IdleTimeout::new(client, config.idle_timeout);
    let tally = copy::Tally::default();
    let copied = {
        let upstream_runtime = in_flight.upstream();
        let tally = &tally;
        let copy = async move {
            match (S::plain(client), &mut upstream) {
                (Ok(mut client), UpstreamStream::Tcp(upstream)) => {
                    splice::both_ways(&mut client, upstream, tally).await
                }
                (Ok(mut client), upstream) => copy::both_ways(&mut client, upstream, tally).await,
                (Err(mut client), upstream) => copy::both_ways(&mut client, upstream, tally).await,
            }
        };
        tokio::pin!(copy);
        let removed = upstream_runtime.removed();
        tokio::pin!(removed);
        let mut waiting_for_removal = false;
        std::future::poll_fn(|cx| {
            // The wait for removal is polled once, which leaves this task's waker with
            // the upstream; later wake-ups only read the flag. Polling the wait again on
            // every wake-up of the copy would take the lock that every stream to this
            // upstream shares, on every thread.
            if !waiting_for_removal {
                if removed.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(None);
                }
                waiting_for_removal = true;
            } else if upstream_runtime.is_removed() {
                return std::task::Poll::Ready(None);
            }
            copy.as_mut().poll(cx).map(Some)
        })
        .await
    };
    let (up, down) = (prefix.len() as u64 + tally.up(), tally.down());
    open.series().forwarded(up, down);
    let Some(copied) = copied else {
        tracing::info!(listener = %config.name, upstream = %in_flight.upstream().address, "upstream left its pool; closing the stream");
        return Ok(());
    };
    match copied {
        Ok(()) => {
            tracing::debug!(listener = %config.name, upstream = %in_flight.upstream().address, bytes_up = up, bytes_down = down, "tcp stream closed");
            Ok(())
        }
        Err(e) => Err(format!(
            "stream to {} ended: {e}",
            in_flight.upstream().address
        )),
    }
}
