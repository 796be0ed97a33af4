//! gRPC clients that send the socket path as `:authority` work on the management unix
//! socket with their default options (Python grpcio here; grpcurl 1.8.6 in
//! `mgmt_reflection.rs`; tonic in every management test), while the TCP management listener
//! and the HTTP data path still refuse such a request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use mgmt_support::*;
use proxy_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/mgmt_support/grpcio_client.py"
);

/// A `python3` that can import grpcio, grpcio-reflection and grpcio-health-checking.
fn python_with_grpcio() -> Option<PathBuf> {
    const INSTALL: &str = "pip install grpcio grpcio-reflection grpcio-health-checking";
    let python = external_program("python3", "Debian package python3")?;
    let imports = Command::new(&python)
        .args([
            "-c",
            "import grpc, grpc_health.v1, grpc_reflection.v1alpha, google.protobuf",
        ])
        .output()
        .expect("run python3");
    if !imports.status.success() {
        missing_component(
            "Python modules grpcio, grpcio-reflection, grpcio-health-checking",
            INSTALL,
        );
        return None;
    }
    Some(python)
}

/// Runs the client script with `args`; its standard output.
async fn grpcio(python: &Path, args: &[String]) -> String {
    let (python, args) = (python.to_path_buf(), args.to_vec());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(CLIENT)
            .args(&args)
            .output()
            .expect("run the grpcio client")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "grpcio client failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_with_default_options_checks_health_lists_and_creates_a_route() {
    let Some(python) = python_with_grpcio() else {
        return;
    };
    let up = upstream("from-python").await;
    let proxy = start_proxy(CONFIG).await;
    let socket = socket_path(&proxy).display().to_string();

    let out = grpcio(&python, &["script".into(), socket, up.address()]).await;
    let line = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} line in:\n{out}"))
            .to_string()
    };
    assert_eq!(line("health"), "SERVING");
    let services = line("services");
    for wanted in [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "proxy.v1.PoolService",
        "proxy.v1.RouteService",
    ] {
        assert!(
            services.split(',').any(|s| s == wanted),
            "{wanted} not in {services}"
        );
    }
    assert!(line("pool").contains("\"revision\""), "{out}");
    assert!(line("route").contains("via-python"), "{out}");

    // The route is in the state and routes traffic.
    let mut api = connect(&proxy).await;
    let route = api
        .routes
        .get_route(pb::GetRouteRequest {
            name: "via-python".into(),
        })
        .await
        .expect("get route")
        .into_inner()
        .route
        .expect("route");
    assert_eq!(route.pool, "py");
    assert_eq!(
        get(proxy.addr("web"), "python.example", "/")
            .await
            .header("x-upstream"),
        Some("from-python")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_as_authority_is_accepted_on_the_unix_socket_only() {
    let Some(python) = python_with_grpcio() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "let-me-in\n").unwrap();
    let config = CONFIG.replace(
        "admin_listen = \"\"",
        &format!(
            "admin_listen = \"\"\nmgmt_listen = \"127.0.0.1:0\"\nmgmt_token_file = \"{}\"",
            token_file.display()
        ),
    );
    let proxy = start_proxy(&config).await;
    let unix = format!("unix:{}", socket_path(&proxy).display());
    let tcp = proxy
        .daemon
        .mgmt_address()
        .expect("TCP listener")
        .to_string();
    let web = proxy.addr("web").to_string();
    let probe = |target: &str, authority: &str, token: &str| {
        let args: Vec<String> = ["probe", target, authority, token]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let python = python.clone();
        async move { grpcio(&python, &args).await.trim().to_string() }
    };
    // What grpc-java and grpcurl 1.8.6 send, and what grpcio 1.85 sends by default for
    // `unix:/run/proxy/mgmt.sock`.
    let path = "/run/proxy/mgmt.sock";
    let encoded = "run%2Fproxy%2Fmgmt.sock";

    for authority in [path, encoded, "localhost"] {
        assert_eq!(
            probe(&unix, authority, "").await,
            "OK SERVING",
            "unix socket, :authority {authority}"
        );
    }
    // The TCP management listener answers a valid authority and resets a path.
    assert_eq!(probe(&tcp, "localhost", "let-me-in").await, "OK SERVING");
    for authority in [path, encoded] {
        let refused = probe(&tcp, authority, "let-me-in").await;
        assert!(
            refused.starts_with("ERR INTERNAL") && refused.contains("RST_STREAM"),
            "TCP listener, :authority {authority}: {refused}"
        );
    }
    // The HTTP data path too: a valid authority reaches the proxy (no route, which proxyd
    // answers to a gRPC call as gRPC does: UNIMPLEMENTED), a path is reset by the HTTP/2
    // layer.
    let no_route = probe(&web, "localhost", "").await;
    assert!(
        no_route.starts_with("ERR UNIMPLEMENTED") && no_route.contains("no route"),
        "data path, valid authority: {no_route}"
    );
    let refused = probe(&web, path, "").await;
    assert!(
        refused.starts_with("ERR INTERNAL") && refused.contains("RST_STREAM"),
        "data path with a path authority: {refused}"
    );
}

/// Frame header: length, type, flags, stream id.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_header_block_on_the_unix_socket_ends_the_connection_with_goaway() {
    let proxy = start_proxy(CONFIG).await;
    let mut socket = UnixStream::connect(socket_path(&proxy)).await.unwrap();
    let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    request.extend(frame(0x4, 0, 0, &[]));
    // HPACK index 0 does not exist: the block cannot be decoded.
    request.extend(frame(0x1, 0x4 | 0x1, 1, &[0x80]));
    socket.write_all(&request).await.unwrap();

    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut received))
        .await
        .expect("the connection is closed")
        .expect("read");
    // Walk the frames the server sent: its SETTINGS, maybe an ACK, then GOAWAY.
    let mut rest = &received[..];
    let mut goaway = None;
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let kind = rest[3];
        let payload = &rest[9..9 + len];
        if kind == 0x7 {
            goaway = Some(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ]));
        }
        rest = &rest[9 + len..];
    }
    assert_eq!(goaway, Some(0x1), "GOAWAY PROTOCOL_ERROR in {received:?}");

    // The socket keeps serving well-formed clients.
    let mut api = connect(&proxy).await;
    api.admin
        .status(pb::StatusRequest {})
        .await
        .expect("status after the bad client");
}
