//! Restart reconciliation and periodic usage snapshots.
//!
//! * Pinned maps survived (controller restart): keep them, the kernel's counters
//!   are the truth; only raise CREDIT to what the journal says (repairs a crash
//!   between "persisted" and "credited").
//! * Maps are new (reboot): recreate every open channel's client with USAGE from
//!   its last snapshot and CREDIT from the journal. Traffic after the last snapshot
//!   is lost to billing (at most one snapshot interval), never paid twice.

use std::collections::HashMap;

use bitmesh_common::kernel::Usage;
use bitmesh_common::pricing::ByteCount;
use tracing::{info, warn};

use super::{Gateway, GatewayError};
use crate::store::{unix_now, ChannelState, MacAddr, UsageSnapshot};

/// What reconciliation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub maps_were_pinned: bool,
    /// Open channels whose client is metered again.
    pub clients: usize,
    /// Clients whose USAGE was restored from a snapshot (reboot only).
    pub usage_restored: usize,
}

impl Gateway {
    /// Bring the kernel maps in line with the store at start.
    pub fn reconcile(&self, maps_were_pinned: bool) -> Result<ReconcileReport, GatewayError> {
        let snaps: HashMap<MacAddr, UsageSnapshot> =
            self.store.usage_snapshots()?.into_iter().map(|s| (s.mac, s)).collect();
        let mut report = ReconcileReport { maps_were_pinned, ..Default::default() };
        for rec in self.store.channels_in(&[ChannelState::Open])? {
            let usage = match (maps_were_pinned, snaps.get(&rec.mac)) {
                (false, Some(s)) => {
                    report.usage_restored += 1;
                    Usage {
                        up_bytes: s.up.0,
                        down_bytes: s.down.0,
                        up_pkts: s.up_pkts,
                        down_pkts: s.down_pkts,
                        last_seen_ns: 0,
                    }
                }
                _ => Usage::default(),
            };
            // Existing (pinned) entries are left untouched by restore_client.
            self.with_meter(|m| m.restore_client(rec.mac, usage))?;
            self.with_meter(|m| m.bind_source(rec.mac, rec.ip))?;
            if let Err(e) = self.with_meter(|m| m.raise_credit(rec.mac, rec.credited)) {
                warn!(channel = %rec.id, mac = %rec.mac, error = %e, "could not raise credit from the journal");
            }
            report.clients += 1;
        }
        info!(pinned = maps_were_pinned, clients = report.clients, restored = report.usage_restored, "kernel maps reconciled with the store");
        Ok(report)
    }

    /// Save the kernel counters of every open channel's client (one synced write).
    pub fn snapshot_usage(&self) -> Result<usize, GatewayError> {
        let live: HashMap<MacAddr, ()> =
            self.store.channels_in(&[ChannelState::Open])?.into_iter().map(|c| (c.mac, ())).collect();
        let now = unix_now();
        let snaps: Vec<UsageSnapshot> = self
            .with_meter(|m| m.all_usage())?
            .into_iter()
            .filter(|(mac, _, _)| live.contains_key(mac))
            .map(|(mac, _, u)| UsageSnapshot {
                mac,
                up: ByteCount(u.up_bytes),
                down: ByteCount(u.down_bytes),
                up_pkts: u.up_pkts,
                down_pkts: u.down_pkts,
                last_seen_ns: u.last_seen_ns,
                taken_at: now,
            })
            .collect();
        self.store.save_usage(&snaps)?;
        Ok(snaps.len())
    }
}
