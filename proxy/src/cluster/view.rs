//! The fleet's objects as this node last read them from etcd ([`View`]), where they live
//! in etcd ([`Keyspace`]), and what they become on this host ([`plan`]).

use std::fmt;

use std::collections::{BTreeMap, BTreeSet};

use rpds::{RedBlackTreeMapSync, RedBlackTreeSetSync};

use super::tls::FleetCertificate;
use crate::etcd::{Event, KeyValue};
use crate::state::{Change, Document, Pool, Route, Source, State, TcpRoute};

/// The kinds of fleet objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A pool.
    Pool,
    /// An HTTP route.
    Route,
    /// A TCP route.
    TcpRoute,
    /// An on-demand TLS allowlist entry (the name is the pattern).
    Allow,
    /// A certificate uploaded through the API or issued by ACME.
    Certificate,
    /// The ACME account of one directory (the name is the directory URL).
    Account,
}

impl Kind {
    /// The key segment and the name status reports use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pool => "pool",
            Kind::Route => "route",
            Kind::TcpRoute => "tcp_route",
            Kind::Allow => "tls_allow",
            Kind::Certificate => "tls_certificate",
            Kind::Account => "acme_account",
        }
    }

    /// Every kind, state objects first.
    pub const ALL: [Kind; 6] = [
        Kind::Pool,
        Kind::Route,
        Kind::TcpRoute,
        Kind::Allow,
        Kind::Certificate,
        Kind::Account,
    ];

    /// Whether objects of this kind are the state's (pools and routes), placed by [`plan`].
    pub fn is_model(self) -> bool {
        matches!(self, Kind::Pool | Kind::Route | Kind::TcpRoute)
    }

    /// Parses [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An object's identity: kind and name.
pub type ObjectId = (Kind, String);

/// The key layout of one fleet under its prefix `P`:
/// - `P/objects/<kind>/<name>`: a pool, route or TCP route as JSON; a TLS allowlist
///   entry (the pattern), a certificate (JSON with its PEM) or an ACME account (its
///   credentials JSON, the name being the directory URL);
/// - `P/objects/.write`: written by every API write, so that each write is checked against
///   the whole state it was validated on (see [`crate::cluster`]);
/// - `P/nodes/<node name>`: each node's lease key;
/// - `P/acme-orders`: the fleet's recent ACME orders, for the fleet-wide rate limits (apart
///   from `P/acme/`, which holds the order locks and challenge answers);
///
/// Other keys under `P/` are ignored (kept for newer versions).
#[derive(Debug, Clone)]
pub struct Keyspace {
    prefix: String,
}

impl Keyspace {
    /// The keys under `prefix` (no trailing '/').
    pub fn new(prefix: &str) -> Keyspace {
        Keyspace {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// Everything of this fleet: what a node reads and watches. Node keys are watched
    /// too: their heartbeats move the applied revision on while no object changes, so
    /// the lag stays meaningful (a watch delivers every revision of its range in order).
    pub fn fleet(&self) -> Vec<u8> {
        format!("{}/", self.prefix).into_bytes()
    }

    /// The prefix of every object key (and the write marker).
    pub fn objects(&self) -> Vec<u8> {
        format!("{}/objects/", self.prefix).into_bytes()
    }

    /// The key of one object.
    pub fn object(&self, kind: Kind, name: &str) -> Vec<u8> {
        format!("{}/objects/{}/{name}", self.prefix, kind.as_str()).into_bytes()
    }

    /// The write marker.
    pub fn marker(&self) -> Vec<u8> {
        format!("{}/objects/.write", self.prefix).into_bytes()
    }

    /// The prefix of the nodes' lease keys.
    pub fn nodes(&self) -> Vec<u8> {
        format!("{}/nodes/", self.prefix).into_bytes()
    }

    /// One node's lease key.
    pub fn node(&self, name: &str) -> Vec<u8> {
        format!("{}/nodes/{name}", self.prefix).into_bytes()
    }

    /// The fleet's log of recent ACME orders.
    pub fn order_log(&self) -> Vec<u8> {
        format!("{}/acme-orders", self.prefix).into_bytes()
    }

    /// What a key under [`objects`](Self::objects) is.
    fn classify(&self, key: &[u8]) -> Key {
        let objects = self.objects();
        let Some(rest) = key.strip_prefix(objects.as_slice()) else {
            return Key::Foreign;
        };
        if rest == b".write" {
            return Key::Marker;
        }
        let Ok(rest) = std::str::from_utf8(rest) else {
            return Key::Foreign;
        };
        match rest.split_once('/') {
            Some((kind, name)) => match Kind::parse(kind) {
                Some(kind) if !name.is_empty() => Key::Object((kind, name.to_string())),
                _ => Key::Foreign,
            },
            None => Key::Foreign,
        }
    }
}

enum Key {
    Object(ObjectId),
    Marker,
    /// Anything else under the prefix (written by something newer, or by hand): ignored.
    Foreign,
}

/// A fleet object as stored in etcd.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A pool (boxed: far larger than the other kinds).
    Pool(Box<Pool>),
    /// An HTTP route.
    Route(Route),
    /// A TCP route.
    TcpRoute(TcpRoute),
    /// An allowlist entry (its pattern).
    Allow(String),
    /// An uploaded or issued certificate.
    Certificate(FleetCertificate),
    /// ACME account credentials (JSON, opaque here).
    Account(String),
    /// A value that does not decode (reported, never applied).
    Unreadable(String),
}

impl Object {
    /// Decodes a stored value of `kind`.
    pub fn decode(kind: Kind, name: &str, value: &[u8]) -> Object {
        let decoded = match kind {
            Kind::Pool => serde_json::from_slice::<Pool>(value).map(|p| Object::Pool(Box::new(p))),
            Kind::Route => serde_json::from_slice::<Route>(value).map(Object::Route),
            Kind::TcpRoute => serde_json::from_slice::<TcpRoute>(value).map(Object::TcpRoute),
            Kind::Allow => {
                return match std::str::from_utf8(value) {
                    Ok(pattern) if pattern == name => Object::Allow(name.to_string()),
                    Ok(_) => Object::Unreadable("the pattern inside differs from the key".into()),
                    Err(e) => Object::Unreadable(e.to_string()),
                }
            }
            Kind::Certificate => {
                serde_json::from_slice::<FleetCertificate>(value).map(Object::Certificate)
            }
            Kind::Account => {
                return match std::str::from_utf8(value) {
                    Ok(json) => Object::Account(json.to_string()),
                    Err(e) => Object::Unreadable(e.to_string()),
                }
            }
        };
        match decoded {
            Ok(object) if object.name() == Some(name) => object,
            Ok(_) => Object::Unreadable("the name inside differs from the key".into()),
            Err(e) => Object::Unreadable(e.to_string()),
        }
    }

