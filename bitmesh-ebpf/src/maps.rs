//! Maps and load-time globals. Names and layouts come from `bitmesh_common::kernel`;
//! the maps are pinned by name under the loader's bpffs directory so counters and
//! credit survive a controller restart.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
    Global,
};
use bitmesh_common::kernel::{
    BoundAddrs, GardenBuckets, GardenLimits, GatewayConfig, MacKey, StatCounter, Usage, GARDEN_ENTRIES,
    MAX_CLIENTS, STATS_LEN,
};

/// MAC -> total bytes credited. Written only by userspace.
#[map]
pub static CREDIT: HashMap<MacKey, u64> = HashMap::pinned(MAX_CLIENTS, 0);

/// MAC -> usage counters. Entries created by userspace; the kernel only adds.
#[map]
pub static USAGE: HashMap<MacKey, Usage> = HashMap::pinned(MAX_CLIENTS, 0);

/// Per-CPU frames/bytes per (direction, verdict), see `stat_index`.
#[map]
pub static STATS: PerCpuArray<StatCounter> = PerCpuArray::pinned(STATS_LEN, 0);

/// MAC -> walled-garden buckets. LRU and inserted by the kernel for any MAC that
/// uses a budgeted garden service: a separate map, so CREDIT/USAGE stay userspace-made.
#[map]
pub static GARDEN: LruHashMap<MacKey, GardenBuckets> = LruHashMap::pinned(GARDEN_ENTRIES, 0);

/// MAC -> bound source addresses. Written by userspace; the kernel counts violations.
#[map]
pub static BOUND: HashMap<MacKey, BoundAddrs> = HashMap::pinned(MAX_CLIENTS, 0);

/// Walled-garden budgets (set by the loader; all zero disables them).
#[no_mangle]
static GARDEN_LIMITS: Global<GardenLimits> = Global::new(GardenLimits {
    services: bitmesh_common::kernel::BucketParams { ns_per_byte: 0, burst_ns: 0 },
    payment: bitmesh_common::kernel::BucketParams { ns_per_byte: 0, burst_ns: 0 },
});

/// Gateway IPv4, network order (set by the loader; 0.0.0.0 disables IPv4 rules).
#[no_mangle]
static GATEWAY_IPV4: Global<[u8; 4]> = Global::new([0; 4]);
/// Gateway IPv6, network order (set by the loader; :: disables IPv6 rules).
#[no_mangle]
static GATEWAY_IPV6: Global<[u8; 16]> = Global::new([0; 16]);
/// Payment API TCP port (0 disables the rule).
#[no_mangle]
static PAYMENT_PORT: Global<u16> = Global::new(0);
/// 1 if DNS to/from the gateway is in the walled garden.
#[no_mangle]
static DNS_ALLOWED: Global<u8> = Global::new(0);

/// The load-time configuration, read from read-only globals (constants to the verifier).
#[inline(always)]
pub fn gateway() -> GatewayConfig {
    GatewayConfig {
        ipv4: GATEWAY_IPV4.load(),
        ipv6: GATEWAY_IPV6.load(),
        payment_port: PAYMENT_PORT.load(),
        dns_allowed: DNS_ALLOWED.load() != 0,
    }
}

/// The walled-garden budgets (read-only global).
#[inline(always)]
pub fn garden_limits() -> GardenLimits {
    GARDEN_LIMITS.load()
}
