//! The routing side of the state writer: [`Compiler`] is the [`Publish`] step the writer is
//! given, and [`Published`] is what the data path reads — the state and its compiled table
//! at one revision, swapped in as one snapshot.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::RoutingTable;
use crate::state::{by_others, Publish, Retired, State, Touched};

/// What the data path sees: the state and its compiled routing table at one revision.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases by one per committed batch (as in the state).
    pub revision: u64,
    /// The desired state the table was compiled from.
    pub state: State,
    /// The compiled routing table for `state`.
    pub routing: Arc<RoutingTable>,
}

/// A cheap, cloneable reader of the routing snapshots the writer publishes.
#[derive(Debug, Clone, Default)]
pub struct Published {
    current: Arc<ArcSwap<Snapshot>>,
}

impl Published {
    /// An empty table, until the state publishes its first snapshot through
    /// [`compiler`](Self::compiler).
    pub fn new() -> Published {
        Published::default()
    }

    /// The compile step to give the state writer: it publishes into this reader.
    pub fn compiler(&self) -> Box<dyn Publish> {
        Box::new(Compiler {
            current: self.current.clone(),
            retired: Retired::new(in_use),
        })
    }

    /// The current snapshot (one atomic load; never blocks).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The current routing table.
    pub fn routing(&self) -> Arc<RoutingTable> {
        self.current.load().routing.clone()
    }

    /// Runs `f` on the current routing table, borrowed without a reference count taken
    /// (the request path: a count shared by every thread would be a contended cache line).
    pub fn with_routing<R>(&self, f: impl FnOnce(&RoutingTable) -> R) -> R {
        f(&self.current.load().routing)
    }
}

/// Compiles each state the writer publishes into the next routing table: only what a
/// change touched is recompiled, the rest is shared with the table before.
struct Compiler {
    current: Arc<ArcSwap<Snapshot>>,
    /// Snapshots replaced and not freed yet: a request that loaded one just before the
    /// swap must not be the one to free it.
    retired: Retired<Snapshot>,
}

/// Whether a reader still holds a replaced snapshot, or its table alone (the TCP path and
/// telemetry take the table without the snapshot).
fn in_use(snapshot: &Arc<Snapshot>) -> bool {
    by_others(snapshot) || by_others(&snapshot.routing)
}

impl Publish for Compiler {
    fn publish(&mut self, revision: u64, state: &State, touched: Option<&Touched>) {
        let before = self.current.load_full();
        let routing = match touched {
            None => Arc::new(RoutingTable::build(state, Some(&before.routing))),
            Some(touched) if touched.is_empty() => before.routing.clone(),
            Some(touched) => Arc::new(before.routing.update(&before.state, state, touched)),
        };
        let same_table = Arc::ptr_eq(&routing, &before.routing);
        self.current.store(Arc::new(Snapshot {
            revision,
            state: state.clone(),
            routing,
        }));
        // A snapshot whose table goes on being used frees next to nothing.
        if !same_table {
            self.retired.push(before);
        }
    }

    fn reclaim(&mut self) -> bool {
        self.retired.reclaim()
    }

    fn release(&mut self) {
        self.retired.release();
    }
}
