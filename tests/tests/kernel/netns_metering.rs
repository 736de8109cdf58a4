//! Network tests: two namespaces joined by a veth pair, the meter attached on the
//! gateway side exactly as on `wlan0`, real sockets on both sides.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test should panic

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result};
use bitmesh::meter::{Mac, UploadHook, Verdict};
use bitmesh_common::pricing::ByteCount;
use bitmesh_tests::env::{is_root, skip};
use bitmesh_tests::network::{in_netns, TestMeter, Topology, CLIENT_MAC};

const GW: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const CL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// A port on the gateway that stands for "the internet": not in the walled garden.
const UPSTREAM_PORT: u16 = 5555;
/// Short: every expected loss waits this long once.
const WAIT: Duration = Duration::from_millis(300);

fn client_mac() -> Mac {
    CLIENT_MAC.parse().unwrap_or_default()
}

fn can_run() -> bool {
    if !is_root() {
        skip("network tests need root (namespaces, BPF)");
        return false;
    }
    true
}

/// A topology with the meter attached to the gateway side on `hook`.
struct Metered {
    meter: TestMeter,
    net: Topology,
}

impl Metered {
    fn new(hook: UploadHook) -> Result<Self> {
        let net = Topology::new()?;
        let mut meter = TestMeter::load()?;
        let iface = net.gateway_if().to_string();
        let used = in_netns(&net.gateway, || Ok(meter.meter.attach(&iface, hook)?))?;
        assert_eq!(used, hook, "hook actually used");
        // Field order in Metered drops the meter (and its pins) before the netns.
        Ok(Self { meter, net })
    }

    fn udp(&self, on_gateway: bool, addr: SocketAddrV4) -> Result<UdpSocket> {
        let ns = if on_gateway { &self.net.gateway } else { &self.net.client };
        let s = in_netns(ns, || Ok(UdpSocket::bind(addr)?))?;
        s.set_read_timeout(Some(WAIT))?;
        force_rcvbuf(&s)?;
        Ok(s)
    }

