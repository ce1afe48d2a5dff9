//! The client's error type. Remote errors keep the machine-readable code,
//! the dotted name and the detail (the limit or right involved) the bus or
//! the remote peer sent.

use pbus_proto::v1::{ErrorCode, ErrorInfo};

/// Everything that can go wrong talking to the bus.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket or file operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The bus address is malformed or missing.
    #[error("bad bus address: {0}")]
    Address(String),
    /// The bus or a peer answered with an error.
    #[error("{name}: {message}")]
    Remote {
        /// Machine-readable code.
        code: ErrorCode,
        /// Dotted error name (`org.pbus.Error.AccessDenied` or an application's).
        name: String,
        /// Human-readable message.
        message: String,
        /// The limit or right involved, when the bus names one.
        detail: String,
    },
    /// The connection to the bus is gone.
    #[error("disconnected from the bus")]
    Disconnected,
    /// The bus broke the protocol, or the handshake failed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A payload could not be decoded as the expected type.
    #[error("cannot decode {type_name}: {source}")]
    Decode {
        /// The type that was expected.
        type_name: String,
        /// What prost said.
        source: prost::DecodeError,
    },
    /// The payload's type is not the one expected.
    #[error("expected a {expected} payload, got {actual:?}")]
    UnexpectedType {
        /// The type the caller asked for.
        expected: String,
        /// The type the message carried.
        actual: String,
    },
    /// A name, member or path is invalid.
    #[error(transparent)]
    InvalidName(#[from] pbus_proto::names::NameError),
    /// A match rule the bus would refuse for another reason than a name
    /// (a path namespace without a path, an argument index above 63).
    #[error("invalid match rule: {0}")]
    InvalidMatchRule(pbus_proto::matches::RuleError),
    /// A message would exceed a limit the bus announced.
    #[error("{what} exceeds the bus limit {limit} ({value} > {max})")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The limit's configuration key.
        limit: &'static str,
        /// Actual value.
        value: u64,
        /// Allowed maximum.
        max: u64,
    },
    /// A memfd payload is unusable (not sealed, out of range, ...).
    #[error("memfd payload: {0}")]
    Memfd(String),
}

impl Error {
    /// The remote error code, if this is a remote error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The remote error name, if this is a remote error.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Remote { name, .. } => Some(name),
            _ => None,
        }
    }

    /// The limit or right a remote error names, if any.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Remote { detail, .. } if !detail.is_empty() => Some(detail),
            _ => None,
        }
    }

    pub(crate) fn from_wire(info: ErrorInfo) -> Self {
        Self::Remote {
            code: ErrorCode::try_from(info.code).unwrap_or(ErrorCode::Failed),
            name: info.name,
            message: info.message,
            detail: info.detail,
        }
    }
}

/// The error a method handler returns; it travels to the caller as a remote
/// error with this name and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodError {
    /// Machine-readable code (usually `Failed` or `InvalidArgs`).
    pub code: ErrorCode,
    /// Dotted error name.
    pub name: String,
    /// For humans.
    pub message: String,
}

impl MethodError {
    /// An application error with its own dotted name.
    pub fn new(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Failed,
            name: name.into(),
            message: message.into(),
        }
    }

    /// A standard `org.pbus.Error.InvalidArgs`.
    pub fn invalid_args(message: impl Into<String>) -> Self {
        Self::with_code(ErrorCode::InvalidArgs, message)
    }

    /// A standard error for `code`.
    pub fn with_code(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            name: pbus_proto::errors::error_name(code).to_owned(),
            message: message.into(),
        }
    }

    pub(crate) fn into_wire(self) -> ErrorInfo {
        ErrorInfo {
            code: self.code as i32,
            name: self.name,
            message: self.message,
            detail: String::new(),
        }
    }
}

impl From<Error> for MethodError {
    fn from(error: Error) -> Self {
        match error {
            Error::Remote {
                code,
                name,
                message,
                ..
            } => Self {
                code,
                name,
                message,
            },
            other => Self::with_code(ErrorCode::Failed, other.to_string()),
        }
    }
}

impl std::fmt::Display for MethodError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.message)
    }
}

impl std::error::Error for MethodError {}
