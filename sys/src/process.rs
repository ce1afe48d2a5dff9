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
/// With CAP_SYS_RESOURCE (root) the hard limit is first raised to
/// `ceiling` (callers pass the kernel's `fs.nr_open`); without it that step
/// fails quietly.
pub fn raise_fd_limit(ceiling: Option<u64>) -> io::Result<FdLimit> {
    let mut current = fd_limit()?;
    if let Some(ceiling) = ceiling {
        if ceiling > current.hard {
            let limit = libc::rlimit {
                rlim_cur: current.soft,
                rlim_max: ceiling,
            };
            // SAFETY: `limit` is a valid rlimit value. EPERM without
            // CAP_SYS_RESOURCE is expected and ignored.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
                current = fd_limit()?;
            }
        }
    }
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

/// Restores the default SIGPIPE action (terminate quietly), which the Rust
/// runtime replaces with "ignore". For command-line tools whose output may
/// go to a pipe that closes early (`pbusctl list | head`).
pub fn restore_default_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL installs no handler
    // code; it is async-signal-safe and affects only SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
