//! The driver around the client core's pending-call table, against a fake
//! bus on a socket that answers only what each test makes it answer: a
//! call the bus never answers fails at its local deadline and a late reply
//! is dropped; replies are matched by serial whatever their order; the
//! connection ending fails every waiting call (Disconnected when the bus
//! hangs up, a protocol error when it sends a bad header).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use pbus::proto::frame::{encode_frame, FrameLimits, FramePrefix, FrameReader};
use pbus::proto::v1::{Feature, Header, Limits, MessageKind, SenderInfo, Welcome};
use pbus::{Address, Connection, Error, Outgoing};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const TIMEOUT: Duration = Duration::from_secs(20);

/// The bus end of one connection.
struct FakeBus {
    stream: UnixStream,
    reader: FrameReader<OwnedFd>,
    /// Headers read and not yet looked at.
    inbox: VecDeque<Header>,
}

impl FakeBus {
    async fn next_frame(&mut self) -> Header {
        loop {
            if let Some(header) = self.inbox.pop_front() {
                return header;
            }
            let mut buffer = [0u8; 4096];
            let n = tokio::time::timeout(TIMEOUT, self.stream.read(&mut buffer))
                .await
                .expect("the library wrote nothing in time")
                .unwrap();
            assert!(n > 0, "the library closed the connection");
            let inbox = &mut self.inbox;
            self.reader
                .feed(&buffer[..n], Vec::new(), |frame| {
                    inbox.push_back(Header::decode(frame.header).unwrap());
                    Ok::<(), ()>(())
                })
                .unwrap();
        }
    }

    /// The next method call the library sent.
    async fn next_call(&mut self) -> Header {
        let header = self.next_frame().await;
        assert_eq!(header.kind, MessageKind::MethodCall as i32, "{header:?}");
        header
    }

    async fn send(&mut self, header: &Header, body: &[u8]) {
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, header, body, 0);
        self.stream.write_all(&bytes).await.unwrap();
    }

    /// Answers `call` with a METHOD_RETURN whose body is `body`.
    async fn reply(&mut self, call: &Header, body: &[u8]) {
        let reply = Header {
            kind: MessageKind::MethodReturn as i32,
            serial: 1000 + call.serial,
            reply_serial: call.serial,
            destination: ":1.7".into(),
            payload_type: "test.Reply".into(),
            sender: Some(SenderInfo {
                unique_name: ":1.3".into(),
                ..SenderInfo::default()
            }),
            ..Header::default()
        };
        self.send(&reply, body).await;
    }
}

