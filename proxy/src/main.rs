//! `proxyd`: parses flags, loads the config, and runs the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

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
    /// Print the shell completion script for bash, zsh or fish.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per subcommand into --dir.
    Man {
        /// Directory to write proxyd.1 and proxyd-<subcommand>.1 into.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// mimalloc rather than glibc's malloc: its per-thread free lists serve a request's
/// allocations for fewer instructions and hold less memory per idle connection (README,
/// Performance).
#[global_allocator]
static ALLOCATOR: proxy::allocator::Allocator = proxy::allocator::Allocator;

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
        Some(Command::Completions { shell }) => {
            clap_complete::generate(shell, &mut Cli::command(), "proxyd", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Some(Command::Man { dir }) => man(dir),
        None => serve(cli.config),
    }
}

/// Writes the manual page to stdout, or every page (one per subcommand) into `dir`.
fn man(dir: Option<PathBuf>) -> ExitCode {
    let written = match &dir {
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), dir)),
        None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout().lock()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let place =
                dir.map_or_else(|| "standard output".to_owned(), |d| d.display().to_string());
            eprintln!("proxyd: writing the manual page to {place}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The address space set aside for routing tables and their series
/// (`proxy::allocator::reserve_table_region`).
const TABLE_REGION_BYTES: usize = 8 << 30;

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
    // Address space only (nothing resident until used): far beyond the ~2 GiB a million
    // routes with their series take.
    if let Err(e) = proxy::allocator::reserve_table_region(TABLE_REGION_BYTES) {
        tracing::warn!(error = %e, "routing tables on the ordinary heap (no region of their own)");
    }
    // Before any thread starts: this reads and clears environment variables.
    let inherited = match proxy::inherit(&config) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("proxyd: {e}");
            return ExitCode::FAILURE;
        }
    };
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
    match runtime.block_on(proxy::run(config, inherited)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("proxyd: {e}");
            ExitCode::FAILURE
        }
    }
}
