//! What a frame from the bus is, decided from its header alone: a reply or
//! an error for a pending call, a call for one of this connection's
//! handlers, a signal for its subscriptions (told apart: those the bus
//! itself emits about names), a monitor copy of someone else's traffic, a
//! kind a connected client never gets, or a header that does not decode.
//!
//! It must not know about bodies, fds or memfds (checking those needs
//! syscalls; the driver does it once it knows where the frame goes), nor
//! about who waits for what.

use pbus_proto::v1::{ErrorInfo, Header, HeaderFlag, MessageKind};
use pbus_proto::{BUS_NAME, BUS_PATH};
use prost::Message;

/// A header from the bus that does not decode. The bus stamps every
/// header it forwards, so this is a protocol violation that ends the
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad header from the bus: {0}")]
pub(crate) struct MalformedHeader(String);

/// A signal the bus emits itself about names (sender `org.pbus.Bus`, path
/// `/org/pbus/Bus`, as the bus stamped it: no peer can pose as the bus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BusSignal {
    /// A name changed owners (broadcast to matching rules).
    NameOwnerChanged,
    /// This connection became a name's primary owner (unicast).
    NameAcquired,
    /// This connection stopped being a name's primary owner (unicast).
    NameLost,
    /// Another signal from the bus's own path.
    Other,
}

/// A method call this connection is asked to serve.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InboundCall {
    /// The caller's serial, which the reply answers.
    pub(crate) serial: u64,
    /// The caller's unique name, where the reply goes.
    pub(crate) caller: String,
    /// Which handler serves it.
    pub(crate) member: String,
    /// False for calls flagged `NO_REPLY_EXPECTED`: nothing is sent back.
    pub(crate) wants_reply: bool,
    /// The whole header, for the request the handler sees.
    pub(crate) header: Header,
}

/// Where a frame from the bus goes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Inbound {
    /// A copy of a message addressed to another peer (`MONITOR_COPY`):
    /// only eavesdropping subscriptions see it, whatever its kind, and it
    /// is never answered.
    MonitorCopy(Header),
    /// `METHOD_RETURN` for the call whose serial is `header.reply_serial`.
    Reply(Header),
    /// `ERROR` for the call whose serial is `reply_serial`; its body and
    /// fds are not looked at.
    ErrorReply {
        /// The serial of the call it answers.
        reply_serial: u64,
        /// What went wrong (empty if the frame carried no error field).
        error: ErrorInfo,
    },
    /// A call for one of this connection's handlers.
    Call(InboundCall),
    /// A signal from the bus itself, for subscriptions (which follow name
    /// owners through `NameOwnerChanged`).
    BusSignal {
        /// Which one.
        signal: BusSignal,
        /// Its header.
        header: Header,
    },
    /// A signal from a peer, for subscriptions.
    Signal(Header),
    /// A kind the bus does not send a connected client (HELLO, WELCOME
    /// after the handshake, unknown kinds): dropped.
    Unexpected {
        /// The kind as received.
        kind: i32,
    },
}

impl Inbound {
    /// Decodes and classifies a frame's header bytes.
    pub(crate) fn from_wire(header: &[u8]) -> Result<Self, MalformedHeader> {
        let header = Header::decode(header).map_err(|e| MalformedHeader(e.to_string()))?;
        Ok(Self::classify(header))
    }

    /// Classifies a decoded header.
    pub(crate) fn classify(header: Header) -> Self {
        if header.flags & HeaderFlag::MonitorCopy as u32 != 0 {
            return Self::MonitorCopy(header);
        }
        match MessageKind::try_from(header.kind) {
            Ok(MessageKind::MethodReturn) => Self::Reply(header),
            Ok(MessageKind::Error) => Self::ErrorReply {
                reply_serial: header.reply_serial,
                error: header.error.unwrap_or_default(),
            },
            Ok(MessageKind::MethodCall) => Self::Call(InboundCall {
                serial: header.serial,
                caller: header
                    .sender
                    .as_ref()
                    .map(|sender| sender.unique_name.clone())
                    .unwrap_or_default(),
                member: header.member.clone(),
                wants_reply: header.flags & HeaderFlag::NoReplyExpected as u32 == 0,
                header,
            }),
            Ok(MessageKind::Signal) => match bus_signal(&header) {
                Some(signal) => Self::BusSignal { signal, header },
                None => Self::Signal(header),
            },
            _ => Self::Unexpected { kind: header.kind },
        }
    }
}

/// Which bus signal `header` is, if the bus sent it from its own path.
fn bus_signal(header: &Header) -> Option<BusSignal> {
    let sender = header.sender.as_ref()?;
    if sender.unique_name != BUS_NAME || header.path != BUS_PATH {
        return None;
    }
    Some(match header.member.as_str() {
        "NameOwnerChanged" => BusSignal::NameOwnerChanged,
        "NameAcquired" => BusSignal::NameAcquired,
        "NameLost" => BusSignal::NameLost,
        _ => BusSignal::Other,
    })
}

#[cfg(test)]
mod tests {
    use pbus_proto::v1::SenderInfo;

    use super::*;

    fn header(kind: MessageKind) -> Header {
        Header {
            kind: kind as i32,
            serial: 7,
            sender: Some(SenderInfo {
                unique_name: ":1.4".into(),
                ..SenderInfo::default()
            }),
            ..Header::default()
        }
    }

