//! `proxy.v1.RegistrationService`: the Register stream (the lease) and the listing.
//!
//! Every call reaching this service is authorised: the unix socket is protected by its
//! file mode, and the TCP listener lets only bearer-token calls through.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use proxy_proto::v1 as pb;
use proxy_proto::v1::registration_service_server::{
    RegistrationService, RegistrationServiceServer,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::discovery::unix_ms;
use crate::registration::{Claim, ClaimTls, RegisterError, Registration, Registry};
use crate::state::Protocol;
use crate::telemetry::Metrics;
use crate::Shutdown;

/// Keepalives a service may miss before its lease ends.
const MISSED_PINGS: u32 = 3;

/// The RegistrationService implementation.
#[derive(Clone)]
pub struct RegistrationApi {
    /// Live registrations.
    registry: Arc<Registry>,
    /// New registrations are refused once it fires; open streams end with it.
    shutdown: Shutdown,
    /// Counts open registration streams.
    metrics: Arc<Metrics>,
}

impl RegistrationApi {
    /// A service registering into `registry` until `shutdown`, counted in `metrics`.
    pub fn new(registry: Arc<Registry>, shutdown: Shutdown, metrics: Arc<Metrics>) -> Self {
        RegistrationApi {
            registry,
            shutdown,
            metrics,
        }
    }

    /// The service, ready to be added to a server.
    pub(super) fn server(self) -> RegistrationServiceServer<RegistrationApi> {
        RegistrationServiceServer::new(self)
    }
}

fn status(err: RegisterError) -> Status {
    match err {
        RegisterError::Invalid { field, reason } => {
            Status::invalid_argument(format!("announce.{field}: {reason}"))
        }
        e @ RegisterError::PortNotAllowed { .. } => Status::permission_denied(e.to_string()),
        e @ (RegisterError::Conflict(_) | RegisterError::Bind { .. }) => {
            Status::failed_precondition(e.to_string())
        }
    }
}

fn claim(a: pb::Announce) -> Result<Claim, Status> {
    let tls = (!a.tls_certificate_pem.is_empty() || !a.tls_private_key_pem.is_empty()).then_some(
        ClaimTls {
            certificate_pem: a.tls_certificate_pem,
            private_key_pem: a.tls_private_key_pem,
        },
    );
    let protocol = match pb::RegisteredProtocol::try_from(a.protocol) {
        Ok(pb::RegisteredProtocol::Unspecified | pb::RegisteredProtocol::Http) => Protocol::Http,
        Ok(pb::RegisteredProtocol::Tcp) => Protocol::Tcp,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "announce.protocol: unknown value {}",
                a.protocol
            )))
        }
    };
    let port = u16::try_from(a.port).map_err(|_| {
        Status::invalid_argument(format!("announce.port: {} is not a port", a.port))
    })?;
    Ok(Claim {
        name: a.name,
        endpoint: a.endpoint,
        port,
        protocol,
        host: Some(a.host).filter(|h| !h.is_empty()),
        path_prefix: a.path_prefix,
        tls,
    })
}

fn announce_of(c: &Claim) -> pb::Announce {
    pb::Announce {
        endpoint: c.endpoint.clone(),
        port: u32::from(c.port),
        protocol: match c.protocol {
            Protocol::Tcp => pb::RegisteredProtocol::Tcp,
            _ => pb::RegisteredProtocol::Http,
        } as i32,
        host: c.host.clone().unwrap_or_default(),
        path_prefix: c.path_prefix.clone(),
        name: c.name.clone(),
        ..Default::default()
    }
}

