//! The Lightning rail's money rules (docs/design.md section 5.7): invoices, receipts,
//! restore, expiry, and the one kernel total a MAC gets from both rails.
//!
//! **One meter.** A MAC's kernel entries count one USAGE `U` since they were made.
//! Its CREDIT is `ch + settled + live`, where `ch` is its open channel's credited
//! total (0 without one), `live` its Lightning account's unaccounted bytes, and
//! `settled` (table `ln_meter`) the part of `U` already accounted for at a settle
//! point. Usage since the last settle point (`U - settled`) is charged to the
//! channel first, then to Lightning: `used_ln = clamp(U - settled - ch, 0, live)`.
//! Settle points: a channel ends while Lightning credit remains (all of `U` becomes
//! settled), the credit moves to another MAC, or it expires. The kernel is only
//! touched after the store is committed; every kernel value is recomputed from the
//! store, so a crash in between is repaired by reconciliation.

use std::net::IpAddr;
use std::sync::Arc;

use bitmesh_common::kernel::Mac;
use bitmesh_common::pricing::ByteCount;
use bitmesh_common::wire::{
    DeviceCredit, Invoice, InvoicePaid, InvoiceRequest, InvoiceState, InvoiceStatus, LightningTerms, Rail,
    RestoreRequest, RestoreResponse,
};
use tracing::{info, warn};

use super::{Gateway, GatewayError};
use crate::lightning::{
    bytes_for_receipt, invoice_msat, InvoiceSource, LightningSettings, PurchaseToken, TokenKey, MAX_PURCHASE_BYTES,
    MIN_PURCHASE_BYTES,
};
use crate::store::{
    unix_now, ChannelStage, LnAccount, LnSettle, NewLnInvoice, PaymentHash, ReceiptOutcome, UsageSnapshot,
};

/// Marks a payment as being credited for as long as it lives (see
/// [`Gateway::is_crediting`]); dropped on every exit of the credit, errors included.
struct Crediting<'g> {
    gw: &'g Gateway,
    hash: PaymentHash,
}

impl<'g> Crediting<'g> {
    fn start(gw: &'g Gateway, hash: PaymentHash) -> Crediting<'g> {
        if let Ok(mut set) = gw.crediting.lock() {
            set.insert(hash);
        }
        Crediting { gw, hash }
    }
}

impl Drop for Crediting<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.gw.crediting.lock() {
            set.remove(&self.hash);
        }
    }
}

/// What the gateway needs to sell Lightning bundles.
pub struct LightningRail {
    pub invoices: Arc<dyn InvoiceSource>,
    pub settings: LightningSettings,
    pub token_key: TokenKey,
    /// The embedded node, for the operator's commands (`None` in unit tests).
    pub node: Option<Arc<ldk_node::Node>>,
}

impl Gateway {
    /// Start selling Lightning bundles (once, at start).
    pub fn attach_lightning(&self, rail: LightningRail) {
        if self.lightning.set(rail).is_err() {
            warn!("the Lightning rail was attached twice; keeping the first");
        }
    }

    /// The Lightning rail, if running.
    pub fn lightning(&self) -> Option<&LightningRail> {
        self.lightning.get()
    }

    pub(super) fn rail(&self) -> Result<&LightningRail, GatewayError> {
        self.lightning.get().ok_or(GatewayError::LightningUnavailable)
    }

    /// The `lightning` part of the terms.
    pub fn lightning_terms(&self) -> Option<LightningTerms> {
        let rail = self.lightning.get()?;
        let price = self.policy().price;
        Some(LightningTerms {
            node_id: rail.invoices.node_id(),
            bundles: rail.settings.bundles.iter().map(|b| b.priced(price)).collect(),
            credit_ttl_secs: rail.settings.credit_ttl.as_secs(),
        })
    }

