use std::sync::Arc;

use super::*;
use crate::state::{
    Balance, Change, Origin, Pool, Protocol, Publish, RegisteredRoute, Source, SourceKind,
    TcpRoute, Upstream,
};
use crate::upstream::Hold;

fn pool(name: &str, upstreams: &[&str]) -> Pool {
    Pool {
        name: name.into(),
        source: Source::Api,
        balance: Balance::Ordered,
        upstreams: upstreams.iter().map(|a| Upstream::new(*a)).collect(),
        health: None,
        connect_timeout: crate::state::default_connect_timeout(),
        response_timeout: crate::state::default_response_timeout(),
        tls: None,
        policy: Default::default(),
        protocol: Default::default(),
    }
}

/// A route of listener `web` to pool `p`, declared through the API.
fn route(name: &str, host: Option<&str>, path: PathMatch, priority: i32, strip: bool) -> Route {
    Route {
        name: name.into(),
        source: Source::Api,
        listener: "web".into(),
        host: host.map(String::from),
        path,
        pool: "p".into(),
        strip_prefix: strip,
        priority,
    }
}

/// The table of `routes` (none strips its prefix), all to one pool.
fn table(routes: &[(&str, Option<&str>, PathMatch, i32)]) -> RoutingTable {
    table_of(
        routes
            .iter()
            .map(|(name, host, path, priority)| route(name, *host, path.clone(), *priority, false)),
    )
}

