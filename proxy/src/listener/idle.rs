//! A stream wrapper that fails reads once no byte has moved in either direction for a while.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::telemetry::{ClientTimeout, ListenerSeries};

/// Closes a connection that is idle (nothing read or written) for `timeout`.
///
/// Activity in either direction resets the clock, so a long download is never cut while
/// bytes flow; only a pending read can time out.
pub struct IdleTimeout<S> {
    inner: S,
    timeout: Duration,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
    /// Where an expiry is counted (once), if anywhere.
    counted: Option<ListenerSeries>,
}

impl<S> IdleTimeout<S> {
    /// Wraps `inner`; `timeout` of zero disables the limit.
    pub fn new(inner: S, timeout: Duration) -> Self {
        let now = Instant::now();
        IdleTimeout {
            inner,
            timeout,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + timeout)),
            counted: None,
        }
    }

    /// Counts the expiry in `series` as an idle client: the parser above sees only a read
    /// error, which it may take for the client closing.
    pub fn counted_in(mut self, series: ListenerSeries) -> Self {
        self.counted = Some(series);
        self
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Counts as activity: for a copy that moves bytes below the stream (splice).
    pub fn touch(&mut self) {
        self.last_activity = Instant::now();
    }

    /// `Ready(Err)` when the idle time is up, `Pending` otherwise (timer armed): for a
    /// copy that waits for the stream's readiness itself (splice).
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.timeout.is_zero() {
            return Poll::Pending;
        }
        loop {
            let deadline = self.last_activity + self.timeout;
            if self.timer.deadline() != deadline {
                self.timer.as_mut().reset(deadline);
            }
            match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) if Instant::now() >= self.last_activity + self.timeout => {
                    if let Some(series) = self.counted.take() {
                        series.timed_out(ClientTimeout::Idle);
                    }
                    return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                }
                Poll::Ready(()) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A client stream that can wait for its next bytes without reading them, so that a
/// keep-alive connection between requests needs no read buffer (see `http::parked`).
pub trait ReadReady {
    /// Ready once a read would not block (bytes, end of stream or an error). Only
    /// meaningful while nothing read is held above the socket: after a read returned
    /// `Pending` through every layer.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

impl<S: ReadReady> ReadReady for IdleTimeout<S> {
    /// Fails with the idle timeout as a read would: waiting is no activity.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.poll_read_ready(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => match self.poll_idle(cx) {
                Poll::Ready(err) => Poll::Ready(Err(err)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: ReadReady> ReadReady for tokio_rustls::server::TlsStream<S> {
    /// The socket below TLS: a record that carries no request wakes the waiter for
    /// nothing, which then reads it and waits again.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().0.poll_read_ready(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.touch();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match this.poll_idle(cx) {
                Poll::Ready(err) => Poll::Ready(Err(err)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            if *n > 0 {
                this.touch();
            }
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result {
            if *n > 0 {
                this.touch();
            }
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
