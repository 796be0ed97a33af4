//! Management API benchmark against a real in-process proxyd (unix socket, SQLite on disk):
//!
//! - change throughput: CreateRoute calls per second, one client and 8 concurrent clients;
//! - propagation latency: from a CreateRoute call returning to the first response routed by
//!   the new rule (one proxied request over a kept-alive connection);
//! - one `Apply` batch of 10,000 new routes;
//! - 1,000 registrations arriving at once: time until all are registered, and until a
//!   request to each one's path prefix has been served by its instance;
//! - memory: resident set growth of the process while the existing routes were loaded.
//!
//! The machine's load average is printed with each run, and each propagation probe notes
//! how long the process' threads waited for a CPU meanwhile (the kernel's run-queue time):
//! on a shared machine a slow probe is often a probe that waited for a core.
//!
//! Each measurement runs with N routes already in the state (default: 10 and 100,000), and
//! the goals of the state core are checked against the results at the end.
//! Usage: `api-bench [--existing 10,100000] [--changes 1000] [--probes 200] [--budget-secs 20]
//! [--registrations 1000]`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use proxy_proto::v1 as pb;
use proxy_proto::v1::admin_service_client::AdminServiceClient;
use proxy_proto::v1::route_service_client::RouteServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

const MAX_MESSAGE: usize = 64 * 1024 * 1024;
const HOST: &str = "bench.example";

struct Options {
    existing: Vec<usize>,
    changes: usize,
    probes: usize,
    budget: Duration,
    registrations: usize,
}

fn options() -> Result<Options> {
    let mut o = Options {
        existing: vec![10, 100_000],
        changes: 1000,
        probes: 200,
        budget: Duration::from_secs(20),
        registrations: 1000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--existing" => {
                o.existing = value
                    .split(',')
                    .map(|v| v.trim().parse().context("--existing: numbers"))
                    .collect::<Result<_>>()?
            }
            "--changes" => o.changes = value.parse()?,
            "--probes" => o.probes = value.parse()?,
            "--budget-secs" => o.budget = Duration::from_secs(value.parse()?),
            "--registrations" => o.registrations = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(o)
}

