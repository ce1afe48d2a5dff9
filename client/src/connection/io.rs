//! The socket side of a connection: the outgoing queue (a frame is written
//! at once when nothing waits, senders wait when the queue is over its
//! high-water mark), the writer task that flushes it whenever the socket
//! was full, and the reader task that reads frames, hands each to
//! [`dispatch`](super::dispatch), fails calls past their deadline, and
//! winds the connection down when the socket ends.

use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;

use pbus_proto::frame::{Flushed, OutQueue};
use pbus_proto::v1::Header;
use pbus_sys::framed::{FramedReceiver, RecvError};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::time::Sleep;

use super::dispatch::handle_frame;
use super::handshake::EarlyFrame;
use super::{Connection, Inner, WeakConnection};
use crate::core::inbound::{Inbound, MalformedHeader};
use crate::core::outbound::check_outgoing_limits;
use crate::core::pending::ConnectionEnd;
use crate::message::Outgoing;
use crate::Error;

/// Queued outgoing bytes above which senders wait for the bus to read.
const SEND_HIGH_WATER: usize = 4 << 20;
/// Read buffer of the handshake and the background reader.
pub(super) const READ_BUFFER: usize = 64 << 10;

/// The outgoing queue and whether the connection can still write.
pub(super) struct OutState {
    pub(super) queue: OutQueue<OwnedFd>,
    /// The socket failed or the connection ended: nothing more is sent.
    pub(super) closed: bool,
}

/// One non-blocking sendmsg on the connected socket. `WouldBlock` sends
/// the writer task to wait for writability.
fn send_now(
    stream: &AsyncFd<std::os::unix::net::UnixStream>,
    data: &[u8],
    fds: &[OwnedFd],
) -> std::io::Result<usize> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    pbus_sys::fdpass::send_with_fds(stream.get_ref(), &[IoSlice::new(data)], &borrowed)
}

impl Connection {
    /// Queues a frame, waiting first if too much is already queued.
    /// `outgoing` sets the header's payload fields; the header stays the
    /// caller's, so a frame refused here can be answered with another.
    pub(crate) async fn send(&self, header: &mut Header, outgoing: Outgoing) -> Result<(), Error> {
        let (body, fds) = outgoing.into_wire(header, self.inner.memfd_threshold)?;
        check_outgoing_limits(&self.inner.limits, header, body.len(), fds.len())?;
        if self.queue(header, &body, fds)? {
            return Ok(());
        }
        // The queue is over its high-water mark: wait until the writer has
        // drained it below, so a sender cannot grow it without bound.
        loop {
            let drained = self.inner.out_drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let out = self.inner.out.lock().expect("out lock");
                if out.closed {
                    return Err(Error::Disconnected);
                }
                if out.queue.queued_bytes() < SEND_HIGH_WATER {
                    return Ok(());
                }
            }
            drained.await;
        }
    }

    /// Appends a frame to the queue and writes right away if nothing was
    /// waiting; otherwise the writer task is already draining the queue.
    /// Returns whether the queue is below its high-water mark afterwards.
    fn queue(&self, header: &Header, body: &[u8], fds: Vec<OwnedFd>) -> Result<bool, Error> {
        let mut out = self.inner.out.lock().expect("out lock");
        if out.closed {
            return Err(Error::Disconnected);
        }
        let was_empty = out.queue.is_empty();
        out.queue.push(header, body, fds);
        if was_empty {
            match out
                .queue
                .flush(|data, fds| send_now(&self.inner.stream, data, fds))
            {
                Ok(Flushed::All) => {}
                // `flush` has no gate, so it never waits for fds in flight.
                Ok(Flushed::Blocked | Flushed::FdsWaiting) => self.inner.out_wake.notify_one(),
                Err(error) => {
                    out.closed = true;
                    out.queue.clear();
                    return Err(error.into());
                }
            }
        }
        Ok(out.queue.queued_bytes() < SEND_HIGH_WATER)
    }
}

/// Marks the queue closed, drops what it holds, and wakes waiting senders
/// (who then fail with `Disconnected`).
fn close_queue(inner: &Inner) {
    {
        let mut out = inner.out.lock().expect("out lock");
        out.closed = true;
        out.queue.clear();
    }
    inner.out_drained.notify_waiters();
}

/// Flushes the queue whenever the socket was full and becomes writable.
pub(super) async fn write_loop(inner: Arc<Inner>, mut closed: watch::Receiver<bool>) {
    'outer: loop {
        tokio::select! {
            _ = inner.out_wake.notified() => {}
            _ = closed.changed() => break,
        }
        loop {
            let mut ready = tokio::select! {
                ready = inner.stream.writable() => match ready {
                    Ok(ready) => ready,
                    Err(_) => break 'outer,
                },
                _ = closed.changed() => break 'outer,
            };
            let mut out = inner.out.lock().expect("out lock");
            match out
                .queue
                .flush(|data, fds| send_now(&inner.stream, data, fds))
            {
                Ok(Flushed::All) => {
                    drop(out);
                    inner.out_drained.notify_waiters();
                    break;
                }
                Ok(Flushed::Blocked | Flushed::FdsWaiting) => {
                    ready.clear_ready();
                    drop(out);
                    inner.out_drained.notify_waiters();
                }
                Err(error) => {
                    tracing::debug!(%error, "write to the bus failed");
                    break 'outer;
                }
            }
        }
    }
    close_queue(&inner);
}

