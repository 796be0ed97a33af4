//! Keep-alive connections that hold no hyper connection between requests.
//!
//! hyper keeps an HTTP/1 connection's read buffer (grown to 16 KiB), its 8 KiB write
//! buffer and the slot for the handler's future for as long as the connection lives,
//! and has no way to release them while it waits for the next request. Most of a proxy's
//! client connections are that: idle keep-alive connections. So the client stream is
//! only *lent* to a hyper connection: once that connection is between requests with
//! nothing buffered, it is dropped, the stream comes back ([`Loan`]'s drop), and the
//! connection waits for its next bytes holding only the stream ([`ReadReady`]). When
//! they arrive a new hyper connection takes the stream over.
//!
//! Dropping hyper's connection is only safe when hyper holds nothing of the client's:
//! every request it parsed has had its whole response handed over ([`Exchange`]), the
//! write buffer is flushed ([`Lender`] sees every write), and no byte of a next request
//! was read (the framing scan, [`HeadProgress`]). Anything that ends keep-alive (HTTP/1.0,
//! `Connection: close` either way, upgrades, a refused message) keeps the connection
//! with hyper to its end, as before.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::framing::HeadProgress;

/// What a connection's stream and the hyper connection it is lent to share.
pub(super) struct Lender<S> {
    /// Where the stream goes back when the hyper connection holding it is dropped.
    returned: Mutex<Option<S>>,
    /// The last write, flush or shutdown hyper asked for did not complete: hyper still
    /// holds bytes to send.
    write_blocked: AtomicBool,
    /// The connection ends with hyper: keep-alive was refused by a message, or hyper
    /// began to shut the stream down.
    ending: AtomicBool,
    /// Requests handed to the handler.
    requests: AtomicU64,
    /// Request heads the connection handed to earlier hyper connections.
    heads_before: u64,
    /// Requests whose response (body included) hyper has not finished with.
    open: AtomicU64,
}

impl<S> Lender<S> {
    /// A lender for a connection that handed `heads_before` request heads to earlier
    /// hyper connections (see [`HeadProgress::heads`]).
    pub(super) fn new(heads_before: u64) -> Arc<Self> {
        Arc::new(Lender {
            returned: Mutex::new(None),
            write_blocked: AtomicBool::new(false),
            ending: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            heads_before,
            open: AtomicU64::new(0),
        })
    }

    /// Lends `stream` to a hyper connection.
    pub(super) fn lend(self: &Arc<Self>, stream: S) -> Loan<S> {
        Loan {
            stream: Some(stream),
            lender: self.clone(),
        }
    }

    /// The stream, once the hyper connection it was lent to is dropped.
    pub(super) fn take_back(&self) -> Option<S> {
        self.returned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Whether the hyper connection can be dropped now without losing anything of the
    /// client's: asked only while that connection is waiting (its future pending).
    pub(super) fn can_park(&self, progress: &HeadProgress) -> bool {
        !self.ending.load(Ordering::Relaxed)
            && !self.write_blocked.load(Ordering::Relaxed)
            && self.open.load(Ordering::Relaxed) == 0
            && progress.between_messages()
            // Every head that arrived went to the handler: none is left in hyper's buffer.
            // The count is the connection's, over all its lendings.
            && progress.heads() == self.heads_before + self.requests.load(Ordering::Relaxed)
    }

    /// Requests handed to the handler so far, HTTP/2 streams included.
    pub(super) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Notes a request handed to the handler; the returned exchange lasts until hyper is
    /// done with its response.
    pub(super) fn begin<B>(self: &Arc<Self>, request: &Request<B>) -> Exchange<S> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        let keeps_alive = request.version() == Version::HTTP_11
            && !asks_close(request.headers())
            && !request.headers().contains_key(header::UPGRADE)
            && request.method() != http::Method::CONNECT;
        if !keeps_alive {
            self.ending.store(true, Ordering::Relaxed);
        }
        Exchange {
            lender: self.clone(),
        }
    }
}

/// Whether a `Connection` header says `close`.
fn asks_close(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|value| {
        value.to_str().map_or(true, |v| {
            v.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"))
        })
    })
}

/// One request on the connection, from the handler receiving it until hyper is done with
/// its response body (or drops it).
pub(super) struct Exchange<S> {
    lender: Arc<Lender<S>>,
}

impl<S> Exchange<S> {
    /// Attaches the exchange to `response`, whose end is its end.
    pub(super) fn respond<B>(self, response: Response<B>) -> Response<ExchangeBody<B, S>> {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS || asks_close(response.headers()) {
            self.lender.ending.store(true, Ordering::Relaxed);
        }
        response.map(|body| ExchangeBody {
            body,
            _exchange: self,
        })
    }
}

impl<S> Drop for Exchange<S> {
    fn drop(&mut self) {
        self.lender.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that ends its [`Exchange`] when hyper drops it.
pub(super) struct ExchangeBody<B, S> {
    body: B,
    _exchange: Exchange<S>,
}

impl<B: Body<Data = Bytes> + Unpin, S> Body for ExchangeBody<B, S> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client stream while a hyper connection holds it; back to its [`Lender`] on drop.
pub(super) struct Loan<S> {
    /// Always `Some` until dropped.
    stream: Option<S>,
    lender: Arc<Lender<S>>,
}

impl<S> Loan<S> {
    fn stream(&mut self) -> io::Result<&mut S> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// Notes whether a write-side call left bytes with hyper.
    fn wrote<T>(&self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.lender
            .write_blocked
            .store(result.is_pending(), Ordering::Relaxed);
        result
    }
}

impl<S> Drop for Loan<S> {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            *self
                .lender
                .returned
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(stream);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Loan<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.stream()?).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Loan<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(self.stream()?).poll_write(cx, buf);
        self.wrote(result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(self.stream()?).poll_write_vectored(cx, bufs);
        self.wrote(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(S::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(self.stream()?).poll_flush(cx);
        self.wrote(result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.lender.ending.store(true, Ordering::Relaxed);
        let result = Pin::new(self.stream()?).poll_shutdown(cx);
        self.wrote(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_close_in_any_token_or_line() {
        let mut headers = HeaderMap::new();
        assert!(!asks_close(&headers));
        headers.append(
            header::CONNECTION,
            http::HeaderValue::from_static("keep-alive"),
        );
        assert!(!asks_close(&headers));
        headers.append(
            header::CONNECTION,
            http::HeaderValue::from_static("Upgrade, CLOSE "),
        );
        assert!(asks_close(&headers));
    }
}
