//! Framing, without I/O: the 12-byte prefix, frame encoding, a reader that
//! splits a received byte stream into frames and ties passed fds to the frame
//! they belong to, and an outgoing queue that batches frames for sendmsg.
//!
//! Nothing here touches a socket. Readers are fed what recvmsg returned;
//! queues are flushed through a caller-supplied send function. The fd type is
//! generic so tests can use plain integers.
//!
//! # How fds are tied to frames
//!
//! The rule is the one a receiver can check. A sender passes a frame's fds
//! with a sendmsg that carries that frame's first byte. The pbus client and
//! daemon ([`OutQueue`]) go further and start that sendmsg with the frame,
//! which is the placement every receiver accepts, whatever its buffer size.
//!
//! What a receiver sees (net/unix/af_unix.c, `unix_stream_read_generic`):
//! the fds of a sendmsg are attached to the first skb of its data; a
//! recvmsg detaches them when it consumes the first bytes of that skb and
//! stops right after that skb, but the same recvmsg may already have copied
//! bytes of earlier skbs that carried no fds. So a receiver learns where an
//! fd-carrying skb *ends*, not where it begins: "the sendmsg that starts
//! with this frame" cannot be told apart from "an earlier sendmsg joined
//! into the same read" without one recvmsg per frame, which would double
//! the syscalls on the hot path. dbus-broker has the same model (fds belong
//! to the hunk that carried them).
//!
//! So the receiver ties the fd set of one recvmsg, which covers the stream
//! range `[start, end)` that recvmsg returned, to the first frame declaring
//! fds whose first byte lies in that range; frames before it in the range
//! must declare none. Protocol violations ([`FrameError`]):
//!
//! * a count that differs from the frame's `fd_count` (including a frame
//!   declaring fds whose first byte lies in no read that brought any);
//! * two SCM_RIGHTS sets in one read, or MSG_CTRUNC ([`check_ancillary`]);
//! * a set that no frame claims by the end of its range (fds sent with
//!   frames that declare none, or with no frame at all).
//!
//! A sender that puts other frames before the fd-carrying one in the same
//! sendmsg is accepted as long as the receiver's read reaches that frame's
//! first byte; a large sendmsg is split into several skbs and a read stops
//! at the end of the receiver's buffer, so only "the sendmsg starts with
//! the frame" is safe everywhere.

use std::collections::VecDeque;
use std::io;

use prost::Message;

use crate::v1::Header;

/// Bytes in the fixed frame prefix.
pub const PREFIX_LEN: usize = 12;

/// The kernel's limit on fds per sendmsg (`SCM_MAX_FD`); no frame can carry more.
pub const HARD_MAX_FDS_PER_FRAME: u16 = 253;

/// The fixed part at the start of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePrefix {
    /// Length of the protobuf `Header`.
    pub header_len: u32,
    /// Length of the body that follows the header.
    pub body_len: u32,
    /// Number of fds passed with this frame.
    pub fd_count: u16,
}

impl FramePrefix {
    /// Parses a prefix. Fails only when the reserved field is not zero.
    pub fn parse(bytes: &[u8; PREFIX_LEN]) -> Result<Self, FrameError> {
        let reserved = u16::from_le_bytes([bytes[10], bytes[11]]);
        if reserved != 0 {
            return Err(FrameError::ReservedNotZero(reserved));
        }
        Ok(Self {
            header_len: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            body_len: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            fd_count: u16::from_le_bytes([bytes[8], bytes[9]]),
        })
    }

    /// The prefix as it goes on the wire.
    pub fn to_bytes(self) -> [u8; PREFIX_LEN] {
        let mut out = [0u8; PREFIX_LEN];
        out[0..4].copy_from_slice(&self.header_len.to_le_bytes());
        out[4..8].copy_from_slice(&self.body_len.to_le_bytes());
        out[8..10].copy_from_slice(&self.fd_count.to_le_bytes());
        out
    }

    /// Total frame length, prefix included.
    pub fn frame_len(self) -> u64 {
        PREFIX_LEN as u64 + u64::from(self.header_len) + u64::from(self.body_len)
    }

    /// Checks the prefix against `limits`, before any buffer is sized for it.
    pub fn check(self, limits: &FrameLimits) -> Result<(), FrameError> {
        if self.header_len == 0 {
            return Err(FrameError::EmptyHeader);
        }
        if self.header_len > limits.max_header_bytes {
            return Err(FrameError::HeaderTooLarge {
                len: self.header_len,
                max: limits.max_header_bytes,
            });
        }
        if self.frame_len() > u64::from(limits.max_frame_bytes) {
            return Err(FrameError::FrameTooLarge {
                len: self.frame_len(),
                max: limits.max_frame_bytes,
            });
        }
        if self.fd_count > HARD_MAX_FDS_PER_FRAME {
            return Err(FrameError::TooManyFds {
                count: self.fd_count,
            });
        }
        Ok(())
    }
}

/// Size limits a [`FrameReader`] enforces before buffering a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest acceptable frame, prefix, header and body together.
    pub max_frame_bytes: u32,
    /// Largest acceptable header.
    pub max_header_bytes: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 8 << 20,
            max_header_bytes: 64 << 10,
        }
    }
}

