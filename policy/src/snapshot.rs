//! Per-peer snapshots: the rules whose subject matches one peer, indexed so
//! that each check is a few hash lookups.
//!
//! At connect time [`PolicyLayers::snapshot`](crate::PolicyLayers::snapshot)
//! tests every rule's subject in every layer against the peer and keeps the
//! matching ones. The kept sets (a list of rule numbers per layer, with the
//! layer's name and its policy's generation: a [`SnapshotKey`]) key a cache
//! of [`CompiledLayers`], so peers with the same matching rules (every peer
//! of one uid on the host, every peer of one container) share one set of
//! indexes, and two layers or two policies never share an entry. A
//! [`PeerPolicy`] is that shared set plus the few facts about the peer that
//! relations (`same-uid`, `same-container`) compare against; each check
//! asks every layer and combines their answers (see [`crate::layers`]).
//!
//! Per right, a [`NameIndex`] holds entries in buckets: exact names in a
//! hash map, `prefix.*` patterns in a hash map keyed by the prefix, and `*`
//! entries in a list. Each bucket is sorted most specific first, so the
//! first entry whose member and peer conditions hold is the bucket's
//! answer. A check walks exact name, then the name's dotted prefixes
//! (`org.example.Foo` -> `org.example`, `org`; a bit mask skips depths no
//! rule uses), then `*`: the first bucket with an answer decides for that
//! name, the most specific answer across the message's names decides the
//! check. This module knows nothing about files or syntax.
//!
//! The index maps hash with FxHash (`rustc-hash`), not SipHash: their keys
//! come from policy files (trusted), and message names only look keys up,
//! which cannot degrade a table whose keys an attacker did not choose.

use std::cmp::Reverse;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use pbus_identity::PeerIdentity;
use rustc_hash::FxHashMap;

use crate::layers::{combine_decisions, combine_memfd, tighter_cap};
use crate::rule::{Facts, NamePattern, PeerSel, Rule};
use crate::{Decision, FileAccess, PolicyLayer, Right, RuleInfo, RuleRef, Specificity};

/// The order matching rules are tried in: most specific first, equal ones
/// in policy order. Shared by the indexes and `explain`.
pub(crate) type Precedence = (Reverse<Specificity>, usize);

/// The [`Precedence`] of a rule matching with specificity `spec`.
#[inline]
pub(crate) fn precedence(spec: Specificity, rule: &RuleInfo) -> Precedence {
    (Reverse(spec), rule.index)
}

/// One rule's contribution to one right, as stored in a bucket.
#[derive(Debug)]
struct Entry {
    spec: Specificity,
    allow: bool,
    member: Option<Box<str>>,
    peer: Option<PeerSel>,
    max_bytes: Option<u64>,
    info: RuleRef,
}

impl Entry {
    fn new(rule: &Rule, object: u32) -> Self {
        Self {
            spec: rule.specificity(object),
            allow: rule.allow,
            member: rule.member.clone(),
            peer: rule.peer.clone(),
            max_bytes: rule.max_bytes,
            info: Arc::clone(&rule.info),
        }
    }

    #[inline]
    fn precedence(&self) -> Precedence {
        precedence(self.spec, &self.info)
    }

    /// True when `self` beats `other`.
    #[inline]
    fn beats(&self, other: &Self) -> bool {
        self.precedence() < other.precedence()
    }

    /// What this entry decides, for [`decision`].
    #[inline]
    fn verdict(&self) -> (bool, &RuleRef) {
        (self.allow, &self.info)
    }

    #[inline]
    fn applies(&self, member: Option<&str>, me: &Facts, target: Option<&PeerIdentity>) -> bool {
        if let Some(want) = &self.member {
            if member != Some(&**want) {
                return false;
            }
        }
        match (&self.peer, target) {
            (None, _) => true,
            (Some(sel), Some(target)) => sel.check(me, target).is_ok(),
            (Some(_), None) => false,
        }
    }
}

#[inline]
fn first_applying<'a>(
    bucket: &'a [Entry],
    member: Option<&str>,
    me: &Facts,
    target: Option<&PeerIdentity>,
) -> Option<&'a Entry> {
    bucket.iter().find(|e| e.applies(member, me, target))
}

