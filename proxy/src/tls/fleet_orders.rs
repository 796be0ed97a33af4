//! ACME orders in a fleet: one node orders a name at a time, and every node answers its
//! HTTP-01 challenges.
//!
//! Keys under the cluster prefix `P`:
//! - `P/acme/locks/<name>`: the order lock of a name, holding the orderer's node name. It is
//!   created only if absent (a transaction on `create_revision == 0`) and attached to a
//!   lease of the ordering node that lives as long as the order: the lock goes when the
//!   order ends (the lease is revoked) or when the node dies (the lease runs out).
//! - `P/acme/tokens/<token>`: the key authorization of a pending HTTP-01 challenge, on the
//!   same lease, deleted once the CA has validated it.
//! - `P/acme/alpn/<name>`: the key authorization digest (hex) of a pending TLS-ALPN-01
//!   challenge, on the same lease; any node builds the validation certificate from it.
//!
//! Every node follows `P/acme/` with a watch, so a validation request reaching any node is
//! answered from memory; an answer not seen yet (the watch is a few milliseconds behind the
//! orderer) is read from etcd, but only while some order is in progress, so requests for
//! made-up tokens cost no etcd reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::Cluster;
use crate::etcd::{self, EtcdError, Event, TxnOutcome};
use crate::shutdown::Shutdown;

/// Time to live of an order lock's lease: how long a dead orderer blocks the name.
const LOCK_TTL: Duration = Duration::from_secs(10);
/// How often a held lock's lease is renewed.
const LOCK_REFRESH: Duration = Duration::from_secs(3);
// A holder gives up on its lock within two refresh periods (see `keep`), which must end
// before its lease can run out.
const _: () = assert!(2 * LOCK_REFRESH.as_secs() < LOCK_TTL.as_secs());
/// How long a validation request waits for etcd when the token is not known yet.
const TOKEN_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between two attempts to follow `P/acme/`.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What this node has seen of the fleet's orders.
#[derive(Debug, Default)]
struct Seen {
    /// name -> the node holding its order lock.
    locks: HashMap<String, String>,
    /// `tokens/<token>` -> key authorization, `alpn/<name>` -> digest (hex).
    answers: HashMap<String, String>,
    /// Whether the watch is running (when not, `locks` may be stale).
    following: bool,
}

/// The fleet's order locks and challenge tokens, as this node takes and sees them.
pub struct FleetOrders {
    cluster: Cluster,
    node: String,
    seen: Mutex<Seen>,
    /// Changes whenever `seen` does, for waiters.
    changed: watch::Sender<u64>,
    client: Mutex<Option<etcd::Client>>,
}

impl std::fmt::Debug for FleetOrders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetOrders")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The outcome of trying to take a name's order lock.
#[derive(Debug)]
pub enum Lock {
    /// This node holds it: it orders.
    Held(Box<OrderLock>),
    /// Another node holds it (its name, when it could be read).
    Busy(String),
}