    /// The credited total of `mac`'s open channel (0 without one).
    fn open_channel_credit(&self, mac: Mac) -> Result<ByteCount, GatewayError> {
        Ok(self
            .store
            .live_channel_for_mac(mac)?
            .filter(|c| c.state == ChannelStage::Open)
            .map(|c| c.credited)
            .unwrap_or(ByteCount::ZERO))
    }

    /// The kernel CREDIT `mac` must have: its channel's credited total `channel` plus
    /// its Lightning part (settled usage + live Lightning bytes).
    pub(super) fn credit_target(&self, mac: Mac, channel: ByteCount) -> Result<ByteCount, GatewayError> {
        let settled = self.store.ln_settled(mac)?;
        let live = self.store.ln_account_for_mac(mac)?.map(|a| a.live()).unwrap_or(0);
        Ok(channel.saturating_add(ByteCount(settled)).saturating_add(ByteCount(live)))
    }

    /// Whether `mac`'s kernel credit has a Lightning part (then it is set exactly,
    /// lowered too, rather than only ever raised).
    pub(super) fn has_lightning_part(&self, mac: Mac) -> Result<bool, GatewayError> {
        Ok(self.store.ln_settled(mac)? > 0 || self.store.ln_account_for_mac(mac)?.is_some_and(|a| a.live() > 0))
    }

    /// Whether `mac` holds live Lightning credit.
    pub(super) fn has_live_lightning(&self, mac: Mac) -> Result<bool, GatewayError> {
        Ok(self.store.ln_account_for_mac(mac)?.is_some_and(|a| a.live() > 0))
    }

    /// Make kernel entries for `mac` if it has none, starting its count from zero
    /// (what was settled of an earlier count is forgotten first).
    fn ensure_metered(&self, mac: Mac) -> Result<(), GatewayError> {
        if self.with_meter(|m| m.usage(mac))?.is_none() {
            self.store.ln_forget_meter(mac)?;
            self.with_meter(|m| m.restore_client(mac, Default::default()))?;
        }
        Ok(())
    }

    /// Bind `mac` in the kernel to the address it last asked from (an invoice or a
    /// restore): the MAC-cloning defence of the channels (`--enforce-bound-ip`).
    pub(super) fn bind_to_last_address(&self, mac: Mac) -> Result<(), GatewayError> {
        if let Some(b) = self.store.client_bindings()?.into_iter().find(|b| b.mac == mac) {
            self.with_meter(|m| m.bind_source(mac, b.ip))?;
        }
        Ok(())
    }

    /// Set `mac`'s kernel CREDIT to its target (entries must exist).
    fn apply_credit_target(&self, mac: Mac) -> Result<ByteCount, GatewayError> {
        let target = self.credit_target(mac, self.open_channel_credit(mac)?)?;
        self.with_meter(|m| m.set_credit(mac, target))?;
        Ok(target)
    }

    /// The settle point of `mac` now: the Lightning share of its usage since the
    /// last one goes to `account`'s `bytes_out`.
    fn settle_point(&self, mac: Mac, account: Option<&LnAccount>) -> Result<LnSettle, GatewayError> {
        let used = self.with_meter(|m| m.usage(mac))?.map(|c| c.usage.used_bytes()).unwrap_or(0);
        let settled = self.store.ln_settled(mac)?;
        let channel = self.open_channel_credit(mac)?.0;
        let live = account.map(|a| a.live()).unwrap_or(0);
        let used_ln = used.saturating_sub(settled).saturating_sub(channel).min(live);
        Ok(LnSettle { mac, account: account.map(|a| a.token_hash), used: used_ln, settled_after: settled + used_ln })
    }

    /// Stop metering `mac` (no channel, no Lightning credit left): kernel entries
    /// removed, its accounted count forgotten, a zero snapshot so a reboot does not
    /// bring back an old count.
    fn unmeter(&self, mac: Mac) -> Result<(), GatewayError> {
        self.with_meter(|m| m.remove_client(mac))?;
        self.store.ln_forget_meter(mac)?;
        self.store.save_usage(&[UsageSnapshot { mac, taken_at: unix_now(), ..Default::default() }])?;
        Ok(())
    }

