//! Controller logic with an in-memory meter and an in-process chain stand-in (unit
//! level only; the integration tests use a real regtest node).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex as StdMutex;
use std::time::Instant;

use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{absolute, Amount, FeeRate, OutPoint, Transaction, TxIn, TxOut, Txid, Witness};
use bitmesh_common::pricing::bytes_for_payment;
use bitmesh_common::wire::{ErrorCode, FundRequest, OpenRequest, PaymentUpdate};
use clap::{CommandFactory, FromArgMatches, Parser};

use super::*;
use crate::api::{ApiError, ClientGateway};
use bitmesh_channel::chain::{MempoolAcceptance, OutputStatus, TxStatus};
use bitmesh_channel::sign_update;
use crate::config::RunArgs;
use bitmesh_common::kernel::Mac;

#[derive(Default)]
pub(super) struct StandIn {
    txs: StdMutex<HashMap<Txid, Transaction>>,
}

impl Chain for StandIn {
    fn backend(&self) -> &'static str {
        "stand-in"
    }
    fn tip_height(&self) -> Result<Height, ChainError> {
        Ok(Height::from_consensus(200).unwrap())
    }
    fn transaction(&self, txid: &Txid) -> Result<Option<TxStatus>, ChainError> {
        Ok(self.txs.lock().unwrap().get(txid).map(|tx| TxStatus { tx: tx.clone(), confirmations: 0, block_height: None }))
    }
    fn unspent_output(&self, op: &OutPoint) -> Result<Option<OutputStatus>, ChainError> {
        // Every output of a known transaction counts as unspent (nothing here spends).
        let txs = self.txs.lock().unwrap();
        let out = txs.get(&op.txid).and_then(|tx| tx.output.get(op.vout as usize).cloned());
        Ok(out.map(|txout| OutputStatus { txout, confirmations: 0 }))
    }
    fn broadcast(&self, tx: &Transaction) -> Result<Txid, ChainError> {
        self.txs.lock().unwrap().insert(tx.compute_txid(), tx.clone());
        Ok(tx.compute_txid())
    }
    fn fee_rate(&self, _: u16, floor: FeeRate) -> Result<FeeRate, ChainError> {
        Ok(floor)
    }
    fn test_mempool_accept(&self, _: &[Transaction]) -> Result<Vec<MempoolAcceptance>, ChainError> {
        Err(ChainError::Unsupported { backend: "stand-in", call: "testmempoolaccept" })
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

const PEER: &str = "10.0.0.2";
const MAC: Mac = Mac([2, 0, 0, 0, 0, 2]);

fn gateway(store: Arc<Store>) -> Arc<Gateway> {
    let m = Cli::command().try_get_matches_from(["x", "--network", "regtest"]).unwrap();
    let policy = RunArgs::from_arg_matches(&m).unwrap().policy().unwrap();
    let seed = GatewaySeed::from_seed(&[7; 32], bitcoin::Network::Regtest).unwrap();
    let payout = seed.channel_key(0x7fff_ffff).unwrap();
    let payout_script = ScriptBuf::new_p2wpkh(&payout.public.wpubkey_hash().unwrap());
    let neighbours = StaticNeighbours(HashMap::from([(PEER.parse::<IpAddr>().unwrap(), MAC)]));
    Gateway::new(
        GatewayParts {
            store,
            meter: Box::new(MemoryMeter::default()),
            chain: Arc::new(StandIn::default()),
            seed,
            policy,
            payout_script,
            neighbours: Box::new(neighbours),
            portal_url: "http://10.0.0.1:3141/v1/terms".into(),
            venue_info_url: None,
        },
        Height::from_consensus(200).unwrap(),
    )
    .unwrap()
}

fn credit_of(gw: &Gateway) -> Option<u64> {
    gw.metered_clients().unwrap().into_iter().find(|c| c.mac == MAC).map(|c| c.credited.0)
}

#[tokio::test]
async fn payment_is_journaled_then_credited_and_resubmission_returns_the_same_ack() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let gw = gateway(store.clone());
    let peer: IpAddr = PEER.parse().unwrap();
    let secp = Secp256k1::new();
    let client_sk = SecretKey::from_slice(&[3; 32]).unwrap();
    let client_pk = bitcoin::PublicKey::new(bitcoin::secp256k1::PublicKey::from_secret_key(&secp, &client_sk));
    let change = ScriptBuf::new_p2wpkh(&client_pk.wpubkey_hash().unwrap());

    let open = ClientGateway::open(
        &*gw,
        peer,
        OpenRequest { client_pubkey: client_pk, expiry: absolute::Height::from_consensus(200 + 500).unwrap(), client_change_script: change.clone() },
    )
    .await
    .unwrap();
    let funding = Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn { witness: Witness::from_slice(&[[1u8; 72].as_slice(), [2u8; 33].as_slice()]), ..Default::default() }],
        output: vec![TxOut { value: Amount::from_sat(40_000), script_pubkey: open.funding_script_pubkey.clone() }],
    };
    let st = ClientGateway::fund(&*gw, peer, FundRequest { channel_id: open.channel_id, funding_tx: funding.clone(), funding_vout: 0 })
        .await
        .unwrap();
    assert_eq!(st.capacity, Some(Amount::from_sat(40_000)));
    assert_eq!(credit_of(&gw), Some(0), "funded client is metered with zero credit");
    // Confirmed at the tip: the zero-conf credit cap (exposure.rs) no longer applies.
    store.set_funding_height(open.channel_id, Height::from_consensus(200).unwrap()).unwrap();

    let rec = store.channel(open.channel_id).unwrap().unwrap();
    let channel = Gateway::channel_of(&rec).unwrap();
    let first = open.min_first_payment + Amount::from_sat(100);
    let update = |total: Amount| PaymentUpdate { channel_id: open.channel_id, total_paid: total, signature: sign_update(&channel, total, &client_sk).unwrap() };

    let u1 = update(first);
    let ack = gw.pay(u1.clone()).await.unwrap();
    let want = bytes_for_payment(first, rec.price);
    assert_eq!(ack.credited_bytes, want);
    assert_eq!(credit_of(&gw), Some(want.0), "credit raised after the journal write");
    assert_eq!(store.payments(open.channel_id).unwrap().len(), 1);

    let again = gw.pay(u1).await.unwrap();
    assert_eq!(again, ack, "re-sent update gets the stored ack");
    assert_eq!(store.payments(open.channel_id).unwrap().len(), 1, "nothing journaled twice");

    let err = ApiError::from(GatewayError::from(
        bitmesh_channel::ChannelError::SignatureInvalid,
    ));
    assert_eq!(err.code(), ErrorCode::SignatureInvalid);
    let lower = gw.pay(update(first - Amount::from_sat(50))).await.map_err(ApiError::from).unwrap_err();
    assert_eq!(lower.code(), ErrorCode::AmountNotIncreasing);

    // Durable round trips (verify + synced journal + credit), measured.
    let mut lat = Vec::new();
    for i in 1..=60u64 {
        let u = update(first + Amount::from_sat(i * 10));
        let t = Instant::now();
        gw.pay(u).await.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    eprintln!("payment update (in-process, durable) p50 {:?} p99 {:?}", lat[lat.len() / 2], lat[lat.len() * 99 / 100]);

    // Reboot: a new controller with empty maps rebuilds CREDIT from the journal.
    let last = store.channel(open.channel_id).unwrap().unwrap();
    drop(gw);
    let gw = gateway(store.clone());
    // The node still has the funding output after the gateway's reboot.
    gw.chain.broadcast(&funding).unwrap();
    assert_eq!(credit_of(&gw), None);
    let r = gw.reconcile(false).unwrap();
    assert_eq!(r.clients, 1);
    assert_eq!(credit_of(&gw), Some(last.credited.0));

    // Operator settles: one close, recorded before broadcast, client unmetered.
    let rep = gw.settle_now(None).await.unwrap();
    assert_eq!(rep.closed, vec![open.channel_id]);
    assert_eq!(rep.broadcast.len(), 1);
    assert_eq!(credit_of(&gw), None);
    let e = store.earnings().unwrap();
    assert!(e.pending > Amount::ZERO && e.held_open == Amount::ZERO, "{e:?}");
}

