//! Fleet mode (`[cluster]`): the API-owned pools, routes and TCP routes of several proxyd
//! hosts live in etcd under one prefix, and every host serves them; so do the TLS
//! allowlist, uploaded and issued certificates and the ACME account ([`tls`]).
//!
//! # How a write flows
//!
//! An API write on any node ([`Cluster::write`]) is validated on this node's state, then
//! sent to etcd as one transaction that writes the objects it changed and the fleet's
//! write marker, guarded by the mod revisions of every object it read *and* of the
//! marker. The marker makes writes serializable: a write commits only on top of exactly
//! the state it was validated against. When the transaction fails because only the
//! marker moved (another node changed something else), the write is validated again on
//! the newer state and retried; when an object it read moved, the caller gets
//! [`WriteError::Conflict`] (gRPC ABORTED). A committed write returns once this node has
//! applied that etcd revision (read-your-writes on the node called).
//!
//! # How a node follows the fleet
//!
//! A sync task ([`sync`]) watches the prefix from the revision it last applied. Each batch
//! of events updates the [`View`] (the fleet's objects with their mod revisions), which is
//! turned into this host's API-owned objects by [`view::plan`] and applied through the
//! state's single writer, the same `Change` path as every other write; the view and its
//! revision are stored beside the state in SQLite. A restart resumes the watch from the
//! stored revision, or reads everything again when etcd has compacted it away.
//!
//! While etcd is unreachable the node serves what it applied last (from SQLite after a
//! restart), reports itself stale, and refuses API writes with UNAVAILABLE rather than
//! diverging. Objects of this host's config file stay per host and win on it; fleet
//! objects they hide are reported as shadowed.

mod members;
mod store;
mod sync;
mod tls;
mod view;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tokio::sync::watch;

pub use members::NodeStatus;
pub use tls::{Admission, CertOrigin, FleetCertificate, Guard, TlsObjects, TlsReport, TlsSink};
pub use view::{Excluded, Kind};

use crate::config::ClusterConfig;
use crate::etcd::{self, EtcdError, Op, TxnOutcome, Unchanged};
use crate::shutdown::Shutdown;
use crate::state::{ApplyError, Change, Source, StateHandle};
use store::ViewStore;
use view::{Keyspace, ObjectId, View};

/// How many times a write is validated again after other nodes' unrelated writes got in
/// first, before the caller is told to retry.
const MAX_ATTEMPTS: usize = 8;
/// How long a write waits for this node to apply the etcd revision it was committed at.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The key of the hand-over data under which an upgrade passes this node's lease to its
/// successor (see [`Cluster::pause`]).
pub const HANDOFF_LEASE: &str = "cluster.lease";
/// How long start-up waits for the first sync before serving from SQLite.
const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the fleet cluster could not start.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// A TLS file of `cluster.etcd` could not be read.
    #[error("cluster.etcd.{field}: {path}: {source}")]
    TlsFile {
        /// `ca_file`, `cert` or `key`.
        field: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The stored fleet view could not be opened.
    #[error("fleet view in the state database: {0}")]
    Store(String),
}

/// Why an API write in fleet mode was refused.
#[derive(Debug, Error)]
pub enum WriteError {
    /// The batch is not valid on this node (as without fleet mode).
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// An object the write read was changed by another node meanwhile: nothing was written.
    #[error("{0}")]
    Conflict(String),
    /// etcd is unreachable, or the write was made but is not applied here yet.
    #[error("{0}")]
    Unavailable(String),
}

/// The connection to etcd as the sync task last saw it.
#[derive(Debug, Clone, Default)]
struct Link {
    connected: bool,
    last_error: String,
    /// Unix seconds when the node last knew it was in sync (0: never).
    synced_at: u64,
}

