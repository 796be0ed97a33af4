//! TCP forwarding end to end: byte-exact copy, half-close, failover, connection limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that reads until EOF, then answers with the byte count and what it read
/// reversed, then closes: it only answers after the client half-closes.
async fn reverse_upstream() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut data = Vec::new();
                if s.read_to_end(&mut data).await.is_err() {
                    return;
                }
                data.reverse();
                let _ = s.write_all(&data).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

fn tcp_config(upstreams: &[String], extra: &str) -> String {
    let list: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[[listeners]]\nname = \"db\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\npool = \"db\"\n{extra}\n[[pools]]\nname = \"db\"\nbalance = \"ordered\"\nupstreams = [{}]\n",
        list.join(", ")
    )
}

#[tokio::test]
async fn half_close_is_honoured_and_bytes_are_exact() {
    let (up, _task) = reverse_upstream().await;
    let p = start_proxy(&tcp_config(&[up], "")).await;
    let mut s = TcpStream::connect(p.addr("db")).await.unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&payload).await.unwrap();
    // Half-close: the upstream sees EOF and only then answers on the still-open other half.
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    let mut expected = payload.clone();
    expected.reverse();
    assert_eq!(back.len(), expected.len());
    assert!(back == expected, "bytes differ");
}

#[tokio::test]
async fn ordered_pool_skips_a_refusing_upstream() {
    let (up, _task) = reverse_upstream().await;
    let p = start_proxy(&tcp_config(&[dead_address(), up], "")).await;
    for _ in 0..3 {
        let mut s = TcpStream::connect(p.addr("db")).await.unwrap();
        s.write_all(b"abc").await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"cba");
    }
}

#[tokio::test]
async fn all_upstreams_down_closes_the_connection() {
    let p = start_proxy(&tcp_config(&[dead_address()], "")).await;
    let mut s = TcpStream::connect(p.addr("db")).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn connection_limit_holds_extra_clients_back() {
    // An echo upstream that answers each chunk immediately.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let p = start_proxy(&tcp_config(&[up], "max_connections = 1")).await;
    let mut first = TcpStream::connect(p.addr("db")).await.unwrap();
    first.write_all(b"1").await.unwrap();
    let mut b = [0u8; 1];
    first.read_exact(&mut b).await.unwrap();
    // The second connection is accepted by the kernel but not served while the first is open.
    let mut second = TcpStream::connect(p.addr("db")).await.unwrap();
    second.write_all(b"2").await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), second.read_exact(&mut b)).await;
    assert!(
        early.is_err(),
        "second connection was served beyond the limit"
    );
    drop(first);
    tokio::time::timeout(Duration::from_secs(10), second.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"2");
}

#[tokio::test]
async fn idle_tcp_streams_are_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        // Accepts and holds connections open without sending anything.
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let p = start_proxy(&tcp_config(&[up], "idle_timeout = \"300ms\"")).await;
    let mut s = TcpStream::connect(p.addr("db")).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[test]
fn free_ports_handed_out_in_one_test_are_all_different() {
    let ports: std::collections::BTreeSet<u16> = (0..500).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 500);
    assert!(ports.iter().all(|p| (20_000..=32_767).contains(p)));
}
