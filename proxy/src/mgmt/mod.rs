//! The gRPC management API (`proxy.v1`): RouteService, PoolService, AdminService, plus
//! `grpc.health.v1.Health` and server reflection (v1 and v1alpha).
//!
//! Handlers are thin: convert the message to a [`Change`], call [`StateHandle::apply`],
//! map the [`crate::state::ApplyError`] to a status. The API listens on a unix socket
//! (`server.mgmt_socket`, mode 0660) and, optionally, on TCP (`server.mgmt_listen`) where
//! every call needs `authorization: Bearer <token>` (`server.mgmt_token_file`), over TLS
//! (`server.mgmt_tls`, required unless the address is loopback).

mod admin;
mod auth;
mod authority;
mod cluster;
mod convert;
mod discovery;
mod error;
mod pools;
mod registration;
mod routes;
mod socket;
mod status_page;
mod tcp;
mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;

use proxy_proto::v1::admin_service_server::AdminServiceServer;
use proxy_proto::v1::pool_service_server::PoolServiceServer;
use proxy_proto::v1::route_service_server::RouteServiceServer;
use thiserror::Error;
use tonic::service::InterceptorLayer;
use tonic::transport::server::Router;
use tonic::transport::Server;
use tonic::Status;

pub use admin::AdminApi;
pub use auth::BearerAuth;
pub use cluster::ClusterApi;
pub use discovery::DiscoveryApi;
pub use pools::PoolApi;
pub use registration::RegistrationApi;
pub use routes::RouteApi;
pub use status_page::{StatusDocument, StatusPage, StatusSources};
pub use tcp::MgmtTlsConfig;
pub use tls::TlsApi;

use crate::config::{Config, ServerConfig};
use crate::state::{Change, Protocol, Source, StateHandle};
use crate::Shutdown;

