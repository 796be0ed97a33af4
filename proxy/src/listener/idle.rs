//! A stream wrapper that fails reads once no byte has moved in either direction for a while.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::telemetry::{ClientTimeout, ListenerSeries};

/// Closes a connection that is idle (nothing read or written) for `timeout`.
///
/// Activity in either direction resets the clock, so a long download is never cut while
/// bytes flow; only a pending read can time out.
///
/// Activity only notes the time: the timer is not moved on every read or write. It stays
/// where it was set, at or before the real deadline, and when it fires before that
/// deadline it is set again to it. A connection that answers a request every few
/// milliseconds thus wakes for its timer once per `timeout` instead of re-arming it per
/// request.
///
/// Nor does a read or write read the clock (nor the wrapping of a new connection): it
/// marks that bytes moved, and the time is read when a wait begins (a read finds
/// nothing), unless the reader gives a reading it takes as the bytes move anyway
/// ([`ReadReady::moved_at`]: the HTTP/1 server gives the one a response's end is logged
/// with, read as its last bytes are written). Between the bytes and a wait the task ran
/// without waiting on this stream, so the limit counts from the wait: later than the last
/// byte only by what the task did meanwhile (a write to a slow upstream, say, which is
/// not the client being idle), and never more than microseconds earlier.
pub struct IdleTimeout<S> {
    inner: S,
    timeout: Duration,
    /// When bytes last moved; `None` when they moved (or the stream was wrapped) since
    /// the clock was last read: the next reading is the time.
    last_activity: Option<Instant>,
    /// Made on the first read that has to wait: a connection that never waits arms none.
    timer: Option<Pin<Box<Sleep>>>,
    /// The task `timer` wakes: it was polled since it was last set and is still running,
    /// so a read that waits again in the same task need not poll it.
    waking: Option<Waker>,
    /// Where an expiry is counted (once), if anywhere.
    counted: Option<ListenerSeries>,
    /// Set while the reader's own timer ends its wait by then (see
    /// [`ReadReady::bound_waits`]).
    bounded: Option<Instant>,
}

