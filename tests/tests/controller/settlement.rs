//! The settlement engine of the real controller against a real regtest node:
//! idle close, fee bump (BIP125) of a close that does not confirm, close at
//! expiry minus the margin, confirmation tracking.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bitcoin::{Amount, Txid};
use bitmesh_channel::chain::Chain;
use bitmesh_tests::chain::CoinbaseWallet;
use bitmesh_tests::env::wait_until;
use bitmesh_tests::controller::{Controller, ControllerOpts};
use bitmesh_tests::testbed::Testbed;
use serde_json::json;

const CAPACITY: Amount = Amount::from_sat(20_000);

fn channel(ctl: &Controller<'_>) -> serde_json::Value {
    ctl.channels().unwrap().remove(0)
}

fn fee_of(tx: &bitcoin::Transaction) -> Amount {
    CAPACITY - tx.output.iter().map(|o| o.value).sum::<Amount>()
}

#[test]
fn idle_channel_closes_and_a_stuck_close_is_fee_bumped_until_it_confirms() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new().with(&["--idle-timeout-secs", "3", "--bump-after-blocks", "1"])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced().unwrap();
    let mut client = lab.scripted_client();
    let offer = client.open(200).unwrap();
    client.fund(&mut wallet, CAPACITY).unwrap();
    // Confirmed: an unconfirmed channel may pay at most its first payment + one chunk.
    lab.node.mine(1);
    let paid = offer.min_first_payment + Amount::from_sat(2_000);
    client.pay(paid).unwrap();

    // No traffic, no payment: closed for idleness.
    let first: Txid = wait_until("idle close", Duration::from_secs(20), || {
        let c = channel(&ctl);
        c["close_txid"].as_str().map(|t| t.parse().unwrap())
    });
    assert_eq!(channel(&ctl)["close_reason"], "idle");
    let old = lab.node.rpc().transaction(&first).unwrap().expect("close in the mempool").tx;

    // Make the miner ignore it: the next block leaves it out, the engine bumps.
    lab.node.rpc().call_raw("prioritisetransaction", &[json!(first.to_string()), json!(0), json!(-1_000_000)]).unwrap();
    lab.node.mine(1);
    let bumped: Txid = wait_until("fee bump", Duration::from_secs(20), || {
        let t: Txid = channel(&ctl)["close_txid"].as_str().unwrap().parse().unwrap();
        (t != first).then_some(t)
    });
    let new = lab.node.rpc().transaction(&bumped).unwrap().expect("replacement in the mempool").tx;
    assert_eq!(new.input[0].previous_output, old.input[0].previous_output, "same channel input");
    assert!(fee_of(&new) > fee_of(&old), "fee raised: {} -> {}", fee_of(&old), fee_of(&new));
    let to_client = |tx: &bitcoin::Transaction| {
        tx.output.iter().filter(|o| o.script_pubkey == client.change_script).map(|o| o.value).sum::<Amount>()
    };
    assert_eq!(to_client(&new), CAPACITY - paid, "the bump is paid by the gateway, never the client");
    assert_eq!(to_client(&old), CAPACITY - paid);

    lab.node.mine(1);
    wait_until("bumped close confirmed", Duration::from_secs(20), || (channel(&ctl)["state"] == "closed").then_some(()));
    let st = lab.node.rpc().transaction(&bumped).unwrap().unwrap();
    assert!(st.block_height.is_some(), "the replacement confirmed");
    let e = ctl.earnings().unwrap();
    assert_eq!(e["settled"].as_u64(), Some((paid - fee_of(&new)).to_sat()), "{e}");
    assert_eq!(e["pending"].as_u64(), Some(0), "{e}");
}

#[test]
fn channel_closes_at_expiry_minus_margin_and_funding_confirmation_is_tracked() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new()).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced().unwrap();
    let mut client = lab.scripted_client();
    let offer = client.open(144).unwrap();
    client.fund(&mut wallet, CAPACITY).unwrap();
    let paid = offer.min_first_payment;
    client.pay(paid).unwrap();
    let funding = client.channel.as_ref().unwrap().funding_outpoint.txid;
    lab.node.mine(1);
    assert!(lab.node.rpc().transaction(&funding).unwrap().unwrap().block_height.is_some());
    // One block before the deadline nothing happens; at it, the channel closes.
    let deadline = offer.expiry.to_consensus_u32() - 36;
    lab.node.mine(deadline - 1 - lab.node.tip().to_consensus_u32());
    lab.wait_synced().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(channel(&ctl)["state"], "open", "closed before its deadline");
    assert!(ctl.log().contains("funding confirmed"), "zero-conf funding confirmation noted");
    lab.node.mine(1);
    let txid: Txid = wait_until("expiry close", Duration::from_secs(20), || {
        channel(&ctl)["close_txid"].as_str().map(|t| t.parse().unwrap())
    });
    assert_eq!(channel(&ctl)["close_reason"], "expiry");
    lab.node.mine(1);
    wait_until("close confirmed", Duration::from_secs(20), || (channel(&ctl)["state"] == "closed").then_some(()));
    let tx = lab.node.rpc().transaction(&txid).unwrap().unwrap().tx;
    assert!(tx.output.iter().any(|o| o.script_pubkey == client.change_script && o.value == CAPACITY - paid));
    assert!(ctl.client_row().unwrap().is_none_or(|r| r["credited_bytes"] == 0), "client unmetered after close");
}
