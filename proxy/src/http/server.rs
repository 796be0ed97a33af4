//! Accept loop and per-connection hyper server for `http` listeners.

use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::framing::{FramingScan, Verdicts};
use super::proxy::{handle, ConnContext};
use crate::config::ListenerConfig;
use crate::listener::IdleTimeout;
use crate::shutdown::Shutdown;
use crate::state::StateHandle;

/// Serves `listener` until shutdown; connections then finish their current request.
pub async fn serve(listener: TcpListener, config: Arc<ListenerConfig>, state: StateHandle, shutdown: Shutdown) {
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .max_buf_size(config.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    loop {
        // Take a slot first: over the limit, connections wait in the kernel backlog.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.triggered() => return,
        };
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %config.name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.triggered() => return,
        };
        let _ = stream.set_nodelay(true);
        let verdicts = Verdicts::default();
        let ctx = Arc::new(ConnContext {
            listener: config.clone(),
            state: state.clone(),
            shutdown: shutdown.clone(),
            client,
            verdicts: verdicts.clone(),
        });
        let builder = builder.clone();
        let conn_shutdown = shutdown.clone();
        let idle = config.idle_timeout;
        shutdown.spawn(async move {
            let _permit = permit;
            let io = TokioIo::new(IdleTimeout::new(FramingScan::new(stream, verdicts), idle));
            let service = service_fn(move |req| handle(ctx.clone(), req));
            let conn = builder.serve_connection_with_upgrades(io, service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = conn_shutdown.triggered() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%client, error = %e, "client connection ended with an error");
            }
        });
    }
}
