//! Worker side of the D-Bus baselines, on zbus.
//!
//! Servers own `org.pbus.Bench.S<n>` and answer from a raw message stream
//! (no object server, no interface macros): `Call` with the reply payload,
//! `Oneway` (sent with NO_REPLY_EXPECTED) by counting, `Count` with the
//! count. Clients use `Connection::call_method` and, for pipelined calls,
//! keep that many of its futures in flight on the one connection. Byte
//! arrays go through `serde_bytes`, so zvariant copies them in one piece.
//! Mass connections use the minimal client in [`super::wire`].

use std::time::Duration;

use anyhow::{Context, Result};
use futures::stream::StreamExt;
use serde_bytes::Bytes;
use zbus::message::{Flags, Message, Type as MessageType};
use zbus::{Connection, MessageStream};

use super::wire::LightConn;
use super::INTERFACE;
use crate::stats::Histogram;
use crate::systems::service::{server_name, METHOD_CALL, METHOD_COUNT, METHOD_ONEWAY, PATH};
use crate::systems::{CallSpec, Client, LightRole};

/// The D-Bus worker-side client.
#[derive(Debug, Default, Clone, Copy)]
pub struct DbusClient;

/// A zbus connection that owns a server name, with its message stream.
pub struct DbusServer {
    conn: Connection,
    stream: MessageStream,
}

/// A zbus connection that calls one server.
pub struct DbusConn {
    conn: Connection,
    destination: String,
}

async fn connect_bus(address: &str, name: Option<String>) -> Result<Connection> {
    let mut builder = zbus::connection::Builder::address(address)?
        // Large payloads take time through dbus-daemon; never let zbus's
        // default method timeout cut a measurement short.
        .method_timeout(Duration::from_secs(3600));
    if let Some(name) = name {
        builder = builder.name(name)?;
    }
    builder
        .build()
        .await
        .with_context(|| format!("connecting to {address}"))
}

impl DbusConn {
    async fn call(&self, payload: &[u8]) -> Result<()> {
        self.conn
            .call_method(
                Some(self.destination.as_str()),
                PATH,
                Some(INTERFACE),
                METHOD_CALL,
                &Bytes::new(payload),
            )
            .await?;
        Ok(())
    }
}

impl Client for DbusClient {
    type Server = DbusServer;
    type Conn = DbusConn;
    type Light = LightConn;

    async fn bind_server(&self, address: &str, target: u32) -> Result<DbusServer> {
        let conn = connect_bus(address, Some(server_name(target))).await?;
        let stream = MessageStream::from(&conn);
        Ok(DbusServer { conn, stream })
    }

    async fn serve(&self, server: DbusServer, reply_size: usize) -> Result<()> {
        let DbusServer { conn, mut stream } = server;
        let reply = vec![0x5Au8; reply_size];
        let mut received: u64 = 0;
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            if msg.message_type() != MessageType::MethodCall {
                continue;
            }
            let header = msg.header();
            match header.member().map(|m| m.as_str()) {
                Some(METHOD_CALL) => conn.reply(&header, &Bytes::new(&reply)).await?,
                Some(METHOD_ONEWAY) => received += 1,
                Some(METHOD_COUNT) => conn.reply(&header, &received).await?,
                _ => {}
            }
        }
        Ok(())
    }

    async fn connect(&self, address: &str, target: u32) -> Result<DbusConn> {
        Ok(DbusConn {
            conn: connect_bus(address, None).await?,
            destination: server_name(target),
        })
    }

    async fn call_loop(
        &self,
        conn: &mut DbusConn,
        spec: &CallSpec<'_>,
        latencies: &mut Histogram,
    ) -> Result<u64> {
        let conn = &*conn;
        spec.run_closed_loop(latencies, || conn.call(spec.payload))
            .await
    }

    async fn send_oneway(&self, conn: &mut DbusConn, payload: &[u8], count: u64) -> Result<()> {
        for _ in 0..count {
            let msg = Message::method_call(PATH, METHOD_ONEWAY)?
                .destination(conn.destination.as_str())?
                .interface(INTERFACE)?
                .with_flags(Flags::NoReplyExpected)?
                .build(&Bytes::new(payload))?;
            conn.conn.send(&msg).await?;
        }
        Ok(())
    }

    async fn query_count(&self, conn: &mut DbusConn) -> Result<u64> {
        let reply = conn
            .conn
            .call_method(
                Some(conn.destination.as_str()),
                PATH,
                Some(INTERFACE),
                METHOD_COUNT,
                &(),
            )
            .await?;
        let count: u64 = reply.body().deserialize()?;
        Ok(count)
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
