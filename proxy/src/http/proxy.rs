//! The request path, as a short list of named steps:
//! `check_request` -> `route` -> `upstream_request` -> `forward` -> `client_response`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use super::access_log::{AccessLog, ErrorSource};
use super::body::{grpc_message, grpc_status, ResponseBody, Reuse};
use super::framing::HeadProgress;
use super::h1::ClientUpgrade;
use super::hygiene::{self, Known, Present};
use super::per_ip::RequestRatePerIp;
use crate::boxed;
use crate::config::ListenerConfig;
use crate::routing::Published;
use crate::routing::RouteEntry;
use crate::shutdown::Shutdown;
use crate::telemetry::{ClientTimeout, ListenerSeries, Metrics};
use crate::upstream::body::{
    BodySent, BodyTimeout, BodyTooLarge, ClientBody, ClientBodyError, RequestBody,
};
use crate::upstream::h1::{H1Body, H1Error};
use crate::upstream::h2::{self, H2Conn, H2Stream};
use crate::upstream::{
    h2_sender, idle, ConnectError, H1Conn, InFlight, NoUpstream, OpenConnection, PoolRuntime,
    UpstreamRuntime,
};

/// What every connection of one listener shares, made once per listener (per worker):
/// a new connection takes one reference to it instead of one to each part.
pub(crate) struct ListenerContext {
    pub listener: Arc<ListenerConfig>,
    pub state: Published,
    pub shutdown: Shutdown,
    /// `http` or `https`: what the client spoke, for X-Forwarded-Proto.
    pub scheme: &'static str,
    /// Answers ACME HTTP-01 challenges before routing.
    pub tls: Arc<crate::tls::Tls>,
    /// Metrics, access log settings and request tracing.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// The listener's connection counters.
    pub series: ListenerSeries,
    /// The listener's per-client-address request rate limit, if it has one.
    pub rate: Option<Arc<RequestRatePerIp>>,
}

impl std::fmt::Debug for ListenerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerContext")
            .field("listener", &self.listener.name)
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

/// What every request on one client connection shares; the listener's parts are reached
/// through it (`ctx.listener`, `ctx.telemetry`, ...).
pub(crate) struct ConnContext {
    shared: Arc<ListenerContext>,
    pub client: SocketAddr,
    /// The client's address as the forwarding headers show it.
    pub forwarded: hygiene::ForwardedClient,
    /// Where the client is in its requests (see [`HeadProgress`]).
    pub progress: HeadProgress,
}

impl ConnContext {
    /// The context of a connection from `client` on the listener of `shared`.
    pub fn new(shared: Arc<ListenerContext>, client: SocketAddr) -> ConnContext {
        ConnContext {
            shared,
            client,
            forwarded: hygiene::ForwardedClient::new(client.ip()),
            progress: HeadProgress::default(),
        }
    }

    /// The context of a parked connection's next busy spell: a connection parks holding
    /// only its listener's context and the client's address (this is rebuilt from them
    /// when its next request comes), and it parks only after a request.
    pub fn resumed(shared: Arc<ListenerContext>, client: SocketAddr) -> ConnContext {
        let ctx = ConnContext::new(shared, client);
        ctx.progress.request_arrived();
        ctx
    }

    /// What every connection of the listener shares.
    pub fn shared(&self) -> &Arc<ListenerContext> {
        &self.shared
    }
}

impl std::ops::Deref for ConnContext {
    type Target = ListenerContext;

    fn deref(&self) -> &ListenerContext {
        &self.shared
    }
}

/// A failed request: status for the client, who failed, and the detail for the log.
struct Failure {
    status: StatusCode,
    source: ErrorSource,
    detail: String,
    /// Seconds for a `Retry-After` header.
    retry_after: Option<u64>,
}

