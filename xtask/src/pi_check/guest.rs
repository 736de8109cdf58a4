//! Boot one kernel with the initramfs under qemu-system-aarch64, keep its console,
//! and read the outcome of every test from it.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The outcome of one test, as libtest printed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    Ignored,
}

/// One test binary's run in the guest.
#[derive(Debug, Default)]
pub struct BinaryRun {
    pub name: String,
    pub tests: Vec<(String, Outcome)>,
    /// Exit status, when the binary finished.
    pub exit: Option<i32>,
    pub secs: Option<u64>,
}

/// Everything read from one boot.
#[derive(Debug, Default)]
pub struct Boot {
    /// `uname -r` and `uname -m` in the guest.
    pub kernel: String,
    pub binaries: Vec<BinaryRun>,
    pub insmod_failures: Vec<String>,
    /// The guest reached the end of its script.
    pub done: bool,
    pub timed_out: bool,
    pub wall: Duration,
}

impl Boot {
    /// Whether everything ran and passed.
    pub fn passed(&self) -> bool {
        self.done
            && !self.timed_out
            && self.insmod_failures.is_empty()
            && !self.binaries.is_empty()
            && self.binaries.iter().all(|b| {
                b.exit == Some(0) && !b.tests.is_empty() && b.tests.iter().all(|(_, o)| *o != Outcome::Failed)
            })
    }
}

/// Boot `kernel` with `initrd`; the console goes to `log` (and, with `echo`, to
/// stderr). Gives up after `timeout`.
pub fn boot(kernel: &Path, initrd: &Path, log: &Path, timeout: Duration, echo: bool) -> Result<Boot> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-aarch64")
        // The Pi 4's core; TCG (software emulation) on an x86 host. `-nic none`:
        // without it qemu looks for a NIC option ROM it does not have.
        .args(["-M", "virt", "-cpu", "cortex-a72", "-smp", "2", "-m", "1024", "-nographic", "-nic", "none"])
        .args(["-no-reboot", "-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyAMA0 panic=-1 quiet rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("could not start qemu-system-aarch64 (Debian package qemu-system-arm)")?;
    let stdout = child.stdout.take().context("qemu's console")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
            if tx.send(text).is_err() {
                break;
            }
        }
    });
    let mut file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut boot = Boot::default();
    let deadline = started + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(file, "{line}")?;
                if echo {
                    eprintln!("guest| {line}");
                }
                read_line(&mut boot, &line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                boot.timed_out = true;
                let _ = child.kill();
                break;
            }
            // The console closed: qemu exited (the guest powered off, or panicked).
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    let _ = reader.join();
    boot.wall = started.elapsed();
    Ok(boot)
}

/// Fold one console line into what we know.
fn read_line(boot: &mut Boot, line: &str) {
    // Kernel messages can interleave with a test's output on the serial console;
    // libtest's result lines start at a line's beginning.
    if let Some(rest) = line.strip_prefix("PICHECK ") {
        let mut words = rest.split_whitespace();
        match words.next() {
            Some("KERNEL") => boot.kernel = words.collect::<Vec<_>>().join(" "),
            Some("INSMOD-FAILED") => boot.insmod_failures.push(words.collect::<Vec<_>>().join(" ")),
            Some("BEGIN") => boot.binaries.push(BinaryRun { name: words.next().unwrap_or("?").to_string(), ..BinaryRun::default() }),
            Some("END") => {
                if let Some(run) = boot.binaries.last_mut() {
                    for w in words {
                        if let Some(rc) = w.strip_prefix("rc=") {
                            run.exit = rc.parse().ok();
                        } else if let Some(s) = w.strip_prefix("secs=") {
                            run.secs = s.parse().ok();
                        }
                    }
                }
            }
            Some("DONE") => boot.done = true,
            _ => {}
        }
        return;
    }
    // "test name ... ok" / "... FAILED" / "... ignored" (possibly with a reason).
    let Some(rest) = line.strip_prefix("test ") else { return };
    let Some((name, result)) = rest.split_once(" ... ") else { return };
    let outcome = match result.split_whitespace().next().map(|w| w.trim_end_matches(',')) {
        Some("ok") => Outcome::Passed,
        Some("FAILED") => Outcome::Failed,
        Some("ignored") => Outcome::Ignored,
        _ => return,
    };
    if let Some(run) = boot.binaries.last_mut() {
        run.tests.push((name.to_string(), outcome));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_become_per_test_outcomes() {
        let mut b = Boot::default();
        for l in [
            "PICHECK KERNEL 6.1.0-28-arm64 aarch64 cpus=2",
            "PICHECK BEGIN kernel_verdicts",
            "running 2 tests",
            "test a_test ... ok",
            "[   12.3] random kernel line",
            "test b_test ... FAILED",
            "test c_test ... ignored, needs x",
            "PICHECK END kernel_verdicts rc=101 secs=7",
            "PICHECK DONE",
        ] {
            read_line(&mut b, l);
        }
        assert_eq!(b.kernel, "6.1.0-28-arm64 aarch64 cpus=2");
        let run = &b.binaries[0];
        assert_eq!(run.name, "kernel_verdicts");
        assert_eq!(run.tests.len(), 3);
        assert_eq!(run.tests[1], ("b_test".to_string(), Outcome::Failed));
        assert_eq!(run.tests[2].1, Outcome::Ignored);
        assert_eq!((run.exit, run.secs), (Some(101), Some(7)));
        assert!(b.done);
        assert!(!b.passed(), "a failed test fails the boot");
        b.binaries[0].tests.remove(1);
        b.binaries[0].exit = Some(0);
        assert!(b.passed());
        b.done = false;
        assert!(!b.passed(), "a guest that never finished fails");
    }
}
