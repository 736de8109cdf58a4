//! `cargo xtask fuzz`: cargo-fuzz (libFuzzer, nightly) over the targets in fuzz/.
//!
//! cargo-fuzz is installed once into the cache, keyed by its version. The fuzz
//! build also lives in the cache (`fuzz-target/`): it is a nightly, instrumented
//! build of the whole controller that a fresh checkout (CI) would otherwise redo
//! every run; cargo rebuilds only what changed. Each target runs for `--secs` on a
//! scratch copy of its corpus (the seeds in fuzz/corpus/<target>/ are read, never
//! written); a crash leaves its input under the printed artifacts directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::cache::{cache_dir, repo_root, run, step};
use crate::{ebpf, provision};

/// cargo-fuzz release installed into the cache.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The fuzz targets (fuzz/fuzz_targets/<name>.rs), in the order they run.
pub const TARGETS: &[&str] = &["api_request", "payment_update", "frame_classifier", "client_response"];

/// Make sure cargo-fuzz is installed in the cache; return the directory to put on PATH.
fn cargo_fuzz() -> Result<PathBuf> {
    let root = cache_dir()?.join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = root.join("bin");
    if bin.join("cargo-fuzz").is_file() {
        return Ok(bin);
    }
    step(&format!("installing cargo-fuzz {CARGO_FUZZ_VERSION} into {} (once)", root.display()));
    run(Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION])
        .arg("--root")
        .arg(&root)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR"))
    .context("installing cargo-fuzz failed; see the cargo output above")?;
    Ok(bin)
}

/// What one target did in its run.
struct Outcome {
    target: &'static str,
    executions: Option<u64>,
    new_units: Option<u64>,
    failure: Option<String>,
}

/// `stat::<name>: <value>` from libFuzzer's `-print_final_stats=1` output.
fn final_stat(output: &str, name: &str) -> Option<u64> {
    let key = format!("stat::{name}:");
    output.lines().find_map(|l| l.trim().strip_prefix(key.as_str())?.trim().parse().ok())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    if let Ok(entries) = std::fs::read_dir(from) {
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::copy(entry.path(), to.join(entry.file_name()))?;
            }
        }
    }
    Ok(())
}

/// Build every target, run each for `secs` seconds (all of them, or `only`), print
/// executions per target, and fail if any target found a crash.
pub fn fuzz(secs: u64, only: &[String]) -> Result<()> {
    for t in only {
        if !TARGETS.contains(&t.as_str()) {
            bail!("no fuzz target {t:?}; the targets are {}", TARGETS.join(", "));
        }
    }
    let targets: Vec<&'static str> =
        TARGETS.iter().copied().filter(|t| only.is_empty() || only.iter().any(|o| o == t)).collect();
    provision::nightly_rust_src()?;
    let obj = ebpf::build()?;
    let fuzz_bin = cargo_fuzz()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![fuzz_bin];
    paths.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(paths)?;
    let target_dir = cache_dir()?.join("fuzz-target");
    let fuzz_dir = repo_root().join("fuzz");
    let nightly_cargo = || {
        let mut c = Command::new("rustup");
        c.current_dir(repo_root())
            .args(["run", "nightly", "cargo", "fuzz"])
            .env("PATH", &path)
            .env("BITMESH_EBPF_OBJ", &obj)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS");
        c
    };
    // Without AddressSanitizer: the code under test is safe Rust, and what the
    // targets look for (panics, overflow, broken invariants) needs only the debug
    // assertions; ASan would halve the executions and rebuild the C++ of the
    // script interpreter instrumented.
    let build_flags = ["--sanitizer", "none", "--debug-assertions", "--fuzz-dir"];
    step("building the fuzz targets (nightly, libFuzzer; the first build takes minutes, then cached)");
    run(nightly_cargo().arg("build").args(build_flags).arg(&fuzz_dir).arg("--target-dir").arg(&target_dir))
        .context("building the fuzz targets failed; see the compiler output above")?;

    let scratch = target_dir.join("runs");
    let mut outcomes = Vec::new();
    for target in targets {
        let seeds = fuzz_dir.join("corpus").join(target);
        let corpus = scratch.join("corpus").join(target);
        let artifacts = scratch.join("artifacts").join(target);
        let _ = std::fs::remove_dir_all(&corpus);
        copy_dir(&seeds, &corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        step(&format!("fuzzing {target} for {secs} s"));
        let out = nightly_cargo()
            .arg("run")
            .args(build_flags)
            .arg(&fuzz_dir)
            .arg("--target-dir")
            .arg(&target_dir)
            .arg(target)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg("-print_final_stats=1")
            .arg("-max_len=4096")
            .arg("-rss_limit_mb=2048")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("could not start cargo fuzz run {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        let failure = (!out.status.success()).then(|| {
            // The panic message and libFuzzer's summary say what and where.
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        });
        let seed_count = std::fs::read_dir(&seeds).map(|d| d.count() as u64).unwrap_or(0);
        let units = std::fs::read_dir(&corpus).map(|d| d.count() as u64).ok();
        outcomes.push(Outcome {
            target,
            executions: final_stat(&log, "number_of_executed_units"),
            new_units: units.map(|u| u.saturating_sub(seed_count)),
            failure,
        });
    }

    eprintln!();
    eprintln!("{:<18} {:>12} {:>10} {:>10}  result", "target", "executions", "per s", "new units");
    let mut failed = 0;
    for o in &outcomes {
        let execs = o.executions.map_or("?".to_owned(), |e| e.to_string());
        let rate = o.executions.map_or("?".to_owned(), |e| (e / secs.max(1)).to_string());
        let units = o.new_units.map_or("?".to_owned(), |u| u.to_string());
        let result = if o.failure.is_some() { "FAILED" } else { "ok" };
        eprintln!("{:<18} {execs:>12} {rate:>10} {units:>10}  {result}", o.target);
        if let Some(f) = &o.failure {
            failed += 1;
            eprintln!("--- {} ---\n{f}\n--- input saved under {} ---", o.target, scratch.join("artifacts").join(o.target).display());
        }
    }
    println!("fuzz: {} passed, {failed} failed", outcomes.len() - failed);
    if failed > 0 {
        bail!(
            "{failed} fuzz target(s) failed; replay a saved input with: rustup run nightly cargo fuzz run --sanitizer none --debug-assertions --fuzz-dir fuzz <target> <input file>"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_are_read_from_libfuzzer_output() {
        let log = "#2 INITED\nDone 12345 runs in 10 second(s)\nstat::number_of_executed_units: 12345\nstat::average_exec_per_sec:     1234\n";
        assert_eq!(final_stat(log, "number_of_executed_units"), Some(12345));
        assert_eq!(final_stat(log, "average_exec_per_sec"), Some(1234));
        assert_eq!(final_stat(log, "peak_rss_mb"), None);
    }
}