fn table_of(routes: impl IntoIterator<Item = Route>) -> RoutingTable {
    let mut state = State::empty([("web".to_string(), Protocol::Http)].into());
    let mut changes = vec![Change::CreatePool(pool("p", &["127.0.0.1:1"]))];
    changes.extend(routes.into_iter().map(Change::CreateRoute));
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

#[test]
fn a_large_prefix_table_routes_every_path_through_growth_and_removals() {
    // Enough prefixes on one host for the prefix filter (`filter::FILTER_FROM`), edited
    // incrementally past its growth and past the removals that make it again, then below
    // the size that has one; after each step every prefix still routes, a path under none
    // falls through to the catch-all, and the table routes as one built from scratch.
    let n = filter::FILTER_FROM * 3;
    let mut state = State::empty([("web".to_string(), Protocol::Http)].into());
    let mut table = RoutingTable::build(&state, None);
    let mut setup = vec![
        Change::CreatePool(pool("p", &["127.0.0.1:1"])),
        Change::CreateRoute(route("all", None, prefix("/"), 0, false)),
    ];
    setup.extend((0..n).map(|i| {
        Change::CreateRoute(route(
            &format!("r{i}"),
            None,
            prefix(&format!("/c/{i}/")),
            0,
            false,
        ))
    }));
    assert!(step(&mut state, &mut table, &setup));
    let check = |table: &RoutingTable, live: &dyn Fn(usize) -> bool| {
        for i in 0..n {
            let want = if live(i) {
                format!("r{i}")
            } else {
                "all".to_string()
            };
            assert_eq!(
                name(table, "h", &format!("/c/{i}/page")),
                Some(want.as_str()),
                "/c/{i}/"
            );
        }
        assert_eq!(name(table, "h", "/other/page"), Some("all"));
        assert_eq!(name(table, "h", &format!("/c/{n}/page")), Some("all"));
    };
    check(&table, &|_| true);
    // Removals one batch at a time: every other prefix, then all but the first 100.
    for i in (0..n).step_by(2) {
        let delete = [Change::DeleteRoute {
            name: format!("r{i}"),
        }];
        assert!(step(&mut state, &mut table, &delete));
    }
    check(&table, &|i| i % 2 == 1);
    let delete: Vec<Change> = (100..n)
        .filter(|i| i % 2 == 1)
        .map(|i| Change::DeleteRoute {
            name: format!("r{i}"),
        })
        .collect();
    for change in delete {
        assert!(step(&mut state, &mut table, &[change]));
    }
    check(&table, &|i| i < 100 && i % 2 == 1);
    // And back over the size that has a filter, one route at a time.
    for i in (0..n).filter(|i| i.is_multiple_of(3)) {
        let create = [Change::CreateRoute(route(
            &format!("r{i}"),
            None,
            prefix(&format!("/c/{i}/")),
            0,
            false,
        ))];
        if state.route(&format!("r{i}")).is_none() {
            assert!(step(&mut state, &mut table, &create));
        }
    }
    let live = |i: usize| (i < 100 && i % 2 == 1) || i.is_multiple_of(3);
    check(&table, &live);
    let full = RoutingTable::build(&state, None);
    check(&full, &live);
}

/// Applies `changes` to `state` and `table` the way the writer does; a refused batch
/// changes neither.
fn step(state: &mut State, table: &mut RoutingTable, changes: &[Change]) -> bool {
    let mut next = state.clone();
    if next.apply_batch(changes, Source::Api).is_err() {
        return false;
    }
    let mut touched = Touched::default();
    changes.iter().for_each(|c| touched.add(c));
    *table = table.update(state, &next, &touched);
    *state = next;
    true
}

/// A membership edit applied the way the writer does.
fn step_membership(
    state: &mut State,
    table: &mut RoutingTable,
    edit: impl FnOnce(&mut crate::state::Membership),
) {
    let mut next = state.clone();
    next.edit_membership(edit);
    let touched = next.take_membership_touched();
    *table = table.update(state, &next, &touched);
    *state = next;
}

#[test]
fn a_pool_change_swaps_the_slot_without_touching_routes() {
    let mut state = State::empty([("web".to_string(), Protocol::Http)].into());
    let mut t = RoutingTable::default();
    assert!(step(
        &mut state,
        &mut t,
        &[
            Change::CreatePool(pool("p", &["127.0.0.1:1"])),
            Change::CreateRoute(route("r", None, prefix("/"), 0, false)),
        ],
    ));
    let before = t.lookup("web", "h", "/").expect("route").clone();
    let before_table = t.clone();
    assert!(step(
        &mut state,
        &mut t,
        &[Change::AddUpstream {
            pool: "p".into(),
            upstream: Upstream::new("127.0.0.1:2"),
        }],
    ));
    step_membership(&mut state, &mut t, |m| {
        m.set_members(
            "p",
            Origin::Discovered(SourceKind::Dns),
            vec![Upstream::new("127.0.0.1:3")],
        )
    });
    let after = t.lookup("web", "h", "/").expect("route");
    // The same route entry (nothing recompiled) sees the new pool through its slot, and so
    // does a request that loaded the older table.
    assert!(Arc::ptr_eq(&before, after));
    let addresses = |t: &RoutingTable| -> Vec<String> {
        let entry = t.lookup("web", "h", "/").expect("route");
        entry
            .pool()
            .upstreams()
            .iter()
            .map(|u| u.address.clone())
            .collect()
    };
    let want = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"];
    assert_eq!(addresses(&t), want);
    assert_eq!(addresses(&before_table), want);
}

/// A small deterministic generator (xorshift64*), so a failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const HOSTS: [Option<&str>; 4] = [
    None,
    Some("a.example.com"),
    Some("*.example.com"),
    Some("b.a.example.com"),
];
const PATHS: [&str; 5] = ["/", "/x", "/x/y", "/x/yz", "/z"];
const POOLS: [&str; 4] = ["p0", "p1", "p2", "p3"];
const ADDRESSES: [&str; 4] = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"];

fn random_route(rng: &mut Rng) -> Route {
    let path = rng.pick(&PATHS).to_string();
    Route {
        name: format!("r{}", rng.below(12)),
        source: Source::Api,
        listener: rng.pick(&["web", "web2"]).to_string(),
        host: rng.pick(&HOSTS).map(String::from),
        path: if rng.below(4) == 0 {
            PathMatch::Exact(path)
        } else {
            PathMatch::Prefix(path)
        },
        pool: rng.pick(&POOLS).to_string(),
        strip_prefix: false,
        priority: rng.below(3) as i32,
    }
}

