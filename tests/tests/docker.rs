//! A peer in a container made by the real Docker engine is identified as
//! Docker knows it.
//!
//! The test builds a one-layer local image (`docker import` of the
//! `pbus-test-peer` binary, the libraries `ldd` lists and the loader: no
//! registry needed), runs it with the bus's socket directory bind-mounted
//! at `/run/pbus` (and `PBUS_ADDRESS` set), the helper being the
//! container's main process, and checks that the daemon reports runtime
//! `docker` with exactly the id `docker inspect` gives, the pid the host
//! sees (`.State.Pid`), and stamps that pid on the reply a host receiver
//! gets, while the container sees itself as pid 1 and the host caller as
//! 0. It runs whenever `docker info` answers; otherwise it says so loudly
//! and passes, unless `PBUS_REQUIRE_DOCKER=1`. The container and image are
//! removed by the unique names the test gave them, even on failure.
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::Command;

use pbus_proto::v1::ContainerRuntime;
use pbus_tests::containers::{cgroup_paths, check_pbusctl_status, who_am_i, ContainerView};
use pbus_tests::containers_docker::{require_docker, DockerContainer, DockerImage};
use pbus_tests::{require_root, PeerProcess, TestBus, TIMEOUT};

const PEER_BIN: &str = env!("CARGO_BIN_EXE_pbus-test-peer");
const SERVICE: &str = "org.pbus.test.InDocker";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_container_peer_is_identified_as_docker_knows_it() {
    if !require_root("running a Docker container next to pbusd")
        || !require_docker("the Docker identity test")
    {
        return;
    }
    let bus = TestBus::start();
    let observer = bus.connect().await;
    let image = DockerImage::from_binaries(&[Path::new(PEER_BIN)])
        .unwrap_or_else(|why| panic!("cannot build the test image: {why}"));
    let container = DockerContainer::unique();
    let mut command = Command::new("docker");
    command
        .args(["run", "--rm", "--interactive", "--network=none"])
        .args(["--name", container.name()])
        .arg("--volume")
        .arg(format!("{}:/run/pbus", bus.dir().display()))
        .args(["--env", "PBUS_ADDRESS=unix:path=/run/pbus/bus.sock"])
        .arg(image.reference())
        .args(["/pbus-test-peer", "/run/pbus/bus.sock", "interact", SERVICE]);
    let mut peer = PeerProcess::spawn(command);
    let name = peer.expect_line("ready", TIMEOUT).await;

    let id = container.inspect("{{.Id}}").expect("docker inspect .Id");
    let host_pid: u32 = container
        .inspect("{{.State.Pid}}")
        .expect("docker inspect .State.Pid")
        .parse()
        .expect("a pid");
    assert_eq!(id.len(), 64, "{id:?}");
    assert!(host_pid > 1);
    // Sanity: the engine put that process in the container's cgroups.
    let (v2, systemd) = cgroup_paths(host_pid);
    assert!(
        [v2.as_deref(), systemd.as_deref()]
            .iter()
            .flatten()
            .any(|path| path.contains(&id)),
        "pid {host_pid} is in {v2:?} / {systemd:?}"
    );

    let expected = ContainerView::new(ContainerRuntime::Docker, &id, "");
    let identity = observer.peer_identity(&name).await.unwrap();
    assert_eq!(ContainerView::of(identity.container.as_ref()), expected);
    assert_eq!(
        identity.pid, host_pid,
        "GetPeerIdentity pid seen from the host"
    );
    assert_eq!(
        identity.listener,
        bus.socket_path().to_string_lossy(),
        "the listener is the host's socket path"
    );
    check_pbusctl_status(&bus, &name, &expected, host_pid);

    // A message the container peer sends (its reply) reaches a host
    // receiver stamped with the host pid; the peer is pid 1 inside and saw
    // the host caller as 0.
    // By unique name: the host does not resolve names owned in a
    // container's name scope.
    let (stamp, said) = who_am_i(&observer, &name).await;
    assert_eq!(stamp.unique_name, name);
    assert_eq!(stamp.pid, host_pid, "stamped pid on the reply");
    assert_eq!(ContainerView::of(stamp.container.as_ref()), expected);
    assert_eq!(said.pid, 1, "the helper is the container's main process");
    let caller = said.caller.expect("caller stamp");
    assert_eq!(caller.unique_name, observer.unique_name());
    assert_eq!(
        caller.pid, 0,
        "the host caller is not visible in the container"
    );

    // From inside: the bus answers, and the peer sees itself as Docker,
    // pid 1.
    peer.send("ping");
    assert_eq!(peer.next_line(TIMEOUT).await, "pong");
    peer.send("identity -");
    let own = peer.next_line(TIMEOUT).await;
    assert!(
        own.starts_with(&format!("identity name={name} pid=1 ")),
        "{own:?}"
    );
    assert!(
        own.contains(&format!("runtime=CONTAINER_RUNTIME_DOCKER id={id} pod=- ")),
        "{own:?}"
    );

    // Closing stdin ends the helper, and with it the container.
    assert!(peer.finish(TIMEOUT * 3).success(), "{}", peer.stderr());
    drop(container);
    drop(image);
}
