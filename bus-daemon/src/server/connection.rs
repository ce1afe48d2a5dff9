//! One connection's task: identify the peer from the kernel, run the
//! handshake (HELLO first, within the timeout, nothing else before it),
//! then read frames straight into the bus and flush this peer's own queue
//! when its socket becomes writable again.
//!
//! Reads go through `pbus_sys::framed`, the receive the client shares: it
//! refuses MSG_CTRUNC (the kernel has already closed the fds that did not
//! fit, so the frame they belonged to can never be delivered as the sender
//! meant it, and the fd bookkeeping of the stream is lost) and ties fds to
//! frames. What only the daemon checks happens between the read and the
//! split into frames: no fd may be a connection to this bus, and the fds are
//! charged to the sender's uid while the daemon holds them.

use std::cell::Cell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use pbus_identity::PeerIdentity;
use pbus_proto::frame::{FeedError, Flushed, FrameError, FrameLimits, FrameReader, RawFrame};
use pbus_sys::framed::{FramedReceiver, RecvError};
use tokio::io::unix::AsyncFdReadyGuard;
use tokio::io::Interest;
use tokio::sync::OwnedSemaphorePermit;

use super::{drive, send_frames, unread_by_peer, PeerIo, Shared, SharedBus, READ_BUDGET};
use crate::bus::{BusError, PeerId};
use crate::faces::native;

/// The first frame (HELLO) may be at most this large.
const MAX_HELLO_FRAME: u32 = 64 << 10;

/// Why a connection ends.
enum Close {
    /// The peer hung up.
    Eof,
    /// A socket error.
    Io(io::Error),
    /// The peer broke a rule; it is told why (if it is still listening).
    Refused(BusError),
}

/// Connection state the frame callback needs, apart from the reader.
struct State {
    peer: Option<PeerId>,
    /// Identity captured at accept, moved into the bus at HELLO.
    /// Boxed: the task keeps this slot for its whole life, and an idle
    /// connection should not pay for a whole identity twice.
    identity: Option<Box<PeerIdentity>>,
    /// Handshake slots (daemon-wide and per uid), released when the
    /// handshake completes.
    handshake_permit: Option<(OwnedSemaphorePermit, UidHandshakeSlot)>,
    /// The peer's uid, charged for the fds it makes the daemon hold.
    uid: u32,
    /// Fds received and not yet handed to the bus with their frame (the
    /// frame is incomplete): charged to `uid` in the daemon's fd budget, so
    /// half-sent frames cannot make the daemon hold fds for free.
    held_fds: u64,
    /// `held_fds` as last reported to the bus (for its pending-fd timeout).
    reported_held_fds: u64,
}

/// One of a uid's incomplete-handshake slots; freed on drop.
struct UidHandshakeSlot {
    shared: Rc<Shared>,
    uid: u32,
}

impl UidHandshakeSlot {
    fn enter(shared: &Rc<Shared>, uid: u32) -> Option<Self> {
        let mut counts = shared.handshakes_per_uid.borrow_mut();
        let count = counts.entry(uid).or_default();
        if *count >= shared.config.limits.max_incomplete_handshakes_per_uid {
            return None;
        }
        *count += 1;
        Some(Self {
            shared: Rc::clone(shared),
            uid,
        })
    }
}

