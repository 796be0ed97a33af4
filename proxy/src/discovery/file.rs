//! The `file` source: a JSON member list, reloaded when the file changes.
//!
//! The directory is watched (editors and `mv` replace files, which a watch on the file
//! itself would miss); a slow poll backs the watch up where inotify is unavailable.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{parse_members, Feed};

/// How often the file is checked even without a change notification.
const POLL: Duration = Duration::from_secs(5);

/// Watches `path` forever.
pub(super) async fn run(path: PathBuf, feed: Feed) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watch_path = path.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if event
                .paths
                .iter()
                .any(|p| p.file_name() == watch_path.file_name())
            {
                let _ = tx.try_send(());
            }
        }
    });
    // Keep the watcher alive for as long as this task runs.
    let _watcher = match watcher {
        Ok(mut w) => {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(path = %path.display(), error = %e, "cannot watch the discovery file; polling it");
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no file watcher; polling the discovery file");
            None
        }
    };
    let mut last_seen: Option<(SystemTime, u64)> = None;
    let mut first = true;
    loop {
        let stamp = tokio::fs::metadata(&path)
            .await
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        // A poll tick with an unchanged stamp does nothing; a notification always reloads.
        if first || stamp.is_none() || stamp != last_seen {
            load(&path, &feed).await;
            last_seen = stamp;
        }
        first = false;
        tokio::select! {
            _ = rx.recv() => { last_seen = None; }
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn load(path: &Path, feed: &Feed) {
    match tokio::fs::read_to_string(path).await {
        Ok(text) => match parse_members(&text) {
            Ok(upstreams) => feed.publish(upstreams).await,
            Err(reason) => feed.fail(format!("{}: {reason}", path.display())),
        },
        Err(e) => feed.fail(format!("{}: {e}", path.display())),
    }
}
