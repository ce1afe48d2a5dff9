//! A tiny glob matcher for labels, container ids, pod UIDs and listener
//! paths.
//!
//! Only `*` (any run of characters, including none, `/` and `:`) and `?`
//! (exactly one character) are special. `[`, `]`, `{`, `}` and `\` are
//! reserved and rejected, so a pattern written for a richer glob dialect is
//! an error instead of a silent literal match. This module knows nothing
//! about rules or identities.

use std::fmt;

/// Characters that are not allowed in a pattern.
const RESERVED: &[char] = &['[', ']', '{', '}', '\\'];

/// Why a pattern is not a valid glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GlobError {
    /// Byte offset of the offending character in the pattern.
    pub offset: usize,
    /// What is wrong.
    pub message: String,
}

/// A compiled glob pattern.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Glob {
    /// No wildcard: plain equality.
    Exact(Box<str>),
    /// `text*` with no other wildcard: a prefix test.
    Prefix(Box<str>),
    /// Anything else: the general matcher.
    General(Box<str>),
}

impl Glob {
    /// Compiles `pattern`, rejecting reserved characters and empty patterns.
    pub fn new(pattern: &str) -> Result<Self, GlobError> {
        if pattern.is_empty() {
            return Err(GlobError {
                offset: 0,
                message: "empty pattern".into(),
            });
        }
        if let Some((offset, c)) = pattern.char_indices().find(|(_, c)| RESERVED.contains(c)) {
            return Err(GlobError {
                offset,
                message: format!("`{c}` is reserved in patterns (only `*` and `?` are wildcards)"),
            });
        }
        let wild = |c: char| c == '*' || c == '?';
        Ok(match pattern.find(wild) {
            None => Self::Exact(pattern.into()),
            Some(at) if at + 1 == pattern.len() && pattern.ends_with('*') => {
                Self::Prefix(pattern[..at].into())
            }
            Some(_) => Self::General(pattern.into()),
        })
    }

    /// True when `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        match self {
            Self::Exact(p) => **p == *text,
            Self::Prefix(p) => text.starts_with(&**p),
            Self::General(p) => wildcard_match(p.as_bytes(), text.as_bytes()),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> String {
        match self {
            Self::Exact(p) | Self::General(p) => p.to_string(),
            Self::Prefix(p) => format!("{p}*"),
        }
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.as_str())
    }
}

/// Length of the UTF-8 sequence starting with `lead` (1 for a stray
/// continuation byte, which cannot occur at the positions we ask about).
fn utf8_len(lead: u8) -> usize {
    match lead {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

/// Iterative `*`/`?` matching with single-star backtracking: linear in
/// practice, O(pattern * text) at worst, never exponential.
///
/// Works on bytes: a literal multi-byte character in the pattern matches the
/// same bytes in the text, and `?` and the star restart always step over a
/// whole character, so positions stay on character boundaries.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Position of the last star in the pattern and the text position it is
    // currently assumed to have consumed up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(b'?') => {
                p += 1;
                t += utf8_len(text[t]);
            }
            Some(&c) if c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    let next = st + utf8_len(text[st]);
                    star = Some((sp, next));
                    p = sp + 1;
                    t = next;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, text: &str) -> bool {
        Glob::new(pattern).unwrap().matches(text)
    }

    #[test]
    fn shapes() {
        assert_eq!(Glob::new("abc").unwrap(), Glob::Exact("abc".into()));
        assert_eq!(Glob::new("ab*").unwrap(), Glob::Prefix("ab".into()));
        assert_eq!(Glob::new("*").unwrap(), Glob::Prefix("".into()));
        assert!(matches!(Glob::new("a*b").unwrap(), Glob::General(_)));
        assert!(matches!(Glob::new("a?").unwrap(), Glob::General(_)));
    }

    #[test]
    fn matching() {
        assert!(m("abc", "abc"));
        assert!(!m("abc", "abcd"));
        assert!(m("ab*", "ab"));
        assert!(m("ab*", "abzz"));
        assert!(!m("ab*", "a"));
        assert!(m("*", ""));
        assert!(m("a*c", "abbbc"));
        assert!(m("a*c", "ac"));
        assert!(!m("a*c", "acb"));
        assert!(m(
            "*:container_t:*",
            "system_u:system_r:container_t:s0:c1,c2"
        ));
        assert!(!m("*:container_t:*", "system_u:system_r:spc_t:s0"));
        assert!(m("a?c", "abc"));
        assert!(m("a?c", "aéc"));
        assert!(!m("a?c", "ac"));
        assert!(m("*é*", "xxéyy"));
        assert!(m("/run/pbus/*.sock", "/run/pbus/containers/x.sock"));
        assert!(m("**a", "bba"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(!m("a*b*c", "aXbYbZ"));
        assert!(m("?*", "é"));
        assert!(!m("??", "é"));
    }

    #[test]
    fn errors() {
        assert_eq!(Glob::new("").unwrap_err().offset, 0);
        let e = Glob::new("ab[0-9]").unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(e.message.contains("reserved"));
        assert_eq!(Glob::new("x{a,b}").unwrap_err().offset, 1);
        assert_eq!(Glob::new("a\\*").unwrap_err().offset, 1);
    }
}
