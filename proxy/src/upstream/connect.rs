//! Dialing upstreams: TCP (`host:port`) or unix socket (`unix:/path`) connect with a
//! timeout, TLS on top for pools that have it, and the HTTP/2 client handshake (HTTP/1.1
//! connections need none: see [`super::h1`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::h2::{FrameScanner, H2Conn, H2State};
use super::OpenConnection;
use crate::state::H2Keepalive;

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
    /// The TLS handshake failed (certificate not trusted, wrong name, refused client
    /// certificate, ...).
    #[error("TLS handshake with {address} failed: {source}")]
    Tls {
        /// Upstream address.
        address: String,
        /// rustls' error, as I/O error.
        source: std::io::Error,
    },
    /// The pool's TLS settings could not be loaded when the routing table was built.
    #[error("TLS to pool {pool:?} is not usable: {reason}")]
    TlsSetup {
        /// Pool name.
        pool: String,
        /// What failed.
        reason: String,
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

impl UpstreamStream {
    /// Whether TLS negotiated HTTP/2 (ALPN `h2`).
    pub fn negotiated_h2(&self) -> bool {
        match self {
            UpstreamStream::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
            _ => false,
        }
    }
}

/// A connection to an upstream: TCP, or a unix socket for `unix:/path` addresses.
#[derive(Debug)]
pub enum UpstreamStream {
    /// `host:port`.
    Tcp(TcpStream),
    /// `unix:/path`.
    Unix(UnixStream),
    /// Either of the above with TLS on top.
    Tls(Box<tokio_rustls::client::TlsStream<UpstreamStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Unix(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Tcp(s) => s.is_write_vectored(),
            UpstreamStream::Unix(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Opens a connection to `address` (`host:port` or `unix:/path`) within `timeout`.
pub async fn connect(address: &str, timeout: Duration) -> Result<UpstreamStream, ConnectError> {
    let dial = async {
        match address.strip_prefix("unix:") {
            Some(path) => UnixStream::connect(path).await.map(UpstreamStream::Unix),
            None => {
                let stream = TcpStream::connect(address).await?;
                // Small writes (headers, interactive TCP) must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                Ok(UpstreamStream::Tcp(stream))
            }
        }
    };
    match tokio::time::timeout(timeout, dial).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ConnectError::Failed {
            address: address.to_string(),
            source,
        }),
        Err(_) => Err(ConnectError::Timeout {
            address: address.to_string(),
            timeout,
        }),
    }
}

/// An HTTP/2 connection's socket, following the upstream's frames for its stream limit.
struct Watched {
    inner: UpstreamStream,
    /// Dropped with the connection: frees its place under `max_connections_per_upstream`.
    _open: Option<OpenConnection>,
    frames: FrameScanner,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.frames.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Streams allowed on a new HTTP/2 connection before the upstream's SETTINGS arrive
/// (RFC 9113 recommends advertising at least 100).
const H2_INITIAL_STREAMS: usize = 100;

/// How long a new HTTP/2 connection waits for the upstream's first SETTINGS frame.
const H2_SETTINGS_WAIT: Duration = Duration::from_secs(1);

/// Performs the HTTP/2 client handshake on `stream` (prior knowledge for h2c, after ALPN
/// for h2) and drives the connection in a task of the current runtime. `open` is held as
/// long as the connection lives. The connection is PINGed after `keepalive.interval`
/// without a frame from the upstream, idle or not, and closed when a PING goes unanswered
/// for `keepalive.timeout` (its streams fail; new requests go to a fresh connection). It
/// is closed after `idle_timeout` without a stream (see [`super::h2::sweep_once`]).
pub async fn h2_sender(
    address: &str,
    stream: UpstreamStream,
    open: Option<OpenConnection>,
    keepalive: H2Keepalive,
    idle_timeout: Duration,
) -> Result<H2Conn, ConnectError> {
    let state = Arc::new(H2State::new(H2_INITIAL_STREAMS, idle_timeout));
    let io = Watched {
        inner: stream,
        _open: open,
        frames: FrameScanner::new(state.clone()),
    };
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .initial_max_send_streams(H2_INITIAL_STREAMS)
            .keep_alive_interval(keepalive.interval)
            .keep_alive_timeout(keepalive.timeout)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ConnectError::Handshake {
                address: address.to_string(),
                source,
            })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    // The upstream's SETTINGS (its stream limit) come first on the connection: wait for
    // them, briefly, so the first requests do not go beyond a limit lower than 100.
    if tokio::time::timeout(H2_SETTINGS_WAIT, state.settings_read())
        .await
        .is_err()
    {
        tracing::debug!(%address, "no SETTINGS from the upstream yet; using the connection anyway");
    }
    Ok(H2Conn::new(sender, state))
}
