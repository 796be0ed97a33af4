//! `proxyctl pools ...`: pools.

use anyhow::Result;
use clap::{Args, Subcommand};
use proxy_proto::v1 as pb;
use serde_json::json;

use crate::client::{Clients, Reply};
use crate::document::{H2Keepalive, HealthCheck, Outlier, Pool, Upstream, UpstreamTls};
use crate::output::{fields, Output, Table};
use crate::upstreams;

/// Pool commands.
#[derive(Subcommand)]
pub enum PoolsCommand {
    /// Lists pools with their upstream counts.
    #[command(alias = "ls")]
    List,
    /// Shows one pool with its upstreams, their state and health.
    Get {
        /// Pool name.
        name: String,
    },
    /// Adds a pool.
    Add(Box<PoolArgs>),
    /// Replaces a pool (every field, including its upstreams).
    Update(Box<PoolArgs>),
    /// Removes a pool; refused while a route uses it.
    #[command(alias = "delete")]
    Rm {
        /// Pool name.
        name: String,
    },
}

/// The fields of a pool.
#[derive(Args)]
pub struct PoolArgs {
    /// Pool name.
    pub name: String,
    /// Upstream `host:port`, optionally `host:port=WEIGHT`; repeat for more.
    #[arg(long = "upstream")]
    pub upstreams: Vec<String>,
    /// round_robin, ordered or least_conn.
    #[arg(long, default_value = "round_robin")]
    pub balance: String,
    /// Path for an HTTP health check; empty for TCP connect checks.
    #[arg(long)]
    pub health_path: Option<String>,
    /// Time between health checks (e.g. 5s); enables checking.
    #[arg(long)]
    pub health_interval: Option<humantime::Duration>,
    /// Time allowed for one health check.
    #[arg(long, default_value = "2s")]
    pub health_timeout: humantime::Duration,
    /// Time allowed to connect to an upstream (default 5s).
    #[arg(long)]
    pub connect_timeout: Option<humantime::Duration>,
    /// Time allowed for an upstream to start its response (default 60s).
    #[arg(long)]
    pub response_timeout: Option<humantime::Duration>,
    /// Connect to the upstreams over TLS, expecting this name in their certificate.
    #[arg(long, requires = "tls_ca_file")]
    pub tls_server_name: Option<String>,
    /// PEM roots (a path on the proxy's host) the upstreams' certificates must chain to.
    #[arg(long, requires = "tls_server_name")]
    pub tls_ca_file: Option<String>,
    /// PEM client certificate chain (path on the proxy's host) to present to the upstreams.
    #[arg(long, requires_all = ["tls_server_name", "tls_client_key"])]
    pub tls_client_cert: Option<String>,
    /// PEM key of the client certificate (path on the proxy's host).
    #[arg(long, requires = "tls_client_cert")]
    pub tls_client_key: Option<String>,
    /// How long an idle upstream connection is kept for reuse (default 1500ms).
    #[arg(long)]
    pub idle_timeout: Option<humantime::Duration>,
    /// Connections (busy and idle) per upstream; 0 for no limit (the default).
    #[arg(long)]
    pub max_connections_per_upstream: Option<u32>,
    /// Time the client may leave between two pieces of its request body (default 60s).
    #[arg(long)]
    pub body_timeout: Option<humantime::Duration>,
    /// One deadline for all connection attempts of a request (default 10s).
    #[arg(long)]
    pub connect_deadline: Option<humantime::Duration>,
    /// Upstreams a request tries at most (default 3).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Consecutive failures that eject an upstream (default 1).
    #[arg(long)]
    pub outlier_consecutive_failures: Option<u32>,
    /// Count 5xx answers as failures (`--outlier-on-5xx` or `--outlier-on-5xx=false`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub outlier_on_5xx: Option<bool>,
    /// First ejection time, doubled on each repeated ejection (default 10s).
    #[arg(long)]
    pub outlier_base_ejection: Option<humantime::Duration>,
    /// Longest ejection time (default 300s).
    #[arg(long)]
    pub outlier_max_ejection: Option<humantime::Duration>,
    /// Largest share of the pool's upstreams ejected at once, in percent (default 50).
    #[arg(long)]
    pub outlier_max_ejection_percent: Option<u32>,
    /// HTTP version towards the upstreams: http1, h2c (HTTP/2 without TLS), h2 (HTTP/2 over
    /// TLS, needs --tls-server-name) or auto (ALPN decides).
    #[arg(long)]
    pub protocol: Option<String>,
    /// HTTP/2 connections per upstream that requests are spread over (default 1).
    #[arg(long)]
    pub h2_connections: Option<u32>,
    /// Time without a frame from an upstream after which its HTTP/2 connection is PINGed
    /// (default 10s).
    #[arg(long)]
    pub h2_keepalive_interval: Option<humantime::Duration>,
    /// Time a PING's answer may take before the HTTP/2 connection is closed (default 5s).
    #[arg(long, requires = "h2_keepalive_interval")]
    pub h2_keepalive_timeout: Option<humantime::Duration>,
    /// Time an HTTP/2 connection to an upstream may carry no request before it is closed
    /// (default 60s).
    #[arg(long)]
    pub h2_idle_timeout: Option<humantime::Duration>,
    /// Check the upstreams with grpc.health.v1.Health/Check of this service ("" for the
    /// whole server) instead of an HTTP path.
    #[arg(long, conflicts_with = "health_path")]
    pub health_grpc_service: Option<String>,
}

