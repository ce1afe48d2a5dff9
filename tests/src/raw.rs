//! A client that speaks the wire protocol frame by frame, for adversarial
//! tests: it sends whatever bytes, headers and fds a test builds (forged
//! sender fields, spoofed replies, garbage, oversized prefixes) and reads
//! back decoded frames with a timeout.
//!
//! Frames that arrive while a helper waits for something else (a bus reply,
//! a particular signal) are kept in an inbox, in order, so a test can check
//! afterwards exactly what else it was sent.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use pbus_proto::frame::{encode_frame, FrameLimits, FrameReader};
use pbus_proto::v1::{
    AddMatchRequest, ErrorCode, ErrorInfo, Feature, Header, HeaderFlag, MatchRule, MessageKind,
    PingReply, PingRequest, ReleaseNameReply, ReleaseNameRequest, ReleaseNameResult,
    RemoveMatchRequest, RequestNameReply, RequestNameRequest, RequestNameResult, Welcome,
};
use pbus_proto::{BUS_NAME, BUS_PATH, PROTOCOL_VERSION};
use pbus_sys::framed::{FramedReceiver, RecvError};
use prost::{Message, Name};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::{fdkit, frames, TIMEOUT};

/// One frame received from the bus, decoded.
#[derive(Debug)]
pub struct RawMessage {
    /// The decoded header.
    pub header: Header,
    /// The body bytes.
    pub body: Vec<u8>,
    /// Fds that came with the frame.
    pub fds: Vec<OwnedFd>,
}

impl RawMessage {
    /// The frame's kind.
    pub fn kind(&self) -> MessageKind {
        MessageKind::try_from(self.header.kind).unwrap_or(MessageKind::Unspecified)
    }

    /// The error info of an ERROR frame.
    pub fn error(&self) -> Option<&ErrorInfo> {
        (self.kind() == MessageKind::Error)
            .then_some(self.header.error.as_ref())
            .flatten()
    }

    /// The error code of an ERROR frame.
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.error()
            .map(|e| ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified))
    }

    /// The stamped sender's unique name (empty if none).
    pub fn sender_name(&self) -> &str {
        self.header
            .sender
            .as_ref()
            .map_or("", |s| s.unique_name.as_str())
    }

    /// True for a signal sent by the bus itself.
    pub fn is_bus_signal(&self) -> bool {
        self.kind() == MessageKind::Signal && self.sender_name() == BUS_NAME
    }

    /// Decodes the body as `M`; panics if it does not decode.
    pub fn decode<M: Message + Default>(&self) -> M {
        M::decode(self.body.as_slice()).unwrap_or_else(|error| {
            panic!(
                "cannot decode the body of {:?} as {}: {error}",
                self.header,
                std::any::type_name::<M>()
            )
        })
    }
}

/// Why a [`RawClient`] read or handshake failed.
#[derive(Debug)]
pub enum RawError {
    /// Nothing arrived before the deadline.
    Timeout,
    /// The bus closed the connection (EOF or reset).
    Closed,
    /// A socket error.
    Io(io::Error),
    /// The bus sent bytes that are not valid frames.
    Frame(String),
    /// The handshake was answered with an ERROR.
    Refused(ErrorInfo),
}

impl fmt::Display for RawError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => write!(f, "timed out"),
            Self::Closed => write!(f, "connection closed by the bus"),
            Self::Io(error) => write!(f, "I/O error: {error}"),
            Self::Frame(why) => write!(f, "bad frame from the bus: {why}"),
            Self::Refused(info) => write!(f, "refused: {}: {}", info.name, info.message),
        }
    }
}

impl std::error::Error for RawError {}

impl From<io::Error> for RawError {
    fn from(error: io::Error) -> Self {
        Self::Io(error)
    }
}

/// A hand-driven connection to the bus.
pub struct RawClient {
    stream: UnixStream,
    /// The receive the daemon and the client use (MSG_CTRUNC and split fd
    /// sets refused, fds tied to their frames).
    receiver: FramedReceiver,
    buffer: Vec<u8>,
    /// Decoded frames not yet handed out.
    frames: VecDeque<RawMessage>,
    /// Frames skipped while waiting for something else.
    inbox: VecDeque<RawMessage>,
    closed: bool,
    next_serial: u64,
    welcome: Option<Welcome>,
}