fn random_change(rng: &mut Rng) -> Change {
    let p = rng.pick(&POOLS).to_string();
    match rng.below(10) {
        0 => Change::CreatePool(pool(&p, &[*rng.pick(&ADDRESSES)])),
        1 => Change::UpdatePool(pool(&p, &[*rng.pick(&ADDRESSES), *rng.pick(&ADDRESSES)])),
        2 => Change::DeletePool { name: p },
        3 => Change::AddUpstream {
            pool: p,
            upstream: Upstream::new(*rng.pick(&ADDRESSES)),
        },
        4 => Change::CreateRoute(random_route(rng)),
        5 => Change::UpdateRoute(random_route(rng)),
        6 => Change::DeleteRoute {
            name: format!("r{}", rng.below(12)),
        },
        7 => Change::CreateTcpRoute(TcpRoute {
            name: format!("t{}", rng.below(3)),
            source: Source::Api,
            listener: "pt".into(),
            pool: p,
            sni: rng
                .pick(&[None, Some("a.example.com"), Some("*.example.com")])
                .map(String::from),
        }),
        8 => Change::DeleteTcpRoute {
            name: format!("t{}", rng.below(3)),
        },
        _ => Change::SetUpstreamState {
            pool: p,
            address: rng.pick(&ADDRESSES).to_string(),
            state: *rng.pick(&[
                crate::state::UpstreamState::Active,
                crate::state::UpstreamState::Draining,
            ]),
        },
    }
}

fn random_membership_edit(
    rng: &mut Rng,
    holds: &[Arc<Hold>],
) -> impl FnOnce(&mut crate::state::Membership) {
    let kind = rng.below(4);
    let k = rng.below(3);
    let pool = rng.pick(&POOLS).to_string();
    let address = rng.pick(&ADDRESSES).to_string();
    let http = rng.below(3) != 0;
    let host = rng.pick(&HOSTS).map(String::from);
    let path = rng.pick(&PATHS).to_string();
    let hold = holds[k].clone();
    move |m: &mut crate::state::Membership| {
        let name = format!("registered:{k}");
        match kind {
            0 => m.set_route(
                &name,
                RegisteredRoute {
                    listener: if http { "web".into() } else { "pt".into() },
                    protocol: if http { Protocol::Http } else { Protocol::Tcp },
                    host: if http { host } else { None },
                    path_prefix: if http { path } else { "/".into() },
                    // Usually its own pool; sometimes a defined one, as the table allows.
                    pool: if k == 2 { pool } else { name.clone() },
                    hold,
                },
            ),
            1 => m.remove_route(&name),
            2 => m.set_members(
                &name,
                Origin::Registered(k as u64),
                vec![Upstream::new(address)],
            ),
            _ => m.set_members(
                &pool,
                Origin::Discovered(SourceKind::Etcd),
                vec![Upstream::new(address)],
            ),
        }
    }
}

/// What a table answers for every request the generator can make.
fn decisions(t: &RoutingTable) -> Vec<String> {
    let describe = |pool: Option<Arc<PoolRuntime>>| match pool {
        None => "-".to_string(),
        Some(p) => {
            let members: Vec<String> = p
                .members()
                .map(|(u, o, w)| format!("{}:{}:{w}:{}", u.address, o.label(), u.is_draining()))
                .collect();
            format!("{}[{}]", p.name, members.join(","))
        }
    };
    let mut out = Vec::new();
    for listener in ["web", "web2"] {
        for host in [
            "a.example.com",
            "c.example.com",
            "b.a.example.com",
            "other.org",
        ] {
            for path in ["/", "/x", "/x/", "/x/y", "/x/yz", "/x/y/z", "/z", "/q"] {
                let found = t.lookup(listener, host, path);
                out.push(format!(
                    "{listener} {host}{path} -> {} {}",
                    found.map_or("-", |e| e.route.name.as_str()),
                    describe(found.map(|e| e.pool()))
                ));
            }
        }
        out.push(format!("{listener} has routes: {}", t.has_routes(listener)));
    }
    for sni in [
        None,
        Some("a.example.com"),
        Some("z.example.com"),
        Some("other.org"),
    ] {
        out.push(format!(
            "pt {sni:?} -> {}",
            describe(t.tcp_pool_for_sni("pt", sni))
        ));
    }
    let mut pools: Vec<String> = t.pools().map(|p| describe(Some(p))).collect();
    pools.sort();
    out.extend(pools);
    out
}

