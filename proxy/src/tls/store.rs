//! Certificates, the ACME account and the API allowlist in the state database.
//!
//! The tables are created by the state store's migrations; this module opens its own
//! connection to the same file (WAL mode lets it write beside the state writer) because
//! these rows change on handshakes and renewals, not through `Change` batches.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::certs::{unix_now, CertSource};
use super::TlsError;

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
    conn: Arc<Mutex<Connection>>,
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
    /// Opens the database file (already migrated by the state store).
    pub fn open(db: &Path) -> Result<TlsStore, TlsError> {
        let conn = Connection::open(db).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        restrict(db)?;
        Ok(TlsStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, TlsError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn).map_err(sql)
        })
        .await
        .map_err(|e| TlsError::Store(e.to_string()))?
    }

    /// Every stored certificate.
    pub async fn certificates(&self) -> Result<Vec<StoredCert>, TlsError> {
        self.run(|c| {
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
        self.run(move |c| {
            c.execute(
                "INSERT INTO tls_certificates (name, source, cert_pem, key_pem, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO UPDATE SET source = excluded.source, cert_pem = excluded.cert_pem,
                 key_pem = excluded.key_pem, updated_at = excluded.updated_at",
                params![name, source.as_str(), cert_pem, key_pem, unix_now()],
            )
            .map(|_| ())
        })
        .await
    }

    /// Removes a certificate; returns whether it existed.
    pub async fn remove_certificate(&self, name: &str) -> Result<bool, TlsError> {
        let name = name.to_string();
        self.run(move |c| {
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
        self.run(move |c| {
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
        self.run(move |c| {
            c.execute(
                "INSERT INTO tls_acme_accounts (directory, credentials) VALUES (?1, ?2)
                 ON CONFLICT (directory) DO UPDATE SET credentials = excluded.credentials",
                params![directory, credentials],
            )
            .map(|_| ())
        })
        .await
    }

    /// The allowlist entries added through the API.
    pub async fn allowlist(&self) -> Result<Vec<String>, TlsError> {
        self.run(|c| {
            let mut stmt = c.prepare("SELECT pattern FROM tls_allowlist ORDER BY pattern")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect()
        })
        .await
    }

    /// Adds an allowlist entry; returns whether it was new.
    pub async fn add_allow(&self, pattern: &str) -> Result<bool, TlsError> {
        let pattern = pattern.to_string();
        self.run(move |c| {
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
        self.run(move |c| {
            c.execute(
                "DELETE FROM tls_allowlist WHERE pattern = ?1",
                params![pattern],
            )
            .map(|n| n > 0)
        })
        .await
    }
}
