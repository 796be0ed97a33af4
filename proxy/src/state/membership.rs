//! Run-time pool membership: upstreams found by discovery sources or announced by
//! registrations, and the routes registrations bring with them.
//!
//! A [`Membership`] lives inside [`super::State`] next to the persisted objects, so every
//! routing table is built from both, but it is never written to SQLite: after a restart the
//! sources and registrations fill it again.

use std::collections::{BTreeMap, BTreeSet};

use rpds::RedBlackTreeMapSync;
use std::sync::Arc;

use super::{Pool, Protocol, Upstream};

/// The kind of a discovery source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceKind {
    /// Keys under an etcd prefix.
    Etcd,
    /// A DNS name (A/AAAA, or SRV without a port).
    Dns,
    /// A command printing JSON.
    Exec,
    /// A watched JSON file.
    File,
}

impl SourceKind {
    /// The config and API name.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Etcd => "etcd",
            SourceKind::Dns => "dns",
            SourceKind::Exec => "exec",
            SourceKind::File => "file",
        }
    }
}

/// Where an upstream of a pool comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// The pool definition (config file or API), stored in SQLite.
    Static,
    /// A discovery source of the pool.
    Discovered(SourceKind),
    /// A live (or held) registration, by its id.
    Registered(u64),
}

impl Origin {
    /// A short label for logs and listings: `static`, `etcd`, `registration/7`.
    pub fn label(&self) -> String {
        match self {
            Origin::Static => "static".into(),
            Origin::Discovered(kind) => kind.as_str().into(),
            Origin::Registered(id) => format!("registration/{id}"),
        }
    }
}

/// What happens to established connections to an upstream that leaves a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnChange {
    /// They run until either side closes them.
    #[default]
    Keep,
    /// TCP streams to it are closed at once.
    Reset,
}

impl OnChange {
    /// Parses the config name.
    pub fn parse(s: &str) -> Option<OnChange> {
        match s {
            "keep" => Some(OnChange::Keep),
            "reset" => Some(OnChange::Reset),
            _ => None,
        }
    }
}

/// A route that exists only because a service registered it.
#[derive(Debug, Clone)]
pub struct RegisteredRoute {
    /// Listener it is served on (a configured one, or one opened for registrations).
    pub listener: String,
    /// `http` (host and path routing) or `tcp` (the whole port).
    pub protocol: Protocol,
    /// Exact host or `*.suffix`; `None` for any host.
    pub host: Option<String>,
    /// Path prefix (HTTP); `/` when not given.
    pub path_prefix: String,
    /// The run-time pool holding the registered instances.
    pub pool: String,
    /// The waiting room of requests that arrive while no instance is registered. The
    /// model only carries it to the compile step, which knows its type (the data path's
    /// hold); nothing here looks inside.
    pub hold: Attachment,
}

/// Run-time equipment of a registered route that the model passes through untouched.
pub type Attachment = Arc<dyn std::any::Any + Send + Sync>;

/// Run-time additions to the desired state. Its maps are persistent (structurally shared),
/// so a copy is O(1) and an edit O(log n); routing compiles only what an edit touched.
#[derive(Debug, Clone, Default)]
pub struct Membership {
    members: RedBlackTreeMapSync<String, Arc<BTreeMap<Origin, Vec<Upstream>>>>,
    on_change: RedBlackTreeMapSync<String, OnChange>,
    routes: RedBlackTreeMapSync<String, RegisteredRoute>,
    /// What the edits since the last [`take_touched`](Self::take_touched) changed.
    touched: MembershipTouched,
}

/// The pools and registered routes a run of membership edits changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipTouched {
    /// Pools whose members or on-change policy changed.
    pub pools: BTreeSet<String>,
    /// Registered routes added, replaced or removed.
    pub routes: BTreeSet<String>,
}

impl Membership {
    /// Replaces what `origin` contributes to `pool`; an empty list removes it.
    pub fn set_members(&mut self, pool: &str, origin: Origin, upstreams: Vec<Upstream>) {
        let mut by_origin = self
            .members
            .get(pool)
            .map(|m| m.as_ref().clone())
            .unwrap_or_default();
        if upstreams.is_empty() {
            if by_origin.remove(&origin).is_none() {
                return;
            }
        } else {
            by_origin.insert(origin, upstreams);
        }
        if by_origin.is_empty() {
            self.members.remove_mut(pool);
        } else {
            self.members
                .insert_mut(pool.to_string(), Arc::new(by_origin));
        }
        self.touched.pools.insert(pool.to_string());
    }

    /// What `origin` contributes to `pool`.
    pub fn members(&self, pool: &str, origin: Origin) -> &[Upstream] {
        self.members
            .get(pool)
            .and_then(|m| m.get(&origin))
            .map_or(&[], Vec::as_slice)
    }

