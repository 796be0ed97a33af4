//! SQLite persistence of the desired state. Only the writer thread holds a [`Store`].
//!
//! Each object is one row `(kind, name, source, body)` with the object as JSON, so adding a
//! field to a model type needs no migration; schema changes go through `user_version`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use super::{ApplyError, Pool, Protocol, Route, State, TcpRoute, Touched};

/// The store could not be opened, read or written.
#[derive(Debug, Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A file or thread operation failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// A stored row could not be decoded.
    #[error("stored {kind} {name:?} is unreadable: {reason}")]
    Corrupt {
        /// Object kind.
        kind: String,
        /// Object name.
        name: String,
        /// Decoder message.
        reason: String,
    },
    /// The config file's objects conflict with the stored state.
    #[error("config file cannot be applied to the stored state: {0}")]
    Reconcile(ApplyError),
    /// The database was written by a newer version.
    #[error("database schema version {0} is newer than this binary understands")]
    TooNew(i64),
}

/// Schema migrations; index + 1 is the `user_version` after running it.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE objects (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        source TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (kind, name)
    ) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('revision', 0);",
    // TLS: certificates (uploaded or issued), ACME accounts, API allowlist entries. Written
    // by `crate::tls::store` through the writer (`StateHandle::write_rows`), not by `Change`
    // batches.
    "CREATE TABLE tls_certificates (
        name TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        cert_pem TEXT NOT NULL,
        key_pem TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE tls_acme_accounts (directory TEXT PRIMARY KEY, credentials TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE tls_allowlist (pattern TEXT PRIMARY KEY) WITHOUT ROWID;",
    // Fleet mode: the fleet's objects as last read from etcd and the etcd revision they are
    // complete up to. Written by `crate::cluster` through the writer (`write_rows`).
    "CREATE TABLE cluster_objects (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        mod_revision INTEGER NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (kind, name)
    ) WITHOUT ROWID;
    CREATE TABLE cluster_meta (key TEXT PRIMARY KEY, value NOT NULL) WITHOUT ROWID;",
];

pub(super) struct Store {
    conn: Connection,
}

const POOL: &str = "pool";
const ROUTE: &str = "route";
const TCP_ROUTE: &str = "tcp_route";

impl Store {
    pub(super) fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew(version));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        Ok(Store { conn })
    }

    pub(super) fn load(
        &mut self,
        listeners: BTreeMap<String, Protocol>,
    ) -> Result<(State, u64), StoreError> {
        let mut state = State::empty(listeners);
        let revision: i64 = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0);
        let mut stmt = self.conn.prepare("SELECT kind, name, body FROM objects")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let kind: String = row.get(0)?;
            let name: String = row.get(1)?;
            let body: String = row.get(2)?;
            match kind.as_str() {
                POOL => {
                    let pool = decode::<Pool>(&kind, &name, &body)?;
                    state.pools.insert_mut(name, Arc::new(pool));
                }
                ROUTE => {
                    let route = decode::<Route>(&kind, &name, &body)?;
                    state.add_route(route);
                }
                TCP_ROUTE => {
                    let route = decode::<TcpRoute>(&kind, &name, &body)?;
                    state.tcp_routes.insert_mut(name, Arc::new(route));
                }
                _ => {
                    return Err(StoreError::Corrupt {
                        kind,
                        name,
                        reason: "unknown kind".into(),
                    });
                }
            }
        }
        Ok((state, u64::try_from(revision).unwrap_or(0)))
    }

    /// Writes the objects `touched` names as they are in `state` (a row per object that
    /// exists, a deletion per one that does not) and `revision`, in one transaction. Costs
    /// what the batch changed, whatever the size of the state.
    pub(super) fn commit(
        &mut self,
        state: &State,
        touched: &Touched,
        revision: u64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut rows = Rows {
                upsert: tx.prepare_cached(
                    "INSERT INTO objects (kind, name, source, body) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (kind, name) DO UPDATE SET source = excluded.source, body = excluded.body",
                )?,
                delete: tx.prepare_cached("DELETE FROM objects WHERE kind = ?1 AND name = ?2")?,
            };
            for name in &touched.pools {
                rows.write(POOL, name, state.pools.get(name), |p| p.source.as_str())?;
            }
            for name in &touched.routes {
                rows.write(ROUTE, name, state.routes.get(name), |r| r.source.as_str())?;
            }
            for name in &touched.tcp_routes {
                rows.write(TCP_ROUTE, name, state.tcp_routes.get(name), |r| {
                    r.source.as_str()
                })?;
            }
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'revision'",
            params![i64::try_from(revision).unwrap_or(i64::MAX)],
        )?;
        tx.commit()?;
        Ok(())
    }
}

/// The prepared statements of one commit.
struct Rows<'c> {
    upsert: rusqlite::CachedStatement<'c>,
    delete: rusqlite::CachedStatement<'c>,
}

impl Rows<'_> {
    /// Stores `object` under `(kind, name)`, or deletes the row when it is `None`.
    fn write<T: Serialize>(
        &mut self,
        kind: &str,
        name: &str,
        object: Option<&Arc<T>>,
        source: impl Fn(&T) -> &'static str,
    ) -> Result<(), StoreError> {
        match object {
            Some(obj) => {
                let body =
                    serde_json::to_string(obj.as_ref()).map_err(|e| StoreError::Corrupt {
                        kind: kind.into(),
                        name: name.to_string(),
                        reason: e.to_string(),
                    })?;
                self.upsert
                    .execute(params![kind, name, source(obj), body])?;
            }
            None => {
                self.delete.execute(params![kind, name])?;
            }
        }
        Ok(())
    }
}

impl Store {
    /// Runs `write` on the rows kept beside the objects (TLS tables) in one transaction;
    /// when it reports a change, the revision moves on in the same transaction. Returns
    /// the revision after it.
    pub(super) fn commit_rows(
        &mut self,
        write: super::RowWrite,
        revision: u64,
    ) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        if !write(&tx)? {
            return Ok(revision);
        }
        let next = revision + 1;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'revision'",
            params![i64::try_from(next).unwrap_or(i64::MAX)],
        )?;
        tx.commit()?;
        Ok(next)
    }
}

fn decode<T: DeserializeOwned>(kind: &str, name: &str, body: &str) -> Result<T, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt {
        kind: kind.into(),
        name: name.into(),
        reason: e.to_string(),
    })
}
