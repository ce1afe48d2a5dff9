//! Broker mode's host reference, and container ids only a runtime can
//! confirm, against the real kernel and Docker engine.
//!
//! * `pbusd --broker` refuses to start, naming the fix, in a fresh pid
//!   namespace (`unshare --pid --fork --mount-proc`: `--pid=host`), in a
//!   private cgroup namespace (`unshare --cgroup`: `--cgroupns=host`), and
//!   without CAP_SYS_PTRACE (dropped with `setpriv`).
//! * On the host, `pbusd --broker` either starts, and then a root client
//!   on the host is `host`, a process in a fresh pid+mount namespace in its
//!   own cgroup directory is not, and `pbusctl status` reports the broker
//!   and its host reference; or, on a machine where even root with
//!   CAP_SYS_PTRACE may not read pid 1's namespaces (a security module in
//!   the way, as on some CI sandboxes), it refuses and says so. Which one
//!   is decided by what this test process itself may read, so the test
//!   fails if pbusd disagrees with the kernel.
//! * Without `--broker`, `pbusctl status` reports mode `host` with pbusd's
//!   own namespaces as the reference.
//! * A Docker container started with `--cgroup-parent` (cgroupfs layout
//!   `/PARENT/<id>`) is `docker` with the `docker inspect` id once the
//!   engine confirms it, and `unknown` when pbusd may ask no engine.
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use pbus_identity::CgroupMounts;
use pbus_proto::v1::{BusMode, ContainerRuntime, HostReference};
use pbus_tests::containers::{
    cgroup_paths, container_or_skip, pbusctl_status_json, ContainerView, Isolation, Placement,
    Shape,
};
use pbus_tests::containers_docker::{require_docker, DockerContainer, DockerImage};
use pbus_tests::{pbusd_binary, require_root, PeerProcess, TestBus, TIMEOUT};

const PEER_BIN: &str = env!("CARGO_BIN_EXE_pbus-test-peer");

/// Runs `pbusd --broker` under `wrapper` (a command line that ends by
/// running its arguments) and returns its output; it must exit on its own.
fn run_broker_under(wrapper: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bus.sock");
    let mut command = Command::new(wrapper[0]);
    command
        .args(&wrapper[1..])
        .arg(pbusd_binary())
        .arg("--broker")
        .arg("--listen")
        .arg(&socket)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn pbusd");
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pbusd --broker under {wrapper:?} did not exit (it should refuse to start)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        !socket.exists(),
        "a refusing broker must not leave a socket behind"
    );
    output
}

fn assert_refused(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "pbusd --broker started: {stderr}");
    assert!(
        stderr.contains("cannot run as a broker") && stderr.contains(needle),
        "expected a refusal naming {needle:?}, got:\n{stderr}"
    );
}

#[test]
fn broker_refuses_outside_the_host_pid_namespace() {
    if !require_root("unshare --pid") {
        return;
    }
    let output = run_broker_under(&["unshare", "--pid", "--fork", "--mount-proc", "--"]);
    assert_refused(
        &output,
        "run the broker in the host PID namespace (docker run --pid=host)",
    );
}

#[test]
fn broker_refuses_in_a_private_cgroup_namespace() {
    if !require_root("unshare --cgroup") {
        return;
    }
    let output = run_broker_under(&["unshare", "--cgroup", "--"]);
    assert_refused(&output, "(docker run --cgroupns=host)");
}

#[test]
fn broker_without_cap_sys_ptrace_says_so() {
    if !require_root("dropping CAP_SYS_PTRACE with setpriv") {
        return;
    }
    let output = run_broker_under(&[
        "setpriv",
        "--bounding-set",
        "-sys_ptrace",
        "--inh-caps",
        "-sys_ptrace",
        "--",
    ]);
    assert_refused(
        &output,
        "lacks CAP_SYS_PTRACE: grant it (docker run --cap-add SYS_PTRACE)",
    );
}

/// What this test process (root, with CAP_SYS_PTRACE) may read of pid 1:
/// `Ok` with its pid namespace, or the error the kernel gave.
fn init_pid_namespace() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/1/ns/pid").map(|m| m.ino())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_on_the_host_takes_init_as_the_host() {
    if !require_root("broker mode") {
        return;
    }
    let initial = init_pid_namespace();
    if let Err(error) = &initial {
        // The kernel refuses root (with CAP_SYS_PTRACE) here: pbusd must
        // refuse too, blaming a security module, not start with zeroes.
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::PermissionDenied,
            "{error}"
        );
        let output = run_broker_under(&["env"]);
        assert_refused(&output, "denies ptrace read access");
        eprintln!(
            "note: this machine denies reading /proc/1/ns to root ({error}); \
             checked the refusal, the accepting path needs another machine"
        );
        return;
    }
    assert_eq!(initial.unwrap(), pbus_identity::host::PROC_PID_INIT_INO);
    let bus = TestBus::builder().config("mode = \"broker\"\n").start();
    let observer = bus.connect().await;
    let own = observer.peer_identity("").await.unwrap();
    assert_eq!(
        ContainerView::of(own.container.as_ref()),
        ContainerView::host()
    );
    assert_eq!(own.bus_mode, BusMode::Broker as i32);
    assert_eq!(own.host_reference, HostReference::InitProcess as i32);
    let status = pbusctl_status_json(&bus, "");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["bus_mode"], "broker");
    assert_eq!(status["host_reference"], "init-process");
    assert_eq!(status["container"]["runtime"], "host");

    let Some(container) = container_or_skip(Shape::Plain, &[Placement::Both, Placement::Unified])
    else {
        return;
    };
    let isolation = Isolation::pid();
    let mut peer = container
        .spawn_peer(&bus, isolation, &["interact", "-"])
        .await;
    let name = peer.ready().await;
    let identity = observer.peer_identity(&name).await.unwrap();
    assert_eq!(
        ContainerView::of(identity.container.as_ref()),
        ContainerView::unknown()
    );
    assert_eq!(identity.cgroup, container.cgroup_path());
    assert!(peer.finish(TIMEOUT).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_mode_reports_its_own_namespaces_as_the_reference() {
    let bus = TestBus::start();
    let observer = bus.connect().await;
    let own = observer.peer_identity("").await.unwrap();
    assert_eq!(own.bus_mode, BusMode::Host as i32);
    assert_eq!(own.host_reference, HostReference::OwnNamespaces as i32);
    let binary = pbus_tests::pbusctl_binary();
    let output = Command::new(&binary)
        .arg("--address")
        .arg(bus.address().to_string())
        .arg("status")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|line| line.starts_with("Bus mode:"))
        .unwrap_or_else(|| panic!("no Bus mode line in:\n{text}"));
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>().join(" "),
        "Bus mode: host (host reference: pbusd's own namespaces)"
    );
    let json: serde_json::Value = serde_json::from_str(&pbusctl_status_json(&bus, "")).unwrap();
    assert_eq!(json["bus_mode"], "host");
    assert_eq!(json["host_reference"], "own-namespaces");
}

