//! Prints the kernel cost per frame (BPF_PROG_TEST_RUN, 1,000,000 runs per path)
//! next to an empty program, at 10 and 10,000 clients. Not a timed test:
//! `cargo test -p bitmesh-tests --test kernel bench:: -- --ignored --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test should panic

use bitmesh_tests::env::{is_root, skip};
use bitmesh_tests::bench::kernel::{format_table, kernel_cost_per_frame};

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn kernel_bench() {
    if !is_root() {
        return skip("the kernel benchmark needs root");
    }
    for clients in [10, 10_000] {
        let rows = kernel_cost_per_frame(1_000_000, clients).expect("benchmark");
        println!("{}", format_table(&rows));
    }
}
