//! `pbus`: the client library of the pbus message bus.
//!
//! Connect with [`Connection::builder`] (address from the argument,
//! `PBUS_ADDRESS`, or the default socket), own names with
//! [`Connection::request_name`], call methods with typed prost messages
//! ([`Connection::call`], [`Connection::method_call`] for timeouts, fds and
//! memfds), serve methods with [`Connection::serve`], emit signals with
//! [`Connection::emit_signal`] and receive them with
//! [`Connection::subscribe`]. Every received message carries the sender's
//! identity as the bus stamped it ([`Incoming::sender`]): unique name, uid,
//! gid, pid (translated into this process's pid namespace), groups, LSM
//! label and container.
//!
//! Large bodies travel as sealed memfds automatically (above
//! [`ConnectionBuilder::memfd_threshold`]); [`SealedMemfd`] and
//! [`Outgoing::from_memfd`] send a buffer or file without copying.
//!
//! Inside, the protocol decisions of a connection (serials, the calls
//! waiting for replies and their deadlines, what each frame from the bus
//! is, the handshake's frames, outgoing limits) are a sans-I/O core in
//! `core/`, plain data tested without sockets; `connection/` is the tokio
//! driver around it (builder, handshake, reader and writer, calls, handler
//! dispatch, signal emission), `signals` the subscriptions, `message` and
//! `memfd` what travels.
//!
//! ```no_run
//! use pbus::proto::v1::{PingReply, PingRequest};
//!
//! # async fn example() -> Result<(), pbus::Error> {
//! let connection = pbus::Connection::connect().await?;
//! connection.request_name("org.example.Pinger", Default::default()).await?;
//! connection.serve("Ping", |_request: PingRequest, _call| async move {
//!     Ok(PingReply { bus_id: String::new(), uptime_ms: 0 })
//! })?;
//! let reply: PingReply = connection
//!     .call("org.example.Pinger", "Ping", &PingRequest {})
//!     .await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
mod bus_api;
mod connection;
mod core;
mod error;
pub mod memfd;
mod message;
mod signals;

pub use address::Address;
pub use bus_api::RequestNameFlags;
pub use connection::{
    CallBuilder, Connection, ConnectionBuilder, MethodCall, SignalBuilder, DEFAULT_MEMFD_THRESHOLD,
};
pub use error::{Error, MethodError};
pub use memfd::{MemfdWriter, SealedMemfd};
pub use message::{Body, Incoming, Outgoing, Reply};
pub use signals::{MatchRule, NameOwnerWatch, Signal, SignalStream};

/// The wire protocol crate (generated message types, names, errors).
pub use pbus_proto as proto;
pub use pbus_proto::v1::{
    ErrorCode, NameOwnerChanged, PeerIdentity, ReleaseNameResult, RequestNameResult, SenderInfo,
};

/// The README's client example, compiled as a doctest so it stays true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