#[test]
fn incremental_updates_route_like_a_full_rebuild() {
    let listeners = [
        ("web".to_string(), Protocol::Http),
        ("web2".to_string(), Protocol::Http),
        ("pt".to_string(), Protocol::TlsPassthrough),
    ];
    let holds: Vec<Arc<Hold>> = (0..3)
        .map(|_| Arc::new(Hold::new(10, std::time::Duration::from_secs(1))))
        .collect();
    let mut applied = 0;
    for seed in 1..=30u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut state = State::empty(listeners.clone().into());
        let mut table = RoutingTable::build(&state, None);
        for _ in 0..120 {
            if rng.below(4) == 0 {
                let edit = random_membership_edit(&mut rng, &holds);
                step_membership(&mut state, &mut table, edit);
            } else {
                let size = if rng.below(3) == 0 { 2 } else { 1 };
                let batch: Vec<Change> = (0..size).map(|_| random_change(&mut rng)).collect();
                applied += usize::from(step(&mut state, &mut table, &batch));
            }
            let full = RoutingTable::build(&state, None);
            assert_eq!(decisions(&table), decisions(&full), "seed {seed}");
        }
    }
    // The generator must reach the interesting cases, not only refused batches.
    assert!(applied > 300, "only {applied} batches applied");
}

#[test]
fn large_batches_over_several_hosts_route_like_a_full_rebuild() {
    // Batches of up to 16 route edits that go back and forth between listeners and hosts:
    // the update keeps one host's path index out of the table across consecutive edits,
    // and must put each one back, emptied ones included.
    let listeners = [
        ("web".to_string(), Protocol::Http),
        ("web2".to_string(), Protocol::Http),
    ];
    let mut applied = 0;
    for seed in 1..=20u64 {
        let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
        let mut state = State::empty(listeners.clone().into());
        let mut table = RoutingTable::build(&state, None);
        let pools: Vec<Change> = POOLS
            .iter()
            .map(|p| Change::CreatePool(pool(p, &["127.0.0.1:1"])))
            .collect();
        assert!(step(&mut state, &mut table, &pools));
        for _ in 0..40 {
            // Valid by construction: each change is checked on a copy before it joins.
            let mut scratch = state.clone();
            let mut batch = Vec::new();
            for _ in 0..=rng.below(16) {
                let route = random_route(&mut rng);
                let change = if rng.below(4) == 0 {
                    Change::DeleteRoute { name: route.name }
                } else if scratch.route(&route.name).is_some() {
                    Change::UpdateRoute(route)
                } else {
                    Change::CreateRoute(route)
                };
                if scratch
                    .apply_batch(std::slice::from_ref(&change), Source::Api)
                    .is_ok()
                {
                    batch.push(change);
                }
            }
            applied += batch.len();
            assert!(step(&mut state, &mut table, &batch), "seed {seed}");
            let full = RoutingTable::build(&state, None);
            assert_eq!(decisions(&table), decisions(&full), "seed {seed}");
        }
    }
    assert!(applied > 2000, "only {applied} changes applied");
}

/// `state` with `changes` applied, published to `compiler` as `revision` by an incremental
/// update (the changes marked touched, as the state core's writer publishes them).
fn publish_incremental(
    compiler: &mut dyn Publish,
    revision: u64,
    state: &State,
    changes: &[Change],
) -> State {
    let mut next = state.clone();
    next.apply_batch(changes, Source::Api).expect("valid");
    let mut touched = Touched::default();
    changes.iter().for_each(|c| touched.add(c));
    compiler.publish(revision, &next, Some(&touched));
    next
}

