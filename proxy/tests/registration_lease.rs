//! Registration end to end: real services (HTTP upstreams on 127.0.0.1, one on a unix
//! socket) register over the daemon's real management socket with the client library, and
//! real clients send traffic through the ports the daemon opens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;
mod registration_support;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use proxy::registration::client::{self, Announce, ClientError, RegisteredProtocol};
use proxy_proto::v1 as pb;
use proxy_proto::v1::registration_service_client::RegistrationServiceClient;
use registration_support::{channel, local, port_closes, port_opens, proxy_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn http_announce(endpoint: &str, port: u16, prefix: &str) -> Announce {
    Announce {
        endpoint: endpoint.into(),
        port: u32::from(port),
        path_prefix: prefix.into(),
        name: "test".into(),
        ..Default::default()
    }
}

async fn listing(p: &TestProxy) -> pb::ListRegistrationsResponse {
    RegistrationServiceClient::new(channel(p).await)
        .list_registrations(pb::ListRegistrationsRequest {})
        .await
        .expect("ListRegistrations")
        .into_inner()
}

#[tokio::test]
async fn a_registration_opens_its_port_and_two_instances_are_balanced() {
    let port = free_port();
    let p = proxy_with(port, "5s", "").await;
    let (a, b) = (upstream("a").await, upstream("b").await);
    let lease_a = client::register(
        channel(&p).await,
        http_announce(&a.address(), port, "/a"),
        None,
    )
    .await
    .expect("register a");
    assert_eq!(lease_a.registered().address, local(port).to_string());
    let r = get(local(port), "anything.example", "/a/x").await;
    assert_eq!((r.status, r.header("x-upstream")), (200, Some("a")));
    // Only /a is registered on that port.
    assert_eq!(get(local(port), "anything.example", "/b").await.status, 404);

    let lease_b = client::register(
        channel(&p).await,
        http_announce(&b.address(), port, "/a"),
        None,
    )
    .await
    .expect("register b");
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let r = get(local(port), "h", "/a").await;
        assert_eq!(r.status, 200);
        seen.insert(r.header("x-upstream").unwrap_or("").to_string());
    }
    assert_eq!(
        seen,
        ["a".to_string(), "b".to_string()].into(),
        "both instances serve"
    );

    let l = listing(&p).await;
    assert_eq!(l.registrations.len(), 2);
    assert_eq!(l.routes.len(), 1);
    assert_eq!(l.routes[0].instances, 2);
    // The pool lists its registered members with their origin.
    let routing = p.daemon.routing().routing();
    let pool = routing.pool(&l.routes[0].route).expect("registered pool");
    assert!(pool
        .members()
        .all(|(_, o, _)| o.label().starts_with("registration/")));
    drop(routing);

    // One instance leaves: the other takes everything, nothing waits.
    lease_a.release().await;
    for _ in 0..5 {
        assert_eq!(
            get(local(port), "h", "/a").await.header("x-upstream"),
            Some("b")
        );
    }
    lease_b.release().await;
}

#[tokio::test]
async fn a_burst_of_registrations_arriving_at_once_is_all_routed() {
    // As after an upgrade: many services register at the same moment. Their membership
    // edits are published together, and each is routed once its registration returned.
    let port = free_port();
    let p = proxy_with(port, "5s", "").await;
    let up = upstream("burst").await;
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(channel(&p).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let channel = channels[i % channels.len()].clone();
        let announce = http_announce(&up.address(), port, &format!("/s{i}/"));
        tasks.spawn(async move { (i, client::register(channel, announce, None).await) });
    }
    let mut leases = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, lease) = joined.expect("task");
        let lease = lease.unwrap_or_else(|e| panic!("registration {i}: {e}"));
        let r = get(local(port), "h", &format!("/s{i}/x")).await;
        assert_eq!(
            (r.status, r.header("x-upstream")),
            (200, Some("burst")),
            "{i}"
        );
        leases.push(lease);
    }
    let l = listing(&p).await;
    assert_eq!((l.registrations.len(), l.routes.len()), (200, 200));
    // All leave at once: each route is held, none is lost.
    let mut releases = tokio::task::JoinSet::new();
    for lease in leases {
        releases.spawn(lease.release());
    }
    while releases.join_next().await.is_some() {}
    let l = listing(&p).await;
    assert_eq!(l.registrations.len(), 0);
    assert_eq!(l.routes.len(), 200);
    assert!(l.routes.iter().all(|r| r.instances == 0));
}

