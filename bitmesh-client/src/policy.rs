//! The payment policy: how much to sign next. Pure, so every rule is a table row.
//!
//! The rule of docs/design.md section 4 is "never sign a total above (bytes received,
//! priced) + one prepaid chunk". Here that is
//!
//! ```text
//! ceiling = payment_for_bytes(received + chunk, price)
//! ```
//!
//! with `received` the agent's OWN count of bytes it received, never the gateway's
//! claim. One exception, shown to the user with the terms before anything is paid:
//! the first payment must be at least the gateway's `min_first_payment` (close fee +
//! dust, so the gateway can always close), and may exceed the ceiling by that much.
//!
//! The gateway's count (`gateway_used`) decides WHEN to top up (the kernel enforces
//! on it), the agent's count decides HOW MUCH at most. A gateway that over-reports
//! usage therefore gets at most one chunk ahead of what the agent really received.

use bitcoin::Amount;
use bitmesh_common::pricing::{bytes_for_payment, payment_for_bytes, ByteCount, PriceMsatPerMib};

/// Fixed facts about the channel and the user's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyLimits {
    /// The channel's price.
    pub price: PriceMsatPerMib,
    /// How far ahead of use to pre-pay.
    pub chunk: ByteCount,
    /// Top up when the gateway's remaining budget falls below this (normally half a
    /// chunk, so each top-up buys about half a chunk and a TCP flow never stalls).
    pub low_water: ByteCount,
    /// The channel's capacity.
    pub capacity: Amount,
    /// The user's spending cap (`--max-spend`).
    pub max_spend: Amount,
    /// Smallest first payment the gateway accepts.
    pub min_first_payment: Amount,
    /// Dust limit of the client's change script: change is zero or at least this.
    pub change_dust: Amount,
}

/// What is known now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyState {
    /// Cumulative total signed so far (zero before the first payment).
    pub paid: Amount,
    /// Bytes the agent itself counted as received (and sent, when it meters both).
    pub received: ByteCount,
    /// Bytes the gateway says it metered.
    pub gateway_used: ByteCount,
}

/// Why nothing is signed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The gateway's remaining budget is above the low-water mark.
    Ahead,
    /// The gateway claims more usage than the agent received plus one chunk: paying
    /// more would pay for bytes the agent never got.
    Unearned,
    /// `--max-spend` is reached.
    SpendCap,
    /// The channel is fully paid.
    ChannelFull,
    /// The first payment must be at least `min_first_payment`, which the cap or the
    /// capacity does not allow.
    FirstPaymentNotAllowed,
}

/// The policy's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Sign this cumulative total. `limited` says what cut it below the wanted
    /// total (the gateway's usage + one chunk), if anything did.
    Sign {
        /// New cumulative total.
        total: Amount,
        /// The limit that applied, if the total is below what the gateway wants.
        limited: Option<Hold>,
    },
    /// Sign nothing now.
    Hold(Hold),
}

/// The most the agent may ever sign for `received` bytes: received + one chunk,
/// priced with the shared pricing function (plus the first-payment exception).
pub fn ceiling(limits: &PolicyLimits, received: ByteCount) -> Amount {
    payment_for_bytes(received.saturating_add(limits.chunk), limits.price).max(limits.min_first_payment)
}

