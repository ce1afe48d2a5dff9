//! Helpers shared by the policy tests (`policy.rs`, `policy_reload.rs`):
//! policy directories, a `pbusd` started on one, peers in real cgroup
//! containers (and under other uids) running the helper's `policy-probe`
//! subcommand, host services in the test process that record who called
//! them, and checks of the probe's answer lines.
//!
//! Nothing here knows the daemon's internals; it only uses what a client,
//! an operator or `pbusctl` can see.
#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use pbus::Connection;
use pbus_proto::errors::error_name;
use pbus_proto::v1::ErrorCode;
use pbus_tests::containers::{
    container_or_skip, ContainerPeer, FakeContainer, Isolation, Placement, Shape,
};
use pbus_tests::messages::Text;
use pbus_tests::{pbusctl_binary, PeerProcess, TestBus, TIMEOUT};

/// A directory of policy files (mode 0755), removed on drop.
#[derive(Debug)]
pub struct PolicyDir {
    dir: tempfile::TempDir,
}

impl PolicyDir {
    /// An empty policy directory.
    pub fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("pbus-policy-")
            .tempdir()
            .expect("create a policy directory");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the policy directory");
        Self { dir }
    }

    /// Writes (or replaces) `file` in the directory with `text`.
    pub fn write(&self, file: &str, text: &str) {
        std::fs::write(self.file(file), text).expect("write a policy file");
    }

    /// Removes `file`.
    pub fn remove(&self, file: &str) {
        std::fs::remove_file(self.file(file)).expect("remove a policy file");
    }

    /// The path of `file` in the directory (as the daemon names it).
    pub fn file(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `pbusd` with this directory as its policy (the config key
    /// `policy`; the daemon re-reads it on SIGHUP and ReloadPolicy).
    pub fn start_bus(&self) -> TestBus {
        TestBus::with_config(&format!(
            "policy = {:?}\n",
            self.path().display().to_string()
        ))
    }
}

/// A fake container of `shape` in the first cgroup placement this machine
/// offers; `None` (with a printed reason) when there is none, a failure
/// under `PBUS_REQUIRE_PRIVILEGED=1`.
pub fn container(shape: Shape) -> Option<FakeContainer> {
    container_or_skip(
        shape,
        &[Placement::Unified, Placement::Both, Placement::SystemdV1],
    )
}

/// `{ container = { runtime = "RUNTIME", id = "<prefix of the id>*" } }`:
/// a subject or peer matching exactly this container by runtime and an id
/// glob.
pub fn by_id(runtime: &str, container: &FakeContainer) -> String {
    let id = if container.expected().id.is_empty() {
        container.id().to_owned()
    } else {
        container.expected().id
    };
    format!(
        "{{ container = {{ runtime = \"{runtime}\", id = \"{}*\" }} }}",
        &id[..16]
    )
}

/// Starts `pbus-test-peer SOCKET policy-probe NAME` in `container` and
/// waits for it to be ready (its unique name is `unique_name()`).
pub async fn probe_in(
    container: &FakeContainer,
    bus: &TestBus,
    isolation: Isolation,
    name: &str,
) -> ContainerPeer {
    let mut peer = container
        .spawn_peer(bus, isolation, &["policy-probe", name])
        .await;
    peer.ready().await;
    peer
}

/// Starts `policy-probe NAME` on the host (the test's own cgroup and
/// namespaces) as root.
pub async fn probe_on_host(bus: &TestBus, name: &str) -> ContainerPeer {
    let mut peer = ContainerPeer::on_host(bus, &["policy-probe", name]).await;
    peer.ready().await;
    peer
}

/// A `policy-probe` on the host under `uid` (gid `uid`, no groups).
/// Returns the process and its unique name.
pub async fn probe_as_uid(bus: &TestBus, uid: u32, name: &str) -> (PeerProcess, String) {
    let mut process = bus.peer_as_uid(uid, &["policy-probe", name]);
    let unique_name = process.expect_line("ready", TIMEOUT).await;
    (process, unique_name)
}

/// Asserts `line` is `error <code> <name of code> <detail> ...`; returns
/// the message (the rest of the line).
pub fn assert_refused(line: &str, code: ErrorCode, detail: &str, what: &str) -> String {
    let words: Vec<&str> = line.splitn(5, ' ').collect();
    assert!(
        words.len() >= 4 && words[0] == "error",
        "{what}: expected {code:?} ({detail}), got {line:?}"
    );
    assert_eq!(
        (words[1], words[2], words[3]),
        (
            (code as i32).to_string().as_str(),
            error_name(code),
            if detail.is_empty() { "-" } else { detail }
        ),
        "{what}: {line:?}"
    );
    words.get(4).copied().unwrap_or_default().to_owned()
}

/// The comma-separated list after `word ` in a probe answer (`-` is empty).
pub fn list_after(line: &str, word: &str) -> Vec<String> {
    split_after(line, word, ',')
}

/// The `separator`-separated list after `word ` in a probe answer (`-` is
/// empty).
pub fn split_after(line: &str, word: &str, separator: char) -> Vec<String> {
    let rest = line
        .strip_prefix(word)
        .and_then(|rest| rest.strip_prefix(' '))
        .unwrap_or_else(|| panic!("expected `{word} ...`, got {line:?}"));
    if rest == "-" {
        Vec::new()
    } else {
        rest.split(separator).map(str::to_owned).collect()
    }
}

/// A probe's `received` counts of one member.
pub async fn received(peer: &mut PeerProcess, member: &str) -> u64 {
    let line = peer.ask("received").await;
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(member)?.strip_prefix('='))
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no {member}= in {line:?}"))
}

