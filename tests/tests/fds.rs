//! File descriptors riding with messages, through the real daemon and real
//! kernel objects.
//!
//! * A pipe, a socketpair end, a regular file and a memfd sent with a call,
//!   with the reply to it and with a unicast signal are each used by the
//!   receiver: it writes into the pipe, talks over the socket, reads and
//!   appends to the file and the memfd, and the sender sees the bytes.
//! * `max_fds_per_message` fds (8, and the kernel's 253) arrive in order and
//!   usable; one more is refused with LIMITS_EXCEEDED naming the limit, in a
//!   call, a unicast signal and a reply, and nobody keeps any of them (every
//!   pipe write end that was sent reads EOF once the sender closes its own).
//!   A config asking for 254 is refused at startup.
//! * A frame whose header lies about its fds (declares 2 and sends 1,
//!   declares 1 and sends 2 or none, declares 0 and sends 1, spreads them
//!   over two SCM_RIGHTS sets, declares 254) is a protocol violation: the
//!   offender is told and disconnected, the fds are closed, the receiver
//!   gets nothing.
//! * The fds of one read go with the first frame in it that declares fds
//!   (pbus.proto): one sendmsg with a frame declaring none and then one
//!   declaring one, plus an fd, is accepted and the fd arrives with the
//!   second frame (with the first when the order is swapped); two frames
//!   declaring none plus an fd, and an fd declared by one frame but sent
//!   with a later sendmsg of the next frame's bytes, are violations.
//! * A receiver that did not announce fd support gets none (nor memfd
//!   payloads, which are fds too); its senders get FDS_NOT_SUPPORTED.
//! * Broadcast signals may carry memfd payloads (delivered to subscribers
//!   that take fds) but no plain fds (FDS_NOT_SUPPORTED).
//!
//! After every case the daemon holds exactly the fds it held before and
//! another client still works.
#![forbid(unsafe_code)]

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use pbus::{Connection, MatchRule, MethodCall, Outgoing, RequestNameFlags};
use pbus_proto::frame::encode_frame;
use pbus_proto::v1::{ErrorCode, MessageKind};
use pbus_tests::fdkit::{
    assert_bundle_seen, borrow_all, same_inode, sealed_memfd, use_received_fd, wait_all_closed,
    FdBundle, PipeProbe,
};
use pbus_tests::frames::{
    assert_error, call_header, expect_disconnect, memfd_ref, peer_stats, reply_header,
    signal_header,
};
use pbus_tests::messages::Text;
use pbus_tests::{expect_signal, own_name, RawClient, RawMessage, TestBus, TIMEOUT};
use prost::Message;
use tokio::sync::mpsc;

const SERVICE: &str = "org.pbus.test.Fds";
const SIGNAL_PATH: &str = "/org/pbus/test/fds";

/// A service owning `SERVICE` whose `Take` writes `<index>;` into each fd
/// it gets (pipe write ends) and answers with the number of fds; every call
/// it served is reported on the channel.
async fn index_writer(bus: &TestBus) -> (Connection, mpsc::UnboundedReceiver<usize>) {
    let service = bus.connect_owning(SERVICE).await;
    let (tx, rx) = mpsc::unbounded_channel();
    service
        .serve_raw("Take", move |call: MethodCall| {
            let tx = tx.clone();
            async move {
                let fds = call.incoming.fds();
                for (index, fd) in fds.iter().enumerate() {
                    let mut pipe = std::fs::File::from(fd.try_clone().expect("dup"));
                    pipe.write_all(format!("{index};").as_bytes())
                        .expect("write into a received pipe");
                }
                let _ = tx.send(fds.len());
                Ok(Outgoing::new(&Text::new(fds.len().to_string())))
            }
        })
        .unwrap();
    (service, rx)
}

/// Asserts that probe `i` received `i;` (the fds arrived in order, and each
/// is the pipe it was meant to be).
fn assert_indexes_written(probes: &[PipeProbe], what: &str) {
    for (index, probe) in probes.iter().enumerate() {
        let expected = format!("{index};");
        let got = probe.read_exact_within(expected.len(), TIMEOUT);
        assert_eq!(got, expected.as_bytes(), "{what}: fd {index}");
    }
}

