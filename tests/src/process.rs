//! The `bitmesh` processes a test or the demo runs: where the binary is, and how any
//! harness child (controller, client agent, regtest node) is started into a log file
//! and stopped, in its own process group when the demo asked for it
//! ([`use_own_process_groups`]). The guards themselves are
//! [`crate::controller::ControllerProcess`] and [`crate::client::Agent`].

// Test harness: any failure here must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::env;

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
