//! The well-known name registry: who owns each name and who is queued for
//! it, with the D-Bus flag semantics. Plain data; it never sends anything:
//! every state change returns the [`OwnerChange`] for the caller to deliver.
//!
//! Semantics of `request` (flags from `RequestNameFlag`):
//! * unowned name: the caller becomes primary owner;
//! * caller already primary owner: its flags are updated (`AlreadyOwner`);
//! * REPLACE_EXISTING and the owner set ALLOW_REPLACEMENT: the caller takes
//!   the name; the old owner goes to the head of the queue unless it asked
//!   DO_NOT_QUEUE, in which case it loses the name entirely;
//! * otherwise DO_NOT_QUEUE fails with `Exists` (and leaves the queue);
//! * otherwise the caller is queued (or its queued flags are updated).
//!
//! `release` by the primary owner promotes the head of the queue.
//!
//! [`ScopedNames`] keeps one such registry per name scope (see
//! [`super::scopes`]): claims, queues, replacement and promotion happen
//! only inside the claimant's scope, and a name is resolved in the
//! asker's own scope first and then, for a peer outside the host scope
//! only, in the host's. It knows nothing of policy: who may see the owner
//! found is the caller's question.

use std::collections::{HashMap, VecDeque};

use pbus_proto::names::WellKnownName;

use super::scopes::ScopeId;
use super::PeerId;

/// RequestName flag bits (`pbus.v1.RequestNameFlag`).
pub mod flags {
    /// Others may take the name with REPLACE_EXISTING.
    pub const ALLOW_REPLACEMENT: u32 = 1;
    /// Take the name if the owner allows replacement.
    pub const REPLACE_EXISTING: u32 = 2;
    /// Do not wait in the queue.
    pub const DO_NOT_QUEUE: u32 = 4;
    /// Every defined bit.
    pub const ALL: u32 = ALLOW_REPLACEMENT | REPLACE_EXISTING | DO_NOT_QUEUE;
}

/// Result of a name request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// The caller now owns the name.
    PrimaryOwner,
    /// The caller waits in the queue.
    InQueue,
    /// The name is owned and the caller did not queue.
    Exists,
    /// The caller already owned the name.
    AlreadyOwner,
}

/// Result of a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The caller owned or was queued for the name and no longer is.
    Released,
    /// Nobody owns the name.
    NonExistent,
    /// Somebody else owns it and the caller is not queued.
    NotOwner,
}

/// A change of primary owner, to be announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerChange {
    /// The name.
    pub name: WellKnownName,
    /// Previous primary owner.
    pub old: Option<PeerId>,
    /// New primary owner.
    pub new: Option<PeerId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Claim {
    peer: PeerId,
    flags: u32,
}

/// Owners and queues of all well-known names.
#[derive(Debug, Default)]
pub struct NameRegistry {
    /// Front of each deque is the primary owner; the rest is the queue.
    names: HashMap<WellKnownName, VecDeque<Claim>>,
}

impl NameRegistry {
    /// Handles RequestName.
    pub fn request(
        &mut self,
        name: &WellKnownName,
        peer: PeerId,
        flags: u32,
    ) -> (RequestOutcome, Option<OwnerChange>) {
        let Some(claims) = self.names.get_mut(name.as_str()) else {
            self.names
                .insert(name.clone(), VecDeque::from([Claim { peer, flags }]));
            return (
                RequestOutcome::PrimaryOwner,
                Some(OwnerChange {
                    name: name.clone(),
                    old: None,
                    new: Some(peer),
                }),
            );
        };
        let primary = claims[0];
        if primary.peer == peer {
            claims[0].flags = flags;
            return (RequestOutcome::AlreadyOwner, None);
        }
        let queued_at = claims.iter().position(|claim| claim.peer == peer);
        if flags & flags::REPLACE_EXISTING != 0 && primary.flags & flags::ALLOW_REPLACEMENT != 0 {
            if let Some(index) = queued_at {
                claims.remove(index);
            }
            claims.pop_front();
            if primary.flags & flags::DO_NOT_QUEUE == 0 {
                claims.push_front(primary);
            }
            claims.push_front(Claim { peer, flags });
            return (
                RequestOutcome::PrimaryOwner,
                Some(OwnerChange {
                    name: name.clone(),
                    old: Some(primary.peer),
                    new: Some(peer),
                }),
            );
        }
        if flags & flags::DO_NOT_QUEUE != 0 {
            if let Some(index) = queued_at {
                claims.remove(index);
            }
            return (RequestOutcome::Exists, None);
        }
        match queued_at {
            Some(index) => claims[index].flags = flags,
            None => claims.push_back(Claim { peer, flags }),
        }
        (RequestOutcome::InQueue, None)
    }

