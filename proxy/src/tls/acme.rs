//! Ordering certificates with `instant-acme`: the account, one shared order per name,
//! challenge answers (HTTP-01 tokens, TLS-ALPN-01 certificates), per-name backoff, and
//! the hourly order limits.

use crate::telemetry::{AcmeResult, Metrics};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use tokio::sync::{watch, OnceCell};

use super::certs::{unix_now, CertCache, CertEntry, CertSource};
use super::fleet_orders::{FleetOrders, Lock, OrderLock};
use super::store::TlsStore;
use crate::cluster::Admission;
use crate::config::{AcmeChallenge, AcmeConfig};

/// First wait after a failed order for a name; doubles per failure.
const BACKOFF_START: Duration = Duration::from_secs(30);
/// Longest wait between attempts for one name.
const BACKOFF_MAX: Duration = Duration::from_secs(3600);
/// The window of the order limits.
const HOUR: Duration = Duration::from_secs(3600);
/// How long the ACME server may take to validate and issue.
const ORDER_TIMEOUT: Duration = Duration::from_secs(90);
/// In a fleet, how long a node waits for the certificate another node is ordering: longer
/// than that node's own order may take, plus its lock's lease running out if it died.
const FLEET_WAIT: Duration = Duration::from_secs(120);
/// In a fleet, how often a waiting node asks etcd itself whether the lock is still held
/// (the watch tells it sooner, unless the watch is down).
const FLEET_RECHECK: Duration = Duration::from_secs(2);
/// How long an order waits at start-up for the fleet to be joined.
const FLEET_JOIN_WAIT: Duration = Duration::from_secs(15);

/// Why no certificate could be ordered; cloneable so every waiting handshake gets it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// The name failed recently and waits before the next attempt.
    #[error("{name}: ordering backs off for {remaining:?} after {failures} failure(s)")]
    BackingOff {
        /// The name.
        name: String,
        /// Time left.
        remaining: Duration,
        /// Consecutive failures.
        failures: u32,
    },
    /// An hourly limit is reached.
    #[error("{0}")]
    RateLimited(String),
    /// The ACME exchange failed.
    #[error("{0}")]
    Failed(String),
}

/// Answers to pending challenges, read by the HTTP listeners and the TLS acceptor.
#[derive(Default)]
pub struct Challenges {
    /// HTTP-01: token -> key authorization.
    http01: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: name -> the self-signed certificate carrying the digest.
    tls_alpn01: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Challenges")
    }
}

