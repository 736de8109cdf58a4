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
pub const STATS_PER_DIRECTION: u32 = 8;
/// Number of entries in `STATS`.
pub const STATS_LEN: u32 = 2 * STATS_PER_DIRECTION;

/// Index in `STATS` of the counter for `verdict` in `direction`:
/// `direction * 8 + verdict` (upload 0..=5, download 8..=13).
pub const fn stat_index(direction: Direction, verdict: crate::kernel::Verdict) -> u32 {
    direction as u32 * STATS_PER_DIRECTION + verdict as u32
}

#[cfg(feature = "aya-pod")]
mod pod {
    // SAFETY: all three are #[repr(C)], contain only integers/byte arrays, have explicit
    // padding fields (sizes asserted above), so every bit pattern is valid and there
    // are no uninitialised bytes.
    unsafe impl aya::Pod for super::MacKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Usage {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::StatCounter {}
}
