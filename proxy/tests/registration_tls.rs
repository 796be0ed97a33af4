//! Registrations that bring a TLS certificate: the daemon terminates TLS with it on the
//! registered port (HTTP as https, TCP as tls), keeps it through the hold, and drops it with
//! the route. Real services, real TLS clients, the real management socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;
mod registration_support;
mod tls_support;

use std::time::Duration;

use common::*;
use proxy::registration::client::{self, Announce, ClientError, RegisteredProtocol};
use proxy_proto::v1 as pb;
use proxy_proto::v1::tls_service_client::TlsServiceClient;
use registration_support::{channel, local, port_closes, proxy_with};
use tls_support::{client_config, get_over, peer_leaf, tls_connect, TestCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP announce for `host` under `/slow` with the certificate `(cert, key)`.
fn https_announce(endpoint: &str, port: u16, host: &str, cert: &(String, String)) -> Announce {
    Announce {
        endpoint: endpoint.into(),
        port: u32::from(port),
        host: host.into(),
        path_prefix: "/slow".into(),
        tls_certificate_pem: cert.0.clone(),
        tls_private_key_pem: cert.1.clone(),
        name: "tls-test".into(),
        ..Default::default()
    }
}

async fn certificates(p: &TestProxy) -> Vec<pb::Certificate> {
    TlsServiceClient::new(channel(p).await)
        .list_certificates(pb::ListCertificatesRequest {})
        .await
        .expect("ListCertificates")
        .into_inner()
        .certificates
}

/// The DER of the leaf in a PEM chain.
fn leaf_der(chain_pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("readable PEM")
        .as_ref()
        .to_vec()
}

/// `GET path` over TLS with `sni` as server name and Host; (status, body, leaf presented).
async fn https_get(
    port: u16,
    ca: &TestCa,
    sni: &str,
    path: &str,
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut stream = tls_connect(local(port), sni, client_config(ca.roots(), &[])).await?;
    let leaf = peer_leaf(&stream);
    let (status, body) = get_over(&mut stream, sni, path).await;
    Ok((status, body, leaf))
}

#[tokio::test]
async fn a_registered_certificate_serves_its_host_through_the_hold_and_leaves_with_the_route() {
    let port = free_port();
    let p = proxy_with(port, "4s", "").await;
    let ca = TestCa::new("registration test CA");
    let first = ca.leaf(&["svc.example"]);
    let a = upstream("a").await;
    let lease = client::register(
        channel(&p).await,
        https_announce(&a.address(), port, "svc.example", &first),
        None,
    )
    .await
    .expect("register with a certificate");

    let (status, body, leaf) = https_get(port, &ca, "svc.example", "/slow/0")
        .await
        .expect("handshake with the registered certificate");
    assert_eq!((status, body.as_str()), (200, "a"));
    assert_eq!(
        leaf,
        leaf_der(&first.0),
        "the registered certificate is presented"
    );
    // The port terminates TLS: plain HTTP is not served there.
    let mut plain = TcpStream::connect(local(port)).await.unwrap();
    plain
        .write_all(b"GET /slow/0 HTTP/1.1\r\nHost: svc.example\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let listed = certificates(&p).await;
    let registered: Vec<_> = listed
        .iter()
        .filter(|c| c.source == pb::CertificateSource::Registered as i32)
        .collect();
    assert_eq!(registered.len(), 1, "{listed:?}");
    assert_eq!(registered[0].names, vec!["svc.example".to_string()]);
    // It belongs to the registration, not to the API.
    let removal = TlsServiceClient::new(channel(&p).await)
        .remove_certificate(pb::RemoveCertificateRequest {
            name: registered[0].name.clone(),
        })
        .await
        .expect_err("a registered certificate cannot be removed by hand");
    assert_eq!(
        removal.code(),
        tonic::Code::FailedPrecondition,
        "{removal:?}"
    );

    // The service goes away: during the hold the handshake still succeeds and the request
    // waits for the service to come back, now with a renewed certificate.
    lease.release().await;
    let waiting = {
        let ca_pem = ca.pem.clone();
        tokio::spawn(async move {
            let mut stream = tls_connect(
                local(port),
                "svc.example",
                client_config(tls_support::roots_from_pem(&ca_pem), &[]),
            )
            .await
            .expect("handshake during the hold");
            get_over(&mut stream, "svc.example", "/slow/0").await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let renewed = ca.leaf(&["svc.example"]);
    let b = upstream("b").await;
    let lease = client::register(
        channel(&p).await,
        https_announce(&b.address(), port, "svc.example", &renewed),
        None,
    )
    .await
    .expect("register again");
    assert_eq!(waiting.await.unwrap(), (200, "b".to_string()));
    let (status, body, leaf) = https_get(port, &ca, "svc.example", "/slow/0")
        .await
        .expect("handshake with the renewed certificate");
    assert_eq!((status, body.as_str()), (200, "b"));
    assert_eq!(
        leaf,
        leaf_der(&renewed.0),
        "the newer instance's certificate"
    );
    let registered = certificates(&p)
        .await
        .into_iter()
        .filter(|c| c.source == pb::CertificateSource::Registered as i32)
        .count();
    assert_eq!(
        registered, 1,
        "the first instance's certificate was dropped"
    );

    // The service leaves for good: after the hold the route, its port and its certificate
    // are gone.
    lease.release().await;
    assert!(port_closes(port).await, "the port closes after the hold");
    assert!(
        certificates(&p)
            .await
            .iter()
            .all(|c| c.source != pb::CertificateSource::Registered as i32),
        "the certificate left with the route"
    );
}

#[tokio::test]
async fn a_tcp_registration_with_a_certificate_terminates_tls() {
    let port = free_port();
    let p = proxy_with(port, "2s", "").await;
    let ca = TestCa::new("registration test CA");
    let cert = ca.leaf(&["stream.example"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let announce = Announce {
        protocol: RegisteredProtocol::Tcp as i32,
        host: String::new(),
        path_prefix: String::new(),
        ..https_announce(&endpoint, port, "", &cert)
    };
    let _lease = client::register(channel(&p).await, announce, None)
        .await
        .expect("register tcp with a certificate");
    let mut stream = tls_connect(
        local(port),
        "stream.example",
        client_config(ca.roots(), &[]),
    )
    .await
    .expect("handshake");
    assert_eq!(peer_leaf(&stream), leaf_der(&cert.0));
    stream.write_all(b"plain bytes behind tls").await.unwrap();
    let mut echoed = [0u8; 22];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&echoed, b"plain bytes behind tls");
}

#[tokio::test]
async fn bad_certificates_are_refused_naming_the_field_and_open_nothing() {
    let port = free_port();
    let p = proxy_with(port, "1s", "").await;
    let ca = TestCa::new("registration test CA");
    let refused = |r: Result<client::Lease, ClientError>| match r {
        Err(ClientError::Refused(status)) => status,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let other_host = ca.leaf(&["other.example"]);
    let (cert, _) = ca.leaf(&["svc.example"]);
    let (_, unrelated_key) = ca.leaf(&["svc.example"]);
    let cases: Vec<(Announce, &str)> = vec![
        (
            https_announce("127.0.0.1:9", port, "svc.example", &other_host),
            "announce.tls_certificate_pem: the certificate is for",
        ),
        (
            https_announce(
                "127.0.0.1:9",
                port,
                "svc.example",
                &(cert.clone(), unrelated_key),
            ),
            "announce.tls_private_key_pem:",
        ),
        (
            https_announce(
                "127.0.0.1:9",
                port,
                "svc.example",
                &(cert.clone(), String::new()),
            ),
            "announce.tls_private_key_pem: required",
        ),
        (
            https_announce(
                "127.0.0.1:9",
                port,
                "svc.example",
                &("not pem".into(), "not pem".into()),
            ),
            "announce.tls_",
        ),
    ];
    for (announce, expected) in cases {
        let s = refused(client::register(channel(&p).await, announce, None).await);
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(
            s.message().starts_with(expected),
            "{:?} does not start with {expected:?}",
            s.message()
        );
    }
    assert!(
        TcpStream::connect(local(port)).await.is_err(),
        "nothing was opened for refused registrations"
    );
    assert!(certificates(&p)
        .await
        .iter()
        .all(|c| c.source != pb::CertificateSource::Registered as i32));

    // A port open for plain HTTP registrations cannot also terminate TLS.
    let a = upstream("a").await;
    let _plain = client::register(
        channel(&p).await,
        Announce {
            endpoint: a.address(),
            port: u32::from(port),
            path_prefix: "/plain".into(),
            ..Default::default()
        },
        None,
    )
    .await
    .expect("plain registration");
    let s = refused(
        client::register(
            channel(&p).await,
            https_announce(
                &a.address(),
                port,
                "svc.example",
                &ca.leaf(&["svc.example"]),
            ),
            None,
        )
        .await,
    );
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("open for http"), "{s:?}");
    assert!(certificates(&p)
        .await
        .iter()
        .all(|c| c.source != pb::CertificateSource::Registered as i32));
}
