//! The one pricing function: paid satoshis -> credited bytes.
//!
//! Gateway and client both call [`bytes_for_payment`] on the same inputs, so they
//! always agree on the byte budget a payment buys.
//!
//! Units and rounding (also in `docs/protocol.md`):
//!
//! * A price is [`PriceMsatPerMib`]: millisatoshis per mebibyte (1 MiB = 1,048,576
//!   bytes). Millisatoshis let an operator charge below one satoshi per MiB, and a
//!   `u64` of msat covers any sane price.
//! * `bytes = floor(paid_sat * 1000 * 1_048_576 / price_msat_per_mib)`, computed in
//!   `u128`, so it never overflows and never loses a byte to an intermediate rounding.
//!   The result rounds DOWN: the client is short at most one byte per payment total,
//!   never the gateway.
//! * The inverse, [`payment_for_bytes`], rounds UP, so that
//!   `bytes_for_payment(payment_for_bytes(b)) >= b` for every `b`: a client that pays
//!   what this function says always gets at least the bytes it asked for.
//! * Credit is always computed from the channel's cumulative paid total, never summed
//!   per increment, so rounding does not accumulate across updates.
//! * Results saturate at `u64::MAX` bytes / `Amount::MAX_MONEY`.

use bitcoin::Amount;
use serde::{Deserialize, Serialize};

/// Bytes in one mebibyte, the unit prices are quoted in.
pub const MIB: u64 = 1024 * 1024;
/// Millisatoshis in one satoshi.
pub const MSAT_PER_SAT: u64 = 1000;

/// A number of bytes (credited, used, remaining, chunk size).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ByteCount(pub u64);

impl ByteCount {
    /// No bytes.
    pub const ZERO: ByteCount = ByteCount(0);

    /// The count as a plain integer (for the kernel map, which stores `u64`).
    pub const fn to_u64(self) -> u64 {
        self.0
    }

    /// `self - other`, or zero when `other` is larger.
    pub const fn saturating_sub(self, other: ByteCount) -> ByteCount {
        ByteCount(self.0.saturating_sub(other.0))
    }

    /// `self + other`, saturating at `u64::MAX`.
    pub const fn saturating_add(self, other: ByteCount) -> ByteCount {
        ByteCount(self.0.saturating_add(other.0))
    }

    /// A whole number of mebibytes.
    pub const fn from_mib(mib: u64) -> ByteCount {
        ByteCount(mib.saturating_mul(MIB))
    }
}

impl core::fmt::Display for ByteCount {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} B", self.0)
    }
}

/// A price in millisatoshis per mebibyte. Never zero (see [`PriceMsatPerMib::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct PriceMsatPerMib(u64);

/// A price that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// Zero price would make every payment buy unlimited bytes.
    #[error("price must be above 0 msat/MiB: set a positive --price-msat-per-mib")]
    ZeroPrice,
}

impl PriceMsatPerMib {
    /// A price of `msat` millisatoshis per MiB; zero is rejected.
    pub const fn new(msat: u64) -> Result<Self, PricingError> {
        if msat == 0 {
            Err(PricingError::ZeroPrice)
        } else {
            Ok(PriceMsatPerMib(msat))
        }
    }

    /// A price of whole satoshis per MiB; zero is rejected.
    pub const fn from_sat_per_mib(sat: u64) -> Result<Self, PricingError> {
        Self::new(sat.saturating_mul(MSAT_PER_SAT))
    }

