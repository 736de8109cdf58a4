//! Typed access to the pinned maps: credit (only ever raised), usage (created here,
//! then only the kernel adds), per-CPU stats (summed here).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray};
use bitmesh_common::kernel::{
    stat_index, BoundAddrs, Direction, GardenBuckets, Mac, MacKey, StatCounter, Usage, Verdict,
    MAP_BOUND, MAP_CREDIT, MAP_GARDEN, MAP_STATS, MAP_USAGE, STATS_LEN,
};
use bitmesh_common::pricing::ByteCount;

use super::error::MeterError;

/// `BPF_NOEXIST`: insert only if the key is absent (never overwrite live usage).
const BPF_NOEXIST: u64 = 1;

/// One client's budget and counters, read from `CREDIT` and `USAGE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientUsage {
    /// The client.
    pub mac: Mac,
    /// Total bytes credited (0 if the client has usage but no credit entry).
    pub credited: ByteCount,
    /// The kernel's counters.
    pub usage: Usage,
}

impl ClientUsage {
    /// Bytes billed, both directions.
    pub fn used(&self) -> ByteCount {
        ByteCount(self.usage.used_bytes())
    }

    /// Bytes left before the kernel starts dropping (0 when overshot).
    pub fn remaining(&self) -> ByteCount {
        self.credited.saturating_sub(self.used())
    }

    /// Time since the kernel last billed a frame of this client, `None` if never
    /// (for the idle-timeout close). `last_seen_ns` is CLOCK_BOOTTIME, which keeps
    /// counting through suspend, like the kernel's `bpf_ktime_get_boot_ns`.
    pub fn idle_for(&self) -> Option<std::time::Duration> {
        if self.usage.last_seen_ns == 0 {
            return None;
        }
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `now` is a valid, writable timespec.
        if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) } != 0 {
            return None;
        }
        let now_ns = (now.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(now.tv_nsec as u64);
        Some(std::time::Duration::from_nanos(now_ns.saturating_sub(self.usage.last_seen_ns)))
    }
}

/// A client's bound source addresses and what the kernel saw against them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The client.
    pub mac: Mac,
    /// Bound IPv4, if any (without one, billable IPv4 from this MAC is refused).
    pub ipv4: Option<Ipv4Addr>,
    /// Bound IPv6, if any (without one, routable IPv6 from this MAC is refused).
    pub ipv6: Option<Ipv6Addr>,
    /// Whether other sources are dropped (else only counted).
    pub enforced: bool,
    /// Billable upload frames seen from this MAC with another source.
    pub wrong_source_frames: u64,
    /// The last such source.
    pub last_wrong_source: Option<IpAddr>,
}

impl Binding {
    fn from_value(mac: Mac, v: &BoundAddrs) -> Self {
        let last = Ipv6Addr::from(v.last_wrong_source);
        Binding {
            mac,
            ipv4: (v.ipv4 != [0; 4]).then(|| Ipv4Addr::from(v.ipv4)),
            ipv6: (v.ipv6 != [0; 16]).then(|| Ipv6Addr::from(v.ipv6)),
            enforced: v.enforce != 0,
            wrong_source_frames: v.wrong_source_frames,
            last_wrong_source: (v.wrong_source_frames > 0)
                .then(|| last.to_ipv4_mapped().map_or(IpAddr::V6(last), IpAddr::V4)),
        }
    }
}

/// Stats summed over all CPUs, per (direction, verdict).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeterStats {
    slots: Vec<StatCounter>,
}

