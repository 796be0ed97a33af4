//! `proxyd`: parses flags, loads the config, and runs the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "proxyd", version, about = "Routing proxy daemon")]
struct Cli {
    /// Config file (TOML). Without it, an embedded default is used.
    #[arg(long, short, global = true, env = "PROXY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and exit (0 = valid).
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the embedded default config.
    DefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => match proxy::Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::DefaultConfig) => {
            print!("{}", proxy::config::EMBEDDED_DEFAULT);
            ExitCode::SUCCESS
        }
        None => serve(cli.config),
    }
}

fn serve(path: Option<PathBuf>) -> ExitCode {
    let config = match &path {
        Some(p) => proxy::Config::load(p),
        None => proxy::Config::embedded_default(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    proxy::telemetry::init_logging(&config.server.log_level, &config.telemetry);
    if path.is_none() {
        tracing::info!(
            "no --config given: running the embedded default (see `proxyd default-config`)"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(proxy::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("proxyd: {e}");
            ExitCode::FAILURE
        }
    }
}
