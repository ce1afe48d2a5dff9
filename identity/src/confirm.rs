//! Turning a candidate container id into a container, by asking the runtime.
//!
//! [`crate::cgroup`] reports a bare 64-hex cgroup component (Docker's
//! `--cgroup-parent` layout `/PARENT/<id>`, or `/../<id>` seen through a
//! cgroup namespace) as a *candidate* only: the directory name alone proves
//! nothing, since anyone allowed to create cgroups can pick it. A
//! [`ContainerLookup`] asks a runtime that can vouch for the id (the daemon
//! implements it with the Docker Engine API); [`apply_answer`] turns its
//! [`Answer`] into the peer's container. Without an answer a candidate
//! stays [`ContainerRuntime::Unknown`]: never guessed, never the host.
//!
//! This module does no I/O itself: the lookup is the caller's, so the
//! daemon can run it asynchronously off its routing path, and tests can
//! answer with a table.

use std::future::Future;

use crate::model::{Container, ContainerRuntime, PeerIdentity};

/// What a runtime says about a candidate container id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The runtime knows a running container with exactly this full id.
    Running {
        /// Which runtime answered.
        runtime: ContainerRuntime,
        /// The full id the runtime reported (compared with the candidate
        /// again in [`apply_answer`]: a runtime that resolves prefixes or
        /// names must not widen what is confirmed).
        id: String,
    },
    /// The runtime answered and has no running container with that id.
    NotRunning,
    /// No runtime could be asked (no socket, timeout, error); the text says
    /// why, for logs.
    Unavailable(String),
}

/// Something that can confirm candidate container ids, e.g. the Docker
/// Engine API. Implementations should cache positive answers by id: a
/// container id is never reused.
pub trait ContainerLookup {
    /// Asks about the running container with the full id `id` (64 hex).
    fn look_up(&self, id: &str) -> impl Future<Output = Answer>;
}

/// Applies `answer` (about `identity.container_candidate`) to `identity`.
///
/// Only a [`Answer::Running`] whose id is exactly the candidate makes the
/// peer a container of that runtime, and it clears the candidate (the id is
/// now [`Container::id`]). Anything else leaves the peer
/// [`ContainerRuntime::Unknown`] with the candidate recorded. Returns true
/// when the candidate was confirmed.
pub fn apply_answer(identity: &mut PeerIdentity, answer: &Answer) -> bool {
    let Some(candidate) = identity.container_candidate.as_deref() else {
        return false;
    };
    match answer {
        Answer::Running { runtime, id }
            if id == candidate && *runtime != ContainerRuntime::Host =>
        {
            identity.container = Container {
                runtime: *runtime,
                id: id.clone(),
                pod_uid: None,
            };
            identity.container_candidate = None;
            true
        }
        _ => false,
    }
}

/// Confirms `identity`'s candidate (if any) through `lookup` and applies the
/// answer. Returns the answer when there was a candidate to ask about.
pub async fn confirm_candidate(
    identity: &mut PeerIdentity,
    lookup: &impl ContainerLookup,
) -> Option<Answer> {
    let candidate = identity.container_candidate.clone()?;
    let answer = lookup.look_up(&candidate).await;
    apply_answer(identity, &answer);
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    const ID: &str = "3f4e2a9c1b7d8e6f5a4c3b2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    const OTHER: &str = "c0ffee0123456789abcdef0123456789abcdef0123456789abcdef0123456789";

    /// A runtime that knows a fixed table of containers and counts the
    /// questions it was asked.
    struct Table {
        answers: HashMap<String, Answer>,
        asked: RefCell<Vec<String>>,
    }

    impl Table {
        fn new(answers: &[(&str, Answer)]) -> Self {
            Self {
                answers: answers
                    .iter()
                    .map(|(id, answer)| ((*id).to_owned(), answer.clone()))
                    .collect(),
                asked: RefCell::new(Vec::new()),
            }
        }
    }

    impl ContainerLookup for Table {
        async fn look_up(&self, id: &str) -> Answer {
            self.asked.borrow_mut().push(id.to_owned());
            self.answers.get(id).cloned().unwrap_or(Answer::NotRunning)
        }
    }

    fn candidate_peer(id: &str) -> PeerIdentity {
        PeerIdentity {
            container: Container {
                runtime: ContainerRuntime::Unknown,
                ..Container::default()
            },
            container_candidate: Some(id.to_owned()),
            cgroup: format!("/pbus-parent/{id}"),
            ..PeerIdentity::default()
        }
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        // The table answers without awaiting anything, so one poll is
        // enough; a pending future here is a bug in the test.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut future = std::pin::pin!(future);
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(output) => output,
            std::task::Poll::Pending => panic!("the lookup did not answer at once"),
        }
    }

    fn running(id: &str) -> Answer {
        Answer::Running {
            runtime: ContainerRuntime::Docker,
            id: id.to_owned(),
        }
    }

    #[test]
    fn a_confirmed_candidate_becomes_the_runtimes_container() {
        let table = Table::new(&[(ID, running(ID))]);
        let mut peer = candidate_peer(ID);
        let answer = block_on(confirm_candidate(&mut peer, &table));
        assert_eq!(answer, Some(running(ID)));
        assert_eq!(
            peer.container,
            Container {
                runtime: ContainerRuntime::Docker,
                id: ID.into(),
                pod_uid: None,
            }
        );
        assert_eq!(peer.container_candidate, None);
        assert_eq!(peer.cgroup, format!("/pbus-parent/{ID}"));
        assert_eq!(*table.asked.borrow(), [ID]);
    }

    #[test]
    fn an_unconfirmed_candidate_stays_unknown_with_its_id_recorded() {
        for answer in [
            Answer::NotRunning,
            Answer::Unavailable("no docker socket".into()),
            // The runtime resolved the question to another container.
            running(OTHER),
            // Nobody may confirm a peer into the host.
            Answer::Running {
                runtime: ContainerRuntime::Host,
                id: ID.into(),
            },
        ] {
            let mut peer = candidate_peer(ID);
            assert!(!apply_answer(&mut peer, &answer), "{answer:?}");
            assert_eq!(peer.container.runtime, ContainerRuntime::Unknown);
            assert_eq!(peer.container.id, "");
            assert_eq!(peer.container_candidate.as_deref(), Some(ID));
        }
    }

    #[test]
    fn peers_without_a_candidate_are_not_looked_up() {
        let table = Table::new(&[(ID, running(ID))]);
        let mut host = PeerIdentity::default();
        assert_eq!(block_on(confirm_candidate(&mut host, &table)), None);
        assert_eq!(host.container, Container::default());
        assert!(table.asked.borrow().is_empty());
        // An answer for nobody's candidate changes nothing.
        assert!(!apply_answer(&mut host, &running(ID)));
        assert_eq!(host.container, Container::default());
    }
}