/// Why a byte stream is not a valid sequence of frames. Every variant is a
/// protocol violation: the connection cannot be resynchronised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The prefix's reserved field is not zero.
    #[error("frame prefix reserved field is {0:#x}, not 0")]
    ReservedNotZero(u16),
    /// Every frame needs a header.
    #[error("frame has an empty header")]
    EmptyHeader,
    /// The header is longer than `max_header_bytes`.
    #[error("frame header of {len} bytes exceeds max_header_bytes ({max})")]
    HeaderTooLarge {
        /// Declared header length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The frame is longer than `max_frame_bytes`.
    #[error("frame of {len} bytes exceeds max_frame_bytes ({max})")]
    FrameTooLarge {
        /// Declared frame length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// More fds than the kernel can pass in one message.
    #[error("frame declares {count} fds, more than the kernel's 253")]
    TooManyFds {
        /// Declared fd count.
        count: u16,
    },
    /// The frame's fd count does not match the fds that came with it.
    #[error("frame declares {declared} fds but {arrived} arrived with it")]
    FdCountMismatch {
        /// What the prefix says.
        declared: u16,
        /// What the kernel delivered with the frame's first bytes.
        arrived: usize,
    },
    /// Fds arrived with bytes that no frame claimed them for.
    #[error("{count} fds arrived that no frame declared")]
    UnclaimedFds {
        /// How many fds were left over.
        count: usize,
    },
    /// The kernel truncated the control data (MSG_CTRUNC): some fds were lost.
    #[error("control data truncated (MSG_CTRUNC); fds were lost")]
    ControlTruncated,
    /// More than one SCM_RIGHTS set arrived in one read.
    #[error("more than one SCM_RIGHTS set in one read")]
    SplitFdSets,
}

/// Checks what one recvmsg reported about its ancillary data, before its
/// bytes and fds are fed to a [`FrameReader`]: MSG_CTRUNC means the kernel
/// closed fds that did not fit, so the set cannot be matched to what the
/// sender meant; two SCM_RIGHTS sets in one read cannot both belong to the
/// one frame a read's fds are tied to. Both are violations; the daemon and
/// the client disconnect on either.
pub fn check_ancillary(control_truncated: bool, rights_sets: usize) -> Result<(), FrameError> {
    if control_truncated {
        return Err(FrameError::ControlTruncated);
    }
    if rights_sets > 1 {
        return Err(FrameError::SplitFdSets);
    }
    Ok(())
}

/// Appends one frame (prefix, encoded header, body) to `out`.
///
/// Panics only if the header or body exceed 4 GiB, which callers rule out
/// by checking limits first.
pub fn encode_frame(out: &mut Vec<u8>, header: &Header, body: &[u8], fd_count: u16) {
    write_frame(out, header.encoded_len(), body, fd_count, |out| {
        header
            .encode(out)
            .expect("Vec<u8> grows as needed; encode cannot run out of room");
    });
}

/// Appends one frame whose header is `view`'s with its `sender` replaced
/// by `stamp` (see [`crate::header::write_stamped`]), without decoding or
/// re-encoding the header.
pub fn encode_stamped_frame(
    out: &mut Vec<u8>,
    view: &crate::header::HeaderView<'_>,
    stamp: &[u8],
    body: &[u8],
    fd_count: u16,
) {
    let header_len = crate::header::stamped_len(view, stamp);
    write_frame(out, header_len, body, fd_count, |out| {
        crate::header::write_stamped(view, stamp, out);
    });
}

/// Appends a frame whose header `write_header` appends and which is
/// `header_len` bytes long, with room for the whole frame reserved at once.
fn write_frame(
    out: &mut Vec<u8>,
    header_len: usize,
    body: &[u8],
    fd_count: u16,
    write_header: impl FnOnce(&mut Vec<u8>),
) {
    let prefix = FramePrefix {
        header_len: u32::try_from(header_len).expect("header over 4 GiB"),
        body_len: u32::try_from(body.len()).expect("body over 4 GiB"),
        fd_count,
    };
    out.reserve(PREFIX_LEN + header_len + body.len());
    out.extend_from_slice(&prefix.to_bytes());
    let header_start = out.len();
    write_header(out);
    debug_assert_eq!(out.len() - header_start, header_len, "header length");
    out.extend_from_slice(body);
}

/// The encoded length of a frame with this header and a body of `body_len`.
pub fn encoded_frame_len(header: &Header, body_len: usize) -> usize {
    PREFIX_LEN + header.encoded_len() + body_len
}

/// One complete frame handed out by [`FrameReader::feed`]; header and body
/// borrow the reader's or the caller's buffer.
#[derive(Debug)]
pub struct RawFrame<'a, F> {
    /// The encoded `Header`.
    pub header: &'a [u8],
    /// The body bytes.
    pub body: &'a [u8],
    /// The fds passed with this frame, in order.
    pub fds: Vec<F>,
    /// Stream offset of the frame's first byte.
    pub offset: u64,
}

/// Fds from one recvmsg with the stream range that recvmsg returned.
#[derive(Debug)]
struct FdSet<F> {
    start: u64,
    end: u64,
    fds: Vec<F>,
}

/// An error while feeding: either the stream is bad or the frame consumer
/// stopped.
#[derive(Debug)]
pub enum FeedError<E> {
    /// The byte stream or its fds broke the framing rules.
    Frame(FrameError),
    /// The consumer callback returned an error; feeding stopped there.
    Consumer(E),
}

impl<E> From<FrameError> for FeedError<E> {
    fn from(error: FrameError) -> Self {
        Self::Frame(error)
    }
}

/// Capacity above which an emptied partial-frame buffer is released, so an
/// idle connection does not keep a large allocation.
const KEEP_PARTIAL_CAPACITY: usize = 16 << 10;

/// Splits a received byte stream into frames and ties fds to them.
///
/// Holds only the bytes of an incomplete frame; complete frames in the data
/// passed to [`feed`](Self::feed) are handed out without copying.
#[derive(Debug)]
pub struct FrameReader<F> {
    limits: FrameLimits,
    /// A tighter size limit for the first frame only (the handshake).
    first_frame_max: Option<u32>,
    /// Bytes of the frame that is still incomplete (possibly a partial prefix).
    partial: Vec<u8>,
    /// Stream offset of the first byte not yet part of an emitted frame;
    /// the bytes fed so far end at `consumed + partial.len()`.
    consumed: u64,
    /// Fd sets not yet claimed by a frame, oldest first.
    fd_sets: VecDeque<FdSet<F>>,
}

