//! The request path, as a short list of named steps:
//! `check_request` -> `route` -> `upstream_request` -> `forward` -> `client_response`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::access_log::{AccessLog, ErrorSource};
use super::body::{BodyTooLarge, ClientBodyError, RequestBody, ResponseBody, Reuse};
use super::hygiene;
use crate::config::ListenerConfig;
use crate::routing::RouteEntry;
use crate::shutdown::Shutdown;
use crate::state::{PathMatch, StateHandle};
use crate::telemetry::Metrics;
use crate::upstream::{
    http_sender, ConnectError, HttpSender, InFlight, NoUpstream, PoolRuntime, UpstreamRuntime,
};

/// What every request on one client connection shares.
pub(crate) struct ConnContext {
    pub listener: Arc<ListenerConfig>,
    pub state: StateHandle,
    pub shutdown: Shutdown,
    pub client: SocketAddr,
    /// `http` or `https`: what the client spoke, for X-Forwarded-Proto.
    pub scheme: &'static str,
    /// Answers ACME HTTP-01 challenges before routing.
    pub tls: Arc<crate::tls::Tls>,
    /// Metrics, access log settings and request tracing.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
}

/// A failed request: status for the client, who failed, and the detail for the log.
struct Failure {
    status: StatusCode,
    source: ErrorSource,
    detail: String,
}

impl Failure {
    fn new(status: StatusCode, source: ErrorSource, detail: impl Into<String>) -> Self {
        Failure {
            status,
            source,
            detail: detail.into(),
        }
    }
}

/// Handles one request; never fails (errors become responses).
pub(crate) async fn handle(
    ctx: Arc<ConnContext>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let mut log = AccessLog {
        listener: ctx.listener.name.clone(),
        client: ctx.client,
        method: req.method().to_string(),
        path: if ctx.telemetry.include_query() {
            req.uri()
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_string()
        } else {
            req.uri().path().to_string()
        },
        headers: ctx.telemetry.headers().render(req.headers()),
        trace: ctx
            .telemetry
            .tracing()
            .map(|t| t.start(req.method(), req.headers(), &ctx.listener.name)),
        telemetry: ctx.telemetry.clone(),
        host: String::new(),
        route: String::new(),
        pool: String::new(),
        upstream: String::new(),
        status: 0,
        error: None,
        start: Instant::now(),
        upstream_us: OnceLock::new(),
    };
    // hyper hands the bytes after an upgrade request to the upgraded connection, so the
    // framing scanner stops following them; unless the switch happens, the connection
    // must end with this response rather than read them as further requests.
    let upgrade_asked = req.version() < Version::HTTP_2
        && (req.headers().contains_key(header::UPGRADE) || req.method() == http::Method::CONNECT);
    let result = proxy(&ctx, req, &mut log).await;
    let response = match result {
        Ok(response) => response,
        Err(failure) => {
            tracing::debug!(status = %failure.status, detail = %failure.detail, "request failed");
            let body = format!(
                "{} {}: {}\n",
                failure.status.as_u16(),
                failure.status.canonical_reason().unwrap_or(""),
                public_reason(&failure)
            );
            log.error = Some((failure.source, failure.detail));
            let mut response = Response::new(ResponseBody::full(body));
            *response.status_mut() = failure.status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            if failure.source == ErrorSource::Downstream {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    };
    log.status = response.status().as_u16();
    let (mut parts, body) = response.into_parts();
    if (ctx.shutdown.is_triggered() || upgrade_asked)
        && parts.status != StatusCode::SWITCHING_PROTOCOLS
    {
        // Draining, or an upgrade that did not happen: this HTTP/1 connection ends after
        // this response (h2 gets GOAWAY).
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(Response::from_parts(parts, body.with_log(Arc::new(log))))
}

/// The short text shown to clients (details stay in the log).
fn public_reason(failure: &Failure) -> &'static str {
    match failure.status {
        StatusCode::NOT_FOUND => "no route for this host and path",
        StatusCode::BAD_GATEWAY => "the upstream refused or reset the connection",
        StatusCode::SERVICE_UNAVAILABLE => "no healthy upstream",
        StatusCode::GATEWAY_TIMEOUT => "the upstream did not answer in time",
        StatusCode::PAYLOAD_TOO_LARGE => "request body too large",
        StatusCode::LENGTH_REQUIRED => "a Content-Length is required",
        _ => "malformed request",
    }
}

async fn proxy(
    ctx: &ConnContext,
    mut req: Request<Incoming>,
    log: &mut AccessLog,
) -> Result<Response<ResponseBody>, Failure> {
    if let Some(answer) = acme_challenge(ctx, &req) {
        return Ok(answer);
    }
    check_request(ctx, &req)?;
    let host = hygiene::request_host(req.uri(), req.headers());
    if let Some(h) = &host {
        log.host.clone_from(h);
    }
    let routing = ctx.state.routing();
    let entry = routing
        .lookup(
            &ctx.listener.name,
            host.as_deref().unwrap_or(""),
            req.uri().path(),
        )
        .ok_or_else(|| Failure::new(StatusCode::NOT_FOUND, ErrorSource::Proxy, "no route"))?
        .clone();
    drop(routing);
    log.route.clone_from(&entry.route.name);
    log.pool.clone_from(&entry.pool.name);

    let upgrade = hygiene::is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let upstream_req = upstream_request(
        ctx,
        req,
        &entry,
        host.as_deref(),
        upgrade,
        log.trace.as_ref(),
    )?;
    // A registered route whose instances are away: wait (bounded) for one to come back.
    let pool = crate::registration::ready_pool(&ctx.state, &entry.pool, ctx.telemetry.metrics())
        .await
        .map_err(|e| {
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorSource::Proxy,
                e.to_string(),
            )
        })?;
    let (mut response, sender, in_flight) = forward(&pool, upstream_req, log).await?;
    log.upstream.clone_from(&in_flight.upstream().address);

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            ctx.shutdown
                .spawn(tunnel(client_upgrade, upstream_upgrade, in_flight));
            drop(sender);
            let (mut parts, _) = response.into_parts();
            hygiene::add_via(&mut parts.headers, Version::HTTP_11);
            return Ok(Response::from_parts(parts, ResponseBody::full("")));
        }
    }
    Ok(client_response(response, sender, in_flight))
}

