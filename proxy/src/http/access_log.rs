//! One structured line per request, written when the response body ends; the request's
//! metrics are recorded and its span (when OTLP is configured) ends at the same point.
//!
//! Only method, path (the query only with `[telemetry] include_query`), host, route, pool,
//! upstream, status, byte counts, durations and the headers named by `[telemetry]
//! log_headers` are logged; Authorization, Cookie and Set-Cookie values never are (see
//! [`crate::telemetry::HeaderPolicy`]). The line goes to the process' access log sink
//! ([`crate::telemetry::access`]), which renders it in the configured format and writes it
//! off the request path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::proxy::ListenerContext;
use crate::routing::RouteEntry;
use crate::telemetry::{access, HttpOutcome, RequestTracing, RouteNames, SpanOutcome};
use crate::upstream::UpstreamRuntime;

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

/// The facts about one request, filled in as it proceeds. What only the access line
/// shows (path, host, headers) is gathered only when lines are written.
#[derive(Debug)]
pub struct AccessLog {
    /// The listener it came in on, as the worker that accepted the connection serves it:
    /// the listener's name and the telemetry the request's metrics go to. The worker's
    /// own context rather than the listener's configuration and telemetry themselves,
    /// which every worker shares: a reference taken per request on those was a cache line
    /// written by both workers in turn (`perf annotate` put most of the samples of making
    /// this record at those two instructions).
    pub(crate) listener: Arc<ListenerContext>,
    /// Client address.
    pub client: std::net::SocketAddr,
    /// Request method.
    pub method: http::Method,
    /// Request path (with the query only if configured); empty when no line is written.
    pub path: String,
    /// The configured request headers, rendered with secrets redacted.
    pub headers: Option<String>,
    /// The request's span, when OTLP is configured.
    pub trace: Option<opentelemetry::Context>,
    /// Request host, if any (when a line is written).
    pub host: String,
    /// The matched route and its pool.
    pub entry: Option<Arc<RouteEntry>>,
    /// The upstream that answered, kept only when the access line or a span names it.
    pub upstream: Option<Arc<UpstreamRuntime>>,
    /// Response status.
    pub status: u16,
    /// Who failed, for error responses.
    pub error: Option<(ErrorSource, String)>,
    /// When the request arrived.
    pub start: Instant,
    /// Time to the upstream response head, in microseconds (0 until one came). An atomic
    /// rather than a `OnceLock`: it is written once per request, and a `OnceLock` set
    /// goes through its slow path (a `Once` call) every time, for a fresh lock each request.
    pub upstream_us: AtomicU64,
}

impl AccessLog {
    /// Writes the line; `bytes` is the response body size sent, `grpc_status` the status
    /// a gRPC call ended with, `end` when the response ended (the caller's clock reading,
    /// which it may use for more than this).
    pub fn write(&self, bytes: u64, complete: bool, grpc_status: Option<u32>, end: Instant) {
        let elapsed = end.saturating_duration_since(self.start);
        let names = self
            .entry
            .as_ref()
            .map_or(RouteNames::Unmatched, |e| RouteNames::Of(&e.route));
        let upstream = self.upstream.as_ref().map_or("", |u| u.address.as_str());
        let outcome = HttpOutcome {
            listener: &self.listener.listener.name,
            names,
            status: self.status,
            error_source: self.error.as_ref().map(|(source, _)| source.as_str()),
            grpc_status,
            bytes,
            elapsed,
            end,
        };
        match &self.entry {
            Some(entry) => self
                .listener
                .telemetry
                .metrics()
                .http_request_on(&outcome, entry.series_slot()),
            None => self.listener.telemetry.metrics().http_request(&outcome),
        }
        if let Some(cx) = &self.trace {
            RequestTracing::finish(
                cx,
                &SpanOutcome {
                    http: &outcome,
                    method: self.method.as_str(),
                    upstream,
                    complete,
                },
            );
        }
        if !self.listener.telemetry.access_log_enabled() {
            return;
        }
        let total_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let (error_source, error) = match &self.error {
            Some((source, detail)) => (source.as_str(), detail.as_str()),
            None => ("", ""),
        };
        access::record(|line| {
            line.str("listener", &self.listener.listener.name);
            line.address("client", self.client);
            line.str("method", self.method.as_str());
            line.str("host", &self.host);
            line.str("path", &self.path);
            if let Some(headers) = &self.headers {
                line.str("headers", headers);
            }
            line.str("route", names.route());
            line.str("pool", names.pool());
            line.str("upstream", upstream);
            line.u64("status", u64::from(self.status));
            if let Some(code) = grpc_status {
                line.u64("grpc_status", u64::from(code));
            }
            line.u64("bytes_out", bytes);
            line.u64("duration_us", total_us);
            line.u64("upstream_us", self.upstream_us.load(Ordering::Relaxed));
            line.bool("complete", complete);
            line.str("error_source", error_source);
            line.str("error", error);
        });
    }
}
