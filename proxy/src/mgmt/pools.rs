//! `proxy.v1.PoolService`: pools and their upstreams.

use proxy_proto::v1 as pb;
use proxy_proto::v1::pool_service_server::PoolService;
use tonic::{Request, Response, Status};

use super::convert::{self, required};
use super::Writes;
use crate::routing::Published;
use crate::state::{Change, UpstreamState};

/// The PoolService implementation.
#[derive(Clone)]
pub struct PoolApi {
    writes: Writes,
    /// The published routing tables (run-time pool health and load).
    routing: Published,
}

impl PoolApi {
    /// A service changing pools through `writes` and reading them, with their run-time
    /// health, from `routing`.
    pub fn new(writes: Writes, routing: Published) -> Self {
        PoolApi { writes, routing }
    }

    fn stored_pool(&self, name: &str) -> Option<pb::Pool> {
        let snap = self.routing.snapshot();
        snap.state
            .pool(name)
            .map(|p| convert::pool_proto(p, Some(&snap.routing)))
    }

    async fn set_state(
        &self,
        pool: String,
        address: String,
        state: UpstreamState,
    ) -> Result<u64, Status> {
        self.writes
            .apply(vec![Change::SetUpstreamState {
                pool,
                address,
                state,
            }])
            .await
    }
}

#[tonic::async_trait]
impl PoolService for PoolApi {
    async fn list_pools(
        &self,
        _request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let snap = self.routing.snapshot();
        let pools = snap
            .state
            .pools()
            .map(|p| convert::pool_proto(p, Some(&snap.routing)))
            .collect();
        Ok(Response::new(pb::ListPoolsResponse {
            pools,
            revision: snap.revision,
        }))
    }

    async fn get_pool(
        &self,
        request: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::GetPoolResponse>, Status> {
        let name = request.into_inner().name;
        let snap = self.routing.snapshot();
        let pool = snap
            .state
            .pool(&name)
            .ok_or_else(|| Status::not_found(format!("pool {name:?} not found")))?;
        Ok(Response::new(pb::GetPoolResponse {
            pool: Some(convert::pool_proto(pool, Some(&snap.routing))),
            revision: snap.revision,
        }))
    }

    async fn create_pool(
        &self,
        request: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::CreatePoolResponse>, Status> {
        let pool = convert::pool(required(request.into_inner().pool, "pool")?, "pool")?;
        let name = pool.name.clone();
        let revision = self.writes.apply(vec![Change::CreatePool(pool)]).await?;
        Ok(Response::new(pb::CreatePoolResponse {
            pool: self.stored_pool(&name),
            revision,
        }))
    }

    async fn update_pool(
        &self,
        request: Request<pb::UpdatePoolRequest>,
    ) -> Result<Response<pb::UpdatePoolResponse>, Status> {
        let pool = convert::pool(required(request.into_inner().pool, "pool")?, "pool")?;
        let name = pool.name.clone();
        let revision = self.writes.apply(vec![Change::UpdatePool(pool)]).await?;
        Ok(Response::new(pb::UpdatePoolResponse {
            pool: self.stored_pool(&name),
            revision,
        }))
    }

    async fn delete_pool(
        &self,
        request: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::DeletePoolResponse>, Status> {
        let name = request.into_inner().name;
        let revision = self.writes.apply(vec![Change::DeletePool { name }]).await?;
        Ok(Response::new(pb::DeletePoolResponse { revision }))
    }

    async fn add_upstream(
        &self,
        request: Request<pb::AddUpstreamRequest>,
    ) -> Result<Response<pb::AddUpstreamResponse>, Status> {
        let req = request.into_inner();
        let upstream = convert::upstream(required(req.upstream, "upstream")?, "upstream")?;
        let revision = self
            .writes
            .apply(vec![Change::AddUpstream {
                pool: req.pool,
                upstream,
            }])
            .await?;
        Ok(Response::new(pb::AddUpstreamResponse { revision }))
    }

    async fn remove_upstream(
        &self,
        request: Request<pb::RemoveUpstreamRequest>,
    ) -> Result<Response<pb::RemoveUpstreamResponse>, Status> {
        let req = request.into_inner();
        let revision = self
            .writes
            .apply(vec![Change::RemoveUpstream {
                pool: req.pool,
                address: req.address,
            }])
            .await?;
        Ok(Response::new(pb::RemoveUpstreamResponse { revision }))
    }

    async fn drain_upstream(
        &self,
        request: Request<pb::DrainUpstreamRequest>,
    ) -> Result<Response<pb::DrainUpstreamResponse>, Status> {
        let req = request.into_inner();
        let revision = self
            .set_state(req.pool, req.address, UpstreamState::Draining)
            .await?;
        Ok(Response::new(pb::DrainUpstreamResponse { revision }))
    }

    async fn activate_upstream(
        &self,
        request: Request<pb::ActivateUpstreamRequest>,
    ) -> Result<Response<pb::ActivateUpstreamResponse>, Status> {
        let req = request.into_inner();
        let revision = self
            .set_state(req.pool, req.address, UpstreamState::Active)
            .await?;
        Ok(Response::new(pb::ActivateUpstreamResponse { revision }))
    }
}
