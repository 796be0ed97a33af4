//! `Change`, the one mutation type, and the errors applying it can give.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::model::{Pool, Route, TcpRoute, Upstream, UpstreamState};

/// Every mutation of the desired state, whoever asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// Add a pool; fails if the name is taken.
    CreatePool(Pool),
    /// Replace a pool's definition; fails if it does not exist.
    UpdatePool(Pool),
    /// Remove a pool; fails while a route uses it.
    DeletePool {
        /// Pool name.
        name: String,
    },
    /// Add a static upstream to a pool.
    AddUpstream {
        /// Pool name.
        pool: String,
        /// The upstream.
        upstream: Upstream,
    },
    /// Remove a static upstream from a pool.
    RemoveUpstream {
        /// Pool name.
        pool: String,
        /// Upstream address.
        address: String,
    },
    /// Drain or re-activate an upstream.
    SetUpstreamState {
        /// Pool name.
        pool: String,
        /// Upstream address.
        address: String,
        /// New state.
        state: UpstreamState,
    },
    /// Add an HTTP route; fails if the name is taken.
    CreateRoute(Route),
    /// Replace an HTTP route; fails if it does not exist.
    UpdateRoute(Route),
    /// Remove an HTTP route.
    DeleteRoute {
        /// Route name.
        name: String,
    },
    /// Add a TCP route; fails if the name is taken.
    CreateTcpRoute(TcpRoute),
    /// Replace a TCP route; fails if it does not exist.
    UpdateTcpRoute(TcpRoute),
    /// Remove a TCP route.
    DeleteTcpRoute {
        /// TCP route name.
        name: String,
    },
}

/// Why a batch was refused. A refused batch changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ApplyError {
    /// A field is malformed or refers to something that does not exist.
    #[error("{field}: {reason}")]
    Invalid {
        /// Dotted path of the offending field, e.g. `route.pool`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The object to change or delete does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// Object kind (`pool`, `route`, `tcp_route`, `upstream`).
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// An object with this name already exists.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// Object kind.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The object is owned by the config file and cannot be changed through the API.
    #[error("{kind} {name:?} is defined in the config file; change it there")]
    Declarative {
        /// Object kind.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The object is still referenced by another one.
    #[error("{kind} {name:?} is in use by {user}")]
    InUse {
        /// Object kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// What uses it, e.g. `route "docs"`.
        user: String,
    },
    /// The state takes no writes now (draining, or handed over to a new process).
    #[error("state is read-only: {0}")]
    Unavailable(String),
    /// The store failed; nothing was committed.
    #[error("store error: {0}")]
    Store(String),
}

impl ApplyError {
    /// An `Invalid` error for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApplyError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Prefixes the field path of an `Invalid` error (e.g. with `changes[3].`).
    pub fn within(self, prefix: &str) -> Self {
        match self {
            ApplyError::Invalid { field, reason } => ApplyError::Invalid {
                field: format!("{prefix}{field}"),
                reason,
            },
            other => other,
        }
    }
}
