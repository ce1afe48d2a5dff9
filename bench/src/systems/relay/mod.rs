//! The `relay` system: a bare Unix-socket relay written in the harness, the
//! floor any bus daemon in the middle can reach (client -> relay -> server
//! -> relay -> client).
//!
//! The relay ([`daemon`]) runs as its own process (`pbus-bench
//! relay-server`), pairs each client connection with the server connection
//! that registered the same key, and then only copies bytes; it does no
//! routing, matching, policy or metadata. [`client`] is the worker side: a
//! length-prefixed framing of the same payloads the D-Bus workloads send.
//!
//! The wire protocol, shared by both halves:
//!
//! - Every connection first sends a 16-byte hello `[role u8][0; 7][key u64
//!   LE]` and waits for the one-byte [`ACK`].
//! - Then frames `[len u32 LE][kind u8][len - 1 payload bytes]` flow.

pub mod client;
pub mod daemon;

use anyhow::Result;
use futures::future::LocalBoxFuture;
use tempfile::TempDir;

use crate::procs::{self_command, ChildProc};
use crate::scenario::Scenario;
use crate::systems::{ClientKind, Instance, System};

/// Hello role: a server that answers calls for its key.
pub const ROLE_SERVER: u8 = 1;
/// Hello role: a client paired with the server of its key.
pub const ROLE_CLIENT: u8 = 2;
/// Hello role: a subscriber of the broadcast group of its key.
pub const ROLE_SUB: u8 = 3;
/// Hello role: a publisher whose bytes go to every subscriber of its key.
pub const ROLE_PUB: u8 = 4;
/// Hello role: a connection that only idles.
pub const ROLE_IDLE: u8 = 5;
/// Length of the hello.
pub const HELLO_LEN: usize = 16;
/// The relay's answer to a hello once the connection is registered.
pub const ACK: u8 = 0x06;

/// Frame kind: a call that expects a reply.
pub const KIND_CALL: u8 = 1;
/// Frame kind: a one-way message.
pub const KIND_ONEWAY: u8 = 2;
/// Frame kind: asks the server for its one-way message count.
pub const KIND_COUNT: u8 = 3;
/// Frame kind: a reply.
pub const KIND_REPLY: u8 = 4;
/// Frame kind: a broadcast signal carrying a u64 sequence number.
pub const KIND_SIGNAL: u8 = 5;
/// Bytes before a frame's payload: the length and the kind.
pub const FRAME_HEADER: usize = 5;

/// The broadcast group key used by the fanout workload.
pub const FANOUT_GROUP: u64 = 0xFA0;

/// Encodes a hello.
pub fn hello(role: u8, key: u64) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[0] = role;
    h[8..].copy_from_slice(&key.to_le_bytes());
    h
}

/// Encodes a frame header for `kind` with `payload_len` payload bytes.
pub fn frame_header(kind: u8, payload_len: usize) -> Result<[u8; FRAME_HEADER]> {
    let len = u32::try_from(payload_len + 1)
        .map_err(|_| anyhow::anyhow!("relay frames are limited to 4 GiB"))?;
    let mut h = [0u8; FRAME_HEADER];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4] = kind;
    Ok(h)
}

/// Splits a frame header into (kind, payload length).
pub fn parse_frame_header(h: &[u8; FRAME_HEADER]) -> (u8, usize) {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    (h[4], len.saturating_sub(1))
}

/// The relay system.
pub struct Relay;

impl System for Relay {
    fn name(&self) -> &'static str {
        "relay"
    }

    fn client(&self) -> ClientKind {
        ClientKind::Relay
    }

    fn check_available(&self) -> Result<(), String> {
        Ok(())
    }

    fn skip_reason(&self, _scenario: Scenario) -> Option<String> {
        None
    }

    fn start(&self, dir: TempDir) -> LocalBoxFuture<'_, Result<Instance>> {
        Box::pin(async move {
            let socket = dir.path().join("relay.sock");
            let mut cmd = self_command(["relay-server", "--socket"])?;
            cmd.arg(&socket);
            let mut proc = ChildProc::spawn(cmd, "relay-server")?;
            proc.expect("ready", std::time::Duration::from_secs(10))
                .await?;
            let pid = proc.pid();
            Ok(Instance::new(
                socket.to_string_lossy().into_owned(),
                pid,
                vec![proc],
                dir,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_headers_round_trip() {
        let h = frame_header(KIND_CALL, 64).unwrap();
        assert_eq!(parse_frame_header(&h), (KIND_CALL, 64));
        let h = frame_header(KIND_COUNT, 0).unwrap();
        assert_eq!(parse_frame_header(&h), (KIND_COUNT, 0));
        assert!(frame_header(KIND_CALL, u32::MAX as usize).is_err());
    }

    #[test]
    fn hello_layout() {
        let h = hello(ROLE_CLIENT, 0x0102);
        assert_eq!(h[0], ROLE_CLIENT);
        assert_eq!(&h[1..8], &[0; 7]);
        assert_eq!(u64::from_le_bytes(h[8..].try_into().unwrap()), 0x0102);
    }
}
