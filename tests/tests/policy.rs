//! The policy, enforced by the real `pbusd` between real processes in real
//! cgroup containers ([`pbus_tests::containers`]), each running the
//! helper's `policy-probe` subcommand.
//!
//! * By default a container peer cannot call or unicast-signal a peer of
//!   another container, nor a host service of its own uid (root), by
//!   well-known or unique name: it gets NameHasNoOwner / NoSuchPeer with
//!   the very message a name nobody owns gets, and the service receives
//!   nothing. Broadcasts from one container do not reach another's
//!   subscription. Host root can call into a container by unique name (by
//!   well-known name it resolves only host names: names live in per-scope
//!   tables, see `names_scopes.rs`); peers of one container talk to each
//!   other.
//! * A rule naming container A (runtime and id glob), or a pod (runtime and
//!   pod UID glob), opens one host name, or one method of it; other names
//!   stay invisible and other methods are AccessDenied `talk`; other
//!   containers and pods get nothing.
//! * ListNames, NameHasOwner, GetNameOwner, ListQueuedOwners and subscribed
//!   NameOwnerChanged signals reveal nothing of another container's names
//!   or unique names; a `see` rule for that container reveals its unique
//!   names and its NameOwnerChanged signals (and still grants no `talk`),
//!   but never resolves its well-known names: those live in its own name
//!   scope.
//! * `deny pass-fds` for a container refuses a call carrying a pipe fd
//!   (AccessDenied `pass-fds`) inside that container only; `allow memfd`
//!   with `max-bytes` caps memfd payloads, extra ones and bodies the
//!   library moved into a memfd, at exactly that many bytes, for calls and
//!   for broadcasts, and only for the name it names.
//! * An eavesdropping match is refused without the `monitor` right (root in
//!   a container, a non-root host peer) and works for root on the host,
//!   which then gets MONITOR_COPY-flagged copies of calls between two other
//!   peers that its own method handlers never answer.
#![forbid(unsafe_code)]

mod policy_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pbus::{MatchRule, Outgoing, RequestNameFlags, RequestNameResult, SealedMemfd};
use pbus_proto::v1::{ErrorCode, HeaderFlag, MessageKind};
use pbus_tests::containers::{Isolation, Shape};
use pbus_tests::messages::Text;
use pbus_tests::{drain_signals, expect_signal, require_root, TestBus, TIMEOUT};
use policy_support::{
    assert_refused, by_id, container, list_after, probe_as_uid, probe_in, received, split_after,
    wait_received, HostService, PolicyDir,
};

const HOST: &str = "org.pbus.test.policy.Host";
const NAME_B: &str = "org.pbus.test.policy.B";
const NAME_B2: &str = "org.pbus.test.policy.B2";
const OPEN: &str = "org.pbus.test.policy.Open";
const CLOSED: &str = "org.pbus.test.policy.Closed";
const POD_OPEN: &str = "org.pbus.test.policy.PodOpen";
const SENTINEL: &str = "org.pbus.test.policy.Sentinel";

