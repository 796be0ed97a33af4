//! A small client for etcd's v3 API over the generated tonic code in `proxy_proto::etcd`:
//! prefix reads at a revision, watches from a revision that report compaction, puts and
//! deletes, and leases. Built on checked-in generated code, so building needs no `protoc`.
//!
//! A [`Client`] is one connection to the first endpoint that answers; callers that must
//! survive an etcd outage (discovery) connect again with backoff when a call fails.

use std::time::Duration;

use proxy_proto::etcd::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient, watch_request,
    DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use proxy_proto::etcd::mvccpb::event::EventType;
/// A stored key-value as etcd returns it (key, value, revisions, lease).
pub use proxy_proto::etcd::mvccpb::KeyValue;
use thiserror::Error;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// How long connecting to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on an idle connection notice a vanished etcd (or network) within seconds.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// What an etcd call can fail with.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// No endpoint was given.
    #[error("no etcd endpoint given")]
    NoEndpoint,
    /// An endpoint is not a usable URL.
    #[error("invalid etcd endpoint {endpoint:?}: {source}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why it cannot be used.
        source: tonic::transport::Error,
    },
    /// No endpoint accepted a connection; the last failure is kept.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The last endpoint tried.
        endpoint: String,
        /// Why it failed.
        source: tonic::transport::Error,
    },
    /// etcd answered a call with an error status (or the connection broke during it).
    #[error("etcd answered {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The watch start revision was compacted away: read again and watch from the new revision.
    #[error("watch compacted: revisions before {compact_revision} are gone")]
    Compacted {
        /// The oldest revision etcd still has.
        compact_revision: i64,
    },
    /// etcd cancelled the watch for another reason.
    #[error("watch cancelled by etcd: {reason}")]
    WatchCancelled {
        /// etcd's reason, possibly empty.
        reason: String,
    },
    /// The watch stream ended without a cancellation.
    #[error("the etcd watch stream ended")]
    WatchEnded,
}

/// A connection to one etcd member.
#[derive(Clone)]
pub struct Client {
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    lease: LeaseClient<Channel>,
}

/// The keys under a prefix as of one revision.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The store revision the read saw; watch from `revision + 1` to miss nothing.
    pub revision: i64,
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The key was created or updated; the new key-value.
    Put(KeyValue),
    /// The key was deleted; its key (and the deletion revision as `mod_revision`).
    Delete(KeyValue),
}

/// A watch on a key range; see [`Client::watch_prefix`].
pub struct Watch {
    responses: tonic::Streaming<WatchResponse>,
    /// Kept open: closing the request stream would end the watch.
    _requests: mpsc::Sender<WatchRequest>,
}

impl Client {
    /// Connects to the first of `endpoints` (`http://host:port`) that accepts.
    pub async fn connect(endpoints: &[String]) -> Result<Client, EtcdError> {
        let mut last = None;
        for endpoint in endpoints {
            let target = Endpoint::from_shared(endpoint.clone())
                .map_err(|source| EtcdError::Endpoint {
                    endpoint: endpoint.clone(),
                    source,
                })?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
                .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
                .keep_alive_while_idle(true);
            match target.connect().await {
                Ok(channel) => {
                    return Ok(Client {
                        kv: KvClient::new(channel.clone()),
                        watch: WatchClient::new(channel.clone()),
                        lease: LeaseClient::new(channel),
                    })
                }
                Err(source) => {
                    last = Some(EtcdError::Connect {
                        endpoint: endpoint.clone(),
                        source,
                    })
                }
            }
        }
        Err(last.unwrap_or(EtcdError::NoEndpoint))
    }

