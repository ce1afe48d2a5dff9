//! Reading an encoded `Header` in place, and re-stamping its sender,
//! without allocating or re-encoding: the daemon's per-message path.
//!
//! [`HeaderView::parse`] walks the protobuf fields of an encoded header
//! once, borrowing its strings, and refuses exactly what prost's decoder
//! would refuse (bad varints, truncated fields, wrong wire types for known
//! fields, invalid UTF-8, malformed nested messages), so a header the daemon
//! forwards always decodes at the receiver. [`write_stamped`] then copies
//! every field except `sender` verbatim and appends the daemon's own
//! `sender` field: the only re-encoding a routed message needs.

use prost::Message;

use crate::v1::{ErrorInfo, MemfdRef, SenderInfo};

/// Field numbers of `pbus.v1.Header`.
mod field {
    pub const KIND: u32 = 1;
    pub const SERIAL: u32 = 2;
    pub const REPLY_SERIAL: u32 = 3;
    pub const DESTINATION: u32 = 4;
    pub const PATH: u32 = 5;
    pub const MEMBER: u32 = 6;
    pub const PAYLOAD_TYPE: u32 = 7;
    pub const FLAGS: u32 = 8;
    pub const TIMEOUT_MS: u32 = 9;
    pub const ARGS: u32 = 10;
    pub const MEMFDS: u32 = 11;
    pub const BODY_IN_MEMFD: u32 = 12;
    pub const ERROR: u32 = 13;
    pub const SENDER: u32 = 14;
}

const WIRE_VARINT: u32 = 0;
const WIRE_I64: u32 = 1;
const WIRE_LEN: u32 = 2;
const WIRE_I32: u32 = 5;

/// Why a header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed header: {0}")]
pub struct HeaderError(pub &'static str);

/// The fields of an encoded header, borrowed from it.
#[derive(Debug, Clone, Default)]
pub struct HeaderView<'a> {
    /// The encoded header this view reads.
    pub raw: &'a [u8],
    /// `MessageKind` value.
    pub kind: i32,
    /// Sender's serial.
    pub serial: u64,
    /// Serial answered by a reply.
    pub reply_serial: u64,
    /// Destination name (may be empty).
    pub destination: &'a str,
    /// Object path (may be empty).
    pub path: &'a str,
    /// Method or signal name.
    pub member: &'a str,
    /// Protobuf type of the body.
    pub payload_type: &'a str,
    /// `HeaderFlag` bits.
    pub flags: u32,
    /// Requested reply timeout.
    pub timeout_ms: u32,
    /// Signal arguments.
    pub args: Vec<&'a str>,
    /// Memfd payloads among the fds.
    pub memfds: Vec<MemfdRef>,
    /// The body is in `memfds[0]`.
    pub body_in_memfd: bool,
    /// The `error` field, when present (a reply that is an ERROR).
    pub error: Option<ErrorInfo>,
    /// Bytes of `raw` (tags included) taken by `sender` fields the client
    /// wrote; 0 when it wrote none. Stamping removes them.
    pub sender_bytes: usize,
}

/// Reads a varint at `*at`, advancing it.
fn read_varint(bytes: &[u8], at: &mut usize) -> Result<u64, HeaderError> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).ok_or(HeaderError("truncated varint"))?;
        *at += 1;
        if shift == 63 && byte > 1 {
            return Err(HeaderError("varint overflows 64 bits"));
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(HeaderError("varint longer than 10 bytes"))
}

/// Reads a length-delimited field's payload at `*at`, advancing past it.
fn read_len<'a>(bytes: &'a [u8], at: &mut usize) -> Result<&'a [u8], HeaderError> {
    let len = read_varint(bytes, at)?;
    let len = usize::try_from(len).map_err(|_| HeaderError("length overflows"))?;
    let end = at.checked_add(len).ok_or(HeaderError("length overflows"))?;
    let slice = bytes.get(*at..end).ok_or(HeaderError("truncated field"))?;
    *at = end;
    Ok(slice)
}