    /// What the object's placement on a host depends on besides itself: a route's pool,
    /// a TCP route's pool and its (listener, SNI) slot (one TCP route per slot).
    fn depends_on(&self) -> Vec<Dep> {
        match self {
            Object::Route(r) => vec![Dep::Pool(r.pool.clone())],
            Object::TcpRoute(r) => vec![
                Dep::Pool(r.pool.clone()),
                Dep::Slot(
                    r.listener.clone(),
                    r.sni
                        .as_deref()
                        .map(|s| crate::state::normalise_host(s).unwrap_or_else(|_| s.to_string())),
                ),
            ],
            Object::Pool(_)
            | Object::Allow(_)
            | Object::Certificate(_)
            | Object::Account(_)
            | Object::Unreadable(_) => Vec::new(),
        }
    }

    fn name(&self) -> Option<&str> {
        match self {
            Object::Pool(p) => Some(&p.name),
            Object::Route(r) => Some(&r.name),
            Object::TcpRoute(r) => Some(&r.name),
            Object::Allow(p) => Some(p),
            Object::Certificate(c) => Some(&c.name),
            Object::Account(_) => None,
            Object::Unreadable(_) => None,
        }
    }
}

/// The JSON stored for an object of this host's state (owned by the API).
pub fn encode(state: &State, kind: Kind, name: &str) -> Option<Vec<u8>> {
    let json = match kind {
        Kind::Pool => state
            .pool(name)
            .filter(|p| p.source == Source::Api)
            .map(serde_json::to_vec),
        Kind::Route => state
            .route(name)
            .filter(|r| r.source == Source::Api)
            .map(serde_json::to_vec),
        Kind::TcpRoute => state
            .tcp_route(name)
            .filter(|r| r.source == Source::Api)
            .map(serde_json::to_vec),
        // Not state objects: written by `cluster::tls`.
        Kind::Allow | Kind::Certificate | Kind::Account => None,
    };
    // The model types serialise infallibly (plain structs and strings).
    json.and_then(Result::ok)
}

/// One object of the view with the revision that last wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its key's mod revision.
    pub mod_revision: i64,
    /// The value as stored (kept to store the view in SQLite as read).
    pub value: Vec<u8>,
    /// The decoded object.
    pub object: Object,
}

/// What a fleet object's placement depends on (see [`Object::depends_on`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Dep {
    /// The pool of that name (the fleet's, or this host's config file's).
    Pool(String),
    /// A listener and SNI (normalised) that only one TCP route may take.
    Slot(String, Option<String>),
}

/// The fleet's objects as of one etcd revision. Cloning is O(1) (persistent maps).
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Every object change up to this etcd revision is in the view (0: never read).
    pub revision: i64,
    /// The write marker's mod revision (0: no write yet).
    pub marker: i64,
    /// The write marker's version: how many fleet writes this view has (etcd counts every
    /// put of a key since its creation; 0: none or unknown). Lag is measured in these.
    pub writes: i64,
    /// The objects; edited through [`View::insert`] and [`View::remove`] only, which keep
    /// `users` in step.
    pub objects: RedBlackTreeMapSync<ObjectId, Entry>,
    /// `(dependency, object)` for every object whose placement depends on another: the
    /// routes of a pool are found without visiting the others (an incremental plan).
    users: RedBlackTreeSetSync<(Dep, ObjectId)>,
}