#[test]
fn a_replaced_snapshot_is_never_freed_by_its_reader() {
    let published = Published::new();
    let mut compiler = published.compiler();
    let mut state = State::empty([("web".to_string(), Protocol::Http)].into());
    state
        .apply_batch(
            &[Change::CreatePool(pool("p", &["127.0.0.1:1"]))],
            Source::Api,
        )
        .expect("valid");
    compiler.publish(1, &state, None);
    // A reader (a request, a management call) holds the current snapshot across a publish.
    let reader = published.snapshot();
    let change = Change::CreateRoute(route("r", None, prefix("/"), 0, false));
    publish_incremental(&mut *compiler, 2, &state, &[change]);
    assert_eq!(published.snapshot().revision, 2);
    // The writer keeps a reference of its own, so the reader's is not the last one...
    assert_eq!(Arc::strong_count(&reader), 2);
    assert!(compiler.reclaim(), "still read");
    drop(reader);
    // ...and the writer frees it at its next reclaim.
    assert!(!compiler.reclaim(), "nothing left to free");
}

/// What an entry carries when the attacher below made its attachment: the route's name.
fn attached_name(entry: &RouteEntry) -> Option<String> {
    let attached = entry.series_slot().get()?;
    attached.downcast_ref::<String>().cloned()
}

#[test]
fn published_entries_carry_what_the_attacher_makes_from_the_moment_it_is_given() {
    let published = Published::new();
    let mut compiler = published.compiler();
    let mut state = State::empty([("web".to_string(), Protocol::Http)].into());
    let mut changes = vec![Change::CreatePool(pool("p", &["127.0.0.1:1"]))];
    // Two routes on one host and path (one loses), one on another host, a wildcard.
    changes.push(Change::CreateRoute(route("a", None, prefix("/"), 0, false)));
    changes.push(Change::CreateRoute(route("b", None, prefix("/"), 1, false)));
    changes.push(Change::CreateRoute(route(
        "c",
        Some("h"),
        prefix("/x/"),
        0,
        false,
    )));
    changes.push(Change::CreateRoute(route(
        "d",
        Some("*.w"),
        PathMatch::Exact("/e".into()),
        0,
        false,
    )));
    state.apply_batch(&changes, Source::Api).expect("valid");
    compiler.publish(1, &state, None);
    let names = |table: &RoutingTable| {
        let mut all: Vec<(String, Option<String>)> = table
            .entries()
            .map(|e| (e.route.name.clone(), attached_name(e)))
            .collect();
        all.sort();
        all
    };
    // Before an attacher is given, entries are made with nothing attached.
    let unattached = |list: &[&str]| -> Vec<(String, Option<String>)> {
        list.iter().map(|n| (n.to_string(), None)).collect()
    };
    assert_eq!(
        names(&published.routing()),
        unattached(&["a", "b", "c", "d"])
    );

    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = made.clone();
    published.attach_with(Arc::new(move |route: &Route| {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Arc::new(route.name.clone()) as Arc<dyn Any + Send + Sync>
    }));
    let attached = |list: &[&str]| -> Vec<(String, Option<String>)> {
        list.iter()
            .map(|n| (n.to_string(), Some(n.to_string())))
            .collect()
    };
    // The current table's entries got theirs at once, each made once.
    assert_eq!(names(&published.routing()), attached(&["a", "b", "c", "d"]));
    assert_eq!(made.load(std::sync::atomic::Ordering::Relaxed), 4);
    // A second attacher is not used.
    published.attach_with(Arc::new(|_: &Route| {
        Arc::new(0u8) as Arc<dyn Any + Send + Sync>
    }));

    // An incremental change: the new and the changed route are made with theirs, the
    // others keep their entries (nothing made for them again).
    let edits = [
        Change::CreateRoute(route("e", Some("h"), prefix("/y/"), 0, false)),
        Change::UpdateRoute(route("c", Some("h"), prefix("/z/"), 0, true)),
    ];
    let next = publish_incremental(&mut *compiler, 2, &state, &edits);
    assert_eq!(
        names(&published.routing()),
        attached(&["a", "b", "c", "d", "e"])
    );
    assert_eq!(made.load(std::sync::atomic::Ordering::Relaxed), 6);
    let entry = published.routing();
    let entry = entry.lookup("web", "h", "/z/1").expect("changed route");
    assert_eq!(attached_name(entry).as_deref(), Some("c"));

    // A full rebuild makes every entry anew, each with its attachment.
    compiler.publish(3, &next, None);
    assert_eq!(
        names(&published.routing()),
        attached(&["a", "b", "c", "d", "e"])
    );
    assert_eq!(made.load(std::sync::atomic::Ordering::Relaxed), 11);
}

