//! The client limits of one HTTP listener: how many connections it holds open at once
//! (`max_connections`, [`ConnectionLimit`]), and per client IP, how many connections one
//! address may hold open (`max_connections_per_ip`) and how fast it may send requests
//! (`rate_limit`, a token bucket). The per-address limits are off unless configured; a
//! listener without them never reaches their tables.
//!
//! The tables are shared by every worker thread, split into shards that each have their
//! own lock, so two clients rarely contend and a lock is held for a few map operations.
//! They stay small: a connection entry lives while its address has a connection open (so
//! there are at most `max_connections` of them), a rate entry until its bucket is full
//! again, and never more than `rate_limit.max_clients` of them.
//!
//! An IPv6 client is keyed by its /64 prefix: one host is usually given a whole /64, so
//! limits per full address would be no limit at all. An IPv4-mapped IPv6 address counts as
//! the IPv4 address it carries.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RateLimit;

/// Shards per table: enough that the worker threads of a large host rarely meet on one.
const SHARDS: usize = 64;

/// The address a client's limits are kept under.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !0xffff_ffff_ffff_ffff_u128)),
        },
    }
}

/// A map split into [`SHARDS`] locked parts, keyed by client address.
#[derive(Debug)]
struct Sharded<V> {
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<HashMap<IpAddr, V>>>,
}

impl<V> Sharded<V> {
    fn new() -> Self {
        Sharded {
            hasher: std::collections::hash_map::RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// The shard of `key`, locked. A poisoned lock still guards consistent data: every
    /// critical section below leaves the map valid at each step.
    fn shard(&self, key: &IpAddr) -> MutexGuard<'_, HashMap<IpAddr, V>> {
        let index = usize::try_from(self.hasher.hash_one(key) % SHARDS as u64).unwrap_or(0);
        let shard = &self.shards[index.min(SHARDS - 1)];
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// A listener's open connections, every worker's together, capped at `max_connections`.
///
/// A count taken with a compare-and-swap and given back with a subtraction. An HTTP
/// listener over its limit refuses a connection rather than waiting for a place, so it
/// needs no queue of waiters: tokio's `Semaphore` took its waiters' lock to give every
/// connection's place back.
#[derive(Debug)]
pub struct ConnectionLimit {
    open: AtomicUsize,
    max: usize,
}

impl ConnectionLimit {
    /// A limit of `max` connections open at once.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// Counts a new connection, or `None` when `max` are open. It counts until the
    /// returned place is dropped.
    pub fn take(self: &Arc<Self>) -> Option<ConnectionPlace> {
        self.open
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |open| {
                (open < self.max).then_some(open + 1)
            })
            .ok()?;
        Some(ConnectionPlace(self.clone()))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// One connection's place under a [`ConnectionLimit`], given back when this is dropped.
#[derive(Debug)]
pub struct ConnectionPlace(Arc<ConnectionLimit>);

impl Drop for ConnectionPlace {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Release);
    }
}

/// Open connections per client address, capped at `limit`.
#[derive(Debug)]
pub struct ConnectionsPerIp {
    limit: u32,
    open: Sharded<u32>,
}

impl ConnectionsPerIp {
    /// A table allowing `limit` connections per address.
    pub fn new(limit: u32) -> Arc<Self> {
        Arc::new(ConnectionsPerIp {
            limit,
            open: Sharded::new(),
        })
    }

    /// Counts a new connection from `ip`, or `None` when the address already has `limit`
    /// open. The connection counts until the returned guard is dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ClientConnection> {
        let key = client_key(ip);
        let mut shard = self.open.shard(&key);
        let open = shard.entry(key).or_insert(0);
        if *open >= self.limit {
            return None;
        }
        *open += 1;
        Some(ClientConnection {
            table: self.clone(),
            key,
        })
    }

    /// Addresses with a connection open now.
    pub fn clients(&self) -> usize {
        self.open.len()
    }
}

/// One admitted connection; its address's count drops when this does.
#[derive(Debug)]
pub struct ClientConnection {
    table: Arc<ConnectionsPerIp>,
    key: IpAddr,
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        let mut shard = self.table.open.shard(&self.key);
        if let Some(open) = shard.get_mut(&self.key) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                shard.remove(&self.key);
            }
        }
    }
}

/// One client's token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Requests per client address: a token bucket of `burst` tokens refilled at
/// `requests_per_second`; a request takes one token.
#[derive(Debug)]
pub struct RequestRatePerIp {
    rate: f64,
    burst: f64,
    /// Entries per shard before old ones are dropped.
    shard_cap: usize,
    /// How long an empty bucket takes to fill: an entry untouched for longer is full again.
    refill: Duration,
    buckets: Sharded<Bucket>,
}

impl RequestRatePerIp {
    /// A table for `limit`.
    pub fn new(limit: &RateLimit) -> Self {
        let rate = limit.requests_per_second;
        let burst = f64::from(limit.burst);
        RequestRatePerIp {
            rate,
            burst,
            shard_cap: limit.max_clients.div_ceil(SHARDS).max(1),
            refill: Duration::try_from_secs_f64(burst / rate).unwrap_or(Duration::MAX),
            buckets: Sharded::new(),
        }
    }

    /// Takes a token for a request from `ip`; `Err` holds how long until one is there.
    pub fn take(&self, ip: IpAddr) -> Result<(), Duration> {
        self.take_at(ip, Instant::now())
    }

