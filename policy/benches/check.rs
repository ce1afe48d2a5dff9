//! Per-message policy check cost: one `may_talk` check (the verdict the
//! daemon asks for on every message) against a compiled snapshot of a
//! 1,000-rule policy, compared in the same run with the built-in default
//! policy and with a naive linear scan over the same 1,000 rules
//! (implemented here, the way a policy without per-peer indexes would
//! evaluate them); and the full `talk` [`Decision`](pbus_policy::Decision)
//! that `explain` and logs use.
//!
//! Run with `cargo bench -p pbus-policy`. Prints the median ns per check
//! over many samples, and ratios.
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use pbus_identity::PeerIdentity;
use pbus_policy::{parse_identity, PeerPolicy, Policy};

/// Which names a generated rule covers.
#[derive(Clone)]
enum Name {
    Any,
    /// Prefix without the trailing `.*`.
    Prefix(String),
    Exact(String),
}

/// Who a generated rule is about.
#[derive(Clone, Copy)]
enum Who {
    Anyone,
    Uid(u32),
    /// A docker container id prefix (never matches the host subject).
    Docker,
}

/// One generated rule: rendered to TOML for the real policy, and kept as is
/// for the naive scan.
#[derive(Clone)]
struct GenRule {
    allow: bool,
    who: Who,
    same_uid: bool,
    name: Name,
    member: Option<String>,
}

impl GenRule {
    fn toml(&self) -> String {
        let mut out = String::from("[[rule]]\n");
        out.push_str(if self.allow {
            "allow = [\"talk\"]\n"
        } else {
            "deny = [\"talk\"]\n"
        });
        out.push_str(match self.who {
            Who::Anyone => "subject = { anyone = true }\n",
            Who::Uid(_) => "",
            Who::Docker => "subject = { container = { runtime = \"docker\", id = \"ab*\" } }\n",
        });
        if let Who::Uid(uid) = self.who {
            out.push_str(&format!("subject = {{ uid = {uid} }}\n"));
        }
        if self.same_uid {
            out.push_str("peer = { same-uid = true }\n");
        }
        match &self.name {
            Name::Any => {}
            Name::Prefix(p) => out.push_str(&format!("name = \"{p}.*\"\n")),
            Name::Exact(n) => out.push_str(&format!("name = \"{n}\"\n")),
        }
        if let Some(m) = &self.member {
            out.push_str(&format!("member = \"{m}\"\n"));
        }
        out.push('\n');
        out
    }

    /// Naive evaluation: does the rule apply, and with what specificity?
    fn applies(
        &self,
        subject: &PeerIdentity,
        receiver: &PeerIdentity,
        names: &[&str],
        member: &str,
    ) -> Option<(u32, bool, u32, bool)> {
        let who_weight = match self.who {
            Who::Anyone => 0,
            Who::Uid(uid) => {
                if subject.uid != uid {
                    return None;
                }
                1
            }
            Who::Docker => {
                if !subject.container.is_container() || !subject.container.id.starts_with("ab") {
                    return None;
                }
                3
            }
        };
        if self.same_uid && subject.uid != receiver.uid {
            return None;
        }
        let object = match &self.name {
            Name::Any => 0,
            Name::Exact(n) => {
                if !names.contains(&n.as_str()) {
                    return None;
                }
                1000
            }
            Name::Prefix(p) => {
                let covered = names.iter().any(|name| {
                    name.strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1)
                });
                if !covered {
                    return None;
                }
                p.split('.').count() as u32
            }
        };
        if let Some(m) = &self.member {
            if m != member {
                return None;
            }
        }
        Some((
            object,
            self.member.is_some(),
            who_weight + u32::from(self.same_uid),
            !self.allow,
        ))
    }
}

