//! `proxyctl` run as a process against a real proxyd (in-process, real unix socket, SQLite in
//! a temp dir) with real upstreams on 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PROXYCTL: &str = env!("CARGO_BIN_EXE_proxyctl");

/// An HTTP upstream answering every request with `x-upstream: NAME`.
async fn upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nx-upstream: {name}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// The `x-upstream` header of `GET path` with `Host: host`, or the status line.
async fn served_by(addr: SocketAddr, host: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect to proxy");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
        .lines()
        .find_map(|l| l.strip_prefix("x-upstream: "))
        .map(str::to_owned)
        .unwrap_or_else(|| response.lines().next().unwrap_or("").to_owned())
}

struct Daemon {
    daemon: proxy::Daemon,
    _dir: tempfile::TempDir,
}

impl Daemon {
    async fn start(extra_server: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = format!(
            "[server]\nstate_dir = \"{}\"\nadmin_listen = \"\"\n{extra_server}\n\
             [[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:0\"\n",
            dir.path().display()
        );
        let config = proxy::Config::parse(&text, "test.toml").expect("valid config");
        let daemon = proxy::Daemon::start(config).await.expect("daemon starts");
        Daemon { daemon, _dir: dir }
    }

    fn socket(&self) -> PathBuf {
        self.daemon.config().server.mgmt_socket.clone()
    }

    fn web(&self) -> SocketAddr {
        self.daemon.listener_address("web").expect("web listener")
    }

    /// Runs `proxyctl --socket SOCKET args...`.
    async fn ctl(&self, args: &[&str]) -> Output {
        let mut command = tokio::process::Command::new(PROXYCTL);
        command.arg("--socket").arg(self.socket()).args(args);
        command.output().await.expect("run proxyctl")
    }

