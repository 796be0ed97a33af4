//! Response bodies streamed to clients that return the upstream connection for reuse and
//! write the access log line when they end. (Request bodies, which upstream connections
//! send, are [`crate::upstream::body`].)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use super::access_log::AccessLog;
use crate::upstream::body::BoxError;
use crate::upstream::h1::H1Body;
use crate::upstream::h2::H2Stream;
use crate::upstream::{idle, InFlight};

/// What the response body holds on the upstream side until it ends.
enum Held {
    /// An HTTP/1.1 connection (inside the body), kept for reuse when the body completes.
    Http1 {
        /// Identity of the pool's TLS settings (see [`idle::ConnKey`]).
        tls: u64,
        /// The pool's `idle_timeout`: how long the connection may wait for reuse.
        idle_timeout: Duration,
    },
    /// A stream on a multiplexed HTTP/2 connection, counted until the body ends.
    H2 {
        /// Dropped with the body: the stream no longer counts against the connection.
        _stream: H2Stream,
    },
}

/// What to do with the upstream side once its response body has been read.
pub struct Reuse {
    held: Held,
    in_flight: InFlight,
}

impl Reuse {
    /// Keeps the body's HTTP/1.1 connection for reuse with `in_flight`'s upstream, for at
    /// most `idle_timeout` idle, when the body completes.
    pub fn new(in_flight: InFlight, tls: u64, idle_timeout: Duration) -> Self {
        Reuse {
            held: Held::Http1 { tls, idle_timeout },
            in_flight,
        }
    }

    /// Holds an HTTP/2 stream (and the upstream's in-flight count) until the body ends.
    pub fn h2(stream: H2Stream, in_flight: InFlight) -> Self {
        Reuse {
            held: Held::H2 { _stream: stream },
            in_flight,
        }
    }
}

/// gRPC status codes proxyd itself sends (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
pub mod grpc_code {
    /// The call's deadline (`grpc-timeout`) passed.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// The service is unavailable (no upstream, refused, reset).
    pub const UNAVAILABLE: u32 = 14;
}

/// The gRPC side of a response: the call's deadline, and the status it ended with.
struct GrpcCall {
    /// Fires at the call's `grpc-timeout`.
    deadline: Option<Pin<Box<Sleep>>>,
    /// `grpc-status` seen (response head for Trailers-Only, trailers otherwise) or sent.
    status: Option<u32>,
}

/// `grpc-status` of a header block, if present and numeric.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A `grpc-message` value: percent-encoded as the gRPC HTTP/2 protocol asks (bytes
/// outside printable ASCII, and `%`).
pub fn grpc_message(text: &str) -> http::HeaderValue {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    http::HeaderValue::from_str(&out).unwrap_or_else(|_| http::HeaderValue::from_static(""))
}

/// A trailers block ending a gRPC call with `code` and `message`.
pub fn grpc_trailers(code: u32, message: &str) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from(code));
    trailers.insert("grpc-message", grpc_message(message));
    trailers
}

enum Source {
    Upstream(Incoming),
    Http1(H1Body),
    Full(Option<Bytes>),
    /// Ends with this trailers block (a gRPC call proxyd ended).
    Trailers(Option<http::HeaderMap>),
}

/// The body sent to the client.
pub struct ResponseBody {
    source: Source,
    reuse: Option<Reuse>,
    log: Option<Box<AccessLog>>,
    bytes: u64,
    grpc: Option<GrpcCall>,
    /// The clock reading the body was finished with.
    ended: Option<std::time::Instant>,
}