/// A library connection to a fake bus whose default reply timeout is 1 s
/// and which announces no maximum.
async fn connect(name: &str) -> (Connection, FakeBus) {
    let path = std::env::temp_dir().join(format!("pbus-client-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let bus = async {
        let (stream, _) = listener.accept().await.unwrap();
        let mut bus = FakeBus {
            stream,
            reader: FrameReader::new(FrameLimits::default()),
            inbox: VecDeque::new(),
        };
        let hello = bus.next_frame().await;
        assert_eq!(hello.kind, MessageKind::Hello as i32);
        let welcome = Welcome {
            protocol_version: pbus::proto::PROTOCOL_VERSION,
            unique_name: ":1.7".into(),
            features: Feature::FdPassing as u32 | Feature::Memfd as u32,
            limits: Some(Limits {
                max_frame_bytes: 1 << 16,
                max_header_bytes: 1 << 12,
                max_fds_per_message: 4,
                max_memfds_per_message: 4,
                default_reply_timeout_ms: 1000,
                ..Limits::default()
            }),
            bus_id: "fake".into(),
        };
        let header = Header {
            kind: MessageKind::Welcome as i32,
            ..Header::default()
        };
        bus.send(&header, &welcome.encode_to_vec()).await;
        bus
    };
    let client = Connection::builder().address(Address::unix(&path)).build();
    let (connection, bus) = tokio::time::timeout(TIMEOUT, async { tokio::join!(client, bus) })
        .await
        .expect("handshake with the fake bus");
    std::fs::remove_file(&path).unwrap();
    (connection.unwrap(), bus)
}

/// Calls `Work` on `:1.3` with `timeout`; the reply's body.
async fn call(connection: &Connection, timeout: Duration) -> Result<Vec<u8>, Error> {
    let reply = connection
        .method_call(":1.3", "Work")
        .timeout(timeout)
        .send(Outgoing::raw("test.Request", Vec::new()))
        .await?
        .expect("a reply was requested");
    Ok(reply.body().as_bytes().to_vec())
}

#[tokio::test]
async fn replies_are_matched_to_their_calls_by_serial() {
    let (connection, mut bus) = connect("matched").await;
    let first = tokio::spawn({
        let connection = connection.clone();
        async move { call(&connection, Duration::from_secs(10)).await }
    });
    let first_call = bus.next_call().await;
    let second = tokio::spawn({
        let connection = connection.clone();
        async move { call(&connection, Duration::from_secs(10)).await }
    });
    let second_call = bus.next_call().await;
    assert_ne!(first_call.serial, second_call.serial);
    assert_eq!(first_call.timeout_ms, 10_000);
    // Answered the other way round, and a reply nobody waits for between.
    bus.reply(&second_call, b"second").await;
    let stray = Header {
        serial: 424_242,
        ..first_call.clone()
    };
    bus.reply(&stray, b"stray").await;
    bus.reply(&first_call, b"first").await;
    assert_eq!(second.await.unwrap().unwrap(), b"second");
    assert_eq!(first.await.unwrap().unwrap(), b"first");
}

#[tokio::test]
async fn a_call_the_bus_never_answers_fails_at_its_deadline() {
    let (connection, mut bus) = connect("deadline").await;
    let started = Instant::now();
    let unanswered = tokio::spawn({
        let connection = connection.clone();
        async move { call(&connection, Duration::from_millis(1)).await }
    });
    let ignored = bus.next_call().await;
    assert_eq!(ignored.timeout_ms, 1);
    let error = tokio::time::timeout(TIMEOUT, unanswered)
        .await
        .expect("the local deadline fired")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&error, Error::Protocol(why) if why.contains("no answer from the bus")),
        "{error:?}"
    );
    // The bus's own timeout plus the grace, not before.
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // A late reply finds no call waiting; the connection goes on.
    bus.reply(&ignored, b"late").await;
    let next = tokio::spawn({
        let connection = connection.clone();
        async move { call(&connection, Duration::from_secs(10)).await }
    });
    let answered = bus.next_call().await;
    assert_ne!(answered.serial, ignored.serial);
    bus.reply(&answered, b"on time").await;
    assert_eq!(next.await.unwrap().unwrap(), b"on time");
}

#[tokio::test]
async fn the_bus_hanging_up_fails_every_waiting_call() {
    let (connection, mut bus) = connect("hangup").await;
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let connection = connection.clone();
        waiting.push(tokio::spawn(async move {
            call(&connection, Duration::from_secs(10)).await
        }));
        bus.next_call().await;
    }
    drop(bus);
    for call in waiting {
        let result = tokio::time::timeout(TIMEOUT, call).await.unwrap().unwrap();
        assert!(matches!(result, Err(Error::Disconnected)), "{result:?}");
    }
    connection.closed().await;
    // A call after the end is refused at once.
    let result = call(&connection, Duration::from_secs(10)).await;
    assert!(matches!(result, Err(Error::Disconnected)), "{result:?}");
}

#[tokio::test]
async fn a_bad_header_from_the_bus_fails_waiting_calls_with_a_protocol_error() {
    let (connection, mut bus) = connect("bad-header").await;
    let waiting = tokio::spawn({
        let connection = connection.clone();
        async move { call(&connection, Duration::from_secs(10)).await }
    });
    bus.next_call().await;
    // A well-formed frame whose header bytes are not a Header: field 1
    // (kind) as a length-delimited field running past the end.
    let garbage = [0x0a, 0x7f, 0x01];
    let prefix = FramePrefix {
        header_len: garbage.len() as u32,
        body_len: 0,
        fd_count: 0,
    };
    let mut frame = prefix.to_bytes().to_vec();
    frame.extend_from_slice(&garbage);
    bus.stream.write_all(&frame).await.unwrap();
    let result = tokio::time::timeout(TIMEOUT, waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&result, Err(Error::Protocol(why)) if why.starts_with("bad header from the bus")),
        "{result:?}"
    );
    assert!(connection.is_closed());
}
