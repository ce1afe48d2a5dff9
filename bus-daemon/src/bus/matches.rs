//! The index of every peer's match rules. A broadcast signal only looks at
//! rules that could match it: each rule is filed under its most selective
//! field (member, else path, else sender, else the catch-all list), so the
//! cost of a broadcast grows with the rules that share its member, path or
//! sender, not with unrelated rules. Plain data, no I/O.
//!
//! The rule itself, its validation and its test against a signal are
//! `pbus_proto::matches`, shared with the client.

use std::collections::HashMap;

pub use pbus_proto::matches::{Rule, SignalView};

use super::PeerId;

/// Identifies a stored rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MatchId(u64);

#[derive(Debug)]
struct Stored {
    peer: PeerId,
    rule: Rule,
}

/// The rules that share a member, split by exact path.
#[derive(Debug, Default)]
struct MemberBucket {
    /// Rules on this member and an exact path.
    by_path: HashMap<String, Vec<MatchId>>,
    /// Rules on this member and no exact path (any path, or a namespace).
    other: Vec<MatchId>,
}

/// Every rule filed under its most selective fields: member and exact
/// path, else member, else exact path, else sender, else the catch-all
/// list. All lookups borrow the signal's strings: no allocation.
#[derive(Debug, Default)]
struct Index {
    by_member: HashMap<String, MemberBucket>,
    by_path: HashMap<String, Vec<MatchId>>,
    by_sender: HashMap<String, Vec<MatchId>>,
    any: Vec<MatchId>,
}

fn exact_path(rule: &Rule) -> Option<&str> {
    match (&rule.path, rule.path_namespace) {
        (Some(path), false) => Some(path),
        _ => None,
    }
}

impl Index {
    fn bucket_mut(&mut self, rule: &Rule) -> &mut Vec<MatchId> {
        if let Some(member) = &rule.member {
            let bucket = self.by_member.entry(member.clone()).or_default();
            match exact_path(rule) {
                Some(path) => bucket.by_path.entry(path.to_owned()).or_default(),
                None => &mut bucket.other,
            }
        } else if let Some(path) = exact_path(rule) {
            self.by_path.entry(path.to_owned()).or_default()
        } else if let Some(sender) = &rule.sender {
            self.by_sender.entry(sender.clone()).or_default()
        } else {
            &mut self.any
        }
    }

    fn insert(&mut self, rule: &Rule, id: MatchId) {
        self.bucket_mut(rule).push(id);
    }

    fn remove(&mut self, rule: &Rule, id: MatchId) {
        let bucket = self.bucket_mut(rule);
        if let Some(position) = bucket.iter().position(|&other| other == id) {
            bucket.swap_remove(position);
        }
        // Drop emptied buckets so unused keys do not pile up.
        if let Some(member) = &rule.member {
            if let Some(member_bucket) = self.by_member.get_mut(member.as_str()) {
                if let Some(path) = exact_path(rule) {
                    if member_bucket.by_path.get(path).is_some_and(Vec::is_empty) {
                        member_bucket.by_path.remove(path);
                    }
                }
                if member_bucket.by_path.is_empty() && member_bucket.other.is_empty() {
                    self.by_member.remove(member.as_str());
                }
            }
        } else if let Some(path) = exact_path(rule) {
            if self.by_path.get(path).is_some_and(Vec::is_empty) {
                self.by_path.remove(path);
            }
        } else if let Some(sender) = &rule.sender {
            if self
                .by_sender
                .get(sender.as_str())
                .is_some_and(Vec::is_empty)
            {
                self.by_sender.remove(sender.as_str());
            }
        }
    }
}

/// Every match rule of every peer, indexed.
#[derive(Debug, Default)]
pub struct MatchRegistry {
    rules: HashMap<MatchId, Stored, super::IdHash>,
    index: Index,
    next_id: u64,
}

impl MatchRegistry {
    /// Stores a rule for `peer`.
    pub fn add(&mut self, peer: PeerId, rule: Rule) -> MatchId {
        self.next_id += 1;
        let id = MatchId(self.next_id);
        self.index.insert(&rule, id);
        self.rules.insert(id, Stored { peer, rule });
        id
    }

