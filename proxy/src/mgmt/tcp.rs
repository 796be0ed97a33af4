//! TLS in front of the TCP management listener (`server.mgmt_tls`).
//!
//! The bearer token stays required on top of TLS; TLS keeps it (and every call) off the
//! wire in the clear and, with `client_ca`, admits only clients holding a certificate from
//! that CA. Handshakes run concurrently, each bounded in time, so a silent client neither
//! holds up other clients nor keeps a slot for long. `ReloadConfig` re-reads the files;
//! connections made after it use the new certificate.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::{Stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::MgmtError;
use crate::config::MgmtTls;

/// Time a client has for its whole TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel backlog.
const CONCURRENT_HANDSHAKES: usize = 256;

fn invalid(field: &'static str, path: &Path, reason: impl std::fmt::Display) -> MgmtError {
    MgmtError::Tls {
        field,
        reason: format!("{}: {reason}", path.display()),
    }
}

fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, MgmtError> {
    let pem = std::fs::read(path).map_err(|e| invalid(field, path, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(field, path, e))?;
    if certs.is_empty() {
        return Err(invalid(field, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The TLS settings the TCP management listener uses now, replaced as a whole on reload.
#[derive(Debug)]
pub struct MgmtTlsConfig {
    current: ArcSwap<ServerConfig>,
}

impl MgmtTlsConfig {
    /// Reads the files of `tls`; errors name the field (`server.mgmt_tls.cert`, ...).
    pub(super) fn load(tls: &MgmtTls) -> Result<MgmtTlsConfig, MgmtError> {
        Ok(MgmtTlsConfig {
            current: ArcSwap::from(server_config(tls)?),
        })
    }

    /// Serves new connections with `next` (made by [`server_config`]).
    pub(super) fn install(&self, next: Arc<ServerConfig>) {
        self.current.store(next);
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }
}

/// Reads the files of `tls` and builds the server config; every error names the field
/// (`server.mgmt_tls.cert`, `.key` or `.client_ca`) and the file.
pub(super) fn server_config(tls: &MgmtTls) -> Result<Arc<ServerConfig>, MgmtError> {
    const CERT: &str = "server.mgmt_tls.cert";
    const KEY: &str = "server.mgmt_tls.key";
    const CLIENT_CA: &str = "server.mgmt_tls.client_ca";
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(CERT, &tls.cert)?;
    let key_pem = std::fs::read(&tls.key).map_err(|e| invalid(KEY, &tls.key, e))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| invalid(KEY, &tls.key, e))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(KEY, &tls.key, e))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        invalid(
            KEY,
            &tls.key,
            format!("the key does not belong to the certificate in server.mgmt_tls.cert: {e}"),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| MgmtError::Tls {
            field: CERT,
            reason: e.to_string(),
        })?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(CLIENT_CA, path)? {
                roots.add(cert).map_err(|e| invalid(CLIENT_CA, path, e))?;
            }
            // Required, not merely requested: a CA that is configured but not enforced
            // would protect nothing.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(CLIENT_CA, path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(OneKey(Arc::new(certified))));
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Presents the one configured certificate whatever name the client asks for.
#[derive(Debug)]
struct OneKey(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneKey {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// An accepted management connection after its TLS handshake.
pub(super) struct TlsConnection(TlsStream<TcpStream>);

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// The connections of `incoming` once their handshakes complete. A failed or slow handshake
/// is an `Err` item (the server skips it) and never delays the other connections.
pub(super) fn handshakes<S>(
    incoming: S,
    tls: Arc<MgmtTlsConfig>,
) -> impl Stream<Item = io::Result<TlsConnection>>
where
    S: Stream<Item = io::Result<TcpStream>>,
{
    incoming
        .map(move |accepted| {
            let acceptor = tls.acceptor();
            async move {
                let stream = accepted?;
                let peer = stream.peer_addr().ok();
                let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))
                    .and_then(|r| r);
                match result {
                    Ok(tls) => Ok(TlsConnection(tls)),
                    Err(e) => {
                        tracing::debug!(?peer, error = %e, "management TLS handshake failed");
                        Err(e)
                    }
                }
            }
        })
        .buffer_unordered(CONCURRENT_HANDSHAKES)
}
