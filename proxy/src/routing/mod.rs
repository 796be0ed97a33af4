//! The compiled, immutable routing table: `lookup(listener, host, path)` in time independent
//! of the number of routes.
//!
//! Hosts are hash lookups (exact, then each wildcard suffix of the name, then any host);
//! paths are a hash lookup for exact paths, then one hash lookup per distinct prefix length
//! (longest first). So 100,000 per-path rules cost the same per request as 10.

use std::collections::HashMap;
use std::sync::Arc;

use crate::discovery::OnChange;
use crate::state::{
    default_connect_timeout, default_response_timeout, Balance, PathMatch, Pool, Route, Source,
    State,
};
use crate::upstream::PoolRuntime;

/// A matched route with the runtime pool that serves it.
#[derive(Debug)]
pub struct RouteEntry {
    /// The route definition.
    pub route: Arc<Route>,
    /// The pool it forwards to.
    pub pool: Arc<PoolRuntime>,
    /// A route a service registered (not declared in the config file or the API).
    pub registered: bool,
}

impl RouteEntry {
    /// Who wins between routes with the same host and path: a declared route over a
    /// registered one whatever their priorities (a registration never takes a declared
    /// route's traffic), then the higher priority, then the smaller name.
    fn precedence(&self) -> (bool, i32, std::cmp::Reverse<&str>) {
        (
            !self.registered,
            self.route.priority,
            std::cmp::Reverse(self.route.name.as_str()),
        )
    }
}

#[derive(Debug, Default)]
struct PathIndex {
    exact: HashMap<Box<str>, Arc<RouteEntry>>,
    prefix: HashMap<Box<str>, Arc<RouteEntry>>,
    /// Distinct prefix lengths, longest first.
    prefix_lengths: Vec<usize>,
}

impl PathIndex {
    fn insert(&mut self, entry: Arc<RouteEntry>) {
        let (map, key) = match &entry.route.path {
            PathMatch::Exact(p) => (&mut self.exact, p.as_str()),
            PathMatch::Prefix(p) => (&mut self.prefix, p.as_str()),
        };
        match map.get(key) {
            // Same host and path: see `RouteEntry::precedence`.
            Some(old) if old.precedence() >= entry.precedence() => {}
            _ => {
                map.insert(key.into(), entry);
            }
        }
    }

    fn finish(&mut self) {
        let mut lengths: Vec<usize> = self.prefix.keys().map(|k| k.len()).collect();
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        lengths.dedup();
        self.prefix_lengths = lengths;
    }

    fn lookup(&self, path: &str) -> Option<&Arc<RouteEntry>> {
        if let Some(e) = self.exact.get(path) {
            return Some(e);
        }
        for &len in &self.prefix_lengths {
            if len <= path.len() && path.is_char_boundary(len) {
                if let Some(e) = self.prefix.get(&path[..len]) {
                    return Some(e);
                }
            }
        }
        None
    }

    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefix.is_empty()
    }
}

#[derive(Debug, Default)]
struct HostIndex {
    exact: HashMap<Box<str>, PathIndex>,
    /// Keyed by the suffix including its leading dot: `*.example.com` -> `.example.com`.
    wildcard: HashMap<Box<str>, PathIndex>,
    any: PathIndex,
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
}

/// Routes and pools compiled for lookups. Built once per state revision, then read-only.
#[derive(Debug, Default)]
pub struct RoutingTable {
    http: HashMap<String, HostIndex>,
    tcp: HashMap<String, Arc<PoolRuntime>>,
    /// `tls-passthrough` routes by SNI, per listener.
    tcp_sni: HashMap<String, SniIndex>,
    pools: HashMap<String, Arc<PoolRuntime>>,
}

/// TCP routes of one listener keyed by server name: exact names, then `*.suffix`.
#[derive(Debug, Default)]
struct SniIndex {
    exact: HashMap<Box<str>, Arc<PoolRuntime>>,
    /// Keyed by the suffix including its leading dot.
    wildcard: HashMap<Box<str>, Arc<PoolRuntime>>,
}

impl SniIndex {
    fn lookup(&self, name: &str) -> Option<&Arc<PoolRuntime>> {
        if let Some(p) = self.exact.get(name) {
            return Some(p);
        }
        name.match_indices('.')
            .find_map(|(i, _)| self.wildcard.get(&name[i..]))
    }
}

