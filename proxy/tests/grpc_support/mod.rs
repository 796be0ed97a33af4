//! gRPC test fixtures: a real tonic upstream serving `proxy.testing.Echo` and
//! `grpc.health.v1.Health` over h2c or TLS (ALPN h2) on 127.0.0.1:0, that can be shut down
//! gracefully (GOAWAY, in-flight calls finish) or killed (connections dropped mid-stream).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use proxy_proto::testing::echo_server::{Echo, EchoServer};
use proxy_proto::testing::{EchoReply, EchoRequest};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

/// How the upstream's connections should end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// GOAWAY on every connection; calls in flight finish; no new connections.
    Graceful,
    /// Every connection dropped at once, calls in flight included.
    Kill,
}

/// A tonic upstream.
pub struct GrpcUpstream {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// Calls answered (any method).
    pub calls: Arc<AtomicUsize>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    pub health: tonic_health::server::HealthReporter,
    stop: watch::Sender<Stop>,
}

impl GrpcUpstream {
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn stop(&self, how: Stop) {
        let _ = self.stop.send(how);
    }
}

struct EchoService {
    name: &'static str,
    calls: Arc<AtomicUsize>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

impl EchoService {
    fn reply(&self, message: String, index: u32, seen: Vec<String>) -> EchoReply {
        EchoReply {
            message,
            index,
            upstream: self.name.to_string(),
            seen,
        }
    }
}

/// What the upstream saw of the request head: te, grpc-timeout and content-type.
fn seen<T>(request: &Request<T>) -> Vec<String> {
    ["te", "grpc-timeout", "content-type"]
        .iter()
        .filter_map(|key| {
            request
                .metadata()
                .get(*key)
                .and_then(|v| v.to_str().ok())
                .map(|v| format!("{key}={v}"))
        })
        .collect()
}

/// The status a request asks for with `fail_code`, with a trailer of our own.
fn failure(req: &EchoRequest) -> Option<Status> {
    (req.fail_code != 0).then(|| {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("x-failed-by", "echo-upstream".parse().unwrap());
        Status::with_metadata(req.fail_code.into(), req.message.clone(), metadata)
    })
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let seen = seen(&request);
        let req = request.into_inner();
        if req.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(req.delay_ms)).await;
        }
        if let Some(status) = failure(&req) {
            return Err(status);
        }
        Ok(Response::new(self.reply(req.message, 0, seen)))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let req = request.into_inner();
        let name = self.name;
        let fail = failure(&req);
        let stream = futures_util::stream::iter(0..req.count)
            .then(move |index| {
                let message = req.message.clone();
                async move {
                    if req.delay_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(req.delay_ms)).await;
                    }
                    Ok(EchoReply {
                        message,
                        index,
                        upstream: name.to_string(),
                        seen: Vec::new(),
                    })
                }
            })
            .chain(futures_util::stream::iter(fail.map(Err)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut stream = request.into_inner();
        let mut parts = Vec::new();
        while let Some(req) = stream.message().await? {
            parts.push(req.message);
        }
        Ok(Response::new(self.reply(parts.join(","), 0, Vec::new())))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let name = self.name;
        let stream = request.into_inner().enumerate().map(move |(i, req)| {
            req.map(|req| EchoReply {
                message: req.message,
                index: u32::try_from(i).unwrap(),
                upstream: name.to_string(),
                seen: Vec::new(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Starts an upstream named `name`: h2c, or TLS with ALPN h2 when `tls` is given.
pub async fn grpc_upstream(
    name: &'static str,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> GrpcUpstream {
    grpc_upstream_with(name, tls, None).await
}

/// As [`grpc_upstream`], advertising SETTINGS_MAX_CONCURRENT_STREAMS = `max_streams`.
pub async fn grpc_upstream_with(
    name: &'static str,
    tls: Option<Arc<rustls::ServerConfig>>,
    max_streams: Option<u32>,
) -> GrpcUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let routes = tonic::service::Routes::new(EchoServer::new(EchoService {
        name,
        calls: calls.clone(),
    }))
    .add_service(health_service);
    let (stop, stopped) = watch::channel(Stop::Running);
    let accepted = connections.clone();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        let mut stopped_accept = stopped.clone();
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => return,
                },
                _ = stopped_accept.changed() => return,
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            let routes = routes.clone();
            let acceptor = acceptor.clone();
            let stopped = stopped.clone();
            tokio::spawn(async move {
                match acceptor {
                    None => serve(stream, routes, stopped, max_streams).await,
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            serve(tls, routes, stopped, max_streams).await;
                        }
                    }
                }
            });
        }
    });
    GrpcUpstream {
        name,
        addr,
        calls,
        connections,
        health,
        stop,
    }
}

