//! Name scopes: which table of well-known names a peer claims names in and
//! resolves names from. Plain data, decided once per peer from its
//! identity at connect time; it knows nothing of names or routing.
//!
//! * Host peers (runtime `Host`) share the host scope, [`ScopeId::HOST`].
//! * A peer in a Kubernetes pod (a known runtime with a pod UID) shares
//!   the scope of its pod with the pod's other containers.
//! * A peer in any other container has the scope of that container
//!   (runtime and id).
//! * A peer of runtime `Unknown` (foreign namespaces, no recognised
//!   container cgroup, or a pod's cgroup outside its containers) has the
//!   scope of its pid namespace, so unknown processes in different pid
//!   namespaces never share one.
//!
//! Keys are interned into small [`ScopeId`]s kept on each peer; a scope's
//! entry is dropped when its last peer leaves, so the table holds at most
//! one entry per connected peer. An id is never reused: a container that
//! comes back after all its peers left gets a fresh id (its names were all
//! released when its last peer went).

use std::collections::HashMap;

use pbus_identity::{ContainerRuntime, PeerIdentity};

/// An interned name scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeId(u64);

impl ScopeId {
    /// The scope every host peer belongs to.
    pub const HOST: ScopeId = ScopeId(0);

    /// True for the host scope.
    pub fn is_host(self) -> bool {
        self == Self::HOST
    }
}

/// What a scope is, as derived from a peer's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ScopeKey {
    /// Peers on the host.
    Host,
    /// The containers of one Kubernetes pod (by pod UID).
    Pod(String),
    /// One container outside a pod.
    Container {
        /// The runtime.
        runtime: ContainerRuntime,
        /// The runtime's id or name of the container.
        id: String,
    },
    /// Processes of runtime `Unknown` in one pid namespace (by inode).
    PidNamespace(u64),
}

impl ScopeKey {
    /// The scope a peer with `identity` belongs to.
    pub fn of(identity: &PeerIdentity) -> Self {
        let container = &identity.container;
        match container.runtime {
            ContainerRuntime::Host => Self::Host,
            // Not a container the bus recognises (a pod UID found in the
            // cgroup of a pod's conmon, say, does not make the process a
            // member of the pod's containers): its pid namespace decides.
            ContainerRuntime::Unknown => Self::PidNamespace(identity.namespaces.pid),
            runtime => match &container.pod_uid {
                Some(pod) => Self::Pod(pod.clone()),
                None => Self::Container {
                    runtime,
                    id: container.id.clone(),
                },
            },
        }
    }
}

/// One scope in use: its key and how many connected peers belong to it.
#[derive(Debug)]
struct Member {
    key: ScopeKey,
    peers: usize,
}

/// The scopes of connected peers, interned.
#[derive(Debug)]
pub struct ScopeTable {
    ids: HashMap<ScopeKey, ScopeId>,
    members: HashMap<ScopeId, Member>,
    /// The next id to give out (never 0: that is the host's).
    next: u64,
}

impl Default for ScopeTable {
    fn default() -> Self {
        Self {
            ids: HashMap::new(),
            members: HashMap::new(),
            next: 1,
        }
    }
}

impl ScopeTable {
    /// Counts a new peer with `identity` in its scope and returns the
    /// scope's id. Pair with [`leave`](Self::leave) when the peer goes.
    pub fn join(&mut self, identity: &PeerIdentity) -> ScopeId {
        let key = ScopeKey::of(identity);
        let id = match self.ids.get(&key) {
            Some(&id) => id,
            None => {
                let id = if key == ScopeKey::Host {
                    ScopeId::HOST
                } else {
                    let id = ScopeId(self.next);
                    self.next += 1;
                    id
                };
                self.ids.insert(key.clone(), id);
                self.members.insert(id, Member { key, peers: 0 });
                id
            }
        };
        self.members.get_mut(&id).expect("just ensured").peers += 1;
        id
    }

