//! The fleet's TLS data: the on-demand allowlist, uploaded and issued certificates and the
//! ACME account live in etcd beside the pools and routes (kinds [`Kind::Allow`],
//! [`Kind::Certificate`] and [`Kind::Account`] of the view), and the fleet's recent ACME
//! orders under one key, for rate limits that count the whole fleet.
//!
//! The TLS layer writes them with [`Cluster::write_tls`] (one guarded transaction, answered
//! once this node has applied it) and is handed them through the [`TlsSink`] given to
//! [`Cluster::start`]: whenever the sync task applies a change it gives the sink the
//! fleet's whole TLS set, which the sink stores in SQLite (through the state's writer) and
//! serves. This module knows nothing of certificates beyond their PEM text.

use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::view::{Kind, Object, View};
use super::{unix_now, Cluster, Excluded, WriteError, MAX_ATTEMPTS};
use crate::etcd::{KeyValue, Op, TxnOutcome, Unchanged};

/// Where a fleet certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertOrigin {
    /// Uploaded through the management API.
    Uploaded,
    /// Issued by ACME (on demand or renewed).
    Issued,
}

/// A certificate as stored in etcd (the key is the certificate's stored name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetCertificate {
    /// Stored name (the first DNS name unless the upload named it).
    pub name: String,
    /// Uploaded or issued.
    pub origin: CertOrigin,
    /// Chain PEM.
    pub cert_pem: String,
    /// Private key PEM.
    pub key_pem: String,
}

impl FleetCertificate {
    /// The value stored in etcd.
    pub fn encode(&self) -> Vec<u8> {
        // A plain struct of strings serialises infallibly.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The fleet's TLS objects as of one applied etcd revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsObjects {
    /// Allowlist patterns, sorted.
    pub allow: Vec<String>,
    /// Certificates, by name.
    pub certificates: Vec<FleetCertificate>,
    /// ACME accounts: (directory URL, credentials JSON).
    pub accounts: Vec<(String, String)>,
    /// TLS keys whose value does not decode (reported as skipped, never applied).
    pub unreadable: Vec<Excluded>,
}

/// What the TLS layer did not take of the fleet's TLS objects, for `status`.
#[derive(Debug, Clone, Default)]
pub struct TlsReport {
    /// Objects whose name this host's config file owns (the file wins on its host).
    pub shadowed: Vec<Excluded>,
    /// Objects that cannot be served here (an unusable certificate).
    pub skipped: Vec<Excluded>,
}

/// The TLS layer as the sync task sees it: it makes this host store and serve exactly the
/// fleet's TLS objects. Called on the sync task, one call at a time.
pub trait TlsSink: Send + Sync {
    /// Stores and serves `objects` (replacing the previous set); reports what it left out.
    fn apply(&self, objects: TlsObjects) -> BoxFuture<'_, TlsReport>;
}

/// What a TLS write expects of the object it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Nobody changed it since this node read it: a concurrent write is a conflict.
    Unchanged,
    /// Whatever it is now (an issued certificate: the newest order wins).
    Overwrite,
}

/// Whether an ACME order may start, after counting the fleet's recent orders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Counted in the fleet's log: order.
    Admitted,
    /// Over a limit: why.
    Refused(String),
}

/// One order in the fleet's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct OrderRecord {
    name: String,
    /// Unix seconds.
    at: u64,
}

/// How far back the order limits look.
const ORDER_WINDOW: Duration = Duration::from_secs(3600);

impl View {
    /// The TLS objects of the view (a range of the ordered map: no walk over routes).
    pub fn tls_objects(&self) -> TlsObjects {
        let mut out = TlsObjects::default();
        for ((kind, name), entry) in self.objects.range((Kind::Allow, String::new())..) {
            match &entry.object {
                Object::Allow(pattern) => out.allow.push(pattern.clone()),
                Object::Certificate(c) => out.certificates.push(c.clone()),
                Object::Account(json) => out.accounts.push((name.clone(), json.clone())),
                Object::Unreadable(reason) => out.unreadable.push(Excluded {
                    kind: *kind,
                    name: name.clone(),
                    reason: format!("unreadable value in etcd: {reason}"),
                }),
                Object::Pool(_) | Object::Route(_) | Object::TcpRoute(_) => {}
            }
        }
        out
    }
}

impl Cluster {
    /// The fleet's TLS objects as applied on this node.
    pub fn tls_objects(&self) -> TlsObjects {
        self.inner.view.borrow().tls_objects()
    }

