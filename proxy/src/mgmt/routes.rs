//! `proxy.v1.RouteService`: HTTP routes and TCP routes.

use proxy_proto::v1 as pb;
use proxy_proto::v1::route_service_server::RouteService;
use tonic::{Request, Response, Status};

use super::convert::{self, required};
use super::Writes;
use crate::state::Change;

/// The RouteService implementation.
#[derive(Clone)]
pub struct RouteApi {
    writes: Writes,
}

impl RouteApi {
    /// A service reading and changing the state through `writes`.
    pub fn new(writes: Writes) -> Self {
        RouteApi { writes }
    }

    /// The stored form of route `name` (after normalisation by the state).
    fn stored_route(&self, name: &str) -> Option<pb::Route> {
        self.writes
            .state()
            .snapshot()
            .state
            .route(name)
            .map(convert::route_proto)
    }

    fn stored_tcp_route(&self, name: &str) -> Option<pb::TcpRoute> {
        self.writes
            .state()
            .snapshot()
            .state
            .tcp_route(name)
            .map(convert::tcp_route_proto)
    }
}

fn wanted(filter: &str, value: &str) -> bool {
    filter.is_empty() || filter == value
}

#[tonic::async_trait]
impl RouteService for RouteApi {
    async fn list_routes(
        &self,
        request: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let req = request.into_inner();
        let snap = self.writes.state().snapshot();
        let routes = snap
            .state
            .routes()
            .filter(|r| wanted(&req.listener, &r.listener) && wanted(&req.pool, &r.pool))
            .map(convert::route_proto)
            .collect();
        Ok(Response::new(pb::ListRoutesResponse {
            routes,
            revision: snap.revision,
        }))
    }

    async fn get_route(
        &self,
        request: Request<pb::GetRouteRequest>,
    ) -> Result<Response<pb::GetRouteResponse>, Status> {
        let name = request.into_inner().name;
        let snap = self.writes.state().snapshot();
        let route = snap
            .state
            .route(&name)
            .ok_or_else(|| Status::not_found(format!("route {name:?} not found")))?;
        Ok(Response::new(pb::GetRouteResponse {
            route: Some(convert::route_proto(route)),
            revision: snap.revision,
        }))
    }

    async fn create_route(
        &self,
        request: Request<pb::CreateRouteRequest>,
    ) -> Result<Response<pb::CreateRouteResponse>, Status> {
        let route = convert::route(required(request.into_inner().route, "route")?, "route")?;
        let name = route.name.clone();
        let revision = self.writes.apply(vec![Change::CreateRoute(route)]).await?;
        Ok(Response::new(pb::CreateRouteResponse {
            route: self.stored_route(&name),
            revision,
        }))
    }

    async fn update_route(
        &self,
        request: Request<pb::UpdateRouteRequest>,
    ) -> Result<Response<pb::UpdateRouteResponse>, Status> {
        let route = convert::route(required(request.into_inner().route, "route")?, "route")?;
        let name = route.name.clone();
        let revision = self.writes.apply(vec![Change::UpdateRoute(route)]).await?;
        Ok(Response::new(pb::UpdateRouteResponse {
            route: self.stored_route(&name),
            revision,
        }))
    }

    async fn delete_route(
        &self,
        request: Request<pb::DeleteRouteRequest>,
    ) -> Result<Response<pb::DeleteRouteResponse>, Status> {
        let name = request.into_inner().name;
        let revision = self
            .writes
            .apply(vec![Change::DeleteRoute { name }])
            .await?;
        Ok(Response::new(pb::DeleteRouteResponse { revision }))
    }

    async fn list_tcp_routes(
        &self,
        request: Request<pb::ListTcpRoutesRequest>,
    ) -> Result<Response<pb::ListTcpRoutesResponse>, Status> {
        let req = request.into_inner();
        let snap = self.writes.state().snapshot();
        let tcp_routes = snap
            .state
            .tcp_routes()
            .filter(|r| wanted(&req.listener, &r.listener) && wanted(&req.pool, &r.pool))
            .map(convert::tcp_route_proto)
            .collect();
        Ok(Response::new(pb::ListTcpRoutesResponse {
            tcp_routes,
            revision: snap.revision,
        }))
    }

    async fn get_tcp_route(
        &self,
        request: Request<pb::GetTcpRouteRequest>,
    ) -> Result<Response<pb::GetTcpRouteResponse>, Status> {
        let name = request.into_inner().name;
        let snap = self.writes.state().snapshot();
        let route = snap
            .state
            .tcp_route(&name)
            .ok_or_else(|| Status::not_found(format!("tcp_route {name:?} not found")))?;
        Ok(Response::new(pb::GetTcpRouteResponse {
            tcp_route: Some(convert::tcp_route_proto(route)),
            revision: snap.revision,
        }))
    }

    async fn create_tcp_route(
        &self,
        request: Request<pb::CreateTcpRouteRequest>,
    ) -> Result<Response<pb::CreateTcpRouteResponse>, Status> {
        let route = convert::tcp_route(required(request.into_inner().tcp_route, "tcp_route")?);
        let name = route.name.clone();
        let revision = self
            .writes
            .apply(vec![Change::CreateTcpRoute(route)])
            .await?;
        Ok(Response::new(pb::CreateTcpRouteResponse {
            tcp_route: self.stored_tcp_route(&name),
            revision,
        }))
    }

    async fn update_tcp_route(
        &self,
        request: Request<pb::UpdateTcpRouteRequest>,
    ) -> Result<Response<pb::UpdateTcpRouteResponse>, Status> {
        let route = convert::tcp_route(required(request.into_inner().tcp_route, "tcp_route")?);
        let name = route.name.clone();
        let revision = self
            .writes
            .apply(vec![Change::UpdateTcpRoute(route)])
            .await?;
        Ok(Response::new(pb::UpdateTcpRouteResponse {
            tcp_route: self.stored_tcp_route(&name),
            revision,
        }))
    }

    async fn delete_tcp_route(
        &self,
        request: Request<pb::DeleteTcpRouteRequest>,
    ) -> Result<Response<pb::DeleteTcpRouteResponse>, Status> {
        let name = request.into_inner().name;
        let revision = self
            .writes
            .apply(vec![Change::DeleteTcpRoute { name }])
            .await?;
        Ok(Response::new(pb::DeleteTcpRouteResponse { revision }))
    }
}
