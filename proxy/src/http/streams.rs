//! The streams of an HTTP/2 client connection, run inside the connection's own task.
//!
//! hyper hands every stream it accepts to an executor. Spawned as a tokio task of its
//! own, each request crossed tasks twice: the connection's task read the request and
//! spawned the stream's task (which tokio may hand to the other worker thread, waking it),
//! and the stream's response woke the connection's task again to write it. Here the
//! connection's task polls its streams itself, as one nginx worker serves all the
//! streams of a connection in its event loop: a response is written in the same poll
//! that made it, and a stream costs one allocation instead of a task.
//!
//! Streams still run concurrently with each other and with the connection's reads and
//! writes; what is given up is spreading one connection's streams over several worker
//! threads, which the accept loop already does per connection.
//!
//! The h2 codec writes and flushes once per response of 256 bytes or more (it hands such a
//! DATA frame to the stream by itself rather than copy it), so answers that became ready
//! together still left in as many writes, each its own TLS record and system call.
//! [`HeldWrites`] keeps what the codec writes while the connection's task polls, and
//! [`InTask`] lets it out once, when the poll ends: one write (and, over TLS, one record)
//! for everything that poll answered, as nginx writes a connection's frames once per turn
//! of its event loop.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// At most this much is held back: one TLS record's worth of plaintext. A write that
/// would take it further lets out what is held, together with the write itself.
const HOLD_LIMIT: usize = 16 * 1024;

/// A stream's future (hyper's `H2Stream`, or the task that carries an upgraded stream).
type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor given to hyper's HTTP/2 server for one connection: it queues the streams
/// hyper accepts for [`InTask`] to run.
#[derive(Clone, Default)]
pub(super) struct ConnectionStreams {
    queue: Arc<Mutex<Queue>>,
}

#[derive(Default)]
struct Queue {
    accepted: Vec<StreamFuture>,
    /// Set while [`InTask`] is being polled: streams queued then are started before the
    /// poll returns, so nobody needs waking.
    polling: bool,
    /// The connection's task, to wake for a stream queued outside its poll.
    waker: Option<Waker>,
}

impl ConnectionStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // The lock only guards pushes and swaps of a Vec: a panic cannot leave it half done.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<F> hyper::rt::Executor<F> for ConnectionStreams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        let mut queue = self.lock();
        queue.accepted.push(Box::pin(future));
        // hyper accepts streams while the connection is polled, i.e. inside `InTask::poll`;
        // should it ever queue one from elsewhere, the connection's task is woken for it.
        if !queue.polling {
            if let Some(waker) = queue.waker.take() {
                drop(queue);
                waker.wake();
            }
        }
    }
}

/// An HTTP/2 connection (`conn`, served with `streams` as its executor) together with its
/// streams, as one future: ready with the connection's result once the connection has
/// ended and every stream it started has finished.
///
/// Streams still running when the connection ends are run to their end, as their own
/// tasks were: the client is gone, so they end at their next write to it.
pub(super) struct InTask<C> {
    conn: Pin<Box<C>>,
    hold: Arc<Hold>,
    ended: Option<hyper::Result<()>>,
    streams: ConnectionStreams,
    running: FuturesUnordered<StreamFuture>,
    /// Reused to take the queued streams without allocating under the lock.
    taken: Vec<StreamFuture>,
}

impl<C> InTask<C>
where
    C: Future<Output = hyper::Result<()>>,
{
    /// `conn` must have been made with `streams` as its executor, and its stream wrapped
    /// in a [`HeldWrites`] sharing `hold`.
    pub(super) fn new(conn: Pin<Box<C>>, streams: ConnectionStreams, hold: Arc<Hold>) -> InTask<C> {
        InTask {
            conn,
            hold,
            ended: None,
            streams,
            running: FuturesUnordered::new(),
            taken: Vec::new(),
        }
    }

    /// The connection itself, e.g. to start its graceful shutdown; `None` once it ended.
    pub(super) fn connection(&mut self) -> Option<Pin<&mut C>> {
        match self.ended {
            None => Some(self.conn.as_mut()),
            Some(_) => None,
        }
    }

    /// Moves the streams hyper queued into the running set; whether there were any.
    fn start_accepted(&mut self) -> bool {
        std::mem::swap(&mut self.streams.lock().accepted, &mut self.taken);
        let any = !self.taken.is_empty();
        for stream in self.taken.drain(..) {
            self.running.push(stream);
        }
        any
    }

    /// Polls the running streams until none is ready.
    fn poll_streams(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {}
    }
}

