//! The routing core: peers, names, match rules, pending calls and queues, as
//! plain data. It never touches a socket: frames come in through
//! [`Bus::dispatch`], and everything it wants to send is appended to the
//! receiving peer's [`OutQueue`]; the server layer flushes the queues of the
//! peers listed by [`Bus::take_dirty`] and closes those in
//! [`Bus::take_doomed`]. The clock is an argument, so tests run without
//! timers or sockets.
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

mod driver;
pub mod error;
pub mod inflight;
pub mod matches;
pub mod names;
pub mod quota;
pub mod replies;
pub mod scopes;

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pbus_identity::PeerIdentity;
use pbus_policy::{PeerPolicy, Policy, Right};
use pbus_proto::frame::{Flushed, OutQueue};
use pbus_proto::header::HeaderView;
use pbus_proto::names::{MemberName, ObjectPath, UniqueName};
use pbus_proto::v1::{
    ContainerInfo, ErrorInfo, Feature, Header, HeaderFlag, Hello, Limits as WireLimits,
    MessageKind, NameOwnerChanged, SenderInfo, Welcome,
};
use pbus_proto::{BUS_NAME, BUS_PATH, PROTOCOL_VERSION};
use prost::Message;
use smallvec::SmallVec;

use crate::config::Limits;
pub use error::BusError;
use inflight::{FdFrameKind, FdOrigin, InFlight, InFlightGate, Undelivered};
use matches::{MatchId, MatchRegistry, SignalView};
use names::{OwnerChange, ScopedNames};
use quota::{FairPool, ReceiverQuota, Refusal, Released};
use replies::{CallKey, PendingCalls};
use scopes::{ScopeId, ScopeTable};

/// A hasher for ids the bus assigns itself (peer and rule numbers): they
/// are not chosen by clients, so a fast multiplicative hash is safe.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// `BuildHasher` for [`IdHasher`].
pub type IdHash = std::hash::BuildHasherDefault<IdHasher>;

/// [`IdHasher`] started from a secret random seed, for keys that include
/// client-chosen numbers (call serials): as fast, but a client cannot aim
/// its keys at one bucket without knowing the seed.
#[derive(Debug, Clone, Copy)]
pub struct SeededIdHash(u64);

impl Default for SeededIdHash {
    fn default() -> Self {
        use std::hash::{BuildHasher, Hasher};
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        // std's RandomState is seeded from the OS; hashing nothing with it
        // yields a random number without any I/O of our own.
        Self(*SEED.get_or_init(|| {
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        }))
    }
}

impl std::hash::BuildHasher for SeededIdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(self.0)
    }
}

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

/// Per-peer counters, for `pbusctl stats` and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Frames this peer sent that were accepted.
    pub sent: u64,
    /// Frames queued to this peer.
    pub received: u64,
    /// Broadcast signals this peer missed because its queue was full.
    pub dropped_signals: u64,
}

/// One connected peer.
#[derive(Debug)]
pub struct Peer<Io> {
    /// The server layer's handle (socket, wakers); unused by the core.
    pub io: Io,
    id: PeerId,
    unique_name: String,
    identity: Arc<PeerIdentity>,
    policy: PeerPolicy,
    /// The name scope it claims and resolves well-known names in, decided
    /// from its identity at connect time.
    scope: ScopeId,
    features: u32,
    /// The encoded `sender` field stamped on everything this peer sends,
    /// with `pid` as seen from the daemon's pid namespace (receivers where
    /// the pid reads differently get one made for them).
    sender_stamp: Vec<u8>,
    outbox: OutQueue<OwnedFd, FdOrigin>,
    /// The fds of the last frame with fds written to this peer's socket,
    /// until the peer has read everything sent (see [`inflight`]).
    fds_in_flight: Option<InFlight>,
    /// Bumped whenever fds in flight to this peer are found read.
    fds_read: u64,
    /// Fds this peer sent with a frame it has not finished sending (the
    /// server layer reports them; see [`Bus::set_partial_frame_fds`]).
    partial_frame_fds: u64,
    /// What the last sweep saw of this peer's fds (see
    /// [`Bus::sweep_stalled_fds`]).
    fd_watch: FdWatch,
    /// What the queued frames are charged to, released as they are written.
    quota: ReceiverQuota,
    /// Well-known names this peer owns or is queued for (in its scope).
    names: HashSet<String>,
    matches: Vec<MatchId>,
    /// Eavesdropping rules (in `Bus::monitors`), for monitors.
    monitor_matches: Vec<MatchId>,
    /// Set when the peer added its first eavesdropping rule, and never
    /// cleared: a monitor is receive-only (it may call the bus driver and
    /// nothing else, and nobody may call it) until it disconnects. Removing
    /// its last eavesdropping rule (or losing the monitor right on reload)
    /// does not make it a normal peer again: a connection that switches
    /// roles while copies are still queued for it, or owns a name again
    /// and answers calls next to copies of others' calls, is exactly the
    /// kind of corner case monitors are kept out of.
    monitor: bool,
    /// Last broadcast this peer received, to deliver each broadcast once.
    broadcast_stamp: u64,
    dirty: bool,
    doomed: bool,
    connected_at: SystemTime,
    counters: PeerCounters,
}

impl<Io> Peer<Io> {
    /// The peer's unique name.
    pub fn unique_name(&self) -> &str {
        &self.unique_name
    }

    /// The peer's identity.
    pub fn identity(&self) -> &Arc<PeerIdentity> {
        &self.identity
    }

    /// The name scope the peer belongs to.
    pub fn scope(&self) -> ScopeId {
        self.scope
    }

    /// Bytes waiting in this peer's queue.
    pub fn queued_bytes(&self) -> usize {
        self.outbox.queued_bytes()
    }

    /// Fds waiting in this peer's queue.
    pub fn queued_fds(&self) -> usize {
        self.outbox.queued_fds()
    }

    /// Messages waiting in this peer's queue.
    pub fn queued_messages(&self) -> usize {
        self.quota.messages() as usize
    }

    /// The fair-share pools of this peer's queue (bytes, fds, messages).
    pub fn quota(&self) -> &ReceiverQuota {
        &self.quota
    }

    /// True when nothing waits to be written.
    pub fn outbox_is_empty(&self) -> bool {
        self.outbox.is_empty()
    }

    /// Counters for this peer.
    pub fn counters(&self) -> PeerCounters {
        self.counters
    }

    /// True if the peer announced fd support (plain fds).
    pub fn accepts_fds(&self) -> bool {
        self.features & Feature::FdPassing as u32 != 0
    }

    /// True if the peer announced memfd payload support.
    pub fn accepts_memfds(&self) -> bool {
        self.features & Feature::Memfd as u32 != 0
    }
}

/// What [`Bus::sweep_stalled_fds`] remembers of one peer between sweeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct FdWatch {
    /// Since when the peer's queue has held fds without progress, and the
    /// progress marks (bytes written, fds read) seen then.
    queued: Option<(Instant, u64, u64)>,
    /// Since when the peer has held fds of an unfinished frame.
    partial: Option<Instant>,
}

