//! Attacks on the walled garden and on MAC-based billing, performed against the real
//! controller (`bitmesh run` in namespaces, regtest node, raw sockets and HTTP):
//!
//! * an unpaid client tunnels data through port 53 of the gateway (a resolver that
//!   answers anything carries a DNS tunnel), over UDP and TCP;
//! * a device clones a paying client's MAC and sends from another IP address.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use bitcoin::Amount;
use bitmesh::meter::{Mac, MeterMaps};
use bitmesh_tests::chain::CoinbaseWallet;
use bitmesh_tests::http;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::{ECHO_PORT, Testbed};
use bitmesh_tests::upstream::udp_round_trips;
use bitmesh_tests::garden_attack::{garden_bound, tcp_tunnel, udp_tunnel, TunnelResolver};
use bitmesh_tests::network::{CLIENT_MAC, GATEWAY_IPV4, UPSTREAM_IPV4};

#[test]
fn an_unpaid_client_moves_at_most_the_garden_budget_through_port_53() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new()).unwrap();
    let resolver = TunnelResolver::start(lab.gateway(), GATEWAY_IPV4);
    let ids = lab.add_client_identities(1, false).unwrap();

    // UDP from the lab's client device.
    let start = Instant::now();
    let sock = lab
        .as_client(|| {
            let s = UdpSocket::bind("10.77.0.2:0")?;
            s.connect((GATEWAY_IPV4, 53))?;
            Ok(s)
        })
        .unwrap();
    let back = udp_tunnel(&sock);
    let up = resolver.take();
    let elapsed = start.elapsed();
    eprintln!("dns tunnel over udp: {up} B up, {back} B back in {elapsed:?}");
    assert!(up > 0, "the first queries of an unpaid client are answered (garden, not a block)");
    assert!(up + back <= garden_bound(elapsed), "udp port 53 carried {} B in {elapsed:?}, budget {} B", up + back, garden_bound(elapsed));

    // TCP from another device (its own MAC, its own budget).
    let start = Instant::now();
    let id = ids[0].clone();
    let back = lab
        .as_client(move || {
            let s = http::connect_from(Some(&id), (GATEWAY_IPV4, 53).into())?;
            Ok(tcp_tunnel(s))
        })
        .unwrap();
    let up = resolver.take();
    let elapsed = start.elapsed();
    eprintln!("dns tunnel over tcp: {up} B up, {back} B back in {elapsed:?}");
    assert!(up > 0, "the tcp connection to the resolver is open to an unpaid client");
    assert!(up + back <= garden_bound(elapsed), "tcp port 53 carried {} B in {elapsed:?}, budget {} B", up + back, garden_bound(elapsed));

    // The payment API has its own budget: the client whose DNS budget is spent can
    // still read the terms (and pay).
    let client = lab.scripted_client();
    client.terms().expect("terms after the dns budget is spent");
    // The kernel inserted nothing into CREDIT/USAGE for these unpaid devices.
    let maps = MeterMaps::open_pinned(ctl.pin_dir()).unwrap();
    assert!(maps.all_usage().unwrap().is_empty(), "unpaid clients are never metered");
    let mac: Mac = CLIENT_MAC.parse().unwrap();
    assert!(maps.garden_macs().unwrap().contains(&mac));
}

#[test]
fn a_cloned_mac_with_another_ip_gets_no_billable_bytes_through() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new()).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced().unwrap();
    let mut victim = lab.scripted_client();
    let offer = victim.open(200).unwrap();
    victim.fund(&mut wallet, Amount::from_sat(20_000)).unwrap();
    // Within what an unconfirmed channel may pay (first payment + one chunk).
    victim.pay(offer.min_first_payment).unwrap();
    let udp = lab.client_udp().unwrap();
    assert_eq!(udp_round_trips(&udp, 5, 500), 5, "the paying client reaches the internet");

    // The attacker: same MAC (the client's interface), another address on the link.
    lab.client_ns().ip(&["addr", "add", "10.77.0.99/24", "dev", &lab.lan.clients[0].iface]).unwrap();
    let mac: Mac = CLIENT_MAC.parse().unwrap();
    let maps = MeterMaps::open_pinned(ctl.pin_dir());
    let before = maps.as_ref().ok().and_then(|m| m.usage(mac).ok().flatten()).map(|u| u.usage.up_bytes);
    let cloned = lab
        .as_client(|| {
            let s = UdpSocket::bind("10.77.0.99:0")?;
            s.connect(SocketAddr::from((UPSTREAM_IPV4, ECHO_PORT)))?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(s)
        })
        .unwrap();
    let through = udp_round_trips(&cloned, 20, 500);
    assert_eq!(through, 0, "the cloned MAC from 10.77.0.99 got {through} of 20 datagrams through on the victim's credit");

    let maps = maps.expect("pinned maps");
    let after = maps.usage(mac).unwrap().map(|u| u.usage.up_bytes);
    assert_eq!(after, before, "nothing billed to the victim for the clone's frames");
    let binding = maps.binding(mac).unwrap().expect("the paying client is bound");
    assert_eq!(binding.ipv4, Some(Ipv4Addr::new(10, 77, 0, 2)));
    assert!(binding.wrong_source_frames >= 20, "{binding:?}");
    assert_eq!(binding.last_wrong_source, Some(Ipv4Addr::new(10, 77, 0, 99).into()));
    // The operator is told.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ctl.log().contains("a second address for a bound client's MAC") {
        assert!(Instant::now() < deadline, "no warning in the log:\n{}", ctl.log_tail(30));
        std::thread::sleep(Duration::from_millis(200));
    }
    // And the victim keeps its service.
    assert_eq!(udp_round_trips(&udp, 5, 500), 5, "the paying client still reaches the internet");
}
