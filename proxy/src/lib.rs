//! `proxy`: a routing proxy daemon. HTTP and TCP routing from rules kept in SQLite and
//! served from an in-memory snapshot.
//!
//! # Layout
//!
//! - [`config`]: TOML file -> validated [`Config`]; `proxyd check-config`.
//! - [`cluster`]: fleet mode: the API-owned objects of several hosts shared through etcd,
//!   followed by a sync task and applied through the state's writer.
//! - [`state`]: the desired state: model types, [`state::Change`] (every mutation),
//!   validation, the single SQLite writer; the ground floor, importing no other module
//!   (what is built from it is injected as a [`state::Publish`] step).
//! - [`routing`]: the compiled, immutable [`routing::RoutingTable`]; `lookup(listener, host, path)`;
//!   [`routing::Published`], the snapshots the data path reads.
//! - [`upstream`]: pools at run time: balancing, connection reuse, passive and active health,
//!   the hold of a registered route, the request body sent upstream.
//! - [`listener`]: obtaining sockets (handoff, systemd, or bind with SO_REUSEADDR +
//!   SO_REUSEPORT), idle timeouts.
//! - [`http`]: hyper server and the proxy request path: hygiene, forwarding, errors, access log.
//! - [`tcp`]: L4 forwarding with `copy_bidirectional`.
//! - [`discovery`]: etcd, DNS, exec and file sources feeding pool membership at run time.
//! - [`etcd`]: a small client of etcd's v3 API (prefix reads, watches, leases) on the
//!   checked-in generated code of `proxy-proto`; a leaf that imports no other module.
//! - [`registration`]: services registering routes over a gRPC stream; hold-and-queue.
//! - [`telemetry`]: logging, the access log format, metrics, OTLP export and the admin
//!   listener (`/metrics`, `/healthz`, `/readyz`).
//! - [`upgrade`]: zero-downtime upgrades: fd handoff to the next binary and the hand-over
//!   participants it quiesces.
//! - [`systemd`]: readiness and stopping notifications, the main pid, the fd store.
//! - [`mgmt`]: the gRPC management API.
//! - [`shutdown`]: the one stop/drain signal shared by every task.
//! - [`allocator`]: the global allocator, mimalloc asked as C's `malloc` where it can be,
//!   with a region of huge pages for routing tables and their series.
//! - [`boxed`]: futures boxed where they are built, not copied into their box.
//! - [`spares`]: a thread's stock of buffers and header maps its connections are done
//!   with, for its next connections.
//! - [`workers`]: one single-threaded runtime per CPU serving the configured listeners.
//!
//! `main.rs` only parses flags and calls [`run`]; tests start a [`Daemon`] in-process.
//! ARCHITECTURE.md draws the layers; `tests/architecture.rs` keeps imports pointing down
//! them, with no cycle.

pub mod allocator;
pub mod boxed;
pub mod cluster;
pub mod config;
pub mod discovery;
pub mod etcd;
pub(crate) mod head_out;
pub mod http;
pub mod listener;
pub mod mgmt;
pub mod registration;
pub mod routing;
pub mod shutdown;
pub mod spares;
pub mod state;
pub mod systemd;
pub mod tcp;
pub mod telemetry;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod workers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;

pub use config::Config;
pub use shutdown::Shutdown;

