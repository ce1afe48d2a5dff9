//! Attacks with passed fds that an outside test suite found against the
//! real daemon, each with the fix it proves:
//!
//! * **A connection kept alive by its own socket** (the CVE-2014-3637
//!   class). A client that passes its own bus socket along, while its
//!   queue cannot be written or in a frame it never finishes, and then
//!   exits, would never be seen to hang up: the daemon itself holds the
//!   last reference to the client's end. Passing a connection to this bus
//!   is refused outright (the client is told why and disconnected); a
//!   socket that carries the client's connection inside its own queue is
//!   caught by `pending_fd_timeout_ms`: a queue holding fds that does not
//!   move for that long gets its peer disconnected. Repeating either
//!   leaves no peer and no fd behind.
//! * **An honest receiver disconnected because another uid flooded fds**
//!   (the CVE-2014-3532/3533 class). With the daemon running as a
//!   non-root uid, the kernel lets it have only RLIMIT_NOFILE fds in
//!   flight. Another uid sending 64-fd messages to receivers that never
//!   read gets its own messages refused (`max_fds_in_flight`) once it
//!   holds its fair share, and an honest receiver keeps getting its fds.
#![forbid(unsafe_code)]

use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::time::Duration;

use pbus_proto::frame::PREFIX_LEN;
use pbus_proto::v1::{ErrorCode, GetStatsReply, GetStatsRequest};
use pbus_tests::confined::ConfinedBus;
use pbus_tests::frames::{call_header, signal_header};
use pbus_tests::{procfs, require_root, PeerProcess, RawClient, TestBus, TIMEOUT};

const PEER_BIN: &str = env!("CARGO_BIN_EXE_pbus-test-peer");

/// Connections the bus counts, as `GetStats` reports them to `asker`
/// (the asker included).
async fn connection_count(asker: &mut RawClient) -> u32 {
    let stats: GetStatsReply = asker
        .bus_call("GetStats", &GetStatsRequest {})
        .await
        .expect("GetStats");
    stats.connections
}

/// Makes `client`'s own queue in the daemon hold frames the kernel has no
/// room for: it stops reading and sends itself unicast signals until the
/// daemon reports bytes waiting in its queue.
async fn clog_own_queue(client: &mut RawClient, observer: &mut RawClient) {
    let me = client.unique_name().to_owned();
    let body = vec![b'c'; 60 << 10];
    for round in 0..200 {
        let header = signal_header(client.next_serial(), &me, "/org/pbus/test/clog", "Clog");
        client.send(&header, &body).await.expect("send to self");
        if round % 8 == 7 {
            let stats: GetStatsReply = observer
                .bus_call("GetStats", &GetStatsRequest {})
                .await
                .expect("GetStats");
            let queued = stats
                .peers
                .iter()
                .find(|peer| peer.unique_name == me)
                .map_or(0, |peer| peer.queued_bytes);
            if queued > 0 {
                return;
            }
        }
    }
    panic!("the daemon never had to queue frames for {me}");
}