/// Step 0: an ACME HTTP-01 validation request for an order in progress is answered here,
/// whatever the routes say.
fn acme_challenge(ctx: &ConnContext, req: &Request<Incoming>) -> Option<Response<ResponseBody>> {
    let path = req.uri().path();
    if !path.starts_with(crate::tls::HTTP01_PREFIX) {
        return None;
    }
    let answer = ctx.tls.http01_answer(path)?;
    let mut response = Response::new(ResponseBody::full(answer));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Some(response)
}

/// Step 1: refuse what cannot be forwarded safely.
fn check_request(ctx: &ConnContext, req: &Request<Incoming>) -> Result<(), Failure> {
    // Requests declaring both body lengths never get here: the framing scanner below
    // hyper makes hyper refuse them (see `framing`).
    hygiene::check_framing(req.headers())
        .map_err(|r| Failure::new(StatusCode::BAD_REQUEST, ErrorSource::Downstream, r))?;
    hygiene::check_header_names(req.headers())
        .map_err(|r| Failure::new(StatusCode::BAD_REQUEST, ErrorSource::Downstream, r))?;
    hygiene::check_host(req.uri(), req.headers())
        .map_err(|r| Failure::new(StatusCode::BAD_REQUEST, ErrorSource::Downstream, r))?;
    if req.version() == Version::HTTP_11
        && !req.headers().contains_key(header::HOST)
        && req.uri().host().is_none()
    {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorSource::Downstream,
            "HTTP/1.1 request without Host",
        ));
    }
    if req.version() == Version::HTTP_10 && req.headers().contains_key(header::TRANSFER_ENCODING) {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorSource::Downstream,
            "Transfer-Encoding in an HTTP/1.0 request",
        ));
    }
    let limit = ctx.listener.max_body_bytes;
    if limit > 0 {
        match hygiene::content_length(req.headers()) {
            Some(n) if n > limit => {
                return Err(Failure::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorSource::Downstream,
                    format!("Content-Length {n} exceeds {limit}"),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Step 2: the request as the upstream gets it.
fn upstream_request(
    ctx: &ConnContext,
    req: Request<Incoming>,
    entry: &RouteEntry,
    host: Option<&str>,
    upgrade: bool,
    trace: Option<&opentelemetry::Context>,
) -> Result<Request<RequestBody>, Failure> {
    let (mut parts, body) = req.into_parts();
    let received_version = parts.version;
    // An authority in the target (absolute-form, or HTTP/2's :authority) is the one the
    // client means: it replaces any Host header, as RFC 9112 section 3.2.2 and RFC 9113
    // section 8.3.1 say. Upstreams speak HTTP/1.1 and get it as Host.
    if let Some(authority) = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, authority);
    }
    // The path is forwarded byte for byte (no normalisation); only a matched prefix may go.
    let original = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let forwarded = match (&entry.route.path, entry.route.strip_prefix) {
        (PathMatch::Prefix(prefix), true) if prefix != "/" => {
            let rest = original
                .get(prefix.trim_end_matches('/').len()..)
                .unwrap_or("");
            if rest.starts_with('/') {
                rest.to_string()
            } else {
                format!("/{rest}")
            }
        }
        _ => original.to_string(),
    };
    parts.uri = forwarded.parse::<Uri>().map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorSource::Downstream,
            format!("request target: {e}"),
        )
    })?;
    parts.version = Version::HTTP_11;
    hygiene::strip_hop_by_hop(&mut parts.headers, upgrade);
    hygiene::add_forwarding(&mut parts.headers, ctx.client.ip(), ctx.scheme, host);
    hygiene::add_via(&mut parts.headers, received_version);
    // Same trace, with this request's span as the upstream's parent.
    if let (Some(cx), Some(tracing)) = (trace, ctx.telemetry.tracing()) {
        tracing.inject(cx, &mut parts.headers);
    }
    Ok(Request::from_parts(
        parts,
        RequestBody::streaming(body, ctx.listener.max_body_bytes),
    ))
}