/// Arms `timer` for the earliest call deadline, or disarms it.
fn arm_call_timer(inner: &Inner, timer: Pin<&mut Sleep>, armed: &mut bool) {
    let deadline = inner.calls.lock().expect("calls lock").arm_timer();
    *armed = deadline.is_some();
    if let Some(deadline) = deadline {
        timer.reset(tokio::time::Instant::from_std(deadline));
    }
}

/// Fails the calls whose deadline has passed.
fn expire_calls(inner: &Inner) {
    let now = tokio::time::Instant::now().into_std();
    let expired = inner.calls.lock().expect("calls lock").expire(now);
    for call in expired {
        tracing::warn!(serial = call.serial, error = %call.error, "call timed out locally");
        let _ = call.waiter.send(Err(call.error));
    }
}

/// Reads frames from the bus and routes them: replies to waiting calls,
/// calls to handlers (each in its own task), signals to subscriptions.
pub(super) async fn read_loop(
    weak: WeakConnection,
    mut receiver: FramedReceiver,
    mut buffer: Vec<u8>,
    early: Vec<EarlyFrame>,
    mut closed: watch::Receiver<bool>,
) {
    let inner = Arc::clone(&weak.inner);
    for (header, body, fds) in early {
        handle_frame(&weak, Inbound::classify(header), &body, fds);
    }
    // Built once: the application closing the connection ends the loop.
    let closed_by_application = closed.wait_for(|closed| *closed);
    tokio::pin!(closed_by_application);
    // The backstop for calls the bus fails to answer (see
    // `core::pending::BUS_ANSWER_GRACE`); armed only while calls wait.
    let call_timer = tokio::time::sleep_until(tokio::time::Instant::now());
    tokio::pin!(call_timer);
    let mut call_timer_armed = false;
    let end: ConnectionEnd = 'outer: loop {
        let mut ready = tokio::select! {
            biased;
            ready = inner.stream.readable() => match ready {
                Ok(ready) => ready,
                Err(error) => {
                    tracing::debug!(%error, "socket error");
                    break ConnectionEnd::Closed;
                }
            },
            _ = &mut closed_by_application => {
                tracing::debug!("closed by the application");
                break ConnectionEnd::Closed;
            }
            () = inner.timer_rearm.notified() => {
                arm_call_timer(&inner, call_timer.as_mut(), &mut call_timer_armed);
                continue;
            }
            () = &mut call_timer, if call_timer_armed => {
                expire_calls(&inner);
                arm_call_timer(&inner, call_timer.as_mut(), &mut call_timer_armed);
                continue;
            }
        };
        loop {
            let fed = receiver.recv_frames(inner.stream.get_ref(), &mut buffer, |frame| {
                let inbound = Inbound::from_wire(frame.header)?;
                handle_frame(&weak, inbound, frame.body, frame.fds);
                Ok::<(), MalformedHeader>(())
            });
            match fed {
                // A short read that brought no fds emptied the socket: wait
                // for the next readiness instead of a recvmsg that says
                // EAGAIN.
                Ok(fed) if fed.drained => {
                    ready.clear_ready();
                    break;
                }
                Ok(_) => {}
                Err(RecvError::Io(error)) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                Err(RecvError::Io(error)) => {
                    tracing::debug!(%error, "socket error");
                    break 'outer ConnectionEnd::Closed;
                }
                Err(RecvError::Closed) => {
                    tracing::debug!("the bus closed the connection");
                    break 'outer ConnectionEnd::Closed;
                }
                Err(RecvError::Ancillary(error)) => {
                    break 'outer ConnectionEnd::Violation(format!(
                        "protocol violation by the bus: {error}"
                    ))
                }
                Err(RecvError::Frame(error)) => {
                    break 'outer ConnectionEnd::Violation(format!(
                        "bad frame from the bus: {error}"
                    ))
                }
                Err(RecvError::Consumer(malformed)) => {
                    break 'outer ConnectionEnd::Violation(malformed.to_string())
                }
            }
        }
    };
    tracing::debug!(connection = %inner.unique_name, ?end, "connection closed");
    let _ = inner.closed.send(true);
    // The application may keep its handles (and so the socket) long after
    // this; shut the socket down so the bus sees the hang-up now, releases
    // our names and fails the calls waiting on us (after MSG_CTRUNC or a
    // bad frame the connection is unusable, but would otherwise look alive).
    inner.shut_down_socket();
    close_queue(&inner);
    let failed = inner.calls.lock().expect("calls lock").end(end);
    for (waiter, error) in failed {
        let _ = waiter.send(Err(error));
    }
    inner
        .subscriptions
        .lock()
        .expect("subscriptions lock")
        .close_all();
}
