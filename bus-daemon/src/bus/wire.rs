//! Conversion of core state to wire messages: announced limits and a peer's
//! identity as an asker may see it.

use super::*;

impl<Io> Bus<Io> {
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

    /// The peer's identity as the `asker` should see it on the wire.
    pub(super) fn wire_identity(
        &self,
        peer: &Peer<Io>,
        asker: &Peer<Io>,
    ) -> pbus_proto::v1::PeerIdentity {
        let identity = &peer.identity;
        let mut owned: Vec<String> = self
            .owned_names(peer)
            .into_iter()
            .map(str::to_owned)
            .collect();
        owned.sort();
        pbus_proto::v1::PeerIdentity {
            unique_name: peer.unique_name.to_string(),
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
            bus_mode: match self.host_facts.0 {
                crate::config::Mode::Host => pbus_proto::v1::BusMode::Host,
                crate::config::Mode::Broker => pbus_proto::v1::BusMode::Broker,
            } as i32,
            host_reference: match self.host_facts.1 {
                pbus_identity::HostReference::Own => pbus_proto::v1::HostReference::OwnNamespaces,
                pbus_identity::HostReference::InitProcess => {
                    pbus_proto::v1::HostReference::InitProcess
                }
            } as i32,
        }
    }
}

pub(super) fn container_info(identity: &PeerIdentity) -> ContainerInfo {
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

pub(super) fn sender_info_of(unique_name: &str, identity: &PeerIdentity) -> SenderInfo {
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
