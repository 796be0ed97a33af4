//! Connecting to the management API over its unix socket or over TCP with a bearer token,
//! optionally over TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use proxy_proto::v1::admin_service_client::AdminServiceClient;
use proxy_proto::v1::cluster_service_client::ClusterServiceClient;
use proxy_proto::v1::discovery_service_client::DiscoveryServiceClient;
use proxy_proto::v1::pool_service_client::PoolServiceClient;
use proxy_proto::v1::registration_service_client::RegistrationServiceClient;
use proxy_proto::v1::route_service_client::RouteServiceClient;
use proxy_proto::v1::tls_service_client::TlsServiceClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
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
        /// TLS towards the listener; `None`: plaintext.
        tls: Option<ClientTls>,
    },
}

/// TLS settings for the TCP listener (`server.mgmt_tls` on the daemon).
pub struct ClientTls {
    /// PEM roots the daemon's certificate must chain to.
    pub ca_file: PathBuf,
    /// PEM client certificate chain and its key, for a listener with `client_ca`.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Name checked in the daemon's certificate; `None`: the host part of the address.
    pub server_name: Option<String>,
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
    /// ClusterService.
    pub cluster: ClusterServiceClient<Transport>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the daemon.
pub async fn connect(target: &Target) -> Result<Clients> {
    let (channel, token) = match target {
        Target::Unix(path) => (connect_unix(path).await?, BearerToken(None)),
        Target::Tcp {
            addr,
            token_file,
            tls,
        } => {
            let token = match token_file {
                Some(file) => BearerToken(Some(read_token(file)?)),
                None => BearerToken(None),
            };
            let channel = match tls {
                None => Endpoint::from_shared(format!("http://{addr}"))
                    .with_context(|| format!("invalid address {addr:?}"))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect()
                    .await
                    .with_context(|| format!("cannot connect to {addr}"))?,
                Some(tls) => connect_tls(addr, tls).await?,
            };
            (channel, token)
        }
    };
    Ok(Clients {
        routes: RouteServiceClient::with_interceptor(channel.clone(), token.clone()),
        pools: PoolServiceClient::with_interceptor(channel.clone(), token.clone()),
        discovery: DiscoveryServiceClient::with_interceptor(channel.clone(), token.clone()),
        cluster: ClusterServiceClient::with_interceptor(channel.clone(), token.clone()),
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

/// The host part of `host:port`, `[v6]:port` or a bare host.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

fn read_pem_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what} {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{what} {} holds no PEM certificate",
        path.display()
    );
    Ok(certs)
}

/// The rustls client config for `tls`: roots from `--ca-file`, the optional client
/// certificate, HTTP/2 by ALPN.
fn tls_config(tls: &ClientTls) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_pem_certs("--ca-file", &tls.ca_file)? {
        roots
            .add(cert)
            .with_context(|| format!("--ca-file {}", tls.ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots);
    let mut config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_pem_certs("--cert", cert)?;
            let key_pem = std::fs::read(key)
                .with_context(|| format!("cannot read --key {}", key.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .with_context(|| format!("--key {}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("--cert and --key do not make a usable client certificate")?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

async fn connect_tls(addr: &str, tls: &ClientTls) -> Result<Channel> {
    let name = tls
        .server_name
        .clone()
        .unwrap_or_else(|| host_of(addr).to_owned());
    let server_name = ServerName::try_from(name.clone()).with_context(|| {
        format!("{name:?} is not a DNS name or IP address to check the certificate against")
    })?;
    let connector = TlsConnector::from(Arc::new(tls_config(tls)?));
    let target = addr.to_owned();
    // The connector dials and handshakes itself; tonic only sees the encrypted stream, so
    // the scheme is `https` for the `:scheme` header alone.
    Endpoint::from_shared(format!("https://{addr}"))
        .with_context(|| format!("invalid address {addr:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let target = target.clone();
            async move {
                let tcp = TcpStream::connect(&target).await?;
                let stream = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("cannot connect to {addr} over TLS"))
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
        self.map(tonic::Response::into_inner).map_err(|status| match status.code() {
            // Fleet mode: another node's write got in first; nothing was written.
            tonic::Code::Aborted => anyhow::anyhow!(
                "ABORTED: {} (another node of the fleet changed it at the same time; nothing was written: check, then run the command again)",
                status.message()
            ),
            code => anyhow::anyhow!("{}: {}", code_name(code), status.message()),
        })
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
