//! The billing rule, as a pure function the kernel calls per frame.

use super::parse::FrameClass;

/// What the kernel does with a frame, and which stats slot counts it.
///
/// The discriminant is the slot in `STATS` within a direction (see
/// [`super::abi::stat_index`]); keep the values stable, they are ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Known client with budget left: pass and bill the frame to the client.
    PassPaid = 0,
    /// Walled-garden traffic: pass, count in stats, never bill.
    PassWalledGarden = 1,
    /// Broadcast/multicast destination at egress: pass, count globally.
    PassGroup = 2,
    /// Unknown MAC (no `CREDIT`/`USAGE` entry) and not walled garden: drop.
    DropUnpaid = 3,
    /// Known client whose budget does not cover this frame, not walled garden: drop.
    DropCreditExhausted = 4,
    /// Frame too short or inconsistent to classify: drop, whoever sent it.
    DropMalformed = 5,
    /// Walled-garden frame beyond the MAC's garden budget, and no credit to bill it
    /// to: drop.
    DropGardenBudget = 6,
    /// Billable upload frame from a bound MAC with another source address: drop.
    DropWrongSource = 7,
}

impl Verdict {
    /// All verdicts, in stats-slot order.
    pub const ALL: [Verdict; 8] = [
        Verdict::PassPaid,
        Verdict::PassWalledGarden,
        Verdict::PassGroup,
        Verdict::DropUnpaid,
        Verdict::DropCreditExhausted,
        Verdict::DropMalformed,
        Verdict::DropGardenBudget,
        Verdict::DropWrongSource,
    ];

    /// Whether the frame goes through.
    pub const fn passes(self) -> bool {
        matches!(
            self,
            Verdict::PassPaid | Verdict::PassWalledGarden | Verdict::PassGroup
        )
    }
}

/// A client's budget as the kernel sees it at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Total bytes credited (`CREDIT`).
    pub credited: u64,
    /// Bytes billed so far, both directions (`USAGE.up_bytes + USAGE.down_bytes`).
    pub used: u64,
}

/// What the per-client checks around the billing rule found (see [`super::garden`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gate {
    /// Nothing against the frame (or no check applies to it).
    Open,
    /// A walled-garden frame that does not fit the MAC's garden budget.
    GardenBudgetSpent,
    /// A billable upload frame whose source is not the address the MAC is bound
    /// with, and the binding is enforced.
    WrongSource,
}

/// Decide the fate of one frame.
///
/// * `class`: what the parser found ([`super::classify`]).
/// * `len`: the L2 length the hook sees, the amount billed.
/// * `client`: the budget of the MAC the frame is keyed by, `None` if the MAC is not
///   in both `CREDIT` and `USAGE` (an unknown MAC is an unpaid client).
/// * `gate`: the garden-budget / bound-source checks.
///
/// Walled-garden and group frames pass before the budget is consulted, so they are
/// never billed, for paid and unpaid clients alike, as long as a garden frame fits
/// the MAC's garden budget; beyond it a garden frame is billed like any other if the
/// client's credit covers it, else dropped (`DropGardenBudget`). A billable frame
/// passes only if `used + len <= credited`; an overflowing sum drops.
#[inline(always)]
pub fn verdict(class: FrameClass, len: u64, client: Option<Budget>, gate: Gate) -> Verdict {
    match class {
        FrameClass::Malformed => Verdict::DropMalformed,
        FrameClass::Group => Verdict::PassGroup,
        FrameClass::WalledGarden(_) => match gate {
            Gate::GardenBudgetSpent => match bill(len, client) {
                Verdict::PassPaid => Verdict::PassPaid,
                _ => Verdict::DropGardenBudget,
            },
            Gate::Open | Gate::WrongSource => Verdict::PassWalledGarden,
        },
        FrameClass::Billable => match gate {
            Gate::WrongSource => Verdict::DropWrongSource,
            Gate::Open | Gate::GardenBudgetSpent => bill(len, client),
        },
    }
}

#[inline(always)]
fn bill(len: u64, client: Option<Budget>) -> Verdict {
    match client {
        None => Verdict::DropUnpaid,
        Some(b) => match b.used.checked_add(len) {
            Some(total) if total <= b.credited => Verdict::PassPaid,
            _ => Verdict::DropCreditExhausted,
        },
    }
}

