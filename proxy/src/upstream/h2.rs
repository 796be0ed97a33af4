//! Multiplexed HTTP/2 connections to upstreams (`protocol = "h2c"`, `"h2"`, or `"auto"`
//! when ALPN picks `h2`), kept per worker thread.
//!
//! Like the HTTP/1.1 idle store ([`super::idle`]), the connections live on the thread that
//! opened them: hyper drives each one in a task of that thread's runtime (spawned with
//! `tokio::spawn`, which on a worker's current-thread runtime stays on that thread), so a
//! request, its client connection and its upstream stream never wake another thread and
//! picking a connection takes no lock. The price is `h2_connections` connections per
//! upstream *per worker* rather than per process; with one worker per CPU that is still a
//! small number, and an upstream sees the same spread it would see from as many nginx
//! workers.
//!
//! Streams are spread over up to `h2_connections` connections (the least busy first); a
//! connection whose streams reached the upstream's SETTINGS_MAX_CONCURRENT_STREAMS takes no
//! more, and when every connection is at its limit one more is opened. A connection that
//! received GOAWAY is closed for new streams by hyper (`is_closed`) and left out; its
//! in-flight streams finish on it. Connections are PINGed as the pool's `h2_keepalive`
//! says and closed when a PING goes unanswered; a closed one is left out here, so the next
//! request opens a fresh connection rather than waiting on a dead one. A connection that
//! carried no stream of ours for the `h2_idle_timeout` of the pool that last used it is
//! closed by the worker's sweep ([`sweep_once`], every [`super::idle::SWEEP_PERIOD`]):
//! hyper ends it once the store's handle, the last one, is dropped.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::body::RequestBody;
use super::idle::ConnKey;
use super::UpstreamRuntime;

/// An HTTP/2 client connection to one upstream (cloned per request: it is a handle).
pub type H2Sender = hyper::client::conn::http2::SendRequest<RequestBody>;

/// What the request path and the connection task share about one HTTP/2 connection.
#[derive(Debug)]
pub struct H2State {
    /// Streams of ours open on it (from the request sent to the response body's end).
    streams: AtomicUsize,
    /// The upstream's SETTINGS_MAX_CONCURRENT_STREAMS as the connection last saw it.
    max_streams: AtomicUsize,
    /// Set once the upstream's first SETTINGS frame was read.
    settings_read: std::sync::atomic::AtomicBool,
    settings: Notify,
    /// When the connection was made: the origin of `idle_since_ms`.
    created: Instant,
    /// Milliseconds after `created` at which its last stream ended (0: none yet).
    idle_since_ms: AtomicU64,
    /// The `h2_idle_timeout` of the pool that last opened a stream on it, in milliseconds.
    idle_timeout_ms: AtomicU64,
}

impl H2State {
    /// A new connection's state, allowing `initial` streams until the upstream says more
    /// and closed after `idle_timeout` without a stream (until a pool's stream says
    /// otherwise).
    pub fn new(initial: usize, idle_timeout: Duration) -> Self {
        H2State {
            streams: AtomicUsize::new(0),
            max_streams: AtomicUsize::new(initial),
            settings_read: std::sync::atomic::AtomicBool::new(false),
            settings: Notify::new(),
            created: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
            idle_timeout_ms: AtomicU64::new(millis(idle_timeout)),
        }
    }

    /// Whether no stream of ours was open on it for its idle timeout by `now`.
    fn idle_expired(&self, now: Instant) -> bool {
        if self.streams() > 0 {
            return false;
        }
        let idle_ms = self.idle_since_ms.load(Ordering::Relaxed);
        let timeout_ms = self.idle_timeout_ms.load(Ordering::Relaxed);
        let idle_for = now.saturating_duration_since(self.created);
        millis(idle_for).saturating_sub(idle_ms) >= timeout_ms
    }

