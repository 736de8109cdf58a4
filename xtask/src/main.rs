//! `cargo xtask`: the developer's and CI's entry point.
//!
//! Every command provisions what it needs first (Debian packages, the nightly's
//! `rust-src`, bpf-linker, the regtest bitcoind), caching expensive builds outside
//! the repo keyed by version, so a fresh machine needs nothing but this repo.

mod bitcoind;
mod cache;
mod cross;
mod dist;
mod ebpf;
mod fuzz;
mod pi_check;
mod provision;
mod run;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "BitMesh build, test, demo and benchmark driver")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object (installs nightly rust-src and bpf-linker when missing).
    BuildEbpf,
    /// Build (once, then cached) a regtest bitcoind and bitcoin-cli from the Bitcoin Core
    /// tree vendored in libbitcoinkernel-sys, and print their paths.
    Bitcoind,
    /// Run every test: host unit tests, kernel (BPF_PROG_TEST_RUN), namespace,
    /// regtest-chain and end-to-end tests. Installs and builds what it needs.
    Test {
        /// Extra arguments passed to `cargo test` (for example a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the decoders and checks (cargo-fuzz, libFuzzer, nightly): API requests,
    /// payment updates, the kernel's frame classifier, the agent's reading of gateway
    /// answers. Installs cargo-fuzz once into the cache.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// The crate-boundary guards in full, including the slow one the default test run
    /// skips: the workspace checks on a fresh checkout without the eBPF object, while
    /// the gateway binary refuses to link (a second build of the whole tree).
    Boundaries,
    /// Run the whole story on one machine: namespaces, regtest chain, controller, clients.
    Demo,
    /// Benchmarks: kernel cost per frame, forwarding rate, payment updates per second.
    /// Writes target/bench/report.md and report.svg.
    Bench {
        /// Arguments for the benchmark binary (`--quick` for short runs).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Load run: 200 clients paying and transferring for 60 s through the real
    /// controller; checks the books and prints payment latency (p50/p99).
    Load {
        /// Clients (macvlan identities, each its own MAC and IP).
        #[arg(long, default_value_t = 200)]
        clients: u32,
        /// Seconds of paying and transferring.
        #[arg(long, default_value_t = 60)]
        secs: u32,
    },
    /// Build the release `bitmesh` binary (eBPF object embedded) for TARGET and package
    /// it as target/dist/bitmesh_<version>_<arch>.deb with the systemd unit, the example
    /// configs and the docs. Installs the Rust target and Debian's cross compilers.
    Dist {
        /// Rust target triple: x86_64-unknown-linux-gnu or aarch64-unknown-linux-gnu.
        /// [default: the build host's]
        #[arg(long)]
        target: Option<String>,
    },
    /// Boot Debian 12's arm64 kernel under qemu-system-aarch64 (Cortex-A72, as in a
    /// Pi 4) and run the kernel verdict and namespace metering tests there (the clsact
    /// path); also on bookworm-backports' newer arm64 kernel (tcx) when apt offers one.
    /// Prints a pass/fail table; exits non-zero on any failure or timeout.
    PiCheck {
        /// Only Debian 12's own kernel (skip the backports kernel).
        #[arg(long)]
        stable_only: bool,
        /// Minutes one guest may run before it counts as hung.
        #[arg(long, default_value_t = 30)]
        timeout_mins: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::BuildEbpf => {
            let obj = ebpf::build()?;
            println!("{}", obj.display());
        }
        Command::Bitcoind => {
            let bins = bitcoind::ensure()?;
            println!("bitcoind:    {}", bins.bitcoind.display());
            println!("bitcoin-cli: {}", bins.bitcoin_cli.display());
        }
        Command::Test { args } => run::test(&args)?,
        Command::Fuzz { secs, targets } => fuzz::fuzz(secs, &targets)?,
        Command::Boundaries => run::boundaries()?,
        Command::Demo => run::demo()?,
        Command::Bench { args } => run::bench(&args)?,
        Command::Load { clients, secs } => run::load(clients, secs)?,
        Command::Dist { target } => {
            let p = dist::dist(target.as_deref())?;
            println!("{}", p.deb.display());
            println!("  package: {} bytes ({:.1} MiB)", p.deb_bytes, p.deb_bytes as f64 / 1048576.0);
            println!("  /usr/bin/bitmesh: {} bytes ({:.1} MiB)", p.binary_bytes, p.binary_bytes as f64 / 1048576.0);
            println!("  Depends: {}", p.depends);
        }
        Command::PiCheck { stable_only, timeout_mins } => pi_check::pi_check(stable_only, timeout_mins)?,
    }
    Ok(())
}
