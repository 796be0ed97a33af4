//! Accept loop and per-connection serving for `http` and `https` listeners: HTTP/1 with
//! proxyd's own codec ([`super::h1`]), HTTP/2 with hyper. An `https` connection is
//! TLS-terminated first (see [`crate::tls`]) and then served the same way, HTTP/1.1 or
//! HTTP/2 as ALPN chose.

use std::cell::OnceCell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::detect::{self, Replayed, Speaks};
use super::framing::HeadProgress;
use super::h1::{self, Served};
use super::per_ip::{
    ClientConnection, ConnectionLimit, ConnectionPlace, ConnectionsPerIp, RequestRatePerIp,
};
use super::proxy::{handle, ConnContext, ListenerContext};
use super::streams::{ConnectionStreams, HeldWrites, Hold, InTask};
use crate::boxed;
use crate::config::ListenerConfig;
use crate::listener::{
    Accepted, ClientSocket, DormantLimit, IdleTimeout, Incoming, ReadReady, Woken,
};
use crate::routing::Published;
use crate::shutdown::Shutdown;
use crate::state::Protocol;
use crate::telemetry::{ClientTimeout, ListenerSeries, OpenConnection, Refusal, Telemetry};
use crate::tls::{AcceptError, Tls};
use crate::upstream::body::ClientBody;
use crate::workers::dormant::{Dormitory, Sleeper, Wake};
use crate::workers::{WorkerLoad, Workers};

/// How long an idle keep-alive connection may stay open once draining began.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How long an HTTP/1 connection between requests keeps its buffers before it parks
/// (hyper's idle connections kept theirs about as long before its own buffers shrank): a
/// client that sends its next request within it is served on without allocating them
/// again.
const PARK_AFTER: Duration = Duration::from_millis(100);

/// How long a plain HTTP/1 connection stays parked in its task before it goes dormant:
/// its task ends and its socket sleeps in its worker's dormitory (see
/// [`crate::workers::dormant`]) until its next bytes. A client sending requests more than
/// twice a second is not moved out and back (four `epoll_ctl` calls and a new task)
/// between them; a quiet connection lets its task's memory go soon enough that the
/// allocator has returned it two seconds after its last response (with the dormitory's
/// nudges), where a second here left it until a later nudge.
const DOZE_AFTER: Duration = Duration::from_millis(300);

/// What an accepted connection holds for as long as it is open, in its task or dormant:
/// its place under the listener's connection limits, its count as open and its count on
/// its worker.
struct Held {
    _place: ConnectionPlace,
    _client_slot: Option<ClientConnection>,
    _open: OpenConnection,
    _load: WorkerLoad,
}

impl Held {
    fn new(
        place: ConnectionPlace,
        client_slot: Option<ClientConnection>,
        open: OpenConnection,
        load: WorkerLoad,
    ) -> Held {
        Held {
            _place: place,
            _client_slot: client_slot,
            _open: open,
            _load: load,
        }
    }
}

thread_local! {
    /// The dormitory of the worker this thread runs, started by the first plain HTTP
    /// accept loop on it (on the worker's own runtime, which its task then runs on); it
    /// lives as long as the worker, so connections refer to it without counting a
    /// reference.
    static DORMITORY: OnceCell<&'static Dormitory<Asleep>> = const { OnceCell::new() };
}

/// The dormitory of the worker this thread runs, if it has one.
fn this_dormitory() -> Option<&'static Dormitory<Asleep>> {
    DORMITORY
        .try_with(|dormitory| dormitory.get().copied())
        .ok()
        .flatten()
}

/// The dormitory of the worker `incoming` is accepted on, started if it is not yet; none
/// off the workers. Called on that worker.
fn dormitory(incoming: &Incoming) -> Option<&'static Dormitory<Asleep>> {
    let sleeping = incoming.sleeping()?;
    DORMITORY
        .try_with(|dormitory| {
            *dormitory.get_or_init(|| Box::leak(Box::new(Dormitory::start(sleeping))))
        })
        .ok()
}

