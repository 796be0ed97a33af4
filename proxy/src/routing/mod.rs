//! The compiled routing table: `lookup(listener, host, path)` in time independent of the
//! number of routes, and edits in time proportional to what they change.
//!
//! Hosts are hash lookups (exact, then each wildcard suffix of the name, then any host);
//! paths are a hash lookup for exact paths, then one hash lookup per distinct prefix length
//! (longest first). So 100,000 per-path rules cost the same per request as 10.
//!
//! Listeners and pools are persistent hash maps; hosts and paths, which a request walks and
//! which grow to 100,000 entries, are [`FlatMap`]s (sharded flat hash tables: a lookup loads
//! the list of shards and the slot its key's hash names, where a hash trie of that size
//! takes a dozen dependent loads). Both share what an edit
//! does not touch, so a table for the next revision shares everything but the edited paths
//! with the current one: [`RoutingTable::update`] copies the table in O(1) and touches only
//! the host indexes of the routes a batch names (one shard of each). Routes hold a [`PoolSlot`], not a pool: a membership, drain, health
//! or pool-definition change swaps the one pool in its slot and never touches a route (the
//! route/endpoint split of Envoy's RDS and EDS).

mod filter;
mod flat;
mod publish;

use std::any::Any;
use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use rpds::HashTrieMapSync;

use filter::KeyFilter;
use flat::FlatMap;

use crate::state::{
    default_connect_timeout, default_response_timeout, Balance, OnChange, Origin, PathMatch, Pool,
    RegisteredRoute, Route, Source, State, Touched, Upstream,
};
use crate::upstream::{Hold, PoolRuntime};

pub use flat::{KeyHash, KeyHasher};
pub use publish::{Published, Snapshot};

/// What a layer above routing makes for a route as its entry is made (telemetry: the
/// route's metric series), kept in the entry's [`Attachment`]. Given to
/// [`Published::attach_with`].
pub type Attacher = Arc<dyn Fn(&Route) -> Arc<dyn Any + Send + Sync> + Send + Sync>;

/// Where routes find their pool: the current [`PoolRuntime`], swapped whole when the pool's
/// definition or membership changes. Requests load it once (one atomic operation).
pub type PoolSlot = ArcSwap<PoolRuntime>;

/// A matched route with the slot of the pool that serves it.
#[derive(Debug)]
pub struct RouteEntry {
    /// The route definition.
    pub route: Arc<Route>,
    pool: Arc<PoolSlot>,
    /// A route a service registered (not declared in the config file or the API).
    pub registered: bool,
    /// The route's request metrics: made with the entry once telemetry gave its
    /// [`Attacher`], otherwise found on the route's first request.
    series: Attachment,
    /// How many bytes of a matched path `strip_prefix` takes off (see [`strip`](Self::strip)):
    /// at most 1024 (a route's path is no longer), kept in four bytes so that the entry
    /// with its reference counts fills one 64-byte block, a cache line, rather than two
    /// (a request spread over 100,000 routes finds its entry in neither cache).
    strip: Option<NonZeroU32>,
}

impl RouteEntry {
    fn new(
        route: Arc<Route>,
        pool: Arc<PoolSlot>,
        registered: bool,
        attach: Option<&Attacher>,
    ) -> RouteEntry {
        let strip = match (&route.path, route.strip_prefix) {
            (PathMatch::Prefix(prefix), true) if prefix != "/" => {
                // A checked path is at most 1024 bytes. A prefix of slashes alone keeps
                // none, and taking nothing off is what no strip does.
                u32::try_from(prefix.trim_end_matches('/').len())
                    .ok()
                    .and_then(NonZeroU32::new)
            }
            _ => None,
        };
        let series = match attach {
            Some(attach) => Attachment(OnceLock::from(attach(&route))),
            None => Attachment::default(),
        };
        RouteEntry {
            route,
            pool,
            registered,
            series,
            strip,
        }
    }

