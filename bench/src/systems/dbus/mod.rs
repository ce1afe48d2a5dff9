//! The two D-Bus baselines, `dbus-daemon` and `dbus-broker`, and the D-Bus
//! client that drives both.
//!
//! - [`daemon`] and [`broker`] start the reference daemon and dbus-broker
//!   privately on a socket in a temporary directory, with a generated
//!   session-like configuration: a permissive policy and limits raised far
//!   above what the workloads need.
//! - [`client`] is the worker side: zbus (on the worker's tokio runtime)
//!   for calls and one-way streams, answering with low-level message APIs
//!   (no interface macros, no object server).
//! - [`wire`] is a minimal hand-written D-Bus client used where thousands of
//!   connections are needed (idle connections, connect rate, fanout
//!   subscribers and the unrelated match rules): it does the SASL
//!   handshake, `Hello` and `AddMatch` pipelined in one write and reads only
//!   what it must, so the daemon, not a client library, is what is measured.

pub mod broker;
pub mod client;
pub mod daemon;
pub mod wire;

use std::path::Path;

use crate::scenario::Scenario;
use crate::systems::service::{noise_path, FANOUT_PATH, SIGNAL_MEMBER};

/// Interface of the benchmark methods and the fanout signal (the other
/// names are in [`crate::systems::service`]).
pub const INTERFACE: &str = "org.pbus.Bench";

/// The match rule of a fanout subscriber.
pub fn subscriber_rule() -> String {
    format!("type='signal',interface='{INTERFACE}',member='{SIGNAL_MEMBER}',path='{FANOUT_PATH}'")
}

/// Unrelated match rule number `n`: same interface and member as the fanout
/// signal but another object path ([`noise_path`]), the shape of the
/// per-object `PropertiesChanged` rules that dominate real buses. A daemon
/// that indexes rules only by interface or member still has to look at
/// every one.
pub fn noise_rule(n: usize) -> String {
    format!(
        "type='signal',interface='{INTERFACE}',member='{SIGNAL_MEMBER}',path='{}'",
        noise_path(n)
    )
}

/// The D-Bus message size limit (2^27 bytes, from the specification; zbus,
/// dbus-broker and our dbus-daemon configuration all enforce it).
pub const MAX_MESSAGE: usize = 128 << 20;

/// Skip reason shared by both D-Bus daemons.
pub fn skip_reason(scenario: Scenario) -> Option<String> {
    let payload = scenario.payload();
    // Header and reply overhead are far below the gap to the next size.
    (payload >= MAX_MESSAGE).then(|| {
        format!(
            "payload of {} MiB exceeds the D-Bus message limit of 128 MiB",
            payload >> 20
        )
    })
}

/// The D-Bus address of a Unix socket path.
pub fn address_of(socket: &Path) -> String {
    format!("unix:path={}", socket.display())
}

/// The socket path of a `unix:path=...` address (other parameters after a
/// comma are ignored).
pub fn socket_of(address: &str) -> Option<&str> {
    let rest = address.strip_prefix("unix:")?;
    rest.split(',').find_map(|kv| kv.strip_prefix("path="))
}

/// A session-like bus configuration: EXTERNAL authentication, a policy
/// that allows everything, and limits raised well above the workloads (10k
/// connections, 10k match rules on one connection, 16 MiB messages queued
/// by the thousand). `listen` is `None` for dbus-broker, whose launcher is
/// handed its socket instead.
pub fn bus_config(listen: Option<&str>) -> String {
    let listen = listen
        .map(|a| format!("  <listen>{a}</listen>\n"))
        .unwrap_or_default();
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
{listen}  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_incoming_unix_fds">250000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="max_outgoing_unix_fds">250000000</limit>
  <limit name="max_message_size">{MAX_MESSAGE}</limit>
  <limit name="service_start_timeout">120000</limit>
  <limit name="auth_timeout">240000</limit>
  <limit name="pending_fd_timeout">150000</limit>
  <limit name="max_completed_connections">100000</limit>
  <limit name="max_incomplete_connections">10000</limit>
  <limit name="max_connections_per_user">100000</limit>
  <limit name="max_pending_service_starts">10000</limit>
  <limit name="max_names_per_connection">50000</limit>
  <limit name="max_match_rules_per_connection">50000</limit>
  <limit name="max_replies_per_connection">50000</limit>
</busconfig>
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a = address_of(Path::new("/tmp/x/bus"));
        assert_eq!(a, "unix:path=/tmp/x/bus");
        assert_eq!(socket_of(&a), Some("/tmp/x/bus"));
        assert_eq!(socket_of("unix:path=/a,guid=00"), Some("/a"));
        assert_eq!(socket_of("unix:abstract=x"), None);
        assert_eq!(socket_of("tcp:host=x"), None);
    }

    #[test]
    fn large_payloads_are_skipped() {
        assert!(skip_reason(Scenario::Rt16MiB).is_none());
        assert!(skip_reason(Scenario::Rt256MiB).is_some());
        assert!(skip_reason(Scenario::Rt1GiB).is_some());
        assert!(skip_reason(Scenario::SignalFanout1000).is_none());
    }

    #[test]
    fn rules_differ() {
        assert_ne!(noise_rule(1), noise_rule(2));
        assert_ne!(noise_rule(0), subscriber_rule());
    }
}
