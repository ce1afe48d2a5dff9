//! Starting and stopping the real `pbusd` binary for one test.
//!
//! Each [`TestBus`] owns a temporary directory (mode 0755, so a child
//! running under another uid can reach the socket) holding the socket, the
//! optional config file and the daemon's stderr. The daemon is stopped and
//! killed by its pid only; dropping the bus kills it and removes the
//! directory, printing the daemon's stderr first if the test is failing.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pbus::{Address, Connection, ConnectionBuilder, RequestNameFlags};

use crate::peer::{copy_executable, setpriv_command, signal_pid, test_peer_binary, PeerProcess};
use crate::procfs;
use crate::raw::RawClient;
use crate::services::own_name;

/// Environment variable that names the `pbusd` binary to test.
pub const PBUSD_BIN_ENV: &str = "PBUSD_BIN";

/// How long [`TestBus::start`] waits for the socket to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long [`TestBus::stop`] waits for the daemon to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds a workspace binary for the tests: the path in `env_var` if set,
/// else `name` in the build directory of the running test executable
/// (`target/<profile>/deps/test-xxx` → `target/<profile>/<name>`).
/// Returns `None` if neither exists.
pub fn find_binary(name: &str, env_var: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent()?;
    }
    let candidate = dir.join(name);
    candidate.is_file().then_some(candidate)
}

/// Environment variable naming the `pbusctl` binary, if it is not next to
/// the test executable.
pub const PBUSCTL_BIN_ENV: &str = "PBUSCTL_BIN";

/// The `pbusctl` binary under test. Panics with instructions if it is not
/// built, like [`pbusd_binary`].
pub fn pbusctl_binary() -> PathBuf {
    find_binary("pbusctl", PBUSCTL_BIN_ENV).unwrap_or_else(|| {
        panic!(
            "the pbusctl binary was not found next to the test executable;              run `cargo build -p pbusd -p pbusctl` first (with the same CARGO_TARGET_DIR and              profile), use `cargo test --workspace`, or set {PBUSCTL_BIN_ENV}=/path/to/pbusctl"
        )
    })
}

/// The `pbusd` binary under test. Panics with instructions if it is not
/// built: `cargo test --workspace` builds it, `cargo test -p pbus-tests`
/// alone does not.
pub fn pbusd_binary() -> PathBuf {
    match find_binary("pbusd", PBUSD_BIN_ENV) {
        Some(path) if path.is_file() => path,
        Some(path) => panic!(
            "{PBUSD_BIN_ENV}={} does not name a file; build pbusd or fix the variable",
            path.display()
        ),
        None => panic!(
            "the pbusd binary was not found next to the test executable ({}); \
             run `cargo build -p pbusd` first (with the same CARGO_TARGET_DIR and profile), \
             use `cargo test --workspace`, or set {PBUSD_BIN_ENV}=/path/to/pbusd",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    }
}

/// A `pbusd` command with the harness's environment: `RUST_LOG` defaults
/// to `warn` unless the test environment sets it; stdin is closed.
pub fn pbusd_command() -> Command {
    let mut command = Command::new(pbusd_binary());
    default_log_level(&mut command);
    command.stdin(Stdio::null());
    command
}

/// Sets `RUST_LOG` to `warn` for a daemon `command` unless the test
/// environment sets it.
pub(crate) fn default_log_level(command: &mut Command) {
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "warn");
    }
}

/// Waits until `socket` accepts connections. Panics, with the daemon's
/// stderr (from `stderr_path`), if `child` exits first or nothing accepts
/// within [`START_TIMEOUT`]. `what` names the daemon in those messages.
pub(crate) fn wait_until_accepting(
    what: &str,
    child: &mut Child,
    socket: &Path,
    stderr_path: &Path,
) {
    let stderr = || std::fs::read_to_string(stderr_path).unwrap_or_default();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("waitpid on the daemon") {
            panic!(
                "{what} exited during startup with {status}; stderr:\n{}",
                stderr()
            );
        }
        if StdUnixStream::connect(socket).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not accept connections on {} within {START_TIMEOUT:?}; stderr:\n{}",
            socket.display(),
            stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Options for a [`TestBus`]; see [`TestBus::builder`].
#[must_use = "a builder does nothing until .start()"]
#[derive(Debug, Clone, Default)]
pub struct TestBusBuilder {
    config: Option<String>,
    socket: Option<PathBuf>,
}

impl TestBusBuilder {
    /// TOML configuration text, written to a file and passed as `--config`.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_owned());
        self
    }

    /// Listen on this path instead of `bus.sock` in the bus's own
    /// temporary directory (e.g. to take over another bus's stale socket).
    pub fn socket_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// Spawns the daemon and waits until its socket accepts connections.
    /// Panics (with the daemon's stderr) if it exits or does not start.
    pub fn start(self) -> TestBus {
        let dir = tempfile::Builder::new()
            .prefix("pbus-test-")
            .tempdir()
            .expect("create a temporary directory");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("make the temporary directory world-readable");
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(|| dir.path().join("bus.sock"));
        let stderr_path = dir.path().join("pbusd.stderr");
        let stderr = File::create(&stderr_path).expect("create the stderr file");
        let mut command = pbusd_command();
        command.arg("--listen").arg(&socket);
        if let Some(config) = &self.config {
            let config_path = dir.path().join("pbusd.toml");
            std::fs::write(&config_path, config).expect("write the config file");
            command.arg("--config").arg(&config_path);
        }
        command.stdout(Stdio::null()).stderr(stderr);
        let child = command.spawn().expect("spawn pbusd");
        let pid = child.id();
        let mut bus = TestBus {
            child: Some(child),
            pid,
            socket,
            stderr_path,
            exit: None,
            dir,
        };
        let child = bus.child.as_mut().expect("just spawned");
        wait_until_accepting("pbusd", child, &bus.socket, &bus.stderr_path);
        bus
    }
}

