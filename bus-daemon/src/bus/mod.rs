//! The routing core: peers, names, match rules, pending calls and queues, as
//! plain data. It never touches a socket or reads the clock: messages come
//! in through [`Bus::handle_frame`] (native frames through [`Bus::dispatch`],
//! which reads the header with the native face), everything it wants to
//! send is encoded by the receiver's face ([`crate::faces`]) into that
//! peer's [`OutQueue`], and the driver (the server layer) polls what to do
//! next out of [`Bus::poll_action`] and [`Bus::poll_timeout`] and reports
//! time with [`Bus::handle_timeout`] ([`actions`]), so tests run without
//! timers or sockets. The core decides receivers, stamps and refusals; it
//! never encodes a frame itself.
//!
//! Where each concern lives: [`peers`] (admission, adding and removing
//! peers), [`routing`] (the message path), [`checks`] (policy and fd
//! checks), [`delivery`] (the one enqueue path, stamping, fan-out, flushing),
//! [`monitors`] (copies for eavesdroppers), [`emitted`] (frames of the bus's
//! own), [`services`] (built-in services such as the driver), [`reload`],
//! [`stalls`] (the pending-fd timeout), [`inflight`] (fds in flight),
//! [`wire`] (conversion to wire messages); plain registries in [`names`],
//! [`scopes`], [`matches`], [`replies`] and [`quota`].
//!
//! Every message takes one path, top to bottom: decode the header, validate
//! it, resolve the destination (a well-known name in the sender's name
//! scope, then the host's: [`scopes`], [`names::ScopedNames`]), check
//! policy and limits, stamp the sender
//! (whatever the client wrote there is replaced), then queue it for one
//! receiver (call, reply, unicast signal), for the subscribers whose match
//! rules accept it (broadcast signal), or hand it to the bus driver
//! (destination `org.pbus.Bus`). Refusals become wire errors in one place,
//! [`BusError::to_wire`].

mod actions;
mod checks;
mod delivery;
mod emitted;
pub mod error;
pub mod inflight;
pub mod matches;
mod monitors;
pub mod names;
mod peers;
pub mod quota;
mod reload;
pub mod replies;
mod routing;
pub mod scopes;
pub mod services;
mod stalls;
mod wire;

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pbus_identity::PeerIdentity;
use pbus_policy::{PeerPolicy, Policy, PolicyLayers, Right};
use pbus_proto::frame::{Flushed, OutQueue};
use pbus_proto::header::HeaderView;
use pbus_proto::names::{MemberName, ObjectPath, UniqueName, WellKnownName};
use pbus_proto::v1::{
    ContainerInfo, ErrorInfo, Feature, Header, HeaderFlag, Hello, Limits as WireLimits,
    MessageKind, NameOwnerChanged, SenderInfo, Welcome,
};
use pbus_proto::{BUS_NAME, BUS_PATH, PROTOCOL_VERSION};
use prost::Message;
use smallvec::SmallVec;

use crate::config::Limits;
use crate::faces::Face;
pub use error::BusError;
use inflight::{FdFrameKind, FdOrigin, InFlight, InFlightGate, Undelivered};
use matches::{MatchId, MatchRegistry, SignalView};
use names::{OwnerChange, ScopedNames};
use quota::{FairPool, ReceiverQuota, Refusal, Released};
use replies::{CallKey, PendingCalls};
use scopes::{ScopeId, ScopeTable};

pub use actions::Action;
use delivery::{release_global, Broadcast, WhenFull};

/// The peers of a bus, by id. Boxed: the map's spare capacity then costs a
/// pointer per slot, not a whole peer.
pub(super) type PeerMap<Io> = HashMap<PeerId, Box<Peer<Io>>, IdHash>;
pub use peers::{Peer, PeerCounters};
use services::{JobId, PendingJob};
use wire::sender_info_of;

/// Hashing for ids the bus assigns itself (peer and rule numbers): they
/// are not chosen by clients, so the fast unkeyed Fx hash is safe.
pub type IdHash = rustc_hash::FxBuildHasher;

/// Hashing for keys that include client-chosen numbers (call serials):
/// foldhash, seeded at random per process, so a client cannot aim its
/// serials at one probe chain without knowing the seed.
pub type ClientKeyHash = foldhash::fast::RandomState;

/// A connected peer; the number in its unique name `:1.<n>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl PeerId {
    /// The unique name of this peer.
    pub fn unique_name(self) -> UniqueName {
        UniqueName::from_id(self.0)
    }

    /// Parses a unique name the bus assigned.
    pub fn from_unique_name(name: &str) -> Option<Self> {
        UniqueName::from_unchecked(name).id().map(Self)
    }
}

/// A broken protocol rule: the peer is disconnected after being told why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol violation: {0}")]
pub struct Violation(pub String);