impl RoutingTable {
    /// Compiles `state` with its run-time membership (discovered and registered upstreams,
    /// registered routes). Runtime upstream data (health, connection counts, idle
    /// connections) is carried over from `previous` for upstreams that still exist.
    pub fn build(state: &State, previous: Option<&RoutingTable>) -> RoutingTable {
        let membership = state.membership();
        let old_pool = |name: &str| previous.and_then(|t| t.pools.get(name)).map(|p| p.as_ref());
        let mut pools: HashMap<String, Arc<PoolRuntime>> = state
            .pools()
            .map(|p| {
                let members = membership.upstreams_of(p);
                let runtime = PoolRuntime::build(
                    p,
                    &members,
                    membership.on_change(&p.name),
                    None,
                    old_pool(&p.name),
                );
                (p.name.clone(), Arc::new(runtime))
            })
            .collect();
        let mut registered: Vec<Route> = Vec::new();
        for (name, r) in membership.routes() {
            if !pools.contains_key(&r.pool) {
                let definition = Pool {
                    name: r.pool.clone(),
                    source: Source::Api,
                    balance: Balance::RoundRobin,
                    upstreams: Vec::new(),
                    health: None,
                    connect_timeout: default_connect_timeout(),
                    response_timeout: default_response_timeout(),
                    tls: None,
                    policy: Default::default(),
                };
                let members = membership.runtime_upstreams(&r.pool);
                let runtime = PoolRuntime::build(
                    &definition,
                    &members,
                    OnChange::Keep,
                    Some(r.hold.clone()),
                    old_pool(&r.pool),
                );
                pools.insert(r.pool.clone(), Arc::new(runtime));
            }
            registered.push(Route {
                name: name.clone(),
                source: Source::Api,
                listener: r.listener.clone(),
                host: r.host.clone(),
                path: PathMatch::Prefix(r.path_prefix.clone()),
                pool: r.pool.clone(),
                strip_prefix: false,
                priority: 0,
            });
        }
        let registered_tcp: Vec<(String, String)> = membership
            .routes()
            .filter(|(_, r)| r.protocol.is_stream())
            .map(|(_, r)| (r.listener.clone(), r.pool.clone()))
            .collect();
        let registered_http = registered
            .iter()
            .zip(membership.routes())
            .filter(|(_, (_, r))| r.protocol.is_http())
            .map(|(route, _)| (route, true));
        let mut http: HashMap<String, HostIndex> = HashMap::new();
        let declared = state.routes().map(|route| (route, false));
        for (route, registered) in declared.chain(registered_http) {
            let Some(pool) = pools.get(&route.pool) else {
                continue;
            };
            let entry = Arc::new(RouteEntry {
                route: Arc::new(route.clone()),
                pool: pool.clone(),
                registered,
            });
            let hosts = http.entry(route.listener.clone()).or_default();
            let index = match route.host.as_deref() {
                None => &mut hosts.any,
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => hosts.wildcard.entry(suffix.into()).or_default(),
                    None => hosts.exact.entry(h.into()).or_default(),
                },
            };
            index.insert(entry);
        }
        for hosts in http.values_mut() {
            hosts.any.finish();
            hosts.exact.values_mut().for_each(PathIndex::finish);
            hosts.wildcard.values_mut().for_each(PathIndex::finish);
        }
        let mut tcp: HashMap<String, Arc<PoolRuntime>> = state
            .tcp_routes()
            .filter(|r| r.sni.is_none())
            .filter_map(|r| pools.get(&r.pool).map(|p| (r.listener.clone(), p.clone())))
            .collect();
        let mut tcp_sni: HashMap<String, SniIndex> = HashMap::new();
        for r in state.tcp_routes() {
            let (Some(sni), Some(pool)) = (r.sni.as_deref(), pools.get(&r.pool)) else {
                continue;
            };
            let index = tcp_sni.entry(r.listener.clone()).or_default();
            match sni.strip_prefix('*') {
                Some(suffix) => index.wildcard.insert(suffix.into(), pool.clone()),
                None => index.exact.insert(sni.into(), pool.clone()),
            };
        }
        for (listener, pool) in registered_tcp {
            if let Some(p) = pools.get(&pool) {
                // A configured TCP route keeps its listener.
                tcp.entry(listener).or_insert_with(|| p.clone());
            }
        }
        RoutingTable {
            http,
            tcp,
            tcp_sni,
            pools,
        }
    }

    /// The route for a request on `listener` to `host` (lower-case, no port) and `path`
    /// (without query). Exact host beats wildcard beats any host; within a host, an exact
    /// path beats the longest prefix. A host whose routes match no path falls through to
    /// the wildcard and any-host routes.
    pub fn lookup(&self, listener: &str, host: &str, path: &str) -> Option<&Arc<RouteEntry>> {
        self.http.get(listener)?.lookup(host, path)
    }

    /// The pool a TCP listener forwards to.
    pub fn tcp_pool(&self, listener: &str) -> Option<&Arc<PoolRuntime>> {
        self.tcp.get(listener)
    }

    /// The pool for a connection on a `tls-passthrough` listener with server name `sni`
    /// (lower-case): an exact SNI route, then the longest `*.suffix`, then the route without SNI.
    pub fn tcp_pool_for_sni(&self, listener: &str, sni: Option<&str>) -> Option<&Arc<PoolRuntime>> {
        sni.and_then(|name| self.tcp_sni.get(listener)?.lookup(name))
            .or_else(|| self.tcp.get(listener))
    }

    /// The runtime pool called `name`.
    pub fn pool(&self, name: &str) -> Option<&Arc<PoolRuntime>> {
        self.pools.get(name)
    }

    /// All runtime pools.
    pub fn pools(&self) -> impl Iterator<Item = &Arc<PoolRuntime>> {
        self.pools.values()
    }

    /// Whether `listener` has any HTTP route.
    pub fn has_routes(&self, listener: &str) -> bool {
        self.http
            .get(listener)
            .is_some_and(|h| !h.any.is_empty() || !h.exact.is_empty() || !h.wildcard.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;
    use crate::state::{Balance, Change, Pool, Source, Upstream};

    fn table(routes: &[(&str, Option<&str>, PathMatch, i32)]) -> RoutingTable {
        let mut state = State::empty([("web".to_string(), Protocol::Http)].into());
        let mut changes = vec![Change::CreatePool(Pool {
            name: "p".into(),
            source: Source::Api,
            balance: Balance::RoundRobin,
            upstreams: vec![Upstream::new("127.0.0.1:1")],
            health: None,
            connect_timeout: crate::state::default_connect_timeout(),
            response_timeout: crate::state::default_response_timeout(),
            tls: None,
            policy: Default::default(),
        })];
        for (name, host, path, priority) in routes {
            changes.push(Change::CreateRoute(Route {
                name: (*name).into(),
                source: Source::Api,
                listener: "web".into(),
                host: host.map(String::from),
                path: path.clone(),
                pool: "p".into(),
                strip_prefix: false,
                priority: *priority,
            }));
        }
        state.apply_batch(&changes, Source::Api).expect("valid");
        RoutingTable::build(&state, None)
    }

    fn name<'a>(t: &'a RoutingTable, host: &str, path: &str) -> Option<&'a str> {
        t.lookup("web", host, path).map(|e| e.route.name.as_str())
    }

    fn prefix(p: &str) -> PathMatch {
        PathMatch::Prefix(p.into())
    }

    #[test]
    fn host_specificity() {
        let t = table(&[
            ("any", None, prefix("/"), 0),
            ("wild", Some("*.example.com"), prefix("/"), 0),
            ("deep", Some("*.b.example.com"), prefix("/"), 0),
            ("exact", Some("a.example.com"), prefix("/"), 0),
        ]);
        assert_eq!(name(&t, "a.example.com", "/x"), Some("exact"));
        assert_eq!(name(&t, "c.example.com", "/x"), Some("wild"));
        assert_eq!(name(&t, "x.b.example.com", "/x"), Some("deep"));
        assert_eq!(name(&t, "example.com", "/x"), Some("any"));
        assert_eq!(name(&t, "other.org", "/x"), Some("any"));
    }

    #[test]
    fn path_specificity_and_fallthrough() {
        let t = table(&[
            ("root", Some("example.com"), prefix("/"), 0),
            ("docs", Some("example.com"), prefix("/docs"), 0),
            ("docs-api", Some("example.com"), prefix("/docs/api"), 0),
            (
                "exact",
                Some("example.com"),
                PathMatch::Exact("/docs/index.html".into()),
                0,
            ),
            ("other-host-img", None, prefix("/img"), 0),
        ]);
        assert_eq!(name(&t, "example.com", "/docs/index.html"), Some("exact"));
        assert_eq!(name(&t, "example.com", "/docs/api/v1"), Some("docs-api"));
        assert_eq!(name(&t, "example.com", "/docs/guide"), Some("docs"));
        assert_eq!(name(&t, "example.com", "/about"), Some("root"));
        assert_eq!(name(&t, "elsewhere", "/img/a.png"), Some("other-host-img"));
        assert_eq!(name(&t, "elsewhere", "/about"), None);
    }

    #[test]
    fn priority_breaks_ties() {
        let t = table(&[
            ("low", None, prefix("/a"), 0),
            ("high", None, prefix("/a"), 5),
        ]);
        assert_eq!(name(&t, "h", "/a"), Some("high"));
    }

    #[test]
    fn many_routes_still_resolve_each_path() {
        let routes: Vec<(String, PathMatch)> = (0..5000)
            .map(|i| (format!("r{i}"), prefix(&format!("/content/{i}/"))))
            .collect();
        let specs: Vec<(&str, Option<&str>, PathMatch, i32)> = routes
            .iter()
            .map(|(n, p)| (n.as_str(), None, p.clone(), 0))
            .collect();
        let t = table(&specs);
        assert_eq!(name(&t, "h", "/content/4321/page"), Some("r4321"));
        assert_eq!(name(&t, "h", "/content/43210/page"), None);
    }
}
