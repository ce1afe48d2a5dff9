//! `pbusctl policy`: check policy files offline, explain decisions (for a
//! live peer through the bus, or for identities described on the command
//! line against policy files), and ask the bus to reload its policy.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use pbus::Connection;
use pbus_policy::{FileAccess, Operation, Policy, Right};

/// `pbusctl policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file or directory: errors with file:line:col, exit 1.
    Check {
        /// A *.toml file or a directory of them.
        path: PathBuf,
    },
    /// Explain whether a right is granted, and which rule decided.
    ///
    /// Live (through the bus): `--subject NAME` (default: pbusctl itself)
    /// and `--target NAME` name connected peers. Offline: `--policy PATH`
    /// with `--subject-identity SPEC` (and `--target-identity SPEC`), where
    /// SPEC is like `uid=1000,gid=1000,container=docker:ID,label=...`.
    Explain(ExplainArgs),
    /// Ask the bus to re-read its policy (root or the daemon's uid).
    Reload,
}

/// Arguments of `pbusctl policy explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The right: own, see, talk, receive, pass-fds, memfd, monitor, file.
    #[arg(long, default_value = "talk")]
    right: String,
    /// The name to own, see, talk to, receive from, pass fds to.
    #[arg(long, default_value = "")]
    target: String,
    /// Method or signal name (talk, receive).
    #[arg(long, default_value = "")]
    member: String,
    /// Live: the acting peer (unique or well-known name).
    #[arg(long, default_value = "")]
    subject: String,
    /// Offline: policy file or directory to evaluate instead of asking the bus.
    #[arg(long, value_name = "PATH")]
    policy: Option<PathBuf>,
    /// Offline: the acting peer's identity.
    #[arg(long, value_name = "SPEC")]
    subject_identity: Option<String>,
    /// Offline: the other peer's identity (talk, see, receive, pass-fds, memfd).
    #[arg(long, value_name = "SPEC")]
    target_identity: Option<String>,
    /// Offline, `file` right: the path to open.
    #[arg(long)]
    path: Option<PathBuf>,
    /// Offline, `file` right: access wanted, e.g. `read`, `rw`, `read,create`.
    #[arg(long, default_value = "read")]
    access: String,
}

/// Runs `pbusctl policy ...`; `connect` is called only for live commands.
pub async fn run<F, Fut>(command: PolicyCommand, json: bool, connect: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Connection>>,
{
    match command {
        PolicyCommand::Check { path } => check(&path, json),
        PolicyCommand::Explain(args)
            if args.policy.is_some() || args.subject_identity.is_some() =>
        {
            explain_offline(&args, json)
        }
        PolicyCommand::Explain(args) => {
            let connection = connect().await?;
            let reply = connection
                .explain_policy(&args.subject, &args.right, &args.target, &args.member)
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "allowed": reply.allowed,
                        "right": reply.right,
                        "rule": reply.rule,
                        "reason": reply.reason,
                    })
                );
            } else {
                print!("{}", reply.explanation);
            }
            Ok(())
        }
        PolicyCommand::Reload => {
            let connection = connect().await?;
            let reply = connection.reload_policy().await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "files": reply.files,
                        "rules": reply.rules,
                        "peers": reply.peers,
                        "builtin": reply.builtin,
                    })
                );
            } else {
                println!(
                    "policy reloaded: {} file(s), {} rules{}; {} peers recompiled",
                    reply.files,
                    reply.rules,
                    if reply.builtin {
                        " (with the built-in default)"
                    } else {
                        ""
                    },
                    reply.peers
                );
            }
            Ok(())
        }
    }
}

fn check(path: &Path, json: bool) -> anyhow::Result<()> {
    match pbus_policy::check_path(path) {
        Ok(summary) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": true,
                        "files": summary.files,
                        "rules": summary.rules,
                        "builtin": summary.builtin,
                        "origins": summary.origins,
                    })
                );
            } else {
                println!("{}: ok, {summary}", path.display());
            }
            Ok(())
        }
        Err(errors) => {
            if json {
                let list: Vec<_> = errors
                    .iter()
                    .map(|error| {
                        serde_json::json!({
                            "file": error.origin,
                            "line": error.line(),
                            "column": error.column(),
                            "message": error.message,
                        })
                    })
                    .collect();
                println!("{}", serde_json::json!({ "ok": false, "errors": list }));
            }
            anyhow::bail!("{} error(s) in {}:\n{errors}", errors.len(), path.display())
        }
    }
}

fn explain_offline(args: &ExplainArgs, json: bool) -> anyhow::Result<()> {
    let policy = match &args.policy {
        Some(path) => {
            Policy::load(path).map_err(|errors| anyhow::anyhow!("invalid policy:\n{errors}"))?
        }
        None => Policy::builtin(),
    };
    let spec = args
        .subject_identity
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("offline explain needs --subject-identity"))?;
    let subject = pbus_policy::parse_identity(spec)?;
    let target = || -> anyhow::Result<pbus_identity::PeerIdentity> {
        let spec = args
            .target_identity
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--right {} needs --target-identity", args.right))?;
        Ok(pbus_policy::parse_identity(spec)?)
    };
    let names = || -> Vec<String> {
        if args.target.is_empty() {
            Vec::new()
        } else {
            vec![args.target.clone()]
        }
    };
    let right = Right::parse(&args.right)
        .ok_or_else(|| anyhow::anyhow!("unknown right {:?}", args.right))?;
    let operation = match right {
        Right::Own => Operation::Own {
            name: args.target.clone(),
        },
        Right::See => Operation::See {
            owner: target()?,
            name: args.target.clone(),
        },
        Right::Talk => Operation::Talk {
            receiver: target()?,
            names: names(),
            member: args.member.clone(),
        },
        Right::Receive => Operation::Receive {
            sender: target()?,
            names: names(),
            member: args.member.clone(),
        },
        Right::PassFds => Operation::PassFds {
            receiver: target()?,
            names: names(),
        },
        Right::Memfd => Operation::Memfd {
            receiver: target()?,
            names: names(),
        },
        Right::Monitor => Operation::Monitor,
        Right::File => Operation::File {
            path: args
                .path
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--right file needs --path"))?,
            access: FileAccess::parse(&args.access).ok_or_else(|| {
                anyhow::anyhow!("bad --access {:?} (read, write, create)", args.access)
            })?,
        },
    };
    let explanation = policy.explain(&subject, &operation);
    if json {
        let decision = &explanation.decision;
        println!(
            "{}",
            serde_json::json!({
                "allowed": decision.allowed,
                "right": decision.right.as_str(),
                "rule": decision.rule.as_ref().map(|rule| rule.to_string()),
                "reason": decision.reason,
                "memfd_limit": explanation.memfd_limit,
            })
        );
    } else {
        print!("{explanation}");
    }
    Ok(())
}