    /// Writes (`Some`) or deletes (`None`) one TLS object of the fleet in one etcd
    /// transaction, guarded as `guard` says by the mod revision this node has applied;
    /// returns once this node has applied the write. `Ok(false)`: nothing to do (the
    /// fleet already has exactly that). A guarded write that another node got in first
    /// is [`WriteError::Conflict`] and writes nothing; etcd unreachable is
    /// [`WriteError::Unavailable`].
    pub async fn write_tls(
        &self,
        kind: Kind,
        name: &str,
        value: Option<Vec<u8>>,
        guard: Guard,
    ) -> Result<bool, WriteError> {
        let inner = &self.inner;
        let id = (kind, name.to_string());
        let (current, read) = {
            let view = inner.view.borrow();
            (
                view.objects.get(&id).map(|e| e.value.clone()),
                view.mod_revision(&id),
            )
        };
        if current == value {
            return Ok(false);
        }
        let mut client = inner.client()?;
        let key = inner.keys.object(kind, name);
        let guards = match guard {
            Guard::Unchanged => vec![Unchanged {
                key: key.clone(),
                mod_revision: read,
            }],
            Guard::Overwrite => Vec::new(),
        };
        let op = match value {
            Some(value) => Op::Put {
                key,
                value,
                lease: 0,
            },
            None => Op::Delete { key },
        };
        let outcome = client.txn(&guards, vec![op]).await.map_err(|e| {
            inner.note_failure(&e);
            WriteError::Unavailable(format!(
                "etcd did not answer the write ({e}); it may or may not have been made: read it back before retrying"
            ))
        })?;
        match outcome {
            TxnOutcome::Committed(revision) => {
                inner.saw_revision(revision);
                inner.wait_applied(revision).await.map_err(|e| {
                    WriteError::Unavailable(format!(
                        "written to etcd at revision {revision} but {e}"
                    ))
                })?;
                Ok(true)
            }
            TxnOutcome::Conflict(revision) => {
                inner.saw_revision(revision);
                // Apply the other node's write here first, so a retry reads it.
                inner.wait_applied(revision).await.map_err(|e| {
                    WriteError::Unavailable(format!(
                        "another node wrote first (etcd revision {revision}) and {e}"
                    ))
                })?;
                Err(WriteError::Conflict(format!(
                    "{kind} {name:?} was changed by another node (etcd revision {}) since this write read it; nothing was written: read it again and retry",
                    inner.view.borrow().mod_revision(&id).max(read)
                )))
            }
        }
    }

    /// How many ACME orders the whole fleet started in the last hour, from its order log
    /// (what the order limits count).
    pub async fn orders_last_hour(&self) -> Result<usize, WriteError> {
        let inner = &self.inner;
        let mut client = inner.client()?;
        let stored = client.get(&inner.keys.order_log()).await.map_err(|e| {
            inner.note_failure(&e);
            WriteError::Unavailable(format!("etcd did not answer ({e})"))
        })?;
        let (_, records) = order_log(stored);
        Ok(recent(records, unix_now()).len())
    }

    /// Counts an ACME order for `name` in the fleet's log if the fleet's orders of the last
    /// hour leave room for it (`per_hour` in all, `per_name` for this name). The log is one
    /// key written with a compare-and-swap, so nodes ordering at once are counted one after
    /// the other and the limits hold for the fleet, not per node.
    pub async fn admit_order(
        &self,
        name: &str,
        per_hour: usize,
        per_name: usize,
    ) -> Result<Admission, WriteError> {
        let inner = &self.inner;
        let mut client = inner.client()?;
        let key = inner.keys.order_log();
        let unavailable = |e: crate::etcd::EtcdError| {
            inner.note_failure(&e);
            WriteError::Unavailable(format!(
                "etcd did not answer ({e}): no order is started without the fleet's count"
            ))
        };
        for _ in 0..MAX_ATTEMPTS {
            let (read, records) = order_log(client.get(&key).await.map_err(unavailable)?);
            let now = unix_now();
            let log = recent(records, now);
            if let Some(refusal) = over_limit(&log, name, per_hour, per_name) {
                return Ok(Admission::Refused(refusal));
            }
            let mut next = log;
            next.push(OrderRecord {
                name: name.to_string(),
                at: now,
            });
            let value = serde_json::to_vec(&next).unwrap_or_default();
            let outcome = client
                .txn(
                    &[Unchanged {
                        key: key.clone(),
                        mod_revision: read,
                    }],
                    vec![Op::Put {
                        key: key.clone(),
                        value,
                        lease: 0,
                    }],
                )
                .await
                .map_err(unavailable)?;
            match outcome {
                TxnOutcome::Committed(revision) => {
                    inner.saw_revision(revision);
                    return Ok(Admission::Admitted);
                }
                // Another node counted an order first: count again on top of it.
                TxnOutcome::Conflict(revision) => inner.saw_revision(revision),
            }
        }
        Err(WriteError::Conflict(format!(
            "{name}: the fleet's order log changed {MAX_ATTEMPTS} times while this order was being counted"
        )))
    }
}

