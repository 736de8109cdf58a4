//! Opening checks: keys and expiry at open, the funding transaction at fund time.

use bitcoin::{absolute, Amount, OutPoint, PublicKey, Script, Transaction};
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::wire::OpenResponse;

use super::{ChannelError, ChannelPolicy, ChannelScript};

/// What the gateway knows about the funding, from its chain and store, at fund time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FundingCheck<'a> {
    /// The funding transaction the client sent (or the chain returned).
    pub tx: &'a Transaction,
    /// Index of the channel output.
    pub vout: u32,
    /// Confirmations of `tx` (0 while in the mempool).
    pub confirmations: u32,
    /// Whether the store already has a channel on this outpoint.
    pub outpoint_in_use: bool,
    /// Current chain tip.
    pub tip: absolute::Height,
}

/// A funding output that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedFunding {
    /// The channel's outpoint.
    pub outpoint: OutPoint,
    /// The channel's capacity.
    pub capacity: Amount,
    /// True when accepted under the zero-conf cap rather than by confirmations.
    pub zero_conf: bool,
}

/// Checks at open, before the gateway hands out a key: the client key, its change
/// script and the expiry window.
pub fn check_open(
    client: &PublicKey,
    expiry: absolute::Height,
    change_script: &Script,
    tip: absolute::Height,
    policy: &ChannelPolicy,
) -> Result<(), ChannelError> {
    // Uncompressed keys are non-standard in segwit scripts: the close would not relay.
    if !client.compressed {
        return Err(ChannelError::InvalidPubkey);
    }
    let standard = change_script.is_p2wpkh()
        || change_script.is_p2wsh()
        || change_script.is_p2tr()
        || change_script.is_p2pkh()
        || change_script.is_p2sh();
    if !standard {
        return Err(ChannelError::ChangeScriptNonstandard(
            change_script.to_owned(),
        ));
    }
    check_expiry(expiry, tip, policy)
}

/// Expiry must lie in `[tip + min_expiry_blocks, tip + max_expiry_blocks]`.
pub(crate) fn check_expiry(
    expiry: absolute::Height,
    tip: absolute::Height,
    policy: &ChannelPolicy,
) -> Result<(), ChannelError> {
    if expiry <= tip {
        return Err(ChannelError::ExpiryInPast { expiry, tip });
    }
    let window = BlockCount::between(tip, expiry);
    let limits = &policy.limits;
    if window < limits.min_expiry_blocks {
        return Err(ChannelError::ExpiryTooClose {
            expiry,
            tip,
            min_blocks: limits.min_expiry_blocks,
        });
    }
    if window > limits.max_expiry_blocks {
        return Err(ChannelError::ExpiryTooFar {
            expiry,
            tip,
            max_blocks: limits.max_expiry_blocks,
        });
    }
    Ok(())
}

/// Every funding check of docs/design.md section 4, in order: the output exists, its script is
/// P2WSH of the script rebuilt from (gateway key, client key, expiry), its value is in
/// range, the outpoint is new, every input is segwit, the expiry is still in the
/// window, and the funding is confirmed or under the zero-conf cap.
pub fn verify_funding(
    script: &ChannelScript,
    check: FundingCheck<'_>,
    policy: &ChannelPolicy,
) -> Result<VerifiedFunding, ChannelError> {
    let output = check
        .tx
        .output
        .get(check.vout as usize)
        .ok_or(ChannelError::FundingOutputMissing { vout: check.vout })?;
    let expected = script.script_pubkey();
    if output.script_pubkey != expected {
        return Err(ChannelError::FundingScriptMismatch {
            expected,
            found: output.script_pubkey.clone(),
        });
    }
    let value = output.value;
    let limits = &policy.limits;
    if value < limits.min_capacity || value > limits.max_capacity {
        return Err(ChannelError::CapacityOutOfRange {
            value,
            min: limits.min_capacity,
            max: limits.max_capacity,
        });
    }
    let outpoint = OutPoint {
        txid: check.tx.compute_txid(),
        vout: check.vout,
    };
    if check.outpoint_in_use {
        return Err(ChannelError::DuplicateOutpoint(outpoint));
    }
    // A legacy input's scriptSig can be changed by anyone (e.g. flipping S), which
    // changes the txid and orphans every update signed over the old outpoint. An
    // input is segwit when it carries a witness (a witness on a legacy output is
    // invalid) and its scriptSig is empty, or one push of a witness program (P2SH-
    // wrapped segwit, which BIP141 pins to exactly that push).
    for (i, input) in check.tx.input.iter().enumerate() {
        let wrapped_ok =
            input.script_sig.is_empty() || is_push_of_witness_program(&input.script_sig);
        if input.witness.is_empty() || !wrapped_ok {
            return Err(ChannelError::FundingInputNotSegwit { input: i });
        }
    }
    // Re-checked here (not only at open): the client may fund long after opening.
    check_expiry(script.expiry, check.tip, policy)?;
    let confirmed = check.confirmations >= limits.confirmations_required;
    if !confirmed && value > limits.zero_conf_cap {
        return Err(ChannelError::FundingUnconfirmed {
            confirmations: check.confirmations,
            required: limits.confirmations_required,
            value,
            cap: limits.zero_conf_cap,
        });
    }
    Ok(VerifiedFunding {
        outpoint,
        capacity: value,
        zero_conf: !confirmed,
    })
}

/// Client side, before funding: rebuild the script from the gateway's key and the
/// client's own key and expiry, and check that the offer's witness script, funding
/// script, address and channel id all match it. Returns the script to fund.
pub fn check_offer(
    offer: &OpenResponse,
    client: &PublicKey,
    expiry: absolute::Height,
    network: bitcoin::Network,
) -> Result<ChannelScript, ChannelError> {
    let mismatch = |what| Err(ChannelError::OfferMismatch { what });
    if !offer.gateway_pubkey.compressed {
        return mismatch("gateway key is uncompressed");
    }
    if offer.client_pubkey != *client {
        return mismatch("client key");
    }
    if offer.expiry != expiry {
        return mismatch("expiry");
    }
    let script = ChannelScript {
        gateway: offer.gateway_pubkey,
        client: *client,
        expiry,
    };
    if offer.witness_script != script.witness_script() {
        return mismatch("witness script");
    }
    if offer.funding_script_pubkey != script.script_pubkey() {
        return mismatch("funding script");
    }
    if !offer.funding_address.is_valid_for_network(network)
        || offer
            .funding_address
            .clone()
            .assume_checked()
            .script_pubkey()
            != script.script_pubkey()
    {
        return mismatch("funding address");
    }
    if offer.channel_id != script.channel_id() {
        return mismatch("channel id");
    }
    Ok(script)
}

fn is_push_of_witness_program(script_sig: &Script) -> bool {
    let mut ins = script_sig.instructions();
    match (ins.next(), ins.next()) {
        (Some(Ok(bitcoin::script::Instruction::PushBytes(p))), None) => {
            Script::from_bytes(p.as_bytes()).is_witness_program()
        }
        _ => false,
    }
}
