//! `proxyctl top`: routes and pools with requests per second, error rate and p99, computed
//! from two scrapes of the daemon's `/metrics` (admin listener) an interval apart.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::output::{Format, Output, Table};

/// Options of `proxyctl top`.
#[derive(Args)]
pub struct TopArgs {
    /// The daemon's admin listener (`server.admin_listen`).
    #[arg(long, env = "PROXY_ADMIN", default_value = "127.0.0.1:4208")]
    admin: String,
    /// Time between scrapes (the rates are averaged over it).
    #[arg(long, default_value = "2s")]
    interval: humantime::Duration,
    /// Print one table (after one interval) and exit.
    #[arg(long)]
    once: bool,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    /// `route` or `pool`.
    pub kind: &'static str,
    /// Listener of a route (empty for pools).
    pub listener: String,
    /// Route or pool name (`(no route)` for requests that matched none).
    pub name: String,
    /// Requests per second over the interval.
    pub req_per_s: f64,
    /// Share of responses with a 5xx status over the interval (0..1).
    pub error_rate: f64,
    /// 99th percentile of request duration over the interval, in seconds (`None`: no requests).
    pub p99_s: Option<f64>,
    /// Requests answered since the daemon started.
    pub total: u64,
    /// Upstreams healthy / known (pools only).
    pub upstreams: Option<(u64, u64)>,
}

/// Runs `top` until interrupted (or once).
pub async fn run(args: TopArgs, format: Format) -> Result<()> {
    let out = Output::new(format);
    let interval: Duration = args.interval.into();
    if interval.is_zero() {
        bail!("--interval must be positive");
    }
    let mut previous = (Instant::now(), Sample::parse(&scrape(&args.admin).await?));
    loop {
        tokio::time::sleep(interval).await;
        let now = (Instant::now(), Sample::parse(&scrape(&args.admin).await?));
        let rows = rows(&previous.1, &now.1, now.0.duration_since(previous.0));
        if !args.once && format == Format::Table {
            // Clear the screen and go home, like top(1).
            print!("\x1b[2J\x1b[H");
            println!(
                "proxyctl top: {} every {}   (Ctrl-C to quit)\n",
                args.admin, args.interval
            );
        }
        out.show(&rows, |rows| render(rows))?;
        std::io::stdout().flush()?;
        if args.once {
            return Ok(());
        }
        previous = now;
    }
}

/// `GET /metrics` over plain HTTP/1.0 (the admin listener speaks nothing else).
async fn scrape(admin: &str) -> Result<String> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(admin))
        .await
        .with_context(|| format!("admin listener {admin}: no answer within 5s"))?
        .with_context(|| format!("admin listener {admin} (server.admin_listen)"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: proxyd\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .with_context(|| format!("admin listener {admin}: /metrics took longer than 10s"))??;
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("admin listener {admin}: not an HTTP response");
    };
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200") {
        bail!("admin listener {admin}: /metrics answered {status:?}");
    }
    Ok(body.to_string())
}

/// Counters of one route, summed over status classes.
#[derive(Debug, Default, Clone, PartialEq)]
struct Counts {
    requests: u64,
    errors: u64,
    /// `le` bound -> cumulative count (+Inf as `f64::INFINITY`).
    buckets: BTreeMap<OrderedBound, u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedBound(f64);

impl Eq for OrderedBound {}

impl PartialOrd for OrderedBound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedBound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// What one scrape says about routes and pools.
#[derive(Debug, Default)]
struct Sample {
    /// (listener, route, pool) -> counts.
    routes: BTreeMap<(String, String, String), Counts>,
    /// pool -> (healthy, known) upstreams.
    upstreams: BTreeMap<String, (u64, u64)>,
}

impl Sample {
    fn parse(text: &str) -> Sample {
        let mut sample = Sample::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, labels, value)) = parse_line(line) else {
                continue;
            };
            let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
            let key = || (label("listener"), label("route"), label("pool"));
            match name {
                "proxy_http_requests_total" => {
                    let counts = sample.routes.entry(key()).or_default();
                    let n = value as u64;
                    counts.requests += n;
                    if labels.get("status_class").map(String::as_str) == Some("5xx") {
                        counts.errors += n;
                    }
                }
                "proxy_http_request_duration_seconds_bucket" => {
                    let le = match labels.get("le").map(String::as_str) {
                        Some("+Inf") => f64::INFINITY,
                        Some(s) => match s.parse() {
                            Ok(v) => v,
                            Err(_) => continue,
                        },
                        None => continue,
                    };
                    *sample
                        .routes
                        .entry(key())
                        .or_default()
                        .buckets
                        .entry(OrderedBound(le))
                        .or_default() += value as u64;
                }
                "proxy_upstream_healthy" | "proxy_upstream_ejected" => {
                    let entry = sample.upstreams.entry(label("pool")).or_default();
                    if name == "proxy_upstream_healthy" {
                        entry.1 += 1;
                        entry.0 += value as u64;
                    } else {
                        // An ejected upstream is not serving even if its health check passes.
                        entry.0 = entry.0.saturating_sub(value as u64);
                    }
                }
                _ => {}
            }
        }
        sample
    }
}

