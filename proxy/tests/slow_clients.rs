//! Slow clients and floods against real sockets: slowloris heads on `http` and `https`,
//! stalled uploads, idle keep-alive connections and floods beyond `max_connections` are
//! cut off and counted in `/metrics` while other clients are served; the optional
//! per-client-address limits (`max_connections_per_ip`, `rate_limit`) refuse one address
//! and not another; and the daemon's memory per held connection stays small.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod tls_support;

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use common::{
    free_port, get, pool, read_response, scrape_metrics, start_proxy, upstream, TestProxy, Upstream,
};
use tls_support::{client_config, get_over, tls_connect, TestCa};

/// Far longer than any limit a test sets: what "eventually" means here.
const EVENTUALLY: Duration = Duration::from_secs(40);
/// Time between two trickled bytes.
const TRICKLE: Duration = Duration::from_millis(200);

/// A daemon with one listener `web` (`protocol`, with `listener_extra` keys) routing every
/// request to one upstream through pool `app` (with `pool_extra` keys), and an admin
/// listener for `/metrics`. `tls_files` adds a certificate for `https`.
async fn proxy(
    protocol: &str,
    listener_extra: &str,
    pool_extra: &str,
    tls_files: Option<(&std::path::Path, &std::path::Path)>,
) -> (TestProxy, Upstream) {
    let app = upstream("app").await;
    let mut config = String::from(
        "[server]\nstate_dir = \"{state}\"\nadmin_listen = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n",
    );
    config += &format!("protocol = \"{protocol}\"\n{listener_extra}\n\n");
    config += &pool("app", &[&app]);
    config += &format!(
        "{pool_extra}\n\n[[routes]]\nname = \"app\"\nlistener = \"web\"\npool = \"app\"\n"
    );
    if let Some((cert, key)) = tls_files {
        config += &format!(
            "\n[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        );
    }
    (start_proxy(&config).await, app)
}

/// `/metrics` from the admin listener.
async fn metrics(p: &TestProxy) -> String {
    let admin = p.daemon.admin_address().expect("admin listener");
    scrape_metrics(admin).await
}

fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Scrapes until `series` reads `want` (counts are written just after the client sees the
/// close), failing with the last scrape otherwise.
async fn expect_sample(p: &TestProxy, series: &str, want: u64) {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while tokio::time::Instant::now() < deadline {
        text = metrics(p).await;
        if sample(&text, series) == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{series} is {:?}, expected {want}, in:\n{text}",
        sample(&text, series)
    );
}

fn timeouts(protocol: &str, cause: &str) -> String {
    format!(
        "proxy_client_timeouts_total{{listener=\"web\",protocol=\"{protocol}\",cause=\"{cause}\"}}"
    )
}

fn refused(cause: &str) -> String {
    format!(
        "proxy_connections_refused_total{{listener=\"web\",protocol=\"http\",cause=\"{cause}\"}}"
    )
}

const ACTIVE: &str = "proxy_connections_active{listener=\"web\",protocol=\"http\"}";

/// Sends `bytes` one at a time, [`TRICKLE`] apart, then stays silent, until the proxy
/// closes the connection; `true` when it did within [`EVENTUALLY`].
async fn trickle_until_closed<S>(stream: S, bytes: Vec<u8>) -> bool
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let writing = async move {
        for byte in bytes {
            if writer.write_all(&[byte]).await.is_err() || writer.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(TRICKLE).await;
        }
        std::future::pending::<()>().await;
    };
    let closed = async move {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink).await;
    };
    tokio::time::timeout(EVENTUALLY, async {
        tokio::select! {
            () = writing => {}
            () = closed => {}
        }
    })
    .await
    .is_ok()
}

/// A request head that never ends: a request line, then one header line after another.
fn endless_head() -> Vec<u8> {
    let mut head = b"GET / HTTP/1.1\r\nHost: a.example\r\n".to_vec();
    for n in 0..1000 {
        head.extend_from_slice(format!("X-Slow-{n}: y\r\n").as_bytes());
    }
    head
}

