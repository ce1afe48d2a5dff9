//! A bus whose fds the kernel had to drop (MSG_CTRUNC) broke the protocol
//! as far as the library is concerned, just as the daemon treats a client:
//! the fds cannot be matched to frames any more. Here a fake bus answers
//! HELLO with a WELCOME that carries an fd while the library's process has
//! no free fd slot, so the kernel truncates the control data; the frame
//! itself declares no fds, so only the MSG_CTRUNC check can catch it. The
//! handshake must fail with a protocol error. (Two SCM_RIGHTS sets in one
//! read cannot be produced from a peer on Linux: the kernel merges the sets
//! of one sendmsg and a read stops after the first skb with fds; the
//! shared check is unit-tested in pbus-proto.)
//!
//! This file holds one test, so it runs alone in its process: filling the
//! fd table disturbs nobody else.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{IoSlice, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::time::Duration;

use pbus::proto::frame::{encode_frame, FramePrefix, PREFIX_LEN};
use pbus::proto::v1::{Header, Limits, MessageKind, Welcome};
use pbus::{Address, Connection, Error};
use prost::{Message, Name};

/// Above this soft RLIMIT_NOFILE, filling the table takes too long.
const MAX_FILLABLE: u64 = 1 << 20;

/// Reads one whole frame (HELLO) from `stream`.
fn read_frame(stream: &mut std::os::unix::net::UnixStream) {
    let mut prefix = [0u8; PREFIX_LEN];
    stream.read_exact(&mut prefix).unwrap();
    let prefix = FramePrefix::parse(&prefix).unwrap();
    let mut rest = vec![0u8; (prefix.frame_len() as usize) - PREFIX_LEN];
    stream.read_exact(&mut rest).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_welcome_whose_fds_were_truncated_fails_the_handshake() {
    let limit = pbus_sys::process::fd_limit().unwrap();
    if limit.soft > MAX_FILLABLE {
        eprintln!("skipped: RLIMIT_NOFILE {} is too large to fill", limit.soft);
        return;
    }
    let path = std::env::temp_dir().join(format!("pbus-client-ctrunc-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let bus = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        read_frame(&mut stream);
        let welcome = Welcome {
            protocol_version: pbus::proto::PROTOCOL_VERSION,
            unique_name: ":1.1".into(),
            features: 3,
            limits: Some(Limits {
                max_frame_bytes: 1 << 20,
                max_header_bytes: 1 << 16,
                max_fds_per_message: 8,
                default_reply_timeout_ms: 1000,
                max_reply_timeout_ms: 1000,
                ..Limits::default()
            }),
            bus_id: "fake".into(),
        };
        let header = Header {
            kind: MessageKind::Welcome as i32,
            destination: ":1.1".into(),
            payload_type: Welcome::full_name(),
            ..Header::default()
        };
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, &header, &welcome.encode_to_vec(), 0);
        // Take every free fd slot of the process, then pass an fd: the
        // library's recvmsg cannot install it.
        let null = File::open("/dev/null").unwrap();
        let mut fillers = Vec::new();
        while let Ok(copy) = null.try_clone() {
            fillers.push(copy);
        }
        let sent =
            pbus_sys::fdpass::send_with_fds(&stream, &[IoSlice::new(&bytes)], &[null.as_fd()]);
        // Whatever happens, give the slots back once the library is done
        // (or after a while, so a hang does not starve the test harness).
        let _ = done_rx.recv_timeout(Duration::from_secs(10));
        drop(fillers);
        assert_eq!(sent.unwrap(), bytes.len());
        stream
    });
    let result = Connection::builder()
        .address(Address::unix(&path))
        .build()
        .await;
    done_tx.send(()).unwrap();
    let _stream = bus.join().unwrap();
    let _ = std::fs::remove_file(&path);
    match result {
        Err(Error::Protocol(why)) => assert!(why.contains("MSG_CTRUNC"), "{why}"),
        Err(other) => panic!("expected a protocol error, got {other}"),
        Ok(_) => panic!("the handshake accepted a WELCOME whose fds were truncated"),
    }
}
