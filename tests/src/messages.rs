//! Payload types shared by the tests and the `pbus-test-peer` helper:
//! plain prost structs with a `prost::Name`, so the bus can put their type
//! names in headers like any application's.

/// A string, as request or reply.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Text {
    /// The text.
    #[prost(string, tag = "1")]
    pub text: String,
}

impl prost::Name for Text {
    const NAME: &'static str = "Text";
    const PACKAGE: &'static str = "pbus.test";
}

impl Text {
    /// A `Text` holding `text`.
    pub fn new(text: impl Into<String>) -> Self {
        Self { text: text.into() }
    }
}

/// A process's identity: what it knows about itself from the kernel
/// (`getpid`, `/proc/self/status`), and optionally who the bus said called
/// it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Identity {
    /// The process's unique name on the bus.
    #[prost(string, tag = "1")]
    pub unique_name: String,
    /// Real uid.
    #[prost(uint32, tag = "2")]
    pub uid: u32,
    /// Real gid.
    #[prost(uint32, tag = "3")]
    pub gid: u32,
    /// Pid (in its own pid namespace).
    #[prost(uint32, tag = "4")]
    pub pid: u32,
    /// Supplementary groups, sorted.
    #[prost(uint32, repeated, tag = "5")]
    pub groups: Vec<u32>,
    /// The caller of the call this identity answers, as the bus stamped it.
    #[prost(message, optional, tag = "6")]
    pub caller: Option<pbus_proto::v1::SenderInfo>,
}

impl prost::Name for Identity {
    const NAME: &'static str = "Identity";
    const PACKAGE: &'static str = "pbus.test";
}