impl MeterStats {
    /// Frames and bytes that got `verdict` in `direction`.
    pub fn get(&self, direction: Direction, verdict: Verdict) -> StatCounter {
        self.slots
            .get(stat_index(direction, verdict) as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Walled-garden frames/bytes, both directions (passed, never billed).
    pub fn walled_garden(&self) -> StatCounter {
        self.sum(Verdict::PassWalledGarden)
    }

    /// Broadcast/multicast frames/bytes passed at egress.
    pub fn group(&self) -> StatCounter {
        self.sum(Verdict::PassGroup)
    }

    /// Frames/bytes with `verdict`, both directions.
    pub fn sum(&self, verdict: Verdict) -> StatCounter {
        let (u, d) = (self.get(Direction::Upload, verdict), self.get(Direction::Download, verdict));
        StatCounter { packets: u.packets + d.packets, bytes: u.bytes + d.bytes }
    }
}

/// Handles on `CREDIT`, `USAGE`, `STATS`, `GARDEN` and `BOUND`.
///
/// One writer is assumed (the controller): `raise_credit` reads then writes.
pub struct MeterMaps {
    credit: HashMap<MapData, MacKey, u64>,
    usage: HashMap<MapData, MacKey, Usage>,
    stats: PerCpuArray<MapData, StatCounter>,
    garden: HashMap<MapData, MacKey, GardenBuckets>,
    bound: HashMap<MapData, MacKey, BoundAddrs>,
    enforce_bound_ip: bool,
}

fn map_err(operation: &'static str, map: &'static str) -> impl FnOnce(MapError) -> MeterError {
    move |source| MeterError::Map { operation, map, source: Box::new(source) }
}

impl MeterMaps {
    /// Wrap the maps taken from a freshly loaded object.
    pub(super) fn from_maps(credit: Map, usage: Map, stats: Map, garden: Map, bound: Map) -> Result<Self, MeterError> {
        Ok(Self {
            credit: HashMap::try_from(credit).map_err(map_err("open", MAP_CREDIT))?,
            usage: HashMap::try_from(usage).map_err(map_err("open", MAP_USAGE))?,
            stats: PerCpuArray::try_from(stats).map_err(map_err("open", MAP_STATS))?,
            garden: HashMap::try_from(garden).map_err(map_err("open", MAP_GARDEN))?,
            bound: HashMap::try_from(bound).map_err(map_err("open", MAP_BOUND))?,
            enforce_bound_ip: true,
        })
    }

    /// Whether bindings written from now on are enforced (`--enforce-bound-ip`).
    pub fn set_enforce_bound_ip(&mut self, enforce: bool) {
        self.enforce_bound_ip = enforce;
    }

    /// Open the maps pinned in `pin_dir` by a running (or crashed) controller, without
    /// loading programs: for the CLI, tests and diagnostics.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, MeterError> {
        let open = |name: &'static str| -> Result<Map, MeterError> {
            let data = MapData::from_pin(pin_dir.join(name)).map_err(|source| {
                if let Some(io) = super::error::root_io_error(&source) {
                    if let Some(e) = super::error::permission_error("opening pinned maps", io) {
                        return e;
                    }
                }
                MeterError::NotPinned { path: pin_dir.to_path_buf(), source: Box::new(source) }
            })?;
            Map::from_map_data(data).map_err(map_err("open", name))
        };
        Self::from_maps(open(MAP_CREDIT)?, open(MAP_USAGE)?, open(MAP_STATS)?, open(MAP_GARDEN)?, open(MAP_BOUND)?)
    }

    /// Start metering `mac`: create its zeroed `USAGE` entry and a zero credit, unless
    /// they exist (live counters are never overwritten). Idempotent.
    pub fn add_client(&mut self, mac: Mac) -> Result<(), MeterError> {
        self.restore_client(mac, Usage::default())
    }

    /// Like [`Self::add_client`] but seeds the counters, e.g. from the store after a
    /// reboot wiped the maps, so a client's spent budget is not handed out again.
    /// Existing entries are left untouched.
    pub fn restore_client(&mut self, mac: Mac, usage: Usage) -> Result<(), MeterError> {
        if mac.is_group() {
            return Err(MeterError::GroupMac { mac });
        }
        insert_absent(&mut self.usage, mac.key(), usage, MAP_USAGE)?;
        insert_absent(&mut self.credit, mac.key(), 0, MAP_CREDIT)?;
        Ok(())
    }