impl Challenges {
    /// The key authorization for an HTTP-01 token, if an order waits for it.
    pub fn http01(&self, token: &str) -> Option<String> {
        self.http01
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    /// The TLS-ALPN-01 certificate for `name`, if an order waits for it.
    pub fn tls_alpn01(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.tls_alpn01
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
}

/// Where every handshake waiting for one name's order learns its outcome.
type OrderWatch = watch::Receiver<Option<Result<Arc<CertEntry>, OrderError>>>;

/// Counters for the status call and the tests.
#[derive(Debug, Default)]
pub struct IssuerStats {
    /// Orders created on the ACME server.
    pub orders: AtomicU64,
    /// Orders that produced a certificate.
    pub issued: AtomicU64,
    /// Orders that failed.
    pub failed: AtomicU64,
    /// Renewals started by the background task or the API.
    pub renewals: AtomicU64,
}

#[derive(Default)]
struct Limits {
    /// Start times of recent orders, oldest first.
    global: VecDeque<Instant>,
    per_name: HashMap<String, VecDeque<Instant>>,
    /// name -> (consecutive failures, not before).
    backoff: HashMap<String, (u32, Instant)>,
}

/// Orders certificates; one per name at a time.
pub struct Issuer {
    config: AcmeConfig,
    max_per_hour: usize,
    max_per_name_per_hour: usize,
    store: TlsStore,
    provider: Arc<CryptoProvider>,
    certs: Arc<CertCache>,
    account: OnceCell<Account>,
    challenges: Arc<Challenges>,
    in_flight: Mutex<HashMap<String, OrderWatch>>,
    limits: Mutex<Limits>,
    last_error: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
    /// Fleet mode: the order locks and challenge tokens shared through etcd.
    fleet_orders: std::sync::OnceLock<Arc<FleetOrders>>,
    /// Set when the node will join a fleet: orders wait for it rather than go alone.
    fleet_expected: std::sync::atomic::AtomicBool,
    /// Counters.
    pub stats: IssuerStats,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("directory", &self.config.directory)
            .finish_non_exhaustive()
    }
}

/// What the status call reports about ACME.
#[derive(Debug, Clone)]
pub struct IssuerStatus {
    /// Directory URL.
    pub directory: String,
    /// Whether the account is registered (this run or an earlier one).
    pub account_ready: bool,
    /// Names being ordered now.
    pub pending: Vec<String>,
    /// Names waiting after failures, with the time left.
    pub backing_off: Vec<(String, Duration)>,
    /// Orders started in the last hour.
    pub orders_last_hour: usize,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// How many orders an issuer may start per hour, in all and per name.
#[derive(Debug, Clone, Copy)]
pub struct OrderLimits {
    /// Orders per hour, all names together.
    pub per_hour: u32,
    /// Orders per hour for one name.
    pub per_name_per_hour: u32,
}

impl Issuer {
    /// An issuer for `config`; the account is created or loaded on the first order.
    pub fn new(
        config: AcmeConfig,
        limits: OrderLimits,
        store: TlsStore,
        provider: Arc<CryptoProvider>,
        certs: Arc<CertCache>,
        challenges: Arc<Challenges>,
        metrics: Arc<Metrics>,
    ) -> Issuer {
        Issuer {
            config,
            max_per_hour: usize::try_from(limits.per_hour).unwrap_or(usize::MAX),
            max_per_name_per_hour: usize::try_from(limits.per_name_per_hour).unwrap_or(usize::MAX),
            store,
            provider,
            certs,
            account: OnceCell::new(),
            challenges,
            in_flight: Mutex::new(HashMap::new()),
            limits: Mutex::new(Limits::default()),
            last_error: Mutex::new(None),
            metrics,
            fleet_orders: std::sync::OnceLock::new(),
            fleet_expected: std::sync::atomic::AtomicBool::new(false),
            stats: IssuerStats::default(),
        }
    }

    /// Says that this node will join a fleet: until [`join_fleet_orders`](Self::join_fleet_orders), orders
    /// wait for it instead of ordering without the fleet's lock.
    pub fn expect_fleet_orders(&self) {
        self.fleet_expected.store(true, Ordering::Relaxed);
    }

    /// Orders from now on take the fleet's per-name lock and publish their HTTP-01 tokens
    /// to the fleet.
    pub fn join_fleet_orders(&self, fleet: Arc<FleetOrders>) {
        let _ = self.fleet_orders.set(fleet);
    }

