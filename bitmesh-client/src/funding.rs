//! Funding the channel: from keys and UTXOs the user gives (`--fund-from FILE`),
//! or by a BIP21 URI (and QR code) for any wallet. Building and signing is pure.
//!
//! The `--fund-from` file (JSON):
//!
//! ```json
//! {
//!   "keys": ["cVt4o7BGAig1UXywgGSmARhxMdzP5qvQsxKkSsc1XEkw3tDTQFpy"],
//!   "utxos": [
//!     { "outpoint": "<txid>:<vout>", "amount_sat": 5000000000,
//!       "script_pubkey": "0014<20-byte key hash>" }
//!   ],
//!   "change_address": "bcrt1q..."
//! }
//! ```
//!
//! Only P2WPKH UTXOs are spent (the gateway refuses non-segwit funding inputs, whose
//! txid could be malleated). `change_address` is optional; by default the change
//! goes back to the P2WPKH address of the first key.

use std::path::Path;

use bitcoin::address::NetworkUnchecked;
use bitcoin::secp256k1::Message;
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::{
    absolute, ecdsa, transaction, Address, Amount, CompressedPublicKey, FeeRate, Network, OutPoint,
    PrivateKey, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Witness,
};
use serde::Deserialize;

/// One spendable output from the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Utxo {
    /// The output.
    pub outpoint: OutPoint,
    /// Its value.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "amount_sat")]
    pub amount: Amount,
    /// Its script (must be P2WPKH of one of the keys).
    pub script_pubkey: ScriptBuf,
}

/// The `--fund-from` file.
#[derive(Debug, Clone, Deserialize)]
pub struct FundingSource {
    /// WIF private keys.
    pub keys: Vec<String>,
    /// Outputs they can spend.
    pub utxos: Vec<Utxo>,
    /// Where the funding change goes.
    #[serde(default)]
    pub change_address: Option<Address<NetworkUnchecked>>,
}

/// Why funding could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FundingError {
    /// The file could not be read.
    #[error("cannot read --fund-from file {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// A key is not WIF or is on another network.
    #[error("key #{index} in the funding file is not a WIF key for {network}: {message}")]
    BadKey {
        /// Position in `keys`.
        index: usize,
        /// Expected network.
        network: Network,
        /// Why.
        message: String,
    },
    /// A UTXO no key can spend, or not P2WPKH.
    #[error("utxo {0} is not P2WPKH of any key in the file: list only P2WPKH outputs of your keys")]
    Unspendable(OutPoint),
    /// The change address is for another network.
    #[error("change address is not a {0} address")]
    ChangeNetwork(Network),
    /// The file has no key (so no default change address).
    #[error("the funding file has no keys: add the WIF keys of its UTXOs")]
    NoKeys,
    /// Not enough money.
    #[error("the UTXOs hold {available}, the channel needs {needed} including the fee: add UTXOs or lower --capacity")]
    Insufficient {
        /// Sum of UTXOs.
        available: Amount,
        /// Capacity + fee.
        needed: Amount,
    },
    /// Sighash failure (a bug).
    #[error("internal error signing the funding: {0}")]
    Sign(String),
}

/// A signed funding transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltFunding {
    /// The transaction.
    pub tx: Transaction,
    /// Index of the channel output.
    pub vout: u32,
    /// Its fee.
    pub fee: Amount,
}