/// Skips one field of wire type `wire` at `*at`.
fn skip(bytes: &[u8], wire: u32, at: &mut usize) -> Result<(), HeaderError> {
    match wire {
        WIRE_VARINT => {
            read_varint(bytes, at)?;
        }
        WIRE_I64 => {
            *at = at
                .checked_add(8)
                .filter(|end| *end <= bytes.len())
                .ok_or(HeaderError("truncated field"))?;
        }
        WIRE_LEN => {
            read_len(bytes, at)?;
        }
        WIRE_I32 => {
            *at = at
                .checked_add(4)
                .filter(|end| *end <= bytes.len())
                .ok_or(HeaderError("truncated field"))?;
        }
        // Groups (3, 4) are not proto3; prost refuses them too.
        _ => return Err(HeaderError("unsupported wire type")),
    }
    Ok(())
}

/// Reads the tag at `*at`: (field number, wire type).
fn read_tag(bytes: &[u8], at: &mut usize) -> Result<(u32, u32), HeaderError> {
    let key = read_varint(bytes, at)?;
    let key = u32::try_from(key).map_err(|_| HeaderError("field key overflows"))?;
    let number = key >> 3;
    if number == 0 {
        return Err(HeaderError("field number 0"));
    }
    Ok((number, key & 7))
}

