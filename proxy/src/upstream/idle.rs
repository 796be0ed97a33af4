//! Idle keep-alive connections to upstreams, kept per thread.
//!
//! Each worker thread runs its own runtime (see [`crate::workers`]); a connection is
//! driven by a task on the thread that opened it, so handing it only to requests of the
//! same thread means a request never wakes another thread. The store is keyed by
//! upstream address and TLS settings, not by pool or routing table: a membership change
//! that swaps a pool's run-time data keeps its connections.
//!
//! Reuse takes the most recently used connection first (the one least likely to have hit
//! the upstream's own keep-alive timeout), drops connections idle for longer than the
//! pool's `idle_timeout`, and checks readiness before handing one out.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::connect::HttpSender;
use super::UpstreamRuntime;

/// Idle connections kept per upstream and thread.
const IDLE_PER_UPSTREAM: usize = 64;

/// What a reused connection must match: same address, same TLS settings (0: plain).
#[derive(Debug, Clone, Copy)]
pub struct ConnKey<'a> {
    /// `host:port` or `unix:/path`.
    pub address: &'a str,
    /// Identity of the pool's TLS client settings; 0 for plain connections.
    pub tls: u64,
}

/// State of one upstream connection shared between its I/O and its users: how many
/// response bytes it has read, so a failure can be told apart as "before any response
/// byte" (safe to retry) or not.
#[derive(Debug, Default)]
pub struct ConnState {
    read: AtomicU64,
}

impl ConnState {
    /// Bytes read from the upstream so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Counts `n` bytes read.
    pub fn count_read(&self, n: usize) {
        self.read.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A connection to an upstream as the request path holds it.
#[derive(Debug)]
pub struct UpstreamConn {
    /// Sends requests on it.
    pub sender: HttpSender,
    /// Its shared state.
    pub state: Arc<ConnState>,
    /// Whether it served a request before (a reused connection may have gone stale).
    pub reused: bool,
}

struct Idle {
    conn: UpstreamConn,
    since: Instant,
}

/// TLS identity -> address -> idle connections, oldest first.
type Store = HashMap<u64, HashMap<Box<str>, Vec<Idle>>>;

thread_local! {
    static IDLE: RefCell<Store> = RefCell::new(HashMap::new());
}

/// The most recently used idle connection for `key` that is still open, younger than
/// `idle_timeout` and made after `upstream` last invalidated its connections.
pub fn take(
    key: ConnKey<'_>,
    upstream: &UpstreamRuntime,
    idle_timeout: Duration,
) -> Option<UpstreamConn> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&key.tls)?.get_mut(key.address)?;
        let now = Instant::now();
        while let Some(entry) = list.pop() {
            if now.duration_since(entry.since) >= idle_timeout {
                // Older ones are older still: all of them go.
                list.clear();
                return None;
            }
            if !upstream.idle_valid(entry.since) {
                list.clear();
                return None;
            }
            // Readiness, first part: the connection task watches the socket while idle and
            // closes the connection on EOF or an error. (The caller then waits for the task
            // to be ready for a request.)
            if entry.conn.sender.is_closed() {
                continue;
            }
            let mut conn = entry.conn;
            conn.reused = true;
            return Some(conn);
        }
        None
    })
}

/// Keeps `conn` for reuse by later requests of this thread (dropped when it is closed or
/// the store for this upstream is full: the oldest is dropped then).
pub fn put(key: ConnKey<'_>, conn: UpstreamConn) {
    if conn.sender.is_closed() {
        return;
    }
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let by_address = idle.entry(key.tls).or_default();
        let list = match by_address.get_mut(key.address) {
            Some(list) => list,
            None => by_address.entry(key.address.into()).or_default(),
        };
        if list.len() >= IDLE_PER_UPSTREAM {
            list.remove(0);
        }
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
    });
}
