//! Policy errors with positions: every problem in a policy file is reported
//! as `file:line:column: message`, and all of them are reported at once.
//!
//! This module knows how to turn byte offsets into line and column numbers;
//! it knows nothing about what the rules mean.

use std::fmt;

/// One problem in a policy source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The file (or other origin) the problem is in.
    pub origin: String,
    /// 1-based line and column (in characters), or `None` for problems that
    /// concern a whole file (it cannot be read) rather than a place in it.
    pub position: Option<(u32, u32)>,
    /// What is wrong.
    pub message: String,
}

impl PolicyError {
    /// An error at a known line and column.
    pub(crate) fn at_position(
        origin: &str,
        position: (u32, u32),
        message: impl Into<String>,
    ) -> Self {
        Self {
            origin: origin.to_owned(),
            position: Some(position),
            message: message.into(),
        }
    }

    /// An error about a whole file.
    pub(crate) fn file(origin: &str, message: impl Into<String>) -> Self {
        Self {
            origin: origin.to_owned(),
            position: None,
            message: message.into(),
        }
    }

    /// The 1-based line, if the error has a position.
    pub fn line(&self) -> Option<u32> {
        self.position.map(|(line, _)| line)
    }

    /// The 1-based column, if the error has a position.
    pub fn column(&self) -> Option<u32> {
        self.position.map(|(_, column)| column)
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => {
                write!(f, "{}:{line}:{column}: {}", self.origin, self.message)
            }
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

impl std::error::Error for PolicyError {}

/// Every problem found while loading a policy, in file order, then position
/// order. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl PolicyErrors {
    /// The individual errors.
    pub fn iter(&self) -> std::slice::Iter<'_, PolicyError> {
        self.0.iter()
    }

    /// Number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl<'a> IntoIterator for &'a PolicyErrors {
    type Item = &'a PolicyError;
    type IntoIter = std::slice::Iter<'a, PolicyError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// 1-based line and character column of byte `offset` in `text` (clamped to
/// the text, and to a character boundary).
#[cfg(test)]
pub(crate) fn line_column(text: &str, offset: usize) -> (u32, u32) {
    LineIndex::new(text).position(text, offset)
}

/// Start offsets of the lines of a text, so that many positions can be
/// computed without rescanning the text from the start each time.
#[derive(Debug, Clone)]
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(at, _)| at + 1))
            .collect();
        Self { starts }
    }

    /// 1-based line and character column of byte `offset` of `text` (the
    /// text this index was built from).
    pub fn position(&self, text: &str, offset: usize) -> (u32, u32) {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.starts.partition_point(|&start| start <= offset);
        let line_start = self.starts[line - 1];
        let column = text[line_start..offset].chars().count() + 1;
        (
            u32::try_from(line).unwrap_or(u32::MAX),
            u32::try_from(column).unwrap_or(u32::MAX),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        let text = "ab\ncé\nx";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 2), (1, 3));
        assert_eq!(line_column(text, 3), (2, 1));
        assert_eq!(line_column(text, 4), (2, 2));
        // 'é' is two bytes: the byte after it is column 3.
        assert_eq!(line_column(text, 6), (2, 3));
        assert_eq!(line_column(text, 7), (3, 1));
        assert_eq!(line_column(text, 99), (3, 2));
    }

    #[test]
    fn display() {
        let errors = PolicyErrors(vec![
            PolicyError::at_position("a.toml", line_column("x\ny", 2), "bad"),
            PolicyError::file("b.toml", "cannot read"),
        ]);
        assert_eq!(errors.to_string(), "a.toml:2:1: bad\nb.toml: cannot read");
    }
}
