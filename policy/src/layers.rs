//! Policy layers: an ordered stack of named policies whose decisions are
//! intersected.
//!
//! [`PolicyLayers`] is the global policy (the layer named [`GLOBAL_LAYER`])
//! followed by narrower layers, such as the policy of the endpoint a peer
//! connected through. An operation is allowed only if every layer allows
//! it, so a narrower layer can take rights away but never grant one the
//! global layer lacks. This module owns the stack and the one rule for
//! combining the layers' decisions ([`combine_decisions`],
//! [`combine_memfd`]), which the snapshot checks and `explain` share; it
//! knows nothing about indexes or files.

use std::fmt;
use std::sync::{Arc, OnceLock};

use pbus_identity::PeerIdentity;

use crate::explain::{LayerExplanation, LayeredExplanation};
use crate::snapshot::{self, SnapshotCache};
use crate::{Decision, Operation, PeerPolicy, Policy, Right};

/// The name of the first, outermost layer: the daemon's configured policy.
pub const GLOBAL_LAYER: &str = "global";

/// The shared `Arc` of [`GLOBAL_LAYER`].
fn global_name() -> Arc<str> {
    static NAME: OnceLock<Arc<str>> = OnceLock::new();
    Arc::clone(NAME.get_or_init(|| Arc::from(GLOBAL_LAYER)))
}

/// One layer of a [`PolicyLayers`] stack: a name and a policy.
#[derive(Debug, Clone)]
pub struct PolicyLayer {
    pub(crate) name: Arc<str>,
    pub(crate) policy: Arc<Policy>,
}

impl PolicyLayer {
    /// `policy` as the layer named [`GLOBAL_LAYER`].
    pub(crate) fn global(policy: Arc<Policy>) -> Self {
        Self {
            name: global_name(),
            policy,
        }
    }

    /// The layer's name (`global`, or e.g. an endpoint's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The layer's policy.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }
}

/// Why a layer cannot be added to a stack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerError {
    /// Layer names say which layer decided, so they must be unique.
    #[error("the policy stack already has a layer named `{0}`")]
    DuplicateName(String),
    /// A layer needs a name to be reported by.
    #[error("a policy layer needs a non-empty name")]
    EmptyName,
}

/// An ordered stack of named policies, the global one first, then narrower
/// ones; a peer's snapshot allows an operation only if every layer does.
///
/// Cheap to clone. Stacks derived from one another
/// ([`with_layer`](Self::with_layer), [`with_global`](Self::with_global))
/// share one cache of compiled snapshots, keyed by every layer's name, its
/// policy's [`generation`](Policy::generation) and the rules the subject
/// matched in it, so no two layers or stacks share an entry by accident.
#[derive(Clone)]
pub struct PolicyLayers {
    layers: Arc<[PolicyLayer]>,
    cache: Arc<SnapshotCache>,
}

impl fmt::Debug for PolicyLayers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.layers
                    .iter()
                    .map(|layer| (&*layer.name, &layer.policy)),
            )
            .finish()
    }
}

impl PolicyLayers {
    /// A stack of one layer, [`GLOBAL_LAYER`], holding `policy`. Its
    /// snapshots decide exactly as `policy`'s own.
    pub fn global(policy: Arc<Policy>) -> Self {
        Self {
            layers: Arc::from([PolicyLayer::global(policy)]),
            cache: Arc::default(),
        }
    }

    /// This stack with `policy` added as the narrowest layer, named `name`
    /// (which must be new and not empty).
    pub fn with_layer(&self, name: &str, policy: Arc<Policy>) -> Result<Self, LayerError> {
        if name.is_empty() {
            return Err(LayerError::EmptyName);
        }
        if self.layer(name).is_some() {
            return Err(LayerError::DuplicateName(name.to_owned()));
        }
        let layer = PolicyLayer {
            name: Arc::from(name),
            policy,
        };
        Ok(Self {
            layers: self.layers.iter().cloned().chain([layer]).collect(),
            cache: Arc::clone(&self.cache),
        })
    }

    /// This stack with the global (first) layer's policy replaced by
    /// `policy`, as on a reload; narrower layers are kept.
    pub fn with_global(&self, policy: Arc<Policy>) -> Self {
        let mut layers = self.layers.to_vec();
        layers[0].policy = policy;
        Self {
            layers: layers.into(),
            cache: Arc::clone(&self.cache),
        }
    }

    /// The layers, outermost (global) first.
    pub fn layers(&self) -> &[PolicyLayer] {
        &self.layers
    }

