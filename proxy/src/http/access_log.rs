//! One structured line per request, written when the response body ends.
//!
//! Only method, path (without query), host, route, pool, upstream, status, byte counts and
//! durations are logged; request headers such as Authorization or Cookie never are.

use std::sync::OnceLock;
use std::time::Instant;

/// Who is to blame for a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client sent something invalid.
    Downstream,
    /// The upstream refused, reset, or timed out.
    Upstream,
    /// No route or no healthy upstream.
    Proxy,
}

impl ErrorSource {
    fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Downstream => "downstream",
            ErrorSource::Upstream => "upstream",
            ErrorSource::Proxy => "proxy",
        }
    }
}

/// The facts about one request, filled in as it proceeds.
#[derive(Debug)]
pub struct AccessLog {
    /// Listener name.
    pub listener: String,
    /// Client address.
    pub client: std::net::SocketAddr,
    /// Request method.
    pub method: String,
    /// Request path without query.
    pub path: String,
    /// Request host, if any.
    pub host: String,
    /// Matched route name.
    pub route: String,
    /// Pool name.
    pub pool: String,
    /// Upstream address that answered.
    pub upstream: String,
    /// Response status.
    pub status: u16,
    /// Who failed, for error responses.
    pub error: Option<(ErrorSource, String)>,
    /// When the request arrived.
    pub start: Instant,
    /// Time to the upstream response head, in microseconds.
    pub upstream_us: OnceLock<u64>,
}

impl AccessLog {
    /// Writes the line; `bytes` is the response body size sent.
    pub fn write(&self, bytes: u64, complete: bool) {
        let total_us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let (error_source, error) = match &self.error {
            Some((source, detail)) => (source.as_str(), detail.as_str()),
            None => ("", ""),
        };
        tracing::info!(
            target: "access",
            listener = %self.listener,
            client = %self.client,
            method = %self.method,
            host = %self.host,
            path = %self.path,
            route = %self.route,
            pool = %self.pool,
            upstream = %self.upstream,
            status = self.status,
            bytes_out = bytes,
            duration_us = total_us,
            upstream_us = self.upstream_us.get().copied().unwrap_or(0),
            complete,
            error_source,
            error,
        );
    }
}