    /// The path forwarded for `path` (a target this route matched, with its query): the
    /// matched prefix taken off when the route strips it (`/api/` and `/api/v1?x` ->
    /// `/v1?x`; what is left always starts with `/`), `None` when the path goes as it
    /// came. Read from the entry, so a request does not load the route definition for it.
    pub fn strip(&self, path: &str) -> Option<String> {
        let strip = usize::try_from(self.strip?.get()).unwrap_or(usize::MAX);
        let rest = path.get(strip..).unwrap_or("");
        Some(if rest.starts_with('/') {
            rest.to_string()
        } else {
            format!("/{rest}")
        })
    }

    /// The pool that serves the route now.
    pub fn pool(&self) -> Arc<PoolRuntime> {
        self.pool.load_full()
    }

    /// The slot the route's pool is swapped in.
    pub fn pool_slot(&self) -> &Arc<PoolSlot> {
        &self.pool
    }

    /// Where the route's request metrics are kept.
    pub fn series_slot(&self) -> &Attachment {
        &self.series
    }
}

/// What a layer above routing keeps with a route entry, made with the entry (see
/// [`Attacher`]) or on first use: telemetry keeps the route's metric series here (see
/// `Metrics::http_request_on`), so a request finds them without looking them up by name.
/// Routing only holds it; it lives as long as the entry, so a changed route starts with a
/// new one.
#[derive(Default)]
pub struct Attachment(OnceLock<Arc<dyn Any + Send + Sync>>);

impl Attachment {
    /// What is attached, made by `make` if nothing is yet.
    pub fn get_or_init(
        &self,
        make: impl FnOnce() -> Arc<dyn Any + Send + Sync>,
    ) -> &Arc<dyn Any + Send + Sync> {
        self.0.get_or_init(make)
    }

    /// What is attached, if anything is yet.
    pub fn get(&self) -> Option<&Arc<dyn Any + Send + Sync>> {
        self.0.get()
    }
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("set", &self.0.get().is_some())
            .finish()
    }
}

/// The routes with one host and one path pattern, best first: higher priority, then the
/// smaller name. Almost always one, kept in the table's bucket itself (a lookup loads the
/// entry, not a list first).
#[derive(Debug, Clone)]
enum Candidates {
    One(Arc<RouteEntry>),
    Many(Arc<[Arc<RouteEntry>]>),
}

impl Candidates {
    /// `list` (not empty) ranked: a lone route kept as it is.
    fn ranked(list: Vec<Arc<RouteEntry>>) -> Candidates {
        match <[Arc<RouteEntry>; 1]>::try_from(list) {
            Ok([entry]) => Candidates::One(entry),
            Err(mut list) => {
                list.sort_by(|a, b| rank(b).cmp(&rank(a)));
                Candidates::Many(list.into())
            }
        }
    }

    fn all(&self) -> &[Arc<RouteEntry>] {
        match self {
            Candidates::One(entry) => std::slice::from_ref(entry),
            Candidates::Many(list) => list,
        }
    }

    fn best(&self) -> Option<&Arc<RouteEntry>> {
        self.all().first()
    }

    /// These candidates with `entry` in place of any route of the same name.
    fn with(&self, entry: Arc<RouteEntry>) -> Candidates {
        let mut list: Vec<Arc<RouteEntry>> = self
            .all()
            .iter()
            .filter(|e| e.route.name != entry.route.name)
            .cloned()
            .collect();
        list.push(entry);
        Candidates::ranked(list)
    }

    /// These candidates without the route called `name`; `None` when nothing is left.
    fn without(&self, name: &str) -> Option<Candidates> {
        let list: Vec<Arc<RouteEntry>> = self
            .all()
            .iter()
            .filter(|e| e.route.name != name)
            .cloned()
            .collect();
        (!list.is_empty()).then(|| Candidates::ranked(list))
    }
}

/// Who wins between routes with the same host and path: a declared route over a registered
/// one whatever their priorities (a registration never takes a declared route's traffic),
/// then the higher priority, then the smaller name.
fn rank(e: &RouteEntry) -> (bool, i32, std::cmp::Reverse<&str>) {
    (
        !e.registered,
        e.route.priority,
        std::cmp::Reverse(e.route.name.as_str()),
    )
}