    /// Runs proxyctl and requires success; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args).await;
        assert!(
            out.status.success(),
            "proxyctl {args:?} failed: {}",
            stderr(&out)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    async fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.ok(&full).await).expect("JSON output")
    }

    async fn revision(&self) -> u64 {
        self.json(&["status"]).await["revision"]
            .as_u64()
            .expect("revision")
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nouns_and_verbs_drive_a_live_daemon() {
    let v1 = upstream("v1").await;
    let v2 = upstream("v2").await;
    let d = Daemon::start("").await;

    let out = d
        .ok(&["pools", "add", "v1", "--upstream", &v1.to_string()])
        .await;
    assert!(out.contains("pool \"v1\" created"), "{out}");
    d.ok(&[
        "pools",
        "add",
        "v2",
        "--upstream",
        &v2.to_string(),
        "--balance",
        "least_conn",
    ])
    .await;
    d.ok(&["routes", "add", "--listener", "web", "--pool", "v1", "site"])
        .await;
    let out = d
        .ok(&[
            "routes",
            "add",
            "--listener",
            "web",
            "--host",
            "example.com",
            "--path-prefix",
            "/docs",
            "--pool",
            "v2",
            "docs",
        ])
        .await;
    assert!(out.contains("route \"docs\" created"), "{out}");
    assert_eq!(served_by(d.web(), "example.com", "/docs/intro").await, "v2");
    assert_eq!(served_by(d.web(), "example.com", "/blog").await, "v1");

    let table = d.ok(&["routes", "list"]).await;
    let mut lines = table.lines();
    let header = lines.next().expect("header");
    assert!(
        header.starts_with("NAME") && header.contains("POOL"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("docs ") && l.contains("example.com") && l.contains("/docs")),
        "{table}"
    );

    let routes = d.json(&["routes", "list"]).await;
    let docs = routes
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["name"] == "docs")
        .expect("docs");
    assert_eq!(docs["path_prefix"], "/docs");
    assert_eq!(docs["source"], "api");

    d.ok(&["upstreams", "add", "v2", "127.0.0.1:9", "--weight", "3"])
        .await;
    d.ok(&["upstreams", "drain", "v2", "127.0.0.1:9"]).await;
    let pool = d.json(&["pools", "get", "v2"]).await;
    assert_eq!(pool["balance"], "least_conn");
    assert_eq!(pool["upstreams"][1]["state"], "draining");
    assert_eq!(pool["upstreams"][1]["weight"], 3);
    d.ok(&["upstreams", "rm", "v2", "127.0.0.1:9"]).await;
    let listed = d.ok(&["upstreams", "list", "v2"]).await;
    assert!(!listed.contains("127.0.0.1:9 "), "{listed}");

    // Errors: non-zero exit and the server's own words.
    let out = d.ctl(&["routes", "rm", "nope"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("NOT_FOUND: route \"nope\" not found"),
        "{}",
        stderr(&out)
    );
    let out = d.ctl(&["pools", "rm", "v2"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("FAILED_PRECONDITION"),
        "{}",
        stderr(&out)
    );
    let out = d
        .ctl(&["routes", "add", "--listener", "web", "--pool", "nope", "x"])
        .await;
    assert!(
        stderr(&out).contains("INVALID_ARGUMENT: route.pool: no pool named \"nope\""),
        "{}",
        stderr(&out)
    );

    // The socket from the environment.
    let out = tokio::process::Command::new(PROXYCTL)
        .args(["routes", "get", "docs"])
        .env("PROXY_MGMT_SOCKET", d.socket())
        .output()
        .await
        .expect("run proxyctl");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("docs"));

    d.ok(&["routes", "rm", "docs"]).await;
    assert_eq!(served_by(d.web(), "example.com", "/docs/intro").await, "v1");

    let status = d.ok(&["status"]).await;
    assert!(
        status.contains("revision") && status.contains("web"),
        "{status}"
    );

    // No daemon at the socket: a clear error.
    let out = tokio::process::Command::new(PROXYCTL)
        .args(["--socket", "/nonexistent/mgmt.sock", "status"])
        .output()
        .await
        .expect("run proxyctl");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot connect to /nonexistent/mgmt.sock"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_import_is_one_atomic_batch() {
    let v1 = upstream("v1").await;
    let v2 = upstream("v2").await;
    let d = Daemon::start("").await;
    let files = tempfile::tempdir().expect("temp dir");
    d.ok(&["pools", "add", "v1", "--upstream", &v1.to_string()])
        .await;
    d.ok(&["pools", "add", "v2", "--upstream", &v2.to_string()])
        .await;
    d.ok(&["routes", "add", "--listener", "web", "--pool", "v1", "site"])
        .await;

    let mut csv = String::from("name,host,path_prefix,pool\n");
    for i in 0..2000 {
        csv.push_str(&format!("move-{i},example.com,/content/{i}/,v2\n"));
    }
    let rules = write(files.path(), "rules.csv", &csv);
    let before = d.revision().await;
    let out = d
        .ok(&[
            "routes",
            "import",
            rules.to_str().expect("utf-8"),
            "--listener",
            "web",
        ])
        .await;
    assert!(out.contains("imported 2000 routes"), "{out}");
    assert_eq!(d.revision().await, before + 1, "one batch, one revision");
    assert_eq!(
        served_by(d.web(), "example.com", "/content/1999/page").await,
        "v2"
    );
    assert_eq!(served_by(d.web(), "example.com", "/content/x").await, "v1");

    // One bad row refuses the whole file.
    let bad = write(
        files.path(),
        "bad.csv",
        "name,path_prefix,pool\nok-1,/ok/1,v2\nok-2,/ok/2,missing\n",
    );
    let out = d
        .ctl(&[
            "routes",
            "import",
            bad.to_str().expect("utf-8"),
            "--listener",
            "web",
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("changes[1].route.pool"),
        "{}",
        stderr(&out)
    );
    let out = d.ctl(&["routes", "get", "ok-1"]).await;
    assert!(stderr(&out).contains("NOT_FOUND"), "{}", stderr(&out));

    // --update replaces existing names: move them back to v1.
    let back = write(
        files.path(),
        "back.csv",
        "name,host,path_prefix,pool\nmove-7,example.com,/content/7/,v1\n",
    );
    let out = d
        .ok(&[
            "routes",
            "import",
            back.to_str().expect("utf-8"),
            "--listener",
            "web",
            "--update",
        ])
        .await;
    assert!(out.contains("0 created, 1 updated"), "{out}");
    assert_eq!(
        served_by(d.web(), "example.com", "/content/7/a").await,
        "v1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_export_and_import_between_daemons() {
    let v1 = upstream("v1").await;
    let d = Daemon::start("").await;
    let files = tempfile::tempdir().expect("temp dir");
    let batch = write(
        files.path(),
        "batch.toml",
        &format!(
            r#"
[[changes]]
op = "create_pool"
name = "v1"
upstreams = [{{ address = "{v1}" }}]

[[changes]]
op = "create_route"
name = "docs"
listener = "web"
host = "example.com"
path_prefix = "/docs"
pool = "v1"

[[changes]]
op = "create_route"
name = "exact"
listener = "web"
path_exact = "/health"
pool = "v1"
"#
        ),
    );
    let out = d.ok(&["apply", batch.to_str().expect("utf-8")]).await;
    assert!(out.contains("applied 3 changes"), "{out}");
    assert_eq!(served_by(d.web(), "example.com", "/docs").await, "v1");

    // A failing batch (JSON this time) changes nothing.
    let bad = write(
        files.path(),
        "bad.json",
        r#"{"changes": [{"op": "delete_route", "name": "docs"}, {"op": "delete_pool", "name": "nope"}]}"#,
    );
    let out = d.ctl(&["apply", bad.to_str().expect("utf-8")]).await;
    assert!(stderr(&out).contains("NOT_FOUND"), "{}", stderr(&out));
    assert_eq!(served_by(d.web(), "example.com", "/docs").await, "v1");

    let exported = d.ok(&["export"]).await;
    let file = write(files.path(), "state.json", &exported);
    let other = Daemon::start("").await;
    let out = other
        .ok(&["import", "--dry-run", file.to_str().expect("utf-8")])
        .await;
    assert!(
        out.contains("dry run: 3 created, 0 updated, 0 deleted"),
        "{out}"
    );
    assert!(
        other.ok(&["routes", "list"]).await.lines().count() == 1,
        "dry run changed nothing"
    );
    other.ok(&["import", file.to_str().expect("utf-8")]).await;
    assert_eq!(other.ok(&["export"]).await, exported);
    assert_eq!(served_by(other.web(), "example.com", "/docs").await, "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_take_and_show_connection_and_ejection_settings() {
    let v1 = upstream("v1").await;
    let d = Daemon::start("").await;
    d.ok(&[
        "pools",
        "add",
        "tuned",
        "--upstream",
        &v1.to_string(),
        "--idle-timeout",
        "800ms",
        "--max-connections-per-upstream",
        "16",
        "--body-timeout",
        "7s",
        "--connect-deadline",
        "3s",
        "--max-attempts",
        "2",
        "--outlier-consecutive-failures",
        "4",
        "--outlier-on-5xx",
        "--outlier-base-ejection",
        "2s",
        "--outlier-max-ejection",
        "1m",
        "--outlier-max-ejection-percent",
        "30",
        "--protocol",
        "h2c",
        "--h2-keepalive-interval",
        "30s",
        "--h2-idle-timeout",
        "2m",
    ])
    .await;
    let pool = &d.json(&["pools", "get", "tuned"]).await;
    assert_eq!(pool["h2_idle_timeout_ms"], 120_000, "{pool}");
    // The timeout left out is the default's.
    assert_eq!(pool["h2_keepalive"]["interval_ms"], 30_000, "{pool}");
    assert_eq!(pool["h2_keepalive"]["timeout_ms"], 5_000, "{pool}");
    assert_eq!(pool["idle_timeout_ms"], 800, "{pool}");
    assert_eq!(pool["max_connections_per_upstream"], 16, "{pool}");
    assert_eq!(pool["body_timeout_ms"], 7000, "{pool}");
    assert_eq!(pool["connect_deadline_ms"], 3000, "{pool}");
    assert_eq!(pool["max_attempts"], 2, "{pool}");
    let outlier = &pool["outlier"];
    assert_eq!(outlier["consecutive_failures"], 4, "{pool}");
    assert_eq!(outlier["on_5xx"], true, "{pool}");
    assert_eq!(outlier["base_ejection_ms"], 2000, "{pool}");
    assert_eq!(outlier["max_ejection_ms"], 60_000, "{pool}");
    assert_eq!(outlier["max_ejection_percent"], 30, "{pool}");
    let text = d.ok(&["pools", "get", "tuned"]).await;
    for line in [
        "idle timeout                  800ms",
        "max connections per upstream  16",
        "body timeout                  7000ms",
        "connect deadline              3000ms",
        "max attempts                  2",
        "outlier                       after 4 failures (5xx counts), eject 2000ms..60000ms, at most 30%",
        "h2 keepalive                  PING after 30000ms without a frame, close after 5000ms unanswered",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }

    // Unset keys show the config file's defaults; a partial update keeps the rest default.
    d.ok(&["pools", "add", "plain", "--upstream", &v1.to_string()])
        .await;
    let pool = &d.json(&["pools", "get", "plain"]).await;
    assert_eq!(pool["idle_timeout_ms"], 1500, "{pool}");
    assert_eq!(pool["max_connections_per_upstream"], 0, "{pool}");
    assert_eq!(pool["max_attempts"], 3, "{pool}");
    assert_eq!(pool["outlier"]["max_ejection_percent"], 50, "{pool}");
    assert_eq!(pool["outlier"]["on_5xx"], false, "{pool}");
    d.ok(&[
        "pools",
        "update",
        "plain",
        "--upstream",
        &v1.to_string(),
        "--outlier-on-5xx",
    ])
    .await;
    let pool = &d.json(&["pools", "get", "plain"]).await;
    assert_eq!(pool["outlier"]["on_5xx"], true, "{pool}");
    assert_eq!(pool["outlier"]["consecutive_failures"], 1, "{pool}");

    // A bad value is refused by the daemon, naming the field, and nothing changes.
    let out = d
        .ctl(&[
            "pools",
            "update",
            "tuned",
            "--upstream",
            &v1.to_string(),
            "--outlier-max-ejection-percent",
            "101",
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("INVALID_ARGUMENT: pool.outlier.max_ejection_percent"),
        "{}",
        stderr(&out)
    );
    let out = d
        .ctl(&[
            "pools",
            "add",
            "zero",
            "--upstream",
            &v1.to_string(),
            "--idle-timeout",
            "0s",
        ])
        .await;
    assert!(
        stderr(&out).contains("INVALID_ARGUMENT: pool.idle_timeout_ms"),
        "{}",
        stderr(&out)
    );
    // A timeout without an interval is refused before anything is sent; a zero interval
    // by the daemon, naming the field.
    let out = d
        .ctl(&[
            "pools",
            "add",
            "pings",
            "--upstream",
            &v1.to_string(),
            "--h2-keepalive-timeout",
            "1s",
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--h2-keepalive-interval"),
        "{}",
        stderr(&out)
    );
    let out = d
        .ctl(&[
            "pools",
            "add",
            "pings",
            "--upstream",
            &v1.to_string(),
            "--h2-keepalive-interval",
            "0s",
        ])
        .await;
    assert!(
        stderr(&out).contains("INVALID_ARGUMENT: pool.h2_keepalive.interval_ms: must be positive"),
        "{}",
        stderr(&out)
    );
    let out = d
        .ctl(&[
            "pools",
            "add",
            "lingering",
            "--upstream",
            &v1.to_string(),
            "--h2-idle-timeout",
            "0s",
        ])
        .await;
    assert!(
        stderr(&out).contains("INVALID_ARGUMENT: pool.h2_idle_timeout_ms: must be positive"),
        "{}",
        stderr(&out)
    );
    let pool = &d.json(&["pools", "get", "tuned"]).await;
    assert_eq!(pool["outlier"]["max_ejection_percent"], 30, "{pool}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_address_with_token_file() {
    let files = tempfile::tempdir().expect("temp dir");
    let token = write(files.path(), "token", "t0ken\n");
    let wrong = write(files.path(), "wrong", "nope\n");
    let d = Daemon::start(&format!(
        "mgmt_listen = \"127.0.0.1:0\"\nmgmt_token_file = \"{}\"",
        token.display()
    ))
    .await;
    let addr = d.daemon.mgmt_address().expect("TCP listener").to_string();
    let run = |token_file: PathBuf| {
        let addr = addr.clone();
        async move {
            tokio::process::Command::new(PROXYCTL)
                .args(["--addr", &addr, "--token-file"])
                .arg(token_file)
                .arg("status")
                .output()
                .await
                .expect("run proxyctl")
        }
    };
    let out = run(token).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(wrong).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("UNAUTHENTICATED"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upgrade_exits_non_zero_and_drain_stops_writes() {
    // Never the default binary here: in a test that is the test executable itself.
    let d = Daemon::start("executable = \"/nonexistent/proxyd\"").await;
    let out = d.ctl(&["upgrade", "--wait"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("FAILED_PRECONDITION"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("keeps serving"), "{}", stderr(&out));
    d.ok(&["status"]).await;

    let out = d.ok(&["drain", "--timeout", "1s"]).await;
    assert!(out.contains("stopped accepting"), "{out}");
    let out = d
        .ctl(&["pools", "add", "late", "--upstream", "127.0.0.1:9"])
        .await;
    assert!(!out.status.success(), "a draining daemon takes no changes");
}