/// Sends [`index_writer`] (whose calls `served` reports) a `Take` call
/// with `count` pipe write ends and checks that all arrived, in order,
/// each the pipe it was meant to be, and that nobody kept any: the
/// service drops them after its handler, the daemon after sending.
async fn take_indexed_pipes(
    sender: &mut RawClient,
    served: &mut mpsc::UnboundedReceiver<usize>,
    count: usize,
    what: &str,
) {
    let (probes, write_ends) = PipeProbe::many(count);
    let serial = sender
        .send_call_with_fds(SERVICE, "Take", &write_ends)
        .await
        .unwrap();
    drop(write_ends);
    let reply = sender.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_eq!(reply.kind(), MessageKind::MethodReturn, "{what}: {reply:?}");
    assert_eq!(reply.decode::<Text>().text, count.to_string(), "{what}");
    assert_eq!(served.recv().await, Some(count), "{what}");
    assert_indexes_written(&probes, what);
    wait_all_closed(&probes, &format!("{what} after delivery"), TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipes_sockets_files_and_memfds_are_usable_after_a_call_a_reply_and_a_signal() {
    let bus = TestBus::start();
    let baseline = bus.settled_fd_count().await;
    let service = bus.connect_owning(SERVICE).await;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let reply_bundle: Arc<Mutex<Option<FdBundle>>> = Arc::default();
    service
        .serve_raw("Use", {
            let reply_bundle = Arc::clone(&reply_bundle);
            move |call: MethodCall| {
                let seen_tx = seen_tx.clone();
                let reply_bundle = Arc::clone(&reply_bundle);
                async move {
                    let seen: Vec<_> = call
                        .incoming
                        .fds()
                        .iter()
                        .map(|fd| use_received_fd(fd.as_fd(), "call-token").expect("use an fd"))
                        .collect();
                    let _ = seen_tx.send(seen);
                    let (bundle, fds) = FdBundle::new();
                    *reply_bundle.lock().unwrap() = Some(bundle);
                    Ok(Outgoing::new(&Text::new("used")).fds(fds))
                }
            }
        })
        .unwrap();
    let caller = bus.connect().await;

    // With a call: the service uses the caller's fds.
    let (mut call_bundle, fds) = FdBundle::new();
    let mut reply = caller
        .method_call(SERVICE, "Use")
        .send(Outgoing::new(&Text::new("use these")).fds(fds))
        .await
        .expect("the call with fds")
        .expect("a reply");
    let seen = seen_rx.recv().await.expect("the service saw the call");
    assert_bundle_seen(&seen, "fds of a call");
    call_bundle.assert_used("call-token", "fds of a call");

    // With the reply: the caller uses the service's fds.
    assert_eq!(reply.decode::<Text>().unwrap().text, "used");
    assert_eq!(reply.sender().unique_name, service.unique_name());
    let reply_fds = reply.take_fds();
    let seen: Vec<_> = reply_fds
        .iter()
        .map(|fd| use_received_fd(fd.as_fd(), "reply-token").unwrap())
        .collect();
    assert_bundle_seen(&seen, "fds of a reply");
    let mut bundle = reply_bundle
        .lock()
        .unwrap()
        .take()
        .expect("the service's bundle");
    bundle.assert_used("reply-token", "fds of a reply");
    drop(reply_fds);

    // With a unicast signal: the caller uses the service's fds.
    let mut stream = caller
        .subscribe(MatchRule::new().member("Fds"))
        .await
        .unwrap();
    let (mut signal_bundle, fds) = FdBundle::new();
    service
        .signal(SIGNAL_PATH, "Fds")
        .destination(caller.unique_name())
        .emit(Outgoing::new(&Text::new("signal")).fds(fds))
        .await
        .unwrap();
    let signal = expect_signal(&mut stream, TIMEOUT).await;
    assert_eq!(signal.sender().unique_name, service.unique_name());
    let seen: Vec<_> = signal
        .fds()
        .iter()
        .map(|fd| use_received_fd(fd.as_fd(), "signal-token").unwrap())
        .collect();
    assert_bundle_seen(&seen, "fds of a unicast signal");
    signal_bundle.assert_used("signal-token", "fds of a unicast signal");
    drop(signal);
    drop(stream);

    caller.close();
    service.close();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_fds_per_message_arrive_and_one_more_is_refused() {
    const MAX: usize = 8;
    let bus = TestBus::with_config(&format!("[limits]\nmax_fds_per_message = {MAX}\n"));
    let (service, mut served) = index_writer(&bus).await;
    let good = bus.connect().await;
    let baseline = bus.settled_fd_count().await;
    assert_eq!(good.limits().max_fds_per_message, MAX as u32);
    let mut sender = bus.raw().await;

    // Exactly MAX: all arrive, in order, each the pipe it was meant to be.
    take_indexed_pipes(&mut sender, &mut served, MAX, "MAX fds").await;

    // MAX + 1 in a call, a unicast signal and a reply: refused, and every
    // fd is closed once we close ours.
    let (probes, write_ends) = PipeProbe::many(MAX + 1);
    let serial = sender
        .send_call_with_fds(SERVICE, "Take", &write_ends)
        .await
        .unwrap();
    let answer = sender.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_error(
        &answer,
        ErrorCode::LimitsExceeded,
        Some("max_fds_per_message"),
        "a call with MAX+1 fds",
    );
    let serial = sender.next_serial();
    sender
        .send_with_fds(
            &signal_header(serial, service.unique_name(), SIGNAL_PATH, "Fds"),
            &[],
            &borrow_all(&write_ends),
        )
        .await
        .unwrap();
    let answer = sender.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_error(
        &answer,
        ErrorCode::LimitsExceeded,
        Some("max_fds_per_message"),
        "a unicast signal with MAX+1 fds",
    );
    // A reply: a raw callee answers a call with MAX+1 fds; the caller gets
    // the limit error in its place, and so does the callee.
    let mut callee = bus.raw().await;
    let caller_serial = sender
        .send_call(callee.unique_name(), "Give", "", &[], 0)
        .await
        .unwrap();
    let call = callee.recv_call(TIMEOUT).await.unwrap();
    let reply_header = reply_header(
        callee.next_serial(),
        sender.unique_name(),
        call.header.serial,
    );
    callee
        .send_with_fds(&reply_header, &[], &borrow_all(&write_ends))
        .await
        .unwrap();
    let answer = sender.recv_reply(caller_serial, TIMEOUT).await.unwrap();
    assert_error(
        &answer,
        ErrorCode::LimitsExceeded,
        Some("max_fds_per_message"),
        "a reply with MAX+1 fds, as the caller sees it",
    );
    let answer = callee
        .recv_reply(reply_header.serial, TIMEOUT)
        .await
        .unwrap();
    assert_error(
        &answer,
        ErrorCode::LimitsExceeded,
        Some("max_fds_per_message"),
        "a reply with MAX+1 fds, as the callee sees it",
    );
    drop(write_ends);
    // (Which also fails if any refused fd was written to.)
    wait_all_closed(&probes, "refused fds", TIMEOUT).await;

    // The library refuses to build MAX+1 and sends MAX.
    let (_, write_ends) = PipeProbe::many(MAX + 1);
    let error = good
        .method_call(SERVICE, "Take")
        .send(Outgoing::new(&Text::new("")).fds(write_ends))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            pbus::Error::TooLarge {
                limit: "max_fds_per_message",
                ..
            }
        ),
        "{error}"
    );
    let (probes, write_ends) = PipeProbe::many(MAX);
    let reply = good
        .method_call(SERVICE, "Take")
        .send(Outgoing::new(&Text::new("")).fds(write_ends))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.decode::<Text>().unwrap().text, MAX.to_string());
    assert_indexes_written(&probes, "MAX fds through the library");
    assert_eq!(served.recv().await, Some(MAX));
    assert!(
        served.try_recv().is_err(),
        "a refused message reached the service"
    );

    sender.sync().await;
    good.ping().await.unwrap();
    drop(callee);
    drop(sender);
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_maximum_of_253_fds_arrives() {
    const MAX: usize = 253;
    pbus_sys::process::raise_fd_limit(Some(1 << 16)).expect("raise RLIMIT_NOFILE");
    let bus = TestBus::with_config(&format!("[limits]\nmax_fds_per_message = {MAX}\n"));
    let (_service, mut served) = index_writer(&bus).await;
    let baseline = bus.settled_fd_count().await;
    let mut sender = bus.raw().await;
    take_indexed_pipes(&mut sender, &mut served, MAX, "253 fds").await;
    drop(sender);
    bus.wait_for_fd_count(baseline, TIMEOUT).await;

    // 254 cannot be configured: the daemon refuses to start and says why.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pbusd.toml");
    std::fs::write(&config, "[limits]\nmax_fds_per_message = 254\n").unwrap();
    let output = pbus_tests::pbusd_command()
        .arg("--listen")
        .arg(dir.path().join("bus.sock"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success(), "pbusd started with 254 fds");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_fds_per_message"), "{stderr}");
    assert!(!dir.path().join("bus.sock").exists());
}

/// How a lying frame is sent.
enum Lie {
    /// The prefix declares `declared` fds, `sent` ride with the frame.
    Count { declared: u16, sent: usize },
    /// Declares 2; the first 20 bytes carry one fd, the rest another.
    TwoSets,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_lie_about_their_fds_are_violations() {
    let bus = TestBus::start();
    let good = bus.connect().await;
    let mut receiver = bus.raw_owning(SERVICE).await;
    let baseline = bus.settled_fd_count().await;

    let cases = [
        (
            "declares 2, sends 1",
            Lie::Count {
                declared: 2,
                sent: 1,
            },
        ),
        (
            "declares 1, sends 2",
            Lie::Count {
                declared: 1,
                sent: 2,
            },
        ),
        (
            "declares 1, sends none",
            Lie::Count {
                declared: 1,
                sent: 0,
            },
        ),
        (
            "declares 0, sends 1",
            Lie::Count {
                declared: 0,
                sent: 1,
            },
        ),
        (
            "declares 254, sends 2",
            Lie::Count {
                declared: 254,
                sent: 2,
            },
        ),
        ("two SCM_RIGHTS sets for one frame", Lie::TwoSets),
    ];
    for (what, lie) in cases {
        let mut offender = bus.raw().await;
        let header = call_header(offender.next_serial(), SERVICE, "Take");
        let body = Text::new("lying").encode_to_vec();
        let (probes, write_ends) = PipeProbe::many(2);
        match lie {
            Lie::Count { declared, sent } => {
                let mut bytes = Vec::new();
                encode_frame(&mut bytes, &header, &body, declared);
                offender
                    .send_bytes_with_fds(&bytes, &borrow_all(&write_ends[..sent]))
                    .await
                    .unwrap();
            }
            Lie::TwoSets => {
                let mut bytes = Vec::new();
                encode_frame(&mut bytes, &header, &body, 2);
                offender
                    .send_bytes_with_fds(&bytes[..20], &[write_ends[0].as_fd()])
                    .await
                    .unwrap();
                offender
                    .send_bytes_with_fds(&bytes[20..], &[write_ends[1].as_fd()])
                    .await
                    .unwrap();
            }
        }
        drop(write_ends);
        let error =
            expect_disconnect(&mut offender, ErrorCode::ProtocolViolation, None, what).await;
        assert!(error.message.contains("fd"), "{what}: {error:?}");
        wait_all_closed(&probes, what, TIMEOUT).await;
        good.ping()
            .await
            .unwrap_or_else(|e| panic!("after {what}: {e}"));
        bus.wait_for_fd_count(baseline, TIMEOUT).await;
    }
    // The receiver got none of it.
    let delivered = receiver.take_delivered().await;
    assert!(
        delivered.is_empty(),
        "lying frames were delivered: {delivered:?}"
    );
}

/// Two unicast signals to `SERVICE`, `One` and `Two`, encoded back to back
/// with the fd counts `declared`; returns the bytes and where `Two` starts.
fn one_and_two(sender: &mut RawClient, declared: [u16; 2]) -> (Vec<u8>, usize) {
    let mut bytes = Vec::new();
    let one = signal_header(sender.next_serial(), SERVICE, SIGNAL_PATH, "One");
    encode_frame(&mut bytes, &one, b"", declared[0]);
    let split = bytes.len();
    let two = signal_header(sender.next_serial(), SERVICE, SIGNAL_PATH, "Two");
    encode_frame(&mut bytes, &two, b"", declared[1]);
    (bytes, split)
}

/// The next signal `member` the receiver gets from `from`.
async fn next_from(receiver: &mut RawClient, from: &str, member: &str) -> RawMessage {
    receiver
        .recv_until(TIMEOUT, |frame| {
            frame.sender_name() == from && frame.header.member == member
        })
        .await
        .unwrap_or_else(|error| panic!("{member} from {from} did not arrive: {error}"))
}

/// The rule of pbus.proto: the fds of one read go with the first frame in
/// that read that declares fds, and a set nobody claims is a violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fds_go_with_the_first_frame_of_their_read_that_declares_them() {
    let bus = TestBus::start();
    let good = bus.connect().await;
    let mut receiver = bus.raw_owning(SERVICE).await;
    let baseline = bus.settled_fd_count().await;

    // One sendmsg: `One` declaring none, then `Two` declaring one, and the
    // fd (the case reported: accepted, the fd arrives with `Two`); and the
    // other way round (the fd arrives with `One`).
    for (declared, holder) in [([0, 1], "Two"), ([1, 0], "One")] {
        let what = format!("one sendmsg, fd counts {declared:?}");
        let mut sender = bus.raw().await;
        let (probe, write_end) = PipeProbe::new();
        let (bytes, _) = one_and_two(&mut sender, declared);
        sender
            .send_bytes_with_fds(&bytes, &[write_end.as_fd()])
            .await
            .unwrap();
        let from = sender.unique_name().to_owned();
        let one = next_from(&mut receiver, &from, "One").await;
        let two = next_from(&mut receiver, &from, "Two").await;
        let (with, without) = if holder == "One" {
            (one, two)
        } else {
            (two, one)
        };
        assert!(without.fds.is_empty(), "{what}: {without:?}");
        assert_eq!(with.fds.len(), 1, "{what}: {with:?}");
        assert!(
            same_inode(with.fds[0].as_fd(), write_end.as_fd()),
            "{what}: another fd arrived"
        );
        sender.sync().await;
        assert!(!sender.is_closed(), "{what}");
        drop((with, without, write_end));
        wait_all_closed(&[probe], &what, TIMEOUT).await;
        drop(sender);
        bus.wait_for_fd_count(baseline, TIMEOUT).await;
    }

    // One sendmsg, both frames declaring none, and an fd: nobody claims it.
    // `One` is delivered (it broke no rule), `Two` is not.
    {
        let what = "one sendmsg, both frames declaring none, one fd";
        let mut sender = bus.raw().await;
        let (probe, write_end) = PipeProbe::new();
        let (bytes, _) = one_and_two(&mut sender, [0, 0]);
        sender
            .send_bytes_with_fds(&bytes, &[write_end.as_fd()])
            .await
            .unwrap();
        drop(write_end);
        let from = sender.unique_name().to_owned();
        let error = expect_disconnect(&mut sender, ErrorCode::ProtocolViolation, None, what).await;
        assert!(error.message.contains("fd"), "{what}: {error:?}");
        let one = next_from(&mut receiver, &from, "One").await;
        assert!(one.fds.is_empty(), "{what}: {one:?}");
        let rest = receiver.take_delivered().await;
        assert!(
            rest.iter().all(|frame| frame.sender_name() != from),
            "{what}: {rest:?}"
        );
        wait_all_closed(&[probe], what, TIMEOUT).await;
        bus.wait_for_fd_count(baseline, TIMEOUT).await;
    }

    // `One` declares an fd and goes alone without it; the fd follows with a
    // later sendmsg carrying `Two` (which declares it too). A violation
    // whichever way the daemon's reads fall: read alone, `One` lacks its fd;
    // joined into one read with `Two`, the fd is `One`'s and `Two` lacks one.
    // Either way `Two` never arrives.
    {
        let what = "fd declared by One, sent with Two";
        let mut sender = bus.raw().await;
        let (probe, write_end) = PipeProbe::new();
        let (bytes, split) = one_and_two(&mut sender, [1, 1]);
        sender.send_bytes(&bytes[..split]).await.unwrap();
        // The daemon may have closed already: the send's result is moot.
        let _ = sender
            .send_bytes_with_fds(&bytes[split..], &[write_end.as_fd()])
            .await;
        drop(write_end);
        let from = sender.unique_name().to_owned();
        let error = expect_disconnect(&mut sender, ErrorCode::ProtocolViolation, None, what).await;
        assert!(error.message.contains("fd"), "{what}: {error:?}");
        let got = receiver.take_delivered().await;
        assert!(
            got.iter()
                .all(|frame| frame.sender_name() != from || frame.header.member != "Two"),
            "{what}: {got:?}"
        );
        drop(got);
        wait_all_closed(&[probe], what, TIMEOUT).await;
        bus.wait_for_fd_count(baseline, TIMEOUT).await;
    }
    good.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_without_fd_support_gets_none() {
    const PLAIN: &str = "org.pbus.test.NoFds";
    let bus = TestBus::start();
    let baseline = bus.settled_fd_count().await;
    let receiver = bus
        .connect_with(
            Connection::builder()
                .fd_passing(false)
                .memfd_payloads(false),
        )
        .await;
    assert!(!receiver.fd_passing());
    own_name(&receiver, PLAIN, RequestNameFlags::default()).await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    receiver
        .serve_raw("Take", move |call: MethodCall| {
            let seen_tx = seen_tx.clone();
            async move {
                let incoming = &call.incoming;
                let _ = seen_tx.send((
                    incoming.fds().len(),
                    incoming.memfds().len(),
                    incoming.body().is_memfd(),
                ));
                Ok(Outgoing::new(&Text::new("ok")))
            }
        })
        .unwrap();
    let sender = bus.connect().await;

    // A call with an fd.
    let (probes, write_ends) = PipeProbe::many(1);
    let error = sender
        .method_call(PLAIN, "Take")
        .send(Outgoing::new(&Text::new("")).fds(write_ends))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::FdsNotSupported), "{error}");
    wait_all_closed(&probes, "an fd refused for the receiver", TIMEOUT).await;
    // A body large enough to go in a memfd: it announced no memfd support.
    let error = sender
        .method_call(PLAIN, "Take")
        .send(Outgoing::raw("", vec![7u8; 1 << 20]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::FdsNotSupported), "{error}");
    // A unicast signal with an fd.
    let mut raw = bus.raw().await;
    let (probes, write_ends) = PipeProbe::many(1);
    let serial = raw.next_serial();
    raw.send_with_fds(
        &signal_header(serial, PLAIN, SIGNAL_PATH, "Fds"),
        &[],
        &borrow_all(&write_ends),
    )
    .await
    .unwrap();
    drop(write_ends);
    let answer = raw.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_error(
        &answer,
        ErrorCode::FdsNotSupported,
        None,
        "a unicast signal",
    );
    wait_all_closed(&probes, "an fd in a refused signal", TIMEOUT).await;
    // A call without fds goes through, and is the only one the receiver saw.
    let reply: Text = sender.call(PLAIN, "Take", &Text::new("")).await.unwrap();
    assert_eq!(reply.text, "ok");
    assert_eq!(seen.recv().await, Some((0, 0, false)));
    assert!(seen.try_recv().is_err(), "a message with fds was delivered");

    // A reply with an fd to a caller without fd support: the caller gets
    // FDS_NOT_SUPPORTED instead.
    own_name(&sender, SERVICE, RequestNameFlags::default()).await;
    sender
        .serve_raw("Give", |_call: MethodCall| async move {
            let (_, write_ends) = PipeProbe::many(1);
            Ok(Outgoing::new(&Text::new("here")).fds(write_ends))
        })
        .unwrap();
    let error = receiver
        .method_call(SERVICE, "Give")
        .call::<Text, Text>(&Text::new(""))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::FdsNotSupported), "{error}");
    // And its own library does not let it send any.
    let (_, write_ends) = PipeProbe::many(1);
    let error = receiver
        .method_call(SERVICE, "Give")
        .send(Outgoing::new(&Text::new("")).fds(write_ends))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::FdsNotSupported), "{error}");

    receiver.ping().await.unwrap();
    raw.sync().await;
    drop(raw);
    receiver.close();
    sender.close();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_carry_memfd_payloads_but_no_plain_fds() {
    let bus = TestBus::start();
    let baseline = bus.settled_fd_count().await;
    let takes_fds = bus.connect().await;
    let no_fds = bus
        .connect_with(
            Connection::builder()
                .fd_passing(false)
                .memfd_payloads(false),
        )
        .await;
    let rule = MatchRule::new().member("Blob");
    let mut with_fds = takes_fds.subscribe(rule.clone()).await.unwrap();
    let mut without_fds = no_fds.subscribe(rule).await.unwrap();
    let mut raw = bus.raw().await;

    // A plain fd, alone or next to a memfd payload: refused.
    let payload = b"a broadcast payload in a sealed memfd".repeat(100);
    for with_memfd in [false, true] {
        let (probes, write_ends) = PipeProbe::many(1);
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut header = signal_header(raw.next_serial(), "", SIGNAL_PATH, "Blob");
        if with_memfd {
            fds.push(sealed_memfd(&payload));
            header.memfds.push(memfd_ref(0, 0, payload.len() as u64));
            header.body_in_memfd = true;
        }
        fds.extend(write_ends);
        raw.send_with_fds(&header, &[], &borrow_all(&fds))
            .await
            .unwrap();
        drop(fds);
        let answer = raw.recv_reply(header.serial, TIMEOUT).await.unwrap();
        assert_error(
            &answer,
            ErrorCode::FdsNotSupported,
            None,
            "a broadcast with a plain fd",
        );
        wait_all_closed(&probes, "an fd in a refused broadcast", TIMEOUT).await;
    }

    // A memfd payload alone: delivered to the subscriber that takes fds.
    let mut header = signal_header(raw.next_serial(), "", SIGNAL_PATH, "Blob");
    header.memfds.push(memfd_ref(0, 0, payload.len() as u64));
    header.body_in_memfd = true;
    header.payload_type = "pbus.test.Blob".into();
    let memfd = sealed_memfd(&payload);
    raw.send_with_fds(&header, &[], &[memfd.as_fd()])
        .await
        .unwrap();
    let signal = expect_signal(&mut with_fds, TIMEOUT).await;
    assert_eq!(signal.sender().unique_name, raw.unique_name());
    assert!(signal.body().is_memfd(), "the payload arrives as a memfd");
    assert_eq!(signal.body().as_bytes(), &payload[..]);
    assert!(signal.fds().is_empty());
    drop(signal);

    // The library puts a large broadcast body in a memfd by itself.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    takes_fds
        .signal(SIGNAL_PATH, "Blob")
        .emit(Outgoing::raw("pbus.test.Blob", big.clone()))
        .await
        .unwrap();
    let signal = expect_signal(&mut with_fds, TIMEOUT).await;
    assert!(signal.body().is_memfd());
    assert_eq!(signal.body().as_bytes(), &big[..]);
    drop(signal);

    // A plain broadcast reaches both; the subscriber without fd support
    // missed the two memfd payloads (and got nothing refused).
    raw.send_signal(
        "",
        SIGNAL_PATH,
        "Blob",
        &[],
        &Text::new("small").encode_to_vec(),
    )
    .await
    .unwrap();
    for stream in [&mut with_fds, &mut without_fds] {
        let signal = expect_signal(stream, TIMEOUT).await;
        assert!(!signal.body().is_memfd());
        assert_eq!(signal.decode::<Text>().unwrap().text, "small");
    }
    let stats = peer_stats(&takes_fds, no_fds.unique_name()).await;
    assert_eq!(stats.dropped_signals, 2, "{stats:?}");
    let stats = peer_stats(&takes_fds, takes_fds.unique_name()).await;
    assert_eq!(stats.dropped_signals, 0, "{stats:?}");

    raw.sync().await;
    drop(raw);
    drop((with_fds, without_fds));
    takes_fds.close();
    no_fds.close();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memfd_payloads_and_plain_fds_are_announced_separately() {
    const NAME: &str = "org.pbus.test.MemfdsOnly";
    let bus = TestBus::start();
    let receiver = bus
        .connect_with(Connection::builder().fd_passing(false))
        .await;
    assert!(!receiver.fd_passing());
    own_name(&receiver, NAME, RequestNameFlags::default()).await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    receiver
        .serve_raw("Take", move |call: MethodCall| {
            let seen_tx = seen_tx.clone();
            async move {
                let _ = seen_tx.send((call.incoming.body().is_memfd(), call.incoming.body().len()));
                Ok(Outgoing::new(&Text::new("ok")))
            }
        })
        .unwrap();
    let sender = bus.connect().await;
    // A large body travels as a memfd payload: accepted.
    sender
        .method_call(NAME, "Take")
        .send(Outgoing::raw("", vec![7u8; 1 << 20]))
        .await
        .unwrap();
    assert_eq!(seen.recv().await, Some((true, 1 << 20)));
    // A plain fd: refused.
    let (probes, write_ends) = PipeProbe::many(1);
    let error = sender
        .method_call(NAME, "Take")
        .send(Outgoing::new(&Text::new("")).fds(write_ends))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::FdsNotSupported), "{error}");
    wait_all_closed(&probes, "an fd refused for a memfd-only receiver", TIMEOUT).await;
    assert!(seen.try_recv().is_err());
}
