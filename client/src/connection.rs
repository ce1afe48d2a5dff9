//! A connection to the bus: the handshake, the background reader (replies
//! to waiting calls, incoming calls to handlers, signals to subscribers)
//! and the writer (a queue flushed with non-blocking sendmsg, with
//! back-pressure on senders when the bus reads slower than they write).

use std::collections::HashMap;
use std::future::Future;
use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pbus_proto::frame::{FeedError, Flushed, FrameLimits, FrameReader, OutQueue};
use pbus_proto::names::{BusName, MemberName, ObjectPath};
use pbus_proto::v1::{ErrorCode, Feature, Header, HeaderFlag, Hello, Limits, MessageKind, Welcome};
use pbus_proto::PROTOCOL_VERSION;
use prost::{Message, Name};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch, Notify};

use crate::address::Address;
use crate::message::{Incoming, Outgoing, Reply};
use crate::signals::Subscriptions;
use crate::{Error, MethodError};

/// Default size above which a body is sent in a sealed memfd.
pub const DEFAULT_MEMFD_THRESHOLD: usize = 64 << 10;
/// Queued outgoing bytes above which senders wait for the bus to read.
const SEND_HIGH_WATER: usize = 4 << 20;
/// Read buffer of the background reader.
const READ_BUFFER: usize = 64 << 10;

/// Builds a [`Connection`].
///
/// ```no_run
/// # async fn example() -> Result<(), pbus::Error> {
/// let connection = pbus::Connection::builder()
///     .address("unix:path=/run/pbus/bus.sock".parse()?)
///     .client_name("my-service")
///     .build()
///     .await?;
/// println!("connected as {}", connection.unique_name());
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until .build().await"]
#[derive(Debug, Clone)]
pub struct ConnectionBuilder {
    address: Option<Address>,
    client_name: String,
    fd_passing: bool,
    memfd_payloads: bool,
    memfd_threshold: usize,
    default_timeout: Option<Duration>,
}

impl Default for ConnectionBuilder {
    fn default() -> Self {
        Self {
            address: None,
            client_name: String::new(),
            fd_passing: true,
            memfd_payloads: true,
            memfd_threshold: DEFAULT_MEMFD_THRESHOLD,
            default_timeout: None,
        }
    }
}

impl ConnectionBuilder {
    /// Connects to `address` instead of `PBUS_ADDRESS` or the default.
    pub fn address(mut self, address: Address) -> Self {
        self.address = Some(address);
        self
    }

    /// A name for logs on the bus side.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }

    /// Whether to accept plain fds (default true). A connection that does
    /// not is never sent any; senders get `FdsNotSupported`.
    pub fn fd_passing(mut self, enabled: bool) -> Self {
        self.fd_passing = enabled;
        self
    }

    /// Whether to accept sealed memfd payloads (default true): large bodies
    /// and zero-copy buffers. A connection that does not is never sent any;
    /// senders get `FdsNotSupported`, and it misses broadcasts that carry them.
    pub fn memfd_payloads(mut self, enabled: bool) -> Self {
        self.memfd_payloads = enabled;
        self
    }

    /// Bodies larger than this many bytes go in a sealed memfd (default 64 KiB).
    pub fn memfd_threshold(mut self, bytes: usize) -> Self {
        self.memfd_threshold = bytes;
        self
    }

    /// Timeout for calls that do not set one (default: the bus's default).
    pub fn default_timeout(mut self, timeout: Duration) -> Self {
        self.default_timeout = Some(timeout);
        self
    }

