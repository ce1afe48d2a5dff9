//! Child processes of the harness and what /proc says about them.
//!
//! Every process the harness starts is a [`ChildProc`]: it is spawned with
//! piped stdin/stdout (a line protocol: the child prints `ready`, waits for
//! `go`, prints `result ...`), and it is killed by pid with SIGKILL when the
//! guard is dropped, so an error, a panic unwinding or Ctrl-C (which drops
//! the whole run future) leaves nothing behind. Children additionally ask
//! the kernel for SIGKILL when the harness dies (`PR_SET_PDEATHSIG`, see
//! [`exec_with_parent_death`]) in case the harness itself is SIGKILLed.
//!
//! This module knows nothing about buses or scenarios.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

/// Lines a daemon kept in a log tail.
const LOG_TAIL_LINES: usize = 40;

/// The last lines a daemon wrote (its stderr, its journal messages), kept
/// to explain a failure instead of cluttering the terminal.
#[derive(Debug, Clone, Default)]
pub struct LogTail(Arc<Mutex<VecDeque<String>>>);

impl LogTail {
    /// Appends a line, forgetting the oldest beyond the kept number.
    pub fn push(&self, line: String) {
        if let Ok(mut lines) = self.0.lock() {
            if lines.len() == LOG_TAIL_LINES {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Appends the kept lines, if any, to the message of `error` (one line,
    /// so that it fits a table cell).
    pub fn explain(&self, error: anyhow::Error, what: &str) -> anyhow::Error {
        let lines = self.lines();
        if lines.is_empty() {
            error
        } else {
            anyhow!("{error:#} [{what} log: {}]", lines.join(" | "))
        }
    }
}

/// A child process, killed by pid when dropped.
pub struct ChildProc {
    /// What the process is, for error messages.
    name: String,
    pid: Pid,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
    /// Set once the process has been reaped; a reaped pid may already
    /// belong to someone else and must never be signalled.
    reaped: bool,
    /// Copies the child's stderr into a [`LogTail`], if asked to.
    stderr_task: Option<JoinHandle<()>>,
}

impl ChildProc {
    /// Spawns `cmd` with piped stdin and stdout (stderr is inherited so that
    /// a failing child explains itself on the terminal).
    pub fn spawn(cmd: Command, name: impl Into<String>) -> Result<ChildProc> {
        Self::spawn_inner(cmd, name.into(), None)
    }

    /// Like [`ChildProc::spawn`], but the child's stderr goes into `tail`
    /// (for daemons, whose warnings only matter when something fails).
    pub fn spawn_logged(
        cmd: Command,
        name: impl Into<String>,
        tail: &LogTail,
    ) -> Result<ChildProc> {
        Self::spawn_inner(cmd, name.into(), Some(tail.clone()))
    }

    fn spawn_inner(mut cmd: Command, name: String, tail: Option<LogTail>) -> Result<ChildProc> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if tail.is_some() {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("{name} exited before it could be tracked"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        let stderr_task = match (tail, child.stderr.take()) {
            (Some(tail), Some(stderr)) => Some(tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tail.push(line);
                }
            })),
            _ => None,
        };
        Ok(ChildProc {
            name,
            pid: Pid::from_raw(pid as i32),
            child,
            stdin,
            stdout,
            reaped: false,
            stderr_task,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// True once the process has exited (it is reaped then).
    pub fn has_exited(&mut self) -> bool {
        if !self.reaped && matches!(self.child.try_wait(), Ok(Some(_))) {
            self.reaped = true;
        }
        self.reaped
    }

    /// The name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads the next line the child prints, failing on end of output or
    /// after `timeout`.
    pub async fn read_line(&mut self, timeout: Duration) -> Result<String> {
        let name = &self.name;
        let lines = self
            .stdout
            .as_mut()
            .ok_or_else(|| anyhow!("{name}: stdout not captured"))?;
        match tokio::time::timeout(timeout, lines.next_line()).await {
            Err(_) => bail!("{name}: no output within {timeout:?}"),
            Ok(Err(e)) => Err(e).with_context(|| format!("{name}: reading stdout")),
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => {
                let status = tokio::time::timeout(Duration::from_secs(2), self.child.wait())
                    .await
                    .ok()
                    .and_then(|s| s.ok());
                if status.is_some() {
                    self.reaped = true;
                }
                match status {
                    Some(s) => bail!("{name} exited ({s}) before reporting"),
                    None => bail!("{name} closed its output before reporting"),
                }
            }
        }
    }

    /// Reads lines until one starts with `word` (`ready`, `result`) and
    /// returns the rest of that line, trimmed.
    pub async fn expect(&mut self, word: &str, timeout: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = self.read_line(left).await?;
            if let Some(rest) = line.strip_prefix(word) {
                if rest.is_empty() || rest.starts_with(' ') {
                    return Ok(rest.trim().to_string());
                }
            }
        }
    }

    /// Writes one line to the child's stdin.
    pub async fn send_line(&mut self, line: &str) -> Result<()> {
        let name = &self.name;
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("{name}: stdin already closed"))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .with_context(|| format!("{name}: writing to stdin"))?;
        stdin.flush().await?;
        Ok(())
    }

    /// Ends the child: closes its stdin (workers exit on that), sends
    /// SIGTERM after `grace` if it is still running, SIGKILL after another
    /// `grace`, and reaps it.
    pub async fn stop(mut self, grace: Duration) {
        self.stdin = None;
        for signal in [None, Some(Signal::SIGTERM), Some(Signal::SIGKILL)] {
            if let Some(signal) = signal {
                let _ = kill(self.pid, signal);
            }
            if let Ok(Ok(_)) = tokio::time::timeout(grace, self.child.wait()).await {
                self.reaped = true;
                return;
            }
        }
    }

    /// Sends SIGTERM first instead of closing stdin (daemons do not read
    /// stdin), then behaves like [`ChildProc::stop`].
    pub async fn terminate(self, grace: Duration) {
        if !self.reaped {
            let _ = kill(self.pid, Signal::SIGTERM);
        }
        self.stop(grace).await;
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Some(task) = &self.stderr_task {
            task.abort();
        }
        if self.reaped {
            return;
        }
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = kill(self.pid, Signal::SIGKILL);
        let _ = self.child.try_wait();
    }
}

/// A command that runs this very binary with `args` (the hidden worker,
/// relay and launcher subcommands).
pub fn self_command<I, S>(args: I) -> Result<Command>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let exe = std::env::current_exe().context("locating the pbus-bench binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(args.into_iter().map(Into::into));
    Ok(cmd)
}

/// Asks the kernel to SIGKILL this process when its parent dies, so that
/// no benchmark process outlives a harness that was itself killed.
pub fn die_with_parent() -> Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("prctl(PR_SET_PDEATHSIG)")
}

/// Replaces this process with `program args...` after arranging to die
/// with the parent (the death signal survives `execve`). The pid stays the
/// same, so the harness holds the real program's pid. Returns only on
/// failure.
pub fn exec_with_parent_death(
    program: &OsString,
    args: &[OsString],
    env: &[(&str, String)],
) -> anyhow::Error {
    if let Err(e) = die_with_parent() {
        return e;
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let err = cmd.exec();
    anyhow!(err).context(format!("executing {}", program.to_string_lossy()))
}

/// Finds whether `program` can be run: an absolute or relative path that
/// exists, or a name found on `PATH`.
pub fn find_program(program: &str) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        let p = Path::new(program);
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The first line `program --version` prints, if it runs.
pub fn version_of(program: &str) -> Option<String> {
    let out = std::process::Command::new(find_program(program)?)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?.trim();
    (!line.is_empty()).then(|| line.to_string())
}

/// CPU time (user + system) consumed so far by every thread of `pid`, in
/// nanoseconds. Uses the scheduler's nanosecond counters
/// (`/proc/PID/task/*/schedstat`) and falls back to clock ticks from
/// `/proc/PID/stat` when they are not available.
pub fn cpu_time_ns(pid: Pid) -> Result<u64> {
    if let Some(ns) = schedstat_ns(pid) {
        return Ok(ns);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let (utime, stime) = parse_stat_times(&stat)?;
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Ok((utime + stime) * 1_000_000_000 / tick)
}

fn schedstat_ns(pid: Pid) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let text = std::fs::read_to_string(path).ok()?;
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    (total > 0).then_some(total)
}

/// Returns (utime, stime) in clock ticks from the text of `/proc/PID/stat`
/// (fields 14 and 15; the command name in field 2 may contain spaces).
pub fn parse_stat_times(stat: &str) -> Result<(u64, u64)> {
    let after = &stat[stat.rfind(')').ok_or_else(|| anyhow!("malformed stat"))? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field N is at index N - 3.
    let get = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .ok_or_else(|| anyhow!("stat too short"))?
            .parse()
            .context("stat field")
    };
    Ok((get(14)?, get(15)?))
}

/// Resident set size of `pid` in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: Pid) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_vm_rss(&status).ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The children of `parent` whose command name is `comm`.
pub fn children_named(parent: Pid, comm: &str) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                return false;
            };
            let name = &stat[open + 1..close];
            let ppid = stat[close + 1..]
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok());
            name == comm && ppid == Some(parent.as_raw())
        })
        .map(Pid::from_raw)
        .collect()
}

