//! The rule a memfd payload must follow, as pure checks on facts a caller
//! read from the kernel: the seals pbus requires, and the declared range
//! lying inside the file. The daemon (on every memfd it routes) and the
//! client (on every memfd it receives) apply the same checks.
//!
//! No I/O here: `pbus_sys::memfd::check_payload` reads the seals and the
//! size of a real fd and runs these checks on them.

/// Seal bits (`F_SEAL_*` from `<linux/fcntl.h>`, part of the kernel ABI),
/// named here because which of them a payload needs is part of the protocol.
pub mod seal {
    /// No further seals may be added.
    pub const SEAL: u32 = 0x0001;
    /// The file may not shrink.
    pub const SHRINK: u32 = 0x0002;
    /// The file may not grow.
    pub const GROW: u32 = 0x0004;
    /// No writes at all, and no writable shared mappings may exist.
    pub const WRITE: u32 = 0x0008;
    /// No new writes, but existing writable mappings keep working (not enough
    /// for pbus: the bytes can still change under the receiver).
    pub const FUTURE_WRITE: u32 = 0x0010;
    /// All the seals pbus requires on a payload memfd.
    pub const REQUIRED: u32 = SEAL | SHRINK | GROW | WRITE;
}

/// Why an fd cannot be a memfd payload. The messages are the ones the bus
/// sends back to a sender whose memfd it refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemfdError {
    /// The fd cannot carry seals at all (a regular file, a pipe, ...).
    #[error("attached fd is not a memfd (it cannot be sealed)")]
    NotMemfd,
    /// Only SEAL_SEAL is set: a tmpfs file, or a memfd made without
    /// MFD_ALLOW_SEALING. It can never get the other seals.
    #[error(
        "attached fd is not a sealable memfd (a tmpfs file, or a memfd without MFD_ALLOW_SEALING)"
    )]
    NotSealable,
    /// Some of [`seal::REQUIRED`] are missing.
    #[error("memfd is missing {}{}", seal_names(*missing), future_write_hint(*missing, *present))]
    MissingSeals {
        /// The required seals that are not set.
        missing: u32,
        /// The seals that are set.
        present: u32,
    },
    /// `offset + length` does not fit in 64 bits.
    #[error("memfd range offset {offset} + length {length} overflows")]
    RangeOverflows {
        /// Declared offset.
        offset: u64,
        /// Declared length.
        length: u64,
    },
    /// The range ends past the end of the file.
    #[error("memfd range {offset}..{end} exceeds its size of {size} bytes")]
    RangeOutsideFile {
        /// Declared offset.
        offset: u64,
        /// Declared offset + length.
        end: u64,
        /// The file's size.
        size: u64,
    },
}

/// The names of the required seals in `missing`, in a fixed order.
fn seal_names(missing: u32) -> String {
    [
        (seal::SHRINK, "SEAL_SHRINK"),
        (seal::GROW, "SEAL_GROW"),
        (seal::WRITE, "SEAL_WRITE"),
        (seal::SEAL, "SEAL_SEAL"),
    ]
    .into_iter()
    .filter(|(bit, _)| missing & bit != 0)
    .map(|(_, name)| name)
    .collect::<Vec<_>>()
    .join(", ")
}

/// Why SEAL_FUTURE_WRITE does not stand in for a missing SEAL_WRITE.
fn future_write_hint(missing: u32, present: u32) -> &'static str {
    if missing & seal::WRITE != 0 && present & seal::FUTURE_WRITE != 0 {
        " (SEAL_FUTURE_WRITE is not enough)"
    } else {
        ""
    }
}

/// Checks the seals an fd carries (`F_GET_SEALS`): every one of
/// [`seal::REQUIRED`] (SEAL_SHRINK | SEAL_GROW | SEAL_WRITE | SEAL_SEAL).
/// SEAL_FUTURE_WRITE does not count for SEAL_WRITE: an existing writable
/// mapping could still change the bytes under the receiver.
pub fn check_seals(present: u32) -> Result<(), MemfdError> {
    if present == seal::SEAL {
        return Err(MemfdError::NotSealable);
    }
    let missing = seal::REQUIRED & !present;
    if missing != 0 {
        return Err(MemfdError::MissingSeals { missing, present });
    }
    Ok(())
}

/// Checks that `[offset, offset + length)` lies inside a file of `size`
/// bytes. With SEAL_SHRINK that stays true, so mapping the range never
/// faults.
pub fn check_range(offset: u64, length: u64, size: u64) -> Result<(), MemfdError> {
    let Some(end) = offset.checked_add(length) else {
        return Err(MemfdError::RangeOverflows { offset, length });
    };
    if end > size {
        return Err(MemfdError::RangeOutsideFile { offset, end, size });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fully_sealed_passes_and_each_missing_seal_is_named() {
        check_seals(seal::REQUIRED).unwrap();
        check_seals(seal::REQUIRED | seal::FUTURE_WRITE).unwrap();
        let missing = |present| check_seals(present).unwrap_err().to_string();
        assert_eq!(
            missing(0),
            "memfd is missing SEAL_SHRINK, SEAL_GROW, SEAL_WRITE, SEAL_SEAL"
        );
        assert_eq!(
            missing(seal::SHRINK | seal::GROW),
            "memfd is missing SEAL_WRITE, SEAL_SEAL"
        );
        assert_eq!(
            missing(seal::SHRINK | seal::GROW | seal::FUTURE_WRITE | seal::SEAL),
            "memfd is missing SEAL_WRITE (SEAL_FUTURE_WRITE is not enough)"
        );
    }

    #[test]
    fn seal_seal_alone_is_unsealable() {
        assert_eq!(check_seals(seal::SEAL), Err(MemfdError::NotSealable));
    }

    #[test]
    fn ranges_must_lie_inside_the_file() {
        check_range(0, 100, 100).unwrap();
        check_range(50, 50, 100).unwrap();
        check_range(100, 0, 100).unwrap();
        assert_eq!(
            check_range(0, 101, 100).unwrap_err().to_string(),
            "memfd range 0..101 exceeds its size of 100 bytes"
        );
        assert_eq!(
            check_range(u64::MAX, 2, 100),
            Err(MemfdError::RangeOverflows {
                offset: u64::MAX,
                length: 2
            })
        );
    }
}