impl Failure {
    fn new(status: StatusCode, source: ErrorSource, detail: impl Into<String>) -> Self {
        Failure {
            status,
            source,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// 429 for a client over its rate limit, which has a token again after `wait`.
    fn rate_limited(wait: std::time::Duration) -> Self {
        // Whole seconds, rounded up: a client that waits that long finds a token.
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Failure {
            retry_after: Some(seconds.max(1)),
            ..Failure::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorSource::Downstream,
                "over the listener's per-client rate limit",
            )
        }
    }
}

/// Handles one request; never fails (errors become responses).
///
/// `ctx` is the connection's context as the caller holds it: an HTTP/1 connection lends
/// it (`&ConnContext`) to the request it serves in its own task, an HTTP/2 stream, a task
/// of its own, brings a share (`Arc`). A share per request was a reference count taken
/// and given back on the connection's context, a cache line no recent request touched:
/// about 1 % of proxyd's CPU time with keep-alive (`perf record`).
#[allow(clippy::manual_async_fn)] // see the block below
pub(crate) fn handle<C>(
    ctx: C,
    req: Request<ClientBody>,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send
where
    C: Deref<Target = ConnContext> + Send,
{
    // An `async move` block rather than an `async fn`, which would keep the request (264
    // bytes) twice in the future: as its argument and as a local.
    async move {
        let ctx: &ConnContext = &ctx;
        ctx.progress.request_arrived();
        let telemetry = &ctx.telemetry;
        // Path, host and headers are only ever shown in the access line.
        let lines = telemetry.access_log_enabled();
        // On the heap from the start (the response body keeps it until it ends): the
        // request's future, which is moved whole several times before it first runs, carries
        // a pointer instead.
        let mut log = Box::new(AccessLog {
            listener: ctx.shared().clone(),
            client: ctx.client,
            method: req.method().clone(),
            path: match (lines, telemetry.include_query()) {
                (false, _) => String::new(),
                (true, true) => req
                    .uri()
                    .path_and_query()
                    .map_or("/", |pq| pq.as_str())
                    .to_string(),
                (true, false) => req.uri().path().to_string(),
            },
            headers: if lines {
                telemetry.headers().render(req.headers())
            } else {
                None
            },
            trace: telemetry
                .tracing()
                .map(|t| t.start(req.method(), req.headers(), &ctx.listener.name)),
            host: String::new(),
            entry: None,
            upstream: None,
            status: 0,
            error: None,
            start: Instant::now(),
            upstream_us: AtomicU64::new(0),
        });
        // Which of the headers the request path looks at are there, from one pass over the
        // names: the others are not looked up.
        let present = hygiene::Present::of(req.headers());
        // The bytes after an upgrade request belong to the upgraded connection, and are not
        // read as HTTP/1; unless the switch happens, the connection must end with this
        // response rather than read them as further requests.
        let upgrade_asked = req.version() < Version::HTTP_2
            && (present.has(Known::Upgrade) || req.method() == http::Method::CONNECT);
        // A gRPC call's `grpc-timeout` bounds the whole call, response body included.
        let grpc = present.has(Known::ContentType) && hygiene::is_grpc(req.headers());
        let deadline = grpc
            .then(|| hygiene::grpc_timeout(req.headers()))
            .flatten()
            .map(|timeout| tokio::time::Instant::now() + timeout);
        let result = match deadline {
            None => proxy(ctx, req, present, &mut log).await,
            // Boxed: a timer beside the request path would make every request's future
            // larger, for the few gRPC calls that carry a timeout.
            Some(at) => Box::pin(tokio::time::timeout_at(
                at,
                proxy(ctx, req, present, &mut log),
            ))
            .await
            .unwrap_or_else(|_| {
                Err(Failure::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    ErrorSource::Upstream,
                    "the call's grpc-timeout passed before the upstream's response head",
                ))
            }),
        };
        let mut grpc_call = grpc.then_some((deadline, None));
        let mut response = match result {
            Ok(response) => {
                if let Some((_, status)) = &mut grpc_call {
                    *status = grpc_status(response.headers());
                }
                response
            }
            Err(failure) if grpc => {
                tracing::debug!(status = %failure.status, detail = %failure.detail, "gRPC call failed");
                let code = grpc_code_of(failure.status);
                grpc_call = Some((None, Some(code)));
                let message = public_reason(&failure);
                log.error = Some((failure.source, failure.detail));
                grpc_failure(code, message)
            }
            Err(failure) => {
                tracing::debug!(status = %failure.status, detail = %failure.detail, "request failed");
                let body = format!(
                    "{} {}: {}\n",
                    failure.status.as_u16(),
                    failure.status.canonical_reason().unwrap_or(""),
                    public_reason(&failure)
                );
                if failure.status == StatusCode::REQUEST_TIMEOUT {
                    ctx.series.timed_out(ClientTimeout::Body);
                }
                log.error = Some((failure.source, failure.detail));
                let mut response = Response::new(ResponseBody::full(body));
                *response.status_mut() = failure.status;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                if let Some(seconds) = failure.retry_after {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                }
                // A client over its rate limit may keep its connection for the next try.
                if failure.source == ErrorSource::Downstream
                    && failure.status != StatusCode::TOO_MANY_REQUESTS
                {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        };
        log.status = response.status().as_u16();
        if (ctx.shutdown.is_triggered() || upgrade_asked)
            && response.status() != StatusCode::SWITCHING_PROTOCOLS
        {
            // Draining, or an upgrade that did not happen: this HTTP/1 connection ends after
            // this response (h2 gets GOAWAY).
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        // The response is finished where it is, not taken apart and put together again.
        let body = response.body_mut();
        if let Some((deadline, status)) = grpc_call {
            body.set_grpc(deadline, status);
        }
        body.set_log(log);
        Ok(response)
    }
}

/// The gRPC status for a request proxyd failed with `status`, following gRPC's own
/// HTTP-to-gRPC mapping where it has one (404 UNIMPLEMENTED; 502, 503 UNAVAILABLE) and
/// naming timeouts DEADLINE_EXCEEDED.
fn grpc_code_of(status: StatusCode) -> u32 {
    match status {
        StatusCode::NOT_FOUND => 12,
        StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::TOO_MANY_REQUESTS => super::body::grpc_code::UNAVAILABLE,
        StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => {
            super::body::grpc_code::DEADLINE_EXCEEDED
        }
        StatusCode::PAYLOAD_TOO_LARGE => 8,
        StatusCode::UNAUTHORIZED => 16,
        StatusCode::FORBIDDEN => 7,
        s if s.is_client_error() => 13,
        _ => 2,
    }
}

/// A gRPC Trailers-Only answer: HTTP 200, the status in the head, no body.
fn grpc_failure(code: u32, message: &str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::empty());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    headers.insert("grpc-message", grpc_message(message));
    response
}

/// The short text shown to clients (details stay in the log).
fn public_reason(failure: &Failure) -> &'static str {
    match failure.status {
        StatusCode::NOT_FOUND => "no route for this host and path",
        StatusCode::BAD_GATEWAY => "the upstream refused or reset the connection",
        StatusCode::SERVICE_UNAVAILABLE => "no healthy upstream",
        StatusCode::GATEWAY_TIMEOUT if failure.detail.contains("grpc-timeout") => {
            "deadline exceeded"
        }
        StatusCode::GATEWAY_TIMEOUT => "the upstream did not answer in time",
        StatusCode::PAYLOAD_TOO_LARGE => "request body too large",
        StatusCode::LENGTH_REQUIRED => "a Content-Length is required",
        StatusCode::TOO_MANY_REQUESTS => "too many requests from this address; retry later",
        _ => "malformed request",
    }
}

// A plain function around an `async move` block: an `async fn` would keep the request (264
// bytes) twice in its future, as its argument and as a local.
#[allow(clippy::manual_async_fn)]
fn proxy<'a>(
    ctx: &'a ConnContext,
    mut req: Request<ClientBody>,
    present: Present,
    log: &'a mut AccessLog,
) -> impl Future<Output = Result<Response<ResponseBody>, Failure>> + Send + 'a {
    async move {
        // Whether the request path waited on anything since the log's start was read.
        let mut waited = false;
        if req.uri().path().starts_with(crate::tls::HTTP01_PREFIX) {
            waited = true;
            // Boxed: in a fleet the answer may come from etcd, a future far larger than the
            // rest of the request path, which only validation requests need.
            if let Some(answer) = Box::pin(acme_challenge(ctx, &req)).await {
                return Ok(answer);
            }
        }
        if let Some(rate) = &ctx.rate {
            if let Err(wait) = rate.take(ctx.client.ip()) {
                ctx.series.rate_limited();
                return Err(Failure::rate_limited(wait));
            }
        }
        let host_header = check_request(ctx, &req, present)?;
        let host = hygiene::request_host_of(req.uri(), host_header);
        if let (Some(h), true) = (&host, ctx.telemetry.access_log_enabled()) {
            log.host.push_str(h.as_str());
        }
        // Borrowed from the current table without touching its reference count (shared by
        // every worker); only the matched entry is kept.
        let entry = ctx
            .state
            .with_routing(|routing| {
                routing
                    .lookup(
                        &ctx.listener.name,
                        host.as_ref().map_or("", hygiene::RequestHost::as_str),
                        req.uri().path(),
                    )
                    .cloned()
            })
            .ok_or_else(|| Failure::new(StatusCode::NOT_FOUND, ErrorSource::Proxy, "no route"))?;
        // Held by the log (its route and pool name the request's metrics) and borrowed from
        // there: one reference count change per request on an entry every worker shares.
        let entry = &**log.entry.insert(entry);

        let upgrade = present.has(Known::Upgrade) && hygiene::is_upgrade(req.headers());
        // The client's stream after the switch, from the HTTP/1 codec.
        let client_upgrade = upgrade
            .then(|| req.extensions_mut().remove::<ClientUpgrade>())
            .flatten();
        // Where the request stays while it is forwarded, sent from here.
        let mut pending = Some(upstream_request(
            ctx,
            req,
            entry,
            host.as_ref(),
            upgrade,
            present,
            log.trace.as_ref(),
        )?);
        // A registered route whose instances are away: wait (bounded) for one to come back.
        let pool = crate::registration::ready_pool(entry.pool_slot(), ctx.telemetry.metrics())
            .await
            .map_err(|e| {
                Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorSource::Proxy,
                    e.to_string(),
                )
            })?;
        // Only a registered route's pool may have waited for an instance.
        waited |= pool.hold.is_some();
        let began = (!waited).then_some(log.start);
        let (mut parts, held, in_flight) = forward(&pool, &mut pending, log, began).await?;
        // Only the access line and the span name the upstream.
        if ctx.telemetry.access_log_enabled() || log.trace.is_some() {
            log.upstream = Some(in_flight.upstream().clone());
        }

        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = match held {
                Held::Http1(body) => body.into_tunnel(),
                Held::H2(..) => None,
            };
            let (Some(client_upgrade), Some(upstream)) = (client_upgrade, upstream) else {
                return Err(Failure::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorSource::Upstream,
                    "the upstream switched protocols on a request that asked for no upgrade",
                ));
            };
            ctx.shutdown
                .spawn(tunnel(client_upgrade, upstream, in_flight));
            hygiene::add_via(&mut parts.headers, Version::HTTP_11, Present::ALL);
            return Ok(Response::from_parts(parts, ResponseBody::full("")));
        }
        Ok(client_response(parts, held, in_flight, &pool))
    }
}

