//! Shared test fixtures: real upstream servers on 127.0.0.1:0, an in-process daemon with a
//! state dir in a temp dir, and a raw HTTP/1.1 client for byte-exact requests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

mod ports;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A real HTTP upstream. Paths:
/// - anything: 200 with a JSON echo `{upstream, method, uri, headers}`
/// - `/stream/N`: N bytes of `x`, streamed in 64 KiB chunks
/// - `/upload`: reads the body as a stream and answers the byte count
/// - `/slow/MS`: answers after MS milliseconds
/// - `/status/N`: answers status N
/// - `/drip/N/MS`: N KiB of `d`, one KiB every MS milliseconds
/// - `/ws`: `101 Switching Protocols`, then echoes bytes on the upgraded connection
/// - `/hold`: answers once the test calls [`Upstream::release`] (at once after it)
pub struct Upstream {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    /// Whether `/hold` requests may be answered.
    released: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Waits until the upstream has seen `n` requests (they reached it: not a guess from a
    /// sleep); panics after 10 s.
    pub async fn until_hits(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.hits() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "upstream {} saw {} requests, not {n}",
                self.name,
                self.hits()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Answers the `/hold` requests waiting, and every later one at once.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn upstream(name: &'static str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (h, c) = (hits.clone(), connections.clone());
    let (released, gate) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let hits = h.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    answer(name, req, gate.clone())
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Upstream {
        name,
        addr,
        hits,
        connections,
        released,
        task,
    }
}

fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into()).boxed()
}

async fn answer(
    name: &'static str,
    mut req: Request<Incoming>,
    mut released: tokio::sync::watch::Receiver<bool>,
) -> Result<Response<TestBody>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/hold" {
        // Ends with the upstream (its sender dropped) if it is never released.
        let _ = released.wait_for(|released| *released).await;
        return Ok(Response::new(full(name)));
    }
    if let Some(n) = path.strip_prefix("/stream/") {
        let total: u64 = n.parse().unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let chunks = total / chunk.len() as u64;
        let rest = (total % chunk.len() as u64) as usize;
        let body_stream = stream::iter(
            (0..chunks)
                .map(move |_| chunk.clone())
                .chain((rest > 0).then(|| Bytes::from(vec![b'x'; rest]))),
        )
        .map_frames();
        let mut response = Response::new(StreamBody::new(body_stream).boxed());
        response
            .headers_mut()
            .insert("content-length", total.into());
        return Ok(response);
    }
    if let Some(spec) = path.strip_prefix("/drip/") {
        // N chunks of 1 KiB of `d`, MS milliseconds apart: a long-running download.
        let (n, ms) = spec.split_once('/').unwrap_or((spec, "10"));
        let (n, ms): (u64, u64) = (n.parse().unwrap_or(1), ms.parse().unwrap_or(10));
        let chunk = Bytes::from(vec![b'd'; 1024]);
        let body_stream = futures_util::StreamExt::then(stream::iter(0..n), move |_| {
            let chunk = chunk.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, Infallible>(Frame::data(chunk))
            }
        });
        let mut response = Response::new(StreamBody::new(body_stream).boxed());
        response
            .headers_mut()
            .insert("content-length", (n * 1024).into());
        return Ok(response);
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut total: u64 = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => total += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        return Ok(Response::new(full(total.to_string())));
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        return Ok(Response::new(full(name)));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let mut response = Response::new(full(name));
        *response.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        return Ok(response);
    }
    if path == "/ws" {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        let mut response = Response::new(full(""));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        response
            .headers_mut()
            .insert("upgrade", "echo".parse().unwrap());
        response
            .headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        return Ok(response);
    }
    let headers: BTreeMap<String, Vec<String>> = req
        .headers()
        .keys()
        .map(|k| {
            (
                k.as_str().to_string(),
                req.headers()
                    .get_all(k)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("").to_string())
                    .collect(),
            )
        })
        .collect();
    let echo = serde_json::json!({
        "upstream": name,
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "headers": headers,
    });
    let mut response = Response::new(full(echo.to_string()));
    response
        .headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    // Hop-by-hop headers the proxy must not pass back.
    response
        .headers_mut()
        .insert("connection", "x-internal".parse().unwrap());
    response
        .headers_mut()
        .insert("x-internal", "secret".parse().unwrap());
    response
        .headers_mut()
        .insert("keep-alive", "timeout=5".parse().unwrap());
    Ok(response)
}

