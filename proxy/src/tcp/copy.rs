//! Copying a forwarded stream both ways, with half-close: when one side ends its writing,
//! the other side's write half is shut down and the opposite direction goes on.
//!
//! The copy buffers come from a per-thread stock instead of the allocator: a short
//! connection (a request, an answer, a close) would otherwise allocate and zero 128 KiB,
//! and glibc hands memory of that size back to the kernel and faults it in again, on every
//! connection.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::spare;

/// Bytes read at once in each direction. tokio's default (8 KiB) costs a read and a write
/// system call per 8 KiB of a large transfer; 64 KiB moves bulk data with an eighth of them.
const BUFFER_SIZE: usize = 64 * 1024;

/// Free buffers kept per thread (2 MiB): enough for the connections that end between two
/// new ones under a high connection rate, small beside the buffers of open connections.
const SPARE_BUFFERS: usize = 32;

thread_local! {
    static SPARE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A copy buffer, returned to its thread's stock when dropped.
pub(super) struct Buffer(Box<[u8]>);

impl Buffer {
    /// One from this thread's stock, or a new one.
    pub(super) fn take() -> Buffer {
        Buffer(spare::take(&SPARE).unwrap_or_else(|| vec![0; BUFFER_SIZE].into_boxed_slice()))
    }

    /// Its bytes ([`BUFFER_SIZE`] of them).
    pub(super) fn bytes(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        spare::keep(&SPARE, std::mem::take(&mut self.0), SPARE_BUFFERS);
    }
}

/// One direction of the copy.
struct OneWay {
    /// `None` once this direction is done (its buffer went back to the stock).
    buffer: Option<Buffer>,
    /// Read but not yet written: `buffer[start..end]`.
    start: usize,
    end: usize,
    /// The source ended its writing.
    eof: bool,
    /// Written since the last flush.
    unflushed: bool,
    copied: u64,
}

impl OneWay {
    fn new() -> OneWay {
        OneWay {
            buffer: Some(Buffer::take()),
            start: 0,
            end: 0,
            eof: false,
            unflushed: false,
            copied: 0,
        }
    }

    fn is_done(&self) -> bool {
        self.buffer.is_none()
    }

    /// Copies from `from` to `to` until `from` ends, then shuts `to`'s write half down.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut from: Pin<&mut R>,
        mut to: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let Some(buffer) = &mut self.buffer else {
            return Poll::Ready(Ok(()));
        };
        loop {
            if self.start == self.end && !self.eof {
                let mut read = ReadBuf::new(&mut buffer.0);
                match from.as_mut().poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        self.start = 0;
                        self.end = n;
                        self.eof = n == 0;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read for now: what was written must not wait
                        // in a buffering writer (TLS) until more arrives.
                        if self.unflushed {
                            ready!(to.as_mut().poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.start < self.end {
                let n = ready!(to.as_mut().poll_write(cx, &buffer.0[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.copied += n as u64;
                self.unflushed = true;
            }
            if self.eof {
                ready!(to.as_mut().poll_flush(cx))?;
                ready!(to.as_mut().poll_shutdown(cx))?;
                self.buffer = None;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// The bytes a forwarded stream has written each way so far, kept outside the copy so
/// that they can be counted however the stream ends (also when the copy is dropped because
/// its upstream left the pool). Atomics only because the task may move between threads;
/// only the copy writes them.
#[derive(Debug, Default)]
pub struct Tally {
    up: AtomicU64,
    down: AtomicU64,
}

impl Tally {
    /// Written to the upstream.
    pub fn up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }

    /// Written to the client.
    pub fn down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }

    /// Records the totals so far.
    pub(super) fn set(&self, up: u64, down: u64) {
        self.up.store(up, Ordering::Relaxed);
        self.down.store(down, Ordering::Relaxed);
    }
}

/// Copies `a` to `b` and `b` to `a` until both have ended their writing (each end shut
/// down the other side's write half), keeping `tally` of the bytes written. An error in
/// either direction ends both.
pub async fn both_ways<A, B>(a: &mut A, b: &mut B, tally: &Tally) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = OneWay::new();
    let mut b_to_a = OneWay::new();
    poll_fn(|cx| {
        let forth = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b));
        let back = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a));
        tally.set(a_to_b.copied, b_to_a.copied);
        if let (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) = (forth, back) {
            return Poll::Ready(Err(e));
        }
        if a_to_b.is_done() && b_to_a.is_done() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (mut client, mut proxy_client) = tokio::io::duplex(1024);
        let (mut proxy_upstream, mut upstream) = tokio::io::duplex(1024);
        let tally = std::sync::Arc::new(Tally::default());
        let counted = tally.clone();
        let copy = tokio::spawn(async move {
            both_ways(&mut proxy_client, &mut proxy_upstream, &counted).await
        });
        // More than a buffer's worth each way, through pipes smaller than the buffer.
        let request: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let answer: Vec<u8> = (0..150_000u32).map(|i| (i % 241) as u8).collect();
        let sent = request.clone();
        let client_side = tokio::spawn(async move {
            client.write_all(&sent).await?;
            client.shutdown().await?;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await?;
            io::Result::Ok(got)
        });
        let mut got = Vec::new();
        upstream
            .read_to_end(&mut got)
            .await
            .expect("upstream reads");
        assert_eq!(
            got, request,
            "the upstream got the request, then end of stream"
        );
        upstream.write_all(&answer).await.expect("upstream answers");
        upstream.shutdown().await.expect("upstream closes");
        let back = client_side.await.expect("client task").expect("client io");
        assert_eq!(
            back, answer,
            "the client got the answer, then end of stream"
        );
        copy.await.expect("copy task").expect("copy");
        assert_eq!(
            (tally.up(), tally.down()),
            (request.len() as u64, answer.len() as u64)
        );
    }

    #[tokio::test]
    async fn buffers_are_reused_on_the_same_thread() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let (mut c, mut d) = tokio::io::duplex(64);
        a.shutdown().await.expect("shutdown");
        d.shutdown().await.expect("shutdown");
        both_ways(&mut b, &mut c, &Tally::default())
            .await
            .expect("copy");
        let spare = SPARE.with(|s| s.borrow().len());
        assert!(
            spare >= 2,
            "both buffers went back to the stock, found {spare}"
        );
        let before = SPARE.with(|s| s.borrow().iter().map(|b| b.as_ptr()).collect::<Vec<_>>());
        let taken = Buffer::take();
        assert!(
            before.contains(&taken.0.as_ptr()),
            "a new copy takes a buffer from the stock"
        );
    }
}
