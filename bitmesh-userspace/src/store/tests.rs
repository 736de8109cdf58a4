//! Store tests on real SQLite files in temporary directories.

use std::net::{IpAddr, Ipv4Addr};

use bitcoin::absolute::Height;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::PublicKey;
use bitcoin::{Amount, OutPoint, Txid};
use bitmesh_common::kernel::{Mac, Usage};

use super::*;

fn key(n: u8) -> PublicKey {
    let sk = SecretKey::from_slice(&[n; 32]).unwrap();
    PublicKey::new(bitcoin::secp256k1::PublicKey::from_secret_key(&Secp256k1::new(), &sk))
}

fn random_id() -> ChannelId {
    use bitcoin::secp256k1::rand::RngCore;
    let mut b = [0u8; 32];
    bitcoin::secp256k1::rand::thread_rng().fill_bytes(&mut b);
    ChannelId(b)
}

fn new_channel(store: &Store, mac_last: u8) -> ChannelRecord {
    let idx = store.next_key_index().unwrap();
    store
        .insert_channel(&NewChannel {
            id: random_id(),
            mac: Mac([2, 0, 0, 0, 0, mac_last]),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, mac_last)),
            client_pubkey: key(1),
            gateway_key_index: idx,
            gateway_pubkey: key(2),
            expiry: Height::from_consensus(500).unwrap(),
            client_change_script: bitcoin::ScriptBuf::new_op_return([1u8; 4]),
            price: PriceMsatPerMib::new(1000).unwrap(),
            chunk: ByteCount(1 << 20),
            min_first_payment: Amount::from_sat(700),
        })
        .unwrap()
}

fn payment(ch: ChannelId, sat: u64) -> NewPayment {
    NewPayment {
        channel: ch,
        paid_total: Amount::from_sat(sat),
        client_change: Amount::from_sat(100_000 - sat),
        signature: vec![0x30, sat as u8, 0x83],
        credited: ByteCount(sat * 1000),
    }
}

fn outpoint(n: u8) -> OutPoint {
    OutPoint { txid: format!("{:02x}", n).repeat(32).parse::<Txid>().unwrap(), vout: 1 }
}

#[test]
fn new_database_uses_wal_full_sync_and_current_schema() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::path_in(dir.path())).unwrap();
    let conn = store.conn().unwrap();
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
    let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(sync, 2, "synchronous=FULL is 2");
    assert_eq!(version, SCHEMA_VERSION);
}

#[test]
fn database_from_a_newer_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::path_in(dir.path());
    drop(Store::open(&path).unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(c);
    assert!(matches!(Store::open(&path), Err(StoreError::SchemaTooNew { found: 99, .. })));
}

#[test]
fn acknowledged_payment_survives_a_crash_without_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::path_in(dir.path());
    let store = Store::open(&path).unwrap();
    let ch = new_channel(&store, 1);
    store.set_funding(ch.id, Funding { outpoint: outpoint(1), capacity: Amount::from_sat(100_000), height: None }).unwrap();
    let out = store.append_payment(&payment(ch.id, 5_000)).unwrap();
    assert!(matches!(out, AppendOutcome::Appended(_)));
    // Crash-ish: the connection is never closed, the WAL never checkpointed.
    std::mem::forget(store);

    let store = Store::open(&path).unwrap();
    let got = store.channel(ch.id).unwrap().unwrap();
    assert_eq!(got.state, ChannelStage::Open);
    assert_eq!(got.paid_total, Amount::from_sat(5_000));
    assert_eq!(got.credited, ByteCount(5_000_000));
    assert_eq!(got.payments, 1);
    assert_eq!(store.latest_payment(ch.id).unwrap().unwrap().signature, vec![0x30, 5_000u64 as u8, 0x83]);
}

#[test]
fn resubmitted_update_returns_the_stored_ack_and_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::path_in(dir.path())).unwrap();
    let ch = new_channel(&store, 1);
    let first = store.append_payment(&payment(ch.id, 2_000)).unwrap();
    store.append_payment(&payment(ch.id, 3_000)).unwrap();
    let again = store.append_payment(&payment(ch.id, 2_000)).unwrap();
    assert_eq!(again, AppendOutcome::Duplicate(first.record().clone()));
    assert_eq!(store.payment_with_total(ch.id, Amount::from_sat(2_000)).unwrap().as_ref(), Some(first.record()));
    assert_eq!(store.payments(ch.id).unwrap().len(), 2);
    assert_eq!(store.channel(ch.id).unwrap().unwrap().paid_total, Amount::from_sat(3_000));
}

