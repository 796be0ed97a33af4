//! TCP forwarding end to end: byte-exact copy (spliced between plain TCP sockets),
//! half-close either way first, resets, byte counts, failover, connection limit.
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

/// FNV-1a over a stream, to compare transfers too large to keep.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Checksum(u64, u64);

impl Checksum {
    fn new() -> Checksum {
        Checksum(0xcbf2_9ce4_8422_2325, 0)
    }

    fn add(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        self.1 += bytes.len() as u64;
    }
}

/// `len` pseudo-random bytes from `seed`, in pieces of at most 256 KiB.
fn pieces(len: usize, seed: u32) -> impl Iterator<Item = Vec<u8>> {
    let mut x = seed;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(256 << 10);
        left -= n;
        Some(
            (0..n)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (x >> 16) as u8
                })
                .collect(),
        )
    })
}

fn expected(len: usize, seed: u32) -> Checksum {
    let mut sum = Checksum::new();
    for piece in pieces(len, seed) {
        sum.add(&piece);
    }
    sum
}

/// Sends `len` bytes from `seed` into `w`, then half-closes it.
async fn send<W: tokio::io::AsyncWrite + Unpin>(
    mut w: W,
    len: usize,
    seed: u32,
) -> std::io::Result<()> {
    for piece in pieces(len, seed) {
        w.write_all(&piece).await?;
    }
    w.shutdown().await
}

/// Reads `r` to its end; the checksum of what arrived (also when it ended in an error).
async fn receive<R: tokio::io::AsyncRead + Unpin>(mut r: R) -> (Checksum, std::io::Result<()>) {
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return (sum, Ok(())),
            Ok(n) => sum.add(&buf[..n]),
            Err(e) => return (sum, Err(e)),
        }
    }
}

/// A config with the admin listener on, for the byte counts.
fn counted_tcp_config(upstream: &str) -> String {
    format!(
        "[server]\nstate_dir = \"{{state}}\"\nadmin_listen = \"127.0.0.1:0\"\n{}",
        tcp_config(&[upstream.to_string()], "")
    )
}

/// The listener `db`'s forwarded bytes (up, down) once `done` holds for them.
async fn forwarded_bytes(p: &TestProxy, done: impl Fn(u64, u64) -> bool) -> (u64, u64) {
    let admin = p.daemon.admin_address().expect("admin listener");
    let series = |text: &str, direction: &str| {
        let name = format!(
            "proxy_tcp_forwarded_bytes_total{{listener=\"db\",protocol=\"tcp\",direction=\"{direction}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let mut last = (None, None);
    // The counts are added when the stream ends, which may trail the client's end of stream.
    for _ in 0..200 {
        let text = scrape_metrics(admin).await;
        last = (series(&text, "up"), series(&text, "down"));
        if let (Some(up), Some(down)) = last {
            if done(up, down) {
                return (up, down);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("forwarded bytes never reached the expected counts: last {last:?}");
}

#[tokio::test]
async fn large_transfers_both_ways_at_once_arrive_intact_and_are_counted() {
    const UP: usize = 24 << 20;
    const DOWN: usize = 40 << 20;
    // The upstream sends its stream while it reads the client's, and reports what it read.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let (r, w) = s.split();
        let (got, sent) = tokio::join!(receive(r), send(w, DOWN, 7));
        sent.unwrap();
        got
    });
    let p = start_proxy(&counted_tcp_config(&address)).await;
    let mut client = TcpStream::connect(p.addr("db")).await.unwrap();
    let (r, w) = client.split();
    let ((got, read), sent) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(receive(r), send(w, UP, 3))
    })
    .await
    .expect("the transfers end");
    sent.unwrap();
    read.unwrap();
    assert_eq!(
        got,
        expected(DOWN, 7),
        "the client got the upstream's bytes intact"
    );
    let (up_got, up_read) = upstream.await.unwrap();
    up_read.unwrap();
    assert_eq!(
        up_got,
        expected(UP, 3),
        "the upstream got the client's bytes intact"
    );
    let counted = forwarded_bytes(&p, |up, down| up + down >= (UP + DOWN) as u64).await;
    assert_eq!(counted, (UP as u64, DOWN as u64));
}

#[tokio::test]
async fn the_upstream_may_half_close_first_and_the_client_go_on() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"hello, then nothing more from me")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        receive(&mut s).await
    });
    let p = start_proxy(&counted_tcp_config(&address)).await;
    let mut client = TcpStream::connect(p.addr("db")).await.unwrap();
    let mut greeting = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut greeting))
        .await
        .expect("the upstream's end of stream arrives")
        .unwrap();
    assert_eq!(greeting, b"hello, then nothing more from me");
    // The client's half is still forwarded after the upstream's end.
    send(&mut client, 3 << 20, 11).await.unwrap();
    let (got, read) = tokio::time::timeout(Duration::from_secs(60), upstream)
        .await
        .expect("the upstream reads to the end")
        .unwrap();
    read.unwrap();
    assert_eq!(got, expected(3 << 20, 11));
    let counted = forwarded_bytes(&p, |up, _| up >= 3 << 20).await;
    assert_eq!(counted, (3 << 20, greeting.len() as u64));
}