impl<C> Future for InTask<C>
where
    C: Future<Output = hyper::Result<()>>,
{
    type Output = hyper::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.streams.lock().polling = true;
        loop {
            this.hold.holding.store(true, Ordering::Relaxed);
            loop {
                // Streams first: a response they make is then written by the connection's
                // poll right after, in this same poll.
                this.poll_streams(cx);
                if this.ended.is_none() {
                    if let Poll::Ready(result) = this.conn.as_mut().poll(cx) {
                        this.ended = Some(result);
                    }
                }
                // Streams the connection accepted get their first poll now; if that
                // answered them, the connection writes the answers on the next round.
                if !this.start_accepted() {
                    break;
                }
            }
            this.hold.holding.store(false, Ordering::Relaxed);
            if !this.hold.held.swap(false, Ordering::Relaxed) || this.ended.is_some() {
                break;
            }
            // The codec flushes at the end of every poll of the connection: this one lets
            // out what the polls above held back. It may accept streams too, which then
            // start as above.
            if let Poll::Ready(result) = this.conn.as_mut().poll(cx) {
                this.ended = Some(result);
            }
            if !this.start_accepted() {
                break;
            }
        }
        let mut queue = this.streams.lock();
        queue.polling = false;
        if !queue
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            queue.waker = Some(cx.waker().clone());
        }
        drop(queue);
        if this.running.is_empty() {
            if let Some(result) = this.ended.take() {
                return Poll::Ready(result);
            }
        }
        Poll::Pending
    }
}

/// Whether a connection's writes are being held back, shared by its [`InTask`] (which
/// holds them while it polls) and its [`HeldWrites`].
#[derive(Debug, Default)]
pub(super) struct Hold {
    /// Set by [`InTask`] while it polls the connection and its streams.
    holding: AtomicBool,
    /// Set by [`HeldWrites`] when it kept bytes back, so that [`InTask`] lets them out.
    held: AtomicBool,
}

/// A client stream whose writes and flushes are held back while its connection's task
/// polls (see [`Hold`]): kept in a buffer of at most [`HOLD_LIMIT`] bytes and written on the
/// first flush after the poll. Outside a poll, or over the limit, writes go through.
pub(super) struct HeldWrites<S> {
    inner: S,
    hold: Arc<Hold>,
    buf: Vec<u8>,
    /// How much of `buf`'s start has been written.
    written: usize,
}

impl<S> HeldWrites<S> {
    pub(super) fn new(inner: S, hold: Arc<Hold>) -> HeldWrites<S> {
        HeldWrites {
            inner,
            hold,
            buf: Vec::new(),
            written: 0,
        }
    }

