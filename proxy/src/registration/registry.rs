//! The registry of live registrations: which instance serves which route, which ports were
//! opened for them, and the hold timers of routes whose last instance left.
//!
//! Across an upgrade, each port opened for registrations travels to the new process as a
//! handoff socket named `@registration:<port> <protocol> <route>...`, where a route is
//! `[host]/path-prefix`. The new process serves the port at once and holds those routes
//! (see [`Registry::adopt`]) until their services register with it again. Every route
//! (those on configured listeners too) also travels in the handoff data under
//! [`HANDOFF_ROUTES`], with the certificates its instances brought.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::RegistrationConfig;
use crate::config::ListenerConfig;
use crate::discovery::check_member_address;
use crate::state::{
    check_path, normalise_host, Origin, Protocol, RegisteredRoute, Source, StateHandle, Upstream,
};
use crate::tls::{Tls, TlsError};
use crate::upgrade::{HandoffExtras, HandoffSocket, SocketKind};
use crate::upstream::Hold;

/// Name prefix of the handoff sockets of ports opened for registrations.
pub const HANDOFF_PREFIX: &str = "@registration:";

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
    /// A certificate to terminate TLS with on the port.
    pub tls: Option<ClaimTls>,
}

impl Claim {
    /// What the port speaks for this claim: with a certificate, HTTP is served as `https`
    /// and TCP as `tls`.
    pub fn serving_protocol(&self) -> Protocol {
        match (self.protocol, self.tls.is_some()) {
            (Protocol::Http, true) => Protocol::Https,
            (Protocol::Tcp, true) => Protocol::Tls,
            (p, _) => p,
        }
    }
}

/// A certificate chain and its key, as PEM, brought by a registration.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClaimTls {
    /// The chain, leaf first.
    pub certificate_pem: String,
    /// The private key.
    pub private_key_pem: String,
}

impl std::fmt::Debug for ClaimTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimTls").finish_non_exhaustive()
    }
}

/// Whether a port speaking `port` can serve a claim whose port speaks `claim`: the same
/// protocol, or a claim without a certificate on a port that terminates TLS with
/// certificates from elsewhere (files, the API, ACME, other registrations).
fn fits(port: Protocol, claim: Protocol) -> bool {
    port == claim
        || matches!(
            (port, claim),
            (Protocol::Https, Protocol::Http) | (Protocol::Tls, Protocol::Tcp)
        )
}

/// Key of the registered routes in the handoff data.
pub const HANDOFF_ROUTES: &str = "registration-routes";

/// A registered route as it travels to the next process in the handoff data: routes on
/// configured listeners (whose sockets travel anyway) are held there like those on ports
/// opened for registrations, and certificates are served from the first connection.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct HandedRoute {
    port: u16,
    host: Option<String>,
    path_prefix: String,
    /// On a listener of the config file (not a port opened for registrations).
    configured: bool,
    certificates: Vec<ClaimTls>,
}

/// The name a registration's certificate is kept under in the certificate cache.
fn cert_name(id: u64) -> String {
    format!("registered:{id}")
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
    /// The pool its instances are members of.
    pub pool: String,
    /// Exact host or `*.suffix` it matches (`None`: any host).
    pub host: Option<String>,
    /// Path prefix it matches.
    pub path_prefix: String,
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
    /// What the route matches: host (`None` for any) and path prefix.
    host: Option<String>,
    path_prefix: String,
    hold: Arc<Hold>,
    instances: BTreeSet<u64>,
    /// Certificates brought by instances (by registration id), kept while the route
    /// lives: one of an instance that left serves on until another brings one.
    certs: BTreeMap<u64, ClaimTls>,
    held_until: Option<SystemTime>,
    /// Bumped whenever the last instance leaves, so a stale hold timer does nothing.
    generation: u64,
}

struct OpenPort {
    listener: String,
    protocol: Protocol,
    address: SocketAddr,
    accept: JoinHandle<()>,
    /// A duplicate of the listening socket, offered to the next process on an upgrade.
    socket: OwnedFd,
}

