//! The desired state: model types, [`Change`], validation, and the single writer that
//! persists batches to SQLite and publishes routing snapshots.
//!
//! Flow of a batch: [`StateHandle::apply`] sends it to the writer thread, which validates it
//! against a copy of the current state, writes the rows it names in one SQLite transaction,
//! hands the new state to the [`Publish`] step it was given (routing compiles what was
//! touched and swaps its table in), and only then answers. Readers load a snapshot with one
//! atomic pointer read and never touch SQLite.
//!
//! This module is the ground floor: it imports no other module of the daemon. What is
//! built from the state (the routing table) is injected as a [`Publish`] step, and what
//! watches the writer (the write-latency metric) as a callback.
//!
//! A change costs what it changes: the state's maps are persistent (a copy is O(1), an edit
//! O(log n)), the store writes only the named rows, and routing recompiles only the touched
//! hosts and pools. Batches queued while the writer was busy are committed together (one
//! transaction, one fsync, one publish; each batch still all-or-nothing with its own
//! revision), and membership edits queued together are published once.
//!
//! Replaced snapshots are freed by the writer after it answered (see [`Retired`]), never
//! by a reader that happened to hold the last reference.

mod change;
mod membership;
mod model;
mod retired;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rpds::{RedBlackTreeMapSync, RedBlackTreeSetSync};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use change::{ApplyError, Change};
pub use membership::{
    Attachment, Membership, MembershipTouched, OnChange, Origin, RegisteredRoute, SourceKind,
};
pub use model::{
    default_connect_timeout, default_response_timeout, Balance, GrpcHealthCheck, H2Keepalive,
    HealthCheck, Outlier, PathMatch, Pool, Protocol, Route, Source, TcpRoute, Upstream,
    UpstreamPolicy, UpstreamProtocol, UpstreamState, UpstreamTls,
};
pub use retired::{by_others, Retired};
pub use store::StoreError;

/// The whole desired state at one revision. Cloning it is O(1): the maps are persistent and
/// share their structure with the copies they were made from.
#[derive(Debug, Clone, Default)]
pub struct State {
    listeners: Arc<BTreeMap<String, Protocol>>,
    pools: RedBlackTreeMapSync<String, Arc<Pool>>,
    routes: RedBlackTreeMapSync<String, Arc<Route>>,
    tcp_routes: RedBlackTreeMapSync<String, Arc<TcpRoute>>,
    /// `(host, route name)` of every HTTP route with a host: the routes of one host are
    /// found without visiting the others.
    routes_by_host: RedBlackTreeSetSync<(String, String)>,
    /// How many HTTP routes forward to each pool: whether a pool is in use, in O(log p).
    /// A count, not an index of names: pools are few and routes many, so keeping it costs
    /// one small-map edit per route instead of an insertion into a set as large as the
    /// routes themselves; the name of a user is only needed for an error message.
    pool_users: RedBlackTreeMapSync<String, usize>,
    /// Discovered and registered upstreams and registered routes: run-time only, never stored.
    membership: Arc<Membership>,
}

/// The objects a run of changes named: what the store writes and routing recompiles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    /// Pools created, changed or deleted (definition or run-time membership).
    pub pools: BTreeSet<String>,
    /// HTTP routes created, changed or deleted.
    pub routes: BTreeSet<String>,
    /// TCP routes created, changed or deleted.
    pub tcp_routes: BTreeSet<String>,
    /// Registered (run-time) routes added, replaced or removed.
    pub registered_routes: BTreeSet<String>,
}

impl Touched {
    /// Adds the object `change` names.
    pub fn add(&mut self, change: &Change) {
        let (set, name) = match change {
            Change::CreatePool(p) | Change::UpdatePool(p) => (&mut self.pools, &p.name),
            Change::DeletePool { name } => (&mut self.pools, name),
            Change::AddUpstream { pool, .. }
            | Change::RemoveUpstream { pool, .. }
            | Change::SetUpstreamState { pool, .. } => (&mut self.pools, pool),
            Change::CreateRoute(r) | Change::UpdateRoute(r) => (&mut self.routes, &r.name),
            Change::DeleteRoute { name } => (&mut self.routes, name),
            Change::CreateTcpRoute(r) | Change::UpdateTcpRoute(r) => {
                (&mut self.tcp_routes, &r.name)
            }
            Change::DeleteTcpRoute { name } => (&mut self.tcp_routes, name),
        };
        if !set.contains(name) {
            set.insert(name.clone());
        }
    }

    /// Adds everything `other` names.
    pub fn merge(&mut self, mut other: Touched) {
        if self.is_empty() {
            *self = other;
            return;
        }
        self.pools.append(&mut other.pools);
        self.routes.append(&mut other.routes);
        self.tcp_routes.append(&mut other.tcp_routes);
        self.registered_routes.append(&mut other.registered_routes);
    }

    /// Whether nothing was touched.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
            && self.routes.is_empty()
            && self.tcp_routes.is_empty()
            && self.registered_routes.is_empty()
    }
}

/// The API-owned (or declarative) objects as one document, for export and import.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// Pools.
    #[serde(default)]
    pub pools: Vec<Pool>,
    /// HTTP routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// TCP routes.
    #[serde(default)]
    pub tcp_routes: Vec<TcpRoute>,
}

/// Checks an object name: 1-128 of `[A-Za-z0-9._-]`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 128 {
        return Err("must be at most 128 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "{name:?} may only contain letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Checks an upstream address: `host:port` with a non-zero port.
pub fn check_upstream_address(address: &str) -> Result<(), String> {
    if address.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("{address:?} is not host:port"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("{address:?} has no valid port")),
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !host_ok {
        return Err(format!("{address:?} has an invalid host"));
    }
    Ok(())
}

/// Checks and normalises a route host: `example.com`, `*.example.com`; lower-cased.
pub(crate) fn normalise_host(host: &str) -> Result<String, String> {
    let host = host.trim().to_ascii_lowercase();
    let bare = host.strip_prefix("*.").unwrap_or(&host);
    if bare.is_empty() || bare.len() > 253 {
        return Err(format!("{host:?} is not a host name"));
    }
    if bare.contains('*') {
        return Err(format!(
            "{host:?}: a wildcard is only allowed as a leading \"*.\""
        ));
    }
    if !bare
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        || bare.starts_with('.')
        || bare.ends_with('.')
    {
        return Err(format!("{host:?} is not a host name (no port, no scheme)"));
    }
    Ok(host)
}

/// Checks a route's path (exact or prefix): it starts with '/', has no spaces, control
/// characters, '?' or '#', and is at most 1024 bytes.
pub(crate) fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with '/'"));
    }
    if path.len() > 1024
        || path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
    {
        return Err(format!(
            "{path:?} must be a plain path (no spaces, '?' or '#', at most 1024 bytes)"
        ));
    }
    Ok(())
}

