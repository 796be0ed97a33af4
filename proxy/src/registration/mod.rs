//! Registration: services announce themselves over a gRPC stream (the lease) and get a
//! route, a pool member and, when needed, a listening port; when the stream ends their
//! routes are held so requests wait for them to come back.
//!
//! # Layout
//!
//! - [`Registry`] (`registry.rs`): live registrations, route/pool bookkeeping, ports opened
//!   on demand, hold timers.
//! - [`client`]: a small client for services (and `proxyctl register`).

pub mod client;
mod registry;

use std::sync::Arc;

pub use crate::config::RegistrationConfig;
use crate::routing::PoolSlot;
use crate::upstream::{HoldError, PoolRuntime};
pub use registry::{
    Claim, ClaimTls, KnownListener, RegisterError, Registration, RegistrationInfo, Registry,
    RouteInfo, ServeListener, HANDOFF_PREFIX, HANDOFF_ROUTES,
};

/// `pool` itself, or, for a registered route's pool that has no instance right now, the
/// pool as it is once one registers again (waiting on its hold, bounded). Other pools
/// return at once, so the request path pays one branch for this.
pub async fn ready_pool(
    slot: &Arc<PoolSlot>,
    metrics: &crate::telemetry::Metrics,
) -> Result<Arc<PoolRuntime>, HoldError> {
    let pool = slot.load_full();
    let Some(hold) = &pool.hold else {
        return Ok(pool);
    };
    if !pool.upstreams().is_empty() {
        return Ok(pool);
    }
    if !hold.is_holding() {
        return Err(HoldError::Ended);
    }
    let held = metrics.request_held();
    // The route's slot gets the pool with the instance once one registers again. Boxed:
    // the wait (a timer and a notification) is part of every request's future otherwise,
    // and only requests to a route whose instances are away run it.
    let result =
        Box::pin(hold.wait(|| Some(slot.load_full()).filter(|p| !p.upstreams().is_empty()))).await;
    drop(held);
    metrics.held_finished(match &result {
        Ok(_) => crate::telemetry::HeldOutcome::Served,
        Err(HoldError::QueueFull) => crate::telemetry::HeldOutcome::Refused,
        Err(_) => crate::telemetry::HeldOutcome::Expired,
    });
    result
}
