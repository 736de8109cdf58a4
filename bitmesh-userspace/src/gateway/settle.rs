//! The settlement engine, driven by block height: close what is due (expiry minus
//! margin, idle, client request, fully paid) in one batch transaction, record it
//! before broadcasting, watch it confirm, and bump its fee (RBF) when it does not.

use bitcoin::absolute::Height;
use bitcoin::{Amount, FeeRate, Txid};
use bitmesh_common::wire::ChannelId;
use tracing::{info, instrument, warn};

use super::{crediting_ends_at, fee_for_weight, Gateway, GatewayError};
use crate::channel::{build_close, ChannelKey, CloseInput, CloseTx, VerifiedUpdate};
use crate::store::{
    ByteCount, ChannelRecord, ChannelState, FinalUsage, NewSettlement, SettlementRecord, SettlementState, UsageSnapshot,
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
        self.watch_funding().await?;
        let mut report = self.settle_due().await?;
        self.watch_settlements(&mut report).await?;
        Ok(report)
    }

    async fn watch_funding(&self) -> Result<(), GatewayError> {
        for rec in self.store.channels_in(&[ChannelState::Open])? {
            let Some(f) = rec.funding.filter(|f| f.height.is_none()) else { continue };
            let txid = f.outpoint.txid;
            if let Some(st) = self.chain_call(move |c| c.transaction(&txid)).await? {
                if let Some(h) = st.block_height {
                    self.store.set_funding_height(rec.id, h)?;
                    info!(channel = %rec.id, %txid, height = %h, "funding confirmed");
                }
            }
        }
        Ok(())
    }

    /// Why `rec` must close now, if it must.
    fn due_reason(&self, rec: &ChannelRecord, tip: Height) -> Option<String> {
        if let Some(r) = &rec.close_reason {
            return Some(r.clone());
        }
        let p = self.policy();
        if tip >= crediting_ends_at(rec, p.close_margin_blocks) {
            return Some("expiry".into());
        }
        let idle = p.idle_timeout.as_secs();
        let paid_ago = crate::store::unix_now().saturating_sub(rec.last_activity_at) as u64;
        let seen_ago = match self.with_meter(|m| m.usage(rec.mac)) {
            Ok(Some((_, u))) if u.last_seen_ns > 0 => boottime_secs().saturating_sub(u.last_seen_ns / 1_000_000_000),
            _ => u64::MAX,
        };
        if paid_ago.min(seen_ago) > idle {
            return Some("idle".into());
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
        for rec in self.store.channels_in(&[ChannelState::Open])? {
            let Some(reason) = self.due_reason(&rec, tip) else { continue };
            if rec.payments == 0 {
                // Nothing signed to claim: the client takes it all back by refund.
                self.store.abandon(rec.id)?;
                self.stop_metering(&rec)?;
                info!(channel = %rec.id, %reason, "unpaid channel abandoned");
                report.abandoned.push(rec.id);
                continue;
            }
            let rec = self.store.request_close(rec.id, &reason)?;
            due.push(rec);
        }
        if due.is_empty() {
            return Ok(report);
        }
        let p = self.policy();
        let floor = p.close_fee_rate;
        let rate = self
            .chain_call(move |c| c.fee_rate(CLOSE_TARGET_BLOCKS, floor))
            .await
            .unwrap_or(floor)
            .min(p.max_fee_rate);
        let close = match self.build_batch(&due, rate) {
            Ok(c) => c,
            // A high estimate can push a small batch's payout under dust: fall back to
            // the planning rate, which every first payment covers.
            Err(_) if rate > floor => self.build_batch(&due, floor)?,
            Err(e) => return Err(e),
        };
        let txid = self.record_and_broadcast(close, due.iter().map(|r| r.id).collect(), None, tip).await?;
        for rec in &due {
            self.stop_metering(rec)?;
            report.closed.push(rec.id);
        }
        report.broadcast.push(txid);
        Ok(report)
    }

    fn build_batch(&self, recs: &[ChannelRecord], rate: FeeRate) -> Result<CloseTx, GatewayError> {
        let mut parts: Vec<(crate::channel::Channel, ChannelKey, VerifiedUpdate)> = Vec::new();
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

    fn stop_metering(&self, rec: &ChannelRecord) -> Result<(), GatewayError> {
        if let Some(u) = self.with_meter(|m| m.remove_client(rec.mac))? {
            // Kept for the operator (`bitmesh clients`): the maps forget it now.
            self.store.set_final_usage(rec.id, FinalUsage { up: ByteCount(u.up_bytes), down: ByteCount(u.down_bytes) })?;
        }
        // The next channel of this device starts from zero, also after a reboot.
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
            let waited = tip.to_consensus_u32().saturating_sub(s.broadcast_height.to_consensus_u32());
            if waited >= self.policy().bump_after_blocks {
                if let Some(new) = self.bump(&s, tip).await? {
                    report.bumped.push(new);
                    continue;
                }
            }
            if !in_mempool {
                let tx = s.tx.clone();
                if let Err(e) = self.chain_call(move |c| c.broadcast(&tx)).await {
                    warn!(txid = %s.txid, error = %e, "rebroadcast failed");
                }
            }
        }
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
        let _ = Amount::ZERO;
        let txid = self.record_and_broadcast(close, s.channels.clone(), Some(s.id), tip).await?;
        info!(old = %s.txid, new = %txid, "settlement fee bumped");
        Ok(Some(txid))
    }
}