impl ResponseBody {
    /// A complete body held in memory (error pages).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody {
            source: Source::Full(Some(bytes.into())),
            reuse: None,
            log: None,
            bytes: 0,
            grpc: None,
            ended: None,
        }
    }

    /// No body at all: the response head ends the stream (a gRPC Trailers-Only answer).
    pub fn empty() -> Self {
        ResponseBody {
            source: Source::Full(None),
            reuse: None,
            log: None,
            bytes: 0,
            grpc: None,
            ended: None,
        }
    }

    /// The upstream's body, streamed.
    pub fn upstream(inner: Incoming, reuse: Option<Reuse>) -> Self {
        ResponseBody {
            source: Source::Upstream(inner),
            reuse,
            log: None,
            bytes: 0,
            grpc: None,
            ended: None,
        }
    }

    /// The upstream's body read from an HTTP/1.1 connection, which goes back to the idle
    /// store when the body completes.
    pub fn http1(inner: H1Body, reuse: Option<Reuse>) -> Self {
        ResponseBody {
            source: Source::Http1(inner),
            reuse,
            log: None,
            bytes: 0,
            grpc: None,
            ended: None,
        }
    }

    /// Treats the body as a gRPC call's: it ends with `DEADLINE_EXCEEDED` trailers at
    /// `deadline`, with `UNAVAILABLE` trailers when the upstream fails mid-stream, and
    /// reports the call's status to the access log. `status` is one already known from
    /// the response head.
    ///
    /// Set where the body is (in its response) rather than passed through: a body is a
    /// few hundred bytes, moved twice more per response otherwise.
    pub fn set_grpc(&mut self, deadline: Option<tokio::time::Instant>, status: Option<u32>) {
        self.grpc = Some(GrpcCall {
            deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
            status,
        });
    }

    /// Writes `log` with the byte count when the body ends or is dropped.
    pub fn set_log(&mut self, log: Box<AccessLog>) {
        self.log = Some(log);
    }

    /// Finishes the body as its drop would, and gives the clock reading it was finished
    /// with (by this call or before): `None` if it had nothing to finish (no log).
    pub fn end(&mut self) -> Option<std::time::Instant> {
        self.finish(false);
        self.ended
    }

    fn finish(&mut self, complete: bool) {
        if self.reuse.is_none() && self.log.is_none() {
            // Finished already (a drop after the end): no clock to read.
            return;
        }
        // hyper stops polling once `is_end_stream` is true, so a body that was read to its
        // end may be dropped without ever returning `None`.
        let complete = complete || self.is_end_stream();
        // One reading for the end of the exchange: the kept connection's idle time and
        // the request's duration start and end at it.
        let now = std::time::Instant::now();
        self.ended = Some(now);
        if let Some(reuse) = self.reuse.take() {
            let upstream = reuse.in_flight.upstream();
            if let (Held::Http1 { tls, idle_timeout }, Source::Http1(body)) =
                (reuse.held, &mut self.source)
            {
                let conn = body.take_idle();
                if let (true, false, Some(conn)) = (complete, upstream.is_draining(), conn) {
                    idle::put(
                        idle::ConnKey {
                            address: &upstream.address,
                            tls,
                        },
                        conn,
                        now,
                        idle_timeout,
                    );
                }
            }
        }
        if let Some(log) = self.log.take() {
            log.write(
                self.bytes,
                complete,
                self.grpc.as_ref().and_then(|g| g.status),
                now,
            );
        }
    }

    /// Ends a gRPC call here with `code`: the upstream side is let go (an HTTP/2 stream
    /// is reset) and the client gets trailers.
    fn end_call(&mut self, code: u32, message: &str) -> Frame<Bytes> {
        if let Some(grpc) = &mut self.grpc {
            grpc.status = Some(code);
            grpc.deadline = None;
        }
        // Logged as incomplete: the upstream's answer was cut off.
        self.reuse = None;
        self.finish(false);
        self.source = Source::Trailers(None);
        Frame::trailers(grpc_trailers(code, message))
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
        if let Some(GrpcCall {
            deadline: Some(deadline),
            ..
        }) = &mut this.grpc
        {
            if deadline.as_mut().poll(cx).is_ready() {
                let frame = this.end_call(grpc_code::DEADLINE_EXCEEDED, "deadline exceeded");
                return Poll::Ready(Some(Ok(frame)));
            }
        }
        let polled = match &mut this.source {
            Source::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Source::Trailers(trailers) => {
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            Source::Upstream(inner) => Pin::new(inner)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
            Source::Http1(inner) => Pin::new(inner).poll_frame(cx),
        };
        if let Poll::Ready(Some(Err(e))) = &polled {
            if this.grpc.is_some() {
                tracing::debug!(error = %e, "upstream failed during a gRPC response");
                let frame = this.end_call(grpc_code::UNAVAILABLE, "upstream failed mid-stream");
                return Poll::Ready(Some(Ok(frame)));
            }
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                } else if let (Some(trailers), Some(grpc)) = (frame.trailers_ref(), &mut this.grpc)
                {
                    if let Some(code) = grpc_status(trailers) {
                        grpc.status = Some(code);
                    }
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
            Source::Trailers(t) => t.is_none(),
            Source::Upstream(inner) => inner.is_end_stream(),
            Source::Http1(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Source::Full(None) | Source::Trailers(_) => SizeHint::with_exact(0),
            Source::Upstream(inner) => inner.size_hint(),
            Source::Http1(inner) => inner.size_hint(),
        }
    }
}