#[tokio::test]
async fn an_upstream_reset_mid_transfer_ends_the_client_connection_and_counts_what_moved() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (reset_tx, mut reset_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let write = async {
            for piece in pieces(2 << 20, 5) {
                s.write_all(&piece).await.unwrap();
            }
            std::future::pending::<()>().await
        };
        // Reset while still writing if the buffers on the way are full by then.
        tokio::select! {
            _ = write => {}
            _ = &mut reset_rx => {}
        }
        // An abortive close: RST, not FIN.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
        // Later connections (the check below) are served normally.
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"next").await;
        }
    });
    let p = start_proxy(&counted_tcp_config(&address)).await;
    let mut client = TcpStream::connect(p.addr("db")).await.unwrap();
    let mut first = vec![0u8; 1 << 20];
    client.read_exact(&mut first).await.unwrap();
    reset_tx.send(()).unwrap();
    let (got, _) = tokio::time::timeout(Duration::from_secs(20), receive(&mut client))
        .await
        .expect("the client's connection ends after the upstream's reset");
    let received = (1 << 20) + got.1;
    assert!(received <= 2 << 20);
    // What the proxy wrote to the client before the reset is what the client got.
    let counted = forwarded_bytes(&p, |_, down| down >= 1 << 20).await;
    assert_eq!(counted, (0, received));

    let mut next = TcpStream::connect(p.addr("db")).await.unwrap();
    let mut b = [0u8; 4];
    next.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"next");
}

#[tokio::test]
async fn a_client_reset_mid_transfer_ends_the_upstream_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        receive(&mut s).await
    });
    let p = start_proxy(&counted_tcp_config(&address)).await;
    let mut client = TcpStream::connect(p.addr("db")).await.unwrap();
    for piece in pieces(1 << 20, 9) {
        client.write_all(&piece).await.unwrap();
    }
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    let (got, _) = tokio::time::timeout(Duration::from_secs(20), upstream)
        .await
        .expect("the upstream's connection ends after the client's reset")
        .unwrap();
    assert!(got.1 <= 1 << 20);
    // What the proxy wrote to the upstream before the reset is what the upstream got.
    let counted = forwarded_bytes(&p, |up, _| up == got.1).await;
    assert_eq!(counted, (got.1, 0));
}

#[test]
fn free_ports_handed_out_in_one_test_are_all_different() {
    let ports: std::collections::BTreeSet<u16> = (0..500).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 500);
    assert!(ports.iter().all(|p| (20_000..=32_767).contains(p)));
}

#[test]
fn a_dead_address_refuses_connections_and_cannot_be_taken() {
    let dead = dead_address();
    let err = std::net::TcpStream::connect(&dead).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // A listener that asks for the port, with SO_REUSEADDR as tokio sets it, is refused.
    let err = std::net::TcpListener::bind(&dead).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    assert_eq!(
        socket.bind(dead.parse().unwrap()).unwrap_err().kind(),
        std::io::ErrorKind::AddrInUse
    );
    assert_ne!(dead_address(), dead);
}