    /// The fleet, once joined; `None` on a single host.
    async fn fleet(&self) -> Result<Option<Arc<FleetOrders>>, OrderError> {
        if let Some(f) = self.fleet_orders.get() {
            return Ok(Some(f.clone()));
        }
        if !self.fleet_expected.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let joined = tokio::time::timeout(FLEET_JOIN_WAIT, async {
            loop {
                if let Some(f) = self.fleet_orders.get() {
                    return f.clone();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        joined.map(Some).map_err(|_| {
            OrderError::Failed(
                "fleet mode has not started yet: no order without the fleet's lock".into(),
            )
        })
    }

    /// The challenge answers shared with the listeners.
    pub fn challenges(&self) -> &Arc<Challenges> {
        &self.challenges
    }

    /// Orders a certificate for `name`, or joins the order already running for it, and
    /// waits for the result. The certificate is in the cache before any waiter wakes up.
    /// In a fleet, a certificate the fleet already holds and that is not due for renewal
    /// is used instead of ordering.
    pub async fn obtain(self: &Arc<Self>, name: &str) -> Result<Arc<CertEntry>, OrderError> {
        self.obtain_with(name, false).await
    }

    /// Orders a new certificate for `name` even if a fresh one exists (an operator asked).
    pub async fn renew_now(self: &Arc<Self>, name: &str) -> Result<Arc<CertEntry>, OrderError> {
        self.obtain_with(name, true).await
    }

    async fn obtain_with(
        self: &Arc<Self>,
        name: &str,
        force: bool,
    ) -> Result<Arc<CertEntry>, OrderError> {
        let mut rx = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            match in_flight.get(name) {
                Some(rx) => rx.clone(),
                None => {
                    if let Err(e) = self.admit(name) {
                        self.metrics.acme_order(AcmeResult::RateLimited);
                        return Err(e);
                    }
                    let (tx, rx) = watch::channel(None);
                    in_flight.insert(name.to_string(), rx.clone());
                    let issuer = self.clone();
                    let name = name.to_string();
                    // A task of its own: the handshake that started the order may go away.
                    tokio::spawn(async move {
                        let produced = issuer.produce(&name, force).await;
                        let ordered = matches!(produced, Ok((_, true)));
                        let result = produced.map(|(entry, _)| entry);
                        issuer.finish(&name, &result, ordered);
                        if let Ok(entry) = &result {
                            issuer.certs.insert(entry.clone());
                        }
                        issuer
                            .in_flight
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&name);
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let result = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| OrderError::Failed("the order task ended without an answer".into()))?;
        match result.as_ref() {
            Some(r) => r.clone(),
            None => Err(OrderError::Failed(
                "the order task ended without an answer".into(),
            )),
        }
    }

    /// A certificate for `name`: ordered here, or in a fleet, from whichever node holds
    /// the name's lock. True when this node ordered it.
    async fn produce(&self, name: &str, force: bool) -> Result<(Arc<CertEntry>, bool), OrderError> {
        match self.fleet().await? {
            None => self.order_timed(name, None).await.map(|e| (e, true)),
            Some(fleet) => self.produce_in_fleet(&fleet, name, force).await,
        }
    }

    async fn order_timed(
        &self,
        name: &str,
        lock: Option<&mut OrderLock>,
    ) -> Result<Arc<CertEntry>, OrderError> {
        // In a fleet, the node about to order (holding the name's lock) counts the order
        // against the fleet's limits first.
        self.admit_in_fleet(name).await?;
        match tokio::time::timeout(ORDER_TIMEOUT, self.order(name, lock)).await {
            Ok(r) => r,
            Err(_) => Err(OrderError::Failed(format!(
                "{name}: no certificate within {ORDER_TIMEOUT:?}"
            ))),
        }
    }

    /// The certificate of `name` this node serves, if it is not due for renewal.
    fn fresh(&self, name: &str) -> Option<Arc<CertEntry>> {
        self.certs
            .stored(name)
            .filter(|e| e.info.source == CertSource::Acme && e.info.renew_at() > unix_now())
    }

    /// One order per name in the whole fleet: take the name's lock and order, or wait for
    /// the node that holds it to store its certificate (which reaches this node through
    /// the fleet's certificate store). A waiting node never orders; it tries the lock
    /// again only once the holder has let go (finished, failed, or died and its lease ran
    /// out).
    async fn produce_in_fleet(
        &self,
        fleet: &FleetOrders,
        name: &str,
        force: bool,
    ) -> Result<(Arc<CertEntry>, bool), OrderError> {
        let failed = |what: String| OrderError::Failed(format!("{name}: {what}"));
        let deadline = tokio::time::Instant::now() + FLEET_WAIT;
        let mut waited_for: Option<String> = None;
        loop {
            let lock = fleet
                .try_lock(name)
                .await
                .map_err(|e| failed(format!("the fleet's order lock: {e}")))?;
            match lock {
                Lock::Held(mut lock) => {
                    // What the fleet stored before the lock was taken (the certificate of
                    // the previous holder) must be applied here before deciding to order.
                    if let Err(e) = fleet.cluster().wait_applied(lock.revision()).await {
                        lock.release().await;
                        return Err(failed(format!("the fleet's certificates: {e}")));
                    }
                    if !force || waited_for.is_some() {
                        if let Some(entry) = self.fresh(name) {
                            lock.release().await;
                            tracing::info!(domain = %name, "the fleet already has a current certificate; not ordering");
                            return Ok((entry, false));
                        }
                    }
                    let lost = lock.lost();
                    let result = tokio::select! {
                        r = self.order_timed(name, Some(&mut lock)) => r,
                        _ = lost => Err(failed("lost the fleet's order lock during the order".into())),
                    };
                    lock.release().await;
                    return result.map(|entry| (entry, true));
                }
                Lock::Busy(holder) => {
                    if waited_for.as_deref() != Some(holder.as_str()) {
                        tracing::info!(domain = %name, %holder, "another node orders this name; waiting for its certificate");
                        waited_for = Some(holder);
                    }
                    // Until the holder lets go: its certificate may arrive meanwhile. The
                    // watch may not show a lock just taken yet: it is trusted to say the
                    // lock went only after a moment.
                    let waiting = tokio::time::Instant::now();
                    let recheck = waiting + FLEET_RECHECK;
                    loop {
                        if let Some(entry) = self.fresh(name) {
                            if !force {
                                return Ok((entry, false));
                            }
                        }
                        let now = tokio::time::Instant::now();
                        if now >= deadline {
                            return Err(failed(format!(
                                "node {:?} holds the fleet's order lock and no certificate came within {FLEET_WAIT:?}",
                                waited_for.unwrap_or_default()
                            )));
                        }
                        if now >= recheck
                            || (now >= waiting + Duration::from_millis(250)
                                && fleet.following()
                                && fleet.holder(name).is_none())
                        {
                            break;
                        }
                        fleet.changed(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }

    /// Fleet mode: counts the order in the fleet's log, or refuses it when the fleet's
    /// orders of the last hour reach a limit (`Ok` at once on a single host, whose orders
    /// [`admit`](Self::admit) counts). etcd unreachable refuses the order: the limits
    /// cannot be checked.
    async fn admit_in_fleet(&self, name: &str) -> Result<(), OrderError> {
        let admission = self
            .store
            .admit_order(name, self.max_per_hour, self.max_per_name_per_hour)
            .await;
        let refusal = match admission {
            Ok(Admission::Admitted) => return Ok(()),
            Ok(Admission::Refused(why)) => OrderError::RateLimited(why),
            Err(e) => OrderError::RateLimited(format!("{name}: the fleet's order count: {e}")),
        };
        self.metrics.acme_order(AcmeResult::RateLimited);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(refusal.to_string());
        Err(refusal)
    }

    /// Checks backoff and, on a single host, the limits for a new order and counts it (in
    /// fleet mode the fleet's log counts, see [`admit_in_fleet`](Self::admit_in_fleet)).
    fn admit(&self, name: &str) -> Result<(), OrderError> {
        let now = Instant::now();
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((failures, until)) = limits.backoff.get(name) {
            if *until > now {
                return Err(OrderError::BackingOff {
                    name: name.into(),
                    remaining: *until - now,
                    failures: *failures,
                });
            }
        }
        while limits
            .global
            .front()
            .is_some_and(|t| now.duration_since(*t) >= HOUR)
        {
            limits.global.pop_front();
        }
        if self.store.in_fleet() {
            // Orders started here, for status only.
            limits.global.push_back(now);
            return Ok(());
        }
        if limits.global.len() >= self.max_per_hour {
            return Err(OrderError::RateLimited(format!(
                "{name}: {} orders in the last hour (max_orders_per_hour)",
                limits.global.len()
            )));
        }
        let per_name = limits.per_name.entry(name.to_string()).or_default();
        while per_name
            .front()
            .is_some_and(|t| now.duration_since(*t) >= HOUR)
        {
            per_name.pop_front();
        }
        if per_name.len() >= self.max_per_name_per_hour {
            return Err(OrderError::RateLimited(format!(
                "{name}: {} orders for this name in the last hour (max_orders_per_name_per_hour)",
                per_name.len()
            )));
        }
        per_name.push_back(now);
        limits.global.push_back(now);
        limits.per_name.retain(|_, v| !v.is_empty());
        Ok(())
    }

    /// Records the outcome; `ordered`: this node made the order (not another of the fleet).
    fn finish(&self, name: &str, result: &Result<Arc<CertEntry>, OrderError>, ordered: bool) {
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            // Refused by the fleet's limits before any order (counted there): no backoff.
            Err(OrderError::RateLimited(_)) => {}
            Ok(_) if !ordered => {
                limits.backoff.remove(name);
                tracing::info!(domain = %name, "serving the certificate another node of the fleet ordered");
            }
            Ok(_) => {
                limits.backoff.remove(name);
                self.stats.issued.fetch_add(1, Ordering::Relaxed);
                self.metrics.acme_order(AcmeResult::Issued);
                tracing::info!(domain = %name, "certificate issued");
            }
            Err(e) => {
                let failures = limits.backoff.get(name).map_or(0, |(n, _)| *n) + 1;
                let wait = BACKOFF_START
                    .saturating_mul(1 << (failures - 1).min(10))
                    .min(BACKOFF_MAX);
                limits
                    .backoff
                    .insert(name.to_string(), (failures, Instant::now() + wait));
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                self.metrics.acme_order(AcmeResult::Failed);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                tracing::warn!(domain = %name, error = %e, retry_in = ?wait, "certificate order failed");
            }
        }
    }

    /// Forgets the backoff of `name` (an operator asked for a renewal).
    pub fn clear_backoff(&self, name: &str) {
        self.limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .backoff
            .remove(name);
    }

    /// What the status call reports.
    pub fn status(&self) -> IssuerStatus {
        // Lock order: in_flight before limits, as in `obtain`.
        let mut pending: Vec<String> = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        pending.sort();
        let now = Instant::now();
        let limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let mut backing_off: Vec<(String, Duration)> = limits
            .backoff
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(n, (_, until))| (n.clone(), *until - now))
            .collect();
        backing_off.sort();
        IssuerStatus {
            directory: self.config.directory.clone(),
            account_ready: self.account.initialized(),
            pending,
            backing_off,
            orders_last_hour: limits
                .global
                .iter()
                .filter(|t| now.duration_since(**t) < HOUR)
                .count(),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    async fn account(&self) -> Result<&Account, OrderError> {
        self.account
            .get_or_try_init(|| async {
                let failed = |what: &str, e: &dyn std::fmt::Display| {
                    OrderError::Failed(format!("ACME account: {what}: {e}"))
                };
                let builder = || match &self.config.ca_file {
                    Some(ca) => Account::builder_with_root(ca).map_err(|e| failed("ca_file", &e)),
                    None => Account::builder().map_err(|e| failed("HTTP client", &e)),
                };
                let stored = self
                    .store
                    .account(&self.config.directory)
                    .await
                    .map_err(|e| failed("store", &e))?;
                if let Some(json) = stored {
                    let credentials: AccountCredentials = serde_json::from_str(&json)
                        .map_err(|e| failed("stored credentials", &e))?;
                    return builder()?
                        .from_credentials(credentials)
                        .await
                        .map_err(|e| failed("restore", &e));
                }
                let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
                let (account, credentials) = builder()?
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.config.directory.clone(),
                        None,
                    )
                    .await
                    .map_err(|e| failed("register", &e))?;
                let json = serde_json::to_string(&credentials).map_err(|e| failed("encode", &e))?;
                let stored = self
                    .store
                    .save_account(&self.config.directory, &json)
                    .await
                    .map_err(|e| failed("store", &e))?;
                if !stored {
                    // Fleet mode: another node registered the fleet's account first; use
                    // that one, so the fleet orders under one account.
                    let fleet = self
                        .store
                        .account(&self.config.directory)
                        .await
                        .map_err(|e| failed("store", &e))?
                        .ok_or_else(|| failed("fleet", &"the fleet's account vanished"))?;
                    let credentials: AccountCredentials = serde_json::from_str(&fleet)
                        .map_err(|e| failed("the fleet's credentials", &e))?;
                    tracing::info!(directory = %self.config.directory, "using the fleet's ACME account");
                    return builder()?
                        .from_credentials(credentials)
                        .await
                        .map_err(|e| failed("restore", &e));
                }
                tracing::info!(directory = %self.config.directory, "ACME account registered");
                Ok(account)
            })
            .await
    }

    /// One order, start to finish; the challenge answers are removed whatever happens.
    /// With the fleet's `lock`, HTTP-01 answers are published to every node.
    async fn order(
        &self,
        name: &str,
        mut lock: Option<&mut OrderLock>,
    ) -> Result<Arc<CertEntry>, OrderError> {
        let mut tokens = Vec::new();
        let result = self
            .order_inner(name, &mut tokens, lock.as_deref_mut())
            .await;
        if let Some(lock) = lock {
            if let Err(e) = lock.withdraw_alpn().await {
                tracing::debug!(domain = %name, error = %e, "withdrawing a TLS-ALPN-01 answer failed; it goes with the lock's lease");
            }
            for token in &tokens {
                if let Err(e) = lock.withdraw_token(token).await {
                    tracing::debug!(domain = %name, error = %e, "withdrawing an HTTP-01 token failed; it goes with the lock's lease");
                }
            }
        }
        self.challenges
            .http01
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|t, _| !tokens.contains(t));
        self.challenges
            .tls_alpn01
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        result
    }

    async fn order_inner(
        &self,
        name: &str,
        tokens: &mut Vec<String>,
        mut lock: Option<&mut OrderLock>,
    ) -> Result<Arc<CertEntry>, OrderError> {
        let acme =
            |what: &str, e: instant_acme::Error| OrderError::Failed(format!("{name}: {what}: {e}"));
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(name.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(|e| acme("new order", e))?;
        self.stats.orders.fetch_add(1, Ordering::Relaxed);
        tracing::info!(domain = %name, "certificate ordered");
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| acme("authorization", e))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(OrderError::Failed(format!(
                        "{name}: authorization is {other:?}"
                    )))
                }
            }
            let offered: Vec<ChallengeType> =
                authz.challenges.iter().map(|c| c.r#type.clone()).collect();
            let kind = self
                .config
                .challenges
                .iter()
                .map(|c| match c {
                    AcmeChallenge::Http01 => ChallengeType::Http01,
                    AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
                })
                .find(|c| offered.contains(c))
                .ok_or_else(|| {
                    OrderError::Failed(format!(
                        "{name}: the server offers none of the configured challenges"
                    ))
                })?;
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| OrderError::Failed(format!("{name}: challenge vanished")))?;
            let key_authorization = challenge.key_authorization();
            match kind {
                ChallengeType::TlsAlpn01 => {
                    let certified = alpn_certificate(
                        name,
                        key_authorization.digest().as_ref(),
                        &self.provider,
                    )?;
                    if let Some(lock) = lock.as_deref_mut() {
                        lock.publish_alpn(key_authorization.digest().as_ref())
                            .await
                            .map_err(|e| {
                                OrderError::Failed(format!(
                                    "{name}: publishing the TLS-ALPN-01 answer to the fleet: {e}"
                                ))
                            })?;
                    }
                    self.challenges
                        .tls_alpn01
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.to_string(), certified);
                }
                _ => {
                    let token = challenge.token.clone();
                    self.challenges
                        .http01
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(token.clone(), key_authorization.as_str().to_string());
                    if let Some(lock) = lock.as_deref_mut() {
                        // Before the CA is told to validate: it may reach any node.
                        lock.publish_token(&token, key_authorization.as_str())
                            .await
                            .map_err(|e| {
                                OrderError::Failed(format!(
                                    "{name}: publishing the HTTP-01 token to the fleet: {e}"
                                ))
                            })?;
                    }
                    tokens.push(token);
                }
            }
            challenge
                .set_ready()
                .await
                .map_err(|e| acme("challenge", e))?;
        }
        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(Duration::from_secs(60));
        let status = order
            .poll_ready(&retries)
            .await
            .map_err(|e| acme("validation", e))?;
        if status != OrderStatus::Ready {
            return Err(OrderError::Failed(format!(
                "{name}: order is {status:?} after validation"
            )));
        }
        let key_pem = order.finalize().await.map_err(|e| acme("finalize", e))?;
        let chain_pem = order
            .poll_certificate(&retries)
            .await
            .map_err(|e| acme("certificate", e))?;
        let entry =
            CertEntry::from_pem(name, &chain_pem, &key_pem, CertSource::Acme, &self.provider)
                .map_err(|e| OrderError::Failed(format!("{name}: issued certificate: {e}")))?;
        self.store
            .save_certificate(name, CertSource::Acme, &chain_pem, &key_pem)
            .await
            .map_err(|e| OrderError::Failed(format!("{name}: storing the certificate: {e}")))?;
        Ok(Arc::new(entry))
    }
}

/// The self-signed certificate that answers a TLS-ALPN-01 challenge (RFC 8737): the name
/// as its only SAN and the key authorization digest in the acmeIdentifier extension.
pub(super) fn alpn_certificate(
    name: &str,
    digest: &[u8],
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, OrderError> {
    let failed = |e: &dyn std::fmt::Display| {
        OrderError::Failed(format!("{name}: TLS-ALPN-01 certificate: {e}"))
    };
    let key = rcgen::KeyPair::generate().map_err(|e| failed(&e))?;
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| failed(&e))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| failed(&e))?;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| failed(&e))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}
