//! Receiver queues and the fair share of them, with real senders under
//! real uids.
//!
//! The daemon's queue for a receiver only holds what the receiver's socket
//! would not take. So each test first plugs the receiver's socket (sends
//! until `GetStats` shows something waiting in the daemon); from then on
//! every accepted frame is charged to the queue and the accounting is
//! exact.
//!
//! * `max_queued_messages_per_receiver`, `max_queued_bytes_per_receiver`
//!   (to the byte) and `max_queued_fds_per_receiver`: N queued works, one
//!   more is refused with RECEIVER_QUEUE_FULL naming the limit, and the
//!   receiver, once it reads, gets exactly the accepted messages.
//! * A receiver that never reads: senders offer 120 MiB to four such
//!   receivers with 2 MiB caps; all but the caps is refused at once, an
//!   echo pair keeps its normal latency, and the daemon's peak resident
//!   memory stays far below what was offered.
//! * A sender that floods without reading its answers: its own queue (of
//!   the errors it does not read) fills and it is disconnected; the
//!   daemon's memory stays bounded and others keep working.
//! * Several uids sharing one receiver (a policy file lets uids 1001, 1002
//!   and 1003 talk to it): each foreign uid is stopped at its fair share
//!   (RECEIVER_QUEUE_FULL, "fair share") while the queue still has room, so
//!   none starves the next; the receiver's own uid may fill the rest; the
//!   per-uid use `GetStats` reports matches what each sender was accepted,
//!   and what the receiver reads per sender uid matches too.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use pbus::Connection;
use pbus_proto::v1::{ErrorCode, ErrorInfo};
use pbus_tests::fdkit::{borrow_all, dev_nulls};
use pbus_tests::frames::{call_header, expect_serials, peer_stats, queued_by, signal_header};
use pbus_tests::messages::Text;
use pbus_tests::{procfs, require_root, EchoPair, RawClient, TestBus, TIMEOUT};
use prost::Message;

const SIGNAL_PATH: &str = "/org/pbus/test/quota";
/// Body of the frames that plug a receiver's socket.
const PLUG_BODY: usize = 60 << 10;

/// A raw sender of unicast signals with serials of constant width (so
/// frames with equal bodies have equal sizes and quota charges).
struct Sender {
    client: RawClient,
}

impl Sender {
    async fn new(bus: &TestBus) -> Self {
        let mut client = bus.raw().await;
        while client.next_serial() < 1000 {}
        Self { client }
    }

    /// Sends one unicast signal with a `body_len`-byte body and `fds`;
    /// returns its serial and the refusal, if the bus refused it.
    async fn signal(
        &mut self,
        destination: &str,
        body_len: usize,
        fds: &[OwnedFd],
    ) -> (u64, Option<ErrorInfo>) {
        let serial = self.client.next_serial();
        let header = signal_header(serial, destination, SIGNAL_PATH, "Quota");
        self.client
            .send_with_fds(&header, &vec![b'q'; body_len], &borrow_all(fds))
            .await
            .unwrap();
        (serial, self.client.refusal_of(serial).await)
    }
}

/// Sends plug frames to `receiver` until the daemon has to queue one
/// (its socket is full). Returns their serials.
async fn plug(sender: &mut Sender, observer: &Connection, receiver: &RawClient) -> Vec<u64> {
    let mut serials = Vec::new();
    for _ in 0..200 {
        let (serial, refusal) = sender.signal(receiver.unique_name(), PLUG_BODY, &[]).await;
        assert!(refusal.is_none(), "a plug frame was refused: {refusal:?}");
        serials.push(serial);
        if peer_stats(observer, receiver.unique_name())
            .await
            .queued_messages
            > 0
        {
            return serials;
        }
    }
    panic!("200 frames of {PLUG_BODY} bytes did not fill a socket");
}

/// Reads until every serial in `expected` arrived (in order), then checks
/// nothing else came; returns the frames' fd counts.
async fn drain(receiver: &mut RawClient, expected: &[u64]) -> Vec<usize> {
    expect_serials(receiver, expected, "the receiver reads")
        .await
        .iter()
        .map(|frame| frame.fds.len())
        .collect()
}

