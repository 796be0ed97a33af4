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
//! The workers live as long as the process; a daemon's tasks on them end with its
//! [`Shutdown`](crate::Shutdown).

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::Handle;

/// The worker runtimes of this process.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
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
        Ok(Workers { handles })
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never, once started).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Has every worker accept from its own copy of `socket`, registered with that worker's
    /// event loop, and serve what it accepts with the function `make` gives it. The copies
    /// are all made before any worker starts, so a failure starts none.
    pub fn accept_each<F, S, Fut>(
        &self,
        socket: &std::net::TcpListener,
        name: &str,
        make: F,
    ) -> std::io::Result<()>
    where
        F: Fn() -> S,
        S: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let copies = self
            .handles
            .iter()
            .map(|_| socket.try_clone())
            .collect::<std::io::Result<Vec<_>>>()?;
        for (handle, copy) in self.handles.iter().zip(copies) {
            let (serve, name) = (make(), name.to_owned());
            handle.spawn(async move {
                match tokio::net::TcpListener::from_std(copy) {
                    Ok(listener) => serve(listener).await,
                    Err(e) => {
                        tracing::error!(listener = %name, error = %e, "worker cannot serve listener")
                    }
                }
            });
        }
        Ok(())
    }
}