/// Sorts every bucket in [`Precedence`] order (`key` gives an element's)
/// and freezes it.
fn freeze<K, E>(map: FxHashMap<K, Vec<E>>, key: fn(&E) -> Precedence) -> FxHashMap<K, Box<[E]>>
where
    K: std::hash::Hash + Eq,
{
    map.into_iter()
        .map(|(k, mut v)| {
            v.sort_by_key(key);
            (k, v.into_boxed_slice())
        })
        .collect()
}

/// Entries for one name-bearing right.
#[derive(Debug, Default)]
struct NameIndex {
    exact: FxHashMap<Box<str>, Box<[Entry]>>,
    prefix: FxHashMap<Box<str>, Box<[Entry]>>,
    /// Bit `d` set: some prefix pattern has `d` elements (127 stands for
    /// 127 or more).
    prefix_depths: u128,
    any: Box<[Entry]>,
}

#[derive(Default)]
struct NameIndexBuilder {
    exact: FxHashMap<Box<str>, Vec<Entry>>,
    prefix: FxHashMap<Box<str>, Vec<Entry>>,
    prefix_depths: u128,
    any: Vec<Entry>,
}

fn depth_bit(depth: u32) -> u128 {
    1u128 << depth.min(127)
}

impl NameIndexBuilder {
    fn add(&mut self, rule: &Rule) {
        let entry = Entry::new(rule, rule.name.rank());
        match &rule.name {
            NamePattern::Any => self.any.push(entry),
            NamePattern::Exact(name) => self.exact.entry(name.clone()).or_default().push(entry),
            NamePattern::Prefix { prefix, depth } => {
                self.prefix_depths |= depth_bit(*depth);
                self.prefix.entry(prefix.clone()).or_default().push(entry);
            }
        }
    }

    fn build(mut self) -> NameIndex {
        self.any.sort_by_key(Entry::precedence);
        NameIndex {
            exact: freeze(self.exact, Entry::precedence),
            prefix: freeze(self.prefix, Entry::precedence),
            prefix_depths: self.prefix_depths,
            any: self.any.into_boxed_slice(),
        }
    }
}

impl NameIndex {
    /// The deciding entry for a message addressed to / about `names`.
    #[inline]
    fn decide(
        &self,
        names: &[&str],
        member: Option<&str>,
        me: &Facts,
        target: Option<&PeerIdentity>,
    ) -> Option<&Entry> {
        let mut best: Option<&Entry> = None;
        if !self.exact.is_empty() || self.prefix_depths != 0 {
            for name in names {
                if let Some(found) = self.decide_name(name, member, me, target) {
                    if best.is_none_or(|b| found.beats(b)) {
                        best = Some(found);
                    }
                }
            }
        }
        best.or_else(|| first_applying(&self.any, member, me, target))
    }

    /// The most specific entry naming `name` exactly or by prefix.
    #[inline]
    fn decide_name(
        &self,
        name: &str,
        member: Option<&str>,
        me: &Facts,
        target: Option<&PeerIdentity>,
    ) -> Option<&Entry> {
        if name.starts_with(':') {
            // Unique names are covered by `*` only.
            return None;
        }
        if !self.exact.is_empty() {
            if let Some(bucket) = self.exact.get(name) {
                if let Some(e) = first_applying(bucket, member, me, target) {
                    return Some(e);
                }
            }
        }
        if self.prefix_depths == 0 {
            return None;
        }
        // The prefix before the k-th dot from the left has k elements.
        let mut depth = name.bytes().filter(|&b| b == b'.').count() as u32;
        for (at, _) in name.rmatch_indices('.') {
            if self.prefix_depths & depth_bit(depth) != 0 {
                if let Some(bucket) = self.prefix.get(&name[..at]) {
                    if let Some(e) = first_applying(bucket, member, me, target) {
                        return Some(e);
                    }
                }
            }
            depth -= 1;
        }
        None
    }
}

/// One file rule, in the bucket of its path prefix.
#[derive(Debug)]
struct FileEntry {
    spec: Specificity,
    allow: bool,
    access: FileAccess,
    info: RuleRef,
}

impl FileEntry {
    fn precedence(&self) -> Precedence {
        precedence(self.spec, &self.info)
    }
}