use state::StateHandle;

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
    /// A certificate file or the TLS tables could not be used.
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    /// The OTLP exporters could not be set up.
    #[error(transparent)]
    Telemetry(#[from] telemetry::OtlpError),
    /// Fleet mode could not start.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

/// How long the management API may take to close its connections once the drain is over.
const SERVICES_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A running daemon: listeners accepting, state writer running.
pub struct Daemon {
    config: Config,
    state: StateHandle,
    routing: routing::Published,
    shutdown: Shutdown,
    addresses: BTreeMap<String, SocketAddr>,
    admin_address: Option<SocketAddr>,
    mgmt_address: Option<SocketAddr>,
    upgrader: Arc<upgrade::Upgrader>,
    tls: Arc<tls::Tls>,
    telemetry: Arc<telemetry::Telemetry>,
    registry: Arc<registration::Registry>,
}

impl Daemon {
    /// Opens the state, binds every listener and starts serving.
    pub async fn start(config: Config) -> Result<Daemon, StartError> {
        Daemon::start_with(config, listener::Inherited::default()).await
    }

    /// Starts serving, using `inherited` sockets (from a previous process or systemd) where
    /// their names match and binding the rest.
    ///
    /// The composition root: each part is built from the ones below it (ARCHITECTURE.md)
    /// and handed what it needs; nothing else wires parts together.
    pub async fn start_with(
        config: Config,
        mut inherited: listener::Inherited,
    ) -> Result<Daemon, StartError> {
        let started = std::time::Instant::now();
        // First, so a second daemon on the same socket fails before touching the store.
        let mgmt_sockets = mgmt::Sockets::bind(
            &config.server,
            mgmt::HandedSockets {
                unix: inherited.take_unix(upgrade::MGMT_SOCKET),
                tcp: inherited
                    .take_tcp(upgrade::MGMT_TCP_SOCKET)
                    .map(|(socket, _)| socket),
            },
        )?;
        let (sockets, bound_here) = listener::obtain(&config, &mut inherited)?;

        // The state, and what is built from it: the routing snapshots it publishes through
        // and the metrics that watch it.
        let routing = routing::Published::new();
        let write_latency = telemetry::DurationHistogram::fast();
        let state = open_state(&config, &routing, &write_latency).await?;
        let shutdown = Shutdown::new();
        let telemetry = Arc::new(telemetry::Telemetry::start(
            &config.telemetry,
            Some(&telemetry::StateFeed {
                routing: routing.clone(),
                write_latency,
            }),
        )?);
        // Each route's metric series are made with its routing entry from here on, and
        // for the routes loaded above now, rather than by the route's first request.
        routing.attach_with(telemetry.metrics().route_attacher());
        let tls = tls::Tls::start(
            &config.tls,
            &state::database_path(&config.server.state_dir),
            state.clone(),
            config.cluster.is_some(),
            shutdown.clone(),
            telemetry.metrics().clone(),
        )
        .await?;

        // The data path: every listener served, each socket listed for a hand-over.
        let data_path = DataPath {
            routing: routing.clone(),
            shutdown: shutdown.clone(),
            tls: tls.clone(),
            telemetry: telemetry.clone(),
        };
        let mut handoff = mgmt_handoff(&mgmt_sockets)?;
        let addresses = data_path.serve_listeners(&config, sockets, &mut handoff)?;
        let admin_socket = admin_socket(&config, &mut inherited, &mut handoff)?;
        // Ports the previous process opened for registrations are taken over further down.
        let registration_ports = inherited.take_tcp_prefixed(registration::HANDOFF_PREFIX);
        let registration_routes = inherited.take_data(registration::HANDOFF_ROUTES);
        // The previous process's fleet lease: this node's key stays in place.
        let cluster_lease = inherited
            .take_data(cluster::HANDOFF_LEASE)
            .and_then(|l| l.parse::<i64>().ok());
        inherited.close_leftovers();
        store_in_systemd(&handoff, &bound_here);
        tokio::spawn(upstream::health::run(
            {
                let routing = routing.clone();
                move || routing.routing().pools().collect()
            },
            shutdown.clone(),
        ));

        // Fleet mode: the fleet's objects from etcd (or, without etcd, as stored).
        let cluster = match &config.cluster {
            None => None,
            Some(c) => Some(
                cluster::Cluster::start(
                    c,
                    &state::database_path(&config.server.state_dir),
                    state.clone(),
                    Some(tls.clone() as Arc<dyn cluster::TlsSink>),
                    shutdown.clone(),
                    cluster_lease,
                )
                .await?,
            ),
        };
        if let Some(cluster) = &cluster {
            tls.join_fleet(cluster.clone());
        }
        watch_cluster(&telemetry, cluster.as_ref());
        if let Some(cluster) = &cluster {
            tls.join_fleet_orders(cluster.clone(), shutdown.clone());
        }

        // Run-time feeds: discovery sources and registrations.
        let discovery = discovery::Discovery::start(&config.discovery, &state, &shutdown).await;
        watch_in_metrics(telemetry.metrics(), &tls, &discovery);
        let registry = Arc::new(registration::Registry::new(
            config.registration.clone(),
            state.clone(),
            Some(tls.clone()),
            known_listeners(&config, &addresses),
            data_path.for_registrations(),
        ));
        registry
            .adopt(registration_ports, registration_routes)
            .await;
        tokio::spawn({
            let registry = registry.clone();
            let shutdown = shutdown.clone();
            async move { registry.close_ports_on(shutdown).await }
        });

        // The control plane: hand-over, the management API, the admin endpoints. While
        // handing over, new management connections wait for the successor, then the state
        // writer closes (never two writers); a failed hand-over undoes it in reverse.
        let mgmt_gate = Arc::new(GatedMgmt::default());
        let upgrader = upgrade::Upgrader::new(
            upgrade::default_executable(config.server.executable.as_deref()),
            runtime_dir(&config),
            config.server.upgrade_timeout,
            {
                let state = state.clone();
                Box::new(move || state.snapshot().revision)
            },
            shutdown.clone(),
            handoff,
        )
        .with_participant(mgmt_gate.clone())
        .with_config_file(config.path.clone())
        .with_metrics(telemetry.metrics().clone())
        .with_extras(registry.clone());
        // The fleet sync stops before the writer closes (it stores its revision through
        // it), and its lease goes to the successor with the sockets.
        let upgrader = match &cluster {
            Some(c) => {
                let fleet = Arc::new(FleetHandOver(c.clone()));
                upgrader.with_participant(fleet.clone()).with_extras(fleet)
            }
            None => upgrader,
        };
        let upgrader = Arc::new(upgrader.with_participant(Arc::new(StateWriter(state.clone()))));
        let mgmt_address = mgmt_sockets.tcp_address();
        let listeners = mgmt::ListenerInfo::all(&config, &addresses);
        let writes = mgmt::Writes::new(state.clone(), shutdown.clone()).through(cluster.clone());
        let services = mgmt::Services {
            routes: mgmt::RouteApi::new(writes.clone()),
            pools: mgmt::PoolApi::new(writes.clone(), routing.clone()),
            admin: mgmt::AdminApi {
                writes,
                shutdown: shutdown.clone(),
                started,
                listeners: listeners.clone(),
                config_path: config.path.clone(),
                upgrader: Some(upgrader.clone()),
                mgmt_tls: mgmt_sockets.tcp_tls(),
            },
            discovery: mgmt::DiscoveryApi::new(discovery.clone()),
            registration: mgmt::RegistrationApi::new(
                registry.clone(),
                shutdown.clone(),
                telemetry.metrics().clone(),
            ),
            tls: mgmt::TlsApi::new(Some(tls.clone()), shutdown.clone()),
            cluster: mgmt::ClusterApi::new(cluster),
        };
        mgmt::spawn(
            mgmt_sockets,
            services,
            telemetry.metrics().clone(),
            mgmt_gate.as_ref(),
            shutdown.clone(),
        )
        .await?;
        let admin_address = admin_socket.map(|(socket, address)| {
            let status = mgmt::StatusSources {
                routing: routing.clone(),
                listeners,
                metrics: telemetry.metrics().clone(),
                registry: registry.clone(),
                shutdown: shutdown.clone(),
                started,
                tls: Some(tls.clone()),
                discovery,
            };
            serve_admin(&config, socket, address, &telemetry, &shutdown, status);
            address
        });
        telemetry.set_ready();
        Ok(Daemon {
            config,
            state,
            routing,
            shutdown,
            addresses,
            admin_address,
            mgmt_address,
            upgrader,
            tls,
            telemetry,
            registry,
        })
    }

    /// Starts the configured binary and hands this daemon's sockets to it (see [`upgrade`]).
    pub async fn upgrade(
        &self,
        binary: Option<std::path::PathBuf>,
    ) -> Result<u32, upgrade::UpgradeError> {
        self.upgrader.upgrade(binary).await
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

    /// Certificates, the on-demand policy and the ACME issuer.
    pub fn tls(&self) -> &Arc<tls::Tls> {
        &self.tls
    }

    /// Metrics, access log settings and tracing; other parts record through its metrics.
    pub fn telemetry(&self) -> &Arc<telemetry::Telemetry> {
        &self.telemetry
    }

    /// Services registered over the registration stream, and the ports opened for them.
    pub fn registry(&self) -> &Arc<registration::Registry> {
        &self.registry
    }

    /// The state handle (read snapshots, apply changes).
    pub fn state(&self) -> &StateHandle {
        &self.state
    }

    /// The published routing tables (what the data path reads).
    pub fn routing(&self) -> &routing::Published {
        &self.routing
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
        let timeout = self.config.server.shutdown_timeout;
        self.finish(timeout).await;
    }

    async fn finish(&self, timeout: std::time::Duration) {
        self.shutdown.trigger();
        self.state.close().await;
        // The management API keeps answering while connections drain (status reads work,
        // writes get UNAVAILABLE); it stops once the drain is over.
        self.shutdown.drain(timeout).await;
        self.shutdown.begin_exit();
        if !self.shutdown.services_stopped(SERVICES_STOP_TIMEOUT).await {
            tracing::warn!("the management API did not stop in time");
        }
        self.telemetry.flush().await;
        tracing::info!("stopped");
    }
}

/// Opens the state in the config's state directory (a blocking thread: SQLite and the
/// reconcile of the config file block), publishing through `routing` and timing each write
/// into `write_latency`.
async fn open_state(
    config: &Config,
    routing: &routing::Published,
    write_latency: &telemetry::DurationHistogram,
) -> Result<StateHandle, StartError> {
    let outputs = state::Outputs {
        publish: routing.compiler(),
        write_latency: {
            let histogram = write_latency.clone();
            Box::new(move |elapsed| histogram.observe(elapsed))
        },
    };
    let (dir, listeners, declarative) = (
        config.server.state_dir.clone(),
        config.listener_protocols(),
        config.declarative.clone(),
    );
    tokio::task::spawn_blocking(move || StateHandle::open(&dir, listeners, &declarative, outputs))
        .await
        .map_err(|e| StartError::Io("state store".into(), std::io::Error::other(e)))?
        .map_err(|source| StartError::Store {
            dir: config.server.state_dir.display().to_string(),
            source,
        })
}

/// What every listener serves its connections with: configured listeners and the ports
/// registrations open alike.
#[derive(Clone)]
struct DataPath {
    routing: routing::Published,
    shutdown: Shutdown,
    tls: Arc<tls::Tls>,
    telemetry: Arc<telemetry::Telemetry>,
}

impl DataPath {
    /// Serves every configured listener on its socket on the per-core runtimes, lists each
    /// socket in `handoff`, and returns the bound addresses.
    fn serve_listeners(
        &self,
        config: &Config,
        mut sockets: BTreeMap<String, std::net::TcpListener>,
        handoff: &mut Vec<upgrade::HandoffSocket>,
    ) -> Result<BTreeMap<String, SocketAddr>, StartError> {
        let mut addresses = BTreeMap::new();
        for listener_config in &config.listeners {
            let io_err = |e| StartError::Io(format!("listener {:?}", listener_config.name), e);
            let socket = sockets.remove(&listener_config.name).ok_or_else(|| {
                io_err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no socket for this listener",
                ))
            })?;
            socket.set_nonblocking(true).map_err(io_err)?;
            let address = socket.local_addr().map_err(io_err)?;
            handoff.push(upgrade::HandoffSocket {
                name: listener_config.name.clone(),
                kind: upgrade::SocketKind::Tcp,
                fd: socket.try_clone().map_err(io_err)?.into(),
            });
            addresses.insert(listener_config.name.clone(), address);
            let lc = Arc::new(listener_config.clone());
            tracing::info!(listener = %lc.name, protocol = lc.protocol.as_str(), %address, "listening");
            let serve_on = if lc.protocol.is_http() {
                http::serve_on
            } else {
                tcp::serve_on
            };
            let workers = workers::Workers::get(config.server.workers).map_err(io_err)?;
            upstream::idle::start_sweeps(workers);
            serve_on(
                workers,
                &socket,
                lc,
                self.routing.clone(),
                self.shutdown.clone(),
                self.tls.clone(),
                self.telemetry.clone(),
            )
            .map_err(io_err)?;
        }
        Ok(addresses)
    }

    /// Serves one listener on this runtime until shutdown.
    fn spawn(
        &self,
        socket: tokio::net::TcpListener,
        lc: Arc<config::ListenerConfig>,
    ) -> tokio::task::JoinHandle<()> {
        let (routing, shutdown, tls, telemetry) = (
            self.routing.clone(),
            self.shutdown.clone(),
            self.tls.clone(),
            self.telemetry.clone(),
        );
        if lc.protocol.is_http() {
            tokio::spawn(http::serve(socket, lc, routing, shutdown, tls, telemetry))
        } else {
            tokio::spawn(tcp::serve(socket, lc, routing, shutdown, tls, telemetry))
        }
    }

    /// How the registry serves the ports it opens: exactly like configured listeners.
    fn for_registrations(&self) -> registration::ServeListener {
        let data_path = self.clone();
        Arc::new(move |socket, lc| data_path.spawn(socket, lc))
    }
}

