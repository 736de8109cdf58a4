//! MAC-cloning alert: a bound client's MAC seen with another source address.
//!
//! The kernel counts, per bound MAC, the billable upload frames whose source is not
//! the bound address (and drops them when enforced, see docs/kernel-abi.md). This
//! turns the counters into one warning per MAC and per burst, and a metric.

use std::collections::HashMap;
use std::net::IpAddr;

use tracing::warn;

use super::{Gateway, GatewayError};
use bitmesh_common::kernel::Mac;

/// One bound MAC's count of frames from another source, and the last such source.
pub type SourceViolation = (Mac, u64, Option<IpAddr>);

/// What the watcher has already reported, per MAC (frames counted so far).
#[derive(Debug, Default)]
pub struct SourceWatch {
    reported: HashMap<Mac, u64>,
}

impl SourceWatch {
    /// Take the kernel's current counters; return the MACs whose count grew since the
    /// last call, with the number of new frames and the last source. MACs no longer
    /// bound (channel closed) are forgotten, so a new binding starts over.
    pub fn update(&mut self, now: Vec<SourceViolation>) -> Vec<SourceViolation> {
        let grown = now
            .iter()
            .filter_map(|(mac, frames, last)| {
                let before = self.reported.get(mac).copied().unwrap_or(0);
                // A rebinding may reset the kernel's count below what was reported.
                let new = if *frames >= before { frames - before } else { *frames };
                (new > 0).then_some((*mac, new, *last))
            })
            .collect();
        self.reported = now.into_iter().map(|(mac, frames, _)| (mac, frames)).collect();
        grown
    }
}

impl Gateway {
    /// Warn once for every bound MAC whose count of frames from another source grew
    /// since the last call. Returns the MACs warned about.
    pub fn warn_on_second_sources(&self, watch: &mut SourceWatch) -> Result<Vec<Mac>, GatewayError> {
        let now = self.with_meter(|m| m.source_violations())?;
        let grown = watch.update(now);
        for (mac, frames, last) in &grown {
            let source = last.map_or_else(|| "?".to_string(), |ip| ip.to_string());
            warn!(%mac, %source, frames,
                "a second address for a bound client's MAC: its MAC may be cloned (see docs/operator.md, link-layer encryption)");
        }
        Ok(grown.into_iter().map(|(mac, _, _)| mac).collect())
    }

    /// Frames the kernel saw from bound MACs with another source, all clients.
    pub fn second_source_frames(&self) -> u64 {
        self.with_meter(|m| m.source_violations()).map_or(0, |v| v.iter().map(|(_, n, _)| n).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_burst_of_second_source_frames_is_reported_once() {
        let (a, b) = (Mac([2, 0, 0, 0, 0, 1]), Mac([2, 0, 0, 0, 0, 2]));
        let ip: IpAddr = "10.0.0.99".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mut w = SourceWatch::default();
        assert_eq!(w.update(vec![(a, 0, None)]), vec![]);
        assert_eq!(w.update(vec![(a, 3, Some(ip))]), vec![(a, 3, Some(ip))]);
        assert_eq!(w.update(vec![(a, 3, Some(ip))]), vec![], "no new frames, no new warning");
        assert_eq!(w.update(vec![(a, 5, Some(ip)), (b, 1, Some(ip))]), vec![(a, 2, Some(ip)), (b, 1, Some(ip))]);
        // a unbound (closed) and bound again: counts start over.
        assert_eq!(w.update(vec![(b, 1, Some(ip))]), vec![]);
        assert_eq!(w.update(vec![(a, 1, Some(ip)), (b, 1, Some(ip))]), vec![(a, 1, Some(ip))]);
    }
}
