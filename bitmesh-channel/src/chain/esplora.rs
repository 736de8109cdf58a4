//! Esplora HTTP backend (esplora-client, blocking), for operators without a node.

use bitcoin::{absolute, FeeRate, OutPoint, Script, Transaction, Txid};
use esplora_client::{BlockingClient, Builder};

use super::{height, Chain, ChainError, MempoolAcceptance, OutputStatus, ScriptUtxo, TxStatus};

const BACKEND: &str = "esplora";

/// An Esplora server, e.g. `https://blockstream.info/api` or a local electrs.
pub struct Esplora {
    client: BlockingClient,
}

impl std::fmt::Debug for Esplora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Esplora({})", self.client.url())
    }
}

fn call_err(call: &'static str) -> impl Fn(esplora_client::Error) -> ChainError {
    move |e| ChainError::Call {
        backend: BACKEND,
        call,
        message: e.to_string(),
    }
}

impl Esplora {
    /// A client for the API at `base_url` (no trailing slash).
    pub fn new(base_url: &str) -> Self {
        Esplora {
            client: Builder::new(base_url)
                .timeout(std::time::Duration::from_secs(30))
                .build_blocking(),
        }
    }

    fn confirmations(&self, block_height: Option<u32>) -> Result<u32, ChainError> {
        match block_height {
            None => Ok(0),
            Some(h) => {
                let tip = self
                    .client
                    .get_height()
                    .map_err(call_err("GET /blocks/tip/height"))?;
                Ok(tip.saturating_sub(h) + 1)
            }
        }
    }
}

impl Chain for Esplora {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn tip_height(&self) -> Result<absolute::Height, ChainError> {
        let h = self
            .client
            .get_height()
            .map_err(call_err("GET /blocks/tip/height"))?;
        height(BACKEND, "GET /blocks/tip/height", u64::from(h))
    }

    fn transaction(&self, txid: &Txid) -> Result<Option<TxStatus>, ChainError> {
        let Some(tx) = self
            .client
            .get_tx(txid)
            .map_err(call_err("GET /tx/:txid/raw"))?
        else {
            return Ok(None);
        };
        let status = self
            .client
            .get_tx_status(txid)
            .map_err(call_err("GET /tx/:txid/status"))?;
        let block_height = if status.confirmed {
            status.block_height
        } else {
            None
        };
        let confirmations = self.confirmations(block_height)?;
        let block_height = block_height
            .map(|h| height(BACKEND, "GET /tx/:txid/status", u64::from(h)))
            .transpose()?;
        Ok(Some(TxStatus {
            tx,
            confirmations,
            block_height,
        }))
    }

    fn unspent_output(&self, outpoint: &OutPoint) -> Result<Option<OutputStatus>, ChainError> {
        let Some(tx) = self.transaction(&outpoint.txid)? else {
            return Ok(None);
        };
        let Some(txout) = tx.tx.output.get(outpoint.vout as usize).cloned() else {
            return Ok(None);
        };
        let spent = self
            .client
            .get_output_status(&outpoint.txid, u64::from(outpoint.vout))
            .map_err(call_err("GET /tx/:txid/outspend/:vout"))?
            .is_some_and(|s| s.spent);
        Ok((!spent).then_some(OutputStatus {
            txout,
            confirmations: tx.confirmations,
        }))
    }

    fn outputs_paying(&self, script: &Script) -> Result<Vec<ScriptUtxo>, ChainError> {
        const CALL: &str = "GET /scripthash/:hash/utxo";
        let utxos = self.client.get_scripthash_utxos(script).map_err(call_err(CALL))?;
        let mut out = Vec::with_capacity(utxos.len());
        for u in utxos {
            let confirmed = if u.status.confirmed { u.status.block_height } else { None };
            out.push(ScriptUtxo {
                outpoint: OutPoint { txid: u.txid, vout: u.vout },
                value: u.value,
                confirmations: self.confirmations(confirmed)?,
            });
        }
        Ok(out)
    }

    fn broadcast(&self, tx: &Transaction) -> Result<Txid, ChainError> {
        let txid = tx.compute_txid();
        match self.client.broadcast(tx) {
            Ok(_) => Ok(txid),
            Err(esplora_client::Error::HttpResponse { message, .. }) => {
                if message.contains("already in") || message.contains("txn-already-known") {
                    Ok(txid)
                } else {
                    Err(ChainError::Rejected {
                        backend: BACKEND,
                        txid,
                        reason: message,
                    })
                }
            }
            Err(e) => Err(call_err("POST /tx")(e)),
        }
    }

    fn fee_rate(&self, target_blocks: u16, floor: FeeRate) -> Result<FeeRate, ChainError> {
        let estimates = self
            .client
            .get_fee_estimates()
            .map_err(call_err("GET /fee-estimates"))?;
        // Esplora keys estimates by target; take the first target at or beyond ours.
        let estimate = estimates
            .iter()
            .filter(|(t, _)| **t >= target_blocks)
            .min_by_key(|(t, _)| **t)
            .map(|(_, r)| *r);
        Ok(estimate.map_or(floor, |e| e.max(floor)))
    }

    fn test_mempool_accept(
        &self,
        _txs: &[Transaction],
    ) -> Result<Vec<MempoolAcceptance>, ChainError> {
        // The Esplora API has no dry-run endpoint.
        Err(ChainError::Unsupported {
            backend: BACKEND,
            call: "testmempoolaccept",
        })
    }
}