#[tokio::test]
async fn requests_wait_through_a_reregistration_and_all_succeed() {
    let port = free_port();
    let p = proxy_with(port, "30s", "").await;
    let a = upstream("a").await;
    let lease = client::register(
        channel(&p).await,
        http_announce(&a.address(), port, "/a"),
        None,
    )
    .await
    .expect("register");
    assert_eq!(get(local(port), "h", "/a").await.status, 200);
    lease.release().await;

    // The route is held: these requests wait instead of failing.
    let mut in_flight = Vec::new();
    for i in 0..5 {
        in_flight.push(tokio::spawn(async move {
            get(local(port), "h", &format!("/a/{i}")).await
        }));
    }
    let mut waiting = 0;
    for _ in 0..200 {
        waiting = listing(&p).await.routes.first().map_or(0, |r| r.waiting);
        if waiting == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(waiting, 5, "all five requests are queued on the held route");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = upstream("b").await;
    let _lease = client::register(
        channel(&p).await,
        http_announce(&b.address(), port, "/a"),
        None,
    )
    .await
    .expect("re-register");
    for request in in_flight {
        let r = request.await.unwrap();
        assert_eq!(
            (r.status, r.header("x-upstream")),
            (200, Some("b")),
            "{}",
            r.text()
        );
    }
    // The metrics saw two registrations, one live now, and five held requests served.
    let text = p.daemon.telemetry().metrics().encode();
    for line in [
        "proxy_registrations_total 2",
        "proxy_registrations_active 1",
        "proxy_held_requests 0",
        "proxy_held_requests_finished_total{result=\"served\"} 5",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} not in:\n{}",
            text.lines()
                .filter(|l| l.contains("regist") || l.contains("held"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test]
async fn a_service_that_never_returns_gets_503_after_the_hold_and_its_port_closes() {
    let port = free_port();
    let p = proxy_with(port, "1s", "").await;
    let a = upstream("a").await;
    let lease = client::register(
        channel(&p).await,
        http_announce(&a.address(), port, "/a"),
        None,
    )
    .await
    .expect("register");
    assert_eq!(get(local(port), "h", "/a").await.status, 200);
    lease.release().await;
    let r = get(local(port), "h", "/a").await;
    assert_eq!(r.status, 503, "{}", r.text());
    // The port was opened only for this registration: it closes once the hold ended.
    assert!(
        port_closes(port).await,
        "the registration's port is closed after the hold"
    );
    assert!(listing(&p).await.routes.is_empty());
}

#[tokio::test]
async fn refused_registrations_say_why() {
    let port = free_port();
    let p = proxy_with(
        port,
        "1s",
        "[[pools]]\nname = \"site\"\nupstreams = [\"127.0.0.1:9\"]\n[[routes]]\nname = \"site\"\nlistener = \"web\"\nhost = \"site.example\"\npool = \"site\"\n",
    )
    .await;
    let refused = |r: Result<client::Lease, ClientError>| match r {
        Err(ClientError::Refused(status)) => status,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let outside = port.checked_add(1).unwrap_or(port - 1);
    let s = refused(
        client::register(
            channel(&p).await,
            http_announce("127.0.0.1:9001", outside, "/a"),
            None,
        )
        .await,
    );
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("port_range"), "{s:?}");

    let claimed = Announce {
        host: "site.example".into(),
        ..http_announce("127.0.0.1:9001", port, "/")
    };
    let s = refused(client::register(channel(&p).await, claimed, None).await);
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("site.example"), "{s:?}");

    let tls = Announce {
        tls_certificate_pem: "-----BEGIN CERTIFICATE-----".into(),
        ..http_announce("127.0.0.1:9001", port, "/")
    };
    let s = refused(client::register(channel(&p).await, tls, None).await);
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().starts_with("announce.tls_private_key_pem"),
        "{s:?}"
    );

    let s = refused(
        client::register(channel(&p).await, http_announce("nowhere", port, "/"), None).await,
    );
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().starts_with("announce.endpoint"), "{s:?}");
    // Nothing was opened for the refused registrations.
    assert!(TcpStream::connect(local(port)).await.is_err());
}

/// An HTTP upstream on a unix socket answering `unix` in `x-upstream`.
async fn unix_upstream(path: &std::path::Path) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nx-upstream: unix\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                    .await;
            });
        }
    })
}

#[tokio::test]
async fn a_unix_socket_endpoint_is_dialed() {
    let port = free_port();
    let p = proxy_with(port, "1s", "").await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("svc.sock");
    let _server = unix_upstream(&sock).await;
    let endpoint = format!("unix:{}", sock.display());
    let _lease = client::register(channel(&p).await, http_announce(&endpoint, port, "/"), None)
        .await
        .expect("register");
    let r = get(local(port), "h", "/anything").await;
    assert_eq!(
        (r.status, r.header("x-upstream"), r.text().as_str()),
        (200, Some("unix"), "ok")
    );
}