/// Open and fund a channel for the test device; its channel and client key.
async fn funded(gw: &Gateway, store: &Store, seed: u8) -> (bitmesh_channel::Channel, SecretKey, ChannelId) {
    let peer: IpAddr = PEER.parse().unwrap();
    let secp = Secp256k1::new();
    let client_sk = SecretKey::from_slice(&[seed; 32]).unwrap();
    let client_pk = bitcoin::PublicKey::new(bitcoin::secp256k1::PublicKey::from_secret_key(&secp, &client_sk));
    let change = ScriptBuf::new_p2wpkh(&client_pk.wpubkey_hash().unwrap());
    let req = OpenRequest { client_pubkey: client_pk, expiry: absolute::Height::from_consensus(700).unwrap(), client_change_script: change };
    let open = ClientGateway::open(gw, peer, req.clone()).await.unwrap();
    assert_eq!(ClientGateway::open(gw, peer, req).await.unwrap(), open, "a repeated open gets the same offer");
    let funding = Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn { witness: Witness::from_slice(&[[seed; 72].as_slice(), [2u8; 33].as_slice()]), ..Default::default() }],
        output: vec![TxOut { value: Amount::from_sat(40_000), script_pubkey: open.funding_script_pubkey.clone() }],
    };
    ClientGateway::fund(gw, peer, FundRequest { channel_id: open.channel_id, funding_tx: funding, funding_vout: 0 }).await.unwrap();
    // Confirmed at the tip: the zero-conf credit cap (exposure.rs) does not apply here.
    store.set_funding_height(open.channel_id, Height::from_consensus(200).unwrap()).unwrap();
    let rec = store.channel(open.channel_id).unwrap().unwrap();
    (Gateway::channel_of(&rec).unwrap(), client_sk, open.channel_id)
}

