//! The JSON/TOML shapes of pools, routes and changes, and their conversion to and from the
//! protobuf messages. `export` and `--output json` write these shapes; `import` and `apply`
//! read them, so an exported file can be imported as it is.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use proxy_proto::v1 as pb;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The API-owned state: what `export` prints and `import` reads.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Pools.
    #[serde(default)]
    pub pools: Vec<Pool>,
    /// HTTP routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// TCP routes.
    #[serde(default)]
    pub tcp_routes: Vec<TcpRoute>,
}

/// A pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Unique name.
    pub name: String,
    /// `declarative` or `api`; informational, never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `round_robin`, `ordered` or `least_conn`.
    #[serde(default = "default_balance")]
    pub balance: String,
    /// Static upstreams.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// Optional active health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Connect timeout in milliseconds; absent for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// Response timeout in milliseconds; absent for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout_ms: Option<u64>,
    /// TLS towards the upstreams; absent for plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// Milliseconds an idle upstream connection is kept for reuse; absent for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// Connections per upstream (0: no limit); absent for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_upstream: Option<u32>,
    /// Milliseconds allowed between two pieces of a request body; absent for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_timeout_ms: Option<u64>,
    /// Milliseconds for all connection attempts of a request; absent for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_deadline_ms: Option<u64>,
    /// Upstreams a request tries at most; absent for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Outlier ejection; absent for the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<Outlier>,
    /// `http1`, `h2c`, `h2` or `auto`; absent for http1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// HTTP/2 connections per upstream; absent for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_connections: Option<u32>,
    /// PING liveness of the HTTP/2 connections; absent for the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_keepalive: Option<H2Keepalive>,
    /// Milliseconds an HTTP/2 connection may carry no stream before it is closed; absent
    /// for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_idle_timeout_ms: Option<u64>,
}

/// How a pool's HTTP/2 connections are PINGed; `interval_ms` is required when set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct H2Keepalive {
    /// Milliseconds without a frame from the upstream before a PING.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// Milliseconds a PING's answer may take before the connection is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl H2Keepalive {
    /// The proto message.
    pub fn to_proto(&self) -> pb::H2Keepalive {
        pb::H2Keepalive {
            interval_ms: self.interval_ms,
            timeout_ms: self.timeout_ms,
        }
    }

    /// The file shape of a proto message.
    pub fn from_proto(k: &pb::H2Keepalive) -> Self {
        H2Keepalive {
            interval_ms: k.interval_ms,
            timeout_ms: k.timeout_ms,
        }
    }
}

/// When an upstream is ejected after failing; each absent field takes its default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    /// Consecutive failures that eject an upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// Whether a 5xx answer counts as a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_5xx: Option<bool>,
    /// First ejection in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_ms: Option<u64>,
    /// Longest ejection in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_ms: Option<u64>,
    /// Largest share of the pool ejected at once, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

impl Outlier {
    /// The proto message.
    pub fn to_proto(&self) -> pb::Outlier {
        pb::Outlier {
            consecutive_failures: self.consecutive_failures,
            on_5xx: self.on_5xx,
            base_ejection_ms: self.base_ejection_ms,
            max_ejection_ms: self.max_ejection_ms,
            max_ejection_percent: self.max_ejection_percent,
        }
    }

    /// The file shape of a proto message.
    pub fn from_proto(o: &pb::Outlier) -> Self {
        Outlier {
            consecutive_failures: o.consecutive_failures,
            on_5xx: o.on_5xx,
            base_ejection_ms: o.base_ejection_ms,
            max_ejection_ms: o.max_ejection_ms,
            max_ejection_percent: o.max_ejection_percent,
        }
    }
}

/// TLS from the proxy to a pool's upstreams (file paths on the proxy's host).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// SNI and the name the upstream's certificate must carry.
    pub server_name: String,
    /// PEM roots the upstream's certificate must chain to.
    pub ca_file: String,
    /// PEM client certificate chain; absent for none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_cert: String,
    /// PEM key of the client certificate.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_key: String,
}

impl UpstreamTls {
    /// The proto message.
    pub fn to_proto(&self) -> pb::UpstreamTls {
        pb::UpstreamTls {
            server_name: self.server_name.clone(),
            ca_file: self.ca_file.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
        }
    }

    /// The file shape of a proto message.
    pub fn from_proto(t: &pb::UpstreamTls) -> Self {
        UpstreamTls {
            server_name: t.server_name.clone(),
            ca_file: t.ca_file.clone(),
            client_cert: t.client_cert.clone(),
            client_key: t.client_key.clone(),
        }
    }
}

