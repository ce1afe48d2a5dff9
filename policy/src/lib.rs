//! pbus policy: which peer may own, see and talk to which names.
//!
//! The daemon compiles a [`Policy`] once, builds a [`PeerPolicy`] snapshot
//! for every peer at connect time, and asks the snapshot on every
//! operation. This crate does no I/O beyond loading policy files and knows
//! nothing about sockets or frames.
//!
//! The built-in default: a peer may do everything to peers of its own uid,
//! and root may do everything. Replies to pending calls and the bus's own
//! name are not subject to policy.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::sync::Arc;

use pbus_identity::PeerIdentity;

/// A right a peer may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Right {
    /// Learn that a name exists (listing, lookups, owner-changed signals).
    See,
    /// Own a name.
    Own,
    /// Send to a name (optionally a specific method).
    Talk,
    /// Receive from a sender.
    Receive,
    /// Pass fds along with a message.
    PassFds,
    /// Watch traffic not addressed to it.
    Monitor,
}

impl Right {
    /// Lower-case name used in errors and policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::See => "see",
            Self::Own => "own",
            Self::Talk => "talk",
            Self::Receive => "receive",
            Self::PassFds => "pass-fds",
            Self::Monitor => "monitor",
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the operation may proceed.
    pub allowed: bool,
    /// The right that was checked.
    pub right: Right,
    /// What decided, for `explain` and logs.
    pub reason: String,
}

impl Decision {
    fn new(allowed: bool, right: Right, reason: &str) -> Self {
        Self {
            allowed,
            right,
            reason: reason.to_owned(),
        }
    }
}

/// A compiled policy.
#[derive(Debug, Default)]
pub struct Policy {}

impl Policy {
    /// The built-in default policy.
    pub fn builtin() -> Arc<Self> {
        Arc::new(Self {})
    }

    /// Compiles the snapshot for one peer.
    pub fn snapshot(self: &Arc<Self>, peer: &PeerIdentity) -> PeerPolicy {
        PeerPolicy {
            uid: peer.uid,
            _policy: Arc::clone(self),
        }
    }
}

/// A policy compiled for one subject peer.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    uid: u32,
    _policy: Arc<Policy>,
}

impl PeerPolicy {
    fn same_uid_or_root(&self, other: &PeerIdentity, right: Right) -> Decision {
        if self.uid == 0 {
            Decision::new(true, right, "builtin: root may do anything")
        } else if self.uid == other.uid {
            Decision::new(true, right, "builtin: same uid")
        } else {
            Decision::new(false, right, "builtin: different uid")
        }
    }

    /// May this peer own `name`?
    pub fn own(&self, _name: &str) -> Decision {
        Decision::new(
            true,
            Right::Own,
            "builtin: names are first come, first served",
        )
    }

    /// May this peer learn that `name`, owned by `owner`, exists?
    pub fn see(&self, owner: &PeerIdentity, _name: &str) -> Decision {
        self.same_uid_or_root(owner, Right::See)
    }

    /// May this peer send `member` to `receiver`, addressed as `name`?
    pub fn talk(&self, receiver: &PeerIdentity, _name: &str, _member: &str) -> Decision {
        self.same_uid_or_root(receiver, Right::Talk)
    }

    /// May this peer (as receiver) receive from `sender`?
    pub fn receive(&self, sender: &PeerIdentity) -> Decision {
        if sender.uid == 0 {
            return Decision::new(
                true,
                Right::Receive,
                "builtin: anyone may receive from root",
            );
        }
        self.same_uid_or_root(sender, Right::Receive)
    }
}
