//! pbus wire protocol: the protobuf schema (`proto/pbus/v1/pbus.proto`),
//! sans-I/O framing ([`frame`]), validated names ([`names`]), match rules
//! ([`matches`]), the memfd payload rule ([`memfd`]) and the mapping between
//! error codes and error names ([`errors`]).
//!
//! This crate does no I/O and knows nothing about sockets, the daemon or the
//! client; both of those build on it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod errors;
pub mod frame;
pub mod header;
pub mod matches;
pub mod memfd;
pub mod names;

/// Generated protobuf types of `pbus.v1`.
#[allow(
    missing_docs,
    clippy::doc_lazy_continuation,
    clippy::enum_variant_names
)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/pbus.v1.rs"));
}

/// The protocol version this crate speaks; `Hello`/`Welcome` carry it.
pub const PROTOCOL_VERSION: u32 = 1;

/// The bus's own name: bus-control calls go here and bus signals come from it.
pub const BUS_NAME: &str = "org.pbus.Bus";

/// The object path of bus-control calls and bus signals.
pub const BUS_PATH: &str = "/org/pbus/Bus";

/// Protobuf package prefix of the pbus types (`pbus.v1.`).
pub const TYPE_PREFIX: &str = "pbus.v1.";

/// Encoded `FileDescriptorSet` of the pbus schema, for tools that decode
/// payloads by type name.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pbus_descriptor.bin"));

/// Fully qualified protobuf type name of a generated pbus message, as put in
/// `Header.payload_type`.
pub fn type_name<M: prost::Name>() -> String {
    M::full_name()
}

pub use prost;
