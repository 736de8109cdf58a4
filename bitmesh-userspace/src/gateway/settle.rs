//! The settlement engine, driven by block height: close what is due (expiry minus
//! margin, idle, client request, fully paid) in batch transactions checked before
//! they are recorded (`batch.rs`), record each before broadcasting, watch it
//! confirm, bump its fee (RBF) when it does not, and split it when the node keeps
//! rejecting it.

use bitcoin::absolute::Height;
use bitcoin::{FeeRate, Txid};
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::wire::ChannelId;
use tracing::{info, instrument, warn};

use super::{crediting_ends_at, Gateway, GatewayError};
use bitmesh_channel::chain::ChainError;
use bitmesh_channel::{build_close, fee_for_weight, ChannelKey, CloseInput, CloseTx, VerifiedUpdate};
use crate::store::{
    ChannelRecord, ChannelStage, CloseReason, FinalUsage, NewSettlement, SettlementRecord, SettlementState,
    UsageSnapshot,
};

/// What one settlement pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SettleReport {
    /// Channels put into a close transaction.
    pub closed: Vec<ChannelId>,
    /// Funded channels with no payment at their deadline (the client refunds).
    pub abandoned: Vec<ChannelId>,
    pub broadcast: Vec<Txid>,
    pub confirmed: Vec<Txid>,
    pub bumped: Vec<Txid>,
    /// Channels whose funding output vanished before confirming (never settled).
    pub double_spent: Vec<ChannelId>,
}

/// Confirmation target (blocks) asked of the fee estimator for closes.
const CLOSE_TARGET_BLOCKS: u16 = 6;

fn boottime_secs() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_BOOTTIME exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc == 0 {
        ts.tv_sec as u64
    } else {
        0
    }
}

impl Gateway {
    /// One pass of the engine: read the tip, note funding confirmations, close what
    /// is due, watch and bump pending settlements. Run on every new block (or poll).
    #[instrument(skip_all)]
    pub async fn tick(&self) -> Result<SettleReport, GatewayError> {
        let tip = self.chain_call(|c| c.tip_height()).await?;
        self.set_tip(tip);
        self.watch_unconfirmed().await?;
        let mut report = self.settle_due().await?;
        self.watch_settlements(&mut report).await?;
        Ok(report)
    }

    /// Why `rec` must close now, if it must.
    fn due_reason(&self, rec: &ChannelRecord, tip: Height) -> Option<CloseReason> {
        if let Some(r) = rec.close_reason {
            return Some(r);
        }
        let p = self.policy();
        if tip >= crediting_ends_at(rec, p.limits.close_margin_blocks) {
            return Some(CloseReason::Expiry);
        }
        let idle = p.idle_timeout.as_secs();
        let paid_ago = crate::store::unix_now().saturating_sub(rec.last_activity_at) as u64;
        let seen_ago = match self.with_meter(|m| m.usage(rec.mac)) {
            Ok(Some(u)) if u.usage.last_seen_ns > 0 => boottime_secs().saturating_sub(u.usage.last_seen_ns / 1_000_000_000),
            _ => u64::MAX,
        };
        if paid_ago.min(seen_ago) > idle {
            return Some(CloseReason::Idle);
        }
        None
    }

    /// Close every channel that is due, together in one transaction.
    #[instrument(skip_all)]
    pub async fn settle_due(&self) -> Result<SettleReport, GatewayError> {
        let _serial = self.write_lock.lock().await;
        self.settle_due_locked().await
    }

    /// [`Self::settle_due`] for a caller that already holds the write lock (so that
    /// what it marked for closing cannot be split off by a concurrent pass).
    pub(super) async fn settle_due_locked(&self) -> Result<SettleReport, GatewayError> {
        let tip = self.tip();
        let mut report = SettleReport::default();
        let mut due = Vec::new();
        for rec in self.store.channels_in(&[ChannelStage::Open])? {
            let Some(reason) = self.due_reason(&rec, tip) else { continue };
            if rec.payments == 0 {
                // Nothing signed to claim: the client takes it all back by refund.
                self.store.abandon(rec.id)?;
                self.stop_metering(&rec)?;
                info!(channel = %rec.id, %reason, "unpaid channel abandoned");
                report.abandoned.push(rec.id);
                continue;
            }
            let rec = self.store.request_close(rec.id, reason)?;
            due.push(rec);
        }
        if due.is_empty() {
            return Ok(report);
        }
        let (rate, floor) = self.close_rates().await;
        let plan = self.plan_batches(due, rate, floor).await?;
        for rec in &plan.funding_gone {
            self.withdraw_double_spent(rec)?;
            report.double_spent.push(rec.id);
        }
        for (rec, reason) in &plan.failed {
            warn!(channel = %rec.id, %reason, "close left out; the channel stays due and is tried again next pass");
        }
        for (close, recs) in plan.batches {
            let txid = self.record_and_broadcast(close, recs.iter().map(|r| r.id).collect(), None, tip).await?;
            for rec in &recs {
                self.stop_metering(rec)?;
                report.closed.push(rec.id);
            }
            report.broadcast.push(txid);
        }
        Ok(report)
    }

