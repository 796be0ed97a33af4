//! Upstream pools at run time: balancing, passive and active health, connection reuse.
//!
//! A [`PoolRuntime`] is compiled when its pool's definition or membership changes and
//! swapped into the pool's slot ([`crate::routing::PoolSlot`]), which the routes hold; the
//! per-upstream runtime ([`UpstreamRuntime`]: health, in-flight count, idle connections) is
//! carried from one `PoolRuntime` to the next, so a change does not forget that an upstream
//! is down.
//!
//! A pool with a `tls` section gets its rustls client config built here ([`tls`]), once per
//! definition (and kept across tables while the definition stays the same).

pub mod body;
mod connect;
pub mod h1;
pub mod h2;
pub mod health;
mod hold;
pub mod idle;
pub mod tls;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub use connect::{connect, h2_sender, ConnectError, UpstreamStream};
pub use h1::H1Conn;
pub use hold::{Hold, HoldError};
pub use idle::ConnKey;

use tokio_util::sync::CancellationToken;

use self::tls::UpstreamConnector;
use crate::state::{
    Balance, HealthCheck, OnChange, Origin, Pool, Upstream, UpstreamPolicy, UpstreamProtocol,
    UpstreamState, UpstreamTls,
};

fn process_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// `instant` as nanoseconds since a process-wide base, plus one (so never 0).
fn ns_of(instant: Instant) -> u64 {
    u64::try_from(instant.saturating_duration_since(process_base()).as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// Now, as [`ns_of`].
fn mono_ns() -> u64 {
    ns_of(Instant::now())
}

/// One upstream's run-time data.
pub struct UpstreamRuntime {
    /// `host:port`.
    pub address: String,
    draining: AtomicBool,
    healthy: AtomicBool,
    /// `mono_ns()` until which it is ejected; 0: not ejected (checked without a clock read).
    ejected_until_ns: AtomicU64,
    /// Failures since the last success.
    failures: AtomicU32,
    /// Ejections since the last success (the back-off exponent).
    ejections: AtomicU32,
    /// Ejections ever (for `/metrics`).
    ejections_total: AtomicU64,
    in_flight: AtomicUsize,
    /// Connections open (busy or idle), for `max_connections_per_upstream`.
    open: AtomicUsize,
    /// Idle connections put away before this instant are not reused (ejection, reset,
    /// TLS change); compared with [`Instant`]s as nanoseconds since a process-wide base.
    idle_valid_after: AtomicU64,
    /// Fired when it leaves a pool whose policy is `on_change = "reset"`.
    removed: CancellationToken,
    /// What ALPN chose last (`protocol = "auto"`): 0 not known yet, 1 HTTP/1.1, 2 HTTP/2.
    negotiated: AtomicU8,
}

impl std::fmt::Debug for UpstreamRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamRuntime")
            .field("address", &self.address)
            .field("healthy", &self.is_healthy())
            .field("ejected", &self.is_ejected())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl UpstreamRuntime {
    fn new(address: &str) -> UpstreamRuntime {
        UpstreamRuntime {
            address: address.to_string(),
            draining: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            ejected_until_ns: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejections_total: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            idle_valid_after: AtomicU64::new(0),
            removed: CancellationToken::new(),
            negotiated: AtomicU8::new(0),
        }
    }

    /// Resolves once it was removed from a pool that resets connections on change.
    pub async fn removed(&self) {
        self.removed.cancelled().await
    }

    /// Whether it was removed so (what [`removed`](Self::removed) waits for).
    pub fn is_removed(&self) -> bool {
        self.removed.is_cancelled()
    }

    /// Tells every stream to it to close (it left a pool with `on_change = "reset"`).
    pub fn close_streams(&self) {
        self.removed.cancel();
        self.forget_idle();
    }

    /// Idle connections kept so far are not to be reused.
    fn forget_idle(&self) {
        self.idle_valid_after.store(mono_ns(), Ordering::Relaxed);
        self.negotiated.store(0, Ordering::Relaxed);
    }

    /// With `protocol = "auto"`: whether the last connection negotiated HTTP/2
    /// (`None`: no connection yet).
    pub fn negotiated_h2(&self) -> Option<bool> {
        match self.negotiated.load(Ordering::Relaxed) {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        }
    }

    /// Records what ALPN chose on a new connection.
    pub fn set_negotiated_h2(&self, h2: bool) {
        self.negotiated
            .store(if h2 { 2 } else { 1 }, Ordering::Relaxed);
    }

    /// Whether an idle connection put away at `since` may be reused.
    pub(crate) fn idle_valid(&self, since: Instant) -> bool {
        let after = self.idle_valid_after.load(Ordering::Relaxed);
        after == 0 || ns_of(since) > after
    }

    /// Whether the last active health check passed (true when there is no check).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records an active health check result; returns whether it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// Whether it is set to drain (no new work).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether recent failures keep it out of rotation.
    pub fn is_ejected(&self) -> bool {
        match self.ejected_until_ns.load(Ordering::Relaxed) {
            0 => false,
            until => until > mono_ns(),
        }
    }

    /// Ejections so far (counted in `/metrics`).
    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    /// Takes it out of rotation for `duration` (connections kept for reuse go too).
    fn eject_for(&self, duration: Duration) {
        let until =
            mono_ns().saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until_ns.store(until, Ordering::Relaxed);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        self.forget_idle();
    }

    /// Counts a failure (connect error or timeout, reset, or an opted-in 5xx); ejects it
    /// after `consecutive_failures` of them, for a time that doubles with every ejection
    /// without a success in between, unless the pool has its share of ejections already.
    pub fn record_failure(&self, pool: &PoolRuntime) {
        let outlier = &pool.policy.outlier;
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < outlier.consecutive_failures || self.is_ejected() {
            return;
        }
        if !pool.may_eject() {
            return;
        }
        let exponent = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let duration = outlier
            .base_ejection
            .saturating_mul(1u32 << exponent)
            .min(outlier.max_ejection);
        self.failures.store(0, Ordering::Relaxed);
        self.eject_for(duration);
        tracing::warn!(pool = %pool.name, upstream = %self.address, ?duration, "upstream ejected after consecutive failures");
    }

    /// Counts a success: the failure count, the back-off and any ejection end.
    pub fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejected_until_ns.load(Ordering::Relaxed) != 0 {
            self.ejected_until_ns.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// Requests or connections in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one unit of work until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Books a new connection unless `limit` (0: none) connections are open already.
    pub fn open_connection(self: &Arc<Self>, limit: u32) -> Option<OpenConnection> {
        let previous = self.open.fetch_add(1, Ordering::Relaxed);
        if limit != 0 && previous >= limit as usize {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(OpenConnection(self.clone()))
    }

    /// Connections open to it (busy or idle).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// One open connection to an upstream, counted until dropped.
pub struct OpenConnection(Arc<UpstreamRuntime>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements the in-flight count of an upstream when dropped.
pub struct InFlight(Arc<UpstreamRuntime>);

impl InFlight {
    /// The upstream this work runs on.
    pub fn upstream(&self) -> &Arc<UpstreamRuntime> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pool's TLS towards its upstreams, as built from its definition.
#[derive(Debug)]
struct PoolTls {
    definition: UpstreamTls,
    /// The pool's protocol: it decides the ALPN offer.
    protocol: UpstreamProtocol,
    /// The reason is kept so every connection attempt reports it (502) instead of
    /// silently going out in plain text.
    connector: Result<Arc<UpstreamConnector>, String>,
    /// Identity of these settings in the per-thread idle connection store.
    id: u64,
}

/// A pool at run time.
#[derive(Debug)]
pub struct PoolRuntime {
    /// Pool name.
    pub name: String,
    /// Balancing policy.
    pub balance: Balance,
    /// Active health check, if any.
    pub health: Option<HealthCheck>,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Time from the request fully sent to the upstream's response head.
    pub response_timeout: Duration,
    /// Connection reuse, attempt budget, outlier ejection.
    pub policy: UpstreamPolicy,
    /// HTTP version towards the upstreams.
    pub protocol: UpstreamProtocol,
    upstreams: Vec<Arc<UpstreamRuntime>>,
    /// Where each upstream comes from and its weight (same order as `upstreams`).
    origins: Vec<(Origin, u32)>,
    /// For a registered route's pool: where requests wait while no instance is registered.
    pub hold: Option<Arc<Hold>>,
    /// Round-robin schedule: upstream indexes, each repeated by weight, interleaved.
    schedule: Vec<usize>,
    next: AtomicUsize,
    tls: Option<Arc<PoolTls>>,
}

/// Why a pool could not offer any upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoUpstream {
    /// The pool has no upstreams at all.
    Empty,
    /// Every upstream is draining or failed its health check.
    NoneHealthy,
}

/// Upstreams to try for one request, best first (see [`PoolRuntime::candidates`]).
pub struct Candidates<'a> {
    pool: &'a PoolRuntime,
    /// Positions in rotation order; `None`: rotate from `first`.
    sorted: Option<Vec<usize>>,
    first: usize,
    /// 0: upstreams not ejected; 1: ejected ones, last.
    pass: u8,
    k: usize,
    /// Positions (below 64) found ejected in pass 0: pass 1 offers exactly these, so an
    /// upstream that failed during this request is not tried twice.
    deferred: u64,
}

impl<'a> Iterator for Candidates<'a> {
    type Item = &'a Arc<UpstreamRuntime>;

    fn next(&mut self) -> Option<Self::Item> {
        let upstreams = &self.pool.upstreams;
        let n = upstreams.len();
        while self.pass < 2 {
            while self.k < n {
                let i = match &self.sorted {
                    Some(order) => order[self.k],
                    None => (self.first + self.k) % n,
                };
                self.k += 1;
                let u = &upstreams[i];
                if u.is_draining() || !u.is_healthy() {
                    continue;
                }
                if self.pass == 0 {
                    if !u.is_ejected() {
                        return Some(u);
                    }
                    if i < 64 {
                        self.deferred |= 1 << i;
                    }
                } else if (i < 64 && self.deferred & (1 << i) != 0) || (i >= 64 && u.is_ejected()) {
                    return Some(u);
                }
            }
            self.pass += 1;
            self.k = 0;
        }
        None
    }
}

static TLS_IDS: AtomicU64 = AtomicU64::new(1);

impl PoolRuntime {
    /// Compiles `pool` with its static upstreams only, reusing the upstream runtimes of
    /// `previous` by address.
    pub fn new(pool: &Pool, previous: Option<&PoolRuntime>) -> PoolRuntime {
        let members: Vec<(Upstream, Origin)> = pool
            .upstreams
            .iter()
            .map(|u| (u.clone(), Origin::Static))
            .collect();
        PoolRuntime::build(pool, &members, OnChange::Keep, None, previous)
    }

    /// Compiles `pool` running `members` (static, discovered and registered upstreams),
    /// reusing the upstream runtimes of `previous` by address. With [`OnChange::Reset`],
    /// streams to upstreams of `previous` that are no longer members are told to close.
    pub fn build(
        pool: &Pool,
        members: &[(Upstream, Origin)],
        on_change: OnChange,
        hold: Option<Arc<Hold>>,
        previous: Option<&PoolRuntime>,
    ) -> PoolRuntime {
        let previous_tls = previous.and_then(|p| p.tls.as_ref());
        let tls_changed = previous.is_some()
            && (previous_tls.map(|t| &t.definition) != pool.tls.as_ref()
                || previous_tls.is_some_and(|t| t.protocol != pool.protocol));
        let tls = pool.tls.as_ref().map(|definition| match previous_tls {
            Some(t) if !tls_changed && t.connector.is_ok() => t.clone(),
            _ => {
                let alpn: &[&[u8]] = match pool.protocol {
                    UpstreamProtocol::Http1 => &[],
                    UpstreamProtocol::H2 | UpstreamProtocol::H2c => &[b"h2"],
                    UpstreamProtocol::Auto => &[b"h2", b"http/1.1"],
                };
                let connector = UpstreamConnector::with_alpn(definition, alpn).map(Arc::new).map_err(|e| {
                    tracing::error!(pool = %pool.name, error = %e, "upstream TLS settings are unusable; connections to this pool fail");
                    e.to_string()
                });
                Arc::new(PoolTls {
                    definition: definition.clone(),
                    protocol: pool.protocol,
                    connector,
                    id: TLS_IDS.fetch_add(1, Ordering::Relaxed),
                })
            }
        });
        let upstreams: Vec<Arc<UpstreamRuntime>> = members
            .iter()
            .map(|(u, _)| {
                let rt = previous
                    .and_then(|p| p.upstreams.iter().find(|o| o.address == u.address))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(UpstreamRuntime::new(&u.address)));
                rt.draining
                    .store(u.state == UpstreamState::Draining, Ordering::Relaxed);
                if pool.health.is_none() {
                    rt.healthy.store(true, Ordering::Relaxed);
                }
                if tls_changed {
                    // Kept connections were made with the old TLS settings (or none).
                    rt.forget_idle();
                }
                rt
            })
            .collect();
        if on_change == OnChange::Reset {
            if let Some(previous) = previous {
                for old in &previous.upstreams {
                    if !upstreams.iter().any(|u| Arc::ptr_eq(u, old)) {
                        old.close_streams();
                    }
                }
            }
        }
        // Interleave by weight: round r takes every upstream whose weight exceeds r.
        let max_weight = members.iter().map(|(u, _)| u.weight).max().unwrap_or(0);
        let mut schedule = Vec::new();
        for round in 0..max_weight {
            for (i, (u, _)) in members.iter().enumerate() {
                if u.weight > round {
                    schedule.push(i);
                }
            }
        }
        PoolRuntime {
            name: pool.name.clone(),
            balance: pool.balance,
            health: pool.health.clone(),
            connect_timeout: pool.connect_timeout,
            response_timeout: pool.response_timeout,
            policy: pool.policy.clone(),
            protocol: pool.protocol,
            upstreams,
            origins: members.iter().map(|(u, o)| (*o, u.weight)).collect(),
            hold,
            schedule,
            next: AtomicUsize::new(0),
            tls,
        }
    }

    /// The key under which connections to `address` of this pool are kept for reuse.
    pub fn conn_key<'a>(&self, address: &'a str) -> ConnKey<'a> {
        ConnKey {
            address,
            tls: self.tls.as_ref().map_or(0, |t| t.id),
        }
    }

    /// How requests to `upstream` go out: `Some(true)` HTTP/2, `Some(false)` HTTP/1.1,
    /// `None` not known before a connection negotiated it (`auto` over TLS).
    pub fn speaks_h2(&self) -> Option<bool> {
        match self.protocol {
            UpstreamProtocol::Http1 => Some(false),
            UpstreamProtocol::H2c | UpstreamProtocol::H2 => Some(true),
            UpstreamProtocol::Auto if self.tls.is_none() => Some(false),
            UpstreamProtocol::Auto => None,
        }
    }

    /// Whether one more upstream may be ejected without exceeding `max_ejection_percent`
    /// (one may always be).
    fn may_eject(&self) -> bool {
        let ejected = self.upstreams.iter().filter(|u| u.is_ejected()).count();
        ejected == 0
            || (ejected + 1) * 100
                <= self.policy.outlier.max_ejection_percent as usize * self.upstreams.len()
    }

    /// Opens a connection to `address` within `timeout`, with TLS when the pool has it.
    pub async fn open(
        &self,
        address: &str,
        timeout: Duration,
    ) -> Result<UpstreamStream, ConnectError> {
        let Some(tls) = &self.tls else {
            return connect(address, timeout).await;
        };
        let connector = tls
            .connector
            .as_ref()
            .map_err(|reason| ConnectError::TlsSetup {
                pool: self.name.clone(),
                reason: reason.clone(),
            })?;
        // Boxed: the handshake's state (a whole TLS client connection) would otherwise be
        // part of every caller's future, plain-TCP connections included, and be copied
        // with it each time a connection's task is spawned.
        let dial = crate::boxed::pinned(|| async {
            let stream = connect(address, timeout).await?;
            connector
                .handshake(stream)
                .await
                .map(|s| UpstreamStream::Tls(Box::new(s)))
                .map_err(|source| ConnectError::Tls {
                    address: address.to_string(),
                    source,
                })
        });
        tokio::time::timeout(timeout, dial)
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError::Timeout {
                    address: address.to_string(),
                    timeout,
                })
            })
    }

    /// Every upstream with where it comes from and its weight.
    pub fn members(&self) -> impl Iterator<Item = (&Arc<UpstreamRuntime>, Origin, u32)> {
        self.upstreams
            .iter()
            .zip(self.origins.iter())
            .map(|(u, (o, w))| (u, *o, *w))
    }

    /// All upstreams.
    pub fn upstreams(&self) -> &[Arc<UpstreamRuntime>] {
        &self.upstreams
    }

    /// Upstreams to try, best first: draining and unhealthy ones are left out, ejected ones
    /// go last (they are still tried when nothing else works). Allocates nothing except
    /// for `least_conn`, which sorts.
    pub fn candidates(&self) -> Result<Candidates<'_>, NoUpstream> {
        if self.upstreams.is_empty() {
            return Err(NoUpstream::Empty);
        }
        if !self
            .upstreams
            .iter()
            .any(|u| !u.is_draining() && u.is_healthy())
        {
            return Err(NoUpstream::NoneHealthy);
        }
        let n = self.upstreams.len();
        let (sorted, first) = match self.balance {
            Balance::Ordered => (None, 0),
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (None, self.schedule[start % self.schedule.len()])
            }
            Balance::LeastConn => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let mut order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
                // Stable sort keeps the rotation among equally loaded upstreams.
                order.sort_by_key(|&i| self.upstreams[i].in_flight());
                (Some(order), 0)
            }
        };
        Ok(Candidates {
            pool: self,
            sorted,
            first,
            pass: 0,
            k: 0,
            deferred: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{default_connect_timeout, default_response_timeout, Source, Upstream};

    fn pool(balance: Balance, upstreams: Vec<Upstream>) -> PoolRuntime {
        PoolRuntime::new(
            &Pool {
                name: "p".into(),
                source: Source::Api,
                balance,
                upstreams,
                health: None,
                connect_timeout: default_connect_timeout(),
                response_timeout: default_response_timeout(),
                tls: None,
                policy: Default::default(),
                protocol: Default::default(),
            },
            None,
        )
    }

    fn first(p: &PoolRuntime) -> String {
        p.candidates()
            .expect("candidates")
            .next()
            .expect("one candidate")
            .address
            .clone()
    }

    #[test]
    fn round_robin_rotates_by_weight() {
        let p = pool(
            Balance::RoundRobin,
            vec![
                Upstream {
                    weight: 2,
                    ..Upstream::new("a:1")
                },
                Upstream::new("b:1"),
            ],
        );
        let picks: Vec<String> = (0..6).map(|_| first(&p)).collect();
        assert_eq!(picks, ["a:1", "b:1", "a:1", "a:1", "b:1", "a:1"]);
    }

    #[test]
    fn ordered_prefers_first_until_ejected() {
        let p = pool(
            Balance::Ordered,
            vec![Upstream::new("a:1"), Upstream::new("b:1")],
        );
        assert_eq!(first(&p), "a:1");
        p.upstreams[0].record_failure(&p);
        assert_eq!(first(&p), "b:1");
        // Ejected upstreams are still offered last.
        assert_eq!(p.candidates().expect("candidates").count(), 2);
    }

    /// Time left of an ejection.
    fn ejected_for(u: &UpstreamRuntime) -> Duration {
        Duration::from_nanos(
            u.ejected_until_ns
                .load(Ordering::Relaxed)
                .saturating_sub(mono_ns()),
        )
    }

    #[test]
    fn ejection_backs_off_exponentially_and_a_success_resets_it() {
        let p = pool(
            Balance::RoundRobin,
            vec![Upstream::new("a:1"), Upstream::new("b:1")],
        );
        let a = &p.upstreams[0];
        let base = p.policy.outlier.base_ejection;
        a.record_failure(&p);
        assert!(a.is_ejected());
        assert!(ejected_for(a) <= base);
        // The ejection ran out (simulated) and it fails again: twice as long, then four times.
        a.ejected_until_ns.store(1, Ordering::Relaxed);
        a.record_failure(&p);
        assert!(ejected_for(a) > base && ejected_for(a) <= base * 2);
        a.ejected_until_ns.store(1, Ordering::Relaxed);
        a.record_failure(&p);
        assert!(ejected_for(a) > base * 2 && ejected_for(a) <= base * 4);
        assert_eq!(a.ejections_total(), 3);
        // A success ends the ejection and the back-off.
        a.record_success();
        assert!(!a.is_ejected());
        a.record_failure(&p);
        assert!(ejected_for(a) <= base);
    }

    #[test]
    fn consecutive_failures_and_max_ejection_percent() {
        let mut definition = Pool {
            name: "p".into(),
            source: Source::Api,
            balance: Balance::RoundRobin,
            upstreams: vec![
                Upstream::new("a:1"),
                Upstream::new("b:1"),
                Upstream::new("c:1"),
            ],
            health: None,
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            tls: None,
            policy: Default::default(),
            protocol: Default::default(),
        };
        definition.policy.outlier.consecutive_failures = 2;
        definition.policy.outlier.max_ejection_percent = 34;
        let p = PoolRuntime::new(&definition, None);
        let [a, b, c] = [&p.upstreams[0], &p.upstreams[1], &p.upstreams[2]];
        a.record_failure(&p);
        assert!(!a.is_ejected(), "one failure of two");
        a.record_success();
        a.record_failure(&p);
        assert!(
            !a.is_ejected(),
            "a success in between starts the count again"
        );
        a.record_failure(&p);
        assert!(a.is_ejected());
        // 34 % of three: one upstream; the first is always allowed, the second is not.
        b.record_failure(&p);
        b.record_failure(&p);
        assert!(!b.is_ejected());
        assert!(!c.is_ejected());
    }

    #[test]
    fn least_conn_picks_idle_upstream() {
        let p = pool(
            Balance::LeastConn,
            vec![Upstream::new("a:1"), Upstream::new("b:1")],
        );
        let _busy = p.upstreams[0].start();
        for _ in 0..4 {
            assert_eq!(first(&p), "b:1");
        }
    }

    #[test]
    fn draining_and_unhealthy_are_skipped() {
        let p = pool(
            Balance::RoundRobin,
            vec![
                Upstream {
                    state: UpstreamState::Draining,
                    ..Upstream::new("a:1")
                },
                Upstream::new("b:1"),
            ],
        );
        assert_eq!(first(&p), "b:1");
        p.upstreams[1].set_healthy(false);
        assert_eq!(p.candidates().err(), Some(NoUpstream::NoneHealthy));
    }
}