    fn take_at(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = client_key(ip);
        let mut shard = self.buckets.shard(&key);
        let bucket = match shard.get_mut(&key) {
            Some(bucket) => {
                let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
                bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
                bucket.at = now;
                bucket
            }
            None => {
                if shard.len() >= self.shard_cap {
                    self.make_room(&mut shard, now);
                }
                shard.entry(key).or_insert(Bucket {
                    tokens: self.burst,
                    at: now,
                })
            }
        };
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / self.rate;
        Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
    }

    /// Drops the buckets that are full again (forgetting them changes nothing); if none
    /// is, the one untouched longest, which is the closest to full.
    fn make_room(&self, shard: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        let before = shard.len();
        shard.retain(|_, b| now.saturating_duration_since(b.at) < self.refill);
        if shard.len() < before {
            return;
        }
        let oldest = shard.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| *k);
        if let Some(key) = oldest {
            shard.remove(&key);
        }
    }

    /// Addresses with a bucket now.
    pub fn clients(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_listeners_connections_are_limited_and_their_places_given_back() {
        let limit = ConnectionLimit::new(2);
        let first = limit.take().expect("one of two");
        let second = limit.take().expect("two of two");
        assert!(limit.take().is_none(), "a third over a limit of two");
        assert_eq!(limit.open(), 2);
        drop(first);
        assert_eq!(limit.open(), 1);
        let third = limit.take().expect("the place the first gave back");
        assert!(limit.take().is_none());
        drop((second, third));
        assert_eq!(limit.open(), 0);
        let places: Vec<_> = (0..2).map_while(|_| limit.take()).collect();
        assert_eq!(places.len(), 2, "both places again");
        assert!(ConnectionLimit::new(0).take().is_none(), "a limit of none");
    }

    #[test]
    fn connections_are_limited_per_address_and_forgotten_when_closed() {
        let table = ConnectionsPerIp::new(2);
        let a1 = table.admit(ip("10.0.0.1")).unwrap();
        let a2 = table.admit(ip("10.0.0.1")).unwrap();
        assert!(
            table.admit(ip("10.0.0.1")).is_none(),
            "third from one address"
        );
        let b = table
            .admit(ip("10.0.0.2"))
            .expect("another address is not limited");
        drop(a1);
        let a3 = table.admit(ip("10.0.0.1")).expect("a slot came free");
        assert_eq!(table.clients(), 2);
        drop((a2, a3, b));
        assert_eq!(table.clients(), 0, "no entry left once nothing is open");
    }

    #[test]
    fn ipv6_clients_share_their_slash_64_and_mapped_ipv4_is_ipv4() {
        let table = ConnectionsPerIp::new(1);
        let _a = table.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(
            table.admit(ip("2001:db8:1:2:ffff::9")).is_none(),
            "same /64"
        );
        let _b = table.admit(ip("2001:db8:1:3::1")).expect("another /64");
        let _c = table.admit(ip("192.0.2.7")).unwrap();
        assert!(table.admit(ip("::ffff:192.0.2.7")).is_none(), "mapped IPv4");
    }

    fn limit(rps: f64, burst: u32, max_clients: usize) -> RateLimit {
        RateLimit {
            requests_per_second: rps,
            burst,
            max_clients,
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_the_rate() {
        let rate = RequestRatePerIp::new(&limit(2.0, 3, 100));
        let start = Instant::now();
        let a = ip("10.0.0.1");
        for _ in 0..3 {
            assert!(rate.take_at(a, start).is_ok());
        }
        let wait = rate.take_at(a, start).unwrap_err();
        assert_eq!(
            wait,
            Duration::from_millis(500),
            "one token at 2 per second"
        );
        assert!(rate.take_at(ip("10.0.0.2"), start).is_ok(), "other address");
        let later = start + Duration::from_millis(500);
        assert!(rate.take_at(a, later).is_ok(), "refilled one token");
        assert!(rate.take_at(a, later).is_err());
    }

    #[test]
    fn the_table_never_holds_more_than_max_clients() {
        let rate = RequestRatePerIp::new(&limit(1.0, 5, 128));
        let now = Instant::now();
        for n in 0..10_000u32 {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            assert!(
                rate.take_at(addr, now).is_ok(),
                "a new client has its burst"
            );
        }
        // At most one shard's share over the cap per shard, rounded up.
        assert!(
            rate.clients() <= 128usize.div_ceil(SHARDS) * SHARDS,
            "{}",
            rate.clients()
        );
    }

    #[test]
    fn making_room_drops_full_buckets_else_the_one_untouched_longest() {
        let rate = RequestRatePerIp::new(&limit(1.0, 2, SHARDS));
        let start = Instant::now();
        let bucket = |tokens, at| Bucket { tokens, at };
        let mut shard = HashMap::new();
        // Refilled after 2 s at 1 per second: the first two are full again at `now`.
        let now = start + Duration::from_secs(5);
        shard.insert(ip("10.0.0.1"), bucket(0.0, start));
        shard.insert(ip("10.0.0.2"), bucket(0.0, start + Duration::from_secs(1)));
        shard.insert(ip("10.0.0.3"), bucket(0.0, start + Duration::from_secs(4)));
        rate.make_room(&mut shard, now);
        assert_eq!(shard.keys().collect::<Vec<_>>(), vec![&ip("10.0.0.3")]);
        // Nothing full: the oldest goes, the newer stays.
        shard.insert(ip("10.0.0.4"), bucket(0.0, now));
        rate.make_room(&mut shard, now);
        assert_eq!(shard.keys().collect::<Vec<_>>(), vec![&ip("10.0.0.4")]);
    }
}
