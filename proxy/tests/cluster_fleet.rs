//! Fleet mode (`[cluster]`) against real etcd (Debian `etcd-server`, binary `etcd`) and
//! in-process proxyd nodes on 127.0.0.1: a route created on one node is served by the
//! others, concurrent writers lose nothing and conflicts are ABORTED, an etcd outage
//! leaves every node serving (stale, writes UNAVAILABLE, a restarted node serving from
//! SQLite) and they converge when etcd is back, and compaction past a stopped node's
//! revision makes it read everything again.
//!
//! Without an `etcd` binary the tests are skipped, except under `./scripts/test` (and CI),
//! where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;
mod tls_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use mgmt_support::{connect, create_pool, create_route, pool_msg, route_msg, Api};
use proxy::etcd::Client;
use proxy_proto::v1 as pb;
use proxy_proto::v1::cluster_service_client::ClusterServiceClient;
use proxy_proto::v1::tls_service_client::TlsServiceClient;
use tonic::Code;

fn etcd_binary() -> Option<PathBuf> {
    external_program("etcd", "Debian package etcd-server")
}

/// One etcd member on loopback.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// An etcd cluster of one or more members on loopback; stopped when dropped.
struct Etcd {
    binary: PathBuf,
    dir: PathBuf,
    members: Vec<Member>,
}

impl Etcd {
    async fn start(binary: PathBuf, dir: &Path, size: usize) -> Etcd {
        let members = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut etcd = Etcd {
            binary,
            dir: dir.to_path_buf(),
            members,
        };
        for i in 0..size {
            etcd.spawn(i);
        }
        etcd.wait_ready().await;
        etcd
    }

    fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    fn spawn(&mut self, i: usize) {
        let initial = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(&self.binary)
            .args(["--name", &m.name, "--data-dir"])
            .arg(self.dir.join(format!("data-{}", m.name)))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
            ])
            .args(["--initial-cluster-token", "fleet-test"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("etcd-{}.log", m.name))).unwrap())
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    async fn wait_ready(&self) {
        for _ in 0..300 {
            if let Ok(mut c) = Client::connect(&self.endpoints()).await {
                if c.put(b"/probe", b"1", 0).await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("etcd did not become ready; see {}", self.dir.display());
    }

    fn stop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn restart(&mut self) {
        for i in 0..self.members.len() {
            self.spawn(i);
        }
        self.wait_ready().await;
    }

    async fn client(&self) -> Client {
        Client::connect(&self.endpoints())
            .await
            .expect("etcd client")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A node's config: listener `web`, the admin listener, `[cluster]` on `endpoints`.
fn node_config(name: &str, endpoints: &[String], extra: &str) -> String {
    let endpoints = endpoints
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[server]\nstate_dir = \"{{state}}\"\nadmin_listen = \"127.0.0.1:0\"\n\n\
         [[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:0\"\n\n\
         {extra}\n\
         [cluster]\nnode_name = \"{name}\"\netcd = {{ endpoints = [{endpoints}], prefix = \"/proxy/test\" }}\n"
    )
}

/// Starts a node and waits until it has reached etcd: until then the fleet's writes are
/// refused UNAVAILABLE ("not connected yet"), which is not what these tests are about.
async fn start_node(name: &str, endpoints: &[String], extra: &str) -> TestProxy {
    let node = start_proxy(&node_config(name, endpoints, extra)).await;
    let api = connect(&node).await;
    eventually(&format!("{name} connects to etcd"), || {
        let mut api = api.clone();
        async move { cluster_state(&mut api).await.connected }
    })
    .await;
    node
}

async fn restart_node(dir: tempfile::TempDir, name: &str, endpoints: &[String]) -> TestProxy {
    start_proxy_in(dir, &node_config(name, endpoints, "")).await
}

/// Polls `check` every 50 ms until it holds; fails after 30 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn cluster_state(api: &mut Api) -> pb::ClusterState {
    api.admin
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .cluster
        .expect("status has the cluster part in fleet mode")
}

async fn serves(node: &TestProxy, host: &str, upstream: &str) -> bool {
    let r = get(node.addr("web"), host, "/").await;
    r.status == 200 && r.header("x-upstream") == Some(upstream)
}

async fn admin_text(node: &TestProxy, path: &str) -> (u16, String) {
    let r = get(
        node.daemon.admin_address().expect("admin listener"),
        "localhost",
        path,
    )
    .await;
    (r.status, r.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_created_on_one_node_is_served_by_the_others() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path(), 3).await;
    let endpoints = etcd.endpoints();
    let app = upstream("app").await;
    let local = upstream("local").await;
    // Node c's own config file has a pool named like the fleet's: the file wins on c.
    let c_file = format!(
        "[[pools]]\nname = \"app\"\nupstreams = [\"{}\"]\n",
        local.address()
    );
    let a = start_node("a", &endpoints, "").await;
    let b = start_node("b", &endpoints, "").await;
    let c = start_node("c", &endpoints, &c_file).await;
    let mut api_a = connect(&a).await;

    create_pool(&mut api_a, pool_msg("app", &[app.address()])).await;
    create_route(&mut api_a, route_msg("site", "example.com", "/", "app")).await;
    // Read-your-writes on the node called: served as soon as the call returned.
    assert!(serves(&a, "example.com", "app").await);
    eventually("b serves the route made on a", || {
        serves(&b, "example.com", "app")
    })
    .await;
    eventually("c serves the route with its own pool", || {
        serves(&c, "example.com", "local")
    })
    .await;

    let mut api_c = connect(&c).await;
    let state_c = cluster_state(&mut api_c).await;
    assert_eq!(state_c.node_name, "c");
    assert!(state_c.connected && !state_c.stale, "{state_c:?}");
    let shadowed: Vec<_> = state_c
        .shadowed
        .iter()
        .map(|o| (o.kind.as_str(), o.name.as_str()))
        .collect();
    assert_eq!(shadowed, [("pool", "app")]);
    // The API cannot change c's own pool, on c.
    let err = api_c
        .pools
        .delete_pool(pb::DeletePoolRequest { name: "app".into() })
        .await
        .expect_err("c's config file owns pool app");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Membership: every node has its lease key; the lag is small and the versions shown.
    let mut cluster = ClusterServiceClient::new(api_a.channel.clone());
    eventually("three nodes listed", || {
        let mut cluster = cluster.clone();
        async move {
            let r = cluster
                .cluster_status(pb::ClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            r.nodes.len() == 3
        }
    })
    .await;
    eventually("every node has applied a revision", || {
        let mut cluster = cluster.clone();
        async move {
            let r = cluster
                .cluster_status(pb::ClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            r.nodes.iter().all(|n| n.applied_revision > 0)
        }
    })
    .await;
    let fleet = cluster
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = fleet.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(fleet
        .nodes
        .iter()
        .all(|n| n.version == env!("CARGO_PKG_VERSION")));
    assert_eq!(fleet.nodes.iter().filter(|n| n.self_).count(), 1);
    assert!(fleet.nodes[0].self_);
    assert!(fleet
        .nodes
        .iter()
        .all(|n| n.lag >= 0 && n.applied_revision <= fleet.etcd_revision));

    // /metrics has the applied revision and the lag; /readyz is plainly ready.
    let (_, metrics) = admin_text(&b, "/metrics").await;
    assert!(
        metrics.contains("proxy_cluster_applied_revision "),
        "{metrics}"
    );
    assert!(metrics.contains("proxy_cluster_lag_writes "), "{metrics}");
    assert!(metrics.contains("proxy_cluster_connected 1"), "{metrics}");
    assert_eq!(
        admin_text(&b, "/readyz").await,
        (200, "ready\n".to_string())
    );

    // A deletion on b reaches a and c.
    let mut api_b = connect(&b).await;
    api_b
        .routes
        .delete_route(pb::DeleteRouteRequest {
            name: "site".into(),
        })
        .await
        .expect("delete on b");
    for node in [&a, &c] {
        eventually("the deletion reaches every node", || async {
            get(node.addr("web"), "example.com", "/").await.status == 404
        })
        .await;
    }
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_lose_no_update_and_conflicts_are_aborted() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path(), 1).await;
    let endpoints = etcd.endpoints();
    let a = start_node("a", &endpoints, "").await;
    let b = start_node("b", &endpoints, "").await;
    let mut api_a = connect(&a).await;
    create_pool(&mut api_a, pool_msg("shared", &[])).await;
    let mut api_b = connect(&b).await;
    eventually("b has the pool", || {
        let mut api = api_b.clone();
        async move {
            api.pools
                .get_pool(pb::GetPoolRequest {
                    name: "shared".into(),
                })
                .await
                .is_ok()
        }
    })
    .await;

    // Writers on both nodes each add their own upstreams to the same pool: every write
    // reads the pool and writes it back whole, so a lost update would drop an upstream.
    let mut aborted = 0usize;
    let mut expected = Vec::new();
    for round in 0..20 {
        let mut tasks = Vec::new();
        for w in 0..8 {
            let mut api = if w % 2 == 0 {
                api_a.clone()
            } else {
                api_b.clone()
            };
            let address = format!("127.0.0.{}:{}", 1 + w, 10000 + round);
            expected.push(address.clone());
            tasks.push(tokio::spawn(async move {
                let mut conflicts = 0;
                loop {
                    let r = api
                        .pools
                        .add_upstream(pb::AddUpstreamRequest {
                            pool: "shared".into(),
                            upstream: Some(pb::Upstream {
                                address: address.clone(),
                                weight: 1,
                                ..Default::default()
                            }),
                        })
                        .await;
                    match r {
                        Ok(_) => return conflicts,
                        Err(s) if s.code() == Code::Aborted => {
                            assert!(s.message().contains("conflict"), "{s:?}");
                            conflicts += 1;
                        }
                        Err(s) => panic!("unexpected error: {s:?}"),
                    }
                }
            }));
        }
        for t in tasks {
            aborted += t.await.unwrap();
        }
        if aborted > 0 && round >= 2 {
            break;
        }
    }
    assert!(
        aborted > 0,
        "concurrent writers on two nodes never conflicted"
    );
    expected.sort();
    for api in [&mut api_a, &mut api_b] {
        let want = expected.clone();
        let api = api.clone();
        eventually("every upstream written by every writer is there", || {
            let mut api = api.clone();
            let want = want.clone();
            async move {
                let pool = api
                    .pools
                    .get_pool(pb::GetPoolRequest {
                        name: "shared".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .pool
                    .unwrap();
                let mut have: Vec<_> = pool.upstreams.into_iter().map(|u| u.address).collect();
                have.sort();
                have == want
            }
        })
        .await;
    }
    // Creating the same name on two nodes at once: one wins, the other is told.
    let (mut routes_a, mut routes_b) = (api_a.routes.clone(), api_b.routes.clone());
    let (ra, rb) = tokio::join!(
        routes_a.create_route(pb::CreateRouteRequest {
            route: Some(route_msg("same", "a.example", "/", "shared"))
        }),
        routes_b.create_route(pb::CreateRouteRequest {
            route: Some(route_msg("same", "b.example", "/", "shared"))
        }),
    );
    let outcomes = [ra.map(|_| ()), rb.map(|_| ())];
    assert_eq!(
        outcomes.iter().filter(|r| r.is_ok()).count(),
        1,
        "{outcomes:?}"
    );
    let loser = outcomes.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(
        matches!(loser.code(), Code::Aborted | Code::AlreadyExists),
        "{loser:?}"
    );
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_nodes_serve_stale_refuse_writes_and_converge_when_it_returns() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(binary, dir.path(), 1).await;
    let endpoints = etcd.endpoints();
    let app = upstream("app").await;
    let a = start_node("a", &endpoints, "").await;
    let b = start_node("b", &endpoints, "").await;
    let mut api_a = connect(&a).await;
    create_pool(&mut api_a, pool_msg("app", &[app.address()])).await;
    create_route(&mut api_a, route_msg("site", "example.com", "/", "app")).await;
    eventually("b serves the route", || serves(&b, "example.com", "app")).await;

    etcd.stop();
    for node in [&a, &b] {
        let mut api = connect(node).await;
        eventually("the node notices etcd is gone", || {
            let mut api = api.clone();
            async move { cluster_state(&mut api).await.stale }
        })
        .await;
        assert!(serves(node, "example.com", "app").await);
        let (status, body) = admin_text(node, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("ready (stale: etcd unreachable"), "{body}");
        let err = api
            .routes
            .create_route(pb::CreateRouteRequest {
                route: Some(route_msg("other", "other.example", "/", "app")),
            })
            .await
            .expect_err("no fleet write without etcd");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains("etcd is unreachable"), "{err:?}");
    }

    // b restarts while etcd is down: it serves what SQLite holds, and says it is stale.
    let b_dir = {
        let TestProxy { daemon, dir } = b;
        daemon.stop().await;
        dir
    };
    let b = restart_node(b_dir, "b", &endpoints).await;
    assert!(serves(&b, "example.com", "app").await);
    let mut api_b = connect(&b).await;
    let state = cluster_state(&mut api_b).await;
    assert!(state.stale && !state.connected, "{state:?}");
    assert!(state.applied_revision > 0, "{state:?}");
    assert!(!state.last_error.is_empty(), "{state:?}");

    // etcd is back: both nodes follow it again without a restart, b resuming from the
    // revision it had stored, and a write made meanwhile reaches both.
    etcd.restart().await;
    for api in [&mut api_a, &mut api_b] {
        let api = api.clone();
        eventually("the node reconnects", || {
            let mut api = api.clone();
            async move { cluster_state(&mut api).await.connected }
        })
        .await;
    }
    let state = cluster_state(&mut api_b).await;
    assert_eq!((state.full_syncs, state.resumes), (0, 1), "{state:?}");
    let other = upstream("other").await;
    create_pool(&mut api_b, pool_msg("other", &[other.address()])).await;
    create_route(
        &mut api_b,
        route_msg("other", "other.example", "/", "other"),
    )
    .await;
    eventually("a serves the route made on b", || {
        serves(&a, "other.example", "other")
    })
    .await;
    eventually("both nodes at the same etcd revision", || {
        let (mut x, mut y) = (api_a.clone(), api_b.clone());
        async move {
            let (x, y) = (cluster_state(&mut x).await, cluster_state(&mut y).await);
            x.applied_revision == y.applied_revision && !x.stale && !y.stale
        }
    })
    .await;
    assert_eq!(admin_text(&a, "/readyz").await.1, "ready\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_a_stopped_node_revision_makes_it_read_everything_again() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path(), 1).await;
    let endpoints = etcd.endpoints();
    let app = upstream("app").await;
    let a = start_node("a", &endpoints, "").await;
    let b = start_node("b", &endpoints, "").await;
    let mut api_a = connect(&a).await;
    create_pool(&mut api_a, pool_msg("app", &[app.address()])).await;
    create_route(&mut api_a, route_msg("old", "old.example", "/", "app")).await;
    eventually("b serves the first route", || {
        serves(&b, "old.example", "app")
    })
    .await;

    let b_dir = {
        let TestProxy { daemon, dir } = b;
        daemon.stop().await;
        dir
    };
    // While b is down: one route goes, another comes, and the history is compacted away.
    api_a
        .routes
        .delete_route(pb::DeleteRouteRequest { name: "old".into() })
        .await
        .unwrap();
    create_route(&mut api_a, route_msg("new", "new.example", "/", "app")).await;
    let mut kv = etcd.client().await;
    let revision = kv.put(b"/probe", b"2", 0).await.unwrap();
    kv.compact(revision).await.unwrap();

    let b = restart_node(b_dir, "b", &endpoints).await;
    let mut api_b = connect(&b).await;
    eventually("b read the fleet again", || {
        let mut api = api_b.clone();
        async move {
            let s = cluster_state(&mut api).await;
            s.connected && s.full_syncs == 1
        }
    })
    .await;
    assert!(serves(&b, "new.example", "app").await);
    assert_eq!(get(b.addr("web"), "old.example", "/").await.status, 404);
    let state = cluster_state(&mut api_b).await;
    assert_eq!(state.resumes, 0, "{state:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_guarded_transactions_lease_keep_alive_and_watch_progress() {
    use proxy::etcd::{EtcdError, Op, TxnOutcome, Unchanged};
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path(), 1).await;
    let mut kv = etcd.client().await;

    // A transaction commits only while every guard holds.
    let absent = [Unchanged {
        key: b"/t/a".to_vec(),
        mod_revision: 0,
    }];
    let put = |v: &[u8]| {
        vec![
            Op::Put {
                key: b"/t/a".to_vec(),
                value: v.to_vec(),
                lease: 0,
            },
            Op::Delete {
                key: b"/t/b".to_vec(),
            },
        ]
    };
    let TxnOutcome::Committed(first) = kv.txn(&absent, put(b"1")).await.unwrap() else {
        panic!("the key was absent")
    };
    assert!(matches!(
        kv.txn(&absent, put(b"2")).await.unwrap(),
        TxnOutcome::Conflict(r) if r == first
    ));
    assert_eq!(kv.get(b"/t/a").await.unwrap().unwrap().value, b"1");
    let held = [Unchanged {
        key: b"/t/a".to_vec(),
        mod_revision: first,
    }];
    let TxnOutcome::Committed(second) = kv.txn(&held, put(b"3")).await.unwrap() else {
        panic!("the guard held")
    };
    assert!(second > first);
    assert_eq!(kv.get(b"/t/a").await.unwrap().unwrap().mod_revision, second);

    // A lease kept alive keeps its key; once revoked, keep-alive says it expired.
    let lease = kv.grant_lease(Duration::from_secs(5)).await.unwrap();
    let mut alive = kv.keep_alive(lease).await.unwrap();
    kv.put(b"/t/node", b"x", lease).await.unwrap();
    assert!(alive.refresh().await.unwrap() > Duration::ZERO);
    kv.revoke_lease(lease).await.unwrap();
    assert!(kv.get(b"/t/node").await.unwrap().is_none());
    assert!(matches!(
        alive.refresh().await,
        Err(EtcdError::LeaseExpired(id)) if id == lease
    ));

    // A progress request on an idle watch (one with no history to catch up on: etcd 3.4
    // answers progress requests even before a watch has caught up) reports the store's
    // revision, with no events.
    let now = kv.put(b"/elsewhere", b"1", 0).await.unwrap();
    let mut watch = kv.watch_prefix(b"/t/", now + 1).await.unwrap();
    watch.request_progress().await.unwrap();
    let batch = watch.next_batch().await.unwrap();
    assert!(batch.events.is_empty(), "{batch:?}");
    assert!(batch.revision >= now, "{batch:?}");
    assert_eq!(kv.revision().await.unwrap(), now);

    // Watching from a compacted revision is reported as such.
    assert!(kv.has_revision(b"/t/", first).await.unwrap());
    kv.compact(now).await.unwrap();
    assert!(!kv.has_revision(b"/t/", first).await.unwrap());
    assert!(kv.has_revision(b"/t/", now).await.unwrap());
    let compacted = match kv.watch_prefix(b"/t/", first).await {
        Err(e) => e,
        Ok(mut w) => w.next_batch().await.unwrap_err(),
    };
    assert!(
        matches!(compacted, EtcdError::Compacted { compact_revision } if compact_revision == now),
        "{compacted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_speaks_tls_with_a_client_certificate() {
    use proxy::etcd::Tls;
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = tls_support::TestCa::new("etcd test CA");
    let (server_cert, server_key) = ca.leaf(&["localhost"]);
    let (client_cert, client_key) = ca.leaf(&["proxyd"]);
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (ca_file, cert_file, key_file) = (
        write("ca.pem", &ca.pem),
        write("server.pem", &server_cert),
        write("server.key", &server_key),
    );
    let (client_port, peer_port) = (free_port(), free_port());
    let client_url = format!("https://localhost:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut child = Command::new(binary)
        .args(["--name", "tls", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &format!("https://127.0.0.1:{client_port}"),
        ])
        .args(["--advertise-client-urls", &client_url])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("tls={peer}")])
        .arg("--cert-file")
        .arg(&cert_file)
        .arg("--key-file")
        .arg(&key_file)
        .arg("--trusted-ca-file")
        .arg(&ca_file)
        .arg("--client-cert-auth")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("etcd.log")).unwrap())
        .spawn()
        .expect("start etcd");
    let tls = Tls {
        ca_pem: ca.pem.clone().into_bytes(),
        identity: Some((client_cert.into_bytes(), client_key.into_bytes())),
    };
    let endpoints = [client_url.clone()];
    let mut written = None;
    for _ in 0..300 {
        if let Ok(mut c) = Client::connect_with(&endpoints, Some(&tls)).await {
            if let Ok(revision) = c.put(b"/tls/probe", b"ok", 0).await {
                written = Some((c, revision));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut c, revision) = written.unwrap_or_else(|| {
        panic!(
            "no TLS connection to etcd; see {}",
            dir.path().join("etcd.log").display()
        )
    });
    let kv = c.get(b"/tls/probe").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (&b"ok"[..], revision)
    );
    // Without the client certificate etcd refuses the connection's calls.
    let anonymous = Tls {
        ca_pem: ca.pem.clone().into_bytes(),
        identity: None,
    };
    let refused = match Client::connect_with(&endpoints, Some(&anonymous)).await {
        Err(_) => true,
        Ok(mut c) => c.get(b"/tls/probe").await.is_err(),
    };
    assert!(refused, "etcd accepted a client without a certificate");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_after_each_etcd_member_is_killed_and_no_acknowledged_write_is_lost() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(binary, dir.path(), 3).await;
    let endpoints = etcd.endpoints();
    let a = start_node("a", &endpoints, "").await;
    let b = start_node("b", &endpoints, "").await;
    let mut api_a = connect(&a).await;
    create_pool(&mut api_a, pool_msg("app", &[])).await;
    let mut acknowledged = Vec::new();
    // Each member in turn (so the leader among them) is killed; writes made meanwhile are
    // retried until acknowledged, then the member comes back.
    for victim in 0..3 {
        etcd.kill(victim);
        for i in 0..4 {
            let name = format!("r{victim}-{i}");
            let mut done = false;
            for _ in 0..600 {
                let r = api_a
                    .routes
                    .create_route(pb::CreateRouteRequest {
                        route: Some(route_msg(&name, &format!("{name}.example"), "/", "app")),
                    })
                    .await;
                match r {
                    Ok(_) => done = true,
                    // An earlier attempt whose answer was lost did commit.
                    Err(s) if s.code() == Code::AlreadyExists => done = true,
                    Err(s) if matches!(s.code(), Code::Unavailable | Code::Aborted) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(s) => panic!("unexpected error for {name}: {s:?}"),
                }
                break;
            }
            assert!(done, "{name} was never acknowledged");
            acknowledged.push(name);
        }
        etcd.spawn(victim);
        etcd.wait_ready().await;
    }
    let mut api_b = connect(&b).await;
    for api in [&mut api_a, &mut api_b] {
        let want = acknowledged.clone();
        let api = api.clone();
        eventually("every acknowledged route on both nodes", || {
            let mut api = api.clone();
            let want = want.clone();
            async move {
                let routes = api
                    .routes
                    .list_routes(pb::ListRoutesRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .routes;
                want.iter().all(|n| routes.iter().any(|r| &r.name == n))
            }
        })
        .await;
    }
}

/// `proxyd` as a real process: a fleet node with on-demand certificates from pebble.
struct ProcessNode {
    name: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    web: u16,
    secure: u16,
    admin: u16,
}

impl Drop for ProcessNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The loopback ports of a [`ProcessNode`], chosen before it starts.
#[derive(Clone, Copy)]
struct NodePorts {
    web: u16,
    secure: u16,
    admin: u16,
}

impl NodePorts {
    fn pick() -> NodePorts {
        NodePorts {
            web: free_port(),
            secure: free_port(),
            admin: free_port(),
        }
    }
}

impl ProcessNode {
    /// Starts node `name` on fresh ports; on-demand issuance for `*.fleet.test` from the
    /// pebble at `directory`, and `[cluster]` on `endpoints`.
    async fn start(
        name: &str,
        endpoints: &[String],
        directory: &str,
        ca_file: &Path,
        app: &Upstream,
    ) -> ProcessNode {
        ProcessNode::start_on(
            NodePorts::pick(),
            name,
            endpoints,
            directory,
            ca_file,
            app,
            "",
        )
        .await
    }

    /// [`start`](Self::start) on `ports`, with `acme` added to the `[tls.acme]` section.
    async fn start_on(
        ports: NodePorts,
        name: &str,
        endpoints: &[String],
        directory: &str,
        ca_file: &Path,
        app: &Upstream,
        acme: &str,
    ) -> ProcessNode {
        let dir = tempfile::tempdir().unwrap();
        let NodePorts { web, secure, admin } = ports;
        let endpoints = endpoints
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            r#"[server]
state_dir = "{state}"
mgmt_socket = "{state}/mgmt.sock"
admin_listen = "127.0.0.1:{admin}"

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:{web}"

[[listeners]]
name = "secure"
protocol = "https"
address = "127.0.0.1:{secure}"

{pool}
[[routes]]
name = "app"
listener = "secure"
pool = "app"

[tls.acme]
directory = "{directory}"
ca_file = "{ca_file}"
contact = ["mailto:ops@example.test"]
challenges = ["http-01"]
{acme}

[tls.on_demand]
enabled = true
allow = ["*.fleet.test"]
max_orders_per_hour = 50

[cluster]
node_name = "{name}"
etcd = {{ endpoints = [{endpoints}], prefix = "/proxy/acme" }}
"#,
            state = dir.path().display(),
            pool = pool("app", &[app]),
            ca_file = ca_file.display(),
        );
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_proxyd"))
            .arg("--config")
            .arg(&path)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("proxyd.log")).unwrap())
            .spawn()
            .expect("start proxyd");
        let node = ProcessNode {
            name: name.to_string(),
            child: Some(child),
            dir,
            web,
            secure,
            admin,
        };
        let ready: std::net::SocketAddr = format!("127.0.0.1:{}", node.admin).parse().unwrap();
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(ready).await.is_ok()
                && get(ready, "localhost", "/readyz").await.status == 200
            {
                return node;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("node {name} did not become ready:\n{}", node.log());
    }

    fn secure(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.secure).parse().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxyd.log")).unwrap_or_default()
    }

    /// Orders this node created on the ACME server (its log line per order).
    fn orders(&self) -> usize {
        self.log().matches("certificate ordered").count()
    }

    /// SIGKILL: no shutdown code runs, so the node's leases only go when they run out.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn logs(nodes: &[&ProcessNode]) -> String {
    nodes
        .iter()
        .map(|n| format!("--- node {} ---\n{}", n.name, n.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A TCP gate in front of a port: connections are held until it opens, then forwarded.
/// It counts the connections it received.
struct Gate {
    port: u16,
    open: tokio::sync::watch::Sender<bool>,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Gate {
    async fn start(target: u16) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, opened) = tokio::sync::watch::channel(false);
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut opened = opened.clone();
                tokio::spawn(async move {
                    if opened.wait_for(|o| *o).await.is_err() {
                        return;
                    }
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Gate { port, open, seen }
    }

    fn seen(&self) -> usize {
        self.seen.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn pebble_programs() -> bool {
    tls_support::require("pebble") && tls_support::require("pebble-challtestsrv")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_order_loses_the_lock_with_its_lease_and_another_completes() {
    use tls_support::{api_ca, client_config, roots_from_pem, tls_connect};
    let Some(binary) = etcd_binary() else { return };
    if !pebble_programs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path(), 1).await;
    let endpoints = etcd.endpoints();
    let app = upstream("app").await;
    let pebble_dir = tempfile::tempdir().unwrap();
    let ports = tls_support::PebblePorts::pick();
    let (ca, ca_file) = api_ca(pebble_dir.path());
    let directory = ports.directory();
    let a = ProcessNode::start("a", &endpoints, &directory, &ca_file, &app).await;
    let mut b = ProcessNode::start("b", &endpoints, &directory, &ca_file, &app).await;
    let c = ProcessNode::start("c", &endpoints, &directory, &ca_file, &app).await;
    // The CA validates through a gate in front of node a, closed for now: an order waits
    // there, mid-way, with its lock held.
    let gate = Gate::start(a.web).await;
    let pebble =
        tls_support::Pebble::start(ports, pebble_dir, ca, ca_file, gate.port, a.secure).await;
    let roots = roots_from_pem(&pebble.root_pem().await);
    let client = client_config(roots, &[b"http/1.1"]);
    let lock_key = b"/proxy/acme/acme/locks/crash.fleet.test";

    let doomed = tokio::spawn({
        let (addr, client) = (b.secure(), client.clone());
        async move { tls_connect(addr, "crash.fleet.test", client).await.is_ok() }
    });
    let mut etcd_client = etcd.client().await;
    eventually(
        "b holds the lock and the CA is validating its order",
        || {
            let mut etcd_client = etcd_client.clone();
            let validating = gate.seen() > 0;
            async move {
                let held = etcd_client.get(lock_key).await.unwrap();
                validating && held.is_some_and(|kv| kv.value == b"b")
            }
        },
    )
    .await;
    assert_eq!(pebble.order_requests(), 1);
    b.kill();
    assert!(!doomed.await.unwrap(), "b's client cannot have been served");
    let held = etcd_client.get(lock_key).await.unwrap();
    assert!(
        held.is_some_and(|kv| kv.lease != 0),
        "the dead node's lock stays until its lease runs out"
    );

    // c asks for the same name: it waits for the lock, takes it once b's lease ran out,
    // and completes the order (its token answered by a, through the now open gate).
    gate.open.send_replace(true);
    let served = tls_connect(c.secure(), "crash.fleet.test", client.clone()).await;
    assert!(
        served.is_ok(),
        "c completes the order: {:?}\n{}\npebble:\n{}",
        served.err(),
        logs(&[&a, &c]),
        pebble.log()
    );
    assert_eq!(c.orders(), 1, "{}", c.log());
    assert_eq!(a.orders(), 0, "{}", a.log());
    assert!(
        c.log().contains("another node orders this name"),
        "c waited for b's lock first:\n{}",
        c.log()
    );
    assert_eq!(pebble.order_requests(), 2, "{}", pebble.log());
    assert!(etcd_client.get(lock_key).await.unwrap().is_none());
    let tokens = etcd_client
        .get_prefix(b"/proxy/acme/acme/tokens/", 0)
        .await
        .unwrap();
    assert!(tokens.kvs.is_empty(), "{:?}", tokens.kvs);
}

/// The TLS part of a node's config: an `https` listener `secure`, on-demand issuance
/// allowed for `allow` by the config file, and `acme` (the `[tls.acme]` keys).
fn tls_part(allow: &[&str], acme: &str) -> String {
    let allow = allow.join("\", \"");
    format!(
        "[[listeners]]\nname = \"secure\"\nprotocol = \"https\"\naddress = \"127.0.0.1:0\"\n\n\
         [tls.acme]\n{acme}\n\n\
         [tls.on_demand]\nenabled = true\nallow = [\"{allow}\"]\nmax_orders_per_name_per_hour = 1\n"
    )
}

/// ACME settings whose directory nobody answers: orders fail at once.
const NO_ACME: &str = "directory = \"https://127.0.0.1:9/dir\"";

async fn tls_api(node: &TestProxy) -> TlsServiceClient<tonic::transport::Channel> {
    TlsServiceClient::new(connect(node).await.channel)
}

async fn allowlist(node: &TestProxy) -> pb::ListAllowlistResponse {
    tls_api(node)
        .await
        .list_allowlist(pb::ListAllowlistRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn upload(
    tls: &mut TlsServiceClient<tonic::transport::Channel>,
    cert: &str,
    key: &str,
) -> Result<pb::Certificate, tonic::Status> {
    tls.upload_certificate(pb::UploadCertificateRequest {
        name: String::new(),
        cert_pem: cert.into(),
        key_pem: key.into(),
    })
    .await
    .map(|r| r.into_inner().certificate.unwrap())
}

/// The leaf `node` presents for `sni` in a real handshake, if one completes.
async fn served_leaf(
    node: &TestProxy,
    sni: &str,
    client: &std::sync::Arc<rustls::ClientConfig>,
) -> Option<Vec<u8>> {
    let stream = tls_support::tls_connect(node.addr("secure"), sni, client.clone())
        .await
        .ok()?;
    Some(tls_support::peer_leaf(&stream))
}

/// The leaf of a PEM chain, as DER.
fn leaf_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_and_uploaded_certificates_are_fleet_objects() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path(), 1).await;
    let endpoints = etcd.endpoints();
    let a = start_node("a", &endpoints, &tls_part(&["fixed.example.test"], NO_ACME)).await;
    // b's own config file allows `only-b.example.test`: that name is b's on b.
    let b = start_node(
        "b",
        &endpoints,
        &tls_part(&["only-b.example.test"], NO_ACME),
    )
    .await;
    let mut tls_a = tls_api(&a).await;
    let mut tls_b = tls_api(&b).await;
    let ca = tls_support::TestCa::new("fleet upload CA");
    let client = tls_support::client_config(ca.roots(), &[]);

    // Not allowed anywhere yet: b refuses the handshake without asking the CA.
    let refused = b.daemon.tls().refused_handshakes();
    assert!(served_leaf(&b, "x.shop.example.test", &client)
        .await
        .is_none());
    assert_eq!(b.daemon.tls().refused_handshakes(), refused + 1);

    // An entry added on a: listed on a as soon as the call returns, then on b, where it
    // admits the name (b orders; the order fails at the unreachable CA, not the policy).
    let added = tls_a
        .add_allowlist_entry(pb::AddAllowlistEntryRequest {
            pattern: "*.Shop.example.test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(added.pattern, "*.shop.example.test");
    assert_eq!(allowlist(&a).await.api_entries, ["*.shop.example.test"]);
    eventually("b lists the entry added on a", || async {
        allowlist(&b).await.api_entries == ["*.shop.example.test"]
    })
    .await;
    let failed = b.daemon.tls().status().acme.unwrap().failed;
    assert!(served_leaf(&b, "y.shop.example.test", &client)
        .await
        .is_none());
    assert_eq!(
        b.daemon.tls().refused_handshakes(),
        refused + 1,
        "admitted, not refused"
    );
    assert_eq!(b.daemon.tls().status().acme.unwrap().failed, failed + 1);
    // The order was counted in the fleet's log.
    let log = etcd
        .client()
        .await
        .get(b"/proxy/test/acme-orders")
        .await
        .unwrap();
    let log = String::from_utf8(log.expect("the fleet's order log").value).unwrap();
    assert!(log.contains("y.shop.example.test"), "{log}");

    // A name a's config file owns cannot be added on a; b's own name added on a is
    // shadowed on b (its config wins there) and reported.
    let own = tls_a
        .add_allowlist_entry(pb::AddAllowlistEntryRequest {
            pattern: "fixed.example.test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(own.code(), Code::FailedPrecondition, "{own:?}");
    tls_a
        .add_allowlist_entry(pb::AddAllowlistEntryRequest {
            pattern: "only-b.example.test".into(),
        })
        .await
        .unwrap();
    let api_b = connect(&b).await;
    eventually("b reports the shadowed entry", || {
        let mut api = api_b.clone();
        async move {
            cluster_state(&mut api)
                .await
                .shadowed
                .iter()
                .any(|o| o.kind == "tls_allow" && o.name == "only-b.example.test")
        }
    })
    .await;
    let listed_b = allowlist(&b).await;
    assert_eq!(listed_b.config_entries, ["only-b.example.test"]);
    assert_eq!(listed_b.api_entries, ["*.shop.example.test"]);
    assert_eq!(
        allowlist(&a).await.api_entries,
        ["*.shop.example.test", "only-b.example.test"]
    );

    // A certificate uploaded on a: served by a at once and by b in a real handshake.
    let (cert, key) = ca.leaf(&["up.example.test"]);
    let uploaded = upload(&mut tls_a, &cert, &key).await.unwrap();
    assert_eq!(uploaded.name, "up.example.test");
    assert_eq!(
        served_leaf(&a, "up.example.test", &client).await,
        Some(leaf_of(&cert))
    );
    eventually("b serves the certificate uploaded on a", || async {
        served_leaf(&b, "up.example.test", &client).await == Some(leaf_of(&cert))
    })
    .await;
    let listed = tls_b
        .list_certificates(pb::ListCertificatesRequest {})
        .await
        .unwrap()
        .into_inner()
        .certificates;
    assert!(
        listed
            .iter()
            .any(|c| c.name == "up.example.test" && c.source == pb::CertificateSource::Api as i32),
        "{listed:?}"
    );
    // Removed on b: gone from a too.
    tls_b
        .remove_certificate(pb::RemoveCertificateRequest {
            name: "up.example.test".into(),
        })
        .await
        .unwrap();
    assert!(served_leaf(&b, "up.example.test", &client).await.is_none());
    eventually("a no longer serves the removed certificate", || async {
        served_leaf(&a, "up.example.test", &client).await.is_none()
    })
    .await;

    // Concurrent allowlist writes on a and b, some of the same pattern: nothing is lost.
    let writer = |tls: TlsServiceClient<tonic::transport::Channel>, node: &'static str| async move {
        let mut tls = tls;
        for i in 0..15 {
            for pattern in [
                format!("{node}{i}.example.test"),
                format!("both{i}.example.test"),
            ] {
                tls.add_allowlist_entry(pb::AddAllowlistEntryRequest { pattern })
                    .await
                    .unwrap_or_else(|e| panic!("{node}: {e:?}"));
            }
        }
    };
    let (x, y) = tokio::join!(
        tokio::spawn(writer(tls_a.clone(), "a")),
        tokio::spawn(writer(tls_b.clone(), "b"))
    );
    x.unwrap();
    y.unwrap();
    let mut expected: Vec<String> = (0..15)
        .flat_map(|i| ["a", "b", "both"].map(|n| format!("{n}{i}.example.test")))
        .chain(["*.shop.example.test".to_string()])
        .collect();
    expected.sort();
    eventually("both nodes list every entry written on either", || {
        let (a, b, expected, mut want_a) = (&a, &b, expected.clone(), expected.clone());
        async move {
            want_a.push("only-b.example.test".into());
            want_a.sort();
            allowlist(a).await.api_entries == want_a && allowlist(b).await.api_entries == expected
        }
    })
    .await;

    // Concurrent uploads of one name on a and b: each is made or ABORTED, never lost
    // silently, and both nodes end up serving the same certificate.
    let uploads = |tls: TlsServiceClient<tonic::transport::Channel>| {
        let ca = &ca;
        let certs: Vec<(String, String)> =
            (0..5).map(|_| ca.leaf(&["race.example.test"])).collect();
        async move {
            let mut tls = tls;
            let mut made = 0;
            for (cert, key) in certs {
                match upload(&mut tls, &cert, &key).await {
                    Ok(_) => made += 1,
                    Err(e) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
                }
            }
            made
        }
    };
    let (made_a, made_b) = tokio::join!(uploads(tls_a.clone()), uploads(tls_b.clone()));
    assert!(made_a + made_b >= 1);
    eventually(
        "both nodes serve the same certificate for the raced name",
        || async {
            let (x, y) = (
                served_leaf(&a, "race.example.test", &client).await,
                served_leaf(&b, "race.example.test", &client).await,
            );
            x.is_some() && x == y
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_objects_outlive_an_etcd_outage_and_reach_a_node_started_later() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(binary, dir.path(), 1).await;
    let endpoints = etcd.endpoints();
    let tls = tls_part(&["fixed.example.test"], NO_ACME);
    let a = start_node("a", &endpoints, &tls).await;
    let mut tls_a = tls_api(&a).await;
    let ca = tls_support::TestCa::new("fleet outage CA");
    let client = tls_support::client_config(ca.roots(), &[]);
    let (cert, key) = ca.leaf(&["keep.example.test"]);
    upload(&mut tls_a, &cert, &key).await.unwrap();
    tls_a
        .add_allowlist_entry(pb::AddAllowlistEntryRequest {
            pattern: "kept.example.test".into(),
        })
        .await
        .unwrap();

    // etcd down: TLS writes are UNAVAILABLE, serving goes on.
    etcd.stop();
    let api_a = connect(&a).await;
    eventually("a notices etcd is gone", || {
        let mut api = api_a.clone();
        async move { cluster_state(&mut api).await.stale }
    })
    .await;
    let (other, other_key) = ca.leaf(&["other.example.test"]);
    let refused = upload(&mut tls_a, &other, &other_key).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let refused = tls_a
        .add_allowlist_entry(pb::AddAllowlistEntryRequest {
            pattern: "new.example.test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let refused = tls_a
        .remove_certificate(pb::RemoveCertificateRequest {
            name: "keep.example.test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        served_leaf(&a, "keep.example.test", &client).await,
        Some(leaf_of(&cert))
    );
    assert!(served_leaf(&a, "other.example.test", &client)
        .await
        .is_none());

    // a restarts while etcd is down: it serves what it applied last, from SQLite.
    let a_dir = {
        let TestProxy { daemon, dir } = a;
        daemon.stop().await;
        dir
    };
    let a = start_proxy_in(a_dir, &node_config("a", &endpoints, &tls)).await;
    assert_eq!(
        served_leaf(&a, "keep.example.test", &client).await,
        Some(leaf_of(&cert))
    );
    assert_eq!(allowlist(&a).await.api_entries, ["kept.example.test"]);

    // etcd back: a node started only now serves the certificate and the entry.
    etcd.restart().await;
    let c = start_node("c", &endpoints, &tls).await;
    eventually(
        "c serves the certificate stored in etcd before it existed",
        || async { served_leaf(&c, "keep.example.test", &client).await == Some(leaf_of(&cert)) },
    )
    .await;
    assert_eq!(allowlist(&c).await.api_entries, ["kept.example.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_issued_on_one_node_is_served_by_every_node_and_orders_count_fleet_wide() {
    let Some(binary) = etcd_binary() else { return };
    if !pebble_programs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path(), 1).await;
    let endpoints = etcd.endpoints();
    let pebble_dir = tempfile::tempdir().unwrap();
    let ports = tls_support::PebblePorts::pick();
    let (api_ca, ca_file) = tls_support::api_ca(pebble_dir.path());
    let acme = format!(
        "directory = \"{}\"\nca_file = \"{}\"\nchallenges = [\"http-01\"]",
        ports.directory(),
        ca_file.display()
    );
    let tls = tls_part(&["a.example.test", "b.example.test"], &acme);
    let a = start_node("a", &endpoints, &tls).await;
    let b = start_node("b", &endpoints, &tls).await;
    // pebble validates on a's listeners: a orders.
    let pebble = tls_support::Pebble::start(
        ports,
        pebble_dir,
        api_ca,
        ca_file,
        a.addr("web").port(),
        a.addr("secure").port(),
    )
    .await;
    let client =
        tls_support::client_config(tls_support::roots_from_pem(&pebble.root_pem().await), &[]);

    let issued = served_leaf(&a, "a.example.test", &client)
        .await
        .unwrap_or_else(|| panic!("a's handshake\npebble log:\n{}", pebble.log()));
    assert_eq!(pebble.order_requests(), 1, "{}", pebble.log());
    eventually("b serves the certificate a ordered", || async {
        served_leaf(&b, "a.example.test", &client).await.as_ref() == Some(&issued)
    })
    .await;
    // The certificate and the ACME account are the fleet's, in etcd.
    let mut etcd_client = etcd.client().await;
    let cert = etcd_client
        .get(b"/proxy/test/objects/tls_certificate/a.example.test")
        .await
        .unwrap()
        .expect("the issued certificate in etcd");
    let cert: serde_json::Value = serde_json::from_slice(&cert.value).unwrap();
    assert_eq!(cert["origin"], "issued");
    let accounts = etcd_client
        .get_prefix(b"/proxy/test/objects/acme_account/", 0)
        .await
        .unwrap();
    assert_eq!(accounts.kvs.len(), 1);

    // b orders a name of its own under the fleet's account (no second registration at
    // the CA), its HTTP-01 token answered by a, where pebble validates.
    let b_issued = served_leaf(&b, "b.example.test", &client)
        .await
        .unwrap_or_else(|| panic!("b's handshake\npebble log:\n{}", pebble.log()));
    assert_eq!(b.daemon.tls().orders_created(), 1);
    assert_eq!(pebble.order_requests(), 2, "{}", pebble.log());
    let registrations = pebble
        .log()
        .lines()
        .filter(|l| l.contains("POST /sign-me-up"))
        .count();
    assert_eq!(registrations, 1, "{}", pebble.log());
    eventually("a serves the certificate b ordered", || async {
        served_leaf(&a, "b.example.test", &client).await.as_ref() == Some(&b_issued)
    })
    .await;

    // A node started later serves it without an order.
    let c = start_node("c", &endpoints, &tls).await;
    eventually(
        "c serves the certificate issued before it started",
        || async { served_leaf(&c, "a.example.test", &client).await.as_ref() == Some(&issued) },
    )
    .await;
    assert_eq!(c.daemon.tls().orders_created(), 0);

    // The certificate removed: b would order again, but the fleet ordered for this name
    // within the hour already (max_orders_per_name_per_hour = 1): refused, CA untouched.
    tls_api(&a)
        .await
        .remove_certificate(pb::RemoveCertificateRequest {
            name: "a.example.test".into(),
        })
        .await
        .unwrap();
    eventually("b no longer has the removed certificate", || async {
        b.daemon
            .tls()
            .certificates()
            .iter()
            .all(|c| c.name != "a.example.test")
    })
    .await;
    assert!(served_leaf(&b, "a.example.test", &client).await.is_none());
    let last = b.daemon.tls().status().acme.unwrap().issuer.last_error;
    assert!(
        last.as_deref()
            .is_some_and(|e| e.contains("max_orders_per_name_per_hour")),
        "{last:?}"
    );
    assert_eq!(b.daemon.tls().orders_created(), 1);
    assert_eq!(pebble.order_requests(), 2, "{}", pebble.log());

    // The status's count of recent orders is the fleet's, as the limits are: c ordered
    // nothing itself, the fleet twice (the refused order is not counted).
    let c_own = c
        .daemon
        .tls()
        .status()
        .acme
        .unwrap()
        .issuer
        .orders_last_hour;
    assert_eq!(c_own, 0);
    let fleet = c.daemon.tls().fleet_orders_last_hour().await;
    assert_eq!(fleet.map(|r| r.unwrap()), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_first_handshake_for_one_name_makes_one_order_and_all_serve_it() {
    use tls_support::{api_ca, client_config, peer_leaf, roots_from_pem, tls_connect};
    let Some(binary) = etcd_binary() else { return };
    if !pebble_programs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path(), 1).await;
    let endpoints = etcd.endpoints();
    let app = upstream("app").await;
    let pebble_dir = tempfile::tempdir().unwrap();
    let ports = tls_support::PebblePorts::pick();
    let (ca, ca_file) = api_ca(pebble_dir.path());
    let directory = ports.directory();
    let a = ProcessNode::start("a", &endpoints, &directory, &ca_file, &app).await;
    let b = ProcessNode::start("b", &endpoints, &directory, &ca_file, &app).await;
    let c = ProcessNode::start("c", &endpoints, &directory, &ca_file, &app).await;
    // The CA validates on node a only: HTTP-01 for an order made by b or c is answered by a
    // from the fleet's tokens.
    let pebble = tls_support::Pebble::start(ports, pebble_dir, ca, ca_file, a.web, a.secure).await;
    let roots = roots_from_pem(&pebble.root_pem().await);
    let client = client_config(roots, &[b"http/1.1"]);
    let nodes = [&a, &b, &c];

    // The first handshake for one allowed name on all three nodes at the same moment.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(3));
    let handshakes: Vec<_> = nodes
        .iter()
        .map(|n| {
            let (addr, client, start) = (n.secure(), client.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                tls_connect(addr, "same.fleet.test", client)
                    .await
                    .map(|s| peer_leaf(&s))
            })
        })
        .collect();
    let mut leaves = Vec::new();
    for h in handshakes {
        let leaf = h.await.unwrap().unwrap_or_else(|e| {
            panic!(
                "first handshake failed: {e}\n{}\npebble:\n{}",
                logs(&nodes),
                pebble.log()
            )
        });
        leaves.push(leaf);
    }
    assert_eq!(
        pebble.order_requests(),
        1,
        "exactly one order in the fleet\n{}\npebble:\n{}",
        logs(&nodes),
        pebble.log()
    );
    assert_eq!(nodes.iter().map(|n| n.orders()).sum::<usize>(), 1);
    assert!(
        leaves.iter().all(|l| *l == leaves[0]),
        "every node serves the one certificate"
    );
    // Again, now from each node's store: still the same certificate, no new order.
    for n in nodes {
        let s = tls_connect(n.secure(), "same.fleet.test", client.clone())
            .await
            .unwrap();
        assert_eq!(peer_leaf(&s), leaves[0], "node {}", n.name);
    }

    // A name asked on c only: c orders, the CA reaches a, and a answers c's token.
    let before: Vec<usize> = nodes.iter().map(|n| n.orders()).collect();
    let leaf_c = tls_connect(c.secure(), "only-c.fleet.test", client.clone())
        .await
        .map(|s| peer_leaf(&s))
        .unwrap_or_else(|e| panic!("{e}\n{}\npebble:\n{}", logs(&nodes), pebble.log()));
    assert_eq!(pebble.order_requests(), 2, "{}", pebble.log());
    let after: Vec<usize> = nodes.iter().map(|n| n.orders()).collect();
    assert_eq!(
        after,
        vec![before[0], before[1], before[2] + 1],
        "c made the order; a only answered its challenge"
    );
    for n in [&a, &b] {
        let s = tls_connect(n.secure(), "only-c.fleet.test", client.clone())
            .await
            .unwrap();
        assert_eq!(
            peer_leaf(&s),
            leaf_c,
            "node {} serves c's certificate",
            n.name
        );
    }
    assert_eq!(pebble.order_requests(), 2, "{}", pebble.log());
    // Every lock and token went with its order.
    let mut etcd_client = etcd.client().await;
    for prefix in [&b"/proxy/acme/acme/locks/"[..], b"/proxy/acme/acme/tokens/"] {
        let left = etcd_client.get_prefix(prefix, 0).await.unwrap();
        assert!(left.kvs.is_empty(), "{:?}", left.kvs);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_due_renewal_is_made_once_for_the_fleet_and_every_node_serves_the_new_certificate() {
    use tls_support::{api_ca, client_config, peer_leaf, roots_from_pem, tls_connect};
    let Some(binary) = etcd_binary() else { return };
    if !pebble_programs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path(), 1).await;
    let endpoints = etcd.endpoints();
    let app = upstream("app").await;
    // An issued certificate past two thirds of its life, as the fleet stores it, before any
    // node starts: every node's renewal task finds it due at once.
    let old_ca = tls_support::TestCa::new("expiring issuer");
    let (cert_pem, key_pem) = old_ca.leaf_with(&["renew.fleet.test"], |p| {
        tls_support::validity_days(p, -10, 1)
    });
    let stored = serde_json::json!({
        "name": "renew.fleet.test",
        "origin": "issued",
        "cert_pem": cert_pem,
        "key_pem": key_pem,
    });
    etcd.client()
        .await
        .put(
            b"/proxy/acme/objects/tls_certificate/renew.fleet.test",
            stored.to_string().as_bytes(),
            0,
        )
        .await
        .unwrap();

    // Pebble first, so that the first renewal attempts reach it. It validates at node a
    // through a gate, closed until every node's renewal task is under way: the order waits
    // there with its lock held.
    let pebble_dir = tempfile::tempdir().unwrap();
    let ports = tls_support::PebblePorts::pick();
    let (ca, ca_file) = api_ca(pebble_dir.path());
    let directory = ports.directory();
    let a_ports = NodePorts::pick();
    let gate = Gate::start(a_ports.web).await;
    let pebble = tls_support::Pebble::start(
        ports,
        pebble_dir,
        ca,
        ca_file.clone(),
        gate.port,
        a_ports.secure,
    )
    .await;
    let client = client_config(roots_from_pem(&pebble.root_pem().await), &[b"http/1.1"]);
    let every_second = "renew_check_interval = \"1s\"";
    let start = |name: &'static str, ports: NodePorts| {
        ProcessNode::start_on(
            ports,
            name,
            &endpoints,
            &directory,
            &ca_file,
            &app,
            every_second,
        )
    };
    let (a, b, c) = tokio::join!(
        start("a", a_ports),
        start("b", NodePorts::pick()),
        start("c", NodePorts::pick())
    );
    let nodes = [&a, &b, &c];
    eventually(
        "every node's renewal task found the certificate due",
        || {
            let due = nodes
                .iter()
                .all(|n| n.log().contains("renewing certificate"));
            async move { due }
        },
    )
    .await;
    gate.open.send_replace(true);

    // Each node serves the renewed certificate (chained to pebble's root) soon.
    let mut leaves = Vec::new();
    for n in nodes {
        let mut served = None;
        for _ in 0..120 {
            if let Ok(s) = tls_connect(n.secure(), "renew.fleet.test", client.clone()).await {
                served = Some(peer_leaf(&s));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let leaf = served.unwrap_or_else(|| {
            panic!(
                "node {} never served the renewed certificate\n{}\npebble:\n{}",
                n.name,
                logs(&nodes),
                pebble.log()
            )
        });
        leaves.push(leaf);
    }
    assert!(
        leaves.iter().all(|l| *l == leaves[0]),
        "one renewed certificate"
    );
    // Several more renewal checks on every node: the fresh certificate is not renewed again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pebble.order_requests(),
        1,
        "one renewal for the fleet\n{}\npebble:\n{}",
        logs(&nodes),
        pebble.log()
    );
    assert_eq!(nodes.iter().map(|n| n.orders()).sum::<usize>(), 1);
}

const PROXYD: &str = env!("CARGO_BIN_EXE_proxyd");

/// A proxyd node run as a child process (upgrades start real successors); the process
/// serving at the end is killed when dropped.
struct NodeProcess {
    child: Child,
    dir: tempfile::TempDir,
    web: u16,
    newest_pid: Option<u32>,
}

impl NodeProcess {
    async fn start(name: &str, endpoints: &[String]) -> NodeProcess {
        let dir = tempfile::tempdir().unwrap();
        let web = free_port();
        let config = format!(
            "[server]\nstate_dir = \"{d}\"\nmgmt_socket = \"{d}/mgmt.sock\"\n\
             admin_listen = \"127.0.0.1:{admin}\"\n\
             executable = \"{PROXYD}\"\nupgrade_timeout = \"10s\"\ndrain_timeout = \"5s\"\n\
             log_level = \"warn\"\n\n\
             [[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:{web}\"\n\n\
             [cluster]\nnode_name = \"{name}\"\netcd = {{ endpoints = [{e}], prefix = \"/proxy/test\" }}\n",
            d = dir.path().display(),
            admin = free_port(),
            e = endpoints
                .iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(PROXYD)
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let node = NodeProcess {
            child,
            dir,
            web,
            newest_pid: None,
        };
        let socket = node.dir.path().join("mgmt.sock");
        eventually("the node's management socket", || {
            let socket = socket.clone();
            async move { tokio::net::UnixStream::connect(socket).await.is_ok() }
        })
        .await;
        node
    }

    async fn api(&self) -> Api {
        Api::over(mgmt_support::unix_channel(&self.dir.path().join("mgmt.sock")).await)
    }

    fn web(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.web).into()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.newest_pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The names in `ClusterStatus` as another node answers it.
async fn listed_nodes(
    cluster: &mut ClusterServiceClient<tonic::transport::Channel>,
) -> Vec<String> {
    match cluster.cluster_status(pb::ClusterStatusRequest {}).await {
        Ok(r) => r.into_inner().nodes.into_iter().map(|n| n.name).collect(),
        Err(e) => vec![format!("error: {e}")],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_in_fleet_mode_keeps_the_node_listed_serving_and_resuming() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path(), 1).await;
    let endpoints = etcd.endpoints();
    let app = upstream("app").await;
    let mut a = NodeProcess::start("a", &endpoints).await;
    let b = start_node("b", &endpoints, "").await;
    let mut api_b = connect(&b).await;
    create_pool(&mut api_b, pool_msg("app", &[app.address()])).await;
    create_route(&mut api_b, route_msg("site", "example.com", "/", "app")).await;
    let web_a = a.web();
    eventually("a serves the route made on b", || async move {
        let r = tokio::spawn(get(web_a, "example.com", "/")).await;
        r.is_ok_and(|r| r.status == 200)
    })
    .await;
    let cluster_b = ClusterServiceClient::new(api_b.channel.clone());
    eventually("both nodes listed", || {
        let mut c = cluster_b.clone();
        async move { listed_nodes(&mut c).await == ["a", "b"] }
    })
    .await;
    let mut etcd_client = etcd.client().await;
    let lease_before = etcd_client
        .get(b"/proxy/test/nodes/a")
        .await
        .unwrap()
        .expect("a's key")
        .lease;
    let mut api_a = a.api().await;
    let before = cluster_state(&mut api_a).await;

    // Requests through a, and b's view of the fleet's list, all along the upgrade.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match tokio::spawn(get(web_a, "example.com", "/")).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }
    });
    let poll = tokio::spawn({
        let stop = stop.clone();
        let mut cluster = cluster_b.clone();
        async move {
            let (mut polls, mut missing) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                polls += 1;
                let names = listed_nodes(&mut cluster).await;
                if names != ["a", "b"] {
                    missing.push(names);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (polls, missing)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_pid = api_a
        .admin
        .upgrade(pb::UpgradeRequest { wait: true })
        .await
        .expect("upgrade")
        .into_inner()
        .new_pid;
    a.newest_pid = Some(new_pid);
    // A route written on b right after: the successor follows it from where its
    // predecessor stopped.
    create_route(&mut api_b, route_msg("after", "after.example", "/", "app")).await;
    let written = cluster_state(&mut api_b).await.applied_revision;
    eventually(
        "the successor serves the route made after the upgrade",
        || async move {
            let r = tokio::spawn(get(web_a, "after.example", "/")).await;
            r.is_ok_and(|r| r.status == 200)
        },
    )
    .await;
    // The old process drains (a few seconds at most): keep watching until it is gone.
    eventually("the old process exits", || {
        let exited = matches!(a.child.try_wait(), Ok(Some(_)));
        async move { exited }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    let (polls, missing) = poll.await.unwrap();
    assert_eq!(
        failed, 0,
        "requests through a failed during the upgrade ({ok} ok)"
    );
    assert!(ok > 0);
    assert!(polls >= 10, "b's fleet list was polled {polls} times");
    assert!(
        missing.is_empty(),
        "b's list of the fleet lost a during the upgrade: {missing:?}"
    );

    let mut api_a = a.api().await;
    let after = cluster_state(&mut api_a).await;
    assert!(after.applied_revision >= written, "{after:?} vs {written}");
    assert_eq!(
        after.full_syncs, 0,
        "the successor read everything again instead of resuming: {after:?}"
    );
    assert_eq!(after.resumes, 1, "{after:?}");
    assert!(after.connected, "{after:?}");
    assert!(before.applied_revision > 0);
    // The same lease carries a's key: it was handed over, not revoked and granted again.
    let key = etcd_client
        .get(b"/proxy/test/nodes/a")
        .await
        .unwrap()
        .expect("a's key after the upgrade");
    assert_eq!(key.lease, lease_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_counts_fleet_writes_not_applied_and_never_heartbeats() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path(), 1).await;
    let endpoints = etcd.endpoints();
    let app = upstream("app").await;
    let a = start_node("a", &endpoints, "").await;
    let mut api_a = connect(&a).await;
    create_pool(&mut api_a, pool_msg("app", &[app.address()])).await;
    // A node that stopped following after that first write (as its key says), with no
    // lease so it stays listed: it is behind by every write after it.
    let mut client = etcd.client().await;
    let marker = client
        .get(b"/proxy/test/objects/.write")
        .await
        .unwrap()
        .expect("the write marker");
    let stuck = serde_json::json!({
        "name": "stuck",
        "version": "0.0.0",
        "applied_revision": marker.mod_revision,
        "applied_writes": marker.version,
        "heartbeat": 0,
    });
    client
        .put(b"/proxy/test/nodes/stuck", stuck.to_string().as_bytes(), 0)
        .await
        .unwrap();
    for i in 0..3 {
        let name = format!("r{i}");
        create_route(
            &mut api_a,
            route_msg(&name, &format!("{name}.example"), "/", "app"),
        )
        .await;
    }
    let mut cluster = ClusterServiceClient::new(api_a.channel.clone());
    // Heartbeats move etcd's revision on every 3 s; wait for two so they would show.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let fleet = cluster
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let lag = |name: &str| fleet.nodes.iter().find(|n| n.name == name).map(|n| n.lag);
    assert_eq!(lag("stuck"), Some(3), "{fleet:?}");
    assert_eq!(lag("a"), Some(0), "{fleet:?}");
    assert!(
        fleet.etcd_revision > marker.mod_revision + 3,
        "heartbeats were written meanwhile: {fleet:?}"
    );
    let (_, metrics) = admin_text(&a, "/metrics").await;
    assert!(metrics.contains("proxy_cluster_lag_writes 0"), "{metrics}");
}
