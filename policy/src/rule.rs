//! The rule model: what one parsed rule says, and how its conditions are
//! tested against identities.
//!
//! A [`Rule`] is plain data produced by the parser. Its subject
//! [`Selector`] is tested once per peer at connect time (see the snapshot
//! module); its [`PeerSel`] (conditions on the other party, including the
//! relations `same-uid` and `same-container`) is tested per check against
//! the target identity. Every test returns a [`Miss`] saying which condition
//! failed, so `explain` and the hot path share one implementation. This
//! module knows nothing about files, indexes or decisions.

use std::fmt::Write as _;
use std::sync::Arc;

use pbus_identity::{ContainerRuntime, PeerIdentity};

use crate::glob::Glob;
use crate::{FileAccess, Right, RuleInfo, Specificity};

/// A set of [`Right`]s, as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RightSet(u16);

impl RightSet {
    pub fn insert(&mut self, right: Right) -> bool {
        let bit = 1 << right as u16;
        let fresh = self.0 & bit == 0;
        self.0 |= bit;
        fresh
    }

    pub fn contains(self, right: Right) -> bool {
        self.0 & (1 << right as u16) != 0
    }

    pub fn iter(self) -> impl Iterator<Item = Right> {
        Right::ALL.into_iter().filter(move |&r| self.contains(r))
    }
}

/// Conditions on one identity. All present conditions must hold; a selector
/// with none matches anyone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Selector {
    pub uid: Option<u32>,
    /// Primary or supplementary group.
    pub gid: Option<u32>,
    /// LSM label glob; never matches a peer without a label.
    pub label: Option<Glob>,
    /// `Some(true)`: on the host; `Some(false)`: in any container.
    pub host: Option<bool>,
    pub container: Option<ContainerSel>,
    /// Glob on the listening socket path the peer came in through.
    pub listener: Option<Glob>,
}

/// Conditions on the container a peer is in. Present at all: the peer is in
/// a container (not the host).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ContainerSel {
    pub runtime: Option<ContainerRuntime>,
    /// Glob on the container id; never matches an unknown (empty) id.
    pub id: Option<Glob>,
    /// Glob on the Kubernetes pod UID; never matches a container not in a pod.
    pub pod: Option<Glob>,
}

/// Conditions on the other party of a check, including relations to the
/// subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PeerSel {
    pub sel: Selector,
    pub same_uid: Option<bool>,
    pub same_container: Option<bool>,
}

/// Which condition of a selector failed, for `explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Miss {
    Uid,
    Gid,
    Label,
    Host,
    NotHost,
    Container,
    Runtime,
    Id,
    Pod,
    Listener,
    SameUid(bool),
    SameContainer(bool),
}

impl Miss {
    /// A sentence fragment: "<who> <what failed>".
    pub fn describe(self, who: &str, s: &Selector, id: &PeerIdentity) -> String {
        match self {
            Self::Uid => format!("{who} uid {} is not {}", id.uid, s.uid.unwrap_or(0)),
            Self::Gid => format!(
                "{who} is not in group {} (gid {}, groups {:?})",
                s.gid.unwrap_or(0),
                id.gid,
                id.groups
            ),
            Self::Label => match &id.label {
                None => format!("{who} has no LSM label"),
                Some(label) => format!(
                    "{who} label {label:?} does not match {:?}",
                    s.label.as_ref().map(Glob::as_str).unwrap_or_default()
                ),
            },
            Self::Host => format!("{who} is not on the host"),
            Self::NotHost | Self::Container => format!("{who} is not in a container"),
            Self::Runtime => format!(
                "{who} runtime {} is not {}",
                id.container.runtime.as_str(),
                s.container
                    .as_ref()
                    .and_then(|c| c.runtime)
                    .map_or("?", ContainerRuntime::as_str)
            ),
            Self::Id => format!(
                "{who} container id {:?} does not match {:?}",
                id.container.id,
                s.container
                    .as_ref()
                    .and_then(|c| c.id.as_ref())
                    .map(Glob::as_str)
                    .unwrap_or_default()
            ),
            Self::Pod => format!(
                "{who} pod {:?} does not match {:?}",
                id.container.pod_uid.as_deref().unwrap_or("(none)"),
                s.container
                    .as_ref()
                    .and_then(|c| c.pod.as_ref())
                    .map(Glob::as_str)
                    .unwrap_or_default()
            ),
            Self::Listener => format!(
                "{who} listener {:?} does not match {:?}",
                id.listener,
                s.listener.as_ref().map(Glob::as_str).unwrap_or_default()
            ),
            Self::SameUid(true) => format!("{who} has another uid ({})", id.uid),
            Self::SameUid(false) => format!("{who} has the same uid ({})", id.uid),
            Self::SameContainer(true) => format!("{who} is not in the same container"),
            Self::SameContainer(false) => format!("{who} is in the same container"),
        }
    }
}