async fn serve<IO>(
    io: IO,
    routes: tonic::service::Routes,
    mut stopped: watch::Receiver<Stop>,
    max_streams: Option<u32>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(routes);
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(max_streams)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopped.changed() => {}
    }
    let how = *stopped.borrow();
    match how {
        Stop::Kill => {}
        _ => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A TLS server config for `backend.test` from `ca`, offering ALPN h2 only.
pub fn tls_server(ca: &crate::tls_support::TestCa) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let (cert, key) = ca.leaf(&["backend.test"]);
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls_support::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// An HTTPS upstream with a certificate for `backend.test` that offers `alpn` (empty: no
/// ALPN at all) and speaks what the handshake chose: HTTP/2 for `h2`, otherwise HTTP/1.1
/// only. It answers every request with the HTTP version it received (`HTTP/1.1`,
/// `HTTP/2.0`).
pub struct VersionUpstream {
    pub addr: SocketAddr,
    /// The ALPN protocol of each accepted TLS connection (`-` for none).
    pub negotiated: Arc<std::sync::Mutex<Vec<String>>>,
}

impl VersionUpstream {
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn negotiated(&self) -> Vec<String> {
        self.negotiated.lock().unwrap().clone()
    }
}

pub async fn version_upstream(ca: &crate::tls_support::TestCa, alpn: &[&[u8]]) -> VersionUpstream {
    let mut config = Arc::unwrap_or_clone(tls_server(ca));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let negotiated = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = negotiated.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                seen.lock().unwrap().push(
                    alpn.as_deref()
                        .map_or("-".to_string(), |p| String::from_utf8_lossy(p).into_owned()),
                );
                let service =
                    hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| {
                        let body = format!("{:?}", req.version());
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body)),
                            ))
                        }
                    });
                let io = TokioIo::new(tls);
                if alpn.as_deref() == Some(b"h2") {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
            });
        }
    });
    VersionUpstream { addr, negotiated }
}

/// What a [`Relay`] saw of one connection.
#[derive(Debug, Default, Clone)]
pub struct RelayedConn {
    /// PING frames (not acknowledgements) proxyd sent that were passed on.
    pub pings: usize,
    /// PING acknowledgements the upstream sent that were passed on.
    pub ping_acks: usize,
    /// proxyd closed the connection: it sent GOAWAY (counted as it passes, since the
    /// upstream may answer it by closing first, and the relay then ends on the upstream's
    /// side) or closed its side.
    pub closed_by_proxy: bool,
}

struct RelayState {
    conns: std::sync::Mutex<Vec<RelayedConn>>,
    changed: tokio::sync::Notify,
}

impl RelayState {
    fn update(&self, id: usize, f: impl FnOnce(&mut RelayedConn)) {
        f(&mut self.conns.lock().unwrap()[id]);
        self.changed.notify_waiters();
    }
}