impl fmt::Debug for RawClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawClient")
            .field("unique_name", &self.unique_name())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl RawClient {
    /// Connects without sending anything.
    pub async fn connect(path: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(path).await?;
        Ok(Self {
            stream,
            receiver: FramedReceiver::new(FrameReader::new(FrameLimits {
                max_frame_bytes: 64 << 20,
                max_header_bytes: 1 << 20,
            })),
            buffer: vec![0u8; 256 << 10],
            frames: VecDeque::new(),
            inbox: VecDeque::new(),
            closed: false,
            next_serial: 1,
            welcome: None,
        })
    }

    /// Connects and completes the handshake (protocol version 1, fds and
    /// memfds announced).
    pub async fn connect_hello(path: &Path) -> Result<Self, RawError> {
        let mut client = Self::connect(path).await?;
        client
            .hello(
                PROTOCOL_VERSION,
                Feature::FdPassing as u32 | Feature::Memfd as u32,
            )
            .await?;
        Ok(client)
    }

    /// Sends HELLO with `protocol_version` and `features` and waits for the
    /// answer: `Ok(Welcome)`, or `Err(Refused)` with the bus's ERROR.
    pub async fn hello(
        &mut self,
        protocol_version: u32,
        features: u32,
    ) -> Result<Welcome, RawError> {
        self.send_hello(protocol_version, features).await?;
        let answer = self.recv(TIMEOUT).await?;
        match answer.kind() {
            MessageKind::Welcome => {
                let welcome: Welcome = answer.decode();
                self.welcome = Some(welcome.clone());
                Ok(welcome)
            }
            MessageKind::Error => Err(RawError::Refused(answer.header.error.unwrap_or_default())),
            other => Err(RawError::Frame(format!("HELLO answered with {other:?}"))),
        }
    }

    /// Sends a HELLO frame without waiting for the answer.
    pub async fn send_hello(&mut self, protocol_version: u32, features: u32) -> io::Result<()> {
        let (header, body) = frames::hello(protocol_version, features, "pbus-tests raw client");
        self.send(&header, &body).await
    }

    /// The unique name from WELCOME (empty before the handshake).
    pub fn unique_name(&self) -> &str {
        self.welcome.as_ref().map_or("", |w| w.unique_name.as_str())
    }

    /// The WELCOME the bus sent, if the handshake completed.
    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
    }

    /// A fresh non-zero serial.
    pub fn next_serial(&mut self) -> u64 {
        let serial = self.next_serial;
        self.next_serial += 1;
        serial
    }

    /// Writes raw bytes (anything at all) to the socket.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Encodes and sends one frame with no fds.
    pub async fn send(&mut self, header: &Header, body: &[u8]) -> io::Result<()> {
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, header, body, 0);
        self.send_bytes(&bytes).await
    }

    /// Encodes and sends one frame with `fds` attached to its first byte
    /// (one SCM_RIGHTS set, `fd_count` = `fds.len()`).
    pub async fn send_with_fds(
        &mut self,
        header: &Header,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let mut bytes = Vec::new();
        let count = u16::try_from(fds.len()).expect("at most 65535 fds");
        encode_frame(&mut bytes, header, body, count);
        self.send_bytes_with_fds(&bytes, fds).await
    }

    /// Sends `bytes` with `fds` attached to the first byte, whatever the
    /// bytes say (for frames whose fd count lies).
    pub async fn send_bytes_with_fds(
        &mut self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let mut written = 0;
        assert!(!bytes.is_empty(), "fds need at least one byte to ride on");
        while written < bytes.len() {
            self.stream.writable().await?;
            let attach = if written == 0 { fds } else { &[] };
            let rest = &bytes[written..];
            match self.stream.try_io(Interest::WRITABLE, || {
                pbus_sys::fdpass::send_with_fds(&self.stream, &[IoSlice::new(rest)], attach)
            }) {
                Ok(n) => written += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Sends a METHOD_CALL and returns its serial. `timeout_ms` 0 means the
    /// bus default.
    pub async fn send_call(
        &mut self,
        destination: &str,
        member: &str,
        payload_type: &str,
        body: &[u8],
        timeout_ms: u32,
    ) -> io::Result<u64> {
        let header = Header {
            payload_type: payload_type.to_owned(),
            timeout_ms,
            ..frames::call_header(self.next_serial(), destination, member)
        };
        self.send(&header, body).await?;
        Ok(header.serial)
    }

    /// Sends a METHOD_CALL with no body and `fds` attached; returns its
    /// serial.
    pub async fn send_call_with_fds(
        &mut self,
        destination: &str,
        member: &str,
        fds: &[OwnedFd],
    ) -> io::Result<u64> {
        let header = frames::call_header(self.next_serial(), destination, member);
        self.send_with_fds(&header, &[], &fdkit::borrow_all(fds))
            .await?;
        Ok(header.serial)
    }

    /// Sends a signal (broadcast if `destination` is empty) and returns its
    /// serial.
    pub async fn send_signal(
        &mut self,
        destination: &str,
        path: &str,
        member: &str,
        args: &[&str],
        body: &[u8],
    ) -> io::Result<u64> {
        let header = Header {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..frames::signal_header(self.next_serial(), destination, path, member)
        };
        self.send(&header, body).await?;
        Ok(header.serial)
    }

    /// Sends a METHOD_RETURN for `reply_serial` to `destination` and
    /// returns the reply frame's own serial.
    pub async fn send_reply(
        &mut self,
        destination: &str,
        reply_serial: u64,
        payload_type: &str,
        body: &[u8],
    ) -> io::Result<u64> {
        let header = Header {
            payload_type: payload_type.to_owned(),
            ..frames::reply_header(self.next_serial(), destination, reply_serial)
        };
        self.send(&header, body).await?;
        Ok(header.serial)
    }

    /// Reads from the socket until at least one more frame is decoded.
    async fn fill(&mut self, deadline: Instant) -> Result<(), RawError> {
        loop {
            if self.closed {
                return Err(RawError::Closed);
            }
            let Self {
                stream,
                buffer,
                receiver,
                frames,
                ..
            } = self;
            let before = frames.len();
            let received = receiver.recv_frames_from(stream, buffer, |frame| {
                let header = Header::decode(frame.header).map_err(|e| e.to_string())?;
                frames.push_back(RawMessage {
                    header,
                    body: frame.body.to_vec(),
                    fds: frame.fds,
                });
                Ok::<(), String>(())
            });
            match tokio::time::timeout_at(deadline, received).await {
                Err(_) => return Err(RawError::Timeout),
                Ok(Ok(_)) => {}
                Ok(Err(RecvError::Closed)) => {
                    self.closed = true;
                    return Err(RawError::Closed);
                }
                // The daemon closed while our bytes were unread: a reset
                // instead of EOF, after everything it sent was read.
                Ok(Err(RecvError::Io(error)))
                    if matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    self.closed = true;
                    return Err(RawError::Closed);
                }
                Ok(Err(RecvError::Io(error))) => return Err(error.into()),
                Ok(Err(RecvError::Ancillary(error) | RecvError::Frame(error))) => {
                    return Err(RawError::Frame(error.to_string()))
                }
                Ok(Err(RecvError::Consumer(error))) => return Err(RawError::Frame(error)),
            }
            if self.frames.len() > before {
                return Ok(());
            }
        }
    }

    /// The next frame, waiting up to `timeout`. Frames already decoded are
    /// returned first even if the connection has since closed.
    pub async fn recv(&mut self, timeout: Duration) -> Result<RawMessage, RawError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Ok(frame);
            }
            self.fill(deadline).await?;
        }
    }

    /// The next frame for which `wanted` is true; frames before it go to the
    /// inbox.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        mut wanted: impl FnMut(&RawMessage) -> bool,
    ) -> Result<RawMessage, RawError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.recv(left).await?;
            if wanted(&frame) {
                return Ok(frame);
            }
            self.inbox.push_back(frame);
        }
    }

    /// The answer (METHOD_RETURN or ERROR) to our call `serial`; other
    /// frames go to the inbox.
    pub async fn recv_reply(
        &mut self,
        serial: u64,
        timeout: Duration,
    ) -> Result<RawMessage, RawError> {
        self.recv_until(timeout, |frame| {
            matches!(frame.kind(), MessageKind::MethodReturn | MessageKind::Error)
                && frame.header.reply_serial == serial
        })
        .await
    }

    /// The next METHOD_CALL sent to us; other frames go to the inbox.
    pub async fn recv_call(&mut self, timeout: Duration) -> Result<RawMessage, RawError> {
        self.recv_until(timeout, |frame| frame.kind() == MessageKind::MethodCall)
            .await
    }

    /// Reads until the bus closes the connection and returns every frame it
    /// sent first (usually the ERROR saying why). Fails with `Timeout` if the
    /// connection stays open.
    pub async fn read_until_closed(
        &mut self,
        timeout: Duration,
    ) -> Result<Vec<RawMessage>, RawError> {
        let deadline = Instant::now() + timeout;
        let mut frames: Vec<RawMessage> = self.frames.drain(..).collect();
        loop {
            match self.fill(deadline).await {
                Ok(()) => frames.extend(self.frames.drain(..)),
                Err(RawError::Closed) => {
                    frames.extend(self.frames.drain(..));
                    return Ok(frames);
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// True once the bus closed the connection (as far as reads have seen).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Takes every frame skipped so far by [`recv_until`](Self::recv_until)
    /// and the helpers built on it.
    pub fn take_inbox(&mut self) -> Vec<RawMessage> {
        self.inbox.drain(..).collect()
    }

    /// After a round trip through the bus ([`sync`](Self::sync)), every
    /// frame we were sent and have not read, bus signals left out (the inbox
    /// is emptied).
    pub async fn take_delivered(&mut self) -> Vec<RawMessage> {
        self.sync().await;
        self.take_inbox()
            .into_iter()
            .filter(|frame| !frame.is_bus_signal())
            .collect()
    }

    /// After a round trip through the bus ([`sync`](Self::sync)), the
    /// ERROR it answered our frame `serial` with, if it refused it. The
    /// inbox is emptied.
    pub async fn refusal_of(&mut self, serial: u64) -> Option<ErrorInfo> {
        self.sync().await;
        self.take_inbox()
            .into_iter()
            .find(|frame| frame.kind() == MessageKind::Error && frame.header.reply_serial == serial)
            .map(|frame| frame.header.error.unwrap_or_default())
    }

    /// Calls a bus method and waits for its answer: `Ok(reply)` or
    /// `Err(error info)`. Panics if the bus does not answer in time.
    pub async fn bus_call<Req: Message + Name, Rep: Message + Default>(
        &mut self,
        member: &str,
        request: &Req,
    ) -> Result<Rep, ErrorInfo> {
        let header = self.bus_call_header::<Req>(member, 0);
        self.send(&header, &request.encode_to_vec())
            .await
            .unwrap_or_else(|error| panic!("cannot send {member}: {error}"));
        let reply = self
            .recv_reply(header.serial, TIMEOUT)
            .await
            .unwrap_or_else(|error| panic!("no answer to {member}: {error}"));
        match reply.kind() {
            MessageKind::MethodReturn => Ok(reply.decode()),
            _ => Err(reply.header.error.unwrap_or_default()),
        }
    }

    /// Sends a bus call flagged NO_REPLY_EXPECTED.
    pub async fn bus_call_no_reply<Req: Message + Name>(
        &mut self,
        member: &str,
        request: &Req,
    ) -> io::Result<()> {
        let header = self.bus_call_header::<Req>(member, HeaderFlag::NoReplyExpected as u32);
        self.send(&header, &request.encode_to_vec()).await
    }

    /// The header of a call of the bus's `member` with a `Req` body.
    fn bus_call_header<Req: Name>(&mut self, member: &str, flags: u32) -> Header {
        Header {
            path: BUS_PATH.to_owned(),
            payload_type: Req::full_name(),
            flags,
            ..frames::call_header(self.next_serial(), BUS_NAME, member)
        }
    }

    /// `RequestName`.
    pub async fn request_name(
        &mut self,
        name: &str,
        flags: u32,
    ) -> Result<RequestNameResult, ErrorInfo> {
        let reply: RequestNameReply = self
            .bus_call(
                "RequestName",
                &RequestNameRequest {
                    name: name.to_owned(),
                    flags,
                },
            )
            .await?;
        Ok(RequestNameResult::try_from(reply.result).expect("known RequestName result"))
    }

    /// `ReleaseName`.
    pub async fn release_name(&mut self, name: &str) -> Result<ReleaseNameResult, ErrorInfo> {
        let reply: ReleaseNameReply = self
            .bus_call(
                "ReleaseName",
                &ReleaseNameRequest {
                    name: name.to_owned(),
                },
            )
            .await?;
        Ok(ReleaseNameResult::try_from(reply.result).expect("known ReleaseName result"))
    }

    /// `AddMatch`; panics if the bus refuses the rule.
    pub async fn add_match(&mut self, rule: MatchRule) {
        self.try_add_match(rule)
            .await
            .unwrap_or_else(|error| panic!("AddMatch refused: {error:?}"));
    }

    /// `AddMatch`, which the bus may refuse.
    pub async fn try_add_match(&mut self, rule: MatchRule) -> Result<(), ErrorInfo> {
        let _: pbus_proto::v1::Empty = self
            .bus_call("AddMatch", &AddMatchRequest { rule: Some(rule) })
            .await?;
        Ok(())
    }

    /// `RemoveMatch`.
    pub async fn remove_match(&mut self, rule: MatchRule) -> Result<(), ErrorInfo> {
        let _: pbus_proto::v1::Empty = self
            .bus_call("RemoveMatch", &RemoveMatchRequest { rule: Some(rule) })
            .await?;
        Ok(())
    }

    /// `Ping`: a round trip through the bus. Every frame the bus queued for
    /// this client before answering is in the inbox afterwards.
    pub async fn sync(&mut self) {
        let _: PingReply = self
            .bus_call("Ping", &PingRequest {})
            .await
            .unwrap_or_else(|error| panic!("Ping refused: {error:?}"));
    }

    /// The underlying socket, for tests that need to do something odd with
    /// it (shut down one direction, stop reading).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}