/// A running `pbusd` on a temporary socket, for one test.
#[derive(Debug)]
pub struct TestBus {
    child: Option<Child>,
    pid: u32,
    socket: PathBuf,
    stderr_path: PathBuf,
    exit: Option<ExitStatus>,
    // Declared last: dropped after the daemon is gone.
    dir: tempfile::TempDir,
}

impl TestBus {
    /// Starts a daemon with the default configuration.
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// Starts a daemon with this TOML configuration.
    pub fn with_config(toml: &str) -> Self {
        Self::builder().config(toml).start()
    }

    /// Options beyond [`start`](Self::start) and [`with_config`](Self::with_config).
    pub fn builder() -> TestBusBuilder {
        TestBusBuilder::default()
    }

    /// The bus address (`unix:path=...`).
    pub fn address(&self) -> Address {
        Address::unix(&self.socket)
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The socket the daemon listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The bus's temporary directory (mode 0755; removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Number of fds the daemon holds open (entries of `/proc/PID/fd`).
    pub fn fd_count(&self) -> usize {
        procfs::fd_count(self.pid)
    }

    /// The daemon's resident memory in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        procfs::rss_kib(self.pid)
    }

    /// The fd count once it has stopped changing (two equal readings 50 ms
    /// apart), for taking a baseline.
    pub async fn settled_fd_count(&self) -> usize {
        procfs::settled_fd_count(self.pid).await
    }

    /// Waits until the daemon's fd count is back to `baseline`; panics with
    /// the last count after `timeout`.
    pub async fn wait_for_fd_count(&self, baseline: usize, timeout: Duration) {
        procfs::wait_for_fd_count(self.pid, baseline, timeout).await;
    }

    /// Connects a client with default options; panics on failure.
    pub async fn connect(&self) -> Connection {
        self.connect_with(Connection::builder()).await
    }

    /// Connects a client built from `builder` (its address is replaced by
    /// this bus's); panics on failure.
    pub async fn connect_with(&self, builder: ConnectionBuilder) -> Connection {
        builder
            .address(self.address())
            .build()
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "cannot connect to {}: {error}; pbusd stderr:\n{}",
                    self.address(),
                    self.stderr()
                )
            })
    }

    /// Connects a client with default options and makes it the primary
    /// owner of `name`; panics on failure.
    pub async fn connect_owning(&self, name: &str) -> Connection {
        let connection = self.connect().await;
        own_name(&connection, name, RequestNameFlags::default()).await;
        connection
    }

    /// Connects a [`RawClient`] that owns `name` (it must become the
    /// primary owner) and has nothing in its inbox.
    pub async fn raw_owning(&self, name: &str) -> RawClient {
        let mut client = self.raw().await;
        assert_eq!(
            client.request_name(name, 0).await,
            Ok(pbus_proto::v1::RequestNameResult::PrimaryOwner),
            "{name}"
        );
        client.sync().await;
        client.take_inbox();
        client
    }

    /// Runs the `pbus-test-peer` helper against this bus as `uid` (gid
    /// `uid`, no supplementary groups): `pbus-test-peer SOCKET args...`.
    /// The helper runs from a copy in the bus's directory, which that uid
    /// can reach.
    pub fn peer_as_uid(&self, uid: u32, args: &[&str]) -> PeerProcess {
        let binary = copy_executable(&test_peer_binary(), self.dir());
        let mut command = setpriv_command(uid);
        command.arg(binary).arg(&self.socket).args(args);
        PeerProcess::spawn(command)
    }

    /// Connects a [`RawClient`] and completes the handshake; panics on failure.
    pub async fn raw(&self) -> RawClient {
        RawClient::connect_hello(&self.socket)
            .await
            .unwrap_or_else(|error| panic!("raw client cannot connect: {error}"))
    }

    /// Connects a [`RawClient`] without any handshake.
    pub async fn raw_unhandshaked(&self) -> RawClient {
        RawClient::connect(&self.socket)
            .await
            .unwrap_or_else(|error| panic!("raw client cannot connect: {error}"))
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(child) = &mut self.child {
                self.exit = child.try_wait().expect("waitpid on pbusd");
            }
        }
        self.exit
    }

    /// True while the daemon process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    fn signal(&self, signal: Signal) {
        // Only our own child, by pid, and only while it is unreaped (so the
        // pid cannot have been recycled).
        if self.exit.is_none() {
            let _ = signal_pid(self.pid, signal);
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits (up to 10 s) for the daemon to exit; returns
    /// its exit status. Panics, after killing it, if it does not exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_within(STOP_TIMEOUT)
    }

    /// Like [`stop`](Self::stop) with an explicit timeout.
    pub fn stop_within(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        match self.wait_exit(timeout) {
            Some(status) => status,
            None => {
                self.signal(Signal::SIGKILL);
                let _ = self.wait_exit(STOP_TIMEOUT);
                panic!(
                    "pbusd did not exit within {timeout:?} of SIGTERM; stderr:\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// Kills the daemon with SIGKILL (no cleanup: its socket file stays)
    /// and returns its exit status.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        self.wait_exit(STOP_TIMEOUT)
            .expect("pbusd survived SIGKILL")
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- pbusd (pid {}) stderr ----\n{}---- end of pbusd stderr ----",
                self.pid,
                self.stderr()
            );
        }
        if self.try_wait().is_none() {
            self.signal(Signal::SIGKILL);
            let _ = self.wait_exit(STOP_TIMEOUT);
        }
    }
}
