//! End-to-end layer: the whole product in the namespace testbed: the controller in
//! the gateway namespace, client agents (`bitmesh pay`) in client namespaces paying a
//! regtest node's channels while they download from the upstream namespace, faults
//! (kill -9, reboots, a vanished gateway) and the walled garden.
//!
//! One test binary per layer (aya's integration-test shape): one module per area.

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod concurrent;
mod faults;
mod long_download;
mod story;
mod walled_garden;
