//! `proxyctl tcp-routes ...`: L4 routes.

use anyhow::Result;
use clap::{Args, Subcommand};
use proxy_proto::v1 as pb;
use serde_json::json;

use crate::client::{Clients, Reply};
use crate::document::TcpRoute;
use crate::output::{Output, Table};

/// TCP route commands.
#[derive(Subcommand)]
pub enum TcpRoutesCommand {
    /// Lists TCP routes.
    #[command(alias = "ls")]
    List {
        /// Only routes of this listener.
        #[arg(long)]
        listener: Option<String>,
        /// Only routes forwarding to this pool.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Shows one TCP route.
    Get {
        /// TCP route name.
        name: String,
    },
    /// Adds a TCP route.
    Add(TcpRouteArgs),
    /// Replaces a TCP route.
    Update(TcpRouteArgs),
    /// Removes a TCP route.
    #[command(alias = "delete")]
    Rm {
        /// TCP route name.
        name: String,
    },
}

/// The fields of a TCP route.
#[derive(Args)]
pub struct TcpRouteArgs {
    /// TCP route name.
    pub name: String,
    /// TCP listener whose connections it takes.
    #[arg(long)]
    pub listener: String,
    /// Pool that receives the connections.
    #[arg(long)]
    pub pool: String,
    /// On a tls-passthrough listener: the server name (`example.com` or `*.example.com`)
    /// this route takes; without it, every other name.
    #[arg(long)]
    pub sni: Option<String>,
}

impl TcpRouteArgs {
    fn to_proto(&self) -> pb::TcpRoute {
        pb::TcpRoute {
            name: self.name.clone(),
            listener: self.listener.clone(),
            pool: self.pool.clone(),
            sni: self.sni.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}

fn table(routes: &[TcpRoute]) -> String {
    let mut t = Table::new(&["NAME", "LISTENER", "SNI", "POOL", "SOURCE"]);
    for r in routes {
        t.row(vec![
            r.name.clone(),
            r.listener.clone(),
            r.sni.clone().unwrap_or_else(|| "*".to_owned()),
            r.pool.clone(),
            r.source.clone().unwrap_or_default(),
        ]);
    }
    t.render()
}

/// Runs a `tcp-routes` command.
pub async fn run(cmd: TcpRoutesCommand, clients: &mut Clients, out: &Output) -> Result<()> {
    match cmd {
        TcpRoutesCommand::List { listener, pool } => {
            let reply = clients
                .routes
                .list_tcp_routes(pb::ListTcpRoutesRequest {
                    listener: listener.unwrap_or_default(),
                    pool: pool.unwrap_or_default(),
                })
                .await
                .reply()?;
            let routes: Vec<TcpRoute> = reply.tcp_routes.iter().map(TcpRoute::from_proto).collect();
            out.show(&routes, |r| table(r))
        }
        TcpRoutesCommand::Get { name } => {
            let reply = clients
                .routes
                .get_tcp_route(pb::GetTcpRouteRequest { name })
                .await
                .reply()?;
            let route = reply.tcp_route.as_ref().map(TcpRoute::from_proto);
            out.show(&route, |r| table(r.as_slice()))
        }
        TcpRoutesCommand::Add(args) => {
            let reply = clients
                .routes
                .create_tcp_route(pb::CreateTcpRouteRequest {
                    tcp_route: Some(args.to_proto()),
                })
                .await
                .reply()?;
            let route = reply.tcp_route.as_ref().map(TcpRoute::from_proto);
            let value = json!({ "tcp_route": route, "revision": reply.revision });
            out.show(&value, |_| {
                format!(
                    "tcp route {:?} created (revision {})",
                    args.name, reply.revision
                )
            })
        }
        TcpRoutesCommand::Update(args) => {
            let reply = clients
                .routes
                .update_tcp_route(pb::UpdateTcpRouteRequest {
                    tcp_route: Some(args.to_proto()),
                })
                .await
                .reply()?;
            let route = reply.tcp_route.as_ref().map(TcpRoute::from_proto);
            let value = json!({ "tcp_route": route, "revision": reply.revision });
            out.show(&value, |_| {
                format!(
                    "tcp route {:?} updated (revision {})",
                    args.name, reply.revision
                )
            })
        }
        TcpRoutesCommand::Rm { name } => {
            let reply = clients
                .routes
                .delete_tcp_route(pb::DeleteTcpRouteRequest { name: name.clone() })
                .await
                .reply()?;
            let value = json!({ "revision": reply.revision });
            out.show(&value, |_| {
                format!("tcp route {name:?} removed (revision {})", reply.revision)
            })
        }
    }
}
