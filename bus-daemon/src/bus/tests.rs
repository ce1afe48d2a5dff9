//! Tests of the routing core without sockets: peers are added with
//! hand-made identities, frames go in through `dispatch`, and what the bus
//! queued is read back by flushing the outboxes into a frame reader.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use pbus_identity::{Container, ContainerRuntime, Namespaces, PeerIdentity};
use pbus_policy::{Policy, PolicyLayers};
use pbus_proto::frame::{Flushed, FrameLimits, FrameReader};
use pbus_proto::v1::{
    AddMatchRequest, ContainerInfo, ErrorCode, Header, HeaderFlag, Hello, MatchRule, MessageKind,
    RequestNameReply, RequestNameRequest, RequestNameResult, SenderInfo, Welcome,
};
use pbus_proto::{BUS_NAME, PROTOCOL_VERSION};
use prost::Message;

use super::{Bus, DaemonFacts, FdBudgets, PeerId};
use crate::config::Limits;
use crate::memfd::SystemFdProbe;

const HOST_NS: u64 = 4026531836;

/// The daemon of these tests: root, in the host's pid namespace.
fn daemon_facts() -> DaemonFacts {
    DaemonFacts {
        uid: 0,
        pid: 1,
        pid_namespace: HOST_NS,
        mode: crate::config::Mode::Host,
        host_reference: pbus_identity::HostReference::Own,
    }
}

struct Harness {
    bus: Bus<()>,
    now: Instant,
    serial: u64,
}

/// A frame the bus queued for a peer.
#[derive(Debug)]
struct Out {
    header: Header,
    body: Vec<u8>,
    fds: usize,
}

impl Harness {
    fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Self {
        let now = Instant::now();
        Self {
            bus: Bus::new(
                limits,
                PolicyLayers::global(Policy::builtin()),
                "test-bus".into(),
                daemon_facts(),
                FdBudgets {
                    held: 1 << 20,
                    in_flight: 1 << 20,
                },
                Box::new(SystemFdProbe),
                now,
            ),
            now,
            serial: 0,
        }
    }

    fn identity(uid: u32, pid: u32) -> PeerIdentity {
        PeerIdentity {
            uid,
            gid: uid,
            pid,
            groups: vec![uid, 10],
            namespaces: Namespaces {
                pid: HOST_NS,
                ..Namespaces::default()
            },
            pid_namespace_chain: vec![HOST_NS],
            nspids: vec![pid],
            ..PeerIdentity::default()
        }
    }

    fn connect(&mut self, uid: u32, pid: u32) -> PeerId {
        self.connect_as(Self::identity(uid, pid))
    }

    /// A root peer in Docker container `id` (the host's namespaces).
    fn connect_in_container(&mut self, id: &str, pid: u32) -> PeerId {
        let mut identity = Self::identity(0, pid);
        identity.container = Container {
            runtime: ContainerRuntime::Docker,
            id: id.into(),
            pod_uid: None,
        };
        self.connect_as(identity)
    }

    fn connect_as(&mut self, identity: PeerIdentity) -> PeerId {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            features: 3,
            client_name: String::new(),
        };
        let id = self
            .bus
            .add_peer((), identity, &hello, std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        let welcome = self.drain(id);
        assert_eq!(welcome[0].header.kind, MessageKind::Welcome as i32);
        let welcome = Welcome::decode(welcome[0].body.as_slice()).unwrap();
        assert_eq!(welcome.unique_name, id.unique_name().as_str());
        id
    }

    /// Everything queued for `peer`, decoded.
    /// Everything queued for `peer`, decoded, with each frame's fds as the
    /// receiver would tie them: every sendmsg is fed to a frame reader as
    /// one read with the fds it carried, so a frame gets exactly the fds
    /// the wire rule gives it (and a misplaced set fails the test).
    fn drain(&mut self, peer: PeerId) -> Vec<Out> {
        let mut sends: Vec<(Vec<u8>, Vec<i32>)> = Vec::new();
        loop {
            let flushed = self
                .bus
                .flush_peer(
                    peer,
                    |_, data, fds| {
                        sends.push((data.to_vec(), fds.iter().map(AsRawFd::as_raw_fd).collect()));
                        Ok(data.len())
                    },
                    // Drained at once: everything sent has been read.
                    |_| Ok(0),
                )
                .unwrap();
            // A frame with fds waits for the earlier ones to be read; they
            // are, so flush again.
            if flushed != Flushed::FdsWaiting {
                break;
            }
        }
        let mut reader = FrameReader::<i32>::new(FrameLimits::default());
        let mut out = Vec::new();
        for (data, fds) in sends {
            reader
                .feed(&data, fds, |frame| {
                    out.push(Out {
                        header: Header::decode(frame.header).unwrap(),
                        body: frame.body.to_vec(),
                        fds: frame.fds.len(),
                    });
                    Ok::<(), ()>(())
                })
                .unwrap_or_else(|error| panic!("bus queued a bad frame or fd set: {error:?}"));
        }
        out
    }

    fn send(&mut self, from: PeerId, header: Header, body: &[u8], fds: Vec<OwnedFd>) {
        let header_bytes = header.encode_to_vec();
        self.bus
            .dispatch(from, &header_bytes, body, fds, self.now)
            .unwrap();
    }

    fn call(&mut self, from: PeerId, destination: &str, member: &str, body: &[u8]) -> u64 {
        self.serial += 1;
        let header = Header {
            kind: MessageKind::MethodCall as i32,
            serial: self.serial,
            destination: destination.into(),
            member: member.into(),
            timeout_ms: 1000,
            ..Header::default()
        };
        self.send(from, header, body, Vec::new());
        self.serial
    }

    fn reply(&mut self, from: PeerId, to: PeerId, reply_serial: u64, body: &[u8]) {
        self.serial += 1;
        let header = Header {
            kind: MessageKind::MethodReturn as i32,
            serial: self.serial,
            reply_serial,
            destination: to.unique_name().into_string(),
            ..Header::default()
        };
        self.send(from, header, body, Vec::new());
    }

