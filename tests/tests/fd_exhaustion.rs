//! Running out of fd slots while receiving fds: the kernel installs what
//! fits, closes the rest and flags the message MSG_CTRUNC. The fds of that
//! frame are then incomplete, so the receiving side must treat the
//! connection as broken.
//!
//! * The daemon: `pbusd` runs as uid 65534 with a hard RLIMIT_NOFILE of 128
//!   (which it cannot raise), clients of that uid around it. A call with
//!   fewer fds than the daemon has free slots is delivered; one with more
//!   gets its sender a PROTOCOL_VIOLATION naming MSG_CTRUNC and a
//!   disconnect, while the service and other clients keep working and the
//!   daemon ends up holding exactly the fds it held before.
//! * A client: a service whose own fd table is nearly full (a hard limit
//!   of 64) takes a call with 10 fds, then is sent 100. Its library sees
//!   MSG_CTRUNC and drops the connection; the caller gets NO_REPLY, the
//!   bus and everyone else carry on, and neither the service process nor
//!   the daemon keeps any of the fds.
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::Command;

use pbus_proto::v1::{ErrorCode, MessageKind};
use pbus_tests::confined::ConfinedBus;
use pbus_tests::fdkit::dev_nulls;
use pbus_tests::messages::Text;
use pbus_tests::{procfs, require_root, PeerProcess, TestBus, TIMEOUT};

const PEER_BIN: &str = env!("CARGO_BIN_EXE_pbus-test-peer");
const SERVICE: &str = "org.pbus.test.FdSink";
const UNPRIVILEGED: u32 = 65534;
/// The confined daemon's RLIMIT_NOFILE, soft and hard.
const DAEMON_NOFILE: u64 = 128;
/// The fd-starved service's RLIMIT_NOFILE, soft and hard.
const SERVICE_NOFILE: u64 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_out_of_fd_slots_disconnects_the_sender_whose_fds_were_truncated() {
    if !require_root("running pbusd as another uid with a low fd limit") {
        return;
    }
    let bus = ConfinedBus::start(
        UNPRIVILEGED,
        DAEMON_NOFILE,
        Some("[limits]\nmax_fds_per_message = 253\n"),
        Path::new(PEER_BIN),
    );
    assert_eq!(bus.fd_limit(), (DAEMON_NOFILE, DAEMON_NOFILE));
    let mut service = PeerProcess::spawn(bus.peer_command(&[], &["fd-sink", SERVICE]));
    service.expect_line("ready", TIMEOUT).await;
    let baseline = procfs::settled_fd_count(bus.pid()).await;
    let free = DAEMON_NOFILE as usize - baseline;
    assert!(free > 40, "the daemon already holds {baseline} fds");

    // Fewer fds than free slots (a sender's socket takes one more): delivered.
    let fits = (free / 2).to_string();
    let mut sender = PeerProcess::spawn(bus.peer_command(&[], &["send-fds", SERVICE, &fits]));
    sender.expect_line("connected", TIMEOUT).await;
    assert_eq!(sender.expect_line("answer", TIMEOUT).await, "0 - -");
    assert!(sender.finish(TIMEOUT).success());
    procfs::wait_for_fd_count(bus.pid(), baseline, TIMEOUT).await;

    // More fds than free slots: the kernel truncates them; the sender is
    // told why and disconnected.
    let mut sender = PeerProcess::spawn(bus.peer_command(&[], &["send-fds", SERVICE, "200"]));
    sender.expect_line("connected", TIMEOUT).await;
    let closed = sender.expect_line("closed", TIMEOUT).await;
    assert!(
        closed.starts_with(&format!("{} - ", ErrorCode::ProtocolViolation as i32)),
        "{closed}"
    );
    assert!(closed.contains("MSG_CTRUNC"), "{closed}");
    assert!(sender.finish(TIMEOUT).success());

    // The service and a new client carry on; nothing leaked.
    let mut caller = PeerProcess::spawn(bus.peer_command(&[], &["call", SERVICE, "Take", "x"]));
    caller.expect_line("connected", TIMEOUT).await;
    assert_eq!(caller.next_line(TIMEOUT).await, "ok took 0");
    assert!(caller.finish(TIMEOUT).success());
    procfs::wait_for_fd_count(bus.pid(), baseline, TIMEOUT).await;
    let mut bus = bus;
    assert!(bus.is_running());
    assert!(service.finish(TIMEOUT).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_out_of_fd_slots_drops_its_own_connection() {
    let bus = TestBus::with_config("[limits]\nmax_fds_per_message = 253\n");
    let good = bus.connect().await;
    let baseline = bus.settled_fd_count().await;
    let mut command = Command::new("prlimit");
    command
        .arg(format!("--nofile={SERVICE_NOFILE}:{SERVICE_NOFILE}"))
        .arg("--")
        .arg(PEER_BIN)
        .arg(bus.socket_path())
        .args(["fd-sink", SERVICE]);
    let mut service = PeerProcess::spawn(command);
    service.expect_line("ready", TIMEOUT).await;
    let service_fds = procfs::settled_fd_count(service.pid()).await;
    assert!(
        (service_fds as u64) < SERVICE_NOFILE - 20,
        "the service already holds {service_fds} fds"
    );
    let mut caller = bus.raw().await;

    // A few fds fit.
    let fds = dev_nulls(10);
    let serial = caller
        .send_call_with_fds(SERVICE, "Take", &fds)
        .await
        .unwrap();
    drop(fds);
    let reply = caller.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_eq!(reply.kind(), MessageKind::MethodReturn, "{reply:?}");
    assert_eq!(reply.decode::<Text>().text, "took 10");
    procfs::wait_for_fd_count(service.pid(), service_fds, TIMEOUT).await;

    // Too many: the service's library sees MSG_CTRUNC and hangs up; the
    // call fails with NO_REPLY.
    let fds = dev_nulls(100);
    let serial = caller
        .send_call_with_fds(SERVICE, "Take", &fds)
        .await
        .unwrap();
    drop(fds);
    assert_eq!(service.next_line(TIMEOUT).await, "disconnected");
    let answer = caller.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_eq!(answer.error_code(), Some(ErrorCode::NoReply), "{answer:?}");
    // The service process kept none of the fds that did arrive.
    procfs::wait_for_fd_count(service.pid(), service_fds, TIMEOUT).await;

    // Everyone else carries on.
    good.ping().await.unwrap();
    caller.sync().await;
    drop(caller);
    assert!(service.finish(TIMEOUT).success());
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}