impl Drop for UidHandshakeSlot {
    fn drop(&mut self) {
        let mut counts = self.shared.handshakes_per_uid.borrow_mut();
        if let Some(count) = counts.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// The connection's socket fd, charged to its uid in the daemon-wide fd
/// budget for as long as the connection lives.
struct SocketFdClaim {
    shared: Rc<Shared>,
    uid: u32,
}

impl SocketFdClaim {
    fn claim(shared: &Rc<Shared>, uid: u32) -> Result<Self, BusError> {
        shared.bus.borrow_mut().claim_socket_fd(uid)?;
        Ok(Self {
            shared: Rc::clone(shared),
            uid,
        })
    }
}

impl Drop for SocketFdClaim {
    fn drop(&mut self) {
        self.shared.bus.borrow_mut().release_socket_fd(self.uid);
    }
}

/// Serves one accepted connection until it closes or the daemon stops.
pub(super) async fn serve(shared: Rc<Shared>, stream: UnixStream, listener: Rc<str>) {
    let identity = match pbus_identity::identify(&stream, &listener, &shared.host) {
        Ok((identity, _pidfd)) => Box::new(identity),
        Err(error) => {
            tracing::warn!(%error, listener = %listener, "refusing connection: peer not identified");
            return;
        }
    };
    let uid = identity.uid;
    let Some(uid_slot) = UidHandshakeSlot::enter(&shared, uid) else {
        tracing::warn!(
            uid,
            pid = identity.pid,
            "refusing connection: too many incomplete handshakes of this uid"
        );
        write_error_directly(
            &stream,
            &BusError::LimitExceeded {
                limit: crate::config::Limit::MaxIncompleteHandshakesPerUid,
                message: format!("uid {uid} has too many connections completing their handshake"),
            },
        );
        return;
    };
    let Ok(permit) = Arc::clone(&shared.handshake_slots).try_acquire_owned() else {
        tracing::warn!(
            uid = identity.uid,
            pid = identity.pid,
            "refusing connection: too many incomplete handshakes"
        );
        write_error_directly(
            &stream,
            &BusError::LimitExceeded {
                limit: crate::config::Limit::MaxIncompleteHandshakes,
                message: "too many connections are completing their handshake".into(),
            },
        );
        return;
    };
    if let Err(error) = shared.bus.borrow().admit(uid) {
        tracing::warn!(uid, pid = identity.pid, %error, "refusing connection");
        write_error_directly(&stream, &error);
        return;
    }
    let _socket_fd = match SocketFdClaim::claim(&shared, uid) {
        Ok(claim) => claim,
        Err(error) => {
            tracing::warn!(uid, pid = identity.pid, %error, "refusing connection");
            write_error_directly(&stream, &error);
            return;
        }
    };
    // Boxed: only peers with a candidate container id wait here, and the
    // task should not carry the lookup's state for its whole life.
    let identity = Box::pin(super::runtime::confirm_container(&shared, identity)).await;
    let socket =
        match pbus_sys::reactor::register_owned(stream, Interest::READABLE | Interest::WRITABLE) {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!(uid, %error, "cannot register a connection");
                return;
            }
        };
    let io = Rc::new(PeerIo {
        socket,
        waker: Cell::new(None),
        closing: Cell::new(false),
    });
    let _registration = ConnectionRegistration::register(&shared, &io);
    let limits = &shared.config.limits;
    let mut receiver = FramedReceiver::new(
        FrameReader::new(FrameLimits {
            max_frame_bytes: limits.max_frame_bytes,
            max_header_bytes: limits.max_header_bytes,
        })
        .with_first_frame_limit(MAX_HELLO_FRAME),
    );
    let mut state = State {
        peer: None,
        identity: Some(identity),
        handshake_permit: Some((permit, uid_slot)),
        uid,
        held_fds: 0,
        reported_held_fds: 0,
    };
    // Boxed so that the timer's memory is given back once the handshake is
    // done: an idle connection holds no timer.
    let mut handshake_timer = Some(Box::pin(tokio::time::sleep(limits.handshake_timeout())));
    let close = loop {
        let event =
            std::future::poll_fn(|cx| next_event(&shared, &io, &state, &mut handshake_timer, cx))
                .await;
        match event {
            Event::Close => break None,
            Event::HandshakeTimeout => {
                break Some(Close::Refused(BusError::HandshakeFailed(format!(
                    "handshake not completed within {} ms",
                    limits.handshake_timeout_ms
                ))))
            }
            Event::Failed(error) => break Some(Close::Io(error)),
            Event::Readable(mut ready) => {
                if let Some(close) = read_ready(&shared, &io, &mut ready, &mut receiver, &mut state)
                {
                    break Some(close);
                }
                if state.peer.is_some() {
                    handshake_timer = None;
                }
            }
            Event::Writable(mut ready) => {
                let Some(id) = state.peer else { continue };
                let mut bus = shared.bus.borrow_mut();
                let flushed = bus.flush_peer(id, send_frames, unread_by_peer);
                // Fds still in flight: wait for the peer to read more (the
                // kernel wakes writers as the peer consumes), not for room.
                let waiting = bus.has_fds_in_flight(id);
                // Dropped frames may have queued errors for their senders.
                drive(&shared, &mut bus);
                drop(bus);
                match flushed {
                    Ok(Flushed::All) if !waiting => {}
                    Ok(_) => ready.clear_ready(),
                    Err(error) => break Some(Close::Io(error)),
                }
            }
        }
    };
    finish(&shared, &io, &state, close);
}

/// What woke a connection's task.
enum Event<'a> {
    /// The daemon stops, or the core doomed this peer.
    Close,
    /// The handshake did not complete in time.
    HandshakeTimeout,
    /// Polling the socket failed.
    Failed(io::Error),
    /// The socket has something to read.
    Readable(AsyncFdReadyGuard<'a, UnixStream>),
    /// The socket has room again and this peer's queue is not empty.
    Writable(AsyncFdReadyGuard<'a, UnixStream>),
}

/// One poll of everything a connection waits for, in a single future
/// (no per-wake-up futures to build and drop): closing, the socket's
/// readability, its writability when the peer's queue has something, and
/// the handshake timer while it runs.
fn next_event<'a>(
    shared: &Shared,
    io: &'a PeerIo,
    state: &State,
    handshake_timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<Event<'a>> {
    if io.closing.get() {
        return Poll::Ready(Event::Close);
    }
    io.register(cx.waker());
    match io.socket.poll_read_ready(cx) {
        Poll::Ready(Ok(ready)) => return Poll::Ready(Event::Readable(ready)),
        Poll::Ready(Err(error)) => return Poll::Ready(Event::Failed(error)),
        Poll::Pending => {}
    }
    let want_write = state.peer.is_some_and(|id| {
        let bus = shared.bus.borrow();
        bus.peer(id).is_some_and(|peer| !peer.outbox_is_empty()) || bus.has_fds_in_flight(id)
    });
    if want_write {
        match io.socket.poll_write_ready(cx) {
            Poll::Ready(Ok(ready)) => return Poll::Ready(Event::Writable(ready)),
            Poll::Ready(Err(error)) => return Poll::Ready(Event::Failed(error)),
            Poll::Pending => {}
        }
    }
    if let Some(timer) = handshake_timer {
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Event::HandshakeTimeout);
        }
    }
    Poll::Pending
}

