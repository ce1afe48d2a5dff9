//! Monitors through the real daemon: a connection with an eavesdropping
//! rule is receive-only.
//!
//! * A monitor's RequestName, call to another peer, broadcast signal,
//!   unicast signal and reply are each refused with ACCESS_DENIED, detail
//!   `receive-only`; nothing reaches anyone, the monitor stays connected and
//!   keeps receiving copies of others' traffic. Calls to a monitor are
//!   refused the same way, and dropping its eavesdropping rule does not make
//!   it a normal peer again.
//! * A connection that owns a name cannot become a monitor (ACCESS_DENIED,
//!   detail `monitor`); once it released the name it can.
//! * `pbusctl monitor --json` prints each message once: broadcasts (the
//!   bus's NameOwnerChanged, a peer's signal), calls and replies.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use pbus_proto::errors::DETAIL_RECEIVE_ONLY;
use pbus_proto::v1::{ErrorCode, ErrorInfo, HeaderFlag, MatchRule, MessageKind};
use pbus_tests::{pbusctl_binary, RawClient, TestBus, TIMEOUT};

const SERVICE: &str = "org.pbus.test.Watched";

fn eavesdrop_all() -> MatchRule {
    MatchRule {
        eavesdrop: true,
        ..MatchRule::default()
    }
}

fn assert_receive_only(error: Option<ErrorInfo>, what: &str) {
    let error = error.unwrap_or_else(|| panic!("{what} was not refused"));
    assert_eq!(
        error.code,
        ErrorCode::AccessDenied as i32,
        "{what}: {error:?}"
    );
    assert_eq!(error.detail, DETAIL_RECEIVE_ONLY, "{what}: {error:?}");
    assert!(error.message.contains("receive-only"), "{what}: {error:?}");
}

