//! `proxyctl register`: registers a service and holds the lease until interrupted,
//! registering again whenever the proxy ends the stream (upgrade, restart).

use std::time::Duration;

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
    /// Certificate chain (PEM file) to terminate TLS with on the port (HTTP becomes https,
    /// TCP becomes tls); needs --key.
    #[arg(long, requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// Private key (PEM file) of --cert.
    #[arg(long, requires = "cert")]
    key: Option<std::path::PathBuf>,
}

/// The contents of a PEM file given on the command line.
fn read_pem(path: Option<&std::path::Path>, what: &str) -> Result<String> {
    match path {
        None => Ok(String::new()),
        Some(p) => {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("--{what} {}: {e}", p.display()))
        }
    }
}

/// A stream error in the same words as other calls' errors.
fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(status.code()), status.message())
}

/// How the stream of one registration ended.
enum Ended {
    /// Ctrl-C or SIGTERM: the lease is released.
    Stopped,
    /// The proxy ended the stream or went away (an upgrade, a restart).
    Lost(String),
}

/// First wait before registering again; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between attempts to register again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Registers and keeps the lease (answering keepalives) until Ctrl-C or SIGTERM. When the
/// proxy ends the stream (it was upgraded or restarted), registers again with backoff
/// (100 ms doubling to 5 s). Fails only if the first registration is refused.
pub async fn run(args: RegisterArgs, clients: &mut Clients, out: &Output) -> Result<()> {
    let tls_certificate_pem = read_pem(args.cert.as_deref(), "cert")?;
    let tls_private_key_pem = read_pem(args.key.as_deref(), "key")?;
    let announce = pb::Announce {
        tls_certificate_pem,
        tls_private_key_pem,
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
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut session = open(clients, &announce).await?;
    loop {
        show(&session.0, out)?;
        match hold(session, &mut term).await {
            Ended::Stopped => return Ok(()),
            Ended::Lost(reason) => eprintln!("registration lost ({reason}); registering again"),
        }
        let mut wait = FIRST_BACKOFF;
        session = loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = term.recv() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
            match open(clients, &announce).await {
                Ok(session) => break session,
                Err(e) => {
                    eprintln!("registering again failed: {e:#}; retrying in {wait:?}");
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            }
        };
    }
}

/// An open registration: what the proxy answered, our sending half, its events.
type Session = (
    pb::Registered,
    mpsc::Sender<pb::RegisterRequest>,
    tonic::Streaming<pb::RegisterEvent>,
);

/// Opens a Register stream and announces.
async fn open(clients: &mut Clients, announce: &pb::Announce) -> Result<Session> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::RegisterRequest {
        kind: Some(pb::register_request::Kind::Announce(announce.clone())),
    })
    .await?;
    let mut events = clients
        .registration
        .register(ReceiverStream::new(rx))
        .await
        .reply()?;
    match events.message().await.map_err(refused)? {
        Some(pb::RegisterEvent {
            kind: Some(pb::register_event::Kind::Registered(r)),
        }) => Ok((r, tx, events)),
        _ => bail!("the proxy closed the registration stream"),
    }
}

fn show(registered: &pb::Registered, out: &Output) -> Result<()> {
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
    )
}

/// Answers keepalives until a signal or the end of the stream.
async fn hold(session: Session, term: &mut tokio::signal::unix::Signal) -> Ended {
    let (registered, tx, mut events) = session;
    let mut ticker = tokio::time::interval(Duration::from_millis(registered.keepalive_ms.max(100)));
    let mut sequence = 0u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ended::Stopped,
            _ = term.recv() => return Ended::Stopped,
            _ = ticker.tick() => {
                sequence += 1;
                let ping = pb::RegisterRequest { kind: Some(pb::register_request::Kind::Ping(pb::Ping { sequence })) };
                if tx.send(ping).await.is_err() {
                    return Ended::Lost("the registration stream closed".into());
                }
            }
            event = events.message() => match event {
                Ok(Some(_)) => {}
                Ok(None) => return Ended::Lost("the proxy ended the stream".into()),
                Err(status) => return Ended::Lost(refused(status).to_string()),
            },
        }
    }
}
