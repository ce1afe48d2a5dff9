//! Living with a policy: reloading it under connected peers, refusing a
//! bad one, checking and explaining it with `pbusctl`, and keeping its
//! administration to root on the host. Real `pbusd`, peers in real cgroup
//! containers and under other uids (the helper's `policy-probe`).
//!
//! * SIGHUP (sent to the daemon's pid), `pbusctl policy reload` and
//!   `Connection::reload_policy` each install the new files without
//!   dropping anyone: container and host peers (root and uid 65534) stay
//!   connected with the same unique names, and the new rules decide for
//!   them at once (a call denied before goes through after, and vice
//!   versa). The reply counts the rules and the peers recompiled.
//! * A directory with a TOML syntax error and an invalid rule is refused
//!   as a whole, by ReloadPolicy (the error names every `file:line:col`),
//!   by SIGHUP (the daemon logs the positions) and by `pbusctl policy
//!   reload` (non-zero exit): the old policy keeps deciding until the
//!   files are fixed.
//! * `pbusctl policy check` exits 0 with a summary on a good directory and
//!   non-zero with every position on a bad one; `pbusctl policy explain`
//!   tells, live for a connected container peer or offline from identity
//!   specs, whether a call is allowed and which rule (file and line)
//!   decided, and agrees with what the bus does.
//! * ReloadPolicy, ExplainPolicy about another peer and GetStats of
//!   everyone are refused to root inside a container and to a non-root
//!   host peer; a refused reload changes nothing; host root may do all
//!   three.
#![forbid(unsafe_code)]

mod policy_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pbus_proto::v1::ErrorCode;
use pbus_tests::containers::{ContainerView, Isolation, Shape};
use pbus_tests::{require_root, signal_pid, unique_names, TestBus, TIMEOUT};
use policy_support::{
    assert_refused, by_id, container, pbusctl, pbusctl_first_line, probe_as_uid, probe_in,
    rule_line, texts, HostService, PolicyDir,
};

const FLIP: &str = "org.pbus.test.reload.Flip";
const FLOP: &str = "org.pbus.test.reload.Flop";
const OPEN: &str = "org.pbus.test.reload.Open";

/// Rules letting `subject` see and talk to `name`.
fn open_to(subject: &str, name: &str) -> String {
    format!("[[rule]]\nallow = [\"see\", \"talk\"]\nsubject = {subject}\nname = \"{name}\"\n\n")
}

/// Sends SIGHUP to the daemon, by its pid.
fn hang_up(bus: &TestBus) {
    signal_pid(bus.pid(), Signal::SIGHUP).expect("SIGHUP to pbusd");
}

