//! The handshake on a freshly connected socket: write HELLO, read frames
//! until the bus answers (WELCOME, or an ERROR refusing the connection),
//! and keep whatever the bus sent after its answer for the reader. What
//! HELLO says and how the answer is read are the core's
//! ([`crate::core::outbound`]); this file does the socket part.

use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use pbus_proto::frame::{FrameReader, OutQueue};
use pbus_proto::v1::{Header, Welcome};
use pbus_sys::framed::{FramedReceiver, RecvError};
use prost::Message;
use tokio::io::Interest;
use tokio::net::UnixStream;

use super::io::READ_BUFFER;
use crate::core::outbound::{answer_to_hello, HANDSHAKE_FRAME_LIMITS};
use crate::Error;

/// A frame the bus sent right after WELCOME, before the reader started.
pub(super) type EarlyFrame = (Header, Vec<u8>, Vec<OwnedFd>);

/// What a completed handshake hands on to the connection.
pub(super) struct Handshaken {
    /// The bus's answer: unique name, bus id, features, limits.
    pub(super) welcome: Welcome,
    /// The framed receiver, holding any partial frame read after WELCOME.
    pub(super) receiver: FramedReceiver,
    /// The read buffer, reused by the reader task.
    pub(super) buffer: Vec<u8>,
    /// Whole frames read after WELCOME, in order.
    pub(super) early: Vec<EarlyFrame>,
}

/// Sends `hello` (header and body) on `stream` and waits for the answer.
pub(super) async fn handshake(
    stream: &UnixStream,
    (header, body): (Header, Vec<u8>),
) -> Result<Handshaken, Error> {
    let mut out = OutQueue::<OwnedFd>::default();
    out.push(&header, &body, Vec::new());
    // The first frame is small; write it fully before anything else. If
    // the bus already refused the connection (a limit) the write fails,
    // but its ERROR frame is still waiting to be read: read it below.
    while !out.is_empty() {
        stream.writable().await?;
        match out.flush(|data, fds| send_on(stream, data, fds)) {
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                break;
            }
            Err(error) => return Err(error.into()),
        }
    }
    let mut receiver = FramedReceiver::new(FrameReader::new(HANDSHAKE_FRAME_LIMITS));
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut early: Vec<EarlyFrame> = Vec::new();
    let welcome = loop {
        let mut answer: Option<Result<Welcome, Error>> = None;
        receiver
            .recv_frames_from(stream, &mut buffer, |frame| {
                let header =
                    Header::decode(frame.header).map_err(|e| Error::Protocol(e.to_string()))?;
                if answer.is_some() {
                    early.push((header, frame.body.to_vec(), frame.fds));
                    return Ok(());
                }
                answer = Some(answer_to_hello(header, frame.body));
                Ok::<(), Error>(())
            })
            .await
            .map_err(|e| match e {
                RecvError::Io(e) => Error::Io(e),
                RecvError::Closed => {
                    Error::Protocol("the bus closed the connection during the handshake".into())
                }
                RecvError::Ancillary(e) => Error::Protocol(e.to_string()),
                RecvError::Frame(e) => Error::Protocol(e.to_string()),
                RecvError::Consumer(e) => e,
            })?;
        if let Some(answer) = answer {
            break answer?;
        }
    };
    Ok(Handshaken {
        welcome,
        receiver,
        buffer,
        early,
    })
}

/// One non-blocking sendmsg on `stream` (during the handshake).
fn send_on(stream: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> std::io::Result<usize> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    stream.try_io(Interest::WRITABLE, || {
        pbus_sys::fdpass::send_with_fds(stream, &[IoSlice::new(data)], &borrowed)
    })
}
