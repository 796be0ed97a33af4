//! `proxyctl register` and `proxyctl discovery list` run as processes against a real proxyd
//! (in-process, real unix socket) with a real upstream on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// Ports below the ephemeral range, as the daemon's tests take them: a port released by
// `bind(0)` could be handed to another test's listener before the daemon binds it.
#[path = "../../proxy/tests/common/ports.rs"]
mod ports;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use ports::free_port;

const PROXYCTL: &str = env!("CARGO_BIN_EXE_proxyctl");

async fn upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
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
                let answer = format!("HTTP/1.1 200 OK\r\nx-upstream: {name}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// The status code and `x-upstream` of `GET path`, or `None` if nothing accepts.
async fn fetch(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        stream.read_to_string(&mut response),
    )
    .await
    .ok()?
    .ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let upstream = response
        .lines()
        .find_map(|l| l.strip_prefix("x-upstream: "))
        .unwrap_or("")
        .to_string();
    Some((status, upstream))
}

/// `proxyctl --socket <socket>`, ready for more arguments.
fn proxyctl(socket: &std::path::Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(PROXYCTL);
    c.arg("--socket").arg(socket);
    c
}

/// A daemon config with state in `dir`, one HTTP listener, and registrations allowed on
/// `port` only, held for `hold`.
fn registration_config(dir: &std::path::Path, port: u16, hold: &str) -> proxy::Config {
    let text = format!(
        "[server]\nstate_dir = \"{state}\"\nadmin_listen = \"\"\n\
         [registration]\nhold = \"{hold}\"\nport_range = \"{port}-{port}\"\naddress = \"127.0.0.1\"\nkeepalive = \"1s\"\n\
         [[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:0\"\n",
        state = dir.display(),
    );
    proxy::Config::parse(&text, "test.toml").expect("valid config")
}

#[tokio::test]
async fn register_holds_the_lease_while_running_and_discovery_list_reports_sources() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let members = dir.path().join("members.json");
    let backend = upstream("svc").await;
    std::fs::write(&members, format!("[{{\"address\": \"{backend}\"}}]")).unwrap();
    let text = format!(
        "[server]\nstate_dir = \"{state}\"\nadmin_listen = \"\"\n\
         [registration]\nhold = \"1s\"\nport_range = \"{port}-{port}\"\naddress = \"127.0.0.1\"\nkeepalive = \"1s\"\n\
         [[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:0\"\n\
         [[pools]]\nname = \"found\"\n[pools.discovery]\nfile = {{ path = \"{members}\" }}\n",
        state = dir.path().display(),
        members = members.display(),
    );
    let config = proxy::Config::parse(&text, "test.toml").expect("valid config");
    let daemon = proxy::Daemon::start(config).await.expect("daemon starts");
    let socket = daemon.config().server.mgmt_socket.clone();
    let proxied = SocketAddr::from(([127, 0, 0, 1], port));

    let mut child = proxyctl(&socket)
        .args([
            "register",
            "--port",
            &port.to_string(),
            "--path-prefix",
            "/a",
            "--endpoint",
            &backend.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run proxyctl register");
    let mut served = None;
    for _ in 0..200 {
        served = fetch(proxied, "/a/x").await;
        if served.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        served,
        Some((200, "svc".to_string())),
        "served while proxyctl register runs"
    );
    // Still registered a few keepalives later.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(fetch(proxied, "/a").await, Some((200, "svc".to_string())));

    let out = proxyctl(&socket)
        .args(["--output", "json", "discovery", "list"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sources: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(sources[0]["pool"], "found");
    assert_eq!(sources[0]["kind"], "file");
    assert_eq!(sources[0]["members"], 1);

    // The process ends: the lease ends, the route is held for 1s, then requests get 503
    // (or find the port closed).
    child.kill().await.unwrap();
    let mut after = Some((200, String::new()));
    for _ in 0..200 {
        after = fetch(proxied, "/a").await;
        if after.as_ref().is_none_or(|(status, _)| *status == 503) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        after.as_ref().is_none_or(|(status, _)| *status == 503),
        "{after:?}"
    );

    // A port outside the range is refused and proxyctl says why.
    let out = proxyctl(&socket)
        .args([
            "register",
            "--port",
            "1",
            "--endpoint",
            &backend.to_string(),
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.stop().await;
}

#[tokio::test]
async fn register_registers_again_after_the_proxy_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let backend = upstream("svc").await;
    let config = registration_config(dir.path(), port, "5s");
    let daemon = proxy::Daemon::start(config.clone())
        .await
        .expect("daemon starts");
    let socket = daemon.config().server.mgmt_socket.clone();
    let proxied = SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = proxyctl(&socket)
        .args([
            "register",
            "--port",
            &port.to_string(),
            "--path-prefix",
            "/a",
            "--endpoint",
            &backend.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run proxyctl register");
    let served = || async {
        for _ in 0..400 {
            if let Some(answer) = fetch(proxied, "/a/x").await {
                if answer.0 == 200 {
                    return Some(answer);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    };
    assert_eq!(served().await, Some((200, "svc".to_string())));

    // The proxy stops and a new one starts on the same socket: proxyctl registers again.
    daemon.stop().await;
    assert!(
        fetch(proxied, "/a").await.is_none(),
        "nothing serves the port"
    );
    let daemon = proxy::Daemon::start(config).await.expect("daemon restarts");
    assert_eq!(served().await, Some((200, "svc".to_string())));
    assert!(
        child.try_wait().unwrap().is_none(),
        "proxyctl register keeps running"
    );
    child.kill().await.unwrap();
    daemon.stop().await;
}

#[tokio::test]
async fn register_brings_a_certificate_from_pem_files() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let backend = upstream("svc").await;
    let config = registration_config(dir.path(), port, "1s");
    let daemon = proxy::Daemon::start(config).await.expect("daemon starts");
    let socket = daemon.config().server.mgmt_socket.clone();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["svc.example".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("svc.pem"), dir.path().join("svc.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let register = |host: &str| {
        let mut c = proxyctl(&socket);
        c.args(["register", "--port", &port.to_string(), "--host", host])
            .args(["--endpoint", &backend.to_string()])
            .arg("--cert")
            .arg(&cert_path)
            .arg("--key")
            .arg(&key_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    };

    // A certificate that does not cover the host is refused, naming the field.
    let out = register("other.example").output().await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("announce.tls_certificate_pem"),
        "{stderr}"
    );

    // One that does is served while proxyctl register runs.
    let mut child = register("svc.example").spawn().unwrap();
    let mut listed = String::new();
    for _ in 0..200 {
        let out = proxyctl(&socket)
            .args(["tls", "certs", "list"])
            .output()
            .await
            .unwrap();
        listed = String::from_utf8_lossy(&out.stdout).into_owned();
        if listed.contains("registered") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("registered:") && l.contains(" registered ")),
        "{listed}"
    );

    // Without the key file proxyctl says which file it could not read.
    let out = proxyctl(&socket)
        .args([
            "register",
            "--port",
            &port.to_string(),
            "--endpoint",
            "127.0.0.1:9",
        ])
        .arg("--cert")
        .arg(&cert_path)
        .arg("--key")
        .arg(dir.path().join("missing.key"))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    child.kill().await.unwrap();
    daemon.stop().await;
}