#[derive(Default)]
struct Book {
    routes: BTreeMap<String, RouteBook>,
    ports: BTreeMap<u16, OpenPort>,
    registrations: BTreeMap<u64, RegistrationInfo>,
}

/// How long a registered route whose hold ran out keeps answering 503 on a port that stays
/// open, before it is removed.
pub const EXPIRED_ROUTE_ANSWER: std::time::Duration = std::time::Duration::from_secs(600);

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
    tls: Option<Arc<Tls>>,
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

    /// Lets the stream go while this process stops (a handoff or a shutdown) but keeps the
    /// instance in its pool, so requests this process still drains reach it; the service
    /// registers with the next process meanwhile.
    pub fn keep_while_draining(mut self) {
        self.ended = true;
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

/// The name of the route a claim on `port` for `host` and `path_prefix` serves.
fn route_name(port: u16, host: Option<&str>, path_prefix: &str) -> String {
    format!("registered:{port}:{}:{path_prefix}", host.unwrap_or("*"))
}

/// The listener settings of a port opened for registrations.
fn port_listener(port: u16, protocol: Protocol, address: SocketAddr) -> Arc<ListenerConfig> {
    Arc::new(ListenerConfig {
        name: format!("registered-{port}"),
        protocol,
        address,
        max_connections: 10_000,
        max_connections_per_ip: None,
        rate_limit: None,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_header_bytes: 64 * 1024,
        max_body_bytes: 0,
    })
}

/// A port opened for registrations as it travels in a handoff socket name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PortHandoff {
    port: u16,
    protocol: Protocol,
    /// Host (or `None` for any host) and path prefix of each route on the port.
    routes: Vec<(Option<String>, String)>,
}

impl PortHandoff {
    /// `@registration:<port> <protocol> <route>...`; hosts and path prefixes hold no
    /// whitespace, and a host holds no `/`, so the parts split back unambiguously.
    fn name(&self) -> String {
        let mut name = format!("{HANDOFF_PREFIX}{} {}", self.port, self.protocol.as_str());
        for (host, path) in &self.routes {
            name.push(' ');
            name.push_str(host.as_deref().unwrap_or(""));
            name.push_str(path);
        }
        name
    }

    fn parse(name: &str) -> Result<PortHandoff, String> {
        let rest = name
            .strip_prefix(HANDOFF_PREFIX)
            .ok_or_else(|| format!("{name:?} does not start with {HANDOFF_PREFIX}"))?;
        let mut parts = rest.split_whitespace();
        let port = parts
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{name:?} names no port"))?;
        let protocol = match parts.next() {
            Some("http") => Protocol::Http,
            Some("tcp") => Protocol::Tcp,
            Some("https") => Protocol::Https,
            Some("tls") => Protocol::Tls,
            other => return Err(format!("{name:?}: unknown protocol {other:?}")),
        };
        let routes = parts
            .map(|route| {
                let slash = route
                    .find('/')
                    .ok_or_else(|| format!("{name:?}: route {route:?} has no path"))?;
                let host = Some(&route[..slash]).filter(|h| !h.is_empty());
                Ok((host.map(str::to_string), route[slash..].to_string()))
            })
            .collect::<Result<_, String>>()?;
        Ok(PortHandoff {
            port,
            protocol,
            routes,
        })
    }
}

