//! The daemon's metrics: one [`Metrics`] per daemon, exposed as Prometheus text on the admin
//! listener and, when configured, exported through OTLP.
//!
//! Recording never takes a lock once a series exists: counters and histograms are atomics.
//! A route keeps its series (in its [`Attachment`]), and the series of a pool are found
//! through a lock-free snapshot ([`arc_swap::ArcSwap`]); all are keyed by names from the
//! configuration, never by anything the client sent. A write lock is taken only the first
//! time a route, pool or listener is seen; a request no route answered finds its series
//! under a read lock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use rpds::HashTrieMapSync;

use super::histogram::{Counts, DurationHistogram, REQUEST_BOUNDS};
use super::otlp::Instruments;
use super::StateFeed;
use crate::routing::{Attacher, Attachment, KeyHasher, Published};
use crate::state::Route;

/// Labels of per-listener connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
    protocol: &'static str,
}

/// Labels of per-listener counts by cause (a phase or a reason).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerCauseLabels {
    listener: String,
    protocol: &'static str,
    cause: &'static str,
}

/// Labels of bytes forwarded by stream listeners, by direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerDirectionLabels {
    listener: String,
    protocol: &'static str,
    direction: &'static str,
}

/// Labels of gRPC call counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    listener: String,
    route: String,
    pool: String,
    grpc_status: u32,
}

/// Names of the (listener, route, pool) a route's series count. Shared: every route of a
/// listener or pool holds that name once, and the series map's key is the route's name.
#[derive(Debug)]
struct RouteLabels {
    listener: Arc<str>,
    route: Arc<str>,
    pool: Arc<str>,
}

/// The labels of one series of a route, as [`RouteCollector`] writes them: listener,
/// route and pool, then one more label (status class or error source) when there is one.
struct RouteSeriesLabels<'a> {
    route: &'a RouteLabels,
    extra: Option<(&'static str, &'static str)>,
}

impl EncodeLabelSet for RouteSeriesLabels<'_> {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("listener", &*self.route.listener).encode(encoder.encode_label())?;
        ("route", &*self.route.route).encode(encoder.encode_label())?;
        ("pool", &*self.route.pool).encode(encoder.encode_label())?;
        if let Some(extra) = self.extra {
            extra.encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// Labels of per-pool metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

/// Labels of counts by outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Labels of management API calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    method: String,
    code: &'static str,
}

/// Status classes, by the first digit of the status.
const STATUS_CLASSES: [&str; 6] = ["other", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// Who failed, as the access log names it.
const ERROR_SOURCES: [&str; 3] = ["downstream", "upstream", "proxy"];

fn status_class_index(status: u16) -> usize {
    match status / 100 {
        n @ 1..=5 => usize::from(n),
        _ => 0,
    }
}

/// One finished HTTP request, as [`Metrics::http_request`] records it.
#[derive(Debug, Clone, Copy)]
pub struct HttpOutcome<'a> {
    /// Listener name.
    pub listener: &'a str,
    /// The route and pool it was counted under.
    pub names: RouteNames<'a>,
    /// Status sent to the client.
    pub status: u16,
    /// `downstream`, `upstream` or `proxy` when the proxy produced an error response.
    pub error_source: Option<&'static str>,
    /// For a gRPC call: the `grpc-status` it ended with (from the upstream or proxyd).
    pub grpc_status: Option<u32>,
    /// Response body bytes sent.
    pub bytes: u64,
    /// From the request head to the end of the response body.
    pub elapsed: Duration,
    /// When the response body ended: the reading `elapsed` was taken from, so recording
    /// reads no clock of its own.
    pub end: Instant,
}

/// The names of the route and pool a request went to, read when asked for. Read from the
/// route definition, they cost a request over a large table a cache miss on that
/// definition; only a route's first request (which finds its series by name), a log line
/// and a span ask.
#[derive(Debug, Clone, Copy)]
pub enum RouteNames<'a> {
    /// No route matched: both names are empty.
    Unmatched,
    /// The names of this route definition.
    Of(&'a Route),
    /// These names.
    Named {
        /// Route name.
        route: &'a str,
        /// Pool name.
        pool: &'a str,
    },
}

impl<'a> RouteNames<'a> {
    /// The route's name, empty when no route matched.
    pub fn route(self) -> &'a str {
        match self {
            RouteNames::Unmatched => "",
            RouteNames::Of(route) => &route.name,
            RouteNames::Named { route, .. } => route,
        }
    }

    /// The pool's name, empty when no route matched.
    pub fn pool(self) -> &'a str {
        match self {
            RouteNames::Unmatched => "",
            RouteNames::Of(route) => &route.pool,
            RouteNames::Named { pool, .. } => pool,
        }
    }
}

/// Result of an ACME certificate order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeResult {
    /// A certificate was issued and stored.
    Issued,
    /// The CA or the challenge failed.
    Failed,
    /// The order was not attempted because of a rate limit or back-off.
    RateLimited,
}

impl AcmeResult {
    fn as_str(self) -> &'static str {
        match self {
            AcmeResult::Issued => "issued",
            AcmeResult::Failed => "failed",
            AcmeResult::RateLimited => "rate_limited",
        }
    }
}

/// What became of a request that waited for a held route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldOutcome {
    /// The service came back and the request was forwarded.
    Served,
    /// The hold expired (503 / connection closed).
    Expired,
    /// The queue was full; refused at once.
    Refused,
}

impl HeldOutcome {
    fn as_str(self) -> &'static str {
        match self {
            HeldOutcome::Served => "served",
            HeldOutcome::Expired => "expired",
            HeldOutcome::Refused => "refused",
        }
    }
}

/// Where a client was too slow, as `proxy_client_timeouts` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTimeout {
    /// The TLS handshake did not complete within `header_timeout`.
    Handshake,
    /// A request head was started (or, on a new connection, not even started) and not
    /// complete within `header_timeout`.
    Head,
    /// A request body paused longer than the pool's `body_timeout` (answered 408).
    Body,
    /// Nothing moved for `idle_timeout`, or a keep-alive connection waited longer than
    /// `header_timeout` for its next request.
    Idle,
}

impl ClientTimeout {
    const ALL: [ClientTimeout; 4] = [
        ClientTimeout::Handshake,
        ClientTimeout::Head,
        ClientTimeout::Body,
        ClientTimeout::Idle,
    ];

    fn as_str(self) -> &'static str {
        match self {
            ClientTimeout::Handshake => "handshake",
            ClientTimeout::Head => "head",
            ClientTimeout::Body => "body",
            ClientTimeout::Idle => "idle",
        }
    }
}

/// Why a connection was closed right after it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener had `max_connections` open.
    MaxConnections,
    /// The client's IP had `max_connections_per_ip` open on the listener.
    MaxConnectionsPerIp,
}

impl Refusal {
    const ALL: [Refusal; 2] = [Refusal::MaxConnections, Refusal::MaxConnectionsPerIp];

    fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

/// Every metric of one daemon.
pub struct Metrics {
    registry: Registry,
    legacy: Arc<Legacy>,
    connections_active: Family<ListenerLabels, Gauge>,
    connections_total: Family<ListenerLabels, Counter>,
    client_timeouts: Family<ListenerCauseLabels, Counter>,
    connections_refused: Family<ListenerCauseLabels, Counter>,
    rate_limited: Family<ListenerLabels, Counter>,
    forwarded_bytes: Family<ListenerDirectionLabels, Counter>,
    grpc_calls: Family<GrpcLabels, Counter>,
    connect_duration: Family<PoolLabels, DurationHistogram, fn() -> DurationHistogram>,
    connect_failures: Family<PoolLabels, Counter>,
    upgrades: Family<ResultLabels, Counter>,
    last_upgrade_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    api_calls: Family<ApiLabels, Counter>,
    acme_orders: Family<ResultLabels, Counter>,
    tls_refused: Counter,
    tls_handshakes: Family<ResultLabels, Counter>,
    ready: Gauge,
    readings: Arc<Readings>,
    registrations_active: Gauge,
    registrations_total: Counter,
    held_requests: Gauge,
    held_total: Family<ResultLabels, Counter>,
    routes: Arc<RouteSeriesCache>,
    pools: SeriesCache<PoolSeries>,
    otel: OnceLock<Instruments>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A fresh set of metrics; `state` adds upstream health and SQLite write latency.
    pub fn new(state: Option<&StateFeed>) -> Metrics {
        let mut registry = Registry::default();
        let legacy = Arc::new(Legacy::new());
        registry.register_collector(Box::new(legacy.clone()));

        let connections_active = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "proxy_connections_active",
            "Client connections open now, by listener",
            connections_active.clone(),
        );
        let connections_total = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "proxy_connections",
            "Client connections accepted, by listener",
            connections_total.clone(),
        );
        let client_timeouts = Family::<ListenerCauseLabels, Counter>::default();
        registry.register(
            "proxy_client_timeouts",
            "Slow clients given up on, by listener and cause: handshake (TLS handshake not done \
             within header_timeout), head (no complete request head within header_timeout), \
             body (a request body paused longer than the pool's body_timeout; answered 408), \
             idle (nothing moved for idle_timeout, or a keep-alive connection waited longer \
             than header_timeout for its next request)",
            client_timeouts.clone(),
        );
        let connections_refused = Family::<ListenerCauseLabels, Counter>::default();
        registry.register(
            "proxy_connections_refused",
            "Client connections closed right after accept, by listener and cause \
             (max_connections, max_connections_per_ip)",
            connections_refused.clone(),
        );
        let rate_limited = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "proxy_http_rate_limited",
            "Requests answered 429 by the listener's per-client-IP rate limit",
            rate_limited.clone(),
        );
        let forwarded_bytes = Family::<ListenerDirectionLabels, Counter>::default();
        registry.register(
            "proxy_tcp_forwarded_bytes",
            "Bytes forwarded by tcp, tls and tls-passthrough listeners, by listener and \
             direction (up: client to upstream, down: upstream to client), counted when a \
             stream ends",
            forwarded_bytes.clone(),
        );
        let routes = Arc::new(RouteSeriesCache::default());
        registry.register_collector(Box::new(RouteCollector(routes.clone())));
        let grpc_calls = Family::<GrpcLabels, Counter>::default();
        registry.register(
            "proxy_grpc_calls",
            "gRPC calls (content-type application/grpc*) by the grpc-status they ended with",
            grpc_calls.clone(),
        );
        let connect_duration = Family::<PoolLabels, DurationHistogram, fn() -> DurationHistogram>::new_with_constructor(
            DurationHistogram::fast,
        );
        registry.register(
            "proxy_upstream_connect_duration_seconds",
            "Time to open a connection to an upstream (TCP connect and HTTP handshake), by pool",
            connect_duration.clone(),
        );
        let connect_failures = Family::<PoolLabels, Counter>::default();
        registry.register(
            "proxy_upstream_connect_failures",
            "Failed connection attempts to upstreams, by pool",
            connect_failures.clone(),
        );
        let upgrades = Family::<ResultLabels, Counter>::default();
        registry.register(
            "proxy_upgrades",
            "Zero-downtime upgrades started by this process, by result",
            upgrades.clone(),
        );
        let last_upgrade_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "proxy_last_upgrade_duration_seconds",
            "How long the last upgrade took, from start to the successor being ready",
            last_upgrade_seconds.clone(),
        );
        let api_calls = Family::<ApiLabels, Counter>::default();
        registry.register(
            "proxy_api_calls",
            "Management API calls, by method and gRPC code",
            api_calls.clone(),
        );
        let acme_orders = Family::<ResultLabels, Counter>::default();
        registry.register(
            "proxy_acme_orders",
            "ACME certificate orders, by result",
            acme_orders.clone(),
        );
        let tls_refused = Counter::default();
        registry.register(
            "proxy_tls_handshakes_refused",
            "TLS handshakes refused because the name is not on the allowlist",
            tls_refused.clone(),
        );
        let tls_handshakes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "proxy_tls_handshakes",
            "TLS handshakes on terminating listeners that reached the certificate stage, by result (ok, failed)",
            tls_handshakes.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "proxy_ready",
            "1 once listeners are bound and the state is loaded (what /readyz answers), else 0",
            ready.clone(),
        );
        let readings = Arc::new(Readings::default());
        registry.register_collector(Box::new(readings.clone()));
        let registrations_active = Gauge::default();
        registry.register(
            "proxy_registrations_active",
            "Services registered over the Register stream now",
            registrations_active.clone(),
        );
        let registrations_total = Counter::default();
        registry.register(
            "proxy_registrations",
            "Registrations accepted",
            registrations_total.clone(),
        );
        let held_requests = Gauge::default();
        registry.register(
            "proxy_held_requests",
            "Requests and connections queued now for a held registration",
            held_requests.clone(),
        );
        let held_total = Family::<ResultLabels, Counter>::default();
        registry.register(
            "proxy_held_requests_finished",
            "Requests that waited for a held registration, by outcome",
            held_total.clone(),
        );
        if let Some(state) = state {
            registry.register(
                "proxy_state_write_duration_seconds",
                "Time the state writer takes per batch: validate, SQLite commit (fsync), publish",
                state.write_latency.clone(),
            );
            registry.register_collector(Box::new(UpstreamCollector {
                state: state.routing.clone(),
            }));
        }
        // Series with a closed set of results exist from the start at 0, so the first
        // failure is an increase that rate() and alert rules can see.
        for result in [
            AcmeResult::Issued,
            AcmeResult::Failed,
            AcmeResult::RateLimited,
        ] {
            let _ = acme_orders.get_or_create(&ResultLabels {
                result: result.as_str(),
            });
        }
        for result in ["success", "failure"] {
            let _ = upgrades.get_or_create(&ResultLabels { result });
        }
        for outcome in [
            HeldOutcome::Served,
            HeldOutcome::Expired,
            HeldOutcome::Refused,
        ] {
            let _ = held_total.get_or_create(&ResultLabels {
                result: outcome.as_str(),
            });
        }
        for result in ["ok", "failed"] {
            let _ = tls_handshakes.get_or_create(&ResultLabels { result });
        }
        Metrics {
            registry,
            legacy,
            connections_active,
            connections_total,
            client_timeouts,
            connections_refused,
            rate_limited,
            forwarded_bytes,
            grpc_calls,
            connect_duration,
            connect_failures,
            upgrades,
            last_upgrade_seconds,
            api_calls,
            acme_orders,
            tls_refused,
            tls_handshakes,
            ready,
            readings,
            registrations_active,
            registrations_total,
            held_requests,
            held_total,
            routes,
            pools: SeriesCache::default(),
            otel: OnceLock::new(),
        }
    }

    /// Also records into OTLP instruments from now on (set once, when OTLP is configured).
    pub(crate) fn export_to(&self, instruments: Instruments) {
        let _ = self.otel.set(instruments);
    }

    /// The metrics in the OpenMetrics text format (what Prometheus scrapes).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
            out.push_str("# EOF\n");
        }
        out
    }

    /// The connection counters of one listener; call once per listener, then
    /// [`ListenerSeries::open`] per accepted connection.
    pub fn listener(&self, name: &str, protocol: &'static str) -> ListenerSeries {
        let labels = ListenerLabels {
            listener: name.to_string(),
            protocol,
        };
        let cause = |family: &Family<ListenerCauseLabels, Counter>, cause: &'static str| {
            family.get_or_create_owned(&ListenerCauseLabels {
                listener: name.to_string(),
                protocol,
                cause,
            })
        };
        ListenerSeries(Arc::new(ListenerCounters {
            active: self.connections_active.get_or_create_owned(&labels),
            total: self.connections_total.get_or_create_owned(&labels),
            timeouts: ClientTimeout::ALL.map(|t| cause(&self.client_timeouts, t.as_str())),
            refused: Refusal::ALL.map(|r| cause(&self.connections_refused, r.as_str())),
            rate_limited: self.rate_limited.get_or_create_owned(&labels),
            forwarded: matches!(protocol, "tcp" | "tls" | "tls-passthrough").then(|| {
                ["up", "down"].map(|direction| {
                    self.forwarded_bytes
                        .get_or_create_owned(&ListenerDirectionLabels {
                            listener: name.to_string(),
                            protocol,
                            direction,
                        })
                })
            }),
            legacy: self.legacy.clone(),
        }))
    }

    /// Records one finished HTTP request (called where the access log line is written).
    pub fn http_request(&self, outcome: &HttpOutcome<'_>) {
        let series = self.routes.get_or_insert(
            outcome.listener,
            outcome.names.route(),
            outcome.names.pool(),
        );
        self.record_http(outcome, &series);
    }

    /// What makes a route's series as its routing entry is made (for
    /// [`Published::attach_with`]): its first request then finds them in the entry. The
    /// series of a route that was served before (under another entry of the same listener,
    /// name and pool) are found and go on counting; a route that answers nothing shows no
    /// series.
    pub fn route_attacher(&self) -> Attacher {
        let routes = self.routes.clone();
        Arc::new(move |route: &Route| {
            routes.get_or_insert(&route.listener, &route.name, &route.pool)
                as Arc<dyn std::any::Any + Send + Sync>
        })
    }

    /// [`http_request`](Self::http_request) for a request a route answered: `slot` is kept
    /// with that route (the same listener, route and pool for every request it holds), so
    /// only its first request looks the series up by name.
    /// With 100,000 routes, finding the series by name on every request costs two map
    /// lookups and their cache misses.
    pub fn http_request_on(&self, outcome: &HttpOutcome<'_>, slot: &Attachment) {
        let attached = slot.get_or_init(|| {
            crate::allocator::for_tables(|| {
                self.routes.get_or_insert(
                    outcome.listener,
                    outcome.names.route(),
                    outcome.names.pool(),
                )
            })
        });
        match attached.downcast_ref::<RouteSeries>() {
            Some(series) => self.record_http(outcome, series),
            // Only these series are ever attached to a route.
            None => self.http_request(outcome),
        }
    }

    fn record_http(&self, outcome: &HttpOutcome<'_>, series: &RouteSeries) {
        self.legacy.http_total.fetch_add(1, Ordering::Relaxed);
        self.legacy.window.record(outcome.elapsed, outcome.end);
        let by_class = series.class_for_request(status_class_index(outcome.status));
        by_class.duration.observe(REQUEST_BOUNDS, outcome.elapsed);
        by_class.bytes.fetch_add(outcome.bytes, Ordering::Relaxed);
        if let Some(source) = outcome.error_source {
            if let Some(index) = ERROR_SOURCES.iter().position(|s| *s == source) {
                series.errors[index].fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(grpc_status) = outcome.grpc_status {
            self.grpc_calls
                .get_or_create(&GrpcLabels {
                    listener: series.labels.listener.to_string(),
                    route: series.labels.route.to_string(),
                    pool: series.labels.pool.to_string(),
                    grpc_status,
                })
                .inc();
        }
        if let Some(otel) = self.otel.get() {
            otel.http_request(outcome);
        }
    }

    /// Records a successful connection to an upstream of `pool` that took `elapsed`.
    pub fn upstream_connected(&self, pool: &str, elapsed: Duration) {
        let series = self.pool_series(pool);
        series.connect.observe(elapsed);
        if let Some(otel) = self.otel.get() {
            otel.upstream_connected(pool, elapsed);
        }
    }

    /// Records a failed connection attempt to an upstream of `pool`.
    pub fn upstream_connect_failed(&self, pool: &str) {
        self.pool_series(pool).failures.inc();
        if let Some(otel) = self.otel.get() {
            otel.upstream_connect_failed(pool);
        }
    }

    fn pool_series(&self, pool: &str) -> Arc<PoolSeries> {
        self.pools.get_or_insert(pool, || {
            let labels = PoolLabels {
                pool: pool.to_string(),
            };
            PoolSeries {
                connect: self.connect_duration.get_or_create_owned(&labels),
                failures: self.connect_failures.get_or_create_owned(&labels),
            }
        })
    }

    /// For the upgrade code: an upgrade finished after `elapsed`; `succeeded` = the successor
    /// reported ready and took over.
    pub fn upgrade_finished(&self, succeeded: bool, elapsed: Duration) {
        let result = if succeeded { "success" } else { "failure" };
        self.upgrades.get_or_create(&ResultLabels { result }).inc();
        self.last_upgrade_seconds.set(elapsed.as_secs_f64());
        if let Some(otel) = self.otel.get() {
            otel.upgrade_finished(result, elapsed);
        }
    }

    /// For the management API: one call to `method` (the gRPC path, e.g.
    /// `/proxy.v1.RouteService/ListRoutes`) ended with `code`. Calls to methods the server
    /// does not have are counted under `method="unknown"` so clients cannot grow the label set.
    pub fn api_call(&self, method: &str, code: tonic::Code) {
        let method = if code == tonic::Code::Unimplemented {
            "unknown"
        } else {
            method
        };
        let code = code_name(code);
        self.api_calls
            .get_or_create(&ApiLabels {
                method: method.to_string(),
                code,
            })
            .inc();
        if let Some(otel) = self.otel.get() {
            otel.api_call(method, code);
        }
    }

    /// For on-demand TLS: an ACME order ended with `result`.
    pub fn acme_order(&self, result: AcmeResult) {
        self.acme_orders
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .inc();
        if let Some(otel) = self.otel.get() {
            otel.acme_order(result.as_str());
        }
    }

    /// For on-demand TLS: a handshake was refused because its SNI is not allowed.
    pub fn tls_handshake_refused(&self) {
        self.tls_refused.inc();
        if let Some(otel) = self.otel.get() {
            otel.tls_handshake_refused();
        }
    }

    /// For TLS termination: a handshake with a certificate chosen ended (`ok` = completed).
    pub fn tls_handshake(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.tls_handshakes
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Sets the `proxy_ready` gauge (what `/readyz` answers).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Reads certificate expiries at scrape time through `read` (set once, by the part
    /// that holds the certificates).
    pub fn read_certificates_with(&self, read: Reader<CertificateExpiry>) {
        let _ = self.readings.certificates.set(read);
    }

    /// Reads fleet mode's condition at scrape time through `read` (set once, in fleet mode).
    pub fn read_cluster_with(&self, read: Reader<ClusterReading>) {
        let _ = self.readings.cluster.set(read);
    }

    /// Reads the discovery sources' condition at scrape time through `read` (set once).
    pub fn read_discovery_with(&self, read: Reader<SourceCondition>) {
        let _ = self.readings.sources.set(read);
    }

    /// Requests answered so far by every (listener, route, pool) that has answered one.
    pub fn route_totals(&self) -> Vec<RouteTotal> {
        let mut out = Vec::new();
        self.visit_route_counts(|count| {
            out.push(RouteTotal {
                listener: count.listener.to_string(),
                route: count.route.to_string(),
                pool: count.pool.to_string(),
                requests: count.requests,
                errors: count.errors,
            });
        });
        out
    }

    /// Shows `visit` the requests answered so far by every (listener, route, pool) that has
    /// answered one, in no particular order, without copying a name: what the status page
    /// samples into rates. New series wait while it runs, so `visit` should be quick.
    pub fn visit_route_counts(&self, mut visit: impl FnMut(RouteCount<'_>)) {
        self.routes.visit_answered(|series| {
            let count = |class: usize| series.class(class).map_or(0, ClassSeries::requests);
            visit(RouteCount {
                listener: &series.labels.listener,
                route: &series.labels.route,
                pool: &series.labels.pool,
                requests: (0..STATUS_CLASSES.len()).map(count).sum(),
                errors: count(5),
            });
        });
    }

    /// Connections open now on listener `name` (speaking `protocol`).
    pub fn listener_connections(&self, name: &str, protocol: &'static str) -> i64 {
        self.connections_active
            .get(&ListenerLabels {
                listener: name.to_string(),
                protocol,
            })
            .map_or(0, |g| g.get())
    }

    /// For registration: a service registered; the returned guard counts it as active
    /// until dropped (when its lease ends).
    pub fn registration_opened(&self) -> GaugeGuard {
        self.registrations_total.inc();
        if let Some(otel) = self.otel.get() {
            otel.registration_opened();
        }
        GaugeGuard::new(self.registrations_active.clone())
    }

    /// For registration: a request or connection started waiting for a held route; the
    /// guard counts it as queued until dropped. Report how it ended with [`Metrics::held_finished`].
    pub fn request_held(&self) -> GaugeGuard {
        GaugeGuard::new(self.held_requests.clone())
    }

    /// For registration: a held request ended with `outcome`.
    pub fn held_finished(&self, outcome: HeldOutcome) {
        self.held_total
            .get_or_create(&ResultLabels {
                result: outcome.as_str(),
            })
            .inc();
        if let Some(otel) = self.otel.get() {
            otel.held_finished(outcome.as_str());
        }
    }

    /// Client connections open now on every listener (the `tcp_connections_active_count` gauge).
    pub fn connections_open(&self) -> i64 {
        self.legacy.tcp_active.load(Ordering::Relaxed)
    }

    /// Client connections accepted since start on every listener.
    pub fn connections_accepted(&self) -> u64 {
        self.legacy.tcp_total.load(Ordering::Relaxed)
    }

    /// Registrations whose lease is open now.
    pub fn registrations_now(&self) -> i64 {
        self.registrations_active.get()
    }

    /// Requests and connections waiting for a held route now.
    pub fn held_now(&self) -> i64 {
        self.held_requests.get()
    }
}

/// The name gRPC gives a status code (`OK`, `NOT_FOUND`, ...).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Adds one to a gauge while alive.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The connection counters of one listener, made once per listener; cloning is cheap.
#[derive(Clone, Debug)]
pub struct ListenerSeries(Arc<ListenerCounters>);

#[derive(Debug)]
struct ListenerCounters {
    active: Gauge,
    total: Counter,
    /// By [`ClientTimeout::ALL`] order.
    timeouts: [Counter; 4],
    /// By [`Refusal::ALL`] order.
    refused: [Counter; 2],
    rate_limited: Counter,
    /// Up and down, on stream listeners only.
    forwarded: Option<[Counter; 2]>,
    legacy: Arc<Legacy>,
}

impl ListenerSeries {
    /// Counts an accepted connection; it stays active until the guard is dropped.
    pub fn open(&self) -> OpenConnection {
        let c = &self.0;
        c.active.inc();
        c.total.inc();
        c.legacy.tcp_active.fetch_add(1, Ordering::Relaxed);
        c.legacy.tcp_total.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }

    /// Counts a client given up on for being too slow.
    pub fn timed_out(&self, timeout: ClientTimeout) {
        let index = ClientTimeout::ALL.iter().position(|t| *t == timeout);
        if let Some(counter) = index.and_then(|i| self.0.timeouts.get(i)) {
            counter.inc();
        }
    }

    /// Counts a connection closed right after accept.
    pub fn refused(&self, refusal: Refusal) {
        let index = Refusal::ALL.iter().position(|r| *r == refusal);
        if let Some(counter) = index.and_then(|i| self.0.refused.get(i)) {
            counter.inc();
        }
    }

    /// Counts a request answered 429 by the per-client-IP rate limit.
    pub fn rate_limited(&self) {
        self.0.rate_limited.inc();
    }

    /// Counts the bytes a forwarded stream moved each way, once it ended.
    pub fn forwarded(&self, up: u64, down: u64) {
        if let Some([up_total, down_total]) = &self.0.forwarded {
            up_total.inc_by(up);
            down_total.inc_by(down);
        }
    }
}

/// An accepted client connection, counted as active while this lives.
#[derive(Debug)]
pub struct OpenConnection(ListenerSeries);

impl OpenConnection {
    /// The listener's series this connection is counted in.
    pub fn series(&self) -> &ListenerSeries {
        &self.0
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let c = &(self.0).0;
        c.active.dec();
        c.legacy.tcp_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The metric names operators graph from earlier proxies, computed from atomics at scrape
/// time. Their names do not follow the OpenMetrics counter rules (`_total` suffix), so
/// the two cumulative ones are typed `unknown`; PromQL's `rate()` works on them all the same.
#[derive(Debug)]
struct Legacy {
    tcp_active: AtomicI64,
    tcp_total: AtomicU64,
    http_total: AtomicU64,
    window: AverageWindow,
}

impl Legacy {
    fn new() -> Legacy {
        Legacy {
            tcp_active: AtomicI64::new(0),
            tcp_total: AtomicU64::new(0),
            http_total: AtomicU64::new(0),
            window: AverageWindow::new(),
        }
    }
}

impl Collector for Legacy {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(self.tcp_active.load(Ordering::Relaxed));
        gauge.encode(encoder.encode_descriptor(
            "tcp_connections_active_count",
            "Client connections open now on all listeners",
            None,
            MetricType::Gauge,
        )?)?;
        let mut total = encoder.encode_descriptor(
            "tcp_connections_total_count",
            "Client connections accepted on all listeners since start (cumulative)",
            None,
            MetricType::Unknown,
        )?;
        total.encode_gauge(&self.tcp_total.load(Ordering::Relaxed))?;
        let mut requests = encoder.encode_descriptor(
            "http_request_total_count",
            "HTTP requests answered since start (cumulative)",
            None,
            MetricType::Unknown,
        )?;
        requests.encode_gauge(&self.http_total.load(Ordering::Relaxed))?;
        ConstGauge::new(self.window.average_ms()).encode(encoder.encode_descriptor(
            "http_request_time_avg_milliseconds",
            "Mean HTTP request duration over the last minute, in milliseconds",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// Mean request time over the last minute, in six 10-second slots of atomics.
#[derive(Debug)]
struct AverageWindow {
    origin: Instant,
    slots: [WindowSlot; WINDOW_SLOTS],
}

const WINDOW_SLOTS: usize = 6;
const SLOT_SECONDS: u64 = 10;

#[derive(Debug, Default)]
struct WindowSlot {
    epoch: AtomicU64,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl AverageWindow {
    fn new() -> AverageWindow {
        AverageWindow {
            origin: Instant::now(),
            slots: Default::default(),
        }
    }

    /// The 10 s slot `at` falls in.
    fn epoch(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_secs() / SLOT_SECONDS
    }

    /// A request that took `elapsed` and ended `at`.
    fn record(&self, elapsed: Duration, at: Instant) {
        let epoch = self.epoch(at);
        let Some(slot) = self.slots.get((epoch % WINDOW_SLOTS as u64) as usize) else {
            return;
        };
        let seen = slot.epoch.load(Ordering::Acquire);
        // The first request of a new 10 s slot clears what it held a minute ago; a request
        // racing with that reset may be lost, which an average can afford.
        if seen != epoch
            && slot
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.count.store(0, Ordering::Relaxed);
            slot.sum_us.store(0, Ordering::Relaxed);
        }
        slot.count.fetch_add(1, Ordering::Relaxed);
        slot.sum_us.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn average_ms(&self) -> f64 {
        let now = self.epoch(Instant::now());
        let (mut count, mut sum_us) = (0u64, 0u64);
        for slot in &self.slots {
            let epoch = slot.epoch.load(Ordering::Acquire);
            if epoch <= now && now - epoch < WINDOW_SLOTS as u64 {
                count += slot.count.load(Ordering::Relaxed);
                sum_us = sum_us.saturating_add(slot.sum_us.load(Ordering::Relaxed));
            }
        }
        if count == 0 {
            0.0
        } else {
            sum_us as f64 / count as f64 / 1000.0
        }
    }
}

/// Upstream health, read from the current routing table at scrape time.
#[derive(Debug)]
struct UpstreamCollector {
    state: Published,
}

struct UpstreamLabels<'a> {
    pool: &'a str,
    upstream: &'a str,
}

impl EncodeLabelSet for UpstreamLabels<'_> {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("pool", self.pool).encode(encoder.encode_label())?;
        ("upstream", self.upstream).encode(encoder.encode_label())
    }
}

impl Collector for UpstreamCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let routing = self.state.routing();
        type Reading = fn(&crate::upstream::UpstreamRuntime) -> i64;
        let gauges: [(&str, &str, Reading); 4] = [
            (
                "proxy_upstream_healthy",
                "1 if the upstream passes its active health check (or has none)",
                |u| i64::from(u.is_healthy()),
            ),
            (
                "proxy_upstream_ejected",
                "1 while the upstream is ejected (skipped while others work) after failures",
                |u| i64::from(u.is_ejected()),
            ),
            (
                "proxy_upstream_draining",
                "1 if the upstream is draining (takes no new work)",
                |u| i64::from(u.is_draining()),
            ),
            (
                "proxy_upstream_in_flight",
                "Requests and TCP streams in flight to the upstream",
                |u| i64::try_from(u.in_flight()).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, read) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for pool in routing.pools() {
                for upstream in pool.upstreams() {
                    let labels = UpstreamLabels {
                        pool: &pool.name,
                        upstream: &upstream.address,
                    };
                    ConstGauge::new(read(upstream)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "proxy_upstream_ejections",
            "Times the upstream was ejected (consecutive failures, see pools[].outlier)",
            None,
            MetricType::Counter,
        )?;
        for pool in routing.pools() {
            for upstream in pool.upstreams() {
                let labels = UpstreamLabels {
                    pool: &pool.name,
                    upstream: &upstream.address,
                };
                ConstCounter::new(upstream.ejections_total())
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Series of one (listener, route, pool). A status class's series are shown from its
/// first request on, an error source's from its first error: no empty series are shown.
///
/// What a request writes comes first (`repr(C)`), in the series' own memory: the 2xx
/// class, almost every request's, inline at the start of a 64-byte block (`align(64)`), so
/// recording a 2xx answered within 50 ms writes one cache line and loads no pointer on the
/// way (over 100,000 routes each such line is one more wait on memory; README,
/// Performance); the other classes each behind a pointer, made by their first request;
/// errors and labels only errors and scrapes read.
#[repr(C, align(64))]
struct RouteSeries {
    ok: ClassSeries,
    /// By status class, as [`STATUS_CLASSES`]; the 2xx one unused (that class is `ok`).
    others: [OnceLock<Box<ClassSeries>>; STATUS_CLASSES.len()],
    errors: [AtomicU64; ERROR_SOURCES.len()],
    labels: RouteLabels,
}

/// The index of 2xx in [`STATUS_CLASSES`]: [`RouteSeries::ok`].
const OK_CLASS: usize = 2;

impl RouteSeries {
    /// The series of status class `index` (of [`STATUS_CLASSES`]), if it answered a
    /// request.
    fn class(&self, index: usize) -> Option<&ClassSeries> {
        if index == OK_CLASS {
            return self.ok.duration.any().then_some(&self.ok);
        }
        self.others.get(index)?.get().map(|class| &**class)
    }

    /// The series of status class `index`, made if it is the class's first request.
    fn class_for_request(&self, index: usize) -> &ClassSeries {
        match self.others.get(index) {
            Some(slot) if index != OK_CLASS => slot.get_or_init(|| {
                // Beside the route's other series (see `crate::allocator::for_tables`).
                crate::allocator::for_tables(Box::default)
            }),
            _ => &self.ok,
        }
    }

    /// Each status class's name with its series, for those that answered a request.
    fn classes(&self) -> impl Iterator<Item = (&'static str, &ClassSeries)> {
        STATUS_CLASSES
            .iter()
            .enumerate()
            .filter_map(|(index, name)| Some((*name, self.class(index)?)))
    }

    /// Whether the route answered a request: series made ahead of that (see
    /// [`Metrics::route_attacher`]) are not shown.
    fn answered(&self) -> bool {
        self.classes().next().is_some()
    }
}

/// The requests of one status class: the response bytes they sent (the route's bytes are
/// the sum over its classes), then how many and how long (the histogram, inline). In this
/// order (`repr(C)`) the bytes, the durations' sum and the buckets up to 50 ms share the
/// first 64 bytes.
#[derive(Default)]
#[repr(C)]
struct ClassSeries {
    bytes: AtomicU64,
    duration: Counts,
}

impl ClassSeries {
    fn requests(&self) -> u64 {
        self.duration.count()
    }
}

/// listener -> route -> the series of each pool the route has forwarded to.
/// Hashed as the routing table hashes route names (a route's entry, as it is made, finds
/// its series here, and SipHash was almost half of what that cost).
type RouteMap = HashMap<Arc<str>, HashMap<Arc<str>, Vec<Arc<RouteSeries>>, KeyHasher>, KeyHasher>;

/// The series by name, and each pool's name once (shared by the labels of its routes).
#[derive(Default)]
struct SeriesIndex {
    by_name: RouteMap,
    pools: HashSet<Arc<str>, KeyHasher>,
}

/// Every route's series, made as the route's routing entry is made (see
/// [`Metrics::route_attacher`]), or by its first request for an entry made without them;
/// a route that keeps its series in its [`Attachment`] never looks here again;
/// the series hold their own counts and [`RouteCollector`] writes them, so a new route
/// costs one map insert rather than one per metric family, each copying the labels.
#[derive(Default)]
struct RouteSeriesCache {
    map: RwLock<SeriesIndex>,
}

impl RouteSeriesCache {
    fn find(
        map: &SeriesIndex,
        listener: &str,
        route: &str,
        pool: &str,
    ) -> Option<Arc<RouteSeries>> {
        map.by_name
            .get(listener)?
            .get(route)?
            .iter()
            .find(|s| &*s.labels.pool == pool)
            .cloned()
    }

    fn get_or_insert(&self, listener: &str, route: &str, pool: &str) -> Arc<RouteSeries> {
        {
            let map = self
                .map
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(series) = Self::find(&map, listener, route, pool) {
                return series;
            }
        }
        let mut map = self
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(series) = Self::find(&map, listener, route, pool) {
            return series;
        }
        let map = &mut *map;
        let pool = match map.pools.get(pool) {
            Some(name) => name.clone(),
            None => {
                let name: Arc<str> = Arc::from(pool);
                map.pools.insert(name.clone());
                name
            }
        };
        let listener = match map.by_name.get_key_value(listener) {
            Some((name, _)) => name.clone(),
            None => Arc::from(listener),
        };
        let routes = map.by_name.entry(listener.clone()).or_default();
        let route = match routes.get_key_value(route) {
            Some((name, _)) => name.clone(),
            None => Arc::from(route),
        };
        let series = Arc::new(RouteSeries {
            labels: RouteLabels {
                listener,
                route: route.clone(),
                pool,
            },
            ok: ClassSeries::default(),
            others: Default::default(),
            errors: Default::default(),
        });
        routes.entry(route).or_default().push(series.clone());
        series
    }

    /// Every series of a route that answered a request, in no particular order (copied
    /// out, so no lock is held while the caller reads them).
    fn answered(&self) -> Vec<Arc<RouteSeries>> {
        let mut all = Vec::new();
        self.visit_answered(|series| all.push(series.clone()));
        all
    }

    /// Shows `visit` every series of a route that answered a request, in no particular
    /// order, under the lock (nothing copied).
    fn visit_answered(&self, mut visit: impl FnMut(&Arc<RouteSeries>)) {
        let map = self
            .map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for series in map
            .by_name
            .values()
            .flat_map(|routes| routes.values().flat_map(|pools| pools.iter()))
            .filter(|series| series.answered())
        {
            visit(series);
        }
    }
}

/// Writes the series of every route at scrape time: `proxy_http_requests`,
/// `proxy_http_request_duration_seconds`, `proxy_http_errors`, `proxy_http_response_bytes`.
#[derive(Debug)]
struct RouteCollector(Arc<RouteSeriesCache>);

impl std::fmt::Debug for RouteSeriesCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteSeriesCache").finish_non_exhaustive()
    }
}

/// The status classes `series` has answered, each with its labels.
fn classes(series: &RouteSeries) -> impl Iterator<Item = (RouteSeriesLabels<'_>, &ClassSeries)> {
    series.classes().map(|(class, by_class)| {
        let labels = RouteSeriesLabels {
            route: &series.labels,
            extra: Some(("status_class", class)),
        };
        (labels, by_class)
    })
}

impl Collector for RouteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all = self.0.answered();
        let mut family = encoder.encode_descriptor(
            "proxy_http_requests",
            "HTTP requests answered, by listener, route, pool and status class",
            None,
            MetricType::Counter,
        )?;
        for series in &all {
            for (labels, by_class) in classes(series) {
                ConstCounter::new(by_class.requests()).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "proxy_http_request_duration_seconds",
            "Time from the request head to the end of the response body",
            None,
            MetricType::Histogram,
        )?;
        for series in &all {
            for (labels, by_class) in classes(series) {
                by_class
                    .duration
                    .encode(REQUEST_BOUNDS, family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "proxy_http_errors",
            "Error responses made by the proxy, by who failed (downstream, upstream, proxy)",
            None,
            MetricType::Counter,
        )?;
        for series in &all {
            for (source, count) in ERROR_SOURCES.iter().zip(&series.errors) {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    let labels = RouteSeriesLabels {
                        route: &series.labels,
                        extra: Some(("source", source)),
                    };
                    ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "proxy_http_response_bytes",
            "Response body bytes sent to clients",
            None,
            MetricType::Counter,
        )?;
        for series in &all {
            let labels = RouteSeriesLabels {
                route: &series.labels,
                extra: None,
            };
            let bytes = series
                .classes()
                .map(|(_, c)| c.bytes.load(Ordering::Relaxed))
                .sum::<u64>();
            ConstCounter::new(bytes).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Series of one pool.
struct PoolSeries {
    connect: DurationHistogram,
    failures: Counter,
}

/// Lock-free lookup by name of series created on first use.
struct SeriesCache<T> {
    map: ArcSwap<HashTrieMapSync<String, Arc<T>>>,
    insert: Mutex<()>,
}

impl<T> Default for SeriesCache<T> {
    fn default() -> Self {
        SeriesCache {
            map: ArcSwap::from_pointee(HashTrieMapSync::new_sync()),
            insert: Mutex::new(()),
        }
    }
}

impl<T> SeriesCache<T> {
    fn get_or_insert(&self, name: &str, create: impl FnOnce() -> T) -> Arc<T> {
        if let Some(found) = self.map.load().get(name) {
            return found.clone();
        }
        let _writer = self
            .insert
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.map.load_full();
        if let Some(found) = current.get(name) {
            return found.clone();
        }
        let created = Arc::new(create());
        self.map
            .store(Arc::new(current.insert(name.to_string(), created.clone())));
        created
    }
}

/// Answers of one (listener, route, pool) since start, as [`Metrics::route_totals`] reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTotal {
    /// Listener name.
    pub listener: String,
    /// Route name (empty: no route matched).
    pub route: String,
    /// Pool name.
    pub pool: String,
    /// Requests answered.
    pub requests: u64,
    /// Of which with a 5xx status.
    pub errors: u64,
}

/// Requests answered so far by one (listener, route, pool), as
/// [`Metrics::visit_route_counts`] shows them. The names are the series' own: the same
/// `Arc`s at every visit for as long as the series lives.
#[derive(Debug, Clone, Copy)]
pub struct RouteCount<'a> {
    /// Listener name.
    pub listener: &'a Arc<str>,
    /// Route name (empty: no route matched).
    pub route: &'a Arc<str>,
    /// Pool name.
    pub pool: &'a Arc<str>,
    /// Requests answered.
    pub requests: u64,
    /// Of which with a 5xx status.
    pub errors: u64,
}

/// A function the metrics call at scrape time for readings another part owns.
pub type Reader<T> = Box<dyn Fn() -> Vec<T> + Send + Sync>;

/// When a certificate expires, for `proxy_tls_certificate_expiry_timestamp_seconds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateExpiry {
    /// The name it is stored under.
    pub name: String,
    /// Where it came from (`file`, `api`, `acme`, `registered`).
    pub source: &'static str,
    /// Its `notAfter`, Unix seconds.
    pub not_after: i64,
}

/// How a discovery source is doing, for `proxy_discovery_source_up`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceCondition {
    /// The pool it feeds.
    pub pool: String,
    /// `etcd`, `dns`, `exec` or `file`.
    pub kind: &'static str,
    /// Whether its last attempt succeeded.
    pub up: bool,
    /// Upstreams it contributes now.
    pub members: usize,
}

/// Fleet mode's condition, for the `proxy_cluster_*` series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterReading {
    /// Whether the node follows etcd now.
    pub connected: bool,
    /// The etcd revision the fleet's objects are applied up to here.
    pub applied_revision: i64,
    /// Fleet writes etcd has that the node has not applied (heartbeats do not count).
    pub lag_writes: i64,
    /// Seconds since the node was last in sync (0 while connected).
    pub stale_seconds: u64,
    /// Full reads of the fleet's objects since start.
    pub full_syncs: u64,
}

/// Readings taken at scrape time through functions other parts hand in (see
/// [`Metrics::read_certificates_with`]); telemetry itself knows neither part.
#[derive(Default)]
struct Readings {
    certificates: OnceLock<Reader<CertificateExpiry>>,
    sources: OnceLock<Reader<SourceCondition>>,
    cluster: OnceLock<Reader<ClusterReading>>,
}

impl std::fmt::Debug for Readings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readings")
            .field("certificates", &self.certificates.get().is_some())
            .field("sources", &self.sources.get().is_some())
            .field("cluster", &self.cluster.get().is_some())
            .finish()
    }
}

impl Collector for Readings {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let dropped = encoder.encode_descriptor(
            "proxy_access_log_dropped",
            "Access log lines dropped because standard output did not take them fast enough \
             (a thread had 4 MiB of lines waiting)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(super::access::dropped()).encode(dropped)?;
        if let Some(workers) = crate::workers::Workers::running() {
            per_worker(
                &mut encoder,
                "proxy_worker_connections",
                "Client connections each worker thread serves now, every listener's together \
                 (process-wide)",
                workers.connections(),
            )?;
            per_worker(
                &mut encoder,
                "proxy_worker_dormant_connections",
                "Idle HTTP/1 client connections each worker holds dormant now (a socket in its \
                 epoll set, no task), counted in proxy_worker_connections too (process-wide)",
                workers.dormant(),
            )?;
            per_worker(
                &mut encoder,
                "proxy_worker_tasks",
                "Tasks alive on each worker thread's runtime now: a task per connection that is \
                 not dormant, the accept loops, the dormitory (process-wide)",
                workers.tasks(),
            )?;
        }
        if let Some(read) = self.certificates.get() {
            let mut family = encoder.encode_descriptor(
                "proxy_tls_certificate_expiry_timestamp_seconds",
                "When each certificate expires (notAfter), Unix seconds",
                None,
                MetricType::Gauge,
            )?;
            for cert in read() {
                let labels = [("name", cert.name.as_str()), ("source", cert.source)];
                ConstGauge::new(cert.not_after).encode(family.encode_family(&labels)?)?;
            }
        }
        if let Some(read) = self.sources.get() {
            let sources = read();
            let mut up = encoder.encode_descriptor(
                "proxy_discovery_source_up",
                "1 if the discovery source's last attempt succeeded, 0 if it failed",
                None,
                MetricType::Gauge,
            )?;
            for source in &sources {
                let labels = [("pool", source.pool.as_str()), ("kind", source.kind)];
                ConstGauge::new(i64::from(source.up)).encode(up.encode_family(&labels)?)?;
            }
            let mut members = encoder.encode_descriptor(
                "proxy_discovery_source_members",
                "Upstreams the discovery source contributes now",
                None,
                MetricType::Gauge,
            )?;
            for source in &sources {
                let labels = [("pool", source.pool.as_str()), ("kind", source.kind)];
                ConstGauge::new(i64::try_from(source.members).unwrap_or(i64::MAX))
                    .encode(members.encode_family(&labels)?)?;
            }
        }
        if let Some(read) = self.cluster.get() {
            for reading in read() {
                let gauges = [
                    (
                        "proxy_cluster_connected",
                        "1 while the node follows the fleet in etcd, 0 while it serves stale rules",
                        i64::from(reading.connected),
                    ),
                    (
                        "proxy_cluster_applied_revision",
                        "The etcd revision the fleet's objects are applied up to on this node",
                        reading.applied_revision,
                    ),
                    (
                        "proxy_cluster_lag_writes",
                        "Fleet writes (API writes of objects on any node) in etcd not applied on this node yet; node heartbeats do not count",
                        reading.lag_writes,
                    ),
                    (
                        "proxy_cluster_stale_seconds",
                        "Seconds since the node was last in sync with etcd (0 while connected)",
                        i64::try_from(reading.stale_seconds).unwrap_or(i64::MAX),
                    ),
                ];
                for (name, help, value) in gauges {
                    let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                    ConstGauge::new(value).encode(family)?;
                }
                let family = encoder.encode_descriptor(
                    "proxy_cluster_full_syncs",
                    "Full reads of the fleet's objects from etcd since start",
                    None,
                    MetricType::Counter,
                )?;
                prometheus_client::metrics::counter::ConstCounter::new(reading.full_syncs)
                    .encode(family)?;
            }
        }
        Ok(())
    }
}

/// A gauge family with one value per worker thread, labelled by its index.
fn per_worker(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: Vec<usize>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (worker, value) in values.into_iter().enumerate() {
        let worker = worker.to_string();
        ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
            .encode(family.encode_family(&[("worker", worker.as_str())])?)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn outcome<'a>(route: &'a str, status: u16) -> HttpOutcome<'a> {
        HttpOutcome {
            listener: "web",
            names: RouteNames::Named { route, pool: "p" },
            status,
            error_source: (status >= 500).then_some("upstream"),
            grpc_status: None,
            bytes: 10,
            elapsed: Duration::from_millis(3),
            end: Instant::now(),
        }
    }

    #[test]
    fn a_route_slot_records_into_the_series_its_name_finds() {
        let m = Metrics::new(None);
        m.http_request(&outcome("a", 200));
        // Two slots (a route's entry before and after an update) and the lookup by name all
        // count into one series: the totals list it once.
        let (first, second) = (Attachment::default(), Attachment::default());
        for _ in 0..2 {
            m.http_request_on(&outcome("a", 200), &first);
        }
        m.http_request_on(&outcome("a", 503), &second);
        assert!(first.get().is_some() && second.get().is_some());
        let totals = m.route_totals();
        let a: Vec<_> = totals.iter().filter(|t| t.route == "a").collect();
        assert_eq!(a.len(), 1, "one series per route");
        assert_eq!((a[0].requests, a[0].errors), (4, 1));
        let text = m.encode();
        assert!(text.contains("proxy_http_requests_total{listener=\"web\",route=\"a\",pool=\"p\",status_class=\"2xx\"} 3\n"), "{text}");
    }

    fn web_route(name: &str) -> Route {
        Route {
            name: name.into(),
            source: crate::state::Source::Api,
            listener: "web".into(),
            host: None,
            path: crate::state::PathMatch::Prefix(format!("/{name}/")),
            pool: "p".into(),
            strip_prefix: false,
            priority: 0,
        }
    }

    #[test]
    fn series_made_with_a_route_entry_show_once_the_route_answered_and_go_on_counting() {
        let m = Metrics::new(None);
        let attach = m.route_attacher();
        // The entries of routes a and b, made with their series (as routing makes them).
        let (a, b) = (Attachment::default(), Attachment::default());
        a.get_or_init(|| attach(&web_route("a")));
        b.get_or_init(|| attach(&web_route("b")));
        // Nothing answered yet: no series shown, no totals.
        let text = m.encode();
        assert!(!text.contains("route=\"a\""), "{text}");
        assert!(!text.contains("route=\"b\""), "{text}");
        assert!(m.route_totals().is_empty());
        // a answers: its request counts into the series made with the entry.
        m.http_request_on(&outcome("a", 200), &a);
        let made = a.get().unwrap().downcast_ref::<RouteSeries>().unwrap();
        assert_eq!(made.class(OK_CLASS).map(ClassSeries::requests), Some(1));
        // The routes of one listener and pool share those names.
        let other = b.get().unwrap().downcast_ref::<RouteSeries>().unwrap();
        assert!(Arc::ptr_eq(&made.labels.listener, &other.labels.listener));
        assert!(Arc::ptr_eq(&made.labels.pool, &other.labels.pool));
        assert_eq!((&*other.labels.route, &*other.labels.pool), ("b", "p"));
        // A changed route a (a new entry, its series made again) goes on counting in them.
        let changed = Attachment::default();
        changed.get_or_init(|| attach(&web_route("a")));
        assert!(Arc::ptr_eq(a.get().unwrap(), changed.get().unwrap()));
        m.http_request_on(&outcome("a", 200), &changed);
        let totals = m.route_totals();
        assert_eq!(totals.len(), 1, "b answered nothing");
        assert_eq!((totals[0].route.as_str(), totals[0].requests), ("a", 2));
        let text = m.encode();
        assert!(text.contains("proxy_http_requests_total{listener=\"web\",route=\"a\",pool=\"p\",status_class=\"2xx\"} 2\n"), "{text}");
        assert!(
            text.contains(
                "proxy_http_response_bytes_total{listener=\"web\",route=\"a\",pool=\"p\"} 20\n"
            ),
            "{text}"
        );
        assert!(!text.contains("route=\"b\""), "{text}");
    }

    #[test]
    fn a_2xx_request_writes_the_first_64_bytes_of_its_series() {
        use std::mem::{align_of, offset_of, size_of};
        // The series start a 64-byte block with the 2xx class; the class starts with its
        // bytes, then the histogram's counts (sum, then buckets: see `Counts`).
        assert_eq!(align_of::<RouteSeries>(), 64);
        assert_eq!(offset_of!(RouteSeries, ok), 0);
        assert_eq!(offset_of!(ClassSeries, bytes), 0);
        assert_eq!(offset_of!(ClassSeries, duration), 8);
        assert_eq!(size_of::<RouteSeries>(), 320);
        // Which bucket a duration lands in: up to 50 ms, one of the first six, which with
        // the bytes and the sum fill the first 64 bytes.
        assert_eq!(super::REQUEST_BOUNDS.get(5), Some(&0.05));
        assert_eq!(8 + Counts::FIRST_BUCKET + 6 * size_of::<u64>(), 64);
    }

    #[test]
    fn requests_are_counted_by_route_and_status_class() {
        let m = Metrics::new(None);
        for _ in 0..3 {
            m.http_request(&outcome("a", 200));
        }
        m.http_request(&outcome("a", 503));
        m.http_request(&outcome("b", 404));
        let text = m.encode();
        assert!(text.contains("proxy_http_requests_total{listener=\"web\",route=\"a\",pool=\"p\",status_class=\"2xx\"} 3\n"), "{text}");
        assert!(text.contains("proxy_http_requests_total{listener=\"web\",route=\"a\",pool=\"p\",status_class=\"5xx\"} 1\n"), "{text}");
        assert!(text.contains("proxy_http_errors_total{listener=\"web\",route=\"a\",pool=\"p\",source=\"upstream\"} 1\n"), "{text}");
        assert!(text.contains("http_request_total_count 5\n"), "{text}");
        assert!(text.contains("proxy_http_request_duration_seconds_count{listener=\"web\",route=\"b\",pool=\"p\",status_class=\"4xx\"} 1\n"), "{text}");
        assert!(text.contains("proxy_http_request_duration_seconds_bucket{le=\"0.005\",listener=\"web\",route=\"a\",pool=\"p\",status_class=\"2xx\"} 3\n"), "{text}");
        assert!(
            text.contains(
                "proxy_http_response_bytes_total{listener=\"web\",route=\"a\",pool=\"p\"} 40\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE proxy_http_request_duration_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE proxy_http_errors counter\n"),
            "{text}"
        );
        assert!(
            !text.contains("source=\"downstream\""),
            "no error series before an error: {text}"
        );
        assert!(
            !text.contains("status_class=\"3xx\""),
            "no empty series: {text}"
        );
        // The 2xx series of a route is always there, inline; shown once it counted one.
        assert!(
            !text.contains("route=\"b\",pool=\"p\",status_class=\"2xx\""),
            "no 2xx series for a route that answered none: {text}"
        );
    }

    #[test]
    fn connections_are_active_until_dropped() {
        let m = Metrics::new(None);
        let web = m.listener("web", "http");
        let a = web.open();
        let b = web.open();
        assert_eq!(m.connections_open(), 2);
        drop(a);
        let text = m.encode();
        assert!(text.contains("tcp_connections_active_count 1\n"), "{text}");
        assert!(text.contains("tcp_connections_total_count 2\n"), "{text}");
        assert!(
            text.contains("proxy_connections_active{listener=\"web\",protocol=\"http\"} 1\n"),
            "{text}"
        );
        drop(b);
        assert_eq!(m.connections_open(), 0);
    }

    #[test]
    fn slow_client_and_refusal_series_start_at_zero_and_count_by_cause() {
        let m = Metrics::new(None);
        let web = m.listener("web", "https");
        let zero = m.encode();
        for cause in ["handshake", "head", "body", "idle"] {
            assert!(zero.contains(&format!("proxy_client_timeouts_total{{listener=\"web\",protocol=\"https\",cause=\"{cause}\"}} 0\n")), "{zero}");
        }
        web.timed_out(ClientTimeout::Head);
        web.timed_out(ClientTimeout::Head);
        web.timed_out(ClientTimeout::Idle);
        web.refused(Refusal::MaxConnectionsPerIp);
        web.rate_limited();
        let text = m.encode();
        assert!(text.contains("proxy_client_timeouts_total{listener=\"web\",protocol=\"https\",cause=\"head\"} 2\n"), "{text}");
        assert!(text.contains("proxy_client_timeouts_total{listener=\"web\",protocol=\"https\",cause=\"idle\"} 1\n"), "{text}");
        assert!(text.contains("proxy_connections_refused_total{listener=\"web\",protocol=\"https\",cause=\"max_connections\"} 0\n"), "{text}");
        assert!(text.contains("proxy_connections_refused_total{listener=\"web\",protocol=\"https\",cause=\"max_connections_per_ip\"} 1\n"), "{text}");
        assert!(
            text.contains("proxy_http_rate_limited_total{listener=\"web\",protocol=\"https\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn unknown_api_methods_share_one_label() {
        let m = Metrics::new(None);
        m.api_call("/x.Y/Z1", tonic::Code::Unimplemented);
        m.api_call("/x.Y/Z2", tonic::Code::Unimplemented);
        m.api_call("/proxy.v1.RouteService/ListRoutes", tonic::Code::Ok);
        let text = m.encode();
        assert!(
            text.contains("proxy_api_calls_total{method=\"unknown\",code=\"UNIMPLEMENTED\"} 2\n"),
            "{text}"
        );
        assert!(!text.contains("Z1"), "{text}");
    }

    #[test]
    fn average_window_is_the_mean_of_recent_requests() {
        let w = AverageWindow::new();
        w.record(Duration::from_millis(10), Instant::now());
        w.record(Duration::from_millis(30), Instant::now());
        assert!((w.average_ms() - 20.0).abs() < 1e-9, "{}", w.average_ms());
    }
}