/// Which listener's accept loop a connection came from, as its worker's dormitory groups
/// sleepers (an accept loop's context is one per listener and worker, and outlives the
/// connections it served).
fn group(shared: &Arc<ListenerContext>) -> usize {
    Arc::as_ptr(shared) as usize
}

/// How a listener's HTTP/2 connections are served (HTTP/1 ones by [`super::h1`]).
struct Protocols {
    http2: Http2Settings,
}

/// How many streams an HTTP/2 client may have open at once on one connection: nginx's
/// `http2_max_concurrent_streams` default (hyper's own is 200).
const MAX_CONCURRENT_STREAMS: u32 = 128;

/// A listener's HTTP/2 settings. hyper's builder holds the executor its connections run
/// their streams on, and each connection has its own (see [`super::streams`]), so the
/// builder is made per connection from these.
struct Http2Settings {
    max_header_list_size: u32,
    timer: TokioTimer,
}

impl Http2Settings {
    fn builder(&self, streams: ConnectionStreams) -> http2::Builder<ConnectionStreams> {
        let mut http2 = http2::Builder::new(streams);
        http2
            .timer(self.timer.clone())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(self.max_header_list_size);
        http2
    }
}

/// A listener's connection and client limits, one set shared by all of its workers.
#[derive(Clone)]
struct Limits {
    connections: Arc<ConnectionLimit>,
    per_ip: Option<Arc<ConnectionsPerIp>>,
    rate: Option<Arc<RequestRatePerIp>>,
}

impl Limits {
    fn new(config: &ListenerConfig) -> Limits {
        Limits {
            connections: ConnectionLimit::new(config.max_connections),
            per_ip: config.max_connections_per_ip.map(ConnectionsPerIp::new),
            rate: config
                .rate_limit
                .as_ref()
                .map(|r| Arc::new(RequestRatePerIp::new(r))),
        }
    }
}

/// Serves `socket` on every worker (see [`crate::workers`]) until shutdown, with one
/// `max_connections` limit for all of them.
pub fn serve_on(
    workers: &'static Workers,
    socket: &std::net::TcpListener,
    config: Arc<ListenerConfig>,
    state: Published,
    shutdown: Shutdown,
    tls: Arc<Tls>,
    telemetry: Arc<Telemetry>,
) -> std::io::Result<()> {
    let limits = Limits::new(&config);
    workers.accept_each(socket, || {
        let (config, state, shutdown, tls, telemetry, limits) = (
            config.clone(),
            state.clone(),
            shutdown.clone(),
            tls.clone(),
            telemetry.clone(),
            limits.clone(),
        );
        move |socket, seat| async move {
            match Incoming::new(socket, Some(seat)) {
                Ok(incoming) => {
                    serve_limited(incoming, config, state, shutdown, tls, telemetry, limits).await
                }
                Err(e) => {
                    tracing::error!(listener = %config.name, error = %e, "worker cannot serve listener")
                }
            }
        }
    })
}

/// Serves `listener` until shutdown; connections then finish their current request.
/// `tls` terminates `https` connections and answers ACME HTTP-01 challenges on `http` ones.
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
    let limits = Limits::new(&config);
    serve_limited(incoming, config, state, shutdown, tls, telemetry, limits).await
}

