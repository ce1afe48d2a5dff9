//! End-to-end identity capture over real sockets: ourselves through a
//! socketpair, a child process through a listening socket, a child that
//! exited before it was identified, and (as root) peers in nested pid
//! namespaces.
//!
//! Child processes are this test binary run again with
//! [`helper_connect_to_socket`] selected; see there.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pbus_identity::pidns::walk_pid_namespace_chain;
use pbus_identity::procfs::parse_status;
use pbus_identity::{identify, ContainerRuntime, HostContext, IdentifyError, PeerIdentity};

/// Env var telling [`helper_connect_to_socket`] where to connect.
const SOCKET_ENV: &str = "PBUS_IDENTITY_TEST_SOCKET";
/// Env var telling the helper to stay connected until the other end closes
/// (`wait`) or to exit right after connecting (`exit`).
const MODE_ENV: &str = "PBUS_IDENTITY_TEST_MODE";

/// The child side of the tests below: connects to the socket named by
/// `PBUS_IDENTITY_TEST_SOCKET`, then either exits at once or waits for EOF.
/// It is not a test of its own and fails when run without that variable.
#[test]
#[ignore = "child process for the other tests in this file, which run it with PBUS_IDENTITY_TEST_SOCKET set"]
fn helper_connect_to_socket() {
    let path = std::env::var_os(SOCKET_ENV)
        .expect("run by the other tests in this file with PBUS_IDENTITY_TEST_SOCKET set");
    let mut stream = UnixStream::connect(path).unwrap();
    if std::env::var(MODE_ENV).as_deref() == Ok("wait") {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
    }
}

/// A command running [`helper_connect_to_socket`] against `socket`,
/// under `wrapper` (a program and its arguments, e.g. `unshare ...`) if
/// one is given.
fn helper_command(wrapper: &[&str], socket: &Path, mode: &str) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut command = match wrapper {
        [] => Command::new(&exe),
        [program, args @ ..] => {
            let mut command = Command::new(program);
            command.args(args).arg(&exe);
            command
        }
    };
    command
        .args([
            "--ignored",
            "--exact",
            "helper_connect_to_socket",
            "--test-threads=1",
            "--quiet",
        ])
        .env(SOCKET_ENV, socket)
        .env(MODE_ENV, mode)
        .stdout(Stdio::null());
    command
}

fn spawn_helper(socket: &Path, mode: &str) -> Child {
    helper_command(&[], socket, mode).spawn().unwrap()
}

/// A listening socket in a fresh temporary directory.
fn listener() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

/// The effective id from a `Uid:`/`Gid:` line of `/proc/self/status`.
fn own_status_field(name: &str) -> Vec<u32> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} line"));
    line.split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

fn effective_uid() -> u32 {
    own_status_field("Uid:")[1]
}

/// What `PeerIdentity::cgroup` should say for our own cgroup, computed
/// straight from `/proc/self/cgroup`: the v2 path, or the `name=systemd`
/// path when v2 is missing, empty, or just the root while systemd's v1
/// hierarchy is more specific.
fn expected_own_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let v2 = text.lines().find_map(|l| l.strip_prefix("0::"));
    let systemd = text
        .lines()
        .find_map(|l| l.split_once(":name=systemd:").map(|(_, path)| path));
    match (v2, systemd) {
        (Some("/"), Some(s)) if s != "/" && !s.is_empty() => s.to_owned(),
        (Some(v2), _) if !v2.is_empty() => v2.to_owned(),
        (_, Some(s)) => s.to_owned(),
        _ => String::new(),
    }
}

