//! Process guards: the controller (`bitmesh run`) in the gateway namespace and client
//! agents (`bitmesh pay`) in client namespaces. Each borrows the [`World`], so it is
//! stopped before the namespaces go; each is killed on drop, also on panic.
//!
//! In the demo, children get their own process group ([`super::use_own_process_groups`]):
//! a Ctrl-C in its terminal reaches only the demo, which then stops them in order
//! (agents first, then the controller).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{gateway_url, World, API_PORT};
use crate::netns::in_netns;

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

/// The controller process; SIGTERM then SIGKILL on drop.
pub struct Controller<'w> {
    world: &'w World,
    child: Option<Child>,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
}

fn log_tail(path: &PathBuf, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl<'w> Controller<'w> {
    pub(super) fn start(world: &'w World, opts: &ControllerOpts) -> Result<Controller<'w>> {
        std::fs::create_dir_all(world.data_dir())?;
        let _ = std::fs::remove_file(world.admin_socket());
        let log = world.dir.path().join("controller.log");
        let out = File::options().create(true).append(true).open(&log)?;
        let mut cmd = Command::new(&world.bin);
        cmd.arg("run")
            .args(["--iface", &world.bridge])
            .arg("--pin-dir")
            .arg(world.pins.path())
            .arg("--data-dir")
            .arg(world.data_dir())
            .arg("--admin-socket")
            .arg(world.admin_socket())
            .args(["--metrics-addr", "off", "--network", "regtest", "--chain", "bitcoind"])
            .args(["--rpc-url", &format!("http://127.0.0.1:{}", world.rpc_port())])
            .arg("--rpc-cookie")
            .arg(world.rpc_cookie())
            .args(["--api-port", &API_PORT.to_string(), "--chain-poll-secs", "1"])
            .args(["--price-msat-per-mib", &opts.price_msat_per_mib.to_string()])
            .args(["--chunk-bytes", &opts.chunk_bytes.to_string()])
            .args(["--low-water-bytes", &opts.low_water_bytes.to_string()])
            .args(["--idle-timeout-secs", &opts.idle_timeout_secs.to_string()])
            .args(["--snapshot-interval-secs", &opts.snapshot_interval_secs.to_string()])
            // Regtest: short channels, so the story fits in minutes.
            .args(["--min-expiry-blocks", "50", "--close-margin-blocks", "6"])
            .args(&opts.extra)
            .env("RUST_LOG", std::env::var("BITMESH_LOG").unwrap_or_else(|_| "info".into()))
            // A log file, not a terminal: no colour codes.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if super::own_process_groups() {
            cmd.process_group(0);
        }
        // Spawned from a thread inside the gateway namespace, NOT via `ip netns exec`:
        // that would remount /sys and hide the host's bpffs at /sys/fs/bpf, where the
        // meter pins its maps.
        let child = in_netns(&world.gateway, || cmd.spawn().context("spawning bitmesh run"))?;
        let mut ctl = Controller { world, child: Some(child), log };
        ctl.wait_ready(Duration::from_secs(30))?;
        Ok(ctl)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("bitmesh run exited with {status}; log tail:\n{}", log_tail(&self.log, 30));
            }
            if self.world.admin_socket().exists() && self.admin(&["clients", "--json"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("bitmesh run not ready within {timeout:?}; log tail:\n{}", log_tail(&self.log, 30))
    }

    /// Run an operator command (`bitmesh clients`, `earnings`, ...) against this
    /// controller's admin socket; its stdout.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.world.bin)
            .args(args)
            .arg("--admin-socket")
            .arg(self.world.admin_socket())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running bitmesh {args:?}"))?;
        if !out.status.success() {
            bail!("bitmesh {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `bitmesh <cmd> --json`, parsed.
    pub fn admin_json(&self, cmd: &str) -> Result<Value> {
        let text = self.admin(&[cmd, "--json"])?;
        serde_json::from_str(&text).with_context(|| format!("bitmesh {cmd} --json printed {text:?}"))
    }

    /// The `bitmesh clients --json` row of `mac`, if the controller meters it.
    pub fn client(&self, mac: &str) -> Option<Value> {
        let rows = self.admin_json("clients").ok()?;
        rows.as_array()?.iter().find(|r| r["mac"].as_str() == Some(mac)).cloned()
    }

    /// The newest `bitmesh channels --json` row of `mac`.
    pub fn channel(&self, mac: &str) -> Option<Value> {
        let rows = self.admin_json("channels").ok()?;
        rows.as_array()?.iter().rev().find(|r| r["mac"].as_str() == Some(mac)).cloned()
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// kill -9: no shutdown path runs (the crash case).
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (the operator's `systemctl stop`).
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Some(c) = self.child.take() {
            stop_child(c, Duration::from_secs(10));
        }
    }
}

impl Drop for Controller<'_> {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// SIGTERM, then SIGKILL after `grace`.
fn stop_child(mut c: Child, grace: Duration) {
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
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
        let out = File::options().create(true).append(true).open(&log)?;
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
            .args(&opts.extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if super::own_process_groups() {
            cmd.process_group(0);
        }
        if opts.exit_when_spent {
            cmd.arg("--exit-when-spent");
        }
        // `ip netns exec` execs the agent in place, so the child's pid is the agent's.
        let child = cmd.spawn().context("spawning bitmesh pay")?;
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (Ctrl-C): the agent asks the gateway to close, then exits.
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            stop_child(c, Duration::from_secs(15));
        }
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
