//! The message path, top to bottom: a frame from a peer is parsed, its kind
//! decides the route (call, reply, signal, or a call to the bus driver), the
//! destination is resolved in the sender's name scope, and the checks and
//! delivery modules do the rest. Refusals are answered on the wire.

use super::*;

impl<Io> Bus<Io> {
    /// Routes one native frame from `from` (its encoded header, body and
    /// fds): the native face reads the header, [`handle_frame`](Self::handle_frame)
    /// does the rest. A returned [`Violation`] means the peer must be
    /// disconnected; everything else is answered on the wire.
    pub fn dispatch(
        &mut self,
        from: PeerId,
        header: &[u8],
        body: &[u8],
        fds: Vec<OwnedFd>,
        now: Instant,
    ) -> Result<(), Violation> {
        // Read in place: no field is copied out, and what is forwarded is
        // the sender's own encoding with only the `sender` field replaced.
        let header = crate::faces::native::read_header(header).map_err(Violation)?;
        self.handle_frame(from, &header, body, fds, now)
    }

    /// Routes one message from `from`, whatever face it came in on: its
    /// kind decides the route, and refusals are answered to the sender. A
    /// returned [`Violation`] means the peer must be disconnected.
    pub fn handle_frame(
        &mut self,
        from: PeerId,
        header: &HeaderView<'_>,
        body: &[u8],
        fds: Vec<OwnedFd>,
        now: Instant,
    ) -> Result<(), Violation> {
        if !self.peers.contains_key(&from) {
            return Ok(());
        }
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
            MessageKind::MethodCall => self.route_call(from, header, body, fds, now),
            MessageKind::MethodReturn | MessageKind::Error => {
                self.route_reply(from, header, body, fds)
            }
            MessageKind::Signal => self.route_signal(from, header, body, fds),
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

    pub(super) fn route_call(
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
        if let Some(service) = services::Service::for_name(header.destination) {
            return self.call_service(service, from, header, body, fds, now);
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
                    limit: crate::config::Limit::MaxPendingCallsPerConnection,
                    message: "too many calls waiting for replies".into(),
                });
            }
            let timeout_ms = match header.timeout_ms {
                0 => self.limits.default_reply_timeout_ms,
                requested => requested.min(self.limits.max_reply_timeout_ms),
            };
            let deadline = now + Duration::from_millis(u64::from(timeout_ms));
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

    pub(super) fn route_reply(
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

    pub(super) fn route_signal(
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
    pub(super) fn resolve(&self, from: PeerId, destination: &str) -> Result<PeerId, BusError> {
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

    /// Delivers a broadcast signal to every peer with a matching rule.
    pub(super) fn broadcast(
        &mut self,
        from: PeerId,
        header: &HeaderView<'_>,
        body: &[u8],
        fds: &[OwnedFd],
    ) {
        self.broadcast_stamp += 1;
        let stamp = self.broadcast_stamp;
        let mut receivers = self.matching_peers(
            &self.matches,
            from,
            SignalView {
                sender: self.peers[&from].unique_name.as_str(),
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
    pub(super) fn matching_peers(
        &self,
        registry: &MatchRegistry,
        from: PeerId,
        signal: SignalView<'_>,
    ) -> Vec<PeerId> {
        let sender = &self.peers[&from];
        let mut peers = Vec::new();
        registry.for_each_candidate(
            &signal,
            sender.names.iter().map(WellKnownName::as_str),
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
}
