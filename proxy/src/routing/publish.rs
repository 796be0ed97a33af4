//! The routing side of the state writer: [`Compiler`] is the [`Publish`] step the writer is
//! given, and [`Published`] is what the data path reads — the state and its compiled table
//! at one revision, swapped in as one snapshot.

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use super::{Attacher, RoutingTable};
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
#[derive(Clone, Default)]
pub struct Published {
    current: Arc<ArcSwap<Snapshot>>,
    /// What route entries are made with, once given (see [`attach_with`](Self::attach_with)).
    attach: Arc<OnceLock<Attacher>>,
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Published")
            .field("current", &self.current)
            .field("attached", &self.attach.get().is_some())
            .finish()
    }
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
            attach: self.attach.clone(),
            retired: Retired::new(in_use),
        })
    }

    /// Has every route entry carry what `attach` makes for its route: the entries of the
    /// current table get theirs now, those of later tables as they are made. Telemetry
    /// gives the maker of a route's metric series, so that a route's first request finds
    /// them made rather than making them (about 1,800 instructions and a dozen cache
    /// misses on fresh memory, with 100,000 routes, callgrind). Only the first call counts.
    pub fn attach_with(&self, attach: Attacher) {
        if self.attach.set(attach).is_err() {
            return;
        }
        // Paired with the fence in `Compiler::publish`: a table stored before this point
        // is walked here, one stored after it was made with the attacher or is walked
        // there. An entry missed all the same would find its series on its first request.
        fence(Ordering::SeqCst);
        if let Some(attach) = self.attach.get() {
            attach_all(&self.current.load().routing, attach);
        }
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
    attach: Arc<OnceLock<Attacher>>,
    /// Snapshots replaced and not freed yet: a request that loaded one just before the
    /// swap must not be the one to free it.
    retired: Retired<Snapshot>,
}

/// Whether a reader still holds a replaced snapshot, or its table alone (the TCP path and
/// telemetry take the table without the snapshot).
fn in_use(snapshot: &Arc<Snapshot>) -> bool {
    by_others(snapshot) || by_others(&snapshot.routing)
}

/// Gives every entry of `table` without an attachment what `attach` makes for it.
fn attach_all(table: &RoutingTable, attach: &Attacher) {
    crate::allocator::for_tables(|| {
        for entry in table.entries() {
            entry.series_slot().get_or_init(|| attach(&entry.route));
        }
    });
}

impl Publish for Compiler {
    fn publish(&mut self, revision: u64, state: &State, touched: Option<&Touched>) {
        let before = self.current.load_full();
        let attach = self.attach.get();
        // Requests spread over every route read what this makes: it goes to the table
        // region (huge pages), with the routes' series the attacher makes.
        let routing = crate::allocator::for_tables(|| match touched {
            None => Arc::new(RoutingTable::build_attached(
                state,
                Some(&before.routing),
                attach,
            )),
            Some(touched) if touched.is_empty() => before.routing.clone(),
            Some(touched) => Arc::new(before.routing.update_attached(
                &before.state,
                state,
                touched,
                attach,
            )),
        });
        let same_table = Arc::ptr_eq(&routing, &before.routing);
        self.current.store(Arc::new(Snapshot {
            revision,
            state: state.clone(),
            routing: routing.clone(),
        }));
        if attach.is_none() {
            // The attacher may have come while this table was made (see `attach_with`).
            fence(Ordering::SeqCst);
            if let Some(attach) = self.attach.get() {
                attach_all(&routing, attach);
            }
        }
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
