//! Map layouts and constants shared by `bitmesh-ebpf` and the loader.
//!
//! Layout rules: every type is `#[repr(C)]`, padding is an explicit zeroed field, and a
//! `const` assertion pins the size, so a change on one side that the other side does
//! not see fails to compile instead of corrupting a map.

/// Name of the credit map: [`MacKey`] -> `u64` total bytes credited. Userspace writes,
/// kernel reads.
pub const MAP_CREDIT: &str = "CREDIT";
/// Name of the usage map: [`MacKey`] -> [`Usage`]. Userspace creates entries, the
/// kernel only adds to them (atomically) and never inserts.
pub const MAP_USAGE: &str = "USAGE";
/// Name of the per-CPU stats array: index ([`stat_index`]) -> [`StatCounter`].
pub const MAP_STATS: &str = "STATS";

/// Name of the walled-garden budget map: [`MacKey`] -> [`GardenBuckets`]. An LRU hash
/// that the kernel inserts into (any MAC, paid or not); never `CREDIT`/`USAGE`.
pub const MAP_GARDEN: &str = "GARDEN";
/// Name of the bound-address map: [`MacKey`] -> [`BoundAddrs`]. Userspace writes the
/// binding when a client is metered; the kernel only counts violations in it.
pub const MAP_BOUND: &str = "BOUND";

/// Capacity of `CREDIT` and `USAGE` (clients metered at once per gateway).
pub const MAX_CLIENTS: u32 = 16_384;

/// Program names in the eBPF object (the function names).
pub const PROG_XDP_UPLOAD: &str = "bitmesh_xdp_upload";
/// TC ingress alternative to [`PROG_XDP_UPLOAD`] (keyed by source MAC).
pub const PROG_TC_UPLOAD: &str = "bitmesh_tc_upload";
/// TC egress download meter (keyed by destination MAC).
pub const PROG_TC_DOWNLOAD: &str = "bitmesh_tc_download";
/// An XDP program that only returns `XDP_PASS`: the baseline for benchmarks.
pub const PROG_XDP_EMPTY: &str = "bitmesh_xdp_empty";
/// A TC program that only returns `TC_ACT_OK`: the baseline for benchmarks.
pub const PROG_TC_EMPTY: &str = "bitmesh_tc_empty";

/// Load-time global: gateway IPv4 address, network byte order, as `[u8; 4]`.
pub const GLOBAL_GATEWAY_IPV4: &str = "GATEWAY_IPV4";
/// Load-time global: gateway IPv6 address, network byte order, as `[u8; 16]`.
pub const GLOBAL_GATEWAY_IPV6: &str = "GATEWAY_IPV6";
/// Load-time global: TCP port of the payment API on the gateway, host order `u16`.
pub const GLOBAL_PAYMENT_PORT: &str = "PAYMENT_PORT";
/// Load-time global: `1` if DNS (UDP/TCP 53) to and from the gateway is in the walled
/// garden, `0` otherwise (`u8`).
pub const GLOBAL_DNS_ALLOWED: &str = "DNS_ALLOWED";

/// Load-time global: the walled-garden budgets ([`GardenLimits`]).
pub const GLOBAL_GARDEN_LIMITS: &str = "GARDEN_LIMITS";

/// Capacity of `GARDEN` (LRU: the least recently seen MAC's buckets go first).
pub const GARDEN_ENTRIES: u32 = 16_384;

/// Ethertypes the parser understands.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// 802.1Q VLAN tag.
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad service VLAN tag (QinQ outer tag).
    pub const QINQ: u16 = 0x88A8;
    /// IPv6.
    pub const IPV6: u16 = 0x86DD;
    /// EAPOL (802.1X / WPA handshake).
    pub const EAPOL: u16 = 0x888E;
}

/// XDP return codes (`enum xdp_action`).
pub mod xdp_action {
    /// Drop the frame.
    pub const DROP: u32 = 1;
    /// Hand the frame to the stack.
    pub const PASS: u32 = 2;
}

/// TC return codes (`TC_ACT_*`; under tcx 0 is `TCX_PASS`, 2 is `TCX_DROP`).
pub mod tc_action {
    /// Let the frame through.
    pub const OK: i32 = 0;
    /// Drop the frame.
    pub const SHOT: i32 = 2;
}

/// A client MAC address as a map key: 6 address bytes and 2 explicit zero padding
/// bytes (the kernel hashes all 8 bytes, so padding must always be zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacKey {
    /// The address, in wire order.
    pub addr: [u8; 6],
    /// Always zero.
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<MacKey>() == 8);
const _: () = assert!(core::mem::align_of::<MacKey>() == 1);

impl MacKey {
    /// Key for a MAC address (padding zeroed).
    pub const fn new(addr: [u8; 6]) -> Self {
        Self { addr, _pad: [0; 2] }
    }
}

