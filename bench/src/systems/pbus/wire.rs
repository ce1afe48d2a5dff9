//! A minimal pbus client for the mass-connection workloads, on the
//! `pbus-proto` framing.
//!
//! It writes HELLO and any `AddMatch` calls in a single write (pipelined:
//! the bus reads frames that follow HELLO in the same read), then reads the
//! WELCOME and counts method returns until every call is answered.
//! Afterwards it only frames incoming messages and looks at a signal's
//! body. No task per connection, no buffer beyond a small read buffer.

use std::collections::VecDeque;

use anyhow::{anyhow, bail, Context, Result};
use pbus_proto::frame::{encode_frame, FrameLimits, FrameReader};
use pbus_proto::v1::{AddMatchRequest, Feature, Header, Hello, MatchRule, MessageKind};
use pbus_proto::{BUS_NAME, BUS_PATH, PROTOCOL_VERSION};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::systems::service::{noise_path, FANOUT_PATH, SIGNAL_MEMBER};
use crate::systems::LightRole;

/// A bare pbus connection whose handshake is complete.
pub struct LightConn {
    stream: UnixStream,
    reader: FrameReader<std::os::fd::OwnedFd>,
    buf: Vec<u8>,
    /// Frames read but not yet looked at.
    inbox: VecDeque<(Header, Vec<u8>)>,
    next_serial: u64,
}

fn add_match(serial: u64, rule: MatchRule) -> (Header, Vec<u8>) {
    let header = Header {
        kind: MessageKind::MethodCall as i32,
        serial,
        destination: BUS_NAME.to_owned(),
        path: BUS_PATH.to_owned(),
        member: "AddMatch".to_owned(),
        payload_type: pbus_proto::type_name::<AddMatchRequest>(),
        ..Header::default()
    };
    (header, AddMatchRequest { rule: Some(rule) }.encode_to_vec())
}

fn fanout_rule(path: String) -> MatchRule {
    MatchRule {
        path,
        member: SIGNAL_MEMBER.to_owned(),
        ..MatchRule::default()
    }
}

impl LightConn {
    /// Connects, completes the handshake and installs the role's rules.
    pub async fn connect(address: &str, role: LightRole) -> Result<LightConn> {
        let socket: pbus::Address = address.parse().context("parsing the pbus address")?;
        let stream = UnixStream::connect(socket.path())
            .await
            .with_context(|| format!("connecting to {address}"))?;
        let mut conn = LightConn {
            stream,
            reader: FrameReader::new(FrameLimits::default()),
            buf: vec![0u8; 4096],
            inbox: VecDeque::new(),
            next_serial: 1,
        };
        let mut out = Vec::new();
        let hello = Header {
            kind: MessageKind::Hello as i32,
            ..Header::default()
        };
        let body = Hello {
            protocol_version: PROTOCOL_VERSION,
            features: Feature::FdPassing as u32 | Feature::Memfd as u32,
            client_name: String::new(),
        };
        encode_frame(&mut out, &hello, &body.encode_to_vec(), 0);
        let rules: Vec<MatchRule> = match role {
            LightRole::Idle | LightRole::Emitter => Vec::new(),
            LightRole::Subscriber => vec![fanout_rule(FANOUT_PATH.to_owned())],
            LightRole::Noise { rules, first } => (first..first + rules)
                .map(|n| fanout_rule(noise_path(n)))
                .collect(),
        };
        let calls = rules.len();
        for rule in rules {
            let serial = conn.serial();
            let (header, body) = add_match(serial, rule);
            encode_frame(&mut out, &header, &body, 0);
        }
        conn.stream.write_all(&out).await.context("writing HELLO")?;
        let (welcome, _) = conn.next_frame().await?;
        if welcome.kind != MessageKind::Welcome as i32 {
            bail!("pbusd answered HELLO with {:?}", welcome.error);
        }
        let mut answered = 0;
        while answered < calls {
            let (header, _) = conn.next_frame().await?;
            match MessageKind::try_from(header.kind) {
                Ok(MessageKind::MethodReturn) => answered += 1,
                Ok(MessageKind::Error) => bail!("AddMatch failed: {:?}", header.error),
                _ => {}
            }
        }
        Ok(conn)
    }

    fn serial(&mut self) -> u64 {
        let serial = self.next_serial;
        self.next_serial += 1;
        serial
    }

    /// The next frame from the bus.
    async fn next_frame(&mut self) -> Result<(Header, Vec<u8>)> {
        loop {
            if let Some(frame) = self.inbox.pop_front() {
                return Ok(frame);
            }
            let n = self.stream.read(&mut self.buf).await?;
            if n == 0 {
                bail!("pbusd closed the connection");
            }
            let inbox = &mut self.inbox;
            self.reader
                .feed(&self.buf[..n], Vec::new(), |frame| {
                    let header =
                        Header::decode(frame.header).map_err(|e| anyhow!("bad header: {e}"))?;
                    inbox.push_back((header, frame.body.to_vec()));
                    Ok::<(), anyhow::Error>(())
                })
                .map_err(|e| match e {
                    pbus_proto::frame::FeedError::Frame(e) => anyhow!("bad frame: {e}"),
                    pbus_proto::frame::FeedError::Consumer(e) => e,
                })?;
        }
    }

    /// Broadcasts the fanout signal carrying `seq`.
    pub async fn emit(&mut self, seq: u64) -> Result<()> {
        let header = Header {
            kind: MessageKind::Signal as i32,
            serial: self.serial(),
            path: FANOUT_PATH.to_owned(),
            member: SIGNAL_MEMBER.to_owned(),
            ..Header::default()
        };
        let mut out = Vec::new();
        encode_frame(&mut out, &header, &seq.to_le_bytes(), 0);
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// Waits for the fanout signal carrying `seq`.
    pub async fn recv_signal(&mut self, seq: u64) -> Result<()> {
        loop {
            let (header, body) = self.next_frame().await?;
            if header.kind == MessageKind::Signal as i32
                && header.member == SIGNAL_MEMBER
                && body.as_slice() == seq.to_le_bytes()
            {
                return Ok(());
            }
        }
    }
}
