//! Kernel tests: the real programs, loaded and verified by this kernel, run through
//! BPF_PROG_TEST_RUN on crafted frames. Every case asserts the verdict, the exact
//! change in `USAGE` and the exact change in `STATS`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test should panic

use bitmesh::meter::{Direction, Mac, MeterProgram, MeterStats, StatCounter, Verdict};
use bitmesh_common::kernel::frames::Eth;
use bitmesh_common::kernel::{classify, verdict, BucketParams, Budget, GardenLimits, Gate, GatewayConfig, Usage};
use bitmesh_common::pricing::ByteCount;
use bitmesh_tests::env::{is_root, skip};
use bitmesh_tests::network::{TestMeter, CLIENT_IPV4, GATEWAY_IPV4, PAYMENT_PORT};

const GW_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
const GW4: [u8; 4] = GATEWAY_IPV4.octets();
const CL4: [u8; 4] = CLIENT_IPV4.octets();
const NET4: [u8; 4] = [93, 184, 216, 34];
const GW6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const CL6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const NET6: [u8; 16] = [0x26, 0x06, 0x28, 0, 0x02, 0x20, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
const LL6: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const ALL_NODES: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const DHCP6_SERVERS: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2];
const MLD_ROUTERS: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16];

/// A client MAC unique per case, so cases never share usage.
fn client(n: u8) -> Mac {
    Mac([0x02, 0xc1, 0, 0, 0, n])
}

fn up(mac: Mac) -> Eth {
    Eth::new(mac.0, GW_MAC)
}

fn down(mac: Mac) -> Eth {
    Eth::new(GW_MAC, mac.0)
}

fn gateway_config() -> GatewayConfig {
    GatewayConfig { ipv4: GW4, ipv6: GW6, payment_port: PAYMENT_PORT, dns_allowed: true }
}

/// The programs that meter `direction`.
fn programs(direction: Direction) -> &'static [MeterProgram] {
    match direction {
        Direction::Upload => &[MeterProgram::XdpUpload, MeterProgram::TcUpload],
        Direction::Download => &[MeterProgram::TcDownload],
    }
}

fn delta(after: &MeterStats, before: &MeterStats, d: Direction, v: Verdict) -> StatCounter {
    let (a, b) = (after.get(d, v), before.get(d, v));
    StatCounter { packets: a.packets - b.packets, bytes: a.bytes - b.bytes }
}

fn usage_of(t: &TestMeter, mac: Mac) -> Option<Usage> {
    t.meter.maps().usage(mac).ok().flatten().map(|u| u.usage)
}

/// Run one frame through `program` and check verdict, usage delta and stats delta.
/// Returns a failure description instead of panicking so a table reports all rows.
fn check(t: &TestMeter, name: &str, program: MeterProgram, direction: Direction, mac: Mac, frame: &[u8], want: Verdict) -> Option<String> {
    let before_stats = t.meter.maps().stats().ok()?;
    let before_usage = usage_of(t, mac);
    let out = match t.meter.test_run(program, frame, 1) {
        Ok(out) => out,
        Err(e) => return Some(format!("{name} [{program:?}]: test run failed: {e:#}")),
    };
    let after_stats = t.meter.maps().stats().ok()?;
    let after_usage = usage_of(t, mac);
    let len = frame.len() as u64;
    let mut errors = Vec::new();
    if out.passed != want.passes() {
        errors.push(format!("passed={} (code {})", out.passed, out.return_value));
    }
    for v in Verdict::ALL {
        for d in [Direction::Upload, Direction::Download] {
            let got = delta(&after_stats, &before_stats, d, v);
            let expect = if v == want && d == direction { StatCounter { packets: 1, bytes: len } } else { StatCounter::default() };
            if got != expect {
                errors.push(format!("stats[{d:?},{v:?}] changed by {got:?}, want {expect:?}"));
            }
        }
    }
    let mut expect_usage = before_usage;
    if want == Verdict::PassPaid {
        if let Some(u) = expect_usage.as_mut() {
            match direction {
                Direction::Upload => {
                    u.up_bytes += len;
                    u.up_pkts += 1;
                }
                Direction::Download => {
                    u.down_bytes += len;
                    u.down_pkts += 1;
                }
            }
        }
    }
    let strip = |u: Option<Usage>| u.map(|u| Usage { last_seen_ns: 0, ..u });
    if strip(after_usage) != strip(expect_usage) {
        errors.push(format!("usage {after_usage:?}, want {expect_usage:?}"));
    }
    if want == Verdict::PassPaid && after_usage.map(|u| u.last_seen_ns) == before_usage.map(|u| u.last_seen_ns) {
        errors.push("last_seen not updated".to_string());
    }
    (!errors.is_empty()).then(|| format!("{name} [{program:?}] want {want:?}: {}", errors.join("; ")))
}

fn assert_all(failures: Vec<String>) {
    assert!(failures.is_empty(), "{} failing case(s):\n{}", failures.len(), failures.join("\n"));
}

/// The meter with the walled-garden budgets off: the tables below run hundreds of
/// garden frames per MAC; the budget has its own tests.
fn load() -> Option<TestMeter> {
    load_with_garden(GardenLimits::default())
}

fn load_with_garden(garden: GardenLimits) -> Option<TestMeter> {
    if !is_root() {
        skip("kernel tests need root (BPF_PROG_LOAD, bpffs)");
        return None;
    }
    match TestMeter::load_with(|c| c.garden = garden) {
        Ok(t) => Some(t),
        Err(e) => panic!("loading the meter failed: {e:#}"),
    }
}

