//! The container identity the bus reports is what the kernel shows: real
//! processes in real cgroup directories shaped like each runtime's
//! ([`pbus_tests::containers`]), in the cgroup v2 hierarchy and in
//! systemd's named v1 hierarchy, optionally in namespaces of their own.
//!
//! * Every runtime shape (Docker cgroupfs and systemd drivers, Podman
//!   rootful and rootless, Kubernetes with containerd or CRI-O with the
//!   systemd driver and containerd with the cgroupfs driver, LXC old and
//!   new, systemd-nspawn) is recognised with its id and pod UID, in
//!   GetPeerIdentity, in `pbusctl status --json` (when pbusctl is built)
//!   and in the SenderInfo the bus stamps on a reply the peer sends, for
//!   v2 and v1-named placements; Podman's conmon and LXC's monitor are
//!   host processes, CRI-O's conmon is in the pod but not the container.
//!   The cgroup directories are gone afterwards.
//! * A peer with a container's namespaces (pid, mount, net, UTS, IPC,
//!   cgroup; and a user namespace) is still identified by its cgroup, and
//!   its namespace inodes are recorded.
//! * A namespaced peer in a cgroup of no known runtime is `unknown`, never
//!   the host, whichever namespace differs; the same cgroup without new
//!   namespaces is the host.
//! * A client that exits right after connecting is refused, not
//!   misidentified: its connection is closed (also when another process
//!   still holds the socket), the daemon logs why, and no peer with its
//!   identity appears in ListNames or GetStats.
#![forbid(unsafe_code)]

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::Signal;
use pbus::Connection;
use pbus_tests::containers::{
    cgroup_paths, check_pbusctl_status, container_or_skip, who_am_i, ContainerView, FakeContainer,
    Isolation, Placement, Shape,
};
use pbus_tests::{require_root, signal_pid, unique_names, wait_for, TestBus, TIMEOUT};

const PEER_BIN: &str = env!("CARGO_BIN_EXE_pbus-test-peer");

/// Puts a peer into a container of `shape` placed per `placement` and
/// checks everything the bus reports about it. Returns false (with a
/// printed reason) when the placement is not available here.
async fn check_shape(
    bus: &TestBus,
    observer: &Connection,
    shape: Shape,
    placement: Placement,
) -> bool {
    let container = match FakeContainer::create(shape, placement) {
        Ok(container) => container,
        Err(why) => {
            eprintln!("skipped: {shape:?} placed in {placement:?}: {why}");
            return false;
        }
    };
    let what = format!("{shape:?} in {placement:?} at {}", container.cgroup_path());
    let expected = container.expected();
    let mut peer = container
        .spawn_peer(bus, Isolation::none(), &["interact", "-"])
        .await;
    let name = peer.ready().await;

    // GetPeerIdentity, asked from the host.
    let identity = observer.peer_identity(&name).await.unwrap();
    assert_eq!(
        ContainerView::of(identity.container.as_ref()),
        expected,
        "{what}: GetPeerIdentity"
    );
    assert_eq!(identity.pid, peer.host_pid(), "{what}: pid");
    let (v2, _) = cgroup_paths(peer.host_pid());
    let reported_path = match (placement, v2.as_deref()) {
        (Placement::Unified | Placement::Both, _) | (_, None | Some("/")) => {
            container.cgroup_path()
        }
        // v1-only placement while the v2 path says something: v2 wins.
        (Placement::SystemdV1, Some(v2)) => v2,
    };
    assert_eq!(identity.cgroup, reported_path, "{what}: cgroup");
    check_pbusctl_status(bus, &name, &expected, peer.host_pid());

    // Stamped on a message the peer sends (its reply).
    let (stamp, said) = who_am_i(observer, &name).await;
    assert_eq!(stamp.unique_name, name, "{what}");
    assert_eq!(
        ContainerView::of(stamp.container.as_ref()),
        expected,
        "{what}: SenderInfo.container"
    );
    assert_eq!(stamp.pid, peer.host_pid(), "{what}: SenderInfo.pid");
    assert_eq!(said.pid, peer.host_pid(), "{what}: no pid namespace");

    // The peer's own view of itself.
    let own = peer.identity_of("").await.expect("own identity");
    assert_eq!(own.container, expected, "{what}: own view");
    assert_eq!(own.unique_name, name);

    assert!(peer.finish(TIMEOUT).success(), "{what}: peer exit");
    container.remove_or_panic(&what);
    true
}