/// How much to sign next.
pub fn next_payment(limits: &PolicyLimits, state: &PolicyState) -> Next {
    let credited = bytes_for_payment(state.paid, limits.price);
    let remaining = credited.saturating_sub(state.gateway_used);
    if state.paid > Amount::ZERO && remaining >= limits.low_water {
        return Next::Hold(Hold::Ahead);
    }
    // What the gateway needs to stay one chunk ahead of its own count.
    let mut want = payment_for_bytes(state.gateway_used.saturating_add(limits.chunk), limits.price);
    if state.paid == Amount::ZERO {
        want = want.max(limits.min_first_payment);
    }
    // Each bound, tightest first wins; remember which one bit.
    let bounds = [
        (ceiling(limits, state.received), Hold::Unearned),
        (limits.capacity, Hold::ChannelFull),
        (limits.max_spend, Hold::SpendCap),
    ];
    let mut total = want;
    let mut limited = None;
    for (bound, why) in bounds {
        if bound < total {
            total = bound;
            limited = Some(why);
        }
    }
    // Change must be zero or non-dust: round down to leave exactly the dust limit.
    if let Some(change) = limits.capacity.checked_sub(total) {
        if change > Amount::ZERO && change < limits.change_dust {
            total = limits.capacity.checked_sub(limits.change_dust).unwrap_or(Amount::ZERO);
            limited = limited.or(Some(Hold::ChannelFull));
        }
    }
    if state.paid == Amount::ZERO && total < limits.min_first_payment {
        return Next::Hold(Hold::FirstPaymentNotAllowed);
    }
    if total <= state.paid {
        return Next::Hold(limited.unwrap_or(Hold::Ahead));
    }
    Next::Sign { total, limited }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitmesh_common::pricing::MIB;

    const fn sat(n: u64) -> Amount {
        Amount::from_sat(n)
    }

    /// 1 sat per MiB, 10 MiB chunks, low water at 5 MiB, 1000 sat channel,
    /// spend cap 500, first payment at least 3 sat, dust 294.
    fn limits() -> PolicyLimits {
        PolicyLimits {
            price: PriceMsatPerMib::from_sat_per_mib(1).unwrap(),
            chunk: ByteCount::from_mib(10),
            low_water: ByteCount::from_mib(5),
            capacity: sat(1000),
            max_spend: sat(500),
            min_first_payment: sat(3),
            change_dust: sat(294),
        }
    }

    fn st(paid: u64, received_mib: u64, used_mib: u64) -> PolicyState {
        PolicyState {
            paid: sat(paid),
            received: ByteCount::from_mib(received_mib),
            gateway_used: ByteCount::from_mib(used_mib),
        }
    }

    #[test]
    fn policy_table() {
        let l = limits();
        let big_first = PolicyLimits { min_first_payment: sat(40), ..l };
        let tight_cap = PolicyLimits { max_spend: sat(2), ..l };
        let full = PolicyLimits { max_spend: sat(1000), ..l };
        let sign = |t: u64| Next::Sign { total: sat(t), limited: None };
        let capped = |t: u64, why| Next::Sign { total: sat(t), limited: Some(why) };
        #[rustfmt::skip]
        let rows: &[(&str, PolicyLimits, PolicyState, Next)] = &[
            ("first payment buys one chunk ahead",            l, st(0, 0, 0), sign(10)),
            ("first payment is at least the gateway minimum", big_first, st(0, 0, 0), sign(40)),
            ("no top-up while above the low-water mark",      l, st(10, 4, 4), Next::Hold(Hold::Ahead)),
            ("top-up at low water tops up to one chunk ahead", l, st(10, 6, 6), sign(16)),
            ("gateway counting a bit more than us is capped at our count", l, st(10, 5, 6), capped(15, Hold::Unearned)),
            ("over-reporting gateway gets received + chunk",  l, st(10, 2, 9), capped(12, Hold::Unearned)),
            ("over-reporting gateway at the ceiling gets nothing", l, st(12, 2, 12), Next::Hold(Hold::Unearned)),
            ("spend cap bounds the total",                    l, st(495, 494, 494), capped(500, Hold::SpendCap)),
            ("spend cap reached holds",                       l, st(500, 498, 498), Next::Hold(Hold::SpendCap)),
            ("first payment above the cap is refused",        PolicyLimits { max_spend: sat(2), ..big_first }, st(0, 0, 0), Next::Hold(Hold::FirstPaymentNotAllowed)),
            ("cap below the gateway minimum refuses the first payment",  tight_cap, st(0, 0, 0), Next::Hold(Hold::FirstPaymentNotAllowed)),
            ("change below dust rounds down to leave dust",   full, st(690, 700, 700), capped(706, Hold::ChannelFull)),
            ("fully paid channel holds",                      PolicyLimits { change_dust: sat(1), ..full }, st(1000, 1000, 1000), Next::Hold(Hold::ChannelFull)),
            ("capacity can be paid in full when earned",      PolicyLimits { change_dust: sat(1), ..full }, st(995, 995, 995), capped(1000, Hold::ChannelFull)),
        ];
        for (name, limits, state, expected) in rows {
            assert_eq!(next_payment(limits, state), *expected, "{name}");
        }
    }

    #[test]
    fn never_signs_above_received_plus_one_chunk_whatever_the_gateway_claims() {
        let l = limits();
        for received in [0, 1, MIB - 1, MIB, 7 * MIB + 3, 100 * MIB] {
            for claimed in [0, received, received * 2 + 1, received + 50 * MIB, 400 * MIB] {
                for paid in [0, 3, 10, 50] {
                    let s = PolicyState {
                        paid: sat(paid),
                        received: ByteCount(received),
                        gateway_used: ByteCount(claimed),
                    };
                    if let Next::Sign { total, .. } = next_payment(&l, &s) {
                        assert!(total > s.paid, "totals strictly increase");
                        assert!(
                            total <= ceiling(&l, ByteCount(received)),
                            "received {received} claimed {claimed} paid {paid} -> {total}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sub_satoshi_price_rounds_the_chunk_payment_up() {
        // 300 msat/MiB, 10 MiB chunk = 3 sat exactly; 11 MiB needs 3.3 -> 4 sat.
        let l = PolicyLimits { price: PriceMsatPerMib::new(300).unwrap(), min_first_payment: sat(1), ..limits() };
        assert_eq!(next_payment(&l, &st(0, 0, 0)), Next::Sign { total: sat(3), limited: None });
        assert_eq!(ceiling(&l, ByteCount::from_mib(1)), sat(4));
    }
}
