//! The access log as an operator sees it: `proxyd` runs as a process with every log level on,
//! and its stdout and stderr are searched for the secrets a request and its response carried;
//! gRPC calls carry their gRPC status next to the HTTP status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod grpc_support;
mod tls_support;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PROXYD: &str = env!("CARGO_BIN_EXE_proxyd");

const SECRETS: [&str; 6] = [
    "AUTHSECRET",
    "COOKIESECRET",
    "SETCOOKIESECRET",
    "APIKEYSECRET",
    "PROXYSECRET",
    "QUERYSECRET",
];

/// An upstream that answers every request with a `Set-Cookie` carrying a secret.
async fn cookie_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let body = "hello";
                        let response = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nSet-Cookie: session=SETCOOKIESECRET; HttpOnly\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
            });
        }
    });
    addr
}

struct Proxyd {
    child: Child,
    lines: mpsc::Receiver<(&'static str, String)>,
    seen: Vec<(&'static str, String)>,
}

impl Drop for Proxyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxyd {
    fn start(dir: &std::path::Path, config: &str) -> Proxyd {
        let path = dir.join("proxy.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(PROXYD)
            .arg("--config")
            .arg(&path)
            .current_dir(dir)
            .env("RUST_LOG", "trace")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        fn pump(
            stream: impl Read + Send + 'static,
            name: &'static str,
            tx: mpsc::Sender<(&'static str, String)>,
        ) {
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    if tx.send((name, line)).is_err() {
                        return;
                    }
                }
            });
        }
        pump(child.stdout.take().unwrap(), "stdout", tx.clone());
        pump(child.stderr.take().unwrap(), "stderr", tx);
        Proxyd {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (up to 30 s) for a line on `stream` containing `needle`.
    fn wait_for(&mut self, stream: &str, needle: &str) -> String {
        if let Some((_, l)) = self
            .seen
            .iter()
            .find(|(s, l)| *s == stream && l.contains(needle))
        {
            return l.clone();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok((s, line)) => {
                    self.seen.push((s, line.clone()));
                    if s == stream && line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no {stream} line containing {needle:?}; saw:\n{}",
            self.dump()
        );
    }

    /// Stops the process with SIGTERM and collects everything it wrote.
    fn stop(mut self) -> Vec<(&'static str, String)> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..300 {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The pipes close when the process is gone; take the rest.
        while let Ok(pair) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(pair);
        }
        std::mem::take(&mut self.seen)
    }

    fn dump(&self) -> String {
        self.seen
            .iter()
            .map(|(s, l)| format!("{s}: {l}\n"))
            .collect()
    }
}

async fn wait_for_port(port: u16) {
    for _ in 0..300 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("port {port} never opened");
}

fn config(dir: &std::path::Path, port: u16, upstream: SocketAddr, telemetry: &str) -> String {
    format!(
        r#"[server]
state_dir = "{dir}/state"
admin_listen = ""

[telemetry]
{telemetry}

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:{port}"

[[pools]]
name = "app"
upstreams = ["{upstream}"]

[[routes]]
name = "login"
listener = "web"
host = "app.example"
pool = "app"
"#,
        dir = dir.display()
    )
}

const SECRET_REQUEST: &str = "GET /login?token=QUERYSECRET HTTP/1.1\r\nHost: app.example\r\nUser-Agent: telemetry-test\r\nAuthorization: Bearer AUTHSECRET\r\nProxy-Authorization: Basic PROXYSECRET\r\nCookie: sid=COOKIESECRET\r\nX-Api-Key: APIKEYSECRET\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_any_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = cookie_upstream().await;
    let port = free_port();
    let telemetry = r#"access_log = "json"
log_headers = ["user-agent", "authorization", "cookie", "x-api-key"]
redact_headers = ["x-api-key"]"#;
    let mut proxyd = Proxyd::start(dir.path(), &config(dir.path(), port, upstream, telemetry));
    wait_for_port(port).await;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    let r = raw(addr, SECRET_REQUEST.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The client does get its cookie: only the logs must not show it.
    assert!(r
        .header("set-cookie")
        .unwrap_or("")
        .contains("SETCOOKIESECRET"));
    // A failed request too: its error detail goes to the log.
    let failed = raw(addr, b"GET /?token=QUERYSECRET HTTP/1.1\r\nHost: nowhere.example\r\nAuthorization: Bearer AUTHSECRET\r\nConnection: close\r\n\r\n").await;
    assert_eq!(failed.status, 404);

    let line = proxyd.wait_for("stdout", "\"route\":\"login\"");
    let json: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(json["status"], 200, "{line}");
    assert_eq!(
        json["path"], "/login",
        "the query is left out by default: {line}"
    );
    assert_eq!(json["pool"], "app");
    assert_eq!(json["upstream"], upstream.to_string());
    // The upstream's time to its response head is set, and within the whole request's.
    let upstream_us = json["upstream_us"].as_u64().expect("upstream_us");
    let duration_us = json["duration_us"].as_u64().expect("duration_us");
    assert!(
        upstream_us > 0 && upstream_us <= duration_us,
        "upstream_us {upstream_us}, duration_us {duration_us}: {line}"
    );
    assert_eq!(
        json["headers"], "user-agent=telemetry-test; authorization=[redacted]; cookie=[redacted]; x-api-key=[redacted]",
        "{line}"
    );
    let failed_line = proxyd.wait_for("stdout", "\"status\":404");
    assert!(
        failed_line.contains("\"error_source\":\"proxy\""),
        "{failed_line}"
    );
    // No upstream answered it.
    assert!(failed_line.contains("\"upstream_us\":0,"), "{failed_line}");

    let all = proxyd.stop();
    assert!(
        all.len() > 5,
        "trace logging was on; expected more lines:\n{all:?}"
    );
    for (stream, line) in &all {
        for secret in SECRETS {
            assert!(
                !line.contains(secret),
                "{secret} leaked on {stream}: {line}"
            );
        }
    }
    // Access lines go to stdout only, diagnostics to stderr only.
    assert!(
        all.iter()
            .filter(|(s, l)| *s == "stderr" && l.contains("\"route\":\"login\""))
            .count()
            == 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logfmt_lines_with_the_query_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = cookie_upstream().await;
    let port = free_port();
    let mut proxyd = Proxyd::start(
        dir.path(),
        &config(
            dir.path(),
            port,
            upstream,
            "access_log = \"logfmt\"\ninclude_query = true",
        ),
    );
    wait_for_port(port).await;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let r = get(addr, "app.example", "/search?q=shoes").await;
    assert_eq!(r.status, 200);
    let line = proxyd.wait_for("stdout", "route=login");
    assert!(line.starts_with("ts="), "{line}");
    assert!(
        line.contains(r#" path="/search?q=shoes" "#),
        "values with = are quoted: {line}"
    );
    assert!(line.contains(" status=200 "), "{line}");
    assert!(line.contains(" pool=app "), "{line}");
    assert!(
        !line.contains("headers="),
        "no header is logged unless configured: {line}"
    );
    drop(proxyd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_off_writes_nothing_to_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = cookie_upstream().await;
    let port = free_port();
    let mut proxyd = Proxyd::start(
        dir.path(),
        &config(dir.path(), port, upstream, "access_log = \"off\""),
    );
    wait_for_port(port).await;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    assert_eq!(get(addr, "app.example", "/").await.status, 200);
    // Diagnostics still flow (to stderr); everything written is collected once it exits.
    proxyd.wait_for("stderr", "listening");
    let all = proxyd.stop();
    let stdout: Vec<_> = all.iter().filter(|(s, _)| *s == "stdout").collect();
    assert!(stdout.is_empty(), "{stdout:?}");
}

/// The access line of a gRPC call carries `grpc_status` next to `status`: the upstream's
/// (from the trailers, or from the head of a Trailers-Only answer) and proxyd's own when it
/// fails the call (no route: UNIMPLEMENTED; upstream refused: UNAVAILABLE). Plain HTTP
/// lines have no such field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_log_their_grpc_status() {
    use proxy_proto::testing::echo_client::EchoClient;
    use proxy_proto::testing::EchoRequest;
    use tonic::Code;

    let dir = tempfile::tempdir().unwrap();
    let up = grpc_support::grpc_upstream("logged", None).await;
    let port = free_port();
    let config = format!(
        r#"[server]
state_dir = "{dir}/state"
admin_listen = ""

[telemetry]
access_log = "json"

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:{port}"

[[pools]]
name = "echo"
upstreams = ["{up}"]
protocol = "h2c"

[[pools]]
name = "gone"
upstreams = ["{gone}"]
protocol = "h2c"

[[routes]]
name = "echo"
listener = "web"
path_prefix = "/proxy.testing.Echo/"
pool = "echo"

[[routes]]
name = "gone"
listener = "web"
path_prefix = "/grpc.health.v1.Health/"
pool = "gone"
"#,
        dir = dir.path().display(),
        up = up.address(),
        gone = dead_address(),
    );
    let mut proxyd = Proxyd::start(dir.path(), &config);
    wait_for_port(port).await;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut echo = EchoClient::new(channel.clone());

    // OK, its status in the trailers after streamed messages.
    let mut stream = echo
        .server_stream(EchoRequest {
            message: "fine".into(),
            count: 2,
            ..Default::default()
        })
        .await
        .expect("stream")
        .into_inner();
    while stream.message().await.expect("message").is_some() {}
    // NOT_FOUND from the upstream.
    let status = echo
        .unary(EchoRequest {
            message: "absent".into(),
            fail_code: Code::NotFound as i32,
            ..Default::default()
        })
        .await
        .expect_err("the upstream fails the call");
    assert_eq!(status.code(), Code::NotFound);
    // proxyd's own failures: no route, and a pool whose upstream refuses connections.
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect_err("the upstream refuses");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let noroute = raw(
        addr,
        b"POST /other.v1.Service/Call HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc\r\nTE: trailers\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(noroute.status, 200);
    assert_eq!(noroute.header("grpc-status"), Some("12"));
    // A plain HTTP request: no gRPC status in its line.
    assert_eq!(get(addr, "x", "/plain").await.status, 404);

    let line_of = |proxyd: &mut Proxyd, needle: &str| {
        let line = proxyd.wait_for("stdout", needle);
        let json: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        json
    };
    let ok = line_of(&mut proxyd, "\"path\":\"/proxy.testing.Echo/ServerStream\"");
    assert_eq!(
        (&ok["status"], &ok["grpc_status"]),
        (&200.into(), &0.into()),
        "{ok}"
    );
    assert_eq!(ok["route"], "echo", "{ok}");
    let not_found = line_of(&mut proxyd, "\"grpc_status\":5");
    assert_eq!(
        not_found["path"], "/proxy.testing.Echo/Unary",
        "{not_found}"
    );
    assert_eq!(not_found["status"], 200, "{not_found}");
    assert_eq!(not_found["upstream"], up.address(), "{not_found}");
    let refused = line_of(&mut proxyd, "\"path\":\"/grpc.health.v1.Health/Watch\"");
    assert_eq!(refused["grpc_status"], 14, "{refused}");
    assert_eq!(refused["status"], 200, "{refused}");
    assert_eq!(refused["error_source"], "upstream", "{refused}");
    let unrouted = line_of(&mut proxyd, "\"path\":\"/other.v1.Service/Call\"");
    assert_eq!(unrouted["grpc_status"], 12, "{unrouted}");
    assert_eq!(unrouted["status"], 200, "{unrouted}");
    assert_eq!(unrouted["error_source"], "proxy", "{unrouted}");
    let plain = line_of(&mut proxyd, "\"path\":\"/plain\"");
    assert_eq!(plain["status"], 404, "{plain}");
    assert!(plain.get("grpc_status").is_none(), "{plain}");
    drop(proxyd);
}

/// Lines are buffered and written off the request path: a graceful stop right after the
/// last response still writes every request's line, each one whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_is_written_by_a_graceful_stop() {
    const CLIENTS: usize = 8;
    const EACH: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let upstream = cookie_upstream().await;
    let port = free_port();
    let proxyd = Proxyd::start(
        dir.path(),
        &config(dir.path(), port, upstream, "access_log = \"json\""),
    );
    wait_for_port(port).await;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(async move {
                for i in 0..EACH {
                    let request = format!(
                        "GET /line/{c}/{i} HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n"
                    );
                    assert_eq!(raw(addr, request.as_bytes()).await.status, 200);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    // SIGTERM at once: the lines of the last requests are still in their buffers.
    let all = proxyd.stop();
    let mut seen = std::collections::HashSet::new();
    for (_, line) in all.iter().filter(|(s, _)| *s == "stdout") {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a whole line ({e}): {line}"));
        let path = json["path"].as_str().unwrap().to_string();
        assert!(seen.insert(path.clone()), "{path} logged twice");
    }
    for c in 0..CLIENTS {
        for i in 0..EACH {
            assert!(
                seen.contains(&format!("/line/{c}/{i}")),
                "no line for /line/{c}/{i}; {} lines written",
                seen.len()
            );
        }
    }
}