    /// `POST /v1/invoices`: an invoice for a bundle or a number of bytes, for the
    /// requesting device. Recorded (synced) before it is returned.
    ///
    /// With a purchase token the invoice tops up that token's account, so one code
    /// keeps naming all of a device's credit; an account on another MAC (the
    /// device's MAC changed) moves to this one first, as `POST /v1/restore` does. A
    /// token that names no account is refused and nothing changes. Without a token
    /// the MAC's own account is used, created with its first invoice.
    pub async fn create_invoice(&self, peer: IpAddr, req: InvoiceRequest) -> Result<Invoice, GatewayError> {
        let rail = self.rail()?;
        let mac = self.mac_of(peer)?;
        let bytes = match (&req.bundle, req.bytes) {
            (Some(name), None) => rail.settings.bundle(name).ok_or_else(|| GatewayError::UnknownBundle(name.clone()))?.bytes,
            (None, Some(b)) => {
                if !(MIN_PURCHASE_BYTES..=MAX_PURCHASE_BYTES).contains(&b) {
                    return Err(GatewayError::BytesOutOfRange { min: MIN_PURCHASE_BYTES, max: MAX_PURCHASE_BYTES });
                }
                b
            }
            _ => return Err(GatewayError::BundleOrBytes),
        };
        let presented = req.token.as_deref().map(|t| PurchaseToken::parse(t).ok_or(GatewayError::UnknownToken)).transpose()?;
        let amount_msat = invoice_msat(bytes, self.policy().price);
        let description = format!("{}: {} of internet access", rail.settings.alias, human_bytes(bytes));
        let expiry = u32::try_from(rail.settings.invoice_expiry.as_secs()).unwrap_or(u32::MAX);
        // Under the write lock: account lookup, creation and move of one MAC are one step.
        let _serial = self.write_lock.lock().await;
        // The account to top up: the presented token's (moved here after the invoice
        // is made), else this MAC's, else a new one.
        let (token, create, move_here) = match presented {
            Some(token) => {
                let account = self.store.ln_account(token.hash())?.ok_or(GatewayError::UnknownToken)?;
                let move_here = (account.mac != Some(mac)).then_some(account);
                (token, None, move_here)
            }
            None => match self.store.ln_account_for_mac(mac)? {
                Some(a) => (PurchaseToken::derive(&rail.token_key, &a.nonce), None, None),
                None => {
                    let mut n = [0u8; 16];
                    crate::lightning::random_bytes(&mut n).map_err(|e| GatewayError::Task(format!("no randomness: {e}")))?;
                    (PurchaseToken::derive(&rail.token_key, &n), Some(n), None)
                }
            },
        };
        let source = rail.invoices.clone();
        let desc = description.clone();
        let inv = tokio::task::spawn_blocking(move || source.invoice(amount_msat, &desc, expiry))
            .await
            .map_err(|e| GatewayError::Task(e.to_string()))?
            ?;
        if let Some(account) = move_here {
            self.move_account_here(account, mac, peer).await?;
        }
        let record = NewLnInvoice {
            payment_hash: inv.payment_hash,
            account: token.hash(),
            create_account: create,
            mac,
            bytes,
            amount_msat,
            bolt11: inv.bolt11.clone(),
            expires_at: i64::try_from(inv.expires_at).unwrap_or(i64::MAX),
            now: unix_now(),
        };
        self.store_call(move |s| {
            s.bind_client(mac, peer)?;
            s.ln_record_invoice(&record)
        })
        .await?;
        info!(%mac, payment_hash = %inv.payment_hash, bytes, amount_msat, "Lightning invoice issued");
        Ok(Invoice {
            payment_hash: inv.payment_hash.to_string(),
            bolt11: inv.bolt11,
            amount_msat,
            bytes,
            description,
            expires_at: inv.expires_at,
            token: token.display(),
        })
    }

