//! The management API end to end: a real proxyd in-process, its real unix socket, the
//! generated tonic clients, real upstreams on 127.0.0.1:0 and SQLite in a temp dir.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use common::*;
use mgmt_support::*;
use proxy_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_route_routes_the_next_request_and_survives_a_restart() {
    let v1 = upstream("v1").await;
    let v2 = upstream("v2").await;
    let proxy = start_proxy(CONFIG).await;
    let mut api = connect(&proxy).await;

    create_pool(&mut api, pool_msg("v1", &[v1.address()])).await;
    create_route(&mut api, route_msg("everything", "", "/", "v1")).await;
    let web = proxy.addr("web");
    assert_eq!(
        get(web, "example.com", "/docs/a")
            .await
            .header("x-upstream"),
        Some("v1")
    );

    // Move /docs to v2: the very next request after the call returns goes there.
    create_pool(&mut api, pool_msg("v2", &[v2.address()])).await;
    let revision = create_route(&mut api, route_msg("docs", "example.com", "/docs", "v2")).await;
    assert_eq!(
        get(web, "example.com", "/docs/a")
            .await
            .header("x-upstream"),
        Some("v2")
    );
    assert_eq!(
        get(web, "example.com", "/blog").await.header("x-upstream"),
        Some("v1")
    );
    assert_eq!(
        get(web, "other.org", "/docs/a").await.header("x-upstream"),
        Some("v1")
    );

    // Restart on the same state directory.
    let TestProxy { daemon, dir } = proxy;
    daemon.stop().await;
    let proxy = start_proxy_in(dir, CONFIG).await;
    let mut api = connect(&proxy).await;
    let listed = api
        .routes
        .list_routes(pb::ListRoutesRequest::default())
        .await
        .expect("list routes")
        .into_inner();
    assert_eq!(listed.revision, revision);
    let names: Vec<_> = listed.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["docs", "everything"]);
    assert_eq!(listed.routes[0].source, pb::Source::Api as i32);
    let web = proxy.addr("web");
    assert_eq!(
        get(web, "example.com", "/docs/a")
            .await
            .header("x-upstream"),
        Some("v2")
    );
    assert_eq!(v2.hits(), 2);
}

