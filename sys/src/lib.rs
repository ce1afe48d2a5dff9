//! The raw Linux syscalls pbus needs, wrapped in safe functions.
//!
//! This is the only crate in the workspace allowed to contain `unsafe`. Each
//! block carries a `// SAFETY:` comment. Everything here is a thin, policy-free
//! wrapper: it knows about sockets, fds, memfds and pidfds, and nothing about
//! names or the bus. Two modules apply `pbus_proto`'s rules to what the
//! syscalls return, so that every reader applies them the same way: the
//! framed receive and the memfd payload check.
//!
//! * [`creds`]: what the kernel says about the peer of a Unix socket
//!   (SO_PEERCRED, SO_PEERGROUPS, SO_PEERSEC, SO_PEERPIDFD) and pidfds.
//! * [`fdpass`]: sendmsg/recvmsg with SCM_RIGHTS ancillary data.
//! * [`framed`]: one framed receive: recvmsg, the MSG_CTRUNC and fd-set
//!   checks, and frames handed out with their own fds (with the `tokio`
//!   feature, also on a `tokio::net::UnixStream`).
//! * [`memfd`]: memfd creation, seals, the payload check, and read-only
//!   mappings.
//! * [`ns`]: namespace fds: their inodes and the pid namespace hierarchy.
//! * [`process`]: process-wide resource limits.
//! * `reactor` (feature `tokio`): registering owned fds with tokio.

pub mod creds;
pub mod fdpass;
pub mod framed;
pub mod memfd;
pub mod ns;
pub mod process;
#[cfg(feature = "tokio")]
pub mod reactor;

use std::io;

/// Turns a `-1` syscall result into the thread's `errno`.
fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Like [`check`] for syscalls that return `ssize_t`.
fn check_size(result: libc::ssize_t) -> io::Result<usize> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result as usize)
    }
}