#[test]
fn update_with_decreasing_total_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::path_in(dir.path())).unwrap();
    let ch = new_channel(&store, 1);
    store.append_payment(&payment(ch.id, 3_000)).unwrap();
    let err = store.append_payment(&payment(ch.id, 2_500)).unwrap_err();
    assert!(matches!(err, StoreError::NotIncreasing { offered_sat: 2_500, last_sat: 3_000, .. }));
    let seqs: Vec<u64> = store.payments(ch.id).unwrap().iter().map(|p| p.sequence).collect();
    assert_eq!(seqs, vec![1]);
}

#[test]
fn payment_for_unknown_channel_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::path_in(dir.path())).unwrap();
    let err = store.append_payment(&payment(random_id(), 1)).unwrap_err();
    assert!(matches!(err, StoreError::UnknownChannel(_)));
}

#[test]
fn journal_refuses_update_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::path_in(dir.path())).unwrap();
    let ch = new_channel(&store, 1);
    store.append_payment(&payment(ch.id, 1_000)).unwrap();
    let conn = store.conn().unwrap();
    assert!(conn.execute("UPDATE payments SET paid_total_sat = 9", []).is_err());
    assert!(conn.execute("DELETE FROM payments", []).is_err());
}

#[test]
fn one_channel_per_funding_outpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::path_in(dir.path())).unwrap();
    let a = new_channel(&store, 1);
    let b = new_channel(&store, 2);
    assert_ne!(a.gateway_key_index, b.gateway_key_index);
    let f = Funding { outpoint: outpoint(7), capacity: Amount::from_sat(50_000), height: None };
    store.set_funding(a.id, f).unwrap();
    assert!(matches!(store.set_funding(b.id, f), Err(StoreError::OutpointInUse(_))));
    assert_eq!(store.channel_by_outpoint(f.outpoint).unwrap().unwrap().id, a.id);
    assert_eq!(store.channel(b.id).unwrap().unwrap().state, ChannelStage::Offered);
}

#[test]
fn settlement_lifecycle_moves_money_from_held_to_pending_to_settled() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::path_in(dir.path());
    let store = Store::open(&path).unwrap();
    let a = new_channel(&store, 1);
    let b = new_channel(&store, 2);
    for (ch, n) in [(&a, 1), (&b, 2)] {
        store.set_funding(ch.id, Funding { outpoint: outpoint(n), capacity: Amount::from_sat(100_000), height: None }).unwrap();
    }
    store.append_payment(&payment(a.id, 4_000)).unwrap();
    store.append_payment(&payment(b.id, 6_000)).unwrap();
    assert_eq!(store.earnings().unwrap().held_open, Amount::from_sat(10_000));

    let tx = |lock: u32| bitcoin::Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: bitcoin::absolute::LockTime::from_consensus(lock),
        input: vec![],
        output: vec![],
    };
    let first = store
        .record_settlement(&NewSettlement {
            tx: tx(1),
            fee: Amount::from_sat(300),
            gateway_payout: Amount::from_sat(9_700),
            broadcast_height: Height::from_consensus(400).unwrap(),
            channels: vec![a.id, b.id],
            replaces: None,
        })
        .unwrap();
    let bumped = store
        .record_settlement(&NewSettlement {
            tx: tx(2),
            fee: Amount::from_sat(600),
            gateway_payout: Amount::from_sat(9_400),
            broadcast_height: Height::from_consensus(403).unwrap(),
            channels: vec![a.id, b.id],
            replaces: Some(first.id),
        })
        .unwrap();
    drop(store);

    // After a restart, the pending settlement is found again.
    let store = Store::open(&path).unwrap();
    let pending = store.settlements_in(SettlementState::Broadcast).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, bumped.id);
    assert_eq!(pending[0].channels.len(), 2);
    assert_eq!(store.settlement(first.id).unwrap().unwrap().state, SettlementState::Replaced);
    let e = store.earnings().unwrap();
    assert_eq!((e.held_open, e.pending), (Amount::ZERO, Amount::from_sat(9_400)));

    store.mark_settlement_confirmed(bumped.id, Height::from_consensus(404).unwrap()).unwrap();
    assert_eq!(store.channel(a.id).unwrap().unwrap().state, ChannelStage::Closed);
    let e = store.earnings().unwrap();
    assert_eq!((e.settled, e.pending), (Amount::from_sat(9_400), Amount::ZERO));
}

#[test]
fn usage_snapshot_keeps_the_latest_per_mac() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::path_in(dir.path())).unwrap();
    let mac = Mac([2, 0, 0, 0, 0, 9]);
    let snap = |up| UsageSnapshot { mac, usage: Usage { up_bytes: up, down_bytes: 7, up_pkts: 1, down_pkts: 1, last_seen_ns: 5 }, taken_at: 1 };
    store.save_usage(&[snap(10)]).unwrap();
    store.save_usage(&[snap(20)]).unwrap();
    let got = store.usage_snapshots().unwrap();
    assert_eq!(got, vec![snap(20)]);
    assert_eq!(got[0].usage.used_bytes(), 27);
}