fn default_balance() -> String {
    "round_robin".to_owned()
}

/// An upstream of a pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `host:port`.
    pub address: String,
    /// Relative share; 1 when absent.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// `active` or `draining`; active when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `healthy` or `ejected` (absent: not checked); informational, never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
}

fn default_weight() -> u32 {
    1
}

/// An active health check.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// HTTP path; empty for a TCP connect check.
    #[serde(default)]
    pub path: String,
    /// Milliseconds between checks.
    pub interval_ms: u64,
    /// Milliseconds allowed for one check.
    pub timeout_ms: u64,
    /// Present: a gRPC health check (`grpc.health.v1.Health/Check`) of this service
    /// (empty: the whole server) instead of `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_service: Option<String>,
}

/// An HTTP route.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// `declarative` or `api`; informational, never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Listener name.
    pub listener: String,
    /// Host or `*.suffix`; any host when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Exact path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    /// Pool name.
    pub pool: String,
    /// Remove the matched prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Higher wins among routes with the same host and path.
    #[serde(default)]
    pub priority: i32,
}

/// A TCP route.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRoute {
    /// Unique name.
    pub name: String,
    /// `declarative` or `api`; informational, never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Listener name.
    pub listener: String,
    /// Pool name.
    pub pool: String,
    /// Server name (exact or `*.suffix`) on a tls-passthrough listener; absent for any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

/// A batch for `apply`: `{"changes": [{"op": "create_route", ...}, ...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// The changes, applied in order and atomically.
    pub changes: Vec<Change>,
}

/// One change of a batch, tagged by `op`.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// Adds a pool.
    CreatePool(Pool),
    /// Replaces a pool.
    UpdatePool(Pool),
    /// Removes a pool.
    DeletePool(Name),
    /// Adds an upstream.
    AddUpstream(UpstreamRef),
    /// Removes an upstream.
    RemoveUpstream(UpstreamRef),
    /// Drains an upstream.
    DrainUpstream(UpstreamRef),
    /// Re-activates an upstream.
    ActivateUpstream(UpstreamRef),
    /// Adds an HTTP route.
    CreateRoute(Route),
    /// Replaces an HTTP route.
    UpdateRoute(Route),
    /// Removes an HTTP route.
    DeleteRoute(Name),
    /// Adds a TCP route.
    CreateTcpRoute(TcpRoute),
    /// Replaces a TCP route.
    UpdateTcpRoute(TcpRoute),
    /// Removes a TCP route.
    DeleteTcpRoute(Name),
}

/// Names the object a change deletes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Name {
    /// Object name.
    pub name: String,
}

/// Names an upstream of a pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamRef {
    /// Pool name.
    pub pool: String,
    /// Upstream address.
    pub address: String,
    /// Weight for `add_upstream`; 1 when absent.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Reads a TOML or JSON file (`-` for standard input), chosen by extension or content.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        text
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    let json = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => true,
        Some("toml") => false,
        _ => text.trim_start().starts_with(['{', '[']),
    };
    if json {
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
    } else {
        toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))
    }
}

fn source_name(source: pb::Source) -> Option<String> {
    match source {
        pb::Source::Unspecified => None,
        pb::Source::Declarative => Some("declarative".to_owned()),
        pb::Source::Api => Some("api".to_owned()),
    }
}

/// The `balance` name of a proto value.
pub fn balance_name(balance: pb::Balance) -> &'static str {
    match balance {
        pb::Balance::Unspecified | pb::Balance::RoundRobin => "round_robin",
        pb::Balance::Ordered => "ordered",
        pb::Balance::LeastConn => "least_conn",
    }
}

/// Parses a `balance` name.
pub fn parse_balance(name: &str) -> Result<pb::Balance> {
    Ok(match name {
        "round_robin" => pb::Balance::RoundRobin,
        "ordered" => pb::Balance::Ordered,
        "least_conn" => pb::Balance::LeastConn,
        other => {
            bail!("balance: unknown policy {other:?} (expected round_robin, ordered or least_conn)")
        }
    })
}

/// The `protocol` name of a proto value.
pub fn protocol_name(protocol: pb::UpstreamProtocol) -> &'static str {
    match protocol {
        pb::UpstreamProtocol::Unspecified | pb::UpstreamProtocol::Http1 => "http1",
        pb::UpstreamProtocol::H2c => "h2c",
        pb::UpstreamProtocol::H2 => "h2",
        pb::UpstreamProtocol::Auto => "auto",
    }
}