impl<S> IdleTimeout<S> {
    /// Wraps `inner`; `timeout` of zero disables the limit.
    pub fn new(inner: S, timeout: Duration) -> Self {
        IdleTimeout {
            inner,
            timeout,
            last_activity: None,
            timer: None,
            waking: None,
            counted: None,
            bounded: None,
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

    /// See [`ReadReady::bound_waits`]: while a wait ends by `end` at the latest, and that
    /// is before the idle limit, a wait arms no timer here.
    pub fn bound_waits(&mut self, end: Option<Instant>) {
        self.bounded = end;
    }

    /// Counts as activity: for a copy that moves bytes below the stream (splice). The
    /// clock is read when it is needed (see the type's doc).
    pub fn touch(&mut self) {
        self.last_activity = None;
    }

    /// Bytes last moved at `at`, a reading taken as they moved.
    fn moved_at(&mut self, at: Instant) {
        self.last_activity = Some(at);
    }

    /// When bytes last moved, reading the clock if they moved since it was last read.
    fn last_activity(&mut self) -> Instant {
        *self.last_activity.get_or_insert_with(Instant::now)
    }

    /// `Ready(Err)` when the idle time is up, `Pending` otherwise (timer armed): for a
    /// copy that waits for the stream's readiness itself (splice).
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.poll_limits(cx, None) {
            Poll::Ready(Err(e)) => Poll::Ready(e),
            // Without an end of its own, a wait ends only at the idle limit.
            Poll::Ready(Ok(())) | Poll::Pending => Poll::Pending,
        }
    }

    /// The one timer of a wait on this stream: `Ready(Err)` when the idle time is up,
    /// `Ready(Ok)` once `until` (the reader's own end of the wait, if any) has passed,
    /// `Pending` otherwise (timer armed for whichever comes first).
    fn poll_limits(
        &mut self,
        cx: &mut Context<'_>,
        until: Option<Instant>,
    ) -> Poll<Result<(), io::Error>> {
        // Without a limit (one below TLS already), the time is never read.
        let idle_end = (!self.timeout.is_zero()).then(|| self.last_activity() + self.timeout);
        if until.is_none()
            && idle_end.is_some_and(|end| self.bounded.is_some_and(|bound| bound <= end))
        {
            // The reader's own timer ends this wait before the idle limit could: no timer
            // here (most connections then never make one).
            return Poll::Pending;
        }
        let end = match (idle_end, until) {
            (Some(idle_end), Some(until)) => idle_end.min(until),
            (Some(end), None) | (None, Some(end)) => end,
            (None, None) => return Poll::Pending,
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(end)));
        if timer.deadline() > end {
            // A wait that ends before the timer is set to (a parked connection's next
            // request is due first): the timer is moved to that end.
            timer.as_mut().reset(end);
            self.waking = None;
        }
        if self
            .waking
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
            && !timer.is_elapsed()
        {
            // Set at or before the deadline and due to wake this very task.
            return Poll::Pending;
        }
        loop {
            // A poll that the task's budget cuts short registers nothing with the timer:
            // the task is remembered only when the timer itself answered.
            let answered = tokio::task::coop::has_budget_remaining();
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let now = Instant::now();
                    if idle_end.is_some_and(|deadline| now >= deadline) {
                        self.waking = None;
                        if let Some(series) = self.counted.take() {
                            series.timed_out(ClientTimeout::Idle);
                        }
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "idle timeout",
                        )));
                    }
                    if until.is_some_and(|until| now >= until) {
                        self.waking = None;
                        return Poll::Ready(Ok(()));
                    }
                    // Fired for a deadline that activity since moved on.
                    timer.as_mut().reset(end);
                }
                Poll::Pending => {
                    if !answered {
                        self.waking = None;
                    } else if !self
                        .waking
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        self.waking = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// How a wait of [`ReadReady::poll_ready_until`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// A read would not block (bytes, end of stream or an error).
    Readable,
    /// The end the reader gave passed first.
    Due,
}

/// A client stream that can wait for its next bytes without reading them, so that a
/// keep-alive connection between requests needs no read buffer (see `http::h1`).
pub trait ReadReady {
    /// Ready once a read would not block (bytes, end of stream or an error). Only
    /// meaningful while nothing read is held above the socket: after a read returned
    /// `Pending` through every layer.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Says that the reader ends every wait on this stream by `end` with a timer of its
    /// own (a connection's first request head, its linger between requests, its parked
    /// wait), until called again with `None`. A stream whose idle limit falls later then
    /// arms no timer of its own for those waits: one timer per wait instead of two. A
    /// reader must call it with `None` once its wait ended, before reading on.
    fn bound_waits(&mut self, end: Option<Instant>) {
        let _ = end;
    }

    /// Says that bytes last moved at `at`, a clock reading the reader took as they moved
    /// (with no wait between): a stream with an idle limit counts from there without
    /// reading the clock itself (see [`IdleTimeout`]).
    fn moved_at(&mut self, at: Instant) {
        let _ = at;
    }

    /// Like [`poll_read_ready`](Self::poll_read_ready), and also ends the wait once `due`
    /// has passed, timed by the stream's own timer (see [`IdleTimeout`]): a parked
    /// connection then waits with one timer for both its limits and keeps none of its
    /// own. `None` from a stream that has no timer: the reader then times the wait.
    fn poll_ready_until(
        &mut self,
        cx: &mut Context<'_>,
        due: Instant,
    ) -> Option<Poll<io::Result<Woken>>> {
        let _ = (cx, due);
        None
    }

    /// The plain socket below, taken out of the runtime's event loop, with the idle
    /// limit's state, for a connection that goes dormant (see [`crate::workers::dormant`]); only
    /// an idle-limited plain TCP stream has one. `Err(self)` from any other stream (TLS
    /// holds state above the socket); `Ok(Err)` when taking the socket out failed (it is
    /// then closed).
    fn into_dormant(self) -> Result<io::Result<Dormant>, Self>
    where
        Self: Sized,
    {
        Err(self)
    }

