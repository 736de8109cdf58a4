//! Block counts beside block heights (rust-bitcoin's `absolute::Height`): a height
//! names one block, a count is a distance between two. A height plus or minus a
//! count is a height; every such step is written here once, saturating, so no
//! caller does `to_consensus_u32()` arithmetic by hand.

use std::fmt;

use bitcoin::absolute::Height;
use serde::{Deserialize, Serialize};

/// A number of blocks (an expiry window, a close margin, confirmations). On the wire
/// and in the config it is a plain integer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockCount(pub u32);

impl BlockCount {
    /// No blocks.
    pub const ZERO: BlockCount = BlockCount(0);

    /// The count as an integer.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Blocks from `from` up to `to` (zero when `to` is not above `from`).
    pub fn between(from: Height, to: Height) -> BlockCount {
        BlockCount(to.to_consensus_u32().saturating_sub(from.to_consensus_u32()))
    }

    /// Confirmations of a transaction mined at `mined` when the tip is `tip` (the
    /// block itself counts as one; zero when `mined` is above `tip`).
    pub fn confirmations(mined: Height, tip: Height) -> BlockCount {
        BlockCount(tip.to_consensus_u32().saturating_add(1).saturating_sub(mined.to_consensus_u32()))
    }
}

impl std::ops::Add for BlockCount {
    type Output = BlockCount;
    /// Saturating: a count never wraps.
    fn add(self, other: BlockCount) -> BlockCount {
        BlockCount(self.0.saturating_add(other.0))
    }
}

impl BlockCount {
    /// `self - other`, zero when `other` is larger.
    pub fn saturating_sub(self, other: BlockCount) -> BlockCount {
        BlockCount(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for BlockCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bare number: messages say "blocks" themselves.
        write!(f, "{}", self.0)
    }
}

/// Height arithmetic with [`BlockCount`]s, saturating at the ends of the height range.
pub trait HeightExt {
    /// `self + n`, at most the largest height.
    fn plus(self, n: BlockCount) -> Height;
    /// `self - n`, at least zero.
    fn minus(self, n: BlockCount) -> Height;
    /// `self + n`, `None` above the largest height.
    fn checked_plus(self, n: BlockCount) -> Option<Height>;
}

impl HeightExt for Height {
    fn plus(self, n: BlockCount) -> Height {
        Height::from_consensus(self.to_consensus_u32().saturating_add(n.0)).unwrap_or(Height::MAX)
    }

    fn minus(self, n: BlockCount) -> Height {
        Height::from_consensus(self.to_consensus_u32().saturating_sub(n.0)).unwrap_or(Height::ZERO)
    }

    fn checked_plus(self, n: BlockCount) -> Option<Height> {
        Height::from_consensus(self.to_consensus_u32().checked_add(n.0)?).ok()
    }
}

/// The height at which a transaction with `confs` confirmations was mined when the
/// tip is `tip` (`None` for zero confirmations: not mined).
pub fn mined_at(tip: Height, confs: BlockCount) -> Option<Height> {
    if confs == BlockCount::ZERO {
        return None;
    }
    Some(tip.plus(BlockCount(1)).minus(confs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u32) -> Height {
        Height::from_consensus(n).unwrap()
    }

    #[test]
    fn heights_and_counts_step_and_saturate() {
        assert_eq!(h(100).plus(BlockCount(44)), h(144));
        assert_eq!(h(100).minus(BlockCount(36)), h(64));
        assert_eq!(h(10).minus(BlockCount(36)), Height::ZERO);
        assert_eq!(Height::MAX.plus(BlockCount(1)), Height::MAX);
        assert_eq!(Height::MAX.checked_plus(BlockCount(1)), None);
        assert_eq!(h(1).checked_plus(BlockCount(2)), Some(h(3)));
        assert_eq!(BlockCount(2) + BlockCount(3), BlockCount(5));
        assert_eq!(BlockCount(2).saturating_sub(BlockCount(3)), BlockCount::ZERO);
        assert_eq!(BlockCount::between(h(100), h(144)), BlockCount(44));
        assert_eq!(BlockCount::between(h(144), h(100)), BlockCount::ZERO);
        assert_eq!(BlockCount::confirmations(h(100), h(100)), BlockCount(1));
        assert_eq!(BlockCount::confirmations(h(101), h(100)), BlockCount::ZERO);
        assert_eq!(mined_at(h(100), BlockCount(1)), Some(h(100)));
        assert_eq!(mined_at(h(100), BlockCount(3)), Some(h(98)));
        assert_eq!(mined_at(h(1), BlockCount(5)), Some(Height::ZERO));
        assert_eq!(mined_at(h(100), BlockCount::ZERO), None);
    }
}
