//! The TOML config file: parsed, validated, and turned into declarative [`Change`]s.
//!
//! Every error names the file, the line and the field (`proxy.toml:12: routes[0].pool: ...`),
//! so `proxyd check-config` can be used as a build-time check.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::discovery::{DiscoverySpec, SourceSpec};
use crate::state::{
    self, Balance, Change, HealthCheck, OnChange, PathMatch, Pool, Protocol, Route, Source,
    TcpRoute, Upstream,
};

mod cluster;
mod telemetry;
mod tls;

pub use cluster::{ClusterConfig, EtcdConfig, EtcdTls};

pub use tls::{
    normalise_allow_entry, AcmeChallenge, AcmeConfig, CertificateFiles, OnDemandConfig, TlsConfig,
};

/// The config used when `proxyd` is started without `--config`.
pub const EMBEDDED_DEFAULT: &str = r#"# Embedded default: one HTTP listener, no routes (every request gets a 404).
[server]
state_dir = "./state"
mgmt_socket = "./state/mgmt.sock"
admin_listen = "127.0.0.1:4208"

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:8080"
"#;

/// A config file that could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// I/O error.
        source: std::io::Error,
    },
    /// The file is malformed; the message is `file:line: field: reason`.
    #[error("{file}:{line}: {field}: {reason}")]
    Invalid {
        /// File name as given.
        file: String,
        /// 1-based line number.
        line: usize,
        /// Dotted field path.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// The `[server]` section.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Directory holding `proxy.db`.
    pub state_dir: PathBuf,
    /// Unix socket of the management API.
    pub mgmt_socket: PathBuf,
    /// Optional TCP address of the management API (requires `mgmt_token_file`).
    pub mgmt_listen: Option<SocketAddr>,
    /// File holding the bearer token the TCP management listener requires.
    pub mgmt_token_file: Option<PathBuf>,
    /// TLS of the TCP management listener; required unless `mgmt_listen` is loopback.
    pub mgmt_tls: Option<MgmtTls>,
    /// Address of the admin HTTP listener (`/healthz`, `/readyz`); `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    /// Whether the admin listener also serves the read-only status page under `/ui/`.
    pub admin_ui: bool,
    /// How long in-flight work may take after SIGTERM.
    pub shutdown_timeout: Duration,
    /// How long in-flight work may take after an upgrade handoff or a drain request.
    pub drain_timeout: Duration,
    /// How long a new process may take to become ready during an upgrade.
    pub upgrade_timeout: Duration,
    /// The binary an upgrade starts (a stable path such as a symlink); `None` = this one.
    pub executable: Option<PathBuf>,
    /// Default log filter (`RUST_LOG` overrides it).
    pub log_level: String,
    /// Threads serving HTTP listeners, each with its own runtime; 0: one per CPU.
    pub workers: usize,
}

/// TLS of the TCP management listener (`server.mgmt_tls`). The files are read when the
/// listener starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MgmtTls {
    /// PEM certificate chain the listener presents, leaf first.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM roots that client certificates must chain to; when set every client must
    /// present one, when `None` none is asked for.
    pub client_ca: Option<PathBuf>,
}

/// One `[[listeners]]` entry.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Unique name (also the systemd `FileDescriptorName`).
    pub name: String,
    /// What it speaks.
    pub protocol: Protocol,
    /// Where it binds.
    pub address: SocketAddr,
    /// Most connections open at once. On `http` and `https` listeners more are closed
    /// right after accept (counted); on the others they wait in the kernel backlog.
    pub max_connections: usize,
    /// Most connections open at once from one client address (`http`/`https`); `None`:
    /// no such limit.
    pub max_connections_per_ip: Option<u32>,
    /// Requests per client address (`http`/`https`); `None`: no such limit.
    pub rate_limit: Option<RateLimit>,
    /// Time allowed for a client to send a request head (HTTP; from accept for the first).
    pub header_timeout: Duration,
    /// A connection with no bytes moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// Largest request head accepted (HTTP); larger gets 431.
    pub max_header_bytes: usize,
    /// Largest request body accepted (HTTP); 0 means no limit. Larger gets 413.
    pub max_body_bytes: u64,
}

/// A listener's per-client-address request rate limit: a token bucket per address.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second (a request takes one).
    pub requests_per_second: f64,
    /// Tokens a bucket holds: the requests an address may send at once.
    pub burst: u32,
    /// Addresses tracked at most; beyond, the buckets closest to full are forgotten.
    pub max_clients: usize,
}

/// The `[registration]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationConfig {
    /// How long a route stays after its last instance's stream ended.
    pub hold: Duration,
    /// Ports a registration may ask for.
    pub port_range: RangeInclusive<u16>,
    /// Address ports opened for registrations bind to.
    pub address: IpAddr,
    /// Most requests or connections waiting on one held route.
    pub queue_limit: usize,
    /// Longest time one request or connection waits for an instance.
    pub max_wait: Duration,
    /// Interval of the keepalive pings on the stream; three missed ones end the lease.
    pub keepalive: Duration,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        RegistrationConfig {
            hold: Duration::from_secs(30),
            port_range: 20000..=20999,
            address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            queue_limit: 1000,
            max_wait: Duration::from_secs(30),
            keepalive: Duration::from_secs(10),
        }
    }
}