/// An HTTP upstream answering everything with `x-upstream: NAME`.
async fn upstream(name: &'static str) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| async move {
                    hyper::Response::builder()
                        .header("x-upstream", name)
                        .body(http_body_util::Full::new(Bytes::from_static(b"ok")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A kept-alive HTTP/1.1 connection to the proxy.
async fn http_client(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Which upstream served `GET path`.
async fn served_by(client: &mut SendRequest<Empty<Bytes>>, path: &str) -> Result<String> {
    client.ready().await?;
    let request = hyper::Request::get(path)
        .header("host", HOST)
        .body(Empty::new())?;
    send(client, request).await
}

async fn send(
    client: &mut SendRequest<Empty<Bytes>>,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<String> {
    let response = client.send_request(request).await?;
    let name = response
        .headers()
        .get("x-upstream")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    http_body_util::BodyExt::collect(response.into_body()).await?;
    Ok(name)
}

async fn channel(socket: PathBuf) -> Result<Channel> {
    Ok(Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?)
}

fn routes_client(channel: Channel) -> RouteServiceClient<Channel> {
    RouteServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

fn route(name: String, prefix: String, pool: &str) -> pb::Route {
    pb::Route {
        name,
        listener: "web".into(),
        host: HOST.into(),
        path: Some(pb::route::Path::PathPrefix(prefix)),
        pool: pool.into(),
        ..Default::default()
    }
}

/// CreateRoute changes for `/{prefix}/{k}/`, k in `range`.
fn bulk_routes(prefix: &str, range: std::ops::Range<usize>, pool: &str) -> Vec<pb::Change> {
    range
        .map(|k| pb::Change {
            change: Some(pb::change::Change::CreateRoute(route(
                format!("{prefix}-{k}"),
                format!("/{prefix}/{k}/"),
                pool,
            ))),
        })
        .collect()
}

/// Opens `count` registrations at once (spread over a few connections), all on `port` with
/// their own path prefix and `endpoint` as their instance. Returns the time until every one
/// was registered, and until a request to each prefix had been served by `endpoint`.
async fn registrations(
    socket: PathBuf,
    port: u16,
    endpoint: SocketAddr,
    count: usize,
) -> Result<(Duration, Duration)> {
    use proxy::registration::client::{self, Announce, RegisteredProtocol};
    const CONNECTIONS: usize = 50;
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS.min(count.max(1)) {
        channels.push(client::unix_channel(&socket).await?);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let channel = channels[i % channels.len()].clone();
        let announce = Announce {
            endpoint: endpoint.to_string(),
            port: u32::from(port),
            protocol: RegisteredProtocol::Http as i32,
            path_prefix: format!("/reg/{i}/"),
            ..Default::default()
        };
        tasks.spawn(async move { client::register(channel, announce, None).await });
    }
    let mut leases = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        leases.push(joined?.context("registering")?);
    }
    let registered_in = started.elapsed();
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut checks = tokio::task::JoinSet::new();
    for c in 0..8 {
        let mut http = http_client(address).await?;
        checks.spawn(async move {
            for i in (c..count).step_by(8) {
                http.ready().await?;
                let request = hyper::Request::get(format!("/reg/{i}/x"))
                    .header("host", "registered.example")
                    .body(Empty::new())?;
                let who = send(&mut http, request).await?;
                if who != "new" {
                    bail!("registration {i} was not routed to its instance (got {who})");
                }
            }
            Ok(())
        });
    }
    while let Some(joined) = checks.join_next().await {
        joined??;
    }
    let routed_in = started.elapsed();
    drop(leases);
    Ok((registered_in, routed_in))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// The load average over 1, 5 and 15 minutes, as `/proc/loadavg` says.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" / "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Time the threads of this process (the bench and the in-process proxyd) have spent
/// runnable but waiting for a CPU, summed (the second field of each task's `schedstat`).
fn cpu_wait() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let nanos: u64 = tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

/// Total time the state writer has spent on batches so far (its latency histogram's sum).
fn writer_time(daemon: &proxy::Daemon) -> Duration {
    daemon
        .telemetry()
        .metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix("proxy_state_write_duration_seconds_sum "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs_f64)
}

/// Resident set size of this process (the bench and the in-process proxyd), in bytes.
fn rss_bytes() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/self/status")?;
    Ok(kb * 1024)
}

/// A port that was free a moment ago (for the registration port).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Result1 {
    existing: usize,
    preload: Duration,
    preload_batch_max: Duration,
    rss_growth: u64,
    batch_10k: Duration,
    batch_writer: Duration,
    load_before: String,
    load_after: String,
    registrations: usize,
    registered_in: Duration,
    routed_in: Duration,
    seq_rate: f64,
    seq_p50: Duration,
    seq_p99: Duration,
    conc_rate: f64,
    prop_p50: Duration,
    prop_p99: Duration,
    prop_max: Duration,
    first_request_misses: usize,
    probes: usize,
    /// Probes slower than 1 ms, and of those the ones whose threads waited >= 0.5 ms for a CPU.
    slow_probes: usize,
    slow_probes_waiting: usize,
    request_p50: Duration,
    request_p99: Duration,
}

async fn run_one(
    existing: usize,
    o: &Options,
    old: SocketAddr,
    new: SocketAddr,
) -> Result<Result1> {
    let load_before = load_average();
    let dir = tempfile::tempdir()?;
    let registration_port = free_port()?;
    let text = format!(
        "[server]\nstate_dir = \"{}\"\nadmin_listen = \"\"\nlog_level = \"warn\"\n\
         [registration]\nport_range = \"{registration_port}-{registration_port}\"\n\
         address = \"127.0.0.1\"\n\
         [[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:0\"\n\
         [[pools]]\nname = \"old\"\nupstreams = [\"{old}\"]\n\
         [[pools]]\nname = \"new\"\nupstreams = [\"{new}\"]\n",
        dir.path().display()
    );
    let config = proxy::Config::parse(&text, "bench.toml")?;
    let daemon = proxy::Daemon::start(config).await?;
    let web = daemon.listener_address("web").context("web listener")?;
    let ch = channel(daemon.config().server.mgmt_socket.clone()).await?;
    let mut routes = routes_client(ch.clone());
    let mut admin = AdminServiceClient::new(ch.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);

    // Preload in atomic batches of 10,000.
    let rss_before = rss_bytes()?;
    let started = Instant::now();
    let mut preload_batch_max = Duration::ZERO;
    let mut i = 0;
    while i < existing {
        let end = (i + 10_000).min(existing);
        let changes = bulk_routes("bulk", i..end, "old");
        let t = Instant::now();
        admin.apply(pb::ApplyRequest { changes }).await?;
        preload_batch_max = preload_batch_max.max(t.elapsed());
        i = end;
    }
    let preload = started.elapsed();
    let rss_growth = rss_bytes()?.saturating_sub(rss_before);

    let mut http = http_client(web).await?;
    let mut request_times = Vec::new();
    // Plain requests with no change in between: the data path's own latency, to read the
    // propagation figures against.
    for k in 0..1000 {
        let t = Instant::now();
        let path = format!("/bulk/{}/x", k % existing.max(1));
        served_by(&mut http, &path).await?;
        request_times.push(t.elapsed());
    }
    request_times.sort();

    // Sequential throughput.
    let mut call_times = Vec::new();
    let started = Instant::now();
    for k in 0..o.changes {
        let t = Instant::now();
        routes
            .create_route(pb::CreateRouteRequest {
                route: Some(route(format!("seq-{k}"), format!("/seq/{k}/"), "old")),
            })
            .await?;
        call_times.push(t.elapsed());
        if started.elapsed() > o.budget {
            break;
        }
    }
    let seq_rate = call_times.len() as f64 / started.elapsed().as_secs_f64();
    call_times.sort();

    // 8 concurrent clients, each on its own connection.
    let started = Instant::now();
    let deadline = started + o.budget;
    let mut tasks = Vec::new();
    for c in 0..8 {
        let mut client = routes_client(channel(daemon.config().server.mgmt_socket.clone()).await?);
        let per_client = o.changes / 8;
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            for k in 0..per_client {
                let r = route(format!("conc-{c}-{k}"), format!("/conc/{c}/{k}/"), "old");
                if client
                    .create_route(pb::CreateRouteRequest { route: Some(r) })
                    .await
                    .is_err()
                {
                    break;
                }
                done += 1;
                if Instant::now() > deadline {
                    break;
                }
            }
            done
        }));
    }
    let mut concurrent_done = 0;
    for t in tasks {
        concurrent_done += t.await?;
    }
    let conc_rate = concurrent_done as f64 / started.elapsed().as_secs_f64();

    // Propagation: call returned -> first response from the new rule's pool.
    let mut propagation = Vec::new();
    let mut misses = 0;
    let (mut slow_probes, mut slow_probes_waiting) = (0, 0);
    // A fresh, warmed-up connection: the one above may have idled out during the throughput runs.
    let mut http = http_client(web).await?;
    served_by(&mut http, "/bulk/0/x").await?;
    let started = Instant::now();
    for k in 0..o.probes {
        let waited_before = cpu_wait();
        routes
            .create_route(pb::CreateRouteRequest {
                route: Some(route(format!("probe-{k}"), format!("/probe/{k}/"), "new")),
            })
            .await?;
        let returned = Instant::now();
        let path = format!("/probe/{k}/x");
        let mut first = true;
        loop {
            if served_by(&mut http, &path).await? == "new" {
                break;
            }
            if first {
                misses += 1;
                first = false;
            }
            if returned.elapsed() > Duration::from_secs(5) {
                bail!("rule {k} never took effect");
            }
        }
        let took = returned.elapsed();
        propagation.push(took);
        if took > Duration::from_millis(1) {
            slow_probes += 1;
            if cpu_wait().saturating_sub(waited_before) >= Duration::from_micros(500) {
                slow_probes_waiting += 1;
            }
        }
        if started.elapsed() > o.budget {
            break;
        }
    }
    let probes = propagation.len();
    propagation.sort();

    // One more atomic batch of 10,000 routes on top of what is there.
    let changes = bulk_routes("batch", 0..10_000, "old");
    let writer_before = writer_time(&daemon);
    let t = Instant::now();
    admin.apply(pb::ApplyRequest { changes }).await?;
    let batch_10k = t.elapsed();
    let batch_writer = writer_time(&daemon).saturating_sub(writer_before);
    served_by(&mut http, "/batch/9999/x").await?;

    // Registrations arriving at once, as after an upgrade.
    let (registered_in, routed_in) = registrations(
        daemon.config().server.mgmt_socket.clone(),
        registration_port,
        new,
        o.registrations,
    )
    .await?;

    let result = Result1 {
        existing,
        preload,
        preload_batch_max,
        rss_growth,
        batch_10k,
        batch_writer,
        load_before,
        load_after: load_average(),
        registrations: o.registrations,
        registered_in,
        routed_in,
        seq_rate,
        seq_p50: percentile(&call_times, 0.5),
        seq_p99: percentile(&call_times, 0.99),
        conc_rate,
        prop_p50: percentile(&propagation, 0.5),
        prop_p99: percentile(&propagation, 0.99),
        prop_max: propagation.last().copied().unwrap_or_default(),
        first_request_misses: misses,
        probes,
        slow_probes,
        slow_probes_waiting,
        request_p50: percentile(&request_times, 0.5),
        request_p99: percentile(&request_times, 0.99),
    };
    daemon.stop().await;
    Ok(result)
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = options()?;
    let old = upstream("old").await?;
    let new = upstream("new").await?;
    let mut results = Vec::new();
    for &existing in &o.existing {
        results.push(run_one(existing, &o, old, new).await?);
    }
    println!(
        "| existing routes | preload (largest batch of 10,000) | changes/s (1 client) | call p50 / p99 | \
         changes/s (8 clients) | propagation p50 / p99 / max | first request missed | \
         proxied request p50 / p99 (no change) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.2} s ({}) | {:.0} | {} / {} | {:.0} | {} / {} / {} | {} of {} | {} / {} |",
            r.existing,
            r.preload.as_secs_f64(),
            ms(r.preload_batch_max),
            r.seq_rate,
            ms(r.seq_p50),
            ms(r.seq_p99),
            r.conc_rate,
            ms(r.prop_p50),
            ms(r.prop_p99),
            ms(r.prop_max),
            r.first_request_misses,
            r.probes,
            ms(r.request_p50),
            ms(r.request_p99),
        );
    }
    println!();
    println!(
        "| existing routes | one batch of 10,000 routes (state writer) | registrations at once | all registered | \
         all registered and routed | RSS growth while loading the existing routes |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} ({}) | {} | {} | {} | {} |",
            r.existing,
            ms(r.batch_10k),
            ms(r.batch_writer),
            r.registrations,
            ms(r.registered_in),
            ms(r.routed_in),
            mib(r.rss_growth),
        );
    }
    println!();
    for r in &results {
        println!(
            "- {} routes: load average (1 / 5 / 15 min) {} at the start, {} at the end; \
             {} of {} propagation probes took over 1 ms, {} of them while the process' threads \
             waited >= 0.5 ms for a CPU",
            r.existing, r.load_before, r.load_after, r.slow_probes, r.probes, r.slow_probes_waiting,
        );
    }
    goals(&results);
    Ok(())
}

