//! A regtest `bitcoind` and `bitcoin-cli`, built once from the Bitcoin Core source tree
//! vendored in the crates.io package `libbitcoinkernel-sys` (Bitcoin Core is not in the
//! registries this machine reaches), and cached outside the repo keyed by that version.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cache::{cache_dir, output, run, step};
use crate::provision;

/// Exact crate version whose vendored Bitcoin Core we build. Changing it changes the
/// cache key, so a new version is built beside the old one.
pub const LIBBITCOINKERNEL_SYS_VERSION: &str = "0.4.1";

/// Debian packages the C++ build needs (docs/design.md section 7).
const BUILD_PACKAGES: &[&str] = &["build-essential", "cmake", "pkg-config", "libboost-dev", "libevent-dev"];

pub struct Binaries {
    pub bitcoind: PathBuf,
    pub bitcoin_cli: PathBuf,
}

/// Directory holding the cached binaries for this version.
pub fn install_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join(format!("bitcoin-core-{LIBBITCOINKERNEL_SYS_VERSION}")).join("bin"))
}

/// Return the cached binaries, building them first if they are missing.
pub fn ensure() -> Result<Binaries> {
    let dir = install_dir()?;
    let bins = Binaries { bitcoind: dir.join("bitcoind"), bitcoin_cli: dir.join("bitcoin-cli") };
    if bins.bitcoind.is_file() && bins.bitcoin_cli.is_file() {
        return Ok(bins);
    }
    provision::debian_packages(BUILD_PACKAGES)?;
    let src = vendored_source()?;
    let build = cache_dir()?.join("build").join(format!("bitcoin-core-{LIBBITCOINKERNEL_SYS_VERSION}"));
    step(&format!(
        "building bitcoind and bitcoin-cli from {} (about 10 minutes on 2 cores, once; cached in {})",
        src.display(),
        dir.display()
    ));
    run(Command::new("cmake")
        .arg("-S")
        .arg(&src)
        .arg("-B")
        .arg(&build)
        .args([
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_DAEMON=ON",
            "-DBUILD_CLI=ON",
            "-DENABLE_WALLET=OFF",
            "-DENABLE_IPC=OFF",
            "-DWITH_ZMQ=OFF",
            "-DWITH_EMBEDDED_ASMAP=OFF",
            "-DBUILD_TESTS=OFF",
            "-DBUILD_BENCH=OFF",
            "-DBUILD_GUI=OFF",
            "-DBUILD_TX=OFF",
            "-DBUILD_UTIL=OFF",
            "-DBUILD_WALLET_TOOL=OFF",
            "-DBUILD_FUZZ_BINARY=OFF",
            "-DBUILD_KERNEL_LIB=OFF",
        ]))
    .context("configuring Bitcoin Core with cmake failed; see the output above")?;
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).to_string();
    run(Command::new("cmake")
        .arg("--build")
        .arg(&build)
        .args(["-j", &jobs, "--target", "bitcoind", "bitcoin-cli"]))
    .context("building Bitcoin Core failed; see the compiler output above")?;
    std::fs::create_dir_all(&dir)?;
    for (name, dest) in [("bitcoind", &bins.bitcoind), ("bitcoin-cli", &bins.bitcoin_cli)] {
        let built = [build.join("bin").join(name), build.join("src").join(name)]
            .into_iter()
            .find(|p| p.is_file())
            .with_context(|| format!("the build finished but no {name} binary is under {}", build.display()))?;
        // Copy then rename, so an interrupted copy never looks like a finished cache entry.
        let partial = dest.with_extension("partial");
        std::fs::copy(&built, &partial)?;
        std::fs::rename(&partial, dest)?;
    }
    step(&format!("bitcoind ready in {}", dir.display()));
    Ok(bins)
}

/// Fetch `libbitcoinkernel-sys` from crates.io (through cargo, into its registry cache)
/// and return the path of the Bitcoin Core tree inside it.
fn vendored_source() -> Result<PathBuf> {
    let probe = cache_dir()?.join(format!("fetch-libbitcoinkernel-sys-{LIBBITCOINKERNEL_SYS_VERSION}"));
    std::fs::create_dir_all(probe.join("src"))?;
    std::fs::write(
        probe.join("Cargo.toml"),
        format!(
            "[package]\nname = \"fetch-bitcoin-core\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
             [dependencies]\nlibbitcoinkernel-sys = \"={LIBBITCOINKERNEL_SYS_VERSION}\"\n\n[workspace]\n"
        ),
    )?;
    std::fs::write(probe.join("src").join("lib.rs"), "")?;
    step(&format!("fetching libbitcoinkernel-sys {LIBBITCOINKERNEL_SYS_VERSION} (Bitcoin Core source) from crates.io"));
    let meta = output(
        Command::new("cargo")
            .args(["metadata", "--format-version", "1", "--manifest-path"])
            .arg(probe.join("Cargo.toml"))
            .env_remove("CARGO_TARGET_DIR"),
    )?;
    let meta: serde_json::Value = serde_json::from_str(&meta).context("parsing cargo metadata output")?;
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "libbitcoinkernel-sys")
        .and_then(|p| p["manifest_path"].as_str())
        .context("cargo metadata did not list libbitcoinkernel-sys")?;
    let src = Path::new(manifest).parent().map(|d| d.join("bitcoin")).unwrap_or_default();
    if !src.join("CMakeLists.txt").is_file() {
        bail!("libbitcoinkernel-sys has no Bitcoin Core tree at {}", src.display());
    }
    Ok(src)
}
