//! Kernel layer: the eBPF meter alone, without the controller. Verdicts on crafted
//! frames (`BPF_PROG_TEST_RUN`), load and attach errors, byte metering through real
//! namespaces and veths, and the per-frame cost benchmark (ignored; run it with
//! `cargo test -p bitmesh-tests --test kernel bench:: -- --ignored --nocapture`).
//!
//! One test binary per layer (aya's integration-test shape): one module per area.

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bench;
mod errors;
mod netns_metering;
mod verdicts;