/// File rules keyed by normalized path prefix.
#[derive(Debug, Default)]
struct FileIndex {
    by_prefix: FxHashMap<Box<[u8]>, Box<[FileEntry]>>,
}

/// Normalizes an absolute path for file checks: `/a/b` with no `.`, empty
/// or trailing components. Returns the bytes and the end offset of every
/// ancestor prefix (`/` first is offset 0, meaning the root).
pub(crate) fn normalize_path(path: &Path) -> Result<(Vec<u8>, Vec<usize>), &'static str> {
    let mut components = path.components();
    if components.next() != Some(Component::RootDir) {
        return Err("path is not absolute");
    }
    let mut out = Vec::with_capacity(path.as_os_str().len());
    let mut ends = vec![0];
    for component in components {
        match component {
            Component::Normal(c) => {
                out.push(b'/');
                out.extend_from_slice(c.as_bytes());
                ends.push(out.len());
            }
            Component::CurDir => {}
            Component::ParentDir => return Err("path has a `..` component"),
            Component::RootDir | Component::Prefix(_) => return Err("path is not normalizable"),
        }
    }
    Ok((out, ends))
}

impl FileIndex {
    fn decide(&self, normalized: &[u8], ends: &[usize], kind: FileKind) -> Option<&FileEntry> {
        for &end in ends.iter().rev() {
            let key: &[u8] = if end == 0 { b"/" } else { &normalized[..end] };
            if let Some(bucket) = self.by_prefix.get(key) {
                if let Some(e) = bucket.iter().find(|e| kind.covered_by(e.access)) {
                    return Some(e);
                }
            }
        }
        None
    }
}

/// One kind of file access, checked separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Create,
    Write,
    Read,
}

impl FileKind {
    /// Most privileged first: the order kinds are checked and reported in.
    pub const ORDER: [Self; 3] = [Self::Create, Self::Write, Self::Read];

    pub fn covered_by(self, access: FileAccess) -> bool {
        match self {
            Self::Create => access.create,
            Self::Write => access.write,
            Self::Read => access.read,
        }
    }

    /// The reason text of a decision about this kind of access: allowed or
    /// denied by the most specific rule covering it (`Some(allowed)`), or
    /// no rule covering it (`None`).
    pub fn reason(self, verdict: Option<bool>) -> &'static str {
        match (self, verdict) {
            (Self::Create, Some(true)) => {
                "create access allowed by the most specific matching rule"
            }
            (Self::Create, Some(false)) => {
                "create access denied by the most specific matching rule"
            }
            (Self::Create, None) => "no rule grants create access under this path",
            (Self::Write, Some(true)) => "write access allowed by the most specific matching rule",
            (Self::Write, Some(false)) => "write access denied by the most specific matching rule",
            (Self::Write, None) => "no rule grants write access under this path",
            (Self::Read, Some(true)) => "read access allowed by the most specific matching rule",
            (Self::Read, Some(false)) => "read access denied by the most specific matching rule",
            (Self::Read, None) => "no rule grants read access under this path",
        }
    }
}

/// The indexes built from one set of subject-matching rules; shared by all
/// peers with that set.
#[derive(Debug, Default)]
pub(crate) struct Compiled {
    see: NameIndex,
    own: NameIndex,
    talk: NameIndex,
    receive: NameIndex,
    pass_fds: NameIndex,
    memfd: NameIndex,
    monitor: Box<[Entry]>,
    file: FileIndex,
}