/// Asks `command` of `peer` until the answer is `expected` (a reload by
/// SIGHUP is asynchronous); panics with the last answer after [`TIMEOUT`].
async fn ask_until(peer: &mut pbus_tests::PeerProcess, command: &str, expected: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let answer = peer.ask(command).await;
        if answer == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{command}: still {answer:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_new_rules_to_connected_peers_without_dropping_them() {
    if !require_root("running peers in fake containers and under another uid") {
        return;
    }
    let Some(box_a) = container(Shape::DockerCgroupfs) else {
        return;
    };
    let subject_a = by_id("docker", &box_a);
    let nobody = "{ host = true, uid = 65534 }";
    let policy = PolicyDir::new();
    policy.write("50-flip.toml", &open_to(&subject_a, FLIP));
    let bus = policy.start_bus();
    let root = bus.connect().await;
    let flip = HostService::start(&bus, FLIP).await;
    let flop = HostService::start(&bus, FLOP).await;
    let mut a = probe_in(&box_a, &bus, Isolation::container(), "-").await;
    let (mut n, n_unique) = probe_as_uid(&bus, 65534, "-").await;
    let a_unique = a.unique_name().to_owned();
    let before = unique_names(&root).await;
    assert_eq!(before.len(), 5, "{before:?}");

    let ok = "ok host Echo";
    let denied = |peer: &str, name: &str| format!("{peer} calls {name}");
    let refused = |answer: &str, what: &str| {
        assert_refused(answer, ErrorCode::NameHasNoOwner, "", what);
    };
    let call_flip = format!("call {FLIP} Echo");
    let call_flop = format!("call {FLOP} Echo");
    assert_eq!(a.ask(&call_flip).await, ok);
    refused(&a.ask(&call_flop).await, &denied("A", FLOP));
    refused(&n.ask(&call_flop).await, &denied("uid 65534", FLOP));

    // 1. SIGHUP: FLOP opens to A and to uid 65534, FLIP closes.
    policy.write(
        "50-flip.toml",
        &format!("{}{}", open_to(&subject_a, FLOP), open_to(nobody, FLOP)),
    );
    hang_up(&bus);
    ask_until(&mut a, &call_flop, ok).await;
    refused(&a.ask(&call_flip).await, &denied("A", FLIP));
    assert_eq!(n.ask(&call_flop).await, ok);

    // 2. `pbusctl policy reload`: back to FLIP for A, FLOP shut again.
    policy.write("50-flip.toml", &open_to(&subject_a, FLIP));
    let output = pbusctl(Some(&bus), &["policy", "reload"]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "pbusctl policy reload: {stderr}");
    // pbusctl's own connection is recompiled too.
    assert_eq!(
        stdout.trim(),
        format!(
            "policy reloaded: 1 file(s), 8 rules (with the built-in default); {} peers recompiled",
            before.len() + 1
        )
    );
    assert_eq!(a.ask(&call_flip).await, ok);
    refused(&a.ask(&call_flop).await, &denied("A", FLOP));
    refused(&n.ask(&call_flop).await, &denied("uid 65534", FLOP));

    // 3. Connection::reload_policy: nothing but the built-in default.
    // (First wait until the bus has seen pbusctl go, so the peer count is
    // known.)
    let deadline = Instant::now() + TIMEOUT;
    while unique_names(&root).await != before {
        assert!(Instant::now() < deadline, "pbusctl's connection stays");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    policy.write("50-flip.toml", "# nothing opened\n");
    let reply = root.reload_policy().await.expect("host root reloads");
    assert_eq!(
        (reply.files, reply.rules, reply.peers, reply.builtin),
        (1, 7, 5, true)
    );
    refused(&a.ask(&call_flip).await, &denied("A", FLIP));

    // Nobody was dropped or renamed; the bus still knows A as A.
    assert_eq!(a.ask("ping").await, "pong");
    assert_eq!(n.ask("ping").await, "pong");
    for connection in [&root, &flip.connection, &flop.connection] {
        assert!(!connection.is_closed());
        connection.ping().await.unwrap();
    }
    assert_eq!(unique_names(&root).await, before);
    assert!(before.contains(&a_unique) && before.contains(&n_unique));
    let identity = root.peer_identity(&a_unique).await.unwrap();
    assert_eq!(
        ContainerView::of(identity.container.as_ref()),
        box_a.expected()
    );
    assert_eq!(identity.pid, a.host_pid());
    let echo = |caller: &str| ("Echo".to_owned(), caller.to_owned());
    assert_eq!(flip.calls(), [echo(&a_unique), echo(&a_unique)]);
    assert_eq!(flop.calls(), [echo(&a_unique), echo(&n_unique)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_policy_is_refused_and_the_old_one_keeps_deciding() {
    if !require_root("running peers in fake containers") {
        return;
    }
    let Some(box_a) = container(Shape::DockerCgroupfs) else {
        return;
    };
    let policy = PolicyDir::new();
    policy.write("50-open.toml", &open_to(&by_id("docker", &box_a), OPEN));
    let bus = policy.start_bus();
    let root = bus.connect().await;
    let _open = HostService::start(&bus, OPEN).await;
    let mut a = probe_in(&box_a, &bus, Isolation::none(), "-").await;
    let call_open = format!("call {OPEN} Echo");
    assert_eq!(a.ask(&call_open).await, "ok host Echo");

    // Were the new files taken, A would lose OPEN: 50-open.toml is
    // emptied. But one file does not parse and another has a bad rule.
    policy.write("50-open.toml", "");
    policy.write(
        "60-bad.toml",
        "[[rule]]\nallow = [\"talk\"\nsubject = { anyone = true }\n",
    );
    policy.write(
        "70-invalid.toml",
        "# see rules have no member\n[[rule]]\nallow = [\"see\", \"talk\"]\n\
         subject = { anyone = true }\nmember = \"Echo\"\n",
    );
    let bad = format!("{}:3:", policy.file("60-bad.toml").display());
    let invalid = format!("{}:5:1:", policy.file("70-invalid.toml").display());

    // ReloadPolicy: an error naming both places.
    let error = root
        .reload_policy()
        .await
        .expect_err("a bad policy is refused");
    assert_eq!(error.code(), Some(ErrorCode::InvalidArgs), "{error}");
    let message = error.to_string();
    assert!(message.contains("the old one stays in force"), "{message}");
    assert!(message.contains(&bad), "no {bad} in {message}");
    assert!(
        message.contains(&format!(
            "{invalid} `member` applies only to talk and receive"
        )),
        "no {invalid} in {message}"
    );
    assert_eq!(a.ask(&call_open).await, "ok host Echo");

    // `pbusctl policy reload`: the same, with a failing exit status.
    let output = pbusctl(Some(&bus), &["policy", "reload"]);
    let (_, stderr) = texts(&output);
    assert!(!output.status.success(), "pbusctl policy reload succeeded");
    assert!(
        stderr.contains(&bad) && stderr.contains(&invalid),
        "{stderr}"
    );

    // SIGHUP: the daemon says why in its log.
    hang_up(&bus);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let log = bus.stderr();
        if log.contains("policy reload refused") && log.contains(&invalid) && log.contains(&bad) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refused reload with positions in the log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.ask(&call_open).await, "ok host Echo");
    assert_eq!(a.ask("ping").await, "pong");

    // Fixed files load, and only now does A lose OPEN.
    policy.remove("60-bad.toml");
    policy.remove("70-invalid.toml");
    let reply = root.reload_policy().await.expect("the fixed policy loads");
    assert_eq!((reply.files, reply.rules), (1, 7));
    assert_refused(
        &a.ask(&call_open).await,
        ErrorCode::NameHasNoOwner,
        "",
        "A calls OPEN under the fixed policy",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pbusctl_checks_and_explains_policies() {
    if !require_root("running peers in fake containers") {
        return;
    }
    let (Some(box_a), Some(box_c)) = (
        container(Shape::DockerCgroupfs),
        container(Shape::DockerSystemd),
    ) else {
        return;
    };
    let subject_a = by_id("docker", &box_a);
    let text = format!(
        r#"# Container A may see {OPEN}...
[[rule]]
allow = ["see"]
subject = {subject_a}
name = "{OPEN}"

# ...and call it...
[[rule]]
allow = ["talk"]
subject = {subject_a}
name = "{OPEN}"

# ...but not Purge.
[[rule]]
deny = ["talk"]
subject = {subject_a}
name = "{OPEN}"
member = "Purge"
"#
    );
    let (see_line, talk_line, purge_line) = (
        rule_line(&text, "may see"),
        rule_line(&text, "and call it"),
        rule_line(&text, "not Purge"),
    );
    let policy = PolicyDir::new();
    policy.write("50-open.toml", &text);
    let file = policy.file("50-open.toml").display().to_string();
    let dir = policy.path().display().to_string();

    // check: a good directory...
    let output = pbusctl(None, &["policy", "check", &dir]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        stdout.trim(),
        format!("{dir}: ok, 1 file, 3 rules (on top of the built-in default)")
    );
    // ...and a bad one, with every position.
    let broken = PolicyDir::new();
    broken.write("10-good.toml", &text);
    broken.write(
        "20-bad.toml",
        "[[rule]]\nallow = [\"talk\"]\nsubject = { anyone = true }\nnmae = \"org.x.Y\"\n\n\
         [[rule]]\ndeny = [\"fly\"]\nsubject = { anyone = true }\n",
    );
    let output = pbusctl(
        None,
        &["policy", "check", &broken.path().display().to_string()],
    );
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let bad_file = broken.file("20-bad.toml").display().to_string();
    assert!(stderr.contains("2 error(s)"), "{stderr}");
    assert!(
        stderr.contains(&format!("{bad_file}:4:1: unknown key `nmae`")),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{bad_file}:7:")), "{stderr}");
    assert!(!stderr.contains("10-good.toml"), "{stderr}");

    // explain, live: for a connected container peer and a target name.
    let bus = policy.start_bus();
    let _open = HostService::start(&bus, OPEN).await;
    let mut a = probe_in(&box_a, &bus, Isolation::none(), "-").await;
    let mut c = probe_in(&box_c, &bus, Isolation::none(), "-").await;
    let explain = |subject: &str, member: &str| {
        pbusctl_first_line(
            Some(&bus),
            &[
                "policy",
                "explain",
                "--subject",
                subject,
                "--target",
                OPEN,
                "--member",
                member,
            ],
            &format!("explain {subject} {member}"),
        )
    };
    let allowed_by = |line: u32, right: &str| {
        format!("{right} allowed: allowed by the most specific matching rule ({file}:{line}: allow {right} ")
    };
    let first = explain(a.unique_name(), "Echo");
    assert!(first.starts_with(&allowed_by(talk_line, "talk")), "{first}");
    let first = explain(a.unique_name(), "Purge");
    assert!(
        first.starts_with(&format!("talk denied: denied by the most specific matching rule ({file}:{purge_line}: deny talk ")),
        "{first}"
    );
    let first = explain(c.unique_name(), "Echo");
    assert_eq!(
        first,
        "talk denied: no rule lets this peer talk to the receiver"
    );
    // The bus does what explain says.
    assert_eq!(a.ask(&format!("call {OPEN} Echo")).await, "ok host Echo");
    assert_refused(
        &a.ask(&format!("call {OPEN} Purge")).await,
        ErrorCode::AccessDenied,
        "talk",
        "A calls Purge",
    );
    assert_refused(
        &c.ask(&format!("call {OPEN} Echo")).await,
        ErrorCode::NameHasNoOwner,
        "",
        "C calls OPEN",
    );
    // A peer may ask about itself, also from inside a container.
    let answer = a.ask(&format!("explain - see {OPEN} -")).await;
    assert!(
        answer.starts_with(&format!(
            "explain allowed {file}:{see_line}: allow see subject{{"
        )),
        "{answer}"
    );
    // --json: the decision and the rule.
    let output = pbusctl(
        Some(&bus),
        &[
            "--json",
            "policy",
            "explain",
            "--subject",
            a.unique_name(),
            "--target",
            OPEN,
            "--member",
            "Echo",
        ],
    );
    let (stdout, _) = texts(&output);
    assert!(stdout.contains("\"allowed\":true"), "{stdout}");
    assert!(
        stdout.contains(&format!("\"rule\":\"{file}:{talk_line}: allow talk")),
        "{stdout}"
    );

    // explain, offline: identities described on the command line.
    let offline = |subject: &str, right: &str, member: &str| {
        pbusctl_first_line(
            None,
            &[
                "policy",
                "explain",
                "--policy",
                &dir,
                "--subject-identity",
                subject,
                "--target-identity",
                "uid=0",
                "--right",
                right,
                "--target",
                OPEN,
                "--member",
                member,
            ],
            &format!("offline explain {subject}"),
        )
    };
    let spec_a = format!("uid=0,container=docker:{}", box_a.id());
    let spec_c = format!("uid=0,container=docker:{}", box_c.id());
    let first = offline(&spec_a, "talk", "Echo");
    assert!(first.starts_with(&allowed_by(talk_line, "talk")), "{first}");
    let first = offline(&spec_a, "see", "");
    assert!(first.starts_with(&allowed_by(see_line, "see")), "{first}");
    let first = offline(&spec_a, "talk", "Purge");
    assert!(first.starts_with("talk denied: "), "{first}");
    assert!(
        first.contains(&format!("({file}:{purge_line}: deny talk ")),
        "{first}"
    );
    let first = offline(&spec_c, "talk", "Echo");
    assert_eq!(
        first,
        "talk denied: no rule lets this peer talk to the receiver"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_administration_is_for_root_on_the_host_only() {
    if !require_root("running peers in fake containers and under another uid") {
        return;
    }
    let (Some(box_a), Some(box_u)) = (container(Shape::DockerCgroupfs), container(Shape::Plain))
    else {
        return;
    };
    let policy = PolicyDir::new();
    policy.write("50-none.toml", "");
    let bus = policy.start_bus();
    let root = bus.connect().await;
    let service = HostService::start(&bus, OPEN).await;
    let mut a = probe_in(&box_a, &bus, Isolation::container(), "-").await;
    let a2 = probe_in(&box_a, &bus, Isolation::none(), "-").await;
    let (mut n1, n1_unique) = probe_as_uid(&bus, 65534, "-").await;
    let (_n2, n2_unique) = probe_as_uid(&bus, 65534, "-").await;
    let (a_unique, a2_unique) = (a.unique_name().to_owned(), a2.unique_name().to_owned());

    // A rule is waiting on disk; refused reloads must not install it.
    policy.write(
        "50-none.toml",
        &format!(
            "{}{}",
            open_to(&by_id("docker", &box_a), OPEN),
            open_to("{ host = true, uid = 65534 }", OPEN)
        ),
    );
    let call_open = format!("call {OPEN} Echo");
    for (peer, other, what) in [
        (&mut *a, a2_unique.as_str(), "root in a container"),
        (&mut n1, n2_unique.as_str(), "uid 65534 on the host"),
    ] {
        assert_refused(
            &peer.ask("reload").await,
            ErrorCode::AccessDenied,
            "reload",
            what,
        );
        assert_refused(
            &peer.ask(&call_open).await,
            ErrorCode::NameHasNoOwner,
            "",
            &format!("{what}: the refused reload changed the policy"),
        );
        // Explaining another (visible) peer is for root; oneself is fine.
        assert_refused(
            &peer.ask(&format!("explain {other} monitor - -")).await,
            ErrorCode::AccessDenied,
            "monitor",
            what,
        );
        assert_eq!(
            peer.ask("explain - monitor - -").await,
            "explain denied -",
            "{what}"
        );
        // A peer it may not see is not even found.
        assert_refused(
            &peer
                .ask(&format!("explain {} monitor - -", root.unique_name()))
                .await,
            ErrorCode::NoSuchPeer,
            "",
            what,
        );
    }
    // Root in a pid namespace of its own, in a cgroup no runtime uses (an
    // `unknown` container), is no administrator either.
    let mut u = probe_in(&box_u, &bus, Isolation::pid(), "-").await;
    let u_unique = u.unique_name().to_owned();
    assert_eq!(
        ContainerView::of(
            root.peer_identity(&u_unique)
                .await
                .unwrap()
                .container
                .as_ref()
        ),
        ContainerView::unknown()
    );
    assert_refused(
        &u.ask("reload").await,
        ErrorCode::AccessDenied,
        "reload",
        "root in an unknown container",
    );
    let stats = u.ask("stats").await;
    assert_eq!(stats, format!("stats peers={u_unique} uids=-"));

    // GetStats shows them only the peers they may see, and no per-uid rows
    // (those count peers they may not see).
    let stats = a.ask("stats").await;
    let (peers, uids) = stats
        .strip_prefix("stats peers=")
        .and_then(|rest| rest.split_once(" uids="))
        .unwrap_or_else(|| panic!("{stats}"));
    assert_eq!(peers, format!("{a_unique},{a2_unique}"), "{stats}");
    assert_eq!(uids, "-", "{stats}");
    let stats = n1.ask("stats").await;
    assert_eq!(stats, format!("stats peers={n1_unique},{n2_unique} uids=-"));

    // Root on the host: all of it, and its reload installs the rules.
    let all = root.stats().await.unwrap();
    let seen: BTreeSet<String> = all.peers.iter().map(|p| p.unique_name.clone()).collect();
    for name in [&a_unique, &a2_unique, &n1_unique, &n2_unique, &u_unique] {
        assert!(seen.contains(name), "{name} missing from {seen:?}");
    }
    let uids: BTreeSet<u32> = all.uids.iter().map(|u| u.uid).collect();
    assert_eq!(uids, BTreeSet::from([0, 65534]));
    let explained = root
        .explain_policy(&a_unique, "talk", OPEN, "Echo")
        .await
        .expect("root explains a container peer's rights");
    assert!(!explained.allowed, "{explained:?}");
    root.reload_policy().await.expect("root reloads");
    let explained = root
        .explain_policy(&a_unique, "talk", OPEN, "Echo")
        .await
        .unwrap();
    assert!(explained.allowed, "{explained:?}");
    assert!(
        explained.rule.starts_with(&format!(
            "{}:1: allow see,talk",
            policy.file("50-none.toml").display()
        )),
        "{explained:?}"
    );
    assert_eq!(a.ask(&call_open).await, "ok host Echo");
    assert_eq!(n1.ask(&call_open).await, "ok host Echo");
    assert_eq!(service.calls().len(), 2);
}
