//! The request body sent to upstreams: the client's body streamed through with a size
//! limit and an idle timeout, signalling when it has been sent in full. The upstream
//! connections ([`super::H1Conn`], [`super::h2::H2Sender`]) carry it.

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

/// Errors of our body types.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body grew past the listener's `max_body_bytes`.
#[derive(Debug, Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// Reading the client's request body failed (bad chunking, client went away).
#[derive(Debug, Error)]
#[error("client request body: {0}")]
pub struct ClientBodyError(#[source] pub BoxError);

/// A client request body that proxyd's own HTTP/1.1 server codec reads off the client
/// connection (see `crate::http`): shared by the request, which reads it, and the
/// connection, which writes the response on the same stream.
pub trait ClientBodySource: Send + Sync {
    /// The next piece of the body, as [`Body::poll_frame`].
    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>;
    /// Whether the body has ended.
    fn is_end_stream(&self) -> bool;
    /// What is known of the body's length.
    fn size_hint(&self) -> SizeHint;
}

/// A request body as it arrives from a client: none, an HTTP/1 body read by proxyd's own
/// codec, or an HTTP/2 stream's (hyper's).
#[derive(Default)]
pub enum ClientBody {
    /// No body.
    #[default]
    Empty,
    /// Read from an HTTP/1 client connection.
    Http1(Arc<dyn ClientBodySource>),
    /// An HTTP/2 stream's data.
    H2(Incoming),
}

impl std::fmt::Debug for ClientBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientBody::Empty => "ClientBody::Empty",
            ClientBody::Http1(_) => "ClientBody::Http1",
            ClientBody::H2(_) => "ClientBody::H2",
        })
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Http1(source) => source.poll_frame(cx),
            ClientBody::H2(incoming) => Pin::new(incoming)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Http1(source) => source.is_end_stream(),
            ClientBody::H2(incoming) => incoming.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Http1(source) => source.size_hint(),
            ClientBody::H2(incoming) => incoming.size_hint(),
        }
    }
}

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
    inner: Option<ClientBody>,
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
    pub fn streaming(inner: ClientBody, limit: u64, idle_timeout: Duration) -> Self {
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
