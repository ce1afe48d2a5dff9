//! Pids the bus reports are translated into the pid namespace of whoever
//! reads them: a peer's pid as seen from there, or 0 when it is not
//! visible there. Real processes in real pid namespaces (`unshare`,
//! `nsenter`, see [`pbus_tests::containers`]); every pid is compared with
//! the kernel's `NSpid` for the process.
//!
//! * A host peer and a peer in a child pid namespace (also one with a user
//!   namespace): the host peer sees the namespaced peer's host pid (on the
//!   reply it sends, in GetPeerIdentity); the namespaced peer sees the host
//!   peer as 0 on the call it receives and in GetPeerIdentity (when policy
//!   lets it see the host peer at all), and itself as pid 1.
//! * Two peers in the same child pid namespace see each other's inner pids,
//!   stamped both ways and in GetPeerIdentity.
//! * A peer in a nested pid namespace and one in the parent namespace: the
//!   parent sees the nested peer's pid in the parent namespace, the nested
//!   peer sees the parent peer as 0; the host sees both host pids.
//!
//! Calls go from the host to containers and within one container, which
//! any policy allows; replies are never policy-checked.
#![forbid(unsafe_code)]

use pbus::ErrorCode;
use pbus_tests::containers::{
    container_or_skip, who_am_i, ContainerPeer, ContainerView, FakeContainer, Isolation, Join,
    Placement, Shape,
};
use pbus_tests::{require_root, TestBus, TIMEOUT};

