//! What a delivery must pass: policy (see, talk, receive, pass fds, memfd
//! size) between sender and receiver, per-message fd and memfd limits, memfd
//! validation, and the receiver's announced features.

use super::*;

impl<Io> Bus<Io> {
    /// Policy and fd checks for a call or unicast signal.
    pub(super) fn check_unicast(
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
    pub(super) fn check_unicast_policy(
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
    pub(super) fn refused_right(
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
    pub(super) fn owned_names<'a>(&self, peer: &'a Peer<Io>) -> SmallVec<[&'a str; 4]> {
        peer.names
            .iter()
            .map(WellKnownName::as_str)
            .filter(|name| self.names.owner(peer.scope, name) == Some(peer.id))
            .collect()
    }

    /// Fd limits and memfd validity for a frame to `to`, and whether `to`
    /// announced support for what it carries.
    pub(super) fn check_fds(
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
    pub(super) fn check_fd_limits(
        &self,
        header: &HeaderView<'_>,
        fds: &[OwnedFd],
    ) -> Result<(), BusError> {
        if fds.len() > self.limits.max_fds_per_message as usize {
            return Err(BusError::LimitExceeded {
                limit: crate::config::Limit::MaxFdsPerMessage,
                message: format!("{} fds in one message", fds.len()),
            });
        }
        if header.memfds.len() > self.limits.max_memfds_per_message as usize {
            return Err(BusError::LimitExceeded {
                limit: crate::config::Limit::MaxMemfdsPerMessage,
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
            self.fd_probe
                .check_memfd(fd, memfd.offset, memfd.length)
                .map_err(BusError::InvalidMemfd)?;
        }
        Ok(())
    }
}