/// This node's view of the fleet, for `status` and `/readyz`.
#[derive(Debug, Clone)]
pub struct ClusterStatus {
    /// `cluster.node_name`.
    pub node_name: String,
    /// `cluster.etcd.prefix`.
    pub prefix: String,
    /// Whether the node is watching etcd now.
    pub connected: bool,
    /// The etcd revision up to which the fleet's objects are applied here.
    pub applied_revision: i64,
    /// The newest etcd revision this node has heard of.
    pub etcd_revision: i64,
    /// Fleet writes (API writes of objects, on any node) this node has applied: the
    /// write marker's version in etcd.
    pub applied_writes: i64,
    /// Fleet writes etcd had, when this node last heard (every heartbeat, every batch),
    /// that it has not applied. Node heartbeats are not writes and do not count.
    pub lag_writes: i64,
    /// How long the node has been serving without etcd (`None`: in sync).
    pub stale_for: Option<Duration>,
    /// The last etcd failure.
    pub last_error: String,
    /// Full reads of the fleet's objects.
    pub full_syncs: u64,
    /// Watches resumed from the stored revision.
    pub resumes: u64,
    /// Fleet objects whose name this host's config file owns.
    pub shadowed: Vec<Excluded>,
    /// Fleet objects that cannot apply on this host.
    pub skipped: Vec<Excluded>,
}

impl ClusterStatus {
    /// The `/readyz` line: ready either way (the node serves), but says when it is stale.
    pub fn readiness(&self) -> Option<String> {
        self.stale_for.map(|age| {
            format!(
                "stale: etcd unreachable, serving the fleet's rules as of etcd revision {} (last in sync {}s ago)",
                self.applied_revision,
                age.as_secs()
            )
        })
    }
}

struct Inner {
    node_name: String,
    prefix: String,
    endpoints: Vec<String>,
    tls: Option<etcd::Tls>,
    keys: Keyspace,
    state: StateHandle,
    /// Where the fleet's TLS objects go on this host (none in a daemon without TLS).
    tls_sink: Option<Arc<dyn TlsSink>>,
    store: ViewStore,
    view: watch::Sender<Arc<View>>,
    link: Mutex<Link>,
    /// The fleet objects this host does not serve as the fleet has them.
    report: Mutex<view::Exclusions>,
    /// Set when a plan could not be applied: the state may not follow the view, so the
    /// next batch plans everything instead of only what it changed.
    replan_all: AtomicBool,
    /// The connection writes use, set while the sync task is connected.
    client: Mutex<Option<etcd::Client>>,
    etcd_revision: AtomicI64,
    /// The lease of this node's key (0: none yet): kept across reconnections, and passed
    /// to the successor by an upgrade so the key never disappears.
    lease: AtomicI64,
    /// Set while an upgrade hands over: the sync and the heartbeat stand still.
    pause: watch::Sender<bool>,
    /// Set by the sync task once it stands still (between two batches).
    sync_parked: watch::Sender<bool>,
    /// The newest write marker heard of: its mod revision and version.
    etcd_marker: Mutex<(i64, i64)>,
    full_syncs: AtomicU64,
    resumes: AtomicU64,
}

/// Fleet mode: the handle the management API writes through and reports from.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_name", &self.inner.node_name)
            .field("applied_revision", &self.inner.view.borrow().revision)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_file(field: &'static str, path: &Path) -> Result<Vec<u8>, ClusterError> {
    std::fs::read(path).map_err(|source| ClusterError::TlsFile {
        field,
        path: path.display().to_string(),
        source,
    })
}