    /// The price in millisatoshis per MiB.
    pub const fn to_msat(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for PriceMsatPerMib {
    type Error = PricingError;
    fn try_from(msat: u64) -> Result<Self, Self::Error> {
        Self::new(msat)
    }
}

impl From<PriceMsatPerMib> for u64 {
    fn from(p: PriceMsatPerMib) -> u64 {
        p.0
    }
}

/// In sat per MiB, the one unit people read prices in, operator and client alike
/// (`2 sat/MiB`, `0.25 sat/MiB`; at most three decimals, trailing zeros dropped).
/// The exact integer for flags and the wire is [`PriceMsatPerMib::to_msat`].
impl core::fmt::Display for PriceMsatPerMib {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (whole, frac) = (self.0 / MSAT_PER_SAT, self.0 % MSAT_PER_SAT);
        match frac {
            0 => write!(f, "{whole} sat/MiB"),
            _ if frac % 100 == 0 => write!(f, "{whole}.{} sat/MiB", frac / 100),
            _ if frac % 10 == 0 => write!(f, "{whole}.{:02} sat/MiB", frac / 10),
            _ => write!(f, "{whole}.{frac:03} sat/MiB"),
        }
    }
}

/// Bytes credited for a cumulative payment of `paid` at `price` (rounded down).
pub fn bytes_for_payment(paid: Amount, price: PriceMsatPerMib) -> ByteCount {
    let num = u128::from(paid.to_sat()) * u128::from(MSAT_PER_SAT) * u128::from(MIB);
    let bytes = num / u128::from(price.0);
    ByteCount(u64::try_from(bytes).unwrap_or(u64::MAX))
}

/// The smallest payment that buys at least `bytes` at `price` (rounded up).
pub fn payment_for_bytes(bytes: ByteCount, price: PriceMsatPerMib) -> Amount {
    let msat = u128::from(bytes.0) * u128::from(price.0);
    let denom = u128::from(MSAT_PER_SAT) * u128::from(MIB);
    let sat = msat.div_ceil(denom);
    let sat = u64::try_from(sat)
        .unwrap_or(u64::MAX)
        .min(Amount::MAX_MONEY.to_sat());
    Amount::from_sat(sat)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a failed test should panic
mod tests {
    use super::*;

    #[test]
    fn prices_display_in_sat_per_mib() {
        for (msat, text) in [(1000, "1 sat/MiB"), (2500, "2.5 sat/MiB"), (250, "0.25 sat/MiB"), (1, "0.001 sat/MiB"), (1_000_000, "1000 sat/MiB")] {
            assert_eq!(price(msat).to_string(), text);
        }
    }

    fn price(msat: u64) -> PriceMsatPerMib {
        PriceMsatPerMib::new(msat).unwrap()
    }

    #[test]
    fn one_sat_per_mib_buys_one_mib_per_sat() {
        let p = PriceMsatPerMib::from_sat_per_mib(1).unwrap();
        assert_eq!(bytes_for_payment(Amount::from_sat(1), p), ByteCount(MIB));
        assert_eq!(
            bytes_for_payment(Amount::from_sat(250), p),
            ByteCount(250 * MIB)
        );
    }

    #[test]
    fn sub_satoshi_prices_are_exact() {
        // 250 msat/MiB: one satoshi buys 4 MiB.
        assert_eq!(
            bytes_for_payment(Amount::from_sat(1), price(250)),
            ByteCount(4 * MIB)
        );
    }

    #[test]
    fn credit_rounds_down_in_the_gateways_favour() {
        // 3 msat/MiB: 1 sat = 1000/3 MiB = 349525.33.. KiB -> floor of the byte count.
        let b = bytes_for_payment(Amount::from_sat(1), price(3));
        assert_eq!(b, ByteCount(1000 * MIB / 3));
        // 7 sat/MiB: 1 sat buys 149796.57 bytes -> 149796.
        let p = PriceMsatPerMib::from_sat_per_mib(7).unwrap();
        assert_eq!(
            bytes_for_payment(Amount::from_sat(1), p),
            ByteCount(149_796)
        );
    }

    #[test]
    fn payment_for_bytes_rounds_up_and_always_buys_enough() {
        let prices = [1, 3, 7, 999, 1000, 1001, 12_345, 1_000_000, u64::MAX / 2];
        let sizes = [0, 1, 41, 1500, MIB - 1, MIB, MIB + 1, 10 * MIB, 123_456_789];
        for &pm in &prices {
            for &s in &sizes {
                let p = price(pm);
                let pay = payment_for_bytes(ByteCount(s), p);
                if pay == Amount::MAX_MONEY {
                    continue; // clamped: more than all bitcoin, nothing to buy
                }
                assert!(
                    bytes_for_payment(pay, p) >= ByteCount(s),
                    "price {pm} size {s}"
                );
                if pay > Amount::ZERO {
                    // One satoshi less would not be enough: the payment is minimal.
                    let less = pay - Amount::from_sat(1);
                    assert!(
                        bytes_for_payment(less, p) < ByteCount(s),
                        "price {pm} size {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn huge_payments_do_not_overflow() {
        let b = bytes_for_payment(Amount::MAX_MONEY, price(1));
        assert_eq!(b, ByteCount(u64::MAX), "saturates instead of wrapping");
        let pay = payment_for_bytes(ByteCount(u64::MAX), price(u64::MAX));
        assert_eq!(pay, Amount::MAX_MONEY);
    }

    #[test]
    fn zero_price_is_rejected_also_on_the_wire() {
        assert_eq!(PriceMsatPerMib::new(0), Err(PricingError::ZeroPrice));
        assert!(serde_json::from_str::<PriceMsatPerMib>("0").is_err());
        assert_eq!(
            serde_json::from_str::<PriceMsatPerMib>("5").unwrap(),
            price(5)
        );
    }

    #[test]
    fn cumulative_credit_never_loses_bytes_to_rounding() {
        // Paying 1 sat at a time 1000 times credits the same as paying 1000 sat once,
        // because credit is computed from the cumulative total.
        let p = price(7);
        let total = Amount::from_sat(1000);
        assert_eq!(
            bytes_for_payment(total, p),
            ByteCount(1000 * 1000 * MIB / 7)
        );
    }
}
