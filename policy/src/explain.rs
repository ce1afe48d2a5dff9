//! `explain`: why a check comes out the way it does.
//!
//! [`Policy::explain`](crate::Policy::explain) evaluates one operation the
//! slow, transparent way: it walks every rule that mentions the right,
//! records for each whether it matched and why (or which condition failed),
//! sorts the matching ones by specificity, and reports the first as the
//! decider. It shares the condition tests with the snapshot indexes but not
//! the indexes themselves, so the unit tests can check that both agree.
//! This module knows nothing about files or the daemon.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use pbus_identity::PeerIdentity;

use crate::rule::{Facts, NamePattern, Rule};
use crate::snapshot::{no_rule_reason, normalize_path, FileKind, ALLOWED_BY_RULE, DENIED_BY_RULE};
use crate::{Decision, FileAccess, Policy, Right, RuleRef, Specificity};

/// One operation to explain, with everything its check needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Own `name`.
    Own {
        /// The well-known name.
        name: String,
    },
    /// Learn that `name` (well-known, or the owner's unique name) exists.
    See {
        /// The peer owning the name.
        owner: PeerIdentity,
        /// The name.
        name: String,
    },
    /// Send `member` to `receiver`, addressed to / owning `names`.
    Talk {
        /// The receiving peer.
        receiver: PeerIdentity,
        /// Destination plus the receiver's well-known names (may be empty).
        names: Vec<String>,
        /// The method or signal name.
        member: String,
    },
    /// Accept `member` from `sender`, which owns `names`.
    Receive {
        /// The sending peer.
        sender: PeerIdentity,
        /// The sender's well-known names (may be empty).
        names: Vec<String>,
        /// The method or signal name.
        member: String,
    },
    /// Attach fds to a message for `receiver`.
    PassFds {
        /// The receiving peer.
        receiver: PeerIdentity,
        /// Destination plus the receiver's well-known names.
        names: Vec<String>,
    },
    /// Attach a sealed memfd payload to a message for `receiver`.
    Memfd {
        /// The receiving peer.
        receiver: PeerIdentity,
        /// Destination plus the receiver's well-known names.
        names: Vec<String>,
    },
    /// Watch traffic not addressed to the subject.
    Monitor,
    /// Have the broker open `path` with `access`.
    File {
        /// The path asked for.
        path: PathBuf,
        /// The kinds of access asked for.
        access: FileAccess,
    },
}

impl Operation {
    /// The right this operation needs.
    pub fn right(&self) -> Right {
        match self {
            Self::Own { .. } => Right::Own,
            Self::See { .. } => Right::See,
            Self::Talk { .. } => Right::Talk,
            Self::Receive { .. } => Right::Receive,
            Self::PassFds { .. } => Right::PassFds,
            Self::Memfd { .. } => Right::Memfd,
            Self::Monitor => Right::Monitor,
            Self::File { .. } => Right::File,
        }
    }

    fn target(&self) -> Option<(&'static str, &PeerIdentity)> {
        match self {
            Self::See { owner, .. } => Some(("owner", owner)),
            Self::Talk { receiver, .. }
            | Self::PassFds { receiver, .. }
            | Self::Memfd { receiver, .. } => Some(("receiver", receiver)),
            Self::Receive { sender, .. } => Some(("sender", sender)),
            Self::Own { .. } | Self::Monitor | Self::File { .. } => None,
        }
    }

    fn names(&self) -> Vec<&str> {
        match self {
            Self::Own { name } | Self::See { name, .. } => vec![name.as_str()],
            Self::Talk { names, .. }
            | Self::Receive { names, .. }
            | Self::PassFds { names, .. }
            | Self::Memfd { names, .. } => names.iter().map(String::as_str).collect(),
            Self::Monitor | Self::File { .. } => Vec::new(),
        }
    }

    fn member(&self) -> Option<&str> {
        match self {
            Self::Talk { member, .. } | Self::Receive { member, .. } => Some(member),
            _ => None,
        }
    }
}

/// One rule considered by `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The rule.
    pub rule: RuleRef,
    /// Whether all its conditions held.
    pub matched: bool,
    /// Which name or path it matched through, or which condition failed.
    pub why: String,
    /// Its specificity, when it matched.
    pub specificity: Option<Specificity>,
    /// True for the rule that decided.
    pub deciding: bool,
}

