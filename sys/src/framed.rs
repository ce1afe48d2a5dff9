//! One framed receive on a Unix stream socket, for the daemon, the client
//! and the tests' raw client alike: a recvmsg that collects passed fds
//! ([`crate::fdpass`]), the checks on what the kernel said about them, and
//! `pbus_proto`'s [`FrameReader`], which splits the bytes into frames and
//! ties each fd set to the frame it belongs to.
//!
//! What a read must refuse, whoever reads (see `pbus_proto::frame` for the
//! placement rule):
//!
//! * MSG_CTRUNC: the kernel has already closed the fds that did not fit in
//!   the control buffer, so the frame they belonged to can never be handed
//!   out as the sender meant it, and the stream's fd bookkeeping is lost.
//! * Two SCM_RIGHTS sets in one read: both cannot belong to the one frame a
//!   read's fds are tied to.
//!
//! Both are [`RecvError::Ancillary`]; a frame whose fds do not match its
//! declared count, or fds no frame claims, are [`RecvError::Frame`]. Either
//! way the stream cannot be resynchronised: the reader must disconnect.
//!
//! A receive is one non-blocking recvmsg; waiting for readiness is the
//! caller's (for a `tokio::net::UnixStream`, `recv_frames_from` does it,
//! with the `tokio` feature). It knows nothing of headers, the bus or the
//! handshake.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use pbus_proto::frame::{check_ancillary, FeedError, FrameError, FrameReader, RawFrame};

use crate::fdpass::{recv_with_fds_limited, MAX_FDS_PER_MESSAGE};

/// Why a framed receive stopped.
#[derive(Debug)]
pub enum RecvError<E = Infallible> {
    /// recvmsg failed. `WouldBlock` means nothing is waiting: wait for
    /// readiness (and, with a readiness guard, clear it) and try again.
    /// `EINTR` never shows here: it is retried.
    Io(io::Error),
    /// The peer hung up (end of stream).
    Closed,
    /// The read's ancillary data cannot be tied to frames (MSG_CTRUNC or
    /// two SCM_RIGHTS sets; see the module docs).
    Ancillary(FrameError),
    /// The bytes or their fds broke the framing rules.
    Frame(FrameError),
    /// The frame consumer returned an error; frames after it in the same
    /// read were not handed out.
    Consumer(E),
}

impl<E: fmt::Display> fmt::Display for RecvError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(error) => write!(f, "socket error: {error}"),
            Self::Closed => write!(f, "the peer closed the connection"),
            Self::Ancillary(error) | Self::Frame(error) => error.fmt(f),
            Self::Consumer(error) => error.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for RecvError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(error) => Some(error),
            Self::Closed => None,
            Self::Ancillary(error) | Self::Frame(error) => Some(error),
            Self::Consumer(error) => Some(error),
        }
    }
}

impl<E> From<FeedError<E>> for RecvError<E> {
    fn from(error: FeedError<E>) -> Self {
        match error {
            FeedError::Frame(error) => Self::Frame(error),
            FeedError::Consumer(error) => Self::Consumer(error),
        }
    }
}

impl RecvError<Infallible> {
    /// The same error in a receive whose consumer fails with `E` (this one
    /// has no consumer, so it cannot be [`RecvError::Consumer`]).
    pub fn widen<E>(self) -> RecvError<E> {
        match self {
            Self::Io(error) => RecvError::Io(error),
            Self::Closed => RecvError::Closed,
            Self::Ancillary(error) => RecvError::Ancillary(error),
            Self::Frame(error) => RecvError::Frame(error),
            Self::Consumer(never) => match never {},
        }
    }
}

/// The bytes and fds one recvmsg brought, its ancillary data already
/// checked, not yet split into frames. Hand it to
/// [`FramedReceiver::feed`]; dropping it instead closes its fds (and
/// loses its bytes: the stream is then unusable).
#[derive(Debug)]
#[must_use = "the bytes are lost unless fed to the receiver"]
pub struct Chunk<'b> {
    bytes: &'b [u8],
    fds: Vec<OwnedFd>,
    drained: bool,
}