/// Keeps the lease while the service's stream lives and pings arrive; then ends it. When
/// this process stops (handoff or shutdown) the stream ends but the instance stays.
async fn hold_lease(
    registration: Registration,
    mut inbound: Streaming<pb::RegisterRequest>,
    outbound: mpsc::Sender<Result<pb::RegisterEvent, Status>>,
    keepalive: std::time::Duration,
    shutdown: crate::Shutdown,
) {
    let mut ticker = tokio::time::interval(keepalive);
    ticker.tick().await;
    let mut heard = Instant::now();
    let mut sequence = 0u64;
    let id = registration.info().id;
    let reason = loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(_)) => heard = Instant::now(),
                Ok(None) => break "the service closed the stream",
                Err(_) => break "the stream broke",
            },
            _ = ticker.tick() => {
                if heard.elapsed() > keepalive * MISSED_PINGS {
                    break "keepalives stopped";
                }
                sequence += 1;
                let ping = pb::RegisterEvent { kind: Some(pb::register_event::Kind::Ping(pb::Ping { sequence })) };
                if outbound.send(Ok(ping)).await.is_err() {
                    break "the service stopped reading";
                }
            }
            _ = outbound.closed() => break "the service went away",
            _ = shutdown.triggered() => {
                // End the stream now (dropping `outbound` closes it with OK), not when the
                // drain is over, so the service registers with the next process at once;
                // the instance stays in this process's pool for what it still drains.
                tracing::debug!(id, "proxyd is stopping; the service is asked to register again");
                registration.keep_while_draining();
                return;
            }
        }
    };
    tracing::debug!(id, reason, "lease ended");
    registration.end().await;
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RegisterEvent, Status>> + Send>>;

#[tonic::async_trait]
impl RegistrationService for RegistrationApi {
    type RegisterStream = EventStream;

    async fn register(
        &self,
        request: Request<Streaming<pb::RegisterRequest>>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        if self.shutdown.is_triggered() {
            return Err(Status::unavailable(
                "proxyd is shutting down and takes no registrations",
            ));
        }
        let registry = self.registry.clone();
        let keepalive = registry.config().keepalive;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(keepalive * MISSED_PINGS, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no announce within the keepalive window"))??;
        let announce = match first.and_then(|m| m.kind) {
            Some(pb::register_request::Kind::Announce(a)) => a,
            _ => {
                return Err(Status::invalid_argument(
                    "announce: the first message must be an announce",
                ))
            }
        };
        let registration = registry.register(claim(announce)?).await.map_err(status)?;
        let info = registration.info().clone();
        let (tx, rx) = mpsc::channel(8);
        let registered = pb::RegisterEvent {
            kind: Some(pb::register_event::Kind::Registered(pb::Registered {
                id: info.id,
                route: info.route.clone(),
                listener: info.listener.clone(),
                address: info.address.to_string(),
                keepalive_ms: u64::try_from(keepalive.as_millis()).unwrap_or(u64::MAX),
            })),
        };
        // The channel is empty, so this cannot wait.
        let _ = tx.send(Ok(registered)).await;
        // Counted as active for as long as the lease is held.
        let active = self.metrics.registration_opened();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            hold_lease(registration, inbound, tx, keepalive, shutdown).await;
            drop(active);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_registrations(
        &self,
        _request: Request<pb::ListRegistrationsRequest>,
    ) -> Result<Response<pb::ListRegistrationsResponse>, Status> {
        let registry = &self.registry;
        let registrations = registry
            .registrations()
            .await
            .into_iter()
            .map(|r| pb::Registration {
                id: r.id,
                announce: Some(announce_of(&r.claim)),
                route: r.route,
                listener: r.listener,
                address: r.address.to_string(),
                since_unix_ms: unix_ms(Some(r.since)),
            })
            .collect();
        let routes = registry
            .routes()
            .await
            .into_iter()
            .map(|r| pb::RegisteredRouteStatus {
                route: r.route,
                listener: r.listener,
                instances: u32::try_from(r.instances).unwrap_or(u32::MAX),
                held_until_unix_ms: unix_ms(r.held_until),
                waiting: u32::try_from(r.waiting).unwrap_or(u32::MAX),
            })
            .collect();
        Ok(Response::new(pb::ListRegistrationsResponse {
            registrations,
            routes,
        }))
    }
}
