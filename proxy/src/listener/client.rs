//! A client's socket, added to the runtime's event loop only once it has to wait.
//!
//! A plain client connection that sends its request right after connecting, is answered
//! and closed (a new connection per request) never waits: its request is in the socket
//! when it is accepted, and the answer fits in the socket's send buffer. Registered at
//! accept, as a tokio `TcpStream` is, it cost two `epoll_ctl` calls (add, then remove when
//! it closed) and tokio's registration (its readiness slot, allocated and released) for
//! nothing. HAProxy reads a new connection before it subscribes to its events too.
//!
//! [`ClientSocket`] reads and writes the socket directly until a read or write finds it
//! not ready, and only then registers it, once, and waits as a tokio `TcpStream` from
//! there on. Nothing is lost in between: epoll reports a socket's readiness as of the
//! moment it is added, so bytes that arrived after the failed read wake the wait at once.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::idle::ReadReady;

/// The most a read of a socket not yet registered takes, into a buffer on the stack: a
/// read into the caller's memory would have to clear it first (reading into memory never
/// written is not possible without `unsafe`), cache lines the request may never reach,
/// where the stack's are in use anyway; the bytes read are then copied, once. About what
/// a request head takes. A read that fills it registers the socket: what follows (a
/// larger head, a body) is read by the registered stream, in larger pieces.
const DIRECT_READ: usize = 2048;

/// A plain client socket: direct system calls until one would block, then a registered
/// tokio stream (see the module doc).
#[derive(Debug)]
pub struct ClientSocket {
    state: State,
    /// Writes say more is coming (`MSG_MORE`): their last partial segment waits for the
    /// end of the stream (see [`ReadReady::end_with_next_write`]).
    held: bool,
}

#[derive(Debug)]
enum State {
    /// Not in the event loop: reads and writes go straight to the socket.
    Direct(std::net::TcpStream),
    /// Registered with the runtime of the task that first waited on it.
    Registered(TcpStream),
    /// Registration failed (the socket was closed with the error).
    Gone,
}

impl ClientSocket {
    /// A non-blocking socket, not registered anywhere.
    pub fn new(socket: std::net::TcpStream) -> ClientSocket {
        ClientSocket {
            state: State::Direct(socket),
            held: false,
        }
    }

    /// Whether it is still unregistered (for tests).
    pub fn is_direct(&self) -> bool {
        matches!(self.state, State::Direct(_))
    }

    /// The stream registered with the current runtime (registering it now if it is not).
    pub fn into_registered(self) -> io::Result<TcpStream> {
        match self.state {
            State::Direct(socket) => TcpStream::from_std(socket),
            State::Registered(stream) => Ok(stream),
            State::Gone => Err(gone()),
        }
    }

    /// Registers the socket with the current runtime, if it is not yet: it is about to wait.
    fn registered(&mut self) -> io::Result<&mut TcpStream> {
        if let State::Direct(_) = self.state {
            let State::Direct(socket) = std::mem::replace(&mut self.state, State::Gone) else {
                unreachable!("matched above");
            };
            self.state = State::Registered(TcpStream::from_std(socket)?);
        }
        match &mut self.state {
            State::Registered(stream) => Ok(stream),
            State::Direct(_) | State::Gone => Err(gone()),
        }
    }