/// 1,000 rules, five per service `org.svcN.Service` (N < 200): two exact
/// name rules, one prefix rule (`org.svcN.*` or a shared `org.grpM.*`), one
/// member rule on the exact name, one relation (`same-uid`) + member rule on
/// the prefix. Subjects cycle through uid 1000 and anyone (which match the
/// benchmark subject) and uid 2000 and a docker container (which do not),
/// plus one `*` rule first.
fn generate() -> Vec<GenRule> {
    let mut rules = Vec::with_capacity(1000);
    rules.push(GenRule {
        allow: true,
        who: Who::Anyone,
        same_uid: true,
        name: Name::Any,
        member: None,
    });
    let whos = [Who::Uid(1000), Who::Anyone, Who::Uid(2000), Who::Docker];
    let mut i = 0usize;
    while rules.len() < 1000 {
        let svc = i / 5;
        let who = whos[i % whos.len()];
        let exact = format!("org.svc{svc}.Service");
        let rule = match i % 5 {
            0 | 1 => GenRule {
                allow: i % 3 > 0,
                who,
                same_uid: i % 7 < 1,
                name: Name::Exact(exact),
                member: None,
            },
            2 => GenRule {
                allow: (i / 5) % 2 < 1,
                who,
                same_uid: false,
                name: Name::Prefix(if (i / 5) % 3 > 0 {
                    format!("org.svc{svc}")
                } else {
                    format!("org.grp{}", svc % 20)
                }),
                member: None,
            },
            3 => GenRule {
                allow: (i / 5) % 4 != 3,
                who,
                same_uid: false,
                name: Name::Exact(exact),
                member: Some(format!("Method{}", i % 9)),
            },
            _ => GenRule {
                allow: true,
                who,
                same_uid: true,
                name: Name::Prefix(format!("org.svc{svc}")),
                member: Some(format!("Method{}", i % 9)),
            },
        };
        rules.push(rule);
        i += 1;
    }
    rules
}

/// A (name, member) that a member rule with a subject matching uid 1000
/// decides, from the second half of the policy.
fn member_hit(rules: &[GenRule]) -> (String, String) {
    rules
        .iter()
        .skip(500)
        .find_map(|r| match (&r.name, &r.member, r.who) {
            (Name::Exact(n), Some(m), Who::Uid(1000) | Who::Anyone) => Some((n.clone(), m.clone())),
            _ => None,
        })
        .expect("the generator makes member rules for uid 1000")
}

/// Naive linear scan: every rule, every time; the most specific wins, deny
/// beats allow, earlier rules win ties.
fn naive_talk(
    rules: &[GenRule],
    subject: &PeerIdentity,
    receiver: &PeerIdentity,
    names: &[&str],
    member: &str,
) -> Option<(bool, usize)> {
    let mut best: Option<((u32, bool, u32, bool), usize)> = None;
    for (i, rule) in rules.iter().enumerate() {
        if let Some(spec) = rule.applies(subject, receiver, names, member) {
            if best.is_none_or(|(b, _)| spec > b) {
                best = Some((spec, i));
            }
        }
    }
    best.map(|(spec, i)| (!spec.3, i))
}

