//! `proxyctl register`: registers a service and holds the lease until interrupted.

use anyhow::{bail, Result};
use clap::Args;
use proxy_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{code_name, Clients, Reply};
use crate::output::{fields, Output};

/// What to register.
#[derive(Args)]
pub struct RegisterArgs {
    /// Where the proxy reaches the service: `host:port` or `unix:/path`.
    #[arg(long)]
    endpoint: String,
    /// Listener port to be served on (opened if needed, within registration.port_range).
    #[arg(long)]
    port: u16,
    /// Path prefix (HTTP).
    #[arg(long, default_value = "/")]
    path_prefix: String,
    /// Exact host or `*.suffix` (HTTP); any host when left out.
    #[arg(long)]
    host: Option<String>,
    /// Forward the whole port as TCP instead of routing HTTP.
    #[arg(long)]
    tcp: bool,
    /// Service name shown in listings.
    #[arg(long, default_value = "")]
    name: String,
}

/// A stream error in the same words as other calls' errors.
fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(status.code()), status.message())
}

/// Registers and keeps the lease (answering keepalives) until Ctrl-C or SIGTERM; fails if
/// the proxy ends the lease.
pub async fn run(args: RegisterArgs, clients: &mut Clients, out: &Output) -> Result<()> {
    let announce = pb::Announce {
        endpoint: args.endpoint,
        port: u32::from(args.port),
        protocol: if args.tcp {
            pb::RegisteredProtocol::Tcp
        } else {
            pb::RegisteredProtocol::Http
        } as i32,
        host: args.host.unwrap_or_default(),
        path_prefix: args.path_prefix,
        name: args.name,
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::RegisterRequest {
        kind: Some(pb::register_request::Kind::Announce(announce)),
    })
    .await?;
    let mut events = clients
        .registration
        .register(ReceiverStream::new(rx))
        .await
        .reply()?;
    let registered = match events.message().await.map_err(refused)? {
        Some(pb::RegisterEvent {
            kind: Some(pb::register_event::Kind::Registered(r)),
        }) => r,
        _ => bail!("the proxy closed the registration stream"),
    };
    out.show(
        &serde_json::json!({
            "id": registered.id,
            "route": registered.route,
            "listener": registered.listener,
            "address": registered.address,
        }),
        |_| {
            fields(&[
                ("id", registered.id.to_string()),
                ("route", registered.route.clone()),
                ("listener", registered.listener.clone()),
                ("address", registered.address.clone()),
            ])
        },
    )?;
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(
        registered.keepalive_ms.max(100),
    ));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sequence = 0u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = ticker.tick() => {
                sequence += 1;
                let ping = pb::RegisterRequest { kind: Some(pb::register_request::Kind::Ping(pb::Ping { sequence })) };
                if tx.send(ping).await.is_err() {
                    bail!("the registration stream closed");
                }
            }
            event = events.message() => match event.map_err(refused)? {
                Some(_) => {}
                None => bail!("the proxy ended the registration"),
            },
        }
    }
}
