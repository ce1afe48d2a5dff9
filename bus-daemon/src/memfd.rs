//! Validation of memfd payloads attached to messages. The daemon checks the
//! seals and the declared range, and never maps or reads the contents, so
//! routing cost does not depend on payload size.

use std::os::fd::OwnedFd;

use pbus_sys::memfd::{file_size, seal, seals};

/// The daemon's [`FdProbe`](crate::bus::FdProbe): the real syscalls.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemFdProbe;

impl crate::bus::FdProbe for SystemFdProbe {
    fn check_memfd(&self, fd: &OwnedFd, offset: u64, length: u64) -> Result<(), String> {
        validate(fd, offset, length)
    }
}

/// Checks that `fd` is a memfd sealed against every change
/// (SEAL_SHRINK | SEAL_GROW | SEAL_WRITE | SEAL_SEAL) and that
/// `[offset, offset + length)` lies inside it. SEAL_FUTURE_WRITE does not
/// count for SEAL_WRITE: an existing writable mapping could still change the
/// bytes under the receiver.
pub fn validate(fd: &OwnedFd, offset: u64, length: u64) -> Result<(), String> {
    let present = match seals(fd) {
        Ok(present) => present,
        Err(error) if error.raw_os_error() == Some(22) => {
            return Err("attached fd is not a memfd (it cannot be sealed)".into())
        }
        Err(error) => return Err(format!("cannot read the memfd's seals: {error}")),
    };
    let missing = seal::REQUIRED & !present;
    if present == seal::SEAL {
        // Nothing but SEAL_SEAL: a tmpfs file (e.g. in /dev/shm) or a memfd
        // made without MFD_ALLOW_SEALING. It can never be sealed.
        return Err("attached fd is not a sealable memfd (a tmpfs file, or a memfd without MFD_ALLOW_SEALING)".into());
    }
    if missing != 0 {
        let names: Vec<&str> = [
            (seal::SHRINK, "SEAL_SHRINK"),
            (seal::GROW, "SEAL_GROW"),
            (seal::WRITE, "SEAL_WRITE"),
            (seal::SEAL, "SEAL_SEAL"),
        ]
        .into_iter()
        .filter(|(bit, _)| missing & bit != 0)
        .map(|(_, name)| name)
        .collect();
        let hint = if missing & seal::WRITE != 0 && present & seal::FUTURE_WRITE != 0 {
            " (SEAL_FUTURE_WRITE is not enough)"
        } else {
            ""
        };
        return Err(format!("memfd is missing {}{hint}", names.join(", ")));
    }
    let size = file_size(fd).map_err(|error| format!("cannot read the memfd's size: {error}"))?;
    let Some(end) = offset.checked_add(length) else {
        return Err(format!(
            "memfd range offset {offset} + length {length} overflows"
        ));
    };
    if end > size {
        return Err(format!(
            "memfd range {offset}..{end} exceeds its size of {size} bytes"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memfd_with(bytes: usize, seals_to_add: u32) -> OwnedFd {
        let fd = pbus_sys::memfd::memfd_create("test").unwrap();
        let mut file = std::fs::File::from(fd);
        file.write_all(&vec![1u8; bytes]).unwrap();
        let fd = OwnedFd::from(file);
        if seals_to_add != 0 {
            pbus_sys::memfd::add_seals(&fd, seals_to_add).unwrap();
        }
        fd
    }

    #[test]
    fn fully_sealed_in_range_is_accepted() {
        let fd = memfd_with(100, seal::REQUIRED);
        validate(&fd, 0, 100).unwrap();
        validate(&fd, 50, 50).unwrap();
        validate(&fd, 100, 0).unwrap();
    }

    #[test]
    fn each_bad_case_has_its_own_error() {
        let unsealed = memfd_with(100, 0);
        assert!(validate(&unsealed, 0, 1)
            .unwrap_err()
            .contains("SEAL_SHRINK, SEAL_GROW, SEAL_WRITE, SEAL_SEAL"));
        let partly = memfd_with(100, seal::SHRINK | seal::GROW);
        assert!(validate(&partly, 0, 1)
            .unwrap_err()
            .contains("SEAL_WRITE, SEAL_SEAL"));
        let future = memfd_with(
            100,
            seal::SHRINK | seal::GROW | seal::FUTURE_WRITE | seal::SEAL,
        );
        assert!(validate(&future, 0, 1)
            .unwrap_err()
            .contains("FUTURE_WRITE is not enough"));
        let sealed = memfd_with(100, seal::REQUIRED);
        assert!(validate(&sealed, 0, 101)
            .unwrap_err()
            .contains("exceeds its size"));
        assert!(validate(&sealed, u64::MAX, 2)
            .unwrap_err()
            .contains("overflows"));
        let file = tempfile_fd();
        assert!(validate(&file, 0, 0).unwrap_err().contains("not a memfd"));
        let unsealable = memfd_with(100, seal::SEAL);
        assert!(validate(&unsealable, 0, 1)
            .unwrap_err()
            .contains("not a sealable memfd"));
    }

    fn tempfile_fd() -> OwnedFd {
        let path = std::env::temp_dir().join(format!("pbusd-memfd-test-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        OwnedFd::from(file)
    }
}
