//! Frames the bus emits itself: errors, driver replies,
//! NameAcquired/NameLost/NameOwnerChanged, queued without quota refusals (a
//! peer that lets them pile up is doomed instead).

use super::*;

impl<Io> Bus<Io> {
    /// Queues a frame from the bus itself. The bus never refuses its own
    /// frames for queue limits (they are small and bounded by what the peer
    /// asked for); a peer that lets them pile up is disconnected instead.
    pub(super) fn queue_from_bus(&mut self, to: PeerId, header: Header, body: &[u8]) {
        self.queue_from_bus_with_fds(to, header, body, Vec::new());
    }

    /// [`queue_from_bus`](Self::queue_from_bus) with fds attached (a
    /// service's answer); they are charged to the receiver's own uid.
    pub(super) fn queue_from_bus_with_fds(
        &mut self,
        to: PeerId,
        mut header: Header,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) {
        let Some(receiver) = self.peers.get(&to) else {
            return;
        };
        let face = receiver.face;
        header.sender = Some(self.bus_sender_seen_from(receiver.identity.namespaces.pid));
        let frame_len = face.built_len(&header, body.len()) as u64;
        let fd_count = fds.len() as u64;
        // Frames from the bus are always queued (and charged, so the books
        // balance when they are written); a peer that lets them exceed its
        // caps is not reading what it asked for, and goes.
        let queued = self.enqueue(to, None, (frame_len, fd_count), WhenFull::Doom, |peers| {
            let receiver = peers.get_mut(&to).expect("checked above");
            face.push_built(&mut receiver.outbox, &header, body, fds)
        });
        debug_assert!(queued.is_ok(), "frames of the bus are never refused");
    }

    /// Sends an ERROR from the bus answering `serial` of `to` (0 when it
    /// answers nothing in particular, e.g. the reason for a disconnect).
    pub fn queue_error_to(&mut self, to: PeerId, serial: u64, error: &BusError) {
        self.queue_error_info(to, serial, error.to_wire());
    }

    pub(super) fn queue_error_info(&mut self, to: PeerId, serial: u64, info: ErrorInfo) {
        let Some(peer) = self.peers.get(&to) else {
            return;
        };
        let header = Header {
            kind: MessageKind::Error as i32,
            reply_serial: serial,
            destination: peer.unique_name.to_string(),
            error: Some(info),
            ..Header::default()
        };
        self.queue_from_bus(to, header, &[]);
    }

    /// Sends a METHOD_RETURN from the bus.
    pub(super) fn queue_bus_reply<M: prost::Message + prost::Name>(
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
            destination: peer.unique_name.to_string(),
            payload_type: M::full_name(),
            ..Header::default()
        };
        self.queue_from_bus(to, header, &reply.encode_to_vec());
    }

    /// Sends a signal from the bus to one peer.
    pub(super) fn queue_bus_signal<M: prost::Message + prost::Name>(
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
            destination: peer.unique_name.to_string(),
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
    pub(super) fn announce_change(
        &mut self,
        change: OwnerChange,
        removed_identity: Option<&Arc<PeerIdentity>>,
    ) {
        if let Some(old) = change.old {
            if self.peers.contains_key(&old) {
                let lost = pbus_proto::v1::NameLost {
                    name: change.name.to_string(),
                };
                self.queue_bus_signal(old, "NameLost", vec![change.name.to_string()], &lost);
            }
        }
        if let Some(new) = change.new {
            let acquired = pbus_proto::v1::NameAcquired {
                name: change.name.to_string(),
            };
            self.queue_bus_signal(
                new,
                "NameAcquired",
                vec![change.name.to_string()],
                &acquired,
            );
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
            change.name.as_str(),
            old.as_ref().map(|(id, identity)| (*id, identity)),
            new.as_ref().map(|(id, identity)| (*id, identity)),
        );
    }

    /// Broadcasts NameOwnerChanged for `name` to subscribers allowed to see
    /// the old or new owner under that name.
    pub(super) fn announce_owner_change(
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
}