async fn serve_limited(
    incoming: Incoming,
    config: Arc<ListenerConfig>,
    state: Published,
    shutdown: Shutdown,
    tls: Arc<Tls>,
    telemetry: Arc<Telemetry>,
    limits: Limits,
) {
    let series = telemetry
        .metrics()
        .listener(&config.name, config.protocol.as_str());
    let terminate = if config.protocol == Protocol::Https {
        match tls.server_config(&[b"h2", b"http/1.1"]) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(listener = %config.name, error = %e, "TLS setup failed; listener not serving");
                return;
            }
        }
    } else {
        None
    };
    let scheme = if terminate.is_some() { "https" } else { "http" };
    let http2 = Http2Settings {
        max_header_list_size: u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX),
        timer: TokioTimer::new(),
    };
    let protocols = Arc::new(Protocols { http2 });
    let shared = Arc::new(ListenerContext {
        listener: config.clone(),
        state,
        shutdown: shutdown.clone(),
        scheme,
        tls: tls.clone(),
        telemetry,
        series: series.clone(),
        rate: limits.rate.clone(),
    });
    // Where this worker's plain connections of the listener go dormant (TLS ones stay in
    // their tasks; off the workers there is no dormitory).
    let dormitory = if terminate.is_none() {
        dormitory(&incoming)
    } else {
        None
    };
    // The drain waits for this loop as for a connection: what it accepts is spawned (and
    // counted) before the loop lets go of this, so the process cannot end in between.
    let _accepting = shutdown.track();
    // One wait for shutdown for the whole loop: a new one per connection would register
    // (and remove) a waiter under the shutdown token's lock, which every worker shares.
    let stopped = shutdown.triggered();
    tokio::pin!(stopped);
    loop {
        // Before every accept, not only when the loop waits: under steady load a
        // connection is always waiting, and a draining process leaves them to its
        // successor, which accepts from the same queue.
        if shutdown.is_triggered() {
            break;
        }
        let accepted = tokio::select! {
            // A connection waiting is taken without polling the shutdown wait (which
            // takes its lock); once the loop waits, both are polled.
            biased;
            accepted = incoming.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %config.name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stopped => break,
        };
        // Over the limit a connection is closed at once, and counted: left waiting in the
        // kernel backlog, a flood would hold back every later client without a trace.
        let Some(place) = limits.connections.take() else {
            series.refused(Refusal::MaxConnections);
            refuse(accepted);
            continue;
        };
        let client = accepted.client;
        let client_slot = match &limits.per_ip {
            None => None,
            Some(table) => match table.admit(client.ip()) {
                Some(slot) => Some(slot),
                None => {
                    series.refused(Refusal::MaxConnectionsPerIp);
                    refuse(accepted);
                    continue;
                }
            },
        };
        // A TLS connection sends at once from its first write (a handshake's flights and
        // its session tickets are writes in a row); a plain one from its second (the
        // HTTP/1 codec's `Wire::writer`): one answered once and closed never needs it.
        if terminate.is_some() {
            let _ = accepted.set_nodelay();
        }
        let ctx = Arc::new(ConnContext::new(shared.clone(), client));
        let protocols = protocols.clone();
        let idle = config.idle_timeout;
        let open = series.open();
        // Two tasks, so that a plain connection's task does not carry the size of a TLS
        // handshake: a task's future is copied whole when it is spawned and when it ends.
        // A TLS connection's task holds its handshake and its serving each boxed: both are
        // kilobytes (rustls' connection state, then the decrypted stream and hyper's
        // connection), and unboxed, tokio copied them whole three times at the spawn and once
        // at the end (callgrind, full TLS 1.3 handshakes: 1.424M -> 1.331M instructions each).
        //
        // A plain connection's task is the serving future itself, made before it is spawned
        // rather than inside a block of its own: what a future captures keeps its place in
        // it for its whole life, beside the copies it hands on, and the task's future (a
        // parked connection's memory) stays under 1 KiB, which the allocator serves from
        // its small blocks.
        match &terminate {
            None => incoming.spawn(&shutdown, accepted, move |stream, load| {
                let held = Held::new(place, client_slot, open, load);
                let timed = IdleTimeout::new(stream, idle).counted_in(ctx.series.clone());
                serve_connection(timed, ctx, protocols, held)
            }),
            Some(server_config) => {
                let server_config = server_config.clone();
                incoming.spawn(&shutdown, accepted, move |stream, load| {
                    let held = Held::new(place, client_slot, open, load);
                    // The idle limit sits below TLS, so it covers the handshake too; the
                    // handshake as a whole is bounded by the header timeout.
                    async move {
                        let handshake = boxed::pinned(|| {
                            ctx.tls.accept(
                                IdleTimeout::new(stream, idle).counted_in(ctx.series.clone()),
                                &server_config,
                                ctx.telemetry.metrics(),
                                ctx.listener.header_timeout,
                            )
                        });
                        // Bound here and served after the match: served from inside it, the
                        // handshake's result (1,304 bytes) stayed in this task's future for as
                        // long as the connection lived.
                        let stream = match handshake.await {
                            // The decrypted stream (rustls' connection state, kilobytes) is
                            // boxed once: an HTTP/1 connection hands its stream to a new serving
                            // future per busy spell (see `serve_http1`), and moved by value it
                            // was copied whole each time (callgrind, HTTP/1.1 keep-alive over
                            // TLS: 11k instructions per request).
                            Ok(stream) => Box::new(stream),
                            Err(AcceptError::ChallengeAnswered) => return,
                            Err(AcceptError::Timeout) => {
                                ctx.series.timed_out(ClientTimeout::Handshake);
                                tracing::debug!(%client, "TLS handshake not completed within header_timeout");
                                return;
                            }
                            Err(e) => {
                                tracing::debug!(%client, error = %e, "TLS handshake failed");
                                return;
                            }
                        };
                        boxed::pinned(|| serve_connection(stream, ctx, protocols, held)).await
                    }
                })
            }
        }
    }
    // This worker's dormant connections of this listener get the drain's grace in their
    // tasks again.
    if let Some(dormitory) = dormitory {
        dormitory.wake_all(group(&shared));
    }
}

