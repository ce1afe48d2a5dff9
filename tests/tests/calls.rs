//! Method calls through the real daemon: typed round trips, application
//! errors, the bus's routing errors (NameHasNoOwner, NoSuchPeer,
//! UnknownMethod from a peer and from the bus itself), and how pending
//! calls end when the callee disconnects (NoReply) or never answers
//! (Timeout, enforced by the bus). Calls and signals with a zero serial,
//! a malformed member or path, a reused pending serial or the
//! MONITOR_COPY flag only the bus may set are refused with InvalidArgs.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use pbus::{Connection, Error, MethodError};
use pbus_proto::v1::{ErrorCode, Header, HeaderFlag, MessageKind, PingReply, PingRequest};
use pbus_proto::BUS_NAME;
use pbus_tests::frames::{assert_error, call_header, signal_header};
use pbus_tests::messages::Text;
use pbus_tests::{within, TestBus, TIMEOUT};
use prost::Name;
use tokio::sync::mpsc;

const SERVICE: &str = "org.pbus.test.Calls";

/// Serves `Hang`: tells `arrived` about each call and never answers.
fn serve_hang(connection: &Connection) -> mpsc::UnboundedReceiver<String> {
    let (arrived, rx) = mpsc::unbounded_channel();
    connection
        .serve("Hang", move |request: Text, _call| {
            let arrived = arrived.clone();
            async move {
                let _ = arrived.send(request.text);
                std::future::pending::<Result<Text, MethodError>>().await
            }
        })
        .unwrap();
    rx
}

