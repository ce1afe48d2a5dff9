//! Capturing a peer's identity right after accept(2).

use std::os::fd::{AsFd, OwnedFd};

use crate::model::PeerIdentity;

/// Facts about the daemon's own environment that identity capture compares
/// peers against. Built once at daemon start.
#[derive(Debug, Clone, Default)]
pub struct HostContext {
    /// The daemon's own pid namespace inode.
    pub pid_namespace: u64,
}

impl HostContext {
    /// Reads the daemon's own context.
    pub fn detect() -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let pid_namespace = std::fs::metadata("/proc/self/ns/pid")?.ino();
        Ok(Self { pid_namespace })
    }
}

/// Why a peer could not be identified.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    /// A socket option the kernel must answer failed.
    #[error("reading {what} failed: {source}")]
    Kernel {
        /// Which query failed.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The peer process exited before it could be identified.
    #[error("peer process {pid} exited before it could be identified")]
    PeerGone {
        /// The pid SO_PEERCRED reported.
        pid: i32,
    },
}

/// Reads the identity of the peer of `socket`, which connected through
/// `listener`. Returns the identity and the peer's pidfd.
pub fn identify(
    socket: impl AsFd,
    listener: &str,
    host: &HostContext,
) -> Result<(PeerIdentity, OwnedFd), IdentifyError> {
    let socket = socket.as_fd();
    let kernel = |what| move |source| IdentifyError::Kernel { what, source };
    let cred = pbus_sys::creds::peer_credentials(socket).map_err(kernel("SO_PEERCRED"))?;
    let groups = pbus_sys::creds::peer_groups(socket).map_err(kernel("SO_PEERGROUPS"))?;
    let label = pbus_sys::creds::peer_security_label(socket)
        .map_err(kernel("SO_PEERSEC"))?
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    let pidfd = pbus_sys::creds::peer_pidfd(socket).map_err(|source| {
        if source.raw_os_error() == Some(libc_esrch()) {
            IdentifyError::PeerGone { pid: cred.pid }
        } else {
            IdentifyError::Kernel {
                what: "SO_PEERPIDFD",
                source,
            }
        }
    })?;
    if cred.pid <= 0 || pbus_sys::creds::pidfd_send_signal(&pidfd, 0).is_err() {
        return Err(IdentifyError::PeerGone { pid: cred.pid });
    }
    let pid = cred.pid as u32;
    Ok((
        PeerIdentity {
            uid: cred.uid,
            gid: cred.gid,
            pid,
            groups,
            label,
            pid_namespace_chain: vec![host.pid_namespace],
            nspids: vec![pid],
            listener: listener.to_owned(),
            ..PeerIdentity::default()
        },
        pidfd,
    ))
}

fn libc_esrch() -> i32 {
    3
}