/// What one skb costs on the wire: `(bytes, frames)`.
///
/// * `len`: the L2 length the hook sees (`skb->len`, or the XDP buffer).
/// * `gso_segs`: segments of a GSO/GRO aggregate (`skb_shinfo->gso_segs`; 0 or 1 for
///   a plain frame).
/// * `header_len`: [`super::parse::segment_header_len`] of the frame.
///
/// An aggregate of `n` segments carries its headers once but goes on the wire as `n`
/// frames that each carry them, so it costs `len + (n - 1) * header_len`. Without a
/// known header length the aggregate is billed as `len` (never more than the wire).
#[inline(always)]
pub fn wire_cost(len: u64, gso_segs: u32, header_len: Option<usize>) -> (u64, u64) {
    match header_len {
        Some(h) if gso_segs > 1 => {
            let extra = (gso_segs as u64 - 1).saturating_mul(h as u64);
            (len.saturating_add(extra), gso_segs as u64)
        }
        _ => (len, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::parse::GardenKind;
    use std::format;

    fn budget(credited: u64, used: u64) -> Option<Budget> {
        Some(Budget { credited, used })
    }

    #[test]
    fn verdict_table() {
        let cases: &[(&str, FrameClass, u64, Option<Budget>, Verdict)] = &[
            ("unknown mac is dropped", FrameClass::Billable, 100, None, Verdict::DropUnpaid),
            ("exact fit passes", FrameClass::Billable, 100, budget(1000, 900), Verdict::PassPaid),
            ("one byte over drops", FrameClass::Billable, 101, budget(1000, 900), Verdict::DropCreditExhausted),
            ("zero credit drops", FrameClass::Billable, 60, budget(0, 0), Verdict::DropCreditExhausted),
            ("overspent (credit lowered by hand) drops", FrameClass::Billable, 1, budget(10, 20), Verdict::DropCreditExhausted),
            ("overflowing usage drops", FrameClass::Billable, 2, budget(u64::MAX, u64::MAX - 1), Verdict::DropCreditExhausted),
            ("max credit passes", FrameClass::Billable, 1500, budget(u64::MAX, 0), Verdict::PassPaid),
            ("garden passes unpaid", FrameClass::WalledGarden(GardenKind::Arp), 42, None, Verdict::PassWalledGarden),
            ("garden passes exhausted", FrameClass::WalledGarden(GardenKind::Dns), 80, budget(0, 0), Verdict::PassWalledGarden),
            ("garden never billed even when paid", FrameClass::WalledGarden(GardenKind::Dhcp), 300, budget(1000, 0), Verdict::PassWalledGarden),
            ("group passes unpaid", FrameClass::Group, 60, None, Verdict::PassGroup),
            ("malformed drops even when paid", FrameClass::Malformed, 10, budget(u64::MAX, 0), Verdict::DropMalformed),
        ];
        for (name, class, len, client, want) in cases {
            assert_eq!(verdict(*class, *len, *client, Gate::Open), *want, "{name}");
        }
    }

    /// (name, class, len, client, gate, expected verdict)
    type GateCase = (&'static str, FrameClass, u64, Option<Budget>, Gate, Verdict);

    #[test]
    fn gates() {
        let dns = FrameClass::WalledGarden(GardenKind::Dns);
        let cases: &[GateCase] = &[
            ("garden over budget, unpaid: dropped", dns, 100, None, Gate::GardenBudgetSpent, Verdict::DropGardenBudget),
            ("garden over budget, exhausted: dropped", dns, 100, budget(50, 0), Gate::GardenBudgetSpent, Verdict::DropGardenBudget),
            ("garden over budget, credit left: billed", dns, 100, budget(1000, 0), Gate::GardenBudgetSpent, Verdict::PassPaid),
            ("garden within budget: free", dns, 100, None, Gate::Open, Verdict::PassWalledGarden),
            ("wrong source, paid: dropped", FrameClass::Billable, 100, budget(1000, 0), Gate::WrongSource, Verdict::DropWrongSource),
            ("wrong source never applies to garden", dns, 100, None, Gate::WrongSource, Verdict::PassWalledGarden),
            ("group ignores gates", FrameClass::Group, 100, None, Gate::GardenBudgetSpent, Verdict::PassGroup),
            ("malformed stays malformed", FrameClass::Malformed, 100, budget(1000, 0), Gate::WrongSource, Verdict::DropMalformed),
        ];
        for (name, class, len, client, gate, want) in cases {
            assert_eq!(verdict(*class, *len, *client, *gate), *want, "{name}");
        }
    }

    #[test]
    fn aggregates_cost_their_segments_headers() {
        // 10 segments of a TCP stream with 66-byte headers, 1448-byte payload each.
        let len = 66 + 10 * 1448;
        assert_eq!(wire_cost(len, 10, Some(66)), (10 * (66 + 1448), 10));
        assert_eq!(wire_cost(100, 0, Some(66)), (100, 1), "plain frame");
        assert_eq!(wire_cost(100, 1, Some(66)), (100, 1), "one segment");
        assert_eq!(wire_cost(5000, 4, None), (5000, 1), "unknown headers: billed as seen");
    }

    #[test]
    fn only_pass_verdicts_pass() {
        for v in Verdict::ALL {
            let name = format!("{v:?}");
            assert_eq!(v.passes(), name.starts_with("Pass"), "{name}");
        }
    }
}