/// Serves HTTP on one accepted (and, for `https`, decrypted) connection, whose idle limit
/// is applied below (on a plain stream, or below TLS). HTTP/1 connections are parked
/// between requests (see [`super::h1`]).
///
/// Most connections spend most of their life waiting: for their first bytes, or parked
/// between requests. The connection's task is allocated for its largest state, for as
/// long as it lives, so those waits are the only states kept in it (the stream, one timer
/// and the drain signal; a parked connection's wait is timed by the stream's own idle
/// timer); serving requests runs in a boxed future that exists only while the connection
/// is busy.
///
/// `held` is what the connection holds until it ends (a dormant one takes it along).
#[allow(clippy::manual_async_fn)] // see the block below
fn serve_connection<IO>(
    stream: IO,
    ctx: Arc<ConnContext>,
    protocols: Arc<Protocols>,
    held: Held,
) -> impl Future<Output = ()> + Send
where
    IO: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
{
    // An `async move` block rather than an `async fn`, which keeps its arguments twice
    // (see `serve_http1`).
    async move {
        // hyper times an HTTP/1 head from its first byte, and an HTTP/2 connection's first
        // request not at all: a client that connects and sends nothing (or trickles an HTTP/2
        // preface) gets `header_timeout` for its first request, like any head.
        let first_due = Instant::now() + ctx.listener.header_timeout;
        // The first bytes, read to tell the version, are the HTTP/1 codec's first buffer, or
        // read again by hyper's HTTP/2 server. The stream is handed on by value, never
        // borrowed here: a borrowed one would keep its place in this future while the next
        // one holds it too (see `serve_http1`).
        let Some((stream, start, speaks)) = await_first_bytes(stream, &ctx, first_due).await else {
            return;
        };
        let result = match speaks {
            Speaks::Http1 => {
                let conn = Http1Conn {
                    shared: ctx.shared().clone(),
                    client: ctx.client,
                    head_due: first_due,
                    drain_due: None,
                    _held: held,
                };
                return serve_http1(stream, Some((start, ctx)), conn).await;
            }
            Speaks::Http2 => {
                // HTTP/2 writes frames of many streams as they come.
                let mut stream = Replayed::new(stream, start.freeze());
                stream.send_at_once();
                boxed::pinned(|| serve_http2(stream, ctx.clone(), &protocols.http2, first_due))
                    .await
            }
        };
        if let Some(Err(e)) = result {
            if is_header_timeout(&e) {
                // hyper's head timer also runs while a keep-alive connection waits for its
                // next request: that is an idle client, not a stalled head.
                let cause = if ctx.progress.any_request() {
                    ClientTimeout::Idle
                } else {
                    ClientTimeout::Head
                };
                ctx.series.timed_out(cause);
            }
            tracing::debug!(client = %ctx.client, error = %e, "client connection ended with an error");
        }
    }
}

