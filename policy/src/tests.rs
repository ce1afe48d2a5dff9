//! Table-driven tests of the evaluator: each row is (subject, target,
//! operation, expected outcome, expected deciding rule). Rules in the test
//! policies carry a `# tag` comment on their `[[rule]]` line; a row names
//! the tag of the rule it expects to decide, and the runner checks the
//! decision's line against the tag's line. Every row is also run through
//! `explain`, which must reach the same decision the slow way.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pbus_identity::PeerIdentity;

use crate::{
    check_path, parse_identity, Decision, FileAccess, Operation, PeerPolicy, Policy, PolicyErrors,
    PolicyLayers, Right, DEFAULT_POLICY,
};

/// One operation of a row.
#[derive(Debug, Clone, Copy)]
enum Op {
    Own(&'static str),
    See(&'static str),
    Talk(&'static [&'static str], &'static str),
    Recv(&'static [&'static str], &'static str),
    Fds(&'static [&'static str]),
    /// Names, and the expected cap.
    Memfd(&'static [&'static str], Option<u64>),
    Monitor,
    /// Path and access (`r`, `rw`, `rwc`, ...).
    File(&'static str, &'static str),
}

#[derive(Debug, Clone, Copy)]
struct Row {
    subject: &'static str,
    /// Target identity; ignored by own, monitor and file.
    target: &'static str,
    op: Op,
    allowed: bool,
    /// Tag of the deciding rule, `None` when no rule should decide.
    rule: Option<&'static str>,
}

const fn row(
    subject: &'static str,
    target: &'static str,
    op: Op,
    allowed: bool,
    rule: Option<&'static str>,
) -> Row {
    Row {
        subject,
        target,
        op,
        allowed,
        rule,
    }
}

/// The line of the `[[rule]]` tagged `# tag`.
fn line_of(text: &str, tag: &str) -> u32 {
    let marker = format!("# {tag}");
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("[[rule]]") && l.trim_end().ends_with(&marker))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(lines.len(), 1, "tag {tag:?} must be on exactly one rule");
    lines[0] as u32
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn operation(op: Op, target: &PeerIdentity) -> Operation {
    match op {
        Op::Own(name) => Operation::Own { name: name.into() },
        Op::See(name) => Operation::See {
            owner: target.clone(),
            name: name.into(),
        },
        Op::Talk(n, member) => Operation::Talk {
            receiver: target.clone(),
            names: names(n),
            member: member.into(),
        },
        Op::Recv(n, member) => Operation::Receive {
            sender: target.clone(),
            names: names(n),
            member: member.into(),
        },
        Op::Fds(n) => Operation::PassFds {
            receiver: target.clone(),
            names: names(n),
        },
        Op::Memfd(n, _) => Operation::Memfd {
            receiver: target.clone(),
            names: names(n),
        },
        Op::Monitor => Operation::Monitor,
        Op::File(path, access) => Operation::File {
            path: path.into(),
            access: FileAccess::parse(access).expect("test access"),
        },
    }
}

/// Runs the fast path (snapshot) for one row; the verdict-only `may_*`
/// checks must agree with the decision.
fn fast(policy: &Arc<Policy>, subject: &PeerIdentity, target: &PeerIdentity, op: Op) -> Decision {
    fast_on(&policy.snapshot(subject), target, op)
}

/// [`fast`] on a snapshot already compiled.
fn fast_on(snap: &PeerPolicy, target: &PeerIdentity, op: Op) -> Decision {
    match op {
        Op::Own(name) => snap.own(name),
        Op::See(name) => {
            let d = snap.see(target, name);
            assert_eq!(snap.may_see(target, name), d.allowed, "may_see");
            d
        }
        Op::Talk(n, member) => {
            let d = snap.talk(target, n, member);
            assert_eq!(snap.may_talk(target, n, member), d.allowed, "may_talk");
            d
        }
        Op::Recv(n, member) => {
            let d = snap.receive(target, n, member);
            assert_eq!(
                snap.may_receive(target, n, member),
                d.allowed,
                "may_receive"
            );
            d
        }
        Op::Fds(n) => {
            let d = snap.pass_fds(target, n);
            assert_eq!(snap.may_pass_fds(target, n), d.allowed, "may_pass_fds");
            d
        }
        Op::Memfd(n, cap) => {
            let (d, limit) = snap.memfd(target, n);
            assert_eq!(limit, cap, "memfd cap");
            assert_eq!(snap.max_memfd_bytes(target, n), cap, "max_memfd_bytes");
            d
        }
        Op::Monitor => snap.monitor(),
        Op::File(path, access) => {
            snap.file_access(Path::new(path), FileAccess::parse(access).unwrap())
        }
    }
}

fn run(policy: &Arc<Policy>, text: &str, rows: &[Row]) {
    for (i, r) in rows.iter().enumerate() {
        let subject = parse_identity(r.subject).expect("subject");
        let target = if r.target.is_empty() {
            PeerIdentity::default()
        } else {
            parse_identity(r.target).expect("target")
        };
        let decision = fast(policy, &subject, &target, r.op);
        let explained = policy.explain(&subject, &operation(r.op, &target));
        assert_eq!(
            explained.decision, decision,
            "row {i} {r:?}: explain disagrees with the snapshot\n{explained}"
        );
        if let Op::Memfd(_, cap) = r.op {
            assert_eq!(explained.memfd_limit, cap, "row {i}: explain memfd cap");
        }
        assert_eq!(
            decision.allowed, r.allowed,
            "row {i} {r:?}: got {decision}\n{explained}"
        );
        let want = r.rule.map(|tag| line_of(text, tag));
        assert_eq!(
            decision.rule.as_ref().map(|rule| rule.line),
            want,
            "row {i} {r:?}: decided by {decision}\n{explained}"
        );
        // The deciding candidate is listed first and marked.
        if let Some(rule) = &decision.rule {
            let first = &explained.candidates[0];
            assert!(first.deciding && first.rule == *rule, "row {i}: candidates");
        }
        // The policy as the one layer of a stack decides and explains
        // exactly as the plain policy.
        let layers = PolicyLayers::global(Arc::clone(policy));
        let layered = fast_on(&layers.snapshot(&subject), &target, r.op);
        assert_eq!(layered, decision, "row {i} {r:?}: one layer differs");
        let layered_explained = layers.explain(&subject, &operation(r.op, &target));
        assert_eq!(
            layered_explained.decision, decision,
            "row {i}: layered explain"
        );
        assert_eq!(layered_explained.memfd_limit, explained.memfd_limit);
        assert_eq!(
            layered_explained.to_string(),
            explained.to_string(),
            "row {i}: layered explain text"
        );
    }
}