    /// Resolves once the upstream's first SETTINGS frame was read.
    pub async fn settings_read(&self) {
        loop {
            let notified = self.settings.notified();
            if self.settings_read.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn mark_settings_read(&self) {
        if !self.settings_read.swap(true, Ordering::AcqRel) {
            self.settings.notify_waiters();
        }
    }

    /// Records the upstream's current stream limit.
    pub fn set_max_streams(&self, max: usize) {
        self.max_streams.store(max, Ordering::Relaxed);
    }

    fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    fn has_room(&self) -> bool {
        self.streams() < self.max_streams.load(Ordering::Relaxed).max(1)
    }
}

/// Follows the frames an upstream sends on an HTTP/2 connection (on the bytes as they are
/// read, with no copy) to learn its SETTINGS_MAX_CONCURRENT_STREAMS at once: hyper does
/// not tell, and a request sent beyond the limit is refused (REFUSED_STREAM) after its
/// body left.
#[derive(Debug)]
pub struct FrameScanner {
    state: Arc<H2State>,
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current payload is a SETTINGS frame's (not an ACK).
    settings: bool,
    entry: [u8; 6],
    entry_have: usize,
}

/// Frame types and flags (RFC 9113 section 6).
const FRAME_SETTINGS: u8 = 0x4;
const FLAG_ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

impl FrameScanner {
    /// A scanner reporting into `state`; the first byte it sees starts a frame (the
    /// server's connection preface is a SETTINGS frame).
    pub fn new(state: Arc<H2State>) -> Self {
        FrameScanner {
            state,
            head: [0; 9],
            have: 0,
            left: 0,
            settings: false,
            entry: [0; 6],
            entry_have: 0,
        }
    }

    /// Follows `bytes`, the next bytes read from the upstream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                if self.settings {
                    for &b in &bytes[..n] {
                        self.entry[self.entry_have] = b;
                        self.entry_have += 1;
                        if self.entry_have == 6 {
                            self.entry_have = 0;
                            let id = u16::from_be_bytes([self.entry[0], self.entry[1]]);
                            let value = u32::from_be_bytes([
                                self.entry[2],
                                self.entry[3],
                                self.entry[4],
                                self.entry[5],
                            ]);
                            if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                                self.state
                                    .set_max_streams(usize::try_from(value).unwrap_or(usize::MAX));
                            }
                        }
                    }
                }
                self.left -= n;
                bytes = &bytes[n..];
                if self.left == 0 && self.settings {
                    self.settings = false;
                    self.state.mark_settings_read();
                }
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                self.have = 0;
                self.left =
                    u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]) as usize;
                self.settings = self.head[3] == FRAME_SETTINGS && self.head[4] & FLAG_ACK == 0;
                self.entry_have = 0;
                if self.settings && self.left == 0 {
                    self.settings = false;
                    self.state.mark_settings_read();
                }
            }
        }
    }
}

/// One HTTP/2 connection as the store and the request path hold it.
#[derive(Clone)]
pub struct H2Conn {
    /// Sends requests (streams) on it.
    pub sender: H2Sender,
    state: Arc<H2State>,
}

impl std::fmt::Debug for H2Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Conn")
            .field("state", &self.state)
            .field("closed", &self.sender.is_closed())
            .finish()
    }
}

impl H2Conn {
    /// Wraps a connection made by [`super::connect::h2_sender`].
    pub fn new(sender: H2Sender, state: Arc<H2State>) -> Self {
        H2Conn { sender, state }
    }

    /// Counts one stream on it until the returned guard is dropped; from then on, the
    /// connection is closed after `idle_timeout` (the stream's pool's) without a stream.
    pub fn open_stream(&self, idle_timeout: Duration) -> H2Stream {
        self.state.streams.fetch_add(1, Ordering::Relaxed);
        self.state
            .idle_timeout_ms
            .store(millis(idle_timeout), Ordering::Relaxed);
        H2Stream(self.state.clone())
    }

    /// Open, and made after the upstream's connections were last invalidated (from before
    /// its handshake: one whose handshake spanned an invalidation is not reused either).
    fn usable(&self, upstream: &UpstreamRuntime) -> bool {
        !self.sender.is_closed() && upstream.idle_valid(self.state.created)
    }
}

/// One stream of ours on an HTTP/2 connection, counted until dropped.
#[derive(Debug)]
pub struct H2Stream(Arc<H2State>);

impl Drop for H2Stream {
    fn drop(&mut self) {
        let state = &self.0;
        if state.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            // The last one: the connection's idle time starts (read once per stream
            // that leaves the connection unused, not per frame).
            let since = millis(state.created.elapsed());
            state.idle_since_ms.store(since, Ordering::Relaxed);
        }
    }
}