/// Largest request or response message: a `routes import` of 100,000 rules fits.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Why the management API could not start.
#[derive(Debug, Error)]
pub enum MgmtError {
    /// Another process accepts connections on the socket.
    #[error("management socket {path}: another proxyd is serving it; stop that one first or choose another server.mgmt_socket")]
    InUse {
        /// Socket path.
        path: String,
    },
    /// The path exists and is not a socket; it is left alone.
    #[error("management socket {path}: the path exists and is not a socket; remove it or choose another server.mgmt_socket")]
    NotASocket {
        /// Socket path.
        path: String,
    },
    /// Creating the socket failed.
    #[error("management socket {path}: {source}")]
    Socket {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The TCP listener could not be bound.
    #[error("management listener {addr}: {source}")]
    Tcp {
        /// Configured address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The TCP listener has no usable token.
    #[error("server.mgmt_token_file {path}: {reason}; the TCP management listener needs a token")]
    Token {
        /// Token file path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TCP listener is configured without a token file.
    #[error("server.mgmt_listen is set but server.mgmt_token_file is not; the TCP management listener needs a token")]
    NoToken,
    /// A `server.mgmt_tls` file could not be used.
    #[error("{field}: {reason}")]
    Tls {
        /// `server.mgmt_tls.cert`, `.key` or `.client_ca`.
        field: &'static str,
        /// The file and what is wrong with it.
        reason: String,
    },
    /// The embedded descriptor set could not be served by reflection.
    #[error("reflection: {0}")]
    Reflection(String),
}

/// A listener as the Status call reports it.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    /// Name from the config file.
    pub name: String,
    /// What it speaks.
    pub protocol: Protocol,
    /// Address from the config file.
    pub configured: SocketAddr,
    /// Address actually bound (differs for port 0).
    pub bound: SocketAddr,
}

impl ListenerInfo {
    /// The configured listeners with the addresses they were bound to.
    pub fn all(config: &Config, bound: &BTreeMap<String, SocketAddr>) -> Vec<ListenerInfo> {
        config
            .listeners
            .iter()
            .filter_map(|l| {
                bound.get(&l.name).map(|&bound| ListenerInfo {
                    name: l.name.clone(),
                    protocol: l.protocol,
                    configured: l.address,
                    bound,
                })
            })
            .collect()
    }
}

/// How the services change the state: a batch passes the file check, then the single
/// writer; refused once the daemon stops. Its state handle also serves their reads.
#[derive(Debug, Clone)]
pub struct Writes {
    state: StateHandle,
    shutdown: Shutdown,
    /// Fleet mode: API batches go to etcd through it (`None`: a single host).
    cluster: Option<crate::cluster::Cluster>,
}

impl Writes {
    /// Changes through `state`, refused once `shutdown` fires.
    pub fn new(state: StateHandle, shutdown: Shutdown) -> Writes {
        Writes {
            state,
            shutdown,
            cluster: None,
        }
    }

    /// API batches go to the fleet through `cluster` (fleet mode); other sources (a config
    /// reload) stay on this host.
    pub fn through(mut self, cluster: Option<crate::cluster::Cluster>) -> Writes {
        self.cluster = cluster;
        self
    }

    /// The desired state, for reads.
    fn state(&self) -> &StateHandle {
        &self.state
    }

    /// The fleet API batches go to, in fleet mode.
    fn cluster(&self) -> Option<&crate::cluster::Cluster> {
        self.cluster.as_ref()
    }

    /// Applies an API batch, refused while the daemon stops.
    async fn apply(&self, changes: Vec<Change>) -> Result<u64, Status> {
        self.apply_as(changes, Source::Api).await
    }

    async fn apply_as(&self, changes: Vec<Change>, source: Source) -> Result<u64, Status> {
        if self.shutdown.is_triggered() {
            return Err(Status::unavailable(
                "proxyd is shutting down and takes no changes",
            ));
        }
        let changes = check_files(changes).await?;
        match (&self.cluster, source) {
            (Some(cluster), Source::Api) => {
                cluster.write(changes).await.map_err(error::cluster_status)
            }
            _ => self
                .state
                .apply(changes, source)
                .await
                .map_err(error::status),
        }
    }
}

/// Runs the file check of a batch (pool TLS files) before it is applied: on a blocking
/// thread when the batch names files, inline otherwise.
async fn check_files(changes: Vec<Change>) -> Result<Vec<Change>, Status> {
    if !crate::upstream::tls::reads_files(&changes) {
        return Ok(changes);
    }
    tokio::task::spawn_blocking(move || {
        crate::upstream::tls::check_files(&changes).map(|()| changes)
    })
    .await
    .map_err(|e| Status::internal(format!("checking files: {e}")))?
    .map_err(|(_, e)| error::status(e))
}

/// The management sockets, bound first so a second daemon fails before touching anything.
#[derive(Debug)]
pub struct Sockets {
    unix: socket::UnixSocket,
    tcp: Option<TcpSocket>,
}

/// The TCP management listener with what every connection and call must pass.
struct TcpSocket {
    listener: std::net::TcpListener,
    auth: BearerAuth,
    /// `None`: plaintext (loopback only, enforced by the config).
    tls: Option<Arc<MgmtTlsConfig>>,
}

impl std::fmt::Debug for TcpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpSocket")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// The management API's listening sockets as they pass between processes: handed over by
/// the previous process (either may be missing), or duplicated for the next one.
#[derive(Debug, Default)]
pub struct HandedSockets {
    /// The unix socket.
    pub unix: Option<std::os::unix::net::UnixListener>,
    /// The TCP listener.
    pub tcp: Option<std::net::TcpListener>,
}

/// Accepted connections of one management socket.
pub type Incoming<C> = Pin<Box<dyn Stream<Item = std::io::Result<C>> + Send>>;

/// How the management sockets are accepted from, given by the composition root: while the
/// daemon hands over to its successor, new management connections are held back so that
/// they reach the process that owns the state store.
pub trait Accepting: Send + Sync {
    /// The connections of the unix socket.
    fn unix(&self, listener: tokio::net::UnixListener) -> Incoming<tokio::net::UnixStream>;
    /// The connections of the TCP listener.
    fn tcp(&self, listener: tokio::net::TcpListener) -> Incoming<tokio::net::TcpStream>;
}

impl Sockets {
    /// Binds the unix socket and, when configured, the TCP listener with its token; sockets
    /// handed over by a previous process are used instead of binding new ones.
    pub fn bind(server: &ServerConfig, inherited: HandedSockets) -> Result<Sockets, MgmtError> {
        // Read the token and the TLS files before creating anything, so a bad file leaves
        // no socket behind.
        let tcp_auth = match (&server.mgmt_listen, &server.mgmt_token_file) {
            (None, _) => None,
            (Some(_), None) => return Err(MgmtError::NoToken),
            (Some(addr), Some(file)) => Some((*addr, BearerAuth::from_file(file)?)),
        };
        let tls = match (&tcp_auth, &server.mgmt_tls) {
            (Some(_), Some(tls)) => Some(Arc::new(MgmtTlsConfig::load(tls)?)),
            _ => None,
        };
        let unix = match inherited.unix {
            Some(listener) => socket::adopt(listener, &server.mgmt_socket)?,
            None => socket::bind(&server.mgmt_socket)?,
        };
        let tcp = match tcp_auth {
            None => None,
            Some((addr, auth)) => {
                let tcp_error = |source| MgmtError::Tcp { addr, source };
                let listener = match inherited.tcp {
                    Some(listener) => listener,
                    None => std::net::TcpListener::bind(addr).map_err(tcp_error)?,
                };
                listener.set_nonblocking(true).map_err(tcp_error)?;
                Some(TcpSocket {
                    listener,
                    auth,
                    tls,
                })
            }
        };
        Ok(Sockets { unix, tcp })
    }

    /// Duplicates of the listening sockets, for handing over to a successor.
    pub fn duplicates(&self) -> std::io::Result<HandedSockets> {
        Ok(HandedSockets {
            unix: Some(self.unix.listener.try_clone()?),
            tcp: match &self.tcp {
                Some(tcp) => Some(tcp.listener.try_clone()?),
                None => None,
            },
        })
    }

    /// The TLS settings of the TCP listener, for `ReloadConfig` to renew.
    pub fn tcp_tls(&self) -> Option<Arc<MgmtTlsConfig>> {
        self.tcp.as_ref().and_then(|t| t.tls.clone())
    }

    /// The bound address of the TCP listener, if there is one.
    pub fn tcp_address(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|t| t.listener.local_addr().ok())
    }
}

/// The API services, each holding what it reads and changes.
#[derive(Clone)]
pub struct Services {
    /// RouteService.
    pub routes: RouteApi,
    /// PoolService.
    pub pools: PoolApi,
    /// AdminService.
    pub admin: AdminApi,
    /// DiscoveryService.
    pub discovery: DiscoveryApi,
    /// RegistrationService.
    pub registration: RegistrationApi,
    /// TlsService.
    pub tls: TlsApi,
    /// ClusterService.
    pub cluster: ClusterApi,
}

/// The API services, ready to be added to a server.
struct Servers {
    routes: RouteServiceServer<RouteApi>,
    pools: PoolServiceServer<PoolApi>,
    admin: AdminServiceServer<AdminApi>,
    discovery: proxy_proto::v1::discovery_service_server::DiscoveryServiceServer<DiscoveryApi>,
    registration:
        proxy_proto::v1::registration_service_server::RegistrationServiceServer<RegistrationApi>,
    tls: proxy_proto::v1::tls_service_server::TlsServiceServer<tls::TlsApi>,
    cluster: proxy_proto::v1::cluster_service_server::ClusterServiceServer<ClusterApi>,
}

impl Servers {
    fn new(services: Services) -> Servers {
        Servers {
            routes: RouteServiceServer::new(services.routes)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            pools: PoolServiceServer::new(services.pools)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            discovery: services.discovery.server(),
            registration: services.registration.server(),
            tls: services.tls.server(),
            cluster: services.cluster.server(),
            admin: AdminServiceServer::new(services.admin)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }
}

/// Adds every service, health and reflection (v1 and v1alpha) to a server.
async fn routes<L>(
    mut server: Server<L>,
    services: &Servers,
    health: &tonic_health::server::HealthReporter,
) -> Result<Router<L>, MgmtError>
where
    L: Clone,
{
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proxy_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Each version lists the other too, so either kind of client sees both.
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let v1 = reflection()
        .build_v1()
        .map_err(|e| MgmtError::Reflection(e.to_string()))?;
    let v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| MgmtError::Reflection(e.to_string()))?;
    let health_service = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
    );
    Ok(server
        .add_service(health_service)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(services.routes.clone())
        .add_service(services.pools.clone())
        .add_service(services.admin.clone())
        .add_service(services.discovery.clone())
        .add_service(services.registration.clone())
        .add_service(services.tls.clone())
        .add_service(services.cluster.clone()))
}

