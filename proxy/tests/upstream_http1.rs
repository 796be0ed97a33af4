//! The HTTP/1.1 client side towards upstreams, end to end through proxyd against scripted
//! upstreams on real sockets: response framing as the client gets it, failures that must
//! reach the client as failures, and which upstream connections are reused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that answers every request head with the reply its path names (the
/// request's path minus its leading `/`, looked up in `replies`), counting connections.
struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

/// 64 KiB blocks in the `big` reply's body, as its Content-Length says.
const BIG_BLOCKS: usize = 16 * 1024;

async fn scripted(replies: &'static [(&'static str, &'static [u8])]) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    let n = socket.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&tmp[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..end]).into_owned();
                        seen.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or("/");
                        let name = path.trim_start_matches('/');
                        let Some((_, reply)) = replies.iter().find(|(n, _)| *n == name) else {
                            return;
                        };
                        if socket.write_all(reply).await.is_err() {
                            return;
                        }
                        // `big`: a 1 GiB body, written until the reader goes away: no
                        // socket buffer holds it, whatever the machine's limits.
                        if name == "big" {
                            let block = vec![b'b'; 64 * 1024];
                            for _ in 0..BIG_BLOCKS {
                                if socket.write_all(&block).await.is_err() {
                                    return;
                                }
                            }
                        }
                        // `close` replies end with the connection.
                        if name.starts_with("close") {
                            let _ = socket.shutdown().await;
                            return;
                        }
                    }
                }
            });
        }
    });
    Scripted { addr, connections }
}

async fn proxy_to(up: &Scripted) -> TestProxy {
    start_proxy(&format!(
        "{WEB}[[pools]]\nname=\"p\"\nupstreams=[\"{}\"]\n[[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n",
        up.addr
    ))
    .await
}

const REPLIES: &[(&str, &[u8])] = &[
    ("ok", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    (
        "chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n",
    ),
    ("close-delimited", b"HTTP/1.1 200 OK\r\n\r\nread until the end"),
    ("no-content", b"HTTP/1.1 204 No Content\r\n\r\n"),
    (
        "not-modified",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n",
    ),
    ("head", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
    (
        "bad-chunk",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\nmore\r\n0\r\n\r\n",
    ),
    (
        "close-cut",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly this much",
    ),
    (
        "both-lengths",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    ("big", b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n"),
];

/// Writes `request` on a new connection and returns everything read until the proxy closes
/// (or 5 s of silence).
async fn all_bytes(addr: SocketAddr, request: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Whether `bytes` hold one complete 200 response: its Content-Length of body, or a
/// chunked body up to its last chunk.
fn complete(bytes: &[u8]) -> bool {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
    let body = &bytes[end + 4..];
    if !head.starts_with("http/1.1 200") {
        return false;
    }
    if let Some(length) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() == length;
    }
    head.contains("transfer-encoding: chunked") && body.ends_with(b"\r\n0\r\n\r\n")
}

#[tokio::test]
async fn response_bodies_are_framed_as_the_upstream_framed_them() {
    let up = scripted(REPLIES).await;
    let p = proxy_to(&up).await;
    let web = p.addr("web");

    let r = get(web, "h", "/chunked").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");
    // Over a kept client connection too: the chunked body ends where the upstream's did.
    let bytes = all_bytes(
        web,
        "GET /chunked HTTP/1.1\r\nHost: h\r\n\r\nGET /ok HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("world\r\n0\r\n\r\nHTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\nok"), "{text}");

    let r = get(web, "h", "/close-delimited").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "read until the end");

    let r = get(web, "h", "/no-content").await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());

    // 304 and HEAD: the Content-Length describes a body that is not there.
    let bytes = all_bytes(
        web,
        "GET /not-modified HTTP/1.1\r\nHost: h\r\n\r\nHEAD /head HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 304"), "{text}");
    assert!(text.contains("\r\n\r\nHTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "{text}");
    // All of these on the one upstream connection per worker that kept it; the
    // close-delimited reply ended its own.
    let workers = proxy::workers::Workers::get(0).unwrap().len();
    let connections = up.connections.load(Ordering::SeqCst);
    assert!(
        connections <= workers + 1,
        "{connections} upstream connections"
    );
}

#[tokio::test]
async fn broken_upstream_responses_fail_instead_of_passing_as_complete() {
    let up = scripted(REPLIES).await;
    let p = proxy_to(&up).await;
    let web = p.addr("web");

    // A malformed chunk size after the head and a first chunk: the client's chunked body
    // never gets its last chunk, the connection just ends (possibly before any byte).
    let bytes = all_bytes(web, "GET /bad-chunk HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert!(!complete(&bytes), "{}", String::from_utf8_lossy(&bytes));

    // Cut mid-body: fewer bytes than the Content-Length, then the end of the connection.
    let bytes = all_bytes(web, "GET /close-cut HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert!(!complete(&bytes), "{}", String::from_utf8_lossy(&bytes));

    // The same exchanges, complete, are seen as complete.
    let bytes = all_bytes(
        web,
        "GET /chunked HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(complete(&bytes), "{}", String::from_utf8_lossy(&bytes));
    let bytes = all_bytes(
        web,
        "GET /ok HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(complete(&bytes), "{}", String::from_utf8_lossy(&bytes));

    // Ambiguous framing: refused with a 502.
    let r = get(web, "h", "/both-lengths").await;
    assert_eq!(r.status, 502, "{}", r.text());
}

#[tokio::test]
async fn an_oversized_response_head_is_a_502() {
    static HUGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let huge = HUGE.get_or_init(|| {
        format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\nContent-Length: 0\r\n\r\n",
            "a".repeat(proxy::upstream::h1::MAX_HEAD_BYTES)
        )
        .into_bytes()
    });
    let replies: &'static [(&str, &[u8])] = Box::leak(Box::new([("huge", huge.as_slice())]));
    let up = scripted(replies).await;
    let p = proxy_to(&up).await;
    let r = get(p.addr("web"), "h", "/huge").await;
    assert_eq!(r.status, 502, "{}", r.text());
}

#[tokio::test]
async fn a_connection_is_reused_after_a_complete_response_only() {
    let up = scripted(REPLIES).await;
    // One worker thread's worth of reuse is what is counted: requests on one client
    // connection run on one thread.
    let p = proxy_to(&up).await;
    let web = p.addr("web");
    let mut client = TcpStream::connect(web).await.unwrap();
    for _ in 0..3 {
        let (status, closes) = exchange(&mut client, b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        assert_eq!((status, closes), (200, false));
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);

    // A client that goes away mid-body leaves the upstream connection half read: the
    // next request gets a new one.
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let mut tmp = [0u8; 1024];
    let n = client.read(&mut tmp).await.unwrap();
    assert!(String::from_utf8_lossy(&tmp[..n]).starts_with("HTTP/1.1 200"));
    drop(client);
    // Had the half-read connection gone back to the idle store, these would read the
    // rest of the big body as their response.
    let mut client = TcpStream::connect(web).await.unwrap();
    for _ in 0..3 {
        let (status, closes) = exchange(&mut client, b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        assert_eq!((status, closes), (200, false));
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
}
