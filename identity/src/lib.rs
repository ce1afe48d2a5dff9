//! Peer identity: who is on the other end of a pbus connection, as the
//! kernel vouches for it.
//!
//! [`model`] holds the plain data (credentials, namespaces, cgroup,
//! container); [`capture`] reads it for a freshly accepted socket, using
//! [`procfs`] (pidfd-confirmed `/proc` facts), [`pidns`] (pid namespace
//! chain for pid translation), [`cgroup`] (container classification) and
//! [`mounts`] (where the cgroup hierarchies are mounted). [`host`] decides
//! whose namespaces are the host's (the daemon's own, or in broker mode
//! those of the initial pid namespace's init, with the reasoning about
//! private cgroup namespaces), and [`confirm`] turns candidate container
//! ids into containers once a runtime vouches for them. The daemon
//! captures identity once, at connect time, and never changes it. This
//! crate knows nothing about frames, names or policy.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod capture;
pub mod cgroup;
pub mod confirm;
pub mod host;
pub mod model;
pub mod mounts;
pub mod pidns;
pub mod procfs;

pub use capture::{identify, identify_from_parts, HostContext, IdentifyError, SocketCredentials};
pub use confirm::{Answer, ContainerLookup};
pub use host::{HostError, HostReference};
pub use model::{Container, ContainerRuntime, Namespaces, PeerIdentity, UnknownRuntime};
pub use mounts::{CgroupMount, CgroupMounts};
