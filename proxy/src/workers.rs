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
//! So every worker counts the connections it serves, and a worker that accepted a
//! connection while it serves [`MARGIN`] more than the least busy worker hands it to
//! that one ([`Seat::place`]): one hand-over between threads per such connection, none
//! per request. With every worker accepting from the shared socket, an idle worker takes
//! new connections itself (no thread is asked to pass them on), and the hand-over only
//! corrects what the kernel's choice left uneven.
//!
//! The workers live as long as the process; a daemon's tasks on them end with its
//! [`Shutdown`](crate::Shutdown).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;

/// How many more connections than the least busy worker a worker may serve before it
/// hands the connections it accepts to that worker. Above zero, so that a balanced pair
/// does not pass every other new connection back and forth; small, so that 64 connections
/// over two workers end up within a few of each other.
pub const MARGIN: usize = 2;

/// The worker runtimes of this process.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    /// Connections served by each worker now, every listener's together.
    loads: Box<[Load]>,
}

/// One worker's connection count, alone on its cache line: it changes with every
/// connection of that worker, and is read by the others on every accept.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Load(AtomicUsize);

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
        Ok(Workers { handles, loads })
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
        self.loads
            .iter()
            .map(|l| l.0.load(Ordering::Relaxed))
            .collect()
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
    /// Where a connection just accepted on this worker is served: here, unless this worker
    /// serves more than [`MARGIN`] connections more than the least busy one. The connection
    /// is counted on the chosen worker until the returned [`Placed`] is dropped.
    pub fn place(&self) -> Placed {
        let loads = &self.workers.loads;
        let here = self.index;
        let mine = loads.get(here).map_or(0, |l| l.0.load(Ordering::Relaxed));
        let (least, fewest) = loads
            .iter()
            .map(|l| l.0.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|&(_, n)| n)
            .unwrap_or((here, mine));
        let target = if mine > fewest + MARGIN { least } else { here };
        let load = loads.get(target).map(|l| {
            l.0.fetch_add(1, Ordering::Relaxed);
            &l.0
        });
        Placed {
            handle: (target != here)
                .then(|| self.workers.handles.get(target).cloned())
                .flatten(),
            load: WorkerLoad(load),
        }
    }
}

/// The worker chosen for a connection by [`Seat::place`].
#[derive(Debug)]
pub struct Placed {
    /// The other worker's runtime, when the connection moves; `None` keeps it here.
    pub handle: Option<Handle>,
    /// Counts the connection on its worker while alive: the connection's task holds it.
    pub load: WorkerLoad,
}

/// A connection counted on its worker; dropping it ends the count.
#[derive(Debug)]
pub struct WorkerLoad(Option<&'static AtomicUsize>);

impl WorkerLoad {
    /// Counts nothing: for connections served off the workers.
    pub fn none() -> WorkerLoad {
        WorkerLoad(None)
    }
}

impl Drop for WorkerLoad {
    fn drop(&mut self) {
        if let Some(load) = self.0 {
            load.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
