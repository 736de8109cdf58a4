//! Crafted Ethernet frames for tests and benchmarks: one builder, so host tests,
//! kernel tests and the benchmark feed the parser exactly the same bytes.
//!
//! Checksums are left zero: the meter never reads them.

use std::vec;
use std::vec::Vec;

use super::abi::ethertype;

/// IP protocol numbers used by the builders.
pub mod proto {
    /// IPv6 hop-by-hop options.
    pub const HOPOPTS: u8 = 0;
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Ethernet framing: addresses and the VLAN tags (TPIDs, outermost first) to insert.
#[derive(Clone, Debug)]
pub struct Eth {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// TPIDs of VLAN tags to insert (0x88A8, 0x8100), outermost first; VLAN id 7.
    pub vlans: Vec<u16>,
}

impl Eth {
    /// Untagged framing from `src` to `dst`.
    pub fn new(src: [u8; 6], dst: [u8; 6]) -> Self {
        Self { dst, src, vlans: Vec::new() }
    }

    /// The same framing with VLAN tags inserted.
    pub fn tagged(mut self, tpids: &[u16]) -> Self {
        self.vlans = tpids.to_vec();
        self
    }

    /// An Ethernet frame with `ethertype` and `payload` (no padding to 60 bytes, so
    /// lengths in tests are exactly header + payload).
    pub fn raw(&self, ether_type: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(22 + payload.len());
        f.extend_from_slice(&self.dst);
        f.extend_from_slice(&self.src);
        for tpid in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&7u16.to_be_bytes());
        }
        f.extend_from_slice(&ether_type.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An ARP request (28-byte body).
    pub fn arp(&self) -> Vec<u8> {
        let mut body = vec![0, 1, 8, 0, 6, 4, 0, 1];
        body.extend_from_slice(&self.src);
        body.extend_from_slice(&[10, 0, 0, 2]);
        body.extend_from_slice(&[0; 6]);
        body.extend_from_slice(&[10, 0, 0, 1]);
        self.raw(ethertype::ARP, &body)
    }

    /// An EAPOL-Key frame header (4 bytes + 95 bytes of key descriptor).
    pub fn eapol(&self) -> Vec<u8> {
        let mut body = vec![2, 3, 0, 95];
        body.resize(4 + 95, 0);
        self.raw(ethertype::EAPOL, &body)
    }

    /// IPv4 TCP segment with the given flags byte (see [`tcp_flags`]).
    pub fn ipv4_tcp_flags(&self, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        self.ipv4(src, dst, proto::TCP, &tcp_flags(sport, dport, flags))
    }

    /// IPv4 packet (IHL 5, TTL 64, DF clear) carrying `l4`.
    pub fn ipv4(&self, src: [u8; 4], dst: [u8; 4], protocol: u8, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 1, 0, 0, 64, protocol, 0, 0]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(l4);
        self.raw(ethertype::IPV4, &ip)
    }

    /// IPv4 UDP datagram with `payload_len` zero bytes: 42 + `payload_len` bytes untagged.
    pub fn ipv4_udp(&self, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
        self.ipv4(src, dst, proto::UDP, &udp(sport, dport, payload_len))
    }

    /// IPv4 TCP segment (20-byte header, SYN, no payload).
    pub fn ipv4_tcp(&self, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        self.ipv4(src, dst, proto::TCP, &tcp(sport, dport))
    }

    /// IPv4 ICMP message of `icmp_type` (8 = echo request, 0 = echo reply).
    pub fn ipv4_icmp(&self, src: [u8; 4], dst: [u8; 4], icmp_type: u8) -> Vec<u8> {
        self.ipv4(src, dst, proto::ICMP, &[icmp_type, 0, 0, 0, 0, 1, 0, 1])
    }

    /// IPv6 packet with `next` header and `hop_limit` carrying `payload`.
    pub fn ipv6(&self, src: [u8; 16], dst: [u8; 16], next: u8, hop_limit: u8, payload: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        ip.push(next);
        ip.push(hop_limit);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(payload);
        self.raw(ethertype::IPV6, &ip)
    }

    /// IPv6 UDP datagram with `payload_len` zero bytes (hop limit 64).
    pub fn ipv6_udp(&self, src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
        self.ipv6(src, dst, proto::UDP, 64, &udp(sport, dport, payload_len))
    }

    /// IPv6 TCP SYN (hop limit 64).
    pub fn ipv6_tcp(&self, src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
        self.ipv6(src, dst, proto::TCP, 64, &tcp(sport, dport))
    }

    /// IPv6 ICMPv6 message of `icmp_type` with `hop_limit` (24-byte body).
    pub fn ipv6_icmp(&self, src: [u8; 16], dst: [u8; 16], icmp_type: u8, hop_limit: u8) -> Vec<u8> {
        let mut body = vec![icmp_type, 0, 0, 0];
        body.resize(24, 0);
        self.ipv6(src, dst, proto::ICMPV6, hop_limit, &body)
    }

    /// MLD message of `icmp_type` behind a hop-by-hop header carrying a router
    /// alert, hop limit 1, as hosts send them.
    pub fn ipv6_mld(&self, src: [u8; 16], dst: [u8; 16], icmp_type: u8) -> Vec<u8> {
        // Hop-by-hop: next = ICMPv6, length 0 (8 bytes), router alert (5, 2, 0, 0), PadN.
        let mut payload = vec![proto::ICMPV6, 0, 5, 2, 0, 0, 1, 0];
        let mut mld = vec![icmp_type, 0, 0, 0];
        mld.resize(24, 0);
        payload.extend_from_slice(&mld);
        self.ipv6(src, dst, proto::HOPOPTS, 1, &payload)
    }
}

/// A UDP header followed by `payload_len` zero bytes.
pub fn udp(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload_len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.resize(8 + payload_len, 0);
    u
}

/// A 20-byte TCP header with SYN set.
pub fn tcp(sport: u16, dport: u16) -> Vec<u8> {
    tcp_flags(sport, dport, 0x02)
}

/// A 20-byte TCP header with the given flags byte (0x02 SYN, 0x12 SYN-ACK, 0x14 RST-ACK).
pub fn tcp_flags(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}
