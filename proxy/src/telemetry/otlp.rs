//! OTLP export over gRPC: a span per HTTP request and the daemon's metrics.
//!
//! Nothing here runs unless `[telemetry.otlp]` is configured: requests then carry no
//! trace context of their own and a client's `traceparent` is forwarded untouched.

use std::borrow::Cow;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::metrics::{
    Counter, Gauge, Histogram, Meter, MeterProvider as _, ObservableCounter, ObservableGauge,
};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use thiserror::Error;

use super::histogram::{FAST_BOUNDS, REQUEST_BOUNDS};
use super::metrics::{HttpOutcome, Metrics};
use super::OtlpConfig;
use super::StateFeed;
use crate::routing::Published;

/// The OTLP exporters could not be set up.
#[derive(Debug, Error)]
#[error("telemetry.otlp.endpoint {endpoint}: {reason}")]
pub struct OtlpError {
    /// The configured endpoint.
    pub endpoint: String,
    /// What failed.
    pub reason: String,
}

/// The running exporters of one daemon.
pub struct Otlp {
    traces: SdkTracerProvider,
    metrics: SdkMeterProvider,
    tracing: Arc<RequestTracing>,
}

impl std::fmt::Debug for Otlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otlp").finish_non_exhaustive()
    }
}

impl Otlp {
    /// Starts the span and metric exporters (must run inside the Tokio runtime, which the
    /// gRPC client uses). Returns the instruments the metrics also record into.
    pub fn start(
        config: &OtlpConfig,
        metrics: Weak<Metrics>,
        state: Option<StateFeed>,
    ) -> Result<(Otlp, Instruments), OtlpError> {
        let error = |reason: String| OtlpError {
            endpoint: config.endpoint.clone(),
            reason,
        };
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.timeout)
            .build()
            .map_err(|e| error(e.to_string()))?;
        let processor = BatchSpanProcessor::builder(spans)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(config.interval)
                    .build(),
            )
            .build();
        let traces = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.clone())
            .build();
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.timeout)
            .build()
            .map_err(|e| error(e.to_string()))?;
        let reader = PeriodicReader::builder(exporter)
            .with_interval(config.interval)
            .build();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        let instruments = Instruments::new(&provider.meter("proxy"), metrics, state);
        let metrics = provider;
        let tracing = Arc::new(RequestTracing {
            tracer: traces.tracer("proxy"),
            propagator: TraceContextPropagator::new(),
        });
        Ok((
            Otlp {
                traces,
                metrics,
                tracing,
            },
            instruments,
        ))
    }

    /// What the request path uses to start and propagate spans.
    pub fn tracing(&self) -> Arc<RequestTracing> {
        self.tracing.clone()
    }

    /// Sends what is buffered and stops the exporters. Blocks: call it off the runtime's
    /// worker threads (`spawn_blocking`).
    pub fn shutdown(&self) {
        if let Err(e) = self.traces.shutdown() {
            tracing::warn!(error = %e, "OTLP trace export did not shut down cleanly");
        }
        if let Err(e) = self.metrics.shutdown() {
            tracing::warn!(error = %e, "OTLP metric export did not shut down cleanly");
        }
    }
}

/// Starts a span per request and carries its context to the upstream.
pub struct RequestTracing {
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for RequestTracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestTracing").finish_non_exhaustive()
    }
}

/// The facts a request span ends with.
#[derive(Debug, Clone, Copy)]
pub struct SpanOutcome<'a> {
    /// The request's figures, as the metrics record them.
    pub http: &'a HttpOutcome<'a>,
    /// Request method.
    pub method: &'a str,
    /// Upstream address that answered (empty if none).
    pub upstream: &'a str,
    /// Whether the response body was sent completely.
    pub complete: bool,
}

