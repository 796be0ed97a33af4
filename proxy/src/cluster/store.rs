//! The fleet view in the state database: the objects as last read from etcd (with their
//! mod revisions), the etcd revision they are complete up to, and when this node last knew
//! it was in sync. A node that restarts while etcd is down serves from here, and resumes
//! its watch from the stored revision when etcd is back.
//!
//! The tables are created by the state store's migrations; writes go through the state's
//! single writer, reads use a connection of their own that cannot write.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::view::{Delta, Entry, Kind, Object, View};
use crate::state::{ApplyError, StateHandle};

/// What was stored: the view and when it was last known to be in sync (Unix seconds).
pub struct Stored {
    /// The view.
    pub view: View,
    /// Last moment this node knew it had everything up to `view.revision`.
    pub synced_at: u64,
}

/// The cluster tables of the state database.
#[derive(Clone)]
pub struct ViewStore {
    reader: Arc<Mutex<Connection>>,
    state: StateHandle,
    prefix: String,
}

impl ViewStore {
    /// Opens a reading connection to `db` (migrated by the state store); `prefix` is the
    /// fleet's, so a view stored for another fleet is never resumed.
    pub fn open(db: &Path, state: StateHandle, prefix: &str) -> rusqlite::Result<ViewStore> {
        let conn = Connection::open(db)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "query_only", true)?;
        Ok(ViewStore {
            reader: Arc::new(Mutex::new(conn)),
            state,
            prefix: prefix.to_string(),
        })
    }

    /// The stored view of this fleet, if any.
    pub async fn load(&self) -> Result<Option<Stored>, String> {
        let reader = self.reader.clone();
        let prefix = self.prefix.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
            load(&conn, &prefix)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// Stores what `delta` changed and the view's revision.
    pub async fn save(&self, view: &View, delta: Delta, synced_at: u64) -> Result<(), ApplyError> {
        let (revision, marker, writes, prefix) =
            (view.revision, view.marker, view.writes, self.prefix.clone());
        self.state
            .write_rows(Box::new(move |tx| {
                {
                    let mut put = tx.prepare_cached(
                        "INSERT INTO cluster_objects (kind, name, mod_revision, value)
                         VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (kind, name) DO UPDATE
                         SET mod_revision = excluded.mod_revision, value = excluded.value",
                    )?;
                    for ((kind, name), rev, value) in &delta.put {
                        put.execute(params![kind.as_str(), name, rev, value])?;
                    }
                    let mut delete = tx.prepare_cached(
                        "DELETE FROM cluster_objects WHERE kind = ?1 AND name = ?2",
                    )?;
                    for (kind, name) in &delta.deleted {
                        delete.execute(params![kind.as_str(), name])?;
                    }
                }
                write_meta(tx, &prefix, [revision, marker, writes], synced_at)?;
                Ok(true)
            }))
            .await
            .map(|_| ())
    }

    /// Replaces the stored view with `view` (after a full read).
    pub async fn replace(&self, view: &View, synced_at: u64) -> Result<(), ApplyError> {
        let view = view.clone();
        let prefix = self.prefix.clone();
        self.state
            .write_rows(Box::new(move |tx| {
                tx.execute("DELETE FROM cluster_objects", [])?;
                {
                    let mut put = tx.prepare_cached(
                        "INSERT INTO cluster_objects (kind, name, mod_revision, value)
                         VALUES (?1, ?2, ?3, ?4)",
                    )?;
                    for ((kind, name), entry) in view.objects.iter() {
                        put.execute(params![
                            kind.as_str(),
                            name,
                            entry.mod_revision,
                            entry.value
                        ])?;
                    }
                }
                write_meta(
                    tx,
                    &prefix,
                    [view.revision, view.marker, view.writes],
                    synced_at,
                )?;
                Ok(true)
            }))
            .await
            .map(|_| ())
    }

    /// Records that the node was in sync at `synced_at` (nothing else changed).
    pub async fn touch(&self, view: &View, synced_at: u64) -> Result<(), ApplyError> {
        self.save(view, Delta::default(), synced_at).await
    }
}

fn write_meta(
    tx: &rusqlite::Transaction<'_>,
    prefix: &str,
    [revision, marker, writes]: [i64; 3],
    synced_at: u64,
) -> rusqlite::Result<()> {
    let mut meta = tx.prepare_cached(
        "INSERT INTO cluster_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?;
    meta.execute(params!["prefix", prefix])?;
    meta.execute(params!["revision", revision])?;
    meta.execute(params!["marker", marker])?;
    meta.execute(params!["writes", writes])?;
    meta.execute(params![
        "synced_at",
        i64::try_from(synced_at).unwrap_or(i64::MAX)
    ])?;
    Ok(())
}

fn load(conn: &Connection, prefix: &str) -> rusqlite::Result<Option<Stored>> {
    let meta = |key: &str| -> rusqlite::Result<Option<rusqlite::types::Value>> {
        conn.query_row(
            "SELECT value FROM cluster_meta WHERE key = ?1",
            params![key],
            |r| r.get(0),
        )
        .optional()
    };
    let int = |key: &str| -> rusqlite::Result<i64> {
        Ok(match meta(key)? {
            Some(rusqlite::types::Value::Integer(i)) => i,
            _ => 0,
        })
    };
    match meta("prefix")? {
        Some(rusqlite::types::Value::Text(p)) if p == prefix => {}
        _ => return Ok(None),
    }
    let mut view = View::default();
    view.revision = int("revision")?;
    view.marker = int("marker")?;
    view.writes = int("writes")?;
    let mut stmt = conn.prepare("SELECT kind, name, mod_revision, value FROM cluster_objects")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let kind: String = row.get(0)?;
        let name: String = row.get(1)?;
        let Some(kind) = Kind::parse(&kind) else {
            continue;
        };
        let mod_revision: i64 = row.get(2)?;
        let value: Vec<u8> = row.get(3)?;
        let object = Object::decode(kind, &name, &value);
        view.insert(
            (kind, name),
            Entry {
                mod_revision,
                value,
                object,
            },
        );
    }
    let synced_at = u64::try_from(int("synced_at")?).unwrap_or(0);
    Ok(Some(Stored { view, synced_at }))
}
