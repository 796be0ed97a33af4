//! Hold-and-queue: while a registered route has no live instance but is within its hold,
//! requests and connections for it wait here (bounded in number and time) until an
//! instance registers again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Why a wait ended without an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HoldError {
    /// `registration.queue_limit` requests already wait.
    #[error("too many requests are already waiting for this route")]
    QueueFull,
    /// `registration.max_wait` passed.
    #[error("no instance registered within the longest wait")]
    TimedOut,
    /// The hold ran out (or the route was removed) before an instance registered.
    #[error("the route's hold ended without an instance registering")]
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// At least one instance is registered.
    Live,
    /// No instance; requests wait until this instant.
    HeldUntil(Instant),
    /// The route is gone.
    Ended,
}

/// The waiting room of one registered route.
#[derive(Debug)]
pub struct Hold {
    phase: Mutex<Phase>,
    notify: Notify,
    waiting: AtomicUsize,
    queue_limit: usize,
    max_wait: Duration,
}

/// Decrements the waiting count when a waiter leaves.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Hold {
    /// A hold for a route that has just got its first instance.
    pub fn new(queue_limit: usize, max_wait: Duration) -> Hold {
        Hold {
            phase: Mutex::new(Phase::Live),
            notify: Notify::new(),
            waiting: AtomicUsize::new(0),
            queue_limit,
            max_wait,
        }
    }

    fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
        self.notify.notify_waiters();
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An instance is registered (call after publishing it): waiters retry now.
    pub fn set_live(&self) {
        self.set(Phase::Live);
    }

    /// The last instance left: hold the route until `until`.
    pub fn hold_until(&self, until: Instant) {
        self.set(Phase::HeldUntil(until));
    }

    /// The route is removed: every waiter gives up.
    pub fn end(&self) {
        self.set(Phase::Ended);
    }

    /// Whether requests should wait rather than fail at once.
    pub fn is_holding(&self) -> bool {
        match self.phase() {
            Phase::Live => true,
            Phase::HeldUntil(until) => until > Instant::now(),
            Phase::Ended => false,
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Waits until `ready` yields something (checked now and after every change), the hold
    /// ends, or `max_wait` passes.
    pub async fn wait<T>(&self, mut ready: impl FnMut() -> Option<T>) -> Result<T, HoldError> {
        if let Some(found) = ready() {
            return Ok(found);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue_limit {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(HoldError::QueueFull);
        }
        let _waiting = Waiting(&self.waiting);
        let deadline = Instant::now() + self.max_wait;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before checking, so a change between the check and the wait is seen.
            notified.as_mut().enable();
            if let Some(found) = ready() {
                return Ok(found);
            }
            let now = Instant::now();
            let until = match self.phase() {
                Phase::Ended => return Err(HoldError::Ended),
                Phase::HeldUntil(until) if until <= now => return Err(HoldError::Ended),
                Phase::HeldUntil(until) => until.min(deadline),
                // Live but not yet in the routing table this waiter sees: wait for the next change.
                Phase::Live => deadline,
            };
            if deadline <= now {
                return Err(HoldError::TimedOut);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_waiter_is_served_when_an_instance_returns() {
        let hold = Arc::new(Hold::new(4, Duration::from_secs(60)));
        hold.hold_until(Instant::now() + Duration::from_secs(60));
        let back = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (hold, back) = (hold.clone(), back.clone());
            tokio::spawn(
                async move { hold.wait(|| back.load(Ordering::SeqCst).then_some(7)).await },
            )
        };
        while hold.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        back.store(true, Ordering::SeqCst);
        hold.set_live();
        assert_eq!(waiter.await.expect("join"), Ok(7));
    }

    #[tokio::test]
    async fn the_queue_is_bounded_and_the_hold_ends() {
        let hold = Arc::new(Hold::new(1, Duration::from_secs(60)));
        hold.hold_until(Instant::now() + Duration::from_secs(60));
        let first = {
            let hold = hold.clone();
            tokio::spawn(async move { hold.wait(|| None::<()>).await })
        };
        while hold.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(hold.wait(|| None::<()>).await, Err(HoldError::QueueFull));
        hold.end();
        assert_eq!(first.await.expect("join"), Err(HoldError::Ended));
    }

    #[tokio::test]
    async fn max_wait_bounds_a_wait() {
        let hold = Hold::new(4, Duration::from_millis(200));
        hold.hold_until(Instant::now() + Duration::from_secs(60));
        assert_eq!(hold.wait(|| None::<()>).await, Err(HoldError::TimedOut));
    }
}
