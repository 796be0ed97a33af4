//! Fleet-mode benchmark with real processes: an etcd cluster (the `etcd` binary) and
//! proxyd nodes (`$PROXYD`, a release build), all on 127.0.0.1.
//!
//! - propagation: a 3-member etcd and 3 nodes; a route created on node A (the call returns
//!   once A applied it), then the time until B and C each route a request by it (each
//!   polled over its own kept-alive connection); p50/p99 over `--probes` routes;
//! - scale: `--scale-nodes` nodes (default 10) share `--scale-routes` routes (default
//!   100,000): the time to load them (through A's API, in batches), the time for one more
//!   route to be applied on A and served by every node, the time for a fresh node to join
//!   and serve the newest route, and the resident memory of each node.
//!
//! Numbers are reported, never asserted. The machine's load average is printed with them.
//! Usage: `fleet [--probes 300] [--scale-nodes 10] [--scale-routes 100000] [--batch 2000]`

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use proxy_proto::v1 as pb;
use proxy_proto::v1::admin_service_client::AdminServiceClient;
use proxy_proto::v1::cluster_service_client::ClusterServiceClient;
use proxy_proto::v1::pool_service_client::PoolServiceClient;
use proxy_proto::v1::route_service_client::RouteServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

const MAX_MESSAGE: usize = 64 * 1024 * 1024;

struct Options {
    probes: usize,
    scale_nodes: usize,
    scale_routes: usize,
    batch: usize,
}

