//! pbus policy: which peer may own, see and talk to which names, pass fds
//! and memfds, monitor the bus, and have the broker open which files.
//!
//! The daemon loads a [`Policy`] once (and again on reload), stacks it as
//! the global layer of [`PolicyLayers`], builds a [`PeerPolicy`] snapshot
//! for every peer at connect time, and asks the snapshot on every
//! operation. This crate does no I/O beyond loading
//! policy files and knows nothing about sockets or frames. `POLICY.md`
//! beside this crate is the operator's reference; this is the summary.
//!
//! # Format
//!
//! TOML files of `[[rule]]` tables. A directory is read in lexical order of
//! file names (`*.toml` only, dot-files skipped); later files add rules.
//! The shipped default ([`DEFAULT_POLICY`]) comes first unless some file
//! says `builtin = false` at its top level.
//!
//! ```toml
//! [[rule]]
//! allow = ["talk", "pass-fds"]               # or deny = [...]
//! subject = { container = { runtime = "docker", id = "4f2a*" } }
//! peer = { host = true, uid = 0 }            # conditions on the other party
//! name = "org.example.*"                     # "*", a prefix, or an exact name
//! member = "GetStatus"                       # talk and receive only
//! ```
//!
//! Rights: `see`, `own`, `talk`, `receive`, `pass-fds`, `memfd` (with
//! `max-bytes`), `monitor`, `file` (with `path` and `access`). Subject and
//! peer conditions: `anyone`, `uid`, `gid` (primary or supplementary),
//! `label` (glob), `host`, `container = { runtime, id, pod }` (globs for id
//! and pod), `listener` (glob); `peer` also takes the relations `same-uid`
//! and `same-container`. Globs know `*` and `?` only.
//!
//! # Decisions
//!
//! Of the rules whose conditions all hold, the most specific decides; with
//! none, the answer is no (memfd: no cap). Specificity ([`Specificity`]) is
//! compared field by field, left to right:
//!
//! 1. **object**: an exact name beats any prefix, a longer prefix
//!    (`org.example.*`, 2 elements) beats a shorter one (`org.*`), and any
//!    prefix beats `*`. For file rules, the path prefix with more
//!    components wins.
//! 2. **member**: a rule naming the member beats one that does not.
//! 3. **who**: more conditions beat fewer. Every subject and peer key
//!    counts one (`uid`, `gid`, `label`, `host`, `listener`, `same-uid`,
//!    `same-container`), `container` counts one plus one per key inside
//!    it; `anyone` counts zero.
//! 4. **deny beats allow**.
//!
//! Rules equal in all four agree, and the first in load order is reported.
//! With several names (a receiver owning several), the most specific match
//! across all of them decides; with none, only `name = "*"` rules apply.
//! A file request decides each kind of access separately; any denied kind
//! denies the request.
//!
//! # Layers
//!
//! A peer's rights can come from more than one policy: [`PolicyLayers`] is
//! an ordered stack of named policies, the global one first (`global`,
//! [`GLOBAL_LAYER`]), then narrower ones (for example the layer of the
//! endpoint a peer connected through). Each layer decides on its own, as
//! above, and an operation is allowed only if **every** layer allows it:
//! the intersection, so a narrower layer can take rights away but never add
//! one the global layer lacks. The first layer (outermost first) that
//! denies decides; when all allow, the last (narrowest) one does. A memfd
//! cap is the smallest of the layers' caps. With more than one layer a
//! [`Decision`] names the layer that decided ([`Decision::layer`]) and a
//! [`LayeredExplanation`] shows each layer's rules; with one layer both are
//! exactly those of the plain [`Policy`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod explain;
mod glob;
mod layers;
mod parse;
mod rule;
mod snapshot;
mod spec;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use pbus_identity::PeerIdentity;

pub use error::{PolicyError, PolicyErrors};
pub use explain::{Candidate, Explanation, LayerExplanation, LayeredExplanation, Operation};
pub use layers::{LayerError, PolicyLayer, PolicyLayers, GLOBAL_LAYER};
pub use snapshot::PeerPolicy;
pub use spec::{format_identity, parse_identity, IdentitySpecError};

use rule::Rule;
use snapshot::SnapshotCache;

/// The shipped default policy text (see `default.toml` in this crate).
pub const DEFAULT_POLICY: &str = include_str!("../default.toml");

/// The origin name of the shipped default's rules in decisions and errors.
pub const BUILTIN_ORIGIN: &str = "builtin:default.toml";