type ToFrame = fn(Bytes) -> Result<Frame<Bytes>, Infallible>;

trait MapFrames: Sized {
    fn map_frames(self) -> futures_util::stream::Map<Self, ToFrame>;
}

impl<S: futures_util::Stream<Item = Bytes>> MapFrames for S {
    fn map_frames(self) -> futures_util::stream::Map<Self, ToFrame> {
        use futures_util::StreamExt;
        self.map(|b| Ok(Frame::data(b)))
    }
}

/// A daemon running in-process with its state in a temp dir.
pub struct TestProxy {
    pub daemon: proxy::Daemon,
    pub dir: tempfile::TempDir,
}

impl TestProxy {
    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.daemon.listener_address(listener).expect("listener")
    }
}

/// Waits until `check` holds, trying it every 50 ms; panics naming `what` when it does not
/// within `within`.
pub async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    for _ in 0..within.as_millis() / 50 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Config text with `{state}` replaced by the temp dir.
pub async fn start_proxy(config: &str) -> TestProxy {
    let dir = tempfile::tempdir().unwrap();
    start_proxy_in(dir, config).await
}

pub async fn start_proxy_in(dir: tempfile::TempDir, config: &str) -> TestProxy {
    let text = config.replace("{state}", &dir.path().display().to_string());
    let text = if text.contains("[server]") {
        text
    } else {
        format!(
            "[server]\nstate_dir = \"{}\"\nadmin_listen = \"\"\n{text}",
            dir.path().display()
        )
    };
    let config = proxy::Config::parse(&text, "test.toml").expect("valid test config");
    let daemon = proxy::Daemon::start(config).await.expect("daemon starts");
    TestProxy { daemon, dir }
}

/// `/metrics` from the admin listener at `admin`, answered 200.
pub async fn scrape_metrics(admin: SocketAddr) -> String {
    let r = raw(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    r.text()
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Sends raw bytes and reads one response until the connection closes or the body ends.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_response(&mut stream).await
}

pub async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut tmp))
            .await
            .expect("response within 30s")
            .unwrap_or(0);
        if n == 0 {
            panic!(
                "connection closed before a full response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut body = buf[head_end..].to_vec();
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    loop {
        if let Some(len) = length {
            if body.len() >= len {
                body.truncate(len);
                break;
            }
        }
        if chunked && body.ends_with(b"0\r\n\r\n") {
            body = dechunk(&body);
            break;
        }
        if status == 101 || status == 204 || status == 304 {
            break;
        }
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut tmp))
            .await
            .expect("body within 30s")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..pos]).unwrap_or("0").trim(), 16)
                .unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[pos + 2..pos + 2 + size]);
        data = &data[pos + 2 + size + 2..];
    }
    out
}

/// `GET path` with `Host: host` and `Connection: close`.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> RawResponse {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// A TOML pool section.
pub fn pool(name: &str, upstreams: &[&Upstream]) -> String {
    let list: Vec<String> = upstreams
        .iter()
        .map(|u| format!("\"{}\"", u.address()))
        .collect();
    format!(
        "[[pools]]\nname = \"{name}\"\nupstreams = [{}]\n",
        list.join(", ")
    )
}

/// A port nothing listens on now, for a server that must be told its port before it
/// starts (see [`ports::free_port`]).
pub fn free_port() -> u16 {
    ports::free_port()
}