    /// A peer of scope `id` left; the scope is forgotten with its last peer.
    pub fn leave(&mut self, id: ScopeId) {
        let Some(member) = self.members.get_mut(&id) else {
            return;
        };
        member.peers -= 1;
        if member.peers == 0 {
            let member = self.members.remove(&id).expect("present");
            self.ids.remove(&member.key);
        }
    }

    /// The key of scope `id`, while it has peers.
    pub fn key(&self, id: ScopeId) -> Option<&ScopeKey> {
        self.members.get(&id).map(|member| &member.key)
    }

    /// Number of scopes with connected peers.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when no peer is connected.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pbus_identity::{Container, Namespaces};

    fn identity(
        runtime: ContainerRuntime,
        id: &str,
        pod: Option<&str>,
        pid_ns: u64,
    ) -> PeerIdentity {
        PeerIdentity {
            container: Container {
                runtime,
                id: id.into(),
                pod_uid: pod.map(str::to_owned),
            },
            namespaces: Namespaces {
                pid: pid_ns,
                ..Namespaces::default()
            },
            ..PeerIdentity::default()
        }
    }

    #[test]
    fn keys_follow_host_pod_container_and_pid_namespace() {
        use ContainerRuntime as R;
        let host = identity(R::Host, "", None, 1);
        let host_elsewhere = identity(R::Host, "", None, 2);
        assert_eq!(ScopeKey::of(&host), ScopeKey::Host);
        assert_eq!(ScopeKey::of(&host_elsewhere), ScopeKey::Host);
        let pod_a = identity(R::Crio, "a", Some("pod-1"), 5);
        let pod_b = identity(R::Crio, "b", Some("pod-1"), 6);
        assert_eq!(ScopeKey::of(&pod_a), ScopeKey::of(&pod_b));
        assert_eq!(ScopeKey::of(&pod_a), ScopeKey::Pod("pod-1".into()));
        let docker = identity(R::Docker, "abc", None, 5);
        let podman = identity(R::Podman, "abc", None, 5);
        assert_ne!(ScopeKey::of(&docker), ScopeKey::of(&podman));
        assert_eq!(
            ScopeKey::of(&docker),
            ScopeKey::Container {
                runtime: R::Docker,
                id: "abc".into()
            }
        );
        let unknown = identity(R::Unknown, "", Some("pod-1"), 7);
        let unknown_other_ns = identity(R::Unknown, "", None, 8);
        assert_eq!(ScopeKey::of(&unknown), ScopeKey::PidNamespace(7));
        assert_ne!(ScopeKey::of(&unknown), ScopeKey::of(&unknown_other_ns));
    }

    #[test]
    fn scopes_are_shared_counted_and_forgotten_with_their_last_peer() {
        use ContainerRuntime as R;
        let mut scopes = ScopeTable::default();
        let host = scopes.join(&identity(R::Host, "", None, 1));
        assert_eq!(host, ScopeId::HOST);
        let a1 = scopes.join(&identity(R::Docker, "a", None, 5));
        let a2 = scopes.join(&identity(R::Docker, "a", None, 6));
        let b = scopes.join(&identity(R::Docker, "b", None, 5));
        assert_eq!(a1, a2);
        assert_ne!(a1, b);
        assert!(!a1.is_host() && !b.is_host());
        assert_eq!(scopes.len(), 3);
        scopes.leave(a1);
        assert!(scopes.key(a1).is_some(), "one peer of A is left");
        scopes.leave(a2);
        assert_eq!(scopes.key(a1), None);
        assert_eq!(scopes.len(), 2);
        // A container that comes back gets a fresh id.
        let again = scopes.join(&identity(R::Docker, "a", None, 5));
        assert_ne!(again, a1);
        for id in [again, b, host] {
            scopes.leave(id);
        }
        assert!(scopes.is_empty());
        assert_eq!(scopes.join(&identity(R::Host, "", None, 1)), ScopeId::HOST);
    }
}