fn options() -> Result<Options> {
    let mut o = Options {
        probes: 300,
        scale_nodes: 10,
        scale_routes: 100_000,
        batch: 2_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().context("every flag takes a value")?;
        let n: usize = value.parse().with_context(|| format!("{flag} {value}"))?;
        match flag.as_str() {
            "--probes" => o.probes = n,
            "--scale-nodes" => o.scale_nodes = n,
            "--scale-routes" => o.scale_routes = n,
            "--batch" => o.batch = n,
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(o)
}

/// Processes started by the bench; killed when dropped.
#[derive(Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts an etcd cluster of `size` members; returns the client endpoints.
fn etcd(dir: &Path, size: usize, children: &mut Children) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let ports: Vec<(u16, u16)> = (0..size)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_>>()?;
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    for (i, (client, peer)) in ports.iter().enumerate() {
        let log = std::fs::File::create(dir.join(format!("etcd-{i}.log")))?;
        let child = Command::new("etcd")
            .args(["--name", &format!("m{i}"), "--data-dir"])
            .arg(dir.join(format!("etcd-{i}")))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
            ])
            // An API batch of N objects is one transaction of N puts and N guards.
            .args(["--max-txn-ops", "20000", "--max-request-bytes", "33554432"])
            .args(["--quota-backend-bytes", "8589934592"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (Debian package etcd-server)")?;
        children.0.push(child);
    }
    Ok(ports
        .iter()
        .map(|(c, _)| format!("http://127.0.0.1:{c}"))
        .collect())
}

/// A proxyd node (a child process): its directory, web port and pid.
struct Node {
    name: String,
    dir: PathBuf,
    web: SocketAddr,
    pid: u32,
}

fn start_node(
    proxyd: &Path,
    root: &Path,
    name: &str,
    endpoints: &[String],
    prefix: &str,
    children: &mut Children,
) -> Result<Node> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    let web = free_port()?;
    let endpoints = endpoints
        .iter()
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        "[server]\nstate_dir = \"{d}\"\nmgmt_socket = \"{d}/mgmt.sock\"\nlog_level = \"warn\"\n\
         admin_listen = \"127.0.0.1:{admin}\"\n\n\
         [[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:{web}\"\n\n\
         [cluster]\nnode_name = \"{name}\"\netcd = {{ endpoints = [{endpoints}], prefix = \"{prefix}\" }}\n",
        d = dir.display(),
        admin = free_port()?
    );
    std::fs::write(dir.join("proxy.toml"), config)?;
    let child = Command::new(proxyd)
        .arg("--config")
        .arg(dir.join("proxy.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("proxyd.log"))?)
        .spawn()
        .context("starting proxyd")?;
    let pid = child.id();
    children.0.push(child);
    Ok(Node {
        name: name.into(),
        dir,
        web: ([127, 0, 0, 1], web).into(),
        pid,
    })
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

/// The node's management API, once its socket accepts (up to `within`).
async fn api(node: &Node, within: Duration) -> Result<Channel> {
    let started = Instant::now();
    loop {
        match channel(node.dir.join("mgmt.sock")).await {
            Ok(c) => return Ok(c),
            Err(e) if started.elapsed() > within => {
                bail!(
                    "node {} has no management API after {within:?}: {e}",
                    node.name
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn upstream() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    hyper::Response::builder()
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

async fn http_client(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Polls `host` through `client` until it is routed (not 404); the time it took.
async fn until_routed(
    client: &mut SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    host: &str,
    within: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if client.ready().await.is_err() {
            *client = http_client(addr).await?;
        }
        let request = hyper::Request::get("/")
            .header("host", host)
            .body(Empty::new())?;
        let status = match client.send_request(request).await {
            Ok(r) => {
                let status = r.status();
                http_body_util::BodyExt::collect(r.into_body()).await?;
                status
            }
            Err(_) => {
                *client = http_client(addr).await?;
                continue;
            }
        };
        if status != hyper::StatusCode::NOT_FOUND {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!("{host} not routed by {addr} within {within:?}");
        }
    }
}

fn route(name: &str, host: &str) -> pb::Route {
    pb::Route {
        name: name.into(),
        listener: "web".into(),
        host: host.into(),
        path: Some(pb::route::Path::PathPrefix("/".into())),
        pool: "app".into(),
        ..Default::default()
    }
}

fn pool(upstream: SocketAddr) -> pb::Pool {
    pb::Pool {
        name: "app".into(),
        upstreams: vec![pb::Upstream {
            address: upstream.to_string(),
            weight: 1,
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn create_route(channel: &Channel, r: pb::Route) -> Result<()> {
    RouteServiceClient::new(channel.clone())
        .create_route(pb::CreateRouteRequest { route: Some(r) })
        .await?;
    Ok(())
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

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "p50 {} | p99 {} | max {} (n={})",
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.99)),
        ms(v.last().copied().unwrap_or_default()),
        v.len()
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" / "))
        .unwrap_or_else(|_| "unknown".into())
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")?;
    Ok(kb / 1024.0)
}

async fn propagation(proxyd: &Path, root: &Path, probes: usize) -> Result<()> {
    let mut children = Children::default();
    let endpoints = etcd(&root.join("etcd-prop"), 3, &mut children)?;
    let names = ["a", "b", "c"];
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(start_node(
            proxyd,
            root,
            name,
            &endpoints,
            "/bench/prop",
            &mut children,
        )?);
    }
    let a = api(&nodes[0], Duration::from_secs(30)).await?;
    let up = upstream().await?;
    // etcd may still be electing: retry the first write.
    let started = Instant::now();
    while let Err(e) = PoolServiceClient::new(a.clone())
        .create_pool(pb::CreatePoolRequest {
            pool: Some(pool(up)),
        })
        .await
    {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("first write: {e}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut b = http_client(nodes[1].web).await?;
    let mut c = http_client(nodes[2].web).await?;
    let (mut call, mut to_b, mut to_c, mut to_both) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    println!(
        "propagation: 3-member etcd, 3 nodes, {probes} probes; load average before: {}",
        load_average()
    );
    for i in 0..probes {
        let host = format!("p{i}.bench");
        let t0 = Instant::now();
        create_route(&a, route(&format!("p{i}"), &host)).await?;
        let returned = t0.elapsed();
        let within = Duration::from_secs(30);
        let (rb, rc) = tokio::join!(
            until_routed(&mut b, nodes[1].web, &host, within),
            until_routed(&mut c, nodes[2].web, &host, within)
        );
        let (rb, rc) = (rb?, rc?);
        call.push(returned);
        to_b.push(rb);
        to_c.push(rc);
        to_both.push(rb.max(rc));
    }
    println!(
        "  CreateRoute on A (returns once A applied it): {}",
        summary(call)
    );
    println!(
        "  A's call returned -> B routes it:             {}",
        summary(to_b)
    );
    println!(
        "  A's call returned -> C routes it:             {}",
        summary(to_c)
    );
    println!(
        "  A's call returned -> B and C both route it:   {}",
        summary(to_both)
    );
    println!("  load average after: {}", load_average());
    Ok(())
}

async fn fleet_status(channel: &Channel) -> Result<pb::ClusterStatusResponse> {
    Ok(ClusterServiceClient::new(channel.clone())
        .cluster_status(pb::ClusterStatusRequest {})
        .await?
        .into_inner())
}

async fn scale(
    proxyd: &Path,
    root: &Path,
    count: usize,
    routes: usize,
    batch: usize,
) -> Result<()> {
    let mut children = Children::default();
    let endpoints = etcd(&root.join("etcd-scale"), 3, &mut children)?;
    let mut nodes = Vec::new();
    for i in 0..count.saturating_sub(1) {
        nodes.push(start_node(
            proxyd,
            root,
            &format!("s{i}"),
            &endpoints,
            "/bench/scale",
            &mut children,
        )?);
    }
    let a = api(&nodes[0], Duration::from_secs(30)).await?;
    let up = upstream().await?;
    let started = Instant::now();
    while let Err(e) = PoolServiceClient::new(a.clone())
        .create_pool(pb::CreatePoolRequest {
            pool: Some(pool(up)),
        })
        .await
    {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("first write: {e}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "scale: 3-member etcd, {} nodes, {routes} routes in batches of {batch}; load average before: {}",
        count,
        load_average()
    );
    let admin = AdminServiceClient::new(a.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let loading = Instant::now();
    let mut made = 0;
    while made < routes {
        let n = batch.min(routes - made);
        let changes = (made..made + n)
            .map(|k| pb::Change {
                change: Some(pb::change::Change::CreateRoute(route(
                    &format!("r{k}"),
                    &format!("r{k}.bench"),
                ))),
            })
            .collect();
        admin
            .clone()
            .apply(pb::ApplyRequest { changes })
            .await
            .with_context(|| format!("Apply of routes {made}..{}", made + n))?;
        made += n;
    }
    let loaded = loading.elapsed();
    // Every node has applied every write.
    let converging = Instant::now();
    loop {
        let s = fleet_status(&a).await?;
        if s.nodes.len() == nodes.len() && s.nodes.iter().all(|n| n.lag == 0) {
            break;
        }
        if converging.elapsed() > Duration::from_secs(600) {
            bail!("the fleet did not converge: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let converged = loaded + converging.elapsed();
    println!(
        "  {routes} routes written through node s0: {} s; every node applied them after {} s",
        format!("{:.1}", loaded.as_secs_f64()),
        format!("{:.1}", converged.as_secs_f64())
    );

    // One more route at this size: applied on s0 (the call), then served everywhere.
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(http_client(n.web).await?);
    }
    let mut one = Vec::new();
    let mut everywhere = Vec::new();
    for i in 0..5 {
        let host = format!("one{i}.bench");
        let t0 = Instant::now();
        create_route(&a, route(&format!("one{i}"), &host)).await?;
        one.push(t0.elapsed());
        let mut slowest = Duration::ZERO;
        for (client, n) in clients.iter_mut().zip(&nodes) {
            slowest =
                slowest.max(until_routed(client, n.web, &host, Duration::from_secs(60)).await?);
        }
        everywhere.push(t0.elapsed().max(slowest));
    }
    println!(
        "  one CreateRoute on s0 at {routes} routes (etcd write + applied on s0): {}",
        summary(one)
    );
    println!(
        "  ... until all {} nodes route it:                                        {}",
        nodes.len(),
        summary(everywhere)
    );

    // A fresh node joins: start until it serves the newest route.
    let t0 = Instant::now();
    let fresh = start_node(
        proxyd,
        root,
        &format!("s{}", count - 1),
        &endpoints,
        "/bench/scale",
        &mut children,
    )?;
    let mut fresh_client = loop {
        match http_client(fresh.web).await {
            Ok(c) => break c,
            Err(_) if t0.elapsed() < Duration::from_secs(300) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => bail!("the fresh node never listened: {e}"),
        }
    };
    let listening = t0.elapsed();
    until_routed(
        &mut fresh_client,
        fresh.web,
        "one4.bench",
        Duration::from_secs(300),
    )
    .await?;
    let ready = t0.elapsed();
    println!(
        "  fresh node: listening after {}, serving the fleet's newest route after {}",
        ms(listening),
        ms(ready)
    );
    nodes.push(fresh);
    let mut rss: Vec<(String, f64)> = Vec::new();
    for n in &nodes {
        rss.push((n.name.clone(), rss_mib(n.pid)?));
    }
    let mut sizes: Vec<f64> = rss.iter().map(|(_, m)| *m).collect();
    sizes.sort_by(f64::total_cmp);
    println!(
        "  resident memory per node: min {:.0} MiB, median {:.0} MiB, max {:.0} MiB ({})",
        sizes[0],
        sizes[sizes.len() / 2],
        sizes[sizes.len() - 1],
        rss.iter()
            .map(|(n, m)| format!("{n} {m:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  load average after: {}", load_average());
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = options()?;
    let proxyd = PathBuf::from(std::env::var("PROXYD").context("PROXYD: a proxyd binary")?);
    let root = tempfile::tempdir()?;
    println!("fleet bench, proxyd {}", proxyd.display());
    propagation(&proxyd, root.path(), o.probes).await?;
    if o.scale_nodes > 1 && o.scale_routes > 0 {
        scale(&proxyd, root.path(), o.scale_nodes, o.scale_routes, o.batch).await?;
    }
    Ok(())
}
