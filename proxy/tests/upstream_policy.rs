//! Upstream connections that hold up against real upstreams: stale keep-alive connections
//! are not turned into errors, timeouts mean what the README says, a request's connection
//! attempts have a budget and a deadline, and failing upstreams are ejected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a raw test upstream saw.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    /// Connections closed with a request already waiting in them.
    reset_with_request: AtomicUsize,
}

/// An HTTP/1.1 upstream (requests without body) that answers `status` and closes a
/// keep-alive connection once it has been idle for `idle` — the way Node.js does it: its
/// timers run before its reads, so a request that arrives after the idle time but before
/// the close finds the connection closed under it (the kernel answers with a reset). Idle
/// connections are also closed on their own a quarter of `idle` later.
async fn closing_upstream(status: u16, idle: Duration) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_closing(stream, status, idle, s.clone()));
        }
    });
    (addr, seen)
}

async fn serve_closing(mut stream: TcpStream, status: u16, idle: Duration, seen: Arc<Seen>) {
    let mut buf = Vec::new();
    let mut idle_since = Instant::now();
    loop {
        let readable = tokio::time::timeout(idle + idle / 4, stream.readable()).await;
        if readable.is_err() {
            return;
        }
        if idle_since.elapsed() >= idle {
            // The idle timer "fired first": close with the request unread.
            seen.reset_with_request.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let mut tmp = [0u8; 4096];
        let n = match stream.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&tmp[..n]);
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            seen.requests.fetch_add(1, Ordering::SeqCst);
            let body = "ok";
            let response = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
            idle_since = Instant::now();
        }
    }
}

fn route(pool: &str) -> String {
    format!("[[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"{pool}\"\n")
}

/// `name{labels}` from the admin listener's `/metrics`, 0 when absent.
async fn metric(admin: SocketAddr, series: &str) -> u64 {
    let r = get(admin, "admin", "/metrics").await;
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

const ADMIN: &str = "[server]\nstate_dir = \"{state}\"\nadmin_listen = \"127.0.0.1:0\"\n";

#[tokio::test]
async fn stale_keepalive_connections_do_not_fail_requests() {
    let (up, seen) = closing_upstream(200, Duration::from_secs(1)).await;
    // Default pool settings: idle connections are kept for longer than this upstream keeps
    // them, so requests meet connections the upstream is closing.
    let p = start_proxy(&format!(
        "{WEB}[[pools]]\nname=\"p\"\nupstreams=[\"{up}\"]\n{}",
        route("p")
    ))
    .await;
    let web = p.addr("web");
    let mut failed = Vec::new();
    let mut total = 0;
    // Bursts with pauses around the upstream's idle timeout.
    for pause_ms in [
        0u64, 900, 1000, 1050, 1100, 1150, 1200, 1000, 1100, 1500, 1050, 1150,
    ] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        let burst: Vec<_> = (0..12)
            .map(|_| tokio::spawn(async move { get(web, "h", "/").await.status }))
            .collect();
        for request in burst {
            total += 1;
            let status = request.await.unwrap();
            if status != 200 {
                failed.push((pause_ms, status));
            }
        }
    }
    assert!(
        seen.reset_with_request.load(Ordering::SeqCst) > 0,
        "the upstream never closed a connection under a request: the test did not test"
    );
    assert_eq!(failed, Vec::<(u64, u16)>::new(), "failed of {total}");
    assert_eq!(seen.requests.load(Ordering::SeqCst), total);
}

const KEEP_ALIVE_GET: &[u8] = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n";

