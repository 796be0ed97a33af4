//! Dialing upstreams: TCP connect with a timeout, and the HTTP/1.1 client handshake.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;

use crate::http::body::RequestBody;

/// An HTTP/1.1 client connection to one upstream.
pub type HttpSender = hyper::client::conn::http1::SendRequest<RequestBody>;

/// Why a connection to an upstream could not be made.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// Refused, unreachable, or the name did not resolve.
    #[error("connect to {address} failed: {source}")]
    Failed {
        /// Upstream address.
        address: String,
        /// OS error.
        source: std::io::Error,
    },
    /// No answer within the pool's connect timeout.
    #[error("connect to {address} timed out after {timeout:?}")]
    Timeout {
        /// Upstream address.
        address: String,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// The HTTP handshake failed.
    #[error("HTTP handshake with {address} failed: {source}")]
    Handshake {
        /// Upstream address.
        address: String,
        /// hyper's error.
        source: hyper::Error,
    },
}

impl ConnectError {
    /// Whether the failure was a timeout (504) rather than a refusal (502).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ConnectError::Timeout { .. })
    }
}

/// Opens a TCP connection to `address` (`host:port`) within `timeout`.
pub async fn connect(address: &str, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            // Small writes (headers, interactive TCP) must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(source)) => Err(ConnectError::Failed { address: address.to_string(), source }),
        Err(_) => Err(ConnectError::Timeout { address: address.to_string(), timeout }),
    }
}

/// Performs the HTTP/1.1 client handshake on `stream` and drives the connection in a task.
pub async fn http_sender(address: &str, stream: TcpStream) -> Result<HttpSender, ConnectError> {
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ConnectError::Handshake { address: address.to_string(), source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}
