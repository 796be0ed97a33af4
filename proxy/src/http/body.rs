//! Body types: request bodies streamed to upstreams with a size limit, and response bodies
//! streamed to clients that return the upstream connection for reuse and write the access
//! log line when they end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use thiserror::Error;

use super::access_log::AccessLog;
use crate::upstream::{HttpSender, InFlight};

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

/// The body sent upstream: the client's body streamed through, or nothing.
#[derive(Debug, Default)]
pub struct RequestBody {
    inner: Option<Incoming>,
    limit: u64,
    seen: u64,
}

impl RequestBody {
    /// No body.
    pub fn empty() -> Self {
        RequestBody::default()
    }

    /// Streams `inner`, failing once more than `limit` bytes passed (0 = no limit).
    pub fn streaming(inner: Incoming, limit: u64) -> Self {
        RequestBody {
            inner: Some(inner),
            limit,
            seen: 0,
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
                        this.inner = None;
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(this.limit)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(ClientBodyError(e))))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
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
    sender: HttpSender,
    in_flight: InFlight,
}

impl Reuse {
    /// Returns `sender` to `in_flight`'s upstream when the body completes.
    pub fn new(sender: HttpSender, in_flight: InFlight) -> Self {
        Reuse { sender, in_flight }
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
            if complete {
                reuse.in_flight.upstream().put_idle(reuse.sender);
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