/// What an update of the view touched, for storing it.
#[derive(Debug, Default)]
pub struct Delta {
    /// Objects written (id, mod revision, value).
    pub put: Vec<(ObjectId, i64, Vec<u8>)>,
    /// Objects deleted.
    pub deleted: Vec<ObjectId>,
}

impl Delta {
    /// Whether an object changed.
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.deleted.is_empty()
    }

    /// The objects written or deleted.
    pub fn ids(&self) -> impl Iterator<Item = &ObjectId> {
        self.put.iter().map(|(id, _, _)| id).chain(&self.deleted)
    }
}

impl View {
    /// The view of a full read at `revision`.
    pub fn from_read(keys: &Keyspace, revision: i64, kvs: Vec<KeyValue>) -> View {
        let mut view = View {
            revision,
            ..View::default()
        };
        for kv in kvs {
            view.put(keys, kv, &mut Delta::default());
        }
        view
    }

    /// The mod revision of an object (0: absent).
    pub fn mod_revision(&self, id: &ObjectId) -> i64 {
        self.objects.get(id).map_or(0, |e| e.mod_revision)
    }

    /// Adds or replaces an object.
    pub fn insert(&mut self, id: ObjectId, entry: Entry) {
        self.unindex(&id);
        for dep in entry.object.depends_on() {
            self.users.insert_mut((dep, id.clone()));
        }
        self.objects.insert_mut(id, entry);
    }

    /// Removes an object; false if it was not there.
    pub fn remove(&mut self, id: &ObjectId) -> bool {
        self.unindex(id);
        self.objects.remove_mut(id)
    }

    fn unindex(&mut self, id: &ObjectId) {
        if let Some(old) = self.objects.get(id) {
            for dep in old.object.depends_on() {
                self.users.remove_mut(&(dep, id.clone()));
            }
        }
    }

    /// The objects that depend on `dep`.
    fn users_of<'a>(&'a self, dep: &'a Dep) -> impl Iterator<Item = &'a ObjectId> + 'a {
        let from = (dep.clone(), (Kind::Pool, String::new()));
        self.users
            .range(from..)
            .take_while(move |(d, _)| d == dep)
            .map(|(_, id)| id)
    }

    /// What the object `id` depends on, in this view.
    fn dependencies(&self, id: &ObjectId) -> Vec<Dep> {
        self.objects
            .get(id)
            .map(|e| e.object.depends_on())
            .unwrap_or_default()
    }

    /// Applies watched events (skipping those at or below the view's revision, seen
    /// already); returns what changed.
    pub fn apply(&mut self, keys: &Keyspace, events: Vec<Event>) -> Delta {
        let mut delta = Delta::default();
        // One transaction's events share a revision: compare with the view as it was
        // before this batch, not as its first event left it.
        let seen = self.revision;
        for event in events {
            match event {
                Event::Put(kv) if kv.mod_revision > seen => self.put(keys, kv, &mut delta),
                Event::Delete(kv) if kv.mod_revision > seen => {
                    self.revision = self.revision.max(kv.mod_revision);
                    if let Key::Object(id) = keys.classify(&kv.key) {
                        if self.remove(&id) {
                            delta.put.retain(|(p, _, _)| p != &id);
                            delta.deleted.push(id);
                        }
                    }
                }
                _ => {}
            }
        }
        delta
    }

    fn put(&mut self, keys: &Keyspace, kv: KeyValue, delta: &mut Delta) {
        match keys.classify(&kv.key) {
            Key::Object(id) => {
                let object = Object::decode(id.0, &id.1, &kv.value);
                delta.deleted.retain(|d| d != &id);
                delta.put.retain(|(p, _, _)| p != &id);
                delta
                    .put
                    .push((id.clone(), kv.mod_revision, kv.value.clone()));
                self.insert(
                    id,
                    Entry {
                        mod_revision: kv.mod_revision,
                        value: kv.value,
                        object,
                    },
                );
            }
            Key::Marker => {
                if kv.mod_revision >= self.marker {
                    self.marker = kv.mod_revision;
                    self.writes = kv.version;
                }
            }
            Key::Foreign => {}
        }
        self.revision = self.revision.max(kv.mod_revision);
    }
}

/// A fleet object this host does not serve as the fleet has it, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excluded {
    /// Kind.
    pub kind: Kind,
    /// Name.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// What the view becomes on this host.
#[derive(Debug, Default)]
pub struct Plan {
    /// The batch (owned by the API) that turns this host's state into the fleet's.
    pub changes: Vec<Change>,
    /// Fleet objects whose name this host's config file owns.
    pub shadowed: Vec<Excluded>,
    /// Fleet objects that cannot apply here.
    pub skipped: Vec<Excluded>,
}

/// The reason shown for a shadowed object.
pub const SHADOWED: &str = "defined in this host's config file";

