//! The policy file parser: TOML text to validated [`Rule`]s, with every
//! problem reported at its file, line and column.
//!
//! The TOML is read into a spanned document tree (`toml::de::DeTable`) and
//! walked by hand, so unknown keys, wrong types, bad names and globs, and
//! qualifiers that do not fit a rule's rights are all reported together,
//! each at the key or value it is about. This module knows the file format
//! and nothing about snapshots or decisions.

use std::ops::Range;
use std::sync::Arc;

use pbus_identity::ContainerRuntime;
use pbus_proto::names::{LocatedNameError, MemberName, WellKnownName};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::error::{LineIndex, PolicyError};
use crate::glob::Glob;
use crate::rule::{ContainerSel, NamePattern, PathPrefix, PeerSel, RightSet, Rule, Selector};
use crate::{FileAccess, Right, RuleInfo};

type Value<'i> = Spanned<DeValue<'i>>;

/// Rule keys, for "unknown key" messages.
const RULE_KEYS: &str = "allow, deny, subject, peer, name, member, max-bytes, path, access";
const SELECTOR_KEYS: &str = "anyone, uid, gid, label, host, container, listener";
const PEER_KEYS: &str =
    "anyone, uid, gid, label, host, container, listener, same-uid, same-container";

/// What a parsed file says besides its rules.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FileHeader {
    /// The top-level `builtin = true|false` key, if present.
    pub builtin: Option<bool>,
}

/// Parses one source into `rules` (numbered after the ones already there)
/// and `errors`. A rule with any error is left out; the others are kept so
/// that all errors of a file can be reported in one pass.
pub(crate) fn parse_source(
    origin: &str,
    text: &str,
    rules: &mut Vec<Rule>,
    errors: &mut Vec<PolicyError>,
) -> FileHeader {
    let first_error = errors.len();
    let mut parser = Parser {
        origin: Arc::from(origin),
        text,
        lines: LineIndex::new(text),
        errors,
    };
    let header = parser.document(rules);
    // Keys are visited in the order the TOML tree keeps them (sorted), not
    // the order they were written: report in source order.
    errors[first_error..].sort_by_key(|e| e.position);
    header
}

struct Parser<'a> {
    origin: Arc<str>,
    text: &'a str,
    lines: LineIndex,
    errors: &'a mut Vec<PolicyError>,
}

/// An allow or deny list as written.
struct RightsList {
    allow: bool,
    rights: RightSet,
    key: Range<usize>,
}

