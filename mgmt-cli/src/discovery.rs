//! `proxyctl discovery list`: the discovery sources and how they are doing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Subcommand;
use proxy_proto::v1 as pb;
use serde::Serialize;

use crate::client::{Clients, Reply};
use crate::output::{Output, Table};

/// Discovery commands.
#[derive(Subcommand)]
pub enum DiscoveryCommand {
    /// Lists the sources with their last success, last error and member count.
    #[command(alias = "ls")]
    List,
}

#[derive(Serialize)]
struct Source {
    pool: String,
    kind: String,
    target: String,
    members: u32,
    last_success_unix_ms: u64,
    last_error_unix_ms: u64,
    last_error: String,
    updates: u64,
}

/// "12s ago", or "never" for 0.
fn ago(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".into();
    }
    let then = UNIX_EPOCH + Duration::from_millis(unix_ms);
    match SystemTime::now().duration_since(then) {
        Ok(d) => format!("{}s ago", d.as_secs()),
        Err(_) => "just now".into(),
    }
}

/// Runs a `discovery` command.
pub async fn run(cmd: DiscoveryCommand, clients: &mut Clients, out: &Output) -> Result<()> {
    match cmd {
        DiscoveryCommand::List => {
            let reply = clients
                .discovery
                .list_sources(pb::ListSourcesRequest {})
                .await
                .reply()?;
            let sources: Vec<Source> = reply
                .sources
                .into_iter()
                .map(|s| Source {
                    pool: s.pool,
                    kind: s.kind,
                    target: s.target,
                    members: s.members,
                    last_success_unix_ms: s.last_success_unix_ms,
                    last_error_unix_ms: s.last_error_unix_ms,
                    last_error: s.last_error,
                    updates: s.updates,
                })
                .collect();
            out.show(&sources, |sources| {
                let mut t = Table::new(&[
                    "POOL",
                    "KIND",
                    "TARGET",
                    "MEMBERS",
                    "LAST SUCCESS",
                    "LAST ERROR",
                ]);
                for s in sources {
                    let error = if s.last_error.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{} ({})", s.last_error, ago(s.last_error_unix_ms))
                    };
                    t.row(vec![
                        s.pool.clone(),
                        s.kind.clone(),
                        s.target.clone(),
                        s.members.to_string(),
                        ago(s.last_success_unix_ms),
                        error,
                    ]);
                }
                t.render()
            })
        }
    }
}