    /// The layer named `name`.
    pub fn layer(&self, name: &str) -> Option<&PolicyLayer> {
        self.layers.iter().find(|layer| *layer.name == *name)
    }

    /// The global (first) layer's policy.
    pub fn global_policy(&self) -> &Arc<Policy> {
        &self.layers[0].policy
    }

    /// Compiles the snapshot for one peer: in every layer, the rules whose
    /// subject matches `peer`, indexed; shared with earlier snapshots that
    /// matched the same rules in the same layers.
    pub fn snapshot(&self, peer: &PeerIdentity) -> PeerPolicy {
        snapshot::snapshot(&self.cache, &self.layers, peer)
    }

    /// Explains one operation by `subject`: every layer's explanation and
    /// the combined decision (the same one the snapshot gives).
    pub fn explain(&self, subject: &PeerIdentity, operation: &Operation) -> LayeredExplanation {
        let layers: Vec<LayerExplanation> = self
            .layers
            .iter()
            .map(|layer| LayerExplanation {
                layer: Arc::clone(&layer.name),
                explanation: layer.policy.explain(subject, operation),
            })
            .collect();
        let several = layers.len() > 1;
        let (decision, memfd_limit) = if operation.right() == Right::Memfd {
            combine_memfd(
                layers.iter().map(|l| {
                    (
                        &l.layer,
                        l.explanation.decision.clone(),
                        l.explanation.memfd_limit,
                    )
                }),
                several,
            )
        } else {
            let decisions = layers
                .iter()
                .map(|l| (&l.layer, l.explanation.decision.clone()));
            (combine_decisions(decisions, several), None)
        };
        LayeredExplanation {
            decision,
            memfd_limit,
            layers,
        }
    }
}

/// `decision` as made by layer `name`, when it must say so (`several`).
fn by_layer(mut decision: Decision, name: &Arc<str>, several: bool) -> Decision {
    if several {
        decision.layer = Some(Arc::clone(name));
    }
    decision
}

/// Combines each layer's decision, outermost first, into the stack's: the
/// first denial decides (later layers are not asked); when every layer
/// allows, the last (narrowest) one decides. With `several` layers the
/// decision names its layer. `decisions` must not be empty.
pub(crate) fn combine_decisions<'a>(
    decisions: impl IntoIterator<Item = (&'a Arc<str>, Decision)>,
    several: bool,
) -> Decision {
    let mut last = None;
    for (name, decision) in decisions {
        let decision = by_layer(decision, name, several);
        if !decision.allowed {
            return decision;
        }
        last = Some(decision);
    }
    last.expect("a policy stack has at least one layer")
}

/// True when memfd cap `a` is at least as tight as `b` (`None`: no cap).
pub(crate) fn tighter_cap(a: Option<u64>, b: Option<u64>) -> bool {
    match (a, b) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(a), Some(b)) => a <= b,
    }
}