fn run_text(text: &str, rows: &[Row]) {
    let policy = Policy::parse(text, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    run(&policy, text, rows);
}

// Identities used below.
const H1000: &str = "uid=1000";
const H1000_B: &str = "uid=1000,pid=77";
const H1001: &str = "uid=1001";
const ROOT: &str = "uid=0";
const DA: &str = "uid=1000,container=docker:aaaa1111";
const DA2: &str = "uid=1000,container=docker:aaaa1111,pid=9";
const DA_1001: &str = "uid=1001,container=docker:aaaa1111";
const DB: &str = "uid=1000,container=docker:bbbb2222";
const DA_ROOT: &str = "uid=0,container=docker:aaaa1111";

const N_FOO: &[&str] = &["org.example.Foo"];
const NONE: &[&str] = &[];

#[test]
fn default_policy() {
    use Op::*;
    let rows = [
        // Same uid on the host works out of the box.
        row(
            H1000,
            H1000_B,
            Talk(N_FOO, "Get"),
            true,
            Some("host-same-uid"),
        ),
        row(
            H1000,
            H1000_B,
            Talk(NONE, "Get"),
            true,
            Some("host-same-uid"),
        ),
        row(
            H1000,
            H1000_B,
            See("org.example.Foo"),
            true,
            Some("host-same-uid"),
        ),
        row(H1000, H1000_B, See(":1.7"), true, Some("host-same-uid")),
        row(H1000, H1000_B, Fds(N_FOO), true, Some("host-same-uid")),
        row(H1000, "", Own("org.example.Foo"), true, Some("host-own")),
        // Other uids on the host: nothing.
        row(H1000, H1001, Talk(N_FOO, "Get"), false, None),
        row(H1000, H1001, See("org.example.Foo"), false, None),
        row(H1000, H1001, Fds(N_FOO), false, None),
        row(H1000, ROOT, Talk(N_FOO, "Get"), false, None),
        row(
            H1000,
            ROOT,
            See("org.freedesktop.NetworkManager"),
            false,
            None,
        ),
        // Root on the host may do anything, containers included.
        row(ROOT, H1001, Talk(N_FOO, "Get"), true, Some("root")),
        row(ROOT, DA, Talk(N_FOO, "Get"), true, Some("root")),
        row(ROOT, DA, See("org.example.Foo"), true, Some("root")),
        row(ROOT, DA, Fds(NONE), true, Some("root")),
        row(ROOT, "", Own("org.example.Foo"), true, Some("root")),
        row(ROOT, "", Monitor, true, Some("root")),
        row(ROOT, "", File("/etc/shadow", "r"), true, Some("root-files")),
        // Root to root: the more specific same-uid rule decides.
        row(ROOT, ROOT, Talk(N_FOO, "Get"), true, Some("host-same-uid")),
        // Anyone may receive from anyone (the sender's talk decides).
        row(DA, ROOT, Recv(NONE, "Ping"), true, Some("receive")),
        row(H1000, H1001, Recv(N_FOO, "Ping"), true, Some("receive")),
        row(DA, DB, Recv(N_FOO, "Ping"), true, Some("receive")),
        // Containers: nothing outside their own container.
        row(DA, ROOT, Talk(N_FOO, "Get"), false, None),
        row(DA, H1000, Talk(N_FOO, "Get"), false, None),
        row(DA, H1000, See("org.example.Foo"), false, None),
        row(DA, DB, Talk(N_FOO, "Get"), false, None),
        row(DA, DB, See("org.example.Foo"), false, None),
        row(DA, DB, Fds(NONE), false, None),
        row(DA_ROOT, H1000, Talk(N_FOO, "Get"), false, None),
        row(DA_ROOT, ROOT, See(":1.1"), false, None),
        // Host peers cannot reach into containers either (root aside).
        row(H1000, DA, Talk(N_FOO, "Get"), false, None),
        row(H1000, DA, See("org.example.Foo"), false, None),
        // Inside a container: same-uid rules like the host.
        row(
            DA,
            DA2,
            Talk(N_FOO, "Get"),
            true,
            Some("container-same-uid"),
        ),
        row(
            DA,
            DA2,
            See("org.example.Foo"),
            true,
            Some("container-same-uid"),
        ),
        row(DA, DA2, Fds(N_FOO), true, Some("container-same-uid")),
        row(DA, DA_1001, Talk(N_FOO, "Get"), false, None),
        row(DA, "", Own("org.example.Foo"), true, Some("container-own")),
        row(
            DA_ROOT,
            "",
            Own("org.example.Foo"),
            true,
            Some("container-own"),
        ),
        // Monitor and files: root on the host only.
        row(H1000, "", Monitor, false, None),
        row(DA_ROOT, "", Monitor, false, None),
        row(H1000, "", File("/home/u/x", "r"), false, None),
        row(DA_ROOT, "", File("/etc/shadow", "r"), false, None),
        // No memfd cap by default.
        row(H1000, H1000_B, Memfd(N_FOO, None), true, None),
        row(DA, DB, Memfd(N_FOO, None), true, None),
    ];
    run(&Policy::builtin(), DEFAULT_POLICY, &rows);
}

const SPECIFIC: &str = r#"builtin = false

[[rule]] # any
allow = ["talk"]
subject = { anyone = true }

[[rule]] # deny-example
deny = ["talk"]
subject = { anyone = true }
name = "org.example.*"

[[rule]] # allow-sub
allow = ["talk"]
subject = { anyone = true }
name = "org.example.sub.*"

[[rule]] # deny-secret
deny = ["talk"]
subject = { anyone = true }
name = "org.example.sub.Secret"

[[rule]] # ping-secret
allow = ["talk"]
subject = { anyone = true }
name = "org.example.sub.Secret"
member = "Ping"

[[rule]] # open
allow = ["talk"]
subject = { anyone = true }
name = "org.example.Open"

[[rule]] # no-shutdown
deny = ["talk"]
subject = { anyone = true }
name = "org.example.sub.*"
member = "Shutdown"

[[rule]] # uid-1000-example
allow = ["talk"]
subject = { uid = 1000 }
name = "org.example.*"
"#;

#[test]
fn most_specific_wins() {
    use Op::*;
    const U5: &str = "uid=5";
    let rows = [
        row(U5, H1000, Talk(&["org.other.X"], "Get"), true, Some("any")),
        row(U5, H1000, Talk(NONE, "Get"), true, Some("any")),
        row(U5, H1000, Talk(&[":1.7"], "Get"), true, Some("any")),
        // A prefix beats `*`.
        row(U5, H1000, Talk(N_FOO, "Get"), false, Some("deny-example")),
        // A prefix is strictly below: org.example itself is not covered.
        row(U5, H1000, Talk(&["org.example"], "Get"), true, Some("any")),
        // More subject conditions beat fewer at the same prefix.
        row(
            H1000,
            H1000,
            Talk(N_FOO, "Get"),
            true,
            Some("uid-1000-example"),
        ),
        // A longer prefix beats a shorter one.
        row(
            U5,
            H1000,
            Talk(&["org.example.sub.Foo"], "Get"),
            true,
            Some("allow-sub"),
        ),
        // A member rule beats a name-only rule on the same prefix.
        row(
            U5,
            H1000,
            Talk(&["org.example.sub.Foo"], "Shutdown"),
            false,
            Some("no-shutdown"),
        ),
        // An exact name beats every prefix.
        row(
            U5,
            H1000,
            Talk(&["org.example.sub.Secret"], "Get"),
            false,
            Some("deny-secret"),
        ),
        row(
            U5,
            H1000,
            Talk(&["org.example.sub.Secret"], "Ping"),
            true,
            Some("ping-secret"),
        ),
        // ... even a prefix rule with a member.
        row(
            U5,
            H1000,
            Talk(&["org.example.sub.Secret"], "Shutdown"),
            false,
            Some("deny-secret"),
        ),
        row(
            U5,
            H1000,
            Talk(&["org.example.Open"], "Get"),
            true,
            Some("open"),
        ),
        // Several names: the most specific match across all of them.
        row(
            U5,
            H1000,
            Talk(&["org.other.X", "org.example.sub.Secret"], "Get"),
            false,
            Some("deny-secret"),
        ),
        row(
            U5,
            H1000,
            Talk(&["org.example.sub.Foo", "org.example.Open"], "Get"),
            true,
            Some("open"),
        ),
        row(
            U5,
            H1000,
            Talk(&["org.example.Open", "org.example.sub.Secret"], "Get"),
            false,
            Some("deny-secret"),
        ),
        row(
            U5,
            H1000,
            Talk(&["org.example.Foo", "org.example.sub.Foo"], "Get"),
            true,
            Some("allow-sub"),
        ),
        // Other rights are untouched by talk rules.
        row(U5, H1000, See("org.example.Open"), false, None),
    ];
    run_text(SPECIFIC, &rows);
}

#[test]
fn deny_beats_allow_at_equal_specificity() {
    use Op::*;
    const TEXT: &str = r#"builtin = false

[[rule]] # allow-uid
allow = ["talk", "own"]
subject = { uid = 1000 }
name = "org.a.B"

[[rule]] # deny-gid
deny = ["talk", "own"]
subject = { gid = 100 }
name = "org.a.B"

[[rule]] # allow-uid-again
allow = ["talk"]
subject = { uid = 1000 }
name = "org.a.B"
"#;
    let rows = [
        row(
            "uid=1000,gid=100",
            H1000,
            Talk(&["org.a.B"], "X"),
            false,
            Some("deny-gid"),
        ),
        row(
            "uid=1000,gid=100",
            "",
            Own("org.a.B"),
            false,
            Some("deny-gid"),
        ),
        row(
            "uid=1000,gid=5,groups=100",
            "",
            Own("org.a.B"),
            false,
            Some("deny-gid"),
        ),
        // Equal allows: the first in load order is reported.
        row(
            "uid=1000,gid=5",
            H1000,
            Talk(&["org.a.B"], "X"),
            true,
            Some("allow-uid"),
        ),
        row(
            "uid=7,gid=100",
            H1000,
            Talk(&["org.a.B"], "X"),
            false,
            Some("deny-gid"),
        ),
    ];
    run_text(TEXT, &rows);
    // Order does not matter: the deny listed first still wins.
    const REVERSED: &str = r#"builtin = false
[[rule]] # deny-first
deny = ["talk"]
subject = { gid = 100 }
name = "org.a.B"
[[rule]] # allow-second
allow = ["talk"]
subject = { uid = 1000 }
name = "org.a.B"
"#;
    run_text(
        REVERSED,
        &[row(
            "uid=1000,gid=100",
            H1000,
            Talk(&["org.a.B"], "X"),
            false,
            Some("deny-first"),
        )],
    );
}

#[test]
fn relations() {
    use Op::*;
    const TEXT: &str = r#"builtin = false

[[rule]] # same-uid
allow = ["talk"]
subject = { anyone = true }
peer = { same-uid = true }

[[rule]] # same-uid-elsewhere
deny = ["talk"]
subject = { anyone = true }
peer = { same-uid = true, same-container = false }

[[rule]] # same-container-c
allow = ["talk"]
subject = { anyone = true }
peer = { same-container = true }
name = "org.c.*"

[[rule]] # other-uid-root
allow = ["talk"]
subject = { uid = 0 }
peer = { same-uid = false }
"#;
    const U1: &str = "uid=1000,container=unknown,pidns=5,mntns=6";
    const U2: &str = "uid=1000,container=unknown,pidns=5,mntns=6,pid=2";
    const U3: &str = "uid=1000,container=unknown,pidns=5,mntns=7";
    let rows = [
        row(H1000, H1000_B, Talk(NONE, "X"), true, Some("same-uid")),
        row(H1000, H1001, Talk(NONE, "X"), false, None),
        row(
            DA,
            H1000,
            Talk(NONE, "X"),
            false,
            Some("same-uid-elsewhere"),
        ),
        row(DA, DB, Talk(NONE, "X"), false, Some("same-uid-elsewhere")),
        row(DA, DA2, Talk(NONE, "X"), true, Some("same-uid")),
        row(
            DA,
            DA_1001,
            Talk(&["org.c.X"], "X"),
            true,
            Some("same-container-c"),
        ),
        row(DA, DA_1001, Talk(NONE, "X"), false, None),
        row(
            H1000,
            H1001,
            Talk(&["org.c.X"], "X"),
            true,
            Some("same-container-c"),
        ),
        row(DA, H1001, Talk(&["org.c.X"], "X"), false, None),
        // Unknown container ids: the pid and mount namespaces decide.
        row(U1, U2, Talk(NONE, "X"), true, Some("same-uid")),
        row(U1, U3, Talk(NONE, "X"), false, Some("same-uid-elsewhere")),
        // Negated relation.
        row(ROOT, H1001, Talk(NONE, "X"), true, Some("other-uid-root")),
        row(ROOT, ROOT, Talk(NONE, "X"), true, Some("same-uid")),
    ];
    run_text(TEXT, &rows);
}

#[test]
fn labels() {
    use Op::*;
    const TEXT: &str = r#"builtin = false

[[rule]] # container-t
allow = ["talk"]
subject = { label = "*:container_t:*" }

[[rule]] # anyone-l
allow = ["talk"]
subject = { anyone = true }
name = "org.l.Any"

[[rule]] # see-trusted
allow = ["see"]
subject = { anyone = true }
peer = { label = "trusted_?" }
"#;
    const CT: &str = "uid=1,label=system_u:system_r:container_t:s0:c1,c2";
    const UNCONFINED: &str = "uid=1,label=unconfined_u:unconfined_r:unconfined_t:s0";
    const NOLABEL: &str = "uid=1";
    let rows = [
        row(CT, H1000, Talk(NONE, "X"), true, Some("container-t")),
        row(UNCONFINED, H1000, Talk(NONE, "X"), false, None),
        // No label: only `anyone` rules apply.
        row(NOLABEL, H1000, Talk(NONE, "X"), false, None),
        row(
            NOLABEL,
            H1000,
            Talk(&["org.l.Any"], "X"),
            true,
            Some("anyone-l"),
        ),
        row(
            NOLABEL,
            "uid=2,label=trusted_t",
            See("org.x.Y"),
            true,
            Some("see-trusted"),
        ),
        row(
            NOLABEL,
            "uid=2,label=trusted_tt",
            See("org.x.Y"),
            false,
            None,
        ),
        row(NOLABEL, "uid=2", See("org.x.Y"), false, None),
    ];
    run_text(TEXT, &rows);
}

#[test]
fn containers_and_pods() {
    use Op::*;
    const TEXT: &str = r#"builtin = false

[[rule]] # docker-aaaa
allow = ["talk"]
subject = { container = { runtime = "docker", id = "aaaa*" } }

[[rule]] # pod-1234
allow = ["talk"]
subject = { container = { pod = "1234-*" } }

[[rule]] # crio-pod-deny
deny = ["talk"]
subject = { container = { runtime = "crio", id = "cccc", pod = "1234-abcd" } }
name = "org.p.*"

[[rule]] # own-any-id
allow = ["own"]
subject = { container = { id = "*" } }

[[rule]] # in-container
allow = ["see"]
subject = { container = {} }

[[rule]] # to-pod
allow = ["pass-fds"]
subject = { anyone = true }
peer = { container = { runtime = "crio", pod = "1234-abcd" } }
"#;
    const POD: &str = "uid=1000,container=crio:cccc,pod=1234-abcd";
    const CRIO: &str = "uid=1000,container=crio:cccc";
    let rows = [
        row(DA, H1000, Talk(NONE, "X"), true, Some("docker-aaaa")),
        row(DB, H1000, Talk(NONE, "X"), false, None),
        row(
            "uid=1,container=podman:aaaa1111",
            H1000,
            Talk(NONE, "X"),
            false,
            None,
        ),
        row(H1000, H1000, Talk(NONE, "X"), false, None),
        row(POD, H1000, Talk(NONE, "X"), true, Some("pod-1234")),
        row(
            POD,
            H1000,
            Talk(&["org.p.Q"], "X"),
            false,
            Some("crio-pod-deny"),
        ),
        row(CRIO, H1000, Talk(NONE, "X"), false, None),
        // An id glob never matches an unknown (empty) id, even `*`.
        row("uid=1,container=docker", "", Own("org.x.Y"), false, None),
        row(DB, "", Own("org.x.Y"), true, Some("own-any-id")),
        row(
            "uid=1,container=docker",
            H1000,
            See("org.x.Y"),
            true,
            Some("in-container"),
        ),
        row(H1000, H1000, See("org.x.Y"), false, None),
        row(H1000, POD, Fds(NONE), true, Some("to-pod")),
        row(H1000, CRIO, Fds(NONE), false, None),
    ];
    run_text(TEXT, &rows);
}

#[test]
fn listeners() {
    use Op::*;
    const TEXT: &str = r#"builtin = false

[[rule]] # main-socket
allow = ["talk"]
subject = { listener = "/run/pbus/bus.sock" }

[[rule]] # container-sockets
allow = ["own"]
subject = { listener = "/run/pbus/containers/*.sock" }

[[rule]] # deny-evil
deny = ["own"]
subject = { listener = "/run/pbus/containers/*.sock", uid = 0 }
name = "org.freedesktop.*"
"#;
    let rows = [
        row(
            "uid=1,listener=/run/pbus/bus.sock",
            H1000,
            Talk(NONE, "X"),
            true,
            Some("main-socket"),
        ),
        row(
            "uid=1,listener=/run/pbus/other.sock",
            H1000,
            Talk(NONE, "X"),
            false,
            None,
        ),
        row("uid=1", H1000, Talk(NONE, "X"), false, None),
        row(
            "uid=1,listener=/run/pbus/containers/a.sock",
            "",
            Own("org.x.Y"),
            true,
            Some("container-sockets"),
        ),
        row(
            "uid=0,listener=/run/pbus/containers/a.sock",
            "",
            Own("org.freedesktop.DBus"),
            false,
            Some("deny-evil"),
        ),
        row(
            "uid=0,listener=/run/pbus/containers/a.sock",
            "",
            Own("org.x.Y"),
            true,
            Some("container-sockets"),
        ),
        row(
            "uid=1,listener=/run/pbus/bus.sock",
            "",
            Own("org.x.Y"),
            false,
            None,
        ),
    ];
    run_text(TEXT, &rows);
}

#[test]
fn memfd_caps() {
    use Op::*;
    const TEXT: &str = r#"builtin = false

[[rule]] # one-mib
allow = ["memfd"]
subject = { anyone = true }
max-bytes = 1048576

[[rule]] # big-uncapped
allow = ["memfd"]
subject = { anyone = true }
name = "org.big.*"

[[rule]] # no-memfd-into-containers
deny = ["memfd"]
subject = { anyone = true }
peer = { host = false }

[[rule]] # root-small-into-containers
allow = ["memfd"]
subject = { uid = 0 }
peer = { host = false }
max-bytes = 4096
"#;
    let rows = [
        row(
            H1000,
            H1000,
            Memfd(NONE, Some(1_048_576)),
            true,
            Some("one-mib"),
        ),
        row(
            H1000,
            H1000,
            Memfd(&["org.big.Store"], None),
            true,
            Some("big-uncapped"),
        ),
        row(
            H1000,
            DA,
            Memfd(NONE, Some(0)),
            false,
            Some("no-memfd-into-containers"),
        ),
        row(
            ROOT,
            DA,
            Memfd(NONE, Some(4096)),
            true,
            Some("root-small-into-containers"),
        ),
        // The name-specific rule beats the peer condition.
        row(
            H1000,
            DA,
            Memfd(&["org.big.Store"], None),
            true,
            Some("big-uncapped"),
        ),
    ];
    run_text(TEXT, &rows);
    // No memfd rule at all: no cap.
    const NONE_TEXT: &str = "builtin = false\n";
    run_text(
        NONE_TEXT,
        &[row(H1000, H1001, Memfd(N_FOO, None), true, None)],
    );
}

#[test]
fn pass_fds_and_monitor() {
    use Op::*;
    const TEXT: &str = r#"builtin = false

[[rule]] # fds-same-uid
allow = ["pass-fds"]
subject = { anyone = true }
peer = { same-uid = true }

[[rule]] # no-fds
deny = ["pass-fds"]
subject = { anyone = true }
name = "org.nofd.*"

[[rule]] # adm-monitor
allow = ["monitor"]
subject = { gid = 4 }

[[rule]] # not-1234
deny = ["monitor"]
subject = { gid = 4, uid = 1234 }
"#;
    let rows = [
        row(H1000, H1000_B, Fds(N_FOO), true, Some("fds-same-uid")),
        row(H1000, H1001, Fds(N_FOO), false, None),
        row(H1000, H1000_B, Fds(&["org.nofd.X"]), false, Some("no-fds")),
        row("uid=1000,groups=4", "", Monitor, true, Some("adm-monitor")),
        row("uid=1234,gid=4", "", Monitor, false, Some("not-1234")),
        row("uid=5", "", Monitor, false, None),
    ];
    run_text(TEXT, &rows);
}

#[test]
fn file_access() {
    use Op::*;
    const TEXT: &str = r#"builtin = false

[[rule]] # data-read
allow = ["file"]
subject = { uid = 1000 }
path = "/srv/data"
access = ["read"]

[[rule]] # inbox-rwc
allow = ["file"]
subject = { uid = 1000 }
path = "/srv/data/inbox/"
access = ["read", "write", "create"]

[[rule]] # secret-no-read
deny = ["file"]
subject = { uid = 1000 }
path = "/srv/data/inbox/secret"
access = ["read"]
"#;
    const U: &str = "uid=1000";
    let rows = [
        row(U, "", File("/srv/data/x", "r"), true, Some("data-read")),
        row(U, "", File("/srv/data", "r"), true, Some("data-read")),
        row(U, "", File("/srv/database/x", "r"), false, None),
        row(U, "", File("/srv/database", "r"), false, None),
        row(U, "", File("/srv", "r"), false, None),
        row(U, "", File("/srv/data/x", "w"), false, None),
        row(
            U,
            "",
            File("/srv/data/inbox/new", "wc"),
            true,
            Some("inbox-rwc"),
        ),
        row(
            U,
            "",
            File("/srv/data/inbox/new", "r"),
            true,
            Some("inbox-rwc"),
        ),
        row(
            U,
            "",
            File("/srv/data/inbox/secret", "r"),
            false,
            Some("secret-no-read"),
        ),
        row(
            U,
            "",
            File("/srv/data/inbox/secret/x", "w"),
            true,
            Some("inbox-rwc"),
        ),
        row(
            U,
            "",
            File("/srv/data/inbox/secret/x", "rw"),
            false,
            Some("secret-no-read"),
        ),
        // `..` is refused before any rule is looked at.
        row(U, "", File("/srv/data/../etc/passwd", "r"), false, None),
        row(
            U,
            "",
            File("/srv/data/inbox/../../data/x", "r"),
            false,
            None,
        ),
        row(U, "", File("srv/data/x", "r"), false, None),
        // `.` and repeated slashes are harmless.
        row(U, "", File("/srv/data/./x", "r"), true, Some("data-read")),
        row(U, "", File("//srv//data/x", "r"), true, Some("data-read")),
        row("uid=1001", "", File("/srv/data/x", "r"), false, None),
    ];
    run_text(TEXT, &rows);
    let policy = Policy::parse(TEXT, "test.toml").unwrap();
    let snap = policy.snapshot(&parse_identity(U).unwrap());
    let d = snap.file_access(Path::new("/srv/data/../etc/passwd"), FileAccess::READ);
    assert!(d.reason.contains(".."), "{d}");
    // The reason names the kind of access that decided.
    let reason = |path: &str, access: &str| {
        snap.file_access(Path::new(path), FileAccess::parse(access).unwrap())
            .reason
    };
    assert_eq!(
        reason("/srv/data/x", "r"),
        "read access allowed by the most specific matching rule"
    );
    assert_eq!(
        reason("/srv/data/inbox/secret/x", "rw"),
        "read access denied by the most specific matching rule"
    );
    assert_eq!(
        reason("/srv/data/x", "rw"),
        "no rule grants write access under this path"
    );
    // Asking for no kind of access is refused, by `explain` too.
    let nothing = snap.file_access(Path::new("/srv/data/x"), FileAccess::default());
    assert!(!nothing.allowed, "{nothing}");
    assert_eq!(nothing.rule, None);
    assert_eq!(nothing.reason, "no access kind asked for");
    let explained = policy.explain(
        &parse_identity(U).unwrap(),
        &Operation::File {
            path: "/srv/data/x".into(),
            access: FileAccess::default(),
        },
    );
    assert_eq!(explained.decision, nothing);
}

#[test]
fn file_access_text() {
    let read = FileAccess::READ;
    let rw = FileAccess {
        write: true,
        ..read
    };
    let all = FileAccess { create: true, ..rw };
    let create = FileAccess {
        create: true,
        ..FileAccess::default()
    };
    let cases = [
        ("r", Some(read)),
        ("read", Some(read)),
        ("rr", Some(read)),
        ("rw", Some(rw)),
        ("wr", Some(rw)),
        ("read,write", Some(rw)),
        ("write, read", Some(rw)),
        ("r,w", Some(rw)),
        ("c", Some(create)),
        ("rwc", Some(all)),
        ("read,write,create", Some(all)),
        ("", None),
        ("x", None),
        ("rx", None),
        ("r w", None),
        ("rwcx", None),
        ("reed", None),
        ("read,", None),
        (",", None),
        ("READ", None),
    ];
    for (text, want) in cases {
        assert_eq!(FileAccess::parse(text), want, "{text:?}");
    }
    assert_eq!(read.to_string(), "read");
    assert_eq!(all.to_string(), "read,write,create");
    assert_eq!(create.to_string(), "create");
    assert_eq!(FileAccess::default().to_string(), "none");
    for access in [read, rw, all, create] {
        assert_eq!(FileAccess::parse(&access.to_string()), Some(access));
    }
}

/// Lines and columns of errors, exactly.
#[test]
fn parse_errors() {
    type Case = (&'static str, &'static [(u32, u32, &'static str)]);
    let cases: &[Case] = &[
        ("colour = 1\n", &[(1, 1, "unknown key `colour`")]),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { anyone = true }\nnmae = \"x\"\n",
            &[(4, 1, "unknown key `nmae` in rule")],
        ),
        (
            "[[rule]]\nallow = [\"talk\", \"speak\"]\nsubject = { anyone = true }\n",
            &[(2, 18, "unknown right `speak`")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { label = \"foo[0-9]\" }\n",
            &[(3, 25, "`label`: `[` is reserved")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { container = { runtime = \"rkt\" } }\n",
            &[(3, 37, "unknown runtime \"rkt\"")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { container = { runtime = \"host\" } }\n",
            &[(3, 37, "use `host = true`")],
        ),
        (
            "[[rule]]\nallow = [\"own\"]\nsubject = { anyone = true }\nmember = \"Get\"\n",
            &[(4, 1, "`member` applies only to talk and receive rules, not own")],
        ),
        (
            "[[rule]]\nallow = [\"own\"]\nsubject = { anyone = true }\npeer = { uid = 0 }\n",
            &[(4, 1, "`peer` does not apply to own rules")],
        ),
        (
            "[[rule]]\nallow = [\"monitor\"]\nsubject = { anyone = true }\nname = \"org.a.B\"\n",
            &[(4, 1, "`name` does not apply to monitor rules")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { anyone = true }\nname = \"org.ex*\"\n",
            &[(4, 15, "`name`: a name is `*`, an exact name, or a prefix")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { anyone = true }\nname = \"org\"\n",
            &[(4, 9, "at least two")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { anyone = true }\nmember = \"Get-x\"\n",
            &[(4, 14, "`member`: has a character outside A-Z a-z 0-9 _")],
        ),
        (
            "[[rule]]\nallow = [\"file\"]\nsubject = { anyone = true }\npath = \"srv\"\naccess = \"read\"\n",
            &[(4, 9, "`path`: must be an absolute path")],
        ),
        (
            "\n\n[[rule]]\nallow = [\"talk\"]\n",
            &[(3, 1, "a rule needs a `subject`")],
        ),
        (
            "[[rule]]\nsubject = { anyone = true }\n",
            &[(1, 1, "a rule needs `allow")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { anyone = true }\ndeny = [\"own\"]\n",
            &[(4, 1, "either `allow` or `deny`")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { uid = -1 }\n",
            &[(3, 19, "`uid` must be an integer from 0 to 4294967295")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { uid = 4294967296 }\n",
            &[(3, 19, "`uid` must be an integer")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { uid = \"1000\" }\n",
            &[(3, 19, "`uid`: expected an integer, found string")],
        ),
        (
            "[[rule]]\ndeny = [\"memfd\"]\nsubject = { anyone = true }\nmax-bytes = 5\n",
            &[(4, 1, "`max-bytes` belongs in an allow rule")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { anyone = true }\nmax-bytes = 5\n",
            &[(4, 1, "`max-bytes` applies only to memfd rules, not talk")],
        ),
        (
            "[[rule]]\nallow = [\"file\"]\nsubject = { anyone = true }\naccess = [\"read\"]\n",
            &[(2, 1, "file rules need `path")],
        ),
        (
            "[[rule]]\nallow = [\"file\"]\nsubject = { anyone = true }\npath = \"/srv/../etc\"\naccess = [\"read\"]\n",
            &[(4, 14, "`..` components are not allowed")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { host = true, container = {} }\n",
            &[(3, 26, "`container` cannot be combined with `host`")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { same-uid = true }\n",
            &[(3, 13, "put it in `peer`")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = {}\n",
            &[(3, 11, "empty subject")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { anyone = true, uid = 3 }\n",
            &[(3, 13, "cannot be combined with other conditions")],
        ),
        (
            "[[rule]]\nallow = [\"talk\", \"talk\"]\nsubject = { anyone = true }\n",
            &[(2, 18, "listed twice")],
        ),
        (
            "[[rule]]\nallow = [\"talk\"]\nsubject = { container = { runtime = \"docker\", idd = \"x\" } }\n",
            &[(3, 47, "unknown key `idd` in container")],
        ),
        ("[[rule]]\nallow = [\n", &[(2, 10, "TOML syntax: unclosed array")]),
        ("x = 1\nx = 2\n", &[(2, 1, "TOML syntax: duplicate key")]),
        // Several problems in one file are all reported, in order.
        (
            "[[rule]]\nallow = [\"tlak\"]\nsubject = { uid = 1 }\n\n[[rule]]\nallow = [\"own\"]\nsubject = { anyone = true }\nmember = \"X\"\n",
            &[(2, 10, "unknown right `tlak`"), (8, 1, "`member` applies only")],
        ),
    ];
    for (text, want) in cases {
        let errors = Policy::parse(text, "bad.toml").expect_err(text);
        let got: Vec<(u32, u32, String)> = errors
            .iter()
            .map(|e| {
                let (l, c) = e.position.expect("positioned");
                (l, c, e.message.clone())
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{text:?}: {errors}");
        for ((l, c, message), (wl, wc, wm)) in got.iter().zip(want.iter()) {
            assert_eq!((*l, *c), (*wl, *wc), "{text:?}: {errors}");
            assert!(message.contains(wm), "{text:?}: {message:?} lacks {wm:?}");
        }
        // Display: file:line:col: message.
        let first = errors.to_string();
        assert!(
            first.starts_with(&format!("bad.toml:{}:{}: ", want[0].0, want[0].1)),
            "{first}"
        );
    }
}

/// A scratch directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pbus-policy-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const ALLOW_A: &str = "[[rule]]\nallow = [\"talk\"]\nsubject = { uid = 5 }\nname = \"org.a.X\"\n";

#[test]
fn directory_merge_order() {
    let dir = TempDir::new();
    // Written out of order; read in lexical order of names.
    dir.write("20-b.toml", &format!("# b\n\n{ALLOW_A}"));
    dir.write("10-a.toml", ALLOW_A);
    dir.write("README", "not toml at all [");
    dir.write(".10-hidden.toml", "garbage [");
    dir.write(
        "15-deny.toml",
        "[[rule]]\ndeny = [\"own\"]\nsubject = { uid = 5 }\nname = \"org.a.X\"\n",
    );
    std::fs::create_dir(dir.0.join("dir.toml")).unwrap();

    let policy = Policy::load(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = policy
        .origins()
        .iter()
        .map(|o| {
            Path::new(o)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names, ["10-a.toml", "15-deny.toml", "20-b.toml"]);
    assert!(policy.includes_builtin());
    let builtin = Policy::builtin().rule_count();
    assert_eq!(policy.rule_count(), builtin + 3);
    // Rules are numbered in load order: built-in first, then the files.
    let infos: Vec<_> = policy.rule_infos().collect();
    assert!(infos[0].origin.starts_with("builtin:"));
    assert!(infos[builtin].origin.ends_with("10-a.toml"));
    assert!(infos[builtin + 2].origin.ends_with("20-b.toml"));
    assert_eq!(infos[builtin + 2].line, 3);

    let u5 = parse_identity("uid=5").unwrap();
    let snap = policy.snapshot(&u5);
    // Two equal allows: the earlier file is reported.
    let d = snap.talk(&parse_identity("uid=6").unwrap(), &["org.a.X"], "M");
    assert!(d.allowed);
    assert!(
        d.rule.as_ref().unwrap().origin.ends_with("10-a.toml"),
        "{d}"
    );
    // The built-in default still applies to everything else.
    assert!(snap.own("org.b.Y").allowed);
    assert!(!snap.own("org.a.X").allowed);
    assert!(
        snap.talk(&parse_identity("uid=5").unwrap(), &[], "M")
            .allowed
    );

    let summary = check_path(&dir.0).unwrap();
    assert_eq!(
        (summary.files, summary.rules, summary.builtin),
        (3, 3, true)
    );
    assert_eq!(
        summary.to_string(),
        "3 files, 3 rules (on top of the built-in default)"
    );

    // `builtin = false` in any file leaves the default out.
    dir.write("30-strict.toml", "builtin = false\n");
    let policy = Policy::load(&dir.0).unwrap();
    assert!(!policy.includes_builtin());
    assert_eq!(policy.rule_count(), 3);
    assert_eq!(policy.rule_infos().next().unwrap().index, 0);
    let snap = policy.snapshot(&u5);
    assert!(!snap.own("org.b.Y").allowed);
    assert!(!snap.talk(&u5, &[], "M").allowed);
    let summary = check_path(&dir.0).unwrap();
    assert_eq!(
        (summary.files, summary.rules, summary.builtin),
        (4, 3, false)
    );

    // A single file loads on its own.
    let policy = Policy::load(&dir.0.join("10-a.toml")).unwrap();
    assert_eq!(policy.rule_count(), builtin + 1);
}

#[test]
fn directory_errors() {
    let dir = TempDir::new();
    dir.write(
        "b.toml",
        "[[rule]]\nallow = [\"talk\"]\nsubject = { uid = \"x\" }\n",
    );
    dir.write("a.toml", "oops = 1\n");
    dir.write("c.toml", ALLOW_A);
    let errors = Policy::load(&dir.0).unwrap_err();
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 2, "{errors}");
    let a = dir.0.join("a.toml").display().to_string();
    let b = dir.0.join("b.toml").display().to_string();
    assert!(
        lines[0].starts_with(&format!("{a}:1:1: unknown key `oops`")),
        "{errors}"
    );
    assert!(
        lines[1].starts_with(&format!("{b}:3:19: `uid`: expected an integer")),
        "{errors}"
    );
    assert!(check_path(&dir.0).is_err());

    let missing = dir.0.join("nope");
    let errors = Policy::load(&missing).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors.0[0].position, None);
    assert!(errors.to_string().contains("cannot read"), "{errors}");
}

#[test]
fn snapshots_share_indexes() {
    let policy = Policy::builtin();
    let a = policy.snapshot(&parse_identity("uid=1000,pid=1").unwrap());
    let b = policy.snapshot(&parse_identity("uid=1000,pid=2").unwrap());
    let c = policy.snapshot(&parse_identity("uid=1001").unwrap());
    let root = policy.snapshot(&parse_identity("uid=0").unwrap());
    let da = policy.snapshot(&parse_identity(DA).unwrap());
    let db = policy.snapshot(&parse_identity(DB).unwrap());
    // Host non-root peers match the same rules whatever their uid: the
    // relation (same-uid) is evaluated per check, not baked in.
    assert!(a.shares_index_with(&b));
    assert!(a.shares_index_with(&c));
    assert!(!a.shares_index_with(&root));
    assert!(da.shares_index_with(&db));
    assert!(!a.shares_index_with(&da));
    // ... and the relation still tells them apart.
    let u1001 = parse_identity("uid=1001").unwrap();
    assert!(!a.talk(&u1001, &[], "X").allowed);
    assert!(c.talk(&u1001, &[], "X").allowed);
    // Clones are one Arc.
    let a2 = a.clone();
    assert!(a2.shares_index_with(&a));
    // host-own, host-same-uid, receive.
    assert_eq!(a.rule_count(), 3);
}

#[test]
fn explain_output() {
    let policy = Policy::parse(SPECIFIC, "test.toml").unwrap();
    let subject = parse_identity("uid=5").unwrap();
    let op = Operation::Talk {
        receiver: parse_identity("uid=6").unwrap(),
        names: vec!["org.example.sub.Foo".into()],
        member: "Shutdown".into(),
    };
    let e = policy.explain(&subject, &op);
    assert!(!e.decision.allowed);
    let text = e.to_string();
    assert!(
        text.starts_with("talk denied: denied by the most specific matching rule (test.toml:"),
        "{text}"
    );
    // Matched rules first, most specific first; then the rest.
    let tags: Vec<(bool, bool)> = e
        .candidates
        .iter()
        .map(|c| (c.matched, c.deciding))
        .collect();
    assert_eq!(tags[0], (true, true));
    assert!(tags.iter().skip_while(|t| t.0).all(|t| !t.0));
    assert_eq!(e.candidates.len(), 8);
    let secret = Operation::Talk {
        receiver: parse_identity("uid=6").unwrap(),
        names: vec!["org.example.sub.Secret".into()],
        member: "Get".into(),
    };
    let e2 = policy.explain(&subject, &secret).to_string();
    assert!(e2.contains("no match: member \"Get\" is not Ping"), "{e2}");
    assert!(
        text.contains("no match: subject uid 5 is not 1000"),
        "{text}"
    );
    assert!(
        text.contains("org.example.sub.Secret covers none of"),
        "{text}"
    );

    let builtin = Policy::builtin();
    let e = builtin.explain(
        &parse_identity(DA).unwrap(),
        &Operation::Talk {
            receiver: parse_identity(H1000).unwrap(),
            names: vec![],
            member: "Get".into(),
        },
    );
    let text = e.to_string();
    assert!(
        text.starts_with("talk denied: no rule lets this peer talk to the receiver"),
        "{text}"
    );
    assert!(text.contains("subject is not on the host"), "{text}");
    assert!(
        text.contains("receiver is not in the same container"),
        "{text}"
    );
    assert_eq!(e.decision.right, Right::Talk);
}

#[test]
fn rule_texts() {
    let policy = Policy::builtin();
    let texts: Vec<&str> = policy.rule_infos().map(|r| r.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "allow own subject{host}",
            "allow see,talk,pass-fds subject{host} peer{same-uid host}",
            "allow own subject{in-container}",
            "allow see,talk,pass-fds subject{in-container} peer{same-uid same-container}",
            "allow see,own,talk,pass-fds,monitor subject{uid=0 host}",
            "allow file subject{uid=0 host} path=/ access=read,write,create",
            "allow receive subject{anyone}",
        ]
    );
    let d = policy
        .snapshot(&parse_identity(ROOT).unwrap())
        .own("org.x.Y");
    assert_eq!(
        d.to_string(),
        format!(
            "own allowed: allowed by the most specific matching rule \
             (builtin:default.toml:{}: allow see,own,talk,pass-fds,monitor subject{{uid=0 host}})",
            line_of(DEFAULT_POLICY, "root")
        )
    );
}

#[test]
fn identity_round_trip_errors() {
    assert!(matches!(
        Policy::parse("", "empty.toml"),
        Ok(p) if p.includes_builtin() && p.rule_count() == Policy::builtin().rule_count()
    ));
    let e: PolicyErrors = Policy::parse("[[rule]]\n", "x.toml").unwrap_err();
    assert_eq!(e.len(), 2, "{e}");
}

/// The `toml` blocks of POLICY.md, in order.
fn doc_blocks() -> Vec<String> {
    let doc = include_str!("../POLICY.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line) {
            (None, "```toml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), line) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// The examples in POLICY.md parse and mean what the text says.
#[test]
fn documented_examples() {
    use Op::*;
    let blocks = doc_blocks();
    assert_eq!(blocks.len(), 3);

    // The built-in default as printed is the shipped text, minus its header.
    let shipped: String = DEFAULT_POLICY
        .lines()
        .skip_while(|l| l.starts_with('#') || l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(blocks[1], shipped);

    const PRINT: &str = "uid=1000,container=crio:77aa,pod=7d1c2f0e-1111";
    const OTHER_POD: &str = "uid=1000,container=crio:88bb,pod=99999999-1111";
    let spooler: &[&str] = &["org.example.Spooler"];
    let policy = Policy::parse(&blocks[0], "glance.toml").unwrap();
    let rows = [
        (PRINT, ROOT, Talk(spooler, "Print"), true),
        (PRINT, ROOT, See("org.example.Spooler"), true),
        (PRINT, ROOT, Talk(spooler, "Purge"), false),
        (OTHER_POD, ROOT, Talk(spooler, "Print"), false),
        (PRINT, "", Own("org.example.Spooler"), false),
        (H1000, "", Own("org.example.Spooler"), false),
        (ROOT, "", Own("org.example.Spooler"), true),
        (H1000, "", Own("org.example.Other"), true),
    ];
    for (subject, target, op, allowed) in rows {
        let subject = parse_identity(subject).unwrap();
        let target = if target.is_empty() {
            PeerIdentity::default()
        } else {
            parse_identity(target).unwrap()
        };
        let d = fast(&policy, &subject, &target, op);
        assert_eq!(d.allowed, allowed, "{op:?}: {d}");
    }

    // The "keep uid 1000 from talking to itself" example.
    let policy = Policy::parse(&blocks[2], "deny.toml").unwrap();
    let d = fast(
        &policy,
        &parse_identity(H1000).unwrap(),
        &parse_identity(H1000_B).unwrap(),
        Talk(N_FOO, "X"),
    );
    assert!(!d.allowed, "{d}");
    assert_eq!(d.rule.unwrap().origin.as_ref(), "deny.toml");
    let d = fast(
        &policy,
        &parse_identity(H1001).unwrap(),
        &parse_identity("uid=1001,pid=5").unwrap(),
        Talk(N_FOO, "X"),
    );
    assert!(d.allowed, "{d}");
}

#[test]
fn shareable_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Policy>();
    send_sync::<crate::PeerPolicy>();
    send_sync::<Decision>();
    send_sync::<PolicyErrors>();
}

#[test]
fn errors_in_source_order() {
    let text = "[[rule]]\nsubject = { uid = \"x\" }\nallow = [\"nope\"]\nzzz = 1\naaa = 2\n";
    let errors = Policy::parse(text, "o.toml").unwrap_err();
    let lines: Vec<u32> = errors.iter().filter_map(|e| e.line()).collect();
    assert_eq!(lines, [2, 3, 4, 5], "{errors}");
}
