//! Name ownership and queueing against the real daemon, with the D-Bus
//! RequestName semantics: every combination of the owner's and the
//! requester's flags (allow-replacement, replace-existing, do-not-queue:
//! 8 x 8), the results of RequestName and ReleaseName, the queue as
//! ListQueuedOwners reports it, GetNameOwner and NameHasOwner, promotion
//! of the queue on release and on disconnect, and the NameOwnerChanged
//! (to a third, subscribed client), NameAcquired and NameLost signals.
//!
//! All clients here are raw, so every frame the bus sends them is seen:
//! a signal too many fails a test as surely as one missing.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use pbus::RequestNameFlags;
use pbus_proto::v1::{
    ErrorCode, ErrorInfo, GetNameOwnerReply, GetNameOwnerRequest, ListQueuedOwnersReply,
    ListQueuedOwnersRequest, MatchRule, MessageKind, NameAcquired, NameHasOwnerReply,
    NameHasOwnerRequest, NameLost, NameOwnerChanged, ReleaseNameResult, RequestNameResult,
};
use pbus_proto::{BUS_NAME, BUS_PATH};
use pbus_tests::{RawClient, TestBus, TIMEOUT};

const ALLOW_REPLACEMENT: u32 = 1;
const REPLACE_EXISTING: u32 = 2;
const DO_NOT_QUEUE: u32 = 4;

fn flag_names(flags: u32) -> String {
    let mut names = Vec::new();
    if flags & ALLOW_REPLACEMENT != 0 {
        names.push("allow-replacement");
    }
    if flags & REPLACE_EXISTING != 0 {
        names.push("replace-existing");
    }
    if flags & DO_NOT_QUEUE != 0 {
        names.push("do-not-queue");
    }
    if names.is_empty() {
        "none".into()
    } else {
        names.join("|")
    }
}

fn code(info: &ErrorInfo) -> ErrorCode {
    ErrorCode::try_from(info.code).unwrap_or(ErrorCode::Unspecified)
}

/// A rule for every NameOwnerChanged the bus emits.
fn owner_changed_rule() -> MatchRule {
    MatchRule {
        sender: BUS_NAME.into(),
        path: BUS_PATH.into(),
        member: "NameOwnerChanged".into(),
        ..MatchRule::default()
    }
}

async fn queued_owners(client: &mut RawClient, name: &str) -> Vec<String> {
    let reply: ListQueuedOwnersReply = client
        .bus_call(
            "ListQueuedOwners",
            &ListQueuedOwnersRequest { name: name.into() },
        )
        .await
        .unwrap_or_else(|error| panic!("ListQueuedOwners {name}: {error:?}"));
    reply.owners
}

async fn name_owner(client: &mut RawClient, name: &str) -> Result<String, ErrorInfo> {
    let reply: GetNameOwnerReply = client
        .bus_call("GetNameOwner", &GetNameOwnerRequest { name: name.into() })
        .await?;
    Ok(reply.owner)
}

async fn has_owner(client: &mut RawClient, name: &str) -> bool {
    let reply: NameHasOwnerReply = client
        .bus_call("NameHasOwner", &NameHasOwnerRequest { name: name.into() })
        .await
        .unwrap_or_else(|error| panic!("NameHasOwner {name}: {error:?}"));
    reply.has_owner
}

/// Checks every view of `name`'s ownership against `queue` (primary owner
/// first): ListQueuedOwners, GetNameOwner, NameHasOwner.
async fn assert_queue(client: &mut RawClient, name: &str, queue: &[&str], context: &str) {
    if queue.is_empty() {
        assert!(!has_owner(client, name).await, "{context}: NameHasOwner");
        let error = name_owner(client, name).await.expect_err(context);
        assert_eq!(code(&error), ErrorCode::NameHasNoOwner, "{context}");
        let error: ErrorInfo = client
            .bus_call::<_, ListQueuedOwnersReply>(
                "ListQueuedOwners",
                &ListQueuedOwnersRequest { name: name.into() },
            )
            .await
            .expect_err(context);
        assert_eq!(code(&error), ErrorCode::NameHasNoOwner, "{context}");
        return;
    }
    assert_eq!(queued_owners(client, name).await, queue, "{context}: queue");
    assert_eq!(
        name_owner(client, name).await.as_deref(),
        Ok(queue[0]),
        "{context}: GetNameOwner"
    );
    assert!(has_owner(client, name).await, "{context}: NameHasOwner");
}

