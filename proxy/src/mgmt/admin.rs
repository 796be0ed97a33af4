//! `proxy.v1.AdminService`: status, atomic batches, export/import, config reload.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use proxy_proto::v1 as pb;
use proxy_proto::v1::admin_service_server::AdminService;
use tonic::{Request, Response, Status};

use super::{convert, error, ListenerInfo, MgmtTlsConfig, Writes};
use crate::config::Config;
use crate::state::{Change, Source, State};
use crate::upgrade::Upgrader;
use crate::Shutdown;

/// The AdminService implementation: what it reads and changes.
#[derive(Clone)]
pub struct AdminApi {
    /// Batches, imports and reloads go through it; status and export read its state.
    pub writes: Writes,
    /// The daemon's stop signal: Status reports draining, Drain fires it.
    pub shutdown: Shutdown,
    /// When the daemon started.
    pub started: Instant,
    /// The listening sockets.
    pub listeners: Vec<ListenerInfo>,
    /// The config file, re-read by ReloadConfig.
    pub config_path: Option<PathBuf>,
    /// Starts zero-downtime upgrades (`None` where the daemon cannot hand over).
    pub upgrader: Option<Arc<Upgrader>>,
    /// TLS of the TCP management listener, renewed by ReloadConfig (`None`: no TLS).
    pub mgmt_tls: Option<Arc<MgmtTlsConfig>>,
}

impl AdminApi {
    /// Whether `config` names the same listeners (name, protocol, address) as the running daemon.
    fn same_listeners(&self, config: &Config) -> bool {
        let mut running: Vec<_> = self
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l.protocol, l.configured))
            .collect();
        let mut wanted: Vec<_> = config
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l.protocol, l.address))
            .collect();
        running.sort_unstable_by_key(|l| l.0);
        wanted.sort_unstable_by_key(|l| l.0);
        running == wanted
    }
}

/// How many objects a list of changes creates, replaces and deletes.
#[derive(Default)]
struct Tally {
    created: u64,
    updated: u64,
    deleted: u64,
}

impl Tally {
    fn of(changes: &[Change]) -> Tally {
        let mut t = Tally::default();
        for c in changes {
            match c {
                Change::CreatePool(_) | Change::CreateRoute(_) | Change::CreateTcpRoute(_) => {
                    t.created += 1
                }
                Change::DeletePool { .. }
                | Change::DeleteRoute { .. }
                | Change::DeleteTcpRoute { .. } => t.deleted += 1,
                _ => t.updated += 1,
            }
        }
        t
    }
}

/// Objects in `state` created through the API.
fn api_object_count(state: &State) -> usize {
    let doc = state.document(Source::Api);
    doc.pools.len() + doc.routes.len() + doc.tcp_routes.len()
}

