//! Delivery: the one place frames enter a receiver's queue (admit against
//! quotas, push, record the charge), stamping forwarded frames with the
//! sender, fan-out of broadcasts, and flushing a queue through the fds-in-
//! flight gate (see [`super::inflight`]).

use super::*;

impl<Io> Bus<Io> {
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
    pub(super) fn release_read_fds(
        &mut self,
        id: PeerId,
        unread: &impl Fn(&Io) -> io::Result<usize>,
    ) {
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
    pub(super) fn refuse_undelivered(&mut self, receiver: PeerId, frame: Undelivered) {
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

    /// The stamp on what `from` sends to a receiver of `face` in pid
    /// namespace `ns`: the one kept with the peer when it fits (a native
    /// receiver where the pid reads as in the daemon's namespace, the usual
    /// case), one made by the receiver's face otherwise.
    pub(super) fn sender_stamp(
        &self,
        from: PeerId,
        face: Face,
        ns: u64,
    ) -> std::borrow::Cow<'_, [u8]> {
        let peer = &self.peers[&from];
        let pid = peer.identity.pid_seen_from(ns);
        if face == Face::Native && pid == peer.identity.pid_seen_from(self.own_pid_namespace) {
            return std::borrow::Cow::Borrowed(&peer.sender_stamp);
        }
        let mut info = sender_info_of(peer.unique_name.as_str(), &peer.identity);
        info.pid = pid;
        std::borrow::Cow::Owned(face.sender_stamp(&info))
    }

    /// Queues a copy to each receiver not yet stamped with `stamp`, encoded
    /// once per receiver face and pid namespace (the sender's pid reads
    /// differently across pid namespaces).
    pub(super) fn deliver_to_each(
        &mut self,
        from: Option<PeerId>,
        receivers: Vec<PeerId>,
        stamp: u64,
        mut message: Broadcast<'_, '_>,
        body: &[u8],
        fds: &[OwnedFd],
    ) {
        let actor = from.map(|from| self.peers[&from].identity.uid);
        let mut encoded: Vec<((Face, u64), Vec<u8>)> = Vec::new();
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
            let face = receiver.face;
            let key = (face, pid_ns);
            let index = match encoded.iter().position(|(seen, _)| *seen == key) {
                Some(index) => index,
                None => {
                    let fd_count = fds.len() as u16;
                    let bytes = match &mut message {
                        Broadcast::Forwarded(view) => {
                            let sender = from.expect("forwarded frames have a sender");
                            let sender_stamp = self.sender_stamp(sender, face, pid_ns);
                            face.encode_forwarded(view, &sender_stamp, body, fd_count)
                        }
                        Broadcast::FromBus(header) => {
                            header.sender = Some(self.bus_sender_seen_from(pid_ns));
                            face.encode_built(header, body, fd_count)
                        }
                    };
                    encoded.push((key, bytes));
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
            let origin = from.zip(actor).map(|(sender, uid)| FdOrigin {
                sender,
                uid,
                serial: 0,
                kind: FdFrameKind::Broadcast,
            });
            let origin = (!copies.is_empty()).then_some(origin).flatten();
            let queued = self.enqueue(id, actor, (bytes, fd_count), WhenFull::Refuse, |peers| {
                let receiver = peers.get_mut(&id).expect("checked above");
                receiver.outbox.push_encoded(frame, copies, origin)
            });
            match queued {
                Ok(()) => {}
                Err(_) => {
                    let receiver = self.peers.get_mut(&id).expect("checked above");
                    receiver.counters.dropped_signals += 1;
                    tracing::debug!(peer = %receiver.unique_name, "queue full; broadcast dropped");
                }
            }
        }
    }

    /// The one way a frame enters a receiver's queue: admitted against
    /// `to`'s caps and `actor`'s fair shares (`actor` is the sender's uid,
    /// `None` for the bus itself), pushed by `push` (which gets the peers to
    /// borrow a sender's stamp from alongside the receiver's queue, and
    /// returns the stream offset past the frame), and charged. What happens
    /// when the frame does not fit is `when_full`'s to say.
    pub(super) fn enqueue(
        &mut self,
        to: PeerId,
        actor: Option<u32>,
        (bytes, fds): (u64, u64),
        when_full: WhenFull,
        push: impl FnOnce(&mut PeerMap<Io>) -> u64,
    ) -> Result<(), BusError> {
        let over_limit = match self.admit_frame(to, actor, bytes, fds) {
            Ok(()) => false,
            Err(error) => match when_full {
                WhenFull::Refuse => return Err(error),
                WhenFull::Doom => true,
            },
        };
        let end = push(&mut self.peers);
        self.record_frame(to, actor, bytes, fds, end);
        if over_limit {
            self.doom(to, "its queue is full of messages from the bus");
        }
        Ok(())
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
            let global = |pool: &FairPool, amount: u64, limit: crate::config::Limit| {
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
            global(
                &self.global_bytes,
                bytes,
                crate::config::Limit::MaxQueuedBytesTotal,
            )?;
            global(&self.global_fds, fds, crate::config::Limit::MaxFdsTotal)?;
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

    /// The bus's own stamp as a receiver in pid namespace `ns` sees it:
    /// outside the daemon's pid namespace its pid means nothing, so it is 0.
    pub(super) fn bus_sender_seen_from(&self, ns: u64) -> SenderInfo {
        let mut info = self.bus_sender.clone();
        if ns != self.own_pid_namespace {
            info.pid = 0;
        }
        info
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
    /// queues the frame for `to` in `to`'s face: the sender's header bytes
    /// are copied as they are, with only the `sender` field replaced.
    pub(super) fn stamp_and_queue(
        &mut self,
        from: PeerId,
        to: PeerId,
        header: &HeaderView<'_>,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), BusError> {
        let receiver = &self.peers[&to];
        let (face, receiver_ns) = (receiver.face, receiver.identity.namespaces.pid);
        let actor = Some(self.peers[&from].identity.uid);
        let stamp = self.sender_stamp(from, face, receiver_ns);
        let frame_len = face.forwarded_len(header, &stamp, body.len()) as u64;
        let fd_count = fds.len() as u64;
        let origin = (!fds.is_empty()).then(|| FdOrigin {
            sender: from,
            uid: self.peers[&from].identity.uid,
            serial: header.serial,
            kind: fd_frame_kind(header),
        });
        // The sender's own stamp is borrowed from it, not copied: the common
        // case costs no allocation.
        let own_stamp = matches!(stamp, std::borrow::Cow::Borrowed(_)) && from != to;
        let stamp = if own_stamp {
            None
        } else {
            Some(stamp.into_owned())
        };
        self.enqueue(
            to,
            actor,
            (frame_len, fd_count),
            WhenFull::Refuse,
            |peers| match &stamp {
                None => {
                    let [Some(sender), Some(receiver)] = peers.get_disjoint_mut([&from, &to])
                    else {
                        unreachable!("both peers exist");
                    };
                    face.push_forwarded(
                        &mut receiver.outbox,
                        header,
                        &sender.sender_stamp,
                        (body, fds),
                        origin,
                    )
                }
                Some(stamp) => {
                    let receiver = peers.get_mut(&to).expect("receiver exists");
                    face.push_forwarded(&mut receiver.outbox, header, stamp, (body, fds), origin)
                }
            },
        )?;
        if !self.monitors.is_empty() {
            self.copy_to_monitors(from, to, header, body);
        }
        Ok(())
    }
}

/// What kind of frame with fds `header` is, for [`FdOrigin`].
/// What [`Bus::enqueue`] does with a frame the receiver's queue cannot
/// take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WhenFull {
    /// Refuse it: the sender gets the error.
    Refuse,
    /// Queue it anyway and doom the receiver (frames of the bus's own,
    /// small and bounded by what the peer asked for: a peer that lets them
    /// pile up is not reading).
    Doom,
}

pub(super) fn fd_frame_kind(header: &HeaderView<'_>) -> FdFrameKind {
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
pub(super) fn release_global(bytes: &mut FairPool, fds: &mut FairPool, released: Released) {
    bytes.release(released.actor, released.bytes);
    fds.release(released.actor, released.fds);
}

/// What [`Bus::deliver_to_each`] delivers: a peer's frame (forwarded with
/// its sender stamped) or a frame of the bus's own.
pub(super) enum Broadcast<'v, 'h> {
    Forwarded(&'v HeaderView<'h>),
    FromBus(&'v mut Header),
}

pub(super) fn mark_dirty<Io>(dirty: &mut Vec<PeerId>, peer: &mut Peer<Io>) {
    if !peer.dirty {
        peer.dirty = true;
        dirty.push(peer.id);
    }
}
