//! Attack: double-spend the funding of a zero-conf channel and keep using it.
//!
//! A client funds a channel at zero conf (under `--zero-conf-cap-sat`), pays, then
//! replaces its funding transaction with a conflicting, higher-fee spend of the same
//! coin (full RBF, the default of this Core) and keeps paying. The gateway must:
//! cap the credit of the unconfirmed channel (first payment + one chunk, whatever the
//! capacity), notice the funding output is gone within a tick, withdraw the MAC's
//! credit from the kernel at once, refuse the channel's later updates with
//! `funding_double_spent`, and never settle it. A second test caps the zero-conf
//! exposure of all channels together (`--zero-conf-exposure-sat`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bitcoin::Amount;
use bitmesh_channel::chain::Chain;
use bitmesh_common::pricing::{bytes_for_payment, payment_for_bytes, ByteCount, PriceMsatPerMib};
use bitmesh_tests::chain::CoinbaseWallet;
use bitmesh_tests::client::ScriptedClient;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::Testbed;
use bitmesh_tests::upstream::udp_round_trips;
use bitmesh_tests::env::wait_until;
use serde_json::Value;

const CAPACITY: Amount = Amount::from_sat(20_000);
/// 100 sat/MiB: the first payment (close fee + dust, ~700 sat) buys ~7 MiB.
const PRICE_MSAT_PER_MIB: u64 = 100_000;
const CHUNK_BYTES: u64 = 1024 * 1024;

fn code(r: &bitmesh_tests::http::Response) -> String {
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
    v["code"].as_str().unwrap_or_default().to_string()
}

fn used(row: &Value) -> u64 {
    row["up_bytes"].as_u64().unwrap() + row["down_bytes"].as_u64().unwrap()
}

#[test]
fn double_spent_zero_conf_funding_loses_its_credit_within_a_tick_and_is_never_settled() {
    let price = PRICE_MSAT_PER_MIB.to_string();
    let chunk = CHUNK_BYTES.to_string();
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", &price, "--chunk-bytes", &chunk])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced().unwrap();
    let price = PriceMsatPerMib::new(PRICE_MSAT_PER_MIB).unwrap();

    // Funded at zero conf, through the gateway's relay.
    let mut client = lab.scripted_client();
    let offer = client.open(200).unwrap();
    let funding = client.funding_tx(&mut wallet, CAPACITY);
    client.fund_with(&funding, 0).unwrap();
    assert_eq!(lab.node.rpc().transaction(&funding.compute_txid()).unwrap().unwrap().confirmations, 0);

    // The unconfirmed channel's credit is capped at the first payment plus one chunk.
    let chunk_price = payment_for_bytes(ByteCount(CHUNK_BYTES), price);
    let first = offer.min_first_payment.max(chunk_price);
    let cap = first + chunk_price;
    let cap_bytes = bytes_for_payment(cap, price).to_u64();
    client.pay(first).unwrap();
    let udp = lab.client_udp().unwrap();
    assert!(udp_round_trips(&udp, 300, 1000) > 250, "the paid client passes traffic");
    client.pay(cap).unwrap();
    let over = client.send(&client.update(cap + chunk_price)).unwrap();
    assert_eq!(over.status, 409, "a total above the unconfirmed cap must be refused: {}", String::from_utf8_lossy(&over.body));
    assert_eq!(code(&over), "funding_unconfirmed");
    let row = ctl.client_row().unwrap().expect("client listed");
    assert_eq!(row["credited_bytes"].as_u64(), Some(cap_bytes), "{row}");

    // The attack: the same coin, spent back to the attacker at a higher fee.
    let conflict = wallet.conflicting(&funding, Amount::from_sat(20_000));
    lab.node.rpc().broadcast(&conflict).expect("full RBF replaces the funding");
    let sent_at = Instant::now();
    assert!(lab.node.rpc().transaction(&funding.compute_txid()).unwrap().is_none(), "funding evicted");

    // Without any payment, the next tick withdraws the credit and marks the channel.
    let row = wait_until("credit withdrawn", Duration::from_secs(15), || {
        ctl.client_row().ok().flatten().filter(|r| r["state"] == "double_spent" && r["metered"] == false)
    });
    let withdrawn_after = sent_at.elapsed();
    assert_eq!(row["credited_bytes"].as_u64(), Some(0), "{row}");
    assert_eq!(udp_round_trips(&udp, 50, 1000), 0, "traffic still passes after the funding was double-spent");
    let passed = used(&row);
    assert!(passed > 0 && passed <= cap_bytes, "bytes passed {passed} must be bounded by the cap {cap_bytes}");

    // Keep paying: every later update is refused with a typed error, nothing credited.
    for total in [cap + chunk_price, cap + chunk_price * 5, CAPACITY] {
        let r = client.send(&client.update(total)).unwrap();
        assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(code(&r), "funding_double_spent");
    }
    // Re-sending an accepted update changes nothing either.
    let r = client.send(&client.update(cap)).unwrap();
    assert_eq!(code(&r), "funding_double_spent");
    assert_eq!(udp_round_trips(&udp, 50, 1000), 0);
    let st = client.status().unwrap();
    assert_eq!(st.state, bitmesh_common::wire::ChannelState::Closed);

    // The conflict confirms; settling everything never touches this channel.
    lab.node.mine(1);
    lab.wait_synced().unwrap();
    ctl.cli(&["settle", "--all"]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let ch = ctl.channels().unwrap();
    let ch = ch.iter().find(|c| c["id"] == client.channel_id().to_string().as_str()).unwrap();
    assert_eq!(ch["state"], "double_spent", "{ch}");
    assert!(ch["close_txid"].is_null(), "a double-spent channel was settled: {ch}");
    let e = ctl.earnings().unwrap();
    assert_eq!(e["pending"].as_u64(), Some(0), "{e}");
    assert_eq!(e["settled"].as_u64(), Some(0), "{e}");
    eprintln!(
        "double spend: credit withdrawn {:.1} s after the conflict reached the node; bytes passed {passed} of the {cap_bytes}-byte unconfirmed cap ({} sat); capacity {} sat",
        withdrawn_after.as_secs_f64(),
        cap.to_sat(),
        CAPACITY.to_sat()
    );
}

#[test]
fn zero_conf_exposure_across_channels_is_capped() {
    // One channel's reservation (first payment + one chunk, ~704 sat at the default
    // price) fits; a second unconfirmed channel does not until funding confirms.
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let _ctl = lab.start_controller(&ControllerOpts::new().with(&["--zero-conf-exposure-sat", "1000"])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced().unwrap();
    let ids = lab.add_client_identities(2, false).unwrap();
    let mut a = ScriptedClient::with_identity(lab.client_ns(), lab.api(), ids[0].clone());
    let mut b = ScriptedClient::with_identity(lab.client_ns(), lab.api(), ids[1].clone());
    a.open(200).unwrap();
    b.open(200).unwrap();
    a.fund(&mut wallet, CAPACITY).unwrap();
    let tx_b = b.funding_tx(&mut wallet, CAPACITY);
    let req = bitmesh_common::wire::FundRequest { channel_id: b.channel_id(), funding_tx: tx_b.clone(), funding_vout: 0 };
    let r = b.post(&format!("/v1/channels/{}/funding", b.channel_id()), &serde_json::to_value(&req).unwrap()).unwrap();
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(code(&r), "funding_unconfirmed");
    // Once it confirms, the same funding is accepted.
    lab.node.mine(1);
    lab.wait_synced().unwrap();
    b.fund_with(&tx_b, 0).unwrap();
}