    /// Connects and completes the handshake.
    pub async fn build(self) -> Result<Connection, Error> {
        let address = match self.address {
            Some(address) => address,
            None => Address::from_env_or_default()?,
        };
        let stream = UnixStream::connect(address.path()).await.map_err(|error| {
            Error::Io(std::io::Error::new(
                error.kind(),
                format!("cannot connect to {address}: {error}"),
            ))
        })?;
        let mut features = 0;
        if self.fd_passing {
            features |= Feature::FdPassing as u32;
        }
        if self.memfd_payloads {
            features |= Feature::Memfd as u32;
        }
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            features,
            client_name: self.client_name,
        };
        let header = Header {
            kind: MessageKind::Hello as i32,
            payload_type: Hello::full_name(),
            ..Header::default()
        };
        let mut out = OutQueue::<OwnedFd>::default();
        out.push(&header, &hello.encode_to_vec(), Vec::new());
        // The first frame is small; write it fully before anything else. If
        // the bus already refused the connection (a limit) the write fails,
        // but its ERROR frame is still waiting to be read: read it below.
        while !out.is_empty() {
            stream.writable().await?;
            match out.flush(|data, fds| send_on(&stream, data, fds)) {
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
        let mut reader = FrameReader::new(FrameLimits {
            max_frame_bytes: 1 << 20,
            max_header_bytes: 64 << 10,
        });
        let mut buffer = vec![0u8; READ_BUFFER];
        let mut early: Vec<(Header, Vec<u8>, Vec<OwnedFd>)> = Vec::new();
        let welcome = loop {
            stream.readable().await?;
            let mut fds = Vec::new();
            let received = match stream.try_io(Interest::READABLE, || {
                pbus_sys::fdpass::recv_with_fds(&stream, &mut buffer, &mut fds)
            }) {
                Ok(received) => received,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error.into()),
            };
            if received.bytes == 0 {
                return Err(Error::Protocol(
                    "the bus closed the connection during the handshake".into(),
                ));
            }
            pbus_proto::frame::check_ancillary(received.control_truncated, received.rights_sets)
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let mut result: Option<Result<Welcome, Error>> = None;
            reader
                .feed(&buffer[..received.bytes], fds, |frame| {
                    let header =
                        Header::decode(frame.header).map_err(|e| Error::Protocol(e.to_string()))?;
                    if result.is_some() {
                        early.push((header, frame.body.to_vec(), frame.fds));
                        return Ok(());
                    }
                    result = Some(match MessageKind::try_from(header.kind) {
                        Ok(MessageKind::Welcome) => Welcome::decode(frame.body)
                            .map_err(|e| Error::Protocol(format!("bad WELCOME: {e}"))),
                        Ok(MessageKind::Error) => {
                            Err(Error::from_wire(header.error.unwrap_or_default()))
                        }
                        _ => Err(Error::Protocol(
                            "the bus answered HELLO with something else".into(),
                        )),
                    });
                    Ok::<(), Error>(())
                })
                .map_err(|e| match e {
                    FeedError::Frame(e) => Error::Protocol(e.to_string()),
                    FeedError::Consumer(e) => e,
                })?;
            if let Some(result) = result {
                break result?;
            }
        };
        let limits = welcome.limits.unwrap_or_default();
        reader.set_limits(FrameLimits {
            // Stamped headers make frames from the bus a little larger than
            // what it accepts from senders.
            max_frame_bytes: limits.max_frame_bytes.saturating_add(64 << 10),
            max_header_bytes: limits.max_header_bytes.saturating_add(64 << 10),
        });
        let default_timeout = self
            .default_timeout
            .unwrap_or(Duration::from_millis(u64::from(
                limits.default_reply_timeout_ms.max(1),
            )));
        let (closed_tx, closed_rx) = watch::channel(false);
        // From here on the socket is driven directly (non-blocking syscalls),
        // with the reactor only telling when to wait.
        let stream = pbus_sys::reactor::register_owned(
            stream.into_std()?,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let inner = Arc::new(Inner {
            stream,
            unique_name: welcome.unique_name,
            bus_id: welcome.bus_id,
            features: welcome.features,
            limits,
            serial: AtomicU64::new(1),
            out: Mutex::new(OutState {
                queue: OutQueue::default(),
                closed: false,
            }),
            out_wake: Notify::new(),
            out_drained: Notify::new(),
            pending: Mutex::new(HashMap::new()),
            handlers: RwLock::new(HashMap::new()),
            subscriptions: Mutex::new(Subscriptions::default()),
            closed: closed_tx,
            memfd_threshold: self.memfd_threshold,
            default_timeout,
        });
        let handle = Arc::new(CloseOnDrop {
            inner: Arc::clone(&inner),
        });
        let connection = Connection { inner, handle };
        tokio::spawn(write_loop(Arc::clone(&connection.inner), closed_rx.clone()));
        tokio::spawn(read_loop(
            connection.downgrade(),
            reader,
            buffer,
            early,
            closed_rx,
        ));
        Ok(connection)
    }
}

/// One non-blocking sendmsg on `stream` (during the handshake).
fn send_on(stream: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> std::io::Result<usize> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    stream.try_io(Interest::WRITABLE, || {
        pbus_sys::fdpass::send_with_fds(stream, &[IoSlice::new(data)], &borrowed)
    })
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

struct OutState {
    queue: OutQueue<OwnedFd>,
    closed: bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler = Arc<dyn Fn(MethodCall) -> BoxFuture<Result<Reply, MethodError>> + Send + Sync>;
type PendingReply = oneshot::Sender<Result<Incoming, Error>>;

pub(crate) struct Inner {
    stream: AsyncFd<std::os::unix::net::UnixStream>,
    unique_name: String,
    bus_id: String,
    features: u32,
    limits: Limits,
    serial: AtomicU64,
    out: Mutex<OutState>,
    /// The socket is full: the writer task must wait for writability.
    out_wake: Notify,
    /// The queue shrank: senders waiting for room may go on.
    out_drained: Notify,
    pending: Mutex<HashMap<u64, PendingReply>>,
    handlers: RwLock<HashMap<String, Handler>>,
    pub(crate) subscriptions: Mutex<Subscriptions>,
    closed: watch::Sender<bool>,
    memfd_threshold: usize,
    default_timeout: Duration,
}

/// Closes the connection when the last user handle is dropped.
struct CloseOnDrop {
    inner: Arc<Inner>,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let _ = self.inner.closed.send(true);
    }
}

/// A connection to the bus. Cheap to clone; the connection closes when the
/// last clone is dropped (or [`close`](Self::close) is called).
///
/// For the lowest latency run it on a current-thread tokio runtime: the
/// background reader then wakes callers without crossing CPUs.
#[derive(Clone)]
pub struct Connection {
    pub(crate) inner: Arc<Inner>,
    handle: Arc<CloseOnDrop>,
}

/// A connection handle held by the background reader; it does not keep
/// the connection open.
struct WeakConnection {
    inner: Arc<Inner>,
    handle: std::sync::Weak<CloseOnDrop>,
}

impl WeakConnection {
    fn upgrade(&self) -> Option<Connection> {
        Some(Connection {
            inner: Arc::clone(&self.inner),
            handle: self.handle.upgrade()?,
        })
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("unique_name", &self.inner.unique_name)
            .finish_non_exhaustive()
    }
}

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

impl Connection {
    /// A builder; see [`ConnectionBuilder`].
    pub fn builder() -> ConnectionBuilder {
        ConnectionBuilder::default()
    }

    /// Connects to `PBUS_ADDRESS` or the default address with default options.
    pub async fn connect() -> Result<Self, Error> {
        Self::builder().build().await
    }

    fn downgrade(&self) -> WeakConnection {
        WeakConnection {
            inner: Arc::clone(&self.inner),
            handle: Arc::downgrade(&self.handle),
        }
    }

    /// The unique name the bus assigned, `:1.<n>`.
    pub fn unique_name(&self) -> &str {
        &self.inner.unique_name
    }

    /// The bus instance id.
    pub fn bus_id(&self) -> &str {
        &self.inner.bus_id
    }

    /// The limits the bus announced.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// True if the bus passes fds on this connection.
    pub fn fd_passing(&self) -> bool {
        self.inner.features & Feature::FdPassing as u32 != 0
    }

    /// Closes the connection now; pending calls fail with `Disconnected`.
    pub fn close(&self) {
        let _ = self.inner.closed.send(true);
        // The socket itself stays open while any handle holds `inner`; shut
        // it down now so the bus sees the disconnect at once (and releases
        // this connection's names). Shutdown acts on the socket, so a
        // duplicate of the fd will do.
        if let Ok(fd) = self.inner.stream.get_ref().as_fd().try_clone_to_owned() {
            let _ = std::os::unix::net::UnixStream::from(fd).shutdown(std::net::Shutdown::Both);
        }
    }

    /// Resolves once the connection is closed (by the bus, by an error, or
    /// by [`close`](Self::close)).
    pub async fn closed(&self) {
        let mut closed = self.inner.closed.subscribe();
        let _ = closed.wait_for(|closed| *closed).await;
    }

    /// True once the connection is closed.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow() || self.inner.out.lock().expect("out lock").closed
    }

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

    pub(crate) fn next_serial(&self) -> u64 {
        self.inner.serial.fetch_add(1, Ordering::Relaxed)
    }

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

    /// Queues a frame, waiting first if too much is already queued.
    /// `outgoing` sets the header's payload fields; the header stays the
    /// caller's, so a frame refused here can be answered with another.
    pub(crate) async fn send(&self, header: &mut Header, outgoing: Outgoing) -> Result<(), Error> {
        let (body, fds) = outgoing.into_wire(header, self.inner.memfd_threshold)?;
        self.check_limits(header, body.len(), fds.len())?;
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

    fn check_limits(&self, header: &Header, body_len: usize, fd_count: usize) -> Result<(), Error> {
        let limits = &self.inner.limits;
        let checks = [
            (
                "frame",
                "max_frame_bytes",
                pbus_proto::frame::encoded_frame_len(header, body_len) as u64,
                u64::from(limits.max_frame_bytes),
            ),
            (
                "fd count",
                "max_fds_per_message",
                fd_count as u64,
                u64::from(limits.max_fds_per_message),
            ),
            (
                "memfd count",
                "max_memfds_per_message",
                header.memfds.len() as u64,
                u64::from(limits.max_memfds_per_message),
            ),
        ];
        for (what, limit, value, max) in checks {
            if value > max {
                return Err(Error::TooLarge {
                    what,
                    limit,
                    value,
                    max,
                });
            }
        }
        Ok(())
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

    /// Sends a method call and waits for its reply.
    pub(crate) async fn call_raw(
        &self,
        mut header: Header,
        outgoing: Outgoing,
        timeout: Duration,
    ) -> Result<Incoming, Error> {
        let serial = self.next_serial();
        header.serial = serial;
        header.kind = MessageKind::MethodCall as i32;
        header.timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let (tx, rx) = oneshot::channel();
        self.inner
            .pending
            .lock()
            .expect("pending lock")
            .insert(serial, tx);
        let mut guard = PendingGuard {
            inner: &self.inner,
            serial,
            armed: true,
        };
        self.send(&mut header, outgoing).await?;
        // No local timer: the bus enforces the timeout and always answers
        // (reply, error or Timeout); if the bus goes away the connection
        // closes and every pending call fails with Disconnected.
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
            .pending
            .lock()
            .expect("pending lock")
            .remove(&self.serial);
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

/// Flushes the queue whenever the socket was full and becomes writable.
async fn write_loop(inner: Arc<Inner>, mut closed: watch::Receiver<bool>) {
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
                    out.closed = true;
                    out.queue.clear();
                    break 'outer;
                }
            }
        }
    }
    let mut out = inner.out.lock().expect("out lock");
    out.closed = true;
    out.queue.clear();
    drop(out);
    inner.out_drained.notify_waiters();
}

/// Reads frames from the bus and routes them: replies to waiting calls,
/// calls to handlers (each in its own task), signals to subscriptions.
async fn read_loop(
    weak: WeakConnection,
    mut reader: FrameReader<OwnedFd>,
    mut buffer: Vec<u8>,
    early: Vec<(Header, Vec<u8>, Vec<OwnedFd>)>,
    mut closed: watch::Receiver<bool>,
) {
    let inner = Arc::clone(&weak.inner);
    for (header, body, fds) in early {
        handle_frame(&weak, header, &body, fds);
    }
    // Built once: the application closing the connection ends the loop.
    let closed_by_application = closed.wait_for(|closed| *closed);
    tokio::pin!(closed_by_application);
    // Ok: the connection ended; Err: the bus broke the protocol, which the
    // calls still waiting are told.
    let reason: Result<String, String> = 'outer: loop {
        let mut ready = tokio::select! {
            biased;
            ready = inner.stream.readable() => match ready {
                Ok(ready) => ready,
                Err(error) => break Ok(format!("socket error: {error}")),
            },
            _ = &mut closed_by_application => break Ok("closed by the application".to_owned()),
        };
        loop {
            let mut fds = Vec::new();
            let received = match pbus_sys::fdpass::recv_with_fds(
                inner.stream.get_ref(),
                &mut buffer,
                &mut fds,
            ) {
                Ok(received) => received,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => break 'outer Ok(format!("socket error: {error}")),
            };
            // A short read that brought no fds emptied the socket: wait for
            // the next readiness instead of a recvmsg that says EAGAIN.
            let drained = received.bytes < buffer.len() && received.fds == 0;
            if received.bytes == 0 {
                break 'outer Ok("the bus closed the connection".to_owned());
            }
            if let Err(error) =
                pbus_proto::frame::check_ancillary(received.control_truncated, received.rights_sets)
            {
                break 'outer Err(format!("protocol violation by the bus: {error}"));
            }
            let fed = reader.feed(&buffer[..received.bytes], fds, |frame| {
                let header = Header::decode(frame.header).map_err(|e| e.to_string())?;
                handle_frame(&weak, header, frame.body, frame.fds);
                Ok::<(), String>(())
            });
            match fed {
                Ok(()) => {}
                Err(FeedError::Frame(error)) => {
                    break 'outer Err(format!("bad frame from the bus: {error}"))
                }
                Err(FeedError::Consumer(error)) => {
                    break 'outer Err(format!("bad header from the bus: {error}"))
                }
            }
            if drained {
                ready.clear_ready();
                break;
            }
        }
    };
    let violation = reason.as_ref().err().cloned();
    let reason = reason.unwrap_or_else(|violation| violation);
    tracing::debug!(connection = %inner.unique_name, reason, "connection closed");
    let _ = inner.closed.send(true);
    // The application may keep its handles (and so the socket) long after
    // this; shut the socket down so the bus sees the hang-up now, releases
    // our names and fails the calls waiting on us (after MSG_CTRUNC or a
    // bad frame the connection is unusable, but would otherwise look alive).
    if let Ok(fd) = inner.stream.get_ref().as_fd().try_clone_to_owned() {
        let _ = std::os::unix::net::UnixStream::from(fd).shutdown(std::net::Shutdown::Both);
    }
    {
        let mut out = inner.out.lock().expect("out lock");
        out.closed = true;
        out.queue.clear();
    }
    inner.out_drained.notify_waiters();
    let pending: Vec<PendingReply> = inner
        .pending
        .lock()
        .expect("pending lock")
        .drain()
        .map(|(_, tx)| tx)
        .collect();
    for tx in pending {
        let error = match &violation {
            Some(why) => Error::Protocol(why.clone()),
            None => Error::Disconnected,
        };
        let _ = tx.send(Err(error));
    }
    inner
        .subscriptions
        .lock()
        .expect("subscriptions lock")
        .close_all();
}