impl<F> FrameReader<F> {
    /// A reader enforcing `limits`.
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            limits,
            first_frame_max: None,
            partial: Vec::new(),
            consumed: 0,
            fd_sets: VecDeque::new(),
        }
    }

    /// Limits the first frame to `max_frame_bytes` (a handshake needs
    /// little room, and an unauthenticated peer should not get much).
    pub fn with_first_frame_limit(mut self, max_frame_bytes: u32) -> Self {
        self.first_frame_max = Some(max_frame_bytes);
        self
    }

    /// Replaces the limits.
    pub fn set_limits(&mut self, limits: FrameLimits) {
        self.limits = limits;
    }

    /// True when no partial frame is buffered and no fds are waiting.
    pub fn is_idle(&self) -> bool {
        self.partial.is_empty() && self.fd_sets.is_empty()
    }

    /// Bytes held for an incomplete frame.
    pub fn buffered_bytes(&self) -> usize {
        self.partial.len()
    }

    /// Fds held that no complete frame has claimed yet.
    pub fn buffered_fds(&self) -> usize {
        self.fd_sets.iter().map(|set| set.fds.len()).sum()
    }

    /// Feeds the result of one recvmsg: `data` and the fds that came with it.
    /// Calls `on_frame` for every frame completed by this data, in order.
    ///
    /// On error the reader is unusable (the stream cannot be resynchronised);
    /// fds it still holds are dropped with it.
    pub fn feed<E>(
        &mut self,
        mut data: &[u8],
        fds: Vec<F>,
        mut on_frame: impl FnMut(RawFrame<'_, F>) -> Result<(), E>,
    ) -> Result<(), FeedError<E>> {
        if !fds.is_empty() {
            if data.is_empty() {
                return Err(FrameError::UnclaimedFds { count: fds.len() }.into());
            }
            let start = self.consumed + self.partial.len() as u64;
            self.fd_sets.push_back(FdSet {
                start,
                end: start + data.len() as u64,
                fds,
            });
        }

        if !self.partial.is_empty() {
            // Complete the buffered frame first.
            if self.partial.len() < PREFIX_LEN {
                let take = (PREFIX_LEN - self.partial.len()).min(data.len());
                self.partial.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.partial.len() < PREFIX_LEN {
                    return Ok(());
                }
            }
            let prefix = self.checked_prefix(&self.partial[..PREFIX_LEN])?;
            let total = prefix.frame_len() as usize;
            self.partial
                .reserve_exact(total.saturating_sub(self.partial.len()));
            let take = (total - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < total {
                return Ok(());
            }
            let offset = self.consumed;
            let frame_fds = self.claim_fds(offset, prefix.frame_len(), prefix.fd_count)?;
            let (header, body) = split_frame(&self.partial, prefix);
            let result = on_frame(RawFrame {
                header,
                body,
                fds: frame_fds,
                offset,
            });
            self.consumed += total as u64;
            self.partial.clear();
            if self.partial.capacity() > KEEP_PARTIAL_CAPACITY {
                self.partial = Vec::new();
            }
            result.map_err(FeedError::Consumer)?;
        }

        while !data.is_empty() {
            if data.len() < PREFIX_LEN {
                self.partial.extend_from_slice(data);
                break;
            }
            let prefix = self.checked_prefix(&data[..PREFIX_LEN])?;
            let total = prefix.frame_len() as usize;
            if data.len() < total {
                self.partial.reserve_exact(total);
                self.partial.extend_from_slice(data);
                break;
            }
            let offset = self.consumed;
            let frame_fds = self.claim_fds(offset, prefix.frame_len(), prefix.fd_count)?;
            let (header, body) = split_frame(&data[..total], prefix);
            self.consumed += total as u64;
            data = &data[total..];
            on_frame(RawFrame {
                header,
                body,
                fds: frame_fds,
                offset,
            })
            .map_err(FeedError::Consumer)?;
        }
        self.check_unclaimed(self.consumed)?;
        Ok(())
    }

    fn checked_prefix(&self, bytes: &[u8]) -> Result<FramePrefix, FrameError> {
        let bytes: &[u8; PREFIX_LEN] = bytes.try_into().expect("prefix slice has PREFIX_LEN bytes");
        let prefix = FramePrefix::parse(bytes)?;
        let mut limits = self.limits;
        if let (Some(max), 0) = (self.first_frame_max, self.consumed) {
            limits.max_frame_bytes = limits.max_frame_bytes.min(max);
        }
        prefix.check(&limits)?;
        Ok(prefix)
    }

    /// Fails if a set's whole range lies before `offset`: every frame that
    /// could have claimed it has been seen.
    fn check_unclaimed(&self, offset: u64) -> Result<(), FrameError> {
        match self.fd_sets.front() {
            Some(set) if set.end <= offset => Err(FrameError::UnclaimedFds {
                count: set.fds.len(),
            }),
            _ => Ok(()),
        }
    }

    fn claim_fds(
        &mut self,
        offset: u64,
        frame_len: u64,
        declared: u16,
    ) -> Result<Vec<F>, FrameError> {
        self.check_unclaimed(offset)?;
        if declared == 0 {
            // If this frame reaches the end of the oldest set's range, no
            // later frame can start inside that range: the fds were sent
            // with this frame, which did not declare them.
            if let Some(set) = self.fd_sets.front() {
                if set.start <= offset && offset < set.end && offset + frame_len >= set.end {
                    return Err(FrameError::UnclaimedFds {
                        count: set.fds.len(),
                    });
                }
            }
            return Ok(Vec::new());
        }
        match self.fd_sets.front() {
            Some(set) if set.start <= offset && offset < set.end => {
                if set.fds.len() != usize::from(declared) {
                    return Err(FrameError::FdCountMismatch {
                        declared,
                        arrived: set.fds.len(),
                    });
                }
                Ok(self.fd_sets.pop_front().expect("front exists").fds)
            }
            _ => Err(FrameError::FdCountMismatch {
                declared,
                arrived: 0,
            }),
        }
    }
}

fn split_frame(frame: &[u8], prefix: FramePrefix) -> (&[u8], &[u8]) {
    let header_end = PREFIX_LEN + prefix.header_len as usize;
    (&frame[PREFIX_LEN..header_end], &frame[header_end..])
}

/// The fd count of a frame's prefix; the caller has kept it within
/// [`HARD_MAX_FDS_PER_FRAME`].
fn checked_fd_count<F>(fds: &[F]) -> u16 {
    u16::try_from(fds.len()).expect("fd count checked by caller")
}

/// Whether a flush wrote everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// The queue is empty.
    All,
    /// The socket would block; wait for it to become writable and flush again.
    Blocked,
    /// The next frame carries fds and its [`FdGate`] said to wait (the
    /// receiver has not yet read the fds sent before); flush again when the
    /// socket reports progress.
    FdsWaiting,
}

/// What an [`FdGate`] decides about a frame whose fds are about to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdVerdict {
    /// Send the frame with its fds now.
    Send,
    /// Not yet: stop the flush with [`Flushed::FdsWaiting`].
    Wait,
    /// Never: drop the frame (closing its fds) and go on with the next one.
    Drop,
}

