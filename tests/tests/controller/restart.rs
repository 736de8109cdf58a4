//! Fault tests of the real controller: kill -9 mid-session and mid-payment, restart,
//! and a "reboot" (pinned maps and links gone). Nothing acknowledged is lost, nothing
//! is credited twice, and the kernel keeps enforcing while the controller is down.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bitcoin::Amount;
use bitmesh_channel::chain::Chain;
use bitmesh::store::Store;
use bitmesh_common::pricing::{bytes_for_payment, PriceMsatPerMib};
use bitmesh_tests::chain::CoinbaseWallet;
use bitmesh_tests::env::wait_for_true;
use bitmesh_tests::client::ScriptedClient;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::Testbed;
use bitmesh_tests::upstream::udp_round_trips;

const PRICE: u64 = 8_000_000;
const CAPACITY: Amount = Amount::from_sat(40_000);
const DATAGRAM: usize = 1000;
const ROUND_TRIP_BYTES: u64 = 2 * (DATAGRAM as u64 + 42);

fn price() -> PriceMsatPerMib {
    PriceMsatPerMib::new(PRICE).unwrap()
}

fn used(row: &serde_json::Value) -> u64 {
    row["up_bytes"].as_u64().unwrap() + row["down_bytes"].as_u64().unwrap()
}

fn journal(lab: &Testbed, client: &ScriptedClient) -> Vec<Amount> {
    let store = Store::open(&Store::path_in(&lab.data_dir())).unwrap();
    store.payments(client.channel_id()).unwrap().into_iter().map(|p| p.paid_total).collect()
}