/// The error message a name nobody owns gets, with the name in it.
fn no_owner_message(name: &str) -> String {
    format!("name {name:?} has no owner")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_are_isolated_from_each_other_and_from_the_host_by_default() {
    if !require_root("running peers in fake containers") {
        return;
    }
    let (Some(box_a), Some(box_b)) = (container(Shape::DockerCgroupfs), container(Shape::Podman))
    else {
        return;
    };
    let bus = TestBus::start();
    let host = HostService::start(&bus, HOST).await;
    let host_unique = host.connection.unique_name().to_owned();
    let mut b = probe_in(&box_b, &bus, Isolation::none(), NAME_B).await;
    let mut b2 = probe_in(&box_b, &bus, Isolation::none(), "-").await;
    // A looks like a real container: its own pid, mount, net, UTS, IPC and
    // cgroup namespaces (and root inside, like the host service).
    let mut a = probe_in(&box_a, &bus, Isolation::container(), "-").await;
    let b_unique = b.unique_name().to_owned();

    // A can reach nobody outside its container, by any name, and cannot
    // tell an existing name from a missing one.
    for (command, code, name) in [
        (
            format!("call {NAME_B} Echo"),
            ErrorCode::NameHasNoOwner,
            NAME_B,
        ),
        (
            format!("signal {NAME_B} Poke"),
            ErrorCode::NameHasNoOwner,
            NAME_B,
        ),
        (format!("call {b_unique} Echo"), ErrorCode::NoSuchPeer, ""),
        (format!("signal {b_unique} Poke"), ErrorCode::NoSuchPeer, ""),
        (format!("call {HOST} Echo"), ErrorCode::NameHasNoOwner, HOST),
        (
            format!("signal {HOST} Poke"),
            ErrorCode::NameHasNoOwner,
            HOST,
        ),
        (
            format!("call {host_unique} Other"),
            ErrorCode::NoSuchPeer,
            "",
        ),
    ] {
        let message = assert_refused(&a.ask(&command).await, code, "", &command);
        if !name.is_empty() {
            assert_eq!(message, no_owner_message(name), "{command}");
        }
    }
    let absent = "org.pbus.test.policy.Nobody";
    let message = assert_refused(
        &a.ask(&format!("call {absent} Echo")).await,
        ErrorCode::NameHasNoOwner,
        "",
        "a name nobody owns",
    );
    assert_eq!(message, no_owner_message(absent));

    // Inside B, same uid: calls and unicast signals work.
    assert_eq!(
        b2.ask(&format!("call {NAME_B} Echo")).await,
        "ok Echo fds=0 memfds=0"
    );
    assert_eq!(b2.ask(&format!("signal {NAME_B} Poke")).await, "sent");
    // Host root can call into a container by unique name; by well-known
    // name it resolves only the host's names (B's name lives in B's name
    // scope), so the call finds no owner.
    let refused = host
        .connection
        .method_call(NAME_B, "Echo")
        .call::<Text, Text>(&Text::new("root"))
        .await
        .expect_err("host root does not resolve container B's name");
    assert_eq!(refused.code(), Some(ErrorCode::NameHasNoOwner), "{refused}");
    let reply: Text = host
        .connection
        .method_call(&b_unique, "Echo")
        .call(&Text::new("root"))
        .await
        .expect("host root calls into container B");
    assert_eq!(reply.text, "Echo fds=0 memfds=0");
    let reply: Text = host
        .connection
        .method_call(a.unique_name(), "Other")
        .call(&Text::new("root"))
        .await
        .expect("host root calls into container A");
    assert_eq!(reply.text, "Other fds=0 memfds=0");

    // What arrived is exactly what was allowed: nothing from A.
    wait_received(&mut b, "Poke", 1).await;
    assert_eq!(received(&mut b, "Echo").await, 2, "B2's call and root's");
    assert_eq!(received(&mut b, "Other").await, 0);
    assert!(
        host.calls().is_empty(),
        "A reached the host: {:?}",
        host.calls()
    );

    // Broadcasts: B's reaches B2 but not A; root's reaches both.
    for peer in [&mut a, &mut b2] {
        assert_eq!(peer.ask("listen News").await, "listening News");
    }
    assert_eq!(b.ask("emit News fromB").await, "emitted News");
    // B's connection is ordered: once the bus answered its ping, it has
    // routed the broadcast.
    assert_eq!(b.ask("ping").await, "pong");
    host.connection
        .emit_signal("/test", "News", &[], &Text::new("fromHost"))
        .await
        .unwrap();
    assert_eq!(
        a.ask("signals-until News fromHost").await,
        format!("signals {host_unique}|fromHost"),
        "A got B's broadcast"
    );
    assert_eq!(
        b2.ask("signals-until News fromHost").await,
        format!("signals {b_unique}|fromB;{host_unique}|fromHost")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_opens_one_host_name_and_method_to_one_container_or_pod() {
    if !require_root("running peers in fake containers") {
        return;
    }
    let (Some(box_a), Some(box_c), Some(box_k), Some(box_k2)) = (
        container(Shape::DockerCgroupfs),
        container(Shape::DockerSystemd),
        container(Shape::KubeCrio),
        container(Shape::KubeCrio),
    ) else {
        return;
    };
    let subject_a = by_id("docker", &box_a);
    let pod = &box_k.pod_uid()[..13];
    let policy = PolicyDir::new();
    policy.write(
        "50-open.toml",
        &format!(
            r#"
# Container A may see the host's {OPEN} and call its Echo, nothing else.
[[rule]]
allow = ["see"]
subject = {subject_a}
name = "{OPEN}"

[[rule]]
allow = "talk"
subject = {subject_a}
name = "{OPEN}"
member = "Echo"

# Every container of pod K may see and call {POD_OPEN}.
[[rule]]
allow = ["see", "talk"]
subject = {{ container = {{ runtime = "crio", pod = "{pod}*" }} }}
name = "{POD_OPEN}"
"#
        ),
    );
    let bus = policy.start_bus();
    let open = HostService::start(&bus, OPEN).await;
    let closed = HostService::start(&bus, CLOSED).await;
    let pod_open = HostService::start(&bus, POD_OPEN).await;
    let mut a = probe_in(&box_a, &bus, Isolation::none(), "-").await;
    let mut c = probe_in(&box_c, &bus, Isolation::none(), "-").await;
    let mut k = probe_in(&box_k, &bus, Isolation::container(), "-").await;
    let mut k2 = probe_in(&box_k2, &bus, Isolation::none(), "-").await;
    let a_unique = a.unique_name().to_owned();
    let k_unique = k.unique_name().to_owned();

    // A sees OPEN and itself, nothing else (its probe makes a second
    // connection for signals below; that one it would see too).
    let mut names = list_after(&a.ask("names").await, "names");
    names.sort();
    assert_eq!(names, [a_unique.clone(), OPEN.to_owned()]);

    // A: Echo on OPEN works; every other method and name stays shut.
    assert_eq!(a.ask(&format!("call {OPEN} Echo")).await, "ok host Echo");
    assert_refused(
        &a.ask(&format!("call {OPEN} Other")).await,
        ErrorCode::AccessDenied,
        "talk",
        "A calls OPEN.Other",
    );
    assert_refused(
        &a.ask(&format!("signal {OPEN} Poke")).await,
        ErrorCode::AccessDenied,
        "talk",
        "A signals OPEN.Poke",
    );
    for name in [CLOSED, POD_OPEN] {
        assert_refused(
            &a.ask(&format!("call {name} Echo")).await,
            ErrorCode::NameHasNoOwner,
            "",
            name,
        );
    }
    // A unique name is covered only by `name = "*"`: OPEN's owner stays
    // unreachable under its unique name.
    let open_owner = list_after(&a.ask(&format!("owner {OPEN}")).await, "owner");
    assert_eq!(open_owner, [open.connection.unique_name()]);
    assert_refused(
        &a.ask(&format!("call {} Echo", open_owner[0])).await,
        ErrorCode::NoSuchPeer,
        "",
        "A calls OPEN's owner by unique name",
    );
    assert_eq!(a.ask(&format!("has-owner {OPEN}")).await, "has-owner true");
    assert_eq!(
        a.ask(&format!("has-owner {CLOSED}")).await,
        "has-owner false"
    );

    // Another Docker container gets nothing.
    assert_refused(
        &c.ask(&format!("call {OPEN} Echo")).await,
        ErrorCode::NameHasNoOwner,
        "",
        "container C calls OPEN",
    );

    // Pod K: any method of POD_OPEN, nothing else; another pod: nothing.
    assert_eq!(
        k.ask(&format!("call {POD_OPEN} Echo")).await,
        "ok host Echo"
    );
    assert_eq!(
        k.ask(&format!("call {POD_OPEN} Other")).await,
        "ok host Other"
    );
    assert_refused(
        &k.ask(&format!("call {OPEN} Echo")).await,
        ErrorCode::NameHasNoOwner,
        "",
        "pod K calls OPEN",
    );
    assert_refused(
        &k2.ask(&format!("call {POD_OPEN} Echo")).await,
        ErrorCode::NameHasNoOwner,
        "",
        "another pod calls POD_OPEN",
    );

    assert_eq!(open.calls(), [("Echo".to_owned(), a_unique)]);
    assert_eq!(
        pod_open.calls(),
        [
            ("Echo".to_owned(), k_unique.clone()),
            ("Other".to_owned(), k_unique)
        ]
    );
    assert!(closed.calls().is_empty(), "{:?}", closed.calls());
}

/// What peer A (container A) learns about container B's names, with or
/// without a rule letting A see B.
async fn check_name_visibility(see_rule: bool) {
    let (Some(box_a), Some(box_b)) = (container(Shape::DockerCgroupfs), container(Shape::Podman))
    else {
        return;
    };
    let policy = PolicyDir::new();
    if see_rule {
        policy.write(
            "50-see.toml",
            &format!(
                "[[rule]]\nallow = [\"see\"]\nsubject = {}\npeer = {}\n",
                by_id("docker", &box_a),
                by_id("podman", &box_b)
            ),
        );
    }
    let bus = policy.start_bus();
    let host = HostService::start(&bus, HOST).await;
    let mut a = probe_in(&box_a, &bus, Isolation::none(), "-").await;
    let a_unique = a.unique_name().to_owned();
    assert_eq!(a.ask("watch").await, "watching");

    // B comes and goes with names while A watches.
    let mut b = probe_in(&box_b, &bus, Isolation::none(), NAME_B).await;
    let b_unique = b.unique_name().to_owned();
    let mut b2 = probe_in(&box_b, &bus, Isolation::none(), "-").await;
    let b2_unique = b2.unique_name().to_owned();
    assert_eq!(
        b2.ask(&format!("request {NAME_B}")).await,
        "request InQueue"
    );
    assert_eq!(
        b.ask(&format!("request {NAME_B2}")).await,
        "request PrimaryOwner"
    );
    assert_eq!(
        b.ask(&format!("release {NAME_B2}")).await,
        "release Released"
    );
    // Host root claims B's name too, in the host's name scope: it owns it
    // there at once and its queue is its own; B2 (with or without the
    // rule) sees B's queue only.
    assert_eq!(
        host.connection
            .request_name(NAME_B, RequestNameFlags::default())
            .await
            .unwrap(),
        RequestNameResult::PrimaryOwner
    );
    assert_eq!(
        host.connection.list_queued_owners(NAME_B).await.unwrap(),
        [host.connection.unique_name()]
    );
    assert_eq!(
        list_after(&b2.ask(&format!("queued {NAME_B}")).await, "queued"),
        [b_unique.clone(), b2_unique.clone()]
    );

    // A's own name change comes last; it sees that one in any case.
    assert_eq!(
        a.ask(&format!("request {SENTINEL}")).await,
        "request PrimaryOwner"
    );
    let changes = split_after(
        &a.ask(&format!("changes-until {SENTINEL}")).await,
        "changes",
        ';',
    );
    let mut names = list_after(&a.ask("names").await, "names");
    names.sort();
    let has_owner = a.ask(&format!("has-owner {NAME_B}")).await;
    let owner = a.ask(&format!("owner {NAME_B}")).await;
    let owner_of_unique = a.ask(&format!("owner {b_unique}")).await;
    let queued = a.ask(&format!("queued {NAME_B}")).await;
    let call = a.ask(&format!("call {NAME_B} Echo")).await;
    let call_unique = a.ask(&format!("call {b_unique} Echo")).await;

    let sentinel = format!("{SENTINEL}||{a_unique}");
    if see_rule {
        let changes: Vec<&str> = changes.iter().map(String::as_str).collect();
        assert_eq!(
            changes,
            [
                format!("{b_unique}||{b_unique}").as_str(),
                &format!("{NAME_B}||{b_unique}"),
                &format!("{b2_unique}||{b2_unique}"),
                &format!("{NAME_B2}||{b_unique}"),
                &format!("{NAME_B2}|{b_unique}|"),
                &sentinel,
            ],
            "A sees every change of B's names, and nothing of the host's"
        );
        // B's peers are visible by unique name; B's well-known names live
        // in B's name scope, which A never resolves into (NAME_B leads A
        // to the host's owner, which A may not see).
        let mut expected = vec![
            a_unique.clone(),
            b_unique.clone(),
            b2_unique.clone(),
            SENTINEL.to_owned(),
        ];
        expected.sort();
        assert_eq!(names, expected);
        assert_eq!(has_owner, "has-owner false");
        let message = assert_refused(&owner, ErrorCode::NameHasNoOwner, "", "GetNameOwner B");
        assert_eq!(message, no_owner_message(NAME_B));
        assert_eq!(owner_of_unique, format!("owner {b_unique}"));
        let message = assert_refused(&queued, ErrorCode::NameHasNoOwner, "", "ListQueuedOwners");
        assert_eq!(message, no_owner_message(NAME_B));
        assert_refused(&call, ErrorCode::NameHasNoOwner, "", "A calls NAME_B");
        // Seeing is not talking.
        assert_refused(
            &call_unique,
            ErrorCode::AccessDenied,
            "talk",
            "A calls B (see only)",
        );
    } else {
        assert_eq!(
            changes,
            [sentinel],
            "A learnt of names outside its container"
        );
        let mut expected = vec![a_unique.clone(), SENTINEL.to_owned()];
        expected.sort();
        assert_eq!(names, expected);
        assert_eq!(has_owner, "has-owner false");
        let message = assert_refused(&owner, ErrorCode::NameHasNoOwner, "", "GetNameOwner B");
        assert_eq!(message, no_owner_message(NAME_B));
        assert_refused(
            &owner_of_unique,
            ErrorCode::NoSuchPeer,
            "",
            "GetNameOwner of B's unique name",
        );
        let message = assert_refused(&queued, ErrorCode::NameHasNoOwner, "", "ListQueuedOwners");
        assert_eq!(message, no_owner_message(NAME_B));
        assert_refused(&call, ErrorCode::NameHasNoOwner, "", "A calls B");
        assert_refused(
            &call_unique,
            ErrorCode::NoSuchPeer,
            "",
            "A calls B by unique name",
        );
    }
    // The host's name and unique name stay hidden either way.
    assert_eq!(a.ask(&format!("has-owner {HOST}")).await, "has-owner false");
    assert!(
        !names
            .iter()
            .any(|name| name == host.connection.unique_name()),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_of_other_containers_are_invisible_by_default() {
    if !require_root("running peers in fake containers") {
        return;
    }
    check_name_visibility(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_see_rule_reveals_the_names_of_one_container() {
    if !require_root("running peers in fake containers") {
        return;
    }
    check_name_visibility(true).await;
}

/// A host connection owning `name` whose `Take` method answers with what
/// arrived: `memfds=<n> bytes=<total length> body_in_memfd=<bool>`; counts
/// its calls. It also subscribes to `Big` signals.
async fn memfd_sink(bus: &TestBus, name: &str) -> (pbus::Connection, Arc<AtomicU64>) {
    let connection = bus.connect_owning(name).await;
    let calls = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&calls);
    connection
        .serve_raw("Take", move |call: pbus::MethodCall| {
            counter.fetch_add(1, Ordering::SeqCst);
            let body = call.incoming.body();
            let bytes: u64 = call
                .incoming
                .memfds()
                .iter()
                .map(SealedMemfd::len)
                .sum::<u64>()
                + if body.is_memfd() {
                    body.as_bytes().len() as u64
                } else {
                    0
                };
            let text = format!(
                "memfds={} bytes={bytes} body_in_memfd={}",
                call.incoming.memfds().len(),
                body.is_memfd()
            );
            async move { Ok(Outgoing::new(&Text::new(text))) }
        })
        .unwrap();
    (connection, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_and_memfd_rules_are_enforced() {
    if !require_root("running peers in fake containers") {
        return;
    }
    let (Some(box_a), Some(box_c)) = (
        container(Shape::DockerCgroupfs),
        container(Shape::DockerSystemd),
    ) else {
        return;
    };
    const SINK_A: &str = "org.pbus.test.policy.SinkA";
    const SINK_C: &str = "org.pbus.test.policy.SinkC";
    const CAPPED: &str = "org.pbus.test.policy.Capped";
    const UNCAPPED: &str = "org.pbus.test.policy.Uncapped";
    const CAP: usize = 100_000;
    let policy = PolicyDir::new();
    policy.write(
        "50-fds.toml",
        &format!(
            r#"
# Container A passes no fds, not even inside itself (as specific as the
# built-in container-same-uid rule: deny wins).
[[rule]]
deny = ["pass-fds"]
subject = {}

# Host root may send memfd payloads of at most {CAP} bytes to {CAPPED}.
[[rule]]
allow = ["memfd"]
subject = {{ host = true, uid = 0 }}
name = "{CAPPED}"
max-bytes = {CAP}
"#,
            by_id("docker", &box_a)
        ),
    );
    let bus = policy.start_bus();

    // pass-fds, inside container A and (for contrast) inside container C.
    let mut a1 = probe_in(&box_a, &bus, Isolation::none(), SINK_A).await;
    let mut a2 = probe_in(&box_a, &bus, Isolation::none(), "-").await;
    let mut c1 = probe_in(&box_c, &bus, Isolation::none(), SINK_C).await;
    let mut c2 = probe_in(&box_c, &bus, Isolation::none(), "-").await;
    assert_eq!(
        a2.ask(&format!("call {SINK_A} Echo")).await,
        "ok Echo fds=0 memfds=0"
    );
    assert_refused(
        &a2.ask(&format!("call-fd {SINK_A} Echo")).await,
        ErrorCode::AccessDenied,
        "pass-fds",
        "A passes a pipe inside A",
    );
    assert_eq!(
        c2.ask(&format!("call-fd {SINK_C} Echo")).await,
        "ok Echo fds=1 memfds=0"
    );
    assert_eq!(
        received(&mut a1, "Echo").await,
        1,
        "the refused call arrived"
    );
    assert_eq!(received(&mut c1, "Echo").await, 1);

    // memfd caps, from host root (the test process) to two host services.
    let (capped, capped_calls) = memfd_sink(&bus, CAPPED).await;
    let (uncapped, uncapped_calls) = memfd_sink(&bus, UNCAPPED).await;
    let sender = bus.connect().await;
    let memfd_of = |len: usize| SealedMemfd::from_bytes(&vec![b'm'; len]).expect("a sealed memfd");
    let take = |to: &'static str, outgoing: Outgoing| {
        let sender = sender.clone();
        async move {
            sender
                .method_call(to, "Take")
                .send(outgoing)
                .await
                .map(|reply| reply.expect("a reply").decode::<Text>().unwrap().text)
        }
    };
    let denied = |result: Result<String, pbus::Error>, what: &str| match result {
        Err(error) => {
            assert_eq!(
                error.code(),
                Some(ErrorCode::AccessDenied),
                "{what}: {error}"
            );
            assert_eq!(error.detail(), Some("memfd"), "{what}: {error}");
        }
        Ok(reply) => panic!("{what}: went through: {reply}"),
    };
    let small = Outgoing::new(&Text::new("x"));
    assert_eq!(
        take(CAPPED, small.memfd(memfd_of(CAP))).await.unwrap(),
        format!("memfds=1 bytes={CAP} body_in_memfd=false"),
        "a memfd of exactly the cap"
    );
    denied(
        take(
            CAPPED,
            Outgoing::new(&Text::new("x")).memfd(memfd_of(CAP + 1)),
        )
        .await,
        "a memfd one byte over the cap",
    );
    // Bodies above the library's 64 KiB threshold travel in a memfd.
    let body = |len: usize| Outgoing::new(&Text::new("b".repeat(len)));
    let under = pbus::DEFAULT_MEMFD_THRESHOLD + 10_000;
    assert!(under + 16 < CAP);
    let reply = take(CAPPED, body(under)).await.unwrap();
    assert!(
        reply.starts_with("memfds=0 bytes=") && reply.ends_with("body_in_memfd=true"),
        "{reply}"
    );
    denied(take(CAPPED, body(CAP + 20_000)).await, "a large body");
    // No memfd rule for UNCAPPED: no policy cap.
    assert_eq!(
        take(
            UNCAPPED,
            Outgoing::new(&Text::new("x")).memfd(memfd_of(4 * CAP))
        )
        .await
        .unwrap(),
        format!("memfds=1 bytes={} body_in_memfd=false", 4 * CAP)
    );
    assert_eq!(capped_calls.load(Ordering::SeqCst), 2);
    assert_eq!(uncapped_calls.load(Ordering::SeqCst), 1);

    // Broadcasts: a memfd over the cap is not delivered to CAPPED's owner,
    // but is to UNCAPPED's; a later small one reaches both.
    let mut capped_big = capped
        .subscribe(MatchRule::new().member("Big"))
        .await
        .unwrap();
    let mut uncapped_big = uncapped
        .subscribe(MatchRule::new().member("Big"))
        .await
        .unwrap();
    sender
        .signal("/test", "Big")
        .emit(Outgoing::new(&Text::new("large")).memfd(memfd_of(CAP + 1)))
        .await
        .unwrap();
    sender
        .signal("/test", "Big")
        .emit(Outgoing::new(&Text::new("small")))
        .await
        .unwrap();
    let text = |signal: pbus::Signal| signal.decode::<Text>().unwrap().text;
    assert_eq!(text(expect_signal(&mut capped_big, TIMEOUT).await), "small");
    assert_eq!(
        text(expect_signal(&mut uncapped_big, TIMEOUT).await),
        "large"
    );
    assert_eq!(
        text(expect_signal(&mut uncapped_big, TIMEOUT).await),
        "small"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eavesdropping_needs_the_monitor_right() {
    if !require_root("running peers in fake containers and under another uid") {
        return;
    }
    let (Some(box_a), Some(box_b)) = (container(Shape::DockerCgroupfs), container(Shape::Podman))
    else {
        return;
    };
    let bus = TestBus::start();
    let mut a = probe_in(&box_a, &bus, Isolation::container(), "-").await;
    let (mut nobody, _) = probe_as_uid(&bus, 65534, "-").await;
    for (peer, what) in [(&mut *a, "root in a container"), (&mut nobody, "uid 65534")] {
        let message = assert_refused(
            &peer.ask("eavesdrop").await,
            ErrorCode::AccessDenied,
            "monitor",
            what,
        );
        assert!(message.contains("eavesdrop"), "{what}: {message}");
    }

    // Root on the host may. Its connection also serves Echo, to show that
    // a copy of someone else's call is never taken for a call to it.
    let monitor = bus.connect().await;
    let answered = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&answered);
    monitor
        .serve("Echo", move |_request: Text, _call| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok(Text::new("from the monitor")) }
        })
        .unwrap();
    let mut copies = monitor
        .subscribe(MatchRule::new().eavesdrop(true).member("Echo"))
        .await
        .expect("root on the host may eavesdrop");

    let mut b = probe_in(&box_b, &bus, Isolation::none(), NAME_B).await;
    let mut b2 = probe_in(&box_b, &bus, Isolation::none(), "-").await;
    assert_eq!(
        b2.ask(&format!("call {NAME_B} Echo")).await,
        "ok Echo fds=0 memfds=0"
    );
    let copy = expect_signal(&mut copies, TIMEOUT).await;
    let header = copy.header();
    assert_ne!(
        header.flags & HeaderFlag::MonitorCopy as u32,
        0,
        "{header:?}"
    );
    assert_eq!(header.kind, MessageKind::MethodCall as i32);
    assert_eq!(header.member, "Echo");
    assert_eq!(header.destination, NAME_B);
    assert_eq!(copy.sender().unique_name, b2.unique_name());
    assert_eq!(copy.decode::<Text>().unwrap().text, "probe");
    // One call, one copy, answered once, by its callee.
    assert_eq!(b2.ask("ping").await, "pong");
    monitor.ping().await.unwrap();
    assert!(drain_signals(&mut copies).is_empty());
    assert_eq!(
        answered.load(Ordering::SeqCst),
        0,
        "the monitor answered a copy"
    );
    assert_eq!(received(&mut b, "Echo").await, 1);
    // A monitor is receive-only: calls made to it are refused (it could
    // not answer them), and its handlers never run.
    let error = bus
        .connect()
        .await
        .method_call(monitor.unique_name(), "Echo")
        .timeout(Duration::from_secs(10))
        .call::<Text, Text>(&Text::new("direct"))
        .await
        .expect_err("a monitor was called");
    let pbus::Error::Remote { code, detail, .. } = &error else {
        panic!("calling a monitor: {error}");
    };
    assert_eq!(*code, ErrorCode::AccessDenied, "{error}");
    assert_eq!(detail, pbus_proto::errors::DETAIL_RECEIVE_ONLY, "{error}");
    assert_eq!(answered.load(Ordering::SeqCst), 0);
}