    /// Whether `hash` is journaled but its kernel credit not yet applied.
    pub(crate) fn is_crediting(&self, hash: PaymentHash) -> bool {
        self.crediting.lock().is_ok_and(|set| set.contains(&hash))
    }

    /// `GET /v1/invoices/{payment_hash}`: `paid` only once the bytes are in the kernel.
    pub fn invoice_status(&self, hash_hex: &str) -> Result<InvoiceStatus, GatewayError> {
        self.rail()?;
        let hash: PaymentHash = hash_hex
            .parse()
            .map_err(|_| GatewayError::BadPaymentHash(hash_hex.to_owned()))?;
        let inv = self.store.ln_invoice(hash)?.ok_or(GatewayError::UnknownInvoice)?;
        let (state, credited) = match inv.receipt {
            // Journaled, the kernel credit not yet applied: a moment more.
            Some(_) if self.is_crediting(hash) => (InvoiceState::Pending, 0),
            Some(r) => (InvoiceState::Paid, r.bytes_credited),
            None if inv.expires_at <= unix_now() => (InvoiceState::Expired, 0),
            None => (InvoiceState::Pending, 0),
        };
        Ok(InvoiceStatus { payment_hash: hash.to_string(), state, bytes: inv.bytes, bytes_credited: credited })
    }

    /// A payment the node claimed: journal it (synced), then credit the account's
    /// MAC. Idempotent by payment hash: the node may deliver the same payment again
    /// after a restart; the second time only the kernel is brought to its target.
    pub async fn credit_lightning_receipt(&self, hash: PaymentHash, amount_msat: u64) -> Result<(), GatewayError> {
        let ttl = self.lightning.get().map(|r| r.settings.credit_ttl.as_secs()).unwrap_or(86_400);
        let ttl = i64::try_from(ttl).unwrap_or(i64::MAX);
        let _serial = self.write_lock.lock().await;
        let _crediting = Crediting::start(self, hash);
        let outcome = self.store_call(move |s| s.ln_record_receipt(hash, amount_msat, unix_now(), ttl, bytes_for_receipt)).await?;
        crate::lightning::fault_point("ln-after-journal", &hash.to_string());
        let (receipt, account, fresh) = match outcome {
            ReceiptOutcome::Recorded(r, a) => (r, a, true),
            ReceiptOutcome::Duplicate(r, a) => (r, a, false),
        };
        if receipt.account.is_none() {
            warn!(payment_hash = %hash, amount_msat, "payment to a hash this gateway never issued: journaled, nothing credited");
            return Ok(());
        }
        if let Some(mac) = account.and_then(|a| a.mac) {
            self.ensure_metered(mac)?;
            self.bind_to_last_address(mac)?;
            let target = self.apply_credit_target(mac)?;
            if fresh {
                info!(%mac, payment_hash = %hash, amount_msat, bytes = receipt.bytes_credited, credited = target.0, "Lightning payment credited");
            } else {
                info!(%mac, payment_hash = %hash, "Lightning payment delivered again: already journaled, nothing new credited");
            }
            // Journaled and in the kernel: now (never before) the device may hear it.
            self.notify_paid(
                mac,
                InvoicePaid { payment_hash: hash.to_string(), amount_msat: receipt.amount_msat, bytes_credited: receipt.bytes_credited },
            );
        }
        Ok(())
    }