/// A right a peer may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Right {
    /// Learn that a name exists (listing, lookups, owner-changed signals).
    See,
    /// Own a name.
    Own,
    /// Send to a name (optionally a specific method).
    Talk,
    /// Receive from a sender.
    Receive,
    /// Pass fds along with a message.
    PassFds,
    /// Watch traffic not addressed to it.
    Monitor,
    /// Attach sealed memfd payloads (a size cap rather than a yes/no).
    Memfd,
    /// Have the broker open files.
    File,
}

impl Right {
    /// Every right, in declaration order.
    pub const ALL: [Right; 8] = [
        Self::See,
        Self::Own,
        Self::Talk,
        Self::Receive,
        Self::PassFds,
        Self::Monitor,
        Self::Memfd,
        Self::File,
    ];

    /// Lower-case name used in errors and policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::See => "see",
            Self::Own => "own",
            Self::Talk => "talk",
            Self::Receive => "receive",
            Self::PassFds => "pass-fds",
            Self::Monitor => "monitor",
            Self::Memfd => "memfd",
            Self::File => "file",
        }
    }

    /// The right named `text` (as in policy files).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// True for rights whose rules may carry `name`.
    pub fn takes_name(self) -> bool {
        !matches!(self, Self::Monitor | Self::File)
    }

    /// True for rights whose rules may carry `peer` conditions (those with
    /// another party).
    pub fn takes_peer(self) -> bool {
        matches!(
            self,
            Self::See | Self::Talk | Self::Receive | Self::PassFds | Self::Memfd
        )
    }
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kinds of file access the broker may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FileAccess {
    /// Open for reading.
    pub read: bool,
    /// Open for writing.
    pub write: bool,
    /// Create the file if it does not exist.
    pub create: bool,
}

impl FileAccess {
    /// Read only.
    pub const READ: Self = Self {
        read: true,
        write: false,
        create: false,
    };

    /// Parses `read,write,create` (any subset, comma-separated; also `rw`,
    /// `r`, `w`, `c` style letters).
    pub fn parse(text: &str) -> Option<Self> {
        let mut access = Self::default();
        let words: Vec<&str> = if text.contains(',') || text.len() > 3 {
            text.split(',').map(str::trim).collect()
        } else {
            text.split("").filter(|s| !s.is_empty()).collect()
        };
        for word in words {
            match word {
                "read" | "r" => access.read = true,
                "write" | "w" => access.write = true,
                "create" | "c" => access.create = true,
                _ => return None,
            }
        }
        (access != Self::default()).then_some(access)
    }
}

impl fmt::Display for FileAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<&str> = [
            (self.read, "read"),
            (self.write, "write"),
            (self.create, "create"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if kinds.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&kinds.join(","))
        }
    }
}

/// Where a rule comes from and what it says, for decisions and `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    /// Position of the rule in the loaded policy (0-based, load order).
    pub index: usize,
    /// The file (or other origin) it was read from.
    pub origin: Arc<str>,
    /// 1-based line of its `[[rule]]` header.
    pub line: u32,
    /// 1-based column of its `[[rule]]` header.
    pub column: u32,
    /// A canonical one-line rendering, e.g.
    /// `allow talk subject{uid=1000} peer{same-uid} name=org.example.*`.
    pub text: String,
}

impl fmt::Display for RuleInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.origin, self.line, self.text)
    }
}

/// A shared reference to a rule's [`RuleInfo`] (cloning is one atomic
/// increment, cheap enough for the per-message path).
pub type RuleRef = Arc<RuleInfo>;

/// How specific a matching rule is; greater wins. Fields compare in
/// declaration order (the derived `Ord`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Specificity {
    /// Names: 0 for `*`, the element count for a prefix (`org.example.*`
    /// is 2), 1000 for an exact name. Files: the prefix's component count.
    pub object: u32,
    /// The rule names a member.
    pub member: bool,
    /// Number of subject and peer conditions.
    pub who: u32,
    /// The rule denies (deny beats allow when all else is equal).
    pub deny: bool,
}