    /// Send `n` datagrams of `size` payload bytes from `from` to `to`; count how many
    /// `rx` receives.
    fn blast(&self, from: &UdpSocket, to: SocketAddrV4, rx: &UdpSocket, n: usize, size: usize) -> Result<usize> {
        let payload = vec![0x42u8; size];
        for _ in 0..n {
            from.send_to(&payload, to)?;
            // Pace a little so the veth queue never drops: the test is about billing.
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut got = 0;
        let mut buf = [0u8; 2048];
        while rx.recv_from(&mut buf).is_ok() {
            got += 1;
        }
        Ok(got)
    }

    fn usage(&self) -> bitmesh::meter::Usage {
        self.meter.meter.maps().usage(client_mac()).ok().flatten().map(|u| u.usage).unwrap_or_default()
    }

    fn ping_gateway(&self) -> bool {
        bitmesh_tests::network::ping(&self.net.client, GW, Duration::from_secs(1)).unwrap_or(false)
    }
}

#[test]
fn udp_upload_is_billed_exactly_n_times_payload_plus_42_on_every_hook() {
    if !can_run() {
        return;
    }
    const N: usize = 200;
    const S: usize = 300;
    for hook in [UploadHook::XdpNative, UploadHook::XdpGeneric, UploadHook::Tc] {
        let mut m = Metered::new(hook).expect("topology");
        m.meter.meter.maps_mut().add_client(client_mac()).expect("meter the client");
        m.meter.meter.maps_mut().raise_credit(client_mac(), ByteCount(1 << 30)).expect("credit");
        // Resolve ARP first (walled garden, never billed).
        assert!(m.ping_gateway(), "{hook}: ping to the gateway");
        let rx = m.udp(true, SocketAddrV4::new(GW, UPSTREAM_PORT)).expect("rx");
        let tx = m.udp(false, SocketAddrV4::new(CL, 0)).expect("tx");
        let got = m.blast(&tx, SocketAddrV4::new(GW, UPSTREAM_PORT), &rx, N, S).expect("blast");
        assert_eq!(got, N, "{hook}: all datagrams delivered");
        let u = m.usage();
        assert_eq!(u.up_bytes, (N * (S + 42)) as u64, "{hook}: upload bytes billed");
        assert_eq!(u.up_pkts, N as u64, "{hook}: upload frames billed");
        assert_eq!(u.down_bytes, 0, "{hook}: nothing billed downstream");
        assert!(u.last_seen_ns > 0, "{hook}: last seen set");
        let idle = m.meter.meter.maps().usage(client_mac()).expect("usage").expect("client").idle_for().expect("seen");
        assert!(idle < Duration::from_secs(5), "{hook}: last seen is recent ({idle:?})");
    }
}

#[test]
fn client_is_cut_off_at_its_credit_and_resumes_after_a_top_up() {
    if !can_run() {
        return;
    }
    const S: usize = 500;
    const FRAME: u64 = (S + 42) as u64;
    let mut m = Metered::new(UploadHook::XdpNative).expect("topology");
    // Credit for 10 frames and a bit: the 11th does not fit.
    let credit = 10 * FRAME + FRAME / 2;
    m.meter.meter.maps_mut().add_client(client_mac()).expect("meter the client");
    m.meter.meter.maps_mut().raise_credit(client_mac(), ByteCount(credit)).expect("credit");
    assert!(m.ping_gateway(), "ping to the gateway");
    let rx = m.udp(true, SocketAddrV4::new(GW, UPSTREAM_PORT)).expect("rx");
    let tx = m.udp(false, SocketAddrV4::new(CL, 0)).expect("tx");
    let to = SocketAddrV4::new(GW, UPSTREAM_PORT);
    let got = m.blast(&tx, to, &rx, 50, S).expect("blast");
    let u = m.usage();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert!(u.up_bytes <= credit + cpus * FRAME, "overshoot bounded: {} > {credit} + {cpus} frames", u.up_bytes);
    assert!(u.up_bytes <= credit, "one sender on one flow does not overshoot at all");
    assert_eq!(got as u64, u.up_pkts, "what got through is exactly what was billed");
    assert_eq!(got, 10, "credit covers exactly 10 frames");
    // Nothing but the walled garden now: ping and DNS to the gateway still work.
    assert!(m.ping_gateway(), "ping to the gateway while exhausted");
    let dns = m.udp(true, SocketAddrV4::new(GW, 53)).expect("dns server");
    let q = m.udp(false, SocketAddrV4::new(CL, 0)).expect("resolver");
    assert!(dns_round_trip(&dns, &q).expect("dns"), "dns while exhausted");
    assert_eq!(m.blast(&tx, to, &rx, 5, S).expect("blast"), 0, "upstream blocked while exhausted");
    let stats = m.meter.meter.maps().stats().expect("stats");
    assert!(stats.sum(Verdict::DropCreditExhausted).packets >= 45, "drops counted: {stats:?}");
    // A top-up resumes the flow for exactly what it buys.
    m.meter.meter.maps_mut().raise_credit(client_mac(), ByteCount(credit + 5 * FRAME)).expect("top up");
    assert_eq!(m.blast(&tx, to, &rx, 20, S).expect("blast"), 5, "five more frames after the top-up");
    assert_eq!(m.usage().up_bytes, 15 * FRAME);
}

#[test]
fn download_is_billed_on_egress_and_blocked_when_unpaid() {
    if !can_run() {
        return;
    }
    const N: usize = 100;
    const S: usize = 700;
    let mut m = Metered::new(UploadHook::Tc).expect("topology");
    let rx = m.udp(false, SocketAddrV4::new(CL, 6000)).expect("client rx");
    let tx = m.udp(true, SocketAddrV4::new(GW, UPSTREAM_PORT)).expect("gateway tx");
    let to = SocketAddrV4::new(CL, 6000);
    // Unpaid: the gateway's ARP (broadcast, walled garden) resolves, data does not pass.
    assert_eq!(m.blast(&tx, to, &rx, 10, S).expect("blast"), 0, "unpaid download dropped");
    assert_eq!(m.usage(), Default::default(), "unknown client: nothing billed");
    m.meter.meter.maps_mut().add_client(client_mac()).expect("meter the client");
    m.meter.meter.maps_mut().raise_credit(client_mac(), ByteCount(1 << 30)).expect("credit");
    let before = m.usage();
    assert_eq!(m.blast(&tx, to, &rx, N, S).expect("blast"), N);
    let u = m.usage();
    assert_eq!(u.down_bytes - before.down_bytes, (N * (S + 42)) as u64, "download bytes billed");
    assert_eq!(u.down_pkts - before.down_pkts, N as u64);
    assert_eq!(u.up_bytes, 0, "nothing billed upstream");
}

#[test]
fn unpaid_client_reaches_arp_dhcp_dns_and_payment_on_the_gateway_but_not_upstream() {
    if !can_run() {
        return;
    }
    let m = Metered::new(UploadHook::XdpNative).expect("topology");
    // ARP + ICMP echo.
    assert!(m.ping_gateway(), "ping (and ARP) to the gateway while unpaid");
    let neigh = m.net.client.ip(&["neigh", "show", "10.77.0.1"]).expect("neigh");
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
    assert!(neigh.contains("02:77:00:00:00:01"), "ARP resolved the gateway: {neigh}");
    // DHCP: discover to broadcast from port 68, offer back from the gateway's 67.
    let server = m.udp(true, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67)).expect("dhcp server");
    let client = m.udp(false, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)).expect("dhcp client");
    client.set_broadcast(true).expect("broadcast");
    server.set_broadcast(true).expect("broadcast");
    let iface = m.net.veth.b.clone();
    bind_to_device(&client, &iface).expect("bind client to its veth");
    client.send_to(b"DHCPDISCOVER", SocketAddrV4::new(Ipv4Addr::BROADCAST, 67)).expect("discover");
    let mut buf = [0u8; 512];
    let (n, _) = server.recv_from(&mut buf).expect("gateway received the discover");
    assert_eq!(&buf[..n], b"DHCPDISCOVER");
    server.send_to(b"DHCPOFFER", SocketAddrV4::new(CL, 68)).expect("offer");
    let (n, from) = client.recv_from(&mut buf).expect("client received the offer");
    assert_eq!((&buf[..n], from.port()), (&b"DHCPOFFER"[..], 67));
    // DNS over UDP.
    let dns = m.udp(true, SocketAddrV4::new(GW, 53)).expect("dns server");
    let q = m.udp(false, SocketAddrV4::new(CL, 0)).expect("resolver");
    assert!(dns_round_trip(&dns, &q).expect("dns"), "dns to the gateway while unpaid");
    // Payment API over TCP.
    let listener = in_netns(&m.net.gateway, || Ok(TcpListener::bind((GW, 3141))?)).expect("payment listener");
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b)?;
        s.write_all(b"paid")?;
        Ok(())
    });
    let mut conn = in_netns(&m.net.client, || Ok(TcpStream::connect_timeout(&(GW, 3141).into(), WAIT * 3)?)).expect("connect payment port");
    conn.set_read_timeout(Some(WAIT * 3)).expect("timeout");
    conn.write_all(b"open").expect("write");
    let mut b = [0u8; 4];
    conn.read_exact(&mut b).expect("payment api answered");
    assert_eq!(&b, b"paid");
    server.join().expect("join").expect("server");
    // But not upstream: UDP and TCP to a non-garden port go nowhere.
    let rx = m.udp(true, SocketAddrV4::new(GW, UPSTREAM_PORT)).expect("rx");
    let tx = m.udp(false, SocketAddrV4::new(CL, 0)).expect("tx");
    assert_eq!(m.blast(&tx, SocketAddrV4::new(GW, UPSTREAM_PORT), &rx, 10, 100).expect("blast"), 0);
    let blocked = in_netns(&m.net.client, || Ok(TcpStream::connect_timeout(&(GW, 22).into(), WAIT).is_err())).expect("ssh attempt");
    assert!(blocked, "tcp to a non-garden port does not connect");
    let stats = m.meter.meter.maps().stats().expect("stats");
    assert!(stats.walled_garden().packets >= 8, "walled garden counted: {stats:?}");
    assert!(stats.sum(Verdict::DropUnpaid).packets >= 10, "unpaid drops counted: {stats:?}");
    assert_eq!(stats.sum(Verdict::PassPaid).packets, 0, "nothing billed");
    assert_eq!(m.usage(), Default::default());
}