impl Chunk<'_> {
    /// The bytes read.
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }

    /// How many bytes were read (never 0: end of stream is
    /// [`RecvError::Closed`]).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false; see [`len`](Self::len).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The fds that came with these bytes (one set at most), for a caller
    /// that vets or accounts for them before they reach any frame.
    pub fn fds(&self) -> &[OwnedFd] {
        &self.fds
    }

    /// The read was shorter than the buffer and brought no fds, so it
    /// emptied the socket: a caller can wait for readiness again instead of
    /// making another recvmsg only to see `WouldBlock`. (A read with fds
    /// stops after the skb that carried them, whatever follows.)
    pub fn drained(&self) -> bool {
        self.drained
    }
}

/// What [`FramedReceiver::recv_frames`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Bytes read by the one recvmsg.
    pub bytes: usize,
    /// Fds that came with them.
    pub fds: usize,
    /// See [`Chunk::drained`].
    pub drained: bool,
}

/// The receiving half of a pbus connection: recvmsg, ancillary checks and
/// the frame reader, so complete frames come out with their own fds.
///
/// The buffer is the caller's, passed to each receive, so a daemon can
/// share one among its connections; only the bytes of an incomplete frame
/// are kept between receives.
#[derive(Debug)]
pub struct FramedReceiver {
    reader: FrameReader<OwnedFd>,
    /// Room for this many fds per read; more arrive truncated (refused).
    max_fds: usize,
}

impl From<FrameReader<OwnedFd>> for FramedReceiver {
    fn from(reader: FrameReader<OwnedFd>) -> Self {
        Self::new(reader)
    }
}

impl FramedReceiver {
    /// A receiver feeding `reader` (which carries the size limits).
    pub fn new(reader: FrameReader<OwnedFd>) -> Self {
        Self {
            reader,
            max_fds: MAX_FDS_PER_MESSAGE,
        }
    }

    /// Room for only `max_fds` fds per read instead of the kernel's
    /// maximum: a read bringing more is truncated by the kernel and refused
    /// here. For tests that provoke MSG_CTRUNC, and for a receiver that
    /// wants a tighter bound.
    pub fn with_max_fds(mut self, max_fds: usize) -> Self {
        self.max_fds = max_fds;
        self
    }

    /// The frame reader, for what it holds (buffered bytes and fds).
    pub fn reader(&self) -> &FrameReader<OwnedFd> {
        &self.reader
    }

    /// The frame reader, to change its limits (after a handshake).
    pub fn reader_mut(&mut self) -> &mut FrameReader<OwnedFd> {
        &mut self.reader
    }

