//! The controller end to end, for real: `bitmesh run` in a gateway namespace, a
//! regtest node, a scripted client in its own namespace sending real UDP through the
//! gateway to an upstream echo server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bitcoin::{Amount, Network};
use bitmesh_channel::chain::Chain;
use bitmesh_common::pricing::{bytes_for_payment, PriceMsatPerMib};
use bitmesh_tests::chain::CoinbaseWallet;
use bitmesh_tests::env::wait_for_true;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::Testbed;
use bitmesh_tests::upstream::udp_round_trips;

/// High enough that the first payment buys a budget a test exhausts in a second.
pub const PRICE: u64 = 8_000_000;
const CAPACITY: Amount = Amount::from_sat(20_000);
const DATAGRAM: usize = 1000;
/// What one echoed datagram costs: up and down, each payload + 42 bytes of headers.
const ROUND_TRIP_BYTES: u64 = 2 * (DATAGRAM as u64 + 42);

#[test]
fn client_is_blocked_unpaid_pays_through_the_api_is_cut_at_its_budget_and_settles_on_chain() {
    let secp = bitcoin::secp256k1::Secp256k1::new();
    let operator_key = bitcoin::secp256k1::SecretKey::from_slice(&[9; 32]).unwrap();
    let payout = bitcoin::Address::p2wpkh(&bitcoin::CompressedPublicKey(operator_key.public_key(&secp)), Network::Regtest);
    let price = PRICE.to_string();
    let payout_s = payout.to_string();
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", &price, "--payout-address", &payout_s])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced().unwrap();
    let udp = lab.client_udp().unwrap();

    // Unpaid: the gateway drops real traffic to the internet; its API still answers.
    assert_eq!(udp_round_trips(&udp, 5, DATAGRAM), 0, "unpaid client reached upstream");
    let mut client = lab.scripted_client();
    let terms = client.terms().unwrap();
    assert_eq!(terms.price_msat_per_mib.to_msat(), PRICE);

    // Open and fund through the relay: the node learns the funding tx from the gateway.
    let offer = client.open(200).unwrap();
    let status = client.fund(&mut wallet, CAPACITY).unwrap();
    assert_eq!(status.capacity, Some(CAPACITY));
    let funding_txid = client.channel.as_ref().unwrap().funding_outpoint.txid;
    assert!(lab.node.rpc().transaction(&funding_txid).unwrap().is_some(), "gateway relayed the funding tx");
    assert_eq!(udp_round_trips(&udp, 3, DATAGRAM), 0, "funded but unpaid client reached upstream");

    // Pay the first chunk: credited as priced, traffic passes.
    let first = offer.min_first_payment;
    let ack = client.pay(first).unwrap();
    let price = PriceMsatPerMib::new(PRICE).unwrap();
    assert_eq!(ack.credited_bytes, bytes_for_payment(first, price));
    assert_eq!(ack.client_change, CAPACITY - first);
    let budget = ack.credited_bytes.0;
    assert!(budget > 20 * ROUND_TRIP_BYTES, "budget {budget} too small for the test");
    assert_eq!(udp_round_trips(&udp, 10, DATAGRAM), 10, "paid client blocked");

    // Exhaust the budget: cut within one frame of it.
    let mut passed = 10;
    for _ in 0..(budget / ROUND_TRIP_BYTES + 20) {
        passed += udp_round_trips(&udp, 1, DATAGRAM) as u64;
    }
    assert_eq!(passed, budget / ROUND_TRIP_BYTES, "cut exactly when the budget ran out");
    assert_eq!(udp_round_trips(&udp, 5, DATAGRAM), 0, "client past its budget still passes");
    let row = ctl.client_row().unwrap().expect("client listed");
    let used = row["up_bytes"].as_u64().unwrap() + row["down_bytes"].as_u64().unwrap();
    assert!(used <= budget && budget - used < ROUND_TRIP_BYTES, "used {used} of {budget}");
    assert_eq!(row["credited_bytes"].as_u64(), Some(budget));
    assert_eq!(row["paid_sat"].as_u64(), Some(first.to_sat()));
    assert_eq!(row["channel"].as_str(), Some(offer.channel_id.to_string().as_str()));

    // RFC 8908: captive again with nothing left.
    let captive = client.request("GET", "/captive-portal/api", &[], None).unwrap();
    assert_eq!(captive.status, 200);
    assert!(captive.headers.iter().any(|(k, v)| k == "content-type" && v.starts_with("application/captive+json")));
    let cj = captive.json();
    assert_eq!(cj["captive"], true, "{cj}");
    assert_eq!(cj["bytes-remaining"].as_u64(), Some(budget - used), "{cj}");

    // Top up: traffic passes again.
    let second = first + Amount::from_sat(500);
    let ack2 = client.pay(second).unwrap();
    assert_eq!(ack2.credited_bytes, bytes_for_payment(second, price));
    assert_eq!(udp_round_trips(&udp, 5, DATAGRAM), 5, "topped-up client blocked");
    let cj = client.request("GET", "/captive-portal/api", &[], None).unwrap().json();
    assert_eq!(cj["captive"], false, "{cj}");
    assert!(cj["bytes-remaining"].as_u64().unwrap() > 0 && cj["seconds-remaining"].as_u64().unwrap() > 0, "{cj}");
    let st = client.status().unwrap();
    assert_eq!(st.total_paid, second);
    assert_eq!(st.credited_bytes, ack2.credited_bytes);

    // Operator view: held in open channels; runtime price change for new channels.
    let e = ctl.earnings().unwrap();
    assert_eq!(e["held_open"].as_u64(), Some(second.to_sat()), "{e}");
    ctl.cli(&["price", "9000000"]).unwrap();
    assert_eq!(client.terms().unwrap().price_msat_per_mib.to_msat(), 9_000_000);
    assert_eq!(client.status().unwrap().credited_bytes, ack2.credited_bytes, "open channel keeps its price");

    // Client closes: one close tx, change to the client, the rest minus fee to payout.
    let closed = client.close().unwrap();
    let close_txid = closed.close_txid.expect("close broadcast at once");
    assert_eq!(closed.client_change, CAPACITY - second);
    assert_eq!(udp_round_trips(&udp, 3, DATAGRAM), 0, "closed channel still passes traffic");
    lab.node.mine(1);
    wait_for_true("settlement confirmed", Duration::from_secs(20), || {
        ctl.channels().unwrap().iter().any(|c| c["state"] == "closed")
    });
    let tx = lab.node.rpc().transaction(&close_txid).unwrap().expect("close tx known").tx;
    assert_eq!(tx.input.len(), 1);
    assert_eq!(tx.input[0].previous_output, client.channel.as_ref().unwrap().funding_outpoint);
    let to_client: Amount = tx.output.iter().filter(|o| o.script_pubkey == client.change_script).map(|o| o.value).sum();
    let to_gateway: Amount = tx.output.iter().filter(|o| o.script_pubkey == payout.script_pubkey()).map(|o| o.value).sum();
    let fee = CAPACITY - tx.output.iter().map(|o| o.value).sum::<Amount>();
    assert_eq!(to_client, CAPACITY - second, "client change");
    assert_eq!(to_gateway, second - fee, "gateway payout to --payout-address");
    assert!(fee > Amount::ZERO && fee < Amount::from_sat(2_000), "fee {fee}");
    let e = ctl.earnings().unwrap();
    assert_eq!(e["settled"].as_u64(), Some(to_gateway.to_sat()), "{e}");
    assert_eq!(e["pending"].as_u64(), Some(0), "{e}");
    assert_eq!(e["held_open"].as_u64(), Some(0), "{e}");
    let chans = ctl.channels().unwrap();
    assert_eq!(chans[0]["close_txid"].as_str(), Some(close_txid.to_string().as_str()));
}