    fn request_name(&mut self, peer: PeerId, name: &str, flags: u32) -> RequestNameResult {
        let body = RequestNameRequest {
            name: name.into(),
            flags,
        }
        .encode_to_vec();
        let serial = self.call(peer, BUS_NAME, "RequestName", &body);
        let frames = self.drain(peer);
        let reply = frames
            .iter()
            .find(|f| f.header.reply_serial == serial)
            .expect("RequestName answered");
        assert_eq!(
            reply.header.kind,
            MessageKind::MethodReturn as i32,
            "{:?}",
            reply.header.error
        );
        RequestNameReply::decode(reply.body.as_slice())
            .unwrap()
            .result()
    }

    fn add_match(&mut self, peer: PeerId, rule: MatchRule) {
        let body = AddMatchRequest { rule: Some(rule) }.encode_to_vec();
        let serial = self.call(peer, BUS_NAME, "AddMatch", &body);
        let frames = self.drain(peer);
        assert!(frames.iter().any(|f| f.header.reply_serial == serial
            && f.header.kind == MessageKind::MethodReturn as i32));
    }
}

fn error_code(frame: &Out) -> ErrorCode {
    assert_eq!(
        frame.header.kind,
        MessageKind::Error as i32,
        "{:?}",
        frame.header
    );
    ErrorCode::try_from(frame.header.error.as_ref().unwrap().code).unwrap()
}

#[test]
fn wrong_protocol_version_is_refused() {
    let mut h = Harness::new();
    let hello = Hello {
        protocol_version: 99,
        ..Hello::default()
    };
    let error = h
        .bus
        .add_peer(
            (),
            Harness::identity(0, 1),
            &hello,
            std::time::SystemTime::UNIX_EPOCH,
        )
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::HandshakeFailed);
    assert_eq!(h.bus.peer_count(), 0);
}

#[test]
fn call_and_reply_are_routed_and_stamped() {
    let mut h = Harness::new();
    let service = h.connect(1000, 100);
    let client = h.connect(1000, 200);
    assert_eq!(
        h.request_name(service, "org.example.S", 0),
        RequestNameResult::PrimaryOwner
    );
    // The client claims to be someone else; the bus overwrites it all.
    h.serial += 1;
    let forged = Header {
        kind: MessageKind::MethodCall as i32,
        serial: h.serial,
        destination: "org.example.S".into(),
        member: "Do".into(),
        sender: Some(SenderInfo {
            unique_name: ":1.999".into(),
            uid: 0,
            gid: 0,
            pid: 1,
            groups: vec![0],
            label: Some("forged".into()),
            container: Some(ContainerInfo {
                runtime: 2,
                id: "f".repeat(64),
                pod_uid: String::new(),
            }),
        }),
        ..Header::default()
    };
    h.send(client, forged, b"request", Vec::new());
    let delivered = h.drain(service);
    assert_eq!(delivered.len(), 1);
    let sender = delivered[0].header.sender.clone().unwrap();
    assert_eq!(sender.unique_name, client.unique_name().as_str());
    assert_eq!((sender.uid, sender.gid, sender.pid), (1000, 1000, 200));
    assert_eq!(sender.groups, vec![1000, 10]);
    assert_eq!(sender.label, None);
    assert_eq!(sender.container.unwrap().runtime, 0);
    assert_eq!(delivered[0].body, b"request");
    let serial = delivered[0].header.serial;
    h.reply(service, client, serial, b"answer");
    let answer = h.drain(client);
    assert_eq!(answer[0].header.kind, MessageKind::MethodReturn as i32);
    assert_eq!(answer[0].header.reply_serial, serial);
    assert_eq!(answer[0].body, b"answer");
    assert_eq!(answer[0].header.sender.as_ref().unwrap().pid, 100);
    // A second reply answers nothing.
    h.reply(service, client, serial, b"again");
    assert!(h.drain(client).is_empty());
    assert_eq!(error_code(&h.drain(service)[0]), ErrorCode::UnexpectedReply);
}

#[test]
fn spoofed_reply_from_a_third_peer_is_refused() {
    let mut h = Harness::new();
    let service = h.connect(1000, 1);
    let client = h.connect(1000, 2);
    let spoofer = h.connect(1000, 3);
    let serial = h.call(client, &service.unique_name().into_string(), "Do", b"");
    h.drain(service);
    h.reply(spoofer, client, serial, b"fake");
    assert!(
        h.drain(client).is_empty(),
        "the client must not see the spoofed reply"
    );
    assert_eq!(error_code(&h.drain(spoofer)[0]), ErrorCode::UnexpectedReply);
    h.reply(service, client, serial, b"real");
    assert_eq!(h.drain(client)[0].body, b"real");
}

#[test]
fn missing_destinations_are_errors() {
    let mut h = Harness::new();
    let client = h.connect(1000, 2);
    h.call(client, "org.example.Nobody", "Do", b"");
    assert_eq!(error_code(&h.drain(client)[0]), ErrorCode::NameHasNoOwner);
    h.call(client, ":1.4242", "Do", b"");
    assert_eq!(error_code(&h.drain(client)[0]), ErrorCode::NoSuchPeer);
    h.call(client, BUS_NAME, "NoSuchMethod", b"");
    assert_eq!(error_code(&h.drain(client)[0]), ErrorCode::UnknownMethod);
    h.call(client, "org.example.Nobody", "bad member!", b"");
    assert_eq!(error_code(&h.drain(client)[0]), ErrorCode::InvalidArgs);
}

