//! `proxy.v1.ClusterService` and the fleet part of `Status`: what this node knows of the
//! fleet (fleet mode, `[cluster]`).

use proxy_proto::v1 as pb;
use proxy_proto::v1::cluster_service_server::{ClusterService, ClusterServiceServer};
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, Excluded};

/// The ClusterService implementation.
#[derive(Clone)]
pub struct ClusterApi {
    cluster: Option<Cluster>,
}

impl ClusterApi {
    /// A service over the fleet (`None`: not in fleet mode; every call says so).
    pub fn new(cluster: Option<Cluster>) -> Self {
        ClusterApi { cluster }
    }

    /// The service, ready to be added to a server.
    pub(super) fn server(self) -> ClusterServiceServer<ClusterApi> {
        ClusterServiceServer::new(self)
    }
}

fn objects(list: Vec<Excluded>) -> Vec<pb::ClusterObject> {
    list.into_iter()
        .map(|e| pb::ClusterObject {
            kind: e.kind.as_str().into(),
            name: e.name,
            reason: e.reason,
        })
        .collect()
}

/// The `cluster` field of `StatusResponse`.
pub(super) fn state(cluster: &Cluster) -> pb::ClusterState {
    let s = cluster.status();
    pb::ClusterState {
        node_name: s.node_name,
        prefix: s.prefix,
        connected: s.connected,
        applied_revision: s.applied_revision,
        stale: s.stale_for.is_some(),
        stale_seconds: s.stale_for.map_or(0, |d| d.as_secs()),
        last_error: s.last_error,
        full_syncs: s.full_syncs,
        resumes: s.resumes,
        shadowed: objects(s.shadowed),
        skipped: objects(s.skipped),
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let Some(cluster) = &self.cluster else {
            return Err(Status::failed_precondition(
                "this proxyd is not in fleet mode (no [cluster] section)",
            ));
        };
        let (etcd_revision, nodes) = cluster
            .nodes()
            .await
            .map_err(super::error::cluster_status)?;
        Ok(Response::new(pb::ClusterStatusResponse {
            etcd_revision,
            nodes: nodes
                .into_iter()
                .map(|n| pb::ClusterNode {
                    name: n.name,
                    version: n.version,
                    applied_revision: n.applied_revision,
                    lag: n.lag,
                    heartbeat_age_seconds: n.heartbeat_age.as_secs(),
                    self_: n.this_node,
                })
                .collect(),
        }))
    }
}