/// The whole bus state.
#[derive(Debug)]
pub struct Bus<Io> {
    peers: PeerMap<Io>,
    /// The name scopes of connected peers.
    scopes: ScopeTable,
    /// Well-known names, one table per scope.
    names: ScopedNames,
    matches: MatchRegistry,
    /// Eavesdropping rules of monitors: copies of unicast traffic.
    monitors: MatchRegistry,
    /// Jobs of built-in services for the driver to run, in order.
    jobs: std::collections::VecDeque<(JobId, services::Job)>,
    /// Jobs handed out (or queued) and not done yet, with their waiters.
    pending_jobs: HashMap<JobId, PendingJob, IdHash>,
    next_job: u64,
    calls: PendingCalls,
    limits: Limits,
    /// The policy stack every peer's snapshot is compiled from: today only
    /// the global layer (the configured policy).
    policy: PolicyLayers,
    bus_id: String,
    started: Instant,
    next_peer: u64,
    connections_per_uid: HashMap<u32, u32>,
    dirty: Vec<PeerId>,
    doomed: Vec<PeerId>,
    broadcast_stamp: u64,
    /// Stamp for messages from the bus itself.
    bus_sender: SenderInfo,
    /// When peers are next checked for stalled fds.
    next_sweep: Instant,
    /// The daemon's own pid namespace inode: peers there see its pid.
    own_pid_namespace: u64,
    /// How the daemon runs and whose namespaces are the host's: reported
    /// with every identity (`GetPeerIdentity`).
    host_facts: (crate::config::Mode, pbus_identity::HostReference),
    /// Bytes queued for all receivers, shared fairly among sender uids.
    global_bytes: FairPool,
    /// Fds the daemon holds (sockets and queued fds), shared fairly among uids.
    global_fds: FairPool,
    /// Fds sent to receivers and not read by them yet, shared fairly among
    /// sender uids (see [`inflight`]).
    fds_in_flight: FairPool,
    /// Asks the system about fds (memfd seals and sizes): the core makes
    /// no syscalls of its own.
    fd_probe: Box<dyn FdProbe>,
}

/// Facts about the daemon process, read by the driver at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonFacts {
    /// The daemon's effective uid (the owner of a session bus).
    pub uid: u32,
    /// The daemon's pid, stamped on frames of the bus itself.
    pub pid: u32,
    /// The inode of the daemon's pid namespace: peers there see its pid.
    pub pid_namespace: u64,
    /// How the daemon runs (reported with identities).
    pub mode: crate::config::Mode,
    /// Whose namespaces are the host's (reported with identities).
    pub host_reference: pbus_identity::HostReference,
}

/// How many fds peers may make the daemon hold, and have in flight to
/// receivers (see [`inflight`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudgets {
    /// Fds held: connections' sockets, queued fds, fds of half-sent frames.
    pub held: u64,
    /// Fds sent to receivers that they have not read yet.
    pub in_flight: u64,
}

/// What the core needs to know about fds it is handed, asked of the system
/// by the driver's implementation (the daemon's is [`crate::memfd`]).
pub trait FdProbe: std::fmt::Debug {
    /// Checks a memfd payload: sealed against every change, and
    /// `[offset, offset + length)` inside it; the error says what is wrong.
    fn check_memfd(&self, fd: &OwnedFd, offset: u64, length: u64) -> Result<(), String>;
}

/// Features the daemon supports.
const DAEMON_FEATURES: u32 = Feature::FdPassing as u32 | Feature::Memfd as u32;

impl<Io> Bus<Io> {
    /// An empty bus. `bus_id` identifies this daemon instance;
    /// `own_pid_namespace` is the inode of the daemon's pid namespace;
    /// `fd_budget` is how many fds peers may make the daemon hold in all;
    /// `in_flight_budget` how many it may have sent that receivers have not
    /// read yet.
    pub fn new(
        limits: Limits,
        policy: PolicyLayers,
        bus_id: String,
        daemon: DaemonFacts,
        budgets: FdBudgets,
        fd_probe: Box<dyn FdProbe>,
        now: Instant,
    ) -> Self {
        let DaemonFacts {
            uid,
            pid,
            pid_namespace: own_pid_namespace,
            mode,
            host_reference,
        } = daemon;
        let FdBudgets {
            held: fd_budget,
            in_flight: in_flight_budget,
        } = budgets;
        let bus_sender = SenderInfo {
            unique_name: BUS_NAME.to_owned(),
            uid,
            gid: 0,
            pid,
            groups: Vec::new(),
            label: None,
            container: None,
        };
        let daemon_uid = bus_sender.uid;
        Self {
            peers: HashMap::default(),
            scopes: ScopeTable::default(),
            names: ScopedNames::default(),
            matches: MatchRegistry::default(),
            monitors: MatchRegistry::default(),
            jobs: std::collections::VecDeque::new(),
            pending_jobs: HashMap::default(),
            next_job: 0,
            calls: PendingCalls::default(),
            policy,
            bus_id,
            started: now,
            next_peer: 0,
            connections_per_uid: HashMap::new(),
            dirty: Vec::new(),
            doomed: Vec::new(),
            broadcast_stamp: 0,
            bus_sender,
            next_sweep: now + Duration::from_millis(limits.pending_fd_timeout_ms / 4),
            fd_probe,
            own_pid_namespace,
            host_facts: (mode, host_reference),
            // The daemon's own uid (root on a system bus, the user on a
            // session bus) owns these pools: like a receiver on its own
            // queue, it is held only to the total.
            global_bytes: FairPool::new(limits.max_queued_bytes_total, Some(daemon_uid)),
            global_fds: FairPool::new(fd_budget, Some(daemon_uid)),
            // Charged to sender uids; the daemon's own uid (the owner of
            // a session bus) is held only to the total, as above.
            fds_in_flight: FairPool::new(in_flight_budget, Some(daemon_uid)),
            limits,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

#[cfg(test)]
mod tests;