#[test]
fn timeouts_fail_the_call_and_late_replies_are_refused() {
    let mut h = Harness::new();
    let service = h.connect(1000, 1);
    let client = h.connect(1000, 2);
    let serial = h.call(client, &service.unique_name().into_string(), "Slow", b"");
    h.drain(service);
    assert_eq!(h.bus.poll_timeout(), h.now + Duration::from_millis(1000));
    // A later deadline leaves the timeout where it is.
    h.now += Duration::from_millis(10);
    let second = h.call(client, &service.unique_name().into_string(), "Slow", b"");
    h.now -= Duration::from_millis(10);
    assert_eq!(h.bus.poll_timeout(), h.now + Duration::from_millis(1000));
    h.bus
        .handle_timeout(h.now + Duration::from_millis(999), |_| Ok(0));
    assert!(h.drain(client).is_empty());
    h.bus
        .handle_timeout(h.now + Duration::from_millis(1000), |_| Ok(0));
    let timeout = h.drain(client);
    assert_eq!(timeout.len(), 1);
    assert_eq!(timeout[0].header.reply_serial, serial);
    assert_eq!(error_code(&timeout[0]), ErrorCode::Timeout);
    assert_eq!(h.bus.poll_timeout(), h.now + Duration::from_millis(1010));
    h.bus
        .handle_timeout(h.now + Duration::from_millis(1010), |_| Ok(0));
    assert_eq!(h.drain(client)[0].header.reply_serial, second);
    h.drain(service);
    h.reply(service, client, serial, b"late");
    assert!(h.drain(client).is_empty());
    assert_eq!(error_code(&h.drain(service)[0]), ErrorCode::UnexpectedReply);
}

#[test]
fn disconnect_fails_owed_calls_and_promotes_queued_owners() {
    let mut h = Harness::new();
    let first = h.connect(1000, 1);
    let second = h.connect(1000, 2);
    let client = h.connect(1000, 3);
    let watcher = h.connect(1000, 4);
    h.add_match(
        watcher,
        MatchRule {
            member: "NameOwnerChanged".into(),
            ..MatchRule::default()
        },
    );
    assert_eq!(
        h.request_name(first, "org.example.N", 0),
        RequestNameResult::PrimaryOwner
    );
    assert_eq!(
        h.request_name(second, "org.example.N", 0),
        RequestNameResult::InQueue
    );
    let serial = h.call(client, "org.example.N", "Do", b"");
    h.drain(first);
    h.drain(watcher);
    h.bus.remove_peer(first);
    let failed = h.drain(client);
    assert_eq!(failed[0].header.reply_serial, serial);
    assert_eq!(error_code(&failed[0]), ErrorCode::NoReply);
    let acquired = h.drain(second);
    assert_eq!(acquired[0].header.member, "NameAcquired");
    let changes: Vec<Vec<String>> = h
        .drain(watcher)
        .into_iter()
        .map(|f| f.header.args)
        .collect();
    let first_name = first.unique_name().into_string();
    let second_name = second.unique_name().into_string();
    assert!(changes.contains(&vec![
        "org.example.N".into(),
        first_name.clone(),
        second_name
    ]));
    assert!(changes.contains(&vec![first_name.clone(), first_name, String::new()]));
    // Calls now reach the new owner.
    h.call(client, "org.example.N", "Do", b"");
    assert_eq!(h.drain(second)[0].header.member, "Do");
}

#[test]
fn full_receiver_queue_is_an_error_for_the_sender_and_fatal_for_a_caller_that_does_not_read() {
    let limits = Limits {
        max_queued_messages_per_receiver: 4,
        ..Limits::default()
    };
    let mut h = Harness::with_limits(limits);
    let slow = h.connect(1000, 1);
    let sender = h.connect(1000, 2);
    let slow_name = slow.unique_name().into_string();
    let mut refused = Vec::new();
    for _ in 0..6 {
        let serial = h.call(sender, &slow_name, "Do", b"");
        refused.push(serial);
    }
    let errors: Vec<Out> = h.drain(sender);
    assert_eq!(errors.len(), 2, "the 5th and 6th calls are refused");
    for error in &errors {
        assert_eq!(error_code(error), ErrorCode::ReceiverQueueFull);
        assert_eq!(
            error.header.error.as_ref().unwrap().detail,
            "max_queued_messages_per_receiver"
        );
    }
    // Now the sender stops reading and the slow peer answers everything.
    let calls = h.drain(slow);
    for _ in 0..4 {
        h.call(slow, &sender.unique_name().into_string(), "Fill", b"");
    }
    for call in &calls {
        h.reply(slow, sender, call.header.serial, b"");
    }
    assert!(
        h.bus.is_doomed(sender),
        "a caller whose queue is full of its own replies goes"
    );
    let mut closed = Vec::new();
    while let Some(action) = h.bus.poll_action() {
        if let super::Action::Close(id) = action {
            closed.push(id);
        }
    }
    assert_eq!(closed, vec![sender]);
}

#[test]
fn pending_call_limit_names_the_limit() {
    let limits = Limits {
        max_pending_calls_per_connection: 2,
        ..Limits::default()
    };
    let mut h = Harness::with_limits(limits);
    let service = h.connect(1000, 1);
    let client = h.connect(1000, 2);
    let name = service.unique_name().into_string();
    h.call(client, &name, "A", b"");
    h.call(client, &name, "B", b"");
    assert!(h.drain(client).is_empty());
    h.call(client, &name, "C", b"");
    let error = &h.drain(client)[0];
    assert_eq!(error_code(error), ErrorCode::LimitsExceeded);
    assert_eq!(
        error.header.error.as_ref().unwrap().detail,
        "max_pending_calls_per_connection"
    );
    // No-reply calls are not tracked, so they are not limited.
    h.serial += 1;
    let header = Header {
        kind: MessageKind::MethodCall as i32,
        serial: h.serial,
        destination: name,
        member: "D".into(),
        flags: HeaderFlag::NoReplyExpected as u32,
        ..Header::default()
    };
    h.send(client, header, b"", Vec::new());
    assert!(h.drain(client).is_empty());
    assert_eq!(h.drain(service).len(), 3);
}

