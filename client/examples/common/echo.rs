//! The echo example's message types: plain prost structs, so the example
//! needs no .proto file. `prost::Name` gives each a type name the bus puts
//! in the header, so tools can tell what a payload is.

/// What the caller sends.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    /// Text to echo back.
    #[prost(string, tag = "1")]
    pub text: String,
}

/// What the service answers: the text, and who the bus says the caller is.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    /// The text, unchanged.
    #[prost(string, tag = "1")]
    pub text: String,
    /// The caller's unique name, as stamped by the bus.
    #[prost(string, tag = "2")]
    pub caller: String,
    /// The caller's uid, as stamped by the bus.
    #[prost(uint32, tag = "3")]
    pub caller_uid: u32,
    /// The caller's pid as seen from the service, as stamped by the bus.
    #[prost(uint32, tag = "4")]
    pub caller_pid: u32,
}

impl prost::Name for EchoRequest {
    const NAME: &'static str = "EchoRequest";
    const PACKAGE: &'static str = "example.echo";
}

impl prost::Name for EchoReply {
    const NAME: &'static str = "EchoReply";
    const PACKAGE: &'static str = "example.echo";
}

/// The service's well-known name.
pub const SERVICE: &str = "org.example.Echo";
