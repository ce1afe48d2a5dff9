//! Per-message and per-connection limits, each at N (works) and N+1 (the
//! specific error, naming the limit's configuration key in `detail`), with
//! small values configured so the edges are cheap to reach:
//!
//! * `max_memfds_per_message`, `max_frame_bytes` and `max_header_bytes`
//!   (frames measured to the byte; the two size limits disconnect, since
//!   the stream cannot be resynchronised, and are checked from the prefix
//!   before any of the frame is buffered);
//! * `max_names_per_connection` (owned and queued names both count),
//!   `max_matches_per_connection`, `max_pending_calls_per_connection`
//!   (calls without a reply expected and bus calls do not count);
//! * `default_reply_timeout_ms` for calls that set none and
//!   `max_reply_timeout_ms` clamping calls that ask for more, each seen in
//!   when the TIMEOUT error arrives and in the timeout it states.
//!
//! `max_fds_per_message` is tested in `fds.rs`, the queue and connection
//! limits in `quotas.rs` and `connections.rs`. Every limit is announced in
//! WELCOME. After each refusal the daemon holds the fds it held before and
//! other clients work.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use pbus::{MatchRule, Outgoing, RequestNameFlags, RequestNameResult, SealedMemfd};
use pbus_proto::frame::{encode_frame, FramePrefix, PREFIX_LEN};
use pbus_proto::v1::{ErrorCode, HeaderFlag, MessageKind};
use pbus_tests::fdkit::{borrow_all, sealed_memfd};
use pbus_tests::frames::{
    assert_error, call_header, expect_disconnect, memfd_ref, pad_header, peer_stats,
};
use pbus_tests::messages::Text;
use pbus_tests::{wait_for_async, TestBus, TIMEOUT};
use prost::{Message, Name};

const MAX_MEMFDS: u32 = 2;
const MAX_FRAME: u32 = 16384;
const MAX_HEADER: u32 = 2048;
const MAX_NAMES: u32 = 3;
const MAX_MATCHES: u32 = 3;
const MAX_PENDING: u32 = 3;
const DEFAULT_TIMEOUT_MS: u32 = 500;
const MAX_TIMEOUT_MS: u32 = 1500;
const RECEIVER: &str = "org.pbus.test.Receiver";