/// A service in the test process (root on the host) owning a name and
/// answering `Echo` and `Other` with `host <member>`; it records every call
/// as `(member, caller's unique name)`.
pub struct HostService {
    /// Its connection.
    pub connection: Connection,
    calls: Arc<Mutex<Vec<(String, String)>>>,
}

impl HostService {
    /// Connects, owns `name` and starts serving.
    pub async fn start(bus: &TestBus, name: &str) -> Self {
        let connection = bus.connect_owning(name).await;
        let calls = Arc::new(Mutex::new(Vec::new()));
        for member in ["Echo", "Other"] {
            let calls = Arc::clone(&calls);
            connection
                .serve(member, move |_request: Text, call: pbus::MethodCall| {
                    calls.lock().unwrap().push((
                        member.to_owned(),
                        call.incoming.sender().unique_name.clone(),
                    ));
                    async move { Ok(Text::new(format!("host {member}"))) }
                })
                .unwrap();
        }
        Self { connection, calls }
    }

    /// Every call so far, as `(member, caller)`.
    pub fn calls(&self) -> Vec<(String, String)> {
        self.calls.lock().unwrap().clone()
    }
}

/// Runs `pbusctl ARGS` (with `--address` of `bus` when given) and returns
/// its output.
pub fn pbusctl(bus: Option<&TestBus>, args: &[&str]) -> Output {
    let mut command = Command::new(pbusctl_binary());
    if let Some(bus) = bus {
        command.arg("--address").arg(bus.address().to_string());
    }
    command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run pbusctl")
}

/// Runs `pbusctl ARGS` like [`pbusctl`], asserts that it succeeds (naming
/// `what`) and returns the first line it printed.
pub fn pbusctl_first_line(bus: Option<&TestBus>, args: &[&str], what: &str) -> String {
    let output = pbusctl(bus, args);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{what}: {stderr}");
    stdout.lines().next().unwrap_or_default().to_owned()
}

/// Stdout and stderr of `output` as text.
pub fn texts(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The 1-based line of the first `[[rule]]` at or after the line holding
/// `marker` in `text`: where the daemon places a rule written below a
/// `# marker` comment.
pub fn rule_line(text: &str, marker: &str) -> u32 {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|line| line.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} in the policy text"));
    let offset = lines[start..]
        .iter()
        .position(|line| line.trim_start().starts_with("[[rule]]"))
        .unwrap_or_else(|| panic!("no [[rule]] after {marker:?}"));
    u32::try_from(start + offset + 1).expect("small file")
}

/// Waits (bounded by [`TIMEOUT`]) until a probe's `received` count of
/// `member` is `count`; panics with the last count otherwise.
pub async fn wait_received(peer: &mut PeerProcess, member: &str, count: u64) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let seen = received(peer, member).await;
        if seen == count {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{member}: {seen} received, expected {count}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
