//! TLS from the proxy to a pool's upstreams: the rustls client config is built once per
//! pool definition (roots from `ca_file`, optional client certificate) and every new
//! upstream connection is wrapped with it.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use thiserror::Error;

use crate::state::{ApplyError, Change, UpstreamTls};

/// Why a pool's `tls` section cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A field names a file that cannot be used, or a value that is not one.
    #[error("{field}: {reason}")]
    Invalid {
        /// `tls.ca_file`, `tls.server_name`, ...
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the client configuration.
    #[error("{0}")]
    Certificate(String),
}

/// The file check of a batch: every pool it creates or updates with a `tls` section must
/// name files that can be read and used. Config and the management API run it before they
/// apply the batch (the state checks values, never the disk), so a pool whose TLS cannot
/// work is refused, not half-applied. Errors name the field as the state does
/// (`pool.tls.ca_file`, within `changes[i].` in a batch of several), with the index of the
/// change.
pub fn check_files(changes: &[Change]) -> Result<(), (usize, ApplyError)> {
    for (i, change) in changes.iter().enumerate() {
        let (Change::CreatePool(pool) | Change::UpdatePool(pool)) = change else {
            continue;
        };
        let Some(tls) = &pool.tls else {
            continue;
        };
        if let Err(e) = UpstreamConnector::new(tls) {
            let error = match e {
                TlsError::Invalid { field, reason } => {
                    ApplyError::invalid(format!("pool.{field}"), reason)
                }
                other => ApplyError::invalid("pool.tls", other.to_string()),
            };
            let prefix = if changes.len() > 1 {
                format!("changes[{i}].")
            } else {
                String::new()
            };
            return Err((i, error.within(&prefix)));
        }
    }
    Ok(())
}

/// Whether a batch names TLS files that [`check_files`] reads (worth a blocking thread).
pub fn reads_files(changes: &[Change]) -> bool {
    changes
        .iter()
        .any(|c| matches!(c, Change::CreatePool(p) | Change::UpdatePool(p) if p.tls.is_some()))
}

/// Opens TLS sessions to the upstreams of one pool.
pub struct UpstreamConnector {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl fmt::Debug for UpstreamConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConnector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        field: format!("tls.{key}"),
        reason: reason.into(),
    }
}

fn read(key: &str, path: &str) -> Result<Vec<u8>, TlsError> {
    if path.is_empty() {
        return Err(invalid(key, "required"));
    }
    std::fs::read(path).map_err(|e| invalid(key, format!("{path}: {e}")))
}

fn certificates(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("{path}: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(key, format!("{path}: no PEM certificate in it")));
    }
    Ok(certs)
}

impl UpstreamConnector {
    /// Reads the files named by `tls` and builds the client config; errors name the field
    /// (`tls.ca_file`, ...).
    pub fn new(tls: &UpstreamTls) -> Result<UpstreamConnector, TlsError> {
        UpstreamConnector::with_alpn(tls, &[])
    }

    /// As [`UpstreamConnector::new`], offering `alpn` (most preferred first) in the
    /// handshake.
    pub fn with_alpn(tls: &UpstreamTls, alpn: &[&[u8]]) -> Result<UpstreamConnector, TlsError> {
        let server_name =
            ServerName::try_from(tls.server_name.trim().to_string()).map_err(|_| {
                invalid(
                    "server_name",
                    format!("{:?} is not a DNS name or IP address", tls.server_name),
                )
            })?;
        let mut roots = RootCertStore::empty();
        for cert in certificates("ca_file", &tls.ca_file)? {
            roots
                .add(cert)
                .map_err(|e| invalid("ca_file", format!("{}: {e}", tls.ca_file)))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Certificate(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (tls.client_cert.is_empty(), tls.client_key.is_empty()) {
            (true, true) => builder.with_no_client_auth(),
            (false, false) => {
                let chain = certificates("client_cert", &tls.client_cert)?;
                let key = PrivateKeyDer::from_pem_slice(&read("client_key", &tls.client_key)?)
                    .map_err(|e| invalid("client_key", format!("{}: {e}", tls.client_key)))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| invalid("client_key", e.to_string()))?
            }
            (true, false) => return Err(invalid("client_cert", "required with client_key")),
            (false, true) => return Err(invalid("client_key", "required with client_cert")),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(UpstreamConnector {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Runs the client handshake on `io`, verifying the upstream's certificate.
    pub async fn handshake<IO>(&self, io: IO) -> std::io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        self.connector.connect(self.server_name.clone(), io).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(server_name: &str, ca_file: &str) -> UpstreamTls {
        UpstreamTls {
            server_name: server_name.into(),
            ca_file: ca_file.into(),
            client_cert: String::new(),
            client_key: String::new(),
        }
    }

    fn field(e: TlsError) -> String {
        match e {
            TlsError::Invalid { field, .. } => field,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn mistakes_name_the_field() {
        let dir = tempfile::tempdir().expect("test setup");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("test setup");
        let empty = empty.to_str().expect("test setup");
        assert_eq!(
            field(UpstreamConnector::new(&tls("a b", empty)).expect_err("refused")),
            "tls.server_name"
        );
        assert_eq!(
            field(UpstreamConnector::new(&tls("a.test", "")).expect_err("refused")),
            "tls.ca_file"
        );
        assert_eq!(
            field(UpstreamConnector::new(&tls("a.test", empty)).expect_err("refused")),
            "tls.ca_file"
        );
        assert_eq!(
            field(
                UpstreamConnector::new(&tls("a.test", "/nonexistent/ca.pem")).expect_err("refused")
            ),
            "tls.ca_file"
        );
    }

    #[test]
    fn client_key_without_cert_is_refused() {
        let key = rcgen::KeyPair::generate().expect("test setup");
        let params =
            rcgen::CertificateParams::new(vec!["ca.test".to_string()]).expect("test setup");
        let cert = params.self_signed(&key).expect("test setup");
        let dir = tempfile::tempdir().expect("test setup");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, cert.pem()).expect("test setup");
        let mut t = tls("127.0.0.1", ca.to_str().expect("test setup"));
        UpstreamConnector::new(&t).expect("roots only");
        t.client_key = ca.to_str().expect("test setup").into();
        assert_eq!(
            field(UpstreamConnector::new(&t).expect_err("refused")),
            "tls.client_cert"
        );
    }
}
