//! Settlement batches that are checked before they are recorded.
//!
//! One channel must never hold back the others: a funding output that is gone, a
//! close that Bitcoin Core's script interpreter or mempool refuses, or a batch too
//! heavy to relay would otherwise be recorded, broadcast, rejected and rebuilt the
//! same way forever. So a set of due channels becomes batches like this:
//! 1. every funding output is looked up (`gettxout` with the mempool on Core, the
//!    outspend status on Esplora); channels whose output is gone are set aside;
//! 2. confirmed and unconfirmed fundings are never mixed (a double-spent
//!    unconfirmed funding evicts its whole batch with it);
//! 3. each batch is built, kept under [`MAX_BATCH_WEIGHT`], run through Core's
//!    script interpreter (libbitcoinconsensus) and, where the backend is Core,
//!    `testmempoolaccept`; a batch that fails is halved until the failing channels
//!    stand alone, and those are left out.

use bitcoin::FeeRate;
use tracing::warn;

use super::exposure::is_unconfirmed;
use super::{Gateway, GatewayError};
use bitmesh_channel::chain::ChainError;
use bitmesh_channel::{verify_with_core, CloseTx};
use crate::store::ChannelRecord;

/// Heaviest settlement transaction built, in weight units: a quarter of the 400,000
/// WU standardness limit, about 190 channels with change.
pub(super) const MAX_BATCH_WEIGHT: u64 = 100_000;

/// Due channels sorted into verified batches and the channels left out.
#[derive(Default)]
pub(super) struct BatchPlan {
    /// Batches that passed every check, ready to record and broadcast.
    pub batches: Vec<(CloseTx, Vec<ChannelRecord>)>,
    /// Channels whose funding output no longer exists (double-spent or dropped).
    pub funding_gone: Vec<ChannelRecord>,
    /// Channels whose close fails on its own, with the reason.
    pub failed: Vec<(ChannelRecord, String)>,
}

impl Gateway {
    /// Sort `due` into verified batches at `rate` (falling back to `floor` for a
    /// batch whose payout would be dust at `rate`).
    pub(super) async fn plan_batches(&self, due: Vec<ChannelRecord>, rate: FeeRate, floor: FeeRate) -> Result<BatchPlan, GatewayError> {
        let mut plan = BatchPlan::default();
        let mut live = Vec::with_capacity(due.len());
        for rec in due {
            let Some(f) = rec.funding else {
                plan.failed.push((rec, "no funding recorded".into()));
                continue;
            };
            let outpoint = f.outpoint;
            if self.chain_call(move |c| c.unspent_output(&outpoint)).await?.is_none() {
                plan.funding_gone.push(rec);
            } else {
                live.push(rec);
            }
        }
        let (tip, required) = (self.tip(), self.policy().limits.confirmations_required);
        let (unconfirmed, confirmed): (Vec<_>, Vec<_>) = live.into_iter().partition(|r| is_unconfirmed(r, tip, required));
        let mut stack: Vec<Vec<ChannelRecord>> = [confirmed, unconfirmed].into_iter().filter(|g| !g.is_empty()).collect();
        while let Some(mut group) = stack.pop() {
            let built = match self.build_batch(&group, rate) {
                Err(_) if rate > floor => self.build_batch(&group, floor),
                other => other,
            };
            let reason = match built {
                Ok(close) if close.tx.weight().to_wu() > MAX_BATCH_WEIGHT && group.len() > 1 => "too heavy".to_string(),
                Ok(close) => match self.check_batch(&close).await? {
                    None => {
                        plan.batches.push((close, group));
                        continue;
                    }
                    Some(reason) => reason,
                },
                Err(e) => e.to_string(),
            };
            if group.len() > 1 {
                let right = group.split_off(group.len() / 2);
                stack.push(right);
                stack.push(group);
            } else if let Some(rec) = group.pop() {
                warn!(channel = %rec.id, %reason, "this channel's close fails verification: left out of the batch");
                plan.failed.push((rec, reason));
            }
        }
        Ok(plan)
    }

    /// Why Core would refuse `close` (`None`: it would accept it). Chain errors other
    /// than "unsupported" propagate: nothing is recorded while the node is unreachable.
    pub(super) async fn check_batch(&self, close: &CloseTx) -> Result<Option<String>, GatewayError> {
        if let Err(e) = verify_with_core(close) {
            return Ok(Some(e.to_string()));
        }
        let tx = close.tx.clone();
        match self.chain_call(move |c| c.test_mempool_accept(&[tx])).await {
            Ok(rows) => Ok(match rows.first() {
                Some(r) if r.allowed => None,
                Some(r) => Some(format!("testmempoolaccept: {}", r.reject_reason.as_deref().unwrap_or("rejected"))),
                None => Some("testmempoolaccept returned no verdict".into()),
            }),
            // Esplora has no dry run: the script check above is all it gets.
            Err(GatewayError::Chain(ChainError::Unsupported { .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