impl RequestTracing {
    /// Starts the span of a request, as a child of the client's `traceparent` if it sent one.
    pub fn start(&self, method: &http::Method, headers: &HeaderMap, listener: &str) -> Context {
        let parent = self.propagator.extract(&HeaderReader(headers));
        let span = self
            .tracer
            .span_builder(method.as_str().to_string())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.as_str().to_string()),
                KeyValue::new("proxy.listener", listener.to_string()),
            ])
            .start_with_context(&self.tracer, &parent);
        parent.with_span(span)
    }

    /// Writes `traceparent` (and `tracestate`) for the upstream: same trace, this span as parent.
    pub fn inject(&self, cx: &Context, headers: &mut HeaderMap) {
        self.propagator
            .inject_context(cx, &mut HeaderWriter(headers));
    }

    /// Ends the span with the route, pool, upstream and status.
    pub fn finish(cx: &Context, outcome: &SpanOutcome<'_>) {
        let span = cx.span();
        let http = outcome.http;
        let (route, pool) = (http.names.route(), http.names.pool());
        if !route.is_empty() {
            span.update_name(Cow::Owned(format!("{} {}", outcome.method, route)));
        }
        span.set_attributes([
            KeyValue::new("proxy.route", route.to_string()),
            KeyValue::new("proxy.pool", pool.to_string()),
            KeyValue::new("proxy.upstream", outcome.upstream.to_string()),
            KeyValue::new("http.response.status_code", i64::from(http.status)),
            KeyValue::new(
                "proxy.response_bytes",
                i64::try_from(http.bytes).unwrap_or(i64::MAX),
            ),
            KeyValue::new("proxy.complete", outcome.complete),
        ]);
        if let Some(source) = http.error_source {
            span.set_attribute(KeyValue::new("proxy.error_source", source));
            span.set_status(Status::error(source));
        } else if http.status >= 500 {
            span.set_status(Status::error("upstream answered with a server error"));
        }
        span.end();
    }
}

struct HeaderReader<'a>(&'a HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderWriter<'a>(&'a mut HeaderMap);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The OTLP side of the metrics: the same names with dots, recorded next to the
/// Prometheus series.
pub struct Instruments {
    requests: Counter<u64>,
    duration: Histogram<f64>,
    errors: Counter<u64>,
    response_bytes: Counter<u64>,
    connect: Histogram<f64>,
    connect_failures: Counter<u64>,
    upgrades: Counter<u64>,
    last_upgrade: Gauge<f64>,
    api_calls: Counter<u64>,
    acme_orders: Counter<u64>,
    tls_refused: Counter<u64>,
    registrations: Counter<u64>,
    held: Counter<u64>,
    _observed: Vec<ObservableGauge<i64>>,
    _counted: ObservableCounter<u64>,
}

/// An observable gauge of the daemon-wide value `read` takes from the metrics.
fn daemon_gauge(
    meter: &Meter,
    name: &'static str,
    description: &'static str,
    metrics: &Weak<Metrics>,
    read: fn(&Metrics) -> i64,
) -> ObservableGauge<i64> {
    let metrics = metrics.clone();
    meter
        .i64_observable_gauge(name)
        .with_description(description)
        .with_callback(move |o| {
            if let Some(m) = metrics.upgrade() {
                o.observe(read(&m), &[]);
            }
        })
        .build()
}

/// What an upstream gauge reads from an upstream.
type UpstreamReading = fn(&crate::upstream::UpstreamRuntime) -> i64;

/// An observable gauge with one value per upstream of every pool.
fn upstream_gauge(
    meter: &Meter,
    name: &'static str,
    description: &'static str,
    state: Published,
    read: UpstreamReading,
) -> ObservableGauge<i64> {
    meter
        .i64_observable_gauge(name)
        .with_description(description)
        .with_callback(move |o| {
            let routing = state.routing();
            for pool in routing.pools() {
                for upstream in pool.upstreams() {
                    o.observe(
                        read(upstream),
                        &[
                            KeyValue::new("pool", pool.name.clone()),
                            KeyValue::new("upstream", upstream.address.clone()),
                        ],
                    );
                }
            }
        })
        .build()
}

impl std::fmt::Debug for Instruments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instruments").finish_non_exhaustive()
    }
}