/// Every walled-garden frame, for a given client MAC.
fn walled_garden(mac: Mac) -> Vec<(&'static str, Direction, Vec<u8>)> {
    use Direction::{Download as D, Upload as U};
    let bcast = Eth::new(mac.0, [0xff; 6]);
    vec![
        ("arp request", U, bcast.arp()),
        ("arp reply to the client", D, down(mac).arp()),
        ("eapol key frame", U, up(mac).eapol()),
        ("eapol to the client", D, down(mac).eapol()),
        ("dhcp discover", U, bcast.ipv4_udp([0; 4], [255; 4], 68, 67, 300)),
        ("dhcp request to the gateway", U, up(mac).ipv4_udp(CL4, GW4, 68, 67, 300)),
        ("dhcp ack from the gateway", D, down(mac).ipv4_udp(GW4, CL4, 67, 68, 300)),
        ("dns query over udp", U, up(mac).ipv4_udp(CL4, GW4, 40000, 53, 40)),
        ("dns query over tcp", U, up(mac).ipv4_tcp(CL4, GW4, 40000, 53)),
        ("dns answer", D, down(mac).ipv4_udp(GW4, CL4, 53, 40000, 120)),
        ("dns over ipv6", U, up(mac).ipv6_udp(CL6, GW6, 40000, 53, 40)),
        ("payment api request", U, up(mac).ipv4_tcp(CL4, GW4, 40000, PAYMENT_PORT)),
        ("payment api response", D, down(mac).ipv4_tcp(GW4, CL4, PAYMENT_PORT, 40000)),
        ("payment api over ipv6", U, up(mac).ipv6_tcp(CL6, GW6, 40000, PAYMENT_PORT)),
        ("ping the gateway", U, up(mac).ipv4_icmp(CL4, GW4, 8)),
        ("ping reply from the gateway", D, down(mac).ipv4_icmp(GW4, CL4, 0)),
        ("ping6 the gateway", U, up(mac).ipv6_icmp(CL6, GW6, 128, 64)),
        ("router solicitation", U, up(mac).ipv6_icmp(LL6, ALL_NODES, 133, 255)),
        ("neighbour solicitation", U, up(mac).ipv6_icmp(LL6, ALL_NODES, 135, 255)),
        ("neighbour advertisement to the client", D, down(mac).ipv6_icmp(GW6, CL6, 136, 255)),
        ("router advertisement unicast", D, down(mac).ipv6_icmp(LL6, LL6, 134, 255)),
        ("dhcpv6 solicit", U, up(mac).ipv6_udp(LL6, DHCP6_SERVERS, 546, 547, 60)),
        ("dhcpv6 reply", D, down(mac).ipv6_udp(LL6, LL6, 547, 546, 60)),
        ("mld report behind hop-by-hop", U, up(mac).ipv6_mld(LL6, MLD_ROUTERS, 143)),
        ("mld query to the client", D, down(mac).ipv6_mld(LL6, ALL_NODES, 130)),
        ("dns in 802.1q", U, up(mac).tagged(&[0x8100]).ipv4_udp(CL4, GW4, 40000, 53, 40)),
        ("dhcp in qinq", U, up(mac).tagged(&[0x88a8, 0x8100]).ipv4_udp(CL4, GW4, 68, 67, 300)),
        ("neighbour solicitation in 802.1q", U, up(mac).tagged(&[0x8100]).ipv6_icmp(LL6, ALL_NODES, 135, 255)),
    ]
}

/// Frames an unpaid client must not get through.
fn not_walled_garden(mac: Mac) -> Vec<(&'static str, Direction, Vec<u8>)> {
    use Direction::{Download as D, Upload as U};
    vec![
        ("udp to the internet", U, up(mac).ipv4_udp(CL4, NET4, 5000, 5000, 100)),
        ("udp from the internet", D, down(mac).ipv4_udp(NET4, CL4, 5000, 5000, 100)),
        ("tcp to the internet", U, up(mac).ipv4_tcp(CL4, NET4, 40000, 8443)),
        ("dns to a public resolver", U, up(mac).ipv4_udp(CL4, [8, 8, 8, 8], 40000, 53, 40)),
        ("dns answer from a public resolver", D, down(mac).ipv4_udp([8, 8, 8, 8], CL4, 53, 40000, 100)),
        ("dhcp ports to an internet host", U, up(mac).ipv4_udp(CL4, NET4, 68, 67, 300)),
        ("payment port on an internet host", U, up(mac).ipv4_tcp(CL4, NET4, 40000, PAYMENT_PORT)),
        ("ssh to the gateway", U, up(mac).ipv4_tcp(CL4, GW4, 40000, 22)),
        ("udp to the payment port", U, up(mac).ipv4_udp(CL4, GW4, 40000, PAYMENT_PORT, 10)),
        ("ping the internet", U, up(mac).ipv4_icmp(CL4, NET4, 8)),
        ("ping6 the internet", U, up(mac).ipv6_icmp(CL6, NET6, 128, 64)),
        ("tcp6 to the internet", U, up(mac).ipv6_tcp(CL6, NET6, 40000, 443)),
        ("neighbour solicitation with hop limit 64", U, up(mac).ipv6_icmp(LL6, ALL_NODES, 135, 64)),
        ("forwarded router advertisement", D, down(mac).ipv6_icmp(NET6, CL6, 134, 254)),
        ("mld without hop-by-hop", U, up(mac).ipv6_icmp(LL6, MLD_ROUTERS, 143, 1)),
        ("forwarded internet packet shaped like mld (hop limit 1)", D, down(mac).ipv6_mld(NET6, CL6, 130)),
        ("unknown ethertype", U, up(mac).raw(0x8863, &[0; 40])),
        ("internet udp in qinq", U, up(mac).tagged(&[0x88a8, 0x8100]).ipv4_udp(CL4, NET4, 1, 2, 40)),
        ("multicast from the client", U, Eth::new(mac.0, [0x01, 0, 0x5e, 0, 0, 0xfb]).ipv4_udp(CL4, [224, 0, 0, 251], 5353, 5353, 40)),
    ]
}

