//! Registrations across upgrades and restarts, with real processes: a service registered
//! through the client library on a port opened for it keeps being served, under load,
//! through two zero-downtime upgrades of proxyd; and the client registers again by itself
//! when the proxy restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;
mod tls_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mgmt_support::{unix_channel, Api};
use proxy::registration::client::{self, Announce, Backoff};
use proxy_proto::v1 as pb;
use proxy_proto::v1::registration_service_client::RegistrationServiceClient;
use tokio::net::TcpStream;

const PROXYD: &str = env!("CARGO_BIN_EXE_proxyd");

fn local(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// A proxyd process; later ones are started by their predecessors' upgrades.
struct Proxyd {
    child: Child,
    dir: tempfile::TempDir,
    current: Option<u32>,
}

impl Proxyd {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("mgmt.sock")
    }

    async fn api(&self) -> Api {
        Api::over(unix_channel(&self.socket()).await)
    }

    async fn pid(&self) -> u32 {
        let mut api = self.api().await;
        api.admin
            .status(pb::StatusRequest::default())
            .await
            .unwrap()
            .into_inner()
            .pid
    }

    async fn upgrade(&mut self) -> u32 {
        let mut api = self.api().await;
        let pid = api
            .admin
            .upgrade(pb::UpgradeRequest { wait: true })
            .await
            .expect("upgrade")
            .into_inner()
            .new_pid;
        self.current = Some(pid);
        pid
    }

    /// Waits (up to 15 s) until one request waits on the first held route.
    async fn wait_until_one_waits(&self) {
        for _ in 0..300 {
            if self.registrations().await.routes[0].waiting == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn registrations(&self) -> pb::ListRegistrationsResponse {
        RegistrationServiceClient::new(unix_channel(&self.socket()).await)
            .list_registrations(pb::ListRegistrationsRequest {})
            .await
            .expect("ListRegistrations")
            .into_inner()
    }
}

impl Drop for Proxyd {
    fn drop(&mut self) {
        if let Some(pid) = self.current {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for_socket(path: &Path) {
    for _ in 0..300 {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never opened", path.display());
}

/// proxyd with one configured listener and registrations allowed on `port` only.
async fn start(port: u16) -> Proxyd {
    start_with_web(port, free_port()).await
}

/// proxyd with an HTTP listener `web` on `web` and registrations allowed on `port` only.
async fn start_with_web(port: u16, web: u16) -> Proxyd {
    start_holding(port, web, "30s").await
}

/// Like [`start_with_web`], with routes held for `hold`.
async fn start_holding(port: u16, web: u16, hold: &str) -> Proxyd {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]
state_dir = \"{dir}\"
mgmt_socket = \"{dir}/mgmt.sock\"
admin_listen = \"\"
executable = \"{PROXYD}\"
upgrade_timeout = \"10s\"
drain_timeout = \"20s\"
log_level = \"warn\"

[registration]
hold = \"{hold}\"
port_range = \"{port}-{port}\"
address = \"127.0.0.1\"
max_wait = \"30s\"
keepalive = \"1s\"

[[listeners]]
name = \"web\"
protocol = \"http\"
address = \"127.0.0.1:{web}\"
",
        dir = dir.path().display(),
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let child = Command::new(PROXYD)
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let d = Proxyd {
        child,
        dir,
        current: None,
    };
    wait_for_socket(&d.socket()).await;
    d
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn count(&self, outcome: Result<(u16, bool), bool>) {
        match outcome {
            Ok((200, _)) => self.ok.fetch_add(1, Ordering::Relaxed),
            _ => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Bounded load: keep-alive requests (retried once on a fresh connection only when a
/// reused one closed before any response byte, as HTTP clients do) or one request per
/// connection, until `stop` or 20,000 requests.
async fn load(port: u16, keep_alive: bool, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let request: &[u8] = if keep_alive {
        b"GET /a/ka HTTP/1.1\r\nHost: svc\r\n\r\n"
    } else {
        b"GET /a/new HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
    };
    let mut conn: Option<TcpStream> = None;
    let mut sent = 0u32;
    while !stop.load(Ordering::Relaxed) && sent < 20_000 {
        sent += 1;
        let reused = conn.is_some();
        let mut stream = match conn.take() {
            Some(s) => s,
            None => match TcpStream::connect(local(port)).await {
                Ok(s) => s,
                Err(_) => {
                    tally.count(Err(false));
                    continue;
                }
            },
        };
        let mut outcome = exchange(&mut stream, request).await;
        if reused && outcome == Err(false) {
            outcome = match TcpStream::connect(local(port)).await {
                Ok(fresh) => {
                    stream = fresh;
                    exchange(&mut stream, request).await
                }
                Err(_) => Err(false),
            };
        }
        if keep_alive && matches!(outcome, Ok((_, false))) {
            conn = Some(stream);
        }
        tally.count(outcome);
    }
}

/// Waits (bounded) until the proxy lists exactly one registration, for `endpoint`.
async fn wait_listed(d: &Proxyd, endpoint: &str) -> pb::ListRegistrationsResponse {
    let mut last = None;
    for _ in 0..300 {
        let listing = d.registrations().await;
        let ours = listing.registrations.len() == 1
            && listing.registrations[0]
                .announce
                .as_ref()
                .is_some_and(|a| a.endpoint == endpoint);
        if ours {
            return listing;
        }
        last = Some(listing);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the registration was never listed: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registration_survives_two_upgrades_under_load() {
    let port = free_port();
    let mut d = start(port).await;
    let svc = upstream("svc").await;
    let channel = client::unix_channel(d.socket()).await.expect("channel");
    let announce = Announce {
        endpoint: svc.address(),
        port: u32::from(port),
        path_prefix: "/a".into(),
        name: "svc".into(),
        ..Default::default()
    };
    let mut lease = client::register(channel, announce, None)
        .await
        .expect("register");
    assert_eq!(lease.registered().address, local(port).to_string());
    let r = get(local(port), "svc", "/a/x").await;
    assert_eq!((r.status, r.header("x-upstream")), (200, Some("svc")));

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for keep_alive in [true, true, false, false] {
        clients.push(tokio::spawn(load(
            port,
            keep_alive,
            stop.clone(),
            tally.clone(),
        )));
    }

    let mut pids = vec![d.pid().await];
    for round in 1..=2u64 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = tally.ok.load(Ordering::Relaxed);
        let new_pid = d.upgrade().await;
        assert!(!pids.contains(&new_pid), "{new_pid} in {pids:?}");
        assert_eq!(d.pid().await, new_pid, "the new process serves the API");
        pids.push(new_pid);
        // The client noticed the end of its stream and registered with the new process.
        let again = tokio::time::timeout(Duration::from_secs(30), lease.registered_after(round))
            .await
            .expect("registered again in time")
            .expect("the lease still runs");
        assert_eq!(again.address, local(port).to_string());
        let listing = wait_listed(&d, &svc.address()).await;
        assert_eq!(listing.routes.len(), 1, "{listing:?}");
        assert_eq!(listing.routes[0].instances, 1, "{listing:?}");
        // Traffic keeps flowing through the new process.
        for _ in 0..300 {
            if tally.ok.load(Ordering::Relaxed) > before + 50 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    assert_eq!(failed, 0, "{failed} failed requests out of {}", ok + failed);
    assert!(ok > 100, "the load ran ({ok} requests)");
    assert_eq!(lease.registrations(), 3);
    let r = get(local(port), "svc", "/a/after").await;
    assert_eq!((r.status, r.header("x-upstream")), (200, Some("svc")));
    lease.release().await;
}

#[tokio::test]
async fn a_route_held_across_an_upgrade_serves_waiting_requests_once_its_service_returns() {
    let port = free_port();
    let mut d = start(port).await;
    let svc = upstream("svc").await;
    let channel = client::unix_channel(d.socket()).await.expect("channel");
    let announce = Announce {
        endpoint: svc.address(),
        port: u32::from(port),
        path_prefix: "/a".into(),
        ..Default::default()
    };
    // The service stops re-registering (released) right before the upgrade; the new
    // process still takes the port over and holds the route.
    let lease = client::register(channel, announce, None)
        .await
        .expect("register");
    lease.release().await;
    d.upgrade().await;
    let listing = d.registrations().await;
    assert!(listing.registrations.is_empty(), "{listing:?}");
    assert_eq!(listing.routes.len(), 1, "the route is held: {listing:?}");
    assert_eq!(listing.routes[0].instances, 0);
    assert!(listing.routes[0].held_until_unix_ms > 0);
    assert!(
        TcpStream::connect(local(port)).await.is_ok(),
        "the new process serves the handed-over port"
    );
    // A request waits on the held route and is served once an instance registers.
    let waiter = tokio::spawn(async move { get(local(port), "svc", "/a/w").await });
    d.wait_until_one_waits().await;
    let channel = client::unix_channel(d.socket()).await.expect("channel");
    let back = Announce {
        endpoint: svc.address(),
        port: u32::from(port),
        path_prefix: "/a".into(),
        ..Default::default()
    };
    let lease = client::register(channel, back, None)
        .await
        .expect("register with the new process");
    let r = waiter.await.unwrap();
    assert_eq!((r.status, r.header("x-upstream")), (200, Some("svc")));
    lease.release().await;
}

#[tokio::test]
async fn a_held_tls_route_keeps_its_certificate_across_an_upgrade() {
    use tls_support::{client_config, get_over, peer_leaf, tls_connect, TestCa};
    let port = free_port();
    let mut d = start(port).await;
    let svc = upstream("svc").await;
    let ca = TestCa::new("handoff test CA");
    let (cert, key) = ca.leaf(&["svc.example"]);
    let announce = Announce {
        endpoint: svc.address(),
        port: u32::from(port),
        host: "svc.example".into(),
        path_prefix: "/slow".into(),
        tls_certificate_pem: cert.clone(),
        tls_private_key_pem: key,
        ..Default::default()
    };
    let channel = client::unix_channel(d.socket()).await.expect("channel");
    let lease = client::register(channel, announce.clone(), None)
        .await
        .expect("register with a certificate");
    let before = {
        let mut s = tls_connect(local(port), "svc.example", client_config(ca.roots(), &[]))
            .await
            .expect("handshake before the upgrade");
        let leaf = peer_leaf(&s);
        assert_eq!(
            get_over(&mut s, "svc.example", "/slow/0").await,
            (200, "svc".to_string())
        );
        leaf
    };
    // The service stops re-registering right before the upgrade: the new process has the
    // port and the route's certificate from the handoff alone.
    lease.release().await;
    d.upgrade().await;
    let roots = ca.pem.clone();
    let waiter = tokio::spawn(async move {
        let mut s = tls_connect(
            local(port),
            "svc.example",
            client_config(tls_support::roots_from_pem(&roots), &[]),
        )
        .await
        .expect("handshake with the new process while the route is held");
        let leaf = peer_leaf(&s);
        (leaf, get_over(&mut s, "svc.example", "/slow/0").await)
    });
    d.wait_until_one_waits().await;
    let channel = client::unix_channel(d.socket()).await.expect("channel");
    let lease = client::register(channel, announce, None)
        .await
        .expect("register with the new process");
    let (leaf, answer) = waiter.await.unwrap();
    assert_eq!(leaf, before, "the handed-over certificate was presented");
    assert_eq!(answer, (200, "svc".to_string()));
    lease.release().await;
}

#[tokio::test]
async fn a_route_on_a_configured_listener_is_held_across_an_upgrade() {
    let port = free_port();
    // The registration joins the configured listener `web` on its port.
    let mut d = start_with_web(port, port).await;
    let svc = upstream("svc").await;
    let announce = Announce {
        endpoint: svc.address(),
        port: u32::from(port),
        path_prefix: "/a".into(),
        ..Default::default()
    };
    let channel = client::unix_channel(d.socket()).await.expect("channel");
    let lease = client::register(channel, announce.clone(), None)
        .await
        .expect("register on the configured listener");
    let r = get(local(port), "svc", "/a/before").await;
    assert_eq!((r.status, r.header("x-upstream")), (200, Some("svc")));
    let listing = d.registrations().await;
    assert_eq!(listing.routes[0].listener, "web", "{listing:?}");
    // Released right before the upgrade: only the handoff tells the new process about it.
    lease.release().await;
    d.upgrade().await;
    let listing = d.registrations().await;
    assert_eq!(listing.routes.len(), 1, "the route is held: {listing:?}");
    assert_eq!(listing.routes[0].listener, "web");
    assert_eq!(listing.routes[0].instances, 0);
    let waiter = tokio::spawn(async move { get(local(port), "svc", "/a/w").await });
    d.wait_until_one_waits().await;
    assert_eq!(
        d.registrations().await.routes[0].waiting,
        1,
        "the request waits"
    );
    let channel = client::unix_channel(d.socket()).await.expect("channel");
    let lease = client::register(channel, announce, None)
        .await
        .expect("register with the new process");
    let r = waiter.await.unwrap();
    assert_eq!((r.status, r.header("x-upstream")), (200, Some("svc")));
    lease.release().await;
}

#[tokio::test]
async fn the_client_registers_again_after_the_proxy_restarts() {
    let port = free_port();
    let config = format!(
        "{WEB}\n[registration]\nhold = \"5s\"\nport_range = \"{port}-{port}\"\naddress = \"127.0.0.1\"\nkeepalive = \"1s\"\n"
    );
    let p = start_proxy(&config).await;
    let socket = mgmt_support::socket_path(&p);
    let svc = upstream("svc").await;
    let channel = client::unix_channel(&socket).await.expect("channel");
    let announce = Announce {
        endpoint: svc.address(),
        port: u32::from(port),
        path_prefix: "/a".into(),
        ..Default::default()
    };
    let backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(400),
    };
    let mut lease = client::register_with(channel, announce, None, backoff)
        .await
        .expect("register");
    assert_eq!(get(local(port), "svc", "/a").await.status, 200);

    // The proxy stops: the stream ends, and the client keeps trying while nothing listens.
    let TestProxy { daemon, dir } = p;
    daemon.stop().await;
    for _ in 0..200 {
        if !lease.is_registered() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!lease.is_registered(), "the lease saw its stream end");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(TcpStream::connect(local(port)).await.is_err());

    // A new proxy on the same socket: the client registers with it by itself.
    let p = start_proxy_in(dir, &config).await;
    let again = tokio::time::timeout(Duration::from_secs(30), lease.registered_after(1))
        .await
        .expect("registered again in time")
        .expect("the lease still runs");
    assert_eq!(again.address, local(port).to_string());
    let r = get(local(port), "svc", "/a/x").await;
    assert_eq!((r.status, r.header("x-upstream")), (200, Some("svc")));
    let listed = RegistrationServiceClient::new(unix_channel(&socket).await)
        .list_registrations(pb::ListRegistrationsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.registrations.len(), 1);
    lease.release().await;
    p.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_hands_over_a_thousand_registered_tls_routes() {
    use rustls::pki_types::pem::PemObject;
    use tls_support::{client_config, peer_leaf, tls_connect, TestCa};
    const ROUTES: usize = 1000;
    let port = free_port();
    // Held long enough for the test to register, release and upgrade everything.
    let mut d = start_holding(port, free_port(), "600s").await;
    let old = d.pid().await;
    let svc = upstream("svc").await;
    let ca = TestCa::new("thousand routes CA");
    let leaves: Vec<(String, String)> = (0..ROUTES)
        .map(|i| ca.leaf(&[&format!("svc{i}.example")]))
        .collect();
    // Ten connections, each registering 100 services one after the other.
    let mut groups = Vec::new();
    for (g, chunk) in leaves.chunks(100).enumerate() {
        let channel = client::unix_channel(d.socket()).await.expect("channel");
        let endpoint = svc.address();
        let chunk = chunk.to_vec();
        groups.push(tokio::spawn(async move {
            let mut leases = Vec::new();
            for (j, (cert, key)) in chunk.into_iter().enumerate() {
                let announce = Announce {
                    endpoint: endpoint.clone(),
                    port: u32::from(port),
                    host: format!("svc{}.example", g * 100 + j),
                    path_prefix: "/".into(),
                    tls_certificate_pem: cert,
                    tls_private_key_pem: key,
                    ..Default::default()
                };
                leases.push(
                    client::register(channel.clone(), announce, None)
                        .await
                        .expect("register"),
                );
            }
            leases
        }));
    }
    let mut leases = Vec::new();
    for group in groups {
        leases.extend(group.await.unwrap());
    }
    assert_eq!(d.registrations().await.routes.len(), ROUTES);
    // The services go away: the new process has the routes and their certificates from
    // the handoff alone.
    futures_util::future::join_all(leases.into_iter().map(|l| l.release())).await;
    // Bounded wait until the proxy has taken every instance out.
    for _ in 0..1200 {
        if d.registrations().await.registrations.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new = d.upgrade().await;
    assert_ne!(new, old);
    let listing = d.registrations().await;
    assert_eq!(
        listing.routes.len(),
        ROUTES,
        "every route is held by the new process"
    );
    assert!(listing.registrations.is_empty());
    for i in [0, 1, ROUTES / 2, ROUTES - 1] {
        let name = format!("svc{i}.example");
        let stream = tls_connect(local(port), &name, client_config(ca.roots(), &[]))
            .await
            .unwrap_or_else(|e| panic!("handshake for {name} with the new process: {e}"));
        let expected = rustls::pki_types::CertificateDer::from_pem_slice(leaves[i].0.as_bytes())
            .expect("leaf");
        assert_eq!(peer_leaf(&stream), expected.as_ref(), "{name}");
    }
}
