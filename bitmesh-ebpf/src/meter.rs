//! Apply the verdict: look up the client's budget only for billable frames (and
//! garden frames beyond the garden budget), check the garden budget and the bound
//! source, bill with atomic adds, count every frame in the per-CPU stats.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_ns};
use bitmesh_common::kernel::{
    classify, gcra_take, parse::client_mac, source_as_ipv6, source_is_bound, stat_index, verdict,
    Budget, Direction, FrameBytes, FrameClass, GardenBucket, GardenBuckets, Gate, MacKey, Usage,
    Verdict,
};

use crate::maps::{garden_limits, gateway, BOUND, CREDIT, GARDEN, STATS, USAGE};

/// `BPF_NOEXIST`: create the garden entry only if no other CPU just did.
const BPF_NOEXIST: u64 = 1;

/// Classify, decide, bill and count one frame (or aggregate) that costs `len`
/// bytes and `frames` frames on the wire. `portal_open`: whether this hook can carry
/// an unpaid client's portal frame (`bitmesh_common::kernel::portal_path_open`).
#[inline(always)]
pub fn meter<F: FrameBytes>(frame: &F, direction: Direction, len: u64, frames: u64, portal_open: bool) -> Verdict {
    let class = classify(frame, direction, &gateway());
    let mut gate = Gate::Open;
    let is_portal = matches!(class, FrameClass::Portal(_));
    let mut needs_budget = class == FrameClass::Billable || is_portal;
    let mac = client_mac(frame, direction).map(MacKey::new);
    if let (FrameClass::WalledGarden(kind), Some(key)) = (class, mac) {
        if let Some(bucket) = kind.bucket() {
            if !garden_take(key, bucket, len) {
                gate = Gate::GardenBudgetSpent;
                needs_budget = true;
            }
        }
    }
    if (class == FrameClass::Billable || is_portal) && direction == Direction::Upload {
        if let Some(key) = mac {
            if !source_allowed(frame, key) {
                needs_budget = false;
                // A portal frame from a wrong source is never billed to the MAC's
                // credit, but may still be answered by the portal like any unpaid one.
                if !is_portal {
                    gate = Gate::WrongSource;
                }
            }
        }
    }
    let mut usage: *mut Usage = core::ptr::null_mut();
    let mut budget = None;
    if needs_budget {
        if let Some(key) = mac {
            // SAFETY: the value is a plain u64 that the kernel never writes; a
            // concurrent userspace update replaces it atomically.
            let credited = unsafe { CREDIT.get(key) }.copied();
            if let (Some(credited), Some(u)) = (credited, USAGE.get_ptr_mut(key)) {
                usage = u;
                // SAFETY: `u` points at a live map value; reads race only with
                // other adders, which bounds overshoot to one frame per CPU.
                let used = unsafe { (*u).up_bytes.saturating_add((*u).down_bytes) };
                budget = Some(Budget { credited, used });
            }
        }
    }
    if is_portal && verdict(class, len, budget, Gate::Open) == Verdict::PassPortal {
        // Not covered by credit: carried only on an open path and within the MAC's
        // payment-port budget (the portal reaches only the controller, like the API).
        if !portal_open {
            gate = Gate::PortalClosed;
        } else if let Some(key) = mac {
            if !garden_take(key, GardenBucket::Payment, len) {
                gate = Gate::GardenBudgetSpent;
            }
        } else {
            gate = Gate::PortalClosed;
        }
    }
    let v = verdict(class, len, budget, gate);
    if v == Verdict::PassPaid && !usage.is_null() {
        bill(usage, direction, len, frames);
    }
    count(stat_index(direction, v), len, frames);
    v
}

/// Take `len` bytes from `key`'s garden `bucket`; false if it is spent. Creates the
/// MAC's entry (full buckets) in the LRU map on first use.
#[inline(always)]
fn garden_take(key: MacKey, bucket: GardenBucket, len: u64) -> bool {
    let params = garden_limits().of(bucket);
    if params.ns_per_byte == 0 {
        return true;
    }
    let entry = match GARDEN.get_ptr_mut(key) {
        Some(e) => e,
        None => {
            // Zero times are full buckets. EEXIST: another CPU created it first.
            let _ = GARDEN.insert(key, GardenBuckets::default(), BPF_NOEXIST);
            match GARDEN.get_ptr_mut(key) {
                Some(e) => e,
                // Cannot happen with an LRU map; fail closed (billed or dropped).
                None => return false,
            }
        }
    };
    // SAFETY: a helper without arguments or preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `entry` points at a live map value (8-byte aligned u64 fields) that
    // stays valid for this program run (RCU).
    unsafe {
        let tat = match bucket {
            GardenBucket::Services => &raw mut (*entry).services_tat_ns,
            GardenBucket::Payment => &raw mut (*entry).payment_tat_ns,
        };
        let old = core::ptr::read_volatile(tat);
        match gcra_take(old, now, len, params) {
            Some(new) => {
                if old >= now {
                    // A bucket in use: an atomic add, so concurrent CPUs lose nothing.
                    atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(tat, new - old);
                } else {
                    // An idle (full) bucket restarts from now; a racing CPU can
                    // overwrite at most one frame's cost here.
                    core::ptr::write_volatile(tat, new);
                }
                true
            }
            None => false,
        }
    }
}

/// Whether a billable upload frame may be billed to `key`: true unless the MAC is
/// bound, enforced, and the frame's source is not its bound address. Violations are
/// counted in the binding (enforced or not) for the controller's alert.
#[inline(always)]
fn source_allowed<F: FrameBytes>(frame: &F, key: MacKey) -> bool {
    let Some(bound) = BOUND.get_ptr_mut(key) else {
        return true;
    };
    // SAFETY: `bound` points at a live map value for this program run; userspace
    // replaces the addresses as a whole value.
    unsafe {
        if source_is_bound(frame, &*bound) {
            return true;
        }
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*bound).wrong_source_frames, 1);
        // Informational only (the alert names the source): a plain store.
        (*bound).last_wrong_source = source_as_ipv6(frame);
        (*bound).enforce == 0
    }
}

/// Add one frame to the client's usage. Atomic: two CPUs may meter one client.
#[inline(always)]
fn bill(usage: *mut Usage, direction: Direction, len: u64, frames: u64) {
    // SAFETY: `usage` is a non-null pointer to a map value (8-byte aligned u64
    // fields) that stays valid for this program run (RCU).
    unsafe {
        let (bytes, pkts) = match direction {
            Direction::Upload => (&raw mut (*usage).up_bytes, &raw mut (*usage).up_pkts),
            Direction::Download => (&raw mut (*usage).down_bytes, &raw mut (*usage).down_pkts),
        };
        // The returned values are unused, so LLVM emits BPF_XADD (no CPU v3 needed).
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(bytes, len);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(pkts, frames);
        // A single aligned 8-byte store: last writer wins, which is what "last seen" means.
        core::ptr::write_volatile(&raw mut (*usage).last_seen_ns, bpf_ktime_get_boot_ns());
    }
}

/// Count a frame in this CPU's stats slot (per-CPU, so plain adds are exact).
#[inline(always)]
fn count(index: u32, len: u64, frames: u64) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU value, only this program on this CPU touches it now.
        unsafe {
            (*slot).packets += frames;
            (*slot).bytes += len;
        }
    }
}
