//! Sanity check of the gateway's chain tip. The tip in the terms sets the refund
//! lock (expiry = tip + the agreed number of blocks), so a gateway that claims a
//! tip far ahead locks the user's money for that much longer.
//!
//! The gateway's tip is compared with, in order of strength:
//! 1. the agent's own chain backend, when it has one (`--bitcoind-url`/`--esplora-url`):
//!    a few blocks of disagreement are propagation, more is refused;
//! 2. otherwise the last tip this agent accepted on that network (kept in the state
//!    directory): a tip more than a reorg's depth below it is refused, and so is one
//!    further ahead than blocks could have been found since (real networks only:
//!    regtest mines on demand);
//! 3. on mainnet, a height the chain cannot have reached by now is refused whatever
//!    else is known.
//!
//! [`check_tip`] is pure; [`TipLog`] is the little file behind rule 2.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use bitcoin::{absolute, Network};
use serde::{Deserialize, Serialize};

/// The gateway may be this many blocks ahead of the agent's own backend (a block
/// reaches one node before the other).
pub const AHEAD_OF_OWN_CHAIN: u32 = 2;
/// ...and this many behind (a slow node; more is a stale tip the gateway would
/// credit past the deadline with).
pub const BEHIND_OWN_CHAIN: u32 = 6;
/// A tip this many blocks below the last one seen is a reorg; deeper is refused.
pub const REORG_DEPTH: u32 = 6;
/// Blocks a real network may find beyond the time-based expectation (variance).
pub const JUMP_SLACK: u32 = 12;
/// The fastest block rate believed between two sessions: four times the target.
const FASTEST_BLOCK_SECS: u64 = 600 / 4;
/// Mainnet genesis block time (Unix seconds).
const MAINNET_GENESIS_TIME: u64 = 1_231_006_505;
/// Mainnet's average block interval since genesis has stayed above 9.6 min (the
/// early years ran fast, the difficulty adjustment pulls the average to 10 min):
/// 560 s bounds the height reachable by any date with months of margin.
const MAINNET_FASTEST_AVERAGE_SECS: u64 = 560;

/// The last tip the agent accepted on one network, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenTip {
    /// Height.
    pub height: u32,
    /// Unix seconds when it was accepted.
    pub at_unix: u64,
}

/// Why the gateway's tip is not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TipError {
    /// Disagrees with the agent's own chain backend.
    #[error("the gateway says the chain tip is {gateway}, your {backend} says {own}: the refund lock would be wrong; this gateway's node is broken or the gateway is hostile")]
    DisagreesWithOwnChain {
        /// The gateway's tip.
        gateway: u32,
        /// The backend's.
        own: u32,
        /// Which backend.
        backend: &'static str,
    },
    /// Far below a tip already seen.
    #[error("the gateway says the chain tip is {gateway}, but this agent already saw {seen} on this network: a tip going backwards is a stale or lying node; pass a chain backend (--bitcoind-url/--esplora-url) to check")]
    Backwards {
        /// The gateway's tip.
        gateway: u32,
        /// The last tip seen.
        seen: u32,
    },
    /// Further ahead than blocks could have been found.
    #[error("the gateway says the chain tip is {gateway}, but this agent saw {seen} {secs} s ago (at most {allowed} possible now): the refund lock would be set too far in the future; pass a chain backend (--bitcoind-url/--esplora-url) to check")]
    Jump {
        /// The gateway's tip.
        gateway: u32,
        /// The last tip seen.
        seen: u32,
        /// Seconds since.
        secs: u64,
        /// Highest plausible tip now.
        allowed: u32,
    },
    /// Above any height mainnet can have reached by now.
    #[error("the gateway says the mainnet tip is {gateway}, above the {max} blocks the chain can have by now: refusing a refund lock that far in the future")]
    Implausible {
        /// The gateway's tip.
        gateway: u32,
        /// Highest plausible mainnet height now.
        max: u32,
    },
}

/// What the agent knows to judge the gateway's tip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TipEvidence {
    /// The chain.
    pub network: Network,
    /// The agent's own backend's tip, and the backend's name.
    pub own: Option<(absolute::Height, &'static str)>,
    /// The last tip accepted on this network.
    pub last: Option<SeenTip>,
    /// Now, in Unix seconds.
    pub now_unix: u64,
}

/// Highest mainnet height plausible at `now_unix`.
pub fn mainnet_max_height(now_unix: u64) -> u32 {
    let blocks = now_unix.saturating_sub(MAINNET_GENESIS_TIME) / MAINNET_FASTEST_AVERAGE_SECS;
    u32::try_from(blocks).unwrap_or(u32::MAX)
}

