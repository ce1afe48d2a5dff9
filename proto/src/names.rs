//! Validated names: bus names (well-known and unique), member names, object
//! paths and error names.
//!
//! Rules (all ASCII, checked by `TryFrom<&str>`/`TryFrom<String>`):
//!
//! * **Well-known name** (`org.example.Echo`): 3 to 255 bytes, two or more
//!   dot-separated elements, each element non-empty, made of `A-Z a-z 0-9 _ -`
//!   and not starting with a digit. `org.pbus.Bus` is the bus itself.
//! * **Unique name** (`:1.42`): assigned by the daemon; a `:` followed by two
//!   or more dot-separated elements of `A-Z a-z 0-9 _ -` (digits allowed first).
//! * **Member name** (`Echo`, `org.example.Echo.Say`): 1 to 255 bytes, one or
//!   more dot-separated elements, each `[A-Za-z_][A-Za-z0-9_]*`.
//! * **Object path** (`/`, `/org/example/echo`): starts with `/`, at most 1024
//!   bytes, elements of `A-Z a-z 0-9 _ - .` separated by single `/`, no
//!   trailing `/` except the root path.
//! * **Error name** (`org.pbus.Error.Timeout`): like a member name but with at
//!   least two elements.
//!
//! Each type has an `from_unchecked` escape hatch for values the daemon itself
//! produced; it is named so that misuse is visible in review.
//!
//! This module is the one implementation of the name grammar: the policy
//! parser checks the names and name prefixes of its rules with
//! [`WellKnownName::check_located`], [`WellKnownName::check_prefix`] and
//! [`MemberName::check_located`], which say where in the text a name breaks
//! a rule (wildcards in rule patterns are the policy's own syntax).

use std::fmt;

/// Longest bus, member or error name.
pub const MAX_NAME_LEN: usize = 255;
/// Longest object path.
pub const MAX_PATH_LEN: usize = 1024;

/// Why a string is not a valid name of the kind asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct NameError {
    /// Which kind of name was expected.
    pub kind: &'static str,
    /// The offending value (truncated to 64 chars).
    pub value: String,
    /// What rule it broke.
    pub reason: &'static str,
}

impl NameError {
    fn new(kind: &'static str, value: &str, reason: &'static str) -> Self {
        Self {
            kind,
            value: value.chars().take(64).collect(),
            reason,
        }
    }
}

fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

fn is_member_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Where and why a text breaks the name grammar: the located form of a
/// [`NameError`], for tools that point at the offending character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocatedNameError {
    /// Byte offset into the text checked of the first problem.
    pub offset: usize,
    /// What rule it broke (the same text as [`NameError::reason`]).
    pub reason: &'static str,
}

impl LocatedNameError {
    fn at(offset: usize, reason: &'static str) -> Self {
        Self { offset, reason }
    }

    /// The unlocated error about `value` as a `kind`.
    fn into_name_error(self, kind: &'static str, value: &str) -> NameError {
        NameError::new(kind, value, self.reason)
    }
}