#[test]
fn unpaid_client_passes_every_walled_garden_frame_unbilled() {
    let Some(t) = load() else { return };
    let mut failures = Vec::new();
    for (i, (name, direction, _)) in walled_garden(client(0)).into_iter().enumerate() {
        for &program in programs(direction) {
            // A fresh unknown MAC per row and program.
            let mac = client(i as u8 * 2 + u8::from(program == MeterProgram::TcUpload));
            let frame = walled_garden(mac).swap_remove(i).2;
            failures.extend(check(&t, name, program, direction, mac, &frame, Verdict::PassWalledGarden));
        }
    }
    assert_all(failures);
}

#[test]
fn paid_client_is_not_billed_for_walled_garden_frames() {
    let Some(mut t) = load() else { return };
    let mac = client(200);
    t.meter.maps_mut().add_client(mac).expect("meter the client");
    t.meter.maps_mut().raise_credit(mac, ByteCount(1_000_000)).expect("credit");
    let mut failures = Vec::new();
    for (name, direction, frame) in walled_garden(mac) {
        for &program in programs(direction) {
            failures.extend(check(&t, name, program, direction, mac, &frame, Verdict::PassWalledGarden));
        }
    }
    assert_all(failures);
}

#[test]
fn unpaid_client_reaches_nothing_outside_the_walled_garden() {
    let Some(mut t) = load() else { return };
    let mut failures = Vec::new();
    // Unknown MAC: DropUnpaid.
    let stranger = client(1);
    for (name, direction, frame) in not_walled_garden(stranger) {
        for &program in programs(direction) {
            failures.extend(check(&t, name, program, direction, stranger, &frame, Verdict::DropUnpaid));
        }
    }
    // Known MAC with zero credit: DropCreditExhausted.
    let broke = client(2);
    t.meter.maps_mut().add_client(broke).expect("add client");
    for (name, direction, frame) in not_walled_garden(broke) {
        for &program in programs(direction) {
            failures.extend(check(&t, name, program, direction, broke, &frame, Verdict::DropCreditExhausted));
        }
    }
    assert_all(failures);
}

#[test]
fn paid_client_passes_until_its_credit_is_used_then_drops() {
    let Some(mut t) = load() else { return };
    let mut failures = Vec::new();
    for (n, (program, direction)) in [
        (MeterProgram::XdpUpload, Direction::Upload),
        (MeterProgram::TcUpload, Direction::Upload),
        (MeterProgram::TcDownload, Direction::Download),
    ]
    .into_iter()
    .enumerate()
    {
        let mac = client(100 + n as u8);
        let frame = match direction {
            Direction::Upload => up(mac).ipv4_udp(CL4, NET4, 5000, 5000, 958),
            Direction::Download => down(mac).ipv4_udp(NET4, CL4, 5000, 5000, 958),
        };
        assert_eq!(frame.len(), 1000);
        // Credit for exactly three frames.
        t.meter.maps_mut().add_client(mac).expect("meter the client");
        t.meter.maps_mut().raise_credit(mac, ByteCount(3000)).expect("credit");
        for i in 0..3 {
            failures.extend(check(&t, &format!("frame {i} within credit"), program, direction, mac, &frame, Verdict::PassPaid));
        }
        failures.extend(check(&t, "frame beyond credit", program, direction, mac, &frame, Verdict::DropCreditExhausted));
        failures.extend(check(&t, "again beyond credit", program, direction, mac, &frame, Verdict::DropCreditExhausted));
        // Walled garden still works for the exhausted client.
        let dns = match direction {
            Direction::Upload => up(mac).ipv4_udp(CL4, GW4, 40000, 53, 40),
            Direction::Download => down(mac).ipv4_udp(GW4, CL4, 53, 40000, 40),
        };
        failures.extend(check(&t, "dns when exhausted", program, direction, mac, &dns, Verdict::PassWalledGarden));
        // A top-up of one frame resumes the flow for exactly one frame.
        t.meter.maps_mut().raise_credit(mac, ByteCount(4000)).expect("top up");
        failures.extend(check(&t, "frame after top-up", program, direction, mac, &frame, Verdict::PassPaid));
        failures.extend(check(&t, "frame beyond top-up", program, direction, mac, &frame, Verdict::DropCreditExhausted));
        let u = t.meter.maps().usage(mac).expect("usage").expect("client");
        if u.used() != ByteCount(4000) || u.remaining() != ByteCount(0) {
            failures.push(format!("{program:?}: used {} remaining {}", u.used(), u.remaining()));
        }
    }
    assert_all(failures);
}

#[test]
fn upload_and_download_share_one_budget() {
    let Some(mut t) = load() else { return };
    let mac = client(150);
    let up_frame = up(mac).ipv4_udp(CL4, NET4, 5000, 5000, 458); // 500 bytes
    let down_frame = down(mac).ipv4_udp(NET4, CL4, 5000, 5000, 458);
    t.meter.maps_mut().add_client(mac).expect("meter the client");
    t.meter.maps_mut().raise_credit(mac, ByteCount(1000)).expect("credit");
    let mut failures = Vec::new();
    failures.extend(check(&t, "upload", MeterProgram::XdpUpload, Direction::Upload, mac, &up_frame, Verdict::PassPaid));
    failures.extend(check(&t, "download", MeterProgram::TcDownload, Direction::Download, mac, &down_frame, Verdict::PassPaid));
    failures.extend(check(&t, "budget spent", MeterProgram::TcDownload, Direction::Download, mac, &down_frame, Verdict::DropCreditExhausted));
    failures.extend(check(&t, "budget spent", MeterProgram::TcUpload, Direction::Upload, mac, &up_frame, Verdict::DropCreditExhausted));
    assert_all(failures);
}