/// Echoes bytes back, prefixed once with `name:`.
async fn tcp_service(name: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if s.write_all(format!("{name}:").as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_tcp_connection_waits_for_a_reregistration() {
    let port = free_port();
    let p = proxy_with(port, "30s", "").await;
    let (a, _ta) = tcp_service("a").await;
    let tcp = |endpoint: &str| Announce {
        protocol: RegisteredProtocol::Tcp as i32,
        ..http_announce(endpoint, port, "")
    };
    let lease = client::register(channel(&p).await, tcp(&a), None)
        .await
        .expect("register tcp");
    let mut s = TcpStream::connect(local(port)).await.unwrap();
    let mut hello = [0u8; 2];
    s.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"a:");
    drop(s);
    lease.release().await;

    // Accepted now, forwarded once an instance is back.
    let waiter = tokio::spawn(async move {
        let mut s = TcpStream::connect(local(port)).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        back
    });
    for _ in 0..200 {
        if listing(&p).await.routes.first().map_or(0, |r| r.waiting) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (b, _tb) = tcp_service("b").await;
    let _lease = client::register(channel(&p).await, tcp(&b), None)
        .await
        .expect("re-register tcp");
    assert_eq!(&waiter.await.unwrap(), b"b:hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_cancelled_during_the_writer_round_trip_leaves_nothing_behind() {
    let port = free_port();
    let p = proxy_with(port, "1s", "").await;
    let svc = upstream("svc").await;
    // Hold the state writer busy, so the registration waits for it with its port open,
    // its route booked and its instance counted.
    let (release, writer_busy) = hold_the_writer(&p).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::RegisterRequest {
        kind: Some(pb::register_request::Kind::Announce(http_announce(
            &svc.address(),
            port,
            "/gone",
        ))),
    })
    .await
    .unwrap();
    let mut client = RegistrationServiceClient::new(channel(&p).await);
    let call = tokio::spawn(async move {
        client
            .register(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // The port opens for it once it holds its booking and waits for the writer.
    assert!(
        port_opens(port).await,
        "the port was never opened for the registration"
    );
    assert!(
        !call.is_finished(),
        "the registration cannot finish while the writer is busy"
    );
    // The caller gives up (its call dropped, its stream ended) while the writer has not
    // answered.
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    drop(tx);
    release.send(()).unwrap();
    writer_busy.await.unwrap();

    // Its lease ended, the route was held for `hold` and then went away with its port.
    assert_left_nothing(&p, port, "/gone").await;
}

/// Holds the state writer busy until the returned sender sends (or 30 s pass). Returns once
/// the writer is inside the held change, not merely once it is queued: a call made before
/// that could reach the writer first and finish.
async fn hold_the_writer(
    p: &TestProxy,
) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let (release, blocked) = std::sync::mpsc::channel::<()>();
    let (inside, entered) = tokio::sync::oneshot::channel::<()>();
    let state = p.daemon.state().clone();
    let busy = tokio::spawn(async move {
        state
            .update_membership(move |_| {
                let _ = inside.send(());
                let _ = blocked.recv_timeout(Duration::from_secs(30));
            })
            .await;
    });
    entered.await.expect("the writer runs the held change");
    (release, busy)
}

/// The registration for `port` and `prefix` ended: no registration or route listed (after
/// the hold), its port closed, no route or pool member in the state.
async fn assert_left_nothing(p: &TestProxy, port: u16, prefix: &str) {
    let mut last = None;
    for _ in 0..200 {
        let l = listing(p).await;
        if l.registrations.is_empty() && l.routes.is_empty() {
            last = None;
            break;
        }
        last = Some(l);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last, None, "the ended registration was left behind");
    assert!(port_closes(port).await, "the port opened for it stays open");
    let snap = p.daemon.state().snapshot();
    let membership = snap.state.membership();
    assert_eq!(membership.routes().count(), 0, "its route is still routed");
    assert!(
        membership
            .runtime_upstreams(&format!("registered:{port}:*:{prefix}"))
            .is_empty(),
        "its instance is still a pool member"
    );
}

/// The same, one level down: the task running `Registry::register` is aborted while the
/// writer has not published it (as when the gRPC handler's future is dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_register_call_leaves_nothing_behind() {
    let port = free_port();
    let p = proxy_with(port, "1s", "").await;
    let svc = upstream("svc").await;
    let (release, writer_busy) = hold_the_writer(&p).await;
    let registry = p.daemon.registry().clone();
    let claim = proxy::registration::Claim {
        name: "svc".into(),
        endpoint: svc.address(),
        port,
        protocol: proxy::state::Protocol::Http,
        host: None,
        path_prefix: "/aborted".into(),
        tls: None,
    };
    let call = tokio::spawn(async move { registry.register(claim).await });
    // The port opens once the call holds its booking and waits for the writer.
    assert!(
        port_opens(port).await,
        "the port was never opened for the registration"
    );
    assert!(
        !call.is_finished(),
        "the writer is busy, the call cannot have finished"
    );
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    release.send(()).unwrap();
    writer_busy.await.unwrap();

    assert_left_nothing(&p, port, "/aborted").await;
}
