//! The fixed list of scenarios, the workloads that measure them, and the
//! sizes and durations of a run (`--quick` or full).
//!
//! A [`Scenario`] is what the user selects and what a result row is about; a
//! [`Workload`] is what actually runs. Several scenarios can come out of one
//! workload run (`oneway64` and `cpu_per_msg` share the same message stream;
//! `rss_idle_10k` and `connect_rate` share the same 10,000 connections), so
//! selecting both costs one run, not two. Nothing here knows about processes
//! or systems.

use std::fmt;
use std::time::Duration;

/// One benchmark scenario; the names are fixed and appear in tables and JSON.
/// Declaration order is report order (and equals [`Scenario::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// 64-byte call/reply, one client-server pair.
    Rt64OnePair,
    /// 64-byte call/reply, eight concurrent pairs (one client process and
    /// one server process per pair).
    Rt64EightPairs,
    /// 64-byte call/reply with 16 calls in flight on one connection.
    Rt64Inflight16,
    /// One-way 64-byte messages to a unicast destination.
    Oneway64,
    /// Daemon CPU time per routed message during the `oneway64` stream.
    CpuPerMsg,
    /// Call carrying 1 MiB, 64-byte reply.
    Rt1MiB,
    /// Call carrying 16 MiB, 64-byte reply.
    Rt16MiB,
    /// Call carrying 256 MiB, 64-byte reply.
    Rt256MiB,
    /// Call carrying 1 GiB, 64-byte reply.
    Rt1GiB,
    /// Daemon RSS per idle connection with 10,000 connections open.
    RssIdle10k,
    /// Connections set up per second (connect plus handshake).
    ConnectRate,
    /// One signal to 1,000 subscribers while 10,000 unrelated match rules
    /// exist.
    SignalFanout1000,
}

impl Scenario {
    /// Every scenario, in the order they run and are reported.
    pub const ALL: [Scenario; 12] = [
        Scenario::Rt64OnePair,
        Scenario::Rt64EightPairs,
        Scenario::Rt64Inflight16,
        Scenario::Oneway64,
        Scenario::CpuPerMsg,
        Scenario::Rt1MiB,
        Scenario::Rt16MiB,
        Scenario::Rt256MiB,
        Scenario::Rt1GiB,
        Scenario::RssIdle10k,
        Scenario::ConnectRate,
        Scenario::SignalFanout1000,
    ];