    /// Whether the stream is a plain socket (with an idle limit, or none), which
    /// [`into_dormant`](Self::into_dormant) can take out of the runtime.
    fn is_plain_socket(&self) -> bool {
        false
    }

    /// The socket itself, out of the runtime's event loop: see
    /// [`into_dormant`](Self::into_dormant).
    fn into_socket(self) -> Result<io::Result<std::net::TcpStream>, Self>
    where
        Self: Sized,
    {
        Err(self)
    }

    /// Whether dropping the stream ends the connection exactly as shutting down its
    /// writing side first would. A plain socket's close sends the FIN that the shutdown
    /// would have sent (or, with bytes left unread, the same reset), so a shutdown right
    /// before it is a system call for nothing; TLS owes its peer a `close_notify` first,
    /// and a socket holding back its last bytes (see
    /// [`end_with_next_write`](Self::end_with_next_write)) needs the shutdown to send them
    /// before a reset could drop them.
    fn closes_cleanly_on_drop(&self) -> bool {
        false
    }

    /// Sends small writes at once from now on (`TCP_NODELAY`), where the stream is a socket
    /// that may hold one back until its last one is acknowledged (Nagle's algorithm, a
    /// socket's default); nothing for any other stream.
    fn send_at_once(&mut self) {}

    /// For a connection that ends right after its next writes: has the socket hold back
    /// their last partial segment (each write says more is coming, `MSG_MORE`) so that it
    /// leaves with the end of the stream: one segment where there would be two (the data,
    /// then the FIN on its own), and one acknowledgement fewer. Such a stream no longer
    /// [closes cleanly on drop](Self::closes_cleanly_on_drop): a close with unread bytes
    /// (a client that sent more) would reset the connection and drop what is held, so it
    /// must be shut down. Nothing for other streams (a TLS connection's `close_notify` is
    /// a write of its own).
    fn end_with_next_write(&mut self) {}
}

/// A plain connection's socket out of the runtime's event loop, and its idle limit, while
/// the connection is dormant.
#[derive(Debug)]
pub struct Dormant {
    /// The socket.
    pub socket: std::net::TcpStream,
    /// The idle limit's state, to wake with.
    pub limit: DormantLimit,
}

/// A dormant connection's idle limit: its length, the last activity and where an expiry
/// is counted.
#[derive(Debug)]
pub struct DormantLimit {
    timeout: Duration,
    last_activity: Instant,
    counted: Option<ListenerSeries>,
}

impl DormantLimit {
    /// When the idle limit closes the connection, if it has one.
    pub fn end(&self) -> Option<Instant> {
        (!self.timeout.is_zero()).then(|| self.last_activity + self.timeout)
    }

