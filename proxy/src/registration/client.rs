//! A client for services that register themselves (also used by `proxyctl register`).
//!
//! ```no_run
//! # async fn example() -> Result<(), proxy::registration::client::ClientError> {
//! use proxy::registration::client::{self, Announce};
//! let channel = client::unix_channel("/run/proxy/mgmt.sock").await?;
//! let announce = Announce { endpoint: "127.0.0.1:9001".into(), port: 20000, path_prefix: "/a".into(), ..Default::default() };
//! let lease = client::register(channel, announce, None).await?;
//! // Served while `lease` lives. When the stream ends (the proxy was upgraded or restarted),
//! // the lease registers again by itself, with backoff, until released.
//! lease.release().await;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use proxy_proto::v1 as pb;
use proxy_proto::v1::registration_service_client::RegistrationServiceClient;
use thiserror::Error;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Streaming;

pub use pb::{Announce, RegisteredProtocol};

/// Why registering failed or a lease was lost.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The management API could not be reached.
    #[error("cannot reach the management API: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The proxy refused the registration or ended the stream with an error.
    #[error("{}: {}", .0.code(), .0.message())]
    Refused(#[from] tonic::Status),
    /// The token is not valid header text.
    #[error("the bearer token is not valid header text")]
    BadToken,
    /// The proxy closed the stream.
    #[error("the proxy closed the registration stream")]
    Closed,
    /// Registering again got no answer in time.
    #[error("no answer to the registration within {0:?}")]
    NoAnswer(Duration),
}

/// A channel to the management API's unix socket.
pub async fn unix_channel(path: impl AsRef<Path>) -> Result<Channel, ClientError> {
    let path: PathBuf = path.as_ref().to_path_buf();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(channel)
}

/// A channel to the management API's TCP listener (`http://host:port`); pass the token to
/// [`register`].
pub async fn tcp_channel(uri: &str) -> Result<Channel, ClientError> {
    Ok(Endpoint::from_shared(uri.to_string())?.connect().await?)
}

/// Longest wait for the answer to one attempt to register again (an upgrade holds new
/// management connections only until the next process is ready).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits between attempts to register again: `initial`, doubling up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Wait before the first attempt after the stream ended.
    pub initial: Duration,
    /// Longest wait between attempts.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// Where a lease stands, as [`Lease`] watches it.
#[derive(Debug, Clone)]
struct Standing {
    /// The latest answer of the proxy.
    registered: pb::Registered,
    /// Whether the stream of that answer is still open.
    live: bool,
    /// Successful registrations so far (the first one included).
    registrations: u64,
}

/// A held registration: registers again by itself whenever the stream ends, until
/// released or dropped.
pub struct Lease {
    standing: watch::Receiver<Standing>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("standing", &*self.standing.borrow())
            .finish()
    }
}

impl Lease {
    /// What the proxy answered last: id, route, listener and its address, keepalive.
    pub fn registered(&self) -> pb::Registered {
        self.standing.borrow().registered.clone()
    }

    /// Whether the service is registered right now (false while registering again).
    pub fn is_registered(&self) -> bool {
        self.standing.borrow().live
    }

    /// Successful registrations so far: 1 at first, one more after each re-registration.
    pub fn registrations(&self) -> u64 {
        self.standing.borrow().registrations
    }

    /// Waits until the lease has registered more than `count` times in all, and returns
    /// what the proxy answered then; `None` if the lease has stopped.
    pub async fn registered_after(&mut self, count: u64) -> Option<pb::Registered> {
        self.standing
            .wait_for(|s| s.live && s.registrations > count)
            .await
            .ok()
            .map(|s| s.registered.clone())
    }

    /// Ends the registration (the route is held if this was its last instance) and stops
    /// registering again. Returns once the proxy has taken the instance out (or after three
    /// keepalives).
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One registration stream: the announce sent, the answer received.
struct Session {
    registered: pb::Registered,
    outbound: mpsc::Sender<pb::RegisterRequest>,
    inbound: Streaming<pb::RegisterEvent>,
}

/// How a session ended.
enum Ended {
    /// The lease was released.
    Released,
    /// The stream ended or broke.
    Lost(ClientError),
}

impl Session {
    /// Opens the stream and announces.
    async fn open(
        channel: Channel,
        announce: Announce,
        token: Option<&MetadataValue<Ascii>>,
    ) -> Result<Session, ClientError> {
        let (outbound, rx) = mpsc::channel::<pb::RegisterRequest>(8);
        let first = pb::RegisterRequest {
            kind: Some(pb::register_request::Kind::Announce(announce)),
        };
        outbound
            .send(first)
            .await
            .map_err(|_| ClientError::Closed)?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        let mut inbound = RegistrationServiceClient::new(channel)
            .register(request)
            .await?
            .into_inner();
        match inbound.message().await? {
            Some(pb::RegisterEvent {
                kind: Some(pb::register_event::Kind::Registered(registered)),
            }) => Ok(Session {
                registered,
                outbound,
                inbound,
            }),
            _ => Err(ClientError::Closed),
        }
    }

