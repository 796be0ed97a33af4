//! Membership: each node keeps a key `P/nodes/<name>` attached to a lease, rewritten every
//! few seconds with its version, the etcd revision it has applied and the time. A node
//! that stops (or loses etcd) disappears when its lease runs out.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{unix_now, Inner};
use crate::etcd::{Client, EtcdError};
use crate::shutdown::Shutdown;

/// Time to live of a node's lease.
const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often the key is rewritten and the lease renewed.
const HEARTBEAT: Duration = Duration::from_secs(3);

/// What a node's key holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeKey {
    name: String,
    version: String,
    applied_revision: i64,
    /// Unix seconds of the write.
    heartbeat: u64,
}

/// One node of the fleet, as its key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Its `cluster.node_name`.
    pub name: String,
    /// Its proxyd version.
    pub version: String,
    /// The etcd revision it has applied.
    pub applied_revision: i64,
    /// etcd's revision minus `applied_revision` when the list was read.
    pub lag: i64,
    /// How long ago it last wrote its key.
    pub heartbeat_age: Duration,
    /// Whether it is the node answering.
    pub this_node: bool,
}

/// Keeps this node's key until shutdown, reconnecting after failures.
pub(super) async fn run(inner: std::sync::Arc<Inner>, shutdown: Shutdown) {
    loop {
        match keep(&inner, &shutdown).await {
            Ok(()) => return,
            Err(e) => tracing::debug!(error = %e, "fleet membership key: etcd failed, retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = shutdown.triggered() => return,
        }
    }
}

async fn keep(inner: &Inner, shutdown: &Shutdown) -> Result<(), EtcdError> {
    let mut client = Client::connect_with(&inner.endpoints, inner.tls.as_ref()).await?;
    let lease = client.grant_lease(LEASE_TTL).await?;
    let mut alive = client.keep_alive(lease).await?;
    let key = inner.keys.node(&inner.node_name);
    loop {
        let value = NodeKey {
            name: inner.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            applied_revision: inner.view.borrow().revision,
            heartbeat: unix_now(),
        };
        // Serialising a plain struct of strings and integers cannot fail.
        let value = serde_json::to_vec(&value).unwrap_or_default();
        let revision = client.put(&key, &value, lease).await?;
        inner.saw_revision(revision);
        alive.refresh().await?;
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = shutdown.triggered() => {
                // Leave the fleet's list now rather than when the lease runs out.
                let _ = tokio::time::timeout(Duration::from_secs(1), client.revoke_lease(lease)).await;
                return Ok(());
            }
        }
    }
}

/// Every node with a live key, by name, and etcd's revision when they were read.
pub(super) async fn list(
    inner: &Inner,
    client: &mut Client,
) -> Result<(i64, Vec<NodeStatus>), EtcdError> {
    let read = client.get_prefix(&inner.keys.nodes(), 0).await?;
    inner.saw_revision(read.revision);
    let now = unix_now();
    let nodes = read
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<NodeKey>(&kv.value).ok())
        .map(|n| NodeStatus {
            this_node: n.name == inner.node_name,
            lag: read.revision.saturating_sub(n.applied_revision).max(0),
            heartbeat_age: Duration::from_secs(now.saturating_sub(n.heartbeat)),
            name: n.name,
            version: n.version,
            applied_revision: n.applied_revision,
        })
        .collect();
    Ok((read.revision, nodes))
}