/// The goals of the state core, checked against this run.
fn goals(results: &[Result1]) {
    let check = |ok: bool| if ok { "met" } else { "NOT met" };
    let small = results.iter().min_by_key(|r| r.existing);
    let large = results.iter().max_by_key(|r| r.existing);
    if let (Some(small), Some(large)) = (small, large) {
        let best = |r: &Result1| r.seq_rate.max(r.conc_rate);
        println!(
            "- single changes at {} routes: {:.0}/s with 1 client, {:.0}/s with 8 clients (goal >= 1,000/s): {}",
            large.existing,
            large.seq_rate,
            large.conc_rate,
            check(best(large) >= 1000.0)
        );
        println!(
            "- rate at {} routes / rate at {} routes: {:.2} with 1 client, {:.2} with 8 clients (goal >= 0.5): {}",
            large.existing,
            small.existing,
            large.seq_rate / small.seq_rate,
            large.conc_rate / small.conc_rate,
            check(large.seq_rate * 2.0 >= small.seq_rate && large.conc_rate * 2.0 >= small.conc_rate)
        );
    }
    for r in results {
        println!(
            "- {} routes: batch of 10,000 in {} (goal < 200 ms): {}; propagation p99 {} (goal < 1 ms): {}; \
             {} registrations registered and routed in {} (goal < 2 s): {}",
            r.existing,
            ms(r.batch_10k),
            check(r.batch_10k < Duration::from_millis(200)),
            ms(r.prop_p99),
            check(r.prop_p99 < Duration::from_millis(1)),
            r.registrations,
            ms(r.routed_in),
            check(r.routed_in < Duration::from_secs(2)),
        );
    }
}