/// The checks every dotted name shares: not empty, at most
/// [`MAX_NAME_LEN`] bytes.
fn check_name_len(value: &str) -> Result<(), LocatedNameError> {
    if value.is_empty() {
        return Err(LocatedNameError::at(0, "empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(LocatedNameError::at(MAX_NAME_LEN, "longer than 255 bytes"));
    }
    Ok(())
}

/// Checks the dot-separated elements of a well-known, member or error name:
/// each non-empty, not starting with a digit and made of `allowed`
/// characters (`allowed_text` says which), and at least `min_elements`
/// of them. Returns the number of elements.
fn check_elements(
    value: &str,
    allowed: fn(u8) -> bool,
    allowed_text: &'static str,
    min_elements: u32,
) -> Result<u32, LocatedNameError> {
    let mut elements = 0;
    let mut offset = 0;
    for element in value.split('.') {
        elements += 1;
        let bytes = element.as_bytes();
        if bytes.is_empty() {
            return Err(LocatedNameError::at(offset, "has an empty element"));
        }
        if bytes[0].is_ascii_digit() {
            return Err(LocatedNameError::at(
                offset,
                "has an element starting with a digit",
            ));
        }
        if let Some(at) = bytes.iter().position(|&c| !allowed(c)) {
            return Err(LocatedNameError::at(offset + at, allowed_text));
        }
        offset += element.len() + 1;
    }
    if elements < min_elements {
        return Err(LocatedNameError::at(
            0,
            "needs at least two dot-separated elements",
        ));
    }
    Ok(elements)
}

/// Refuses a leading `:`: unique names are not well-known names.
fn check_not_unique(value: &str) -> Result<(), LocatedNameError> {
    if value.starts_with(':') {
        return Err(LocatedNameError::at(
            0,
            "starts with ':' (unique names are assigned by the bus)",
        ));
    }
    Ok(())
}

/// The elements of a well-known name or of a prefix of one.
fn check_well_known_elements(value: &str, min_elements: u32) -> Result<u32, LocatedNameError> {
    check_elements(
        value,
        is_name_char,
        "has a character outside A-Z a-z 0-9 _ -",
        min_elements,
    )
}

fn check_well_known_located(value: &str) -> Result<u32, LocatedNameError> {
    check_name_len(value)?;
    check_not_unique(value)?;
    check_well_known_elements(value, 2)
}

fn check_well_known(kind: &'static str, value: &str) -> Result<(), NameError> {
    check_well_known_located(value)
        .map(drop)
        .map_err(|e| e.into_name_error(kind, value))
}

fn check_unique(kind: &'static str, value: &str) -> Result<(), NameError> {
    let Some(rest) = value.strip_prefix(':') else {
        return Err(NameError::new(kind, value, "does not start with ':'"));
    };
    if value.len() > MAX_NAME_LEN {
        return Err(NameError::new(kind, value, "longer than 255 bytes"));
    }
    let mut elements = 0;
    for element in rest.split('.') {
        elements += 1;
        if element.is_empty() || !element.bytes().all(is_name_char) {
            return Err(NameError::new(
                kind,
                value,
                "has an empty or invalid element",
            ));
        }
    }
    if elements < 2 {
        return Err(NameError::new(
            kind,
            value,
            "needs at least two dot-separated elements",
        ));
    }
    Ok(())
}

fn check_member_located(value: &str) -> Result<u32, LocatedNameError> {
    check_name_len(value)?;
    check_elements(
        value,
        is_member_char,
        "has a character outside A-Z a-z 0-9 _",
        1,
    )
}

fn check_member(kind: &'static str, value: &str) -> Result<(), NameError> {
    check_member_located(value)
        .map(drop)
        .map_err(|e| e.into_name_error(kind, value))
}

fn check_error_name(kind: &'static str, value: &str) -> Result<(), NameError> {
    check_name_len(value)
        .and_then(|()| {
            check_elements(
                value,
                is_member_char,
                "has a character outside A-Z a-z 0-9 _",
                2,
            )
        })
        .map(drop)
        .map_err(|e| e.into_name_error(kind, value))
}

fn check_path(kind: &'static str, value: &str) -> Result<(), NameError> {
    if !value.starts_with('/') {
        return Err(NameError::new(kind, value, "does not start with '/'"));
    }
    if value.len() > MAX_PATH_LEN {
        return Err(NameError::new(kind, value, "longer than 1024 bytes"));
    }
    if value == "/" {
        return Ok(());
    }
    for element in value[1..].split('/') {
        if element.is_empty() {
            return Err(NameError::new(
                kind,
                value,
                "has an empty element or a trailing '/'",
            ));
        }
        if !element.bytes().all(|c| is_name_char(c) || c == b'.') {
            return Err(NameError::new(
                kind,
                value,
                "has a character outside A-Z a-z 0-9 _ - .",
            ));
        }
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Wraps a value without validating it. Only for values the bus
            /// itself produced or already validated.
            pub fn from_unchecked(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The name as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl $name {
            /// Checks `value` against this kind's rules without allocating.
            pub fn validate(value: &str) -> Result<(), NameError> {
                $check($kind, value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = NameError;
            fn try_from(value: &str) -> Result<Self, NameError> {
                Self::validate(value)?;
                Ok(Self(value.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                Self::validate(&value)?;
                Ok(Self(value))
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(value: &str) -> Result<Self, NameError> {
                Self::try_from(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A well-known bus name such as `org.example.Echo`.
    WellKnownName,
    "well-known name",
    check_well_known
);
name_type!(
    /// A unique connection name such as `:1.42`, assigned by the daemon.
    UniqueName,
    "unique name",
    check_unique
);
name_type!(
    /// A method or signal name such as `Echo` or `org.example.Echo.Say`.
    MemberName,
    "member name",
    check_member
);
name_type!(
    /// An object path or topic such as `/org/example/echo`.
    ObjectPath,
    "object path",
    check_path
);
name_type!(
    /// An error name such as `org.pbus.Error.Timeout`.
    ErrorName,
    "error name",
    check_error_name
);

impl WellKnownName {
    /// Checks `value` like [`validate`](Self::validate), but says where
    /// the first problem is; on success, the number of elements.
    pub fn check_located(value: &str) -> Result<u32, LocatedNameError> {
        check_well_known_located(value)
    }

    /// Checks `prefix` as the leading elements of well-known names (the
    /// `org.example` of a policy pattern `org.example.*`): one or more
    /// elements of the well-known grammar, short enough that some name
    /// extends it, not a unique name. On success, the number of elements.
    pub fn check_prefix(prefix: &str) -> Result<u32, LocatedNameError> {
        check_name_len(prefix)?;
        // Room for `.x`: the shortest name under the prefix.
        if prefix.len() > MAX_NAME_LEN - 2 {
            return Err(LocatedNameError::at(
                MAX_NAME_LEN - 2,
                "too long for any name under it to fit in 255 bytes",
            ));
        }
        check_not_unique(prefix)?;
        check_well_known_elements(prefix, 1)
    }
}

impl MemberName {
    /// Checks `value` like [`validate`](Self::validate), but says where
    /// the first problem is; on success, the number of elements.
    pub fn check_located(value: &str) -> Result<u32, LocatedNameError> {
        check_member_located(value)
    }
}

impl UniqueName {
    /// The unique name the daemon gives connection number `id`: `:1.<id>`.
    pub fn from_id(id: u64) -> Self {
        Self(format!(":1.{id}"))
    }

    /// The connection number of a name the daemon assigned (`:1.<id>`).
    pub fn id(&self) -> Option<u64> {
        self.0.strip_prefix(":1.")?.parse().ok()
    }
}

/// Either kind of bus name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BusName {
    /// `org.example.Echo`
    WellKnown(WellKnownName),
    /// `:1.42`
    Unique(UniqueName),
}

impl BusName {
    /// Checks `value` as a unique or well-known name without allocating.
    pub fn validate(value: &str) -> Result<(), NameError> {
        if value.starts_with(':') {
            UniqueName::validate(value)
        } else {
            WellKnownName::validate(value).map_err(|e| NameError {
                kind: "bus name",
                ..e
            })
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        match self {
            Self::WellKnown(name) => name.as_str(),
            Self::Unique(name) => name.as_str(),
        }
    }
}

impl TryFrom<&str> for BusName {
    type Error = NameError;
    fn try_from(value: &str) -> Result<Self, NameError> {
        if value.starts_with(':') {
            UniqueName::try_from(value).map(Self::Unique)
        } else {
            WellKnownName::try_from(value)
                .map(Self::WellKnown)
                .map_err(|e| NameError {
                    kind: "bus name",
                    ..e
                })
        }
    }
}

impl std::str::FromStr for BusName {
    type Err = NameError;
    fn from_str(value: &str) -> Result<Self, NameError> {
        Self::try_from(value)
    }
}

impl fmt::Display for BusName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_names() {
        for ok in [
            "org.example.Echo",
            "a.b",
            "com.example-1._x",
            "org.pbus.Bus",
        ] {
            WellKnownName::try_from(ok).unwrap();
        }
        let long = format!("a.{}", "b".repeat(254));
        for bad in [
            "",
            "org",
            ".org.x",
            "org..x",
            "org.x.",
            "org.1x",
            ":1.2",
            "org.ex ample",
            "org.é.x",
            &long,
        ] {
            assert!(WellKnownName::try_from(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unique_names() {
        let name = UniqueName::from_id(42);
        assert_eq!(name.as_str(), ":1.42");
        assert_eq!(name.id(), Some(42));
        UniqueName::try_from(":1.42").unwrap();
        for bad in ["1.42", ":", ":1", ":1..2", ":1.a b"] {
            assert!(UniqueName::try_from(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            BusName::try_from(":1.5").unwrap(),
            BusName::Unique(_)
        ));
        assert!(matches!(
            BusName::try_from("a.b").unwrap(),
            BusName::WellKnown(_)
        ));
        assert_eq!(BusName::try_from("nodots").unwrap_err().kind, "bus name");
    }

    #[test]
    fn member_names() {
        for ok in ["Echo", "_x", "org.example.Echo.Say", "A1"] {
            MemberName::try_from(ok).unwrap();
        }
        for bad in ["", "1x", "a..b", "a-b", "a.", "with space"] {
            assert!(MemberName::try_from(bad).is_err(), "{bad:?} accepted");
        }
        ErrorName::try_from("org.pbus.Error.Timeout").unwrap();
        assert!(ErrorName::try_from("Timeout").is_err());
    }

    #[test]
    fn each_kind_reports_its_own_rule() {
        let reason = |error: NameError| (error.kind, error.reason);
        assert_eq!(
            reason(WellKnownName::try_from("org.ex ample").unwrap_err()),
            ("well-known name", "has a character outside A-Z a-z 0-9 _ -")
        );
        assert_eq!(
            reason(WellKnownName::try_from(":1.2").unwrap_err()),
            (
                "well-known name",
                "starts with ':' (unique names are assigned by the bus)"
            )
        );
        assert_eq!(
            reason(MemberName::try_from("a-b").unwrap_err()),
            ("member name", "has a character outside A-Z a-z 0-9 _")
        );
        assert_eq!(
            reason(MemberName::try_from("x.1a").unwrap_err()),
            ("member name", "has an element starting with a digit")
        );
        assert_eq!(
            reason(ErrorName::try_from("Timeout").unwrap_err()),
            ("error name", "needs at least two dot-separated elements")
        );
        assert_eq!(
            reason(ErrorName::try_from("").unwrap_err()),
            ("error name", "empty")
        );
        assert_eq!(
            reason(MemberName::validate(&"m".repeat(256)).unwrap_err()),
            ("member name", "longer than 255 bytes")
        );
        assert_eq!(
            reason(ObjectPath::try_from(String::from("/a//b")).unwrap_err()),
            ("object path", "has an empty element or a trailing '/'")
        );
        assert_eq!(
            reason(UniqueName::try_from(":1").unwrap_err()),
            ("unique name", "needs at least two dot-separated elements")
        );
    }

    #[test]
    fn located_errors_point_at_the_offending_byte() {
        let at = |result: Result<u32, LocatedNameError>| result.unwrap_err().offset;
        assert_eq!(WellKnownName::check_located("org.example.Foo"), Ok(3));
        assert_eq!(at(WellKnownName::check_located("org..Foo")), 4);
        assert_eq!(at(WellKnownName::check_located("org.9x")), 4);
        assert_eq!(at(WellKnownName::check_located("org.e x")), 5);
        assert_eq!(at(WellKnownName::check_located(":1.2")), 0);
        assert_eq!(
            WellKnownName::check_located("org").unwrap_err(),
            LocatedNameError {
                offset: 0,
                reason: "needs at least two dot-separated elements"
            }
        );
        assert_eq!(MemberName::check_located("org.example.Get_2"), Ok(3));
        assert_eq!(at(MemberName::check_located("Get-x")), 3);
        assert_eq!(at(MemberName::check_located("a.2b")), 2);
        assert_eq!(at(MemberName::check_located(&"m".repeat(256))), 255);
    }

    #[test]
    fn prefixes_may_have_one_element() {
        assert_eq!(WellKnownName::check_prefix("org"), Ok(1));
        assert_eq!(WellKnownName::check_prefix("org.my-app"), Ok(2));
        assert_eq!(WellKnownName::check_prefix("org.").unwrap_err().offset, 4);
        assert!(WellKnownName::check_prefix(":1").is_err());
        assert!(WellKnownName::check_prefix("").is_err());
        let longest = "a".repeat(MAX_NAME_LEN - 2);
        assert_eq!(WellKnownName::check_prefix(&longest), Ok(1));
        WellKnownName::try_from(format!("{longest}.x")).unwrap();
        assert!(WellKnownName::check_prefix(&format!("{longest}a")).is_err());
    }

    #[test]
    fn object_paths() {
        for ok in ["/", "/a", "/org/example/echo", "/a-b/c.d/_e"] {
            ObjectPath::try_from(ok).unwrap();
        }
        for bad in ["", "a", "/a/", "//", "/a//b", "/a b"] {
            assert!(ObjectPath::try_from(bad).is_err(), "{bad:?} accepted");
        }
    }
}
