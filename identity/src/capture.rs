//! Capturing a peer's identity right after accept(2).
//!
//! [`identify`] asks the kernel about the socket (SO_PEERCRED,
//! SO_PEERGROUPS, SO_PEERSEC, SO_PEERPIDFD), reads the pid-derived facts
//! from `/proc` ([`crate::procfs`]), interprets them with
//! [`identify_from_parts`] (pure), and confirms last, through the pidfd,
//! that the pid still names the process that connected. [`HostContext`]
//! holds the host's namespaces (see [`crate::host`] for whose) and the
//! cgroup mounts to compare against. A cgroup path that only suggests a
//! container leaves a candidate id in the identity for the caller to
//! confirm with the runtime ([`crate::confirm`]).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use crate::cgroup::classify;
use crate::host::HostReference;
use crate::model::{Namespaces, PeerIdentity};
use crate::mounts::CgroupMounts;
use crate::pidns::align_pid_namespaces;
use crate::procfs::{confirm_pidfd_names, read_namespaces, read_proc_facts, ProcError, ProcFacts};

/// Facts about the host that identity capture compares peers against.
/// Built once at daemon start, from the daemon's own namespaces
/// ([`detect`](Self::detect)) or, in broker mode, from the initial pid
/// namespace's init ([`from_init_process`](Self::from_init_process)).
#[derive(Debug, Clone, Default)]
pub struct HostContext {
    /// The host's namespaces: a peer in any other is not the host.
    pub namespaces: Namespaces,
    /// Where the cgroup hierarchies are mounted.
    pub cgroup_mounts: CgroupMounts,
    /// Whose namespaces `namespaces` are.
    pub reference: HostReference,
}

impl HostContext {
    /// Reads the daemon's own context from `/proc/self/ns/*` and
    /// `/proc/self/mountinfo` ([`HostReference::Own`]).
    pub fn detect() -> io::Result<Self> {
        let namespaces = read_namespaces(std::process::id(), Path::new("/proc/self"))
            .map_err(io::Error::other)?;
        if namespaces.pid == 0 {
            return Err(io::Error::other(
                "the daemon's own pid namespace is unreadable",
            ));
        }
        Ok(Self::new(namespaces, CgroupMounts::detect()?))
    }

    /// A context from known parts (tests, or a daemon that already read
    /// them), with [`HostReference::Own`].
    pub fn new(namespaces: Namespaces, cgroup_mounts: CgroupMounts) -> Self {
        Self {
            namespaces,
            cgroup_mounts,
            reference: HostReference::Own,
        }
    }

    /// The daemon's own pid namespace inode: where pid namespace chains
    /// start. (With [`HostReference::InitProcess`] the daemon is in the
    /// initial pid namespace, which is also the host's.)
    pub fn pid_namespace(&self) -> u64 {
        self.namespaces.pid
    }
}

/// Why a peer could not be identified. Every variant means: refuse the
/// connection.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    /// A socket option the kernel must answer failed.
    #[error("reading {what} failed: {source}")]
    Kernel {
        /// Which query failed.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The peer process exited before it could be identified (or its pid
    /// could not be confirmed to still name it).
    #[error("peer process {pid} exited before it could be identified")]
    PeerGone {
        /// The pid SO_PEERCRED reported.
        pid: i32,
    },
    /// SO_PEERCRED reported pid 0: the peer's pid namespace is not the
    /// daemon's or below it, so no pid-derived fact can be read.
    #[error("peer's pid is not visible from the daemon's pid namespace")]
    PidNotVisible,
    /// A `/proc` fact about a live peer could not be read or confirmed.
    #[error("reading the peer's /proc facts failed: {0}")]
    Proc(#[source] ProcError),
    /// The LSM label is not UTF-8. Refused rather than converted lossily,
    /// since two different labels must never compare equal.
    #[error("peer's LSM label is not UTF-8: {label:?}")]
    LabelNotUtf8 {
        /// The raw label.
        label: Vec<u8>,
    },
}

/// What the kernel reports about the socket itself, before any `/proc`
/// reading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketCredentials {
    /// SO_PEERCRED pid, in the daemon's pid namespace.
    pub pid: u32,
    /// SO_PEERCRED uid.
    pub uid: u32,
    /// SO_PEERCRED gid.
    pub gid: u32,
    /// SO_PEERGROUPS.
    pub groups: Vec<u32>,
    /// SO_PEERSEC, raw; `None` without an LSM.
    pub label: Option<Vec<u8>>,
}

