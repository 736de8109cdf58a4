//! Chain layer: the channel library and the chain backends against a real regtest
//! node (script, funding checks, update verification, close and refund transactions,
//! the bitcoind and Esplora-shaped backends).
//!
//! One test binary per layer (aya's integration-test shape): one module per area.

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backend;
mod channel;
