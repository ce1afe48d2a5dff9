//! Raw frames built to measure, and the bus's answers checked exactly.
//!
//! * Headers for calls, replies, signals and HELLO, and
//!   [`pad_header`], which grows a header to an exact encoded length (for
//!   testing a size limit at N and N+1 bytes).
//! * [`assert_error`] and [`expect_disconnect`]: the specific error code
//!   and `detail` the bus must answer with.
//! * [`try_connect`]: a raw connection that reports the bus's refusal (the
//!   ERROR frame it sends before closing) instead of failing on it.
//! * [`expect_serials`]: a receiver got exactly the frames that were
//!   accepted, in order.
//! * [`peer_stats`]: one peer's queue and quota use from `GetStats`.

use std::io;
use std::path::Path;
use std::time::Duration;

use pbus::Connection;
use pbus_proto::v1::{
    ErrorCode, ErrorInfo, Feature, Header, Hello, MemfdRef, MessageKind, PeerStats,
};
use pbus_proto::PROTOCOL_VERSION;

use crate::{RawClient, RawError, RawMessage, TIMEOUT};

/// A METHOD_CALL header.
pub fn call_header(serial: u64, destination: &str, member: &str) -> Header {
    Header {
        kind: MessageKind::MethodCall as i32,
        serial,
        destination: destination.to_owned(),
        member: member.to_owned(),
        ..Header::default()
    }
}

/// A SIGNAL header (broadcast when `destination` is empty).
pub fn signal_header(serial: u64, destination: &str, path: &str, member: &str) -> Header {
    Header {
        kind: MessageKind::Signal as i32,
        serial,
        destination: destination.to_owned(),
        path: path.to_owned(),
        member: member.to_owned(),
        ..Header::default()
    }
}

/// A METHOD_RETURN header answering call `reply_serial` of `destination`.
pub fn reply_header(serial: u64, destination: &str, reply_serial: u64) -> Header {
    Header {
        kind: MessageKind::MethodReturn as i32,
        serial,
        reply_serial,
        destination: destination.to_owned(),
        ..Header::default()
    }
}

/// The header and body of a HELLO announcing `protocol_version`,
/// `features` and `client_name`.
pub fn hello(protocol_version: u32, features: u32, client_name: &str) -> (Header, Vec<u8>) {
    use prost::{Message, Name};
    let header = Header {
        kind: MessageKind::Hello as i32,
        payload_type: Hello::full_name(),
        ..Header::default()
    };
    let hello = Hello {
        protocol_version,
        features,
        client_name: client_name.to_owned(),
    };
    (header, hello.encode_to_vec())
}

/// A memfd reference for `Header.memfds`.
pub fn memfd_ref(fd_index: u32, offset: u64, length: u64) -> MemfdRef {
    MemfdRef {
        fd_index,
        offset,
        length,
    }
}

/// Appends string `args` to `header` until its encoded length is exactly
/// `len` bytes. Panics if the header is already longer.
pub fn pad_header(header: &mut Header, len: usize) {
    use prost::Message;
    // Each arg costs one tag byte, one length byte (for up to 127 bytes)
    // and its bytes, so any remainder of two or more can be reached.
    loop {
        let current = header.encoded_len();
        assert!(current <= len, "header is {current} bytes, over {len}");
        let missing = len - current;
        match missing {
            0 => return,
            1 => {
                // Make room: shorten the last arg by one, then retry.
                let last = header.args.last_mut().expect("an arg to shorten");
                assert!(!last.is_empty(), "cannot pad by exactly one byte");
                last.pop();
                header.args.push(String::new());
                let reached = header.encoded_len();
                assert_eq!(reached, len, "padding by one");
                return;
            }
            2..=129 => header.args.push("p".repeat(missing - 2)),
            130..=259 => header.args.push("p".repeat(64)),
            _ => header.args.push("p".repeat(127)),
        }
    }
}

/// Asserts that `frame` is an ERROR with `code` (and `detail`, if given).
pub fn assert_error(frame: &RawMessage, code: ErrorCode, detail: Option<&str>, what: &str) {
    assert_eq!(frame.kind(), MessageKind::Error, "{what}: {frame:?}");
    assert_eq!(frame.error_code(), Some(code), "{what}: {frame:?}");
    if let Some(detail) = detail {
        assert_eq!(
            frame.error().expect("an error").detail,
            detail,
            "{what}: the error names the limit"
        );
    }
}