#[test]
fn detach_removes_enforcement_and_pins_but_keeps_counters() {
    if !can_run() {
        return;
    }
    let mut m = Metered::new(UploadHook::Tc).expect("topology");
    let pins = m.meter.pins.path().to_path_buf();
    let links: Vec<_> = std::fs::read_dir(&pins).expect("pins").filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| n.starts_with("link_")).collect();
    assert_eq!(links.len(), 2, "upload and download links pinned: {links:?}");
    m.meter.meter.maps_mut().add_client(client_mac()).expect("add");
    let Metered { meter, net } = m;
    let bitmesh_tests::network::TestMeter { meter: inner, config, pins: pin_dir } = meter;
    inner.detach().expect("detach");
    let left: Vec<_> = std::fs::read_dir(&pins).expect("pins").filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).collect();
    assert!(left.iter().all(|n| !n.starts_with("link_")), "links unpinned: {left:?}");
    assert!(left.contains(&"USAGE".to_string()), "maps stay pinned: {left:?}");
    // Without the meter, upstream traffic of an unpaid client flows again.
    let rx = in_netns(&net.gateway, || Ok(UdpSocket::bind((GW, UPSTREAM_PORT))?)).expect("rx");
    rx.set_read_timeout(Some(WAIT)).expect("timeout");
    let tx = in_netns(&net.client, || Ok(UdpSocket::bind((CL, 0))?)).expect("tx");
    tx.send_to(b"x", (GW, UPSTREAM_PORT)).expect("send");
    let mut buf = [0u8; 8];
    assert!(rx.recv_from(&mut buf).is_ok(), "traffic flows after detach");
    drop(config);
    drop(pin_dir);
}

