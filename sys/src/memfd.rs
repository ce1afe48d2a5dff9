//! memfds: creation, seals, size, and read-only mappings.
//!
//! A sealed memfd is how pbus moves large payloads without copying: the
//! sender writes the bytes once, seals the memfd so nobody can change or
//! resize it again, and passes the fd. The daemon and the client check a
//! payload memfd with [`check_payload`] (its seals and size, against the
//! rule in `pbus_proto::memfd`); the daemon never maps the contents.
//! Receivers map them read-only with [`ReadOnlyMapping`].

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use pbus_proto::memfd::{check_range, check_seals, MemfdError};

use crate::check;

/// Seal bits (`F_SEAL_*`), as the protocol names them; a test below
/// checks them against libc's.
pub use pbus_proto::memfd::seal;

/// Creates a memfd that allows sealing and is close-on-exec.
pub fn memfd_create(name: &str) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
    let fd = check(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: the kernel just created this fd for us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds seals (`F_ADD_SEALS`).
pub fn add_seals(fd: impl AsFd, seals: u32) -> io::Result<()> {
    // SAFETY: fcntl with an integer argument.
    check(unsafe {
        libc::fcntl(
            fd.as_fd().as_raw_fd(),
            libc::F_ADD_SEALS,
            seals as libc::c_int,
        )
    })?;
    Ok(())
}

/// Reads the seals (`F_GET_SEALS`). Fails with `EINVAL` when the fd is not a
/// memfd (or other sealable shmem file), which is how callers tell a memfd
/// from a regular file.
pub fn seals(fd: impl AsFd) -> io::Result<u32> {
    // SAFETY: fcntl without a pointer argument.
    let seals = check(unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_GET_SEALS) })?;
    Ok(seals as u32)
}

/// The file's size from fstat(2).
pub fn file_size(fd: impl AsFd) -> io::Result<u64> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `stat` is a writable stat buffer.
    check(unsafe { libc::fstat(fd.as_fd().as_raw_fd(), stat.as_mut_ptr()) })?;
    // SAFETY: zero-initialised and filled in by fstat.
    Ok(unsafe { stat.assume_init() }.st_size as u64)
}

/// Why [`check_payload`] refused an fd.
#[derive(Debug)]
pub enum PayloadError {
    /// The fd breaks the payload rule (`pbus_proto::memfd`).
    Invalid(MemfdError),
    /// `F_GET_SEALS` failed for another reason than "not sealable".
    ReadSeals(io::Error),
    /// fstat(2) failed.
    ReadSize(io::Error),
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(error) => error.fmt(f),
            Self::ReadSeals(error) => write!(f, "cannot read the memfd's seals: {error}"),
            Self::ReadSize(error) => write!(f, "cannot read the memfd's size: {error}"),
        }
    }
}

impl std::error::Error for PayloadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Invalid(error) => Some(error),
            Self::ReadSeals(error) | Self::ReadSize(error) => Some(error),
        }
    }
}

/// Checks that `fd` may be a memfd payload with the range
/// `[offset, offset + length)`: it is a memfd carrying every seal pbus
/// requires, and the range lies inside it (see `pbus_proto::memfd`). The
/// seals are read first and the size only if they pass; `EINVAL` from
/// `F_GET_SEALS` means the fd cannot carry seals at all.
pub fn check_payload(fd: impl AsFd, offset: u64, length: u64) -> Result<(), PayloadError> {
    let fd = fd.as_fd();
    let present = match seals(fd) {
        Ok(present) => present,
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            return Err(PayloadError::Invalid(MemfdError::NotMemfd))
        }
        Err(error) => return Err(PayloadError::ReadSeals(error)),
    };
    check_seals(present).map_err(PayloadError::Invalid)?;
    let size = file_size(fd).map_err(PayloadError::ReadSize)?;
    check_range(offset, length, size).map_err(PayloadError::Invalid)
}

/// A read-only private mapping of part of a file, unmapped on drop.
///
/// MAP_PRIVATE with PROT_READ works on write-sealed memfds on every kernel
/// (before 6.7 a read-only MAP_SHARED mapping of an F_SEAL_WRITE memfd is
/// refused because it could later be mprotect'ed writable). Since the memfd
/// is sealed, a private mapping sees exactly the bytes the sender wrote.
pub struct ReadOnlyMapping {
    /// Start of the mapping (page aligned); dangling when `mapped_len` is 0.
    base: NonNull<u8>,
    /// Length passed to mmap.
    mapped_len: usize,
    /// Offset of the requested range inside the mapping.
    skip: usize,
    /// Length of the requested range.
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; sharing `&[u8]`
// views across threads is sound, and munmap from any thread is fine.
unsafe impl Send for ReadOnlyMapping {}
// SAFETY: see above; no interior mutability.
unsafe impl Sync for ReadOnlyMapping {}

impl ReadOnlyMapping {
    /// Maps `len` bytes at `offset` of `fd` read-only. The caller must have
    /// checked that the range lies inside the file and that the file cannot
    /// shrink (SEAL_SHRINK), or reading may fault with SIGBUS.
    pub fn new(fd: impl AsFd, offset: u64, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Ok(Self {
                base: NonNull::dangling(),
                mapped_len: 0,
                skip: 0,
                len: 0,
            });
        }
        // SAFETY: sysconf is always safe to call.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let aligned = offset - offset % page;
        let skip = (offset - aligned) as usize;
        let mapped_len = skip
            .checked_add(len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let file_offset = libc::off_t::try_from(aligned)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh mapping chosen by the kernel (null hint); it does
        // not alias any Rust object.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                fd.as_fd().as_raw_fd(),
                file_offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: NonNull::new(base.cast()).expect("mmap returned null"),
            mapped_len,
            skip,
            len,
        })
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: [base+skip, base+skip+len) lies inside the live read-only
        // mapping, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(self.skip), self.len) }
    }
}

