//! `/metrics`, `/healthz` and `/readyz` on the admin listener, scraped after known traffic:
//! HTTP requests by route and status class, errors by who failed, connections, upstream
//! connect times and health, management API calls and SQLite writes, with exact counts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// `GET path` on the admin listener: (status, content type, body).
async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String, String) {
    let r = raw(
        admin,
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    (
        r.status,
        r.header("content-type").unwrap_or("").to_string(),
        r.text(),
    )
}

/// Scrapes until `ready` holds for the text (the last response is written after the client
/// has its bytes, so counts may trail by a moment), then returns it.
async fn scrape_until(admin: SocketAddr, ready: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    for _ in 0..200 {
        text = admin_get(admin, "/metrics").await.2;
        if ready(&text) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    text
}

fn sample(text: &str, series: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(str::to_string)
    })
}

fn assert_sample(text: &str, series: &str, want: &str) {
    assert_eq!(
        sample(text, series).as_deref(),
        Some(want),
        "{series} in:\n{text}"
    );
}

#[tokio::test]
async fn counts_after_known_traffic_are_exact() {
    let up = upstream("up").await;
    let dead = dead_address();
    let config = format!(
        r#"[server]
state_dir = "{{state}}"
admin_listen = "127.0.0.1:0"

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:0"

[[listeners]]
name = "db"
protocol = "tcp"
address = "127.0.0.1:0"
pool = "tcpp"

[[pools]]
name = "p"
upstreams = ["{up}"]

[[pools]]
name = "tcpp"
upstreams = ["{up}"]

[[pools]]
name = "dead"
upstreams = ["{dead}"]

[[routes]]
name = "site"
listener = "web"
host = "a.example"
pool = "p"

[[routes]]
name = "errs"
listener = "web"
host = "b.example"
pool = "dead"
"#,
        up = up.address()
    );
    let p = start_proxy(&config).await;
    let web = p.addr("web");
    let admin = p.daemon.admin_address().expect("admin listener");

    let (status, _, body) = admin_get(admin, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(admin_get(admin, "/healthz").await.0, 200);
    assert_eq!(admin_get(admin, "/nothing").await.0, 404);

    for _ in 0..5 {
        assert_eq!(get(web, "a.example", "/").await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(get(web, "a.example", "/status/503").await.status, 503);
    }
    assert_eq!(get(web, "b.example", "/").await.status, 502);
    assert_eq!(get(web, "c.example", "/").await.status, 404);
    for _ in 0..2 {
        let mut s = TcpStream::connect(p.addr("db")).await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest).await;
    }

    // Management API: one pool created (one SQLite write), one refused as a duplicate.
    let mut api = mgmt_support::connect(&p).await;
    mgmt_support::create_pool(&mut api, mgmt_support::pool_msg("extra", &[up.address()])).await;
    let duplicate = api
        .pools
        .create_pool(proxy_proto::v1::CreatePoolRequest {
            pool: Some(mgmt_support::pool_msg("extra", &[up.address()])),
        })
        .await;
    assert_eq!(duplicate.unwrap_err().code(), tonic::Code::AlreadyExists);

    let text = scrape_until(admin, |t| {
        sample(t, "http_request_total_count").as_deref() == Some("9")
            && sample(t, "tcp_connections_active_count").as_deref() == Some("0")
            && t.contains("code=\"ALREADY_EXISTS\"")
    })
    .await;

    // Names operators already graph.
    assert_sample(&text, "http_request_total_count", "9");
    assert_sample(&text, "tcp_connections_total_count", "11");
    assert_sample(&text, "tcp_connections_active_count", "0");
    let avg: f64 = sample(&text, "http_request_time_avg_milliseconds")
        .expect("avg")
        .parse()
        .expect("number");
    assert!(avg > 0.0, "{text}");

    // By listener, route, pool and status class; never by host or path.
    let req = |route: &str, pool: &str, class: &str| {
        format!("proxy_http_requests_total{{listener=\"web\",route=\"{route}\",pool=\"{pool}\",status_class=\"{class}\"}}")
    };
    assert_sample(&text, &req("site", "p", "2xx"), "5");
    assert_sample(&text, &req("site", "p", "5xx"), "2");
    assert_sample(&text, &req("errs", "dead", "5xx"), "1");
    assert_sample(&text, &req("", "", "4xx"), "1");
    assert!(
        !text.contains("a.example") && !text.contains("/status/"),
        "hosts or paths leaked into labels:\n{text}"
    );
    assert_sample(
        &text,
        "proxy_http_request_duration_seconds_count{listener=\"web\",route=\"site\",pool=\"p\",status_class=\"2xx\"}",
        "5",
    );
    assert_sample(
        &text,
        "proxy_http_request_duration_seconds_bucket{le=\"+Inf\",listener=\"web\",route=\"site\",pool=\"p\",status_class=\"2xx\"}",
        "5",
    );

    // Who failed: the upstream that refused, the proxy that had no route. An upstream's own
    // 503 is not a proxy error.
    assert_sample(&text, "proxy_http_errors_total{listener=\"web\",route=\"errs\",pool=\"dead\",source=\"upstream\"}", "1");
    assert_sample(
        &text,
        "proxy_http_errors_total{listener=\"web\",route=\"\",pool=\"\",source=\"proxy\"}",
        "1",
    );
    assert!(
        !text.contains("proxy_http_errors_total{listener=\"web\",route=\"site\""),
        "{text}"
    );

    // Connections per listener.
    assert_sample(
        &text,
        "proxy_connections_total{listener=\"web\",protocol=\"http\"}",
        "9",
    );
    assert_sample(
        &text,
        "proxy_connections_total{listener=\"db\",protocol=\"tcp\"}",
        "2",
    );
    assert_sample(
        &text,
        "proxy_connections_active{listener=\"db\",protocol=\"tcp\"}",
        "0",
    );

    // Upstream connects: the TCP pool dialed once per connection; the dead pool failed once.
    assert_sample(
        &text,
        "proxy_upstream_connect_duration_seconds_count{pool=\"tcpp\"}",
        "2",
    );
    assert_sample(
        &text,
        "proxy_upstream_connect_failures_total{pool=\"dead\"}",
        "1",
    );

    // Upstream state, read from the routing table at scrape time.
    assert_sample(
        &text,
        &format!(
            "proxy_upstream_healthy{{pool=\"p\",upstream=\"{}\"}}",
            up.address()
        ),
        "1",
    );
    assert_sample(
        &text,
        &format!("proxy_upstream_ejected{{pool=\"dead\",upstream=\"{dead}\"}}"),
        "1",
    );
    assert_sample(
        &text,
        &format!(
            "proxy_upstream_ejected{{pool=\"p\",upstream=\"{}\"}}",
            up.address()
        ),
        "0",
    );

    // Management API calls by method and code, and the one SQLite write they made.
    assert_sample(
        &text,
        "proxy_api_calls_total{method=\"/proxy.v1.PoolService/CreatePool\",code=\"OK\"}",
        "1",
    );
    assert_sample(&text, "proxy_api_calls_total{method=\"/proxy.v1.PoolService/CreatePool\",code=\"ALREADY_EXISTS\"}", "1");
    assert_sample(&text, "proxy_state_write_duration_seconds_count", "1");

    // The counters other parts of the daemon feed start at zero and are always listed.
    assert_sample(&text, "proxy_tls_handshakes_refused_total", "0");
    assert_sample(&text, "proxy_registrations_active", "0");
    assert_sample(&text, "proxy_held_requests", "0");
    assert!(text.ends_with("# EOF\n"), "{text}");

    p.daemon.stop().await;
}

#[tokio::test]
async fn metrics_are_served_with_the_openmetrics_type_and_readyz_fails_when_draining() {
    let config = "[server]\nstate_dir = \"{state}\"\nadmin_listen = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:0\"\n";
    let p = start_proxy(config).await;
    let admin = p.daemon.admin_address().expect("admin listener");
    let (status, content_type, text) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(
        text.contains("# TYPE tcp_connections_active_count gauge"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE http_request_total_count unknown"),
        "{text}"
    );
    // One keep-alive connection: ready before the drain starts, not ready after.
    let mut conn = TcpStream::connect(admin).await.unwrap();
    conn.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let before = read_response(&mut conn).await;
    assert_eq!((before.status, before.text().as_str()), (200, "ready\n"));
    p.daemon.shutdown_signal().trigger();
    conn.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let after = read_response(&mut conn).await;
    assert_eq!((after.status, after.text().as_str()), (503, "draining\n"));
}
