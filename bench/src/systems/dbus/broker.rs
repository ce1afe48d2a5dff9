//! The `dbus-broker` system: dbus-broker under its launcher, without
//! systemd.
//!
//! `dbus-broker-launch` takes its listening socket by socket activation
//! (`LISTEN_FDS=1`, `LISTEN_PID`, fd 3) and forks the broker, which it
//! talks to over a private controller socket. Two more things it expects
//! from systemd are provided here:
//!
//! - It logs to the journal and refuses to start if
//!   `/run/systemd/journal/socket` cannot be connected. Where that socket is
//!   missing (containers, CI), the launcher is started in a private mount
//!   namespace with a tmpfs over `/run/systemd` (or the deepest existing
//!   parent) holding a symlink to a datagram socket the harness reads; the
//!   last messages are shown if the broker fails. This needs root; on a
//!   systemd host nothing is changed and the real journal is used.
//! - It connects to the "regular" bus of its scope (for activation through
//!   systemd, unused here). `DBUS_SESSION_BUS_ADDRESS` points it at the
//!   broker itself, so that is one extra, idle peer on the bus.
//!
//! The hidden subcommand `pbus-bench broker-launch` ([`launch`]) does this
//! set-up in the child process and then executes the launcher in place, so
//! the harness holds the launcher's pid. The broker is measured (CPU, RSS),
//! not the launcher; it dies with the launcher (it sets its own parent-death
//! signal) and is also killed by pid when the instance ends.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::future::LocalBoxFuture;
use tempfile::TempDir;

use super::wire::LightConn;
use super::{address_of, bus_config};
use crate::procs::{
    children_named, exec_with_parent_death, find_program, self_command, version_of, ChildProc,
    LogTail,
};
use crate::scenario::Scenario;
use crate::systems::{ClientKind, Instance, LightRole, System};

const LAUNCHER: &str = "dbus-broker-launch";
const BROKER: &str = "dbus-broker";
/// Where the launcher insists on sending its log.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// The dbus-broker system.
pub struct DbusBroker;

fn needs_private_journal() -> bool {
    !Path::new(JOURNAL_SOCKET).exists()
}

impl System for DbusBroker {
    fn name(&self) -> &'static str {
        "dbus-broker"
    }

    fn client(&self) -> ClientKind {
        ClientKind::Dbus
    }

    fn version(&self) -> Option<String> {
        version_of(BROKER)
    }

    fn check_available(&self) -> Result<(), String> {
        for program in [LAUNCHER, BROKER] {
            if find_program(program).is_none() {
                return Err(format!(
                    "`{program}` not found on PATH (Debian: package dbus-broker)"
                ));
            }
        }
        if needs_private_journal() && !nix::unistd::geteuid().is_root() {
            return Err(format!(
                "{JOURNAL_SOCKET} is missing and faking it in a private mount namespace needs root"
            ));
        }
        Ok(())
    }

    fn skip_reason(&self, scenario: Scenario) -> Option<String> {
        super::skip_reason(scenario)
    }

    fn start(&self, dir: TempDir) -> LocalBoxFuture<'_, Result<Instance>> {
        Box::pin(start(dir))
    }
}