/// Whether the proxy closes `stream` (end of stream or reset) within [`EVENTUALLY`].
async fn closed_by_proxy(stream: &mut TcpStream) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(EVENTUALLY, stream.read_to_end(&mut sink))
        .await
        .is_ok()
}

/// A connection to `to` from the local address `from` (127.0.0.1, 127.0.0.2, ...).
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    try_connect_from(from, to).await.unwrap()
}

/// [`connect_from`] for a connection the proxy may refuse before `connect` returns.
async fn try_connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn slowloris_on_http_is_closed_at_header_timeout_and_counted() {
    // Bytes keep moving, so the idle limit never ends these connections: only the head's.
    let (p, _app) = proxy(
        "http",
        "header_timeout = \"1s\"\nidle_timeout = \"300s\"",
        "",
        None,
    )
    .await;
    let addr = p.addr("web");
    let mut clients = Vec::new();
    for _ in 0..5 {
        let stream = TcpStream::connect(addr).await.unwrap();
        clients.push(tokio::spawn(trickle_until_closed(stream, endless_head())));
    }
    // A client that connects and sends nothing, and one that trickles an HTTP/2 preface:
    // hyper's own head timer covers neither.
    let silent = TcpStream::connect(addr).await.unwrap();
    clients.push(tokio::spawn(trickle_until_closed(silent, Vec::new())));
    let preface = TcpStream::connect(addr).await.unwrap();
    clients.push(tokio::spawn(trickle_until_closed(
        preface,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
    )));
    // Other clients are served meanwhile.
    for _ in 0..3 {
        assert_eq!(get(addr, "a.example", "/").await.status, 200);
    }
    for (n, client) in clients.into_iter().enumerate() {
        assert!(client.await.unwrap(), "slow client {n} still open");
    }
    expect_sample(&p, &timeouts("http", "head"), 7).await;
    expect_sample(&p, &timeouts("http", "idle"), 0).await;
    assert_eq!(get(addr, "a.example", "/").await.status, 200);
}

