//! `proxyctl cluster status`: the nodes of the fleet (fleet mode, `[cluster]`).

use anyhow::Result;
use clap::Subcommand;
use proxy_proto::v1 as pb;
use serde::Serialize;

use crate::client::{Clients, Reply};
use crate::output::{Output, Table};

/// Fleet commands.
#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Every node of the fleet: version, applied etcd revision, lag and last heartbeat.
    Status,
}

#[derive(Serialize)]
struct Node {
    name: String,
    version: String,
    applied_revision: i64,
    lag: i64,
    heartbeat_age_seconds: u64,
    this_node: bool,
}

#[derive(Serialize)]
struct Fleet {
    etcd_revision: i64,
    nodes: Vec<Node>,
}

/// Runs a `cluster` command.
pub async fn run(cmd: ClusterCommand, clients: &mut Clients, out: &Output) -> Result<()> {
    match cmd {
        ClusterCommand::Status => {
            let reply = clients
                .cluster
                .cluster_status(pb::ClusterStatusRequest {})
                .await
                .reply()?;
            let fleet = Fleet {
                etcd_revision: reply.etcd_revision,
                nodes: reply
                    .nodes
                    .into_iter()
                    .map(|n| Node {
                        name: n.name,
                        version: n.version,
                        applied_revision: n.applied_revision,
                        lag: n.lag,
                        heartbeat_age_seconds: n.heartbeat_age_seconds,
                        this_node: n.self_,
                    })
                    .collect(),
            };
            out.show(&fleet, |fleet| {
                let mut t = Table::new(&["NODE", "VERSION", "APPLIED", "LAG", "HEARTBEAT"]);
                for n in &fleet.nodes {
                    let name = if n.this_node {
                        format!("{} (this node)", n.name)
                    } else {
                        n.name.clone()
                    };
                    t.row(vec![
                        name,
                        n.version.clone(),
                        n.applied_revision.to_string(),
                        n.lag.to_string(),
                        format!("{}s ago", n.heartbeat_age_seconds),
                    ]);
                }
                format!("etcd revision {}\n{}", fleet.etcd_revision, t.render())
            })
        }
    }
}
