//! OTLP export against a real gRPC receiver in this test (the OTLP trace and metrics
//! collector services from `opentelemetry-proto`, served by tonic on 127.0.0.1:0): a span per
//! request with route, pool, upstream and status, the W3C `traceparent` carried to the
//! upstream, metrics exported, and nothing added when OTLP is not configured.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

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
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    metric_names: Arc<Mutex<Vec<String>>>,
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
                self.metric_names
                    .lock()
                    .unwrap()
                    .extend(scope.metrics.into_iter().map(|m| m.name));
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
