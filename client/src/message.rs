//! Messages as the application sees them: [`Incoming`] (a received call,
//! reply or signal with its stamped sender, body, fds and memfds),
//! [`Body`] (inline bytes or a read-only memfd mapping), and [`Reply`]
//! (what a raw method handler answers).

use std::os::fd::OwnedFd;

use bytes::Bytes;
use pbus_proto::v1::{Header, MemfdRef, SenderInfo};
use pbus_sys::memfd::ReadOnlyMapping;
use prost::{Message, Name};

use crate::memfd::SealedMemfd;
use crate::Error;

/// The payload bytes of a received message.
#[derive(Debug)]
pub struct Body {
    bytes: BodyBytes,
}

#[derive(Debug)]
enum BodyBytes {
    Inline(Bytes),
    Memfd {
        mapping: ReadOnlyMapping,
        memfd: SealedMemfd,
    },
}

impl Body {
    pub(crate) fn inline(bytes: Bytes) -> Self {
        Self {
            bytes: BodyBytes::Inline(bytes),
        }
    }

    pub(crate) fn memfd(memfd: SealedMemfd) -> Result<Self, Error> {
        let mapping = memfd.map()?;
        Ok(Self {
            bytes: BodyBytes::Memfd { mapping, memfd },
        })
    }

    /// The bytes (for a memfd body, a read-only mapping of it).
    pub fn as_bytes(&self) -> &[u8] {
        match &self.bytes {
            BodyBytes::Inline(bytes) => bytes,
            BodyBytes::Memfd { mapping, .. } => mapping,
        }
    }

    /// True if the body arrived in a sealed memfd.
    pub fn is_memfd(&self) -> bool {
        matches!(self.bytes, BodyBytes::Memfd { .. })
    }

    /// Takes the memfd a body arrived in, so it can be kept or passed on
    /// without copying. `None` for inline bodies.
    pub fn into_memfd(self) -> Option<SealedMemfd> {
        match self.bytes {
            BodyBytes::Inline(_) => None,
            BodyBytes::Memfd { memfd, .. } => Some(memfd),
        }
    }
}

impl std::ops::Deref for Body {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// A received method call, reply or signal.
#[derive(Debug)]
pub struct Incoming {
    pub(crate) header: Header,
    pub(crate) body: Body,
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) memfds: Vec<SealedMemfd>,
}

impl Incoming {
    /// Splits the frame's fds into the body memfd, extra memfd payloads and
    /// plain fds, checking each memfd.
    pub(crate) fn from_parts(
        mut header: Header,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<Self, Error> {
        let mut slots: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut memfds = Vec::with_capacity(header.memfds.len());
        for memfd in std::mem::take(&mut header.memfds) {
            let fd = slots
                .get_mut(memfd.fd_index as usize)
                .and_then(Option::take)
                .ok_or_else(|| {
                    Error::Protocol(format!("memfd index {} has no fd", memfd.fd_index))
                })?;
            memfds.push(SealedMemfd::received(fd, memfd.offset, memfd.length)?);
        }
        let body = if header.body_in_memfd {
            if memfds.is_empty() {
                return Err(Error::Protocol("body_in_memfd without a memfd".into()));
            }
            Body::memfd(memfds.remove(0))?
        } else {
            Body::inline(Bytes::copy_from_slice(body))
        };
        Ok(Self {
            header,
            body,
            fds: slots.into_iter().flatten().collect(),
            memfds,
        })
    }

    /// Who sent it, as stamped by the bus (never what the sender claimed).
    pub fn sender(&self) -> &SenderInfo {
        static EMPTY: SenderInfo = SenderInfo {
            unique_name: String::new(),
            uid: 0,
            gid: 0,
            pid: 0,
            groups: Vec::new(),
            label: None,
            container: None,
        };
        self.header.sender.as_ref().unwrap_or(&EMPTY)
    }

    /// The full header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Method or signal name.
    pub fn member(&self) -> &str {
        &self.header.member
    }

    /// Object path or topic.
    pub fn path(&self) -> &str {
        &self.header.path
    }

    /// The sender's serial.
    pub fn serial(&self) -> u64 {
        self.header.serial
    }

    /// Signal arguments exposed to match rules.
    pub fn args(&self) -> &[String] {
        &self.header.args
    }

    /// Protobuf type name of the body.
    pub fn payload_type(&self) -> &str {
        &self.header.payload_type
    }

    /// The body bytes.
    pub fn body(&self) -> &Body {
        &self.body
    }

    /// Takes the body (e.g. to keep its memfd).
    pub fn into_body(self) -> Body {
        self.body
    }

    /// Decodes the body as `M`, checking the declared type name.
    pub fn decode<M: Message + Default + Name>(&self) -> Result<M, Error> {
        decode_payload(&self.header.payload_type, self.body.as_bytes())
    }

    /// The plain fds that came with the message (memfd payloads excluded).
    pub fn fds(&self) -> &[OwnedFd] {
        &self.fds
    }

    /// Takes the plain fds.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }

    /// Extra memfd payloads attached with [`Outgoing::memfd`].
    pub fn memfds(&self) -> &[SealedMemfd] {
        &self.memfds
    }

    /// Takes the extra memfd payloads.
    pub fn take_memfds(&mut self) -> Vec<SealedMemfd> {
        std::mem::take(&mut self.memfds)
    }
}

/// Decodes `bytes` as `M` if `type_name` is empty or names `M`.
pub(crate) fn decode_payload<M: Message + Default + Name>(
    type_name: &str,
    bytes: &[u8],
) -> Result<M, Error> {
    let expected = M::full_name();
    if !type_name.is_empty() && type_name != expected {
        return Err(Error::UnexpectedType {
            expected,
            actual: type_name.to_owned(),
        });
    }
    M::decode(bytes).map_err(|source| Error::Decode {
        type_name: expected,
        source,
    })
}

/// A message body to send, with optional fds and memfd payloads.
#[derive(Debug, Default)]
pub struct Outgoing {
    pub(crate) payload_type: String,
    pub(crate) body: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) memfds: Vec<SealedMemfd>,
    /// A body already in a sealed memfd (zero-copy send).
    pub(crate) body_memfd: Option<SealedMemfd>,
}

