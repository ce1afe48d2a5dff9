//! Signal routing through match rules: rules on the sender (unique, and
//! well-known following the name's owner), path, path namespace, member
//! and argument equality each let through exactly the matching signals and
//! no others; two subscriptions on one connection each get only their own;
//! RemoveMatch (and dropping a stream) stops delivery; unicast signals
//! reach only their destination; malformed rules are refused with
//! InvalidArgs and take no slot.
//!
//! Nothing here sleeps to decide that a signal did not come: every emitter
//! makes a round trip through the bus after emitting, then a sentinel
//! signal is broadcast, and a subscriber's signals are complete once the
//! sentinel arrived (the bus keeps each receiver's queue in order).
#![forbid(unsafe_code)]

use pbus::{Connection, MatchRule as ClientRule, Outgoing, RequestNameFlags};
use pbus_proto::v1::{ArgMatch, ErrorCode, MatchRule, MessageKind};
use pbus_tests::frames::peer_stats;
use pbus_tests::messages::Text;
use pbus_tests::{drain_signals, expect_signal, own_name, RawClient, RawMessage, TestBus, TIMEOUT};

const WELL_KNOWN: &str = "org.pbus.test.Emitter";
const SENTINEL_PATH: &str = "/sentinel";
const SENTINEL: &str = "Sentinel";

fn rule() -> MatchRule {
    MatchRule::default()
}

fn with_args(mut rule: MatchRule, args: &[(u32, &str)]) -> MatchRule {
    rule.args = args
        .iter()
        .map(|(index, value)| ArgMatch {
            index: *index,
            value: (*value).into(),
        })
        .collect();
    rule
}

fn sentinel_rule() -> MatchRule {
    MatchRule {
        path: SENTINEL_PATH.into(),
        member: SENTINEL.into(),
        ..MatchRule::default()
    }
}

/// A raw subscriber: `rule` plus the sentinel rule.
async fn raw_subscriber(bus: &TestBus, rule: MatchRule) -> RawClient {
    let mut client = bus.raw().await;
    client.add_match(rule).await;
    client.add_match(sentinel_rule()).await;
    client
}

/// Everything `client` received up to the sentinel carrying `tag`, bus
/// signals (NameOwnerChanged of clients coming and going) left out. Each
/// entry is the body text of a signal.
async fn received_until_sentinel(client: &mut RawClient, tag: &str) -> Vec<String> {
    let is_sentinel = |frame: &RawMessage| {
        frame.kind() == MessageKind::Signal
            && frame.header.member == SENTINEL
            && frame.decode::<Text>().text == tag
    };
    client
        .recv_until(TIMEOUT, is_sentinel)
        .await
        .unwrap_or_else(|error| panic!("no sentinel {tag}: {error}"));
    client
        .take_inbox()
        .into_iter()
        .filter(|frame| !frame.is_bus_signal())
        .map(|frame| {
            assert_eq!(frame.kind(), MessageKind::Signal, "{frame:?}");
            assert!(
                !is_sentinel(&frame),
                "the sentinel arrived twice: {frame:?}"
            );
            frame.decode::<Text>().text
        })
        .collect()
}

async fn emit(connection: &Connection, path: &str, member: &str, args: &[&str], id: &str) {
    connection
        .emit_signal(path, member, args, &Text::new(id))
        .await
        .unwrap_or_else(|error| panic!("emit {id}: {error}"));
}

