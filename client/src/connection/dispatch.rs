//! Where each inbound frame goes, once the core has classified it
//! ([`crate::core::inbound`]): replies and errors to the calls waiting for
//! them, calls to this connection's handlers, signals and monitor copies
//! to subscriptions. Also the handler registry ([`Connection::serve`]),
//! running a handler on the reader until its first await, and sending its
//! reply.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;

use pbus_proto::names::MemberName;
use pbus_proto::v1::{ErrorCode, Header, MessageKind};
use prost::{Message, Name};

use super::{Connection, Inner, WeakConnection};
use crate::core::inbound::{Inbound, InboundCall};
use crate::message::{Incoming, Outgoing, Reply};
use crate::{Error, MethodError};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler = Arc<dyn Fn(MethodCall) -> BoxFuture<Result<Reply, MethodError>> + Send + Sync>;
/// The handlers of one connection, by method name.
pub(super) type Handlers = HashMap<String, Handler>;

/// A method call being served: the request and a handle to answer with.
#[derive(Debug)]
pub struct MethodCall {
    /// The request as received (sender, body, fds, memfds).
    pub incoming: Incoming,
    /// The connection it arrived on, for calls of its own.
    pub connection: Connection,
}

impl MethodCall {
    /// Decodes the request body.
    pub fn decode<M: Message + Default + Name>(&self) -> Result<M, MethodError> {
        self.incoming
            .decode()
            .map_err(|e| MethodError::invalid_args(e.to_string()))
    }
}

/// Routes one frame from the bus. Body and fds are checked here (memfd
/// seals need syscalls): a malformed reply fails its call with that error,
/// a malformed call is answered `InvalidArgs`, a malformed signal or copy
/// is dropped.
pub(super) fn handle_frame(
    weak: &WeakConnection,
    inbound: Inbound,
    body: &[u8],
    fds: Vec<OwnedFd>,
) {
    let inner = &weak.inner;
    match inbound {
        // Addressed to someone else: only eavesdropping subscriptions see it.
        Inbound::MonitorCopy(header) => deliver_signal(inner, header, body, fds, "monitor copy"),
        Inbound::Reply(header) => {
            if let Some(tx) = take_pending(inner, header.reply_serial) {
                let _ = tx.send(Incoming::from_parts(header, body, fds));
            }
        }
        Inbound::ErrorReply {
            reply_serial,
            error,
        } => match take_pending(inner, reply_serial) {
            Some(tx) => {
                let _ = tx.send(Err(Error::from_wire(error)));
            }
            None => {
                tracing::debug!(serial = reply_serial, name = %error.name, message = %error.message, "error for no pending call");
            }
        },
        Inbound::Call(call) => serve_call(weak, call, body, fds),
        Inbound::BusSignal { signal, header } => {
            tracing::trace!(?signal, "signal from the bus");
            deliver_signal(inner, header, body, fds, "bus signal");
        }
        Inbound::Signal(header) => deliver_signal(inner, header, body, fds, "signal"),
        Inbound::Unexpected { kind } => tracing::warn!(kind, "unexpected frame from the bus"),
    }
}

/// The call waiting for `reply_serial`, if any; a reply nobody waits for
/// is dropped.
fn take_pending(inner: &Inner, reply_serial: u64) -> Option<super::calls::PendingReply> {
    inner
        .calls
        .lock()
        .expect("calls lock")
        .complete(reply_serial)
}

/// Hands a signal (or monitor copy) to the subscriptions whose rules
/// accept it.
fn deliver_signal(inner: &Inner, header: Header, body: &[u8], fds: Vec<OwnedFd>, what: &str) {
    match Incoming::from_parts(header, body, fds) {
        Ok(signal) => inner
            .subscriptions
            .lock()
            .expect("subscriptions lock")
            .deliver(signal),
        Err(error) => tracing::warn!(%error, "dropping malformed {what}"),
    }
}

