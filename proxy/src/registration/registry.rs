//! The registry of live registrations: which instance serves which route, which ports were
//! opened for them, and the hold timers of routes whose last instance left.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::{Hold, RegistrationConfig};
use crate::config::{ListenerConfig, Protocol};
use crate::discovery::{check_member_address, Origin, RegisteredRoute};
use crate::state::{Source, StateHandle, Upstream};

/// What a service announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Optional service name, for listings.
    pub name: String,
    /// Where the proxy dials it: `host:port` or `unix:/path`.
    pub endpoint: String,
    /// The listener port it is served on.
    pub port: u16,
    /// `http` or `tcp`.
    pub protocol: Protocol,
    /// Exact host or `*.suffix` (HTTP); `None` for any host.
    pub host: Option<String>,
    /// Path prefix (HTTP); `/` when empty.
    pub path_prefix: String,
}

/// Why a registration was refused.
#[derive(Debug, Error)]
pub enum RegisterError {
    /// A field is malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The announce field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The port is outside `registration.port_range`.
    #[error("port {port} is outside registration.port_range {low}-{high}")]
    PortNotAllowed {
        /// Requested port.
        port: u16,
        /// Range start.
        low: u16,
        /// Range end.
        high: u16,
    },
    /// The claim collides with something the config file owns or with another protocol.
    #[error("{0}")]
    Conflict(String),
    /// The port could not be opened.
    #[error("cannot open port {port}: {source}")]
    Bind {
        /// Requested port.
        port: u16,
        /// Cause.
        source: std::io::Error,
    },
}

/// A registration as listings show it.
#[derive(Debug, Clone)]
pub struct RegistrationInfo {
    /// Unique id (per daemon run).
    pub id: u64,
    /// What it announced.
    pub claim: Claim,
    /// The route it serves.
    pub route: String,
    /// The listener it is served on.
    pub listener: String,
    /// The address that listener is bound to.
    pub address: SocketAddr,
    /// When it registered.
    pub since: SystemTime,
}

/// A registered route as listings show it.
#[derive(Debug, Clone)]
pub struct RouteInfo {
    /// Route name.
    pub route: String,
    /// Listener it is served on.
    pub listener: String,
    /// Live instances.
    pub instances: usize,
    /// While held (no live instance): until when.
    pub held_until: Option<SystemTime>,
    /// Requests or connections waiting for an instance.
    pub waiting: usize,
}

struct RouteBook {
    pool: String,
    listener: String,
    port: u16,
    hold: Arc<Hold>,
    instances: BTreeSet<u64>,
    held_until: Option<SystemTime>,
    /// Bumped whenever the last instance leaves, so a stale hold timer does nothing.
    generation: u64,
}

struct OpenPort {
    listener: String,
    protocol: Protocol,
    address: SocketAddr,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct Book {
    routes: BTreeMap<String, RouteBook>,
    ports: BTreeMap<u16, OpenPort>,
    registrations: BTreeMap<u64, RegistrationInfo>,
}

/// A configured listener a registration may join.
#[derive(Debug, Clone)]
pub struct KnownListener {
    /// Listener name.
    pub name: String,
    /// Its protocol.
    pub protocol: Protocol,
    /// Where it is bound.
    pub bound: SocketAddr,
}

/// Starts the accept loop of a port opened for registrations (the daemon's own HTTP or TCP
/// serving, with whatever that needs); aborting the task closes the port.
pub type ServeListener =
    Arc<dyn Fn(tokio::net::TcpListener, Arc<ListenerConfig>) -> JoinHandle<()> + Send + Sync>;

/// Live registrations and what they brought up.
pub struct Registry {
    config: RegistrationConfig,
    state: StateHandle,
    listeners: Vec<KnownListener>,
    serve: ServeListener,
    book: Mutex<Book>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.config)
            .finish()
    }
}

/// A live registration: the lease. End it with [`Registration::end`]; dropping it ends it too.
#[derive(Debug)]
pub struct Registration {
    info: RegistrationInfo,
    registry: Arc<Registry>,
    ended: bool,
}

impl Registration {
    /// What was registered.
    pub fn info(&self) -> &RegistrationInfo {
        &self.info
    }

    /// Ends the lease: the instance leaves its pool; its route is held if it was the last.
    pub async fn end(mut self) {
        self.ended = true;
        self.registry.end(self.info.id).await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if !self.ended {
            let registry = self.registry.clone();
            let id = self.info.id;
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { registry.end(id).await });
            }
        }
    }
}

/// Checks and lower-cases a claimed host: `name` or `*.suffix`.
fn normalise_host(host: &str) -> Result<String, String> {
    let host = host.trim().to_ascii_lowercase();
    let bare = host.strip_prefix("*.").unwrap_or(&host);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && !bare.starts_with('.')
        && !bare.ends_with('.')
        && bare
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(host)
    } else {
        Err(format!("{host:?} is not a host name or *.suffix"))
    }
}

