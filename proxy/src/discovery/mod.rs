//! Discovery sources: each feeds the upstreams of one pool from etcd, DNS, a command or a
//! watched file, without touching the stored configuration.
//!
//! # Layout
//!
//! - `etcd`, `dns`, `exec`, `file`: one task per source; each calls [`Feed::publish`] with
//!   the full current set, or [`Feed::fail`] with the reason it could not get one. A failure
//!   never empties a pool: the last good set stays.
//! - [`Discovery`]: starts the tasks and reports their status (`DiscoveryService`).

mod dns;
mod etcd;
mod exec;
mod file;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::shutdown::Shutdown;
use crate::state::{check_upstream_address, OnChange, Origin, SourceKind, StateHandle, Upstream};

/// Where a pool's upstreams are discovered (`[pools.discovery]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// Keys `<prefix>/<host:port>` in etcd; values optionally `{"weight": N}`.
    Etcd {
        /// Client URLs, e.g. `http://127.0.0.1:2379`.
        endpoints: Vec<String>,
        /// Key prefix without the trailing slash.
        prefix: String,
    },
    /// A DNS name: A/AAAA records with `port`, or SRV records when `port` is `None`.
    Dns {
        /// The name to resolve.
        name: String,
        /// Port for A/AAAA answers.
        port: Option<u16>,
        /// Longest time between lookups (a shorter record TTL wins).
        interval: Duration,
        /// Name server to ask instead of the system's (`IP:PORT`).
        resolver: Option<std::net::SocketAddr>,
    },
    /// A command printing `[{"address": "host:port", "weight": 1}, ...]`.
    Exec {
        /// Program and arguments (no shell).
        command: Vec<String>,
        /// Time between runs.
        interval: Duration,
        /// Longest time one run may take.
        timeout: Duration,
    },
    /// A JSON file in the same format as `exec` output, reloaded when it changes.
    File {
        /// File path.
        path: PathBuf,
    },
}

impl SourceSpec {
    /// The kind of source.
    pub fn kind(&self) -> SourceKind {
        match self {
            SourceSpec::Etcd { .. } => SourceKind::Etcd,
            SourceSpec::Dns { .. } => SourceKind::Dns,
            SourceSpec::Exec { .. } => SourceKind::Exec,
            SourceSpec::File { .. } => SourceKind::File,
        }
    }

    /// What it watches, for listings: endpoints and prefix, name, command or path.
    pub fn target(&self) -> String {
        match self {
            SourceSpec::Etcd { endpoints, prefix } => format!("{} {prefix}", endpoints.join(",")),
            SourceSpec::Dns {
                name,
                port: Some(port),
                ..
            } => format!("{name}:{port}"),
            SourceSpec::Dns {
                name, port: None, ..
            } => format!("{name} (SRV)"),
            SourceSpec::Exec { command, .. } => command.join(" "),
            SourceSpec::File { path } => path.display().to_string(),
        }
    }
}

/// One pool's discovery settings from the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoverySpec {
    /// The pool it feeds.
    pub pool: String,
    /// Where the upstreams come from.
    pub source: SourceSpec,
    /// What happens to connections to upstreams that disappear.
    pub on_change: OnChange,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    address: String,
    #[serde(default)]
    weight: Option<u32>,
}

/// Parses the member list format shared by `exec` and `file`:
/// `[{"address": "host:port", "weight": 1}, ...]`. The whole list is refused if any entry is bad.
pub fn parse_members(text: &str) -> Result<Vec<Upstream>, String> {
    let raw: Vec<RawMember> = serde_json::from_str(text)
        .map_err(|e| format!("not a JSON list of {{\"address\", \"weight\"}}: {e}"))?;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, m) in raw.into_iter().enumerate() {
        check_member_address(&m.address).map_err(|r| format!("[{i}].address: {r}"))?;
        let weight = m.weight.unwrap_or(1);
        if weight == 0 {
            return Err(format!("[{i}].weight: must be at least 1"));
        }
        if !seen.insert(m.address.clone()) {
            return Err(format!("[{i}].address: {:?} is listed twice", m.address));
        }
        out.push(Upstream {
            weight,
            ..Upstream::new(m.address)
        });
    }
    Ok(out)
}

/// A discovered or registered address: `host:port` or `unix:/absolute/path`.
pub fn check_member_address(address: &str) -> Result<(), String> {
    match address.strip_prefix("unix:") {
        Some(path) if path.starts_with('/') && !path.contains('\0') => Ok(()),
        Some(_) => Err(format!(
            "{address:?}: a unix socket needs an absolute path (unix:/path)"
        )),
        None => check_upstream_address(address),
    }
}

/// A source's health as `DiscoveryService` reports it.
#[derive(Debug, Clone)]
pub struct SourceReport {
    /// The pool it feeds.
    pub pool: String,
    /// Its kind.
    pub kind: SourceKind,
    /// What it watches.
    pub target: String,
    /// Upstreams it currently contributes.
    pub members: usize,
    /// When it last got a good set.
    pub last_success: Option<SystemTime>,
    /// When it last failed, and why.
    pub last_error: Option<(SystemTime, String)>,
    /// Membership changes it published.
    pub updates: u64,
}

