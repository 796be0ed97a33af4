//! Idle keep-alive connections to upstreams, kept per thread.
//!
//! Each worker thread runs its own runtime (see [`crate::workers`]); a connection's
//! socket is registered with the runtime of the thread that opened it, and requests drive
//! it in their own task ([`super::h1`]), so handing it only to requests of the same thread
//! keeps its I/O on that thread. The store is keyed by
//! upstream address and TLS settings, not by pool or routing table: a membership change
//! that swaps a pool's run-time data keeps its connections.
//!
//! Under load reuse takes the connections in turn, oldest first, and otherwise the most
//! recently used first (see [`take`]); it drops connections idle for longer than the
//! pool's `idle_timeout`, and checks readiness before handing one out: a connection the
//! upstream closed, or on which it sent anything unasked, is dropped. Each worker also
//! sweeps its store every [`SWEEP_PERIOD`] (see [`start_sweeps`]), closing the
//! connections idle for longer than the `idle_timeout` of the pool that put them back
//! and those the upstream closed, whether or not a request asks for one.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Once;
use std::time::{Duration, Instant};

use super::h1::H1Conn;
use super::UpstreamRuntime;
use crate::workers::Workers;

/// Idle connections kept per upstream and thread.
const IDLE_PER_UPSTREAM: usize = 64;

/// While even the oldest idle connection to an upstream came back less than this long
/// ago, reuse takes the oldest (see [`take`]): below the keep-alive timeouts servers
/// default to (from 2 s, gunicorn's, to 75 s, nginx's) and below a pool's default
/// `idle_timeout` (1.5 s).
const ROTATE_WITHIN: Duration = Duration::from_millis(500);

/// What a reused connection must match: same address, same TLS settings (0: plain).
#[derive(Debug, Clone, Copy)]
pub struct ConnKey<'a> {
    /// `host:port` or `unix:/path`.
    pub address: &'a str,
    /// Identity of the pool's TLS client settings; 0 for plain connections.
    pub tls: u64,
}

struct Idle {
    conn: Box<H1Conn>,
    since: Instant,
    /// When the `idle_timeout` of the pool that put it back ends (`None`: beyond what
    /// the clock can count).
    expires: Option<Instant>,
}

/// TLS identity -> address -> idle connections, oldest first.
type Store = HashMap<u64, HashMap<Box<str>, VecDeque<Idle>, KeyHash>, KeyHash>;

/// FNV-1a for the store's keys. They are configured upstream addresses and TLS settings,
/// never chosen by a client, so the flooding a keyed hash (the standard SipHash) defends
/// against cannot happen here, and every request looks the store up twice.
type KeyHash = BuildHasherDefault<Fnv>;

/// The state of an FNV-1a hash.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

thread_local! {
    static IDLE: RefCell<Store> = RefCell::new(HashMap::default());
}

/// An idle connection for `key` that is still open, younger than `idle_timeout` at `now`
/// and made after `upstream` last invalidated its connections. `now` is the caller's clock
/// reading of the moment it asks: the request path reads the clock once for its connect
/// deadline, this and the time it sends.
///
/// Which one: while even the oldest came back less than [`ROTATE_WITHIN`] ago (the
/// upstream is busy), the oldest, so that the idle connections take turns and the
/// requests spread over all of them, and with them over the upstream's worker processes
/// or threads, each of which serves the connections it accepted. Taking the most recent
/// under load, a stable set of about as many connections as requests in flight carried
/// nearly every request, and when those sat mostly with one of the upstream's workers,
/// that one queued requests while another had little to do: with a new client connection
/// per request the slowest 1 % of requests took 2.3-2.6 times the median against 2.2
/// taking turns (`wrk -t2 -c64` in front of `bench/http.sh`'s upstream, nginx with two
/// workers, HAProxy 2.1-2.3 alike). Otherwise the most recent, the one least likely to
/// have hit the upstream's own keep-alive timeout; the older ones stay idle, and the
/// sweep lets go of their buffers and then closes them.
pub fn take(
    key: ConnKey<'_>,
    upstream: &UpstreamRuntime,
    idle_timeout: Duration,
    now: Instant,
) -> Option<Box<H1Conn>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&key.tls)?.get_mut(key.address)?;
        loop {
            let oldest = list.front()?;
            let in_turn = now.saturating_duration_since(oldest.since) < ROTATE_WITHIN;
            let entry = if in_turn {
                list.pop_front()
            } else {
                list.pop_back()
            }?;
            if now.saturating_duration_since(entry.since) >= idle_timeout
                || !upstream.idle_valid(entry.since)
            {
                if in_turn {
                    // The next came back later.
                    continue;
                }
                // The most recent: older ones are older still, all of them go.
                list.clear();
                return None;
            }
            // Readiness: the socket has neither reached its end nor holds unasked bytes.
            let mut conn = entry.conn;
            if !conn.idle_usable() {
                continue;
            }
            conn.set_reused();
            return Some(conn);
        }
    })
}