fn assert_queue_full(refusal: Option<&ErrorInfo>, limit: &str, what: &str) {
    let refusal = refusal.unwrap_or_else(|| panic!("{what}: accepted"));
    assert_eq!(
        refusal.code,
        ErrorCode::ReceiverQueueFull as i32,
        "{what}: {refusal:?}"
    );
    assert_eq!(refusal.detail, limit, "{what}: the error names the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_queue_caps_at_n_and_n_plus_1() {
    const MESSAGES: u64 = 64;
    const BYTES: u64 = 1 << 20;
    const FDS: u64 = 16;
    let bus = TestBus::with_config(&format!(
        "[limits]\nmax_frame_bytes = {}\nmax_queued_messages_per_receiver = {MESSAGES}\n\
         max_queued_bytes_per_receiver = {BYTES}\nmax_queued_fds_per_receiver = {FDS}\n",
        256 << 10
    ));
    let baseline = bus.settled_fd_count().await;
    let observer = bus.connect().await;
    let mut sender = Sender::new(&bus).await;

    // Messages: N queued, then one more refused.
    let mut receiver_m = bus.raw_owning("org.pbus.test.Messages").await;
    let to = receiver_m.unique_name().to_owned();
    let mut accepted = plug(&mut sender, &observer, &receiver_m).await;
    let queued = peer_stats(&observer, &to).await.queued_messages;
    for _ in queued..MESSAGES {
        let (serial, refusal) = sender.signal(&to, 0, &[]).await;
        assert!(
            refusal.is_none(),
            "message {serial} of N refused: {refusal:?}"
        );
        accepted.push(serial);
    }
    let stats = peer_stats(&observer, &to).await;
    assert_eq!(stats.queued_messages, MESSAGES);
    assert_eq!(queued_by(&stats, 0).0, MESSAGES);
    let (_, refusal) = sender.signal(&to, 0, &[]).await;
    assert_queue_full(
        refusal.as_ref(),
        "max_queued_messages_per_receiver",
        "message N+1",
    );
    assert!(refusal.unwrap().message.contains("queue is full"));

    // Bytes, to the byte: fill to exactly N, then N+1 is refused.
    let mut receiver_b = bus.raw_owning("org.pbus.test.Bytes").await;
    let to_b = receiver_b.unique_name().to_owned();
    let mut accepted_b = plug(&mut sender, &observer, &receiver_b).await;
    let charged = |stats: &pbus_proto::v1::PeerStats| queued_by(stats, 0).1;
    let before = charged(&peer_stats(&observer, &to_b).await);
    let (serial, refusal) = sender.signal(&to_b, 0, &[]).await;
    assert!(refusal.is_none());
    accepted_b.push(serial);
    let mut queued_bytes = charged(&peer_stats(&observer, &to_b).await);
    // What a frame costs beyond its body (prefix, stamped header).
    let overhead = queued_bytes - before;
    while BYTES - queued_bytes > 2 * PLUG_BODY as u64 {
        let (serial, refusal) = sender.signal(&to_b, PLUG_BODY, &[]).await;
        assert!(refusal.is_none(), "{refusal:?}");
        accepted_b.push(serial);
        queued_bytes += overhead + PLUG_BODY as u64;
    }
    assert_eq!(charged(&peer_stats(&observer, &to_b).await), queued_bytes);
    let room = (BYTES - queued_bytes - overhead) as usize;
    let (_, refusal) = sender.signal(&to_b, room + 1, &[]).await;
    assert_queue_full(
        refusal.as_ref(),
        "max_queued_bytes_per_receiver",
        "one byte more than the room left",
    );
    let (serial, refusal) = sender.signal(&to_b, room, &[]).await;
    assert!(refusal.is_none(), "exactly the room left: {refusal:?}");
    accepted_b.push(serial);
    let stats = peer_stats(&observer, &to_b).await;
    assert_eq!(charged(&stats), BYTES, "the queue holds exactly the cap");
    let (_, refusal) = sender.signal(&to_b, 0, &[]).await;
    assert_queue_full(
        refusal.as_ref(),
        "max_queued_bytes_per_receiver",
        "anything more",
    );

    // Fds: N fds queued (one per frame), then one more is refused, while a
    // frame without fds still fits.
    let mut receiver_f = bus.raw_owning("org.pbus.test.Fds").await;
    let to_f = receiver_f.unique_name().to_owned();
    let mut accepted_f = plug(&mut sender, &observer, &receiver_f).await;
    for _ in 0..FDS {
        let (serial, refusal) = sender.signal(&to_f, 0, &dev_nulls(1)).await;
        assert!(refusal.is_none(), "{refusal:?}");
        accepted_f.push(serial);
    }
    let stats = peer_stats(&observer, &to_f).await;
    assert_eq!((stats.queued_fds, queued_by(&stats, 0).2), (FDS, FDS));
    let (_, refusal) = sender.signal(&to_f, 0, &dev_nulls(1)).await;
    assert_queue_full(refusal.as_ref(), "max_queued_fds_per_receiver", "fd N+1");
    let (serial, refusal) = sender.signal(&to_f, 0, &[]).await;
    assert!(refusal.is_none(), "a frame without fds: {refusal:?}");
    accepted_f.push(serial);

    // Each receiver reads exactly what was accepted, in order.
    drain(&mut receiver_m, &accepted).await;
    drain(&mut receiver_b, &accepted_b).await;
    let fds = drain(&mut receiver_f, &accepted_f).await;
    assert_eq!(fds.iter().sum::<usize>(), FDS as usize);
    for receiver in [&to, &to_b, &to_f] {
        let stats = peer_stats(&observer, receiver).await;
        assert_eq!(
            (stats.queued_messages, stats.queued_bytes, stats.queued_fds),
            (0, 0, 0)
        );
        assert!(stats.queued_by_uid.is_empty(), "{stats:?}");
    }
    drop((receiver_m, receiver_b, receiver_f, sender));
    observer.ping().await.unwrap();
    observer.close();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

/// The slowest acceptable call of the echo pair while others misbehave (a
/// ceiling for a debug build on a busy two-core machine, far below a stall).
const NORMAL_LATENCY: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_that_never_read_cost_bounded_memory() {
    const CAP: u64 = 2 << 20;
    const FRAME: usize = 1 << 20;
    const SINKS: usize = 4;
    const OFFERED_PER_SINK: usize = 30;
    let bus = TestBus::with_config(&format!(
        "[limits]\nmax_frame_bytes = {}\nmax_queued_bytes_per_receiver = {CAP}\n",
        FRAME + 4096
    ));
    let baseline = bus.settled_fd_count().await;
    let mut sinks = Vec::new();
    for index in 0..SINKS {
        sinks.push(bus.raw_owning(&format!("org.pbus.test.Sink{index}")).await);
    }
    let echo = EchoPair::start(&bus, 20, Duration::from_millis(2)).await;
    let mut senders = vec![Sender::new(&bus).await, Sender::new(&bus).await];
    let rss_before = bus.rss_kib();

    let started = Instant::now();
    let mut refused = 0usize;
    for round in 0..OFFERED_PER_SINK {
        for (index, sink) in sinks.iter().enumerate() {
            let sender = &mut senders[(round + index) % 2];
            let (_, refusal) = sender.signal(sink.unique_name(), FRAME, &[]).await;
            if let Some(refusal) = refusal {
                assert_queue_full(
                    Some(&refusal),
                    "max_queued_bytes_per_receiver",
                    "a full sink",
                );
                refused += 1;
            }
        }
    }
    let offered = OFFERED_PER_SINK * SINKS;
    let elapsed = started.elapsed();
    let (calls, slowest) = echo.stop().await;
    let peak = procfs::peak_rss_kib(bus.pid());
    eprintln!(
        "{offered} MiB offered to {SINKS} receivers that never read, {refused} refused, in \
         {elapsed:?}; daemon RSS {rss_before} KiB before, peak {peak} KiB; echo pair: {calls} \
         calls, slowest {slowest:?}"
    );
    // Each sink's socket and queue hold a few MiB; everything else is refused.
    assert!(
        refused >= offered - SINKS * 8,
        "only {refused} of {offered} refused"
    );
    assert!(
        peak < rss_before + 40 * 1024,
        "the daemon's peak RSS reached {peak} KiB (from {rss_before} KiB) with {offered} MiB offered"
    );
    assert!(
        slowest < NORMAL_LATENCY,
        "the echo pair's slowest call took {slowest:?}"
    );
    drop((sinks, senders));
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_floods_without_reading_is_disconnected() {
    const QUEUE: u32 = 256;
    let bus = TestBus::with_config(&format!(
        "[limits]\nmax_queued_messages_per_receiver = {QUEUE}\n"
    ));
    let baseline = bus.settled_fd_count().await;
    let observer = bus.connect().await;
    let echo = EchoPair::start(&bus, 20, Duration::from_millis(2)).await;
    let rss_before = bus.rss_kib();

    // Calls to a name nobody owns: each earns an error the flooder never
    // reads.
    let mut flooder = bus.raw().await;
    let name = flooder.unique_name().to_owned();
    let mut batch = Vec::new();
    for _ in 0..100 {
        let header = call_header(7, "org.pbus.test.Nobody", "Flood");
        pbus_proto::frame::encode_frame(&mut batch, &header, &Text::new("x").encode_to_vec(), 0);
    }
    let started = Instant::now();
    let mut frames = 0u64;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(30), flooder.send_bytes(&batch)).await {
            Ok(Ok(())) => frames += 100,
            Ok(Err(error)) => break error,
            Err(_) => panic!("the flooder's writes stalled for 30 s after {frames} frames"),
        }
        assert!(
            frames < 10_000_000,
            "10 million frames written and still connected"
        );
    };
    assert!(
        matches!(
            ended.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{ended}"
    );
    let elapsed = started.elapsed();
    let error = observer.peer_identity(&name).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NoSuchPeer), "{error}");
    let peak = procfs::peak_rss_kib(bus.pid());
    let (calls, slowest) = echo.stop().await;
    eprintln!(
        "the flooder was disconnected after {frames} frames in {elapsed:?}; daemon RSS \
         {rss_before} KiB before, peak {peak} KiB; echo pair: {calls} calls, slowest {slowest:?}"
    );
    assert!(
        peak < rss_before + 32 * 1024,
        "the daemon's peak RSS reached {peak} KiB (from {rss_before} KiB)"
    );
    assert!(
        slowest < NORMAL_LATENCY,
        "the echo pair's slowest call took {slowest:?}"
    );
    drop(flooder);
    observer.ping().await.unwrap();
    observer.close();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

const FAIR: &str = "org.pbus.test.Fair";
const FOREIGN_UIDS: [u32; 3] = [1001, 1002, 1003];
const FLOOD_BODY: usize = 4096;

/// Parses `flooded <accepted> <code> <detail> <message...>`.
fn parse_flooded(line: &str) -> (u64, i32, String, String) {
    let mut words = line.splitn(4, ' ');
    let accepted = words.next().unwrap().parse().unwrap();
    let code = words.next().unwrap().parse().unwrap();
    let detail = words.next().unwrap().to_owned();
    let message = words.next().unwrap_or("").to_owned();
    (accepted, code, detail, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uids_share_a_receiver_fairly() {
    if !require_root("running senders under other uids") {
        return;
    }
    const CAP: u64 = 1 << 20;
    let policy_dir = tempfile::tempdir().unwrap();
    let policy = policy_dir.path().join("fair.toml");
    std::fs::write(
        &policy,
        format!(
            "[[rule]]\nallow = [\"see\", \"talk\"]\nsubject = {{ anyone = true }}\nname = \"{FAIR}\"\n"
        ),
    )
    .unwrap();
    let bus = TestBus::with_config(&format!(
        "policy = \"{}\"\n[limits]\nmax_frame_bytes = {}\nmax_queued_bytes_per_receiver = {CAP}\n\
         max_queued_messages_per_receiver = 100000\n",
        policy.display(),
        256 << 10
    ));
    let baseline = bus.settled_fd_count().await;
    let observer = bus.connect().await;
    let mut fair = bus.raw_owning(FAIR).await;
    let to = fair.unique_name().to_owned();
    let mut own_uid = Sender::new(&bus).await;
    let plugged = plug(&mut own_uid, &observer, &fair).await;
    let bytes_of = |stats: &pbus_proto::v1::PeerStats| -> u64 {
        stats.queued_by_uid.iter().map(|usage| usage.bytes).sum()
    };

    // Each foreign uid floods in turn, and is stopped at its fair share
    // while the queue still has room.
    let mut accepted: HashMap<u32, u64> = HashMap::new();
    let mut children = Vec::new();
    for uid in FOREIGN_UIDS {
        let mut child = bus.peer_as_uid(uid, &["flood", FAIR, &FLOOD_BODY.to_string(), "100000"]);
        child.expect_line("connected", TIMEOUT).await;
        let line = child.expect_line("flooded", Duration::from_secs(60)).await;
        let (count, code, detail, message) = parse_flooded(&line);
        assert_eq!(
            code,
            ErrorCode::ReceiverQueueFull as i32,
            "uid {uid}: {line}"
        );
        assert_eq!(detail, "max_queued_bytes_per_receiver", "uid {uid}: {line}");
        assert!(message.contains("fair share"), "uid {uid}: {line}");
        let stats = peer_stats(&observer, &to).await;
        let (messages, bytes, _) = queued_by(&stats, uid);
        assert_eq!(messages, count, "uid {uid}: what GetStats says it queued");
        assert_eq!(bytes % messages, 0, "uid {uid}: frames of one size");
        let frame = bytes / messages;
        assert!(
            (FLOOD_BODY as u64..FLOOD_BODY as u64 + 512).contains(&frame),
            "uid {uid}: {frame} bytes a frame"
        );
        // Refused for fairness, not for lack of room.
        assert!(
            bytes_of(&stats) + frame <= CAP,
            "uid {uid}: the queue was full ({} of {CAP})",
            bytes_of(&stats)
        );
        // Nobody is starved: even the last of four holders (the receiver's
        // own uid holds the plug) gets more than 1/16 of the queue.
        assert!(bytes > CAP / 16, "uid {uid} got only {bytes} bytes");
        // The fair-share rule, checked from outside: one more frame would
        // have taken more than 1/(n+1) of what was left.
        let holders = stats.queued_by_uid.len() as u64;
        let left = CAP - bytes_of(&stats);
        assert!(
            (holders + 1) * (bytes + frame) - bytes > left,
            "uid {uid}: {bytes} bytes of {holders} holders, {left} left: one more frame was fair"
        );
        accepted.insert(uid, count);
        // The daemon-wide view agrees.
        let totals = observer.stats().await.unwrap();
        let uid_stats = totals.uids.iter().find(|stats| stats.uid == uid).unwrap();
        assert_eq!(uid_stats.queued_bytes, bytes);
        children.push(child);
    }
    eprintln!(
        "fair shares of a {CAP}-byte queue: {:?} frames of ~{FLOOD_BODY} bytes",
        FOREIGN_UIDS.map(|uid| accepted[&uid])
    );

    // The receiver's own uid may fill the rest, up to the cap itself.
    let mut own_serials = plugged;
    loop {
        let (serial, refusal) = own_uid.signal(&to, FLOOD_BODY, &[]).await;
        match refusal {
            None => own_serials.push(serial),
            Some(refusal) => {
                assert_queue_full(
                    Some(&refusal),
                    "max_queued_bytes_per_receiver",
                    "the receiver's own uid",
                );
                assert!(refusal.message.contains("queue is full"), "{refusal:?}");
                break;
            }
        }
        assert!(own_serials.len() < 1000, "the own uid was never refused");
    }
    let stats = peer_stats(&observer, &to).await;
    assert!(bytes_of(&stats) > CAP - 2 * (FLOOD_BODY as u64 + 512));

    // What the receiver reads, per sender uid, is what each was accepted.
    let expected_total = own_serials.len() as u64 + accepted.values().sum::<u64>();
    let mut read: HashMap<u32, u64> = HashMap::new();
    let mut total = 0;
    while total < expected_total {
        let frame = fair.recv(TIMEOUT).await.unwrap();
        if frame.is_bus_signal() {
            continue;
        }
        *read.entry(frame.header.sender.unwrap().uid).or_default() += 1;
        total += 1;
    }
    for uid in FOREIGN_UIDS {
        assert_eq!(read.get(&uid), accepted.get(&uid), "frames from uid {uid}");
    }
    assert_eq!(read.get(&0), Some(&(own_serials.len() as u64)));
    let stats = peer_stats(&observer, &to).await;
    assert!(stats.queued_by_uid.is_empty(), "{stats:?}");
    for mut child in children {
        assert!(child.finish(TIMEOUT).success());
    }
    drop((fair, own_uid));
    observer.ping().await.unwrap();
    observer.close();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}