impl std::ops::Deref for ReadOnlyMapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for ReadOnlyMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadOnlyMapping")
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for ReadOnlyMapping {
    fn drop(&mut self) {
        if self.mapped_len > 0 {
            // SAFETY: unmapping exactly the region mmap returned; no slice
            // borrowed from `self` can outlive this.
            unsafe {
                libc::munmap(self.base.as_ptr().cast(), self.mapped_len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sealed_memfd_maps_read_only() {
        let fd = memfd_create("test").unwrap();
        let mut file = std::fs::File::from(fd);
        file.write_all(&vec![7u8; 10_000]).unwrap();
        let fd = OwnedFd::from(file);
        add_seals(&fd, seal::REQUIRED).unwrap();
        assert_eq!(seals(&fd).unwrap() & seal::REQUIRED, seal::REQUIRED);
        assert_eq!(file_size(&fd).unwrap(), 10_000);
        let map = ReadOnlyMapping::new(&fd, 4097, 100).unwrap();
        assert_eq!(map.len(), 100);
        assert!(map.iter().all(|&b| b == 7));
    }

    #[test]
    fn protocol_seal_bits_are_the_kernel_ones() {
        assert_eq!(seal::SEAL, libc::F_SEAL_SEAL as u32);
        assert_eq!(seal::SHRINK, libc::F_SEAL_SHRINK as u32);
        assert_eq!(seal::GROW, libc::F_SEAL_GROW as u32);
        assert_eq!(seal::WRITE, libc::F_SEAL_WRITE as u32);
        assert_eq!(seal::FUTURE_WRITE, libc::F_SEAL_FUTURE_WRITE as u32);
    }

    fn memfd_with(bytes: usize, seals_to_add: u32) -> OwnedFd {
        let fd = memfd_create("test").unwrap();
        let mut file = std::fs::File::from(fd);
        file.write_all(&vec![1u8; bytes]).unwrap();
        let fd = OwnedFd::from(file);
        if seals_to_add != 0 {
            add_seals(&fd, seals_to_add).unwrap();
        }
        fd
    }

    fn refusal(fd: &OwnedFd, offset: u64, length: u64) -> String {
        check_payload(fd, offset, length).unwrap_err().to_string()
    }

    #[test]
    fn fully_sealed_payload_in_range_is_accepted() {
        let fd = memfd_with(100, seal::REQUIRED);
        check_payload(&fd, 0, 100).unwrap();
        check_payload(&fd, 50, 50).unwrap();
        check_payload(&fd, 100, 0).unwrap();
    }

    #[test]
    fn each_bad_payload_has_its_own_error() {
        let unsealed = memfd_with(100, 0);
        assert!(refusal(&unsealed, 0, 1).contains("SEAL_SHRINK, SEAL_GROW, SEAL_WRITE, SEAL_SEAL"));
        let partly = memfd_with(100, seal::SHRINK | seal::GROW);
        assert!(refusal(&partly, 0, 1).contains("SEAL_WRITE, SEAL_SEAL"));
        let future = memfd_with(
            100,
            seal::SHRINK | seal::GROW | seal::FUTURE_WRITE | seal::SEAL,
        );
        assert!(refusal(&future, 0, 1).contains("FUTURE_WRITE is not enough"));
        let sealed = memfd_with(100, seal::REQUIRED);
        assert!(refusal(&sealed, 0, 101).contains("exceeds its size"));
        assert!(refusal(&sealed, u64::MAX, 2).contains("overflows"));
        let file = OwnedFd::from(tempfile_in_tmp("payload"));
        assert!(refusal(&file, 0, 0).contains("not a memfd"));
        let unsealable = memfd_with(100, seal::SEAL);
        assert!(refusal(&unsealable, 0, 1).contains("not a sealable memfd"));
    }

    #[test]
    fn regular_file_has_no_seals() {
        let file = tempfile_in_tmp("no-seals");
        assert_eq!(seals(&file).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    }

    /// A regular file, unlinked; `name` keeps tests running in parallel
    /// apart.
    fn tempfile_in_tmp(name: &str) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("pbus-sys-{name}-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
