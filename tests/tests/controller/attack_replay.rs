//! Attacks on the payment path from the WiFi, against the real controller (namespaces,
//! regtest node, raw HTTP): replaying payment updates sniffed off the air, racing
//! funding calls, replaying a close, and piling up free offers. Each attack must
//! change nothing: no CREDIT entry appears, no byte passes unpaid, the journal and the
//! recorded funding stay as they were, the honest client keeps paying.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bitcoin::Amount;
use bitmesh_channel::chain::Chain;
use bitmesh::meter::{Mac, MeterMaps};
use bitmesh::store::{ChannelStage, Store};
use bitmesh_common::pricing::{bytes_for_payment, ByteCount, PriceMsatPerMib};
use bitmesh_tests::chain::CoinbaseWallet;
use bitmesh_tests::client::ScriptedClient;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::Testbed;
use bitmesh_tests::upstream::udp_round_trips;
use bitmesh_tests::env::wait_for_true;
use bitmesh_tests::network::CLIENT_MAC;

/// High enough that one payment buys a budget a test can measure in datagrams.
const PRICE: u64 = 8_000_000;
const CAPACITY: Amount = Amount::from_sat(20_000);
const DATAGRAM: usize = 1000;

fn price() -> PriceMsatPerMib {
    PriceMsatPerMib::new(PRICE).unwrap()
}

/// The client device's kernel entries: (CREDIT, whether USAGE exists).
fn kernel_entry(lab: &Testbed) -> (Option<ByteCount>, bool) {
    let maps = MeterMaps::open_pinned(lab.pin_dir()).expect("pinned maps");
    let mac: Mac = CLIENT_MAC.parse().unwrap();
    (maps.credit(mac).unwrap(), maps.usage(mac).unwrap().is_some())
}

fn store(lab: &Testbed) -> Store {
    Store::open(&Store::path_in(&lab.data_dir())).unwrap()
}

/// (a) A closed channel's last update, POSTed again (before and after the close
/// confirms), must not bring the MAC's CREDIT back. (c) The same replay while a newer
/// channel is open on that MAC must leave CREDIT at the new channel's own total, and the
/// honest client keeps paying.
#[test]
fn replayed_updates_of_a_closed_channel_credit_nothing_even_with_a_newer_channel_open() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", &PRICE.to_string(), "--zero-conf-exposure-sat", "10000000"])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced().unwrap();
    let udp = lab.client_udp().unwrap();

    // Channel A: paid generously, then settled by the operator.
    let mut old = lab.scripted_client();
    let offer = old.open(200).unwrap();
    old.fund(&mut wallet, CAPACITY).unwrap();
    old.pay(offer.min_first_payment).unwrap();
    let sniffed = old.update(offer.min_first_payment + Amount::from_sat(3_000));
    assert_eq!(old.send(&sniffed).unwrap().status, 200, "the honest top-up is accepted");
    let out = ctl.cli(&["settle", "--all"]).unwrap();
    assert!(out.status.success(), "settle: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(kernel_entry(&lab), (None, false), "a closed channel's device is not metered");

    // (a) Replay while closing, then once the close confirmed: refused, nothing credited.
    for phase in ["closing", "closed"] {
        if phase == "closed" {
            lab.node.mine(1);
            wait_for_true("settlement confirmed", Duration::from_secs(20), || {
                ctl.channels().unwrap().iter().any(|c| c["state"] == "closed")
            });
        }
        let r = old.send(&sniffed).unwrap();
        assert_eq!((r.status, r.code().as_str()), (409, "channel_not_open"), "{phase}: {}", r.text());
        assert_eq!(kernel_entry(&lab), (None, false), "{phase}: replay created kernel entries");
        assert_eq!(udp_round_trips(&udp, 5, DATAGRAM), 0, "{phase}: bytes passed after the replay");
    }

    // (c) Channel B on the same device, paid its first payment only.
    let mut new = lab.scripted_client();
    let offer_b = new.open(200).unwrap();
    new.fund(&mut wallet, CAPACITY).unwrap();
    let ack = new.pay(offer_b.min_first_payment).unwrap();
    let own = bytes_for_payment(offer_b.min_first_payment, price());
    assert_eq!(ack.credited_bytes, own);
    assert_eq!(kernel_entry(&lab), (Some(own), true));
    assert!(bytes_for_payment(sniffed.total_paid, price()) > own, "the replayed update is worth more than B's credit");

    let r = old.send(&sniffed).unwrap();
    assert_eq!((r.status, r.code().as_str()), (409, "channel_not_open"), "{}", r.text());
    assert_eq!(kernel_entry(&lab), (Some(own), true), "CREDIT is still channel B's own total");

    // The honest client keeps paying, credited exactly what its own channel buys.
    let second = offer_b.min_first_payment + Amount::from_sat(500);
    let ack = new.pay(second).unwrap();
    assert_eq!(ack.credited_bytes, bytes_for_payment(second, price()));
    assert_eq!(kernel_entry(&lab).0, Some(bytes_for_payment(second, price())));
    assert_eq!(udp_round_trips(&udp, 5, DATAGRAM), 5, "the paying client's traffic passes");
    let st = new.status().unwrap();
    assert_eq!((st.total_paid, st.credited_bytes), (second, bytes_for_payment(second, price())));
}