/// Runs the handler for `call` (or answers that there is none).
fn serve_call(weak: &WeakConnection, call: InboundCall, body: &[u8], fds: Vec<OwnedFd>) {
    let Some(connection) = weak.upgrade() else {
        return;
    };
    let InboundCall {
        serial,
        caller,
        member,
        wants_reply,
        header,
    } = call;
    let handler = weak
        .inner
        .handlers
        .read()
        .expect("handlers lock")
        .get(&member)
        .cloned();
    let incoming = Incoming::from_parts(header, body, fds);
    let mut task: BoxFuture<()> = Box::pin(async move {
        let result = match (handler, incoming) {
            (_, Err(error)) => Err(MethodError::invalid_args(error.to_string())),
            (None, Ok(_)) => Err(MethodError::with_code(
                ErrorCode::UnknownMethod,
                format!("no handler for {member}"),
            )),
            (Some(handler), Ok(incoming)) => {
                let call = MethodCall {
                    incoming,
                    connection: connection.clone(),
                };
                // A handler that panics must not take the connection
                // (the reader runs it inline) down with it: the caller
                // gets an error and the other handlers go on.
                let answer = std::panic::AssertUnwindSafe(async move { handler(call).await });
                match futures::FutureExt::catch_unwind(answer).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::error!(method = %member, "method handler panicked");
                        Err(MethodError::with_code(
                            ErrorCode::Failed,
                            format!("the handler of {member} panicked"),
                        ))
                    }
                }
            }
        };
        if wants_reply {
            if let Err(error) = connection.send_reply(caller, serial, result).await {
                tracing::debug!(%error, "cannot send reply");
            }
        }
    });
    // Run the handler right here until its first wait: most answer at
    // once, and then the reply goes out without a task switch. One that
    // waits continues as a task of its own (tokio polls it again, so every
    // waker it registered is refreshed).
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    if task.as_mut().poll(&mut context).is_pending() {
        tokio::spawn(task);
    }
}

impl Connection {
    /// Registers a typed handler for calls to `method`. Calls are served
    /// concurrently: each handler runs on the connection's reader until its
    /// first await (most answer right there, with no task switch) and then
    /// in a task of its own. Keep synchronous work short (or move it to
    /// `spawn_blocking`), since the reader waits for it. A handler that
    /// panics fails its call with `org.pbus.Error.Failed`. The handler gets
    /// the connection in [`MethodCall::connection`]; capturing a
    /// `Connection` in the closure instead would keep it open for good.
    ///
    /// ```no_run
    /// # async fn example(connection: pbus::Connection) -> Result<(), pbus::Error> {
    /// use pbus::proto::v1::{PingReply, PingRequest};
    /// connection.serve("Ping", |_request: PingRequest, call| async move {
    ///     Ok(PingReply { bus_id: call.incoming.sender().unique_name.clone(), uptime_ms: 0 })
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn serve<Req, Rep, F, Fut>(&self, method: &str, handler: F) -> Result<(), Error>
    where
        Req: Message + Default + Name + 'static,
        Rep: Message + Name + 'static,
        F: Fn(Req, MethodCall) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Rep, MethodError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.serve_raw(method, move |call: MethodCall| {
            let handler = Arc::clone(&handler);
            async move {
                let request: Req = call.decode()?;
                let reply = handler(request, call).await?;
                Ok(Outgoing::new(&reply))
            }
        })
    }

    /// Registers a handler that sees the raw call (fds, memfds, sender)
    /// and answers with a [`Reply`] that may carry fds and memfds.
    pub fn serve_raw<F, Fut>(&self, method: &str, handler: F) -> Result<(), Error>
    where
        F: Fn(MethodCall) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, MethodError>> + Send + 'static,
    {
        MemberName::validate(method)?;
        let handler: Handler = Arc::new(move |call| Box::pin(handler(call)));
        self.inner
            .handlers
            .write()
            .expect("handlers lock")
            .insert(method.to_owned(), handler);
        Ok(())
    }

    /// Removes the handler for `method`.
    pub fn unserve(&self, method: &str) {
        self.inner
            .handlers
            .write()
            .expect("handlers lock")
            .remove(method);
    }

    /// Answers the call `serial` from `caller` with a handler's result.
    async fn send_reply(
        &self,
        caller: String,
        serial: u64,
        result: Result<Reply, MethodError>,
    ) -> Result<(), Error> {
        let mut header = Header {
            kind: MessageKind::MethodReturn as i32,
            destination: caller,
            reply_serial: serial,
            serial: self.next_serial(),
            ..Header::default()
        };
        let error = match result {
            Ok(reply) => match self.send(&mut header, reply).await {
                // A reply we cannot send (too large, fds refused...) still
                // owes the caller an answer: an error in the same header.
                Err(error @ (Error::TooLarge { .. } | Error::Remote { .. } | Error::Memfd(_))) => {
                    MethodError::from(error)
                }
                other => return other,
            },
            Err(error) => error,
        };
        header.kind = MessageKind::Error as i32;
        header.error = Some(error.into_wire());
        self.send(&mut header, Outgoing::default()).await
    }
}