/// Step 3: pick an upstream, reuse or open a connection, send, wait for the response head.
/// Connection failures move on to the next candidate: the request has not been sent yet.
async fn forward(
    pool: &PoolRuntime,
    req: Request<RequestBody>,
    log: &AccessLog,
) -> Result<(Response<Incoming>, HttpSender, InFlight), Failure> {
    let candidates = pool.candidates().map_err(|e| match e {
        NoUpstream::Empty => Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorSource::Proxy,
            "pool has no upstreams",
        ),
        NoUpstream::NoneHealthy => Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorSource::Proxy,
            "no healthy upstream",
        ),
    })?;
    let mut pending = Some(req);
    let mut last: Option<ConnectError> = None;
    for upstream in candidates {
        let in_flight = upstream.start();
        let mut sender = match upstream.take_idle() {
            Some(s) => s,
            None => match dial(&upstream, pool, log.telemetry.metrics()).await {
                Ok(s) => s,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            },
        };
        let sent_at = Instant::now();
        // A pooled connection may have been closed by the upstream while idle; hyper then
        // hands the unsent request back and we retry once on a fresh connection.
        let result = loop {
            let Some(req) = pending.take() else {
                break Err(None);
            };
            let attempt =
                tokio::time::timeout(pool.response_timeout, sender.try_send_request(req)).await;
            match attempt {
                Err(_) => {
                    return Err(Failure::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        ErrorSource::Upstream,
                        format!(
                            "{} sent no response head within {:?}",
                            upstream.address, pool.response_timeout
                        ),
                    ))
                }
                Ok(Ok(response)) => break Ok(response),
                Ok(Err(mut e)) => match e.take_message() {
                    Some(unsent) => {
                        pending = Some(unsent);
                        match dial(&upstream, pool, log.telemetry.metrics()).await {
                            Ok(fresh) => sender = fresh,
                            Err(err) => break Err(Some(err)),
                        }
                    }
                    None => return Err(send_failure(&upstream, e.into_error())),
                },
            }
        };
        match result {
            Ok(response) => {
                let _ = log
                    .upstream_us
                    .set(u64::try_from(sent_at.elapsed().as_micros()).unwrap_or(u64::MAX));
                upstream.clear_ejection();
                return Ok((response, sender, in_flight));
            }
            Err(err) => {
                // The request was handed back unsent, so another upstream may take it.
                last = err;
            }
        }
    }
    Err(connect_failure(last))
}

async fn dial(
    upstream: &Arc<UpstreamRuntime>,
    pool: &PoolRuntime,
    metrics: &Metrics,
) -> Result<HttpSender, ConnectError> {
    let started = Instant::now();
    let result = async {
        let stream = pool.open(&upstream.address, pool.connect_timeout).await?;
        http_sender(&upstream.address, stream).await
    }
    .await;
    match &result {
        Ok(_) => metrics.upstream_connected(&pool.name, started.elapsed()),
        Err(_) => metrics.upstream_connect_failed(&pool.name),
    }
    if let Err(e) = &result {
        upstream.eject();
        tracing::warn!(pool = %pool.name, upstream = %upstream.address, error = %e, "upstream connection failed");
    }
    result
}

fn connect_failure(last: Option<ConnectError>) -> Failure {
    match last {
        Some(e) if e.is_timeout() => Failure::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorSource::Upstream,
            e.to_string(),
        ),
        Some(e) => Failure::new(
            StatusCode::BAD_GATEWAY,
            ErrorSource::Upstream,
            e.to_string(),
        ),
        None => Failure::new(
            StatusCode::BAD_GATEWAY,
            ErrorSource::Upstream,
            "no upstream could be reached",
        ),
    }
}

fn send_failure(upstream: &UpstreamRuntime, err: hyper::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if e.is::<BodyTooLarge>() {
            return Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorSource::Downstream,
                e.to_string(),
            );
        }
        if e.is::<ClientBodyError>() {
            return Failure::new(
                StatusCode::BAD_REQUEST,
                ErrorSource::Downstream,
                e.to_string(),
            );
        }
        source = e.source();
    }
    Failure::new(
        StatusCode::BAD_GATEWAY,
        ErrorSource::Upstream,
        format!("{} failed during the exchange: {err}", upstream.address),
    )
}

/// Step 4: the response as the client gets it.
fn client_response(
    response: Response<Incoming>,
    sender: HttpSender,
    in_flight: InFlight,
) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    hygiene::strip_hop_by_hop(&mut parts.headers, false);
    hygiene::add_via(&mut parts.headers, parts.version);
    Response::from_parts(
        parts,
        ResponseBody::upstream(body, Some(Reuse::new(sender, in_flight))),
    )
}

/// Joins the client and upstream connections after a `101 Switching Protocols`.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    in_flight: InFlight,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, upstream = %in_flight.upstream().address, "upgraded connection ended with an error");
    }
}