    /// Set the total bytes credited to `mac` to `total`. Credit only ever increases:
    /// a lower total is an error, an equal one a no-op, so replaying a payment after
    /// a crash never credits twice. The client must already be metered
    /// ([`Self::add_client`] / [`Self::restore_client`]): raising credit never creates
    /// entries, so credit cannot reappear for a device whose channel has ended.
    pub fn raise_credit(&mut self, mac: Mac, total: ByteCount) -> Result<ByteCount, MeterError> {
        let current = self.credit(mac)?.ok_or(MeterError::NotMetered { mac })?;
        if self.usage(mac)?.is_none() {
            return Err(MeterError::NotMetered { mac });
        }
        if total.0 < current.0 {
            return Err(MeterError::CreditDecrease { mac, current: current.0, requested: total.0 });
        }
        if total.0 > current.0 {
            self.credit.insert(mac.key(), total.0, 0).map_err(map_err("raise credit", MAP_CREDIT))?;
            tracing::debug!(%mac, credited = total.0, "credit raised");
        }
        Ok(total)
    }

    /// Set the total bytes credited to `mac` to exactly `total`, lower too: only the
    /// Lightning rail does this, when credit moves to another MAC or expires (see
    /// docs/design.md section 5.7). The client must already be metered.
    pub fn set_credit(&mut self, mac: Mac, total: ByteCount) -> Result<(), MeterError> {
        let current = self.credit(mac)?.ok_or(MeterError::NotMetered { mac })?;
        if self.usage(mac)?.is_none() {
            return Err(MeterError::NotMetered { mac });
        }
        if total.0 != current.0 {
            self.credit.insert(mac.key(), total.0, 0).map_err(map_err("set credit", MAP_CREDIT))?;
            tracing::debug!(%mac, credited = total.0, was = current.0, "credit set");
        }
        Ok(())
    }

    /// Bind `mac` to the source address `ip` (the one it opened its channel from):
    /// from now on its billable upload frames of that family must come from `ip`
    /// (enforced or only counted, per [`Self::set_enforce_bound_ip`]). The other
    /// family's bound address, if any, is kept. The violation counter is kept too,
    /// and a rebinding races only with that counter's kernel adds (an alert count,
    /// never money).
    pub fn bind_source(&mut self, mac: Mac, ip: IpAddr) -> Result<(), MeterError> {
        if mac.is_group() {
            return Err(MeterError::GroupMac { mac });
        }
        let mut value = match self.bound.get(&mac.key(), 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => BoundAddrs::default(),
            Err(e) => return Err(map_err("read binding", MAP_BOUND)(e)),
        };
        match ip {
            IpAddr::V4(v4) => value.ipv4 = v4.octets(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => value.ipv4 = v4.octets(),
                None => value.ipv6 = v6.octets(),
            },
        }
        value.enforce = u8::from(self.enforce_bound_ip);
        self.bound.insert(mac.key(), value, 0).map_err(map_err("bind source", MAP_BOUND))?;
        tracing::debug!(%mac, %ip, enforced = self.enforce_bound_ip, "client bound to its source address");
        Ok(())
    }

    /// The binding of `mac`, `None` if it has none.
    pub fn binding(&self, mac: Mac) -> Result<Option<Binding>, MeterError> {
        match self.bound.get(&mac.key(), 0) {
            Ok(v) => Ok(Some(Binding::from_value(mac, &v))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("read binding", MAP_BOUND)(e)),
        }
    }

    /// Every binding, sorted by MAC.
    pub fn bindings(&self) -> Result<Vec<Binding>, MeterError> {
        let mut out = Vec::new();
        for item in self.bound.iter() {
            let (key, value) = item.map_err(map_err("list bindings", MAP_BOUND))?;
            out.push(Binding::from_value(Mac::from(key), &value));
        }
        out.sort_by_key(|b| b.mac);
        Ok(out)
    }

