//! Management API benchmark against a real in-process proxyd (unix socket, SQLite on disk):
//!
//! - change throughput: CreateRoute calls per second, one client and 8 concurrent clients;
//! - propagation latency: from a CreateRoute call returning to the first response routed by
//!   the new rule (one proxied request over a kept-alive connection).
//!
//! Each measurement runs with N routes already in the state (default: 10 and 100,000).
//! Usage: `api-bench [--existing 10,100000] [--changes 1000] [--probes 200] [--budget-secs 20]`

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
}

fn options() -> Result<Options> {
    let mut o = Options {
        existing: vec![10, 100_000],
        changes: 1000,
        probes: 200,
        budget: Duration::from_secs(20),
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

struct Result1 {
    existing: usize,
    preload: Duration,
    seq_rate: f64,
    seq_p50: Duration,
    seq_p99: Duration,
    conc_rate: f64,
    prop_p50: Duration,
    prop_p99: Duration,
    prop_max: Duration,
    first_request_misses: usize,
    probes: usize,
    request_p50: Duration,
}

async fn run_one(
    existing: usize,
    o: &Options,
    old: SocketAddr,
    new: SocketAddr,
) -> Result<Result1> {
    let dir = tempfile::tempdir()?;
    let text = format!(
        "[server]\nstate_dir = \"{}\"\nadmin_listen = \"\"\nlog_level = \"warn\"\n\
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
    let started = Instant::now();
    let mut i = 0;
    while i < existing {
        let end = (i + 10_000).min(existing);
        let changes = (i..end)
            .map(|k| pb::Change {
                change: Some(pb::change::Change::CreateRoute(route(
                    format!("bulk-{k}"),
                    format!("/bulk/{k}/"),
                    "old",
                ))),
            })
            .collect();
        admin.apply(pb::ApplyRequest { changes }).await?;
        i = end;
    }
    let preload = started.elapsed();

    let mut http = http_client(web).await?;
    let mut request_times = Vec::new();
    for k in 0..200 {
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
    // A fresh, warmed-up connection: the one above may have idled out during the throughput runs.
    let mut http = http_client(web).await?;
    served_by(&mut http, "/bulk/0/x").await?;
    let started = Instant::now();
    for k in 0..o.probes {
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
        propagation.push(returned.elapsed());
        if started.elapsed() > o.budget {
            break;
        }
    }
    let probes = propagation.len();
    propagation.sort();
    let result = Result1 {
        existing,
        preload,
        seq_rate,
        seq_p50: percentile(&call_times, 0.5),
        seq_p99: percentile(&call_times, 0.99),
        conc_rate,
        prop_p50: percentile(&propagation, 0.5),
        prop_p99: percentile(&propagation, 0.99),
        prop_max: propagation.last().copied().unwrap_or_default(),
        first_request_misses: misses,
        probes,
        request_p50: percentile(&request_times, 0.5),
    };
    daemon.stop().await;
    Ok(result)
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = options()?;
    let old = upstream("old").await?;
    let new = upstream("new").await?;
    println!(
        "| existing routes | preload | changes/s (1 client) | call p50 / p99 | changes/s (8 clients) | \
         propagation p50 / p99 / max | first request missed | proxied request p50 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &existing in &o.existing {
        let r = run_one(existing, &o, old, new).await?;
        println!(
            "| {} | {:.1} s | {:.0} | {} / {} | {:.0} | {} / {} / {} | {} of {} | {} |",
            r.existing,
            r.preload.as_secs_f64(),
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
        );
    }
    Ok(())
}
