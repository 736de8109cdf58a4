//! Attack: one bad channel must not poison a batch close.
//!
//! Four devices: A and B fund with a confirmed transaction, C1 and C2 at zero conf.
//! All pay, the operator settles everything. Unconfirmed fundings never share a
//! batch with confirmed ones, so two settlements go out: {A, B} and {C1, C2}. Then
//! C1's owner double-spends its funding (full RBF), which evicts the {C1, C2} batch
//! from the mempool with it. The gateway must notice the rejected batch, take C1 out
//! (`double_spent`, never settled) and settle C2 alone; A, B and C2 confirm with
//! exactly the amounts they signed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use bitcoin::{Amount, Network, Transaction, Txid};
use bitmesh_channel::chain::Chain;
use bitmesh_tests::chain::CoinbaseWallet;
use bitmesh_tests::client::ScriptedClient;
use bitmesh_tests::controller::{Controller, ControllerOpts};
use bitmesh_tests::testbed::Testbed;
use bitmesh_tests::env::wait_until;
use serde_json::Value;

const CAPACITY: Amount = Amount::from_sat(20_000);

fn row<'a>(chans: &'a [Value], c: &ScriptedClient) -> &'a Value {
    chans.iter().find(|r| r["id"] == c.channel_id().to_string().as_str()).expect("channel listed")
}

fn close_txid(ctl: &Controller<'_>, c: &ScriptedClient) -> Option<Txid> {
    let chans = ctl.channels().unwrap();
    row(&chans, c)["close_txid"].as_str().map(|t| t.parse().unwrap())
}

