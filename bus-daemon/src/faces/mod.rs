//! Faces: the wire protocols a peer may speak to the bus. The routing core
//! ([`crate::bus`]) decides who receives what, with which sender stamp, and
//! what is refused; a face turns those decisions into its own frames, and a
//! frame read from a peer into the header view the core routes.
//!
//! Today there is one face, the native protobuf framing ([`native`]). A face
//! owns, for the peers that speak it:
//!
//! * how a sender is stamped ([`Face::sender_stamp`]): the bytes that
//!   replace whatever the sender wrote about itself;
//! * forwarding a peer's message ([`Face::forwarded_len`],
//!   [`Face::push_forwarded`], [`Face::encode_forwarded`]): the sender's own
//!   encoding kept, only the stamp replaced;
//! * frames the bus builds itself from a [`Header`] (errors, driver replies,
//!   NameOwnerChanged, monitor copies): [`Face::built_len`],
//!   [`Face::push_built`], [`Face::encode_built`];
//! * reading an inbound header ([`native::read_header`]).
//!
//! The core asks the receiver's face for every frame it queues, so the
//! length it charges against quotas is always the length of what is
//! written.

pub mod native;

use std::os::fd::OwnedFd;

use pbus_proto::frame::OutQueue;
use pbus_proto::header::HeaderView;
use pbus_proto::v1::{Header, SenderInfo};

/// The wire protocol a peer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Face {
    /// pbus's own framing: a prefix, a protobuf `Header`, the body.
    #[default]
    Native,
}

impl Face {
    /// The face's name, for logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
        }
    }

    /// The stamp written on what `sender` sends to peers of this face.
    pub fn sender_stamp(self, sender: &SenderInfo) -> Vec<u8> {
        match self {
            Self::Native => native::sender_stamp(sender),
        }
    }

    /// The length of `header`'s message forwarded with `stamp` and a body
    /// of `body_len` bytes.
    pub fn forwarded_len(self, header: &HeaderView<'_>, stamp: &[u8], body_len: usize) -> usize {
        match self {
            Self::Native => native::forwarded_len(header, stamp, body_len),
        }
    }

    /// Queues a peer's message on `outbox`, stamped with `stamp`; returns
    /// the stream offset past it.
    pub fn push_forwarded<T>(
        self,
        outbox: &mut OutQueue<OwnedFd, T>,
        header: &HeaderView<'_>,
        stamp: &[u8],
        (body, fds): (&[u8], Vec<OwnedFd>),
        origin: Option<T>,
    ) -> u64 {
        match self {
            Self::Native => outbox.push_stamped_from(header, stamp, body, fds, origin),
        }
    }

    /// A peer's message stamped with `stamp`, encoded once to be queued for
    /// many receivers (a broadcast) with [`OutQueue::push_encoded`].
    pub fn encode_forwarded(
        self,
        header: &HeaderView<'_>,
        stamp: &[u8],
        body: &[u8],
        fd_count: u16,
    ) -> Vec<u8> {
        match self {
            Self::Native => native::encode_forwarded(header, stamp, body, fd_count),
        }
    }

    /// The length of a frame the bus built from `header`.
    pub fn built_len(self, header: &Header, body_len: usize) -> usize {
        match self {
            Self::Native => pbus_proto::frame::encoded_frame_len(header, body_len),
        }
    }

    /// Queues a frame the bus built from `header`; returns the stream
    /// offset past it.
    pub fn push_built<T>(
        self,
        outbox: &mut OutQueue<OwnedFd, T>,
        header: &Header,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> u64 {
        match self {
            Self::Native => outbox.push(header, body, fds),
        }
    }

    /// A frame the bus built from `header`, encoded once for many receivers.
    pub fn encode_built(self, header: &Header, body: &[u8], fd_count: u16) -> Vec<u8> {
        match self {
            Self::Native => native::encode_built(header, body, fd_count),
        }
    }
}