#[tokio::test]
async fn idle_timeout_and_connection_cap_are_kept() {
    // One client connection, so every request is served by the same worker thread (each
    // keeps its own upstream connections).
    let up = upstream("up").await;
    let p = start_proxy(&format!(
        "{WEB}[[pools]]\nname=\"p\"\nupstreams=[\"{}\"]\nidle_timeout=\"2s\"\n{}",
        up.address(),
        route("p")
    ))
    .await;
    let mut client = TcpStream::connect(p.addr("web")).await.unwrap();
    assert_eq!(
        exchange(&mut client, KEEP_ALIVE_GET).await,
        Ok((200, false))
    );
    assert_eq!(
        exchange(&mut client, KEEP_ALIVE_GET).await,
        Ok((200, false))
    );
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "reused while fresh"
    );
    // Idle for longer than idle_timeout: not reused. (The limit leaves the two requests
    // above room to be reused on a loaded machine.)
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(
        exchange(&mut client, KEEP_ALIVE_GET).await,
        Ok((200, false))
    );
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        2,
        "a new one after idle_timeout"
    );

    // With one connection allowed, a request beyond it gets 503 (nothing queues behind a
    // slow request), and the connection is reused afterwards.
    let up = upstream("capped").await;
    let p = start_proxy(&format!(
        "{WEB}[[pools]]\nname=\"p\"\nupstreams=[\"{}\"]\nmax_connections_per_upstream=1\n{}",
        up.address(),
        route("p")
    ))
    .await;
    let web = p.addr("web");
    let held = tokio::spawn(async move { get(web, "h", "/hold").await.status });
    up.until_hits(1).await;
    let r = get(web, "h", "/").await;
    assert_eq!(r.status, 503, "{}", r.text());
    up.release();
    assert_eq!(held.await.unwrap(), 200);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn response_timeout_starts_once_the_body_is_sent() {
    let up = upstream("up").await;
    let p = start_proxy(&format!(
        "{WEB}[[pools]]\nname=\"p\"\nupstreams=[\"{}\"]\nresponse_timeout=\"1s\"\nbody_timeout=\"5s\"\n{}",
        up.address(),
        route("p")
    ))
    .await;
    // A slow upload (ten pieces, 250 ms apart: longer than response_timeout in total).
    let mut stream = TcpStream::connect(p.addr("web")).await.unwrap();
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        stream.write_all(&[b'u'; 10]).await.unwrap();
    }
    let r = read_response(&mut stream).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("100"), "{}", r.text());
}

#[tokio::test]
async fn a_stalled_request_body_gets_408() {
    let up = upstream("up").await;
    let p = start_proxy(&format!(
        "{WEB}[[pools]]\nname=\"p\"\nupstreams=[\"{}\"]\nbody_timeout=\"300ms\"\n{}",
        up.address(),
        route("p")
    ))
    .await;
    let mut stream = TcpStream::connect(p.addr("web")).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nonly-part")
        .await
        .unwrap();
    let r = read_response(&mut stream).await;
    assert_eq!(r.status, 408, "{}", r.text());
}

/// A listener whose backlog is full: connection attempts to it get no answer.
struct Blackhole {
    _socket: socket2::Socket,
    _fillers: Vec<TcpStream>,
    addr: SocketAddr,
}

async fn blackhole() -> Blackhole {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    Blackhole {
        _socket: socket,
        _fillers: fillers,
        addr,
    }
}

#[tokio::test]
async fn failover_over_blackholed_upstreams_has_a_budget_and_one_deadline() {
    let mut holes = Vec::new();
    for _ in 0..10 {
        holes.push(blackhole().await);
    }
    let list: Vec<String> = holes.iter().map(|h| format!("\"{}\"", h.addr)).collect();
    let list = list.join(", ");
    let config = format!(
        "{ADMIN}{WEB}\
         [[pools]]\nname=\"budget\"\nbalance=\"ordered\"\nupstreams=[{list}]\nconnect_timeout=\"300ms\"\nmax_attempts=3\nconnect_deadline=\"60s\"\n\
         [[pools]]\nname=\"deadline\"\nbalance=\"ordered\"\nupstreams=[{list}]\nconnect_timeout=\"400ms\"\nmax_attempts=10\nconnect_deadline=\"600ms\"\n\
         [[routes]]\nname=\"b\"\nlistener=\"web\"\npath_prefix=\"/b\"\npool=\"budget\"\n\
         [[routes]]\nname=\"d\"\nlistener=\"web\"\npath_prefix=\"/d\"\npool=\"deadline\"\n"
    );
    let p = start_proxy(&config).await;
    let admin = p.daemon.admin_address().unwrap();
    let r = get(p.addr("web"), "h", "/b").await;
    assert_eq!(r.status, 504, "{}", r.text());
    // Three attempts, not ten.
    assert_eq!(
        metric(
            admin,
            "proxy_upstream_connect_failures_total{pool=\"budget\"}"
        )
        .await,
        3
    );
    let r = get(p.addr("web"), "h", "/d").await;
    assert_eq!(r.status, 504, "{}", r.text());
    // 400 ms + what is left of the 600 ms deadline: two attempts, then the deadline (one
    // if the first attempt's timer fired 200 ms late, as it may on a loaded machine);
    // never the ten that max_attempts allows.
    let attempts = metric(
        admin,
        "proxy_upstream_connect_failures_total{pool=\"deadline\"}",
    )
    .await;
    assert!((1..=2).contains(&attempts), "{attempts} attempts");
}

