//! Worker side of the relay: servers, callers and bare connections speaking
//! the relay's length-prefixed framing (see the parent module).
//!
//! Frames are written with one vectored write (header and payload, no copy
//! of the payload) and read through a buffered reader; payloads the reader
//! does not need are skipped in place. Pipelined calls are matched to
//! replies in order, which the relay and the server preserve.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{
    frame_header, hello, parse_frame_header, ACK, FANOUT_GROUP, FRAME_HEADER, KIND_CALL,
    KIND_COUNT, KIND_ONEWAY, KIND_REPLY, KIND_SIGNAL, ROLE_CLIENT, ROLE_IDLE, ROLE_PUB,
    ROLE_SERVER, ROLE_SUB,
};
use crate::stats::Histogram;
use crate::systems::{CallSpec, Client, LightRole};

/// Read buffer of servers and callers.
const READ_BUF: usize = 256 * 1024;

/// The relay's worker-side client.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayClient;

/// A connection registered with the relay; used for every role.
pub struct RelayConn {
    stream: UnixStream,
}

async fn open(address: &str, role: u8, key: u64) -> Result<RelayConn> {
    let mut stream = UnixStream::connect(address)
        .await
        .with_context(|| format!("connecting to the relay at {address}"))?;
    stream.write_all(&hello(role, key)).await?;
    let mut ack = [0u8; 1];
    stream
        .read_exact(&mut ack)
        .await
        .context("waiting for the relay's acknowledgement")?;
    if ack[0] != ACK {
        bail!("relay refused the connection");
    }
    Ok(RelayConn { stream })
}

/// Writes a frame header and its payload with as few system calls as the
/// socket allows (one for small frames).
async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &[u8],
    payload: &[u8],
) -> Result<()> {
    let (mut head, mut body) = (header, payload);
    while !head.is_empty() {
        let n = w
            .write_vectored(&[IoSlice::new(head), IoSlice::new(body)])
            .await?;
        if n == 0 {
            bail!("relay connection closed while writing");
        }
        if n < head.len() {
            head = &head[n..];
        } else {
            body = &body[n - head.len()..];
            head = &[];
        }
    }
    w.write_all(body).await?;
    Ok(())
}

/// Reads one frame header: (kind, payload length).
async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, usize)> {
    let mut h = [0u8; FRAME_HEADER];
    r.read_exact(&mut h)
        .await
        .context("reading a relay frame")?;
    Ok(parse_frame_header(&h))
}

/// Discards `len` bytes from a buffered reader without copying them.
async fn skip<R: AsyncBufReadExt + Unpin>(r: &mut R, mut len: usize) -> Result<()> {
    while len > 0 {
        let available = r.fill_buf().await?.len();
        if available == 0 {
            bail!("relay connection closed mid-frame");
        }
        let n = available.min(len);
        r.consume(n);
        len -= n;
    }
    Ok(())
}

impl Client for RelayClient {
    type Server = RelayConn;
    type Conn = RelayConn;
    type Light = RelayConn;

    async fn bind_server(&self, address: &str, target: u32) -> Result<RelayConn> {
        open(address, ROLE_SERVER, u64::from(target)).await
    }

    async fn serve(&self, mut server: RelayConn, reply_size: usize) -> Result<()> {
        let (r, mut w) = server.stream.split();
        let mut r = BufReader::with_capacity(READ_BUF, r);
        let reply_header = frame_header(KIND_REPLY, reply_size)?;
        let reply = vec![0x5Au8; reply_size];
        let count_header = frame_header(KIND_REPLY, 8)?;
        let mut received: u64 = 0;
        loop {
            let (kind, len) = match read_header(&mut r).await {
                Ok(h) => h,
                Err(_) => return Ok(()), // the caller went away
            };
            skip(&mut r, len).await?;
            match kind {
                KIND_CALL => write_frame(&mut w, &reply_header, &reply).await?,
                KIND_ONEWAY => received += 1,
                KIND_COUNT => write_frame(&mut w, &count_header, &received.to_le_bytes()).await?,
                other => bail!("unexpected relay frame kind {other}"),
            }
        }
    }