/// The answer of [`Policy::explain`](crate::Policy::explain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The decision, as the per-peer snapshot would return it.
    pub decision: Decision,
    /// For memfd operations: the cap (`None`: no policy cap).
    pub memfd_limit: Option<u64>,
    /// Every rule mentioning the right: matched ones most specific first
    /// (the first decides), then the others in policy order.
    pub candidates: Vec<Candidate>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.decision)?;
        if self.decision.right == Right::Memfd {
            match self.memfd_limit {
                Some(n) => writeln!(f, "memfd payloads up to {n} bytes")?,
                None => writeln!(f, "memfd payloads: no policy cap")?,
            }
        }
        if self.candidates.is_empty() {
            return writeln!(f, "no rule mentions {}", self.decision.right.as_str());
        }
        writeln!(f, "rules considered, most specific match first:")?;
        for c in &self.candidates {
            let mark = if c.deciding {
                "=>"
            } else if c.matched {
                " +"
            } else {
                " -"
            };
            writeln!(
                f,
                "{mark} {}:{}: {}",
                c.rule.origin, c.rule.line, c.rule.text
            )?;
            match c.specificity {
                Some(s) => writeln!(f, "     matched: {} [{s}]", c.why)?,
                None => writeln!(f, "     no match: {}", c.why)?,
            }
        }
        Ok(())
    }
}

/// Why `rule`'s name pattern does or does not cover the operation's names.
fn name_match(pattern: &NamePattern, names: &[&str]) -> Result<String, String> {
    if *pattern == NamePattern::Any {
        return Ok("name *".into());
    }
    if let Some(name) = names
        .iter()
        .find(|n| !n.starts_with(':') && pattern.matches(n))
    {
        return Ok(format!("name {name} by {}", pattern.render()));
    }
    let shown: Vec<&str> = names.to_vec();
    if shown.is_empty() {
        Err(format!(
            "no well-known name involved; the rule is about {}",
            pattern.render()
        ))
    } else {
        Err(format!("{} covers none of {shown:?}", pattern.render()))
    }
}

fn rule_decision(right: Right, rule: Option<&Rule>) -> Decision {
    match rule {
        Some(r) => Decision {
            allowed: r.allow,
            right,
            rule: Some(Arc::clone(&r.info)),
            reason: Cow::Borrowed(if r.allow {
                ALLOWED_BY_RULE
            } else {
                DENIED_BY_RULE
            }),
        },
        None => Decision {
            allowed: right == Right::Memfd,
            right,
            rule: None,
            reason: Cow::Borrowed(no_rule_reason(right)),
        },
    }
}

fn spec_of(rule: &Rule, object: u32) -> Specificity {
    Specificity {
        object,
        member: rule.member.is_some(),
        who: rule.who,
        deny: !rule.allow,
    }
}

/// Most specific first, then policy order.
fn sort_matches(list: &mut [(Specificity, &Rule, String)]) {
    list.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| a.1.info.index.cmp(&b.1.info.index))
    });
}