/// `d` in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Default)]
struct Slot {
    conns: Vec<H2Conn>,
    /// Connections being opened for this upstream right now.
    dialing: usize,
    /// Woken when a dial ends (with a connection or not).
    changed: Arc<Notify>,
}

/// TLS identity -> address -> connections.
type Store = HashMap<u64, HashMap<Box<str>, Slot>>;

thread_local! {
    static H2: RefCell<Store> = RefCell::new(HashMap::new());
}

/// What a request should do to get a stream to an upstream.
pub enum Pick {
    /// Send on this connection.
    Use(H2Conn),
    /// Open a new connection; the ticket books it (see [`DialTicket::finish`]).
    Dial(DialTicket),
    /// Another request of this thread is opening the connection this one needs: wait for
    /// it to finish, then pick again.
    Wait(Arc<Notify>),
}

/// A connection being opened; dropping it without [`DialTicket::finish`] counts as a
/// failed dial.
pub struct DialTicket {
    tls: u64,
    address: Box<str>,
    finished: bool,
}

impl DialTicket {
    /// Ends the dial, keeping `conn` (if it succeeded) for the requests of this thread.
    pub fn finish(mut self, conn: Option<H2Conn>) {
        self.finished = true;
        self.end(conn);
    }

    fn end(&self, conn: Option<H2Conn>) {
        H2.with(|store| {
            let mut store = store.borrow_mut();
            let Some(slot) = store
                .get_mut(&self.tls)
                .and_then(|by_address| by_address.get_mut(&*self.address))
            else {
                return;
            };
            slot.dialing = slot.dialing.saturating_sub(1);
            if let Some(conn) = conn {
                slot.conns.push(conn);
            }
            slot.changed.notify_waiters();
        });
    }
}

impl Drop for DialTicket {
    fn drop(&mut self) {
        if !self.finished {
            self.end(None);
        }
    }
}

/// Picks a connection of this thread to `key`'s upstream for one more stream: the least
/// busy one with room, opening more (up to `want`) while every open one is busy, and one
/// more whenever all are at the upstream's stream limit.
pub fn pick(key: ConnKey<'_>, upstream: &UpstreamRuntime, want: usize) -> Pick {
    H2.with(|store| {
        let mut store = store.borrow_mut();
        let by_address = store.entry(key.tls).or_default();
        let slot = match by_address.get_mut(key.address) {
            Some(slot) => slot,
            None => by_address.entry(key.address.into()).or_default(),
        };
        slot.conns.retain(|c| c.usable(upstream));
        let best = slot
            .conns
            .iter()
            .filter(|c| c.state.has_room())
            .min_by_key(|c| c.state.streams());
        let live = slot.conns.len() + slot.dialing;
        let dial = || {
            Pick::Dial(DialTicket {
                tls: key.tls,
                address: key.address.into(),
                finished: false,
            })
        };
        match best {
            Some(conn) if conn.state.streams() == 0 => Pick::Use(conn.clone()),
            _ if live < want.max(1) => {
                slot.dialing += 1;
                dial()
            }
            Some(conn) => Pick::Use(conn.clone()),
            None if slot.dialing > 0 => Pick::Wait(slot.changed.clone()),
            None => {
                slot.dialing += 1;
                dial()
            }
        }
    })
}

/// Drops this thread's connections that carried no stream for their idle timeout by `now`
/// (hyper closes a connection once its last handle is gone and its streams ended) and
/// those already closed, and forgets upstreams left with none.
pub(crate) fn sweep_once(now: Instant) {
    let _ = H2.try_with(|store| {
        let mut store = store.borrow_mut();
        for by_address in store.values_mut() {
            for slot in by_address.values_mut() {
                slot.conns
                    .retain(|c| !c.sender.is_closed() && !c.state.idle_expired(now));
            }
            // Nobody waits on a slot that is not dialing (see `pick`).
            by_address.retain(|_, slot| !slot.conns.is_empty() || slot.dialing > 0);
        }
        store.retain(|_, by_address| !by_address.is_empty());
    });
}