/// Parses a `protocol` name.
pub fn parse_protocol(name: &str) -> Result<pb::UpstreamProtocol> {
    Ok(match name {
        "http1" => pb::UpstreamProtocol::Http1,
        "h2c" => pb::UpstreamProtocol::H2c,
        "h2" => pb::UpstreamProtocol::H2,
        "auto" => pb::UpstreamProtocol::Auto,
        other => bail!("protocol: unknown protocol {other:?} (expected http1, h2c, h2 or auto)"),
    })
}

/// The `state` name of a proto value.
pub fn state_name(state: pb::UpstreamState) -> &'static str {
    match state {
        pb::UpstreamState::Unspecified | pb::UpstreamState::Active => "active",
        pb::UpstreamState::Draining => "draining",
    }
}

fn parse_state(name: Option<&str>) -> Result<pb::UpstreamState> {
    Ok(match name {
        None | Some("active") => pb::UpstreamState::Active,
        Some("draining") => pb::UpstreamState::Draining,
        Some(other) => bail!("state: unknown state {other:?} (expected active or draining)"),
    })
}

/// The `health` name of a proto value.
pub fn health_name(health: pb::UpstreamHealth) -> &'static str {
    match health {
        pb::UpstreamHealth::Unspecified => "unknown",
        pb::UpstreamHealth::Healthy => "healthy",
        pb::UpstreamHealth::Ejected => "ejected",
    }
}

impl Pool {
    /// The proto message.
    pub fn to_proto(&self) -> Result<pb::Pool> {
        let mut upstreams = Vec::with_capacity(self.upstreams.len());
        for u in &self.upstreams {
            let mut upstream = pb::Upstream {
                address: u.address.clone(),
                weight: u.weight,
                ..Default::default()
            };
            upstream.set_state(
                parse_state(u.state.as_deref())
                    .with_context(|| format!("pool {:?}, upstream {}", self.name, u.address))?,
            );
            upstreams.push(upstream);
        }
        let mut pool = pb::Pool {
            name: self.name.clone(),
            upstreams,
            health_check: self.health_check.as_ref().map(|h| pb::HealthCheck {
                path: h.path.clone(),
                interval_ms: h.interval_ms,
                timeout_ms: h.timeout_ms,
                grpc: h.grpc_service.as_ref().map(|service| pb::GrpcHealthCheck {
                    service: service.clone(),
                }),
            }),
            connect_timeout_ms: self.connect_timeout_ms.unwrap_or(0),
            response_timeout_ms: self.response_timeout_ms.unwrap_or(0),
            tls: self.tls.as_ref().map(UpstreamTls::to_proto),
            idle_timeout_ms: self.idle_timeout_ms,
            max_connections_per_upstream: self.max_connections_per_upstream,
            body_timeout_ms: self.body_timeout_ms,
            connect_deadline_ms: self.connect_deadline_ms,
            max_attempts: self.max_attempts,
            outlier: self.outlier.as_ref().map(Outlier::to_proto),
            h2_connections: self.h2_connections.unwrap_or(0),
            h2_keepalive: self.h2_keepalive.as_ref().map(H2Keepalive::to_proto),
            h2_idle_timeout_ms: self.h2_idle_timeout_ms,
            ..Default::default()
        };
        if let Some(protocol) = &self.protocol {
            pool.set_protocol(
                parse_protocol(protocol).with_context(|| format!("pool {:?}", self.name))?,
            );
        }
        pool.set_balance(
            parse_balance(&self.balance).with_context(|| format!("pool {:?}", self.name))?,
        );
        Ok(pool)
    }

    /// The file shape of a proto message.
    pub fn from_proto(p: &pb::Pool) -> Self {
        Pool {
            name: p.name.clone(),
            source: source_name(p.source()),
            balance: balance_name(p.balance()).to_owned(),
            upstreams: p
                .upstreams
                .iter()
                .map(|u| Upstream {
                    address: u.address.clone(),
                    weight: u.weight,
                    state: Some(state_name(u.state()).to_owned()),
                    health: Some(u.health())
                        .filter(|h| *h != pb::UpstreamHealth::Unspecified)
                        .map(|h| health_name(h).to_owned()),
                })
                .collect(),
            health_check: p.health_check.as_ref().map(|h| HealthCheck {
                path: h.path.clone(),
                interval_ms: h.interval_ms,
                timeout_ms: h.timeout_ms,
                grpc_service: h.grpc.as_ref().map(|g| g.service.clone()),
            }),
            connect_timeout_ms: Some(p.connect_timeout_ms).filter(|&ms| ms != 0),
            response_timeout_ms: Some(p.response_timeout_ms).filter(|&ms| ms != 0),
            tls: p.tls.as_ref().map(UpstreamTls::from_proto),
            idle_timeout_ms: p.idle_timeout_ms,
            max_connections_per_upstream: p.max_connections_per_upstream,
            body_timeout_ms: p.body_timeout_ms,
            connect_deadline_ms: p.connect_deadline_ms,
            max_attempts: p.max_attempts,
            outlier: p.outlier.as_ref().map(Outlier::from_proto),
            protocol: Some(protocol_name(p.protocol()))
                .filter(|name| *name != "http1")
                .map(str::to_owned),
            h2_connections: Some(p.h2_connections).filter(|&n| n != 0 && n != 1),
            h2_keepalive: p.h2_keepalive.as_ref().map(H2Keepalive::from_proto),
            h2_idle_timeout_ms: p.h2_idle_timeout_ms,
        }
    }
}