/// A validated config file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (`None` for the embedded default).
    pub path: Option<PathBuf>,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[[listeners]]`.
    pub listeners: Vec<ListenerConfig>,
    /// The declarative objects (pools, routes, TCP routes), as the Changes that create them.
    pub declarative: Vec<Change>,
    /// Discovery sources of the pools (`[pools.discovery]`), run-time only.
    pub discovery: Vec<DiscoverySpec>,
    /// The `[registration]` section.
    pub registration: RegistrationConfig,
    /// The `[tls]` section.
    pub tls: TlsConfig,
    /// The `[telemetry]` section.
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// The `[cluster]` section (`None`: a single host, as without fleet mode).
    pub cluster: Option<ClusterConfig>,
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// The embedded default config.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::parse(EMBEDDED_DEFAULT, "<embedded default>")
    }

    /// Parses and validates config text; `file` is used in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let doc = Doc { text, file };
        let raw: RawConfig = toml::from_str(text).map_err(|e| doc.toml_error(&e))?;
        doc.build(raw)
    }

    /// Fuzz entry point: arbitrary bytes as a config file give a config or an error that
    /// names the file and a line, never a panic.
    pub fn fuzz_parse(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Err(e) = Config::parse(text, "fuzz.toml") {
            assert!(e.to_string().starts_with("fuzz.toml:"), "{e}");
        }
    }

    /// The listener called `name`.
    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// Listener names and protocols, as the state validation needs them.
    pub fn listener_protocols(&self) -> BTreeMap<String, Protocol> {
        self.listeners
            .iter()
            .map(|l| (l.name.clone(), l.protocol))
            .collect()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: Option<Spanned<RawServer>>,
    #[serde(default)]
    listeners: Vec<Spanned<RawListener>>,
    #[serde(default)]
    pools: Vec<Spanned<RawPool>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    registration: Option<Spanned<RawRegistration>>,
    #[serde(default)]
    tcp_routes: Vec<Spanned<RawTcpRoute>>,
    #[serde(default)]
    tls: Option<Spanned<tls::RawTls>>,
    #[serde(default)]
    telemetry: Option<Spanned<telemetry::RawTelemetry>>,
    #[serde(default)]
    cluster: Option<Spanned<cluster::RawCluster>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcpRoute {
    name: String,
    listener: String,
    pool: String,
    sni: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    state_dir: Option<String>,
    mgmt_socket: Option<String>,
    mgmt_listen: Option<String>,
    mgmt_token_file: Option<String>,
    mgmt_tls: Option<Spanned<RawMgmtTls>>,
    admin_listen: Option<String>,
    admin_ui: Option<bool>,
    shutdown_timeout: Option<String>,
    drain_timeout: Option<String>,
    upgrade_timeout: Option<String>,
    executable: Option<String>,
    log_level: Option<String>,
    workers: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMgmtTls {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    protocol: String,
    address: String,
    pool: Option<String>,
    max_connections: Option<usize>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    max_body_bytes: Option<u64>,
    max_connections_per_ip: Option<u32>,
    rate_limit: Option<RawRateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    requests_per_second: f64,
    burst: Option<u32>,
    max_clients: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawUpstream {
    Address(String),
    Table {
        address: String,
        #[serde(default)]
        weight: Option<u32>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default)]
    path: Option<String>,
    grpc: Option<RawGrpcHealth>,
    interval: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpcHealth {
    #[serde(default)]
    service: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: String,
    balance: Option<String>,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    health: Option<RawHealth>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections_per_upstream: Option<u32>,
    body_timeout: Option<String>,
    connect_deadline: Option<String>,
    max_attempts: Option<u32>,
    h2_connections: Option<u32>,
    h2_keepalive: Option<RawH2Keepalive>,
    h2_idle_timeout: Option<String>,
    protocol: Option<String>,
    outlier: Option<RawOutlier>,
    on_change: Option<String>,
    discovery: Option<RawDiscovery>,
    tls: Option<RawUpstreamTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawH2Keepalive {
    interval: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    consecutive_failures: Option<u32>,
    on_5xx: Option<bool>,
    base_ejection: Option<String>,
    max_ejection: Option<String>,
    max_ejection_percent: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    server_name: String,
    #[serde(default)]
    ca_file: String,
    #[serde(default)]
    client_cert: String,
    #[serde(default)]
    client_key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    etcd: Option<RawEtcd>,
    dns: Option<RawDns>,
    exec: Option<RawExec>,
    file: Option<RawFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    endpoints: Vec<String>,
    prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    name: String,
    port: Option<u16>,
    interval: Option<String>,
    resolver: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExec {
    command: Vec<String>,
    interval: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRegistration {
    hold: Option<String>,
    port_range: Option<String>,
    address: Option<String>,
    queue_limit: Option<usize>,
    max_wait: Option<String>,
    keepalive: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    listener: String,
    host: Option<String>,
    path_prefix: Option<String>,
    path: Option<String>,
    pool: String,
    #[serde(default)]
    strip_prefix: bool,
    #[serde(default)]
    priority: i32,
}

/// The source text, for turning spans into line numbers.
struct Doc<'a> {
    text: &'a str,
    file: &'a str,
}

/// Where a declarative Change came from in the file.
struct Origin {
    section: &'static str,
    index: usize,
    span: Range<usize>,
}

impl Doc<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// The line of `key = ...` inside `span`, else the first line of `span`.
    fn line_of_key(&self, span: &Range<usize>, key: &str) -> usize {
        // A table's span may cover only its header; its keys run until the next table
        // (sub-tables such as `[pools.health]` belong to it).
        let start = span.start.min(self.text.len());
        let mut offset = start;
        for (i, line) in self.text[start..].split_inclusive('\n').enumerate() {
            let trimmed = line.trim_start();
            let header = trimmed.starts_with('[');
            if i > 0 && header && (trimmed.starts_with("[[") || !trimmed.contains('.')) {
                break;
            }
            // The key as a sub-table of its own: `[pools.h2_keepalive]`.
            if i > 0 && header && trimmed.trim_end().ends_with(&format!(".{key}]")) {
                return self.line_of(offset);
            }
            if let Some(rest) = trimmed.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return self.line_of(offset);
                }
            }
            offset += line.len();
        }
        self.line_of(start)
    }

    fn error(
        &self,
        line: usize,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line,
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let (line, field) = match e.span() {
            Some(span) => {
                let word = self.text.get(span.clone()).unwrap_or("").trim();
                let looks_like_key = !word.is_empty()
                    && word
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
                let field = match self.key_before(span.start) {
                    // A value of the wrong type: the span is the value's, name its key.
                    Some(key) => key,
                    None if looks_like_key => word.to_string(),
                    None => "toml".to_string(),
                };
                (self.line_of(span.start), field)
            }
            None => (1, "toml".to_string()),
        };
        self.error(line, field, e.message().trim())
    }

    /// The dotted name of the key whose value starts at `offset` (`pools[0].h2_keepalive`
    /// for `h2_keepalive = <value>` in the first `[[pools]]`), if a key is written just
    /// before it on its line.
    fn key_before(&self, offset: usize) -> Option<String> {
        let offset = offset.min(self.text.len());
        let line_start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let before = self.text[line_start..offset].trim_end().strip_suffix('=')?;
        let before = before.trim_end();
        let start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
            .map_or(0, |i| i + 1);
        let key = &before[start..];
        if key.is_empty() {
            return None;
        }
        // Inline tables between the table header and the key: `outer = { key = value }`.
        let mut inline = Vec::new();
        let mut rest = &before[..start];
        while let Some(open) = rest.rfind('{') {
            let outer = rest[..open].trim_end().strip_suffix('=').map(str::trim_end);
            let Some(outer) = outer else { break };
            let from = outer
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .map_or(0, |i| i + 1);
            inline.push(&outer[from..]);
            rest = &outer[..from];
        }
        let mut name = self.table_at(line_start);
        for part in inline.iter().rev().chain(std::iter::once(&key)) {
            if !name.is_empty() {
                name.push('.');
            }
            name.push_str(part);
        }
        Some(name)
    }

    /// The table the text at `offset` belongs to, as error messages name it: `server`,
    /// `pools[1]`, `pools[1].health`; empty at the top level.
    fn table_at(&self, offset: usize) -> String {
        let mut arrays: HashMap<&str, usize> = HashMap::new();
        let mut current = String::new();
        let is_name = |name: &str| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
        };
        for line in self.text[..offset.min(self.text.len())].lines() {
            let line = line.trim();
            if let Some(name) = line
                .strip_prefix("[[")
                .and_then(|l| l.split("]]").next())
                .filter(|name| is_name(name))
            {
                let name = name.trim();
                let index = arrays.entry(name).and_modify(|n| *n += 1).or_insert(0);
                current = format!("{name}[{index}]");
            } else if let Some(name) = line
                .strip_prefix('[')
                .and_then(|l| l.split(']').next())
                .filter(|name| is_name(name))
            {
                let name = name.trim();
                // `[pools.health]` belongs to the latest `[[pools]]`.
                current = match name.split_once('.') {
                    Some((array, sub)) if arrays.contains_key(array) => {
                        format!("{array}[{}].{sub}", arrays[array])
                    }
                    _ => name.to_string(),
                };
            }
        }
        current
    }

    fn field_error(
        &self,
        span: &Range<usize>,
        prefix: &str,
        key: &str,
        reason: impl Into<String>,
    ) -> ConfigError {
        self.error(
            self.line_of_key(span, key),
            format!("{prefix}.{key}"),
            reason,
        )
    }

    fn duration(
        &self,
        value: &Option<String>,
        default: Duration,
        span: &Range<usize>,
        prefix: &str,
        key: &str,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(s) => humantime::parse_duration(s).map_err(|e| {
                self.field_error(span, prefix, key, format!("invalid duration {s:?}: {e}"))
            }),
        }
    }

    fn build(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.build_server(raw.server)?;
        let mut listeners = Vec::new();
        let mut declarative = Vec::new();
        let mut origins = Vec::new();
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for (index, spanned) in raw.listeners.into_iter().enumerate() {
            let span = spanned.span();
            let raw = spanned.into_inner();
            let prefix = format!("listeners[{index}]");
            let listener = self.build_listener(&raw, &span, &prefix)?;
            if !names.insert(listener.name.clone()) {
                return Err(self.field_error(&span, &prefix, "name", "duplicate listener name"));
            }
            // Port 0 asks the OS for a free port, so several such listeners never collide.
            if listener.address.port() != 0 && !addresses.insert(listener.address) {
                return Err(self.field_error(
                    &span,
                    &prefix,
                    "address",
                    format!("another listener already uses {}", listener.address),
                ));
            }
            match (listener.protocol, raw.pool) {
                (p, Some(pool)) if p.is_stream() => {
                    declarative.push(Change::CreateTcpRoute(TcpRoute {
                        name: listener.name.clone(),
                        source: Source::Declarative,
                        listener: listener.name.clone(),
                        pool,
                        sni: None,
                    }));
                    origins.push(Origin {
                        section: "listeners",
                        index,
                        span: span.clone(),
                    });
                }
                (_, Some(_)) => {
                    return Err(self.field_error(
                        &span,
                        &prefix,
                        "pool",
                        "only tcp, tls and tls-passthrough listeners take a pool; http and https listeners use [[routes]]",
                    ))
                }
                (_, None) => {}
            }
            listeners.push(listener);
        }
        // Pools first, so routes can name them.
        let mut discovery = Vec::new();
        let mut pool_changes = Vec::new();
        for (index, spanned) in raw.pools.into_iter().enumerate() {
            let span = spanned.span();
            let prefix = format!("pools[{index}]");
            let mut raw_pool = spanned.into_inner();
            let discovery_spec = self.build_discovery(&mut raw_pool, &span, &prefix)?;
            let pool = self.build_pool(raw_pool, &span, &prefix)?;
            discovery.extend(discovery_spec);
            pool_changes.push((
                Change::CreatePool(pool),
                Origin {
                    section: "pools",
                    index,
                    span,
                },
            ));
        }
        for (index, spanned) in raw.routes.into_iter().enumerate() {
            let span = spanned.span();
            let prefix = format!("routes[{index}]");
            let route = self.build_route(spanned.into_inner(), &span, &prefix)?;
            declarative.push(Change::CreateRoute(route));
            origins.push(Origin {
                section: "routes",
                index,
                span,
            });
        }
        for (index, spanned) in raw.tcp_routes.into_iter().enumerate() {
            let span = spanned.span();
            let r = spanned.into_inner();
            declarative.push(Change::CreateTcpRoute(TcpRoute {
                name: r.name,
                source: Source::Declarative,
                listener: r.listener,
                pool: r.pool,
                sni: r.sni,
            }));
            origins.push(Origin {
                section: "tcp_routes",
                index,
                span,
            });
        }
        let (pool_changes, pool_origins): (Vec<_>, Vec<_>) = pool_changes.into_iter().unzip();
        let declarative: Vec<Change> = pool_changes.into_iter().chain(declarative).collect();
        let origins: Vec<Origin> = pool_origins.into_iter().chain(origins).collect();

        // The same validation the API gets, against an empty state.
        let listener_protocols = listeners
            .iter()
            .map(|l| (l.name.clone(), l.protocol))
            .collect();
        if let Err((index, err)) = state::State::empty(listener_protocols).check_batch(&declarative)
        {
            return Err(self.apply_error(&origins[index], err));
        }
        // And the files the API's file check reads, one change at a time so the error
        // names the field within its own section.
        for (change, origin) in declarative.iter().zip(&origins) {
            if let Err((_, err)) = crate::upstream::tls::check_files(std::slice::from_ref(change)) {
                return Err(self.apply_error(origin, err));
            }
        }
        Ok(Config {
            path: None,
            server,
            listeners,
            declarative,
            discovery,
            registration: self.build_registration(raw.registration)?,
            tls: self.build_tls(raw.tls)?,
            telemetry: self.build_telemetry(raw.telemetry)?,
            cluster: self.build_cluster(raw.cluster)?,
        })
    }

    /// Maps a state validation error back to the file position it came from.
    fn apply_error(&self, origin: &Origin, err: state::ApplyError) -> ConfigError {
        let prefix = format!("{}[{}]", origin.section, origin.index);
        match err {
            state::ApplyError::Invalid { field, reason } => {
                // The state names fields `route.pool`, `pool.upstreams[1]`, ...: keep the last part.
                let key = field.split_once('.').map_or(field.as_str(), |(_, k)| k);
                let key = match (origin.section, key) {
                    ("routes", "path") => {
                        if self.text[origin.span.clone()].contains("path_prefix") {
                            "path_prefix"
                        } else {
                            "path"
                        }
                    }
                    ("listeners", "pool") => "pool",
                    ("listeners", "listener") => "name",
                    _ => key,
                };
                // `upstreams[1].address` is on the `upstreams` line, `tls.ca_file` on `tls`.
                let bare = key.split(['[', '.']).next().unwrap_or(key);
                self.error(
                    self.line_of_key(&origin.span, bare),
                    format!("{prefix}.{key}"),
                    reason,
                )
            }
            state::ApplyError::AlreadyExists { kind, .. } => self.field_error(
                &origin.span,
                &prefix,
                "name",
                format!("duplicate {kind} name"),
            ),
            other => self.error(self.line_of(origin.span.start), prefix, other.to_string()),
        }
    }

    fn build_server(&self, raw: Option<Spanned<RawServer>>) -> Result<ServerConfig, ConfigError> {
        let (span, raw) = match raw {
            Some(s) => (s.span(), s.into_inner()),
            None => (0..0, RawServer::default()),
        };
        let prefix = "server";
        let state_dir = PathBuf::from(raw.state_dir.unwrap_or_else(|| "./state".into()));
        let mgmt_socket = raw
            .mgmt_socket
            .map(PathBuf::from)
            .unwrap_or_else(|| state_dir.join("mgmt.sock"));
        let mgmt_listen: Option<SocketAddr> = match raw.mgmt_listen.as_deref() {
            None | Some("") => None,
            Some(s) => Some(s.parse().map_err(|_| {
                self.field_error(
                    &span,
                    prefix,
                    "mgmt_listen",
                    format!("invalid address {s:?}, expected IP:PORT"),
                )
            })?),
        };
        let mgmt_token_file = raw
            .mgmt_token_file
            .filter(|f| !f.is_empty())
            .map(PathBuf::from);
        if mgmt_listen.is_some() && mgmt_token_file.is_none() {
            return Err(self.field_error(
                &span,
                prefix,
                "mgmt_listen",
                "requires mgmt_token_file (the TCP management listener only takes bearer-token calls)",
            ));
        }
        let mgmt_tls = self.build_mgmt_tls(raw.mgmt_tls)?;
        match (mgmt_listen, &mgmt_tls) {
            // The token would cross the network in the clear.
            (Some(addr), None) if !addr.ip().to_canonical().is_loopback() => {
                return Err(self.field_error(
                    &span,
                    prefix,
                    "mgmt_listen",
                    format!(
                        "{addr} is not a loopback address: set server.mgmt_tls (without TLS \
                         the listener may only bind 127.0.0.0/8 or ::1)"
                    ),
                ));
            }
            (None, Some(_)) => {
                return Err(self.field_error(
                    &span,
                    prefix,
                    "mgmt_tls",
                    "requires mgmt_listen (the unix socket needs no TLS)",
                ));
            }
            _ => {}
        }
        let admin_listen = match raw.admin_listen.as_deref() {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 4208))),
            Some("") => None,
            Some(s) => Some(s.parse().map_err(|_| {
                self.field_error(
                    &span,
                    prefix,
                    "admin_listen",
                    format!("invalid address {s:?}, expected IP:PORT"),
                )
            })?),
        };
        let shutdown_timeout = self.duration(
            &raw.shutdown_timeout,
            Duration::from_secs(30),
            &span,
            prefix,
            "shutdown_timeout",
        )?;
        let drain_timeout = self.duration(
            &raw.drain_timeout,
            Duration::from_secs(30),
            &span,
            prefix,
            "drain_timeout",
        )?;
        let upgrade_timeout = self.duration(
            &raw.upgrade_timeout,
            Duration::from_secs(30),
            &span,
            prefix,
            "upgrade_timeout",
        )?;
        if upgrade_timeout.is_zero() {
            return Err(self.field_error(&span, prefix, "upgrade_timeout", "must be positive"));
        }
        let log_level = raw.log_level.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(self.field_error(
                &span,
                prefix,
                "log_level",
                format!("invalid log filter {log_level:?}"),
            ));
        }
        Ok(ServerConfig {
            state_dir,
            mgmt_socket,
            mgmt_listen,
            mgmt_token_file,
            mgmt_tls,
            admin_listen,
            admin_ui: raw.admin_ui.unwrap_or(true),
            shutdown_timeout,
            drain_timeout,
            upgrade_timeout,
            executable: raw.executable.filter(|e| !e.is_empty()).map(PathBuf::from),
            log_level,
            workers: raw.workers.unwrap_or(0),
        })
    }

    fn build_mgmt_tls(
        &self,
        raw: Option<Spanned<RawMgmtTls>>,
    ) -> Result<Option<MgmtTls>, ConfigError> {
        let Some(raw) = raw else {
            return Ok(None);
        };
        let span = raw.span();
        let raw = raw.into_inner();
        let prefix = "server.mgmt_tls";
        let path = |value: Option<String>, key: &str| match value.filter(|v| !v.is_empty()) {
            Some(v) => Ok(PathBuf::from(v)),
            None => Err(self.field_error(&span, prefix, key, "required (a PEM file)")),
        };
        Ok(Some(MgmtTls {
            cert: path(raw.cert, "cert")?,
            key: path(raw.key, "key")?,
            client_ca: raw.client_ca.filter(|v| !v.is_empty()).map(PathBuf::from),
        }))
    }

    fn build_listener(
        &self,
        raw: &RawListener,
        span: &Range<usize>,
        prefix: &str,
    ) -> Result<ListenerConfig, ConfigError> {
        if let Err(reason) = state::check_name(&raw.name) {
            return Err(self.field_error(span, prefix, "name", reason));
        }
        let protocol = match raw.protocol.as_str() {
            "http" => Protocol::Http,
            "tcp" => Protocol::Tcp,
            "https" => Protocol::Https,
            "tls" => Protocol::Tls,
            "tls-passthrough" => Protocol::TlsPassthrough,
            other => {
                return Err(self.field_error(
                    span,
                    prefix,
                    "protocol",
                    format!(
                    "unknown protocol {other:?}, expected http, https, tcp, tls or tls-passthrough"
                ),
                ))
            }
        };
        let address: SocketAddr = raw.address.parse().map_err(|_| {
            self.field_error(
                span,
                prefix,
                "address",
                format!("invalid address {:?}, expected IP:PORT", raw.address),
            )
        })?;
        let max_connections = raw.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(self.field_error(span, prefix, "max_connections", "must be at least 1"));
        }
        let max_header_bytes = raw.max_header_bytes.unwrap_or(64 * 1024);
        if max_header_bytes < 8192 {
            return Err(self.field_error(
                span,
                prefix,
                "max_header_bytes",
                "must be at least 8192",
            ));
        }
        if raw.max_connections_per_ip.is_some() && !protocol.is_http() {
            return Err(self.field_error(
                span,
                prefix,
                "max_connections_per_ip",
                "only http and https listeners have per-client limits",
            ));
        }
        if raw.max_connections_per_ip == Some(0) {
            return Err(self.field_error(
                span,
                prefix,
                "max_connections_per_ip",
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        let rate_limit = match &raw.rate_limit {
            None => None,
            Some(rate) => Some(self.build_rate_limit(rate, protocol, span, prefix)?),
        };
        Ok(ListenerConfig {
            name: raw.name.clone(),
            protocol,
            address,
            max_connections,
            max_connections_per_ip: raw.max_connections_per_ip,
            rate_limit,
            header_timeout: self.duration(
                &raw.header_timeout,
                Duration::from_secs(10),
                span,
                prefix,
                "header_timeout",
            )?,
            idle_timeout: self.duration(
                &raw.idle_timeout,
                Duration::from_secs(60),
                span,
                prefix,
                "idle_timeout",
            )?,
            max_header_bytes,
            max_body_bytes: raw.max_body_bytes.unwrap_or(0),
        })
    }

    /// `listeners[].rate_limit`.
    fn build_rate_limit(
        &self,
        raw: &RawRateLimit,
        protocol: Protocol,
        span: &Range<usize>,
        prefix: &str,
    ) -> Result<RateLimit, ConfigError> {
        let error = |key: &str, reason: &str| {
            // `rate_limit = { ... }` on one line, or a `[listeners.rate_limit]` table.
            let inline = self.line_of_key(span, "rate_limit");
            let own = self.line_of_key(span, key);
            let line = if own == self.line_of(span.start.min(self.text.len())) {
                inline
            } else {
                own
            };
            self.error(line, format!("{prefix}.rate_limit.{key}"), reason)
        };
        if !protocol.is_http() {
            return Err(error(
                "requests_per_second",
                "only http and https listeners have per-client limits",
            ));
        }
        let rate = raw.requests_per_second;
        if !(0.001..=1e9).contains(&rate) {
            return Err(error(
                "requests_per_second",
                "must be a number from 0.001 to 1000000000",
            ));
        }
        // By default an address may send one second's worth at once.
        let burst = raw.burst.unwrap_or_else(|| {
            // In range: `rate` is at most 1e9.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let per_second = rate.ceil() as u32;
            per_second.max(1)
        });
        if burst == 0 {
            return Err(error("burst", "must be at least 1"));
        }
        let max_clients = raw.max_clients.unwrap_or(100_000);
        if max_clients == 0 {
            return Err(error("max_clients", "must be at least 1"));
        }
        Ok(RateLimit {
            requests_per_second: rate,
            burst,
            max_clients,
        })
    }

    /// `on_change` and `[pools.discovery]` of a pool (taken out of `raw`).
    fn build_discovery(
        &self,
        raw: &mut RawPool,
        span: &Range<usize>,
        prefix: &str,
    ) -> Result<Option<DiscoverySpec>, ConfigError> {
        let on_change = match raw.on_change.take() {
            None => OnChange::Keep,
            Some(s) => OnChange::parse(&s).ok_or_else(|| {
                self.field_error(
                    span,
                    prefix,
                    "on_change",
                    format!("unknown on_change {s:?}, expected keep or reset"),
                )
            })?,
        };
        let Some(d) = raw.discovery.take() else {
            if on_change == OnChange::Reset {
                return Err(self.field_error(
                    span,
                    prefix,
                    "on_change",
                    "\"reset\" needs a [pools.discovery] section",
                ));
            }
            return Ok(None);
        };
        let prefix = format!("{prefix}.discovery");
        let given: Vec<&str> = [
            d.etcd.as_ref().map(|_| "etcd"),
            d.dns.as_ref().map(|_| "dns"),
            d.exec.as_ref().map(|_| "exec"),
            d.file.as_ref().map(|_| "file"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if given.len() != 1 {
            // Point at the last source given: the one too many.
            let line = given
                .iter()
                .map(|k| self.line_of_key(span, k))
                .max()
                .unwrap_or_else(|| self.line_of_key(span, "discovery"));
            return Err(self.error(
                line,
                prefix,
                format!(
                    "give exactly one of etcd, dns, exec or file (got {})",
                    if given.is_empty() {
                        "none".to_string()
                    } else {
                        given.join(", ")
                    }
                ),
            ));
        }
        // Errors inside an inline table point at its line and name the inner field.
        let inner = |key: &str, field: &str, reason: String| {
            self.error(
                self.line_of_key(span, key),
                format!("{prefix}.{key}.{field}"),
                reason,
            )
        };
        let duration =
            |key: &str, field: &str, value: &Option<String>, default: Duration| match value {
                None => Ok(default),
                Some(s) => match humantime::parse_duration(s) {
                    Ok(d) if !d.is_zero() => Ok(d),
                    Ok(_) => Err(inner(key, field, "must be positive".into())),
                    Err(e) => Err(inner(key, field, format!("invalid duration {s:?}: {e}"))),
                },
            };
        let source =
            if let Some(e) = d.etcd {
                if e.endpoints.is_empty() {
                    return Err(inner(
                        "etcd",
                        "endpoints",
                        "must name at least one endpoint".into(),
                    ));
                }
                if let Some(bad) = e.endpoints.iter().find(|u| {
                    !(u.starts_with("http://") || u.starts_with("https://")) || u.len() <= 8
                }) {
                    return Err(inner(
                        "etcd",
                        "endpoints",
                        format!("{bad:?} is not an http:// or https:// URL"),
                    ));
                }
                if !e.prefix.starts_with('/') || e.prefix.trim_end_matches('/').is_empty() {
                    return Err(inner(
                        "etcd",
                        "prefix",
                        format!("{:?} must start with '/' and name a directory", e.prefix),
                    ));
                }
                SourceSpec::Etcd {
                    endpoints: e.endpoints,
                    prefix: e.prefix.trim_end_matches('/').to_string(),
                }
            } else if let Some(n) = d.dns {
                if n.name.is_empty() || n.name.contains(char::is_whitespace) {
                    return Err(inner(
                        "dns",
                        "name",
                        format!("{:?} is not a DNS name", n.name),
                    ));
                }
                if n.port == Some(0) {
                    return Err(inner(
                        "dns",
                        "port",
                        "must be 1-65535 (leave it out for SRV records)".into(),
                    ));
                }
                let resolver = match n.resolver.as_deref() {
                    None => None,
                    Some(r) => Some(r.parse().map_err(|_| {
                        inner(
                            "dns",
                            "resolver",
                            format!("invalid address {r:?}, expected IP:PORT"),
                        )
                    })?),
                };
                SourceSpec::Dns {
                    name: n.name,
                    port: n.port,
                    interval: duration("dns", "interval", &n.interval, Duration::from_secs(30))?,
                    resolver,
                }
            } else if let Some(x) = d.exec {
                if x.command.first().is_none_or(|c| c.is_empty()) {
                    return Err(inner("exec", "command", "must name a program".into()));
                }
                let interval = duration("exec", "interval", &x.interval, Duration::from_secs(10))?;
                let timeout = duration(
                    "exec",
                    "timeout",
                    &x.timeout,
                    Duration::from_secs(5).min(interval),
                )?;
                SourceSpec::Exec {
                    command: x.command,
                    interval,
                    timeout,
                }
            } else if let Some(f) = d.file {
                if f.path.is_empty() {
                    return Err(inner("file", "path", "must not be empty".into()));
                }
                SourceSpec::File {
                    path: PathBuf::from(f.path),
                }
            } else {
                return Err(self.error(
                    self.line_of_key(span, "discovery"),
                    prefix,
                    "give one of etcd, dns, exec or file",
                ));
            };
        Ok(Some(DiscoverySpec {
            pool: raw.name.clone(),
            source,
            on_change,
        }))
    }

    fn build_registration(
        &self,
        raw: Option<Spanned<RawRegistration>>,
    ) -> Result<RegistrationConfig, ConfigError> {
        let (span, raw) = match raw {
            Some(s) => (s.span(), s.into_inner()),
            None => (0..0, RawRegistration::default()),
        };
        let prefix = "registration";
        let defaults = RegistrationConfig::default();
        let positive = |value: &Option<String>,
                        default: Duration,
                        key: &str|
         -> Result<Duration, ConfigError> {
            let d = self.duration(value, default, &span, prefix, key)?;
            if d.is_zero() {
                return Err(self.field_error(&span, prefix, key, "must be positive"));
            }
            Ok(d)
        };
        let hold = self.duration(&raw.hold, defaults.hold, &span, prefix, "hold")?;
        let max_wait = positive(&raw.max_wait, defaults.max_wait, "max_wait")?;
        let keepalive = positive(&raw.keepalive, defaults.keepalive, "keepalive")?;
        let port_range = match raw.port_range.as_deref() {
            None => defaults.port_range,
            Some(s) => {
                let parsed = s.split_once('-').and_then(|(a, b)| {
                    Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
                });
                match parsed {
                    Some((a, b)) if a > 0 && a <= b => a..=b,
                    _ => {
                        return Err(self.field_error(
                            &span,
                            prefix,
                            "port_range",
                            format!("invalid range {s:?}, expected LOW-HIGH with 1 <= LOW <= HIGH"),
                        ))
                    }
                }
            }
        };
        let address = match raw.address.as_deref() {
            None => defaults.address,
            Some(s) => s.parse().map_err(|_| {
                self.field_error(
                    &span,
                    prefix,
                    "address",
                    format!("invalid IP address {s:?}"),
                )
            })?,
        };
        let queue_limit = raw.queue_limit.unwrap_or(defaults.queue_limit);
        Ok(RegistrationConfig {
            hold,
            port_range,
            address,
            queue_limit,
            max_wait,
            keepalive,
        })
    }

    fn build_pool(
        &self,
        raw: RawPool,
        span: &Range<usize>,
        prefix: &str,
    ) -> Result<Pool, ConfigError> {
        let balance = match raw.balance.as_deref() {
            None => Balance::RoundRobin,
            Some(s) => Balance::parse(s).ok_or_else(|| {
                self.field_error(
                    span,
                    prefix,
                    "balance",
                    format!("unknown balance {s:?}, expected round_robin, ordered or least_conn"),
                )
            })?,
        };
        let upstreams = raw
            .upstreams
            .into_iter()
            .map(|u| match u {
                RawUpstream::Address(address) => Upstream::new(address),
                RawUpstream::Table { address, weight } => Upstream {
                    weight: weight.unwrap_or(1),
                    ..Upstream::new(address)
                },
            })
            .collect();
        let health = match raw.health {
            None => None,
            Some(h) => Some(HealthCheck {
                path: h.path.unwrap_or_default(),
                grpc: h
                    .grpc
                    .map(|g| state::GrpcHealthCheck { service: g.service }),
                interval: self.duration(
                    &h.interval,
                    Duration::from_secs(5),
                    span,
                    prefix,
                    "interval",
                )?,
                timeout: self.duration(
                    &h.timeout,
                    Duration::from_secs(2),
                    span,
                    prefix,
                    "timeout",
                )?,
            }),
        };
        let defaults = state::UpstreamPolicy::default();
        let outlier_prefix = format!("{prefix}.outlier");
        let outlier = match raw.outlier {
            None => defaults.outlier.clone(),
            Some(o) => state::Outlier {
                consecutive_failures: o
                    .consecutive_failures
                    .unwrap_or(defaults.outlier.consecutive_failures),
                on_5xx: o.on_5xx.unwrap_or(defaults.outlier.on_5xx),
                base_ejection: self.duration(
                    &o.base_ejection,
                    defaults.outlier.base_ejection,
                    span,
                    &outlier_prefix,
                    "base_ejection",
                )?,
                max_ejection: self.duration(
                    &o.max_ejection,
                    defaults.outlier.max_ejection,
                    span,
                    &outlier_prefix,
                    "max_ejection",
                )?,
                max_ejection_percent: o
                    .max_ejection_percent
                    .unwrap_or(defaults.outlier.max_ejection_percent),
            },
        };
        let policy = state::UpstreamPolicy {
            idle_timeout: self.duration(
                &raw.idle_timeout,
                defaults.idle_timeout,
                span,
                prefix,
                "idle_timeout",
            )?,
            max_connections_per_upstream: raw
                .max_connections_per_upstream
                .unwrap_or(defaults.max_connections_per_upstream),
            body_timeout: self.duration(
                &raw.body_timeout,
                defaults.body_timeout,
                span,
                prefix,
                "body_timeout",
            )?,
            connect_deadline: self.duration(
                &raw.connect_deadline,
                defaults.connect_deadline,
                span,
                prefix,
                "connect_deadline",
            )?,
            max_attempts: raw.max_attempts.unwrap_or(defaults.max_attempts),
            h2_connections: raw.h2_connections.unwrap_or(defaults.h2_connections),
            h2_keepalive: self.build_h2_keepalive(raw.h2_keepalive, span, prefix)?,
            h2_idle_timeout: self.duration(
                &raw.h2_idle_timeout,
                defaults.h2_idle_timeout,
                span,
                prefix,
                "h2_idle_timeout",
            )?,
            outlier,
        };
        let protocol = match raw.protocol.as_deref() {
            None => state::UpstreamProtocol::default(),
            Some(s) => state::UpstreamProtocol::parse(s).ok_or_else(|| {
                self.field_error(
                    span,
                    prefix,
                    "protocol",
                    format!("unknown protocol {s:?}, expected http1, h2c, h2 or auto"),
                )
            })?,
        };
        Ok(Pool {
            name: raw.name,
            source: Source::Declarative,
            protocol,
            balance,
            upstreams,
            health,
            connect_timeout: self.duration(
                &raw.connect_timeout,
                state::default_connect_timeout(),
                span,
                prefix,
                "connect_timeout",
            )?,
            response_timeout: self.duration(
                &raw.response_timeout,
                state::default_response_timeout(),
                span,
                prefix,
                "response_timeout",
            )?,
            // Files read by the file check (`upstream::tls::check_files`), naming `tls.<field>`.
            tls: raw.tls.map(|t| state::UpstreamTls {
                server_name: t.server_name,
                ca_file: t.ca_file,
                client_cert: t.client_cert,
                client_key: t.client_key,
            }),
            policy,
        })
    }

    /// `h2_keepalive = { interval, timeout }`: the interval is what turns PINGs on, so a
    /// table without it is refused rather than read as the default interval.
    fn build_h2_keepalive(
        &self,
        raw: Option<RawH2Keepalive>,
        span: &Range<usize>,
        prefix: &str,
    ) -> Result<state::H2Keepalive, ConfigError> {
        let defaults = state::H2Keepalive::default();
        let Some(raw) = raw else {
            return Ok(defaults);
        };
        let line = self.line_of_key(span, "h2_keepalive");
        let field = |key: &str| format!("{prefix}.h2_keepalive.{key}");
        let parse = |value: &str, key: &str| {
            humantime::parse_duration(value).map_err(|e| {
                self.error(line, field(key), format!("invalid duration {value:?}: {e}"))
            })
        };
        let interval = match raw.interval.as_deref() {
            Some(s) => parse(s, "interval")?,
            None => {
                return Err(self.error(
                    line,
                    field("interval"),
                    "required when h2_keepalive is set (PINGs are sent every interval; a timeout alone sends none)",
                ))
            }
        };
        let timeout = match raw.timeout.as_deref() {
            Some(s) => parse(s, "timeout")?,
            None => defaults.timeout,
        };
        // Zero and too long are refused by the state's check, under the same field names.
        Ok(state::H2Keepalive { interval, timeout })
    }

    fn build_route(
        &self,
        raw: RawRoute,
        span: &Range<usize>,
        prefix: &str,
    ) -> Result<Route, ConfigError> {
        let path = match (raw.path_prefix, raw.path) {
            (Some(_), Some(_)) => {
                return Err(self.field_error(
                    span,
                    prefix,
                    "path",
                    "give either path or path_prefix, not both",
                ))
            }
            (Some(p), None) => PathMatch::Prefix(p),
            (None, Some(p)) => PathMatch::Exact(p),
            (None, None) => PathMatch::Prefix("/".into()),
        };
        Ok(Route {
            name: raw.name,
            source: Source::Declarative,
            listener: raw.listener,
            host: raw.host,
            path,
            pool: raw.pool,
            strip_prefix: raw.strip_prefix,
            priority: raw.priority,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match Config::parse(text, "t.toml") {
            Ok(_) => panic!("accepted an invalid config"),
            Err(e) => e.to_string(),
        }
    }

    const BASE: &str = r#"
[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:8080"

[[pools]]
name = "v1"
upstreams = ["127.0.0.1:9001"]
"#;

    #[test]
    fn embedded_default_is_valid() {
        let config = Config::embedded_default().expect("valid");
        assert_eq!(config.listeners.len(), 1);
        assert!(config.declarative.is_empty());
    }

    #[test]
    fn full_example_parses() {
        let text = format!(
            "{BASE}\n[pools.health]\npath = \"/healthz\"\ninterval = \"2s\"\n\n[[routes]]\nname = \"docs\"\nlistener = \"web\"\nhost = \"example.com\"\npath_prefix = \"/docs\"\npool = \"v1\"\n"
        );
        let config = Config::parse(&text, "t.toml").expect("valid");
        assert_eq!(config.declarative.len(), 2);
        match &config.declarative[0] {
            Change::CreatePool(p) => {
                assert_eq!(
                    p.health.as_ref().map(|h| h.interval),
                    Some(Duration::from_secs(2))
                )
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    const WEB: &str =
        "[[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:8080\"\n";

    #[test]
    fn per_client_limits_are_off_by_default_and_parse_when_set() {
        let config = Config::parse(WEB, "t.toml").expect("valid");
        assert_eq!(config.listeners[0].max_connections_per_ip, None);
        assert_eq!(config.listeners[0].rate_limit, None);
        let text = format!(
            "{WEB}max_connections_per_ip = 8\nrate_limit = {{ requests_per_second = 2.5 }}\n"
        );
        let config = Config::parse(&text, "t.toml").expect("valid");
        let listener = &config.listeners[0];
        assert_eq!(listener.max_connections_per_ip, Some(8));
        assert_eq!(
            listener.rate_limit,
            Some(RateLimit {
                requests_per_second: 2.5,
                burst: 3,
                max_clients: 100_000
            })
        );
        let text = format!(
            "{WEB}\n[listeners.rate_limit]\nrequests_per_second = 10\nburst = 50\nmax_clients = 1000\n"
        );
        let config = Config::parse(&text, "t.toml").expect("valid");
        assert_eq!(
            config.listeners[0].rate_limit,
            Some(RateLimit {
                requests_per_second: 10.0,
                burst: 50,
                max_clients: 1000
            })
        );
    }

    #[test]
    fn bad_per_client_limits_name_line_and_field() {
        let e = err(&format!("{WEB}max_connections_per_ip = 0\n"));
        assert!(
            e.starts_with("t.toml:5: listeners[0].max_connections_per_ip: must be at least 1"),
            "{e}"
        );
        let e = err(&format!(
            "{WEB}rate_limit = {{ requests_per_second = 0 }}\n"
        ));
        assert!(
            e.starts_with("t.toml:5: listeners[0].rate_limit.requests_per_second: must be"),
            "{e}"
        );
        let e = err(&format!(
            "{WEB}\n[listeners.rate_limit]\nrequests_per_second = 1\nburst = 0\n"
        ));
        assert!(
            e.starts_with("t.toml:8: listeners[0].rate_limit.burst: must be at least 1"),
            "{e}"
        );
        let e = err(&format!(
            "{WEB}rate_limit = {{ requests_per_second = nan }}\n"
        ));
        assert!(e.contains("rate_limit.requests_per_second"), "{e}");
        let e = err(&format!("{WEB}rate_limit = {{ requests = 1 }}\n"));
        assert!(e.contains("unknown field `requests`"), "{e}");
        let tcp = "[[listeners]]\nname = \"db\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:5432\"\npool = \"p\"\nmax_connections_per_ip = 2\n";
        let e = err(tcp);
        assert!(
            e.starts_with("t.toml:6: listeners[0].max_connections_per_ip: only http and https"),
            "{e}"
        );
    }

    #[test]
    fn h2_keepalive_and_idle_timeout_are_read_and_bad_values_name_line_and_field() {
        let pool = |extra: &str| format!("{BASE}protocol = \"h2c\"\n{extra}\n");
        let config = Config::parse(
            &pool("h2_keepalive = { interval = \"200ms\", timeout = \"1s\" }"),
            "t.toml",
        )
        .expect("valid");
        let Some(Change::CreatePool(p)) = config.declarative.first() else {
            panic!("{:?}", config.declarative);
        };
        assert_eq!(
            p.policy.h2_keepalive,
            state::H2Keepalive {
                interval: Duration::from_millis(200),
                timeout: Duration::from_secs(1),
            }
        );
        // The timeout alone is the default's; the sub-table form works too.
        let config = Config::parse(&pool("\n[pools.h2_keepalive]\ninterval = \"1m\""), "t.toml")
            .expect("valid");
        let Some(Change::CreatePool(p)) = config.declarative.first() else {
            panic!("{:?}", config.declarative);
        };
        assert_eq!(p.policy.h2_keepalive.interval, Duration::from_secs(60));
        assert_eq!(p.policy.h2_keepalive.timeout, Duration::from_secs(5));
        assert_eq!(p.policy.h2_idle_timeout, Duration::from_secs(60), "default");
        let config = Config::parse(&pool("h2_idle_timeout = \"5m\""), "t.toml").expect("valid");
        let Some(Change::CreatePool(p)) = config.declarative.first() else {
            panic!("{:?}", config.declarative);
        };
        assert_eq!(p.policy.h2_idle_timeout, Duration::from_secs(300));

        for (extra, want) in [
            (
                "h2_keepalive = { timeout = \"5s\" }",
                "t.toml:11: pools[0].h2_keepalive.interval: required when h2_keepalive is set",
            ),
            (
                "h2_keepalive = { interval = \"0s\" }",
                "t.toml:11: pools[0].h2_keepalive.interval: must be positive",
            ),
            (
                "h2_keepalive = { interval = \"10s\", timeout = \"0s\" }",
                "t.toml:11: pools[0].h2_keepalive.timeout: must be positive",
            ),
            (
                "h2_keepalive = { interval = \"2d\" }",
                "t.toml:11: pools[0].h2_keepalive.interval: must be at most 24h",
            ),
            (
                "h2_keepalive = { interval = \"often\" }",
                "t.toml:11: pools[0].h2_keepalive.interval: invalid duration \"often\"",
            ),
            (
                "\n[pools.h2_keepalive]\ntimeout = \"1s\"",
                "t.toml:12: pools[0].h2_keepalive.interval: required",
            ),
            (
                "h2_idle_timeout = \"0s\"",
                "t.toml:11: pools[0].h2_idle_timeout: must be positive",
            ),
            (
                "h2_idle_timeout = \"2d\"",
                "t.toml:11: pools[0].h2_idle_timeout: must be at most 24h",
            ),
            (
                "h2_idle_timeout = 60",
                "t.toml:11: pools[0].h2_idle_timeout: invalid type",
            ),
        ] {
            let e = err(&pool(extra));
            assert!(e.starts_with(want), "{extra}: {e}");
        }
        let e = err(&pool(
            "h2_keepalive = { interval = \"1s\", every = \"1s\" }",
        ));
        assert!(e.contains("unknown field `every`"), "{e}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key_with_its_table() {
        let pool = |extra: &str| format!("{BASE}{extra}\n");
        for (text, want) in [
            (
                pool("idle_timeout = 60"),
                "t.toml:10: pools[0].idle_timeout: invalid type: integer `60`, expected a string",
            ),
            (
                pool("h2_keepalive = { interval = 10 }"),
                "t.toml:10: pools[0].h2_keepalive.interval: invalid type",
            ),
            (
                pool("\n[pools.health]\npath = 7"),
                "t.toml:12: pools[0].health.path: invalid type",
            ),
            (
                "[server]\nstate_dir = \"x\"\nworkers = \"two\"\n".to_string(),
                "t.toml:3: server.workers: invalid type",
            ),
        ] {
            let e = err(&text);
            assert!(e.starts_with(want), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = err("[server]\nstate_dir = \"x\"\nbogus = 1\n");
        assert!(e.starts_with("t.toml:3: bogus: unknown field"), "{e}");
    }

    #[test]
    fn bad_address_names_line_and_field() {
        let e = err("[[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"nowhere\"\n");
        assert!(
            e.starts_with("t.toml:4: listeners[0].address: invalid address"),
            "{e}"
        );
    }

    #[test]
    fn route_with_missing_pool_is_refused() {
        let e = err(&format!(
            "{BASE}\n[[routes]]\nname = \"r\"\nlistener = \"web\"\npool = \"nope\"\n"
        ));
        assert!(e.starts_with("t.toml:14: routes[0].pool: "), "{e}");
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn duplicate_pool_name_is_refused() {
        let e = err(&format!("{BASE}\n[[pools]]\nname = \"v1\"\n"));
        assert!(
            e.starts_with("t.toml:12: pools[1].name: duplicate pool name"),
            "{e}"
        );
    }

    #[test]
    fn two_listeners_on_one_address_are_refused() {
        let e = err(&format!(
            "{BASE}\n[[listeners]]\nname = \"other\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:8080\"\n"
        ));
        assert!(
            e.starts_with("t.toml:14: listeners[1].address: another listener"),
            "{e}"
        );
    }

    #[test]
    fn mgmt_listen_off_loopback_needs_tls() {
        let tcp = |listen: &str, extra: &str| {
            format!("[server]\nmgmt_listen = \"{listen}\"\nmgmt_token_file = \"/t\"\n{extra}")
        };
        for listen in [
            "0.0.0.0:9000",
            "192.0.2.1:9000",
            "[::]:9000",
            "[2001:db8::1]:9000",
        ] {
            let e = err(&tcp(listen, ""));
            assert!(
                e.starts_with("t.toml:2: server.mgmt_listen: ") && e.contains("not a loopback"),
                "{listen}: {e}"
            );
        }
        for listen in [
            "127.0.0.1:9000",
            "127.8.9.10:9000",
            "[::1]:9000",
            "[::ffff:127.0.0.1]:9000",
        ] {
            let config = Config::parse(&tcp(listen, ""), "t.toml").expect("loopback is allowed");
            assert_eq!(config.server.mgmt_tls, None);
        }
        let with_tls = tcp(
            "0.0.0.0:9000",
            "mgmt_tls = { cert = \"/c.pem\", key = \"/k.pem\", client_ca = \"/ca.pem\" }\n",
        );
        let config = Config::parse(&with_tls, "t.toml").expect("TLS makes it acceptable");
        assert_eq!(
            config.server.mgmt_tls,
            Some(MgmtTls {
                cert: "/c.pem".into(),
                key: "/k.pem".into(),
                client_ca: Some("/ca.pem".into()),
            })
        );
        let e = err(&tcp(
            "0.0.0.0:9000",
            "\n[server.mgmt_tls]\ncert = \"/c.pem\"\n",
        ));
        assert!(
            e.starts_with("t.toml:5: server.mgmt_tls.key: required"),
            "{e}"
        );
        let e = err("[server]\nmgmt_tls = { cert = \"/c.pem\", key = \"/k.pem\" }\n");
        assert!(
            e.starts_with("t.toml:2: server.mgmt_tls: requires mgmt_listen"),
            "{e}"
        );
    }

    #[test]
    fn bad_duration_is_refused() {
        let e = err("[server]\nshutdown_timeout = \"soon\"\n");
        assert!(
            e.starts_with("t.toml:2: server.shutdown_timeout: invalid duration"),
            "{e}"
        );
    }

    #[test]
    fn tcp_listener_pool_must_exist() {
        let e = err(&format!(
            "{BASE}\n[[listeners]]\nname = \"redis\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:6380\"\npool = \"redis\"\n"
        ));
        assert!(e.starts_with("t.toml:15: listeners[1].pool: "), "{e}");
    }
}