/// Builds the identity from facts already read (pure: no I/O).
///
/// `facts` must be about `socket.pid`; [`identify`] confirms that through
/// the pidfd before trusting the result. The LSM label passes through
/// unchanged; a non-UTF-8 label is refused.
pub fn identify_from_parts(
    socket: SocketCredentials,
    facts: &ProcFacts,
    listener: &str,
    host: &HostContext,
) -> Result<PeerIdentity, IdentifyError> {
    let label = socket
        .label
        .map(|bytes| String::from_utf8(bytes).map_err(|e| e.into_bytes()))
        .transpose()
        .map_err(|label| IdentifyError::LabelNotUtf8 { label })?;
    let pids = align_pid_namespaces(
        host.pid_namespace(),
        socket.pid,
        facts.namespaces.pid,
        facts.pid_namespace_chain.as_deref(),
        &facts.status.nspids,
    );
    if !pids.complete {
        tracing::debug!(
            pid = socket.pid,
            walked = ?facts.pid_namespace_chain,
            nspids = ?facts.status.nspids,
            kept = ?pids.pid_namespace_chain,
            "pid namespace chain does not line up with NSpid; keeping the provable ends"
        );
    }
    let classification = classify(&facts.cgroups, &facts.namespaces, &host.namespaces);
    Ok(PeerIdentity {
        uid: socket.uid,
        gid: socket.gid,
        pid: socket.pid,
        groups: socket.groups,
        label,
        namespaces: facts.namespaces,
        pid_namespace_chain: pids.pid_namespace_chain,
        nspids: pids.nspids,
        cgroup: facts.cgroups.primary_path(),
        container: classification.container,
        container_candidate: classification.candidate,
        listener: listener.to_owned(),
    })
}

