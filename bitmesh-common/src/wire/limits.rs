//! The channel limits a gateway accepts: one struct that the terms (on the wire,
//! flattened into [`super::Terms`]), the controller's policy and the channel
//! library's checks all embed, instead of copying the fields.

use bitcoin::{Amount, FeeRate};
use serde::{Deserialize, Serialize};

use crate::blocks::BlockCount;

/// What channels the gateway accepts and how it closes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelLimits {
    /// Smallest channel capacity accepted.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "min_capacity_sat")]
    pub min_capacity: Amount,
    /// Largest channel capacity accepted.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "max_capacity_sat")]
    pub max_capacity: Amount,
    /// Unconfirmed (or under-confirmed) funding is accepted only up to this capacity.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "zero_conf_cap_sat")]
    pub zero_conf_cap: Amount,
    /// Confirmations needed for funding above the zero-conf cap.
    pub confirmations_required: u32,
    /// Expiry must be at least this many blocks above the tip at open.
    pub min_expiry_blocks: BlockCount,
    /// Expiry must be at most this many blocks above the tip at open.
    pub max_expiry_blocks: BlockCount,
    /// The gateway stops crediting (and closes) at `expiry - close_margin_blocks`.
    pub close_margin_blocks: BlockCount,
    /// Fee rate the gateway plans its close at, in sat per 1000 weight units.
    #[serde(rename = "close_fee_rate_sat_per_kwu")]
    pub close_fee_rate: FeeRate,
}

#[cfg(test)]
mod tests {
    use bitcoin::{absolute, Network};

    use super::*;
    use crate::pricing::{ByteCount, PriceMsatPerMib};
    use crate::wire::Terms;

    /// The terms JSON keeps its flat shape (docs/api.md): the limits' fields sit at
    /// the top level, with their units in their names.
    #[test]
    fn terms_json_is_flat_and_round_trips() {
        let terms = Terms {
            protocol_version: 1,
            network: Network::Regtest,
            price_msat_per_mib: PriceMsatPerMib::new(1000).unwrap(),
            chunk_bytes: ByteCount(1 << 20),
            limits: ChannelLimits {
                min_capacity: Amount::from_sat(10_000),
                max_capacity: Amount::from_sat(1_000_000),
                zero_conf_cap: Amount::from_sat(50_000),
                confirmations_required: 1,
                min_expiry_blocks: BlockCount(144),
                max_expiry_blocks: BlockCount(4032),
                close_margin_blocks: BlockCount(36),
                close_fee_rate: FeeRate::from_sat_per_kwu(500),
            },
            min_first_payment: Amount::from_sat(700),
            tip_height: absolute::Height::from_consensus(200).unwrap(),
            lightning: None,
        };
        let json = serde_json::to_value(&terms).unwrap();
        for (key, want) in [
            ("min_capacity_sat", 10_000),
            ("max_capacity_sat", 1_000_000),
            ("zero_conf_cap_sat", 50_000),
            ("confirmations_required", 1),
            ("min_expiry_blocks", 144),
            ("max_expiry_blocks", 4032),
            ("close_margin_blocks", 36),
            ("close_fee_rate_sat_per_kwu", 500),
            ("min_first_payment_sat", 700),
        ] {
            assert_eq!(json[key], want, "{key} in {json}");
        }
        assert!(json.get("limits").is_none(), "{json}");
        assert_eq!(serde_json::from_value::<Terms>(json).unwrap(), terms);
    }
}
