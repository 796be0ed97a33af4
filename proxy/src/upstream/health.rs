//! Active health checks: each pool with a `health` section has its upstreams probed on its
//! interval (HTTP GET of the path, or a TCP connect when the path is empty).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use tokio::time::Instant;

use super::body::RequestBody;
use super::{http_sender, PoolRuntime, UpstreamRuntime};
use crate::shutdown::Shutdown;
use crate::state::HealthCheck;

/// How often the checker looks for upstreams that are due.
const TICK: Duration = Duration::from_millis(250);

/// Runs the health checker until shutdown, on the pools `pools` lists at each tick (those
/// of the current routing table).
pub async fn run(pools: impl Fn() -> Vec<Arc<PoolRuntime>>, shutdown: Shutdown) {
    // Next due time per (pool, upstream address).
    let mut due: HashMap<(String, String), Instant> = HashMap::new();
    let mut ticker = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.triggered() => return,
        }
        let now = Instant::now();
        let mut live = Vec::new();
        for pool in pools() {
            let Some(check) = pool.health.clone() else {
                continue;
            };
            for upstream in pool.upstreams() {
                let key = (pool.name.clone(), upstream.address.clone());
                let next = due.entry(key.clone()).or_insert(now);
                if *next <= now {
                    *next = now + check.interval;
                    tokio::spawn(probe(pool.clone(), upstream.clone(), check.clone()));
                }
                live.push(key);
            }
        }
        // Forget upstreams that are gone.
        if due.len() > live.len() {
            let live: std::collections::HashSet<_> = live.into_iter().collect();
            due.retain(|k, _| live.contains(k));
        }
    }
}

async fn probe(pool: Arc<PoolRuntime>, upstream: Arc<UpstreamRuntime>, check: HealthCheck) {
    let result =
        tokio::time::timeout(check.timeout, check_once(&pool, &upstream.address, &check)).await;
    let outcome = match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    };
    let healthy = outcome.is_ok();
    if upstream.set_healthy(healthy) {
        match outcome {
            Ok(()) => {
                tracing::info!(pool = %pool.name, upstream = %upstream.address, "upstream is healthy again")
            }
            Err(reason) => {
                tracing::warn!(pool = %pool.name, upstream = %upstream.address, %reason, "upstream failed its health check")
            }
        }
    }
}

async fn check_once(pool: &PoolRuntime, address: &str, check: &HealthCheck) -> Result<(), String> {
    // Through the pool, so a TLS pool is checked over TLS like its traffic.
    let stream = pool
        .open(address, check.timeout)
        .await
        .map_err(|e| e.to_string())?;
    if check.path.is_empty() {
        return Ok(());
    }
    let mut sender = http_sender(address, stream, None)
        .await
        .map_err(|e| e.to_string())?
        .sender;
    let request = Request::get(check.path.as_str())
        .header(http::header::HOST, address)
        .header(http::header::USER_AGENT, "proxyd-health-check")
        .body(RequestBody::empty())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if status.is_success() || status.is_redirection() || status == StatusCode::NOT_MODIFIED {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}