fn check_pool(pool: &Pool) -> Result<(), ApplyError> {
    check_name(&pool.name).map_err(|r| ApplyError::invalid("pool.name", r))?;
    let mut seen = std::collections::HashSet::new();
    for (i, u) in pool.upstreams.iter().enumerate() {
        check_upstream(u).map_err(|e| e.within(&format!("pool.upstreams[{i}].")))?;
        if !seen.insert(u.address.as_str()) {
            return Err(ApplyError::invalid(
                format!("pool.upstreams[{i}]"),
                format!("duplicate upstream {:?}", u.address),
            ));
        }
    }
    if let Some(h) = &pool.health {
        if h.interval.is_zero() {
            return Err(ApplyError::invalid(
                "pool.health.interval",
                "must be positive",
            ));
        }
        if h.timeout.is_zero() {
            return Err(ApplyError::invalid(
                "pool.health.timeout",
                "must be positive",
            ));
        }
        if h.grpc.is_some() && !h.path.is_empty() {
            return Err(ApplyError::invalid(
                "pool.health.grpc",
                "set either path (HTTP check) or grpc, not both",
            ));
        }
        if !h.path.is_empty() && !h.path.starts_with('/') {
            return Err(ApplyError::invalid(
                "pool.health.path",
                "must start with '/'",
            ));
        }
    }
    if pool.connect_timeout.is_zero() {
        return Err(ApplyError::invalid(
            "pool.connect_timeout",
            "must be positive",
        ));
    }
    if pool.response_timeout.is_zero() {
        return Err(ApplyError::invalid(
            "pool.response_timeout",
            "must be positive",
        ));
    }
    let policy = &pool.policy;
    for (field, value) in [
        ("pool.idle_timeout", policy.idle_timeout),
        ("pool.body_timeout", policy.body_timeout),
        ("pool.connect_deadline", policy.connect_deadline),
        ("pool.outlier.base_ejection", policy.outlier.base_ejection),
        ("pool.outlier.max_ejection", policy.outlier.max_ejection),
    ] {
        if value.is_zero() {
            return Err(ApplyError::invalid(field, "must be positive"));
        }
    }
    if policy.max_attempts == 0 {
        return Err(ApplyError::invalid(
            "pool.max_attempts",
            "must be at least 1",
        ));
    }
    if policy.outlier.consecutive_failures == 0 {
        return Err(ApplyError::invalid(
            "pool.outlier.consecutive_failures",
            "must be at least 1",
        ));
    }
    if policy.outlier.max_ejection_percent > 100 {
        return Err(ApplyError::invalid(
            "pool.outlier.max_ejection_percent",
            "must be at most 100",
        ));
    }
    if policy.h2_connections == 0 {
        return Err(ApplyError::invalid(
            "pool.h2_connections",
            "must be at least 1",
        ));
    }
    for (field, value) in [
        ("pool.h2_keepalive.interval", policy.h2_keepalive.interval),
        ("pool.h2_keepalive.timeout", policy.h2_keepalive.timeout),
        ("pool.h2_idle_timeout", policy.h2_idle_timeout),
    ] {
        if value.is_zero() {
            return Err(ApplyError::invalid(field, "must be positive"));
        }
        if value > H2Keepalive::MAX {
            return Err(ApplyError::invalid(field, "must be at most 24h"));
        }
    }
    if pool.protocol == UpstreamProtocol::H2 && pool.tls.is_none() {
        return Err(ApplyError::invalid(
            "pool.protocol",
            "\"h2\" needs the pool's tls section (use \"h2c\" for HTTP/2 without TLS)",
        ));
    }
    // The TLS files a pool names are read by the callers' file check (config and the
    // management API) before the change is built: the model checks values, not the disk.
    Ok(())
}

fn check_upstream(u: &Upstream) -> Result<(), ApplyError> {
    check_upstream_address(&u.address).map_err(|r| ApplyError::invalid("address", r))?;
    if u.weight == 0 {
        return Err(ApplyError::invalid("weight", "must be at least 1"));
    }
    Ok(())
}

impl State {
    /// A state with no objects, for the given listeners.
    pub fn empty(listeners: BTreeMap<String, Protocol>) -> State {
        State {
            listeners: Arc::new(listeners),
            ..State::default()
        }
    }