#[test]
fn bindings_and_settings_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::path_in(dir.path());
    let store = Store::open(&path).unwrap();
    let mac = Mac([2, 0, 0, 0, 0, 3]);
    store.bind_client(mac, "10.0.0.3".parse().unwrap()).unwrap();
    store.bind_client(mac, "10.0.0.4".parse().unwrap()).unwrap();
    store.set_setting("price_msat_per_mib", "2500").unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    let b = store.client_bindings().unwrap();
    assert_eq!((b.len(), b[0].ip), (1, "10.0.0.4".parse().unwrap()));
    assert_eq!(store.setting("price_msat_per_mib").unwrap().as_deref(), Some("2500"));
    let live = new_channel(&store, 3);
    assert_eq!(store.live_channel_for_mac(mac).unwrap().unwrap().id, live.id);
}

#[test]
fn final_usage_is_kept_with_the_channel_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = Store::path_in(dir.path());
    let store = Store::open(&path).unwrap();
    let ch = new_channel(&store, 4);
    assert_eq!(ch.final_usage, None, "nothing recorded while metered");
    let used = FinalUsage { up: ByteCount(1_500), down: ByteCount(2_000_000) };
    store.set_final_usage(ch.id, used).unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.channel(ch.id).unwrap().unwrap().final_usage, Some(used));
    assert!(matches!(store.set_final_usage(random_id(), used), Err(StoreError::UnknownChannel(_))));
}

#[test]
fn only_an_offered_channel_can_be_funded_and_its_outpoint_never_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::path_in(dir.path())).unwrap();
    let ch = new_channel(&store, 7);
    let first = Funding { outpoint: outpoint(1), capacity: Amount::from_sat(100_000), height: None };
    store.set_funding(ch.id, first).unwrap();
    let second = Funding { outpoint: outpoint(2), ..first };
    let err = store.set_funding(ch.id, second).unwrap_err();
    assert!(matches!(err, StoreError::NotOffered { state: ChannelStage::Open, .. }), "{err}");
    assert_eq!(store.channel(ch.id).unwrap().unwrap().funding, Some(first), "the recorded outpoint is unchanged");
    let gone = new_channel(&store, 8);
    store.abandon(gone.id).unwrap();
    assert!(matches!(store.set_funding(gone.id, second), Err(StoreError::NotOffered { state: ChannelStage::Abandoned, .. })));
    assert!(matches!(store.set_funding(random_id(), second), Err(StoreError::UnknownChannel(_))));
}

#[test]
fn channels_are_selected_by_state_and_old_offers_expire() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Store::path_in(dir.path())).unwrap();
    let open = new_channel(&store, 1);
    store.set_funding(open.id, Funding { outpoint: outpoint(1), capacity: Amount::from_sat(100_000), height: None }).unwrap();
    let offered = new_channel(&store, 2);
    let ids = |states: &[ChannelStage]| store.channels_in(states).unwrap().into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(ids(&[ChannelStage::Open]), vec![open.id]);
    assert_eq!(ids(&[ChannelStage::Offered]), vec![offered.id]);
    assert_eq!(ids(&[ChannelStage::Open, ChannelStage::Offered]).len(), 2);
    assert!(ids(&[]).is_empty());
    // Offers made before the cutoff expire; funded channels are untouched.
    assert!(store.expire_offers(offered.opened_at).unwrap().is_empty(), "not older than the cutoff");
    assert_eq!(store.expire_offers(offered.opened_at + 1).unwrap(), vec![offered.id]);
    assert_eq!(store.channel(offered.id).unwrap().unwrap().state, ChannelStage::Abandoned);
    assert_eq!(store.channel(open.id).unwrap().unwrap().state, ChannelStage::Open);
    assert!(store.expire_offers(i64::MAX).unwrap().is_empty());
}

#[test]
fn database_files_are_private_even_under_a_permissive_umask_or_from_an_older_run() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let path = Store::path_in(dir.path());
    // SAFETY: umask only changes this process's file-creation mask; restored below.
    let old = unsafe { libc::umask(0o000) };
    let store = Store::open(&path).unwrap();
    new_channel(&store, 9);
    unsafe { libc::umask(old) };
    for f in [path.clone(), sibling(&path, "-wal"), sibling(&path, "-shm")] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    drop(store);
    // An older bitmesh left the database world-readable: the next open tightens it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _store = Store::open(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
}
