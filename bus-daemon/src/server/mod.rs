//! The tokio layer around the routing core. It owns the sockets and nothing
//! else: listeners accept, each connection task reads frames and hands them
//! to [`Bus::dispatch`], and after every read batch it does what the core
//! polls out ([`drive`]): the queues of all peers that received something
//! are flushed right there, in the same task, with non-blocking sendmsg
//! calls; doomed peers are closed; jobs of built-in services run on a
//! blocking thread. There are no extra task hops on the message
//! path and no lock is held across an await: the daemon runs on one thread
//! (a current-thread runtime and a `LocalSet`), and the bus is a `RefCell`
//! borrowed only inside synchronous sections.
//!
//! A receiver whose socket is full never blocks anyone: its frames stay in
//! its bounded queue and its own task waits for writability.

mod connection;
pub mod listener;
mod runtime;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use pbus_identity::HostContext;
use pbus_policy::{Policy, PolicyLayers};
use pbus_proto::frame::Flushed;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use crate::bus::services::{Job, JobDone, JobId, JobOutput};
use crate::bus::{Action, Bus, DaemonFacts, FdBudgets};
use crate::config::{Config, Mode};
use crate::memfd::SystemFdProbe;
use listener::BoundSocket;

/// What the server layer keeps per connection (stored inside the core's
/// `Peer` once the handshake is done).
pub struct PeerIo {
    /// The socket, non-blocking, registered with the runtime. Sends to it
    /// from any task are plain non-blocking syscalls; tokio's readiness is
    /// only used by the connection's own task to wait.
    socket: AsyncFd<std::os::unix::net::UnixStream>,
    /// The connection task's waker: woken when its queue needs the socket
    /// to become writable, or when it must close.
    waker: Cell<Option<Waker>>,
    /// Set when the core doomed the peer or the daemon stops.
    closing: Cell<bool>,
}

impl std::fmt::Debug for PeerIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerIo")
            .field("socket", self.socket.get_ref())
            .field("closing", &self.closing.get())
            .finish_non_exhaustive()
    }
}

impl PeerIo {
    /// Wakes the connection's task so it re-checks its state.
    fn wake(&self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Remembers the task's waker (cloning only when it changed).
    fn register(&self, waker: &Waker) {
        match self.waker.take() {
            Some(old) if old.will_wake(waker) => self.waker.set(Some(old)),
            _ => self.waker.set(Some(waker.clone())),
        }
    }

    /// Asks the connection's task to close.
    fn close(&self) {
        self.closing.set(true);
        self.wake();
    }
}

type SharedBus = Bus<Rc<PeerIo>>;

/// State shared by all tasks of one daemon (single thread).
struct Shared {
    bus: RefCell<SharedBus>,
    /// One read buffer for all connections: reads are processed before the
    /// next await, so no connection needs a buffer of its own while idle.
    scratch: RefCell<Vec<u8>>,
    host: HostContext,
    /// Asked to confirm candidate container ids; `None` when
    /// `docker_socket` is empty.
    containers: Option<runtime::DockerLookup>,
    config: Config,
    handshake_slots: Arc<Semaphore>,
    /// Incomplete handshakes per uid.
    handshakes_per_uid: RefCell<HashMap<u32, u32>>,
    timer_wake: Notify,
    /// When the timer task sleeps until (the core's last `poll_timeout`).
    timer_armed: Cell<Option<Instant>>,
    shutdown: watch::Receiver<bool>,
    /// Every live connection, handshake done or not, to close at shutdown.
    connections: RefCell<HashMap<u64, Weak<PeerIo>, crate::bus::IdHash>>,
    next_connection: Cell<u64>,
    /// The pids a socket connected to one of our listeners reports as its
    /// peer (SO_PEERCRED): whoever called listen(2) on them. A passed fd
    /// that reports one of these is a connection to this bus.
    listener_pids: Vec<i32>,
    /// Never sent on: dropped with the last `Rc<Shared>`, i.e. when every
    /// task has finished, which is what shutdown waits for.
    _all_tasks_done: mpsc::Sender<()>,
}

/// Bytes read from one connection before other connections get a turn.
const READ_BUDGET: usize = 1 << 20;
/// Size of the shared read buffer.
const SCRATCH_LEN: usize = 256 << 10;

/// A running daemon's listeners, ready to serve.
pub struct Server {
    sockets: Vec<BoundSocket>,
    config: Config,
    policy: PolicyLayers,
    host: HostContext,
}

/// Decides, once, which namespaces are the host's (see
/// [`pbus_identity::host`]): pbusd's own, or in broker mode those of pid 1
/// of the initial pid namespace. A broker that cannot read them refuses to
/// start, saying what to change.
pub fn host_context(mode: Mode) -> anyhow::Result<HostContext> {
    let host = match mode {
        Mode::Host => HostContext::detect()?,
        Mode::Broker => HostContext::from_init_process()
            .map_err(|error| anyhow::anyhow!("cannot run as a broker: {error}"))?,
    };
    tracing::info!(
        mode = mode.as_str(),
        host_reference = host.reference.describe(),
        "host reference"
    );
    Ok(host)
}

impl Server {
    /// Decides the host reference for `config.mode` ([`host_context`]),
    /// then binds every listen path of `config` (or the default path);
    /// peers get snapshots of `policy`.
    pub fn bind(config: Config, policy: PolicyLayers) -> anyhow::Result<Self> {
        let host = host_context(config.mode)?;
        let paths: Vec<PathBuf> = if config.listen.is_empty() {
            vec![listener::default_socket_path()?]
        } else {
            config.listen.clone()
        };
        let mut sockets = Vec::new();
        for path in &paths {
            let socket = listener::bind(path)
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
            tracing::info!(path = %path.display(), "listening");
            sockets.push(socket);
        }
        Ok(Self {
            sockets,
            config,
            policy,
            host,
        })
    }