async fn start(dir: TempDir) -> Result<Instance> {
    let launcher = find_program(LAUNCHER).context("dbus-broker-launch disappeared")?;
    let socket = dir.path().join("bus.sock");
    let address = address_of(&socket);
    let config = dir.path().join("bus.conf");
    std::fs::write(&config, bus_config(None)).context("writing the dbus-broker configuration")?;

    let mut cmd = self_command(["broker-launch", "--socket"])?;
    cmd.arg(&socket);
    let log = LogTail::default();
    let mut log_task = None;
    if needs_private_journal() {
        let journal = dir.path().join("journal.sock");
        log_task = Some(read_journal(&journal, log.clone())?);
        cmd.arg("--journal").arg(&journal);
    }
    cmd.arg("--")
        .arg(&launcher)
        .args(["--scope", "user", "--config-file"])
        .arg(&config);
    let mut proc = ChildProc::spawn_logged(cmd, LAUNCHER, &log)?;

    let failure = |e: anyhow::Error| log.explain(e, "dbus-broker");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if proc.has_exited() {
            // Give the log reader a moment to catch the launcher's last words.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Err(failure(anyhow!(
                "dbus-broker-launch exited during start-up"
            )));
        }
        match LightConn::connect(&address, LightRole::Idle).await {
            Ok(_) => break,
            Err(e) if Instant::now() >= deadline => {
                return Err(failure(
                    e.context("dbus-broker did not become ready in 10s"),
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }

    let broker = children_named(proc.pid(), BROKER)
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no dbus-broker process under dbus-broker-launch"))?;
    let mut instance = Instance::new(address, broker, vec![proc], dir);
    instance.add_descendant(broker);
    instance.set_log(log, log_task);
    Ok(instance)
}

/// Binds a journal-protocol datagram socket at `path` and keeps the
/// `MESSAGE=` lines sent to it in `log`.
fn read_journal(path: &Path, log: LogTail) -> Result<tokio::task::JoinHandle<()>> {
    let socket = tokio::net::UnixDatagram::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    Ok(tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = socket.recv(&mut buf).await {
            let text = String::from_utf8_lossy(&buf[..n]);
            for line in text.lines() {
                if let Some(message) = line.strip_prefix("MESSAGE=") {
                    log.push(message.to_string());
                }
            }
        }
    }))
}

/// Body of `pbus-bench broker-launch`: prepares the process the launcher
/// needs and executes `program args...` in place. Returns only on failure.
///
/// `socket` becomes fd 3 (`LISTEN_FDS=1`, `LISTEN_PID` is this pid, which
/// the launcher keeps). With `journal`, a private mount namespace makes
/// `/run/systemd/journal/socket` point at that datagram socket.
pub fn launch(
    socket: &Path,
    journal: Option<&Path>,
    program: &OsString,
    args: &[OsString],
) -> anyhow::Error {
    match prepare(socket, journal) {
        // `fd3` must stay open until the exec, which only returns on error.
        Ok(fd3) => {
            let env = [
                ("LISTEN_FDS", "1".to_string()),
                ("LISTEN_PID", std::process::id().to_string()),
                ("DBUS_SESSION_BUS_ADDRESS", address_of(socket)),
            ];
            let err = exec_with_parent_death(program, args, &env);
            drop(fd3);
            err
        }
        Err(e) => e,
    }
}

fn prepare(socket: &Path, journal: Option<&Path>) -> Result<OwnedFd> {
    // Take fd 3 before anything else opens a file; it becomes the socket.
    let mut fd3: OwnedFd = std::fs::File::open("/dev/null")
        .context("opening /dev/null")?
        .into();
    if fd3.as_raw_fd() != 3 {
        bail!(
            "fd 3 is already in use (got fd {}); cannot pass the socket",
            fd3.as_raw_fd()
        );
    }
    if let Some(journal) = journal {
        fake_journal(journal)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    // dup2 leaves the new descriptor without FD_CLOEXEC, so it survives the
    // exec while `listener` (close-on-exec) does not.
    nix::unistd::dup2(&listener, &mut fd3).context("dup2 onto fd 3")?;
    Ok(fd3)
}

/// In a new mount namespace, makes `/run/systemd/journal/socket` a symlink
/// to `target` (mounting a tmpfs over the deepest existing directory on the
/// way, visible only inside the namespace).
fn fake_journal(target: &Path) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};

    unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS) (needs root)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    let base = ["/run/systemd/journal", "/run/systemd", "/run"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .ok_or_else(|| anyhow!("no /run directory"))?;
    mount(
        Some("tmpfs"),
        &base,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .with_context(|| format!("mounting a tmpfs on {}", base.display()))?;
    std::fs::create_dir_all("/run/systemd/journal")?;
    std::os::unix::fs::symlink(target, JOURNAL_SOCKET)
        .with_context(|| format!("linking {JOURNAL_SOCKET}"))?;
    Ok(())
}
