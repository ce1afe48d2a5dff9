//! Peer credentials of a connected Unix socket and pidfd helpers.
//!
//! Everything here is read from the kernel at the moment of the call; the
//! caller decides when that is (pbusd does it once, right after accept, so
//! the identity is pinned to the connect-time credentials).

use std::ffi::c_void;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use crate::check;

/// `SO_PEERPIDFD` (Linux 6.5); not yet exported by every libc version.
const SO_PEERPIDFD: libc::c_int = 77;
/// `SO_PEERGROUPS` (Linux 4.13).
const SO_PEERGROUPS: libc::c_int = 59;

/// The `struct ucred` the kernel recorded when the peer called connect(2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Peer pid in the pid namespace of the socket's reader (0 if not visible).
    pub pid: i32,
    /// Effective uid at connect time.
    pub uid: u32,
    /// Effective gid at connect time.
    pub gid: u32,
}

/// Reads SO_PEERCRED.
pub fn peer_credentials(socket: impl AsFd) -> io::Result<PeerCredentials> {
    let mut cred = MaybeUninit::<libc::ucred>::zeroed();
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable buffer of exactly `len` bytes and `len`
    // points to its size; the kernel writes at most that many bytes.
    check(unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            cred.as_mut_ptr().cast::<c_void>(),
            &mut len,
        )
    })?;
    // SAFETY: zero-initialised and possibly overwritten by the kernel; every
    // bit pattern is a valid `ucred`.
    let cred = unsafe { cred.assume_init() };
    Ok(PeerCredentials {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The pid recorded as the peer of `fd` if it is a socket (SO_PEERCRED),
/// `None` if it is not a socket. A socket connected to a listening Unix
/// socket reports the pid that called listen(2) on it; an unconnected or
/// non-Unix socket reports 0.
pub fn socket_peer_pid(fd: impl AsFd) -> io::Result<Option<i32>> {
    match peer_credentials(fd) {
        Ok(credentials) => Ok(Some(credentials.pid)),
        Err(error) if error.raw_os_error() == Some(libc::ENOTSOCK) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Reads SO_PEERGROUPS: the peer's supplementary groups at connect time.
pub fn peer_groups(socket: impl AsFd) -> io::Result<Vec<u32>> {
    let fd = socket.as_fd().as_raw_fd();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is a writable buffer of `len` bytes; on ERANGE the
        // kernel writes the needed size to `len` and nothing to the buffer.
        let result = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast::<c_void>(),
                &mut len,
            )
        };
        if result == 0 {
            groups.truncate(len as usize / size_of::<libc::gid_t>());
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) {
            let needed = len as usize / size_of::<libc::gid_t>();
            if needed <= groups.len() {
                return Err(err);
            }
            groups.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

/// Reads SO_PEERSEC, the peer's LSM label.
///
/// Returns `Ok(None)` when no LSM provides labels (`ENOPROTOOPT`), which is
/// the normal state of a machine without SELinux, AppArmor or Smack. The
/// trailing NUL some LSMs include is stripped.
pub fn peer_security_label(socket: impl AsFd) -> io::Result<Option<Vec<u8>>> {
    let fd = socket.as_fd().as_raw_fd();
    let mut label = vec![0u8; 256];
    loop {
        let mut len = label.len() as libc::socklen_t;
        // SAFETY: `label` is a writable buffer of `len` bytes; on ERANGE the
        // kernel reports the needed size in `len` and writes nothing.
        let result = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERSEC,
                label.as_mut_ptr().cast::<c_void>(),
                &mut len,
            )
        };
        if result == 0 {
            label.truncate(len as usize);
            while label.last() == Some(&0) {
                label.pop();
            }
            return Ok(if label.is_empty() { None } else { Some(label) });
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOPROTOOPT) => return Ok(None),
            Some(libc::ERANGE) if (len as usize) > label.len() => {
                label.resize(len as usize, 0);
            }
            _ => return Err(err),
        }
    }
}

/// Reads SO_PEERPIDFD: a pidfd for the process that called connect(2).
///
/// The kernel takes the pidfd from the pid it pinned at connect time, so the
/// result names that very process even if it has exited since (in which
/// case operations on the pidfd report `ESRCH`).
pub fn peer_pidfd(socket: impl AsFd) -> io::Result<OwnedFd> {
    let mut pidfd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `pidfd` is a writable c_int and `len` its size.
    check(unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut pidfd as *mut libc::c_int).cast::<c_void>(),
            &mut len,
        )
    })?;
    if pidfd < 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: the kernel just created this fd for us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
}

/// pidfd_open(2): a pidfd for `pid` in the caller's pid namespace.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just created this fd for us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Sends signal `signal` (0 to probe) to the process a pidfd names.
///
/// With `signal == 0` this is a liveness check: `Err` with `ESRCH` means the
/// process has exited (it may still be a zombie that has not been reaped;
/// the kernel reports ESRCH for those too once they have exited).
pub fn pidfd_send_signal(pidfd: impl AsFd, signal: i32) -> io::Result<()> {
    // SAFETY: plain syscall; a null siginfo pointer is allowed.
    let result = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_fd().as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn socketpair_reports_our_own_credentials() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = peer_credentials(&a).unwrap();
        assert_eq!(cred.pid as u32, std::process::id());
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        assert_eq!(cred.uid, uid);
        assert_eq!(cred.gid, gid);
        let groups = peer_groups(&a).unwrap();
        // SAFETY: a zero-length query returns the count.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        assert_eq!(groups.len(), n as usize);
        // No LSM on most CI machines: None is fine, an error is not.
        let _label = peer_security_label(&a).unwrap();
    }

    #[test]
    fn socket_peer_pid_tells_sockets_from_other_fds() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(
            socket_peer_pid(&a).unwrap(),
            Some(std::process::id() as i32)
        );
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(socket_peer_pid(&file).unwrap(), None);
    }

    #[test]
    fn peer_pidfd_names_a_live_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let pidfd = peer_pidfd(&a).unwrap();
        pidfd_send_signal(&pidfd, 0).unwrap();
        let own = pidfd_open(std::process::id() as i32).unwrap();
        pidfd_send_signal(&own, 0).unwrap();
    }
}
