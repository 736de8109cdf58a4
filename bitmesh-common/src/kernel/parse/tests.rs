//! Table-driven host tests of the classifier: every walled-garden rule, its
//! look-alikes that must not pass for free, VLAN tags and truncated frames.

use std::vec::Vec;
use std::{format, vec};

use super::*;
use crate::kernel::frames::{proto, Eth};

const CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const BCAST: [u8; 6] = [0xff; 6];
const CLIENT4: [u8; 4] = [10, 0, 0, 2];
const GW4: [u8; 4] = [10, 0, 0, 1];
const NET4: [u8; 4] = [93, 184, 216, 34];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const GW6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const NET6: [u8; 16] = [0x26, 0x06, 0x28, 0, 0x02, 0x20, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
const LL6: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const ALL_NODES: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const MLD_ROUTERS: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16];
const PAY: u16 = 3141;

fn gw() -> GatewayConfig {
    GatewayConfig { ipv4: GW4, ipv6: GW6, payment_port: PAY, dns_allowed: true }
}

fn up() -> Eth {
    Eth::new(CLIENT, GW_MAC)
}

fn down() -> Eth {
    Eth::new(GW_MAC, CLIENT)
}

use Direction::{Download as D, Upload as U};
use FrameClass::{Billable, Group, Malformed, WalledGarden as G};
use GardenKind::*;

