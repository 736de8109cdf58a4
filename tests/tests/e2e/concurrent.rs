//! End-to-end: twenty clients open channels, pay and download at the same time.

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bitcoin::Amount;
use bitmesh_common::pricing::{bytes_for_payment, PriceMsatPerMib};
use bitmesh_tests::client::AgentOpts;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::Testbed;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const CLIENTS: usize = 20;

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn twenty_clients_pay_and_download_concurrently_each_billed_within_what_it_paid() {
    let Some(world) = Testbed::start(CLIENTS).unwrap() else { return };
    let funding = world.fund(CLIENTS, Amount::from_sat(100_000)).unwrap();
    // Twenty zero-conf channels of 4,000 sat unconfirmed credit each (first payment +
    // one chunk) exceed the default 20,000 sat exposure: raise it for this test.
    let opts = ControllerOpts { extra: vec!["--zero-conf-exposure-sat".into(), "100000".into()], ..ControllerOpts::story() };
    let price = PriceMsatPerMib::new(opts.price_msat_per_mib.unwrap()).unwrap();
    let ctl = world.start_controller(&opts).unwrap();

    let mut agents: Vec<_> = (0..CLIENTS)
        .map(|i| world.start_agent(i, &AgentOpts::new(funding[i].file.clone(), 30_000)).unwrap())
        .collect();
    for a in &mut agents {
        a.wait_for("channel funded", Duration::from_secs(90)).unwrap();
    }
    // Unconfirmed channels get at most the first payment + one chunk: confirm them.
    world.mine(1);

    // Every client downloads 5 MiB at 1 MiB/s at once: 20 MiB/s through the meter,
    // two or three top-ups each, all payments landing on the controller together.
    let want = 5 * MIB;
    let fetches: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let world = &world;
                s.spawn(move || world.fetch_paced(i, want, MIB, Duration::from_secs(15)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let worst = fetches.iter().map(|f| f.longest_stall).max().unwrap();
    eprintln!("longest pause of any of the {CLIENTS} downloads: {worst:?}");
    for (i, f) in fetches.iter().enumerate() {
        assert!(f.complete, "client {i}: {f:?}\nagent:\n{}", agents[i].output());
    }

    // The agents stay connected and may still land a top-up they started near the
    // end of their download: read the books once payments have stopped moving, so
    // the clients table and the earnings below are one consistent snapshot.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = ctl.admin_json("earnings").unwrap();
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let now = ctl.admin_json("earnings").unwrap();
        if now == last {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "payments never settled down: {now}");
        last = now;
    }
    let rows = ctl.admin_json("clients").unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), CLIENTS, "{rows:?}");
    let mut held = 0;
    for c in &world.lan.clients {
        let row = rows.iter().find(|r| r["mac"] == c.mac.as_str()).unwrap_or_else(|| panic!("{} missing", c.mac));
        let paid = Amount::from_sat(n(row, "paid_sat"));
        let used = n(row, "up_bytes") + n(row, "down_bytes");
        assert_eq!(n(row, "credited_bytes"), bytes_for_payment(paid, price).to_u64(), "{row}");
        assert!(used <= n(row, "credited_bytes"), "used past the budget: {row}");
        assert!(used >= want, "billed less than the payload: {row}");
        assert_eq!(row["ip"], c.ip.to_string(), "the channel is bound to the client's own address: {row}");
        held += paid.to_sat();
    }
    let channels = ctl.admin_json("channels").unwrap();
    let channels = channels.as_array().unwrap();
    assert_eq!(channels.iter().filter(|c| c["state"] == "open").count(), CLIENTS, "{channels:?}");
    assert!(channels.iter().all(|c| n(c, "payments") >= 2), "each client topped up: {channels:?}");
    assert_eq!(n(&ctl.admin_json("earnings").unwrap(), "held_open"), held);
}
