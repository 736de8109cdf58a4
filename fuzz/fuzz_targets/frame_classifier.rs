//! The frame classifier and billing rule shared with the kernel
//! (`bitmesh_common::kernel`): never panic, and keep the billing invariants.
//!
//! Input: byte 0 picks the direction and the gateway configuration, bytes 1..17
//! the client's budget, the rest is the frame.

#![no_main]

use bitmesh_common::kernel::parse::ETH_HLEN;
use bitmesh_common::kernel::{classify, segment_header_len, verdict, wire_cost, Budget, Direction, FrameClass, Gate, GatewayConfig, Verdict, FULL_FRAME_BYTES};
use libfuzzer_sys::fuzz_target;

/// Gateway 10.0.0.1 / fd00::1 (or fe80::1), payment port 3141: the fuzzer finds the
/// walled-garden paths by matching these, as a real client would.
fn gateway(bits: u8) -> GatewayConfig {
    let mut ipv6 = [0u8; 16];
    if bits & 4 == 0 {
        ipv6[0] = 0xfd;
    } else {
        ipv6[0] = 0xfe;
        ipv6[1] = 0x80;
    }
    ipv6[15] = 1;
    GatewayConfig { ipv4: [10, 0, 0, 1], ipv6, payment_port: 3141, dns_allowed: bits & 2 != 0 }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    let Some((budget, frame)) = rest.split_at_checked(16) else { return };
    let direction = if control & 1 == 0 { Direction::Upload } else { Direction::Download };
    let gw = gateway(control);
    let credited = u64::from_le_bytes(budget[..8].try_into().unwrap_or_default());
    let used = u64::from_le_bytes(budget[8..].try_into().unwrap_or_default());
    let client = (control & 8 == 0).then_some(Budget { credited, used });

    let class = classify(frame, direction, &gw);
    let len = frame.len() as u64;

    // Too short for an Ethernet header: never anything but malformed.
    if frame.len() < ETH_HLEN {
        assert_eq!(class, FrameClass::Malformed, "{} bytes classified {class:?}", frame.len());
    }
    // A truncated frame is never billed as paid: every prefix of the frame is either
    // malformed or classified exactly as the whole frame (the parser never decides
    // on bytes it did not see).
    for cut in 0..frame.len() {
        let part = classify(&frame[..cut], direction, &gw);
        assert!(
            part == FrameClass::Malformed || part == class,
            "prefix of {cut}/{} bytes is {part:?}, the whole frame {class:?}",
            frame.len()
        );
    }

    // The billing rule, under each outcome of the per-MAC checks (garden budget,
    // bound source address).
    let gate = match (control >> 4) % 4 {
        0 => Gate::Open,
        1 => Gate::GardenBudgetSpent,
        2 => Gate::WrongSource,
        _ => Gate::PortalClosed,
    };
    let v = verdict(class, len, client, gate);
    if matches!(class, FrameClass::Billable | FrameClass::Portal(_)) && gate == Gate::WrongSource {
        assert_eq!(v, Verdict::DropWrongSource, "a frame from another address passed as the bound client");
    }
    match v {
        Verdict::PassPaid => {
            let b = client.expect("PassPaid without a budget");
            // Garden frames beyond the garden budget are billed like any other, and a
            // paid client's HTTP(S) is billed and left alone; nothing from another
            // address than the MAC's bound one is billed to it.
            assert_ne!(gate, Gate::WrongSource, "{class:?} from a wrong source billed to the MAC");
            assert!(
                class == FrameClass::Billable
                    || matches!(class, FrameClass::Portal(_))
                    || (matches!(class, FrameClass::WalledGarden(_)) && gate == Gate::GardenBudgetSpent),
                "{class:?} under {gate:?} billed as paid"
            );
            assert!(b.used.checked_add(len).is_some_and(|t| t <= b.credited), "paid past the credit: {b:?} + {len}");
            // HTTP(S) is billed only with a full frame of credit to spare: with less
            // the device is captive, and its browser goes to the portal.
            if matches!(class, FrameClass::Portal(_)) {
                let need = len.max(FULL_FRAME_BYTES);
                assert!(b.used.checked_add(need).is_some_and(|t| t <= b.credited), "portal frame billed on crumbs: {b:?} + {len}");
            }
        }
        Verdict::DropMalformed => assert_eq!(class, FrameClass::Malformed),
        Verdict::DropUnpaid => assert!(client.is_none()),
        // Carried for the portal only on an open path, and only what the credit does
        // not cover with a full frame to spare (less is captive).
        Verdict::PassPortal => {
            assert!(matches!(class, FrameClass::Portal(_)) && gate == Gate::Open, "{class:?} under {gate:?} passed for the portal");
            let need = len.max(FULL_FRAME_BYTES);
            assert!(
                client.is_none_or(|b| b.used.checked_add(need).is_none_or(|t| t > b.credited)),
                "a frame the credit covers went to the portal unbilled: {client:?} + {len}"
            );
        }
        _ => {}
    }
    if class == FrameClass::Malformed {
        assert!(!v.passes(), "a malformed frame passed");
    }

    // GSO billing: headers repeated per segment are inside the frame, so an
    // aggregate is never billed for header bytes it does not have.
    let header = segment_header_len(frame);
    if let Some(h) = header {
        assert!(h <= frame.len(), "segment header {h} longer than the {}-byte frame", frame.len());
    }
    let segs = u32::from(budget[0]);
    let (bytes, frames) = wire_cost(len, segs, header);
    assert!(bytes >= len && frames >= 1);
});
