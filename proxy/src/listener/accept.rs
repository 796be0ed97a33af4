//! The accept side of a data listener: takes connections from a listening socket and starts
//! each one's task on the worker that accepted it; a worker busier than the others by a
//! margin leaves the next connections to them (see [`crate::workers`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpListener;

use super::client::ClientSocket;
use crate::shutdown::Shutdown;
use crate::workers::{Seat, WorkerLoad};

/// New connections of one listening socket, on the runtime that polls it.
#[derive(Debug)]
pub struct Incoming {
    /// Registered with the runtime for its readiness only: connections are accepted with
    /// a system call of this module's (see [`Incoming::accept`]).
    socket: AsyncFd<std::net::TcpListener>,
    /// The worker this runs on, when it is one of the per-core workers; `None` serves
    /// every connection on the runtime that accepted it.
    seat: Option<Seat>,
}

/// A connection just accepted (not registered with the runtime: see [`ClientSocket`]).
#[derive(Debug)]
pub struct Accepted {
    stream: ClientSocket,
    /// The client's address.
    pub client: SocketAddr,
}

impl Incoming {
    /// Accepts from `socket` (non-blocking) on the current runtime; `seat` is the worker
    /// it runs on, if any. Must be called within that runtime.
    pub fn new(socket: std::net::TcpListener, seat: Option<Seat>) -> std::io::Result<Incoming> {
        socket.set_nonblocking(true)?;
        Ok(Incoming {
            socket: watched(socket)?,
            seat,
        })
    }

    /// Accepts from a listener already registered with the current runtime, off the
    /// workers.
    pub fn local(socket: TcpListener) -> std::io::Result<Incoming> {
        Incoming::new(socket.into_std()?, None)
    }

    /// The next connection, once one is waiting and this worker's turn to accept it (see
    /// [`Seat::wait_turn`]).
    pub async fn accept(&self) -> std::io::Result<Accepted> {
        if let Some(seat) = &self.seat {
            seat.wait_turn().await;
        }
        // accept4 with the socket non-blocking from the start, as tokio's own accept does,
        // but without registering it (see `ClientSocket`).
        let (socket, address) = self
            .socket
            .async_io(Interest::READABLE, |socket| {
                socket2::SockRef::from(socket).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            })
            .await?;
        let client = address.as_socket().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "accepted a non-IP socket")
        })?;
        Ok(Accepted {
            stream: ClientSocket::new(socket.into()),
            client,
        })
    }

    /// Where the dormitory of the worker this runs on counts its sleepers, if it is one
    /// of the workers (see [`crate::workers::dormant`]).
    pub fn sleeping(&self) -> Option<&'static AtomicUsize> {
        self.seat.as_ref().and_then(Seat::sleeping)
    }

    /// Starts `serve` for `accepted` on this runtime, as a connection task `shutdown` waits
    /// for. `serve` gets the stream and the connection's count on this worker, to hold
    /// for as long as the connection is open (a dormant connection holds it without its
    /// task).
    pub fn spawn<F, Fut>(&self, shutdown: &Shutdown, accepted: Accepted, serve: F)
    where
        F: FnOnce(ClientSocket, WorkerLoad) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let load = self.seat.map_or_else(WorkerLoad::none, |seat| seat.admit());
        let Accepted { stream, .. } = accepted;
        // Boxed, so that the task is small: tokio copies a task's future whole several
        // times while spawning it (and its stage once more when it ends), and allocates
        // the task 128-byte aligned, which takes the allocator's slow path for a block
        // over 1 KiB. A connection's future is over 1 KiB; boxed it is allocated once,
        // with the usual alignment (callgrind, TCP with a new connection per exchange:
        // 17.4k -> 16.1k instructions per connection).
        shutdown.spawn(crate::boxed::pinned(|| serve(stream, load)));
    }
}

/// `socket` registered with the current runtime for its readiness to accept.
///
/// `AsyncFd::with_interest` is deprecated because it takes any type that names a file
/// descriptor, including one that does not own it (closed and reused elsewhere, the
/// registration would watch another file). A `std::net::TcpListener` owns its descriptor
/// and keeps it until it is dropped with the `AsyncFd`: the condition its `unsafe`
/// replacement asks the caller to uphold holds by the type.
#[allow(deprecated)]
fn watched(socket: std::net::TcpListener) -> std::io::Result<AsyncFd<std::net::TcpListener>> {
    AsyncFd::with_interest(socket, Interest::READABLE)
}

impl Accepted {
    /// Sends small writes at once (TCP_NODELAY): responses are written whole.
    pub fn set_nodelay(&self) -> std::io::Result<()> {
        self.stream.set_nodelay(true)
    }

    /// Closes the connection with a reset (SO_LINGER 0): for a connection refused right
    /// after accept, so that no TIME_WAIT state is left here.
    pub fn reset(self) {
        if let Some(socket) = self.stream.sock_ref() {
            let _ = socket.set_linger(Some(std::time::Duration::ZERO));
        }
    }
}