impl Compiled {
    /// Indexes `rules[i]` for every `i` in `ids`.
    pub fn build(rules: &[Rule], ids: &[u32]) -> Self {
        let mut see = NameIndexBuilder::default();
        let mut own = NameIndexBuilder::default();
        let mut talk = NameIndexBuilder::default();
        let mut receive = NameIndexBuilder::default();
        let mut pass_fds = NameIndexBuilder::default();
        let mut memfd = NameIndexBuilder::default();
        let mut monitor = Vec::new();
        let mut file: FxHashMap<Box<[u8]>, Vec<FileEntry>> = FxHashMap::default();
        for &id in ids {
            let rule = &rules[id as usize];
            for right in rule.rights.iter() {
                match right {
                    Right::See => see.add(rule),
                    Right::Own => own.add(rule),
                    Right::Talk => talk.add(rule),
                    Right::Receive => receive.add(rule),
                    Right::PassFds => pass_fds.add(rule),
                    Right::Memfd => memfd.add(rule),
                    Right::Monitor => monitor.push(Entry::new(rule, 0)),
                    Right::File => {
                        let path = rule.path.as_ref().expect("parser requires a path");
                        file.entry(path.normalized.as_bytes().into())
                            .or_default()
                            .push(FileEntry {
                                spec: rule.specificity(path.depth),
                                allow: rule.allow,
                                access: rule.access,
                                info: Arc::clone(&rule.info),
                            });
                    }
                }
            }
        }
        monitor.sort_by_key(Entry::precedence);
        Self {
            see: see.build(),
            own: own.build(),
            talk: talk.build(),
            receive: receive.build(),
            pass_fds: pass_fds.build(),
            memfd: memfd.build(),
            monitor: monitor.into_boxed_slice(),
            file: FileIndex {
                by_prefix: freeze(file, FileEntry::precedence),
            },
        }
    }
}

/// Reason text for a check no rule answered.
fn no_rule_reason(right: Right) -> &'static str {
    match right {
        Right::See => "no rule lets this peer see the name",
        Right::Own => "no rule lets this peer own the name",
        Right::Talk => "no rule lets this peer talk to the receiver",
        Right::Receive => "no rule lets this peer receive from the sender",
        Right::PassFds => "no rule lets this peer pass fds to the receiver",
        Right::Monitor => "no rule lets this peer monitor the bus",
        Right::Memfd => "no memfd rule applies: no policy cap",
        Right::File => "no rule grants this access under the path",
    }
}

/// The decision on `right` by the most specific matching rule, given as its
/// verdict (allow or deny) and info; with no matching rule, the default:
/// denied, except memfd (no rule: no cap, so allowed). Shared by the
/// snapshot checks and `explain`.
#[inline]
pub(crate) fn decision(right: Right, decider: Option<(bool, &RuleRef)>) -> Decision {
    match decider {
        Some((allow, rule)) => Decision {
            allowed: allow,
            right,
            rule: Some(Arc::clone(rule)),
            reason: if allow {
                "allowed by the most specific matching rule"
            } else {
                "denied by the most specific matching rule"
            },
            layer: None,
        },
        None => Decision {
            allowed: allowed_without_rule(right),
            right,
            rule: None,
            reason: no_rule_reason(right),
            layer: None,
        },
    }
}

/// The default when no rule decides `right`: denied, except memfd (no
/// rule: no cap, so allowed).
#[inline]
fn allowed_without_rule(right: Right) -> bool {
    right == Right::Memfd
}

/// The verdict alone of [`decision`]: for the per-message checks, which
/// need no more and should not pay for cloning the deciding rule's `Arc`.
#[inline]
fn verdict_only(right: Right, entry: Option<&Entry>) -> bool {
    entry.map_or_else(|| allowed_without_rule(right), |entry| entry.allow)
}

/// The memfd cap the most specific matching memfd rule means, given as its
/// verdict and `max-bytes`: its `max-bytes` for allow (none: no cap), 0
/// for deny; no rule: no cap.
pub(crate) fn memfd_cap(decider: Option<(bool, Option<u64>)>) -> Option<u64> {
    match decider {
        Some((true, max_bytes)) => max_bytes,
        Some((false, _)) => Some(0),
        None => None,
    }
}

/// The decision on a file request: each kind of access asked for, most
/// privileged first, is decided by the most specific rule covering that
/// kind (`decider` gives its verdict and info, or `None`); the first kind
/// denied decides the request, else the first kind asked for. Shared by the
/// snapshot and `explain`.
pub(crate) fn file_decision<'a>(
    asked: FileAccess,
    mut decider: impl FnMut(FileKind) -> Option<(bool, &'a RuleRef)>,
) -> Decision {
    let mut first: Option<Decision> = None;
    for kind in FileKind::ORDER {
        if !kind.covered_by(asked) {
            continue;
        }
        let d = match decider(kind) {
            Some((allow, rule)) => Decision {
                allowed: allow,
                right: Right::File,
                rule: Some(Arc::clone(rule)),
                reason: kind.reason(Some(allow)),
                layer: None,
            },
            None => file_refused(kind.reason(None)),
        };
        if !d.allowed {
            return d;
        }
        first.get_or_insert(d);
    }
    first.unwrap_or_else(|| file_refused("no access kind asked for"))
}

