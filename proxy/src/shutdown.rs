//! One shutdown signal shared by every task, and the tracker that lets in-flight work finish.

use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// Stop accepting, then wait (bounded) for tracked connections to finish.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
    exit: CancellationToken,
    tracker: TaskTracker,
    /// Services that answer while draining (the management API): stopped by `begin_exit`
    /// after the drain, not waited for by it.
    services: TaskTracker,
    handed_over: Arc<AtomicBool>,
    drain_timeout_ms: Arc<AtomicU64>,
    /// Set with the token's cancellation: read by accept loops before every accept,
    /// without the token's lock (which every worker shares).
    stopping: Arc<AtomicBool>,
}

impl Shutdown {
    /// A fresh, untriggered signal.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Tells every accept loop to stop and every connection to finish gracefully.
    pub fn trigger(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.token.cancel();
    }

    /// Stops this process because a successor took over its sockets: like
    /// [`trigger`](Self::trigger), but shared resources (socket files) are left in place.
    pub fn hand_over(&self) {
        self.handed_over.store(true, Ordering::SeqCst);
        self.trigger();
    }

    /// Stops accepting on an operator's request (`proxyctl drain`), optionally with its own
    /// drain timeout; the process exits once in-flight work is done.
    pub fn drain_requested(&self, timeout: Option<Duration>) {
        if let Some(t) = timeout {
            self.drain_timeout_ms.store(
                u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1),
                Ordering::SeqCst,
            );
        }
        self.trigger();
    }

    /// The drain timeout a drain request asked for, if any.
    pub fn requested_drain_timeout(&self) -> Option<Duration> {
        match self.drain_timeout_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Whether this process handed over to a successor.
    pub fn is_handed_over(&self) -> bool {
        self.handed_over.load(Ordering::SeqCst)
    }

    /// The process is about to finish: services that stay up while draining (the
    /// management API, which answers UNAVAILABLE to writes meanwhile) stop now.
    pub fn begin_exit(&self) {
        self.trigger();
        self.exit.cancel();
    }

    /// Resolves once [`begin_exit`](Self::begin_exit) was called.
    pub async fn exiting(&self) {
        self.exit.cancelled().await
    }

    /// Whether [`trigger`](Self::trigger) (or any other stop) was called: an atomic load.
    pub fn is_triggered(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Resolves once triggered.
    pub async fn triggered(&self) {
        self.token.cancelled().await
    }

    /// Spawns a connection task whose end [`drain`](Self::drain) waits for.
    pub fn spawn<F>(&self, future: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(future);
    }

    /// Counts as a connection task [`drain`](Self::drain) waits for until dropped: for a
    /// connection that lives on without a task for a while (a dormant one, asleep in its
    /// worker's dormitory), and for an accept loop, so that the drain cannot end between
    /// its accepting a connection and starting that connection's task.
    pub fn track(&self) -> TaskTrackerToken {
        self.tracker.token()
    }

    /// Spawns a service that stays up while draining and stops at
    /// [`begin_exit`](Self::begin_exit); [`services_stopped`](Self::services_stopped)
    /// waits for it, [`drain`](Self::drain) does not.
    pub fn spawn_service<F>(&self, future: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.services.spawn(future);
    }

    /// After [`begin_exit`](Self::begin_exit): waits (at most `timeout`) for the services
    /// to let go of their sockets. Returns whether all stopped.
    pub async fn services_stopped(&self, timeout: Duration) -> bool {
        self.services.close();
        tokio::time::timeout(timeout, self.services.wait())
            .await
            .is_ok()
    }

    /// Waits for tracked tasks to end, at most `timeout`. Returns whether all ended.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.tracker.close();
        let done = tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_ok();
        if !done {
            tracing::warn!(
                remaining = self.tracker.len(),
                "drain timeout reached; closing remaining connections"
            );
        }
        done
    }

    /// Tracked tasks still running.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }
}
