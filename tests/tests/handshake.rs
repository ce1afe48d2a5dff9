//! The handshake and malformed input. Nothing but HELLO is accepted first;
//! a wrong protocol version is refused; a client that sends nothing is
//! dropped after the handshake timeout. After the handshake, a frame with
//! a non-zero reserved field, an undecodable header, a size over the
//! limits, an fd count that lies, an unknown kind or a second HELLO gets
//! the offender a specific ERROR and a disconnect, while another client
//! keeps working, and the daemon ends up holding exactly the fds it held
//! before.
#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use pbus::Connection;
use pbus_proto::frame::{encode_frame, FramePrefix};
use pbus_proto::v1::{ErrorCode, Feature, Header, MessageKind, PingRequest};
use pbus_proto::{BUS_NAME, PROTOCOL_VERSION};
use pbus_tests::frames::{self, call_header, expect_disconnect};
use pbus_tests::{TestBus, TIMEOUT};
use prost::{Message, Name};

const HANDSHAKE_TIMEOUT_MS: u64 = 300;
const MAX_FRAME_BYTES: u32 = 128 << 10;

fn config() -> String {
    format!(
        "[limits]\nhandshake_timeout_ms = {HANDSHAKE_TIMEOUT_MS}\nmax_frame_bytes = {MAX_FRAME_BYTES}\n"
    )
}

fn prefix(header_len: u32, body_len: u32, fd_count: u16, reserved: u16) -> Vec<u8> {
    let mut bytes = FramePrefix {
        header_len,
        body_len,
        fd_count,
    }
    .to_bytes()
    .to_vec();
    bytes[10..12].copy_from_slice(&reserved.to_le_bytes());
    bytes
}

fn ping_header(serial: u64) -> Header {
    Header {
        payload_type: PingRequest::full_name(),
        ..call_header(serial, BUS_NAME, "Ping")
    }
}