    /// Answers keepalives until the stream ends or `stop` fires (then closes the stream
    /// and waits, bounded, for the proxy to take the instance out).
    async fn hold(mut self, stop: &mut oneshot::Receiver<()>) -> Ended {
        let keepalive = Duration::from_millis(self.registered.keepalive_ms.max(100));
        let mut ticker = tokio::time::interval(keepalive);
        let mut sequence = 0u64;
        loop {
            tokio::select! {
                _ = &mut *stop => {
                    // Close our half and wait (bounded) for the proxy to close its half,
                    // which it does only after the registration has ended.
                    drop(self.outbound);
                    let _ = tokio::time::timeout(keepalive * 3, async {
                        while let Ok(Some(_)) = self.inbound.message().await {}
                    })
                    .await;
                    return Ended::Released;
                }
                _ = ticker.tick() => {
                    sequence += 1;
                    let ping = pb::RegisterRequest { kind: Some(pb::register_request::Kind::Ping(pb::Ping { sequence })) };
                    if self.outbound.send(ping).await.is_err() {
                        return Ended::Lost(ClientError::Closed);
                    }
                }
                event = self.inbound.message() => match event {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ended::Lost(ClientError::Closed),
                    Err(status) => return Ended::Lost(ClientError::Refused(status)),
                },
            }
        }
    }
}

/// Registers `announce` and keeps the lease (answering keepalives, registering again with
/// the default [`Backoff`] whenever the stream ends) until the [`Lease`] is released or
/// dropped. `token` is the bearer token for the TCP listener. The first registration's
/// refusal is returned; later ones are retried.
pub async fn register(
    channel: Channel,
    announce: Announce,
    token: Option<&str>,
) -> Result<Lease, ClientError> {
    register_with(channel, announce, token, Backoff::default()).await
}

/// [`register`] with its own backoff between attempts to register again.
pub async fn register_with(
    channel: Channel,
    announce: Announce,
    token: Option<&str>,
    backoff: Backoff,
) -> Result<Lease, ClientError> {
    let token: Option<MetadataValue<Ascii>> = token
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .map_err(|_| ClientError::BadToken)?;
    let session = Session::open(channel.clone(), announce.clone(), token.as_ref()).await?;
    let (standing_tx, standing) = watch::channel(Standing {
        registered: session.registered.clone(),
        live: true,
        registrations: 1,
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(keep(
        channel,
        announce,
        token,
        backoff,
        session,
        standing_tx,
        stopped,
    ));
    Ok(Lease {
        standing,
        stop: Some(stop),
        task,
    })
}

/// A wait between `wait / 2` and `wait`, drawn at random: after a daemon restart its many
/// services do not all come back in the same instant (equal jitter).
fn jittered(wait: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS: a fresh one per draw is a cheap random number.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(wait.as_nanos());
    let fraction = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
    wait / 2 + (wait / 2).mul_f64(fraction)
}

/// Holds `session`; whenever its stream ends, registers again (waiting `backoff` between
/// attempts) until `stop` fires.
async fn keep(
    channel: Channel,
    announce: Announce,
    token: Option<MetadataValue<Ascii>>,
    backoff: Backoff,
    mut session: Session,
    standing: watch::Sender<Standing>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let id = session.registered.id;
        match session.hold(&mut stop).await {
            Ended::Released => return,
            Ended::Lost(e) => {
                tracing::info!(id, reason = %e, "registration stream ended; registering again");
            }
        }
        standing.send_modify(|s| s.live = false);
        let mut wait = backoff.initial;
        let mut attempt = 0u32;
        session = loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(jittered(wait)) => {}
            }
            attempt += 1;
            let opened = tokio::select! {
                _ = &mut stop => return,
                opened = tokio::time::timeout(
                    OPEN_TIMEOUT,
                    Session::open(channel.clone(), announce.clone(), token.as_ref()),
                ) => opened.unwrap_or(Err(ClientError::NoAnswer(OPEN_TIMEOUT))),
            };
            match opened {
                Ok(session) => break session,
                Err(e) => {
                    tracing::debug!(attempt, error = %e, "registering again failed; retrying");
                    wait = (wait * 2).min(backoff.max);
                }
            }
        };
        tracing::info!(id = session.registered.id, route = %session.registered.route, attempt, "registered again");
        let registered = session.registered.clone();
        standing.send_modify(|s| {
            s.registered = registered;
            s.live = true;
            s.registrations += 1;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_waits_are_jittered_within_half_to_full() {
        let wait = Duration::from_secs(8);
        let draws: Vec<Duration> = (0..200).map(|_| jittered(wait)).collect();
        assert!(
            draws.iter().all(|d| *d >= wait / 2 && *d <= wait),
            "{draws:?}"
        );
        let distinct: std::collections::BTreeSet<Duration> = draws.iter().copied().collect();
        assert!(
            distinct.len() > 100,
            "only {} distinct waits",
            distinct.len()
        );
        let low = draws.iter().filter(|d| **d < wait * 3 / 4).count();
        assert!((40..=160).contains(&low), "{low} of 200 in the lower half");
    }
}