    /// The fee rate to close at now, and the planning rate to fall back to. The
    /// planning rate is at least 1 sat/vB (`--close-fee-rate-sat-vb` is checked).
    async fn close_rates(&self) -> (FeeRate, FeeRate) {
        let p = self.policy();
        let floor = p.limits.close_fee_rate.max(FeeRate::from_sat_per_vb_u32(1));
        let rate = self
            .chain_call(move |c| c.fee_rate(CLOSE_TARGET_BLOCKS, floor))
            .await
            .unwrap_or(floor)
            .min(p.max_fee_rate)
            .max(floor);
        (rate, floor)
    }

    pub(super) fn build_batch(&self, recs: &[ChannelRecord], rate: FeeRate) -> Result<CloseTx, GatewayError> {
        let mut parts: Vec<(bitmesh_channel::Channel, ChannelKey, VerifiedUpdate)> = Vec::new();
        for rec in recs {
            let channel = Self::channel_of(rec).ok_or(GatewayError::Task(format!("channel {} has no funding", rec.id)))?;
            let key = self.seed.channel_key(rec.gateway_key_index)?;
            let pay = self
                .store
                .latest_payment(rec.id)?
                .ok_or(GatewayError::Task(format!("channel {} has no payment", rec.id)))?;
            let signature = bitcoin::ecdsa::Signature::from_slice(&pay.signature)
                .map_err(|e| GatewayError::Task(format!("stored signature of {} unreadable: {e}", rec.id)))?;
            parts.push((channel, key, VerifiedUpdate { total_paid: pay.paid_total, client_change: pay.client_change, signature }));
        }
        let inputs: Vec<CloseInput<'_>> = parts
            .iter()
            .map(|(channel, key, update)| CloseInput { channel, gateway_key: &key.secret, update })
            .collect();
        Ok(build_close(&inputs, &self.payout_script, rate)?)
    }

    /// Journal the settlement (synced), THEN broadcast: a crash in between leaves a
    /// recorded txid that the next pass rebroadcasts.
    async fn record_and_broadcast(
        &self,
        close: CloseTx,
        channels: Vec<ChannelId>,
        replaces: Option<i64>,
        tip: Height,
    ) -> Result<Txid, GatewayError> {
        let rec = self.store.record_settlement(&NewSettlement {
            tx: close.tx.clone(),
            fee: close.fee,
            gateway_payout: close.gateway_amount,
            broadcast_height: tip,
            channels,
            replaces,
        })?;
        let tx = close.tx;
        match self.chain_call(move |c| c.broadcast(&tx)).await {
            Ok(txid) => info!(%txid, fee_sat = close.fee.to_sat(), payout_sat = close.gateway_amount.to_sat(), channels = rec.channels.len(), "settlement broadcast"),
            Err(e) => warn!(txid = %rec.txid, error = %e, "settlement broadcast failed; retried next block"),
        }
        Ok(rec.txid)
    }

    pub(super) fn stop_metering(&self, rec: &ChannelRecord) -> Result<(), GatewayError> {
        if let Some(u) = self.with_meter(|m| m.usage(rec.mac))? {
            if self.channel_ended_keep_lightning(rec.mac, rec.credited)? {
                // Lightning credit keeps the device metered; its count goes on.
                self.store.set_final_usage(rec.id, FinalUsage::of(&u.usage))?;
                return Ok(());
            }
        }
        if let Some(u) = self.with_meter(|m| m.remove_client(rec.mac))? {
            // Kept for the operator (`bitmesh clients`): the maps forget it now.
            self.store.set_final_usage(rec.id, FinalUsage::of(&u.usage))?;
        }
        // The next channel of this device starts from zero, also after a reboot.
        self.store.ln_forget_meter(rec.mac)?;
        self.store.save_usage(&[UsageSnapshot { mac: rec.mac, taken_at: crate::store::unix_now(), ..Default::default() }])?;
        Ok(())
    }

    async fn watch_settlements(&self, report: &mut SettleReport) -> Result<(), GatewayError> {
        let tip = self.tip();
        for s in self.store.settlements_in(SettlementState::Broadcast)? {
            if let Some(confirmed) = self.confirmed_in_family(&s).await? {
                report.confirmed.push(confirmed);
                continue;
            }
            let txid = s.txid;
            let in_mempool = self.chain_call(move |c| c.transaction(&txid)).await?.is_some();
            if !in_mempool {
                let tx = s.tx.clone();
                match self.chain_call(move |c| c.broadcast(&tx)).await {
                    Ok(_) => {}
                    Err(GatewayError::Chain(ChainError::Rejected { reason, .. })) => {
                        warn!(txid = %s.txid, %reason, "settlement rejected by the node: splitting it");
                        self.split_rejected(&s, report).await?;
                        continue;
                    }
                    Err(e) => warn!(txid = %s.txid, error = %e, "rebroadcast failed"),
                }
            }
            if BlockCount::between(s.broadcast_height, tip) >= self.policy().bump_after_blocks {
                if let Some(new) = self.bump(&s, tip).await? {
                    report.bumped.push(new);
                }
            }
        }
        Ok(())
    }

