//! The sender metadata the bus stamps on every message is the kernel's view
//! of the sender and cannot be forged.
//!
//! A client in a child process (the `pbus-test-peer` helper) calls a
//! service in the test process, which compares the stamped uid, gid, pid
//! and groups with the child's real ones (its pid, `/proc/PID/status`).
//! The same under another gid and supplementary groups, and under uid
//! 65534 with the default policy: root may call the 65534 peer and get its
//! reply (replies are not policy-checked), the 65534 peer may not call a
//! root-owned name (AccessDenied, detail `talk`). A raw client that fills
//! every SenderInfo field with lies in calls, signals and replies is
//! stamped with its real identity anyway. GetPeerIdentity agrees with the
//! stamps.
#![forbid(unsafe_code)]

use std::process::Command;

use pbus::{Connection, MatchRule, Outgoing, SenderInfo};
use pbus_proto::v1::{ContainerInfo, ContainerRuntime, ErrorCode, Header, MessageKind};
use pbus_tests::containers::who_am_i;
use pbus_tests::frames::{call_header, reply_header, signal_header};
use pbus_tests::messages::Text;
use pbus_tests::{expect_signal, proc_status, require_root, within, PeerProcess, TestBus, TIMEOUT};
use prost::{Message, Name};
use tokio::sync::mpsc;

const SERVICE: &str = "org.pbus.test.Metadata";
const PEER_BIN: &str = env!("CARGO_BIN_EXE_pbus-test-peer");

/// A connection owning `SERVICE` whose `Report` method records who called.
async fn report_service(bus: &TestBus) -> (Connection, mpsc::UnboundedReceiver<SenderInfo>) {
    let service = bus.connect_owning(SERVICE).await;
    let (tx, rx) = mpsc::unbounded_channel();
    service
        .serve("Report", move |request: Text, call: pbus::MethodCall| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(call.incoming.sender().clone());
                Ok(Text::new(format!("seen {}", request.text)))
            }
        })
        .unwrap();
    (service, rx)
}

/// Asserts that `stamped` is the real identity of process `pid` named
/// `unique_name`, as the kernel reports it now.
fn assert_stamp_is_real(stamped: &SenderInfo, pid: u32, unique_name: &str) {
    let real = proc_status(pid);
    assert_eq!(stamped.unique_name, unique_name);
    assert_eq!(stamped.pid, pid, "pid");
    assert_eq!(stamped.uid, real.uid, "uid");
    assert_eq!(stamped.gid, real.gid, "gid");
    let mut groups = stamped.groups.clone();
    groups.sort_unstable();
    assert_eq!(groups, real.groups, "groups");
}

/// Checks GetPeerIdentity of `unique_name` against the same kernel view.
async fn assert_peer_identity_is_real(asker: &Connection, unique_name: &str, pid: u32) {
    let identity = asker.peer_identity(unique_name).await.unwrap();
    let real = proc_status(pid);
    assert_eq!(identity.unique_name, unique_name);
    assert_eq!(identity.pid, pid);
    assert_eq!(identity.uid, real.uid);
    assert_eq!(identity.gid, real.gid);
    let mut groups = identity.groups.clone();
    groups.sort_unstable();
    assert_eq!(groups, real.groups);
}

/// The helper's arguments (after the socket) to call `SERVICE.Report`.
const CALL_REPORT: [&str; 4] = ["call", SERVICE, "Report", "hello"];

