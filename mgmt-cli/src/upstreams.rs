//! `proxyctl upstreams ...`: the upstreams of one pool.

use anyhow::{Context, Result};
use clap::Subcommand;
use proxy_proto::v1 as pb;
use serde_json::json;

use crate::client::{Clients, Reply};
use crate::document::{Pool, Upstream};
use crate::output::{Output, Table};

/// Upstream commands.
#[derive(Subcommand)]
pub enum UpstreamsCommand {
    /// Lists a pool's upstreams with their state and health.
    #[command(alias = "ls")]
    List {
        /// Pool name.
        pool: String,
    },
    /// Adds an upstream to a pool.
    Add {
        /// Pool name.
        pool: String,
        /// Upstream `host:port`.
        address: String,
        /// Relative share for balancing.
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Removes an upstream from a pool.
    #[command(alias = "delete")]
    Rm {
        /// Pool name.
        pool: String,
        /// Upstream `host:port`.
        address: String,
    },
    /// Sends no new work to an upstream; in-flight work finishes.
    Drain {
        /// Pool name.
        pool: String,
        /// Upstream `host:port`.
        address: String,
    },
    /// Puts a drained upstream back into rotation.
    Activate {
        /// Pool name.
        pool: String,
        /// Upstream `host:port`.
        address: String,
    },
}

/// Parses `host:port` or `host:port=WEIGHT`.
pub fn parse_spec(spec: &str) -> Result<Upstream> {
    let (address, weight) = match spec.rsplit_once('=') {
        Some((address, weight)) => (
            address,
            weight
                .parse()
                .with_context(|| format!("upstream {spec:?}: weight is not a number"))?,
        ),
        None => (spec, 1),
    };
    Ok(Upstream {
        address: address.to_owned(),
        weight,
        state: None,
        health: None,
    })
}

/// The upstreams as a table.
pub fn table(upstreams: &[Upstream]) -> String {
    let mut t = Table::new(&["ADDRESS", "WEIGHT", "STATE", "HEALTH"]);
    for u in upstreams {
        t.row(vec![
            u.address.clone(),
            u.weight.to_string(),
            u.state.clone().unwrap_or_default(),
            u.health.clone().unwrap_or_default(),
        ]);
    }
    t.render()
}

/// Runs an `upstreams` command.
pub async fn run(cmd: UpstreamsCommand, clients: &mut Clients, out: &Output) -> Result<()> {
    let (revision, message) = match cmd {
        UpstreamsCommand::List { pool } => {
            let reply = clients
                .pools
                .get_pool(pb::GetPoolRequest { name: pool })
                .await
                .reply()?;
            let upstreams = reply
                .pool
                .as_ref()
                .map(|p| Pool::from_proto(p).upstreams)
                .unwrap_or_default();
            return out.show(&upstreams, |u| table(u));
        }
        UpstreamsCommand::Add {
            pool,
            address,
            weight,
        } => {
            let reply = clients
                .pools
                .add_upstream(pb::AddUpstreamRequest {
                    pool: pool.clone(),
                    upstream: Some(pb::Upstream {
                        address: address.clone(),
                        weight,
                        ..Default::default()
                    }),
                })
                .await
                .reply()?;
            (
                reply.revision,
                format!("upstream {address} added to pool {pool:?}"),
            )
        }
        UpstreamsCommand::Rm { pool, address } => {
            let reply = clients
                .pools
                .remove_upstream(pb::RemoveUpstreamRequest {
                    pool: pool.clone(),
                    address: address.clone(),
                })
                .await
                .reply()?;
            (
                reply.revision,
                format!("upstream {address} removed from pool {pool:?}"),
            )
        }
        UpstreamsCommand::Drain { pool, address } => {
            let reply = clients
                .pools
                .drain_upstream(pb::DrainUpstreamRequest {
                    pool: pool.clone(),
                    address: address.clone(),
                })
                .await
                .reply()?;
            (
                reply.revision,
                format!("upstream {address} of pool {pool:?} draining"),
            )
        }
        UpstreamsCommand::Activate { pool, address } => {
            let reply = clients
                .pools
                .activate_upstream(pb::ActivateUpstreamRequest {
                    pool: pool.clone(),
                    address: address.clone(),
                })
                .await
                .reply()?;
            (
                reply.revision,
                format!("upstream {address} of pool {pool:?} active"),
            )
        }
    };
    out.show(&json!({ "revision": revision }), |_| {
        format!("{message} (revision {revision})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_takes_an_optional_weight() {
        let u = parse_spec("10.0.0.1:80=3").expect("valid");
        assert_eq!((u.address.as_str(), u.weight), ("10.0.0.1:80", 3));
        let u = parse_spec("[::1]:80").expect("valid");
        assert_eq!((u.address.as_str(), u.weight), ("[::1]:80", 1));
        assert!(parse_spec("a:1=x").is_err());
    }
}