/// The client's own socket end, duplicated (what it passes along).
fn own_socket(client: &RawClient) -> OwnedFd {
    client
        .stream()
        .as_fd()
        .try_clone_to_owned()
        .expect("dup the client's socket")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_passing_its_own_connection_is_refused_and_leaves_nothing_behind() {
    let bus = TestBus::start();
    let mut observer = bus.raw().await;
    let baseline_fds = bus.settled_fd_count().await;
    let baseline_peers = connection_count(&mut observer).await;
    for attempt in 0..10 {
        let mut client = bus.raw().await;
        clog_own_queue(&mut client, &mut observer).await;
        // A call to itself carrying its own connection, while the daemon
        // cannot write to it.
        let me = client.unique_name().to_owned();
        let header = call_header(client.next_serial(), &me, "Hold");
        let socket = own_socket(&client);
        client
            .send_with_fds(&header, &[], &[socket.as_fd()])
            .await
            .expect("send the socket");
        drop(socket);
        // Its process exits: every fd of its own is closed.
        drop(client);
        let deadline = std::time::Instant::now() + TIMEOUT;
        while connection_count(&mut observer).await != baseline_peers {
            assert!(
                std::time::Instant::now() < deadline,
                "attempt {attempt}: the peer stays connected; stderr:\n{}",
                bus.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    bus.wait_for_fd_count(baseline_fds, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_a_bus_connection_gets_a_clear_refusal() {
    let bus = TestBus::start();
    let baseline_fds = bus.settled_fd_count().await;
    let mut service = bus.raw_owning("org.pbus.test.Holder").await;
    // Not even someone else's: any connection to this bus is refused.
    let other = bus.raw().await;
    let mut client = bus.raw().await;
    let header = call_header(client.next_serial(), "org.pbus.test.Holder", "Hold");
    let socket = own_socket(&other);
    client
        .send_with_fds(&header, &[], &[socket.as_fd()])
        .await
        .expect("send the socket");
    drop(socket);
    let frames = client.read_until_closed(TIMEOUT).await.expect("closed");
    let refusal = frames
        .iter()
        .find_map(|frame| frame.error())
        .expect("an error saying why");
    assert_eq!(
        refusal.code,
        ErrorCode::FdsNotSupported as i32,
        "{refusal:?}"
    );
    assert!(
        refusal.message.contains("connection to this bus"),
        "{refusal:?}"
    );
    // Nothing reached the service; it and the other client carry on.
    assert!(service.take_delivered().await.is_empty());
    drop(other);
    drop(client);
    drop(service);
    bus.wait_for_fd_count(baseline_fds, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_frame_carrying_its_own_connection_leaves_nothing_behind() {
    let bus = TestBus::start();
    let mut observer = bus.raw().await;
    let baseline_fds = bus.settled_fd_count().await;
    let baseline_peers = connection_count(&mut observer).await;
    for attempt in 0..10 {
        let mut client = bus.raw().await;
        let me = client.unique_name().to_owned();
        let mut frame = Vec::new();
        pbus_proto::frame::encode_frame(&mut frame, &call_header(1, &me, "Hold"), &[7; 64], 1);
        // The prefix and part of the header, never the rest.
        let partial = &frame[..PREFIX_LEN + 4];
        let socket = own_socket(&client);
        client
            .send_bytes_with_fds(partial, &[socket.as_fd()])
            .await
            .expect("send half a frame");
        drop(socket);
        drop(client);
        let deadline = std::time::Instant::now() + TIMEOUT;
        while connection_count(&mut observer).await != baseline_peers {
            assert!(
                std::time::Instant::now() < deadline,
                "attempt {attempt}: the peer stays connected; stderr:\n{}",
                bus.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    bus.wait_for_fd_count(baseline_fds, TIMEOUT).await;
}

/// The timeout the nested-socket test runs the daemon with.
const PENDING_FD_TIMEOUT_MS: u64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_hidden_inside_a_queued_socket_is_collected_by_the_pending_fd_timeout() {
    let bus = TestBus::with_config(&format!(
        "[limits]\npending_fd_timeout_ms = {PENDING_FD_TIMEOUT_MS}\n"
    ));
    let mut observer = bus.raw().await;
    let baseline_fds = bus.settled_fd_count().await;
    let baseline_peers = connection_count(&mut observer).await;
    for attempt in 0..3 {
        let mut client = bus.raw().await;
        clog_own_queue(&mut client, &mut observer).await;
        // Its own connection goes into the queue of a socket pair, and the
        // receiving end of the pair into its own queue in the daemon: the
        // daemon cannot tell that this socket keeps the client alive.
        let (near, far) = StdUnixStream::pair().expect("socketpair");
        let socket = own_socket(&client);
        pbus_sys::fdpass::send_with_fds(&near, &[IoSlice::new(b"x")], &[socket.as_fd()])
            .expect("park the connection in the pair");
        drop(socket);
        let me = client.unique_name().to_owned();
        let header = call_header(client.next_serial(), &me, "Hold");
        client
            .send_with_fds(&header, &[], &[far.as_fd()])
            .await
            .expect("send the pair's end");
        drop(far);
        drop(near);
        drop(client);
        let deadline = std::time::Instant::now() + TIMEOUT;
        while connection_count(&mut observer).await != baseline_peers {
            assert!(
                std::time::Instant::now() < deadline,
                "attempt {attempt}: the peer is still connected {TIMEOUT:?} later; stderr:\n{}",
                bus.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    bus.wait_for_fd_count(baseline_fds, TIMEOUT).await;
}

/// The session bus's uid, the flooder's and the honest pair's.
const BUS_UID: u32 = 64_001;
const FLOODER_UID: u32 = 64_002;
const HONEST_UID: u32 = 64_003;
/// The session bus's RLIMIT_NOFILE: what the kernel lets it have in flight.
const BUS_NOFILE: u64 = 256;
const HONEST_SERVICE: &str = "org.pbus.test.Honest";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fd_flood_by_another_uid_is_refused_to_it_and_never_disconnects_an_honest_receiver() {
    if !require_root("running pbusd as a session bus of another uid") {
        return;
    }
    let bus =
        ConfinedBus::start_identifying_other_uids(BUS_UID, BUS_NOFILE, None, Path::new(PEER_BIN));
    let mut sink =
        PeerProcess::spawn(bus.peer_command_as(HONEST_UID, &["fd-sink", HONEST_SERVICE]));
    sink.expect_line("ready", TIMEOUT).await;
    let baseline = procfs::settled_fd_count(bus.pid()).await;

    // 10 messages of 32 fds to 10 receivers that never read: 320 fds,
    // more than the kernel lets the daemon's user have in flight. (Bigger
    // messages would not even get in: the flooder's uid may make the
    // daemon hold only a fair share of its 192 fd slots at once.)
    let mut flooder =
        PeerProcess::spawn(bus.peer_command_as(FLOODER_UID, &["fd-flood", "12", "10", "32"]));
    flooder.expect_line("connected", TIMEOUT).await;
    let flooded = flooder.expect_line("fd-flooded", TIMEOUT * 2).await;
    let words: Vec<&str> = flooded.split_whitespace().collect();
    let refused: usize = words[1].parse().expect("a refusal count");
    assert!(
        refused >= 1 && words[2] == "max_fds_in_flight",
        "the flooder was not refused: {flooded}; stderr:\n{}",
        bus.stderr()
    );

    // The honest pair, while the flooder's receivers still hold their fds.
    let mut sender =
        PeerProcess::spawn(bus.peer_command_as(HONEST_UID, &["send-fds", HONEST_SERVICE, "4"]));
    sender.expect_line("connected", TIMEOUT).await;
    assert_eq!(
        sender.expect_line("answer", TIMEOUT).await,
        "0 - -",
        "stderr:\n{}",
        bus.stderr()
    );
    assert!(sender.finish(TIMEOUT).success());
    let mut caller =
        PeerProcess::spawn(bus.peer_command_as(HONEST_UID, &["call", HONEST_SERVICE, "Take", "x"]));
    caller.expect_line("connected", TIMEOUT).await;
    assert_eq!(caller.next_line(TIMEOUT).await, "ok took 0");
    assert!(caller.finish(TIMEOUT).success());
    assert!(
        !sink
            .pending_lines()
            .iter()
            .any(|line| line == "disconnected"),
        "the honest receiver was disconnected"
    );

    // The flood ends; nothing stays behind.
    assert!(flooder.finish(TIMEOUT).success());
    procfs::wait_for_fd_count(bus.pid(), baseline, TIMEOUT).await;
    drop(sink);
}
