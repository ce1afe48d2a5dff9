//! Fds in flight: fds the daemon has sent to a receiver that the receiver
//! has not read yet.
//!
//! The kernel charges every fd in flight on a Unix socket to the user of
//! the process that sent it, and refuses (`ETOOMANYREFS`) to pass more than
//! that user's RLIMIT_NOFILE unless it has CAP_SYS_RESOURCE. For a bus that
//! sender is the daemon, so without accounting of its own one uid flooding
//! fds to receivers that do not read would use up the daemon's allowance
//! and make passing fds to everybody else fail (the CVE-2014-3532/3533
//! class). Two rules keep that from happening:
//!
//! * Each receiver has at most one frame's fds in flight: the next frame
//!   with fds waits until the receiver has read everything sent so far
//!   (`SIOCOUTQ` reads zero), as dbus-broker does. So fds in flight are
//!   bounded by receivers × fds per message, and the daemon always knows
//!   which sender they are charged to.
//! * Fds in flight are a daemon-wide pool shared fairly among sender uids
//!   (the same 1/(n+1) rule as queued bytes; the daemon's own uid, the
//!   owner of a session bus, is held only to the total). A frame whose sender's uid
//!   holds its share, or whose fds the kernel refuses anyway, is dropped
//!   and the *sender* is told; the receiver is never disconnected for it.
//!
//! This module owns the origin recorded with each queued frame that carries
//! fds and the [`FdGate`] that applies those rules while a queue is flushed.
//! What a refusal means for calls and replies is decided by the bus
//! ([`super::Bus::refuse_undelivered`]).

use std::io;
use std::os::fd::OwnedFd;

use pbus_proto::frame::{FdGate, FdVerdict};

use super::quota::{FairPool, Refusal};
use super::{BusError, PeerId};

/// Who a queued frame with fds came from, so that a failure to pass its
/// fds is charged to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdOrigin {
    /// The sending peer.
    pub sender: PeerId,
    /// The sender's uid, charged for the fds while they are in flight.
    pub uid: u32,
    /// The frame's serial (0 if it has none).
    pub serial: u64,
    /// What kind of frame it is.
    pub kind: FdFrameKind,
}

/// The kinds of frames that can carry fds, with what a refusal must undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdFrameKind {
    /// A method call; `wants_reply` when the bus tracks a pending call.
    Call {
        /// The caller waits for a reply.
        wants_reply: bool,
    },
    /// A reply or error answering the receiver's call `reply_serial`.
    Reply {
        /// The serial of the receiver's call.
        reply_serial: u64,
    },
    /// A unicast signal.
    Signal,
    /// One receiver's copy of a broadcast signal (memfd payloads).
    Broadcast,
}

/// One receiver's fds in flight: who they are charged to and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    /// The uid charged (the sender's; the daemon's own for its frames).
    pub uid: u32,
    /// Fds sent with that frame.
    pub fds: u64,
}

/// A frame dropped while flushing, with the reason to give its sender.
#[derive(Debug)]
pub struct Undelivered {
    /// Who sent it (`None`: the bus itself).
    pub origin: Option<FdOrigin>,
    /// Why its fds could not be passed.
    pub error: BusError,
}

/// The gate one receiver's queue is flushed through (see the module doc).
pub struct InFlightGate<'a> {
    /// The receiver's fds in flight; set when a frame's fds go out.
    pub in_flight: &'a mut Option<InFlight>,
    /// The daemon-wide pool of fds in flight.
    pub pool: &'a mut FairPool,
    /// Charged for frames that have no origin (the bus's own).
    pub daemon_uid: u32,
    /// Frames dropped during this flush.
    pub undelivered: Vec<Undelivered>,
    /// Why the last [`FdVerdict::Drop`] was given.
    refusal: Option<Refusal>,
}

impl<'a> InFlightGate<'a> {
    /// A gate over one receiver's in-flight slot and the daemon's pool.
    pub fn new(
        in_flight: &'a mut Option<InFlight>,
        pool: &'a mut FairPool,
        daemon_uid: u32,
    ) -> Self {
        Self {
            in_flight,
            pool,
            daemon_uid,
            undelivered: Vec::new(),
            refusal: None,
        }
    }

    fn uid_of(&self, origin: Option<&FdOrigin>) -> u32 {
        origin.map_or(self.daemon_uid, |origin| origin.uid)
    }
}

impl FdGate<OwnedFd, FdOrigin> for InFlightGate<'_> {
    fn check(&mut self, fds: &[OwnedFd], origin: Option<&FdOrigin>) -> FdVerdict {
        if self.in_flight.is_some() {
            return FdVerdict::Wait;
        }
        match self.pool.check(self.uid_of(origin), fds.len() as u64) {
            Ok(()) => FdVerdict::Send,
            Err(refusal) => {
                self.refusal = Some(refusal);
                FdVerdict::Drop
            }
        }
    }

    fn sent(&mut self, count: usize, origin: Option<&FdOrigin>) {
        let uid = self.uid_of(origin);
        self.pool.charge(uid, count as u64);
        *self.in_flight = Some(InFlight {
            uid,
            fds: count as u64,
        });
    }

    fn refuses_fds(&self, error: &io::Error) -> bool {
        pbus_sys::fdpass::is_fd_refusal(error)
    }

    fn dropped(&mut self, origin: Option<FdOrigin>, count: usize, error: Option<io::Error>) {
        let uid = self.uid_of(origin.as_ref());
        let message = match (error, self.refusal.take()) {
            (Some(error), _) => format!(
                "the kernel refused to pass {count} fds to the receiver ({error}): \
                 the daemon's user has too many fds in flight"
            ),
            (None, Some(Refusal::FairShare)) => format!(
                "{count} fds not delivered: uid {uid} holds its fair share of the fds \
                 in flight to receivers that have not read them yet"
            ),
            (None, _) => {
                format!("{count} fds not delivered: the daemon has as many fds in flight as it may")
            }
        };
        tracing::debug!(uid, count, %message, "frame with fds dropped");
        self.undelivered.push(Undelivered {
            origin,
            error: BusError::LimitExceeded {
                limit: crate::config::Limit::MaxFdsInFlight,
                message,
            },
        });
    }
}