/// Step 0: an ACME HTTP-01 validation request for an order in progress is answered here,
/// whatever the routes say.
async fn acme_challenge(
    ctx: &ConnContext,
    req: &Request<ClientBody>,
) -> Option<Response<ResponseBody>> {
    let path = req.uri().path();
    if !path.starts_with(crate::tls::HTTP01_PREFIX) {
        return None;
    }
    let answer = ctx.tls.http01_answer(path).await?;
    let mut response = Response::new(ResponseBody::full(answer));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Some(response)
}

/// Step 1: refuse what cannot be forwarded safely. Gives the request's `Host` header.
fn check_request<'r>(
    ctx: &ConnContext,
    req: &'r Request<ClientBody>,
    present: Present,
) -> Result<Option<&'r HeaderValue>, Failure> {
    // HTTP/1 requests declaring both body lengths never get here: the codec refuses them
    // (see `h1`).
    if present.has(Known::ContentLength) || present.has(Known::TransferEncoding) {
        hygiene::check_framing(req.headers())
            .map_err(|r| Failure::new(StatusCode::BAD_REQUEST, ErrorSource::Downstream, r))?;
    }
    hygiene::check_header_names(req.headers())
        .map_err(|r| Failure::new(StatusCode::BAD_REQUEST, ErrorSource::Downstream, r))?;
    let host = hygiene::check_host(req.uri(), req.headers())
        .map_err(|r| Failure::new(StatusCode::BAD_REQUEST, ErrorSource::Downstream, r))?;
    if req.version() == Version::HTTP_11 && host.is_none() && req.uri().host().is_none() {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorSource::Downstream,
            "HTTP/1.1 request without Host",
        ));
    }
    if req.version() == Version::HTTP_10 && present.has(Known::TransferEncoding) {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorSource::Downstream,
            "Transfer-Encoding in an HTTP/1.0 request",
        ));
    }
    let limit = ctx.listener.max_body_bytes;
    if limit > 0 && present.has(Known::ContentLength) {
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
    Ok(host)
}

