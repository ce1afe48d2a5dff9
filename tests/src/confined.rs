//! A `pbusd` confined the way an unprivileged session bus is: running
//! under another uid (via `setpriv`) with a low RLIMIT_NOFILE hard limit
//! (via `prlimit`), which it cannot raise. Tests use it to run the daemon
//! out of fd slots on purpose (so the kernel truncates the fds it receives,
//! MSG_CTRUNC) and to see what it does then.
//!
//! Such a daemon can only identify clients of its own uid (it cannot read
//! another uid's `/proc/PID/ns`), so [`ConfinedBus::peer_command`] runs the
//! `pbus-test-peer` helper under the same uid. Both binaries are copied into
//! the bus's directory (owned by that uid) so the uid can execute them and
//! bind the socket there.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::Signal;

use crate::daemon::{default_log_level, wait_until_accepting};
use crate::peer::{setpriv_command, signal_pid};
use crate::{copy_executable, pbusd_binary};

/// A `pbusd` running as another uid with a hard fd limit.
#[derive(Debug)]
pub struct ConfinedBus {
    child: Child,
    uid: u32,
    socket: PathBuf,
    stderr_path: PathBuf,
    peer_binary: PathBuf,
    exited: bool,
    // Dropped last, after the daemon is gone.
    dir: tempfile::TempDir,
}

impl ConfinedBus {
    /// Starts `pbusd` as `uid` (and gid `uid`, no supplementary groups)
    /// with RLIMIT_NOFILE `nofile:nofile`, listening in a fresh directory
    /// owned by `uid`, with `config` as its TOML config if given.
    /// `peer_binary` is the `pbus-test-peer` helper to copy in for
    /// [`peer_command`](Self::peer_command). Panics if it does not start.
    pub fn start(uid: u32, nofile: u64, config: Option<&str>, peer_binary: &Path) -> Self {
        Self::start_with(uid, nofile, config, peer_binary, false)
    }

    /// Like [`start`](Self::start), but the daemon keeps CAP_SYS_PTRACE
    /// (as an ambient capability) so it can identify clients of other
    /// uids, and nothing else: in particular no CAP_SYS_RESOURCE, so the
    /// kernel's per-user limit on fds in flight applies to it. Run such
    /// clients with [`peer_command_as`](Self::peer_command_as).
    pub fn start_identifying_other_uids(
        uid: u32,
        nofile: u64,
        config: Option<&str>,
        peer_binary: &Path,
    ) -> Self {
        Self::start_with(uid, nofile, config, peer_binary, true)
    }

    fn start_with(
        uid: u32,
        nofile: u64,
        config: Option<&str>,
        peer_binary: &Path,
        ptrace: bool,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pbus-confined-")
            .tempdir()
            .expect("create a temporary directory");
        let pbusd = copy_executable(&pbusd_binary(), dir.path());
        let peer_binary = copy_executable(peer_binary, dir.path());
        let socket = dir.path().join("bus.sock");
        let stderr_path = dir.path().join("pbusd.stderr");
        let mut command = setpriv_command(uid);
        if ptrace {
            command
                .arg("--inh-caps=+sys_ptrace")
                .arg("--ambient-caps=+sys_ptrace");
        }
        command.arg("prlimit");
        command.arg(format!("--nofile={nofile}:{nofile}")).arg("--");
        command.arg(&pbusd).arg("--listen").arg(&socket);
        if let Some(config) = config {
            let path = dir.path().join("pbusd.toml");
            std::fs::write(&path, config).expect("write the config file");
            command.arg("--config").arg(&path);
        }
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid))
            .expect("chown the bus directory");
        default_log_level(&mut command);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).expect("create the stderr file"));
        let child = command.spawn().expect("spawn setpriv prlimit pbusd");
        let mut bus = Self {
            child,
            uid,
            socket,
            stderr_path,
            peer_binary,
            exited: false,
            dir,
        };
        // Connecting as root gets us refused (the daemon cannot identify
        // root), which is fine: the socket is up.
        wait_until_accepting(
            "confined pbusd",
            &mut bus.child,
            &bus.socket,
            &bus.stderr_path,
        );
        bus
    }

    /// The daemon's pid (setpriv and prlimit exec it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The bus directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The daemon's RLIMIT_NOFILE as `/proc/PID/limits` shows it:
    /// `(soft, hard)`.
    pub fn fd_limit(&self) -> (u64, u64) {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid()))
            .expect("read /proc/PID/limits");
        let line = limits
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .expect("a Max open files line");
        let numbers: Vec<u64> = line
            .split_whitespace()
            .filter_map(|word| word.parse().ok())
            .collect();
        (numbers[0], numbers[1])
    }

    /// A command running the `pbus-test-peer` helper as the daemon's uid
    /// against this bus, with `args` after the socket path, wrapped in
    /// `prefix` (e.g. `["prlimit", "--nofile=40:40", "--"]`) if given.
    pub fn peer_command(&self, prefix: &[&str], args: &[&str]) -> Command {
        let mut command = setpriv_command(self.uid);
        command.args(prefix);
        command.arg(&self.peer_binary).arg(&self.socket).args(args);
        command
    }

    /// A command running the `pbus-test-peer` helper as `uid` (a bus from
    /// [`start_identifying_other_uids`](Self::start_identifying_other_uids)
    /// can identify it) with `args` after the socket path.
    pub fn peer_command_as(&self, uid: u32, args: &[&str]) -> Command {
        let mut command = setpriv_command(uid);
        command.arg(&self.peer_binary).arg(&self.socket).args(args);
        command
    }

    /// True while the daemon runs.
    pub fn is_running(&mut self) -> bool {
        if !self.exited && self.child.try_wait().expect("waitpid").is_some() {
            self.exited = true;
        }
        !self.exited
    }
}

impl Drop for ConfinedBus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- confined pbusd (pid {}) stderr ----\n{}---- end ----",
                self.pid(),
                self.stderr()
            );
        }
        if self.is_running() {
            // Our own child, by pid, while it is unreaped.
            let _ = signal_pid(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
