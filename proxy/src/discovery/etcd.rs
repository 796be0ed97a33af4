//! The `etcd` source: keys `<prefix>/<host:port>` (value optionally `{"weight": N}`),
//! read with one Get and then followed with a Watch from the revision after it.
//!
//! Any failure (etcd down, connection lost, watch cancelled or compacted) starts over with
//! a fresh Get after a growing delay; until then the pool keeps the last known set.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use super::{backoff, check_member_address, Feed};
use crate::etcd::{Client, EtcdError, Event, KeyValue};
use crate::state::Upstream;

/// How long the initial read may take before the session starts over.
const GET_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs until the task is dropped.
pub(super) async fn run(endpoints: Vec<String>, prefix: String, feed: Feed) {
    // The slash keeps `/srv/redis` from also matching `/srv/redis2/...`.
    let key_prefix = format!("{}/", prefix.trim_end_matches('/'));
    let mut attempt = 0u32;
    loop {
        let Err(e) = follow(&endpoints, &key_prefix, &feed, &mut attempt).await;
        feed.fail(format!("etcd {}: {e}", endpoints.join(",")));
        tokio::time::sleep(backoff(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// One session: connect, Get, then Watch from the revision after the Get until something
/// fails (a compacted watch included: the next session reads afresh). Resets `attempt` once
/// the initial Get succeeded.
async fn follow(
    endpoints: &[String],
    key_prefix: &str,
    feed: &Feed,
    attempt: &mut u32,
) -> Result<Infallible, SessionError> {
    let mut client = Client::connect(endpoints).await?;
    let snapshot = tokio::time::timeout(GET_TIMEOUT, client.get_prefix(key_prefix.as_bytes(), 0))
        .await
        .map_err(|_| SessionError::GetTimeout)??;
    let mut members: BTreeMap<String, Upstream> = BTreeMap::new();
    for kv in &snapshot.kvs {
        if let Some(upstream) = member(key_prefix, kv, feed) {
            members.insert(upstream.address.clone(), upstream);
        }
    }
    feed.publish(members.values().cloned().collect()).await;
    *attempt = 0;

    let mut watch = client
        .watch_prefix(key_prefix.as_bytes(), snapshot.revision + 1)
        .await?;
    loop {
        for event in watch.next().await? {
            match event {
                Event::Put(kv) => {
                    if let Some(upstream) = member(key_prefix, &kv, feed) {
                        members.insert(upstream.address.clone(), upstream);
                    }
                }
                Event::Delete(kv) => {
                    if let Ok(key) = std::str::from_utf8(&kv.key) {
                        members.remove(key.strip_prefix(key_prefix).unwrap_or(key));
                    }
                }
            }
        }
        feed.publish(members.values().cloned().collect()).await;
    }
}

/// Why one session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("no answer to Get within {GET_TIMEOUT:?}")]
    GetTimeout,
}

/// The upstream a key names, or `None` (with the reason recorded) for a malformed key or value.
fn member(key_prefix: &str, kv: &KeyValue, feed: &Feed) -> Option<Upstream> {
    let key = std::str::from_utf8(&kv.key).ok()?;
    let address = key.strip_prefix(key_prefix).unwrap_or(key);
    if let Err(reason) = check_member_address(address) {
        feed.fail(format!("etcd key {key:?} ignored: {reason}"));
        return None;
    }
    let value = std::str::from_utf8(&kv.value).unwrap_or("").trim();
    let weight = if value.is_empty() {
        1
    } else {
        match serde_json::from_str::<serde_json::Value>(value) {
            Ok(serde_json::Value::Object(map)) => match map.get("weight") {
                None => 1,
                Some(w) => match w.as_u64().and_then(|w| u32::try_from(w).ok()) {
                    Some(w) if w > 0 => w,
                    _ => {
                        feed.fail(format!(
                            "etcd key {key:?} ignored: weight must be a positive integer"
                        ));
                        return None;
                    }
                },
            },
            _ => {
                feed.fail(format!(
                    "etcd key {key:?} ignored: the value must be empty or a JSON object"
                ));
                return None;
            }
        }
    };
    Some(Upstream {
        weight,
        ..Upstream::new(address)
    })
}