#[tokio::test]
async fn upstreams_are_ejected_after_consecutive_failures() {
    let (bad, bad_seen) = closing_upstream(500, Duration::from_secs(60)).await;
    let (good, good_seen) = closing_upstream(200, Duration::from_secs(60)).await;
    let config = format!(
        "{ADMIN}{WEB}\
         [[pools]]\nname=\"opt_in\"\nupstreams=[\"{bad}\", \"{good}\"]\n\
         [pools.outlier]\nconsecutive_failures=3\non_5xx=true\n\
         [[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"opt_in\"\n"
    );
    let p = start_proxy(&config).await;
    let admin = p.daemon.admin_address().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get(p.addr("web"), "h", "/").await.status);
    }
    // Round robin: the bad upstream answers 500 three times in a row, then is ejected.
    assert_eq!(bad_seen.requests.load(Ordering::SeqCst), 3, "{statuses:?}");
    assert_eq!(good_seen.requests.load(Ordering::SeqCst), 17);
    assert_eq!(
        metric(
            admin,
            &format!("proxy_upstream_ejections_total{{pool=\"opt_in\",upstream=\"{bad}\"}}")
        )
        .await,
        1
    );
    assert_eq!(
        metric(
            admin,
            &format!("proxy_upstream_ejected{{pool=\"opt_in\",upstream=\"{bad}\"}}")
        )
        .await,
        1
    );
}

#[tokio::test]
async fn answers_5xx_eject_only_when_the_pool_opts_in() {
    let (bad, bad_seen) = closing_upstream(503, Duration::from_secs(60)).await;
    let (good, _) = closing_upstream(200, Duration::from_secs(60)).await;
    let config = format!(
        "{ADMIN}{WEB}\
         [[pools]]\nname=\"p\"\nupstreams=[\"{bad}\", \"{good}\"]\n\
         [pools.outlier]\nconsecutive_failures=2\n\
         [[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n"
    );
    let p = start_proxy(&config).await;
    let admin = p.daemon.admin_address().unwrap();
    for _ in 0..10 {
        get(p.addr("web"), "h", "/").await;
    }
    assert_eq!(bad_seen.requests.load(Ordering::SeqCst), 5);
    assert_eq!(
        metric(
            admin,
            &format!("proxy_upstream_ejections_total{{pool=\"p\",upstream=\"{bad}\"}}")
        )
        .await,
        0
    );
}

#[tokio::test]
async fn at_most_max_ejection_percent_of_a_pool_is_ejected() {
    let dead: Vec<String> = (0..4).map(|_| dead_address()).collect();
    let (good, _) = closing_upstream(200, Duration::from_secs(60)).await;
    // Four refusing upstreams and one working, at most 40 % ejected: two of five.
    let list = dead
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        "{ADMIN}{WEB}\
         [[pools]]\nname=\"p\"\nbalance=\"ordered\"\nupstreams=[{list}, \"{good}\"]\nmax_attempts=5\n\
         [pools.outlier]\nmax_ejection_percent=40\n\
         [[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n"
    );
    let p = start_proxy(&config).await;
    let admin = p.daemon.admin_address().unwrap();
    assert_eq!(get(p.addr("web"), "h", "/").await.status, 200);
    let mut ejected = 0;
    for d in &dead {
        ejected += metric(
            admin,
            &format!("proxy_upstream_ejected{{pool=\"p\",upstream=\"{d}\"}}"),
        )
        .await;
    }
    assert_eq!(ejected, 2);
}
