//! `cargo xtask bench`: BitMesh's benchmarks, reported as ratios measured side by side
//! in one run (docs/design.md section 10). Never a timed assertion: this prints numbers.
//!
//! Sections: kernel cost per frame (BPF_PROG_TEST_RUN) against an empty program, at
//! 10 and 10,000 clients; forwarding rate over veth with the meter against no program
//! and per-MAC iptables/nftables accounting; controller payment updates per second
//! and memory. Writes `target/bench/report.md` and `target/bench/report.svg`.

mod controller;
mod forwarding;
mod kernel;
mod report;

use anyhow::{bail, Result};

fn main() -> Result<()> {
    if !bitmesh_tests::env::is_root() {
        bail!("the benchmarks load BPF programs and create namespaces: run them as root");
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let mut report = report::Report::default();
    if std::env::args().any(|a| a == "--portal-only") {
        eprintln!("bench: the captive portal's cost on paid traffic");
        forwarding::portal(&mut report, quick)?;
        return report.write();
    }
    eprintln!("bench: kernel cost per frame (BPF_PROG_TEST_RUN)");
    kernel::run(&mut report, if quick { 100_000 } else { 1_000_000 })?;
    eprintln!("bench: forwarding rate over veth");
    forwarding::run(&mut report, quick)?;
    eprintln!("bench: the captive portal's cost on paid traffic");
    forwarding::portal(&mut report, quick)?;
    eprintln!("bench: controller payment updates (real bitmesh run, regtest node)");
    controller::run(&mut report, quick)?;
    eprintln!("bench: controller memory with many paying clients");
    controller::memory(&mut report, quick)?;
    report.write()?;
    Ok(())
}