/// (b) An older update of an open channel, sent again, gets 409 `amount_not_increasing`
/// and changes nothing (journal, CREDIT); the latest one is still answered
/// idempotently. A captured close request cannot be replayed.
#[test]
fn older_updates_and_captured_closes_are_refused_and_change_nothing() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let _ctl = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", &PRICE.to_string(), "--zero-conf-exposure-sat", "10000000"])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 1, 0);
    lab.wait_synced().unwrap();

    let mut client = lab.scripted_client();
    let offer = client.open(200).unwrap();
    client.fund(&mut wallet, CAPACITY).unwrap();
    let id = client.channel_id();
    let first = client.update(offer.min_first_payment);
    let latest = client.update(offer.min_first_payment + Amount::from_sat(700));
    assert_eq!(client.send(&first).unwrap().status, 200);
    let ack = client.send(&latest).unwrap();
    assert_eq!(ack.status, 200);

    let db = store(&lab);
    let before = (db.payments(id).unwrap(), kernel_entry(&lab));
    let r = client.send(&first).unwrap();
    assert_eq!((r.status, r.code().as_str()), (409, "amount_not_increasing"), "{}", r.text());
    assert_eq!((db.payments(id).unwrap(), kernel_entry(&lab)), before, "an older update changed the journal or CREDIT");
    // The latest one again (a lost ack): the same answer, nothing new.
    let r = client.send(&latest).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, ack.body, "the same acknowledgement");
    assert_eq!((db.payments(id).unwrap(), kernel_entry(&lab)), before);
    // And the channel still takes new payments.
    let next = offer.min_first_payment + Amount::from_sat(900);
    assert_eq!(client.pay(next).unwrap().credited_bytes, bytes_for_payment(next, price()));

    // A close request captured off the air: the client's own goes through, a replay is
    // refused as replayed.
    let captured = client.close_body();
    let path = format!("/v1/channels/{id}/close");
    let r = client.post(&path, &captured).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = client.post(&path, &captured).unwrap();
    assert_eq!((r.status, r.code().as_str()), (401, "auth_replayed"), "{}", r.text());
}

/// Two funding calls for one offer, with different transactions, at the same time:
/// exactly one outpoint is ever recorded, the other call gets `channel_not_open` and
/// its transaction is not relayed; payments are journaled against the recorded one.
#[test]
fn concurrent_funding_calls_record_exactly_one_outpoint() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let _ctl = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", &PRICE.to_string(), "--zero-conf-exposure-sat", "10000000"])).unwrap();
    const ROUNDS: usize = 3;
    let mut wallet = CoinbaseWallet::fund(&lab.node, 2 * ROUNDS as u32, 0);
    lab.wait_synced().unwrap();
    let ids = lab.add_client_identities(ROUNDS, false).unwrap();
    let db = store(&lab);
    for identity in ids {
        let mut client = ScriptedClient::with_identity(lab.client_ns(), lab.api(), identity.clone());
        let offer = client.open(200).unwrap();
        let txs = [client.funding_tx(&mut wallet, CAPACITY), client.funding_tx(&mut wallet, CAPACITY)];
        let path = format!("/v1/channels/{}/funding", offer.channel_id);
        let bodies: Vec<serde_json::Value> = txs
            .iter()
            .map(|tx| {
                serde_json::to_value(bitmesh_common::wire::FundRequest {
                    channel_id: offer.channel_id,
                    funding_tx: tx.clone(),
                    funding_vout: 0,
                })
                .unwrap()
            })
            .collect();
        let barrier = std::sync::Barrier::new(2);
        let answers: Vec<_> = std::thread::scope(|s| {
            let calls: Vec<_> = bodies
                .iter()
                .map(|b| {
                    let (client, path, barrier) = (&client, &path, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        client.post(path, b).unwrap()
                    })
                })
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        let won: Vec<usize> = (0..2).filter(|i| answers[*i].status == 200).collect();
        assert_eq!(won.len(), 1, "{}: exactly one funding call wins: {:?}", identity.mac, answers.iter().map(|a| (a.status, a.text())).collect::<Vec<_>>());
        let (winner, loser) = (won[0], 1 - won[0]);
        let lost = &answers[loser];
        assert_eq!((lost.status, lost.code().as_str()), (409, "channel_not_open"), "{}", lost.text());
        let recorded = db.channel(offer.channel_id).unwrap().unwrap();
        assert_eq!(recorded.state, ChannelStage::Open);
        let outpoint = bitcoin::OutPoint { txid: txs[winner].compute_txid(), vout: 0 };
        assert_eq!(recorded.funding.unwrap().outpoint, outpoint, "the record names the winning transaction");
        assert!(lab.node.rpc().transaction(&txs[loser].compute_txid()).unwrap().is_none(), "the losing transaction was relayed");

        // Payments sign over the recorded outpoint and are journaled against it.
        client.fund_with(&txs[winner], 0).unwrap(); // idempotent: same outpoint again
        client.pay(offer.min_first_payment).unwrap();
        assert_eq!(db.channel(offer.channel_id).unwrap().unwrap().funding.unwrap().outpoint, outpoint);
        let mut other = client.channel.clone().unwrap();
        other.funding_outpoint = bitcoin::OutPoint { txid: txs[loser].compute_txid(), vout: 0 };
        client.channel = Some(other);
        let r = client.send(&client.update(offer.min_first_payment + Amount::from_sat(10))).unwrap();
        assert_eq!((r.status, r.code().as_str()), (422, "signature_invalid"), "an update over the other outpoint: {}", r.text());
        assert_eq!(db.payments(offer.channel_id).unwrap().len(), 1);
    }
}

