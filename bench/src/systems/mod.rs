//! The systems under test and the two interfaces each one implements.
//!
//! A system has two halves that run in different processes:
//!
//! - [`System`] runs in the harness: it says whether the system can run
//!   here and which scenarios apply, and it starts a private instance of the
//!   bus (a daemon on a socket in a temporary directory) as an [`Instance`]
//!   that the harness measures (CPU, RSS) and stops.
//! - [`Client`] runs in the worker processes the harness starts (the bench
//!   binary re-executed as `pbus-bench worker --client KIND ...`): it is the
//!   client library side (serve a method, call it in a closed loop, stream
//!   one-way messages, open bare connections, subscribe to and emit a
//!   signal). The workload loops in [`crate::worker`] are generic over it,
//!   so timing and bookkeeping are the same code for every system.
//!
//! Adding a system: implement both traits, add a [`ClientKind`] variant
//! with its arm in [`crate::worker::run`], and list the system in [`all`]
//! and [`CANONICAL_ORDER`].

pub mod dbus;
pub mod pbus;
pub mod relay;
pub mod service;

use std::time::{Duration, Instant};

use anyhow::Result;
use futures::future::LocalBoxFuture;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::procs::{ChildProc, LogTail};
use crate::scenario::Scenario;
use crate::stats::Histogram;

/// Names of all systems the bench knows, in the order results and ratios
/// are listed (ratios are "earlier / later"). `pbus` is first so that its
/// ratios against every baseline are printed.
pub const CANONICAL_ORDER: [&str; 6] = [
    "pbus",
    "pbus-base",
    "pbus-vec",
    "relay",
    "dbus-broker",
    "dbus-daemon",
];

/// Every system compiled into this build, in [`CANONICAL_ORDER`].
pub fn all() -> Vec<Box<dyn System>> {
    vec![
        Box::new(pbus::Pbus::ZERO_COPY),
        Box::new(pbus::Pbus::BASELINE),
        Box::new(pbus::Pbus::FROM_VEC),
        Box::new(relay::Relay),
        Box::new(dbus::broker::DbusBroker),
        Box::new(dbus::daemon::DbusDaemon),
    ]
}

/// Which worker-side [`Client`] implementation drives a system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    /// The length-prefixed framing of the bare relay.
    Relay,
    /// D-Bus through zbus (plus a minimal hand-written D-Bus client for the
    /// mass-connection workloads).
    Dbus,
    /// The pbus library (plus a minimal pbus client for the mass workloads),
    /// large payloads as sealed memfds.
    Pbus,
    /// The same, large payloads handed over as a `Vec`.
    PbusVec,
}

impl ClientKind {
    /// The value passed to `pbus-bench worker --client`.
    pub fn arg(self) -> &'static str {
        match self {
            ClientKind::Relay => "relay",
            ClientKind::Dbus => "dbus",
            ClientKind::Pbus => "pbus",
            ClientKind::PbusVec => "pbus-vec",
        }
    }
}

/// The harness-side half of a system.
pub trait System {
    /// Name in tables, JSON and `--systems`.
    fn name(&self) -> &'static str;

    /// The worker-side client that drives this system.
    fn client(&self) -> ClientKind;

    /// The version of the software under test, for the report header.
    fn version(&self) -> Option<String> {
        None
    }

    /// `Err(reason)` when the system cannot run on this machine (a missing
    /// binary, say); the harness prints the reason and goes on without it.
    fn check_available(&self) -> Result<(), String>;

    /// Why `scenario` does not apply to this system, if it does not (e.g.
    /// payloads above D-Bus's 128 MiB message limit).
    fn skip_reason(&self, scenario: Scenario) -> Option<String>;

    /// Starts a private instance listening inside `dir` (which the instance
    /// keeps and removes when dropped) and returns once it accepts clients.
    fn start(&self, dir: TempDir) -> LocalBoxFuture<'_, Result<Instance>>;
}

/// A running bus instance. Dropping it kills its processes by pid and
/// removes its directory; [`Instance::stop`] does the same gracefully.
pub struct Instance {
    /// The address workers connect to (a D-Bus address such as
    /// `unix:path=/tmp/x/bus`, or a plain socket path for the relay).
    pub address: String,
    /// The process whose CPU time and RSS are charged to the bus (for
    /// dbus-broker this is the broker, not its launcher).
    pub measured_pid: Pid,
    /// Processes the harness spawned, stopped in reverse order.
    processes: Vec<ChildProc>,
    /// Processes the instance's own processes spawned (the broker under its
    /// launcher), killed by pid as well.
    descendants: Vec<Pid>,
    /// Recent log lines of the daemon, shown when something fails.
    log: LogTail,
    /// Background tasks (log readers) aborted with the instance.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Removed last, after every process is gone.
    _dir: TempDir,
}

impl Instance {
    /// An instance made of `processes` whose bus runs in `measured_pid`.
    pub fn new(
        address: String,
        measured_pid: Pid,
        processes: Vec<ChildProc>,
        dir: TempDir,
    ) -> Instance {
        Instance {
            address,
            measured_pid,
            processes,
            descendants: Vec::new(),
            log: LogTail::default(),
            tasks: Vec::new(),
            _dir: dir,
        }
    }

    /// Also kill `pid` (not a child of the harness) when the instance ends.
    pub fn add_descendant(&mut self, pid: Pid) {
        self.descendants.push(pid);
    }

    /// Keeps `log` as the daemon's log; `task`, if any, fills it and is
    /// aborted with the instance.
    pub fn set_log(&mut self, log: LogTail, task: Option<tokio::task::JoinHandle<()>>) {
        self.log = log;
        self.tasks.extend(task);
    }