    fn from_bus(member: &str) -> Header {
        Header {
            path: BUS_PATH.into(),
            member: member.into(),
            sender: Some(SenderInfo {
                unique_name: BUS_NAME.into(),
                ..SenderInfo::default()
            }),
            ..header(MessageKind::Signal)
        }
    }

    #[test]
    fn a_method_return_is_a_reply_to_its_serial() {
        let reply = Header {
            reply_serial: 3,
            ..header(MessageKind::MethodReturn)
        };
        assert_eq!(Inbound::classify(reply.clone()), Inbound::Reply(reply));
    }

    #[test]
    fn an_error_carries_its_info_and_serial() {
        let info = ErrorInfo {
            code: 3,
            name: "org.example.Error.Nope".into(),
            message: "no".into(),
            detail: String::new(),
        };
        let error = Header {
            reply_serial: 9,
            error: Some(info.clone()),
            ..header(MessageKind::Error)
        };
        assert_eq!(
            Inbound::classify(error),
            Inbound::ErrorReply {
                reply_serial: 9,
                error: info
            }
        );
        // An error without an error field still answers its call.
        let bare = Header {
            reply_serial: 9,
            ..header(MessageKind::Error)
        };
        assert_eq!(
            Inbound::classify(bare),
            Inbound::ErrorReply {
                reply_serial: 9,
                error: ErrorInfo::default()
            }
        );
    }

    #[test]
    fn a_call_names_its_caller_member_and_whether_it_wants_a_reply() {
        let call = Header {
            member: "Frobnicate".into(),
            ..header(MessageKind::MethodCall)
        };
        let Inbound::Call(inbound) = Inbound::classify(call.clone()) else {
            panic!("not a call");
        };
        assert_eq!(
            (
                inbound.serial,
                inbound.caller.as_str(),
                inbound.member.as_str()
            ),
            (7, ":1.4", "Frobnicate")
        );
        assert!(inbound.wants_reply);
        assert_eq!(inbound.header, call);
        let one_way = Header {
            flags: HeaderFlag::NoReplyExpected as u32,
            ..call
        };
        let Inbound::Call(inbound) = Inbound::classify(one_way) else {
            panic!("not a call");
        };
        assert!(!inbound.wants_reply);
        // An unstamped call (the bus always stamps) has no caller to answer.
        let unstamped = Header {
            sender: None,
            ..header(MessageKind::MethodCall)
        };
        let Inbound::Call(inbound) = Inbound::classify(unstamped) else {
            panic!("not a call");
        };
        assert_eq!(inbound.caller, "");
    }

    #[test]
    fn bus_signals_are_told_apart_from_peer_signals() {
        for (member, signal) in [
            ("NameOwnerChanged", BusSignal::NameOwnerChanged),
            ("NameAcquired", BusSignal::NameAcquired),
            ("NameLost", BusSignal::NameLost),
            ("SomethingNew", BusSignal::Other),
        ] {
            let header = from_bus(member);
            assert_eq!(
                Inbound::classify(header.clone()),
                Inbound::BusSignal { signal, header }
            );
        }
        // A peer's signal of the same name, or one on another path, is the
        // peer's.
        let posing = Header {
            sender: header(MessageKind::Signal).sender,
            ..from_bus("NameAcquired")
        };
        assert_eq!(Inbound::classify(posing.clone()), Inbound::Signal(posing));
        let elsewhere = Header {
            path: "/org/example".into(),
            ..from_bus("NameAcquired")
        };
        assert_eq!(
            Inbound::classify(elsewhere.clone()),
            Inbound::Signal(elsewhere)
        );
    }

    #[test]
    fn monitor_copies_go_to_eavesdroppers_whatever_their_kind() {
        for kind in [
            MessageKind::MethodCall,
            MessageKind::MethodReturn,
            MessageKind::Error,
            MessageKind::Signal,
        ] {
            let copy = Header {
                flags: HeaderFlag::MonitorCopy as u32,
                ..header(kind)
            };
            assert_eq!(Inbound::classify(copy.clone()), Inbound::MonitorCopy(copy));
        }
    }

    #[test]
    fn kinds_a_client_never_gets_are_unexpected() {
        for kind in [
            MessageKind::Unspecified as i32,
            MessageKind::Hello as i32,
            MessageKind::Welcome as i32,
            99,
        ] {
            let frame = Header {
                kind,
                ..Header::default()
            };
            assert_eq!(Inbound::classify(frame), Inbound::Unexpected { kind });
        }
    }

    #[test]
    fn header_bytes_are_decoded_or_refused() {
        let signal = header(MessageKind::Signal);
        assert_eq!(
            Inbound::from_wire(&signal.encode_to_vec()),
            Ok(Inbound::Signal(signal))
        );
        // Field 1 (kind) as a length-delimited field running past the end.
        let error = Inbound::from_wire(&[0x0a, 0x05, 0x01]).unwrap_err();
        assert!(
            error.to_string().starts_with("bad header from the bus: "),
            "{error}"
        );
        assert!(Inbound::from_wire(&[0xff]).is_err(), "a truncated varint");
    }
}
