//! Well-known names never cross a visibility boundary: every peer claims
//! names in its own name scope (the host, a Kubernetes pod, a container),
//! and resolves them in its own scope first and, from a container only,
//! in the host's. Checked against the real `pbusd` with peers in real
//! cgroup containers ([`pbus_tests::containers`]) running the helper's
//! `policy-probe` subcommand, and host services in the test process.
//!
//! * A container's RequestName of a name a host service owns answers
//!   PrimaryOwner (its own scope), with or without DO_NOT_QUEUE; when the
//!   host service releases the name or goes away, host root's calls to it
//!   fail with NameHasNoOwner instead of landing in the container, and a
//!   restarted host service gets the name back at once.
//! * A name a container claimed first is free for host uid 1000.
//! * Two containers owning the same name each reach their own owner and
//!   see nothing of the other's.
//! * Where policy lets a container see and call a host service, the
//!   container reaches it by well-known name; its own claim of that name
//!   then shadows the host's for its own scope only.
#![forbid(unsafe_code)]

mod policy_support;

use pbus::{Connection, RequestNameFlags, RequestNameResult};
use pbus_proto::v1::ErrorCode;
use pbus_tests::containers::{Isolation, Shape};
use pbus_tests::messages::Text;
use pbus_tests::{require_root, wait_for_async, TestBus, TIMEOUT};
use policy_support::{
    assert_refused, by_id, container, list_after, probe_as_uid, probe_in, received, HostService,
    PolicyDir,
};

const ECHO: &str = "org.example.Echo";
const B_ONLY: &str = "org.pbus.test.scopes.BOnly";

/// Host root's `Echo` call to `name`: the reply text, or the error code.
async fn host_call(root: &Connection, name: &str) -> Result<String, Option<ErrorCode>> {
    root.method_call(name, "Echo")
        .timeout(TIMEOUT)
        .call::<Text, Text>(&Text::new("for the host service"))
        .await
        .map(|reply| reply.text)
        .map_err(|error| error.code())
}