    /// The paths being listened on.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.sockets.iter().map(|s| s.path.clone()).collect()
    }

    /// Serves until `shutdown` resolves, then closes every connection and
    /// removes the socket files. Must run inside a `LocalSet`.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let host = self.host;
        let containers = (!self.config.docker_socket.as_os_str().is_empty())
            .then(|| runtime::DockerLookup::new(self.config.docker_socket.clone()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
        let bus_id = random_bus_id();
        let fd_budget = fd_budget(&self.config);
        let in_flight_budget = in_flight_budget(&self.config);
        let bus = Bus::new(
            self.config.limits.clone(),
            self.policy,
            bus_id.clone(),
            DaemonFacts {
                uid: pbus_sys::process::effective_uid(),
                pid: std::process::id(),
                pid_namespace: host.pid_namespace(),
                mode: self.config.mode,
                host_reference: host.reference,
            },
            FdBudgets {
                held: fd_budget,
                in_flight: in_flight_budget,
            },
            Box::new(SystemFdProbe),
            Instant::now(),
        );
        let mut listener_pids = vec![std::process::id() as i32];
        for socket in &self.sockets {
            if let Ok(credentials) = pbus_sys::creds::peer_credentials(&socket.listener) {
                if !listener_pids.contains(&credentials.pid) {
                    listener_pids.push(credentials.pid);
                }
            }
        }
        tracing::info!(bus_id, fd_budget, in_flight_budget, "bus started");
        let shared = Rc::new(Shared {
            bus: RefCell::new(bus),
            scratch: RefCell::new(vec![0u8; SCRATCH_LEN]),
            host,
            containers,
            handshake_slots: Arc::new(Semaphore::new(
                self.config.limits.max_incomplete_handshakes as usize,
            )),
            handshakes_per_uid: RefCell::new(HashMap::new()),
            config: self.config,
            timer_wake: Notify::new(),
            timer_armed: Cell::new(None),
            shutdown: stop_rx,
            connections: RefCell::new(HashMap::default()),
            next_connection: Cell::new(0),
            listener_pids,
            _all_tasks_done: alive_tx,
        });
        let mut accept_tasks = Vec::new();
        for socket in &self.sockets {
            let listener = pbus_sys::reactor::register_owned(
                socket.listener.try_clone()?,
                Interest::READABLE,
            )?;
            let path: Rc<str> = Rc::from(socket.path.to_string_lossy().as_ref());
            accept_tasks.push(tokio::task::spawn_local(accept_loop(
                Rc::clone(&shared),
                listener,
                path,
            )));
        }
        let timer = tokio::task::spawn_local(run_timer(Rc::clone(&shared)));
        let reloader = tokio::task::spawn_local(reload_on_sighup(Rc::clone(&shared)));
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        let connections: Vec<Weak<PeerIo>> =
            shared.connections.borrow().values().cloned().collect();
        for io in connections.iter().filter_map(Weak::upgrade) {
            io.close();
        }
        for task in accept_tasks {
            let _ = task.await;
        }
        let _ = timer.await;
        let _ = reloader.await;
        // Every connection task holds a sender; recv() returns None once the
        // last one has finished and removed its peer.
        drop(shared);
        while alive_rx.recv().await.is_some() {}
        for socket in &self.sockets {
            socket.remove_file();
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Fds below the soft RLIMIT_NOFILE kept for the daemon itself
/// (listeners, logs, the runtime).
const FD_RESERVE: u64 = 64;

/// How many fds peers may make the daemon hold: `max_fds_total`, or the
/// soft RLIMIT_NOFILE minus a reserve.
fn fd_budget(config: &Config) -> u64 {
    let from_rlimit = pbus_sys::process::fd_limit()
        .map(|limit| limit.soft.saturating_sub(FD_RESERVE))
        .unwrap_or(1024 - FD_RESERVE);
    match config.limits.max_fds_total {
        0 => from_rlimit,
        configured => configured.min(from_rlimit),
    }
}

/// How many fds the daemon may have in flight to receivers:
/// `max_fds_in_flight`, or what the kernel allows the daemon's user (the
/// soft RLIMIT_NOFILE) minus a reserve for other processes of that user.
fn in_flight_budget(config: &Config) -> u64 {
    let from_rlimit = pbus_sys::process::fd_limit()
        .map(|limit| limit.soft.saturating_sub(FD_RESERVE))
        .unwrap_or(1024 - FD_RESERVE);
    match config.limits.max_fds_in_flight {
        0 => from_rlimit,
        configured => configured.min(from_rlimit),
    }
}

fn random_bus_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (nanos ^ u128::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Accepts connections, as many as are waiting per wake-up, and starts a
/// task for each.
async fn accept_loop(
    shared: Rc<Shared>,
    listener: AsyncFd<std::os::unix::net::UnixListener>,
    path: Rc<str>,
) {
    let mut stop = shared.shutdown.clone();
    loop {
        let mut ready = tokio::select! {
            ready = listener.readable() => match ready {
                Ok(ready) => ready,
                Err(error) => {
                    tracing::error!(%error, "listener failed");
                    break;
                }
            },
            _ = stop.changed() => break,
        };
        loop {
            match listener.get_ref().accept() {
                Ok((stream, _)) => {
                    if let Err(error) = stream.set_nonblocking(true) {
                        tracing::warn!(%error, "cannot make an accepted socket non-blocking");
                        continue;
                    }
                    tokio::task::spawn_local(connection::serve(
                        Rc::clone(&shared),
                        stream,
                        Rc::clone(&path),
                    ));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    drop(ready);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    break;
                }
            }
        }
    }
}

/// Wakes the core when its [`Bus::poll_timeout`] comes: calls whose
/// deadline passed fail, stalled fds are swept. Woken early (through
/// `timer_wake`) when the core asks for an earlier time.
async fn run_timer(shared: Rc<Shared>) {
    let mut stop = shared.shutdown.clone();
    loop {
        let deadline = shared.bus.borrow().poll_timeout();
        shared.timer_armed.set(Some(deadline));
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {
                let mut bus = shared.bus.borrow_mut();
                bus.handle_timeout(Instant::now(), unread_by_peer);
                drive(&shared, &mut bus);
            }
            _ = shared.timer_wake.notified() => {}
            _ = stop.changed() => break,
        }
    }
}

/// Re-reads the policy on SIGHUP (as a job of the bus driver, like
/// `ReloadPolicy`).
async fn reload_on_sighup(shared: Rc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut stop = shared.shutdown.clone();
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "cannot handle SIGHUP; policy reload only via ReloadPolicy");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = hangups.recv() => {
                tracing::info!("SIGHUP: reloading the policy");
                let mut bus = shared.bus.borrow_mut();
                bus.request_policy_reload();
                drive(&shared, &mut bus);
            }
            _ = stop.changed() => break,
        }
    }
}

/// Runs a built-in service's job off the routing thread (a blocking-pool
/// thread: it may read files) and hands the output back to the core.
fn spawn_job(shared: &Rc<Shared>, id: JobId, job: Job) {
    let shared = Rc::clone(shared);
    tokio::task::spawn_local(async move {
        let output = match job {
            Job::LoadPolicy => {
                let path = shared.config.policy.clone();
                let loaded = tokio::task::spawn_blocking(move || match path {
                    Some(path) => Policy::load(&path).map_err(|errors| errors.to_string()),
                    None => Ok(Policy::builtin()),
                })
                .await
                .unwrap_or_else(|error| Err(format!("the policy loader failed: {error}")));
                JobOutput::Policy(loaded)
            }
        };
        let mut bus = shared.bus.borrow_mut();
        match bus.handle_job_done(id, output) {
            JobDone::PolicyInstalled { peers } => {
                let policy = bus.policy().global_policy();
                tracing::info!(
                    files = policy.origins().len(),
                    rules = policy.rule_count(),
                    peers,
                    "policy reloaded"
                );
            }
            JobDone::PolicyRefused(why) => {
                tracing::warn!(%why, "policy reload refused; the old policy stays in force");
            }
            JobDone::Unknown => {}
        }
        drive(&shared, &mut bus);
    });
}

/// After the core ran: do what it asks until it asks for nothing (flush
/// queues, waking peers whose sockets are full; close doomed peers; start
/// jobs), then make sure the timer wakes by the core's next timeout.
fn drive(shared: &Rc<Shared>, bus: &mut SharedBus) {
    while let Some(action) = bus.poll_action() {
        match action {
            Action::Flush(id) => flush(bus, id),
            Action::Close(id) => {
                if let Some(peer) = bus.peer(id) {
                    peer.io.close();
                }
            }
            Action::Job(id, job) => spawn_job(shared, id, job),
        }
    }
    let next = bus.poll_timeout();
    if shared.timer_armed.get().is_none_or(|armed| next < armed) {
        shared.timer_armed.set(Some(next));
        shared.timer_wake.notify_one();
    }
}

/// Flushes one peer's queue; a full socket or fds waiting to be read make
/// its task wait for the socket, a failed write dooms it.
fn flush(bus: &mut SharedBus, id: crate::bus::PeerId) {
    match bus.flush_peer(id, send_frames, unread_by_peer) {
        Ok(Flushed::All) => {
            if bus.has_fds_in_flight(id) {
                // Its task watches for the peer reading those fds.
                if let Some(peer) = bus.peer(id) {
                    peer.io.wake();
                }
            }
        }
        Ok(Flushed::Blocked | Flushed::FdsWaiting) => {
            if let Some(peer) = bus.peer(id) {
                peer.io.wake();
            }
        }
        Err(error) => {
            tracing::debug!(peer = id.0, %error, "write failed");
            bus.doom(id, "write failed");
        }
    }
}

/// Bytes sent to a peer that it has not read yet (see
/// [`pbus_sys::fdpass::unread_by_peer`]).
fn unread_by_peer(io: &Rc<PeerIo>) -> io::Result<usize> {
    pbus_sys::fdpass::unread_by_peer(io.socket.get_ref())
}

/// One non-blocking sendmsg of queued bytes (and their fds) to a peer.
/// A full socket answers `WouldBlock`; the peer's task then waits for
/// writability (tokio's readiness for it is cleared there).
fn send_frames(io: &Rc<PeerIo>, data: &[u8], fds: &[OwnedFd]) -> io::Result<usize> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    pbus_sys::fdpass::send_with_fds(io.socket.get_ref(), &[IoSlice::new(data)], &borrowed)
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    /// What an idle connection costs in the daemon's own memory, piece by
    /// piece; printed so regressions are visible (`--nocapture`), and
    /// bounded so a large regression fails.
    #[test]
    fn per_connection_state_stays_small() {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (alive_tx, _alive_rx) = mpsc::channel::<()>(1);
        let shared = Rc::new(Shared {
            bus: RefCell::new(Bus::new(
                Config::default().limits,
                PolicyLayers::global(Policy::builtin()),
                "test".into(),
                DaemonFacts {
                    uid: 0,
                    pid: 1,
                    pid_namespace: 0,
                    mode: crate::config::Mode::Host,
                    host_reference: pbus_identity::HostReference::Own,
                },
                FdBudgets {
                    held: 1024,
                    in_flight: 1024,
                },
                Box::new(SystemFdProbe),
                Instant::now(),
            )),
            scratch: RefCell::new(Vec::new()),
            host: HostContext::default(),
            containers: None,
            config: Config::default(),
            handshake_slots: Arc::new(Semaphore::new(1)),
            handshakes_per_uid: RefCell::new(HashMap::new()),
            timer_wake: Notify::new(),
            timer_armed: Cell::new(None),
            shutdown: stop_rx,
            connections: RefCell::new(HashMap::default()),
            next_connection: Cell::new(0),
            listener_pids: Vec::new(),
            _all_tasks_done: alive_tx,
        });
        let (stream, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        let future = connection::serve(Rc::clone(&shared), stream, Rc::from("/x"));
        let future_size = std::mem::size_of_val(&future);
        let peer_size = std::mem::size_of::<crate::bus::Peer<Rc<PeerIo>>>();
        let io_size = std::mem::size_of::<PeerIo>();
        eprintln!("serve future {future_size} B, Peer {peer_size} B, PeerIo {io_size} B");
        assert!(
            future_size < 2048,
            "the connection task grew to {future_size} bytes"
        );
        assert!(peer_size < 1024, "Peer grew to {peer_size} bytes");
        drop(future);
        drop(stop_tx);
    }
}
