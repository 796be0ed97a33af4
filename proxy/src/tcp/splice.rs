//! Forwarding between two plain TCP sockets, HAProxy's `splice-auto` way: each direction
//! starts by copying through a user-space buffer, and once a read fills the whole buffer
//! (a bulk transfer) it moves its bytes with splice(2) from the source socket into a pipe
//! and from the pipe into the destination socket, so that the payload no longer enters
//! this process. Used when both sides are plain TCP; TLS-terminated clients and TLS or
//! unix-socket upstreams keep the user-space copy of [`super::copy`].
//!
//! A short exchange (a request and its answer on a new connection) thus costs a read and
//! a write per direction and takes no pipe, where splicing it would take two pipes and one
//! more system call per direction; a bulk transfer pays the copy for its first buffer only.
//! A buffer is held only while it holds bytes and goes back to the thread's stock at once,
//! so an idle stream holds neither buffer nor pipe (unless it once spliced).
//!
//! The behaviour is the user-space copy's: half-close (a source's end of stream shuts the
//! destination's write half down and the other direction goes on), an error in either
//! direction ends both, the client's idle timeout counts bytes moved either way, and the
//! bytes written each way are counted. When both directions have ended, the last one does
//! not shut its destination down: the sockets are closed right after, which ends the
//! stream the same way, for one system call less per stream.
//!
//! Pipes come from a per-thread stock, like the copy buffers: creating one is a
//! `pipe2` and a `fcntl`, and closing it two `close`. Only an empty pipe goes back to the
//! stock; one that still holds bytes (a stream that ended in an error) is closed.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::OwnedFd;
use std::task::{ready, Context, Poll};