    /// All pools, by name.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values().map(|p| p.as_ref())
    }

    /// The pool called `name`.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name).map(|p| p.as_ref())
    }

    /// All HTTP routes, by name.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.values().map(|r| r.as_ref())
    }

    /// The HTTP route called `name`.
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.get(name).map(|r| r.as_ref())
    }

    /// The HTTP route called `name`, shared (the routing table keeps the same allocation).
    pub fn route_arc(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.get(name)
    }

    /// The HTTP routes whose host is `host` as written (`example.com` or `*.example.com`,
    /// lower-case), in O(log n).
    pub fn routes_with_host<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Route> + 'a {
        self.routes_by_host
            .range((host.to_string(), String::new())..)
            .take_while(move |(h, _)| h == host)
            .filter_map(|(_, name)| self.route(name))
    }

    /// The first HTTP route (by name) that forwards to `pool`, if any: O(log p) when the
    /// pool is unused, a walk over the routes otherwise (an error path).
    fn first_route_of_pool(&self, pool: &str) -> Option<&str> {
        if self.pool_users.get(pool).is_none_or(|n| *n == 0) {
            return None;
        }
        self.routes()
            .find(|r| r.pool == pool)
            .map(|r| r.name.as_str())
    }

    /// Counts one more (`added`) or one fewer route using `pool`.
    fn count_pool_user(&mut self, pool: &str, added: bool) {
        let now = self.pool_users.get(pool).copied().unwrap_or(0);
        let next = if added {
            now + 1
        } else {
            now.saturating_sub(1)
        };
        if next == 0 {
            self.pool_users.remove_mut(pool);
        } else {
            self.pool_users.insert_mut(pool.to_string(), next);
        }
    }

    /// Adds or replaces a route, keeping the host and pool indexes.
    fn put_route(&mut self, route: Route) {
        self.drop_route(&route.name);
        self.add_route(route);
    }

    /// Adds a route whose name is not taken yet, keeping the host and pool indexes.
    fn add_route(&mut self, route: Route) {
        if let Some(host) = &route.host {
            self.routes_by_host
                .insert_mut((host.clone(), route.name.clone()));
        }
        self.count_pool_user(&route.pool, true);
        self.routes.insert_mut(route.name.clone(), Arc::new(route));
    }

    /// Removes a route, keeping the host and pool indexes.
    fn drop_route(&mut self, name: &str) {
        let Some(old) = self.routes.get(name).cloned() else {
            return;
        };
        if let Some(host) = &old.host {
            self.routes_by_host
                .remove_mut(&(host.clone(), old.name.clone()));
        }
        self.count_pool_user(&old.pool, false);
        self.routes.remove_mut(name);
    }

    /// All TCP routes, by name.
    pub fn tcp_routes(&self) -> impl Iterator<Item = &TcpRoute> {
        self.tcp_routes.values().map(|r| r.as_ref())
    }

    /// The TCP route called `name`.
    pub fn tcp_route(&self, name: &str) -> Option<&TcpRoute> {
        self.tcp_routes.get(name).map(|r| r.as_ref())
    }

    /// The run-time membership (discovered and registered upstreams, registered routes).
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Runs `edit` on the run-time membership (copied first if shared: O(1)).
    pub(crate) fn edit_membership(&mut self, edit: impl FnOnce(&mut Membership)) {
        edit(Arc::make_mut(&mut self.membership));
    }

    /// What membership edits touched since the last call.
    pub(crate) fn take_membership_touched(&mut self) -> Touched {
        let changed = Arc::make_mut(&mut self.membership).take_touched();
        Touched {
            pools: changed.pools,
            registered_routes: changed.routes,
            ..Touched::default()
        }
    }

    /// Listener names and protocols known to this state.
    pub fn listeners(&self) -> &BTreeMap<String, Protocol> {
        &self.listeners
    }

    /// The objects owned by `source`, as a document.
    pub fn document(&self, source: Source) -> Document {
        Document {
            pools: self
                .pools()
                .filter(|p| p.source == source)
                .cloned()
                .collect(),
            routes: self
                .routes()
                .filter(|r| r.source == source)
                .cloned()
                .collect(),
            tcp_routes: self
                .tcp_routes()
                .filter(|r| r.source == source)
                .cloned()
                .collect(),
        }
    }

    /// The Changes that turn the objects owned by `source` into `target`: objects missing
    /// from `target` are deleted, new ones created, differing ones updated. Deletions of
    /// routes come before deletions of the pools they use, creations of pools before routes.
    ///
    /// For the config file's objects, an upstream's run-time state (drained by an operator)
    /// is not part of the definition: an upstream the file still lists keeps its state, so
    /// a restart, an upgrade or a reload never puts a drained backend back into rotation.
    pub fn changes_to(&self, target: &Document, source: Source) -> Vec<Change> {
        let current = self.document(source);
        let kept_states;
        let target = if source == Source::Declarative {
            kept_states = Document {
                pools: target
                    .pools
                    .iter()
                    .map(|p| self.with_upstream_states(p))
                    .collect(),
                ..target.clone()
            };
            &kept_states
        } else {
            target
        };
        let mut out = Vec::new();
        out.extend(removed(&current.routes, &target.routes, |name| {
            Change::DeleteRoute { name }
        }));
        out.extend(removed(&current.tcp_routes, &target.tcp_routes, |name| {
            Change::DeleteTcpRoute { name }
        }));
        out.extend(upserted(
            &target.pools,
            source,
            |name| self.pool(name),
            Change::CreatePool,
            Change::UpdatePool,
        ));
        out.extend(upserted(
            &target.routes,
            source,
            |name| self.route(name),
            Change::CreateRoute,
            Change::UpdateRoute,
        ));
        out.extend(upserted(
            &target.tcp_routes,
            source,
            |name| self.tcp_route(name),
            Change::CreateTcpRoute,
            Change::UpdateTcpRoute,
        ));
        out.extend(removed(&current.pools, &target.pools, |name| {
            Change::DeletePool { name }
        }));
        out
    }

    /// `pool` with the run-time state of each upstream the existing pool of that name has.
    fn with_upstream_states(&self, pool: &Pool) -> Pool {
        let mut pool = pool.clone();
        if let Some(existing) = self.pools.get(&pool.name) {
            for u in &mut pool.upstreams {
                if let Some(old) = existing.upstreams.iter().find(|o| o.address == u.address) {
                    u.state = old.state;
                }
            }
        }
        pool
    }

    /// Validates a batch as `Source::Declarative` would apply it, without keeping the result.
    /// On failure returns the index of the offending change.
    pub fn check_batch(&self, changes: &[Change]) -> Result<(), (usize, ApplyError)> {
        let mut copy = self.clone();
        for (i, change) in changes.iter().enumerate() {
            copy.apply_change(change.clone(), Source::Declarative)
                .map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// Applies a batch to this state in memory; on error the state may be partly changed,
    /// so callers work on a copy.
    pub(crate) fn apply_batch(
        &mut self,
        changes: &[Change],
        source: Source,
    ) -> Result<(), ApplyError> {
        self.apply_owned(changes.iter().cloned(), changes.len(), source)
    }

    /// [`apply_batch`](Self::apply_batch) on changes the caller gives up (the writer's
    /// batches: their objects move into the state instead of being copied). `len` is the
    /// batch's length: errors name the offending change as `changes[i].` when it is over 1.
    fn apply_owned(
        &mut self,
        changes: impl Iterator<Item = Change>,
        len: usize,
        source: Source,
    ) -> Result<(), ApplyError> {
        for (i, change) in changes.enumerate() {
            self.apply_change(change, source).map_err(|e| {
                if len > 1 {
                    e.within(&format!("changes[{i}]."))
                } else {
                    e
                }
            })?;
        }
        Ok(())
    }

    fn owned(
        &self,
        kind: &'static str,
        name: &str,
        owner: Source,
        source: Source,
    ) -> Result<(), ApplyError> {
        if owner == Source::Declarative && source != Source::Declarative {
            return Err(ApplyError::Declarative {
                kind,
                name: name.to_string(),
            });
        }
        Ok(())
    }

    fn pool_for_edit(&self, name: &str, source: Source) -> Result<Pool, ApplyError> {
        let pool = self.pools.get(name).ok_or_else(|| ApplyError::NotFound {
            kind: "pool",
            name: name.to_string(),
        })?;
        self.owned("pool", name, pool.source, source)?;
        Ok(pool.as_ref().clone())
    }

    fn apply_change(&mut self, change: Change, source: Source) -> Result<(), ApplyError> {
        match change {
            Change::CreatePool(mut pool) => {
                pool.source = source;
                check_pool(&pool)?;
                if self.pools.contains_key(&pool.name) {
                    return Err(ApplyError::AlreadyExists {
                        kind: "pool",
                        name: pool.name,
                    });
                }
                self.pools.insert_mut(pool.name.clone(), Arc::new(pool));
            }
            Change::UpdatePool(mut pool) => {
                pool.source = source;
                check_pool(&pool)?;
                self.pool_for_edit(&pool.name, source)?;
                self.pools.insert_mut(pool.name.clone(), Arc::new(pool));
            }
            Change::DeletePool { name } => {
                self.pool_for_edit(&name, source)?;
                let user = self
                    .first_route_of_pool(&name)
                    .map(|r| format!("route {r:?}"));
                if let Some(user) = user {
                    return Err(ApplyError::InUse {
                        kind: "pool",
                        name,
                        user,
                    });
                }
                if let Some(r) = self.tcp_routes.values().find(|r| r.pool == name) {
                    return Err(ApplyError::InUse {
                        kind: "pool",
                        name,
                        user: format!("tcp route {:?}", r.name),
                    });
                }
                self.pools.remove_mut(&name);
            }
            Change::AddUpstream { pool, upstream } => {
                check_upstream(&upstream).map_err(|e| e.within("upstream."))?;
                let mut p = self.pool_for_edit(&pool, source)?;
                if p.upstreams.iter().any(|u| u.address == upstream.address) {
                    return Err(ApplyError::AlreadyExists {
                        kind: "upstream",
                        name: format!("{pool}/{}", upstream.address),
                    });
                }
                p.upstreams.push(upstream);
                self.pools.insert_mut(pool, Arc::new(p));
            }
            Change::RemoveUpstream { pool, address } => {
                let mut p = self.pool_for_edit(&pool, source)?;
                let before = p.upstreams.len();
                p.upstreams.retain(|u| u.address != address);
                if p.upstreams.len() == before {
                    return Err(ApplyError::NotFound {
                        kind: "upstream",
                        name: format!("{pool}/{address}"),
                    });
                }
                self.pools.insert_mut(pool, Arc::new(p));
            }
            Change::SetUpstreamState {
                pool,
                address,
                state,
            } => {
                // Draining is operational, so it is allowed on declarative pools too.
                let mut p = self
                    .pools
                    .get(&pool)
                    .map(|p| p.as_ref().clone())
                    .ok_or_else(|| ApplyError::NotFound {
                        kind: "pool",
                        name: pool.clone(),
                    })?;
                let u = p
                    .upstreams
                    .iter_mut()
                    .find(|u| u.address == address)
                    .ok_or_else(|| ApplyError::NotFound {
                        kind: "upstream",
                        name: format!("{pool}/{address}"),
                    })?;
                u.state = state;
                self.pools.insert_mut(pool, Arc::new(p));
            }
            Change::CreateRoute(route) => {
                let route = self.check_route(route, source)?;
                if self.routes.contains_key(&route.name) {
                    return Err(ApplyError::AlreadyExists {
                        kind: "route",
                        name: route.name,
                    });
                }
                self.add_route(route);
            }
            Change::UpdateRoute(route) => {
                let route = self.check_route(route, source)?;
                let old = self
                    .routes
                    .get(&route.name)
                    .ok_or_else(|| ApplyError::NotFound {
                        kind: "route",
                        name: route.name.clone(),
                    })?;
                self.owned("route", &route.name, old.source, source)?;
                self.put_route(route);
            }
            Change::DeleteRoute { name } => {
                let old = self.routes.get(&name).ok_or_else(|| ApplyError::NotFound {
                    kind: "route",
                    name: name.clone(),
                })?;
                self.owned("route", &name, old.source, source)?;
                self.drop_route(&name);
            }
            Change::CreateTcpRoute(route) => {
                let route = self.check_tcp_route(route, source)?;
                if self.tcp_routes.contains_key(&route.name) {
                    return Err(ApplyError::AlreadyExists {
                        kind: "tcp_route",
                        name: route.name,
                    });
                }
                self.check_tcp_route_unique(&route)?;
                self.tcp_routes
                    .insert_mut(route.name.clone(), Arc::new(route));
            }
            Change::UpdateTcpRoute(route) => {
                let route = self.check_tcp_route(route, source)?;
                let old = self
                    .tcp_routes
                    .get(&route.name)
                    .ok_or_else(|| ApplyError::NotFound {
                        kind: "tcp_route",
                        name: route.name.clone(),
                    })?;
                self.owned("tcp_route", &route.name, old.source, source)?;
                self.check_tcp_route_unique(&route)?;
                self.tcp_routes
                    .insert_mut(route.name.clone(), Arc::new(route));
            }
            Change::DeleteTcpRoute { name } => {
                let old = self
                    .tcp_routes
                    .get(&name)
                    .ok_or_else(|| ApplyError::NotFound {
                        kind: "tcp_route",
                        name: name.clone(),
                    })?;
                self.owned("tcp_route", &name, old.source, source)?;
                self.tcp_routes.remove_mut(&name);
            }
        }
        Ok(())
    }

    /// The protocol of listener `name`; `field` names it in the error if there is none.
    fn listener_protocol(&self, field: &'static str, name: &str) -> Result<Protocol, ApplyError> {
        self.listeners
            .get(name)
            .copied()
            .ok_or_else(|| ApplyError::invalid(field, format!("no listener named {name:?}")))
    }

    fn check_route(&self, mut route: Route, source: Source) -> Result<Route, ApplyError> {
        route.source = source;
        check_name(&route.name).map_err(|r| ApplyError::invalid("route.name", r))?;
        let protocol = self.listener_protocol("route.listener", &route.listener)?;
        if !protocol.is_http() {
            return Err(ApplyError::invalid(
                "route.listener",
                format!(
                    "listener {:?} is {}, routes need an http or https listener",
                    route.listener,
                    protocol.as_str()
                ),
            ));
        }
        if let Some(host) = &route.host {
            route.host =
                Some(normalise_host(host).map_err(|r| ApplyError::invalid("route.host", r))?);
        }
        check_path(route.path.as_str()).map_err(|r| ApplyError::invalid("route.path", r))?;
        if route.strip_prefix && matches!(route.path, PathMatch::Exact(_)) {
            return Err(ApplyError::invalid(
                "route.strip_prefix",
                "only applies to path_prefix routes",
            ));
        }
        if !self.pools.contains_key(&route.pool) {
            return Err(ApplyError::invalid(
                "route.pool",
                format!("no pool named {:?}", route.pool),
            ));
        }
        Ok(route)
    }

    fn check_tcp_route(&self, mut route: TcpRoute, source: Source) -> Result<TcpRoute, ApplyError> {
        route.source = source;
        check_name(&route.name).map_err(|r| ApplyError::invalid("tcp_route.name", r))?;
        let protocol = self.listener_protocol("tcp_route.listener", &route.listener)?;
        if !protocol.is_stream() {
            return Err(ApplyError::invalid(
                "tcp_route.listener",
                format!(
                    "listener {:?} is {}, tcp routes need a tcp, tls or tls-passthrough listener",
                    route.listener,
                    protocol.as_str()
                ),
            ));
        }
        if route.sni.is_some() && protocol != Protocol::TlsPassthrough {
            return Err(ApplyError::invalid(
                "tcp_route.sni",
                format!(
                    "listener {:?} is {}; only tls-passthrough listeners route by SNI",
                    route.listener,
                    protocol.as_str()
                ),
            ));
        }
        if let Some(sni) = &route.sni {
            route.sni =
                Some(normalise_host(sni).map_err(|r| ApplyError::invalid("tcp_route.sni", r))?);
        }
        if !self.pools.contains_key(&route.pool) {
            return Err(ApplyError::invalid(
                "tcp_route.pool",
                format!("no pool named {:?}", route.pool),
            ));
        }
        Ok(route)
    }

    /// A listener has one TCP route per SNI pattern (and one without): the connection's
    /// destination must never depend on which route was created first.
    fn check_tcp_route_unique(&self, route: &TcpRoute) -> Result<(), ApplyError> {
        if let Some(other) = self
            .tcp_routes
            .values()
            .find(|r| r.listener == route.listener && r.sni == route.sni && r.name != route.name)
        {
            let (field, what) = match &route.sni {
                Some(sni) => (
                    "tcp_route.sni",
                    format!(
                        "listener {:?} already routes SNI {sni:?} with tcp route {:?}",
                        route.listener, other.name
                    ),
                ),
                None => (
                    "tcp_route.listener",
                    format!(
                        "listener {:?} already has tcp route {:?}",
                        route.listener, other.name
                    ),
                ),
            };
            return Err(ApplyError::invalid(field, what));
        }
        Ok(())
    }
}

/// What readers of the state see: the state at one revision.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases by one per committed batch.
    pub revision: u64,
    /// The desired state.
    pub state: State,
}

