//! Reading a peer's facts from `/proc/PID` and confirming them against the
//! peer's pidfd.
//!
//! A pid is only a name, and a recycled pid names someone else. So
//! everything read here through `/proc/PID` (status, cgroup, namespaces,
//! the pid namespace chain) is read *first*, and [`confirm_pidfd_names`]
//! runs *after*: if the pidfd (which names the connecting process itself,
//! not a pid number) still shows a live process with that same pid, the pid
//! cannot have been recycled in between, so what was read belongs to the
//! peer. If not, the peer is treated as gone and refused.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::cgroup::{parse_proc_cgroup, CgroupMembership};
use crate::model::Namespaces;
use crate::pidns::walk_pid_namespace_chain;

/// Why facts about a process could not be read or confirmed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The process has exited (or is a zombie), or its pidfd no longer
    /// names a live process with the expected pid.
    #[error("process {pid} has exited")]
    Gone {
        /// The pid the facts were read for.
        pid: u32,
    },
    /// A `/proc` file of a live process could not be read.
    #[error("reading {path} failed: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The pidfd could not be queried.
    #[error("probing the pidfd failed: {source}")]
    Pidfd {
        /// The error.
        source: io::Error,
    },
}

/// The parts of `/proc/PID/status` identity capture needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcStatus {
    /// The state letter (`R`, `S`, `Z`, ...), if the line was present.
    pub state: Option<char>,
    /// The `NSpid` line: the pid in each pid namespace from the one `/proc`
    /// belongs to (normally the reader's) down to the process's own. Empty
    /// when the kernel does not report it.
    pub nspids: Vec<u32>,
}

impl ProcStatus {
    /// True for a process that has exited but not yet been reaped (`Z`) or
    /// is being torn down (`X`).
    pub fn has_exited(&self) -> bool {
        matches!(self.state, Some('Z' | 'X'))
    }
}

/// Parses the text of `/proc/PID/status`.
pub fn parse_status(text: &str) -> ProcStatus {
    let mut status = ProcStatus::default();
    for line in text.lines() {
        if let Some(state) = line.strip_prefix("State:") {
            status.state = state.trim_start().chars().next();
        } else if let Some(nspids) = line.strip_prefix("NSpid:") {
            status.nspids = nspids
                .split_whitespace()
                .map_while(|pid| pid.parse().ok())
                .collect();
        }
    }
    status
}

/// The `Pid:` line of a pidfd's `/proc/self/fdinfo/FD`: the pid in the
/// reader's pid namespace, `-1` once the process has exited and been
/// reaped, `0` when it is not visible from the reader's namespace.
pub fn parse_fdinfo_pid(text: &str) -> Option<i64> {
    text.lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|pid| pid.trim().parse().ok())
}

/// Everything identity capture reads through `/proc/PID`, unconfirmed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcFacts {
    /// From `/proc/PID/status`.
    pub status: ProcStatus,
    /// From `/proc/PID/cgroup`.
    pub cgroups: CgroupMembership,
    /// From `/proc/PID/ns/*`.
    pub namespaces: Namespaces,
    /// The pid namespaces from the daemon's down to the peer's, walked with
    /// `NS_GET_PARENT`; `None` when the walk failed (the reason is logged).
    pub pid_namespace_chain: Option<Vec<u64>>,
}

/// The `/proc` directory of `pid`.
fn proc_dir(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}"))
}

/// Reads the facts about `pid` from `/proc`. `daemon_pid_namespace` is the
/// inode of the reader's own pid namespace, where the chain walk stops.
///
/// The result is unconfirmed: call [`confirm_pidfd_names`] afterwards.
/// Fails with [`ProcError::Gone`] when the process has visibly exited.
pub fn read_proc_facts(pid: u32, daemon_pid_namespace: u64) -> Result<ProcFacts, ProcError> {
    let dir = proc_dir(pid);
    let status = parse_status(&read_proc_file(pid, &dir.join("status"))?);
    if status.has_exited() {
        return Err(ProcError::Gone { pid });
    }
    let cgroups = parse_proc_cgroup(&read_proc_file(pid, &dir.join("cgroup"))?);
    let namespaces = read_namespaces(pid, &dir)?;
    let pid_namespace_chain = match walk_pid_namespace_chain(&dir, daemon_pid_namespace) {
        Ok(chain) => Some(chain),
        Err(error) => {
            tracing::debug!(pid, %error, "walking the pid namespace chain failed");
            None
        }
    };
    Ok(ProcFacts {
        status,
        cgroups,
        namespaces,
        pid_namespace_chain,
    })
}

/// The namespace kinds pbus records, by their `/proc/PID/ns` file name.
const NAMESPACE_FILES: [&str; 7] = ["pid", "mnt", "net", "user", "ipc", "uts", "cgroup"];

/// Reads the namespace inodes under `dir` (`/proc/PID` or `/proc/self`).
///
/// A namespace the reader may not inspect (`EACCES`/`EPERM`: another
/// user's or a non-dumpable process) or that the kernel does not show
/// (`ENOENT` while the process is still there) is recorded as 0.
pub fn read_namespaces(pid: u32, dir: &Path) -> Result<Namespaces, ProcError> {
    read_namespaces_with(pid, dir, Unreadable::RecordZero)
}