/// The routes of one host (or of the wildcard suffix, or of any host) by path.
#[derive(Debug, Clone, Default)]
struct PathIndex {
    exact: FlatMap<Candidates>,
    prefix: FlatMap<Candidates>,
    /// Which prefixes `prefix` may hold, once it is large: a path under none of them is
    /// looked up once per prefix length, and most of those lookups end here.
    prefix_filter: KeyFilter,
    /// Distinct prefix lengths, longest first, each with how many prefixes have it.
    prefix_lengths: Vec<(usize, usize)>,
}

impl PathIndex {
    fn map(&mut self, path: &PathMatch) -> &mut FlatMap<Candidates> {
        match path {
            PathMatch::Exact(_) => &mut self.exact,
            PathMatch::Prefix(_) => &mut self.prefix,
        }
    }

    fn insert(&mut self, entry: Arc<RouteEntry>) {
        let path = entry.route.path.clone();
        let key = path.as_str();
        let map = self.map(&path);
        let (candidates, new_prefix) = match map.get(key) {
            Some(c) => (c.with(entry), None),
            None => {
                let new_prefix = match &path {
                    PathMatch::Prefix(p) => {
                        self.count_length(p.len(), true);
                        Some(p)
                    }
                    PathMatch::Exact(_) => None,
                };
                (Candidates::One(entry), new_prefix)
            }
        };
        self.map(&path).insert(key, candidates);
        if let Some(p) = new_prefix {
            let prefix = &self.prefix;
            self.prefix_filter
                .added(prefix.hash(p), prefix.len(), || prefix.hashes());
        }
    }

    fn remove(&mut self, route: &Route) {
        let key = route.path.as_str();
        let map = self.map(&route.path);
        let Some(candidates) = map.get(key) else {
            return;
        };
        match candidates.without(&route.name) {
            Some(rest) => map.insert(key, rest),
            None => {
                map.remove(key);
                if let PathMatch::Prefix(p) = &route.path {
                    self.count_length(p.len(), false);
                    let prefix = &self.prefix;
                    self.prefix_filter.removed(prefix.len(), || prefix.hashes());
                }
            }
        }
    }

    fn count_length(&mut self, len: usize, added: bool) {
        match self.prefix_lengths.iter().position(|(l, _)| *l <= len) {
            Some(i) if self.prefix_lengths[i].0 == len => {
                let count = &mut self.prefix_lengths[i].1;
                if added {
                    *count += 1;
                } else {
                    *count -= 1;
                    if *count == 0 {
                        self.prefix_lengths.remove(i);
                    }
                }
            }
            Some(i) if added => self.prefix_lengths.insert(i, (len, 1)),
            None if added => self.prefix_lengths.push((len, 1)),
            _ => {}
        }
    }

    fn lookup(&self, path: &str) -> Option<&Arc<RouteEntry>> {
        if let Some(c) = self.exact.get(path) {
            return c.best();
        }
        for &(len, _) in &self.prefix_lengths {
            if len <= path.len() && path.is_char_boundary(len) {
                let key = &path[..len];
                let hash = self.prefix.hash(key);
                if !self.prefix_filter.may_hold(hash) {
                    continue;
                }
                if let Some(c) = self.prefix.get_hashed(key, hash) {
                    return c.best();
                }
            }
        }
        None
    }

    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefix.is_empty()
    }

    fn entries(&self) -> impl Iterator<Item = &Arc<RouteEntry>> {
        self.exact
            .values()
            .chain(self.prefix.values())
            .flat_map(Candidates::all)
    }
}

/// Where a route's host puts it within a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostName {
    Exact(Box<str>),
    /// The suffix including its leading dot: `*.example.com` -> `.example.com`.
    Wildcard(Box<str>),
    Any,
}

impl HostName {
    /// Whether `route` belongs under this host (compared without allocating).
    fn holds(&self, route: &Route) -> bool {
        match (self, route.host.as_deref()) {
            (HostName::Any, None) => true,
            (HostName::Exact(h), Some(host)) => **h == *host,
            (HostName::Wildcard(s), Some(host)) => host.strip_prefix('*') == Some(&**s),
            _ => false,
        }
    }

