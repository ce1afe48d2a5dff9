//! How the core is driven, in quinn's style: inputs go in
//! ([`Bus::dispatch`] for a frame, [`Bus::add_peer`] and
//! [`Bus::remove_peer`], [`Bus::handle_timeout`], [`Bus::handle_job_done`]),
//! and what the driver must do comes out of [`Bus::poll_action`] (flush a
//! queue, close a connection, run a job) until it returns `None`, and
//! [`Bus::poll_timeout`] (when to call [`Bus::handle_timeout`] next).
//! Nothing here touches a socket or reads the clock.

use super::services::{Job, JobId};
use super::*;

/// Something the driver must do for the core.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Frames were queued for this peer: flush its queue
    /// ([`Bus::flush_peer`]).
    Flush(PeerId),
    /// The core doomed this peer: close its connection, then
    /// [`Bus::remove_peer`] it.
    Close(PeerId),
    /// A built-in service needs blocking work done off the routing thread;
    /// hand its output back with [`Bus::handle_job_done`].
    Job(JobId, Job),
}

impl<Io> Bus<Io> {
    /// The next thing the driver must do, or `None` once there is nothing
    /// left. Queues are flushed before doomed peers are closed (so a peer
    /// learns why), and flushing can queue more (errors for the senders of
    /// frames that could not be passed): keep polling until `None`.
    pub fn poll_action(&mut self) -> Option<Action> {
        while let Some(id) = self.dirty.pop() {
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.dirty = false;
                return Some(Action::Flush(id));
            }
        }
        if let Some(id) = self.doomed.pop() {
            return Some(Action::Close(id));
        }
        let (id, job) = self.jobs.pop_front()?;
        Some(Action::Job(id, job))
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next: the
    /// earliest pending-call deadline, or the next sweep for stalled fds.
    pub fn poll_timeout(&self) -> Instant {
        match self.calls.next_deadline() {
            Some(deadline) => deadline.min(self.next_sweep),
            None => self.next_sweep,
        }
    }

    /// Time has come to `now`: calls whose deadline passed fail with
    /// `Timeout`, and, when due, peers that hold fds without progress are
    /// doomed (see [`sweep_stalled_fds`](Self::sweep_stalled_fds); `unread`
    /// is as for [`flush_peer`](Self::flush_peer)).
    pub fn handle_timeout(&mut self, now: Instant, unread: impl Fn(&Io) -> io::Result<usize>) {
        for (key, timeout_ms) in self.calls.expire(now) {
            self.queue_error_to(
                key.caller,
                key.serial,
                &BusError::Timeout(u64::from(timeout_ms)),
            );
        }
        if now >= self.next_sweep {
            self.sweep_stalled_fds(now, unread);
            self.next_sweep = now + self.sweep_period();
        }
    }

    /// How often peers are checked for stalled fds: a few times per
    /// `pending_fd_timeout_ms`.
    pub(super) fn sweep_period(&self) -> Duration {
        (Duration::from_millis(self.limits.pending_fd_timeout_ms) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}
