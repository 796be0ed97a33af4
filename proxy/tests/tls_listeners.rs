//! `https`, `tls` and `tls-passthrough` listeners with static certificates from files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod tls_support;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use common::{pool, start_proxy, upstream};
use tls_support::{client_config, get_over, peer_leaf, tls_connect, TestCa};

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A TLS server with its own certificate that answers every connection with `name`.
async fn tls_echo_server(
    ca: &TestCa,
    host: &str,
    name: &'static str,
) -> (std::net::SocketAddr, Vec<u8>) {
    let (cert, key) = ca.leaf(&[host]);
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let leaf = chain[0].as_ref().to_vec();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(tls_support::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(stream).await {
                    let mut buf = [0u8; 64];
                    let n = tls.read(&mut buf).await.unwrap_or(0);
                    let _ = tls
                        .write_all(
                            format!("{name}:{}", String::from_utf8_lossy(&buf[..n])).as_bytes(),
                        )
                        .await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (addr, leaf)
}
#[tokio::test]
async fn https_listener_serves_static_certificates_by_sni_over_http1_and_h2() {
    let ca = TestCa::new("static CA");
    let dir = tempfile::tempdir().unwrap();
    let (wild_cert, wild_key) = ca.leaf(&["*.example.test"]);
    let (exact_cert, exact_key) = ca.leaf(&["shop.example.test"]);
    let app = upstream("app").await;
    let config = format!(
        r#"
[[listeners]]
name = "secure"
protocol = "https"
address = "127.0.0.1:0"

{pool}
[[routes]]
name = "app"
listener = "secure"
pool = "app"

[[tls.certificates]]
cert = "{}"
key = "{}"

[[tls.certificates]]
cert = "{}"
key = "{}"
"#,
        write(dir.path(), "wild.pem", &wild_cert),
        write(dir.path(), "wild.key", &wild_key),
        write(dir.path(), "exact.pem", &exact_cert),
        write(dir.path(), "exact.key", &exact_key),
        pool = pool("app", &[&app]),
    );
    let proxy = start_proxy(&config).await;
    let addr = proxy.addr("secure");

    // HTTP/1.1: the exact certificate for its name, the wildcard for others.
    let client = client_config(ca.roots(), &[b"http/1.1"]);
    let mut shop = tls_connect(addr, "shop.example.test", client.clone())
        .await
        .expect("handshake");
    let exact_der =
        rustls::pki_types::CertificateDer::from_pem_slice(exact_cert.as_bytes()).unwrap();
    assert_eq!(peer_leaf(&shop), exact_der.as_ref());
    let (status, body) = get_over(&mut shop, "shop.example.test", "/x").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"x-forwarded-proto\":[\"https\"]"), "{body}");
    let other = tls_connect(addr, "blog.example.test", client.clone())
        .await
        .expect("wildcard handshake");
    let wild_der = rustls::pki_types::CertificateDer::from_pem_slice(wild_cert.as_bytes()).unwrap();
    assert_eq!(peer_leaf(&other), wild_der.as_ref());

    // A name no certificate covers, with on-demand off: refused.
    assert!(tls_connect(addr, "example.org", client).await.is_err());
    assert_eq!(proxy.daemon.tls().refused_handshakes(), 1);

    // HTTP/2 chosen by ALPN.
    let h2 = tls_connect(
        addr,
        "shop.example.test",
        client_config(ca.roots(), &[b"h2"]),
    )
    .await
    .expect("h2 handshake");
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("https://shop.example.test/over-h2")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["uri"], "/over-h2");
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https");
    assert_eq!(app.hits(), 2);
    proxy.daemon.stop().await;
}