/// A fake container to hold namespaced peers (and to clean them up), or
/// `None` when the test skips.
fn container(shape: Shape) -> Option<FakeContainer> {
    container_or_skip(
        shape,
        &[Placement::Both, Placement::Unified, Placement::SystemdV1],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_child_namespace_peers_see_translated_pids() {
    if !require_root("running peers in new pid namespaces") {
        return;
    }
    let Some(container) = container(Shape::Plain) else {
        return;
    };
    let bus = TestBus::start();
    let observer = bus.connect().await;
    let mut host = ContainerPeer::on_host(&bus, &["interact", "org.pbus.test.Host"]).await;
    let host_name = host.ready().await;
    assert_eq!(
        host.nspids(),
        [host.host_pid()],
        "the host peer is on the host"
    );

    for (what, isolation, service) in [
        ("pid namespace", Isolation::pid(), "org.pbus.test.Inner"),
        (
            "user and pid namespaces",
            Isolation::pid().with_user(),
            "org.pbus.test.InnerUser",
        ),
    ] {
        let mut inner = container
            .spawn_peer(&bus, isolation, &["interact", service])
            .await;
        let inner_name = inner.ready().await;
        assert_eq!(inner.nspids().len(), 2, "{what}: one level down");
        assert_eq!(inner.ns_pid(), 1, "{what}: init of its namespace");
        assert_ne!(inner.host_pid(), 1);

        // Host peer -> namespaced peer: the call reaches it stamped with
        // pid 0 (the host peer does not exist in its namespace); its reply
        // reaches the host peer stamped with its host pid. (By unique
        // name: the host never resolves a name owned in another pid
        // namespace's name scope.)
        let seen = host
            .who_is(&inner_name)
            .await
            .expect("the host may call in");
        assert_eq!(seen.sender, inner_name, "{what}");
        assert_eq!(seen.sender_pid, inner.host_pid(), "{what}: reply stamp");
        assert_eq!(seen.own_pid, inner.ns_pid(), "{what}: its own getpid");
        assert_eq!(seen.caller, host_name, "{what}");
        assert_eq!(seen.caller_pid, 0, "{what}: call stamp seen inside");

        // GetPeerIdentity, both ways.
        let from_host = host.identity_of(&inner_name).await.expect("visible");
        assert_eq!(from_host.pid, inner.host_pid(), "{what}");
        assert_eq!(
            from_host.host_pid,
            inner.host_pid(),
            "{what}: asked from the host"
        );
        let itself = inner.identity_of("").await.expect("own identity");
        assert_eq!(itself.pid, 1, "{what}: itself, from inside");
        assert_eq!(
            itself.host_pid, 0,
            "{what}: no host pid for a container, even root"
        );
        match inner.identity_of(&host_name).await {
            Ok(view) => {
                assert_eq!(view.pid, 0, "{what}: the host peer from inside");
                assert_eq!(view.host_pid, 0, "{what}: the host peer from inside");
            }
            // A policy that hides the host from containers answers as for
            // a peer that does not exist; then there is no pid to check.
            Err(error) => {
                assert_eq!(
                    error.code,
                    ErrorCode::NoSuchPeer as i32,
                    "{what}: {error:?}"
                );
                eprintln!("note: {what}: policy hides the host peer from the container");
            }
        }

        // The test process (another host peer) agrees with the host peer.
        let identity = observer.peer_identity(&inner_name).await.unwrap();
        assert_eq!(identity.pid, inner.host_pid(), "{what}");
        assert_eq!(identity.host_pid, inner.host_pid(), "{what}");
        let (stamp, said) = who_am_i(&observer, &inner_name).await;
        assert_eq!(stamp.pid, inner.host_pid(), "{what}");
        assert_eq!(said.pid, 1, "{what}");
        assert_eq!(said.caller.expect("caller").pid, 0, "{what}");
        assert!(inner.finish(TIMEOUT).success(), "{what}");
    }

    // And the host peer is stamped with its real pid for the host.
    let (stamp, said) = who_am_i(&observer, "org.pbus.test.Host").await;
    assert_eq!(stamp.pid, host.host_pid());
    assert_eq!(said.pid, host.host_pid());
    assert_eq!(said.caller.expect("caller").pid, std::process::id());
    assert!(host.finish(TIMEOUT).success());
    container.remove_or_panic("the container");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_in_the_same_child_namespace_see_inner_pids() {
    if !require_root("running peers in a new pid namespace") {
        return;
    }
    let Some(container) = container(Shape::Plain) else {
        return;
    };
    let bus = TestBus::start();
    let observer = bus.connect().await;
    let mut first = container
        .spawn_peer(&bus, Isolation::pid(), &["interact", "org.pbus.test.First"])
        .await;
    let first_name = first.ready().await;
    let mut second = container
        .spawn_joining(
            &bus,
            &first,
            Join::Same,
            &["interact", "org.pbus.test.Second"],
        )
        .await;
    let second_name = second.ready().await;
    assert_eq!(first.namespace("pid"), second.namespace("pid"));
    assert_eq!(first.namespace("mnt"), second.namespace("mnt"));
    assert_eq!(first.ns_pid(), 1);
    assert_eq!(second.nspids().len(), 2);
    assert!(second.ns_pid() > 1, "{:?}", second.nspids());
    assert_ne!(second.ns_pid(), second.host_pid());

    let seen = first
        .who_is("org.pbus.test.Second")
        .await
        .expect("same namespace");
    assert_eq!(seen.sender, second_name);
    assert_eq!(seen.sender_pid, second.ns_pid(), "reply stamp, inner pid");
    assert_eq!(seen.own_pid, second.ns_pid());
    assert_eq!(seen.caller, first_name);
    assert_eq!(seen.caller_pid, first.ns_pid(), "call stamp, inner pid");

    let seen = second
        .who_is("org.pbus.test.First")
        .await
        .expect("same namespace");
    assert_eq!(seen.sender, first_name);
    assert_eq!(seen.sender_pid, first.ns_pid(), "reply stamp, inner pid");
    assert_eq!(seen.own_pid, first.ns_pid());
    assert_eq!(seen.caller, second_name);
    assert_eq!(seen.caller_pid, second.ns_pid(), "call stamp, inner pid");

    let view = first.identity_of(&second_name).await.expect("visible");
    assert_eq!(view.pid, second.ns_pid());
    let view = second.identity_of(&first_name).await.expect("visible");
    assert_eq!(view.pid, first.ns_pid());

    // From the host, both are their host pids.
    for peer in [&first, &second] {
        let identity = observer.peer_identity(peer.unique_name()).await.unwrap();
        assert_eq!(identity.pid, peer.host_pid(), "{}", peer.unique_name());
    }
    assert!(second.finish(TIMEOUT).success());
    assert!(first.finish(TIMEOUT).success());
    container.remove_or_panic("the container");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_pid_namespace_peer_and_parent_namespace_peer() {
    if !require_root("running peers in nested pid namespaces") {
        return;
    }
    // Both in one (Docker-shaped) container, as a process that unshares a
    // pid namespace inside a container stays in that container.
    let Some(container) = container(Shape::DockerCgroupfs) else {
        return;
    };
    let bus = TestBus::start();
    let observer = bus.connect().await;
    let mut parent = container
        .spawn_peer(
            &bus,
            Isolation::pid(),
            &["interact", "org.pbus.test.Parent"],
        )
        .await;
    let parent_name = parent.ready().await;
    let mut nested = container
        .spawn_joining(
            &bus,
            &parent,
            Join::NestedPid,
            &["interact", "org.pbus.test.Nested"],
        )
        .await;
    let nested_name = nested.ready().await;
    assert_eq!(parent.nspids().len(), 2, "{:?}", parent.nspids());
    assert_eq!(nested.nspids().len(), 3, "{:?}", nested.nspids());
    assert_ne!(nested.namespace("pid"), parent.namespace("pid"));
    assert_eq!(nested.ns_pid(), 1);
    let nested_in_parent_namespace = nested.nspids()[1];
    assert!(nested_in_parent_namespace > 1);

    // Parent -> nested: the reply carries the nested peer's pid in the
    // parent's namespace; the call reached the nested peer with pid 0.
    let seen = parent
        .who_is("org.pbus.test.Nested")
        .await
        .expect("same container");
    assert_eq!(seen.sender, nested_name);
    assert_eq!(seen.sender_pid, nested_in_parent_namespace);
    assert_eq!(seen.own_pid, 1);
    assert_eq!(seen.caller, parent_name);
    assert_eq!(seen.caller_pid, 0, "the parent is not visible from below");

    // Nested -> parent: the mirror image.
    let seen = nested
        .who_is("org.pbus.test.Parent")
        .await
        .expect("same container");
    assert_eq!(seen.sender, parent_name);
    assert_eq!(seen.sender_pid, 0, "the parent is not visible from below");
    assert_eq!(seen.own_pid, parent.ns_pid());
    assert_eq!(seen.caller, nested_name);
    assert_eq!(seen.caller_pid, nested_in_parent_namespace);

    // GetPeerIdentity from each namespace.
    let view = parent.identity_of(&nested_name).await.expect("visible");
    assert_eq!(view.pid, nested_in_parent_namespace);
    let view = nested.identity_of(&parent_name).await.expect("visible");
    assert_eq!((view.pid, view.host_pid), (0, 0));
    assert_eq!(nested.identity_of("").await.expect("itself").pid, 1);
    assert_eq!(parent.identity_of("").await.expect("itself").pid, 1);

    // From the host: host pids, and the host is invisible to both.
    for peer in [&parent, &nested] {
        let identity = observer.peer_identity(peer.unique_name()).await.unwrap();
        assert_eq!(identity.pid, peer.host_pid(), "{}", peer.unique_name());
    }
    // By unique name: the host does not resolve a container's names.
    let (stamp, said) = who_am_i(&observer, &nested_name).await;
    assert_eq!(stamp.pid, nested.host_pid());
    assert_eq!(said.pid, 1);
    assert_eq!(said.caller.expect("caller").pid, 0);

    assert!(nested.finish(TIMEOUT).success());
    assert!(parent.finish(TIMEOUT).success());
    container.remove_or_panic("the container");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_signals_are_stamped_for_each_receivers_namespace() {
    if !require_root("running peers in nested pid namespaces") {
        return;
    }
    let Some(container) = container(Shape::DockerCgroupfs) else {
        return;
    };
    let bus = TestBus::start();
    let observer = bus.connect().await;
    // Two peers in one child pid namespace, one nested below it, one host
    // peer, and the test process on the host.
    let mut parent = container
        .spawn_peer(&bus, Isolation::pid(), &["interact", "-"])
        .await;
    let parent_name = parent.ready().await;
    let mut sibling = container
        .spawn_joining(&bus, &parent, Join::Same, &["interact", "-"])
        .await;
    sibling.ready().await;
    let mut nested = container
        .spawn_joining(&bus, &parent, Join::NestedPid, &["interact", "-"])
        .await;
    let nested_name = nested.ready().await;
    let mut host = ContainerPeer::on_host(&bus, &["interact", "-"]).await;
    let host_name = host.ready().await;

    // From the nested namespace: both receivers one level up see the pid
    // it has there (one encoded copy for their namespace, shared).
    parent.listen("FromNested").await;
    sibling.listen("FromNested").await;
    nested.emit("FromNested", "n").await;
    for receiver in [&mut parent, &mut sibling] {
        let seen = receiver.next_signal("FromNested").await.expect("delivered");
        assert_eq!(
            (seen.sender.as_str(), seen.text.as_str()),
            (nested_name.as_str(), "n")
        );
        assert_eq!(seen.sender_pid, nested.nspids()[1]);
        assert_eq!(seen.container, container.expected());
    }

    // From the child namespace: its sibling sees its inner pid, the nested
    // peer sees 0.
    sibling.listen("FromParent").await;
    nested.listen("FromParent").await;
    parent.emit("FromParent", "p").await;
    let seen = sibling.next_signal("FromParent").await.expect("delivered");
    assert_eq!(
        (seen.sender.as_str(), seen.sender_pid),
        (parent_name.as_str(), 1)
    );
    let seen = nested.next_signal("FromParent").await.expect("delivered");
    assert_eq!(
        (seen.sender.as_str(), seen.sender_pid),
        (parent_name.as_str(), 0)
    );

    // From the host: every namespaced receiver sees 0, the host receiver
    // the host pid.
    for receiver in [&mut parent, &mut sibling, &mut nested] {
        receiver.listen("FromHost").await;
    }
    let mut on_host = observer
        .subscribe(pbus::MatchRule::new().member("FromHost"))
        .await
        .unwrap();
    host.emit("FromHost", "h").await;
    for receiver in [&mut parent, &mut sibling, &mut nested] {
        let seen = receiver.next_signal("FromHost").await.expect("delivered");
        assert_eq!(
            (seen.sender.as_str(), seen.sender_pid),
            (host_name.as_str(), 0)
        );
        assert_eq!(seen.container, ContainerView::host());
    }
    let signal = pbus_tests::expect_signal(&mut on_host, TIMEOUT).await;
    assert_eq!(signal.sender().unique_name, host_name);
    assert_eq!(signal.sender().pid, host.host_pid());

    for peer in [&mut host, &mut nested, &mut sibling, &mut parent] {
        assert!(peer.finish(TIMEOUT).success());
    }
    container.remove_or_panic("the container");
}