#[tokio::test]
async fn replayed_updates_credit_only_the_current_open_channel_and_stale_entries_go() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let gw = gateway(store.clone());
    let (channel, sk, id) = funded(&gw, &store, 3).await;
    let update = |total: Amount| PaymentUpdate { channel_id: id, total_paid: total, signature: sign_update(&channel, total, &sk).unwrap() };
    let first = channel.min_first_payment;
    let u1 = update(first);
    let u2 = update(first + Amount::from_sat(3_000));
    gw.pay(u1.clone()).await.unwrap();
    let ack2 = gw.pay(u2.clone()).await.unwrap();
    let credit = credit_of(&gw);

    // An older update, re-sent: refused as not increasing, nothing changes.
    let err = gw.pay(u1).await.map_err(ApiError::from).unwrap_err();
    assert_eq!(err.code(), ErrorCode::AmountNotIncreasing, "{err}");
    assert_eq!((store.payments(id).unwrap().len(), credit_of(&gw)), (2, credit));
    assert_eq!(gw.pay(u2.clone()).await.unwrap(), ack2, "the latest one is answered from the journal");

    // Closed: a replay is refused and creates no kernel entry.
    gw.settle_now(None).await.unwrap();
    assert_eq!(credit_of(&gw), None);
    let err = gw.pay(u2.clone()).await.map_err(ApiError::from).unwrap_err();
    assert_eq!(err.code(), ErrorCode::ChannelNotOpen, "{err}");
    assert_eq!(credit_of(&gw), None, "a replay after close re-created CREDIT");

    // A newer channel on the same device: the old update still credits nothing.
    let (channel_b, sk_b, id_b) = funded(&gw, &store, 4).await;
    let b1 = PaymentUpdate { channel_id: id_b, total_paid: channel_b.min_first_payment, signature: sign_update(&channel_b, channel_b.min_first_payment, &sk_b).unwrap() };
    let ack_b = gw.pay(b1).await.unwrap();
    assert_eq!(gw.pay(u2).await.map_err(ApiError::from).unwrap_err().code(), ErrorCode::ChannelNotOpen);
    assert_eq!(credit_of(&gw), Some(ack_b.credited_bytes.0), "CREDIT is channel B's own total");

    // Leftover entries of a device with no open channel are removed by reconcile.
    gw.settle_now(None).await.unwrap();
    gw.with_meter(|m| m.restore_client(MAC, Default::default())).unwrap();
    gw.with_meter(|m| m.raise_credit(MAC, bitmesh_common::pricing::ByteCount(1 << 30))).unwrap();
    let r = gw.reconcile(true).unwrap();
    assert_eq!((r.clients, r.stale_removed), (0, 1));
    assert_eq!(credit_of(&gw), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_funding_calls_record_one_outpoint_and_refuse_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let gw = gateway(store.clone());
    let peer: IpAddr = PEER.parse().unwrap();
    let secp = Secp256k1::new();
    let client_sk = SecretKey::from_slice(&[5; 32]).unwrap();
    let client_pk = bitcoin::PublicKey::new(bitcoin::secp256k1::PublicKey::from_secret_key(&secp, &client_sk));
    let change = ScriptBuf::new_p2wpkh(&client_pk.wpubkey_hash().unwrap());
    let req = OpenRequest { client_pubkey: client_pk, expiry: absolute::Height::from_consensus(700).unwrap(), client_change_script: change };
    let open = ClientGateway::open(&*gw, peer, req).await.unwrap();
    let funding = |n: u8| Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint { txid: format!("{n:02x}").repeat(32).parse().unwrap(), vout: 0 },
            witness: Witness::from_slice(&[[n; 72].as_slice(), [2u8; 33].as_slice()]),
            ..Default::default()
        }],
        output: vec![TxOut { value: Amount::from_sat(40_000), script_pubkey: open.funding_script_pubkey.clone() }],
    };
    let (a, b) = (funding(1), funding(2));
    let call = |tx: Transaction| {
        let gw = gw.clone();
        let id = open.channel_id;
        tokio::spawn(async move { ClientGateway::fund(&*gw, peer, FundRequest { channel_id: id, funding_tx: tx, funding_vout: 0 }).await })
    };
    let (ra, rb) = (call(a.clone()), call(b.clone()));
    let (ra, rb) = (ra.await.unwrap(), rb.await.unwrap());
    assert!(ra.is_ok() != rb.is_ok(), "exactly one funding call wins: {ra:?} {rb:?}");
    let (won, lost) = if ra.is_ok() { (&a, rb) } else { (&b, ra) };
    assert_eq!(ApiError::from(lost.unwrap_err()).code(), ErrorCode::ChannelNotOpen);
    let rec = store.channel(open.channel_id).unwrap().unwrap();
    assert_eq!(rec.funding.unwrap().outpoint, OutPoint { txid: won.compute_txid(), vout: 0 });
}