/// Works out this host's API-owned objects from `view`: every fleet object that applies on
/// top of this host's config-file objects, pools first, then routes and TCP routes (each
/// kind in name order). A name the config file owns is shadowed (the file wins on its
/// host); an object this host cannot take (a listener it does not have, a pool that is
/// missing here) is skipped and reported, never fatal. O(objects): used at start-up, after
/// a full read and after a config reload; a watch batch uses [`replan`].
pub fn plan(state: &State, view: &View) -> Plan {
    let mut scratch = state.clone();
    // Only the config file's objects stay; every API object is re-derived from the view.
    let clear = state.changes_to(&Document::default(), Source::Api);
    let mut out = Plan::default();
    if scratch.apply_batch(&clear, Source::Api).is_err() {
        // Cannot happen for a valid state (deletions of API objects, routes first); then
        // leave the state as it is rather than guess.
        return out;
    }
    // The map's order is the placing order: kinds in pass order, then names.
    // TLS objects are not the state's: `cluster::tls` hands them to the TLS part.
    for (id, entry) in view.objects.iter().filter(|(id, _)| id.0.is_model()) {
        match place(&mut scratch, id, entry) {
            Placed::Served => {}
            Placed::Shadowed(e) => out.shadowed.push(e),
            Placed::Skipped(e) => out.skipped.push(e),
        }
    }
    out.changes = state.changes_to(&scratch.document(Source::Api), Source::Api);
    out
}

/// Where one fleet object ended up on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// Applied as the fleet has it.
    Served,
    /// Hidden by an object of this host's config file.
    Shadowed(Excluded),
    /// Cannot apply here.
    Skipped(Excluded),
}

/// Places one fleet object onto `scratch` (where no API object of its name exists).
fn place(scratch: &mut State, (kind, name): &ObjectId, entry: &Entry) -> Placed {
    let excluded = |reason: String| Excluded {
        kind: *kind,
        name: name.clone(),
        reason,
    };
    let change = match &entry.object {
        Object::Pool(p) => Change::CreatePool(p.as_ref().clone()),
        Object::Route(r) => Change::CreateRoute(r.clone()),
        Object::TcpRoute(r) => Change::CreateTcpRoute(r.clone()),
        Object::Unreadable(reason) => {
            return Placed::Skipped(excluded(format!("unreadable value in etcd: {reason}")))
        }
        // Never under a state kind's key (values decode by their key's kind).
        Object::Allow(_) | Object::Certificate(_) | Object::Account(_) => {
            return Placed::Skipped(excluded("not a pool or route".into()))
        }
    };
    let declared = match kind {
        Kind::Pool => scratch.pool(name).is_some(),
        Kind::Route => scratch.route(name).is_some(),
        Kind::TcpRoute => scratch.tcp_route(name).is_some(),
        Kind::Allow | Kind::Certificate | Kind::Account => false,
    };
    if declared {
        return Placed::Shadowed(excluded(SHADOWED.into()));
    }
    // A persistent state: the copy is cheap, and a refused change leaves `scratch` as it was.
    let mut candidate = scratch.clone();
    match candidate.apply_batch(std::slice::from_ref(&change), Source::Api) {
        Ok(()) => {
            *scratch = candidate;
            Placed::Served
        }
        Err(e) => Placed::Skipped(excluded(e.to_string())),
    }
}

/// What some changed objects of the view change on this host.
#[derive(Debug, Default)]
pub struct Replan {
    /// The batch (owned by the API) that brings those objects here in line with the view.
    pub changes: Vec<Change>,
    /// Where each re-placed object ended up (`None`: it is no longer in the view).
    pub placed: Vec<(ObjectId, Option<Placed>)>,
}