impl<'a> Parser<'a> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let position = self.lines.position(self.text, span.start);
        self.errors
            .push(PolicyError::at_position(&self.origin, position, message));
    }

    fn document(&mut self, rules: &mut Vec<Rule>) -> FileHeader {
        let mut header = FileHeader::default();
        let (doc, syntax) = DeTable::parse_recoverable(self.text);
        if !syntax.is_empty() {
            // The recovered tree may be half a document: report only what
            // the TOML parser found.
            for error in syntax {
                let at = error.span().map_or(0, |s| s.start);
                self.error(at..at, format!("TOML syntax: {}", error.message()));
            }
            return header;
        }
        for (key, value) in doc.get_ref().iter() {
            match key.get_ref().as_ref() {
                "rule" => match value.get_ref() {
                    DeValue::Array(items) => {
                        for item in items.iter() {
                            match item.get_ref() {
                                DeValue::Table(table) => {
                                    if let Some(rule) = self.rule(item.span(), table, rules.len()) {
                                        rules.push(rule);
                                    }
                                }
                                _ => self.error(item.span(), "each rule must be a table"),
                            }
                        }
                    }
                    _ => self.error(
                        value.span(),
                        "`rule` must be an array of tables: write `[[rule]]`",
                    ),
                },
                "builtin" => header.builtin = self.boolean(value, "builtin"),
                other => self.error(
                    key.span(),
                    format!("unknown key `{other}` (expected `rule` or `builtin`)"),
                ),
            }
        }
        header
    }

    /// One `[[rule]]` table; `header` is the span of its `[[rule]]` line.
    fn rule(&mut self, header: Range<usize>, table: &DeTable<'_>, index: usize) -> Option<Rule> {
        let errors_before = self.errors.len();
        let mut list: Option<RightsList> = None;
        let mut list_key: Option<Range<usize>> = None;
        let mut subject: Option<(Selector, Range<usize>)> = None;
        let mut peer: Option<(PeerSel, Range<usize>)> = None;
        let mut name: Option<(NamePattern, Range<usize>)> = None;
        let mut member: Option<(Box<str>, Range<usize>)> = None;
        let mut max_bytes: Option<(u64, Range<usize>)> = None;
        let mut path: Option<(PathPrefix, Range<usize>)> = None;
        let mut access: Option<(FileAccess, Range<usize>)> = None;

        for (key, value) in table.iter() {
            let k = key.get_ref().as_ref();
            let key_span = key.span();
            match k {
                "allow" | "deny" => {
                    let rights = self.rights(value);
                    if let Some(seen) = &list_key {
                        let later = if seen.start < key_span.start {
                            key_span.clone()
                        } else {
                            seen.clone()
                        };
                        self.error(later, "a rule has either `allow` or `deny`, not both");
                    } else if let Some(rights) = rights {
                        list = Some(RightsList {
                            allow: k == "allow",
                            rights,
                            key: key_span.clone(),
                        });
                    }
                    list_key = Some(key_span);
                }
                "subject" => {
                    if let Some(sel) = self.peer_sel(value, false) {
                        subject = Some((sel.sel, key_span));
                    }
                }
                "peer" => {
                    if let Some(sel) = self.peer_sel(value, true) {
                        peer = Some((sel, key_span));
                    }
                }
                "name" => {
                    if let Some(n) = self.name_pattern(value) {
                        name = Some((n, key_span));
                    }
                }
                "member" => {
                    if let Some(m) = self.member(value) {
                        member = Some((m, key_span));
                    }
                }
                "max-bytes" => {
                    if let Some(n) = self.integer(value, "max-bytes", u64::MAX.into()) {
                        max_bytes = Some((n as u64, key_span));
                    }
                }
                "path" => {
                    if let Some(p) = self.path(value) {
                        path = Some((p, key_span));
                    }
                }
                "access" => {
                    if let Some(a) = self.access(value) {
                        access = Some((a, key_span));
                    }
                }
                other => self.error(
                    key_span,
                    format!("unknown key `{other}` in rule (expected one of: {RULE_KEYS})"),
                ),
            }
        }

        if list_key.is_none() {
            self.error(
                header.clone(),
                "a rule needs `allow = [...]` or `deny = [...]`",
            );
        }
        if subject.is_none() && !table.iter().any(|(k, _)| k.get_ref() == "subject") {
            self.error(
                header.clone(),
                "a rule needs a `subject` (write `subject = { anyone = true }` for everyone)",
            );
        }

        // Qualifiers that do not fit every listed right.
        if let Some(list) = &list {
            let rights = list.rights;
            let misfit = |fits: fn(Right) -> bool| rights.iter().find(|&r| !fits(r));
            if let Some((_, span)) = &name {
                if let Some(r) = misfit(Right::takes_name) {
                    self.error(
                        span.clone(),
                        format!("`name` does not apply to {} rules", r.as_str()),
                    );
                }
            }
            if let Some((_, span)) = &member {
                if let Some(r) = misfit(|r| matches!(r, Right::Talk | Right::Receive)) {
                    self.error(
                        span.clone(),
                        format!(
                            "`member` applies only to talk and receive rules, not {}",
                            r.as_str()
                        ),
                    );
                }
            }
            if let Some((_, span)) = &peer {
                if let Some(r) = misfit(Right::takes_peer) {
                    self.error(
                        span.clone(),
                        format!("`peer` does not apply to {} rules", r.as_str()),
                    );
                }
            }
            if let Some((_, span)) = &max_bytes {
                if let Some(r) = misfit(|r| r == Right::Memfd) {
                    self.error(
                        span.clone(),
                        format!(
                            "`max-bytes` applies only to memfd rules, not {}",
                            r.as_str()
                        ),
                    );
                } else if !list.allow {
                    self.error(
                        span.clone(),
                        "`max-bytes` belongs in an allow rule (deny memfd already means 0 bytes)",
                    );
                }
            }
            for (what, span) in [
                ("path", path.as_ref().map(|p| &p.1)),
                ("access", access.as_ref().map(|a| &a.1)),
            ] {
                if let Some(span) = span {
                    if let Some(r) = misfit(|r| r == Right::File) {
                        self.error(
                            span.clone(),
                            format!("`{what}` applies only to file rules, not {}", r.as_str()),
                        );
                    }
                }
            }
            if rights.contains(Right::File) {
                if path.is_none() && !table.iter().any(|(k, _)| k.get_ref() == "path") {
                    self.error(list.key.clone(), "file rules need `path = \"/some/dir\"`");
                }
                if access.is_none() && !table.iter().any(|(k, _)| k.get_ref() == "access") {
                    self.error(
                        list.key.clone(),
                        "file rules need `access = [\"read\", \"write\", \"create\"]` (any of them)",
                    );
                }
            }
        }

        if self.errors.len() != errors_before {
            return None;
        }
        let list = list?;
        let (subject, _) = subject?;
        let peer = peer.map(|(p, _)| p);
        let who = subject.weight() + peer.as_ref().map_or(0, PeerSel::weight);
        let (line, column) = self.lines.position(self.text, header.start);
        let mut rule = Rule {
            allow: list.allow,
            rights: list.rights,
            subject,
            peer,
            name: name.map_or(NamePattern::Any, |(n, _)| n),
            member: member.map(|(m, _)| m),
            max_bytes: max_bytes.map(|(n, _)| n),
            path: path.map(|(p, _)| p),
            access: access.map(|(a, _)| a).unwrap_or_default(),
            who,
            info: Arc::new(RuleInfo {
                index,
                origin: Arc::clone(&self.origin),
                line,
                column,
                text: String::new(),
            }),
        };
        let text = rule.render();
        Arc::get_mut(&mut rule.info)
            .expect("rule info not shared yet")
            .text = text;
        Some(rule)
    }

    fn rights(&mut self, value: &Value<'_>) -> Option<RightSet> {
        let items = self.string_list(value, "rights")?;
        if items.is_empty() {
            self.error(value.span(), "empty list of rights");
            return None;
        }
        let mut set = RightSet::default();
        let mut ok = true;
        for (text, span) in items {
            match Right::parse(&text) {
                Some(right) => {
                    if !set.insert(right) {
                        self.error(span, format!("right `{text}` listed twice"));
                        ok = false;
                    }
                }
                None => {
                    self.error(
                        span,
                        format!(
                            "unknown right `{text}` (expected one of: {})",
                            Right::ALL.map(Right::as_str).join(", ")
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(set)
    }

    /// A string or an array of strings.
    fn string_list(
        &mut self,
        value: &Value<'_>,
        what: &str,
    ) -> Option<Vec<(String, Range<usize>)>> {
        match value.get_ref() {
            DeValue::String(s) => Some(vec![(s.to_string(), value.span())]),
            DeValue::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items.iter() {
                    match item.get_ref() {
                        DeValue::String(s) => out.push((s.to_string(), item.span())),
                        other => {
                            self.error(
                                item.span(),
                                format!("{what}: expected a string, found {}", other.type_str()),
                            );
                            return None;
                        }
                    }
                }
                Some(out)
            }
            other => {
                self.error(
                    value.span(),
                    format!(
                        "{what}: expected a list of strings, found {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    fn string<'v>(&mut self, value: &'v Value<'_>, key: &str) -> Option<&'v str> {
        match value.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            other => {
                self.error(
                    value.span(),
                    format!("`{key}`: expected a string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn boolean(&mut self, value: &Value<'_>, key: &str) -> Option<bool> {
        match value.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            other => {
                self.error(
                    value.span(),
                    format!(
                        "`{key}`: expected true or false, found {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    /// A non-negative integer up to `max`.
    fn integer(&mut self, value: &Value<'_>, key: &str, max: u128) -> Option<u128> {
        let DeValue::Integer(n) = value.get_ref() else {
            self.error(
                value.span(),
                format!(
                    "`{key}`: expected an integer, found {}",
                    value.get_ref().type_str()
                ),
            );
            return None;
        };
        let digits = n.as_str().strip_prefix('+').unwrap_or(n.as_str());
        match u128::from_str_radix(digits, n.radix()) {
            Ok(v) if v <= max => Some(v),
            _ => {
                self.error(
                    value.span(),
                    format!("`{key}` must be an integer from 0 to {max}"),
                );
                None
            }
        }
    }

    /// The byte offset in the source of byte `offset` of the string value at
    /// `span`, when the string is written literally (no escapes); else the
    /// start of the value.
    fn offset_in_string(&self, span: &Range<usize>, value: &str, offset: usize) -> usize {
        let raw = &self.text[span.clone()];
        let quoted = raw.len() == value.len() + 2
            && (raw.starts_with('"') || raw.starts_with('\''))
            && &raw[1..raw.len() - 1] == value;
        if quoted {
            span.start + 1 + offset
        } else {
            span.start
        }
    }

    /// A string value that `check` turns into a `T`; its error (a byte
    /// offset into the string and a message) is reported at that character
    /// of the value.
    fn checked_string<T>(
        &mut self,
        value: &Value<'_>,
        key: &str,
        check: impl FnOnce(&str) -> Result<T, (usize, String)>,
    ) -> Option<T> {
        let text = self.string(value, key)?;
        match check(text) {
            Ok(checked) => Some(checked),
            Err((offset, message)) => {
                let at = self.offset_in_string(&value.span(), text, offset);
                self.error(at..at, format!("`{key}`: {message}"));
                None
            }
        }
    }

    fn glob(&mut self, value: &Value<'_>, key: &str) -> Option<Glob> {
        self.checked_string(value, key, |text| {
            Glob::new(text).map_err(|e| (e.offset, e.message))
        })
    }

    /// A `subject` or `peer` table. Relations are accepted only for `peer`.
    fn peer_sel(&mut self, value: &Value<'_>, is_peer: bool) -> Option<PeerSel> {
        let what = if is_peer { "peer" } else { "subject" };
        let DeValue::Table(table) = value.get_ref() else {
            self.error(
                value.span(),
                format!(
                    "`{what}` must be a table, e.g. `{what} = {{ uid = 1000 }}`, found {}",
                    value.get_ref().type_str()
                ),
            );
            return None;
        };
        let errors_before = self.errors.len();
        let mut out = PeerSel::default();
        let mut anyone: Option<Range<usize>> = None;
        let mut host_span: Option<Range<usize>> = None;
        let mut container_span: Option<Range<usize>> = None;
        for (key, v) in table.iter() {
            let sel = &mut out.sel;
            match key.get_ref().as_ref() {
                "anyone" => {
                    if let Some(b) = self.boolean(v, "anyone") {
                        if b {
                            anyone = Some(key.span());
                        } else {
                            self.error(
                                v.span(),
                                "`anyone = false` matches nobody: leave the rule out instead",
                            );
                        }
                    }
                }
                "uid" => sel.uid = self.integer(v, "uid", u32::MAX.into()).map(|n| n as u32),
                "gid" => sel.gid = self.integer(v, "gid", u32::MAX.into()).map(|n| n as u32),
                "label" => sel.label = self.glob(v, "label"),
                "listener" => sel.listener = self.glob(v, "listener"),
                "host" => {
                    sel.host = self.boolean(v, "host");
                    host_span = Some(key.span());
                }
                "container" => {
                    sel.container = self.container(v);
                    container_span = Some(key.span());
                }
                "same-uid" if is_peer => out.same_uid = self.boolean(v, "same-uid"),
                "same-container" if is_peer => {
                    out.same_container = self.boolean(v, "same-container");
                }
                "same-uid" | "same-container" => self.error(
                    key.span(),
                    format!(
                        "`{}` is a relation to the other party: put it in `peer`",
                        key.get_ref()
                    ),
                ),
                other => self.error(
                    key.span(),
                    format!(
                        "unknown key `{other}` in {what} (expected one of: {})",
                        if is_peer { PEER_KEYS } else { SELECTOR_KEYS }
                    ),
                ),
            }
        }
        if let (Some(_), Some(span)) = (&host_span, &container_span) {
            self.error(
                span.clone(),
                "`container` cannot be combined with `host` (a container is never the host; \
                 `container = {}` alone means any container)",
            );
        }
        if self.errors.len() != errors_before {
            return None;
        }
        let weight = out.weight();
        match anyone {
            Some(span) if weight > 0 => {
                self.error(
                    span,
                    "`anyone = true` cannot be combined with other conditions",
                );
                None
            }
            None if weight == 0 => {
                self.error(
                    value.span(),
                    format!("empty {what}: write `{what} = {{ anyone = true }}` to match everyone"),
                );
                None
            }
            _ => Some(out),
        }
    }

    fn container(&mut self, value: &Value<'_>) -> Option<ContainerSel> {
        let DeValue::Table(table) = value.get_ref() else {
            self.error(
                value.span(),
                "`container` must be a table, e.g. `container = { runtime = \"docker\", id = \"4f2a*\" }`",
            );
            return None;
        };
        let mut out = ContainerSel::default();
        let mut ok = true;
        for (key, v) in table.iter() {
            match key.get_ref().as_ref() {
                "runtime" => match self.string(v, "runtime") {
                    Some(text) => match parse_runtime(text) {
                        Some(r) => out.runtime = Some(r),
                        None if text == "host" => {
                            self.error(
                                v.span(),
                                "runtime \"host\" is not a container: use `host = true`",
                            );
                            ok = false;
                        }
                        None => {
                            self.error(
                                v.span(),
                                format!(
                                    "unknown runtime {text:?} (expected one of: {})",
                                    container_runtime_names()
                                ),
                            );
                            ok = false;
                        }
                    },
                    None => ok = false,
                },
                "id" => {
                    out.id = self.glob(v, "id");
                    ok &= out.id.is_some();
                }
                "pod" => {
                    out.pod = self.glob(v, "pod");
                    ok &= out.pod.is_some();
                }
                other => {
                    self.error(
                        key.span(),
                        format!("unknown key `{other}` in container (expected runtime, id, pod)"),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn name_pattern(&mut self, value: &Value<'_>) -> Option<NamePattern> {
        self.checked_string(value, "name", parse_name_pattern)
    }

    fn member(&mut self, value: &Value<'_>) -> Option<Box<str>> {
        self.checked_string(value, "member", |text| {
            check_member(text).map(|()| text.into())
        })
    }

    fn path(&mut self, value: &Value<'_>) -> Option<PathPrefix> {
        self.checked_string(value, "path", parse_path_prefix)
    }

    fn access(&mut self, value: &Value<'_>) -> Option<FileAccess> {
        let items = self.string_list(value, "access")?;
        if items.is_empty() {
            self.error(value.span(), "`access`: empty list");
            return None;
        }
        let mut access = FileAccess::default();
        let mut ok = true;
        for (text, span) in items {
            let slot = match text.as_str() {
                "read" => &mut access.read,
                "write" => &mut access.write,
                "create" => &mut access.create,
                other => {
                    self.error(
                        span,
                        format!("unknown access `{other}` (expected read, write, create)"),
                    );
                    ok = false;
                    continue;
                }
            };
            if *slot {
                self.error(span, format!("access `{text}` listed twice"));
                ok = false;
            }
            *slot = true;
        }
        ok.then_some(access)
    }
}

/// A container runtime by its policy-file name (the identity crate's
/// [`ContainerRuntime::as_str`]); `host` is not one.
pub(crate) fn parse_runtime(text: &str) -> Option<ContainerRuntime> {
    ContainerRuntime::from_name(text).filter(|runtime| runtime.is_container())
}

/// The names [`parse_runtime`] knows, comma-separated, for "unknown
/// runtime" messages.
pub(crate) fn container_runtime_names() -> String {
    ContainerRuntime::list_names(
        ContainerRuntime::ALL
            .into_iter()
            .filter(|runtime| runtime.is_container()),
    )
}

/// A name-grammar error from the proto crate as the parser reports it: the
/// byte offset into the checked text and the rule broken.
fn located(error: LocatedNameError) -> (usize, String) {
    (error.offset, error.reason.to_owned())
}

/// The message for a `*` or `?` anywhere but a trailing `.*`.
const NAME_PATTERN_SHAPE: &str = "a name is `*`, an exact name, or a prefix ending in `.*`";

/// `*`, `org.example.*` or `org.example.Foo`; errors carry a byte offset
/// into `text`. Wildcards are the policy's syntax and are handled here;
/// the name grammar itself is the proto crate's ([`WellKnownName`]).
pub(crate) fn parse_name_pattern(text: &str) -> Result<NamePattern, (usize, String)> {
    if text == "*" {
        return Ok(NamePattern::Any);
    }
    if text.starts_with(':') {
        return Err((
            0,
            "unique names are assigned by the bus; rules name well-known names".into(),
        ));
    }
    let (name, is_prefix) = match text.strip_suffix(".*") {
        Some(prefix) => (prefix, true),
        None => (text, false),
    };
    if let Some(at) = name.find(['*', '?']) {
        return Err((at, NAME_PATTERN_SHAPE.into()));
    }
    if is_prefix {
        let depth = WellKnownName::check_prefix(name).map_err(located)?;
        Ok(NamePattern::Prefix {
            prefix: name.into(),
            depth,
        })
    } else {
        WellKnownName::check_located(name).map_err(located)?;
        Ok(NamePattern::Exact(name.into()))
    }
}

/// A member name, as the proto crate's [`MemberName`] defines it; `*` is
/// refused with a hint (leaving `member` out matches every member).
fn check_member(text: &str) -> Result<(), (usize, String)> {
    if text == "*" {
        return Err((0, "leave `member` out to match every member".into()));
    }
    MemberName::check_located(text).map(drop).map_err(located)
}

/// An absolute path prefix; repeated and trailing slashes are folded, `.`
/// and `..` components are refused.
pub(crate) fn parse_path_prefix(text: &str) -> Result<PathPrefix, (usize, String)> {
    if !text.starts_with('/') {
        return Err((0, "must be an absolute path".into()));
    }
    let mut normalized = String::with_capacity(text.len());
    let mut depth = 0;
    let mut offset = 0;
    for component in text.split('/') {
        match component {
            "" => {}
            "." | ".." => {
                return Err((
                    offset,
                    format!("`{component}` components are not allowed; write the path out"),
                ))
            }
            c if c.contains('\0') => return Err((offset, "NUL byte in path".into())),
            c => {
                normalized.push('/');
                normalized.push_str(c);
                depth += 1;
            }
        }
        offset += component.len() + 1;
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    Ok(PathPrefix {
        normalized: normalized.into(),
        depth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_name_pattern("*").unwrap(), NamePattern::Any);
        assert_eq!(
            parse_name_pattern("org.example.*").unwrap(),
            NamePattern::Prefix {
                prefix: "org.example".into(),
                depth: 2
            }
        );
        assert_eq!(
            parse_name_pattern("org.*").unwrap(),
            NamePattern::Prefix {
                prefix: "org".into(),
                depth: 1
            }
        );
        assert_eq!(
            parse_name_pattern("org.example.Foo").unwrap(),
            NamePattern::Exact("org.example.Foo".into())
        );
        assert_eq!(parse_name_pattern("org").unwrap_err().0, 0);
        assert_eq!(parse_name_pattern("org.ex*").unwrap_err().0, 6);
        assert_eq!(parse_name_pattern("org.*.Foo").unwrap_err().0, 4);
        assert_eq!(parse_name_pattern("org..Foo").unwrap_err().0, 4);
        assert_eq!(parse_name_pattern("org.9x").unwrap_err().0, 4);
        assert_eq!(parse_name_pattern("org.e x").unwrap_err().0, 5);
        assert_eq!(parse_name_pattern(":1.2").unwrap_err().0, 0);
        // The proto crate's reasons come through.
        assert_eq!(
            parse_name_pattern("org.e x").unwrap_err().1,
            "has a character outside A-Z a-z 0-9 _ -"
        );
        assert_eq!(
            parse_name_pattern("org").unwrap_err().1,
            "needs at least two dot-separated elements"
        );
        // A prefix may have one element; the pattern fits in 255 bytes.
        let longest = format!("{}.*", "a".repeat(253));
        assert!(parse_name_pattern(&longest).is_ok());
        assert!(parse_name_pattern(&format!("a{longest}")).is_err());
        // Names may have `-`, members may not.
        assert_eq!(
            parse_name_pattern("org.my-app.Foo").unwrap(),
            NamePattern::Exact("org.my-app.Foo".into())
        );
    }

    #[test]
    fn runtimes() {
        // The list in messages is what the parser knows, by the names the
        // identity crate prints.
        let names = container_runtime_names();
        assert_eq!(
            names,
            "docker, podman, containerd, crio, lxc, nspawn, unknown"
        );
        for name in names.split(", ") {
            assert_eq!(
                parse_runtime(name).map(ContainerRuntime::as_str),
                Some(name)
            );
        }
        assert_eq!(parse_runtime("host"), None);
        assert_eq!(parse_runtime("rkt"), None);
    }

    #[test]
    fn members() {
        check_member("Get").unwrap();
        check_member("org.example.Get_2").unwrap();
        assert_eq!(check_member("Get-x").unwrap_err().0, 3);
        assert_eq!(check_member("a.2b").unwrap_err().0, 2);
        assert_eq!(check_member("a..b").unwrap_err().0, 2);
        assert_eq!(check_member("").unwrap_err().0, 0);
        assert!(check_member("*").is_err());
    }

    #[test]
    fn paths() {
        let p = parse_path_prefix("/srv//data/").unwrap();
        assert_eq!(&*p.normalized, "/srv/data");
        assert_eq!(p.depth, 2);
        let root = parse_path_prefix("/").unwrap();
        assert_eq!(&*root.normalized, "/");
        assert_eq!(root.depth, 0);
        assert_eq!(parse_path_prefix("srv").unwrap_err().0, 0);
        assert_eq!(parse_path_prefix("/srv/../etc").unwrap_err().0, 5);
        assert_eq!(parse_path_prefix("/srv/./x").unwrap_err().0, 5);
    }
}
