//! A connection to the bus, the public face: [`Connection`] (cheap handles
//! sharing one [`Inner`]), its identity and limits, and closing. The
//! protocol decisions live in the sans-I/O [`crate::core`]; the parts of
//! the tokio driver around it each have a file:
//!
//! - [`builder`]: [`ConnectionBuilder`] and its options; connects and
//!   starts the background tasks.
//! - [`handshake`]: the HELLO/WELCOME exchange on the fresh socket.
//! - [`io`]: the reader task (frames in, routed by [`dispatch`], local call
//!   deadlines), the writer task, and the outgoing queue with back-pressure
//!   on senders when the bus reads slower than they write.
//! - [`calls`]: method calls ([`CallBuilder`]), waiting in the core's
//!   pending-call table.
//! - [`dispatch`]: where each inbound frame goes; served methods
//!   ([`Connection::serve`], [`MethodCall`]) and their replies.
//! - [`emit`]: emitting signals ([`SignalBuilder`]).

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pbus_proto::v1::{Feature, Limits};
use tokio::io::unix::AsyncFd;
use tokio::sync::{watch, Notify};

use crate::core::pending::PendingCalls;
use crate::signals::Subscriptions;
use crate::Error;

mod builder;
mod calls;
mod dispatch;
mod emit;
mod handshake;
mod io;

pub use builder::{ConnectionBuilder, DEFAULT_MEMFD_THRESHOLD};
pub use calls::CallBuilder;
pub use dispatch::MethodCall;
pub use emit::SignalBuilder;

/// The state every handle of one connection shares.
pub(crate) struct Inner {
    /// The socket, driven with non-blocking syscalls; the reactor only
    /// says when to wait.
    stream: AsyncFd<std::os::unix::net::UnixStream>,
    unique_name: String,
    bus_id: String,
    /// The features the bus granted in WELCOME.
    features: u32,
    limits: Limits,
    /// Serials and the calls waiting for replies.
    calls: Mutex<PendingCalls<calls::PendingReply>>,
    /// A call's deadline is earlier than the reader's timer: re-arm it.
    timer_rearm: Notify,
    out: Mutex<io::OutState>,
    /// The socket is full: the writer task must wait for writability.
    out_wake: Notify,
    /// The queue shrank: senders waiting for room may go on.
    out_drained: Notify,
    handlers: RwLock<dispatch::Handlers>,
    pub(crate) subscriptions: Mutex<Subscriptions>,
    closed: watch::Sender<bool>,
    memfd_threshold: usize,
    default_timeout: Duration,
}

impl Inner {
    /// Shuts the socket down so the bus sees the hang-up at once (and
    /// releases this connection's names), however long handles keep the
    /// socket itself open. Shutdown acts on the socket, so a duplicate of
    /// the fd will do.
    fn shut_down_socket(&self) {
        if let Ok(fd) = self.stream.get_ref().as_fd().try_clone_to_owned() {
            let _ = std::os::unix::net::UnixStream::from(fd).shutdown(std::net::Shutdown::Both);
        }
    }
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
        // The socket itself stays open while any handle holds `inner`.
        self.inner.shut_down_socket();
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
}
