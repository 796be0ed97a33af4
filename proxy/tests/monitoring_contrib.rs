//! The Grafana dashboard (contrib/grafana/proxy.json) and the Prometheus rules
//! (contrib/prometheus/alerts.yml) against the daemon's real metrics:
//!
//! - every metric name their queries use is a series of a family in a `/metrics` scrape of
//!   a running proxyd (a histogram counts through its `_bucket`/`_sum`/`_count` series, a
//!   counter through `_total`);
//! - the dashboard covers what operators look for (traffic, latency, upstreams,
//!   connections, TLS, ACME, registrations, SQLite writes, upgrades);
//! - `promtool` accepts the rules, their unit tests (alerts.test.yml) pass, the example
//!   scrape config is valid, and every dashboard query parses as PromQL.
//!
//! `promtool` (Debian package `prometheus`) is required under `./scripts/test`; run by
//! hand without it, the promtool checks are skipped with a message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use rustls::pki_types::pem::PemObject as _;
use tokio::io::AsyncWriteExt as _;

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(contrib(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Names Prometheus itself adds to every scrape; they are not in `/metrics`.
const SCRAPE_SERIES: [&str; 1] = ["up"];

/// Legacy names the daemon exports next to the `proxy_` ones.
const LEGACY: [&str; 4] = [
    "tcp_connections_active_count",
    "tcp_connections_total_count",
    "http_request_total_count",
    "http_request_time_avg_milliseconds",
];

/// The metric names in a PromQL expression (or any text): words that are one of the
/// daemon's names by prefix. Label names, functions and keywords never start that way.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("proxy_") || LEGACY.contains(w) || SCRAPE_SERIES.contains(w))
        .map(str::to_owned)
        .collect()
}

/// Every `expr` of the dashboard's panels and every query of its variables.
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(&read("grafana/proxy.json")).unwrap();
    let mut out = Vec::new();
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut out);
    out
}

/// The `expr:` values of the rules file (single line or `|` blocks).
fn rule_exprs() -> Vec<String> {
    let text = read("prometheus/alerts.yml");
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest != "|" {
            out.push(rest.to_owned());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            let next_indent = next.len() - next.trim_start().len();
            if !next.trim().is_empty() && next_indent <= indent {
                break;
            }
            block.push_str(next.trim());
            block.push('\n');
            lines.next();
        }
        out.push(block);
    }
    out
}

