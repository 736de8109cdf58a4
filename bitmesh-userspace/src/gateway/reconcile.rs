//! Restart reconciliation and periodic usage snapshots.
//!
//! * Pinned maps survived (controller restart): keep them, the kernel's counters
//!   are the truth; only raise CREDIT to what the journal says (repairs a crash
//!   between "persisted" and "credited").
//! * Maps are new (reboot): recreate every open channel's client with USAGE from
//!   its last snapshot and CREDIT from the journal. Traffic after the last snapshot
//!   is lost to billing (at most one snapshot interval), never paid twice.
//! * Either way, and periodically ([`Gateway::housekeeping`]): a MAC with kernel
//!   entries but no open channel loses them; offers past `--offer-ttl-secs` expire.

use std::collections::{HashMap, HashSet};

use bitmesh_common::kernel::{Mac, Usage};
use bitmesh_common::pricing::ByteCount;
use bitmesh_common::wire::ChannelId;
use tracing::{info, warn};

use super::{Gateway, GatewayError};
use crate::store::{unix_now, ChannelStage, UsageSnapshot};

/// What reconciliation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub maps_were_pinned: bool,
    /// Open channels whose client is metered again.
    pub clients: usize,
    /// Clients whose USAGE was restored from a snapshot (reboot only).
    pub usage_restored: usize,
    /// Devices with kernel entries but no open channel, whose entries were removed.
    pub stale_removed: usize,
    /// Devices metered for Lightning credit alone.
    pub lightning_clients: usize,
}

impl Gateway {
    /// Bring the kernel maps in line with the store at start.
    pub fn reconcile(&self, maps_were_pinned: bool) -> Result<ReconcileReport, GatewayError> {
        let snaps: HashMap<Mac, UsageSnapshot> =
            self.store.usage_snapshots()?.into_iter().map(|s| (s.mac, s)).collect();
        let mut report = ReconcileReport { maps_were_pinned, ..Default::default() };
        for rec in self.store.channels_in(&[ChannelStage::Open])? {
            let usage = match (maps_were_pinned, snaps.get(&rec.mac)) {
                (false, Some(s)) => {
                    report.usage_restored += 1;
                    // The boot clock restarted: the old last-seen time means nothing now.
                    Usage { last_seen_ns: 0, ..s.usage }
                }
                _ => Usage::default(),
            };
            // Existing (pinned) entries are left untouched by restore_client.
            let usage = self.start_count(rec.mac, maps_were_pinned, usage)?;
            self.with_meter(|m| m.restore_client(rec.mac, usage))?;
            self.with_meter(|m| m.bind_source(rec.mac, rec.ip))?;
            // One total for both rails: the channel's journal plus the Lightning part.
            let target = self.credit_target(rec.mac, rec.credited)?;
            let set = if self.has_lightning_part(rec.mac)? {
                self.with_meter(|m| m.set_credit(rec.mac, target))
            } else {
                self.with_meter(|m| m.raise_credit(rec.mac, target))
            };
            if let Err(e) = set {
                warn!(channel = %rec.id, mac = %rec.mac, error = %e, "could not raise credit from the journal");
            }
            report.clients += 1;
        }
        // Devices with Lightning credit and no open channel (docs/design.md 5.7).
        let open: HashSet<Mac> = self.store.channels_in(&[ChannelStage::Open])?.into_iter().map(|c| c.mac).collect();
        for acc in self.store.ln_live_accounts()? {
            let Some(mac) = acc.mac.filter(|m| !open.contains(m)) else { continue };
            let usage = match (maps_were_pinned, snaps.get(&mac)) {
                (false, Some(s)) => {
                    report.usage_restored += 1;
                    Usage { last_seen_ns: 0, ..s.usage }
                }
                _ => Usage::default(),
            };
            let usage = self.start_count(mac, maps_were_pinned, usage)?;
            self.with_meter(|m| m.restore_client(mac, usage))?;
            self.bind_to_last_address(mac)?;
            let target = self.credit_target(mac, ByteCount::ZERO)?;
            self.with_meter(|m| m.set_credit(mac, target))?;
            report.lightning_clients += 1;
        }
        report.stale_removed = self.remove_stale_entries()?;
        info!(pinned = maps_were_pinned, clients = report.clients, lightning = report.lightning_clients, restored = report.usage_restored, stale = report.stale_removed, "kernel maps reconciled with the store");
        Ok(report)
    }

