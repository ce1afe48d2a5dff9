//! Method calls from this connection: [`Connection::call`],
//! [`Connection::method_call`] and its [`CallBuilder`], and the waiting
//! for the reply. Serials and the pending-call table are the core's
//! ([`crate::core::pending`]); this file registers a call there, sends it,
//! and awaits the answer the reader hands over.

use std::time::Duration;

use pbus_proto::names::{BusName, MemberName, ObjectPath};
use pbus_proto::v1::{Header, HeaderFlag, MessageKind};
use prost::{Message, Name};
use tokio::sync::oneshot;

use super::{Connection, Inner};
use crate::core::pending::{bus_wait, wire_timeout_ms};
use crate::message::{Incoming, Outgoing};
use crate::Error;

/// Where the reader sends the answer to one call.
pub(super) type PendingReply = oneshot::Sender<Result<Incoming, Error>>;

impl Connection {
    /// Calls `method` on `destination` with a typed request and waits for
    /// the typed reply, with the default timeout.
    ///
    /// ```no_run
    /// # async fn example(connection: pbus::Connection) -> Result<(), pbus::Error> {
    /// use pbus::proto::v1::{PingReply, PingRequest};
    /// let reply: PingReply = connection.call("org.pbus.Bus", "Ping", &PingRequest {}).await?;
    /// println!("bus {} up for {} ms", reply.bus_id, reply.uptime_ms);
    /// # Ok(()) }
    /// ```
    pub async fn call<Req, Rep>(
        &self,
        destination: &str,
        method: &str,
        request: &Req,
    ) -> Result<Rep, Error>
    where
        Req: Message + Name,
        Rep: Message + Default + Name,
    {
        self.method_call(destination, method).call(request).await
    }

    /// A call with options (path, timeout, fds, memfds).
    pub fn method_call(&self, destination: &str, method: &str) -> CallBuilder {
        CallBuilder {
            connection: self.clone(),
            destination: destination.to_owned(),
            method: method.to_owned(),
            path: String::new(),
            timeout: None,
            no_reply: false,
        }
    }

    /// A serial for a frame that expects no reply (a signal, a reply, a
    /// call flagged `NO_REPLY_EXPECTED`).
    pub(crate) fn next_serial(&self) -> u64 {
        self.inner.calls.lock().expect("calls lock").next_serial()
    }

    /// Sends a method call and waits for its reply.
    pub(crate) async fn call_raw(
        &self,
        mut header: Header,
        outgoing: Outgoing,
        timeout: Duration,
    ) -> Result<Incoming, Error> {
        header.kind = MessageKind::MethodCall as i32;
        header.timeout_ms = wire_timeout_ms(timeout);
        let waits_for = bus_wait(header.timeout_ms, &self.inner.limits);
        let (tx, rx) = oneshot::channel();
        let now = tokio::time::Instant::now().into_std();
        let registered = self
            .inner
            .calls
            .lock()
            .expect("calls lock")
            .register(tx, now, waits_for)?;
        if registered.rearm_timer {
            self.inner.timer_rearm.notify_one();
        }
        header.serial = registered.serial;
        let mut guard = PendingGuard {
            inner: &self.inner,
            serial: registered.serial,
            armed: true,
        };
        self.send(&mut header, outgoing).await?;
        // The bus enforces the timeout and always answers (reply, error or
        // Timeout); if the bus goes away the connection closes and every
        // pending call fails with Disconnected. The reader's local deadline
        // only catches a bus that stopped answering.
        let result = match rx.await {
            // The reader took the entry out when it answered.
            Ok(result) => {
                guard.armed = false;
                result
            }
            Err(_) => Err(Error::Disconnected),
        };
        drop(guard);
        result
    }

    /// Sends a call without waiting for (or expecting) a reply.
    pub(crate) async fn call_no_reply(
        &self,
        mut header: Header,
        outgoing: Outgoing,
    ) -> Result<(), Error> {
        header.serial = self.next_serial();
        header.kind = MessageKind::MethodCall as i32;
        header.flags |= HeaderFlag::NoReplyExpected as u32;
        self.send(&mut header, outgoing).await
    }

    fn default_timeout(&self) -> Duration {
        self.inner.default_timeout
    }
}

/// Removes a pending-call entry if the caller gives up (drop or error).
struct PendingGuard<'a> {
    inner: &'a Inner,
    serial: u64,
    /// False once the entry is gone already.
    armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.inner
            .calls
            .lock()
            .expect("calls lock")
            .cancel(self.serial);
    }
}

/// Options for one method call; see [`Connection::method_call`].
#[must_use = "a call does nothing until .call(..).await or .send(..).await"]
#[derive(Debug)]
pub struct CallBuilder {
    connection: Connection,
    destination: String,
    method: String,
    path: String,
    timeout: Option<Duration>,
    no_reply: bool,
}

impl CallBuilder {
    /// Object path of the call.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// How long to wait for the reply.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Do not expect a reply: [`send`](Self::send) returns once queued.
    pub fn no_reply(mut self) -> Self {
        self.no_reply = true;
        self
    }

    /// The call's header; the builder's strings move into it.
    fn take_header(&mut self) -> Result<Header, Error> {
        BusName::validate(&self.destination)?;
        MemberName::validate(&self.method)?;
        if !self.path.is_empty() {
            ObjectPath::validate(&self.path)?;
        }
        Ok(Header {
            destination: std::mem::take(&mut self.destination),
            member: std::mem::take(&mut self.method),
            path: std::mem::take(&mut self.path),
            ..Header::default()
        })
    }

    /// Sends a typed request and decodes the typed reply.
    pub async fn call<Req, Rep>(self, request: &Req) -> Result<Rep, Error>
    where
        Req: Message + Name,
        Rep: Message + Default + Name,
    {
        let reply = self.send(Outgoing::new(request)).await?;
        match reply {
            Some(reply) => reply.decode(),
            None => Err(Error::Protocol("no reply was requested".into())),
        }
    }

    /// Sends a raw request (with fds and memfds if any). Returns the reply,
    /// or `None` for [`no_reply`](Self::no_reply) calls.
    pub async fn send(mut self, request: Outgoing) -> Result<Option<Incoming>, Error> {
        let header = self.take_header()?;
        if self.no_reply {
            self.connection.call_no_reply(header, request).await?;
            return Ok(None);
        }
        let timeout = self
            .timeout
            .unwrap_or_else(|| self.connection.default_timeout());
        self.connection
            .call_raw(header, request, timeout)
            .await
            .map(Some)
    }
}
