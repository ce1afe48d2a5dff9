//! [`ConnectionBuilder`]: the options of a connection (address, features,
//! memfd threshold, default timeout), and `build`, which connects, runs
//! the handshake and starts the reader and writer tasks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pbus_proto::frame::OutQueue;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{watch, Notify};

use super::handshake::{handshake, Handshaken};
use super::io::{read_loop, write_loop, OutState};
use super::{CloseOnDrop, Connection, Inner};
use crate::address::Address;
use crate::core::outbound::{hello_frame, inbound_frame_limits};
use crate::core::pending::PendingCalls;
use crate::signals::Subscriptions;
use crate::Error;

/// Default size above which a body is sent in a sealed memfd.
pub const DEFAULT_MEMFD_THRESHOLD: usize = 64 << 10;

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
        let hello = hello_frame(self.client_name, self.fd_passing, self.memfd_payloads);
        let Handshaken {
            welcome,
            mut receiver,
            buffer,
            early,
        } = handshake(&stream, hello).await?;
        let limits = welcome.limits.unwrap_or_default();
        receiver
            .reader_mut()
            .set_limits(inbound_frame_limits(&limits));
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
            calls: Mutex::new(PendingCalls::default()),
            timer_rearm: Notify::new(),
            out: Mutex::new(OutState {
                queue: OutQueue::default(),
                closed: false,
            }),
            out_wake: Notify::new(),
            out_drained: Notify::new(),
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
            receiver,
            buffer,
            early,
            closed_rx,
        ));
        Ok(connection)
    }
}