/// The admin listener's socket (inherited, or bound here), listed in `handoff`; served once
/// the status page's sources exist (until then connections wait in the backlog).
fn admin_socket(
    config: &Config,
    inherited: &mut listener::Inherited,
    handoff: &mut Vec<upgrade::HandoffSocket>,
) -> Result<Option<(tokio::net::TcpListener, SocketAddr)>, StartError> {
    let Some(addr) = config.server.admin_listen else {
        return Ok(None);
    };
    let admin_err = |e| StartError::Io(format!("admin listener {addr}"), e);
    let socket = match inherited.take_tcp(upgrade::ADMIN_SOCKET) {
        Some((socket, _)) if socket.local_addr().ok() == Some(addr) || addr.port() == 0 => socket,
        _ => listener::bind(addr).map_err(admin_err)?,
    };
    socket.set_nonblocking(true).map_err(admin_err)?;
    let address = socket.local_addr().map_err(admin_err)?;
    handoff.push(upgrade::HandoffSocket {
        name: upgrade::ADMIN_SOCKET.into(),
        kind: upgrade::SocketKind::Tcp,
        fd: socket.try_clone().map_err(admin_err)?.into(),
    });
    let socket = tokio::net::TcpListener::from_std(socket).map_err(admin_err)?;
    Ok(Some((socket, address)))
}