impl Route {
    /// The proto message.
    pub fn to_proto(&self) -> Result<pb::Route> {
        let path = match (&self.path_prefix, &self.path_exact) {
            (Some(_), Some(_)) => bail!(
                "route {:?}: path_prefix and path_exact are mutually exclusive",
                self.name
            ),
            (Some(p), None) => Some(pb::route::Path::PathPrefix(p.clone())),
            (None, Some(p)) => Some(pb::route::Path::PathExact(p.clone())),
            (None, None) => None,
        };
        Ok(pb::Route {
            name: self.name.clone(),
            listener: self.listener.clone(),
            host: self.host.clone().unwrap_or_default(),
            path,
            pool: self.pool.clone(),
            strip_prefix: self.strip_prefix,
            priority: self.priority,
            ..Default::default()
        })
    }

    /// The file shape of a proto message.
    pub fn from_proto(r: &pb::Route) -> Self {
        let (path_prefix, path_exact) = match &r.path {
            Some(pb::route::Path::PathPrefix(p)) => (Some(p.clone()), None),
            Some(pb::route::Path::PathExact(p)) => (None, Some(p.clone())),
            None => (None, None),
        };
        Route {
            name: r.name.clone(),
            source: source_name(r.source()),
            listener: r.listener.clone(),
            host: Some(r.host.clone()).filter(|h| !h.is_empty()),
            path_prefix,
            path_exact,
            pool: r.pool.clone(),
            strip_prefix: r.strip_prefix,
            priority: r.priority,
        }
    }

    /// The path condition for display: `/docs` (prefix) or `= /docs` (exact).
    pub fn path_display(&self) -> String {
        match (&self.path_prefix, &self.path_exact) {
            (_, Some(exact)) => format!("= {exact}"),
            (Some(prefix), None) => prefix.clone(),
            (None, None) => String::new(),
        }
    }
}

impl TcpRoute {
    /// The proto message.
    pub fn to_proto(&self) -> pb::TcpRoute {
        pb::TcpRoute {
            name: self.name.clone(),
            listener: self.listener.clone(),
            pool: self.pool.clone(),
            sni: self.sni.clone().unwrap_or_default(),
            ..Default::default()
        }
    }

    /// The file shape of a proto message.
    pub fn from_proto(r: &pb::TcpRoute) -> Self {
        TcpRoute {
            name: r.name.clone(),
            source: source_name(r.source()),
            listener: r.listener.clone(),
            pool: r.pool.clone(),
            sni: Some(r.sni.clone()).filter(|s| !s.is_empty()),
        }
    }
}

impl Document {
    /// The proto message.
    pub fn to_proto(&self) -> Result<pb::StateDocument> {
        Ok(pb::StateDocument {
            pools: self
                .pools
                .iter()
                .map(Pool::to_proto)
                .collect::<Result<_>>()?,
            routes: self
                .routes
                .iter()
                .map(Route::to_proto)
                .collect::<Result<_>>()?,
            tcp_routes: self.tcp_routes.iter().map(TcpRoute::to_proto).collect(),
        })
    }

    /// The file shape of a proto message.
    pub fn from_proto(d: &pb::StateDocument) -> Self {
        Document {
            pools: d.pools.iter().map(Pool::from_proto).collect(),
            routes: d.routes.iter().map(Route::from_proto).collect(),
            tcp_routes: d.tcp_routes.iter().map(TcpRoute::from_proto).collect(),
        }
    }
}