/// Step 2: the request as the upstream gets it. `upgrade`: it asks to switch protocols;
/// `present`: the known headers it came with.
fn upstream_request(
    ctx: &ConnContext,
    req: Request<ClientBody>,
    entry: &RouteEntry,
    host: Option<&hygiene::RequestHost>,
    upgrade: bool,
    present: Present,
    trace: Option<&opentelemetry::Context>,
) -> Result<Request<RequestBody>, Failure> {
    let (mut parts, body) = req.into_parts();
    let received_version = parts.version;
    // Room for every header added below at once: a map filled to its capacity grows
    // (allocating and rehashing) on the next insert, once or twice per request.
    parts.headers.reserve(hygiene::ADDED_REQUEST_HEADERS);
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
    let stripped = entry.strip(original);
    let target_error = |e: &dyn std::fmt::Display| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            ErrorSource::Downstream,
            format!("request target: {e}"),
        )
    };
    parts.uri = match stripped {
        Some(path) => path.parse::<Uri>().map_err(|e| target_error(&e))?,
        // Already origin-form: kept as parsed.
        None if parts.uri.scheme().is_none() && parts.uri.authority().is_none() => {
            if parts.uri.path_and_query().is_some() {
                parts.uri
            } else {
                Uri::from_static("/")
            }
        }
        // Absolute-form (or HTTP/2): its path and query, parsed already.
        None => {
            let mut origin = http::uri::Parts::default();
            origin.path_and_query = Some(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            );
            Uri::from_parts(origin).map_err(|e| target_error(&e))?
        }
    };
    parts.version = Version::HTTP_11;
    if present.has(Known::Te) && hygiene::accepts_trailers(&parts.headers) {
        parts.extensions.insert(hygiene::TeTrailers);
    }
    hygiene::strip_hop_by_hop(&mut parts.headers, upgrade, present);
    hygiene::add_forwarding(
        &mut parts.headers,
        &ctx.forwarded,
        ctx.scheme,
        host,
        present,
    );
    hygiene::add_via(&mut parts.headers, received_version, present);
    // Same trace, with this request's span as the upstream's parent.
    if let (Some(cx), Some(tracing)) = (trace, ctx.telemetry.tracing()) {
        tracing.inject(cx, &mut parts.headers);
    }
    Ok(Request::from_parts(
        parts,
        RequestBody::streaming(
            body,
            ctx.listener.max_body_bytes,
            entry.pool_slot().load().policy.body_timeout,
        ),
    ))
}

