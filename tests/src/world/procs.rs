//! Process guards: the controller (`bitmesh run`) in the gateway namespace and client
//! agents (`bitmesh pay`) in client namespaces. Each borrows the [`World`], so it is
//! stopped before the namespaces go; each is killed on drop, also on panic.
//!
//! Both are started by [`crate::process`] (the controller through its shared guard,
//! [`ControllerProcess`]); in the demo, children get their own process group
//! ([`crate::process::use_own_process_groups`]):
//! a Ctrl-C in its terminal reaches only the demo, which then stops them in order
//! (agents first, then the controller).

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{gateway_url, World, API_PORT};
use crate::process::{kill_child, spawn_logged, stop_child, ControllerProcess, OnDrop, RunSpec};

/// `bitmesh run` settings the tests and the demo vary. Prices and sizes are chosen so
/// that a few MiB cost a few thousand sat: small downloads cross chunk boundaries.
#[derive(Debug, Clone)]
pub struct ControllerOpts {
    /// `--price-msat-per-mib`.
    pub price_msat_per_mib: u64,
    /// `--chunk-bytes`.
    pub chunk_bytes: u64,
    /// `--low-water-bytes`.
    pub low_water_bytes: u64,
    /// `--idle-timeout-secs`.
    pub idle_timeout_secs: u64,
    /// `--snapshot-interval-secs`.
    pub snapshot_interval_secs: u64,
    /// Any further flags.
    pub extra: Vec<String>,
}

impl Default for ControllerOpts {
    fn default() -> Self {
        ControllerOpts {
            // 1000 sat per MiB.
            price_msat_per_mib: 1_000_000,
            chunk_bytes: 2 * 1024 * 1024,
            low_water_bytes: 1024 * 1024,
            idle_timeout_secs: 3600,
            snapshot_interval_secs: 2,
            extra: Vec::new(),
        }
    }
}

/// The world's controller: a thin layer over [`ControllerProcess`] (reached through
/// `Deref`: `cli`, `clients`, `client(mac)`, `channel(mac)`, `log_tail`, ...), started
/// in the gateway namespace on the world's bridge, data dir, pin dir and node. It
/// borrows the [`World`], so it is stopped before the namespaces go; SIGTERM then
/// SIGKILL on drop.
pub struct Controller<'w> {
    _world: &'w World,
    process: ControllerProcess,
    /// Its log (stdout and stderr), appended to by every controller of the world.
    pub log: PathBuf,
}

impl<'w> Controller<'w> {
    pub(super) fn start(world: &'w World, opts: &ControllerOpts) -> Result<Controller<'w>> {
        std::fs::create_dir_all(world.data_dir())?;
        let log = world.dir.path().join("controller.log");
        let mut flags: Vec<String> = vec!["--chain".into(), "bitcoind".into()];
        for (flag, value) in [
            ("--price-msat-per-mib", opts.price_msat_per_mib),
            ("--chunk-bytes", opts.chunk_bytes),
            ("--low-water-bytes", opts.low_water_bytes),
            ("--idle-timeout-secs", opts.idle_timeout_secs),
            ("--snapshot-interval-secs", opts.snapshot_interval_secs),
            // Regtest: short channels, so the story fits in minutes.
            ("--min-expiry-blocks", 50),
            ("--close-margin-blocks", 6),
        ] {
            flags.extend([flag.to_string(), value.to_string()]);
        }
        flags.extend(opts.extra.iter().cloned());
        let process = ControllerProcess::start(RunSpec {
            bin: world.bin.clone(),
            netns: world.gateway.name().to_string(),
            iface: world.bridge.clone(),
            pin_dir: world.pins.path().to_path_buf(),
            data_dir: world.data_dir(),
            admin_socket: world.admin_socket(),
            api_port: API_PORT,
            rpc_url: format!("http://127.0.0.1:{}", world.rpc_port()),
            rpc_cookie: world.rpc_cookie(),
            flags,
            log: log.clone(),
            on_drop: OnDrop::Terminate,
        })?;
        Ok(Controller { _world: world, process, log })
    }

    /// What an operator command (`bitmesh clients`, `earnings`, ...) printed; the
    /// same as [`ControllerProcess::cli_text`].
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        self.process.cli_text(args)
    }