impl Selector {
    /// Tests every condition against `id`; the first failing one is
    /// returned.
    #[inline]
    pub fn check(&self, id: &PeerIdentity) -> Result<(), Miss> {
        if let Some(uid) = self.uid {
            if id.uid != uid {
                return Err(Miss::Uid);
            }
        }
        if let Some(gid) = self.gid {
            if id.gid != gid && !id.groups.contains(&gid) {
                return Err(Miss::Gid);
            }
        }
        if let Some(label) = &self.label {
            if !id.label.as_deref().is_some_and(|l| label.matches(l)) {
                return Err(Miss::Label);
            }
        }
        if let Some(host) = self.host {
            match (host, id.container.is_container()) {
                (true, true) => return Err(Miss::Host),
                (false, false) => return Err(Miss::NotHost),
                _ => {}
            }
        }
        if let Some(c) = &self.container {
            if !id.container.is_container() {
                return Err(Miss::Container);
            }
            if c.runtime.is_some_and(|r| r != id.container.runtime) {
                return Err(Miss::Runtime);
            }
            if let Some(glob) = &c.id {
                if id.container.id.is_empty() || !glob.matches(&id.container.id) {
                    return Err(Miss::Id);
                }
            }
            if let Some(glob) = &c.pod {
                if !id
                    .container
                    .pod_uid
                    .as_deref()
                    .is_some_and(|p| glob.matches(p))
                {
                    return Err(Miss::Pod);
                }
            }
        }
        if let Some(listener) = &self.listener {
            if !listener.matches(&id.listener) {
                return Err(Miss::Listener);
            }
        }
        Ok(())
    }

    /// How many conditions this selector has (its part of a rule's
    /// specificity): one per key, the `container` table counting one for
    /// itself plus one per key inside it.
    pub fn weight(&self) -> u32 {
        let container = self.container.as_ref().map_or(0, |c| {
            1 + u32::from(c.runtime.is_some())
                + u32::from(c.id.is_some())
                + u32::from(c.pod.is_some())
        });
        u32::from(self.uid.is_some())
            + u32::from(self.gid.is_some())
            + u32::from(self.label.is_some())
            + u32::from(self.host.is_some())
            + u32::from(self.listener.is_some())
            + container
    }

    fn is_empty(&self) -> bool {
        self.weight() == 0
    }

    /// `uid=1000 container=docker:abc*` style text for rule summaries.
    fn render(&self, out: &mut String) {
        let mut parts: Vec<String> = Vec::new();
        if let Some(uid) = self.uid {
            parts.push(format!("uid={uid}"));
        }
        if let Some(gid) = self.gid {
            parts.push(format!("gid={gid}"));
        }
        if let Some(label) = &self.label {
            parts.push(format!("label={}", label.as_str()));
        }
        match self.host {
            Some(true) => parts.push("host".into()),
            Some(false) => parts.push("in-container".into()),
            None => {}
        }
        if let Some(c) = &self.container {
            let runtime = c.runtime.map_or("*", ContainerRuntime::as_str);
            match &c.id {
                Some(id) => parts.push(format!("container={runtime}:{}", id.as_str())),
                None => parts.push(format!("container={runtime}")),
            }
            if let Some(pod) = &c.pod {
                parts.push(format!("pod={}", pod.as_str()));
            }
        }
        if let Some(listener) = &self.listener {
            parts.push(format!("listener={}", listener.as_str()));
        }
        if parts.is_empty() {
            out.push_str("anyone");
        } else {
            out.push_str(&parts.join(" "));
        }
    }
}