pub(crate) fn explain(policy: &Policy, subject: &PeerIdentity, op: &Operation) -> Explanation {
    let right = op.right();
    let facts = Facts::of(subject);
    let names = op.names();
    let member = op.member();
    let target = op.target();
    let file = match op {
        Operation::File { path, access } => Some((normalize_path(path), *access)),
        _ => None,
    };

    let mut matched: Vec<(Specificity, &Rule, String)> = Vec::new();
    let mut unmatched: Vec<(&Rule, String)> = Vec::new();
    for rule in policy.rules().iter().filter(|r| r.rights.contains(right)) {
        if let Err(miss) = rule.subject.check(subject) {
            unmatched.push((rule, miss.describe("subject", &rule.subject, subject)));
            continue;
        }
        if let Some((normalized, asked)) = &file {
            let prefix = rule.path.as_ref().expect("file rules have a path");
            let (path, _) = match normalized {
                Ok(n) => n,
                Err(why) => {
                    unmatched.push((rule, (*why).to_string()));
                    continue;
                }
            };
            let p = prefix.normalized.as_bytes();
            let covered = p == b"/"
                || (path.starts_with(p) && matches!(path.get(p.len()), None | Some(b'/')));
            if !covered {
                unmatched.push((rule, format!("the path is not under {}", prefix.normalized)));
                continue;
            }
            let overlap = FileKind::ORDER
                .iter()
                .any(|k| k.covered_by(*asked) && k.covered_by(rule.access));
            if !overlap {
                unmatched.push((
                    rule,
                    format!("the rule is about {} access, asked {asked}", rule.access),
                ));
                continue;
            }
            let why = format!("path under {}, access {}", prefix.normalized, rule.access);
            matched.push((spec_of(rule, prefix.depth), rule, why));
            continue;
        }
        let mut why = Vec::new();
        if right.takes_name() {
            match name_match(&rule.name, &names) {
                Ok(w) => why.push(w),
                Err(w) => {
                    unmatched.push((rule, w));
                    continue;
                }
            }
        }
        if let Some(want) = &rule.member {
            if member != Some(&**want) {
                unmatched.push((
                    rule,
                    format!("member {:?} is not {want}", member.unwrap_or("")),
                ));
                continue;
            }
            why.push(format!("member {want}"));
        }
        if let Some(sel) = &rule.peer {
            let (role, other) = target.expect("peer conditions only on rights with a target");
            if let Err(miss) = sel.check(&facts, other) {
                unmatched.push((rule, miss.describe(role, &sel.sel, other)));
                continue;
            }
            why.push(format!("{role} conditions hold"));
        }
        if why.is_empty() {
            why.push("subject matches".into());
        }
        matched.push((spec_of(rule, rule.name.rank()), rule, why.join(", ")));
    }
    sort_matches(&mut matched);

    let (decision, deciding, memfd_limit) = match &file {
        Some((Err(why), _)) => (
            Decision {
                allowed: false,
                right,
                rule: None,
                reason: Cow::Borrowed(why),
            },
            None,
            None,
        ),
        Some((Ok(_), asked)) => file_decision(&matched, *asked),
        None => {
            let decider = matched.first().map(|m| m.1);
            let limit = match decider {
                Some(r) if r.allow => r.max_bytes,
                Some(_) => Some(0),
                None => None,
            };
            (
                rule_decision(right, decider),
                decider.map(|r| r.info.index),
                limit,
            )
        }
    };

    let candidates = matched
        .into_iter()
        .map(|(spec, rule, why)| Candidate {
            rule: Arc::clone(&rule.info),
            matched: true,
            why,
            specificity: Some(spec),
            deciding: deciding == Some(rule.info.index),
        })
        .chain(unmatched.into_iter().map(|(rule, why)| Candidate {
            rule: Arc::clone(&rule.info),
            matched: false,
            why,
            specificity: None,
            deciding: false,
        }))
        .collect();
    Explanation {
        decision,
        memfd_limit: if right == Right::Memfd {
            memfd_limit
        } else {
            None
        },
        candidates,
    }
}

/// Per kind of access, most privileged first: the first matching rule
/// covering that kind decides it; the first denied kind decides the whole.
fn file_decision(
    matched: &[(Specificity, &Rule, String)],
    asked: FileAccess,
) -> (Decision, Option<usize>, Option<u64>) {
    let mut first: Option<(Decision, Option<usize>)> = None;
    for kind in FileKind::ORDER {
        if !kind.covered_by(asked) {
            continue;
        }
        let decider = matched
            .iter()
            .map(|m| m.1)
            .find(|r| kind.covered_by(r.access));
        let d = match decider {
            Some(r) => Decision {
                allowed: r.allow,
                right: Right::File,
                rule: Some(Arc::clone(&r.info)),
                reason: Cow::Owned(format!(
                    "{} access {} by the most specific matching rule",
                    kind.as_str(),
                    if r.allow { "allowed" } else { "denied" }
                )),
            },
            None => Decision {
                allowed: false,
                right: Right::File,
                rule: None,
                reason: Cow::Owned(format!(
                    "no rule grants {} access under this path",
                    kind.as_str()
                )),
            },
        };
        let index = decider.map(|r| r.info.index);
        if !d.allowed {
            return (d, index, None);
        }
        first.get_or_insert((d, index));
    }
    let (d, index) = first.unwrap_or({
        (
            Decision {
                allowed: false,
                right: Right::File,
                rule: None,
                reason: Cow::Borrowed("no access kind asked for"),
            },
            None,
        )
    });
    (d, index, None)
}
