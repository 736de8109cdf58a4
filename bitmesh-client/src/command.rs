//! The client subcommands, defined once: the `bitmesh-client` binary runs them and the
//! gateway's `bitmesh` binary flattens them in, so `bitmesh pay` and
//! `bitmesh-client pay` are the same command with the same flags.

use clap::Subcommand;

use crate::cli::{self, PayArgs, RefundArgs};

/// `pay` and `refund`.
#[derive(Subcommand)]
pub enum ClientCommand {
    /// Client: find the gateway, check its terms, open and fund a channel, pay as you go.
    Pay(PayArgs),
    /// Client: broadcast the refund of a channel the gateway never closed (after expiry).
    Refund(RefundArgs),
}

impl ClientCommand {
    /// Run the command to completion (blocking; the agent needs no async runtime).
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Pay(args) => cli::pay(args),
            Self::Refund(args) => cli::refund(args),
        }
    }
}
