//! Which namespaces count as "the host": decided once, at daemon start.
//!
//! Outside broker mode the host is the daemon itself
//! ([`HostReference::Own`], [`HostContext::detect`]): a peer in any other
//! namespace is not the host. A broker, though, may itself run in a
//! container (a sidecar with the host's pid namespace), and then its own
//! namespaces are the sidecar's, not the host's. So in broker mode the host
//! is the init process of the initial pid namespace
//! ([`HostReference::InitProcess`], [`HostContext::from_init_process`]),
//! whose namespaces are read through `/proc/1` and confirmed through a
//! pidfd. What that needs, and the refusal when it is missing
//! ([`HostError`]):
//!
//! * **The initial pid namespace** (`docker run --pid=host`). Recognised by
//!   its inode, the kernel constant `PROC_PID_INIT_INO` (0xEFFFFFFC):
//!   dynamically allocated nsfs inodes start at 0xF0000000, so no other
//!   namespace can have it. (`NS_GET_PARENT` cannot tell: it fails with
//!   `EPERM` on one's own pid namespace whether or not it has a parent.)
//!   Only there is pid 1 the host's init, and only there does
//!   `SO_PEERCRED` give every peer a pid the daemon can look up.
//! * **Ptrace read access to other processes** (`CAP_SYS_PTRACE`,
//!   `--cap-add SYS_PTRACE`), which `/proc/PID/ns/*` requires. Without it
//!   every peer's namespaces read as 0. Checked on pid 1 itself; when the
//!   capability is there and access is still denied, an LSM (AppArmor,
//!   SELinux, Landlock) is in the way, and the message says so.
//! * **The initial cgroup namespace** (`--cgroupns=host`). See
//!   "Private cgroup namespaces" below.
//!
//! # Private cgroup namespaces
//!
//! In a private cgroup namespace, `/proc/PID/cgroup` shows paths relative
//! to the namespace's root: a sibling container reads `/../<id>`, a host
//! service `/../../system.slice/foo.service`. Resolving them to host paths
//! needs the host path of that root, and nothing pbusd can read without
//! more privilege gives it: `/proc/1/cgroup` and the `root` field of
//! `/proc/1/mountinfo` are relative to the reader's namespace too and only
//! reveal how many levels lie above the root (the number of `..`), never
//! their names; `setns` into init's cgroup namespace needs `CAP_SYS_ADMIN`;
//! searching the host's hierarchy through `/proc/1/root` for a directory
//! with the root's inode depends on the host's mounts and is a guess when
//! it finds none. Keeping the relative paths instead would hand operators
//! and policy rules (written in host paths) cgroups that name no real
//! directory. So the broker refuses to start in a private cgroup namespace
//! and asks for `--cgroupns=host`, which costs nothing in privilege next to
//! `--pid=host` and `CAP_SYS_PTRACE`. The check compares pbusd's cgroup
//! namespace with the kernel's initial one (`PROC_CGROUP_INIT_INO`,
//! 0xEFFFFFFB) before anything else about pid 1 is read, and with pid 1's
//! own once it is. Outside broker mode nothing changes: `/../<id>` paths
//! still classify as candidates ([`crate::cgroup::candidate_from_path`]).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::capture::HostContext;
use crate::mounts::CgroupMounts;
use crate::procfs::{
    confirm_pidfd_names, own_effective_capabilities, read_all_namespaces, read_cgroups,
    read_namespaces, ProcError,
};

/// `PROC_PID_INIT_INO`: the inode of the initial pid namespace.
pub const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
/// `PROC_CGROUP_INIT_INO`: the inode of the initial cgroup namespace.
pub const PROC_CGROUP_INIT_INO: u64 = 0xEFFF_FFFB;
/// `CAP_SYS_PTRACE`'s bit in a capability mask.
const CAP_SYS_PTRACE: u32 = 19;

/// Which process's namespaces a [`HostContext`] takes as the host's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum HostReference {
    /// The daemon's own namespaces (the default, outside broker mode).
    #[default]
    Own,
    /// Those of pid 1 of the initial pid namespace (broker mode).
    InitProcess,
}

impl HostReference {
    /// How `pbusctl status` and the logs describe it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Own => "pbusd's own namespaces",
            Self::InitProcess => "pid 1 of the initial pid namespace",
        }
    }
}

