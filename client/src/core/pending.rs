//! The pending-call table: serial allocation, the calls waiting for an
//! answer with the deadline past which the bus has broken its promise to
//! answer, and failing every waiting call exactly once when the connection
//! ends. Plain data with an explicit clock, so the tests below need
//! neither sockets nor timers.
//!
//! It must not know how a waiter is woken: `W` is whatever the driver
//! hands the answer to (a oneshot sender on tokio, a plain value in tests).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use pbus_proto::v1::Limits;

use crate::Error;

/// How long past the bus's own timeout a call still waits for an answer.
///
/// The bus answers every call it accepted (the reply, an error, or
/// `TIMEOUT` once the timeout it applies has passed), so a caller normally
/// hears from the bus. This grace keeps the bus's answer the one a caller
/// sees (it names what timed out) even on a loaded system, and leaves the
/// local deadline a backstop against a bus that stopped keeping the
/// protocol while its socket stays open.
pub(crate) const BUS_ANSWER_GRACE: Duration = Duration::from_secs(5);

/// The `timeout_ms` header field for a call that waits `timeout`
/// (saturating; 0 asks the bus for its default).
pub(crate) fn wire_timeout_ms(timeout: Duration) -> u32 {
    u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX)
}

/// How long the bus waits for the answer to a call sent with `timeout_ms`:
/// its default for 0, and never more than its maximum. A bus that
/// announces no maximum (0) is taken at its word for any timeout.
pub(crate) fn bus_wait(timeout_ms: u32, limits: &Limits) -> Duration {
    let requested = match timeout_ms {
        0 => limits.default_reply_timeout_ms,
        requested => requested,
    };
    let applied = match limits.max_reply_timeout_ms {
        0 => requested,
        max => requested.min(max),
    };
    Duration::from_millis(u64::from(applied))
}

/// Why the connection ended, which decides what the waiting calls are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConnectionEnd {
    /// The bus hung up, the socket failed or the application closed the
    /// connection: calls fail with [`Error::Disconnected`].
    Closed,
    /// The bus broke the protocol (bad frame, truncated fds): calls fail
    /// with [`Error::Protocol`] saying how.
    Violation(String),
}

impl ConnectionEnd {
    /// The error a call that was waiting (or starts now) gets.
    pub(crate) fn error(&self) -> Error {
        match self {
            Self::Closed => Error::Disconnected,
            Self::Violation(why) => Error::Protocol(why.clone()),
        }
    }
}

/// A call registered with [`PendingCalls::register`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Registered {
    /// The serial the call must be sent with.
    pub(crate) serial: u64,
    /// The call's deadline is earlier than the one the driver's timer is
    /// armed for (or none is): the driver must call
    /// [`PendingCalls::arm_timer`] again.
    pub(crate) rearm_timer: bool,
}

/// A call that waited too long, taken out by [`PendingCalls::expire`].
#[derive(Debug)]
pub(crate) struct Expired<W> {
    /// The call's serial.
    pub(crate) serial: u64,
    /// Whom to tell.
    pub(crate) waiter: W,
    /// What to tell it.
    pub(crate) error: Error,
}

#[derive(Debug)]
struct PendingCall<W> {
    waiter: W,
    /// `None` when the wait does not fit in an `Instant` (no deadline).
    deadline: Option<Instant>,
    /// How long the bus was expected to wait, for the error message.
    bus_wait: Duration,
}

/// Every call of one connection waiting for its reply, and the serials.
#[derive(Debug)]
pub(crate) struct PendingCalls<W> {
    /// The next serial to try; never 0 (0 means "no serial" on the wire).
    next_serial: u64,
    calls: HashMap<u64, PendingCall<W>>,
    /// Deadlines in the order they fall due, ties by serial.
    deadlines: BTreeSet<(Instant, u64)>,
    /// The deadline the driver's timer is armed for, if any.
    timer: Option<Instant>,
    /// Set once the connection ended: no call waits any more.
    ended: Option<ConnectionEnd>,
}

impl<W> Default for PendingCalls<W> {
    fn default() -> Self {
        Self {
            next_serial: 1,
            calls: HashMap::new(),
            deadlines: BTreeSet::new(),
            timer: None,
            ended: None,
        }
    }
}

