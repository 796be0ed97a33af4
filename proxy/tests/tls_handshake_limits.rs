//! TLS handshakes on `https` and `tls` listeners are bounded by the listener's
//! `header_timeout`: silent, stalled and half-sent handshakes are closed, normal ones work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod tls_support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{pool, start_proxy, upstream, TestProxy};
use tls_support::{client_config, get_over, tls_connect, TestCa};

/// Far above the 2 s limit, below the ten seconds the ClientHello used to get (and the
/// unbounded rest of the handshake). The limit leaves a client that completes its
/// handshake room on a loaded machine: it bounds that client's handshake and head too.
const CLOSED_WITHIN: Duration = Duration::from_secs(6);

async fn proxy(
    ca: &TestCa,
    dir: &std::path::Path,
    protocol: &str,
) -> (TestProxy, common::Upstream) {
    let (cert, key) = ca.leaf(&["secure.example.test"]);
    let cert_path = dir.join("leaf.pem");
    let key_path = dir.join("leaf.key");
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let app = upstream("app").await;
    // `https` routes requests; a `tls` listener forwards the stream to its own pool.
    let (listener_pool, route) = if protocol == "https" {
        (
            "",
            "[[routes]]\nname = \"app\"\nlistener = \"secure\"\npool = \"app\"\n",
        )
    } else {
        ("pool = \"app\"\n", "")
    };
    let config = format!(
        "[[listeners]]\nname = \"secure\"\nprotocol = \"{protocol}\"\naddress = \"127.0.0.1:0\"\nheader_timeout = \"2s\"\n{listener_pool}\n{}\n{route}\n[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
        pool("app", &[&app]),
        cert_path.display(),
        key_path.display(),
    );
    (start_proxy(&config).await, app)
}

/// A real ClientHello for `secure.example.test`, as the first TLS records of a client.
fn client_hello(ca: &TestCa) -> Vec<u8> {
    let config = client_config(ca.roots(), &[b"http/1.1"]);
    let name = rustls::pki_types::ServerName::try_from("secure.example.test").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Sends `bytes`, then stays silent: the proxy must close the connection (reads reach the
/// end of the stream or fail) well within [`CLOSED_WITHIN`].
async fn closed_after(addr: std::net::SocketAddr, bytes: &[u8], what: &str) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    if !bytes.is_empty() {
        stream.write_all(bytes).await.unwrap();
    }
    let mut sink = Vec::new();
    let read = tokio::time::timeout(CLOSED_WITHIN, stream.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "{what}: connection still open");
}

async fn stalled_handshakes_are_closed(protocol: &str) {
    let ca = TestCa::new("limits CA");
    let dir = tempfile::tempdir().unwrap();
    let (p, _app) = proxy(&ca, dir.path(), protocol).await;
    let addr = p.addr("secure");
    let hello = client_hello(&ca);
    closed_after(addr, &[], "connect and stay silent").await;
    closed_after(addr, &hello[..hello.len() / 2], "half a ClientHello").await;
    // The proxy answers the ClientHello and then waits for the client's Finished.
    closed_after(addr, &hello, "ClientHello, then silence").await;

    // A client that completes its handshake is served as before.
    let mut ok = tls_connect(
        addr,
        "secure.example.test",
        client_config(ca.roots(), &[b"http/1.1"]),
    )
    .await
    .expect("handshake");
    if protocol == "https" {
        let (status, body) = get_over(&mut ok, "secure.example.test", "/x").await;
        assert_eq!(status, 200, "{body}");
    } else {
        ok.write_all(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), ok.read_to_end(&mut answer))
            .await
            .expect("answer")
            .ok();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    }
}

#[tokio::test]
async fn https_handshakes_are_bounded_by_header_timeout() {
    stalled_handshakes_are_closed("https").await;
}

#[tokio::test]
async fn tls_handshakes_are_bounded_by_header_timeout() {
    stalled_handshakes_are_closed("tls").await;
}
