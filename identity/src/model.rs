//! The identity data model: plain values, captured once per connection.

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
    /// Lower-case name used in logs, policy files and JSON.
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
        self.runtime != ContainerRuntime::Host
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
