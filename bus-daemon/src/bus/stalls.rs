//! The pending-fd timeout: peers that keep fds tied up without progress (a
//! queue with fds it does not read, fds of a frame it never finishes) are
//! doomed, which also breaks connections kept alive by their own socket.

use super::*;

impl<Io> Bus<Io> {
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
}