/// `name{k="v",...} value` -> parts; `None` for lines it does not understand.
fn parse_line(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series, BTreeMap::new(), value));
    };
    let body = rest.strip_suffix('}')?;
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => val.push('\n'),
                    other => val.push(other),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_string(), val);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name, labels, value))
}

/// The 99th percentile from cumulative bucket deltas, interpolated inside the bucket as
/// Prometheus' `histogram_quantile` does.
fn p99(buckets: &BTreeMap<OrderedBound, u64>) -> Option<f64> {
    let total = *buckets.get(&OrderedBound(f64::INFINITY))?;
    if total == 0 {
        return None;
    }
    let rank = 0.99 * total as f64;
    let mut lower = 0.0;
    let mut below = 0u64;
    for (bound, &count) in buckets {
        if count as f64 >= rank {
            if bound.0.is_infinite() {
                return Some(lower);
            }
            let inside = (count - below) as f64;
            let share = if inside > 0.0 {
                (rank - below as f64) / inside
            } else {
                1.0
            };
            return Some(lower + (bound.0 - lower) * share);
        }
        lower = bound.0;
        below = count;
    }
    None
}

fn delta(now: &Counts, before: Option<&Counts>) -> Counts {
    let Some(before) = before else {
        return now.clone();
    };
    Counts {
        // A restarted daemon starts from zero: then the new values are the delta.
        requests: now
            .requests
            .checked_sub(before.requests)
            .unwrap_or(now.requests),
        errors: now.errors.checked_sub(before.errors).unwrap_or(now.errors),
        buckets: now
            .buckets
            .iter()
            .map(|(b, n)| {
                (
                    *b,
                    n.checked_sub(before.buckets.get(b).copied().unwrap_or(0))
                        .unwrap_or(*n),
                )
            })
            .collect(),
    }
}

fn row(
    kind: &'static str,
    listener: String,
    name: String,
    d: &Counts,
    total: u64,
    seconds: f64,
) -> Row {
    Row {
        kind,
        listener,
        name,
        req_per_s: if seconds > 0.0 {
            d.requests as f64 / seconds
        } else {
            0.0
        },
        error_rate: if d.requests > 0 {
            d.errors as f64 / d.requests as f64
        } else {
            0.0
        },
        p99_s: p99(&d.buckets),
        total,
        upstreams: None,
    }
}

fn rows(before: &Sample, now: &Sample, elapsed: Duration) -> Vec<Row> {
    let seconds = elapsed.as_secs_f64();
    let mut out = Vec::new();
    let mut pools: BTreeMap<String, (Counts, u64)> = BTreeMap::new();
    for (key, counts) in &now.routes {
        let d = delta(counts, before.routes.get(key));
        let (listener, route, pool) = key.clone();
        let name = if route.is_empty() {
            "(no route)".to_string()
        } else {
            route
        };
        out.push(row("route", listener, name, &d, counts.requests, seconds));
        if !pool.is_empty() {
            let entry = pools.entry(pool).or_default();
            entry.0.requests += d.requests;
            entry.0.errors += d.errors;
            for (b, n) in &d.buckets {
                *entry.0.buckets.entry(*b).or_default() += n;
            }
            entry.1 += counts.requests;
        }
    }
    for name in now.upstreams.keys() {
        pools.entry(name.clone()).or_default();
    }
    for (name, (d, total)) in pools {
        let mut r = row("pool", String::new(), name.clone(), &d, total, seconds);
        r.upstreams = now.upstreams.get(&name).copied();
        out.push(r);
    }
    out
}

fn render(rows: &[Row]) -> String {
    let mut text = String::new();
    for kind in ["route", "pool"] {
        let mut table = Table::new(&[
            if kind == "route" { "ROUTE" } else { "POOL" },
            "LISTENER",
            "REQ/S",
            "ERR%",
            "P99",
            "TOTAL",
            "UPSTREAMS",
        ]);
        for r in rows.iter().filter(|r| r.kind == kind) {
            table.row(vec![
                r.name.clone(),
                r.listener.clone(),
                format!("{:.1}", r.req_per_s),
                format!("{:.1}", r.error_rate * 100.0),
                r.p99_s.map_or_else(|| "-".to_string(), format_seconds),
                r.total.to_string(),
                r.upstreams
                    .map_or_else(String::new, |(up, all)| format!("{up}/{all} healthy")),
            ]);
        }
        text.push_str(&table.render());
        text.push('\n');
    }
    text
}