    async fn connect(&self, address: &str, target: u32) -> Result<RelayConn> {
        open(address, ROLE_CLIENT, u64::from(target)).await
    }

    async fn call_loop(
        &self,
        conn: &mut RelayConn,
        spec: &CallSpec<'_>,
        latencies: &mut Histogram,
    ) -> Result<u64> {
        let (r, mut w) = conn.stream.split();
        let mut r = BufReader::with_capacity(READ_BUF, r);
        let header = frame_header(KIND_CALL, spec.payload.len())?;
        let mut sent_at: VecDeque<Instant> = VecDeque::with_capacity(spec.inflight);
        let mut started = 0u64;
        let mut done = 0u64;
        while sent_at.len() < spec.inflight && spec.wants_more(started) {
            sent_at.push_back(Instant::now());
            write_frame(&mut w, &header, spec.payload).await?;
            started += 1;
        }
        while let Some(t0) = sent_at.pop_front() {
            let (kind, len) = read_header(&mut r).await?;
            skip(&mut r, len).await?;
            if kind != KIND_REPLY {
                bail!("expected a reply, got relay frame kind {kind}");
            }
            latencies.record(t0.elapsed().as_nanos() as u64);
            done += 1;
            if spec.wants_more(started) {
                sent_at.push_back(Instant::now());
                write_frame(&mut w, &header, spec.payload).await?;
                started += 1;
            }
        }
        Ok(done)
    }

    async fn send_oneway(&self, conn: &mut RelayConn, payload: &[u8], count: u64) -> Result<()> {
        let header = frame_header(KIND_ONEWAY, payload.len())?;
        for _ in 0..count {
            write_frame(&mut conn.stream, &header, payload).await?;
        }
        Ok(())
    }

    async fn query_count(&self, conn: &mut RelayConn) -> Result<u64> {
        write_frame(&mut conn.stream, &frame_header(KIND_COUNT, 0)?, &[]).await?;
        let (kind, len) = read_header(&mut conn.stream).await?;
        if kind != KIND_REPLY || len != 8 {
            bail!("unexpected answer to a count query (kind {kind}, {len} bytes)");
        }
        let mut count = [0u8; 8];
        conn.stream.read_exact(&mut count).await?;
        Ok(u64::from_le_bytes(count))
    }

    async fn connect_light(&self, address: &str, role: LightRole) -> Result<RelayConn> {
        // The relay has no match rules, so noise connections are plain idle
        // connections.
        let role = match role {
            LightRole::Idle | LightRole::Noise { .. } => ROLE_IDLE,
            LightRole::Subscriber => ROLE_SUB,
            LightRole::Emitter => ROLE_PUB,
        };
        open(address, role, FANOUT_GROUP).await
    }

    async fn emit(&self, emitter: &mut RelayConn, seq: u64) -> Result<()> {
        write_frame(
            &mut emitter.stream,
            &frame_header(KIND_SIGNAL, 8)?,
            &seq.to_le_bytes(),
        )
        .await
    }

    async fn recv_signal(&self, subscriber: &mut RelayConn, seq: u64) -> Result<()> {
        let mut frame = [0u8; FRAME_HEADER + 8];
        subscriber.stream.read_exact(&mut frame).await?;
        let (kind, len) = parse_frame_header(frame[..FRAME_HEADER].try_into().expect("header"));
        let got = u64::from_le_bytes(frame[FRAME_HEADER..].try_into().expect("8 bytes"));
        if kind != KIND_SIGNAL || len != 8 || got != seq {
            bail!("unexpected broadcast (kind {kind}, seq {got}, wanted {seq})");
        }
        Ok(())
    }
}