/// Combines each layer's memfd decision and cap, outermost first: the
/// first denial decides (cap 0); else the tightest cap does, the narrower
/// layer on a tie (with no caps at all, the last layer). `items` must not
/// be empty.
pub(crate) fn combine_memfd<'a>(
    items: impl IntoIterator<Item = (&'a Arc<str>, Decision, Option<u64>)>,
    several: bool,
) -> (Decision, Option<u64>) {
    let mut tightest: Option<(Decision, Option<u64>)> = None;
    for (name, decision, cap) in items {
        let decision = by_layer(decision, name, several);
        if !decision.allowed {
            return (decision, cap);
        }
        if tightest
            .as_ref()
            .is_none_or(|(_, so_far)| tighter_cap(cap, *so_far))
        {
            tightest = Some((decision, cap));
        }
    }
    tightest.expect("a policy stack has at least one layer")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{parse_identity, FileAccess};

    /// The global layer of the tests: uid 1000 may own and talk to
    /// `org.example.*`, pass fds to it, attach memfds up to 1 MiB, monitor,
    /// and read and write under `/srv`.
    const GLOBAL: &str = r#"
builtin = false
[[rule]]
allow = ["own", "talk", "pass-fds"]
subject = { uid = 1000 }
name = "org.example.*"
[[rule]]
allow = ["memfd"]
subject = { uid = 1000 }
max-bytes = 1048576
[[rule]]
allow = ["monitor"]
subject = { uid = 1000 }
[[rule]]
allow = ["file"]
subject = { uid = 1000 }
path = "/srv"
access = ["read", "write"]
"#;

    /// A narrower layer: takes `org.example.Secret`, fds, monitoring and
    /// writing away, caps memfds at 4 KiB, and tries to add `org.other.*`
    /// and `/etc`, which the global layer lacks.
    const ENDPOINT: &str = r#"
builtin = false
[[rule]]
allow = ["own", "talk"]
subject = { uid = 1000 }
name = "org.example.*"
[[rule]]
deny = ["talk"]
subject = { uid = 1000 }
name = "org.example.Secret"
[[rule]]
allow = ["talk", "own"]
subject = { uid = 1000 }
name = "org.other.*"
[[rule]]
allow = ["memfd"]
subject = { uid = 1000 }
max-bytes = 4096
[[rule]]
allow = ["file"]
subject = { uid = 1000 }
path = "/"
access = ["read"]
"#;

    fn policy(text: &str, origin: &str) -> Arc<Policy> {
        Policy::parse(text, origin).unwrap_or_else(|e| panic!("{e}"))
    }

    fn stack() -> PolicyLayers {
        PolicyLayers::global(policy(GLOBAL, "global.toml"))
            .with_layer("endpoint", policy(ENDPOINT, "endpoint.toml"))
            .unwrap()
    }

    fn uid(n: u32) -> PeerIdentity {
        parse_identity(&format!("uid={n}")).unwrap()
    }

    fn layer_of(decision: &Decision) -> Option<&str> {
        decision.layer.as_deref()
    }

    fn origin_of(decision: &Decision) -> Option<&str> {
        decision.rule.as_ref().map(|rule| &*rule.origin)
    }

    #[test]
    fn a_narrower_layer_removes_rights_the_global_grants() {
        let layers = stack();
        let me = uid(1000);
        let snap = layers.snapshot(&me);
        let other = uid(2000);
        // Globally allowed, allowed by the endpoint too.
        assert!(snap.may_talk(&other, &["org.example.Foo"], "Get"));
        // Globally allowed, taken away by the endpoint: by a deny rule ...
        let secret = snap.talk(&other, &["org.example.Secret"], "Get");
        assert!(!secret.allowed, "{secret}");
        assert!(!snap.may_talk(&other, &["org.example.Secret"], "Get"));
        assert_eq!(origin_of(&secret), Some("endpoint.toml"));
        // ... and by having no rule for it.
        let fds = snap.pass_fds(&other, &["org.example.Foo"]);
        assert!(!fds.allowed && fds.rule.is_none(), "{fds}");
        assert!(!snap.may_pass_fds(&other, &["org.example.Foo"]));
        assert_eq!(layer_of(&fds), Some("endpoint"));
        assert!(!snap.monitor().allowed);
        // Writing is taken away, reading kept.
        let srv = Path::new("/srv/data/x");
        assert!(snap.file_access(srv, FileAccess::READ).allowed);
        let write = snap.file_access(srv, FileAccess::parse("rw").unwrap());
        assert!(!write.allowed, "{write}");
        assert_eq!(layer_of(&write), Some("endpoint"));
        // The tighter memfd cap wins.
        let (memfd, cap) = snap.memfd(&other, &[]);
        assert!(memfd.allowed);
        assert_eq!(cap, Some(4096));
        assert_eq!(snap.max_memfd_bytes(&other, &[]), Some(4096));
        assert_eq!(layer_of(&memfd), Some("endpoint"));
        // Without the endpoint layer, all of it is allowed.
        let global = PolicyLayers::global(Arc::clone(layers.global_policy())).snapshot(&me);
        assert!(global.may_talk(&other, &["org.example.Secret"], "Get"));
        assert!(global.may_pass_fds(&other, &["org.example.Foo"]));
        assert!(global.monitor().allowed);
        assert!(
            global
                .file_access(srv, FileAccess::parse("rw").unwrap())
                .allowed
        );
        assert_eq!(global.max_memfd_bytes(&other, &[]), Some(1 << 20));
    }

    #[test]
    fn a_narrower_layer_cannot_add_a_right_the_global_lacks() {
        let snap = stack().snapshot(&uid(1000));
        let other = uid(2000);
        let talk = snap.talk(&other, &["org.other.Foo"], "Get");
        assert!(!talk.allowed, "{talk}");
        assert!(!snap.may_talk(&other, &["org.other.Foo"], "Get"));
        assert_eq!(layer_of(&talk), Some("global"));
        assert_eq!(talk.rule, None);
        assert!(!snap.own("org.other.Foo").allowed);
        let etc = snap.file_access(Path::new("/etc/passwd"), FileAccess::READ);
        assert!(!etc.allowed, "{etc}");
        assert_eq!(layer_of(&etc), Some("global"));
        // A subject the global layer grants nothing gets nothing.
        let stranger = stack().snapshot(&uid(3000));
        assert!(!stranger.may_talk(&other, &["org.example.Foo"], "Get"));
        assert_eq!(stranger.max_memfd_bytes(&other, &[]), None);
    }

    #[test]
    fn the_deciding_layer_is_named() {
        let snap = stack().snapshot(&uid(1000));
        let other = uid(2000);
        // All allow: the narrowest layer had the last word.
        let own = snap.own("org.example.Foo");
        assert!(own.allowed);
        assert_eq!(layer_of(&own), Some("endpoint"));
        assert_eq!(origin_of(&own), Some("endpoint.toml"));
        // The first denial decides: the global one, although the endpoint
        // would allow.
        let talk = snap.talk(&other, &["org.other.Foo"], "Get");
        assert_eq!(layer_of(&talk), Some("global"));
        assert!(talk.to_string().ends_with(" in layer `global`"), "{talk}");
        // A path refused outright is refused by the first layer.
        let dotdot = snap.file_access(Path::new("/srv/../etc"), FileAccess::READ);
        assert!(!dotdot.allowed);
        assert_eq!(layer_of(&dotdot), Some("global"));
    }

    #[test]
    fn explain_agrees_with_the_snapshot_and_shows_every_layer() {
        let layers = stack();
        let me = uid(1000);
        let snap = layers.snapshot(&me);
        let other = uid(2000);
        let talk = |name: &str| Operation::Talk {
            receiver: other.clone(),
            names: vec![name.into()],
            member: "Get".into(),
        };
        let cases = [
            (
                talk("org.example.Foo"),
                snap.talk(&other, &["org.example.Foo"], "Get"),
            ),
            (
                talk("org.example.Secret"),
                snap.talk(&other, &["org.example.Secret"], "Get"),
            ),
            (
                talk("org.other.Foo"),
                snap.talk(&other, &["org.other.Foo"], "Get"),
            ),
            (Operation::Monitor, snap.monitor()),
            (
                Operation::File {
                    path: "/srv/x".into(),
                    access: FileAccess::parse("rw").unwrap(),
                },
                snap.file_access(Path::new("/srv/x"), FileAccess::parse("rw").unwrap()),
            ),
        ];
        for (operation, decision) in cases {
            let explained = layers.explain(&me, &operation);
            assert_eq!(explained.decision, decision, "{operation:?}\n{explained}");
            assert_eq!(explained.layers.len(), 2);
        }
        let memfd = layers.explain(
            &me,
            &Operation::Memfd {
                receiver: other.clone(),
                names: Vec::new(),
            },
        );
        assert_eq!(
            (memfd.decision.clone(), memfd.memfd_limit),
            snap.memfd(&other, &[])
        );
        let text = layers.explain(&me, &talk("org.example.Secret")).to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with(
                "talk denied: denied by the most specific matching rule (endpoint.toml:"
            ),
            "{text}"
        );
        assert!(lines[0].ends_with(" in layer `endpoint`"), "{text}");
        assert_eq!(lines[1], "every layer must allow; outermost first:");
        assert!(
            lines[2].starts_with("layer `global`: talk allowed"),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("layer `endpoint`: talk denied")),
            "{text}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("  => endpoint.toml:")),
            "{text}"
        );
    }

    /// Two policies whose only rule each matches uid 1000 (rule 0 in both):
    /// equal rule sets, opposite verdicts.
    fn twins() -> (Arc<Policy>, Arc<Policy>) {
        let rule = |verdict: &str| {
            format!(
                "builtin = false\n[[rule]]\n{verdict} = [\"talk\"]\nsubject = {{ uid = 1000 }}\n"
            )
        };
        (
            policy(&rule("allow"), "allow.toml"),
            policy(&rule("deny"), "deny.toml"),
        )
    }

    #[test]
    fn cache_keys_do_not_collide_between_layers_or_policies() {
        let (allow, deny) = twins();
        let me = uid(1000);
        let other = uid(2000);
        let base = PolicyLayers::global(Arc::clone(&allow));
        // Stacks derived from `base` share its cache.
        let replaced = base.with_global(Arc::clone(&deny));
        let allow_then_deny = base.with_layer("endpoint", Arc::clone(&deny)).unwrap();
        let deny_then_allow = replaced.with_layer("endpoint", Arc::clone(&allow)).unwrap();
        let same_twice = base.with_layer("endpoint", Arc::clone(&allow)).unwrap();
        let renamed = base.with_layer("edge", Arc::clone(&deny)).unwrap();

        // The keys: equal rule numbers, different layers or policies.
        let key = |layers: &PolicyLayers| snapshot::snapshot_key(layers.layers(), &me);
        let keys = [
            key(&base),
            key(&replaced),
            key(&allow_then_deny),
            key(&deny_then_allow),
            key(&same_twice),
            key(&renamed),
        ];
        for key in &keys {
            assert!(key.iter().all(|layer| *layer.rules == [0]), "{key:?}");
        }
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }

        // The snapshots: each has its own entry and decides by its layers.
        let snaps = [
            base.snapshot(&me),
            replaced.snapshot(&me),
            allow_then_deny.snapshot(&me),
            deny_then_allow.snapshot(&me),
            same_twice.snapshot(&me),
            renamed.snapshot(&me),
        ];
        assert_eq!(base.cache.len(), snaps.len());
        for (i, a) in snaps.iter().enumerate() {
            for b in &snaps[i + 1..] {
                assert!(!a.shares_index_with(b));
            }
        }
        let talk = |snap: &PeerPolicy| {
            let decision = snap.talk(&other, &[], "Get");
            (
                decision.allowed,
                decision.layer.as_deref().map(str::to_owned),
                origin_of(&decision).map(str::to_owned),
            )
        };
        let owned =
            |layer: Option<&str>, origin: &str| (layer.map(str::to_owned), Some(origin.to_owned()));
        let cases = [
            (true, owned(None, "allow.toml")),
            (false, owned(None, "deny.toml")),
            (false, owned(Some("endpoint"), "deny.toml")),
            (false, owned(Some("global"), "deny.toml")),
            (true, owned(Some("endpoint"), "allow.toml")),
            (false, owned(Some("edge"), "deny.toml")),
        ];
        for (snap, (allowed, (layer, origin))) in snaps.iter().zip(cases) {
            assert_eq!(talk(snap), (allowed, layer, origin), "{snap:?}");
        }

        // Peers matching the same rules in the same layers do share.
        let again = allow_then_deny.snapshot(&parse_identity("uid=1000,pid=7").unwrap());
        assert!(again.shares_index_with(&snaps[2]));
    }

    #[test]
    fn one_layer_decides_exactly_as_the_plain_policy() {
        let plain = policy(GLOBAL, "global.toml");
        let layers = PolicyLayers::global(Arc::clone(&plain));
        let me = uid(1000);
        let (from_plain, from_layers) = (plain.snapshot(&me), layers.snapshot(&me));
        let other = uid(2000);
        for name in ["org.example.Foo", "org.other.Foo"] {
            assert_eq!(from_layers.own(name), from_plain.own(name));
            assert_eq!(
                from_layers.talk(&other, &[name], "Get"),
                from_plain.talk(&other, &[name], "Get")
            );
            assert_eq!(
                from_layers.pass_fds(&other, &[name]),
                from_plain.pass_fds(&other, &[name])
            );
        }
        assert_eq!(
            from_layers.memfd(&other, &[]),
            from_plain.memfd(&other, &[])
        );
        assert_eq!(from_layers.monitor(), from_plain.monitor());
        assert_eq!(from_layers.rule_count(), from_plain.rule_count());
        // No layer is named when there is only one.
        assert_eq!(from_layers.own("org.example.Foo").layer, None);
        let explained = layers.explain(&me, &Operation::Monitor);
        assert_eq!(
            explained.to_string(),
            plain.explain(&me, &Operation::Monitor).to_string()
        );
    }

    #[test]
    fn layer_names_are_unique_and_reload_keeps_narrower_layers() {
        let layers = stack();
        assert_eq!(
            layers
                .with_layer("endpoint", Policy::builtin())
                .unwrap_err(),
            LayerError::DuplicateName("endpoint".into())
        );
        assert_eq!(
            layers
                .with_layer(GLOBAL_LAYER, Policy::builtin())
                .unwrap_err(),
            LayerError::DuplicateName("global".into())
        );
        assert_eq!(
            layers.with_layer("", Policy::builtin()).unwrap_err(),
            LayerError::EmptyName
        );
        let reloaded = layers.with_global(Policy::builtin());
        let names: Vec<&str> = reloaded.layers().iter().map(PolicyLayer::name).collect();
        assert_eq!(names, ["global", "endpoint"]);
        assert!(Arc::ptr_eq(reloaded.global_policy(), &Policy::builtin()));
        assert!(Arc::ptr_eq(
            reloaded.layer("endpoint").unwrap().policy(),
            layers.layer("endpoint").unwrap().policy()
        ));
    }
}
