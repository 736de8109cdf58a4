//! Chain access: one trait, [`Chain`], with two real backends, [`BitcoindRpc`]
//! (Bitcoin Core JSON-RPC) and [`Esplora`] (Esplora HTTP API).
//!
//! The trait is blocking, on purpose: both client crates (corepc-client, esplora-
//! client) are blocking HTTP, the trait stays object-safe so `--chain` can pick a
//! backend at run time as `Arc<dyn Chain>`, and chain calls are rare (a few per
//! block or per channel open), so the tokio controller simply wraps each call in
//! `tokio::task::spawn_blocking` instead of paying for a second HTTP stack.

use bitcoin::{absolute, Amount, FeeRate, OutPoint, Script, Transaction, TxOut, Txid};

mod bitcoind;
mod esplora;

pub use bitcoind::{BitcoindAuth, BitcoindRpc};
pub use esplora::Esplora;

/// A transaction as the chain sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxStatus {
    /// The transaction.
    pub tx: Transaction,
    /// 0 while in the mempool, else tip - block height + 1.
    pub confirmations: u32,
    /// Height of the confirming block, if confirmed.
    pub block_height: Option<absolute::Height>,
}

/// An unspent output as the chain sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputStatus {
    /// The output.
    pub txout: TxOut,
    /// 0 while its transaction is in the mempool.
    pub confirmations: u32,
}

/// An unspent output found by the script it pays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptUtxo {
    /// Where it is.
    pub outpoint: OutPoint,
    /// Its value.
    pub value: Amount,
    /// 0 while its transaction is in the mempool.
    pub confirmations: u32,
}

/// The node's verdict on one transaction in a mempool acceptance test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MempoolAcceptance {
    /// The transaction tested.
    pub txid: Txid,
    /// Whether it would be accepted.
    pub allowed: bool,
    /// Why not (Bitcoin Core's reject reason), when refused.
    pub reject_reason: Option<String>,
    /// Its virtual size, when reported.
    pub vsize: Option<u64>,
}

/// A failed chain call: which backend, which call, and why.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The request failed or the node answered with an error.
    #[error("{backend} {call} failed: {message}: check the node is running, synced and reachable with the configured URL and credentials")]
    Call {
        /// `bitcoind` or `esplora`.
        backend: &'static str,
        /// The RPC method or HTTP endpoint.
        call: &'static str,
        /// The underlying error.
        message: String,
    },
    /// The node answered with something this code does not understand.
    #[error("{backend} {call} returned an unexpected answer: {message}: check the node version is supported")]
    Unexpected {
        /// `bitcoind` or `esplora`.
        backend: &'static str,
        /// The RPC method or HTTP endpoint.
        call: &'static str,
        /// What was wrong.
        message: String,
    },
    /// The backend has no such call.
    #[error("{backend} does not support {call}: use the bitcoind backend for this")]
    Unsupported {
        /// `bitcoind` or `esplora`.
        backend: &'static str,
        /// The call.
        call: &'static str,
    },
    /// The backend refused to broadcast the transaction.
    #[error("{backend} rejected transaction {txid}: {reason}")]
    Rejected {
        /// `bitcoind` or `esplora`.
        backend: &'static str,
        /// The transaction.
        txid: Txid,
        /// The node's reason.
        reason: String,
    },
    /// The backend could not be set up (bad URL, unreadable cookie file).
    #[error("{backend} setup failed: {message}")]
    Setup {
        /// `bitcoind` or `esplora`.
        backend: &'static str,
        /// What failed.
        message: String,
    },
}

/// What the controller and client need from a chain. Blocking; see the module docs.
pub trait Chain: Send + Sync {
    /// `bitcoind` or `esplora`, for logs and errors.
    fn backend(&self) -> &'static str;
    /// Height of the best block.
    fn tip_height(&self) -> Result<absolute::Height, ChainError>;
    /// A transaction in the mempool or the chain, or `None` if unknown.
    fn transaction(&self, txid: &Txid) -> Result<Option<TxStatus>, ChainError>;
    /// An unspent output (mempool included), or `None` if unknown or spent.
    fn unspent_output(&self, outpoint: &OutPoint) -> Result<Option<OutputStatus>, ChainError>;
    /// Broadcast; returns the txid. A transaction already known is not an error.
    fn broadcast(&self, tx: &Transaction) -> Result<Txid, ChainError>;
    /// Fee rate to confirm within `target_blocks`, never below `floor` (estimators
    /// have no data on a fresh or quiet chain; regtest never does).
    fn fee_rate(&self, target_blocks: u16, floor: FeeRate) -> Result<FeeRate, ChainError>;
    /// Would the node accept these transactions (a package: children may spend
    /// parents)? Nothing is broadcast.
    fn test_mempool_accept(
        &self,
        txs: &[Transaction],
    ) -> Result<Vec<MempoolAcceptance>, ChainError>;
    /// Can this backend serve the controller? Bitcoin Core must have `-txindex=1`:
    /// confirmed funding and settlement transactions are looked up by txid
    /// (`getrawtransaction`), which a node without the index (every pruned node)
    /// cannot answer. Backends with nothing to check say yes.
    fn check_ready(&self) -> Result<(), ChainError> {
        Ok(())
    }
    /// Unspent outputs paying `script` (how the client agent notices a wallet paid
    /// its channel address). Bitcoin Core: `scantxoutset`, confirmed outputs only (it
    /// scans the UTXO set, not the mempool); Esplora: `/scripthash/:hash/utxo`,
    /// mempool included. Backends without a script index say `Unsupported`.
    fn outputs_paying(&self, script: &Script) -> Result<Vec<ScriptUtxo>, ChainError> {
        let _ = script;
        Err(ChainError::Unsupported { backend: self.backend(), call: "outputs_paying" })
    }
}

pub(crate) fn height(
    backend: &'static str,
    call: &'static str,
    h: u64,
) -> Result<absolute::Height, ChainError> {
    u32::try_from(h)
        .ok()
        .and_then(|h| absolute::Height::from_consensus(h).ok())
        .ok_or(ChainError::Unexpected {
            backend,
            call,
            message: format!("height {h} out of range"),
        })
}
