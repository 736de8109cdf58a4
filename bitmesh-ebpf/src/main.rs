//! BitMesh kernel fast path: meter every frame of the client-facing interface per
//! client MAC, and drop what an unpaid client sends or receives outside the walled
//! garden.
//!
//! The decisions live in `bitmesh_common::kernel` (host-tested): [`classify`] reads the
//! frame through [`Packet`], [`verdict`] applies the billing rule. This file only wires
//! them to the hooks, looks up the maps and applies the result with atomic adds.
#![no_std]
// BPF has no 64-bit fetch-add for core::sync::atomic on this target; the intrinsic
// lowers to BPF_XADD when its result is unused.
#![allow(internal_features)]
#![feature(core_intrinsics)]
#![no_main]

mod maps;
mod meter;
mod packet;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use bitmesh_common::kernel::{portal_path_open, segment_header_len, wire_cost, Direction, Verdict, PORTAL_MARK};

use crate::packet::Packet;

/// Upload meter on XDP (native or generic), keyed by source MAC.
#[xdp]
pub fn bitmesh_xdp_upload(ctx: XdpContext) -> u32 {
    let frame = Packet::new(ctx.data(), ctx.data_end());
    // Without the frags flag the driver gives the whole frame linearly, so the
    // buffer length is the L2 length.
    let len = frame.len() as u64;
    // XDP has no skb to mark: an unpaid client's portal frames are dropped here.
    if meter::meter(&frame, Direction::Upload, len, 1, false).passes() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// Upload meter on TC ingress (tcx or clsact), keyed by source MAC.
#[classifier]
pub fn bitmesh_tc_upload(ctx: TcContext) -> i32 {
    tc_meter(ctx, Direction::Upload)
}

/// Download meter on TC egress (tcx or clsact), keyed by destination MAC.
#[classifier]
pub fn bitmesh_tc_download(ctx: TcContext) -> i32 {
    tc_meter(ctx, Direction::Download)
}

/// Baseline for benchmarks: the cost of running any XDP program at all.
#[xdp]
pub fn bitmesh_xdp_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Baseline for benchmarks: the cost of running any TC program at all.
#[classifier]
pub fn bitmesh_tc_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Headers the classifier may read: Ethernet + 2 VLAN tags + IPv6 + one hop-by-hop
/// header of typical size + L4 ports. Pulled into the linear area when the skb
/// keeps them in fragments.
const PARSE_DEPTH: u32 = 128;

#[inline(always)]
fn tc_meter(ctx: TcContext, direction: Direction) -> i32 {
    // skb->len is the L2 length at both TC hooks (the MAC header is included); for a
    // GSO/GRO aggregate it counts the headers once (see docs/kernel-abi.md).
    let len = ctx.len();
    let want = if len < PARSE_DEPTH { len } else { PARSE_DEPTH };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // Best effort: if the pull fails the parser sees a short frame and the
        // verdict is "malformed" (drop), never "paid".
        let _ = ctx.pull_data(want);
    }
    let frame = Packet::new(ctx.data(), ctx.data_end());
    // A GSO/GRO aggregate is billed as the segments it stands for on the wire.
    // SAFETY: `skb` is the context pointer the kernel passed; gso_segs is a
    // readable __sk_buff field for TC programs.
    let gso_segs = unsafe { (*ctx.skb.skb).gso_segs };
    let header_len = if gso_segs > 1 { segment_header_len(&frame) } else { None };
    let (cost, frames) = wire_cost(len as u64, gso_segs, header_len);
    // SAFETY: as above; ingress_ifindex is readable at both TC hooks. It is 0 for a
    // packet the gateway's own stack generated (its listener, its resets).
    let generated_locally = unsafe { (*ctx.skb.skb).ingress_ifindex } == 0;
    let verdict = meter::meter(&frame, direction, cost, frames, portal_path_open(direction, true, generated_locally));
    if verdict == Verdict::PassPortal && direction == Direction::Upload {
        // The controller's nftables table redirects (80) or resets (443) what
        // carries this mark, and drops anything else it would forward.
        ctx.set_mark(PORTAL_MARK);
    }
    if verdict.passes() {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects code that could panic.
    loop {}
}