/// The management sockets as listed for a hand-over, under their `@mgmt…` names.
fn mgmt_handoff(sockets: &mgmt::Sockets) -> Result<Vec<upgrade::HandoffSocket>, StartError> {
    let mgmt::HandedSockets { unix, tcp } = sockets
        .duplicates()
        .map_err(|e| StartError::Io("management socket".into(), e))?;
    let unix = unix.map(|socket| upgrade::HandoffSocket {
        name: upgrade::MGMT_SOCKET.into(),
        kind: upgrade::SocketKind::Unix,
        fd: socket.into(),
    });
    let tcp = tcp.map(|socket| upgrade::HandoffSocket {
        name: upgrade::MGMT_TCP_SOCKET.into(),
        kind: upgrade::SocketKind::Tcp,
        fd: socket.into(),
    });
    Ok(unix.into_iter().chain(tcp).collect())
}

/// The management API's accept loops, behind a gate the upgrader closes while it hands
/// over (new management connections then wait in the backlog for the successor).
#[derive(Default)]
struct GatedMgmt(Arc<listener::AcceptGate>);

impl upgrade::HandOver for GatedMgmt {
    fn name(&self) -> &str {
        "the management API"
    }

    fn quiesce(&self) -> upgrade::HandOverStep<'_> {
        self.0.pause();
        Box::pin(std::future::ready(Ok(())))
    }

    fn resume(&self) -> upgrade::HandOverStep<'_> {
        self.0.resume();
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The state writer's part in a hand-over: closed before the successor opens the store
/// (never two writers), reopened if the hand-over fails.
/// Fleet mode across an upgrade: the old process stops following etcd and heartbeating
/// (storing the revision it applied) but leaves its lease alone; the successor renews the
/// same lease and rewrites the same key, so the node never leaves the fleet's list, and
/// resumes the watch from the stored revision.
struct FleetHandOver(cluster::Cluster);

