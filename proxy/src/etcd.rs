//! A small client for etcd's v3 API over the generated tonic code in `proxy_proto::etcd`:
//! prefix reads at a revision, watches from a revision that report compaction (and, on
//! request, progress), puts and deletes, transactions guarded by mod revisions, and leases
//! with keep-alive. Built on checked-in generated code, so building needs no `protoc`.
//!
//! A [`Client`] is one connection to the first endpoint that answers; callers that must
//! survive an etcd outage (discovery) connect again with backoff when a call fails.

use std::time::Duration;

use proxy_proto::etcd::etcdserverpb::{
    compare, kv_client::KvClient, lease_client::LeaseClient, request_op, watch_client::WatchClient,
    watch_request, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use proxy_proto::etcd::mvccpb::event::EventType;
/// A stored key-value as etcd returns it (key, value, revisions, lease).
pub use proxy_proto::etcd::mvccpb::KeyValue;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use thiserror::Error;
use tokio::sync::mpsc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// How long connecting to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on an idle connection notice a vanished etcd (or network) within seconds.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys per range request of a prefix read: a fleet of 100,000 routes is read in pages
/// rather than in one response far over gRPC's message limit.
const PAGE: i64 = 5_000;
/// The largest message taken from etcd. A watch response carries whole transactions (up
/// to etcd's `--max-request-bytes` each, possibly several); a page of keys stays far
/// below it.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

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
    /// The lease expired (or was revoked) before it was kept alive.
    #[error("etcd lease {0:x} has expired")]
    LeaseExpired(i64),
    /// The keep-alive stream of a lease ended.
    #[error("the etcd lease keep-alive stream ended")]
    KeepAliveEnded,
    /// The TLS settings could not be used.
    #[error("etcd TLS: {0}")]
    Tls(String),
}

/// The TLS of a connection to etcd: the CA of its server certificates and, when etcd asks
/// for one, a client certificate (all PEM).
#[derive(Clone)]
pub struct Tls {
    /// CA certificate(s).
    pub ca_pem: Vec<u8>,
    /// Client certificate chain and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A condition of a transaction: `key` was last written at `mod_revision` (0: the key does
/// not exist). Every key a write read is guarded, so a concurrent change to any of them makes
/// the transaction fail instead of overwriting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unchanged {
    /// The key.
    pub key: Vec<u8>,
    /// Its mod revision when it was read; 0 when it was absent.
    pub mod_revision: i64,
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `key = value`, attached to `lease` when not 0.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// Lease id, or 0.
        lease: i64,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

/// How a guarded transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every guard held and every write was made at this store revision.
    Committed(i64),
    /// A guarded key had changed: nothing was written. The store revision etcd was at.
    Conflict(i64),
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
    /// Kept open (closing the request stream would end the watch); carries progress requests.
    requests: mpsc::Sender<WatchRequest>,
}

/// What one watch response says: the changes it carries (none for a progress report) and
/// the store revision every change up to which has now been delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchBatch {
    /// The store revision of the response's header: the watcher has seen everything up to it.
    pub revision: i64,
    /// The changes, oldest first; empty for a progress report.
    pub events: Vec<Event>,
}

/// The keep-alive stream of one lease; see [`Client::keep_alive`].
pub struct KeepAlive {
    id: i64,
    requests: mpsc::Sender<LeaseKeepAliveRequest>,
    responses: tonic::Streaming<LeaseKeepAliveResponse>,
}

impl KeepAlive {
    /// Renews the lease; returns its new time to live. A lease that already expired is
    /// [`EtcdError::LeaseExpired`].
    pub async fn refresh(&mut self) -> Result<Duration, EtcdError> {
        self.requests
            .send(LeaseKeepAliveRequest { id: self.id })
            .await
            .map_err(|_| EtcdError::KeepAliveEnded)?;
        self.response().await
    }

    async fn response(&mut self) -> Result<Duration, EtcdError> {
        let response = self
            .responses
            .message()
            .await?
            .ok_or(EtcdError::KeepAliveEnded)?;
        if response.ttl <= 0 {
            return Err(EtcdError::LeaseExpired(self.id));
        }
        Ok(Duration::from_secs(
            u64::try_from(response.ttl).unwrap_or(0),
        ))
    }
}