    /// MACs with walled-garden buckets in the kernel's LRU map (diagnostics, tests).
    pub fn garden_macs(&self) -> Result<Vec<Mac>, MeterError> {
        let mut out = Vec::new();
        for key in self.garden.keys() {
            out.push(Mac::from(key.map_err(map_err("list garden", MAP_GARDEN))?));
        }
        out.sort();
        Ok(out)
    }

    /// Total bytes credited to `mac`, `None` if unknown.
    pub fn credit(&self, mac: Mac) -> Result<Option<ByteCount>, MeterError> {
        match self.credit.get(&mac.key(), 0) {
            Ok(v) => Ok(Some(ByteCount(v))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("read credit", MAP_CREDIT)(e)),
        }
    }

    /// Budget and counters of `mac`, `None` if the kernel does not meter it.
    pub fn usage(&self, mac: Mac) -> Result<Option<ClientUsage>, MeterError> {
        let usage = match self.usage.get(&mac.key(), 0) {
            Ok(u) => u,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(map_err("read usage", MAP_USAGE)(e)),
        };
        let credited = self.credit(mac)?.unwrap_or(ByteCount::ZERO);
        Ok(Some(ClientUsage { mac, credited, usage }))
    }

    /// Every metered client, sorted by MAC.
    pub fn all_usage(&self) -> Result<Vec<ClientUsage>, MeterError> {
        let mut out = Vec::new();
        for key in self.usage.keys() {
            let key = key.map_err(map_err("list clients", MAP_USAGE))?;
            // A client removed between listing and reading is simply skipped.
            if let Some(u) = self.usage(Mac::from(key))? {
                out.push(u);
            }
        }
        out.sort_by_key(|u| u.mac);
        Ok(out)
    }

    /// Stop metering `mac`: its traffic becomes unpaid (walled garden only). Returns
    /// the final counters. Credit goes first so no frame is billed after the read.
    pub fn remove_client(&mut self, mac: Mac) -> Result<Option<ClientUsage>, MeterError> {
        let credited = self.credit(mac)?.unwrap_or(ByteCount::ZERO);
        match self.credit.remove(&mac.key()) {
            Ok(()) => {}
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(map_err("remove credit", MAP_CREDIT)(e)),
        }
        let last = self.usage(mac)?.map(|u| ClientUsage { credited, ..u });
        match self.usage.remove(&mac.key()) {
            Ok(()) => {}
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(map_err("remove usage", MAP_USAGE)(e)),
        }
        // Unbound after: its frames are unpaid now whatever their source.
        match self.bound.remove(&mac.key()) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            // aya reports a missing key on delete as the raw ENOENT.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(map_err("remove binding", MAP_BOUND)(e)),
        }
        Ok(last)
    }

    /// The per-CPU stats, summed.
    pub fn stats(&self) -> Result<MeterStats, MeterError> {
        let mut slots = Vec::with_capacity(STATS_LEN as usize);
        for index in 0..STATS_LEN {
            let per_cpu = self.stats.get(&index, 0).map_err(map_err("read stats", MAP_STATS))?;
            let mut total = StatCounter::default();
            for c in per_cpu.iter() {
                total.packets = total.packets.wrapping_add(c.packets);
                total.bytes = total.bytes.wrapping_add(c.bytes);
            }
            slots.push(total);
        }
        Ok(MeterStats { slots })
    }
}

/// The key was not in the map: aya reports a delete of a missing key as the
/// syscall's ENOENT, not as `KeyNotFound` (which only lookups return).
fn is_absent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn insert_absent<V: aya::Pod>(
    map: &mut HashMap<MapData, MacKey, V>,
    key: MacKey,
    value: V,
    name: &'static str,
) -> Result<(), MeterError> {
    match map.insert(key, value, BPF_NOEXIST) {
        Ok(()) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(map_err("add client", name)(e)),
    }
}