    /// The idle-limited stream again, around `stream` (the socket back from the
    /// dormitory): the limit runs on from the same last activity.
    pub fn wake<S>(self, stream: S) -> IdleTimeout<S> {
        IdleTimeout {
            inner: stream,
            timeout: self.timeout,
            last_activity: Some(self.last_activity),
            timer: None,
            waking: None,
            counted: self.counted,
            bounded: None,
        }
    }
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }

    fn into_socket(self) -> Result<io::Result<std::net::TcpStream>, Self> {
        Ok(self.into_std())
    }

    fn is_plain_socket(&self) -> bool {
        true
    }

    fn closes_cleanly_on_drop(&self) -> bool {
        true
    }

    fn send_at_once(&mut self) {
        // Failing only on a socket that is gone, which the next write reports.
        let _ = self.set_nodelay(true);
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

    fn bound_waits(&mut self, end: Option<Instant>) {
        IdleTimeout::bound_waits(self, end);
    }

    fn poll_ready_until(
        &mut self,
        cx: &mut Context<'_>,
        due: Instant,
    ) -> Option<Poll<io::Result<Woken>>> {
        Some(match self.inner.poll_read_ready(cx) {
            Poll::Ready(result) => Poll::Ready(result.map(|()| Woken::Readable)),
            Poll::Pending => match self.poll_limits(cx, Some(due)) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(Woken::Due)),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        })
    }

    fn moved_at(&mut self, at: Instant) {
        IdleTimeout::moved_at(self, at);
    }

    fn into_dormant(mut self) -> Result<io::Result<Dormant>, Self> {
        let last_activity = self.last_activity();
        match self.inner.into_socket() {
            Ok(socket) => Ok(socket.map(|socket| Dormant {
                socket,
                limit: DormantLimit {
                    timeout: self.timeout,
                    last_activity,
                    counted: self.counted,
                },
            })),
            // No plain socket below: the stream as it was.
            Err(inner) => Err(IdleTimeout { inner, ..self }),
        }
    }

    fn is_plain_socket(&self) -> bool {
        self.inner.is_plain_socket()
    }

    fn closes_cleanly_on_drop(&self) -> bool {
        self.inner.closes_cleanly_on_drop()
    }

    fn send_at_once(&mut self) {
        self.inner.send_at_once();
    }

    fn end_with_next_write(&mut self) {
        self.inner.end_with_next_write();
    }
}

impl<S: ReadReady + ?Sized> ReadReady for Box<S> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }

    fn bound_waits(&mut self, end: Option<Instant>) {
        (**self).bound_waits(end)
    }

    fn moved_at(&mut self, at: Instant) {
        (**self).moved_at(at)
    }

    fn poll_ready_until(
        &mut self,
        cx: &mut Context<'_>,
        due: Instant,
    ) -> Option<Poll<io::Result<Woken>>> {
        (**self).poll_ready_until(cx, due)
    }

    fn closes_cleanly_on_drop(&self) -> bool {
        (**self).closes_cleanly_on_drop()
    }

    fn send_at_once(&mut self) {
        (**self).send_at_once();
    }

    fn end_with_next_write(&mut self) {
        (**self).end_with_next_write();
    }
}