/// Why broker mode cannot take the host's namespaces from init. Each
/// message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// pbusd is not in the initial pid namespace.
    #[error(
        "broker mode needs the host's pid namespace, but pbusd is in pid namespace {inode} \
         (the host's is {PROC_PID_INIT_INO}): run the broker in the host PID namespace \
         (docker run --pid=host)"
    )]
    NotInitialPidNamespace {
        /// pbusd's pid namespace inode.
        inode: u64,
    },
    /// pbusd is in a cgroup namespace other than the host's.
    #[error(
        "broker mode needs the host's cgroup namespace, but pbusd is in cgroup namespace \
         {inode} (the host's is {host}): peers' cgroup paths would be relative to a root \
         pbusd cannot locate; run the broker in the host cgroup namespace \
         (docker run --cgroupns=host)"
    )]
    PrivateCgroupNamespace {
        /// pbusd's cgroup namespace inode.
        inode: u64,
        /// The host's (init's, or the kernel's initial one).
        host: u64,
    },
    /// pbusd may not read init's namespaces and lacks CAP_SYS_PTRACE.
    #[error(
        "broker mode must read other processes' /proc/PID/ns, but reading {path} was \
         refused ({source}) and pbusd lacks CAP_SYS_PTRACE: grant it \
         (docker run --cap-add SYS_PTRACE)"
    )]
    NoPtraceCapability {
        /// The file that could not be read.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// pbusd has CAP_SYS_PTRACE and may still not read init's namespaces.
    #[error(
        "broker mode must read other processes' /proc/PID/ns, but reading {path} was \
         refused ({source}) although pbusd has CAP_SYS_PTRACE: a security module \
         (AppArmor, SELinux, Landlock) denies ptrace read access; allow it (for Docker's \
         AppArmor profile: docker run --security-opt apparmor=unconfined)"
    )]
    PtraceDenied {
        /// The file that could not be read.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Anything else that went wrong reading init's or pbusd's facts.
    #[error("reading the host reference failed: {0}")]
    Io(#[from] io::Error),
    /// A `/proc` read failed for another reason.
    #[error("reading the host reference failed: {0}")]
    Proc(#[source] ProcError),
}

impl HostContext {
    /// The host context of broker mode: the namespaces of pid 1 of the
    /// initial pid namespace, read from `/proc/1` after opening a pidfd for
    /// it and confirmed through that pidfd afterwards. Refuses (see
    /// [`HostError`]) unless pbusd is in the initial pid and cgroup
    /// namespaces and may read init's namespaces.
    pub fn from_init_process() -> Result<Self, HostError> {
        let own_dir = Path::new("/proc/self");
        let own_pid_ns = namespace_inode(&own_dir.join("ns/pid"))?;
        if own_pid_ns != PROC_PID_INIT_INO {
            return Err(HostError::NotInitialPidNamespace { inode: own_pid_ns });
        }
        let own_cgroup_ns = namespace_inode(&own_dir.join("ns/cgroup"))?;
        if own_cgroup_ns != PROC_CGROUP_INIT_INO {
            return Err(HostError::PrivateCgroupNamespace {
                inode: own_cgroup_ns,
                host: PROC_CGROUP_INIT_INO,
            });
        }
        const INIT: u32 = 1;
        // In the initial pid namespace, pid 1 is the host's init.
        let pidfd = pbus_sys::creds::pidfd_open(INIT as i32)?;
        let namespaces = read_all_namespaces(INIT, Path::new("/proc/1")).map_err(refusal)?;
        let cgroups = read_cgroups(INIT).map_err(HostError::Proc)?;
        confirm_pidfd_names(&pidfd, INIT).map_err(HostError::Proc)?;
        if namespaces.pid != own_pid_ns {
            return Err(HostError::Io(io::Error::other(format!(
                "pid 1's pid namespace {} is not the initial one",
                namespaces.pid
            ))));
        }
        if namespaces.cgroup != own_cgroup_ns {
            return Err(HostError::PrivateCgroupNamespace {
                inode: own_cgroup_ns,
                host: namespaces.cgroup,
            });
        }
        tracing::info!(
            cgroup = %cgroups.primary_path(),
            ?namespaces,
            "host reference: pid 1 of the initial pid namespace"
        );
        let own = read_namespaces(std::process::id(), own_dir).map_err(HostError::Proc)?;
        if own != namespaces {
            tracing::info!(
                ?own,
                "pbusd's own namespaces differ from the host's: its own processes are not the host"
            );
        }
        let mut context = Self::new(namespaces, CgroupMounts::detect()?);
        context.reference = HostReference::InitProcess;
        Ok(context)
    }
}

/// The inode of the namespace file `path` (`/proc/self/ns/*`).
fn namespace_inode(path: &Path) -> Result<u64, HostError> {
    let file = File::open(path)?;
    Ok(pbus_sys::ns::inode_of(&file)?)
}

/// Maps a failure to read init's namespaces to what the operator must
/// change.
fn refusal(error: ProcError) -> HostError {
    match error {
        ProcError::Read { path, source }
            if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) =>
        {
            let has_ptrace = own_effective_capabilities()
                .map(|caps| caps & (1 << CAP_SYS_PTRACE) != 0)
                .unwrap_or(false);
            if has_ptrace {
                HostError::PtraceDenied { path, source }
            } else {
                HostError::NoPtraceCapability { path, source }
            }
        }
        other => HostError::Proc(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_inodes_are_the_kernels() {
        // include/linux/proc_ns.h
        assert_eq!(PROC_PID_INIT_INO, 4026531836);
        assert_eq!(PROC_CGROUP_INIT_INO, 4026531835);
    }

    #[test]
    fn references_describe_themselves_for_the_status_line() {
        assert_eq!(HostReference::Own.describe(), "pbusd's own namespaces");
        assert_eq!(
            HostReference::InitProcess.describe(),
            "pid 1 of the initial pid namespace"
        );
        assert_eq!(HostReference::default(), HostReference::Own);
    }

    #[test]
    fn refusals_name_what_to_change() {
        let denied = || ProcError::Read {
            path: "/proc/1/ns/pid".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        let message = refusal(denied()).to_string();
        assert!(
            message.contains("--cap-add SYS_PTRACE") || message.contains("security module"),
            "{message}"
        );
        assert!(message.contains("/proc/1/ns/pid"), "{message}");
        let other = refusal(ProcError::Gone { pid: 1 });
        assert!(matches!(other, HostError::Proc(_)), "{other}");
        let pid = HostError::NotInitialPidNamespace { inode: 4026532999 }.to_string();
        assert!(pid.contains("docker run --pid=host"), "{pid}");
        let cgroup = HostError::PrivateCgroupNamespace {
            inode: 4026533000,
            host: PROC_CGROUP_INIT_INO,
        }
        .to_string();
        assert!(cgroup.contains("--cgroupns=host"), "{cgroup}");
    }
}