/// Decides, during [`OutQueue::flush_gated`], about each frame that carries
/// fds, and hears what became of it. `T` is the origin the frame was queued
/// with (who sent it), so refusals can be charged to the sender.
pub trait FdGate<F, T> {
    /// Asked before the sendmsg that would carry `fds`.
    fn check(&mut self, fds: &[F], origin: Option<&T>) -> FdVerdict;
    /// The sendmsg carrying `count` fds went out.
    fn sent(&mut self, count: usize, origin: Option<&T>);
    /// True when a sendmsg error means the kernel refused the fds (the frame
    /// is then dropped and the flush goes on), not that the socket failed.
    fn refuses_fds(&self, error: &io::Error) -> bool;
    /// A frame with `count` fds was dropped: by [`FdVerdict::Drop`]
    /// (`error` is `None`) or because sendmsg failed with `error`, for
    /// which [`refuses_fds`](Self::refuses_fds) was true.
    fn dropped(&mut self, origin: Option<T>, count: usize, error: Option<io::Error>);
}

/// The gate of [`OutQueue::flush`]: every frame goes out as soon as the
/// socket takes it.
struct SendAll;

impl<F, T> FdGate<F, T> for SendAll {
    fn check(&mut self, _fds: &[F], _origin: Option<&T>) -> FdVerdict {
        FdVerdict::Send
    }
    fn sent(&mut self, _count: usize, _origin: Option<&T>) {}
    fn refuses_fds(&self, _error: &io::Error) -> bool {
        false
    }
    fn dropped(&mut self, _origin: Option<T>, _count: usize, _error: Option<io::Error>) {}
}

/// One sendmsg worth of queued bytes: fds ride with its first byte.
#[derive(Debug)]
struct Segment<F, T> {
    data: Vec<u8>,
    fds: Vec<F>,
    written: usize,
    /// Length of the first frame, the one `fds` belong to (frames without
    /// fds may follow it in the same segment).
    head_len: usize,
    /// Who the first frame came from, if the queue was told.
    origin: Option<T>,
}

/// Capacity above which a drained segment buffer is released instead of kept
/// for reuse.
const KEEP_SEGMENT_CAPACITY: usize = 64 << 10;

/// Frames waiting to be written to one socket.
///
/// Frames without fds are appended to the current segment so one sendmsg can
/// carry many of them; a frame with fds starts a new segment, so its fds
/// travel with a sendmsg that starts with its prefix (the placement every
/// receiver accepts; see the module docs).
///
/// `T` is an optional origin recorded with frames that carry fds (see
/// [`push_stamped_from`](Self::push_stamped_from)), handed back to an [`FdGate`] when
/// such a frame is sent or dropped.
#[derive(Debug)]
pub struct OutQueue<F, T = ()> {
    segments: VecDeque<Segment<F, T>>,
    /// A drained buffer kept to avoid reallocating on the next frame.
    spare: Vec<u8>,
    /// Fds in `segments` not yet sent (kept so that reading it does not
    /// walk the queue).
    queued_fds: usize,
    /// Stream offset just past the last byte queued.
    queued_total: u64,
    /// Stream offset just past the last byte written (or dropped by
    /// [`clear`](OutQueue::clear)); the bytes queued are the difference.
    written_total: u64,
}

impl<F, T> Default for OutQueue<F, T> {
    fn default() -> Self {
        Self {
            segments: VecDeque::new(),
            spare: Vec::new(),
            queued_fds: 0,
            queued_total: 0,
            written_total: 0,
        }
    }
}

impl<F, T> OutQueue<F, T> {
    /// Queues a frame; returns the stream offset just past it, which
    /// [`written_total`](Self::written_total) reaches once it is fully sent.
    pub fn push(&mut self, header: &Header, body: &[u8], fds: Vec<F>) -> u64 {
        let fd_count = checked_fd_count(&fds);
        self.append(fds, None, |data| encode_frame(data, header, body, fd_count))
    }

    /// Queues a frame whose header is `view`'s with its sender replaced by
    /// `stamp` (see [`crate::header::write_stamped`]); returns the stream
    /// offset just past it. No header is decoded or re-encoded.
    pub fn push_stamped(
        &mut self,
        view: &crate::header::HeaderView<'_>,
        stamp: &[u8],
        body: &[u8],
        fds: Vec<F>,
    ) -> u64 {
        self.push_stamped_from(view, stamp, body, fds, None)
    }

    /// [`push_stamped`](Self::push_stamped) recording `origin` with the
    /// frame if it carries fds (an [`FdGate`] is told it when the frame is
    /// sent or dropped).
    pub fn push_stamped_from(
        &mut self,
        view: &crate::header::HeaderView<'_>,
        stamp: &[u8],
        body: &[u8],
        fds: Vec<F>,
        origin: Option<T>,
    ) -> u64 {
        let fd_count = checked_fd_count(&fds);
        self.append(fds, origin, |data| {
            encode_stamped_frame(data, view, stamp, body, fd_count);
        })
    }

    /// Queues already-encoded frame bytes (one or more whole frames without
    /// fds, or exactly one frame whose fds are `fds`, from `origin`).
    pub fn push_encoded(&mut self, frame: &[u8], fds: Vec<F>, origin: Option<T>) -> u64 {
        self.append(fds, origin, |data| data.extend_from_slice(frame))
    }

    /// Appends what `write` writes to the segment `fds` call for; returns
    /// the stream offset just past it.
    fn append(&mut self, fds: Vec<F>, origin: Option<T>, write: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let starts_segment = !fds.is_empty();
        let segment = self.segment_for(fds, origin);
        let before = segment.data.len();
        write(&mut segment.data);
        let len = segment.data.len() - before;
        if starts_segment {
            segment.head_len = len;
        }
        self.queued_total += len as u64;
        self.queued_total
    }

    fn segment_for(&mut self, fds: Vec<F>, origin: Option<T>) -> &mut Segment<F, T> {
        let append = fds.is_empty() && !self.segments.is_empty();
        if !append {
            self.queued_fds += fds.len();
            let data = std::mem::take(&mut self.spare);
            let origin = if fds.is_empty() { None } else { origin };
            self.segments.push_back(Segment {
                data,
                fds,
                written: 0,
                head_len: 0,
                origin,
            });
        }
        self.segments.back_mut().expect("a segment exists")
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        (self.queued_total - self.written_total) as usize
    }

