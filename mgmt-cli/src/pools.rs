//! `proxyctl pools ...`: pools.

use anyhow::Result;
use clap::{Args, Subcommand};
use proxy_proto::v1 as pb;
use serde_json::json;

use crate::client::{Clients, Reply};
use crate::document::{HealthCheck, Pool, Upstream, UpstreamTls};
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
    Add(PoolArgs),
    /// Replaces a pool (every field, including its upstreams).
    Update(PoolArgs),
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
        let health_check = match (&self.health_path, self.health_interval) {
            (None, None) => None,
            (path, interval) => Some(HealthCheck {
                path: path.clone().unwrap_or_default(),
                interval_ms: interval.map_or(10_000, millis),
                timeout_ms: millis(self.health_timeout),
            }),
        };
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

fn detail(pool: &Pool) -> String {
    let ms = |v: Option<u64>| v.map_or_else(|| "default".to_owned(), |ms| format!("{ms}ms"));
    let mut text = fields(&[
        ("name", pool.name.clone()),
        ("source", pool.source.clone().unwrap_or_default()),
        ("balance", pool.balance.clone()),
        ("connect timeout", ms(pool.connect_timeout_ms)),
        ("response timeout", ms(pool.response_timeout_ms)),
        (
            "upstream tls",
            pool.tls.as_ref().map_or_else(
                || "-".to_owned(),
                |t| format!("{} (roots {})", t.server_name, t.ca_file),
            ),
        ),
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