fn cases() -> Vec<(&'static str, Direction, Vec<u8>, FrameClass)> {
    let mut truncated_udp = up().ipv4_udp(CLIENT4, NET4, 5000, 5000, 0);
    truncated_udp.truncate(14 + 20 + 2);
    let mut truncated_ip = up().ipv4_udp(CLIENT4, GW4, 5000, 53, 0);
    truncated_ip.truncate(14 + 19);
    let mut truncated_ip6 = up().ipv6_udp(CLIENT6, GW6, 5000, 53, 0);
    truncated_ip6.truncate(14 + 39);
    let mut bad_version = up().ipv4_udp(CLIENT4, GW4, 5000, 53, 0);
    bad_version[14] = 0x65;
    let mut short_ihl = up().ipv4_udp(CLIENT4, GW4, 5000, 53, 0);
    short_ihl[14] = 0x44;
    let mut fragment = up().ipv4_udp(CLIENT4, GW4, 5000, 53, 100);
    fragment[14 + 6] = 0x00;
    fragment[14 + 7] = 0x10;
    let mut with_options = up().ipv4(CLIENT4, GW4, proto::UDP, &{
        let mut l4 = vec![1, 1, 1, 0]; // NOP NOP NOP EOL: 4 bytes of IPv4 options
        l4.extend_from_slice(&crate::kernel::frames::udp(5000, 53, 10));
        l4
    });
    with_options[14] = 0x46;
    let mut tcp_to_53_truncated = up().ipv4_tcp(CLIENT4, GW4, 5000, 53);
    tcp_to_53_truncated.truncate(14 + 20 + 3);
    let mut mld_hbh_truncated = up().ipv6_mld(LL6, MLD_ROUTERS, 143);
    mld_hbh_truncated.truncate(14 + 40 + 1);
    let no_gw = |v: Vec<u8>| v;

    vec![
        // --- L2 walled garden ---
        ("arp request passes", U, up().arp(), G(Arp)),
        ("arp broadcast from client passes", U, Eth::new(CLIENT, BCAST).arp(), G(Arp)),
        ("arp reply to client passes", D, down().arp(), G(Arp)),
        ("eapol passes", U, up().eapol(), G(Eapol)),
        ("eapol inside vlan passes", U, up().tagged(&[0x8100]).eapol(), G(Eapol)),
        // --- DHCP ---
        ("dhcp discover to broadcast passes", U, Eth::new(CLIENT, BCAST).ipv4_udp([0; 4], [255; 4], 68, 67, 300), G(Dhcp)),
        ("dhcp renew to gateway passes", U, up().ipv4_udp(CLIENT4, GW4, 68, 67, 300), G(Dhcp)),
        ("dhcp to an internet host is billable", U, up().ipv4_udp(CLIENT4, NET4, 68, 67, 300), Billable),
        ("dhcp offer from gateway passes", D, down().ipv4_udp(GW4, CLIENT4, 67, 68, 300), G(Dhcp)),
        ("port 67 from an internet host is billable", D, down().ipv4_udp(NET4, CLIENT4, 67, 68, 300), Billable),
        ("dhcp offer broadcast at egress is group", D, Eth::new(GW_MAC, BCAST).ipv4_udp(GW4, [255; 4], 67, 68, 300), Group),
        // --- DNS ---
        ("dns udp to gateway passes", U, up().ipv4_udp(CLIENT4, GW4, 40000, 53, 40), G(Dns)),
        ("dns tcp to gateway passes", U, up().ipv4_tcp(CLIENT4, GW4, 40000, 53), G(Dns)),
        ("dns answer from gateway passes", D, down().ipv4_udp(GW4, CLIENT4, 53, 40000, 100), G(Dns)),
        ("dns to a public resolver is billable", U, up().ipv4_udp(CLIENT4, [8, 8, 8, 8], 40000, 53, 40), Billable),
        ("dns answer from a public resolver is billable", D, down().ipv4_udp([8, 8, 8, 8], CLIENT4, 53, 40000, 100), Billable),
        ("udp from port 53 to gateway is billable", U, up().ipv4_udp(CLIENT4, GW4, 53, 40000, 40), Billable),
        ("dns over ipv6 to gateway passes", U, up().ipv6_udp(CLIENT6, GW6, 40000, 53, 40), G(Dns)),
        ("dns over ipv6 from gateway passes", D, down().ipv6_udp(GW6, CLIENT6, 53, 40000, 40), G(Dns)),
        ("dns over ipv6 to internet is billable", U, up().ipv6_udp(CLIENT6, NET6, 40000, 53, 40), Billable),
        // --- payment API ---
        ("tcp to payment port passes", U, up().ipv4_tcp(CLIENT4, GW4, 40000, PAY), G(Payment)),
        ("tcp from payment port passes", D, down().ipv4_tcp(GW4, CLIENT4, PAY, 40000), G(Payment)),
        ("udp to payment port is billable", U, up().ipv4_udp(CLIENT4, GW4, 40000, PAY, 10), Billable),
        ("tcp to payment port elsewhere is billable", U, up().ipv4_tcp(CLIENT4, NET4, 40000, PAY), Billable),
        ("tcp to other gateway port is billable", U, up().ipv4_tcp(CLIENT4, GW4, 40000, 22), Billable),
        ("tcp ipv6 to payment port passes", U, up().ipv6_tcp(CLIENT6, GW6, 40000, PAY), G(Payment)),
        // --- ICMP ---
        ("ping to gateway passes", U, up().ipv4_icmp(CLIENT4, GW4, 8), G(IcmpEcho)),
        ("ping reply from gateway passes", D, down().ipv4_icmp(GW4, CLIENT4, 0), G(IcmpEcho)),
        ("ping to internet is billable", U, up().ipv4_icmp(CLIENT4, NET4, 8), Billable),
        ("ping reply from internet is billable", D, down().ipv4_icmp(NET4, CLIENT4, 0), Billable),
        ("icmp timestamp to gateway is billable", U, up().ipv4_icmp(CLIENT4, GW4, 13), Billable),
        ("ping6 to gateway passes", U, up().ipv6_icmp(CLIENT6, GW6, 128, 64), G(IcmpEcho)),
        ("ping6 reply from gateway passes", D, down().ipv6_icmp(GW6, CLIENT6, 129, 64), G(IcmpEcho)),
        ("ping6 to internet is billable", U, up().ipv6_icmp(CLIENT6, NET6, 128, 64), Billable),
        // --- IPv6 ND, DHCPv6, MLD ---
        ("router solicitation passes", U, up().ipv6_icmp(LL6, ALL_NODES, 133, 255), G(Icmpv6Nd)),
        ("neighbour solicitation to gateway passes", U, up().ipv6_icmp(CLIENT6, GW6, 135, 255), G(Icmpv6Nd)),
        ("neighbour advert to link-local passes", U, up().ipv6_icmp(LL6, LL6, 136, 255), G(Icmpv6Nd)),
        ("router advert to client passes", D, down().ipv6_icmp(LL6, LL6, 134, 255), G(Icmpv6Nd)),
        ("neighbour solicitation with hop limit 64 is billable", U, up().ipv6_icmp(LL6, ALL_NODES, 135, 64), Billable),
        ("neighbour solicitation to internet host is billable", U, up().ipv6_icmp(CLIENT6, NET6, 135, 255), Billable),
        ("forwarded router advert is billable", D, down().ipv6_icmp(NET6, CLIENT6, 134, 254), Billable),
        ("dhcpv6 solicit passes", U, up().ipv6_udp(LL6, [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2], 546, 547, 60), G(Dhcpv6)),
        ("dhcpv6 reply from link-local passes", D, down().ipv6_udp(LL6, LL6, 547, 546, 60), G(Dhcpv6)),
        ("dhcpv6 to internet is billable", U, up().ipv6_udp(CLIENT6, NET6, 546, 547, 60), Billable),
        ("dhcpv6 reply from internet is billable", D, down().ipv6_udp(NET6, CLIENT6, 547, 546, 60), Billable),
        ("mldv2 report behind hop-by-hop passes", U, up().ipv6_mld(LL6, MLD_ROUTERS, 143), G(Mld)),
        ("mld query to client passes", D, down().ipv6_mld(LL6, LL6, 130), G(Mld)),
        ("mld without hop-by-hop is billable", U, up().ipv6_icmp(LL6, MLD_ROUTERS, 143, 1), Billable),
        ("mld report from :: (before DAD) passes", U, up().ipv6_mld([0; 16], MLD_ROUTERS, 143), G(Mld)),
        // A forwarded internet packet leaves the gateway with hop limit 1: its
        // routable source gives it away.
        ("forwarded mld-shaped packet from the internet is billable", D, down().ipv6_mld(NET6, CLIENT6, 130), Billable),
        ("mld from :: at egress is billable", D, down().ipv6_mld([0; 16], CLIENT6, 130), Billable),
        ("mld from a routable source upstream is billable", U, up().ipv6_mld(CLIENT6, NET6, 143), Billable),
        // --- VLAN ---
        ("dns in 802.1q passes", U, up().tagged(&[0x8100]).ipv4_udp(CLIENT4, GW4, 40000, 53, 40), G(Dns)),
        ("dns in qinq passes", U, up().tagged(&[0x88a8, 0x8100]).ipv4_udp(CLIENT4, GW4, 40000, 53, 40), G(Dns)),
        ("internet udp in qinq is billable", U, up().tagged(&[0x88a8, 0x8100]).ipv4_udp(CLIENT4, NET4, 1, 2, 40), Billable),
        ("ipv6 ns in vlan passes", U, up().tagged(&[0x8100]).ipv6_icmp(LL6, ALL_NODES, 135, 255), G(Icmpv6Nd)),
        // --- group at egress ---
        ("broadcast at egress is group", D, Eth::new(GW_MAC, BCAST).raw(0x1234, &[0; 40]), Group),
        ("ipv6 multicast at egress is group", D, Eth::new(GW_MAC, [0x33, 0x33, 0, 0, 0, 1]).ipv6_udp(LL6, ALL_NODES, 1, 2, 10), Group),
        ("ipv4 multicast at egress is group", D, Eth::new(GW_MAC, [0x01, 0, 0x5e, 0, 0, 0xfb]).ipv4_udp(NET4, [224, 0, 0, 251], 5353, 5353, 40), Group),
        ("arp broadcast at egress is group", D, Eth::new(GW_MAC, BCAST).arp(), Group),
        // A client that answered ARP/ND with a group MAC for its own address.
        ("unicast ipv4 in a broadcast frame at egress is billable", D, Eth::new(GW_MAC, BCAST).ipv4_udp(NET4, CLIENT4, 1, 2, 40), Billable),
        ("unicast ipv4 in a multicast frame at egress is billable", D, Eth::new(GW_MAC, [0x01, 0, 0x5e, 0, 0, 1]).ipv4_tcp(NET4, CLIENT4, 443, 40000), Billable),
        ("unicast ipv6 in a multicast frame at egress is billable", D, Eth::new(GW_MAC, [0x33, 0x33, 0, 0, 0, 2]).ipv6_udp(NET6, CLIENT6, 1, 2, 10), Billable),
        ("dns answer in a broadcast frame is still garden", D, Eth::new(GW_MAC, BCAST).ipv4_udp(GW4, CLIENT4, 53, 40000, 40), G(Dns)),
        ("cut ipv4 in a broadcast frame at egress is malformed", D, Eth::new(GW_MAC, BCAST).ipv4_udp(GW4, [255; 4], 67, 68, 0)[..14 + 19].to_vec(), Malformed),
        ("multicast from client is billable", U, Eth::new(CLIENT, [0x01, 0, 0x5e, 0, 0, 0xfb]).ipv4_udp(CLIENT4, [224, 0, 0, 251], 5353, 5353, 40), Billable),
        // --- captive-portal interception (IPv4 TCP 80/443 only) ---
        ("http to any host is a portal frame", U, up().ipv4_tcp(CLIENT4, NET4, 40000, 80), FrameClass::Portal(crate::kernel::PortalKind::Http)),
        ("http to the gateway is a portal frame", U, up().ipv4_tcp(CLIENT4, GW4, 40000, 80), FrameClass::Portal(crate::kernel::PortalKind::Http)),
        ("https to any host is a portal frame", U, up().ipv4_tcp(CLIENT4, NET4, 40000, 443), FrameClass::Portal(crate::kernel::PortalKind::Https)),
        ("http answer is a portal frame", D, down().ipv4_tcp_flags(NET4, CLIENT4, 80, 40000, 0x12), FrameClass::Portal(crate::kernel::PortalKind::Http)),
        ("reset from 443 is a portal frame", D, down().ipv4_tcp_flags(NET4, CLIENT4, 443, 40000, 0x14), FrameClass::Portal(crate::kernel::PortalKind::Https)),
        // 14 + 20 + 4 bytes: the ports but not the flags that tell a reset from content.
        ("tcp cut before its flags is malformed", D, down().ipv4_tcp_flags(NET4, CLIENT4, 443, 40000, 0x14)[..38].to_vec(), Malformed),
        ("syn-ack from 443 is billable", D, down().ipv4_tcp_flags(NET4, CLIENT4, 443, 40000, 0x12), Billable),
        ("udp to port 80 is billable", U, up().ipv4_udp(CLIENT4, NET4, 40000, 80, 10), Billable),
        ("tcp to 8080 is billable", U, up().ipv4_tcp(CLIENT4, NET4, 40000, 8080), Billable),
        ("http over ipv6 is billable (no ip6 interception)", U, up().ipv6_tcp(CLIENT6, NET6, 40000, 80), Billable),
        ("the payment port stays garden", U, up().ipv4_tcp(CLIENT4, GW4, 40000, PAY), G(Payment)),
        // --- plain traffic ---
        ("udp to internet is billable", U, up().ipv4_udp(CLIENT4, NET4, 5000, 5000, 100), Billable),
        ("udp from internet is billable", D, down().ipv4_udp(NET4, CLIENT4, 5000, 5000, 100), Billable),
        ("unknown ethertype is billable", U, up().raw(0x8863, &[0; 40]), Billable),
        ("ipv4 with options still parses ports", U, with_options, G(Dns)),
        ("non-first fragment to dns port is billable", U, fragment, Billable),
        // --- truncated and garbage ---
        ("empty frame is malformed", U, Vec::new(), Malformed),
        ("13-byte frame is malformed", U, vec![0; 13], Malformed),
        ("truncated vlan tag is malformed", U, up().tagged(&[0x8100]).raw(0x0800, &[])[..16].to_vec(), Malformed),
        ("truncated ipv4 header is malformed", U, truncated_ip, Malformed),
        ("truncated udp ports are malformed", U, truncated_udp, Malformed),
        ("truncated tcp ports are malformed", U, tcp_to_53_truncated, Malformed),
        ("truncated ipv6 header is malformed", U, truncated_ip6, Malformed),
        ("truncated hop-by-hop is malformed", U, mld_hbh_truncated, Malformed),
        ("icmp cut after the type byte is malformed", U, up().ipv4_icmp(CLIENT4, GW4, 8)[..14 + 20 + 1].to_vec(), Malformed),
        ("ipv4 ethertype with version 6 is malformed", U, bad_version, Malformed),
        ("ipv4 ihl below 5 is malformed", U, short_ihl, Malformed),
        ("ipv6 ethertype with version 4 is malformed", U, up().raw(0x86dd, &no_gw(up().ipv4_udp(CLIENT4, GW4, 1, 53, 40))[14..]), Malformed),
    ]
}

