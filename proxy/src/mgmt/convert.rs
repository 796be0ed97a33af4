//! Protobuf messages <-> state model. Conversion checks what only the wire form can get
//! wrong (missing messages, unknown enum numbers, a missing `oneof`); everything else is
//! validated once, by `state::apply`.

use std::time::Duration;

use proxy_proto::v1 as pb;
use tonic::Status;

use crate::routing::RoutingTable;
use crate::state::Origin;
use crate::state::{
    default_connect_timeout, default_response_timeout, Balance, Change, Document, GrpcHealthCheck,
    H2Keepalive, HealthCheck, Outlier, PathMatch, Pool, Route, Source, TcpRoute, Upstream,
    UpstreamPolicy, UpstreamProtocol, UpstreamState, UpstreamTls,
};

/// An INVALID_ARGUMENT status naming `field`.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// The message in an optional field, or INVALID_ARGUMENT naming it.
pub fn required<T>(value: Option<T>, field: &str) -> Result<T, Status> {
    value.ok_or_else(|| invalid(field, "required"))
}

fn balance(value: i32, field: &str) -> Result<Balance, Status> {
    match pb::Balance::try_from(value) {
        Ok(pb::Balance::Unspecified | pb::Balance::RoundRobin) => Ok(Balance::RoundRobin),
        Ok(pb::Balance::Ordered) => Ok(Balance::Ordered),
        Ok(pb::Balance::LeastConn) => Ok(Balance::LeastConn),
        Err(_) => Err(invalid(field, format!("unknown balance {value}"))),
    }
}

fn protocol(value: i32, field: &str) -> Result<UpstreamProtocol, Status> {
    match pb::UpstreamProtocol::try_from(value) {
        Ok(pb::UpstreamProtocol::Unspecified | pb::UpstreamProtocol::Http1) => {
            Ok(UpstreamProtocol::Http1)
        }
        Ok(pb::UpstreamProtocol::H2c) => Ok(UpstreamProtocol::H2c),
        Ok(pb::UpstreamProtocol::H2) => Ok(UpstreamProtocol::H2),
        Ok(pb::UpstreamProtocol::Auto) => Ok(UpstreamProtocol::Auto),
        Err(_) => Err(invalid(field, format!("unknown protocol {value}"))),
    }
}

fn upstream_state(value: i32, field: &str) -> Result<UpstreamState, Status> {
    match pb::UpstreamState::try_from(value) {
        Ok(pb::UpstreamState::Unspecified | pb::UpstreamState::Active) => Ok(UpstreamState::Active),
        Ok(pb::UpstreamState::Draining) => Ok(UpstreamState::Draining),
        Err(_) => Err(invalid(field, format!("unknown upstream state {value}"))),
    }
}

fn millis_or(ms: u64, default: Duration) -> Duration {
    if ms == 0 {
        default
    } else {
        Duration::from_millis(ms)
    }
}

/// An upstream from the wire; weight 0 means 1.
pub fn upstream(u: pb::Upstream, field: &str) -> Result<Upstream, Status> {
    Ok(Upstream {
        state: upstream_state(u.state, &format!("{field}.state"))?,
        address: u.address,
        weight: u.weight.max(1),
    })
}