impl Registry {
    /// A registry for a daemon whose configured listeners are `listeners`.
    pub fn new(
        config: RegistrationConfig,
        state: StateHandle,
        tls: Option<Arc<Tls>>,
        listeners: Vec<KnownListener>,
        serve: ServeListener,
    ) -> Registry {
        Registry {
            config,
            state,
            tls,
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
        let (host, path_prefix) = self.check_route(
            claim.port,
            claim.protocol,
            claim.host.take(),
            std::mem::take(&mut claim.path_prefix),
        )?;
        claim.host = host;
        claim.path_prefix = path_prefix;
        Ok(claim)
    }

    /// Validates what a route on `port` claims and normalises its host and path prefix.
    fn check_route(
        &self,
        port: u16,
        protocol: Protocol,
        host: Option<String>,
        mut path_prefix: String,
    ) -> Result<(Option<String>, String), RegisterError> {
        if port == 0 {
            return Err(RegisterError::Invalid {
                field: "port",
                reason: "must be 1-65535".into(),
            });
        }
        if !self.config.port_range.contains(&port) {
            return Err(RegisterError::PortNotAllowed {
                port,
                low: *self.config.port_range.start(),
                high: *self.config.port_range.end(),
            });
        }
        let host = match host.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(h) => Some(normalise_host(h).map_err(|reason| RegisterError::Invalid {
                field: "host",
                reason,
            })?),
        };
        if path_prefix.is_empty() {
            path_prefix = "/".into();
        }
        check_path(&path_prefix).map_err(|reason| RegisterError::Invalid {
            field: "path_prefix",
            reason,
        })?;
        if protocol.is_stream() && (host.is_some() || path_prefix != "/") {
            return Err(RegisterError::Invalid {
                field: "protocol",
                reason: "tcp registrations take the whole port: no host or path_prefix".into(),
            });
        }
        // Routes from the config file own their hosts.
        let snap = self.state.snapshot();
        if let Some(host) = &host {
            if let Some(r) = snap
                .state
                .routes_with_host(host)
                .find(|r| r.source == Source::Declarative)
            {
                return Err(RegisterError::Conflict(format!(
                    "host {host:?} is claimed by route {:?} of the config file",
                    r.name
                )));
            }
        }
        Ok((host, path_prefix))
    }

    /// Registers an instance: opens the port if needed, adds the route and the instance,
    /// and wakes requests held for the route.
    pub async fn register(self: &Arc<Self>, claim: Claim) -> Result<Registration, RegisterError> {
        let claim = self.check(claim)?;
        // Nothing is added before the lock is held: a caller that goes away while waiting
        // for it leaves nothing behind.
        let mut book = self.book.lock().await;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // The certificate is checked (and served) before any port opens for it.
        let tls = self.add_certificate(id, &claim)?;
        let (listener, address) = match self.listener_for(&mut book, &claim) {
            Ok(found) => found,
            Err(e) => {
                if let Some(tls) = tls {
                    tls.remove_registered(&cert_name(id));
                }
                return Err(e);
            }
        };
        let route = route_name(claim.port, claim.host.as_deref(), &claim.path_prefix);
        let entry = book
            .routes
            .entry(route.clone())
            .or_insert_with(|| RouteBook {
                pool: route.clone(),
                listener: listener.clone(),
                port: claim.port,
                host: claim.host.clone(),
                path_prefix: claim.path_prefix.clone(),
                hold: Arc::new(Hold::new(self.config.queue_limit, self.config.max_wait)),
                instances: BTreeSet::new(),
                certs: BTreeMap::new(),
                held_until: None,
                generation: 0,
            });
        entry.instances.insert(id);
        if let (Some(_), Some(cert)) = (tls, &claim.tls) {
            entry.certs.insert(id, cert.clone());
        }
        self.prune_certs(entry);
        entry.held_until = None;
        let hold = entry.hold.clone();
        let registered = RegisteredRoute {
            listener: listener.clone(),
            protocol: claim.serving_protocol(),
            host: claim.host.clone(),
            path_prefix: claim.path_prefix.clone(),
            pool: entry.pool.clone(),
            hold: hold.clone(),
        };
        let (route_name, pool, endpoint) =
            (route.clone(), entry.pool.clone(), claim.endpoint.clone());
        let info = RegistrationInfo {
            id,
            claim,
            route,
            listener,
            address,
            since: SystemTime::now(),
        };
        book.registrations.insert(id, info.clone());
        // The lease exists from here on: if the caller goes away during the writer round
        // trip below, dropping it ends the registration (instance, route, port, certificate)
        // like any other end.
        let registration = Registration {
            info,
            registry: self.clone(),
            ended: false,
        };
        // Queued under the lock (so edits reach the writer in book order), awaited without it.
        let published = self.state.queue_membership(move |m| {
            m.set_route(&route_name, registered);
            m.set_members(&pool, Origin::Registered(id), vec![Upstream::new(endpoint)]);
        });
        drop(book);
        published.await;
        // Only now is the instance in the routing table waiters will look at.
        hold.set_live();
        let info = registration.info();
        tracing::info!(id, route = %info.route, endpoint = %info.claim.endpoint, "service registered");
        Ok(registration)
    }