    /// Handles ReleaseName.
    pub fn release(
        &mut self,
        name: &WellKnownName,
        peer: PeerId,
    ) -> (ReleaseOutcome, Option<OwnerChange>) {
        let Some(claims) = self.names.get_mut(name.as_str()) else {
            return (ReleaseOutcome::NonExistent, None);
        };
        let Some(index) = claims.iter().position(|claim| claim.peer == peer) else {
            return (ReleaseOutcome::NotOwner, None);
        };
        claims.remove(index);
        if index != 0 {
            return (ReleaseOutcome::Released, None);
        }
        let new = claims.front().map(|claim| claim.peer);
        if new.is_none() {
            self.names.remove(name.as_str());
        }
        (
            ReleaseOutcome::Released,
            Some(OwnerChange {
                name: name.clone(),
                old: Some(peer),
                new,
            }),
        )
    }

    /// The primary owner of `name`.
    pub fn owner(&self, name: &str) -> Option<PeerId> {
        self.names
            .get(name)
            .and_then(|claims| claims.front())
            .map(|claim| claim.peer)
    }

    /// Primary owner first, then the queue.
    pub fn claimants(&self, name: &str) -> Vec<PeerId> {
        self.names
            .get(name)
            .map(|claims| claims.iter().map(|claim| claim.peer).collect())
            .unwrap_or_default()
    }

    /// Every owned name with its primary owner and queue length.
    pub fn iter(&self) -> impl Iterator<Item = (&str, PeerId, usize)> {
        self.names
            .iter()
            .map(|(name, claims)| (name.as_str(), claims[0].peer, claims.len() - 1))
    }

    /// Number of owned names.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when no name is owned.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Where a well-known name resolved to: the scope whose table holds it and
/// its primary owner there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// The scope the owner was found in.
    pub scope: ScopeId,
    /// The primary owner.
    pub owner: PeerId,
}

/// One [`NameRegistry`] per name scope. A scope's table exists only while
/// some name in it is owned, so the map never holds more tables than
/// there are owned names.
#[derive(Debug, Default)]
pub struct ScopedNames {
    scopes: HashMap<ScopeId, NameRegistry>,
}

impl ScopedNames {
    /// Handles RequestName of `peer`, a member of `scope`, in that scope's
    /// table only: owners and queues of other scopes play no part.
    pub fn request(
        &mut self,
        scope: ScopeId,
        name: &WellKnownName,
        peer: PeerId,
        flags: u32,
    ) -> (RequestOutcome, Option<OwnerChange>) {
        self.scopes
            .entry(scope)
            .or_default()
            .request(name, peer, flags)
    }

    /// Handles ReleaseName of `peer`, a member of `scope`.
    pub fn release(
        &mut self,
        scope: ScopeId,
        name: &WellKnownName,
        peer: PeerId,
    ) -> (ReleaseOutcome, Option<OwnerChange>) {
        let Some(table) = self.scopes.get_mut(&scope) else {
            return (ReleaseOutcome::NonExistent, None);
        };
        let released = table.release(name, peer);
        if table.is_empty() {
            self.scopes.remove(&scope);
        }
        released
    }

    /// The primary owner of `name` in `scope`'s own table.
    pub fn owner(&self, scope: ScopeId, name: &str) -> Option<PeerId> {
        self.scopes.get(&scope)?.owner(name)
    }

    /// Primary owner first, then the queue, of `name` in `scope`'s table.
    pub fn claimants(&self, scope: ScopeId, name: &str) -> Vec<PeerId> {
        self.scopes
            .get(&scope)
            .map(|table| table.claimants(name))
            .unwrap_or_default()
    }

