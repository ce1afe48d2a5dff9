//! Connection limits, each at N (works) and N+1 (the connection is refused
//! with an ERROR frame naming the limit in `detail`), and a connect storm.
//!
//! * `max_connections` and `max_connections_per_uid`: the N+1st connection
//!   is refused; a connection of another uid is refused by the first and
//!   not by the second; once one closes, a new one gets in.
//! * `max_incomplete_handshakes` and `max_incomplete_handshakes_per_uid`:
//!   with N connections sitting before their HELLO, the next is refused at
//!   once (another uid is not, for the per-uid limit); the N then complete
//!   their handshakes, and newcomers get in again.
//! * 10,000 connections opened as fast as 64 at a time allow, by one uid
//!   limited to 500: exactly 500 complete, the other 9,500 get the limit's
//!   error, a client of another uid keeps pinging the bus with normal
//!   latency throughout, and once they close the daemon holds exactly the
//!   fds it held before.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use pbus_proto::v1::{ErrorCode, ErrorInfo, Feature, GetStatsReply, GetStatsRequest};
use pbus_proto::PROTOCOL_VERSION;
use pbus_tests::frames::{connect_retrying, try_connect, Connected};
use pbus_tests::{require_root, PeerProcess, RawClient, TestBus, TIMEOUT};
use tokio::sync::Semaphore;

const OTHER_UID: u32 = 65534;

fn assert_refused(info: &ErrorInfo, limit: &str, what: &str) {
    assert_eq!(
        info.code,
        ErrorCode::LimitsExceeded as i32,
        "{what}: {info:?}"
    );
    assert_eq!(info.detail, limit, "{what}: the error names the limit");
}

/// An echo service as `OTHER_UID` that got in, or `None` when not root.
async fn other_uid_echo(bus: &TestBus) -> Option<PeerProcess> {
    if !require_root("a connection of another uid") {
        return None;
    }
    let mut peer = bus.peer_as_uid(OTHER_UID, &["echo", "org.pbus.test.Other"]);
    peer.expect_line("ready", TIMEOUT).await;
    Some(peer)
}

