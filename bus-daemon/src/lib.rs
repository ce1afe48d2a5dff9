//! pbusd: the pbus daemon.
//!
//! * [`bus`]: the routing core, plain data with no I/O (peers, names, match
//!   rules, pending calls, queues, the bus driver).
//! * [`server`]: the thin tokio layer that owns sockets: listeners, the
//!   handshake, reading frames into the core and flushing its queues.
//! * [`faces`]: the wire protocols peers speak (today the native framing):
//!   each turns the core's routing decisions into its own frames.
//! * [`config`]: configuration and limits.
//! * [`memfd`]: validation of sealed memfd payloads.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bus;
pub mod config;
pub mod faces;
pub mod memfd;
pub mod server;
