//! `bitmesh refund`: take the channel's money back through the expiry branch when
//! the gateway never closed it.
//!
//! The refund's nLockTime is the expiry, so it is valid in block `expiry + 1` and
//! Bitcoin Core takes it into its mempool once the tip is at `expiry`. Before that
//! the agent says at which height it becomes possible. The refund is broadcast
//! through a chain backend (`--bitcoind-url` or `--esplora-url`): the gateway's API
//! relays only funding transactions, and a gateway that did not close is the one
//! party not to depend on here.

use bitcoin::{absolute, FeeRate, Transaction, Txid};

use super::state::{SavedChannel, Phase};
use bitmesh_channel::chain::{Chain, ChainError};
use bitmesh_channel::{build_refund, ChannelError};

/// What `refund` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    /// The channel was never funded: nothing to take back.
    NotFunded,
    /// Too early; the refund can be broadcast once the tip reaches `broadcast_from`
    /// (it confirms from block `broadcast_from + 1`).
    TooEarly {
        /// Current tip.
        tip: absolute::Height,
        /// The tip height from which the broadcast is accepted (= expiry).
        broadcast_from: absolute::Height,
    },
    /// The funding output is already spent: the gateway closed (or the refund went
    /// out before).
    AlreadySpent,
    /// Broadcast.
    Broadcast(Txid),
}

/// Why the refund failed.
#[derive(Debug, thiserror::Error)]
pub enum RefundError {
    /// Chain backend failure.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Re-signing failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
}

/// The decision, pure: given the tip and whether the funding output is still
/// unspent, either an outcome without broadcasting, or `None`: broadcast now.
pub fn plan(record: &SavedChannel, tip: absolute::Height, funding_unspent: bool) -> Option<RefundOutcome> {
    if record.funding.is_none() {
        return Some(RefundOutcome::NotFunded);
    }
    if !funding_unspent {
        return Some(RefundOutcome::AlreadySpent);
    }
    if tip < record.expiry {
        return Some(RefundOutcome::TooEarly { tip, broadcast_from: record.expiry });
    }
    None
}

/// The refund transaction: the pre-signed one, or re-signed at `fee_rate`.
pub fn refund_tx(record: &SavedChannel, fee_rate: Option<FeeRate>) -> Result<Option<Transaction>, RefundError> {
    let Some(channel) = record.channel() else { return Ok(None) };
    match (fee_rate, &record.refund_tx) {
        (None, Some(tx)) => Ok(Some(tx.clone())),
        (rate, _) => {
            let rate = rate.unwrap_or(FeeRate::from_sat_per_vb_u32(2));
            Ok(Some(build_refund(&channel, &record.client_secret, &record.refund_script, rate)?))
        }
    }
}

/// Check the chain and broadcast the refund if it is time. On success the record's
/// phase becomes [`Phase::Refunded`] (the caller saves it).
pub fn refund(
    record: &mut SavedChannel,
    chain: &dyn Chain,
    fee_rate: Option<FeeRate>,
) -> Result<RefundOutcome, RefundError> {
    let Some(funding) = record.funding.clone() else { return Ok(RefundOutcome::NotFunded) };
    let tip = chain.tip_height()?;
    let mut unspent = chain.unspent_output(&funding.outpoint)?.is_some();
    if !unspent && chain.transaction(&funding.outpoint.txid)?.is_none() {
        // The funding itself is unknown (dropped from a mempool): relay it again so
        // the money is not stuck in limbo, then refund later.
        chain.broadcast(&funding.tx)?;
        unspent = true;
    }
    if let Some(outcome) = plan(record, tip, unspent) {
        return Ok(outcome);
    }
    let Some(tx) = refund_tx(record, fee_rate)? else { return Ok(RefundOutcome::NotFunded) };
    let txid = chain.broadcast(&tx)?;
    record.phase = Phase::Refunded;
    Ok(RefundOutcome::Broadcast(txid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::record;
    use crate::state::FundingRecord;
    use bitcoin::{Amount, OutPoint};

    fn h(n: u32) -> absolute::Height {
        absolute::Height::from_consensus(n).unwrap()
    }

    fn funded() -> SavedChannel {
        let mut r = record();
        let tx = Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: vec![],
            output: vec![bitcoin::TxOut { value: Amount::from_sat(20_000), script_pubkey: r.script().script_pubkey() }],
        };
        r.funding = Some(FundingRecord { outpoint: OutPoint { txid: tx.compute_txid(), vout: 0 }, capacity: Amount::from_sat(20_000), tx });
        r
    }

    type Row = (&'static str, SavedChannel, u32, bool, fn(&Option<RefundOutcome>) -> bool);

    #[test]
    fn refund_plan_table() {
        let expiry = funded().expiry.to_consensus_u32();
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("unfunded channel has nothing to refund", record(), expiry + 10, true, |o| *o == Some(RefundOutcome::NotFunded)),
            ("before expiry says from which height", funded(), expiry - 5, true, |o| matches!(o, Some(RefundOutcome::TooEarly { broadcast_from, .. }) if broadcast_from.to_consensus_u32() == 600)),
            ("at expiry the refund goes out", funded(), expiry, true, |o| o.is_none()),
            ("a closed channel is not refunded", funded(), expiry + 10, false, |o| *o == Some(RefundOutcome::AlreadySpent)),
        ];
        for (name, r, tip, unspent, ok) in rows {
            let got = plan(&r, h(tip), unspent);
            assert!(ok(&got), "{name}: {got:?}");
        }
    }

    #[test]
    fn refund_is_locked_to_the_expiry_and_pays_the_refund_script() {
        let r = funded();
        let tx = refund_tx(&r, None).unwrap().unwrap();
        assert_eq!(tx.lock_time, absolute::LockTime::Blocks(r.expiry));
        assert_eq!(tx.output[0].script_pubkey, r.refund_script);
        assert_eq!(tx.input[0].previous_output, r.funding.unwrap().outpoint);
    }
}