/// Removes the `--cgroup-parent` directories Docker made (and leaves
/// behind) in every mounted hierarchy.
struct CgroupParent(String);

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let Ok(mounts) = CgroupMounts::detect() else {
            return;
        };
        for mount in mounts.v2.iter().chain(&mounts.v1) {
            if let Some(dir) = mount.directory_for(&self.0) {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_cgroup_parent_is_docker_once_the_engine_confirms_it() {
    if !require_root("running a Docker container next to pbusd")
        || !require_docker("the --cgroup-parent test")
    {
        return;
    }
    let image = DockerImage::from_binaries(&[Path::new(PEER_BIN)])
        .unwrap_or_else(|why| panic!("cannot build the test image: {why}"));
    // Two buses on one socket directory: one may ask the engine, one may not.
    let confirming = TestBus::start();
    let blind = TestBus::builder()
        .config("docker_socket = \"\"\n")
        .socket_path(confirming.dir().join("blind.sock"))
        .start();
    let parent = CgroupParent(format!("/pbus-test-parent-{}", std::process::id()));
    let container = DockerContainer::unique();
    let mut command = Command::new("docker");
    command
        .args(["run", "--rm", "--interactive", "--network=none"])
        .args(["--name", container.name()])
        .args(["--cgroup-parent", &parent.0])
        .arg("--volume")
        .arg(format!("{}:/run/pbus", confirming.dir().display()))
        .arg(image.reference())
        .args(["/pbus-test-peer", "/run/pbus/bus.sock", "interact", "-"]);
    let mut peer = PeerProcess::spawn(command);
    let name = peer.expect_line("ready", TIMEOUT).await;
    let id = container.inspect("{{.Id}}").expect("docker inspect .Id");
    let host_pid: u32 = container
        .inspect("{{.State.Pid}}")
        .expect("docker inspect .State.Pid")
        .parse()
        .expect("a pid");
    let (v2, systemd) = cgroup_paths(host_pid);
    let expected_path = format!("{}/{id}", parent.0);
    assert!(
        [v2.as_deref(), systemd.as_deref()].contains(&Some(expected_path.as_str())),
        "the engine put pid {host_pid} in {v2:?} / {systemd:?}, not {expected_path}"
    );

    let observer = confirming.connect().await;
    let identity = observer.peer_identity(&name).await.unwrap();
    assert_eq!(
        ContainerView::of(identity.container.as_ref()),
        ContainerView::new(ContainerRuntime::Docker, &id, "")
    );
    assert_eq!(identity.cgroup, expected_path);
    assert_eq!(identity.pid, host_pid);

    // The same kind of container on a bus that may ask no engine.
    let blind_container = DockerContainer::unique();
    let mut command = Command::new("docker");
    command
        .args(["run", "--rm", "--interactive", "--network=none"])
        .args(["--name", blind_container.name()])
        .args(["--cgroup-parent", &parent.0])
        .arg("--volume")
        .arg(format!("{}:/run/pbus", confirming.dir().display()))
        .arg(image.reference())
        .args(["/pbus-test-peer", "/run/pbus/blind.sock", "interact", "-"]);
    let mut blind_peer = PeerProcess::spawn(command);
    let blind_name = blind_peer.expect_line("ready", TIMEOUT).await;
    let blind_id = blind_container
        .inspect("{{.Id}}")
        .expect("docker inspect .Id");
    let blind_observer = blind.connect().await;
    let identity = blind_observer.peer_identity(&blind_name).await.unwrap();
    assert_eq!(
        ContainerView::of(identity.container.as_ref()),
        ContainerView::unknown(),
        "a candidate nobody confirmed is unknown, never docker and never the host"
    );
    assert_eq!(identity.cgroup, format!("{}/{blind_id}", parent.0));
    // Let each container's main process end (stdin closed) so `--rm`
    // removes it before the guards would.
    assert!(peer.finish(TIMEOUT * 3).success(), "{}", peer.stderr());
    assert!(
        blind_peer.finish(TIMEOUT * 3).success(),
        "{}",
        blind_peer.stderr()
    );
    drop(container);
    drop(blind_container);
}