#[tokio::test]
async fn slowloris_on_https_is_closed_at_header_timeout_and_counted() {
    let ca = TestCa::new("slow CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["secure.example.test"]);
    let (cert_path, key_path) = (dir.path().join("leaf.pem"), dir.path().join("leaf.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let (p, _app) = proxy(
        "https",
        "header_timeout = \"1s\"\nidle_timeout = \"300s\"",
        "",
        Some((&cert_path, &key_path)),
    )
    .await;
    let addr = p.addr("web");
    let config = || client_config(ca.roots(), &[b"http/1.1"]);
    // Each trickled byte is its own TLS record, after a normal handshake.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let tls = tls_connect(addr, "secure.example.test", config())
            .await
            .expect("handshake");
        clients.push(tokio::spawn(trickle_until_closed(tls, endless_head())));
    }
    // A client that never starts its handshake.
    let silent = TcpStream::connect(addr).await.unwrap();
    clients.push(tokio::spawn(trickle_until_closed(silent, Vec::new())));
    let mut ok = tls_connect(addr, "secure.example.test", config())
        .await
        .expect("handshake");
    assert_eq!(get_over(&mut ok, "secure.example.test", "/").await.0, 200);
    for (n, client) in clients.into_iter().enumerate() {
        assert!(client.await.unwrap(), "slow client {n} still open");
    }
    expect_sample(&p, &timeouts("https", "head"), 3).await;
    expect_sample(&p, &timeouts("https", "handshake"), 1).await;
}

#[tokio::test]
async fn a_stalled_upload_is_cut_by_the_body_timeout_and_counted() {
    let (p, app) = proxy("http", "", "body_timeout = \"1s\"", None).await;
    let addr = p.addr("web");
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        b"POST /upload HTTP/1.1\r\nHost: a.example\r\nContent-Length: 100000\r\n\r\nfirst bytes",
    )
    .await
    .unwrap();
    // Others are served while the upload hangs.
    assert_eq!(get(addr, "a.example", "/").await.status, 200);
    let response = read_response(&mut slow).await;
    assert_eq!(response.status, 408, "{}", response.text());
    assert!(
        closed_by_proxy(&mut slow).await,
        "connection kept after 408"
    );
    expect_sample(&p, &timeouts("http", "body"), 1).await;
    assert!(app.hits() >= 2);
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_and_counted() {
    // Idle for 1 s closes; the head timer (which hyper also runs while a keep-alive
    // connection waits) is far away.
    let (p, _app) = proxy(
        "http",
        "idle_timeout = \"1s\"\nheader_timeout = \"300s\"",
        "",
        None,
    )
    .await;
    let addr = p.addr("web");
    let mut idle = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let (status, close) =
            common::exchange(&mut stream, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
                .await
                .expect("answer");
        assert_eq!((status, close), (200, false));
        idle.push(stream);
    }
    assert_eq!(get(addr, "a.example", "/").await.status, 200);
    for (n, stream) in idle.iter_mut().enumerate() {
        assert!(
            closed_by_proxy(stream).await,
            "idle connection {n} still open"
        );
    }
    expect_sample(&p, &timeouts("http", "idle"), 200).await;
    expect_sample(&p, &timeouts("http", "head"), 0).await;
    assert_eq!(get(addr, "a.example", "/").await.status, 200);
}

#[tokio::test]
async fn a_silent_client_is_closed_by_an_idle_timeout_shorter_than_header_timeout() {
    // The wait for a connection's first bytes runs on the head's timer alone while that
    // comes first; here the idle limit comes first, and still ends the wait.
    let (p, _app) = proxy(
        "http",
        "idle_timeout = \"1s\"\nheader_timeout = \"300s\"",
        "",
        None,
    )
    .await;
    let addr = p.addr("web");
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    assert_eq!(get(addr, "a.example", "/").await.status, 200);
    for (n, stream) in silent.iter_mut().enumerate() {
        assert!(
            closed_by_proxy(stream).await,
            "silent connection {n} still open"
        );
    }
    expect_sample(&p, &timeouts("http", "idle"), 3).await;
    expect_sample(&p, &timeouts("http", "head"), 0).await;
}

#[tokio::test]
async fn a_keep_alive_wait_ended_by_header_timeout_counts_as_idle_not_as_a_slow_head() {
    let (p, _app) = proxy(
        "http",
        "idle_timeout = \"300s\"\nheader_timeout = \"1s\"",
        "",
        None,
    )
    .await;
    let addr = p.addr("web");
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let (status, _) =
            common::exchange(&mut stream, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
                .await
                .expect("answer");
        assert_eq!(status, 200);
        waiting.push(stream);
    }
    // One more that starts its second head and stalls in it.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    common::exchange(&mut stalled, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        .await
        .expect("answer");
    stalled
        .write_all(b"GET / HTTP/1.1\r\nHost: a.exa")
        .await
        .unwrap();
    for stream in waiting.iter_mut().chain([&mut stalled]) {
        assert!(closed_by_proxy(stream).await, "still open");
    }
    expect_sample(&p, &timeouts("http", "idle"), 3).await;
    expect_sample(&p, &timeouts("http", "head"), 1).await;
}

#[tokio::test]
async fn a_flood_beyond_max_connections_is_refused_and_counted() {
    let (p, _app) = proxy(
        "http",
        "max_connections = 20\nheader_timeout = \"300s\"\nidle_timeout = \"300s\"",
        "",
        None,
    )
    .await;
    let addr = p.addr("web");
    // A refusal can reach a client before its connect call returns: that one fails.
    let mut flood = Vec::new();
    let mut closed = 0;
    for _ in 0..60 {
        match TcpStream::connect(addr).await {
            Ok(stream) => flood.push(stream),
            Err(_) => closed += 1,
        }
    }
    expect_sample(&p, &refused("max_connections"), 40).await;
    expect_sample(&p, ACTIVE, 20).await;
    // The refused ones are closed at once (the count above is taken just before the close,
    // so each read below ends at once); the 20 admitted stay open and silent.
    let reads = flood.iter_mut().map(|stream| async move {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(_)) => panic!("the proxy sent bytes to a silent client"),
            Err(_) => false,
        }
    });
    closed += futures_util::future::join_all(reads)
        .await
        .into_iter()
        .filter(|c| *c)
        .count();
    assert_eq!(closed, 40, "refused connections");
    // While the flood holds every slot, one more client is refused too.
    if let Ok(mut late) = TcpStream::connect(addr).await {
        let _ = late
            .write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(EVENTUALLY, late.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "a client beyond the limit stays open");
        assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    }
    expect_sample(&p, &refused("max_connections"), 41).await;
    // Once the flood is gone, clients are served again.
    drop(flood);
    expect_sample(&p, ACTIVE, 0).await;
    assert_eq!(get(addr, "a.example", "/").await.status, 200);
    expect_sample(&p, &refused("max_connections_per_ip"), 0).await;
}