    /// Adds the daemon's last log lines to `error`.
    pub fn explain(&self, error: anyhow::Error) -> anyhow::Error {
        self.log.explain(error, "daemon")
    }

    /// Stops every process (SIGTERM, then SIGKILL after a grace period) and
    /// removes the directory.
    pub async fn stop(mut self) {
        // Descendants first, while their parent (our child) is alive to reap
        // them; a process orphaned by killing its parent first would be left
        // to init, which in some containers never reaps it.
        for pid in self.descendants.drain(..) {
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_millis(500);
            while kill(pid, None).is_ok() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = kill(pid, Signal::SIGKILL);
        }
        while let Some(p) = self.processes.pop() {
            p.terminate(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        // Children are killed by their own guards; the broker under its
        // launcher is not our child, so it is killed here by pid.
        for pid in self.descendants.drain(..) {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

/// One closed-loop call run: keep `inflight` calls outstanding until
/// `deadline` has passed and at least `min_calls` have completed, then let
/// the outstanding ones finish.
pub struct CallSpec<'a> {
    /// The request payload (the reply carries [`crate::scenario::REPLY_SIZE`]
    /// bytes).
    pub payload: &'a [u8],
    /// Calls outstanding at any time on the one connection.
    pub inflight: usize,
    /// No new call starts after this instant...
    pub deadline: Instant,
    /// ...unless fewer than this many calls have been started.
    pub min_calls: u64,
}

impl CallSpec<'_> {
    /// Whether another call should start, given `started` calls so far.
    pub fn wants_more(&self, started: u64) -> bool {
        started < self.min_calls || Instant::now() < self.deadline
    }

    /// Runs `call` as described: one at a time, or `inflight` outstanding
    /// futures on one connection; records each latency in `latencies` (ns)
    /// and returns the number of calls completed. For clients whose library
    /// answers each call through its own future.
    pub async fn run_closed_loop<F, Fut>(&self, latencies: &mut Histogram, call: F) -> Result<u64>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        use futures::stream::{FuturesUnordered, StreamExt};
        let mut started = 0u64;
        let mut done = 0u64;
        if self.inflight <= 1 {
            while self.wants_more(started) {
                started += 1;
                let t0 = Instant::now();
                call().await?;
                latencies.record(t0.elapsed().as_nanos() as u64);
                done += 1;
            }
            return Ok(done);
        }
        let timed_call = || async {
            let t0 = Instant::now();
            call().await.map(|()| t0.elapsed())
        };
        let mut pending = FuturesUnordered::new();
        while pending.len() < self.inflight && self.wants_more(started) {
            pending.push(timed_call());
            started += 1;
        }
        while let Some(result) = pending.next().await {
            latencies.record(result?.as_nanos() as u64);
            done += 1;
            if self.wants_more(started) {
                pending.push(timed_call());
                started += 1;
            }
        }
        Ok(done)
    }
}

/// What a bare ("light") connection is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LightRole {
    /// Handshake only; the connection then sits idle.
    Idle,
    /// Subscribed to the fanout signal.
    Subscriber,
    /// Holding `rules` match rules that do not match the fanout signal,
    /// numbered from `first` so that all of them differ.
    Noise {
        /// Rules on this connection.
        rules: usize,
        /// Number of the first rule.
        first: usize,
    },
    /// Emits the fanout signal.
    Emitter,
}

/// The worker-side half of a system: the client library operations the
/// workloads are made of. Each call of a hot loop is implemented here in the
/// system's most efficient way; the generic code in [`crate::worker`] only
/// times and counts.
///
/// The methods are `async fn` without a `Send` bound on purpose: workers
/// run one single-threaded runtime each.
#[allow(async_fn_in_trait)]
pub trait Client {
    /// A server connection that owns the name (or relay key) of a target.
    type Server;
    /// A client connection bound to one target server.
    type Conn;
    /// A bare connection (handshake done) for the mass workloads.
    type Light;

    /// Connects and registers as server number `target`, ready to be called
    /// when this returns.
    async fn bind_server(&self, address: &str, target: u32) -> Result<Self::Server>;

    /// Serves forever: answers each call with `reply_size` bytes, counts
    /// one-way messages, and answers a count query with that count.
    async fn serve(&self, server: Self::Server, reply_size: usize) -> Result<()>;

    /// Connects a client to server number `target`.
    async fn connect(&self, address: &str, target: u32) -> Result<Self::Conn>;

    /// Runs calls as described by `spec`, recording each latency in
    /// nanoseconds into `latencies`; returns the number of calls completed.
    async fn call_loop(
        &self,
        conn: &mut Self::Conn,
        spec: &CallSpec<'_>,
        latencies: &mut Histogram,
    ) -> Result<u64>;

    /// Sends `count` one-way messages carrying `payload`, returning once
    /// they are written (not necessarily delivered).
    async fn send_oneway(&self, conn: &mut Self::Conn, payload: &[u8], count: u64) -> Result<()>;

    /// Asks the server how many one-way messages it has received; the reply
    /// travels behind every message sent before, so it doubles as a
    /// delivery acknowledgement.
    async fn query_count(&self, conn: &mut Self::Conn) -> Result<u64>;

    /// Opens a bare connection for `role`; returns once the handshake (and
    /// for subscribers and noise, the match rules) is acknowledged.
    async fn connect_light(&self, address: &str, role: LightRole) -> Result<Self::Light>;

    /// Broadcasts the fanout signal carrying `seq` from an
    /// [`LightRole::Emitter`] connection.
    async fn emit(&self, emitter: &mut Self::Light, seq: u64) -> Result<()>;

    /// Waits on a [`LightRole::Subscriber`] connection for the fanout signal
    /// carrying `seq`.
    async fn recv_signal(&self, subscriber: &mut Self::Light, seq: u64) -> Result<()>;
}
