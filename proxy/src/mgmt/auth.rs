//! Bearer-token check for the management API's TCP listener.

use std::path::Path;
use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::MgmtError;

/// Accepts a call only with `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct BearerAuth {
    token: Arc<[u8]>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth(..)")
    }
}

impl BearerAuth {
    /// Reads the token (surrounding whitespace ignored) from `path`; an empty file is refused.
    pub fn from_file(path: &Path) -> Result<BearerAuth, MgmtError> {
        let token_error = |reason: String| MgmtError::Token {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| token_error(e.to_string()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(token_error("the file is empty".into()));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(token_error(
                "the token must be printable ASCII without spaces".into(),
            ));
        }
        Ok(BearerAuth {
            token: token.as_bytes().into(),
        })
    }

    fn accepts(&self, given: &[u8]) -> bool {
        // Compare every byte so the time taken does not reveal how much of a guess matched.
        given.len() == self.token.len()
            && given
                .iter()
                .zip(self.token.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization");
        let Some(value) = header.and_then(|v| v.to_str().ok()) else {
            return Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata",
            ));
        };
        match value.strip_prefix("Bearer ") {
            Some(token) if self.accepts(token.trim().as_bytes()) => Ok(request),
            _ => Err(Status::unauthenticated("invalid bearer token")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(token: &str) -> BearerAuth {
        BearerAuth {
            token: token.as_bytes().into(),
        }
    }

    fn call(a: &mut BearerAuth, header: Option<&str>) -> tonic::Code {
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().expect("ascii header"));
        }
        match a.call(request) {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        }
    }

    #[test]
    fn only_the_exact_token_passes() {
        let mut a = auth("s3cret");
        assert_eq!(call(&mut a, Some("Bearer s3cret")), tonic::Code::Ok);
        assert_eq!(
            call(&mut a, Some("Bearer s3cre")),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            call(&mut a, Some("Bearer s3cret2")),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            call(&mut a, Some("Basic s3cret")),
            tonic::Code::Unauthenticated
        );
        assert_eq!(call(&mut a, None), tonic::Code::Unauthenticated);
    }

    #[test]
    fn empty_or_missing_token_file_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "  \n").expect("write");
        assert!(BearerAuth::from_file(&empty).is_err());
        assert!(BearerAuth::from_file(&dir.path().join("missing")).is_err());
        let good = dir.path().join("token");
        std::fs::write(&good, "abc123\n").expect("write");
        assert!(BearerAuth::from_file(&good)
            .expect("valid")
            .accepts(b"abc123"));
    }
}