    fn of(route: &Route) -> HostName {
        match route.host.as_deref() {
            None => HostName::Any,
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => HostName::Wildcard(suffix.into()),
                None => HostName::Exact(h.into()),
            },
        }
    }
}

/// The HTTP routes of one listener, by host.
#[derive(Debug, Clone, Default)]
struct HostIndex {
    exact: FlatMap<Arc<PathIndex>>,
    wildcard: FlatMap<Arc<PathIndex>>,
    any: Arc<PathIndex>,
}

impl HostIndex {
    fn lookup(&self, host: &str, path: &str) -> Option<&Arc<RouteEntry>> {
        if let Some(found) = self.exact.get(host).and_then(|p| p.lookup(path)) {
            return Some(found);
        }
        if !self.wildcard.is_empty() {
            // Longest suffix first: for a.b.example.com try .b.example.com, then .example.com, ...
            for (i, _) in host.match_indices('.') {
                if let Some(found) = self.wildcard.get(&host[i..]).and_then(|p| p.lookup(path)) {
                    return Some(found);
                }
            }
        }
        self.any.lookup(path)
    }

    /// Takes the path index of `host` out (an empty one if there is none), so that the
    /// caller holds the only reference this table had and edits it without another copy.
    fn take_paths(&mut self, host: &HostName) -> Arc<PathIndex> {
        let (map, key) = match host {
            HostName::Any => return std::mem::take(&mut self.any),
            HostName::Exact(h) => (&mut self.exact, h),
            HostName::Wildcard(s) => (&mut self.wildcard, s),
        };
        let paths = map.get(key).cloned().unwrap_or_default();
        map.remove(key);
        paths
    }

    /// Puts back what [`take_paths`](Self::take_paths) took (dropped if it is empty now).
    fn put_paths(&mut self, host: HostName, paths: Arc<PathIndex>) {
        let (map, key) = match host {
            HostName::Any => {
                self.any = paths;
                return;
            }
            HostName::Exact(h) => (&mut self.exact, h),
            HostName::Wildcard(s) => (&mut self.wildcard, s),
        };
        if !paths.is_empty() {
            map.insert(&key, paths);
        }
    }

    fn is_empty(&self) -> bool {
        self.any.is_empty() && self.exact.is_empty() && self.wildcard.is_empty()
    }

    fn entries(&self) -> impl Iterator<Item = &Arc<RouteEntry>> {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .chain(std::iter::once(&self.any))
            .flat_map(|paths| paths.entries())
    }
}

/// TCP routes: the pool of each listener, and `tls-passthrough` routes by SNI. Few, so
/// rebuilt whole when one of them changes.
#[derive(Debug, Default)]
struct TcpIndex {
    by_listener: std::collections::HashMap<String, Arc<PoolSlot>>,
    by_sni: std::collections::HashMap<String, SniIndex>,
}

/// TCP routes of one listener keyed by server name: exact names, then `*.suffix`.
#[derive(Debug, Default)]
struct SniIndex {
    exact: std::collections::HashMap<Box<str>, Arc<PoolSlot>>,
    /// Keyed by the suffix including its leading dot.
    wildcard: std::collections::HashMap<Box<str>, Arc<PoolSlot>>,
}

impl SniIndex {
    fn lookup(&self, name: &str) -> Option<&Arc<PoolSlot>> {
        if let Some(p) = self.exact.get(name) {
            return Some(p);
        }
        name.match_indices('.')
            .find_map(|(i, _)| self.wildcard.get(&name[i..]))
    }
}

/// A run of route insertions and removals on a table. The path index of one listener and
/// host is taken out of the table while consecutive edits go to it, and put back when an
/// edit names another host or the run ends: a batch of 10,000 routes on one host copies
/// and re-inserts that host's entries once, not 10,000 times. Edits apply in the order
/// given, exactly as one at a time would.
struct Editing<'t> {
    table: &'t mut RoutingTable,
    open: Option<OpenHost>,
    attach: Option<&'t Attacher>,
}

/// The path index being edited, with the listener's host index it was taken from.
struct OpenHost {
    listener: String,
    host: HostName,
    hosts: Arc<HostIndex>,
    paths: Arc<PathIndex>,
}

