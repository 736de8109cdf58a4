//! `test`, `demo` and `bench`: provision everything, then run.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cache::{repo_root, run, step};
use crate::{bitcoind, ebpf, provision};

/// Everything a test, the demo or a benchmark needs, built or installed.
struct Prepared {
    env: Vec<(&'static str, PathBuf)>,
}

impl Prepared {
    fn apply(&self, cmd: &mut Command) {
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
    }
}

fn host_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"))
}

/// Which build of the `bitmesh` binary the tests, demo or benchmarks run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    Debug,
    Release,
}

fn prepare(profile: Profile) -> Result<Prepared> {
    provision::debian_packages(provision::DEBIAN_PACKAGES)?;
    let obj = ebpf::build()?;
    let bins = bitcoind::ensure()?;
    step("building the bitmesh binary");
    let mut build = Command::new("cargo");
    build.current_dir(repo_root()).args(["build", "--package", "bitmesh-userspace", "--bin", "bitmesh"]);
    if profile == Profile::Release {
        build.arg("--release");
    }
    run(build.env("BITMESH_EBPF_OBJ", &obj))?;
    let profile_dir = if profile == Profile::Release { "release" } else { "debug" };
    Ok(Prepared {
        env: vec![
            ("BITMESH_EBPF_OBJ", obj),
            ("BITMESH_BITCOIND", bins.bitcoind),
            ("BITMESH_BITCOIN_CLI", bins.bitcoin_cli),
            ("BITMESH_BIN", host_target_dir().join(profile_dir).join("bitmesh")),
        ],
    })
}

/// The README's test command: every layer of tests, after provisioning.
pub fn test(args: &[String]) -> Result<()> {
    let prepared = prepare(Profile::Debug)?;
    step("running the tests: unit, kernel, namespace, chain, end-to-end");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(repo_root()).args(["test", "--workspace", "--no-fail-fast"]).args(args);
    prepared.apply(&mut cmd);
    run(&mut cmd)
}

pub fn demo() -> Result<()> {
    // Fail before minutes of building: the demo creates namespaces and loads BPF.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2));
    if euid.is_some_and(|u| u != "0") {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root (sudo cargo xtask demo)");
    }
    let prepared = prepare(Profile::Debug)?;
    step("running the demo: namespaces, a regtest node, the controller, three channel clients and a Lightning buyer");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(repo_root()).args(["run", "--package", "bitmesh-tests", "--bin", "bitmesh-demo"]);
    prepared.apply(&mut cmd);
    let status = cmd.status().context("could not start cargo run for the demo")?;
    match status.code() {
        Some(0) => Ok(()),
        // The demo's own Ctrl-C handler has already removed what it created.
        Some(130) => {
            step("demo interrupted; its namespaces, processes and pinned maps were removed");
            std::process::exit(130)
        }
        _ => bail!("the demo failed ({status}); the lines above say at which step"),
    }
}

/// Benchmarks (release build): ratios measured side by side in one run.
pub fn bench(args: &[String]) -> Result<()> {
    // The controller figures are for the binary an operator would run.
    let prepared = prepare(Profile::Release)?;
    step("running the benchmarks (release build); report in target/bench/");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(repo_root())
        .args(["run", "--release", "--package", "bitmesh-tests", "--bin", "bitmesh-bench", "--"])
        .args(args);
    prepared.apply(&mut cmd);
    run(&mut cmd)
}

/// The load run (release build, like an operator's): one ignored test, its figures printed.
pub fn load(clients: u32, secs: u32) -> Result<()> {
    let prepared = prepare(Profile::Release)?;
    step(&format!("load: {clients} clients paying and transferring for {secs} s (release build)"));
    let mut cmd = Command::new("cargo");
    cmd.current_dir(repo_root())
        .args(["test", "--release", "--package", "bitmesh-tests", "--test", "controller", "--", "--ignored", "--nocapture", "load::"])
        .env("BITMESH_LOAD_CLIENTS", clients.to_string())
        .env("BITMESH_LOAD_SECS", secs.to_string());
    prepared.apply(&mut cmd);
    run(&mut cmd)
}

/// Every crate-boundary guard, the slow fresh-checkout build included.
pub fn boundaries() -> Result<()> {
    step("checking the crate boundaries (a fresh build without the eBPF object)");
    let status = Command::new("cargo")
        .current_dir(repo_root())
        .args(["test", "--package", "xtask", "--test", "crate_boundaries", "--", "--include-ignored"])
        .status()
        .context("could not start cargo test for the crate boundaries")?;
    if !status.success() {
        bail!("a crate-boundary guard failed; see the output above");
    }
    Ok(())
}
