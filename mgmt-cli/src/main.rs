//! `proxyctl`: the command-line client of the proxyd management API.
//!
//! `proxyctl [--socket PATH | --addr HOST:PORT --token-file FILE [--ca-file FILE [--cert FILE
//! --key FILE]]] [--output json] <noun> <verb>`

mod admin;
mod client;
mod cluster;
mod discovery;
mod output;
mod pools;
mod register;
mod routes;
mod routes_csv;
mod tcp_routes;
mod tls;
mod top;
mod upstreams;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser, Subcommand};
use proxyctl::document;

use crate::client::Target;
use crate::output::{Format, Output};

/// Manage a running proxyd through its gRPC management API.
#[derive(Parser)]
#[command(name = "proxyctl", version)]
struct Cli {
    /// Unix socket of the management API.
    #[arg(
        long,
        global = true,
        env = "PROXY_MGMT_SOCKET",
        default_value = "/run/proxy/mgmt.sock"
    )]
    socket: PathBuf,
    /// Use the TCP listener at HOST:PORT instead of the unix socket.
    #[arg(long, global = true)]
    addr: Option<String>,
    /// File holding the bearer token for --addr.
    #[arg(long, global = true, requires = "addr")]
    token_file: Option<PathBuf>,
    /// Connect to --addr over TLS, trusting the CA certificates in this PEM file.
    #[arg(long, global = true, requires = "addr")]
    ca_file: Option<PathBuf>,
    /// PEM client certificate chain to present over TLS (with --key). Given before the
    /// subcommand: `tls certs add` and `register` have --cert/--key of their own.
    #[arg(long, requires_all = ["ca_file", "key"])]
    cert: Option<PathBuf>,
    /// PEM private key of --cert (before the subcommand).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Name to check in the daemon's certificate (default: the host part of --addr).
    #[arg(long, global = true, requires = "ca_file")]
    server_name: Option<String>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// HTTP routes: list, get, add, update, rm, import CSV.
    #[command(subcommand)]
    Routes(routes::RoutesCommand),
    /// TCP routes: list, get, add, update, rm.
    #[command(subcommand, name = "tcp-routes")]
    TcpRoutes(tcp_routes::TcpRoutesCommand),
    /// Pools: list, get, add, update, rm.
    #[command(subcommand)]
    Pools(pools::PoolsCommand),
    /// Upstreams of a pool: list, add, rm, drain, activate.
    #[command(subcommand)]
    Upstreams(upstreams::UpstreamsCommand),
    /// Discovery sources: list.
    #[command(subcommand)]
    Discovery(discovery::DiscoveryCommand),
    /// Fleet mode: the nodes sharing their objects through etcd (status).
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Registers a service and holds the lease until interrupted.
    Register(register::RegisterArgs),
    /// TLS: the on-demand allowlist (allow), certificates (certs), ACME status.
    #[command(subcommand)]
    Tls(tls::TlsCommand),
    /// Version, pid, uptime, listeners, object counts and state revision.
    Status,
    /// Applies a batch of changes from a TOML or JSON file, atomically.
    Apply {
        /// File with `changes = [...]` (`-` for standard input).
        file: PathBuf,
    },
    /// Prints the API-owned state as JSON (the input of `import`).
    Export,
    /// Makes the API-owned state equal to a JSON or TOML document, atomically.
    Import {
        /// File as printed by `export` (`-` for standard input).
        file: PathBuf,
        /// Only report what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// Makes the daemon re-read its config file.
    Reload,
    /// Hands the listening sockets to a new proxyd process without dropping connections.
    Upgrade {
        /// Wait until the new process is ready (or failed). The daemon starts
        /// `server.executable` as its config file names it now; edit that to switch binaries.
        #[arg(long)]
        wait: bool,
    },
    /// Stops accepting, finishes in-flight work and exits.
    Drain {
        /// Longest time to wait for in-flight work (e.g. 30s).
        #[arg(long)]
        timeout: Option<humantime::Duration>,
    },
    /// Routes and pools with req/s, error rate and p99, refreshed (reads the admin listener's /metrics).
    Top(top::TopArgs),
    /// Prints the shell completion script for bash, zsh or fish.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Prints the manual page (roff), or writes one page per subcommand into --dir.
    Man {
        /// Directory to write proxyctl.1 and proxyctl-<subcommand>.1 into.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Writes the completion script or manual pages of `cmd` (named `name`): what a package
/// installs next to the binary, made from the same definitions that parse the flags.
fn print_docs(
    cmd: clap::Command,
    shell: Option<clap_complete::Shell>,
    dir: Option<PathBuf>,
) -> Result<()> {
    let name = cmd.get_name().to_owned();
    let mut cmd = cmd;
    match (shell, dir) {
        (Some(shell), _) => {
            clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
        }
        (None, Some(dir)) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing manual pages into {}", dir.display()))?;
        }
        (None, None) => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .context("writing the manual page")?;
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    // `top` reads the admin listener, not the management API.
    match cli.command {
        Command::Top(args) => return top::run(args, cli.output).await,
        // Neither needs a daemon: they describe the command line itself.
        Command::Completions { shell } => return print_docs(Cli::command(), Some(shell), None),
        Command::Man { dir } => return print_docs(Cli::command(), None, dir),
        _ => {}
    }
    let target = match cli.addr {
        Some(addr) => Target::Tcp {
            addr,
            token_file: cli.token_file,
            tls: cli.ca_file.map(|ca_file| client::ClientTls {
                ca_file,
                identity: cli.cert.zip(cli.key),
                server_name: cli.server_name,
            }),
        },
        None => Target::Unix(cli.socket),
    };
    let out = Output::new(cli.output);
    let mut clients = client::connect(&target).await?;
    let c = &mut clients;
    match cli.command {
        Command::Routes(cmd) => routes::run(cmd, c, &out).await,
        Command::TcpRoutes(cmd) => tcp_routes::run(cmd, c, &out).await,
        Command::Pools(cmd) => pools::run(cmd, c, &out).await,
        Command::Upstreams(cmd) => upstreams::run(cmd, c, &out).await,
        Command::Discovery(cmd) => discovery::run(cmd, c, &out).await,
        Command::Cluster(cmd) => cluster::run(cmd, c, &out).await,
        Command::Register(args) => register::run(args, c, &out).await,
        Command::Tls(cmd) => tls::run(cmd, c, &out).await,
        Command::Status => admin::status(c, &out).await,
        Command::Apply { file } => admin::apply(file, c, &out).await,
        Command::Export => admin::export(c).await,
        Command::Import { file, dry_run } => admin::import(file, dry_run, c, &out).await,
        Command::Reload => admin::reload(c, &out).await,
        Command::Upgrade { wait } => admin::upgrade(wait, c, &out).await,
        Command::Drain { timeout } => admin::drain(timeout, c, &out).await,
        Command::Top(args) => top::run(args, cli.output).await,
        Command::Completions { shell } => print_docs(Cli::command(), Some(shell), None),
        Command::Man { dir } => print_docs(Cli::command(), None, dir),
    }
}

/// The error and its causes on one line, skipping causes the text already contains.
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("proxyctl: {}", describe(&err));
            ExitCode::FAILURE
        }
    }
}
