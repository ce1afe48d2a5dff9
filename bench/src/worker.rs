//! Worker processes: the bench binary re-executed as `pbus-bench worker
//! --client KIND --address ADDR --job JSON` to play one part of a workload
//! (a server, a caller, a streamer, a crowd of bare connections, a fanout
//! audience).
//!
//! The loops here are generic over [`Client`], so every system is timed
//! and counted by the same code. Control is a line protocol with the
//! harness: the worker sets up, prints `ready`, waits for `go` on stdin,
//! runs, prints `result <json>`; servers and connection holders keep going
//! until their stdin closes. One single-threaded tokio runtime per worker.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::{self, FuturesUnordered, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};

use crate::procs::die_with_parent;
use crate::stats::{Histogram, SparseHistogram};
use crate::systems::dbus::client::DbusClient;
use crate::systems::pbus::client::PbusClient;
use crate::systems::relay::client::RelayClient;
use crate::systems::{CallSpec, Client, ClientKind, LightRole};

/// What a worker is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum Job {
    /// Be server number `target` until stdin closes.
    Serve {
        /// Server number (D-Bus name suffix, relay key).
        target: u32,
        /// Bytes in each reply.
        reply_size: usize,
    },
    /// Call server `target` in a closed loop; report a [`CallReport`].
    Call {
        /// Server number to call.
        target: u32,
        /// Request payload in bytes.
        payload: usize,
        /// Calls kept outstanding.
        inflight: usize,
        /// Unmeasured warm-up time before `ready`.
        warmup_ms: u64,
        /// Calls the warm-up makes at least.
        warmup_min_calls: u64,
        /// Measured time after `go`.
        duration_ms: u64,
        /// Calls the measurement makes at least.
        min_calls: u64,
    },
    /// Stream one-way messages to server `target`; report a
    /// [`OnewayReport`].
    Oneway {
        /// Server number to stream to.
        target: u32,
        /// Message payload in bytes.
        payload: usize,
        /// Messages to send.
        messages: u64,
        /// Messages between two count queries (flow control).
        batch: u64,
    },
    /// Open `count` idle connections after `go`, report a
    /// [`ConnectReport`], hold them until stdin closes.
    Connections {
        /// Connections to open.
        count: usize,
        /// Handshakes in progress at once.
        concurrency: usize,
    },
    /// Set up subscribers and unrelated rules, then after `go` emit the
    /// signal `reps` times; report a [`FanoutReport`].
    Fanout {
        /// Subscribed connections.
        subscribers: usize,
        /// Connections holding the unrelated rules.
        noise_connections: usize,
        /// Unrelated match rules in total.
        unrelated_rules: usize,
        /// Signals to emit.
        reps: usize,
        /// Handshakes in progress at once during set-up.
        concurrency: usize,
    },
}

/// Result of a [`Job::Call`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallReport {
    /// Calls completed in the measured run.
    pub calls: u64,
    /// Length of the measured run in seconds.
    pub elapsed_s: f64,
    /// Latency of every measured call, in nanoseconds.
    pub latencies: SparseHistogram,
}

/// Result of a [`Job::Oneway`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OnewayReport {
    /// Messages the server confirmed it received.
    pub messages: u64,
    /// Seconds from the first send to the final acknowledgement.
    pub elapsed_s: f64,
}

/// Result of a [`Job::Connections`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectReport {
    /// Connections opened (handshake complete).
    pub connections: u64,
    /// Seconds it took to open all of them.
    pub elapsed_s: f64,
}

/// Result of a [`Job::Fanout`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanoutReport {
    /// For each emitted signal, nanoseconds from just before the emit until
    /// the last subscriber had read it.
    pub latencies_ns: Vec<u64>,
}

/// Entry point of `pbus-bench worker`.
pub fn run(kind: ClientKind, address: &str, job: &str) -> Result<()> {
    die_with_parent()?;
    let job: Job = serde_json::from_str(job).context("parsing --job")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the worker runtime")?;
    runtime.block_on(async {
        match kind {
            ClientKind::Relay => drive(&RelayClient, address, job).await,
            ClientKind::Dbus => drive(&DbusClient, address, job).await,
            ClientKind::Pbus => drive(&PbusClient { from_vec: false }, address, job).await,
            ClientKind::PbusVec => drive(&PbusClient { from_vec: true }, address, job).await,
        }
    })
}

/// The harness's end of the control protocol: lines on stdin.
struct Control {
    lines: Lines<BufReader<Stdin>>,
}

impl Control {
    fn new() -> Control {
        Control {
            lines: BufReader::new(tokio::io::stdin()).lines(),
        }
    }

    async fn wait_go(&mut self) -> Result<()> {
        match self.lines.next_line().await? {
            Some(line) if line.trim() == "go" => Ok(()),
            Some(line) => bail!("expected `go`, got `{line}`"),
            None => bail!("the harness went away"),
        }
    }

    /// Resolves when the harness closes stdin.
    async fn closed(&mut self) {
        while let Ok(Some(_)) = self.lines.next_line().await {}
    }
}

fn say(word: &str, payload: Option<String>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match payload {
        Some(p) => writeln!(out, "{word} {p}")?,
        None => writeln!(out, "{word}")?,
    }
    out.flush()?;
    Ok(())
}

fn report<T: Serialize>(value: &T) -> Result<()> {
    say("result", Some(serde_json::to_string(value)?))
}