/// Runs CPU- or file-bound work on a blocking thread, off the runtime's workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Status::internal(format!("the work was lost: {e}")))
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let snap = self.writes.state().snapshot();
        let state = &snap.state;
        let pools = state.pools().count() as u64;
        let routes = state.routes().count() as u64;
        let tcp_routes = state.tcp_routes().count() as u64;
        let api_objects = api_object_count(state) as u64;
        let counts = pb::ObjectCounts {
            pools,
            upstreams: state.pools().map(|p| p.upstreams.len() as u64).sum(),
            routes,
            tcp_routes,
            api_objects,
            declarative_objects: (pools + routes + tcp_routes).saturating_sub(api_objects),
        };
        let listeners = self
            .listeners
            .iter()
            .map(|l| pb::Listener {
                name: l.name.clone(),
                address: l.bound.to_string(),
                protocol: l.protocol.as_str().to_owned(),
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            listeners,
            counts: Some(counts),
            revision: snap.revision,
            draining: self.shutdown.is_triggered(),
            cluster: self.writes.cluster().map(super::cluster::state),
        }))
    }

    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let changes = request
            .into_inner()
            .changes
            .into_iter()
            .enumerate()
            .map(|(i, c)| convert::change(c, &format!("changes[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let applied = changes.len() as u64;
        let revision = self.writes.apply(changes).await?;
        Ok(Response::new(pb::ApplyResponse { revision, applied }))
    }

    async fn export(
        &self,
        _request: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ExportResponse>, Status> {
        let snap = self.writes.state().snapshot();
        let doc = snap.state.document(Source::Api);
        let state = pb::StateDocument {
            pools: doc
                .pools
                .iter()
                .map(|p| convert::pool_proto(p, None))
                .collect(),
            routes: doc.routes.iter().map(convert::route_proto).collect(),
            tcp_routes: doc
                .tcp_routes
                .iter()
                .map(convert::tcp_route_proto)
                .collect(),
        };
        Ok(Response::new(pb::ExportResponse {
            state: Some(state),
            revision: snap.revision,
        }))
    }

    async fn import(
        &self,
        request: Request<pb::ImportRequest>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        let req = request.into_inner();
        let target = convert::document(convert::required(req.state, "state")?)?;
        let snap = self.writes.state().snapshot();
        let dry_run = req.dry_run;
        // Diffing (and, for a dry run, validating on a copy) a whole document is long CPU
        // work that may read TLS files: a blocking thread does it, not a runtime worker.
        let (changes, checked) = blocking(move || {
            let changes = snap.state.changes_to(&target, Source::Api);
            let checked = if dry_run {
                // Validate exactly as apply would (files, then a copy of the state).
                let mut next = snap.state.clone();
                Some(
                    crate::upstream::tls::check_files(&changes)
                        .map_err(|(_, e)| e)
                        .and_then(|()| next.apply_batch(&changes, Source::Api))
                        .map(|()| snap.revision),
                )
            } else {
                None
            };
            (changes, checked)
        })
        .await?;
        let tally = Tally::of(&changes);
        let revision = match checked {
            Some(checked) => checked.map_err(error::status)?,
            None => self.writes.apply(changes).await?,
        };
        Ok(Response::new(pb::ImportResponse {
            revision,
            created: tally.created,
            updated: tally.updated,
            deleted: tally.deleted,
        }))
    }

    async fn reload_config(
        &self,
        _request: Request<pb::ReloadConfigRequest>,
    ) -> Result<Response<pb::ReloadConfigResponse>, Status> {
        let Some(path) = &self.config_path else {
            return Err(Status::failed_precondition(
                "proxyd runs its embedded default config; there is no file to re-read",
            ));
        };
        let file = path.clone();
        let config = blocking(move || Config::load(&file))
            .await?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        if !self.same_listeners(&config) {
            return Err(Status::failed_precondition(format!(
                "{}: the listeners changed; listener changes take effect with an upgrade or a restart",
                path.display()
            )));
        }
        // The management listener's certificate files are read again; they are installed
        // only once the rest of the file has been applied, so a refused reload changes
        // nothing. Turning TLS on or off, like moving the listener, needs an upgrade.
        let mgmt_tls = match (&self.mgmt_tls, &config.server.mgmt_tls) {
            (Some(running), Some(wanted)) => {
                let wanted = wanted.clone();
                let next = blocking(move || super::tcp::server_config(&wanted))
                    .await?
                    .map_err(|e| Status::failed_precondition(format!("{}: {e}", path.display())))?;
                Some((running.clone(), next))
            }
            (running, wanted) => {
                if running.is_some() != wanted.is_some() {
                    tracing::warn!(
                        file = %path.display(),
                        "server.mgmt_tls was added or removed; that takes effect with an upgrade or a restart"
                    );
                }
                None
            }
        };
        let snap = self.writes.state().snapshot();
        let file = path.clone();
        // Reconciling validates and diffs every object of the file: a blocking thread does it.
        let changes = blocking(move || {
            let mut target = State::empty(snap.state.listeners().clone());
            target
                .apply_batch(&config.declarative, Source::Declarative)
                .map_err(|e| Status::failed_precondition(format!("{}: {e}", file.display())))?;
            Ok::<_, Status>(
                snap.state
                    .changes_to(&target.document(Source::Declarative), Source::Declarative),
            )
        })
        .await??;
        let tally = Tally::of(&changes);
        let revision = self.writes.apply_as(changes, Source::Declarative).await?;
        if let Some((running, next)) = mgmt_tls {
            running.install(next);
            tracing::info!("management listener TLS files re-read");
        }
        tracing::info!(
            file = %path.display(),
            revision,
            created = tally.created,
            updated = tally.updated,
            deleted = tally.deleted,
            "config file reloaded"
        );
        Ok(Response::new(pb::ReloadConfigResponse {
            revision,
            created: tally.created,
            updated: tally.updated,
            deleted: tally.deleted,
        }))
    }

    async fn upgrade(
        &self,
        request: Request<pb::UpgradeRequest>,
    ) -> Result<Response<pb::UpgradeResponse>, Status> {
        let request = request.into_inner();
        let Some(upgrader) = self.upgrader.clone() else {
            return Err(Status::unimplemented(
                "this daemon was started without upgrade support",
            ));
        };
        if !request.wait {
            tokio::spawn(async move {
                let _ = upgrader.upgrade(None).await;
            });
            return Ok(Response::new(pb::UpgradeResponse {
                new_pid: 0,
                message: "upgrade started; see the log for its outcome".into(),
            }));
        }
        // The upgrade runs in its own task: if this call is cancelled, it still completes
        // (or rolls back) exactly as it would have.
        match upgrader.upgrade(None).await {
            Ok(pid) => Ok(Response::new(pb::UpgradeResponse {
                new_pid: pid,
                message: format!(
                    "process {pid} serves; process {} is draining",
                    std::process::id()
                ),
            })),
            Err(e @ crate::upgrade::UpgradeError::Busy) => Err(Status::aborted(e.to_string())),
            Err(e @ crate::upgrade::UpgradeError::HandedOver) => {
                Err(Status::unavailable(e.to_string()))
            }
            Err(e) => Err(Status::failed_precondition(format!(
                "upgrade failed, the old process keeps serving: {e}"
            ))),
        }
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let timeout = request.into_inner().timeout_ms;
        let timeout = (timeout > 0).then(|| std::time::Duration::from_millis(timeout));
        self.shutdown.drain_requested(timeout);
        Ok(Response::new(pb::DrainResponse {
            message: format!(
                "process {} stopped accepting and exits once in-flight work is done",
                std::process::id()
            ),
        }))
    }
}
