//! Peer lifecycle and admission: connection limits, the daemon-wide fd budget
//! a connection's socket and half-sent frames are charged to, adding a peer
//! (its policy snapshot, sender stamp and WELCOME), removing one (names
//! released, calls failed, queues dropped), and dooming a peer the server must
//! close.

use super::*;

impl<Io> Bus<Io> {
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
                limit: crate::config::Limit::MaxFdsTotal,
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
                limit: crate::config::Limit::MaxConnections,
                message: "the bus has too many connections".into(),
            });
        }
        if self.connections_of_uid(uid) >= self.limits.max_connections_per_uid {
            return Err(BusError::LimitExceeded {
                limit: crate::config::Limit::MaxConnectionsPerUid,
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
        connected_at: SystemTime,
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
        let unique_name = id.unique_name();
        let features = hello.features & DAEMON_FEATURES;
        let policy = self.policy.snapshot(&identity);
        let scope = self.scopes.join(&identity);
        // Peers come in through the native face today (the HELLO above).
        let face = Face::Native;
        let mut stamped = sender_info_of(unique_name.as_str(), &identity);
        stamped.pid = identity.pid_seen_from(self.own_pid_namespace);
        let sender_stamp = face.sender_stamp(&stamped);
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
                face,
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
                connected_at,
                counters: PeerCounters::default(),
            }),
        );
        let welcome = Welcome {
            protocol_version: PROTOCOL_VERSION,
            unique_name: unique_name.to_string(),
            features,
            limits: Some(self.wire_limits()),
            bus_id: self.bus_id.clone(),
        };
        let header = Header {
            kind: MessageKind::Welcome as i32,
            destination: unique_name.to_string(),
            payload_type: pbus_proto::type_name::<Welcome>(),
            ..Header::default()
        };
        self.queue_from_bus(id, header, &welcome.encode_to_vec());
        self.announce_owner_change(unique_name.as_str(), None, Some((id, &identity)));
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
        let mut names: Vec<&WellKnownName> = peer.names.iter().collect();
        names.sort();
        for name in names {
            let (_, change) = self.names.release(peer.scope, name, id);
            if let Some(change) = change {
                self.announce_change(change, Some(&peer.identity));
            }
        }
        for key in self.calls.remove_peer(id) {
            let error = BusError::NoReply(peer.unique_name.to_string());
            self.queue_error_to(key.caller, key.serial, &error);
        }
        self.scopes.leave(peer.scope);
        self.announce_owner_change(peer.unique_name.as_str(), Some((id, &peer.identity)), None);
        Some(*peer)
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
}

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
    pub(super) id: PeerId,
    pub(super) unique_name: UniqueName,
    pub(super) identity: Arc<PeerIdentity>,
    pub(super) policy: PeerPolicy,
    /// The name scope it claims and resolves well-known names in, decided
    /// from its identity at connect time.
    pub(super) scope: ScopeId,
    pub(super) features: u32,
    /// The wire protocol it speaks: how frames for it are encoded.
    pub(super) face: Face,
    /// The stamp on everything this peer sends, as the native face writes
    /// it, with `pid` as seen from the daemon's pid namespace (receivers
    /// where the pid reads differently, or of another face, get one made
    /// for them).
    pub(super) sender_stamp: Vec<u8>,
    pub(super) outbox: OutQueue<OwnedFd, FdOrigin>,
    /// The fds of the last frame with fds written to this peer's socket,
    /// until the peer has read everything sent (see [`inflight`]).
    pub(super) fds_in_flight: Option<InFlight>,
    /// Bumped whenever fds in flight to this peer are found read.
    pub(super) fds_read: u64,
    /// Fds this peer sent with a frame it has not finished sending (the
    /// server layer reports them; see [`Bus::set_partial_frame_fds`]).
    pub(super) partial_frame_fds: u64,
    /// What the last sweep saw of this peer's fds (see
    /// [`Bus::sweep_stalled_fds`]).
    pub(super) fd_watch: FdWatch,
    /// What the queued frames are charged to, released as they are written.
    pub(super) quota: ReceiverQuota,
    /// Well-known names this peer owns or is queued for (in its scope).
    pub(super) names: HashSet<WellKnownName>,
    pub(super) matches: Vec<MatchId>,
    /// Eavesdropping rules (in `Bus::monitors`), for monitors.
    pub(super) monitor_matches: Vec<MatchId>,
    /// Set when the peer added its first eavesdropping rule, and never
    /// cleared: a monitor is receive-only (it may call the bus driver and
    /// nothing else, and nobody may call it) until it disconnects. Removing
    /// its last eavesdropping rule (or losing the monitor right on reload)
    /// does not make it a normal peer again: a connection that switches
    /// roles while copies are still queued for it, or owns a name again
    /// and answers calls next to copies of others' calls, is exactly the
    /// kind of corner case monitors are kept out of.
    pub(super) monitor: bool,
    /// Last broadcast this peer received, to deliver each broadcast once.
    pub(super) broadcast_stamp: u64,
    pub(super) dirty: bool,
    pub(super) doomed: bool,
    pub(super) connected_at: SystemTime,
    pub(super) counters: PeerCounters,
}

impl<Io> Peer<Io> {
    /// The peer's unique name.
    pub fn unique_name(&self) -> &UniqueName {
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
pub(super) struct FdWatch {
    /// Since when the peer's queue has held fds without progress, and the
    /// progress marks (bytes written, fds read) seen then.
    pub(super) queued: Option<(Instant, u64, u64)>,
    /// Since when the peer has held fds of an unfinished frame.
    pub(super) partial: Option<Instant>,
}