/// Accept or refuse the gateway's tip (see the module docs).
pub fn check_tip(gateway: absolute::Height, ev: &TipEvidence) -> Result<(), TipError> {
    let gw = gateway.to_consensus_u32();
    if ev.network == Network::Bitcoin {
        let max = mainnet_max_height(ev.now_unix);
        if gw > max {
            return Err(TipError::Implausible { gateway: gw, max });
        }
    }
    if let Some((own, backend)) = ev.own {
        let own = own.to_consensus_u32();
        if gw > own.saturating_add(AHEAD_OF_OWN_CHAIN) || gw.saturating_add(BEHIND_OWN_CHAIN) < own {
            return Err(TipError::DisagreesWithOwnChain { gateway: gw, own, backend });
        }
        // The agent's own node is the authority: history has nothing to add.
        return Ok(());
    }
    if let Some(last) = ev.last {
        if gw.saturating_add(REORG_DEPTH) < last.height {
            return Err(TipError::Backwards { gateway: gw, seen: last.height });
        }
        if ev.network != Network::Regtest {
            let secs = ev.now_unix.saturating_sub(last.at_unix);
            let found = u32::try_from(secs / FASTEST_BLOCK_SECS).unwrap_or(u32::MAX);
            let allowed = last.height.saturating_add(JUMP_SLACK).saturating_add(found);
            if gw > allowed {
                return Err(TipError::Jump { gateway: gw, seen: last.height, secs, allowed });
            }
        }
    }
    Ok(())
}

/// The last accepted tip per network, one small file each in the state directory
/// (`last-tip-<network>`, not `.json`: the channel files are the only `.json`).
#[derive(Debug, Clone)]
pub struct TipLog {
    dir: PathBuf,
}

impl TipLog {
    /// The log in `dir` (the state directory).
    pub fn new(dir: &std::path::Path) -> TipLog {
        TipLog { dir: dir.to_owned() }
    }

    fn file(&self, network: Network) -> PathBuf {
        self.dir.join(format!("last-tip-{network}"))
    }

    /// The last tip accepted on `network`; `None` when none was (or the file is
    /// unreadable: it only ever makes the check stricter, never looser).
    pub fn last(&self, network: Network) -> Option<SeenTip> {
        let bytes = fs::read(self.file(network)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Remember `tip` as accepted now (never lowering a higher tip seen before).
    pub fn record(&self, network: Network, tip: SeenTip) -> std::io::Result<()> {
        let tip = match self.last(network) {
            Some(prev) if prev.height > tip.height => SeenTip { height: prev.height, at_unix: tip.at_unix },
            _ => tip,
        };
        let json = serde_json::to_vec(&tip).map_err(std::io::Error::other)?;
        let path = self.file(network);
        let tmp = self.dir.join(format!(".last-tip-{network}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u32) -> absolute::Height {
        absolute::Height::from_consensus(n).unwrap()
    }

    fn ev(network: Network, own: Option<u32>, last: Option<(u32, u64)>, now: u64) -> TipEvidence {
        TipEvidence {
            network,
            own: own.map(|o| (h(o), "test-chain")),
            last: last.map(|(height, at_unix)| SeenTip { height, at_unix }),
            now_unix: now,
        }
    }

    #[test]
    fn tip_rules_table() {
        const NOW: u64 = 1_800_000_000;
        #[rustfmt::skip]
        let rows: &[(&str, u32, TipEvidence, bool)] = &[
            ("agrees with own chain", 500, ev(Network::Regtest, Some(500), None, NOW), true),
            ("one block ahead of own chain", 502, ev(Network::Regtest, Some(500), None, NOW), true),
            ("far ahead of own chain", 5_000, ev(Network::Regtest, Some(500), None, NOW), false),
            ("stale against own chain", 490, ev(Network::Regtest, Some(500), None, NOW), false),
            ("own chain wins over history", 400, ev(Network::Regtest, Some(400), Some((500, NOW)), NOW), true),
            ("first sight without a chain", 500, ev(Network::Regtest, None, None, NOW), true),
            ("backwards beyond a reorg", 400, ev(Network::Regtest, None, Some((500, NOW)), NOW), false),
            ("a shallow reorg", 495, ev(Network::Regtest, None, Some((500, NOW)), NOW), true),
            ("regtest mines on demand", 5_000, ev(Network::Regtest, None, Some((500, NOW - 10)), NOW), true),
            ("signet jump in a minute", 600, ev(Network::Signet, None, Some((500, NOW - 60)), NOW), false),
            ("signet a day later", 644, ev(Network::Signet, None, Some((500, NOW - 86_400)), NOW), true),
            ("mainnet height of the far future", 5_000_000, ev(Network::Bitcoin, None, None, NOW), false),
            ("mainnet height of today", 950_000, ev(Network::Bitcoin, None, None, NOW), true),
        ];
        for (name, tip, evidence, ok) in rows {
            assert_eq!(check_tip(h(*tip), evidence).is_ok(), *ok, "{name}: {:?}", check_tip(h(*tip), evidence));
        }
    }

    #[test]
    fn the_mainnet_bound_is_above_the_real_chain() {
        // Block 840,000 was mined at 1,713,571,767 (2024-04-20).
        assert!(mainnet_max_height(1_713_571_767) > 840_000);
        assert!(mainnet_max_height(1_713_571_767) < 900_000);
    }

    #[test]
    fn the_log_keeps_the_highest_tip_per_network() {
        let dir = tempfile::tempdir().unwrap();
        let log = TipLog::new(dir.path());
        assert_eq!(log.last(Network::Regtest), None);
        log.record(Network::Regtest, SeenTip { height: 500, at_unix: 1 }).unwrap();
        log.record(Network::Regtest, SeenTip { height: 498, at_unix: 2 }).unwrap();
        assert_eq!(log.last(Network::Regtest), Some(SeenTip { height: 500, at_unix: 2 }));
        assert_eq!(log.last(Network::Signet), None);
    }
}