    /// Serves the claim's certificate, if it brings one, under [`cert_name`]`(id)`.
    fn add_certificate(&self, id: u64, claim: &Claim) -> Result<Option<&Arc<Tls>>, RegisterError> {
        let Some(cert) = &claim.tls else {
            return Ok(None);
        };
        let Some(tls) = &self.tls else {
            return Err(RegisterError::Conflict(
                "this proxy cannot terminate TLS for registrations".into(),
            ));
        };
        tls.add_registered(
            &cert_name(id),
            claim.host.as_deref(),
            &cert.certificate_pem,
            &cert.private_key_pem,
        )
        .map_err(|e| match e {
            TlsError::Invalid { field, reason } => RegisterError::Invalid {
                field: if field == "tls_private_key_pem" {
                    "tls_private_key_pem"
                } else {
                    "tls_certificate_pem"
                },
                reason,
            },
            other => RegisterError::Invalid {
                field: "tls_certificate_pem",
                reason: other.to_string(),
            },
        })?;
        Ok(Some(tls))
    }

    /// Once a live instance of the route brought a certificate, those of instances that
    /// left stop being served.
    fn prune_certs(&self, entry: &mut RouteBook) {
        if !entry.certs.keys().any(|id| entry.instances.contains(id)) {
            return;
        }
        let stale: Vec<u64> = entry
            .certs
            .keys()
            .copied()
            .filter(|id| !entry.instances.contains(id))
            .collect();
        for id in stale {
            entry.certs.remove(&id);
            if let Some(tls) = &self.tls {
                tls.remove_registered(&cert_name(id));
            }
        }
    }

    /// Stops serving every certificate of a route that ended.
    fn drop_certs(&self, entry: &RouteBook) {
        if let Some(tls) = &self.tls {
            for id in entry.certs.keys() {
                tls.remove_registered(&cert_name(*id));
            }
        }
    }

    /// The pool a TCP route of the config or the API forwards `listener` to, if any: such a
    /// listener has no room for a registration.
    fn forwarded_pool(&self, listener: &str) -> Option<String> {
        let snap = self.state.snapshot();
        let pool = snap
            .state
            .tcp_routes()
            .find(|r| r.listener == listener)
            .map(|r| r.pool.clone());
        pool
    }

    /// The listener for the claimed port: a configured one, one already opened for
    /// registrations, or a new one.
    fn listener_for(
        &self,
        book: &mut Book,
        claim: &Claim,
    ) -> Result<(String, SocketAddr), RegisterError> {
        let protocol = claim.serving_protocol();
        if let Some(l) = self.listeners.iter().find(|l| l.bound.port() == claim.port) {
            if !fits(l.protocol, protocol) {
                return Err(RegisterError::Conflict(format!(
                    "port {} is listener {:?} of the config file, which speaks {}, not {}",
                    claim.port,
                    l.name,
                    l.protocol.as_str(),
                    protocol.as_str()
                )));
            }
            if protocol.is_stream() {
                if let Some(pool) = self.forwarded_pool(&l.name) {
                    return Err(RegisterError::Conflict(format!(
                        "listener {:?} already forwards to pool {pool:?}",
                        l.name
                    )));
                }
            }
            return Ok((l.name.clone(), l.bound));
        }
        if let Some(open) = book.ports.get(&claim.port) {
            if !fits(open.protocol, protocol) {
                return Err(RegisterError::Conflict(format!(
                    "port {} is already open for {} registrations, not {}",
                    claim.port,
                    open.protocol.as_str(),
                    protocol.as_str()
                )));
            }
            return Ok((open.listener.clone(), open.address));
        }
        if !matches!(claim.protocol, Protocol::Http | Protocol::Tcp) {
            return Err(RegisterError::Invalid {
                field: "protocol",
                reason: format!(
                    "{} registrations are not supported; use http or tcp",
                    claim.protocol.as_str()
                ),
            });
        }
        let address = SocketAddr::new(self.config.address, claim.port);
        let socket = crate::listener::bind(address).map_err(|source| RegisterError::Bind {
            port: claim.port,
            source,
        })?;
        let open = self
            .serve_port(claim.port, protocol, address, socket)
            .map_err(|source| RegisterError::Bind {
                port: claim.port,
                source,
            })?;
        tracing::info!(listener = %open.listener, address = %open.address, "opened a port for registrations");
        let found = (open.listener.clone(), open.address);
        book.ports.insert(claim.port, open);
        Ok(found)
    }

