//! The node's event loop. `PaymentReceived` means the node has claimed the payment
//! (the preimage is released): journal the receipt (synced), credit the MAC, and
//! only then tell the node the event is handled. A crash anywhere before that makes
//! the node deliver the event again after the restart; the journal is keyed by
//! payment hash, so the second delivery credits nothing new.

use std::sync::Arc;
use std::time::Duration;

use ldk_node::{Event, Node};
use tracing::{info, warn};

use crate::gateway::Gateway;
use crate::store::PaymentHash;

/// Handle the node's events until the process ends.
pub async fn run_event_loop(node: Arc<Node>, gw: Arc<Gateway>) {
    loop {
        let event = node.next_event_async().await;
        match &event {
            Event::PaymentReceived { payment_hash, amount_msat, .. } => {
                let hash = PaymentHash(payment_hash.0);
                super::fault_point("ln-before-journal", &hash.to_string());
                // Retry until the receipt is on disk and credited: acknowledging the
                // event without that would lose a paid purchase.
                loop {
                    match gw.credit_lightning_receipt(hash, *amount_msat).await {
                        Ok(()) => break,
                        Err(e) => {
                            warn!(payment_hash = %hash, error = %e, "could not journal or credit a Lightning payment; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
            Event::ChannelReady { channel_id, counterparty_node_id, .. } => {
                info!(%channel_id, counterparty = ?counterparty_node_id, "Lightning channel ready");
            }
            Event::ChannelClosed { channel_id, reason, .. } => {
                info!(%channel_id, ?reason, "Lightning channel closed");
            }
            Event::ChannelPending { channel_id, .. } => {
                info!(%channel_id, "Lightning channel pending");
            }
            Event::PaymentSuccessful { payment_hash, fee_paid_msat, .. } => {
                info!(payment_hash = %PaymentHash(payment_hash.0), fee_msat = ?fee_paid_msat, "outgoing Lightning payment succeeded");
            }
            Event::PaymentFailed { payment_hash, reason, .. } => {
                warn!(payment_hash = ?payment_hash.map(|h| PaymentHash(h.0)), ?reason, "outgoing Lightning payment failed");
            }
            other => {
                tracing::debug!(event = ?other, "Lightning event");
            }
        }
        if let Err(e) = node.event_handled() {
            warn!(error = %e, "the Lightning node could not mark an event handled; it will be delivered again");
        }
    }
}
