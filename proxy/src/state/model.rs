//! The desired-state objects: pools, HTTP routes and TCP routes.
//!
//! These are plain data. They are validated by [`super::apply`], persisted by
//! [`super::store`] and compiled for the data path by the writer's [`super::Publish`] step.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Who owns an object: the config file or the management API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Defined in the config file; reconciled at start-up, read-only through the API.
    Declarative,
    /// Created through the management API; survives restarts.
    #[default]
    Api,
}

impl Source {
    /// The name used in the store and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Declarative => "declarative",
            Source::Api => "api",
        }
    }
}

/// How a pool picks an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each request or connection goes to the next upstream in turn.
    #[default]
    RoundRobin,
    /// Always the first usable upstream; the next one only when it fails.
    Ordered,
    /// The upstream with the fewest requests or connections in flight.
    LeastConn,
}

impl Balance {
    /// The name used in config files and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::Ordered => "ordered",
            Balance::LeastConn => "least_conn",
        }
    }

    /// Parses the config/API name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "round_robin" => Some(Balance::RoundRobin),
            "ordered" => Some(Balance::Ordered),
            "least_conn" => Some(Balance::LeastConn),
            _ => None,
        }
    }
}

/// The HTTP version a pool speaks to its upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, one request at a time per connection.
    #[default]
    Http1,
    /// HTTP/2 in clear text with prior knowledge (RFC 9113 section 3.3).
    H2c,
    /// HTTP/2 over the pool's `tls`, ALPN `h2`.
    H2,
    /// With `tls`: `h2` or `http/1.1` as ALPN decides; without `tls`: HTTP/1.1.
    Auto,
}

impl UpstreamProtocol {
    /// The name used in config files and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::H2 => "h2",
            UpstreamProtocol::Auto => "auto",
        }
    }

    /// Parses the config/API name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "http1" => Some(UpstreamProtocol::Http1),
            "h2c" => Some(UpstreamProtocol::H2c),
            "h2" => Some(UpstreamProtocol::H2),
            "auto" => Some(UpstreamProtocol::Auto),
            _ => None,
        }
    }

    fn is_default(&self) -> bool {
        *self == UpstreamProtocol::Http1
    }
}

/// Whether an upstream takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamState {
    /// Takes new requests (subject to health).
    #[default]
    Active,
    /// Finishes what it has but gets nothing new.
    Draining,
}

/// One backend address of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    /// `host:port` (IP or name) the proxy dials.
    pub address: String,
    /// Relative share for balancing; at least 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Administrative state.
    #[serde(default)]
    pub state: UpstreamState,
}

fn default_weight() -> u32 {
    1
}

impl Upstream {
    /// An active upstream of weight 1.
    pub fn new(address: impl Into<String>) -> Self {
        Upstream {
            address: address.into(),
            weight: 1,
            state: UpstreamState::Active,
        }
    }
}

/// Active health check of a pool's upstreams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// HTTP path requested with GET; a 2xx or 3xx answer is healthy. Empty: TCP connect only.
    pub path: String,
    /// Checks with `grpc.health.v1.Health/Check` instead of `path` (SERVING is healthy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcHealthCheck>,
    /// Time between checks.
    #[serde(with = "duration_ms")]
    pub interval: Duration,
    /// Time allowed for one check.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
}

/// A gRPC health check: the service name asked about (empty: the server as a whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GrpcHealthCheck {
    /// `HealthCheckRequest.service`.
    #[serde(default)]
    pub service: String,
}

/// A named set of upstreams with a balancing policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Unique name.
    pub name: String,
    /// Owner.
    #[serde(default)]
    pub source: Source,
    /// Balancing policy.
    #[serde(default)]
    pub balance: Balance,
    /// Static upstreams.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// Optional active health check.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// Time allowed to open a connection to an upstream.
    #[serde(with = "duration_ms", default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// Time allowed for an upstream to start its response (HTTP) after the request was sent.
    #[serde(with = "duration_ms", default = "default_response_timeout")]
    pub response_timeout: Duration,
    /// TLS towards the upstreams; `None`: plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// Connection reuse, attempt budget and outlier ejection.
    #[serde(default)]
    pub policy: UpstreamPolicy,
    /// HTTP version towards the upstreams.
    #[serde(default, skip_serializing_if = "UpstreamProtocol::is_default")]
    pub protocol: UpstreamProtocol,
}

/// How a pool reuses connections, how hard a request tries, and when an upstream is
/// taken out of rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpstreamPolicy {
    /// An idle keep-alive connection older than this is closed instead of reused.
    #[serde(with = "duration_ms")]
    pub idle_timeout: Duration,
    /// Connections (busy and idle) per upstream; 0: no limit.
    pub max_connections_per_upstream: u32,
    /// Time the client may leave between two pieces of its request body.
    #[serde(with = "duration_ms")]
    pub body_timeout: Duration,
    /// One deadline for all connection attempts of a request.
    #[serde(with = "duration_ms")]
    pub connect_deadline: Duration,
    /// Upstreams a request tries at most (connection attempts).
    pub max_attempts: u32,
    /// HTTP/2 connections per upstream (and worker thread) that streams are spread over;
    /// more are opened only when all of them are at the upstream's
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub h2_connections: u32,
    /// PING liveness of HTTP/2 connections to the upstreams.
    pub h2_keepalive: H2Keepalive,
    /// An HTTP/2 connection to an upstream with no stream of ours open for this long is
    /// closed.
    #[serde(with = "duration_ms")]
    pub h2_idle_timeout: Duration,
    /// Outlier ejection.
    pub outlier: Outlier,
}

