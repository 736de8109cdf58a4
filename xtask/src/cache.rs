//! Where things live: the repo root, and the cache of expensive builds outside it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The workspace root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Cache for builds that outlive the checkout (bitcoind, bpf-linker), keyed by version
/// in the directory names below it. `$BITMESH_CACHE`, else `$XDG_CACHE_HOME/bitmesh`,
/// else `$HOME/.cache/bitmesh`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BITMESH_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("bitmesh"));
    }
    let home = std::env::var_os("HOME").context("neither BITMESH_CACHE nor HOME is set; set BITMESH_CACHE to a writable directory")?;
    Ok(PathBuf::from(home).join(".cache").join("bitmesh"))
}

/// Print one progress line, so a long first run shows what it is doing.
pub fn step(msg: &str) {
    eprintln!("xtask: {msg}");
}

/// Run a command to completion, failing with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("command failed ({status}): {shown}");
    }
    Ok(())
}

/// Run a command and return its standard output as text.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("could not start {shown}"))?;
    if !out.status.success() {
        bail!(
            "command failed ({}): {shown}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