/// Dials one `https://` endpoint: TCP, then a TLS handshake verified against the CA.
#[derive(Clone)]
struct TlsDial {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    /// `host:port`.
    address: String,
}

impl TlsDial {
    fn new(endpoint: &str, tls: &Tls) -> Result<TlsDial, EtcdError> {
        let bad = |reason: String| EtcdError::Tls(format!("{endpoint}: {reason}"));
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
        let host = uri
            .host()
            .ok_or_else(|| bad("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(2379);
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| bad(format!("host name: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&tls.ca_pem) {
            let cert = cert.map_err(|e| bad(format!("ca_file: {e}")))?;
            roots.add(cert).map_err(|e| bad(format!("ca_file: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match &tls.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(format!("cert: {e}")))?;
                let key =
                    PrivateKeyDer::from_pem_slice(key).map_err(|e| bad(format!("key: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad(format!("cert/key: {e}")))?
            }
        };
        // gRPC over TLS is HTTP/2, negotiated by ALPN.
        config.alpn_protocols = vec![b"h2".to_vec()];
        let address = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(TlsDial {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            address,
        })
    }
}

type Dialled = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<http::Uri> for TlsDial {
    type Response = Dialled;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Dialled>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let dial = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&dial.address).await?;
            tcp.set_nodelay(true)?;
            let tls = dial.connector.connect(dial.server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

impl Client {
    /// Connects to the first of `endpoints` (`http://host:port`) that accepts.
    pub async fn connect(endpoints: &[String]) -> Result<Client, EtcdError> {
        Client::connect_with(endpoints, None).await
    }

    /// Connects to the first of `endpoints` that accepts, over TLS when `tls` is given
    /// (`https://host:port` endpoints).
    pub async fn connect_with(
        endpoints: &[String],
        tls: Option<&Tls>,
    ) -> Result<Client, EtcdError> {
        let mut last = None;
        for endpoint in endpoints {
            // TLS is dialled here (tokio-rustls), so tonic only sees a byte stream and its
            // URL keeps the http scheme.
            let dial = match tls {
                Some(tls) => Some(TlsDial::new(endpoint, tls)?),
                None => None,
            };
            let url = match &dial {
                Some(d) => format!("http://{}", d.address),
                None => endpoint.clone(),
            };
            let target = Endpoint::from_shared(url)
                .map_err(|source| EtcdError::Endpoint {
                    endpoint: endpoint.clone(),
                    source,
                })?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
                .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
                .keep_alive_while_idle(true);
            let connected = match dial {
                Some(dial) => target.connect_with_connector(dial).await,
                None => target.connect().await,
            };
            match connected {
                Ok(channel) => {
                    return Ok(Client {
                        kv: KvClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE),
                        watch: WatchClient::new(channel.clone())
                            .max_decoding_message_size(MAX_MESSAGE),
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

    /// Every key starting with `prefix`, as of `revision` (0: the newest). Read in pages of
    /// [`PAGE`] keys, all at the revision of the first page, so the result is one
    /// consistent snapshot however many keys there are.
    pub async fn get_prefix(
        &mut self,
        prefix: &[u8],
        revision: i64,
    ) -> Result<Snapshot, EtcdError> {
        let end = prefix_end(prefix);
        let mut from = prefix.to_vec();
        let mut at = revision;
        let mut kvs = Vec::new();
        loop {
            let response = self
                .kv
                .range(RangeRequest {
                    key: from,
                    range_end: end.clone(),
                    revision: at,
                    limit: PAGE,
                    ..RangeRequest::default()
                })
                .await?
                .into_inner();
            if at == 0 {
                at = response.header.as_ref().map_or(0, |h| h.revision);
            }
            let more = response.more;
            kvs.extend(response.kvs);
            match kvs.last() {
                // The next page starts just after the last key read.
                Some(last) if more => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(Snapshot { revision: at, kvs })
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

    /// Writes `ops` in one transaction if every guard holds; otherwise writes nothing.
    pub async fn txn(
        &mut self,
        guards: &[Unchanged],
        ops: Vec<Op>,
    ) -> Result<TxnOutcome, EtcdError> {
        let compare = guards
            .iter()
            .map(|g| Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Mod as i32,
                key: g.key.clone(),
                range_end: Vec::new(),
                target_union: Some(compare::TargetUnion::ModRevision(g.mod_revision)),
            })
            .collect();
        let success = ops
            .into_iter()
            .map(|op| RequestOp {
                request: Some(match op {
                    Op::Put { key, value, lease } => request_op::Request::RequestPut(PutRequest {
                        key,
                        value,
                        lease,
                        ..PutRequest::default()
                    }),
                    Op::Delete { key } => {
                        request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                            key,
                            ..DeleteRangeRequest::default()
                        })
                    }
                }),
            })
            .collect();
        let response = self
            .kv
            .txn(TxnRequest {
                compare,
                success,
                failure: Vec::new(),
            })
            .await?
            .into_inner();
        let revision = response.header.map_or(0, |h| h.revision);
        Ok(if response.succeeded {
            TxnOutcome::Committed(revision)
        } else {
            TxnOutcome::Conflict(revision)
        })
    }

    /// Writes `key = value` on `lease` only if the key does not exist (its create revision
    /// is 0): the primitive of a lock. `Committed` when this call created it.
    pub async fn put_if_absent(
        &mut self,
        key: &[u8],
        value: &[u8],
        lease: i64,
    ) -> Result<TxnOutcome, EtcdError> {
        let response = self
            .kv
            .txn(TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Create as i32,
                    key: key.to_vec(),
                    range_end: Vec::new(),
                    target_union: Some(compare::TargetUnion::CreateRevision(0)),
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.to_vec(),
                        value: value.to_vec(),
                        lease,
                        ..PutRequest::default()
                    })),
                }],
                failure: Vec::new(),
            })
            .await?
            .into_inner();
        let revision = response.header.map_or(0, |h| h.revision);
        Ok(if response.succeeded {
            TxnOutcome::Committed(revision)
        } else {
            TxnOutcome::Conflict(revision)
        })
    }

    /// Opens the keep-alive stream of lease `id`, renewing it once; each
    /// [`KeepAlive::refresh`] renews it again.
    pub async fn keep_alive(&mut self, id: i64) -> Result<KeepAlive, EtcdError> {
        let (requests, outgoing) = mpsc::channel(1);
        // etcd answers the call (its headers) with the first response, so the first
        // request must be queued before waiting for the call.
        let _ = requests.try_send(LeaseKeepAliveRequest { id });
        let responses = self
            .lease
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        let mut alive = KeepAlive {
            id,
            requests,
            responses,
        };
        alive.response().await?;
        Ok(alive)
    }

    /// Whether the history at `revision` can still be read (and so watched from): false
    /// when etcd has compacted it away, or has never reached it (its data was replaced).
    pub async fn has_revision(&mut self, prefix: &[u8], revision: i64) -> Result<bool, EtcdError> {
        let read = self
            .kv
            .range(RangeRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                revision,
                count_only: true,
                ..RangeRequest::default()
            })
            .await;
        match read {
            Ok(_) => Ok(true),
            Err(status) if status.code() == tonic::Code::OutOfRange => Ok(false),
            Err(status) => Err(status.into()),
        }
    }

    /// The store's current revision.
    pub async fn revision(&mut self) -> Result<i64, EtcdError> {
        let response = self
            .kv
            .range(RangeRequest {
                key: vec![0],
                count_only: true,
                limit: 1,
                ..RangeRequest::default()
            })
            .await?
            .into_inner();
        Ok(response.header.map_or(0, |h| h.revision))
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
                    progress_notify: true,
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
            requests,
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
            let batch = self.next_batch().await?;
            if !batch.events.is_empty() {
                return Ok(batch.events);
            }
        }
    }

    /// Asks etcd for a progress report: a response with no events and the store's revision
    /// (answered through [`next_batch`](Self::next_batch)). etcd 3.4 answers it even while
    /// a watch is still catching up on history, so the revision proves nothing about
    /// delivered events there; the fleet sync does not rely on it.
    pub async fn request_progress(&self) -> Result<(), EtcdError> {
        self.requests
            .send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::ProgressRequest(
                    WatchProgressRequest {},
                )),
            })
            .await
            .map_err(|_| EtcdError::WatchEnded)
    }

    /// The next response: its changes (possibly none, for a progress report) and the
    /// revision up to which the watch has delivered everything.
    pub async fn next_batch(&mut self) -> Result<WatchBatch, EtcdError> {
        {
            let response = self.response().await?;
            let revision = response.header.as_ref().map_or(0, |h| h.revision);
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
            Ok(WatchBatch { revision, events })
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
