//! One structured line per request, written when the response body ends; the request's
//! metrics are recorded and its span (when OTLP is configured) ends at the same point.
//!
//! Only method, path (the query only with `[telemetry] include_query`), host, route, pool,
//! upstream, status, byte counts, durations and the headers named by `[telemetry]
//! log_headers` are logged; Authorization, Cookie and Set-Cookie values never are (see
//! [`crate::telemetry::HeaderPolicy`]). The line's format is chosen by the subscriber
//! ([`crate::telemetry::init_logging`]).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::telemetry::{HttpOutcome, RequestTracing, SpanOutcome, Telemetry};

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
    /// The name used in logs, metrics and spans.
    pub fn as_str(self) -> &'static str {
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
    /// Request path (with the query only if configured).
    pub path: String,
    /// The configured request headers, rendered with secrets redacted.
    pub headers: Option<String>,
    /// The request's span, when OTLP is configured.
    pub trace: Option<opentelemetry::Context>,
    /// Where the request's metrics go.
    pub telemetry: Arc<Telemetry>,
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
        let elapsed = self.start.elapsed();
        let total_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let (error_source, error) = match &self.error {
            Some((source, detail)) => (source.as_str(), detail.as_str()),
            None => ("", ""),
        };
        let outcome = HttpOutcome {
            listener: &self.listener,
            route: &self.route,
            pool: &self.pool,
            status: self.status,
            error_source: self.error.as_ref().map(|(source, _)| source.as_str()),
            bytes,
            elapsed,
        };
        self.telemetry.metrics().http_request(&outcome);
        if let Some(cx) = &self.trace {
            RequestTracing::finish(
                cx,
                &SpanOutcome {
                    http: &outcome,
                    method: &self.method,
                    upstream: &self.upstream,
                    complete,
                },
            );
        }
        tracing::info!(
            target: "access",
            listener = %self.listener,
            client = %self.client,
            method = %self.method,
            host = %self.host,
            path = %self.path,
            headers = self.headers.as_deref(),
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
