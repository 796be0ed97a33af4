//! How state errors become gRPC statuses.

use tonic::Status;

use crate::state::ApplyError;

/// Renames state-model field names to the names the protobuf messages use, so an
/// INVALID_ARGUMENT points at a field the client actually sent.
fn wire_field(field: &str) -> String {
    field
        .split('.')
        .map(|segment| match segment {
            "health" => "health_check",
            "interval" => "interval_ms",
            "timeout" => "timeout_ms",
            "connect_timeout" => "connect_timeout_ms",
            "response_timeout" => "response_timeout_ms",
            "idle_timeout" => "idle_timeout_ms",
            "h2_idle_timeout" => "h2_idle_timeout_ms",
            "body_timeout" => "body_timeout_ms",
            "connect_deadline" => "connect_deadline_ms",
            "base_ejection" => "base_ejection_ms",
            "max_ejection" => "max_ejection_ms",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The gRPC status for a refused change.
pub fn status(err: ApplyError) -> Status {
    match err {
        ApplyError::Invalid { field, reason } => {
            Status::invalid_argument(format!("{}: {reason}", wire_field(&field)))
        }
        e @ ApplyError::NotFound { .. } => Status::not_found(e.to_string()),
        e @ ApplyError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        e @ (ApplyError::Declarative { .. } | ApplyError::InUse { .. }) => {
            Status::failed_precondition(e.to_string())
        }
        e @ ApplyError::Unavailable(_) => Status::unavailable(e.to_string()),
        ApplyError::Store(reason) => {
            tracing::error!(%reason, "state store failed during a management call");
            Status::internal(format!("store error: {reason}"))
        }
    }
}

/// The gRPC status for a refused fleet write: a conflict with another node's write is
/// ABORTED (read again, then retry), an unreachable etcd UNAVAILABLE.
pub fn cluster_status(err: crate::cluster::WriteError) -> Status {
    use crate::cluster::WriteError;
    match err {
        WriteError::Apply(e) => status(e),
        WriteError::Conflict(reason) => Status::aborted(format!("conflict: {reason}")),
        WriteError::Unavailable(reason) => Status::unavailable(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn every_error_kind_has_its_code() {
        let cases = [
            (
                ApplyError::invalid("changes[1].pool.health.interval", "must be positive"),
                Code::InvalidArgument,
            ),
            (
                ApplyError::NotFound {
                    kind: "route",
                    name: "a".into(),
                },
                Code::NotFound,
            ),
            (
                ApplyError::AlreadyExists {
                    kind: "route",
                    name: "a".into(),
                },
                Code::AlreadyExists,
            ),
            (
                ApplyError::Declarative {
                    kind: "pool",
                    name: "a".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ApplyError::InUse {
                    kind: "pool",
                    name: "a".into(),
                    user: "route \"r\"".into(),
                },
                Code::FailedPrecondition,
            ),
            (ApplyError::Unavailable("closed".into()), Code::Unavailable),
            (ApplyError::Store("disk full".into()), Code::Internal),
        ];
        for (err, code) in cases {
            assert_eq!(status(err).code(), code);
        }
        let s = status(ApplyError::invalid(
            "changes[1].pool.health.interval",
            "must be positive",
        ));
        assert_eq!(
            s.message(),
            "changes[1].pool.health_check.interval_ms: must be positive"
        );
    }
}