#[test]
fn a_double_spent_funding_is_split_out_of_its_batch_and_the_honest_channels_settle_exactly() {
    let secp = bitcoin::secp256k1::Secp256k1::new();
    let operator_key = bitcoin::secp256k1::SecretKey::from_slice(&[9; 32]).unwrap();
    let payout = bitcoin::Address::p2wpkh(&bitcoin::CompressedPublicKey(operator_key.public_key(&secp)), Network::Regtest);
    let payout_s = payout.to_string();
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new().with(&["--payout-address", &payout_s])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 4, 0);
    lab.wait_synced().unwrap();

    let ids = lab.add_client_identities(4, false).unwrap();
    let mut clients: Vec<ScriptedClient> =
        ids.iter().map(|id| ScriptedClient::with_identity(lab.client_ns(), lab.api(), id.clone())).collect();
    for c in &mut clients {
        c.open(200).unwrap();
    }
    // A and B: one confirmed funding transaction.
    let confirmed = lab.confirmed_funding(&mut wallet, &clients[..2], CAPACITY, 2).unwrap();
    for (c, (tx, vout)) in clients[..2].iter_mut().zip(&confirmed) {
        c.fund_with(tx, *vout).unwrap();
    }
    // C1 and C2: each its own unconfirmed funding, relayed by the gateway.
    let mut zero_conf: Vec<Transaction> = Vec::new();
    for c in &mut clients[2..] {
        let tx = c.funding_tx(&mut wallet, CAPACITY);
        c.fund_with(&tx, 0).unwrap();
        zero_conf.push(tx);
    }

    // Everyone pays (the zero-conf ones within their unconfirmed cap).
    let min_first = clients[0].offer.as_ref().unwrap().min_first_payment;
    let paid = [min_first + Amount::from_sat(1_000), min_first + Amount::from_sat(2_000), min_first, min_first];
    for (c, total) in clients.iter().zip(paid) {
        c.pay(total).unwrap();
    }

    // Settle everything: confirmed and unconfirmed fundings in separate batches.
    ctl.cli(&["settle", "--all"]).unwrap();
    let t: Vec<Txid> = clients.iter().map(|c| close_txid(&ctl, c).expect("close recorded")).collect();
    assert_eq!(t[0], t[1], "A and B share a batch");
    assert_eq!(t[2], t[3], "C1 and C2 share a batch");
    assert_ne!(t[0], t[2], "unconfirmed fundings never share a batch with confirmed ones");
    let first_batch = t[2];
    assert!(lab.node.rpc().transaction(&first_batch).unwrap().is_some(), "batch in the mempool");

    // The attack: C1's coin spent elsewhere at a higher fee evicts its funding and
    // the batch that spends it.
    let conflict = wallet.conflicting(&zero_conf[0], Amount::from_sat(30_000));
    lab.node.rpc().broadcast(&conflict).expect("full RBF replaces C1's funding");
    assert!(lab.node.rpc().transaction(&first_batch).unwrap().is_none(), "the batch was evicted with it");

    // The gateway splits the rejected batch: C1 out for good, C2 settled alone.
    let c2_close = wait_until("C2 re-settled alone", Duration::from_secs(20), || {
        close_txid(&ctl, &clients[3]).filter(|t| *t != first_batch)
    });
    let chans = ctl.channels().unwrap();
    assert_eq!(row(&chans, &clients[2])["state"], "double_spent", "{}", row(&chans, &clients[2]));
    assert!(row(&chans, &clients[2])["close_txid"].is_null());
    let c2_tx = lab.node.rpc().transaction(&c2_close).unwrap().expect("C2's close in the mempool").tx;
    assert_eq!(c2_tx.input.len(), 1, "C2 alone");

    // One block: A+B's batch, C2's funding and close, the attacker's conflict.
    lab.node.mine(1);
    let honest = [0usize, 1, 3];
    wait_until("honest channels closed", Duration::from_secs(20), || {
        let chans = ctl.channels().unwrap();
        honest.iter().all(|&i| row(&chans, &clients[i])["state"] == "closed").then_some(())
    });

    // Exact amounts: each client its change, the gateway everything paid minus the fee.
    let mut gateway_total = Amount::ZERO;
    let mut sizes = Vec::new();
    let by_tx: HashMap<Txid, Vec<usize>> = honest.iter().fold(HashMap::new(), |mut m, &i| {
        m.entry(close_txid(&ctl, &clients[i]).unwrap()).or_default().push(i);
        m
    });
    assert_eq!(by_tx.len(), 2, "two settlements confirmed: {by_tx:?}");
    for (txid, members) in &by_tx {
        let st = lab.node.rpc().transaction(txid).unwrap().expect("close known");
        assert!(st.block_height.is_some(), "{txid} confirmed");
        let tx = st.tx;
        assert_eq!(tx.input.len(), members.len());
        let mut sum_paid = Amount::ZERO;
        for &i in members {
            let c = &clients[i];
            let change: Vec<Amount> = tx.output.iter().filter(|o| o.script_pubkey == c.change_script).map(|o| o.value).collect();
            assert_eq!(change, vec![CAPACITY - paid[i]], "client {i} change");
            assert!(tx.input.iter().any(|inp| inp.previous_output == c.channel.as_ref().unwrap().funding_outpoint));
            sum_paid += paid[i];
        }
        let fee = CAPACITY * members.len() as u64 - tx.output.iter().map(|o| o.value).sum::<Amount>();
        let to_gateway: Vec<Amount> = tx.output.iter().filter(|o| o.script_pubkey == payout.script_pubkey()).map(|o| o.value).collect();
        assert_eq!(to_gateway, vec![sum_paid - fee], "gateway payout of {txid}");
        assert_eq!(tx.output.len(), members.len() + 1);
        gateway_total += sum_paid - fee;
        sizes.push((members.len(), tx.weight().to_vbytes_ceil()));
    }
    let e = ctl.earnings().unwrap();
    assert_eq!(e["settled"].as_u64(), Some(gateway_total.to_sat()), "{e}");
    assert_eq!(e["pending"].as_u64(), Some(0), "{e}");
    let chans = ctl.channels().unwrap();
    assert_eq!(row(&chans, &clients[2])["state"], "double_spent", "C1 never settled");
    eprintln!("batches confirmed (channels, vB): {sizes:?}; C1's batch of 2 was split to 1 after its funding was double-spent");
}