/// A pool from the wire, owned by the API; zero timeouts mean the defaults.
pub fn pool(p: pb::Pool, field: &str) -> Result<Pool, Status> {
    let policy = policy(&p, field)?;
    let health = match p.health_check {
        None => None,
        Some(h) => {
            if h.interval_ms == 0 {
                return Err(invalid(
                    &format!("{field}.health_check.interval_ms"),
                    "must be positive",
                ));
            }
            if h.timeout_ms == 0 {
                return Err(invalid(
                    &format!("{field}.health_check.timeout_ms"),
                    "must be positive",
                ));
            }
            Some(HealthCheck {
                path: h.path,
                grpc: h.grpc.map(|g| GrpcHealthCheck { service: g.service }),
                interval: Duration::from_millis(h.interval_ms),
                timeout: Duration::from_millis(h.timeout_ms),
            })
        }
    };
    let upstreams = p
        .upstreams
        .into_iter()
        .enumerate()
        .map(|(i, u)| upstream(u, &format!("{field}.upstreams[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(Pool {
        balance: balance(p.balance, &format!("{field}.balance"))?,
        name: p.name,
        source: Source::Api,
        upstreams,
        health,
        connect_timeout: millis_or(p.connect_timeout_ms, default_connect_timeout()),
        response_timeout: millis_or(p.response_timeout_ms, default_response_timeout()),
        tls: p.tls.map(|t| UpstreamTls {
            server_name: t.server_name,
            ca_file: t.ca_file,
            client_cert: t.client_cert,
            client_key: t.client_key,
        }),
        protocol: protocol(p.protocol, &format!("{field}.protocol"))?,
        policy,
    })
}

/// Absent means the default; a present value is taken as it is, so a zero reaches
/// `state::apply` and is refused there under the field's name.
fn millis_opt(ms: Option<u64>, default: Duration) -> Duration {
    ms.map_or(default, Duration::from_millis)
}

/// The connection, attempt and ejection settings of a wire pool; absent fields (and an
/// absent `outlier` or `h2_keepalive`) take the config file's defaults.
fn policy(p: &pb::Pool, field: &str) -> Result<UpstreamPolicy, Status> {
    let d = UpstreamPolicy::default();
    let outlier = match &p.outlier {
        None => d.outlier.clone(),
        Some(o) => Outlier {
            consecutive_failures: o
                .consecutive_failures
                .unwrap_or(d.outlier.consecutive_failures),
            on_5xx: o.on_5xx.unwrap_or(d.outlier.on_5xx),
            base_ejection: millis_opt(o.base_ejection_ms, d.outlier.base_ejection),
            max_ejection: millis_opt(o.max_ejection_ms, d.outlier.max_ejection),
            max_ejection_percent: o
                .max_ejection_percent
                .unwrap_or(d.outlier.max_ejection_percent),
        },
    };
    Ok(UpstreamPolicy {
        idle_timeout: millis_opt(p.idle_timeout_ms, d.idle_timeout),
        max_connections_per_upstream: p
            .max_connections_per_upstream
            .unwrap_or(d.max_connections_per_upstream),
        body_timeout: millis_opt(p.body_timeout_ms, d.body_timeout),
        connect_deadline: millis_opt(p.connect_deadline_ms, d.connect_deadline),
        max_attempts: p.max_attempts.unwrap_or(d.max_attempts),
        h2_connections: match p.h2_connections {
            0 => d.h2_connections,
            n => n,
        },
        h2_keepalive: h2_keepalive(p.h2_keepalive.as_ref(), field)?,
        h2_idle_timeout: millis_opt(p.h2_idle_timeout_ms, d.h2_idle_timeout),
        outlier,
    })
}

/// A pool's PING settings: the interval is what turns PINGs on, so a message without it is
/// refused rather than read as the default interval (as the config file does).
fn h2_keepalive(k: Option<&pb::H2Keepalive>, field: &str) -> Result<H2Keepalive, Status> {
    let d = H2Keepalive::default();
    let Some(k) = k else {
        return Ok(d);
    };
    let Some(interval_ms) = k.interval_ms else {
        return Err(invalid(
            &format!("{field}.h2_keepalive.interval_ms"),
            "required when h2_keepalive is set (PINGs are sent every interval; a timeout alone sends none)",
        ));
    };
    Ok(H2Keepalive {
        interval: Duration::from_millis(interval_ms),
        timeout: millis_opt(k.timeout_ms, d.timeout),
    })
}

/// An HTTP route from the wire, owned by the API; an empty host means any host.
pub fn route(r: pb::Route, field: &str) -> Result<Route, Status> {
    let path = match r.path {
        Some(pb::route::Path::PathPrefix(p)) => PathMatch::Prefix(p),
        Some(pb::route::Path::PathExact(p)) => PathMatch::Exact(p),
        None => {
            return Err(invalid(
                &format!("{field}.path"),
                "set path_prefix or path_exact",
            ))
        }
    };
    Ok(Route {
        name: r.name,
        source: Source::Api,
        listener: r.listener,
        host: Some(r.host).filter(|h| !h.is_empty()),
        path,
        pool: r.pool,
        strip_prefix: r.strip_prefix,
        priority: r.priority,
    })
}

/// A TCP route from the wire, owned by the API; an empty `sni` means every name.
pub fn tcp_route(r: pb::TcpRoute) -> TcpRoute {
    TcpRoute {
        name: r.name,
        source: Source::Api,
        listener: r.listener,
        pool: r.pool,
        sni: Some(r.sni).filter(|s| !s.is_empty()),
    }
}

/// One change of an Apply batch; `field` is its position, e.g. `changes[3]`.
pub fn change(c: pb::Change, field: &str) -> Result<Change, Status> {
    use pb::change::Change as C;
    let Some(change) = c.change else {
        return Err(invalid(field, "no change set"));
    };
    Ok(match change {
        C::CreatePool(p) => Change::CreatePool(pool(p, &format!("{field}.create_pool"))?),
        C::UpdatePool(p) => Change::UpdatePool(pool(p, &format!("{field}.update_pool"))?),
        C::DeletePool(d) => Change::DeletePool { name: d.name },
        C::AddUpstream(a) => Change::AddUpstream {
            upstream: upstream(
                required(a.upstream, &format!("{field}.add_upstream.upstream"))?,
                &format!("{field}.add_upstream.upstream"),
            )?,
            pool: a.pool,
        },
        C::RemoveUpstream(r) => Change::RemoveUpstream {
            pool: r.pool,
            address: r.address,
        },
        C::SetUpstreamState(s) => Change::SetUpstreamState {
            state: upstream_state(s.state, &format!("{field}.set_upstream_state.state"))?,
            pool: s.pool,
            address: s.address,
        },
        C::CreateRoute(r) => Change::CreateRoute(route(r, &format!("{field}.create_route"))?),
        C::UpdateRoute(r) => Change::UpdateRoute(route(r, &format!("{field}.update_route"))?),
        C::DeleteRoute(d) => Change::DeleteRoute { name: d.name },
        C::CreateTcpRoute(r) => Change::CreateTcpRoute(tcp_route(r)),
        C::UpdateTcpRoute(r) => Change::UpdateTcpRoute(tcp_route(r)),
        C::DeleteTcpRoute(d) => Change::DeleteTcpRoute { name: d.name },
    })
}

/// A whole document from the wire (Import).
pub fn document(d: pb::StateDocument) -> Result<Document, Status> {
    Ok(Document {
        pools: d
            .pools
            .into_iter()
            .enumerate()
            .map(|(i, p)| pool(p, &format!("state.pools[{i}]")))
            .collect::<Result<_, _>>()?,
        routes: d
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| route(r, &format!("state.routes[{i}]")))
            .collect::<Result<_, _>>()?,
        tcp_routes: d.tcp_routes.into_iter().map(tcp_route).collect(),
    })
}