    /// `POST /v1/restore`: move the token's credit to the requesting MAC, in one
    /// durable transaction, then fix both MACs' kernel entries.
    pub async fn restore(&self, peer: IpAddr, req: RestoreRequest) -> Result<RestoreResponse, GatewayError> {
        self.rail()?;
        let mac = self.mac_of(peer)?;
        let token = PurchaseToken::parse(&req.token).ok_or(GatewayError::UnknownToken)?;
        let _serial = self.write_lock.lock().await;
        let account = self.store.ln_account(token.hash())?.ok_or(GatewayError::UnknownToken)?;
        if account.expires_at <= unix_now() || (account.live() == 0 && account.bytes_expired > 0) {
            return Err(GatewayError::TokenExpired);
        }
        let moved = self.move_account_here(account, mac, peer).await?;
        let credit = self.device_credit(mac)?;
        Ok(RestoreResponse {
            bytes_remaining: credit.lightning_bytes_remaining,
            expires_at: u64::try_from(moved.expires_at).unwrap_or(0),
        })
    }

    /// Move `account` (and its credit) to `mac`, which asks from `peer`: one durable
    /// transaction (both MACs' settle points, the merge of an account already on
    /// `mac`, the new link), then the kernel, old MAC first so the credit is never
    /// usable on both at once. The caller holds the write lock.
    async fn move_account_here(&self, account: LnAccount, mac: Mac, peer: IpAddr) -> Result<LnAccount, GatewayError> {
        let old = account.mac.filter(|m| *m != mac);
        let mut settles = Vec::new();
        if let Some(old) = old {
            settles.push(self.settle_point(old, Some(&account))?);
        }
        let here = self.store.ln_account_for_mac(mac)?;
        if let Some(other) = here.as_ref().filter(|a| a.token_hash != account.token_hash) {
            settles.push(self.settle_point(mac, Some(other))?);
        }
        let hash = account.token_hash;
        let moved = self.store_call(move |s| s.ln_move_account(hash, mac, &settles)).await?;
        if let Some(old) = old {
            let has_channel =
                self.store.live_channel_for_mac(old)?.is_some_and(|c| c.state == ChannelStage::Open);
            if has_channel {
                self.apply_credit_target(old)?;
            } else {
                self.unmeter(old)?;
            }
            info!(from = %old, to = %mac, bytes = moved.live(), "Lightning credit moved to a new MAC");
        }
        self.store.bind_client(mac, peer)?;
        // Entries only when there is credit to meter here (an expired account moved
        // for a top-up brings none; its purchase makes them when it is paid).
        if moved.live() > 0 || self.with_meter(|m| m.usage(mac))?.is_some() {
            self.ensure_metered(mac)?;
            self.bind_to_last_address(mac)?;
            self.apply_credit_target(mac)?;
        }
        Ok(moved)
    }

    /// The requesting device's credit across both rails (`GET /v1/device`, the
    /// portal page): its MAC from the neighbour table, then [`Self::device_credit`].
    pub fn device_credit_of(&self, peer: IpAddr) -> Result<DeviceCredit, GatewayError> {
        let mac = self.mac_of(peer)?;
        self.device_credit(mac)
    }

    /// One device's credit across both rails (for the portal page and `/v1/device`).
    pub fn device_credit(&self, mac: Mac) -> Result<DeviceCredit, GatewayError> {
        let (credited, used) = match self.with_meter(|m| m.usage(mac))? {
            Some(c) => (c.credited.0, c.usage.used_bytes()),
            None => (0, 0),
        };
        let channel = self.store.live_channel_for_mac(mac)?.filter(|c| c.state == ChannelStage::Open);
        let ch = channel.as_ref().map(|c| c.credited.0).unwrap_or(0);
        let account = self.store.ln_account_for_mac(mac)?;
        let live = account.map(|a| a.live()).unwrap_or(0);
        let settled = self.store.ln_settled(mac)?;
        let used_ln = used.saturating_sub(settled).saturating_sub(ch).min(live);
        let ln_remaining = live - used_ln;
        let mut rails = Vec::new();
        if channel.is_some() {
            rails.push(Rail::Channel);
        }
        if ln_remaining > 0 {
            rails.push(Rail::Lightning);
        }
        Ok(DeviceCredit {
            bytes_credited_total: credited,
            bytes_used: used,
            bytes_remaining: credited.saturating_sub(used),
            lightning_bytes_remaining: ln_remaining,
            lightning_expires_at: account.filter(|a| a.live() > 0).map(|a| u64::try_from(a.expires_at).unwrap_or(0)),
            channel: channel.map(|c| c.id),
            rails,
        })
    }