    /// Starts serving a listening socket for registrations on `port`, keeping a duplicate
    /// to hand over on an upgrade.
    fn serve_port(
        &self,
        port: u16,
        protocol: Protocol,
        address: SocketAddr,
        socket: std::net::TcpListener,
    ) -> std::io::Result<OpenPort> {
        socket.set_nonblocking(true)?;
        let bound = socket.local_addr()?;
        let handoff = OwnedFd::from(socket.try_clone()?);
        let socket = tokio::net::TcpListener::from_std(socket)?;
        let listener = port_listener(port, protocol, address);
        let name = listener.name.clone();
        let accept = (self.serve)(socket, listener);
        Ok(OpenPort {
            listener: name,
            protocol,
            address: bound,
            accept,
            socket: handoff,
        })
    }

    /// Takes over the ports a previous process opened for registrations (handoff sockets
    /// named with [`HANDOFF_PREFIX`]): serves each at once and holds its routes for
    /// `registration.hold`, so requests and connections wait (bounded) for their services
    /// to register again; a port whose routes nobody claims closes when the hold ends.
    /// A socket this configuration cannot take (port outside the range, now a configured
    /// listener, or a name it cannot read) is closed.
    /// `routes` is what the previous process passed as handoff data ([`HANDOFF_ROUTES`]):
    /// routes on configured listeners are held too, and certificates are served again
    /// from the first connection.
    pub async fn adopt(
        self: &Arc<Self>,
        sockets: Vec<(String, std::net::TcpListener)>,
        routes: Option<String>,
    ) {
        let routes: Vec<HandedRoute> = match routes.as_deref().map(serde_json::from_str) {
            None => Vec::new(),
            Some(Ok(routes)) => routes,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "unreadable registered routes in the handoff; routes on configured listeners and certificates wait for their services");
                Vec::new()
            }
        };
        for (name, socket) in sockets {
            if let Err(reason) = self.adopt_port(&name, socket, &routes).await {
                tracing::warn!(socket = %name, %reason, "closing a handed-over registration port");
            }
        }
        for route in routes.iter().filter(|r| r.configured) {
            if let Err(reason) = self.adopt_configured(route).await {
                tracing::warn!(port = route.port, host = ?route.host, path_prefix = %route.path_prefix, %reason, "not holding a handed-over registered route");
            }
        }
    }

    /// Serves the handed-over certificates of a route again; returns them by the ids they
    /// are kept under.
    fn adopt_certificates(
        &self,
        route: &str,
        host: Option<&str>,
        certificates: &[ClaimTls],
    ) -> BTreeMap<u64, ClaimTls> {
        let mut kept = BTreeMap::new();
        let Some(tls) = &self.tls else {
            return kept;
        };
        for c in certificates {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            match tls.add_registered(&cert_name(id), host, &c.certificate_pem, &c.private_key_pem) {
                Ok(_) => {
                    kept.insert(id, c.clone());
                }
                Err(e) => {
                    tracing::warn!(route, error = %e, "a handed-over registration certificate cannot be used")
                }
            }
        }
        kept
    }

    /// Books a route handed over by the previous process as held (no instance yet, its
    /// certificates served again); returns its name and what the routing table needs.
    fn book_held(
        &self,
        book: &mut Book,
        listener: &str,
        protocol: Protocol,
        port: u16,
        (host, path_prefix): (Option<String>, String),
        certificates: &[ClaimTls],
    ) -> (String, RegisteredRoute) {
        let route = route_name(port, host.as_deref(), &path_prefix);
        let hold = Arc::new(Hold::new(self.config.queue_limit, self.config.max_wait));
        hold.hold_until(tokio::time::Instant::now() + self.config.hold);
        let certs = self.adopt_certificates(&route, host.as_deref(), certificates);
        book.routes.insert(
            route.clone(),
            RouteBook {
                pool: route.clone(),
                listener: listener.to_string(),
                port,
                host: host.clone(),
                path_prefix: path_prefix.clone(),
                hold: hold.clone(),
                instances: BTreeSet::new(),
                certs,
                held_until: Some(SystemTime::now() + self.config.hold),
                generation: 1,
            },
        );
        let registered = RegisteredRoute {
            listener: listener.to_string(),
            protocol,
            host,
            path_prefix,
            pool: route.clone(),
            hold,
        };
        (route, registered)
    }

    /// Holds a route the previous process served on a configured listener, exactly as if
    /// its service had just left.
    async fn adopt_configured(self: &Arc<Self>, handed: &HandedRoute) -> Result<(), String> {
        let port = handed.port;
        let l = self
            .listeners
            .iter()
            .find(|l| l.bound.port() == port)
            .ok_or_else(|| format!("no listener of the config file has port {port} now"))?;
        let (host, path_prefix) = self
            .check_route(
                port,
                l.protocol,
                handed.host.clone(),
                handed.path_prefix.clone(),
            )
            .map_err(|e| e.to_string())?;
        if l.protocol.is_stream() {
            if let Some(pool) = self.forwarded_pool(&l.name) {
                return Err(format!(
                    "listener {:?} now forwards to pool {pool:?}",
                    l.name
                ));
            }
        }
        let route = route_name(port, host.as_deref(), &path_prefix);
        let mut book = self.book.lock().await;
        if book.routes.contains_key(&route) {
            return Err(format!("route {route} is already registered"));
        }
        let (name, registered) = self.book_held(
            &mut book,
            &l.name,
            l.protocol,
            port,
            (host, path_prefix),
            &handed.certificates,
        );
        let published = self
            .state
            .queue_membership(move |m| m.set_route(&name, registered));
        drop(book);
        published.await;
        tracing::info!(%route, listener = %l.name, "holding a registered route handed over on a configured listener");
        self.expire_after_hold(route, 1);
        Ok(())
    }

    async fn adopt_port(
        self: &Arc<Self>,
        name: &str,
        socket: std::net::TcpListener,
        handed: &[HandedRoute],
    ) -> Result<(), String> {
        let handoff = PortHandoff::parse(name)?;
        let port = handoff.port;
        if let Some(l) = self.listeners.iter().find(|l| l.bound.port() == port) {
            return Err(format!("port {port} is now listener {:?}", l.name));
        }
        let mut routes = Vec::new();
        for (host, path) in handoff.routes {
            match self.check_route(port, handoff.protocol, host, path) {
                Ok(route) => routes.push(route),
                Err(e) => return Err(e.to_string()),
            }
        }
        let mut book = self.book.lock().await;
        if book.ports.contains_key(&port) {
            return Err(format!("port {port} is already open"));
        }
        let listener = format!("registered-{port}");
        let mut held = Vec::new();
        for (host, path_prefix) in routes {
            let handed: &[ClaimTls] = handed
                .iter()
                .find(|r| {
                    !r.configured
                        && r.port == port
                        && r.host == host
                        && r.path_prefix == path_prefix
                })
                .map_or(&[], |r| r.certificates.as_slice());
            held.push(self.book_held(
                &mut book,
                &listener,
                handoff.protocol,
                port,
                (host, path_prefix),
                handed,
            ));
        }
        let names: Vec<String> = held.iter().map(|(n, _)| n.clone()).collect();
        let published = self.state.queue_membership(move |m| {
            for (name, route) in held {
                m.set_route(&name, route);
            }
        });
        drop(book);
        // The held routes are in the routing table before the first connection is accepted.
        published.await;
        let address = SocketAddr::new(self.config.address, port);
        let open = match self.serve_port(port, handoff.protocol, address, socket) {
            Ok(open) => open,
            Err(e) => {
                let mut book = self.book.lock().await;
                for route in &names {
                    if let Some(entry) = book.routes.remove(route) {
                        self.drop_certs(&entry);
                    }
                }
                let removed = names.clone();
                let published = self
                    .state
                    .queue_membership(move |m| removed.iter().for_each(|r| m.remove_route(r)));
                drop(book);
                published.await;
                return Err(e.to_string());
            }
        };
        tracing::info!(listener = %open.listener, address = %open.address, routes = names.len(), "serving a port handed over for registrations; its routes are held");
        self.book.lock().await.ports.insert(port, open);
        if names.is_empty() {
            // Nothing to hold: the port closes like one whose routes all expired.
            self.close_unused_port(port).await;
        }
        for route in names {
            self.expire_after_hold(route, 1);
        }
        Ok(())
    }

    /// Closes the port opened for registrations on `port` if no route uses it any more.
    async fn close_unused_port(&self, port: u16) {
        let mut book = self.book.lock().await;
        Self::close_port_if_unused(&mut book, port);
    }

    fn close_port_if_unused(book: &mut Book, port: u16) {
        let Some(open) = book.ports.get(&port) else {
            return;
        };
        if book.routes.values().any(|r| r.listener == open.listener) {
            return;
        }
        if let Some(open) = book.ports.remove(&port) {
            open.accept.abort();
            tracing::info!(listener = %open.listener, address = %open.address, "closed the port opened for registrations");
        }
    }

    /// Closes every port opened for registrations once this daemon stops (after a handoff
    /// the next process has its own descriptors), so no listening socket outlives it.
    pub async fn close_ports_on(self: &Arc<Self>, shutdown: crate::Shutdown) {
        shutdown.triggered().await;
        let mut book = self.book.lock().await;
        for (_, open) in std::mem::take(&mut book.ports) {
            open.accept.abort();
        }
    }

    /// The ports opened for registrations as handoff sockets, each named with its routes.
    pub async fn handoff_sockets(&self) -> Vec<HandoffSocket> {
        let book = self.book.lock().await;
        let mut sockets = Vec::new();
        for (port, open) in &book.ports {
            let routes = book
                .routes
                .values()
                .filter(|r| r.listener == open.listener)
                .map(|r| (r.host.clone(), r.path_prefix.clone()))
                .collect();
            let name = PortHandoff {
                port: *port,
                protocol: open.protocol,
                routes,
            }
            .name();
            match open.socket.try_clone() {
                Ok(fd) => sockets.push(HandoffSocket {
                    name,
                    kind: SocketKind::Tcp,
                    fd,
                }),
                Err(e) => {
                    tracing::warn!(listener = %open.listener, error = %e, "cannot duplicate a registration port for the handoff; the next process opens it again when its service registers")
                }
            }
        }
        sockets
    }

    /// Every registered route (live or held) with its certificates, as handoff data.
    pub async fn handoff_data(&self) -> Vec<(String, String)> {
        let book = self.book.lock().await;
        let routes: Vec<HandedRoute> = book
            .routes
            .values()
            .map(|r| HandedRoute {
                port: r.port,
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                configured: !book.ports.contains_key(&r.port),
                certificates: r.certs.values().cloned().collect(),
            })
            .collect();
        if routes.is_empty() {
            return Vec::new();
        }
        match serde_json::to_string(&routes) {
            Ok(json) => vec![(HANDOFF_ROUTES.to_string(), json)],
            Err(e) => {
                tracing::warn!(error = %e, "cannot pass the registered routes on");
                Vec::new()
            }
        }
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
        self.prune_certs(entry);
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
        let published = self
            .state
            .queue_membership(move |m| m.set_members(&pool, Origin::Registered(id), Vec::new()));
        drop(book);
        published.await;
        tracing::info!(id, route = %info.route, held = last, "registration ended");
        if last {
            self.expire_after_hold(info.route, generation);
        }
    }

    /// Ends the hold of `route` once `registration.hold` has passed, unless an instance
    /// came back meanwhile (then `generation` is stale).
    fn expire_after_hold(self: &Arc<Self>, route: String, generation: u64) {
        let registry = self.clone();
        let wait = self.config.hold;
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            registry.expire(&route, generation).await;
        });
    }

    /// The hold of `route` ran out (unless an instance came back meanwhile). When the
    /// route's port stays open anyway (a configured listener, or other registrations on
    /// it), the route stays for [`EXPIRED_ROUTE_ANSWER`] answering 503, so its clients see
    /// "unavailable" rather than "no such route" (or another route's answer); otherwise it
    /// goes now and its port closes.
    async fn expire(self: &Arc<Self>, route: &str, generation: u64) {
        let book = self.book.lock().await;
        let Some(entry) = book.routes.get(route) else {
            return;
        };
        if !entry.instances.is_empty() || entry.generation != generation {
            return;
        }
        let port_stays = book.ports.get(&entry.port).is_none_or(|open| {
            book.routes
                .iter()
                .any(|(name, r)| name != route && r.listener == open.listener)
        });
        if !port_stays {
            drop(book);
            self.remove_expired(route, generation).await;
            return;
        }
        entry.hold.end();
        drop(book);
        tracing::info!(route, answer_for = ?EXPIRED_ROUTE_ANSWER, "hold ended without a registration; the route answers 503 until removed");
        let registry = self.clone();
        let route = route.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(EXPIRED_ROUTE_ANSWER).await;
            registry.remove_expired(&route, generation).await;
        });
    }

    /// Removes an expired route (and its port, if opened only for it) unless an instance
    /// came back meanwhile.
    async fn remove_expired(&self, route: &str, generation: u64) {
        let mut book = self.book.lock().await;
        let Some(entry) = book.routes.get(route) else {
            return;
        };
        if !entry.instances.is_empty() || entry.generation != generation {
            return;
        }
        let (port, hold) = (entry.port, entry.hold.clone());
        self.drop_certs(entry);
        book.routes.remove(route);
        let name = route.to_string();
        let published = self.state.queue_membership(move |m| m.remove_route(&name));
        Self::close_port_if_unused(&mut book, port);
        drop(book);
        published.await;
        hold.end();
        tracing::info!(route, "hold ended without a registration; route removed");
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
                pool: r.pool.clone(),
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                instances: r.instances.len(),
                held_until: r.held_until,
                waiting: r.hold.waiting(),
            })
            .collect()
    }
}

