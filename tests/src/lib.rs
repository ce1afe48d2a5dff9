//! The integration-test harness of pbus: everything a test needs to prove
//! the shipped `pbusd` binary, not a library stand-in.
//!
//! * [`TestBus`] starts the real `pbusd` on a socket in a fresh temporary
//!   directory, connects clients to it, watches its fds and memory, and
//!   stops or kills it (by pid, never by name).
//! * [`RawClient`] speaks the wire protocol frame by frame, so tests can
//!   send what the client library never would: forged sender fields,
//!   spoofed replies, garbage, frames over the limits.
//! * [`PeerProcess`] runs the `pbus-test-peer` helper binary as a child
//!   process (optionally under another uid), for identity tests that need
//!   a second real process.
//! * [`services`]: owning a name ([`own_name`],
//!   [`TestBus::connect_owning`]), the unique names on the bus, and an
//!   [`EchoPair`] whose latency shows that everyone else still gets served.
//! * [`wait`] has the polling and expectation helpers ([`wait_for`],
//!   [`expect_signal`], [`within`]); [`messages`] the payload types the
//!   tests and the helper binary share; [`require_root`] decides whether a
//!   privileged test runs, skips or fails.
//!
//! Nothing here knows about the daemon's internals; it only sees what a
//! client or an operator can see (the socket, `/proc/PID`, exit status,
//! stderr).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod confined;
pub mod containers;
pub mod containers_docker;
mod daemon;
pub mod fdkit;
pub mod frames;
pub mod messages;
mod peer;
pub mod privilege;
pub mod procfs;
mod raw;
pub mod services;
pub mod wait;

pub use daemon::{
    find_binary, pbusctl_binary, pbusd_binary, pbusd_command, TestBus, TestBusBuilder,
};
pub use peer::{
    copy_executable, proc_status, setpriv_command, signal_pid, test_peer_binary, PeerProcess,
    ProcStatus, TEST_PEER_BIN_ENV,
};
pub use privilege::require_root;
pub use raw::{RawClient, RawError, RawMessage};
pub use services::{own_name, unique_names, EchoPair};
pub use wait::{drain_signals, expect_signal, wait_for, wait_for_async, within};

use std::time::Duration;

/// Upper bound for anything that should happen "promptly" in a test (a
/// reply, a signal, a disconnect). Generous because debug builds on a
/// loaded two-core machine are slow; it is only ever a ceiling, never a
/// sleep.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Unique-enough suffix for names and paths within one test process.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
