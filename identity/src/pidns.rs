//! The chain of pid namespaces between the daemon and a peer, and its
//! alignment with the peer's `NSpid` line, for pid translation.
//!
//! A process has one pid per pid namespace from the init namespace down to
//! its own. `/proc/PID/status` lists them (`NSpid`) from the namespace
//! `/proc` belongs to (the daemon's) down; [`walk_pid_namespace_chain`]
//! finds the inode of each of those namespaces by walking up from the
//! peer's own with `NS_GET_PARENT`. [`align_pid_namespaces`] pairs the two
//! so [`PeerIdentity::pid_seen_from`](crate::PeerIdentity::pid_seen_from)
//! can answer "what is this peer's pid inside namespace N?".

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

/// The deepest pid namespace nesting Linux allows (`MAX_PID_NS_LEVEL`).
const MAX_PID_NAMESPACE_LEVEL: usize = 32;

/// Walks from the pid namespace of the process whose `/proc` directory is
/// `proc_dir` up to `daemon_pid_namespace`, and returns the inodes
/// outermost (the daemon's) first, the process's own last.
///
/// Fails when the process's namespace is not the daemon's or below it
/// (`NS_GET_PARENT` refuses to leave the caller's own namespace, `EPERM`).
pub fn walk_pid_namespace_chain(
    proc_dir: &Path,
    daemon_pid_namespace: u64,
) -> io::Result<Vec<u64>> {
    let mut namespace: OwnedFd = File::open(proc_dir.join("ns").join("pid"))?.into();
    let mut inode = pbus_sys::ns::inode_of(&namespace)?;
    let mut chain = vec![inode];
    while inode != daemon_pid_namespace {
        if chain.len() > MAX_PID_NAMESPACE_LEVEL {
            return Err(io::Error::other(
                "pid namespace chain deeper than the kernel allows",
            ));
        }
        namespace = pbus_sys::ns::parent_namespace(&namespace)?;
        inode = pbus_sys::ns::inode_of(&namespace)?;
        chain.push(inode);
    }
    chain.reverse();
    Ok(chain)
}

/// A peer's pid namespaces and its pid in each, aligned index by index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlignedPids {
    /// Pid namespace inodes, the daemon's first, the peer's own last.
    pub pid_namespace_chain: Vec<u64>,
    /// The peer's pid in each namespace of `pid_namespace_chain`.
    pub nspids: Vec<u32>,
    /// False when the full chain could not be aligned and only the two
    /// ends the daemon can prove were kept (see [`align_pid_namespaces`]).
    pub complete: bool,
}

