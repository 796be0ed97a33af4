//! TLS termination and certificates: static certificates (files and API), on-demand ACME
//! issuance behind an allowlist, renewal, and SNI peeking for `tls-passthrough`.
//!
//! Every terminating listener reads the ClientHello first (`LazyConfigAcceptor`). A name
//! with a certificate goes straight on. A name without one is checked against the policy
//! ([`policy`]) *before* anything else: refused names never cause ACME traffic. Allowed
//! names get one shared order ([`acme`]); the handshake waits for it.
//!
//! Pools with a `tls` section reach their upstreams over TLS with the client side in
//! [`crate::upstream::tls`].

pub mod acme;
pub mod certs;
mod fleet;
pub mod fleet_orders;
pub mod policy;
pub mod sni;
mod store;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{Acceptor, ResolvesServerCert};
use rustls::ServerConfig;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

pub use acme::{Challenges, IssuerStatus, OrderError};
pub use certs::{CertInfo, CertSource};
pub use policy::Decision;

use crate::config::{normalise_allow_entry, AcmeChallenge, TlsConfig};
use crate::shutdown::Shutdown;
use crate::state::StateHandle;
use crate::telemetry::Metrics;
use acme::Issuer;
use certs::{unix_now, CertCache, CertEntry, CertResolver, OneCert};
use policy::Policy;
use store::TlsStore;

/// The ALPN protocol of TLS-ALPN-01 validation handshakes.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// The path prefix of HTTP-01 challenges.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";
/// At most one "refused" log line per this interval.
const REFUSAL_LOG_EVERY_SECS: i64 = 10;

