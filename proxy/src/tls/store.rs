//! Certificates, the ACME account and the API allowlist in the state database.
//!
//! The tables are created by the state store's migrations. Writes go through the state's
//! single writer ([`StateHandle::write_rows`]): they take the next revision like any
//! batch, and once the writer closes for a handoff this process writes nothing more.
//! Reads use a connection of their own that cannot write (`query_only`).
//!
//! In fleet mode the write methods write to etcd instead ([`Cluster::write_tls`]) and
//! return once this node has applied the write: the fleet's sync task hands every node
//! the fleet's TLS objects, which [`TlsStore::replace_fleet_rows`] stores here. So the
//! tables are this node's copy of the fleet's, served after a restart without etcd.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::certs::{unix_now, CertSource};
use super::TlsError;
use crate::cluster::{Admission, CertOrigin, Cluster, FleetCertificate, Guard, Kind, WriteError};
use crate::state::{ApplyError, StateHandle};

/// A stored certificate row (PEM text; the key never leaves this process, except to the
/// fleet's etcd in fleet mode).
#[derive(Clone)]
pub struct StoredCert {
    /// Stored name.
    pub name: String,
    /// `api` or `acme`.
    pub source: CertSource,
    /// Chain PEM.
    pub cert_pem: String,
    /// Key PEM.
    pub key_pem: String,
}

/// Rows to make the TLS tables the fleet's (see [`TlsStore::replace_fleet_rows`]).
#[derive(Default)]
pub struct FleetRows {
    /// Certificates to write (new or changed).
    pub put: Vec<StoredCert>,
    /// Certificates to delete.
    pub removed: Vec<String>,
    /// The whole allowlist, when it changed.
    pub allow: Option<BTreeSet<String>>,
    /// Every ACME account (directory, credentials), when they changed.
    pub accounts: Option<BTreeMap<String, String>>,
}

impl FleetRows {
    /// Whether nothing is to be written.
    pub fn is_empty(&self) -> bool {
        self.put.is_empty()
            && self.removed.is_empty()
            && self.allow.is_none()
            && self.accounts.is_none()
    }
}

/// Whether the daemon runs in fleet mode, and its cluster once started.
#[derive(Default)]
struct FleetLink {
    in_fleet: bool,
    cluster: OnceLock<Cluster>,
}

/// The TLS tables of the state database (and, in fleet mode, the way to the fleet's).
#[derive(Clone)]
pub struct TlsStore {
    reader: Arc<Mutex<Connection>>,
    state: StateHandle,
    fleet: Arc<FleetLink>,
}

impl std::fmt::Debug for TlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsStore")
    }
}

fn sql(e: rusqlite::Error) -> TlsError {
    TlsError::Store(e.to_string())
}

/// Restricts the database and its WAL files to the owner: they hold private keys.
fn restrict(db: &Path) -> Result<(), TlsError> {
    let mut paths: Vec<PathBuf> = vec![db.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        paths.push(PathBuf::from(p));
    }
    for p in paths {
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(TlsError::Store(format!("{}: {e}", p.display()))),
        }
    }
    Ok(())
}

impl TlsStore {
    /// Opens a reading connection to the database file (already migrated by the state
    /// store, whose writer `state` runs every write).
    /// store, whose writer `state` runs every write). `in_fleet`: writes go to the fleet
    /// (and are refused until [`join_fleet`](Self::join_fleet)).
    pub fn open(db: &Path, state: StateHandle, in_fleet: bool) -> Result<TlsStore, TlsError> {
        let conn = Connection::open(db).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(sql)?;
        conn.pragma_update(None, "query_only", true).map_err(sql)?;
        restrict(db)?;
        Ok(TlsStore {
            reader: Arc::new(Mutex::new(conn)),
            state,
            fleet: Arc::new(FleetLink {
                in_fleet,
                cluster: OnceLock::new(),
            }),
        })
    }

    /// From now on writes go to `cluster`.
    pub fn join_fleet(&self, cluster: Cluster) {
        let _ = self.fleet.cluster.set(cluster);
    }

    /// Whether the daemon runs in fleet mode.
    pub fn in_fleet(&self) -> bool {
        self.fleet.in_fleet
    }

