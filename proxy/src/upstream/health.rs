//! Active health checks: each pool with a `health` section has its upstreams probed on its
//! interval (HTTP GET of the path, `grpc.health.v1.Health/Check` with `grpc`, or a TCP
//! connect when neither is set). Checks speak the pool's protocol (HTTP/2 for `h2c` and
//! `h2`, and for `auto` when ALPN chose it; always HTTP/2 for gRPC) on a connection of
//! their own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prost::Message;

use super::body::RequestBody;
use super::{H1Conn, PoolRuntime, UpstreamRuntime};
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
    if let Some(grpc) = &check.grpc {
        return grpc_check(pool, address, stream, &grpc.service).await;
    }
    if check.path.is_empty() {
        return Ok(());
    }
    let h2 = pool.speaks_h2().unwrap_or_else(|| stream.negotiated_h2());
    if h2 {
        let mut sender = h2_handshake(stream).await?;
        let request = Request::get(h2_uri(pool, address, &check.path)?)
            .header(http::header::USER_AGENT, "proxyd-health-check")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        return http_verdict(response.status());
    }
    let request = Request::get(check.path.as_str())
        .header(http::header::HOST, address)
        .header(http::header::USER_AGENT, "proxyd-health-check")
        .body(RequestBody::empty())
        .map_err(|e| e.to_string())?;
    let response = H1Conn::new(stream, None)
        .send(&mut Some(request), None)
        .await
        .map_err(|e| e.error.to_string())?;
    http_verdict(response.status())
}

fn http_verdict(status: StatusCode) -> Result<(), String> {
    if status.is_success() || status.is_redirection() || status == StatusCode::NOT_MODIFIED {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

/// An HTTP/2 connection of the check's own (it ends with the check).
async fn h2_handshake(
    stream: super::UpstreamStream,
) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String> {
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The absolute URI HTTP/2 needs (`:scheme`, `:authority`) for `path` on `address`.
fn h2_uri(pool: &PoolRuntime, address: &str, path: &str) -> Result<http::Uri, String> {
    let scheme = if pool.conn_key("").tls != 0 {
        "https"
    } else {
        "http"
    };
    let authority = if address.starts_with("unix:") {
        "localhost"
    } else {
        address
    };
    format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|e| format!("health check URI: {e}"))
}

/// `grpc.health.v1.Health/Check` for `service`: healthy when the answer is SERVING.
async fn grpc_check(
    pool: &PoolRuntime,
    address: &str,
    stream: super::UpstreamStream,
    service: &str,
) -> Result<(), String> {
    let mut sender = h2_handshake(stream).await?;
    let message = tonic_health::pb::HealthCheckRequest {
        service: service.to_string(),
    }
    .encode_to_vec();
    // gRPC framing: not compressed, 4-byte big-endian length, the message.
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(&message);
    let request = Request::post(h2_uri(pool, address, "/grpc.health.v1.Health/Check")?)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "proxyd-health-check")
        .body(Full::new(Bytes::from(frame)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != StatusCode::OK {
        return Err(format!("HTTP status {}", response.status()));
    }
    let head_status = grpc_status(response.headers());
    let collected = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    let status = collected.trailers().and_then(grpc_status).or(head_status);
    if status != Some(0) {
        return Err(match status {
            Some(code) => format!("grpc-status {code}"),
            None => "no grpc-status".to_string(),
        });
    }
    let body = collected.to_bytes();
    let payload = body.get(5..).ok_or("no health answer in the body")?;
    let answer = tonic_health::pb::HealthCheckResponse::decode(payload)
        .map_err(|e| format!("health answer: {e}"))?;
    if answer.status() == tonic_health::pb::health_check_response::ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!("{:?}", answer.status()))
    }
}

/// `grpc-status` of a header block, if present and numeric.
fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