/// The whole bus state.
#[derive(Debug)]
pub struct Bus<Io> {
    /// Boxed: the map's spare capacity then costs a pointer per slot, not
    /// a whole peer.
    peers: HashMap<PeerId, Box<Peer<Io>>, IdHash>,
    /// The name scopes of connected peers.
    scopes: ScopeTable,
    /// Well-known names, one table per scope.
    names: ScopedNames,
    matches: MatchRegistry,
    /// Eavesdropping rules of monitors: copies of unicast traffic.
    monitors: MatchRegistry,
    /// Callers waiting for a policy reload (done by the server, which may
    /// read files); answered by [`Bus::finish_policy_reload`].
    reload_requests: Vec<(PeerId, u64)>,
    calls: PendingCalls,
    limits: Limits,
    policy: Arc<Policy>,
    bus_id: String,
    started: Instant,
    next_peer: u64,
    connections_per_uid: HashMap<u32, u32>,
    dirty: Vec<PeerId>,
    doomed: Vec<PeerId>,
    broadcast_stamp: u64,
    /// Stamp for messages from the bus itself.
    bus_sender: SenderInfo,
    /// Set when a call deadline earlier than any before was added.
    timer_needs_rearm: bool,
    /// When the server's timer will next wake up (None: not armed). A new
    /// deadline only needs to wake the timer if it is earlier than this;
    /// later ones are found when the timer wakes and re-arms.
    timer_armed: Option<Instant>,
    /// The daemon's own pid namespace inode: peers there see its pid.
    own_pid_namespace: u64,
    /// Bytes queued for all receivers, shared fairly among sender uids.
    global_bytes: FairPool,
    /// Fds the daemon holds (sockets and queued fds), shared fairly among uids.
    global_fds: FairPool,
    /// Fds sent to receivers and not read by them yet, shared fairly among
    /// sender uids (see [`inflight`]).
    fds_in_flight: FairPool,
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
        policy: Arc<Policy>,
        bus_id: String,
        own_pid_namespace: u64,
        fd_budget: u64,
        in_flight_budget: u64,
        now: Instant,
    ) -> Self {
        let bus_sender = SenderInfo {
            unique_name: BUS_NAME.to_owned(),
            uid: pbus_sys::process::effective_uid(),
            gid: 0,
            pid: std::process::id(),
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
            reload_requests: Vec::new(),
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
            timer_needs_rearm: false,
            timer_armed: None,
            own_pid_namespace,
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

    /// The limits as announced in `Welcome`.
    pub fn wire_limits(&self) -> WireLimits {
        let l = &self.limits;
        WireLimits {
            max_frame_bytes: l.max_frame_bytes,
            max_header_bytes: l.max_header_bytes,
            max_fds_per_message: l.max_fds_per_message,
            max_memfds_per_message: l.max_memfds_per_message,
            max_names_per_connection: l.max_names_per_connection,
            max_matches_per_connection: l.max_matches_per_connection,
            max_pending_calls: l.max_pending_calls_per_connection,
            default_reply_timeout_ms: l.default_reply_timeout_ms,
            max_reply_timeout_ms: l.max_reply_timeout_ms,
            max_queued_bytes: l.max_queued_bytes_per_receiver,
            max_queued_fds: l.max_queued_fds_per_receiver,
            max_queued_messages: l.max_queued_messages_per_receiver,
        }
    }

    /// Number of connected peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Connected peers of `uid`.
    pub fn connections_of_uid(&self, uid: u32) -> u32 {
        self.connections_per_uid.get(&uid).copied().unwrap_or(0)
    }

    /// A peer by id.
    pub fn peer(&self, id: PeerId) -> Option<&Peer<Io>> {
        self.peers.get(&id).map(|peer| &**peer)
    }

    /// All peers.
    pub fn peers(&self) -> impl Iterator<Item = &Peer<Io>> {
        self.peers.values().map(|peer| &**peer)
    }

    /// Claims the fd of a new connection's socket for `uid` from the
    /// daemon-wide fd budget (fair share per uid). Released with
    /// [`release_socket_fd`](Self::release_socket_fd) when it closes.
    pub fn claim_socket_fd(&mut self, uid: u32) -> Result<(), BusError> {
        self.claim_fds(uid, 1)
    }

    /// Gives back a connection's socket fd.
    pub fn release_socket_fd(&mut self, uid: u32) {
        self.release_fds(uid, 1);
    }

    /// Claims `count` fds the daemon holds for `uid` (received with a frame
    /// that is not complete yet, say) from the daemon-wide fd budget.
    pub fn claim_fds(&mut self, uid: u32, count: u64) -> Result<(), BusError> {
        self.global_fds
            .check(uid, count)
            .map_err(|refusal| BusError::LimitExceeded {
                limit: "max_fds_total",
                message: match refusal {
                    Refusal::Full => "the daemon holds all the fds it may".into(),
                    Refusal::FairShare => {
                        format!("uid {uid} holds its fair share of the daemon's fds")
                    }
                },
            })?;
        self.global_fds.charge(uid, count);
        Ok(())
    }

    /// Gives back fds claimed with [`claim_fds`](Self::claim_fds).
    pub fn release_fds(&mut self, uid: u32, count: u64) {
        self.global_fds.release(uid, count);
    }

    /// The daemon-wide pools: queued bytes and held fds.
    pub fn global_pools(&self) -> (&FairPool, &FairPool) {
        (&self.global_bytes, &self.global_fds)
    }

    /// The daemon-wide pool of fds in flight to receivers.
    pub fn in_flight_pool(&self) -> &FairPool {
        &self.fds_in_flight
    }

    /// Checks the per-uid and total connection limits for a new peer of `uid`.
    pub fn admit(&self, uid: u32) -> Result<(), BusError> {
        if self.peers.len() as u64 >= u64::from(self.limits.max_connections) {
            return Err(BusError::LimitExceeded {
                limit: "max_connections",
                message: "the bus has too many connections".into(),
            });
        }
        if self.connections_of_uid(uid) >= self.limits.max_connections_per_uid {
            return Err(BusError::LimitExceeded {
                limit: "max_connections_per_uid",
                message: format!("uid {uid} has too many connections"),
            });
        }
        Ok(())
    }

    /// Completes a handshake: registers the peer and queues its `Welcome`.
    pub fn add_peer(
        &mut self,
        io: Io,
        identity: PeerIdentity,
        hello: &Hello,
    ) -> Result<PeerId, BusError> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(BusError::HandshakeFailed(format!(
                "protocol version {} is not supported (this bus speaks {PROTOCOL_VERSION})",
                hello.protocol_version
            )));
        }
        self.admit(identity.uid)?;
        self.next_peer += 1;
        let id = PeerId(self.next_peer);
        let unique_name = id.unique_name().into_string();
        let features = hello.features & DAEMON_FEATURES;
        let policy = self.policy.snapshot(&identity);
        let scope = self.scopes.join(&identity);
        let mut sender_stamp = Vec::new();
        let mut stamped = sender_info_of(&unique_name, &identity);
        stamped.pid = identity.pid_seen_from(self.own_pid_namespace);
        pbus_proto::header::encode_sender_field(&stamped, &mut sender_stamp);
        *self.connections_per_uid.entry(identity.uid).or_default() += 1;
        let identity = Arc::new(identity);
        self.peers.insert(
            id,
            Box::new(Peer {
                io,
                id,
                unique_name: unique_name.clone(),
                identity: Arc::clone(&identity),
                policy,
                scope,
                features,
                sender_stamp,
                outbox: OutQueue::default(),
                fds_in_flight: None,
                fds_read: 0,
                partial_frame_fds: 0,
                fd_watch: FdWatch::default(),
                quota: ReceiverQuota::new(identity.uid),
                names: HashSet::new(),
                matches: Vec::new(),
                monitor_matches: Vec::new(),
                monitor: false,
                broadcast_stamp: 0,
                dirty: false,
                doomed: false,
                connected_at: SystemTime::now(),
                counters: PeerCounters::default(),
            }),
        );
        let welcome = Welcome {
            protocol_version: PROTOCOL_VERSION,
            unique_name: unique_name.clone(),
            features,
            limits: Some(self.wire_limits()),
            bus_id: self.bus_id.clone(),
        };
        let header = Header {
            kind: MessageKind::Welcome as i32,
            destination: unique_name.clone(),
            payload_type: pbus_proto::type_name::<Welcome>(),
            ..Header::default()
        };
        self.queue_from_bus(id, header, &welcome.encode_to_vec());
        self.announce_owner_change(&unique_name, None, Some((id, &identity)));
        Ok(id)
    }

    /// Removes a peer (it disconnected or was doomed): releases its names
    /// (promoting queued owners), drops its match rules, fails calls it
    /// owed with `NoReply`, forgets calls it made, and closes queued fds.
    pub fn remove_peer(&mut self, id: PeerId) -> Option<Peer<Io>> {
        let mut peer = self.peers.remove(&id)?;
        let (global_bytes, global_fds) = (&mut self.global_bytes, &mut self.global_fds);
        peer.quota
            .release_all(|released| release_global(global_bytes, global_fds, released));
        peer.outbox.clear();
        if let Some(in_flight) = peer.fds_in_flight.take() {
            self.fds_in_flight.release(in_flight.uid, in_flight.fds);
        }
        if let Some(count) = self.connections_per_uid.get_mut(&peer.identity.uid) {
            *count -= 1;
            if *count == 0 {
                self.connections_per_uid.remove(&peer.identity.uid);
            }
        }
        for match_id in &peer.matches {
            self.matches.remove(*match_id);
        }
        for match_id in &peer.monitor_matches {
            self.monitors.remove(*match_id);
        }
        let mut names: Vec<&String> = peer.names.iter().collect();
        names.sort();
        for name in names {
            let (_, change) = self.names.release(peer.scope, name, id);
            if let Some(change) = change {
                self.announce_change(change, Some(&peer.identity));
            }
        }
        for key in self.calls.remove_peer(id) {
            let error = BusError::NoReply(peer.unique_name.clone());
            self.queue_error_to(key.caller, key.serial, &error);
        }
        self.scopes.leave(peer.scope);
        self.announce_owner_change(&peer.unique_name, Some((id, &peer.identity)), None);
        Some(*peer)
    }

    /// Peers with newly queued frames since the last call; the server
    /// flushes them.
    pub fn take_dirty(&mut self) -> Vec<PeerId> {
        let dirty = std::mem::take(&mut self.dirty);
        for id in &dirty {
            if let Some(peer) = self.peers.get_mut(id) {
                peer.dirty = false;
            }
        }
        dirty
    }

    /// True when some peer has frames the server has not tried to flush.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Peers the core decided to disconnect (e.g. they stopped reading their
    /// own replies); the server closes them and calls [`remove_peer`](Self::remove_peer).
    pub fn take_doomed(&mut self) -> Vec<PeerId> {
        std::mem::take(&mut self.doomed)
    }

    /// True if the peer was doomed.
    pub fn is_doomed(&self, id: PeerId) -> bool {
        self.peers.get(&id).is_some_and(|peer| peer.doomed)
    }

    /// Marks a peer for disconnection.
    pub fn doom(&mut self, id: PeerId, why: &str) {
        if let Some(peer) = self.peers.get_mut(&id) {
            if !peer.doomed {
                tracing::info!(peer = %peer.unique_name, why, "disconnecting peer");
                peer.doomed = true;
                self.doomed.push(id);
            }
        }
    }

    /// Writes as much of a peer's queue as `send` accepts. `send(io, data,
    /// fds)` performs one sendmsg on the peer's socket; `unread(io)` says how
    /// much of what was sent the peer has not read yet (`SIOCOUTQ`), which
    /// decides when fds in flight to it are read (see [`inflight`]). A frame
    /// whose fds cannot be passed is dropped and its sender told; the
    /// receiver stays connected. `Flushed::FdsWaiting` means a frame with
    /// fds waits for the peer to read earlier ones: flush again when its
    /// socket reports progress.
    pub fn flush_peer(
        &mut self,
        id: PeerId,
        mut send: impl FnMut(&Io, &[u8], &[OwnedFd]) -> io::Result<usize>,
        unread: impl Fn(&Io) -> io::Result<usize>,
    ) -> io::Result<Flushed> {
        self.release_read_fds(id, &unread);
        let Some(peer) = self.peers.get_mut(&id) else {
            return Ok(Flushed::All);
        };
        let daemon_uid = self.bus_sender.uid;
        let Peer {
            io,
            outbox,
            quota,
            fds_in_flight,
            ..
        } = &mut **peer;
        let mut gate = InFlightGate::new(fds_in_flight, &mut self.fds_in_flight, daemon_uid);
        let result = outbox.flush_gated(|data, fds| send(io, data, fds), &mut gate);
        let undelivered = std::mem::take(&mut gate.undelivered);
        let (global_bytes, global_fds) = (&mut self.global_bytes, &mut self.global_fds);
        quota.release_written(outbox.written_total(), |released| {
            release_global(global_bytes, global_fds, released)
        });
        if outbox.is_empty() {
            outbox.shrink();
        }
        for frame in undelivered {
            self.refuse_undelivered(id, frame);
        }
        result
    }

    /// Forgets the fds in flight to `id` once `unread` says the peer has
    /// read everything sent to it.
    fn release_read_fds(&mut self, id: PeerId, unread: &impl Fn(&Io) -> io::Result<usize>) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Some(in_flight) = peer.fds_in_flight else {
            return;
        };
        // An error (the socket is gone) leaves the charge in place until
        // the peer is removed.
        if matches!(unread(&peer.io), Ok(0)) {
            peer.fds_in_flight = None;
            peer.fds_read += 1;
            self.fds_in_flight.release(in_flight.uid, in_flight.fds);
        }
    }

    /// True when fds in flight to `id` wait to be read: the server then
    /// watches the peer's socket for progress even with an empty queue.
    pub fn has_fds_in_flight(&self, id: PeerId) -> bool {
        self.peers
            .get(&id)
            .is_some_and(|peer| peer.fds_in_flight.is_some())
    }

    /// A frame to `receiver` was dropped because its fds could not be
    /// passed: the sender is told, and whatever waited on the frame is
    /// answered (the call is cancelled; the caller of a reply gets the
    /// error in its place; a broadcast copy counts as a dropped signal).
    fn refuse_undelivered(&mut self, receiver: PeerId, frame: Undelivered) {
        let Undelivered { origin, error } = frame;
        let Some(origin) = origin else {
            tracing::warn!(peer = receiver.0, %error, "a frame from the bus with fds was dropped");
            return;
        };
        match origin.kind {
            FdFrameKind::Call { wants_reply } => {
                if wants_reply {
                    self.calls.cancel(CallKey {
                        caller: origin.sender,
                        serial: origin.serial,
                    });
                }
            }
            FdFrameKind::Reply { reply_serial } => {
                self.queue_error_to(receiver, reply_serial, &error);
            }
            FdFrameKind::Signal => {}
            FdFrameKind::Broadcast => {
                if let Some(peer) = self.peers.get_mut(&receiver) {
                    peer.counters.dropped_signals += 1;
                }
                return;
            }
        }
        if origin.serial != 0 {
            self.queue_error_to(origin.sender, origin.serial, &error);
        }
    }

    /// The server layer reports how many fds `id` has sent with a frame it
    /// has not finished sending (0 once it is complete).
    pub fn set_partial_frame_fds(&mut self, id: PeerId, fds: u64) {
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.partial_frame_fds = fds;
        }
    }

    /// Disconnects peers that keep fds tied up without progress for longer
    /// than `pending_fd_timeout_ms`: a queue holding fds (or fds in flight)
    /// that the peer does not read, or fds sent with a frame the peer never
    /// finishes. A connection that carries its own socket (directly, or
    /// inside another socket's queue) would otherwise never see its hang-up,
    /// since the daemon itself holds the last reference (the CVE-2014-3637
    /// class); dbus-daemon's pending-fd timeout is the model. `unread` is as
    /// for [`flush_peer`](Self::flush_peer). Call it every fraction of the
    /// timeout; returns the number of peers doomed.
    pub fn sweep_stalled_fds(
        &mut self,
        now: Instant,
        unread: impl Fn(&Io) -> io::Result<usize>,
    ) -> usize {
        let timeout = Duration::from_millis(self.limits.pending_fd_timeout_ms);
        let holding: Vec<PeerId> = self
            .peers
            .values()
            .filter(|peer| peer.fds_in_flight.is_some())
            .map(|peer| peer.id)
            .collect();
        for id in holding {
            self.release_read_fds(id, &unread);
        }
        let mut stalled = Vec::new();
        for peer in self.peers.values_mut() {
            let holds_queued = peer.outbox.queued_fds() > 0 || peer.fds_in_flight.is_some();
            peer.fd_watch.queued = if holds_queued {
                let marks = (peer.outbox.written_total(), peer.fds_read);
                match peer.fd_watch.queued {
                    Some((since, written, read)) if (written, read) == marks => {
                        if now.saturating_duration_since(since) >= timeout {
                            stalled.push((peer.id, "it has not read fds queued for it"));
                        }
                        Some((since, written, read))
                    }
                    _ => Some((now, marks.0, marks.1)),
                }
            } else {
                None
            };
            peer.fd_watch.partial = if peer.partial_frame_fds > 0 {
                let since = peer.fd_watch.partial.unwrap_or(now);
                if now.saturating_duration_since(since) >= timeout {
                    stalled.push((peer.id, "it has not finished a frame whose fds it sent"));
                }
                Some(since)
            } else {
                None
            };
        }
        let count = stalled.len();
        for (id, why) in stalled {
            self.doom(
                id,
                &format!(
                    "{why} within pending_fd_timeout_ms ({} ms)",
                    timeout.as_millis()
                ),
            );
        }
        count
    }

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

    /// Routes one frame from `from`. A returned [`Violation`] means the peer
    /// must be disconnected; everything else is answered on the wire.
    pub fn dispatch(
        &mut self,
        from: PeerId,
        header: &[u8],
        body: &[u8],
        fds: Vec<OwnedFd>,
        now: Instant,
    ) -> Result<(), Violation> {
        if !self.peers.contains_key(&from) {
            return Ok(());
        }
        // Read in place: no field is copied out, and what is forwarded is
        // the sender's own encoding with only the `sender` field replaced.
        let header =
            HeaderView::parse(header).map_err(|e| Violation(format!("undecodable header: {e}")))?;
        let kind = MessageKind::try_from(header.kind).unwrap_or(MessageKind::Unspecified);
        let serial = header.serial;
        let wants_reply = kind == MessageKind::MethodCall
            && header.flags & HeaderFlag::NoReplyExpected as u32 == 0;
        let from_monitor = self.peers[&from].monitor;
        let result = match kind {
            // Only the bus marks monitor copies; a peer may not pass its
            // frames off as one (receivers would not answer or match them).
            _ if header.flags & HeaderFlag::MonitorCopy as u32 != 0 => Err(BusError::InvalidArgs(
                "the MONITOR_COPY flag is set by the bus only".into(),
            )),
            // Monitors are receive-only: the bus driver is all they may
            // call. The frame is dropped and the monitor told why; it stays
            // connected and keeps receiving copies.
            MessageKind::MethodCall
            | MessageKind::MethodReturn
            | MessageKind::Error
            | MessageKind::Signal
                if from_monitor
                    && !(kind == MessageKind::MethodCall && header.destination == BUS_NAME) =>
            {
                Err(BusError::ReceiveOnly(format!(
                    "a monitor is receive-only: it may call {BUS_NAME} only, not send {}",
                    match kind {
                        MessageKind::MethodCall => "method calls to peers",
                        MessageKind::Signal => "signals",
                        _ => "replies",
                    }
                )))
            }
            MessageKind::MethodCall => self.route_call(from, &header, body, fds, now),
            MessageKind::MethodReturn | MessageKind::Error => {
                self.route_reply(from, &header, body, fds)
            }
            MessageKind::Signal => self.route_signal(from, &header, body, fds),
            MessageKind::Hello | MessageKind::Welcome => {
                return Err(Violation("handshake frame after the handshake".into()))
            }
            MessageKind::Unspecified => {
                return Err(Violation(format!("unknown message kind {}", header.kind)))
            }
        };
        match result {
            Ok(()) => {
                if let Some(peer) = self.peers.get_mut(&from) {
                    peer.counters.sent += 1;
                }
            }
            Err(error) => {
                tracing::debug!(peer = from.0, serial, %error, "refused");
                // Refusals of calls are their reply. Refused signals and
                // replies are reported too (with the offending serial) so a
                // sender can notice; a client that expects nothing drops them.
                if serial != 0 || wants_reply {
                    self.queue_error_to(from, serial, &error);
                }
            }
        }
        Ok(())
    }

    fn route_call(
        &mut self,
        from: PeerId,
        header: &HeaderView<'_>,
        body: &[u8],
        fds: Vec<OwnedFd>,
        now: Instant,
    ) -> Result<(), BusError> {
        if header.serial == 0 {
            return Err(BusError::InvalidArgs(
                "a method call needs a non-zero serial".into(),
            ));
        }
        MemberName::validate(header.member).map_err(|e| BusError::InvalidArgs(e.to_string()))?;
        if !header.path.is_empty() {
            ObjectPath::validate(header.path).map_err(|e| BusError::InvalidArgs(e.to_string()))?;
        }
        if header.destination == BUS_NAME {
            if !fds.is_empty() {
                return Err(BusError::FdsNotSupported("the bus accepts no fds".into()));
            }
            return self.handle_bus_call(from, header, body, now);
        }
        let to = self.resolve(from, header.destination)?;
        self.check_unicast(from, to, header, &fds)?;
        if self.peers[&to].monitor {
            // It could not answer (monitors send no replies): refuse now
            // rather than let the caller wait for its timeout.
            return Err(BusError::ReceiveOnly(format!(
                "{} is a monitor, which is receive-only and answers no calls",
                header.destination
            )));
        }
        let wants_reply = header.flags & HeaderFlag::NoReplyExpected as u32 == 0;
        let key = CallKey {
            caller: from,
            serial: header.serial,
        };
        if wants_reply {
            if self.calls.count_for_caller(from)
                >= self.limits.max_pending_calls_per_connection as usize
            {
                return Err(BusError::LimitExceeded {
                    limit: "max_pending_calls_per_connection",
                    message: "too many calls waiting for replies".into(),
                });
            }
            let timeout_ms = match header.timeout_ms {
                0 => self.limits.default_reply_timeout_ms,
                requested => requested.min(self.limits.max_reply_timeout_ms),
            };
            let deadline = now + Duration::from_millis(u64::from(timeout_ms));
            if self.timer_armed.is_none_or(|armed| deadline < armed) {
                self.timer_armed = Some(deadline);
                self.timer_needs_rearm = true;
            }
            if !self.calls.insert(key, to, deadline, timeout_ms) {
                return Err(BusError::InvalidArgs(format!(
                    "serial {} is already waiting for a reply",
                    header.serial
                )));
            }
        }
        if let Err(error) = self.stamp_and_queue(from, to, header, body, fds) {
            if wants_reply {
                self.calls.cancel(key);
            }
            return Err(error);
        }
        Ok(())
    }

    fn route_reply(
        &mut self,
        from: PeerId,
        header: &HeaderView<'_>,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), BusError> {
        let caller =
            PeerId::from_unique_name(header.destination).ok_or(BusError::UnexpectedReply)?;
        let key = CallKey {
            caller,
            serial: header.reply_serial,
        };
        if !self.calls.take_reply(key, from) {
            return Err(BusError::UnexpectedReply);
        }
        // An ERROR must carry an error name; give a nameless one the
        // generic name (the one case where the header is rebuilt).
        let named;
        let header = if header.kind == MessageKind::Error as i32
            && header.error.as_ref().is_none_or(|e| e.name.is_empty())
        {
            let mut full = Header::decode(header.raw).map_err(|_| BusError::UnexpectedReply)?;
            let mut info = full.error.take().unwrap_or_default();
            info.name =
                pbus_proto::errors::error_name(pbus_proto::v1::ErrorCode::Failed).to_owned();
            full.error = Some(info);
            full.sender = None;
            named = full.encode_to_vec();
            &HeaderView::parse(&named).expect("an encoded header parses")
        } else {
            header
        };
        // The call is answered either way; if the reply cannot go through,
        // the caller gets an error in its place.
        if let Err(error) = self.check_fds(caller, header, &fds) {
            self.queue_error_to(caller, key.serial, &error);
            return Err(error);
        }
        match self.stamp_and_queue(from, caller, header, body, fds) {
            Ok(()) => Ok(()),
            Err(BusError::ReceiverQueueFull { limit, .. }) => {
                // The caller asked for this reply and does not read it: its
                // own queue is the problem, so the caller goes.
                self.doom(
                    caller,
                    &format!("its queue is full ({limit}) and it has a reply to read"),
                );
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    fn route_signal(
        &mut self,
        from: PeerId,
        header: &HeaderView<'_>,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), BusError> {
        MemberName::validate(header.member).map_err(|e| BusError::InvalidArgs(e.to_string()))?;
        if !header.path.is_empty() {
            ObjectPath::validate(header.path).map_err(|e| BusError::InvalidArgs(e.to_string()))?;
        }
        if !header.destination.is_empty() {
            let to = self.resolve(from, header.destination)?;
            self.check_unicast(from, to, header, &fds)?;
            return self.stamp_and_queue(from, to, header, body, fds);
        }
        if fds.len() > header.memfds.len() {
            return Err(BusError::FdsNotSupported(
                "broadcast signals may carry memfd payloads but no other fds".into(),
            ));
        }
        self.check_fd_limits(header, &fds)?;
        self.broadcast(from, header, body, &fds);
        Ok(())
    }

    /// Resolves a destination name to a connected peer, as `from` sees
    /// names: a unique name anywhere, a well-known name in `from`'s scope
    /// or, for a peer outside the host scope, the host's (see
    /// [`ScopedNames::resolve`]). Whether `from` may see the peer found is
    /// checked by the caller.
    fn resolve(&self, from: PeerId, destination: &str) -> Result<PeerId, BusError> {
        if destination.starts_with(':') {
            PeerId::from_unique_name(destination)
                .filter(|id| self.peers.contains_key(id))
                .ok_or_else(|| BusError::NoSuchPeer(destination.to_owned()))
        } else if destination.is_empty() {
            Err(BusError::InvalidArgs(
                "a method call needs a destination".into(),
            ))
        } else {
            self.names
                .resolve(self.peers[&from].scope, destination)
                .map(|resolved| resolved.owner)
                .ok_or_else(|| BusError::NameHasNoOwner(destination.to_owned()))
        }
    }

    /// Policy and fd checks for a call or unicast signal.
    fn check_unicast(
        &self,
        from: PeerId,
        to: PeerId,
        header: &HeaderView<'_>,
        fds: &[OwnedFd],
    ) -> Result<(), BusError> {
        if from != to {
            self.check_unicast_policy(from, to, header, fds)?;
        }
        self.check_fds(to, header, fds)
    }

    /// The policy side of a unicast: the sender must see the receiver (a
    /// receiver it may not see does not exist for it: the error is the same
    /// as for a name nobody owns), may talk to it, may pass plain fds and
    /// memfds of this size; the receiver must accept it.
    fn check_unicast_policy(
        &self,
        from: PeerId,
        to: PeerId,
        header: &HeaderView<'_>,
        fds: &[OwnedFd],
    ) -> Result<(), BusError> {
        let sender = &self.peers[&from];
        let receiver = &self.peers[&to];
        if !sender
            .policy
            .may_see(&receiver.identity, header.destination)
        {
            return Err(if header.destination.starts_with(':') {
                BusError::NoSuchPeer(header.destination.to_owned())
            } else {
                BusError::NameHasNoOwner(header.destination.to_owned())
            });
        }
        let sender_names = self.owned_names(sender);
        let plain_fds = fds.len() > header.memfds.len();
        match self.refused_right(sender, &sender_names, receiver, header, plain_fds) {
            Some(right) => Err(BusError::AccessDenied {
                right: right.as_str(),
                target: String::new(),
            }),
            None => Ok(()),
        }
    }

    /// The policy rights one delivery from `sender` (owning `sender_names`)
    /// to `receiver` needs, unicast or broadcast alike: the sender may talk
    /// to the receiver, the receiver may receive from the sender, the sender
    /// may pass plain fds (if `plain_fds`) and memfds of these sizes. The
    /// first right refused, or `None`.
    fn refused_right(
        &self,
        sender: &Peer<Io>,
        sender_names: &[&str],
        receiver: &Peer<Io>,
        header: &HeaderView<'_>,
        plain_fds: bool,
    ) -> Option<Right> {
        let receiver_names = self.owned_names(receiver);
        if !sender
            .policy
            .may_talk(&receiver.identity, &receiver_names, header.member)
        {
            return Some(Right::Talk);
        }
        if !receiver
            .policy
            .may_receive(&sender.identity, sender_names, header.member)
        {
            return Some(Right::Receive);
        }
        if plain_fds
            && !sender
                .policy
                .may_pass_fds(&receiver.identity, &receiver_names)
        {
            return Some(Right::PassFds);
        }
        if !header.memfds.is_empty() {
            if let Some(max) = sender
                .policy
                .max_memfd_bytes(&receiver.identity, &receiver_names)
            {
                if header.memfds.iter().any(|memfd| memfd.length > max) {
                    return Some(Right::Memfd);
                }
            }
        }
        None
    }

    /// The well-known names `peer` is primary owner of in its own scope.
    /// Asked for twice per routed message; peers own few names, so this
    /// stays on the stack.
    fn owned_names<'a>(&self, peer: &'a Peer<Io>) -> SmallVec<[&'a str; 4]> {
        peer.names
            .iter()
            .filter(|name| self.names.owner(peer.scope, name) == Some(peer.id))
            .map(String::as_str)
            .collect()
    }

    /// Fd limits and memfd validity for a frame to `to`, and whether `to`
    /// announced support for what it carries.
    fn check_fds(
        &self,
        to: PeerId,
        header: &HeaderView<'_>,
        fds: &[OwnedFd],
    ) -> Result<(), BusError> {
        // A body declared to be in a memfd needs checking even with no fds
        // attached: that is exactly the case to refuse.
        if fds.is_empty() && header.memfds.is_empty() && !header.body_in_memfd {
            return Ok(());
        }
        self.check_fd_limits(header, fds)?;
        // The feature bits mean what they say: FD_PASSING for plain fds,
        // MEMFD for memfd payloads (check_fd_limits made the memfds distinct
        // fds, so the rest are plain).
        let receiver = &self.peers[&to];
        if fds.len() > header.memfds.len() && !receiver.accepts_fds() {
            return Err(BusError::FdsNotSupported(
                "the receiver did not announce fd support".into(),
            ));
        }
        if !header.memfds.is_empty() && !receiver.accepts_memfds() {
            return Err(BusError::FdsNotSupported(
                "the receiver did not announce memfd support".into(),
            ));
        }
        Ok(())
    }

    /// Per-message fd and memfd limits, and memfd validation.
    fn check_fd_limits(&self, header: &HeaderView<'_>, fds: &[OwnedFd]) -> Result<(), BusError> {
        if fds.len() > self.limits.max_fds_per_message as usize {
            return Err(BusError::LimitExceeded {
                limit: "max_fds_per_message",
                message: format!("{} fds in one message", fds.len()),
            });
        }
        if header.memfds.len() > self.limits.max_memfds_per_message as usize {
            return Err(BusError::LimitExceeded {
                limit: "max_memfds_per_message",
                message: format!("{} memfds in one message", header.memfds.len()),
            });
        }
        if header.body_in_memfd && header.memfds.is_empty() {
            return Err(BusError::InvalidMemfd(
                "body_in_memfd set but no memfd attached".into(),
            ));
        }
        let mut used = vec![false; fds.len()];
        for memfd in &header.memfds {
            let index = memfd.fd_index as usize;
            let Some(fd) = fds.get(index) else {
                return Err(BusError::InvalidMemfd(format!(
                    "memfd index {index} has no fd"
                )));
            };
            if std::mem::replace(&mut used[index], true) {
                return Err(BusError::InvalidMemfd(format!(
                    "fd {index} used for two memfds"
                )));
            }
            crate::memfd::validate(fd, memfd.offset, memfd.length)
                .map_err(BusError::InvalidMemfd)?;
        }
        Ok(())
    }

    /// Delivers a broadcast signal to every peer with a matching rule.
    fn broadcast(&mut self, from: PeerId, header: &HeaderView<'_>, body: &[u8], fds: &[OwnedFd]) {
        self.broadcast_stamp += 1;
        let stamp = self.broadcast_stamp;
        let mut receivers = self.matching_peers(
            &self.matches,
            from,
            SignalView {
                sender: &self.peers[&from].unique_name,
                path: header.path,
                member: header.member,
                args: &header.args,
            },
        );
        // A peer is listed once per matching rule: check each peer once.
        // Broadcasts carry memfds only (see route_signal), so no plain fds.
        receivers.sort_unstable();
        receivers.dedup();
        {
            let sender = &self.peers[&from];
            let sender_names = self.owned_names(sender);
            receivers.retain(|id| {
                let Some(receiver) = self.peers.get(id) else {
                    return false;
                };
                !receiver.doomed
                    && (receiver.id == from
                        || self
                            .refused_right(sender, &sender_names, receiver, header, false)
                            .is_none())
            });
        }
        self.deliver_to_each(
            Some(from),
            receivers,
            stamp,
            Broadcast::Forwarded(header),
            body,
            fds,
        );
    }

    /// Peers with a rule in `registry` that matches `signal` sent by `from`
    /// (a peer may be listed once per matching rule). A rule's well-known
    /// `sender` is resolved as its subscriber resolves names: it matches
    /// when the name leads that subscriber to `from`.
    fn matching_peers(
        &self,
        registry: &MatchRegistry,
        from: PeerId,
        signal: SignalView<'_>,
    ) -> Vec<PeerId> {
        let sender = &self.peers[&from];
        let mut peers = Vec::new();
        registry.for_each_candidate(
            &signal,
            sender.names.iter().map(String::as_str),
            |peer, rule| {
                let Some(subscriber) = self.peers.get(&peer) else {
                    return;
                };
                let leads_to_sender = |name: &str| {
                    self.names
                        .resolve(subscriber.scope, name)
                        .is_some_and(|resolved| resolved.owner == from)
                };
                if rule.matches(&signal, leads_to_sender) {
                    peers.push(peer);
                }
            },
        );
        peers
    }

    /// The `sender` field (see [`pbus_proto::header::encode_sender_field`])
    /// stamped on what `from` sends to a receiver in pid namespace `ns`:
    /// the one kept with the peer when the pid reads the same there (the
    /// daemon's namespace, the usual case), a fresh one otherwise.
    fn sender_stamp(&self, from: PeerId, ns: u64) -> std::borrow::Cow<'_, [u8]> {
        let peer = &self.peers[&from];
        let pid = peer.identity.pid_seen_from(ns);
        if pid == peer.identity.pid_seen_from(self.own_pid_namespace) {
            return std::borrow::Cow::Borrowed(&peer.sender_stamp);
        }
        let mut info = sender_info_of(&peer.unique_name, &peer.identity);
        info.pid = pid;
        let mut stamp = Vec::new();
        pbus_proto::header::encode_sender_field(&info, &mut stamp);
        std::borrow::Cow::Owned(stamp)
    }

    /// Queues one encoded copy per receiver pid namespace to each receiver
    /// not yet stamped with `stamp`.
    fn deliver_to_each(
        &mut self,
        from: Option<PeerId>,
        receivers: Vec<PeerId>,
        stamp: u64,
        mut message: Broadcast<'_, '_>,
        body: &[u8],
        fds: &[OwnedFd],
    ) {
        let actor = from.map(|from| self.peers[&from].identity.uid);
        let mut encoded: Vec<(u64, Vec<u8>)> = Vec::new();
        for id in receivers {
            let Some(receiver) = self.peers.get_mut(&id) else {
                continue;
            };
            if receiver.broadcast_stamp == stamp {
                continue;
            }
            receiver.broadcast_stamp = stamp;
            if !fds.is_empty() && !receiver.accepts_memfds() {
                // This subscriber takes no memfd payloads, so it misses a
                // signal that carries one.
                receiver.counters.dropped_signals += 1;
                continue;
            }
            let pid_ns = receiver.identity.namespaces.pid;
            let index = match encoded.iter().position(|(ns, _)| *ns == pid_ns) {
                Some(index) => index,
                None => {
                    let mut bytes = Vec::new();
                    let fd_count = fds.len() as u16;
                    match &mut message {
                        Broadcast::Forwarded(view) => {
                            let sender = from.expect("forwarded frames have a sender");
                            let sender_stamp = self.sender_stamp(sender, pid_ns);
                            pbus_proto::frame::encode_stamped_frame(
                                &mut bytes,
                                view,
                                &sender_stamp,
                                body,
                                fd_count,
                            );
                        }
                        Broadcast::FromBus(header) => {
                            let mut info = self.bus_sender.clone();
                            if pid_ns != self.own_pid_namespace {
                                info.pid = 0;
                            }
                            header.sender = Some(info);
                            pbus_proto::frame::encode_frame(&mut bytes, header, body, fd_count);
                        }
                    }
                    encoded.push((pid_ns, bytes));
                    encoded.len() - 1
                }
            };
            let frame = &encoded[index].1;
            let copies = match fds
                .iter()
                .map(OwnedFd::try_clone)
                .collect::<io::Result<Vec<_>>>()
            {
                Ok(copies) => copies,
                Err(error) => {
                    tracing::warn!(%error, "cannot duplicate memfds for a broadcast");
                    continue;
                }
            };
            let (bytes, fd_count) = (frame.len() as u64, copies.len() as u64);
            match self.admit_frame(id, actor, bytes, fd_count) {
                Ok(()) => {
                    let receiver = self.peers.get_mut(&id).expect("checked above");
                    let origin = from.zip(actor).map(|(sender, uid)| FdOrigin {
                        sender,
                        uid,
                        serial: 0,
                        kind: FdFrameKind::Broadcast,
                    });
                    let origin = (!copies.is_empty()).then_some(origin).flatten();
                    let end = receiver.outbox.push_encoded(frame, copies, origin);
                    self.record_frame(id, actor, bytes, fd_count, end);
                }
                Err(_) => {
                    let receiver = self.peers.get_mut(&id).expect("checked above");
                    receiver.counters.dropped_signals += 1;
                    tracing::debug!(peer = %receiver.unique_name, "queue full; broadcast dropped");
                }
            }
        }
    }

    /// Can `to`'s queue take a frame of `bytes` and `fds` sent by uid
    /// `actor` (`None` for the bus itself)? Checks the receiver's caps and
    /// the actor's fair share of them, then the actor's fair share of the
    /// daemon-wide queued bytes and fds.
    fn admit_frame(
        &self,
        to: PeerId,
        actor: Option<u32>,
        bytes: u64,
        fds: u64,
    ) -> Result<(), BusError> {
        let receiver = &self.peers[&to];
        let charged = actor.unwrap_or(receiver.identity.uid);
        receiver
            .quota
            .check(self.queue_caps(), charged, bytes, fds)
            .map_err(|(limit, refusal)| BusError::ReceiverQueueFull {
                limit,
                fair_share: refusal == Refusal::FairShare,
            })?;
        if let Some(uid) = actor {
            let global = |pool: &FairPool, amount: u64, limit: &'static str| {
                pool.check(uid, amount)
                    .map_err(|refusal| BusError::LimitExceeded {
                        limit,
                        message: match refusal {
                            Refusal::Full => "the daemon holds as much as it may".into(),
                            Refusal::FairShare => {
                                format!("uid {uid} holds its fair share of the daemon")
                            }
                        },
                    })
            };
            global(&self.global_bytes, bytes, "max_queued_bytes_total")?;
            global(&self.global_fds, fds, "max_fds_total")?;
        }
        Ok(())
    }

    /// The caps of every receiver's queue: bytes, fds, messages.
    pub fn queue_caps(&self) -> quota::QueueUse {
        [
            self.limits.max_queued_bytes_per_receiver,
            u64::from(self.limits.max_queued_fds_per_receiver),
            u64::from(self.limits.max_queued_messages_per_receiver),
        ]
    }

    /// Charges a frame just queued for `to` (after [`admit_frame`](Self::admit_frame)).
    fn record_frame(&mut self, to: PeerId, actor: Option<u32>, bytes: u64, fds: u64, end: u64) {
        if let Some(uid) = actor {
            self.global_bytes.charge(uid, bytes);
            self.global_fds.charge(uid, fds);
        }
        let receiver = self.peers.get_mut(&to).expect("receiver exists");
        let charged = actor.unwrap_or(receiver.identity.uid);
        receiver
            .quota
            .charge(charged, bytes, fds, end, actor.is_some());
        receiver.counters.received += 1;
        mark_dirty(&mut self.dirty, receiver);
    }

    /// Stamps `header` with `from`'s identity (as `to` should see it) and
    /// queues the frame for `to`: the sender's header bytes are copied as
    /// they are, with only the `sender` field replaced.
    fn stamp_and_queue(
        &mut self,
        from: PeerId,
        to: PeerId,
        header: &HeaderView<'_>,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), BusError> {
        let receiver_ns = self.peers[&to].identity.namespaces.pid;
        let actor = Some(self.peers[&from].identity.uid);
        let stamp = self.sender_stamp(from, receiver_ns);
        let frame_len = (pbus_proto::frame::PREFIX_LEN
            + pbus_proto::header::stamped_len(header, &stamp)
            + body.len()) as u64;
        let fd_count = fds.len() as u64;
        self.admit_frame(to, actor, frame_len, fd_count)?;
        let origin = (!fds.is_empty()).then(|| FdOrigin {
            sender: from,
            uid: self.peers[&from].identity.uid,
            serial: header.serial,
            kind: fd_frame_kind(header),
        });
        let end = match stamp {
            std::borrow::Cow::Borrowed(_) if from != to => {
                let [Some(sender), Some(receiver)] = self.peers.get_disjoint_mut([&from, &to])
                else {
                    unreachable!("both peers exist");
                };
                receiver
                    .outbox
                    .push_stamped_from(header, &sender.sender_stamp, body, fds, origin)
            }
            stamp => {
                let stamp = stamp.into_owned();
                let receiver = self.peers.get_mut(&to).expect("receiver exists");
                receiver
                    .outbox
                    .push_stamped_from(header, &stamp, body, fds, origin)
            }
        };
        self.record_frame(to, actor, frame_len, fd_count, end);
        if !self.monitors.is_empty() {
            self.copy_to_monitors(from, to, header, body);
        }
        Ok(())
    }

    /// Queues a copy of a unicast frame for every monitor whose
    /// eavesdropping rule matches it, other than its sender and its
    /// receiver. Copies carry no fds and no memfd payloads, are flagged
    /// MONITOR_COPY, and are charged to the monitor itself; a monitor whose
    /// queue is full misses them. (Only when monitors exist; the header is
    /// decoded and rebuilt here.)
    fn copy_to_monitors(&mut self, from: PeerId, to: PeerId, header: &HeaderView<'_>, body: &[u8]) {
        let mut watchers = self.matching_peers(
            &self.monitors,
            from,
            SignalView {
                sender: &self.peers[&from].unique_name,
                path: header.path,
                member: header.member,
                args: &header.args,
            },
        );
        watchers.retain(|peer| *peer != from && *peer != to);
        if watchers.is_empty() {
            return;
        }
        watchers.sort();
        watchers.dedup();
        let Ok(mut copy) = Header::decode(header.raw) else {
            return;
        };
        copy.flags |= HeaderFlag::MonitorCopy as u32;
        copy.memfds.clear();
        copy.body_in_memfd = false;
        let sender = &self.peers[&from];
        let mut info = sender_info_of(&sender.unique_name, &sender.identity);
        let sender_identity = Arc::clone(&sender.identity);
        for id in watchers {
            let Some(monitor) = self.peers.get(&id) else {
                continue;
            };
            if monitor.doomed {
                continue;
            }
            info.pid = sender_identity.pid_seen_from(monitor.identity.namespaces.pid);
            copy.sender = Some(info.clone());
            let frame_len = pbus_proto::frame::encoded_frame_len(&copy, body.len()) as u64;
            if self.admit_frame(id, None, frame_len, 0).is_err() {
                if let Some(monitor) = self.peers.get_mut(&id) {
                    monitor.counters.dropped_signals += 1;
                }
                continue;
            }
            let end = self.peers.get_mut(&id).expect("checked above").outbox.push(
                &copy,
                body,
                Vec::new(),
            );
            self.record_frame(id, None, frame_len, 0, end);
        }
    }

    /// Replaces the policy and recompiles every peer's snapshot; returns the
    /// number of peers. Connections are kept; names already owned are kept.
    pub fn set_policy(&mut self, policy: Arc<Policy>) -> usize {
        for peer in self.peers.values_mut() {
            peer.policy = policy.snapshot(&peer.identity);
            // Eavesdropping needs the monitor right now too: a monitor that
            // lost it stops receiving copies.
            if !peer.monitor_matches.is_empty() && !peer.policy.monitor().allowed {
                tracing::info!(peer = %peer.unique_name, "monitor right revoked; eavesdropping rules dropped");
                for id in peer.monitor_matches.drain(..) {
                    self.monitors.remove(id);
                }
            }
        }
        self.policy = policy;
        self.peers.len()
    }

    /// The policy in force.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Callers of `ReloadPolicy` since the last call; the server reloads
    /// and answers them with [`finish_policy_reload`](Self::finish_policy_reload).
    pub fn take_reload_requests(&mut self) -> Vec<(PeerId, u64)> {
        std::mem::take(&mut self.reload_requests)
    }

    /// True when a peer asked for a policy reload.
    pub fn reload_requested(&self) -> bool {
        !self.reload_requests.is_empty()
    }

    /// Answers `ReloadPolicy` callers: with the new policy (installed here)
    /// or with the reason it was refused (the old policy stays).
    pub fn finish_policy_reload(
        &mut self,
        callers: &[(PeerId, u64)],
        result: Result<Arc<Policy>, String>,
    ) -> Result<usize, String> {
        match result {
            Ok(policy) => {
                let reply = pbus_proto::v1::ReloadPolicyReply {
                    files: policy.origins().len() as u32,
                    rules: policy.rule_count() as u32,
                    peers: self.peers.len() as u32,
                    builtin: policy.includes_builtin(),
                };
                let peers = self.set_policy(policy);
                for &(caller, serial) in callers {
                    self.queue_bus_reply(caller, serial, &reply);
                }
                Ok(peers)
            }
            Err(why) => {
                let error = BusError::InvalidArgs(format!(
                    "policy not reloaded, the old one stays in force: {why}"
                ));
                for &(caller, serial) in callers {
                    self.queue_error_to(caller, serial, &error);
                }
                Err(why)
            }
        }
    }

    /// Queues a frame from the bus itself. The bus never refuses its own
    /// frames for queue limits (they are small and bounded by what the peer
    /// asked for); a peer that lets them pile up is disconnected instead.
    fn queue_from_bus(&mut self, to: PeerId, mut header: Header, body: &[u8]) {
        let Some(receiver) = self.peers.get(&to) else {
            return;
        };
        let mut info = self.bus_sender.clone();
        if receiver.identity.namespaces.pid != self.own_pid_namespace {
            info.pid = 0;
        }
        header.sender = Some(info);
        let frame_len = pbus_proto::frame::encoded_frame_len(&header, body.len()) as u64;
        // Frames from the bus are always queued (and charged, so the books
        // balance when they are written); a peer that lets them exceed its
        // caps is not reading what it asked for, and goes.
        let over_limit = self.admit_frame(to, None, frame_len, 0).is_err();
        let end =
            self.peers
                .get_mut(&to)
                .expect("checked above")
                .outbox
                .push(&header, body, Vec::new());
        self.record_frame(to, None, frame_len, 0, end);
        if over_limit {
            self.doom(to, "its queue is full of messages from the bus");
        }
    }

    /// Sends an ERROR from the bus answering `serial` of `to` (0 when it
    /// answers nothing in particular, e.g. the reason for a disconnect).
    pub fn queue_error_to(&mut self, to: PeerId, serial: u64, error: &BusError) {
        self.queue_error_info(to, serial, error.to_wire());
    }

    fn queue_error_info(&mut self, to: PeerId, serial: u64, info: ErrorInfo) {
        let Some(peer) = self.peers.get(&to) else {
            return;
        };
        let header = Header {
            kind: MessageKind::Error as i32,
            reply_serial: serial,
            destination: peer.unique_name.clone(),
            error: Some(info),
            ..Header::default()
        };
        self.queue_from_bus(to, header, &[]);
    }

    /// Sends a METHOD_RETURN from the bus.
    fn queue_bus_reply<M: prost::Message + prost::Name>(
        &mut self,
        to: PeerId,
        serial: u64,
        reply: &M,
    ) {
        let Some(peer) = self.peers.get(&to) else {
            return;
        };
        let header = Header {
            kind: MessageKind::MethodReturn as i32,
            reply_serial: serial,
            destination: peer.unique_name.clone(),
            payload_type: M::full_name(),
            ..Header::default()
        };
        self.queue_from_bus(to, header, &reply.encode_to_vec());
    }

    /// Sends a signal from the bus to one peer.
    fn queue_bus_signal<M: prost::Message + prost::Name>(
        &mut self,
        to: PeerId,
        member: &str,
        args: Vec<String>,
        body: &M,
    ) {
        let Some(peer) = self.peers.get(&to) else {
            return;
        };
        let header = Header {
            kind: MessageKind::Signal as i32,
            destination: peer.unique_name.clone(),
            path: BUS_PATH.to_owned(),
            member: member.to_owned(),
            payload_type: M::full_name(),
            args,
            ..Header::default()
        };
        self.queue_from_bus(to, header, &body.encode_to_vec());
    }

    /// Announces a change of a well-known name's primary owner:
    /// NameLost/NameAcquired to the peers involved and NameOwnerChanged to
    /// subscribers that may see the name.
    fn announce_change(
        &mut self,
        change: OwnerChange,
        removed_identity: Option<&Arc<PeerIdentity>>,
    ) {
        if let Some(old) = change.old {
            if self.peers.contains_key(&old) {
                let lost = pbus_proto::v1::NameLost {
                    name: change.name.clone(),
                };
                self.queue_bus_signal(old, "NameLost", vec![change.name.clone()], &lost);
            }
        }
        if let Some(new) = change.new {
            let acquired = pbus_proto::v1::NameAcquired {
                name: change.name.clone(),
            };
            self.queue_bus_signal(new, "NameAcquired", vec![change.name.clone()], &acquired);
        }
        let identity_of = |bus: &Self, id: Option<PeerId>| -> Option<(PeerId, Arc<PeerIdentity>)> {
            let id = id?;
            match bus.peers.get(&id) {
                Some(peer) => Some((id, Arc::clone(&peer.identity))),
                None => removed_identity.map(|identity| (id, Arc::clone(identity))),
            }
        };
        let old = identity_of(self, change.old);
        let new = identity_of(self, change.new);
        self.announce_owner_change(
            &change.name,
            old.as_ref().map(|(id, identity)| (*id, identity)),
            new.as_ref().map(|(id, identity)| (*id, identity)),
        );
    }

    /// Broadcasts NameOwnerChanged for `name` to subscribers allowed to see
    /// the old or new owner under that name.
    fn announce_owner_change(
        &mut self,
        name: &str,
        old: Option<(PeerId, &Arc<PeerIdentity>)>,
        new: Option<(PeerId, &Arc<PeerIdentity>)>,
    ) {
        let old_name = old
            .map(|(id, _)| id.unique_name().into_string())
            .unwrap_or_default();
        let new_name = new
            .map(|(id, _)| id.unique_name().into_string())
            .unwrap_or_default();
        let args = vec![name.to_owned(), old_name.clone(), new_name.clone()];
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let view = SignalView {
            sender: BUS_NAME,
            path: BUS_PATH,
            member: "NameOwnerChanged",
            args: &arg_refs,
        };
        let mut receivers = Vec::new();
        self.matches
            .for_each_candidate(&view, std::iter::empty(), |peer, rule| {
                if rule.matches(&view, |_| false) {
                    receivers.push(peer);
                }
            });
        receivers.retain(|id| {
            let Some(receiver) = self.peers.get(id) else {
                return false;
            };
            let sees = |owner: Option<(PeerId, &Arc<PeerIdentity>)>| {
                owner.is_some_and(|(owner_id, identity)| {
                    owner_id == *id || receiver.policy.may_see(identity, name)
                })
            };
            !receiver.doomed && (sees(old) || sees(new))
        });
        if receivers.is_empty() {
            return;
        }
        let body = NameOwnerChanged {
            name: name.to_owned(),
            old_owner: old_name,
            new_owner: new_name,
        };
        let mut header = Header {
            kind: MessageKind::Signal as i32,
            path: BUS_PATH.to_owned(),
            member: "NameOwnerChanged".to_owned(),
            payload_type: pbus_proto::type_name::<NameOwnerChanged>(),
            args,
            ..Header::default()
        };
        self.broadcast_stamp += 1;
        let stamp = self.broadcast_stamp;
        self.deliver_to_each(
            None,
            receivers,
            stamp,
            Broadcast::FromBus(&mut header),
            &body.encode_to_vec(),
            &[],
        );
    }

    /// The peer's identity as the `asker` should see it on the wire.
    fn wire_identity(&self, peer: &Peer<Io>, asker: &Peer<Io>) -> pbus_proto::v1::PeerIdentity {
        let identity = &peer.identity;
        let mut owned: Vec<String> = self
            .owned_names(peer)
            .into_iter()
            .map(str::to_owned)
            .collect();
        owned.sort();
        pbus_proto::v1::PeerIdentity {
            unique_name: peer.unique_name.clone(),
            uid: identity.uid,
            gid: identity.gid,
            pid: identity.pid_seen_from(asker.identity.namespaces.pid),
            groups: identity.groups.clone(),
            label: identity.label.clone(),
            container: Some(container_info(identity)),
            namespaces: Some(pbus_proto::v1::NamespaceIds {
                pid: identity.namespaces.pid,
                mnt: identity.namespaces.mnt,
                net: identity.namespaces.net,
                user: identity.namespaces.user,
                ipc: identity.namespaces.ipc,
                uts: identity.namespaces.uts,
                cgroup: identity.namespaces.cgroup,
            }),
            cgroup: identity.cgroup.clone(),
            listener: identity.listener.clone(),
            owned_names: owned,
            connected_at_unix: peer
                .connected_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            features: peer.features,
            // Only for askers in the daemon's own pid namespace: root in a
            // container's pid namespace must not learn host pids either.
            host_pid: if asker.identity.namespaces.pid == self.own_pid_namespace {
                identity.pid
            } else {
                0
            },
        }
    }
}