#[test]
fn truncated_frames_never_pass_as_paid() {
    let Some(mut t) = load() else { return };
    let mac = client(160);
    t.meter.maps_mut().add_client(mac).expect("meter the client");
    t.meter.maps_mut().raise_credit(mac, ByteCount(u64::MAX / 2)).expect("credit");
    let mut failures = Vec::new();
    let mut frames = walled_garden(mac);
    frames.extend(not_walled_garden(mac));
    // Every prefix (>= 14 bytes: the kernel refuses shorter test inputs) of every
    // frame: the kernel must agree with the host classifier, and a prefix that cuts
    // an IP or L4 header must be dropped as malformed, whoever sends it.
    for (name, direction, frame) in frames {
        for cut in 14..frame.len() {
            let prefix = &frame[..cut];
            let class = classify(prefix, direction, &gateway_config());
            let budget = Some(Budget { credited: u64::MAX / 2, used: t.meter.maps().usage(mac).ok().flatten().map_or(0, |u| u.used().0) });
            let want = verdict(class, cut as u64, budget, Gate::Open);
            // Cut inside the fixed IP header: must be dropped, never billed.
            if cut < ip_header_end(&frame) && want != Verdict::DropMalformed {
                failures.push(format!("{name} cut at {cut}: host verdict {want:?}, want DropMalformed"));
            }
            for &program in programs(direction) {
                // The kernel refuses to build a test skb whose ethertype says IP but
                // whose IP header is cut (EINVAL), so a real TC hook never sees one;
                // XDP gets raw buffers and covers those cuts.
                if program != MeterProgram::XdpUpload && cut < ip_header_end(&frame) {
                    continue;
                }
                failures.extend(check(&t, &format!("{name} cut at {cut}"), program, direction, mac, prefix, want));
            }
        }
    }
    assert_all(failures);
}

/// End of the fixed IP header of an untagged IPv4/IPv6 frame (0 for other frames).
fn ip_header_end(frame: &[u8]) -> usize {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => 14 + 20,
        0x86dd => 14 + 40,
        _ => 0,
    }
}

#[test]
fn garbage_frames_from_unpaid_clients_are_dropped() {
    let Some(t) = load() else { return };
    let mut failures = Vec::new();
    // Deterministic pseudo-random frames with an unknown source MAC: whatever the
    // bytes say, an unpaid client gets nothing but what the classifier calls walled
    // garden, and the kernel agrees with the host on every one.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..400u32 {
        let len = 14 + (i as usize * 7) % 120;
        let mut frame: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        frame[6..12].copy_from_slice(&[0x02, 0xee, 0, 0, (i >> 8) as u8, i as u8]);
        // Steer half of them into the IPv4/IPv6 parsers.
        match i % 4 {
            0 => frame[12..14].copy_from_slice(&[0x08, 0x00]),
            1 => frame[12..14].copy_from_slice(&[0x86, 0xdd]),
            _ => {}
        }
        let mac = Mac(frame[6..12].try_into().unwrap_or_default());
        let class = classify(frame.as_slice(), Direction::Upload, &gateway_config());
        let want = verdict(class, len as u64, None, Gate::Open);
        if want == Verdict::PassPaid {
            failures.push(format!("garbage {i} would pass as paid without credit"));
        }
        failures.extend(check(&t, &format!("garbage {i}"), MeterProgram::XdpUpload, Direction::Upload, mac, &frame, want));
    }
    assert_all(failures);
}

#[test]
fn egress_broadcast_and_multicast_pass_and_are_counted_globally() {
    let Some(t) = load() else { return };
    let mut failures = Vec::new();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("broadcast arp", Eth::new(GW_MAC, [0xff; 6]).arp()),
        ("dhcp offer broadcast", Eth::new(GW_MAC, [0xff; 6]).ipv4_udp(GW4, [255; 4], 67, 68, 300)),
        ("router advertisement multicast", Eth::new(GW_MAC, [0x33, 0x33, 0, 0, 0, 1]).ipv6_icmp(LL6, ALL_NODES, 134, 255)),
        ("mdns multicast from the internet side", Eth::new(GW_MAC, [0x01, 0, 0x5e, 0, 0, 0xfb]).ipv4_udp(NET4, [224, 0, 0, 251], 5353, 5353, 100)),
        ("broadcast of unknown ethertype", Eth::new(GW_MAC, [0xff; 6]).raw(0x1234, &[0; 50])),
    ];
    for (name, frame) in cases {
        let mac = Mac(frame[0..6].try_into().unwrap_or_default());
        failures.extend(check(&t, name, MeterProgram::TcDownload, Direction::Download, mac, &frame, Verdict::PassGroup));
    }
    assert_all(failures);
}

#[test]
fn counters_and_credit_survive_a_reload_from_pinned_maps() {
    let Some(mut t) = load() else { return };
    let mac = client(170);
    let frame = up(mac).ipv4_udp(CL4, NET4, 5000, 5000, 58); // 100 bytes
    t.meter.maps_mut().add_client(mac).expect("meter the client");
    t.meter.maps_mut().raise_credit(mac, ByteCount(250)).expect("credit");
    for _ in 0..2 {
        assert!(t.meter.test_run(MeterProgram::XdpUpload, &frame, 1).expect("run").passed);
    }
    let mut t = t.reload().expect("reload");
    let u = t.meter.maps().usage(mac).expect("usage").expect("client kept");
    assert_eq!((u.credited, u.usage.up_bytes, u.usage.up_pkts), (ByteCount(250), 200, 2));
    // Enforcement continues from where it was: 50 bytes left, a 100-byte frame drops.
    assert!(!t.meter.test_run(MeterProgram::XdpUpload, &frame, 1).expect("run").passed);
    // add_client on a live client never resets its counters.
    t.meter.maps_mut().add_client(mac).expect("add again");
    assert_eq!(t.meter.maps().usage(mac).expect("usage").expect("client").usage.up_bytes, 200);
    // And a pure reader sees the same maps.
    let reader = bitmesh::meter::MeterMaps::open_pinned(t.pins.path()).expect("open pinned");
    assert_eq!(reader.all_usage().expect("all").len(), 1);
}

