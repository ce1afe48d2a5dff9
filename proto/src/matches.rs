//! Match rules: which signals a subscriber wants. One validation of a wire
//! `MatchRule` ([`Rule::from_wire`]) and one test of a rule against a
//! signal's header fields ([`Rule::matches`]), shared by the daemon (which
//! indexes rules over all its peers) and the client (which checks each
//! subscription's rule again locally).
//!
//! Plain data, no I/O. This module knows nothing about how rules are
//! stored, nor about who owns which name: a rule on a well-known sender asks
//! the caller whether the signal's sender owns that name.

use crate::names::{BusName, MemberName, NameError, ObjectPath};
use crate::v1::MatchRule;

/// Highest argument index a rule may test.
pub const MAX_ARG_INDEX: u32 = 63;

/// Why a wire `MatchRule` is refused. The messages are the ones the bus
/// sends back with `INVALID_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The sender, path or member is not a valid name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `path_namespace` without a `path` to be the namespace.
    #[error("path_namespace needs a path")]
    NamespaceWithoutPath,
    /// An argument index above [`MAX_ARG_INDEX`].
    #[error("argument index above {MAX_ARG_INDEX}")]
    ArgIndexTooHigh,
    /// Two conditions on the same argument.
    #[error("argument index given twice")]
    ArgIndexTwice,
}

/// A validated match rule. `None` fields match anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Unique or well-known name of the sender.
    pub sender: Option<String>,
    /// Object path, exact or (with `path_namespace`) as a prefix.
    pub path: Option<String>,
    /// Match `path` and everything below it.
    pub path_namespace: bool,
    /// Signal name.
    pub member: Option<String>,
    /// `(index, value)` pairs that `Header.args` must equal, sorted by index.
    pub args: Vec<(u32, String)>,
    /// Also match signals unicast to other peers.
    pub eavesdrop: bool,
}

impl Rule {
    /// Validates a wire rule: names valid where given, a namespace only with
    /// a path, argument indices at most [`MAX_ARG_INDEX`] and each given once.
    pub fn from_wire(rule: MatchRule) -> Result<Self, RuleError> {
        let non_empty = |s: String| if s.is_empty() { None } else { Some(s) };
        let sender = non_empty(rule.sender);
        if let Some(sender) = &sender {
            BusName::validate(sender)?;
        }
        let path = non_empty(rule.path);
        if let Some(path) = &path {
            ObjectPath::validate(path)?;
        }
        if rule.path_namespace && path.is_none() {
            return Err(RuleError::NamespaceWithoutPath);
        }
        let member = non_empty(rule.member);
        if let Some(member) = &member {
            MemberName::validate(member)?;
        }
        let mut args: Vec<(u32, String)> =
            rule.args.into_iter().map(|a| (a.index, a.value)).collect();
        args.sort();
        if args.iter().any(|(index, _)| *index > MAX_ARG_INDEX) {
            return Err(RuleError::ArgIndexTooHigh);
        }
        if args.windows(2).any(|pair| pair[0].0 == pair[1].0) {
            return Err(RuleError::ArgIndexTwice);
        }
        Ok(Self {
            sender,
            path,
            path_namespace: rule.path_namespace,
            member,
            args,
            eavesdrop: rule.eavesdrop,
        })
    }

    /// Does this rule match `signal`? `sender_owns(name)` tells whether the
    /// signal's sender currently owns the well-known name `name` (as the
    /// subscriber resolves it); it is asked only when the rule names a
    /// well-known sender other than the signal's own sender field.
    /// `eavesdrop` is not looked at: which traffic a rule is matched against
    /// is the caller's choice.
    pub fn matches<A: AsRef<str>>(
        &self,
        signal: &SignalView<'_, A>,
        sender_owns: impl Fn(&str) -> bool,
    ) -> bool {
        if let Some(member) = &self.member {
            if member != signal.member {
                return false;
            }
        }
        if let Some(path) = &self.path {
            let hit = if self.path_namespace {
                path_in_namespace(signal.path, path)
            } else {
                path == signal.path
            };
            if !hit {
                return false;
            }
        }
        for (index, value) in &self.args {
            if signal.args.get(*index as usize).map(AsRef::as_ref) != Some(value.as_str()) {
                return false;
            }
        }
        if let Some(sender) = &self.sender {
            if sender != signal.sender && (sender.starts_with(':') || !sender_owns(sender)) {
                return false;
            }
        }
        true
    }
}

