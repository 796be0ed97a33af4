//! The status page's document (`/ui/api/status` on the admin listener): what the gRPC
//! `Status`, `ListPools`, `ListCertificates`, `ListSources` and `ListRegistrations` calls
//! report, read through the same functions, in one JSON answer, with the recent rates and
//! a list of the problems worth a look.
//!
//! Read-only by construction: its [`StatusSources`] are only read (snapshots and
//! listings). Private keys, tokens and header values are never read into it:
//! certificates contribute their public facts, registrations whether they brought a
//! certificate, discovery sources a target with credentials cut out.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use proxy_proto::v1 as pb;
use serde::Serialize;

use super::{convert, ListenerInfo};
use crate::discovery::Discovery;
use crate::registration::Registry;
use crate::routing::Published;
use crate::telemetry::admin::StatusReport;
use crate::telemetry::history::{History, RouteRates};
use crate::telemetry::Metrics;
use crate::tls::Tls;
use crate::Shutdown;

/// A certificate expiring within this many days is flagged.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// Longest error text a discovery source shows (they quote whole hook outputs).
const ERROR_TEXT_LIMIT: usize = 300;

/// Builds the status document from its sources and the rate history.
#[derive(Debug)]
pub struct StatusPage {
    sources: StatusSources,
    history: Arc<History>,
}

/// What the status page reads: the parts of the daemon the management calls it mirrors
/// read.
#[derive(Debug)]
pub struct StatusSources {
    /// The published routing tables (the state with run-time pool health and load).
    pub routing: Published,
    /// The listening sockets.
    pub listeners: Vec<ListenerInfo>,
    /// Per-listener connection counts.
    pub metrics: Arc<Metrics>,
    /// Live registrations.
    pub registry: Arc<Registry>,
    /// Whether the daemon drains.
    pub shutdown: Shutdown,
    /// When the daemon started.
    pub started: Instant,
    /// Certificates (`None` where TLS does not run).
    pub tls: Option<Arc<Tls>>,
    /// The running discovery sources.
    pub discovery: Discovery,
}

/// The whole document.
#[derive(Debug, Serialize)]
pub struct StatusDocument {
    /// The process.
    pub daemon: DaemonView,
    /// Configured listeners.
    pub listeners: Vec<ListenerView>,
    /// HTTP routes: the state's and the registered ones.
    pub routes: Vec<RouteView>,
    /// TCP routes.
    pub tcp_routes: Vec<TcpRouteView>,
    /// Pools with their upstreams as they run.
    pub pools: Vec<PoolView>,
    /// Certificates in use (public facts only).
    pub certificates: Vec<CertificateView>,
    /// Discovery sources.
    pub discovery: Vec<SourceView>,
    /// Live registrations.
    pub registrations: Vec<RegistrationView>,
    /// Routes made by registrations, live or held.
    pub registered_routes: Vec<RegisteredRouteView>,
    /// Whole-daemon rates over the last minutes.
    pub rates: TotalRates,
    /// What needs a look, worst first.
    pub problems: Vec<Problem>,
}

/// The process.
#[derive(Debug, Serialize)]
pub struct DaemonView {
    /// Crate version.
    pub version: &'static str,
    /// Process id.
    pub pid: u32,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// Revision of the state snapshot served.
    pub revision: u64,
    /// Whether it stopped accepting (drain, stop or upgrade handoff).
    pub draining: bool,
    /// When this document was made, Unix milliseconds.
    pub now_unix_ms: u64,
}

/// A listener.
#[derive(Debug, Serialize)]
pub struct ListenerView {
    /// Name.
    pub name: String,
    /// Protocol.
    pub protocol: &'static str,
    /// Bound address.
    pub address: String,
    /// Client connections open now.
    pub connections: i64,
}

/// An HTTP route.
#[derive(Debug, Serialize)]
pub struct RouteView {
    /// Name.
    pub name: String,
    /// Listener.
    pub listener: String,
    /// Host it matches (empty: any).
    pub host: String,
    /// Path it matches.
    pub path: String,
    /// `prefix` or `exact`.
    pub path_match: &'static str,
    /// Pool it forwards to.
    pub pool: String,
    /// `file`, `api` or `registration`.
    pub source: &'static str,
    /// Requests answered since start.
    pub requests: u64,
    /// Of which 5xx.
    pub errors: u64,
    /// Requests per second, oldest first (the last is the latest).
    pub requests_per_s: Vec<f64>,
    /// 5xx share per interval.
    pub error_ratio: Vec<f64>,
    /// Its pool has no member that can take a request.
    pub pool_down: bool,
    /// It is held (registered, no live instance).
    pub held: bool,
}