#[test]
fn credit_only_ever_increases() {
    let Some(mut t) = load() else { return };
    let mac = client(180);
    let maps = t.meter.maps_mut();
    // Raising credit never creates a client (a replayed update of a closed channel
    // must not bring its MAC back).
    let err = maps.raise_credit(mac, ByteCount(5000)).expect_err("credit for an unmetered client refused");
    assert!(matches!(err, bitmesh::meter::MeterError::NotMetered { .. }), "{err}");
    assert_eq!(maps.credit(mac).expect("credit"), None);
    assert_eq!(maps.usage(mac).expect("usage"), None);
    maps.add_client(mac).expect("meter the client");
    assert_eq!(maps.raise_credit(mac, ByteCount(5000)).expect("raise"), ByteCount(5000));
    assert_eq!(maps.raise_credit(mac, ByteCount(5000)).expect("replay is a no-op"), ByteCount(5000));
    let err = maps.raise_credit(mac, ByteCount(4000)).expect_err("decrease refused");
    assert!(err.to_string().contains("can only increase"), "{err}");
    assert_eq!(maps.credit(mac).expect("credit"), Some(ByteCount(5000)));
    assert!(maps.add_client(Mac([0xff; 6])).is_err(), "broadcast is never a client");
    let last = maps.remove_client(mac).expect("remove").expect("was there");
    assert_eq!(last.credited, ByteCount(5000));
    assert_eq!(maps.usage(mac).expect("usage"), None);
    assert_eq!(maps.remove_client(mac).expect("removing an absent client is a no-op"), None);
}

/// 1 byte per second (no refill worth a frame during a test), 1000-byte burst.
fn tight_garden() -> GardenLimits {
    GardenLimits { services: BucketParams::new(1, 1000), payment: BucketParams::new(1, 1000) }
}

#[test]
fn garden_services_are_free_only_up_to_the_macs_budget() {
    let Some(mut t) = load_with_garden(tight_garden()) else { return };
    let mut failures = Vec::new();
    for (n, program) in [MeterProgram::XdpUpload, MeterProgram::TcUpload].into_iter().enumerate() {
        // Unpaid: 82-byte DNS queries; twelve fit the 1000-byte burst, the 13th not.
        let mac = client(10 + n as u8);
        let query = up(mac).ipv4_udp(CL4, GW4, 40000, 53, 40);
        assert_eq!(query.len(), 82);
        for i in 0..12 {
            failures.extend(check(&t, &format!("dns query {i} within budget"), program, Direction::Upload, mac, &query, Verdict::PassWalledGarden));
        }
        failures.extend(check(&t, "dns query beyond budget", program, Direction::Upload, mac, &query, Verdict::DropGardenBudget));
        let tcp = up(mac).ipv4_tcp(CL4, GW4, 40000, 53);
        failures.extend(check(&t, "dns over tcp shares the budget", program, Direction::Upload, mac, &tcp, Verdict::DropGardenBudget));
        let ping = up(mac).ipv4_icmp(CL4, GW4, 8);
        failures.extend(check(&t, "ping shares the services budget", program, Direction::Upload, mac, &ping, Verdict::DropGardenBudget));
        // Answers to the same MAC draw from the same bucket.
        let answer = down(mac).ipv4_udp(GW4, CL4, 53, 40000, 40);
        failures.extend(check(&t, "dns answer beyond budget", MeterProgram::TcDownload, Direction::Download, mac, &answer, Verdict::DropGardenBudget));
        // The payment API has its own bucket; address configuration has none.
        let pay = up(mac).ipv4_tcp(CL4, GW4, 40000, PAYMENT_PORT);
        failures.extend(check(&t, "payment port has its own budget", program, Direction::Upload, mac, &pay, Verdict::PassWalledGarden));
        let bcast = Eth::new(mac.0, [0xff; 6]);
        for (name, frame) in [
            ("arp", bcast.arp()),
            ("dhcp discover", bcast.ipv4_udp([0; 4], [255; 4], 68, 67, 300)),
            ("neighbour solicitation", up(mac).ipv6_icmp(LL6, ALL_NODES, 135, 255)),
            ("eapol", up(mac).eapol()),
        ] {
            for _ in 0..20 {
                failures.extend(check(&t, &format!("{name} is never budgeted"), program, Direction::Upload, mac, &frame, Verdict::PassWalledGarden));
            }
        }
        // A paying client's garden traffic beyond the budget is billed, not dropped;
        // once its credit is spent too, it is dropped.
        let paid = client(20 + n as u8);
        t.meter.maps_mut().add_client(paid).expect("add client");
        t.meter.maps_mut().raise_credit(paid, ByteCount(82 * 2)).expect("credit");
        let query = up(paid).ipv4_udp(CL4, GW4, 40000, 53, 40);
        for i in 0..12 {
            failures.extend(check(&t, &format!("paid dns {i} within budget is free"), program, Direction::Upload, paid, &query, Verdict::PassWalledGarden));
        }
        failures.extend(check(&t, "paid dns beyond budget is billed", program, Direction::Upload, paid, &query, Verdict::PassPaid));
        failures.extend(check(&t, "paid dns beyond budget is billed", program, Direction::Upload, paid, &query, Verdict::PassPaid));
        failures.extend(check(&t, "beyond budget and credit", program, Direction::Upload, paid, &query, Verdict::DropGardenBudget));
    }
    // The kernel made garden entries, never CREDIT/USAGE ones, for the unpaid MACs.
    let garden = t.meter.maps().garden_macs().expect("garden");
    assert!(garden.contains(&client(10)) && garden.contains(&client(11)), "{garden:?}");
    for m in [client(10), client(11)] {
        assert_eq!(t.meter.maps().usage(m).expect("usage"), None, "no USAGE entry for {m}");
        assert_eq!(t.meter.maps().credit(m).expect("credit"), None, "no CREDIT entry for {m}");
    }
    assert_all(failures);
}

