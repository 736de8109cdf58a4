//! The agent's own count of its traffic, the number the payment policy trusts.
//!
//! [`IfaceMeter`] reads `/sys/class/net/IFACE/statistics/{rx,tx}_{bytes,packets}` of
//! the interface that reaches the gateway. Both directions count, because the gateway
//! bills both (upload + download, docs/design.md section 3). The interface also counts
//! traffic the gateway does not bill (the payment API, DNS, DHCP, ARP) and, on a
//! shared interface, traffic of other programs to other hosts; both only make the
//! agent's count larger than the gateway's, i.e. they loosen the cap by what the
//! agent really sent or received, never beyond. Counters are sampled relative to a
//! baseline taken at start, so a restart of the agent continues from the count
//! stored in the state file.
//!
//! # Wire bytes, not interface bytes
//!
//! The gateway bills every frame as it is on the wire: a GSO/GRO aggregate is billed
//! as its segments, each with its own headers (docs/kernel-abi.md, "GSO and GRO").
//! An interface whose counters see aggregates (veth, virtio, TSO-counting drivers)
//! counts one header set per aggregate: 2-4 % under the bill on a bulk TCP transfer,
//! which would hold payment back on every long download. [`wire_estimate`] adds
//! back the headers the missing segments carry, from what the counters do say:
//!
//! ```text
//! payload  = bytes - packets * H          (H: headers of one segment)
//! excess   = max(0, ceil(payload / S) - packets)   (S: payload of a full segment)
//! wire     = bytes + excess * H + min(excess, packets) * H / 2
//! ```
//!
//! with H and S of TCP with timestamps (Linux's default): IPv4 H = 14+20+32 = 66,
//! S = MTU - 52; IPv6 H = 86, S = MTU - 72 (the IPv6 share is read from
//! `/proc/net/dev_snmp6/IFACE` when it exists). `excess` counts the segments hidden
//! in aggregates as if all were full; an aggregate's last segment is usually
//! partial (half a segment on average), hence half a header more per aggregate,
//! with at most one aggregate per packet and per excess segment. A driver that
//! counts every frame (most WiFi NICs) reports one packet per segment: `excess` is
//! zero and so is the allowance. Whatever the traffic, the allowance is at most
//! `1.5 * H / S` of the interface count (6.8 % at MTU 1500, IPv4; 4.6 % plus half a
//! header per aggregate for bulk transfers). The estimate is computed per direction
//! (an upload's ACKs would otherwise dilute a download's aggregates).

use std::path::PathBuf;

use bitmesh_common::pricing::ByteCount;

/// A source of "bytes this device exchanged through the gateway" (monotonic).
pub trait ByteMeter: Send {
    /// Bytes counted since the meter was created.
    fn bytes(&mut self) -> Result<ByteCount, ByteMeterError>;
}

/// The counters could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ByteMeterError {
    /// A counter file is missing or unreadable.
    #[error("cannot read {path}: {message}: pass --iface with the interface that reaches the gateway")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Ethernet header: every frame on the wire has one, IP-layer counters do not.
const ETH_HEADER: u64 = 14;
/// MTU assumed when the interface does not say (Ethernet's).
const DEFAULT_MTU: u64 = 1500;

/// Headers and payload of one full-size segment: TCP with timestamps (20 + 12
/// bytes), Linux's default, over IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentShape {
    /// L2 + L3 + L4 header bytes every segment repeats on the wire.
    pub header: u64,
    /// Payload bytes of a full segment.
    pub payload: u64,
}

impl SegmentShape {
    /// TCP/IPv4 with timestamps at `mtu`.
    pub fn ipv4(mtu: u64) -> SegmentShape {
        SegmentShape { header: ETH_HEADER + 20 + 32, payload: mtu.saturating_sub(52).max(1) }
    }

    /// TCP/IPv6 with timestamps at `mtu`.
    pub fn ipv6(mtu: u64) -> SegmentShape {
        SegmentShape { header: ETH_HEADER + 40 + 32, payload: mtu.saturating_sub(72).max(1) }
    }
}

/// One direction's counters over some interval: L2 bytes and packets (aggregates
/// count once) of the interface, and the IPv6 share of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Interface bytes (L2).
    pub bytes: u64,
    /// Interface packets.
    pub packets: u64,
    /// Of those, IPv6 bytes at the IP layer (no Ethernet header).
    pub ipv6_octets: u64,
    /// Of those, IPv6 packets.
    pub ipv6_packets: u64,
}

