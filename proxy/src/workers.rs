//! Worker threads for the data path: one single-threaded runtime per CPU.
//!
//! Each worker accepts from every configured listener, HTTP and TCP alike (the same
//! listening socket, shared: the kernel hands each new connection to one of them) and
//! serves its connections to the end, including the upstream connections they open (see [`crate::upstream::idle`]). A request
//! therefore never wakes another thread: the client connection, the upstream connection
//! and the request all run on one thread, as in nginx's worker processes. The listening
//! socket stays one socket per listener, so the upgrade hand-over and systemd socket
//! activation are unchanged.
//!
//! Which worker wins an accept depends on which thread the kernel wakes first, and a
//! burst of connections (a load generator opening 64 keep-alive connections at once) can
//! land mostly on one of them, leaving a core idle for as long as those connections live.
//! So every worker counts the connections it serves, and a worker that serves more than
//! [`MARGIN`] connections more than the least busy worker stops accepting
//! ([`Seat::wait_turn`]) until it no longer does: the others, which wait on the same
//! socket, take the new connections. Nothing moves between threads: a connection is served
//! where it was accepted. A waiting worker is woken by the end of one of its own
//! connections (on its own thread), or, across threads, once the worker accepting in its
//! place gets more than the margin ahead in turn: at most once per wait, not per
//! connection.
//!
//! This replaced handing a connection accepted on a busier worker over to the least busy
//! one: under short connections (a new one per request) the counts swing by more than the
//! margin all the time, and a quarter of all connections moved, each paying an epoll
//! removal and addition, a cross-thread wake-up and a cold start on the other thread.
//!
//! The workers live as long as the process; a daemon's tasks on them end with its
//! [`Shutdown`](crate::Shutdown).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Notify;

pub mod dormant;

/// How many more connections than the least busy worker a worker may serve and still
/// accept. Above zero, so that a balanced pair does not take turns at every other new
/// connection; small, so that 64 connections over two workers end up within a few of each
/// other.
pub const MARGIN: usize = 2;

/// How long a busier worker leaves new connections to the others before it competes for
/// the next one again anyway: a bound, should the others not accept from this socket (a
/// worker whose copy of it could not be registered), never reached while they do.
const TURN_LIMIT: Duration = Duration::from_millis(100);

/// The worker runtimes of this process.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    /// How many of each worker's idle HTTP/1 connections sleep in its dormitory (see
    /// [`dormant`]; the HTTP server starts a worker's dormitory on it).
    sleeping: Box<[AtomicUsize]>,
    /// Connections served by each worker now, every listener's together.
    loads: Box<[Load]>,
}

/// One worker's connection count, alone on its cache line: it changes with every
/// connection of that worker, and is read by the others on every accept.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Load {
    connections: AtomicUsize,
    /// Set while an accept loop of this worker waits for its turn (see
    /// [`Seat::wait_turn`]): a change of the counts that gives it back wakes it.
    waiting: AtomicBool,
    /// Wakes this worker's waiting accept loops, one per listener.
    turn: Notify,
}

impl Load {
    fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

static WORKERS: OnceLock<Result<Workers, String>> = OnceLock::new();

impl Workers {
    /// The process' workers, started on first use with `count` threads (0: one per CPU).
    /// Later calls get the same workers, whatever their `count`.
    pub fn get(count: usize) -> Result<&'static Workers, std::io::Error> {
        WORKERS
            .get_or_init(|| Workers::start(count).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| std::io::Error::other(e.clone()))
    }

