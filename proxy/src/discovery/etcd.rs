//! The `etcd` source: keys `<prefix>/<host:port>` (value optionally `{"weight": N}`),
//! read with one Get and then followed with a Watch from the revision after it.
//!
//! Any failure (etcd down, connection lost, watch cancelled or compacted) starts over with
//! a fresh Get after a growing delay; until then the pool keeps the last known set.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, KeyValue, WatchOptions};

use super::{backoff, check_member_address, Feed};
use crate::state::Upstream;

/// Runs until the task is dropped.
pub(super) async fn run(endpoints: Vec<String>, prefix: String, feed: Feed) {
    // The slash keeps `/srv/redis` from also matching `/srv/redis2/...`.
    let key_prefix = format!("{}/", prefix.trim_end_matches('/'));
    let mut attempt = 0u32;
    loop {
        match follow(&endpoints, &key_prefix, &feed, &mut attempt).await {
            Ok(()) => feed.fail("the etcd watch ended"),
            Err(e) => feed.fail(format!("etcd {}: {e}", endpoints.join(","))),
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// One session: connect, Get, then Watch until something fails. Resets `attempt` once the
/// initial Get succeeded.
async fn follow(
    endpoints: &[String],
    key_prefix: &str,
    feed: &Feed,
    attempt: &mut u32,
) -> Result<(), etcd_client::Error> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
    let mut client = Client::connect(endpoints, Some(options)).await?;
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client.get(key_prefix, Some(GetOptions::new().with_prefix())),
    )
    .await
    .map_err(|_| etcd_client::Error::WatchError("no answer to Get within 10s".into()))??;
    let revision = response.header().map_or(0, |h| h.revision());
    let mut members: BTreeMap<String, Upstream> = BTreeMap::new();
    for kv in response.kvs() {
        if let Some(upstream) = member(key_prefix, kv, feed) {
            members.insert(upstream.address.clone(), upstream);
        }
    }
    feed.publish(members.values().cloned().collect()).await;
    *attempt = 0;

    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = client.watch(key_prefix, Some(options)).await?;
    while let Some(response) = stream.message().await? {
        if response.canceled() {
            let reason = if response.compact_revision() > 0 {
                format!(
                    "watch compacted at revision {}",
                    response.compact_revision()
                )
            } else {
                format!("watch cancelled: {}", response.cancel_reason())
            };
            return Err(etcd_client::Error::WatchError(reason));
        }
        if response.events().is_empty() {
            continue;
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => {
                    if let Some(upstream) = member(key_prefix, kv, feed) {
                        members.insert(upstream.address.clone(), upstream);
                    }
                }
                EventType::Delete => {
                    if let Ok(key) = kv.key_str() {
                        members.remove(key.strip_prefix(key_prefix).unwrap_or(key));
                    }
                }
            }
        }
        feed.publish(members.values().cloned().collect()).await;
    }
    Ok(())
}

/// The upstream a key names, or `None` (with the reason recorded) for a malformed key or value.
fn member(key_prefix: &str, kv: &KeyValue, feed: &Feed) -> Option<Upstream> {
    let key = kv.key_str().ok()?;
    let address = key.strip_prefix(key_prefix).unwrap_or(key);
    if let Err(reason) = check_member_address(address) {
        feed.fail(format!("etcd key {key:?} ignored: {reason}"));
        return None;
    }
    let value = kv.value_str().unwrap_or("").trim();
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
