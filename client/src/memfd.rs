//! Zero-copy payloads: sealed memfds.
//!
//! A [`SealedMemfd`] is a memfd that nobody can change any more
//! (SEAL_SHRINK | SEAL_GROW | SEAL_WRITE | SEAL_SEAL). Sending one costs the
//! same whatever its size: only the fd travels. The library puts large
//! message bodies into one automatically (above the connection's memfd
//! threshold); [`MemfdWriter`] and [`SealedMemfd::from_fd`] let
//! applications produce payloads directly in a memfd, and receivers map
//! what they get read-only with [`SealedMemfd::map`] or keep the fd.
//!
//! Whether a memfd and range make a valid payload is
//! `pbus_sys::memfd::check_payload`, the check the bus makes too.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use pbus_sys::memfd::{self as sys, seal, ReadOnlyMapping};

use crate::Error;

/// Adds every seal pbus requires. SEAL_WRITE fails with `EBUSY` while any
/// page of the file still has an extra reference (the kernel waits a little
/// for such transient pins itself, but a busy machine can outlast that, e.g.
/// just after a large write); that is retried a few times before giving up.
fn seal_required(fd: &OwnedFd) -> std::io::Result<()> {
    let mut pause = std::time::Duration::from_micros(200);
    for _ in 0..8 {
        match sys::add_seals(fd, seal::REQUIRED) {
            Err(error) if error.raw_os_error() == Some(16) => {
                std::thread::sleep(pause);
                pause *= 2;
            }
            other => return other,
        }
    }
    sys::add_seals(fd, seal::REQUIRED)
}

/// A fully sealed memfd and the byte range of it that is the payload.
#[derive(Debug)]
pub struct SealedMemfd {
    fd: OwnedFd,
    offset: u64,
    len: u64,
}

impl SealedMemfd {
    /// Copies `bytes` into a new memfd and seals it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let mut writer = MemfdWriter::new("pbus-payload")?;
        writer.write_all(bytes)?;
        writer.seal()
    }

    /// Takes a memfd the caller filled and sealed (or seals it now if it
    /// still can be sealed); the whole file is the payload.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, Error> {
        let len = sys::file_size(&fd)?;
        Self::from_fd_range(fd, 0, len)
    }

    /// Like [`from_fd`](Self::from_fd) for the range `offset..offset+len`.
    pub fn from_fd_range(fd: OwnedFd, offset: u64, len: u64) -> Result<Self, Error> {
        let present =
            sys::seals(&fd).map_err(|e| Error::Memfd(format!("not a sealable memfd: {e}")))?;
        if present & seal::REQUIRED != seal::REQUIRED {
            if present & seal::SEAL != 0 {
                return Err(Error::Memfd(
                    "memfd is sealed against new seals but lacks SHRINK/GROW/WRITE".into(),
                ));
            }
            seal_required(&fd).map_err(|e| {
                Error::Memfd(format!(
                    "cannot seal the memfd (a writable mapping may still exist): {e}"
                ))
            })?;
        }
        Self::checked(fd, offset, len)
    }

    /// Wraps a memfd received from the bus after checking, once more, that
    /// it is sealed and the range fits (so mapping it can never fault).
    pub(crate) fn received(fd: OwnedFd, offset: u64, len: u64) -> Result<Self, Error> {
        Self::checked(fd, offset, len)
    }

    /// Applies the payload rule (seals and range) that the bus applies.
    fn checked(fd: OwnedFd, offset: u64, len: u64) -> Result<Self, Error> {
        sys::check_payload(&fd, offset, len).map_err(|error| Error::Memfd(error.to_string()))?;
        Ok(Self { fd, offset, len })
    }

    /// Payload length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset of the payload inside the memfd.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Maps the payload read-only. Works on every kernel: the mapping is
    /// private, which a write-sealed memfd allows even before Linux 6.7.
    pub fn map(&self) -> Result<ReadOnlyMapping, Error> {
        let len = usize::try_from(self.len)
            .map_err(|_| Error::Memfd("payload larger than the address space".into()))?;
        Ok(ReadOnlyMapping::new(&self.fd, self.offset, len)?)
    }

    /// Takes ownership of the memfd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// A second handle to the same sealed memfd (dup).
    pub fn try_clone(&self) -> Result<Self, Error> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            offset: self.offset,
            len: self.len,
        })
    }
}

impl AsFd for SealedMemfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Writes a payload into a fresh memfd, then seals it.
#[derive(Debug)]
pub struct MemfdWriter {
    file: std::fs::File,
}

impl MemfdWriter {
    /// A new empty memfd; `name` shows in /proc/PID/fd for debugging.
    pub fn new(name: &str) -> Result<Self, Error> {
        Ok(Self {
            file: std::fs::File::from(sys::memfd_create(name)?),
        })
    }

    /// Reserves `len` bytes up front (avoids growing in steps).
    pub fn reserve(&mut self, len: u64) -> Result<(), Error> {
        self.file.set_len(len)?;
        self.file.set_len(0)?;
        Ok(())
    }

    /// Seals the memfd; from now on nobody can change it.
    pub fn seal(self) -> Result<SealedMemfd, Error> {
        let fd = OwnedFd::from(self.file);
        seal_required(&fd)?;
        let len = sys::file_size(&fd)?;
        Ok(SealedMemfd { fd, offset: 0, len })
    }
}

impl Write for MemfdWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_through_a_sealed_memfd() {
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let memfd = SealedMemfd::from_bytes(&payload).unwrap();
        assert_eq!(memfd.len(), payload.len() as u64);
        assert_eq!(&memfd.map().unwrap()[..], &payload[..]);
        let present = sys::seals(&memfd).unwrap();
        assert_eq!(present & seal::REQUIRED, seal::REQUIRED);
    }

    #[test]
    fn unsealed_memfd_is_sealed_on_adoption_and_range_checked() {
        let mut writer = MemfdWriter::new("t").unwrap();
        writer.write_all(b"0123456789").unwrap();
        let fd = OwnedFd::from(writer.file);
        let memfd = SealedMemfd::from_fd_range(fd.try_clone().unwrap(), 2, 5).unwrap();
        assert_eq!(&memfd.map().unwrap()[..], b"23456");
        assert!(SealedMemfd::from_fd_range(fd, 8, 5).is_err());
    }
}