impl Editing<'_> {
    /// The path index of `route`'s listener and host, taken out of the table for editing.
    fn paths(&mut self, route: &Route) -> &mut PathIndex {
        let reuse = self
            .open
            .as_ref()
            .is_some_and(|o| o.listener == route.listener && o.host.holds(route));
        if !reuse {
            self.close();
        }
        let table = &mut *self.table;
        let open = self.open.get_or_insert_with(|| {
            let listener = route.listener.clone();
            let mut hosts = table.http.get(&listener).cloned().unwrap_or_default();
            table.http.remove_mut(&listener);
            let host = HostName::of(route);
            let paths = Arc::make_mut(&mut hosts).take_paths(&host);
            OpenHost {
                listener,
                host,
                hosts,
                paths,
            }
        });
        Arc::make_mut(&mut open.paths)
    }

    /// Puts the open path index back into the table.
    fn close(&mut self) {
        let Some(OpenHost {
            listener,
            host,
            mut hosts,
            paths,
        }) = self.open.take()
        else {
            return;
        };
        Arc::make_mut(&mut hosts).put_paths(host, paths);
        if !hosts.is_empty() {
            self.table.http.insert_mut(listener, hosts);
        }
    }

    fn insert_route(&mut self, route: Arc<Route>, registered: bool) {
        let Some(pool) = self.table.pools.get(&route.pool).cloned() else {
            return;
        };
        let entry = Arc::new(RouteEntry::new(
            route.clone(),
            pool,
            registered,
            self.attach,
        ));
        self.paths(&route).insert(entry);
    }

    fn remove_route(&mut self, route: &Route) {
        if self.open.is_none() && self.table.http.get(&route.listener).is_none() {
            return;
        }
        self.paths(route).remove(route);
    }
}

impl Drop for Editing<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

/// Routes and pools compiled for lookups. Each revision has its own table; consecutive
/// tables share all they have in common.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    http: NameMap<Arc<HostIndex>>,
    tcp: Arc<TcpIndex>,
    pools: NameMap<Arc<PoolSlot>>,
}

/// A persistent map by listener or pool name. Every request looks its listener up in one,
/// so it hashes with [`KeyHasher`] (a few instructions per 8 bytes) rather than SipHash.
type NameMap<V> = HashTrieMapSync<String, V, KeyHasher>;

/// What a pool name stands for in a state: a defined pool, or the run-time pool of a
/// registered route.
struct PoolSpec<'a> {
    definition: std::borrow::Cow<'a, Pool>,
    members: Vec<(Upstream, Origin)>,
    on_change: OnChange,
    hold: Option<Arc<Hold>>,
}

fn pool_spec<'a>(state: &'a State, name: &str) -> Option<PoolSpec<'a>> {
    let membership = state.membership();
    if let Some(pool) = state.pool(name) {
        return Some(PoolSpec {
            members: membership.upstreams_of(pool),
            on_change: membership.on_change(name),
            definition: std::borrow::Cow::Borrowed(pool),
            hold: None,
        });
    }
    let route = membership.route_using_pool(name)?;
    Some(PoolSpec {
        definition: std::borrow::Cow::Owned(Pool {
            name: name.to_string(),
            source: Source::Api,
            balance: Balance::RoundRobin,
            upstreams: Vec::new(),
            health: None,
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            tls: None,
            policy: Default::default(),
            protocol: Default::default(),
        }),
        members: membership.runtime_upstreams(name),
        on_change: OnChange::Keep,
        // Registrations attach their hold; anything else is no waiting room.
        hold: route.hold.clone().downcast::<Hold>().ok(),
    })
}

/// A registered route as an HTTP route of the table.
fn registered_route(name: &str, r: &RegisteredRoute) -> Route {
    Route {
        name: name.to_string(),
        source: Source::Api,
        listener: r.listener.clone(),
        host: r.host.clone(),
        path: PathMatch::Prefix(r.path_prefix.clone()),
        pool: r.pool.clone(),
        strip_prefix: false,
        priority: 0,
    }
}

