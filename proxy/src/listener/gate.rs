//! A pausable accept loop for the management socket.
//!
//! During an upgrade both processes hold the same listening socket. Data connections may be
//! accepted by either (both serve them correctly), but a management connection must reach
//! the process that owns the state store. So the old process pauses its management accept
//! loop before it closes its store; connections wait in the kernel backlog until the new
//! process accepts them. If the upgrade fails, accepting resumes.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use futures_util::Stream;
use tokio::net::{UnixListener, UnixStream};

/// Pauses and resumes an accept loop.
#[derive(Debug, Default)]
pub struct AcceptGate {
    paused: AtomicBool,
    /// Held while a poll may accept, so `pause` can wait out one in progress.
    accepting: Mutex<()>,
    waker: AtomicWaker,
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
        self.waker.wake();
    }
}

/// Connections of a unix listener, subject to an [`AcceptGate`].
pub struct GatedIncoming {
    listener: UnixListener,
    gate: Arc<AcceptGate>,
}

impl GatedIncoming {
    /// Accepts from `listener` while `gate` is open.
    pub fn new(listener: UnixListener, gate: Arc<AcceptGate>) -> Self {
        GatedIncoming { listener, gate }
    }
}

impl Stream for GatedIncoming {
    type Item = std::io::Result<UnixStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.gate.waker.register(cx.waker());
        let Ok(_accepting) = this.gate.accepting.lock() else {
            return Poll::Ready(None);
        };
        if this.gate.paused.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        match this.listener.poll_accept(cx) {
            Poll::Ready(Ok((stream, _))) => Poll::Ready(Some(Ok(stream))),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}