#[test]
fn classifier_table() {
    let mut failures = Vec::new();
    for (name, dir, frame, want) in cases() {
        let got = classify(frame.as_slice(), dir, &gw());
        if got != want {
            failures.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn gateway_rules_are_off_when_gateway_address_is_unset() {
    let cfg = GatewayConfig { ipv4: [0; 4], ipv6: [0; 16], payment_port: PAY, dns_allowed: true };
    let dns_to_zero = up().ipv4_udp(CLIENT4, [0; 4], 40000, 53, 40);
    assert_eq!(classify(dns_to_zero.as_slice(), U, &cfg), Billable);
    let pay_to_zero6 = up().ipv6_tcp(CLIENT6, [0; 16], 40000, PAY);
    assert_eq!(classify(pay_to_zero6.as_slice(), U, &cfg), Billable);
}

#[test]
fn dns_rule_follows_the_dns_allowed_switch() {
    let cfg = GatewayConfig { dns_allowed: false, ..gw() };
    let dns = up().ipv4_udp(CLIENT4, GW4, 40000, 53, 40);
    assert_eq!(classify(dns.as_slice(), U, &cfg), Billable);
}

#[test]
fn client_mac_is_source_on_upload_and_destination_on_download() {
    let f = up().ipv4_udp(CLIENT4, NET4, 1, 2, 3);
    assert_eq!(client_mac(f.as_slice(), U), Some(CLIENT));
    let f = down().ipv4_udp(NET4, CLIENT4, 1, 2, 3);
    assert_eq!(client_mac(f.as_slice(), D), Some(CLIENT));
    assert_eq!(client_mac(&[0u8; 11][..], U), None);
}

#[test]
fn udp_frame_is_payload_plus_42_bytes() {
    for s in [0usize, 1, 100, 1472] {
        assert_eq!(up().ipv4_udp(CLIENT4, NET4, 1, 2, s).len(), s + 42);
    }
}

#[test]
fn segment_headers_are_l2_to_end_of_l4_header() {
    assert_eq!(segment_header_len(up().ipv4_tcp(CLIENT4, NET4, 1, 2).as_slice()), Some(14 + 20 + 20));
    assert_eq!(segment_header_len(up().ipv4_udp(CLIENT4, NET4, 1, 2, 500).as_slice()), Some(42));
    assert_eq!(segment_header_len(up().ipv6_tcp(CLIENT6, NET6, 1, 2).as_slice()), Some(14 + 40 + 20));
    assert_eq!(segment_header_len(up().tagged(&[0x8100]).ipv4_udp(CLIENT4, NET4, 1, 2, 5).as_slice()), Some(46));
    let mut tcp_with_options = up().ipv4_tcp(CLIENT4, NET4, 1, 2);
    tcp_with_options[14 + 20 + 12] = 0x80; // 32-byte TCP header (timestamps)
    tcp_with_options.extend_from_slice(&[0; 12]);
    assert_eq!(segment_header_len(tcp_with_options.as_slice()), Some(14 + 20 + 32));
    assert_eq!(segment_header_len(up().ipv4_icmp(CLIENT4, NET4, 8).as_slice()), None);
    assert_eq!(segment_header_len(up().arp().as_slice()), None);
    let mut cut = up().ipv4_tcp(CLIENT4, NET4, 1, 2);
    cut.truncate(14 + 20 + 12);
    assert_eq!(segment_header_len(cut.as_slice()), None);
}

#[test]
fn a_cut_l4_header_is_no_segment_header() {
    // Found by the frame_classifier fuzz target: an IPv6 frame ending 7 bytes into its
    // UDP header was given a 62-byte segment header in a 61-byte frame.
    let mut udp6 = up().ipv6_udp(CLIENT6, NET6, 1, 2, 0);
    udp6.truncate(14 + 40 + 7);
    assert_eq!(segment_header_len(udp6.as_slice()), None);
    let mut udp4 = up().ipv4_udp(CLIENT4, NET4, 1, 2, 0);
    udp4.truncate(14 + 20 + 7);
    assert_eq!(segment_header_len(udp4.as_slice()), None);
    // TCP options announced but not all present.
    let mut tcp = up().ipv4_tcp(CLIENT4, NET4, 1, 2);
    tcp[14 + 20 + 12] = 0x80;
    tcp.extend_from_slice(&[0; 11]);
    assert_eq!(segment_header_len(tcp.as_slice()), None);
    // Exactly the header, nothing more: still a header.
    let mut exact = up().ipv4_udp(CLIENT4, NET4, 1, 2, 0);
    exact.truncate(14 + 20 + 8);
    assert_eq!(segment_header_len(exact.as_slice()), Some(42));
}