impl SourceReport {
    /// Whether its latest attempt failed (a failure after the last success, or no
    /// success yet after a failure).
    pub fn is_failing(&self) -> bool {
        match (&self.last_error, self.last_success) {
            (None, _) => false,
            (Some((failed, _)), Some(succeeded)) => *failed > succeeded,
            (Some(_), None) => true,
        }
    }
}

/// One running source's link to the state: publishes sets, records outcomes.
#[derive(Clone)]
pub struct Feed {
    pool: String,
    kind: SourceKind,
    state: StateHandle,
    report: Arc<Mutex<SourceReport>>,
    last_set: Arc<Mutex<Option<Vec<Upstream>>>>,
}

impl Feed {
    /// Publishes the complete current set. An unchanged set only records the success.
    pub async fn publish(&self, mut upstreams: Vec<Upstream>) {
        upstreams.sort_by(|a, b| a.address.cmp(&b.address));
        let changed = {
            let mut last = self.last_set.lock().unwrap_or_else(|e| e.into_inner());
            let changed = last.as_ref() != Some(&upstreams);
            *last = Some(upstreams.clone());
            changed
        };
        let count = upstreams.len();
        if changed {
            tracing::info!(pool = %self.pool, source = self.kind.as_str(), members = count, "discovered membership changed");
            self.state
                .set_members(&self.pool, Origin::Discovered(self.kind), upstreams)
                .await;
        }
        let mut report = self.report.lock().unwrap_or_else(|e| e.into_inner());
        report.members = count;
        report.last_success = Some(SystemTime::now());
        if changed {
            report.updates += 1;
        }
    }

    /// Records that no set could be had; the last good set stays in the pool.
    pub fn fail(&self, reason: impl Into<String>) {
        let reason = reason.into();
        let mut report = self.report.lock().unwrap_or_else(|e| e.into_inner());
        // Log a reason once, not every retry.
        if report.last_error.as_ref().map(|(_, r)| r) != Some(&reason) {
            tracing::warn!(pool = %self.pool, source = self.kind.as_str(), %reason, "discovery failed; keeping the last known upstreams");
        }
        report.last_error = Some((SystemTime::now(), reason));
    }
}

/// The running discovery sources.
#[derive(Clone, Default)]
pub struct Discovery {
    reports: Vec<Arc<Mutex<SourceReport>>>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("sources", &self.reports.len())
            .finish()
    }
}

impl Discovery {
    /// Sets each pool's on-change policy and starts one task per source.
    pub async fn start(
        specs: &[DiscoverySpec],
        state: &StateHandle,
        shutdown: &Shutdown,
    ) -> Discovery {
        let policies: Vec<(String, OnChange)> = specs
            .iter()
            .map(|s| (s.pool.clone(), s.on_change))
            .collect();
        if !policies.is_empty() {
            state
                .update_membership(move |m| {
                    for (pool, policy) in policies {
                        m.set_on_change(&pool, policy);
                    }
                })
                .await;
        }
        let mut reports = Vec::new();
        for spec in specs {
            let report = Arc::new(Mutex::new(SourceReport {
                pool: spec.pool.clone(),
                kind: spec.source.kind(),
                target: spec.source.target(),
                members: 0,
                last_success: None,
                last_error: None,
                updates: 0,
            }));
            reports.push(report.clone());
            let feed = Feed {
                pool: spec.pool.clone(),
                kind: spec.source.kind(),
                state: state.clone(),
                report,
                last_set: Arc::new(Mutex::new(None)),
            };
            let stop = shutdown.clone();
            let source = spec.source.clone();
            tokio::spawn(async move {
                let run = async {
                    match source {
                        SourceSpec::Etcd { endpoints, prefix } => {
                            etcd::run(endpoints, prefix, feed).await
                        }
                        SourceSpec::Dns {
                            name,
                            port,
                            interval,
                            resolver,
                        } => dns::run(name, port, interval, resolver, feed).await,
                        SourceSpec::Exec {
                            command,
                            interval,
                            timeout,
                        } => exec::run(command, interval, timeout, feed).await,
                        SourceSpec::File { path } => file::run(path, feed).await,
                    }
                };
                tokio::select! {
                    _ = run => {}
                    _ = stop.triggered() => {}
                }
            });
        }
        Discovery { reports }
    }

    /// Every source's current report, in config order.
    pub fn reports(&self) -> Vec<SourceReport> {
        self.reports
            .iter()
            .map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }
}

/// Delay before retry `attempt` (0-based): 0.5 s doubling up to 30 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1u64 << attempt.min(6)))
        .min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_lists_parse_and_bad_ones_are_refused() {
        let ok = parse_members(
            r#"[{"address": "127.0.0.1:80", "weight": 3}, {"address": "unix:/run/a.sock"}]"#,
        )
        .expect("valid");
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].weight, 3);
        assert_eq!(ok[1].weight, 1);
        for bad in [
            "not json",
            r#"{"address": "127.0.0.1:80"}"#,
            r#"[{"address": "nowhere"}]"#,
            r#"[{"address": "127.0.0.1:80", "weight": 0}]"#,
            r#"[{"address": "127.0.0.1:80"}, {"address": "127.0.0.1:80"}]"#,
            r#"[{"address": "unix:relative"}]"#,
            r#"[{"address": "127.0.0.1:80", "extra": 1}]"#,
        ] {
            assert!(parse_members(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_members("[]").expect("empty list is valid"),
            Vec::new()
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(500));
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(20), Duration::from_secs(30));
    }
}