/// Reads the identity of the peer of `socket`, which connected through
/// `listener`. Returns the identity and the peer's pidfd.
///
/// Order matters: socket credentials (pinned at connect time), then the
/// `/proc` facts, then the confirmation that the pidfd still names a live
/// process with that pid. A peer that has exited by then is refused with
/// [`IdentifyError::PeerGone`], never identified through a stale pid.
pub fn identify(
    socket: impl AsFd,
    listener: &str,
    host: &HostContext,
) -> Result<(PeerIdentity, OwnedFd), IdentifyError> {
    let socket = socket.as_fd();
    let kernel = |what| move |source| IdentifyError::Kernel { what, source };
    let cred = pbus_sys::creds::peer_credentials(socket).map_err(kernel("SO_PEERCRED"))?;
    let pid = match u32::try_from(cred.pid) {
        Ok(0) | Err(_) => return Err(IdentifyError::PidNotVisible),
        Ok(pid) => pid,
    };
    let groups = pbus_sys::creds::peer_groups(socket).map_err(kernel("SO_PEERGROUPS"))?;
    let label = pbus_sys::creds::peer_security_label(socket).map_err(kernel("SO_PEERSEC"))?;
    let pidfd = pbus_sys::creds::peer_pidfd(socket).map_err(|source| {
        if source.raw_os_error() == Some(libc::ESRCH) {
            IdentifyError::PeerGone { pid: cred.pid }
        } else {
            IdentifyError::Kernel {
                what: "SO_PEERPIDFD",
                source,
            }
        }
    })?;
    let refuse = |error: ProcError| match error {
        ProcError::Gone { .. } => IdentifyError::PeerGone { pid: cred.pid },
        other => IdentifyError::Proc(other),
    };
    let facts = read_proc_facts(pid, host.pid_namespace()).map_err(refuse)?;
    let identity = identify_from_parts(
        SocketCredentials {
            pid,
            uid: cred.uid,
            gid: cred.gid,
            groups,
            label,
        },
        &facts,
        listener,
        host,
    )?;
    confirm_pidfd_names(&pidfd, pid).map_err(refuse)?;
    tracing::debug!(
        pid,
        uid = identity.uid,
        gid = identity.gid,
        cgroup = %identity.cgroup,
        runtime = identity.container.runtime.as_str(),
        container = %identity.container.id,
        pod = ?identity.container.pod_uid,
        nspids = ?identity.nspids,
        listener,
        "identified peer"
    );
    Ok((identity, pidfd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::parse_proc_cgroup;
    use crate::model::{Container, ContainerRuntime};
    use crate::procfs::ProcStatus;

    const DOCKER_ID: &str = "3f4e2a9c1b7d8e6f5a4c3b2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    const HOST_PID_NS: u64 = 4026531836;
    const CONTAINER_PID_NS: u64 = 4026532900;

    fn host() -> HostContext {
        HostContext::new(
            Namespaces {
                pid: HOST_PID_NS,
                mnt: 4026531841,
                net: 4026531840,
                user: 4026531837,
                ipc: 4026531839,
                uts: 4026531838,
                cgroup: 4026531835,
            },
            CgroupMounts::default(),
        )
    }

    fn socket(label: Option<&[u8]>) -> SocketCredentials {
        SocketCredentials {
            pid: 31337,
            uid: 4_000_000_000,
            gid: 3_000_000_000,
            groups: vec![10, 4_294_967_294],
            label: label.map(<[u8]>::to_vec),
        }
    }

    fn host_facts() -> ProcFacts {
        ProcFacts {
            status: ProcStatus {
                state: Some('S'),
                nspids: vec![31337],
            },
            cgroups: parse_proc_cgroup(
                "1:name=systemd:/user.slice/user-0.slice/session-3.scope\n\
                 0::/user.slice/user-0.slice/session-3.scope\n",
            ),
            namespaces: host().namespaces,
            pid_namespace_chain: Some(vec![HOST_PID_NS]),
        }
    }

    fn container_facts(cgroup: &str) -> ProcFacts {
        let mut namespaces = host().namespaces;
        namespaces.pid = CONTAINER_PID_NS;
        namespaces.mnt = 4026532901;
        ProcFacts {
            status: ProcStatus {
                state: Some('S'),
                nspids: vec![31337, 1],
            },
            cgroups: parse_proc_cgroup(cgroup),
            namespaces,
            pid_namespace_chain: Some(vec![HOST_PID_NS, CONTAINER_PID_NS]),
        }
    }

    #[test]
    fn host_peer_fills_every_field() {
        let identity = identify_from_parts(
            socket(Some(b"unconfined_u:unconfined_r:unconfined_t:s0")),
            &host_facts(),
            "/run/pbus/system",
            &host(),
        )
        .unwrap();
        assert_eq!(
            identity,
            PeerIdentity {
                uid: 4_000_000_000,
                gid: 3_000_000_000,
                pid: 31337,
                groups: vec![10, 4_294_967_294],
                label: Some("unconfined_u:unconfined_r:unconfined_t:s0".into()),
                namespaces: host().namespaces,
                pid_namespace_chain: vec![HOST_PID_NS],
                nspids: vec![31337],
                cgroup: "/user.slice/user-0.slice/session-3.scope".into(),
                container: Container::default(),
                container_candidate: None,
                listener: "/run/pbus/system".into(),
            }
        );
        assert_eq!(identity.pid_seen_from(HOST_PID_NS), 31337);
        assert_eq!(identity.pid_seen_from(CONTAINER_PID_NS), 0);
    }

    #[test]
    fn labels_pass_through_unchanged_or_are_refused() {
        let apparmor = b"snap.firefox.firefox (enforce)";
        let identity =
            identify_from_parts(socket(Some(apparmor)), &host_facts(), "l", &host()).unwrap();
        assert_eq!(
            identity.label.as_deref(),
            Some("snap.firefox.firefox (enforce)")
        );
        let identity = identify_from_parts(socket(None), &host_facts(), "l", &host()).unwrap();
        assert_eq!(identity.label, None);
        let err =
            identify_from_parts(socket(Some(b"bad\xff")), &host_facts(), "l", &host()).unwrap_err();
        assert!(
            matches!(&err, IdentifyError::LabelNotUtf8 { label } if label == b"bad\xff"),
            "{err}"
        );
    }

    #[test]
    fn docker_peer_on_a_hybrid_host() {
        let facts = container_facts(&format!(
            "4:memory:/docker/{DOCKER_ID}\n1:name=systemd:/docker/{DOCKER_ID}\n0::/\n"
        ));
        let identity = identify_from_parts(socket(None), &facts, "l", &host()).unwrap();
        assert_eq!(identity.cgroup, format!("/docker/{DOCKER_ID}"));
        assert_eq!(
            identity.container,
            Container {
                runtime: ContainerRuntime::Docker,
                id: DOCKER_ID.into(),
                pod_uid: None,
            }
        );
        assert_eq!(
            identity.pid_namespace_chain,
            [HOST_PID_NS, CONTAINER_PID_NS]
        );
        assert_eq!(identity.pid_seen_from(HOST_PID_NS), 31337);
        assert_eq!(identity.pid_seen_from(CONTAINER_PID_NS), 1);
        assert_eq!(identity.pid_seen_from(4026533000), 0);
    }

    #[test]
    fn namespaced_peer_in_an_unknown_cgroup_is_not_the_host() {
        let facts = container_facts("0::/user.slice/user-0.slice/session-3.scope\n");
        let identity = identify_from_parts(socket(None), &facts, "l", &host()).unwrap();
        assert_eq!(identity.container.runtime, ContainerRuntime::Unknown);
        assert!(identity.container.is_container());
        assert_eq!(identity.container.id, "");
    }

    #[test]
    fn inconsistent_chain_falls_back_to_provable_ends() {
        let mut facts = container_facts("0::/\n");
        facts.status.nspids = vec![31337, 7, 1];
        let identity = identify_from_parts(socket(None), &facts, "l", &host()).unwrap();
        assert_eq!(
            identity.pid_namespace_chain,
            [HOST_PID_NS, CONTAINER_PID_NS]
        );
        assert_eq!(identity.nspids, [31337, 1]);
    }
}