/// Pairs the walked pid namespace chain with the `NSpid` line.
///
/// * `daemon_pid_namespace`, `daemon_view_pid`: the daemon's own pid
///   namespace and the peer's pid there (from SO_PEERCRED).
/// * `peer_pid_namespace`: the peer's own pid namespace (0 if unreadable).
/// * `walked`: the chain from [`walk_pid_namespace_chain`], if it worked.
/// * `nspids`: the `NSpid` line.
///
/// When the walk worked, runs from the daemon's namespace to the peer's,
/// and has one entry per `NSpid` entry, with `NSpid` starting at the
/// daemon's view of the pid, the full chain is used. Otherwise (walk
/// failed, `/proc` belongs to another pid namespace than the daemon's,
/// inconsistent data) only what can be proved is kept: the daemon's own
/// view, plus the peer's own namespace with the last `NSpid` entry when
/// the peer is in a different, known namespace. Pids in namespaces between
/// the two are then reported as not visible (0) rather than guessed.
pub fn align_pid_namespaces(
    daemon_pid_namespace: u64,
    daemon_view_pid: u32,
    peer_pid_namespace: u64,
    walked: Option<&[u64]>,
    nspids: &[u32],
) -> AlignedPids {
    if let Some(chain) = walked {
        let consistent = chain.len() == nspids.len()
            && chain.first() == Some(&daemon_pid_namespace)
            && (peer_pid_namespace == 0 || chain.last() == Some(&peer_pid_namespace))
            && nspids.first() == Some(&daemon_view_pid);
        if consistent {
            return AlignedPids {
                pid_namespace_chain: chain.to_vec(),
                nspids: nspids.to_vec(),
                complete: true,
            };
        }
    }
    let mut aligned = AlignedPids {
        pid_namespace_chain: vec![daemon_pid_namespace],
        nspids: vec![daemon_view_pid],
        complete: false,
    };
    let peer_elsewhere = peer_pid_namespace != 0 && peer_pid_namespace != daemon_pid_namespace;
    if let (true, [_, .., own_pid]) = (peer_elsewhere, nspids) {
        aligned.pid_namespace_chain.push(peer_pid_namespace);
        aligned.nspids.push(*own_pid);
    }
    aligned
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: u64 = 4026531836;
    const MIDDLE: u64 = 4026532500;
    const INNER: u64 = 4026532777;

    #[test]
    fn consistent_chain_is_used_whole() {
        let chain = [HOST, MIDDLE, INNER];
        let aligned = align_pid_namespaces(HOST, 9000, INNER, Some(&chain), &[9000, 40, 1]);
        assert!(aligned.complete);
        assert_eq!(aligned.pid_namespace_chain, chain);
        assert_eq!(aligned.nspids, [9000, 40, 1]);
    }

    #[test]
    fn same_namespace_is_a_chain_of_one() {
        let aligned = align_pid_namespaces(HOST, 123, HOST, Some(&[HOST]), &[123]);
        assert!(aligned.complete);
        assert_eq!(aligned.pid_namespace_chain, [HOST]);
        assert_eq!(aligned.nspids, [123]);
    }

    #[test]
    fn length_mismatch_keeps_the_provable_ends() {
        // /proc from an outer namespace: NSpid has one entry too many.
        let aligned =
            align_pid_namespaces(MIDDLE, 40, INNER, Some(&[MIDDLE, INNER]), &[9000, 40, 1]);
        assert!(!aligned.complete);
        assert_eq!(aligned.pid_namespace_chain, [MIDDLE, INNER]);
        assert_eq!(aligned.nspids, [40, 1]);
    }

    #[test]
    fn failed_walk_keeps_the_provable_ends() {
        let aligned = align_pid_namespaces(HOST, 9000, INNER, None, &[9000, 40, 1]);
        assert!(!aligned.complete);
        assert_eq!(aligned.pid_namespace_chain, [HOST, INNER]);
        assert_eq!(aligned.nspids, [9000, 1]);
    }

    #[test]
    fn unreadable_peer_namespace_keeps_only_the_daemon_view() {
        let aligned = align_pid_namespaces(HOST, 9000, 0, None, &[9000, 40, 1]);
        assert_eq!(aligned.pid_namespace_chain, [HOST]);
        assert_eq!(aligned.nspids, [9000]);
        let no_nspid = align_pid_namespaces(HOST, 9000, INNER, None, &[]);
        assert_eq!(no_nspid.pid_namespace_chain, [HOST]);
        assert_eq!(no_nspid.nspids, [9000]);
    }

    #[test]
    fn chain_not_starting_at_the_daemon_is_not_trusted() {
        let aligned = align_pid_namespaces(HOST, 9000, INNER, Some(&[MIDDLE, INNER]), &[9000, 1]);
        assert!(!aligned.complete);
        assert_eq!(aligned.pid_namespace_chain, [HOST, INNER]);
        assert_eq!(aligned.nspids, [9000, 1]);
    }

    #[test]
    fn our_own_chain_is_just_our_namespace() {
        let own = std::fs::metadata("/proc/self/ns/pid").unwrap();
        use std::os::unix::fs::MetadataExt;
        let chain = walk_pid_namespace_chain(Path::new("/proc/self"), own.ino()).unwrap();
        assert_eq!(chain, [own.ino()]);
        // A namespace we are not in or below: the walk leaves our scope.
        let err = walk_pid_namespace_chain(Path::new("/proc/self"), 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    }
}
