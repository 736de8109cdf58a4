//! Apply the verdict: look up the client's budget only for billable frames, bill
//! with atomic adds, count every frame in the per-CPU stats.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use bitmesh_common::kernel::{
    classify, parse::client_mac, stat_index, verdict, Budget, Direction, FrameBytes, FrameClass,
    MacKey, Usage, Verdict,
};

use crate::maps::{gateway, CREDIT, STATS, USAGE};

/// Classify, decide, bill and count one frame (or aggregate) that costs `len`
/// bytes and `frames` frames on the wire.
#[inline(always)]
pub fn meter<F: FrameBytes>(frame: &F, direction: Direction, len: u64, frames: u64) -> Verdict {
    let class = classify(frame, direction, &gateway());
    let mut usage: *mut Usage = core::ptr::null_mut();
    let mut budget = None;
    if class == FrameClass::Billable {
        if let Some(mac) = client_mac(frame, direction) {
            let key = MacKey::new(mac);
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
    let v = verdict(class, len, budget);
    if v == Verdict::PassPaid && !usage.is_null() {
        bill(usage, direction, len, frames);
    }
    count(stat_index(direction, v), len, frames);
    v
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