/// Reads a new connection's first bytes until they tell its HTTP version: the stream, the
/// bytes read and the version; `None` when it was closed here instead: nothing by
/// `first_due` (counted), closed without a byte, a read error, or no byte within a grace
/// once draining began.
async fn await_first_bytes<IO>(
    mut io: IO,
    ctx: &ConnContext,
    first_due: Instant,
) -> Option<(IO, BytesMut, Speaks)>
where
    IO: AsyncRead + ReadReady + Unpin,
{
    let client = ctx.client;
    let mut start = BytesMut::new();
    // Most often the request is there already (the runtime takes a socket just accepted
    // for readable, and reads it at once): read without the wait below, which makes a
    // timer and a watch for the drain (callgrind, a new connection per request: 30,991 ->
    // 30,468 instructions). A request that arrives as the drain begins is answered with
    // `Connection: close` (see `proxy::handle`).
    let first =
        poll_fn(|cx| Poll::Ready(detect::poll_first_bytes(Pin::new(&mut io), cx, &mut start)));
    let read = match first.await {
        Poll::Ready(read) => read,
        Poll::Pending => {
            // One timer for both limits: the first request's, then the drain's grace
            // (earlier); the stream's idle limit needs none of its own meanwhile.
            let deadline = tokio::time::sleep_until(first_due);
            tokio::pin!(deadline);
            io.bound_waits(Some(first_due));
            let mut draining = false;
            let read = loop {
                tokio::select! {
                    r = detect::first_bytes(&mut io, &mut start) => break r,
                    () = &mut deadline => {
                        if !draining {
                            ctx.series.timed_out(ClientTimeout::Head);
                            tracing::debug!(%client, "no request within header_timeout");
                        }
                        return None;
                    }
                    _ = ctx.shutdown.triggered(), if !draining => {
                        // A client that connected as the drain began still gets a grace
                        // to send its request, which is then answered with
                        // `Connection: close`.
                        draining = true;
                        let grace = DRAIN_GRACE.min(ctx.listener.idle_timeout);
                        deadline.as_mut().reset(Instant::now() + grace);
                    }
                }
            };
            io.bound_waits(None);
            read
        }
    };
    match read {
        Ok(speaks) => speaks.map(|speaks| (io, start, speaks)),
        Err(e) => {
            tracing::debug!(%client, error = %e, "client connection ended with an error");
            None
        }
    }
}

/// Serves an HTTP/2 connection whose first request is due at `first_due`.
async fn serve_http2<S>(
    stream: S,
    ctx: Arc<ConnContext>,
    http2: &Http2Settings,
    first_due: Instant,
) -> Option<hyper::Result<()>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let first_request = tokio::time::sleep_until(first_due);
    tokio::pin!(first_request);
    let (client, idle) = (ctx.client, ctx.listener.idle_timeout);
    // The service holds the context as long as the connection, the watch a share of it.
    let watched = ctx.clone();
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        handle(ctx.clone(), req.map(ClientBody::H2))
    });
    let watch = Watch {
        first_request: first_request.as_mut(),
        progress: &watched.progress,
        series: &watched.series,
        client,
        shutdown: &watched.shutdown,
        idle,
    };
    let streams = ConnectionStreams::default();
    let hold = Arc::new(Hold::default());
    let io = TokioIo::new(HeldWrites::new(stream, hold.clone()));
    let conn = boxed::pinned(|| http2.builder(streams.clone()).serve_connection(io, service));
    let served = Box::pin(InTask::new(conn, streams, hold));
    watch
        .drive(served, |mut served| {
            if let Some(conn) = served.connection() {
                conn.graceful_shutdown();
            }
        })
        .await
}

