//! Zero-downtime upgrades with real processes: fd handoff under load, long streams across
//! the handoff, failing new binaries, API changes carried over, systemd socket activation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use mgmt_support::{create_pool, create_route, pool_msg, route_msg, unix_channel, Api};
use proxy_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PROXYD: &str = env!("CARGO_BIN_EXE_proxyd");

/// The first proxyd process; later ones are started by their predecessors.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    web: u16,
    db: u16,
    admin: u16,
}

impl Daemon {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("mgmt.sock")
    }

    async fn api(&self) -> Api {
        Api::over(unix_channel(&self.socket()).await)
    }

    async fn pid(&self) -> u32 {
        let mut api = self.api().await;
        api.admin
            .status(pb::StatusRequest::default())
            .await
            .unwrap()
            .into_inner()
            .pid
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Stop whichever process serves now, then the first one if still around.
        if let Ok(text) = std::fs::read_to_string(self.dir.path().join("current.pid")) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
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

async fn wait_for_socket(path: &Path) {
    for _ in 0..300 {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never opened", path.display());
}

fn config(
    dir: &Path,
    web: u16,
    db: u16,
    admin: u16,
    http_pool: &str,
    tcp_upstream: &str,
    executable: &str,
) -> String {
    format!(
        "[server]
state_dir = \"{dir}\"
mgmt_socket = \"{dir}/mgmt.sock\"
admin_listen = \"127.0.0.1:{admin}\"
executable = \"{executable}\"
upgrade_timeout = \"30s\"
drain_timeout = \"20s\"
log_level = \"warn\"

[[listeners]]
name = \"web\"
protocol = \"http\"
address = \"127.0.0.1:{web}\"

[[listeners]]
name = \"db\"
protocol = \"tcp\"
address = \"127.0.0.1:{db}\"
pool = \"db\"

{http_pool}
[[pools]]
name = \"db\"
upstreams = [\"{tcp_upstream}\"]

[[routes]]
name = \"all\"
listener = \"web\"
pool = \"p\"
",
        dir = dir.display()
    )
}

async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn start(up: &Upstream) -> Daemon {
    start_with(up, "").await
}

/// Like [`start`], with `server` appended to the `[server]` section; an `upgrade_timeout`
/// there replaces the default's 30 s (generous: a new debug build starts on a loaded
/// machine, ten times in a row in one test).
async fn start_with(up: &Upstream, server: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let (web, db, admin) = (free_port(), free_port(), free_port());
    let echo = echo_server().await;
    let mut text = config(dir.path(), web, db, admin, &pool("p", &[up]), &echo, PROXYD);
    if server.contains("upgrade_timeout") {
        text = text.replacen("upgrade_timeout = \"30s\"\n", "", 1);
    }
    let text = text.replacen(
        "log_level = \"warn\"\n",
        &format!("log_level = \"warn\"\n{server}"),
        1,
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let child = Command::new(PROXYD)
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let d = Daemon {
        child,
        dir,
        web,
        db,
        admin,
    };
    wait_for_port(web).await;
    wait_for_socket(&d.socket()).await;
    d
}

/// Upgrades to `binary` (empty: the proxyd under test), named as `server.executable` in
/// the config file: the API takes no binary path.
async fn upgrade(d: &Daemon, binary: &str) -> Result<u32, tonic::Status> {
    set_executable(d, if binary.is_empty() { PROXYD } else { binary });
    let mut api = d.api().await;
    let r = api
        .admin
        .upgrade(pb::UpgradeRequest { wait: true })
        .await
        .map(|r| r.into_inner().new_pid);
    if let Ok(pid) = &r {
        std::fs::write(d.dir.path().join("current.pid"), pid.to_string()).unwrap();
    }
    r
}

/// Rewrites the `executable` line of the daemon's config file.
fn set_executable(d: &Daemon, executable: &str) {
    let path = d.dir.path().join("proxy.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("executable = ") {
                format!("executable = \"{executable}\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
}

/// Requests made under load, and what became of the ones that failed: when (since the
/// tally began), on which kind of connection, and how, so that a failure can be told
/// from the upgrades' times.
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    began: Instant,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            began: Instant::now(),
            failures: Mutex::new(Vec::new()),
        }
    }

    /// Milliseconds since the tally began.
    fn at(&self) -> u128 {
        self.began.elapsed().as_millis()
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let line = format!("{} ms: {what}", self.at());
        self.failures.lock().unwrap().push(line);
    }
}

/// How an exchange ended, for the tally.
type Outcome = Result<(u16, bool), ExchangeFailure>;

/// Keep-alive client: reuses its connection; like any HTTP client, it retries a request
/// once on a fresh connection only when a reused connection closed before any byte of the
/// response arrived (the request was not processed).
async fn keep_alive_client(port: u16, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let req = b"GET /ka HTTP/1.1\r\nHost: h\r\n\r\n";
    let mut conn: Option<TcpStream> = None;
    let mut sent = 0u32;
    while !stop.load(Ordering::Relaxed) && sent < 200_000 {
        sent += 1;
        let reused = conn.is_some();
        let mut stream = match conn.take() {
            Some(s) => s,
            None => match TcpStream::connect(("127.0.0.1", port)).await {
                Ok(s) => s,
                Err(e) => {
                    tally.fail(format!("keep-alive client, connect: {e}"));
                    continue;
                }
            },
        };
        let mut outcome: Outcome = exchange_traced(&mut stream, req).await;
        let mut retried = None;
        if let (true, Err(first)) = (reused, &outcome) {
            if !first.any_bytes {
                retried = Some(first.how.clone());
                outcome = match TcpStream::connect(("127.0.0.1", port)).await {
                    Ok(fresh) => {
                        stream = fresh;
                        exchange_traced(&mut stream, req).await
                    }
                    Err(e) => Err(ExchangeFailure {
                        any_bytes: false,
                        how: format!("connect: {e}"),
                    }),
                };
            }
        }
        let connection = match (&retried, reused) {
            (Some(first), _) => format!("fresh connection after a kept one failed ({first})"),
            (None, true) => "kept connection".to_string(),
            (None, false) => "new connection".to_string(),
        };
        match outcome {
            Ok((200, close)) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                if !close {
                    conn = Some(stream);
                }
            }
            Ok((status, _)) => {
                tally.fail(format!("keep-alive client, {connection}: status {status}"))
            }
            Err(e) => tally.fail(format!("keep-alive client, {connection}: {}", e.how)),
        }
    }
}

/// New-connection client: one request per connection.
async fn new_connection_client(port: u16, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut sent = 0u32;
    while !stop.load(Ordering::Relaxed) && sent < 200_000 {
        sent += 1;
        let outcome: Outcome = match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(mut s) => {
                exchange_traced(
                    &mut s,
                    b"GET /new HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                )
                .await
            }
            Err(e) => Err(ExchangeFailure {
                any_bytes: false,
                how: format!("connect: {e}"),
            }),
        };
        match outcome {
            Ok((200, _)) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok((status, _)) => tally.fail(format!("new-connection client: status {status}")),
            Err(e) => tally.fail(format!("new-connection client: {}", e.how)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_upgrades_under_load_lose_nothing() {
    let up = upstream("up").await;
    let d = start(&up).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::new());
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(tokio::spawn(keep_alive_client(
            d.web,
            stop.clone(),
            tally.clone(),
        )));
    }
    for _ in 0..2 {
        clients.push(tokio::spawn(new_connection_client(
            d.web,
            stop.clone(),
            tally.clone(),
        )));
    }

    // A long download and an open TCP stream, both started before the upgrades.
    let web = d.web;
    let download = tokio::spawn(async move {
        let mut s = TcpStream::connect(("127.0.0.1", web)).await.unwrap();
        s.write_all(b"GET /drip/40/50 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.unwrap();
        body
    });
    let mut tcp = TcpStream::connect(("127.0.0.1", d.db)).await.unwrap();
    tcp.write_all(b"before").await.unwrap();
    let mut got = [0u8; 6];
    tcp.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"before");

    let mut pids = vec![d.pid().await];
    // When each upgrade was asked for and when it was done, beside any failure's time.
    let mut upgrades = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let asked = tally.at();
        let new_pid = upgrade(&d, "").await.expect("upgrade");
        upgrades.push(format!("{asked}-{} ms (pid {new_pid})", tally.at()));
        assert!(
            !pids.contains(&new_pid),
            "every upgrade gives a new pid: {new_pid} in {pids:?}"
        );
        assert_eq!(
            d.pid().await,
            new_pid,
            "the API is served by the new process"
        );
        pids.push(new_pid);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    // The stream opened on the first process still works, byte for byte, after ten handoffs.
    tcp.write_all(b"after!").await.unwrap();
    tcp.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"after!");
    let body = download.await.unwrap();
    let text = String::from_utf8_lossy(&body);
    let payload = text.split("\r\n\r\n").nth(1).unwrap_or("");
    assert_eq!(payload.len(), 40 * 1024, "the long download completed");
    assert!(payload.bytes().all(|b| b == b'd'));

    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    assert_eq!(
        failed,
        0,
        "{failed} failed requests out of {}:\n{}\nupgrades: {}",
        ok + failed,
        tally.failures.lock().unwrap().join("\n"),
        upgrades.join(", ")
    );
    assert!(ok > 100, "the load ran ({ok} requests)");
}

#[tokio::test]
async fn broken_new_binaries_fail_the_upgrade_and_the_old_process_serves_on() {
    let up = upstream("up").await;
    // Short: one of the new binaries below never becomes ready.
    let d = start_with(&up, "upgrade_timeout = \"3s\"\n").await;
    let old = d.pid().await;

    let exits = d.dir.path().join("exits.sh");
    std::fs::write(&exits, "#!/bin/sh\necho 'broken build' >&2\nexit 1\n").unwrap();
    let hangs = d.dir.path().join("hangs.sh");
    std::fs::write(&hangs, "#!/bin/sh\nexec sleep 600\n").unwrap();
    for script in [&exits, &hangs] {
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(script).unwrap().permissions(),
            0o755,
        );
        std::fs::set_permissions(script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }

    let err = upgrade(&d, exits.to_str().unwrap())
        .await
        .expect_err("exits at once");
    assert!(err.message().contains("exited"), "{}", err.message());
    assert_eq!(d.pid().await, old);
    assert_eq!(
        get(format!("127.0.0.1:{}", d.web).parse().unwrap(), "h", "/")
            .await
            .status,
        200
    );

    let err = upgrade(&d, hangs.to_str().unwrap())
        .await
        .expect_err("never ready");
    assert!(err.message().contains("not ready"), "{}", err.message());
    assert_eq!(d.pid().await, old);
    let metrics = get(
        format!("127.0.0.1:{}", d.admin).parse().unwrap(),
        "h",
        "/metrics",
    )
    .await
    .text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("proxy_upgrades_total{result=\"failure\"} 2")),
        "two failed upgrades counted: {}",
        metrics
            .lines()
            .filter(|l| l.contains("upgrade"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The old process took its store back: writes work, and the next good upgrade works.
    let mut api = d.api().await;
    create_pool(&mut api, pool_msg("after-failure", &[up.address()])).await;
    let new = upgrade(&d, "").await.expect("good upgrade");
    assert_ne!(new, old);
    assert_eq!(
        get(format!("127.0.0.1:{}", d.web).parse().unwrap(), "h", "/")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn api_changes_made_just_before_an_upgrade_are_served_by_the_new_process() {
    let up = upstream("up").await;
    let v2 = upstream("v2").await;
    let d = start(&up).await;
    let mut api = d.api().await;
    create_pool(&mut api, pool_msg("v2", &[v2.address()])).await;
    create_route(&mut api, route_msg("docs", "", "/docs", "v2")).await;
    let new = upgrade(&d, "").await.expect("upgrade");
    assert_eq!(d.pid().await, new);
    let r = get(
        format!("127.0.0.1:{}", d.web).parse().unwrap(),
        "h",
        "/docs/x",
    )
    .await;
    assert_eq!(r.header("x-upstream"), Some("v2"));
    // And the new process writes to the store it was handed.
    let mut api = d.api().await;
    create_route(&mut api, route_msg("more", "", "/more", "v2")).await;
    let r = get(
        format!("127.0.0.1:{}", d.web).parse().unwrap(),
        "h",
        "/more",
    )
    .await;
    assert_eq!(r.header("x-upstream"), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_calls_over_tcp_after_an_upgrade_reach_the_new_process_while_the_old_one_drains() {
    let up = upstream("u").await;
    let token_dir = tempfile::tempdir().unwrap();
    let token = token_dir.path().join("token");
    std::fs::write(&token, "upgrade-token\n").unwrap();
    let mgmt = free_port();
    let d = start_with(
        &up,
        &format!(
            "mgmt_listen = \"127.0.0.1:{mgmt}\"\nmgmt_token_file = \"{}\"\n",
            token.display()
        ),
    )
    .await;
    let status_over_tcp = || async move {
        // A new connection per call, as a script running proxyctl would make.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{mgmt}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to the TCP management listener");
        let mut request = tonic::Request::new(pb::StatusRequest {});
        request
            .metadata_mut()
            .insert("authorization", "Bearer upgrade-token".parse().unwrap());
        proxy_proto::v1::admin_service_client::AdminServiceClient::new(channel)
            .status(request)
            .await
            .expect("Status over TCP")
            .into_inner()
            .pid
    };
    let old = status_over_tcp().await;
    assert_eq!(old, d.pid().await);
    // A request the upstream holds until released keeps the old process draining (and its
    // sockets open) through the calls below.
    let web = d.web;
    let held = tokio::spawn(async move {
        let mut s = TcpStream::connect(("127.0.0.1", web)).await.unwrap();
        s.write_all(b"GET /hold HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        let _ = s.read_to_end(&mut response).await;
        response
    });
    up.until_hits(1).await;
    let new = upgrade(&d, "").await.expect("upgrade");
    assert_ne!(new, old);
    let mut answered_by = Vec::new();
    for _ in 0..20 {
        answered_by.push(status_over_tcp().await);
    }
    assert!(
        !held.is_finished(),
        "the old process was still draining during the calls"
    );
    assert!(
        answered_by.iter().all(|pid| *pid == new),
        "every call after the upgrade reached the new process {new}: {answered_by:?}"
    );
    up.release();
    let response = held.await.unwrap();
    assert!(
        response.starts_with(b"HTTP/1.1 200") && response.ends_with(b"u"),
        "the held request was answered: {:?}",
        String::from_utf8_lossy(&response)
    );
}

#[tokio::test]
async fn systemd_socket_activation_with_named_fds() {
    let Some(activate) = external_program("systemd-socket-activate", "Debian package systemd")
    else {
        return;
    };
    let up = upstream("up").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The config names other ports: the sockets from systemd must win by name.
    let text = config(
        dir.path(),
        1,
        free_port(),
        free_port(),
        &pool("p", &[&up]),
        &echo_server().await,
        PROXYD,
    );
    let text = text.replace("address = \"127.0.0.1:1\"", "address = \"127.0.0.1:9\"");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(activate)
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--fdname=web")
        .arg(PROXYD)
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_for_port(port).await;
    let r = get(format!("127.0.0.1:{port}").parse().unwrap(), "h", "/").await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("up"));
}

/// `proxyctl`, built beside `proxyd` by a workspace build (as `scripts/test` does).
fn proxyctl() -> PathBuf {
    let path = Path::new(PROXYD).with_file_name("proxyctl");
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// A script that waits `seconds`, (optionally) leaves `marker`, then runs proxyd.
fn slow_proxyd(dir: &Path, name: &str, seconds: f32, marker: Option<&Path>) -> PathBuf {
    let path = dir.join(name);
    let touch = marker.map_or(String::new(), |m| format!("touch {}\n", m.display()));
    std::fs::write(
        &path,
        format!("#!/bin/sh\n{touch}sleep {seconds}\nexec {PROXYD} \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// Whether process `pid` is gone (exited and reaped, or a zombie).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Polls (up to 30 s) until the serving pid differs from `old`.
async fn wait_for_new_pid(d: &Daemon, old: u32) -> u32 {
    for _ in 0..600 {
        if let Ok(mut api) = tokio::time::timeout(Duration::from_secs(2), d.api()).await {
            if let Ok(Ok(status)) = tokio::time::timeout(
                Duration::from_secs(2),
                api.admin.status(pb::StatusRequest::default()),
            )
            .await
            {
                let pid = status.into_inner().pid;
                if pid != old {
                    return pid;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no new process took over from {old}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_upgrade_wait_mid_upgrade_changes_nothing_about_the_outcome() {
    let up = upstream("up").await;
    let mut d = start(&up).await;
    let first = d.pid().await;
    let started = d.dir.path().join("started");
    let slow = slow_proxyd(d.dir.path(), "slow.sh", 1.5, Some(&started));
    set_executable(&d, slow.to_str().unwrap());

    // The caller goes away while the new process is starting (as with Ctrl-C or systemd's
    // reload timeout).
    let mut ctl = Command::new(proxyctl())
        .arg("--socket")
        .arg(d.socket())
        .args(["upgrade", "--wait"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The new process is starting (its script is in its 1.5 s sleep), so the upgrade was
    // asked for and cannot have finished.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new process was started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        ctl.try_wait().unwrap().is_none(),
        "proxyctl returned before the upgrade could finish"
    );
    ctl.kill().unwrap();
    ctl.wait().unwrap();

    // The upgrade completes anyway; the old process drains and exits.
    let second = wait_for_new_pid(&d, first).await;
    std::fs::write(d.dir.path().join("current.pid"), second.to_string()).unwrap();
    let status = tokio::task::spawn_blocking({
        let mut child = std::mem::replace(&mut d.child, Command::new("true").spawn().unwrap());
        move || child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "the old process exits 0 after the handoff: {status:?}"
    );

    // The API answers, writes work, and the next upgrade succeeds.
    let mut api = d.api().await;
    create_pool(&mut api, pool_msg("after-cancel", &[up.address()])).await;
    let third = upgrade(&d, "").await.expect("the next upgrade");
    assert_ne!(third, second);
    for _ in 0..400 {
        if gone(second) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Exactly one process serves: the first two are gone, the third answers.
    assert!(gone(first) && gone(second), "an old process lingers");
    assert_eq!(d.pid().await, third);
    let pools = d
        .api()
        .await
        .pools
        .list_pools(pb::ListPoolsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .pools;
    assert!(pools.iter().any(|p| p.name == "after-cancel"));
    assert_eq!(
        get(format!("127.0.0.1:{}", d.web).parse().unwrap(), "h", "/")
            .await
            .status,
        200
    );
}

/// `UpgradeRequest` as it was with field 1 (`binary`), which the API no longer has.
#[derive(Clone, PartialEq, prost::Message)]
struct UpgradeRequestWithBinary {
    #[prost(string, tag = "1")]
    binary: String,
    #[prost(bool, tag = "2")]
    wait: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_client_cannot_choose_the_binary_an_upgrade_runs() {
    let up = upstream("up").await;
    let d = start(&up).await;
    let first = d.pid().await;
    let marker = d.dir.path().join("ran");
    let chosen = slow_proxyd(d.dir.path(), "chosen.sh", 0.0, Some(&marker));

    // An old client sends the removed field: the daemon runs `server.executable` only.
    let mut grpc = tonic::client::Grpc::new(unix_channel(&d.socket()).await);
    grpc.ready().await.unwrap();
    let reply: tonic::Response<pb::UpgradeResponse> = grpc
        .unary(
            tonic::Request::new(UpgradeRequestWithBinary {
                binary: chosen.display().to_string(),
                wait: true,
            }),
            "/proxy.v1.AdminService/Upgrade".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect("upgrade");
    let new = reply.into_inner().new_pid;
    std::fs::write(d.dir.path().join("current.pid"), new.to_string()).unwrap();
    assert_ne!(new, first);
    assert!(
        !marker.exists(),
        "the daemon ran the binary an API client named"
    );
}