/// The step the writer publishes every new state through, before it answers: the data
/// path's compiled view (the routing table) is built by an implementation the composition
/// root injects, so the state knows nothing of what is built from it.
pub trait Publish: Send + 'static {
    /// Makes `state` at `revision` visible. `touched` names what changed since the last
    /// publish (empty: only the revision moved); `None` asks for everything to be compiled.
    fn publish(&mut self, revision: u64, state: &State, touched: Option<&Touched>);

    /// Frees what earlier publishes replaced, once no reader holds it (see [`Retired`]).
    /// The writer calls it after it answered; `true` means something is still held and
    /// the writer calls again a little later.
    fn reclaim(&mut self) -> bool {
        false
    }

    /// Gives up what is still held after the writer waited: its readers free it.
    fn release(&mut self) {}
}

/// Told how long the writer took per applied batch (validate, SQLite commit, publish).
pub type WriteObserver = Box<dyn Fn(std::time::Duration) + Send>;

/// What the composition root gives the writer: where to publish, and who watches it.
pub struct Outputs {
    /// The compile step (the routing table).
    pub publish: Box<dyn Publish>,
    /// The write-latency metric.
    pub write_latency: WriteObserver,
}

/// A write to the rows kept beside the model objects (TLS certificates, the ACME account,
/// the allowlist): run by the single writer inside one transaction; returns whether it
/// changed anything (then the revision moves on with it).
pub type RowWrite = Box<dyn FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<bool> + Send>;