#[test]
fn broadcasts_reach_each_matching_subscriber_once() {
    let mut h = Harness::new();
    let emitter = h.connect(1000, 1);
    let both = h.connect(1000, 2);
    let member_only = h.connect(1000, 3);
    let other = h.connect(1000, 4);
    h.add_match(
        both,
        MatchRule {
            member: "Changed".into(),
            ..MatchRule::default()
        },
    );
    h.add_match(
        both,
        MatchRule {
            path: "/a".into(),
            ..MatchRule::default()
        },
    );
    h.add_match(
        member_only,
        MatchRule {
            member: "Changed".into(),
            args: vec![pbus_proto::v1::ArgMatch {
                index: 0,
                value: "x".into(),
            }],
            ..MatchRule::default()
        },
    );
    h.add_match(
        other,
        MatchRule {
            member: "Other".into(),
            ..MatchRule::default()
        },
    );
    h.serial += 1;
    let signal = Header {
        kind: MessageKind::Signal as i32,
        serial: h.serial,
        path: "/a".into(),
        member: "Changed".into(),
        args: vec!["y".into()],
        ..Header::default()
    };
    h.send(emitter, signal, b"payload", Vec::new());
    let got = h.drain(both);
    assert_eq!(got.len(), 1, "two matching rules, one copy");
    assert_eq!(
        got[0].header.sender.as_ref().unwrap().unique_name,
        emitter.unique_name().as_str()
    );
    assert!(h.drain(member_only).is_empty(), "arg0 differs");
    assert!(h.drain(other).is_empty());
    assert!(h.drain(emitter).is_empty());
}

#[test]
fn broadcast_signals_refuse_plain_fds() {
    let mut h = Harness::new();
    let emitter = h.connect(1000, 1);
    h.serial += 1;
    let signal = Header {
        kind: MessageKind::Signal as i32,
        serial: h.serial,
        member: "WithFd".into(),
        ..Header::default()
    };
    let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    h.send(emitter, signal, b"", vec![fd]);
    assert_eq!(error_code(&h.drain(emitter)[0]), ErrorCode::FdsNotSupported);
}

#[test]
fn per_connection_name_and_match_limits() {
    let limits = Limits {
        max_names_per_connection: 2,
        max_matches_per_connection: 1,
        ..Limits::default()
    };
    let mut h = Harness::with_limits(limits);
    let peer = h.connect(1000, 1);
    assert_eq!(
        h.request_name(peer, "org.example.A", 0),
        RequestNameResult::PrimaryOwner
    );
    assert_eq!(
        h.request_name(peer, "org.example.B", 0),
        RequestNameResult::PrimaryOwner
    );
    let body = RequestNameRequest {
        name: "org.example.C".into(),
        flags: 0,
    }
    .encode_to_vec();
    h.call(peer, BUS_NAME, "RequestName", &body);
    let error = &h.drain(peer)[0];
    assert_eq!(
        error.header.error.as_ref().unwrap().detail,
        "max_names_per_connection"
    );
    // Asking again for a name already held is not a new name.
    assert_eq!(
        h.request_name(peer, "org.example.A", 0),
        RequestNameResult::AlreadyOwner
    );
    h.add_match(peer, MatchRule::default());
    let body = AddMatchRequest {
        rule: Some(MatchRule {
            member: "X".into(),
            ..MatchRule::default()
        }),
    }
    .encode_to_vec();
    h.call(peer, BUS_NAME, "AddMatch", &body);
    let error = &h.drain(peer)[0];
    assert_eq!(
        error.header.error.as_ref().unwrap().detail,
        "max_matches_per_connection"
    );
}

#[test]
fn connection_limits_per_uid() {
    let limits = Limits {
        max_connections_per_uid: 2,
        ..Limits::default()
    };
    let mut h = Harness::with_limits(limits);
    h.connect(1000, 1);
    let second = h.connect(1000, 2);
    assert_eq!(
        h.bus.admit(1000).unwrap_err().to_wire().detail,
        "max_connections_per_uid"
    );
    assert!(h.bus.admit(1001).is_ok());
    h.bus.remove_peer(second);
    assert!(h.bus.admit(1000).is_ok());
}

#[test]
fn a_flooding_uid_cannot_starve_another_at_the_same_receiver() {
    let limits = Limits {
        max_queued_messages_per_receiver: 100,
        ..Limits::default()
    };
    let mut h = Harness::with_limits(limits);
    let receiver = h.connect(1000, 1);
    // The built-in policy lets other uids talk to uid 1000 only if they
    // are root, so root is the foreign uid here. (Shares among several
    // foreign uids are covered by the FairPool tests.)
    let root_flooder = h.connect(0, 4);
    let mut delivered = 0;
    let mut first_refusal = None;
    for _ in 0..100 {
        h.call(
            root_flooder,
            &receiver.unique_name().into_string(),
            "Flood",
            b"",
        );
        let errors = h.drain(root_flooder);
        if let Some(error) = errors.first() {
            first_refusal.get_or_insert_with(|| error.header.error.clone().unwrap());
        } else {
            delivered += 1;
        }
    }
    // A lone foreign uid gets at most half of the queue...
    assert_eq!(delivered, 50);
    let refusal = first_refusal.expect("the flood was refused at some point");
    assert_eq!(refusal.code, ErrorCode::ReceiverQueueFull as i32);
    assert_eq!(refusal.detail, "max_queued_messages_per_receiver");
    assert!(
        refusal.message.contains("fair share"),
        "{}",
        refusal.message
    );
    // ...and the receiver's own uid can still use the rest.
    let same_uid = h.connect(1000, 6);
    for _ in 0..50 {
        h.call(same_uid, &receiver.unique_name().into_string(), "Mine", b"");
    }
    assert!(
        h.drain(same_uid).is_empty(),
        "the receiver's own uid is not limited by the share"
    );
    h.call(
        same_uid,
        &receiver.unique_name().into_string(),
        "Overflow",
        b"",
    );
    let full = h.drain(same_uid);
    assert!(full[0]
        .header
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("is full"));
}

