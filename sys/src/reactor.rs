//! Registering owned fds with the tokio reactor.
//!
//! `tokio::io::unix::AsyncFd::register*` is `unsafe` because tokio cannot
//! check that the fd stays open and the same for the `AsyncFd`'s lifetime.
//! For a value that owns its fd (it converts into an `OwnedFd`) and is then
//! owned by the `AsyncFd`, that holds by construction; this wrapper offers
//! registration for exactly such values.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Registers `inner`, which owns its fd, for `interest`. Must be called
/// inside a tokio runtime.
pub fn register_owned<T>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>>
where
    T: AsRawFd + Into<OwnedFd>,
{
    // SAFETY: `T: Into<OwnedFd>` means `inner` owns its fd; the AsyncFd
    // takes `inner` by value and keeps it until it is dropped (or
    // `into_inner` hands it back), so the fd stays open and names the same
    // file description for the AsyncFd's whole life. Callers in this
    // workspace never swap the inner value through `get_mut`.
    unsafe { AsyncFd::register_with_interest(inner, interest) }.map_err(|error| error.into())
}
