//! A receiver that never reads fills its queue, and then senders get an
//! error, never a stall: calls and unicast signals to it are refused with
//! RECEIVER_QUEUE_FULL naming the limit (`max_queued_messages_per_receiver`)
//! in `detail`, while another pair of clients keeps exchanging calls with
//! normal latency. Once the receiver reads its queue it gets exactly the
//! messages that were accepted, and works normally again.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use pbus_proto::v1::{ErrorCode, MessageKind};
use pbus_tests::frames::expect_serials;
use pbus_tests::messages::Text;
use pbus_tests::{EchoPair, RawClient, RawMessage, TestBus, TIMEOUT};
use prost::{Message, Name};

const QUEUE_LIMIT: u32 = 64;
const SINK: &str = "org.pbus.test.Sink";
/// Calls sent between round trips while flooding.
const BATCH: usize = 16;
/// Rounds of refused messages sent while the healthy pair is measured.
const HAMMER_ROUNDS: usize = 20;
/// Give up flooding after this many calls: the limit must have hit by then.
const MAX_CALLS: usize = 2000;
/// The slowest acceptable call between the healthy pair (a ceiling for a
/// debug build on a busy machine, far below a stall).
const NORMAL_LATENCY: Duration = Duration::from_secs(1);

fn assert_queue_full(frame: &RawMessage, what: &str) {
    assert_eq!(frame.kind(), MessageKind::Error, "{what}: {frame:?}");
    let error = frame.error().unwrap();
    assert_eq!(
        frame.error_code(),
        Some(ErrorCode::ReceiverQueueFull),
        "{what}: {error:?}"
    );
    assert_eq!(error.name, "org.pbus.Error.ReceiverQueueFull");
    assert_eq!(
        error.detail, "max_queued_messages_per_receiver",
        "{what}: the error names the limit"
    );
}

/// Sends calls to the sink in batches until one is refused. Returns the
/// serials accepted before the first refusal and the refusal.
async fn flood_until_full(flooder: &mut RawClient, body: &[u8]) -> (Vec<u64>, RawMessage) {
    let mut sent = Vec::new();
    while sent.len() < MAX_CALLS {
        for _ in 0..BATCH {
            let serial = flooder
                .send_call(SINK, "Swallow", &Text::full_name(), body, 60_000)
                .await
                .unwrap();
            sent.push(serial);
        }
        // Everything the bus answered to this batch arrives before the
        // answer to the round trip.
        flooder.sync().await;
        let refusals: Vec<RawMessage> = flooder
            .take_inbox()
            .into_iter()
            .filter(|frame| frame.kind() == MessageKind::Error)
            .collect();
        if let Some(first) = refusals.into_iter().next() {
            let refused = first.header.reply_serial;
            let position = sent
                .iter()
                .position(|&serial| serial == refused)
                .expect("the refusal answers one of our calls");
            sent.truncate(position);
            return (sent, first);
        }
    }
    panic!("{MAX_CALLS} calls to a receiver that never reads were all accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_receiver_queue_is_an_error_not_a_stall() {
    let bus = TestBus::with_config(&format!(
        "[limits]\nmax_queued_messages_per_receiver = {QUEUE_LIMIT}\n"
    ));

    // The sink owns a name, then never reads its socket again.
    let mut sink = bus.raw_owning(SINK).await;

    // The healthy pair keeps talking the whole time.
    let pair = EchoPair::start(&bus, 100, Duration::ZERO).await;
    let library = bus.connect().await;

    // Flood the sink until the bus refuses.
    let body = Text::new("x".repeat(8 << 10)).encode_to_vec();
    let mut flooder = bus.raw().await;
    let started = Instant::now();
    let (accepted, refusal) = flood_until_full(&mut flooder, &body).await;
    assert_queue_full(&refusal, "call");
    assert!(
        accepted.len() >= QUEUE_LIMIT as usize,
        "only {} calls were accepted before the queue counted full",
        accepted.len()
    );

    // Once full, every further call and unicast signal is refused at once.
    for _ in 0..5 {
        let serial = flooder
            .send_call(SINK, "Swallow", &Text::full_name(), &body, 60_000)
            .await
            .unwrap();
        let answer = flooder.recv_reply(serial, TIMEOUT).await.unwrap();
        assert_queue_full(&answer, "call to a full queue");
        let serial = flooder
            .send_signal(SINK, "/sink", "Poke", &[], &[])
            .await
            .unwrap();
        let answer = flooder.recv_reply(serial, TIMEOUT).await.unwrap();
        assert_queue_full(&answer, "unicast signal to a full queue");
    }
    // Keep hammering the full queue while the healthy pair talks: every
    // message is refused, none waits.
    for _ in 0..HAMMER_ROUNDS {
        let mut serials = Vec::new();
        for _ in 0..BATCH {
            serials.push(
                flooder
                    .send_call(SINK, "Swallow", &Text::full_name(), &body, 60_000)
                    .await
                    .unwrap(),
            );
            serials.push(
                flooder
                    .send_signal(SINK, "/sink", "Poke", &[], &[])
                    .await
                    .unwrap(),
            );
        }
        flooder.sync().await;
        let answers = flooder.take_inbox();
        let answered: Vec<u64> = answers
            .iter()
            .map(|frame| {
                assert_queue_full(frame, "message to a full queue");
                frame.header.reply_serial
            })
            .collect();
        assert_eq!(answered, serials, "every message was refused, in order");
    }
    // The library reports the same, long before its call timeout.
    let library_started = Instant::now();
    let error = library
        .method_call(SINK, "Swallow")
        .timeout(Duration::from_secs(30))
        .call::<Text, Text>(&Text::new("more"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::ReceiverQueueFull), "{error}");
    assert_eq!(error.detail(), Some("max_queued_messages_per_receiver"));
    assert!(library_started.elapsed() < Duration::from_secs(5));
    let flood_time = started.elapsed();

    // The pair never stalled.
    let (calls, slowest) = pair.stop().await;
    assert!(
        slowest < NORMAL_LATENCY,
        "the healthy pair's slowest call took {slowest:?} (of {calls}) while the sink was full"
    );
    eprintln!(
        "{} calls accepted before the queue was full, flood took {flood_time:?}; \
         healthy pair: {calls} calls, slowest {slowest:?}",
        accepted.len()
    );

    // The sink reads: exactly the accepted calls, in order, and nothing
    // that was refused.
    for frame in expect_serials(&mut sink, &accepted, "the sink reads").await {
        assert_eq!(frame.kind(), MessageKind::MethodCall, "{frame:?}");
        assert_eq!(frame.sender_name(), flooder.unique_name());
    }

    // With its queue drained the sink is an ordinary callee again.
    let serial = flooder
        .send_call(SINK, "Swallow", &Text::full_name(), &[], 0)
        .await
        .unwrap();
    let call = sink.recv_call(TIMEOUT).await.unwrap();
    assert_eq!(call.header.serial, serial);
    sink.send_reply(flooder.unique_name(), serial, "", &[])
        .await
        .unwrap();
    let reply = flooder.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_eq!(reply.kind(), MessageKind::MethodReturn);
}
