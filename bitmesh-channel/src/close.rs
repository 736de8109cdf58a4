//! Close transactions (gateway, one channel or a batch) and the client's refund.

use std::collections::HashSet;

use bitcoin::blockdata::opcodes::all::{
    OP_CHECKSIG, OP_CHECKSIGVERIFY, OP_CLTV, OP_DROP, OP_ELSE, OP_ENDIF, OP_IF,
};
use bitcoin::script::Builder;
use bitcoin::secp256k1::{Message, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::{absolute, ecdsa, Amount, FeeRate, Script, ScriptBuf, Transaction};
use bitcoin::{TxIn, TxOut, Witness};

use super::verified::VerifiedUpdate;
use super::{
    fee_for_weight, secp, Channel, ChannelError, CHANNEL_INPUT_SEQUENCE, CLOSE_LOCK_TIME,
    TX_VERSION,
};

/// Size reserved for the gateway's signature while sizing the fee: low-R grinding
/// keeps DER at most 70 bytes, plus the sighash byte.
const GATEWAY_SIG_RESERVE: usize = 72;
/// Size reserved for a client signature not yet known (DER max 72 + sighash byte).
const CLIENT_SIG_RESERVE: usize = 73;

/// One channel to settle in a close transaction.
#[derive(Debug, Clone, Copy)]
pub struct CloseInput<'a> {
    /// The channel.
    pub channel: &'a Channel,
    /// The gateway's key for it.
    pub gateway_key: &'a SecretKey,
    /// The latest verified update.
    pub update: &'a VerifiedUpdate,
}

/// A signed close transaction and what it pays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseTx {
    /// The transaction, fully signed, ready to broadcast.
    pub tx: Transaction,
    /// Its fee.
    pub fee: Amount,
    /// The gateway's payout (sum of totals - fee).
    pub gateway_amount: Amount,
    /// The funding outputs it spends, in input order (for verification).
    pub prevouts: Vec<TxOut>,
}

