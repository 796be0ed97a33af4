//! The `exec` and `file` discovery sources against a real daemon: membership follows the
//! source, a bad output keeps the last good set, the stored config is never touched, and
//! `DiscoveryService` reports each source.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use proxy::state::Origin;
use proxy_proto::v1 as pb;
use proxy_proto::v1::discovery_service_client::DiscoveryServiceClient;

/// The addresses the routing table runs pool `pool` with, and their origins.
fn members(p: &TestProxy, pool: &str) -> BTreeSet<(String, String)> {
    let routing = p.daemon.routing().routing();
    let Some(runtime) = routing.pool(pool) else {
        return BTreeSet::new();
    };
    runtime
        .members()
        .map(|(u, o, _)| (u.address.clone(), o.label()))
        .collect()
}

/// How long a discovered change may take to reach the routing table.
const SEEN_WITHIN: Duration = Duration::from_secs(20);

async fn sources(p: &TestProxy) -> Vec<pb::DiscoverySource> {
    let channel = mgmt_support::unix_channel(&mgmt_support::socket_path(p)).await;
    DiscoveryServiceClient::new(channel)
        .list_sources(pb::ListSourcesRequest {})
        .await
        .expect("ListSources")
        .into_inner()
        .sources
}

fn member_list(addresses: &[&str]) -> String {
    let items: Vec<String> = addresses
        .iter()
        .map(|a| format!("{{\"address\": \"{a}\", \"weight\": 1}}"))
        .collect();
    format!("[{}]", items.join(", "))
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn config(discovery: &str) -> String {
    format!(
        "{WEB}\n[[pools]]\nname = \"svc\"\n[pools.discovery]\n{discovery}\n\n[[routes]]\nname = \"all\"\nlistener = \"web\"\npool = \"svc\"\n"
    )
}

/// Sends requests until each of `names` answered at least once (bounded).
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
async fn exec_source_follows_the_command_and_keeps_the_last_set_on_bad_output() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.json");
    std::fs::write(&list, member_list(&[&a.address(), &b.address()])).unwrap();
    let p = start_proxy(&config(&format!(
        "exec = {{ command = [\"/bin/cat\", \"{}\"], interval = \"100ms\", timeout = \"5s\" }}",
        list.display()
    )))
    .await;
    let both: BTreeSet<(String, String)> = [
        (a.address(), "exec".to_string()),
        (b.address(), "exec".to_string()),
    ]
    .into();
    eventually("both exec members", SEEN_WITHIN, || {
        members(&p, "svc") == both
    })
    .await;
    reaches_all(&p, &["a", "b"]).await;

    // A bad output: the pool keeps both and the source reports why.
    std::fs::write(&list, "this is not JSON").unwrap();
    let mut reported = false;
    for _ in 0..200 {
        let s = sources(&p).await;
        if s[0].last_error.contains("not a JSON list") {
            reported = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reported, "the bad output is reported by DiscoveryService");
    assert_eq!(members(&p, "svc"), both);
    reaches_all(&p, &["a", "b"]).await;

    // A failing command keeps the set too.
    std::fs::remove_file(&list).unwrap();
    let mut reported = false;
    for _ in 0..200 {
        if sources(&p).await[0].last_error.contains("exited with") {
            reported = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reported, "the failing command is reported");
    assert_eq!(members(&p, "svc"), both);

    // A good output with one member removes the other.
    std::fs::write(&list, member_list(&[&b.address()])).unwrap();
    eventually("only b", SEEN_WITHIN, || {
        members(&p, "svc") == [(b.address(), "exec".to_string())].into()
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
    let s = sources(&p).await;
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].pool.as_str(), s[0].kind.as_str(), s[0].members),
        ("svc", "exec", 1)
    );
    assert!(s[0].last_success_unix_ms > 0);

    // Discovered members are run-time only: the stored pool has no upstreams.
    let snap = p.daemon.state().snapshot();
    assert!(snap.state.pool("svc").expect("pool").upstreams.is_empty());
}

#[tokio::test]
async fn exec_timeout_keeps_the_last_set() {
    let a = upstream("a").await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("list.sh");
    let slow = dir.path().join("slow");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ -e {} ]; then sleep 30; fi\necho '{}'\n",
            slow.display(),
            member_list(&[&a.address()])
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let p = start_proxy(&config(&format!(
        "exec = {{ command = [\"{}\"], interval = \"100ms\", timeout = \"300ms\" }}",
        script.display()
    )))
    .await;
    eventually("a", SEEN_WITHIN, || members(&p, "svc").len() == 1).await;
    std::fs::write(&slow, "").unwrap();
    let mut reported = false;
    for _ in 0..200 {
        if sources(&p).await[0].last_error.contains("did not finish") {
            reported = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reported, "the timeout is reported");
    assert_eq!(members(&p, "svc").len(), 1);
    reaches_all(&p, &["a"]).await;
}

#[tokio::test]
async fn file_source_reloads_on_change_and_ignores_a_bad_file() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("members.json");
    write_atomically(&list, &member_list(&[&a.address()]));
    let p = start_proxy(&config(&format!(
        "file = {{ path = \"{}\" }}",
        list.display()
    )))
    .await;
    eventually("a from the file", SEEN_WITHIN, || {
        members(&p, "svc") == [(a.address(), "file".to_string())].into()
    })
    .await;
    reaches_all(&p, &["a"]).await;

    write_atomically(&list, &member_list(&[&a.address(), &b.address()]));
    eventually("a and b", SEEN_WITHIN, || members(&p, "svc").len() == 2).await;
    reaches_all(&p, &["a", "b"]).await;

    // A bad file (a duplicate address) changes nothing.
    write_atomically(&list, &member_list(&[&b.address(), &b.address()]));
    let mut reported = false;
    for _ in 0..200 {
        if sources(&p).await[0].last_error.contains("listed twice") {
            reported = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reported, "the bad file is reported");
    assert_eq!(members(&p, "svc").len(), 2);

    // Edited in place (not replaced) is picked up too.
    std::fs::write(&list, member_list(&[&b.address()])).unwrap();
    eventually("only b", SEEN_WITHIN, || {
        members(&p, "svc") == [(b.address(), "file".to_string())].into()
    })
    .await;
}

#[tokio::test]
async fn static_and_discovered_upstreams_are_merged_and_listed_with_their_origin() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("members.json");
    write_atomically(&list, &member_list(&[&b.address()]));
    let text = format!(
        "{WEB}\n[[pools]]\nname = \"svc\"\nupstreams = [\"{}\"]\n[pools.discovery]\nfile = {{ path = \"{}\" }}\n\n[[routes]]\nname = \"all\"\nlistener = \"web\"\npool = \"svc\"\n",
        a.address(),
        list.display()
    );
    let p = start_proxy(&text).await;
    eventually("static a and file b", SEEN_WITHIN, || {
        members(&p, "svc")
            == [
                (a.address(), "static".to_string()),
                (b.address(), "file".to_string()),
            ]
            .into()
    })
    .await;
    reaches_all(&p, &["a", "b"]).await;
    let mut api = mgmt_support::connect(&p).await;
    let pool = api
        .pools
        .get_pool(pb::GetPoolRequest { name: "svc".into() })
        .await
        .expect("GetPool")
        .into_inner()
        .pool
        .expect("pool");
    let listed: BTreeSet<(String, String)> = pool
        .upstreams
        .iter()
        .map(|u| (u.address.clone(), u.origin.clone()))
        .collect();
    assert_eq!(
        listed,
        [
            (a.address(), "static".to_string()),
            (b.address(), "file".to_string())
        ]
        .into()
    );
    assert_eq!(Origin::Static.label(), "static");
}
