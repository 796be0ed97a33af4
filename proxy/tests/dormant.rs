//! Dormant connections: a plain HTTP/1 keep-alive connection idle for a while leaves its
//! task and sleeps in its worker's epoll set (`proxy_worker_dormant_connections` counts
//! them). It is served again when it speaks, closed and counted at its limits as a parked
//! connection is, and given the drain's grace when the proxy stops.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One worker (so that every count is that worker's), an admin listener and an HTTP
/// listener `web` with `limits` (its timeouts), routed to the upstream.
fn config(up: &Upstream, limits: &str) -> String {
    on_workers(1, up, limits)
}

/// The value of the series `name` (with its labels, as the exposition writes them).
async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let text = scrape_metrics(admin).await;
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .parse()
        .expect("a number")
}

const DORMANT: &str = "proxy_worker_dormant_connections{worker=\"0\"}";
const CONNECTIONS: &str = "proxy_worker_connections{worker=\"0\"}";
const IDLE_TIMEOUTS: &str =
    "proxy_client_timeouts_total{listener=\"web\",protocol=\"http\",cause=\"idle\"}";

/// Waits (30 s at most) until the series `name` reads `value`.
async fn until(admin: SocketAddr, name: &str, value: f64) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let now = metric(admin, name).await;
        if now == value {
            return;
        }
        assert!(Instant::now() < end, "{name} stayed {now}, not {value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const REQUEST: &[u8] = b"GET /x HTTP/1.1\r\nHost: web\r\n\r\n";

/// Reads until the server closes; whatever came before.
async fn until_closed(client: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), client.read(&mut buf))
            .await
            .expect("closed within 30 s")
        {
            Ok(0) | Err(_) => return seen,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_sleeps_without_a_task_and_is_served_when_it_speaks() {
    let up = upstream("up").await;
    let proxy = start_proxy(&config(&up, "")).await;
    let admin = proxy.daemon.admin_address().expect("admin listener");
    let web = proxy.addr("web");
    let tracked_before = proxy.daemon.shutdown_signal().in_flight();

    let mut client = TcpStream::connect(web).await.unwrap();
    assert_eq!(exchange(&mut client, REQUEST).await, Ok((200, false)));
    until(admin, DORMANT, 1.0).await;
    // Still open, and counted as such: on its worker, and for the drain.
    assert_eq!(metric(admin, CONNECTIONS).await, 1.0);
    assert_eq!(
        proxy.daemon.shutdown_signal().in_flight(),
        tracked_before + 1
    );

    // Its next request wakes it: awake while it is served (the upstream holds the request
    // until the count is read), and asleep again once idle.
    let serving = tokio::spawn(async move {
        let answer = exchange(&mut client, b"GET /hold HTTP/1.1\r\nHost: web\r\n\r\n").await;
        (client, answer)
    });
    up.until_hits(2).await;
    assert_eq!(metric(admin, DORMANT).await, 0.0);
    up.release();
    let (mut client, answer) = serving.await.unwrap();
    assert_eq!(answer, Ok((200, false)));
    until(admin, DORMANT, 1.0).await;
    // Woken and slept again any number of times, on the same connection.
    for _ in 0..3 {
        assert_eq!(exchange(&mut client, REQUEST).await, Ok((200, false)));
        until(admin, DORMANT, 1.0).await;
    }
    assert_eq!(up.hits(), 5);

    // A request that arrives in pieces is read whole after the wake.
    client.write_all(b"GET /x HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        exchange(&mut client, b"Host: web\r\n\r\n").await,
        Ok((200, false))
    );
    until(admin, DORMANT, 1.0).await;

    // A client that closes wakes it too, and the connection ends.
    drop(client);
    until(admin, CONNECTIONS, 0.0).await;
    assert_eq!(metric(admin, DORMANT).await, 0.0);
    assert_eq!(proxy.daemon.shutdown_signal().in_flight(), tracked_before);
}

#[tokio::test]
async fn a_dormant_connection_is_closed_at_its_next_requests_due_time_and_counted_as_idle() {
    closed_at_a_limit_while_dormant("header_timeout = \"3s\"\nidle_timeout = \"300s\"").await;
}

#[tokio::test]
async fn a_dormant_connection_is_closed_at_its_idle_limit_and_counted() {
    closed_at_a_limit_while_dormant("header_timeout = \"300s\"\nidle_timeout = \"3s\"").await;
}

/// A connection idle after one request, on a listener with `limits` (one of them 3 s):
/// it goes dormant, is closed at the limit without a byte, and counted once as an idle
/// client.
async fn closed_at_a_limit_while_dormant(limits: &str) {
    let up = upstream("up").await;
    let proxy = start_proxy(&config(&up, limits)).await;
    let admin = proxy.daemon.admin_address().expect("admin listener");
    let mut client = TcpStream::connect(proxy.addr("web")).await.unwrap();
    assert_eq!(exchange(&mut client, REQUEST).await, Ok((200, false)));
    until(admin, DORMANT, 1.0).await;
    assert_eq!(metric(admin, IDLE_TIMEOUTS).await, 0.0);
    assert!(until_closed(&mut client).await.is_empty());
    until(admin, CONNECTIONS, 0.0).await;
    assert_eq!(metric(admin, DORMANT).await, 0.0);
    assert_eq!(metric(admin, IDLE_TIMEOUTS).await, 1.0);
}

#[tokio::test]
async fn a_drain_wakes_dormant_connections_answers_them_with_close_and_ends() {
    let up = upstream("up").await;
    let proxy = start_proxy(&config(&up, "")).await;
    let admin = proxy.daemon.admin_address().expect("admin listener");
    let web = proxy.addr("web");
    let mut quiet = TcpStream::connect(web).await.unwrap();
    let mut speaking = TcpStream::connect(web).await.unwrap();
    for client in [&mut quiet, &mut speaking] {
        assert_eq!(exchange(client, REQUEST).await, Ok((200, false)));
    }
    until(admin, DORMANT, 2.0).await;

    let signal = proxy.daemon.shutdown_signal().clone();
    let stop = tokio::spawn(proxy.daemon.stop());
    // Woken into the drain's grace: a request still gets its answer, told to close ...
    let mut waited = 0;
    while !signal.is_triggered() && waited < 600 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
    }
    assert_eq!(exchange(&mut speaking, REQUEST).await, Ok((200, true)));
    // ... and one that sends nothing is closed after the grace.
    assert!(until_closed(&mut quiet).await.is_empty());
    // The drain waited for both, and ended well within the shutdown timeout.
    tokio::time::timeout(Duration::from_secs(20), stop)
        .await
        .expect("the drain ended")
        .unwrap();
    assert_eq!(signal.in_flight(), 0);
}
