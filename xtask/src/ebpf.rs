//! Building the kernel programs (bitmesh-ebpf) for `bpfel-unknown-none`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cache::{repo_root, run, step};
use crate::provision;

/// Target directory of the eBPF build; `bitmesh-userspace/build.rs` embeds the object
/// from `<this>/bpfel-unknown-none/release/bitmesh`.
pub fn target_dir() -> PathBuf {
    repo_root().join("target").join("ebpf")
}

/// Path of the built eBPF object.
pub fn object_path() -> PathBuf {
    target_dir().join("bpfel-unknown-none").join("release").join("bitmesh")
}

/// Provision the toolchain and build the eBPF object; returns its path.
/// Cargo's own change tracking makes a second run with nothing changed take seconds.
pub fn build() -> Result<PathBuf> {
    provision::nightly_rust_src()?;
    let linker_bin = provision::bpf_linker()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![linker_bin];
    paths.extend(std::env::split_paths(&path));
    step("building the eBPF programs (bitmesh-ebpf, nightly, bpfel-unknown-none)");
    // `rustup run` rather than `cargo +nightly`: under `cargo xtask` the PATH may
    // point at the stable toolchain's cargo directly, which does not take `+nightly`.
    run(Command::new("rustup")
        .current_dir(repo_root().join("bitmesh-ebpf"))
        .args(["run", "nightly", "cargo", "build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir())
        .env("PATH", std::env::join_paths(paths)?)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS"))
    .context("building the eBPF programs failed; see the compiler output above")?;
    let obj = object_path();
    if !obj.is_file() {
        anyhow::bail!("the eBPF build finished but {} is missing", obj.display());
    }
    Ok(obj)
}