impl fmt::Display for Specificity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let object = match self.object {
            0 => "any".to_string(),
            rule::EXACT_NAME_RANK => "exact".to_string(),
            n => n.to_string(),
        };
        write!(
            f,
            "object {object}, member {}, conditions {}, {}",
            if self.member { "yes" } else { "no" },
            self.who,
            if self.deny { "deny" } else { "allow" }
        )
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the operation may proceed.
    pub allowed: bool,
    /// The right that was checked.
    pub right: Right,
    /// The rule that decided; `None` when no rule applied (or the request
    /// was refused before any rule was looked at, e.g. a `..` path).
    pub rule: Option<RuleRef>,
    /// What decided, for `explain` and logs: one of a fixed set of texts,
    /// so building a decision never allocates.
    pub reason: &'static str,
    /// The layer that decided, when more than one layer took part (see
    /// [`PolicyLayers`]); `None` for a single policy, so that one layer
    /// decides exactly as the plain [`Policy`] does.
    pub layer: Option<Arc<str>>,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allowed" } else { "denied" };
        write!(f, "{} {verdict}: {}", self.right, self.reason)?;
        if let Some(rule) = &self.rule {
            write!(f, " ({rule})")?;
        }
        if let Some(layer) = &self.layer {
            write!(f, " in layer `{layer}`")?;
        }
        Ok(())
    }
}

/// What `check_path` found: a policy that loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Number of policy files read.
    pub files: usize,
    /// Number of rules in them.
    pub rules: usize,
    /// Whether the shipped default is included (no file said
    /// `builtin = false`).
    pub builtin: bool,
    /// The files, in load order.
    pub origins: Vec<String>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} file{}, {} rule{}",
            self.files,
            if self.files == 1 { "" } else { "s" },
            self.rules,
            if self.rules == 1 { "" } else { "s" }
        )?;
        if self.builtin {
            write!(f, " (on top of the built-in default)")?;
        } else {
            write!(f, " (built-in default left out)")?;
        }
        Ok(())
    }
}

/// A compiled policy: the rules in load order, and a cache of per-subject
/// indexes shared by the snapshots of peers that match the same rules.
pub struct Policy {
    rules: Vec<Rule>,
    /// Origins of the files loaded (not counting the built-in default).
    origins: Vec<String>,
    /// Whether the built-in default's rules come first.
    builtin: bool,
    /// Unique per policy built in this process: names this policy in the
    /// keys of snapshot caches, so no two policies share an entry.
    generation: u64,
    /// Indexes of [`Policy::snapshot`], this policy standing alone as the
    /// global layer.
    cache: SnapshotCache,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("rules", &self.rules.len())
            .field("origins", &self.origins)
            .field("builtin", &self.builtin)
            .field("generation", &self.generation)
            .finish()
    }
}

impl Policy {
    /// The built-in default policy ([`DEFAULT_POLICY`]). Every call returns
    /// the same `Arc`.
    pub fn builtin() -> Arc<Self> {
        static BUILTIN: OnceLock<Arc<Policy>> = OnceLock::new();
        Arc::clone(BUILTIN.get_or_init(|| {
            let mut rules = Vec::new();
            let mut errors = Vec::new();
            parse::parse_source(BUILTIN_ORIGIN, DEFAULT_POLICY, &mut rules, &mut errors);
            assert!(
                errors.is_empty(),
                "the shipped default policy must parse: {}",
                PolicyErrors(errors)
            );
            Arc::new(Self::from_rules(rules, Vec::new(), true))
        }))
    }

    /// Parses one policy text; `origin` names it in errors and decisions.
    /// The built-in default comes first unless the text says
    /// `builtin = false`.
    pub fn parse(text: &str, origin: &str) -> Result<Arc<Self>, PolicyErrors> {
        Self::from_sources(&[(origin, text)])
    }