impl Cluster {
    /// Loads the stored view, applies it, and starts following etcd (waiting a few
    /// seconds for the first sync; without etcd the node serves from SQLite, stale). Also
    /// starts this node's lease key, on `inherited_lease` (the lease a previous process
    /// handed over, see [`HANDOFF_LEASE`]) while etcd still has it. The fleet's TLS
    /// objects are handed to `tls_sink`.
    pub async fn start(
        config: &ClusterConfig,
        db: &Path,
        state: StateHandle,
        tls_sink: Option<Arc<dyn TlsSink>>,
        shutdown: Shutdown,
        inherited_lease: Option<i64>,
    ) -> Result<Cluster, ClusterError> {
        let tls = match &config.etcd.tls {
            None => None,
            Some(t) => Some(etcd::Tls {
                ca_pem: read_file("ca_file", &t.ca_file)?,
                identity: match &t.identity {
                    None => None,
                    Some((cert, key)) => Some((read_file("cert", cert)?, read_file("key", key)?)),
                },
            }),
        };
        let store = ViewStore::open(db, state.clone(), &config.etcd.prefix)
            .map_err(|e| ClusterError::Store(e.to_string()))?;
        let stored = store.load().await.map_err(ClusterError::Store)?;
        let (view, synced_at) = match stored {
            Some(s) => (s.view, s.synced_at),
            None => (View::default(), 0),
        };
        let cluster = Cluster {
            inner: Arc::new(Inner {
                node_name: config.node_name.clone(),
                prefix: config.etcd.prefix.clone(),
                endpoints: config.etcd.endpoints.clone(),
                tls,
                keys: Keyspace::new(&config.etcd.prefix),
                state,
                tls_sink,
                store,
                view: watch::channel(Arc::new(view)).0,
                link: Mutex::new(Link {
                    synced_at,
                    last_error: "not connected yet".into(),
                    ..Link::default()
                }),
                report: Mutex::new(view::Exclusions::default()),
                replan_all: AtomicBool::new(false),
                client: Mutex::new(None),
                etcd_revision: AtomicI64::new(0),
                lease: AtomicI64::new(inherited_lease.unwrap_or(0)),
                pause: watch::channel(false).0,
                sync_parked: watch::channel(false).0,
                etcd_marker: Mutex::new((0, 0)),
                full_syncs: AtomicU64::new(0),
                resumes: AtomicU64::new(0),
            }),
        };
        // The stored view against the state as opened (the config file may have changed).
        cluster.inner.reconcile().await;
        let mut applied = cluster.inner.view.subscribe();
        let first = applied.borrow().revision;
        tokio::spawn(sync::run(cluster.inner.clone(), shutdown.clone()));
        tokio::spawn(members::run(cluster.inner.clone(), shutdown));
        // Serve from SQLite if etcd does not answer soon; the sync carries on meanwhile.
        let synced = async {
            loop {
                if applied.changed().await.is_err() {
                    return;
                }
                if cluster.inner.link().connected || applied.borrow().revision != first {
                    return;
                }
            }
        };
        if tokio::time::timeout(FIRST_SYNC_TIMEOUT, synced)
            .await
            .is_err()
        {
            tracing::warn!(
                error = %cluster.inner.link().last_error,
                revision = first,
                "etcd is unreachable: serving the fleet's rules stored in SQLite (stale)"
            );
        }
        Ok(cluster)
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.inner.node_name
    }

    /// `cluster.etcd.prefix`, without a trailing '/': other parts of the fleet (ACME order
    /// locks, challenge tokens) keep their keys under it.
    pub fn prefix(&self) -> &str {
        self.inner.prefix.trim_end_matches('/')
    }

    /// A new connection to the fleet's etcd, for a part that keeps keys of its own.
    pub async fn connect(&self) -> Result<etcd::Client, EtcdError> {
        etcd::Client::connect_with(&self.inner.endpoints, self.inner.tls.as_ref()).await
    }

    /// Waits until this node has applied etcd revision `revision` (at most a few seconds):
    /// what other nodes wrote before it is then served here.
    pub async fn wait_applied(&self, revision: i64) -> Result<(), String> {
        self.inner.saw_revision(revision);
        self.inner.wait_applied(revision).await
    }

    /// For an upgrade's hand-over: stops following etcd between two batches, stops the
    /// heartbeat *without* revoking the lease (the successor keeps the same lease and key,
    /// so the node never leaves the fleet's list), and stores the applied revision, so the
    /// successor resumes its watch exactly there instead of reading everything again.
    /// Must run before the state's writer closes.
    pub async fn pause(&self) -> Result<(), ApplyError> {
        let inner = &self.inner;
        inner.pause.send_replace(true);
        let mut parked = inner.sync_parked.subscribe();
        // Ends only when the sync task is gone, which happens at shutdown only.
        let _ = parked.wait_for(|p| *p).await;
        let view = inner.view.borrow().clone();
        let synced_at = inner.link().synced_at;
        inner.store.touch(&view, synced_at).await
    }

    /// Undoes [`pause`](Self::pause) after a failed hand-over: the sync resumes from the
    /// applied revision and the heartbeat goes on (on the same lease while it lives).
    pub fn resume(&self) {
        self.inner.pause.send_replace(false);
    }

    /// The lease of this node's key, for the successor (`None`: none granted yet).
    pub fn lease(&self) -> Option<i64> {
        Some(self.inner.lease.load(Ordering::Relaxed)).filter(|l| *l != 0)
    }

