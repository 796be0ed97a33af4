//! `proxyctl routes import FILE.csv`: thousands of path rules in one atomic batch, e.g. the
//! v1 -> v2 content migration that moves paths from an old pool to a new one.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use proxy_proto::v1 as pb;
use proxyctl::csv_routes::{parse, Defaults};
use serde_json::json;

use crate::client::{Clients, Reply};
use crate::output::Output;

/// Arguments of `routes import`.
#[derive(Args)]
pub struct ImportArgs {
    /// CSV file with a header row naming its columns: name, listener, host, path_prefix
    /// (or path), path_exact, pool, strip_prefix, priority. Lines starting with # are skipped.
    pub file: PathBuf,
    /// Listener for rows that name none.
    #[arg(long)]
    pub listener: Option<String>,
    /// Pool for rows that name none.
    #[arg(long)]
    pub pool: Option<String>,
    /// Replace routes whose name already exists (otherwise the batch fails on them).
    #[arg(long)]
    pub update: bool,
}

/// Runs `routes import`.
pub async fn run(args: ImportArgs, clients: &mut Clients, out: &Output) -> Result<()> {
    let shown = args.file.display().to_string();
    let file = std::fs::File::open(&args.file).with_context(|| format!("cannot read {shown}"))?;
    let defaults = Defaults {
        listener: args.listener,
        pool: args.pool,
    };
    let routes = parse(file, &shown, &defaults)?;
    let existing: HashSet<String> = if args.update {
        let reply = clients
            .routes
            .list_routes(pb::ListRoutesRequest::default())
            .await
            .reply()?;
        reply.routes.into_iter().map(|r| r.name).collect()
    } else {
        HashSet::new()
    };
    let (mut created, mut updated) = (0u64, 0u64);
    let mut changes = Vec::with_capacity(routes.len());
    for route in &routes {
        let proto = route.to_proto()?;
        let change = if existing.contains(&route.name) {
            updated += 1;
            pb::change::Change::UpdateRoute(proto)
        } else {
            created += 1;
            pb::change::Change::CreateRoute(proto)
        };
        changes.push(pb::Change {
            change: Some(change),
        });
    }
    let reply = clients
        .admin
        .apply(pb::ApplyRequest { changes })
        .await
        .reply()?;
    let value = json!({ "created": created, "updated": updated, "revision": reply.revision });
    out.show(&value, |_| {
        format!(
            "imported {} routes from {shown}: {created} created, {updated} updated (revision {})",
            routes.len(),
            reply.revision
        )
    })
}
