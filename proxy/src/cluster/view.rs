//! The fleet's objects as this node last read them from etcd ([`View`]), where they live
//! in etcd ([`Keyspace`]), and what they become on this host ([`plan`]).

use std::fmt;

use rpds::RedBlackTreeMapSync;

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

/// The fleet's objects as of one etcd revision. Cloning is O(1) (persistent map).
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Every object change up to this etcd revision is in the view (0: never read).
    pub revision: i64,
    /// The write marker's mod revision (0: no write yet).
    pub marker: i64,
    /// The objects.
    pub objects: RedBlackTreeMapSync<ObjectId, Entry>,
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
                        if self.objects.contains_key(&id) {
                            self.objects.remove_mut(&id);
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
                self.objects.insert_mut(
                    id,
                    Entry {
                        mod_revision: kv.mod_revision,
                        value: kv.value,
                        object,
                    },
                );
            }
            Key::Marker => self.marker = self.marker.max(kv.mod_revision),
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
/// top of this host's config-file objects, pools first, then routes and TCP routes. A name
/// the config file owns is shadowed (the file wins on its host); an object this host
/// cannot take (a listener it does not have, a pool that is missing here) is skipped and
/// reported, never fatal.
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
    for pass in [Kind::Pool, Kind::Route, Kind::TcpRoute] {
        for ((kind, name), entry) in view.objects.iter() {
            if *kind != pass {
                continue;
            }
            let change = match &entry.object {
                Object::Pool(p) => Change::CreatePool(p.as_ref().clone()),
                Object::Route(r) => Change::CreateRoute(r.clone()),
                Object::TcpRoute(r) => Change::CreateTcpRoute(r.clone()),
                Object::Allow(_) | Object::Certificate(_) | Object::Account(_) => continue,
                Object::Unreadable(reason) => {
                    out.skipped.push(Excluded {
                        kind: *kind,
                        name: name.clone(),
                        reason: format!("unreadable value in etcd: {reason}"),
                    });
                    continue;
                }
            };
            let declared = match kind {
                Kind::Pool => scratch.pool(name).is_some(),
                Kind::Route => scratch.route(name).is_some(),
                Kind::TcpRoute => scratch.tcp_route(name).is_some(),
                Kind::Allow | Kind::Certificate | Kind::Account => continue,
            };
            if declared {
                out.shadowed.push(Excluded {
                    kind: *kind,
                    name: name.clone(),
                    reason: SHADOWED.into(),
                });
                continue;
            }
            let mut candidate = scratch.clone();
            match candidate.apply_batch(std::slice::from_ref(&change), Source::Api) {
                Ok(()) => scratch = candidate,
                Err(e) => out.skipped.push(Excluded {
                    kind: *kind,
                    name: name.clone(),
                    reason: e.to_string(),
                }),
            }
        }
    }
    out.changes = state.changes_to(&scratch.document(Source::Api), Source::Api);
    out
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
}
