//! Copies of unicast traffic for monitors (eavesdropping match rules), flagged
//! MONITOR_COPY, without fds, charged to the monitor.

use super::*;

impl<Io> Bus<Io> {
    /// Queues a copy of a unicast frame for every monitor whose
    /// eavesdropping rule matches it, other than its sender and its
    /// receiver. Copies carry no fds and no memfd payloads, are flagged
    /// MONITOR_COPY, and are charged to the monitor itself; a monitor whose
    /// queue is full misses them. (Only when monitors exist; the header is
    /// decoded and rebuilt here.)
    pub(super) fn copy_to_monitors(
        &mut self,
        from: PeerId,
        to: PeerId,
        header: &HeaderView<'_>,
        body: &[u8],
    ) {
        let mut watchers = self.matching_peers(
            &self.monitors,
            from,
            SignalView {
                sender: self.peers[&from].unique_name.as_str(),
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
        let mut info = sender_info_of(sender.unique_name.as_str(), &sender.identity);
        let sender_identity = Arc::clone(&sender.identity);
        for id in watchers {
            let Some(monitor) = self.peers.get(&id) else {
                continue;
            };
            if monitor.doomed {
                continue;
            }
            let face = monitor.face;
            info.pid = sender_identity.pid_seen_from(monitor.identity.namespaces.pid);
            copy.sender = Some(info.clone());
            let frame_len = face.built_len(&copy, body.len()) as u64;
            let queued = self.enqueue(id, None, (frame_len, 0), WhenFull::Refuse, |peers| {
                let monitor = peers.get_mut(&id).expect("checked above");
                face.push_built(&mut monitor.outbox, &copy, body, Vec::new())
            });
            if queued.is_err() {
                if let Some(monitor) = self.peers.get_mut(&id) {
                    monitor.counters.dropped_signals += 1;
                }
            }
        }
    }
}
