//! Per-client limits beyond the billing rule, as pure functions the kernel calls:
//!
//! * the walled-garden budget: what a MAC may move through the free services of the
//!   gateway (DNS, ICMP echo, the payment API) before those frames are billed (a
//!   client with credit) or dropped (anyone else), so the garden cannot be used as a
//!   free tunnel (a resolver that answers anything carries a DNS tunnel);
//! * the bound source address: a metered MAC's billable upload frames must come from
//!   the address the client was bound with, so cloning a paying client's MAC is not
//!   enough to ride on its credit.

use super::abi::{BoundAddrs, BucketParams, GardenLimits};
use super::parse::{l3_source, FrameBytes, GardenKind, L3Source};

/// Which of a MAC's garden buckets a walled-garden frame draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GardenBucket {
    /// DNS and ICMP echo to/from the gateway.
    Services,
    /// The payment API port.
    Payment,
}

impl GardenKind {
    /// The bucket this kind of garden traffic draws from; `None` for the link-layer
    /// and address-configuration protocols (ARP, EAPOL, DHCP, ND, MLD), which the
    /// gateway answers itself and never forwards, so they carry nothing anywhere.
    #[inline(always)]
    pub const fn bucket(self) -> Option<GardenBucket> {
        match self {
            GardenKind::Dns | GardenKind::IcmpEcho => Some(GardenBucket::Services),
            GardenKind::Payment => Some(GardenBucket::Payment),
            GardenKind::Arp
            | GardenKind::Eapol
            | GardenKind::Dhcp
            | GardenKind::Icmpv6Nd
            | GardenKind::Dhcpv6
            | GardenKind::Mld => None,
        }
    }
}

impl GardenLimits {
    /// The parameters of `bucket`.
    #[inline(always)]
    pub const fn of(&self, bucket: GardenBucket) -> BucketParams {
        match bucket {
            GardenBucket::Services => self.services,
            GardenBucket::Payment => self.payment,
        }
    }
}

/// Largest frame cost [`gcra_take`] considers (anything larger never fits).
const MAX_FRAME_COST: u64 = 1 << 24;
/// Largest `ns_per_byte` [`gcra_take`] considers (slower budgets never let a byte through).
const MAX_NS_PER_BYTE: u64 = 1 << 32;

/// GCRA (the token bucket as a "theoretical arrival time"): may a frame costing `len`
/// bytes pass a bucket at `tat` at time `now`? `Some(new_tat)` if it fits, `None` if
/// the bucket is spent. A bucket whose time is in the past is full (idle time refills
/// it, never beyond the burst); a frame larger than the whole burst never fits. With
/// `ns_per_byte == 0` the budget is off and everything fits.
#[inline(always)]
pub fn gcra_take(tat: u64, now: u64, len: u64, p: BucketParams) -> Option<u64> {
    if p.ns_per_byte == 0 {
        return Some(tat);
    }
    // Bounded operands instead of an overflow-checked multiply (which lowers to a
    // 128-bit multiply that BPF does not have): no frame or aggregate comes near
    // 16 MiB, and 1 B/s is 1e9 ns per byte, so real values are far inside the bounds.
    if len > MAX_FRAME_COST || p.ns_per_byte > MAX_NS_PER_BYTE {
        return None;
    }
    let cost = len.wrapping_mul(p.ns_per_byte); // < 2^56: cannot wrap
    let start = if tat > now { tat } else { now };
    let new_tat = start.saturating_add(cost);
    if new_tat - now <= p.burst_ns {
        Some(new_tat)
    } else {
        None
    }
}

/// Whether a billable upload frame's source address is one the MAC is bound with:
/// IPv4 must be the bound IPv4; IPv6 the bound IPv6 or link-local (never routed
/// beyond the link, so it cannot ride on the credit to the internet); other
/// ethertypes are not routed by the gateway and are not judged. A MAC bound on one
/// family only gets nothing billable on the other (routed) family.
#[inline(always)]
pub fn source_is_bound<F: FrameBytes + ?Sized>(frame: &F, bound: &BoundAddrs) -> bool {
    match l3_source(frame) {
        L3Source::V4(src) => bound.ipv4 != [0; 4] && src == bound.ipv4,
        L3Source::V6(src) => {
            (src[0] == 0xfe && src[1] & 0xc0 == 0x80) || (bound.ipv6 != [0; 16] && src == bound.ipv6)
        }
        L3Source::NotIp => true,
        L3Source::Truncated => false,
    }
}