/// Keeps a connection in the daemon's list (to close it at shutdown).
struct ConnectionRegistration {
    shared: Rc<Shared>,
    id: u64,
}

impl ConnectionRegistration {
    fn register(shared: &Rc<Shared>, io: &Rc<PeerIo>) -> Self {
        let id = shared.next_connection.get() + 1;
        shared.next_connection.set(id);
        shared
            .connections
            .borrow_mut()
            .insert(id, Rc::downgrade(io));
        if *shared.shutdown.borrow() {
            io.close();
        }
        Self {
            shared: Rc::clone(shared),
            id,
        }
    }
}

impl Drop for ConnectionRegistration {
    fn drop(&mut self) {
        self.shared.connections.borrow_mut().remove(&self.id);
    }
}

/// Reads what the socket has (up to the read budget), feeds it to the
/// frame reader, dispatches complete frames, then flushes every queue that
/// received something. Returns why the connection must close, if it must.
///
/// A read shorter than the buffer that brought no fds emptied the socket,
/// so readiness is cleared without another recvmsg just to see EAGAIN
/// (tokio keeps any readiness that arrived meanwhile).
fn read_ready(
    shared: &Rc<Shared>,
    io: &Rc<PeerIo>,
    ready: &mut AsyncFdReadyGuard<'_, UnixStream>,
    receiver: &mut FramedReceiver,
    state: &mut State,
) -> Option<Close> {
    let mut bus = shared.bus.borrow_mut();
    let mut scratch = shared.scratch.borrow_mut();
    let now = Instant::now();
    let mut total = 0usize;
    let close = loop {
        // MSG_CTRUNC or two fd sets in one read cannot be tied to frames:
        // the receive refuses both, as the client's does.
        let chunk = match receiver.recv(io.socket.get_ref(), &mut scratch) {
            Ok(chunk) => chunk,
            Err(RecvError::Io(error)) if error.kind() == io::ErrorKind::WouldBlock => {
                ready.clear_ready();
                break None;
            }
            Err(RecvError::Io(error)) => break Some(Close::Io(error)),
            Err(RecvError::Closed) => break Some(Close::Eof),
            Err(RecvError::Ancillary(error) | RecvError::Frame(error)) => {
                break Some(frame_error(error))
            }
            Err(RecvError::Consumer(never)) => match never {},
        };
        if let Some(index) = chunk
            .fds()
            .iter()
            .position(|fd| is_bus_connection(fd, &shared.listener_pids))
        {
            break Some(Close::Refused(BusError::FdsNotSupported(format!(
                "fd {index} of this read is a connection to this bus: bus connections \
                 cannot be passed (one held in a queue could keep itself alive)"
            ))));
        }
        let fd_count = chunk.fds().len() as u64;
        if fd_count > 0 {
            if let Err(error) = bus.claim_fds(state.uid, fd_count) {
                break Some(Close::Refused(error));
            }
            state.held_fds += fd_count;
        }
        total += chunk.len();
        let drained = chunk.drained();
        let fed = receiver.feed(chunk, |frame| on_frame(&mut bus, io, state, frame, now));
        match fed {
            Ok(()) => {}
            Err(FeedError::Frame(error)) => break Some(frame_error(error)),
            Err(FeedError::Consumer(close)) => break Some(close),
        }
        if state.peer.is_some_and(|id| bus.is_doomed(id)) {
            break None;
        }
        if drained {
            ready.clear_ready();
            break None;
        }
        if total >= READ_BUDGET {
            break None;
        }
    };
    if let Some(id) = state.peer {
        if state.held_fds != state.reported_held_fds {
            bus.set_partial_frame_fds(id, state.held_fds);
            state.reported_held_fds = state.held_fds;
        }
    }
    drive(shared, &mut bus);
    close
}

