//! The admin HTTP listener: `/metrics` (Prometheus / OpenMetrics text), `/healthz` (process
//! alive), `/readyz` (listeners bound, state loaded, not draining) and, unless
//! `server.admin_ui = false`, the read-only status page under `/ui/`.
//!
//! The page is three static files compiled into the binary (no external resource, no build
//! step) and one JSON document, `/ui/api/status`, that the page polls. Only GET and HEAD
//! are answered: nothing on this listener changes state (changes go through the gRPC API).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use super::Telemetry;
use crate::shutdown::Shutdown;

/// The content type of `/metrics` (what prometheus-client writes).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The status page's document, gathered by the parts that own its pieces (the daemon's
/// composition root hands one in; telemetry knows none of those parts).
pub trait StatusReport: Send + Sync {
    /// The current status as JSON (no keys, tokens or header values in it).
    fn json(&self) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send + '_>>;
}

const UI_HTML: &str = include_str!("ui/index.html");
const UI_CSS: &str = include_str!("ui/status.css");
const UI_JS: &str = include_str!("ui/status.js");

/// The page runs only its own files: no inline script, no other origin, no framing.
const UI_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Serves the admin endpoints until shutdown; `ui` is the status page's data source
/// (`None`: no page, `/ui/` answers 404).
pub async fn serve(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    shutdown: Shutdown,
    ui: Option<Arc<dyn StatusReport>>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.triggered() => return,
        };
        let shutdown = shutdown.clone();
        let telemetry = telemetry.clone();
        let ui = ui.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let fixed = answer(&req, &telemetry, &shutdown, ui.is_some());
                let ui = ui.clone();
                async move {
                    let response = match (fixed, ui) {
                        (Answer::Done(response), _) => response,
                        (Answer::Status, Some(ui)) => status_json(ui.json().await),
                        (Answer::Status, None) => not_found(),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A response known at once, or the status document, which is gathered asynchronously.
enum Answer {
    Done(Response<Full<Bytes>>),
    Status,
}

fn answer(req: &Request<Incoming>, telemetry: &Telemetry, shutdown: &Shutdown, ui: bool) -> Answer {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Answer::Done(response);
    }
    let path = req.uri().path();
    if ui && (path == "/ui" || path.starts_with("/ui/")) {
        return match path {
            "/ui" => {
                let mut response = text(StatusCode::PERMANENT_REDIRECT, "see /ui/\n");
                response
                    .headers_mut()
                    .insert(LOCATION, HeaderValue::from_static("/ui/"));
                Answer::Done(response)
            }
            "/ui/" | "/ui/index.html" => Answer::Done(asset(UI_HTML, "text/html; charset=utf-8")),
            "/ui/status.css" => Answer::Done(asset(UI_CSS, "text/css; charset=utf-8")),
            "/ui/status.js" => Answer::Done(asset(UI_JS, "text/javascript; charset=utf-8")),
            "/ui/api/status" => Answer::Status,
            _ => Answer::Done(not_found()),
        };
    }
    Answer::Done(match path {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(telemetry.metrics().encode())));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if shutdown.is_triggered() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/readyz" if !telemetry.is_ready() => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        "/readyz" => match telemetry.readiness_note() {
            None => text(StatusCode::OK, "ready\n"),
            // Still ready: the node serves what it has; the note says how old it is.
            Some(note) => {
                let mut response =
                    Response::new(Full::new(Bytes::from(format!("ready ({note})\n"))));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                response
            }
        },
        _ => not_found(),
    })
}

fn not_found() -> Response<Full<Bytes>> {
    text(
        StatusCode::NOT_FOUND,
        "not found: try /metrics, /healthz, /readyz or /ui/\n",
    )
}

/// One of the page's embedded files, with the headers that keep it to itself.
fn asset(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(UI_CSP),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn status_json(body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