/// `path` equals `namespace` or lies below it.
fn path_in_namespace(path: &str, namespace: &str) -> bool {
    if namespace == "/" {
        return true;
    }
    match path.strip_prefix(namespace) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The fields of a signal that rules look at, borrowed from its header.
/// `A` is how the string arguments are held: `&str` in the daemon (borrowed
/// from a [`HeaderView`](crate::header::HeaderView)), `String` in the client
/// (a decoded `Header`).
#[derive(Debug, Clone, Copy)]
pub struct SignalView<'a, A = &'a str> {
    /// Unique name of the sender (or the bus name for bus signals).
    pub sender: &'a str,
    /// Path (may be empty).
    pub path: &'a str,
    /// Signal name.
    pub member: &'a str,
    /// String arguments.
    pub args: &'a [A],
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::ArgMatch;

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
    fn fields_filter() {
        let args = vec!["a", "b"];
        let signal = view(":1.5", "/x/y", "Changed", &args);
        let nobody = |_: &str| false;
        assert!(rule("", "", "", &[]).matches(&signal, nobody));
        assert!(rule(":1.5", "/x/y", "Changed", &[(1, "b")]).matches(&signal, nobody));
        assert!(!rule(":1.6", "", "", &[]).matches(&signal, nobody));
        assert!(!rule("", "/x", "", &[]).matches(&signal, nobody));
        assert!(!rule("", "", "Other", &[]).matches(&signal, nobody));
        assert!(!rule("", "", "", &[(0, "b")]).matches(&signal, nobody));
        assert!(!rule("", "", "", &[(2, "c")]).matches(&signal, nobody));
        // A well-known sender matches while the sender owns it.
        assert!(rule("org.example.S", "", "", &[]).matches(&signal, |n| n == "org.example.S"));
        assert!(!rule("org.example.S", "", "", &[]).matches(&signal, nobody));
        // A unique name is never resolved: only the sender itself matches.
        assert!(!rule(":1.6", "", "", &[]).matches(&signal, |_| true));
    }

    #[test]
    fn owned_arguments_match_like_borrowed_ones() {
        let args = vec!["a".to_owned(), "b".to_owned()];
        let signal = SignalView {
            sender: ":1.5",
            path: "/x",
            member: "Changed",
            args: &args,
        };
        let nobody = |_: &str| false;
        assert!(rule("", "", "", &[(0, "a"), (1, "b")]).matches(&signal, nobody));
        assert!(!rule("", "", "", &[(1, "a")]).matches(&signal, nobody));
    }

    #[test]
    fn path_namespace() {
        let mut r = rule("", "/a/b", "", &[]);
        r.path_namespace = true;
        let nobody = |_: &str| false;
        assert!(r.matches(&view(":1.1", "/a/b", "M", &[]), nobody));
        assert!(r.matches(&view(":1.1", "/a/b/c", "M", &[]), nobody));
        assert!(!r.matches(&view(":1.1", "/a/bc", "M", &[]), nobody));
        assert!(!r.matches(&view(":1.1", "/a", "M", &[]), nobody));
        let mut root = rule("", "/", "", &[]);
        root.path_namespace = true;
        assert!(root.matches(&view(":1.1", "/anything/below", "M", &[]), nobody));
    }

    #[test]
    fn invalid_rules_are_refused() {
        let error = |rule: MatchRule| Rule::from_wire(rule).unwrap_err();
        assert!(matches!(
            error(MatchRule {
                sender: "nodots".into(),
                ..MatchRule::default()
            }),
            RuleError::Name(_)
        ));
        assert!(matches!(
            error(MatchRule {
                path: "no/slash".into(),
                ..MatchRule::default()
            }),
            RuleError::Name(_)
        ));
        assert!(matches!(
            error(MatchRule {
                member: "Al-pha".into(),
                ..MatchRule::default()
            }),
            RuleError::Name(_)
        ));
        assert_eq!(
            error(MatchRule {
                path_namespace: true,
                ..MatchRule::default()
            }),
            RuleError::NamespaceWithoutPath
        );
        let with_args = |args: &[(u32, &str)]| MatchRule {
            args: args
                .iter()
                .map(|(index, value)| ArgMatch {
                    index: *index,
                    value: (*value).into(),
                })
                .collect(),
            ..MatchRule::default()
        };
        assert_eq!(
            error(with_args(&[(1, "x"), (1, "y")])),
            RuleError::ArgIndexTwice
        );
        assert_eq!(
            error(with_args(&[(MAX_ARG_INDEX + 1, "x")])),
            RuleError::ArgIndexTooHigh
        );
        assert!(Rule::from_wire(with_args(&[(MAX_ARG_INDEX, "x")])).is_ok());
        // The bus sends these words back; integration tests look for them.
        assert_eq!(
            RuleError::ArgIndexTooHigh.to_string(),
            "argument index above 63"
        );
    }
}