/// The records of the last [`ORDER_WINDOW`].
/// The fleet's order log as read from its key: the key's mod revision (0 when absent)
/// and its records. An unreadable log (written by hand) counts as empty rather than
/// blocking every order; the next order replaces it.
fn order_log(stored: Option<KeyValue>) -> (i64, Vec<OrderRecord>) {
    let read = stored.as_ref().map_or(0, |kv| kv.mod_revision);
    let records = stored
        .and_then(|kv| serde_json::from_slice(&kv.value).ok())
        .unwrap_or_default();
    (read, records)
}

fn recent(records: Vec<OrderRecord>, now: u64) -> Vec<OrderRecord> {
    records
        .into_iter()
        .filter(|r| r.at + ORDER_WINDOW.as_secs() > now)
        .collect()
}

/// Why one more order for `name` would break a limit, if it would.
fn over_limit(log: &[OrderRecord], name: &str, per_hour: usize, per_name: usize) -> Option<String> {
    if log.len() >= per_hour {
        return Some(format!(
            "{name}: {} orders in the fleet in the last hour (max_orders_per_hour)",
            log.len()
        ));
    }
    let for_name = log.iter().filter(|r| r.name == name).count();
    if for_name >= per_name {
        return Some(format!(
            "{name}: {for_name} orders for this name in the fleet in the last hour (max_orders_per_name_per_hour)"
        ));
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cluster::view::Keyspace;

    fn record(name: &str, at: u64) -> OrderRecord {
        OrderRecord {
            name: name.into(),
            at,
        }
    }

    #[test]
    fn the_order_limits_count_the_last_hour_of_the_whole_log() {
        let now = 10_000;
        let log = recent(
            vec![
                record("a.example", now - 3600), // an hour old: out
                record("a.example", now - 3599),
                record("b.example", now - 10),
            ],
            now,
        );
        assert_eq!(log.len(), 2);
        assert_eq!(over_limit(&log, "a.example", 3, 2), None);
        let per_name = over_limit(&log, "a.example", 3, 1).unwrap();
        assert!(
            per_name.contains("max_orders_per_name_per_hour"),
            "{per_name}"
        );
        let global = over_limit(&log, "c.example", 2, 5).unwrap();
        assert!(global.contains("2 orders in the fleet"), "{global}");
    }

    #[test]
    fn the_view_hands_out_only_its_tls_objects() {
        let keys = Keyspace::new("/p");
        let cert = FleetCertificate {
            name: "a.example".into(),
            origin: CertOrigin::Issued,
            cert_pem: "C".into(),
            key_pem: "K".into(),
        };
        let kv = |key: Vec<u8>, value: &[u8], rev| KeyValue {
            key,
            value: value.to_vec(),
            mod_revision: rev,
            create_revision: rev,
            ..KeyValue::default()
        };
        let view = View::from_read(
            &keys,
            9,
            vec![
                kv(keys.object(Kind::Route, "r"), b"{}", 2),
                kv(
                    keys.object(Kind::Allow, "*.example.org"),
                    b"*.example.org",
                    3,
                ),
                kv(keys.object(Kind::Allow, "bad.example"), b"other", 4),
                kv(
                    keys.object(Kind::Certificate, "a.example"),
                    &cert.encode(),
                    5,
                ),
                kv(
                    keys.object(Kind::Account, "https://ca.example/dir"),
                    b"{\"id\":1}",
                    6,
                ),
            ],
        );
        let tls = view.tls_objects();
        assert_eq!(tls.allow, ["*.example.org"]);
        assert_eq!(tls.certificates, [cert]);
        assert_eq!(
            tls.accounts,
            [(
                "https://ca.example/dir".to_string(),
                "{\"id\":1}".to_string()
            )]
        );
        assert_eq!(tls.unreadable.len(), 1);
        assert_eq!(tls.unreadable[0].name, "bad.example");
    }
}