fn format_seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1}ms", s * 1000.0)
    } else {
        format!("{s:.2}s")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BEFORE: &str = "proxy_http_requests_total{listener=\"web\",route=\"site\",pool=\"p\",status_class=\"2xx\"} 10\n\
proxy_http_request_duration_seconds_bucket{le=\"0.01\",listener=\"web\",route=\"site\",pool=\"p\",status_class=\"2xx\"} 10\n\
proxy_http_request_duration_seconds_bucket{le=\"0.1\",listener=\"web\",route=\"site\",pool=\"p\",status_class=\"2xx\"} 10\n\
proxy_http_request_duration_seconds_bucket{le=\"+Inf\",listener=\"web\",route=\"site\",pool=\"p\",status_class=\"2xx\"} 10\n";

    const NOW: &str = "# TYPE x counter\n\
proxy_http_requests_total{listener=\"web\",route=\"site\",pool=\"p\",status_class=\"2xx\"} 28\n\
proxy_http_requests_total{listener=\"web\",route=\"site\",pool=\"p\",status_class=\"5xx\"} 2\n\
proxy_http_request_duration_seconds_bucket{le=\"0.01\",listener=\"web\",route=\"site\",pool=\"p\",status_class=\"2xx\"} 10\n\
proxy_http_request_duration_seconds_bucket{le=\"0.1\",listener=\"web\",route=\"site\",pool=\"p\",status_class=\"2xx\"} 28\n\
proxy_http_request_duration_seconds_bucket{le=\"+Inf\",listener=\"web\",route=\"site\",pool=\"p\",status_class=\"2xx\"} 28\n\
proxy_http_request_duration_seconds_bucket{le=\"0.01\",listener=\"web\",route=\"site\",pool=\"p\",status_class=\"5xx\"} 0\n\
proxy_http_request_duration_seconds_bucket{le=\"0.1\",listener=\"web\",route=\"site\",pool=\"p\",status_class=\"5xx\"} 0\n\
proxy_http_request_duration_seconds_bucket{le=\"+Inf\",listener=\"web\",route=\"site\",pool=\"p\",status_class=\"5xx\"} 2\n\
proxy_upstream_healthy{pool=\"p\",upstream=\"127.0.0.1:1\"} 1\n\
proxy_upstream_healthy{pool=\"p\",upstream=\"127.0.0.1:2\"} 1\n\
proxy_upstream_ejected{pool=\"p\",upstream=\"127.0.0.1:2\"} 1\n";

    #[test]
    fn rates_errors_and_p99_come_from_the_difference() {
        let rows = rows(
            &Sample::parse(BEFORE),
            &Sample::parse(NOW),
            Duration::from_secs(2),
        );
        let route = rows.iter().find(|r| r.kind == "route").unwrap();
        assert_eq!(route.name, "site");
        assert!((route.req_per_s - 10.0).abs() < 1e-9, "{route:?}");
        assert!((route.error_rate - 0.1).abs() < 1e-9, "{route:?}");
        // 20 new requests: 18 in (0.01, 0.1], 2 above 0.1: the 99th lies in the +Inf bucket.
        assert_eq!(route.p99_s, Some(0.1));
        assert_eq!(route.total, 30);
        let pool = rows.iter().find(|r| r.kind == "pool").unwrap();
        assert_eq!(pool.upstreams, Some((1, 2)));
        assert!((pool.req_per_s - 10.0).abs() < 1e-9);
    }

    #[test]
    fn p99_interpolates_inside_its_bucket() {
        let buckets: BTreeMap<OrderedBound, u64> = [
            (OrderedBound(0.1), 0),
            (OrderedBound(0.2), 100),
            (OrderedBound(f64::INFINITY), 100),
        ]
        .into();
        let p = p99(&buckets).unwrap();
        assert!((p - 0.199).abs() < 1e-9, "{p}");
    }

    #[test]
    fn labels_with_escapes_parse() {
        let (name, labels, value) = parse_line("m{a=\"x\\\"y\",b=\"\"} 3").unwrap();
        assert_eq!(name, "m");
        assert_eq!(labels["a"], "x\"y");
        assert_eq!(labels["b"], "");
        assert_eq!(value, 3.0);
    }
}
