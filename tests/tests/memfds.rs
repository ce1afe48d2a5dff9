//! Sealed memfd payloads through the real daemon.
//!
//! * A fully sealed memfd (SHRINK | GROW | WRITE | SEAL) with an in-range
//!   payload is delivered: the receiver maps exactly the declared range and
//!   holds the sender's very memfd (same inode), not a copy.
//! * Everything else is refused with INVALID_MEMFD and a message naming the
//!   case, in calls, unicast and broadcast signals and replies: unsealed,
//!   each single seal missing, FUTURE_WRITE in place of WRITE, a range past
//!   the end, an offset + length that overflows, a regular file, a tmpfs
//!   file, a memfd index with no fd, one fd for two payloads, and a body
//!   declared in a memfd with none attached. These are built as raw frames,
//!   since the client library refuses to build them. The sender stays
//!   connected; the receiver gets nothing; the daemon keeps no fd.
//! * A 1 GiB payload makes a round trip through the library's zero-copy API
//!   (`MemfdWriter`, `SealedMemfd`, `Outgoing::from_memfd`, `Body::into_memfd`):
//!   the service maps and checks all of it and answers with the same memfd.
//!   The daemon's peak resident memory grows by nothing like 1 GiB: it never
//!   maps or copies the payload.
//! * Bodies sent from a `Vec` above the 64 KiB threshold (including one
//!   larger than `max_frame_bytes`) arrive as memfd mappings without the
//!   application doing anything; one at the threshold stays inline.
#![forbid(unsafe_code)]

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use pbus::{Connection, MemfdWriter, MethodCall, MethodError, Outgoing, SealedMemfd};
use pbus_proto::v1::{ErrorCode, Header, MessageKind};
use pbus_sys::memfd::seal;
use pbus_tests::fdkit::{borrow_all, memfd_with, regular_file, same_inode, sealed_memfd};
use pbus_tests::frames::{assert_error, call_header, memfd_ref, reply_header, signal_header};
use pbus_tests::messages::Text;
use pbus_tests::{procfs, RawClient, TestBus, TIMEOUT};
use tokio::sync::mpsc;

const SERVICE: &str = "org.pbus.test.Memfds";
const SIGNAL_PATH: &str = "/org/pbus/test/memfds";
const BLOB: &str = "pbus.test.Blob";

/// `len` bytes of a recognisable pattern.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// What the memfd service reports about one call.
#[derive(Debug)]
struct Seen {
    body: Vec<u8>,
    body_memfd: Option<SealedMemfd>,
    extra: Vec<Vec<u8>>,
    fds: usize,
}

/// A service whose `Blob` method reports what it got and answers "ok".
async fn blob_service(bus: &TestBus) -> (Connection, mpsc::UnboundedReceiver<Seen>) {
    let service = bus.connect_owning(SERVICE).await;
    let (tx, rx) = mpsc::unbounded_channel();
    service
        .serve_raw("Blob", move |call: MethodCall| {
            let tx = tx.clone();
            async move {
                let mut incoming = call.incoming;
                let extra = incoming
                    .take_memfds()
                    .iter()
                    .map(|memfd| memfd.map().expect("map an extra payload").to_vec())
                    .collect();
                let fds = incoming.fds().len();
                let body = incoming.into_body();
                let seen = Seen {
                    body: body.as_bytes().to_vec(),
                    body_memfd: body.into_memfd(),
                    extra,
                    fds,
                };
                let _ = tx.send(seen);
                Ok(Outgoing::new(&Text::new("ok")))
            }
        })
        .unwrap();
    (service, rx)
}

/// One way to attach a memfd payload that the daemon must refuse.
struct BadMemfd {
    what: &'static str,
    /// Fds to attach.
    fds: Vec<OwnedFd>,
    /// `(fd_index, offset, length)` of each payload.
    refs: Vec<(u32, u64, u64)>,
    body_in_memfd: bool,
    /// Words the refusal's message must contain (empty: code only).
    says: Vec<&'static str>,
    /// Words it must not contain.
    not: Vec<&'static str>,
}