fn config() -> String {
    format!(
        "[limits]\n\
         max_memfds_per_message = {MAX_MEMFDS}\n\
         max_frame_bytes = {MAX_FRAME}\n\
         max_header_bytes = {MAX_HEADER}\n\
         max_names_per_connection = {MAX_NAMES}\n\
         max_matches_per_connection = {MAX_MATCHES}\n\
         max_pending_calls_per_connection = {MAX_PENDING}\n\
         default_reply_timeout_ms = {DEFAULT_TIMEOUT_MS}\n\
         max_reply_timeout_ms = {MAX_TIMEOUT_MS}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_announces_every_limit() {
    let bus = TestBus::with_config(&config());
    let client = bus.raw().await;
    let limits = client.welcome().unwrap().limits.unwrap();
    assert_eq!(limits.max_memfds_per_message, MAX_MEMFDS);
    assert_eq!(limits.max_frame_bytes, MAX_FRAME);
    assert_eq!(limits.max_header_bytes, MAX_HEADER);
    assert_eq!(limits.max_names_per_connection, MAX_NAMES);
    assert_eq!(limits.max_matches_per_connection, MAX_MATCHES);
    assert_eq!(limits.max_pending_calls, MAX_PENDING);
    assert_eq!(limits.default_reply_timeout_ms, DEFAULT_TIMEOUT_MS);
    assert_eq!(limits.max_reply_timeout_ms, MAX_TIMEOUT_MS);
    // The ones left at their defaults (docs/pbusd.toml).
    assert_eq!(limits.max_fds_per_message, 64);
    assert_eq!(limits.max_queued_bytes, 64 << 20);
    assert_eq!(limits.max_queued_fds, 1024);
    assert_eq!(limits.max_queued_messages, 16384);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memfds_per_message_at_n_and_n_plus_1() {
    let bus = TestBus::with_config(&config());
    let mut receiver = bus.raw_owning(RECEIVER).await;
    let mut sender = bus.raw().await;
    let library = bus.connect().await;
    let baseline = bus.settled_fd_count().await;
    let payload = b"an extra payload".to_vec();

    for count in [MAX_MEMFDS, MAX_MEMFDS + 1] {
        let fds: Vec<_> = (0..count).map(|_| sealed_memfd(&payload)).collect();
        let mut header = call_header(sender.next_serial(), RECEIVER, "Take");
        header.flags = HeaderFlag::NoReplyExpected as u32;
        header.memfds = (0..count)
            .map(|index| memfd_ref(index, 0, payload.len() as u64))
            .collect();
        sender
            .send_with_fds(&header, b"inline", &borrow_all(&fds))
            .await
            .unwrap();
        drop(fds);
        sender.sync().await;
        let answers = sender.take_inbox();
        let frames = receiver.take_delivered().await;
        if count == MAX_MEMFDS {
            assert!(answers.is_empty(), "{answers:?}");
            assert_eq!(frames.len(), 1, "{frames:?}");
            assert_eq!(frames[0].fds.len(), count as usize);
            assert_eq!(frames[0].header.memfds.len(), count as usize);
        } else {
            assert_eq!(answers.len(), 1, "{answers:?}");
            assert_error(
                &answers[0],
                ErrorCode::LimitsExceeded,
                Some("max_memfds_per_message"),
                "N+1 memfds",
            );
            assert!(frames.is_empty(), "{frames:?}");
        }
    }

    // The library counts a body in a memfd as one of them.
    let memfd = || SealedMemfd::from_bytes(&payload).unwrap();
    let too_many = Outgoing::raw("", vec![0u8; 100 << 10])
        .memfd(memfd())
        .memfd(memfd());
    let error = library
        .method_call(RECEIVER, "Take")
        .no_reply()
        .send(too_many)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            pbus::Error::TooLarge {
                limit: "max_memfds_per_message",
                value: 3,
                max: 2,
                ..
            }
        ),
        "{error}"
    );
    library
        .method_call(RECEIVER, "Take")
        .no_reply()
        .send(Outgoing::raw("", vec![0u8; 100 << 10]).memfd(memfd()))
        .await
        .unwrap();
    library.ping().await.unwrap();
    let frames = receiver.take_delivered().await;
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].header.memfds.len(), 2);
    assert!(frames[0].header.body_in_memfd);
    drop(frames);
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_and_header_bytes_at_n_and_n_plus_1() {
    let bus = TestBus::with_config(&config());
    let mut receiver = bus.raw_owning(RECEIVER).await;
    let good = bus.connect().await;
    let baseline = bus.settled_fd_count().await;

    // A frame of exactly max_frame_bytes, then one byte more.
    for extra in [0usize, 1] {
        let mut sender = bus.raw().await;
        let mut header = call_header(sender.next_serial(), RECEIVER, "Sized");
        header.flags = HeaderFlag::NoReplyExpected as u32;
        let body_len = MAX_FRAME as usize + extra - PREFIX_LEN - header.encoded_len();
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, &header, &vec![b'b'; body_len], 0);
        assert_eq!(bytes.len(), MAX_FRAME as usize + extra);
        sender.send_bytes(&bytes).await.unwrap();
        if extra == 0 {
            sender.sync().await;
            assert!(sender.take_inbox().is_empty());
            let frames = receiver.take_delivered().await;
            assert_eq!(frames.len(), 1, "a frame of exactly max_frame_bytes");
            assert_eq!(frames[0].body.len(), body_len);
        } else {
            expect_disconnect(
                &mut sender,
                ErrorCode::LimitsExceeded,
                Some("max_frame_bytes"),
                "a frame one byte over",
            )
            .await;
        }
    }
    // A header of exactly max_header_bytes, then one byte more.
    for extra in [0usize, 1] {
        let mut sender = bus.raw().await;
        let mut header = call_header(sender.next_serial(), RECEIVER, "Sized");
        header.flags = HeaderFlag::NoReplyExpected as u32;
        pad_header(&mut header, MAX_HEADER as usize + extra);
        assert_eq!(header.encoded_len(), MAX_HEADER as usize + extra);
        sender.send(&header, &[]).await.unwrap();
        if extra == 0 {
            sender.sync().await;
            assert!(sender.take_inbox().is_empty());
            let frames = receiver.take_delivered().await;
            assert_eq!(frames.len(), 1, "a header of exactly max_header_bytes");
            assert_eq!(frames[0].header.args, header.args);
        } else {
            expect_disconnect(
                &mut sender,
                ErrorCode::LimitsExceeded,
                Some("max_header_bytes"),
                "a header one byte over",
            )
            .await;
        }
    }
    // The limit is checked from the prefix alone: a declared 4 GiB body
    // is refused without waiting for (or buffering) any of it.
    let mut sender = bus.raw().await;
    let prefix = FramePrefix {
        header_len: 100,
        body_len: u32::MAX,
        fd_count: 0,
    };
    sender.send_bytes(&prefix.to_bytes()).await.unwrap();
    let started = Instant::now();
    expect_disconnect(
        &mut sender,
        ErrorCode::LimitsExceeded,
        Some("max_frame_bytes"),
        "a prefix declaring 4 GiB",
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(2));

    assert!(receiver.take_delivered().await.is_empty());
    good.ping().await.unwrap();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_match_rules_at_n_and_n_plus_1() {
    let bus = TestBus::with_config(&config());
    let baseline = bus.settled_fd_count().await;
    let client = bus.connect().await;
    let other = bus.connect().await;
    let name = |index: u32| format!("org.pbus.test.Name{index}");
    let flags = RequestNameFlags::default();

    for index in 0..MAX_NAMES {
        assert_eq!(
            client.request_name(&name(index), flags).await.unwrap(),
            RequestNameResult::PrimaryOwner
        );
    }
    let error = client
        .request_name(&name(MAX_NAMES), flags)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::LimitsExceeded), "{error}");
    assert_eq!(error.detail(), Some("max_names_per_connection"));
    // Asking again for a name it has is not a new one.
    assert_eq!(
        client.request_name(&name(0), flags).await.unwrap(),
        RequestNameResult::AlreadyOwner
    );
    // Waiting in a queue counts like owning.
    let taken = "org.pbus.test.Taken";
    assert_eq!(
        other.request_name(taken, flags).await.unwrap(),
        RequestNameResult::PrimaryOwner
    );
    let error = client.request_name(taken, flags).await.unwrap_err();
    assert_eq!(error.detail(), Some("max_names_per_connection"));
    client.release_name(&name(0)).await.unwrap();
    assert_eq!(
        client.request_name(taken, flags).await.unwrap(),
        RequestNameResult::InQueue
    );
    let error = client.request_name(&name(0), flags).await.unwrap_err();
    assert_eq!(error.detail(), Some("max_names_per_connection"));

    // Match rules.
    let rule = |index: u32| MatchRule::new().member(&format!("Signal{index}"));
    for index in 0..MAX_MATCHES {
        client.add_match(&rule(index)).await.unwrap();
    }
    let error = client.add_match(&rule(MAX_MATCHES)).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::LimitsExceeded), "{error}");
    assert_eq!(error.detail(), Some("max_matches_per_connection"));
    let error = client.subscribe(rule(MAX_MATCHES + 1)).await.unwrap_err();
    assert_eq!(error.detail(), Some("max_matches_per_connection"));
    client.remove_match(&rule(0)).await.unwrap();
    client.add_match(&rule(MAX_MATCHES)).await.unwrap();
    let stats = peer_stats(&other, client.unique_name()).await;
    assert_eq!(stats.match_rules, MAX_MATCHES);
    assert_eq!(stats.names.len(), MAX_NAMES as usize);
    // Another connection has limits of its own.
    other.add_match(&rule(0)).await.unwrap();
    client.close();
    other.close();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_calls_at_n_and_n_plus_1() {
    let bus = TestBus::with_config(&config());
    let baseline = bus.settled_fd_count().await;
    let mut callee = bus.raw_owning(RECEIVER).await;
    let mut caller = bus.raw().await;
    let observer = bus.connect().await;

    let mut serials = Vec::new();
    for _ in 0..MAX_PENDING {
        serials.push(
            caller
                .send_call(RECEIVER, "Wait", "", &[], 60_000)
                .await
                .unwrap(),
        );
    }
    let refused = caller
        .send_call(RECEIVER, "Wait", "", &[], 60_000)
        .await
        .unwrap();
    let answer = caller.recv_reply(refused, TIMEOUT).await.unwrap();
    assert_error(
        &answer,
        ErrorCode::LimitsExceeded,
        Some("max_pending_calls_per_connection"),
        "N+1 pending calls",
    );
    assert!(
        caller.take_inbox().is_empty(),
        "the N calls were not answered"
    );
    let stats = peer_stats(&observer, caller.unique_name()).await;
    assert_eq!(stats.pending_calls, MAX_PENDING);
    // Calls that expect no reply, and calls to the bus, are not pending.
    let mut no_reply = call_header(caller.next_serial(), RECEIVER, "Fire");
    no_reply.flags = HeaderFlag::NoReplyExpected as u32;
    caller.send(&no_reply, &[]).await.unwrap();
    caller.sync().await;
    assert!(caller.take_inbox().is_empty());
    let calls: Vec<u64> = callee
        .take_delivered()
        .await
        .iter()
        .map(|frame| {
            assert_eq!(frame.kind(), MessageKind::MethodCall);
            frame.header.serial
        })
        .collect();
    let mut expected = serials.clone();
    expected.push(no_reply.serial);
    assert_eq!(
        calls, expected,
        "the callee got the N calls and the one-way call"
    );
    // One answered: room for one more.
    callee
        .send_reply(caller.unique_name(), serials[0], "", &[])
        .await
        .unwrap();
    let reply = caller.recv_reply(serials[0], TIMEOUT).await.unwrap();
    assert_eq!(reply.kind(), MessageKind::MethodReturn);
    let serial = caller
        .send_call(RECEIVER, "Wait", "", &[], 60_000)
        .await
        .unwrap();
    let calls = callee.take_delivered().await;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].header.serial, serial);
    // The caller going away clears its pending calls.
    drop(caller);
    wait_for_async("the caller's pending calls to go", TIMEOUT, || async {
        observer.stats().await.unwrap().pending_calls == 0
    })
    .await;
    drop(callee);
    observer.close();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_timeouts_default_and_clamp() {
    // The timeouts alone (five calls pending at once is over MAX_PENDING).
    let bus = TestBus::with_config(&format!(
        "[limits]\ndefault_reply_timeout_ms = {DEFAULT_TIMEOUT_MS}\n\
         max_reply_timeout_ms = {MAX_TIMEOUT_MS}\n"
    ));
    let _callee = bus.raw_owning(RECEIVER).await;
    let mut caller = bus.raw().await;
    // (asked for, effective): 0 means the default; more than the maximum
    // is clamped to it.
    let cases = [
        (200, 200),
        (0, DEFAULT_TIMEOUT_MS),
        (MAX_TIMEOUT_MS, MAX_TIMEOUT_MS),
        (MAX_TIMEOUT_MS + 1, MAX_TIMEOUT_MS),
        (600_000, MAX_TIMEOUT_MS),
    ];
    let started = Instant::now();
    let mut pending = Vec::new();
    for (asked, effective) in cases {
        let serial = caller
            .send_call(RECEIVER, "Wait", &Text::full_name(), &[], asked)
            .await
            .unwrap();
        pending.push((serial, asked, effective));
    }
    // Answers come in deadline order, but calls whose deadlines fall in
    // the same timer tick may be answered in any order among themselves.
    while !pending.is_empty() {
        let answer = caller
            .recv(Duration::from_secs(5))
            .await
            .unwrap_or_else(|error| panic!("still waiting for {pending:?}: {error}"));
        let elapsed = started.elapsed();
        let position = pending
            .iter()
            .position(|(serial, _, _)| *serial == answer.header.reply_serial)
            .unwrap_or_else(|| panic!("an answer to nothing pending: {answer:?}"));
        let (_, asked, effective) = pending.remove(position);
        assert_error(&answer, ErrorCode::Timeout, None, "an unanswered call");
        let message = &answer.error().unwrap().message;
        assert!(
            message.contains(&format!("{effective} ms")),
            "asked {asked} ms: {message}"
        );
        let effective = Duration::from_millis(effective.into());
        assert!(
            elapsed >= effective && elapsed < effective + Duration::from_millis(900),
            "asked {asked} ms, effective {effective:?}, answered after {elapsed:?}"
        );
    }
}
