//! Membership: each node keeps a key `P/nodes/<name>` attached to a lease, rewritten every
//! few seconds with its version, the etcd revision it has applied and the time. A node
//! that stops (or loses etcd) disappears when its lease runs out.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

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
    /// How many fleet writes it has applied (the write marker's version; absent from
    /// nodes of older versions).
    #[serde(default)]
    applied_writes: Option<i64>,
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
    /// How many fleet writes (API writes of objects, on any node) the node has not applied
    /// yet when the list was read; node heartbeats do not count. For a node of an older
    /// version that does not report its writes: etcd's revision minus `applied_revision`.
    pub lag: i64,
    /// How long ago it last wrote its key.
    pub heartbeat_age: Duration,
    /// Whether it is the node answering.
    pub this_node: bool,
}

/// Keeps this node's key until shutdown, reconnecting after failures; stands still while
/// an upgrade hands over (the successor keeps the same lease and key).
pub(super) async fn run(inner: std::sync::Arc<Inner>, shutdown: Shutdown) {
    let mut pause = inner.pause.subscribe();
    loop {
        if *pause.borrow_and_update() {
            tokio::select! {
                resumed = super::until_resumed(&mut pause) => if !resumed { return },
                _ = shutdown.triggered() => return,
            }
        }
        match keep(&inner, &shutdown, &mut pause).await {
            Ok(Ended::Shutdown) => return,
            Ok(Ended::Paused) => continue,
            Err(e) => tracing::debug!(error = %e, "fleet membership key: etcd failed, retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = shutdown.triggered() => return,
        }
    }
}

enum Ended {
    Shutdown,
    Paused,
}

/// Renews this node's lease (granting one when there is none, or it expired) and
/// rewrites the key every heartbeat.
async fn keep(
    inner: &Inner,
    shutdown: &Shutdown,
    pause: &mut watch::Receiver<bool>,
) -> Result<Ended, EtcdError> {
    let mut client = Client::connect_with(&inner.endpoints, inner.tls.as_ref()).await?;
    // The lease of an earlier connection, or of the process this one took over from:
    // reusing it keeps the key in place instead of adding a second lease.
    let held = inner.lease.load(Ordering::Relaxed);
    let renewed = match held {
        0 => None,
        id => match client.keep_alive(id).await {
            Ok(alive) => Some((id, alive)),
            Err(EtcdError::LeaseExpired(_)) => None,
            Err(e) => return Err(e),
        },
    };
    let (lease, mut alive) = match renewed {
        Some(held) => held,
        None => {
            let id = client.grant_lease(LEASE_TTL).await?;
            (id, client.keep_alive(id).await?)
        }
    };
    inner.lease.store(lease, Ordering::Relaxed);
    let key = inner.keys.node(&inner.node_name);
    loop {
        // The newest fleet write etcd has, so this node's own lag is known even while
        // its watch is behind.
        if let Some(marker) = client.get(&inner.keys.marker()).await? {
            inner.saw_write(marker.mod_revision, marker.version);
        }
        let (applied_revision, applied_writes) = {
            let view = inner.view.borrow();
            (view.revision, view.writes)
        };
        let value = NodeKey {
            name: inner.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            applied_revision,
            applied_writes: Some(applied_writes),
            heartbeat: unix_now(),
        };
        // Serialising a plain struct of strings and integers cannot fail.
        let value = serde_json::to_vec(&value).unwrap_or_default();
        let revision = client.put(&key, &value, lease).await?;
        inner.saw_revision(revision);
        alive.refresh().await?;
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            // Neither revoked nor renewed from here: the successor renews it.
            _ = super::until_paused(pause) => return Ok(Ended::Paused),
            _ = shutdown.triggered() => {
                // Leave the fleet's list now rather than when the lease runs out (unless
                // a successor took the lease over).
                if !shutdown.is_handed_over() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), client.revoke_lease(lease)).await;
                }
                return Ok(Ended::Shutdown);
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
    // Read after the nodes' keys: a write between the two reads can only make a lag
    // look larger, never hide one.
    let marker = client.get(&inner.keys.marker()).await?;
    let (marker_revision, writes) = marker.map_or((0, 0), |kv| (kv.mod_revision, kv.version));
    let now = unix_now();
    let nodes = read
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<NodeKey>(&kv.value).ok())
        .map(|n| NodeStatus {
            this_node: n.name == inner.node_name,
            lag: match n.applied_writes {
                _ if n.applied_revision >= marker_revision => 0,
                Some(applied) => writes.saturating_sub(applied).max(1),
                None => read.revision.saturating_sub(n.applied_revision).max(0),
            },
            heartbeat_age: Duration::from_secs(now.saturating_sub(n.heartbeat)),
            name: n.name,
            version: n.version,
            applied_revision: n.applied_revision,
        })
        .collect();
    Ok((read.revision, nodes))
}