impl<W> PendingCalls<W> {
    /// A table whose next serial is `serial` (tests of the wraparound).
    #[cfg(test)]
    fn starting_at(serial: u64) -> Self {
        Self {
            next_serial: serial,
            ..Self::default()
        }
    }

    /// A serial for a frame of this connection (a call, reply or signal).
    /// Serials count up from 1, wrap from `u64::MAX` to 1 (never 0), and
    /// skip any still waiting for a reply, so the bus never sees two
    /// pending calls with one serial.
    pub(crate) fn next_serial(&mut self) -> u64 {
        loop {
            let serial = self.next_serial;
            self.next_serial = serial.checked_add(1).unwrap_or(1);
            if !self.calls.contains_key(&serial) {
                return serial;
            }
        }
    }

    /// Registers a call that waits for `waiter`'s answer. `bus_wait` is how
    /// long the bus will wait for the callee (see [`bus_wait`]); the local
    /// deadline is that plus [`BUS_ANSWER_GRACE`] from `now`. Once the
    /// connection ended, every registration fails with the end's error.
    pub(crate) fn register(
        &mut self,
        waiter: W,
        now: Instant,
        bus_wait: Duration,
    ) -> Result<Registered, Error> {
        if let Some(end) = &self.ended {
            return Err(end.error());
        }
        let serial = self.next_serial();
        let deadline = bus_wait
            .checked_add(BUS_ANSWER_GRACE)
            .and_then(|wait| now.checked_add(wait));
        let rearm_timer = match (deadline, self.timer) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(deadline), Some(armed)) => deadline < armed,
        };
        if let Some(deadline) = deadline {
            self.deadlines.insert((deadline, serial));
        }
        self.calls.insert(
            serial,
            PendingCall {
                waiter,
                deadline,
                bus_wait,
            },
        );
        Ok(Registered {
            serial,
            rearm_timer,
        })
    }

    /// Takes the call that `reply_serial` answers. `None` refuses the
    /// reply: nobody waits for it (never called, already answered, given
    /// up or timed out).
    pub(crate) fn complete(&mut self, reply_serial: u64) -> Option<W> {
        self.remove(reply_serial)
    }

    /// Forgets a call whose caller gave up. Returns whether it was waiting.
    pub(crate) fn cancel(&mut self, serial: u64) -> bool {
        self.remove(serial).is_some()
    }

    fn remove(&mut self, serial: u64) -> Option<W> {
        let call = self.calls.remove(&serial)?;
        if let Some(deadline) = call.deadline {
            self.deadlines.remove(&(deadline, serial));
        }
        Some(call.waiter)
    }

    /// The earliest deadline, which the driver's timer is now armed for
    /// (`None`: disarm it). A timer armed for a deadline whose call was
    /// answered since fires early; [`expire`](Self::expire) then finds
    /// nothing and the driver arms it again.
    pub(crate) fn arm_timer(&mut self) -> Option<Instant> {
        self.timer = self.deadlines.first().map(|(deadline, _)| *deadline);
        self.timer
    }

    /// Takes every call whose deadline is at or before `now`, earliest
    /// first, each with the error its caller gets.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Expired<W>> {
        let mut expired = Vec::new();
        while let Some(&(deadline, serial)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(call) = self.calls.remove(&serial) {
                expired.push(Expired {
                    serial,
                    waiter: call.waiter,
                    error: Error::Protocol(format!(
                        "no answer from the bus to call {serial} within its timeout \
                         ({:?}) and {:?} more; the bus answers every call",
                        call.bus_wait, BUS_ANSWER_GRACE
                    )),
                });
            }
        }
        expired
    }

    /// The connection ended: takes every waiting call with the error it
    /// gets, and refuses registrations from now on. Only the first end
    /// counts; later ones find nothing to fail.
    pub(crate) fn end(&mut self, end: ConnectionEnd) -> Vec<(W, Error)> {
        if self.ended.is_some() {
            return Vec::new();
        }
        self.deadlines.clear();
        self.timer = None;
        let mut calls: Vec<(u64, PendingCall<W>)> = self.calls.drain().collect();
        calls.sort_by_key(|(serial, _)| *serial);
        let failed = calls
            .into_iter()
            .map(|(_, call)| (call.waiter, end.error()))
            .collect();
        self.ended = Some(end);
        failed
    }

    /// How many calls wait for an answer.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.calls.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(1);

    fn register(table: &mut PendingCalls<&'static str>, waiter: &'static str, now: Instant) -> u64 {
        table.register(waiter, now, WAIT).unwrap().serial
    }

    #[test]
    fn serials_start_at_one_and_are_unique() {
        let mut table = PendingCalls::<()>::default();
        let serials: Vec<u64> = (0..1000).map(|_| table.next_serial()).collect();
        assert_eq!(serials[0], 1);
        let mut sorted = serials.clone();
        sorted.dedup();
        assert_eq!(sorted, serials, "strictly increasing, so unique");
    }

    #[test]
    fn serials_wrap_to_one_never_zero() {
        let mut table = PendingCalls::<()>::starting_at(u64::MAX - 1);
        assert_eq!(table.next_serial(), u64::MAX - 1);
        assert_eq!(table.next_serial(), u64::MAX);
        assert_eq!(table.next_serial(), 1);
        assert_eq!(table.next_serial(), 2);
    }

    #[test]
    fn a_wrapped_serial_skips_calls_still_waiting() {
        let now = Instant::now();
        let mut table = PendingCalls::default();
        let first = register(&mut table, "old", now);
        let second = register(&mut table, "older", now);
        assert_eq!((first, second), (1, 2));
        table.next_serial = u64::MAX;
        assert_eq!(register(&mut table, "last", now), u64::MAX);
        // 1 and 2 still wait: the next call gets 3, and so does nothing else.
        assert_eq!(register(&mut table, "wrapped", now), 3);
        assert_eq!(table.next_serial(), 4);
        assert_eq!(table.complete(1), Some("old"));
        assert_eq!(table.complete(3), Some("wrapped"));
    }

    #[test]
    fn a_reply_is_matched_once_to_its_call() {
        let now = Instant::now();
        let mut table = PendingCalls::default();
        let a = register(&mut table, "a", now);
        let b = register(&mut table, "b", now);
        assert_eq!(table.complete(b), Some("b"));
        assert_eq!(table.complete(b), None, "a second reply is refused");
        assert_eq!(table.complete(a), Some("a"));
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn replies_nobody_waits_for_are_refused() {
        let now = Instant::now();
        let mut table = PendingCalls::default();
        let serial = register(&mut table, "a", now);
        assert_eq!(table.complete(0), None, "0 is never a serial");
        assert_eq!(table.complete(serial + 1), None, "never called");
        let signal = table.next_serial();
        assert_eq!(table.complete(signal), None, "a serial without a call");
        assert!(table.cancel(serial));
        assert_eq!(table.complete(serial), None, "the caller gave up");
        assert!(!table.cancel(serial));
    }

    #[test]
    fn calls_expire_in_deadline_order_and_only_when_due() {
        let now = Instant::now();
        let mut table = PendingCalls::default();
        let slow = table
            .register("slow", now, Duration::from_secs(30))
            .unwrap()
            .serial;
        let fast = table
            .register("fast", now, Duration::from_secs(1))
            .unwrap()
            .serial;
        let fast_too = table
            .register("fast too", now, Duration::from_secs(1))
            .unwrap()
            .serial;
        let answered = table
            .register("answered", now, Duration::from_secs(1))
            .unwrap()
            .serial;
        assert_eq!(table.complete(answered), Some("answered"));
        let fast_deadline = now + Duration::from_secs(1) + BUS_ANSWER_GRACE;
        assert!(table
            .expire(fast_deadline - Duration::from_millis(1))
            .is_empty());
        let expired = table.expire(fast_deadline);
        let order: Vec<(u64, &str)> = expired.iter().map(|e| (e.serial, e.waiter)).collect();
        assert_eq!(order, vec![(fast, "fast"), (fast_too, "fast too")]);
        assert!(matches!(&expired[0].error, Error::Protocol(why) if why.contains("no answer")));
        // Expired calls are gone: a late reply is refused.
        assert_eq!(table.complete(fast), None);
        let expired = table.expire(now + Duration::from_secs(3600));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].serial, slow);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn the_timer_is_rearmed_only_for_an_earlier_deadline() {
        let now = Instant::now();
        let mut table = PendingCalls::default();
        assert_eq!(table.arm_timer(), None);
        let first = table.register("a", now, WAIT).unwrap();
        assert!(first.rearm_timer, "no timer was armed");
        let armed = table.arm_timer().unwrap();
        assert_eq!(armed, now + WAIT + BUS_ANSWER_GRACE);
        let later = table
            .register("b", now + Duration::from_millis(5), WAIT)
            .unwrap();
        assert!(!later.rearm_timer, "the armed timer fires first anyway");
        let sooner = table.register("c", now, Duration::ZERO).unwrap();
        assert!(sooner.rearm_timer);
        assert_eq!(table.arm_timer(), Some(now + BUS_ANSWER_GRACE));
        // Answered calls leave a stale timer; firing finds nothing due and
        // the timer moves on to the earliest call still waiting.
        table.complete(sooner.serial);
        assert!(table.expire(now + BUS_ANSWER_GRACE).is_empty());
        assert_eq!(table.arm_timer(), Some(armed));
        table.complete(first.serial);
        table.complete(later.serial);
        assert_eq!(table.arm_timer(), None);
    }

    #[test]
    fn a_wait_beyond_any_instant_has_no_deadline() {
        let now = Instant::now();
        let mut table = PendingCalls::default();
        let forever = table.register("forever", now, Duration::MAX).unwrap();
        assert!(!forever.rearm_timer);
        assert_eq!(table.arm_timer(), None);
        assert!(table.expire(now + Duration::from_secs(1 << 40)).is_empty());
        assert_eq!(table.complete(forever.serial), Some("forever"));
    }

    #[test]
    fn connection_loss_fails_every_call_exactly_once() {
        let now = Instant::now();
        let mut table = PendingCalls::default();
        for waiter in ["a", "b", "c"] {
            register(&mut table, waiter, now);
        }
        table.complete(2);
        let failed = table.end(ConnectionEnd::Closed);
        let waiters: Vec<&str> = failed.iter().map(|(waiter, _)| *waiter).collect();
        assert_eq!(waiters, vec!["a", "c"]);
        assert!(failed
            .iter()
            .all(|(_, error)| matches!(error, Error::Disconnected)));
        assert!(table.end(ConnectionEnd::Closed).is_empty());
        assert!(table.expire(now + Duration::from_secs(3600)).is_empty());
        assert_eq!(table.complete(1), None);
        assert_eq!(table.arm_timer(), None);
        assert!(matches!(
            table.register("late", now, WAIT),
            Err(Error::Disconnected)
        ));
    }

    #[test]
    fn a_protocol_violation_is_what_waiting_calls_are_told() {
        let now = Instant::now();
        let mut table = PendingCalls::default();
        register(&mut table, "a", now);
        let failed = table.end(ConnectionEnd::Violation("bad frame".into()));
        assert!(matches!(&failed[..], [("a", Error::Protocol(why))] if why == "bad frame"));
        // The first end is the one that counts.
        assert!(table.end(ConnectionEnd::Closed).is_empty());
        assert!(matches!(
            table.register("late", now, WAIT),
            Err(Error::Protocol(why)) if why == "bad frame"
        ));
    }

    #[test]
    fn the_bus_wait_follows_its_default_and_maximum() {
        let limits = Limits {
            default_reply_timeout_ms: 25_000,
            max_reply_timeout_ms: 60_000,
            ..Limits::default()
        };
        assert_eq!(bus_wait(0, &limits), Duration::from_secs(25));
        assert_eq!(bus_wait(1_500, &limits), Duration::from_millis(1_500));
        assert_eq!(bus_wait(u32::MAX, &limits), Duration::from_secs(60));
        let uncapped = Limits {
            max_reply_timeout_ms: 0,
            ..limits
        };
        assert_eq!(
            bus_wait(120_000, &uncapped),
            Duration::from_secs(120),
            "no announced maximum caps nothing"
        );
        assert_eq!(wire_timeout_ms(Duration::from_millis(1_500)), 1_500);
        assert_eq!(wire_timeout_ms(Duration::MAX), u32::MAX);
    }
}
