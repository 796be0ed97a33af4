//! Cost of `RoutingTable::lookup` against the number of routes.
//!
//! Builds the v1 -> v2 migration shape (one host, a catch-all to v1 and one
//! `/content/<n>/` prefix route per migrated path to v2) with 10, 1,000 and 100,000 routes,
//! through the public store (`StateHandle::open` on a temporary SQLite file, as the config
//! file would), then times lookups that hit a migrated prefix (a few hot paths, and paths
//! spread over every route), that fall through to the catch-all, and that find no route.
//!
//! The number of hash probes per lookup does not depend on the number of routes; what
//! does grow is the memory the table spans, so the "spread" column shows the cost of cache
//! misses on a large table and the "hot" column the cost when the busy routes are cached.
//!
//! Run: `cargo run --release -p proxy --example route_lookup` (or `bench/route-lookup.sh`).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use proxy::routing::{Published, RoutingTable};
use proxy::state::{
    default_connect_timeout, default_response_timeout, Balance, Change, Outputs, PathMatch, Pool,
    Protocol, Route, Source, StateHandle, Upstream,
};

const SIZES: [usize; 3] = [10, 1_000, 100_000];
const HOST: &str = "example.com";
/// Distinct request paths per "spread" case: enough that the 100k table is not all in cache.
const PATHS: usize = 1 << 16;
/// Distinct request paths in the "hot" case: the busy part of a site.
const HOT_PATHS: usize = 64;
/// Lookups per timed round, and rounds per case (the median round is reported).
const LOOKUPS_PER_ROUND: usize = 1 << 20;
const ROUNDS: usize = 7;

fn pool(name: &str, address: &str) -> Pool {
    Pool {
        name: name.into(),
        source: Source::Declarative,
        balance: Balance::RoundRobin,
        upstreams: vec![Upstream::new(address)],
        health: None,
        connect_timeout: default_connect_timeout(),
        response_timeout: default_response_timeout(),
        tls: None,
        policy: Default::default(),
        protocol: Default::default(),
    }
}

fn route(name: String, path: PathMatch, pool: &str) -> Route {
    Route {
        name,
        source: Source::Declarative,
        listener: "web".into(),
        host: Some(HOST.into()),
        path,
        pool: pool.into(),
        strip_prefix: false,
        priority: 0,
    }
}

/// The migration shape with `routes` routes in total: the catch-all plus `routes - 1`
/// migrated prefixes.
fn migration(routes: usize) -> Vec<Change> {
    let mut changes = vec![
        Change::CreatePool(pool("v1", "127.0.0.1:9001")),
        Change::CreatePool(pool("v2", "127.0.0.1:9002")),
        Change::CreateRoute(route("site".into(), PathMatch::Prefix("/".into()), "v1")),
    ];
    changes.extend((0..routes - 1).map(|n| {
        Change::CreateRoute(route(
            format!("content-{n}"),
            PathMatch::Prefix(format!("/content/{n}/")),
            "v2",
        ))
    }));
    changes
}

/// A small deterministic generator (xorshift64*), so runs are comparable.
struct Sequence(u64);

impl Sequence {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as usize % n
    }
}

/// Median nanoseconds per lookup of `host` with each of `paths` in turn.
fn time_lookups(table: &RoutingTable, host: &str, paths: &[String]) -> f64 {
    let mut rounds: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            let mut found = 0usize;
            for path in paths.iter().cycle().take(LOOKUPS_PER_ROUND) {
                if black_box(table)
                    .lookup("web", black_box(host), black_box(path))
                    .is_some()
                {
                    found += 1;
                }
            }
            black_box(found);
            start.elapsed()
        })
        .collect();
    rounds.sort();
    rounds[ROUNDS / 2].as_nanos() as f64 / LOOKUPS_PER_ROUND as f64
}

/// The route name `lookup` gives, for checking that each case measures what it claims.
fn matched<'t>(table: &'t RoutingTable, host: &str, path: &str) -> Option<&'t str> {
    table
        .lookup("web", host, path)
        .map(|e| e.route.name.as_str())
}

