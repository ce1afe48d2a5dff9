//! Validation of memfd payloads attached to messages. The daemon checks the
//! seals and the declared range, and never maps or reads the contents, so
//! routing cost does not depend on payload size. The check itself is
//! `pbus_sys::memfd::check_payload`, the one the client applies too.

use std::os::fd::OwnedFd;

/// The daemon's [`FdProbe`](crate::bus::FdProbe): the real syscalls.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemFdProbe;

impl crate::bus::FdProbe for SystemFdProbe {
    fn check_memfd(&self, fd: &OwnedFd, offset: u64, length: u64) -> Result<(), String> {
        pbus_sys::memfd::check_payload(fd, offset, length).map_err(|error| error.to_string())
    }
}