#[test]
fn a_monitor_that_loses_the_right_on_reload_stops_eavesdropping() {
    let mut h = Harness::new();
    let monitor = h.connect(0, 1);
    let caller = h.connect(1000, 2);
    let callee = h.connect(1000, 3);
    h.add_match(
        monitor,
        MatchRule {
            eavesdrop: true,
            ..MatchRule::default()
        },
    );
    h.call(caller, &callee.unique_name().into_string(), "Watched", b"");
    let copies = h.drain(monitor);
    assert_eq!(copies.len(), 1);
    assert_ne!(copies[0].header.flags & HeaderFlag::MonitorCopy as u32, 0);
    h.drain(callee);
    let no_monitor = Policy::parse(
        "builtin = false\n[[rule]]\nallow = [\"own\", \"see\", \"talk\", \"receive\"]\nsubject = { anyone = true }\n",
        "test.toml",
    )
    .unwrap();
    h.bus.set_policy(no_monitor);
    h.call(
        caller,
        &callee.unique_name().into_string(),
        "Unwatched",
        b"",
    );
    assert_eq!(h.drain(callee).len(), 1);
    assert!(
        h.drain(monitor).is_empty(),
        "the copy went to a monitor without the right"
    );
}

#[test]
fn peers_cannot_pass_frames_off_as_monitor_copies() {
    let mut h = Harness::new();
    let sender = h.connect(1000, 1);
    let receiver = h.connect(1000, 2);
    h.serial += 1;
    let header = Header {
        kind: MessageKind::Signal as i32,
        serial: h.serial,
        destination: receiver.unique_name().into_string(),
        member: "Fake".into(),
        flags: HeaderFlag::MonitorCopy as u32,
        ..Header::default()
    };
    h.send(sender, header, b"", Vec::new());
    assert!(h.drain(receiver).is_empty());
    assert_eq!(error_code(&h.drain(sender)[0]), ErrorCode::InvalidArgs);
}

/// A unicast signal from `from` to `to` carrying `count` fds of /dev/null.
fn signal_with_fds(h: &mut Harness, from: PeerId, to: PeerId, count: usize) -> u64 {
    h.serial += 1;
    let signal = Header {
        kind: MessageKind::Signal as i32,
        serial: h.serial,
        destination: to.unique_name().into_string(),
        path: "/fds".into(),
        member: "Fds".into(),
        ..Header::default()
    };
    let fds = (0..count)
        .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
        .collect();
    h.send(from, signal, b"", fds);
    h.serial
}

/// Flushes `peer` with a socket that takes everything and reports
/// `unread` bytes not read yet; returns the fds written.
fn flush_unread(h: &mut Harness, peer: PeerId, unread: usize) -> usize {
    let mut fds_written = 0;
    h.bus
        .flush_peer(
            peer,
            |_, data, fds| {
                fds_written += fds.len();
                Ok(data.len())
            },
            |_| Ok(unread),
        )
        .unwrap();
    fds_written
}

#[test]
fn a_receiver_has_one_frame_of_fds_in_flight_until_it_reads() {
    let mut h = Harness::new();
    let sender = h.connect(2000, 1);
    let receiver = h.connect(2000, 2);
    signal_with_fds(&mut h, sender, receiver, 3);
    signal_with_fds(&mut h, sender, receiver, 4);
    assert_eq!(flush_unread(&mut h, receiver, 100), 3);
    assert!(h.bus.has_fds_in_flight(receiver));
    assert_eq!(h.bus.in_flight_pool().share_of(2000), 3);
    // Not read yet: the second frame waits.
    assert_eq!(flush_unread(&mut h, receiver, 100), 0);
    // Read: the first frame's fds leave flight, the second goes.
    assert_eq!(flush_unread(&mut h, receiver, 0), 4);
    assert_eq!(h.bus.in_flight_pool().share_of(2000), 4);
    assert_eq!(flush_unread(&mut h, receiver, 0), 0);
    assert!(!h.bus.has_fds_in_flight(receiver));
    assert_eq!(h.bus.in_flight_pool().used(), 0);
}

#[test]
fn fds_over_a_senders_in_flight_share_are_refused_to_the_sender_not_the_receiver() {
    let now = Instant::now();
    let mut h = Harness {
        bus: Bus::new(
            Limits::default(),
            PolicyLayers::global(Policy::builtin()),
            "test-bus".into(),
            daemon_facts(),
            FdBudgets {
                held: 1 << 20,
                in_flight: 16,
            },
            Box::new(SystemFdProbe),
            now,
        ),
        now,
        serial: 0,
    };
    let flooder = h.connect(2000, 1);
    let sinks: Vec<PeerId> = (0..3).map(|pid| h.connect(2000, 10 + pid)).collect();
    let honest = h.connect(3000, 20);
    let honest_sink = h.connect(3000, 21);
    for sink in &sinks {
        signal_with_fds(&mut h, flooder, *sink, 6);
        // The sinks never read.
        flush_unread(&mut h, *sink, 1);
    }
    // Uid 2000 got one frame out (6 of 16), the others were refused to it.
    assert_eq!(h.bus.in_flight_pool().share_of(2000), 6);
    let refusals: Vec<Out> = h
        .drain(flooder)
        .into_iter()
        .filter(|out| out.header.kind == MessageKind::Error as i32)
        .collect();
    assert_eq!(refusals.len(), 2);
    assert_eq!(error_code(&refusals[0]), ErrorCode::LimitsExceeded);
    assert_eq!(
        refusals[0].header.error.as_ref().unwrap().detail,
        "max_fds_in_flight"
    );
    // The sinks stay connected; another uid still passes its fds.
    assert!(sinks.iter().all(|sink| !h.bus.is_doomed(*sink)));
    signal_with_fds(&mut h, honest, honest_sink, 2);
    assert_eq!(flush_unread(&mut h, honest_sink, 1), 2);
}