/// Reads every namespace inode under `dir`, failing with
/// [`ProcError::Read`] (errno kept) on the first one the reader may not
/// inspect: for the host reference, where a 0 would silently make every
/// peer "not the host".
pub fn read_all_namespaces(pid: u32, dir: &Path) -> Result<Namespaces, ProcError> {
    read_namespaces_with(pid, dir, Unreadable::Fail)
}

/// What [`read_namespaces_with`] does with a namespace it may not inspect.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unreadable {
    RecordZero,
    Fail,
}

fn read_namespaces_with(
    pid: u32,
    dir: &Path,
    unreadable: Unreadable,
) -> Result<Namespaces, ProcError> {
    let mut inodes = [0u64; NAMESPACE_FILES.len()];
    for (inode, name) in inodes.iter_mut().zip(NAMESPACE_FILES) {
        let path = dir.join("ns").join(name);
        match std::fs::metadata(&path) {
            Ok(metadata) => *inode = metadata.ino(),
            Err(error) => match error.raw_os_error() {
                Some(libc::EACCES | libc::EPERM) if unreadable == Unreadable::Fail => {
                    return Err(ProcError::Read {
                        path,
                        source: error,
                    });
                }
                Some(libc::EACCES | libc::EPERM) => {
                    tracing::debug!(pid, namespace = name, %error, "namespace not inspectable");
                }
                Some(libc::ENOENT) if dir.exists() => {
                    tracing::debug!(pid, namespace = name, %error, "namespace not shown");
                }
                _ => return Err(read_error(pid, &path, error)),
            },
        }
    }
    let [pid_ns, mnt, net, user, ipc, uts, cgroup] = inodes;
    Ok(Namespaces {
        pid: pid_ns,
        mnt,
        net,
        user,
        ipc,
        uts,
        cgroup,
    })
}

/// Reads and parses `/proc/PID/cgroup`.
pub fn read_cgroups(pid: u32) -> Result<CgroupMembership, ProcError> {
    Ok(parse_proc_cgroup(&read_proc_file(
        pid,
        &proc_dir(pid).join("cgroup"),
    )?))
}

/// The capability sets of the calling process, from the `CapEff:` line
/// of `/proc/self/status` (a bit mask, bit N = capability N).
pub fn own_effective_capabilities() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    parse_effective_capabilities(&status).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "/proc/self/status has no CapEff: line",
        )
    })
}

/// The `CapEff:` mask of a `/proc/PID/status` text.
pub fn parse_effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
}

/// Confirms that `pidfd` still names a live process whose pid (in the
/// reader's namespace) is `pid`: the process accepts signal 0, the pidfd's
/// fdinfo shows that pid, and `/proc/PID/status` does not show it exited.
///
/// Any mismatch is [`ProcError::Gone`]: the peer is refused, never
/// identified through a stale or recycled pid.
pub fn confirm_pidfd_names(pidfd: impl AsFd, pid: u32) -> Result<(), ProcError> {
    let pidfd = pidfd.as_fd();
    match pbus_sys::creds::pidfd_send_signal(pidfd, 0) {
        Ok(()) => {}
        // EPERM: the process exists but the reader may not signal it.
        Err(error) if error.raw_os_error() == Some(libc::EPERM) => {}
        Err(error) if error.raw_os_error() == Some(libc::ESRCH) => {
            tracing::debug!(pid, "pidfd: process has exited");
            return Err(ProcError::Gone { pid });
        }
        Err(source) => return Err(ProcError::Pidfd { source }),
    }
    let fdinfo_path = PathBuf::from(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()));
    let fdinfo = std::fs::read_to_string(&fdinfo_path).map_err(|source| ProcError::Read {
        path: fdinfo_path.clone(),
        source,
    })?;
    let Some(pidfd_pid) = parse_fdinfo_pid(&fdinfo) else {
        return Err(ProcError::Pidfd {
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} has no Pid: line", fdinfo_path.display()),
            ),
        });
    };
    if pidfd_pid != i64::from(pid) {
        tracing::debug!(pid, pidfd_pid, "pidfd names another or no process");
        return Err(ProcError::Gone { pid });
    }
    // The pidfd's process is alive or a zombie, so `pid` is still its pid
    // and /proc/PID is still about it; a zombie has exited all the same.
    let status = parse_status(&read_proc_file(pid, &proc_dir(pid).join("status"))?);
    if status.has_exited() {
        tracing::debug!(pid, "process is a zombie");
        return Err(ProcError::Gone { pid });
    }
    Ok(())
}

/// Reads a `/proc/PID` file, turning "the process is gone" into
/// [`ProcError::Gone`].
fn read_proc_file(pid: u32, path: &Path) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|error| read_error(pid, path, error))
}