fn handle_frame(weak: &WeakConnection, header: Header, body: &[u8], fds: Vec<OwnedFd>) {
    let inner = &weak.inner;
    let kind = MessageKind::try_from(header.kind).unwrap_or(MessageKind::Unspecified);
    if header.flags & HeaderFlag::MonitorCopy as u32 != 0 {
        // Addressed to someone else: only eavesdropping subscriptions see it.
        match Incoming::from_parts(header, body, fds) {
            Ok(copy) => inner
                .subscriptions
                .lock()
                .expect("subscriptions lock")
                .deliver(copy),
            Err(error) => tracing::warn!(%error, "dropping malformed monitor copy"),
        }
        return;
    }
    match kind {
        MessageKind::MethodReturn | MessageKind::Error => {
            let waiting = inner
                .pending
                .lock()
                .expect("pending lock")
                .remove(&header.reply_serial);
            let Some(tx) = waiting else {
                if kind == MessageKind::Error {
                    let error = header.error.unwrap_or_default();
                    tracing::debug!(serial = header.reply_serial, name = %error.name, message = %error.message, "error for no pending call");
                }
                return;
            };
            let result = if kind == MessageKind::Error {
                Err(Error::from_wire(header.error.unwrap_or_default()))
            } else {
                Incoming::from_parts(header, body, fds)
            };
            let _ = tx.send(result);
        }
        MessageKind::MethodCall => {
            let Some(connection) = weak.upgrade() else {
                return;
            };
            let serial = header.serial;
            let caller = header
                .sender
                .as_ref()
                .map(|s| s.unique_name.clone())
                .unwrap_or_default();
            let wants_reply = header.flags & HeaderFlag::NoReplyExpected as u32 == 0;
            let handler = inner
                .handlers
                .read()
                .expect("handlers lock")
                .get(&header.member)
                .cloned();
            let member = header.member.clone();
            let incoming = Incoming::from_parts(header, body, fds);
            let mut task: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
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
                        let answer =
                            std::panic::AssertUnwindSafe(async move { handler(call).await });
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
            // Run the handler right here until its first wait: most answer
            // at once, and then the reply goes out without a task switch.
            // One that waits continues as a task of its own (tokio polls it
            // again, so every waker it registered is refreshed).
            let mut context = std::task::Context::from_waker(std::task::Waker::noop());
            if task.as_mut().poll(&mut context).is_pending() {
                tokio::spawn(task);
            }
        }
        MessageKind::Signal => match Incoming::from_parts(header, body, fds) {
            Ok(signal) => inner
                .subscriptions
                .lock()
                .expect("subscriptions lock")
                .deliver(signal),
            Err(error) => tracing::warn!(%error, "dropping malformed signal"),
        },
        _ => tracing::warn!(kind = header.kind, "unexpected frame from the bus"),
    }
}

