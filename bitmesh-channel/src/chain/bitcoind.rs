//! Bitcoin Core JSON-RPC backend: rust-bitcoin's `jsonrpc` client over HTTP, raw JSON
//! calls so that no node-version-specific response type is needed.

use std::path::PathBuf;

use bitcoin::consensus::encode;
use bitcoin::{absolute, Amount, FeeRate, OutPoint, Script, ScriptBuf, Transaction, TxOut, Txid};
use jsonrpc::Client;
use serde_json::{json, Value};

use super::{height, Chain, ChainError, MempoolAcceptance, OutputStatus, ScriptUtxo, TxStatus};

const BACKEND: &str = "bitcoind";

/// How to authenticate to bitcoind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitcoindAuth {
    /// The `.cookie` file in the node's data directory (read at connect time).
    Cookie(PathBuf),
    /// `rpcuser` / `rpcpassword`.
    UserPass(String, String),
}

/// Bitcoin Core over JSON-RPC. Transaction lookup of confirmed transactions needs
/// the node to run with `-txindex=1` (checked by [`Chain::check_ready`] at start);
/// funding outputs are watched with `gettxout`, which needs no index.
pub struct BitcoindRpc {
    client: Client,
}

impl std::fmt::Debug for BitcoindRpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BitcoindRpc")
    }
}

fn call_err(call: &'static str) -> impl Fn(jsonrpc::Error) -> ChainError {
    move |e| ChainError::Call {
        backend: BACKEND,
        call,
        message: e.to_string(),
    }
}

fn unexpected(call: &'static str, message: impl Into<String>) -> ChainError {
    ChainError::Unexpected {
        backend: BACKEND,
        call,
        message: message.into(),
    }
}

/// RPC error code of "No such mempool or blockchain transaction".
const RPC_INVALID_ADDRESS_OR_KEY: i64 = -5;

impl BitcoindRpc {
    /// Connect to `url` (e.g. `http://127.0.0.1:18443`). Nothing is sent yet.
    pub fn new(url: &str, auth: BitcoindAuth) -> Result<Self, ChainError> {
        let setup = |message: String| ChainError::Setup {
            backend: BACKEND,
            message,
        };
        let (user, pass) = match auth {
            BitcoindAuth::UserPass(u, p) => (u, p),
            BitcoindAuth::Cookie(path) => {
                let cookie = std::fs::read_to_string(&path).map_err(|e| {
                    setup(format!(
                        "cannot read cookie file {}: {e}: is bitcoind running with this -datadir?",
                        path.display()
                    ))
                })?;
                let (u, p) = cookie.trim().split_once(':').ok_or_else(|| {
                    setup(format!(
                        "cookie file {} is not user:password",
                        path.display()
                    ))
                })?;
                (u.to_owned(), p.to_owned())
            }
        };
        let transport = jsonrpc::http::bitreq_http::Builder::new()
            .url(url)
            .map_err(|e| setup(format!("bad RPC URL {url}: {e}")))?
            .timeout(std::time::Duration::from_secs(30))
            .basic_auth(user, Some(pass))
            .build();
        Ok(BitcoindRpc {
            client: Client::with_transport(transport),
        })
    }

    /// Call any RPC method with JSON arguments (tests use it for `generatetoaddress`).
    pub fn call_raw(&self, method: &'static str, args: &[Value]) -> Result<Value, ChainError> {
        self.call(method, args).map_err(call_err(method))
    }

    fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &'static str,
        args: &[Value],
    ) -> Result<T, jsonrpc::Error> {
        let raw = serde_json::value::to_raw_value(args)?;
        self.client.call(method, Some(&*raw))
    }

    fn is_not_found(e: &jsonrpc::Error) -> bool {
        matches!(e, jsonrpc::Error::Rpc(r) if i64::from(r.code) == RPC_INVALID_ADDRESS_OR_KEY)
    }
}

impl Chain for BitcoindRpc {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn check_ready(&self) -> Result<(), ChainError> {
        const CALL: &str = "getindexinfo";
        let v: Value = self.call(CALL, &[]).map_err(call_err(CALL))?;
        if v.get("txindex").is_none() {
            return Err(ChainError::Setup {
                backend: BACKEND,
                message: "the node runs without -txindex=1 (a pruned node cannot have it), so the gateway cannot look up confirmed funding and settlement transactions: restart bitcoind with -txindex=1 on an unpruned node, or use --chain esplora".into(),
            });
        }
        Ok(())
    }

    fn tip_height(&self) -> Result<absolute::Height, ChainError> {
        let h: u64 = self
            .call("getblockcount", &[])
            .map_err(call_err("getblockcount"))?;
        height(BACKEND, "getblockcount", h)
    }

    fn transaction(&self, txid: &Txid) -> Result<Option<TxStatus>, ChainError> {
        const CALL: &str = "getrawtransaction";
        let v: Value = match self.call(CALL, &[json!(txid.to_string()), json!(true)]) {
            Ok(v) => v,
            Err(e) if Self::is_not_found(&e) => return Ok(None),
            Err(e) => return Err(call_err(CALL)(e)),
        };
        let hex = v["hex"]
            .as_str()
            .ok_or_else(|| unexpected(CALL, "no hex"))?;
        let tx: Transaction =
            encode::deserialize_hex(hex).map_err(|e| unexpected(CALL, e.to_string()))?;
        let confirmations = v["confirmations"].as_u64().unwrap_or(0);
        let block_height = if confirmations > 0 {
            let tip = self.tip_height()?.to_consensus_u32();
            let conf = u32::try_from(confirmations).map_err(|e| unexpected(CALL, e.to_string()))?;
            Some(height(
                BACKEND,
                CALL,
                u64::from(tip + 1 - conf.min(tip + 1)),
            )?)
        } else {
            None
        };
        let confirmations =
            u32::try_from(confirmations).map_err(|e| unexpected(CALL, e.to_string()))?;
        Ok(Some(TxStatus {
            tx,
            confirmations,
            block_height,
        }))
    }