#[test]
fn payment_port_budget_covers_opening_a_channel_and_then_stops() {
    let Some(t) = load_with_garden(GardenLimits {
        services: BucketParams::new(1, 1000),
        payment: BucketParams::new(1, 4000),
    }) else {
        return;
    };
    let mac = client(30);
    let mut failures = Vec::new();
    // 1000-byte segments both ways: four fit the 4000-byte payment burst.
    let req = up(mac).ipv4(CL4, GW4, 6, &{
        let mut seg = bitmesh_common::kernel::frames::tcp(40000, PAYMENT_PORT);
        seg.resize(1000 - 34, 0);
        seg
    });
    let resp = down(mac).ipv4(GW4, CL4, 6, &{
        let mut seg = bitmesh_common::kernel::frames::tcp(PAYMENT_PORT, 40000);
        seg.resize(1000 - 34, 0);
        seg
    });
    assert_eq!((req.len(), resp.len()), (1000, 1000));
    failures.extend(check(&t, "request 1", MeterProgram::XdpUpload, Direction::Upload, mac, &req, Verdict::PassWalledGarden));
    failures.extend(check(&t, "response 1", MeterProgram::TcDownload, Direction::Download, mac, &resp, Verdict::PassWalledGarden));
    failures.extend(check(&t, "request 2", MeterProgram::TcUpload, Direction::Upload, mac, &req, Verdict::PassWalledGarden));
    failures.extend(check(&t, "response 2", MeterProgram::TcDownload, Direction::Download, mac, &resp, Verdict::PassWalledGarden));
    failures.extend(check(&t, "request 3 beyond budget", MeterProgram::XdpUpload, Direction::Upload, mac, &req, Verdict::DropGardenBudget));
    failures.extend(check(&t, "response 3 beyond budget", MeterProgram::TcDownload, Direction::Download, mac, &resp, Verdict::DropGardenBudget));
    // Another device has its own budget.
    let other = client(31);
    let req2 = up(other).ipv4_tcp(CL4, GW4, 40000, PAYMENT_PORT);
    failures.extend(check(&t, "another mac", MeterProgram::XdpUpload, Direction::Upload, other, &req2, Verdict::PassWalledGarden));
    assert_all(failures);
}

#[test]
fn forwarded_mld_lookalikes_and_unicast_ip_in_group_frames_are_not_free() {
    let Some(mut t) = load() else { return };
    let mut failures = Vec::new();
    let mac = client(40);
    let bcast = Eth::new(GW_MAC, [0xff; 6]);
    let mcast4 = Eth::new(GW_MAC, [0x01, 0, 0x5e, 0, 0, 1]);
    let mcast6 = Eth::new(GW_MAC, [0x33, 0x33, 0, 0, 0, 2]);
    let cases: Vec<(&str, Mac, Vec<u8>)> = vec![
        ("internet packet with hop limit 1 behind hop-by-hop", mac, down(mac).ipv6_mld(NET6, CL6, 131)),
        ("unicast udp to the client in a broadcast frame", Mac([0xff; 6]), bcast.ipv4_udp(NET4, CL4, 443, 40000, 1000)),
        ("unicast tcp to the client in an ipv4 multicast frame", Mac([0x01, 0, 0x5e, 0, 0, 1]), mcast4.ipv4_tcp(NET4, CL4, 443, 40000)),
        ("unicast ipv6 to the client in an ipv6 multicast frame", Mac([0x33, 0x33, 0, 0, 0, 2]), mcast6.ipv6_udp(NET6, CL6, 443, 40000, 1000)),
    ];
    for (name, key, frame) in &cases {
        failures.extend(check(&t, name, MeterProgram::TcDownload, Direction::Download, *key, frame, Verdict::DropUnpaid));
    }
    // The forwarded MLD look-alike is billed to a paying client like any download.
    t.meter.maps_mut().add_client(mac).expect("add client");
    t.meter.maps_mut().raise_credit(mac, ByteCount(1 << 20)).expect("credit");
    failures.extend(check(&t, "forwarded hop-limit-1 packet to a paying client", MeterProgram::TcDownload, Direction::Download, mac, &cases[0].2, Verdict::PassPaid));
    assert_all(failures);
}

