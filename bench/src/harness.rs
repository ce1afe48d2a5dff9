//! The harness: picks systems and scenarios, starts a private instance of
//! every system, and runs the workloads in interleaved rounds (round 1 of
//! every workload on every system, then round 2, ...) so that drift of the
//! machine hits all systems alike. Each workload run spawns its worker
//! processes, drives them through the `ready`/`go`/`result` protocol, reads
//! the daemon's CPU time and RSS from /proc, and turns the reports into
//! [`Measurement`]s.
//!
//! The harness knows systems only through [`System`] and workers only
//! through [`Job`]; it never installs anything.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::kill;

use crate::procs::{cpu_time_ns, rss_kib, self_command, ChildProc};
use crate::report::{Measurement, Results};
use crate::scenario::{Plan, Scenario, Workload, REPLY_SIZE};
use crate::stats::Histogram;
use crate::systems::{self, ClientKind, Instance, System};
use crate::worker::{CallReport, ConnectReport, FanoutReport, Job, OnewayReport};

/// Time a worker gets to connect and set up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Grace period for processes asked to exit.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// What the user asked for.
pub struct Options {
    /// Sizes and durations.
    pub plan: Plan,
    /// `--systems`, or every system of the build.
    pub systems: Option<Vec<String>>,
    /// `--scenarios`, or every scenario.
    pub scenarios: Option<Vec<String>>,
}

/// A system taking part in the run.
struct Entrant {
    system: Box<dyn System>,
    /// The instance shared by the workloads that do not need a fresh one.
    shared: Option<Instance>,
}

/// Picks the systems named in `names` (all of the build when `None`), in
/// canonical order.
pub fn select_systems(names: Option<&[String]>) -> Result<Vec<Box<dyn System>>> {
    let all = systems::all();
    let Some(names) = names else {
        return Ok(all);
    };
    for name in names {
        if !all.iter().any(|s| s.name() == name) {
            let known: Vec<&str> = all.iter().map(|s| s.name()).collect();
            bail!("unknown system `{name}` (known: {})", known.join(", "));
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| names.iter().any(|n| n == s.name()))
        .collect())
}

/// Picks the scenarios named in `names` (all when `None`), in report order.
pub fn select_scenarios(names: Option<&[String]>) -> Result<Vec<Scenario>> {
    let Some(names) = names else {
        return Ok(Scenario::ALL.to_vec());
    };
    let mut picked = Vec::new();
    for name in names {
        let s = Scenario::from_name(name).ok_or_else(|| {
            let known: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
            anyhow!("unknown scenario `{name}` (known: {})", known.join(", "))
        })?;
        picked.push(s);
    }
    picked.sort();
    picked.dedup();
    Ok(picked)
}

/// The workloads needed for `scenarios`, each with the scenarios it feeds,
/// in report order.
fn group_workloads(scenarios: &[Scenario]) -> Vec<(Workload, Vec<Scenario>)> {
    let mut groups: Vec<(Workload, Vec<Scenario>)> = Vec::new();
    for &s in scenarios {
        match groups.iter_mut().find(|(w, _)| *w == s.workload()) {
            Some((_, list)) => list.push(s),
            None => groups.push((s.workload(), vec![s])),
        }
    }
    groups
}