/// The connection, attempt and ejection settings of a pool go through the API, are read
/// back as sent, survive a restart, and are what the data path uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_policy_settings_round_trip_and_take_effect() {
    let live = upstream("live").await;
    let proxy = start_proxy(CONFIG).await;
    let mut api = connect(&proxy).await;
    let sent_outlier = pb::Outlier {
        consecutive_failures: Some(4),
        on_5xx: Some(true),
        base_ejection_ms: Some(2_000),
        max_ejection_ms: Some(60_000),
        max_ejection_percent: Some(30),
    };
    let mut tuned = pb::Pool {
        balance: pb::Balance::Ordered as i32,
        idle_timeout_ms: Some(800),
        max_connections_per_upstream: Some(16),
        body_timeout_ms: Some(7_000),
        connect_deadline_ms: Some(3_000),
        max_attempts: Some(1),
        outlier: Some(sent_outlier),
        h2_keepalive: Some(pb::H2Keepalive {
            interval_ms: Some(30_000),
            timeout_ms: None,
        }),
        // The first upstream refuses connections; with one attempt nothing else is tried.
        ..pool_msg("tuned", &[dead_address(), live.address()])
    };
    create_pool(&mut api, tuned.clone()).await;
    create_route(&mut api, route_msg("all", "", "/", "tuned")).await;

    let read = |api: &Api, name: &'static str| {
        let mut pools = api.pools.clone();
        async move {
            pools
                .get_pool(pb::GetPoolRequest { name: name.into() })
                .await
                .expect("get pool")
                .into_inner()
                .pool
                .expect("pool")
        }
    };
    let got = read(&api, "tuned").await;
    assert_eq!(got.idle_timeout_ms, Some(800));
    assert_eq!(got.max_connections_per_upstream, Some(16));
    assert_eq!(got.body_timeout_ms, Some(7_000));
    assert_eq!(got.connect_deadline_ms, Some(3_000));
    assert_eq!(got.max_attempts, Some(1));
    assert_eq!(got.outlier, Some(sent_outlier));
    // An absent timeout is the default's.
    let sent_keepalive = Some(pb::H2Keepalive {
        interval_ms: Some(30_000),
        timeout_ms: Some(5_000),
    });
    assert_eq!(got.h2_keepalive, sent_keepalive);
    assert_eq!(get(proxy.addr("web"), "a.test", "/").await.status, 502);

    // Absent fields (and an absent outlier message) are the config file's defaults.
    create_pool(&mut api, pool_msg("plain", &[live.address()])).await;
    let plain = read(&api, "plain").await;
    assert_eq!(plain.idle_timeout_ms, Some(1_500));
    assert_eq!(plain.max_connections_per_upstream, Some(0));
    assert_eq!(plain.body_timeout_ms, Some(60_000));
    assert_eq!(plain.connect_deadline_ms, Some(10_000));
    assert_eq!(plain.max_attempts, Some(3));
    assert_eq!(
        plain.outlier,
        Some(pb::Outlier {
            consecutive_failures: Some(1),
            on_5xx: Some(false),
            base_ejection_ms: Some(10_000),
            max_ejection_ms: Some(300_000),
            max_ejection_percent: Some(50),
        })
    );
    assert_eq!(
        plain.h2_keepalive,
        Some(pb::H2Keepalive {
            interval_ms: Some(10_000),
            timeout_ms: Some(5_000),
        })
    );

    // Back to the default attempt budget: the dead upstream is skipped for the live one.
    tuned.max_attempts = None;
    tuned.name = "tuned".into();
    api.pools
        .update_pool(pb::UpdatePoolRequest {
            pool: Some(tuned.clone()),
        })
        .await
        .expect("update pool");
    let response = get(proxy.addr("web"), "b.test", "/").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-upstream"), Some("live"));

    // Stored with the pool: the same after a restart.
    let TestProxy { daemon, dir } = proxy;
    daemon.stop().await;
    let proxy = start_proxy_in(dir, CONFIG).await;
    let api = connect(&proxy).await;
    let got = read(&api, "tuned").await;
    assert_eq!(got.max_attempts, Some(3));
    assert_eq!(got.idle_timeout_ms, Some(800));
    assert_eq!(got.outlier, Some(sent_outlier));
    assert_eq!(got.h2_keepalive, sent_keepalive);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_and_delete_take_effect_immediately() {
    let v1 = upstream("v1").await;
    let v2 = upstream("v2").await;
    let proxy = start_proxy(CONFIG).await;
    let mut api = connect(&proxy).await;
    create_pool(&mut api, pool_msg("v1", &[v1.address()])).await;
    create_pool(&mut api, pool_msg("v2", &[v2.address()])).await;
    create_route(&mut api, route_msg("docs", "", "/docs", "v1")).await;
    let web = proxy.addr("web");
    assert_eq!(
        get(web, "a.example", "/docs").await.header("x-upstream"),
        Some("v1")
    );

    let updated = api
        .routes
        .update_route(pb::UpdateRouteRequest {
            route: Some(route_msg("docs", "A.Example", "/docs", "v2")),
        })
        .await
        .expect("update")
        .into_inner();
    // The stored form is normalised by the state.
    assert_eq!(updated.route.expect("route").host, "a.example");
    assert_eq!(
        get(web, "a.example", "/docs").await.header("x-upstream"),
        Some("v2")
    );

    api.routes
        .delete_route(pb::DeleteRouteRequest {
            name: "docs".into(),
        })
        .await
        .expect("delete");
    assert_eq!(get(web, "a.example", "/docs").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_are_added_drained_and_removed() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let proxy = start_proxy(CONFIG).await;
    let mut api = connect(&proxy).await;
    create_pool(&mut api, pool_msg("p", &[a.address()])).await;
    create_route(&mut api, route_msg("all", "", "/", "p")).await;
    let web = proxy.addr("web");

    api.pools
        .add_upstream(pb::AddUpstreamRequest {
            pool: "p".into(),
            upstream: Some(pb::Upstream {
                address: b.address(),
                weight: 1,
                ..Default::default()
            }),
        })
        .await
        .expect("add upstream");
    api.pools
        .drain_upstream(pb::DrainUpstreamRequest {
            pool: "p".into(),
            address: a.address(),
        })
        .await
        .expect("drain");
    let listed = api
        .pools
        .get_pool(pb::GetPoolRequest { name: "p".into() })
        .await
        .expect("get")
        .into_inner();
    let upstreams = listed.pool.expect("pool").upstreams;
    assert_eq!(upstreams.len(), 2);
    assert_eq!(upstreams[0].state, pb::UpstreamState::Draining as i32);
    assert_eq!(upstreams[1].state, pb::UpstreamState::Active as i32);
    for _ in 0..4 {
        assert_eq!(get(web, "x", "/").await.header("x-upstream"), Some("b"));
    }

    api.pools
        .activate_upstream(pb::ActivateUpstreamRequest {
            pool: "p".into(),
            address: a.address(),
        })
        .await
        .expect("activate");
    api.pools
        .remove_upstream(pb::RemoveUpstreamRequest {
            pool: "p".into(),
            address: b.address(),
        })
        .await
        .expect("remove");
    for _ in 0..3 {
        assert_eq!(get(web, "x", "/").await.header("x-upstream"), Some("a"));
    }
    let pools = api
        .pools
        .list_pools(pb::ListPoolsRequest {})
        .await
        .expect("list")
        .into_inner()
        .pools;
    assert_eq!(pools.len(), 1);
    assert_eq!(pools[0].upstreams.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_routes_forward_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let echo_addr = echo.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf).await {
                    let _ = s.write_all(&buf[..n]).await;
                }
            });
        }
    });
    let proxy = start_proxy(CONFIG).await;
    let mut api = connect(&proxy).await;
    create_pool(&mut api, pool_msg("db", &[echo_addr])).await;
    let created = api
        .routes
        .create_tcp_route(pb::CreateTcpRouteRequest {
            tcp_route: Some(pb::TcpRoute {
                name: "db".into(),
                listener: "db".into(),
                pool: "db".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("create tcp route")
        .into_inner();
    assert_eq!(created.tcp_route.expect("stored").pool, "db");
    let mut conn = tokio::net::TcpStream::connect(proxy.addr("db"))
        .await
        .expect("connect");
    conn.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"ping");

    let listed = api
        .routes
        .list_tcp_routes(pb::ListTcpRoutesRequest {
            listener: "db".into(),
            pool: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.tcp_routes.len(), 1);
    api.routes
        .delete_tcp_route(pb::DeleteTcpRouteRequest { name: "db".into() })
        .await
        .expect("delete");
    let err = api
        .routes
        .get_tcp_route(pb::GetTcpRouteRequest { name: "db".into() })
        .await
        .expect_err("gone");
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_is_atomic_and_export_import_round_trip() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(CONFIG).await;
    let mut api = connect(&proxy).await;
    let change = |c: pb::change::Change| pb::Change { change: Some(c) };

    // A failing batch changes nothing.
    let err = api
        .admin
        .apply(pb::ApplyRequest {
            changes: vec![
                change(pb::change::Change::CreatePool(pool_msg(
                    "v1",
                    &[v1.address()],
                ))),
                change(pb::change::Change::CreateRoute(route_msg(
                    "docs", "", "/docs", "v9",
                ))),
            ],
        })
        .await
        .expect_err("second change is invalid");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("changes[1].route.pool:"),
        "{}",
        err.message()
    );
    let pools = api
        .pools
        .list_pools(pb::ListPoolsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(pools.pools.is_empty());

    let applied = api
        .admin
        .apply(pb::ApplyRequest {
            changes: vec![
                change(pb::change::Change::CreatePool(pool_msg(
                    "v1",
                    &[v1.address()],
                ))),
                change(pb::change::Change::CreateRoute(route_msg(
                    "docs", "", "/docs", "v1",
                ))),
                change(pb::change::Change::CreateRoute(route_msg(
                    "blog", "", "/blog", "v1",
                ))),
            ],
        })
        .await
        .expect("valid batch")
        .into_inner();
    assert_eq!(applied.applied, 3);
    assert_eq!(
        get(proxy.addr("web"), "x", "/blog/1")
            .await
            .header("x-upstream"),
        Some("v1")
    );

    let exported = api
        .admin
        .export(pb::ExportRequest {})
        .await
        .expect("export")
        .into_inner();
    let mut doc = exported.state.expect("document");
    assert_eq!((doc.pools.len(), doc.routes.len()), (1, 2));

    // Target: drop "blog", change "docs", add "api".
    doc.routes.retain(|r| r.name != "blog");
    doc.routes[0].priority = 7;
    doc.routes.push(route_msg("api", "", "/api", "v1"));
    let dry = api
        .admin
        .import(pb::ImportRequest {
            state: Some(doc.clone()),
            dry_run: true,
        })
        .await
        .expect("dry run")
        .into_inner();
    assert_eq!((dry.created, dry.updated, dry.deleted), (1, 1, 1));
    assert_eq!(dry.revision, applied.revision);
    let done = api
        .admin
        .import(pb::ImportRequest {
            state: Some(doc.clone()),
            dry_run: false,
        })
        .await
        .expect("import")
        .into_inner();
    assert_eq!(done.revision, applied.revision + 1, "one atomic batch");
    let again = api
        .admin
        .export(pb::ExportRequest {})
        .await
        .expect("export")
        .into_inner();
    // The export lists by name and marks every object as API-owned.
    doc.routes.sort_by(|a, b| a.name.cmp(&b.name));
    doc.routes
        .iter_mut()
        .for_each(|r| r.source = pb::Source::Api as i32);
    assert_eq!(again.state.expect("document"), doc);
    assert_eq!(get(proxy.addr("web"), "x", "/blog/1").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_the_daemon() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(CONFIG).await;
    let mut api = connect(&proxy).await;
    create_pool(&mut api, pool_msg("v1", &[v1.address()])).await;
    let revision = create_route(&mut api, route_msg("r", "", "/", "v1")).await;
    let status = api
        .admin
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.pid, std::process::id());
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(status.revision, revision);
    assert!(!status.draining);
    let counts = status.counts.expect("counts");
    assert_eq!(
        (
            counts.pools,
            counts.upstreams,
            counts.routes,
            counts.api_objects
        ),
        (1, 1, 1, 2)
    );
    let web = status
        .listeners
        .iter()
        .find(|l| l.name == "web")
        .expect("web listener");
    assert_eq!(web.address, proxy.addr("web").to_string());
    assert_eq!(web.protocol, "http");
}