/// Checks `shapes` in the v2 hierarchy and in the v1 `name=systemd` one.
async fn check_shapes(shapes: &[Shape]) {
    let bus = TestBus::start();
    let observer = bus.connect().await;
    let mut ran = 0;
    for &shape in shapes {
        for placement in [Placement::Unified, Placement::SystemdV1] {
            if check_shape(&bus, &observer, shape, placement).await {
                ran += 1;
            }
        }
    }
    assert!(
        ran > 0,
        "no cgroup hierarchy to place containers in (neither v2 nor name=systemd is mounted)"
    );
    // Nothing is left on the bus but the observer.
    let names = observer.list_names(true).await.unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_shapes_are_recognised() {
    if !require_root("creating Docker-shaped cgroups") {
        return;
    }
    check_shapes(&[Shape::DockerCgroupfs, Shape::DockerSystemd]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_shapes_are_recognised_and_conmon_is_the_host() {
    if !require_root("creating Podman-shaped cgroups") {
        return;
    }
    check_shapes(&[Shape::Podman, Shape::PodmanRootless, Shape::PodmanConmon]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_shapes_are_recognised_with_their_pod() {
    if !require_root("creating Kubernetes-shaped cgroups") {
        return;
    }
    check_shapes(&[
        Shape::KubeContainerd,
        Shape::KubeContainerdGuaranteed,
        Shape::KubeCrio,
        Shape::KubeCgroupfs,
        Shape::KubeCrioConmon,
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lxc_and_nspawn_shapes_are_recognised_and_the_monitor_is_the_host() {
    if !require_root("creating LXC- and nspawn-shaped cgroups") {
        return;
    }
    check_shapes(&[
        Shape::LxcPayload,
        Shape::Lxc,
        Shape::LxcMonitor,
        Shape::Nspawn,
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_with_its_own_namespaces_is_identified_by_its_cgroup() {
    if !require_root("running peers in containers with namespaces") {
        return;
    }
    let bus = TestBus::start();
    let observer = bus.connect().await;
    let own_namespaces = observer
        .peer_identity("")
        .await
        .unwrap()
        .namespaces
        .unwrap();
    let cases = [
        (Shape::DockerCgroupfs, Isolation::container()),
        (Shape::PodmanRootless, Isolation::container().with_user()),
        (Shape::KubeCrio, Isolation::container()),
    ];
    let mut ran = 0;
    for (shape, isolation) in cases {
        let container = match FakeContainer::create(shape, Placement::Both) {
            Ok(container) => container,
            Err(why) => {
                eprintln!("skipped: {shape:?}: {why}");
                continue;
            }
        };
        ran += 1;
        let what = format!("{shape:?} with {isolation:?}");
        let mut peer = container
            .spawn_peer(&bus, isolation, &["interact", "-"])
            .await;
        let name = peer.ready().await;
        assert_eq!(peer.ns_pid(), 1, "{what}: the peer is its namespace's init");
        let identity = observer.peer_identity(&name).await.unwrap();
        assert_eq!(
            ContainerView::of(identity.container.as_ref()),
            container.expected(),
            "{what}"
        );
        assert_eq!(identity.pid, peer.host_pid(), "{what}");
        assert_eq!(identity.cgroup, container.cgroup_path(), "{what}");
        let namespaces = identity.namespaces.unwrap();
        for (kind, recorded, ours) in [
            ("pid", namespaces.pid, own_namespaces.pid),
            ("mnt", namespaces.mnt, own_namespaces.mnt),
            ("net", namespaces.net, own_namespaces.net),
            ("uts", namespaces.uts, own_namespaces.uts),
            ("ipc", namespaces.ipc, own_namespaces.ipc),
            ("cgroup", namespaces.cgroup, own_namespaces.cgroup),
            ("user", namespaces.user, own_namespaces.user),
        ] {
            assert_eq!(recorded, peer.namespace(kind), "{what}: {kind} namespace");
            let separate = kind != "user" || isolation.user;
            assert_eq!(
                recorded != ours,
                separate,
                "{what}: {kind} namespace vs ours"
            );
        }
        let (stamp, said) = who_am_i(&observer, &name).await;
        assert_eq!(
            ContainerView::of(stamp.container.as_ref()),
            container.expected(),
            "{what}"
        );
        assert_eq!(
            stamp.pid,
            peer.host_pid(),
            "{what}: reply stamp seen from the host"
        );
        assert_eq!(said.pid, 1, "{what}: its own getpid");
        let caller = said.caller.expect("caller stamp");
        assert_eq!(
            caller.pid, 0,
            "{what}: the host caller is not visible inside"
        );
        assert_eq!(caller.unique_name, observer.unique_name());
        let own = peer.identity_of("").await.expect("own identity");
        assert_eq!(own.container, container.expected(), "{what}: own view");
        assert_eq!(own.pid, 1, "{what}: own pid as seen from inside");
        assert!(peer.finish(TIMEOUT).success(), "{what}");
        container.remove_or_panic(&what);
    }
    assert!(ran > 0, "no cgroup hierarchy to place containers in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_peer_in_no_known_cgroup_is_unknown_never_host() {
    if !require_root("running peers in new namespaces") {
        return;
    }
    let bus = TestBus::start();
    let observer = bus.connect().await;
    let Some(container) = container_or_skip(Shape::Plain, &[Placement::Both]) else {
        return;
    };
    let own_pid_namespace = observer
        .peer_identity("")
        .await
        .unwrap()
        .namespaces
        .unwrap()
        .pid;
    let cases = [
        ("no new namespace", Isolation::none()),
        ("pid, mount and net", Isolation::pid().with_net()),
        (
            "net only",
            Isolation {
                net: true,
                ..Isolation::none()
            },
        ),
        (
            "mount only",
            Isolation {
                mount: true,
                ..Isolation::none()
            },
        ),
        ("user and pid", Isolation::pid().with_user()),
        (
            "uts and ipc",
            Isolation {
                uts: true,
                ipc: true,
                ..Isolation::none()
            },
        ),
    ];
    for (what, isolation) in cases {
        let mut peer = container
            .spawn_peer(&bus, isolation, &["interact", "-"])
            .await;
        let name = peer.ready().await;
        let expected = if isolation.is_namespaced() {
            ContainerView::unknown()
        } else {
            ContainerView::host()
        };
        assert_eq!(expected, container.expected_with(isolation));
        let identity = observer.peer_identity(&name).await.unwrap();
        assert_eq!(
            ContainerView::of(identity.container.as_ref()),
            expected,
            "{what}: GetPeerIdentity"
        );
        assert_eq!(identity.cgroup, container.cgroup_path(), "{what}");
        assert_eq!(identity.pid, peer.host_pid(), "{what}");
        assert_eq!(
            identity.namespaces.unwrap().pid,
            peer.namespace("pid"),
            "{what}"
        );
        assert_eq!(
            peer.namespace("pid") != own_pid_namespace,
            isolation.pid,
            "{what}: pid namespace"
        );
        let (stamp, _) = who_am_i(&observer, &name).await;
        assert_eq!(
            ContainerView::of(stamp.container.as_ref()),
            expected,
            "{what}: SenderInfo.container"
        );
        let own = peer.identity_of("").await.expect("own identity");
        assert_eq!(own.container, expected, "{what}: own view");
        assert!(peer.finish(TIMEOUT).success(), "{what}");
    }
    container.remove_or_panic("the plain container");
}

/// SIGSTOPs a process of ours (the daemon) until dropped.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        signal_pid(pid, Signal::SIGSTOP).expect("SIGSTOP the daemon");
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = signal_pid(self.0, Signal::SIGCONT);
    }
}

/// A short-lived `pbus-test-peer SOCKET subcommand` (`hand-over` or
/// `connect-and-exit`), run until it has exited.
struct ShortLived {
    child: Child,
    pid: u32,
}

impl ShortLived {
    /// Runs it and waits until it has exited; with `reap`, it is also
    /// reaped (its pid is free for reuse), else it stays a zombie until
    /// dropped.
    async fn run(bus: &TestBus, subcommand: &str, stdin: Stdio, reap: bool) -> Self {
        let mut child = Command::new(PEER_BIN)
            .arg(bus.socket_path())
            .arg(subcommand)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pbus-test-peer");
        let pid = child.id();
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .expect("piped stdout")
            .read_to_string(&mut stdout)
            .expect("read its stdout");
        assert_eq!(stdout.trim(), format!("sent {pid}"), "{subcommand}");
        if reap {
            let status = child.wait().expect("reap it");
            assert!(status.success(), "{subcommand}: {status}");
        } else {
            let zombie = || {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .is_ok_and(|status| status.contains("State:\tZ"))
            };
            wait_for(&format!("{subcommand} to exit"), TIMEOUT, zombie).await;
        }
        Self { child, pid }
    }
}

impl Drop for ShortLived {
    fn drop(&mut self) {
        // Exited already; this only reaps it.
        let _ = self.child.wait();
    }
}

/// Receives the one fd `socket` carries.
fn receive_socket(socket: &UnixStream) -> UnixStream {
    let mut buffer = [0u8; 8];
    let mut fds = Vec::new();
    let received = pbus_sys::fdpass::recv_with_fds(socket, &mut buffer, &mut fds)
        .expect("the handed-over socket");
    assert_eq!((received.bytes, fds.len()), (1, 1));
    UnixStream::from(fds.pop().expect("one fd"))
}

/// Asserts the daemon closes `held` without answering.
fn assert_closed_unanswered(held: &UnixStream, what: &str) {
    held.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut answer = [0u8; 256];
    match (&*held).read(&mut answer) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: the daemon answered a client that had exited ({n} bytes)"),
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(error) => panic!("{what}: the daemon kept the connection open: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_exits_right_after_connecting_is_refused() {
    let bus = TestBus::start();
    let observer = bus.connect().await;
    let before = unique_names(&observer).await;
    assert_eq!(before.len(), 1);

    // The daemon is stopped, so every client connects, sends HELLO and
    // has exited before the daemon can look at it.
    let stopped = Stopped::new(bus.pid());
    // Two hand their connected socket to this test before exiting, so the
    // connection stays open while the process that made it is gone: one
    // is reaped (its pid may be reused), one is left a zombie (the pid
    // still names it, and the pidfd still accepts signal 0).
    let (ours, theirs) = UnixStream::pair().unwrap();
    let reaped = ShortLived::run(&bus, "hand-over", Stdio::from(OwnedFd::from(theirs)), true).await;
    let held_reaped = receive_socket(&ours);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let zombie =
        ShortLived::run(&bus, "hand-over", Stdio::from(OwnedFd::from(theirs)), false).await;
    let held_zombie = receive_socket(&ours);
    // One just exits; its socket closes with it.
    let gone = ShortLived::run(&bus, "connect-and-exit", Stdio::null(), true).await;
    drop(stopped);

    // The daemon closes the held connections without a WELCOME.
    assert_closed_unanswered(&held_reaped, "reaped client");
    assert_closed_unanswered(&held_zombie, "zombie client");

    // It says why, naming each pid (the harness logs at `warn` unless the
    // environment chose another RUST_LOG).
    if std::env::var_os("RUST_LOG").is_none() {
        for pid in [reaped.pid, zombie.pid, gone.pid] {
            let needle = format!("peer process {pid} exited before it could be identified");
            wait_for(&format!("the daemon to log {needle:?}"), TIMEOUT, || {
                bus.stderr().contains(&needle)
            })
            .await;
        }
        assert_eq!(
            bus.stderr()
                .matches("refusing connection: peer not identified")
                .count(),
            3,
            "{}",
            bus.stderr()
        );
    } else {
        eprintln!("note: RUST_LOG is set; the daemon's refusal log is not checked");
    }

    // No peer with a wrong or stale identity appeared.
    assert_eq!(unique_names(&observer).await, before);
    let stats = observer.stats().await.unwrap();
    assert_eq!(stats.connections, 1, "{stats:?}");
    let pids: Vec<u32> = stats.peers.iter().map(|peer| peer.pid).collect();
    assert_eq!(pids, [std::process::id()], "{stats:?}");
    // The bus still works.
    observer.ping().await.unwrap();
    drop(zombie);
}