    /// Resolves `name` for a member of `scope`: its own scope first; if
    /// nobody owns it there and `scope` is not the host's, the host scope.
    /// Never another container's scope, and never from the host into a
    /// container.
    pub fn resolve(&self, scope: ScopeId, name: &str) -> Option<Resolved> {
        let found = |scope: ScopeId| {
            self.owner(scope, name)
                .map(|owner| Resolved { scope, owner })
        };
        found(scope).or_else(|| {
            if scope.is_host() {
                None
            } else {
                found(ScopeId::HOST)
            }
        })
    }

    /// Every name a member of `scope` resolves, as
    /// `(name, where it resolved, queue length)`: the scope's own names,
    /// then (outside the host scope) the host's names it does not shadow.
    pub fn resolvable(&self, scope: ScopeId) -> impl Iterator<Item = (&str, Resolved, usize)> + '_ {
        let entries = |from: ScopeId| {
            self.scopes
                .get(&from)
                .into_iter()
                .flat_map(NameRegistry::iter)
                .map(move |(name, owner, queued)| (name, Resolved { scope: from, owner }, queued))
        };
        let host = (!scope.is_host()).then(|| {
            entries(ScopeId::HOST).filter(move |(name, _, _)| self.owner(scope, name).is_none())
        });
        entries(scope).chain(host.into_iter().flatten())
    }

    /// Number of owned names, in all scopes.
    pub fn len(&self) -> usize {
        self.scopes.values().map(NameRegistry::len).sum()
    }

    /// True when no name is owned in any scope.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    /// Number of scopes in which some name is owned.
    pub fn scope_count(&self) -> usize {
        self.scopes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::flags::*;
    use super::*;

    const A: PeerId = PeerId(1);
    const B: PeerId = PeerId(2);
    const C: PeerId = PeerId(3);
    const N: &str = "org.example.Name";

    fn n() -> WellKnownName {
        WellKnownName::try_from(N).expect("a valid name")
    }

    fn change(old: Option<PeerId>, new: Option<PeerId>) -> Option<OwnerChange> {
        Some(OwnerChange {
            name: n(),
            old,
            new,
        })
    }

    #[test]
    fn first_request_owns_and_second_queues() {
        let mut names = NameRegistry::default();
        assert_eq!(
            names.request(&n(), A, 0),
            (RequestOutcome::PrimaryOwner, change(None, Some(A)))
        );
        assert_eq!(
            names.request(&n(), A, 0),
            (RequestOutcome::AlreadyOwner, None)
        );
        assert_eq!(names.request(&n(), B, 0), (RequestOutcome::InQueue, None));
        assert_eq!(names.request(&n(), B, 0), (RequestOutcome::InQueue, None));
        assert_eq!(names.claimants(N), vec![A, B]);
    }

    /// Every combination of the owner's and the requester's flags.
    #[test]
    fn flag_matrix() {
        for owner_flags in 0..=ALL {
            for request_flags in 0..=ALL {
                let mut names = NameRegistry::default();
                names.request(&n(), A, owner_flags);
                let (outcome, changed) = names.request(&n(), B, request_flags);
                let replaces =
                    request_flags & REPLACE_EXISTING != 0 && owner_flags & ALLOW_REPLACEMENT != 0;
                let context = format!("owner {owner_flags:#b} request {request_flags:#b}");
                if replaces {
                    assert_eq!(outcome, RequestOutcome::PrimaryOwner, "{context}");
                    assert_eq!(changed, change(Some(A), Some(B)), "{context}");
                    let expected = if owner_flags & DO_NOT_QUEUE != 0 {
                        vec![B]
                    } else {
                        vec![B, A]
                    };
                    assert_eq!(names.claimants(N), expected, "{context}");
                } else if request_flags & DO_NOT_QUEUE != 0 {
                    assert_eq!(outcome, RequestOutcome::Exists, "{context}");
                    assert_eq!(changed, None);
                    assert_eq!(names.claimants(N), vec![A], "{context}");
                } else {
                    assert_eq!(outcome, RequestOutcome::InQueue, "{context}");
                    assert_eq!(names.claimants(N), vec![A, B], "{context}");
                }
            }
        }
    }

    #[test]
    fn do_not_queue_leaves_the_queue() {
        let mut names = NameRegistry::default();
        names.request(&n(), A, 0);
        names.request(&n(), B, 0);
        assert_eq!(
            names.request(&n(), B, DO_NOT_QUEUE),
            (RequestOutcome::Exists, None)
        );
        assert_eq!(names.claimants(N), vec![A]);
    }

    #[test]
    fn replacing_takes_a_queued_requester_out_of_the_queue() {
        let mut names = NameRegistry::default();
        names.request(&n(), A, ALLOW_REPLACEMENT);
        names.request(&n(), C, 0);
        names.request(&n(), B, 0);
        names.request(&n(), B, REPLACE_EXISTING);
        assert_eq!(names.claimants(N), vec![B, A, C]);
    }

    #[test]
    fn release_promotes_the_queue() {
        let mut names = NameRegistry::default();
        names.request(&n(), A, 0);
        names.request(&n(), B, 0);
        names.request(&n(), C, 0);
        assert_eq!(names.release(&n(), C), (ReleaseOutcome::Released, None));
        assert_eq!(
            names.release(&n(), A),
            (ReleaseOutcome::Released, change(Some(A), Some(B)))
        );
        assert_eq!(names.release(&n(), A), (ReleaseOutcome::NotOwner, None));
        assert_eq!(
            names.release(&n(), B),
            (ReleaseOutcome::Released, change(Some(B), None))
        );
        assert_eq!(names.release(&n(), B), (ReleaseOutcome::NonExistent, None));
        assert!(names.is_empty());
    }

    /// Scopes for the scoped-registry tests: the host and two containers.
    const HOST: ScopeId = ScopeId::HOST;

    fn containers() -> (ScopeId, ScopeId) {
        use pbus_identity::{Container, ContainerRuntime, PeerIdentity};
        let mut table = super::super::scopes::ScopeTable::default();
        let mut join = |id: &str| {
            table.join(&PeerIdentity {
                container: Container {
                    runtime: ContainerRuntime::Docker,
                    id: id.into(),
                    pod_uid: None,
                },
                ..PeerIdentity::default()
            })
        };
        (join("a"), join("b"))
    }

    fn at(scope: ScopeId, owner: PeerId) -> Option<Resolved> {
        Some(Resolved { scope, owner })
    }

    /// The takeover: a container's request never queues behind, is never
    /// refused by, and never reveals a host owner.
    #[test]
    fn a_container_claims_in_its_own_scope_whatever_the_host_owns() {
        let (box_a, _) = containers();
        for request_flags in 0..=ALL {
            let mut names = ScopedNames::default();
            names.request(HOST, &n(), A, 0);
            assert_eq!(
                names.request(box_a, &n(), B, request_flags),
                (RequestOutcome::PrimaryOwner, change(None, Some(B))),
                "flags {request_flags:#b}"
            );
            assert_eq!(names.claimants(HOST, N), vec![A]);
            assert_eq!(names.claimants(box_a, N), vec![B]);
        }
    }

    #[test]
    fn the_host_claims_in_its_scope_whatever_a_container_owns() {
        let (box_a, _) = containers();
        let mut names = ScopedNames::default();
        names.request(box_a, &n(), B, 0);
        assert_eq!(
            names.request(HOST, &n(), A, DO_NOT_QUEUE),
            (RequestOutcome::PrimaryOwner, change(None, Some(A)))
        );
    }

    /// Released by the host owner, the name goes to the host's queue, never
    /// to a container's claimant; with no host claimant the host resolves
    /// nothing.
    #[test]
    fn release_and_promotion_stay_in_the_scope() {
        let (box_a, _) = containers();
        let mut names = ScopedNames::default();
        names.request(HOST, &n(), A, 0);
        names.request(box_a, &n(), B, 0);
        names.request(HOST, &n(), C, 0);
        assert_eq!(
            names.release(HOST, &n(), A),
            (ReleaseOutcome::Released, change(Some(A), Some(C)))
        );
        assert_eq!(names.resolve(HOST, N), at(HOST, C));
        assert_eq!(
            names.release(HOST, &n(), C),
            (ReleaseOutcome::Released, change(Some(C), None))
        );
        assert_eq!(names.resolve(HOST, N), None);
        assert_eq!(names.resolve(box_a, N), at(box_a, B));
        // A peer of another scope cannot release what it does not hold
        // there, and learns nothing about the other scope.
        assert_eq!(
            names.release(HOST, &n(), B),
            (ReleaseOutcome::NonExistent, None)
        );
        assert_eq!(names.owner(box_a, N), Some(B));
    }

    #[test]
    fn resolution_falls_back_from_a_container_to_the_host_only() {
        let (box_a, box_b) = containers();
        let mut names = ScopedNames::default();
        names.request(box_a, &n(), B, 0);
        assert_eq!(names.resolve(box_a, N), at(box_a, B));
        assert_eq!(names.resolve(box_b, N), None, "never another container");
        assert_eq!(names.resolve(HOST, N), None, "never host into a container");
        names.request(HOST, &n(), A, 0);
        assert_eq!(names.resolve(box_b, N), at(HOST, A), "container falls back");
        assert_eq!(
            names.resolve(box_a, N),
            at(box_a, B),
            "its own shadows the host"
        );
        assert_eq!(names.resolve(HOST, N), at(HOST, A));
        names.request(box_b, &n(), C, 0);
        assert_eq!(names.resolve(box_b, N), at(box_b, C));
    }

    #[test]
    fn resolvable_names_are_the_own_scope_and_unshadowed_host_names() {
        let (box_a, box_b) = containers();
        const HOST_ONLY: &str = "org.example.HostOnly";
        const B_ONLY: &str = "org.example.BOnly";
        let mut names = ScopedNames::default();
        names.request(HOST, &n(), A, 0);
        names.request(HOST, &n(), C, 0);
        names.request(HOST, &WellKnownName::try_from(HOST_ONLY).unwrap(), A, 0);
        names.request(box_a, &n(), B, 0);
        names.request(box_b, &WellKnownName::try_from(B_ONLY).unwrap(), C, 0);
        let listed = |scope| {
            let mut all: Vec<(String, Resolved, usize)> = names
                .resolvable(scope)
                .map(|(name, resolved, queued)| (name.to_owned(), resolved, queued))
                .collect();
            all.sort_by(|x, y| x.0.cmp(&y.0));
            all
        };
        let entry =
            |name: &str, scope, owner, queued| (name.to_owned(), Resolved { scope, owner }, queued);
        assert_eq!(
            listed(HOST),
            vec![entry(HOST_ONLY, HOST, A, 0), entry(N, HOST, A, 1)]
        );
        assert_eq!(
            listed(box_a),
            vec![entry(HOST_ONLY, HOST, A, 0), entry(N, box_a, B, 0)]
        );
        assert_eq!(
            listed(box_b),
            vec![
                entry(B_ONLY, box_b, C, 0),
                entry(HOST_ONLY, HOST, A, 0),
                entry(N, HOST, A, 1)
            ]
        );
        assert_eq!(names.len(), 4);
    }

    /// Inside one scope the D-Bus semantics are unchanged.
    #[test]
    fn inside_a_scope_the_flag_semantics_hold() {
        let (box_a, _) = containers();
        let mut names = ScopedNames::default();
        names.request(box_a, &n(), A, 0);
        assert_eq!(
            names.request(box_a, &n(), B, DO_NOT_QUEUE),
            (RequestOutcome::Exists, None)
        );
        assert_eq!(
            names.request(box_a, &n(), B, 0),
            (RequestOutcome::InQueue, None)
        );
        assert_eq!(
            names.release(box_a, &n(), A),
            (ReleaseOutcome::Released, change(Some(A), Some(B)))
        );
    }

    #[test]
    fn empty_scope_tables_are_dropped() {
        let (box_a, box_b) = containers();
        let mut names = ScopedNames::default();
        names.request(box_a, &n(), A, 0);
        names.request(box_b, &n(), B, 0);
        names.request(HOST, &n(), C, 0);
        assert_eq!(names.scope_count(), 3);
        names.release(box_a, &n(), A);
        names.release(box_b, &n(), B);
        assert_eq!(names.scope_count(), 1);
        names.release(HOST, &n(), C);
        assert!(names.is_empty());
        assert_eq!(names.scope_count(), 0);
    }
}
