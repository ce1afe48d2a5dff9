//! A minimal D-Bus client for the mass-connection workloads.
//!
//! It writes the SASL `AUTH EXTERNAL` line, `BEGIN`, the `Hello` call and
//! any `AddMatch` calls in a single write (the pipelining sd-bus does too),
//! then reads the `OK` line and counts method returns until every call is
//! answered. Afterwards it only frames incoming messages (the fixed header
//! gives the length) and looks at a signal's body. Messages are built with
//! zbus's message builder, so their encoding is zbus's, with serials chosen
//! here. No task per connection, no allocation per message beyond the read
//! buffer's growth.

use std::num::NonZeroU32;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use zbus::message::Message;

use super::{noise_rule, socket_of, subscriber_rule, INTERFACE};
use crate::systems::service::{FANOUT_PATH, SIGNAL_MEMBER};
use crate::systems::LightRole;

/// D-Bus message type of a method return.
const METHOD_RETURN: u8 = 2;
/// D-Bus message type of an error.
const ERROR: u8 = 3;
/// D-Bus message type of a signal.
const SIGNAL: u8 = 4;
/// Size of the fixed part of a message header.
const FIXED_HEADER: usize = 16;

/// A bare D-Bus connection whose handshake is complete.
pub struct LightConn {
    stream: UnixStream,
    /// Received bytes not yet consumed live in `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    next_serial: u32,
}

/// What [`LightConn::next_message`] reports about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// D-Bus message type (1 call, 2 return, 3 error, 4 signal).
    pub kind: u8,
    /// Body length in bytes.
    pub body_len: usize,
    /// The body read as a `t` (u64), when it is exactly 8 bytes.
    pub body_u64: Option<u64>,
}

/// Total length of the message whose first 16 bytes are `fixed`, or an
/// error for a malformed header.
pub fn message_len(fixed: &[u8; FIXED_HEADER]) -> Result<usize> {
    let little = match fixed[0] {
        b'l' => true,
        b'B' => false,
        other => bail!("bad D-Bus endianness byte {other:#x}"),
    };
    let word = |at: usize| {
        let b = [fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]];
        (if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }) as usize
    };
    let body_len = word(4);
    let fields_len = word(12);
    let body_start = (FIXED_HEADER + fields_len).next_multiple_of(8);
    Ok(body_start + body_len)
}

/// The bytes of a built message.
fn bytes_of(msg: Result<Message, zbus::Error>) -> Result<Vec<u8>> {
    Ok(msg?.data().bytes().to_vec())
}

