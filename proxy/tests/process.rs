//! `proxyd` as a real process: check-config, the embedded default, SIGTERM, and memory
//! staying flat while 1 GiB streams through in each direction.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROXYD: &str = env!("CARGO_BIN_EXE_proxyd");

struct Proc(Child);

impl Proc {
    /// Waits for `port` to accept connections; a daemon that exited instead fails the test
    /// with what it wrote to `log`.
    async fn wait_for_port(&mut self, port: u16, log: &std::path::Path) {
        for _ in 0..600 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return;
            }
            if let Some(status) = self.0.try_wait().unwrap() {
                panic!(
                    "proxyd exited ({status}) before port {port} opened:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "port {port} never opened:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("port {port} never opened");
}

fn spawn(config: &str, dir: &std::path::Path) -> Proc {
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    Proc(
        Command::new(PROXYD)
            .arg("--config")
            .arg(&path)
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A config with listener `web` on `port` and one route to pool `p` of `up`.
fn one_route(port: u16, up: &Upstream) -> String {
    format!(
        "[server]\nadmin_listen = \"\"\n[[listeners]]\nname=\"web\"\nprotocol=\"http\"\naddress=\"127.0.0.1:{port}\"\n{}[[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n",
        pool("p", &[up])
    )
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn check_config_reports_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:8080\"\n",
    )
    .unwrap();
    let out = Command::new(PROXYD)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:8080\"\n\n[[routes]]\nname = \"r\"\nlistener = \"web\"\npool = \"nope\"\n",
    )
    .unwrap();
    let out = Command::new(PROXYD)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        format!(
            "{}:9: routes[0].pool: no pool named \"nope\"",
            bad.display()
        )
    );
}

/// The lines of the README's "first route" example: the `sh` block after its marker.
fn readme_first_route() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("read README.md");
    let after = readme
        .split_once("<!-- first-route:")
        .expect("README.md has the first-route marker")
        .1;
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a ```sh block follows the first-route marker")
        .0;
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The `proxyctl` built beside this `proxyd` (`cargo nextest run --workspace` builds both;
/// a run of this package alone builds it here).
fn proxyctl() -> std::path::PathBuf {
    let path = std::path::Path::new(PROXYD).with_file_name("proxyctl");
    if !path.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--package", "proxyctl", "--bin", "proxyctl"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p proxyctl failed");
    }
    path
}

/// The README's first command (proxyd on the embedded default, from a fresh directory)
/// serves the no-route 404; then the README's first-route lines, run as written (`cargo run
/// --release --bin proxyctl --` becomes the debug `proxyctl`), route a request.
#[tokio::test]
async fn embedded_default_serves_404_then_the_readme_first_route_works() {
    let lines = readme_first_route();
    assert_eq!(lines.len(), 3, "three lines: {lines:?}");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("proxyd.log");
    let mut p = Proc(
        Command::new(PROXYD)
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    p.wait_for_port(8080, &log).await;
    let r = get("127.0.0.1:8080".parse().unwrap(), "localhost", "/").await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no route"), "{}", r.text());
    // The admin listener opens a moment after the HTTP listener.
    p.wait_for_port(4208, &log).await;
    let r = get("127.0.0.1:4208".parse().unwrap(), "localhost", "/healthz").await;
    assert_eq!(r.status, 200);
    assert!(
        dir.path().join("state/proxy.db").exists(),
        "state dir created under the working directory"
    );

    let proxyctl = proxyctl();
    let mut outputs = Vec::new();
    for line in &lines {
        assert!(
            !line.contains(['"', '\'', '$', '|', '&', ';', '>', '<']),
            "the example must stay plain words (this test splits on spaces): {line}"
        );
        let words: Vec<&str> = line.split_whitespace().collect();
        let (program, args) = match words.as_slice() {
            ["cargo", "run", "--release", "--bin", "proxyctl", "--", args @ ..] => {
                (proxyctl.clone(), args.to_vec())
            }
            ["curl", args @ ..] => (
                external_program("curl", "Debian package curl").expect("curl"),
                args.to_vec(),
            ),
            _ => panic!("a README first-route line this test cannot run: {line}"),
        };
        let out = Command::new(&program)
            .args(&args)
            .current_dir(dir.path())
            // A proxy configured for the machine must not take the curl to 127.0.0.1.
            .env("NO_PROXY", "127.0.0.1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{line}: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(stdout);
    }
    assert!(
        outputs[0].contains("pool \"demo\" created"),
        "{}",
        outputs[0]
    );
    assert!(
        outputs[1].contains("route \"demo\" created"),
        "{}",
        outputs[1]
    );
    assert_eq!(outputs[2], "ok\n", "the curl is answered through the route");
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let up = upstream("up").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut p = spawn(&one_route(port, &up), dir.path());
    wait_for_port(port).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let slow = tokio::spawn(async move { get(addr, "h", "/slow/800").await });
    // SIGTERM as soon as the request is in flight (the upstream has it), which may be
    // before proxyd has finished starting: its listeners serve early, and a SIGTERM then
    // must drain too, not kill it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while up.hits.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the upstream never saw the request"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(
        slow.await.unwrap().status,
        200,
        "in-flight request finished"
    );
    let status = tokio::task::spawn_blocking(move || p.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn one_gib_streams_both_ways_with_flat_memory() {
    const GIB: u64 = 1 << 30;
    let up = upstream("up").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let p = spawn(&one_route(port, &up), dir.path());
    wait_for_port(port).await;
    let baseline = peak_rss_kib(p.0.id());

    // Download: read and discard 1 GiB.
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(
        format!("GET /stream/{GIB} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert!(total > GIB, "received {total} bytes");

    // Upload: send 1 GiB with a declared length; the upstream counts what arrived.
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: {GIB}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let chunk = vec![b'u'; 256 * 1024];
    let mut sent = 0;
    while sent < GIB {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
    }
    let r = read_response(&mut s).await;
    assert_eq!((r.status, r.text()), (200, GIB.to_string()));

    let peak = peak_rss_kib(p.0.id());
    // Streaming keeps the proxy's memory independent of body size: far below 1 GiB.
    assert!(
        peak < baseline + 64 * 1024,
        "peak RSS {peak} KiB (baseline {baseline} KiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_answers_while_the_real_binary_drains() {
    use proxy_proto::v1 as pb;
    let up = upstream("up").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let socket = dir.path().join("mgmt.sock");
    let mut p = spawn(
        &format!(
            "[server]\nadmin_listen = \"\"\nstate_dir = \"{state}\"\nmgmt_socket = \"{sock}\"\ndrain_timeout = \"20s\"\n[[listeners]]\nname=\"web\"\nprotocol=\"http\"\naddress=\"127.0.0.1:{port}\"\n{}[[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n",
            pool("p", &[&up]),
            state = dir.path().display(),
            sock = socket.display(),
        ),
        dir.path(),
    );
    wait_for_port(port).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    // In flight for the whole check below: the upstream holds it until released.
    let held = tokio::spawn(async move { get(addr, "h", "/hold").await });
    up.until_hits(1).await;
    let mut api = mgmt_support::Api::over(mgmt_support::unix_channel(&socket).await);
    api.admin
        .drain(pb::DrainRequest { timeout_ms: 0 })
        .await
        .expect("drain");

    // While the request drains, new management connections are answered, over a second
    // of it: reads work and say "draining", writes get UNAVAILABLE.
    for _ in 0..10 {
        let mut fresh = mgmt_support::Api::over(mgmt_support::unix_channel(&socket).await);
        let status = fresh
            .admin
            .status(pb::StatusRequest::default())
            .await
            .expect("status while draining")
            .into_inner();
        assert!(status.draining);
        assert_eq!(status.pid, p.0.id());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut fresh = mgmt_support::Api::over(mgmt_support::unix_channel(&socket).await);
    let write = fresh
        .pools
        .create_pool(pb::CreatePoolRequest {
            pool: Some(mgmt_support::pool_msg("late", &[up.address()])),
        })
        .await
        .expect_err("a write while draining");
    assert_eq!(
        write.code(),
        tonic::Code::Unavailable,
        "{}",
        write.message()
    );
    assert!(
        p.0.try_wait().unwrap().is_none(),
        "proxyd exited before its in-flight request finished"
    );

    up.release();
    assert_eq!(
        held.await.unwrap().status,
        200,
        "in-flight request finished"
    );
    let status = tokio::task::spawn_blocking(move || p.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the socket file is removed on exit");
}

/// The routing tables' region (`proxy::allocator::reserve_table_region`): the daemon
/// reserves its 8 GiB at start, asks for huge pages there, and the table it serves from
/// is resident in it.
#[tokio::test]
async fn the_daemon_keeps_its_routing_tables_in_their_own_region() {
    let up = upstream("up").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let p = spawn(&one_route(port, &up), dir.path());
    wait_for_port(port).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(get(addr, "h", "/x").await.status, 200);
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", p.0.id())).unwrap();
    // Each mapping: its header line (an address range first), then `Key: value` lines.
    let mut regions: Vec<Vec<(&str, &str)>> = Vec::new();
    for line in smaps.lines() {
        match line.split_once(':') {
            Some((key, value)) if !key.contains('-') && !key.contains(' ') => {
                if let Some(fields) = regions.last_mut() {
                    fields.push((key, value.trim()));
                }
            }
            _ => regions.push(Vec::new()),
        }
    }
    let field = |fields: &[(&str, &str)], key: &str| -> String {
        fields
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
            .unwrap_or_default()
    };
    let region = regions
        .iter()
        .find(|fields| field(fields, "Size") == format!("{} kB", 8u64 << 20))
        .unwrap_or_else(|| panic!("no 8 GiB mapping in proxyd's smaps:\n{smaps}"));
    let rss: u64 = field(region, "Rss")
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    assert!(rss > 0, "nothing resident in the table region: {region:?}");
    if std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
        // A kernel with huge pages marks the region for them (`hg`).
        let flags = field(region, "VmFlags");
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "the table region is not marked for huge pages: {region:?}"
        );
    }
}