fn dns_round_trip(server: &UdpSocket, client: &UdpSocket) -> Result<bool> {
    client.send_to(b"\x12\x34query", SocketAddrV4::new(GW, 53))?;
    let mut buf = [0u8; 512];
    let Ok((n, from)) = server.recv_from(&mut buf) else { return Ok(false) };
    server.send_to(&buf[..n], from)?;
    let Ok((m, _)) = client.recv_from(&mut buf) else { return Ok(false) };
    Ok(m == n)
}

/// A receive buffer large enough that a burst is never dropped by the socket
/// (skb truesize, not payload, counts against it).
fn force_rcvbuf(socket: &UdpSocket) -> Result<()> {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 8 << 20;
    // SAFETY: valid fd; pointer/len describe `size`.
    let rc = unsafe {
        libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&size as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVBUFFORCE");
    }
    Ok(())
}

fn bind_to_device(socket: &UdpSocket, iface: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd, pointer/len describe `iface`'s bytes.
    let rc = unsafe {
        libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_BINDTODEVICE, iface.as_ptr().cast(), iface.len() as libc::socklen_t)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_BINDTODEVICE");
    }
    Ok(())
}

#[test]
fn enforcement_and_counters_survive_a_controller_restart() {
    if !can_run() {
        return;
    }
    const S: usize = 200;
    let mut m = Metered::new(UploadHook::XdpNative).expect("topology");
    m.meter.meter.maps_mut().add_client(client_mac()).expect("meter the client");
    m.meter.meter.maps_mut().raise_credit(client_mac(), ByteCount(1 << 20)).expect("credit");
    assert!(m.ping_gateway());
    let rx = m.udp(true, SocketAddrV4::new(GW, UPSTREAM_PORT)).expect("rx");
    let tx = m.udp(false, SocketAddrV4::new(CL, 0)).expect("tx");
    let to = SocketAddrV4::new(GW, UPSTREAM_PORT);
    assert_eq!(m.blast(&tx, to, &rx, 10, S).expect("blast"), 10);
    // "Crash": the controller's meter goes away without detaching.
    let Metered { meter, net } = m;
    let bitmesh_tests::network::TestMeter { meter: inner, config, pins } = meter;
    drop(inner);
    // The pinned programs still meter: a stranger is still blocked, the client billed.
    let m = Metered { meter: bitmesh_tests::network::TestMeter { meter: bitmesh::meter::Meter::load(&config).expect("reload"), config, pins }, net };
    assert_eq!(m.blast(&tx, to, &rx, 10, S).expect("blast"), 10, "paid traffic flows while no controller runs");
    assert_eq!(m.usage().up_pkts, 20, "and is billed by the pinned programs");
    // The restarted controller takes the attachments over (no second program).
    let mut m = m;
    let iface = m.net.gateway_if().to_string();
    in_netns(&m.net.gateway, || Ok(m.meter.meter.attach(&iface, UploadHook::XdpNative)?)).expect("re-attach");
    assert_eq!(m.blast(&tx, to, &rx, 10, S).expect("blast"), 10);
    let u = m.usage();
    assert_eq!((u.up_pkts, u.up_bytes), (30, 30 * (S as u64 + 42)), "each frame billed once, counters kept");
    // The download link was taken over too, not doubled: each frame billed once.
    let crx = m.udp(false, SocketAddrV4::new(CL, 6000)).expect("client rx");
    assert_eq!(m.blast(&rx, SocketAddrV4::new(CL, 6000), &crx, 10, S).expect("blast down"), 10);
    assert_eq!(m.usage().down_pkts, 10, "download billed once per frame");
}

