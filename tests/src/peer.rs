//! Child processes for tests that need a second real process: the
//! `pbus-test-peer` helper binary (see `src/bin/pbus-test-peer.rs`), run
//! directly or under `setpriv` as another uid, and what the kernel says
//! about a process in `/proc/PID/status`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;

use crate::find_binary;

/// Environment variable naming the `pbus-test-peer` binary, if it is not
/// next to the test executable.
pub const TEST_PEER_BIN_ENV: &str = "PBUS_TEST_PEER_BIN";

/// The `pbus-test-peer` helper binary; panics if it is not built.
pub fn test_peer_binary() -> PathBuf {
    find_binary("pbus-test-peer", TEST_PEER_BIN_ENV).unwrap_or_else(|| {
        panic!(
            "pbus-test-peer was not found next to the test executable; \
             build the pbus-tests package or set {TEST_PEER_BIN_ENV}"
        )
    })
}

/// The ids of a process from `/proc/PID/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStatus {
    /// Real uid.
    pub uid: u32,
    /// Real gid.
    pub gid: u32,
    /// Supplementary groups, sorted.
    pub groups: Vec<u32>,
}

/// Reads `/proc/PID/status`; panics if the process does not exist.
pub fn proc_status(pid: u32) -> ProcStatus {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("cannot read /proc/{pid}/status: {error}"));
    let field = |name: &str| -> Vec<u32> {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .split_whitespace()
            .map(|value| value.parse().expect("numeric id"))
            .collect()
    };
    let mut groups = field("Groups:");
    groups.sort_unstable();
    ProcStatus {
        uid: field("Uid:")[0],
        gid: field("Gid:")[0],
        groups,
    }
}

/// A child process whose stdout lines the test reads and whose lifetime
/// it controls through stdin: the helper exits when stdin closes.
#[derive(Debug)]
pub struct PeerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
    exit: Option<ExitStatus>,
}

impl PeerProcess {
    /// Spawns `command` with piped stdin, stdout and stderr.
    pub fn spawn(mut command: Command) -> Self {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot spawn {command:?}: {error}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("stderr lock")
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            lines,
            stderr,
            exit: None,
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Writes one line to the child's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is still open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|error| {
                panic!("cannot write {line:?} to pid {}: {error}", self.child.id())
            });
    }

    /// Sends `command` and returns the answer line (within 10 seconds).
    pub async fn ask(&mut self, command: &str) -> String {
        self.send(command);
        self.next_line(Duration::from_secs(10)).await
    }

    /// True while the child has not exited.
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// The next stdout line; panics on timeout or if the child closed stdout.
    pub async fn next_line(&mut self, timeout: Duration) -> String {
        match tokio::time::timeout(timeout, self.lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!(
                "pid {} closed stdout; stderr:\n{}",
                self.pid(),
                self.stderr()
            ),
            Err(_) => panic!(
                "no output from pid {} within {timeout:?}; stderr:\n{}",
                self.pid(),
                self.stderr()
            ),
        }
    }

    /// The stdout lines the child printed so far and the test has not
    /// read, without waiting for more.
    pub fn pending_lines(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.lines.try_recv().ok()).collect()
    }

    /// The next stdout line, which must start with `word` and a space;
    /// returns the rest of it.
    pub async fn expect_line(&mut self, word: &str, timeout: Duration) -> String {
        let line = self.next_line(timeout).await;
        match line
            .strip_prefix(word)
            .and_then(|rest| rest.strip_prefix(' '))
        {
            Some(rest) => rest.to_owned(),
            None => panic!("expected a line starting with {word:?}, got {line:?}"),
        }
    }

    /// Closes the child's stdin (telling the helper to exit) and waits for
    /// it; kills it after `timeout`.
    pub fn finish(&mut self, timeout: Duration) -> ExitStatus {
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "pid {} did not exit within {timeout:?}; stderr:\n{}",
                    self.pid(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("waitpid");
        }
        self.exit
    }

    /// Kills the child (by pid, only while unreaped) and reaps it.
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = signal_pid(self.child.id(), Signal::SIGKILL);
            self.exit = self.child.wait().ok();
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- child pid {} stderr ----\n{}---- end ----",
                self.child.id(),
                self.stderr()
            );
        }
        self.kill();
    }
}

/// Sends `signal` to process `pid`. Only for processes the test started
/// and has not reaped (so the pid cannot have been recycled): never by
/// name.
pub fn signal_pid(pid: u32, signal: Signal) -> nix::Result<()> {
    kill(
        Pid::from_raw(i32::try_from(pid).expect("pid fits i32")),
        signal,
    )
}

/// A `setpriv` command that runs what is appended to it as `uid`, with gid
/// `uid` and no supplementary groups.
pub fn setpriv_command(uid: u32) -> Command {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups");
    command
}

/// Copies `binary` into `dir` with mode 0755 and returns the copy, so a
/// child running under another uid can execute it even when the build
/// directory is not reachable for that uid (e.g. under a 0700 /root). A
/// copy already there is reused (it may be running: overwriting it would
/// fail with ETXTBSY).
pub fn copy_executable(binary: &Path, dir: &Path) -> PathBuf {
    let target = dir.join(binary.file_name().expect("binary has a file name"));
    if target.exists() {
        return target;
    }
    std::fs::copy(binary, &target)
        .unwrap_or_else(|error| panic!("cannot copy {}: {error}", binary.display()));
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the copied binary");
    target
}