    /// This node's view of the fleet.
    pub fn status(&self) -> ClusterStatus {
        let inner = &self.inner;
        let link = inner.link();
        let report = inner
            .report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let view = inner.view.borrow().clone();
        let applied_revision = view.revision;
        ClusterStatus {
            applied_writes: view.writes,
            lag_writes: inner.lag_writes(&view),
            node_name: inner.node_name.clone(),
            prefix: inner.prefix.clone(),
            connected: link.connected,
            applied_revision,
            etcd_revision: inner
                .etcd_revision
                .load(Ordering::Relaxed)
                .max(applied_revision),
            stale_for: (!link.connected).then(|| {
                Duration::from_secs(if link.synced_at == 0 {
                    0
                } else {
                    unix_now().saturating_sub(link.synced_at)
                })
            }),
            last_error: if link.connected {
                String::new()
            } else {
                link.last_error
            },
            full_syncs: inner.full_syncs.load(Ordering::Relaxed),
            resumes: inner.resumes.load(Ordering::Relaxed),
            shadowed: report.shadowed(),
            skipped: report.skipped(),
        }
    }

    /// Every node of the fleet with its lag, read from etcd now.
    pub async fn nodes(&self) -> Result<(i64, Vec<NodeStatus>), WriteError> {
        let mut client = self.inner.client()?;
        members::list(&self.inner, &mut client)
            .await
            .map_err(|e| WriteError::Unavailable(format!("etcd: {e}")))
    }

    /// Applies an API batch to the fleet (see the module documentation). Returns this
    /// node's state revision once the batch is applied here.
    pub async fn write(&self, changes: Vec<Change>) -> Result<u64, WriteError> {
        let inner = &self.inner;
        if let Some(local) = inner.local_only(&changes)? {
            return inner
                .state
                .apply(local, Source::Api)
                .await
                .map_err(WriteError::Apply);
        }
        let mut client = inner.client()?;
        for _ in 0..MAX_ATTEMPTS {
            let view = inner.view.borrow().clone();
            let snapshot = inner.state.snapshot();
            let mut next = snapshot.state.clone();
            next.apply_batch(&changes, Source::Api)?;
            let touched = touched(&changes);
            for change in &changes {
                if let Some(id) = created(change) {
                    // The fleet has it though this host cannot serve it (skipped here).
                    if snapshot_lacks(&snapshot.state, &id) && view.objects.contains_key(&id) {
                        return Err(WriteError::Apply(ApplyError::AlreadyExists {
                            kind: id.0.as_str(),
                            name: id.1,
                        }));
                    }
                }
            }
            let mut read: BTreeSet<ObjectId> = touched.clone();
            for (kind, name) in &touched {
                // A route depends on its pool: a concurrent deletion of it must conflict.
                let pool = match kind {
                    Kind::Route => next.route(name).map(|r| r.pool.clone()),
                    Kind::TcpRoute => next.tcp_route(name).map(|r| r.pool.clone()),
                    _ => None,
                };
                if let Some(pool) = pool {
                    read.insert((Kind::Pool, pool));
                }
            }
            let mut guards: Vec<Unchanged> = read
                .iter()
                .map(|id| Unchanged {
                    key: inner.keys.object(id.0, &id.1),
                    mod_revision: view.mod_revision(id),
                })
                .collect();
            guards.push(Unchanged {
                key: inner.keys.marker(),
                mod_revision: view.marker,
            });
            let mut ops = Vec::new();
            for (kind, name) in &touched {
                let key = inner.keys.object(*kind, name);
                match view::encode(&next, *kind, name) {
                    Some(value) => ops.push(Op::Put {
                        key,
                        value,
                        lease: 0,
                    }),
                    None if view.mod_revision(&(*kind, name.clone())) != 0 => {
                        ops.push(Op::Delete { key })
                    }
                    None => {}
                }
            }
            if ops.is_empty() {
                return Ok(snapshot.revision);
            }
            ops.push(Op::Put {
                key: inner.keys.marker(),
                value: inner.node_name.clone().into_bytes(),
                lease: 0,
            });
            let outcome = client.txn(&guards, ops).await.map_err(|e| {
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
                    return Ok(inner.state.snapshot().revision);
                }
                TxnOutcome::Conflict(revision) => {
                    inner.saw_revision(revision);
                    inner.wait_applied(revision).await.map_err(|e| {
                        WriteError::Unavailable(format!(
                            "another node wrote first (etcd revision {revision}) and {e}"
                        ))
                    })?;
                    let now = inner.view.borrow().clone();
                    if let Some(id) = read
                        .iter()
                        .find(|id| now.mod_revision(id) != view.mod_revision(id))
                    {
                        return Err(WriteError::Conflict(format!(
                            "{} {:?} was changed by another node (etcd revision {}) since this write read it; nothing was written: read it again and retry",
                            id.0,
                            id.1,
                            now.mod_revision(id).max(now.revision)
                        )));
                    }
                    // Only objects this write did not read changed: validate again on
                    // the newer state.
                }
            }
        }
        Err(WriteError::Conflict(format!(
            "the fleet changed {MAX_ATTEMPTS} times while this write was being made; nothing was written: retry"
        )))
    }
}