    /// Fds queued and not yet sent.
    pub fn queued_fds(&self) -> usize {
        self.queued_fds
    }

    /// Stream offset just past the last byte written so far.
    pub fn written_total(&self) -> u64 {
        self.written_total
    }

    /// Writes as much as `send` accepts. `send(data, fds)` performs one
    /// sendmsg and returns the bytes written; `WouldBlock` stops the flush
    /// with [`Flushed::Blocked`]. Fds are released once their sendmsg has
    /// gone out.
    pub fn flush(
        &mut self,
        send: impl FnMut(&[u8], &[F]) -> io::Result<usize>,
    ) -> io::Result<Flushed> {
        self.flush_gated(send, &mut SendAll)
    }

    /// Like [`flush`](Self::flush), asking `gate` before each sendmsg that
    /// carries fds: it may let the frame go, hold the flush until later
    /// ([`Flushed::FdsWaiting`]), or drop the frame. A sendmsg error that
    /// the gate says is a refusal of the fds drops that frame too; the
    /// bytes of dropped frames count as written, so offsets returned by the
    /// `push` methods are still reached.
    pub fn flush_gated(
        &mut self,
        mut send: impl FnMut(&[u8], &[F]) -> io::Result<usize>,
        gate: &mut impl FdGate<F, T>,
    ) -> io::Result<Flushed> {
        while let Some(segment) = self.segments.front_mut() {
            let carries_fds = segment.written == 0 && !segment.fds.is_empty();
            if carries_fds {
                match gate.check(&segment.fds, segment.origin.as_ref()) {
                    FdVerdict::Send => {}
                    FdVerdict::Wait => return Ok(Flushed::FdsWaiting),
                    FdVerdict::Drop => {
                        self.drop_head_frame(gate, None);
                        continue;
                    }
                }
            }
            let segment = self.segments.front_mut().expect("front exists");
            let fds: &[F] = if carries_fds { &segment.fds } else { &[] };
            let written = match send(&segment.data[segment.written..], fds) {
                Ok(0) => return Ok(Flushed::Blocked),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if carries_fds && gate.refuses_fds(&e) => {
                    self.drop_head_frame(gate, Some(e));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if carries_fds {
                self.queued_fds -= segment.fds.len();
                gate.sent(segment.fds.len(), segment.origin.as_ref());
                segment.fds.clear();
                segment.origin = None;
            }
            segment.written += written;
            self.written_total += written as u64;
            if segment.written == segment.data.len() {
                let mut done = self.segments.pop_front().expect("front exists");
                if self.spare.capacity() == 0 && done.data.capacity() <= KEEP_SEGMENT_CAPACITY {
                    done.data.clear();
                    self.spare = done.data;
                }
            }
        }
        Ok(Flushed::All)
    }

    /// Drops the first frame of the front segment, which carries fds and of
    /// which nothing was written yet, and tells `gate`.
    fn drop_head_frame(&mut self, gate: &mut impl FdGate<F, T>, error: Option<io::Error>) {
        let segment = self.segments.front_mut().expect("front exists");
        let fds = std::mem::take(&mut segment.fds);
        let origin = segment.origin.take();
        let count = fds.len();
        self.queued_fds -= count;
        drop(fds);
        segment.data.drain(..segment.head_len);
        self.written_total += segment.head_len as u64;
        segment.head_len = 0;
        if segment.data.is_empty() {
            self.segments.pop_front();
        }
        gate.dropped(origin, count, error);
    }

    /// Drops everything queued (closing queued fds), e.g. on disconnect.
    pub fn clear(&mut self) {
        // Dropped bytes count as written: every offset `push` returned is
        // reached, so nothing waits for them any longer.
        self.written_total = self.queued_total;
        self.segments.clear();
        self.queued_fds = 0;
    }

    /// Releases the spare buffer (for idle connections).
    pub fn shrink(&mut self) {
        if self.segments.is_empty() {
            self.spare = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::MessageKind;

    fn header(serial: u64) -> Header {
        Header {
            kind: MessageKind::MethodCall as i32,
            serial,
            destination: "org.example.Echo".into(),
            member: "Echo".into(),
            ..Header::default()
        }
    }

    fn frame_bytes(serial: u64, body: &[u8], fds: u16) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(&mut out, &header(serial), body, fds);
        out
    }

    /// A decoded frame: serial, body, fds.
    type Collected = (u64, Vec<u8>, Vec<i32>);

    fn collect(
        reader: &mut FrameReader<i32>,
        data: &[u8],
        fds: Vec<i32>,
    ) -> Result<Vec<Collected>, FrameError> {
        let mut out = Vec::new();
        reader
            .feed(data, fds, |frame| {
                let header = Header::decode(frame.header).unwrap();
                out.push((header.serial, frame.body.to_vec(), frame.fds));
                Ok::<(), ()>(())
            })
            .map_err(|e| match e {
                FeedError::Frame(e) => e,
                FeedError::Consumer(()) => unreachable!(),
            })?;
        Ok(out)
    }

    #[test]
    fn prefix_round_trips() {
        let prefix = FramePrefix {
            header_len: 300,
            body_len: 70_000,
            fd_count: 3,
        };
        assert_eq!(FramePrefix::parse(&prefix.to_bytes()).unwrap(), prefix);
        assert_eq!(prefix.frame_len(), 12 + 300 + 70_000);
    }

    #[test]
    fn reserved_bits_are_rejected() {
        let mut bytes = FramePrefix {
            header_len: 1,
            body_len: 0,
            fd_count: 0,
        }
        .to_bytes();
        bytes[11] = 1;
        assert_eq!(
            FramePrefix::parse(&bytes),
            Err(FrameError::ReservedNotZero(0x100))
        );
    }

    #[test]
    fn limits_are_checked_from_the_prefix_alone() {
        let limits = FrameLimits {
            max_frame_bytes: 1000,
            max_header_bytes: 100,
        };
        let mut reader = FrameReader::<i32>::new(limits);
        let huge = FramePrefix {
            header_len: 10,
            body_len: u32::MAX,
            fd_count: 0,
        }
        .to_bytes();
        // Only the prefix is present; the reader must refuse before waiting
        // for (or allocating) the 4 GiB body.
        assert!(matches!(
            collect(&mut reader, &huge, vec![]),
            Err(FrameError::FrameTooLarge { .. })
        ));
        assert!(reader.partial.capacity() < 100);
        let mut reader = FrameReader::<i32>::new(limits);
        let big_header = FramePrefix {
            header_len: 101,
            body_len: 0,
            fd_count: 0,
        }
        .to_bytes();
        assert!(matches!(
            collect(&mut reader, &big_header, vec![]),
            Err(FrameError::HeaderTooLarge { len: 101, max: 100 })
        ));
        let mut reader = FrameReader::<i32>::new(limits);
        let fds = FramePrefix {
            header_len: 1,
            body_len: 0,
            fd_count: 254,
        }
        .to_bytes();
        assert!(matches!(
            collect(&mut reader, &fds, vec![]),
            Err(FrameError::TooManyFds { count: 254 })
        ));
    }

    #[test]
    fn first_frame_limit_applies_to_the_first_frame_only() {
        let mut stream = frame_bytes(1, &[0u8; 50], 0);
        stream.extend(frame_bytes(2, &[0u8; 500], 0));
        let mut reader =
            FrameReader::<i32>::new(FrameLimits::default()).with_first_frame_limit(200);
        assert_eq!(collect(&mut reader, &stream, vec![]).unwrap().len(), 2);
        let mut reader =
            FrameReader::<i32>::new(FrameLimits::default()).with_first_frame_limit(200);
        let big_first = frame_bytes(1, &[0u8; 500], 0);
        assert!(matches!(
            collect(&mut reader, &big_first, vec![]),
            Err(FrameError::FrameTooLarge { max: 200, .. })
        ));
    }

    #[test]
    fn frames_split_at_every_byte_reassemble() {
        let mut stream = frame_bytes(1, b"hello", 0);
        stream.extend(frame_bytes(2, &[9u8; 300], 0));
        stream.extend(frame_bytes(3, b"", 0));
        for split in 0..=stream.len() {
            let mut reader = FrameReader::<i32>::new(FrameLimits::default());
            let mut got = collect(&mut reader, &stream[..split], vec![]).unwrap();
            got.extend(collect(&mut reader, &stream[split..], vec![]).unwrap());
            let serials: Vec<u64> = got.iter().map(|f| f.0).collect();
            assert_eq!(serials, vec![1, 2, 3], "split at {split}");
            assert_eq!(got[0].1, b"hello");
            assert_eq!(got[1].1, vec![9u8; 300]);
            assert!(reader.is_idle());
        }
    }

    #[test]
    fn byte_at_a_time_is_incomplete_until_the_last_byte() {
        let stream = frame_bytes(7, b"abc", 0);
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        for (index, byte) in stream.iter().enumerate() {
            let got = collect(&mut reader, std::slice::from_ref(byte), vec![]).unwrap();
            if index + 1 < stream.len() {
                assert!(got.is_empty());
            } else {
                assert_eq!(got.len(), 1);
            }
        }
    }

    #[test]
    fn fds_attach_to_the_frame_that_starts_in_their_read() {
        let first = frame_bytes(1, b"no fds", 0);
        let second = frame_bytes(2, b"two fds", 2);
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        // The kernel delivers the fds with the read that ends with the first
        // skb of the sendmsg that carried them: here, both frames at once.
        let mut data = first.clone();
        data.extend(&second);
        let got = collect(&mut reader, &data, vec![10, 11]).unwrap();
        assert_eq!(got[0].2, Vec::<i32>::new());
        assert_eq!(got[1].2, vec![10, 11]);
        // A frame that is split across reads keeps the fds of its first read.
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        let got = collect(&mut reader, &second[..20], vec![5, 6]).unwrap();
        assert!(got.is_empty());
        let got = collect(&mut reader, &second[20..], vec![]).unwrap();
        assert_eq!(got[0].2, vec![5, 6]);
    }

    #[test]
    fn a_reads_fds_go_to_the_first_frame_in_it_that_declares_fds() {
        let mut data = frame_bytes(1, b"one", 1);
        data.extend(frame_bytes(2, b"none", 0));
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        let got = collect(&mut reader, &data, vec![7]).unwrap();
        assert_eq!(got[0].2, vec![7]);
        assert!(got[1].2.is_empty());
        // Two frames declare one each, one set of one arrived: the first
        // takes it and the second has none.
        let mut data = frame_bytes(1, b"one", 1);
        data.extend(frame_bytes(2, b"one too", 1));
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        assert!(matches!(
            collect(&mut reader, &data, vec![7]),
            Err(FrameError::FdCountMismatch {
                declared: 1,
                arrived: 0
            })
        ));
        // A frame whose first byte came in a read without fds cannot take
        // the fds of the read that completes it.
        let frame = frame_bytes(1, b"declares one", 1);
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        assert!(collect(&mut reader, &frame[..3], vec![])
            .unwrap()
            .is_empty());
        assert!(matches!(
            collect(&mut reader, &frame[3..], vec![7]),
            Err(FrameError::FdCountMismatch {
                declared: 1,
                arrived: 0
            })
        ));
    }

    #[test]
    fn truncated_control_data_and_two_fd_sets_in_one_read_are_violations() {
        assert_eq!(check_ancillary(false, 0), Ok(()));
        assert_eq!(check_ancillary(false, 1), Ok(()));
        assert_eq!(check_ancillary(true, 1), Err(FrameError::ControlTruncated));
        assert_eq!(check_ancillary(true, 0), Err(FrameError::ControlTruncated));
        assert_eq!(check_ancillary(false, 2), Err(FrameError::SplitFdSets));
    }

    #[test]
    fn lying_fd_counts_are_violations() {
        // Declares 2, one arrives.
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        assert_eq!(
            collect(&mut reader, &frame_bytes(1, b"", 2), vec![1]).unwrap_err(),
            FrameError::FdCountMismatch {
                declared: 2,
                arrived: 1
            }
        );
        // Declares 1, none arrive.
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        assert_eq!(
            collect(&mut reader, &frame_bytes(1, b"", 1), vec![]).unwrap_err(),
            FrameError::FdCountMismatch {
                declared: 1,
                arrived: 0
            }
        );
        // Declares 0, one arrives.
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        assert_eq!(
            collect(&mut reader, &frame_bytes(1, b"", 0), vec![1]).unwrap_err(),
            FrameError::UnclaimedFds { count: 1 }
        );
    }

    #[test]
    fn a_second_fd_set_for_one_frame_is_a_violation() {
        let frame = frame_bytes(1, &[0u8; 100], 1);
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        assert!(collect(&mut reader, &frame[..30], vec![1])
            .unwrap()
            .is_empty());
        // A second set arrives mid-frame: nothing can claim it.
        assert_eq!(
            collect(&mut reader, &frame[30..], vec![2]).unwrap_err(),
            FrameError::UnclaimedFds { count: 1 }
        );
    }

    #[test]
    fn fds_split_across_two_frames_are_a_violation() {
        // Two frames each declaring 1, but both fds in one set.
        let mut data = frame_bytes(1, b"", 1);
        data.extend(frame_bytes(2, b"", 1));
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        assert_eq!(
            collect(&mut reader, &data, vec![1, 2]).unwrap_err(),
            FrameError::FdCountMismatch {
                declared: 1,
                arrived: 2
            }
        );
    }

    #[test]
    fn out_queue_batches_and_splits_at_fds() {
        let mut queue = OutQueue::<i32>::default();
        queue.push(&header(1), b"a", vec![]);
        queue.push(&header(2), b"b", vec![]);
        let end = queue.push(&header(3), b"c", vec![42]);
        queue.push(&header(4), b"d", vec![]);
        assert_eq!(queue.queued_fds(), 1);
        let mut sends: Vec<(Vec<u8>, Vec<i32>)> = Vec::new();
        let status = queue
            .flush(|data, fds| {
                sends.push((data.to_vec(), fds.to_vec()));
                Ok(data.len())
            })
            .unwrap();
        assert_eq!(status, Flushed::All);
        assert_eq!(
            sends.len(),
            2,
            "one sendmsg before the fds, one starting with them"
        );
        assert!(sends[0].1.is_empty());
        assert_eq!(sends[1].1, vec![42]);
        assert!(queue.written_total() >= end);
        // The bytes decode back to the same frames, fds tied to frame 3.
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        let mut got = Vec::new();
        for (data, fds) in sends {
            got.extend(collect(&mut reader, &data, fds).unwrap());
        }
        let fds: Vec<_> = got.iter().map(|f| (f.0, f.2.clone())).collect();
        assert_eq!(
            fds,
            vec![(1, vec![]), (2, vec![]), (3, vec![42]), (4, vec![])]
        );
    }

    #[test]
    fn out_queue_resumes_partial_writes_without_resending_fds() {
        let mut queue = OutQueue::<i32>::default();
        queue.push(&header(1), &[1u8; 100], vec![7]);
        let mut calls = Vec::new();
        let status = queue
            .flush(|data, fds| {
                calls.push(fds.to_vec());
                Ok(data.len().min(10))
            })
            .unwrap();
        assert_eq!(status, Flushed::All);
        assert_eq!(calls[0], vec![7]);
        assert!(calls[1..].iter().all(|fds| fds.is_empty()));
        assert_eq!(queue.queued_fds(), 0);
        assert_eq!(queue.queued_bytes(), 0);
    }

    #[test]
    fn an_empty_header_and_fds_without_data_are_violations() {
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        let empty = FramePrefix {
            header_len: 0,
            body_len: 4,
            fd_count: 0,
        }
        .to_bytes();
        assert_eq!(
            collect(&mut reader, &empty, vec![]).unwrap_err(),
            FrameError::EmptyHeader
        );
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        assert_eq!(
            collect(&mut reader, &[], vec![3, 4]).unwrap_err(),
            FrameError::UnclaimedFds { count: 2 }
        );
    }

    #[test]
    fn fd_ranges_follow_a_buffered_partial_frame() {
        // The fds arrive with the read that starts the second frame while
        // the first one is still incomplete in the reader's buffer.
        let first = frame_bytes(1, &[1u8; 40], 0);
        let second = frame_bytes(2, b"fd", 1);
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        assert!(collect(&mut reader, &first[..5], vec![])
            .unwrap()
            .is_empty());
        let mut rest = first[5..].to_vec();
        rest.extend(&second[..3]);
        let got = collect(&mut reader, &rest, vec![9]).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(reader.buffered_fds(), 1);
        let got = collect(&mut reader, &second[3..], vec![]).unwrap();
        assert_eq!((got[0].0, got[0].2.clone()), (2, vec![9]));
        assert!(reader.is_idle());
    }

    #[test]
    fn stamped_frames_carry_the_length_of_the_stamped_header() {
        let stamp_of = |unique_name: &str| {
            let mut stamp = Vec::new();
            crate::header::encode_sender_field(
                &crate::v1::SenderInfo {
                    unique_name: unique_name.into(),
                    uid: 1000,
                    ..Default::default()
                },
                &mut stamp,
            );
            stamp
        };
        let plain = header(5).encode_to_vec();
        let mut forged = header(6);
        forged.sender = Some(crate::v1::SenderInfo {
            unique_name: ":1.999999".into(),
            label: Some("forged".into()),
            ..Default::default()
        });
        let forged = forged.encode_to_vec();
        let mut stream = Vec::new();
        for raw in [&plain, &forged] {
            let view = crate::header::HeaderView::parse(raw).unwrap();
            encode_stamped_frame(&mut stream, &view, &stamp_of(":1.3"), b"body", 0);
        }
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        let mut senders = Vec::new();
        reader
            .feed(&stream, vec![], |frame| {
                let header = Header::decode(frame.header).unwrap();
                assert_eq!(frame.body, b"body");
                senders.push((header.serial, header.sender.unwrap()));
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(senders.len(), 2);
        for (serial, sender) in senders {
            assert_eq!(
                (sender.unique_name.as_str(), sender.label),
                (":1.3", None),
                "frame {serial}"
            );
        }
    }

    #[test]
    fn out_queue_counts_what_is_left_and_clear_reaches_every_offset() {
        let mut queue = OutQueue::<i32>::default();
        queue.push(&header(1), &[1u8; 50], vec![]);
        let end = queue.push(&header(2), &[2u8; 50], vec![8, 9]);
        assert_eq!(queue.queued_bytes() as u64, end);
        assert_eq!(queue.queued_fds(), 2);
        let mut budget = 30;
        let status = queue
            .flush(|data, _| {
                if budget == 0 {
                    return Err(io::Error::from(io::ErrorKind::WouldBlock));
                }
                let n = data.len().min(budget);
                budget -= n;
                Ok(n)
            })
            .unwrap();
        assert_eq!(status, Flushed::Blocked);
        assert_eq!(queue.written_total(), 30);
        assert_eq!(queue.queued_bytes() as u64, end - 30);
        assert_eq!(queue.queued_fds(), 2, "the second frame's fds are unsent");
        queue.clear();
        assert!(queue.is_empty());
        assert_eq!((queue.queued_bytes(), queue.queued_fds()), (0, 0));
        assert_eq!(queue.written_total(), end);
        // Offsets go on from there.
        let next = queue.push(&header(3), b"", vec![]);
        assert_eq!(queue.queued_bytes() as u64, next - end);
    }

    #[test]
    fn out_queue_retries_an_interrupted_send() {
        let mut queue = OutQueue::<i32>::default();
        let end = queue.push(&header(1), b"x", vec![]);
        let mut calls = 0;
        let status = queue
            .flush(|data, _| {
                calls += 1;
                if calls == 1 {
                    return Err(io::Error::from(io::ErrorKind::Interrupted));
                }
                Ok(data.len())
            })
            .unwrap();
        assert_eq!((status, calls), (Flushed::All, 2));
        assert_eq!(queue.written_total(), end);
    }

    #[test]
    fn out_queue_reports_blocked() {
        let mut queue = OutQueue::<i32>::default();
        queue.push(&header(1), b"x", vec![]);
        let status = queue
            .flush(|_, _| Err(io::Error::from(io::ErrorKind::WouldBlock)))
            .unwrap();
        assert_eq!(status, Flushed::Blocked);
        assert!(!queue.is_empty());
    }

    /// A gate with scripted verdicts that records what it was told.
    struct ScriptedGate {
        verdicts: Vec<FdVerdict>,
        sent: Vec<(usize, Option<u32>)>,
        dropped: Vec<(Option<u32>, usize, bool)>,
    }

    impl FdGate<i32, u32> for ScriptedGate {
        fn check(&mut self, _fds: &[i32], _origin: Option<&u32>) -> FdVerdict {
            self.verdicts.remove(0)
        }
        fn sent(&mut self, count: usize, origin: Option<&u32>) {
            self.sent.push((count, origin.copied()));
        }
        fn refuses_fds(&self, error: &io::Error) -> bool {
            error.kind() == io::ErrorKind::QuotaExceeded
        }
        fn dropped(&mut self, origin: Option<u32>, count: usize, error: Option<io::Error>) {
            self.dropped.push((origin, count, error.is_some()));
        }
    }

    fn gate(verdicts: &[FdVerdict]) -> ScriptedGate {
        ScriptedGate {
            verdicts: verdicts.to_vec(),
            sent: Vec::new(),
            dropped: Vec::new(),
        }
    }

    /// Stamped frames with fds, from an origin, after a plain frame.
    fn gated_queue() -> OutQueue<i32, u32> {
        let mut queue = OutQueue::<i32, u32>::default();
        queue.push(&header(1), b"a", vec![]);
        let bytes = frame_bytes(2, b"b", 2);
        let view = crate::header::HeaderView::parse(&bytes[PREFIX_LEN..bytes.len() - 1]).unwrap();
        queue.push_stamped_from(&view, &[], b"b", vec![10, 11], Some(7));
        // Appended to the fd frame's segment: sent with it, or after it
        // when that frame is dropped.
        queue.push(&header(3), b"c", vec![]);
        queue
    }

    #[test]
    fn gated_flush_drops_a_refused_frame_and_sends_the_rest() {
        let mut queue = gated_queue();
        let total = queue.queued_bytes() as u64;
        let mut gate = gate(&[FdVerdict::Drop]);
        let mut out = Vec::new();
        let mut fds_sent = Vec::new();
        let status = queue
            .flush_gated(
                |data, fds| {
                    out.extend_from_slice(data);
                    fds_sent.extend_from_slice(fds);
                    Ok(data.len())
                },
                &mut gate,
            )
            .unwrap();
        assert_eq!(status, Flushed::All);
        assert!(fds_sent.is_empty());
        assert_eq!(gate.dropped, vec![(Some(7), 2, false)]);
        assert!(gate.sent.is_empty());
        // Every offset is reached, dropped bytes included.
        assert_eq!(queue.written_total(), total);
        assert_eq!(queue.queued_fds(), 0);
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        let serials: Vec<u64> = collect(&mut reader, &out, vec![])
            .unwrap()
            .into_iter()
            .map(|(serial, _, _)| serial)
            .collect();
        assert_eq!(serials, vec![1, 3]);
    }

    #[test]
    fn gated_flush_waits_then_sends_with_the_origin() {
        let mut queue = gated_queue();
        let mut waiting = gate(&[FdVerdict::Wait]);
        let mut writes = 0;
        let status = queue
            .flush_gated(
                |data, _| {
                    writes += 1;
                    Ok(data.len())
                },
                &mut waiting,
            )
            .unwrap();
        // The plain frame before it went; the fd frame waits.
        assert_eq!((status, writes), (Flushed::FdsWaiting, 1));
        assert_eq!(queue.queued_fds(), 2);
        let mut sending = gate(&[FdVerdict::Send]);
        let mut fds_sent = Vec::new();
        let status = queue
            .flush_gated(
                |data, fds| {
                    fds_sent.extend_from_slice(fds);
                    Ok(data.len())
                },
                &mut sending,
            )
            .unwrap();
        assert_eq!(status, Flushed::All);
        assert_eq!(fds_sent, vec![10, 11]);
        assert_eq!(sending.sent, vec![(2, Some(7))]);
    }

    #[test]
    fn gated_flush_drops_a_frame_whose_fds_the_kernel_refuses() {
        let mut queue = gated_queue();
        let total = queue.queued_bytes() as u64;
        let mut gate = gate(&[FdVerdict::Send]);
        let status = queue
            .flush_gated(
                |data, fds| {
                    if fds.is_empty() {
                        Ok(data.len())
                    } else {
                        Err(io::Error::from(io::ErrorKind::QuotaExceeded))
                    }
                },
                &mut gate,
            )
            .unwrap();
        assert_eq!(status, Flushed::All);
        assert_eq!(gate.dropped, vec![(Some(7), 2, true)]);
        assert_eq!(queue.written_total(), total);
    }
}
