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

use std::collections::{HashMap, VecDeque};

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
    pub name: String,
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
    names: HashMap<String, VecDeque<Claim>>,
}

impl NameRegistry {
    /// Handles RequestName. The caller must have validated `name`.
    pub fn request(
        &mut self,
        name: &str,
        peer: PeerId,
        flags: u32,
    ) -> (RequestOutcome, Option<OwnerChange>) {
        let Some(claims) = self.names.get_mut(name) else {
            self.names
                .insert(name.to_owned(), VecDeque::from([Claim { peer, flags }]));
            return (
                RequestOutcome::PrimaryOwner,
                Some(OwnerChange {
                    name: name.to_owned(),
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
                    name: name.to_owned(),
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
    pub fn release(&mut self, name: &str, peer: PeerId) -> (ReleaseOutcome, Option<OwnerChange>) {
        let Some(claims) = self.names.get_mut(name) else {
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
            self.names.remove(name);
        }
        (
            ReleaseOutcome::Released,
            Some(OwnerChange {
                name: name.to_owned(),
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

#[cfg(test)]
mod tests {
    use super::flags::*;
    use super::*;

    const A: PeerId = PeerId(1);
    const B: PeerId = PeerId(2);
    const C: PeerId = PeerId(3);
    const N: &str = "org.example.Name";

    fn change(old: Option<PeerId>, new: Option<PeerId>) -> Option<OwnerChange> {
        Some(OwnerChange {
            name: N.into(),
            old,
            new,
        })
    }

    #[test]
    fn first_request_owns_and_second_queues() {
        let mut names = NameRegistry::default();
        assert_eq!(
            names.request(N, A, 0),
            (RequestOutcome::PrimaryOwner, change(None, Some(A)))
        );
        assert_eq!(names.request(N, A, 0), (RequestOutcome::AlreadyOwner, None));
        assert_eq!(names.request(N, B, 0), (RequestOutcome::InQueue, None));
        assert_eq!(names.request(N, B, 0), (RequestOutcome::InQueue, None));
        assert_eq!(names.claimants(N), vec![A, B]);
    }

    /// Every combination of the owner's and the requester's flags.
    #[test]
    fn flag_matrix() {
        for owner_flags in 0..=ALL {
            for request_flags in 0..=ALL {
                let mut names = NameRegistry::default();
                names.request(N, A, owner_flags);
                let (outcome, changed) = names.request(N, B, request_flags);
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
        names.request(N, A, 0);
        names.request(N, B, 0);
        assert_eq!(
            names.request(N, B, DO_NOT_QUEUE),
            (RequestOutcome::Exists, None)
        );
        assert_eq!(names.claimants(N), vec![A]);
    }

    #[test]
    fn replacing_takes_a_queued_requester_out_of_the_queue() {
        let mut names = NameRegistry::default();
        names.request(N, A, ALLOW_REPLACEMENT);
        names.request(N, C, 0);
        names.request(N, B, 0);
        names.request(N, B, REPLACE_EXISTING);
        assert_eq!(names.claimants(N), vec![B, A, C]);
    }

    #[test]
    fn release_promotes_the_queue() {
        let mut names = NameRegistry::default();
        names.request(N, A, 0);
        names.request(N, B, 0);
        names.request(N, C, 0);
        assert_eq!(names.release(N, C), (ReleaseOutcome::Released, None));
        assert_eq!(
            names.release(N, A),
            (ReleaseOutcome::Released, change(Some(A), Some(B)))
        );
        assert_eq!(names.release(N, A), (ReleaseOutcome::NotOwner, None));
        assert_eq!(
            names.release(N, B),
            (ReleaseOutcome::Released, change(Some(B), None))
        );
        assert_eq!(names.release(N, B), (ReleaseOutcome::NonExistent, None));
        assert!(names.is_empty());
    }
}
