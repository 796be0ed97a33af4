//! Forwarding between two plain TCP sockets with splice(2): each direction moves its bytes
//! from the source socket into a pipe and from the pipe into the destination socket, so
//! the payload never enters this process (no copy to and from user space). Used when both
//! sides are plain TCP; TLS-terminated clients and TLS or unix-socket upstreams keep the
//! user-space copy of [`super::copy`].
//!
//! The behaviour is the user-space copy's: half-close (a source's end of stream shuts the
//! destination's write half down and the other direction goes on), an error in either
//! direction ends both, the client's idle timeout counts bytes moved either way, and the
//! bytes written each way are counted.
//!
//! Pipes come from a per-thread stock, like the copy buffers: creating one is a
//! `pipe2` and a `fcntl`, and closing it two `close`, which a connection per request
//! would otherwise pay. Only an empty pipe goes back to the stock; one that still holds
//! bytes (a stream that ended in an error) is closed.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::OwnedFd;
use std::task::{ready, Context, Poll};

use rustix::pipe::{fcntl_getpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy::Tally;
use super::spare;
use crate::listener::IdleTimeout;

/// The pipe capacity a splice direction needs to move as much per system call as the
/// user-space copy's buffer (the kernel's default pipe size). Over the user's pipe quota
/// (`/proc/sys/fs/pipe-user-pages-soft`) the kernel makes one-page pipes, which would cut
/// a large transfer into 4 KiB steps: then the user-space copy is used instead.
const PIPE_CAPACITY: usize = 64 * 1024;

/// Free pipes kept per thread (two descriptors each).
const SPARE_PIPES: usize = 32;

thread_local! {
    static SPARE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe and the bytes it holds.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Spliced in, not yet spliced out.
    held: usize,
}

impl Pipe {
    /// A pipe from this thread's stock, or a new one; `None` when none can be made at the
    /// full capacity (descriptors or the pipe quota exhausted).
    fn take() -> Option<Pipe> {
        if let Some(pipe) = spare::take(&SPARE) {
            return Some(pipe);
        }
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).ok()?;
        if fcntl_getpipe_size(&read).ok()? < PIPE_CAPACITY {
            return None;
        }
        Some(Pipe {
            read,
            write,
            held: 0,
        })
    }

    /// Puts an empty pipe back into the stock; one that holds bytes is closed.
    fn give_back(self) {
        if self.held == 0 {
            spare::keep(&SPARE, self, SPARE_PIPES);
        }
    }
}

/// The pipes for both directions of one stream.
#[derive(Debug)]
pub struct Pipes([Pipe; 2]);

impl Pipes {
    /// Two pipes, or `None` when they cannot be had: the stream is then copied in user
    /// space.
    pub fn take() -> Option<Pipes> {
        let first = Pipe::take()?;
        match Pipe::take() {
            Some(second) => Some(Pipes([first, second])),
            None => {
                first.give_back();
                None
            }
        }
    }
}

/// One direction of the forwarding.
struct OneWay {
    /// `None` once this direction is done (its pipe went back to the stock or closed).
    pipe: Option<Pipe>,
    /// The source ended its writing.
    eof: bool,
    /// Waiting for the source to become readable (not for the destination to drain).
    waits_to_read: bool,
    copied: u64,
}

impl OneWay {
    fn new(pipe: Pipe) -> OneWay {
        OneWay {
            pipe: Some(pipe),
            eof: false,
            waits_to_read: false,
            copied: 0,
        }
    }

