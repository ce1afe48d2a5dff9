//! Peer identity: who is on the other end of a pbus connection, as the
//! kernel vouches for it.
//!
//! [`model`] holds the plain data (credentials, namespaces, cgroup,
//! container); [`capture`] reads it for a freshly accepted socket. The
//! daemon captures identity once, at connect time, and never changes it.
//! This crate knows nothing about frames, names or policy.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod capture;
pub mod model;

pub use capture::{identify, HostContext, IdentifyError};
pub use model::{Container, ContainerRuntime, Namespaces, PeerIdentity};