impl upgrade::HandOver for FleetHandOver {
    fn name(&self) -> &str {
        "the fleet sync"
    }

    fn quiesce(&self) -> upgrade::HandOverStep<'_> {
        Box::pin(async {
            self.0.pause().await?;
            Ok(())
        })
    }

    fn resume(&self) -> upgrade::HandOverStep<'_> {
        Box::pin(async {
            self.0.resume();
            Ok(())
        })
    }
}

impl upgrade::HandoffExtras for FleetHandOver {
    fn handoff_sockets(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<upgrade::HandoffSocket>> + Send + '_>>
    {
        Box::pin(async { Vec::new() })
    }

    fn handoff_data(&self) -> upgrade::HandoffData<'_> {
        Box::pin(async {
            self.0
                .lease()
                .map(|l| vec![(cluster::HANDOFF_LEASE.to_string(), l.to_string())])
                .unwrap_or_default()
        })
    }
}

struct StateWriter(StateHandle);

impl upgrade::HandOver for StateWriter {
    fn name(&self) -> &str {
        "the state store"
    }

    fn quiesce(&self) -> upgrade::HandOverStep<'_> {
        Box::pin(async {
            self.0.close().await;
            Ok(())
        })
    }

    fn resume(&self) -> upgrade::HandOverStep<'_> {
        Box::pin(async {
            self.0.reopen().await?;
            Ok(())
        })
    }
}