impl Outgoing {
    /// A body holding the encoded `message`.
    pub fn new<M: Message + Name>(message: &M) -> Self {
        Self {
            payload_type: M::full_name(),
            body: message.encode_to_vec(),
            ..Self::default()
        }
    }

    /// Raw bytes with a declared type name (may be empty).
    pub fn raw(payload_type: impl Into<String>, body: Vec<u8>) -> Self {
        Self {
            payload_type: payload_type.into(),
            body,
            ..Self::default()
        }
    }

    /// A body that already sits in a sealed memfd: it is sent as is,
    /// whatever its size, without copying.
    pub fn from_memfd(payload_type: impl Into<String>, memfd: SealedMemfd) -> Self {
        Self {
            payload_type: payload_type.into(),
            body_memfd: Some(memfd),
            ..Self::default()
        }
    }

    /// Attaches an fd (a pipe, socket, file...).
    pub fn fd(mut self, fd: OwnedFd) -> Self {
        self.fds.push(fd);
        self
    }

    /// Attaches several fds.
    pub fn fds(mut self, fds: impl IntoIterator<Item = OwnedFd>) -> Self {
        self.fds.extend(fds);
        self
    }

    /// Attaches an extra sealed memfd payload.
    pub fn memfd(mut self, memfd: SealedMemfd) -> Self {
        self.memfds.push(memfd);
        self
    }

    /// Sets `header`'s payload fields (type, memfd refs, body_in_memfd,
    /// whatever they held before) and returns the body and the fds in wire
    /// order: body memfd, extra memfds, plain fds.
    pub(crate) fn into_wire(
        self,
        header: &mut Header,
        memfd_threshold: usize,
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
        let Outgoing {
            payload_type,
            mut body,
            fds,
            memfds,
            mut body_memfd,
        } = self;
        header.payload_type = payload_type;
        if body_memfd.is_none() && body.len() > memfd_threshold {
            body_memfd = Some(SealedMemfd::from_bytes(&body)?);
            body = Vec::new();
        }
        let mut wire_fds = Vec::with_capacity(fds.len() + memfds.len() + 1);
        header.body_in_memfd = body_memfd.is_some();
        header.memfds.clear();
        for memfd in body_memfd.into_iter().chain(memfds) {
            header.memfds.push(MemfdRef {
                fd_index: wire_fds.len() as u32,
                offset: memfd.offset(),
                length: memfd.len(),
            });
            wire_fds.push(memfd.into_fd());
        }
        wire_fds.extend(fds);
        Ok((body, wire_fds))
    }
}