/// A TCP relay in front of an h2c upstream that can freeze the connections it holds: a
/// frozen connection passes no byte in either direction and is not closed (what a peer
/// that vanished without FIN or RST looks like from proxyd; what proxyd sends is read and
/// dropped, so the relay notices when proxyd gives up and closes). Connections accepted
/// after a freeze are relayed normally. It follows the HTTP/2 frames both ways to count
/// PINGs and their acknowledgements.
pub struct Relay {
    pub addr: SocketAddr,
    state: Arc<RelayState>,
    /// Connections with an index below this are frozen.
    frozen_below: watch::Sender<usize>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(RelayState {
            conns: std::sync::Mutex::new(Vec::new()),
            changed: tokio::sync::Notify::new(),
        });
        let (frozen_below, frozen) = watch::channel(0);
        let accepting = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = {
                    let mut conns = accepting.conns.lock().unwrap();
                    conns.push(RelayedConn::default());
                    conns.len() - 1
                };
                accepting.changed.notify_waiters();
                tokio::spawn(relay_conn(
                    id,
                    client,
                    upstream,
                    accepting.clone(),
                    frozen.clone(),
                ));
            }
        });
        Relay {
            addr,
            state,
            frozen_below,
        }
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Freezes every connection accepted so far.
    pub fn freeze_existing(&self) {
        let accepted = self.conns().len();
        self.frozen_below.send_replace(accepted);
    }

    pub fn conns(&self) -> Vec<RelayedConn> {
        self.state.conns.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the connections (a hang guard of 60 s, far beyond
    /// what the tests need, fails the test with `what`).
    pub async fn wait_until(&self, what: &str, done: impl Fn(&[RelayedConn]) -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let changed = self.state.changed.notified();
                if done(&self.conns()) {
                    return;
                }
                changed.await;
            }
        })
        .await;
        assert!(waited.is_ok(), "never: {what}; saw {:?}", self.conns());
    }
}

/// Counts PING frames in one direction of an HTTP/2 connection.
struct PingCounter {
    /// Bytes of the client connection preface still to skip.
    preface: usize,
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: usize,
    /// GOAWAY frames seen so far.
    go_aways: usize,
}

impl PingCounter {
    fn new(preface: usize) -> Self {
        PingCounter {
            preface,
            head: [0; 9],
            have: 0,
            skip: 0,
            go_aways: 0,
        }
    }

    /// Follows `bytes`; returns (PINGs, PING acknowledgements) that started in them, and
    /// counts GOAWAY frames.
    fn feed(&mut self, mut bytes: &[u8]) -> (usize, usize) {
        let (mut pings, mut acks) = (0, 0);
        while !bytes.is_empty() {
            if self.preface > 0 || self.skip > 0 {
                let left = if self.preface > 0 {
                    &mut self.preface
                } else {
                    &mut self.skip
                };
                let n = (*left).min(bytes.len());
                *left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                self.have = 0;
                self.skip =
                    u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]) as usize;
                match self.head[3] {
                    0x6 if self.head[4] & 0x1 == 0 => pings += 1,
                    0x6 => acks += 1,
                    0x7 => self.go_aways += 1,
                    _ => {}
                }
            }
        }
        (pings, acks)
    }
}

async fn relay_conn(
    id: usize,
    mut client: tokio::net::TcpStream,
    upstream: SocketAddr,
    state: Arc<RelayState>,
    mut frozen: watch::Receiver<usize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    // proxyd's side starts with the 24-byte client preface, then frames.
    let mut from_proxy = PingCounter::new(24);
    let mut from_upstream = PingCounter::new(0);
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    loop {
        let is_frozen = |frozen: &watch::Receiver<usize>| id < *frozen.borrow();
        let frozen_now = is_frozen(&frozen);
        tokio::select! {
            read = client.read(&mut up) => {
                let n = match read {
                    Ok(0) | Err(_) => {
                        state.update(id, |c| c.closed_by_proxy = true);
                        return;
                    }
                    Ok(n) => n,
                };
                if is_frozen(&frozen) {
                    continue;
                }
                let (pings, _) = from_proxy.feed(&up[..n]);
                if from_proxy.go_aways > 0 {
                    state.update(id, |c| c.closed_by_proxy = true);
                }
                if server.write_all(&up[..n]).await.is_err() {
                    return;
                }
                if pings > 0 {
                    state.update(id, |c| c.pings += pings);
                }
            }
            read = server.read(&mut down), if !frozen_now => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if is_frozen(&frozen) {
                    continue;
                }
                let (_, acks) = from_upstream.feed(&down[..n]);
                if client.write_all(&down[..n]).await.is_err() {
                    return;
                }
                if acks > 0 {
                    state.update(id, |c| c.ping_acks += acks);
                }
            }
            changed = frozen.changed() => {
                // The relay is gone: so are its connections.
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}
