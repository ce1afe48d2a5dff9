//! What `/proc/PID` says about any process (a daemon the harness did not
//! start through [`TestBus`](crate::TestBus), a child, ourselves): open
//! fds, resident memory now, and the peak resident memory (`VmHWM`), which
//! shows whether a process ever held something large even briefly.

use std::time::{Duration, Instant};

/// Entries of `/proc/PID/fd`; panics if the process is gone.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|error| panic!("cannot list /proc/{pid}/fd: {error}"))
        .count()
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("cannot read /proc/{pid}/status: {error}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resident memory now, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// The most resident memory the process ever had, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM")
}

/// The fd count of `pid` once it has stopped changing (two equal readings
/// 50 ms apart).
pub async fn settled_fd_count(pid: u32) -> usize {
    let mut last = fd_count(pid);
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = fd_count(pid);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Waits until `pid` holds exactly `baseline` fds; panics with the last
/// count after `timeout`.
pub async fn wait_for_fd_count(pid: u32, baseline: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let count = fd_count(pid);
        if count == baseline {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} holds {count} fds, expected it back at {baseline} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
