//! Policy reload: installing a new global policy layer (every peer's
//! snapshot recompiled, connections and names kept) and answering the
//! callers of `ReloadPolicy`.

use super::*;

impl<Io> Bus<Io> {
    /// Replaces the global policy layer (narrower layers are kept) and
    /// recompiles every peer's snapshot; returns the number of peers.
    /// Connections are kept; names already owned are kept.
    pub fn set_policy(&mut self, policy: Arc<Policy>) -> usize {
        let layers = self.policy.with_global(policy);
        for peer in self.peers.values_mut() {
            peer.policy = layers.snapshot(&peer.identity);
            // Eavesdropping needs the monitor right now too: a monitor that
            // lost it stops receiving copies.
            if !peer.monitor_matches.is_empty() && !peer.policy.monitor().allowed {
                tracing::info!(peer = %peer.unique_name, "monitor right revoked; eavesdropping rules dropped");
                for id in peer.monitor_matches.drain(..) {
                    self.monitors.remove(id);
                }
            }
        }
        self.policy = layers;
        self.peers.len()
    }

    /// The policy layers in force.
    pub fn policy(&self) -> &PolicyLayers {
        &self.policy
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
}