/// Every series name a scrape can hold: the families it declares (`# TYPE`), with the
/// suffixes their type gives their samples, and the samples it has.
fn series_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut parts = declared.split_whitespace();
            let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{family}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{family}{suffix}"));
                    }
                }
                _ => {
                    names.insert(family.to_owned());
                }
            }
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty()) {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

fn tls_roots(pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

/// A completed TLS handshake with the `secure` listener for www.example.com.
async fn tls_handshake(
    addr: SocketAddr,
    roots: rustls::RootCertStore,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("www.example.com").unwrap();
    connector.connect(name, tcp).await.expect("TLS handshake")
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_use_exists_in_a_real_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["www.example.com".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.path().join("www.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("www.key"), key.serialize_pem()).unwrap();
    let up = upstream("app").await;
    let config = format!(
        r#"[server]
state_dir = "{{state}}"
admin_listen = "127.0.0.1:0"

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:0"

[[listeners]]
name = "secure"
protocol = "https"
address = "127.0.0.1:0"

[[pools]]
name = "app"
upstreams = ["{}", "{}"]
[pools.health]
path = "/"
interval = "1s"

[[pools]]
name = "search"
[pools.discovery]
exec = {{ command = ["/bin/false"], interval = "10s" }}

[[pools]]
name = "gone"
upstreams = ["{}"]

[[routes]]
name = "app"
listener = "web"
pool = "app"

[[routes]]
name = "gone"
listener = "web"
path_prefix = "/gone"
pool = "gone"

[[tls.certificates]]
cert = "{{state}}/www.pem"
key = "{{state}}/www.key"
"#,
        up.address(),
        dead_address(),
        dead_address()
    );
    let proxy = start_proxy_in(dir, &config).await;
    let admin = proxy.daemon.admin_address().unwrap();
    // Traffic of each kind the families count: answers, an upstream error, a TLS
    // handshake, a management call.
    for _ in 0..3 {
        assert_eq!(
            get(proxy.addr("web"), "www.example.com", "/").await.status,
            200
        );
    }
    assert_eq!(
        get(proxy.addr("web"), "www.example.com", "/gone")
            .await
            .status,
        502
    );
    let roots = tls_roots(&cert.pem());
    let mut tls = tls_handshake(proxy.addr("secure"), roots).await;
    tls.shutdown().await.unwrap();
    let mut api = mgmt_support::connect(&proxy).await;
    api.admin
        .status(proxy_proto::v1::StatusRequest {})
        .await
        .expect("Status");
    let text = scrape_metrics(admin).await;
    let available = series_names(&text);

    let dashboard = dashboard_queries();
    let rules = rule_exprs();
    assert!(
        dashboard.len() >= 30,
        "dashboard queries found: {dashboard:?}"
    );
    assert!(rules.len() >= 8, "rule expressions found: {rules:?}");
    let used: BTreeSet<String> = dashboard
        .iter()
        .chain(&rules)
        .flat_map(|q| metric_names(q))
        .collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !available.contains(*n) && !SCRAPE_SERIES.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "names used by contrib/ but not in /metrics: {missing:?}\nscrape:\n{text}"
    );

    // What the dashboard has to show, by the families it reads.
    let on_dashboard: BTreeSet<String> = dashboard.iter().flat_map(|q| metric_names(q)).collect();
    for wanted in [
        "proxy_http_requests_total",
        "proxy_http_errors_total",
        "proxy_http_request_duration_seconds_bucket",
        "proxy_upstream_healthy",
        "proxy_upstream_ejected",
        "proxy_upstream_in_flight",
        "proxy_connections_active",
        "proxy_tls_handshakes_total",
        "proxy_tls_handshakes_refused_total",
        "proxy_tls_certificate_expiry_timestamp_seconds",
        "proxy_acme_orders_total",
        "proxy_registrations_active",
        "proxy_held_requests",
        "proxy_state_write_duration_seconds_bucket",
        "proxy_upgrades_total",
        "proxy_discovery_source_up",
    ] {
        assert!(
            on_dashboard.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }
    // And what the rules watch.
    let in_rules: BTreeSet<String> = rules.iter().flat_map(|q| metric_names(q)).collect();
    for wanted in [
        "proxy_ready",
        "proxy_upstream_healthy",
        "proxy_http_requests_total",
        "proxy_tls_certificate_expiry_timestamp_seconds",
        "proxy_acme_orders_total",
        "proxy_discovery_source_up",
        "proxy_upgrades_total",
    ] {
        assert!(in_rules.contains(wanted), "no rule watches {wanted}");
    }

    // The new gauges carry the values they claim: readiness, the certificate's notAfter,
    // the failing hook.
    let sample = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .map(str::to_owned)
    };
    assert_eq!(sample("proxy_ready").as_deref(), Some("1"), "{text}");
    let not_after = sample(
        "proxy_tls_certificate_expiry_timestamp_seconds{name=\"www.example.com\",source=\"file\"}",
    )
    .expect("certificate expiry series");
    let expected = proxy
        .daemon
        .tls()
        .certificates()
        .into_iter()
        .find(|c| c.name == "www.example.com")
        .unwrap()
        .not_after;
    assert_eq!(not_after, expected.to_string());
    let mut discovery = String::new();
    for _ in 0..100 {
        discovery = scrape_metrics(admin).await;
        if discovery.contains("proxy_discovery_source_up{pool=\"search\",kind=\"exec\"} 0") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        discovery.contains("proxy_discovery_source_up{pool=\"search\",kind=\"exec\"} 0"),
        "{discovery}"
    );
    proxy.daemon.stop().await;
}

/// `promtool`, or `None` (skip) when run by hand without it.
fn promtool() -> Option<PathBuf> {
    external_program("promtool", "Debian package prometheus")
}

fn run_promtool(promtool: &Path, args: &[&str], dir: &Path) -> String {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_rules_their_unit_tests_and_the_scrape_config() {
    let Some(promtool) = promtool() else {
        return;
    };
    let dir = contrib("prometheus");
    let checked = run_promtool(&promtool, &["check", "rules", "alerts.yml"], &dir);
    assert!(checked.contains("SUCCESS: 9 rules found"), "{checked}");
    let tested = run_promtool(&promtool, &["test", "rules", "alerts.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    run_promtool(&promtool, &["check", "config", "scrape.yml"], &dir);
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let Some(promtool) = promtool() else {
        return;
    };
    // Grafana's variables and macros, replaced by what they stand for at query time.
    let queries: Vec<String> = dashboard_queries()
        .into_iter()
        .filter(|q| !q.starts_with("label_values("))
        .map(|q| {
            q.replace("$__rate_interval", "1m")
                .replace("$__range", "3h")
                .replace("$job", ".*")
                .replace("$instance", ".*")
                .replace("$route", ".*")
                .replace("$pool", ".*")
        })
        .collect();
    assert!(queries.len() >= 30);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let quoted = serde_json::to_string(q).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    let checked = run_promtool(&promtool, &["check", "rules", "dashboard.yml"], dir.path());
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{checked}"
    );
}

#[test]
fn names_are_found_in_queries_and_series_in_scrapes() {
    let names = metric_names(
        "sum by (route) (rate(proxy_http_requests_total{status_class=\"5xx\"}[5m])) / on() up",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["proxy_http_requests_total", "up"]
    );
    let series = series_names(
        "# TYPE proxy_x counter\n# TYPE proxy_h histogram\nproxy_h_bucket{le=\"1\"} 0\n# TYPE proxy_g gauge\n",
    );
    assert!(series.contains("proxy_x_total") && !series.contains("proxy_x"));
    assert!(series.contains("proxy_h_sum") && series.contains("proxy_h_count"));
    assert!(series.contains("proxy_g"));
}