    /// The count `mac`'s entries start from when they are (re)made at start. With
    /// pinned maps and entries present nothing changes. With pinned maps but no
    /// entries, the count starts at zero and so does what was settled of it. After a
    /// reboot the snapshot is restored, raised to the settled count if the snapshot
    /// is older than the last settle point (usage since the snapshot is lost to
    /// billing, never charged twice).
    fn start_count(&self, mac: Mac, maps_were_pinned: bool, mut usage: Usage) -> Result<Usage, GatewayError> {
        if maps_were_pinned {
            if self.with_meter(|m| m.usage(mac))?.is_none() {
                self.store.ln_forget_meter(mac)?;
            }
            return Ok(usage);
        }
        let settled = self.store.ln_settled(mac)?;
        let used = usage.up_bytes.saturating_add(usage.down_bytes);
        if used < settled {
            usage.down_bytes = usage.down_bytes.saturating_add(settled - used);
        }
        Ok(usage)
    }

    /// Periodic upkeep (run with the usage snapshots): expire offers older than
    /// `--offer-ttl-secs`, and remove kernel entries of devices that have no open
    /// channel (a channel closed or abandoned while its entries stayed, e.g. after a
    /// crash between the store update and the map removal).
    pub async fn housekeeping(&self) -> Result<(), GatewayError> {
        let cutoff = crate::store::unix_now().saturating_sub(i64::try_from(self.policy().offer_ttl.as_secs()).unwrap_or(i64::MAX));
        let expired = self.store_call(move |s| s.expire_offers(cutoff)).await?;
        if self.lightning().is_some() {
            self.expire_lightning().await?;
        }
        if !expired.is_empty() {
            info!(offers = expired.len(), "unfunded offers expired");
        }
        let offered: std::collections::HashSet<ChannelId> =
            self.store.channels_in(&[ChannelStage::Offered])?.into_iter().map(|c| c.id).collect();
        if let Ok(mut r) = self.relayed.lock() {
            r.retain(|id| offered.contains(id));
        }
        // Under the write lock: a channel funded concurrently creates its entries
        // under the same lock, so it is never mistaken for stale.
        let _serial = self.write_lock.lock().await;
        self.remove_stale_entries()?;
        Ok(())
    }

    /// Remove the kernel entries of every MAC without an open channel: raising
    /// credit never creates entries, so a device whose channel has ended cannot get
    /// credit back, and leftover entries (closed or abandoned channels) must go.
    /// Callers hold the write lock (or run before the API starts).
    fn remove_stale_entries(&self) -> Result<usize, GatewayError> {
        // Kernel first, then the store: a channel funded in between is in the store
        // read, so its fresh entries are never taken for stale.
        let metered = self.with_meter(|m| m.all_usage())?;
        let mut open: HashSet<Mac> = self.store.channels_in(&[ChannelStage::Open])?.into_iter().map(|c| c.mac).collect();
        // Lightning credit keeps a device metered too (docs/design.md section 5.7).
        open.extend(self.store.ln_live_accounts()?.into_iter().filter_map(|a| a.mac));
        let mut removed = 0;
        for client in metered {
            let mac = client.mac;
            if open.contains(&mac) {
                continue;
            }
            self.with_meter(|m| m.remove_client(mac))?;
            self.store.ln_forget_meter(mac)?;
            warn!(%mac, credited = client.credited.0, "removed kernel entries of a device with no open channel");
            removed += 1;
        }
        Ok(removed)
    }

    /// Save the kernel counters of every open channel's client (one synced write).
    pub fn snapshot_usage(&self) -> Result<usize, GatewayError> {
        let mut live: HashMap<Mac, ()> =
            self.store.channels_in(&[ChannelStage::Open])?.into_iter().map(|c| (c.mac, ())).collect();
        live.extend(self.store.ln_live_accounts()?.into_iter().filter_map(|a| a.mac).map(|m| (m, ())));
        let now = unix_now();
        let snaps: Vec<UsageSnapshot> = self
            .with_meter(|m| m.all_usage())?
            .into_iter()
            .filter(|c| live.contains_key(&c.mac))
            .map(|c| UsageSnapshot { mac: c.mac, usage: c.usage, taken_at: now })
            .collect();
        self.store.save_usage(&snaps)?;
        Ok(snaps.len())
    }
}