impl mgmt::Accepting for GatedMgmt {
    fn unix(&self, socket: tokio::net::UnixListener) -> mgmt::Incoming<tokio::net::UnixStream> {
        Box::pin(listener::GatedIncoming::new(socket, self.0.clone()))
    }

    fn tcp(&self, socket: tokio::net::TcpListener) -> mgmt::Incoming<tokio::net::TcpStream> {
        Box::pin(listener::GatedIncoming::new(socket, self.0.clone()))
    }
}

/// Gives the sockets bound here (not inherited) to systemd's fd store, when it has one, so
/// that even a plain restart finds them open.
fn store_in_systemd(handoff: &[upgrade::HandoffSocket], bound_here: &[String]) {
    let stored: Vec<(&str, std::os::fd::BorrowedFd<'_>)> = handoff
        .iter()
        .filter(|s| bound_here.contains(&s.name))
        .map(|s| (s.name.as_str(), std::os::fd::AsFd::as_fd(&s.fd)))
        .collect();
    systemd::store(&stored);
}

/// Where the upgrader keeps its hand-over socket: beside the management socket, else the
/// state directory.
fn runtime_dir(config: &Config) -> std::path::PathBuf {
    config
        .server
        .mgmt_socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(
            || config.server.state_dir.clone(),
            std::path::Path::to_path_buf,
        )
}

/// The configured listeners a registration may ask to be served on.
fn known_listeners(
    config: &Config,
    addresses: &BTreeMap<String, SocketAddr>,
) -> Vec<registration::KnownListener> {
    config
        .listeners
        .iter()
        .filter_map(|l| {
            let bound = *addresses.get(&l.name)?;
            Some(registration::KnownListener {
                name: l.name.clone(),
                protocol: l.protocol,
                bound,
            })
        })
        .collect()
}

/// Serves `/metrics`, `/healthz`, `/readyz` and, when enabled, the status page.
fn serve_admin(
    config: &Config,
    socket: tokio::net::TcpListener,
    address: SocketAddr,
    telemetry: &Arc<telemetry::Telemetry>,
    shutdown: &Shutdown,
    status: mgmt::StatusSources,
) {
    let ui = config.server.admin_ui.then(|| {
        let history = Arc::new(telemetry::history::History::new(
            telemetry.metrics().clone(),
        ));
        let stop = shutdown.clone();
        tokio::spawn(history.clone().run(async move { stop.triggered().await }));
        Arc::new(mgmt::StatusPage::new(status, history)) as Arc<dyn telemetry::admin::StatusReport>
    });
    tokio::spawn(telemetry::admin::serve(
        socket,
        telemetry.clone(),
        shutdown.clone(),
        ui,
    ));
    tracing::info!(%address, ui = config.server.admin_ui, "admin endpoints listening");
}

impl Drop for Daemon {
    /// The HTTP listeners run on process-wide workers, which outlive a daemon dropped
    /// without [`stop`](Self::stop) (in tests): tell them to stop serving it.
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// The sockets this process was started with: from the previous proxyd (an upgrade) and
/// from systemd, taken by [`inherit`].
pub struct Inheritance {
    handoff: Option<upgrade::Handoff>,
    sockets: listener::Inherited,
}

/// Takes the sockets this process inherits (in order: from the previous proxyd, from
/// systemd) and clears the environment variables that named them.
///
/// Call it before the runtime (or any other thread) starts: changing the environment while
/// other threads may read it is unsound.
pub fn inherit(config: &Config) -> Result<Inheritance, StartError> {
    let (handoff, mut sockets) = match upgrade::receive()
        .map_err(|e| StartError::Io("upgrade handoff".into(), std::io::Error::other(e)))?
    {
        Some((handoff, inherited)) => (Some(handoff), inherited),
        None => (None, listener::Inherited::default()),
    };
    let only = match config.listeners.as_slice() {
        [one] => Some(one.name.as_str()),
        _ => None,
    };
    sockets.merge(listener::Inherited::from_systemd(only));
    Ok(Inheritance { handoff, sockets })
}

/// Runs the daemon until SIGTERM/SIGINT, a drain request, or a handoff to a successor
/// (SIGUSR2 or the Upgrade API call), then drains and returns. `inherited` comes from
/// [`inherit`], called before the runtime started.
pub async fn run(config: Config, inherited: Inheritance) -> Result<(), StartError> {
    use tokio::signal::unix::{signal, SignalKind};

    // The handlers exist before the listeners serve: a SIGTERM that arrives while the
    // daemon is still starting is then a drain once it has started, not a kill.
    let io = |what: &'static str| move |e| StartError::Io(what.to_string(), e);
    let mut term = signal(SignalKind::terminate()).map_err(io("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("SIGINT handler"))?;
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(io("SIGUSR2 handler"))?;
    let Inheritance { handoff, sockets } = inherited;
    let daemon = Daemon::start_with(config, sockets).await?;
    if let Some(handoff) = handoff {
        if let Err(e) = handoff.ready() {
            // The parent has given up on us (and will kill us): do not linger.
            daemon.stop().await;
            return Err(StartError::Io(
                "upgrade handoff".into(),
                std::io::Error::other(e),
            ));
        }
    }
    systemd::notify(&[sd_notify::NotifyState::Ready]);

    let shutdown = daemon.shutdown.clone();
    let timeout = loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: shutting down");
                break daemon.config.server.shutdown_timeout;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: shutting down");
                break daemon.config.server.shutdown_timeout;
            }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: upgrading");
                let upgrader = daemon.upgrader.clone();
                tokio::spawn(async move {
                    let _ = upgrader.upgrade(None).await;
                });
            }
            _ = shutdown.triggered() => {
                if shutdown.is_handed_over() {
                    tracing::info!("handed over; draining");
                } else {
                    tracing::info!("drain requested");
                }
                break shutdown.requested_drain_timeout().unwrap_or(daemon.config.server.drain_timeout);
            }
        }
    };
    if !shutdown.is_handed_over() {
        systemd::notify(&[sd_notify::NotifyState::Stopping]);
    }
    daemon.finish(timeout).await;
    Ok(())
}