impl HandoffExtras for Registry {
    fn handoff_sockets(&self) -> Pin<Box<dyn Future<Output = Vec<HandoffSocket>> + Send + '_>> {
        Box::pin(Registry::handoff_sockets(self))
    }

    fn handoff_data(&self) -> crate::upgrade::HandoffData<'_> {
        Box::pin(Registry::handoff_data(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_names_carry_the_port_protocol_and_routes() {
        let port = PortHandoff {
            port: 20001,
            protocol: Protocol::Http,
            routes: vec![
                (None, "/".into()),
                (Some("api.example".into()), "/v1/a".into()),
                (Some("*.example".into()), "/b".into()),
            ],
        };
        let name = port.name();
        assert_eq!(
            name,
            "@registration:20001 http / api.example/v1/a *.example/b"
        );
        assert_eq!(PortHandoff::parse(&name), Ok(port));
        let tcp = PortHandoff {
            port: 20002,
            protocol: Protocol::Tcp,
            routes: vec![(None, "/".into())],
        };
        assert_eq!(PortHandoff::parse(&tcp.name()), Ok(tcp));
    }

    #[test]
    fn unreadable_handoff_names_are_refused() {
        for bad in [
            "@registration:",
            "@registration:0 http /",
            "@registration:20001",
            "@registration:20001 quic /",
            "@registration:20001 http nopath",
            "@admin",
        ] {
            assert!(PortHandoff::parse(bad).is_err(), "{bad}");
        }
    }
}