    /// Every key starting with `prefix`, as of `revision` (0: the newest).
    pub async fn get_prefix(
        &mut self,
        prefix: &[u8],
        revision: i64,
    ) -> Result<Snapshot, EtcdError> {
        let response = self
            .kv
            .range(RangeRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                revision,
                ..RangeRequest::default()
            })
            .await?
            .into_inner();
        Ok(Snapshot {
            revision: response.header.map_or(0, |h| h.revision),
            kvs: response.kvs,
        })
    }

    /// The value of one key, if present.
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let response = self
            .kv
            .range(RangeRequest {
                key: key.to_vec(),
                ..RangeRequest::default()
            })
            .await?
            .into_inner();
        Ok(response.kvs.into_iter().next())
    }

    /// Writes `key = value`, attached to `lease` when not 0; returns the new store revision.
    pub async fn put(&mut self, key: &[u8], value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let response = self
            .kv
            .put(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                lease,
                ..PutRequest::default()
            })
            .await?
            .into_inner();
        Ok(response.header.map_or(0, |h| h.revision))
    }

    /// Deletes one key; returns how many keys were deleted (0 or 1).
    pub async fn delete(&mut self, key: &[u8]) -> Result<i64, EtcdError> {
        self.delete_range(key.to_vec(), Vec::new()).await
    }

    /// Deletes every key starting with `prefix`; returns how many were deleted.
    pub async fn delete_prefix(&mut self, prefix: &[u8]) -> Result<i64, EtcdError> {
        self.delete_range(prefix.to_vec(), prefix_end(prefix)).await
    }

    async fn delete_range(&mut self, key: Vec<u8>, range_end: Vec<u8>) -> Result<i64, EtcdError> {
        let response = self
            .kv
            .delete_range(DeleteRangeRequest {
                key,
                range_end,
                ..DeleteRangeRequest::default()
            })
            .await?
            .into_inner();
        Ok(response.deleted)
    }

    /// Compacts the history up to `revision`: watches from older revisions then fail with
    /// [`EtcdError::Compacted`].
    pub async fn compact(&mut self, revision: i64) -> Result<(), EtcdError> {
        self.kv
            .compact(proxy_proto::etcd::etcdserverpb::CompactionRequest {
                revision,
                physical: true,
            })
            .await?;
        Ok(())
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub async fn grant_lease(&mut self, ttl: Duration) -> Result<i64, EtcdError> {
        let response = self
            .lease
            .lease_grant(LeaseGrantRequest {
                ttl: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                id: 0,
            })
            .await?
            .into_inner();
        if response.error.is_empty() {
            Ok(response.id)
        } else {
            Err(EtcdError::Status(tonic::Status::unknown(response.error)))
        }
    }

    /// Revokes a lease: every key attached to it is deleted.
    pub async fn revoke_lease(&mut self, id: i64) -> Result<(), EtcdError> {
        self.lease.lease_revoke(LeaseRevokeRequest { id }).await?;
        Ok(())
    }

    /// Watches every key starting with `prefix`, from `start_revision` on (inclusive).
    /// Returns once etcd confirmed the watch; a start revision that was compacted away
    /// fails with [`EtcdError::Compacted`] here or at the first [`Watch::next`].
    pub async fn watch_prefix(
        &mut self,
        prefix: &[u8],
        start_revision: i64,
    ) -> Result<Watch, EtcdError> {
        let (requests, outgoing) = mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: prefix.to_vec(),
                    range_end: prefix_end(prefix),
                    start_revision,
                    ..WatchCreateRequest::default()
                },
            )),
        };
        // The channel has room for this one request; the receiver is alive (just made).
        let _ = requests.try_send(create);
        let responses = self
            .watch
            .watch(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        let mut watch = Watch {
            responses,
            _requests: requests,
        };
        // The first response confirms the creation (or says why not).
        let first = watch.response().await?;
        if !first.created {
            return Err(EtcdError::WatchCancelled {
                reason: "etcd did not confirm the watch".into(),
            });
        }
        Ok(watch)
    }
}

impl Watch {
    /// The next batch of changes (never empty; progress notifications are skipped).
    pub async fn next(&mut self) -> Result<Vec<Event>, EtcdError> {
        loop {
            let response = self.response().await?;
            let events: Vec<Event> = response
                .events
                .into_iter()
                .filter_map(|event| {
                    let kv = event.kv?;
                    Some(match EventType::try_from(event.r#type) {
                        Ok(EventType::Delete) => Event::Delete(kv),
                        // An unknown type from a newer etcd is taken as a write.
                        _ => Event::Put(kv),
                    })
                })
                .collect();
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }

    /// The next response; a cancellation becomes an error.
    async fn response(&mut self) -> Result<WatchResponse, EtcdError> {
        let response = self
            .responses
            .message()
            .await?
            .ok_or(EtcdError::WatchEnded)?;
        if response.compact_revision > 0 {
            return Err(EtcdError::Compacted {
                compact_revision: response.compact_revision,
            });
        }
        if response.canceled {
            return Err(EtcdError::WatchCancelled {
                reason: response.cancel_reason,
            });
        }
        Ok(response)
    }
}

/// The end of the key range holding every key that starts with `prefix`: the prefix with its
/// last byte below 0xff incremented (and what follows it dropped); `[0]` (every key) when
/// the prefix is empty or all 0xff.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/srv/a/"), b"/srv/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
