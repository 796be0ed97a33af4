//! The `dns` source: A/AAAA records of a name (with the configured port), or its SRV
//! records (target resolved to addresses, SRV port and weight) when no port is given.
//! Re-resolved on the configured interval, sooner when the records' TTL runs out first.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;

use super::{backoff, Feed};
use crate::state::Upstream;

/// Shortest time between lookups, whatever the TTL says.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Resolves `name` forever.
pub(super) async fn run(
    name: String,
    port: Option<u16>,
    interval: Duration,
    resolver: Option<SocketAddr>,
    feed: Feed,
) {
    let mut attempt = 0u32;
    let resolver = loop {
        match build_resolver(resolver) {
            Ok(r) => break r,
            Err(e) => {
                feed.fail(format!("no DNS resolver: {e}"));
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        }
    };
    loop {
        let wait = match resolve(&resolver, &name, port).await {
            Ok((upstreams, valid_for)) => {
                feed.publish(upstreams).await;
                attempt = 0;
                valid_for.clamp(MIN_INTERVAL, interval.max(MIN_INTERVAL))
            }
            Err(reason) => {
                feed.fail(format!("{name}: {reason}"));
                attempt = attempt.saturating_add(1);
                backoff(attempt).min(interval.max(MIN_INTERVAL))
            }
        };
        tokio::time::sleep(wait).await;
    }
}

fn build_resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match server {
        Some(addr) => {
            let mut config = ResolverConfig::new();
            config.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        }
        None => TokioResolver::builder_tokio().map_err(|e| e.to_string())?,
    };
    let options: &mut ResolverOpts = builder.options_mut();
    // Every lookup must ask the server: the TTL is honoured by the schedule here instead.
    options.cache_size = 0;
    options.timeout = Duration::from_secs(5);
    options.attempts = 2;
    Ok(builder.build())
}

/// The current set and how long it is valid.
async fn resolve(
    resolver: &TokioResolver,
    name: &str,
    port: Option<u16>,
) -> Result<(Vec<Upstream>, Duration), String> {
    let now = std::time::Instant::now();
    match port {
        Some(port) => {
            let answer = resolver.lookup_ip(name).await.map_err(|e| e.to_string())?;
            let mut upstreams: Vec<Upstream> = answer
                .iter()
                .map(|ip| Upstream::new(SocketAddr::new(ip, port).to_string()))
                .collect();
            upstreams.dedup_by(|a, b| a.address == b.address);
            if upstreams.is_empty() {
                return Err("no A/AAAA records".into());
            }
            Ok((
                upstreams,
                answer.valid_until().saturating_duration_since(now),
            ))
        }
        None => {
            let answer = resolver.srv_lookup(name).await.map_err(|e| e.to_string())?;
            let mut valid_for = answer
                .as_lookup()
                .valid_until()
                .saturating_duration_since(now);
            let mut upstreams: Vec<Upstream> = Vec::new();
            for srv in answer.iter() {
                let target = srv.target().to_utf8();
                let ips = resolver
                    .lookup_ip(target.as_str())
                    .await
                    .map_err(|e| format!("SRV target {target}: {e}"))?;
                valid_for = valid_for.min(ips.valid_until().saturating_duration_since(now));
                for ip in ips.iter() {
                    let address = SocketAddr::new(ip, srv.port()).to_string();
                    if !upstreams.iter().any(|u| u.address == address) {
                        upstreams.push(Upstream {
                            weight: u32::from(srv.weight().max(1)),
                            ..Upstream::new(address)
                        });
                    }
                }
            }
            if upstreams.is_empty() {
                return Err("no SRV records".into());
            }
            Ok((upstreams, valid_for))
        }
    }
}
