//! A dead chain backend must not let the gateway keep crediting: without a fresh tip
//! it cannot know a channel's deadline or check unconfirmed funding. The node is
//! stopped under a running controller; once the tip is older than the documented
//! bound (12 polls, at least 60 s), payments and opens answer `chain_unavailable`
//! and change nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bitcoin::Amount;
use bitmesh_tests::chain::CoinbaseWallet;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::Testbed;
use bitmesh_tests::env::wait_until;
use serde_json::Value;

const CAPACITY: Amount = Amount::from_sat(20_000);

fn code(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    v["code"].as_str().unwrap_or_default().to_string()
}

/// The client's CREDIT as `bitmesh clients` shows it.
fn credit(ctl: &bitmesh_tests::controller::Controller) -> Option<u64> {
    let rows = ctl.clients().unwrap();
    rows.iter().find(|r| r["mac"] == bitmesh_tests::network::CLIENT_MAC).and_then(|r| r["credited_bytes"].as_u64())
}

#[test]
fn payments_and_opens_stop_with_chain_unavailable_once_the_tip_is_stale() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new()).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced().unwrap();
    let mut client = lab.scripted_client();
    let offer = client.open(200).unwrap();
    let funding = lab.confirmed_funding(&mut wallet, std::slice::from_ref(&client), CAPACITY, 1).unwrap();
    client.fund_with(&funding[0].0, funding[0].1).unwrap();
    let mut total = offer.min_first_payment;
    client.pay(total).unwrap();
    let other = lab.scripted_client();
    let terms = other.terms().unwrap();

    // The backend dies.
    lab.node.stop();
    let died = Instant::now();
    let stale_after = wait_until("payments refused as chain_unavailable", Duration::from_secs(150), || {
        total += Amount::from_sat(10);
        let r = client.send(&client.update(total)).unwrap();
        if r.status == 503 && code(&r.body) == "chain_unavailable" {
            return Some(died.elapsed());
        }
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        std::thread::sleep(Duration::from_secs(2));
        None
    });
    assert!(stale_after >= Duration::from_secs(55), "refused before the documented bound: {stale_after:?}");
    let credited = credit(&ctl);

    // Refused, and nothing changed: no credit for the refused totals.
    for _ in 0..3 {
        total += Amount::from_sat(100);
        let r = client.send(&client.update(total)).unwrap();
        assert_eq!((r.status, code(&r.body)), (503, "chain_unavailable".to_string()));
    }
    assert_eq!(credit(&ctl), credited);
    let req = bitmesh_common::wire::OpenRequest {
        client_pubkey: other.pubkey,
        expiry: bitcoin::absolute::Height::from_consensus(terms.tip_height.to_consensus_u32() + 200).unwrap(),
        client_change_script: other.change_script.clone(),
    };
    let r = other.post("/v1/channels", &serde_json::to_value(&req).unwrap()).unwrap();
    assert_eq!((r.status, code(&r.body)), (503, "chain_unavailable".to_string()), "{}", String::from_utf8_lossy(&r.body));
    eprintln!("chain backend stopped: payments refused after {:.0} s (bound: 12 polls, at least 60 s)", stale_after.as_secs_f64());
}
