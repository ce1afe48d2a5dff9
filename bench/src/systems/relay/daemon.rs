//! The relay process (`pbus-bench relay-server --socket PATH`).
//!
//! One single-threaded tokio runtime, one task per connection. After the
//! hello, a connection's task reads from its own socket and writes what it
//! read straight into the paired socket with `try_write` (waiting for
//! writability only when the peer's buffer is full): no channel, no second
//! task, no framing, no allocation per message. Each direction of a pair
//! has its own task, so the two sockets are each read by one task and
//! written by the other. The forwarding buffer is allocated once per
//! forwarding connection, on first use; idle connections allocate none.
//!
//! Broadcast (the fanout workload): a publisher's task writes each chunk it
//! reads to every subscriber of its group in turn.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, ErrorKind, Write};
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use super::{ACK, HELLO_LEN, ROLE_CLIENT, ROLE_IDLE, ROLE_PUB, ROLE_SERVER, ROLE_SUB};

/// Bytes moved per read; large enough that bulk payloads move in few
/// system calls, and only touched as far as a message needs.
const FORWARD_BUF: usize = 256 * 1024;

/// The subscribers of one broadcast group.
type Group = Rc<RefCell<Vec<Rc<UnixStream>>>>;

/// Registry of the relay: plain data behind `RefCell`, never borrowed
/// across an await.
#[derive(Default)]
struct Registry {
    /// Servers waiting for their client, by key, with the way to hand the
    /// client's socket to the server's task.
    waiting: RefCell<HashMap<u64, oneshot::Sender<Rc<UnixStream>>>>,
    /// Server sockets by key, for the client's task.
    servers: RefCell<HashMap<u64, Rc<UnixStream>>>,
    /// Broadcast groups by key.
    groups: RefCell<HashMap<u64, Group>>,
}

/// Runs the relay on `socket` until killed. Prints `ready` once listening.
pub fn run(socket: &Path) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("building the relay runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener =
            UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        let mut out = io::stdout();
        writeln!(out, "ready")?;
        out.flush()?;
        let registry = Rc::new(Registry::default());
        loop {
            let (stream, _) = listener.accept().await.context("accepting")?;
            let registry = registry.clone();
            tokio::task::spawn_local(async move {
                // A failing connection only ends itself; the bench worker
                // on the other side reports the error.
                let _ = handle(&registry, Rc::new(stream)).await;
            });
        }
    })
}

async fn handle(registry: &Registry, stream: Rc<UnixStream>) -> io::Result<()> {
    let mut hello = [0u8; HELLO_LEN];
    read_exact(&stream, &mut hello).await?;
    let key = u64::from_le_bytes(hello[8..].try_into().expect("8 bytes"));
    match hello[0] {
        ROLE_SERVER => {
            let (tx, rx) = oneshot::channel();
            registry.waiting.borrow_mut().insert(key, tx);
            registry.servers.borrow_mut().insert(key, stream.clone());
            write_all(&stream, &[ACK]).await?;
            let Ok(client) = rx.await else {
                return Ok(()); // replaced by a newer server with this key
            };
            forward(&stream, &client).await
        }
        ROLE_CLIENT => {
            let server = registry.servers.borrow_mut().remove(&key);
            let waiting = registry.waiting.borrow_mut().remove(&key);
            let (Some(server), Some(waiting)) = (server, waiting) else {
                return Err(io::Error::new(ErrorKind::NotFound, "no server for key"));
            };
            if waiting.send(stream.clone()).is_err() {
                return Err(io::Error::new(ErrorKind::BrokenPipe, "server went away"));
            }
            write_all(&stream, &[ACK]).await?;
            forward(&stream, &server).await
        }
        ROLE_SUB => {
            let group = registry.groups.borrow_mut().entry(key).or_default().clone();
            group.borrow_mut().push(stream.clone());
            write_all(&stream, &[ACK]).await?;
            let result = wait_for_eof(&stream).await;
            group.borrow_mut().retain(|s| !Rc::ptr_eq(s, &stream));
            result
        }
        ROLE_PUB => {
            let group = registry.groups.borrow_mut().entry(key).or_default().clone();
            write_all(&stream, &[ACK]).await?;
            broadcast(&stream, &group).await
        }
        ROLE_IDLE => {
            write_all(&stream, &[ACK]).await?;
            wait_for_eof(&stream).await
        }
        _ => Err(io::Error::new(ErrorKind::InvalidData, "unknown role")),
    }
}

/// Copies everything `src` sends into `dst` until `src` closes.
async fn forward(src: &UnixStream, dst: &UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; FORWARD_BUF];
    loop {
        let n = read_some(src, &mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        write_all(dst, &buf[..n]).await?;
    }
}

/// Copies everything `src` sends to every member of `group`, in order.
async fn broadcast(src: &UnixStream, group: &RefCell<Vec<Rc<UnixStream>>>) -> io::Result<()> {
    let mut buf = vec![0u8; FORWARD_BUF];
    loop {
        let n = read_some(src, &mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let mut i = 0;
        loop {
            // Clone one `Rc` at a time so no borrow is held across the await.
            let Some(sub) = group.borrow().get(i).cloned() else {
                break;
            };
            // A subscriber that went away is skipped; its task removes it.
            let _ = write_all(&sub, &buf[..n]).await;
            i += 1;
        }
    }
}

async fn read_some(src: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match src.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => src.readable().await?,
            Err(e) => return Err(e),
        }
    }
}

async fn read_exact(src: &UnixStream, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = read_some(src, buf).await?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
    }
    Ok(())
}

async fn write_all(dst: &UnixStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn wait_for_eof(stream: &UnixStream) -> io::Result<()> {
    let mut scratch = [0u8; 64];
    while read_some(stream, &mut scratch).await? != 0 {}
    Ok(())
}
