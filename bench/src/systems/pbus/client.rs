//! Worker side of the pbus system, on the `pbus` client library.
//!
//! Servers own `org.pbus.Bench.S<n>` and serve `Call` (answered with the
//! reply payload), `Oneway` (sent without expecting a reply; counted) and
//! `Count` (answered with the count as a u64). Handlers run inline in the
//! library's reader until their first await, so a reply leaves without a
//! task switch. Clients keep `inflight` calls outstanding on one
//! connection. Payloads above the library's memfd threshold travel as
//! sealed memfds: for `pbus` the payload is sealed into a memfd once, before
//! the timed loop, and the same memfd is sent with every call (the
//! zero-copy API); for `pbus-vec` each call hands the library a `Vec`, which
//! it copies into a fresh memfd. The server maps what it receives (the
//! library does that) but does not read it.
//! Mass connections use the minimal client in [`super::wire`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pbus::{Connection, Outgoing, RequestNameFlags, RequestNameResult, SealedMemfd};

use super::wire::LightConn;
use crate::stats::Histogram;
use crate::systems::service::{server_name, METHOD_CALL, METHOD_COUNT, METHOD_ONEWAY, PATH};
use crate::systems::{CallSpec, Client, LightRole};

/// Calls wait this long at most; large payloads on a loaded machine are slow.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The pbus worker-side client.
#[derive(Debug, Default, Clone, Copy)]
pub struct PbusClient {
    /// Hand large payloads over as a `Vec` instead of a sealed memfd.
    pub from_vec: bool,
}

/// A connection that owns a server name.
pub struct PbusServer {
    conn: Connection,
}

/// A connection that calls one server.
pub struct PbusConn {
    conn: Connection,
    destination: String,
}

async fn connect_bus(address: &str, name: &str) -> Result<Connection> {
    let address: pbus::Address = address.parse().context("parsing the pbus address")?;
    Connection::builder()
        .address(address)
        .client_name(name)
        .build()
        .await
        .context("connecting to pbusd")
}

/// Builds the request for each call: inline bytes, or the shared memfd.
enum Request {
    Inline(Vec<u8>),
    Memfd(SealedMemfd),
}

impl Request {
    fn new(payload: &[u8], from_vec: bool) -> Result<Request> {
        if payload.len() > pbus::DEFAULT_MEMFD_THRESHOLD && !from_vec {
            return Ok(Request::Memfd(SealedMemfd::from_bytes(payload)?));
        }
        Ok(Request::Inline(payload.to_vec()))
    }

    fn outgoing(&self) -> Result<Outgoing> {
        Ok(match self {
            Request::Inline(bytes) => Outgoing::raw("", bytes.clone()),
            Request::Memfd(memfd) => Outgoing::from_memfd("", memfd.try_clone()?),
        })
    }
}

impl PbusConn {
    async fn call(&self, request: Outgoing) -> Result<()> {
        self.conn
            .method_call(&self.destination, METHOD_CALL)
            .path(PATH)
            .timeout(CALL_TIMEOUT)
            .send(request)
            .await?;
        Ok(())
    }
}

impl Client for PbusClient {
    type Server = PbusServer;
    type Conn = PbusConn;
    type Light = LightConn;

    async fn bind_server(&self, address: &str, target: u32) -> Result<PbusServer> {
        let conn = connect_bus(address, "bench-server").await?;
        let name = server_name(target);
        let result = conn
            .request_name(&name, RequestNameFlags::default())
            .await?;
        if result != RequestNameResult::PrimaryOwner {
            bail!("could not own {name}: {result:?}");
        }
        Ok(PbusServer { conn })
    }

    async fn serve(&self, server: PbusServer, reply_size: usize) -> Result<()> {
        let PbusServer { conn } = server;
        let reply = Arc::new(vec![0x5Au8; reply_size]);
        let received = Arc::new(AtomicU64::new(0));
        conn.serve_raw(METHOD_CALL, move |_call| {
            let reply = Arc::clone(&reply);
            async move { Ok(Outgoing::raw("", reply.as_ref().clone())) }
        })?;
        let counter = Arc::clone(&received);
        conn.serve_raw(METHOD_ONEWAY, move |_call| {
            counter.fetch_add(1, Ordering::Relaxed);
            async { Ok(Outgoing::default()) }
        })?;
        conn.serve_raw(METHOD_COUNT, move |_call| {
            let count = received.load(Ordering::Relaxed);
            async move { Ok(Outgoing::raw("", count.to_le_bytes().to_vec())) }
        })?;
        conn.closed().await;
        Ok(())
    }

    async fn connect(&self, address: &str, target: u32) -> Result<PbusConn> {
        Ok(PbusConn {
            conn: connect_bus(address, "bench-client").await?,
            destination: server_name(target),
        })
    }

    async fn call_loop(
        &self,
        conn: &mut PbusConn,
        spec: &CallSpec<'_>,
        latencies: &mut Histogram,
    ) -> Result<u64> {
        let conn = &*conn;
        let request = Request::new(spec.payload, self.from_vec)?;
        spec.run_closed_loop(latencies, || async { conn.call(request.outgoing()?).await })
            .await
    }

    async fn send_oneway(&self, conn: &mut PbusConn, payload: &[u8], count: u64) -> Result<()> {
        for _ in 0..count {
            conn.conn
                .method_call(&conn.destination, METHOD_ONEWAY)
                .path(PATH)
                .no_reply()
                .send(Outgoing::raw("", payload.to_vec()))
                .await?;
        }
        Ok(())
    }

    async fn query_count(&self, conn: &mut PbusConn) -> Result<u64> {
        let reply = conn
            .conn
            .method_call(&conn.destination, METHOD_COUNT)
            .path(PATH)
            .timeout(CALL_TIMEOUT)
            .send(Outgoing::default())
            .await?
            .context("Count answered nothing")?;
        let bytes: [u8; 8] = reply
            .body()
            .as_bytes()
            .try_into()
            .context("Count answered something other than a u64")?;
        Ok(u64::from_le_bytes(bytes))
    }

    async fn connect_light(&self, address: &str, role: LightRole) -> Result<LightConn> {
        LightConn::connect(address, role).await
    }

    async fn emit(&self, emitter: &mut LightConn, seq: u64) -> Result<()> {
        emitter.emit(seq).await
    }

    async fn recv_signal(&self, subscriber: &mut LightConn, seq: u64) -> Result<()> {
        subscriber.recv_signal(seq).await
    }
}
