//! `AdminService.ReloadConfig`: the config file is re-read and its objects reconciled,
//! leaving API-owned objects alone; a broken file or changed listeners change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use common::*;
use mgmt_support::*;
use proxy_proto::v1 as pb;
use tonic::Code;

fn file_config(state: &std::path::Path, routes: &str, v1: &Upstream) -> String {
    format!(
        "{}\n{}\n{routes}",
        CONFIG.replace("{state}", &state.display().to_string()),
        pool("v1", &[v1])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reconciles_the_file_and_keeps_api_objects() {
    let v1 = upstream("v1").await;
    let v2 = upstream("v2").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    let site = "[[routes]]\nname = \"site\"\nlistener = \"web\"\npool = \"v1\"\n";
    std::fs::write(&path, file_config(dir.path(), site, &v1)).expect("write config");
    let config = proxy::Config::load(&path).expect("valid config");
    let daemon = proxy::Daemon::start(config).await.expect("daemon starts");
    let proxy = TestProxy { daemon, dir };
    let mut api = connect(&proxy).await;
    create_pool(&mut api, pool_msg("v2", &[v2.address()])).await;
    create_route(&mut api, route_msg("api-docs", "", "/docs", "v2")).await;

    // Add a route to the file and reload.
    let blog =
        "[[routes]]\nname = \"blog\"\nlistener = \"web\"\npath_prefix = \"/blog\"\npool = \"v1\"\n";
    std::fs::write(
        &path,
        file_config(proxy.dir.path(), &format!("{site}\n{blog}"), &v1),
    )
    .expect("write");
    let reloaded = api
        .admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .expect("reload")
        .into_inner();
    assert_eq!(
        (reloaded.created, reloaded.updated, reloaded.deleted),
        (1, 0, 0)
    );
    let blog_route = api
        .routes
        .get_route(pb::GetRouteRequest {
            name: "blog".into(),
        })
        .await
        .expect("get");
    assert_eq!(
        blog_route.into_inner().route.expect("route").source,
        pb::Source::Declarative as i32
    );

    // Remove "site" from the file: deleted; the API's route is untouched.
    std::fs::write(&path, file_config(proxy.dir.path(), blog, &v1)).expect("write");
    let reloaded = api
        .admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .expect("reload")
        .into_inner();
    assert_eq!(
        (reloaded.created, reloaded.updated, reloaded.deleted),
        (0, 0, 1)
    );
    let web = proxy.addr("web");
    assert_eq!(get(web, "x", "/").await.status, 404);
    assert_eq!(
        get(web, "x", "/docs").await.header("x-upstream"),
        Some("v2")
    );

    // A broken file changes nothing and says where it is broken.
    std::fs::write(&path, "[server]\nbogus = 1\n").expect("write");
    let err = api
        .admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .expect_err("broken file");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("proxy.toml:2: bogus: unknown field"),
        "{}",
        err.message()
    );

    // Changed listeners need an upgrade or restart.
    let moved = file_config(proxy.dir.path(), blog, &v1).replace(
        "name = \"db\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"",
        "name = \"db\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:1\"",
    );
    std::fs::write(&path, moved).expect("write");
    let err = api
        .admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .expect_err("listeners changed");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("listeners changed"),
        "{}",
        err.message()
    );
    assert_eq!(
        get(web, "x", "/blog").await.header("x-upstream"),
        Some("v1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_without_a_file_is_refused() {
    let proxy = start_proxy(CONFIG).await;
    let mut api = connect(&proxy).await;
    let err = api
        .admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .expect_err("no file");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("no file"), "{}", err.message());
}

/// The state of each upstream of pool `name`, by address.
async fn upstream_states(api: &mut Api, name: &str) -> Vec<(String, i32)> {
    api.pools
        .get_pool(pb::GetPoolRequest { name: name.into() })
        .await
        .expect("get pool")
        .into_inner()
        .pool
        .expect("pool")
        .upstreams
        .into_iter()
        .map(|u| (u.address, u.state))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_upstream_of_a_file_pool_stays_drained_across_reload_and_restart() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    let state_dir = dir.path().display().to_string();
    let text = |routes: &str| {
        format!(
            "{}\n{}\n{routes}",
            CONFIG.replace("{state}", &state_dir),
            pool("v1", &[&a, &b])
        )
    };
    let site = "[[routes]]\nname = \"site\"\nlistener = \"web\"\npool = \"v1\"\n";
    std::fs::write(&path, text(site)).expect("write config");
    let daemon = proxy::Daemon::start(proxy::Config::load(&path).expect("config"))
        .await
        .expect("daemon starts");
    let proxy = TestProxy { daemon, dir };
    let mut api = connect(&proxy).await;
    api.pools
        .drain_upstream(pb::DrainUpstreamRequest {
            pool: "v1".into(),
            address: a.address(),
        })
        .await
        .expect("drain");
    let drained = vec![
        (a.address(), pb::UpstreamState::Draining as i32),
        (b.address(), pb::UpstreamState::Active as i32),
    ];
    assert_eq!(upstream_states(&mut api, "v1").await, drained);

    // A reload that changes the file elsewhere keeps the operator's drain.
    let blog =
        "[[routes]]\nname = \"blog\"\nlistener = \"web\"\npath_prefix = \"/blog\"\npool = \"v1\"\n";
    std::fs::write(&path, text(&format!("{site}\n{blog}"))).expect("write");
    let reloaded = api
        .admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .expect("reload")
        .into_inner();
    assert_eq!(
        (reloaded.created, reloaded.updated, reloaded.deleted),
        (1, 0, 0)
    );
    assert_eq!(upstream_states(&mut api, "v1").await, drained);
    let web = proxy.addr("web");
    for _ in 0..4 {
        assert_eq!(get(web, "x", "/").await.header("x-upstream"), Some("b"));
    }

    // A restart reconciles the file again: still drained.
    let TestProxy { daemon, dir } = proxy;
    daemon.stop().await;
    let daemon = proxy::Daemon::start(proxy::Config::load(&path).expect("config"))
        .await
        .expect("daemon restarts");
    let proxy = TestProxy { daemon, dir };
    let mut api = connect(&proxy).await;
    assert_eq!(upstream_states(&mut api, "v1").await, drained);
    let web = proxy.addr("web");
    for _ in 0..4 {
        assert_eq!(get(web, "x", "/").await.header("x-upstream"), Some("b"));
    }

    // Removing the upstream from the file and adding it back is a new upstream: active.
    std::fs::write(
        &path,
        text(site).replace(&format!("\"{}\", ", a.address()), ""),
    )
    .expect("write");
    api.admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .expect("reload without a");
    std::fs::write(&path, text(site)).expect("write");
    api.admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .expect("reload with a again");
    assert_eq!(
        upstream_states(&mut api, "v1").await,
        vec![
            (a.address(), pb::UpstreamState::Active as i32),
            (b.address(), pb::UpstreamState::Active as i32),
        ]
    );
}
