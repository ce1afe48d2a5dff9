//! A method reply the library refuses to send (over a limit the bus
//! announced) still answers the caller: an ERROR frame goes out in its
//! place, with the reply's header but none of the refused reply's payload
//! fields. The bus here is a fake on a socket, so the frames the library
//! writes are read exactly as they are.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::Duration;

use pbus::proto::frame::{encode_frame, FrameLimits, FrameReader};
use pbus::proto::v1::{ErrorCode, Feature, Header, Limits, MessageKind, SenderInfo, Welcome};
use pbus::{Address, Connection, Outgoing};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const MAX_FRAME: u32 = 4096;
const TIMEOUT: Duration = Duration::from_secs(10);

/// The bus end of one connection.
struct FakeBus {
    stream: UnixStream,
    reader: FrameReader<OwnedFd>,
    /// Frames read and not yet looked at: header, body, declared fd count.
    inbox: VecDeque<(Header, Vec<u8>, usize)>,
}

impl FakeBus {
    async fn next_frame(&mut self) -> (Header, Vec<u8>, usize) {
        loop {
            if let Some(frame) = self.inbox.pop_front() {
                return frame;
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
                    let header = Header::decode(frame.header).unwrap();
                    inbox.push_back((header, frame.body.to_vec(), frame.fds.len()));
                    Ok::<(), ()>(())
                })
                .unwrap();
        }
    }

    async fn send(&mut self, header: &Header, body: &[u8]) {
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, header, body, 0);
        self.stream.write_all(&bytes).await.unwrap();
    }

    /// Calls `member` on the library as `:1.3`; returns the frame it answers with.
    async fn call(&mut self, serial: u64, member: &str) -> (Header, Vec<u8>, usize) {
        let call = Header {
            kind: MessageKind::MethodCall as i32,
            serial,
            destination: ":1.7".into(),
            member: member.into(),
            sender: Some(SenderInfo {
                unique_name: ":1.3".into(),
                ..SenderInfo::default()
            }),
            ..Header::default()
        };
        self.send(&call, b"").await;
        self.next_frame().await
    }
}

/// A library connection to a fake bus that announces `MAX_FRAME` and no
/// memfd payloads per message.
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
        let (hello, _, _) = bus.next_frame().await;
        assert_eq!(hello.kind, MessageKind::Hello as i32);
        let welcome = Welcome {
            protocol_version: pbus::proto::PROTOCOL_VERSION,
            unique_name: ":1.7".into(),
            features: Feature::FdPassing as u32 | Feature::Memfd as u32,
            limits: Some(Limits {
                max_frame_bytes: MAX_FRAME,
                max_header_bytes: 1024,
                max_fds_per_message: 4,
                max_memfds_per_message: 0,
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

/// Asserts `frame` is the ERROR that replaces a refused reply to `serial`.
fn assert_refused_reply(frame: &(Header, Vec<u8>, usize), serial: u64, limit: &str) {
    let (header, body, fds) = frame;
    assert_eq!(header.kind, MessageKind::Error as i32, "{header:?}");
    assert_eq!(header.reply_serial, serial);
    assert_eq!(header.destination, ":1.3");
    let error = header.error.as_ref().expect("an error field");
    assert_eq!(error.code, ErrorCode::Failed as i32);
    assert_eq!(error.name, "org.pbus.Error.Failed");
    assert!(error.message.contains(limit), "{}", error.message);
    // Nothing of the refused reply is left in the header.
    assert_eq!(header.payload_type, "");
    assert!(header.memfds.is_empty(), "{:?}", header.memfds);
    assert!(!header.body_in_memfd);
    assert!(body.is_empty());
    assert_eq!(*fds, 0);
}

#[tokio::test]
async fn a_reply_over_a_bus_limit_is_answered_with_an_error() {
    let (connection, mut bus) = connect("fallback").await;
    connection
        .serve_raw("Small", |_call| async {
            Ok(Outgoing::raw("test.Small", b"fits".to_vec()))
        })
        .unwrap();
    connection
        .serve_raw("Big", |_call| async {
            Ok(Outgoing::raw("test.Big", vec![7u8; MAX_FRAME as usize]))
        })
        .unwrap();
    connection
        .serve_raw("Huge", |_call| async {
            // Above the memfd threshold: it goes in a memfd, which this bus
            // takes none of.
            Ok(Outgoing::raw(
                "test.Huge",
                vec![7u8; pbus::DEFAULT_MEMFD_THRESHOLD + 1],
            ))
        })
        .unwrap();

    let (reply, body, fds) = bus.call(40, "Small").await;
    assert_eq!(reply.kind, MessageKind::MethodReturn as i32);
    assert_eq!(
        (reply.reply_serial, reply.payload_type.as_str(), fds),
        (40, "test.Small", 0)
    );
    assert_eq!(body, b"fits");

    let answer = bus.call(41, "Big").await;
    assert_refused_reply(&answer, 41, "max_frame_bytes");
    let answer = bus.call(42, "Huge").await;
    assert_refused_reply(&answer, 42, "max_memfds_per_message");
    drop(connection);
}