async fn connect_n(bus: &TestBus, n: usize) -> Vec<RawClient> {
    let mut clients = Vec::new();
    for index in 0..n {
        clients.push(
            try_connect(bus.socket_path())
                .await
                .expect_welcome(&format!("connection {index} of N")),
        );
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_at_n_and_n_plus_1() {
    const N: usize = 6;
    let bus = TestBus::with_config(&format!(
        "[limits]\nmax_connections = {N}\nmax_connections_per_uid = 100\n"
    ));
    let baseline = bus.settled_fd_count().await;
    let mut clients = connect_n(&bus, N).await;
    let refusal = try_connect(bus.socket_path())
        .await
        .expect_refused("connection N+1");
    assert_refused(&refusal, "max_connections", "connection N+1");
    if require_root("a connection of another uid") {
        // The limit is for everyone.
        let mut other = bus.peer_as_uid(OTHER_UID, &["echo", "org.pbus.test.Other"]);
        let status = other.finish(TIMEOUT);
        assert_eq!(status.code(), Some(2), "{}", other.stderr());
        assert!(
            other.stderr().contains("max_connections"),
            "{}",
            other.stderr()
        );
    }
    // One leaves, one gets in.
    clients.pop();
    bus.wait_for_fd_count(baseline + N - 1, TIMEOUT).await;
    clients.push(
        try_connect(bus.socket_path())
            .await
            .expect_welcome("after one left"),
    );
    for client in &mut clients {
        client.sync().await;
    }
    drop(clients);
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_uid_at_n_and_n_plus_1() {
    const N: usize = 5;
    let bus = TestBus::with_config(&format!("[limits]\nmax_connections_per_uid = {N}\n"));
    let baseline = bus.settled_fd_count().await;
    let mut clients = connect_n(&bus, N).await;
    let refusal = try_connect(bus.socket_path())
        .await
        .expect_refused("connection N+1");
    assert_refused(&refusal, "max_connections_per_uid", "connection N+1");
    // Another uid has a limit of its own.
    let other = other_uid_echo(&bus).await;
    clients.pop();
    bus.wait_for_fd_count(baseline + N - 1 + usize::from(other.is_some()), TIMEOUT)
        .await;
    clients.push(
        try_connect(bus.socket_path())
            .await
            .expect_welcome("after one left"),
    );
    drop(clients);
    if let Some(mut other) = other {
        assert!(other.finish(TIMEOUT).success());
    }
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

/// Opens `n` connections that send nothing, and waits until the daemon
/// has taken them all in (it holds their sockets and answers a round trip
/// that was sent after them).
async fn unhandshaked(bus: &TestBus, good: &pbus::Connection, n: usize) -> Vec<RawClient> {
    let before = bus.fd_count();
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(connect_retrying(bus.socket_path()).await);
    }
    bus.wait_for_fd_count(before + n, TIMEOUT).await;
    good.ping().await.unwrap();
    clients
}

/// Connects without a handshake and expects the bus to refuse the
/// connection at once, naming `limit`, and to close it.
async fn expect_refused_before_hello(bus: &TestBus, limit: &str, what: &str) -> RawClient {
    let mut refused = connect_retrying(bus.socket_path()).await;
    let error = refused.recv(TIMEOUT).await.unwrap();
    assert_refused(error.error().expect("an ERROR"), limit, what);
    assert!(refused.read_until_closed(TIMEOUT).await.unwrap().is_empty());
    refused
}

async fn complete_handshakes(clients: &mut [RawClient]) {
    for client in clients {
        client
            .hello(PROTOCOL_VERSION, Feature::FdPassing as u32)
            .await
            .expect("a waiting connection completes its handshake");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_handshakes_at_n_and_n_plus_1() {
    const N: usize = 4;
    let bus = TestBus::with_config(&format!(
        "[limits]\nmax_incomplete_handshakes = {N}\nmax_incomplete_handshakes_per_uid = 100\n"
    ));
    let good = bus.connect().await;
    let baseline = bus.settled_fd_count().await;
    let mut waiting = unhandshaked(&bus, &good, N).await;
    // The next one is refused before it says anything.
    let refused =
        expect_refused_before_hello(&bus, "max_incomplete_handshakes", "handshake N+1").await;
    // The N complete, and then there is room again.
    complete_handshakes(&mut waiting).await;
    let mut late = try_connect(bus.socket_path())
        .await
        .expect_welcome("after the handshakes completed");
    late.sync().await;
    drop((waiting, late, refused));
    good.ping().await.unwrap();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_handshakes_per_uid_at_n_and_n_plus_1() {
    const N: usize = 3;
    let bus = TestBus::with_config(&format!(
        "[limits]\nmax_incomplete_handshakes = 100\nmax_incomplete_handshakes_per_uid = {N}\n"
    ));
    let good = bus.connect().await;
    let baseline = bus.settled_fd_count().await;
    let mut waiting = unhandshaked(&bus, &good, N).await;
    let refused = expect_refused_before_hello(
        &bus,
        "max_incomplete_handshakes_per_uid",
        "handshake N+1 of one uid",
    )
    .await;
    // Another uid is not held up by this one's waiting connections.
    let other = other_uid_echo(&bus).await;
    complete_handshakes(&mut waiting).await;
    let mut late = try_connect(bus.socket_path())
        .await
        .expect_welcome("after the handshakes completed");
    late.sync().await;
    drop((waiting, late, refused));
    if let Some(mut other) = other {
        assert!(other.finish(TIMEOUT).success());
    }
    good.ping().await.unwrap();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_of_one_uid_over_its_limit() {
    const LIMIT: usize = 500;
    const ATTEMPTS: usize = 10_000;
    const AT_ONCE: usize = 64;
    if !require_root("a pinging client under another uid during the storm") {
        return;
    }
    let limit = pbus_sys::process::raise_fd_limit(Some(1 << 16)).expect("raise RLIMIT_NOFILE");
    assert!(limit.soft > (LIMIT + AT_ONCE) as u64 * 2 + 200, "{limit:?}");
    let bus = TestBus::with_config(&format!(
        "[limits]\nmax_connections_per_uid = {LIMIT}\nmax_incomplete_handshakes = 256\n\
         max_incomplete_handshakes_per_uid = 256\n"
    ));
    let mut pinger = bus.peer_as_uid(OTHER_UID, &["ping-loop"]);
    pinger.expect_line("connected", TIMEOUT).await;
    let baseline = bus.settled_fd_count().await;
    // Forget the pings from before the storm.
    pinger.pending_lines();

    let started = Instant::now();
    let slots = Arc::new(Semaphore::new(AT_ONCE));
    let socket = bus.socket_path().to_owned();
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..ATTEMPTS {
        let permit = Arc::clone(&slots).acquire_owned().await.unwrap();
        let socket = socket.clone();
        attempts.spawn(async move {
            let outcome = try_connect(&socket).await;
            drop(permit);
            outcome
        });
    }
    let mut welcomed = Vec::new();
    let mut refused = 0usize;
    while let Some(outcome) = attempts.join_next().await {
        match outcome.unwrap() {
            Connected::Welcome(client) => welcomed.push(client),
            Connected::Refused(info) => {
                assert_refused(
                    &info,
                    "max_connections_per_uid",
                    "a connection over the limit",
                );
                refused += 1;
            }
        }
    }
    let storm = started.elapsed();
    assert_eq!(welcomed.len(), LIMIT, "connections that completed");
    assert_eq!(refused, ATTEMPTS - LIMIT, "connections refused");

    // The bus counts them the same way.
    let stats: GetStatsReply = welcomed[0]
        .bus_call("GetStats", &GetStatsRequest {})
        .await
        .unwrap();
    let uid0 = stats.uids.iter().find(|uid| uid.uid == 0).unwrap();
    assert_eq!(uid0.connections as usize, LIMIT);

    // The other uid's pings went on throughout, at normal latency (the
    // lines it printed so far, without waiting for more).
    let pongs: Vec<Duration> = pinger
        .pending_lines()
        .iter()
        .map(|line| {
            let micros: u64 = line
                .strip_prefix("pong ")
                .unwrap_or_else(|| panic!("the pinger said {line:?}"))
                .parse()
                .unwrap();
            Duration::from_micros(micros)
        })
        .collect();
    let slowest = pongs.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{ATTEMPTS} connections ({AT_ONCE} at a time) in {storm:?}: {} welcomed, {refused} \
         refused; another uid pinged {} times meanwhile, slowest {slowest:?}",
        welcomed.len(),
        pongs.len()
    );
    assert!(
        pongs.len() >= 5,
        "only {} pings answered during a {storm:?} storm",
        pongs.len()
    );
    assert!(slowest < Duration::from_secs(1), "a ping took {slowest:?}");

    drop(welcomed);
    bus.wait_for_fd_count(baseline, Duration::from_secs(30))
        .await;
    assert!(pinger.finish(TIMEOUT).success());
}
