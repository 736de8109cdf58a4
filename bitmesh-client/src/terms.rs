//! The terms check: the gateway's offer against the user's limits. Pure.
//!
//! Nothing is paid or funded before [`check_terms`] accepts the offer; the agent
//! then also picks the channel's expiry and capacity from the overlap of the
//! gateway's window and the user's.

use bitcoin::{absolute, Amount, Network};
use bitmesh_common::pricing::{bytes_for_payment, ByteCount, PriceMsatPerMib, MIB, MSAT_PER_SAT};
use bitmesh_common::blocks::{BlockCount, HeightExt};
use bitmesh_common::wire::{Terms, PROTOCOL_VERSION};

/// Blocks added above the common minimum expiry (see [`check_terms`]).
pub const EXPIRY_SLACK_BLOCKS: BlockCount = BlockCount(3);

/// Default `--max-chunk-mib`: the most the agent pays ahead of use, in bytes,
/// whatever chunk the gateway asks for (the controller's default chunk is 4 MiB).
pub const DEFAULT_MAX_CHUNK: ByteCount = ByteCount::from_mib(16);

/// Default `--max-prepaid`: the most the agent pays ahead of what it received, in
/// sat (the first payment, the gateway's close fee + dust, is all prepaid; a few
/// hundred sat at ordinary fee rates).
pub const DEFAULT_MAX_PREPAID: Amount = Amount::from_sat(2_000);

/// What the user accepts (from `bitmesh pay` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimits {
    /// Highest acceptable price.
    pub max_price: PriceMsatPerMib,
    /// Chain the user's money is on.
    pub network: Network,
    /// The user's expiry window: the money may be locked at least this many blocks
    /// (the agent picks the shortest lock both sides accept)...
    pub min_expiry_blocks: BlockCount,
    /// ...and at most this many blocks.
    pub max_expiry_blocks: BlockCount,
    /// The most the user will pay in this session (`--max-spend`).
    pub max_spend: Amount,
    /// Channel capacity asked for (`--capacity`); `None` = enough for `max_spend`.
    pub capacity: Option<Amount>,
    /// Largest chunk paid ahead of use (`--max-chunk-mib`); a gateway asking for
    /// more gets this much ahead.
    pub max_chunk: ByteCount,
    /// Most paid ahead of the bytes received (`--max-prepaid`): bounds the chunk in
    /// money, and a first payment above it is refused.
    pub max_prepaid: Amount,
}

/// What the agent will open, once the terms are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptedTerms {
    /// Expiry height of the channel.
    pub expiry: absolute::Height,
    /// Value to fund the channel with.
    pub capacity: Amount,
    /// Effective spending cap (never above the capacity).
    pub max_spend: Amount,
    /// Bytes paid ahead of use: the gateway's chunk, capped by `max_chunk` and by
    /// what `max_prepaid` buys at the price.
    pub chunk: ByteCount,
}

/// Why the agent refuses a gateway's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TermsError {
    /// Protocol mismatch.
    #[error("gateway speaks protocol {found}, this agent speaks {PROTOCOL_VERSION}: update bitmesh")]
    Protocol {
        /// The gateway's version.
        found: u32,
    },
    /// Wrong chain.
    #[error("gateway is on {gateway}, you asked for {user}: pass --network {gateway} if that is intended")]
    Network {
        /// The gateway's chain.
        gateway: Network,
        /// The user's.
        user: Network,
    },
    /// Too expensive.
    #[error("gateway price {price} is above your limit {limit}: raise --max-price or find another gateway")]
    PriceAboveLimit {
        /// Offered price.
        price: PriceMsatPerMib,
        /// The user's limit.
        limit: PriceMsatPerMib,
    },
    /// No expiry both sides accept.
    #[error("gateway wants an expiry {gw_min}..={gw_max} blocks ahead, you accept {user_min}..={user_max}: widen --min-expiry-blocks/--max-expiry-blocks")]
    ExpiryWindow {
        /// Gateway minimum.
        gw_min: BlockCount,
        /// Gateway maximum.
        gw_max: BlockCount,
        /// User minimum.
        user_min: BlockCount,
        /// User maximum.
        user_max: BlockCount,
    },
    /// Capacity out of range.
    #[error("channel capacity {wanted} is outside the gateway's range {min}..={max}: pass --capacity inside it")]
    Capacity {
        /// Asked for.
        wanted: Amount,
        /// Gateway minimum.
        min: Amount,
        /// Gateway maximum.
        max: Amount,
    },
    /// The first payment alone exceeds the spending cap.
    #[error("the gateway's first payment {min_first} (its close fee + dust) is above your --max-spend {max_spend}: raise --max-spend")]
    FirstPaymentAboveCap {
        /// Gateway minimum first payment.
        min_first: Amount,
        /// The user's cap.
        max_spend: Amount,
    },
    /// The first payment alone is more than the user pays ahead.
    #[error("the gateway's first payment {min_first} (its close fee + dust, all paid ahead of use) is above your --max-prepaid {max_prepaid}: raise --max-prepaid if you accept that")]
    FirstPaymentAbovePrepaidCap {
        /// Gateway minimum first payment.
        min_first: Amount,
        /// The user's cap.
        max_prepaid: Amount,
    },
    /// The gateway's chunk is zero or the caps leave nothing to pay ahead.
    #[error("no chunk to pay ahead (gateway chunk {gateway}, --max-chunk-mib and --max-prepaid allow {allowed}): raise --max-prepaid")]
    NoChunk {
        /// The gateway's chunk.
        gateway: ByteCount,
        /// What the user's caps allow.
        allowed: ByteCount,
    },
}