#[test]
fn unpaid_client_resolves_and_pings_the_gateway_over_ipv6_but_gets_nothing_else() {
    if !can_run() {
        return;
    }
    let net = Topology::dual_stack().expect("topology");
    let mut meter = bitmesh_tests::network::TestMeter::load().expect("load");
    let iface = net.gateway_if().to_string();
    in_netns(&net.gateway, || Ok(meter.meter.attach(&iface, UploadHook::XdpNative)?)).expect("attach");
    let gw6: std::net::Ipv6Addr = "2001:db8:77::1".parse().expect("addr");
    // Neighbour solicitation/advertisement both ways, then echo: all walled garden.
    assert!(bitmesh_tests::network::ping6(&net.client, gw6, Duration::from_secs(2)).expect("ping6"), "ping6 to the gateway while unpaid");
    let neigh = net.client.ip(&["-6", "neigh", "show", "2001:db8:77::1"]).expect("neigh");
    assert!(String::from_utf8_lossy(&neigh.stdout).contains("02:77:00:00:00:01"), "ND resolved the gateway");
    // UDP over IPv6 to a non-garden port is dropped.
    let rx = in_netns(&net.gateway, || Ok(UdpSocket::bind((gw6, UPSTREAM_PORT))?)).expect("rx");
    rx.set_read_timeout(Some(WAIT)).expect("timeout");
    let tx = in_netns(&net.client, || Ok(UdpSocket::bind(("2001:db8:77::2", 0))?)).expect("tx");
    for _ in 0..5 {
        tx.send_to(b"upstream", (gw6, UPSTREAM_PORT)).expect("send");
    }
    let mut buf = [0u8; 16];
    assert!(rx.recv_from(&mut buf).is_err(), "unpaid IPv6 upstream traffic dropped");
    let stats = meter.meter.maps().stats().expect("stats");
    assert!(stats.walled_garden().packets >= 3, "ND and echo counted as walled garden: {stats:?}");
    assert!(stats.sum(Verdict::DropUnpaid).packets >= 5, "{stats:?}");
    assert_eq!(stats.sum(Verdict::PassPaid).packets, 0);
    drop(meter);
}

