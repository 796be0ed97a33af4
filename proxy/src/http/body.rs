//! Response bodies streamed to clients that return the upstream connection for reuse and
//! write the access log line when they end. (Request bodies, which upstream connections
//! send, are [`crate::upstream::body`].)

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::access_log::AccessLog;
use crate::upstream::body::BoxError;
use crate::upstream::{idle, InFlight, UpstreamConn};

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
