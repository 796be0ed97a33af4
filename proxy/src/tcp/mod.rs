//! L4 forwarding for `tcp` listeners: accept, pick an upstream (trying the next one when a
//! connection fails), then copy both ways with half-close and an idle timeout.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::ListenerConfig;
use crate::listener::IdleTimeout;
use crate::shutdown::Shutdown;
use crate::state::StateHandle;
use crate::upstream::{connect, ConnectError, InFlight};

/// Serves `listener` until shutdown; open streams are left to finish (up to the drain timeout).
pub async fn serve(listener: TcpListener, config: Arc<ListenerConfig>, state: StateHandle, shutdown: Shutdown) {
    let limit = Arc::new(Semaphore::new(config.max_connections));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.triggered() => return,
        };
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(listener = %config.name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.triggered() => return,
        };
        let _ = stream.set_nodelay(true);
        let config = config.clone();
        let state = state.clone();
        shutdown.spawn(async move {
            let _permit = permit;
            if let Err(reason) = forward(stream, &config, &state).await {
                tracing::warn!(listener = %config.name, %client, %reason, "tcp connection not forwarded");
            }
        });
    }
}

async fn forward(client: TcpStream, config: &ListenerConfig, state: &StateHandle) -> Result<(), String> {
    let pool = state
        .routing()
        .tcp_pool(&config.name)
        .cloned()
        .ok_or_else(|| "no tcp route for this listener".to_string())?;
    let candidates = pool.candidates().map_err(|e| format!("pool {:?}: {e:?}", pool.name))?;
    let mut last: Option<ConnectError> = None;
    let mut connected: Option<(TcpStream, InFlight)> = None;
    for upstream in candidates {
        let in_flight = upstream.start();
        match connect(&upstream.address, pool.connect_timeout).await {
            Ok(stream) => {
                upstream.clear_ejection();
                connected = Some((stream, in_flight));
                break;
            }
            Err(e) => {
                upstream.eject();
                tracing::warn!(pool = %pool.name, upstream = %upstream.address, error = %e, "upstream connection failed");
                last = Some(e);
            }
        }
    }
    let Some((mut upstream, in_flight)) = connected else {
        return Err(last.map_or_else(|| "no upstream".to_string(), |e| e.to_string()));
    };
    let mut client = IdleTimeout::new(client, config.idle_timeout);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => {
            tracing::debug!(listener = %config.name, upstream = %in_flight.upstream().address, bytes_up = up, bytes_down = down, "tcp stream closed");
            Ok(())
        }
        Err(e) => Err(format!("stream to {} ended: {e}", in_flight.upstream().address)),
    }
}
