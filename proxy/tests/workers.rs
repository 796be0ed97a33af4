//! How new connections spread over the worker threads: a worker that serves more
//! connections than another by more than `workers::MARGIN` leaves the next connections to
//! the others, which accept from the same socket, and `proxy_worker_connections{worker}` on
//! `/metrics` shows the count of each. Every connection is served where it was accepted
//! (keep-alive requests on HTTP listeners, byte streams on TCP listeners).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::net::TcpStream;

/// `proxy_worker_connections` by worker, scraped from the admin listener.
async fn worker_connections(admin: SocketAddr) -> Vec<i64> {
    let text = scrape_metrics(admin).await;
    let mut counts = Vec::new();
    for worker in 0.. {
        let series = format!("proxy_worker_connections{{worker=\"{worker}\"}} ");
        let Some(value) = text.lines().find_map(|l| l.strip_prefix(series.as_str())) else {
            break;
        };
        counts.push(value.trim().parse().expect("a count"));
    }
    counts
}

const REQUEST: &[u8] = b"GET /spread HTTP/1.1\r\nHost: spread\r\n\r\n";

/// A proxyd config with two workers (see [`on_workers`]), with `more` (further listeners)
/// beside `web`.
fn two_workers(up: &Upstream, more: &str) -> String {
    on_workers(2, up, more)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_spread_over_the_workers_and_are_served_where_they_land() {
    let up = upstream("up").await;
    let proxy = start_proxy(&two_workers(
        &up,
        r#"
[[listeners]]
name = "stream"
protocol = "tcp"
address = "127.0.0.1:0"
pool = "up"
"#,
    ))
    .await;
    let admin = proxy.daemon.admin_address().expect("admin listener");
    assert_eq!(worker_connections(admin).await, vec![0, 0]);

    // 40 keep-alive connections, each opened once the one before was answered: every
    // accept sees the counts of all earlier connections, so no worker gets ahead of the
    // other by more than the margin plus the connection that tips it.
    let bound = i64::try_from(proxy::workers::MARGIN).unwrap() + 1;
    let mut open = Vec::new();
    for listener in ["web", "stream"] {
        let addr = proxy.addr(listener);
        for _ in 0..20 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            assert_eq!(exchange(&mut stream, REQUEST).await, Ok((200, false)));
            open.push(stream);
        }
        let counts = worker_connections(admin).await;
        assert_eq!(counts.len(), 2, "{counts:?}");
        assert_eq!(
            counts.iter().sum::<i64>(),
            i64::try_from(open.len()).unwrap()
        );
        let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
        assert!(
            spread <= bound,
            "{listener}: {counts:?} more than {bound} apart"
        );
    }
    // Every connection, wherever it was placed, still serves requests.
    for stream in &mut open {
        assert_eq!(exchange(stream, REQUEST).await, Ok((200, false)));
    }
    assert_eq!(up.hits(), 80);

    // A closed connection is no longer counted on its worker.
    drop(open);
    let mut counts = Vec::new();
    for _ in 0..200 {
        counts = worker_connections(admin).await;
        if counts == [0, 0] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(counts, vec![0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_opened_at_once_spreads_within_the_margin() {
    let up = upstream("up").await;
    let proxy = start_proxy(&two_workers(&up, "")).await;
    let admin = proxy.daemon.admin_address().expect("admin listener");
    let addr = proxy.addr("web");

    // 48 connections connect at once, without waiting for each other: they queue in the
    // socket's backlog together, and whichever worker the kernel wakes first would take
    // them all. A worker more than the margin ahead leaves the rest to the other, and
    // connections only open during the burst, so the spread stays within the margin plus
    // the connection that tips it.
    let opened = futures_util::future::join_all((0..48).map(|_| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert_eq!(exchange(&mut stream, REQUEST).await, Ok((200, false)));
        stream
    }))
    .await;
    let counts = worker_connections(admin).await;
    assert_eq!(counts.iter().sum::<i64>(), 48, "{counts:?}");
    let bound = i64::try_from(proxy::workers::MARGIN).unwrap() + 1;
    let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
    assert!(spread <= bound, "{counts:?} more than {bound} apart");
    assert_eq!(up.hits(), 48);
    drop(opened);
}