    /// Removes a rule.
    pub fn remove(&mut self, id: MatchId) {
        if let Some(stored) = self.rules.remove(&id) {
            self.index.remove(&stored.rule, id);
        }
    }

    /// The rule stored under `id`.
    pub fn rule(&self, id: MatchId) -> Option<&Rule> {
        self.rules.get(&id).map(|stored| &stored.rule)
    }

    /// Number of stored rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True when no rule is stored.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Calls `visit(peer, rule)` for every rule that could match `signal`:
    /// those filed under its member (with its path or no exact path), its
    /// path, its sender or one of `sender_names`, or no key. Each rule is
    /// visited at most once; a peer may appear repeatedly.
    pub fn for_each_candidate<'a>(
        &self,
        signal: &SignalView<'_>,
        sender_names: impl Iterator<Item = &'a str>,
        mut visit: impl FnMut(PeerId, &Rule),
    ) {
        let mut scan = |bucket: Option<&Vec<MatchId>>| {
            for id in bucket.into_iter().flatten() {
                let stored = &self.rules[id];
                visit(stored.peer, &stored.rule);
            }
        };
        if let Some(bucket) = self.index.by_member.get(signal.member) {
            scan(bucket.by_path.get(signal.path));
            scan(Some(&bucket.other));
        }
        if !signal.path.is_empty() {
            scan(self.index.by_path.get(signal.path));
        }
        scan(self.index.by_sender.get(signal.sender));
        for name in sender_names {
            scan(self.index.by_sender.get(name));
        }
        scan(Some(&self.index.any));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pbus_proto::v1::{ArgMatch, MatchRule};

    fn rule(sender: &str, path: &str, member: &str, args: &[(u32, &str)]) -> Rule {
        Rule::from_wire(MatchRule {
            sender: sender.into(),
            path: path.into(),
            member: member.into(),
            args: args
                .iter()
                .map(|(index, value)| ArgMatch {
                    index: *index,
                    value: (*value).into(),
                })
                .collect(),
            ..MatchRule::default()
        })
        .unwrap()
    }

    fn view<'a>(
        sender: &'a str,
        path: &'a str,
        member: &'a str,
        args: &'a [&'a str],
    ) -> SignalView<'a> {
        SignalView {
            sender,
            path,
            member,
            args,
        }
    }

    #[test]
    fn rules_on_the_same_member_but_another_path_are_not_visited() {
        let mut registry = MatchRegistry::default();
        for i in 0..1000 {
            registry.add(PeerId(1), rule("", &format!("/noise/{i}"), "Changed", &[]));
        }
        let wanted = registry.add(PeerId(2), rule("", "/bench", "Changed", &[]));
        let mut visited = Vec::new();
        let signal = view(":1.9", "/bench", "Changed", &[]);
        registry.for_each_candidate(&signal, std::iter::empty(), |peer, _| visited.push(peer));
        assert_eq!(visited, vec![PeerId(2)]);
        registry.remove(wanted);
        for i in 0..1000 {
            registry.remove(MatchId(i + 1));
        }
        assert!(registry.is_empty());
        assert!(
            registry.index.by_member.is_empty(),
            "emptied buckets are dropped"
        );
    }

    #[test]
    fn unrelated_rules_are_not_visited() {
        let mut registry = MatchRegistry::default();
        for i in 0..10_000 {
            registry.add(PeerId(1), rule("", "", &format!("Unrelated{i}"), &[]));
        }
        let wanted = registry.add(PeerId(2), rule("", "", "Wanted", &[]));
        let catch_all = registry.add(PeerId(3), rule("", "", "", &[]));
        let mut visited = Vec::new();
        let signal = view(":1.9", "/p", "Wanted", &[]);
        registry.for_each_candidate(&signal, std::iter::empty(), |peer, _| visited.push(peer));
        assert_eq!(visited, vec![PeerId(2), PeerId(3)]);
        registry.remove(wanted);
        registry.remove(catch_all);
        visited.clear();
        registry.for_each_candidate(&signal, std::iter::empty(), |peer, _| visited.push(peer));
        assert!(visited.is_empty());
        assert_eq!(registry.len(), 10_000);
    }
}