#[test]
fn a_queue_holding_fds_without_progress_is_disconnected_after_the_timeout() {
    let limits = Limits {
        pending_fd_timeout_ms: 1000,
        ..Limits::default()
    };
    let mut h = Harness::with_limits(limits);
    let sender = h.connect(1000, 1);
    let stuck = h.connect(1000, 2);
    let reading = h.connect(1000, 3);
    signal_with_fds(&mut h, sender, stuck, 1);
    signal_with_fds(&mut h, sender, reading, 1);
    // `stuck`'s socket takes nothing; `reading` reads what it gets.
    h.bus
        .flush_peer(
            stuck,
            |_, _, _| Err(io::Error::from(io::ErrorKind::WouldBlock)),
            |_| Ok(0),
        )
        .unwrap();
    flush_unread(&mut h, reading, 0);
    let start = h.now;
    assert_eq!(h.bus.sweep_stalled_fds(start, |_| Ok(0)), 0);
    assert_eq!(
        h.bus
            .sweep_stalled_fds(start + Duration::from_millis(500), |_| Ok(0)),
        0
    );
    assert_eq!(
        h.bus
            .sweep_stalled_fds(start + Duration::from_millis(1000), |_| Ok(0)),
        1
    );
    assert!(h.bus.is_doomed(stuck));
    assert!(!h.bus.is_doomed(reading));
}

#[test]
fn fds_of_an_unfinished_frame_time_out_too() {
    let limits = Limits {
        pending_fd_timeout_ms: 1000,
        ..Limits::default()
    };
    let mut h = Harness::with_limits(limits);
    let peer = h.connect(1000, 1);
    let start = h.now;
    h.bus.set_partial_frame_fds(peer, 2);
    assert_eq!(h.bus.sweep_stalled_fds(start, |_| Ok(0)), 0);
    // Finished in time: forgotten.
    h.bus.set_partial_frame_fds(peer, 0);
    assert_eq!(
        h.bus
            .sweep_stalled_fds(start + Duration::from_millis(900), |_| Ok(0)),
        0
    );
    h.bus.set_partial_frame_fds(peer, 1);
    assert_eq!(
        h.bus
            .sweep_stalled_fds(start + Duration::from_millis(1000), |_| Ok(0)),
        0
    );
    assert_eq!(
        h.bus
            .sweep_stalled_fds(start + Duration::from_millis(2000), |_| Ok(0)),
        1
    );
    assert!(h.bus.is_doomed(peer));
}

/// The error info of the frame answering `serial` among `frames`.
fn answer_to(frames: &[Out], serial: u64) -> &Out {
    frames
        .iter()
        .find(|frame| frame.header.reply_serial == serial)
        .unwrap_or_else(|| panic!("nothing answered serial {serial}: {frames:?}"))
}

fn assert_receive_only(frames: &[Out], serial: u64, what: &str) {
    let answer = answer_to(frames, serial);
    assert_eq!(error_code(answer), ErrorCode::AccessDenied, "{what}");
    let error = answer.header.error.as_ref().unwrap();
    assert_eq!(
        error.detail,
        pbus_proto::errors::DETAIL_RECEIVE_ONLY,
        "{what}: {error:?}"
    );
}

fn eavesdrop_all() -> MatchRule {
    MatchRule {
        eavesdrop: true,
        ..MatchRule::default()
    }
}

#[test]
fn a_monitor_sends_nothing_but_bus_calls_and_keeps_receiving_copies() {
    let mut h = Harness::new();
    let monitor = h.connect(0, 1);
    let service = h.connect(1000, 2);
    let caller = h.connect(1000, 3);
    let subscriber = h.connect(1000, 4);
    assert_eq!(
        h.request_name(service, "org.example.S", 0),
        RequestNameResult::PrimaryOwner
    );
    h.add_match(subscriber, MatchRule::default());
    h.add_match(monitor, eavesdrop_all());
    h.drain(subscriber);

    let body = RequestNameRequest {
        name: "org.example.M".into(),
        flags: 0,
    }
    .encode_to_vec();
    let serial = h.call(monitor, BUS_NAME, "RequestName", &body);
    assert_receive_only(&h.drain(monitor), serial, "RequestName");
    assert!(h.bus.peer(service).is_some());

    let serial = h.call(monitor, "org.example.S", "Do", b"");
    assert_receive_only(&h.drain(monitor), serial, "a call");
    let signal = |h: &mut Harness, destination: &str| {
        h.serial += 1;
        let header = Header {
            kind: MessageKind::Signal as i32,
            serial: h.serial,
            destination: destination.into(),
            path: "/p".into(),
            member: "Sig".into(),
            ..Header::default()
        };
        h.send(monitor, header, b"", Vec::new());
        h.serial
    };
    let serial = signal(&mut h, "");
    assert_receive_only(&h.drain(monitor), serial, "a broadcast");
    let serial = signal(&mut h, "org.example.S");
    assert_receive_only(&h.drain(monitor), serial, "a unicast signal");
    assert!(h.drain(service).is_empty(), "the service got something");
    assert!(
        h.drain(subscriber).is_empty(),
        "the subscriber got the broadcast"
    );

    // Others' traffic is still copied to it, and it answers nothing.
    let serial = h.call(caller, "org.example.S", "Watched", b"");
    let copies = h.drain(monitor);
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(copies[0].header.member, "Watched");
    let delivered = h.drain(service);
    assert_eq!(delivered.len(), 1);
    let callee_serial = delivered[0].header.serial;
    h.reply(monitor, caller, serial, b"spoof");
    assert_receive_only(&h.drain(monitor), h.serial, "a reply");
    assert!(h.drain(caller).is_empty());
    h.reply(service, caller, callee_serial, b"real");
    assert_eq!(h.drain(caller)[0].body, b"real");

    // Nobody may call it (here: root, who may see it): it could not answer.
    let root = h.connect(0, 5);
    let serial = h.call(root, &monitor.unique_name().into_string(), "Do", b"");
    assert_receive_only(&h.drain(root), serial, "a call to the monitor");
    assert!(h
        .drain(monitor)
        .iter()
        .all(|frame| frame.header.flags & HeaderFlag::MonitorCopy as u32 != 0));

    // More rules of both kinds are fine; dropping every eavesdropping rule
    // does not make it a normal peer again.
    h.add_match(monitor, MatchRule::default());
    let rule = pbus_proto::v1::RemoveMatchRequest {
        rule: Some(eavesdrop_all()),
    };
    let serial = h.call(monitor, BUS_NAME, "RemoveMatch", &rule.encode_to_vec());
    let answer = h.drain(monitor);
    assert_eq!(
        answer_to(&answer, serial).header.kind,
        MessageKind::MethodReturn as i32
    );
    let serial = h.call(monitor, "org.example.S", "Do", b"");
    assert_receive_only(&h.drain(monitor), serial, "a call after RemoveMatch");
    assert!(h.bus.peer(monitor).is_some());
    assert!(!h.bus.is_doomed(monitor));
}