/// Check `terms` against `user` and choose expiry and capacity.
pub fn check_terms(terms: &Terms, user: &UserLimits) -> Result<AcceptedTerms, TermsError> {
    if terms.protocol_version != PROTOCOL_VERSION {
        return Err(TermsError::Protocol { found: terms.protocol_version });
    }
    if terms.network != user.network {
        return Err(TermsError::Network { gateway: terms.network, user: user.network });
    }
    if terms.price_msat_per_mib > user.max_price {
        return Err(TermsError::PriceAboveLimit { price: terms.price_msat_per_mib, limit: user.max_price });
    }
    // The gateway closes `close_margin` blocks before expiry, so a lock shorter than
    // that margin would be useless; the gateway's own minimum already covers it.
    let lo = terms.limits.min_expiry_blocks.max(user.min_expiry_blocks);
    let hi = terms.limits.max_expiry_blocks.min(user.max_expiry_blocks);
    if lo > hi || lo == BlockCount::ZERO {
        return Err(TermsError::ExpiryWindow {
            gw_min: terms.limits.min_expiry_blocks,
            gw_max: terms.limits.max_expiry_blocks,
            user_min: user.min_expiry_blocks,
            user_max: user.max_expiry_blocks,
        });
    }
    // A few blocks of slack: the gateway re-checks the window when the funding
    // arrives, and the tip may move between terms, open and funding.
    let blocks = lo + hi.saturating_sub(lo).min(EXPIRY_SLACK_BLOCKS);
    let expiry = terms.tip_height.checked_plus(blocks).ok_or(TermsError::ExpiryWindow {
            gw_min: terms.limits.min_expiry_blocks,
            gw_max: terms.limits.max_expiry_blocks,
            user_min: user.min_expiry_blocks,
            user_max: user.max_expiry_blocks,
        })?;
    let capacity = match user.capacity {
        Some(c) => c,
        None => user.max_spend.max(terms.limits.min_capacity).min(terms.limits.max_capacity),
    };
    if capacity < terms.limits.min_capacity || capacity > terms.limits.max_capacity {
        return Err(TermsError::Capacity { wanted: capacity, min: terms.limits.min_capacity, max: terms.limits.max_capacity });
    }
    let max_spend = user.max_spend.min(capacity);
    if terms.min_first_payment > max_spend {
        return Err(TermsError::FirstPaymentAboveCap { min_first: terms.min_first_payment, max_spend });
    }
    if terms.min_first_payment > user.max_prepaid {
        return Err(TermsError::FirstPaymentAbovePrepaidCap { min_first: terms.min_first_payment, max_prepaid: user.max_prepaid });
    }
    // A gateway asking for a huge chunk would be paid that far ahead of use: the
    // agent pays at most its own caps ahead, and tops up more often instead.
    let allowed = user.max_chunk.min(bytes_for_payment(user.max_prepaid, terms.price_msat_per_mib));
    let chunk = terms.chunk_bytes.min(allowed);
    if chunk == ByteCount::ZERO {
        return Err(TermsError::NoChunk { gateway: terms.chunk_bytes, allowed });
    }
    Ok(AcceptedTerms { expiry, capacity, max_spend, chunk })
}

/// A price in satoshis per MiB as the user reads and types it ("2", "0.25").
pub fn format_sat_per_mib(price: PriceMsatPerMib) -> String {
    let msat = price.to_msat();
    let whole = msat / MSAT_PER_SAT;
    let frac = msat % MSAT_PER_SAT;
    if frac == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{:03}", frac).trim_end_matches('0').to_owned()
    }
}