fn assert_remote(error: &Error, code: ErrorCode, name: &str) {
    match error {
        Error::Remote {
            code: got_code,
            name: got_name,
            ..
        } => {
            assert_eq!(*got_code, code, "{error}");
            assert_eq!(got_name, name, "{error}");
        }
        other => panic!("expected a remote {name}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_replies_and_errors() {
    let bus = TestBus::start();
    let service = bus.connect_owning(SERVICE).await;
    service
        .serve("Echo", |request: Text, call: pbus::MethodCall| async move {
            Ok(Text::new(format!(
                "{}|{}",
                request.text,
                call.incoming.sender().unique_name
            )))
        })
        .unwrap();
    service
        .serve("Fail", |_request: Text, _call| async move {
            Err::<Text, _>(MethodError::new("org.pbus.test.Error.Broken", "it broke"))
        })
        .unwrap();
    service
        .serve("Refuse", |_request: Text, _call| async move {
            Err::<Text, _>(MethodError::invalid_args("bad input"))
        })
        .unwrap();
    let caller = bus.connect().await;

    // Typed round trip, by well-known and by unique name.
    let reply: Text = caller
        .call(SERVICE, "Echo", &Text::new("hello"))
        .await
        .unwrap();
    assert_eq!(reply.text, format!("hello|{}", caller.unique_name()));
    let reply: Text = caller
        .call(service.unique_name(), "Echo", &Text::new("direct"))
        .await
        .unwrap();
    assert_eq!(reply.text, format!("direct|{}", caller.unique_name()));

    // An application error arrives with its name and message.
    let error = caller
        .call::<Text, Text>(SERVICE, "Fail", &Text::new("x"))
        .await
        .unwrap_err();
    match &error {
        Error::Remote {
            code,
            name,
            message,
            ..
        } => {
            assert_eq!(*code, ErrorCode::Failed);
            assert_eq!(name, "org.pbus.test.Error.Broken");
            assert_eq!(message, "it broke");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    let error = caller
        .call::<Text, Text>(SERVICE, "Refuse", &Text::new("x"))
        .await
        .unwrap_err();
    assert_remote(&error, ErrorCode::InvalidArgs, "org.pbus.Error.InvalidArgs");

    // Routing errors from the bus.
    let error = caller
        .call::<Text, Text>("org.pbus.test.Nobody", "Echo", &Text::new("x"))
        .await
        .unwrap_err();
    assert_remote(
        &error,
        ErrorCode::NameHasNoOwner,
        "org.pbus.Error.NameHasNoOwner",
    );
    let error = caller
        .call::<Text, Text>(":1.999999", "Echo", &Text::new("x"))
        .await
        .unwrap_err();
    assert_remote(&error, ErrorCode::NoSuchPeer, "org.pbus.Error.NoSuchPeer");

    // Unknown methods: on a serving peer, on a peer that serves nothing,
    // and on the bus.
    let error = caller
        .call::<Text, Text>(SERVICE, "NoSuchMethod", &Text::new("x"))
        .await
        .unwrap_err();
    assert_remote(
        &error,
        ErrorCode::UnknownMethod,
        "org.pbus.Error.UnknownMethod",
    );
    let idle = bus.connect().await;
    let error = caller
        .call::<Text, Text>(idle.unique_name(), "Echo", &Text::new("x"))
        .await
        .unwrap_err();
    assert_remote(
        &error,
        ErrorCode::UnknownMethod,
        "org.pbus.Error.UnknownMethod",
    );
    let error = caller
        .call::<PingRequest, PingReply>(BUS_NAME, "Frobnicate", &PingRequest {})
        .await
        .unwrap_err();
    assert_remote(
        &error,
        ErrorCode::UnknownMethod,
        "org.pbus.Error.UnknownMethod",
    );
    // The bus's own known method still works.
    let ping: PingReply = caller
        .call(BUS_NAME, "Ping", &PingRequest {})
        .await
        .unwrap();
    assert_eq!(ping.bus_id, caller.bus_id());

    // The same errors at the wire level, from the bus itself.
    let mut raw = bus.raw().await;
    for (destination, member, code) in [
        ("org.pbus.test.Nobody", "Echo", ErrorCode::NameHasNoOwner),
        (":1.999999", "Echo", ErrorCode::NoSuchPeer),
        (BUS_NAME, "Frobnicate", ErrorCode::UnknownMethod),
    ] {
        let serial = raw
            .send_call(destination, member, &Text::full_name(), &[], 0)
            .await
            .unwrap();
        let reply = raw.recv_reply(serial, TIMEOUT).await.unwrap();
        assert_eq!(reply.error_code(), Some(code), "{destination} {member}");
        assert_eq!(reply.sender_name(), BUS_NAME, "errors come from the bus");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callee_disconnect_fails_the_call_with_no_reply() {
    let bus = TestBus::start();
    let caller = bus.connect().await;

    // A library callee that is closed while the call waits.
    let callee = bus.connect_owning(SERVICE).await;
    let mut arrived = serve_hang(&callee);
    let pending = tokio::spawn({
        let caller = caller.clone();
        async move {
            caller
                .method_call(SERVICE, "Hang")
                .timeout(Duration::from_secs(60))
                .call::<Text, Text>(&Text::new("first"))
                .await
        }
    });
    assert_eq!(
        within("the call to arrive", TIMEOUT, arrived.recv()).await,
        Some("first".into())
    );
    callee.close();
    let error = within("NoReply", TIMEOUT, pending)
        .await
        .unwrap()
        .unwrap_err();
    assert_remote(&error, ErrorCode::NoReply, "org.pbus.Error.NoReply");

    // A raw callee that reads the call and hangs up.
    let mut raw_callee = bus.raw().await;
    let name = raw_callee.unique_name().to_owned();
    let pending = tokio::spawn({
        let caller = caller.clone();
        async move {
            caller
                .method_call(&name, "Anything")
                .timeout(Duration::from_secs(60))
                .call::<Text, Text>(&Text::new("second"))
                .await
        }
    });
    let call = raw_callee.recv_call(TIMEOUT).await.unwrap();
    assert_eq!(call.header.member, "Anything");
    drop(raw_callee);
    let error = within("NoReply", TIMEOUT, pending)
        .await
        .unwrap()
        .unwrap_err();
    assert_remote(&error, ErrorCode::NoReply, "org.pbus.Error.NoReply");

    // The caller's connection is unaffected.
    caller.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_call_times_out_at_the_bus() {
    let bus = TestBus::start();
    let callee = bus.connect_owning(SERVICE).await;
    let mut arrived = serve_hang(&callee);
    let caller = bus.connect().await;

    let timeout = Duration::from_millis(200);
    let started = Instant::now();
    let error = caller
        .method_call(SERVICE, "Hang")
        .timeout(timeout)
        .call::<Text, Text>(&Text::new("wait"))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    // A remote Timeout (not the library's local one, which only fires a
    // second later) proves the bus enforced the deadline, and on time.
    assert_remote(&error, ErrorCode::Timeout, "org.pbus.Error.Timeout");
    assert!(elapsed >= timeout, "timed out early, after {elapsed:?}");
    assert_eq!(
        within("the call to arrive", TIMEOUT, arrived.recv()).await,
        Some("wait".into()),
        "the call was delivered"
    );

    // The same at the wire level: the ERROR comes from the bus.
    let mut raw = bus.raw().await;
    let started = Instant::now();
    let serial = raw
        .send_call(SERVICE, "Hang", &Text::full_name(), &[], 200)
        .await
        .unwrap();
    let reply = raw.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_eq!(reply.error_code(), Some(ErrorCode::Timeout));
    assert_eq!(reply.sender_name(), BUS_NAME);
    assert!(started.elapsed() >= timeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_its_call_and_the_service_keeps_serving() {
    let bus = TestBus::start();
    let service = bus.connect_owning(SERVICE).await;
    service
        .serve("Explode", |request: Text, _call| async move {
            if request.text == "now" {
                panic!("the handler blew up");
            }
            Ok(request)
        })
        .unwrap();
    // Panicking before the first await (inline in the reader) and after it
    // (in a task of its own).
    service
        .serve("ExplodeLater", |_request: Text, _call| async move {
            tokio::task::yield_now().await;
            panic!("the handler blew up later");
            #[allow(unreachable_code)]
            Ok(Text::new(""))
        })
        .unwrap();
    let client = bus.connect().await;
    for method in ["Explode", "ExplodeLater"] {
        let error = client
            .call::<Text, Text>(SERVICE, method, &Text::new("now"))
            .await
            .unwrap_err();
        assert_remote(&error, ErrorCode::Failed, "org.pbus.Error.Failed");
        assert!(error.to_string().contains("panicked"), "{error}");
    }
    let reply: Text = client
        .call(SERVICE, "Explode", &Text::new("still here"))
        .await
        .unwrap();
    assert_eq!(reply.text, "still here");
    assert!(!service.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_and_signals_are_refused_with_invalid_args() {
    let bus = TestBus::start();
    let mut callee = bus.raw().await;
    let callee_name = callee.unique_name().to_owned();
    let mut sender = bus.raw().await;

    let with_path = |path: &str, header: Header| Header {
        path: path.to_owned(),
        ..header
    };
    let flagged_monitor_copy = |header: Header| Header {
        flags: HeaderFlag::MonitorCopy as u32,
        ..header
    };
    let cases = [
        (
            "a call with serial 0",
            call_header(0, &callee_name, "Echo"),
            "non-zero serial",
        ),
        (
            "a call with no member",
            call_header(sender.next_serial(), &callee_name, ""),
            "invalid member name",
        ),
        (
            "a call to a member starting with a digit",
            call_header(sender.next_serial(), &callee_name, "1Echo"),
            "invalid member name",
        ),
        (
            "a call with a relative path",
            with_path(
                "a/b",
                call_header(sender.next_serial(), &callee_name, "Echo"),
            ),
            "invalid object path",
        ),
        (
            "a call with a trailing slash in its path",
            with_path(
                "/a/",
                call_header(sender.next_serial(), &callee_name, "Echo"),
            ),
            "invalid object path",
        ),
        (
            "a unicast signal with no member",
            signal_header(sender.next_serial(), &callee_name, "/s", ""),
            "invalid member name",
        ),
        (
            "a unicast signal with a relative path",
            signal_header(sender.next_serial(), &callee_name, "s", "Poke"),
            "invalid object path",
        ),
        (
            "a broadcast with a member holding a dash",
            signal_header(sender.next_serial(), "", "/s", "Po-ke"),
            "invalid member name",
        ),
        (
            "a call flagged MONITOR_COPY",
            flagged_monitor_copy(call_header(sender.next_serial(), &callee_name, "Echo")),
            "MONITOR_COPY",
        ),
        (
            "a broadcast flagged MONITOR_COPY",
            flagged_monitor_copy(signal_header(sender.next_serial(), "", "/s", "Poke")),
            "MONITOR_COPY",
        ),
    ];
    for (what, header, says) in cases {
        sender.send(&header, &[]).await.unwrap();
        let answer = sender
            .recv_reply(header.serial, TIMEOUT)
            .await
            .unwrap_or_else(|error| panic!("{what}: {error}"));
        assert_error(&answer, ErrorCode::InvalidArgs, None, what);
        let message = &answer.error().unwrap().message;
        assert!(message.contains(says), "{what}: {message:?} lacks {says:?}");
        assert_eq!(answer.sender_name(), BUS_NAME, "{what}");
    }

    // A call reusing the serial of one still waiting for its reply is
    // refused; the first one still gets exactly its one answer.
    let serial = sender
        .send_call(&callee_name, "Slow", "", &[], 0)
        .await
        .unwrap();
    let first = callee.recv_call(TIMEOUT).await.unwrap();
    assert_eq!(first.header.serial, serial);
    sender
        .send(&call_header(serial, &callee_name, "Again"), &[])
        .await
        .unwrap();
    let answer = sender.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_error(
        &answer,
        ErrorCode::InvalidArgs,
        None,
        "a call reusing a pending serial",
    );
    let message = &answer.error().unwrap().message;
    assert!(message.contains("already waiting"), "{message:?}");
    callee
        .send_reply(sender.unique_name(), serial, "", &[])
        .await
        .unwrap();
    let reply = sender.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_eq!(reply.kind(), MessageKind::MethodReturn, "{reply:?}");
    assert_eq!(reply.sender_name(), callee_name);

    // The callee was sent only the one good call; both stay connected.
    let delivered = callee.take_delivered().await;
    assert!(
        delivered.is_empty(),
        "malformed frames were delivered: {delivered:?}"
    );
    let extra = sender.take_delivered().await;
    assert!(extra.is_empty(), "the sender was sent {extra:?}");
}