impl<S: ReadReady> ReadReady for tokio_rustls::server::TlsStream<S> {
    /// The socket below TLS: a record that carries no request wakes the waiter for
    /// nothing, which then reads it and waits again.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().0.poll_read_ready(cx)
    }

    fn bound_waits(&mut self, end: Option<Instant>) {
        self.get_mut().0.bound_waits(end)
    }

    fn moved_at(&mut self, at: Instant) {
        self.get_mut().0.moved_at(at)
    }

    fn poll_ready_until(
        &mut self,
        cx: &mut Context<'_>,
        due: Instant,
    ) -> Option<Poll<io::Result<Woken>>> {
        self.get_mut().0.poll_ready_until(cx, due)
    }

    /// Nothing: a TLS connection's socket sends at once from its accept on (a handshake's
    /// flights and a session ticket are several writes in a row).
    fn send_at_once(&mut self) {}
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// Reads until the stream fails; returns how many bytes came and the error.
    async fn read_to_failure<S: AsyncRead + Unpin>(stream: &mut S) -> (usize, io::Error) {
        let mut buf = [0u8; 8];
        let mut got = 0;
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => panic!("the stream ended"),
                Ok(n) => got += n,
                Err(e) => return (got, e),
            }
        }
    }

    /// Reads until `idle` fails: it must time out, with no bytes read, `secs` seconds
    /// after `start` (within the second: the clock is paused, so there is no drift).
    async fn times_out_at<S: AsyncRead + Unpin>(
        idle: &mut IdleTimeout<S>,
        start: Instant,
        secs: u64,
    ) {
        let (got, error) = read_to_failure(idle).await;
        assert_eq!((got, error.kind()), (0, io::ErrorKind::TimedOut));
        let closed = start.elapsed();
        assert!(
            closed >= Duration::from_secs(secs) && closed < Duration::from_secs(secs + 1),
            "{closed:?}"
        );
    }

    #[tokio::test]
    async fn only_a_plain_socket_closes_cleanly_on_drop() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        assert!(client.closes_cleanly_on_drop());
        let idle = IdleTimeout::new(client, TIMEOUT);
        assert!(idle.closes_cleanly_on_drop());
        assert!(Box::new(idle).closes_cleanly_on_drop());
        // Any other stream is shut down first (TLS: its close_notify).
        let (_, server) = tokio::io::duplex(64);
        assert!(!IdleTimeout::new(DuplexReady(server), TIMEOUT).closes_cleanly_on_drop());
    }

    #[tokio::test(start_paused = true)]
    async fn closes_one_timeout_after_the_last_byte_however_often_bytes_came() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut idle = IdleTimeout::new(server, TIMEOUT);
        let start = Instant::now();
        // A byte every 4 s for 20 s: the timer set at the first wait comes due at 10 s,
        // with activity since, and moves on.
        let writer = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                client.write_all(b"x").await.unwrap();
            }
            client
        });
        let (got, error) = read_to_failure(&mut idle).await;
        assert_eq!(got, 5);
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        let closed = start.elapsed();
        // The last byte came at 20 s (the clock is paused: no drift).
        assert!(
            closed >= Duration::from_secs(30) && closed < Duration::from_secs(31),
            "{closed:?}"
        );
        drop(writer);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_count_as_activity() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut idle = IdleTimeout::new(server, TIMEOUT);
        let start = Instant::now();
        let mut buf = [0u8; 8];
        // Waits (arming the timer at 0 s + 10 s), then writes at 8 s.
        let waited = tokio::time::timeout(Duration::from_secs(8), idle.read(&mut buf)).await;
        assert!(waited.is_err());
        idle.write_all(b"response").await.unwrap();
        times_out_at(&mut idle, start, 18).await;
        client.read_exact(&mut buf).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_counts_from_the_readers_reading_or_else_from_the_next_wait() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut buf = [0u8; 8];
        // Bytes move at 2 s, and the reader reads the clock as they go (as the
        // HTTP/1 server does for a response's end); the task then works 3 s elsewhere before
        // it reads again: the limit counts from the reader's reading, 2 s.
        let mut idle = IdleTimeout::new(server, TIMEOUT);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        idle.write_all(b"response").await.unwrap();
        idle.moved_at(Instant::now());
        tokio::time::sleep(Duration::from_secs(3)).await;
        times_out_at(&mut idle, start, 12).await;
        client.read_exact(&mut buf).await.unwrap();

        // Without a reading from the reader, the clock is read when the next wait begins:
        // bytes at 2 s, the wait at 5 s, closed at 15 s (never before 12 s).
        let (mut client, server) = tokio::io::duplex(64);
        let mut idle = IdleTimeout::new(server, TIMEOUT);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        idle.write_all(b"response").await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        times_out_at(&mut idle, start, 15).await;
        client.read_exact(&mut buf).await.unwrap();
    }

    /// Polls one read of `idle` once: `true` if it is waiting.
    fn read_waits<S: AsyncRead + Unpin>(idle: &mut IdleTimeout<S>) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(idle).poll_read(&mut cx, &mut buf).is_pending()
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_the_reader_ends_first_arms_no_timer_and_the_limit_holds_after_it() {
        let (_client, server) = tokio::io::duplex(64);
        let mut idle = IdleTimeout::new(server, TIMEOUT);
        let start = Instant::now();
        // The reader's own timer ends its wait at 5 s, before the idle limit at 10 s.
        idle.bound_waits(Some(start + Duration::from_secs(5)));
        assert!(read_waits(&mut idle));
        assert!(idle.timer.is_none(), "a timer armed for a bounded wait");
        // Its wait over, the idle limit counts from the last activity as before.
        tokio::time::sleep(Duration::from_secs(5)).await;
        idle.bound_waits(None);
        times_out_at(&mut idle, start, 10).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_bound_later_than_the_idle_limit_leaves_the_limit_its_timer() {
        let (_client, server) = tokio::io::duplex(64);
        let mut idle = IdleTimeout::new(server, TIMEOUT);
        let start = Instant::now();
        idle.bound_waits(Some(start + Duration::from_secs(300)));
        assert!(read_waits(&mut idle));
        assert!(
            idle.timer.is_some(),
            "no timer for a wait the limit ends first"
        );
        times_out_at(&mut idle, start, 10).await;
    }

    /// Polls `idle` once for readiness, with its wait ending at `due`.
    fn ready_until<S: ReadReady>(idle: &mut S, due: Instant) -> Poll<io::Result<Woken>> {
        let mut cx = Context::from_waker(Waker::noop());
        idle.poll_ready_until(&mut cx, due)
            .expect("the stream times the wait")
    }

    /// Waits on `idle` until it is readable, `due` passes or its idle limit ends the wait.
    async fn wait_until<S: ReadReady>(idle: &mut S, due: Instant) -> io::Result<Woken> {
        std::future::poll_fn(|cx| {
            idle.poll_ready_until(cx, due)
                .expect("the stream times the wait")
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_wait_ends_at_its_due_time_on_the_limits_own_timer() {
        let (client, server) = tokio::io::duplex(64);
        let mut idle = IdleTimeout::new(DuplexReady(server), TIMEOUT);
        let start = Instant::now();
        // The next request is due at 4 s, before the idle limit at 10 s.
        let due = start + Duration::from_secs(4);
        let woken = wait_until(&mut idle, due).await;
        assert_eq!(woken.unwrap(), Woken::Due);
        let ended = start.elapsed();
        assert!(
            ended >= Duration::from_secs(4) && ended < Duration::from_secs(5),
            "{ended:?}"
        );
        // The idle limit still holds after it, on the same timer.
        times_out_at(&mut idle, start, 10).await;
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_wait_due_after_the_idle_limit_ends_at_the_limit() {
        let (_client, server) = tokio::io::duplex(64);
        let mut idle = IdleTimeout::new(DuplexReady(server), TIMEOUT);
        let start = Instant::now();
        let due = start + Duration::from_secs(300);
        assert!(ready_until(&mut idle, due).is_pending());
        let woken = wait_until(&mut idle, due).await;
        assert_eq!(woken.unwrap_err().kind(), io::ErrorKind::TimedOut);
        let closed = start.elapsed();
        assert!(
            closed >= Duration::from_secs(10) && closed < Duration::from_secs(11),
            "{closed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_wait_ends_when_bytes_come() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut idle = IdleTimeout::new(DuplexReady(server), TIMEOUT);
        let due = Instant::now() + Duration::from_secs(4);
        assert!(ready_until(&mut idle, due).is_pending());
        client.write_all(b"GET").await.unwrap();
        assert!(matches!(
            ready_until(&mut idle, due),
            Poll::Ready(Ok(Woken::Readable))
        ));
    }

    /// A duplex stream that tells readiness by peeking: what `ReadReady` needs of the
    /// stream below the idle limit.
    struct DuplexReady(tokio::io::DuplexStream);

    impl ReadReady for DuplexReady {
        fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let mut byte = [0u8; 1];
            let mut buf = ReadBuf::new(&mut byte);
            // Ready with a byte, the end or an error alike; a byte consumed while peeking
            // is what a test never reads again.
            Pin::new(&mut self.0).poll_read(cx, &mut buf)
        }
    }

    impl AsyncRead for DuplexReady {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_waiting_in_another_task_is_woken() {
        let (_client, server) = tokio::io::duplex(64);
        let mut idle = IdleTimeout::new(server, TIMEOUT);
        let start = Instant::now();
        // First polled with a waker that wakes nothing: the timer must not take the next
        // reader's wait for one it already registered.
        assert!(read_waits(&mut idle));
        let outcome = tokio::time::timeout(Duration::from_secs(60), read_to_failure(&mut idle))
            .await
            .expect("the reader is woken by the idle timer");
        assert_eq!(outcome.1.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(11));
    }
}