#[test]
fn a_peer_in_traffic_of_its_own_cannot_become_a_monitor() {
    let mut h = Harness::new();
    let try_eavesdrop = |h: &mut Harness, peer: PeerId| -> Vec<Out> {
        let body = AddMatchRequest {
            rule: Some(eavesdrop_all()),
        }
        .encode_to_vec();
        let serial = h.call(peer, BUS_NAME, "AddMatch", &body);
        let frames = h.drain(peer);
        assert_eq!(
            error_code(answer_to(&frames, serial)),
            ErrorCode::AccessDenied
        );
        frames
    };
    let owner = h.connect(0, 1);
    let queued = h.connect(0, 2);
    assert_eq!(
        h.request_name(owner, "org.example.N", 0),
        RequestNameResult::PrimaryOwner
    );
    assert_eq!(
        h.request_name(queued, "org.example.N", 0),
        RequestNameResult::InQueue
    );
    for (peer, what) in [(owner, "owner"), (queued, "queued")] {
        let frames = try_eavesdrop(&mut h, peer);
        let error = frames[0].header.error.as_ref().unwrap();
        assert_eq!(error.detail, "monitor", "{what}");
        assert!(error.message.contains("org.example.N"), "{what}: {error:?}");
    }

    // A caller waiting for a reply, and the callee owing it.
    let caller = h.connect(0, 3);
    let callee = h.connect(0, 4);
    h.call(caller, &callee.unique_name().into_string(), "Slow", b"");
    let call = h.drain(callee);
    let error = &try_eavesdrop(&mut h, caller)[0];
    assert!(error
        .header
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("waiting"));
    let error = &try_eavesdrop(&mut h, callee)[0];
    assert!(error
        .header
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("answer"));
    // Once the call is answered both may.
    h.reply(callee, caller, call[0].header.serial, b"");
    h.drain(caller);
    h.add_match(caller, eavesdrop_all());
    h.add_match(callee, eavesdrop_all());
    // Refused attempts left the others normal peers.
    assert_eq!(
        h.request_name(owner, "org.example.Other", 0),
        RequestNameResult::PrimaryOwner
    );
}

#[test]
fn a_monitor_with_a_plain_and_an_eavesdropping_rule_gets_each_broadcast_once() {
    let mut h = Harness::new();
    let monitor = h.connect(0, 1);
    let emitter = h.connect(0, 2);
    h.add_match(monitor, MatchRule::default());
    h.add_match(monitor, eavesdrop_all());
    h.serial += 1;
    let header = Header {
        kind: MessageKind::Signal as i32,
        serial: h.serial,
        path: "/p".into(),
        member: "Tick".into(),
        ..Header::default()
    };
    h.send(emitter, header, b"", Vec::new());
    assert_eq!(
        h.request_name(emitter, "org.example.Once", 0),
        RequestNameResult::PrimaryOwner
    );
    let frames = h.drain(monitor);
    let members: Vec<&str> = frames.iter().map(|f| f.header.member.as_str()).collect();
    // The RequestName call to the bus is no unicast between peers: no copy.
    assert_eq!(members, ["Tick", "NameOwnerChanged"], "{frames:?}");
    assert!(frames
        .iter()
        .all(|f| f.header.flags & HeaderFlag::MonitorCopy as u32 == 0));
}

/// The cross-container takeover, in the core: a container's claim of a
/// host-owned name neither queues nor fails, and when the host owner goes,
/// host calls to the name fail instead of reaching the container.
#[test]
fn a_container_claim_never_takes_a_host_name_over() {
    use super::names::flags::DO_NOT_QUEUE;
    let mut h = Harness::new();
    let host_service = h.connect(0, 1);
    let host_root = h.connect(0, 2);
    let boxed = h.connect_in_container("a", 3);
    let boxed_client = h.connect_in_container("a", 4);
    const N: &str = "org.example.Echo";
    assert_eq!(
        h.request_name(host_service, N, 0),
        RequestNameResult::PrimaryOwner
    );
    assert_eq!(
        h.request_name(boxed, N, DO_NOT_QUEUE),
        RequestNameResult::PrimaryOwner
    );
    h.drain(host_service);
    h.call(host_root, N, "Do", b"for the host");
    assert_eq!(h.drain(host_service)[0].body, b"for the host");
    h.call(boxed_client, N, "Do", b"for the box");
    assert_eq!(h.drain(boxed)[0].body, b"for the box");

    h.bus.remove_peer(host_service);
    let serial = h.call(host_root, N, "Do", b"secret");
    // (The call the old service never answered fails with NoReply first.)
    let answers = h.drain(host_root);
    let answer = answers
        .iter()
        .find(|frame| frame.header.reply_serial == serial)
        .expect("the call is answered");
    assert_eq!(error_code(answer), ErrorCode::NameHasNoOwner);
    assert!(
        h.drain(boxed).iter().all(|frame| frame.body != b"secret"),
        "the host's call reached the container"
    );
    // A new host service gets the name at once.
    let restarted = h.connect(0, 5);
    assert_eq!(
        h.request_name(restarted, N, DO_NOT_QUEUE),
        RequestNameResult::PrimaryOwner
    );
}