#[test]
fn a_bound_client_is_billed_only_for_frames_from_its_bound_address() {
    let Some(mut t) = load() else { return };
    let mut failures = Vec::new();
    let other4: [u8; 4] = [10, 77, 0, 99];
    for (n, program) in [MeterProgram::XdpUpload, MeterProgram::TcUpload].into_iter().enumerate() {
        let mac = client(50 + n as u8);
        t.meter.maps_mut().add_client(mac).expect("add client");
        t.meter.maps_mut().raise_credit(mac, ByteCount(1 << 20)).expect("credit");
        t.meter.maps_mut().bind_source(mac, CLIENT_IPV4.into()).expect("bind");
        let u = |src: [u8; 4]| up(mac).ipv4_udp(src, NET4, 5000, 5000, 100);
        failures.extend(check(&t, "from the bound address", program, Direction::Upload, mac, &u(CL4), Verdict::PassPaid));
        failures.extend(check(&t, "from another ipv4 (cloned mac)", program, Direction::Upload, mac, &u(other4), Verdict::DropWrongSource));
        failures.extend(check(&t, "cloned mac in 802.1q", program, Direction::Upload, mac, &up(mac).tagged(&[0x8100]).ipv4_udp(other4, NET4, 1, 2, 10), Verdict::DropWrongSource));
        failures.extend(check(&t, "routable ipv6 on an ipv4 binding", program, Direction::Upload, mac, &up(mac).ipv6_udp(CL6, NET6, 1, 2, 10), Verdict::DropWrongSource));
        failures.extend(check(&t, "link-local ipv6 stays billable", program, Direction::Upload, mac, &up(mac).ipv6_udp(LL6, ALL_NODES, 5353, 5353, 10), Verdict::PassPaid));
        failures.extend(check(&t, "garden from another address is still garden", program, Direction::Upload, mac, &up(mac).ipv4_udp(other4, GW4, 40000, 53, 40), Verdict::PassWalledGarden));
        failures.extend(check(&t, "download is not judged by source", MeterProgram::TcDownload, Direction::Download, mac, &down(mac).ipv4_udp(NET4, other4, 1, 2, 10), Verdict::PassPaid));
        let b = t.meter.maps().binding(mac).expect("binding").expect("bound");
        if b.wrong_source_frames != 3 || b.last_wrong_source != Some(CL6.into()) || b.ipv4 != Some(CLIENT_IPV4) || !b.enforced {
            failures.push(format!("{program:?}: binding {b:?}"));
        }
    }
    // Not enforced: counted, billed, passed.
    let mac = client(60);
    t.meter.maps_mut().add_client(mac).expect("add client");
    t.meter.maps_mut().raise_credit(mac, ByteCount(1 << 20)).expect("credit");
    t.meter.maps_mut().set_enforce_bound_ip(false);
    t.meter.maps_mut().bind_source(mac, CLIENT_IPV4.into()).expect("bind");
    let cloned = up(mac).ipv4_udp(other4, NET4, 5000, 5000, 100);
    failures.extend(check(&t, "unenforced binding only counts", MeterProgram::XdpUpload, Direction::Upload, mac, &cloned, Verdict::PassPaid));
    let b = t.meter.maps().binding(mac).expect("binding").expect("bound");
    assert_eq!((b.enforced, b.wrong_source_frames, b.last_wrong_source), (false, 1, Some(std::net::Ipv4Addr::from(other4).into())));
    // An IPv6 binding: that address, link-local, nothing routable on IPv4.
    let mac6 = client(61);
    t.meter.maps_mut().set_enforce_bound_ip(true);
    t.meter.maps_mut().add_client(mac6).expect("add client");
    t.meter.maps_mut().raise_credit(mac6, ByteCount(1 << 20)).expect("credit");
    t.meter.maps_mut().bind_source(mac6, std::net::Ipv6Addr::from(CL6).into()).expect("bind");
    failures.extend(check(&t, "bound ipv6", MeterProgram::XdpUpload, Direction::Upload, mac6, &up(mac6).ipv6_udp(CL6, NET6, 1, 2, 10), Verdict::PassPaid));
    failures.extend(check(&t, "ipv4 on an ipv6 binding", MeterProgram::XdpUpload, Direction::Upload, mac6, &up(mac6).ipv4_udp(CL4, NET4, 1, 2, 10), Verdict::DropWrongSource));
    // Removing the client removes its binding.
    t.meter.maps_mut().remove_client(mac).expect("remove");
    assert_eq!(t.meter.maps().binding(mac).expect("binding"), None);
    assert_all(failures);
}

/// One TC run with an `__sk_buff` context: verdict (by its stats slot), pass/drop,
/// the mark the program left and the usage delta. (One argument per column of the
/// case tables below, like `check`.)
#[allow(clippy::too_many_arguments)]
fn check_skb(
    t: &TestMeter,
    name: &str,
    program: MeterProgram,
    direction: Direction,
    mac: Mac,
    frame: &[u8],
    ingress_ifindex: u32,
    want: Verdict,
    want_mark: u32,
) -> Option<String> {
    let before = t.meter.maps().stats().ok()?;
    let before_usage = usage_of(t, mac);
    let (out, ctx) = match t.meter.test_run_skb(program, frame, bitmesh::meter::SkbContext { mark: 0, ingress_ifindex }) {
        Ok(x) => x,
        Err(e) => return Some(format!("{name} [{program:?}]: test run failed: {e:#}")),
    };
    let after = t.meter.maps().stats().ok()?;
    let mut errors = Vec::new();
    if out.passed != want.passes() {
        errors.push(format!("passed={} (code {})", out.passed, out.return_value));
    }
    let got = delta(&after, &before, direction, want);
    if got.packets != 1 {
        let counted: Vec<_> = Verdict::ALL.into_iter().filter(|v| delta(&after, &before, direction, *v).packets > 0).collect();
        errors.push(format!("counted as {counted:?}"));
    }
    if ctx.mark != want_mark {
        errors.push(format!("mark {:#x}, want {want_mark:#x}", ctx.mark));
    }
    let billed = usage_of(t, mac).map(|u| u.up_bytes + u.down_bytes) != before_usage.map(|u| u.up_bytes + u.down_bytes);
    if billed != (want == Verdict::PassPaid) {
        errors.push(format!("billed={billed}"));
    }
    (!errors.is_empty()).then(|| format!("{name} [{program:?}] want {want:?}: {}", errors.join("; ")))
}

