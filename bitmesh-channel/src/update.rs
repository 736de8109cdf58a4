//! Payment updates: the client signs its side of the close, the gateway checks it.

use bitcoin::ecdsa;
use bitcoin::secp256k1::{ecdsa::Signature, Message, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::{absolute, Amount, Transaction, TxIn, TxOut, Witness};
use bitmesh_common::wire::SignatureBytes;

use super::close::{build_close, verify_with_core, CloseInput};
use super::verified::VerifiedUpdate;
use super::{
    secp, Channel, ChannelError, ChannelKey, ChannelPolicy, CHANNEL_INPUT_SEQUENCE,
    CLOSE_LOCK_TIME, TX_VERSION,
};

/// The sighash flag the client must use: SINGLE|ANYONECANPAY commits to the client's
/// input and its change output only, leaving the gateway free to add its payout,
/// pick the fee and batch other channels; with no change there is no output to
/// commit to, so NONE|ANYONECANPAY.
pub fn required_sighash(change: Amount) -> EcdsaSighashType {
    if change == Amount::ZERO {
        EcdsaSighashType::NonePlusAnyoneCanPay
    } else {
        EcdsaSighashType::SinglePlusAnyoneCanPay
    }
}

/// The message the client signs for `total_paid`: the BIP143 sighash of the channel
/// input in a close transaction whose output at the same index is the client change.
/// With ANYONECANPAY and SINGLE/NONE the input's position does not enter the hash,
/// so the same signature is valid in a one-channel close and in any batch.
fn update_message(channel: &Channel, change: Amount) -> Result<Message, ChannelError> {
    let mut output = Vec::new();
    if change > Amount::ZERO {
        output.push(TxOut {
            value: change,
            script_pubkey: channel.client_change_script.clone(),
        });
    }
    let tx = Transaction {
        version: TX_VERSION,
        lock_time: CLOSE_LOCK_TIME,
        input: vec![TxIn {
            previous_output: channel.funding_outpoint,
            sequence: CHANNEL_INPUT_SEQUENCE,
            script_sig: bitcoin::ScriptBuf::new(),
            witness: Witness::new(),
        }],
        output,
    };
    let hash = SighashCache::new(&tx)
        .p2wsh_signature_hash(
            0,
            &channel.script.witness_script(),
            channel.capacity,
            required_sighash(change),
        )
        .map_err(|e| ChannelError::Sighash(e.to_string()))?;
    Ok(Message::from(hash))
}

fn change_for(channel: &Channel, total_paid: Amount) -> Result<Amount, ChannelError> {
    let change =
        channel
            .capacity
            .checked_sub(total_paid)
            .ok_or(ChannelError::AmountAboveCapacity {
                total: total_paid,
                capacity: channel.capacity,
            })?;
    let dust = channel.client_change_script.minimal_non_dust();
    if change > Amount::ZERO && change < dust {
        return Err(ChannelError::ClientChangeBelowDust { change, dust });
    }
    Ok(change)
}

/// Client side: sign an update paying the gateway a cumulative `total_paid`.
///
/// Refuses a total above the capacity or one leaving dust change (the gateway would
/// reject it). Whether the total is deserved (bytes received + one chunk) is the
/// client agent's rule, checked before calling this.
pub fn sign_update(
    channel: &Channel,
    total_paid: Amount,
    client_secret: &SecretKey,
) -> Result<SignatureBytes, ChannelError> {
    let change = change_for(channel, total_paid)?;
    let msg = update_message(channel, change)?;
    let signature = secp().sign_ecdsa(&msg, client_secret); // libsecp256k1 signs low-S
    let sig = ecdsa::Signature {
        signature,
        sighash_type: required_sighash(change),
    };
    Ok(SignatureBytes(sig.to_vec()))
}

/// Gateway side: every check of docs/design.md section 4 on one update, before anything is
/// credited. Pure: the caller's channel record is not touched; on `Ok` the caller
/// journals the result, then credits, then acknowledges.
///
/// Order: crediting window, strictly increasing total, capacity, first-payment
/// minimum, client change dust, sighash flag, strict DER, low S, signature against
/// the rebuilt close, gateway output after the fee at `policy.close_fee_rate`, and
/// finally the assembled, gateway-signed close through Bitcoin Core's interpreter.
#[allow(clippy::too_many_arguments)]
pub fn verify_update(
    channel: &Channel,
    gateway_key: &ChannelKey,
    policy: &ChannelPolicy,
    last_total: Amount,
    tip: absolute::Height,
    total_paid: Amount,
    signature: &SignatureBytes,
) -> Result<VerifiedUpdate, ChannelError> {
    let ends_at = channel.crediting_ends_at(policy.limits.close_margin_blocks);
    if tip >= ends_at {
        return Err(ChannelError::ChannelExpired { ends_at, tip });
    }
    if total_paid <= last_total {
        return Err(ChannelError::AmountNotIncreasing {
            total: total_paid,
            last: last_total,
        });
    }
    if last_total == Amount::ZERO && total_paid < channel.min_first_payment {
        return Err(ChannelError::FirstPaymentTooSmall {
            total: total_paid,
            min: channel.min_first_payment,
        });
    }
    let change = change_for(channel, total_paid)?;

    let bytes = signature.0.as_slice();
    let (&flag, der) = bytes.split_last().ok_or(ChannelError::SignatureNotDer)?;
    let expected = required_sighash(change);
    if flag != expected.to_u32() as u8 {
        return Err(ChannelError::WrongSighashFlag {
            found: flag,
            expected: expected.to_u32() as u8,
        });
    }
    if !is_strict_der(bytes) {
        return Err(ChannelError::SignatureNotDer);
    }
    let sig = Signature::from_der(der).map_err(|_| ChannelError::SignatureNotDer)?;
    let mut low = sig;
    low.normalize_s();
    if low != sig {
        return Err(ChannelError::SignatureHighS);
    }
    let msg = update_message(channel, change)?;
    secp()
        .verify_ecdsa(&msg, &sig, &channel.script.client.inner)
        .map_err(|_| ChannelError::SignatureInvalid)?;

    let update = VerifiedUpdate {
        total_paid,
        client_change: change,
        signature: ecdsa::Signature {
            signature: sig,
            sighash_type: expected,
        },
    };
    let close = build_close(
        &[CloseInput {
            channel,
            gateway_key: &gateway_key.secret,
            update: &update,
        }],
        &policy.gateway_payout_script,
        policy.limits.close_fee_rate,
    )?;
    verify_with_core(&close)?;
    Ok(update)
}

/// Bitcoin Core's `IsValidSignatureEncoding` (BIP66 strict DER), on the signature
/// with its trailing sighash byte.
fn is_strict_der(sig: &[u8]) -> bool {
    let n = sig.len();
    if !(9..=73).contains(&n) || sig[0] != 0x30 || sig[1] as usize != n - 3 {
        return false;
    }
    let len_r = sig[3] as usize;
    if 5 + len_r >= n {
        return false;
    }
    let len_s = sig[5 + len_r] as usize;
    if len_r + len_s + 7 != n || sig[2] != 0x02 || len_r == 0 || sig[4] & 0x80 != 0 {
        return false;
    }
    if len_r > 1 && sig[4] == 0x00 && sig[5] & 0x80 == 0 {
        return false;
    }
    if sig[len_r + 4] != 0x02 || len_s == 0 || sig[len_r + 6] & 0x80 != 0 {
        return false;
    }
    !(len_s > 1 && sig[len_r + 6] == 0x00 && sig[len_r + 7] & 0x80 == 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a failed test should panic
mod tests;