fn bad_memfds(dir: &std::path::Path) -> Vec<BadMemfd> {
    const SIZE: usize = 4096;
    let content = pattern(SIZE);
    let len = SIZE as u64;
    let all_but = |missing: u32| seal::REQUIRED & !missing;
    let seal_names: &[&str] = &["SEAL_SHRINK", "SEAL_GROW", "SEAL_WRITE", "SEAL_SEAL"];
    let mut cases = vec![BadMemfd {
        what: "an unsealed memfd",
        fds: vec![memfd_with(&content, 0)],
        refs: vec![(0, 0, len)],
        body_in_memfd: true,
        says: vec!["missing SEAL_SHRINK, SEAL_GROW, SEAL_WRITE, SEAL_SEAL"],
        not: vec![],
    }];
    for (index, (bit, name)) in [
        (seal::SHRINK, "missing SEAL_SHRINK"),
        (seal::GROW, "missing SEAL_GROW"),
        (seal::WRITE, "missing SEAL_WRITE"),
        (seal::SEAL, "missing SEAL_SEAL"),
    ]
    .into_iter()
    .enumerate()
    {
        let others: Vec<&str> = seal_names
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .map(|(_, name)| *name)
            .collect();
        cases.push(BadMemfd {
            what: name,
            fds: vec![memfd_with(&content, all_but(bit))],
            refs: vec![(0, 0, len)],
            body_in_memfd: true,
            says: vec![name],
            not: others,
        });
    }
    cases.extend([
        BadMemfd {
            what: "SEAL_FUTURE_WRITE instead of SEAL_WRITE",
            fds: vec![memfd_with(
                &content,
                seal::SHRINK | seal::GROW | seal::FUTURE_WRITE | seal::SEAL,
            )],
            refs: vec![(0, 0, len)],
            body_in_memfd: true,
            says: vec!["missing SEAL_WRITE", "SEAL_FUTURE_WRITE is not enough"],
            not: vec!["SEAL_SHRINK", "SEAL_GROW"],
        },
        BadMemfd {
            what: "a length past the end",
            fds: vec![sealed_memfd(&content)],
            refs: vec![(0, 0, len + 1)],
            body_in_memfd: true,
            says: vec!["exceeds its size of 4096 bytes"],
            not: vec![],
        },
        BadMemfd {
            what: "an offset and length past the end",
            fds: vec![sealed_memfd(&content)],
            refs: vec![(0, 4000, 97)],
            body_in_memfd: true,
            says: vec!["4000..4097 exceeds its size"],
            not: vec![],
        },
        BadMemfd {
            what: "an offset + length that overflows",
            fds: vec![sealed_memfd(&content)],
            refs: vec![(0, u64::MAX - 10, 100)],
            body_in_memfd: true,
            says: vec!["overflows"],
            not: vec![],
        },
        BadMemfd {
            what: "a regular file",
            fds: vec![regular_file(dir, &content)],
            refs: vec![(0, 0, len)],
            body_in_memfd: true,
            says: vec!["not a memfd"],
            not: vec![],
        },
        BadMemfd {
            what: "a tmpfs file (sealable shmem, never sealed)",
            fds: vec![regular_file(std::path::Path::new("/dev/shm"), &content)],
            refs: vec![(0, 0, len)],
            body_in_memfd: true,
            says: vec![],
            not: vec![],
        },
        BadMemfd {
            what: "a memfd index with no fd",
            fds: vec![sealed_memfd(&content)],
            refs: vec![(1, 0, len)],
            body_in_memfd: true,
            says: vec!["memfd index 1 has no fd"],
            not: vec![],
        },
        BadMemfd {
            what: "one fd for two payloads",
            fds: vec![sealed_memfd(&content)],
            refs: vec![(0, 0, 10), (0, 10, 10)],
            body_in_memfd: false,
            says: vec!["used for two memfds"],
            not: vec![],
        },
        BadMemfd {
            what: "a body in a memfd without any memfd",
            fds: vec![],
            refs: vec![],
            body_in_memfd: true,
            says: vec!["body_in_memfd"],
            not: vec![],
        },
    ]);
    cases
}

