//! Snapshots a publish replaced, kept by the writer until no reader holds them.
//!
//! A snapshot shares most of its structure with the next one, but not all: after a batch
//! of 10,000 routes into 100,000, most nodes of the old maps are the old snapshot's alone,
//! and freeing them takes milliseconds. Whoever drops the last reference pays for that. A
//! request that loaded the old snapshot just before the swap would be that last holder, so
//! the writer keeps every replaced snapshot and drops it itself, after it answered, once
//! nobody else holds it.

use std::sync::Arc;
use std::time::Duration;

/// How long the writer waits, in steps, for readers to let go of a retired snapshot before
/// it leaves the freeing to them (requests hold a snapshot for microseconds; a management
/// call listing 100,000 routes may hold one much longer).
pub(crate) const WAIT_STEP: Duration = Duration::from_micros(500);
/// Steps of [`WAIT_STEP`] (10 ms in all).
pub(crate) const WAIT_STEPS: usize = 20;

/// Replaced snapshots not freed yet.
pub struct Retired<T> {
    held: Vec<Arc<T>>,
    in_use: fn(&Arc<T>) -> bool,
}

impl<T> std::fmt::Debug for Retired<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retired")
            .field("held", &self.held.len())
            .finish()
    }
}

impl<T> Retired<T> {
    /// Nothing retired yet. `in_use` tells whether a reader still holds a retired snapshot
    /// (see [`by_others`]).
    pub fn new(in_use: fn(&Arc<T>) -> bool) -> Retired<T> {
        Retired {
            held: Vec::new(),
            in_use,
        }
    }

    /// Keeps `old` until [`reclaim`](Self::reclaim) finds it unused.
    pub fn push(&mut self, old: Arc<T>) {
        self.held.push(old);
    }

    /// Frees the retired snapshots no reader holds any more, here. Returns whether some
    /// are still held.
    pub fn reclaim(&mut self) -> bool {
        self.held.retain(self.in_use);
        !self.held.is_empty()
    }

    /// Gives up the snapshots still held: their readers free them when they are done.
    pub fn release(&mut self) {
        self.held.clear();
    }

    /// How many retired snapshots are kept.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Whether anyone but the retired list holds `snapshot`. Once a snapshot has been swapped
/// out of its `ArcSwap`, readers can only gain a reference by cloning one they hold, so a
/// count of one stays one.
pub fn by_others<T>(snapshot: &Arc<T>) -> bool {
    Arc::strong_count(snapshot) > 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts drops, to see on which side the last reference went.
    struct Dropped(Arc<std::sync::atomic::AtomicUsize>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_snapshot_is_freed_by_the_writer_once_readers_let_go() {
        let drops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut retired = Retired::new(by_others);
        let old = Arc::new(Dropped(drops.clone()));
        let reader = old.clone();
        retired.push(old);
        // A reader still holds it: kept, not freed.
        assert!(retired.reclaim());
        assert_eq!(retired.len(), 1);
        // The reader lets go: its drop frees nothing, the next reclaim does.
        drop(reader);
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(!retired.reclaim());
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(retired.is_empty());
    }

    #[test]
    fn released_snapshots_are_left_to_their_readers() {
        let drops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut retired = Retired::new(by_others);
        let old = Arc::new(Dropped(drops.clone()));
        let reader = old.clone();
        retired.push(old);
        retired.release();
        assert!(retired.is_empty());
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 0);
        drop(reader);
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
