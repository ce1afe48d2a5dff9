//! The benchmark service as the bus systems (pbus and both D-Bus
//! baselines) name it: one set of names, so every bus is measured on the
//! same shape of traffic (the relay has no names; it uses numeric keys).

/// Object path of the benchmark service.
pub const PATH: &str = "/org/pbus/bench";
/// Method answered with the reply payload.
pub const METHOD_CALL: &str = "Call";
/// Method sent without expecting a reply (D-Bus: NO_REPLY_EXPECTED),
/// counted by the server.
pub const METHOD_ONEWAY: &str = "Oneway";
/// Method answered with the number of one-way messages received (a u64).
pub const METHOD_COUNT: &str = "Count";
/// Member of the fanout signal.
pub const SIGNAL_MEMBER: &str = "Tick";
/// Object path the fanout signal is emitted on.
pub const FANOUT_PATH: &str = "/org/pbus/bench/fanout";

/// The well-known name owned by server number `target`.
pub fn server_name(target: u32) -> String {
    format!("org.pbus.Bench.S{target}")
}

/// The path of unrelated match rule number `n`: same member as the fanout
/// signal, another path (the shape of the per-object rules that dominate
/// real buses; a bus that indexes rules only by member still has to look
/// at every one).
pub fn noise_path(n: usize) -> String {
    format!("/org/pbus/bench/noise/{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_paths_differ_from_each_other_and_the_fanout_path() {
        assert_ne!(noise_path(1), noise_path(2));
        assert_ne!(noise_path(0), FANOUT_PATH);
    }
}
