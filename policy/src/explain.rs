//! `explain`: why a check comes out the way it does.
//!
//! [`Policy::explain`](crate::Policy::explain) evaluates one operation the
//! slow, transparent way: it walks every rule that mentions the right,
//! records for each whether it matched and why (or which condition failed),
//! sorts the matching ones by specificity, and reports the first as the
//! decider. It shares the condition tests, the ordering and the building of
//! the decision from the deciding rule with the snapshot, but not the
//! indexes, so the unit tests can check that both find the same rule.
//! [`PolicyLayers::explain`](crate::PolicyLayers::explain) explains every
//! layer so and combines them into a [`LayeredExplanation`]. This module
//! knows nothing about files or the daemon.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use pbus_identity::PeerIdentity;

use crate::rule::{Facts, NamePattern, Rule};
use crate::snapshot::{
    decision, file_decision, file_refused, memfd_cap, normalize_path, precedence, FileKind,
};
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
        write_memfd_limit(f, &self.decision, self.memfd_limit)?;
        write_candidates(f, self.decision.right, &self.candidates, "")
    }
}

/// For memfd decisions, the line saying the cap.
fn write_memfd_limit(
    f: &mut fmt::Formatter<'_>,
    decision: &Decision,
    limit: Option<u64>,
) -> fmt::Result {
    if decision.right != Right::Memfd {
        return Ok(());
    }
    match limit {
        Some(n) => writeln!(f, "memfd payloads up to {n} bytes"),
        None => writeln!(f, "memfd payloads: no policy cap"),
    }
}

/// The rules considered, each line after `indent`.
fn write_candidates(
    f: &mut fmt::Formatter<'_>,
    right: Right,
    candidates: &[Candidate],
    indent: &str,
) -> fmt::Result {
    if candidates.is_empty() {
        return writeln!(f, "{indent}no rule mentions {}", right.as_str());
    }
    writeln!(f, "{indent}rules considered, most specific match first:")?;
    for c in candidates {
        let mark = if c.deciding {
            "=>"
        } else if c.matched {
            " +"
        } else {
            " -"
        };
        writeln!(
            f,
            "{indent}{mark} {}:{}: {}",
            c.rule.origin, c.rule.line, c.rule.text
        )?;
        match c.specificity {
            Some(s) => writeln!(f, "{indent}     matched: {} [{s}]", c.why)?,
            None => writeln!(f, "{indent}     no match: {}", c.why)?,
        }
    }
    Ok(())
}

/// One layer's part of a [`LayeredExplanation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerExplanation {
    /// The layer's name.
    pub layer: Arc<str>,
    /// The layer's policy's explanation, as if it stood alone.
    pub explanation: Explanation,
}

/// The answer of [`PolicyLayers::explain`](crate::PolicyLayers::explain):
/// the combined decision and every layer's own explanation. With one layer
/// it is that layer's explanation and reads exactly like it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayeredExplanation {
    /// The decision, as the per-peer snapshot would return it: with
    /// several layers, it names the layer that decided.
    pub decision: Decision,
    /// For memfd operations: the tightest cap of all layers (`None`: no
    /// policy cap).
    pub memfd_limit: Option<u64>,
    /// Every layer's explanation, outermost (global) first.
    pub layers: Vec<LayerExplanation>,
}

impl fmt::Display for LayeredExplanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let [only] = self.layers.as_slice() {
            return only.explanation.fmt(f);
        }
        writeln!(f, "{}", self.decision)?;
        write_memfd_limit(f, &self.decision, self.memfd_limit)?;
        writeln!(f, "every layer must allow; outermost first:")?;
        for layer in &self.layers {
            let explanation = &layer.explanation;
            writeln!(f, "layer `{}`: {}", layer.layer, explanation.decision)?;
            write_candidates(f, explanation.decision.right, &explanation.candidates, "  ")?;
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
    if names.is_empty() {
        Err(format!(
            "no well-known name involved; the rule is about {}",
            pattern.render()
        ))
    } else {
        Err(format!("{} covers none of {names:?}", pattern.render()))
    }
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
            matched.push((rule.specificity(prefix.depth), rule, why));
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
        matched.push((rule.specificity(rule.name.rank()), rule, why.join(", ")));
    }
    matched.sort_by_key(|(spec, rule, _)| precedence(*spec, &rule.info));

    // The decider is the first match (for files: per kind of access).
    let decision = match &file {
        Some((Err(why), _)) => file_refused(why),
        Some((Ok(_), asked)) => file_decision(*asked, |kind| {
            matched
                .iter()
                .map(|m| m.1)
                .find(|r| kind.covered_by(r.access))
                .map(|r| (r.allow, &r.info))
        }),
        None => decision(right, matched.first().map(|m| (m.1.allow, &m.1.info))),
    };
    let memfd_limit = if right == Right::Memfd {
        memfd_cap(matched.first().map(|m| (m.1.allow, m.1.max_bytes)))
    } else {
        None
    };
    let deciding = decision.rule.as_ref().map(|r| r.index);

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
        memfd_limit,
        candidates,
    }
}