impl FleetOrders {
    /// Starts following the fleet's orders under `cluster`'s prefix until shutdown.
    pub fn start(cluster: Cluster, shutdown: Shutdown) -> Arc<FleetOrders> {
        let fleet = Arc::new(FleetOrders {
            node: cluster.node_name().to_string(),
            cluster,
            seen: Mutex::new(Seen::default()),
            changed: watch::channel(0).0,
            client: Mutex::new(None),
        });
        tokio::spawn(follow(fleet.clone(), shutdown));
        fleet
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The cluster this node belongs to.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn acme_prefix(&self) -> Vec<u8> {
        format!("{}/acme/", self.cluster.prefix()).into_bytes()
    }

    fn lock_key(&self, name: &str) -> Vec<u8> {
        format!("{}/acme/locks/{name}", self.cluster.prefix()).into_bytes()
    }

    /// The key of a challenge answer: `tokens/<token>` or `alpn/<name>`.
    fn answer_key(&self, answer: &str) -> Vec<u8> {
        format!("{}/acme/{answer}", self.cluster.prefix()).into_bytes()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared connection, made on first use and dropped after a failure.
    async fn client(&self) -> Result<etcd::Client, EtcdError> {
        let cached = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(c) = cached {
            return Ok(c);
        }
        let c = self.cluster.connect().await?;
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    fn forget_client(&self) {
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Tries once to take the order lock of `name` on a new lease of this node.
    pub async fn try_lock(&self, name: &str) -> Result<Lock, EtcdError> {
        let result = self.try_lock_once(name).await;
        if result.is_err() {
            self.forget_client();
        }
        result
    }

    async fn try_lock_once(&self, name: &str) -> Result<Lock, EtcdError> {
        let mut client = self.client().await?;
        let key = self.lock_key(name);
        // Cheap first: no lease is granted while another node visibly holds the lock.
        if let Some(kv) = client.get(&key).await? {
            return Ok(Lock::Busy(String::from_utf8_lossy(&kv.value).into_owned()));
        }
        let lease = client.grant_lease(LOCK_TTL).await?;
        let outcome = client
            .put_if_absent(&key, self.node.as_bytes(), lease)
            .await;
        let revision = match outcome {
            Ok(TxnOutcome::Committed(revision)) => revision,
            Ok(TxnOutcome::Conflict(_)) => {
                let _ = client.revoke_lease(lease).await;
                let holder = client
                    .get(&key)
                    .await
                    .ok()
                    .flatten()
                    .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                    .unwrap_or_default();
                return Ok(Lock::Busy(holder));
            }
            Err(e) => {
                // The lease runs out by itself if etcd cannot be told.
                let _ = client.revoke_lease(lease).await;
                return Err(e);
            }
        };
        let alive = match client.keep_alive(lease).await {
            Ok(alive) => alive,
            Err(e) => {
                let _ = client.revoke_lease(lease).await;
                return Err(e);
            }
        };
        let (lost_tx, lost) = watch::channel(false);
        let keeper = tokio::spawn(keep(alive, lost_tx, name.to_string()));
        tracing::info!(domain = %name, revision, "took the fleet's order lock");
        Ok(Lock::Held(Box::new(OrderLock {
            name: name.to_string(),
            lease,
            client,
            revision,
            lost,
            keeper,
            released: false,
            answer_prefix: String::from_utf8_lossy(&self.answer_key("")).into_owned(),
        })))
    }

    /// The node holding `name`'s order lock, as the watch last saw it.
    pub fn holder(&self, name: &str) -> Option<String> {
        self.seen().locks.get(name).cloned()
    }

    /// Whether the watch of the fleet's orders is running (if not, [`holder`](Self::holder)
    /// may be stale).
    pub fn following(&self) -> bool {
        self.seen().following
    }

    /// Resolves when the watched locks or tokens change (or after `at_most`).
    pub async fn changed(&self, at_most: Duration) {
        let mut rx = self.changed.subscribe();
        let _ = tokio::time::timeout(at_most, rx.changed()).await;
    }

    /// The key authorization of an HTTP-01 token some node of the fleet published.
    pub async fn http01(&self, token: &str) -> Option<String> {
        if token.is_empty() || token.contains('/') {
            return None;
        }
        self.answer(&format!("tokens/{token}")).await
    }

    /// The key authorization digest of a TLS-ALPN-01 challenge for `name` some node of the
    /// fleet published.
    pub async fn tls_alpn01(&self, name: &str) -> Option<Vec<u8>> {
        if name.is_empty() || name.contains('/') {
            return None;
        }
        let hex = self.answer(&format!("alpn/{name}")).await?;
        decode_hex(&hex)
    }

    async fn answer(&self, answer: &str) -> Option<String> {
        // Only while an order is known to run: a flood of made-up tokens, or of any tokens
        // while etcd is unreachable, costs no etcd round trips.
        let (known, busy) = {
            let seen = self.seen();
            (seen.answers.get(answer).cloned(), !seen.locks.is_empty())
        };
        if known.is_some() || !busy {
            return known;
        }
        // An order runs somewhere and its answer may be newer than the watch.
        let key = self.answer_key(answer);
        let read = async {
            let mut client = self.client().await?;
            client.get(&key).await
        };
        match tokio::time::timeout(TOKEN_READ_TIMEOUT, read).await {
            Ok(Ok(kv)) => kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
            Ok(Err(e)) => {
                self.forget_client();
                tracing::debug!(error = %e, "reading an HTTP-01 token from etcd failed");
                None
            }
            Err(_) => None,
        }
    }

    /// Applies watched changes under `P/acme/`.
    fn absorb(&self, events: Vec<Event>) {
        let locks = format!("{}/acme/locks/", self.cluster.prefix());
        let acme = format!("{}/acme/", self.cluster.prefix());
        // Other keys under `P/acme/` (the fleet's order log) are not challenge answers.
        let is_answer = |a: &str| a.starts_with("tokens/") || a.starts_with("alpn/");
        let mut seen = self.seen();
        for event in events {
            let (kv, put) = match event {
                Event::Put(kv) => (kv, true),
                Event::Delete(kv) => (kv, false),
            };
            let key = String::from_utf8_lossy(&kv.key);
            let value = || String::from_utf8_lossy(&kv.value).into_owned();
            if let Some(name) = key.strip_prefix(&locks) {
                if put {
                    seen.locks.insert(name.to_string(), value());
                } else {
                    seen.locks.remove(name);
                }
            } else if let Some(answer) = key.strip_prefix(&acme).filter(|a| is_answer(a)) {
                if put {
                    seen.answers.insert(answer.to_string(), value());
                } else {
                    seen.answers.remove(answer);
                }
            }
        }
        drop(seen);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Renews a held lock's lease until the lock is dropped; says so if it could not.
///
/// Each renewal gets at most [`LOCK_REFRESH`]: a call that hangs (etcd unreachable
/// without a reset) would otherwise be noticed only by the transport's keep-alive,
/// later than the lease runs out, and another node could take the lock while this one
/// still orders. So the holder gives up at most `2 * LOCK_REFRESH` after its last
/// renewal, well inside [`LOCK_TTL`].
async fn keep(mut alive: etcd::KeepAlive, lost: watch::Sender<bool>, name: String) {
    loop {
        tokio::time::sleep(LOCK_REFRESH).await;
        let failure = match tokio::time::timeout(LOCK_REFRESH, alive.refresh()).await {
            Ok(Ok(_ttl)) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {LOCK_REFRESH:?}"),
        };
        tracing::warn!(domain = %name, error = %failure, "lost the fleet's order lock: its lease could not be renewed");
        let _ = lost.send(true);
        return;
    }
}

/// Follows `P/acme/` until shutdown: a full read, then a watch from there; again after a
/// failure.
async fn follow(fleet: Arc<FleetOrders>, shutdown: Shutdown) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let ended = tokio::select! {
            ended = follow_once(&fleet) => match ended {
                Err(e) => e,
                Ok(never) => match never {},
            },
            _ = shutdown.triggered() => return,
        };
        fleet.seen().following = false;
        fleet.changed.send_modify(|n| *n = n.wrapping_add(1));
        tracing::debug!(error = %ended, "following the fleet's ACME orders failed; again shortly");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.triggered() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn follow_once(fleet: &FleetOrders) -> Result<std::convert::Infallible, EtcdError> {
    let mut client = fleet.cluster.connect().await?;
    let prefix = fleet.acme_prefix();
    let read = client.get_prefix(&prefix, 0).await?;
    let mut watch = client.watch_prefix(&prefix, read.revision + 1).await?;
    {
        let mut seen = fleet.seen();
        seen.locks.clear();
        seen.answers.clear();
        seen.following = true;
    }
    fleet.absorb(read.kvs.into_iter().map(Event::Put).collect());
    loop {
        let events = watch.next().await?;
        fleet.absorb(events);
    }
}

/// A held order lock. Dropping it releases it in the background; [`release`](Self::release)
/// does it now.
pub struct OrderLock {
    name: String,
    lease: i64,
    client: etcd::Client,
    revision: i64,
    lost: watch::Receiver<bool>,
    keeper: JoinHandle<()>,
    released: bool,
    answer_prefix: String,
}

impl std::fmt::Debug for OrderLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderLock")
            .field("name", &self.name)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl OrderLock {
    /// The etcd revision at which the lock was taken: everything the fleet stored before
    /// (a certificate the previous holder issued) is applied here once this node reached it.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Publishes an HTTP-01 answer for the whole fleet, for as long as the lock is held.
    pub async fn publish_token(
        &mut self,
        token: &str,
        key_authorization: &str,
    ) -> Result<(), EtcdError> {
        let key = format!("{}tokens/{token}", self.answer_prefix).into_bytes();
        self.client
            .put(&key, key_authorization.as_bytes(), self.lease)
            .await
            .map(|_| ())
    }

    /// Withdraws a published HTTP-01 answer (the CA has validated it).
    pub async fn withdraw_token(&mut self, token: &str) -> Result<(), EtcdError> {
        let key = format!("{}tokens/{token}", self.answer_prefix).into_bytes();
        self.client.delete(&key).await.map(|_| ())
    }

    /// Publishes the TLS-ALPN-01 digest of the locked name for the whole fleet.
    pub async fn publish_alpn(&mut self, digest: &[u8]) -> Result<(), EtcdError> {
        let key = format!("{}alpn/{}", self.answer_prefix, self.name).into_bytes();
        self.client
            .put(&key, encode_hex(digest).as_bytes(), self.lease)
            .await
            .map(|_| ())
    }

    /// Withdraws the published TLS-ALPN-01 digest of the locked name.
    pub async fn withdraw_alpn(&mut self) -> Result<(), EtcdError> {
        let key = format!("{}alpn/{}", self.answer_prefix, self.name).into_bytes();
        self.client.delete(&key).await.map(|_| ())
    }

    /// Resolves if the lock's lease could not be renewed: another node may take the lock.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut lost = self.lost.clone();
        async move {
            if lost.wait_for(|l| *l).await.is_err() {
                // The keeper is gone only once the lock is being released.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Releases the lock (and every token on its lease) now.
    pub async fn release(mut self) {
        self.released = true;
        self.keeper.abort();
        if let Err(e) = self.client.revoke_lease(self.lease).await {
            tracing::warn!(domain = %self.name, error = %e, "releasing the fleet's order lock failed; it goes when its lease runs out");
        }
    }
}

impl Drop for OrderLock {
    fn drop(&mut self) {
        self.keeper.abort();
        if self.released {
            return;
        }
        let (mut client, lease) = (self.client.clone(), self.lease);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = client.revoke_lease(lease).await;
            });
        }
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_round_trip_through_hex_and_bad_hex_is_refused() {
        let digest: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_hex(&encode_hex(&digest)), Some(digest));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex(""), Some(Vec::new()));
    }
}