/// What the relations of a [`PeerSel`] compare against: the subject's own
/// identity, reduced to what the comparisons need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Facts {
    pub uid: u32,
    pub runtime: ContainerRuntime,
    pub container_id: Box<str>,
    pub ns_pid: u64,
    pub ns_mnt: u64,
}

impl Facts {
    pub fn of(id: &PeerIdentity) -> Self {
        Self {
            uid: id.uid,
            runtime: id.container.runtime,
            container_id: id.container.id.as_str().into(),
            ns_pid: id.namespaces.pid,
            ns_mnt: id.namespaces.mnt,
        }
    }

    /// Same container: both on the host; or the same runtime and the same
    /// (known) container id; or, when an id is unknown, the same runtime and
    /// the same (known) pid and mount namespaces.
    #[inline]
    pub fn same_container(&self, other: &PeerIdentity) -> bool {
        let theirs = &other.container;
        if self.runtime != theirs.runtime {
            return false;
        }
        if self.runtime == ContainerRuntime::Host {
            return true;
        }
        if !self.container_id.is_empty() && !theirs.id.is_empty() {
            return *self.container_id == *theirs.id;
        }
        self.ns_pid != 0
            && self.ns_mnt != 0
            && self.ns_pid == other.namespaces.pid
            && self.ns_mnt == other.namespaces.mnt
    }
}

impl PeerSel {
    /// Tests the conditions on the other party `other`, and its relations to
    /// the subject described by `me`.
    #[inline]
    pub fn check(&self, me: &Facts, other: &PeerIdentity) -> Result<(), Miss> {
        if let Some(want) = self.same_uid {
            if (me.uid == other.uid) != want {
                return Err(Miss::SameUid(want));
            }
        }
        if let Some(want) = self.same_container {
            if me.same_container(other) != want {
                return Err(Miss::SameContainer(want));
            }
        }
        self.sel.check(other)
    }

    pub fn weight(&self) -> u32 {
        self.sel.weight()
            + u32::from(self.same_uid.is_some())
            + u32::from(self.same_container.is_some())
    }

    fn render(&self, out: &mut String) {
        let mut relations = Vec::new();
        match self.same_uid {
            Some(true) => relations.push("same-uid"),
            Some(false) => relations.push("other-uid"),
            None => {}
        }
        match self.same_container {
            Some(true) => relations.push("same-container"),
            Some(false) => relations.push("other-container"),
            None => {}
        }
        out.push_str(&relations.join(" "));
        if !self.sel.is_empty() {
            if !relations.is_empty() {
                out.push(' ');
            }
            self.sel.render(out);
        } else if relations.is_empty() {
            out.push_str("anyone");
        }
    }
}

/// Which names a rule is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NamePattern {
    /// `*`: every name, and messages addressed to no well-known name.
    Any,
    /// `org.example.*`: every name strictly below `org.example`.
    Prefix { prefix: Box<str>, depth: u32 },
    /// One well-known name.
    Exact(Box<str>),
}

/// Specificity rank of an exact name: above any prefix (a name has at most
/// 128 elements).
pub(crate) const EXACT_NAME_RANK: u32 = 1000;

impl NamePattern {
    /// The object part of the specificity: 0 for `*`, the element count for
    /// a prefix, [`EXACT_NAME_RANK`] for an exact name.
    pub fn rank(&self) -> u32 {
        match self {
            Self::Any => 0,
            Self::Prefix { depth, .. } => *depth,
            Self::Exact(_) => EXACT_NAME_RANK,
        }
    }

