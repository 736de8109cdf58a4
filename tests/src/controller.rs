//! The controller process: `bitmesh run` in the testbed's gateway namespace.
//!
//! * [`ControllerOpts`]: the `run` flags a test chooses (price, chunk sizes, hook, ...);
//!   [`ControllerOpts::new`] for the controller tests, [`ControllerOpts::story`] for the
//!   end-to-end tests and the demo.
//! * [`Controller`]: the guard a test holds, started by
//!   [`crate::testbed::Testbed::start_controller`] on the testbed's interface, node,
//!   data and pin directories. It borrows the testbed, so it is stopped before the
//!   namespaces go; everything about the process is [`ControllerProcess`] (`Deref`).
//! * [`ControllerProcess`]: the mechanics. It starts the binary inside a network
//!   namespace, waits until its client API and admin socket answer, can `kill -9` it
//!   and start it again on the same data and pin directories, stops it on drop (SIGTERM,
//!   as `systemctl stop` would), appends its output to one log (printed when a test
//!   panics), and runs the operator CLI against it ([`ControllerProcess::cli`],
//!   `clients`, `channels`, `earnings`).
//!
//! Why not `ip netns exec` for the controller: it also unshares the mount namespace and
//! remounts /sys, which hides /sys/fs/bpf; the controller would then mount a private
//! bpffs whose pins die with the process, and a restart could not take the pinned maps
//! over. The controller is spawned from a thread that entered only the network
//! namespace (`setns(CLONE_NEWNET)`), which is what `ip netns exec` does for the network.

// Test harness: any failure here must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::http;
use crate::network::in_netns_named;
use crate::process::{kill_child, log_tail, spawn_logged, stop_child};
use crate::testbed::{Testbed, API_PORT};

/// Where and how to run `bitmesh run`. The harness layer fills it; the flags every
/// harness passes (regtest, the directories, the node, a chain poll of one second,
/// metrics off unless `flags` sets `--metrics-addr`) are added by
/// [`ControllerProcess::start`].
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// The `bitmesh` binary.
    pub bin: PathBuf,
    /// The network namespace it runs in (by name, under /var/run/netns).
    pub netns: String,
    /// `--iface`: the client-facing interface inside the namespace.
    pub iface: String,
    /// `--pin-dir`.
    pub pin_dir: PathBuf,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// `--admin-socket`.
    pub admin_socket: PathBuf,
    /// `--api-port` (the API listens on every address of the namespace).
    pub api_port: u16,
    /// `--rpc-url`: the node as seen from inside the namespace.
    pub rpc_url: String,
    /// `--rpc-cookie`.
    pub rpc_cookie: PathBuf,
    /// Further `run` flags: the harness's own, then the test's.
    pub flags: Vec<String>,
    /// The log every start appends to.
    pub log: PathBuf,
}

/// A `bitmesh run` process in a network namespace; stopped on drop (SIGTERM, SIGKILL
/// after 10 s), with its log tail printed if the thread is panicking.
/// It owns no directory: the layer above keeps them alive across restarts.
pub struct ControllerProcess {
    child: Option<Child>,
    bin: PathBuf,
    netns: String,
    args: Vec<OsString>,
    api_port: u16,
    admin_socket: PathBuf,
    log: PathBuf,
    /// Extra environment of the next starts ([`Self::set_env`]).
    env: Vec<(String, String)>,
}