impl RoutingTable {
    /// Compiles all of `state` with its run-time membership (discovered and registered
    /// upstreams, registered routes). The pool slots of `previous` are kept (with a pool
    /// compiled from `state` in each), so upstream run-time data (health, connection
    /// counts) carries over and routes of `previous` see the new pools too.
    pub fn build(state: &State, previous: Option<&RoutingTable>) -> RoutingTable {
        RoutingTable::build_attached(state, previous, None)
    }

    /// [`build`](Self::build), each route entry made with what `attach` makes for it.
    pub fn build_attached(
        state: &State,
        previous: Option<&RoutingTable>,
        attach: Option<&Attacher>,
    ) -> RoutingTable {
        let mut table = RoutingTable::default();
        let mut names: BTreeSet<String> = state.pools().map(|p| p.name.clone()).collect();
        names.extend(state.membership().routes().map(|(_, r)| r.pool.clone()));
        for name in &names {
            let slot = previous.and_then(|p| p.pools.get(name));
            table.refresh_pool(state, name, slot);
        }
        let mut editing = table.edit(attach);
        for route in state.routes() {
            editing.insert_route(Arc::new(route.clone()), false);
        }
        for (name, r) in state.membership().routes() {
            if r.protocol.is_http() {
                editing.insert_route(Arc::new(registered_route(name, r)), true);
            }
        }
        drop(editing);
        table.tcp = Arc::new(TcpIndex::build(state, &table.pools));
        table
    }

    /// The table for `new`, which is `old` (the state this table was compiled from) with the
    /// objects named in `touched` changed. Costs O(log n) per touched object: untouched hosts,
    /// paths and pools are shared with this table. Pools are swapped in their slots, which
    /// this table's routes see at once: call it only once `new` is committed.
    pub fn update(&self, old: &State, new: &State, touched: &Touched) -> RoutingTable {
        self.update_attached(old, new, touched, None)
    }

    /// [`update`](Self::update), each new route entry made with what `attach` makes for it.
    pub fn update_attached(
        &self,
        old: &State,
        new: &State,
        touched: &Touched,
        attach: Option<&Attacher>,
    ) -> RoutingTable {
        let mut table = self.clone();
        let (old_m, new_m) = (old.membership(), new.membership());
        let mut pools: BTreeSet<&str> = touched.pools.iter().map(String::as_str).collect();
        for name in &touched.registered_routes {
            pools.extend(old_m.route(name).map(|r| r.pool.as_str()));
            pools.extend(new_m.route(name).map(|r| r.pool.as_str()));
        }
        for name in pools {
            let slot = self.pools.get(name);
            table.refresh_pool(new, name, slot);
        }
        let mut editing = table.edit(attach);
        for name in &touched.routes {
            if let Some(route) = old.route_arc(name) {
                editing.remove_route(route);
            }
            if let Some(route) = new.route_arc(name) {
                editing.insert_route(route.clone(), false);
            }
        }
        let mut tcp = !touched.tcp_routes.is_empty();
        for name in &touched.registered_routes {
            if let Some(r) = old_m.route(name) {
                tcp |= r.protocol.is_stream();
                if r.protocol.is_http() {
                    editing.remove_route(&registered_route(name, r));
                }
            }
            if let Some(r) = new_m.route(name) {
                tcp |= r.protocol.is_stream();
                if r.protocol.is_http() {
                    editing.insert_route(Arc::new(registered_route(name, r)), true);
                }
            }
        }
        drop(editing);
        if tcp {
            table.tcp = Arc::new(TcpIndex::build(new, &table.pools));
        }
        table
    }

    /// Compiles pool `name` as `state` defines it into its slot (`slot`, or a new one), or
    /// drops it when `state` has no such pool.
    fn refresh_pool(&mut self, state: &State, name: &str, slot: Option<&Arc<PoolSlot>>) {
        let Some(spec) = pool_spec(state, name) else {
            self.pools.remove_mut(name);
            return;
        };
        let previous = slot.map(|s| s.load_full());
        let runtime = Arc::new(PoolRuntime::build(
            &spec.definition,
            &spec.members,
            spec.on_change,
            spec.hold,
            previous.as_deref(),
        ));
        match slot {
            Some(slot) => {
                slot.store(runtime);
                if self.pools.get(name).is_none() {
                    self.pools.insert_mut(name.to_string(), slot.clone());
                }
            }
            None => self
                .pools
                .insert_mut(name.to_string(), Arc::new(ArcSwap::new(runtime))),
        }
    }