impl Registry {
    /// A registry for a daemon whose configured listeners are `listeners`.
    pub fn new(
        config: RegistrationConfig,
        state: StateHandle,
        listeners: Vec<KnownListener>,
        serve: ServeListener,
    ) -> Registry {
        Registry {
            config,
            state,
            listeners,
            serve,
            book: Mutex::new(Book::default()),
            next_id: AtomicU64::new(1),
        }
    }

    /// The `[registration]` settings.
    pub fn config(&self) -> &RegistrationConfig {
        &self.config
    }

    /// Validates a claim and normalises it.
    fn check(&self, mut claim: Claim) -> Result<Claim, RegisterError> {
        check_member_address(&claim.endpoint).map_err(|reason| RegisterError::Invalid {
            field: "endpoint",
            reason,
        })?;
        if claim.port == 0 {
            return Err(RegisterError::Invalid {
                field: "port",
                reason: "must be 1-65535".into(),
            });
        }
        if !self.config.port_range.contains(&claim.port) {
            return Err(RegisterError::PortNotAllowed {
                port: claim.port,
                low: *self.config.port_range.start(),
                high: *self.config.port_range.end(),
            });
        }
        claim.host = match claim.host.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(h) => Some(normalise_host(h).map_err(|reason| RegisterError::Invalid {
                field: "host",
                reason,
            })?),
        };
        if claim.path_prefix.is_empty() {
            claim.path_prefix = "/".into();
        }
        let p = &claim.path_prefix;
        if !p.starts_with('/')
            || p.len() > 1024
            || p.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
        {
            return Err(RegisterError::Invalid {
                field: "path_prefix",
                reason: format!("{p:?} must be a plain path starting with '/'"),
            });
        }
        if claim.protocol == Protocol::Tcp && (claim.host.is_some() || claim.path_prefix != "/") {
            return Err(RegisterError::Invalid {
                field: "protocol",
                reason: "tcp registrations take the whole port: no host or path_prefix".into(),
            });
        }
        // Routes from the config file own their hosts.
        let snap = self.state.snapshot();
        if let Some(host) = &claim.host {
            if let Some(r) = snap.state.routes().find(|r| {
                r.source == Source::Declarative && r.host.as_deref() == Some(host.as_str())
            }) {
                return Err(RegisterError::Conflict(format!(
                    "host {host:?} is claimed by route {:?} of the config file",
                    r.name
                )));
            }
        }
        Ok(claim)
    }

    /// Registers an instance: opens the port if needed, adds the route and the instance,
    /// and wakes requests held for the route.
    pub async fn register(self: &Arc<Self>, claim: Claim) -> Result<Registration, RegisterError> {
        let claim = self.check(claim)?;
        let mut book = self.book.lock().await;
        let (listener, address) = self.listener_for(&mut book, &claim)?;
        let route = format!(
            "registered:{}:{}:{}",
            claim.port,
            claim.host.as_deref().unwrap_or("*"),
            claim.path_prefix
        );
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = book
            .routes
            .entry(route.clone())
            .or_insert_with(|| RouteBook {
                pool: route.clone(),
                listener: listener.clone(),
                port: claim.port,
                hold: Arc::new(Hold::new(self.config.queue_limit, self.config.max_wait)),
                instances: BTreeSet::new(),
                held_until: None,
                generation: 0,
            });
        entry.instances.insert(id);
        entry.held_until = None;
        let hold = entry.hold.clone();
        let registered = RegisteredRoute {
            listener: listener.clone(),
            protocol: claim.protocol,
            host: claim.host.clone(),
            path_prefix: claim.path_prefix.clone(),
            pool: entry.pool.clone(),
            hold: hold.clone(),
        };
        let (route_name, pool, endpoint) =
            (route.clone(), entry.pool.clone(), claim.endpoint.clone());
        self.state
            .update_membership(move |m| {
                m.set_route(&route_name, registered);
                m.set_members(&pool, Origin::Registered(id), vec![Upstream::new(endpoint)]);
            })
            .await;
        // Only now is the instance in the routing table waiters will look at.
        hold.set_live();
        let info = RegistrationInfo {
            id,
            claim,
            route,
            listener,
            address,
            since: SystemTime::now(),
        };
        book.registrations.insert(id, info.clone());
        tracing::info!(id, route = %info.route, endpoint = %info.claim.endpoint, "service registered");
        Ok(Registration {
            info,
            registry: self.clone(),
            ended: false,
        })
    }

    /// The listener for the claimed port: a configured one, one already opened for
    /// registrations, or a new one.
    fn listener_for(
        &self,
        book: &mut Book,
        claim: &Claim,
    ) -> Result<(String, SocketAddr), RegisterError> {
        if let Some(l) = self.listeners.iter().find(|l| l.bound.port() == claim.port) {
            if l.protocol != claim.protocol {
                return Err(RegisterError::Conflict(format!(
                    "port {} is listener {:?} of the config file, which speaks {}",
                    claim.port,
                    l.name,
                    l.protocol.as_str()
                )));
            }
            if claim.protocol == Protocol::Tcp {
                let snap = self.state.snapshot();
                let taken = snap
                    .state
                    .tcp_routes()
                    .find(|r| r.listener == l.name)
                    .map(|r| r.pool.clone());
                if let Some(pool) = taken {
                    return Err(RegisterError::Conflict(format!(
                        "listener {:?} already forwards to pool {pool:?}",
                        l.name
                    )));
                }
            }
            return Ok((l.name.clone(), l.bound));
        }
        if let Some(open) = book.ports.get(&claim.port) {
            if open.protocol != claim.protocol {
                return Err(RegisterError::Conflict(format!(
                    "port {} is already open for {} registrations",
                    claim.port,
                    open.protocol.as_str()
                )));
            }
            return Ok((open.listener.clone(), open.address));
        }
        let address = SocketAddr::new(self.config.address, claim.port);
        let bind_error = |source| RegisterError::Bind {
            port: claim.port,
            source,
        };
        let socket = crate::listener::bind(address).map_err(bind_error)?;
        socket.set_nonblocking(true).map_err(bind_error)?;
        let bound = socket.local_addr().map_err(bind_error)?;
        let socket = tokio::net::TcpListener::from_std(socket).map_err(bind_error)?;
        let name = format!("registered-{}", claim.port);
        let listener = Arc::new(ListenerConfig {
            name: name.clone(),
            protocol: claim.protocol,
            address,
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_body_bytes: 0,
        });
        if !matches!(claim.protocol, Protocol::Http | Protocol::Tcp) {
            return Err(RegisterError::Invalid {
                field: "protocol",
                reason: format!(
                    "{} registrations are not supported; use http or tcp",
                    claim.protocol.as_str()
                ),
            });
        }
        let accept = (self.serve)(socket, listener);
        tracing::info!(listener = %name, address = %bound, "opened a port for registrations");
        book.ports.insert(
            claim.port,
            OpenPort {
                listener: name.clone(),
                protocol: claim.protocol,
                address: bound,
                accept,
            },
        );
        Ok((name, bound))
    }

    /// Ends registration `id`: removes the instance; holds the route if it was the last one.
    async fn end(self: &Arc<Self>, id: u64) {
        let mut book = self.book.lock().await;
        let Some(info) = book.registrations.remove(&id) else {
            return;
        };
        let Some(entry) = book.routes.get_mut(&info.route) else {
            return;
        };
        entry.instances.remove(&id);
        let last = entry.instances.is_empty();
        let pool = entry.pool.clone();
        let hold = entry.hold.clone();
        if last {
            entry.generation += 1;
            entry.held_until = Some(SystemTime::now() + self.config.hold);
            // Held before the instance leaves the table, so no request sees "no instance, no hold".
            hold.hold_until(tokio::time::Instant::now() + self.config.hold);
        }
        let generation = entry.generation;
        self.state
            .set_members(&pool, Origin::Registered(id), Vec::new())
            .await;
        tracing::info!(id, route = %info.route, held = last, "registration ended");
        if last {
            let registry = self.clone();
            let route = info.route.clone();
            let wait = self.config.hold;
            drop(book);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                registry.expire(&route, generation).await;
            });
        }
    }

    /// The hold of `route` ran out: remove it (and its port, if opened only for it) unless
    /// an instance came back meanwhile.
    async fn expire(&self, route: &str, generation: u64) {
        let mut book = self.book.lock().await;
        let Some(entry) = book.routes.get(route) else {
            return;
        };
        if !entry.instances.is_empty() || entry.generation != generation {
            return;
        }
        let (port, listener, hold) = (entry.port, entry.listener.clone(), entry.hold.clone());
        book.routes.remove(route);
        let name = route.to_string();
        self.state
            .update_membership(move |m| m.remove_route(&name))
            .await;
        hold.end();
        tracing::info!(route, "hold ended without a registration; route removed");
        let port_in_use = book.routes.values().any(|r| r.listener == listener);
        if !port_in_use {
            if let Some(open) = book.ports.remove(&port) {
                open.accept.abort();
                tracing::info!(listener = %open.listener, address = %open.address, "closed the port opened for registrations");
            }
        }
    }

    /// Live registrations, by id.
    pub async fn registrations(&self) -> Vec<RegistrationInfo> {
        self.book
            .lock()
            .await
            .registrations
            .values()
            .cloned()
            .collect()
    }

    /// Registered routes, live or held, by name.
    pub async fn routes(&self) -> Vec<RouteInfo> {
        let book = self.book.lock().await;
        book.routes
            .iter()
            .map(|(name, r)| RouteInfo {
                route: name.clone(),
                listener: r.listener.clone(),
                instances: r.instances.len(),
                held_until: r.held_until,
                waiting: r.hold.waiting(),
            })
            .collect()
    }
}