/// The upstream's response body and what it holds until it ends.
// The HTTP/1.1 body carries its connection (socket and buffers) inline: boxing it would
// cost an allocation on every HTTP/1.1 request, to save a move of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
enum Held {
    /// Read from an HTTP/1.1 connection (kept for reuse afterwards).
    Http1(H1Body),
    /// A stream on a multiplexed HTTP/2 connection.
    H2(Incoming, H2Stream),
}

/// A response head from an upstream, with its body.
type Answer = (http::response::Parts, Held, InFlight);

/// A request's state across the upstreams it tries.
struct Attempt<'a> {
    pool: &'a PoolRuntime,
    metrics: &'a Metrics,
    log: &'a AccessLog,
    budget: Attempts,
    /// The request, while it can still be sent: in the request path's own slot, not
    /// moved into forwarding (see `H1Conn::send`).
    pending: &'a mut Option<Request<RequestBody>>,
    body_sent: Option<Arc<BodySent>>,
    last: Option<ConnectError>,
    full: bool,
    /// The clock reading forwarding began with, until a step uses it: the first look
    /// into the idle store and the send on a kept connection follow it without waiting on
    /// anything, so one reading serves the deadline, the idle check and the send time.
    now: Option<Instant>,
}

impl Attempt<'_> {
    /// The current time: the reading forwarding began with, if no step used it yet.
    fn now(&mut self) -> Instant {
        self.now.take().unwrap_or_else(Instant::now)
    }
}

/// What trying one upstream gave.
// Large for the same reason as `Held`, which it carries.
#[allow(clippy::large_enum_variant)]
enum Step {
    /// A response, or a failure that ends the request.
    Done(Result<Answer, Failure>),
    /// On to the next candidate.
    Next,
    /// No attempts or time left: stop trying.
    Stop,
    /// ALPN chose the other HTTP version (`protocol = "auto"`): try this upstream again.
    Switch(InFlight),
}

/// Step 3: pick an upstream, reuse or open a connection, send, wait for the response head.
///
/// Connection failures move on to the next candidate (the request has not been sent yet),
/// within the pool's attempt budget and one connect deadline for the whole request. A kept
/// connection that fails before any response byte arrived is retried once on a fresh
/// connection when the request can be sent again: hyper handed it back unsent, or it is
/// idempotent and has no body. On HTTP/2, a request the upstream did not process (handed
/// back unsent, or refused by GOAWAY or REFUSED_STREAM) goes to another connection.
///
/// `began` is the reading the request began with (its log's start) when nothing waited
/// since: checking, routing and rewriting the request took microseconds, so it serves as
/// forwarding's first reading too (the send time of a kept connection then includes
/// them).
async fn forward(
    pool: &PoolRuntime,
    pending: &mut Option<Request<RequestBody>>,
    log: &AccessLog,
    began: Option<Instant>,
) -> Result<Answer, Failure> {
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
    let policy = &pool.policy;
    let body_sent = pending.as_ref().and_then(|req| req.body().sent());
    let now = began.unwrap_or_else(Instant::now);
    let mut attempt = Attempt {
        pool,
        metrics: log.listener.telemetry.metrics(),
        log,
        budget: Attempts {
            left: policy.max_attempts,
            deadline: now + policy.connect_deadline,
        },
        pending,
        body_sent,
        last: None,
        full: false,
        now: Some(now),
    };
    for upstream in candidates {
        let mut in_flight = upstream.start();
        // At most one switch of HTTP version per upstream and request.
        for _ in 0..2 {
            let h2 = pool
                .speaks_h2()
                .unwrap_or_else(|| upstream.negotiated_h2() != Some(false));
            let step = if h2 {
                // Boxed: an HTTP/2 exchange is a larger future than an HTTP/1.1 one, and
                // inline it would size every request's future, whatever its upstream.
                boxed::pinned(|| forward_h2(&mut attempt, upstream, in_flight)).await
            } else {
                forward_http1(&mut attempt, upstream, in_flight).await
            };
            match step {
                Step::Done(result) => return result,
                Step::Next => break,
                Step::Stop => return Err(connect_failure(attempt.last, attempt.full)),
                Step::Switch(back) => in_flight = back,
            }
        }
    }
    Err(connect_failure(attempt.last, attempt.full))
}