    /// Parses several policy texts as `(origin, text)`, in that order, as if
    /// they were the files of a directory.
    pub fn from_sources(sources: &[(&str, &str)]) -> Result<Arc<Self>, PolicyErrors> {
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        parse::parse_source(BUILTIN_ORIGIN, DEFAULT_POLICY, &mut rules, &mut errors);
        let builtin_rules = rules.len();
        let mut builtin = true;
        for (origin, text) in sources {
            let header = parse::parse_source(origin, text, &mut rules, &mut errors);
            if header.builtin == Some(false) {
                builtin = false;
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        if !builtin {
            rules.drain(..builtin_rules);
            for (index, rule) in rules.iter_mut().enumerate() {
                Arc::get_mut(&mut rule.info)
                    .expect("rule info is not shared before the policy is built")
                    .index = index;
            }
        }
        let origins = sources.iter().map(|(o, _)| (*o).to_owned()).collect();
        Ok(Arc::new(Self::from_rules(rules, origins, builtin)))
    }

    /// Loads a policy file, or every `*.toml` file of a directory in lexical
    /// order of file names (names starting with `.` are skipped). The
    /// built-in default comes first unless a file says `builtin = false`.
    /// Every problem in every file is reported.
    pub fn load(path: &Path) -> Result<Arc<Self>, PolicyErrors> {
        let files = policy_files(path)?;
        let mut texts = Vec::with_capacity(files.len());
        let mut errors = Vec::new();
        for file in &files {
            match std::fs::read_to_string(file) {
                Ok(text) => texts.push((file.display().to_string(), text)),
                Err(e) => errors.push(PolicyError::file(
                    &file.display().to_string(),
                    format!("cannot read: {e}"),
                )),
            }
        }
        let sources: Vec<(&str, &str)> = texts
            .iter()
            .map(|(o, t)| (o.as_str(), t.as_str()))
            .collect();
        match Self::from_sources(&sources) {
            Ok(policy) if errors.is_empty() => Ok(policy),
            Ok(_) => Err(PolicyErrors(errors)),
            Err(PolicyErrors(mut more)) => {
                errors.append(&mut more);
                Err(PolicyErrors(errors))
            }
        }
    }

    fn from_rules(rules: Vec<Rule>, origins: Vec<String>, builtin: bool) -> Self {
        static GENERATIONS: AtomicU64 = AtomicU64::new(0);
        Self {
            rules,
            origins,
            builtin,
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            cache: SnapshotCache::default(),
        }
    }

    /// This policy's generation: unique among the policies built by this
    /// process (a reload builds a new one), for telling them apart in logs
    /// and cache keys.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The numbers of the rules whose subject matches `peer`, in order.
    pub(crate) fn rules_matching(&self, peer: &PeerIdentity) -> Box<[u32]> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| rule.subject.check(peer).is_ok())
            .map(|(i, _)| u32::try_from(i).expect("fewer than 2^32 rules"))
            .collect()
    }

    pub(crate) fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Number of rules, the built-in default's included.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Every rule in load order.
    pub fn rule_infos(&self) -> impl Iterator<Item = &RuleRef> {
        self.rules.iter().map(|r| &r.info)
    }

    /// Whether the built-in default's rules are part of this policy.
    pub fn includes_builtin(&self) -> bool {
        self.builtin
    }

    /// The files (origins) loaded, in order, without the built-in default.
    pub fn origins(&self) -> &[String] {
        &self.origins
    }

    /// Compiles the snapshot for one peer: keeps the rules whose subject
    /// matches `peer` and indexes them, sharing the index with earlier
    /// snapshots that kept the same rules. The same as the snapshot of
    /// [`PolicyLayers::global`] of this policy.
    pub fn snapshot(self: &Arc<Self>, peer: &PeerIdentity) -> PeerPolicy {
        let alone = [PolicyLayer::global(Arc::clone(self))];
        snapshot::snapshot(&self.cache, &alone, peer)
    }

    /// Explains one operation by `subject`: the decision (the same one the
    /// snapshot gives) and every rule mentioning the right, with why it
    /// matched or not.
    pub fn explain(&self, subject: &PeerIdentity, operation: &Operation) -> Explanation {
        explain::explain(self, subject, operation)
    }
}

/// The policy files at `path`: the file itself, or the directory's
/// `*.toml` files (not starting with `.`) in lexical order.
fn policy_files(path: &Path) -> Result<Vec<std::path::PathBuf>, PolicyErrors> {
    let origin = path.display().to_string();
    let fail = |message: String| PolicyErrors(vec![PolicyError::file(&origin, message)]);
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| fail(format!("cannot list: {e}")))? {
        let entry = entry.map_err(|e| fail(format!("cannot list: {e}")))?;
        let name = entry.file_name();
        let name_bytes = std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str());
        if name_bytes.starts_with(b".") || !name_bytes.ends_with(b".toml") {
            continue;
        }
        let file = entry.path();
        // Follow symlinks; skip directories named *.toml.
        if std::fs::metadata(&file).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        files.push(file);
    }
    files.sort_by(|a, b| {
        std::os::unix::ffi::OsStrExt::as_bytes(a.as_os_str())
            .cmp(std::os::unix::ffi::OsStrExt::as_bytes(b.as_os_str()))
    });
    Ok(files)
}

/// Loads `path` like [`Policy::load`] and summarizes it, for
/// `pbusctl policy check`.
pub fn check_path(path: &Path) -> Result<Summary, PolicyErrors> {
    let policy = Policy::load(path)?;
    let builtin_rules = if policy.builtin {
        Policy::builtin().rule_count()
    } else {
        0
    };
    Ok(Summary {
        files: policy.origins.len(),
        rules: policy.rule_count() - builtin_rules,
        builtin: policy.builtin,
        origins: policy.origins.clone(),
    })
}