    /// Moves bytes from `from` to `to` until `from` ends, then shuts `to`'s write half
    /// down. Sets `moved` when a byte moved in this call.
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        self.waits_to_read = false;
        let Some(pipe) = &mut self.pipe else {
            return Poll::Ready(Ok(()));
        };
        loop {
            // What the pipe holds goes out first: a read only follows into an empty pipe,
            // so a splice that would block blocks on the socket, never on the pipe.
            while pipe.held > 0 {
                ready!(to.poll_write_ready(cx))?;
                let out = to.try_io(Interest::WRITABLE, || {
                    splice(
                        &pipe.read,
                        None,
                        to,
                        None,
                        pipe.held,
                        SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
                    )
                    .map_err(io::Error::from)
                });
                match out {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        pipe.held -= n;
                        self.copied += n as u64;
                        *moved = true;
                    }
                    // tokio cleared the readiness: the next poll waits for the socket.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if self.eof {
                socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                if let Some(pipe) = self.pipe.take() {
                    pipe.give_back();
                }
                return Poll::Ready(Ok(()));
            }
            if from.poll_read_ready(cx)?.is_pending() {
                self.waits_to_read = true;
                return Poll::Pending;
            }
            let read = from.try_io(Interest::READABLE, || {
                splice(
                    from,
                    None,
                    &pipe.write,
                    None,
                    PIPE_CAPACITY,
                    SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
                )
                .map_err(io::Error::from)
            });
            match read {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    pipe.held = n;
                    *moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Forwards `client` to `upstream` and back through `pipes` until both have ended their
/// writing, keeping `tally` of the bytes written; the client's idle timeout applies as in
/// the user-space copy (only a wait for the client's bytes can time out, and bytes moving
/// either way are activity). An error in either direction ends both.
pub async fn both_ways(
    client: &mut IdleTimeout<TcpStream>,
    upstream: &TcpStream,
    pipes: Pipes,
    tally: &Tally,
) -> io::Result<()> {
    let [forth_pipe, back_pipe] = pipes.0;
    let mut forth = OneWay::new(forth_pipe);
    let mut back = OneWay::new(back_pipe);
    poll_fn(|cx| {
        let mut moved = false;
        let up = forth.poll_move(cx, client.get_ref(), upstream, &mut moved);
        let down = back.poll_move(cx, upstream, client.get_ref(), &mut moved);
        tally.set(forth.copied, back.copied);
        if moved {
            client.touch();
        }
        if let (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) = (up, down) {
            return Poll::Ready(Err(e));
        }
        if forth.pipe.is_none() && back.pipe.is_none() {
            return Poll::Ready(Ok(()));
        }
        if forth.waits_to_read {
            if let Poll::Ready(e) = client.poll_idle(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    /// client <-> (proxy_client | splice | proxy_upstream) <-> upstream
    async fn forwarded(
        idle: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        Arc<Tally>,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let (client, proxy_client) = pair().await;
        let (proxy_upstream, upstream) = pair().await;
        let pipes = Pipes::take().expect("pipes");
        let tally = Arc::new(Tally::default());
        let counted = tally.clone();
        let copy = tokio::spawn(async move {
            let mut client = IdleTimeout::new(proxy_client, idle);
            both_ways(&mut client, &proxy_upstream, pipes, &counted).await
        });
        (client, upstream, tally, copy)
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect()
    }

    #[tokio::test]
    async fn moves_large_transfers_both_ways_at_once_intact() {
        let (mut client, mut upstream, tally, copy) = forwarded(Duration::ZERO).await;
        let request = pattern(9 << 20, 1);
        let answer = pattern(7 << 20, 2);
        let (req, ans) = (request.clone(), answer.clone());
        let client_side = tokio::spawn(async move {
            let (mut r, mut w) = client.split();
            let send = async {
                w.write_all(&req).await?;
                w.shutdown().await
            };
            let mut got = Vec::new();
            let (sent, read) = tokio::join!(send, r.read_to_end(&mut got));
            sent?;
            read?;
            io::Result::Ok(got)
        });
        let (mut r, mut w) = upstream.split();
        let send = async {
            w.write_all(&ans).await?;
            w.shutdown().await
        };
        let mut got = Vec::new();
        let (sent, read) = tokio::join!(send, r.read_to_end(&mut got));
        sent.expect("upstream writes");
        read.expect("upstream reads");
        assert!(got == request, "the upstream got the request intact");
        let back = client_side.await.expect("client task").expect("client io");
        assert!(back == answer, "the client got the answer intact");
        copy.await.expect("copy task").expect("copy");
        assert_eq!(
            (tally.up(), tally.down()),
            (request.len() as u64, answer.len() as u64)
        );
    }

    #[tokio::test]
    async fn the_upstream_may_end_first_and_the_client_go_on_sending() {
        let (mut client, mut upstream, tally, copy) = forwarded(Duration::ZERO).await;
        upstream.write_all(b"greeting").await.expect("write");
        upstream.shutdown().await.expect("upstream half-closes");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("client reads");
        assert_eq!(
            got, b"greeting",
            "the client saw the bytes, then end of stream"
        );
        // The client's half is still open and still forwarded.
        let late = pattern(300_000, 3);
        client.write_all(&late).await.expect("client writes after");
        client.shutdown().await.expect("client half-closes");
        let mut up = Vec::new();
        upstream.read_to_end(&mut up).await.expect("upstream reads");
        assert!(
            up == late,
            "the upstream got what the client sent after its end"
        );
        copy.await.expect("copy task").expect("copy");
        assert_eq!((tally.up(), tally.down()), (late.len() as u64, 8));
    }

    #[tokio::test]
    async fn a_reset_mid_transfer_ends_both_ways_with_the_bytes_counted() {
        let (mut client, upstream, tally, copy) = forwarded(Duration::ZERO).await;
        let mut upstream = upstream;
        let sent = pattern(100_000, 4);
        upstream.write_all(&sent).await.expect("write");
        let mut got = vec![0; sent.len()];
        client.read_exact(&mut got).await.expect("client reads");
        assert!(got == sent);
        // An abortive close: RST instead of FIN.
        socket2::SockRef::from(&upstream)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(upstream);
        let copied = tokio::time::timeout(Duration::from_secs(10), copy)
            .await
            .expect("the copy ends")
            .expect("copy task");
        assert!(copied.is_err(), "the reset is an error: {copied:?}");
        assert_eq!(tally.down(), sent.len() as u64);
        // The client's connection is closed, not left open.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
            .await
            .expect("the client's connection ends");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn an_idle_stream_times_out_and_traffic_keeps_it_open() {
        let (mut client, mut upstream, tally, copy) = forwarded(Duration::from_secs(1)).await;
        // Only the upstream talks, more often than the timeout and for longer than it: the
        // stream stays open.
        for _ in 0..12 {
            upstream.write_all(b"tick").await.expect("write");
            let mut b = [0; 4];
            client.read_exact(&mut b).await.expect("read");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!copy.is_finished(), "traffic kept the stream open");
        let copied = tokio::time::timeout(Duration::from_secs(10), copy)
            .await
            .expect("the idle stream ends")
            .expect("copy task");
        let error = copied.expect_err("an idle timeout");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(tally.down(), 48);
    }

    #[tokio::test]
    async fn empty_pipes_are_reused_and_full_ones_are_not() {
        let (mut client, mut upstream, _tally, copy) = forwarded(Duration::ZERO).await;
        client.shutdown().await.expect("shutdown");
        upstream.shutdown().await.expect("shutdown");
        let mut sink = Vec::new();
        client.read_to_end(&mut sink).await.expect("read");
        upstream.read_to_end(&mut sink).await.expect("read");
        copy.await.expect("copy task").expect("copy");
        // The copy ran on another task of this test's runtime, which has one thread.
        let spare = SPARE.with(|s| s.borrow().len());
        assert!(
            spare >= 2,
            "both pipes went back to the stock, found {spare}"
        );

        let mut pipe = Pipe::take().expect("a pipe");
        pipe.held = 1;
        pipe.give_back();
        assert_eq!(
            SPARE.with(|s| s.borrow().len()),
            spare - 1,
            "a pipe holding bytes is closed, not kept"
        );
    }
}