    /// Sends small writes at once (`TCP_NODELAY`).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match &self.state {
            State::Direct(socket) => socket.set_nodelay(on),
            State::Registered(stream) => stream.set_nodelay(on),
            State::Gone => Err(gone()),
        }
    }

    /// A write that says more is coming (`MSG_MORE`), directly or, once it would block,
    /// on the registered stream.
    fn poll_write_held(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let send = |socket: socket2::SockRef<'_>| {
            socket.send_vectored_with_flags(bufs, libc::MSG_MORE | libc::MSG_NOSIGNAL)
        };
        if let State::Direct(socket) = &self.state {
            if let Some(written) = unless_blocked(|| send(socket2::SockRef::from(socket))) {
                return Poll::Ready(written);
            }
        }
        let stream = match self.registered() {
            Ok(stream) => stream,
            Err(e) => return Poll::Ready(Err(e)),
        };
        loop {
            if let Err(e) = std::task::ready!(stream.poll_write_ready(cx)) {
                return Poll::Ready(Err(e));
            }
            match stream.try_io(tokio::io::Interest::WRITABLE, || {
                send(socket2::SockRef::from(&*stream))
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
        }
    }

    /// The socket, for options the stream types do not offer.
    pub fn sock_ref(&self) -> Option<socket2::SockRef<'_>> {
        match &self.state {
            State::Direct(socket) => Some(socket2::SockRef::from(socket)),
            State::Registered(stream) => Some(socket2::SockRef::from(stream)),
            State::Gone => None,
        }
    }
}

/// A direct system call's result, repeated when interrupted; `None` when it would block
/// (the socket is then registered and waited on).
fn unless_blocked<T>(mut call: impl FnMut() -> io::Result<T>) -> Option<io::Result<T>> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            result => return Some(result),
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket closed")
}

