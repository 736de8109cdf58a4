//! Installing what the build and tests need on a fresh Debian machine of this kind:
//! Debian packages, the nightly's `rust-src`, and bpf-linker built against the
//! nightly's own libLLVM (docs/design.md section 11).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cache::{cache_dir, output, run, step};

/// bpf-linker release we build; its LLVM feature must match the nightly's LLVM major.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages: C++ build of bitcoind, namespace tests, the benchmarks'
/// iptables/nftables comparison, the captive portal's nftables table and browser tests.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "build-essential",
    "cmake",
    "pkg-config",
    "libboost-dev",
    "libevent-dev",
    "iproute2",
    "iptables",
    "nftables",
    "iperf3",
    "python3",
    // The captive-portal browser tests: headless Chromium driven over WebDriver, a
    // font so screenshots show text, openssl for the TLS test's certificates.
    "chromium",
    "chromium-driver",
    "chromium-headless-shell",
    "fonts-dejavu-core",
    "openssl",
];

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Install the Debian packages that are missing (one `apt-get` call, only when needed).
pub fn debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}; install them with: sudo apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    step(&format!("installing Debian packages: {}", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install failed; check the package mirror is reachable")?;
    Ok(())
}

/// The nightly toolchain's sysroot; fails with the rustup command when it is missing.
fn nightly_sysroot() -> Result<PathBuf> {
    let out = output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .context("no nightly Rust toolchain; install it with: rustup toolchain install nightly")?;
    Ok(PathBuf::from(out.trim()))
}

/// Make sure the nightly has `rust-src` (needed by `-Z build-std=core`).
pub fn nightly_rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    step("installing the nightly's rust-src component");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("could not add rust-src; run: rustup component add rust-src --toolchain nightly")
}

/// The nightly's `libLLVM.so.*` (the one bpf-linker must link against).
fn nightly_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let mut found = None;
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.") {
            found = Some(lib.join(name));
        }
    }
    found.with_context(|| {
        format!("no libLLVM.so.* in {}; the nightly toolchain looks incomplete (rustup toolchain install nightly --force)", lib.display())
    })
}

/// Make sure bpf-linker is built and cached; return the directory to put on PATH.
pub fn bpf_linker() -> Result<PathBuf> {
    let sysroot = nightly_sysroot()?;
    let libllvm = nightly_libllvm(&sysroot)?;
    // e.g. libLLVM.so.22.1-rust-1.97.0-nightly -> key "llvm-22.1-rust-1.97.0-nightly"
    let llvm_tag = libllvm
        .file_name()
        .map(|n| n.to_string_lossy().trim_start_matches("libLLVM.so.").to_string())
        .unwrap_or_default();
    let llvm_major = llvm_tag.split('.').next().unwrap_or_default().to_string();
    if llvm_major.is_empty() || !llvm_major.chars().all(|c| c.is_ascii_digit()) {
        bail!("cannot tell the nightly's LLVM version from {}", libllvm.display());
    }
    let cache = cache_dir()?;
    let root = cache.join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm-{llvm_tag}"));
    let bin = root.join("bin");
    if bin.join("bpf-linker").is_file() {
        return Ok(bin);
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_tag} (about a minute, once)"
    ));
    // bpf-linker's build looks for <prefix>/lib/libLLVM.so; point it at rustc's own copy.
    let prefix = cache.join(format!("llvm-prefix-{llvm_tag}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let versioned = libllvm.file_name().map(PathBuf::from).unwrap_or_default();
    for name in [PathBuf::from("libLLVM.so"), versioned] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", &format!("llvm-{llvm_major}")])
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        // Build it with the toolchain we are running under, never a project override.
        .env_remove("RUSTUP_TOOLCHAIN"))
    .context("building bpf-linker failed; see the cargo output above")?;
    Ok(bin)
}

/// Let dpkg and apt install and download packages of `arch` (multiarch), once.
pub fn foreign_architecture(arch: &str) -> Result<()> {
    let native = output(Command::new("dpkg").arg("--print-architecture"))?;
    let foreign = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if native.trim() == arch || foreign.lines().any(|l| l.trim() == arch) {
        return Ok(());
    }
    if !is_root() {
        bail!("dpkg does not know the {arch} architecture yet; run: sudo dpkg --add-architecture {arch} && sudo apt-get update");
    }
    step(&format!("adding the {arch} architecture to dpkg (multiarch) and updating apt"));
    run(Command::new("dpkg").args(["--add-architecture", arch]))?;
    run(Command::new("apt-get").args(["update", "-qq"])).context("apt-get update failed; check the package mirror is reachable")
}
