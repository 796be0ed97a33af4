//! Connecting to the management API over its unix socket or over TCP with a bearer token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use proxy_proto::v1::admin_service_client::AdminServiceClient;
use proxy_proto::v1::discovery_service_client::DiscoveryServiceClient;
use proxy_proto::v1::pool_service_client::PoolServiceClient;
use proxy_proto::v1::registration_service_client::RegistrationServiceClient;
use proxy_proto::v1::route_service_client::RouteServiceClient;
use proxy_proto::v1::tls_service_client::TlsServiceClient;
use tokio::net::UnixStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Status};

/// Where the daemon listens.
pub enum Target {
    /// The unix socket (the default).
    Unix(PathBuf),
    /// A TCP `host:port` and the file holding the bearer token.
    Tcp {
        /// `host:port`.
        addr: String,
        /// File whose content (trimmed) is the token.
        token_file: Option<PathBuf>,
    },
}

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// The channel type every client uses.
pub type Transport = InterceptedService<Channel, BearerToken>;

/// One client per service, sharing one connection.
pub struct Clients {
    /// RouteService.
    pub routes: RouteServiceClient<Transport>,
    /// PoolService.
    pub pools: PoolServiceClient<Transport>,
    /// AdminService.
    pub admin: AdminServiceClient<Transport>,
    /// DiscoveryService.
    pub discovery: DiscoveryServiceClient<Transport>,
    /// RegistrationService.
    pub registration: RegistrationServiceClient<Transport>,
    /// TlsService.
    pub tls: TlsServiceClient<Transport>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the daemon.
pub async fn connect(target: &Target) -> Result<Clients> {
    let (channel, token) = match target {
        Target::Unix(path) => (connect_unix(path).await?, BearerToken(None)),
        Target::Tcp { addr, token_file } => {
            let token = match token_file {
                Some(file) => BearerToken(Some(read_token(file)?)),
                None => BearerToken(None),
            };
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .with_context(|| format!("invalid address {addr:?}"))?
                .connect_timeout(CONNECT_TIMEOUT);
            let channel = endpoint
                .connect()
                .await
                .with_context(|| format!("cannot connect to {addr}"))?;
            (channel, token)
        }
    };
    Ok(Clients {
        routes: RouteServiceClient::with_interceptor(channel.clone(), token.clone()),
        pools: PoolServiceClient::with_interceptor(channel.clone(), token.clone()),
        discovery: DiscoveryServiceClient::with_interceptor(channel.clone(), token.clone()),
        registration: RegistrationServiceClient::with_interceptor(channel.clone(), token.clone()),
        tls: TlsServiceClient::with_interceptor(channel.clone(), token.clone()),
        admin: AdminServiceClient::with_interceptor(channel, token),
    })
}

async fn connect_unix(path: &Path) -> Result<Channel> {
    let socket = path.to_path_buf();
    // The URI is required by the HTTP/2 layer but never resolved: the connector dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .with_context(|| format!("cannot connect to {}", path.display()))
}

fn read_token(file: &Path) -> Result<MetadataValue<Ascii>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read token file {}", file.display()))?;
    let token = text.trim();
    anyhow::ensure!(!token.is_empty(), "token file {} is empty", file.display());
    format!("Bearer {token}")
        .parse()
        .with_context(|| format!("token in {} is not valid header text", file.display()))
}

/// Turns a call's outcome into the message or an error carrying the server's words.
pub trait Reply<T> {
    /// The response message, or `CODE: server message`.
    fn reply(self) -> Result<T>;
}

impl<T> Reply<T> for Result<tonic::Response<T>, Status> {
    fn reply(self) -> Result<T> {
        self.map(tonic::Response::into_inner)
            .map_err(|status| anyhow::anyhow!("{}: {}", code_name(status.code()), status.message()))
    }
}

/// The canonical upper-case name of a gRPC status code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