/// What a set of clients should have been told about one name.
#[derive(Debug, Default)]
struct Expected {
    /// NameOwnerChanged (old, new) in order, to the observer.
    owner_changes: Vec<(String, String)>,
    /// NameAcquired / NameLost in order, per unique name.
    unicast: HashMap<String, Vec<&'static str>>,
}

impl Expected {
    fn change(&mut self, old: &str, new: &str) {
        self.owner_changes.push((old.into(), new.into()));
        if !old.is_empty() {
            self.unicast.entry(old.into()).or_default().push("NameLost");
        }
        if !new.is_empty() {
            self.unicast
                .entry(new.into())
                .or_default()
                .push("NameAcquired");
        }
    }
}

/// Reads what the observer and each party got since the last check and
/// compares it with `expected` (which is then reset).
async fn assert_signals(
    observer: &mut RawClient,
    parties: &mut [&mut RawClient],
    name: &str,
    expected: &mut Expected,
    context: &str,
) {
    observer.sync().await;
    let mut changes = Vec::new();
    for frame in observer.take_inbox() {
        assert!(frame.is_bus_signal(), "{context}: observer got {frame:?}");
        assert_eq!(frame.header.member, "NameOwnerChanged", "{context}");
        let body: NameOwnerChanged = frame.decode();
        assert_eq!(
            frame.header.args,
            [
                body.name.clone(),
                body.old_owner.clone(),
                body.new_owner.clone()
            ],
            "{context}: args mirror the body"
        );
        assert_eq!(
            body.name, name,
            "{context}: NameOwnerChanged for another name"
        );
        changes.push((body.old_owner, body.new_owner));
    }
    assert_eq!(
        changes, expected.owner_changes,
        "{context}: NameOwnerChanged seen by the observer"
    );
    for party in parties.iter_mut() {
        party.sync().await;
        let mut got = Vec::new();
        for frame in party.take_inbox() {
            assert!(frame.is_bus_signal(), "{context}: {frame:?}");
            assert_eq!(
                frame.header.destination,
                party.unique_name(),
                "{context}: NameAcquired/NameLost are unicast"
            );
            let signalled = match frame.header.member.as_str() {
                "NameAcquired" => frame.decode::<NameAcquired>().name,
                "NameLost" => frame.decode::<NameLost>().name,
                other => panic!(
                    "{context}: unexpected signal {other} to {}",
                    party.unique_name()
                ),
            };
            assert_eq!(signalled, name, "{context}");
            assert_eq!(frame.header.args, [name], "{context}");
            got.push(if frame.header.member == "NameAcquired" {
                "NameAcquired"
            } else {
                "NameLost"
            });
        }
        let want = expected
            .unicast
            .get(party.unique_name())
            .cloned()
            .unwrap_or_default();
        assert_eq!(got, want, "{context}: signals to {}", party.unique_name());
    }
    *expected = Expected::default();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flag_combination_of_owner_and_requester() {
    let bus = TestBus::start();
    let mut a = bus.raw().await;
    let mut b = bus.raw().await;
    let mut observer = bus.raw().await;
    observer.add_match(owner_changed_rule()).await;
    observer.sync().await;
    observer.take_inbox();
    let (a_name, b_name) = (a.unique_name().to_owned(), b.unique_name().to_owned());
    let (ua, ub) = (a_name.as_str(), b_name.as_str());

    for owner_flags in 0..8u32 {
        for request_flags in 0..8u32 {
            let name = format!("org.pbus.test.Flags.O{owner_flags}.R{request_flags}");
            let context = format!(
                "owner {} / requester {}",
                flag_names(owner_flags),
                flag_names(request_flags)
            );
            let mut expected = Expected::default();

            assert_eq!(
                a.request_name(&name, owner_flags).await,
                Ok(RequestNameResult::PrimaryOwner),
                "{context}"
            );
            expected.change("", ua);
            assert_eq!(
                a.request_name(&name, owner_flags).await,
                Ok(RequestNameResult::AlreadyOwner),
                "{context}: asking again"
            );

            let replaces =
                request_flags & REPLACE_EXISTING != 0 && owner_flags & ALLOW_REPLACEMENT != 0;
            let (result, queue): (RequestNameResult, Vec<&str>) = if replaces {
                expected.change(ua, ub);
                if owner_flags & DO_NOT_QUEUE != 0 {
                    (RequestNameResult::PrimaryOwner, vec![ub])
                } else {
                    (RequestNameResult::PrimaryOwner, vec![ub, ua])
                }
            } else if request_flags & DO_NOT_QUEUE != 0 {
                (RequestNameResult::Exists, vec![ua])
            } else {
                (RequestNameResult::InQueue, vec![ua, ub])
            };
            assert_eq!(
                b.request_name(&name, request_flags).await,
                Ok(result),
                "{context}"
            );
            assert_queue(&mut observer, &name, &queue, &context).await;
            assert_signals(
                &mut observer,
                &mut [&mut a, &mut b],
                &name,
                &mut expected,
                &context,
            )
            .await;

            // A client that neither owns nor waits cannot release.
            assert_eq!(
                observer.release_name(&name).await,
                Ok(ReleaseNameResult::NotOwner),
                "{context}"
            );

            // Leaving the queue (not the primary) announces nothing.
            let mut queue = queue;
            if queue.len() == 2 && queue[0] == ua {
                assert_eq!(
                    b.release_name(&name).await,
                    Ok(ReleaseNameResult::Released),
                    "{context}: leaving the queue"
                );
                queue.pop();
                assert_queue(&mut observer, &name, &queue, &context).await;
                assert_eq!(
                    b.request_name(&name, request_flags).await,
                    Ok(RequestNameResult::InQueue),
                    "{context}: queueing again"
                );
                queue.push(ub);
            }

            // Release from the front: each release promotes the next in line.
            while !queue.is_empty() {
                let primary = queue.remove(0);
                let client = if primary == ua { &mut a } else { &mut b };
                assert_eq!(
                    client.release_name(&name).await,
                    Ok(ReleaseNameResult::Released),
                    "{context}: {primary} releases"
                );
                expected.change(primary, queue.first().copied().unwrap_or(""));
                assert_queue(&mut observer, &name, &queue, &context).await;
            }
            assert_signals(
                &mut observer,
                &mut [&mut a, &mut b],
                &name,
                &mut expected,
                &context,
            )
            .await;
            assert_eq!(
                a.release_name(&name).await,
                Ok(ReleaseNameResult::NonExistent),
                "{context}: released twice"
            );
            assert_eq!(
                b.release_name(&name).await,
                Ok(ReleaseNameResult::NonExistent),
                "{context}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requester_asking_do_not_queue_leaves_the_queue() {
    let bus = TestBus::start();
    let name = "org.pbus.test.Leave";
    let mut a = bus.raw().await;
    let mut b = bus.raw().await;
    let (ua, ub) = (a.unique_name().to_owned(), b.unique_name().to_owned());
    assert_eq!(
        a.request_name(name, 0).await,
        Ok(RequestNameResult::PrimaryOwner)
    );
    assert_eq!(
        b.request_name(name, 0).await,
        Ok(RequestNameResult::InQueue)
    );
    assert_queue(&mut a, name, &[&ua, &ub], "queued").await;
    assert_eq!(
        b.request_name(name, DO_NOT_QUEUE).await,
        Ok(RequestNameResult::Exists)
    );
    assert_queue(&mut a, name, &[&ua], "after do-not-queue").await;
    assert_eq!(
        b.release_name(name).await,
        Ok(ReleaseNameResult::NotOwner),
        "no longer queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_changes_its_flags_by_asking_again() {
    let bus = TestBus::start();
    let name = "org.pbus.test.Flags.Update";
    let mut a = bus.raw().await;
    let mut b = bus.raw().await;
    let mut c = bus.raw().await;
    let (ua, ub, uc) = (
        a.unique_name().to_owned(),
        b.unique_name().to_owned(),
        c.unique_name().to_owned(),
    );
    assert_eq!(
        a.request_name(name, 0).await,
        Ok(RequestNameResult::PrimaryOwner)
    );
    assert_eq!(
        b.request_name(name, REPLACE_EXISTING).await,
        Ok(RequestNameResult::InQueue),
        "the owner did not allow replacement"
    );
    assert_eq!(
        a.request_name(name, ALLOW_REPLACEMENT).await,
        Ok(RequestNameResult::AlreadyOwner)
    );
    assert_eq!(
        c.request_name(name, REPLACE_EXISTING).await,
        Ok(RequestNameResult::PrimaryOwner),
        "now it does"
    );
    assert_queue(
        &mut a,
        name,
        &[&uc, &ua, &ub],
        "replaced owner heads the queue",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_from_the_queue_moves_the_requester_to_the_front() {
    let bus = TestBus::start();
    let name = "org.pbus.test.Jump";
    let mut a = bus.raw().await;
    let mut b = bus.raw().await;
    let mut c = bus.raw().await;
    let (ua, ub, uc) = (
        a.unique_name().to_owned(),
        b.unique_name().to_owned(),
        c.unique_name().to_owned(),
    );
    assert_eq!(
        a.request_name(name, ALLOW_REPLACEMENT).await,
        Ok(RequestNameResult::PrimaryOwner)
    );
    assert_eq!(
        c.request_name(name, 0).await,
        Ok(RequestNameResult::InQueue)
    );
    assert_eq!(
        b.request_name(name, 0).await,
        Ok(RequestNameResult::InQueue)
    );
    assert_queue(&mut a, name, &[&ua, &uc, &ub], "queued").await;
    assert_eq!(
        b.request_name(name, REPLACE_EXISTING).await,
        Ok(RequestNameResult::PrimaryOwner)
    );
    assert_queue(&mut a, name, &[&ub, &ua, &uc], "b jumped the queue").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_promotes_the_queue() {
    let bus = TestBus::start();
    let name = "org.pbus.test.Disconnect";
    let mut observer = bus.raw().await;
    observer.add_match(owner_changed_rule()).await;
    let mut a = bus.raw().await;
    let mut b = bus.raw().await;
    let mut c = bus.raw().await;
    let (ua, ub, uc) = (
        a.unique_name().to_owned(),
        b.unique_name().to_owned(),
        c.unique_name().to_owned(),
    );
    assert_eq!(
        a.request_name(name, 0).await,
        Ok(RequestNameResult::PrimaryOwner)
    );
    assert_eq!(
        b.request_name(name, 0).await,
        Ok(RequestNameResult::InQueue)
    );
    assert_eq!(
        c.request_name(name, 0).await,
        Ok(RequestNameResult::InQueue)
    );
    observer.sync().await;
    observer.take_inbox();
    b.sync().await;
    b.take_inbox();

    // The primary owner goes away: the head of the queue takes over.
    drop(a);
    let changed = observer
        .recv_until(TIMEOUT, |frame| {
            frame.is_bus_signal() && frame.header.args.first().map(String::as_str) == Some(name)
        })
        .await
        .expect("NameOwnerChanged after the owner disconnected");
    assert_eq!(
        changed.decode::<NameOwnerChanged>(),
        NameOwnerChanged {
            name: name.into(),
            old_owner: ua.clone(),
            new_owner: ub.clone(),
        }
    );
    let acquired = b
        .recv_until(TIMEOUT, |frame| frame.kind() == MessageKind::Signal)
        .await
        .expect("NameAcquired");
    assert_eq!(acquired.header.member, "NameAcquired");
    assert_eq!(acquired.decode::<NameAcquired>().name, name);
    assert_queue(&mut observer, name, &[&ub, &uc], "after the owner left").await;
    // The unique name's own NameOwnerChanged was announced too.
    observer.sync().await;
    let unique_gone: Vec<NameOwnerChanged> = observer
        .take_inbox()
        .iter()
        .chain(std::iter::once(&changed))
        .filter(|frame| frame.is_bus_signal())
        .map(|frame| frame.decode::<NameOwnerChanged>())
        .filter(|change| change.name == ua)
        .collect();
    assert_eq!(
        unique_gone,
        [NameOwnerChanged {
            name: ua.clone(),
            old_owner: ua.clone(),
            new_owner: String::new(),
        }]
    );

    // A queued peer going away changes no owner.
    drop(c);
    let mut probe = bus.raw().await;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while queued_owners(&mut probe, name).await.len() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "c never left the queue"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_queue(&mut probe, name, &[&ub], "after the queued peer left").await;
    observer.sync().await;
    assert!(
        observer
            .take_inbox()
            .iter()
            .all(|frame| frame.header.args.first().map(String::as_str) != Some(name)),
        "no NameOwnerChanged for {name} when a queued peer leaves"
    );

    // The last owner goes: the name is gone.
    drop(b);
    let gone = observer
        .recv_until(TIMEOUT, |frame| {
            frame.is_bus_signal() && frame.header.args.first().map(String::as_str) == Some(name)
        })
        .await
        .expect("NameOwnerChanged after the last owner left");
    assert_eq!(
        gone.decode::<NameOwnerChanged>(),
        NameOwnerChanged {
            name: name.into(),
            old_owner: ub,
            new_owner: String::new(),
        }
    );
    assert_queue(&mut probe, name, &[], "no owner left").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_are_refused_with_invalid_args() {
    let bus = TestBus::start();
    let connection = bus.connect().await;
    let mut raw = bus.raw().await;
    for name in [
        "org",
        ":1.5",
        "org.pbus.Bus",
        "",
        "org..x",
        "1org.example",
        "org.example.",
    ] {
        let error = connection
            .request_name(name, RequestNameFlags::default())
            .await
            .expect_err(name);
        assert_eq!(
            error.code(),
            Some(ErrorCode::InvalidArgs),
            "RequestName {name:?}"
        );
        assert_eq!(error.name(), Some("org.pbus.Error.InvalidArgs"));
        let error = raw.release_name(name).await.expect_err(name);
        assert_eq!(code(&error), ErrorCode::InvalidArgs, "ReleaseName {name:?}");
    }
    let error = raw
        .request_name("org.pbus.test.Flags", 8)
        .await
        .expect_err("unknown flag bit");
    assert_eq!(code(&error), ErrorCode::InvalidArgs);
    assert_eq!(
        connection.list_names(false).await.unwrap(),
        [],
        "nothing was registered"
    );
}

/// The client library's view of the same semantics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_library_names_api() {
    let bus = TestBus::start();
    let name = "org.pbus.test.Library";
    let a = bus.connect().await;
    let b = bus.connect().await;
    let watcher = bus.connect().await;
    let mut watch = watcher.watch_name_owner(name).await.unwrap();
    assert_eq!(watch.current(), None);

    let allow = RequestNameFlags {
        allow_replacement: true,
        ..RequestNameFlags::default()
    };
    let replace = RequestNameFlags {
        replace_existing: true,
        ..RequestNameFlags::default()
    };
    assert_eq!(
        a.request_name(name, allow).await.unwrap(),
        RequestNameResult::PrimaryOwner
    );
    let change = pbus_tests::within("NameOwnerChanged", TIMEOUT, watch.changed())
        .await
        .unwrap();
    assert_eq!(
        (change.old_owner.as_str(), change.new_owner.as_str()),
        ("", a.unique_name())
    );
    assert_eq!(
        b.request_name(name, replace).await.unwrap(),
        RequestNameResult::PrimaryOwner
    );
    let change = pbus_tests::within("NameOwnerChanged", TIMEOUT, watch.changed())
        .await
        .unwrap();
    assert_eq!(
        (change.old_owner.as_str(), change.new_owner.as_str()),
        (a.unique_name(), b.unique_name())
    );
    assert_eq!(watch.current(), Some(b.unique_name()));
    assert_eq!(
        watcher.list_queued_owners(name).await.unwrap(),
        [b.unique_name(), a.unique_name()]
    );
    assert_eq!(watcher.get_name_owner(name).await.unwrap(), b.unique_name());
    assert!(watcher.name_has_owner(name).await.unwrap());
    let listed = watcher.list_names(false).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].name.as_str(),
            listed[0].owner.as_str(),
            listed[0].queued
        ),
        (name, b.unique_name(), 1)
    );
    assert_eq!(
        watcher.release_name(name).await.unwrap(),
        ReleaseNameResult::NotOwner
    );
    assert_eq!(
        b.release_name(name).await.unwrap(),
        ReleaseNameResult::Released
    );
    let change = pbus_tests::within("NameOwnerChanged", TIMEOUT, watch.changed())
        .await
        .unwrap();
    assert_eq!(
        (change.old_owner.as_str(), change.new_owner.as_str()),
        (b.unique_name(), a.unique_name())
    );
    a.close();
    let change = pbus_tests::within("NameOwnerChanged", TIMEOUT, watch.changed())
        .await
        .unwrap();
    assert_eq!(
        (change.old_owner.as_str(), change.new_owner.as_str()),
        (a.unique_name(), "")
    );
    assert!(!watcher.name_has_owner(name).await.unwrap());
    assert_eq!(
        b.release_name(name).await.unwrap(),
        ReleaseNameResult::NonExistent
    );
}