    fn unspent_output(&self, outpoint: &OutPoint) -> Result<Option<OutputStatus>, ChainError> {
        const CALL: &str = "gettxout";
        let v: Value = self
            .call(
                CALL,
                &[
                    json!(outpoint.txid.to_string()),
                    json!(outpoint.vout),
                    json!(true),
                ],
            )
            .map_err(call_err(CALL))?;
        if v.is_null() {
            return Ok(None);
        }
        let btc = v["value"]
            .as_f64()
            .ok_or_else(|| unexpected(CALL, "no value"))?;
        let value = Amount::from_btc(btc).map_err(|e| unexpected(CALL, e.to_string()))?;
        let spk = v["scriptPubKey"]["hex"]
            .as_str()
            .ok_or_else(|| unexpected(CALL, "no scriptPubKey"))?;
        let script_pubkey =
            ScriptBuf::from_hex(spk).map_err(|e| unexpected(CALL, e.to_string()))?;
        let confirmations = u32::try_from(v["confirmations"].as_u64().unwrap_or(0))
            .map_err(|e| unexpected(CALL, e.to_string()))?;
        Ok(Some(OutputStatus {
            txout: TxOut {
                value,
                script_pubkey,
            },
            confirmations,
        }))
    }

    fn outputs_paying(&self, script: &Script) -> Result<Vec<ScriptUtxo>, ChainError> {
        const CALL: &str = "scantxoutset";
        // A `raw()` descriptor matches the exact output script; no wallet needed.
        let desc = json!({ "desc": format!("raw({})", script.to_hex_string()) });
        let v: Value = self.call(CALL, &[json!("start"), json!([desc])]).map_err(call_err(CALL))?;
        if v["success"].as_bool() == Some(false) {
            return Err(unexpected(CALL, "scan did not complete"));
        }
        // `height` is the tip the scan ran at; each unspent has its block's height.
        let tip = v["height"].as_u64().ok_or_else(|| unexpected(CALL, "no height"))?;
        let unspents = v["unspents"].as_array().ok_or_else(|| unexpected(CALL, "no unspents"))?;
        let mut out = Vec::with_capacity(unspents.len());
        for u in unspents {
            let txid: Txid = u["txid"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| unexpected(CALL, "bad txid"))?;
            let vout = u["vout"]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| unexpected(CALL, "bad vout"))?;
            let btc = u["amount"].as_f64().ok_or_else(|| unexpected(CALL, "no amount"))?;
            let value = Amount::from_btc(btc).map_err(|e| unexpected(CALL, e.to_string()))?;
            let at = u["height"].as_u64().ok_or_else(|| unexpected(CALL, "no height"))?;
            let confirmations = u32::try_from((tip + 1).saturating_sub(at))
                .map_err(|e| unexpected(CALL, e.to_string()))?;
            out.push(ScriptUtxo { outpoint: OutPoint { txid, vout }, value, confirmations });
        }
        Ok(out)
    }

    fn broadcast(&self, tx: &Transaction) -> Result<Txid, ChainError> {
        const CALL: &str = "sendrawtransaction";
        let txid = tx.compute_txid();
        match self.call::<String>(CALL, &[json!(encode::serialize_hex(tx))]) {
            Ok(_) => Ok(txid),
            Err(jsonrpc::Error::Rpc(r)) => {
                // Re-broadcasting a transaction already in the mempool or chain is fine.
                if r.message.contains("already in") || r.message.contains("txn-already-known") {
                    Ok(txid)
                } else {
                    Err(ChainError::Rejected {
                        backend: BACKEND,
                        txid,
                        reason: r.message,
                    })
                }
            }
            Err(e) => Err(call_err(CALL)(e)),
        }
    }

    fn fee_rate(&self, target_blocks: u16, floor: FeeRate) -> Result<FeeRate, ChainError> {
        const CALL: &str = "estimatesmartfee";
        let v: Value = self
            .call(CALL, &[json!(target_blocks)])
            .map_err(call_err(CALL))?;
        // BTC per kvB; absent when the node has no estimate yet.
        let estimate = v["feerate"]
            .as_f64()
            .and_then(|btc_per_kvb| Amount::from_btc(btc_per_kvb).ok())
            .map(|per_kvb| FeeRate::from_sat_per_kwu(per_kvb.to_sat() / 4));
        Ok(estimate.map_or(floor, |e| e.max(floor)))
    }

    fn test_mempool_accept(
        &self,
        txs: &[Transaction],
    ) -> Result<Vec<MempoolAcceptance>, ChainError> {
        const CALL: &str = "testmempoolaccept";
        let hex: Vec<String> = txs.iter().map(encode::serialize_hex).collect();
        let v: Value = self.call(CALL, &[json!(hex)]).map_err(call_err(CALL))?;
        let rows = v
            .as_array()
            .ok_or_else(|| unexpected(CALL, "not an array"))?;
        rows.iter()
            .map(|r| {
                let txid = r["txid"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| unexpected(CALL, "no txid"))?;
                Ok(MempoolAcceptance {
                    txid,
                    allowed: r["allowed"].as_bool().unwrap_or(false),
                    reject_reason: r["reject-reason"].as_str().map(str::to_owned),
                    vsize: r["vsize"].as_u64(),
                })
            })
            .collect()
    }
}
