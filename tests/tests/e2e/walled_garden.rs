//! End-to-end: the namespace world works, and an unpaid client is held in the walled
//! garden by the real controller (docs/design.md sections 3 and 8).

use std::time::Duration;

use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::Testbed;

#[test]
fn unpaid_client_is_blocked_upstream_but_reaches_the_payment_api() {
    let Some(world) = Testbed::start(2).unwrap() else { return };

    // Before the controller runs, the world is an open network: NAT to upstream works.
    let open = world.fetch(0, 100_000, Duration::from_secs(5));
    assert!(open.complete, "no meter yet, the fetch must work: {open:?}");

    let ctl = world.start_controller(&ControllerOpts::story()).unwrap();

    // Unpaid: the kernel drops everything but the walled garden.
    let blocked = world.fetch(0, 100_000, Duration::from_secs(2));
    assert!(!blocked.complete && blocked.bytes == 0, "unpaid client reached upstream: {blocked:?}");
    let (code, body) = world.api_get(0, "/v1/terms", Duration::from_secs(5)).unwrap();
    assert_eq!(code, 200, "terms: {body}");
    let terms: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(terms["price_msat_per_mib"], 1_000_000, "{terms}");
    let (code, body) = world.api_get(1, "/captive-portal/api", Duration::from_secs(5)).unwrap();
    assert_eq!(code, 200, "captive portal: {body}");
    assert!(body.contains("\"captive\":true"), "{body}");

    // The operator sees no paying client, and the meter counted nothing billable.
    let clients = ctl.admin_json("clients").unwrap();
    assert!(clients.as_array().unwrap().iter().all(|c| c["credited_bytes"].as_u64().unwrap_or(0) == 0), "{clients}");
}