enum Request {
    Apply(ApplyRequest),
    Rows {
        write: RowWrite,
        reply: oneshot::Sender<Result<Option<u64>, ApplyError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
    Membership {
        update: MembershipUpdate,
        reply: oneshot::Sender<()>,
    },
    Reopen {
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
}

struct ApplyRequest {
    changes: Vec<Change>,
    source: Source,
    reply: oneshot::Sender<Result<u64, ApplyError>>,
}

/// A cheap, cloneable handle to the state: read snapshots, apply batches.
#[derive(Clone)]
pub struct StateHandle {
    /// Unbounded: every sender waits for its answer, so the queue never holds more than
    /// one request per waiting caller; and queueing never waits, so a caller can queue
    /// under its own lock and wait for the answer after releasing it.
    tx: mpsc::UnboundedSender<Request>,
    current: Arc<ArcSwap<Snapshot>>,
}

impl std::fmt::Debug for StateHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateHandle")
            .field("revision", &self.current.load().revision)
            .finish()
    }
}

/// The SQLite file inside a state directory.
pub fn database_path(state_dir: &Path) -> PathBuf {
    state_dir.join("proxy.db")
}

impl StateHandle {
    /// Opens (or creates) the store in `state_dir`, reconciles the declarative objects with
    /// `declarative`, publishes the result through `outputs` and starts the writer.
    /// `listeners` are the listeners routes may name.
    pub fn open(
        state_dir: &Path,
        listeners: BTreeMap<String, Protocol>,
        declarative: &[Change],
        mut outputs: Outputs,
    ) -> Result<StateHandle, StoreError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| StoreError::Io(state_dir.display().to_string(), e))?;
        let db_path = database_path(state_dir);
        let mut store = store::Store::open(&db_path)?;
        let (mut state, mut revision) = store.load(listeners)?;

        // Reconcile the config file: its objects become exactly `declarative`.
        let mut target = State::empty(state.listeners().clone());
        target
            .apply_batch(declarative, Source::Declarative)
            .map_err(StoreError::Reconcile)?;
        let changes = state.changes_to(&target.document(Source::Declarative), Source::Declarative);
        if !changes.is_empty() {
            let mut next = state.clone();
            next.apply_batch(&changes, Source::Declarative)
                .map_err(StoreError::Reconcile)?;
            let mut touched = Touched::default();
            changes.iter().for_each(|c| touched.add(c));
            revision += 1;
            store.commit(&next, &touched, revision)?;
            state = next;
        }

        outputs.publish.publish(revision, &state, None);
        let current = Arc::new(ArcSwap::from_pointee(Snapshot { revision, state }));
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            path: db_path,
            store: Some(store),
            current: current.clone(),
            retired: Retired::new(by_others),
            outputs,
        };
        std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Io("state writer thread".into(), e))?;
        Ok(StateHandle { tx, current })
    }

    /// The current snapshot (one atomic load; never blocks).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Applies a batch atomically: all of it is validated, committed and published, or none.
    /// Returns the new revision (unchanged if the batch was empty).
    pub async fn apply(&self, changes: Vec<Change>, source: Source) -> Result<u64, ApplyError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Apply(ApplyRequest {
                changes,
                source,
                reply,
            }))
            .map_err(|_| ApplyError::Unavailable("the state writer has stopped".into()))?;
        rx.await
            .map_err(|_| ApplyError::Unavailable("the state writer has stopped".into()))?
    }

    /// Writes rows beside the model objects (see [`RowWrite`]) through the single writer,
    /// so they share the revision sequence and stop with the writer (after a handoff, the
    /// old process writes nothing). Returns the new revision, or `None` if the write
    /// changed nothing.
    pub async fn write_rows(&self, write: RowWrite) -> Result<Option<u64>, ApplyError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Rows { write, reply })
            .map_err(|_| ApplyError::Unavailable("the state writer has stopped".into()))?;
        rx.await
            .map_err(|_| ApplyError::Unavailable("the state writer has stopped".into()))?
    }

    /// Changes the run-time membership and publishes it, without a store write. Runs on
    /// the writer, so it never races a batch. Works while the store is closed.
    pub async fn update_membership(&self, update: impl FnOnce(&mut Membership) + Send + 'static) {
        self.queue_membership(update).await
    }

    /// Queues a membership change now, in call order with every other request, and
    /// returns a future that resolves once it is published. A caller holding a lock can
    /// queue under it and wait after releasing it: the order is kept and the lock is never
    /// held across the writer's round trip.
    pub fn queue_membership(
        &self,
        update: impl FnOnce(&mut Membership) + Send + 'static,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let request = Request::Membership {
            update: Box::new(update),
            reply,
        };
        let queued = self.tx.send(request).is_ok();
        async move {
            if queued {
                let _ = rx.await;
            }
        }
    }

    /// Replaces the upstreams `origin` contributes to `pool` (an empty list removes them).
    pub async fn set_members(&self, pool: &str, origin: Origin, upstreams: Vec<Upstream>) {
        let pool = pool.to_string();
        self.update_membership(move |m| m.set_members(&pool, origin, upstreams))
            .await;
    }

    /// Stops taking writes and closes the database (for a handoff or shutdown). Later
    /// `apply` calls fail with `Unavailable` until [`reopen`](Self::reopen).
    pub async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Request::Close { reply }).is_ok() {
            let _ = rx.await;
        }
    }

    /// Opens the database again after [`close`](Self::close) (a handoff that failed) and
    /// publishes what it holds, in case the other process committed something.
    pub async fn reopen(&self) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || {
            StoreError::Io(
                "state writer".into(),
                std::io::Error::other("the state writer has stopped"),
            )
        };
        self.tx
            .send(Request::Reopen { reply })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

