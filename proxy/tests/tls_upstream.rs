//! Pools with `tls`: the proxy reaches an HTTPS upstream that requires a client
//! certificate, over `http` and `tcp` listeners, verifies the upstream against `ca_file`,
//! and answers 502 when that fails; the same pool through the management API; refused
//! on-demand handshakes on `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;
mod tls_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proxy_proto::v1 as pb;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::{get, start_proxy, start_proxy_in};
use tls_support::{client_config, tls_connect, TestCa};

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// An HTTPS upstream with a certificate for `backend.test` from `server_ca` that only
/// accepts clients with a certificate from `client_ca`. Answers with the path it saw;
/// counts the requests that got through.
async fn https_upstream(server_ca: &TestCa, client_ca: &TestCa) -> (SocketAddr, Arc<AtomicUsize>) {
    let (cert, key) = server_ca.leaf(&["backend.test"]);
    let chain: Vec<_> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_ca.roots()),
        tls_support::provider(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(tls_support::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let client_cert = tls.get_ref().1.peer_certificates().is_some();
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    let body = format!(
                        "tls upstream {} client-cert={client_cert}",
                        req.uri().path()
                    );
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, served)
}

#[tokio::test]
async fn pool_with_tls_reaches_an_upstream_that_requires_a_client_certificate() {
    let server_ca = TestCa::new("upstream server CA");
    let client_ca = TestCa::new("upstream client CA");
    let other_ca = TestCa::new("some other CA");
    let (upstream, served) = https_upstream(&server_ca, &client_ca).await;
    let files = tempfile::tempdir().unwrap();
    let (client_cert, client_key) = client_ca.leaf(&["proxy.test"]);
    let ca_file = write(files.path(), "server-ca.pem", &server_ca.pem);
    let other_ca_file = write(files.path(), "other-ca.pem", &other_ca.pem);
    let client_cert = write(files.path(), "client.pem", &client_cert);
    let client_key = write(files.path(), "client.key", &client_key);
    let config = format!(
        r#"
[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:0"

[[listeners]]
name = "raw"
protocol = "tcp"
address = "127.0.0.1:0"
pool = "secure"

[[pools]]
name = "secure"
upstreams = ["{upstream}"]
tls = {{ server_name = "backend.test", ca_file = "{ca_file}", client_cert = "{client_cert}", client_key = "{client_key}" }}

[[pools]]
name = "wrong-ca"
upstreams = ["{upstream}"]
tls = {{ server_name = "backend.test", ca_file = "{other_ca_file}", client_cert = "{client_cert}", client_key = "{client_key}" }}

[[pools]]
name = "wrong-name"
upstreams = ["{upstream}"]
tls = {{ server_name = "elsewhere.test", ca_file = "{ca_file}", client_cert = "{client_cert}", client_key = "{client_key}" }}

[[pools]]
name = "no-client-cert"
upstreams = ["{upstream}"]
tls = {{ server_name = "backend.test", ca_file = "{ca_file}" }}

[[pools]]
name = "plain"
upstreams = ["{upstream}"]

[[routes]]
name = "secure"
listener = "web"
path_prefix = "/secure"
pool = "secure"

[[routes]]
name = "wrong-ca"
listener = "web"
path_prefix = "/wrong-ca"
pool = "wrong-ca"

[[routes]]
name = "wrong-name"
listener = "web"
path_prefix = "/wrong-name"
pool = "wrong-name"

[[routes]]
name = "no-client-cert"
listener = "web"
path_prefix = "/no-client-cert"
pool = "no-client-cert"

[[routes]]
name = "plain"
listener = "web"
path_prefix = "/plain"
pool = "plain"
"#
    );
    let proxy = start_proxy(&config).await;
    let web = proxy.addr("web");

    // Several requests: the first opens the TLS connection, the next reuse it.
    for i in 0..3 {
        let r = get(web, "app.test", &format!("/secure/{i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.text(),
            format!("tls upstream /secure/{i} client-cert=true")
        );
    }
    assert_eq!(served.load(Ordering::SeqCst), 3);

    // Upstream certificate not from ca_file, or not for server_name: 502, nothing served.
    for path in ["/wrong-ca", "/wrong-name"] {
        let r = get(web, "app.test", path).await;
        assert_eq!(r.status, 502, "{path}: {}", r.text());
    }
    // The upstream refuses a client without a certificate; plain HTTP is not TLS: 502.
    for path in ["/no-client-cert", "/plain"] {
        let r = get(web, "app.test", path).await;
        assert!(r.status == 502, "{path}: {} {}", r.status, r.text());
    }
    assert_eq!(served.load(Ordering::SeqCst), 3);

    // TCP listener: the client speaks plain HTTP, the proxy adds TLS towards the pool.
    let mut tcp = TcpStream::connect(proxy.addr("raw")).await.unwrap();
    tcp.write_all(b"GET /over-tcp HTTP/1.1\r\nHost: backend.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tcp.read_to_end(&mut answer),
    )
    .await
    .expect("tcp answer in time")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("tls upstream /over-tcp client-cert=true"),
        "{answer}"
    );
    assert_eq!(served.load(Ordering::SeqCst), 4);
}

#[test]
fn unusable_pool_tls_names_the_field_and_line() {
    let base = "[server]\nstate_dir = \"/nonexistent-state\"\nadmin_listen = \"\"\n\n[[pools]]\nname = \"p\"\nupstreams = [\"127.0.0.1:1\"]\n";
    let err = |extra: &str| {
        proxy::Config::parse(&format!("{base}{extra}"), "t.toml")
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    };
    let e = err("tls = { server_name = \"b.test\", ca_file = \"/nonexistent/ca.pem\" }\n");
    assert!(
        e.starts_with("t.toml:8: pools[0].tls.ca_file: /nonexistent/ca.pem:"),
        "{e}"
    );
    let e = err("tls = { server_name = \"not a name\", ca_file = \"/nonexistent/ca.pem\" }\n");
    assert!(e.starts_with("t.toml:8: pools[0].tls.server_name: "), "{e}");
    let e = err("tls = { server_name = \"b.test\", ca_file = \"/x\", verify = false }\n");
    assert!(e.contains("verify"), "{e}");
}

#[tokio::test]
async fn pool_tls_and_tcp_route_sni_through_the_api() {
    let server_ca = TestCa::new("upstream server CA");
    let client_ca = TestCa::new("upstream client CA");
    let (upstream, served) = https_upstream(&server_ca, &client_ca).await;
    let (backend_b, _) = https_upstream(&server_ca, &client_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let (client_cert, client_key) = client_ca.leaf(&["proxy.test"]);
    let tls = pb::UpstreamTls {
        server_name: "backend.test".into(),
        ca_file: write(files.path(), "server-ca.pem", &server_ca.pem),
        client_cert: write(files.path(), "client.pem", &client_cert),
        client_key: write(files.path(), "client.key", &client_key),
    };
    let config = r#"
[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:0"

[[listeners]]
name = "edge"
protocol = "tls-passthrough"
address = "127.0.0.1:0"
"#;
    let proxy = start_proxy_in(dir, config).await;
    let channel = mgmt_support::unix_channel(&mgmt_support::socket_path(&proxy)).await;
    let mut pools = pb::pool_service_client::PoolServiceClient::new(channel.clone());
    let mut routes = pb::route_service_client::RouteServiceClient::new(channel);

    // A pool whose files cannot be read is refused, naming the field.
    let bad = pools
        .create_pool(pb::CreatePoolRequest {
            pool: Some(pb::Pool {
                tls: Some(pb::UpstreamTls {
                    ca_file: "/nonexistent/ca.pem".into(),
                    ..tls.clone()
                }),
                ..mgmt_support::pool_msg("secure", &[upstream.to_string()])
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().contains("pool.tls.ca_file"),
        "{}",
        bad.message()
    );

    let created = pools
        .create_pool(pb::CreatePoolRequest {
            pool: Some(pb::Pool {
                tls: Some(tls.clone()),
                ..mgmt_support::pool_msg("secure", &[upstream.to_string()])
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.pool.unwrap().tls, Some(tls.clone()));
    routes
        .create_route(pb::CreateRouteRequest {
            route: Some(mgmt_support::route_msg("secure", "", "/", "secure")),
        })
        .await
        .unwrap();
    let r = get(proxy.addr("web"), "app.test", "/via-api").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "tls upstream /via-api client-cert=true");
    assert_eq!(served.load(Ordering::SeqCst), 1);

    // TCP routes by SNI on the passthrough listener: set, listed back, and routed.
    for (name, sni, address) in [
        ("a", "a.example.test", upstream.to_string()),
        ("b", "*.b.example.test", backend_b.to_string()),
    ] {
        pools
            .create_pool(pb::CreatePoolRequest {
                pool: Some(mgmt_support::pool_msg(&format!("pass-{name}"), &[address])),
            })
            .await
            .unwrap();
        let created = routes
            .create_tcp_route(pb::CreateTcpRouteRequest {
                tcp_route: Some(pb::TcpRoute {
                    name: name.into(),
                    listener: "edge".into(),
                    pool: format!("pass-{name}"),
                    sni: sni.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(created.tcp_route.unwrap().sni, sni);
    }
    let listed = routes
        .list_tcp_routes(pb::ListTcpRoutesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let snis: Vec<&str> = listed.tcp_routes.iter().map(|r| r.sni.as_str()).collect();
    assert_eq!(snis, ["a.example.test", "*.b.example.test"]);
    let duplicate = routes
        .create_tcp_route(pb::CreateTcpRouteRequest {
            tcp_route: Some(pb::TcpRoute {
                name: "c".into(),
                listener: "edge".into(),
                pool: "pass-a".into(),
                sni: "A.Example.test".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), tonic::Code::InvalidArgument);
    assert!(
        duplicate.message().contains("tcp_route.sni"),
        "{}",
        duplicate.message()
    );

    // Passthrough: the client's own handshake reaches the backend its SNI names. Both
    // backends present `backend.test` and want a client certificate, so the handshake
    // with SNI `a.example.test` fails on the name check only if it reached a backend.
    let roots = server_ca.roots();
    let edge = proxy.addr("edge");
    let reached = |sni: &'static str| {
        let config = client_config(roots.clone(), &[]);
        async move { tls_connect(edge, sni, config).await }
    };
    let err = reached("a.example.test").await.expect_err("name mismatch");
    assert!(
        err.to_string().contains("NotValidForName") || err.to_string().contains("not valid for"),
        "{err}"
    );
    let err = reached("x.b.example.test")
        .await
        .expect_err("name mismatch");
    assert!(
        err.to_string().contains("NotValidForName") || err.to_string().contains("not valid for"),
        "{err}"
    );
    // No route for this name and no catch-all: the proxy closes without a ServerHello.
    let err = reached("c.example.test").await.expect_err("no route");
    assert!(
        !err.to_string().contains("NotValidForName"),
        "reached a backend: {err}"
    );
}
