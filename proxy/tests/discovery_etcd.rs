//! The `etcd` discovery source against a real etcd (Debian `etcd-server`, binary `etcd`):
//! keys come and go, etcd stops and restarts, and `on_change = "reset"` closes streams.
//!
//! Without an `etcd` binary the tests are skipped, except under `./scripts/test` (and CI),
//! where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use proxy::etcd::{Client, EtcdError, Event};
use proxy_proto::v1 as pb;
use proxy_proto::v1::discovery_service_client::DiscoveryServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn etcd_binary() -> Option<PathBuf> {
    external_program("etcd", "Debian package etcd-server")
}

/// A single-node etcd on loopback; stopped when dropped.
struct Etcd {
    binary: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Etcd {
    async fn start(binary: PathBuf, dir: &Path) -> Etcd {
        let mut etcd = Etcd {
            binary,
            dir: dir.to_path_buf(),
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        etcd.restart().await;
        etcd
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    async fn restart(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&self.binary)
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("data"))
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
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("etcd.log")).unwrap())
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        for _ in 0..200 {
            if let Ok(mut c) = Client::connect(std::slice::from_ref(&client)).await {
                if c.get(b"probe").await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "etcd did not become ready; see {}",
            self.dir.join("etcd.log").display()
        );
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn client(&self) -> Client {
        Client::connect(&[self.endpoint()])
            .await
            .expect("etcd client")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn members(p: &TestProxy, pool: &str) -> BTreeSet<String> {
    let routing = p.daemon.routing().routing();
    routing
        .pool(pool)
        .map(|r| r.upstreams().iter().map(|u| u.address.clone()).collect())
        .unwrap_or_default()
}

/// How long a discovered change may take to reach the routing table.
const SEEN_WITHIN: Duration = Duration::from_secs(30);

async fn reaches_all(p: &TestProxy, names: &[&str]) {
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let r = get(p.addr("web"), "example.com", "/").await;
        assert_eq!(r.status, 200, "{}", r.text());
        seen.insert(r.header("x-upstream").unwrap_or("").to_string());
        if names.iter().all(|n| seen.contains(*n)) {
            return;
        }
    }
    panic!("expected traffic to reach {names:?}, saw {seen:?}");
}

#[tokio::test]
async fn etcd_keys_drive_membership_and_survive_an_etcd_outage() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(binary, dir.path()).await;
    let (a, b, c) = (
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    );
    let mut kv = etcd.client().await;
    kv.put(format!("/srv/web/test/{}", a.address()).as_bytes(), b"", 0)
        .await
        .unwrap();
    kv.put(
        format!("/srv/web/test/{}", b.address()).as_bytes(),
        b"{\"weight\": 1}",
        0,
    )
    .await
    .unwrap();
    // A sibling prefix must not leak in.
    kv.put(format!("/srv/web/test2/{}", c.address()).as_bytes(), b"", 0)
        .await
        .unwrap();

    let p = start_proxy(&format!(
        "{WEB}\n[[pools]]\nname = \"web\"\n[pools.discovery]\netcd = {{ endpoints = [\"{}\"], prefix = \"/srv/web/test\" }}\n\n[[routes]]\nname = \"all\"\nlistener = \"web\"\npool = \"web\"\n",
        etcd.endpoint()
    ))
    .await;
    eventually("a and b from etcd", SEEN_WITHIN, || {
        members(&p, "web") == [a.address(), b.address()].into()
    })
    .await;
    reaches_all(&p, &["a", "b"]).await;

    kv.delete(format!("/srv/web/test/{}", a.address()).as_bytes())
        .await
        .unwrap();
    eventually("a to leave", SEEN_WITHIN, || {
        members(&p, "web") == [b.address()].into()
    })
    .await;
    for _ in 0..5 {
        assert_eq!(
            get(p.addr("web"), "example.com", "/")
                .await
                .header("x-upstream"),
            Some("b")
        );
    }

    // etcd goes away: the pool keeps b and traffic flows.
    etcd.stop();
    let channel = mgmt_support::unix_channel(&mgmt_support::socket_path(&p)).await;
    let mut discovery = DiscoveryServiceClient::new(channel);
    let mut reported = false;
    for _ in 0..300 {
        let s = discovery
            .list_sources(pb::ListSourcesRequest {})
            .await
            .unwrap()
            .into_inner()
            .sources;
        if s[0].last_error_unix_ms > s[0].last_success_unix_ms {
            reported = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reported, "the etcd outage is reported");
    assert_eq!(members(&p, "web"), [b.address()].into());
    reaches_all(&p, &["b"]).await;

    // etcd is back: a key written now is picked up after the reconnect.
    etcd.restart().await;
    let mut kv = etcd.client().await;
    kv.put(format!("/srv/web/test/{}", c.address()).as_bytes(), b"", 0)
        .await
        .unwrap();
    eventually("c after etcd restarted", SEEN_WITHIN, || {
        members(&p, "web") == [b.address(), c.address()].into()
    })
    .await;
    reaches_all(&p, &["b", "c"]).await;
    let s = discovery
        .list_sources(pb::ListSourcesRequest {})
        .await
        .unwrap()
        .into_inner()
        .sources;
    assert_eq!((s[0].kind.as_str(), s[0].members), ("etcd", 2));
}

/// Echoes every byte back.
async fn echo_upstream() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
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
    (addr, task)
}

async fn open_stream(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");
    s
}

/// Whether the proxy closed the stream (EOF or reset) within a generous bound.
async fn closed_by_proxy(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => false,
    }
}