/// Most requests taken from the queue at once: bounds one transaction and one publish.
const MAX_GROUP: usize = 1024;

/// The writer thread: owns the store, the only one to publish snapshots.
struct Writer {
    path: PathBuf,
    /// `None` while closed (handed over or shutting down).
    store: Option<store::Store>,
    current: Arc<ArcSwap<Snapshot>>,
    /// State snapshots replaced and not freed yet.
    retired: Retired<Snapshot>,
    outputs: Outputs,
}

impl Writer {
    /// Publishes `state` at `revision` through the compile step, then as the state's own
    /// snapshot: both are visible before the writer answers.
    fn publish(&mut self, revision: u64, state: State, touched: Option<&Touched>) {
        self.outputs.publish.publish(revision, &state, touched);
        let old = self.current.swap(Arc::new(Snapshot { revision, state }));
        self.retired.push(old);
    }

    /// Frees the replaced snapshots nobody reads any more; whether some are still read.
    fn reclaim(&mut self) -> bool {
        let state = self.retired.reclaim();
        let routing = self.outputs.publish.reclaim();
        state || routing
    }

    /// The next request. With the queue empty, the replaced snapshots are freed first:
    /// readers that still hold one get a few short waits (requests hold a snapshot for
    /// microseconds), then the rest is left to them.
    fn next_request(&mut self, rx: &mut mpsc::UnboundedReceiver<Request>) -> Option<Request> {
        let mut held = self.reclaim();
        let mut steps = 0;
        while held && steps < retired::WAIT_STEPS {
            match rx.try_recv() {
                Ok(request) => return Some(request),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            std::thread::sleep(retired::WAIT_STEP);
            held = self.reclaim();
            steps += 1;
        }
        if held {
            self.retired.release();
            self.outputs.publish.release();
        }
        rx.blocking_recv()
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        let mut queue = std::collections::VecDeque::new();
        while let Some(first) = self.next_request(&mut rx) {
            // Everything queued meanwhile is handled together: runs of batches share one
            // transaction, runs of membership edits one publish.
            queue.push_back(first);
            while queue.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(request) => queue.push_back(request),
                    Err(_) => break,
                }
            }
            while let Some(request) = queue.pop_front() {
                match request {
                    Request::Apply(first) => {
                        let mut group = vec![first];
                        while let Some(Request::Apply(_)) = queue.front() {
                            if let Some(Request::Apply(next)) = queue.pop_front() {
                                group.push(next);
                            }
                        }
                        self.apply(group);
                    }
                    Request::Membership { update, reply } => {
                        let mut group = vec![(update, reply)];
                        while let Some(Request::Membership { .. }) = queue.front() {
                            if let Some(Request::Membership { update, reply }) = queue.pop_front() {
                                group.push((update, reply));
                            }
                        }
                        self.publish_membership(group);
                    }
                    Request::Rows { write, reply } => {
                        let _ = reply.send(self.write_rows(write));
                    }
                    Request::Close { reply } => {
                        self.store = None;
                        let _ = reply.send(());
                    }
                    Request::Reopen { reply } => {
                        let result = self.reopen();
                        let _ = reply.send(result);
                    }
                }
            }
        }
    }

    /// Validates each batch on top of the ones before it, commits the valid ones in one
    /// transaction with one revision each, publishes once, then answers.
    fn apply(&mut self, group: Vec<ApplyRequest>) {
        let started = std::time::Instant::now();
        let Some(store) = self.store.as_mut() else {
            for request in group {
                let _ = request.reply.send(Err(closed()));
            }
            return;
        };
        let snap = self.current.load_full();
        let mut next = snap.state.clone();
        let mut revision = snap.revision;
        let mut touched = Touched::default();
        let mut committed = Vec::new();
        for request in group {
            if request.changes.is_empty() {
                let _ = request.reply.send(Ok(revision));
                continue;
            }
            let mut named = Touched::default();
            request.changes.iter().for_each(|c| named.add(c));
            let mut candidate = next.clone();
            let len = request.changes.len();
            match candidate.apply_owned(request.changes.into_iter(), len, request.source) {
                Ok(()) => {
                    next = candidate;
                    revision += 1;
                    touched.merge(named);
                    committed.push((request.reply, revision));
                }
                Err(e) => {
                    let _ = request.reply.send(Err(e));
                }
            }
        }
        if committed.is_empty() {
            return;
        }
        if let Err(e) = store.commit(&next, &touched, revision) {
            for (reply, _) in committed {
                let _ = reply.send(Err(ApplyError::Store(e.to_string())));
            }
            return;
        }
        self.publish(revision, next, Some(&touched));
        let elapsed = started.elapsed();
        for (reply, revision) in committed {
            (self.outputs.write_latency)(elapsed);
            let _ = reply.send(Ok(revision));
        }
    }

    /// Commits a row write and, when it changed something, publishes the same state at
    /// the next revision.
    fn write_rows(&mut self, write: RowWrite) -> Result<Option<u64>, ApplyError> {
        let store = self.store.as_mut().ok_or_else(closed)?;
        let snap = self.current.load_full();
        let revision = store
            .commit_rows(write, snap.revision)
            .map_err(|e| ApplyError::Store(e.to_string()))?;
        if revision == snap.revision {
            return Ok(None);
        }
        self.publish(revision, snap.state.clone(), Some(&Touched::default()));
        Ok(Some(revision))
    }

    /// Runs membership edits in order and publishes their result once: same revision and
    /// stored state, only the touched pools and registered routes recompiled.
    fn publish_membership(&mut self, group: Vec<(MembershipUpdate, oneshot::Sender<()>)>) {
        let snap = self.current.load_full();
        let mut next = snap.state.clone();
        let mut replies = Vec::with_capacity(group.len());
        for (update, reply) in group {
            next.edit_membership(update);
            replies.push(reply);
        }
        let touched = next.take_membership_touched();
        self.publish(snap.revision, next, Some(&touched));
        for reply in replies {
            let _ = reply.send(());
        }
    }

    /// Opens the store again and publishes what it holds, keeping the run-time membership.
    fn reopen(&mut self) -> Result<u64, StoreError> {
        let mut store = store::Store::open(&self.path)?;
        let snap = self.current.load_full();
        let (mut state, revision) = store.load(snap.state.listeners().clone())?;
        state.membership = snap.state.membership.clone();
        if revision != snap.revision {
            self.publish(revision, state, None);
        }
        self.store = Some(store);
        Ok(revision)
    }
}

