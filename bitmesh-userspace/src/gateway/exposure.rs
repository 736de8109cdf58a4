//! What the gateway risks on funding that has not confirmed yet.
//!
//! An unconfirmed funding transaction can be replaced by a conflicting spend (full
//! RBF is the default in Bitcoin Core), after which every update signed on the
//! channel is worthless. So, while a channel's funding is unconfirmed:
//! * its credit is capped: the total may reach the first payment (at least the
//!   channel's `min_first_payment`, at least one chunk) plus ONE chunk, whatever the
//!   capacity ([`unconfirmed_total_cap`]);
//! * all unconfirmed channels together may hold at most `--zero-conf-exposure-sat`:
//!   each reserves its cap when its funding is accepted ([`ZeroConfBook`]), and
//!   funding beyond that waits for confirmations (`funding_unconfirmed`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bitcoin::absolute::Height;
use bitcoin::Amount;
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::pricing::payment_for_bytes;
use bitmesh_common::wire::ChannelId;

use super::{Gateway, GatewayError};
use bitmesh_channel::VerifiedFunding;
use crate::store::{ChannelRecord, ChannelStage};

/// A reservation made at funding is kept this long even before the store shows the
/// channel open (the funding call is still finishing).
const RESERVATION_GRACE: Duration = Duration::from_secs(60);

/// Highest total a channel may reach while its funding is unconfirmed.
pub(super) fn unconfirmed_total_cap(rec: &ChannelRecord) -> Amount {
    let chunk = payment_for_bytes(rec.chunk, rec.price);
    let cap = rec.min_first_payment.max(chunk) + chunk;
    rec.funding.map_or(cap, |f| cap.min(f.capacity))
}

/// Whether the channel's funding still lacks the confirmations that make it final
/// for the gateway (`--confirmations`, at least one).
pub(super) fn is_unconfirmed(rec: &ChannelRecord, tip: Height, required: u32) -> bool {
    match rec.funding {
        None => false,
        Some(f) => match f.height {
            None => true,
            Some(h) => BlockCount::confirmations(h, tip) < BlockCount(required.max(1)),
        },
    }
}

/// Zero-conf credit reserved per channel, so that two fundings accepted at the same
/// moment cannot both fit under the cap.
#[derive(Default)]
pub(super) struct ZeroConfBook {
    reserved: Mutex<HashMap<ChannelId, (Amount, Instant)>>,
}

impl Gateway {
    /// Called when a funding passed every check: a zero-conf funding is accepted only
    /// while the unconfirmed exposure of all channels stays under the cap.
    pub(super) fn admit_funding(&self, rec: &ChannelRecord, funded: &VerifiedFunding) -> Result<(), GatewayError> {
        self.ensure_chain_fresh()?;
        if !funded.zero_conf {
            return Ok(());
        }
        let p = self.policy();
        let tip = self.tip();
        let mine = unconfirmed_total_cap(rec).min(funded.capacity);
        // Channels the store already shows open and unconfirmed, with their caps.
        let open: HashMap<ChannelId, Amount> = self
            .store
            .channels_in(&[ChannelStage::Open])?
            .into_iter()
            .filter(|c| c.id != rec.id && is_unconfirmed(c, tip, p.limits.confirmations_required))
            .map(|c| (c.id, unconfirmed_total_cap(&c)))
            .collect();
        let mut book = self.zero_conf_book.reserved.lock().map_err(|_| GatewayError::Poisoned("zero-conf book"))?;
        book.retain(|id, (_, at)| open.contains_key(id) || at.elapsed() < RESERVATION_GRACE);
        let pending: Amount = book.iter().filter(|(id, _)| **id != rec.id && !open.contains_key(id)).map(|(_, (a, _))| *a).sum();
        let used = open.values().copied().sum::<Amount>() + pending;
        if used + mine > p.zero_conf_exposure {
            return Err(GatewayError::ZeroConfExposure {
                used,
                cap: p.zero_conf_exposure,
                confirmations: p.limits.confirmations_required.max(1),
            });
        }
        book.insert(rec.id, (mine, Instant::now()));
        Ok(())
    }

    /// The per-channel cap on a payment of an open channel whose funding has not
    /// confirmed: refuse totals above [`unconfirmed_total_cap`].
    pub(super) fn check_unconfirmed_total(&self, rec: &ChannelRecord, total: Amount) -> Result<(), GatewayError> {
        let cap = unconfirmed_total_cap(rec);
        // Above the capacity: verification refuses it with its own code.
        let capacity = rec.funding.map_or(Amount::MAX, |f| f.capacity);
        if total > cap && total <= capacity {
            return Err(GatewayError::UnconfirmedTotal { total, cap, confirmations: self.policy().limits.confirmations_required.max(1) });
        }
        Ok(())
    }

    /// Forget a channel's reservation (confirmed, double-spent or closed).
    pub(super) fn release_zero_conf(&self, id: ChannelId) {
        if let Ok(mut book) = self.zero_conf_book.reserved.lock() {
            book.remove(&id);
        }
    }
}
