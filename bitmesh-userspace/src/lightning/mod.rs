//! The Lightning rail (docs/design.md section 5.7): an embedded ldk-node sells
//! bundles of bytes for BOLT11 payments; a claimed payment is journaled, then
//! credited to the buyer's MAC in the same kernel meter as the channels.
//!
//! * `settings.rs`: the `--lightning*`, `--bundles`, `--lsp` flags, typed; bundle pricing.
//! * `token.rs`: purchase tokens (the secret naming a device's credit account).
//! * `node.rs`: building and starting the node; [`InvoiceSource`], what the gateway needs of it.
//! * `events.rs`: the node's event loop: payment received -> journal -> credit.
//! * `operator.rs`: the operator's view and actions (`bitmesh lightning ...`).
//!
//! The money rules live in `gateway/lightning.rs`, next to the channel rail's.

mod events;
mod node;
pub mod operator;
mod settings;
mod token;

pub use events::run_event_loop;
pub use node::{node_dir, seed_path, start, InvoiceSource, LdkInvoices, NewInvoice, NodeChain, NodeSpec};
pub use settings::{
    bytes_for_receipt, invoice_msat, parse_bundles, parse_duration, BundleSize, LightningSettings, LspSettings,
    MAX_PURCHASE_BYTES, MIN_PURCHASE_BYTES,
};
pub use token::{random_bytes, PurchaseToken, TokenKey};

/// Failures of the Lightning rail.
#[derive(Debug, thiserror::Error)]
pub enum LightningError {
    /// The node could not be set up (flags, files, chain source): says what to fix.
    #[error("{0}")]
    Setup(String),
    /// The running node refused an operation.
    #[error("{0}")]
    Node(String),
}

/// Hold the controller at a named point when `BITMESH_FAULT` names it (`NAME`, or
/// `NAME:DETAIL` for one payment hash only), for the fault tests to `kill -9` it from
/// outside exactly between two steps of the money path (e.g. after the receipt is
/// journaled, before the kernel is credited). It logs that it holds, then blocks
/// this thread (and the write lock the caller holds) until the kill. Without the
/// variable this does nothing.
pub fn fault_point(name: &str, detail: &str) {
    if std::env::var("BITMESH_FAULT").is_ok_and(|v| v == name || v == format!("{name}:{detail}")) {
        tracing::error!(point = name, detail, "BITMESH_FAULT: holding here until killed");
        loop {
            std::thread::park();
        }
    }
}