fn source_proto(source: Source) -> i32 {
    match source {
        Source::Declarative => pb::Source::Declarative as i32,
        Source::Api => pb::Source::Api as i32,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A pool for the wire, with each upstream's health as the routing table sees it.
pub fn pool_proto(p: &Pool, routing: Option<&RoutingTable>) -> pb::Pool {
    let runtime = routing.and_then(|t| t.pool(&p.name));
    let health_of = |rt: Option<&crate::upstream::UpstreamRuntime>| match rt {
        Some(rt) if rt.is_ejected() || !rt.is_healthy() => pb::UpstreamHealth::Ejected,
        Some(_) if p.health.is_some() => pb::UpstreamHealth::Healthy,
        _ => pb::UpstreamHealth::Unspecified,
    };
    let mut upstreams: Vec<pb::Upstream> = p
        .upstreams
        .iter()
        .map(|u| {
            let rt = runtime
                .as_ref()
                .and_then(|r| r.upstreams().iter().find(|x| x.address == u.address));
            let health = health_of(rt.map(|rt| rt.as_ref()));
            let state = match u.state {
                UpstreamState::Active => pb::UpstreamState::Active,
                UpstreamState::Draining => pb::UpstreamState::Draining,
            };
            pb::Upstream {
                address: u.address.clone(),
                weight: u.weight,
                state: state as i32,
                health: health as i32,
                origin: Origin::Static.label(),
            }
        })
        .collect();
    // Discovered and registered upstreams are not part of the definition: listed after it.
    if let Some(runtime) = runtime {
        for (rt, origin, weight) in runtime.members().filter(|(_, o, _)| *o != Origin::Static) {
            upstreams.push(pb::Upstream {
                address: rt.address.clone(),
                weight,
                state: pb::UpstreamState::Active as i32,
                health: health_of(Some(rt.as_ref())) as i32,
                origin: origin.label(),
            });
        }
    }
    let balance = match p.balance {
        Balance::RoundRobin => pb::Balance::RoundRobin,
        Balance::Ordered => pb::Balance::Ordered,
        Balance::LeastConn => pb::Balance::LeastConn,
    };
    pb::Pool {
        name: p.name.clone(),
        source: source_proto(p.source),
        balance: balance as i32,
        upstreams,
        health_check: p.health.as_ref().map(|h| pb::HealthCheck {
            path: h.path.clone(),
            interval_ms: millis(h.interval),
            timeout_ms: millis(h.timeout),
            grpc: h.grpc.as_ref().map(|g| pb::GrpcHealthCheck {
                service: g.service.clone(),
            }),
        }),
        connect_timeout_ms: millis(p.connect_timeout),
        response_timeout_ms: millis(p.response_timeout),
        tls: p.tls.as_ref().map(|t| pb::UpstreamTls {
            server_name: t.server_name.clone(),
            ca_file: t.ca_file.clone(),
            client_cert: t.client_cert.clone(),
            client_key: t.client_key.clone(),
        }),
        idle_timeout_ms: Some(millis(p.policy.idle_timeout)),
        max_connections_per_upstream: Some(p.policy.max_connections_per_upstream),
        body_timeout_ms: Some(millis(p.policy.body_timeout)),
        connect_deadline_ms: Some(millis(p.policy.connect_deadline)),
        max_attempts: Some(p.policy.max_attempts),
        outlier: Some(pb::Outlier {
            consecutive_failures: Some(p.policy.outlier.consecutive_failures),
            on_5xx: Some(p.policy.outlier.on_5xx),
            base_ejection_ms: Some(millis(p.policy.outlier.base_ejection)),
            max_ejection_ms: Some(millis(p.policy.outlier.max_ejection)),
            max_ejection_percent: Some(p.policy.outlier.max_ejection_percent),
        }),
        protocol: match p.protocol {
            UpstreamProtocol::Http1 => pb::UpstreamProtocol::Http1,
            UpstreamProtocol::H2c => pb::UpstreamProtocol::H2c,
            UpstreamProtocol::H2 => pb::UpstreamProtocol::H2,
            UpstreamProtocol::Auto => pb::UpstreamProtocol::Auto,
        } as i32,
        h2_connections: p.policy.h2_connections,
        h2_keepalive: Some(pb::H2Keepalive {
            interval_ms: Some(millis(p.policy.h2_keepalive.interval)),
            timeout_ms: Some(millis(p.policy.h2_keepalive.timeout)),
        }),
        h2_idle_timeout_ms: Some(millis(p.policy.h2_idle_timeout)),
    }
}

/// An HTTP route for the wire.
pub fn route_proto(r: &Route) -> pb::Route {
    let path = match &r.path {
        PathMatch::Prefix(p) => pb::route::Path::PathPrefix(p.clone()),
        PathMatch::Exact(p) => pb::route::Path::PathExact(p.clone()),
    };
    pb::Route {
        name: r.name.clone(),
        source: source_proto(r.source),
        listener: r.listener.clone(),
        host: r.host.clone().unwrap_or_default(),
        path: Some(path),
        pool: r.pool.clone(),
        strip_prefix: r.strip_prefix,
        priority: r.priority,
    }
}

/// A TCP route for the wire.
pub fn tcp_route_proto(r: &TcpRoute) -> pb::TcpRoute {
    pb::TcpRoute {
        name: r.name.clone(),
        source: source_proto(r.source),
        listener: r.listener.clone(),
        pool: r.pool.clone(),
        sni: r.sni.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_round_trips_and_defaults_apply() {
        let wire = pb::Route {
            name: "docs".into(),
            listener: "web".into(),
            path: Some(pb::route::Path::PathExact("/docs".into())),
            pool: "v2".into(),
            priority: -3,
            ..Default::default()
        };
        let model = route(wire.clone(), "route").expect("valid");
        assert_eq!(model.host, None);
        assert_eq!(model.path, PathMatch::Exact("/docs".into()));
        let back = route_proto(&model);
        assert_eq!(back.path, wire.path);
        assert_eq!(back.source, pb::Source::Api as i32);
    }

    #[test]
    fn wire_only_mistakes_name_the_field() {
        let err = route(pb::Route::default(), "route").expect_err("no path");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(err.message(), "route.path: set path_prefix or path_exact");

        let p = pb::Pool {
            name: "p".into(),
            balance: 42,
            ..Default::default()
        };
        let err = pool(p, "pool").expect_err("bad enum");
        assert_eq!(err.message(), "pool.balance: unknown balance 42");

        let err = change(pb::Change::default(), "changes[2]").expect_err("empty");
        assert_eq!(err.message(), "changes[2]: no change set");
    }

    #[test]
    fn pool_zeroes_mean_defaults() {
        let p = pb::Pool {
            name: "p".into(),
            upstreams: vec![pb::Upstream {
                address: "127.0.0.1:1".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let model = pool(p, "pool").expect("valid");
        assert_eq!(model.upstreams[0].weight, 1);
        assert_eq!(model.connect_timeout, default_connect_timeout());
        assert_eq!(model.response_timeout, default_response_timeout());
        assert_eq!(pool_proto(&model, None).connect_timeout_ms, 5000);
        assert_eq!(model.policy, UpstreamPolicy::default());
    }

    #[test]
    fn policy_round_trips_and_partial_outlier_keeps_defaults() {
        let p = pb::Pool {
            name: "p".into(),
            idle_timeout_ms: Some(800),
            h2_idle_timeout_ms: Some(90_000),
            max_connections_per_upstream: Some(9),
            max_attempts: Some(2),
            outlier: Some(pb::Outlier {
                on_5xx: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        let model = pool(p, "pool").expect("valid");
        let defaults = UpstreamPolicy::default();
        assert_eq!(model.policy.idle_timeout, Duration::from_millis(800));
        assert_eq!(model.policy.h2_idle_timeout, Duration::from_secs(90));
        assert_eq!(model.policy.max_connections_per_upstream, 9);
        assert_eq!(model.policy.max_attempts, 2);
        assert_eq!(model.policy.body_timeout, defaults.body_timeout);
        assert!(model.policy.outlier.on_5xx);
        assert_eq!(
            model.policy.outlier.max_ejection_percent,
            defaults.outlier.max_ejection_percent
        );
        // What is read back converts to the same model.
        let again = pool(pool_proto(&model, None), "pool").expect("valid");
        assert_eq!(again.policy, model.policy);
        // PING settings: a timeout alone is refused here, where the wire form is known;
        // the interval alone keeps the default timeout.
        let keepalive = |k: pb::H2Keepalive| pb::Pool {
            name: "p".into(),
            h2_keepalive: Some(k),
            ..Default::default()
        };
        let err = pool(
            keepalive(pb::H2Keepalive {
                timeout_ms: Some(300),
                ..Default::default()
            }),
            "pool",
        )
        .expect_err("timeout without interval");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message()
                .starts_with("pool.h2_keepalive.interval_ms: required"),
            "{}",
            err.message()
        );
        let model = pool(
            keepalive(pb::H2Keepalive {
                interval_ms: Some(250),
                ..Default::default()
            }),
            "pool",
        )
        .expect("valid");
        assert_eq!(
            model.policy.h2_keepalive,
            H2Keepalive {
                interval: Duration::from_millis(250),
                timeout: defaults.h2_keepalive.timeout,
            }
        );
        let again = pool(pool_proto(&model, None), "pool").expect("valid");
        assert_eq!(again.policy, model.policy);
        // A present zero is passed on for the state model to refuse under its name.
        let zero = pb::Pool {
            idle_timeout_ms: Some(0),
            ..Default::default()
        };
        assert!(pool(zero, "pool")
            .expect("converts")
            .policy
            .idle_timeout
            .is_zero());
    }
}
