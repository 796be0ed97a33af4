//! One shutdown signal shared by every task, and the tracker that lets in-flight work finish.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Stop accepting, then wait (bounded) for tracked connections to finish.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A fresh, untriggered signal.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Tells every accept loop to stop and every connection to finish gracefully.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether [`trigger`](Self::trigger) was called.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
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

    /// Waits for tracked tasks to end, at most `timeout`. Returns whether all ended.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.tracker.close();
        let done = tokio::time::timeout(timeout, self.tracker.wait()).await.is_ok();
        if !done {
            tracing::warn!(remaining = self.tracker.len(), "drain timeout reached; closing remaining connections");
        }
        done
    }

    /// Tracked tasks still running.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }
}
