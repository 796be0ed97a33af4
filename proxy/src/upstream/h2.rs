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
//! request opens a fresh connection rather than waiting on a dead one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

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
}

impl H2State {
    /// A new connection's state, allowing `initial` streams until the upstream says more.
    pub fn new(initial: usize) -> Self {
        H2State {
            streams: AtomicUsize::new(0),
            max_streams: AtomicUsize::new(initial),
            settings_read: std::sync::atomic::AtomicBool::new(false),
            settings: Notify::new(),
        }
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
    opened: Instant,
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
        H2Conn {
            sender,
            state,
            opened: Instant::now(),
        }
    }

    /// Counts one stream on it until the returned guard is dropped.
    pub fn open_stream(&self) -> H2Stream {
        self.state.streams.fetch_add(1, Ordering::Relaxed);
        H2Stream(self.state.clone())
    }

    fn usable(&self, upstream: &UpstreamRuntime) -> bool {
        !self.sender.is_closed() && upstream.idle_valid(self.opened)
    }
}

/// One stream of ours on an HTTP/2 connection, counted until dropped.
#[derive(Debug)]
pub struct H2Stream(Arc<H2State>);

impl Drop for H2Stream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
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

    #[test]
    fn scanner_reads_max_concurrent_streams_across_split_reads() {
        let state = Arc::new(H2State::new(100));
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