/// [`plan`] for a view that differs from the one `state` was planned from (`old`) only in
/// the objects `changed`: the same result, at a cost that grows with the changed objects
/// and those that depend on them (a pool's routes, the TCP routes of one listener and SNI),
/// not with the fleet's size. `None` when the state does not match the old view (an
/// earlier batch failed to apply): then the caller plans everything.
pub fn replan<'a>(
    state: &State,
    old: &View,
    view: &View,
    changed: impl IntoIterator<Item = &'a ObjectId>,
) -> Option<Replan> {
    // Everything whose placement may differ now: the changed objects, the users of a
    // changed pool, and every TCP route sharing a slot with a changed one (who holds a
    // slot depends on the name order of all its candidates).
    let mut dirty: BTreeSet<ObjectId> = BTreeSet::new();
    let mut deps: BTreeSet<Dep> = BTreeSet::new();
    // TLS objects are the TLS part's (see `Inner::reconcile_changed`).
    for id in changed.into_iter().filter(|id| id.0.is_model()) {
        dirty.insert(id.clone());
        match id.0 {
            Kind::Pool => {
                deps.insert(Dep::Pool(id.1.clone()));
            }
            Kind::Route => {}
            Kind::TcpRoute => {
                for v in [old, view] {
                    deps.extend(
                        v.dependencies(id)
                            .into_iter()
                            .filter(|d| matches!(d, Dep::Slot(..))),
                    );
                }
            }
            Kind::Allow | Kind::Certificate | Kind::Account => {}
        }
    }
    let mut slots: BTreeSet<Dep> = BTreeSet::new();
    for dep in &deps {
        for v in [old, view] {
            for user in v.users_of(dep) {
                if user.0 == Kind::TcpRoute {
                    // A TCP route that now has (or lost) its pool may take a slot.
                    slots.extend(
                        v.dependencies(user)
                            .into_iter()
                            .filter(|d| matches!(d, Dep::Slot(..))),
                    );
                }
                dirty.insert(user.clone());
            }
        }
    }
    for slot in slots.difference(&deps) {
        for v in [old, view] {
            dirty.extend(v.users_of(slot).cloned());
        }
    }

    // Take the dirty objects' API versions off a copy of the state (routes before pools),
    // then place them again in the full plan's order (the set's order).
    let mut scratch = state.clone();
    let mut removals = Vec::new();
    for (kind, name) in dirty.iter().rev() {
        let api = match kind {
            Kind::Pool => scratch.pool(name).is_some_and(|p| p.source == Source::Api),
            Kind::Route => scratch.route(name).is_some_and(|r| r.source == Source::Api),
            Kind::TcpRoute => scratch
                .tcp_route(name)
                .is_some_and(|r| r.source == Source::Api),
            Kind::Allow | Kind::Certificate | Kind::Account => false,
        };
        if api {
            removals.extend(deletion(*kind, name));
        }
    }
    // Fails only if an object outside the dirty set uses a dirty pool: the state does not
    // follow the old view.
    scratch.apply_batch(&removals, Source::Api).ok()?;
    let mut out = Replan::default();
    for id in &dirty {
        let placed = view
            .objects
            .get(id)
            .map(|entry| place(&mut scratch, id, entry));
        out.placed.push((id.clone(), placed));
    }

    // The batch: deletions of routes first and of pools last, as `State::changes_to` orders.
    let mut deletions = Vec::new();
    let mut pool_deletions = Vec::new();
    let mut upserts = Vec::new();
    for (kind, name) in &dirty {
        let (before, after) = match kind {
            Kind::Pool => (
                api_pool(state, name).map(|p| Change::UpdatePool(p.clone())),
                api_pool(&scratch, name).map(|p| Change::UpdatePool(p.clone())),
            ),
            Kind::Route => (
                api_route(state, name).map(|r| Change::UpdateRoute(r.clone())),
                api_route(&scratch, name).map(|r| Change::UpdateRoute(r.clone())),
            ),
            Kind::TcpRoute => (
                api_tcp_route(state, name).map(|r| Change::UpdateTcpRoute(r.clone())),
                api_tcp_route(&scratch, name).map(|r| Change::UpdateTcpRoute(r.clone())),
            ),
            Kind::Allow | Kind::Certificate | Kind::Account => (None, None),
        };
        match (before, after) {
            (None, None) => {}
            (Some(_), None) if *kind == Kind::Pool => pool_deletions.extend(deletion(*kind, name)),
            (Some(_), None) => deletions.extend(deletion(*kind, name)),
            (None, Some(after)) => upserts.push(match after {
                Change::UpdatePool(p) => Change::CreatePool(p),
                Change::UpdateRoute(r) => Change::CreateRoute(r),
                Change::UpdateTcpRoute(r) => Change::CreateTcpRoute(r),
                other => other,
            }),
            (Some(before), Some(after)) if before != after => upserts.push(after),
            (Some(_), Some(_)) => {}
        }
    }
    out.changes = deletions;
    out.changes.extend(upserts);
    out.changes.extend(pool_deletions);
    Some(out)
}

/// The change that deletes the state object `name` of `kind`.
fn deletion(kind: Kind, name: &str) -> Option<Change> {
    let name = name.to_string();
    match kind {
        Kind::Pool => Some(Change::DeletePool { name }),
        Kind::Route => Some(Change::DeleteRoute { name }),
        Kind::TcpRoute => Some(Change::DeleteTcpRoute { name }),
        Kind::Allow | Kind::Certificate | Kind::Account => None,
    }
}

fn api_pool<'a>(state: &'a State, name: &str) -> Option<&'a Pool> {
    state.pool(name).filter(|p| p.source == Source::Api)
}

fn api_route<'a>(state: &'a State, name: &str) -> Option<&'a Route> {
    state.route(name).filter(|r| r.source == Source::Api)
}

fn api_tcp_route<'a>(state: &'a State, name: &str) -> Option<&'a TcpRoute> {
    state.tcp_route(name).filter(|r| r.source == Source::Api)
}

/// The fleet's TLS objects this host does not take, as the TLS part reported them.
#[derive(Debug, Clone, Default)]
pub struct TlsExclusions {
    /// Hidden by this host's config file.
    pub shadowed: Vec<Excluded>,
    /// Unreadable, or refused by the TLS part.
    pub skipped: Vec<Excluded>,
}

/// This host's shadowed and skipped fleet objects, kept up to date batch by batch.
#[derive(Debug, Clone, Default)]
pub struct Exclusions {
    shadowed: BTreeMap<ObjectId, Excluded>,
    skipped: BTreeMap<ObjectId, Excluded>,
    tls: TlsExclusions,
}

impl Exclusions {
    /// The exclusions of a full plan.
    pub fn of(plan: &Plan) -> Exclusions {
        let key = |e: &Excluded| ((e.kind, e.name.clone()), e.clone());
        Exclusions {
            shadowed: plan.shadowed.iter().map(key).collect(),
            skipped: plan.skipped.iter().map(key).collect(),
            tls: TlsExclusions::default(),
        }
    }

