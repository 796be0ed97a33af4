//! Writes to a TCP socket made with system calls of proxyd's own (rustix), not through
//! the C library's wrappers.
//!
//! In a process with more than one thread, glibc's `send` and `writev` are cancellation
//! points: each switches the thread to asynchronous cancellation before the system call
//! and back after it, an atomic compare-and-swap on the thread's state either side.
//! proxyd never cancels a thread, and on the request path those two instructions cost
//! more than the rest of the wrapper (`perf annotate`: most of the samples of
//! `__pthread_enable_asynccancel` and `__pthread_disable_asynccancel` on the instruction
//! after the swap, together about 2 % of a worker's user time under keep-alive load).
//! The readiness of the socket is kept by tokio exactly as for its own writes: a write
//! that would block clears it ([`TcpStream::try_io`]) and the next one waits for it.
//!
//! Reads still go through tokio: reading into the uninitialised room of a buffer by a
//! system call of one's own takes `unsafe` code, which the workspace allows only in the
//! allocator.

use std::io::{self, IoSlice};
use std::task::{ready, Context, Poll};

use rustix::net::SendFlags;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// `AsyncWrite::poll_write` for a tokio `TcpStream`, by `send(2)`.
pub fn poll_write(stream: &TcpStream, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    poll_writing(stream, cx, || {
        rustix::net::send(stream, buf, SendFlags::NOSIGNAL).map_err(io::Error::from)
    })
}

/// `AsyncWrite::poll_write_vectored` for a tokio `TcpStream`, by `writev(2)`.
pub fn poll_write_vectored(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    poll_writing(stream, cx, || {
        rustix::io::writev(stream, bufs).map_err(io::Error::from)
    })
}

/// Runs `write` once the socket is writable, until it neither would block nor was
/// interrupted.
fn poll_writing(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    mut write: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match stream.try_io(Interest::WRITABLE, &mut write) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            done => return Poll::Ready(done),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::AsyncReadExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn writes_arrive_whole_and_in_order() {
        let (client, mut server) = pair().await;
        let n = poll_fn(|cx| poll_write(&client, cx, b"GET / HTTP/1.1\r\n"))
            .await
            .unwrap();
        assert_eq!(n, 16);
        let parts = [
            IoSlice::new(b"Host: a\r\n"),
            IoSlice::new(b""),
            IoSlice::new(b"\r\n"),
        ];
        let n = poll_fn(|cx| poll_write_vectored(&client, cx, &parts))
            .await
            .unwrap();
        assert_eq!(n, 11);
        drop(client);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    /// A peer that reads nothing fills the socket's buffers: the writes then wait (they
    /// neither fail nor spin), and go on once the peer reads.
    #[tokio::test]
    async fn a_full_socket_waits_for_room_and_then_goes_on() {
        let (client, mut server) = pair().await;
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        // Write until a write would wait.
        loop {
            let attempt = poll_fn(|cx| match poll_write(&client, cx, &chunk) {
                Poll::Pending => Poll::Ready(None),
                Poll::Ready(r) => Poll::Ready(Some(r)),
            })
            .await;
            match attempt {
                Some(r) => written += r.unwrap(),
                None => break,
            }
        }
        assert!(written > 0);
        // Another write waits until the reader drains the socket, then completes.
        let reader = tokio::spawn(async move {
            let mut total = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    return total;
                }
                assert!(buf[..n].iter().all(|b| *b == 7));
                total += n;
            }
        });
        let more = poll_fn(|cx| poll_write(&client, cx, &chunk)).await.unwrap();
        assert!(more > 0);
        drop(client);
        assert_eq!(reader.await.unwrap(), written + more);
    }

    #[tokio::test]
    async fn a_closed_peer_is_an_error_not_a_signal() {
        let (client, server) = pair().await;
        drop(server);
        // The first write may be taken before the reset comes back; a later one fails.
        let mut failed = None;
        for _ in 0..50 {
            match poll_fn(|cx| poll_write(&client, cx, b"x")).await {
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let e = failed.expect("writes to a closed peer fail");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{e:?}"
        );
    }
}