/// A TCP route.
#[derive(Debug, Serialize)]
pub struct TcpRouteView {
    /// Name.
    pub name: String,
    /// Listener.
    pub listener: String,
    /// SNI it matches (empty: any).
    pub sni: String,
    /// Pool.
    pub pool: String,
    /// `file` or `api`.
    pub source: &'static str,
}

/// A pool.
#[derive(Debug, Serialize)]
pub struct PoolView {
    /// Name.
    pub name: String,
    /// `file`, `api` or `registration`.
    pub source: &'static str,
    /// Balancing.
    pub balance: &'static str,
    /// Health check path (`None`: no active check).
    pub health_check: Option<String>,
    /// Members that can take a request now.
    pub available: usize,
    /// Members.
    pub upstreams: Vec<UpstreamView>,
}

/// An upstream as it runs.
#[derive(Debug, Serialize)]
pub struct UpstreamView {
    /// `host:port` or `unix:/path`.
    pub address: String,
    /// Weight.
    pub weight: u32,
    /// `static`, `etcd`, `dns`, `exec`, `file` or `registration/N`.
    pub origin: String,
    /// `active` or `draining`.
    pub state: &'static str,
    /// `healthy` (check passes), `up` (no check, not ejected), `down` (check fails) or
    /// `ejected` (skipped after a failed connection).
    pub health: &'static str,
    /// Requests and streams in flight.
    pub in_flight: usize,
}

/// A certificate.
#[derive(Debug, Serialize)]
pub struct CertificateView {
    /// Stored name.
    pub name: String,
    /// DNS names it covers.
    pub names: Vec<String>,
    /// `file`, `api`, `acme` or `registered`.
    pub source: &'static str,
    /// Issuer DN.
    pub issuer: String,
    /// Validity start, Unix seconds.
    pub not_before: i64,
    /// Validity end, Unix seconds.
    pub not_after: i64,
    /// Whole days until `not_after` (negative once expired).
    pub days_left: i64,
}

/// A discovery source.
#[derive(Debug, Serialize)]
pub struct SourceView {
    /// Pool it feeds.
    pub pool: String,
    /// `etcd`, `dns`, `exec` or `file`.
    pub kind: &'static str,
    /// What it watches (credentials and command arguments left out).
    pub target: String,
    /// Upstreams it contributes.
    pub members: usize,
    /// Whether its last attempt succeeded.
    pub ok: bool,
    /// Last success, Unix ms (0: never).
    pub last_success_unix_ms: u64,
    /// Last failure's message (empty: none).
    pub last_error: String,
}

/// A live registration.
#[derive(Debug, Serialize)]
pub struct RegistrationView {
    /// Id.
    pub id: u64,
    /// Service name it gave.
    pub name: String,
    /// Route it serves.
    pub route: String,
    /// Listener.
    pub listener: String,
    /// Address of that listener.
    pub address: String,
    /// Where the proxy dials it.
    pub endpoint: String,
    /// Whether it brought a certificate (never the certificate or its key).
    pub tls: bool,
    /// When it registered, Unix ms.
    pub since_unix_ms: u64,
}

/// A route made by registrations.
#[derive(Debug, Serialize)]
pub struct RegisteredRouteView {
    /// Route name.
    pub route: String,
    /// Listener.
    pub listener: String,
    /// Live instances.
    pub instances: usize,
    /// While held: until when, Unix ms (0: not held).
    pub held_until_unix_ms: u64,
    /// Requests or connections queued for it.
    pub waiting: usize,
}

/// Whole-daemon rates.
#[derive(Debug, Serialize)]
pub struct TotalRates {
    /// Seconds between samples.
    pub sample_seconds: u64,
    /// End of each interval, Unix ms.
    pub at_unix_ms: Vec<u64>,
    /// Requests per second.
    pub requests_per_s: Vec<f64>,
    /// Connections open.
    pub connections: Vec<i64>,
}

/// Something that needs a look.
#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// `error` or `warning` (sorts errors first).
    pub severity: &'static str,
    /// `pool`, `upstream`, `certificate`, `discovery`, `route` or `daemon`.
    pub kind: &'static str,
    /// The object's name.
    pub subject: String,
    /// What is wrong, for a person.
    pub message: String,
}

fn unix_ms(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn source_name(source: i32) -> &'static str {
    match pb::Source::try_from(source) {
        Ok(pb::Source::Declarative) => "file",
        Ok(pb::Source::Api) => "api",
        _ => "unknown",
    }
}