fn millis(d: humantime::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl PoolArgs {
    fn to_pool(&self) -> Result<Pool> {
        let upstreams = self
            .upstreams
            .iter()
            .map(|spec| upstreams::parse_spec(spec))
            .collect::<Result<Vec<Upstream>>>()?;
        let health_check = match (
            &self.health_path,
            self.health_interval,
            &self.health_grpc_service,
        ) {
            (None, None, None) => None,
            (path, interval, grpc_service) => Some(HealthCheck {
                path: path.clone().unwrap_or_default(),
                interval_ms: interval.map_or(10_000, millis),
                timeout_ms: millis(self.health_timeout),
                grpc_service: grpc_service.clone(),
            }),
        };
        let outlier = Outlier {
            consecutive_failures: self.outlier_consecutive_failures,
            on_5xx: self.outlier_on_5xx,
            base_ejection_ms: self.outlier_base_ejection.map(millis),
            max_ejection_ms: self.outlier_max_ejection.map(millis),
            max_ejection_percent: self.outlier_max_ejection_percent,
        };
        let outlier_set = outlier.consecutive_failures.is_some()
            || outlier.on_5xx.is_some()
            || outlier.base_ejection_ms.is_some()
            || outlier.max_ejection_ms.is_some()
            || outlier.max_ejection_percent.is_some();
        Ok(Pool {
            name: self.name.clone(),
            source: None,
            balance: self.balance.clone(),
            upstreams,
            health_check,
            connect_timeout_ms: self.connect_timeout.map(millis),
            response_timeout_ms: self.response_timeout.map(millis),
            tls: self
                .tls_server_name
                .as_ref()
                .map(|server_name| UpstreamTls {
                    server_name: server_name.clone(),
                    ca_file: self.tls_ca_file.clone().unwrap_or_default(),
                    client_cert: self.tls_client_cert.clone().unwrap_or_default(),
                    client_key: self.tls_client_key.clone().unwrap_or_default(),
                }),
            idle_timeout_ms: self.idle_timeout.map(millis),
            max_connections_per_upstream: self.max_connections_per_upstream,
            body_timeout_ms: self.body_timeout.map(millis),
            connect_deadline_ms: self.connect_deadline.map(millis),
            max_attempts: self.max_attempts,
            outlier: outlier_set.then_some(outlier),
            protocol: self.protocol.clone(),
            h2_connections: self.h2_connections,
            h2_keepalive: self.h2_keepalive_interval.map(|interval| H2Keepalive {
                interval_ms: Some(millis(interval)),
                timeout_ms: self.h2_keepalive_timeout.map(millis),
            }),
            h2_idle_timeout_ms: self.h2_idle_timeout.map(millis),
        })
    }
}

fn list_table(pools: &[Pool]) -> String {
    let mut t = Table::new(&[
        "NAME",
        "BALANCE",
        "UPSTREAMS",
        "HEALTHY",
        "HEALTH CHECK",
        "SOURCE",
    ]);
    for p in pools {
        let healthy = p
            .upstreams
            .iter()
            .filter(|u| u.health.as_deref() != Some("ejected"))
            .count();
        let check = match &p.health_check {
            Some(h) if h.grpc_service.is_some() => format!("grpc every {}ms", h.interval_ms),
            Some(h) if h.path.is_empty() => format!("tcp every {}ms", h.interval_ms),
            Some(h) => format!("GET {} every {}ms", h.path, h.interval_ms),
            None => "-".to_owned(),
        };
        t.row(vec![
            p.name.clone(),
            p.balance.clone(),
            p.upstreams.len().to_string(),
            healthy.to_string(),
            check,
            p.source.clone().unwrap_or_default(),
        ]);
    }
    t.render()
}

fn count(v: Option<u32>) -> String {
    v.map_or_else(|| "default".to_owned(), |n| n.to_string())
}

/// The ejection settings on one line, e.g. `after 3 failures (5xx counts), eject 10000ms..300000ms`.
fn outlier_text(outlier: Option<&Outlier>) -> String {
    let Some(o) = outlier else {
        return "default".to_owned();
    };
    let ms = |v: Option<u64>| v.map_or_else(|| "default".to_owned(), |ms| format!("{ms}ms"));
    let five_xx = match o.on_5xx {
        Some(true) => "5xx counts",
        Some(false) => "5xx does not count",
        None => "5xx default",
    };
    let percent = o
        .max_ejection_percent
        .map_or_else(|| "default".to_owned(), |p| format!("{p}%"));
    format!(
        "after {} failures ({five_xx}), eject {}..{}, at most {percent}",
        count(o.consecutive_failures),
        ms(o.base_ejection_ms),
        ms(o.max_ejection_ms),
    )
}

/// The PING settings on one line, e.g. `PING after 10000ms without a frame, close after 5000ms`.
fn h2_keepalive_text(keepalive: Option<&H2Keepalive>) -> String {
    let Some(k) = keepalive else {
        return "default".to_owned();
    };
    let ms = |v: Option<u64>| v.map_or_else(|| "default".to_owned(), |ms| format!("{ms}ms"));
    format!(
        "PING after {} without a frame, close after {} unanswered",
        ms(k.interval_ms),
        ms(k.timeout_ms)
    )
}

fn detail(pool: &Pool) -> String {
    let ms = |v: Option<u64>| v.map_or_else(|| "default".to_owned(), |ms| format!("{ms}ms"));
    let mut text = fields(&[
        ("name", pool.name.clone()),
        ("source", pool.source.clone().unwrap_or_default()),
        ("balance", pool.balance.clone()),
        (
            "protocol",
            pool.protocol.clone().unwrap_or_else(|| "http1".to_owned()),
        ),
        ("connect timeout", ms(pool.connect_timeout_ms)),
        ("response timeout", ms(pool.response_timeout_ms)),
        (
            "upstream tls",
            pool.tls.as_ref().map_or_else(
                || "-".to_owned(),
                |t| format!("{} (roots {})", t.server_name, t.ca_file),
            ),
        ),
        ("idle timeout", ms(pool.idle_timeout_ms)),
        (
            "max connections per upstream",
            match pool.max_connections_per_upstream {
                None => "default".to_owned(),
                Some(0) => "unlimited".to_owned(),
                Some(n) => n.to_string(),
            },
        ),
        ("body timeout", ms(pool.body_timeout_ms)),
        ("connect deadline", ms(pool.connect_deadline_ms)),
        ("max attempts", count(pool.max_attempts)),
        ("outlier", outlier_text(pool.outlier.as_ref())),
        ("h2 connections", count(pool.h2_connections)),
        (
            "h2 keepalive",
            h2_keepalive_text(pool.h2_keepalive.as_ref()),
        ),
        ("h2 idle timeout", ms(pool.h2_idle_timeout_ms)),
    ]);
    text.push('\n');
    text.push_str(&upstreams::table(&pool.upstreams));
    text
}

/// Runs a `pools` command.
pub async fn run(cmd: PoolsCommand, clients: &mut Clients, out: &Output) -> Result<()> {
    match cmd {
        PoolsCommand::List => {
            let reply = clients
                .pools
                .list_pools(pb::ListPoolsRequest {})
                .await
                .reply()?;
            let pools: Vec<Pool> = reply.pools.iter().map(Pool::from_proto).collect();
            out.show(&pools, |p| list_table(p))
        }
        PoolsCommand::Get { name } => {
            let reply = clients
                .pools
                .get_pool(pb::GetPoolRequest { name })
                .await
                .reply()?;
            let pool = reply.pool.as_ref().map(Pool::from_proto);
            out.show(&pool, |p| p.as_ref().map(detail).unwrap_or_default())
        }
        PoolsCommand::Add(args) => {
            let pool = args.to_pool()?.to_proto()?;
            let reply = clients
                .pools
                .create_pool(pb::CreatePoolRequest { pool: Some(pool) })
                .await
                .reply()?;
            let pool = reply.pool.as_ref().map(Pool::from_proto);
            let value = json!({ "pool": pool, "revision": reply.revision });
            out.show(&value, |_| {
                format!("pool {:?} created (revision {})", args.name, reply.revision)
            })
        }
        PoolsCommand::Update(args) => {
            let pool = args.to_pool()?.to_proto()?;
            let reply = clients
                .pools
                .update_pool(pb::UpdatePoolRequest { pool: Some(pool) })
                .await
                .reply()?;
            let pool = reply.pool.as_ref().map(Pool::from_proto);
            let value = json!({ "pool": pool, "revision": reply.revision });
            out.show(&value, |_| {
                format!("pool {:?} updated (revision {})", args.name, reply.revision)
            })
        }
        PoolsCommand::Rm { name } => {
            let reply = clients
                .pools
                .delete_pool(pb::DeletePoolRequest { name: name.clone() })
                .await
                .reply()?;
            let value = json!({ "revision": reply.revision });
            out.show(&value, |_| {
                format!("pool {name:?} removed (revision {})", reply.revision)
            })
        }
    }
}