impl ControllerProcess {
    /// Add `run` flags for the next start (e.g. a flag naming something the test
    /// made after the first start).
    pub fn add_args(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(OsString::from));
    }

    /// Set (or with `None` remove) an environment variable for the next start, e.g.
    /// `BITMESH_FAULT` to hold the controller at a named point of a money path.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_owned(), v.to_owned()));
        }
    }

    /// Start `bitmesh run` as `spec` says and wait until it is ready
    /// ([`Self::wait_ready`], 30 s).
    pub fn start(spec: RunSpec) -> Result<ControllerProcess> {
        let mut args: Vec<OsString> = vec!["run".into()];
        let mut push = |k: &str, v: &std::ffi::OsStr| {
            args.push(k.into());
            args.push(v.to_owned());
        };
        push("--iface", spec.iface.as_ref());
        push("--network", "regtest".as_ref());
        push("--pin-dir", spec.pin_dir.as_os_str());
        push("--data-dir", spec.data_dir.as_os_str());
        push("--admin-socket", spec.admin_socket.as_os_str());
        push("--api-port", spec.api_port.to_string().as_ref());
        push("--rpc-url", spec.rpc_url.as_ref());
        push("--rpc-cookie", spec.rpc_cookie.as_os_str());
        push("--chain-poll-secs", "1".as_ref());
        if !spec.flags.iter().any(|a| a == "--metrics-addr") {
            push("--metrics-addr", "off".as_ref());
        }
        args.extend(spec.flags.iter().map(OsString::from));
        let mut p = ControllerProcess {
            child: None,
            bin: spec.bin,
            netns: spec.netns,
            args,
            api_port: spec.api_port,
            admin_socket: spec.admin_socket,
            log: spec.log,
            env: Vec::new(),
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> Result<()> {
        // A socket file left by a killed run would look like a ready one.
        let _ = std::fs::remove_file(&self.admin_socket);
        let starts = std::fs::read_to_string(&self.log).unwrap_or_default().matches("===== start #").count() + 1;
        File::options().create(true).append(true).open(&self.log)?.write_all(format!("===== start #{starts} =====\n").as_bytes())?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .env("RUST_LOG", std::env::var("BITMESH_LOG").unwrap_or_else(|_| "info".into()))
            // A log file, not a terminal: no colour codes.
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let log = self.log.clone();
        let child = in_netns_named(&self.netns, || spawn_logged(&mut cmd, &log))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    /// Wait until the client API answers `GET /v1/terms` inside the namespace and the
    /// admin socket answers `bitmesh clients --json`; fails (with the log tail) if the
    /// process exits or `timeout` passes first.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let addr: SocketAddr = ([127, 0, 0, 1], self.api_port).into();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!("bitmesh run exited with {status} during startup; log tail:\n{}", self.log_tail(30));
                }
            }
            let api = in_netns_named(&self.netns, || Ok(http::get(addr, "/v1/terms", &[]).is_ok_and(|r| r.status == 200)))?;
            if api && self.admin_socket.exists() && self.cli(&["clients", "--json"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("bitmesh run not ready within {timeout:?}; log tail:\n{}", self.log_tail(30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The client API port inside the namespace.
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// The admin socket the CLI talks to.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// `kill -9` the controller (no shutdown code runs: the crash case) and reap it.
    pub fn kill9(&mut self) {
        kill_child(self.child.take());
    }

    /// SIGTERM (graceful stop: final snapshot, the operator's `systemctl stop`) and
    /// reap; kill -9 after 10 s.
    pub fn stop(&mut self) {
        stop_child(self.child.take(), Duration::from_secs(10));
    }

    /// Start it again with the same flags, data dir and pin dir (`kill -9` first if it
    /// still runs).
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// The log file (stdout and stderr of every start, each after a
    /// `===== start #n =====` line).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the controller logged, over all starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` log lines.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    /// Run `bitmesh <args> --admin-socket <ours>` (the operator CLI), failing on a
    /// non-zero exit.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running bitmesh {args:?}"))?;
        if !out.status.success() {
            bail!("bitmesh {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(out)
    }

    /// What a CLI command printed (for people: tables, text).
    pub fn cli_text(&self, args: &[&str]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.cli(args)?.stdout).into_owned())
    }

    /// Run a CLI command with `--json` and parse its output.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all)?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("bitmesh {all:?} printed no JSON: {:?}", String::from_utf8_lossy(&out.stdout)))
    }

    /// `bitmesh clients --json`.
    pub fn clients(&self) -> Result<Vec<Value>> {
        Ok(self.cli_json(&["clients"])?.as_array().cloned().unwrap_or_default())
    }

    /// `bitmesh channels --json`.
    pub fn channels(&self) -> Result<Vec<Value>> {
        Ok(self.cli_json(&["channels"])?.as_array().cloned().unwrap_or_default())
    }

    /// `bitmesh earnings --json`.
    pub fn earnings(&self) -> Result<Value> {
        self.cli_json(&["earnings"])
    }

    /// The `bitmesh clients --json` row of `mac`, if listed (`None` also when the CLI
    /// fails, for polling).
    pub fn client(&self, mac: &str) -> Option<Value> {
        self.clients().ok()?.into_iter().find(|r| r["mac"].as_str() == Some(mac))
    }

    /// The newest `bitmesh channels --json` row of `mac` (`None` also when the CLI
    /// fails, for polling).
    pub fn channel(&self, mac: &str) -> Option<Value> {
        self.channels().ok()?.into_iter().rev().find(|r| r["mac"].as_str() == Some(mac))
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- controller log {} (last 40 lines) ---\n{}", self.log.display(), self.log_tail(40));
        }
    }
}

/// The `run` flags a test chooses; the testbed adds the ones it owns (interface,
/// directories, node, API port, regtest). `None` leaves the binary's default.
#[derive(Clone, Debug, Default)]
pub struct ControllerOpts {
    /// `--hook` (`auto`, `xdp`, `xdp-generic`, `tc`).
    pub hook: Option<String>,
    /// `--price-msat-per-mib`.
    pub price_msat_per_mib: Option<u64>,
    /// `--chunk-bytes`.
    pub chunk_bytes: Option<u64>,
    /// `--low-water-bytes`.
    pub low_water_bytes: Option<u64>,
    /// `--idle-timeout-secs`.
    pub idle_timeout_secs: Option<u64>,
    /// `--snapshot-interval-secs`.
    pub snapshot_interval_secs: Option<u64>,
    /// `--min-expiry-blocks`.
    pub min_expiry_blocks: Option<u64>,
    /// `--close-margin-blocks`.
    pub close_margin_blocks: Option<u64>,
    /// Any further flags (`--rate-limit-per-min`, `--metrics-addr`, ...).
    pub extra: Vec<String>,
}

impl ControllerOpts {
    /// The controller tests' settings: the binary's defaults (what an operator who sets
    /// nothing gets), with the tc upload hook and a usage snapshot every second.
    pub fn new() -> ControllerOpts {
        ControllerOpts { hook: Some("tc".into()), snapshot_interval_secs: Some(1), ..ControllerOpts::default() }
    }

    /// The end-to-end tests' and the demo's settings: prices and sizes chosen so that a
    /// few MiB cost a few thousand sat and small downloads cross chunk boundaries
    /// (1000 sat per MiB, 2 MiB chunks, 1 MiB low water), no idle timeout to speak of,
    /// a snapshot every 2 s, and short regtest channels so the story fits in minutes.
    pub fn story() -> ControllerOpts {
        ControllerOpts {
            hook: None,
            price_msat_per_mib: Some(1_000_000),
            chunk_bytes: Some(2 * 1024 * 1024),
            low_water_bytes: Some(1024 * 1024),
            idle_timeout_secs: Some(3600),
            snapshot_interval_secs: Some(2),
            min_expiry_blocks: Some(50),
            close_margin_blocks: Some(6),
            extra: Vec::new(),
        }
    }

    /// Add raw `run` flags.
    pub fn with(mut self, args: &[&str]) -> ControllerOpts {
        self.extra.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// The flags, in the order `run` gets them (the named ones, then [`Self::extra`]).
    pub fn flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(hook) = &self.hook {
            flags.extend(["--hook".to_string(), hook.clone()]);
        }
        for (flag, value) in [
            ("--price-msat-per-mib", self.price_msat_per_mib),
            ("--chunk-bytes", self.chunk_bytes),
            ("--low-water-bytes", self.low_water_bytes),
            ("--idle-timeout-secs", self.idle_timeout_secs),
            ("--snapshot-interval-secs", self.snapshot_interval_secs),
            ("--min-expiry-blocks", self.min_expiry_blocks),
            ("--close-margin-blocks", self.close_margin_blocks),
        ] {
            if let Some(value) = value {
                flags.extend([flag.to_string(), value.to_string()]);
            }
        }
        flags.extend(self.extra.iter().cloned());
        flags
    }
}

/// The testbed's controller: a thin layer over [`ControllerProcess`] (reached through
/// `Deref`: `cli`, `clients`, `client(mac)`, `channel(mac)`, `restart`, `log_tail`,
/// ...), started in the gateway namespace on the testbed's bridge, data dir, pin dir
/// and node. It borrows the [`Testbed`], so it is stopped before the namespaces go.
pub struct Controller<'t> {
    bed: &'t Testbed,
    process: ControllerProcess,
}