impl AsyncRead for ClientSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Direct(socket) = &this.state {
            let mut direct = [0u8; DIRECT_READ];
            let room = buf.remaining().min(DIRECT_READ);
            match unless_blocked(|| (&*socket).read(&mut direct[..room])) {
                Some(Ok(n)) => {
                    buf.put_slice(&direct[..n]);
                    if n == DIRECT_READ {
                        // More is likely waiting: read on as a registered stream.
                        if let Err(e) = this.registered() {
                            return Poll::Ready(Err(e));
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => {}
            }
        }
        match this.registered() {
            Ok(stream) => Pin::new(stream).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held {
            return this.poll_write_held(cx, &[IoSlice::new(buf)]);
        }
        if let State::Direct(socket) = &this.state {
            if let Some(written) = unless_blocked(|| (&*socket).write(buf)) {
                return Poll::Ready(written);
            }
        }
        match this.registered() {
            Ok(stream) => Pin::new(stream).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held {
            return this.poll_write_held(cx, bufs);
        }
        if let State::Direct(socket) = &this.state {
            if let Some(written) = unless_blocked(|| (&*socket).write_vectored(bufs)) {
                return Poll::Ready(written);
            }
        }
        match this.registered() {
            Ok(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Direct(socket) => Poll::Ready(match socket.shutdown(Shutdown::Write) {
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                result => result,
            }),
            State::Registered(stream) => Pin::new(stream).poll_shutdown(cx),
            State::Gone => Poll::Ready(Ok(())),
        }
    }
}

impl ReadReady for ClientSocket {
    /// A wait: the socket is registered for it.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.registered() {
            Ok(stream) => stream.poll_read_ready(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn into_socket(self) -> Result<io::Result<std::net::TcpStream>, Self> {
        Ok(match self.state {
            State::Direct(socket) => Ok(socket),
            State::Registered(stream) => stream.into_std(),
            State::Gone => Err(gone()),
        })
    }

    fn is_plain_socket(&self) -> bool {
        true
    }

    fn closes_cleanly_on_drop(&self) -> bool {
        !self.held
    }

    fn send_at_once(&mut self) {
        // Failing only on a socket that is gone, which the next write reports.
        let _ = self.set_nodelay(true);
    }

    fn end_with_next_write(&mut self) {
        self.held = true;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::TcpListener;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A connected pair: the accepted side as a direct client socket, and its peer.
    fn pair() -> (ClientSocket, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        (ClientSocket::new(accepted), peer)
    }

    #[tokio::test]
    async fn bytes_already_there_are_read_and_answered_without_registering() {
        let (mut socket, mut peer) = pair();
        peer.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        // Loopback delivers at once; the read below must find the bytes.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut buf = [0u8; 64];
        let n = socket.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        socket
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        socket.shutdown().await.unwrap();
        assert!(socket.is_direct(), "registered without ever waiting");
        let mut answer = Vec::new();
        peer.read_to_end(&mut answer).unwrap();
        assert_eq!(answer, b"HTTP/1.1 204 No Content\r\n\r\n");
    }

    #[tokio::test]
    async fn a_read_that_fills_the_direct_buffer_registers_for_the_rest() {
        let (mut socket, mut peer) = pair();
        let head = vec![b'h'; 3000];
        peer.write_all(&head).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut buf = vec![0u8; 8192];
        let n = socket.read(&mut buf).await.unwrap();
        assert_eq!(n, DIRECT_READ);
        assert!(!socket.is_direct(), "more was waiting: registered");
        let rest = socket.read(&mut buf).await.unwrap();
        assert_eq!(n + rest, head.len());
    }

    #[tokio::test]
    async fn a_read_that_finds_nothing_registers_and_wakes_when_bytes_come() {
        let (mut socket, mut peer) = pair();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            peer.write_all(b"late").unwrap();
            peer
        });
        let mut buf = [0u8; 16];
        let n = socket.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"late");
        assert!(!socket.is_direct(), "a wait registers the socket");
        let mut peer = writer.join().unwrap();
        // Registered, it reads and writes on as a tokio stream.
        socket.write_all(b"ok").await.unwrap();
        let mut answer = [0u8; 2];
        peer.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"ok");
        drop(socket);
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn waiting_for_readiness_registers_and_the_socket_can_be_taken_out_again() {
        let (mut socket, mut peer) = pair();
        peer.write_all(b"x").unwrap();
        std::future::poll_fn(|cx| socket.poll_read_ready(cx))
            .await
            .unwrap();
        assert!(!socket.is_direct());
        let std_socket = match socket.into_socket() {
            Ok(socket) => socket.unwrap(),
            Err(_) => panic!("a plain socket can be taken out"),
        };
        let mut byte = [0u8; 1];
        std_socket.set_nonblocking(false).unwrap();
        (&std_socket).read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }

    #[tokio::test]
    async fn held_writes_wait_for_the_end_of_the_stream_and_leave_with_it() {
        for registered in [false, true] {
            let (mut socket, mut peer) = pair();
            if registered {
                socket.registered().unwrap();
            }
            assert!(socket.closes_cleanly_on_drop());
            socket.end_with_next_write();
            assert!(
                !socket.closes_cleanly_on_drop(),
                "held bytes need the shutdown"
            );
            // A small response and a large one: the large one's full segments go, its last
            // partial one waits with the small one's.
            let small = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
            socket.write_all(&small).await.unwrap();
            peer.set_nonblocking(true).unwrap();
            // Loopback delivers at once what is sent; nothing was.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut buf = [0u8; 64];
            let waiting = (&peer).read(&mut buf).unwrap_err();
            assert_eq!(
                waiting.kind(),
                io::ErrorKind::WouldBlock,
                "sent before the end"
            );
            let large: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            let reader = std::thread::spawn(move || {
                peer.set_nonblocking(false).unwrap();
                let mut got = Vec::new();
                peer.read_to_end(&mut got).unwrap();
                got
            });
            socket.write_all(&large).await.unwrap();
            socket.shutdown().await.unwrap();
            let got = reader.join().unwrap();
            assert_eq!(got.len(), small.len() + large.len());
            assert_eq!(&got[..small.len()], &small[..]);
            assert!(got[small.len()..] == large[..]);
        }
    }

    #[tokio::test]
    async fn a_large_request_is_read_whole_across_direct_and_registered_reads() {
        let (mut socket, mut peer) = pair();
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = body.clone();
        let writer = std::thread::spawn(move || {
            peer.write_all(&sent).unwrap();
            peer.shutdown(Shutdown::Write).unwrap();
            peer
        });
        let mut got = Vec::new();
        socket.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, body);
        // A read that took all a direct read takes handed the rest to the registered stream.
        assert!(!socket.is_direct());
        writer.join().unwrap();
    }
}