#[test]
fn tcp_download_through_gso_is_billed_as_the_frames_on_the_wire() {
    if !can_run() {
        return;
    }
    const PAYLOAD: usize = 4 << 20;
    let mut m = Metered::new(UploadHook::Tc).expect("topology");
    m.meter.meter.maps_mut().add_client(client_mac()).expect("meter the client");
    m.meter.meter.maps_mut().raise_credit(client_mac(), ByteCount(1 << 30)).expect("credit");
    let listener = in_netns(&m.net.gateway, || Ok(TcpListener::bind((GW, 8080))?)).expect("listen");
    let server = std::thread::spawn(move || -> Result<u64> {
        let (mut s, _) = listener.accept()?;
        let chunk = vec![0x5au8; 64 << 10];
        for _ in 0..PAYLOAD / chunk.len() {
            s.write_all(&chunk)?;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        // Give the last ACKs a moment, then ask TCP how much it resent.
        std::thread::sleep(Duration::from_millis(100));
        Ok(retransmitted_segments(&s))
    });
    let mut conn = in_netns(&m.net.client, || Ok(TcpStream::connect((GW, 8080))?)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    while got < PAYLOAD {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let retrans = server.join().expect("join").expect("server");
    assert_eq!(got, PAYLOAD, "whole download received");
    let u = m.usage();
    // GSO super-packets are billed as the segments they become on the wire (see
    // docs/kernel-abi.md): every segment carries 66 bytes of Ethernet/IPv4/TCP
    // headers (with timestamps), the SYN-ACK 8 more (its options).
    let payload = PAYLOAD as u64;
    eprintln!("tcp download: payload {payload} B, billed {} B in {} frames", u.down_bytes, u.down_pkts);
    assert!(u.down_pkts >= payload.div_ceil(1448), "at least one frame per MSS: {}", u.down_pkts);
    // Retransmitted segments are on the wire too: billed, payload and all.
    let headers = u.down_bytes - payload;
    let max = 66 * u.down_pkts + 16 + retrans * 1448;
    assert!(
        (66 * u.down_pkts..=max).contains(&headers),
        "billed {headers} B beyond the payload for {} frames ({retrans} retransmitted), want 66 per frame",
        u.down_pkts
    );
    assert!(u.up_pkts > 0, "ACKs billed upstream");
}

/// Segments this TCP socket retransmitted (TCP_INFO tcpi_total_retrans).
fn retransmitted_segments(s: &TcpStream) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd; pointer/len describe `info`.
    let rc = unsafe { libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len) };
    if rc != 0 {
        return u64::MAX / 4096; // unknown: do not constrain the bound
    }
    u64::from(info.tcpi_total_retrans)
}

#[test]
fn an_unpaid_client_tunnels_at_most_its_garden_budget_through_port_53() {
    use bitmesh_tests::garden_attack::{garden_bound, tcp_tunnel, udp_tunnel, TunnelResolver};
    if !can_run() {
        return;
    }
    // The default budgets (MeterConfig::new), as the controller runs them.
    let m = Metered::new(UploadHook::Tc).expect("topology");
    let resolver = TunnelResolver::start(&m.net.gateway, GW);
    let start = std::time::Instant::now();
    let sock = in_netns(&m.net.client, || {
        let s = UdpSocket::bind((CL, 0))?;
        s.connect((GW, 53))?;
        Ok(s)
    })
    .expect("udp");
    let back = udp_tunnel(&sock);
    let up = resolver.take();
    let elapsed = start.elapsed();
    eprintln!("dns tunnel over udp: {up} B up, {back} B back in {elapsed:?}");
    assert!(up > 0 && up + back <= garden_bound(elapsed), "udp port 53 carried {} B in {elapsed:?}", up + back);
    // TCP from the same device: its services budget is spent, the connection
    // cannot carry more than what refills.
    let start = std::time::Instant::now();
    let back = in_netns(&m.net.client, || {
        let s = TcpStream::connect_timeout(&(GW, 53).into(), Duration::from_secs(3));
        Ok(s.map(tcp_tunnel).unwrap_or(0))
    })
    .expect("tcp");
    let up = resolver.take();
    let elapsed = start.elapsed();
    eprintln!("dns tunnel over tcp: {up} B up, {back} B back in {elapsed:?}");
    assert!(up + back <= refill_bound(elapsed), "tcp port 53 carried {} B in {elapsed:?}", up + back);
    // Nothing was metered: the kernel only made a garden entry for the MAC.
    assert_eq!(m.usage(), Default::default());
    assert!(m.meter.meter.maps().garden_macs().expect("garden").contains(&client_mac()));
    let stats = m.meter.meter.maps().stats().expect("stats");
    assert!(stats.sum(Verdict::DropGardenBudget).packets > 0, "{stats:?}");
    // Address configuration is never budgeted: ARP (a fresh neighbour entry) and
    // DHCP to the gateway still work though the services budget is spent.
    m.net.client.ip(&["neigh", "flush", "dev", &m.net.veth.b]).expect("flush");
    let rx = m.udp(true, SocketAddrV4::new(GW, 67)).expect("dhcp server");
    let tx = m.udp(false, SocketAddrV4::new(CL, 68)).expect("dhcp client");
    tx.send_to(b"DHCPREQUEST", SocketAddrV4::new(GW, 67)).expect("request");
    let mut buf = [0u8; 64];
    assert!(rx.recv_from(&mut buf).is_ok(), "dhcp (and arp) to the gateway after the dns budget is spent");
}

/// The refill alone over `elapsed`, plus one frame per CPU racing the bucket.
fn refill_bound(elapsed: Duration) -> u64 {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    bitmesh::meter::GARDEN_SERVICES_RATE * (elapsed.as_secs() + 1) + 2 * cpus * 1514
}

#[test]
fn a_cloned_mac_sending_from_another_address_gets_nothing_billable_through() {
    if !can_run() {
        return;
    }
    for hook in [UploadHook::XdpNative, UploadHook::Tc] {
        let mut m = Metered::new(hook).expect("topology");
        m.meter.meter.maps_mut().add_client(client_mac()).expect("add client");
        m.meter.meter.maps_mut().raise_credit(client_mac(), ByteCount(1 << 30)).expect("credit");
        m.meter.meter.maps_mut().bind_source(client_mac(), CL.into()).expect("bind");
        let rx = m.udp(true, SocketAddrV4::new(GW, UPSTREAM_PORT)).expect("rx");
        let to = SocketAddrV4::new(GW, UPSTREAM_PORT);
        let tx = m.udp(false, SocketAddrV4::new(CL, 0)).expect("tx");
        assert_eq!(m.blast(&tx, to, &rx, 10, 100).expect("blast"), 10, "{hook}: the bound client pays and passes");
        let billed = m.usage().up_bytes;
        // The clone: same MAC, another address on the link.
        m.net.client.ip(&["addr", "add", "10.77.0.99/24", "dev", &m.net.veth.b]).expect("second address");
        let clone = m.udp(false, SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 99), 0)).expect("clone tx");
        assert_eq!(m.blast(&clone, to, &rx, 20, 100).expect("blast"), 0, "{hook}: the clone's datagrams pass on the victim's credit");
        assert_eq!(m.usage().up_bytes, billed, "{hook}: nothing billed for the clone");
        let b = m.meter.meter.maps().binding(client_mac()).expect("binding").expect("bound");
        assert!(b.wrong_source_frames >= 20 && b.last_wrong_source == Some(Ipv4Addr::new(10, 77, 0, 99).into()), "{hook}: {b:?}");
        assert_eq!(m.blast(&tx, to, &rx, 5, 100).expect("blast"), 5, "{hook}: the bound client still passes");
    }
}
