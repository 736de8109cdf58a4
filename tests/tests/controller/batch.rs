//! Batched settlement for real: three client devices (three MAC/IP identities in the
//! client namespace) open, fund from one transaction and pay; the operator settles
//! everything at once and the gateway closes all three channels in ONE transaction
//! that pays each client its exact change and the rest, minus the fee, to the payout
//! address.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use bitcoin::{Amount, FeeRate, Network, Txid};
use bitmesh_channel::chain::Chain;
use bitmesh_tests::chain::CoinbaseWallet;
use bitmesh_tests::env::wait_for_true;
use bitmesh_tests::client::ScriptedClient;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::Testbed;

const CAPACITY: Amount = Amount::from_sat(20_000);
/// The controller's default planning fee rate (`--close-fee-rate-sat-vb 2`); a fresh
/// regtest node has no estimate above it.
const CLOSE_FEE_RATE_SAT_VB: u64 = 2;
/// What `build_close` reserves for the gateway's signature when sizing the fee.
const GATEWAY_SIG_RESERVE: usize = 72;

#[test]
fn three_clients_settled_together_close_in_one_transaction_paying_each_change_and_the_gateway_exactly() {
    let secp = bitcoin::secp256k1::Secp256k1::new();
    let operator_key = bitcoin::secp256k1::SecretKey::from_slice(&[7; 32]).unwrap();
    let payout = bitcoin::Address::p2wpkh(&bitcoin::CompressedPublicKey(operator_key.public_key(&secp)), Network::Regtest);
    let payout_s = payout.to_string();
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new().with(&["--payout-address", &payout_s])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 1, 0);
    lab.wait_synced().unwrap();

    // Three devices, each with its own MAC and IP, learned by the gateway through ARP.
    let ids = lab.add_client_identities(3, false).unwrap();
    let mut clients: Vec<ScriptedClient> =
        ids.iter().map(|id| ScriptedClient::with_identity(lab.client_ns(), lab.api(), id.clone())).collect();
    for c in &mut clients {
        c.open(200).unwrap();
    }

    // One funding transaction with three channel outputs, confirmed, announced by each.
    let funding = lab.confirmed_funding(&mut wallet, &clients, CAPACITY, 3).unwrap();
    let funding_txids: HashSet<Txid> = funding.iter().map(|(tx, _)| tx.compute_txid()).collect();
    assert_eq!(funding_txids.len(), 1, "one funding transaction for all three");
    for (c, (tx, vout)) in clients.iter_mut().zip(&funding) {
        let st = c.fund_with(tx, *vout).unwrap();
        assert_eq!(st.capacity, Some(CAPACITY));
    }

    // Each pays a different total; each channel is bound to its own device.
    let min_first = clients[0].offer.as_ref().unwrap().min_first_payment;
    let paid: Vec<Amount> = (1..=3).map(|i| min_first + Amount::from_sat(1_000 * i)).collect();
    for (c, total) in clients.iter().zip(&paid) {
        let ack = c.pay(*total).unwrap();
        assert_eq!(ack.client_change, CAPACITY - *total);
    }
    let rows = ctl.clients().unwrap();
    for ((c, id), total) in clients.iter().zip(&ids).zip(&paid) {
        let row = rows.iter().find(|r| r["mac"] == id.mac.as_str()).unwrap_or_else(|| panic!("{} not listed: {rows:?}", id.mac));
        assert_eq!(row["channel"].as_str(), Some(c.channel_id().to_string().as_str()), "{row}");
        assert_eq!(row["paid_sat"].as_u64(), Some(total.to_sat()), "{row}");
    }
    let sum_paid: Amount = paid.iter().copied().sum();
    let e = ctl.earnings().unwrap();
    assert_eq!(e["held_open"].as_u64(), Some(sum_paid.to_sat()), "{e}");

    // All fall due at once: one settlement transaction for the three channels.
    let out = ctl.cli(&["settle", "--all"]).unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("closed 3 channel(s)"), "{printed}");
    let chans = ctl.channels().unwrap();
    let close_txids: HashSet<&str> = clients
        .iter()
        .map(|c| {
            let row = chans.iter().find(|r| r["id"] == c.channel_id().to_string().as_str()).expect("channel listed");
            row["close_txid"].as_str().expect("close txid recorded")
        })
        .collect();
    assert_eq!(close_txids.len(), 1, "one close transaction for all three: {close_txids:?}");
    let close_txid: Txid = close_txids.into_iter().next().unwrap().parse().unwrap();
    assert!(printed.contains(&close_txid.to_string()), "{printed}");

    // It confirms.
    lab.node.mine(1);
    wait_for_true("all three channels closed", Duration::from_secs(20), || {
        let chans = ctl.channels().unwrap();
        clients.iter().all(|c| chans.iter().any(|r| r["id"] == c.channel_id().to_string().as_str() && r["state"] == "closed"))
    });
    let status = lab.node.rpc().transaction(&close_txid).unwrap().expect("close tx known");
    assert!(status.block_height.is_some(), "close tx confirmed");
    let tx = status.tx;

    // Inputs: exactly the three funding outpoints.
    let inputs: HashSet<bitcoin::OutPoint> = tx.input.iter().map(|i| i.previous_output).collect();
    let expected: HashSet<bitcoin::OutPoint> = clients.iter().map(|c| c.channel.as_ref().unwrap().funding_outpoint).collect();
    assert_eq!(inputs, expected);
    assert_eq!(tx.input.len(), 3);

    // Outputs: each client's exact change, then the gateway's payout; nothing else.
    assert_eq!(tx.output.len(), 4, "{tx:?}");
    for (c, total) in clients.iter().zip(&paid) {
        let to_client: Vec<Amount> = tx.output.iter().filter(|o| o.script_pubkey == c.change_script).map(|o| o.value).collect();
        assert_eq!(to_client, vec![CAPACITY - *total], "client change");
    }
    let to_gateway: Vec<Amount> = tx.output.iter().filter(|o| o.script_pubkey == payout.script_pubkey()).map(|o| o.value).collect();
    assert_eq!(to_gateway.len(), 1, "one gateway output");
    let fee = CAPACITY * 3 - tx.output.iter().map(|o| o.value).sum::<Amount>();
    assert_eq!(to_gateway[0], sum_paid - fee, "gateway payout = everything paid minus the fee");

    // The fee is what build_close charges the gateway: the planning rate over the
    // transaction sized with a reserved 72-byte gateway signature per input.
    let mut sized = tx.clone();
    for input in &mut sized.input {
        let mut w: Vec<Vec<u8>> = input.witness.iter().map(<[u8]>::to_vec).collect();
        w[1] = vec![0; GATEWAY_SIG_RESERVE];
        input.witness = bitcoin::Witness::from_slice(&w);
    }
    let rate = FeeRate::from_sat_per_vb(CLOSE_FEE_RATE_SAT_VB).unwrap();
    assert_eq!(fee, bitmesh_channel::fee_for_weight(rate, sized.weight()), "close fee");
    eprintln!(
        "batch close of 3 channels: {} vB, fee {} sat ({} sat/vB planned)",
        tx.weight().to_vbytes_ceil(),
        fee.to_sat(),
        CLOSE_FEE_RATE_SAT_VB
    );

    // The operator's books.
    let e = ctl.earnings().unwrap();
    assert_eq!(e["settled"].as_u64(), Some(to_gateway[0].to_sat()), "{e}");
    assert_eq!(e["pending"].as_u64(), Some(0), "{e}");
    assert_eq!(e["held_open"].as_u64(), Some(0), "{e}");
}