impl Instruments {
    fn new(meter: &Meter, metrics: Weak<Metrics>, state: Option<StateFeed>) -> Instruments {
        let mut observed = vec![
            daemon_gauge(
                meter,
                "proxy.connections.active",
                "Client connections open now on all listeners",
                &metrics,
                Metrics::connections_open,
            ),
            daemon_gauge(
                meter,
                "proxy.registrations.active",
                "Registrations whose lease is open",
                &metrics,
                Metrics::registrations_now,
            ),
            daemon_gauge(
                meter,
                "proxy.held_requests",
                "Requests and connections waiting for a held registered route",
                &metrics,
                Metrics::held_now,
            ),
        ];
        let accepted = metrics.clone();
        let counted = meter
            .u64_observable_counter("proxy.connections")
            .with_description("Client connections accepted on all listeners")
            .with_callback(move |o| {
                if let Some(m) = accepted.upgrade() {
                    o.observe(m.connections_accepted(), &[]);
                }
            })
            .build();
        if let Some(state) = state {
            let gauges: [(&'static str, &'static str, UpstreamReading); 4] = [
                (
                    "proxy.upstream.healthy",
                    "1 if the upstream passes its active health check and is not ejected",
                    |u| i64::from(u.is_healthy() && !u.is_ejected()),
                ),
                (
                    "proxy.upstream.ejected",
                    "1 while the upstream is skipped after a failed connection",
                    |u| i64::from(u.is_ejected()),
                ),
                (
                    "proxy.upstream.draining",
                    "1 if the upstream is draining (takes no new work)",
                    |u| i64::from(u.is_draining()),
                ),
                (
                    "proxy.upstream.in_flight",
                    "Requests and TCP streams in flight to the upstream",
                    |u| i64::try_from(u.in_flight()).unwrap_or(i64::MAX),
                ),
            ];
            for (name, description, read) in gauges {
                observed.push(upstream_gauge(
                    meter,
                    name,
                    description,
                    state.routing.clone(),
                    read,
                ));
            }
            let writes = meter
                .f64_histogram("proxy.state.write.duration")
                .with_description("SQLite commit time of one batch of changes")
                .with_unit("s")
                .with_boundaries(FAST_BOUNDS.to_vec())
                .build();
            state
                .write_latency
                .mirror_to(move |elapsed| writes.record(elapsed.as_secs_f64(), &[]));
        }
        Instruments {
            requests: meter
                .u64_counter("proxy.http.requests")
                .with_description("HTTP requests answered")
                .build(),
            duration: meter
                .f64_histogram("proxy.http.request.duration")
                .with_unit("s")
                .with_boundaries(REQUEST_BOUNDS.to_vec())
                .build(),
            errors: meter
                .u64_counter("proxy.http.errors")
                .with_description("Error responses the proxy produced, by who was at fault")
                .build(),
            response_bytes: meter
                .u64_counter("proxy.http.response_bytes")
                .with_unit("By")
                .build(),
            connect: meter
                .f64_histogram("proxy.upstream.connect.duration")
                .with_unit("s")
                .with_boundaries(FAST_BOUNDS.to_vec())
                .build(),
            connect_failures: meter.u64_counter("proxy.upstream.connect_failures").build(),
            upgrades: meter.u64_counter("proxy.upgrades").build(),
            last_upgrade: meter
                .f64_gauge("proxy.last_upgrade.duration")
                .with_unit("s")
                .build(),
            api_calls: meter.u64_counter("proxy.api.calls").build(),
            acme_orders: meter.u64_counter("proxy.acme.orders").build(),
            tls_refused: meter.u64_counter("proxy.tls.handshakes_refused").build(),
            registrations: meter.u64_counter("proxy.registrations").build(),
            held: meter.u64_counter("proxy.held_requests.finished").build(),
            _observed: observed,
            _counted: counted,
        }
    }

    pub(crate) fn http_request(&self, outcome: &HttpOutcome<'_>) {
        let class = match outcome.status / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            5 => "5xx",
            _ => "other",
        };
        let attributes = [
            KeyValue::new("listener", outcome.listener.to_string()),
            KeyValue::new("route", outcome.names.route().to_string()),
            KeyValue::new("pool", outcome.names.pool().to_string()),
            KeyValue::new("status_class", class),
        ];
        self.requests.add(1, &attributes);
        self.duration
            .record(outcome.elapsed.as_secs_f64(), &attributes);
        let [listener, route, pool, _] = attributes;
        if let Some(source) = outcome.error_source {
            self.errors.add(
                1,
                &[
                    listener.clone(),
                    route.clone(),
                    pool.clone(),
                    KeyValue::new("source", source),
                ],
            );
        }
        self.response_bytes
            .add(outcome.bytes, &[listener, route, pool]);
    }

    pub(crate) fn upstream_connected(&self, pool: &str, elapsed: Duration) {
        self.connect.record(
            elapsed.as_secs_f64(),
            &[KeyValue::new("pool", pool.to_string())],
        );
    }

    pub(crate) fn upstream_connect_failed(&self, pool: &str) {
        self.connect_failures
            .add(1, &[KeyValue::new("pool", pool.to_string())]);
    }

    pub(crate) fn upgrade_finished(&self, result: &'static str, elapsed: Duration) {
        self.upgrades.add(1, &[KeyValue::new("result", result)]);
        self.last_upgrade.record(elapsed.as_secs_f64(), &[]);
    }

    pub(crate) fn api_call(&self, method: &str, code: &'static str) {
        self.api_calls.add(
            1,
            &[
                KeyValue::new("method", method.to_string()),
                KeyValue::new("code", code),
            ],
        );
    }

    pub(crate) fn acme_order(&self, result: &'static str) {
        self.acme_orders.add(1, &[KeyValue::new("result", result)]);
    }

    pub(crate) fn tls_handshake_refused(&self) {
        self.tls_refused.add(1, &[]);
    }

    pub(crate) fn registration_opened(&self) {
        self.registrations.add(1, &[]);
    }

    pub(crate) fn held_finished(&self, outcome: &'static str) {
        self.held.add(1, &[KeyValue::new("result", outcome)]);
    }
}