    /// A channel is about to be funded on `mac`: if it holds Lightning credit, the
    /// usage so far is Lightning's, so it is settled now (from here on usage goes to
    /// the channel first). CREDIT does not change (`settled + live` is the same sum).
    pub(super) fn settle_before_channel(&self, mac: Mac) -> Result<(), GatewayError> {
        let Some(account) = self.store.ln_account_for_mac(mac)?.filter(|a| a.live() > 0) else { return Ok(()) };
        if self.open_channel_credit(mac)? > ByteCount::ZERO {
            return Ok(());
        }
        let settle = self.settle_point(mac, Some(&account))?;
        if settle.used > 0 {
            self.store.ln_settle(&[settle])?;
        }
        Ok(())
    }

    /// The channel of `mac` ended (closing, abandoned or double-spent; the store
    /// already says so). With live Lightning credit the MAC stays metered: all of its
    /// count becomes settled (the channel's share is gone with it, the Lightning
    /// share leaves the account), and CREDIT drops to what is still Lightning's.
    /// Returns `false` when the MAC has no Lightning credit (the caller removes it).
    pub(super) fn channel_ended_keep_lightning(&self, mac: Mac, channel_credited: ByteCount) -> Result<bool, GatewayError> {
        let Some(account) = self.store.ln_account_for_mac(mac)?.filter(|a| a.live() > 0) else { return Ok(false) };
        let Some(client) = self.with_meter(|m| m.usage(mac))? else { return Ok(false) };
        let used = client.usage.used_bytes();
        let settled = self.store.ln_settled(mac)?;
        let used_ln = used.saturating_sub(settled).saturating_sub(channel_credited.0).min(account.live());
        let settle = LnSettle { mac, account: Some(account.token_hash), used: used_ln, settled_after: used };
        self.store.ln_settle(&[settle])?;
        let target = self.apply_credit_target(mac)?;
        info!(%mac, lightning_used = used_ln, credited = target.0, "channel ended; the device keeps its Lightning credit");
        Ok(true)
    }

    /// Expire Lightning credit past its account's expiry (run with housekeeping).
    pub async fn expire_lightning(&self) -> Result<usize, GatewayError> {
        let _serial = self.write_lock.lock().await;
        let now = unix_now();
        let mut expired = 0;
        for acc in self.store.ln_live_accounts()? {
            if acc.expires_at > now {
                continue;
            }
            let Some(mac) = acc.mac else { continue };
            let settle = self.settle_point(mac, Some(&acc))?;
            self.store.ln_expire(acc.token_hash, Some(settle))?;
            if self.store.live_channel_for_mac(mac)?.is_some_and(|c| c.state == ChannelStage::Open) {
                self.apply_credit_target(mac)?;
            } else {
                self.unmeter(mac)?;
            }
            info!(%mac, bytes = acc.live() - settle.used, "Lightning credit expired");
            expired += 1;
        }
        Ok(expired)
    }
}

/// `52428800` -> `50 MiB`.
pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} bytes");
    }
    let mut v = b as f64;
    let mut unit = "bytes";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0} {unit}")
    } else {
        format!("{v:.2} {unit}")
    }
}

/// Quick checks that need no store.
#[cfg(test)]
mod tests {
    #[test]
    fn bytes_read_like_the_bundles() {
        assert_eq!(super::human_bytes(50 * 1024 * 1024), "50 MiB");
        assert_eq!(super::human_bytes(1024 * 1024 * 1024), "1 GiB");
        assert_eq!(super::human_bytes(1500), "1.46 KiB");
        assert_eq!(super::human_bytes(12), "12 bytes");
    }
}