fn closed() -> ApplyError {
    ApplyError::Unavailable(
        "the state store is closed (shutting down or handed over to a new process)".into(),
    )
}

/// A change to the run-time membership, run on the writer thread.
type MembershipUpdate = Box<dyn FnOnce(&mut Membership) + Send>;

/// A named object of a [`Document`], owned by one [`Source`].
trait Owned: Clone + PartialEq {
    fn name(&self) -> &str;
    fn owned_by(&self, source: Source) -> Self;
}

macro_rules! owned {
    ($($t:ty),*) => {$(
        impl Owned for $t {
            fn name(&self) -> &str {
                &self.name
            }
            fn owned_by(&self, source: Source) -> Self {
                Self { source, ..self.clone() }
            }
        }
    )*};
}
owned!(Pool, Route, TcpRoute);

/// Deletions of the objects of `current` that `target` no longer has.
fn removed<T: Owned>(current: &[T], target: &[T], delete: fn(String) -> Change) -> Vec<Change> {
    let kept: std::collections::BTreeSet<&str> = target.iter().map(Owned::name).collect();
    current
        .iter()
        .filter(|o| !kept.contains(o.name()))
        .map(|o| delete(o.name().to_string()))
        .collect()
}

/// Creations of the objects of `target` that do not exist yet and updates of those that
/// differ from what `existing` finds, all owned by `source`.
fn upserted<'a, T: Owned + 'a>(
    target: &[T],
    source: Source,
    existing: impl Fn(&str) -> Option<&'a T>,
    create: fn(T) -> Change,
    update: fn(T) -> Change,
) -> Vec<Change> {
    target
        .iter()
        .filter_map(|o| {
            let o = o.owned_by(source);
            match existing(o.name()) {
                None => Some(create(o)),
                Some(old) if *old != o => Some(update(o)),
                Some(_) => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listeners() -> BTreeMap<String, Protocol> {
        [
            ("web".to_string(), Protocol::Http),
            ("db".to_string(), Protocol::Tcp),
        ]
        .into()
    }

    fn pool(name: &str) -> Pool {
        Pool {
            name: name.into(),
            source: Source::Api,
            balance: Balance::RoundRobin,
            upstreams: vec![Upstream::new("127.0.0.1:9001")],
            health: None,
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            tls: None,
            policy: Default::default(),
            protocol: Default::default(),
        }
    }

    fn route(name: &str, pool: &str) -> Route {
        Route {
            name: name.into(),
            source: Source::Api,
            listener: "web".into(),
            host: Some("Example.COM".into()),
            path: PathMatch::Prefix("/docs".into()),
            pool: pool.into(),
            strip_prefix: false,
            priority: 0,
        }
    }

    #[test]
    fn batch_applies_in_order_and_normalises_hosts() {
        let mut s = State::empty(listeners());
        s.apply_batch(
            &[
                Change::CreatePool(pool("v1")),
                Change::CreateRoute(route("r", "v1")),
            ],
            Source::Api,
        )
        .expect("valid");
        assert_eq!(
            s.route("r").and_then(|r| r.host.as_deref()),
            Some("example.com")
        );
    }

    #[test]
    fn errors_name_the_field_and_the_change() {
        let mut s = State::empty(listeners());
        let e = s
            .apply_batch(
                &[
                    Change::CreatePool(pool("v1")),
                    Change::CreateRoute(route("r", "v2")),
                ],
                Source::Api,
            )
            .expect_err("missing pool");
        assert_eq!(
            e,
            ApplyError::invalid("changes[1].route.pool", "no pool named \"v2\"")
        );
    }

    #[test]
    fn api_cannot_touch_declarative_objects() {
        let mut s = State::empty(listeners());
        s.apply_batch(&[Change::CreatePool(pool("v1"))], Source::Declarative)
            .expect("valid");
        let e = s
            .apply_batch(&[Change::DeletePool { name: "v1".into() }], Source::Api)
            .expect_err("owned");
        assert!(matches!(e, ApplyError::Declarative { .. }), "{e:?}");
    }

    #[test]
    fn pool_in_use_cannot_be_deleted() {
        let mut s = State::empty(listeners());
        s.apply_batch(
            &[
                Change::CreatePool(pool("v1")),
                Change::CreateRoute(route("r", "v1")),
            ],
            Source::Api,
        )
        .expect("valid");
        let e = s
            .apply_batch(&[Change::DeletePool { name: "v1".into() }], Source::Api)
            .expect_err("in use");
        assert!(
            matches!(&e, ApplyError::InUse { user, .. } if user == "route \"r\""),
            "{e:?}"
        );
        // Moving the route to another pool frees the first one.
        let mut moved = route("r", "v2");
        moved.host = None;
        s.apply_batch(
            &[Change::CreatePool(pool("v2")), Change::UpdateRoute(moved)],
            Source::Api,
        )
        .expect("valid");
        s.apply_batch(&[Change::DeletePool { name: "v1".into() }], Source::Api)
            .expect("unused now");
        let e = s
            .apply_batch(&[Change::DeletePool { name: "v2".into() }], Source::Api)
            .expect_err("in use");
        assert!(matches!(e, ApplyError::InUse { .. }), "{e:?}");
    }

    #[test]
    fn changes_to_round_trips() {
        // Replaying the generated changes onto an empty state rebuilds an equal document.
        let mut s = State::empty(listeners());
        s.apply_batch(
            &[
                Change::CreatePool(pool("v1")),
                Change::CreatePool(pool("v2")),
                Change::CreateRoute(route("a", "v1")),
                Change::CreateRoute(route("b", "v2")),
                Change::CreateTcpRoute(TcpRoute {
                    name: "t".into(),
                    source: Source::Api,
                    listener: "db".into(),
                    pool: "v1".into(),
                    sni: None,
                }),
            ],
            Source::Api,
        )
        .expect("valid");
        let doc = s.document(Source::Api);
        let empty = State::empty(listeners());
        let mut rebuilt = empty.clone();
        rebuilt
            .apply_batch(&empty.changes_to(&doc, Source::Api), Source::Api)
            .expect("replay");
        assert_eq!(rebuilt.document(Source::Api), doc);
        // And going back to an empty document deletes everything, routes before pools.
        let mut emptied = s.clone();
        emptied
            .apply_batch(
                &s.changes_to(&Document::default(), Source::Api),
                Source::Api,
            )
            .expect("delete all");
        assert_eq!(emptied.document(Source::Api), Document::default());
    }

    #[test]
    fn reconciling_the_file_keeps_a_drained_upstream_drained() {
        let mut file_pool = pool("v1");
        file_pool.upstreams.push(Upstream::new("127.0.0.1:9002"));
        let mut s = State::empty(listeners());
        s.apply_batch(
            &[Change::CreatePool(file_pool.clone())],
            Source::Declarative,
        )
        .expect("valid");
        s.apply_batch(
            &[Change::SetUpstreamState {
                pool: "v1".into(),
                address: "127.0.0.1:9001".into(),
                state: UpstreamState::Draining,
            }],
            Source::Api,
        )
        .expect("drain");
        let file = Document {
            pools: vec![file_pool],
            ..Document::default()
        };
        // Unchanged file: nothing to do.
        assert_eq!(s.changes_to(&file, Source::Declarative), Vec::new());
        // A changed pool is updated, with the drain kept.
        let mut edited = file.clone();
        edited.pools[0].balance = Balance::LeastConn;
        let changes = s.changes_to(&edited, Source::Declarative);
        s.apply_batch(&changes, Source::Declarative)
            .expect("reconcile");
        let states: Vec<_> = s
            .pool("v1")
            .map(|p| p.upstreams.iter().map(|u| u.state).collect())
            .unwrap_or_default();
        assert_eq!(states, [UpstreamState::Draining, UpstreamState::Active]);
    }

    #[test]
    fn bad_upstream_addresses_are_refused() {
        for bad in ["", "127.0.0.1", "host:0", "host:x", "a b:80", "http://x:80"] {
            assert!(check_upstream_address(bad).is_err(), "{bad}");
        }
        for good in ["127.0.0.1:80", "[::1]:8080", "backend.internal:9000"] {
            assert!(check_upstream_address(good).is_ok(), "{good}");
        }
    }
}