/// Waits for `child` (the helper as [`CALL_REPORT`] asks, through setpriv
/// or not) to call; returns it, its unique name and its result line.
async fn run_caller(mut child: PeerProcess) -> (PeerProcess, String, String) {
    let unique_name = child.expect_line("connected", TIMEOUT).await;
    let result = child.next_line(TIMEOUT).await;
    (child, unique_name, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process_identity_is_stamped_from_the_kernel() {
    let bus = TestBus::start();
    let (service, mut seen) = report_service(&bus).await;
    let mut command = Command::new(PEER_BIN);
    command.arg(bus.socket_path()).args(CALL_REPORT);
    let (mut child, unique_name, result) = run_caller(PeerProcess::spawn(command)).await;
    assert_eq!(result, "ok seen hello");
    let stamped = within("the call", TIMEOUT, seen.recv()).await.unwrap();
    assert_stamp_is_real(&stamped, child.pid(), &unique_name);
    assert_ne!(stamped.pid, std::process::id(), "the child, not us");
    assert_peer_identity_is_real(&service, &unique_name, child.pid()).await;
    assert!(child.finish(TIMEOUT).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_gid_and_groups_are_stamped() {
    if !require_root("running a child with another gid and groups") {
        return;
    }
    let bus = TestBus::start();
    let (service, mut seen) = report_service(&bus).await;
    let mut command = Command::new("setpriv");
    command
        .args(["--regid=4321", "--groups=7,8,4321", PEER_BIN])
        .arg(bus.socket_path())
        .args(CALL_REPORT);
    let (mut child, unique_name, result) = run_caller(PeerProcess::spawn(command)).await;
    assert_eq!(result, "ok seen hello");
    let stamped = within("the call", TIMEOUT, seen.recv()).await.unwrap();
    assert_stamp_is_real(&stamped, child.pid(), &unique_name);
    assert_eq!((stamped.uid, stamped.gid), (0, 4321));
    let mut groups = stamped.groups.clone();
    groups.sort_unstable();
    assert_eq!(groups, [7, 8, 4321]);
    assert_peer_identity_is_real(&service, &unique_name, child.pid()).await;
    assert!(child.finish(TIMEOUT).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprivileged_uid_is_stamped_and_policed() {
    if !require_root("running a child as uid 65534") {
        return;
    }
    let bus = TestBus::start();
    let (service, mut seen) = report_service(&bus).await;

    // Root calls a service owned by uid 65534: allowed, and the reply is
    // delivered although 65534 may not talk to root on its own.
    let name = "org.pbus.test.Nobody";
    let mut server = bus.peer_as_uid(65534, &["serve", name]);
    let server_name = server.expect_line("ready", TIMEOUT).await;
    let (stamped, identity) = who_am_i(&service, name).await;
    assert_stamp_is_real(&stamped, server.pid(), &server_name);
    assert_eq!((stamped.uid, stamped.gid), (65534, 65534));
    assert!(stamped.groups.is_empty(), "{:?}", stamped.groups);
    // The child saw us (root) as we are, and itself as the bus does.
    assert_eq!(
        (identity.uid, identity.gid, identity.pid),
        (65534, 65534, server.pid())
    );
    let caller = identity.caller.expect("caller stamp");
    assert_stamp_is_real(&caller, std::process::id(), service.unique_name());
    assert_peer_identity_is_real(&service, &server_name, server.pid()).await;

    // Uid 65534 calling a root-owned name is denied by policy: the default
    // policy does not even let it see the name, so to it the name has no
    // owner (a denied client cannot learn that the name exists).
    let (mut child, _, result) = run_caller(bus.peer_as_uid(65534, &CALL_REPORT)).await;
    assert_eq!(
        result,
        format!(
            "error {} org.pbus.Error.NameHasNoOwner -",
            ErrorCode::NameHasNoOwner as i32
        )
    );
    // ... and the service never saw the call.
    service.ping().await.unwrap();
    assert!(seen.try_recv().is_err(), "the denied call was delivered");
    assert!(child.finish(TIMEOUT).success());
    assert!(server.finish(TIMEOUT).success());
}

fn forged_sender() -> SenderInfo {
    SenderInfo {
        unique_name: ":1.999".into(),
        uid: 4242,
        gid: 4242,
        pid: 1,
        groups: vec![4242, 4343],
        label: Some("fake".into()),
        container: Some(ContainerInfo {
            runtime: ContainerRuntime::Docker as i32,
            id: "f".repeat(64),
            pod_uid: "00000000-0000-0000-0000-000000000000".into(),
        }),
    }
}

/// `stamped` is the raw client's real identity (this process), not the
/// forgery, and agrees with GetPeerIdentity.
async fn assert_not_forged(asker: &Connection, stamped: &SenderInfo, unique_name: &str) {
    let forged = forged_sender();
    assert_stamp_is_real(stamped, std::process::id(), unique_name);
    assert_ne!(stamped.label, forged.label);
    assert_ne!(stamped.container, forged.container);
    let identity = asker.peer_identity(unique_name).await.unwrap();
    assert_eq!(stamped.label, identity.label);
    assert_eq!(stamped.container, identity.container);
    assert_eq!(
        (stamped.uid, stamped.gid, stamped.pid),
        (identity.uid, identity.gid, identity.pid)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_sender_fields_are_overwritten() {
    let bus = TestBus::start();
    let (service, mut seen) = report_service(&bus).await;
    let mut liar = bus.raw().await;
    let liar_name = liar.unique_name().to_owned();

    // A call.
    let header = Header {
        payload_type: Text::full_name(),
        sender: Some(forged_sender()),
        ..call_header(liar.next_serial(), SERVICE, "Report")
    };
    liar.send(&header, &Text::new("lie").encode_to_vec())
        .await
        .unwrap();
    let reply = liar.recv_reply(header.serial, TIMEOUT).await.unwrap();
    assert_eq!(reply.kind(), MessageKind::MethodReturn, "{reply:?}");
    let stamped = within("the call", TIMEOUT, seen.recv()).await.unwrap();
    assert_not_forged(&service, &stamped, &liar_name).await;

    // A broadcast and a unicast signal.
    let mut broadcasts = service
        .subscribe(MatchRule::new().member("Lie"))
        .await
        .unwrap();
    for destination in ["", SERVICE] {
        let header = Header {
            payload_type: Text::full_name(),
            sender: Some(forged_sender()),
            ..signal_header(liar.next_serial(), destination, "/lie", "Lie")
        };
        liar.send(&header, &Text::new(destination).encode_to_vec())
            .await
            .unwrap();
        let signal = expect_signal(&mut broadcasts, TIMEOUT).await;
        assert_eq!(signal.decode::<Text>().unwrap().text, destination);
        assert_eq!(signal.header().destination, destination);
        assert_not_forged(&service, signal.sender(), &liar_name).await;
    }

    // A reply.
    let pending = tokio::spawn({
        let service = service.clone();
        let liar_name = liar_name.clone();
        async move {
            service
                .method_call(&liar_name, "Ask")
                .send(Outgoing::new(&Text::new("q")))
                .await
        }
    });
    let call = liar.recv_call(TIMEOUT).await.unwrap();
    let header = Header {
        payload_type: Text::full_name(),
        sender: Some(forged_sender()),
        ..reply_header(
            liar.next_serial(),
            service.unique_name(),
            call.header.serial,
        )
    };
    liar.send(&header, &Text::new("answer").encode_to_vec())
        .await
        .unwrap();
    let reply = within("the reply", TIMEOUT, pending)
        .await
        .unwrap()
        .unwrap()
        .expect("a reply");
    assert_eq!(reply.decode::<Text>().unwrap().text, "answer");
    assert_not_forged(&service, reply.sender(), &liar_name).await;
}