    /// Keeps `bufs` (`len` bytes in all) if holding and they fit.
    fn keep(&mut self, bufs: &[IoSlice<'_>], len: usize) -> bool {
        let pending = self.buf.len() - self.written;
        if !self.hold.holding.load(Ordering::Relaxed) || pending + len > HOLD_LIMIT {
            return false;
        }
        if self.buf.capacity() == 0 {
            // Room for everything a poll may hold: growing it by steps instead copied
            // what was held on each step, several times per poll under load.
            self.buf.reserve(HOLD_LIMIT);
        }
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        self.hold.held.store(true, Ordering::Relaxed);
        true
    }

    /// The buffer is emptied once written, and given back when the connection is idle
    /// (a connection waiting for requests holds no write buffer).
    fn emptied(&mut self) {
        self.buf.clear();
        self.written = 0;
        if !self.hold.holding.load(Ordering::Relaxed) {
            self.buf = Vec::new();
        }
    }
}

impl<S: AsyncWrite + Unpin> HeldWrites<S> {
    /// Writes what is held, with `bufs` after it in the same write; how many of `bufs`'
    /// bytes went out. `Ready` only once everything held is out.
    fn poll_write_out(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            let pending = self.buf.len() - self.written;
            if pending == 0 {
                if !self.buf.is_empty() {
                    self.emptied();
                }
                return match bufs {
                    [] => Poll::Ready(Ok(0)),
                    [one] => Pin::new(&mut self.inner).poll_write(cx, one),
                    _ => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
                };
            }
            let mut slices = [IoSlice::new(&[]); 8];
            slices[0] = IoSlice::new(&self.buf[self.written..]);
            let mut used = 1;
            for (slot, b) in slices[1..].iter_mut().zip(bufs) {
                *slot = IoSlice::new(b);
                used += 1;
            }
            let n = if used == 1 || !self.inner.is_write_vectored() {
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?
            } else {
                ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices[..used]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n <= pending {
                self.written += n;
                continue;
            }
            self.emptied();
            return Poll::Ready(Ok(n - pending));
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeldWrites<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeldWrites<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let bufs = [IoSlice::new(buf)];
        if this.keep(&bufs, buf.len()) {
            return Poll::Ready(Ok(buf.len()));
        }
        this.poll_write_out(cx, &bufs)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len = bufs.iter().map(|b| b.len()).sum();
        if this.keep(bufs, len) {
            return Poll::Ready(Ok(len));
        }
        this.poll_write_out(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.hold.holding.load(Ordering::Relaxed) && this.buf.len() > this.written {
            // Let out when the poll ends (see `InTask`), also what an earlier poll could
            // not write in full.
            this.hold.held.store(true, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_write_out(cx, &[]))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_out(cx, &[]))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A sink that records each write it is given, to see how writes were grouped.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = all.len();
            self.0.push(all);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn held() -> (HeldWrites<Writes>, Arc<Hold>) {
        let hold = Arc::new(Hold::default());
        (HeldWrites::new(Writes::default(), hold.clone()), hold)
    }

    #[tokio::test]
    async fn writes_and_flushes_while_holding_go_out_as_one_write_after() {
        let (mut io, hold) = held();
        hold.holding.store(true, Ordering::Relaxed);
        io.write_all(b"first ").await.unwrap();
        io.flush().await.unwrap();
        let n = io
            .write_vectored(&[IoSlice::new(b"second "), IoSlice::new(b"third")])
            .await
            .unwrap();
        assert_eq!(n, 12, "both slices taken whole");
        io.flush().await.unwrap();
        assert!(io.inner.0.is_empty(), "nothing written while holding");
        assert!(
            hold.held.load(Ordering::Relaxed),
            "the holder is told to let out"
        );
        hold.holding.store(false, Ordering::Relaxed);
        io.flush().await.unwrap();
        assert_eq!(io.inner.0, vec![b"first second third".to_vec()]);
        assert_eq!(io.buf.capacity(), 0, "no buffer kept once let out");
    }

    #[tokio::test]
    async fn a_write_past_the_limit_takes_what_is_held_along() {
        let (mut io, hold) = held();
        hold.holding.store(true, Ordering::Relaxed);
        io.write_all(b"head").await.unwrap();
        let big = vec![b'x'; HOLD_LIMIT];
        let n = io.write(&big).await.unwrap();
        assert_eq!(
            n,
            big.len(),
            "the caller's bytes are counted without the held ones"
        );
        let mut expected = b"head".to_vec();
        expected.extend_from_slice(&big);
        assert_eq!(io.inner.0, vec![expected], "one write for both");
    }

    #[tokio::test]
    async fn writes_go_through_when_not_holding() {
        let (mut io, _hold) = held();
        io.write_all(b"one").await.unwrap();
        io.write_all(b"two").await.unwrap();
        assert_eq!(io.inner.0, vec![b"one".to_vec(), b"two".to_vec()]);
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_held_first() {
        let (mut io, hold) = held();
        hold.holding.store(true, Ordering::Relaxed);
        io.write_all(b"goaway").await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(io.inner.0, vec![b"goaway".to_vec()]);
    }

    /// Stands in for hyper's connection: each poll writes an answer through the
    /// connection's [`HeldWrites`] for every stream that asked for one, and the first poll
    /// accepts `to_accept` streams made by `make`.
    struct FakeConnection<M> {
        streams: ConnectionStreams,
        io: HeldWrites<Writes>,
        answers: Arc<std::sync::atomic::AtomicUsize>,
        to_accept: usize,
        make: M,
    }

    impl<M: Fn() -> StreamFuture + Unpin> Future for FakeConnection<M> {
        type Output = hyper::Result<()>;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
            let this = &mut *self;
            for _ in 0..this.answers.swap(0, Ordering::Relaxed) {
                let answer = [IoSlice::new(b"answer;")];
                let _ = Pin::new(&mut this.io).poll_write_vectored(cx, &answer);
            }
            let _ = Pin::new(&mut this.io).poll_flush(cx);
            for _ in 0..std::mem::take(&mut this.to_accept) {
                hyper::rt::Executor::execute(&this.streams, (this.make)());
            }
            Poll::Pending
        }
    }

    /// Polls, once, a connection whose first poll accepts three streams made by `make`,
    /// which count the answers they ask for in `answers`; the writes the connection made.
    fn one_poll_accepting<M: Fn() -> StreamFuture + Unpin>(
        answers: Arc<std::sync::atomic::AtomicUsize>,
        make: M,
    ) -> Vec<Vec<u8>> {
        let hold = Arc::new(Hold::default());
        let streams = ConnectionStreams::default();
        let conn = FakeConnection {
            streams: streams.clone(),
            io: HeldWrites::new(Writes::default(), hold.clone()),
            answers,
            to_accept: 3,
            make,
        };
        let mut task = InTask::new(Box::pin(conn), streams, hold);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut task).poll(&mut cx).is_pending());
        let conn = task.connection().expect("the connection has not ended");
        std::mem::take(&mut Pin::into_inner(conn).io.inner.0)
    }

    #[test]
    fn streams_answering_at_once_leave_in_one_write() {
        let answers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = answers.clone();
        let writes = one_poll_accepting(answers, move || {
            let counted = counted.clone();
            Box::pin(async move {
                counted.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(
            writes,
            vec![b"answer;answer;answer;".to_vec()],
            "streams started and answered in one poll of the connection's task: one write"
        );
    }

    #[tokio::test]
    async fn the_held_buffer_is_reserved_whole_once() {
        let (mut io, hold) = held();
        hold.holding.store(true, Ordering::Relaxed);
        io.write_all(b"first").await.unwrap();
        let reserved = (io.buf.as_ptr(), io.buf.capacity());
        assert!(reserved.1 >= HOLD_LIMIT, "room for all a poll may hold");
        io.write_all(&vec![b'x'; HOLD_LIMIT - 5]).await.unwrap();
        assert!(io.inner.0.is_empty(), "still held");
        assert_eq!(
            (io.buf.as_ptr(), io.buf.capacity()),
            reserved,
            "filled up to the limit without moving"
        );
    }
}