fn serial(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

fn bus_call(serial_no: u32, member: &str, rule: Option<&str>) -> Result<Vec<u8>> {
    let builder = Message::method_call("/org/freedesktop/DBus", member)?
        .destination("org.freedesktop.DBus")?
        .interface("org.freedesktop.DBus")?
        .serial(serial(serial_no));
    bytes_of(match rule {
        Some(rule) => builder.build(&rule),
        None => builder.build(&()),
    })
}

impl LightConn {
    /// Connects to `address`, authenticates, says `Hello`, installs the
    /// match rules `role` needs, and returns once the bus has answered
    /// every call.
    pub async fn connect(address: &str, role: LightRole) -> Result<LightConn> {
        let path =
            socket_of(address).ok_or_else(|| anyhow!("unsupported D-Bus address {address}"))?;
        let stream = UnixStream::connect(path)
            .await
            .with_context(|| format!("connecting to {path}"))?;
        let mut conn = LightConn {
            stream,
            buf: vec![0; 4096],
            start: 0,
            end: 0,
            next_serial: 1,
        };

        let uid = nix::unistd::getuid().as_raw().to_string();
        let hex_uid: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
        let mut out = format!("\0AUTH EXTERNAL {hex_uid}\r\nBEGIN\r\n").into_bytes();
        let mut calls = 0;
        let mut push_call = |conn: &mut LightConn, member: &str, rule: Option<&str>| {
            let s = conn.take_serial();
            calls += 1;
            bus_call(s, member, rule).map(|b| out.extend_from_slice(&b))
        };
        push_call(&mut conn, "Hello", None)?;
        match role {
            LightRole::Idle | LightRole::Emitter => {}
            LightRole::Subscriber => push_call(&mut conn, "AddMatch", Some(&subscriber_rule()))?,
            LightRole::Noise { rules, first } => {
                for n in first..first + rules {
                    push_call(&mut conn, "AddMatch", Some(&noise_rule(n)))?;
                }
            }
        }
        conn.stream.write_all(&out).await?;
        conn.read_auth_ok().await?;
        let mut answered = 0;
        while answered < calls {
            let frame = conn.next_message().await?;
            match frame.kind {
                METHOD_RETURN => answered += 1,
                ERROR => bail!("the bus answered a setup call with an error"),
                _ => {} // NameAcquired and friends
            }
        }
        Ok(conn)
    }

    fn take_serial(&mut self) -> u32 {
        let s = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1).max(1);
        s
    }

    /// Broadcasts the fanout signal with body `seq` (type `t`).
    pub async fn emit(&mut self, seq: u64) -> Result<()> {
        let s = self.take_serial();
        let bytes = bytes_of(
            Message::signal(FANOUT_PATH, INTERFACE, SIGNAL_MEMBER)?
                .serial(serial(s))
                .build(&seq),
        )?;
        self.stream.write_all(&bytes).await?;
        Ok(())
    }

    /// Reads messages until a signal whose body is the u64 `seq` arrives.
    pub async fn recv_signal(&mut self, seq: u64) -> Result<()> {
        loop {
            let frame = self.next_message().await?;
            if frame.kind == SIGNAL && frame.body_u64 == Some(seq) {
                return Ok(());
            }
        }
    }

    /// Makes at least `need` unconsumed bytes available.
    async fn fill(&mut self, need: usize) -> Result<()> {
        while self.end - self.start < need {
            if self.buf.len() - self.start < need {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.buf.len() < need {
                    self.buf.resize(need, 0);
                }
            }
            let n = self.stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                bail!("the bus closed the connection");
            }
            self.end += n;
        }
        Ok(())
    }

    async fn read_auth_ok(&mut self) -> Result<()> {
        loop {
            let pending = &self.buf[self.start..self.end];
            if let Some(pos) = pending.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&pending[..pos]).into_owned();
                self.start += pos + 2;
                if !line.starts_with("OK ") {
                    bail!("authentication refused: {line}");
                }
                return Ok(());
            }
            let have = self.end - self.start;
            self.fill(have + 1).await?;
        }
    }

    /// Reads the next whole message and describes it.
    pub async fn next_message(&mut self) -> Result<Frame> {
        self.fill(FIXED_HEADER).await?;
        let fixed: [u8; FIXED_HEADER] = self.buf[self.start..self.start + FIXED_HEADER]
            .try_into()
            .expect("16 bytes");
        let total = message_len(&fixed)?;
        self.fill(total).await?;
        let msg = &self.buf[self.start..self.start + total];
        let frame = describe(msg)?;
        self.start += total;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(frame)
    }
}

/// Describes a whole message.
pub fn describe(msg: &[u8]) -> Result<Frame> {
    let fixed: [u8; FIXED_HEADER] = msg
        .get(..FIXED_HEADER)
        .ok_or_else(|| anyhow!("short message"))?
        .try_into()
        .expect("16 bytes");
    let total = message_len(&fixed)?;
    if msg.len() < total {
        bail!("truncated message");
    }
    let little = msg[0] == b'l';
    let body_len = {
        let b = [msg[4], msg[5], msg[6], msg[7]];
        (if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }) as usize
    };
    let body = &msg[total - body_len..total];
    let body_u64 = (body_len == 8).then(|| {
        let b: [u8; 8] = body.try_into().expect("8 bytes");
        if little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        }
    });
    Ok(Frame {
        kind: msg[1],
        body_len,
        body_u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_a_zbus_signal() {
        let bytes = bytes_of(
            Message::signal(FANOUT_PATH, INTERFACE, SIGNAL_MEMBER)
                .unwrap()
                .serial(serial(7))
                .build(&42u64),
        )
        .unwrap();
        let fixed: [u8; 16] = bytes[..16].try_into().unwrap();
        assert_eq!(message_len(&fixed).unwrap(), bytes.len());
        let frame = describe(&bytes).unwrap();
        assert_eq!(frame.kind, SIGNAL);
        assert_eq!(frame.body_len, 8);
        assert_eq!(frame.body_u64, Some(42));
    }

    #[test]
    fn frames_a_bus_call() {
        let bytes = bus_call(3, "AddMatch", Some(&subscriber_rule())).unwrap();
        let fixed: [u8; 16] = bytes[..16].try_into().unwrap();
        assert_eq!(message_len(&fixed).unwrap(), bytes.len());
        let frame = describe(&bytes).unwrap();
        assert_eq!(frame.kind, 1);
        assert_eq!(frame.body_u64, None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(message_len(&[0u8; 16]).is_err());
        assert!(describe(b"l").is_err());
    }
}
