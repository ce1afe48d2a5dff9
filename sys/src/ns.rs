//! Linux namespace file descriptors: their identity (inode) and their
//! place in the pid namespace hierarchy (`NS_GET_PARENT`).
//!
//! A namespace is named by an nsfs fd, e.g. from opening `/proc/PID/ns/pid`.
//! Two fds name the same namespace exactly when their inodes are equal (all
//! nsfs inodes live on one device).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use crate::check;

/// `NS_GET_PARENT` from `<linux/nsfs.h>`: `_IO(0xb7, 0x2)`.
const NS_GET_PARENT: u32 = (0xb7 << 8) | 0x2;

/// The inode number of the file `fd` refers to (`fstat(2)`'s `st_ino`).
///
/// For an nsfs fd this is the namespace's identity, the same number
/// `readlink /proc/PID/ns/*` shows in brackets.
pub fn inode_of(fd: impl AsFd) -> io::Result<u64> {
    let mut stat = MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `stat` is a writable buffer of the size fstat expects, and the
    // fd is valid for the duration of the borrow.
    check(unsafe { libc::fstat(fd.as_fd().as_raw_fd(), stat.as_mut_ptr()) })?;
    // SAFETY: zero-initialised and then filled in by the kernel; every bit
    // pattern is a valid `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.st_ino)
}

/// Opens the parent of the pid (or user) namespace `namespace` names
/// (`ioctl(NS_GET_PARENT)`).
///
/// Fails with `EPERM` when the parent lies outside the caller's own pid
/// namespace (so walking up from a child namespace stops at the caller's),
/// and with `EINVAL` when `namespace` is not a hierarchical namespace.
pub fn parent_namespace(namespace: impl AsFd) -> io::Result<OwnedFd> {
    // SAFETY: NS_GET_PARENT takes no argument and returns a new fd or -1;
    // the namespace fd is valid for the duration of the borrow.
    let fd = check(unsafe { libc::ioctl(namespace.as_fd().as_raw_fd(), NS_GET_PARENT as _) })?;
    // SAFETY: the kernel just created this fd for us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn inode_of_matches_the_proc_link_target() {
        let file = File::open("/proc/self/ns/pid").unwrap();
        let via_link = std::fs::metadata("/proc/self/ns/pid").unwrap().ino();
        assert_eq!(inode_of(&file).unwrap(), via_link);
        let net = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_ne!(inode_of(&file).unwrap(), net);
    }

    #[test]
    fn the_parent_of_our_own_pid_namespace_is_out_of_scope() {
        let own = File::open("/proc/self/ns/pid").unwrap();
        let err = parent_namespace(&own).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    }

    #[test]
    fn a_flat_namespace_has_no_parent() {
        let net = File::open("/proc/self/ns/net").unwrap();
        let err = parent_namespace(&net).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }
}