/// An HTTP/1 connection between its busy spells: what it keeps while parked, in its task
/// or dormant.
struct Http1Conn {
    shared: Arc<ListenerContext>,
    client: SocketAddr,
    /// When its next request head is due.
    head_due: Instant,
    /// Set once draining began: when it is closed if it stays idle.
    drain_due: Option<Instant>,
    /// What it holds until it ends, taken along when it goes dormant.
    _held: Held,
}

/// Serves an HTTP/1 connection with proxyd's own codec ([`super::h1`]), from its first
/// bytes (`first`, with the connection's context) or, without them, from a parked wait (a
/// dormant connection woken). A connection idle between requests for [`PARK_AFTER`] is
/// parked: the codec lets its buffers go and only the stream waits for the next bytes; a
/// plain one parked for [`DOZE_AFTER`] more goes dormant.
///
/// A parked connection holds the stream, its listener's context, the client's address and
/// its deadlines, nothing else: its own context (forwarding headers rendered for it, ...),
/// the codec's state and the request path are in the boxed future of a busy spell, gone
/// while it waits, and rebuilt when its next request comes.
#[allow(clippy::manual_async_fn)] // see the block below
fn serve_http1<S>(
    mut stream: S,
    mut first: Option<(BytesMut, Arc<ConnContext>)>,
    mut conn: Http1Conn,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
{
    // An `async move` block rather than an `async fn`, which keeps each argument twice in
    // its future (as the argument and as the local it is moved into): the stream, the
    // connection's state and its first bytes, 304 bytes of the task's future.
    async move {
        // A woken dormant connection waits again first, with no doze of its own left: it is
        // ready already, or due.
        let mut doze_at = None;
        loop {
            // Only a connection's first busy spell starts with nothing written to it.
            let written_before = first.is_none();
            let (read, ctx) = match first.take() {
                Some(first) => first,
                None => {
                    match await_next_request(&mut stream, &mut conn, doze_at).await {
                        Next::Request => {}
                        Next::Closed => return,
                        Next::Doze => match go_dormant(stream, conn) {
                            Ok(()) => return,
                            Err(back) => {
                                (stream, conn) = *back;
                                doze_at = None;
                                continue;
                            }
                        },
                    }
                    let ctx = ConnContext::resumed(conn.shared.clone(), conn.client);
                    (BytesMut::new(), Arc::new(ctx))
                }
            };
            // The stream goes to the busy spell and comes back into the same place here (a
            // parked connection's future holds one stream, not one per step).
            let head_due = conn.head_due;
            let drain_due = &mut conn.drain_due;
            let busy = boxed::pinned(|| {
                serve_busy(stream, read, ctx, head_due, drain_due, written_before)
            });
            match busy.await {
                Served::Ended => return,
                // A keep-alive connection has `header_timeout` for its next request from the
                // end of the last response.
                Served::Parked(returned, due) => (stream, conn.head_due) = (returned, due),
            }
            doze_at = may_doze(&stream).then(|| Instant::now() + DOZE_AFTER);
        }
    }
}

/// Whether a parked connection on `stream` may go dormant: a plain socket (TLS keeps its
/// state above it) on a worker, whose dormitory is the one of the thread that serves it
/// ([`DORMITORY`]: a connection's task never leaves its worker).
fn may_doze<S: ReadReady>(stream: &S) -> bool {
    stream.is_plain_socket() && this_dormitory().is_some()
}

/// Puts a parked plain connection to sleep in its worker's dormitory; gives it back when
/// it cannot go (a drain began, or its stream has no plain socket). A socket that could not
/// be taken out of the runtime is closed.
fn go_dormant<S: ReadReady>(stream: S, conn: Http1Conn) -> Result<(), Box<(S, Http1Conn)>> {
    // Checked on the worker that serves the listener's accept loop: a drain that loop
    // has seen shows here, and one it has not seen yet comes after this sleeper in the
    // dormitory's queue (see `serve_limited`), so no sleeper misses its drain.
    let dormitory = if stream.is_plain_socket() && !conn.shared.shutdown.is_triggered() {
        this_dormitory()
    } else {
        None
    };
    let Some(dormitory) = dormitory else {
        return Err(Box::new((stream, conn)));
    };
    let dormant = match stream.into_dormant() {
        Ok(Ok(dormant)) => dormant,
        Ok(Err(e)) => {
            tracing::debug!(client = %conn.client, error = %e, "parked client connection could not go dormant; closed");
            return Ok(());
        }
        Err(stream) => return Err(Box::new((stream, conn))),
    };
    dormitory.sleep(Sleeper {
        socket: dormant.socket,
        state: Asleep {
            tracked: conn.shared.shutdown.track(),
            limit: dormant.limit,
            conn,
        },
    });
    Ok(())
}

/// All a dormant connection keeps besides its socket: its state (with its places under
/// the limits), its idle limit, and its place in the drain's count.
struct Asleep {
    conn: Http1Conn,
    limit: DormantLimit,
    tracked: TaskTrackerToken,
}

impl Wake for Asleep {
    fn wake(self, socket: std::net::TcpStream) {
        let Asleep {
            conn,
            limit,
            tracked,
        } = self;
        let shutdown = conn.shared.shutdown.clone();
        shutdown.spawn(woken(limit.wake(ClientSocket::new(socket)), conn));
        // The task counts for the drain now.
        drop(tracked);
    }

    fn due(&self) -> Instant {
        [
            Some(self.conn.head_due),
            self.conn.drain_due,
            self.limit.end(),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.conn.head_due)
    }

    fn group(&self) -> usize {
        group(&self.conn.shared)
    }

    fn settle() {
        h1::settle_spares();
    }
}

/// A woken dormant connection's task (boxed, so that the task is small; and a function of
/// its own, since [`serve_http1`] spawns it).
fn woken(
    stream: IdleTimeout<ClientSocket>,
    conn: Http1Conn,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    boxed::pinned(|| serve_http1(stream, None, conn))
}

/// One busy spell of an HTTP/1 connection: serves requests until it ends or parks.
async fn serve_busy<S>(
    stream: S,
    read: BytesMut,
    ctx: Arc<ConnContext>,
    head_due: Instant,
    drain_due: &mut Option<Instant>,
    written_before: bool,
) -> Served<S>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
{
    // Lent to each request rather than shared with it (see `handle`).
    let context: &ConnContext = &ctx;
    let conn = h1::Conn {
        max_header_bytes: ctx.listener.max_header_bytes,
        header_timeout: ctx.listener.header_timeout,
        drain_grace: DRAIN_GRACE.min(ctx.listener.idle_timeout),
        park_after: PARK_AFTER.min(ctx.listener.header_timeout),
        shutdown: &ctx.shutdown,
        series: &ctx.series,
        progress: &ctx.progress,
        client: ctx.client,
        handler: move |req| handle(context, req),
    };
    h1::serve(stream, read, &conn, head_due, drain_due, written_before).await
}

/// How a parked connection's wait ended.
enum Next {
    /// Its next bytes came (or its close, or an error, which the read then meets).
    Request,
    /// It was closed here: see [`await_next_request`].
    Closed,
    /// It stayed idle until its doze time: it may go dormant.
    Doze,
}

/// Waits, holding only the stream, until a parked connection's next bytes arrive.
/// [`Next::Closed`] when it was closed here instead: no request by its head's due time
/// (counted as an idle client), idle while draining, or the idle timeout or a socket error
/// (counted where they fire); [`Next::Doze`] when it was still idle at `doze_at` (before
/// any of those, and no drain began).
///
/// The wait's end is timed by the stream's own timer, the one of its idle limit, where it
/// has one: a parked connection keeps one timer, not two.
async fn await_next_request<S: ReadReady>(
    stream: &mut S,
    conn: &mut Http1Conn,
    mut doze_at: Option<Instant>,
) -> Next {
    let Http1Conn {
        shared: listener,
        client,
        head_due,
        drain_due,
        ..
    } = conn;
    let (client, head_due) = (*client, *head_due);
    // Whichever of the next request's and the drain's limits comes first.
    let mut due = drain_due.map_or(head_due, |d| d.min(head_due));
    // Only for a stream without a timer of its own.
    let mut own_timer: Option<Pin<Box<Sleep>>> = None;
    let drain = listener.shutdown.triggered();
    tokio::pin!(drain);
    let woken = std::future::poll_fn(|cx| {
        if drain_due.is_none() && drain.as_mut().poll(cx).is_ready() {
            // Keep-alive clients are told `Connection: close` on their next response;
            // one that sends nothing is closed after a grace.
            let grace_end = Instant::now() + DRAIN_GRACE.min(listener.listener.idle_timeout);
            *drain_due = Some(grace_end);
            due = due.min(grace_end);
            doze_at = None;
        }
        let end = doze_at.map_or(due, |doze| doze.min(due));
        if let Some(woken) = stream.poll_ready_until(cx, end) {
            return woken;
        }
        if let Poll::Ready(ready) = stream.poll_read_ready(cx) {
            return Poll::Ready(ready.map(|()| Woken::Readable));
        }
        let timer = own_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(end)));
        if timer.deadline() != end {
            timer.as_mut().reset(end);
        }
        timer.as_mut().poll(cx).map(|()| Ok(Woken::Due))
    })
    .await;
    match woken {
        Ok(Woken::Readable) => Next::Request,
        Ok(Woken::Due) if doze_at.is_some_and(|doze| doze < due) => Next::Doze,
        Ok(Woken::Due) => {
            if drain_due.is_none_or(|d| head_due < d) {
                listener.series.timed_out(ClientTimeout::Idle);
                tracing::debug!(%client, "no request within header_timeout");
            }
            Next::Closed
        }
        Err(e) => {
            // The idle timeout (counted where it fired) or a socket error.
            tracing::debug!(%client, error = %e, "parked client connection ended");
            Next::Closed
        }
    }
}