/// Lets `/readyz` say when the fleet view is stale and `/metrics` read the applied etcd
/// revision and the lag (telemetry does not know the cluster; it is handed functions).
fn watch_cluster(telemetry: &telemetry::Telemetry, cluster: Option<&cluster::Cluster>) {
    let Some(cluster) = cluster else { return };
    let for_ready = cluster.clone();
    telemetry.note_readiness_with(Box::new(move || for_ready.status().readiness()));
    let cluster = cluster.clone();
    telemetry.metrics().read_cluster_with(Box::new(move || {
        let s = cluster.status();
        vec![telemetry::ClusterReading {
            connected: s.connected,
            applied_revision: s.applied_revision,
            lag_writes: s.lag_writes,
            stale_seconds: s.stale_for.map_or(0, |d| d.as_secs()),
            full_syncs: s.full_syncs,
        }]
    }));
}

/// Lets `/metrics` read certificate expiries and discovery sources' condition at scrape
/// time (telemetry imports neither part; it is handed functions).
fn watch_in_metrics(
    metrics: &telemetry::Metrics,
    tls: &Arc<tls::Tls>,
    discovery: &discovery::Discovery,
) {
    // Weak: the metrics live inside parts the TLS tables hold.
    let tls = Arc::downgrade(tls);
    metrics.read_certificates_with(Box::new(move || {
        tls.upgrade()
            .map(|tls| {
                tls.certificates()
                    .into_iter()
                    .map(|c| telemetry::CertificateExpiry {
                        name: c.name,
                        source: c.source.as_str(),
                        not_after: c.not_after,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }));
    let discovery = discovery.clone();
    metrics.read_discovery_with(Box::new(move || {
        discovery
            .reports()
            .into_iter()
            .map(|r| telemetry::SourceCondition {
                up: !r.is_failing(),
                kind: r.kind.as_str(),
                members: r.members,
                pool: r.pool,
            })
            .collect()
    }));
}