/// Parse a price in satoshis per MiB with up to three decimals ("2", "0.25").
pub fn parse_sat_per_mib(s: &str) -> Result<PriceMsatPerMib, String> {
    let bad = || format!("{s:?} is not a price in sat/MiB (e.g. 2 or 0.25, at most 3 decimals, above 0)");
    let (whole, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    if frac.len() > 3 || (whole.is_empty() && frac.is_empty()) {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
    let frac_msat: u64 = if frac.is_empty() { 0 } else { format!("{frac:0<3}").parse().map_err(|_| bad())? };
    let msat = whole.checked_mul(MSAT_PER_SAT).and_then(|m| m.checked_add(frac_msat)).ok_or_else(bad)?;
    PriceMsatPerMib::new(msat).map_err(|_| bad())
}

/// The terms as the lines the user sees before deciding.
pub fn describe(terms: &Terms, accepted: &AcceptedTerms) -> Vec<String> {
    let price = terms.price_msat_per_mib;
    let per_1000 = bytes_for_payment(Amount::from_sat(1000), price).to_u64() as f64 / MIB as f64;
    let first_buys = bytes_for_payment(terms.min_first_payment, price).to_u64() as f64 / MIB as f64;
    let blocks = accepted.expiry.to_consensus_u32().saturating_sub(terms.tip_height.to_consensus_u32());
    vec![
        format!("price:          {} sat per MiB ({per_1000:.1} MiB per 1,000 sat)", format_sat_per_mib(price)),
        if accepted.chunk < terms.chunk_bytes {
            format!(
                "chunk:          {:.2} MiB pre-paid ahead of use (the gateway asks {:.2} MiB; capped by --max-chunk-mib/--max-prepaid)",
                accepted.chunk.to_u64() as f64 / MIB as f64,
                terms.chunk_bytes.to_u64() as f64 / MIB as f64
            )
        } else {
            format!("chunk:          {:.2} MiB pre-paid ahead of use", accepted.chunk.to_u64() as f64 / MIB as f64)
        },
        format!(
            "first payment:  at least {} sat (the gateway's close fee + dust; buys {first_buys:.1} MiB)",
            terms.min_first_payment.to_sat()
        ),
        format!(
            "channel:        {} sat (gateway accepts {}..={} sat), spend at most {} sat",
            accepted.capacity.to_sat(),
            terms.limits.min_capacity.to_sat(),
            terms.limits.max_capacity.to_sat(),
            accepted.max_spend.to_sat()
        ),
        format!(
            "expiry:         height {} ({blocks} blocks from tip {}); refund possible from height {}",
            accepted.expiry,
            terms.tip_height,
            accepted.expiry.to_consensus_u32().saturating_add(1)
        ),
        format!(
            "funding:        unconfirmed up to {} sat, else {} confirmation(s); network {}",
            terms.limits.zero_conf_cap.to_sat(),
            terms.limits.confirmations_required,
            terms.network
        ),
    ]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bitcoin::FeeRate;
    use bitmesh_common::pricing::ByteCount;
    use bitmesh_common::wire::ChannelLimits;

    pub(crate) fn terms() -> Terms {
        Terms {
            limits: ChannelLimits {
                min_capacity: Amount::from_sat(10_000),
                max_capacity: Amount::from_sat(1_000_000),
                zero_conf_cap: Amount::from_sat(100_000),
                confirmations_required: 1,
                min_expiry_blocks: BlockCount(20),
                max_expiry_blocks: BlockCount(2000),
                close_margin_blocks: BlockCount(6),
                close_fee_rate: FeeRate::from_sat_per_vb_u32(2),
            },
            protocol_version: PROTOCOL_VERSION,
            network: Network::Regtest,
            price_msat_per_mib: PriceMsatPerMib::from_sat_per_mib(2).unwrap(),
            chunk_bytes: ByteCount::from_mib(1),
            min_first_payment: Amount::from_sat(700),
            tip_height: absolute::Height::from_consensus(500).unwrap(),
            lightning: None,
        }
    }

    fn user() -> UserLimits {
        UserLimits {
            max_price: PriceMsatPerMib::from_sat_per_mib(5).unwrap(),
            network: Network::Regtest,
            min_expiry_blocks: BlockCount(10),
            max_expiry_blocks: BlockCount(144),
            max_spend: Amount::from_sat(50_000),
            capacity: None,
            max_chunk: DEFAULT_MAX_CHUNK,
            max_prepaid: DEFAULT_MAX_PREPAID,
        }
    }

    #[test]
    fn acceptable_terms_pick_the_shortest_common_expiry_and_a_capacity_for_the_cap() {
        let a = check_terms(&terms(), &user()).unwrap();
        assert_eq!(a.expiry.to_consensus_u32(), 523);
        assert_eq!(a.capacity, Amount::from_sat(50_000));
        assert_eq!(a.max_spend, Amount::from_sat(50_000));
    }

    type Row = (&'static str, Terms, UserLimits, fn(&TermsError) -> bool);

    #[test]
    fn refusals_table() {
        let t = terms();
        let u = user();
        let price = |sat| PriceMsatPerMib::from_sat_per_mib(sat).unwrap();
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("price above the limit", Terms { price_msat_per_mib: price(6), ..t.clone() }, u, |e| matches!(e, TermsError::PriceAboveLimit { .. })),
            ("other network", Terms { network: Network::Bitcoin, ..t.clone() }, u, |e| matches!(e, TermsError::Network { .. })),
            ("newer protocol", Terms { protocol_version: 99, ..t.clone() }, u, |e| matches!(e, TermsError::Protocol { found: 99 })),
            ("gateway wants a longer lock than the user accepts", Terms { limits: ChannelLimits { min_expiry_blocks: BlockCount(200), ..t.limits }, ..t.clone() }, u, |e| matches!(e, TermsError::ExpiryWindow { .. })),
            ("user wants a longer lock than the gateway allows", t.clone(), UserLimits { min_expiry_blocks: BlockCount(3000), max_expiry_blocks: BlockCount(4000), ..u }, |e| matches!(e, TermsError::ExpiryWindow { .. })),
            ("capacity above the gateway maximum", t.clone(), UserLimits { capacity: Some(Amount::from_sat(2_000_000)), ..u }, |e| matches!(e, TermsError::Capacity { .. })),
            ("first payment above the spending cap", t.clone(), UserLimits { max_spend: Amount::from_sat(500), ..u }, |e| matches!(e, TermsError::FirstPaymentAboveCap { .. })),
            ("first payment above the prepaid cap", Terms { min_first_payment: Amount::from_sat(20_000), ..t.clone() }, u, |e| matches!(e, TermsError::FirstPaymentAbovePrepaidCap { .. })),
            ("zero chunk", Terms { chunk_bytes: ByteCount::ZERO, ..t.clone() }, u, |e| matches!(e, TermsError::NoChunk { .. })),
        ];
        for (name, terms, user, expected) in rows {
            let got = check_terms(&terms, &user);
            assert!(matches!(&got, Err(e) if expected(e)), "{name}: {got:?}");
        }
    }

    #[test]
    fn a_huge_chunk_is_capped_by_max_chunk_and_by_what_max_prepaid_buys() {
        let t = Terms { chunk_bytes: ByteCount::from_mib(10_240), ..terms() };
        assert_eq!(check_terms(&t, &user()).unwrap().chunk, DEFAULT_MAX_CHUNK);
        // 2 sat/MiB: 20 sat buy 10 MiB, below the 16 MiB cap.
        let u = UserLimits { max_prepaid: Amount::from_sat(20), ..user() };
        let t = Terms { min_first_payment: Amount::from_sat(10), ..t };
        assert_eq!(check_terms(&t, &u).unwrap().chunk, ByteCount::from_mib(10));
        // A gateway chunk below the caps is kept.
        assert_eq!(check_terms(&terms(), &user()).unwrap().chunk, ByteCount::from_mib(1));
        let text = describe(&t, &check_terms(&t, &user()).unwrap()).join("\n");
        assert!(text.contains("capped by --max-chunk-mib"), "{text}");
    }

    #[test]
    fn price_at_exactly_the_limit_is_accepted() {
        let u = UserLimits { max_price: PriceMsatPerMib::from_sat_per_mib(2).unwrap(), ..user() };
        assert!(check_terms(&terms(), &u).is_ok());
    }

    #[test]
    fn prices_parse_and_print_in_sat_per_mib() {
        for (text, msat) in [("2", 2000), ("0.25", 250), (".5", 500), ("1.001", 1001), ("10.1", 10_100)] {
            let p = parse_sat_per_mib(text).unwrap();
            assert_eq!(p.to_msat(), msat, "{text}");
        }
        assert_eq!(format_sat_per_mib(PriceMsatPerMib::new(250).unwrap()), "0.25");
        assert_eq!(format_sat_per_mib(PriceMsatPerMib::new(3000).unwrap()), "3");
        for bad in ["", "0", "abc", "1.0001", "-1", "."] {
            assert!(parse_sat_per_mib(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn description_shows_price_both_ways_chunk_and_refund_height() {
        let t = terms();
        let a = check_terms(&t, &user()).unwrap();
        let text = describe(&t, &a).join("\n");
        assert!(text.contains("2 sat per MiB (500.0 MiB per 1,000 sat)"), "{text}");
        assert!(text.contains("1.00 MiB pre-paid"), "{text}");
        assert!(text.contains("refund possible from height 524"), "{text}");
    }
}
