//! Upstream pools at run time: balancing, passive and active health, connection reuse.
//!
//! A [`PoolRuntime`] is rebuilt with every routing table, but the per-upstream runtime
//! ([`UpstreamRuntime`]: health, in-flight count, idle connections) is shared between
//! consecutive tables, so a config change does not forget that an upstream is down.
//!
//! A pool with a `tls` section gets its rustls client config built here, once per
//! definition (and kept across tables while the definition stays the same).

mod connect;
pub mod health;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;

pub use connect::{connect, http_sender, ConnectError, HttpSender, UpstreamStream};

use tokio_util::sync::CancellationToken;

use crate::discovery::{OnChange, Origin};
use crate::registration::Hold;
use crate::state::{Balance, HealthCheck, Pool, Upstream, UpstreamState, UpstreamTls};
use crate::tls::upstream::UpstreamConnector;

/// How long an upstream is skipped after a failed connection attempt.
pub const EJECT_FOR: Duration = Duration::from_secs(10);

/// Idle keep-alive connections kept per upstream.
const IDLE_PER_UPSTREAM: usize = 64;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One upstream's run-time data.
pub struct UpstreamRuntime {
    /// `host:port`.
    pub address: String,
    draining: AtomicBool,
    healthy: AtomicBool,
    ejected_until_ms: AtomicU64,
    in_flight: AtomicUsize,
    idle: ArrayQueue<HttpSender>,
    /// Fired when it leaves a pool whose policy is `on_change = "reset"`.
    removed: CancellationToken,
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
            ejected_until_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle: ArrayQueue::new(IDLE_PER_UPSTREAM),
            removed: CancellationToken::new(),
        }
    }

    /// Resolves once it was removed from a pool that resets connections on change.
    pub async fn removed(&self) {
        self.removed.cancelled().await
    }

    /// Tells every stream to it to close (it left a pool with `on_change = "reset"`).
    pub fn close_streams(&self) {
        self.removed.cancel();
        while self.idle.pop().is_some() {}
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

    /// Whether a recent connection failure keeps it out of rotation.
    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// Takes it out of rotation for [`EJECT_FOR`] after a connection failure.
    pub fn eject(&self) {
        let until = now_ms() + u64::try_from(EJECT_FOR.as_millis()).unwrap_or(10_000);
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        // Pooled connections to a failing upstream are suspect too.
        while self.idle.pop().is_some() {}
    }

    /// Puts it back into rotation after a success.
    pub fn clear_ejection(&self) {
        if self.ejected_until_ms.load(Ordering::Relaxed) != 0 {
            self.ejected_until_ms.store(0, Ordering::Relaxed);
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

    /// An idle keep-alive connection, if one is ready.
    pub fn take_idle(&self) -> Option<HttpSender> {
        while let Some(sender) = self.idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Returns a connection for reuse (dropped if the pool is full, closed, or draining).
    pub fn put_idle(&self, sender: HttpSender) {
        if !sender.is_closed() && !self.is_draining() {
            let _ = self.idle.push(sender);
        }
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
    /// The reason is kept so every connection attempt reports it (502) instead of
    /// silently going out in plain text.
    connector: Result<Arc<UpstreamConnector>, String>,
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
    /// Time to the upstream's response head.
    pub response_timeout: Duration,
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
        let tls_changed =
            previous.is_some() && previous_tls.map(|t| &t.definition) != pool.tls.as_ref();
        let tls = pool.tls.as_ref().map(|definition| match previous_tls {
            Some(t) if !tls_changed && t.connector.is_ok() => t.clone(),
            _ => {
                let connector = UpstreamConnector::new(definition).map(Arc::new).map_err(|e| {
                    tracing::error!(pool = %pool.name, error = %e, "upstream TLS settings are unusable; connections to this pool fail");
                    e.to_string()
                });
                Arc::new(PoolTls {
                    definition: definition.clone(),
                    connector,
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
                    while rt.idle.pop().is_some() {}
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
            upstreams,
            origins: members.iter().map(|(u, o)| (*o, u.weight)).collect(),
            hold,
            schedule,
            next: AtomicUsize::new(0),
            tls,
        }
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
        let dial = async {
            let stream = connect(address, timeout).await?;
            connector
                .handshake(stream)
                .await
                .map(|s| UpstreamStream::Tls(Box::new(s)))
                .map_err(|source| ConnectError::Tls {
                    address: address.to_string(),
                    source,
                })
        };
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
    /// go last (they are still tried when nothing else works).
    pub fn candidates(&self) -> Result<Vec<Arc<UpstreamRuntime>>, NoUpstream> {
        if self.upstreams.is_empty() {
            return Err(NoUpstream::Empty);
        }
        let n = self.upstreams.len();
        let mut order: Vec<usize> = match self.balance {
            Balance::Ordered => (0..n).collect(),
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let first = self.schedule[start % self.schedule.len()];
                (0..n).map(|k| (first + k) % n).collect()
            }
            Balance::LeastConn => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let mut order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
                // Stable sort keeps the rotation among equally loaded upstreams.
                order.sort_by_key(|&i| self.upstreams[i].in_flight());
                order
            }
        };
        order.retain(|&i| {
            let u = &self.upstreams[i];
            !u.is_draining() && u.is_healthy()
        });
        if order.is_empty() {
            return Err(NoUpstream::NoneHealthy);
        }
        let (mut ok, ejected): (Vec<usize>, Vec<usize>) = order
            .into_iter()
            .partition(|&i| !self.upstreams[i].is_ejected());
        ok.extend(ejected);
        Ok(ok.into_iter().map(|i| self.upstreams[i].clone()).collect())
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
            },
            None,
        )
    }

    fn first(p: &PoolRuntime) -> String {
        p.candidates().expect("candidates")[0].address.clone()
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
        p.upstreams[0].eject();
        assert_eq!(first(&p), "b:1");
        // Ejected upstreams are still offered last.
        assert_eq!(p.candidates().expect("candidates").len(), 2);
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