fn with_memfds(mut header: Header, case: &BadMemfd) -> Header {
    header.memfds = case
        .refs
        .iter()
        .map(|&(index, offset, length)| memfd_ref(index, offset, length))
        .collect();
    header.body_in_memfd = case.body_in_memfd;
    header
}

fn assert_invalid_memfd(answer: &pbus_tests::RawMessage, case: &BadMemfd, how: &str) {
    let what = format!("{} ({how})", case.what);
    assert_error(answer, ErrorCode::InvalidMemfd, None, &what);
    let message = &answer.error().unwrap().message;
    for word in &case.says {
        assert!(message.contains(word), "{what}: {message:?} lacks {word:?}");
    }
    for word in &case.not {
        assert!(
            !message.contains(word),
            "{what}: {message:?} mentions {word:?}"
        );
    }
}

async fn send(client: &mut RawClient, header: &Header, fds: &[OwnedFd]) -> pbus_tests::RawMessage {
    client
        .send_with_fds(header, &[], &borrow_all(fds))
        .await
        .unwrap();
    client.recv_reply(header.serial, TIMEOUT).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_memfds_pass_and_every_bad_one_is_refused_with_its_reason() {
    let bus = TestBus::start();
    let (service, mut seen) = blob_service(&bus).await;
    let mut subscriber = bus.raw().await;
    subscriber
        .add_match(pbus_proto::v1::MatchRule {
            member: "Blob".into(),
            ..Default::default()
        })
        .await;
    let mut sender = bus.raw().await;
    let baseline = bus.settled_fd_count().await;

    // Fully sealed, a range inside it: delivered, the sender's own memfd.
    let content = pattern(8192);
    let memfd = sealed_memfd(&content);
    let mut header = call_header(sender.next_serial(), SERVICE, "Blob");
    header.memfds = vec![memfd_ref(0, 1000, 3000)];
    header.body_in_memfd = true;
    let answer = send(&mut sender, &header, std::slice::from_ref(&memfd)).await;
    assert_eq!(answer.kind(), MessageKind::MethodReturn, "{answer:?}");
    let got = seen.recv().await.unwrap();
    assert_eq!(got.body, &content[1000..4000]);
    assert_eq!(got.fds, 0);
    let received = got.body_memfd.expect("the body came in a memfd");
    assert_eq!((received.offset(), received.len()), (1000, 3000));
    assert!(
        same_inode(received.as_fd(), memfd.as_fd()),
        "the receiver holds the sender's memfd, not a copy"
    );
    let present = pbus_sys::memfd::seals(&received).unwrap();
    assert_eq!(present & seal::REQUIRED, seal::REQUIRED);
    drop(received);
    // An extra payload next to an inline body.
    let mut header = call_header(sender.next_serial(), SERVICE, "Blob");
    header.memfds = vec![memfd_ref(0, 0, 8192)];
    let body = b"inline body".to_vec();
    let borrowed = [memfd.as_fd()];
    sender
        .send_with_fds(&header, &body, &borrowed)
        .await
        .unwrap();
    let answer = sender.recv_reply(header.serial, TIMEOUT).await.unwrap();
    assert_eq!(answer.kind(), MessageKind::MethodReturn, "{answer:?}");
    let got = seen.recv().await.unwrap();
    assert_eq!(got.body, body);
    assert_eq!(got.extra, vec![content.clone()]);
    drop(memfd);

    // Every bad one: refused in a call, a unicast signal and a broadcast.
    let dir = tempfile::tempdir().unwrap();
    for case in bad_memfds(dir.path()) {
        let header = with_memfds(call_header(sender.next_serial(), SERVICE, "Blob"), &case);
        let answer = send(&mut sender, &header, &case.fds).await;
        assert_invalid_memfd(&answer, &case, "call");
        let unicast = signal_header(sender.next_serial(), SERVICE, SIGNAL_PATH, "Blob");
        let answer = send(&mut sender, &with_memfds(unicast, &case), &case.fds).await;
        assert_invalid_memfd(&answer, &case, "unicast signal");
        let broadcast = signal_header(sender.next_serial(), "", SIGNAL_PATH, "Blob");
        let answer = send(&mut sender, &with_memfds(broadcast, &case), &case.fds).await;
        assert_invalid_memfd(&answer, &case, "broadcast signal");
        drop(case.fds);
        bus.wait_for_fd_count(baseline, TIMEOUT).await;
    }
    // A reply with a bad memfd: the caller gets the refusal in its place.
    let mut callee = bus.raw().await;
    let caller_serial = sender
        .send_call(callee.unique_name(), "Give", "", &[], 0)
        .await
        .unwrap();
    let call = callee.recv_call(TIMEOUT).await.unwrap();
    let case = bad_memfds(dir.path()).remove(0);
    let reply = with_memfds(
        reply_header(
            callee.next_serial(),
            sender.unique_name(),
            call.header.serial,
        ),
        &case,
    );
    let answer = send(&mut callee, &reply, &case.fds).await;
    assert_invalid_memfd(&answer, &case, "reply, as the callee sees it");
    let answer = sender.recv_reply(caller_serial, TIMEOUT).await.unwrap();
    assert_invalid_memfd(&answer, &case, "reply, as the caller sees it");
    drop(case.fds);

    // Nothing bad was delivered, and the sender is still connected.
    sender.sync().await;
    assert!(seen.try_recv().is_err(), "a bad memfd reached the service");
    let delivered = subscriber.take_delivered().await;
    assert!(
        delivered.is_empty(),
        "bad broadcasts were delivered: {delivered:?}"
    );
    service.ping().await.unwrap();
    drop(callee);
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

const GIB: usize = 1 << 30;
const CHUNK: usize = 1 << 20;

/// Writes 1 GiB: 1 MiB chunks of `pattern`, each starting with its index.
fn write_gib(writer: &mut MemfdWriter, pattern: &[u8]) {
    let mut chunk = pattern.to_vec();
    for index in 0..(GIB / CHUNK) as u64 {
        chunk[..8].copy_from_slice(&index.to_le_bytes());
        writer.write_all(&chunk).expect("write the payload");
    }
}

/// Checks every byte of a payload written by [`write_gib`].
fn check_gib(bytes: &[u8], pattern: &[u8]) -> Result<(), String> {
    if bytes.len() != GIB {
        return Err(format!("{} bytes, not 1 GiB", bytes.len()));
    }
    for (index, chunk) in bytes.chunks(CHUNK).enumerate() {
        if chunk[..8] != (index as u64).to_le_bytes() || chunk[8..] != pattern[8..] {
            return Err(format!("chunk {index} differs"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_round_trips_without_the_daemon_touching_it() {
    let bus = TestBus::start();
    let service = bus.connect_owning(SERVICE).await;
    let chunk_pattern = pattern(CHUNK);
    service
        .serve_raw("Check", {
            let chunk_pattern = chunk_pattern.clone();
            move |call: MethodCall| {
                let chunk_pattern = chunk_pattern.clone();
                async move {
                    let body = call.incoming.into_body();
                    if !body.is_memfd() {
                        return Err(MethodError::invalid_args("the payload is not in a memfd"));
                    }
                    check_gib(body.as_bytes(), &chunk_pattern)
                        .map_err(MethodError::invalid_args)?;
                    // Answer with the very same memfd: zero copies both ways.
                    let memfd = body.into_memfd().expect("a memfd body");
                    Ok(Outgoing::from_memfd(BLOB, memfd))
                }
            }
        })
        .unwrap();
    let caller = bus.connect().await;
    let baseline = bus.settled_fd_count().await;

    let started = Instant::now();
    let mut writer = MemfdWriter::new("pbus-test-gib").unwrap();
    write_gib(&mut writer, &chunk_pattern);
    let payload = writer.seal().unwrap();
    assert_eq!(payload.len(), GIB as u64);
    let kept = payload.try_clone().unwrap();
    let written = started.elapsed();

    let rss_before = bus.rss_kib();
    let started = Instant::now();
    let reply = caller
        .method_call(SERVICE, "Check")
        .timeout(Duration::from_secs(120))
        .send(Outgoing::from_memfd(BLOB, payload))
        .await
        .expect("the 1 GiB call")
        .expect("a reply");
    let round_trip = started.elapsed();
    assert_eq!(reply.payload_type(), BLOB);
    let body = reply.into_body();
    assert!(body.is_memfd());
    check_gib(body.as_bytes(), &chunk_pattern).unwrap();
    let memfd = body.into_memfd().unwrap();
    assert!(
        same_inode(memfd.as_fd(), kept.as_fd()),
        "the reply carries the caller's own memfd"
    );
    // The daemon never mapped or copied it: its peak resident memory did
    // not grow by anything like the payload.
    let peak_after = procfs::peak_rss_kib(bus.pid());
    eprintln!(
        "1 GiB: written in {written:?}, round trip (with the service checking every byte) \
         {round_trip:?}; daemon RSS before {rss_before} KiB, peak after {peak_after} KiB"
    );
    assert!(
        peak_after < rss_before + 32 * 1024,
        "the daemon's peak RSS reached {peak_after} KiB (from {rss_before} KiB) routing 1 GiB"
    );
    drop((memfd, kept));
    service.ping().await.unwrap();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_from_a_vec_arrive_as_memfd_mappings() {
    let bus = TestBus::start();
    let (service, mut seen) = blob_service(&bus).await;
    service
        .serve_raw("Big", |call: MethodCall| async move {
            let len: usize = call.decode::<Text>()?.text.parse().unwrap();
            Ok(Outgoing::raw(BLOB, pattern(len)))
        })
        .unwrap();
    let caller = bus.connect().await;
    let baseline = bus.settled_fd_count().await;
    let threshold = pbus::DEFAULT_MEMFD_THRESHOLD;
    let max_frame = caller.limits().max_frame_bytes as usize;

    for (len, in_memfd) in [
        (threshold, false),
        (threshold + 1, true),
        (1 << 20, true),
        (max_frame * 2, true),
    ] {
        let body = pattern(len);
        let reply = caller
            .method_call(SERVICE, "Blob")
            .send(Outgoing::raw(BLOB, body.clone()))
            .await
            .unwrap_or_else(|error| panic!("a {len}-byte body: {error}"))
            .unwrap();
        assert_eq!(reply.decode::<Text>().unwrap().text, "ok");
        let got = seen.recv().await.unwrap();
        assert_eq!(got.body_memfd.is_some(), in_memfd, "a {len}-byte body");
        assert!(got.body == body, "a {len}-byte body arrived changed");
    }

    // A large reply, kept after the message is gone.
    let len = 3 << 20;
    let reply = caller
        .method_call(SERVICE, "Big")
        .send(Outgoing::new(&Text::new(len.to_string())))
        .await
        .unwrap()
        .unwrap();
    let body = reply.into_body();
    assert!(body.is_memfd());
    let memfd = body.into_memfd().unwrap();
    assert_eq!(memfd.len(), len as u64);
    let mapping = memfd.map().unwrap();
    assert!(mapping[..] == pattern(len)[..], "the reply arrived changed");
    drop((mapping, memfd));

    service.ping().await.unwrap();
    bus.wait_for_fd_count(baseline, TIMEOUT).await;
}