/// Per-client counters in `USAGE`. The kernel only ever adds to the counters and
/// stores `last_seen_ns`; userspace creates the entry (all zero) when a client is added.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// L2 bytes billed in the upload direction (client -> gateway).
    pub up_bytes: u64,
    /// L2 bytes billed in the download direction (gateway -> client).
    pub down_bytes: u64,
    /// Frames billed upload.
    pub up_pkts: u64,
    /// Frames billed download.
    pub down_pkts: u64,
    /// `CLOCK_BOOTTIME` in ns (`bpf_ktime_get_boot_ns`) of the last billed frame; 0 if never.
    pub last_seen_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Usage>() == 40);

impl Usage {
    /// Bytes billed in both directions: what is compared with the credit.
    pub const fn used_bytes(&self) -> u64 {
        self.up_bytes.saturating_add(self.down_bytes)
    }
}

/// Per-MAC walled-garden token buckets in `GARDEN`, as GCRA "theoretical arrival
/// times" (`bpf_ktime_get_ns` ns): a bucket is full when its time is <= now, and a
/// frame of `len` bytes pushes it `len * ns_per_byte` into the future (see
/// [`crate::kernel::garden`]). Zero (a new entry) is a full bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GardenBuckets {
    /// DNS and ICMP echo to/from the gateway.
    pub services_tat_ns: u64,
    /// The payment API port.
    pub payment_tat_ns: u64,
}

const _: () = assert!(core::mem::size_of::<GardenBuckets>() == 16);

/// One walled-garden budget: refill rate as ns per byte (0 = unlimited) and burst as
/// ns of refill (`burst_bytes * ns_per_byte`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketParams {
    /// Nanoseconds of refill one byte costs: `1e9 / bytes_per_second`; 0 disables the budget.
    pub ns_per_byte: u64,
    /// How far ahead of now a bucket may run: `burst_bytes * ns_per_byte`.
    pub burst_ns: u64,
}

impl BucketParams {
    /// A budget of `burst_bytes` refilled at `bytes_per_sec` (0 = unlimited).
    pub const fn new(bytes_per_sec: u64, burst_bytes: u64) -> Self {
        if bytes_per_sec == 0 {
            return Self { ns_per_byte: 0, burst_ns: 0 };
        }
        let ns_per_byte = 1_000_000_000 / bytes_per_sec;
        let ns_per_byte = if ns_per_byte == 0 { 1 } else { ns_per_byte };
        Self { ns_per_byte, burst_ns: burst_bytes.saturating_mul(ns_per_byte) }
    }
}

/// The walled-garden budgets (load-time global `GARDEN_LIMITS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GardenLimits {
    /// DNS and ICMP echo to/from the gateway, per MAC.
    pub services: BucketParams,
    /// The payment API port, per MAC.
    pub payment: BucketParams,
}

const _: () = assert!(core::mem::size_of::<GardenLimits>() == 32);

/// A metered client's bound addresses in `BOUND`, written by userspace when the
/// client is bound (channel funded, restart). The kernel reads the addresses and
/// `enforce`, and only adds to `wrong_source_frames` / stores `last_wrong_source`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoundAddrs {
    /// Bound IPv4 (network order); `0.0.0.0`: none, billable IPv4 is refused.
    pub ipv4: [u8; 4],
    /// Bound IPv6; `::`: none, billable IPv6 from a routable source is refused.
    pub ipv6: [u8; 16],
    /// 1: drop billable upload frames from another source (`DropWrongSource`);
    /// 0: count them only.
    pub enforce: u8,
    /// Always zero.
    pub _pad: [u8; 3],
    /// Billable upload frames from this MAC with another source address (kernel adds).
    pub wrong_source_frames: u64,
    /// The last such source: an IPv4 is stored as `::ffff:a.b.c.d`.
    pub last_wrong_source: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<BoundAddrs>() == 48);

/// One slot of the per-CPU stats array: frames and L2 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatCounter {
    /// Frames.
    pub packets: u64,
    /// L2 bytes.
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<StatCounter>() == 16);

/// Direction of a frame relative to the client.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client -> gateway (ingress on the client-facing interface), keyed by source MAC.
    Upload = 0,
    /// Gateway -> client (egress on the client-facing interface), keyed by destination MAC.
    Download = 1,
}

/// Number of verdict slots per direction in `STATS` (see [`stat_index`]).
pub const STATS_PER_DIRECTION: u32 = 9;
/// Number of entries in `STATS`.
pub const STATS_LEN: u32 = 2 * STATS_PER_DIRECTION;

/// Index in `STATS` of the counter for `verdict` in `direction`:
/// `direction * 9 + verdict` (upload 0..=8, download 9..=17).
pub const fn stat_index(direction: Direction, verdict: crate::kernel::Verdict) -> u32 {
    direction as u32 * STATS_PER_DIRECTION + verdict as u32
}

#[cfg(feature = "aya-pod")]
mod pod {
    // SAFETY: all of them are #[repr(C)], contain only integers/byte arrays, have explicit
    // padding fields (sizes asserted above), so every bit pattern is valid and there
    // are no uninitialised bytes.
    unsafe impl aya::Pod for super::MacKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Usage {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::StatCounter {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::GardenBuckets {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::BoundAddrs {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::BucketParams {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::GardenLimits {}
}
