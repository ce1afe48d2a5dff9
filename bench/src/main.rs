//! `pbus-bench`: measures several IPC systems with the same workloads in
//! one command and reports medians over interleaved rounds.
//!
//! Systems: `relay` (a bare Unix-socket relay, the floor), `dbus-daemon`
//! and `dbus-broker` (started privately), and `pbus` once its module is
//! added (see [`systems`]). Run `pbus-bench --help` for the options and
//! `pbus-bench --list` for the scenarios.
//!
//! Module map: [`harness`] runs rounds and workloads; [`worker`] is the
//! other end, the re-executed binary playing servers and clients;
//! [`systems`] holds one module per system; [`scenario`] the fixed
//! scenario list and run sizes; [`report`] the table, JSON and ratios;
//! [`stats`] histograms and medians; [`procs`] child processes and /proc.
//!
//! Hidden subcommands used by the harness itself: `worker`, `relay-server`,
//! `exec-child` and `broker-launch`.

#![forbid(unsafe_code)]

mod harness;
mod procs;
mod report;
mod scenario;
mod stats;
mod systems;
mod worker;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::scenario::{Plan, Scenario};
use crate::systems::ClientKind;

/// Open files the harness and its children may hold (10,000 idle
/// connections plus everything else).
const WANT_NOFILE: u64 = 65_536;
/// Below this, the 10,000-connection scenarios cannot work.
const MIN_NOFILE: u64 = 10_500;

/// Side-by-side benchmarks of pbus, a bare Unix-socket relay, dbus-daemon
/// and dbus-broker, with the same workloads, interleaved rounds and
/// medians over rounds.
#[derive(Parser)]
#[command(name = "pbus-bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    internal: Option<Internal>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Every scenario with fewer, shorter rounds (about 20-30 s per system).
    #[arg(long)]
    quick: bool,
    /// Rounds per scenario and system (default 5, or 3 with --quick).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    rounds: Option<u64>,
    /// Comma-separated systems to run (default: all of this build).
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    systems: Option<Vec<String>>,
    /// Comma-separated scenarios to run (default: all).
    #[arg(long, value_delimiter = ',', value_name = "X,Y")]
    scenarios: Option<Vec<String>>,
    /// JSON lines on stdout (one per scenario and system); the table goes
    /// to stderr.
    #[arg(long)]
    json: bool,
    /// Run every process (daemons, clients, servers) on this one CPU.
    #[arg(long, value_name = "N")]
    pin_cpu: Option<usize>,
    /// List the systems and scenarios, then exit.
    #[arg(long)]
    list: bool,
}

#[derive(Subcommand)]
enum Internal {
    /// Plays one part of a workload (started by the harness).
    #[command(hide = true)]
    Worker {
        #[arg(long, value_enum)]
        client: ClientKind,
        #[arg(long)]
        address: String,
        #[arg(long)]
        job: String,
    },
    /// The bare relay daemon (started by the harness).
    #[command(hide = true, name = "relay-server")]
    RelayServer {
        #[arg(long)]
        socket: PathBuf,
    },
    /// Executes a program that must die with the harness.
    #[command(hide = true, name = "exec-child")]
    ExecChild {
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
    /// Prepares and executes dbus-broker-launch.
    #[command(hide = true, name = "broker-launch")]
    BrokerLaunch {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        journal: Option<PathBuf>,
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.internal {
        Some(Internal::Worker {
            client,
            address,
            job,
        }) => worker::run(client, &address, &job),
        Some(Internal::RelayServer { socket }) => {
            procs::die_with_parent().and_then(|()| systems::relay::daemon::run(&socket))
        }
        Some(Internal::ExecChild { command }) => Err(procs::exec_with_parent_death(
            &command[0],
            &command[1..],
            &[],
        )),
        Some(Internal::BrokerLaunch {
            socket,
            journal,
            command,
        }) => Err(systems::dbus::broker::launch(
            &socket,
            journal.as_deref(),
            &command[0],
            &command[1..],
        )),
        None => return run_harness(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pbus-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_harness(args: RunArgs) -> ExitCode {
    if args.list {
        print_list();
        return ExitCode::SUCCESS;
    }
    match harness_main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pbus-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_list() {
    println!("systems in this build:");
    for s in systems::all() {
        match s.check_available() {
            Ok(()) => println!("  {}", s.name()),
            Err(reason) => println!("  {} (unavailable: {reason})", s.name()),
        }
    }
    println!("scenarios:");
    for s in Scenario::ALL {
        println!("  {s}");
    }
}

fn harness_main(args: RunArgs) -> Result<ExitCode> {
    let rounds = args.rounds.map(|r| r as usize);
    let mut plan = if args.quick {
        Plan::quick(rounds)
    } else {
        Plan::full(rounds)
    };
    plan.pin_cpu = args.pin_cpu;
    // Check the selection before touching anything.
    let selected = harness::select_systems(args.systems.as_deref())?;
    harness::select_scenarios(args.scenarios.as_deref())?;
    let header = describe_run(&plan, args.quick, &selected);
    if let Some(cpu) = plan.pin_cpu {
        // Every process started from now on inherits the affinity.
        procs::pin_to_cpu(cpu)?;
    }
    let nofile = procs::raise_nofile_limit(WANT_NOFILE);
    if nofile < MIN_NOFILE {
        eprintln!(
            "warning: open-file limit is {nofile}; rss_idle_10k and connect_rate need {MIN_NOFILE}"
        );
    }
    eprintln!("{header}");
    let options = harness::Options {
        plan,
        systems: args.systems,
        scenarios: args.scenarios,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the harness runtime")?;
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = harness::run(&options) => Some(r),
            () = shutdown_requested() => None,
        }
    });
    // Dropping the run future above killed every child by pid and removed
    // the temporary directories.
    let Some(results) = outcome else {
        eprintln!("pbus-bench: interrupted; all benchmark processes stopped");
        return Ok(ExitCode::from(130));
    };
    let results = results?;
    let table = format!("{header}\n\n{}\n{}", results.table(), results.ratios());
    if args.json {
        let mut out = std::io::stdout().lock();
        for line in results.json_lines() {
            writeln!(out, "{line}")?;
        }
        eprintln!("\n{table}");
    } else {
        println!("\n{table}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on Ctrl-C, SIGTERM or SIGHUP.
async fn shutdown_requested() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
}

/// One line saying under which conditions the figures were taken.
fn describe_run(plan: &Plan, quick: bool, selected: &[Box<dyn systems::System>]) -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let pin = match plan.pin_cpu {
        Some(cpu) => format!("all processes pinned to CPU {cpu}"),
        None => "unpinned".into(),
    };
    let versions: Vec<String> = selected
        .iter()
        .filter_map(|s| s.version().map(|v| format!("{}: {v}", s.name())))
        .collect();
    // Other work on the machine shows here first when figures look odd.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let mut line = format!(
        "pbus-bench {} plan, {} rounds (medians), {pin}; {cpus} CPUs online, load average {load} at start, Linux {kernel}",
        if quick { "quick" } else { "full" },
        plan.rounds
    );
    if !versions.is_empty() {
        line.push_str(&format!("; {}", versions.join(", ")));
    }
    line
}