/// Build and sign the close of one or more channels, fee paid from the gateway's share.
///
/// Layout: inputs of channels with client change come first, each paired with its
/// change output at the same index (SIGHASH_SINGLE pairs input i with output i);
/// then the gateway's payout output; then inputs of fully-paid channels (signed
/// NONE|ANYONECANPAY, no output). Every input has nSequence 0xfffffffd, so the
/// transaction signals replaceability: to bump the fee, call again with a higher
/// `fee_rate` and broadcast the result.
pub fn build_close(
    inputs: &[CloseInput<'_>],
    gateway_payout: &Script,
    fee_rate: FeeRate,
) -> Result<CloseTx, ChannelError> {
    if inputs.is_empty() {
        return Err(ChannelError::EmptyBatch);
    }
    let mut seen = HashSet::new();
    for i in inputs {
        if !seen.insert(i.channel.funding_outpoint) {
            return Err(ChannelError::DuplicateOutpoint(i.channel.funding_outpoint));
        }
    }
    let mut ordered: Vec<&CloseInput<'_>> = inputs
        .iter()
        .filter(|i| i.update.client_change > Amount::ZERO)
        .collect();
    ordered.extend(
        inputs
            .iter()
            .filter(|i| i.update.client_change == Amount::ZERO),
    );

    let mut output: Vec<TxOut> = ordered
        .iter()
        .filter(|i| i.update.client_change > Amount::ZERO)
        .map(|i| TxOut {
            value: i.update.client_change,
            script_pubkey: i.channel.client_change_script.clone(),
        })
        .collect();
    let gateway_index = output.len();
    output.push(TxOut {
        value: Amount::ZERO,
        script_pubkey: gateway_payout.to_owned(),
    });

    let input = ordered
        .iter()
        .map(|i| TxIn {
            previous_output: i.channel.funding_outpoint,
            script_sig: ScriptBuf::new(),
            sequence: CHANNEL_INPUT_SEQUENCE,
            witness: close_witness(
                &i.update.signature.to_vec(),
                &[0u8; GATEWAY_SIG_RESERVE],
                &i.channel.script.witness_script(),
            ),
        })
        .collect();
    let mut tx = Transaction {
        version: TX_VERSION,
        lock_time: CLOSE_LOCK_TIME,
        input,
        output,
    };

    let fee = fee_for_weight(fee_rate, tx.weight());
    let total: Amount = ordered.iter().map(|i| i.update.total_paid).sum();
    let dust = gateway_payout.minimal_non_dust();
    let gateway_amount = total
        .checked_sub(fee)
        .filter(|a| *a >= dust)
        .ok_or(ChannelError::GatewayOutputBelowDust { total, fee, dust })?;
    tx.output[gateway_index].value = gateway_amount;

    let prevouts: Vec<TxOut> = ordered
        .iter()
        .map(|i| TxOut {
            value: i.channel.capacity,
            script_pubkey: i.channel.script.script_pubkey(),
        })
        .collect();
    let mut witnesses = Vec::with_capacity(ordered.len());
    {
        let mut cache = SighashCache::new(&tx);
        for (index, i) in ordered.iter().enumerate() {
            let ws = i.channel.script.witness_script();
            let hash = cache
                .p2wsh_signature_hash(index, &ws, i.channel.capacity, EcdsaSighashType::All)
                .map_err(|e| ChannelError::Sighash(e.to_string()))?;
            let sig = secp().sign_ecdsa_low_r(&Message::from(hash), i.gateway_key);
            let gw = ecdsa::Signature {
                signature: sig,
                sighash_type: EcdsaSighashType::All,
            };
            witnesses.push(close_witness(
                &i.update.signature.to_vec(),
                &gw.to_vec(),
                &ws,
            ));
        }
    }
    for (txin, w) in tx.input.iter_mut().zip(witnesses) {
        txin.witness = w;
    }
    Ok(CloseTx {
        tx,
        fee,
        gateway_amount,
        prevouts,
    })
}

/// Witness of the cooperative branch, bottom to top: client signature, gateway
/// signature, 0x01 (selects OP_IF; exactly 0x01 for MINIMALIF standardness), script.
fn close_witness(client_sig: &[u8], gateway_sig: &[u8], witness_script: &Script) -> Witness {
    let mut w = Witness::new();
    w.push(client_sig);
    w.push(gateway_sig);
    w.push([1u8]);
    w.push(witness_script.as_bytes());
    w
}

/// Run a close through Bitcoin Core's script interpreter (libbitcoinconsensus, all
/// consensus flags including segwit and CHECKLOCKTIMEVERIFY).
pub fn verify_with_core(close: &CloseTx) -> Result<(), ChannelError> {
    let prevouts: std::collections::HashMap<_, _> = close
        .tx
        .input
        .iter()
        .map(|i| i.previous_output)
        .zip(close.prevouts.iter().cloned())
        .collect();
    close
        .tx
        .verify(|op| prevouts.get(op).cloned())
        .map_err(|e| ChannelError::CloseScriptInvalid(e.to_string()))
}

/// Fee of a one-channel close at `fee_rate`, sized for the worst standard change
/// script and a maximum-size client signature; used to set the first-payment minimum.
pub(crate) fn single_close_fee(
    with_change: bool,
    gateway_payout: &Script,
    fee_rate: FeeRate,
) -> Amount {
    let script = planning_witness_script();
    let mut output = Vec::new();
    if with_change {
        // 34-byte scripts (P2WSH, P2TR) are the largest standard change outputs.
        output.push(TxOut {
            value: Amount::ZERO,
            script_pubkey: ScriptBuf::from_bytes(vec![0; 34]),
        });
    }
    output.push(TxOut {
        value: Amount::ZERO,
        script_pubkey: gateway_payout.to_owned(),
    });
    let tx = Transaction {
        version: TX_VERSION,
        lock_time: CLOSE_LOCK_TIME,
        input: vec![TxIn {
            previous_output: bitcoin::OutPoint::null(),
            script_sig: ScriptBuf::new(),
            sequence: CHANNEL_INPUT_SEQUENCE,
            witness: close_witness(&[0; CLIENT_SIG_RESERVE], &[0; GATEWAY_SIG_RESERVE], &script),
        }],
        output,
    };
    fee_for_weight(fee_rate, tx.weight())
}

/// A script of the same shape and size as every channel script (two 33-byte keys,
/// the largest 4-byte height), for sizing a close before the keys are known.
fn planning_witness_script() -> ScriptBuf {
    Builder::new()
        .push_opcode(OP_IF)
        .push_slice([2u8; 33])
        .push_opcode(OP_CHECKSIGVERIFY)
        .push_opcode(OP_ELSE)
        .push_lock_time(absolute::LockTime::Blocks(absolute::Height::MAX))
        .push_opcode(OP_CLTV)
        .push_opcode(OP_DROP)
        .push_opcode(OP_ENDIF)
        .push_slice([2u8; 33])
        .push_opcode(OP_CHECKSIG)
        .into_script()
}

/// Client side: the refund, spending the channel back to `destination` through the
/// expiry branch. nLockTime = expiry, so Bitcoin Core accepts it into a block of
/// height expiry + 1 or later (into the mempool once the tip is at expiry).
pub fn build_refund(
    channel: &Channel,
    client_secret: &SecretKey,
    destination: &Script,
    fee_rate: FeeRate,
) -> Result<Transaction, ChannelError> {
    let ws = channel.script.witness_script();
    let mut tx = Transaction {
        version: TX_VERSION,
        lock_time: absolute::LockTime::Blocks(channel.script.expiry),
        input: vec![TxIn {
            previous_output: channel.funding_outpoint,
            script_sig: ScriptBuf::new(),
            // Not final (so nLockTime and CLTV apply) and replaceable.
            sequence: CHANNEL_INPUT_SEQUENCE,
            witness: refund_witness(&[0; CLIENT_SIG_RESERVE], &ws),
        }],
        output: vec![TxOut {
            value: Amount::ZERO,
            script_pubkey: destination.to_owned(),
        }],
    };
    let fee = fee_for_weight(fee_rate, tx.weight());
    let value = channel
        .capacity
        .checked_sub(fee)
        .filter(|v| *v >= destination.minimal_non_dust())
        .ok_or(ChannelError::RefundBelowDust {
            capacity: channel.capacity,
            fee,
        })?;
    tx.output[0].value = value;
    let hash = SighashCache::new(&tx)
        .p2wsh_signature_hash(0, &ws, channel.capacity, EcdsaSighashType::All)
        .map_err(|e| ChannelError::Sighash(e.to_string()))?;
    let sig = secp().sign_ecdsa_low_r(&Message::from(hash), client_secret);
    let sig = ecdsa::Signature {
        signature: sig,
        sighash_type: EcdsaSighashType::All,
    };
    tx.input[0].witness = refund_witness(&sig.to_vec(), &ws);
    Ok(tx)
}

/// Witness of the expiry branch: client signature, empty (selects OP_ELSE), script.
fn refund_witness(client_sig: &[u8], witness_script: &Script) -> Witness {
    let mut w = Witness::new();
    w.push(client_sig);
    w.push([0u8; 0]);
    w.push(witness_script.as_bytes());
    w
}
