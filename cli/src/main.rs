//! `pbusctl`: a busctl-style command line for pbus. Each subcommand lives in
//! its own function; output is a table for people or JSON with `--json`.
//!
//! Exit codes: 0 success, 1 the bus or a peer answered with an error (or
//! could not be reached), 2 bad usage (clap).
#![forbid(unsafe_code)]

mod output;
mod policy_cmd;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use pbus::{Address, Connection};

/// Inspect and drive a pbus bus.
#[derive(Debug, Parser)]
#[command(name = "pbusctl", version, about)]
struct Cli {
    /// Bus address (`unix:path=...`). Default: $PBUS_ADDRESS, else
    /// /run/pbus/bus.sock as root or $XDG_RUNTIME_DIR/pbus/bus.sock.
    #[arg(long, global = true, value_name = "ADDRESS")]
    address: Option<Address>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List well-known names and their owners.
    List {
        /// Also list the unique names of all connections.
        #[arg(long)]
        unique: bool,
    },
    /// Show a peer's identity as the bus sees it (uid, gid, pid, groups,
    /// label, container, namespaces).
    Status {
        /// Unique (`:1.5`) or well-known name; omit for pbusctl itself.
        name: Option<String>,
    },
    /// Queued bytes, fds and messages per peer, their quota use per sender
    /// uid, and daemon-wide totals.
    Stats,
    /// Print the traffic on the bus: broadcast signals, and (with the
    /// monitor right) copies of calls, replies and unicast signals.
    Monitor {
        /// Only messages from this sender.
        #[arg(long)]
        sender: Option<String>,
        /// Only this method or signal name.
        #[arg(long)]
        member: Option<String>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Policy tools: check files, explain decisions, reload.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Check that the bus answers, and how fast.
    Ping {
        /// Number of pings.
        #[arg(short, long, default_value_t = 1)]
        count: u32,
    },
}

fn main() -> ExitCode {
    pbus_sys::process::restore_default_sigpipe();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("pbusctl: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pbusctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut builder = Connection::builder().client_name("pbusctl");
    if let Some(address) = cli.address.clone() {
        builder = builder.address(address);
    }
    if let Command::Policy(command) = cli.command {
        // `policy check` and offline `explain` need no bus.
        return policy_cmd::run(command, cli.json, || async { Ok(builder.build().await?) }).await;
    }
    let connection = builder.build().await?;
    match cli.command {
        Command::Policy(_) => unreachable!("handled above"),
        Command::Monitor {
            sender,
            member,
            count,
        } => {
            monitor(
                &connection,
                sender.as_deref(),
                member.as_deref(),
                count,
                cli.json,
            )
            .await
        }
        Command::List { unique } => list(&connection, unique, cli.json).await,
        Command::Status { name } => {
            status(&connection, name.as_deref().unwrap_or(""), cli.json).await
        }
        Command::Stats => stats(&connection, cli.json).await,
        Command::Ping { count } => ping(&connection, count, cli.json).await,
    }
}

async fn list(connection: &Connection, unique: bool, json: bool) -> anyhow::Result<()> {
    let names = connection.list_names(unique).await?;
    if json {
        let rows: Vec<_> = names
            .iter()
            .map(|entry| {
                serde_json::json!({
                    "name": entry.name,
                    "owner": entry.owner,
                    "queued": entry.queued,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|entry| {
            vec![
                entry.name.clone(),
                entry.owner.clone(),
                entry.queued.to_string(),
            ]
        })
        .collect();
    output::print_table(&["NAME", "OWNER", "QUEUED"], &rows);
    Ok(())
}

async fn status(connection: &Connection, name: &str, json: bool) -> anyhow::Result<()> {
    let identity = connection.peer_identity(name).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&output::identity_json(&identity))?
        );
    } else {
        output::print_identity(&identity);
    }
    Ok(())
}

async fn stats(connection: &Connection, json: bool) -> anyhow::Result<()> {
    let stats = connection.stats().await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&output::stats_json(&stats))?
        );
    } else {
        output::print_stats(&stats);
    }
    Ok(())
}

async fn monitor(
    connection: &Connection,
    sender: Option<&str>,
    member: Option<&str>,
    count: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let mut rule = pbus::MatchRule::new();
    if let Some(sender) = sender {
        rule = rule.sender(sender);
    }
    if let Some(member) = member {
        rule = rule.member(member);
    }
    let mut broadcasts = connection.subscribe(rule.clone()).await?;
    let mut copies = match connection.subscribe(rule.eavesdrop(true)).await {
        Ok(stream) => Some(stream),
        Err(error) => {
            eprintln!("pbusctl: only broadcast signals are shown: {error}");
            None
        }
    };
    let mut seen = 0u64;
    loop {
        let message = tokio::select! {
            message = broadcasts.next() => message,
            message = async { copies.as_mut().expect("guarded").next().await }, if copies.is_some() => message,
        };
        let Some(message) = message else {
            anyhow::bail!("the bus closed the connection");
        };
        output::print_message(&message, json);
        seen += 1;
        if count.is_some_and(|count| seen >= count) {
            return Ok(());
        }
    }
}

async fn ping(connection: &Connection, count: u32, json: bool) -> anyhow::Result<()> {
    for round in 0..count.max(1) {
        let started = Instant::now();
        let reply = connection.ping().await?;
        let took = started.elapsed();
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "bus_id": reply.bus_id,
                    "uptime_ms": reply.uptime_ms,
                    "rtt_us": took.as_micros() as u64,
                })
            );
        } else {
            println!(
                "pong from bus {} (up {}) in {} us",
                reply.bus_id,
                output::human_duration(Duration::from_millis(reply.uptime_ms)),
                took.as_micros()
            );
        }
        if round + 1 < count {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}
