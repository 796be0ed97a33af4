//! `proxyctl status | apply | export | import | reload | upgrade | drain`: the daemon as a whole.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use proxy_proto::v1 as pb;
use serde_json::json;

use crate::client::{Clients, Reply};
use crate::document::{read_file, Batch, Document};
use crate::output::{fields, Output, Table};

/// Prints version, pid, uptime, listeners, counts and revision.
pub async fn status(clients: &mut Clients, out: &Output) -> Result<()> {
    let s = clients.admin.status(pb::StatusRequest {}).await.reply()?;
    let counts = s.counts.unwrap_or_default();
    let listeners: Vec<_> = s
        .listeners
        .iter()
        .map(|l| json!({ "name": l.name, "address": l.address, "protocol": l.protocol }))
        .collect();
    let value = json!({
        "version": s.version,
        "pid": s.pid,
        "uptime_seconds": s.uptime_seconds,
        "revision": s.revision,
        "draining": s.draining,
        "listeners": listeners,
        "counts": {
            "pools": counts.pools,
            "upstreams": counts.upstreams,
            "routes": counts.routes,
            "tcp_routes": counts.tcp_routes,
            "api_objects": counts.api_objects,
            "declarative_objects": counts.declarative_objects,
        },
        "cluster": s.cluster.as_ref().map(cluster_json),
    });
    out.show(&value, |_| {
        let uptime = humantime::format_duration(Duration::from_secs(s.uptime_seconds));
        let mut text = fields(&[
            ("version", s.version.clone()),
            ("pid", s.pid.to_string()),
            ("uptime", uptime.to_string()),
            ("revision", s.revision.to_string()),
            ("draining", if s.draining { "yes" } else { "no" }.to_owned()),
            (
                "pools",
                format!("{} ({} upstreams)", counts.pools, counts.upstreams),
            ),
            (
                "routes",
                format!("{} http, {} tcp", counts.routes, counts.tcp_routes),
            ),
            (
                "objects",
                format!(
                    "{} from the API, {} from the config file",
                    counts.api_objects, counts.declarative_objects
                ),
            ),
        ]);
        let mut t = Table::new(&["LISTENER", "ADDRESS", "PROTOCOL"]);
        for l in &s.listeners {
            t.row(vec![l.name.clone(), l.address.clone(), l.protocol.clone()]);
        }
        text.push('\n');
        text.push_str(&t.render());
        if let Some(c) = &s.cluster {
            text.push('\n');
            text.push_str(&cluster_text(c));
        }
        text
    })
}

fn excluded_json(list: &[pb::ClusterObject]) -> Vec<serde_json::Value> {
    list.iter()
        .map(|o| json!({ "kind": o.kind, "name": o.name, "reason": o.reason }))
        .collect()
}

fn cluster_json(c: &pb::ClusterState) -> serde_json::Value {
    json!({
        "node_name": c.node_name,
        "prefix": c.prefix,
        "connected": c.connected,
        "applied_revision": c.applied_revision,
        "stale": c.stale,
        "stale_seconds": c.stale_seconds,
        "last_error": c.last_error,
        "full_syncs": c.full_syncs,
        "resumes": c.resumes,
        "shadowed": excluded_json(&c.shadowed),
        "skipped": excluded_json(&c.skipped),
    })
}

/// The fleet part of `status`: the node, its etcd revision, staleness and the fleet
/// objects this host does not serve as the fleet has them.
fn cluster_text(c: &pb::ClusterState) -> String {
    let sync = if c.stale {
        format!(
            "STALE for {}s: etcd unreachable ({}); serving what was applied, API writes refused",
            c.stale_seconds, c.last_error
        )
    } else {
        "in sync with etcd".to_owned()
    };
    let mut text = fields(&[
        (
            "fleet node",
            format!("{} (prefix {})", c.node_name, c.prefix),
        ),
        ("etcd revision", c.applied_revision.to_string()),
        ("fleet sync", sync),
    ]);
    for (title, list) in [
        ("SHADOWED FLEET OBJECT", &c.shadowed),
        ("SKIPPED FLEET OBJECT", &c.skipped),
    ] {
        if list.is_empty() {
            continue;
        }
        let mut t = Table::new(&["KIND", title, "WHY"]);
        for o in list {
            t.row(vec![o.kind.clone(), o.name.clone(), o.reason.clone()]);
        }
        text.push('\n');
        text.push_str(&t.render());
    }
    text
}

/// Applies the batch in `file` atomically.
pub async fn apply(file: PathBuf, clients: &mut Clients, out: &Output) -> Result<()> {
    let batch: Batch = read_file(&file)?;
    let changes = batch
        .changes
        .iter()
        .enumerate()
        .map(|(i, c)| c.to_proto().with_context(|| format!("changes[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    let reply = clients
        .admin
        .apply(pb::ApplyRequest { changes })
        .await
        .reply()?;
    out.show(
        &json!({ "applied": reply.applied, "revision": reply.revision }),
        |_| {
            format!(
                "applied {} changes (revision {})",
                reply.applied, reply.revision
            )
        },
    )
}

/// Prints the API-owned state (JSON in both output formats, ready for `import`).
pub async fn export(clients: &mut Clients) -> Result<()> {
    let reply = clients.admin.export(pb::ExportRequest {}).await.reply()?;
    let doc = reply
        .state
        .as_ref()
        .map(Document::from_proto)
        .unwrap_or_default();
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// Makes the API-owned state equal to the document in `file`.
pub async fn import(
    file: PathBuf,
    dry_run: bool,
    clients: &mut Clients,
    out: &Output,
) -> Result<()> {
    let doc: Document = read_file(&file)?;
    let reply = clients
        .admin
        .import(pb::ImportRequest {
            state: Some(doc.to_proto()?),
            dry_run,
        })
        .await
        .reply()?;
    let value = json!({
        "created": reply.created,
        "updated": reply.updated,
        "deleted": reply.deleted,
        "revision": reply.revision,
        "dry_run": dry_run,
    });
    out.show(&value, |_| {
        format!(
            "{}{} created, {} updated, {} deleted (revision {})",
            if dry_run { "dry run: " } else { "" },
            reply.created,
            reply.updated,
            reply.deleted,
            reply.revision
        )
    })
}

/// Makes the daemon re-read its config file.
pub async fn reload(clients: &mut Clients, out: &Output) -> Result<()> {
    let reply = clients
        .admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .reply()?;
    let value = json!({
        "created": reply.created,
        "updated": reply.updated,
        "deleted": reply.deleted,
        "revision": reply.revision,
    });
    out.show(&value, |_| {
        format!(
            "config reloaded: {} created, {} updated, {} deleted (revision {})",
            reply.created, reply.updated, reply.deleted, reply.revision
        )
    })
}

/// Starts a zero-downtime upgrade.
pub async fn upgrade(wait: bool, clients: &mut Clients, out: &Output) -> Result<()> {
    let reply = clients
        .admin
        .upgrade(pb::UpgradeRequest { wait })
        .await
        .reply()?;
    out.show(
        &json!({ "new_pid": reply.new_pid, "message": reply.message }),
        |_| format!("{} (new pid {})", reply.message, reply.new_pid),
    )
}

/// Makes the daemon drain and exit.
pub async fn drain(
    timeout: Option<humantime::Duration>,
    clients: &mut Clients,
    out: &Output,
) -> Result<()> {
    let timeout_ms = timeout.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
    let reply = clients
        .admin
        .drain(pb::DrainRequest { timeout_ms })
        .await
        .reply()?;
    out.show(&json!({ "message": reply.message }), |_| {
        reply.message.clone()
    })
}
