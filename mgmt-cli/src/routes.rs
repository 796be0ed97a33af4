//! `proxyctl routes ...`: HTTP routes.

use anyhow::Result;
use clap::{Args, Subcommand};
use proxy_proto::v1 as pb;
use serde_json::json;

use crate::client::{Clients, Reply};
use crate::document::Route;
use crate::output::{Output, Table};
use crate::routes_csv;

/// HTTP route commands.
#[derive(Subcommand)]
pub enum RoutesCommand {
    /// Lists HTTP routes.
    #[command(alias = "ls")]
    List {
        /// Only routes of this listener.
        #[arg(long)]
        listener: Option<String>,
        /// Only routes forwarding to this pool.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Shows one HTTP route.
    Get {
        /// Route name.
        name: String,
    },
    /// Adds an HTTP route.
    Add(RouteArgs),
    /// Replaces an HTTP route (every field).
    Update(RouteArgs),
    /// Removes an HTTP route.
    #[command(alias = "delete")]
    Rm {
        /// Route name.
        name: String,
    },
    /// Loads routes from a CSV file in one atomic batch (all or nothing).
    Import(routes_csv::ImportArgs),
}

/// The fields of an HTTP route.
#[derive(Args)]
pub struct RouteArgs {
    /// Route name.
    pub name: String,
    /// HTTP listener the route applies to.
    #[arg(long)]
    pub listener: String,
    /// Host (`example.com` or `*.example.com`); any host when absent.
    #[arg(long)]
    pub host: Option<String>,
    /// Path prefix to match (the default is `/`).
    #[arg(long, conflicts_with = "path_exact")]
    pub path_prefix: Option<String>,
    /// Exact path to match instead of a prefix.
    #[arg(long)]
    pub path_exact: Option<String>,
    /// Pool that serves the matching requests.
    #[arg(long)]
    pub pool: String,
    /// Remove the matched prefix from the forwarded path.
    #[arg(long)]
    pub strip_prefix: bool,
    /// Higher wins among routes with the same host and path.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
}

impl RouteArgs {
    fn to_route(&self) -> Route {
        let path_prefix = match (&self.path_prefix, &self.path_exact) {
            (None, None) => Some("/".to_owned()),
            (prefix, _) => prefix.clone(),
        };
        Route {
            name: self.name.clone(),
            source: None,
            listener: self.listener.clone(),
            host: self.host.clone(),
            path_prefix,
            path_exact: self.path_exact.clone(),
            pool: self.pool.clone(),
            strip_prefix: self.strip_prefix,
            priority: self.priority,
        }
    }
}

/// The routes as a table.
pub fn table(routes: &[Route]) -> String {
    let mut t = Table::new(&[
        "NAME", "LISTENER", "HOST", "PATH", "POOL", "STRIP", "PRIORITY", "SOURCE",
    ]);
    for r in routes {
        t.row(vec![
            r.name.clone(),
            r.listener.clone(),
            r.host.clone().unwrap_or_else(|| "*".to_owned()),
            r.path_display(),
            r.pool.clone(),
            if r.strip_prefix { "yes" } else { "no" }.to_owned(),
            r.priority.to_string(),
            r.source.clone().unwrap_or_default(),
        ]);
    }
    t.render()
}

/// Runs a `routes` command.
pub async fn run(cmd: RoutesCommand, clients: &mut Clients, out: &Output) -> Result<()> {
    match cmd {
        RoutesCommand::List { listener, pool } => {
            let reply = clients
                .routes
                .list_routes(pb::ListRoutesRequest {
                    listener: listener.unwrap_or_default(),
                    pool: pool.unwrap_or_default(),
                })
                .await
                .reply()?;
            let routes: Vec<Route> = reply.routes.iter().map(Route::from_proto).collect();
            out.show(&routes, |r| table(r))
        }
        RoutesCommand::Get { name } => {
            let reply = clients
                .routes
                .get_route(pb::GetRouteRequest { name })
                .await
                .reply()?;
            let route = reply.route.as_ref().map(Route::from_proto);
            out.show(&route, |r| table(r.as_slice()))
        }
        RoutesCommand::Add(args) => {
            let route = args.to_route().to_proto()?;
            let reply = clients
                .routes
                .create_route(pb::CreateRouteRequest { route: Some(route) })
                .await
                .reply()?;
            let route = reply.route.as_ref().map(Route::from_proto);
            let value = json!({ "route": route, "revision": reply.revision });
            out.show(&value, |_| {
                format!(
                    "route {:?} created (revision {})",
                    args.name, reply.revision
                )
            })
        }
        RoutesCommand::Update(args) => {
            let route = args.to_route().to_proto()?;
            let reply = clients
                .routes
                .update_route(pb::UpdateRouteRequest { route: Some(route) })
                .await
                .reply()?;
            let route = reply.route.as_ref().map(Route::from_proto);
            let value = json!({ "route": route, "revision": reply.revision });
            out.show(&value, |_| {
                format!(
                    "route {:?} updated (revision {})",
                    args.name, reply.revision
                )
            })
        }
        RoutesCommand::Rm { name } => {
            let reply = clients
                .routes
                .delete_route(pb::DeleteRouteRequest { name: name.clone() })
                .await
                .reply()?;
            let value = json!({ "revision": reply.revision });
            out.show(&value, |_| {
                format!("route {name:?} removed (revision {})", reply.revision)
            })
        }
        RoutesCommand::Import(args) => routes_csv::run(args, clients, out).await,
    }
}