    /// One non-blocking recvmsg into `buffer` (which must not be empty),
    /// with room for the kernel's maximum of fds (unless
    /// [`with_max_fds`](Self::with_max_fds) said less); the ancillary data is
    /// checked before anything else sees the fds. Feed the result with
    /// [`feed`](Self::feed), or use [`recv_frames`](Self::recv_frames) to
    /// do both.
    pub fn recv<'b>(
        &self,
        socket: impl AsFd,
        buffer: &'b mut [u8],
    ) -> Result<Chunk<'b>, RecvError> {
        if buffer.is_empty() {
            return Err(RecvError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a framed receive needs a buffer",
            )));
        }
        let socket = socket.as_fd();
        let mut fds = Vec::new();
        let received = loop {
            match recv_with_fds_limited(socket, buffer, &mut fds, self.max_fds) {
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                other => break other.map_err(RecvError::Io)?,
            }
        };
        if received.bytes == 0 {
            return Err(RecvError::Closed);
        }
        check_ancillary(received.control_truncated, received.rights_sets)
            .map_err(RecvError::Ancillary)?;
        let drained = received.bytes < buffer.len() && received.fds == 0;
        Ok(Chunk {
            bytes: &buffer[..received.bytes],
            fds,
            drained,
        })
    }

    /// Splits `chunk` into frames, calling `on_frame` for every frame it
    /// completes, each with the fds the placement rule ties to it.
    pub fn feed<E>(
        &mut self,
        chunk: Chunk<'_>,
        on_frame: impl FnMut(RawFrame<'_, OwnedFd>) -> Result<(), E>,
    ) -> Result<(), FeedError<E>> {
        self.reader.feed(chunk.bytes, chunk.fds, on_frame)
    }

    /// [`recv`](Self::recv) then [`feed`](Self::feed): one recvmsg, and
    /// every frame it completes handed to `on_frame`.
    pub fn recv_frames<E>(
        &mut self,
        socket: impl AsFd,
        buffer: &mut [u8],
        on_frame: impl FnMut(RawFrame<'_, OwnedFd>) -> Result<(), E>,
    ) -> Result<Fed, RecvError<E>> {
        let chunk = self.recv(socket, buffer).map_err(RecvError::widen)?;
        let fed = Fed {
            bytes: chunk.len(),
            fds: chunk.fds().len(),
            drained: chunk.drained(),
        };
        self.feed(chunk, on_frame)?;
        Ok(fed)
    }

    /// Waits until `stream` is readable, then does one
    /// [`recv_frames`](Self::recv_frames) on it; `WouldBlock` clears the
    /// stream's readiness and waits again, so this never returns it.
    ///
    /// Cancel safe: the only await is the wait for readiness, before
    /// anything is read.
    #[cfg(feature = "tokio")]
    pub async fn recv_frames_from<E>(
        &mut self,
        stream: &tokio::net::UnixStream,
        buffer: &mut [u8],
        mut on_frame: impl FnMut(RawFrame<'_, OwnedFd>) -> Result<(), E>,
    ) -> Result<Fed, RecvError<E>> {
        loop {
            stream.readable().await.map_err(RecvError::Io)?;
            // try_io clears the readiness tokio cached when the closure
            // says WouldBlock; nothing was fed then.
            let attempt = stream.try_io(tokio::io::Interest::READABLE, || {
                match self.recv_frames(stream, buffer, &mut on_frame) {
                    Err(RecvError::Io(error)) => Err(error),
                    other => Ok(other),
                }
            });
            match attempt {
                Ok(outcome) => return outcome,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(RecvError::Io(error)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSlice;
    use std::os::unix::net::UnixStream;

    use pbus_proto::frame::{encode_frame, FrameLimits};
    use pbus_proto::v1::Header;

    use crate::fdpass::send_with_fds;

    fn receiver() -> FramedReceiver {
        FramedReceiver::new(FrameReader::new(FrameLimits {
            max_frame_bytes: 1 << 20,
            max_header_bytes: 1 << 16,
        }))
    }

    fn frame(serial: u64, fd_count: u16) -> Vec<u8> {
        let mut bytes = Vec::new();
        let header = Header {
            serial,
            ..Header::default()
        };
        encode_frame(&mut bytes, &header, b"body", fd_count);
        bytes
    }

    /// Every frame one receive hands out: (header length, fd count).
    fn collect(
        receiver: &mut FramedReceiver,
        socket: &UnixStream,
        buffer: &mut [u8],
    ) -> Result<(Fed, Vec<usize>), RecvError> {
        let mut frames = Vec::new();
        let fed = receiver.recv_frames(socket, buffer, |frame| {
            frames.push(frame.fds.len());
            Ok::<(), Infallible>(())
        })?;
        Ok((fed, frames))
    }

    #[test]
    fn frames_come_out_with_their_own_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut bytes = frame(1, 0);
        send_with_fds(&a, &[IoSlice::new(&bytes)], &[]).unwrap();
        bytes = frame(2, 2);
        send_with_fds(&a, &[IoSlice::new(&bytes)], &[null.as_fd(), null.as_fd()]).unwrap();
        let mut receiver = receiver();
        let mut buffer = vec![0u8; 4096];
        let (fed, frames) = collect(&mut receiver, &b, &mut buffer).unwrap();
        // The read stops after the skb that carried the fds.
        assert_eq!(frames, vec![0, 2]);
        assert_eq!(fed.fds, 2);
        assert!(
            !fed.drained,
            "a read with fds does not prove the socket empty"
        );
        let error = collect(&mut receiver, &b, &mut buffer).unwrap_err();
        assert!(matches!(error, RecvError::Io(ref e) if e.kind() == io::ErrorKind::WouldBlock));
    }

    #[test]
    fn a_frame_split_over_reads_is_handed_out_once_complete() {
        let (a, b) = UnixStream::pair().unwrap();
        let bytes = frame(7, 0);
        let (first, second) = bytes.split_at(5);
        send_with_fds(&a, &[IoSlice::new(first)], &[]).unwrap();
        let mut receiver = receiver();
        let mut buffer = vec![0u8; 4096];
        let (fed, frames) = collect(&mut receiver, &b, &mut buffer).unwrap();
        assert!(frames.is_empty());
        assert!(fed.drained);
        assert_eq!(receiver.reader().buffered_bytes(), 5);
        send_with_fds(&a, &[IoSlice::new(second)], &[]).unwrap();
        let (_, frames) = collect(&mut receiver, &b, &mut buffer).unwrap();
        assert_eq!(frames, vec![0]);
    }

    #[test]
    fn truncated_control_data_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<_> = (0..4)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        let bytes = frame(1, 4);
        send_with_fds(&a, &[IoSlice::new(&bytes)], &borrowed).unwrap();
        let mut buffer = vec![0u8; 4096];
        let mut receiver = receiver().with_max_fds(2);
        let error = collect(&mut receiver, &b, &mut buffer).unwrap_err();
        assert!(
            matches!(error, RecvError::Ancillary(FrameError::ControlTruncated)),
            "{error:?}"
        );
    }

    #[test]
    fn fds_no_frame_declares_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let bytes = frame(1, 0);
        send_with_fds(&a, &[IoSlice::new(&bytes)], &[null.as_fd()]).unwrap();
        let mut buffer = vec![0u8; 4096];
        let error = collect(&mut receiver(), &b, &mut buffer).unwrap_err();
        assert!(
            matches!(
                error,
                RecvError::Frame(FrameError::UnclaimedFds { count: 1 })
            ),
            "{error:?}"
        );
    }

    #[test]
    fn end_of_stream_is_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let mut buffer = vec![0u8; 64];
        let error = collect(&mut receiver(), &b, &mut buffer).unwrap_err();
        assert!(matches!(error, RecvError::Closed), "{error:?}");
    }

    #[test]
    fn a_consumer_error_stops_the_receive() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut bytes = frame(1, 0);
        bytes.extend(frame(2, 0));
        send_with_fds(&a, &[IoSlice::new(&bytes)], &[]).unwrap();
        let mut buffer = vec![0u8; 4096];
        let mut seen = 0;
        let error = receiver()
            .recv_frames(&b, &mut buffer, |_| {
                seen += 1;
                Err("no thanks")
            })
            .unwrap_err();
        assert!(matches!(error, RecvError::Consumer("no thanks")));
        assert_eq!(seen, 1);
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn a_tokio_stream_waits_for_its_frames() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let mut receiver = receiver();
        let mut buffer = vec![0u8; 4096];
        let mut frames = 0;
        let bytes = frame(1, 0);
        let reading = receiver.recv_frames_from(&b, &mut buffer, |_| {
            frames += 1;
            Ok::<(), Infallible>(())
        });
        let writing = async {
            tokio::task::yield_now().await;
            a.writable().await.unwrap();
            a.try_write(&bytes).unwrap();
        };
        let (fed, ()) = tokio::join!(reading, writing);
        assert_eq!(fed.unwrap().bytes, bytes.len());
        assert_eq!(frames, 1);
    }
}