/// A match rule's well-known sender resolves as its subscriber resolves
/// names: a host subscriber's rule for a name does not match a container's
/// owner of it, a container subscriber's does.
#[test]
fn match_rule_senders_resolve_in_the_subscribers_scope() {
    let mut h = Harness::new();
    let host_watcher = h.connect(0, 1);
    let boxed_owner = h.connect_in_container("a", 2);
    let boxed_watcher = h.connect_in_container("a", 3);
    const N: &str = "org.example.Emitter";
    assert_eq!(
        h.request_name(boxed_owner, N, 0),
        RequestNameResult::PrimaryOwner
    );
    let rule = MatchRule {
        sender: N.into(),
        member: "Tick".into(),
        ..MatchRule::default()
    };
    h.add_match(host_watcher, rule.clone());
    h.add_match(boxed_watcher, rule);
    h.drain(host_watcher);
    h.drain(boxed_watcher);
    h.serial += 1;
    let signal = Header {
        kind: MessageKind::Signal as i32,
        serial: h.serial,
        path: "/t".into(),
        member: "Tick".into(),
        ..Header::default()
    };
    h.send(boxed_owner, signal, b"tick", Vec::new());
    assert!(
        h.drain(boxed_watcher)
            .iter()
            .any(|frame| frame.header.member == "Tick"),
        "the container's own subscriber matches"
    );
    assert!(
        h.drain(host_watcher)
            .iter()
            .all(|frame| frame.header.member != "Tick"),
        "a host rule for the name matched a container's owner"
    );
}

/// Scopes and their name tables go with their last peer.
#[test]
fn scopes_are_dropped_with_their_last_peer() {
    let mut h = Harness::new();
    let host = h.connect(1000, 1);
    let a = h.connect_in_container("a", 2);
    let b = h.connect_in_container("b", 3);
    for peer in [host, a, b] {
        assert_eq!(
            h.request_name(peer, "org.example.N", 0),
            RequestNameResult::PrimaryOwner
        );
    }
    assert_eq!(h.bus.scopes.len(), 3);
    assert_eq!(h.bus.names.scope_count(), 3);
    assert_ne!(
        h.bus.peer(a).unwrap().scope(),
        h.bus.peer(b).unwrap().scope()
    );
    h.bus.remove_peer(a);
    h.bus.remove_peer(b);
    assert_eq!(h.bus.scopes.len(), 1);
    assert_eq!(h.bus.names.scope_count(), 1);
    h.bus.remove_peer(host);
    assert!(h.bus.scopes.is_empty());
    assert!(h.bus.names.is_empty());
}

/// Runs the driver's side of the core until it asks for nothing: every
/// `Job` it hands out is returned, flushes and closes are ignored.
fn take_jobs(h: &mut Harness) -> Vec<(super::services::JobId, super::services::Job)> {
    let mut jobs = Vec::new();
    while let Some(action) = h.bus.poll_action() {
        if let super::Action::Job(id, job) = action {
            jobs.push((id, job));
        }
    }
    jobs
}

#[test]
fn a_policy_reload_is_a_job_answered_when_it_is_done() {
    use super::services::{Job, JobDone, JobOutput};
    let mut h = Harness::new();
    let admin = h.connect(0, 1);
    let other_admin = h.connect(0, 2);
    let body = pbus_proto::v1::ReloadPolicyRequest {}.encode_to_vec();
    let first = h.call(admin, BUS_NAME, "ReloadPolicy", &body);
    let second = h.call(other_admin, BUS_NAME, "ReloadPolicy", &body);
    // Nothing is answered on the routing thread; both wait on one job.
    assert!(h.drain(admin).is_empty());
    let jobs = take_jobs(&mut h);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].1, Job::LoadPolicy);
    assert_eq!(
        h.bus
            .handle_job_done(jobs[0].0, JobOutput::Policy(Ok(Policy::builtin()))),
        JobDone::PolicyInstalled { peers: 2 }
    );
    for (peer, serial) in [(admin, first), (other_admin, second)] {
        let answer = h.drain(peer);
        assert_eq!(answer[0].header.reply_serial, serial);
        assert_eq!(answer[0].header.kind, MessageKind::MethodReturn as i32);
    }
    // A refused load is the callers' error; the old policy stays.
    let third = h.call(admin, BUS_NAME, "ReloadPolicy", &body);
    let jobs = take_jobs(&mut h);
    assert_eq!(
        h.bus
            .handle_job_done(jobs[0].0, JobOutput::Policy(Err("bad file".into()))),
        JobDone::PolicyRefused("bad file".into())
    );
    let answer = h.drain(admin);
    assert_eq!(answer[0].header.reply_serial, third);
    assert_eq!(error_code(&answer[0]), ErrorCode::InvalidArgs);
    // A job done twice is not known any more.
    assert_eq!(
        h.bus
            .handle_job_done(jobs[0].0, JobOutput::Policy(Ok(Policy::builtin()))),
        JobDone::Unknown
    );
}

#[test]
fn each_frame_arrives_with_its_own_fds() {
    let mut h = Harness::new();
    let sender = h.connect(1000, 1);
    let receiver = h.connect(1000, 2);
    h.drain(receiver);
    let name = receiver.unique_name().into_string();
    h.call(sender, &name, "Plain", b"a");
    signal_with_fds(&mut h, sender, receiver, 2);
    h.call(sender, &name, "Plain", b"c");
    signal_with_fds(&mut h, sender, receiver, 1);
    let frames = h.drain(receiver);
    let members_and_fds: Vec<(&str, usize)> = frames
        .iter()
        .map(|frame| (frame.header.member.as_str(), frame.fds))
        .collect();
    assert_eq!(
        members_and_fds,
        [("Plain", 0), ("Fds", 2), ("Plain", 0), ("Fds", 1)]
    );
}
