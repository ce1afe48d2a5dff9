//! The identity data model: plain values, captured once per connection.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// Which container runtime (if any) a peer runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerRuntime {
    /// Not in a container: host cgroup and host namespaces.
    #[default]
    Host,
    /// In namespaces other than the host's, in no cgroup of a known runtime;
    /// or in a Kubernetes pod's cgroup but in none of its containers.
    Unknown,
    /// Docker (`/docker/<id>`, `docker-<id>.scope`).
    Docker,
    /// Podman (`libpod-<id>.scope`).
    Podman,
    /// containerd, typically under Kubernetes (`cri-containerd-<id>.scope`,
    /// `nerdctl-<id>.scope`, or a bare id under a pod with the cgroupfs
    /// driver).
    Containerd,
    /// CRI-O under Kubernetes (`crio-<id>.scope`).
    Crio,
    /// LXC (`/lxc/<name>`, `lxc.payload.<name>`).
    Lxc,
    /// systemd-nspawn (`machine-<name>.scope`,
    /// `systemd-nspawn@<name>.service`).
    Nspawn,
}

impl ContainerRuntime {
    /// Every runtime, `Host` first and `Unknown` last: the order names are
    /// listed in messages.
    pub const ALL: [Self; 8] = [
        Self::Host,
        Self::Docker,
        Self::Podman,
        Self::Containerd,
        Self::Crio,
        Self::Lxc,
        Self::Nspawn,
        Self::Unknown,
    ];

    /// Lower-case name used in logs, policy files, JSON and the CLI: the
    /// one place these names are spelled.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Unknown => "unknown",
            Self::Docker => "docker",
            Self::Podman => "podman",
            Self::Containerd => "containerd",
            Self::Crio => "crio",
            Self::Lxc => "lxc",
            Self::Nspawn => "nspawn",
        }
    }

    /// The runtime named `name` (as [`as_str`](Self::as_str) spells it).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|runtime| runtime.as_str() == name)
    }

    /// True for anything but the host.
    pub fn is_container(self) -> bool {
        self != Self::Host
    }

    /// The names of `runtimes`, comma-separated, for messages listing what
    /// is accepted.
    pub fn list_names(runtimes: impl IntoIterator<Item = Self>) -> String {
        runtimes
            .into_iter()
            .map(Self::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for ContainerRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name [`ContainerRuntime::from_str`](std::str::FromStr) does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown container runtime {name:?} (expected one of: {})",
    ContainerRuntime::list_names(ContainerRuntime::ALL)
)]
pub struct UnknownRuntime {
    /// The name as given.
    pub name: String,
}

impl FromStr for ContainerRuntime {
    type Err = UnknownRuntime;

    fn from_str(name: &str) -> Result<Self, UnknownRuntime> {
        Self::from_name(name).ok_or_else(|| UnknownRuntime {
            name: name.to_owned(),
        })
    }
}

/// The container a peer belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Default)]
pub struct Container {
    /// The runtime, or `Host`.
    pub runtime: ContainerRuntime,
    /// The runtime's container id (64 hex for Docker) or name (LXC, nspawn);
    /// empty on the host or when unknown.
    pub id: String,
    /// Kubernetes pod UID (dashed form) when the container is in a pod.
    pub pod_uid: Option<String>,
}

impl Container {
    /// True for anything but the host.
    pub fn is_container(&self) -> bool {
        self.runtime.is_container()
    }
}

/// Namespace inode numbers from `/proc/PID/ns/*`; 0 when unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
pub struct Namespaces {
    /// pid namespace.
    pub pid: u64,
    /// mount namespace.
    pub mnt: u64,
    /// network namespace.
    pub net: u64,
    /// user namespace.
    pub user: u64,
    /// IPC namespace.
    pub ipc: u64,
    /// UTS namespace.
    pub uts: u64,
    /// cgroup namespace.
    pub cgroup: u64,
}

/// Everything known about a connected peer, pinned at connect time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct PeerIdentity {
    /// Effective uid at connect time (unsigned: uids above 2^31 are valid).
    pub uid: u32,
    /// Effective gid at connect time.
    pub gid: u32,
    /// Pid in the daemon's pid namespace.
    pub pid: u32,
    /// Supplementary groups at connect time.
    pub groups: Vec<u32>,
    /// LSM label (SO_PEERSEC); `None` when no LSM is active.
    pub label: Option<String>,
    /// Namespace inodes.
    pub namespaces: Namespaces,
    /// The pid's chain of pid namespaces, outermost (the daemon's) first,
    /// the peer's own last, aligned with `nspids`.
    pub pid_namespace_chain: Vec<u64>,
    /// The peer's pid in each namespace of `pid_namespace_chain` (NSpid).
    pub nspids: Vec<u32>,
    /// Cgroup path (the v2 path, or the v1 `name=systemd` path).
    pub cgroup: String,
    /// The container, derived from cgroup and namespaces.
    pub container: Container,
    /// A container id the cgroup path suggests but no runtime layout
    /// explains (see [`crate::cgroup::candidate_from_path`]); `container`
    /// stays [`ContainerRuntime::Unknown`] until a runtime confirms it
    /// ([`crate::confirm`]), which also clears this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_candidate: Option<String>,
    /// Path of the listening socket the peer connected through.
    pub listener: String,
}

impl PeerIdentity {
    /// This peer's pid as seen from inside the pid namespace `namespace`
    /// (an inode), or 0 when the peer is not visible there.
    pub fn pid_seen_from(&self, namespace: u64) -> u32 {
        if self.pid_namespace_chain.is_empty() {
            // Chain unknown: only the daemon's own view is trustworthy.
            return 0;
        }
        self.pid_namespace_chain
            .iter()
            .position(|&ns| ns == namespace)
            .and_then(|level| self.nspids.get(level).copied())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_names_round_trip() {
        for runtime in ContainerRuntime::ALL {
            assert_eq!(ContainerRuntime::from_name(runtime.as_str()), Some(runtime));
            assert_eq!(runtime.as_str().parse::<ContainerRuntime>(), Ok(runtime));
            assert_eq!(runtime.to_string(), runtime.as_str());
        }
        // ALL has each variant once (the match in `as_str` is exhaustive,
        // so distinct names mean distinct variants).
        let mut names: Vec<&str> = ContainerRuntime::ALL.map(ContainerRuntime::as_str).to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ContainerRuntime::ALL.len());
        assert_eq!(ContainerRuntime::from_name("rkt"), None);
        assert_eq!(ContainerRuntime::from_name("Docker"), None);
    }

    #[test]
    fn unknown_runtime_lists_every_name() {
        let error = "rkt".parse::<ContainerRuntime>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown container runtime \"rkt\" (expected one of: \
             host, docker, podman, containerd, crio, lxc, nspawn, unknown)"
        );
    }

    #[test]
    fn only_the_host_is_not_a_container() {
        let hosts: Vec<ContainerRuntime> = ContainerRuntime::ALL
            .into_iter()
            .filter(|runtime| !runtime.is_container())
            .collect();
        assert_eq!(hosts, [ContainerRuntime::Host]);
    }
}