    /// True when `name` is covered. Unique names (`:1.42`) are covered only
    /// by `*`.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(exact) => **exact == *name,
            Self::Prefix { prefix, .. } => name
                .strip_prefix(&**prefix)
                .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1),
        }
    }

    pub fn render(&self) -> String {
        match self {
            Self::Any => "*".into(),
            Self::Prefix { prefix, .. } => format!("{prefix}.*"),
            Self::Exact(name) => name.to_string(),
        }
    }
}

/// A normalized absolute path prefix for file rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathPrefix {
    /// `/` or `/a/b` (no trailing slash, no `.`, `..` or empty components).
    pub normalized: Box<str>,
    /// Number of components (0 for `/`).
    pub depth: u32,
}

/// One rule, as parsed and validated.
#[derive(Debug)]
pub(crate) struct Rule {
    pub allow: bool,
    pub rights: RightSet,
    pub subject: Selector,
    pub peer: Option<PeerSel>,
    pub name: NamePattern,
    pub member: Option<Box<str>>,
    /// memfd cap in bytes for `allow memfd` rules; `None` = no cap.
    pub max_bytes: Option<u64>,
    pub path: Option<PathPrefix>,
    pub access: FileAccess,
    /// Subject plus peer weight.
    pub who: u32,
    pub info: Arc<RuleInfo>,
}

impl Rule {
    /// This rule's specificity when it matches through an object (a name
    /// pattern or path prefix) of rank `object`.
    pub fn specificity(&self, object: u32) -> Specificity {
        Specificity {
            object,
            member: self.member.is_some(),
            who: self.who,
            deny: !self.allow,
        }
    }

    /// The canonical one-line text of a rule, used in decisions and
    /// `explain`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(if self.allow { "allow " } else { "deny " });
        let rights: Vec<&str> = self.rights.iter().map(Right::as_str).collect();
        out.push_str(&rights.join(","));
        out.push_str(" subject{");
        self.subject.render(&mut out);
        out.push('}');
        if let Some(peer) = &self.peer {
            out.push_str(" peer{");
            peer.render(&mut out);
            out.push('}');
        }
        let takes_name = self.rights.iter().any(Right::takes_name);
        if takes_name && self.name != NamePattern::Any {
            let _ = write!(out, " name={}", self.name.render());
        }
        if let Some(member) = &self.member {
            let _ = write!(out, " member={member}");
        }
        if let Some(max) = self.max_bytes {
            let _ = write!(out, " max-bytes={max}");
        }
        if let Some(path) = &self.path {
            let _ = write!(out, " path={} access={}", path.normalized, self.access);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_strictly_below() {
        let p = NamePattern::Prefix {
            prefix: "org.example".into(),
            depth: 2,
        };
        assert!(p.matches("org.example.Foo"));
        assert!(p.matches("org.example.Foo.Bar"));
        assert!(!p.matches("org.example"));
        assert!(!p.matches("org.examples.Foo"));
        assert!(!p.matches("org.example."));
        assert!(NamePattern::Any.matches(":1.4"));
        assert!(!p.matches(":1.4"));
    }

    #[test]
    fn same_container() {
        let mut a = PeerIdentity::default();
        let mut b = PeerIdentity::default();
        assert!(Facts::of(&a).same_container(&b), "both host");
        b.container.runtime = ContainerRuntime::Docker;
        b.container.id = "abc".into();
        assert!(!Facts::of(&a).same_container(&b));
        a.container = b.container.clone();
        assert!(Facts::of(&a).same_container(&b));
        b.container.id = "abd".into();
        assert!(!Facts::of(&a).same_container(&b));
        // Unknown ids: namespaces decide, and zero never counts.
        a.container.runtime = ContainerRuntime::Unknown;
        a.container.id.clear();
        b.container.runtime = ContainerRuntime::Unknown;
        b.container.id.clear();
        assert!(!Facts::of(&a).same_container(&b));
        a.namespaces.pid = 7;
        a.namespaces.mnt = 8;
        b.namespaces = a.namespaces;
        assert!(Facts::of(&a).same_container(&b));
        b.namespaces.mnt = 9;
        assert!(!Facts::of(&a).same_container(&b));
    }
}