/// A file request denied with no rule deciding, for `reason`.
pub(crate) fn file_refused(reason: &'static str) -> Decision {
    Decision {
        allowed: false,
        right: Right::File,
        rule: None,
        reason,
        layer: None,
    }
}

/// One layer's indexes in a snapshot.
#[derive(Debug)]
struct CompiledLayer {
    /// The layer's name, for decisions when several layers take part.
    name: Arc<str>,
    index: Compiled,
}

/// The indexes of every layer of one snapshot, outermost first; shared by
/// all peers whose subjects matched the same rules in every layer.
#[derive(Debug)]
pub(crate) struct CompiledLayers {
    layers: Box<[CompiledLayer]>,
    /// How many rules went in, over all layers.
    rules: usize,
}

/// What one layer contributes to a [`SnapshotKey`]: the layer, by name and
/// its policy's generation, and the rules of that policy a subject matched.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct LayerKey {
    /// The layer's name.
    pub name: Arc<str>,
    /// [`Policy::generation`](crate::Policy::generation) of the layer's
    /// policy.
    pub generation: u64,
    /// Numbers of the policy's rules whose subject matched, in order.
    pub rules: Box<[u32]>,
}

/// Keys a snapshot cache: one [`LayerKey`] per layer, outermost first. Two
/// keys are equal only for the same layers (names and policies, in order)
/// with the same matching rules in each.
pub(crate) type SnapshotKey = Box<[LayerKey]>;

/// The key of `peer`'s snapshot of `layers`.
pub(crate) fn snapshot_key(layers: &[PolicyLayer], peer: &PeerIdentity) -> SnapshotKey {
    layers
        .iter()
        .map(|layer| LayerKey {
            name: Arc::clone(&layer.name),
            generation: layer.policy.generation(),
            rules: layer.policy.rules_matching(peer),
        })
        .collect()
}

/// Compiled snapshot indexes by [`SnapshotKey`]; weak, so that indexes
/// live only while a peer uses them.
#[derive(Default)]
pub(crate) struct SnapshotCache {
    entries: Mutex<FxHashMap<SnapshotKey, Weak<CompiledLayers>>>,
}

impl SnapshotCache {
    /// The indexes for `key` (its layers are `layers`, in the same order),
    /// compiled now unless a live entry has them.
    fn get_or_compile(&self, key: SnapshotKey, layers: &[PolicyLayer]) -> Arc<CompiledLayers> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(compiled) = entries.get(&key).and_then(Weak::upgrade) {
            return compiled;
        }
        let compiled: Box<[CompiledLayer]> = layers
            .iter()
            .zip(key.iter())
            .map(|(layer, layer_key)| CompiledLayer {
                name: Arc::clone(&layer.name),
                index: Compiled::build(layer.policy.rules(), &layer_key.rules),
            })
            .collect();
        let compiled = Arc::new(CompiledLayers {
            rules: key.iter().map(|layer_key| layer_key.rules.len()).sum(),
            layers: compiled,
        });
        // Drop dead entries now and then; amortized O(1).
        if entries.len() >= 64 && entries.len().is_power_of_two() {
            entries.retain(|_, weak| weak.strong_count() > 0);
        }
        entries.insert(key, Arc::downgrade(&compiled));
        compiled
    }

    /// Number of entries, live or dead (for tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Compiles `peer`'s snapshot of `layers` (at least one), through `cache`.
pub(crate) fn snapshot(
    cache: &SnapshotCache,
    layers: &[PolicyLayer],
    peer: &PeerIdentity,
) -> PeerPolicy {
    assert!(!layers.is_empty(), "a snapshot needs at least one layer");
    let compiled = cache.get_or_compile(snapshot_key(layers, peer), layers);
    PeerPolicy {
        inner: Arc::new(PeerInner {
            compiled,
            facts: Facts::of(peer),
        }),
    }
}

struct PeerInner {
    compiled: Arc<CompiledLayers>,
    facts: Facts,
}

