//! The native face: pbus's own framing (see `pbus.proto` and
//! [`pbus_proto::frame`]). A frame is a prefix, a protobuf `Header` and the
//! body; a forwarded frame keeps the sender's header bytes with only its
//! `sender` field replaced, so routing never decodes and re-encodes a
//! header.

use std::os::fd::OwnedFd;

use pbus_proto::frame::RawFrame;
use pbus_proto::header::HeaderView;
use pbus_proto::v1::{Header, Hello, MessageKind, SenderInfo};
use prost::Message;

use crate::bus::BusError;

/// Reads a connection's first frame, which must be a HELLO without fds.
pub fn parse_hello(frame: &RawFrame<'_, OwnedFd>) -> Result<Hello, BusError> {
    let header = Header::decode(frame.header)
        .map_err(|e| BusError::HandshakeFailed(format!("undecodable first frame: {e}")))?;
    if header.kind != MessageKind::Hello as i32 {
        return Err(BusError::HandshakeFailed(
            "the first frame must be HELLO".into(),
        ));
    }
    if !frame.fds.is_empty() {
        return Err(BusError::HandshakeFailed("HELLO carries no fds".into()));
    }
    Hello::decode(frame.body)
        .map_err(|e| BusError::HandshakeFailed(format!("undecodable HELLO: {e}")))
}

/// The ERROR frame telling a peer that has no queue yet (refused before
/// or during the handshake) why.
pub fn refusal_frame(error: &BusError) -> Vec<u8> {
    let header = Header {
        kind: MessageKind::Error as i32,
        error: Some(error.to_wire()),
        ..Header::default()
    };
    encode_built(&header, &[], 0)
}

/// A header as a native peer wrote it, read in place (no field is copied
/// out); the error says why it does not decode.
pub fn read_header(bytes: &[u8]) -> Result<HeaderView<'_>, String> {
    HeaderView::parse(bytes).map_err(|error| format!("undecodable header: {error}"))
}

/// The encoded `sender` field that replaces a forwarded header's.
pub fn sender_stamp(sender: &SenderInfo) -> Vec<u8> {
    let mut stamp = Vec::new();
    pbus_proto::header::encode_sender_field(sender, &mut stamp);
    stamp
}

/// The length of `header`'s frame with `stamp` as its sender and a body of
/// `body_len` bytes.
pub fn forwarded_len(header: &HeaderView<'_>, stamp: &[u8], body_len: usize) -> usize {
    pbus_proto::frame::PREFIX_LEN + pbus_proto::header::stamped_len(header, stamp) + body_len
}

/// `header`'s frame with `stamp` as its sender, encoded.
pub fn encode_forwarded(
    header: &HeaderView<'_>,
    stamp: &[u8],
    body: &[u8],
    fd_count: u16,
) -> Vec<u8> {
    let mut bytes = Vec::new();
    pbus_proto::frame::encode_stamped_frame(&mut bytes, header, stamp, body, fd_count);
    bytes
}

/// A frame the bus built, encoded.
pub fn encode_built(header: &Header, body: &[u8], fd_count: u16) -> Vec<u8> {
    let mut bytes = Vec::new();
    pbus_proto::frame::encode_frame(&mut bytes, header, body, fd_count);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(name: &str) -> SenderInfo {
        SenderInfo {
            unique_name: name.to_owned(),
            uid: 1000,
            pid: 42,
            ..SenderInfo::default()
        }
    }

    #[test]
    fn a_forwarded_frame_keeps_the_header_and_replaces_only_the_sender() {
        let header = Header {
            kind: pbus_proto::v1::MessageKind::Signal as i32,
            serial: 7,
            path: "/a".into(),
            member: "Changed".into(),
            sender: Some(sender(":1.99")),
            ..Header::default()
        };
        let raw = header.encode_to_vec();
        let view = read_header(&raw).expect("parses");
        let stamp = sender_stamp(&sender(":1.3"));
        let frame = encode_forwarded(&view, &stamp, b"body", 0);
        assert_eq!(frame.len(), forwarded_len(&view, &stamp, 4));
        let prefix_len = pbus_proto::frame::PREFIX_LEN;
        let header_len = frame.len() - prefix_len - 4;
        let decoded = Header::decode(&frame[prefix_len..prefix_len + header_len]).expect("decodes");
        assert_eq!(decoded.sender, Some(sender(":1.3")));
        assert_eq!(
            Header {
                sender: None,
                ..decoded
            },
            Header {
                sender: None,
                ..header
            }
        );
        assert_eq!(&frame[frame.len() - 4..], b"body");
    }

    #[test]
    fn a_built_frame_is_as_long_as_announced() {
        let header = Header {
            kind: pbus_proto::v1::MessageKind::Error as i32,
            reply_serial: 3,
            ..Header::default()
        };
        let frame = encode_built(&header, b"xy", 0);
        assert_eq!(
            frame.len(),
            super::super::Face::Native.built_len(&header, 2)
        );
    }

    #[test]
    fn an_undecodable_header_says_so() {
        let error = read_header(&[0xff, 0xff, 0xff]).expect_err("garbage");
        assert!(error.starts_with("undecodable header"), "{error}");
    }
}
