//! Only the callee can answer a pending call, and only once. A third peer
//! that forges a METHOD_RETURN or ERROR for someone else's pending call
//! (right reply_serial, destination = the caller), a reply to a call that
//! never existed, a second reply, and a reply after the bus already timed
//! the call out are all refused with UNEXPECTED_REPLY to their sender and
//! never reach the caller.
#![forbid(unsafe_code)]

use std::time::Duration;

use pbus_proto::errors::error_info;
use pbus_proto::v1::{ErrorCode, Header, MessageKind};
use pbus_proto::BUS_NAME;
use pbus_tests::messages::Text;
use pbus_tests::{within, RawClient, TestBus, TIMEOUT};
use prost::{Message, Name};

/// Sends a forged reply from `from` and checks the bus refuses it with
/// UNEXPECTED_REPLY, answering the forged frame's own serial.
async fn assert_refused_reply(from: &mut RawClient, header: Header, body: &[u8], what: &str) {
    let serial = header.serial;
    assert_ne!(serial, 0, "a refusal is reported against a non-zero serial");
    from.send(&header, body).await.unwrap();
    let answer = from
        .recv_reply(serial, TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{what}: no refusal: {error}"));
    assert_eq!(
        answer.error_code(),
        Some(ErrorCode::UnexpectedReply),
        "{what}: {answer:?}"
    );
    assert_eq!(
        answer.error().unwrap().name,
        "org.pbus.Error.UnexpectedReply"
    );
    assert_eq!(answer.sender_name(), BUS_NAME);
}

fn reply_header(from: &mut RawClient, kind: MessageKind, to: &str, reply_serial: u64) -> Header {
    Header {
        kind: kind as i32,
        serial: from.next_serial(),
        reply_serial,
        destination: to.to_owned(),
        payload_type: Text::full_name(),
        error: (kind == MessageKind::Error).then(|| error_info(ErrorCode::Failed, "forged", "")),
        ..Header::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_callee_answers_and_only_once() {
    let bus = TestBus::start();
    let mut caller = bus.raw().await;
    let mut callee = bus.raw().await;
    let mut spoofer = bus.raw().await;
    let caller_name = caller.unique_name().to_owned();
    let callee_name = callee.unique_name().to_owned();

    let serial = caller
        .send_call(
            &callee_name,
            "Slow",
            &Text::full_name(),
            &Text::new("question").encode_to_vec(),
            0,
        )
        .await
        .unwrap();
    let call = callee.recv_call(TIMEOUT).await.unwrap();
    assert_eq!(call.header.serial, serial);
    assert_eq!(call.sender_name(), caller_name);

    // A third peer forges the answer, as a return and as an error.
    let spoofed = Text::new("spoofed").encode_to_vec();
    let header = reply_header(
        &mut spoofer,
        MessageKind::MethodReturn,
        &caller_name,
        serial,
    );
    assert_refused_reply(&mut spoofer, header, &spoofed, "forged METHOD_RETURN").await;
    let header = reply_header(&mut spoofer, MessageKind::Error, &caller_name, serial);
    assert_refused_reply(&mut spoofer, header, &[], "forged ERROR").await;
    // A reply to a call that never existed, and to a non-unique destination.
    let header = reply_header(
        &mut spoofer,
        MessageKind::MethodReturn,
        &caller_name,
        424_242,
    );
    assert_refused_reply(&mut spoofer, header, &spoofed, "reply to no call").await;
    let header = reply_header(
        &mut spoofer,
        MessageKind::MethodReturn,
        "org.pbus.test.Caller",
        serial,
    );
    assert_refused_reply(&mut spoofer, header, &spoofed, "reply to a well-known name").await;
    // The callee cannot answer a call it was not sent either.
    let header = reply_header(
        &mut callee,
        MessageKind::MethodReturn,
        &caller_name,
        serial + 1,
    );
    assert_refused_reply(&mut callee, header, &spoofed, "callee, wrong serial").await;

    // The real answer gets through, and it is the first answer the caller sees.
    let header = reply_header(&mut callee, MessageKind::MethodReturn, &caller_name, serial);
    callee
        .send(&header, &Text::new("real").encode_to_vec())
        .await
        .unwrap();
    let reply = caller.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_eq!(reply.kind(), MessageKind::MethodReturn);
    assert_eq!(reply.decode::<Text>().text, "real");
    assert_eq!(reply.sender_name(), callee_name);

    // A second answer to the same call is refused.
    let header = reply_header(&mut callee, MessageKind::MethodReturn, &caller_name, serial);
    assert_refused_reply(&mut callee, header, &spoofed, "second reply").await;
    let header = reply_header(&mut callee, MessageKind::Error, &caller_name, serial);
    assert_refused_reply(&mut callee, header, &[], "second reply as error").await;

    // Nothing else reached anyone: after a round trip through the bus the
    // caller's inbox holds no reply of any kind, and the spoofer and the
    // callee were sent nothing but their refusals.
    let extra = caller.take_delivered().await;
    assert!(extra.is_empty(), "the caller was sent {extra:?}");
    let extra = spoofer.take_delivered().await;
    assert!(extra.is_empty(), "the spoofer was sent {extra:?}");
    let extra = callee.take_delivered().await;
    assert!(extra.is_empty(), "the callee was sent {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_caller_gets_the_real_reply_not_the_forged_one() {
    let bus = TestBus::start();
    let caller = bus.connect().await;
    let mut callee = bus.raw().await;
    let mut spoofer = bus.raw().await;
    let callee_name = callee.unique_name().to_owned();
    let pending = tokio::spawn({
        let caller = caller.clone();
        async move {
            caller
                .method_call(&callee_name, "Slow")
                .timeout(Duration::from_secs(30))
                .call::<Text, Text>(&Text::new("question"))
                .await
        }
    });
    let call = callee.recv_call(TIMEOUT).await.unwrap();
    let header = reply_header(
        &mut spoofer,
        MessageKind::MethodReturn,
        caller.unique_name(),
        call.header.serial,
    );
    assert_refused_reply(
        &mut spoofer,
        header,
        &Text::new("spoofed").encode_to_vec(),
        "forged reply",
    )
    .await;
    let header = reply_header(
        &mut callee,
        MessageKind::MethodReturn,
        caller.unique_name(),
        call.header.serial,
    );
    callee
        .send(&header, &Text::new("real").encode_to_vec())
        .await
        .unwrap();
    let reply = within("the real reply", TIMEOUT, pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.text, "real");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_after_the_bus_timed_out_the_call_is_refused() {
    let bus = TestBus::start();
    let mut caller = bus.raw().await;
    let mut callee = bus.raw().await;
    let caller_name = caller.unique_name().to_owned();
    let callee_name = callee.unique_name().to_owned();
    let serial = caller
        .send_call(&callee_name, "Slow", &Text::full_name(), &[], 150)
        .await
        .unwrap();
    let call = callee.recv_call(TIMEOUT).await.unwrap();
    let timed_out = caller.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_eq!(timed_out.error_code(), Some(ErrorCode::Timeout));
    let header = reply_header(
        &mut callee,
        MessageKind::MethodReturn,
        &caller_name,
        call.header.serial,
    );
    assert_refused_reply(
        &mut callee,
        header,
        &Text::new("late").encode_to_vec(),
        "late reply",
    )
    .await;
    let extra = caller.take_delivered().await;
    assert!(extra.is_empty(), "the caller was sent {extra:?}");
}