    /// A recorded settlement the node rejects (a funding output it spends is gone,
    /// or it no longer passes policy): re-plan its channels through the checks of
    /// `batch.rs` and record what passes as replacements. Channels whose funding is
    /// gone become `double_spent`; channels that fail alone go back to `open` (still
    /// due) and are tried on their own next pass.
    async fn split_rejected(&self, s: &SettlementRecord, report: &mut SettleReport) -> Result<(), GatewayError> {
        let _serial = self.write_lock.lock().await;
        let mut recs = Vec::new();
        for id in &s.channels {
            if let Some(r) = self.store.channel(*id)? {
                if r.state == ChannelStage::Closing && r.settlement_id == Some(s.id) {
                    recs.push(r);
                }
            }
        }
        let (rate, floor) = self.close_rates().await;
        let plan = self.plan_batches(recs, rate, floor).await?;
        let unchanged = plan.funding_gone.is_empty()
            && plan.failed.is_empty()
            && plan.batches.len() == 1
            && plan.batches.iter().all(|(c, _)| c.tx.compute_txid() == s.txid);
        if unchanged {
            return Ok(()); // the same transaction again: a passing rejection, retried next pass
        }
        for rec in &plan.funding_gone {
            // Metering stopped when it started closing; its MAC may have a new channel.
            if self.store.mark_double_spent(rec.id)? {
                warn!(channel = %rec.id, settlement = %s.txid, "funding output vanished before confirming: channel taken out of its settlement, never settled");
                report.double_spent.push(rec.id);
            }
        }
        for (rec, reason) in &plan.failed {
            self.store.release_from_settlement(rec.id, s.id)?;
            warn!(channel = %rec.id, %reason, "channel taken out of a rejected settlement; tried alone next pass");
        }
        let tip = self.tip();
        for (close, recs) in plan.batches {
            let sizes = recs.len();
            let txid = self.record_and_broadcast(close, recs.iter().map(|r| r.id).collect(), Some(s.id), tip).await?;
            info!(old = %s.txid, new = %txid, channels = sizes, "rejected settlement split");
            report.broadcast.push(txid);
        }
        self.store.retire_settlement(s.id)?;
        Ok(())
    }

    /// If this settlement or one it replaced confirmed, record it and return its txid.
    async fn confirmed_in_family(&self, s: &SettlementRecord) -> Result<Option<Txid>, GatewayError> {
        let mut cur = Some(s.clone());
        while let Some(rec) = cur {
            let txid = rec.txid;
            if let Some(st) = self.chain_call(move |c| c.transaction(&txid)).await? {
                if let Some(h) = st.block_height {
                    self.store.mark_settlement_confirmed(rec.id, h)?;
                    info!(%txid, height = %h, "settlement confirmed");
                    return Ok(Some(txid));
                }
            }
            cur = match rec.replaces {
                Some(id) => self.store.settlement(id)?,
                None => None,
            };
        }
        Ok(None)
    }

    /// Replace a stuck settlement with a higher fee (BIP125). `None` at the fee cap.
    async fn bump(&self, s: &SettlementRecord, tip: Height) -> Result<Option<Txid>, GatewayError> {
        let p = self.policy();
        let vsize = s.tx.weight().to_vbytes_ceil().max(1);
        let old = FeeRate::from_sat_per_kwu(s.fee.to_sat() * 250 / vsize);
        let plus_one = FeeRate::from_sat_per_kwu(old.to_sat_per_kwu() + 250);
        let scaled = FeeRate::from_sat_per_kwu(old.to_sat_per_kwu() * 5 / 4);
        let new = plus_one.max(scaled).min(p.max_fee_rate);
        if new <= old {
            return Ok(None);
        }
        let mut recs = Vec::new();
        for id in &s.channels {
            if let Some(r) = self.store.channel(*id)? {
                recs.push(r);
            }
        }
        let close = match self.build_batch(&recs, new) {
            Ok(c) => c,
            Err(e) => {
                warn!(txid = %s.txid, error = %e, "cannot bump the settlement fee further");
                return Ok(None);
            }
        };
        // BIP125 rule 4: the replacement pays at least the old fee plus its own relay fee.
        if close.fee < s.fee + fee_for_weight(FeeRate::from_sat_per_vb_u32(1), close.tx.weight()) {
            return Ok(None);
        }
        // Checked like every batch before it is recorded (testmempoolaccept also
        // applies the replacement rules against the one in the mempool).
        if let Some(reason) = self.check_batch(&close).await? {
            warn!(txid = %s.txid, %reason, "fee bump fails verification: not recorded");
            return Ok(None);
        }
        let txid = self.record_and_broadcast(close, s.channels.clone(), Some(s.id), tip).await?;
        info!(old = %s.txid, new = %txid, "settlement fee bumped");
        Ok(Some(txid))
    }
}