/// Median ns per call of `f` over `samples` samples of `iters` calls.
fn median_ns(samples: usize, iters: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters {
        f();
    }
    let mut times: Vec<f64> = (0..samples)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(iters)
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The daemon's per-message check: the verdict alone.
fn talk_ns(snap: &PeerPolicy, receiver: &PeerIdentity, names: &[&str], member: &str) -> f64 {
    median_ns(201, 20_000, || {
        black_box(snap.may_talk(black_box(receiver), black_box(names), black_box(member)));
    })
}

/// The same check building the whole decision (deciding rule included).
fn talk_decision_ns(
    snap: &PeerPolicy,
    receiver: &PeerIdentity,
    names: &[&str],
    member: &str,
) -> f64 {
    median_ns(201, 20_000, || {
        black_box(snap.talk(black_box(receiver), black_box(names), black_box(member)));
    })
}

fn main() {
    let generated = generate();
    let text: String = std::iter::once("builtin = false\n\n".to_string())
        .chain(generated.iter().map(GenRule::toml))
        .collect();
    let start = Instant::now();
    let policy: Arc<Policy> = Policy::parse(&text, "bench.toml").expect("generated policy parses");
    let parse_ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(policy.rule_count(), 1000);

    let subject = parse_identity("uid=1000").unwrap();
    let receiver = parse_identity("uid=1000,pid=2").unwrap();
    let start = Instant::now();
    let snap = policy.snapshot(&subject);
    let first_snapshot_us = start.elapsed().as_secs_f64() * 1e6;
    let cached_snapshot_ns = median_ns(51, 200, || {
        black_box(policy.snapshot(black_box(&subject)));
    });

    let (hit_name, hit_member) = member_hit(&generated);
    let hit: &[&str] = &[hit_name.as_str()];
    let member = hit_member.as_str();
    let miss: &[&str] = &["com.nowhere.Thing"];
    let several: &[&str] = &["org.grp7.a.b", "org.svc42.Service", "org.svc99.Service"];
    for (what, names, m) in [
        ("hit", hit, member),
        ("miss", miss, member),
        ("3 names", several, "Method1"),
    ] {
        let d = snap.talk(&receiver, names, m);
        println!("  decides {what} {names:?} {m}: {d}");
    }

    // The index and the naive scan must agree.
    for (names, m) in [
        (hit, member),
        (miss, member),
        (several, "Method1"),
        (&[][..], "X"),
    ] {
        let fast = snap.talk(&receiver, names, m);
        assert_eq!(snap.may_talk(&receiver, names, m), fast.allowed);
        let slow = naive_talk(&generated, &subject, &receiver, names, m);
        assert_eq!(
            fast.rule.as_ref().map(|r| (fast.allowed, r.index)),
            slow,
            "index and scan disagree for {names:?} {m}"
        );
    }

    let indexed_hit = talk_ns(&snap, &receiver, hit, member);
    let indexed_miss = talk_ns(&snap, &receiver, miss, member);
    let indexed_several = talk_ns(&snap, &receiver, several, "Method1");
    let decision_hit = talk_decision_ns(&snap, &receiver, hit, member);
    let builtin = Policy::builtin();
    let builtin_snap = builtin.snapshot(&subject);
    let builtin_hit = talk_ns(&builtin_snap, &receiver, hit, member);
    let naive_hit = median_ns(51, 500, || {
        black_box(naive_talk(
            black_box(&generated),
            &subject,
            &receiver,
            black_box(hit),
            black_box(member),
        ));
    });

    println!("policy check benchmark (median of 201 samples x 20,000 checks; naive: 51 x 500)");
    println!(
        "  parse+compile 1,000 rules: {parse_ms:.2} ms; first snapshot: {first_snapshot_us:.1} us \
         ({} rules kept); cached snapshot: {cached_snapshot_ns:.0} ns",
        snap.rule_count()
    );
    println!("  may_talk, 1,000 rules, exact name + member hit : {indexed_hit:8.1} ns");
    println!("  may_talk, 1,000 rules, no specific rule (miss)  : {indexed_miss:8.1} ns");
    println!("  may_talk, 1,000 rules, 3 names                  : {indexed_several:8.1} ns");
    println!("  may_talk, built-in default policy (baseline)    : {builtin_hit:8.1} ns");
    println!("  naive linear scan of 1,000 rules                : {naive_hit:8.1} ns");
    println!("  talk with its Decision, 1,000 rules, hit        : {decision_hit:8.1} ns");
    println!(
        "  ratios: indexed/built-in {:.2}x, naive/indexed {:.0}x, decision/verdict {:.2}x",
        indexed_hit / builtin_hit,
        naive_hit / indexed_hit,
        decision_hit / indexed_hit
    );
}