#[test]
fn strip_prefix_takes_the_matched_prefix_off() {
    let t = table_of(
        [
            ("api", "/api/", true),
            ("v2", "/v2", true),
            ("slashes", "//", true),
            ("kept", "/kept", false),
        ]
        .map(|(name, path, strip)| route(name, None, prefix(path), 0, strip)),
    );
    let strip = |path: &str| t.lookup("web", "h", path).expect("routed").strip(path);
    assert_eq!(strip("/api/v1?x=1").as_deref(), Some("/v1?x=1"));
    assert_eq!(strip("/api/").as_deref(), Some("/"));
    assert_eq!(strip("/v2").as_deref(), Some("/"));
    assert_eq!(strip("/v2/a/b").as_deref(), Some("/a/b"));
    assert_eq!(strip("/v2?q").as_deref(), Some("/?q"));
    // A prefix of slashes takes nothing off: the path goes as it came.
    assert_eq!(strip("//x"), None);
    assert_eq!(strip("/kept/x"), None);
}

#[test]
fn an_entry_and_its_reference_counts_fill_one_cache_line() {
    // `Arc<RouteEntry>`: two counts, then the entry, in one 64-byte block.
    assert!(
        2 * std::mem::size_of::<usize>() + std::mem::size_of::<RouteEntry>() <= 64,
        "RouteEntry is {} bytes",
        std::mem::size_of::<RouteEntry>()
    );
}

#[test]
fn published_tables_and_their_series_are_made_in_the_table_region() {
    crate::allocator::reserve_table_region(64 << 20).expect("reserve the table region");
    let in_region = |p: *const u8| crate::allocator::in_table_region(p);
    let published = Published::new();
    published.attach_with(Arc::new(|route: &Route| {
        Arc::new(route.name.clone()) as Arc<dyn Any + Send + Sync>
    }));
    let mut compiler = published.compiler();
    let mut state = State::empty([("web".to_string(), Protocol::Http)].into());
    let changes = [
        Change::CreatePool(pool("p", &["127.0.0.1:1"])),
        Change::CreateRoute(route("a", None, prefix("/a/"), 0, false)),
    ];
    state.apply_batch(&changes, Source::Api).expect("valid");
    compiler.publish(1, &state, None);
    let check = |table: &RoutingTable, names: &[&str]| {
        let mut seen = Vec::new();
        for entry in table.entries() {
            let name = entry.route.name.clone();
            assert!(in_region(Arc::as_ptr(entry).cast()), "entry {name}");
            let series = entry.series_slot().get().expect("attached");
            assert!(
                in_region(Arc::as_ptr(series).cast::<u8>()),
                "series of {name}"
            );
            seen.push(name);
        }
        seen.sort();
        assert_eq!(seen, names);
    };
    let table = published.routing();
    assert!(in_region(Arc::as_ptr(&table).cast()), "the table");
    check(&table, &["a"]);
    // An incremental change makes its new entry there too.
    let change = Change::CreateRoute(route("b", None, prefix("/b/"), 0, false));
    let next = publish_incremental(&mut *compiler, 2, &state, &[change]);
    check(&published.routing(), &["a", "b"]);
    // What the state keeps is not routing data: it stays on the ordinary heap.
    let kept = next.routes().next().expect("a route");
    assert!(
        !in_region(std::ptr::from_ref(kept).cast()),
        "the state's route"
    );
}