/// Broadcasts the sentinel `tag` from `connection`.
async fn emit_sentinel(connection: &Connection, tag: &str) {
    emit(connection, SENTINEL_PATH, SENTINEL, &[], tag).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_gets_exactly_its_signals() {
    let bus = TestBus::start();
    let e1 = bus.connect().await;
    let e2 = bus.connect().await;
    let e3 = bus.connect().await;
    own_name(&e1, WELL_KNOWN, RequestNameFlags::default()).await;
    let (n1, n2) = (e1.unique_name(), e2.unique_name());

    let cases: Vec<(&str, MatchRule, Vec<&str>)> = vec![
        (
            "sender (unique)",
            MatchRule {
                sender: n1.into(),
                ..rule()
            },
            vec!["s1", "s2", "s3", "s4"],
        ),
        (
            "sender (well-known)",
            MatchRule {
                sender: WELL_KNOWN.into(),
                ..rule()
            },
            vec!["s1", "s2", "s3", "s4"],
        ),
        (
            "path",
            MatchRule {
                path: "/a/b".into(),
                ..rule()
            },
            vec!["s1", "s5"],
        ),
        (
            "path namespace",
            MatchRule {
                path: "/a/b".into(),
                path_namespace: true,
                ..rule()
            },
            vec!["s1", "s2", "s5"],
        ),
        (
            "member",
            MatchRule {
                member: "Alpha".into(),
                ..rule()
            },
            vec!["s1", "s3", "s5"],
        ),
        (
            "arg0",
            with_args(rule(), &[(0, "x")]),
            vec!["s1", "s2", "s5"],
        ),
        ("arg1", with_args(rule(), &[(1, "x")]), vec!["s6"]),
        (
            "arg0 and arg1",
            with_args(rule(), &[(0, "x"), (1, "y")]),
            vec!["s1", "s5"],
        ),
        (
            "sender, member and arg",
            with_args(
                MatchRule {
                    sender: n2.into(),
                    member: "Alpha".into(),
                    ..rule()
                },
                &[(1, "y")],
            ),
            vec!["s5"],
        ),
        (
            "member and path",
            MatchRule {
                member: "Alpha".into(),
                path: "/a/bc".into(),
                ..rule()
            },
            vec!["s3"],
        ),
        (
            "root namespace",
            MatchRule {
                path: "/".into(),
                path_namespace: true,
                ..rule()
            },
            vec!["s1", "s2", "s3", "s4", "s5", "s6"],
        ),
        (
            "well-known name nobody owns",
            MatchRule {
                sender: "org.pbus.test.Nobody".into(),
                ..rule()
            },
            vec![],
        ),
    ];
    let mut subscribers = Vec::new();
    for (_, rule, _) in &cases {
        subscribers.push(raw_subscriber(&bus, rule.clone()).await);
    }

    emit(&e1, "/a/b", "Alpha", &["x", "y"], "s1").await;
    emit(&e1, "/a/b/c", "Beta", &["x"], "s2").await;
    emit(&e1, "/a/bc", "Alpha", &["z"], "s3").await;
    emit(&e1, "/other", "Gamma", &[], "s4").await;
    e1.ping().await.unwrap();
    emit(&e2, "/a/b", "Alpha", &["x", "y"], "s5").await;
    emit(&e2, "/a", "Beta", &["y", "x"], "s6").await;
    e2.ping().await.unwrap();
    emit_sentinel(&e3, "end").await;

    for ((what, _, expected), subscriber) in cases.iter().zip(&mut subscribers) {
        let got = received_until_sentinel(subscriber, "end").await;
        assert_eq!(&got, expected, "rule {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_known_sender_rule_follows_the_owner() {
    let bus = TestBus::start();
    let e1 = bus.connect().await;
    let e2 = bus.connect().await;
    let e3 = bus.connect().await;
    let allow = RequestNameFlags {
        allow_replacement: true,
        ..RequestNameFlags::default()
    };
    own_name(&e1, WELL_KNOWN, allow).await;

    let mut raw = raw_subscriber(
        &bus,
        MatchRule {
            sender: WELL_KNOWN.into(),
            ..rule()
        },
    )
    .await;
    let library = bus.connect().await;
    let mut stream = library
        .subscribe(ClientRule::new().sender(WELL_KNOWN))
        .await
        .unwrap();
    let mut sentinel = library
        .subscribe(ClientRule::new().path(SENTINEL_PATH).member(SENTINEL))
        .await
        .unwrap();

    let both_emit = |n: u32| {
        let (e1, e2) = (e1.clone(), e2.clone());
        async move {
            emit(&e1, "/t", "Tick", &[], &format!("d{n}-e1")).await;
            e1.ping().await.unwrap();
            emit(&e2, "/t", "Tick", &[], &format!("d{n}-e2")).await;
            e2.ping().await.unwrap();
        }
    };
    both_emit(1).await;
    // e2 takes the name over (e1 waits in the queue).
    own_name(
        &e2,
        WELL_KNOWN,
        RequestNameFlags {
            replace_existing: true,
            ..RequestNameFlags::default()
        },
    )
    .await;
    both_emit(2).await;
    // e2 lets go: e1 is the owner again.
    e2.release_name(WELL_KNOWN).await.unwrap();
    both_emit(3).await;
    // Nobody owns it.
    e1.release_name(WELL_KNOWN).await.unwrap();
    both_emit(4).await;
    emit_sentinel(&e3, "end").await;

    let expected = ["d1-e1", "d2-e2", "d3-e1"];
    assert_eq!(received_until_sentinel(&mut raw, "end").await, expected);
    let end = expect_signal(&mut sentinel, TIMEOUT).await;
    assert_eq!(end.decode::<Text>().unwrap().text, "end");
    let got: Vec<String> = drain_signals(&mut stream)
        .iter()
        .map(|signal| signal.decode::<Text>().unwrap().text)
        .collect();
    assert_eq!(got, expected, "library subscription");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_on_one_connection_get_only_their_own() {
    let bus = TestBus::start();
    let emitter = bus.connect().await;
    let subscriber = bus.connect().await;
    let mut alpha = subscriber
        .subscribe(ClientRule::new().member("Alpha"))
        .await
        .unwrap();
    let mut beta = subscriber
        .subscribe(ClientRule::new().member("Beta"))
        .await
        .unwrap();
    let mut first_arg_x = subscriber
        .subscribe(ClientRule::new().arg(0, "x"))
        .await
        .unwrap();
    let mut under_a = subscriber
        .subscribe(ClientRule::new().path_namespace("/a"))
        .await
        .unwrap();
    let mut sentinel = subscriber
        .subscribe(ClientRule::new().path(SENTINEL_PATH).member(SENTINEL))
        .await
        .unwrap();

    emit(&emitter, "/a/b", "Alpha", &["x"], "s1").await;
    emit(&emitter, "/b", "Beta", &["y"], "s2").await;
    emit(&emitter, "/a", "Gamma", &["x"], "s3").await;
    emit(&emitter, "/c", "Delta", &[], "s4").await;
    emit_sentinel(&emitter, "end").await;
    let end = expect_signal(&mut sentinel, TIMEOUT).await;
    assert_eq!(end.decode::<Text>().unwrap().text, "end");

    let texts = |stream: &mut pbus::SignalStream| -> Vec<String> {
        drain_signals(stream)
            .iter()
            .map(|signal| {
                assert_eq!(signal.sender().unique_name, emitter.unique_name());
                signal.decode::<Text>().unwrap().text
            })
            .collect()
    };
    assert_eq!(texts(&mut alpha), ["s1"]);
    assert_eq!(texts(&mut beta), ["s2"]);
    assert_eq!(texts(&mut first_arg_x), ["s1", "s3"]);
    assert_eq!(texts(&mut under_a), ["s1", "s3"]);
    assert!(drain_signals(&mut sentinel).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_match_stops_delivery() {
    let bus = TestBus::start();
    let emitter = bus.connect().await;
    let alpha = MatchRule {
        member: "Alpha".into(),
        ..rule()
    };
    let mut subscriber = raw_subscriber(&bus, alpha.clone()).await;
    // The same rule twice: still one copy of each signal.
    subscriber.add_match(alpha.clone()).await;

    emit(&emitter, "/x", "Alpha", &[], "one").await;
    emit_sentinel(&emitter, "1").await;
    assert_eq!(received_until_sentinel(&mut subscriber, "1").await, ["one"]);

    // Removing one of the two identical rules keeps the other.
    subscriber.remove_match(alpha.clone()).await.unwrap();
    emit(&emitter, "/x", "Alpha", &[], "two").await;
    emit_sentinel(&emitter, "2").await;
    assert_eq!(received_until_sentinel(&mut subscriber, "2").await, ["two"]);

    // Removing the last one stops delivery.
    subscriber.remove_match(alpha.clone()).await.unwrap();
    emit(&emitter, "/x", "Alpha", &[], "three").await;
    emit_sentinel(&emitter, "3").await;
    assert!(received_until_sentinel(&mut subscriber, "3")
        .await
        .is_empty());

    // A rule that is not there cannot be removed.
    let error = subscriber.remove_match(alpha).await.unwrap_err();
    assert_eq!(error.name, "org.pbus.Error.InvalidArgs");

    // The library: dropping one of two streams with the same rule leaves
    // the other receiving.
    let library = bus.connect().await;
    let first = library
        .subscribe(ClientRule::new().member("Alpha"))
        .await
        .unwrap();
    let mut second = library
        .subscribe(ClientRule::new().member("Alpha"))
        .await
        .unwrap();
    drop(first);
    // Let the RemoveMatch the drop sent reach the bus before emitting.
    library.ping().await.unwrap();
    library.ping().await.unwrap();
    emit(&emitter, "/x", "Alpha", &[], "four").await;
    let signal = expect_signal(&mut second, TIMEOUT).await;
    assert_eq!(signal.decode::<Text>().unwrap().text, "four");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicast_signals_reach_only_their_destination() {
    let bus = TestBus::start();
    let emitter = bus.connect().await;
    // Two peers that would accept any broadcast, and one with no rules.
    let mut first = raw_subscriber(&bus, rule()).await;
    let mut second = raw_subscriber(&bus, rule()).await;
    let mut third = bus.raw().await;
    let named = "org.pbus.test.Unicast";
    assert_eq!(
        second.request_name(named, 0).await,
        Ok(pbus::RequestNameResult::PrimaryOwner)
    );

    let unicast = |destination: String, id: &'static str| {
        let emitter = emitter.clone();
        async move {
            emitter
                .signal("/u", "Direct")
                .destination(&destination)
                .emit(Outgoing::new(&Text::new(id)))
                .await
                .unwrap();
        }
    };
    unicast(first.unique_name().to_owned(), "to-first").await;
    unicast(named.to_owned(), "to-second").await;
    unicast(third.unique_name().to_owned(), "to-third").await;
    emitter.ping().await.unwrap();
    emit_sentinel(&emitter, "end").await;

    assert_eq!(
        received_until_sentinel(&mut first, "end").await,
        ["to-first"]
    );
    assert_eq!(
        received_until_sentinel(&mut second, "end").await,
        ["to-second"]
    );
    // The third peer has no match rules, so it gets no sentinel; a round
    // trip shows what it was sent.
    let got = third.take_delivered().await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].decode::<Text>().text, "to-third");
    assert_eq!(got[0].header.destination, third.unique_name());
    assert_eq!(got[0].sender_name(), emitter.unique_name());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_match_rules_are_refused() {
    let bus = TestBus::start();
    let observer = bus.connect().await;
    let mut client = bus.raw().await;
    let cases = [
        (
            "a sender that is no bus name",
            MatchRule {
                sender: "nodots".into(),
                ..rule()
            },
            "invalid bus name",
        ),
        (
            "a relative path",
            MatchRule {
                path: "a/b".into(),
                ..rule()
            },
            "invalid object path",
        ),
        (
            "a path with a trailing slash",
            MatchRule {
                path: "/a/".into(),
                ..rule()
            },
            "invalid object path",
        ),
        (
            "a path namespace without a path",
            MatchRule {
                path_namespace: true,
                ..rule()
            },
            "path_namespace needs a path",
        ),
        (
            "a member with a dash",
            MatchRule {
                member: "Al-pha".into(),
                ..rule()
            },
            "invalid member name",
        ),
        (
            "an argument index above 63",
            with_args(rule(), &[(64, "x")]),
            "argument index above 63",
        ),
        (
            "an argument index given twice",
            with_args(rule(), &[(1, "x"), (1, "y")]),
            "argument index given twice",
        ),
    ];
    for (what, rule, says) in cases {
        let error = client.try_add_match(rule.clone()).await.expect_err(what);
        assert_eq!(
            error.code,
            ErrorCode::InvalidArgs as i32,
            "{what}: {error:?}"
        );
        assert!(
            error.message.contains(says),
            "{what}: {error:?} lacks {says:?}"
        );
        // Nothing was added, so there is nothing to remove either.
        let error = client.remove_match(rule).await.expect_err(what);
        assert_eq!(
            error.code,
            ErrorCode::InvalidArgs as i32,
            "{what}: {error:?}"
        );
    }
    let stats = peer_stats(&observer, client.unique_name()).await;
    assert_eq!(stats.match_rules, 0, "{stats:?}");
    // The connection is unharmed: a good rule still works.
    client
        .add_match(MatchRule {
            member: "Alpha".into(),
            ..rule()
        })
        .await;
    emit(&observer, "/x", "Alpha", &[], "after").await;
    let signal = client
        .recv_until(TIMEOUT, |frame| {
            frame.kind() == MessageKind::Signal && !frame.is_bus_signal()
        })
        .await
        .unwrap();
    assert_eq!(signal.decode::<Text>().text, "after");
}
