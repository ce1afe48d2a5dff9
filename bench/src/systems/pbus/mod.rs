//! The `pbus` system: `pbusd` with the `pbus` client library, and
//! `pbus-vec`, the same for the large-payload scenarios only, with the
//! payload handed to the library as a `Vec` (copied into a fresh memfd on
//! every call) instead of an already sealed memfd (the zero-copy API the
//! `pbus` rows use). `pbus-base` is `pbus` with another `pbusd` binary,
//! `$PBUSD_BASELINE_BIN` (an earlier build, say), so that a change to the
//! daemon is measured against its predecessor in the same run.
//!
//! - The harness side starts `pbusd` privately on a socket in the instance
//!   directory (`--listen`, `--print-address`, a configuration with the
//!   limits raised to what the workloads need), through `pbus-bench
//!   exec-child` so that it dies with the harness.
//! - [`client`] is the worker side, on the `pbus` library.
//! - [`wire`] is a minimal pbus client built on `pbus-proto` framing for the
//!   mass-connection workloads (idle connections, connect rate, fanout
//!   subscribers and unrelated match rules), like the D-Bus `wire` client,
//!   so that the daemon, not a client library, is what is measured there.

pub mod client;
pub mod wire;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::future::LocalBoxFuture;
use tempfile::TempDir;

use crate::procs::{self_command, ChildProc, LogTail};
use crate::scenario::Scenario;
use crate::systems::{ClientKind, Instance, System};

/// Limits raised so no workload hits them (10,000 connections from one
/// uid, 10,000 match rules on a few connections, GiB payloads in memfds).
const CONFIG: &str = "[limits]
max_connections = 60000
max_connections_per_uid = 60000
max_incomplete_handshakes = 4096
max_incomplete_handshakes_per_uid = 4096
max_matches_per_connection = 100000
max_pending_calls_per_connection = 100000
max_queued_messages_per_receiver = 1000000
max_queued_bytes_per_receiver = 1073741824
max_queued_bytes_total = 4294967296
";

/// Where `pbusd` is: `$PBUSD_BIN`, next to this binary (cargo puts every
/// workspace binary in the same directory), or on `PATH`.
fn pbusd_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PBUSD_BIN") {
        return Some(PathBuf::from(path));
    }
    let beside = std::env::current_exe().ok()?.with_file_name("pbusd");
    if beside.exists() {
        return Some(beside);
    }
    crate::procs::find_program("pbusd")
}

/// The baseline `pbusd` of the `pbus-base` system.
fn baseline_pbusd_path() -> Option<PathBuf> {
    std::env::var_os("PBUSD_BASELINE_BIN").map(PathBuf::from)
}

/// The pbus system (zero-copy payloads), its from-a-`Vec` variant, or the
/// zero-copy system on a baseline daemon.
pub struct Pbus {
    /// Large payloads from a `Vec` (copied into a memfd per call).
    pub from_vec: bool,
    /// Run `$PBUSD_BASELINE_BIN` instead of the daemon under test.
    pub baseline: bool,
}

impl Pbus {
    /// `pbus`.
    pub const ZERO_COPY: Self = Self {
        from_vec: false,
        baseline: false,
    };
    /// `pbus-vec`.
    pub const FROM_VEC: Self = Self {
        from_vec: true,
        baseline: false,
    };
    /// `pbus-base`.
    pub const BASELINE: Self = Self {
        from_vec: false,
        baseline: true,
    };

    fn program(&self) -> Option<PathBuf> {
        if self.baseline {
            baseline_pbusd_path()
        } else {
            pbusd_path()
        }
    }
}

impl System for Pbus {
    fn name(&self) -> &'static str {
        match (self.from_vec, self.baseline) {
            (true, _) => "pbus-vec",
            (false, true) => "pbus-base",
            (false, false) => "pbus",
        }
    }

    fn client(&self) -> ClientKind {
        if self.from_vec {
            ClientKind::PbusVec
        } else {
            ClientKind::Pbus
        }
    }

    fn version(&self) -> Option<String> {
        Some(format!("pbusd {}", env!("CARGO_PKG_VERSION")))
    }

    fn check_available(&self) -> Result<(), String> {
        if self.baseline && baseline_pbusd_path().is_none() {
            return Err("set $PBUSD_BASELINE_BIN to the pbusd to compare against".into());
        }
        match self.program() {
            Some(path) if path.exists() => Ok(()),
            _ => Err(
                "`pbusd` not found next to pbus-bench, on PATH or in $PBUSD_BIN \
                      (cargo build --release --workspace builds it)"
                    .into(),
            ),
        }
    }

    fn skip_reason(&self, scenario: Scenario) -> Option<String> {
        let large = matches!(
            scenario,
            Scenario::Rt1MiB | Scenario::Rt16MiB | Scenario::Rt256MiB | Scenario::Rt1GiB
        );
        (self.from_vec && !large).then(|| {
            "pbus-vec only differs from pbus for payloads above the memfd threshold".into()
        })
    }

    fn start(&self, dir: TempDir) -> LocalBoxFuture<'_, Result<Instance>> {
        Box::pin(async move {
            let program = self.program().context("pbusd disappeared")?;
            start_pbusd(&program, dir).await
        })
    }
}

async fn start_pbusd(program: &Path, dir: TempDir) -> Result<Instance> {
    let socket = dir.path().join("bus.sock");
    let config = dir.path().join("pbusd.toml");
    std::fs::write(&config, CONFIG).context("writing the pbusd configuration")?;
    let mut cmd = self_command(["exec-child", "--"])?;
    cmd.arg(program)
        .arg("--listen")
        .arg(&socket)
        .arg("--config")
        .arg(&config)
        .arg("--print-address")
        .env("RUST_LOG", "warn");
    let log = LogTail::default();
    let mut proc = ChildProc::spawn_logged(cmd, "pbusd", &log)?;
    let printed = match proc.read_line(Duration::from_secs(10)).await {
        Ok(line) => line,
        Err(e) => return Err(log.explain(e, "pbusd")),
    };
    if !printed.starts_with("unix:path=") {
        bail!("pbusd printed an unexpected address: {printed}");
    }
    let pid = proc.pid();
    let mut instance = Instance::new(printed.trim().to_owned(), pid, vec![proc], dir);
    instance.set_log(log, None);
    Ok(instance)
}