impl<'t> Controller<'t> {
    pub(crate) fn start(bed: &'t Testbed, opts: &ControllerOpts) -> Result<Controller<'t>> {
        std::fs::create_dir_all(bed.data_dir())?;
        let process = ControllerProcess::start(RunSpec {
            bin: bed.bin.clone(),
            netns: bed.gateway().name().to_string(),
            iface: bed.gateway_if().to_string(),
            pin_dir: bed.pin_dir().to_path_buf(),
            data_dir: bed.data_dir(),
            admin_socket: bed.admin_socket(),
            api_port: API_PORT,
            rpc_url: bed.rpc_url(),
            rpc_cookie: bed.node.cookie_path(),
            flags: opts.flags(),
            log: bed.controller_log(),
        })?;
        Ok(Controller { bed, process })
    }

    /// The bpffs directory the controller pins its maps and links in (the testbed's).
    pub fn pin_dir(&self) -> &Path {
        self.bed.pin_dir()
    }

    /// Where the SQLite store and the seed live (the testbed's; survives restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.bed.data_dir()
    }

    /// The testbed's scratch directory (data dir, admin socket, logs).
    pub fn dir(&self) -> &Path {
        self.bed.dir()
    }

    /// The `bitmesh clients --json` row of the testbed's first client device (an error
    /// if the CLI fails; `None` if the client is not listed).
    pub fn client_row(&self) -> Result<Option<Value>> {
        let mac = &self.bed.lan.clients[0].mac;
        Ok(self.clients()?.into_iter().find(|r| r["mac"].as_str() == Some(mac)))
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

    /// kill -9 and let go: no shutdown path runs (the crash case).
    pub fn crash(mut self) {
        self.process.kill9();
    }

    /// SIGTERM, wait and let go (the operator's `systemctl stop`).
    pub fn shut_down(mut self) {
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
