//! Body types: request bodies streamed to upstreams with a size limit, and response bodies
//! streamed to clients that return the upstream connection for reuse and write the access
//! log line when they end.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use thiserror::Error;
use tokio::sync::Notify;
use tokio::time::Sleep;

use super::access_log::AccessLog;
use crate::upstream::{idle, InFlight, UpstreamConn};

/// Errors of our body types.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body grew past the listener's `max_body_bytes`.
#[derive(Debug, Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// Reading the client's request body failed (bad chunking, client went away).
#[derive(Debug, Error)]
#[error("client request body: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// The client left more than the pool's `body_timeout` between two pieces of its body.
#[derive(Debug, Error)]
#[error("client sent no request body data for {0:?}")]
pub struct BodyTimeout(pub Duration);

/// Tells the request path when a request body has been sent in full, which is when the
/// upstream's `response_timeout` starts.
#[derive(Debug, Default)]
pub struct BodySent {
    done: AtomicBool,
    notify: Notify,
}

impl BodySent {
    /// Resolves once the body has ended (or failed).
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.done.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn set(&self) {
        self.done.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// The body sent upstream: the client's body streamed through, or nothing.
#[derive(Debug, Default)]
pub struct RequestBody {
    inner: Option<Incoming>,
    limit: u64,
    seen: u64,
    /// Longest pause between two pieces of the body, with its timer once started.
    idle: Option<(Duration, Option<Pin<Box<Sleep>>>)>,
    sent: Option<Arc<BodySent>>,
}

impl RequestBody {
    /// No body.
    pub fn empty() -> Self {
        RequestBody::default()
    }

    /// Streams `inner`, failing once more than `limit` bytes passed (0 = no limit) or
    /// when the client pauses for longer than `idle_timeout`.
    pub fn streaming(inner: Incoming, limit: u64, idle_timeout: Duration) -> Self {
        let sent = (!inner.is_end_stream()).then(|| Arc::new(BodySent::default()));
        RequestBody {
            inner: Some(inner),
            limit,
            seen: 0,
            idle: sent.is_some().then_some((idle_timeout, None)),
            sent,
        }
    }

    /// What signals the end of the body; `None` when there is no body to send.
    pub fn sent(&self) -> Option<Arc<BodySent>> {
        self.sent.clone()
    }

    /// Ends the body: no more polls reach the client's stream.
    fn end(&mut self) {
        self.inner = None;
        self.idle = None;
        if let Some(sent) = &self.sent {
            sent.set();
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(sent) = &self.sent {
            sent.set();
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.limit > 0 && this.seen > this.limit {
                        this.end();
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(this.limit)))));
                    }
                }
                if let Some((timeout, Some(timer))) = &mut this.idle {
                    timer.as_mut().reset(tokio::time::Instant::now() + *timeout);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.end();
                Poll::Ready(Some(Err(Box::new(ClientBodyError(e)))))
            }
            Poll::Ready(None) => {
                this.end();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some((timeout, timer)) = &mut this.idle {
                    let timeout = *timeout;
                    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if timer.as_mut().poll(cx).is_ready() {
                        this.end();
                        return Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout)))));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// What to do with the upstream connection once its response body has been read.
pub struct Reuse {
    conn: UpstreamConn,
    in_flight: InFlight,
    /// Identity of the pool's TLS settings (see [`idle::ConnKey`]).
    tls: u64,
}

impl Reuse {
    /// Keeps `conn` for reuse with `in_flight`'s upstream when the body completes.
    pub fn new(conn: UpstreamConn, in_flight: InFlight, tls: u64) -> Self {
        Reuse {
            conn,
            in_flight,
            tls,
        }
    }
}

enum Source {
    Upstream(Incoming),
    Full(Option<Bytes>),
}

/// The body sent to the client.
pub struct ResponseBody {
    source: Source,
    reuse: Option<Reuse>,
    log: Option<Arc<AccessLog>>,
    bytes: u64,
}

impl ResponseBody {
    /// A complete body held in memory (error pages).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody {
            source: Source::Full(Some(bytes.into())),
            reuse: None,
            log: None,
            bytes: 0,
        }
    }

    /// The upstream's body, streamed.
    pub fn upstream(inner: Incoming, reuse: Option<Reuse>) -> Self {
        ResponseBody {
            source: Source::Upstream(inner),
            reuse,
            log: None,
            bytes: 0,
        }
    }

    /// Writes `log` with the byte count when the body ends or is dropped.
    pub fn with_log(mut self, log: Arc<AccessLog>) -> Self {
        self.log = Some(log);
        self
    }

    fn finish(&mut self, complete: bool) {
        // hyper stops polling once `is_end_stream` is true, so a body that was read to its
        // end may be dropped without ever returning `None`.
        let complete = complete || self.is_end_stream();
        if let Some(reuse) = self.reuse.take() {
            let upstream = reuse.in_flight.upstream();
            if complete && !upstream.is_draining() {
                idle::put(
                    idle::ConnKey {
                        address: &upstream.address,
                        tls: reuse.tls,
                    },
                    reuse.conn,
                );
            }
        }
        if let Some(log) = self.log.take() {
            log.write(self.bytes, complete);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.source {
            Source::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Source::Upstream(inner) => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e) as BoxError))),
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Full(b) => b.is_none(),
            Source::Upstream(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Source::Full(None) => SizeHint::with_exact(0),
            Source::Upstream(inner) => inner.size_hint(),
        }
    }
}
