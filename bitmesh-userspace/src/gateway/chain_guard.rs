//! The chain facts a payment depends on, checked before anything is credited:
//! * the tip is fresh (a backend that stopped answering must not let the gateway
//!   credit past a channel's deadline, or skip the checks below): `chain_unavailable`;
//! * an unconfirmed channel's funding output still exists, unspent, in the mempool
//!   or the chain (`gettxout` with the mempool on Core, the outspend status on
//!   Esplora). Checked on every payment of such a channel and on every tick; when it
//!   is gone the channel is marked `double_spent`, its credit is withdrawn from the
//!   kernel at once, and it is never settled.
//!
//! Withdrawal removes the MAC's CREDIT/USAGE entries rather than lowering CREDIT to
//! the usage: removal puts the device back to the kernel's default (unpaid, walled
//! garden) in one step, with no window where a race between reading USAGE and
//! writing CREDIT leaves a few more frames paid. The state change is written first,
//! so a restart (reconcile restores `open` channels only) cannot bring it back.

use bitcoin::Amount;
use bitmesh_common::blocks::{mined_at, BlockCount};
use tracing::{info, warn};

use super::exposure::is_unconfirmed;
use super::{Gateway, GatewayError};
use crate::store::{ChannelRecord, ChannelStage};

impl Gateway {
    /// Refuse with `chain_unavailable` when the tip was not read for too long.
    pub(super) fn ensure_chain_fresh(&self) -> Result<(), GatewayError> {
        let age = match self.tip_read_at.lock() {
            Ok(at) => at.elapsed(),
            Err(_) => return Err(GatewayError::Poisoned("tip clock")),
        };
        if age > self.policy().chain_stale_after {
            warn!(age_secs = age.as_secs(), "chain tip is stale: refusing payments and opens until the backend answers");
            return Err(GatewayError::ChainStale);
        }
        Ok(())
    }

    /// Every chain check a payment of `rec` for `total` needs before it is verified
    /// and journaled. Runs under the payment lock.
    pub(super) async fn admit_payment(&self, rec: &ChannelRecord, total: Amount) -> Result<(), GatewayError> {
        if rec.state == ChannelStage::DoubleSpent {
            return Err(GatewayError::FundingDoubleSpent(rec.id));
        }
        self.ensure_chain_fresh()?;
        let required = self.policy().limits.confirmations_required;
        if rec.state != ChannelStage::Open || !is_unconfirmed(rec, self.tip(), required) {
            return Ok(());
        }
        match self.funding_confirmations(rec).await? {
            None => {
                self.withdraw_double_spent(rec)?;
                Err(GatewayError::FundingDoubleSpent(rec.id))
            }
            // Confirmed since the last tick: the cap no longer applies.
            Some(confs) if confs >= required.max(1) => Ok(()),
            Some(_) => self.check_unconfirmed_total(rec, total),
        }
    }

    /// Confirmations of `rec`'s funding output if it is still unspent in the mempool
    /// or the chain (`None`: gone); records the confirmation height when it has one.
    async fn funding_confirmations(&self, rec: &ChannelRecord) -> Result<Option<u32>, GatewayError> {
        let Some(f) = rec.funding else { return Ok(Some(0)) };
        let outpoint = f.outpoint;
        let Some(out) = self.chain_call(move |c| c.unspent_output(&outpoint)).await? else { return Ok(None) };
        if f.height.is_none() {
            if let Some(h) = mined_at(self.tip(), BlockCount(out.confirmations)) {
                self.store.set_funding_height(rec.id, h)?;
                info!(channel = %rec.id, txid = %outpoint.txid, height = %h, "funding confirmed");
            }
        }
        Ok(Some(out.confirmations))
    }

    /// One tick: check every open channel whose funding is unconfirmed; withdraw the
    /// credit of those whose output is gone. Holds the payment lock so that no
    /// payment of a channel being withdrawn raises its credit again.
    pub(super) async fn watch_unconfirmed(&self) -> Result<(), GatewayError> {
        let _serial = self.write_lock.lock().await;
        let required = self.policy().limits.confirmations_required;
        for rec in self.store.channels_in(&[ChannelStage::Open])? {
            if !is_unconfirmed(&rec, self.tip(), required) {
                continue;
            }
            if let Some(confs) = self.funding_confirmations(&rec).await? {
                if confs >= required.max(1) {
                    self.release_zero_conf(rec.id);
                }
                continue;
            }
            self.withdraw_double_spent(&rec)?;
        }
        Ok(())
    }

    /// The funding of open channel `rec` is gone: mark it (durably, first), then take
    /// its credit out of the kernel.
    pub(super) fn withdraw_double_spent(&self, rec: &ChannelRecord) -> Result<(), GatewayError> {
        if self.store.mark_double_spent(rec.id)? {
            self.stop_metering(rec)?;
            self.release_zero_conf(rec.id);
            warn!(
                channel = %rec.id,
                mac = %rec.mac,
                outpoint = ?rec.funding.map(|f| f.outpoint),
                paid_sat = rec.paid_total.to_sat(),
                credited = rec.credited.0,
                "funding output vanished before confirming (double-spent): credit withdrawn, channel never settled"
            );
        }
        Ok(())
    }
}