/// Waits until an upgrade asks the fleet tasks to stand still.
async fn until_paused(pause: &mut watch::Receiver<bool>) {
    // The sender lives as long as the tasks that wait here.
    let _ = pause.wait_for(|p| *p).await;
}

/// Waits until a failed upgrade lets the fleet tasks go on; false if it never will.
async fn until_resumed(pause: &mut watch::Receiver<bool>) -> bool {
    pause.wait_for(|p| !*p).await.is_ok()
}

/// The objects a batch names.
fn touched(changes: &[Change]) -> BTreeSet<ObjectId> {
    let mut t = crate::state::Touched::default();
    changes.iter().for_each(|c| t.add(c));
    let mut out = BTreeSet::new();
    out.extend(t.pools.into_iter().map(|n| (Kind::Pool, n)));
    out.extend(t.routes.into_iter().map(|n| (Kind::Route, n)));
    out.extend(t.tcp_routes.into_iter().map(|n| (Kind::TcpRoute, n)));
    out
}

/// The object a change creates, if it is a creation.
fn created(change: &Change) -> Option<ObjectId> {
    match change {
        Change::CreatePool(p) => Some((Kind::Pool, p.name.clone())),
        Change::CreateRoute(r) => Some((Kind::Route, r.name.clone())),
        Change::CreateTcpRoute(r) => Some((Kind::TcpRoute, r.name.clone())),
        _ => None,
    }
}

fn snapshot_lacks(state: &crate::state::State, (kind, name): &ObjectId) -> bool {
    match kind {
        Kind::Pool => state.pool(name).is_none(),
        Kind::Route => state.route(name).is_none(),
        Kind::TcpRoute => state.tcp_route(name).is_none(),
        Kind::Allow | Kind::Certificate | Kind::Account => false,
    }
}

