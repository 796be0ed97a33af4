//! `proxyctl top --once` as a process against an in-process proxyd's admin listener, after
//! known traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PROXYCTL: &str = env!("CARGO_BIN_EXE_proxyctl");

async fn upstream() -> SocketAddr {
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
                let status = if seen.starts_with(b"GET /fail") {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let answer =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

async fn status_of(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response.lines().next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_lists_routes_and_pools_from_the_metrics() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nstate_dir = \"{}\"\nadmin_listen = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"shop\"\nupstreams = [\"{up}\"]\n\n[[routes]]\nname = \"storefront\"\nlistener = \"web\"\nhost = \"shop.example\"\npool = \"shop\"\n",
        dir.path().display()
    );
    let config = proxy::Config::parse(&text, "test.toml").unwrap();
    let daemon = proxy::Daemon::start(config).await.unwrap();
    let web = daemon.listener_address("web").unwrap();
    let admin = daemon.admin_address().unwrap();
    for _ in 0..4 {
        assert!(status_of(web, "/").await.contains("200"));
    }
    assert!(status_of(web, "/fail").await.contains("500"));

    let run = |format: &'static str| {
        let admin = admin.to_string();
        tokio::task::spawn_blocking(move || {
            Command::new(PROXYCTL)
                .args([
                    "top",
                    "--once",
                    "--interval",
                    "300ms",
                    "--admin",
                    &admin,
                    "--output",
                    format,
                ])
                .output()
                .unwrap()
        })
    };
    let out = run("json").await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let route = rows
        .iter()
        .find(|r| r["kind"] == "route" && r["name"] == "storefront")
        .expect("route row");
    assert_eq!(route["listener"], "web");
    assert_eq!(route["total"], 5);
    let pool = rows
        .iter()
        .find(|r| r["kind"] == "pool" && r["name"] == "shop")
        .expect("pool row");
    assert_eq!(pool["total"], 5);
    assert_eq!(pool["upstreams"], serde_json::json!([1, 1]));

    let out = run("table").await.unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("ROUTE") && table.contains("storefront") && table.contains("1/1 healthy"),
        "{table}"
    );

    // No daemon there: a clear error naming the address. The port stays bound by a socket
    // that never listens, so no other test's listener can be given it meanwhile.
    let holder = tokio::net::TcpSocket::new_v4().unwrap();
    holder.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = holder.local_addr().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(PROXYCTL)
            .args(["top", "--once", "--admin", &closed])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin listener"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.stop().await;
}