fn read_error(pid: u32, path: &Path, error: io::Error) -> ProcError {
    let gone = match error.raw_os_error() {
        Some(libc::ESRCH) => true,
        Some(libc::ENOENT) => !proc_dir(pid).exists(),
        _ => false,
    };
    if gone {
        ProcError::Gone { pid }
    } else {
        ProcError::Read {
            path: path.to_owned(),
            source: error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    #[test]
    fn parses_status_state_and_nspid() {
        let text = "Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
                    NSpid:\t4242\t17\t1\nNSpgid:\t4242\t17\t1\n";
        let status = parse_status(text);
        assert_eq!(status.state, Some('S'));
        assert_eq!(status.nspids, [4242, 17, 1]);
        assert!(!status.has_exited());
        let zombie = parse_status("State:\tZ (zombie)\nNSpid:\t77\n");
        assert!(zombie.has_exited());
        assert_eq!(zombie.nspids, [77]);
        let old_kernel = parse_status("Name:\tx\nState:\tR (running)\n");
        assert!(old_kernel.nspids.is_empty());
        assert_eq!(parse_status(""), ProcStatus::default());
    }

    #[test]
    fn parses_effective_capabilities() {
        let status = "Name:\tx\nCapPrm:\t000001ffffffffff\nCapEff:\t000001fffeffffff\n";
        assert_eq!(parse_effective_capabilities(status), Some(0x01ff_feff_ffff));
        assert_eq!(parse_effective_capabilities("Name:\tx\n"), None);
        assert!(own_effective_capabilities().is_ok());
    }

    #[test]
    fn strict_namespace_reading_reports_what_plain_reading_zeroes() {
        // Our own namespaces are always readable, both ways alike.
        let own = Path::new("/proc/self");
        let pid = std::process::id();
        assert_eq!(
            read_all_namespaces(pid, own).unwrap(),
            read_namespaces(pid, own).unwrap()
        );
    }

    #[test]
    fn parses_fdinfo_pid() {
        let live = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1234\nPid:\t4242\nNSpid:\t4242\n";
        assert_eq!(parse_fdinfo_pid(live), Some(4242));
        assert_eq!(
            parse_fdinfo_pid("pos:\t0\nPid:\t-1\nNSpid:\t-1\n"),
            Some(-1)
        );
        assert_eq!(parse_fdinfo_pid("pos:\t0\nflags:\t02\n"), None);
    }

    #[test]
    fn reads_our_own_facts() {
        let pid = std::process::id();
        let own_pid_ns = std::fs::metadata("/proc/self/ns/pid").unwrap().ino();
        let facts = read_proc_facts(pid, own_pid_ns).unwrap();
        assert_eq!(facts.status.nspids.first(), Some(&pid));
        // The main thread (the test harness) is usually asleep.
        assert!(
            matches!(facts.status.state, Some('R' | 'S')),
            "{:?}",
            facts.status
        );
        assert_eq!(facts.namespaces.pid, own_pid_ns);
        assert_eq!(
            facts.namespaces.net,
            std::fs::metadata("/proc/self/ns/net").unwrap().ino()
        );
        assert_eq!(
            facts.namespaces.cgroup,
            std::fs::metadata("/proc/self/ns/cgroup").unwrap().ino()
        );
        assert_eq!(facts.pid_namespace_chain, Some(vec![own_pid_ns]));
        let own = parse_proc_cgroup(&std::fs::read_to_string("/proc/self/cgroup").unwrap());
        assert_eq!(facts.cgroups, own);
    }

    fn spawn_sleeper() -> Child {
        Command::new("sleep").arg("30").spawn().unwrap()
    }

    #[test]
    fn confirms_a_live_process_and_refuses_a_wrong_pid() {
        let mut child = spawn_sleeper();
        let pidfd = pbus_sys::creds::pidfd_open(child.id() as i32).unwrap();
        confirm_pidfd_names(&pidfd, child.id()).unwrap();
        let err = confirm_pidfd_names(&pidfd, std::process::id()).unwrap_err();
        assert!(matches!(err, ProcError::Gone { .. }), "{err}");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn refuses_a_zombie_and_a_reaped_process() {
        let mut child = spawn_sleeper();
        let pid = child.id();
        let pidfd = pbus_sys::creds::pidfd_open(pid as i32).unwrap();
        child.kill().unwrap();
        // Not reaped yet: a zombie, which still answers signal 0.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !parse_status(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap())
            .has_exited()
        {
            assert!(std::time::Instant::now() < deadline, "child never died");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let err = confirm_pidfd_names(&pidfd, pid).unwrap_err();
        assert!(
            matches!(err, ProcError::Gone { pid: p } if p == pid),
            "{err}"
        );
        let err = read_proc_facts(pid, 0).unwrap_err();
        assert!(matches!(err, ProcError::Gone { .. }), "{err}");
        child.wait().unwrap();
        // Reaped: the pidfd's fdinfo shows -1, signal 0 fails.
        let err = confirm_pidfd_names(&pidfd, pid).unwrap_err();
        assert!(
            matches!(err, ProcError::Gone { pid: p } if p == pid),
            "{err}"
        );
    }
}