/// A policy compiled for one subject peer at connect time.
///
/// Cheap to clone (one `Arc`). The checks take the other party's identity
/// and the names involved, and return a [`Decision`] naming the deciding
/// rule (and, with several layers, the deciding layer). Every layer of the
/// snapshot must allow an operation for it to be allowed. Replies to
/// pending calls and the bus's own name (`org.pbus.Bus`) are not subject
/// to policy: the daemon does not ask.
#[derive(Clone)]
pub struct PeerPolicy {
    inner: Arc<PeerInner>,
}

impl fmt::Debug for PeerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layers: Vec<&str> = self.layers().iter().map(|l| &*l.name).collect();
        f.debug_struct("PeerPolicy")
            .field("uid", &self.inner.facts.uid)
            .field("layers", &layers)
            .field("rules", &self.inner.compiled.rules)
            .finish()
    }
}

impl PeerPolicy {
    /// Number of rules whose subject matched this peer, over all layers.
    pub fn rule_count(&self) -> usize {
        self.inner.compiled.rules
    }

    /// True when `self` and `other` share one set of compiled indexes
    /// (same layers, and their subjects matched the same rules in each).
    pub fn shares_index_with(&self, other: &PeerPolicy) -> bool {
        Arc::ptr_eq(&self.inner.compiled, &other.inner.compiled)
    }

    #[inline]
    fn layers(&self) -> &[CompiledLayer] {
        &self.inner.compiled.layers
    }

    /// Every layer's decision on `right`, `entry` finding the deciding
    /// entry in a layer's indexes, combined (see [`combine_decisions`]).
    fn decide<'a>(
        &'a self,
        right: Right,
        entry: impl Fn(&'a Compiled) -> Option<&'a Entry>,
    ) -> Decision {
        let layers = self.layers();
        combine_decisions(
            layers.iter().map(|layer| {
                (
                    &layer.name,
                    decision(right, entry(&layer.index).map(Entry::verdict)),
                )
            }),
            layers.len() > 1,
        )
    }

    /// True when every layer allows `right`, `entry` finding the deciding
    /// entry in a layer's indexes: the verdict of [`decide`](Self::decide)
    /// without building decisions.
    #[inline]
    fn all_allow<'a>(
        &'a self,
        right: Right,
        entry: impl Fn(&'a Compiled) -> Option<&'a Entry>,
    ) -> bool {
        self.layers()
            .iter()
            .all(|layer| verdict_only(right, entry(&layer.index)))
    }

    /// May this peer own `name`?
    pub fn own(&self, name: &str) -> Decision {
        let facts = &self.inner.facts;
        self.decide(Right::Own, |index| {
            index.own.decide(&[name], None, facts, None)
        })
    }

    /// May this peer learn that `name` (a well-known name, or the owner's
    /// unique name, which only `*` rules cover) owned by `owner` exists?
    pub fn see(&self, owner: &PeerIdentity, name: &str) -> Decision {
        let facts = &self.inner.facts;
        self.decide(Right::See, |index| {
            index.see.decide(&[name], None, facts, Some(owner))
        })
    }

    /// May this peer send `member` to `receiver`? `names` are the
    /// destination if it is a well-known name plus every well-known name the
    /// receiver owns (may be empty); the most specific rule across all of
    /// them decides, and with no names only `name = "*"` rules apply.
    #[inline]
    pub fn talk(&self, receiver: &PeerIdentity, names: &[&str], member: &str) -> Decision {
        let facts = &self.inner.facts;
        self.decide(Right::Talk, |index| {
            index
                .talk
                .decide(names, Some(member), facts, Some(receiver))
        })
    }

    /// May this peer (as receiver) accept `member` from `sender`, which owns
    /// `names`?
    pub fn receive(&self, sender: &PeerIdentity, names: &[&str], member: &str) -> Decision {
        let facts = &self.inner.facts;
        self.decide(Right::Receive, |index| {
            index
                .receive
                .decide(names, Some(member), facts, Some(sender))
        })
    }

    /// May this peer attach fds to a message for `receiver`, addressed as /
    /// owning `names`?
    pub fn pass_fds(&self, receiver: &PeerIdentity, names: &[&str]) -> Decision {
        let facts = &self.inner.facts;
        self.decide(Right::PassFds, |index| {
            index.pass_fds.decide(names, None, facts, Some(receiver))
        })
    }

