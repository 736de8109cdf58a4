//! The `bitmesh` processes a test or the demo runs, and the one guard for `bitmesh run`.
//!
//! * [`ControllerProcess`]: the mechanics of a controller process, shared by the
//!   controller tests' lab ([`crate::controller::Controller`]) and the namespace world
//!   ([`crate::world::Controller`]), which only choose the flags, the namespace and who
//!   owns the directories. It starts the binary inside a network namespace, waits until
//!   its client API and admin socket answer, can `kill -9` it and start it again on the
//!   same data and pin directories, stops it on drop, appends its output to one log
//!   (printed when a test panics), and runs the operator CLI against it
//!   ([`ControllerProcess::cli`], `clients`, `channels`, `earnings`).
//! * [`spawn_logged`] and [`stop_child`]: how any harness child (controller, client
//!   agent) is started into a log file and stopped, in its own process group when the
//!   demo asked for it ([`use_own_process_groups`]).
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
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::env;
use crate::http;
use crate::netns::in_netns_named;

/// Path of the `bitmesh` binary under test: `$BITMESH_BIN` (set by `cargo xtask
/// test/demo`), else `debug/bitmesh` under `$CARGO_TARGET_DIR`, else under
/// `<repo>/target`. `None` if it is missing.
pub fn bitmesh_bin() -> Option<PathBuf> {
    let path = match std::env::var_os("BITMESH_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join("debug/bitmesh"),
    };
    path.is_file().then_some(path)
}

/// [`bitmesh_bin`], or `None` after [`env::skip`] saying how to get it (a failure
/// under `CI=true`).
pub fn bitmesh_bin_or_skip() -> Option<PathBuf> {
    let bin = bitmesh_bin();
    if bin.is_none() {
        env::skip(
            "no bitmesh binary: set BITMESH_BIN or run `cargo build -p bitmesh-userspace --bin bitmesh` \
             (cargo xtask test does both)",
        );
    }
    bin
}

static OWN_PROCESS_GROUPS: AtomicBool = AtomicBool::new(false);

/// Start every harness process (node, controller, agents) in its own process group
/// from now on. The demo calls this: a Ctrl-C in its terminal then reaches only the
/// demo, which stops them in order. Tests leave it off, so an interrupted `cargo test`
/// takes its children down with it.
pub fn use_own_process_groups() {
    OWN_PROCESS_GROUPS.store(true, Ordering::SeqCst);
}

/// Whether [`use_own_process_groups`] was called.
pub fn own_process_groups() -> bool {
    OWN_PROCESS_GROUPS.load(Ordering::SeqCst)
}

/// Spawn `cmd` with stdin closed and stdout and stderr appended to `log`, in its own
/// process group if [`use_own_process_groups`] was called. The child runs in the
/// network namespace of the calling thread.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let out = File::options().create(true).append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    if own_process_groups() {
        cmd.process_group(0);
    }
    cmd.spawn().with_context(|| format!("spawning {cmd:?}"))
}

/// SIGTERM, then SIGKILL after `grace`; reaped either way. `None`: nothing to do.
pub fn stop_child(c: Option<Child>, grace: Duration) {
    let Some(mut c) = c else { return };
    // SAFETY: kill(2) on the pid of our own child, not yet reaped; no memory involved.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// `kill -9` and reap (no shutdown code runs: the crash case). `None`: nothing to do.
pub fn kill_child(c: Option<Child>) {
    if let Some(mut c) = c {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The last `n` lines of the file at `path` (empty if unreadable).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What dropping a [`ControllerProcess`] does to a running controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDrop {
    /// `kill -9` (the lab: fast teardown; graceful stops are explicit).
    Kill,
    /// SIGTERM, SIGKILL after 10 s (the world: as `systemctl stop` would).
    Terminate,
}

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
    /// What drop does.
    pub on_drop: OnDrop,
}

/// A `bitmesh run` process in a network namespace; stopped on drop as
/// [`RunSpec::on_drop`] says, with its log tail printed if the thread is panicking.
/// It owns no directory: the layer above keeps them alive across restarts.
pub struct ControllerProcess {
    child: Option<Child>,
    bin: PathBuf,
    netns: String,
    args: Vec<OsString>,
    api_port: u16,
    admin_socket: PathBuf,
    log: PathBuf,
    on_drop: OnDrop,
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
    /// `BITMESH_FAULT` to stop the controller at a named point of a money path.
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
            on_drop: spec.on_drop,
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
        match self.on_drop {
            OnDrop::Kill => self.kill9(),
            OnDrop::Terminate => self.stop(),
        }
        if std::thread::panicking() {
            eprintln!("--- controller log {} (last 40 lines) ---\n{}", self.log.display(), self.log_tail(40));
        }
    }
}