/// Captive-portal interception (docs/design.md section 3.1): an unpaid client's
/// HTTP/HTTPS passes TC ingress marked for the controller's nftables table; XDP (no
/// mark) drops it; at egress only what the gateway generated itself comes back; a
/// paid client's port 80 is billed and never marked.
#[test]
fn portal_frames_are_marked_for_the_unpaid_and_billed_for_the_paid() {
    use bitmesh_common::kernel::PORTAL_MARK;
    let Some(mut t) = load() else { return };
    let (tcu, tcd, xdp) = (MeterProgram::TcUpload, MeterProgram::TcDownload, MeterProgram::XdpUpload);
    let (u, d) = (Direction::Upload, Direction::Download);
    const FORWARDED: u32 = 7; // any interface index: the packet came from upstream
    let mut failures = Vec::new();
    let unpaid = client(190);
    let http = up(unpaid).ipv4_tcp(CL4, NET4, 40000, 80);
    let https = up(unpaid).ipv4_tcp(CL4, NET4, 40000, 443);
    let answer = down(unpaid).ipv4_tcp_flags(NET4, CL4, 80, 40000, 0x12);
    let reset = down(unpaid).ipv4_tcp_flags(NET4, CL4, 443, 40000, 0x14);
    let syn_ack_443 = down(unpaid).ipv4_tcp_flags(NET4, CL4, 443, 40000, 0x12);
    failures.extend(check_skb(&t, "unpaid http syn", tcu, u, unpaid, &http, 0, Verdict::PassPortal, PORTAL_MARK));
    failures.extend(check_skb(&t, "unpaid https syn", tcu, u, unpaid, &https, 0, Verdict::PassPortal, PORTAL_MARK));
    failures.extend(check(&t, "unpaid http on xdp (cannot mark)", xdp, u, unpaid, &http, Verdict::DropUnpaid));
    failures.extend(check_skb(&t, "redirect answer from the gateway", tcd, d, unpaid, &answer, 0, Verdict::PassPortal, 0));
    failures.extend(check_skb(&t, "http answer forwarded from upstream", tcd, d, unpaid, &answer, FORWARDED, Verdict::DropUnpaid, 0));
    failures.extend(check_skb(&t, "reset from 443 by the gateway", tcd, d, unpaid, &reset, 0, Verdict::PassPortal, 0));
    failures.extend(check_skb(&t, "reset from 443 forwarded", tcd, d, unpaid, &reset, FORWARDED, Verdict::DropUnpaid, 0));
    failures.extend(check_skb(&t, "syn-ack from 443, even local", tcd, d, unpaid, &syn_ack_443, 0, Verdict::DropUnpaid, 0));
    // An exhausted client is redirected too (to buy more).
    let broke = client(191);
    t.meter.maps_mut().add_client(broke).expect("add client");
    let http = up(broke).ipv4_tcp(CL4, NET4, 40000, 80);
    failures.extend(check_skb(&t, "exhausted http syn", tcu, u, broke, &http, 0, Verdict::PassPortal, PORTAL_MARK));
    let answer = down(broke).ipv4_tcp_flags(NET4, CL4, 80, 40000, 0x12);
    failures.extend(check_skb(&t, "exhausted, forwarded http answer", tcd, d, broke, &answer, FORWARDED, Verdict::DropCreditExhausted, 0));
    // Less than one full frame left: redirected like an exhausted client, not billed
    // (the crumbs would pay a SYN and a request upstream, never the answer).
    let crumbs = client(193);
    t.meter.maps_mut().add_client(crumbs).expect("add client");
    t.meter.maps_mut().raise_credit(crumbs, ByteCount(1000)).expect("credit");
    let http = up(crumbs).ipv4_tcp(CL4, NET4, 40000, 80);
    failures.extend(check_skb(&t, "http syn, under a frame left", tcu, u, crumbs, &http, 0, Verdict::PassPortal, PORTAL_MARK));
    let answer = down(crumbs).ipv4_tcp_flags(NET4, CL4, 80, 40000, 0x12);
    failures.extend(check_skb(&t, "forwarded http answer, under a frame left", tcd, d, crumbs, &answer, FORWARDED, Verdict::DropCreditExhausted, 0));
    // A paid client's HTTP is billed, unmarked, whatever its origin.
    let paid = client(192);
    t.meter.maps_mut().add_client(paid).expect("add client");
    t.meter.maps_mut().raise_credit(paid, ByteCount(1_000_000)).expect("credit");
    let http = up(paid).ipv4_tcp(CL4, NET4, 40000, 80);
    let answer = down(paid).ipv4_tcp_flags(NET4, CL4, 80, 40000, 0x12);
    failures.extend(check_skb(&t, "paid http syn", tcu, u, paid, &http, 0, Verdict::PassPaid, 0));
    failures.extend(check_skb(&t, "paid http answer from upstream", tcd, d, paid, &answer, FORWARDED, Verdict::PassPaid, 0));
    failures.extend(check(&t, "paid http on xdp", xdp, u, paid, &http, Verdict::PassPaid));
    assert_all(failures);
}

/// The portal draws from the MAC's payment-port garden budget: a flood of port-80
/// frames from an unpaid MAC is cut at the burst, and does not spill into billing.
#[test]
fn portal_frames_are_bounded_by_the_garden_budget() {
    let garden = GardenLimits { services: BucketParams::new(0, 0), payment: BucketParams::new(1, 1_000) };
    let Some(t) = load_with_garden(garden) else { return };
    let mac = client(193);
    let http = {
        let mut l4 = bitmesh_common::kernel::frames::tcp_flags(40000, 80, 0x18);
        l4.resize(20 + 400 - 54, 0); // 400-byte frames
        up(mac).ipv4(CL4, NET4, 6, &l4)
    };
    assert_eq!(http.len(), 400);
    let mut passed = 0;
    let mut last = None;
    for _ in 0..5 {
        let (out, ctx) = t.meter.test_run_skb(MeterProgram::TcUpload, &http, Default::default()).expect("test run");
        if out.passed {
            passed += 1;
            assert_eq!(ctx.mark, bitmesh_common::kernel::PORTAL_MARK);
        }
        last = Some(out.passed);
    }
    assert_eq!(passed, 2, "two 400-byte frames fit the 1000-byte burst, the third does not");
    assert_eq!(last, Some(false));
    let stats = t.meter.maps().stats().expect("stats");
    assert_eq!(stats.get(Direction::Upload, Verdict::DropGardenBudget).packets, 3);
    assert!(usage_of(&t, mac).is_none(), "the kernel never inserts an unknown MAC");
}