impl Counts {
    fn since(self, base: Counts) -> Counts {
        Counts {
            bytes: self.bytes.saturating_sub(base.bytes),
            packets: self.packets.saturating_sub(base.packets),
            ipv6_octets: self.ipv6_octets.saturating_sub(base.ipv6_octets),
            ipv6_packets: self.ipv6_packets.saturating_sub(base.ipv6_packets),
        }
    }
}

/// Wire bytes of `bytes` counted in `packets` aggregates of segments shaped `shape`
/// (the formula of the module docs).
pub fn wire_bytes(bytes: u64, packets: u64, shape: SegmentShape) -> u64 {
    let payload = bytes.saturating_sub(packets.saturating_mul(shape.header));
    let excess = payload.div_ceil(shape.payload).saturating_sub(packets);
    // Half a header per aggregate for its partial last segment; aggregates are at
    // most one per packet and one per excess segment.
    let partial = excess.min(packets).saturating_mul(shape.header) / 2;
    bytes.saturating_add(excess.saturating_mul(shape.header)).saturating_add(partial)
}

/// Wire bytes of one direction's counts at `mtu`: the IPv6 share with IPv6
/// segments, the rest with IPv4 segments.
pub fn wire_estimate(c: Counts, mtu: u64) -> u64 {
    let v6_packets = c.ipv6_packets.min(c.packets);
    let v6_bytes = c.ipv6_octets.saturating_add(v6_packets.saturating_mul(ETH_HEADER)).min(c.bytes);
    wire_bytes(c.bytes - v6_bytes, c.packets - v6_packets, SegmentShape::ipv4(mtu))
        .saturating_add(wire_bytes(v6_bytes, v6_packets, SegmentShape::ipv6(mtu)))
}

/// Interface counters, turned into the wire bytes the gateway bills.
#[derive(Debug)]
pub struct IfaceMeter {
    iface: String,
    mtu: u64,
    base: (Counts, Counts),
    last: u64,
}

impl IfaceMeter {
    /// Start counting on `iface` from now.
    pub fn new(iface: &str) -> Result<IfaceMeter, ByteMeterError> {
        let mut m = IfaceMeter { iface: iface.to_owned(), mtu: DEFAULT_MTU, base: Default::default(), last: 0 };
        m.mtu = m.read("mtu").unwrap_or(DEFAULT_MTU);
        m.base = m.raw()?;
        Ok(m)
    }

    /// The interface.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    fn read(&self, name: &str) -> Result<u64, ByteMeterError> {
        let path = PathBuf::from(format!("/sys/class/net/{}/{name}", self.iface));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ByteMeterError::Read { path: path.clone(), message: e.to_string() })?;
        text.trim().parse().map_err(|e: std::num::ParseIntError| ByteMeterError::Read { path, message: e.to_string() })
    }

    /// (rx, tx) counts now.
    fn raw(&self) -> Result<(Counts, Counts), ByteMeterError> {
        let v6 = ipv6_counters(&self.iface);
        let get = |key: &str| v6.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v);
        let rx = Counts {
            bytes: self.read("statistics/rx_bytes")?,
            packets: self.read("statistics/rx_packets")?,
            ipv6_octets: get("Ip6InOctets"),
            ipv6_packets: get("Ip6InReceives"),
        };
        let tx = Counts {
            bytes: self.read("statistics/tx_bytes")?,
            packets: self.read("statistics/tx_packets")?,
            ipv6_octets: get("Ip6OutOctets"),
            ipv6_packets: get("Ip6OutRequests"),
        };
        Ok((rx, tx))
    }
}

/// The interface's IPv6 counters (`/proc/net/dev_snmp6/IFACE`: `name value` lines);
/// empty when IPv6 is off or the file is missing: then all traffic is IPv4.
fn ipv6_counters(iface: &str) -> Vec<(String, u64)> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/net/dev_snmp6/{iface}")) else { return Vec::new() };
    parse_snmp6(&text)
}

fn parse_snmp6(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
        })
        .collect()
}