/// Raises this process's open-file limit as far as allowed (children
/// inherit it): to `want` when privileged, else to the hard limit. Returns
/// the soft limit in force afterwards.
pub fn raise_nofile_limit(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return want;
    }
    let target = hard.min(want.max(soft));
    if setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        target
    } else {
        soft
    }
}

/// Pins this process (and therefore every process it starts afterwards) to
/// one CPU.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("CPU {cpu} is out of range"))?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_with_spaces_in_name() {
        let stat = "1234 (dbus daemon) S 1 1234 1234 0 -1 4194560 100 0 0 0 17 23 0 0 20 0 1 0";
        assert_eq!(parse_stat_times(stat).unwrap(), (17, 23));
    }

    #[test]
    fn vm_rss() {
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t    4242 kB\nThreads: 1\n";
        assert_eq!(parse_vm_rss(status), Some(4242));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let tail = LogTail::default();
        let plain = tail.explain(anyhow!("boom"), "daemon");
        assert_eq!(plain.to_string(), "boom");
        for i in 0..LOG_TAIL_LINES + 5 {
            tail.push(format!("line {i}"));
        }
        let lines = tail.lines();
        assert_eq!(lines.len(), LOG_TAIL_LINES);
        assert_eq!(lines[0], "line 5");
        let explained = tail.explain(anyhow!("boom"), "daemon").to_string();
        assert!(explained.starts_with("boom [daemon log: line 5 | line 6"));
    }

    #[test]
    fn own_process_is_measurable() {
        let me = Pid::this();
        assert!(rss_kib(me).unwrap() > 0);
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_time_ns(me).unwrap() > 0);
    }
}
