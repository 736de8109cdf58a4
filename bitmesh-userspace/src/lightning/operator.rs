//! The operator's Lightning view and actions (`bitmesh lightning ...`, over the
//! admin socket): node, balances, channels, pending invoices; open a channel;
//! withdraw on-chain or to an invoice; export the seed.

use std::str::FromStr;
use std::sync::Arc;

use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::lightning_invoice::Bolt11Invoice;
use ldk_node::payment::PaymentStatus;
use ldk_node::Node;
use serde::{Deserialize, Serialize};

use super::LightningError;
use crate::store::{unix_now, Store};

/// One Lightning channel of the gateway's node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LnChannelRow {
    pub channel_id: String,
    pub counterparty: String,
    pub capacity_sat: u64,
    pub outbound_msat: u64,
    pub inbound_msat: u64,
    pub ready: bool,
    pub usable: bool,
}

/// One unpaid, unexpired invoice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInvoiceRow {
    pub payment_hash: String,
    pub mac: String,
    pub bytes: u64,
    pub amount_msat: u64,
    pub expires_at: i64,
}

/// `bitmesh lightning`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LightningInfo {
    pub node_id: String,
    pub listening: Vec<String>,
    pub onchain_total_sat: u64,
    pub onchain_spendable_sat: u64,
    pub anchor_reserve_sat: u64,
    pub lightning_balance_sat: u64,
    pub deposit_address: String,
    pub channels: Vec<LnChannelRow>,
    pub pending_invoices: Vec<PendingInvoiceRow>,
}

/// Read the node and the store for `bitmesh lightning`. Blocking.
pub fn info(node: &Node, store: &Store) -> Result<LightningInfo, LightningError> {
    let b = node.list_balances();
    let deposit = node
        .onchain_payment()
        .new_address()
        .map_err(|e| LightningError::Node(format!("cannot make a deposit address: {e}")))?;
    let channels = node
        .list_channels()
        .into_iter()
        .map(|c| LnChannelRow {
            channel_id: c.channel_id.to_string(),
            counterparty: c.counterparty_node_id.to_string(),
            capacity_sat: c.channel_value_sats,
            outbound_msat: c.outbound_capacity_msat,
            inbound_msat: c.inbound_capacity_msat,
            ready: c.is_channel_ready,
            usable: c.is_usable,
        })
        .collect();
    let pending = store
        .ln_pending_invoices(unix_now())
        .map_err(|e| LightningError::Node(e.to_string()))?
        .into_iter()
        .map(|i| PendingInvoiceRow {
            payment_hash: i.payment_hash.to_string(),
            mac: i.mac.to_string(),
            bytes: i.bytes,
            amount_msat: i.amount_msat,
            expires_at: i.expires_at,
        })
        .collect();
    Ok(LightningInfo {
        node_id: node.node_id().to_string(),
        listening: node.listening_addresses().unwrap_or_default().iter().map(|a| a.to_string()).collect(),
        onchain_total_sat: b.total_onchain_balance_sats,
        onchain_spendable_sat: b.spendable_onchain_balance_sats,
        anchor_reserve_sat: b.total_anchor_channels_reserve_sats,
        lightning_balance_sat: b.total_lightning_balance_sats,
        deposit_address: deposit.to_string(),
        channels,
        pending_invoices: pending,
    })
}

/// `NODE_ID@HOST:PORT`.
fn peer(target: &str) -> Result<(PublicKey, SocketAddress), LightningError> {
    let bad = || LightningError::Node(format!("{target:?} is not NODE_ID@HOST:PORT"));
    let (id, addr) = target.split_once('@').ok_or_else(bad)?;
    let id = PublicKey::from_str(id).map_err(|_| bad())?;
    let addr = SocketAddress::from_str(addr).map_err(|_| bad())?;
    Ok((id, addr))
}

/// Open a channel of `sat` to `target` from the node's on-chain funds. Blocking.
pub fn open_channel(node: &Node, target: &str, sat: u64) -> Result<String, LightningError> {
    let (id, addr) = peer(target)?;
    let user_id = node
        .open_channel(id, addr, sat, None, None)
        .map_err(|e| LightningError::Node(format!("cannot open the channel: {e} (fund the node's deposit address first)")))?;
    Ok(format!("{}", user_id.0))
}

/// Connect to a peer (for LSPs and peers that open channels to the gateway). Blocking.
pub fn connect(node: &Node, target: &str) -> Result<(), LightningError> {
    let (id, addr) = peer(target)?;
    node.connect(id, addr, true).map_err(|e| LightningError::Node(format!("cannot connect to {target}: {e}")))
}

/// Send `sat` (or everything spendable, keeping the anchor reserve, when `None`)
/// to an on-chain address. Blocking.
pub fn withdraw_onchain(node: &Node, network: bitcoin::Network, address: &str, sat: Option<u64>) -> Result<String, LightningError> {
    let addr = bitcoin::Address::from_str(address)
        .map_err(|e| LightningError::Node(format!("{address:?} is not an address: {e}")))?
        .require_network(network)
        .map_err(|_| LightningError::Node(format!("{address} is not an address on {network}")))?;
    let txid = match sat {
        Some(sat) => node.onchain_payment().send_to_address(&addr, sat, None),
        None => node.onchain_payment().send_all_to_address(&addr, true, None),
    }
    .map_err(|e| LightningError::Node(format!("cannot send: {e}")))?;
    Ok(txid.to_string())
}

/// How long `withdraw --invoice` waits for the payment's outcome.
const WITHDRAW_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Pay a BOLT11 invoice from the node's channels and wait for the outcome (up to a
/// minute): the payment id once it succeeded. Blocking.
pub fn withdraw_invoice(node: &Node, invoice: &str) -> Result<String, LightningError> {
    let inv = Bolt11Invoice::from_str(invoice.trim()).map_err(|e| LightningError::Node(format!("not a BOLT11 invoice: {e}")))?;
    let id = node.bolt11_payment().send(&inv, None).map_err(|e| LightningError::Node(format!("cannot pay the invoice: {e}")))?;
    let deadline = std::time::Instant::now() + WITHDRAW_WAIT;
    loop {
        match node.payment(&id).map(|p| p.status) {
            Some(PaymentStatus::Succeeded) => return Ok(id.to_string()),
            Some(PaymentStatus::Failed) => {
                return Err(LightningError::Node(format!(
                    "payment {id} failed (no route with enough outbound capacity, or the payee refused it): see the log"
                )))
            }
            _ if std::time::Instant::now() >= deadline => {
                return Err(LightningError::Node(format!(
                    "payment {id} is still pending after {} s: it may yet succeed or fail, see the log",
                    WITHDRAW_WAIT.as_secs()
                )))
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// The node handle the operator commands act on.
pub type NodeHandle = Arc<Node>;