/// Tests that need root: with `PBUS_REQUIRE_PRIVILEGED=1` they fail when
/// not root; otherwise they are skipped with a printed reason.
fn privileged(test: &str) -> bool {
    if effective_uid() == 0 {
        return true;
    }
    assert!(
        std::env::var("PBUS_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
        "{test} needs root and PBUS_REQUIRE_PRIVILEGED=1 is set"
    );
    println!("skipped {test}: needs root to create pid namespaces");
    false
}

fn assert_same_identity_as_us(identity: &PeerIdentity, host: &HostContext) {
    assert_eq!(identity.uid, own_status_field("Uid:")[1]);
    assert_eq!(identity.gid, own_status_field("Gid:")[1]);
    let mut groups = identity.groups.clone();
    groups.sort_unstable();
    let mut own_groups = own_status_field("Groups:");
    own_groups.sort_unstable();
    assert_eq!(groups, own_groups);
    assert_eq!(identity.cgroup, expected_own_cgroup());
    assert_eq!(identity.namespaces, host.namespaces);
    assert_eq!(identity.container.runtime, ContainerRuntime::Host);
    assert_eq!(identity.pid_namespace_chain, [host.pid_namespace()]);
    assert_eq!(identity.nspids, [identity.pid]);
    assert_eq!(identity.pid_seen_from(host.pid_namespace()), identity.pid);
}

#[test]
fn socketpair_identifies_ourselves() {
    let host = HostContext::detect().unwrap();
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let (identity, pidfd) = identify(&ours, "socketpair", &host).unwrap();
    assert_eq!(identity.pid, std::process::id());
    assert_eq!(identity.listener, "socketpair");
    assert_same_identity_as_us(&identity, &host);
    pbus_sys::creds::pidfd_send_signal(&pidfd, 0).unwrap();
}

#[test]
fn child_through_a_listening_socket() {
    let host = HostContext::detect().unwrap();
    let (_dir, path, listener) = listener();
    let mut child = spawn_helper(&path, "wait");
    let (stream, _) = listener.accept().unwrap();
    let (identity, _pidfd) = identify(&stream, path.to_str().unwrap(), &host).unwrap();
    assert_eq!(identity.pid, child.id());
    assert_eq!(identity.listener, path.to_str().unwrap());
    assert_same_identity_as_us(&identity, &host);
    drop(stream);
    assert!(child.wait().unwrap().success());
}

#[test]
fn peer_that_exited_before_identify_is_refused() {
    let host = HostContext::detect().unwrap();
    let (_dir, path, listener) = listener();
    let mut child = spawn_helper(&path, "exit");
    let child_pid = child.id();
    // The child connects, exits and is reaped before we even accept.
    assert!(child.wait().unwrap().success());
    let (stream, _) = listener.accept().unwrap();
    let cred = pbus_sys::creds::peer_credentials(&stream).unwrap();
    assert_eq!(cred.pid as u32, child_pid);
    match identify(&stream, "l", &host) {
        Err(IdentifyError::PeerGone { pid }) => assert_eq!(pid as u32, child_pid),
        other => panic!("expected PeerGone, got {other:?}"),
    }
}

/// Kills and reaps `child` (by its pid) when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pid of the only child of `pid`, once there is one.
fn only_child_of(pid: u32) -> u32 {
    let children = format!("/proc/{pid}/task/{pid}/children");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&children).unwrap();
        if let Some(child) = text.split_whitespace().next() {
            return child.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "{pid} never got a child");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Follows single children from `pid` down until a process named `comm`.
fn descendant_named(mut pid: u32, comm: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        if name.trim_end() == comm {
            return pid;
        }
        assert!(Instant::now() < deadline, "no {comm} below {pid}");
        pid = only_child_of(pid);
    }
}

#[test]
fn pid_namespace_chain_of_nested_namespaces() {
    if !privileged("pid_namespace_chain_of_nested_namespaces") {
        return;
    }
    let host = HostContext::detect().unwrap();
    let unshare = KillOnDrop(
        Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child"])
            .args(["unshare", "--pid", "--fork", "--kill-child", "sleep", "30"])
            .spawn()
            .unwrap(),
    );
    let sleeper = descendant_named(unshare.0.id(), "sleep");
    let middle = only_child_of(unshare.0.id());
    let proc_dir = PathBuf::from(format!("/proc/{sleeper}"));
    let chain = walk_pid_namespace_chain(&proc_dir, host.pid_namespace()).unwrap();
    let nspids = parse_status(&std::fs::read_to_string(proc_dir.join("status")).unwrap()).nspids;
    assert_eq!(chain.len(), 3, "{chain:?}");
    assert_eq!(chain[0], host.pid_namespace());
    let inode = |pid: u32| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{pid}/ns/pid"))
            .unwrap()
            .ino()
    };
    assert_eq!(chain[1], inode(middle));
    assert_eq!(chain[2], inode(sleeper));
    assert_eq!(nspids.len(), 3);
    assert_eq!(nspids[0], sleeper);
    // The inner unshare is pid 1 in the middle namespace and forked the
    // sleeper, pid 2 there and pid 1 in its own.
    assert_eq!(nspids[1], 2);
    assert_eq!(nspids[2], 1);
    let pidfd = pbus_sys::creds::pidfd_open(sleeper as i32).unwrap();
    pbus_sys::creds::pidfd_send_signal(&pidfd, 9).unwrap();
    drop(unshare);
}

#[test]
fn peer_in_a_new_pid_namespace_gets_translated_pids() {
    if !privileged("peer_in_a_new_pid_namespace_gets_translated_pids") {
        return;
    }
    let host = HostContext::detect().unwrap();
    let (_dir, path, listener) = listener();
    let unshare = KillOnDrop(
        helper_command(
            &["unshare", "--pid", "--fork", "--kill-child"],
            &path,
            "wait",
        )
        .spawn()
        .unwrap(),
    );
    let (stream, _) = listener.accept().unwrap();
    let (identity, _pidfd) = identify(&stream, "l", &host).unwrap();
    let helper = only_child_of(unshare.0.id());
    assert_eq!(identity.pid, helper);
    assert_eq!(identity.nspids, [helper, 1]);
    assert_eq!(identity.pid_namespace_chain.len(), 2);
    assert_eq!(identity.pid_namespace_chain[0], host.pid_namespace());
    let peer_namespace = identity.pid_namespace_chain[1];
    assert_eq!(peer_namespace, identity.namespaces.pid);
    assert_ne!(peer_namespace, host.pid_namespace());
    assert_eq!(identity.pid_seen_from(host.pid_namespace()), helper);
    assert_eq!(identity.pid_seen_from(peer_namespace), 1);
    assert_eq!(identity.pid_seen_from(identity.namespaces.net), 0);
    // Host cgroup, foreign pid namespace: namespaced, runtime unknown.
    assert_eq!(identity.cgroup, expected_own_cgroup());
    assert_eq!(identity.container.runtime, ContainerRuntime::Unknown);
    drop(stream);
    drop(unshare);
}