#[tokio::test]
async fn unconfirmed_channel_is_capped_and_loses_its_credit_when_its_funding_vanishes_and_a_stale_tip_stops_payments() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let gw = gateway(store.clone());
    let peer: IpAddr = PEER.parse().unwrap();
    let secp = Secp256k1::new();
    let client_sk = SecretKey::from_slice(&[4; 32]).unwrap();
    let client_pk = bitcoin::PublicKey::new(bitcoin::secp256k1::PublicKey::from_secret_key(&secp, &client_sk));
    let change = ScriptBuf::new_p2wpkh(&client_pk.wpubkey_hash().unwrap());
    let open = ClientGateway::open(
        &*gw,
        peer,
        OpenRequest { client_pubkey: client_pk, expiry: absolute::Height::from_consensus(700).unwrap(), client_change_script: change },
    )
    .await
    .unwrap();
    let funding = Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn { witness: Witness::from_slice(&[[1u8; 72].as_slice(), [2u8; 33].as_slice()]), ..Default::default() }],
        output: vec![TxOut { value: Amount::from_sat(40_000), script_pubkey: open.funding_script_pubkey.clone() }],
    };
    ClientGateway::fund(&*gw, peer, FundRequest { channel_id: open.channel_id, funding_tx: funding.clone(), funding_vout: 0 })
        .await
        .unwrap();
    let rec = store.channel(open.channel_id).unwrap().unwrap();
    let channel = Gateway::channel_of(&rec).unwrap();
    let update = |total: Amount| PaymentUpdate { channel_id: open.channel_id, total_paid: total, signature: sign_update(&channel, total, &client_sk).unwrap() };
    let cap = super::exposure::unconfirmed_total_cap(&rec);
    gw.pay(update(open.min_first_payment)).await.unwrap();
    gw.pay(update(cap)).await.unwrap();
    let over = gw.pay(update(cap + Amount::from_sat(1))).await.map_err(ApiError::from).unwrap_err();
    assert_eq!(over.code(), ErrorCode::FundingUnconfirmed);
    assert_eq!(credit_of(&gw), Some(bytes_for_payment(cap, rec.price).0));

    // The funding leaves the node (a restart on a chain that does not know it; the
    // real double spend is tests/tests/controller_double_spend.rs): the next payment
    // withdraws the credit.
    drop(gw);
    let chain = Arc::new(StandIn::default());
    let m = Cli::command().try_get_matches_from(["x", "--network", "regtest"]).unwrap();
    let policy = RunArgs::from_arg_matches(&m).unwrap().policy().unwrap();
    let seed = GatewaySeed::from_seed(&[7; 32], bitcoin::Network::Regtest).unwrap();
    let payout = seed.channel_key(0x7fff_ffff).unwrap();
    let gw = Gateway::new(
        GatewayParts {
            store: store.clone(),
            meter: Box::new(MemoryMeter::default()),
            chain,
            seed,
            policy,
            payout_script: ScriptBuf::new_p2wpkh(&payout.public.wpubkey_hash().unwrap()),
            neighbours: Box::new(StaticNeighbours(HashMap::from([(peer, MAC)]))),
            portal_url: String::new(),
            venue_info_url: None,
        },
        Height::from_consensus(200).unwrap(),
    )
    .unwrap();
    gw.reconcile(false).unwrap();
    assert!(credit_of(&gw).is_some());
    let err = gw.pay(update(cap)).await.map_err(ApiError::from).unwrap_err();
    assert_eq!(err.code(), ErrorCode::FundingDoubleSpent);
    assert_eq!(credit_of(&gw), None, "credit withdrawn");
    assert_eq!(store.channel(open.channel_id).unwrap().unwrap().state, crate::store::ChannelStage::DoubleSpent);
    let rep = gw.settle_now(None).await.unwrap();
    assert!(rep.closed.is_empty() && rep.broadcast.is_empty(), "never settled: {rep:?}");

    // A tip not refreshed for longer than the bound stops opens and payments.
    *gw.tip_read_at.lock().unwrap() = Instant::now() - gw.policy().chain_stale_after - std::time::Duration::from_secs(1);
    let req = OpenRequest { client_pubkey: client_pk, expiry: absolute::Height::from_consensus(700).unwrap(), client_change_script: ScriptBuf::new_p2wpkh(&client_pk.wpubkey_hash().unwrap()) };
    assert_eq!(ClientGateway::open(&*gw, peer, req).await.map_err(ApiError::from).unwrap_err().code(), ErrorCode::ChainUnavailable);
}
