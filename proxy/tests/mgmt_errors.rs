//! Every status code the management API documents, provoked for real: INVALID_ARGUMENT
//! naming the field, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION (config-file objects,
//! pools in use), UNAVAILABLE (state handed over / draining), UNAUTHENTICATED on the TCP
//! listener, a failed upgrade that leaves the daemon serving; plus the socket rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use common::*;
use mgmt_support::*;
use proxy_proto::v1 as pb;
use tonic::Code;

/// CONFIG plus a pool and a route owned by the config file.
fn declarative_config(upstream: &Upstream) -> String {
    format!(
        "{CONFIG}\n{}\n[[routes]]\nname = \"site\"\nlistener = \"web\"\npool = \"file-pool\"\n",
        pool("file-pool", &[upstream])
    )
}

fn code_and_message<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
) -> (Code, String) {
    let status = result.expect_err("the call must fail");
    (status.code(), status.message().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_names_the_field() {
    let up = upstream("u").await;
    let proxy = start_proxy(CONFIG).await;
    let mut api = connect(&proxy).await;
    create_pool(&mut api, pool_msg("p", &[up.address()])).await;

    let cases: Vec<(pb::Route, &str)> = vec![
        (
            route_msg("r", "", "/", "nope"),
            "route.pool: no pool named \"nope\"",
        ),
        (route_msg("bad name", "", "/", "p"), "route.name:"),
        (route_msg("r", "", "docs", "p"), "route.path:"),
        (route_msg("r", "exa mple.com", "/", "p"), "route.host:"),
        (
            pb::Route {
                listener: "db".into(),
                ..route_msg("r", "", "/", "p")
            },
            "route.listener:",
        ),
        (
            pb::Route {
                path: None,
                ..route_msg("r", "", "/", "p")
            },
            "route.path: set path_prefix or path_exact",
        ),
    ];
    for (route, expected) in cases {
        let (code, message) = code_and_message(
            api.routes
                .create_route(pb::CreateRouteRequest { route: Some(route) })
                .await,
        );
        assert_eq!(code, Code::InvalidArgument, "{message}");
        assert!(
            message.starts_with(expected),
            "{message:?} should start with {expected:?}"
        );
    }
    let (code, message) = code_and_message(
        api.routes
            .create_route(pb::CreateRouteRequest { route: None })
            .await,
    );
    assert_eq!(
        (code, message.as_str()),
        (Code::InvalidArgument, "route: required")
    );

    let bad_upstream = pool_msg("q", &["no-port".to_string()]);
    let (code, message) = code_and_message(
        api.pools
            .create_pool(pb::CreatePoolRequest {
                pool: Some(bad_upstream),
            })
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        message.starts_with("pool.upstreams[0].address:"),
        "{message}"
    );

    let checked = pb::Pool {
        health_check: Some(pb::HealthCheck {
            path: "health".into(),
            interval_ms: 1000,
            timeout_ms: 100,
            ..Default::default()
        }),
        ..pool_msg("q", &[up.address()])
    };
    let (code, message) = code_and_message(
        api.pools
            .create_pool(pb::CreatePoolRequest {
                pool: Some(checked),
            })
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.starts_with("pool.health_check.path:"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_policy_mistakes_name_the_field() {
    let up = upstream("u").await;
    let proxy = start_proxy(CONFIG).await;
    let mut api = connect(&proxy).await;
    let base = || pool_msg("p", &[up.address()]);
    let outlier = |o: pb::Outlier| pb::Pool {
        outlier: Some(o),
        ..base()
    };
    let keepalive = |k: pb::H2Keepalive| pb::Pool {
        protocol: pb::UpstreamProtocol::H2c as i32,
        h2_keepalive: Some(k),
        ..base()
    };
    let cases: Vec<(pb::Pool, &str)> = vec![
        (
            outlier(pb::Outlier {
                max_ejection_percent: Some(101),
                ..Default::default()
            }),
            "pool.outlier.max_ejection_percent: must be at most 100",
        ),
        (
            outlier(pb::Outlier {
                consecutive_failures: Some(0),
                ..Default::default()
            }),
            "pool.outlier.consecutive_failures: must be at least 1",
        ),
        (
            outlier(pb::Outlier {
                base_ejection_ms: Some(0),
                ..Default::default()
            }),
            "pool.outlier.base_ejection_ms: must be positive",
        ),
        (
            outlier(pb::Outlier {
                max_ejection_ms: Some(0),
                ..Default::default()
            }),
            "pool.outlier.max_ejection_ms: must be positive",
        ),
        (
            pb::Pool {
                max_attempts: Some(0),
                ..base()
            },
            "pool.max_attempts: must be at least 1",
        ),
        (
            pb::Pool {
                idle_timeout_ms: Some(0),
                ..base()
            },
            "pool.idle_timeout_ms: must be positive",
        ),
        (
            pb::Pool {
                body_timeout_ms: Some(0),
                ..base()
            },
            "pool.body_timeout_ms: must be positive",
        ),
        (
            pb::Pool {
                connect_deadline_ms: Some(0),
                ..base()
            },
            "pool.connect_deadline_ms: must be positive",
        ),
        (
            keepalive(pb::H2Keepalive {
                interval_ms: None,
                timeout_ms: Some(5000),
            }),
            "pool.h2_keepalive.interval_ms: required when h2_keepalive is set (PINGs are sent every interval; a timeout alone sends none)",
        ),
        (
            keepalive(pb::H2Keepalive {
                interval_ms: Some(0),
                timeout_ms: None,
            }),
            "pool.h2_keepalive.interval_ms: must be positive",
        ),
        (
            keepalive(pb::H2Keepalive {
                interval_ms: Some(1000),
                timeout_ms: Some(0),
            }),
            "pool.h2_keepalive.timeout_ms: must be positive",
        ),
        (
            keepalive(pb::H2Keepalive {
                interval_ms: Some(2 * 86_400_000),
                timeout_ms: None,
            }),
            "pool.h2_keepalive.interval_ms: must be at most 24h",
        ),
    ];
    for (pool, expected) in cases {
        let (code, message) = code_and_message(
            api.pools
                .create_pool(pb::CreatePoolRequest { pool: Some(pool) })
                .await,
        );
        assert_eq!(code, Code::InvalidArgument, "{message}");
        assert_eq!(message, expected);
    }
    // In a batch the position comes first; nothing of a refused batch is applied.
    let (code, message) = code_and_message(
        api.admin
            .apply(pb::ApplyRequest {
                changes: vec![pb::Change {
                    change: Some(pb::change::Change::CreatePool(outlier(pb::Outlier {
                        max_ejection_percent: Some(200),
                        ..Default::default()
                    }))),
                }],
            })
            .await,
    );
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(
        message.ends_with("outlier.max_ejection_percent: must be at most 100"),
        "{message}"
    );
    let listed = api
        .pools
        .list_pools(pb::ListPoolsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(listed.pools.is_empty(), "{:?}", listed.pools);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_already_exists_and_failed_precondition() {
    let up = upstream("u").await;
    let proxy = start_proxy(&declarative_config(&up)).await;
    let mut api = connect(&proxy).await;

    // NOT_FOUND
    let (code, _) = code_and_message(
        api.routes
            .get_route(pb::GetRouteRequest {
                name: "nope".into(),
            })
            .await,
    );
    assert_eq!(code, Code::NotFound);
    let (code, message) = code_and_message(
        api.routes
            .delete_route(pb::DeleteRouteRequest {
                name: "nope".into(),
            })
            .await,
    );
    assert_eq!(
        (code, message.as_str()),
        (Code::NotFound, "route \"nope\" not found")
    );
    let (code, _) = code_and_message(
        api.pools
            .get_pool(pb::GetPoolRequest {
                name: "nope".into(),
            })
            .await,
    );
    assert_eq!(code, Code::NotFound);
    let (code, _) = code_and_message(
        api.pools
            .drain_upstream(pb::DrainUpstreamRequest {
                pool: "nope".into(),
                address: up.address(),
            })
            .await,
    );
    assert_eq!(code, Code::NotFound);

    // ALREADY_EXISTS
    create_pool(&mut api, pool_msg("api-pool", &[up.address()])).await;
    let (code, message) = code_and_message(
        api.pools
            .create_pool(pb::CreatePoolRequest {
                pool: Some(pool_msg("api-pool", &[up.address()])),
            })
            .await,
    );
    assert_eq!(
        (code, message.as_str()),
        (Code::AlreadyExists, "pool \"api-pool\" already exists")
    );

    // FAILED_PRECONDITION: objects from the config file are read-only here...
    let listed = api
        .routes
        .get_route(pb::GetRouteRequest {
            name: "site".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        listed.route.expect("route").source,
        pb::Source::Declarative as i32
    );
    let (code, message) = code_and_message(
        api.routes
            .delete_route(pb::DeleteRouteRequest {
                name: "site".into(),
            })
            .await,
    );
    assert_eq!(code, Code::FailedPrecondition);
    assert!(message.contains("config file"), "{message}");
    let (code, _) = code_and_message(
        api.pools
            .add_upstream(pb::AddUpstreamRequest {
                pool: "file-pool".into(),
                upstream: Some(pb::Upstream {
                    address: "127.0.0.1:9".into(),
                    ..Default::default()
                }),
            })
            .await,
    );
    assert_eq!(code, Code::FailedPrecondition);
    // ...and so is a pool still in use.
    create_route(&mut api, route_msg("uses-api-pool", "", "/api", "api-pool")).await;
    let (code, message) = code_and_message(
        api.pools
            .delete_pool(pb::DeletePoolRequest {
                name: "api-pool".into(),
            })
            .await,
    );
    assert_eq!(code, Code::FailedPrecondition);
    assert!(message.contains("in use"), "{message}");
    // Routing of the config file's route is untouched.
    assert_eq!(
        get(proxy.addr("web"), "x", "/").await.header("x-upstream"),
        Some("u")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_once_the_state_takes_no_writes() {
    let up = upstream("u").await;
    let proxy = start_proxy(CONFIG).await;
    let mut api = connect(&proxy).await;
    create_pool(&mut api, pool_msg("p", &[up.address()])).await;
    // What a handoff to the next process does: the store stops taking writes.
    proxy.daemon.state().close().await;
    let (code, message) = code_and_message(
        api.routes
            .create_route(pb::CreateRouteRequest {
                route: Some(route_msg("r", "", "/", "p")),
            })
            .await,
    );
    assert_eq!(code, Code::Unavailable, "{message}");
    // Reads still work.
    let pools = api
        .pools
        .list_pools(pb::ListPoolsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(pools.pools.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upgrade_keeps_serving_and_drain_refuses_writes() {
    let up = upstream("u").await;
    // A binary that cannot start: the call fails and this daemon keeps serving. (Never the
    // default binary here: in a test that is the test executable itself.)
    let proxy = start_proxy(&CONFIG.replace(
        "admin_listen = \"\"",
        "admin_listen = \"\"\nexecutable = \"/nonexistent/proxyd\"",
    ))
    .await;
    let mut api = connect(&proxy).await;
    let (code, message) =
        code_and_message(api.admin.upgrade(pb::UpgradeRequest { wait: true }).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("keeps serving"), "{message}");
    create_pool(&mut api, pool_msg("p", &[up.address()])).await;

    let drained = api
        .admin
        .drain(pb::DrainRequest { timeout_ms: 1000 })
        .await
        .expect("drain")
        .into_inner();
    assert!(
        drained.message.contains("stopped accepting"),
        "{}",
        drained.message
    );
    // Draining: changes are refused with UNAVAILABLE.
    let (code, message) = code_and_message(
        api.routes
            .create_route(pb::CreateRouteRequest {
                route: Some(route_msg("r", "", "/", "p")),
            })
            .await,
    );
    assert_eq!(code, Code::Unavailable, "{message}");
}

fn tcp_config(token_file: &std::path::Path) -> String {
    CONFIG.replace(
        "admin_listen = \"\"",
        &format!(
            "admin_listen = \"\"\nmgmt_listen = \"127.0.0.1:0\"\nmgmt_token_file = \"{}\"",
            token_file.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_requires_the_bearer_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "let-me-in\n").expect("write token");
    let proxy = start_proxy(&tcp_config(&token_file)).await;
    let addr = proxy
        .daemon
        .mgmt_address()
        .expect("TCP management listener");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");

    let status_with = |token: Option<&'static str>| {
        let channel = channel.clone();
        async move {
            let mut client =
                proxy_proto::v1::admin_service_client::AdminServiceClient::new(channel);
            let mut request = tonic::Request::new(pb::StatusRequest {});
            if let Some(t) = token {
                request
                    .metadata_mut()
                    .insert("authorization", t.parse().expect("ascii"));
            }
            client
                .status(request)
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    };
    assert_eq!(status_with(None).await, Err(Code::Unauthenticated));
    assert_eq!(
        status_with(Some("Bearer wrong")).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        status_with(Some("let-me-in")).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(status_with(Some("Bearer let-me-in")).await, Ok(()));
    // Reflection and health sit behind the token too.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let err = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_refuses_to_start_without_a_token() {
    // No token file configured: the config itself is refused.
    let text = CONFIG.replace("{state}", "/tmp/unused").replace(
        "admin_listen = \"\"",
        "admin_listen = \"\"\nmgmt_listen = \"127.0.0.1:0\"",
    );
    let err = proxy::Config::parse(&text, "t.toml").expect_err("token file required");
    assert!(err.to_string().starts_with("t.toml:"), "{err}");
    assert!(
        err.to_string()
            .contains("server.mgmt_listen: requires mgmt_token_file"),
        "{err}"
    );

    // A token file that is missing or empty: the daemon does not start.
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").expect("write");
    for token_file in [dir.path().join("missing-token"), empty] {
        let state = tempfile::tempdir().expect("temp dir");
        let text = tcp_config(&token_file).replace("{state}", &state.path().display().to_string());
        let config = proxy::Config::parse(&text, "t.toml").expect("valid config");
        let err = proxy::Daemon::start(config)
            .await
            .err()
            .expect("must not start");
        assert!(err.to_string().contains("mgmt_token_file"), "{err}");
        assert!(
            !state.path().join("mgmt.sock").exists(),
            "no socket left behind"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_fresh_private_and_never_stolen() {
    use std::os::unix::fs::PermissionsExt;
    let state = tempfile::tempdir().expect("temp dir");
    let socket = state.path().join("mgmt.sock");
    // A stale socket file, as left by a crash: replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    let first = start_proxy_in(state, CONFIG).await;
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
    let mut api = connect(&first).await;
    api.admin
        .status(pb::StatusRequest {})
        .await
        .expect("serves on the replaced socket");

    // A second daemon on the same socket (other state dir) is refused with a clear error.
    let other = tempfile::tempdir().expect("temp dir");
    let text = CONFIG
        .replace("{state}", &other.path().display().to_string())
        .replace(
            "admin_listen = \"\"",
            &format!(
                "admin_listen = \"\"\nmgmt_socket = \"{}\"",
                socket.display()
            ),
        );
    let config = proxy::Config::parse(&text, "t.toml").expect("valid config");
    let err = proxy::Daemon::start(config)
        .await
        .err()
        .expect("second daemon refused");
    assert!(
        err.to_string().contains("another proxyd is serving it"),
        "{err}"
    );
    // The first one is unaffected.
    api.admin
        .status(pb::StatusRequest {})
        .await
        .expect("still serving");

    // Stopping removes the socket file.
    let TestProxy { daemon, dir } = first;
    daemon.stop().await;
    for _ in 0..100 {
        if !socket.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!socket.exists(), "socket removed at stop");
    drop(dir);
}
