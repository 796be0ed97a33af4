//! Pausable accept loops for the management API (its unix socket and its TCP listener).
//!
//! During an upgrade both processes hold the same listening sockets. Data connections may be
//! accepted by either (both serve them correctly), but a management connection must reach
//! the process that owns the state store. So the old process pauses its management accept
//! loops before it closes its store; connections wait in the kernel backlog until the new
//! process accepts them. If the upgrade fails, accepting resumes.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use futures_util::Stream;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Pauses and resumes one or more accept loops.
#[derive(Debug, Default)]
pub struct AcceptGate {
    paused: AtomicBool,
    /// Held while a poll may accept, so `pause` can wait out one in progress.
    accepting: Mutex<()>,
    /// One per accept loop behind the gate, woken on `resume`.
    wakers: Mutex<Vec<Arc<AtomicWaker>>>,
}

impl AcceptGate {
    /// Stops accepting; when this returns, no connection will be accepted until `resume`.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        drop(self.accepting.lock());
    }

    /// Accepts again.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        let wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        for waker in wakers.iter() {
            waker.wake();
        }
    }

    fn waker(&self) -> Arc<AtomicWaker> {
        let waker = Arc::new(AtomicWaker::new());
        self.wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(waker.clone());
        waker
    }
}

/// A listening socket a gated accept loop can poll.
pub trait Accept {
    /// An accepted connection.
    type Conn;
    /// Accepts a connection when one is waiting.
    fn poll_accept_conn(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<Self::Conn>>;
}

impl Accept for UnixListener {
    type Conn = UnixStream;
    fn poll_accept_conn(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<UnixStream>> {
        self.poll_accept(cx).map_ok(|(stream, _)| stream)
    }
}

impl Accept for TcpListener {
    type Conn = TcpStream;
    fn poll_accept_conn(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<TcpStream>> {
        self.poll_accept(cx).map_ok(|(stream, _)| stream)
    }
}

/// Connections of a listener, subject to an [`AcceptGate`].
pub struct GatedIncoming<L> {
    listener: L,
    gate: Arc<AcceptGate>,
    waker: Arc<AtomicWaker>,
}

impl<L: Accept> GatedIncoming<L> {
    /// Accepts from `listener` while `gate` is open.
    pub fn new(listener: L, gate: Arc<AcceptGate>) -> Self {
        let waker = gate.waker();
        GatedIncoming {
            listener,
            gate,
            waker,
        }
    }
}

impl<L: Accept + Unpin> Stream for GatedIncoming<L> {
    type Item = std::io::Result<L::Conn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.waker.register(cx.waker());
        let Ok(_accepting) = this.gate.accepting.lock() else {
            return Poll::Ready(None);
        };
        if this.gate.paused.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        this.listener.poll_accept_conn(cx).map(Some)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::time::Duration;

    #[tokio::test]
    async fn a_paused_gate_holds_every_listener_behind_it_until_resumed() {
        let gate = Arc::new(AcceptGate::default());
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gate.sock");
        let unix = UnixListener::bind(&path).unwrap();
        let mut tcp_incoming = GatedIncoming::new(tcp, gate.clone());
        let mut unix_incoming = GatedIncoming::new(unix, gate.clone());

        gate.pause();
        let _tcp_client = TcpStream::connect(tcp_addr).await.unwrap();
        let _unix_client = UnixStream::connect(&path).await.unwrap();
        // Connected (in the backlog) but not accepted while paused.
        let waited = tokio::time::timeout(Duration::from_millis(200), tcp_incoming.next()).await;
        assert!(waited.is_err(), "TCP accepted while paused");
        let waited = tokio::time::timeout(Duration::from_millis(200), unix_incoming.next()).await;
        assert!(waited.is_err(), "unix accepted while paused");

        // Both pending accept loops are woken by one resume.
        let tcp_task = tokio::spawn(async move { tcp_incoming.next().await.map(|r| r.is_ok()) });
        let unix_task = tokio::spawn(async move { unix_incoming.next().await.map(|r| r.is_ok()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.resume();
        let accepted = tokio::time::timeout(Duration::from_secs(10), async {
            (tcp_task.await.unwrap(), unix_task.await.unwrap())
        })
        .await
        .expect("both accept after resume");
        assert_eq!(accepted, (Some(true), Some(true)));
    }
}
