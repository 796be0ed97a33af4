//! Which HTTP version a connection speaks, told from its first bytes.
//!
//! A client speaking HTTP/2 with prior knowledge starts with the connection preface; any
//! other first bytes are served as HTTP/1. The bytes read to tell are read once, as much as
//! the socket has, and handed to the parser before anything else (HTTP/1's codec takes them
//! as its first buffer, HTTP/2's reads them through [`Replayed`]): a new connection's first
//! request then costs one read, where reading exactly the preface's 24 bytes first would
//! cost two.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::listener::ReadReady;

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes asked of the socket per read of the first bytes (as the HTTP/1 codec asks).
const FIRST_READ: usize = 8192;

/// The HTTP version a connection's first bytes speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// Anything but the HTTP/2 preface.
    Http1,
    /// The HTTP/2 preface.
    Http2,
}

/// Reads from `io`, appending to `start`, until the bytes tell the version: at the first
/// byte that differs from the preface (most often the very first), or once the whole
/// preface arrived. `None`: the stream ended before any byte.
///
/// Cancel-safe: whatever was read is in `start`, and a later call goes on from there.
pub async fn first_bytes<IO>(io: &mut IO, start: &mut BytesMut) -> io::Result<Option<Speaks>>
where
    IO: AsyncRead + Unpin,
{
    std::future::poll_fn(|cx| poll_first_bytes(Pin::new(&mut *io), cx, start)).await
}

/// [`first_bytes`] as a poll: `Pending` with the task's waker registered (and what was
/// read kept in `start`) when the bytes do not tell yet.
pub fn poll_first_bytes<IO: AsyncRead>(
    mut io: Pin<&mut IO>,
    cx: &mut Context<'_>,
    start: &mut BytesMut,
) -> Poll<io::Result<Option<Speaks>>> {
    loop {
        if let Some(speaks) = verdict(start) {
            return Poll::Ready(Ok(Some(speaks)));
        }
        // Read straight into what becomes the HTTP/1 codec's buffer: no copy on the way.
        if start.capacity() - start.len() < FIRST_READ / 4 {
            if start.capacity() == 0 {
                // One a connection of this thread gave back, if any.
                *start = super::h1::read_buffer();
            } else {
                start.reserve(FIRST_READ);
            }
        }
        let read = ready!(tokio_util::io::poll_read_buf(io.as_mut(), cx, start))?;
        if read == 0 {
            // The stream ended: a part of the preface is no HTTP/2, and HTTP/1's parser
            // says what it makes of those bytes.
            return Poll::Ready(Ok((!start.is_empty()).then_some(Speaks::Http1)));
        }
    }
}

/// What `start` says, if it says enough.
fn verdict(start: &[u8]) -> Option<Speaks> {
    // Told by the first byte for nearly every HTTP/1 connection, without a call into
    // the C library's comparison.
    if start.first().is_some_and(|&b| b != H2_PREFACE[0]) {
        return Some(Speaks::Http1);
    }
    let n = start.len().min(H2_PREFACE.len());
    if start[..n] != H2_PREFACE[..n] {
        Some(Speaks::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Speaks::Http2)
    } else {
        None
    }
}

/// A stream whose bytes already read from it are read again before the rest: the first
/// bytes read to tell its version, or what a client sent behind a request that switched
/// protocols ([`super::h1::Upgraded`]).
pub struct Replayed<S> {
    inner: S,
    start: Bytes,
}

impl<S> Replayed<S> {
    /// `inner`, with `start` (read from it, not yet consumed) to be read first.
    pub fn new(inner: S, start: Bytes) -> Self {
        Replayed { inner, start }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replayed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.start.is_empty() {
            let n = this.start.len().min(buf.remaining());
            buf.put_slice(&this.start[..n]);
            this.start.advance(n);
            if this.start.is_empty() {
                // Read again whole: its buffer goes.
                this.start = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: ReadReady> ReadReady for Replayed<S> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.start.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_read_ready(cx)
    }

    fn bound_waits(&mut self, end: Option<tokio::time::Instant>) {
        self.inner.bound_waits(end)
    }

    fn moved_at(&mut self, at: tokio::time::Instant) {
        self.inner.moved_at(at)
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Replayed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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

    #[test]
    fn the_preface_or_any_part_of_it_waits_anything_else_is_http1() {
        assert_eq!(verdict(b""), None);
        assert_eq!(verdict(b"PRI * HTTP/2"), None);
        assert_eq!(verdict(H2_PREFACE), Some(Speaks::Http2));
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(b"\0\0\x12\x04");
        assert_eq!(verdict(&more), Some(Speaks::Http2));
        assert_eq!(verdict(b"GET / HTTP/1.1\r\n"), Some(Speaks::Http1));
        assert_eq!(verdict(b"PRI * HTTP/1.1\r\n"), Some(Speaks::Http1));
        assert_eq!(verdict(b"P"), None);
        assert_eq!(verdict(b"\r\n"), Some(Speaks::Http1));
    }

    #[tokio::test]
    async fn a_preface_in_pieces_is_read_to_its_end_and_every_byte_is_read_again() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let mut start = BytesMut::new();
        client.write_all(&H2_PREFACE[..5]).await.unwrap();
        // Not enough to tell: waits (and keeps what it read) until cancelled.
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            first_bytes(&mut server, &mut start),
        )
        .await;
        assert!(waited.is_err());
        assert_eq!(&start[..], &H2_PREFACE[..5]);
        client.write_all(&H2_PREFACE[5..]).await.unwrap();
        client.write_all(b"frames").await.unwrap();
        let speaks = first_bytes(&mut server, &mut start).await.unwrap();
        assert_eq!(speaks, Some(Speaks::Http2));
        drop(client);
        let mut all = Vec::new();
        let mut server = Replayed::new(server, start.freeze());
        server.read_to_end(&mut all).await.unwrap();
        assert_eq!(&all[..H2_PREFACE.len()], H2_PREFACE);
        assert_eq!(&all[H2_PREFACE.len()..], b"frames");
    }

    #[tokio::test]
    async fn an_http1_head_is_told_from_one_read_and_handed_on_whole() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        client.write_all(head).await.unwrap();
        let mut start = BytesMut::new();
        let speaks = first_bytes(&mut server, &mut start).await.unwrap();
        assert_eq!(speaks, Some(Speaks::Http1));
        assert_eq!(&start[..], head, "everything the socket had, in one read");
        // Read back through small reads: the prefix comes out in order, then the stream.
        client.write_all(b"next").await.unwrap();
        drop(client);
        let mut server = Replayed::new(server, start.freeze());
        let mut all = Vec::new();
        let mut small = [0u8; 5];
        loop {
            let n = server.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            all.extend_from_slice(&small[..n]);
        }
        assert_eq!(&all[..head.len()], head);
        assert_eq!(&all[head.len()..], b"next");
    }

    #[tokio::test]
    async fn a_stream_that_ends_first_says_so() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let mut start = BytesMut::new();
        assert_eq!(first_bytes(&mut server, &mut start).await.unwrap(), None);

        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PRI").await.unwrap();
        drop(client);
        let mut start = BytesMut::new();
        assert_eq!(
            first_bytes(&mut server, &mut start).await.unwrap(),
            Some(Speaks::Http1)
        );
        assert_eq!(&start[..], b"PRI");
    }
}