/// Waits until the bus no longer has an owner of `name` for `root`.
async fn wait_until_unowned(root: &Connection, name: &str) {
    wait_for_async(&format!("{name} to lose its owner"), TIMEOUT, || async {
        !root.name_has_owner(name).await.expect("NameHasOwner")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_claims_a_host_name_in_its_own_scope_and_never_receives_host_calls() {
    if !require_root("running peers in fake containers") {
        return;
    }
    let Some(box_a) = container(Shape::DockerCgroupfs) else {
        return;
    };
    let bus = TestBus::start();
    let host = HostService::start(&bus, ECHO).await;
    let root = bus.connect().await;
    let mut a = probe_in(&box_a, &bus, Isolation::container(), "-").await;
    let mut a2 = probe_in(&box_a, &bus, Isolation::none(), "-").await;
    let a_unique = a.unique_name().to_owned();

    // Neither refused nor queued behind the host's owner, nor told it exists.
    assert_eq!(
        a.ask(&format!("request {ECHO} do-not-queue")).await,
        "request PrimaryOwner"
    );
    assert_eq!(a.ask(&format!("release {ECHO}")).await, "release Released");
    assert_eq!(
        a.ask(&format!("request {ECHO}")).await,
        "request PrimaryOwner"
    );
    assert_eq!(
        a2.ask(&format!("owner {ECHO}")).await,
        format!("owner {a_unique}")
    );

    // Host root still reaches the host service.
    assert_eq!(
        host_call(&root, ECHO).await,
        Ok("host Echo".to_owned()),
        "host root's call before the release"
    );
    assert_eq!(
        host.calls(),
        [("Echo".to_owned(), root.unique_name().to_owned())]
    );

    // The host service lets the name go: host root's next call finds no
    // owner, and nothing of it reaches the container.
    assert_eq!(
        host.connection.release_name(ECHO).await.unwrap(),
        pbus::ReleaseNameResult::Released
    );
    assert_eq!(
        host_call(&root, ECHO).await,
        Err(Some(ErrorCode::NameHasNoOwner))
    );
    assert!(!root.name_has_owner(ECHO).await.unwrap());
    assert_eq!(received(&mut a, "Echo").await, 0, "a host call reached A");

    // Inside the container the name leads to the container's own owner.
    assert_eq!(
        a2.ask(&format!("call {ECHO} Echo")).await,
        "ok Echo fds=0 memfds=0"
    );
    assert_eq!(received(&mut a, "Echo").await, 1);
    assert_eq!(host.calls().len(), 1, "A2's call reached the host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_host_service_gets_its_name_back_from_under_a_queued_container() {
    if !require_root("running peers in fake containers") {
        return;
    }
    let Some(box_a) = container(Shape::DockerSystemd) else {
        return;
    };
    let bus = TestBus::start();
    let root = bus.connect().await;
    let first = HostService::start(&bus, ECHO).await;
    let mut a = probe_in(&box_a, &bus, Isolation::container(), "-").await;
    // Under the old single registry this queued A behind the host service.
    assert_eq!(
        a.ask(&format!("request {ECHO}")).await,
        "request PrimaryOwner"
    );

    // The host service goes away: the name is not handed to A.
    first.connection.close();
    wait_until_unowned(&root, ECHO).await;
    assert_eq!(
        host_call(&root, ECHO).await,
        Err(Some(ErrorCode::NameHasNoOwner))
    );

    // Its successor claims the name and gets it, not a place in a queue.
    let second = bus.connect().await;
    assert_eq!(
        second
            .request_name(
                ECHO,
                RequestNameFlags {
                    do_not_queue: true,
                    ..RequestNameFlags::default()
                }
            )
            .await
            .unwrap(),
        RequestNameResult::PrimaryOwner
    );
    second
        .serve("Echo", |_request: Text, _call| async {
            Ok(Text::new("second host service"))
        })
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            host_call(&root, ECHO).await,
            Ok("second host service".to_owned())
        );
    }
    assert_eq!(
        root.get_name_owner(ECHO).await.unwrap(),
        second.unique_name()
    );
    assert_eq!(received(&mut a, "Echo").await, 0, "a host call reached A");
    // A still holds the name in its own scope.
    assert_eq!(
        a.ask(&format!("owner {ECHO}")).await,
        format!("owner {}", a.unique_name())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_a_container_claimed_first_is_free_on_the_host() {
    if !require_root("running peers in fake containers and as uid 1000") {
        return;
    }
    let Some(box_a) = container(Shape::Podman) else {
        return;
    };
    let bus = TestBus::start();
    let mut a = probe_in(&box_a, &bus, Isolation::container(), ECHO).await;
    let (mut user, user_unique) = probe_as_uid(&bus, 1000, "-").await;
    assert_eq!(
        user.ask(&format!("has-owner {ECHO}")).await,
        "has-owner false"
    );
    assert_eq!(
        user.ask(&format!("request {ECHO} do-not-queue")).await,
        "request PrimaryOwner"
    );
    assert_eq!(
        user.ask(&format!("owner {ECHO}")).await,
        format!("owner {user_unique}")
    );
    // Each side keeps its own owner.
    assert_eq!(
        a.ask(&format!("owner {ECHO}")).await,
        format!("owner {}", a.unique_name())
    );
    assert_eq!(
        user.ask(&format!("call {ECHO} Echo")).await,
        "ok Echo fds=0 memfds=0"
    );
    assert_eq!(received(&mut user, "Echo").await, 1);
    assert_eq!(
        received(&mut a, "Echo").await,
        0,
        "uid 1000's call reached A"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_containers_own_the_same_name_each_for_itself() {
    if !require_root("running peers in fake containers") {
        return;
    }
    let (Some(box_a), Some(box_b)) = (container(Shape::DockerCgroupfs), container(Shape::KubeCrio))
    else {
        return;
    };
    let bus = TestBus::start();
    let root = bus.connect().await;
    let mut a = probe_in(&box_a, &bus, Isolation::container(), ECHO).await;
    let mut a2 = probe_in(&box_a, &bus, Isolation::none(), "-").await;
    let mut b = probe_in(&box_b, &bus, Isolation::container(), ECHO).await;
    let mut b2 = probe_in(&box_b, &bus, Isolation::none(), B_ONLY).await;
    let (a_unique, b_unique) = (a.unique_name().to_owned(), b.unique_name().to_owned());

    assert_eq!(
        a2.ask(&format!("call {ECHO} Echo")).await,
        "ok Echo fds=0 memfds=0"
    );
    for _ in 0..2 {
        assert_eq!(
            b2.ask(&format!("call {ECHO} Echo")).await,
            "ok Echo fds=0 memfds=0"
        );
    }
    assert_eq!(received(&mut a, "Echo").await, 1);
    assert_eq!(received(&mut b, "Echo").await, 2);

    assert_eq!(
        a2.ask(&format!("owner {ECHO}")).await,
        format!("owner {a_unique}")
    );
    assert_eq!(
        b2.ask(&format!("owner {ECHO}")).await,
        format!("owner {b_unique}")
    );
    assert_eq!(
        a2.ask(&format!("has-owner {B_ONLY}")).await,
        "has-owner false"
    );
    assert_eq!(
        b.ask(&format!("has-owner {B_ONLY}")).await,
        "has-owner true"
    );
    assert_eq!(
        list_after(&a2.ask(&format!("queued {ECHO}")).await, "queued"),
        std::slice::from_ref(&a_unique)
    );

    // ListNames: each container lists its own ECHO owner and nothing of
    // the other (names or unique names).
    let names_a = list_after(&a2.ask("names").await, "names");
    let names_b = list_after(&b2.ask("names").await, "names");
    assert_eq!(names_a.iter().filter(|name| *name == ECHO).count(), 1);
    assert!(
        !names_a
            .iter()
            .any(|name| name == B_ONLY || *name == b_unique),
        "A sees B: {names_a:?}"
    );
    assert!(names_b.iter().any(|name| name == B_ONLY), "{names_b:?}");
    assert!(!names_b.contains(&a_unique), "B sees A: {names_b:?}");

    // The host resolves neither by well-known name; it reaches both by
    // unique name.
    assert!(!root.name_has_owner(ECHO).await.unwrap());
    assert_eq!(
        host_call(&root, ECHO).await,
        Err(Some(ErrorCode::NameHasNoOwner))
    );
    for unique in [&a_unique, &b_unique] {
        assert_eq!(
            host_call(&root, unique).await,
            Ok("Echo fds=0 memfds=0".to_owned()),
            "host root calls {unique}"
        );
    }
    assert_eq!(received(&mut a, "Echo").await, 2);
    assert_eq!(received(&mut b, "Echo").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_reaches_an_allowed_host_name_until_its_own_claim_shadows_it() {
    if !require_root("running peers in fake containers") {
        return;
    }
    let (Some(box_a), Some(box_b)) = (container(Shape::DockerCgroupfs), container(Shape::Podman))
    else {
        return;
    };
    let policy = PolicyDir::new();
    let mut rules = String::new();
    for subject in [by_id("docker", &box_a), by_id("podman", &box_b)] {
        rules.push_str(&format!(
            "[[rule]]\nallow = [\"see\", \"talk\"]\nsubject = {subject}\nname = \"{ECHO}\"\n\n"
        ));
    }
    policy.write("50-echo.toml", &rules);
    let bus = policy.start_bus();
    let root = bus.connect().await;
    let host = HostService::start(&bus, ECHO).await;
    let host_unique = host.connection.unique_name().to_owned();
    let mut a = probe_in(&box_a, &bus, Isolation::container(), "-").await;
    let mut a2 = probe_in(&box_a, &bus, Isolation::none(), "-").await;
    let mut b = probe_in(&box_b, &bus, Isolation::container(), "-").await;
    let a_unique = a.unique_name().to_owned();

    // Allowed by policy, the container reaches the host service by name.
    assert_eq!(a2.ask(&format!("call {ECHO} Echo")).await, "ok host Echo");
    assert_eq!(
        a2.ask(&format!("owner {ECHO}")).await,
        format!("owner {host_unique}")
    );
    assert!(list_after(&a2.ask("names").await, "names").contains(&ECHO.to_owned()));

    // A's claim: its own scope, at once, and only A's scope follows it.
    assert_eq!(
        a.ask(&format!("request {ECHO} do-not-queue")).await,
        "request PrimaryOwner"
    );
    assert_eq!(
        a2.ask(&format!("call {ECHO} Echo")).await,
        "ok Echo fds=0 memfds=0"
    );
    assert_eq!(
        a2.ask(&format!("owner {ECHO}")).await,
        format!("owner {a_unique}")
    );
    assert_eq!(received(&mut a, "Echo").await, 1);
    // B and the host still reach the host service.
    assert_eq!(b.ask(&format!("call {ECHO} Echo")).await, "ok host Echo");
    assert_eq!(
        b.ask(&format!("owner {ECHO}")).await,
        format!("owner {host_unique}")
    );
    assert_eq!(host_call(&root, ECHO).await, Ok("host Echo".to_owned()));
    let callers: Vec<String> = host.calls().into_iter().map(|(_, caller)| caller).collect();
    assert_eq!(
        callers,
        [
            a2.unique_name().to_owned(),
            b.unique_name().to_owned(),
            root.unique_name().to_owned()
        ]
    );
    // A's owner stays out of the host's view under that name.
    assert_eq!(
        root.get_name_owner(ECHO).await.unwrap(),
        host_unique,
        "the host resolves its own owner"
    );
    // When A lets go, A's scope falls back to the host service again.
    assert_eq!(a.ask(&format!("release {ECHO}")).await, "release Released");
    assert_eq!(a2.ask(&format!("call {ECHO} Echo")).await, "ok host Echo");
    assert_eq!(received(&mut a, "Echo").await, 1);
    // A name the rule does not open stays hidden in the host scope.
    let closed = "org.pbus.test.scopes.Closed";
    let _closed_service = HostService::start(&bus, closed).await;
    assert_refused(
        &a2.ask(&format!("call {closed} Echo")).await,
        ErrorCode::NameHasNoOwner,
        "",
        "A calls a host name the policy does not open",
    );
}
