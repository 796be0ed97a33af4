//! OTLP export against a real gRPC receiver in this test (the OTLP trace and metrics
//! collector services from `opentelemetry-proto`, served by tonic on 127.0.0.1:0): a span per
//! request with route, pool, upstream and status, the W3C `traceparent` carried to the
//! upstream, metrics exported, and nothing added when OTLP is not configured.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point, Metric};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    metric_names: Arc<Mutex<Vec<String>>>,
    /// The latest export of each metric, by name (values are cumulative).
    latest: Arc<Mutex<std::collections::BTreeMap<String, Metric>>>,
    /// Every export of every metric, in arrival order.
    history: Arc<Mutex<Vec<Metric>>>,
    service_names: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource_spans in request.into_inner().resource_spans {
            if let Some(resource) = &resource_spans.resource {
                for kv in &resource.attributes {
                    if kv.key == "service.name" {
                        self.service_names
                            .lock()
                            .unwrap()
                            .push(string_value(kv.value.as_ref()));
                    }
                }
            }
            for scope in resource_spans.scope_spans {
                self.spans.lock().unwrap().extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        for resource_metrics in request.into_inner().resource_metrics {
            for scope in resource_metrics.scope_metrics {
                for metric in scope.metrics {
                    self.metric_names.lock().unwrap().push(metric.name.clone());
                    self.history.lock().unwrap().push(metric.clone());
                    self.latest
                        .lock()
                        .unwrap()
                        .insert(metric.name.clone(), metric);
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

fn string_value(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| string_value(kv.value.as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn start_receiver() -> (SocketAddr, Receiver) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    let service = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(service.clone()))
            .add_service(MetricsServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, receiver)
}

fn config(otlp: &str, up: &Upstream) -> String {
    format!(
        r#"[server]
state_dir = "{{state}}"
admin_listen = ""

{otlp}

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:0"

[[pools]]
name = "p"
upstreams = ["{}"]

[[routes]]
name = "site"
listener = "web"
host = "a.example"
pool = "p"
"#,
        up.address()
    )
}

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

async fn get_with_traceparent(addr: SocketAddr, host: &str, path: &str) -> RawResponse {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\ntraceparent: 00-{TRACE_ID}-{CLIENT_SPAN}-01\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
}

fn forwarded_traceparent(r: &RawResponse) -> Option<String> {
    r.json()["headers"]["traceparent"][0]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_arrive_with_route_pool_upstream_and_status() {
    let (collector, receiver) = start_receiver().await;
    let up = upstream("up").await;
    let otlp = format!(
        "[telemetry.otlp]\nendpoint = \"http://{collector}\"\ninterval = \"200ms\"\nservice_name = \"edge-proxy\"\n"
    );
    let p = start_proxy(&config(&otlp, &up)).await;
    let web = p.addr("web");

    // A client that is itself traced: the upstream sees the same trace, with the proxy's
    // span as parent.
    let r = get_with_traceparent(web, "a.example", "/hello").await;
    assert_eq!(r.status, 200);
    let forwarded = forwarded_traceparent(&r).expect("traceparent forwarded");
    let parts: Vec<&str> = forwarded.split('-').collect();
    assert_eq!(parts.len(), 4, "{forwarded}");
    assert_eq!(parts[1], TRACE_ID, "{forwarded}");
    assert_ne!(
        parts[2], CLIENT_SPAN,
        "the upstream's parent is the proxy's span: {forwarded}"
    );
    let proxy_span_id = parts[2].to_string();

    // A client without trace context: a new trace starts at the proxy.
    let r = get(web, "a.example", "/fresh").await;
    let fresh = forwarded_traceparent(&r).expect("traceparent added");
    assert!(
        fresh.starts_with("00-") && !fresh.contains(TRACE_ID),
        "{fresh}"
    );

    // No route: a span that says the proxy failed.
    assert_eq!(get(web, "nowhere.example", "/").await.status, 404);

    let mut spans = Vec::new();
    for _ in 0..300 {
        spans = receiver.spans.lock().unwrap().clone();
        if spans.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(spans.len(), 3, "{spans:#?}");

    let traced = spans
        .iter()
        .find(|s| hex(&s.trace_id) == TRACE_ID)
        .expect("span of the traced request");
    assert_eq!(traced.name, "GET site");
    assert_eq!(traced.kind, SpanKind::Server as i32);
    assert_eq!(hex(&traced.parent_span_id), CLIENT_SPAN);
    assert_eq!(hex(&traced.span_id), proxy_span_id);
    assert_eq!(attribute(traced, "proxy.route").as_deref(), Some("site"));
    assert_eq!(attribute(traced, "proxy.pool").as_deref(), Some("p"));
    assert_eq!(attribute(traced, "proxy.listener").as_deref(), Some("web"));
    assert_eq!(attribute(traced, "proxy.upstream"), Some(up.address()));
    assert_eq!(
        attribute(traced, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attribute(traced, "http.request.method").as_deref(),
        Some("GET")
    );
    assert!(traced.end_time_unix_nano >= traced.start_time_unix_nano);

    let fresh_span = spans
        .iter()
        .find(|s| fresh.contains(&hex(&s.span_id)))
        .expect("span of the fresh request");
    assert!(fresh_span.parent_span_id.is_empty(), "a root span");
    assert!(fresh.contains(&hex(&fresh_span.trace_id)));

    let failed = spans
        .iter()
        .find(|s| attribute(s, "http.response.status_code").as_deref() == Some("404"))
        .unwrap();
    assert_eq!(
        attribute(failed, "proxy.error_source").as_deref(),
        Some("proxy")
    );
    assert_eq!(attribute(failed, "proxy.route").as_deref(), Some(""));
    assert_eq!(
        failed.status.as_ref().map(|s| s.code),
        Some(2),
        "status ERROR"
    );

    assert!(receiver
        .service_names
        .lock()
        .unwrap()
        .iter()
        .all(|n| n == "edge-proxy"));

    // Metrics go out on the same endpoint.
    let mut names = Vec::new();
    for _ in 0..300 {
        names = receiver.metric_names.lock().unwrap().clone();
        if names.iter().any(|n| n == "proxy.http.requests")
            && names.iter().any(|n| n == "proxy.http.request.duration")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for want in [
        "proxy.http.requests",
        "proxy.http.request.duration",
        "proxy.connections.active",
        "proxy.upstream.healthy",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not exported: {names:?}"
        );
    }
    p.daemon.stop().await;
}

impl Receiver {
    /// The latest cumulative value of counter `name` on the data point whose attribute
    /// `key` is `value`.
    fn counter(&self, name: &str, key: &str, value: &str) -> Option<i64> {
        let latest = self.latest.lock().unwrap();
        let Some(Data::Sum(sum)) = latest.get(name)?.data.as_ref() else {
            return None;
        };
        sum.data_points
            .iter()
            .find(|p| {
                p.attributes
                    .iter()
                    .any(|kv| kv.key == key && string_value(kv.value.as_ref()) == value)
            })
            .and_then(|p| match p.value {
                Some(number_data_point::Value::AsInt(v)) => Some(v),
                _ => None,
            })
    }

    /// Observations in the latest export of histogram `name` (all data points).
    fn histogram_count(&self, name: &str) -> Option<u64> {
        let latest = self.latest.lock().unwrap();
        match latest.get(name)?.data.as_ref() {
            Some(Data::Histogram(h)) => Some(h.data_points.iter().map(|p| p.count).sum()),
            _ => None,
        }
    }
}

/// The value of the Prometheus sample `series` (name with labels, exactly as scraped).
fn scraped(text: &str, series: &str) -> Option<i64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series)
            .then(|| value.parse::<f64>().ok())?
            .map(|v| v as i64)
    })
}

#[tokio::test]
async fn every_metric_goes_out_with_the_values_the_scrape_shows() {
    let (collector, receiver) = start_receiver().await;
    let up = upstream("up").await;
    let dead = dead_address();
    let otlp =
        format!("[telemetry.otlp]\nendpoint = \"http://{collector}\"\ninterval = \"200ms\"\n");
    let text = format!(
        "{}\n[[pools]]\nname = \"dead\"\nupstreams = [\"{dead}\"]\n\n[[routes]]\nname = \"down\"\nlistener = \"web\"\nhost = \"down.example\"\npool = \"dead\"\n",
        config(&otlp, &up)
    );
    let p = start_proxy(&text).await;
    let web = p.addr("web");
    for path in ["/one", "/two", "/three"] {
        assert_eq!(get(web, "a.example", path).await.status, 200);
    }
    // Nothing listens on the dead pool's port: a connect failure and a 502.
    assert_eq!(get(web, "down.example", "/").await.status, 502);
    // A write through the API: one SQLite commit.
    let mut api = mgmt_support::connect(&p).await;
    mgmt_support::create_pool(&mut api, mgmt_support::pool_msg("extra", &[up.address()])).await;

    let prometheus = p.daemon.telemetry().metrics().encode();
    let bytes = scraped(
        &prometheus,
        "proxy_http_response_bytes_total{listener=\"web\",route=\"site\",pool=\"p\"}",
    )
    .expect("response bytes scraped");
    assert!(bytes > 0, "{prometheus}");
    let failures = scraped(
        &prometheus,
        "proxy_upstream_connect_failures_total{pool=\"dead\"}",
    )
    .expect("connect failures scraped");
    assert!(failures >= 1, "{prometheus}");
    let errors = scraped(
        &prometheus,
        "proxy_http_errors_total{listener=\"web\",route=\"down\",pool=\"dead\",source=\"upstream\"}",
    )
    .expect("errors scraped");
    let commits = scraped(&prometheus, "proxy_state_write_duration_seconds_count")
        .expect("state writes scraped");

    // The OTLP export catches up with the same values.
    let mut exported = (None, None, None, None);
    for _ in 0..300 {
        exported = (
            receiver.counter("proxy.http.response_bytes", "route", "site"),
            receiver.counter("proxy.upstream.connect_failures", "pool", "dead"),
            receiver.counter("proxy.http.errors", "source", "upstream"),
            receiver.histogram_count("proxy.state.write.duration"),
        );
        if exported.0 == Some(bytes)
            && exported.1 == Some(failures)
            && exported.2 == Some(errors)
            && exported.3.is_some_and(|n| n >= 1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(exported.0, Some(bytes), "response bytes");
    assert_eq!(exported.1, Some(failures), "connect failures");
    assert_eq!(exported.2, Some(errors), "errors by source");
    let written = exported.3.expect("state write latency exported");
    // Commits made before the exporter started (the config file's objects) are only in
    // the scrape; the API write is in both.
    assert!(
        written >= 1 && written <= u64::try_from(commits).unwrap(),
        "{written} exported, {commits} scraped"
    );

    let names = receiver.metric_names.lock().unwrap().clone();
    for want in [
        "proxy.connections",
        "proxy.connections.active",
        "proxy.registrations.active",
        "proxy.held_requests",
        "proxy.upstream.healthy",
        "proxy.upstream.ejected",
        "proxy.upstream.draining",
        "proxy.upstream.in_flight",
        "proxy.upstream.connect.duration",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not exported: {names:?}"
        );
    }
    // The dead upstream was ejected after its failed connect (for a while), and an export
    // said so; the healthy one never was.
    let ejected = |pool: &str| -> Vec<i64> {
        let history = receiver.history.lock().unwrap();
        history
            .iter()
            .filter(|m| m.name == "proxy.upstream.ejected")
            .flat_map(|m| match &m.data {
                Some(Data::Gauge(g)) => g.data_points.clone(),
                other => panic!("proxy.upstream.ejected is not a gauge: {other:?}"),
            })
            .filter(|p| {
                p.attributes
                    .iter()
                    .any(|kv| kv.key == "pool" && string_value(kv.value.as_ref()) == pool)
            })
            .map(|p| match p.value {
                Some(number_data_point::Value::AsInt(v)) => v,
                _ => -1,
            })
            .collect()
    };
    assert!(ejected("dead").contains(&1), "{:?}", ejected("dead"));
    let healthy = ejected("p");
    assert!(
        !healthy.is_empty() && healthy.iter().all(|v| *v == 0),
        "{healthy:?}"
    );
    p.daemon.stop().await;
}

#[tokio::test]
async fn without_otlp_trace_context_passes_through_untouched() {
    let up = upstream("up").await;
    let p = start_proxy(&config("", &up)).await;
    let web = p.addr("web");
    let r = get_with_traceparent(web, "a.example", "/").await;
    assert_eq!(
        forwarded_traceparent(&r),
        Some(format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
    );
    let r = get(web, "a.example", "/").await;
    assert_eq!(
        forwarded_traceparent(&r),
        None,
        "no trace context is invented"
    );
    assert!(p.daemon.telemetry().tracing().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_does_not_affect_requests() {
    let up = upstream("up").await;
    let otlp = format!(
        "[telemetry.otlp]\nendpoint = \"http://{}\"\ninterval = \"100ms\"\ntimeout = \"1s\"\n",
        dead_address()
    );
    let p = start_proxy(&config(&otlp, &up)).await;
    for _ in 0..5 {
        assert_eq!(get(p.addr("web"), "a.example", "/").await.status, 200);
    }
    p.daemon.stop().await;
}
