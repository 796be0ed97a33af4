//! The sync task: follows the fleet's objects in etcd and applies them here.
//!
//! One session = one connection: resume the watch from the applied revision (or read
//! everything when there is none, or it was compacted), then apply each batch of events.
//! Any failure ends the session; the next one starts after a backoff, and meanwhile the
//! node is stale and refuses writes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::view::View;
use super::{unix_now, Inner};
use crate::etcd::{Client, EtcdError, Watch, WatchBatch};
use crate::shutdown::Shutdown;

/// First and longest pause between two sessions.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the local state is checked for a config reload.
const TICK: Duration = Duration::from_secs(2);
/// How often the applied revision (and the moment of being in sync) is written to SQLite
/// while no object changes.
const STORE_EVERY: u64 = 60;

/// Runs sessions until shutdown; stands still between two batches while an upgrade hands
/// over (see [`super::Cluster::pause`]).
pub(super) async fn run(inner: Arc<Inner>, shutdown: Shutdown) {
    let mut backoff = MIN_BACKOFF;
    let mut pause = inner.pause.subscribe();
    loop {
        if !stand_still(&inner, &mut pause, &shutdown).await {
            return;
        }
        let started = std::time::Instant::now();
        let ended = tokio::select! {
            ended = session(&inner, &mut pause) => ended,
            _ = shutdown.triggered() => Ok(()),
        };
        disconnect(&inner, ended.as_ref().err(), *pause.borrow());
        if shutdown.is_triggered() {
            return;
        }
        if started.elapsed() > MAX_BACKOFF || *pause.borrow() {
            backoff = MIN_BACKOFF;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = super::until_paused(&mut pause) => {}
            _ = shutdown.triggered() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// While paused, says so and waits to be resumed; false at shutdown.
async fn stand_still(
    inner: &Inner,
    pause: &mut watch::Receiver<bool>,
    shutdown: &Shutdown,
) -> bool {
    if !*pause.borrow_and_update() {
        return true;
    }
    inner.sync_parked.send_replace(true);
    let resumed = tokio::select! {
        resumed = super::until_resumed(pause) => resumed,
        _ = shutdown.triggered() => false,
    };
    inner.sync_parked.send_replace(false);
    resumed
}

fn disconnect(inner: &Inner, error: Option<&EtcdError>, paused: bool) {
    *inner.client.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let was_connected = inner.link().connected;
    inner.edit_link(|l| {
        l.connected = false;
        if let Some(e) = error {
            l.last_error = e.to_string();
        } else if paused {
            l.last_error = "handing over to a new process".into();
        }
    });
    if paused && error.is_none() {
        tracing::info!("fleet sync paused for the hand-over to a new process");
    } else if was_connected {
        tracing::warn!(
            error = error.map(|e| e.to_string()).unwrap_or_default(),
            "lost etcd: serving the fleet's rules as applied (stale); API writes are refused"
        );
    }
}

async fn session(inner: &Inner, pause: &mut watch::Receiver<bool>) -> Result<(), EtcdError> {
    // Connecting changes nothing here, so a hand-over need not wait for it.
    let mut client = tokio::select! {
        client = Client::connect_with(&inner.endpoints, inner.tls.as_ref()) => client?,
        _ = super::until_paused(pause) => return Ok(()),
    };
    let applied = inner.view.borrow().revision;
    let fleet = inner.keys.fleet();
    let mut watch = if applied > 0 && client.has_revision(&fleet, applied).await? {
        let watch = client.watch_prefix(&fleet, applied + 1).await?;
        inner.resumes.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            revision = applied,
            "fleet sync resumed from the stored revision"
        );
        // The state may lag the stored view (a crash between the two writes).
        inner.reconcile().await;
        watch
    } else {
        if applied > 0 {
            tracing::info!(
                revision = applied,
                "etcd no longer has the stored revision (compacted): reading the fleet again"
            );
        }
        full_sync(inner, &mut client).await?
    };
    *inner.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
    inner.edit_link(|l| {
        l.connected = true;
        l.synced_at = unix_now();
    });
    tracing::info!(
        revision = inner.view.borrow().revision,
        "following the fleet in etcd"
    );
    let mut tick = tokio::time::interval(TICK);
    let mut reconciled_at = inner.state.snapshot().revision;
    let mut stored_at = unix_now();
    loop {
        tokio::select! {
            // Between two batches only: a hand-over never stores half a batch.
            _ = super::until_paused(pause) => return Ok(()),
            batch = watch.next_batch() => {
                match batch {
                    Ok(batch) => {
                        if absorb(inner, batch).await {
                            stored_at = unix_now();
                        }
                    }
                    Err(EtcdError::Compacted { compact_revision }) => {
                        tracing::info!(compact_revision, "the watch was compacted: reading the fleet again");
                        watch = full_sync(inner, &mut client).await?;
                    }
                    Err(e) => return Err(e),
                }
                reconciled_at = inner.state.snapshot().revision;
            }
            _ = tick.tick() => {
                // A config reload may have shadowed or released a fleet object.
                if inner.state.snapshot().revision != reconciled_at {
                    inner.reconcile().await;
                    reconciled_at = inner.state.snapshot().revision;
                }
                // Heartbeats move the revision on without a store write each; it is
                // stored with the next object change or at least this often.
                if unix_now().saturating_sub(stored_at) >= STORE_EVERY {
                    stored_at = unix_now();
                    let view = inner.view.borrow().clone();
                    if let Err(e) = inner.store.touch(&view, stored_at).await {
                        tracing::debug!(error = %e, "could not store the applied revision");
                    }
                    reconciled_at = inner.state.snapshot().revision;
                }
            }
        }
    }
}

/// Reads every object, replaces the view with it, applies it, and watches from there.
async fn full_sync(inner: &Inner, client: &mut Client) -> Result<Watch, EtcdError> {
    let read = client.get_prefix(&inner.keys.fleet(), 0).await?;
    inner.saw_revision(read.revision);
    let view = View::from_read(&inner.keys, read.revision, read.kvs);
    inner.reconcile_with(&view).await;
    let now = unix_now();
    if let Err(e) = inner.store.replace(&view, now).await {
        tracing::warn!(error = %e, "could not store the fleet view");
    }
    inner.full_syncs.fetch_add(1, Ordering::Relaxed);
    let revision = view.revision;
    inner.view.send_replace(Arc::new(view));
    tracing::info!(revision, "read the fleet's objects from etcd");
    client.watch_prefix(&inner.keys.fleet(), revision + 1).await
}

/// Applies one watch response: object changes update the view, which is applied to the
/// state and stored (returns true); other events (node heartbeats) only move the
/// revision on.
async fn absorb(inner: &Inner, batch: WatchBatch) -> bool {
    inner.saw_revision(batch.revision);
    inner.edit_link(|l| l.synced_at = unix_now());
    let old = inner.view.borrow().clone();
    let mut view = old.as_ref().clone();
    let delta = view.apply(&inner.keys, batch.events);
    let changed = !delta.is_empty();
    if changed {
        inner.reconcile_changed(&old, &view, &delta).await;
        if let Err(e) = inner.store.save(&view, delta, unix_now()).await {
            tracing::warn!(error = %e, "could not store the fleet view");
        }
    }
    inner.view.send_replace(Arc::new(view));
    changed
}