/// Reads until the bus hangs up; the last frame it sent must be an ERROR
/// with `code` (and `detail`, if given), and everything before it bus
/// signals. Returns that error.
pub async fn expect_disconnect(
    client: &mut RawClient,
    code: ErrorCode,
    detail: Option<&str>,
    what: &str,
) -> ErrorInfo {
    let mut frames = client
        .read_until_closed(TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{what}: not disconnected: {error}"));
    let last = frames
        .pop()
        .unwrap_or_else(|| panic!("{what}: disconnected without an ERROR"));
    assert_error(&last, code, detail, what);
    assert!(
        frames.iter().all(RawMessage::is_bus_signal),
        "{what}: unexpected frames before the refusal: {frames:?}"
    );
    last.header.error.expect("an error")
}

/// Reads frames, bus signals aside, until as many as `expected` came;
/// asserts they are the frames `expected` lists by serial, in order, and
/// that nothing else is waiting after a round trip (naming `what`).
/// Returns them.
pub async fn expect_serials(
    receiver: &mut RawClient,
    expected: &[u64],
    what: &str,
) -> Vec<RawMessage> {
    let mut frames = Vec::new();
    while frames.len() < expected.len() {
        let frame = receiver
            .recv(TIMEOUT)
            .await
            .unwrap_or_else(|error| panic!("{what}: after {} frames: {error}", frames.len()));
        if !frame.is_bus_signal() {
            frames.push(frame);
        }
    }
    let serials: Vec<u64> = frames.iter().map(|frame| frame.header.serial).collect();
    assert_eq!(
        serials, expected,
        "{what}: exactly the accepted frames, in order"
    );
    let extra = receiver.take_delivered().await;
    assert!(
        extra.is_empty(),
        "{what}: refused frames were delivered: {extra:?}"
    );
    frames
}

/// How an attempt to connect ended.
#[derive(Debug)]
pub enum Connected {
    /// The handshake completed.
    Welcome(Box<RawClient>),
    /// The bus refused the connection with this error and closed it.
    Refused(ErrorInfo),
}

impl Connected {
    /// The client; panics (with the refusal) if the bus refused.
    pub fn expect_welcome(self, what: &str) -> RawClient {
        match self {
            Self::Welcome(client) => *client,
            Self::Refused(info) => panic!("{what}: refused: {info:?}"),
        }
    }

    /// The refusal; panics if the handshake completed.
    pub fn expect_refused(self, what: &str) -> ErrorInfo {
        match self {
            Self::Welcome(client) => panic!("{what}: accepted as {}", client.unique_name()),
            Self::Refused(info) => info,
        }
    }
}

/// Connects a raw client and completes the handshake, retrying while the
/// listen backlog is full. A bus that refuses the connection (possibly
/// before it reads our HELLO, so writing it fails) yields its ERROR.
pub async fn try_connect(socket: &Path) -> Connected {
    let mut client = connect_retrying(socket).await;
    let features = Feature::FdPassing as u32 | Feature::Memfd as u32;
    match client.hello(PROTOCOL_VERSION, features).await {
        Ok(_) => Connected::Welcome(Box::new(client)),
        Err(RawError::Refused(info)) => Connected::Refused(info),
        Err(RawError::Io(error)) if is_hangup(&error) => match client.recv(TIMEOUT).await {
            Ok(frame) if frame.kind() == MessageKind::Error => {
                Connected::Refused(frame.header.error.unwrap_or_default())
            }
            other => panic!("HELLO could not be written ({error}), then {other:?}"),
        },
        Err(error) => panic!("handshake failed: {error}"),
    }
}

/// Connects without a handshake, retrying while the listen backlog is
/// full (a non-blocking connect then fails with EAGAIN).
pub async fn connect_retrying(socket: &Path) -> RawClient {
    let mut attempts = 0u32;
    loop {
        match RawClient::connect(socket).await {
            Ok(client) => return client,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock && attempts < 5000 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(error) => panic!("cannot connect to {}: {error}", socket.display()),
        }
    }
}

fn is_hangup(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// The `GetStats` entry of the peer `unique_name`, as `observer` sees it.
pub async fn peer_stats(observer: &Connection, unique_name: &str) -> PeerStats {
    let stats = observer.stats().await.expect("GetStats");
    stats
        .peers
        .into_iter()
        .find(|peer| peer.unique_name == unique_name)
        .unwrap_or_else(|| panic!("GetStats does not list {unique_name}"))
}

/// What uid `uid` has queued for a peer, from its stats: `(messages,
/// bytes, fds)`; zeros when it has nothing queued.
pub fn queued_by(stats: &PeerStats, uid: u32) -> (u64, u64, u64) {
    stats
        .queued_by_uid
        .iter()
        .find(|usage| usage.uid == uid)
        .map_or((0, 0, 0), |usage| (usage.messages, usage.bytes, usage.fds))
}