/// The well-behaved client still gets answers.
async fn assert_still_working(good: &Connection, what: &str) {
    good.ping()
        .await
        .unwrap_or_else(|error| panic!("after {what}, a good client failed: {error}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_rules() {
    let bus = TestBus::with_config(&config());
    let good = bus.connect().await;
    let baseline = bus.settled_fd_count().await;

    // A call before HELLO.
    let mut client = bus.raw_unhandshaked().await;
    let mut bytes = Vec::new();
    encode_frame(&mut bytes, &ping_header(1), &[], 0);
    client.send_bytes(&bytes).await.unwrap();
    expect_disconnect(
        &mut client,
        ErrorCode::HandshakeFailed,
        None,
        "call before HELLO",
    )
    .await;
    assert_still_working(&good, "a call before HELLO").await;

    // Wrong protocol versions.
    for version in [0, PROTOCOL_VERSION + 1, u32::MAX] {
        let mut client = bus.raw_unhandshaked().await;
        client
            .send_hello(version, Feature::FdPassing as u32)
            .await
            .unwrap();
        let error = expect_disconnect(
            &mut client,
            ErrorCode::HandshakeFailed,
            None,
            "wrong version",
        )
        .await;
        assert!(error.message.contains("version"), "{error:?}");
    }
    assert_still_working(&good, "wrong versions").await;

    // HELLO with an fd attached.
    let mut client = bus.raw_unhandshaked().await;
    let (header, hello) = frames::hello(PROTOCOL_VERSION, Feature::FdPassing as u32, "");
    let stdin = std::io::stdin();
    client
        .send_with_fds(&header, &hello, &[stdin.as_fd()])
        .await
        .unwrap();
    expect_disconnect(
        &mut client,
        ErrorCode::HandshakeFailed,
        None,
        "HELLO with fds",
    )
    .await;

    // Silence, and a HELLO that never completes: dropped at the timeout.
    for partial in [&[][..], &prefix(40, 0, 0, 0)[..7]] {
        let started = Instant::now();
        let mut client = bus.raw_unhandshaked().await;
        client.send_bytes(partial).await.unwrap();
        expect_disconnect(
            &mut client,
            ErrorCode::HandshakeFailed,
            None,
            "silent client",
        )
        .await;
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
            "dropped after only {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_millis(HANDSHAKE_TIMEOUT_MS) + Duration::from_secs(3),
            "dropped only after {elapsed:?}"
        );
    }
    assert_still_working(&good, "silent clients").await;

    // Garbage instead of a HELLO.
    let mut client = bus.raw_unhandshaked().await;
    client.send_bytes(&[0xff; 64]).await.unwrap();
    let error = client
        .read_until_closed(TIMEOUT)
        .await
        .expect("garbage before HELLO disconnects")
        .pop()
        .expect("an ERROR saying why");
    assert!(
        matches!(
            error.error_code(),
            Some(ErrorCode::ProtocolViolation | ErrorCode::LimitsExceeded)
        ),
        "{error:?}"
    );
    assert_still_working(&good, "garbage before HELLO").await;

    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_disconnect_only_the_offender() {
    let bus = TestBus::with_config(&config());
    let good = bus.connect().await;
    let baseline = bus.settled_fd_count().await;

    let valid_header = ping_header(7).encode_to_vec();
    let header_len = u32::try_from(valid_header.len()).unwrap();
    let cases: Vec<(&str, Vec<u8>, ErrorCode, Option<&str>)> = vec![
        (
            "reserved field not zero",
            [prefix(header_len, 0, 0, 1), valid_header.clone()].concat(),
            ErrorCode::ProtocolViolation,
            None,
        ),
        (
            "undecodable header",
            [prefix(8, 0, 0, 0), vec![0x0f; 8]].concat(),
            ErrorCode::ProtocolViolation,
            None,
        ),
        (
            "empty header",
            prefix(0, 4, 0, 0),
            ErrorCode::ProtocolViolation,
            None,
        ),
        (
            "frame over max_frame_bytes",
            [
                prefix(header_len, MAX_FRAME_BYTES, 0, 0),
                valid_header.clone(),
            ]
            .concat(),
            ErrorCode::LimitsExceeded,
            Some("max_frame_bytes"),
        ),
        (
            "frame of 4 GiB",
            prefix(u32::MAX, u32::MAX, 0, 0),
            ErrorCode::LimitsExceeded,
            None,
        ),
        (
            "header over max_header_bytes",
            prefix(100 << 10, 0, 0, 0),
            ErrorCode::LimitsExceeded,
            Some("max_header_bytes"),
        ),
        (
            "fd count with no fds",
            [prefix(header_len, 0, 2, 0), valid_header.clone()].concat(),
            ErrorCode::ProtocolViolation,
            None,
        ),
        (
            "unknown message kind",
            {
                let mut bytes = Vec::new();
                let header = Header {
                    kind: 99,
                    ..ping_header(8)
                };
                encode_frame(&mut bytes, &header, &[], 0);
                bytes
            },
            ErrorCode::ProtocolViolation,
            None,
        ),
        (
            "second HELLO",
            {
                let mut bytes = Vec::new();
                let (header, hello) = frames::hello(PROTOCOL_VERSION, 0, "");
                encode_frame(&mut bytes, &header, &hello, 0);
                bytes
            },
            ErrorCode::ProtocolViolation,
            None,
        ),
    ];
    for (what, bytes, code, detail) in cases {
        let mut client = bus.raw().await;
        client.sync().await;
        // Whatever the bus sent so far (NameOwnerChanged of others) is not
        // the refusal.
        client.take_inbox();
        client.send_bytes(&bytes).await.unwrap();
        expect_disconnect(&mut client, code, detail, what).await;
        assert_still_working(&good, what).await;
    }

    // Fds nobody declared: a frame with fd_count 0 carrying one.
    let mut client = bus.raw().await;
    let mut bytes = Vec::new();
    encode_frame(&mut bytes, &ping_header(9), &[], 0);
    let stdin = std::io::stdin();
    client
        .send_bytes_with_fds(&bytes, &[stdin.as_fd()])
        .await
        .unwrap();
    // The frame's own count (0) cannot be told from a legitimate frame
    // sharing the fds' byte range until the stream moves past it, so the
    // Ping itself may be answered first; the connection must still end
    // with the violation.
    let frames = client
        .read_until_closed(TIMEOUT)
        .await
        .expect("undeclared fds disconnect");
    let (error, before) = frames.split_last().expect("an ERROR saying why");
    assert_eq!(
        error.error_code(),
        Some(ErrorCode::ProtocolViolation),
        "{error:?}"
    );
    assert!(
        before.iter().all(|frame| frame.is_bus_signal()
            || (frame.kind() == MessageKind::MethodReturn && frame.header.reply_serial == 9)),
        "{before:?}"
    );
    assert_still_working(&good, "undeclared fds").await;

    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}