use rustix::pipe::{fcntl_getpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy::{Buffer, Tally};
use super::spare;
use crate::listener::IdleTimeout;

/// The pipe capacity a splice direction needs to move as much per system call as the
/// user-space copy's buffer (the kernel's default pipe size). Over the user's pipe quota
/// (`/proc/sys/fs/pipe-user-pages-soft`) the kernel makes one-page pipes, which would cut
/// a large transfer into 4 KiB steps: then the direction keeps copying instead.
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

/// Bytes read into user space and not yet written: `buffer[start..end]`.
struct Held {
    buffer: Buffer,
    start: usize,
    end: usize,
}

/// One direction of the forwarding.
#[derive(Default)]
struct OneWay {
    /// What the last read brought, while some of it is still to be written.
    held: Option<Held>,
    /// Set once a read filled a whole buffer, if a pipe could be had: from then on the
    /// bytes move through it.
    pipe: Option<Pipe>,
    /// The source ended its writing.
    eof: bool,
    /// This direction is over (the source ended and everything was written).
    done: bool,
    /// Waiting for the source to become readable (not for the destination to drain).
    waits_to_read: bool,
    copied: u64,
}

impl OneWay {
    /// Moves bytes from `from` to `to` until `from` ends, then shuts `to`'s write half
    /// down unless `last` (the other direction is over: the stream is about to close).
    /// Sets `moved` when a byte moved in this call.
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        last: bool,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        self.waits_to_read = false;
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // What was read goes out first, and a read only follows into an empty buffer
            // or pipe: a wait is always for a socket, never for a pipe.
            if let Some(held) = &mut self.held {
                while held.start < held.end {
                    ready!(to.poll_write_ready(cx))?;
                    match to.try_write(&held.buffer.bytes()[held.start..held.end]) {
                        Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        Ok(n) => {
                            held.start += n;
                            self.copied += n as u64;
                            *moved = true;
                        }
                        // tokio cleared the readiness: the next poll waits for the socket.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                // Empty: back to the stock, not kept while the source is quiet.
                self.held = None;
            }
            if let Some(pipe) = &mut self.pipe {
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
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
            if self.eof {
                if !last {
                    socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                }
                if let Some(pipe) = self.pipe.take() {
                    pipe.give_back();
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if from.poll_read_ready(cx)?.is_pending() {
                self.waits_to_read = true;
                return Poll::Pending;
            }
            match &mut self.pipe {
                Some(pipe) => {
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
                None => {
                    let mut buffer = Buffer::take();
                    match read_drained(from, buffer.bytes()) {
                        Ok(0) => self.eof = true,
                        Ok(n) => {
                            if n == buffer.bytes().len() {
                                // A bulk transfer: splice what follows, if a pipe can be had.
                                self.pipe = Pipe::take();
                            }
                            self.held = Some(Held {
                                buffer,
                                start: 0,
                                end: n,
                            });
                            *moved = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
        }
    }
}

/// Reads what `from` holds into `buf`, once, after a readiness event. A read that fills
/// less than `buf` found the socket drained, so the readiness is cleared as if the read had
/// been refused and the next read waits for new bytes instead of trying once more in vain
/// (as tokio's own stream reads do). A splice gives no such sign: a pipe's slots can run
/// out before the socket is drained.
fn read_drained(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let len = buf.len();
    let mut drained = 0;
    let read = from.try_io(Interest::READABLE, || {
        let n = rustix::io::read(from, &mut *buf).map_err(io::Error::from)?;
        if n > 0 && n < len {
            drained = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match read {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && drained > 0 => Ok(drained),
        other => other,
    }
}

/// Forwards `client` to `upstream` and back until both have ended their writing, keeping
/// `tally` of the bytes written; the client's idle timeout applies as in the user-space
/// copy (only a wait for the client's bytes can time out, and bytes moving either way are
/// activity). An error in either direction ends both.
pub async fn both_ways(
    client: &mut IdleTimeout<TcpStream>,
    upstream: &TcpStream,
    tally: &Tally,
) -> io::Result<()> {
    let mut forth = OneWay::default();
    let mut back = OneWay::default();
    poll_fn(|cx| {
        let mut moved = false;
        let up = forth.poll_move(cx, client.get_ref(), upstream, back.done, &mut moved);
        let down = back.poll_move(cx, upstream, client.get_ref(), forth.done, &mut moved);
        tally.set(forth.copied, back.copied);
        if moved {
            client.touch();
        }
        if let (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) = (up, down) {
            return Poll::Ready(Err(e));
        }
        if forth.done && back.done {
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
        let tally = Arc::new(Tally::default());
        let counted = tally.clone();
        let copy = tokio::spawn(async move {
            let mut client = IdleTimeout::new(proxy_client, idle);
            both_ways(&mut client, &proxy_upstream, &counted).await
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

    /// Pipes in this thread's stock (a test runs on a thread of its own, and the copy
    /// task of [`forwarded`] on the same one).
    fn spare_pipes() -> usize {
        SPARE.with(|s| s.borrow().len())
    }

    #[tokio::test]
    async fn a_short_exchange_is_copied_without_a_pipe() {
        let (mut client, mut upstream, tally, copy) = forwarded(Duration::ZERO).await;
        let request = pattern(200, 5);
        client.write_all(&request).await.expect("client writes");
        let mut got = vec![0; request.len()];
        upstream.read_exact(&mut got).await.expect("upstream reads");
        assert!(got == request);
        let answer = pattern(20_000, 6);
        upstream.write_all(&answer).await.expect("upstream writes");
        upstream.shutdown().await.expect("upstream half-closes");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("client reads");
        assert!(
            back == answer,
            "the client got the answer, then end of stream"
        );
        client.shutdown().await.expect("client half-closes");
        let mut rest = Vec::new();
        upstream
            .read_to_end(&mut rest)
            .await
            .expect("upstream reads");
        assert!(rest.is_empty());
        copy.await.expect("copy task").expect("copy");
        assert_eq!(
            (tally.up(), tally.down()),
            (request.len() as u64, answer.len() as u64)
        );
        assert_eq!(
            spare_pipes(),
            0,
            "no pipe was made (one taken would have gone back to the stock)"
        );
    }

    #[tokio::test]
    async fn a_bulk_transfer_moves_through_a_pipe_that_goes_back_to_the_stock() {
        let (mut client, mut upstream, tally, copy) = forwarded(Duration::ZERO).await;
        // Far more than a buffer, written before the copy reads: a read fills the buffer.
        let answer = pattern(4 << 20, 7);
        let sent = answer.clone();
        let writer = tokio::spawn(async move {
            upstream.write_all(&sent).await?;
            upstream.shutdown().await?;
            let mut rest = Vec::new();
            upstream.read_to_end(&mut rest).await?;
            io::Result::Ok(rest)
        });
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("client reads");
        assert!(back == answer, "the answer arrived intact and in order");
        client.shutdown().await.expect("client half-closes");
        let rest = writer.await.expect("writer task").expect("upstream io");
        assert!(rest.is_empty());
        copy.await.expect("copy task").expect("copy");
        assert_eq!(tally.down(), answer.len() as u64);
        assert_eq!(
            spare_pipes(),
            1,
            "the answer's direction took a pipe and gave it back; the request's took none"
        );

        let mut pipe = Pipe::take().expect("a pipe");
        assert_eq!(spare_pipes(), 0, "the pipe came from the stock");
        pipe.held = 1;
        pipe.give_back();
        assert_eq!(spare_pipes(), 0, "a pipe holding bytes is closed, not kept");
    }
}