fn balance_name(balance: i32) -> &'static str {
    match pb::Balance::try_from(balance) {
        Ok(pb::Balance::Ordered) => "ordered",
        Ok(pb::Balance::LeastConn) => "least_conn",
        _ => "round_robin",
    }
}

/// A discovery target fit to show: URLs lose their `user:password@`, a hook command
/// shows only its program (arguments may carry tokens).
fn shown_target(kind: &str, target: &str) -> String {
    if kind == "exec" {
        return target.split_whitespace().next().unwrap_or("").to_owned();
    }
    target
        .split([',', ' '])
        .filter(|part| !part.is_empty())
        .map(|part| match (part.find("://"), part.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}{}", &part[..scheme + 3], &part[at + 1..])
            }
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(ERROR_TEXT_LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// One route's counters and rates over every pool it forwarded to.
#[derive(Default)]
struct RouteSum {
    requests: u64,
    errors: u64,
    requests_per_s: Vec<f64>,
    error_ratio: Vec<f64>,
}

/// Sums per-pool series of one route (a route that changed pool has one per pool).
fn add_series(into: &mut Vec<f64>, from: &[f64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0.0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

impl StatusPage {
    /// A page over `sources`, with rates from `history`.
    pub fn new(sources: StatusSources, history: Arc<History>) -> StatusPage {
        StatusPage { sources, history }
    }

    /// Gathers the document now.
    pub async fn document(&self) -> StatusDocument {
        let sources = &self.sources;
        let snap = sources.routing.snapshot();
        let rates = self.history.rates();
        let mut problems = Vec::new();

        let listeners = sources
            .listeners
            .iter()
            .map(|l| ListenerView {
                name: l.name.clone(),
                protocol: l.protocol.as_str(),
                address: l.bound.to_string(),
                connections: sources
                    .metrics
                    .listener_connections(&l.name, l.protocol.as_str()),
            })
            .collect();

        let pools = self.pools(&snap, &mut problems);
        let down_pools: BTreeSet<&str> = pools
            .iter()
            .filter(|p| p.available == 0)
            .map(|p| p.name.as_str())
            .collect();

        let registered = sources.registry.routes().await;
        let registrations = sources.registry.registrations().await;
        let mut route_rates: BTreeMap<(&str, &str), RouteSum> = BTreeMap::new();
        for r in &rates.routes {
            let RouteRates {
                listener,
                route,
                requests,
                errors,
                ..
            } = r;
            let sum = route_rates.entry((listener, route)).or_default();
            sum.requests += requests;
            sum.errors += errors;
            add_series(&mut sum.requests_per_s, &r.requests_per_s);
            // Ratios of different pools cannot be summed; the latest pool's stands.
            sum.error_ratio.clone_from(&r.error_ratio);
        }
        let mut routes: Vec<RouteView> = snap
            .state
            .routes()
            .map(convert::route_proto)
            .map(|r| {
                let (path, path_match) = match r.path {
                    Some(pb::route::Path::PathExact(p)) => (p, "exact"),
                    Some(pb::route::Path::PathPrefix(p)) => (p, "prefix"),
                    None => ("/".to_owned(), "prefix"),
                };
                RouteView {
                    pool_down: down_pools.contains(r.pool.as_str()),
                    name: r.name,
                    listener: r.listener,
                    host: r.host,
                    path,
                    path_match,
                    pool: r.pool,
                    source: source_name(r.source),
                    requests: 0,
                    errors: 0,
                    requests_per_s: Vec::new(),
                    error_ratio: Vec::new(),
                    held: false,
                }
            })
            .collect();
        routes.extend(registered.iter().map(|r| RouteView {
            name: r.route.clone(),
            listener: r.listener.clone(),
            host: r.host.clone().unwrap_or_default(),
            path: r.path_prefix.clone(),
            path_match: "prefix",
            pool: r.pool.clone(),
            source: "registration",
            requests: 0,
            errors: 0,
            requests_per_s: Vec::new(),
            error_ratio: Vec::new(),
            pool_down: r.instances == 0,
            held: r.held_until.is_some(),
        }));
        for route in &mut routes {
            if let Some(sum) = route_rates.get(&(route.listener.as_str(), route.name.as_str())) {
                route.requests = sum.requests;
                route.errors = sum.errors;
                route.requests_per_s.clone_from(&sum.requests_per_s);
                route.error_ratio.clone_from(&sum.error_ratio);
            }
            if route.pool_down && !route.held && route.source != "registration" {
                problems.push(Problem {
                    severity: "error",
                    kind: "route",
                    subject: route.name.clone(),
                    message: format!(
                        "pool {} has no upstream that can take its requests",
                        route.pool
                    ),
                });
            }
        }

        let registered_routes = registered
            .into_iter()
            .map(|r| {
                if let Some(until) = r.held_until {
                    let left = until
                        .duration_since(SystemTime::now())
                        .map_or(0, |d| d.as_secs());
                    problems.push(Problem {
                        severity: "warning",
                        kind: "route",
                        subject: r.route.clone(),
                        message: format!(
                            "held: no registered instance; {} waiting, served 503 in {left}s unless one registers",
                            r.waiting
                        ),
                    });
                }
                RegisteredRouteView {
                    route: r.route,
                    listener: r.listener,
                    instances: r.instances,
                    held_until_unix_ms: unix_ms(r.held_until),
                    waiting: r.waiting,
                }
            })
            .collect();

        let registrations = registrations
            .into_iter()
            .map(|r| RegistrationView {
                id: r.id,
                name: r.claim.name.clone(),
                route: r.route,
                listener: r.listener,
                address: r.address.to_string(),
                endpoint: r.claim.endpoint.clone(),
                tls: r.claim.tls.is_some(),
                since_unix_ms: unix_ms(Some(r.since)),
            })
            .collect();

        let tcp_routes = snap
            .state
            .tcp_routes()
            .map(convert::tcp_route_proto)
            .map(|r| TcpRouteView {
                name: r.name,
                listener: r.listener,
                sni: r.sni,
                pool: r.pool,
                source: source_name(r.source),
            })
            .collect();

        let certificates = self.certificates(&mut problems);
        let discovery = self.discovery(&mut problems);

        if sources.shutdown.is_triggered() {
            problems.push(Problem {
                severity: "warning",
                kind: "daemon",
                subject: format!("pid {}", std::process::id()),
                message: "draining: no longer accepting; a successor may be serving".into(),
            });
        }
        problems.sort();

        StatusDocument {
            daemon: DaemonView {
                version: env!("CARGO_PKG_VERSION"),
                pid: std::process::id(),
                uptime_seconds: sources.started.elapsed().as_secs(),
                revision: snap.revision,
                draining: sources.shutdown.is_triggered(),
                now_unix_ms: unix_ms(Some(SystemTime::now())),
            },
            listeners,
            routes,
            tcp_routes,
            pools,
            certificates,
            discovery,
            registrations,
            registered_routes,
            rates: TotalRates {
                sample_seconds: crate::telemetry::history::SAMPLE_EVERY.as_secs(),
                at_unix_ms: rates.at_unix_ms,
                requests_per_s: rates.requests_per_s,
                connections: rates.connections,
            },
            problems,
        }
    }

    /// The pools of the state (as `ListPools` reports them) and those only registrations
    /// made, each upstream with its run-time health and load.
    fn pools(&self, snap: &crate::routing::Snapshot, problems: &mut Vec<Problem>) -> Vec<PoolView> {
        let routing = &snap.routing;
        let runtime_of = |pool: &str, address: &str| {
            routing
                .pool(pool)
                .and_then(|p| p.upstreams().iter().find(|u| u.address == address).cloned())
        };
        let health = |rt: Option<&crate::upstream::UpstreamRuntime>, checked: bool| match rt {
            Some(rt) if rt.is_ejected() => "ejected",
            Some(rt) if !rt.is_healthy() => "down",
            _ if checked => "healthy",
            _ => "up",
        };
        let mut pools: Vec<PoolView> = snap
            .state
            .pools()
            .map(|p| convert::pool_proto(p, Some(routing)))
            .map(|p| {
                let checked = p.health_check.is_some();
                let upstreams = p
                    .upstreams
                    .iter()
                    .map(|u| {
                        let rt = runtime_of(&p.name, &u.address);
                        UpstreamView {
                            address: u.address.clone(),
                            weight: u.weight,
                            origin: u.origin.clone(),
                            state: if u.state == pb::UpstreamState::Draining as i32 {
                                "draining"
                            } else {
                                "active"
                            },
                            health: health(rt.as_deref(), checked),
                            in_flight: rt.as_ref().map_or(0, |rt| rt.in_flight()),
                        }
                    })
                    .collect();
                PoolView {
                    name: p.name.clone(),
                    source: source_name(p.source),
                    balance: balance_name(p.balance),
                    health_check: p.health_check.map(|h| {
                        if h.path.is_empty() {
                            "tcp connect".to_owned()
                        } else {
                            format!("GET {}", h.path)
                        }
                    }),
                    available: 0,
                    upstreams,
                }
            })
            .collect();
        let defined: BTreeSet<String> = pools.iter().map(|p| p.name.clone()).collect();
        for runtime in routing.pools().filter(|p| !defined.contains(&p.name)) {
            let upstreams = runtime
                .members()
                .map(|(rt, origin, weight)| UpstreamView {
                    address: rt.address.clone(),
                    weight,
                    origin: origin.label(),
                    state: if rt.is_draining() {
                        "draining"
                    } else {
                        "active"
                    },
                    health: health(Some(rt.as_ref()), false),
                    in_flight: rt.in_flight(),
                })
                .collect();
            pools.push(PoolView {
                name: runtime.name.clone(),
                source: "registration",
                balance: "round_robin",
                health_check: None,
                available: 0,
                upstreams,
            });
        }
        for pool in &mut pools {
            pool.available = pool
                .upstreams
                .iter()
                .filter(|u| u.state == "active" && matches!(u.health, "healthy" | "up"))
                .count();
            for u in &pool.upstreams {
                if matches!(u.health, "down" | "ejected") {
                    problems.push(Problem {
                        severity: "error",
                        kind: "upstream",
                        subject: format!("{}/{}", pool.name, u.address),
                        message: if u.health == "down" {
                            "health check failing".to_owned()
                        } else {
                            "ejected after a failed connection".to_owned()
                        },
                    });
                }
            }
            // A registration pool without members is a held route, reported as such.
            if pool.available == 0 && pool.source != "registration" {
                problems.push(Problem {
                    severity: "error",
                    kind: "pool",
                    subject: pool.name.clone(),
                    message: format!(
                        "no upstream can take requests ({} known)",
                        pool.upstreams.len()
                    ),
                });
            }
        }
        pools
    }

    fn certificates(&self, problems: &mut Vec<Problem>) -> Vec<CertificateView> {
        let Some(tls) = &self.sources.tls else {
            return Vec::new();
        };
        let now = crate::tls::certs::unix_now();
        let mut certificates: Vec<CertificateView> = tls
            .certificates()
            .into_iter()
            .map(|c| {
                let days_left = (c.not_after - now).div_euclid(86_400);
                if c.not_after <= now {
                    problems.push(Problem {
                        severity: "error",
                        kind: "certificate",
                        subject: c.name.clone(),
                        message: "expired".into(),
                    });
                } else if days_left < EXPIRY_WARNING_DAYS {
                    problems.push(Problem {
                        severity: "warning",
                        kind: "certificate",
                        subject: c.name.clone(),
                        message: format!("expires in {days_left} days"),
                    });
                }
                CertificateView {
                    name: c.name,
                    names: c.names,
                    source: c.source.as_str(),
                    issuer: c.issuer,
                    not_before: c.not_before,
                    not_after: c.not_after,
                    days_left,
                }
            })
            .collect();
        certificates.sort_by(|a, b| a.name.cmp(&b.name));
        certificates
    }

    fn discovery(&self, problems: &mut Vec<Problem>) -> Vec<SourceView> {
        self.sources
            .discovery
            .reports()
            .into_iter()
            .map(|r| {
                let kind = r.kind.as_str();
                let ok = !r.is_failing();
                let last_error = r.last_error.map(|(_, e)| shorten(&e)).unwrap_or_default();
                if !ok {
                    problems.push(Problem {
                        severity: "error",
                        kind: "discovery",
                        subject: format!("{} ({kind})", r.pool),
                        message: format!("failing: {last_error}"),
                    });
                }
                SourceView {
                    target: shown_target(kind, &r.target),
                    pool: r.pool,
                    kind,
                    members: r.members,
                    ok,
                    last_success_unix_ms: unix_ms(r.last_success),
                    last_error,
                }
            })
            .collect()
    }
}

impl StatusReport for StatusPage {
    fn json(&self) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send + '_>> {
        Box::pin(async move {
            let document = self.document().await;
            serde_json::to_vec(&document)
                .unwrap_or_else(|e| format!("{{\"error\":\"status document: {e}\"}}").into_bytes())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_lose_credentials_and_hook_arguments() {
        assert_eq!(
            shown_target(
                "etcd",
                "http://root:s3cret@10.0.0.1:2379,http://10.0.0.2:2379 /srv/api"
            ),
            "http://10.0.0.1:2379 http://10.0.0.2:2379 /srv/api"
        );
        assert_eq!(
            shown_target("exec", "/usr/bin/lookup --token abc123"),
            "/usr/bin/lookup"
        );
        assert_eq!(
            shown_target("dns", "api.internal:8080"),
            "api.internal:8080"
        );
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        let long = "é".repeat(ERROR_TEXT_LIMIT + 5);
        let cut = shorten(&long);
        assert_eq!(cut.chars().count(), ERROR_TEXT_LIMIT + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(shorten("short"), "short");
    }
}
