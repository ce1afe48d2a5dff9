//! Error codes and their dotted names (`org.pbus.Error.Timeout`).
//!
//! Every error the daemon puts on the wire has a machine-readable
//! [`ErrorCode`] and the matching name from [`error_name`]; applications may
//! send their own names with [`ErrorCode::Failed`].

use crate::v1::{ErrorCode, ErrorInfo};

/// The `detail` of the ACCESS_DENIED error a monitor gets for anything it
/// sends other than a call to the bus driver (and a caller of a monitor
/// gets): monitors are receive-only.
pub const DETAIL_RECEIVE_ONLY: &str = "receive-only";

/// The `org.pbus.Error.*` name of a code.
pub fn error_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Unspecified | ErrorCode::Failed => "org.pbus.Error.Failed",
        ErrorCode::NameHasNoOwner => "org.pbus.Error.NameHasNoOwner",
        ErrorCode::UnknownMethod => "org.pbus.Error.UnknownMethod",
        ErrorCode::Timeout => "org.pbus.Error.Timeout",
        ErrorCode::NoReply => "org.pbus.Error.NoReply",
        ErrorCode::AccessDenied => "org.pbus.Error.AccessDenied",
        ErrorCode::LimitsExceeded => "org.pbus.Error.LimitsExceeded",
        ErrorCode::InvalidArgs => "org.pbus.Error.InvalidArgs",
        ErrorCode::ProtocolViolation => "org.pbus.Error.ProtocolViolation",
        ErrorCode::ReceiverQueueFull => "org.pbus.Error.ReceiverQueueFull",
        ErrorCode::FdsNotSupported => "org.pbus.Error.FdsNotSupported",
        ErrorCode::InvalidMemfd => "org.pbus.Error.InvalidMemfd",
        ErrorCode::NotSupported => "org.pbus.Error.NotSupported",
        ErrorCode::HandshakeFailed => "org.pbus.Error.HandshakeFailed",
        ErrorCode::UnexpectedReply => "org.pbus.Error.UnexpectedReply",
        ErrorCode::ShuttingDown => "org.pbus.Error.ShuttingDown",
        ErrorCode::NoSuchPeer => "org.pbus.Error.NoSuchPeer",
    }
}

/// Builds an `ErrorInfo` with the standard name for `code`.
pub fn error_info(
    code: ErrorCode,
    message: impl Into<String>,
    detail: impl Into<String>,
) -> ErrorInfo {
    ErrorInfo {
        code: code as i32,
        name: error_name(code).to_owned(),
        message: message.into(),
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::ErrorName;

    #[test]
    fn every_code_has_a_valid_distinct_name() {
        let mut seen = std::collections::HashSet::new();
        for value in 1..=17 {
            let code = ErrorCode::try_from(value).unwrap();
            let name = error_name(code);
            ErrorName::try_from(name).unwrap();
            assert!(seen.insert(name), "{name} used twice");
        }
        assert!(
            ErrorCode::try_from(18).is_err(),
            "a new code needs a name above"
        );
    }
}