impl ByteMeter for IfaceMeter {
    fn bytes(&mut self) -> Result<ByteCount, ByteMeterError> {
        let (rx, tx) = self.raw()?;
        let now = wire_estimate(rx.since(self.base.0), self.mtu)
            .saturating_add(wire_estimate(tx.since(self.base.1), self.mtu));
        // The estimate can dip when small packets arrive (each takes a packet and
        // no segment), and counters restart when the interface is re-created: the
        // count only ever grows, so keep the highest value seen.
        self.last = self.last.max(now);
        Ok(ByteCount(self.last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_counters_start_at_zero_and_grow() {
        let Ok(mut m) = IfaceMeter::new("lo") else { return }; // no sysfs in this sandbox
        let a = m.bytes().unwrap();
        assert!(a.to_u64() < 1 << 30);
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.send_to(&[0u8; 1000], sock.local_addr().unwrap()).unwrap();
        let b = m.bytes().unwrap();
        assert!(b.to_u64() >= a.to_u64() + 2000, "{a} -> {b}");
    }

    const MTU: u64 = 1500;

    /// A TCP/IPv4 aggregate of `segs` full segments as an interface counts it.
    fn aggregate(segs: u64) -> u64 {
        segs * 1448 + 66
    }

    #[test]
    fn a_gso_download_is_counted_as_its_wire_frames() {
        // 1000 aggregates of 43 full segments and a half one: the gateway bills 44
        // frames each, 43 of 1514 bytes and one of 724 + 66.
        let c = Counts { bytes: 1000 * (aggregate(43) + 724), packets: 1000, ..Counts::default() };
        let bill = 1000 * (43 * 1514 + 724 + 66);
        assert_eq!(wire_estimate(c, MTU), bill);
        // The interface count alone is 4.3 % under the bill.
        assert!(c.bytes < bill * 96 / 100);
        // Aggregates of full segments only: at most half a header each over the bill.
        let c = Counts { bytes: 1000 * aggregate(44), packets: 1000, ..Counts::default() };
        let bill = 1000 * 44 * 1514;
        assert!((bill..=bill + 1000 * 33).contains(&wire_estimate(c, MTU)));
    }

    #[test]
    fn frames_counted_one_by_one_get_no_allowance() {
        // A NIC that counts each frame: full segments, pure ACKs, ARP.
        for (bytes, packets) in [(1514 * 500, 500), (66 * 300, 300), (42 * 10, 10), (0, 0)] {
            let c = Counts { bytes, packets, ..Counts::default() };
            assert_eq!(wire_estimate(c, MTU), bytes, "{bytes} bytes in {packets} frames");
        }
    }

    #[test]
    fn the_allowance_stays_within_one_and_a_half_headers_per_full_segment() {
        // Whatever the mix, at most H/S above the interface count: the cap on what a
        // gateway that over-reports can get beyond the agent's real traffic.
        for bytes in [0u64, 1, 1000, 65_226, 10 << 20, 1 << 33] {
            for packets in [0u64, 1, 2, 7, 100, 10_000] {
                for v6 in [0u64, bytes / 3, bytes] {
                    let c = Counts { bytes, packets, ipv6_octets: v6, ipv6_packets: packets / 2 };
                    let w = wire_estimate(c, MTU);
                    assert!(w >= bytes, "{c:?}");
                    // IPv6 segments are smaller and carry more header: its bound is the larger.
                    let bound = bytes + (bytes as u128 * 86 * 3 / (2 * 1428)) as u64 + 2 * 86;
                    assert!(w <= bound, "{c:?}: {w} > {bound}");
                }
            }
        }
    }

    #[test]
    fn ipv6_aggregates_are_counted_with_ipv6_headers() {
        // 100 aggregates of 9.5 segments of 1428 bytes: IP-layer octets exclude Ethernet.
        let agg = 9 * 1428 + 714 + 86;
        let c = Counts { bytes: 100 * agg, packets: 100, ipv6_octets: 100 * (agg - 14), ipv6_packets: 100 };
        assert_eq!(wire_estimate(c, MTU), 100 * (9 * (1428 + 86) + 714 + 86));
    }

    #[test]
    fn snmp6_lines_parse_into_counters() {
        let got = parse_snmp6("ifIndex \t1\nIp6InOctets                     \t128\nbogus\n");
        assert_eq!(got, vec![("ifIndex".to_owned(), 1), ("Ip6InOctets".to_owned(), 128)]);
    }

    #[test]
    fn a_missing_interface_says_to_pass_iface() {
        let e = IfaceMeter::new("bitmesh-nope0").unwrap_err();
        assert!(e.to_string().contains("--iface"));
    }
}
