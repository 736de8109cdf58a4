//! The client process: a client agent (`bitmesh pay`) in one of the testbed's client
//! namespaces, started by [`crate::testbed::Testbed::start_agent`]. It borrows the
//! testbed, so it is stopped before the namespaces go; SIGTERM (the agent asks the
//! gateway to close) then SIGKILL on drop, also on panic. In the demo it runs in its
//! own process group ([`crate::process::use_own_process_groups`]): a Ctrl-C in its
//! terminal reaches only the demo, which then stops the agents first, then the
//! controller.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::process::{kill_child, spawn_logged, stop_child};
use crate::testbed::Testbed;

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
pub struct Agent<'t> {
    _bed: &'t Testbed,
    child: Option<Child>,
    /// Which client it runs for.
    pub index: usize,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
}

impl<'t> Agent<'t> {
    pub(crate) fn start(bed: &'t Testbed, i: usize, opts: &AgentOpts) -> Result<Agent<'t>> {
        let state_dir = bed.dir().join(format!("client-{i}"));
        let log = bed.dir().join(format!("agent-{i}.log"));
        let mut cmd = bed.client_command(i, &bed.bin);
        cmd.arg("pay")
            .args(["--gateway", &bed.gateway_url()])
            .args(["--max-price", &opts.max_price_sat_per_mib.to_string()])
            .args(["--max-spend", &opts.max_spend_sat.to_string()])
            .args(["--capacity", &opts.capacity_sat.to_string()])
            .args(["--network", "regtest", "--yes", "--poll-ms", "200"])
            .args(["--iface", &bed.lan.clients[i].iface])
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
        Ok(Agent { _bed: bed, child: Some(child), index: i, log, state_dir })
    }

    /// `bitmesh pay --lightning` for client `i`: buys `bundle` within `max_spend_sat`
    /// and `max_price_sat_per_mib`, printing each invoice for a wallet to pay
    /// ([`Self::invoices`]); no channel, no funding file, no state directory.
    pub(crate) fn start_lightning(
        bed: &'t Testbed,
        i: usize,
        bundle: &str,
        max_spend_sat: u64,
        max_price_sat_per_mib: u64,
    ) -> Result<Agent<'t>> {
        let log = bed.dir().join(format!("agent-{i}.log"));
        let mut cmd = bed.client_command(i, &bed.bin);
        cmd.args(["pay", "--lightning", "--gateway", &bed.gateway_url(), "--bundle", bundle])
            .args(["--max-price", &max_price_sat_per_mib.to_string()])
            .args(["--max-spend", &max_spend_sat.to_string()])
            .args(["--poll-ms", "200", "--iface", &bed.lan.clients[i].iface]);
        let child = spawn_logged(&mut cmd, &log).context("spawning bitmesh pay --lightning")?;
        Ok(Agent { _bed: bed, child: Some(child), index: i, log, state_dir: bed.dir().join(format!("client-{i}")) })
    }

    /// The BOLT 11 invoices a `--lightning` agent printed so far, in order.
    pub fn invoices(&self) -> Vec<String> {
        self.output().lines().filter(|l| l.starts_with("lnbc")).map(str::to_owned).collect()
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
