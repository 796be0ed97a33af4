//! Certificates, the ACME account and the API allowlist in the state database.
//!
//! The tables are created by the state store's migrations. Writes go through the state's
//! single writer ([`StateHandle::write_rows`]): they take the next revision like any
//! batch, and once the writer closes for a handoff this process writes nothing more.
//! Reads use a connection of their own that cannot write (`query_only`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::certs::{unix_now, CertSource};
use super::TlsError;
use crate::state::{ApplyError, StateHandle};

/// A stored certificate row (PEM text; the key never leaves this process).
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

/// The TLS tables of the state database.
#[derive(Clone)]
pub struct TlsStore {
    reader: Arc<Mutex<Connection>>,
    state: StateHandle,
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
    pub fn open(db: &Path, state: StateHandle) -> Result<TlsStore, TlsError> {
        let conn = Connection::open(db).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(sql)?;
        conn.pragma_update(None, "query_only", true).map_err(sql)?;
        restrict(db)?;
        Ok(TlsStore {
            reader: Arc::new(Mutex::new(conn)),
            state,
        })
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

    /// Stores (or replaces) a certificate.
    pub async fn save_certificate(
        &self,
        name: &str,
        source: CertSource,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<(), TlsError> {
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

    /// Stores the ACME account credentials for `directory`.
    pub async fn save_account(&self, directory: &str, credentials: &str) -> Result<(), TlsError> {
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
        .map(|_| ())
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
}