struct Row {
    routes: usize,
    build: Duration,
    hot: f64,
    hit: f64,
    fallthrough: f64,
    no_route: f64,
}

fn measure(routes: usize, seq: &mut Sequence) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir().context("temporary state dir")?;
    let listeners: BTreeMap<String, Protocol> = [("web".to_string(), Protocol::Http)].into();
    let outputs = Outputs {
        publish: Published::new().compiler(),
        write_latency: Box::new(|_| {}),
    };
    let handle = StateHandle::open(dir.path(), listeners, &migration(routes), outputs)
        .with_context(|| format!("opening a store with {routes} routes"))?;
    let snapshot = handle.snapshot();
    if snapshot.state.routes().count() != routes {
        bail!(
            "expected {routes} routes, the store holds {}",
            snapshot.state.routes().count()
        );
    }
    // Compile once more on its own to time the build without SQLite.
    let start = Instant::now();
    let table = RoutingTable::build(&snapshot.state, None);
    let build = start.elapsed();

    let migrated = routes - 1;
    let hits: Vec<String> = (0..PATHS)
        .map(|_| format!("/content/{}/article.html", seq.below(migrated)))
        .collect();
    let fallthrough: Vec<String> = (0..PATHS)
        .map(|_| format!("/archive/{}/article.html", seq.below(migrated)))
        .collect();
    match matched(&table, HOST, &hits[0]) {
        Some(name) if name.starts_with("content-") => {}
        other => bail!("{} routed to {other:?}, expected a content route", hits[0]),
    }
    if matched(&table, HOST, &fallthrough[0]) != Some("site") {
        bail!("{} did not fall through to the catch-all", fallthrough[0]);
    }
    if matched(&table, "other.example.org", &hits[0]).is_some() {
        bail!("a host without routes found one");
    }

    Ok(Row {
        routes,
        build,
        hot: time_lookups(&table, HOST, &hits[..HOT_PATHS]),
        hit: time_lookups(&table, HOST, &hits),
        fallthrough: time_lookups(&table, HOST, &fallthrough),
        no_route: time_lookups(&table, "other.example.org", &hits),
    })
}

fn main() -> anyhow::Result<()> {
    let mut seq = Sequence(0x9e37_79b9_7f4a_7c15);
    let rows = SIZES
        .iter()
        .map(|&n| measure(n, &mut seq))
        .collect::<anyhow::Result<Vec<Row>>>()?;

    println!(
        "RoutingTable::lookup, ns per lookup (median of {ROUNDS} rounds of {LOOKUPS_PER_ROUND})"
    );
    println!("  hit hot:    {HOT_PATHS} distinct paths under migrated prefixes");
    println!("  hit spread: {PATHS} distinct paths spread over all migrated prefixes");
    println!("  catch-all:  {PATHS} paths under no migrated prefix (falls to the \"/\" route)");
    println!("  no route:   a host without routes");
    println!(
        "{:>8}  {:>9}  {:>8}  {:>10}  {:>9}  {:>8}",
        "routes", "build ms", "hit hot", "hit spread", "catch-all", "no route"
    );
    for r in &rows {
        println!(
            "{:>8}  {:>9.2}  {:>8.1}  {:>10.1}  {:>9.1}  {:>8.1}",
            r.routes,
            r.build.as_secs_f64() * 1e3,
            r.hot,
            r.hit,
            r.fallthrough,
            r.no_route
        );
    }
    if let (Some(small), Some(large)) = (rows.first(), rows.last()) {
        println!(
            "ratio {}/{}: hit hot {:.2}x, hit spread {:.2}x, catch-all {:.2}x, no route {:.2}x",
            large.routes,
            small.routes,
            large.hot / small.hot,
            large.hit / small.hit,
            large.fallthrough / small.fallthrough,
            large.no_route / small.no_route
        );
    }
    Ok(())
}