#[tokio::test]
async fn max_connections_per_ip_limits_one_address_and_not_another() {
    let (p, _app) = proxy(
        "http",
        "max_connections_per_ip = 3\nheader_timeout = \"300s\"\nidle_timeout = \"300s\"",
        "",
        None,
    )
    .await;
    let addr = p.addr("web");
    let (one, two) = (ip("127.0.0.1"), ip("127.0.0.2"));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(one, addr).await);
    }
    expect_sample(&p, ACTIVE, 3).await;
    // A fourth from the same address is closed right away, unanswered.
    if let Ok(mut fourth) = try_connect_from(one, addr).await {
        let _ = fourth
            .write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(EVENTUALLY, fourth.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "fourth connection still open");
        assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    }
    expect_sample(&p, &refused("max_connections_per_ip"), 1).await;
    // Another address is not limited by the first one's connections.
    for _ in 0..4 {
        let mut other = connect_from(two, addr).await;
        other
            .write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut other).await.status, 200);
    }
    // Once one of its connections closes, the first address gets a slot back.
    drop(held.pop());
    expect_sample(&p, ACTIVE, 2).await;
    let mut again = connect_from(one, addr).await;
    again
        .write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut again).await.status, 200);
    expect_sample(&p, &refused("max_connections_per_ip"), 1).await;
}

/// One `GET /` from `from` on a fresh connection.
async fn get_from(from: IpAddr, addr: SocketAddr) -> common::RawResponse {
    let mut stream = connect_from(from, addr).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut stream).await
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after_then_serves_again() {
    let (p, app) = proxy(
        "http",
        "rate_limit = { requests_per_second = 0.2, burst = 3 }",
        "",
        None,
    )
    .await;
    let addr = p.addr("web");
    let (one, two) = (ip("127.0.0.1"), ip("127.0.0.2"));
    // The burst goes through (far quicker than the one request per five seconds the
    // bucket refills)...
    for _ in 0..3 {
        assert_eq!(get_from(one, addr).await.status, 200);
    }
    // ...then the address is over its rate.
    let limited = get_from(one, addr).await;
    assert_eq!(limited.status, 429, "{}", limited.text());
    let retry_after: u64 = limited
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in whole seconds");
    assert!(retry_after >= 1, "{retry_after}");
    expect_sample(
        &p,
        "proxy_http_rate_limited_total{listener=\"web\",protocol=\"http\"}",
        1,
    )
    .await;
    let before = app.hits();
    // Another address has its own bucket.
    assert_eq!(get_from(two, addr).await.status, 200);
    assert_eq!(app.hits(), before + 1);
    // After waiting as told, the first address is served again.
    let mut served = false;
    let mut limited_again = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(retry_after)).await;
        if get_from(one, addr).await.status == 200 {
            served = true;
            break;
        }
        limited_again += 1;
    }
    assert!(served, "still limited after waiting");
    expect_sample(
        &p,
        "proxy_http_rate_limited_total{listener=\"web\",protocol=\"http\"}",
        1 + limited_again,
    )
    .await;
}

struct Proxyd(Child);

