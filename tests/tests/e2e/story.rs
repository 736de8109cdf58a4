//! End-to-end: the demo's story with every step asserted, on the real binary, the real
//! kernel meter on a bridge, real client agents and a regtest node (docs/design.md 3-6, 8).

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bitcoin::{Amount, Txid};
use bitmesh_channel::chain::Chain;
use bitmesh_common::pricing::{bytes_for_payment, payment_for_bytes, ByteCount, PriceMsatPerMib};
use bitmesh_tests::client::AgentOpts;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::env::wait_until;
use bitmesh_tests::testbed::Testbed;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The paced "WiFi" rate of downloads.
const RATE: u64 = MIB;
/// Largest L2 frame on the veths (MTU 1500 + Ethernet header).
const FRAME: u64 = 1514;

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

fn used(row: &Value) -> u64 {
    n(row, "up_bytes") + n(row, "down_bytes")
}

#[test]
fn the_whole_story_walled_garden_top_up_cut_off_idle_close_and_confirmed_settlement() {
    let Some(world) = Testbed::start(3).unwrap() else { return };
    let funding = world.fund(3, Amount::from_sat(100_000)).unwrap();
    let opts = ControllerOpts { idle_timeout_secs: Some(8), ..ControllerOpts::story() };
    let price = PriceMsatPerMib::new(opts.price_msat_per_mib.unwrap()).unwrap();
    let chunk = opts.chunk_bytes.unwrap();
    let ctl = world.start_controller(&opts).unwrap();
    let macs: Vec<String> = world.lan.clients.iter().map(|c| c.mac.clone()).collect();

    // 1. Unpaid: the internet is dropped in the kernel, the payment API answers.
    let f = world.fetch(0, MIB, Duration::from_secs(2));
    assert_eq!(f.bytes, 0, "an unpaid client reached upstream: {f:?}");
    let (code, body) = world.api_get(0, "/v1/terms", Duration::from_secs(5)).unwrap();
    assert_eq!(code, 200, "{body}");

    // 2. A opens a channel and downloads 12 MiB over a paced link; it tops up ahead of
    // use, so the download never pauses for a payment.
    let mut a = world.start_agent(0, &AgentOpts::new(funding[0].file.clone(), 30_000)).unwrap();
    a.wait_for("channel funded", Duration::from_secs(30)).unwrap();
    // Unconfirmed channels get at most the first payment + one chunk: confirm them.
    world.mine(1);
    let f = world.fetch_paced(0, 12 * MIB, RATE, Duration::from_secs(5));
    assert!(f.complete, "A's paid download did not complete: {f:?}\nagent:\n{}", a.output());
    assert!(f.longest_stall < Duration::from_secs(1), "a top-up stalled A's download: {f:?}");
    let ch = ctl.channel(&macs[0]).unwrap();
    assert!(n(&ch, "payments") >= 4, "12 MiB at 2 MiB chunks needs several top-ups: {ch}");
    // The agent may be mid-top-up when the download ends: compare the two sides once
    // what it signed last is acknowledged (the gateway credits before it answers).
    let (row, state) = wait_until("A's last payment to be acknowledged", Duration::from_secs(20), || {
        let state = a.state()?;
        let row = ctl.client(&macs[0])?;
        let settled = state["latest"]["acked"].as_bool()? && n(&state["latest"], "total_paid_sat") == n(&row, "paid_sat");
        settled.then_some((row, state))
    });
    let paid = Amount::from_sat(n(&row, "paid_sat"));
    assert_eq!(n(&row, "credited_bytes"), bytes_for_payment(paid, price).to_u64(), "credit = price(paid): {row}");
    assert!(used(&row) <= n(&row, "credited_bytes"), "A used more than it paid for: {row}");
    assert!(used(&row) >= 12 * MIB, "the meter must bill at least the payload: {row}");
    // The client's rule: never more than what it received, priced, plus one chunk.
    let received = ByteCount(n(&state, "received"));
    let signed = Amount::from_sat(n(&state["latest"], "total_paid_sat"));
    let bound = payment_for_bytes(ByteCount(received.to_u64() + chunk), price);
    assert!(signed <= bound, "A signed {signed} for {received:?} received (bound {bound})");
    assert!(state["latest"]["acked"].as_bool().unwrap(), "{state}");
    assert_eq!(signed, paid, "the gateway holds exactly what A signed last");

    // 3. A is done: its agent asks to close; the gateway broadcasts at once. (Right
    // after its download: left open through B's part, it could pass the 8 s idle
    // timeout on a loaded machine and close as idle instead.)
    a.stop();
    let ch = wait_until("A's close to be broadcast", Duration::from_secs(20), || {
        ctl.channel(&macs[0]).filter(|c| c["state"] == "closing" && c["close_txid"].is_string())
    });
    assert_eq!(ch["close_reason"], "client", "{ch}");
    let a_txid: Txid = ch["close_txid"].as_str().unwrap().parse().unwrap();
    assert_eq!(world.confirmations(&a_txid), Some(0), "A's settlement is in the mempool");

    // 4. B caps its spending at 3,000 sat: cut off exactly at its budget.
    let mut b = world.start_agent(1, &AgentOpts::new(funding[1].file.clone(), 3_000)).unwrap();
    b.wait_for("channel funded", Duration::from_secs(30)).unwrap();
    let f = world.fetch_paced(1, 8 * MIB, RATE, Duration::from_secs(4));
    assert!(!f.complete, "B downloaded past its budget: {f:?}");
    let row = ctl.client(&macs[1]).unwrap();
    assert_eq!(n(&row, "paid_sat"), 3_000, "B pays up to its cap: {row}\nagent:\n{}", b.output());
    let budget = n(&row, "credited_bytes");
    assert_eq!(budget, 3 * MIB, "3,000 sat at 1,000 sat/MiB");
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get()) as u64;
    assert!(used(&row) <= budget + cpus * FRAME, "overshoot is at most one frame per CPU: {row}");
    // What stops short of the budget is the one aggregate that did not fit.
    assert!(budget - used(&row).min(budget) < 64 * 1024 + FRAME, "B was cut off early: {row}");
    assert!(f.bytes <= budget, "B received more payload than its budget: {f:?}");
    assert!(f.bytes > 2 * MIB, "B received its budget: {f:?}");

    // 5. C downloads a little and goes idle; B (cut off) is idle too. Both close as idle.
    let mut c = world.start_agent(2, &AgentOpts::new(funding[2].file.clone(), 10_000)).unwrap();
    c.wait_for("channel funded", Duration::from_secs(30)).unwrap();
    let f = world.fetch_paced(2, MIB, RATE, Duration::from_secs(5));
    assert!(f.complete, "{f:?}");
    assert_eq!(ctl.channel(&macs[2]).unwrap()["state"], "open", "C is not idle yet");
    for mac in [&macs[1], &macs[2]] {
        let ch = wait_until("the idle channels to close", Duration::from_secs(40), || {
            ctl.channel(mac).filter(|c| c["state"] != "open")
        });
        assert_eq!(ch["close_reason"], "idle", "{ch}");
    }
    // Closed channels are no longer credited: C is back in the walled garden (once
    // the close has also taken it out of the kernel, a moment after the state says so).
    wait_until("C to leave the kernel meter", Duration::from_secs(20), || {
        ctl.client(&macs[2]).filter(|r| r["metered"] == false)
    });
    let f = world.fetch(2, MIB, Duration::from_secs(2));
    assert_eq!(f.bytes, 0, "a settled client still reaches upstream: {f:?}");
    drop((b, c));

    // 6. A block: every settlement confirms, paying each client its change.
    world.mine(1);
    let rows = wait_until("every settlement to confirm", Duration::from_secs(30), || {
        let rows = ctl.admin_json("channels").ok()?;
        rows.as_array()?.iter().all(|r| r["state"] == "closed").then_some(rows)
    });
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    let mut paid_total = 0;
    for r in rows {
        let txid: Txid = r["close_txid"].as_str().unwrap().parse().unwrap();
        assert!(world.confirmations(&txid).unwrap() >= 1, "{r}");
        let tx = world.node.rpc().transaction(&txid).unwrap().unwrap().tx;
        let change = n(r, "capacity_sat") - n(r, "paid_sat");
        assert!(
            tx.output.iter().any(|o| o.value.to_sat() == change),
            "settlement {txid} does not return {change} sat change: {tx:?}"
        );
        paid_total += n(r, "paid_sat");
    }
    let e = ctl.admin_json("earnings").unwrap();
    assert_eq!((n(&e, "pending"), n(&e, "held_open")), (0, 0), "{e}");
    let settled = n(&e, "settled");
    // The gateway earns what was paid minus the close fees (a few hundred sat each).
    assert!(settled <= paid_total && settled + 3 * 1_000 >= paid_total, "settled {settled} of {paid_total}: {e}");
}