impl Change {
    /// The proto message.
    pub fn to_proto(&self) -> Result<pb::Change> {
        use pb::change::Change as C;
        let set_state = |r: &UpstreamRef, state: pb::UpstreamState| {
            let mut s = pb::change::SetUpstreamState {
                pool: r.pool.clone(),
                address: r.address.clone(),
                ..Default::default()
            };
            s.set_state(state);
            C::SetUpstreamState(s)
        };
        let delete = |n: &Name| pb::change::Delete {
            name: n.name.clone(),
        };
        let change = match self {
            Change::CreatePool(p) => C::CreatePool(p.to_proto()?),
            Change::UpdatePool(p) => C::UpdatePool(p.to_proto()?),
            Change::DeletePool(n) => C::DeletePool(delete(n)),
            Change::AddUpstream(r) => C::AddUpstream(pb::change::AddUpstream {
                pool: r.pool.clone(),
                upstream: Some(pb::Upstream {
                    address: r.address.clone(),
                    weight: r.weight,
                    ..Default::default()
                }),
            }),
            Change::RemoveUpstream(r) => C::RemoveUpstream(pb::change::RemoveUpstream {
                pool: r.pool.clone(),
                address: r.address.clone(),
            }),
            Change::DrainUpstream(r) => set_state(r, pb::UpstreamState::Draining),
            Change::ActivateUpstream(r) => set_state(r, pb::UpstreamState::Active),
            Change::CreateRoute(r) => C::CreateRoute(r.to_proto()?),
            Change::UpdateRoute(r) => C::UpdateRoute(r.to_proto()?),
            Change::DeleteRoute(n) => C::DeleteRoute(delete(n)),
            Change::CreateTcpRoute(r) => C::CreateTcpRoute(r.to_proto()),
            Change::UpdateTcpRoute(r) => C::UpdateTcpRoute(r.to_proto()),
            Change::DeleteTcpRoute(n) => C::DeleteTcpRoute(delete(n)),
        };
        Ok(pb::Change {
            change: Some(change),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_batch_parses_every_op_shape() {
        let batch: Batch = toml::from_str(
            r#"
            [[changes]]
            op = "create_pool"
            name = "v2"
            balance = "ordered"
            upstreams = [{ address = "127.0.0.1:9001" }]

            [[changes]]
            op = "create_route"
            name = "docs"
            listener = "web"
            path_prefix = "/docs"
            pool = "v2"

            [[changes]]
            op = "drain_upstream"
            pool = "v2"
            address = "127.0.0.1:9001"
            "#,
        )
        .expect("valid batch");
        let protos: Vec<pb::Change> = batch
            .changes
            .iter()
            .map(Change::to_proto)
            .collect::<Result<_>>()
            .expect("converts");
        assert_eq!(protos.len(), 3);
        match &protos[0].change {
            Some(pb::change::Change::CreatePool(p)) => {
                assert_eq!(p.balance(), pb::Balance::Ordered);
                assert_eq!(p.upstreams[0].weight, 1);
            }
            other => panic!("unexpected {other:?}"),
        }
        match &protos[2].change {
            Some(pb::change::Change::SetUpstreamState(s)) => {
                assert_eq!(s.state(), pb::UpstreamState::Draining)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_fields_and_ops_are_refused() {
        let err = serde_json::from_str::<Batch>(
            r#"{"changes":[{"op":"create_route","name":"a","listener":"w","pool":"p","pth":"/"}]}"#,
        );
        assert!(err.is_err());
        let err = serde_json::from_str::<Batch>(r#"{"changes":[{"op":"explode"}]}"#);
        assert!(err.is_err());
    }

    #[test]
    fn both_path_kinds_are_refused() {
        let route = Route {
            name: "a".into(),
            source: None,
            listener: "web".into(),
            host: None,
            path_prefix: Some("/a".into()),
            path_exact: Some("/a".into()),
            pool: "p".into(),
            strip_prefix: false,
            priority: 0,
        };
        assert!(route.to_proto().is_err());
    }

    #[test]
    fn document_round_trips_through_proto() {
        let doc: Document = serde_json::from_str(
            r#"{"pools":[{"name":"p","upstreams":[{"address":"127.0.0.1:1","weight":3,"state":"draining"}]}],
                "routes":[{"name":"r","listener":"web","host":"example.com","path_exact":"/x","pool":"p","priority":-2}],
                "tcp_routes":[{"name":"t","listener":"db","pool":"p"}]}"#,
        )
        .expect("valid document");
        let back = Document::from_proto(&doc.to_proto().expect("converts"));
        assert_eq!(back.pools[0].upstreams[0].weight, 3);
        assert_eq!(
            back.pools[0].upstreams[0].state.as_deref(),
            Some("draining")
        );
        assert_eq!(back.routes[0].path_display(), "= /x");
        assert_eq!(back.routes[0].priority, -2);
        assert_eq!(back.tcp_routes[0].pool, "p");
    }
}
