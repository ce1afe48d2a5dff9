//! Confirming candidate container ids with the Docker Engine API.
//!
//! Identity capture reports a bare 64-hex cgroup component (Docker's
//! `--cgroup-parent` layout, `/../<id>` through a cgroup namespace) as a
//! candidate only ([`pbus_identity::confirm`]). [`DockerLookup`] asks the
//! engine, `GET /containers/<id>/json` on its Unix socket, and confirms the
//! candidate when the engine reports a running container with exactly that
//! full id. It runs in the connection's own task before the handshake is
//! processed, awaiting the socket like any other I/O, so the routing thread
//! never blocks on it; a bounded timeout keeps a stuck engine from holding
//! a handshake slot for long. Positive answers are cached by id (container
//! ids are never reused); negative ones are not, since a container may be
//! starting. No engine (no socket, refused, timeout, error) means the
//! candidate stays `unknown`.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use pbus_identity::{Answer, ContainerLookup, ContainerRuntime, PeerIdentity};

use super::Shared;

/// How long one question to the engine may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest inspect reply read (a container's JSON is a few KiB).
const MAX_REPLY_BYTES: usize = 1 << 20;
/// Confirmed ids kept; the cache is emptied when it is full.
const MAX_CACHED: usize = 4096;

/// Asks the Docker Engine on `socket` about candidate container ids.
#[derive(Debug)]
pub struct DockerLookup {
    socket: PathBuf,
    /// Ids the engine confirmed as running containers.
    confirmed: RefCell<HashSet<String>>,
}

impl DockerLookup {
    /// A lookup through the engine's API socket (`/var/run/docker.sock`).
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            confirmed: RefCell::new(HashSet::new()),
        }
    }

    /// One `GET /containers/<id>/json`: the status and the body.
    async fn inspect(&self, id: &str) -> Result<(u16, Bytes), String> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.socket.display()))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP handshake with the engine failed: {e}"))?;
        let driver = tokio::task::spawn_local(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "Docker API connection ended");
            }
        });
        let request = hyper::Request::get(format!("/containers/{id}/json"))
            .header(hyper::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("Docker API request failed: {e}"))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the Docker API reply failed: {e}"))?
                .to_bytes();
            Ok((status, body))
        }
        .await;
        drop(sender);
        driver.abort();
        result
    }
}

/// Confirms the candidate container id of `identity` (if it has one) with
/// the daemon's runtime lookup, before the handshake is processed. Without
/// a lookup, or when the engine cannot say, the peer stays `unknown`.
pub(super) async fn confirm_container(
    shared: &Shared,
    mut identity: Box<PeerIdentity>,
) -> Box<PeerIdentity> {
    let Some(candidate) = identity.container_candidate.clone() else {
        return identity;
    };
    let answer = match &shared.containers {
        Some(lookup) => pbus_identity::confirm::confirm_candidate(&mut identity, lookup).await,
        None => None,
    };
    match answer {
        Some(Answer::Running { .. }) => tracing::debug!(
            pid = identity.pid,
            container = %identity.container.id,
            "candidate container confirmed by the Docker engine"
        ),
        Some(Answer::NotRunning) => tracing::info!(
            pid = identity.pid,
            candidate,
            "cgroup names a container the Docker engine does not run: peer stays unknown"
        ),
        Some(Answer::Unavailable(why)) => tracing::info!(
            pid = identity.pid,
            candidate,
            why,
            "cannot confirm the candidate container: peer stays unknown"
        ),
        None => tracing::debug!(
            pid = identity.pid,
            candidate,
            "no runtime to ask (docker_socket is empty): peer stays unknown"
        ),
    }
    identity
}

/// The answer a `GET /containers/<id>/json` reply gives about `id`.
fn answer_from_inspect(id: &str, status: u16, body: &[u8]) -> Answer {
    match status {
        200 => {}
        404 => return Answer::NotRunning,
        other => return Answer::Unavailable(format!("Docker API answered {other}")),
    }
    let json: serde_json::Value = match serde_json::from_slice(body) {
        Ok(json) => json,
        Err(error) => return Answer::Unavailable(format!("Docker API reply: {error}")),
    };
    let full_id = json["Id"].as_str().unwrap_or_default();
    let running = json["State"]["Running"].as_bool().unwrap_or(false);
    if full_id == id && running {
        Answer::Running {
            runtime: ContainerRuntime::Docker,
            id: full_id.to_owned(),
        }
    } else {
        Answer::NotRunning
    }
}

impl ContainerLookup for DockerLookup {
    async fn look_up(&self, id: &str) -> Answer {
        if self.confirmed.borrow().contains(id) {
            return Answer::Running {
                runtime: ContainerRuntime::Docker,
                id: id.to_owned(),
            };
        }
        let answer = match tokio::time::timeout(LOOKUP_TIMEOUT, self.inspect(id)).await {
            Ok(Ok((status, body))) => answer_from_inspect(id, status, &body),
            Ok(Err(why)) => Answer::Unavailable(why),
            Err(_) => Answer::Unavailable(format!(
                "Docker API did not answer within {LOOKUP_TIMEOUT:?}"
            )),
        };
        if matches!(answer, Answer::Running { .. }) {
            let mut confirmed = self.confirmed.borrow_mut();
            if confirmed.len() >= MAX_CACHED {
                confirmed.clear();
            }
            confirmed.insert(id.to_owned());
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e2a9c1b7d8e6f5a4c3b2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    const OTHER: &str = "c0ffee0123456789abcdef0123456789abcdef0123456789abcdef0123456789";

    fn inspect_json(id: &str, running: bool) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "Id": id,
            "State": { "Running": running, "Pid": 4242 },
            "Name": "/app",
        }))
        .unwrap()
    }

    #[test]
    fn only_a_running_container_with_exactly_that_id_confirms() {
        assert_eq!(
            answer_from_inspect(ID, 200, &inspect_json(ID, true)),
            Answer::Running {
                runtime: ContainerRuntime::Docker,
                id: ID.into()
            }
        );
        assert_eq!(
            answer_from_inspect(ID, 200, &inspect_json(ID, false)),
            Answer::NotRunning
        );
        // The engine resolves names and prefixes too: another id is no.
        assert_eq!(
            answer_from_inspect(ID, 200, &inspect_json(OTHER, true)),
            Answer::NotRunning
        );
        assert_eq!(answer_from_inspect(ID, 404, b"{}"), Answer::NotRunning);
        assert!(matches!(
            answer_from_inspect(ID, 500, b"{}"),
            Answer::Unavailable(_)
        ));
        assert!(matches!(
            answer_from_inspect(ID, 200, b"not json"),
            Answer::Unavailable(_)
        ));
    }

    #[test]
    fn no_engine_means_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let lookup = DockerLookup::new(dir.path().join("no-docker.sock"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        let answer = local.block_on(&runtime, lookup.look_up(ID));
        assert!(matches!(&answer, Answer::Unavailable(why) if why.contains("no-docker.sock")));
        assert!(lookup.confirmed.borrow().is_empty());
    }
}
