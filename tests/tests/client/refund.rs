//! `bitmesh refund` on a real regtest node: the gateway takes a payment and then
//! vanishes without closing; the agent's refund is refused as too early (with the
//! height it becomes possible), then confirms once expiry has passed.

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bitcoin::secp256k1::{rand, SecretKey};
use bitcoin::{Address, CompressedPublicKey, Network, OutPoint, PrivateKey, ScriptBuf};
use bitmesh_channel::chain::Chain;
use bitmesh_client::funding::{FundingSource, Utxo};
use bitmesh_client::refund::{refund, RefundOutcome};
use bitmesh_client::session;
use bitmesh_client::state::Phase;
use bitmesh_common::pricing::MIB;
use bitmesh_tests::chain::Bitcoind;
use crate::support::*;

/// A key with one mature P2WPKH coinbase output, as a `--fund-from` source.
fn coinbase_funding(node: &Bitcoind) -> FundingSource {
    let key = PrivateKey::new(SecretKey::new(&mut rand::thread_rng()), Network::Regtest);
    let public = CompressedPublicKey::from_private_key(&bitcoin::secp256k1::Secp256k1::new(), &key).unwrap();
    let address = Address::p2wpkh(&public, Network::Regtest);
    let height = node.tip().to_consensus_u32() + 1;
    node.mine_to(1, &address);
    node.mine(100);
    let cb = node.block(height).txdata.remove(0);
    let vout = cb.output.iter().position(|o| o.script_pubkey == address.script_pubkey()).unwrap();
    FundingSource {
        keys: vec![key.to_wif()],
        utxos: vec![Utxo {
            outpoint: OutPoint { txid: cb.compute_txid(), vout: vout as u32 },
            amount: cb.output[vout].value,
            script_pubkey: ScriptBuf::new_p2wpkh(&public.wpubkey_hash()),
        }],
        change_address: None,
    }
}

#[test]
fn refund_confirms_after_expiry_when_the_gateway_vanished() {
    let Some(node) = Bitcoind::start() else { return };
    let funding = coinbase_funding(&node);
    let refund_script = funding.change_script(Network::Regtest).unwrap();
    let gw = TestGateway::start(false);
    gw.book.lock().unwrap().terms.tip_height = node.tip();
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, stop) = config(&gw.url, dir.path(), funding, 1000);
    cfg.close_on_exit = false;
    let meter = TestMeter::default();
    meter.set(MIB);
    let mut m = meter.clone();
    let agent = std::thread::spawn(move || session::run(cfg, &mut m, &mut RecordingUi::default()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.totals().is_empty() {
        assert!(Instant::now() < deadline, "no payment");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut record = agent.join().unwrap().unwrap().record;
    drop(gw); // the gateway vanishes without closing

    // The agent signed the funding; this test gateway does not relay, so the test
    // broadcasts it as the real gateway's relay would.
    let f = record.funding.clone().unwrap();
    node.rpc().broadcast(&f.tx).unwrap();
    node.mine(1);

    let outcome = refund(&mut record, node.rpc(), None).unwrap();
    let RefundOutcome::TooEarly { broadcast_from, .. } = outcome else { panic!("{outcome:?}") };
    assert_eq!(broadcast_from, record.expiry, "says from which height");
    assert_eq!(record.phase, Phase::Open);

    let to_go = record.expiry.to_consensus_u32() - node.tip().to_consensus_u32();
    node.mine(to_go);
    let outcome = refund(&mut record, node.rpc(), None).unwrap();
    let RefundOutcome::Broadcast(txid) = outcome else { panic!("{outcome:?}") };
    assert_eq!(record.phase, Phase::Refunded);
    node.mine(1);
    let status = node.rpc().transaction(&txid).unwrap().unwrap();
    assert_eq!(status.confirmations, 1, "refund confirmed");
    assert_eq!(status.tx.output[0].script_pubkey, refund_script, "paid to the user's address");
    assert!(status.tx.output[0].value > f.capacity - bitcoin::Amount::from_sat(1000));
    // Once spent, a second call does nothing.
    assert_eq!(refund(&mut record, node.rpc(), None).unwrap(), RefundOutcome::AlreadySpent);
}