impl Inner {
    fn link(&self) -> Link {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn edit_link(&self, edit: impl FnOnce(&mut Link)) {
        edit(&mut self.link.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The connection for writes, or why there is none.
    fn client(&self) -> Result<etcd::Client, WriteError> {
        let client = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        client.ok_or_else(|| {
            WriteError::Unavailable(format!(
                "etcd is unreachable ({}): fleet writes are refused until it is back, so that no node diverges",
                self.link().last_error
            ))
        })
    }

    /// A write call failed: the sync task notices on its own; the error is kept for status.
    fn note_failure(&self, e: &EtcdError) {
        tracing::warn!(error = %e, "fleet write failed at etcd");
    }

    fn saw_revision(&self, revision: i64) {
        self.etcd_revision.fetch_max(revision, Ordering::Relaxed);
    }

    /// Notes the write marker as read from etcd (mod revision, version).
    fn saw_write(&self, mod_revision: i64, version: i64) {
        self.saw_revision(mod_revision);
        let mut newest = self.etcd_marker.lock().unwrap_or_else(|p| p.into_inner());
        if mod_revision > newest.0 {
            *newest = (mod_revision, version);
        }
    }

    /// How many fleet writes etcd had, when last heard of, that this node has not applied.
    fn lag_writes(&self, view: &View) -> i64 {
        let (revision, writes) = *self.etcd_marker.lock().unwrap_or_else(|p| p.into_inner());
        if view.marker >= revision {
            0
        } else {
            writes.saturating_sub(view.writes).max(1)
        }
    }

    /// A batch that only drains or re-activates upstreams of this host's config-file pools
    /// stays on this host (those pools are not the fleet's). `None`: a fleet write.
    fn local_only(&self, changes: &[Change]) -> Result<Option<Vec<Change>>, WriteError> {
        let snapshot = self.state.snapshot();
        let local = |c: &Change| match c {
            Change::SetUpstreamState { pool, .. } => snapshot
                .state
                .pool(pool)
                .is_some_and(|p| p.source == Source::Declarative),
            _ => false,
        };
        let count = changes.iter().filter(|c| local(c)).count();
        if count == 0 {
            return Ok(None);
        }
        if count == changes.len() {
            return Ok(Some(changes.to_vec()));
        }
        Err(WriteError::Apply(ApplyError::invalid(
            "changes",
            "a batch cannot mix draining upstreams of this host's config-file pools (local) with fleet changes",
        )))
    }

    /// Waits until the view (and so the state) has applied `revision`.
    async fn wait_applied(&self, revision: i64) -> Result<(), String> {
        let mut rx = self.view.subscribe();
        let reached = tokio::time::timeout(APPLY_TIMEOUT, async {
            rx.wait_for(|v| v.revision >= revision).await.is_ok()
        })
        .await;
        match reached {
            Ok(true) => Ok(()),
            Ok(false) => Err("the fleet sync has stopped".into()),
            Err(_) => Err(format!(
                "this node has not applied it within {}s (applied: {}; {})",
                APPLY_TIMEOUT.as_secs(),
                self.view.borrow().revision,
                if self.link().connected {
                    "connected".to_string()
                } else {
                    format!("etcd: {}", self.link().last_error)
                }
            )),
        }
    }

    /// Plans the current view onto the current state and applies it.
    async fn reconcile(&self) {
        let view = self.view.borrow().clone();
        self.reconcile_with(&view).await;
    }

    /// Plans `view` onto the current state and applies it; records what is shadowed or
    /// skipped. A refused batch is logged and planned again at the next change.
    async fn reconcile_with(&self, view: &View) {
        let snapshot = self.state.snapshot();
        let plan = view::plan(&snapshot.state, view);
        let mut exclusions = view::Exclusions::of(&plan);
        let applied = plan.changes.is_empty() || self.apply_planned(plan.changes, view).await;
        self.replan_all.store(!applied, Ordering::Relaxed);
        if let Some(tls) = self.reconcile_tls(view).await {
            exclusions.set_tls(tls);
        }
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = exclusions;
    }

    /// Hands the view's TLS objects to the TLS part; what it could not take (`None`: not
    /// in fleet TLS mode).
    async fn reconcile_tls(&self, view: &View) -> Option<view::TlsExclusions> {
        let tls = self.tls_sink.as_ref()?;
        let objects = view.tls_objects();
        let mut skipped = objects.unreadable.clone();
        let taken = tls.apply(objects).await;
        skipped.extend(taken.skipped);
        Some(view::TlsExclusions {
            shadowed: taken.shadowed,
            skipped,
        })
    }

    /// Applies what the objects in `delta` (the difference between `old`, which the state
    /// follows, and `view`) change on this host, at a cost that grows with the change and
    /// not with the fleet; plans everything instead when an earlier plan failed to apply.
    async fn reconcile_changed(&self, old: &View, view: &View, delta: &view::Delta) {
        if self.replan_all.load(Ordering::Relaxed) {
            return self.reconcile_with(view).await;
        }
        let snapshot = self.state.snapshot();
        let Some(replan) = view::replan(&snapshot.state, old, view, delta.ids()) else {
            return self.reconcile_with(view).await;
        };
        if !replan.changes.is_empty() && !self.apply_planned(replan.changes, view).await {
            // Planning everything sees every object again, and records the failure.
            return self.reconcile_with(view).await;
        }
        // The TLS part takes the whole TLS set; only when some of it changed.
        let tls = if delta.ids().any(|id| !id.0.is_model()) {
            self.reconcile_tls(view).await
        } else {
            None
        };
        let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        report.update(&replan.placed);
        if let Some(tls) = tls {
            report.set_tls(tls);
        }
    }

    /// Applies a planned batch; false (logged, kept for status) when the state refused it.
    async fn apply_planned(&self, changes: Vec<Change>, view: &View) -> bool {
        match self.state.apply(changes, Source::Api).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, revision = view.revision, "the fleet's objects could not be applied here");
                self.edit_link(|l| {
                    l.last_error = format!("applying etcd revision {}: {e}", view.revision)
                });
                false
            }
        }
    }
}