    /// The fixed name of the scenario.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Rt64OnePair => "rt64_1pair",
            Scenario::Rt64EightPairs => "rt64_8pairs",
            Scenario::Rt64Inflight16 => "rt64_inflight16",
            Scenario::Oneway64 => "oneway64",
            Scenario::Rt1MiB => "rt_1MiB",
            Scenario::Rt16MiB => "rt_16MiB",
            Scenario::Rt256MiB => "rt_256MiB",
            Scenario::Rt1GiB => "rt_1GiB",
            Scenario::CpuPerMsg => "cpu_per_msg",
            Scenario::RssIdle10k => "rss_idle_10k",
            Scenario::ConnectRate => "connect_rate",
            Scenario::SignalFanout1000 => "signal_fanout_1000",
        }
    }

    /// Looks a scenario up by its fixed name.
    pub fn from_name(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The workload whose run yields this scenario's figures.
    pub fn workload(self) -> Workload {
        match self {
            Scenario::Rt64OnePair => Workload::Calls {
                pairs: 1,
                inflight: 1,
                payload: 64,
            },
            Scenario::Rt64EightPairs => Workload::Calls {
                pairs: 8,
                inflight: 1,
                payload: 64,
            },
            Scenario::Rt64Inflight16 => Workload::Calls {
                pairs: 1,
                inflight: 16,
                payload: 64,
            },
            Scenario::Rt1MiB => Workload::Calls {
                pairs: 1,
                inflight: 1,
                payload: 1 << 20,
            },
            Scenario::Rt16MiB => Workload::Calls {
                pairs: 1,
                inflight: 1,
                payload: 16 << 20,
            },
            Scenario::Rt256MiB => Workload::Calls {
                pairs: 1,
                inflight: 1,
                payload: 256 << 20,
            },
            Scenario::Rt1GiB => Workload::Calls {
                pairs: 1,
                inflight: 1,
                payload: 1 << 30,
            },
            Scenario::Oneway64 | Scenario::CpuPerMsg => Workload::Oneway { payload: 64 },
            Scenario::RssIdle10k | Scenario::ConnectRate => Workload::Connections { count: 10_000 },
            Scenario::SignalFanout1000 => Workload::Fanout {
                subscribers: 1_000,
                unrelated_rules: 10_000,
            },
        }
    }

    /// The request payload this scenario sends, in bytes.
    pub fn payload(self) -> usize {
        match self.workload() {
            Workload::Calls { payload, .. } | Workload::Oneway { payload } => payload,
            Workload::Connections { .. } | Workload::Fanout { .. } => 0,
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What runs to measure one or more scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Closed-loop call/reply: `pairs` client processes, each talking to its
    /// own server process, each keeping `inflight` calls outstanding with a
    /// request of `payload` bytes; replies carry [`REPLY_SIZE`] bytes.
    Calls {
        /// Client/server process pairs.
        pairs: u32,
        /// Calls outstanding per client connection.
        inflight: usize,
        /// Request payload in bytes.
        payload: usize,
    },
    /// One client streams one-way messages to one server that counts them.
    Oneway {
        /// Message payload in bytes.
        payload: usize,
    },
    /// One process opens `count` idle connections (handshake completed) and
    /// holds them.
    Connections {
        /// Connections to open.
        count: usize,
    },
    /// Broadcast of one signal to `subscribers` connections while
    /// `unrelated_rules` match rules that do not match it are installed.
    Fanout {
        /// Connections subscribed to the signal.
        subscribers: usize,
        /// Match rules that must not match the signal.
        unrelated_rules: usize,
    },
}

impl Workload {
    /// True when the workload needs a daemon that has served nothing before:
    /// RSS growth is only meaningful on a fresh heap, because a daemon keeps
    /// freed memory and would reuse it in a later round.
    pub fn needs_fresh_instance(self) -> bool {
        matches!(self, Workload::Connections { .. })
    }
}

/// Bytes in every reply of the call/reply workloads.
pub const REPLY_SIZE: usize = 64;

/// Sizes and durations of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Rounds per scenario and system.
    pub rounds: usize,
    /// Calls made before measuring, per client.
    pub warmup: Duration,
    /// Measured time of a 64-byte call workload, per round.
    pub call_duration: Duration,
    /// Measured time of a large-payload call workload, per round.
    pub bulk_duration: Duration,
    /// Calls a large-payload workload makes at least, even past its time.
    pub bulk_min_calls: u64,
    /// One-way messages streamed per round.
    pub oneway_messages: u64,
    /// One-way messages between two flow-control acknowledgements.
    pub oneway_batch: u64,
    /// Handshakes in progress at once while opening connections.
    pub connect_concurrency: usize,
    /// Signals emitted per fanout round.
    pub fanout_reps: usize,
    /// Connections that hold the unrelated match rules of the fanout workload.
    pub noise_connections: usize,
    /// The CPU every process is pinned to, if any.
    pub pin_cpu: Option<usize>,
}

impl Plan {
    /// The full plan (default `rounds` 5).
    pub fn full(rounds: Option<usize>) -> Plan {
        Plan {
            rounds: rounds.unwrap_or(5),
            warmup: Duration::from_millis(300),
            call_duration: Duration::from_secs(2),
            bulk_duration: Duration::from_secs(2),
            bulk_min_calls: 3,
            oneway_messages: 300_000,
            oneway_batch: 2_048,
            connect_concurrency: 16,
            fanout_reps: 50,
            noise_connections: 10,
            pin_cpu: None,
        }
    }

    /// The quick plan: every scenario, fewer and shorter rounds (default
    /// `rounds` 3), sized so that one system takes well under 30 seconds.
    pub fn quick(rounds: Option<usize>) -> Plan {
        Plan {
            rounds: rounds.unwrap_or(3),
            warmup: Duration::from_millis(50),
            call_duration: Duration::from_millis(250),
            bulk_duration: Duration::from_millis(200),
            bulk_min_calls: 1,
            oneway_messages: 40_000,
            oneway_batch: 2_048,
            connect_concurrency: 16,
            fanout_reps: 15,
            noise_connections: 10,
            pin_cpu: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
        for s in Scenario::ALL {
            assert_eq!(Scenario::from_name(s.name()), Some(s));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Scenario::ALL.len());
        assert_eq!(Scenario::from_name("nope"), None);
    }

    #[test]
    fn declaration_order_is_report_order() {
        let mut sorted = Scenario::ALL;
        sorted.sort();
        assert_eq!(sorted, Scenario::ALL);
    }

    #[test]
    fn shared_workloads() {
        assert_eq!(
            Scenario::Oneway64.workload(),
            Scenario::CpuPerMsg.workload()
        );
        assert_eq!(
            Scenario::RssIdle10k.workload(),
            Scenario::ConnectRate.workload()
        );
        assert!(Scenario::RssIdle10k.workload().needs_fresh_instance());
        assert_eq!(Scenario::Rt1GiB.payload(), 1 << 30);
    }
}