    /// The process' workers, if they were started.
    pub fn running() -> Option<&'static Workers> {
        WORKERS.get().and_then(|w| w.as_ref().ok())
    }

    fn start(count: usize) -> Result<Workers, std::io::Error> {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("proxyd-worker-{index}"))
                .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        }
        let loads = (0..count).map(|_| Load::default()).collect();
        Ok(Workers {
            handles,
            sleeping: (0..count).map(|_| AtomicUsize::new(0)).collect(),
            loads,
        })
    }

    /// Runs a task that `make` makes on every worker, one each, for as long as the worker
    /// runs.
    pub fn spawn_on_each<F, Fut>(&self, make: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for handle in &self.handles {
            handle.spawn(make());
        }
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never, once started).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The connections each worker serves now, by worker index.
    pub fn connections(&self) -> Vec<usize> {
        self.loads.iter().map(Load::count).collect()
    }

    /// The tasks alive on each worker's runtime now (a connection's task, its streams',
    /// the accept loops, the dormitory), by worker index.
    pub fn tasks(&self) -> Vec<usize> {
        self.handles
            .iter()
            .map(|h| h.metrics().num_alive_tasks())
            .collect()
    }

    /// The connections dormant on each worker now (counted among its connections too),
    /// by worker index.
    pub fn dormant(&self) -> Vec<usize> {
        self.sleeping
            .iter()
            .map(|sleeping| sleeping.load(Ordering::Relaxed))
            .collect()
    }

    /// Whether worker `index` serves more than [`MARGIN`] connections more than the least
    /// busy worker.
    fn busier(&self, index: usize) -> bool {
        let mine = self.loads.get(index).map_or(0, Load::count);
        busier(mine, self.loads.iter().map(Load::count))
    }

    /// Wakes the waiting accept loops of worker `index` if the counts no longer hold it
    /// back. Called after every change of a count that can give a turn back, so that no
    /// waiting loop misses its turn: the count changes before the flag is read here, and
    /// a waiting loop sets the flag before it reads the counts (both sequentially
    /// consistent), so one of the two sees the other.
    fn give_turn(&self, index: usize) {
        let Some(load) = self.loads.get(index) else {
            return;
        };
        if load.waiting.load(Ordering::SeqCst)
            && !self.busier(index)
            && load.waiting.swap(false, Ordering::SeqCst)
        {
            load.turn.notify_waiters();
        }
    }

    /// Has every worker accept from its own copy of `socket` and serve what it accepts
    /// with the function `make` gives it, which receives the copy (not yet registered with
    /// any event loop) and the worker's [`Seat`]. The copies are all made before any
    /// worker starts, so a failure starts none.
    pub fn accept_each<F, S, Fut>(
        &'static self,
        socket: &std::net::TcpListener,
        make: F,
    ) -> std::io::Result<()>
    where
        F: Fn() -> S,
        S: FnOnce(std::net::TcpListener, Seat) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let copies = self
            .handles
            .iter()
            .map(|_| socket.try_clone())
            .collect::<std::io::Result<Vec<_>>>()?;
        for (index, (handle, copy)) in self.handles.iter().zip(copies).enumerate() {
            let serve = make();
            let seat = Seat {
                workers: self,
                index,
            };
            handle.spawn(serve(copy, seat));
        }
        Ok(())
    }
}

/// A worker, as the accept loop running on it sees the others.
#[derive(Debug, Clone, Copy)]
pub struct Seat {
    workers: &'static Workers,
    index: usize,
}

impl Seat {
    /// Returns once this worker may accept a connection: at once unless it serves more
    /// than [`MARGIN`] connections more than the least busy worker; then when that is no
    /// longer so (a connection of its own ended, or the others accepted enough), or after
    /// [`TURN_LIMIT`] at the latest. Meanwhile the other workers, waiting on the same
    /// listening socket, take the new connections.
    pub async fn wait_turn(&self) {
        if !self.workers.busier(self.index) {
            return;
        }
        let _ = tokio::time::timeout(TURN_LIMIT, self.until_turn()).await;
    }

    async fn until_turn(&self) {
        let Some(load) = self.workers.loads.get(self.index) else {
            return;
        };
        loop {
            // Registered before the counts are read, so that a change between the read
            // and the wait still wakes it.
            let notified = load.turn.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            load.waiting.store(true, Ordering::SeqCst);
            if !self.workers.busier(self.index) {
                return;
            }
            notified.await;
        }
    }

    /// Where this worker's dormitory counts its sleepers (see [`dormant`]).
    pub fn sleeping(&self) -> Option<&'static AtomicUsize> {
        self.workers.sleeping.get(self.index)
    }

    /// Counts a connection just accepted on this worker until the returned
    /// [`WorkerLoad`] is dropped; the connection's task holds it.
    pub fn admit(&self) -> WorkerLoad {
        let Some(load) = self.workers.loads.get(self.index) else {
            return WorkerLoad::none();
        };
        load.connections.fetch_add(1, Ordering::SeqCst);
        // A worker waiting for its turn is woken (across threads) only once this one has
        // to stop accepting in turn: until then this one takes the new connections, and a
        // waiting worker whose own connection ends wakes itself, on its own thread.
        if self.workers.busier(self.index) {
            for index in 0..self.workers.loads.len() {
                self.workers.give_turn(index);
            }
        }
        WorkerLoad(Some(*self))
    }
}