impl Default for UpstreamPolicy {
    fn default() -> Self {
        UpstreamPolicy {
            // Below the shortest common upstream keep-alive timeout (gunicorn: 2 s; Node.js,
            // uvicorn, Apache: 5 s; nginx: 75 s), so a pooled connection is normally
            // dropped by us before the upstream closes it.
            idle_timeout: Duration::from_millis(1500),
            max_connections_per_upstream: 0,
            body_timeout: Duration::from_secs(60),
            connect_deadline: Duration::from_secs(10),
            max_attempts: 3,
            h2_connections: 1,
            h2_keepalive: H2Keepalive::default(),
            // nginx's upstream `keepalive_timeout`: an HTTP/2 connection needs no margin
            // below the upstream's own timeout (a GOAWAY closes it for new streams and
            // PINGs find a vanished peer), and gRPC clients come back after pauses.
            h2_idle_timeout: Duration::from_secs(60),
            outlier: Outlier::default(),
        }
    }
}

/// How an HTTP/2 connection to an upstream is PINGed (idle or not) and when an unanswered
/// PING closes it, so a connection whose peer vanished without a FIN or RST (a host gone,
/// a NAT or firewall entry dropped) is found out before a request is sent on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct H2Keepalive {
    /// Time without any frame from the upstream after which a PING is sent.
    #[serde(with = "duration_ms")]
    pub interval: Duration,
    /// Time a PING's answer may take before the connection is closed.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
}

impl Default for H2Keepalive {
    fn default() -> Self {
        H2Keepalive {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
        }
    }
}

impl H2Keepalive {
    /// The longest `interval` or `timeout` taken: beyond a day a PING detects nothing in
    /// useful time, and the bound keeps the timer's deadline arithmetic far from overflow.
    pub const MAX: Duration = Duration::from_secs(24 * 60 * 60);
}

/// When an upstream is ejected (skipped while others work) after failing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Outlier {
    /// Consecutive failures (connect error or timeout, reset, and 5xx with `on_5xx`)
    /// that eject an upstream.
    pub consecutive_failures: u32,
    /// Whether a 5xx answer from the upstream counts as a failure.
    pub on_5xx: bool,
    /// First ejection time; doubled with every ejection without a success in between.
    #[serde(with = "duration_ms")]
    pub base_ejection: Duration,
    /// Longest ejection time.
    #[serde(with = "duration_ms")]
    pub max_ejection: Duration,
    /// Largest share of a pool's upstreams ejected at once, in percent (one upstream may
    /// always be ejected).
    pub max_ejection_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: 1,
            on_5xx: false,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

/// TLS from the proxy to a pool's upstreams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamTls {
    /// Sent as SNI and checked against the upstream's certificate (DNS name or IP).
    pub server_name: String,
    /// PEM file with the root certificates the upstream's certificate must chain to.
    pub ca_file: String,
    /// PEM file with the client certificate chain to present; empty: none.
    #[serde(default)]
    pub client_cert: String,
    /// PEM file with the client certificate's private key; set with `client_cert`.
    #[serde(default)]
    pub client_key: String,
}

/// Default upstream connect timeout.
pub fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Default time to first response byte.
pub fn default_response_timeout() -> Duration {
    Duration::from_secs(60)
}

/// How a route matches the request path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    /// The path starts with this string (byte-wise, like nginx `location /p`).
    Prefix(String),
    /// The path (without query) equals this string.
    Exact(String),
}

impl PathMatch {
    /// The pattern text.
    pub fn as_str(&self) -> &str {
        match self {
            PathMatch::Prefix(p) | PathMatch::Exact(p) => p,
        }
    }
}

/// An HTTP routing rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// Owner.
    #[serde(default)]
    pub source: Source,
    /// The HTTP listener it applies to.
    pub listener: String,
    /// `example.com`, `*.example.com`, or `None` for any host. Stored lower-case.
    #[serde(default)]
    pub host: Option<String>,
    /// Path condition.
    pub path: PathMatch,
    /// Pool that serves matching requests.
    pub pool: String,
    /// Remove the matched prefix from the forwarded path.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Higher wins among routes with the same host and path.
    #[serde(default)]
    pub priority: i32,
}

/// An L4 rule: connections accepted on `listener` go to `pool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRoute {
    /// Unique name.
    pub name: String,
    /// Owner.
    #[serde(default)]
    pub source: Source,
    /// The TCP listener it applies to.
    pub listener: String,
    /// Pool that receives the connections.
    pub pool: String,
    /// On a `tls-passthrough` listener: the ClientHello server name (`example.com` or
    /// `*.example.com`) this route takes; `None` takes every other name.
    #[serde(default)]
    pub sni: Option<String>,
}

/// Durations are stored as integer milliseconds so the JSON form is stable.
pub(crate) mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Listener protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 and h2c, routed by host and path.
    Http,
    /// Plain TCP, forwarded to one pool.
    Tcp,
    /// TLS terminated here, then HTTP/1.1 or HTTP/2 (by ALPN), routed like `http`.
    Https,
    /// TLS terminated here, then the plain bytes forwarded to the listener's pool.
    Tls,
    /// TLS not terminated: the ClientHello's SNI picks the pool, bytes pass untouched.
    TlsPassthrough,
}

impl Protocol {
    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
            Protocol::Https => "https",
            Protocol::Tls => "tls",
            Protocol::TlsPassthrough => "tls-passthrough",
        }
    }

    /// Whether connections carry HTTP requests routed by `[[routes]]`.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https)
    }

    /// Whether connections are forwarded as bytes by TCP routes.
    pub fn is_stream(self) -> bool {
        matches!(
            self,
            Protocol::Tcp | Protocol::Tls | Protocol::TlsPassthrough
        )
    }
}
