//! The sans-I/O client core: the protocol decisions of a connection as
//! plain data, with no tokio, no sockets and no clock of its own (`now`
//! comes in as an argument). The tokio driver in `connection/` feeds it
//! decoded frames and the time, and does what it answers.
//!
//! - [`pending`]: serial allocation and the calls waiting for an answer
//!   (matching replies, deadlines, failing them all when the connection
//!   ends).
//! - [`inbound`]: what a frame from the bus is (reply, error, call to
//!   serve, signal, bus signal, monitor copy, unexpected, malformed).
//! - [`outbound`]: checks on what this connection sends, and the HELLO
//!   and WELCOME of the handshake.
//!
//! It must not know how a waiter is woken, how frames are read or written,
//! or how a handler runs.

pub(crate) mod inbound;
pub(crate) mod outbound;
pub(crate) mod pending;