/// Keeps `conn`, opened outside [`pick`] (an `auto` pool's connection that ALPN made
/// HTTP/2), for the requests of this thread.
pub fn keep(key: ConnKey<'_>, conn: H2Conn) {
    H2.with(|store| {
        let mut store = store.borrow_mut();
        let by_address = store.entry(key.tls).or_default();
        match by_address.get_mut(key.address) {
            Some(slot) => slot.conns.push(conn),
            None => by_address
                .entry(key.address.into())
                .or_default()
                .conns
                .push(conn),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// A connection to an HTTP/2 server at the other end of an in-memory pipe, with
    /// `state` made beforehand (as `connect::h2_sender` makes it before the handshake).
    async fn piped_conn(state: Arc<H2State>) -> H2Conn {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let answer = hyper::service::service_fn(|_request| async {
                let empty = http_body_util::Empty::<bytes::Bytes>::new();
                Ok::<_, std::convert::Infallible>(hyper::Response::new(empty))
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(server), answer)
                .await;
        });
        let (sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(client))
                .await
                .expect("HTTP/2 handshake over the pipe");
        tokio::spawn(conn);
        H2Conn::new(sender, state)
    }

    #[tokio::test]
    async fn a_connection_begun_before_its_upstream_forgot_its_connections_is_not_reused() {
        let upstream = UpstreamRuntime::new("127.0.0.1:1");
        let state = || Arc::new(H2State::new(100, Duration::from_secs(60)));
        let before = piped_conn(state()).await;
        assert!(before.usable(&upstream));
        // Begun before the upstream's connections are forgotten (ejected, its TLS settings
        // changed), its handshake done after.
        let begun = state();
        std::thread::sleep(Duration::from_millis(2));
        upstream.forget_idle();
        std::thread::sleep(Duration::from_millis(2));
        let spanning = piped_conn(begun).await;
        assert!(!before.usable(&upstream), "made before");
        assert!(
            !spanning.usable(&upstream),
            "its handshake began before and ended after"
        );
        let after = piped_conn(state()).await;
        assert!(after.usable(&upstream), "made after");
    }

    #[test]
    fn a_connection_expires_only_after_its_idle_timeout_without_a_stream() {
        let state = Arc::new(H2State::new(100, Duration::from_secs(1)));
        let made = state.created;
        // Idle from the start until a stream opens.
        assert!(!state.idle_expired(made + Duration::from_millis(999)));
        assert!(state.idle_expired(made + Duration::from_secs(1)));
        state.streams.fetch_add(1, Ordering::Relaxed);
        let stream = H2Stream(state.clone());
        assert!(
            !state.idle_expired(made + Duration::from_secs(3600)),
            "a stream is open"
        );
        std::thread::sleep(Duration::from_millis(20));
        drop(stream);
        // The idle time starts when the last stream ends.
        let ended = made + Duration::from_millis(state.idle_since_ms.load(Ordering::Relaxed));
        assert!(ended >= made + Duration::from_millis(20));
        assert!(!state.idle_expired(ended + Duration::from_millis(999)));
        assert!(state.idle_expired(ended + Duration::from_secs(1)));
        // A later stream's pool sets the timeout.
        state.streams.fetch_add(1, Ordering::Relaxed);
        state.idle_timeout_ms.store(5000, Ordering::Relaxed);
        drop(H2Stream(state.clone()));
        let ended = made + Duration::from_millis(state.idle_since_ms.load(Ordering::Relaxed));
        assert!(!state.idle_expired(ended + Duration::from_millis(4999)));
        assert!(state.idle_expired(ended + Duration::from_secs(5)));
    }

    #[test]
    fn scanner_reads_max_concurrent_streams_across_split_reads() {
        let state = Arc::new(H2State::new(100, Duration::from_secs(60)));
        let mut scanner = FrameScanner::new(state.clone());
        // SETTINGS: header table size 4096, max concurrent streams 7; then a DATA frame
        // whose payload looks like a SETTINGS entry; then an ACK.
        let mut bytes = frame(4, 0, &[0, 1, 0, 0, 16, 0, 0, 3, 0, 0, 0, 7]);
        bytes.extend(frame(0, 0, &[0, 3, 0, 0, 0, 9]));
        bytes.extend(frame(4, 1, &[]));
        for chunk in bytes.chunks(5) {
            scanner.feed(chunk);
        }
        assert_eq!(state.max_streams.load(Ordering::Relaxed), 7);
        assert!(state.settings_read.load(Ordering::Relaxed));
        // A later SETTINGS lowers it.
        scanner.feed(&frame(4, 0, &[0, 3, 0, 0, 0, 2]));
        assert_eq!(state.max_streams.load(Ordering::Relaxed), 2);
    }
}
