//! Internal errors of the routing core and the one place they become wire
//! errors ([`BusError::to_wire`]).

use pbus_proto::errors::error_info;
use pbus_proto::v1::{ErrorCode, ErrorInfo};

use crate::config::Limit;

/// Why the bus refused or failed an operation. Each variant maps to exactly
/// one wire error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// A request argument is malformed.
    #[error("{0}")]
    InvalidArgs(String),
    /// Nobody owns the destination name.
    #[error("name {0:?} has no owner")]
    NameHasNoOwner(String),
    /// No connected peer has this unique name.
    #[error("no peer is connected as {0:?}")]
    NoSuchPeer(String),
    /// The bus has no such method.
    #[error("the bus has no method {0:?}")]
    UnknownMethod(String),
    /// Policy forbids it; `right` is the right that was lacking.
    #[error("access denied: lacking the {right} right{target}")]
    AccessDenied {
        /// Name of the missing right (`talk`, `own`, ...).
        right: &'static str,
        /// Optional context, starting with a space (" to own org.x.Y").
        target: String,
    },
    /// A configured limit was hit; `limit` is its configuration key.
    #[error("{message} (limit {limit})")]
    LimitExceeded {
        /// The limit.
        limit: Limit,
        /// What was attempted.
        message: String,
    },
    /// The receiver's queue cannot take the message: it is full, or the
    /// sender's uid already holds its fair share of it.
    #[error("{}", queue_full_message(*limit, *fair_share))]
    ReceiverQueueFull {
        /// The limit that was hit.
        limit: Limit,
        /// The queue has room, but not for this sender's uid.
        fair_share: bool,
    },
    /// Fds are not accepted here.
    #[error("{0}")]
    FdsNotSupported(String),
    /// An attached memfd failed validation.
    #[error("{0}")]
    InvalidMemfd(String),
    /// A reply that answers no pending call.
    #[error("reply does not answer a pending call from this peer")]
    UnexpectedReply,
    /// The call timed out.
    #[error("no reply within {0} ms")]
    Timeout(u64),
    /// The callee went away before answering.
    #[error("{0} disconnected before replying")]
    NoReply(String),
    /// The request is understood but not supported.
    #[error("{0}")]
    NotSupported(String),
    /// The handshake was wrong.
    #[error("{0}")]
    HandshakeFailed(String),
    /// The peer broke the wire protocol and is being disconnected.
    #[error("protocol violation: {0}")]
    ProtocolViolation(String),
    /// The sender is a monitor, and monitors are receive-only: they may
    /// call the bus driver and nothing else (no names, no calls to peers,
    /// no signals, no replies), and nobody may call them.
    #[error("{0}")]
    ReceiveOnly(String),
    /// A connection asked to become a monitor (its first eavesdropping
    /// rule) while it takes part in traffic of its own: it owns or is
    /// queued for a name, or has calls in flight either way.
    #[error("cannot become a monitor: {0}")]
    MonitorRefused(String),
}

fn queue_full_message(limit: Limit, fair_share: bool) -> String {
    if fair_share {
        format!("the sender's uid holds its fair share of the receiver's queue (limit {limit})")
    } else {
        format!("the receiver's queue is full (limit {limit})")
    }
}

impl BusError {
    /// The wire code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgs(_) => ErrorCode::InvalidArgs,
            Self::NameHasNoOwner(_) => ErrorCode::NameHasNoOwner,
            Self::NoSuchPeer(_) => ErrorCode::NoSuchPeer,
            Self::UnknownMethod(_) => ErrorCode::UnknownMethod,
            Self::AccessDenied { .. } => ErrorCode::AccessDenied,
            Self::LimitExceeded { .. } => ErrorCode::LimitsExceeded,
            Self::ReceiverQueueFull { .. } => ErrorCode::ReceiverQueueFull,
            Self::FdsNotSupported(_) => ErrorCode::FdsNotSupported,
            Self::InvalidMemfd(_) => ErrorCode::InvalidMemfd,
            Self::UnexpectedReply => ErrorCode::UnexpectedReply,
            Self::Timeout(_) => ErrorCode::Timeout,
            Self::NoReply(_) => ErrorCode::NoReply,
            Self::NotSupported(_) => ErrorCode::NotSupported,
            Self::HandshakeFailed(_) => ErrorCode::HandshakeFailed,
            Self::ProtocolViolation(_) => ErrorCode::ProtocolViolation,
            // Both are refusals by rule of a well-formed request, not bad
            // arguments: ACCESS_DENIED, with a detail of their own so a
            // client can tell them from a missing policy right. (pbusctl
            // monitor already treats a refused eavesdropping rule as "show
            // broadcasts only", which is the right fallback here too.)
            Self::ReceiveOnly(_) => ErrorCode::AccessDenied,
            Self::MonitorRefused(_) => ErrorCode::AccessDenied,
        }
    }

    /// The machine-readable detail: the limit or right involved.
    fn detail(&self) -> &str {
        match self {
            Self::AccessDenied { right, .. } => right,
            Self::LimitExceeded { limit, .. } | Self::ReceiverQueueFull { limit, .. } => {
                limit.as_str()
            }
            Self::ReceiveOnly(_) => pbus_proto::errors::DETAIL_RECEIVE_ONLY,
            Self::MonitorRefused(_) => "monitor",
            _ => "",
        }
    }

    /// The error as it goes on the wire.
    pub fn to_wire(&self) -> ErrorInfo {
        error_info(self.code(), self.to_string(), self.detail())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_rights_are_named_in_detail() {
        let wire = BusError::LimitExceeded {
            limit: crate::config::Limit::MaxNamesPerConnection,
            message: "too many names".into(),
        }
        .to_wire();
        assert_eq!(wire.code, ErrorCode::LimitsExceeded as i32);
        assert_eq!(wire.name, "org.pbus.Error.LimitsExceeded");
        assert_eq!(wire.detail, "max_names_per_connection");
        let wire = BusError::AccessDenied {
            right: "talk",
            target: String::new(),
        }
        .to_wire();
        assert_eq!(wire.detail, "talk");
        assert_eq!(wire.message, "access denied: lacking the talk right");
    }
}