#[tokio::test]
async fn on_change_reset_closes_streams_to_a_removed_upstream_and_keep_does_not() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path()).await;
    let (up_reset, _t1) = echo_upstream().await;
    let (up_keep, _t2) = echo_upstream().await;
    let mut kv = etcd.client().await;
    kv.put(format!("/srv/reset/{up_reset}").as_bytes(), b"", 0)
        .await
        .unwrap();
    kv.put(format!("/srv/keep/{up_keep}").as_bytes(), b"", 0)
        .await
        .unwrap();
    let endpoint = etcd.endpoint();
    let p = start_proxy(&format!(
        "[[listeners]]\nname = \"r\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\npool = \"r\"\n\
         [[listeners]]\nname = \"k\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\npool = \"k\"\n\
         [[pools]]\nname = \"r\"\non_change = \"reset\"\n[pools.discovery]\netcd = {{ endpoints = [\"{endpoint}\"], prefix = \"/srv/reset\" }}\n\
         [[pools]]\nname = \"k\"\non_change = \"keep\"\n[pools.discovery]\netcd = {{ endpoints = [\"{endpoint}\"], prefix = \"/srv/keep\" }}\n"
    ))
    .await;
    eventually("both pools filled", SEEN_WITHIN, || {
        members(&p, "r").len() == 1 && members(&p, "k").len() == 1
    })
    .await;
    let mut reset_stream = open_stream(p.addr("r")).await;
    let mut keep_stream = open_stream(p.addr("k")).await;

    kv.delete(format!("/srv/reset/{up_reset}").as_bytes())
        .await
        .unwrap();
    kv.delete(format!("/srv/keep/{up_keep}").as_bytes())
        .await
        .unwrap();
    eventually("both pools emptied", SEEN_WITHIN, || {
        members(&p, "r").is_empty() && members(&p, "k").is_empty()
    })
    .await;

    assert!(
        closed_by_proxy(&mut reset_stream).await,
        "reset: the stream to the removed upstream is closed"
    );
    // keep: the established stream still works end to end.
    keep_stream.write_all(b"more").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), keep_stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"more");
}