/// `caller` calls the service; the service gets it and the monitor gets
/// exactly one copy of it, flagged MONITOR_COPY.
async fn assert_copied(
    caller: &mut RawClient,
    service: &mut RawClient,
    monitor: &mut RawClient,
    member: &str,
    what: &str,
) {
    caller.send_call(SERVICE, member, "", b"", 0).await.unwrap();
    let call = service.recv_call(TIMEOUT).await.unwrap();
    assert_eq!(call.header.member, member, "{what}");
    let copies: Vec<_> = monitor
        .take_delivered()
        .await
        .into_iter()
        .filter(|frame| frame.header.member == member)
        .collect();
    assert_eq!(copies.len(), 1, "{what}: {copies:?}");
    assert_ne!(
        copies[0].header.flags & HeaderFlag::MonitorCopy as u32,
        0,
        "{what}"
    );
    assert_eq!(copies[0].header.destination, SERVICE, "{what}");
    assert_eq!(copies[0].sender_name(), caller.unique_name(), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_sends_nothing_but_bus_calls_and_keeps_its_copies() {
    let bus = TestBus::start();
    let mut service = bus.raw_owning(SERVICE).await;
    let mut caller = bus.raw().await;
    let mut subscriber = bus.raw().await;
    subscriber
        .add_match(MatchRule {
            member: "FromMonitor".into(),
            ..MatchRule::default()
        })
        .await;
    let mut monitor = bus.raw().await;
    monitor.add_match(eavesdrop_all()).await;
    assert_copied(
        &mut caller,
        &mut service,
        &mut monitor,
        "Before",
        "at start",
    )
    .await;

    assert_receive_only(
        monitor.request_name("org.pbus.test.Monitor", 0).await.err(),
        "RequestName",
    );
    assert_copied(
        &mut caller,
        &mut service,
        &mut monitor,
        "Own",
        "after RequestName",
    )
    .await;

    let serial = monitor
        .send_call(SERVICE, "Sneak", "", b"", 0)
        .await
        .unwrap();
    assert_receive_only(monitor.refusal_of(serial).await, "a call to a peer");
    assert_copied(
        &mut caller,
        &mut service,
        &mut monitor,
        "Call",
        "after a call",
    )
    .await;

    let serial = monitor
        .send_signal("", "/m", "FromMonitor", &[], b"")
        .await
        .unwrap();
    assert_receive_only(monitor.refusal_of(serial).await, "a broadcast");
    assert_copied(
        &mut caller,
        &mut service,
        &mut monitor,
        "Cast",
        "after a broadcast",
    )
    .await;

    let serial = monitor
        .send_signal(SERVICE, "/m", "FromMonitor", &[], b"")
        .await
        .unwrap();
    assert_receive_only(monitor.refusal_of(serial).await, "a unicast signal");
    assert_copied(
        &mut caller,
        &mut service,
        &mut monitor,
        "Uni",
        "after a signal",
    )
    .await;

    // A reply to a call it saw a copy of: refused, the caller gets the real one.
    let serial = caller.send_call(SERVICE, "Ask", "", b"", 0).await.unwrap();
    let call = service.recv_call(TIMEOUT).await.unwrap();
    let spoof = monitor
        .send_reply(caller.unique_name(), serial, "", b"spoof")
        .await
        .unwrap();
    assert_receive_only(monitor.refusal_of(spoof).await, "a reply");
    service
        .send_reply(caller.unique_name(), call.header.serial, "", b"real")
        .await
        .unwrap();
    let reply = caller.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_eq!(reply.body, b"real");

    // Nobody may call the monitor: it could not answer.
    let target = monitor.unique_name().to_owned();
    let serial = caller
        .send_call(&target, "Hello", "", b"", 0)
        .await
        .unwrap();
    assert_receive_only(caller.refusal_of(serial).await, "a call to the monitor");

    // Without its eavesdropping rule it is still a monitor.
    monitor.remove_match(eavesdrop_all()).await.unwrap();
    let serial = monitor
        .send_call(SERVICE, "Later", "", b"", 0)
        .await
        .unwrap();
    assert_receive_only(monitor.refusal_of(serial).await, "a call after RemoveMatch");

    // Nothing the monitor sent reached anyone, and it is still connected.
    let got: Vec<String> = service
        .take_delivered()
        .await
        .iter()
        .map(|frame| frame.header.member.clone())
        .collect();
    assert!(got.is_empty(), "the service got {got:?}");
    let got = subscriber.take_delivered().await;
    assert!(got.is_empty(), "the subscriber got {got:?}");
    let got: Vec<_> = caller
        .take_delivered()
        .await
        .into_iter()
        .filter(|frame| frame.kind() != MessageKind::Error)
        .collect();
    assert!(got.is_empty(), "the caller got {got:?}");
    monitor.sync().await;
    assert!(!monitor.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_owner_cannot_become_a_monitor_until_it_lets_go() {
    let bus = TestBus::start();
    let mut owner = bus.raw_owning(SERVICE).await;
    let error = owner
        .try_add_match(eavesdrop_all())
        .await
        .expect_err("a name owner became a monitor");
    assert_eq!(error.code, ErrorCode::AccessDenied as i32, "{error:?}");
    assert_eq!(error.detail, "monitor", "{error:?}");
    assert!(error.message.contains(SERVICE), "{error:?}");
    // Still a normal peer: it is called and answers.
    let mut caller = bus.raw().await;
    let serial = caller
        .send_call(SERVICE, "Still", "", b"", 0)
        .await
        .unwrap();
    let call = owner.recv_call(TIMEOUT).await.unwrap();
    owner
        .send_reply(caller.unique_name(), call.header.serial, "", b"")
        .await
        .unwrap();
    let reply = caller.recv_reply(serial, TIMEOUT).await.unwrap();
    assert_eq!(reply.kind(), MessageKind::MethodReturn);

    owner.release_name(SERVICE).await.unwrap();
    owner.try_add_match(eavesdrop_all()).await.unwrap();
    assert_receive_only(
        owner.request_name(SERVICE, 0).await.err(),
        "RequestName once a monitor",
    );
}

/// `pbusctl monitor --json` running against a bus; its stdout lines arrive
/// on a channel.
struct PbusctlMonitor {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl PbusctlMonitor {
    fn start(bus: &TestBus) -> Self {
        let mut child = Command::new(pbusctl_binary())
            .arg("--address")
            .arg(bus.address().to_string())
            .args(["--json", "monitor"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pbusctl runs");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|error| panic!("not JSON: {line}: {error}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Lines until one satisfies `last` (included); panics after `TIMEOUT`.
    fn read_until(
        &self,
        mut last: impl FnMut(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = last(&line);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("pbusctl monitor printed no end marker; saw {seen:#?}"),
            }
        }
    }
}

impl Drop for PbusctlMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_call(line: &serde_json::Value, member: &str) -> bool {
    line["kind"] == "call" && line["member"] == member
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pbusctl_monitor_prints_each_message_once() {
    let bus = TestBus::start();
    let mut service = bus.raw_owning(SERVICE).await;
    let mut caller = bus.raw().await;
    let monitor = PbusctlMonitor::start(&bus);
    // Its eavesdropping rule (added after the plain one) is in place once
    // it prints a copy of a call; "Mark" then ends what came before.
    let mut ready = false;
    for _ in 0..50 {
        caller
            .send_call(SERVICE, "Probe", "", b"", 0)
            .await
            .unwrap();
        service.recv_call(TIMEOUT).await.unwrap();
        if let Ok(line) = monitor.lines.recv_timeout(Duration::from_millis(200)) {
            if is_call(&line, "Probe") {
                ready = true;
                break;
            }
        }
    }
    assert!(ready, "pbusctl monitor printed no copy of a call");
    caller.send_call(SERVICE, "Mark", "", b"", 0).await.unwrap();
    service.recv_call(TIMEOUT).await.unwrap();
    monitor.read_until(|line| is_call(line, "Mark"));

    let mut emitter = bus.raw().await;
    let name = "org.pbus.test.Appears";
    emitter.request_name(name, 0).await.unwrap();
    emitter
        .send_signal("", "/e", "Tick", &["x"], b"")
        .await
        .unwrap();
    let serial = caller
        .send_call(SERVICE, "Watched", "", b"", 0)
        .await
        .unwrap();
    let call = service.recv_call(TIMEOUT).await.unwrap();
    service
        .send_reply(caller.unique_name(), call.header.serial, "", b"")
        .await
        .unwrap();
    caller.recv_reply(serial, TIMEOUT).await.unwrap();
    // pbusctl reads broadcasts and copies from two streams: each ends with
    // a marker of its own.
    caller.send_call(SERVICE, "End", "", b"", 0).await.unwrap();
    emitter
        .send_signal("", "/e", "End", &[], b"")
        .await
        .unwrap();
    let mut ends = 0;
    let lines = monitor.read_until(|line| {
        if line["member"] == "End" {
            ends += 1;
        }
        ends == 2
    });

    let count =
        |what: &dyn Fn(&serde_json::Value) -> bool| lines.iter().filter(|l| what(l)).count();
    let name_changes =
        count(&|line| line["member"] == "NameOwnerChanged" && line["args"][0] == name);
    assert_eq!(name_changes, 1, "NameOwnerChanged for {name}: {lines:#?}");
    assert_eq!(
        count(&|line| line["kind"] == "signal" && line["member"] == "Tick"),
        1,
        "{lines:#?}"
    );
    assert_eq!(count(&|line| is_call(line, "Watched")), 1, "{lines:#?}");
    assert_eq!(
        count(&|line| line["kind"] == "return" && line["reply_serial"] == serial),
        1,
        "{lines:#?}"
    );
}
