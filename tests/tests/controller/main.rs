//! Controller layer: a real `bitmesh run` in a namespace testbed, driven over raw HTTP
//! and the operator CLI by scripted clients: payments, settlement, restarts, hostile
//! input and the attacks (`attack_*`, `garden_attacks`). The measurements are ignored
//! tests, run by name:
//!
//! * `cargo test -p bitmesh-tests --test controller latency:: -- --ignored --nocapture`
//! * `cargo test -p bitmesh-tests --test controller memory:: -- --ignored --nocapture`
//! * `cargo xtask load` (`--test controller load:: -- --ignored`, release build)
//!
//! One test binary per layer (aya's integration-test shape): one module per area.

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod attack_replay;
mod batch;
mod batch_double_spend;
mod chain_stale;
mod clients;
mod connections;
mod double_spend;
mod garden_attacks;
mod hostile;
mod latency;
mod load;
mod memory;
mod restart;
mod session;
mod settlement;
mod smoke;