/// One upstream over HTTP/1.1: a kept connection or a new one, one retry when a kept one
/// turns out stale.
async fn forward_http1(
    a: &mut Attempt<'_>,
    upstream: &Arc<UpstreamRuntime>,
    in_flight: InFlight,
) -> Step {
    let pool = a.pool;
    let policy = &pool.policy;
    let key = pool.conn_key(&upstream.address);
    let now = a.now();
    // The send time is the idle check's reading when a kept connection takes the
    // request at once; after a dial it is read again.
    let (mut conn, mut sent_at) = match idle::take(key, upstream, policy.idle_timeout, now) {
        Some(conn) => (conn, Some(now)),
        None => match a.budget.dial(upstream, pool, a.metrics).await {
            Dialed::Http1(conn) => (conn, None),
            Dialed::H2(conn) => {
                h2::keep(key, conn);
                return Step::Switch(in_flight);
            }
            Dialed::None(why) => return a.no_connection(why),
        },
    };
    let mut retried = false;
    loop {
        if a.pending.is_none() {
            return Step::Next;
        }
        let reused = conn.reused();
        let sent_at = sent_at.take().unwrap_or_else(Instant::now);
        // The request stays in `a.pending` (see `H1Conn::send`).
        let sent = match a.body_sent.as_deref() {
            // Without a body the wait starts now, on the connection's own timer.
            None => {
                let due = sent_at.checked_add(pool.response_timeout);
                match conn.send(a.pending, due).await {
                    Ok(response) => Sent::Response(response),
                    Err(e) if matches!(e.error, H1Error::HeadTimedOut) => Sent::TimedOut,
                    Err(e) => Sent::Failed(e),
                }
            }
            Some(body_sent) => {
                // Pinned where it is made: `send` holds a pointer to the exchange rather
                // than moving the whole future (connection, buffers) into itself.
                let exchange = std::pin::pin!(conn.send(a.pending, None));
                send(exchange, Some(body_sent), pool.response_timeout, sent_at).await
            }
        };
        match sent {
            Sent::Response(response) => {
                let (parts, body) = response.into_parts();
                answered(a, upstream, sent_at, parts.status);
                return Step::Done(Ok((parts, Held::Http1(body), in_flight)));
            }
            Sent::TimedOut => return Step::Done(Err(response_timed_out(pool, upstream))),
            Sent::Failed(e) => {
                // Never written: it can go as it is. Written without a body and not
                // answered at all: again only on a fresh connection after a kept one
                // failed, and only if that cannot do harm.
                let again = match &*a.pending {
                    Some(_) if e.unsent => true,
                    Some(req) if reused && can_resend(req) => {
                        tracing::debug!(upstream = %upstream.address, error = %e.error, "kept connection failed before any response byte; retrying on a fresh one");
                        true
                    }
                    _ => false,
                };
                if !again {
                    return Step::Done(Err(exchange_failed(pool, upstream, &e.error)));
                }
            }
        }
        // The request can go again: once more on a fresh connection to this upstream,
        // then on to the next candidate.
        if retried {
            return Step::Next;
        }
        retried = true;
        match a.budget.dial(upstream, pool, a.metrics).await {
            Dialed::Http1(fresh) => conn = fresh,
            Dialed::H2(fresh) => {
                h2::keep(key, fresh);
                return Step::Switch(in_flight);
            }
            // Out of attempts on the retry itself: the request ends here.
            Dialed::None(NoConnection::Exhausted(e)) => {
                return Step::Done(Err(connect_failure(e.or(a.last.take()), false)));
            }
            Dialed::None(why) => return a.no_connection(why),
        }
    }
}

/// Times one request may come back unprocessed from HTTP/2 connections of one upstream
/// (GOAWAY, REFUSED_STREAM) before the next upstream is tried.
const H2_RESENDS: u32 = 3;

/// One upstream over HTTP/2: a stream on one of this thread's connections to it, or on a
/// new one.
async fn forward_h2(
    a: &mut Attempt<'_>,
    upstream: &Arc<UpstreamRuntime>,
    in_flight: InFlight,
) -> Step {
    let pool = a.pool;
    // Waits below (a dial, a pick) leave forwarding's first reading stale.
    a.now = None;
    let key = pool.conn_key(&upstream.address);
    let want = usize::try_from(pool.policy.h2_connections).unwrap_or(1);
    let mut resends = 0;
    loop {
        let conn = match h2::pick(key, upstream, want) {
            h2::Pick::Use(conn) => conn,
            h2::Pick::Wait(changed) => {
                changed.notified().await;
                continue;
            }
            h2::Pick::Dial(ticket) => match a.budget.dial(upstream, pool, a.metrics).await {
                Dialed::H2(conn) => {
                    ticket.finish(Some(conn.clone()));
                    conn
                }
                Dialed::Http1(conn) => {
                    drop(ticket);
                    idle::put(key, conn, Instant::now(), pool.policy.idle_timeout);
                    return Step::Switch(in_flight);
                }
                Dialed::None(why) => return a.no_connection(why),
            },
        };
        let Some(mut req) = a.pending.take() else {
            return Step::Next;
        };
        hygiene::to_h2_request(&mut req, pool.conn_key("").tls != 0, &upstream.address);
        let copy = can_resend(&req).then(|| copy_request(&req));
        let stream = conn.open_stream(pool.policy.h2_idle_timeout);
        let mut sender = conn.sender.clone();
        let sent_at = Instant::now();
        let exchange = std::pin::pin!(sender.try_send_request(req));
        match send(
            exchange,
            a.body_sent.as_deref(),
            pool.response_timeout,
            sent_at,
        )
        .await
        {
            Sent::Response(response) => {
                let (parts, body) = response.into_parts();
                answered(a, upstream, sent_at, parts.status);
                return Step::Done(Ok((parts, Held::H2(body, stream), in_flight)));
            }
            Sent::TimedOut => return Step::Done(Err(response_timed_out(pool, upstream))),
            Sent::Failed(mut e) => {
                drop(stream);
                let unsent = match e.take_message() {
                    Some(unsent) => unsent,
                    None => {
                        let error = e.into_error();
                        match copy.filter(|_| not_processed(&error)) {
                            Some(copy) => {
                                tracing::debug!(upstream = %upstream.address, error = %error, "upstream did not process the request (GOAWAY or refused stream); sending it again");
                                copy
                            }
                            None => {
                                return Step::Done(Err(exchange_failed(pool, upstream, &error)))
                            }
                        }
                    }
                };
                *a.pending = Some(unsent);
                resends += 1;
                if resends >= H2_RESENDS {
                    return Step::Next;
                }
            }
        }
    }
}