    /// Records where the objects of a [`Replan`] ended up.
    pub fn update(&mut self, placed: &[(ObjectId, Option<Placed>)]) {
        for (id, placed) in placed {
            self.shadowed.remove(id);
            self.skipped.remove(id);
            match placed {
                Some(Placed::Shadowed(e)) => {
                    self.shadowed.insert(id.clone(), e.clone());
                }
                Some(Placed::Skipped(e)) => {
                    self.skipped.insert(id.clone(), e.clone());
                }
                Some(Placed::Served) | None => {}
            }
        }
    }

    /// Replaces what the TLS part did not take.
    pub fn set_tls(&mut self, tls: TlsExclusions) {
        self.tls = tls;
    }

    /// Fleet objects whose name this host's config file owns: pools and routes in placing
    /// order, then TLS objects.
    pub fn shadowed(&self) -> Vec<Excluded> {
        let tls = self.tls.shadowed.iter();
        self.shadowed.values().chain(tls).cloned().collect()
    }

    /// Fleet objects that cannot apply here: pools and routes in placing order, then TLS
    /// objects.
    pub fn skipped(&self) -> Vec<Excluded> {
        let tls = self.tls.skipped.iter();
        self.skipped.values().chain(tls).cloned().collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{Balance, PathMatch, Protocol, Upstream};

    fn listeners() -> BTreeMap<String, Protocol> {
        [("web".to_string(), Protocol::Http)].into()
    }

    fn pool(name: &str) -> Pool {
        Pool {
            name: name.into(),
            source: Source::Api,
            balance: Balance::RoundRobin,
            upstreams: vec![Upstream::new("127.0.0.1:9001")],
            health: None,
            connect_timeout: crate::state::default_connect_timeout(),
            response_timeout: crate::state::default_response_timeout(),
            tls: None,
            policy: Default::default(),
            protocol: Default::default(),
        }
    }

    fn route(name: &str, listener: &str, pool: &str) -> Route {
        Route {
            name: name.into(),
            source: Source::Api,
            listener: listener.into(),
            host: None,
            path: PathMatch::Prefix("/".into()),
            pool: pool.into(),
            strip_prefix: false,
            priority: 0,
        }
    }

    fn kv(key: Vec<u8>, value: Vec<u8>, rev: i64) -> KeyValue {
        KeyValue {
            key,
            value,
            mod_revision: rev,
            create_revision: rev,
            ..KeyValue::default()
        }
    }

    #[test]
    fn keys_are_classified_under_the_prefix_only() {
        let keys = Keyspace::new("/proxy/prod/");
        assert_eq!(
            keys.object(Kind::Route, "a"),
            b"/proxy/prod/objects/route/a"
        );
        assert!(matches!(keys.classify(&keys.marker()), Key::Marker));
        assert!(matches!(
            keys.classify(b"/proxy/prod/objects/route/a"),
            Key::Object((Kind::Route, ref n)) if n == "a"
        ));
        assert!(matches!(
            keys.classify(b"/proxy/prod/objects/widget/a"),
            Key::Foreign
        ));
        assert!(matches!(
            keys.classify(b"/proxy/prod/objects/route/"),
            Key::Foreign
        ));
        assert!(matches!(
            keys.classify(b"/proxy/prodx/objects/route/a"),
            Key::Foreign
        ));
    }

    #[test]
    fn events_at_or_below_the_view_revision_are_skipped() {
        let keys = Keyspace::new("/p");
        let value = serde_json::to_vec(&pool("a")).unwrap();
        let mut view = View::from_read(
            &keys,
            5,
            vec![kv(keys.object(Kind::Pool, "a"), value.clone(), 4)],
        );
        // A resumed watch may repeat revision 4: nothing changes.
        let delta = view.apply(
            &keys,
            vec![Event::Delete(kv(keys.object(Kind::Pool, "a"), vec![], 4))],
        );
        assert!(delta.is_empty());
        assert_eq!(view.mod_revision(&(Kind::Pool, "a".into())), 4);
        let delta = view.apply(
            &keys,
            vec![
                Event::Put(kv(keys.marker(), b"n".to_vec(), 6)),
                Event::Delete(kv(keys.object(Kind::Pool, "a"), vec![], 6)),
            ],
        );
        assert_eq!(delta.deleted, vec![(Kind::Pool, "a".to_string())]);
        assert_eq!((view.revision, view.marker), (6, 6));
    }

    #[test]
    fn plan_shadows_declared_names_and_skips_what_cannot_apply() {
        let keys = Keyspace::new("/p");
        let mut state = State::empty(listeners());
        state
            .apply_batch(&[Change::CreatePool(pool("local"))], Source::Declarative)
            .unwrap();
        state
            .apply_batch(&[Change::CreatePool(pool("old"))], Source::Api)
            .unwrap();
        let put = |kind, name: &str, json: Vec<u8>, rev| kv(keys.object(kind, name), json, rev);
        let view = View::from_read(
            &keys,
            9,
            vec![
                put(
                    Kind::Pool,
                    "local",
                    serde_json::to_vec(&pool("local")).unwrap(),
                    2,
                ),
                put(
                    Kind::Pool,
                    "shared",
                    serde_json::to_vec(&pool("shared")).unwrap(),
                    3,
                ),
                put(
                    Kind::Route,
                    "r",
                    serde_json::to_vec(&route("r", "web", "shared")).unwrap(),
                    4,
                ),
                put(
                    Kind::Route,
                    "on-local",
                    serde_json::to_vec(&route("on-local", "web", "local")).unwrap(),
                    5,
                ),
                put(
                    Kind::Route,
                    "foreign",
                    serde_json::to_vec(&route("foreign", "admin", "shared")).unwrap(),
                    6,
                ),
                put(Kind::Route, "junk", b"{".to_vec(), 7),
            ],
        );
        let plan = plan(&state, &view);
        let names = |v: &[Excluded]| v.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&plan.shadowed), ["local"]);
        assert_eq!(names(&plan.skipped), ["foreign", "junk"]);
        assert!(
            plan.skipped[0]
                .reason
                .contains("no listener named \"admin\""),
            "{:?}",
            plan.skipped
        );
        let mut applied = state.clone();
        applied.apply_batch(&plan.changes, Source::Api).unwrap();
        let doc = applied.document(Source::Api);
        let pools: Vec<_> = doc.pools.iter().map(|p| p.name.as_str()).collect();
        let routes: Vec<_> = doc.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(pools, ["shared"]); // "old" is not in the fleet: deleted here
        assert_eq!(routes, ["on-local", "r"]);
        // Planning again on the result changes nothing.
        assert!(super::plan(&applied, &view).changes.is_empty());
    }

    /// A small deterministic generator (xorshift): the same edits on every run.
    struct Edits(u64);

    impl Edits {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len() as u64) as usize]
        }
    }

    /// One random write or deletion of a fleet object, as a watch event at `rev`. Names
    /// are few so that objects collide: routes on pools that come and go, TCP routes
    /// competing for one listener and SNI, names the config file owns, unreadable values.
    fn random_event(keys: &Keyspace, edits: &mut Edits, rev: i64) -> Event {
        let pools = ["p0", "p1", "p2", "p3", "local", "gone"];
        let kind = match edits.below(7) {
            0 | 1 => Kind::Pool,
            2 | 3 => Kind::Route,
            4 | 5 => Kind::TcpRoute,
            // TLS objects share the view but are never placed by the plan.
            _ => Kind::Allow,
        };
        let name = match kind {
            Kind::Pool => edits.pick(&pools[..5]),
            Kind::Route => edits.pick(&["r0", "r1", "r2", "r3", "r4", "local-r"]),
            Kind::TcpRoute => edits.pick(&["t0", "t1", "t2", "t3", "local-t"]),
            Kind::Allow | Kind::Certificate | Kind::Account => edits.pick(&["x.example", "p0"]),
        };
        let key = keys.object(kind, name);
        if edits.below(4) == 0 {
            return Event::Delete(kv(key, Vec::new(), rev));
        }
        let value = match (kind, edits.below(12)) {
            (_, 0) => b"{not json".to_vec(),
            (Kind::Allow | Kind::Certificate | Kind::Account, _) => name.as_bytes().to_vec(),
            (Kind::Pool, n) => {
                let mut p = pool(name);
                p.upstreams = vec![Upstream::new(format!("127.0.0.1:{}", 9000 + n))];
                serde_json::to_vec(&p).unwrap()
            }
            (Kind::Route, _) => {
                let listener = edits.pick(&["web", "web", "web", "admin"]);
                let mut r = route(name, listener, edits.pick(&pools));
                r.priority = edits.below(3) as i32;
                serde_json::to_vec(&r).unwrap()
            }
            (Kind::TcpRoute, _) => {
                let listener = edits.pick(&["tcp", "pass", "pass", "web"]);
                let sni = match edits.below(4) {
                    0 => None,
                    1 => Some("a.example".to_string()),
                    2 => Some("A.Example".to_string()),
                    _ => Some("b.example".to_string()),
                };
                serde_json::to_vec(&TcpRoute {
                    name: name.into(),
                    source: Source::Api,
                    listener: listener.into(),
                    pool: edits.pick(&pools).into(),
                    sni,
                })
                .unwrap()
            }
        };
        Event::Put(kv(key, value, rev))
    }

    #[test]
    fn an_incremental_plan_matches_a_full_plan_over_random_edits() {
        let keys = Keyspace::new("/p");
        let mut host = State::empty(
            [
                ("web".to_string(), Protocol::Http),
                ("tcp".to_string(), Protocol::Tcp),
                ("pass".to_string(), Protocol::TlsPassthrough),
            ]
            .into(),
        );
        // This host's config file: a pool, a route and a TCP route whose names the fleet
        // also uses, and one holding the SNI "b.example" slot.
        host.apply_batch(
            &[
                Change::CreatePool(pool("local")),
                Change::CreateRoute(route("local-r", "web", "local")),
                Change::CreateTcpRoute(TcpRoute {
                    name: "local-t".into(),
                    source: Source::Declarative,
                    listener: "pass".into(),
                    pool: "local".into(),
                    sni: Some("b.example".into()),
                }),
            ],
            Source::Declarative,
        )
        .unwrap();
        for seed in 1..=40u64 {
            let mut edits = Edits(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut view = View::default();
            let mut incremental = host.clone();
            let mut exclusions = Exclusions::default();
            let mut rev = 1;
            for step in 0..60 {
                let events: Vec<Event> = (0..=edits.below(3))
                    .map(|_| {
                        rev += 1;
                        random_event(&keys, &mut edits, rev)
                    })
                    .collect();
                let old = view.clone();
                let delta = view.apply(&keys, events);
                let replan = replan(&incremental, &old, &view, delta.ids())
                    .unwrap_or_else(|| panic!("seed {seed} step {step}: state off the view"));
                incremental
                    .apply_batch(&replan.changes, Source::Api)
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}: {replan:?}"));
                exclusions.update(&replan.placed);

                // The full plan, from the same host with no fleet objects yet.
                let full = plan(&host, &view);
                let mut planned = host.clone();
                planned.apply_batch(&full.changes, Source::Api).unwrap();
                assert_eq!(
                    incremental.document(Source::Api),
                    planned.document(Source::Api),
                    "seed {seed} step {step}"
                );
                assert_eq!(
                    exclusions.shadowed(),
                    full.shadowed,
                    "seed {seed} step {step}"
                );
                assert_eq!(
                    exclusions.skipped(),
                    full.skipped,
                    "seed {seed} step {step}"
                );
            }
        }
    }

    #[test]
    fn a_pool_change_replans_its_users_only() {
        let keys = Keyspace::new("/p");
        let state = State::empty(listeners());
        let mut view = View::default();
        let put = |kind, name: &str, json: Vec<u8>, rev| {
            Event::Put(kv(keys.object(kind, name), json, rev))
        };
        let mut events = vec![
            put(Kind::Pool, "a", serde_json::to_vec(&pool("a")).unwrap(), 2),
            put(Kind::Pool, "b", serde_json::to_vec(&pool("b")).unwrap(), 2),
        ];
        for i in 0..50 {
            let name = format!("r{i}");
            let on = if i % 10 == 0 { "a" } else { "b" };
            events.push(put(
                Kind::Route,
                &name,
                serde_json::to_vec(&route(&name, "web", on)).unwrap(),
                2,
            ));
        }
        view.apply(&keys, events);
        let mut state = state;
        state
            .apply_batch(&plan(&state, &view).changes, Source::Api)
            .unwrap();
        // Deleting pool "a" re-places it and its five routes (now skipped), nothing else.
        let old = view.clone();
        let delta = view.apply(
            &keys,
            vec![Event::Delete(kv(keys.object(Kind::Pool, "a"), vec![], 3))],
        );
        let replan = replan(&state, &old, &view, delta.ids()).unwrap();
        assert_eq!(replan.placed.len(), 6, "{:?}", replan.placed);
        assert_eq!(replan.changes.len(), 6, "{:?}", replan.changes);
        assert!(matches!(replan.changes.last(), Some(Change::DeletePool { name }) if name == "a"));
        let skipped = replan
            .placed
            .iter()
            .filter(|(_, p)| matches!(p, Some(Placed::Skipped(_))))
            .count();
        assert_eq!(skipped, 5);
    }

    /// What one watch batch cost to plan before (a full plan) and after (a replan), at
    /// 100,000 fleet routes. A measurement, not a check: run it with
    /// `cargo test --release -p proxy --lib planning_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn planning_cost_of_one_change_at_100000_routes() {
        let keys = Keyspace::new("/p");
        let mut events = vec![Event::Put(kv(
            keys.object(Kind::Pool, "app"),
            serde_json::to_vec(&pool("app")).unwrap(),
            2,
        ))];
        for i in 0..100_000 {
            let name = format!("r{i}");
            let mut r = route(&name, "web", "app");
            r.host = Some(format!("{name}.example"));
            events.push(Event::Put(kv(
                keys.object(Kind::Route, &name),
                serde_json::to_vec(&r).unwrap(),
                3,
            )));
        }
        let mut view = View::default();
        view.apply(&keys, events);
        let empty = State::empty(listeners());
        let mut state = empty.clone();
        state
            .apply_batch(&plan(&empty, &view).changes, Source::Api)
            .unwrap();
        let old = view.clone();
        let mut r = route("new", "web", "app");
        r.host = Some("new.example".into());
        let delta = view.apply(
            &keys,
            vec![Event::Put(kv(
                keys.object(Kind::Route, "new"),
                serde_json::to_vec(&r).unwrap(),
                4,
            ))],
        );
        let started = std::time::Instant::now();
        let full = plan(&state, &view);
        let full_time = started.elapsed();
        let started = std::time::Instant::now();
        let inc = replan(&state, &old, &view, delta.ids()).unwrap();
        let inc_time = started.elapsed();
        assert_eq!(full.changes, inc.changes);
        println!(
            "one route added to 100,000: full plan {full_time:?}, incremental {inc_time:?} ({} change)",
            inc.changes.len()
        );
    }
}