async fn start_instance(system: &dyn System) -> Result<Instance> {
    let dir = tempfile::Builder::new()
        .prefix("pbus-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    system
        .start(dir)
        .await
        .with_context(|| format!("starting {}", system.name()))
}

/// Runs the whole benchmark and returns its results. Progress goes to
/// stderr.
pub async fn run(options: &Options) -> Result<Results> {
    let plan = &options.plan;
    let systems = select_systems(options.systems.as_deref())?;
    let scenarios = select_scenarios(options.scenarios.as_deref())?;
    let mut results = Results::default();

    let mut entrants = Vec::new();
    for system in systems {
        if let Err(reason) = system.check_available() {
            eprintln!("skipping {}: {reason}", system.name());
            for &s in &scenarios {
                results.skip(system.name(), s, &format!("unavailable: {reason}"));
            }
            continue;
        }
        for &s in &scenarios {
            if let Some(reason) = system.skip_reason(s) {
                eprintln!("skipping {s} on {}: {reason}", system.name());
                results.skip(system.name(), s, &reason);
            }
        }
        match start_instance(system.as_ref()).await {
            Ok(instance) => entrants.push(Entrant {
                system,
                shared: Some(instance),
            }),
            Err(e) => {
                eprintln!("skipping {}: {e:#}", system.name());
                for &s in &scenarios {
                    results.fail(system.name(), s, &format!("{e:#}"));
                }
            }
        }
    }

    let workloads = group_workloads(&scenarios);
    for round in 1..=plan.rounds {
        for (workload, feeds) in &workloads {
            for entrant in &mut entrants {
                let applicable: Vec<Scenario> = feeds
                    .iter()
                    .copied()
                    .filter(|&s| entrant.system.skip_reason(s).is_none())
                    .collect();
                if applicable.is_empty() {
                    continue;
                }
                let name = entrant.system.name();
                let label = applicable
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join("+");
                match run_workload(entrant, *workload, plan).await {
                    Ok(output) => {
                        eprintln!(
                            "[{round}/{}] {label:<24} {name:<12} {}",
                            plan.rounds,
                            output.summary()
                        );
                        for &s in &applicable {
                            results.add_round(name, s, output.measurement(s));
                        }
                    }
                    Err(e) => {
                        eprintln!(
                            "[{round}/{}] {label:<24} {name:<12} FAILED: {e:#}",
                            plan.rounds
                        );
                        for &s in &applicable {
                            results.fail(name, s, &format!("{e:#}"));
                        }
                    }
                }
            }
        }
    }

    for entrant in entrants {
        if let Some(instance) = entrant.shared {
            instance.stop().await;
        }
    }
    Ok(results)
}

/// What one workload run measured.
#[derive(Debug, Clone, Copy)]
pub enum Output {
    /// Closed-loop calls.
    Calls {
        /// Median latency (us).
        p50_us: f64,
        /// 99th percentile latency (us).
        p99_us: f64,
        /// Calls per second, all clients together.
        per_sec: f64,
    },
    /// One-way stream.
    Oneway {
        /// Messages per second delivered.
        per_sec: f64,
        /// Daemon CPU per message (us).
        cpu_us_per_msg: f64,
    },
    /// Idle connections.
    Connections {
        /// Connections set up per second.
        per_sec: f64,
        /// Daemon RSS growth per connection (KiB).
        rss_kib: f64,
    },
    /// Signal fanout.
    Fanout {
        /// Median time until every subscriber had the signal (us).
        p50_us: f64,
        /// 99th percentile of the same (us).
        p99_us: f64,
    },
}

impl Output {
    /// The figures of `scenario` in this output.
    pub fn measurement(&self, scenario: Scenario) -> Measurement {
        let mut m = Measurement::default();
        match *self {
            Output::Calls {
                p50_us,
                p99_us,
                per_sec,
            } => {
                m.p50_us = Some(p50_us);
                m.p99_us = Some(p99_us);
                m.per_sec = Some(per_sec);
            }
            Output::Oneway {
                per_sec,
                cpu_us_per_msg,
            } => {
                if scenario == Scenario::CpuPerMsg {
                    m.cpu_us_per_msg = Some(cpu_us_per_msg);
                } else {
                    m.per_sec = Some(per_sec);
                }
            }
            Output::Connections { per_sec, rss_kib } => {
                if scenario == Scenario::RssIdle10k {
                    m.rss_kib = Some(rss_kib);
                } else {
                    m.per_sec = Some(per_sec);
                }
            }
            Output::Fanout { p50_us, p99_us } => {
                m.p50_us = Some(p50_us);
                m.p99_us = Some(p99_us);
            }
        }
        m
    }

    fn summary(&self) -> String {
        match *self {
            Output::Calls {
                p50_us,
                p99_us,
                per_sec,
            } => format!("p50 {p50_us:.1} us  p99 {p99_us:.1} us  {per_sec:.0}/s"),
            Output::Oneway {
                per_sec,
                cpu_us_per_msg,
            } => format!("{per_sec:.0} msg/s  {cpu_us_per_msg:.3} us CPU/msg"),
            Output::Connections { per_sec, rss_kib } => {
                format!("{per_sec:.0} conn/s  {rss_kib:.2} KiB/conn")
            }
            Output::Fanout { p50_us, p99_us } => {
                format!("p50 {p50_us:.1} us  p99 {p99_us:.1} us")
            }
        }
    }
}

async fn run_workload(entrant: &mut Entrant, workload: Workload, plan: &Plan) -> Result<Output> {
    let client = entrant.system.client();
    if workload.needs_fresh_instance() {
        let instance = start_instance(entrant.system.as_ref()).await?;
        let result = run_on(client, &instance, workload, plan).await;
        let result = result.map_err(|e| instance.explain(e));
        instance.stop().await;
        return result;
    }
    let alive = entrant
        .shared
        .as_ref()
        .is_some_and(|i| kill(i.measured_pid, None).is_ok());
    if !alive {
        if let Some(dead) = entrant.shared.take() {
            eprintln!("{} died; starting a new instance", entrant.system.name());
            dead.stop().await;
        }
        entrant.shared = Some(start_instance(entrant.system.as_ref()).await?);
    }
    let instance = entrant.shared.as_ref().expect("started above");
    run_on(client, instance, workload, plan)
        .await
        .map_err(|e| instance.explain(e))
}

async fn run_on(
    client: ClientKind,
    instance: &Instance,
    workload: Workload,
    plan: &Plan,
) -> Result<Output> {
    match workload {
        Workload::Calls {
            pairs,
            inflight,
            payload,
        } => run_calls(client, instance, pairs, inflight, payload, plan).await,
        Workload::Oneway { payload } => run_oneway(client, instance, payload, plan).await,
        Workload::Connections { count } => run_connections(client, instance, count, plan).await,
        Workload::Fanout {
            subscribers,
            unrelated_rules,
        } => run_fanout(client, instance, subscribers, unrelated_rules, plan).await,
    }
}

fn spawn_worker(
    client: ClientKind,
    instance: &Instance,
    job: &Job,
    label: String,
) -> Result<ChildProc> {
    let mut cmd = self_command(["worker", "--client", client.arg(), "--address"])?;
    cmd.arg(&instance.address)
        .arg("--job")
        .arg(serde_json::to_string(job)?);
    ChildProc::spawn(cmd, label)
}

async fn stop_all(procs: Vec<ChildProc>) {
    futures::future::join_all(procs.into_iter().map(|p| p.stop(STOP_GRACE))).await;
}

fn parse_report<T: serde::de::DeserializeOwned>(proc: &ChildProc, text: &str) -> Result<T> {
    serde_json::from_str(text).with_context(|| format!("{}: bad report `{text}`", proc.name()))
}

/// Time allowed for moving `bytes` `calls` times, on top of a fixed margin;
/// only bounds a hang, never a healthy run.
fn transfer_allowance(bytes: usize, calls: u64) -> Duration {
    let slow_rate = 20.0 * 1024.0 * 1024.0; // bytes per second
    Duration::from_secs_f64(60.0 + bytes as f64 * (calls + 1) as f64 / slow_rate)
}

async fn run_calls(
    client: ClientKind,
    instance: &Instance,
    pairs: u32,
    inflight: usize,
    payload: usize,
    plan: &Plan,
) -> Result<Output> {
    let bulk = payload > 64 * 1024;
    let (duration, min_calls) = if bulk {
        (plan.bulk_duration, plan.bulk_min_calls)
    } else {
        (plan.call_duration, 0)
    };
    // A warm-up call of 256 MiB or more costs as much as the measurement;
    // the quick plan leaves it out for those.
    let warmup_min_calls = if payload >= 256 << 20 && plan.bulk_min_calls <= 1 {
        0
    } else {
        1
    };
    let warmup_ms = if bulk {
        0
    } else {
        plan.warmup.as_millis() as u64
    };

    let mut servers = Vec::new();
    for target in 0..pairs {
        let job = Job::Serve {
            target,
            reply_size: REPLY_SIZE,
        };
        servers.push(spawn_worker(
            client,
            instance,
            &job,
            format!("server {target}"),
        )?);
    }
    for s in &mut servers {
        s.expect("ready", SETUP_TIMEOUT).await?;
    }
    let mut clients = Vec::new();
    for target in 0..pairs {
        let job = Job::Call {
            target,
            payload,
            inflight,
            warmup_ms,
            warmup_min_calls,
            duration_ms: duration.as_millis() as u64,
            min_calls,
        };
        clients.push(spawn_worker(
            client,
            instance,
            &job,
            format!("client {target}"),
        )?);
    }
    let allowance = transfer_allowance(payload, min_calls.max(1));
    for c in &mut clients {
        c.expect("ready", SETUP_TIMEOUT + allowance).await?;
    }
    for c in &mut clients {
        c.send_line("go").await?;
    }
    let mut latencies = Histogram::new();
    let mut per_sec = 0.0;
    for c in &mut clients {
        let text = c.expect("result", duration + allowance).await?;
        let report: CallReport = parse_report(c, &text)?;
        let mine = Histogram::from_sparse(&report.latencies);
        if mine.is_empty() || mine.len() != report.calls {
            bail!(
                "{} reported {} calls and {} latencies",
                c.name(),
                report.calls,
                mine.len()
            );
        }
        latencies.merge(&mine);
        per_sec += report.calls as f64 / report.elapsed_s;
    }
    stop_all(clients).await;
    stop_all(servers).await;
    let us = |q: f64| latencies.quantile(q).unwrap_or(0) as f64 / 1000.0;
    Ok(Output::Calls {
        p50_us: us(0.50),
        p99_us: us(0.99),
        per_sec,
    })
}

async fn run_oneway(
    client: ClientKind,
    instance: &Instance,
    payload: usize,
    plan: &Plan,
) -> Result<Output> {
    let mut server = spawn_worker(
        client,
        instance,
        &Job::Serve {
            target: 0,
            reply_size: REPLY_SIZE,
        },
        "receiver".into(),
    )?;
    server.expect("ready", SETUP_TIMEOUT).await?;
    let job = Job::Oneway {
        target: 0,
        payload,
        messages: plan.oneway_messages,
        batch: plan.oneway_batch,
    };
    let mut sender = spawn_worker(client, instance, &job, "sender".into())?;
    sender.expect("ready", SETUP_TIMEOUT).await?;
    let cpu_before = cpu_time_ns(instance.measured_pid)?;
    sender.send_line("go").await?;
    let text = sender.expect("result", SETUP_TIMEOUT).await?;
    let cpu_after = cpu_time_ns(instance.measured_pid)?;
    let report: OnewayReport = parse_report(&sender, &text)?;
    stop_all(vec![sender, server]).await;
    let messages = report.messages.max(1) as f64;
    Ok(Output::Oneway {
        per_sec: report.messages as f64 / report.elapsed_s,
        cpu_us_per_msg: cpu_after.saturating_sub(cpu_before) as f64 / 1000.0 / messages,
    })
}

async fn run_connections(
    client: ClientKind,
    instance: &Instance,
    count: usize,
    plan: &Plan,
) -> Result<Output> {
    let job = Job::Connections {
        count,
        concurrency: plan.connect_concurrency,
    };
    let mut holder = spawn_worker(client, instance, &job, "connection holder".into())?;
    holder.expect("ready", SETUP_TIMEOUT).await?;
    let rss_before = rss_kib(instance.measured_pid)?;
    holder.send_line("go").await?;
    let text = holder.expect("result", SETUP_TIMEOUT).await?;
    let rss_after = rss_kib(instance.measured_pid)?;
    let report: ConnectReport = parse_report(&holder, &text)?;
    stop_all(vec![holder]).await;
    Ok(Output::Connections {
        per_sec: report.connections as f64 / report.elapsed_s,
        rss_kib: (rss_after as f64 - rss_before as f64) / report.connections.max(1) as f64,
    })
}

async fn run_fanout(
    client: ClientKind,
    instance: &Instance,
    subscribers: usize,
    unrelated_rules: usize,
    plan: &Plan,
) -> Result<Output> {
    let job = Job::Fanout {
        subscribers,
        noise_connections: plan.noise_connections,
        unrelated_rules,
        reps: plan.fanout_reps,
        concurrency: plan.connect_concurrency,
    };
    let mut audience = spawn_worker(client, instance, &job, "fanout".into())?;
    audience.expect("ready", SETUP_TIMEOUT).await?;
    audience.send_line("go").await?;
    let text = audience.expect("result", SETUP_TIMEOUT).await?;
    let report: FanoutReport = parse_report(&audience, &text)?;
    stop_all(vec![audience]).await;
    let mut latencies = report.latencies_ns;
    if latencies.is_empty() {
        bail!("no fanout measured");
    }
    latencies.sort_unstable();
    let at = |q: f64| {
        let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1] as f64 / 1000.0
    };
    Ok(Output::Fanout {
        p50_us: at(0.50),
        p99_us: at(0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_selection() {
        let all = select_scenarios(None).unwrap();
        assert_eq!(all, Scenario::ALL.to_vec());
        let picked = select_scenarios(Some(&["cpu_per_msg".into(), "rt64_1pair".into()])).unwrap();
        assert_eq!(picked, vec![Scenario::Rt64OnePair, Scenario::CpuPerMsg]);
        assert!(select_scenarios(Some(&["bogus".into()])).is_err());
    }

    #[test]
    fn system_selection() {
        let picked = select_systems(Some(&["dbus-daemon".into(), "relay".into()])).unwrap();
        let names: Vec<&str> = picked.iter().map(|s| s.name()).collect();
        assert_eq!(names, vec!["relay", "dbus-daemon"]);
        let err = select_systems(Some(&["nope".into()])).err().unwrap();
        assert!(err.to_string().contains("unknown system `nope`"), "{err}");
        // Every system the bench knows is in this build, in report order.
        let built: Vec<&str> = systems::all().iter().map(|s| s.name()).collect();
        assert_eq!(built, systems::CANONICAL_ORDER);
    }

    #[test]
    fn shared_workloads_run_once() {
        let groups = group_workloads(&[
            Scenario::Oneway64,
            Scenario::CpuPerMsg,
            Scenario::RssIdle10k,
        ]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].1, vec![Scenario::Oneway64, Scenario::CpuPerMsg]);
    }
}