/// True when `fd` is a socket whose peer is one of this daemon's listening
/// sockets, i.e. a client's end of a connection to this bus (see
/// `Shared::listener_pids`). Passing one is refused outright, as kdbus did:
/// a connection whose own end sits in a queue of the daemon never hangs up.
fn is_bus_connection(fd: &OwnedFd, listener_pids: &[i32]) -> bool {
    matches!(
        pbus_sys::creds::socket_peer_pid(fd),
        Ok(Some(pid)) if pid != 0 && listener_pids.contains(&pid)
    )
}

/// Maps a framing error to the error the peer is told before it is closed.
fn frame_error(error: FrameError) -> Close {
    Close::Refused(match error {
        FrameError::FrameTooLarge { len, .. } => BusError::LimitExceeded {
            limit: crate::config::Limit::MaxFrameBytes,
            message: format!("frame of {len} bytes"),
        },
        FrameError::HeaderTooLarge { len, .. } => BusError::LimitExceeded {
            limit: crate::config::Limit::MaxHeaderBytes,
            message: format!("header of {len} bytes"),
        },
        other => BusError::ProtocolViolation(other.to_string()),
    })
}

fn on_frame(
    bus: &mut SharedBus,
    io: &Rc<PeerIo>,
    state: &mut State,
    frame: RawFrame<'_, OwnedFd>,
    now: Instant,
) -> Result<(), Close> {
    if !frame.fds.is_empty() {
        // The frame's fds leave the reader: from here on they are the
        // bus's (charged again if queued, closed if refused).
        let count = frame.fds.len() as u64;
        bus.release_fds(state.uid, count);
        state.held_fds -= count;
    }
    if let Some(id) = state.peer {
        return bus
            .dispatch(id, frame.header, frame.body, frame.fds, now)
            .map_err(|violation| Close::Refused(BusError::ProtocolViolation(violation.0)));
    }
    let hello = native::parse_hello(&frame).map_err(Close::Refused)?;
    let identity = *state.identity.take().expect("identity is kept until HELLO");
    let (uid, pid, container) = (identity.uid, identity.pid, identity.container.clone());
    let listener = identity.listener.clone();
    let id = bus
        .add_peer(
            Rc::clone(io),
            identity,
            &hello,
            std::time::SystemTime::now(),
        )
        .map_err(Close::Refused)?;
    state.peer = Some(id);
    state.handshake_permit = None;
    tracing::info!(
        peer = %id.unique_name(),
        uid,
        pid,
        runtime = container.runtime.as_str(),
        container = %container.id,
        %listener,
        client = %hello.client_name,
        "peer connected"
    );
    Ok(())
}

/// Best-effort ERROR to a peer that has no queue yet (refused before or
/// during the handshake). Never blocks.
fn write_error_directly(stream: &UnixStream, error: &BusError) {
    let bytes = native::refusal_frame(error);
    let _ = pbus_sys::fdpass::send_with_fds(stream, &[IoSlice::new(&bytes)], &[]);
}

/// Tells a refused peer why, removes it from the bus (releasing its names,
/// failing calls it owed) and flushes what that caused for others.
fn finish(shared: &Rc<Shared>, io: &Rc<PeerIo>, state: &State, close: Option<Close>) {
    let reason = match &close {
        None => "closed by the daemon".to_owned(),
        Some(Close::Eof) => "hung up".to_owned(),
        Some(Close::Io(error)) => format!("socket error: {error}"),
        Some(Close::Refused(error)) => error.to_string(),
    };
    let mut bus = shared.bus.borrow_mut();
    // Fds of a frame that never completed close with the reader.
    bus.release_fds(state.uid, state.held_fds);
    match state.peer {
        Some(id) => {
            // When the daemon stops, every connection ends the same way: what
            // removing this peer causes for the others (NoReply to its
            // callers, NameOwnerChanged, queue promotions) is not sent, since
            // they are about to be disconnected too. A caller must see its
            // connection end, not be told its callee went away.
            let stopping = *shared.shutdown.borrow();
            if let Some(Close::Refused(error)) = &close {
                bus.queue_error_to(id, 0, error);
            }
            if !stopping {
                let _ = bus.flush_peer(id, send_frames, unread_by_peer);
            }
            bus.remove_peer(id);
            if !stopping {
                drive(shared, &mut bus);
            }
            tracing::info!(peer = %id.unique_name(), reason, "peer disconnected");
        }
        None => {
            if let Some(Close::Refused(error)) = &close {
                write_error_directly(io.socket.get_ref(), error);
            }
            tracing::info!(reason, "connection closed before the handshake completed");
        }
    }
}