    /// [`see`](Self::see)`(..).allowed`, without building the [`Decision`]:
    /// for the daemon's checks, where only the verdict matters.
    #[inline]
    pub fn may_see(&self, owner: &PeerIdentity, name: &str) -> bool {
        let facts = &self.inner.facts;
        self.all_allow(Right::See, |index| {
            index.see.decide(&[name], None, facts, Some(owner))
        })
    }

    /// [`talk`](Self::talk)`(..).allowed`, without building the
    /// [`Decision`]: the per-message check.
    #[inline]
    pub fn may_talk(&self, receiver: &PeerIdentity, names: &[&str], member: &str) -> bool {
        let facts = &self.inner.facts;
        self.all_allow(Right::Talk, |index| {
            index
                .talk
                .decide(names, Some(member), facts, Some(receiver))
        })
    }

    /// [`receive`](Self::receive)`(..).allowed`, without building the
    /// [`Decision`]: the per-message check.
    #[inline]
    pub fn may_receive(&self, sender: &PeerIdentity, names: &[&str], member: &str) -> bool {
        let facts = &self.inner.facts;
        self.all_allow(Right::Receive, |index| {
            index
                .receive
                .decide(names, Some(member), facts, Some(sender))
        })
    }

    /// [`pass_fds`](Self::pass_fds)`(..).allowed`, without building the
    /// [`Decision`]: the per-message check.
    #[inline]
    pub fn may_pass_fds(&self, receiver: &PeerIdentity, names: &[&str]) -> bool {
        let facts = &self.inner.facts;
        self.all_allow(Right::PassFds, |index| {
            index.pass_fds.decide(names, None, facts, Some(receiver))
        })
    }

    /// The largest sealed memfd payload (bytes) this peer may attach to a
    /// message for `receiver`; `None` means no policy cap (no memfd rule
    /// applies, or the deciding rule has no `max-bytes`). A deciding deny
    /// rule means `Some(0)`. With several layers, the smallest cap of any.
    pub fn max_memfd_bytes(&self, receiver: &PeerIdentity, names: &[&str]) -> Option<u64> {
        let facts = &self.inner.facts;
        self.layers()
            .iter()
            .map(|layer| {
                let entry = layer.index.memfd.decide(names, None, facts, Some(receiver));
                memfd_cap(entry.map(|e| (e.allow, e.max_bytes)))
            })
            .fold(None, |tightest, cap| {
                if tighter_cap(cap, tightest) {
                    cap
                } else {
                    tightest
                }
            })
    }

    /// The memfd check as a [`Decision`] (allowed unless a deny rule
    /// decides) together with the cap, for logs and `explain`.
    pub fn memfd(&self, receiver: &PeerIdentity, names: &[&str]) -> (Decision, Option<u64>) {
        let facts = &self.inner.facts;
        let layers = self.layers();
        combine_memfd(
            layers.iter().map(|layer| {
                let entry = layer.index.memfd.decide(names, None, facts, Some(receiver));
                (
                    &layer.name,
                    decision(Right::Memfd, entry.map(Entry::verdict)),
                    memfd_cap(entry.map(|e| (e.allow, e.max_bytes))),
                )
            }),
            layers.len() > 1,
        )
    }

    /// May this peer watch traffic not addressed to it?
    pub fn monitor(&self) -> Decision {
        self.decide(Right::Monitor, |index| index.monitor.first())
    }

    /// May the broker open `path` with `access` for this peer? The path
    /// must be absolute; `..` components are refused outright, `.` and
    /// repeated slashes are ignored, and prefixes match whole components
    /// (`/srv/data` covers `/srv/data/x`, not `/srv/database`). Each kind of
    /// access asked for must be allowed by the most specific rule covering
    /// that kind, in every layer.
    pub fn file_access(&self, path: &Path, access: FileAccess) -> Decision {
        let normalized = normalize_path(path);
        let layers = self.layers();
        combine_decisions(
            layers.iter().map(|layer| {
                let decision = match &normalized {
                    Err(why) => file_refused(why),
                    Ok((normalized, ends)) => file_decision(access, |kind| {
                        layer
                            .index
                            .file
                            .decide(normalized, ends, kind)
                            .map(|e| (e.allow, &e.info))
                    }),
                };
                (&layer.name, decision)
            }),
            layers.len() > 1,
        )
    }
}
