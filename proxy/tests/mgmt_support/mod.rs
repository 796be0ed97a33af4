//! Fixtures for the management API tests: an in-process proxyd whose API is reached over
//! its real unix socket (or TCP listener) with the generated tonic clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use hyper_util::rt::TokioIo;
use proxy_proto::v1 as pb;
use proxy_proto::v1::admin_service_client::AdminServiceClient;
use proxy_proto::v1::pool_service_client::PoolServiceClient;
use proxy_proto::v1::route_service_client::RouteServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::common::TestProxy;

/// One HTTP listener `web`, one TCP listener `db`, state in `{state}`.
pub const CONFIG: &str = r#"[server]
state_dir = "{state}"
admin_listen = ""

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:0"

[[listeners]]
name = "db"
protocol = "tcp"
address = "127.0.0.1:0"
"#;

const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Clients of the three services over one connection.
#[derive(Clone)]
pub struct Api {
    pub routes: RouteServiceClient<Channel>,
    pub pools: PoolServiceClient<Channel>,
    pub admin: AdminServiceClient<Channel>,
    pub channel: Channel,
}

impl Api {
    pub fn over(channel: Channel) -> Api {
        Api {
            routes: RouteServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            pools: PoolServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            admin: AdminServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            channel,
        }
    }
}

/// A channel to the unix socket at `path`.
pub async fn unix_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect to the management socket")
}

/// Clients connected to the daemon's management socket.
pub async fn connect(proxy: &TestProxy) -> Api {
    Api::over(unix_channel(&socket_path(proxy)).await)
}

/// The daemon's management socket.
pub fn socket_path(proxy: &TestProxy) -> PathBuf {
    proxy.daemon.config().server.mgmt_socket.clone()
}

/// A pool message with round-robin upstreams.
pub fn pool_msg(name: &str, upstreams: &[String]) -> pb::Pool {
    pb::Pool {
        name: name.into(),
        upstreams: upstreams
            .iter()
            .map(|a| pb::Upstream {
                address: a.clone(),
                weight: 1,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A path-prefix route message on listener `web`.
pub fn route_msg(name: &str, host: &str, prefix: &str, pool: &str) -> pb::Route {
    pb::Route {
        name: name.into(),
        listener: "web".into(),
        host: host.into(),
        path: Some(pb::route::Path::PathPrefix(prefix.into())),
        pool: pool.into(),
        ..Default::default()
    }
}

/// Creates a pool through the API.
pub async fn create_pool(api: &mut Api, p: pb::Pool) -> u64 {
    api.pools
        .create_pool(pb::CreatePoolRequest { pool: Some(p) })
        .await
        .expect("create pool")
        .into_inner()
        .revision
}

/// Creates a route through the API.
pub async fn create_route(api: &mut Api, r: pb::Route) -> u64 {
    api.routes
        .create_route(pb::CreateRouteRequest { route: Some(r) })
        .await
        .expect("create route")
        .into_inner()
        .revision
}

/// grpcurl on PATH, or in the scripts directory of the Python that pip installs into.
pub fn find_grpcurl() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("grpcurl"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let scripts = ["python3", "python"].iter().filter_map(|python| {
        let out = Command::new(python)
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_path('scripts'))",
            ])
            .output()
            .ok()?;
        Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("grpcurl"))
    });
    let user = std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/bin/grpcurl"));
    on_path.into_iter().chain(scripts).chain(user).find(|p| {
        Command::new(p)
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}
