//! The protocol rules of what this connection sends and agrees to: the
//! HELLO it opens with, how it reads the bus's answer to it, the frame
//! limits it reads with afterwards, and the limits every outgoing frame is
//! checked against before it is queued (so an oversized frame fails the
//! sender instead of the connection).
//!
//! It must not know about sockets or queues.

use pbus_proto::frame::FrameLimits;
use pbus_proto::v1::{Feature, Header, Hello, Limits, MessageKind, Welcome};
use pbus_proto::PROTOCOL_VERSION;
use prost::{Message, Name};

use crate::Error;

/// Frame limits before the bus announced its own: enough for any WELCOME.
pub(crate) const HANDSHAKE_FRAME_LIMITS: FrameLimits = FrameLimits {
    max_frame_bytes: 1 << 20,
    max_header_bytes: 64 << 10,
};

/// How much larger than the announced limits a frame from the bus may be:
/// the bus stamps the sender's identity into headers, so what it forwards
/// is a little larger than what it accepts from senders.
const STAMP_ALLOWANCE: u32 = 64 << 10;

/// The HELLO frame (header and body) asking for the given features.
pub(crate) fn hello_frame(
    client_name: String,
    fd_passing: bool,
    memfd_payloads: bool,
) -> (Header, Vec<u8>) {
    let mut features = 0;
    if fd_passing {
        features |= Feature::FdPassing as u32;
    }
    if memfd_payloads {
        features |= Feature::Memfd as u32;
    }
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        features,
        client_name,
    };
    let header = Header {
        kind: MessageKind::Hello as i32,
        payload_type: Hello::full_name(),
        ..Header::default()
    };
    (header, hello.encode_to_vec())
}

/// Reads the bus's first frame, its answer to HELLO: a WELCOME, or an
/// ERROR saying why the bus refused the connection (a limit, the policy).
pub(crate) fn answer_to_hello(header: Header, body: &[u8]) -> Result<Welcome, Error> {
    match MessageKind::try_from(header.kind) {
        Ok(MessageKind::Welcome) => {
            Welcome::decode(body).map_err(|e| Error::Protocol(format!("bad WELCOME: {e}")))
        }
        Ok(MessageKind::Error) => Err(Error::from_wire(header.error.unwrap_or_default())),
        _ => Err(Error::Protocol(
            "the bus answered HELLO with something else".into(),
        )),
    }
}

/// The limits to read frames from the bus with, once it announced `limits`.
pub(crate) fn inbound_frame_limits(limits: &Limits) -> FrameLimits {
    FrameLimits {
        max_frame_bytes: limits.max_frame_bytes.saturating_add(STAMP_ALLOWANCE),
        max_header_bytes: limits.max_header_bytes.saturating_add(STAMP_ALLOWANCE),
    }
}

/// Refuses a frame that would exceed a limit the bus announced: its
/// encoded size, its fds, its memfd payloads.
pub(crate) fn check_outgoing_limits(
    limits: &Limits,
    header: &Header,
    body_len: usize,
    fd_count: usize,
) -> Result<(), Error> {
    let checks = [
        (
            "frame",
            "max_frame_bytes",
            pbus_proto::frame::encoded_frame_len(header, body_len) as u64,
            u64::from(limits.max_frame_bytes),
        ),
        (
            "fd count",
            "max_fds_per_message",
            fd_count as u64,
            u64::from(limits.max_fds_per_message),
        ),
        (
            "memfd count",
            "max_memfds_per_message",
            header.memfds.len() as u64,
            u64::from(limits.max_memfds_per_message),
        ),
    ];
    for (what, limit, value, max) in checks {
        if value > max {
            return Err(Error::TooLarge {
                what,
                limit,
                value,
                max,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use pbus_proto::v1::{ErrorCode, ErrorInfo, MemfdRef};

    use super::*;

    fn limits() -> Limits {
        Limits {
            max_frame_bytes: 1024,
            max_header_bytes: 256,
            max_fds_per_message: 2,
            max_memfds_per_message: 1,
            ..Limits::default()
        }
    }

    #[test]
    fn hello_asks_for_the_features_chosen() {
        let (header, body) = hello_frame("me".into(), true, false);
        assert_eq!(header.kind, MessageKind::Hello as i32);
        assert_eq!(header.payload_type, Hello::full_name());
        let hello = Hello::decode(body.as_slice()).unwrap();
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        assert_eq!(hello.client_name, "me");
        assert_eq!(hello.features, Feature::FdPassing as u32);
        let (_, body) = hello_frame(String::new(), false, true);
        assert_eq!(
            Hello::decode(body.as_slice()).unwrap().features,
            Feature::Memfd as u32
        );
    }

    #[test]
    fn the_answer_to_hello_is_a_welcome_or_the_refusal() {
        let welcome = Welcome {
            unique_name: ":1.9".into(),
            ..Welcome::default()
        };
        let header = Header {
            kind: MessageKind::Welcome as i32,
            ..Header::default()
        };
        assert_eq!(
            answer_to_hello(header.clone(), &welcome.encode_to_vec()).unwrap(),
            welcome
        );
        assert!(matches!(
            answer_to_hello(header, &[0xff]),
            Err(Error::Protocol(why)) if why.starts_with("bad WELCOME")
        ));
        let refusal = Header {
            kind: MessageKind::Error as i32,
            error: Some(ErrorInfo {
                code: ErrorCode::LimitsExceeded as i32,
                name: "org.pbus.Error.LimitsExceeded".into(),
                message: "too many connections".into(),
                detail: "max_connections".into(),
            }),
            ..Header::default()
        };
        let error = answer_to_hello(refusal, b"").unwrap_err();
        assert_eq!(error.code(), Some(ErrorCode::LimitsExceeded));
        assert_eq!(error.detail(), Some("max_connections"));
        let other = Header {
            kind: MessageKind::Signal as i32,
            ..Header::default()
        };
        assert!(matches!(
            answer_to_hello(other, b""),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn frames_from_the_bus_may_exceed_the_limits_by_the_stamp() {
        let frame = inbound_frame_limits(&limits());
        assert_eq!(frame.max_frame_bytes, 1024 + STAMP_ALLOWANCE);
        assert_eq!(frame.max_header_bytes, 256 + STAMP_ALLOWANCE);
        let huge = Limits {
            max_frame_bytes: u32::MAX,
            ..limits()
        };
        assert_eq!(inbound_frame_limits(&huge).max_frame_bytes, u32::MAX);
    }

    #[test]
    fn outgoing_frames_are_checked_against_each_limit() {
        let header = Header::default();
        assert!(check_outgoing_limits(&limits(), &header, 100, 2).is_ok());
        let too_large = |result: Result<(), Error>| match result {
            Err(Error::TooLarge { limit, .. }) => limit,
            other => panic!("expected TooLarge, got {other:?}"),
        };
        assert_eq!(
            too_large(check_outgoing_limits(&limits(), &header, 1024, 0)),
            "max_frame_bytes"
        );
        assert_eq!(
            too_large(check_outgoing_limits(&limits(), &header, 0, 3)),
            "max_fds_per_message"
        );
        let two_memfds = Header {
            memfds: vec![MemfdRef::default(), MemfdRef::default()],
            ..Header::default()
        };
        assert_eq!(
            too_large(check_outgoing_limits(&limits(), &two_memfds, 0, 2)),
            "max_memfds_per_message"
        );
    }
}
