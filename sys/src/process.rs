//! Process-wide settings: the fd limit.

use std::io;

use crate::check;

/// The soft and hard RLIMIT_NOFILE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The limit the kernel enforces now.
    pub soft: u64,
    /// The ceiling an unprivileged process may raise `soft` to.
    pub hard: u64,
}

/// Reads RLIMIT_NOFILE.
pub fn fd_limit() -> io::Result<FdLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a writable rlimit.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    Ok(FdLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Raises the RLIMIT_NOFILE soft limit to the hard limit and returns the
/// result. A daemon that holds fds for many clients wants all it may have.
pub fn raise_fd_limit() -> io::Result<FdLimit> {
    let current = fd_limit()?;
    if current.soft < current.hard {
        let limit = libc::rlimit {
            rlim_cur: current.hard,
            rlim_max: current.hard,
        };
        // SAFETY: `limit` is a valid rlimit value.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) })?;
    }
    fd_limit()
}

/// The effective uid of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}
