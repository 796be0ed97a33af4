//! A client for services that register themselves (also used by `proxyctl register`).
//!
//! ```no_run
//! # async fn example() -> Result<(), proxy::registration::client::ClientError> {
//! use proxy::registration::client::{self, Announce};
//! let channel = client::unix_channel("/run/proxy/mgmt.sock").await?;
//! let announce = Announce { endpoint: "127.0.0.1:9001".into(), port: 20000, path_prefix: "/a".into(), ..Default::default() };
//! let mut lease = client::register(channel, announce, None).await?;
//! // Served while `lease` lives; `lease.lost()` resolves if the proxy goes away.
//! lease.release().await;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use proxy_proto::v1 as pb;
use proxy_proto::v1::registration_service_client::RegistrationServiceClient;
use thiserror::Error;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

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

/// A held registration. Dropping it or calling [`release`](Lease::release) ends it.
pub struct Lease {
    registered: pb::Registered,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<ClientError>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("registered", &self.registered)
            .finish()
    }
}

impl Lease {
    /// What the proxy answered: id, route, listener and its address, keepalive.
    pub fn registered(&self) -> &pb::Registered {
        &self.registered
    }

    /// Resolves when the lease is lost (the proxy closed the stream or went away).
    pub async fn lost(&mut self) -> ClientError {
        match (&mut self.task).await {
            Ok(e) => e,
            Err(_) => ClientError::Closed,
        }
    }

    /// Ends the registration (the route is held if this was its last instance). Returns
    /// once the proxy has taken the instance out (or after three keepalives).
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

/// Registers `announce` and keeps the lease (answering keepalives) until the [`Lease`] is
/// released or dropped. `token` is the bearer token for the TCP listener.
pub async fn register(
    channel: Channel,
    announce: Announce,
    token: Option<&str>,
) -> Result<Lease, ClientError> {
    let (tx, rx) = mpsc::channel::<pb::RegisterRequest>(8);
    let first = pb::RegisterRequest {
        kind: Some(pb::register_request::Kind::Announce(announce)),
    };
    tx.send(first).await.map_err(|_| ClientError::Closed)?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::BadToken)?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut inbound = RegistrationServiceClient::new(channel)
        .register(request)
        .await?
        .into_inner();
    let registered = match inbound.message().await? {
        Some(pb::RegisterEvent {
            kind: Some(pb::register_event::Kind::Registered(r)),
        }) => r,
        _ => return Err(ClientError::Closed),
    };
    let keepalive = std::time::Duration::from_millis(registered.keepalive_ms.max(100));
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(keepalive);
        let mut sequence = 0u64;
        loop {
            tokio::select! {
                _ = &mut stopped => {
                    // Close our half and wait (bounded) for the proxy to close its half,
                    // which it does only after the registration has ended.
                    drop(tx);
                    let _ = tokio::time::timeout(keepalive * 3, async {
                        while let Ok(Some(_)) = inbound.message().await {}
                    })
                    .await;
                    return ClientError::Closed;
                }
                _ = ticker.tick() => {
                    sequence += 1;
                    let ping = pb::RegisterRequest { kind: Some(pb::register_request::Kind::Ping(pb::Ping { sequence })) };
                    if tx.send(ping).await.is_err() {
                        return ClientError::Closed;
                    }
                }
                event = inbound.message() => match event {
                    Ok(Some(_)) => {}
                    Ok(None) => return ClientError::Closed,
                    Err(status) => return ClientError::Refused(status),
                },
            }
        }
    });
    Ok(Lease {
        registered,
        stop: Some(stop),
        task,
    })
}