    /// Every run-time upstream of `pool` with its origin.
    pub fn all_members(&self, pool: &str) -> impl Iterator<Item = (Origin, &Upstream)> {
        self.members.get(pool).into_iter().flat_map(|m| {
            m.iter()
                .flat_map(|(o, list)| list.iter().map(move |u| (*o, u)))
        })
    }

    /// Sets the on-change policy of `pool`.
    pub fn set_on_change(&mut self, pool: &str, policy: OnChange) {
        self.on_change.insert_mut(pool.to_string(), policy);
        self.touched.pools.insert(pool.to_string());
    }

    /// The on-change policy of `pool` (`keep` unless set).
    pub fn on_change(&self, pool: &str) -> OnChange {
        self.on_change.get(pool).copied().unwrap_or_default()
    }

    /// The upstreams a pool runs with: its static ones first, then the run-time ones in
    /// origin order. An address listed twice is used once (the first listing wins).
    pub fn upstreams_of(&self, pool: &Pool) -> Vec<(Upstream, Origin)> {
        let mut out: Vec<(Upstream, Origin)> = pool
            .upstreams
            .iter()
            .map(|u| (u.clone(), Origin::Static))
            .collect();
        self.extend_with_members(&pool.name, &mut out);
        out
    }

    /// The upstreams of a pool that exists only at run time (a registration pool).
    pub fn runtime_upstreams(&self, pool: &str) -> Vec<(Upstream, Origin)> {
        let mut out = Vec::new();
        self.extend_with_members(pool, &mut out);
        out
    }

    fn extend_with_members(&self, pool: &str, out: &mut Vec<(Upstream, Origin)>) {
        for (origin, upstream) in self.all_members(pool) {
            if !out.iter().any(|(u, _)| u.address == upstream.address) {
                out.push((upstream.clone(), origin));
            }
        }
    }

    /// Adds or replaces the registered route called `name`.
    pub fn set_route(&mut self, name: &str, route: RegisteredRoute) {
        if let Some(old) = self.routes.get(name) {
            self.touched.pools.insert(old.pool.clone());
        }
        self.touched.pools.insert(route.pool.clone());
        self.touched.routes.insert(name.to_string());
        self.routes.insert_mut(name.to_string(), route);
    }

    /// Removes the registered route called `name`, with its members.
    pub fn remove_route(&mut self, name: &str) {
        let Some(route) = self.routes.get(name).cloned() else {
            return;
        };
        self.routes.remove_mut(name);
        self.members.remove_mut(&route.pool);
        self.touched.pools.insert(route.pool);
        self.touched.routes.insert(name.to_string());
    }

    /// The registered route called `name`.
    pub fn route(&self, name: &str) -> Option<&RegisteredRoute> {
        self.routes.get(name)
    }

    /// A registered route served by `pool` (registrations name a route's pool after it, so
    /// this is one lookup; other names are searched).
    pub fn route_using_pool(&self, pool: &str) -> Option<&RegisteredRoute> {
        match self.routes.get(pool) {
            Some(r) if r.pool == pool => Some(r),
            _ => self.routes.values().find(|r| r.pool == pool),
        }
    }

    /// Registered routes by name.
    pub fn routes(&self) -> impl Iterator<Item = (&String, &RegisteredRoute)> {
        self.routes.iter()
    }

    /// What changed since the last call, for the writer to compile.
    pub(crate) fn take_touched(&mut self) -> MembershipTouched {
        std::mem::take(&mut self.touched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{default_connect_timeout, default_response_timeout, Balance, Source};

    #[test]
    fn static_upstreams_come_first_and_duplicates_are_dropped() {
        let pool = Pool {
            name: "p".into(),
            source: Source::Api,
            balance: Balance::RoundRobin,
            upstreams: vec![Upstream::new("10.0.0.1:80")],
            health: None,
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            tls: None,
            policy: Default::default(),
            protocol: Default::default(),
        };
        let mut m = Membership::default();
        m.set_members(
            "p",
            Origin::Discovered(SourceKind::Etcd),
            vec![Upstream::new("10.0.0.2:80"), Upstream::new("10.0.0.1:80")],
        );
        let got: Vec<(String, Origin)> = m
            .upstreams_of(&pool)
            .into_iter()
            .map(|(u, o)| (u.address, o))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.1:80".to_string(), Origin::Static),
                (
                    "10.0.0.2:80".to_string(),
                    Origin::Discovered(SourceKind::Etcd)
                ),
            ]
        );
        m.set_members("p", Origin::Discovered(SourceKind::Etcd), Vec::new());
        assert_eq!(m.upstreams_of(&pool).len(), 1);
        assert!(m.members.is_empty());
        let touched = m.take_touched();
        assert_eq!(touched.pools, BTreeSet::from(["p".to_string()]));
        assert!(m.take_touched().pools.is_empty());
    }
}