/// Whether a worker serving `mine` connections serves more than [`MARGIN`] more than the
/// least busy of all workers, whose counts are `all` (its own among them).
fn busier(mine: usize, all: impl Iterator<Item = usize>) -> bool {
    all.min().is_some_and(|fewest| mine > fewest + MARGIN)
}

/// A connection counted on its worker; dropping it ends the count.
#[derive(Debug)]
pub struct WorkerLoad(Option<Seat>);

impl WorkerLoad {
    /// Counts nothing: for connections served off the workers.
    pub fn none() -> WorkerLoad {
        WorkerLoad(None)
    }
}

impl Drop for WorkerLoad {
    fn drop(&mut self) {
        if let Some(seat) = self.0 {
            if let Some(load) = seat.workers.loads.get(seat.index) {
                load.connections.fetch_sub(1, Ordering::SeqCst);
                // Fewer here can give this worker its turn back, no other's.
                seat.workers.give_turn(seat.index);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::task::Poll;

    use futures_util::poll;
    use tokio::time::Instant;

    /// Workers without threads, for the placement logic alone.
    fn counted(count: usize) -> &'static Workers {
        Box::leak(Box::new(Workers {
            handles: Vec::new(),
            sleeping: Box::new([]),
            loads: (0..count).map(|_| Load::default()).collect(),
        }))
    }

    fn seat(workers: &'static Workers, index: usize) -> Seat {
        Seat { workers, index }
    }

    #[test]
    fn only_a_worker_more_than_the_margin_above_the_least_busy_is_busier() {
        assert!(!busier(0, [0, 0].into_iter()));
        assert!(!busier(MARGIN, [MARGIN, 0].into_iter()));
        assert!(busier(MARGIN + 1, [MARGIN + 1, 0].into_iter()));
        assert!(!busier(MARGIN + 1, [MARGIN + 1, 1, 7].into_iter()));
        assert!(busier(9, [9, 6, 3].into_iter()));
        // One worker alone is never busier than itself.
        assert!(!busier(40, [40].into_iter()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busier_worker_is_woken_once_the_worker_accepting_in_its_place_must_stop() {
        let workers = counted(2);
        let (first, second) = (seat(workers, 0), seat(workers, 1));
        let held: Vec<_> = (0..=MARGIN).map(|_| first.admit()).collect();
        assert_eq!(workers.connections(), vec![MARGIN + 1, 0]);

        let started = Instant::now();
        let waiting = tokio::spawn(async move { first.wait_turn().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the busier worker accepted at once");
        // The second worker takes the new connections alone while it can: the first,
        // within the margin again after the second's first connection, is not woken for
        // that (a wake-up across threads) ...
        let mut others: Vec<_> = (0..=2 * MARGIN).map(|_| second.admit()).collect();
        tokio::task::yield_now().await;
        assert!(!workers.busier(0) && !workers.busier(1));
        assert!(
            !waiting.is_finished(),
            "woken before the second had to stop"
        );
        // ... but once the second is more than the margin ahead in turn, it is.
        others.push(second.admit());
        assert!(workers.busier(1));
        waiting.await.unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "woken by the other worker's accept, not by the time limit"
        );
        // The least busy worker never waits.
        let mut first_turn = pin!(first.wait_turn());
        assert_eq!(poll!(first_turn.as_mut()), Poll::Ready(()));
        drop((held, others));
        assert_eq!(workers.connections(), vec![0, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busier_worker_waits_until_one_of_its_connections_ends() {
        let workers = counted(3);
        let first = seat(workers, 0);
        let mut held: Vec<_> = (0..=MARGIN).map(|_| first.admit()).collect();
        let _others = (seat(workers, 1).admit(), seat(workers, 2).admit());
        // 3 against 1 and 1: not busier yet; one more and it is.
        let mut turn = pin!(first.wait_turn());
        assert_eq!(poll!(turn.as_mut()), Poll::Ready(()));
        held.push(first.admit());

        let started = Instant::now();
        let waiting = tokio::spawn(async move { first.wait_turn().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the busier worker accepted at once");
        held.pop();
        waiting.await.unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "woken by its connection's end"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_busier_worker_competes_again_after_the_time_limit() {
        let workers = counted(2);
        let first = seat(workers, 0);
        let _held: Vec<_> = (0..=MARGIN).map(|_| first.admit()).collect();
        let started = Instant::now();
        first.wait_turn().await;
        assert_eq!(started.elapsed(), TURN_LIMIT);
        assert!(workers.busier(0), "still busier: it waited out the limit");
    }
}