#[test]
fn kill_9_and_restart_keep_every_acknowledged_payment_and_the_kernel_enforces_meanwhile() {
    let price_flag = PRICE.to_string();
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let mut ctl = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", &price_flag, "--zero-conf-exposure-sat", "1000000"])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced().unwrap();
    let udp = lab.client_udp().unwrap();
    let mut client = lab.scripted_client();
    let offer = client.open(200).unwrap();
    client.fund(&mut wallet, CAPACITY).unwrap();
    let first = offer.min_first_payment;
    let ack1 = client.pay(first).unwrap();
    let budget = ack1.credited_bytes.0;
    assert_eq!(udp_round_trips(&udp, 10, DATAGRAM), 10);

    // 1. kill -9 mid-session. The kernel keeps passing paid traffic, then cuts at the budget.
    ctl.kill9();
    let mut passed = 10;
    for _ in 0..(budget / ROUND_TRIP_BYTES + 10) {
        passed += udp_round_trips(&udp, 1, DATAGRAM) as u64;
    }
    assert_eq!(passed, budget / ROUND_TRIP_BYTES, "kernel enforced the budget with the controller down");
    assert_eq!(journal(&lab, &client), vec![first], "acknowledged payment on disk");

    // Restart: pinned maps taken over, counters went on, credit not doubled.
    ctl.restart().unwrap();
    let row = ctl.client_row().unwrap().expect("client metered after restart");
    assert_eq!(row["credited_bytes"].as_u64(), Some(budget), "credit not doubled");
    assert!(budget - used(&row) < ROUND_TRIP_BYTES, "usage kept counting: {row}");
    assert_eq!(udp_round_trips(&udp, 3, DATAGRAM), 0, "still cut after restart");

    // The lost-ack case: the same update again gets the same answer and credits nothing.
    let again = client.pay(first).unwrap();
    assert_eq!(again.credited_bytes, ack1.credited_bytes);
    assert_eq!(journal(&lab, &client), vec![first]);
    assert_eq!(ctl.client_row().unwrap().unwrap()["credited_bytes"].as_u64(), Some(budget));

    // 2. kill -9 in the middle of a burst of payments.
    // 300 sat more than the first (about 18 round trips at this price) leaves the steps
    // below traffic to pass however few payments land before the kill.
    let start = first + Amount::from_sat(300);
    let flowing = std::sync::atomic::AtomicUsize::new(0);
    let acked: Vec<Amount> = std::thread::scope(|s| {
        let payer = s.spawn(|| {
            let mut acked = Vec::new();
            for i in 0..10_000u64 {
                let total = start + Amount::from_sat(i);
                match client.send(&client.update(total)) {
                    Ok(r) if r.status == 200 => acked.push(total),
                    _ => break,
                }
                flowing.store(acked.len(), std::sync::atomic::Ordering::SeqCst);
            }
            acked
        });
        // Kill in the middle of the burst: once a few are acknowledged, however slow
        // the synced journal is on this machine.
        bitmesh_tests::env::wait_for_true("payments to flow", Duration::from_secs(30), || {
            flowing.load(std::sync::atomic::Ordering::SeqCst) > 5
        });
        ctl.kill9();
        payer.join().unwrap()
    });
    assert!(acked.len() > 5, "payments were flowing when the controller died ({})", acked.len());
    let on_disk = journal(&lab, &client);
    for a in &acked {
        assert!(on_disk.contains(a), "acknowledged payment {a} lost");
    }
    let last = *on_disk.last().unwrap();
    assert!(last.to_sat() - acked.last().unwrap().to_sat() <= 1, "at most the one in flight is extra");
    ctl.restart().unwrap();
    let want = bytes_for_payment(last, price()).0;
    let row = ctl.client_row().unwrap().unwrap();
    assert_eq!(row["credited_bytes"].as_u64(), Some(want), "credit = the journal's last total, once");
    assert_eq!(row["paid_sat"].as_u64(), Some(last.to_sat()));
    assert_eq!(udp_round_trips(&udp, 5, DATAGRAM), 5, "paid client passes after restart");

    // 3. "Reboot": controller killed and every pin (maps, links) gone. CREDIT comes
    // back from the journal, USAGE from the last snapshot.
    // Kill once a snapshot holds the last traffic (the snapshot loop runs every
    // second, but may slip behind its housekeeping on a loaded machine).
    let before = used(&ctl.client_row().unwrap().unwrap());
    bitmesh_tests::env::wait_for_true("a usage snapshot with the last traffic", Duration::from_secs(30), || {
        let store = Store::open(&Store::path_in(&lab.data_dir())).unwrap();
        store.usage_snapshots().unwrap().iter().any(|s| s.usage.up_bytes + s.usage.down_bytes == before)
    });
    ctl.kill9();
    std::fs::remove_dir_all(ctl.pin_dir()).unwrap();
    assert_eq!(udp_round_trips(&udp, 3, DATAGRAM), 3, "no program attached: the link is open (reboot)");
    ctl.restart().unwrap();
    assert!(ctl.log().contains("pinned=false") || ctl.log().contains("pinned: false"));
    let row = ctl.client_row().unwrap().unwrap();
    assert_eq!(row["credited_bytes"].as_u64(), Some(want), "CREDIT rebuilt from the journal");
    assert_eq!(used(&row), before, "USAGE restored from the snapshot");
    assert_eq!(udp_round_trips(&udp, 3, DATAGRAM), 3);

    // Settle through the operator CLI; the close pays the journal's last total.
    let out = ctl.cli(&["settle", "--all"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("closed 1 channel"), "{text}");
    let chans = ctl.channels().unwrap();
    let txid: bitcoin::Txid = chans[0]["close_txid"].as_str().unwrap().parse().unwrap();
    assert!(text.contains(&txid.to_string()));
    lab.node.mine(1);
    wait_for_true("settlement confirmed", Duration::from_secs(20), || {
        ctl.channels().unwrap()[0]["state"] == "closed"
    });
    let tx = lab.node.rpc().transaction(&txid).unwrap().unwrap().tx;
    let to_client: Amount = tx.output.iter().filter(|o| o.script_pubkey == client.change_script).map(|o| o.value).sum();
    assert_eq!(to_client, CAPACITY - last);
    let e = ctl.earnings().unwrap();
    let fee = CAPACITY - tx.output.iter().map(|o| o.value).sum::<Amount>();
    assert_eq!(e["settled"].as_u64(), Some((last - fee).to_sat()), "{e}");
    assert!(ctl.client_row().unwrap().is_none_or(|r| r["credited_bytes"] == 0), "settled client unmetered");
}