/// The source address of a frame as stored in `BoundAddrs::last_wrong_source`: IPv6
/// as is, IPv4 as `::ffff:a.b.c.d`, anything else zero.
#[inline(always)]
pub fn source_as_ipv6<F: FrameBytes + ?Sized>(frame: &F) -> [u8; 16] {
    match l3_source(frame) {
        L3Source::V4([a, b, c, d]) => [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
        L3Source::V6(src) => src,
        L3Source::NotIp | L3Source::Truncated => [0; 16],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::frames::Eth;
    use std::vec::Vec;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_new_bucket_passes_its_burst_then_only_its_rate() {
        // 1000 B/s, 10 KB burst: 1 ms per byte, 10 s of burst.
        let p = BucketParams::new(1000, 10_000);
        assert_eq!(p, BucketParams { ns_per_byte: MS, burst_ns: 10_000 * MS });
        let now = 5_000_000 * MS;
        let mut tat = 0;
        let mut passed = 0;
        for _ in 0..100 {
            if let Some(t) = gcra_take(tat, now, 500, p) {
                tat = t;
                passed += 1;
            }
        }
        assert_eq!(passed, 20, "exactly the 10 KB burst at one instant");
        // 1.5 s later: 1500 bytes refilled, three 500-byte frames.
        let later = now + 1500 * MS;
        let mut again = 0;
        for _ in 0..10 {
            if let Some(t) = gcra_take(tat, later, 500, p) {
                tat = t;
                again += 1;
            }
        }
        assert_eq!(again, 3);
    }

    #[test]
    fn idle_time_refills_no_more_than_the_burst() {
        let p = BucketParams::new(1000, 2_000);
        let mut tat = 0;
        let now = 1_000_000 * MS; // an hour of idle time is worth the burst, not more
        let mut passed = 0u64;
        while let Some(t) = gcra_take(tat, now, 100, p) {
            tat = t;
            passed += 100;
        }
        assert_eq!(passed, 2_000);
    }

    #[test]
    fn a_frame_larger_than_the_burst_never_fits_and_zero_rate_is_unlimited() {
        let p = BucketParams::new(1000, 1_000);
        assert_eq!(gcra_take(0, 10 * MS, 1_001, p), None);
        assert!(gcra_take(0, 10 * MS, 1_000, p).is_some());
        let off = BucketParams::new(0, 1);
        assert_eq!(gcra_take(7, 0, u64::MAX, off), Some(7));
        // Extreme values never wrap into "fits".
        let tight = BucketParams { ns_per_byte: u64::MAX, burst_ns: u64::MAX - 1 };
        assert_eq!(gcra_take(0, 0, 2, tight), None);
        let huge_burst = BucketParams { ns_per_byte: 1, burst_ns: u64::MAX };
        assert_eq!(gcra_take(0, 0, u64::MAX, huge_burst), None);
        assert_eq!(gcra_take(u64::MAX - 1, 0, 1 << 20, huge_burst), Some(u64::MAX));
    }

    #[test]
    fn only_forwardable_services_draw_from_a_bucket() {
        assert_eq!(GardenKind::Dns.bucket(), Some(GardenBucket::Services));
        assert_eq!(GardenKind::IcmpEcho.bucket(), Some(GardenBucket::Services));
        assert_eq!(GardenKind::Payment.bucket(), Some(GardenBucket::Payment));
        for k in [GardenKind::Arp, GardenKind::Eapol, GardenKind::Dhcp, GardenKind::Icmpv6Nd, GardenKind::Dhcpv6, GardenKind::Mld] {
            assert_eq!(k.bucket(), None, "{k:?}");
        }
    }

    #[test]
    fn bound_source_rules() {
        let e = Eth::new([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let cl4 = [10, 0, 0, 2];
        let cl6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let ll6 = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        let other6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
        let net4 = [93, 184, 216, 34];
        let v4_only = BoundAddrs { ipv4: cl4, enforce: 1, ..Default::default() };
        let v6_only = BoundAddrs { ipv6: cl6, enforce: 1, ..Default::default() };
        let cases: Vec<(&str, Vec<u8>, &BoundAddrs, bool)> = std::vec![
            ("bound ipv4", e.ipv4_udp(cl4, net4, 1, 2, 10), &v4_only, true),
            ("other ipv4", e.ipv4_udp([10, 0, 0, 99], net4, 1, 2, 10), &v4_only, false),
            ("ipv4 zero source", e.ipv4_udp([0; 4], net4, 1, 2, 10), &v4_only, false),
            ("ipv4 on a v6-bound mac", e.ipv4_udp(cl4, net4, 1, 2, 10), &v6_only, false),
            ("bound ipv6", e.ipv6_udp(cl6, other6, 1, 2, 10), &v6_only, true),
            ("other ipv6", e.ipv6_udp(other6, cl6, 1, 2, 10), &v6_only, false),
            ("routable ipv6 on a v4-bound mac", e.ipv6_udp(cl6, other6, 1, 2, 10), &v4_only, false),
            ("link-local ipv6 stays on the link", e.ipv6_udp(ll6, other6, 1, 2, 10), &v4_only, true),
            ("in 802.1q", e.clone().tagged(&[0x8100]).ipv4_udp([10, 0, 0, 99], net4, 1, 2, 10), &v4_only, false),
            ("not ip", e.raw(0x8863, &[0; 20]), &v4_only, true),
            ("cut ipv4", e.ipv4_udp(cl4, net4, 1, 2, 10)[..20].to_vec(), &v4_only, false),
        ];
        for (name, frame, bound, want) in cases {
            assert_eq!(source_is_bound(frame.as_slice(), bound), want, "{name}");
        }
        let f = e.ipv4_udp([10, 0, 0, 99], net4, 1, 2, 10);
        assert_eq!(source_as_ipv6(f.as_slice()), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 99]);
        assert_eq!(source_as_ipv6(e.ipv6_udp(other6, cl6, 1, 2, 0).as_slice()), other6);
    }
}