/// What a served connection is watched for besides its own work: the first request's
/// deadline and the drain.
struct Watch<'a> {
    first_request: Pin<&'a mut Sleep>,
    progress: &'a HeadProgress,
    series: &'a ListenerSeries,
    client: SocketAddr,
    shutdown: &'a Shutdown,
    idle: Duration,
}

impl Watch<'_> {
    /// Runs `conn` to its end; `None` when it was closed for sending no request in time.
    async fn drive<C>(
        mut self,
        mut conn: Pin<Box<C>>,
        graceful_shutdown: impl FnOnce(Pin<&mut C>),
    ) -> Option<hyper::Result<()>>
    where
        C: Future<Output = hyper::Result<()>>,
    {
        let mut awaiting_first = true;
        loop {
            tokio::select! {
                r = conn.as_mut() => return Some(r),
                () = self.first_request.as_mut(), if awaiting_first => {
                    awaiting_first = false;
                    if !self.progress.any_request() {
                        self.series.timed_out(ClientTimeout::Head);
                        tracing::debug!(client = %self.client, "no request within header_timeout");
                        return None;
                    }
                }
                _ = self.shutdown.triggered() => {
                    // Keep-alive clients are told `Connection: close` on their next
                    // response (see the request path), which closes cleanly from their
                    // side of the race. Only connections that stay idle are closed by us,
                    // after a grace.
                    return Some(tokio::select! {
                        r = conn.as_mut() => r,
                        _ = tokio::time::sleep(DRAIN_GRACE.min(self.idle)) => {
                            graceful_shutdown(conn.as_mut());
                            conn.await
                        }
                    });
                }
            }
        }
    }
}

/// Whether hyper ended the connection because a request head did not arrive in time.
fn is_header_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Closes a refused connection with a reset: no FIN handshake and no TIME_WAIT left on
/// our side, whatever a flood of them does.
fn refuse(accepted: Accepted) {
    accepted.reset();
}