    /// `bitmesh <cmd> --json`, parsed; the same as [`ControllerProcess::cli_json`].
    pub fn admin_json(&self, cmd: &str) -> Result<Value> {
        self.process.cli_json(&[cmd])
    }

    /// kill -9: no shutdown path runs (the crash case).
    pub fn kill9(mut self) {
        self.process.kill9();
    }

    /// SIGTERM and wait (the operator's `systemctl stop`).
    pub fn stop(mut self) {
        self.process.stop();
    }
}

impl Deref for Controller<'_> {
    type Target = ControllerProcess;
    fn deref(&self) -> &ControllerProcess {
        &self.process
    }
}

impl DerefMut for Controller<'_> {
    fn deref_mut(&mut self) -> &mut ControllerProcess {
        &mut self.process
    }
}

/// `bitmesh pay` settings.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    /// The `--fund-from` file.
    pub fund_from: PathBuf,
    /// `--max-spend` in sat.
    pub max_spend_sat: u64,
    /// `--capacity` in sat.
    pub capacity_sat: u64,
    /// `--max-price` in sat per MiB.
    pub max_price_sat_per_mib: u64,
    /// `--exit-when-spent`.
    pub exit_when_spent: bool,
    /// Any further flags.
    pub extra: Vec<String>,
}

impl AgentOpts {
    /// Typical settings: a 40,000 sat channel (under the default zero-conf cap), pay up
    /// to `max_spend_sat`.
    pub fn new(fund_from: PathBuf, max_spend_sat: u64) -> AgentOpts {
        AgentOpts {
            fund_from,
            max_spend_sat,
            capacity_sat: 40_000,
            max_price_sat_per_mib: 1000,
            exit_when_spent: false,
            extra: Vec::new(),
        }
    }
}

/// A client agent; SIGTERM (it asks the gateway to close) then SIGKILL on drop.
pub struct Agent<'w> {
    _world: &'w World,
    child: Option<Child>,
    /// Which client it runs for.
    pub index: usize,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
}

impl<'w> Agent<'w> {
    pub(super) fn start(world: &'w World, i: usize, opts: &AgentOpts) -> Result<Agent<'w>> {
        let state_dir = world.dir.path().join(format!("client-{i}"));
        let log = world.dir.path().join(format!("agent-{i}.log"));
        let mut cmd = world.client_command(i, &world.bin);
        cmd.arg("pay")
            .args(["--gateway", &gateway_url()])
            .args(["--max-price", &opts.max_price_sat_per_mib.to_string()])
            .args(["--max-spend", &opts.max_spend_sat.to_string()])
            .args(["--capacity", &opts.capacity_sat.to_string()])
            .args(["--network", "regtest", "--yes", "--poll-ms", "200"])
            .args(["--iface", &world.clients[i].iface])
            .arg("--fund-from")
            .arg(&opts.fund_from)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(&opts.extra);
        if opts.exit_when_spent {
            cmd.arg("--exit-when-spent");
        }
        // `ip netns exec` execs the agent in place, so the child's pid is the agent's.
        let child = spawn_logged(&mut cmd, &log).context("spawning bitmesh pay")?;
        Ok(Agent { _world: world, child: Some(child), index: i, log, state_dir })
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Its log so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until its log contains `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.output().contains(needle) {
                return Ok(());
            }
            if !self.running() {
                bail!("agent {} exited before printing {needle:?}; log:\n{}", self.index, self.output());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("agent {} did not print {needle:?} within {timeout:?}; log:\n{}", self.index, self.output())
    }

    /// Its channel state file (`<state-dir>/<channel id>.json`), parsed: what the
    /// client signed (`latest.total_paid_sat`) and whether it was acknowledged.
    pub fn state(&self) -> Option<Value> {
        let entry = std::fs::read_dir(&self.state_dir)
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| e.path().extension().is_some_and(|x| x == "json"))?;
        serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok()
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        kill_child(self.child.take());
    }

    /// SIGTERM (Ctrl-C): the agent asks the gateway to close, then exits.
    pub fn stop(&mut self) {
        stop_child(self.child.take(), Duration::from_secs(15));
    }

    /// Wait for it to exit by itself (e.g. `--exit-when-spent`); false on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.running() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}
