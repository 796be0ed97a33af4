//! `proxy.v1.DiscoveryService`: the discovery sources and how they are doing.

use std::time::{SystemTime, UNIX_EPOCH};

use proxy_proto::v1 as pb;
use proxy_proto::v1::discovery_service_server::{DiscoveryService, DiscoveryServiceServer};
use tonic::{Request, Response, Status};

use crate::discovery::Discovery;

/// The DiscoveryService implementation.
#[derive(Clone)]
pub struct DiscoveryApi {
    discovery: Discovery,
}

impl DiscoveryApi {
    /// A service over the running discovery sources.
    pub fn new(discovery: Discovery) -> Self {
        DiscoveryApi { discovery }
    }

    /// The service, ready to be added to a server.
    pub(super) fn server(self) -> DiscoveryServiceServer<DiscoveryApi> {
        DiscoveryServiceServer::new(self)
    }
}

/// Unix milliseconds, 0 for "never".
pub(super) fn unix_ms(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[tonic::async_trait]
impl DiscoveryService for DiscoveryApi {
    async fn list_sources(
        &self,
        _request: Request<pb::ListSourcesRequest>,
    ) -> Result<Response<pb::ListSourcesResponse>, Status> {
        let sources = self
            .discovery
            .reports()
            .into_iter()
            .map(|r| pb::DiscoverySource {
                pool: r.pool,
                kind: r.kind.as_str().into(),
                target: r.target,
                members: u32::try_from(r.members).unwrap_or(u32::MAX),
                last_success_unix_ms: unix_ms(r.last_success),
                last_error_unix_ms: unix_ms(r.last_error.as_ref().map(|(t, _)| *t)),
                last_error: r.last_error.map(|(_, e)| e).unwrap_or_default(),
                updates: r.updates,
            })
            .collect();
        Ok(Response::new(pb::ListSourcesResponse { sources }))
    }
}