/// An address where nothing listens, and nothing will while the test process runs.
///
/// The port stays bound by a socket that never listens, kept until the process ends: a
/// connection to it is refused, and no other test (nor a `bind(0)` anywhere on the
/// machine) can be given the port. A port bound and released at once could be handed to
/// another test's listener, which would then answer for the "dead" upstream.
pub fn dead_address() -> String {
    use socket2::{Domain, Socket, Type};
    static HELD: std::sync::Mutex<Vec<Socket>> = std::sync::Mutex::new(Vec::new());
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    HELD.lock().unwrap().push(socket);
    addr.to_string()
}

/// A proxyd config with `workers` worker threads, an admin listener, its access log off,
/// and an HTTP listener `web` routed to pool `up` (the upstream `up`); `after_web` goes
/// right after the listener's address: keys of `web` itself, then any further sections.
pub fn on_workers(workers: usize, up: &Upstream, after_web: &str) -> String {
    format!(
        r#"[server]
state_dir = "{{state}}"
admin_listen = "127.0.0.1:0"
workers = {workers}

[telemetry]
access_log = "off"

{pool}
[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:0"
{after_web}

[[routes]]
name = "all"
listener = "web"
pool = "up"
"#,
        pool = pool("up", &[up])
    )
}

pub const WEB: &str =
    "[[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:0\"\n";

/// One HTTP exchange on `stream`: the status and whether the server closes; `Err` says
/// whether any response byte had arrived.
pub async fn exchange(stream: &mut TcpStream, request: &[u8]) -> Result<(u16, bool), bool> {
    exchange_traced(stream, request)
        .await
        .map_err(|failed| failed.any_bytes)
}

/// How an [`exchange_traced`] failed.
#[derive(Debug)]
pub struct ExchangeFailure {
    /// Whether any response byte had arrived.
    pub any_bytes: bool,
    /// What ended it: the write or read error, the end of the stream, or the wait.
    pub how: String,
}

/// [`exchange`], saying how a failed one ended.
pub async fn exchange_traced(
    stream: &mut TcpStream,
    request: &[u8],
) -> Result<(u16, bool), ExchangeFailure> {
    let failed = |any_bytes: bool, how: String| ExchangeFailure { any_bytes, how };
    if let Err(e) = stream.write_all(request).await {
        return Err(failed(false, format!("writing the request: {e}")));
    }
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16 * 1024];
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(40), stream.read(&mut tmp)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                return Err(failed(
                    !buf.is_empty(),
                    format!("reading after {} bytes: {e}", buf.len()),
                ))
            }
            Err(_) => {
                return Err(failed(
                    !buf.is_empty(),
                    format!("no more bytes for 40 s after {}", buf.len()),
                ))
            }
        };
        if n == 0 {
            return Err(failed(
                !buf.is_empty(),
                format!("end of stream after {} bytes", buf.len()),
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + length {
            let close = head
                .lines()
                .any(|l| l.starts_with("connection:") && l.contains("close"));
            return Ok((status, close));
        }
    }
}

/// Whether every test that needs an external program must run: `./scripts/test` (the
/// README's test command, what CI runs) sets `PROXY_TEST_REQUIRE_ALL=1`; `CI` counts too.
pub fn require_all() -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0");
    set("PROXY_TEST_REQUIRE_ALL") || set("CI")
}

/// Called by a test whose external component `what` is missing: under `require_all()` the
/// test fails (the test command must have installed it, `install` says how); otherwise it
/// prints a SKIPPED line and the caller returns early.
pub fn missing_component(what: &str, install: &str) {
    assert!(
        !require_all(),
        "{what} is missing but PROXY_TEST_REQUIRE_ALL/CI requires every test to run \
         ({install}); scripts/test installs it"
    );
    eprintln!(
        "SKIPPED: {what} is missing ({install}); set PROXY_TEST_REQUIRE_ALL=1 to fail instead"
    );
}

/// The external program `name` on PATH, for tests that need it (etcd, pebble, grpcurl,
/// chromium, ...). `None` means skip: see `missing_component` (the test fails instead under
/// `./scripts/test`). `install` says how to get it, e.g. "Debian package etcd-server".
pub fn external_program(name: &str, install: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        missing_component(&format!("program `{name}`"), install);
    }
    found
}