/// Whether an HTTP/2 exchange failed in a way that tells the upstream never processed the
/// request: a stream above a GOAWAY's last stream id, or REFUSED_STREAM (RFC 9113
/// sections 6.8 and 8.7).
fn not_processed(err: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<::h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(::h2::Reason::REFUSED_STREAM);
        }
        source = e.source();
    }
    false
}

/// Books a response head from `upstream`: timing, passive health.
fn answered(
    a: &Attempt<'_>,
    upstream: &Arc<UpstreamRuntime>,
    sent_at: Instant,
    status: StatusCode,
) {
    a.log.upstream_us.store(
        u64::try_from(sent_at.elapsed().as_micros()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    if a.pool.policy.outlier.on_5xx && status.is_server_error() {
        upstream.record_failure(a.pool);
    } else {
        upstream.record_success();
    }
}

fn response_timed_out(pool: &PoolRuntime, upstream: &UpstreamRuntime) -> Failure {
    upstream.record_failure(pool);
    Failure::new(
        StatusCode::GATEWAY_TIMEOUT,
        ErrorSource::Upstream,
        format!(
            "{} sent no response head within {:?}",
            upstream.address, pool.response_timeout
        ),
    )
}

fn exchange_failed(
    pool: &PoolRuntime,
    upstream: &UpstreamRuntime,
    error: &(dyn std::error::Error + 'static),
) -> Failure {
    let failure = send_failure(upstream, error);
    if failure.source == ErrorSource::Upstream {
        upstream.record_failure(pool);
    }
    failure
}

/// What one send on a connection gave.
enum Sent<R, E> {
    Response(R),
    Failed(E),
    TimedOut,
}

/// Waits for the response head of `exchange`: at most `response_timeout` from the moment
/// the request body (if any) was sent in full; without a body, from `sent_at` (the
/// caller's clock reading as it sent, so the timer needs none of its own).
async fn send<R, E>(
    exchange: impl std::future::Future<Output = Result<R, E>>,
    body_sent: Option<&BodySent>,
    response_timeout: std::time::Duration,
    sent_at: Instant,
) -> Sent<R, E> {
    let result = match body_sent {
        None => match sent_at.checked_add(response_timeout) {
            Some(due) => tokio::time::timeout_at(due.into(), exchange).await.ok(),
            // Beyond what the clock can hold: no limit in practice.
            None => Some(exchange.await),
        },
        Some(body_sent) => {
            tokio::select! {
                r = exchange => Some(r),
                _ = async {
                    body_sent.wait().await;
                    tokio::time::sleep(response_timeout).await;
                } => None,
            }
        }
    };
    match result {
        None => Sent::TimedOut,
        Some(Ok(response)) => Sent::Response(response),
        Some(Err(e)) => Sent::Failed(e),
    }
}

/// Whether a request may be sent again after a kept connection failed under it: an
/// idempotent method (RFC 9110 §9.2.2) and no body (so it can be rebuilt).
fn can_resend(req: &Request<RequestBody>) -> bool {
    use http::Method;
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    idempotent && http_body::Body::is_end_stream(req.body())
}

/// A copy of a request without body, for a retry.
fn copy_request(req: &Request<RequestBody>) -> Request<RequestBody> {
    let mut copy = Request::new(RequestBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// A request's budget for new connections: attempts left and one deadline.
struct Attempts {
    left: u32,
    deadline: Instant,
}

/// A new connection, as the upstream's protocol made it.
enum Dialed {
    Http1(Box<H1Conn>),
    H2(H2Conn),
    None(NoConnection),
}

/// Why a dial gave no connection.
enum NoConnection {
    Failed(ConnectError),
    /// The upstream is at `max_connections_per_upstream`.
    Full,
    /// No attempts or time left (with the deadline's timeout, if that was it).
    Exhausted(Option<ConnectError>),
}

impl Attempt<'_> {
    /// Records why a dial gave no connection and says where the request goes next.
    fn no_connection(&mut self, why: NoConnection) -> Step {
        match why {
            NoConnection::Failed(e) => {
                self.last = Some(e);
                Step::Next
            }
            NoConnection::Full => {
                self.full = true;
                Step::Next
            }
            NoConnection::Exhausted(e) => {
                self.last = e.or(self.last.take());
                Step::Stop
            }
        }
    }
}

impl Attempts {
    /// Opens a connection to `upstream`, HTTP/2 or HTTP/1.1 as the pool's protocol (or,
    /// with `auto`, ALPN) says.
    async fn dial(
        &mut self,
        upstream: &Arc<UpstreamRuntime>,
        pool: &PoolRuntime,
        metrics: &Metrics,
    ) -> Dialed {
        if self.left == 0 {
            return Dialed::None(NoConnection::Exhausted(None));
        }
        let now = Instant::now();
        if now >= self.deadline {
            return Dialed::None(NoConnection::Exhausted(Some(ConnectError::Timeout {
                address: upstream.address.clone(),
                timeout: pool.policy.connect_deadline,
            })));
        }
        let Some(open) = upstream.open_connection(pool.policy.max_connections_per_upstream) else {
            return Dialed::None(NoConnection::Full);
        };
        self.left -= 1;
        let timeout = pool.connect_timeout.min(self.deadline - now);
        // Boxed: opening a connection (TCP, TLS, the HTTP handshake) is a future of
        // kilobytes that most requests, served on a kept connection, never run. Inline it
        // would be part of every request's future, which an HTTP/2 stream's task
        // allocates and copies whole.
        match boxed::pinned(|| dial(upstream, pool, metrics, open, timeout)).await {
            Ok(dialed) => dialed,
            Err(e) => Dialed::None(NoConnection::Failed(e)),
        }
    }
}

async fn dial(
    upstream: &Arc<UpstreamRuntime>,
    pool: &PoolRuntime,
    metrics: &Metrics,
    open: OpenConnection,
    timeout: std::time::Duration,
) -> Result<Dialed, ConnectError> {
    let started = Instant::now();
    let result = async {
        let stream = pool.open(&upstream.address, timeout).await?;
        // `auto`: ALPN decides.
        let h2 = match pool.speaks_h2() {
            Some(fixed) => fixed,
            None => {
                let negotiated = stream.negotiated_h2();
                upstream.set_negotiated_h2(negotiated);
                negotiated
            }
        };
        if h2 {
            h2_sender(
                &upstream.address,
                stream,
                Some(open),
                pool.policy.h2_keepalive,
                pool.policy.h2_idle_timeout,
            )
            .await
            .map(Dialed::H2)
        } else {
            Ok(Dialed::Http1(H1Conn::new(stream, Some(open))))
        }
    }
    .await;
    match &result {
        Ok(_) => metrics.upstream_connected(&pool.name, started.elapsed()),
        Err(_) => metrics.upstream_connect_failed(&pool.name),
    }
    if let Err(e) = &result {
        upstream.record_failure(pool);
        tracing::warn!(pool = %pool.name, upstream = %upstream.address, error = %e, "upstream connection failed");
    }
    result
}

fn connect_failure(last: Option<ConnectError>, full: bool) -> Failure {
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
        None if full => Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorSource::Proxy,
            "every upstream is at max_connections_per_upstream",
        ),
        None => Failure::new(
            StatusCode::BAD_GATEWAY,
            ErrorSource::Upstream,
            "no upstream could be reached",
        ),
    }
}

fn send_failure(upstream: &UpstreamRuntime, err: &(dyn std::error::Error + 'static)) -> Failure {
    let mut source = Some(err);
    while let Some(e) = source {
        if e.is::<BodyTooLarge>() {
            return Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorSource::Downstream,
                e.to_string(),
            );
        }
        if e.is::<BodyTimeout>() {
            return Failure::new(
                StatusCode::REQUEST_TIMEOUT,
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
    mut parts: http::response::Parts,
    held: Held,
    in_flight: InFlight,
    pool: &PoolRuntime,
) -> Response<ResponseBody> {
    let present = Present::of(&parts.headers);
    hygiene::strip_hop_by_hop(&mut parts.headers, false, present);
    hygiene::add_via(&mut parts.headers, parts.version, present);
    let body = match held {
        Held::Http1(body) => {
            let reuse = Reuse::new(in_flight, pool.conn_key("").tls, pool.policy.idle_timeout);
            ResponseBody::http1(body, Some(reuse))
        }
        Held::H2(body, stream) => ResponseBody::upstream(body, Some(Reuse::h2(stream, in_flight))),
    };
    Response::from_parts(parts, body)
}

/// Joins the client and upstream connections after a `101 Switching Protocols`.
async fn tunnel(client: ClientUpgrade, upstream: Box<H1Conn>, in_flight: InFlight) {
    let Some(mut client) = client.stream().await else {
        tracing::debug!("upgrade failed: the client connection ended before the switch");
        return;
    };
    if let Err(e) = upstream.tunnel(&mut client).await {
        tracing::debug!(error = %e, upstream = %in_flight.upstream().address, "upgraded connection ended with an error");
    }
}