    /// The cluster to write to in fleet mode (`Ok(None)`: single host).
    fn fleet(&self) -> Result<Option<&Cluster>, TlsError> {
        match (self.fleet.in_fleet, self.fleet.cluster.get()) {
            (false, _) => Ok(None),
            (true, Some(cluster)) => Ok(Some(cluster)),
            (true, None) => Err(TlsError::Unavailable(
                "fleet mode is still starting: TLS writes are refused until this node follows the fleet".into(),
            )),
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, TlsError> {
        let conn = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn).map_err(sql)
        })
        .await
        .map_err(|e| TlsError::Store(e.to_string()))?
    }

    /// Runs `f` on the state writer; returns whether it changed a row.
    async fn write(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<bool> + Send + 'static,
    ) -> Result<bool, TlsError> {
        match self.state.write_rows(Box::new(f)).await {
            Ok(revision) => Ok(revision.is_some()),
            Err(ApplyError::Unavailable(reason)) => Err(TlsError::Unavailable(reason)),
            Err(e) => Err(TlsError::Store(e.to_string())),
        }
    }

    /// Writes one TLS object to the fleet; `Ok(false)`: the fleet had it already.
    async fn write_fleet(
        cluster: &Cluster,
        kind: Kind,
        name: &str,
        value: Option<Vec<u8>>,
        guard: Guard,
    ) -> Result<bool, TlsError> {
        cluster
            .write_tls(kind, name, value, guard)
            .await
            .map_err(|e| match e {
                WriteError::Conflict(reason) => TlsError::Conflict(reason),
                WriteError::Unavailable(reason) => TlsError::Unavailable(reason),
                WriteError::Apply(e) => TlsError::Store(e.to_string()),
            })
    }

    /// In fleet mode, how many ACME orders the fleet started in the last hour; `None` on a
    /// single host.
    pub async fn fleet_orders_last_hour(&self) -> Option<Result<usize, TlsError>> {
        let cluster = match self.fleet() {
            Ok(None) => return None,
            Ok(Some(cluster)) => cluster,
            Err(e) => return Some(Err(e)),
        };
        Some(cluster.orders_last_hour().await.map_err(|e| match e {
            WriteError::Unavailable(reason) => TlsError::Unavailable(reason),
            other => TlsError::Store(other.to_string()),
        }))
    }

    /// Every stored certificate.
    pub async fn certificates(&self) -> Result<Vec<StoredCert>, TlsError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT name, source, cert_pem, key_pem FROM tls_certificates ORDER BY name",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (name, source, cert_pem, key_pem) = row?;
                let source = CertSource::parse(&source).unwrap_or(CertSource::Api);
                out.push(StoredCert {
                    name,
                    source,
                    cert_pem,
                    key_pem,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Stores (or replaces) a certificate. This is where an issued certificate goes once
    /// its order completes: in fleet mode it is written to etcd (the newest order wins)
    /// and this returns once this node serves it; every other node serves it as soon as
    /// it applies that etcd revision. An upload in fleet mode is guarded instead: another
    /// node's concurrent change of the same certificate is [`TlsError::Conflict`].
    pub async fn save_certificate(
        &self,
        name: &str,
        source: CertSource,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<(), TlsError> {
        if let Some(cluster) = self.fleet()? {
            let (origin, guard) = match source {
                CertSource::Acme => (CertOrigin::Issued, Guard::Overwrite),
                _ => (CertOrigin::Uploaded, Guard::Unchanged),
            };
            let value = FleetCertificate {
                name: name.to_string(),
                origin,
                cert_pem: cert_pem.to_string(),
                key_pem: key_pem.to_string(),
            }
            .encode();
            Self::write_fleet(cluster, Kind::Certificate, name, Some(value), guard).await?;
            return Ok(());
        }
        let (name, cert_pem, key_pem) =
            (name.to_string(), cert_pem.to_string(), key_pem.to_string());
        self.write(move |c| {
            c.execute(
                "INSERT INTO tls_certificates (name, source, cert_pem, key_pem, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO UPDATE SET source = excluded.source, cert_pem = excluded.cert_pem,
                 key_pem = excluded.key_pem, updated_at = excluded.updated_at",
                params![name, source.as_str(), cert_pem, key_pem, unix_now()],
            )
            .map(|n| n > 0)
        })
        .await
        .map(|_| ())
    }

    /// Removes a certificate; returns whether it existed.
    pub async fn remove_certificate(&self, name: &str) -> Result<bool, TlsError> {
        if let Some(cluster) = self.fleet()? {
            return Self::write_fleet(cluster, Kind::Certificate, name, None, Guard::Unchanged)
                .await;
        }
        let name = name.to_string();
        self.write(move |c| {
            c.execute(
                "DELETE FROM tls_certificates WHERE name = ?1",
                params![name],
            )
            .map(|n| n > 0)
        })
        .await
    }

    /// The ACME account credentials (JSON) for `directory`.
    pub async fn account(&self, directory: &str) -> Result<Option<String>, TlsError> {
        let directory = directory.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT credentials FROM tls_acme_accounts WHERE directory = ?1",
                params![directory],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    /// Every stored ACME account: directory -> credentials.
    pub async fn accounts(&self) -> Result<BTreeMap<String, String>, TlsError> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT directory, credentials FROM tls_acme_accounts")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    /// Stores the ACME account credentials for `directory`. In fleet mode the account is
    /// the fleet's: `Ok(false)` when another node stored one first (use that one, now
    /// stored here too).
    pub async fn save_account(&self, directory: &str, credentials: &str) -> Result<bool, TlsError> {
        if let Some(cluster) = self.fleet()? {
            let value = Some(credentials.as_bytes().to_vec());
            return match Self::write_fleet(
                cluster,
                Kind::Account,
                directory,
                value,
                Guard::Unchanged,
            )
            .await
            {
                Ok(_) => Ok(true),
                Err(TlsError::Conflict(_)) => Ok(false),
                Err(e) => Err(e),
            };
        }
        let (directory, credentials) = (directory.to_string(), credentials.to_string());
        self.write(move |c| {
            c.execute(
                "INSERT INTO tls_acme_accounts (directory, credentials) VALUES (?1, ?2)
                 ON CONFLICT (directory) DO UPDATE SET credentials = excluded.credentials",
                params![directory, credentials],
            )
            .map(|n| n > 0)
        })
        .await
        .map(|_| true)
    }

    /// Counts an ACME order for `name` against the fleet's hourly limits (fleet mode; a
    /// single host counts its own orders in the issuer and is always admitted here).
    pub async fn admit_order(
        &self,
        name: &str,
        per_hour: usize,
        per_name: usize,
    ) -> Result<Admission, TlsError> {
        let Some(cluster) = self.fleet()? else {
            return Ok(Admission::Admitted);
        };
        cluster
            .admit_order(name, per_hour, per_name)
            .await
            .map_err(|e| TlsError::Unavailable(e.to_string()))
    }

    /// The allowlist entries added through the API.
    pub async fn allowlist(&self) -> Result<Vec<String>, TlsError> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT pattern FROM tls_allowlist ORDER BY pattern")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect()
        })
        .await
    }

    /// Adds an allowlist entry; returns whether it was new.
    pub async fn add_allow(&self, pattern: &str) -> Result<bool, TlsError> {
        if let Some(cluster) = self.fleet()? {
            let value = Some(pattern.as_bytes().to_vec());
            return match Self::write_fleet(cluster, Kind::Allow, pattern, value, Guard::Unchanged)
                .await
            {
                // Another node added the same pattern meanwhile: it is there either way.
                Err(TlsError::Conflict(_))
                    if cluster.tls_objects().allow.iter().any(|p| p == pattern) =>
                {
                    Ok(false)
                }
                other => other,
            };
        }
        let pattern = pattern.to_string();
        self.write(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO tls_allowlist (pattern) VALUES (?1)",
                params![pattern],
            )
            .map(|n| n > 0)
        })
        .await
    }

    /// Removes an allowlist entry; returns whether it existed.
    pub async fn remove_allow(&self, pattern: &str) -> Result<bool, TlsError> {
        if let Some(cluster) = self.fleet()? {
            return Self::write_fleet(cluster, Kind::Allow, pattern, None, Guard::Unchanged).await;
        }
        let pattern = pattern.to_string();
        self.write(move |c| {
            c.execute(
                "DELETE FROM tls_allowlist WHERE pattern = ?1",
                params![pattern],
            )
            .map(|n| n > 0)
        })
        .await
    }

    /// Makes the tables hold `rows` (the fleet's TLS objects as this node applied them),
    /// in one transaction on the state writer.
    pub async fn replace_fleet_rows(&self, rows: FleetRows) -> Result<(), TlsError> {
        self.write(move |c| {
            {
                let mut put = c.prepare_cached(
                    "INSERT INTO tls_certificates (name, source, cert_pem, key_pem, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (name) DO UPDATE SET source = excluded.source, cert_pem = excluded.cert_pem,
                     key_pem = excluded.key_pem, updated_at = excluded.updated_at",
                )?;
                for cert in &rows.put {
                    put.execute(params![
                        cert.name,
                        cert.source.as_str(),
                        cert.cert_pem,
                        cert.key_pem,
                        unix_now()
                    ])?;
                }
                let mut delete =
                    c.prepare_cached("DELETE FROM tls_certificates WHERE name = ?1")?;
                for name in &rows.removed {
                    delete.execute(params![name])?;
                }
            }
            if let Some(allow) = &rows.allow {
                c.execute("DELETE FROM tls_allowlist", [])?;
                let mut put = c.prepare_cached("INSERT INTO tls_allowlist (pattern) VALUES (?1)")?;
                for pattern in allow {
                    put.execute(params![pattern])?;
                }
            }
            if let Some(accounts) = &rows.accounts {
                c.execute("DELETE FROM tls_acme_accounts", [])?;
                let mut put = c.prepare_cached(
                    "INSERT INTO tls_acme_accounts (directory, credentials) VALUES (?1, ?2)",
                )?;
                for (directory, credentials) in accounts {
                    put.execute(params![directory, credentials])?;
                }
            }
            Ok(true)
        })
        .await
        .map(|_| ())
    }
}