fn key_strings(kvs: &[proxy::etcd::KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

#[tokio::test]
async fn etcd_client_reads_a_prefix_at_a_revision_and_watches_from_the_next_one() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path()).await;
    let mut kv = etcd.client().await;
    kv.put(b"/svc/a", b"1", 0).await.unwrap();
    kv.put(b"/svc/b", b"2", 0).await.unwrap();
    kv.put(b"/svc0", b"sibling", 0).await.unwrap();
    let before = kv.get_prefix(b"/svc/", 0).await.unwrap();
    assert_eq!(key_strings(&before.kvs), ["/svc/a", "/svc/b"]);

    kv.put(b"/svc/c", b"3", 0).await.unwrap();
    assert_eq!(kv.delete(b"/svc/a").await.unwrap(), 1);
    kv.put(b"/svc0/x", b"outside", 0).await.unwrap();

    // The old revision still reads as it was; the newest has the changes.
    let old = kv.get_prefix(b"/svc/", before.revision).await.unwrap();
    assert_eq!(key_strings(&old.kvs), ["/svc/a", "/svc/b"]);
    let now = kv.get_prefix(b"/svc/", 0).await.unwrap();
    assert_eq!(key_strings(&now.kvs), ["/svc/b", "/svc/c"]);
    assert!(now.revision > before.revision);

    // A watch from the revision after the first read replays exactly what followed it.
    let mut watch = kv
        .watch_prefix(b"/svc/", before.revision + 1)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("watch events")
            .unwrap();
        seen.extend(batch);
    }
    match &seen[..] {
        [Event::Put(put), Event::Delete(deleted)] => {
            assert_eq!(
                (put.key.as_slice(), put.value.as_slice()),
                (&b"/svc/c"[..], &b"3"[..])
            );
            assert_eq!(deleted.key, b"/svc/a");
        }
        other => panic!("expected put /svc/c then delete /svc/a, got {other:?}"),
    }
    // Live changes arrive too.
    kv.put(b"/svc/d", b"4", 0).await.unwrap();
    let live = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("live event")
        .unwrap();
    assert!(
        matches!(&live[..], [Event::Put(kv)] if kv.key == b"/svc/d"),
        "{live:?}"
    );
}

#[tokio::test]
async fn etcd_client_watch_from_a_compacted_revision_reports_the_compaction() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path()).await;
    let mut kv = etcd.client().await;
    let first = kv.put(b"/c/k", b"1", 0).await.unwrap();
    kv.put(b"/c/k", b"2", 0).await.unwrap();
    let last = kv.put(b"/c/k", b"3", 0).await.unwrap();
    kv.compact(last).await.unwrap();

    let result = match kv.watch_prefix(b"/c/", first).await {
        Err(e) => Err(e),
        Ok(mut watch) => tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("an answer to the compacted watch"),
    };
    match result {
        Err(EtcdError::Compacted { compact_revision }) => assert_eq!(compact_revision, last),
        other => panic!("expected a compaction error, got {other:?}"),
    }
    // Reading at a compacted revision fails; the newest revision reads fine.
    assert!(kv.get_prefix(b"/c/", first).await.is_err());
    let now = kv.get_prefix(b"/c/", 0).await.unwrap();
    assert_eq!(now.kvs[0].value, b"3");
}

#[tokio::test]
async fn etcd_client_keys_on_a_lease_go_when_it_is_revoked() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path()).await;
    let mut kv = etcd.client().await;
    let lease = kv.grant_lease(Duration::from_secs(60)).await.unwrap();
    kv.put(b"/l/held", b"", lease).await.unwrap();
    kv.put(b"/l/kept", b"", 0).await.unwrap();
    assert_eq!(
        kv.get(b"/l/held").await.unwrap().map(|kv| kv.lease),
        Some(lease)
    );
    kv.revoke_lease(lease).await.unwrap();
    let left = kv.get_prefix(b"/l/", 0).await.unwrap();
    assert_eq!(key_strings(&left.kvs), ["/l/kept"]);
    assert_eq!(kv.delete_prefix(b"/l/").await.unwrap(), 1);
}

#[tokio::test]
async fn etcd_client_connect_fails_over_to_the_next_endpoint_and_reports_when_none_answers() {
    let Some(binary) = etcd_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(binary, dir.path()).await;
    let dead = format!("http://{}", dead_address());
    let mut kv = Client::connect(&[dead.clone(), etcd.endpoint()])
        .await
        .expect("the second endpoint answers");
    kv.put(b"/f/k", b"v", 0).await.unwrap();
    match Client::connect(std::slice::from_ref(&dead)).await {
        Err(EtcdError::Connect { endpoint, .. }) => assert_eq!(endpoint, dead),
        Err(other) => panic!("expected a connect error, got {other}"),
        Ok(_) => panic!("connected to a dead address"),
    }
    assert!(matches!(
        Client::connect(&["not a url".to_string()]).await,
        Err(EtcdError::Endpoint { .. })
    ));
}