impl Drop for Proxyd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// proxyd as its own process (so its resident memory is its own) with one `http` listener
/// routing to `app`, warmed up: the first requests allocate what every later one reuses.
/// Returns the process, the listener's and the admin listener's addresses.
async fn own_process(app: &Upstream, dir: &std::path::Path) -> (Proxyd, SocketAddr, SocketAddr) {
    let (port, admin_port) = (free_port(), free_port());
    let config = format!(
        "[server]\nstate_dir = \"{}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\n[[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:{port}\"\nheader_timeout = \"300s\"\nidle_timeout = \"300s\"\n\n{}\n[[routes]]\nname = \"app\"\nlistener = \"web\"\npool = \"app\"\n",
        dir.join("state").display(),
        pool("app", &[app]),
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let child = Proxyd(
        Command::new(env!("CARGO_BIN_EXE_proxyd"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let mut up = false;
    for _ in 0..400 {
        if TcpStream::connect(admin).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "proxyd did not start");
    for _ in 0..20 {
        assert_eq!(get(addr, "a.example", "/").await.status, 200);
    }
    (child, addr, admin)
}

/// Waits until the listener counts `want` open connections; returns the last scrape.
async fn await_active(admin: SocketAddr, want: u64) -> String {
    await_scrape(admin, |text| sample(text, ACTIVE) == Some(want)).await
}

/// Scrapes `/metrics` until `done` holds for it (20 s at most); returns the last scrape.
async fn await_scrape(admin: SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    for _ in 0..400 {
        text = scrape_metrics(admin).await;
        if done(&text) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    text
}

/// proxyd as its own process, so its resident memory is its own; 1,000 clients each hold
/// a connection with half a request head. The growth per connection (about 24 KiB for a
/// debug build) must stay well below what one buffer of the head limit (64 KiB) per
/// connection would add.
#[tokio::test]
async fn memory_per_held_connection_stays_small() {
    let app = upstream("app").await;
    let dir = tempfile::tempdir().unwrap();
    let (child, addr, admin) = own_process(&app, dir.path()).await;
    let pid = child.0.id();
    let before = rss_kib(pid);
    let mut held = Vec::new();
    for _ in 0..1000 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Half: ")
            .await
            .unwrap();
        held.push(stream);
    }
    let text = await_active(admin, 1000).await;
    assert_eq!(sample(&text, ACTIVE), Some(1000), "{text}");
    let after = rss_kib(pid);
    let per_connection = after.saturating_sub(before) as f64 / 1000.0;
    eprintln!("proxyd RSS {before} KiB -> {after} KiB with 1,000 held connections: {per_connection:.1} KiB each");
    assert!(
        per_connection < 48.0,
        "{per_connection:.1} KiB per held connection ({before} -> {after} KiB)"
    );
    // They are still served once they finish their heads.
    for stream in held.iter_mut().take(5) {
        stream
            .write_all(b"1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(stream).await.status, 200);
    }
}

/// 1,000 keep-alive connections, each idle after one request, hold no request buffers:
/// the HTTP/1 codec lets its read and write buffers go once a connection is between
/// requests with nothing buffered, and so goes the boxed future that serves requests;
/// what is left while parked is the connection's task, sized for its waits only, its
/// stream and its listener's context (2.0-2.5 KiB in a release build; 2.6-3.3 KiB in
/// debug builds, 4.2-6.5 before the parked connection let its own context and second timer
/// go), until it goes dormant (see the dormant test below). The bound sits well below the
/// 16 KiB of read buffer that idle connections held before they let their buffers go. Each
/// is then served a second request, and a pipelined pair, on the same connection.
#[tokio::test]
async fn idle_keep_alive_connections_hold_no_buffers_and_are_served_again() {
    let (_app, _dir, _proxyd, mut held) = idle_connections_stay_small(1).await;
    // Two requests in one write, then the connection is closed by the client's ask.
    let stream = &mut held[0];
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\nGET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answers = Vec::new();
    stream.read_to_end(&mut answers).await.unwrap();
    let answers = String::from_utf8_lossy(&answers);
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 2, "{answers}");
}

/// Like the test above, with three requests on each connection before it idles: every
/// idle spell parks the connection, not only the first one.
#[tokio::test]
async fn connections_idle_after_several_requests_hold_no_buffers_either() {
    idle_connections_stay_small(3).await;
}

/// Holds 1,000 keep-alive connections to a proxyd of their own, each idle after `requests`
/// requests; checks that proxyd's RSS grew by less than 6 KiB for each, and that each is
/// served once more. Returns what keeps the connections served: the upstream, the state
/// directory, the daemon, and the connections.
async fn idle_connections_stay_small(
    requests: usize,
) -> (Upstream, tempfile::TempDir, Proxyd, Vec<TcpStream>) {
    let app = upstream("app").await;
    let dir = tempfile::tempdir().unwrap();
    let (child, addr, admin) = own_process(&app, dir.path()).await;
    let pid = child.0.id();
    let before = rss_kib(pid);
    let mut held = hold_idle(addr, admin, 1000, requests).await;
    let after = rss_kib(pid);
    let per_connection = after.saturating_sub(before) as f64 / 1000.0;
    eprintln!("proxyd RSS {before} KiB -> {after} KiB with 1,000 keep-alive connections idle after {requests} request(s): {per_connection:.1} KiB each");
    assert!(
        per_connection < 6.0,
        "{per_connection:.1} KiB per idle keep-alive connection ({before} -> {after} KiB)"
    );
    serve_each_again(&mut held).await;
    (app, dir, child, held)
}

/// The sum over the workers of the series `name{worker="..."}`.
fn per_worker_sum(text: &str, name: &str) -> u64 {
    let prefix = format!("{name}{{worker=");
    text.lines()
        .filter(|l| l.starts_with(prefix.as_str()))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// 1,000 keep-alive connections idle long enough to go dormant: each is then a socket in
/// its worker's epoll set and a couple of hundred bytes of state, with no task (the
/// workers run only their accept loops and dormitories), and each is served again. RSS is
/// printed, not asserted: a debug build's, with the allocator's pages, says little about
/// a connection's own size (`bench/scenarios.sh idle` measures that).
#[tokio::test]
async fn dormant_keep_alive_connections_hold_no_task_and_are_served_again() {
    let app = upstream("app").await;
    let dir = tempfile::tempdir().unwrap();
    let (child, addr, admin) = own_process(&app, dir.path()).await;
    let pid = child.0.id();
    let before = rss_kib(pid);
    let mut held = hold_idle(addr, admin, 1000, 1).await;
    let text = await_scrape(admin, |text| {
        per_worker_sum(text, "proxy_worker_dormant_connections") == 1000
    })
    .await;
    assert_eq!(
        per_worker_sum(&text, "proxy_worker_dormant_connections"),
        1000,
        "{text}"
    );
    assert_eq!(sample(&text, ACTIVE), Some(1000), "{text}");
    let tasks = per_worker_sum(&text, "proxy_worker_tasks");
    assert!(
        tasks < 50,
        "{tasks} tasks on the workers with every connection dormant"
    );
    let after = rss_kib(pid);
    eprintln!(
        "proxyd RSS {before} KiB -> {after} KiB with 1,000 dormant keep-alive connections, {tasks} tasks on the workers"
    );
    serve_each_again(&mut held).await;
}

/// One more request on each of `held`, answered and the connection kept open.
async fn serve_each_again(held: &mut [TcpStream]) {
    for (n, stream) in held.iter_mut().enumerate() {
        let (status, close) =
            common::exchange(stream, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
                .await
                .unwrap_or_else(|_| panic!("connection {n} not served again"));
        assert_eq!((status, close), (200, false), "connection {n}");
    }
}

/// Opens `count` keep-alive connections, each answered `requests` times back to back, and
/// returns them once the listener counts them all and they have been idle for a second.
async fn hold_idle(
    addr: SocketAddr,
    admin: SocketAddr,
    count: u64,
    requests: usize,
) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..count {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        for _ in 0..requests {
            let (status, close) =
                common::exchange(&mut stream, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
                    .await
                    .expect("answer");
            assert_eq!((status, close), (200, false));
        }
        held.push(stream);
    }
    let text = await_active(admin, count).await;
    assert_eq!(sample(&text, ACTIVE), Some(count), "{text}");
    // Ten times the park interval: the last of them has parked by then.
    tokio::time::sleep(Duration::from_secs(1)).await;
    held
}
