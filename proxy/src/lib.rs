//! `proxy`: a routing proxy daemon. HTTP and TCP routing from rules kept in SQLite and
//! served from an in-memory snapshot.
//!
//! # Layout
//!
//! - [`config`]: TOML file -> validated [`Config`]; `proxyd check-config`.
//! - [`state`]: the desired state: model types, [`state::Change`] (every mutation),
//!   validation, the single SQLite writer, snapshot publication.
//! - [`routing`]: the compiled, immutable [`routing::RoutingTable`]; `lookup(listener, host, path)`.
//! - [`listener`]: binding sockets (SO_REUSEADDR + SO_REUSEPORT), idle timeouts.
//! - [`http`]: hyper server and the proxy request path: hygiene, forwarding, errors, access log.
//! - [`tcp`]: L4 forwarding with `copy_bidirectional`.
//! - [`upstream`]: pools at run time: balancing, connection reuse, passive and active health.
//! - [`telemetry`]: logging and the admin listener (`/healthz`, `/readyz`).
//! - [`shutdown`]: the one stop/drain signal shared by every task.
//!
//! `main.rs` only parses flags and calls [`run`]; tests start a [`Daemon`] in-process.

pub mod config;
pub mod http;
pub mod listener;
pub mod mgmt;
pub mod routing;
pub mod shutdown;
pub mod state;
pub mod tcp;
pub mod telemetry;
pub mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;

pub use config::Config;
pub use shutdown::Shutdown;

use config::Protocol;
use state::{Source, StateHandle};

/// The daemon could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// A listening socket could not be bound.
    #[error(transparent)]
    Bind(#[from] listener::BindError),
    /// The state store could not be opened or reconciled.
    #[error("state store in {dir}: {source}")]
    Store {
        /// State directory.
        dir: String,
        /// What failed.
        source: state::StoreError,
    },
    /// The management API could not start.
    #[error(transparent)]
    Mgmt(#[from] mgmt::MgmtError),
    /// Another socket-level failure.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// A running daemon: listeners accepting, state writer running.
pub struct Daemon {
    config: Config,
    state: StateHandle,
    shutdown: Shutdown,
    addresses: BTreeMap<String, SocketAddr>,
    admin_address: Option<SocketAddr>,
    mgmt_address: Option<SocketAddr>,
}

impl Daemon {
    /// Opens the state, binds every listener and starts serving.
    pub async fn start(config: Config) -> Result<Daemon, StartError> {
        let sockets = listener::bind_all(&config)?;
        Daemon::start_with(config, sockets).await
    }

    /// Starts serving on already-open listening sockets (by listener name).
    pub async fn start_with(
        config: Config,
        mut sockets: BTreeMap<String, std::net::TcpListener>,
    ) -> Result<Daemon, StartError> {
        let started = std::time::Instant::now();
        // First, so a second daemon on the same socket fails before touching the store.
        let mgmt_sockets = mgmt::Sockets::bind(&config.server)?;
        let state = StateHandle::open(
            &config.server.state_dir,
            config.listener_protocols(),
            &config.declarative,
        )
        .map_err(|source| StartError::Store { dir: config.server.state_dir.display().to_string(), source })?;
        let shutdown = Shutdown::new();
        let mut addresses = BTreeMap::new();
        for listener_config in &config.listeners {
            let Some(socket) = sockets.remove(&listener_config.name) else {
                return Err(StartError::Io(
                    format!("listener {:?}", listener_config.name),
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no socket for this listener"),
                ));
            };
            let io_err = |e| StartError::Io(format!("listener {:?}", listener_config.name), e);
            socket.set_nonblocking(true).map_err(io_err)?;
            let address = socket.local_addr().map_err(io_err)?;
            let socket = tokio::net::TcpListener::from_std(socket).map_err(io_err)?;
            addresses.insert(listener_config.name.clone(), address);
            let lc = Arc::new(listener_config.clone());
            tracing::info!(listener = %lc.name, protocol = lc.protocol.as_str(), %address, "listening");
            match lc.protocol {
                Protocol::Http => {
                    tokio::spawn(http::serve(socket, lc, state.clone(), shutdown.clone()));
                }
                Protocol::Tcp => {
                    tokio::spawn(tcp::serve(socket, lc, state.clone(), shutdown.clone()));
                }
            }
        }
        let admin_address = match config.server.admin_listen {
            Some(addr) => {
                let socket = listener::bind(addr).map_err(|e| StartError::Io(format!("admin listener {addr}"), e))?;
                let address = socket.local_addr().map_err(|e| StartError::Io("admin listener".into(), e))?;
                let socket = tokio::net::TcpListener::from_std(socket)
                    .map_err(|e| StartError::Io("admin listener".into(), e))?;
                tokio::spawn(telemetry::admin::serve(socket, shutdown.clone()));
                tracing::info!(%address, "admin endpoints listening");
                Some(address)
            }
            None => None,
        };
        tokio::spawn(upstream::health::run(state.clone(), shutdown.clone()));
        let mgmt_address = mgmt_sockets.tcp_address();
        let mgmt_context = mgmt::Context {
            state: state.clone(),
            shutdown: shutdown.clone(),
            started,
            listeners: mgmt::ListenerInfo::all(&config, &addresses),
            config_path: config.path.clone(),
        };
        mgmt::spawn(mgmt_sockets, mgmt_context, shutdown.clone()).await?;
        Ok(Daemon { config, state, shutdown, addresses, admin_address, mgmt_address })
    }

    /// The bound address of the listener called `name`.
    pub fn listener_address(&self, name: &str) -> Option<SocketAddr> {
        self.addresses.get(name).copied()
    }

    /// The bound admin address.
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin_address
    }

    /// The bound address of the management API's TCP listener.
    pub fn mgmt_address(&self) -> Option<SocketAddr> {
        self.mgmt_address
    }

    /// The state handle (read snapshots, apply changes).
    pub fn state(&self) -> &StateHandle {
        &self.state
    }

    /// The shutdown signal.
    pub fn shutdown_signal(&self) -> &Shutdown {
        &self.shutdown
    }

    /// The config it runs.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Stops accepting, lets in-flight work finish (up to `shutdown_timeout`), closes the store.
    pub async fn stop(self) {
        self.shutdown.trigger();
        self.state.close().await;
        self.shutdown.drain(self.config.server.shutdown_timeout).await;
        tracing::info!("stopped");
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> Result<(), StartError> {
    let daemon = Daemon::start(config).await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    daemon.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Objects in `state` created through the API (for status reports).
pub fn api_object_count(state: &state::State) -> usize {
    let doc = state.document(Source::Api);
    doc.pools.len() + doc.routes.len() + doc.tcp_routes.len()
}