#[tokio::test]
async fn tls_passthrough_routes_by_sni_and_forwards_bytes_untouched() {
    let ca = TestCa::new("backend CA");
    let (a_addr, a_leaf) = tls_echo_server(&ca, "a.pass.test", "backend-a").await;
    let (b_addr, b_leaf) = tls_echo_server(&ca, "x.wild.pass.test", "backend-b").await;
    let config = format!(
        r#"
[[listeners]]
name = "edge"
protocol = "tls-passthrough"
address = "127.0.0.1:0"

[[pools]]
name = "a"
upstreams = ["{a_addr}"]

[[pools]]
name = "b"
upstreams = ["{b_addr}"]

[[tcp_routes]]
name = "to-a"
listener = "edge"
pool = "a"
sni = "a.pass.test"

[[tcp_routes]]
name = "to-b"
listener = "edge"
pool = "b"
sni = "*.wild.pass.test"
"#
    );
    let proxy = start_proxy(&config).await;
    let client = client_config(ca.roots(), &[]);
    for (sni, leaf, name) in [
        ("a.pass.test", &a_leaf, "backend-a"),
        ("x.wild.pass.test", &b_leaf, "backend-b"),
    ] {
        // The backend's own certificate reaches the client: the proxy did not terminate.
        let mut stream = tls_connect(proxy.addr("edge"), sni, client.clone())
            .await
            .expect("handshake through the proxy");
        assert_eq!(&peer_leaf(&stream), leaf);
        stream.write_all(b"ping").await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap_or_default();
        assert_eq!(answer, format!("{name}:ping"));
    }
    // No route for the name and no default route: the connection is closed.
    let refused = tls_connect(proxy.addr("edge"), "c.pass.test", client).await;
    assert!(refused.is_err());
    proxy.daemon.stop().await;
}

#[tokio::test]
async fn tls_listener_terminates_and_forwards_plain_bytes() {
    let ca = TestCa::new("edge CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["db.example.test"]);
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = s
                    .write_all(&[b"plain:".as_slice(), &buf[..n]].concat())
                    .await;
            });
        }
    });
    let config = format!(
        r#"
[[listeners]]
name = "db"
protocol = "tls"
address = "127.0.0.1:0"
pool = "db"

[[pools]]
name = "db"
upstreams = ["{backend_addr}"]

[[tls.certificates]]
cert = "{}"
key = "{}"
"#,
        write(dir.path(), "c.pem", &cert),
        write(dir.path(), "c.key", &key)
    );
    let proxy = start_proxy(&config).await;
    let mut stream = tls_connect(
        proxy.addr("db"),
        "db.example.test",
        client_config(ca.roots(), &[]),
    )
    .await
    .expect("handshake");
    stream.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"plain:hello");
    proxy.daemon.stop().await;
}

#[tokio::test]
async fn unreadable_certificate_file_stops_the_start_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nstate_dir = \"{}\"\nadmin_listen = \"\"\n[[tls.certificates]]\ncert = \"{}/missing.pem\"\nkey = \"{}/missing.key\"\n",
        dir.path().display(),
        dir.path().display(),
        dir.path().display()
    );
    let config = proxy::Config::parse(&text, "t.toml").expect("parses");
    let err = proxy::Daemon::start(config)
        .await
        .err()
        .expect("start fails");
    assert!(
        err.to_string().contains("tls.certificates[0].cert"),
        "{err}"
    );
}

/// A response that ends its connection ends TLS properly: the client reads the whole
/// response and then the server's `close_notify`, not a bare end of the TCP stream (which
/// a TLS client reports as a possible truncation).
#[tokio::test]
async fn a_response_that_ends_the_connection_closes_tls_with_close_notify() {
    let ca = TestCa::new("close CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["shop.example.test"]);
    let app = upstream("app").await;
    let config = format!(
        "[[listeners]]\nname = \"secure\"\nprotocol = \"https\"\naddress = \"127.0.0.1:0\"\n\n{pool}\
         [[routes]]\nname = \"app\"\nlistener = \"secure\"\npool = \"app\"\n\n\
         [[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
        write(dir.path(), "shop.pem", &cert),
        write(dir.path(), "shop.key", &key),
        pool = pool("app", &[&app]),
    );
    let proxy = start_proxy(&config).await;
    let client = client_config(ca.roots(), &[b"http/1.1"]);
    let mut tls = tls_connect(proxy.addr("secure"), "shop.example.test", client)
        .await
        .expect("handshake");
    tls.write_all(b"GET /x HTTP/1.1\r\nHost: shop.example.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tls.read_to_end(&mut response),
    )
    .await
    .expect("the connection ends after its response")
    .expect("ended with close_notify");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("\"upstream\":\"app\"") && text.ends_with('}'),
        "the whole response: {text}"
    );
}