/// A TLS setup or management operation failed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum TlsError {
    /// A certificate or key could not be used.
    #[error("{0}")]
    Certificate(String),
    /// A `[[tls.certificates]]` file could not be used.
    #[error("{field}: {path}: {reason}")]
    File {
        /// `tls.certificates[N].cert` or `.key`.
        field: String,
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The database failed.
    #[error("tls store: {0}")]
    Store(String),
    /// A request named something that does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A request is malformed; `field` names the part.
    #[error("{field}: {reason}")]
    Invalid {
        /// Offending field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The object belongs to the config file.
    #[error("{0} is defined in the config file; change it there")]
    Declarative(String),
    /// The certificate belongs to a registered service.
    #[error("{0} belongs to a registered service; it leaves with the service's route")]
    Registered(String),
    /// ACME is not configured or an order failed.
    #[error("{0}")]
    Acme(String),
    /// The state writer takes no writes (shutting down, or handed over to a new process),
    /// or, in fleet mode, etcd is unreachable.
    #[error("{0}")]
    Unavailable(String),
    /// Fleet mode: another node changed the object since this node read it; nothing was
    /// written.
    #[error("conflict: {0}")]
    Conflict(String),
}

/// Why a terminating handshake did not produce a stream.
#[derive(Debug, Error)]
pub enum AcceptError {
    /// The socket failed or the client sent garbage.
    #[error("handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The client did not complete the handshake within the listener's `header_timeout`.
    #[error("TLS handshake not completed within the listener's header_timeout")]
    Timeout,
    /// No certificate for the name, and the policy does not allow ordering one.
    #[error("no certificate for {0:?} and on-demand issuance is not allowed for it")]
    Refused(String),
    /// The order for an allowed name failed.
    #[error(transparent)]
    Order(#[from] OrderError),
    /// A TLS-ALPN-01 validation handshake was answered (not a client connection).
    #[error("answered a TLS-ALPN-01 validation")]
    ChallengeAnswered,
}

/// What the status call reports.
#[derive(Debug, Clone)]
pub struct TlsStatus {
    /// Whether on-demand issuance is enabled.
    pub on_demand: bool,
    /// Handshakes refused because the name was not allowed.
    pub refused_handshakes: u64,
    /// ACME counters and state, when configured.
    pub acme: Option<AcmeStatus>,
}

/// The ACME part of [`TlsStatus`].
#[derive(Debug, Clone)]
pub struct AcmeStatus {
    /// Account, pending orders, backoff.
    pub issuer: IssuerStatus,
    /// Orders created since start.
    pub orders: u64,
    /// Orders that produced a certificate.
    pub issued: u64,
    /// Orders that failed.
    pub failed: u64,
    /// Renewals started (background or API).
    pub renewals: u64,
}

/// TLS at run time: certificates, policy, issuer, and the rustls configs of the listeners.
pub struct Tls {
    provider: Arc<CryptoProvider>,
    certs: Arc<CertCache>,
    policy: Policy,
    issuer: Option<Arc<Issuer>>,
    challenges: Arc<Challenges>,
    store: TlsStore,
    resolver: Arc<CertResolver>,
    tickets: Arc<dyn rustls::server::ProducesTickets>,
    alpn_challenges: bool,
    refused: AtomicU64,
    refused_logged_at: AtomicU64,
    refused_logged_count: AtomicU64,
    /// Fleet mode: the HTTP-01 answers of every node's orders.
    fleet_orders: std::sync::OnceLock<Arc<fleet_orders::FleetOrders>>,
    /// Fleet mode: the TLS objects applied last and what was left out of them.
    fleet_applied:
        std::sync::Mutex<Option<(crate::cluster::TlsObjects, crate::cluster::TlsReport)>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("certs", &self.certs)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the file certificates and the stored ones, and starts the renewal task.
    /// `db` is the state database (already migrated). `in_fleet`: fleet mode, where the
    /// API objects, issued certificates and the ACME account are the fleet's (writes are
    /// refused until [`join_fleet`](Self::join_fleet)).
    pub async fn start(
        config: &TlsConfig,
        db: &Path,
        state: StateHandle,
        in_fleet: bool,
        shutdown: Shutdown,
        metrics: Arc<crate::telemetry::Metrics>,
    ) -> Result<Arc<Tls>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Opening SQLite blocks: a blocking thread does it.
        let store = {
            let (db, state) = (db.to_path_buf(), state.clone());
            tokio::task::spawn_blocking(move || TlsStore::open(&db, state, in_fleet))
                .await
                .map_err(|e| TlsError::Store(e.to_string()))??
        };
        let certs = Arc::new(CertCache::new());
        for (i, files) in config.certificates.iter().enumerate() {
            let read = |path: &Path, key: &str| {
                std::fs::read_to_string(path).map_err(|e| TlsError::File {
                    field: format!("tls.certificates[{i}].{key}"),
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })
            };
            let cert_pem = read(&files.cert, "cert")?;
            let key_pem = read(&files.key, "key")?;
            let entry = CertEntry::from_pem("", &cert_pem, &key_pem, CertSource::File, &provider)
                .map_err(|e| TlsError::File {
                field: format!("tls.certificates[{i}]"),
                path: files.cert.display().to_string(),
                reason: e.to_string(),
            })?;
            certs.insert(Arc::new(entry));
        }
        for stored in store.certificates().await? {
            match CertEntry::from_pem(
                &stored.name,
                &stored.cert_pem,
                &stored.key_pem,
                stored.source,
                &provider,
            ) {
                Ok(entry) => certs.insert(Arc::new(entry)),
                // One bad row must not keep the others (and the daemon) down.
                Err(e) => {
                    tracing::error!(name = %stored.name, error = %e, "stored certificate is unusable; skipped")
                }
            }
        }
        let api_allow = store.allowlist().await?;
        let policy = Policy::new(
            config.on_demand.enabled,
            config.on_demand.allow.clone(),
            api_allow,
            config.on_demand.ask.clone(),
            state,
        );
        let challenges = Arc::new(Challenges::default());
        let issuer = config.acme.clone().map(|acme| {
            Arc::new(Issuer::new(
                acme,
                acme::OrderLimits {
                    per_hour: config.on_demand.max_orders_per_hour,
                    per_name_per_hour: config.on_demand.max_orders_per_name_per_hour,
                },
                store.clone(),
                provider.clone(),
                certs.clone(),
                challenges.clone(),
                metrics.clone(),
            ))
        });
        if let Some(issuer) = issuer.as_ref().filter(|_| in_fleet) {
            // Handshakes before the fleet is joined wait for its order lock.
            issuer.expect_fleet_orders();
        }
        let alpn_challenges = config
            .acme
            .as_ref()
            .is_some_and(|a| a.challenges.contains(&AcmeChallenge::TlsAlpn01));
        let tickets = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| TlsError::Certificate(format!("session tickets: {e}")))?;
        let tls = Arc::new(Tls {
            resolver: Arc::new(CertResolver {
                cache: certs.clone(),
            }),
            provider,
            certs,
            policy,
            issuer,
            challenges,
            store,
            tickets,
            alpn_challenges,
            refused: AtomicU64::new(0),
            refused_logged_at: AtomicU64::new(0),
            refused_logged_count: AtomicU64::new(0),
            fleet_orders: std::sync::OnceLock::new(),
            fleet_applied: std::sync::Mutex::new(None),
        });
        if let Some(acme) = &config.acme {
            tokio::spawn(renewal(tls.clone(), acme.renew_check_interval, shutdown));
        }
        Ok(tls)
    }

    /// The rustls config of a terminating listener offering `alpn` (e.g. `h2`, `http/1.1`).
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Certificate(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.resolver.clone() as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.ticketer = self.tickets.clone();
        Ok(Arc::new(config))
    }

    /// Reads the ClientHello, makes sure a certificate exists for its name (ordering one if
    /// the policy allows), then completes the handshake with `config`. Refusals are counted
    /// in `metrics`.
    ///
    /// The client's part of the handshake (ClientHello through Finished) must be done
    /// within `limit` (the listener's `header_timeout`); time spent ordering a certificate
    /// is ours, not the client's, and does not count.
    pub async fn accept<IO>(
        &self,
        io: IO,
        config: &Arc<ServerConfig>,
        metrics: &Metrics,
        limit: Duration,
    ) -> Result<TlsStream<IO>, AcceptError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut deadline = tokio::time::Instant::now() + limit;
        let start =
            tokio::time::timeout_at(deadline, LazyConfigAcceptor::new(Acceptor::default(), io))
                .await
                .map_err(|_| AcceptError::Timeout)??;
        let hello = start.client_hello();
        let name = hello
            .server_name()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase());
        let validation = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if validation && self.alpn_challenges {
            let Some(certified) = self.alpn_answer(name.as_deref()).await else {
                return Err(AcceptError::Refused(name.unwrap_or_default()));
            };
            let mut challenge = ServerConfig::builder_with_provider(self.provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| AcceptError::Io(std::io::Error::other(e)))?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(OneCert(certified)));
            challenge.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
            let mut stream =
                tokio::time::timeout_at(deadline, start.into_stream(Arc::new(challenge)))
                    .await
                    .map_err(|_| AcceptError::Timeout)??;
            let _ = tokio::time::timeout_at(deadline, stream.shutdown()).await;
            return Err(AcceptError::ChallengeAnswered);
        }
        if self.certs.lookup(name.as_deref()).is_none() {
            let ordering = tokio::time::Instant::now();
            self.on_demand(name.as_deref(), metrics).await?;
            deadline += ordering.elapsed();
        }
        let stream = tokio::time::timeout_at(deadline, start.into_stream(config.clone()))
            .await
            .map_err(|_| AcceptError::Timeout)
            .and_then(|handshake| handshake.map_err(AcceptError::Io));
        metrics.tls_handshake(stream.is_ok());
        stream
    }

    /// A certificate for a name that has none: policy first, then the shared order.
    async fn on_demand(&self, name: Option<&str>, metrics: &Metrics) -> Result<(), AcceptError> {
        let Some(name) = name else {
            self.refuse("", "no server name and no default certificate", metrics);
            return Err(AcceptError::Refused(String::new()));
        };
        let decision = match (&self.issuer, normalise_allow_entry(name)) {
            (Some(_), Ok(n)) if !n.starts_with('*') => self.policy.decide(&n).await,
            _ => Decision::Denied,
        };
        match decision {
            Decision::Allowed => {}
            Decision::Denied => {
                self.refuse(name, "not allowed", metrics);
                return Err(AcceptError::Refused(name.to_string()));
            }
            Decision::AskFailed => {
                self.refuse(name, "ask endpoint unavailable", metrics);
                return Err(AcceptError::Refused(name.to_string()));
            }
        }
        let Some(issuer) = &self.issuer else {
            return Err(AcceptError::Refused(name.to_string()));
        };
        issuer.obtain(name).await?;
        Ok(())
    }

    /// Counts a refused handshake; logs at most one line per interval with the count.
    fn refuse(&self, name: &str, why: &str, metrics: &Metrics) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        metrics.tls_handshake_refused();
        let count = self.refused_logged_count.fetch_add(1, Ordering::Relaxed) + 1;
        let now = u64::try_from(unix_now()).unwrap_or(0);
        let last = self.refused_logged_at.load(Ordering::Relaxed);
        if now >= last + u64::try_from(REFUSAL_LOG_EVERY_SECS).unwrap_or(10)
            && self
                .refused_logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.refused_logged_count.store(0, Ordering::Relaxed);
            tracing::warn!(server_name = %name, reason = why, refused_since_last_line = count, "TLS handshake refused: no certificate for this name");
        }
    }

    /// The HTTP-01 answer for a request path, if an order waits for its token: an order
    /// of this node, or in a fleet, of any node.
    pub async fn http01_answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(HTTP01_PREFIX)?;
        if let Some(answer) = self.challenges.http01(token) {
            return Some(answer);
        }
        match self.fleet_orders.get() {
            Some(fleet) => fleet.http01(token).await,
            None => None,
        }
    }

    /// The TLS-ALPN-01 certificate for `name`: of this node's order, or in a fleet, built
    /// from the digest another node published.
    async fn alpn_answer(&self, name: Option<&str>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = name?;
        if let Some(certified) = self.challenges.tls_alpn01(name) {
            return Some(certified);
        }
        let digest = self.fleet_orders.get()?.tls_alpn01(name).await?;
        match acme::alpn_certificate(name, &digest, &self.provider) {
            Ok(certified) => Some(certified),
            Err(e) => {
                tracing::warn!(domain = %name, error = %e, "cannot answer the fleet's TLS-ALPN-01 challenge");
                None
            }
        }
    }

    /// Fleet mode: one node of the fleet orders each name (an etcd lease lock per name),
    /// HTTP-01 tokens are published to every node, and every node answers them.
    pub fn join_fleet_orders(&self, cluster: crate::cluster::Cluster, shutdown: Shutdown) {
        let fleet = fleet_orders::FleetOrders::start(cluster, shutdown);
        if let Some(issuer) = &self.issuer {
            issuer.join_fleet_orders(fleet.clone());
        }
        let _ = self.fleet_orders.set(fleet);
    }

    /// Handshakes refused because the name was not allowed (or had no SNI).
    pub fn refused_handshakes(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Orders created on the ACME server since start.
    pub fn orders_created(&self) -> u64 {
        self.issuer
            .as_ref()
            .map_or(0, |i| i.stats.orders.load(Ordering::Relaxed))
    }

    /// Every certificate the listeners can present.
    pub fn certificates(&self) -> Vec<CertInfo> {
        self.certs.all().iter().map(|e| e.info.clone()).collect()
    }

    /// Stores and serves an uploaded certificate; `name` empty = its first DNS name.
    pub async fn upload(
        &self,
        name: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<CertInfo, TlsError> {
        let entry = CertEntry::from_pem(name, cert_pem, key_pem, CertSource::Api, &self.provider)
            .map_err(|e| match e {
            TlsError::Certificate(reason) => TlsError::Invalid {
                field: "cert_pem".into(),
                reason,
            },
            other => other,
        })?;
        if let Some(existing) = self.certs.stored(&entry.info.name) {
            if existing.info.source == CertSource::File {
                return Err(TlsError::Declarative(format!(
                    "certificate {:?}",
                    entry.info.name
                )));
            }
        }
        self.store
            .save_certificate(&entry.info.name, CertSource::Api, cert_pem, key_pem)
            .await?;
        let info = entry.info.clone();
        self.certs.insert(Arc::new(entry));
        tracing::info!(name = %info.name, not_after = info.not_after, "certificate uploaded");
        Ok(info)
    }

    /// Serves a certificate a registered service brought, stored in memory under `name`
    /// (never on disk). With `host`, the certificate must cover it. Errors name the
    /// announce field.
    pub fn add_registered(
        &self,
        name: &str,
        host: Option<&str>,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<CertInfo, TlsError> {
        let invalid = |field: &str, reason: String| TlsError::Invalid {
            field: field.into(),
            reason,
        };
        if key_pem.trim().is_empty() {
            return Err(invalid(
                "tls_private_key_pem",
                "required with tls_certificate_pem".into(),
            ));
        }
        if cert_pem.trim().is_empty() {
            return Err(invalid(
                "tls_certificate_pem",
                "required with tls_private_key_pem".into(),
            ));
        }
        let entry = CertEntry::from_pem(
            name,
            cert_pem,
            key_pem,
            CertSource::Registered,
            &self.provider,
        )
        .map_err(|e| match e {
            TlsError::Certificate(reason)
                if reason.starts_with("private key") || reason.starts_with("the key") =>
            {
                invalid("tls_private_key_pem", reason)
            }
            TlsError::Certificate(reason) => invalid("tls_certificate_pem", reason),
            other => other,
        })?;
        if let Some(host) = host {
            if !certs::covers(&entry.info.names, host) {
                return Err(invalid(
                    "tls_certificate_pem",
                    format!(
                        "the certificate is for {:?}, which does not cover host {host:?}",
                        entry.info.names
                    ),
                ));
            }
        }
        let info = entry.info.clone();
        self.certs.insert(Arc::new(entry));
        tracing::info!(name = %info.name, names = ?info.names, "serving a registered service's certificate");
        Ok(info)
    }

    /// Stops serving the registered certificate stored under `name`.
    pub fn remove_registered(&self, name: &str) {
        if let Some(e) = self.certs.stored(name) {
            if e.info.source == CertSource::Registered {
                self.certs.remove(name);
                tracing::info!(name, "removed a registered service's certificate");
            }
        }
    }

    /// Removes an uploaded or issued certificate.
    pub async fn remove(&self, name: &str) -> Result<(), TlsError> {
        let name = name.to_ascii_lowercase();
        match self.certs.stored(&name) {
            None => return Err(TlsError::NotFound(format!("certificate {name:?}"))),
            Some(e) if e.info.source == CertSource::File => {
                return Err(TlsError::Declarative(format!("certificate {name:?}")))
            }
            Some(e) if e.info.source == CertSource::Registered => {
                return Err(TlsError::Registered(format!("certificate {name:?}")))
            }
            Some(_) => {}
        }
        self.store.remove_certificate(&name).await?;
        self.certs.remove(&name);
        Ok(())
    }

    /// Orders a new certificate for an issued one now (backoff cleared, limits apply).
    pub async fn renew(&self, name: &str) -> Result<CertInfo, TlsError> {
        let name = name.to_ascii_lowercase();
        let issuer = self
            .issuer
            .as_ref()
            .ok_or_else(|| TlsError::Acme("no [tls.acme] section is configured".into()))?;
        match self.certs.stored(&name) {
            None => return Err(TlsError::NotFound(format!("certificate {name:?}"))),
            Some(e) if e.info.source != CertSource::Acme => {
                return Err(TlsError::Invalid {
                    field: "name".into(),
                    reason: format!(
                        "certificate {name:?} was not issued by ACME ({}), so it cannot be renewed",
                        e.info.source.as_str()
                    ),
                })
            }
            Some(_) => {}
        }
        issuer.clear_backoff(&name);
        issuer.stats.renewals.fetch_add(1, Ordering::Relaxed);
        let entry = issuer
            .renew_now(&name)
            .await
            .map_err(|e| TlsError::Acme(e.to_string()))?;
        Ok(entry.info.clone())
    }

    /// The allowlist: config entries, then API entries.
    pub fn allowlist(&self) -> (Vec<String>, Vec<String>) {
        (
            self.policy.config_entries().to_vec(),
            self.policy.api_entries(),
        )
    }

    /// Adds an API allowlist entry.
    pub async fn allow(&self, pattern: &str) -> Result<String, TlsError> {
        let pattern = normalise_allow_entry(pattern).map_err(|reason| TlsError::Invalid {
            field: "pattern".into(),
            reason,
        })?;
        if self.policy.config_entries().contains(&pattern) {
            return Err(TlsError::Declarative(format!(
                "allowlist entry {pattern:?}"
            )));
        }
        self.store.add_allow(&pattern).await?;
        self.reload_allowlist().await?;
        Ok(pattern)
    }

    /// Removes an API allowlist entry.
    pub async fn disallow(&self, pattern: &str) -> Result<(), TlsError> {
        let pattern = pattern.trim().to_ascii_lowercase();
        if self.policy.config_entries().contains(&pattern) {
            return Err(TlsError::Declarative(format!(
                "allowlist entry {pattern:?}"
            )));
        }
        if !self.store.remove_allow(&pattern).await? {
            return Err(TlsError::NotFound(format!("allowlist entry {pattern:?}")));
        }
        self.reload_allowlist().await
    }

    async fn reload_allowlist(&self) -> Result<(), TlsError> {
        let entries: BTreeSet<String> = self.store.allowlist().await?.into_iter().collect();
        self.policy.set_api_entries(entries);
        Ok(())
    }

    /// In fleet mode, the fleet's ACME orders of the last hour (`None` on a single host).
    pub async fn fleet_orders_last_hour(&self) -> Option<Result<usize, TlsError>> {
        self.store.fleet_orders_last_hour().await
    }

    /// Counters and ACME state.
    pub fn status(&self) -> TlsStatus {
        TlsStatus {
            on_demand: self.policy.enabled(),
            refused_handshakes: self.refused_handshakes(),
            acme: self.issuer.as_ref().map(|i| AcmeStatus {
                issuer: i.status(),
                orders: i.stats.orders.load(Ordering::Relaxed),
                issued: i.stats.issued.load(Ordering::Relaxed),
                failed: i.stats.failed.load(Ordering::Relaxed),
                renewals: i.stats.renewals.load(Ordering::Relaxed),
            }),
        }
    }
}

/// Renews issued certificates once two thirds of their lifetime have passed.
async fn renewal(tls: Arc<Tls>, every: Duration, shutdown: Shutdown) {
    let Some(issuer) = tls.issuer.clone() else {
        return;
    };
    loop {
        let now = unix_now();
        let due: Vec<String> = tls
            .certs
            .all()
            .iter()
            .filter(|e| e.info.source == CertSource::Acme && e.info.renew_at() <= now)
            .map(|e| e.info.name.clone())
            .collect();
        for name in due {
            // A name no longer allowed keeps its certificate until it expires, but is not renewed.
            if !tls.policy.listed(&name) && tls.policy.decide(&name).await == Decision::Denied {
                continue;
            }
            issuer.stats.renewals.fetch_add(1, Ordering::Relaxed);
            tracing::info!(domain = %name, "renewing certificate");
            if let Err(e) = issuer.obtain(&name).await {
                tracing::warn!(domain = %name, error = %e, "renewal failed; the current certificate stays in use");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.triggered() => return,
        }
    }
}