    /// Starts a run of route edits (see [`Editing`]), the entries it makes made with what
    /// `attach` makes for them.
    fn edit<'t>(&'t mut self, attach: Option<&'t Attacher>) -> Editing<'t> {
        Editing {
            table: self,
            open: None,
            attach,
        }
    }

    /// Every HTTP route entry of the table (registered ones included), in no particular
    /// order; a route that lost to another on its host and path is among them.
    pub fn entries(&self) -> impl Iterator<Item = &Arc<RouteEntry>> {
        self.http.values().flat_map(|hosts| hosts.entries())
    }

    /// The route for a request on `listener` to `host` (lower-case, no port) and `path`
    /// (without query). Exact host beats wildcard beats any host; within a host, an exact
    /// path beats the longest prefix. A host whose routes match no path falls through to
    /// the wildcard and any-host routes.
    pub fn lookup(&self, listener: &str, host: &str, path: &str) -> Option<&Arc<RouteEntry>> {
        self.http.get(listener)?.lookup(host, path)
    }

    /// The pool a TCP listener forwards to now.
    pub fn tcp_pool(&self, listener: &str) -> Option<Arc<PoolRuntime>> {
        self.tcp.by_listener.get(listener).map(|s| s.load_full())
    }

    /// The pool for a connection on a `tls-passthrough` listener with server name `sni`
    /// (lower-case): an exact SNI route, then the longest `*.suffix`, then the route without SNI.
    pub fn tcp_pool_for_sni(&self, listener: &str, sni: Option<&str>) -> Option<Arc<PoolRuntime>> {
        self.tcp_slot_for_sni(listener, sni).map(|s| s.load_full())
    }

    /// The slot of the pool [`tcp_pool_for_sni`](Self::tcp_pool_for_sni) finds.
    pub fn tcp_slot_for_sni(&self, listener: &str, sni: Option<&str>) -> Option<Arc<PoolSlot>> {
        sni.and_then(|name| self.tcp.by_sni.get(listener)?.lookup(name))
            .or_else(|| self.tcp.by_listener.get(listener))
            .cloned()
    }

    /// The runtime pool called `name`, as it is now.
    pub fn pool(&self, name: &str) -> Option<Arc<PoolRuntime>> {
        self.pools.get(name).map(|s| s.load_full())
    }

    /// All runtime pools, as they are now.
    pub fn pools(&self) -> impl Iterator<Item = Arc<PoolRuntime>> + '_ {
        self.pools.values().map(|s| s.load_full())
    }

    /// Whether `listener` has any HTTP route.
    pub fn has_routes(&self, listener: &str) -> bool {
        self.http.get(listener).is_some_and(|h| !h.is_empty())
    }
}

impl TcpIndex {
    fn build(state: &State, pools: &NameMap<Arc<PoolSlot>>) -> TcpIndex {
        let mut index = TcpIndex::default();
        for r in state.tcp_routes() {
            let Some(pool) = pools.get(&r.pool) else {
                continue;
            };
            match r.sni.as_deref() {
                None => {
                    index.by_listener.insert(r.listener.clone(), pool.clone());
                }
                Some(sni) => {
                    let sni_index = index.by_sni.entry(r.listener.clone()).or_default();
                    match sni.strip_prefix('*') {
                        Some(suffix) => sni_index.wildcard.insert(suffix.into(), pool.clone()),
                        None => sni_index.exact.insert(sni.into(), pool.clone()),
                    };
                }
            }
        }
        for (_, r) in state.membership().routes() {
            if !r.protocol.is_stream() {
                continue;
            }
            if let Some(pool) = pools.get(&r.pool) {
                // A configured TCP route keeps its listener.
                index
                    .by_listener
                    .entry(r.listener.clone())
                    .or_insert_with(|| pool.clone());
            }
        }
        index
    }
}

#[cfg(test)]
mod tests;
