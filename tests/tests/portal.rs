//! Captive portal, end to end (docs/design.md sections 3.1 and 5.7): the real
//! controller and kernel meter in the namespace world, an upstream "internet" that
//! logs every request, raw HTTP clients and headless Chromium in client namespaces.
//!
//! * an unpaid client's plain HTTP to any address (the four platforms' probes
//!   included) is answered by the gateway with a redirect to the portal, its HTTPS is
//!   reset at once, and the upstream never sees a request from it;
//! * a paid client's HTTP is untouched (the probes get the real answers);
//! * with the nftables table gone, unpaid stays blocked (fail closed);
//! * in a browser with a phone viewport: an unpaid phone opening an upstream page
//!   lands on the portal page.

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use bitcoin::Amount;
use bitmesh_tests::portal::{add_address, connect, get_as, Connect, Internet, PROBES};
use bitmesh_tests::world::{preflight, wait_until, AgentOpts, ControllerOpts, World, API_PORT, GATEWAY_IP, UPSTREAM_IP};

/// The logging internet's address (next to the world's bulk HTTP server).
const INTERNET: Ipv4Addr = Ipv4Addr::new(10, 89, 0, 3);
const WAIT: Duration = Duration::from_secs(10);

fn portal_url() -> String {
    format!("http://{GATEWAY_IP}:{API_PORT}/portal/")
}

fn http_addr(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 80)
}

/// The probes, unpaid then paid, HTTPS, the upstream's log, and the missing rule.
#[test]
fn unpaid_http_is_answered_by_the_gateway_https_is_reset_paid_is_untouched_and_a_missing_rule_stays_closed() {
    let Some(bin) = preflight() else { return };
    let world = World::new(bin, 2).unwrap();
    add_address(&world.upstream, UPSTREAM_IP, INTERNET).unwrap();
    let internet = Internet::start(&world.upstream, INTERNET).unwrap();
    let funding = world.fund(1, Amount::from_sat(100_000)).unwrap();
    let ctl = world.start_controller(&ControllerOpts::default()).unwrap();
    let unpaid = &world.clients[0].ns;
    let paid = &world.clients[1].ns;

    // Unpaid: every probe, and any other host and path, gets the portal.
    for (host, path, _, _) in PROBES {
        let a = get_as(unpaid, http_addr(INTERNET), host, &format!("{path}?from=unpaid"), WAIT).unwrap_or_else(|e| {
            let nft = world.gateway.exec("nft", &["list", "ruleset"]).map(|o| String::from_utf8_lossy(&o.stdout).to_string());
            let ss = world.gateway.exec("ss", &["-tanp"]).map(|o| String::from_utf8_lossy(&o.stdout).to_string());
            panic!("{host}{path}: {e}\n{nft:?}\n{ss:?}\n{}", ctl.log_tail(5))
        });
        assert_eq!(a.status, 302, "{host}{path}: {a:?}");
        assert_eq!(a.location.as_deref(), Some(portal_url().as_str()), "{host}{path}");
    }
    let a = get_as(unpaid, http_addr(Ipv4Addr::new(192, 0, 2, 7)), "example.org", "/anything?from=unpaid", WAIT).unwrap();
    assert_eq!((a.status, a.location.as_deref()), (302, Some(portal_url().as_str())), "{a:?}");
    // Unpaid HTTPS fails fast: a reset, not a hang.
    assert_eq!(connect(unpaid, SocketAddrV4::new(INTERNET, 443), WAIT), Connect::Refused);
    // The page the redirect points at answers, through the walled garden.
    let (code, body) = world.api_get(0, "/portal/", WAIT).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("<title>BitMesh WiFi"), "{body}");
    // Not one connection from the unpaid client reached upstream.
    assert_eq!(internet.http_connections(), 0, "{:?}", internet.requests());
    assert_eq!(internet.tls_connections(), 0);

    // Paid (a real on-chain channel, the real agent): the real answers.
    let mut agent = world.start_agent(1, &AgentOpts::new(funding[0].file.clone(), 20_000)).unwrap();
    agent.wait_for("channel funded", Duration::from_secs(60)).unwrap();
    world.mine(1);
    // The device is online once its first payment is credited: what the page polls.
    let device = wait_until("client 1's first payment to be credited", Duration::from_secs(30), || {
        let (code, body) = world.api_get(1, "/v1/device", WAIT).ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 200 && v["captive"] == false).then_some(v)
    });
    assert_eq!(device["mac"], world.clients[1].mac, "{device}");
    assert!(device["bytes_remaining"].as_u64().unwrap() > 1514 && device["channel"].is_string(), "{device}");
    let (_, captive) = world.api_get(1, "/captive-portal/api", WAIT).unwrap();
    let captive: serde_json::Value = serde_json::from_str(&captive).unwrap();
    assert_eq!(captive["captive"], false, "{captive}");
    assert_eq!(captive["user-portal-url"], portal_url().as_str());
    assert!(captive["bytes-remaining"].as_u64().unwrap() > 0 && captive["seconds-remaining"].as_u64().unwrap() > 0, "{captive}");
    for (host, path, status, body) in PROBES {
        let a = get_as(paid, http_addr(INTERNET), host, &format!("{path}?from=paid"), WAIT).unwrap();
        assert_eq!(a.status, status, "{host}{path}: {a:?}\nagent:\n{}", agent.output());
        assert_eq!(a.body, body, "{host}{path}");
    }
    assert_eq!(connect(paid, SocketAddrV4::new(INTERNET, 443), WAIT), Connect::Connected);
    let log = internet.requests();
    assert_eq!(log.len(), PROBES.len(), "{log:?}");
    assert!(log.iter().all(|r| r.line.contains("from=paid")), "a request of the unpaid client reached upstream: {log:?}");

    // The rule goes missing: unpaid HTTP is no longer answered, and still nothing
    // reaches upstream (its SYN-ACK is dropped at egress: no handshake completes).
    world.gateway.exec("nft", &["delete", "table", "ip", "bitmesh_portal"]).unwrap();
    let conns = internet.http_connections();
    let short = Duration::from_secs(3);
    assert_eq!(connect(unpaid, http_addr(INTERNET), short), Connect::TimedOut);
    assert!(get_as(unpaid, http_addr(INTERNET), "example.org", "/page?from=unpaid", short).is_err());
    assert_eq!(connect(unpaid, SocketAddrV4::new(INTERNET, 443), short), Connect::TimedOut);
    assert_eq!(internet.http_connections(), conns, "an unpaid connection completed without the rule");
    assert!(internet.requests().iter().all(|r| r.line.contains("from=paid")), "{:?}", internet.requests());
    // The paid client is untouched by the rule's absence.
    let a = get_as(paid, http_addr(INTERNET), "example.org", "/page?from=paid", WAIT).unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    drop(agent);
    drop(ctl);
}
