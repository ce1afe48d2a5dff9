//! The `dbus-daemon` system: the reference D-Bus daemon, started privately.
//!
//! `dbus-daemon --config-file=<generated> --nofork --nopidfile
//! --print-address`, listening on a socket in the instance directory. It is
//! started through `pbus-bench exec-child` so that it dies with the harness
//! even if the harness is SIGKILLed; the pid stays the daemon's.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::future::LocalBoxFuture;
use tempfile::TempDir;

use super::{address_of, bus_config};
use crate::procs::{find_program, self_command, version_of, ChildProc, LogTail};
use crate::scenario::Scenario;
use crate::systems::{ClientKind, Instance, System};

const PROGRAM: &str = "dbus-daemon";

/// The dbus-daemon system.
pub struct DbusDaemon;

impl System for DbusDaemon {
    fn name(&self) -> &'static str {
        "dbus-daemon"
    }

    fn client(&self) -> ClientKind {
        ClientKind::Dbus
    }

    fn version(&self) -> Option<String> {
        version_of(PROGRAM)
    }

    fn check_available(&self) -> Result<(), String> {
        find_program(PROGRAM)
            .map(|_| ())
            .ok_or_else(|| format!("`{PROGRAM}` not found on PATH (Debian: package dbus-daemon)"))
    }

    fn skip_reason(&self, scenario: Scenario) -> Option<String> {
        super::skip_reason(scenario)
    }

    fn start(&self, dir: TempDir) -> LocalBoxFuture<'_, Result<Instance>> {
        Box::pin(async move {
            let program = find_program(PROGRAM).context("dbus-daemon disappeared")?;
            let socket = dir.path().join("bus.sock");
            let address = address_of(&socket);
            let config = dir.path().join("bus.conf");
            std::fs::write(&config, bus_config(Some(&address)))
                .context("writing the dbus-daemon configuration")?;

            let mut cmd = self_command(["exec-child", "--"])?;
            cmd.arg(program)
                .arg(format!("--config-file={}", config.display()))
                .args(["--nofork", "--nopidfile", "--print-address"]);
            // Its warnings (e.g. that it may not raise its own fd limit)
            // only matter when something fails.
            let log = LogTail::default();
            let mut proc = ChildProc::spawn_logged(cmd, "dbus-daemon", &log)?;
            let printed = match proc.read_line(Duration::from_secs(10)).await {
                Ok(line) => line,
                Err(e) => return Err(log.explain(e, "dbus-daemon")),
            };
            if !printed.starts_with("unix:") {
                bail!("dbus-daemon printed an unexpected address: {printed}");
            }
            let pid = proc.pid();
            let mut instance = Instance::new(address, pid, vec![proc], dir);
            instance.set_log(log, None);
            Ok(instance)
        })
    }
}
