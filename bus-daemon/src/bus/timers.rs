//! Call deadlines: when the server's timer must wake, and failing the calls
//! whose deadline passed with `Timeout`.

use super::*;

impl<Io> Bus<Io> {
    /// The earliest pending-call deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.calls.next_deadline()
    }

    /// Arms the call timer: returns the earliest deadline (the time the
    /// timer should wake up) and remembers it.
    pub fn arm_timer(&mut self) -> Option<Instant> {
        self.timer_armed = self.calls.next_deadline();
        self.timer_armed
    }

    /// True (once) if a deadline earlier than before was added since the
    /// last call, so the timer must wake up sooner.
    pub fn take_timer_rearm(&mut self) -> bool {
        std::mem::take(&mut self.timer_needs_rearm)
    }

    /// Fails every call whose deadline has passed with `Timeout`.
    pub fn expire_calls(&mut self, now: Instant) {
        for (key, timeout_ms) in self.calls.expire(now) {
            self.queue_error_to(
                key.caller,
                key.serial,
                &BusError::Timeout(u64::from(timeout_ms)),
            );
        }
    }
}