/// A repeated open request gets the same offer back instead of a new row; unfunded
/// offers expire after `--offer-ttl-secs`; the gateway relays one funding transaction
/// per offer.
#[test]
fn offers_expire_and_are_relayed_for_once() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", &PRICE.to_string(), "--zero-conf-exposure-sat", "10000000", "--offer-ttl-secs", "10"])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 3, 0);
    lab.wait_synced().unwrap();

    // One relay per offer: a transaction above the zero-conf cap is relayed, then
    // refused as unconfirmed; a different one for the same offer is not relayed.
    // A repeated open request: the same offer, one row.
    let mut client = lab.scripted_client();
    let offer = client.open(200).unwrap();
    let again = bitmesh_common::wire::OpenRequest {
        client_pubkey: client.pubkey,
        expiry: offer.expiry,
        client_change_script: client.change_script.clone(),
    };
    let r = client.post("/v1/channels", &serde_json::to_value(&again).unwrap()).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let repeated: bitmesh_common::wire::OpenResponse = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(repeated, offer, "the same open request gets the same offer");
    assert_eq!(ctl.channels().unwrap().len(), 1, "no new row for a repeated open");

    let big = client.funding_tx(&mut wallet, Amount::from_sat(60_000));
    let r = client.post(
        &format!("/v1/channels/{}/funding", offer.channel_id),
        &serde_json::to_value(bitmesh_common::wire::FundRequest { channel_id: offer.channel_id, funding_tx: big.clone(), funding_vout: 0 }).unwrap(),
    ).unwrap();
    assert_eq!(r.code(), "funding_unconfirmed", "{}", r.text());
    assert!(lab.node.rpc().transaction(&big.compute_txid()).unwrap().is_some(), "the first transaction was relayed");
    let other = client.funding_tx(&mut wallet, Amount::from_sat(61_000));
    let r = client.post(
        &format!("/v1/channels/{}/funding", offer.channel_id),
        &serde_json::to_value(bitmesh_common::wire::FundRequest { channel_id: offer.channel_id, funding_tx: other.clone(), funding_vout: 0 }).unwrap(),
    ).unwrap();
    assert_eq!((r.status, r.code().as_str()), (422, "funding_not_found"), "{}", r.text());
    assert!(lab.node.rpc().transaction(&other.compute_txid()).unwrap().is_none(), "a second transaction was relayed for one offer");

    // Left unfunded past the TTL: expired, and funding it is refused.
    let db = store(&lab);
    wait_for_true("offer expired", Duration::from_secs(40), || {
        db.channel(offer.channel_id).unwrap().unwrap().state == ChannelStage::Abandoned
    });
    let tx = client.funding_tx(&mut wallet, CAPACITY);
    let r = client.post(
        &format!("/v1/channels/{}/funding", offer.channel_id),
        &serde_json::to_value(bitmesh_common::wire::FundRequest { channel_id: offer.channel_id, funding_tx: tx.clone(), funding_vout: 0 }).unwrap(),
    ).unwrap();
    assert_eq!((r.status, r.code().as_str()), (409, "channel_not_open"), "{}", r.text());
    assert!(lab.node.rpc().transaction(&tx.compute_txid()).unwrap().is_none(), "an expired offer's funding was relayed");
}