/// A payload of `len` bytes, every page touched.
fn payload(len: usize) -> Vec<u8> {
    vec![0xA5; len]
}

async fn drive<C: Client>(client: &C, address: &str, job: Job) -> Result<()> {
    let mut control = Control::new();
    match job {
        Job::Serve { target, reply_size } => {
            let server = client.bind_server(address, target).await?;
            say("ready", None)?;
            tokio::select! {
                r = client.serve(server, reply_size) => r,
                () = control.closed() => Ok(()),
            }
        }
        Job::Call {
            target,
            payload: size,
            inflight,
            warmup_ms,
            warmup_min_calls,
            duration_ms,
            min_calls,
        } => {
            let mut conn = client.connect(address, target).await?;
            let payload = payload(size);
            let warmup = CallSpec {
                payload: &payload,
                inflight,
                deadline: Instant::now() + Duration::from_millis(warmup_ms),
                min_calls: warmup_min_calls,
            };
            client
                .call_loop(&mut conn, &warmup, &mut Histogram::new())
                .await
                .context("warm-up")?;
            say("ready", None)?;
            control.wait_go().await?;
            let mut latencies = Histogram::new();
            let start = Instant::now();
            let spec = CallSpec {
                deadline: start + Duration::from_millis(duration_ms),
                min_calls,
                ..warmup
            };
            let calls = client.call_loop(&mut conn, &spec, &mut latencies).await?;
            let elapsed = start.elapsed();
            report(&CallReport {
                calls,
                elapsed_s: elapsed.as_secs_f64(),
                latencies: latencies.to_sparse(),
            })
        }
        Job::Oneway {
            target,
            payload: size,
            messages,
            batch,
        } => {
            let mut conn = client.connect(address, target).await?;
            let payload = payload(size);
            // Warm the path up and learn the server's starting count.
            client.send_oneway(&mut conn, &payload, 64).await?;
            let before = client.query_count(&mut conn).await?;
            say("ready", None)?;
            control.wait_go().await?;
            let start = Instant::now();
            let mut sent = 0;
            let mut counted = before;
            while sent < messages {
                let n = batch.max(1).min(messages - sent);
                client.send_oneway(&mut conn, &payload, n).await?;
                sent += n;
                // The answer travels behind the batch: everything sent so
                // far has been delivered when it arrives.
                counted = client.query_count(&mut conn).await?;
            }
            let elapsed = start.elapsed();
            if counted - before != messages {
                bail!(
                    "the server counted {} one-way messages, {messages} were sent",
                    counted - before
                );
            }
            report(&OnewayReport {
                messages,
                elapsed_s: elapsed.as_secs_f64(),
            })
        }
        Job::Connections { count, concurrency } => {
            say("ready", None)?;
            control.wait_go().await?;
            let start = Instant::now();
            let conns: Vec<C::Light> = stream::iter(0..count)
                .map(|_| client.connect_light(address, LightRole::Idle))
                .buffer_unordered(concurrency.max(1))
                .try_collect()
                .await?;
            let elapsed = start.elapsed();
            report(&ConnectReport {
                connections: conns.len() as u64,
                elapsed_s: elapsed.as_secs_f64(),
            })?;
            control.closed().await;
            drop(conns);
            Ok(())
        }
        Job::Fanout {
            subscribers,
            noise_connections,
            unrelated_rules,
            reps,
            concurrency,
        } => {
            let noise_connections = noise_connections.max(1);
            let per_connection = unrelated_rules.div_ceil(noise_connections);
            let noise: Vec<C::Light> = stream::iter(0..noise_connections)
                .map(|i| {
                    let first = i * per_connection;
                    let rules = per_connection.min(unrelated_rules.saturating_sub(first));
                    client.connect_light(address, LightRole::Noise { rules, first })
                })
                .buffer_unordered(concurrency.max(1))
                .try_collect()
                .await
                .context("installing the unrelated match rules")?;
            let mut subs: Vec<C::Light> = stream::iter(0..subscribers)
                .map(|_| client.connect_light(address, LightRole::Subscriber))
                .buffer_unordered(concurrency.max(1))
                .try_collect()
                .await
                .context("connecting the subscribers")?;
            let mut emitter = client.connect_light(address, LightRole::Emitter).await?;
            say("ready", None)?;
            control.wait_go().await?;
            let mut latencies_ns = Vec::with_capacity(reps);
            for rep in 0..reps {
                let seq = rep as u64 + 1;
                let mut receipts: FuturesUnordered<_> = subs
                    .iter_mut()
                    .map(|s| client.recv_signal(s, seq))
                    .collect();
                let t0 = Instant::now();
                client.emit(&mut emitter, seq).await?;
                while let Some(r) = receipts.next().await {
                    r.context("waiting for the signal")?;
                }
                latencies_ns.push(t0.elapsed().as_nanos() as u64);
                drop(receipts);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            drop(noise);
            report(&FanoutReport { latencies_ns })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_round_trip_as_json() {
        let job = Job::Call {
            target: 3,
            payload: 64,
            inflight: 16,
            warmup_ms: 10,
            warmup_min_calls: 1,
            duration_ms: 100,
            min_calls: 0,
        };
        let text = serde_json::to_string(&job).unwrap();
        assert!(text.contains("\"job\":\"call\""));
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), job);
    }
}
