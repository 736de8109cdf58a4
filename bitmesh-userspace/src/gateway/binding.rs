//! MAC-cloning alert: a bound client's MAC seen with another source address.
//!
//! The kernel counts, per bound MAC, the billable upload frames whose source is not
//! the bound address (and drops them when enforced, see docs/kernel-abi.md). This
//! turns the counters into one warning per MAC and per burst, and a metric.

use std::collections::HashMap;

use tracing::warn;

use super::{Gateway, GatewayError};
use crate::store::MacAddr;

/// What the watcher has already reported, per MAC (frames counted so far).
#[derive(Debug, Default)]
pub struct SourceWatch {
    reported: HashMap<MacAddr, u64>,
}

impl Gateway {
    /// Warn once for every bound MAC whose count of frames from another source grew
    /// since the last call. Returns the MACs warned about.
    pub fn warn_on_second_sources(&self, watch: &mut SourceWatch) -> Result<Vec<MacAddr>, GatewayError> {
        let now = self.with_meter(|m| m.source_violations())?;
        let mut warned = Vec::new();
        for (mac, frames, last) in &now {
            let before = watch.reported.get(mac).copied().unwrap_or(0);
            if *frames > before {
                let source = last.map_or_else(|| "?".to_string(), |ip| ip.to_string());
                warn!(%mac, %source, frames = frames - before, total = frames,
                    "a second address for a bound client's MAC: its MAC may be cloned (see docs/operator.md, link-layer encryption)");
                warned.push(*mac);
            }
        }
        // Forget MACs no longer bound (channel closed); a new binding starts over.
        watch.reported = now.into_iter().map(|(mac, frames, _)| (mac, frames)).collect();
        Ok(warned)
    }

    /// Frames the kernel saw from bound MACs with another source, all clients.
    pub fn second_source_frames(&self) -> u64 {
        self.with_meter(|m| m.source_violations()).map_or(0, |v| v.iter().map(|(_, n, _)| n).sum())
    }
}