impl Connection {
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

    /// Emits a broadcast signal to every subscriber whose match rule
    /// accepts it. `args` are strings subscribers can filter on.
    pub async fn emit_signal<M: Message + Name>(
        &self,
        path: &str,
        member: &str,
        args: &[&str],
        body: &M,
    ) -> Result<(), Error> {
        self.signal(path, member)
            .args(args.iter().map(|s| (*s).to_owned()).collect())
            .emit(Outgoing::new(body))
            .await
    }

    /// A signal with options (unicast destination, fds, memfds).
    pub fn signal(&self, path: &str, member: &str) -> SignalBuilder {
        SignalBuilder {
            connection: self.clone(),
            path: path.to_owned(),
            member: member.to_owned(),
            destination: String::new(),
            args: Vec::new(),
        }
    }
}

/// Options for one signal; see [`Connection::signal`].
#[must_use = "a signal does nothing until .emit(..).await"]
#[derive(Debug)]
pub struct SignalBuilder {
    connection: Connection,
    path: String,
    member: String,
    destination: String,
    args: Vec<String>,
}

impl SignalBuilder {
    /// Sends to one peer instead of broadcasting (fds allowed then).
    pub fn destination(mut self, destination: &str) -> Self {
        self.destination = destination.to_owned();
        self
    }

    /// String arguments for match rules.
    pub fn args(mut self, args: Vec<String>) -> Self {
        self.args = args;
        self
    }

    /// Sends the signal.
    pub async fn emit(self, body: Outgoing) -> Result<(), Error> {
        MemberName::validate(&self.member)?;
        if !self.path.is_empty() {
            ObjectPath::validate(&self.path)?;
        }
        if !self.destination.is_empty() {
            BusName::validate(&self.destination)?;
        }
        let mut header = Header {
            kind: MessageKind::Signal as i32,
            serial: self.connection.next_serial(),
            destination: self.destination,
            path: self.path,
            member: self.member,
            args: self.args,
            ..Header::default()
        };
        self.connection.send(&mut header, body).await
    }
}
