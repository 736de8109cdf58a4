//! End-to-end: a long download runs at the link's speed. The client's own count of
//! what it received (interface counters, which see GSO aggregates on the veth) and
//! the gateway's billing (wire frames) must stay close enough that the client never
//! holds back payment for bytes it really got: the agent estimates the wire bytes
//! from its packet counters (docs/client.md, "What the agent counts").

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bitcoin::Amount;
use bitmesh_tests::client::AgentOpts;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::Testbed;

const MIB: u64 = 1 << 20;

#[test]
fn a_long_download_runs_at_link_speed_without_the_client_holding_back_payment() {
    let Some(world) = Testbed::start(1).unwrap() else { return };
    let funding = world.fund(1, Amount::from_sat(100_000)).unwrap();
    // 100 sat/MiB: 80 MiB fit in a 40,000 sat zero-conf channel with room to spare.
    let opts = ControllerOpts { price_msat_per_mib: Some(100_000), ..ControllerOpts::story() };
    let ctl = world.start_controller(&opts).unwrap();
    let mut a = world.start_agent(0, &AgentOpts::new(funding[0].file.clone(), 30_000)).unwrap();
    a.wait_for("channel funded", Duration::from_secs(30)).unwrap();
    // Unconfirmed channels get at most the first payment + one chunk: confirm them.
    world.mine(1);
    // 80 MiB at 8 MiB/s: ten seconds when payments keep up.
    let f = world.fetch_paced(0, 80 * MIB, 8 * MIB, Duration::from_secs(10));
    let row = ctl.client(&world.lan.clients[0].mac).unwrap();
    let status = a.output().split('\r').next_back().unwrap_or_default().to_owned();
    assert!(f.complete, "{f:?}\ngateway: {row}\nagent: {status}");
    assert!(f.elapsed < Duration::from_secs(25), "payments held the download back: {f:?}\ngateway: {row}\nagent: {status}");

    // The agent's own count (its wire estimate, saved on exit) against the gateway's
    // bill: it covers the bill, and by little more (the payment API's own traffic,
    // which the gateway does not bill), so the cap still means something.
    a.stop();
    let billed = row["up_bytes"].as_u64().unwrap() + row["down_bytes"].as_u64().unwrap();
    let counted = a.state().unwrap()["received"].as_u64().unwrap();
    eprintln!("80 MiB in {:.1?}; gateway billed {billed} bytes, agent counted {counted}", f.elapsed);
    assert!(counted >= billed, "agent counted {counted} < billed {billed}");
    assert!(counted <= billed + billed / 100, "agent counted {counted}, more than 1% over the bill {billed}");
}