/// What a raw method handler answers.
pub type Reply = Outgoing;

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd_ref(fd_index: u32, length: u64) -> MemfdRef {
        MemfdRef {
            fd_index,
            offset: 0,
            length,
        }
    }

    fn sealed(bytes: &[u8]) -> OwnedFd {
        SealedMemfd::from_bytes(bytes).unwrap().into_fd()
    }

    fn protocol_error(result: Result<Incoming, Error>) -> String {
        match result {
            Err(Error::Protocol(message)) => message,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn memfds_body_and_plain_fds_are_told_apart() {
        let plain = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let header = Header {
            memfds: vec![memfd_ref(1, 4), memfd_ref(2, 5)],
            body_in_memfd: true,
            ..Header::default()
        };
        let fds = vec![plain, sealed(b"body"), sealed(b"extra")];
        let incoming = Incoming::from_parts(header, b"", fds).unwrap();
        assert!(incoming.body().is_memfd());
        assert_eq!(incoming.body().as_bytes(), b"body");
        assert_eq!(incoming.memfds().len(), 1);
        assert_eq!(&incoming.memfds()[0].map().unwrap()[..], b"extra");
        assert_eq!(incoming.fds().len(), 1);
        assert!(incoming.header().memfds.is_empty());
    }

    #[test]
    fn a_memfd_ref_needs_an_fd_of_its_own() {
        let header = Header {
            memfds: vec![memfd_ref(1, 0)],
            ..Header::default()
        };
        let error = protocol_error(Incoming::from_parts(header, b"", vec![sealed(b"x")]));
        assert_eq!(error, "memfd index 1 has no fd");
        // One fd cannot be two payloads.
        let header = Header {
            memfds: vec![memfd_ref(0, 1), memfd_ref(0, 1)],
            ..Header::default()
        };
        let error = protocol_error(Incoming::from_parts(header, b"", vec![sealed(b"x")]));
        assert_eq!(error, "memfd index 0 has no fd");
    }

    #[test]
    fn a_body_in_a_memfd_needs_a_memfd() {
        let header = Header {
            body_in_memfd: true,
            ..Header::default()
        };
        let error = protocol_error(Incoming::from_parts(header, b"", Vec::new()));
        assert_eq!(error, "body_in_memfd without a memfd");
    }

    #[test]
    fn received_memfds_must_be_sealed_and_in_range() {
        let unsealed = pbus_sys::memfd::memfd_create("unsealed").unwrap();
        let header = Header {
            memfds: vec![memfd_ref(0, 0)],
            ..Header::default()
        };
        assert!(matches!(
            Incoming::from_parts(header.clone(), b"", vec![unsealed]),
            Err(Error::Memfd(message)) if message.contains("memfd is missing SEAL_SHRINK")
        ));
        let header = Header {
            memfds: vec![memfd_ref(0, 5)],
            ..header
        };
        assert!(matches!(
            Incoming::from_parts(header, b"", vec![sealed(b"0123")]),
            Err(Error::Memfd(message)) if message.contains("exceeds its size of 4 bytes")
        ));
    }

    #[test]
    fn into_wire_replaces_the_payload_fields_it_sets() {
        let mut header = Header {
            payload_type: "stale.Type".into(),
            memfds: vec![memfd_ref(0, 1)],
            body_in_memfd: true,
            ..Header::default()
        };
        let (body, fds) = Outgoing::raw("now.Type", b"abc".to_vec())
            .into_wire(&mut header, 1 << 10)
            .unwrap();
        assert_eq!((body.as_slice(), fds.len()), (&b"abc"[..], 0));
        assert_eq!(header.payload_type, "now.Type");
        assert!(header.memfds.is_empty());
        assert!(!header.body_in_memfd);
        // Over the threshold the body moves to a memfd, listed first.
        let (body, fds) = Outgoing::raw("", vec![1u8; 11])
            .memfd(SealedMemfd::from_bytes(b"extra").unwrap())
            .into_wire(&mut header, 10)
            .unwrap();
        assert!(body.is_empty());
        assert_eq!(fds.len(), 2);
        assert!(header.body_in_memfd);
        assert_eq!(header.memfds, vec![memfd_ref(0, 11), memfd_ref(1, 5)]);
    }
}
