//! `pbusd`: the pbus daemon binary. Parses the command line, sets up
//! logging, raises the fd limit, decides the host reference (`--broker`),
//! binds the listening sockets and runs the
//! server on a single-threaded tokio runtime until SIGTERM or SIGINT.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pbusd::config::Config;
use pbusd::server::Server;

/// The pbus daemon.
#[derive(Debug, Parser)]
#[command(name = "pbusd", version, about = "The pbus message bus daemon")]
struct Args {
    /// Listen on this socket path (repeatable). Default: /run/pbus/bus.sock
    /// as root, $XDG_RUNTIME_DIR/pbus/bus.sock otherwise.
    #[arg(long = "listen", value_name = "PATH")]
    listen: Vec<PathBuf>,
    /// TOML configuration file (limits, listen paths). Every key is optional.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Policy file or directory (overrides the config file's `policy`).
    #[arg(long, value_name = "PATH")]
    policy: Option<PathBuf>,
    /// Print the bus address (`unix:path=...`) on stdout once listening.
    #[arg(long)]
    print_address: bool,
    /// Run as a broker (`mode = "broker"`): take the host's namespaces
    /// from pid 1 of the initial pid namespace, not from pbusd's own, and
    /// refuse to start where they cannot be read (needs the host's pid and
    /// cgroup namespaces and CAP_SYS_PTRACE).
    #[arg(long)]
    broker: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pbusd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if !args.listen.is_empty() {
        config.listen = args.listen.clone();
    }
    if args.policy.is_some() {
        config.policy = args.policy.clone();
    }
    if args.broker {
        config.mode = pbusd::config::Mode::Broker;
    }
    // Root may go up to the kernel's per-process maximum; others to their
    // hard limit.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map(|max| max.min(1 << 20));
    match pbus_sys::process::raise_fd_limit(nr_open) {
        Ok(limit) => tracing::debug!(soft = limit.soft, hard = limit.hard, "fd limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the fd limit"),
    }
    let policy = match &config.policy {
        Some(path) => pbus_policy::Policy::load(path)
            .map_err(|errors| anyhow::anyhow!("invalid policy {}:\n{errors}", path.display()))?,
        None => pbus_policy::Policy::builtin(),
    };
    tracing::info!(
        files = policy.origins().len(),
        rules = policy.rule_count(),
        builtin = policy.includes_builtin(),
        "policy loaded"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let server = Server::bind(config, pbus_policy::PolicyLayers::global(policy))?;
        if args.print_address {
            for path in server.paths() {
                println!("unix:path={}", path.display());
            }
        }
        server.run(shutdown_signal()).await
    })
}

/// Resolves on the first SIGTERM or SIGINT. (SIGHUP reloads the policy;
/// the server handles it.)
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