/// Serves `services` on `sockets`, accepting through `accepting` and counting every call in
/// `metrics`, until `shutdown` fires, then removes the socket file.
pub async fn spawn(
    sockets: Sockets,
    services: Services,
    metrics: Arc<crate::telemetry::Metrics>,
    accepting: &dyn Accepting,
    shutdown: Shutdown,
) -> Result<(), MgmtError> {
    let counted = crate::telemetry::api::ApiMetricsLayer::new(metrics);
    let services = Servers::new(services);
    let health = tonic_health::server::HealthReporter::new();
    health.set_serving::<RouteServiceServer<RouteApi>>().await;
    health.set_serving::<PoolServiceServer<PoolApi>>().await;
    health.set_serving::<AdminServiceServer<AdminApi>>().await;
    health.set_serving::<proxy_proto::v1::discovery_service_server::DiscoveryServiceServer<DiscoveryApi>>().await;
    health.set_serving::<proxy_proto::v1::registration_service_server::RegistrationServiceServer<RegistrationApi>>().await;
    health
        .set_serving::<proxy_proto::v1::tls_service_server::TlsServiceServer<tls::TlsApi>>()
        .await;
    health
        .set_serving::<proxy_proto::v1::cluster_service_server::ClusterServiceServer<ClusterApi>>()
        .await;

    let Sockets { unix, tcp } = sockets;
    let unix_router = routes(Server::builder().layer(counted.clone()), &services, &health).await?;
    let tcp_router = match tcp {
        Some(TcpSocket {
            listener,
            auth,
            tls,
        }) => {
            let server = Server::builder()
                .layer(counted)
                .layer(InterceptorLayer::new(auth));
            Some((listener, tls, routes(server, &services, &health).await?))
        }
        None => None,
    };

    let path = unix.path.clone();
    let file_id = unix.file_id();
    let unix_listener =
        tokio::net::UnixListener::from_std(unix.listener).map_err(|source| MgmtError::Socket {
            path: path.display().to_string(),
            source,
        })?;
    tracing::info!(path = %path.display(), "management API listening");
    let stop = shutdown.clone();
    let remove_shutdown = shutdown.clone();
    let reporter = health.clone();
    let unix_incoming = accepting.unix(unix_listener);
    let relays = shutdown.clone();
    // A service, so it answers while connections drain (writes get UNAVAILABLE), and
    // stopping the daemon waits until the API has let go of its sockets.
    shutdown.spawn_service(async move {
        // Each connection goes through the relay that accepts a socket path as `:authority`
        // (clients such as Python grpcio send one); the TCP listener stays strict.
        let incoming = futures_util::StreamExt::map(unix_incoming, move |accepted| {
            accepted.map(|client| authority::relay(client, &relays))
        });
        // Up while draining (writes get UNAVAILABLE); stops when the process finishes.
        let signal = async move {
            stop.exiting().await;
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        };
        if let Err(e) = unix_router
            .serve_with_incoming_shutdown(incoming, signal)
            .await
        {
            tracing::error!(error = %e, "management API stopped");
        }
        // After a handoff the successor serves on this very socket file.
        if !remove_shutdown.is_handed_over() {
            socket::remove(&path, file_id);
        }
    });

    if let Some((listener, tls, router)) = tcp_router {
        let addr = listener.local_addr().ok();
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(|source| MgmtError::Tcp {
                addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                source,
            })?;
        tracing::info!(
            address = ?addr,
            tls = tls.is_some(),
            "management API listening on TCP (bearer token required)"
        );
        // Held back with the unix socket while handing over: a call made after the
        // upgrade returned reaches the new process over TCP too.
        let incoming = accepting.tcp(listener);
        let stop = shutdown.clone();
        shutdown.spawn_service(async move {
            let served = match tls {
                Some(tls) => {
                    router
                        .serve_with_incoming_shutdown(
                            tcp::handshakes(incoming, tls),
                            stop.exiting(),
                        )
                        .await
                }
                None => {
                    router
                        .serve_with_incoming_shutdown(incoming, stop.exiting())
                        .await
                }
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "management TCP listener stopped");
            }
        });
    }
    Ok(())
}