impl FundingSource {
    /// Read a funding file.
    pub fn read(path: &Path) -> Result<FundingSource, FundingError> {
        let read = |message: String| FundingError::Read { path: path.display().to_string(), message };
        let bytes = std::fs::read(path).map_err(|e| read(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| read(e.to_string()))
    }

    fn keys(&self, network: Network) -> Result<Vec<(PrivateKey, CompressedPublicKey)>, FundingError> {
        let secp = bitmesh_channel::secp();
        self.keys
            .iter()
            .enumerate()
            .map(|(index, wif)| {
                let bad = |message: String| FundingError::BadKey { index, network, message };
                let key = PrivateKey::from_wif(wif.trim()).map_err(|e| bad(e.to_string()))?;
                if bitcoin::NetworkKind::from(network) != key.network {
                    return Err(bad("the key is for another network".into()));
                }
                let public = CompressedPublicKey::from_private_key(secp, &key).map_err(|e| bad(e.to_string()))?;
                Ok((key, public))
            })
            .collect()
    }

    /// The script the funding change (and, by default, the channel's change and
    /// refund) goes to.
    pub fn change_script(&self, network: Network) -> Result<ScriptBuf, FundingError> {
        if let Some(a) = &self.change_address {
            return a
                .clone()
                .require_network(network)
                .map(|a| a.script_pubkey())
                .map_err(|_| FundingError::ChangeNetwork(network));
        }
        let (_, public) = self.keys(network)?.into_iter().next().ok_or(FundingError::NoKeys)?;
        Ok(ScriptBuf::new_p2wpkh(&public.wpubkey_hash()))
    }

    /// Build and sign a transaction paying `capacity` to `channel_script` (output 0),
    /// change (if not dust) to [`Self::change_script`] (output 1), at `fee_rate`.
    /// Spends the largest UTXOs first.
    pub fn build(
        &self,
        network: Network,
        channel_script: &ScriptBuf,
        capacity: Amount,
        fee_rate: FeeRate,
    ) -> Result<BuiltFunding, FundingError> {
        let keys = self.keys(network)?;
        let change_script = self.change_script(network)?;
        let mut utxos: Vec<(&Utxo, usize)> = Vec::new();
        for u in &self.utxos {
            let key = keys
                .iter()
                .position(|(_, p)| u.script_pubkey == ScriptBuf::new_p2wpkh(&p.wpubkey_hash()))
                .ok_or(FundingError::Unspendable(u.outpoint))?;
            utxos.push((u, key));
        }
        utxos.sort_by_key(|u| std::cmp::Reverse(u.0.amount));

        let mut tx = Transaction {
            version: transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: vec![],
            output: vec![
                TxOut { value: capacity, script_pubkey: channel_script.clone() },
                TxOut { value: Amount::ZERO, script_pubkey: change_script.clone() },
            ],
        };
        let mut chosen = Vec::new();
        let mut available = Amount::ZERO;
        let mut fee;
        loop {
            fee = fee_with_witnesses(&tx, fee_rate);
            if available >= capacity + fee {
                break;
            }
            let Some((u, key)) = utxos.get(chosen.len()).copied() else {
                let all: Amount = self.utxos.iter().map(|u| u.amount).sum();
                return Err(FundingError::Insufficient { available: all, needed: capacity + fee });
            };
            tx.input.push(TxIn {
                previous_output: u.outpoint,
                script_sig: ScriptBuf::new(),
                sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                witness: Witness::new(),
            });
            available += u.amount;
            chosen.push((u, key));
        }
        let change = available - capacity - fee;
        if change < change_script.minimal_non_dust() {
            // Dust change goes to the fee instead.
            tx.output.truncate(1);
            fee = available - capacity;
        } else {
            tx.output[1].value = change;
        }

        let secp = bitmesh_channel::secp();
        let mut witnesses = Vec::with_capacity(chosen.len());
        {
            let mut cache = SighashCache::new(&tx);
            for (i, (u, key)) in chosen.iter().enumerate() {
                let (private, public) = &keys[*key];
                let hash = cache
                    .p2wpkh_signature_hash(i, &u.script_pubkey, u.amount, EcdsaSighashType::All)
                    .map_err(|e| FundingError::Sign(e.to_string()))?;
                let sig = secp.sign_ecdsa_low_r(&Message::from(hash), &private.inner);
                let sig = ecdsa::Signature { signature: sig, sighash_type: EcdsaSighashType::All };
                witnesses.push(Witness::p2wpkh(&sig, &public.0));
            }
        }
        for (input, w) in tx.input.iter_mut().zip(witnesses) {
            input.witness = w;
        }
        Ok(BuiltFunding { tx, vout: 0, fee })
    }
}

/// Fee of `tx` once every input carries a P2WPKH witness (72-byte signature + 33-byte key).
fn fee_with_witnesses(tx: &Transaction, fee_rate: FeeRate) -> Amount {
    let mut sized = tx.clone();
    for input in &mut sized.input {
        let mut w = Witness::new();
        w.push([0u8; 72]);
        w.push([0u8; 33]);
        input.witness = w;
    }
    bitmesh_channel::fee_for_weight(fee_rate, sized.weight())
}

/// The BIP21 URI paying `amount` to `address`.
pub fn bip21_uri(address: &Address, amount: Amount) -> String {
    format!("bitcoin:{address}?amount={}&label=BitMesh%20channel", amount.to_btc())
}

/// `text` as a QR code of Unicode half blocks (two rows per line), for a terminal.
pub fn qr_text(text: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(code.render::<Dense1x2>().dark_color(Dense1x2::Light).light_color(Dense1x2::Dark).quiet_zone(true).build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::secp256k1::SecretKey;
    use bitcoin::Txid;
    use std::str::FromStr;

    fn source(amounts: &[u64]) -> (FundingSource, ScriptBuf) {
        let key = PrivateKey::new(SecretKey::from_slice(&[3; 32]).unwrap(), Network::Regtest);
        let public = CompressedPublicKey::from_private_key(bitmesh_channel::secp(), &key).unwrap();
        let spk = ScriptBuf::new_p2wpkh(&public.wpubkey_hash());
        let utxos = amounts
            .iter()
            .enumerate()
            .map(|(i, &a)| Utxo {
                outpoint: OutPoint { txid: Txid::from_str(&format!("{:064x}", i + 1)).unwrap(), vout: 0 },
                amount: Amount::from_sat(a),
                script_pubkey: spk.clone(),
            })
            .collect();
        (FundingSource { keys: vec![key.to_wif()], utxos, change_address: None }, spk)
    }

    fn channel_spk() -> ScriptBuf {
        ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_str(&"11".repeat(32)).unwrap())
    }

    #[test]
    fn funding_pays_the_channel_and_returns_change_to_the_first_key() {
        let (src, spk) = source(&[30_000, 100_000]);
        let rate = FeeRate::from_sat_per_vb_u32(2);
        let f = src.build(Network::Regtest, &channel_spk(), Amount::from_sat(50_000), rate).unwrap();
        assert_eq!(f.tx.input.len(), 1, "the largest UTXO alone is enough");
        assert_eq!(f.tx.output[0].value, Amount::from_sat(50_000));
        assert_eq!(f.tx.output[1].script_pubkey, spk);
        assert_eq!(f.tx.output[1].value, Amount::from_sat(100_000) - Amount::from_sat(50_000) - f.fee);
        assert!(f.tx.input.iter().all(|i| !i.witness.is_empty()), "every input is segwit");
        // Fee at least the rate over the signed size.
        assert!(f.fee >= bitmesh_channel::fee_for_weight(rate, f.tx.weight()));
    }

    #[test]
    fn funding_combines_utxos_when_one_is_not_enough() {
        let (src, _) = source(&[30_000, 40_000]);
        let f = src.build(Network::Regtest, &channel_spk(), Amount::from_sat(60_000), FeeRate::from_sat_per_vb_u32(1)).unwrap();
        assert_eq!(f.tx.input.len(), 2);
    }

    #[test]
    fn funding_refuses_what_it_cannot_pay_or_sign() {
        let (src, _) = source(&[10_000]);
        let r = src.build(Network::Regtest, &channel_spk(), Amount::from_sat(10_000), FeeRate::from_sat_per_vb_u32(1));
        assert!(matches!(r, Err(FundingError::Insufficient { .. })), "{r:?}");
        let mut foreign = source(&[100_000]).0;
        foreign.utxos[0].script_pubkey = channel_spk();
        let r = foreign.build(Network::Regtest, &channel_spk(), Amount::from_sat(10_000), FeeRate::from_sat_per_vb_u32(1));
        assert!(matches!(r, Err(FundingError::Unspendable(_))), "{r:?}");
        let r = src.build(Network::Bitcoin, &channel_spk(), Amount::from_sat(1_000), FeeRate::from_sat_per_vb_u32(1));
        assert!(matches!(r, Err(FundingError::BadKey { .. })), "{r:?}");
    }

    #[test]
    fn bip21_uri_and_qr_code_carry_address_and_amount() {
        let addr = Address::p2wsh(&ScriptBuf::new(), Network::Regtest);
        let uri = bip21_uri(&addr, Amount::from_sat(150_000));
        assert_eq!(uri, format!("bitcoin:{addr}?amount=0.0015&label=BitMesh%20channel"));
        let qr = qr_text(&uri).unwrap();
        assert!(qr.lines().count() > 10);
    }
}