fn expect_wire(actual: u32, expected: u32) -> Result<(), HeaderError> {
    if actual == expected {
        Ok(())
    } else {
        Err(HeaderError("wrong wire type for a known field"))
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, HeaderError> {
    std::str::from_utf8(bytes).map_err(|_| HeaderError("string is not UTF-8"))
}

impl<'a> HeaderView<'a> {
    /// Reads `raw`, an encoded `Header`.
    pub fn parse(raw: &'a [u8]) -> Result<Self, HeaderError> {
        let mut view = HeaderView {
            raw,
            ..HeaderView::default()
        };
        let mut at = 0;
        while at < raw.len() {
            let field_start = at;
            let (number, wire) = read_tag(raw, &mut at)?;
            match number {
                field::KIND => {
                    expect_wire(wire, WIRE_VARINT)?;
                    // int32/enum: prost truncates the varint to 32 bits.
                    view.kind = read_varint(raw, &mut at)? as i32;
                }
                field::SERIAL => {
                    expect_wire(wire, WIRE_VARINT)?;
                    view.serial = read_varint(raw, &mut at)?;
                }
                field::REPLY_SERIAL => {
                    expect_wire(wire, WIRE_VARINT)?;
                    view.reply_serial = read_varint(raw, &mut at)?;
                }
                field::DESTINATION => {
                    expect_wire(wire, WIRE_LEN)?;
                    view.destination = utf8(read_len(raw, &mut at)?)?;
                }
                field::PATH => {
                    expect_wire(wire, WIRE_LEN)?;
                    view.path = utf8(read_len(raw, &mut at)?)?;
                }
                field::MEMBER => {
                    expect_wire(wire, WIRE_LEN)?;
                    view.member = utf8(read_len(raw, &mut at)?)?;
                }
                field::PAYLOAD_TYPE => {
                    expect_wire(wire, WIRE_LEN)?;
                    view.payload_type = utf8(read_len(raw, &mut at)?)?;
                }
                field::FLAGS => {
                    expect_wire(wire, WIRE_VARINT)?;
                    view.flags = read_varint(raw, &mut at)? as u32;
                }
                field::TIMEOUT_MS => {
                    expect_wire(wire, WIRE_VARINT)?;
                    view.timeout_ms = read_varint(raw, &mut at)? as u32;
                }
                field::ARGS => {
                    expect_wire(wire, WIRE_LEN)?;
                    view.args.push(utf8(read_len(raw, &mut at)?)?);
                }
                field::MEMFDS => {
                    expect_wire(wire, WIRE_LEN)?;
                    let bytes = read_len(raw, &mut at)?;
                    let memfd = MemfdRef::decode(bytes)
                        .map_err(|_| HeaderError("malformed memfd entry"))?;
                    view.memfds.push(memfd);
                }
                field::BODY_IN_MEMFD => {
                    expect_wire(wire, WIRE_VARINT)?;
                    view.body_in_memfd = read_varint(raw, &mut at)? != 0;
                }
                field::ERROR => {
                    expect_wire(wire, WIRE_LEN)?;
                    let bytes = read_len(raw, &mut at)?;
                    // Repeated occurrences of a message field merge.
                    let mut error = view.error.take().unwrap_or_default();
                    error
                        .merge(bytes)
                        .map_err(|_| HeaderError("malformed error field"))?;
                    view.error = Some(error);
                }
                field::SENDER => {
                    expect_wire(wire, WIRE_LEN)?;
                    let bytes = read_len(raw, &mut at)?;
                    // Dropped, but still validated so the view refuses what
                    // prost would.
                    SenderInfo::decode(bytes).map_err(|_| HeaderError("malformed sender field"))?;
                    view.sender_bytes += at - field_start;
                }
                _ => skip(raw, wire, &mut at)?,
            }
        }
        Ok(view)
    }
}

/// Encodes `sender` as a complete `Header.sender` field (tag, length,
/// message), ready for [`write_stamped`].
pub fn encode_sender_field(sender: &SenderInfo, out: &mut Vec<u8>) {
    prost::encoding::message::encode(field::SENDER, sender, out);
}

/// Length of `raw` once its `sender` fields are removed and `stamp`
/// (from [`encode_sender_field`]) is appended.
pub fn stamped_len(view: &HeaderView<'_>, stamp: &[u8]) -> usize {
    view.raw.len() - view.sender_bytes + stamp.len()
}

/// Appends the header of `view` to `out` with every `sender` field removed
/// and `stamp` (a complete `sender` field) appended.
pub fn write_stamped(view: &HeaderView<'_>, stamp: &[u8], out: &mut Vec<u8>) {
    if view.sender_bytes != 0 {
        for_each_field(view.raw, |number, bytes| {
            if number != field::SENDER {
                out.extend_from_slice(bytes);
            }
        });
    } else {
        out.extend_from_slice(view.raw);
    }
    out.extend_from_slice(stamp);
}

/// Calls `visit(field number, the field's bytes including its tag)` for
/// every field of a header [`HeaderView::parse`] accepted.
fn for_each_field(raw: &[u8], mut visit: impl FnMut(u32, &[u8])) {
    let mut at = 0;
    while at < raw.len() {
        let start = at;
        let Ok((number, wire)) = read_tag(raw, &mut at) else {
            return;
        };
        if skip(raw, wire, &mut at).is_err() {
            return;
        }
        visit(number, &raw[start..at]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ContainerInfo, Header, MessageKind};

    fn sample() -> Header {
        Header {
            kind: MessageKind::Signal as i32,
            serial: 77,
            reply_serial: 5,
            destination: ":1.9".into(),
            path: "/a/b".into(),
            member: "Changed".into(),
            payload_type: "x.Y".into(),
            flags: 3,
            timeout_ms: 1234,
            args: vec!["one".into(), "".into(), "three".into()],
            memfds: vec![MemfdRef {
                fd_index: 1,
                offset: 2,
                length: 3,
            }],
            body_in_memfd: true,
            error: Some(ErrorInfo {
                code: 4,
                name: "a.B".into(),
                message: "m".into(),
                detail: "d".into(),
            }),
            sender: Some(SenderInfo {
                unique_name: ":1.999".into(),
                uid: 4242,
                gid: 1,
                pid: 1,
                groups: vec![1, 2],
                label: Some("forged".into()),
                container: Some(ContainerInfo {
                    runtime: 2,
                    id: "x".into(),
                    pod_uid: String::new(),
                }),
            }),
        }
    }

    #[test]
    fn the_view_reads_what_prost_reads() {
        let header = sample();
        let raw = header.encode_to_vec();
        let view = HeaderView::parse(&raw).unwrap();
        assert_eq!(view.kind, header.kind);
        assert_eq!(view.serial, 77);
        assert_eq!(view.reply_serial, 5);
        assert_eq!(view.destination, ":1.9");
        assert_eq!(view.path, "/a/b");
        assert_eq!(view.member, "Changed");
        assert_eq!(view.payload_type, "x.Y");
        assert_eq!((view.flags, view.timeout_ms), (3, 1234));
        assert_eq!(view.args, vec!["one", "", "three"]);
        assert_eq!(view.memfds, header.memfds);
        assert!(view.body_in_memfd);
        assert_eq!(view.error, header.error);
        let mut sender_field = Vec::new();
        encode_sender_field(header.sender.as_ref().unwrap(), &mut sender_field);
        assert_eq!(view.sender_bytes, sender_field.len());
    }

    #[test]
    fn stamping_replaces_the_sender_and_keeps_the_rest() {
        let header = sample();
        let raw = header.encode_to_vec();
        let view = HeaderView::parse(&raw).unwrap();
        let real = SenderInfo {
            unique_name: ":1.3".into(),
            uid: 1000,
            gid: 1000,
            pid: 321,
            ..SenderInfo::default()
        };
        let mut stamp = Vec::new();
        encode_sender_field(&real, &mut stamp);
        let mut out = Vec::new();
        write_stamped(&view, &stamp, &mut out);
        assert_eq!(out.len(), stamped_len(&view, &stamp));
        let decoded = Header::decode(out.as_slice()).unwrap();
        let mut expected = header.clone();
        expected.sender = Some(real);
        assert_eq!(decoded, expected);
    }

    #[test]
    fn a_forged_sender_split_in_two_occurrences_is_fully_removed() {
        // Two `sender` fields would merge in prost; both must go.
        let mut raw = Header {
            kind: 3,
            serial: 1,
            ..Header::default()
        }
        .encode_to_vec();
        for forged in [
            SenderInfo {
                uid: 1,
                ..SenderInfo::default()
            },
            SenderInfo {
                label: Some("x".into()),
                ..SenderInfo::default()
            },
        ] {
            encode_sender_field(&forged, &mut raw);
        }
        let view = HeaderView::parse(&raw).unwrap();
        let mut stamp = Vec::new();
        encode_sender_field(&SenderInfo::default(), &mut stamp);
        let mut out = Vec::new();
        write_stamped(&view, &stamp, &mut out);
        assert_eq!(out.len(), stamped_len(&view, &stamp));
        let decoded = Header::decode(out.as_slice()).unwrap();
        assert_eq!(decoded.sender, Some(SenderInfo::default()));
    }

    #[test]
    fn the_view_refuses_what_prost_refuses() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated varint", vec![0x10, 0x80]),
            ("truncated string", vec![0x22, 0x05, b'a']),
            ("bad utf8", vec![0x22, 0x01, 0xff]),
            ("wrong wire type", vec![0x12, 0x01, 0x00]),
            ("field zero", vec![0x00, 0x01]),
            ("group", vec![0x0b]),
            ("bad memfd", vec![0x5a, 0x02, 0x08, 0x80]),
            ("bad sender", vec![0x72, 0x02, 0x10, 0x80]),
        ];
        for (what, bytes) in cases {
            assert!(
                HeaderView::parse(&bytes).is_err(),
                "{what} accepted by the view"
            );
            assert!(
                Header::decode(bytes.as_slice()).is_err(),
                "{what} accepted by prost"
            );
        }
        // Unknown fields are skipped by both.
        let unknown = vec![0xf8, 0x07, 0x01, 0x08, 0x03];
        let view = HeaderView::parse(&unknown).unwrap();
        assert_eq!(view.kind, 3);
        assert_eq!(Header::decode(unknown.as_slice()).unwrap().kind, 3);
    }

    #[test]
    fn later_occurrences_win_like_prost() {
        let mut raw = Header {
            member: "First".into(),
            serial: 1,
            ..Header::default()
        }
        .encode_to_vec();
        raw.extend(
            Header {
                member: "Second".into(),
                serial: 2,
                ..Header::default()
            }
            .encode_to_vec(),
        );
        let view = HeaderView::parse(&raw).unwrap();
        let prost = Header::decode(raw.as_slice()).unwrap();
        assert_eq!(
            (view.member, view.serial),
            (prost.member.as_str(), prost.serial)
        );
    }
}