/// Sweeps this thread's idle connections at once, every one letting go of its buffers
/// however recently it came back (see [`sweep_once`]): called while the worker's client
/// connections go dormant, when a burst that opened many upstream connections may have
/// left them all idle, so that the allocator can hand their memory back.
pub fn settle() {
    sweep_once(Instant::now(), Duration::ZERO);
}

/// How often each worker sweeps its idle connections, and how long an idle connection
/// keeps its buffers at most, however the clients of its worker are served (see
/// [`start_sweeps`]).
pub const SWEEP_PERIOD: Duration = Duration::from_secs(2);

/// Starts each worker's sweep of its idle connections, once per process (see
/// [`sweep_once`]; every [`SWEEP_PERIOD`]). Out of turn, reuse takes the most recently
/// used connection first (see [`take`]), so under a load lighter than the burst before it
/// the older ones stay idle, and [`settle`] reaches them only when the worker's plain
/// HTTP/1 clients go dormant, which HTTPS, HTTP/2 and TCP clients never do.
pub fn start_sweeps(workers: &Workers) {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| workers.spawn_on_each(|| sweep(SWEEP_PERIOD)));
}

/// Every `period`, sweeps this thread's idle connections, letting go of the buffers of
/// those idle for `period`, and closes its HTTP/2 connections idle past their pool's
/// `h2_idle_timeout` ([`super::h2::sweep_once`]); runs for the life of the thread's
/// runtime.
pub(crate) async fn sweep(period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        sweep_once(now, period);
        super::h2::sweep_once(now);
    }
}

/// Closes the idle connections of this thread whose pool's `idle_timeout` ended by
/// `now`, and those the upstream closed (or sent anything unasked on) while they waited,
/// now rather than when a request next looks for one; has those idle for `hold` or longer
/// let go of their buffers (see [`H1Conn::release_buffers`]).
pub(crate) fn sweep_once(now: Instant, hold: Duration) {
    let released = now.checked_sub(hold);
    let _ = IDLE.try_with(|idle| {
        for list in idle.borrow_mut().values_mut().flat_map(HashMap::values_mut) {
            list.retain_mut(|entry| {
                entry.expires.is_none_or(|expires| expires > now) && entry.conn.idle_usable()
            });
            let Some(released) = released else {
                continue;
            };
            // Oldest first, as they came back: the rest came back later.
            for entry in list.iter_mut().take_while(|entry| entry.since <= released) {
                entry.conn.release_buffers();
            }
        }
    });
}

/// How many idle connections this thread keeps for `key`.
#[cfg(test)]
pub(crate) fn kept(key: ConnKey<'_>) -> usize {
    IDLE.with(|idle| {
        idle.borrow()
            .get(&key.tls)
            .and_then(|by_address| by_address.get(key.address))
            .map_or(0, VecDeque::len)
    })
}

/// Keeps `conn` for reuse by later requests of this thread (when the store for this
/// upstream is full, the oldest is dropped); `now`, the caller's clock reading of the
/// moment the exchange on it ended, starts its idle time, and the sweep closes it once it
/// has been idle for `idle_timeout` (its pool's).
pub fn put(key: ConnKey<'_>, mut conn: Box<H1Conn>, now: Instant, idle_timeout: Duration) {
    conn.park();
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let by_address = idle.entry(key.tls).or_default();
        let list = match by_address.get_mut(key.address) {
            Some(list) => list,
            None => by_address.entry(key.address.into()).or_default(),
        };
        if list.len() >= IDLE_PER_UPSTREAM {
            list.pop_front();
        }
        list.push_back(Idle {
            conn,
            since: now,
            expires: now.checked_add(idle_timeout),
        });
    });
}
