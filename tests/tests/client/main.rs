//! Client layer: the client agent (`bitmesh pay`, `bitmesh refund`) against a test
//! gateway serving the real API router (honest or hostile) and a real regtest node,
//! and what the operator CLI prints.
//!
//! One test binary per layer (aya's integration-test shape): one module per area.

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_output;
mod refund;
mod support;
mod test_gateway;