/// What kind of frame with fds `header` is, for [`FdOrigin`].
fn fd_frame_kind(header: &HeaderView<'_>) -> FdFrameKind {
    match MessageKind::try_from(header.kind) {
        Ok(MessageKind::MethodCall) => FdFrameKind::Call {
            wants_reply: header.flags & HeaderFlag::NoReplyExpected as u32 == 0,
        },
        Ok(MessageKind::MethodReturn | MessageKind::Error) => FdFrameKind::Reply {
            reply_serial: header.reply_serial,
        },
        _ => FdFrameKind::Signal,
    }
}

/// Gives a released queue charge back to the daemon-wide pools.
fn release_global(bytes: &mut FairPool, fds: &mut FairPool, released: Released) {
    bytes.release(released.actor, released.bytes);
    fds.release(released.actor, released.fds);
}

/// What [`Bus::deliver_to_each`] delivers: a peer's frame (forwarded with
/// its sender stamped) or a frame of the bus's own.
enum Broadcast<'v, 'h> {
    Forwarded(&'v HeaderView<'h>),
    FromBus(&'v mut Header),
}

fn mark_dirty<Io>(dirty: &mut Vec<PeerId>, peer: &mut Peer<Io>) {
    if !peer.dirty {
        peer.dirty = true;
        dirty.push(peer.id);
    }
}

fn container_info(identity: &PeerIdentity) -> ContainerInfo {
    use pbus_identity::ContainerRuntime as R;
    use pbus_proto::v1::ContainerRuntime as W;
    let runtime = match identity.container.runtime {
        R::Host => W::Host,
        R::Unknown => W::Unknown,
        R::Docker => W::Docker,
        R::Podman => W::Podman,
        R::Containerd => W::Containerd,
        R::Crio => W::Crio,
        R::Lxc => W::Lxc,
        R::Nspawn => W::Nspawn,
    };
    ContainerInfo {
        runtime: runtime as i32,
        id: identity.container.id.clone(),
        pod_uid: identity.container.pod_uid.clone().unwrap_or_default(),
    }
}

fn sender_info_of(unique_name: &str, identity: &PeerIdentity) -> SenderInfo {
    SenderInfo {
        unique_name: unique_name.to_owned(),
        uid: identity.uid,
        gid: identity.gid,
        pid: identity.pid,
        groups: identity.groups.clone(),
        label: identity.label.clone(),
        container: Some(container_info(identity)),
    }
}

#[cfg(test)]
mod tests;
