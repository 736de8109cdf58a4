//! The Lightning rail's money rules with an in-memory meter whose counters the test
//! moves, and a stand-in invoice source (the integration tests use real nodes:
//! tests/tests/lightning.rs).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex as StdMutex;

use bitcoin::{absolute, Amount, Transaction, TxIn, TxOut, Witness};
use bitmesh_common::kernel::{Mac, Usage};
use bitmesh_common::pricing::ByteCount;
use bitmesh_common::wire::{ErrorCode, FundRequest, InvoiceRequest, InvoiceState, OpenRequest, RestoreRequest};
use clap::{CommandFactory, FromArgMatches, Parser};

use super::*;
use crate::api::ClientGateway;
use crate::config::RunArgs;
use crate::meter::ClientUsage;
use crate::lightning::{parse_bundles, InvoiceSource, LightningError, LightningSettings, NewInvoice, TokenKey};
use crate::store::PaymentHash;

/// A MemoryMeter the test can reach while the gateway owns it.
#[derive(Clone, Default)]
struct SharedMeter(Arc<StdMutex<MemoryMeter>>);

impl SharedMeter {
    fn use_bytes(&self, mac: Mac, n: u64) {
        let mut m = self.0.lock().unwrap();
        let e = m.clients.get_mut(&mac).expect("metered");
        e.usage.down_bytes += n;
    }
    fn credit(&self, mac: Mac) -> Option<u64> {
        self.0.lock().unwrap().clients.get(&mac).map(|c| c.credited.0)
    }
    fn remaining(&self, mac: Mac) -> Option<u64> {
        self.0.lock().unwrap().clients.get(&mac).map(|c| c.credited.0.saturating_sub(c.usage.used_bytes()))
    }
}

impl MeterPort for SharedMeter {
    fn restore_client(&mut self, mac: Mac, usage: Usage) -> Result<(), MeterError> {
        self.0.lock().unwrap().restore_client(mac, usage)
    }
    fn raise_credit(&mut self, mac: Mac, total: ByteCount) -> Result<(), MeterError> {
        self.0.lock().unwrap().raise_credit(mac, total)
    }
    fn set_credit(&mut self, mac: Mac, total: ByteCount) -> Result<(), MeterError> {
        self.0.lock().unwrap().set_credit(mac, total)
    }
    fn usage(&self, mac: Mac) -> Result<Option<ClientUsage>, MeterError> {
        self.0.lock().unwrap().usage(mac)
    }
    fn all_usage(&self) -> Result<Vec<ClientUsage>, MeterError> {
        self.0.lock().unwrap().all_usage()
    }
    fn remove_client(&mut self, mac: Mac) -> Result<Option<ClientUsage>, MeterError> {
        self.0.lock().unwrap().remove_client(mac)
    }
}

/// Invoices with sequential payment hashes.
#[derive(Default)]
struct StandInNode(StdMutex<u8>);

impl InvoiceSource for StandInNode {
    fn node_id(&self) -> String {
        "02".repeat(33)
    }
    fn invoice(&self, _amount_msat: u64, _description: &str, expiry_secs: u32) -> Result<NewInvoice, LightningError> {
        let mut n = self.0.lock().unwrap();
        *n += 1;
        Ok(NewInvoice {
            payment_hash: PaymentHash([*n; 32]),
            bolt11: format!("lnbcrt-stand-in-{n}"),
            expires_at: crate::store::unix_now() as u64 + u64::from(expiry_secs),
        })
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

const A: &str = "10.0.0.2";
const B: &str = "10.0.0.3";
const MAC_A: Mac = Mac([2, 0, 0, 0, 0, 2]);
const MAC_B: Mac = Mac([2, 0, 0, 0, 0, 3]);
const MIB: u64 = 1 << 20;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn lab(store: Arc<Store>, meter: SharedMeter) -> Arc<Gateway> {
    lab_with(store, meter, |_| {})
}

fn lab_with(store: Arc<Store>, meter: SharedMeter, adjust: impl FnOnce(&mut LightningSettings)) -> Arc<Gateway> {
    lab_on(store, meter, HashMap::from([(ip(A), MAC_A), (ip(B), MAC_B)]), adjust)
}

/// The lab with `devices` on the network (IP to MAC).
fn lab_on(
    store: Arc<Store>,
    meter: SharedMeter,
    devices: HashMap<IpAddr, Mac>,
    adjust: impl FnOnce(&mut LightningSettings),
) -> Arc<Gateway> {
    let m = Cli::command().try_get_matches_from(["x", "--network", "regtest", "--lightning"]).unwrap();
    let args = RunArgs::from_arg_matches(&m).unwrap();
    let policy = args.policy().unwrap();
    let seed = GatewaySeed::from_seed(&[7; 32], bitcoin::Network::Regtest).unwrap();
    let payout = seed.channel_key(0x7fff_ffff).unwrap();
    let neighbours = StaticNeighbours(devices);
    let gw = Gateway::new(
        GatewayParts {
            store,
            meter: Box::new(meter),
            chain: Arc::new(super::tests::StandIn::default()),
            seed,
            policy,
            payout_script: ScriptBuf::new_p2wpkh(&payout.public.wpubkey_hash().unwrap()),
            neighbours: Box::new(neighbours),
            portal_url: String::new(),
            venue_info_url: None,
        },
        Height::from_consensus(200).unwrap(),
    )
    .unwrap();
    let mut settings = LightningSettings::from_args(&args).unwrap().unwrap();
    settings.bundles = parse_bundles("1MiB,10MiB").unwrap();
    adjust(&mut settings);
    gw.attach_lightning(LightningRail {
        invoices: Arc::new(StandInNode::default()),
        settings,
        token_key: TokenKey::from_seed(&[9; 64]),
        node: None,
    });
    gw
}

fn hash_of(inv: &bitmesh_common::wire::Invoice) -> PaymentHash {
    inv.payment_hash.parse().unwrap()
}

fn bundle(name: &str) -> InvoiceRequest {
    InvoiceRequest { bundle: Some(name.into()), ..Default::default() }
}

/// Ask for `req` from `from` and have the node claim it for exactly its amount.
async fn buy(gw: &Gateway, from: &str, req: InvoiceRequest) -> bitmesh_common::wire::Invoice {
    let inv = gw.create_invoice(ip(from), req).await.unwrap();
    gw.credit_lightning_receipt(hash_of(&inv), inv.amount_msat).await.unwrap();
    inv
}

fn code(e: GatewayError) -> ErrorCode {
    crate::api::ApiError::from(e).code()
}

#[tokio::test]
async fn a_paid_invoice_credits_once_and_overpayment_buys_more() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let meter = SharedMeter::default();
    let gw = lab(store.clone(), meter.clone());

    let terms = ClientGateway::terms(&*gw).await.unwrap();
    let ln = terms.lightning.unwrap();
    assert_eq!(ln.bundles[0].bytes, MIB);
    assert_eq!(ln.bundles[0].price_msat, 1000, "1 sat/MiB default price");

    let inv = gw.create_invoice(ip(A), InvoiceRequest { bundle: Some("1mib".into()), ..Default::default() }).await.unwrap();
    assert_eq!((inv.bytes, inv.amount_msat), (MIB, 1000));
    assert!(store.ln_invoice(hash_of(&inv)).unwrap().is_some(), "recorded before it was returned");
    assert_eq!(meter.credit(MAC_A), None, "nothing credited before payment");
    assert_eq!(gw.invoice_status(&inv.payment_hash).unwrap().state, InvoiceState::Pending);

    gw.credit_lightning_receipt(hash_of(&inv), 1000).await.unwrap();
    assert_eq!(meter.credit(MAC_A), Some(MIB));
    let st = gw.invoice_status(&inv.payment_hash).unwrap();
    assert_eq!((st.state, st.bytes_credited), (InvoiceState::Paid, MIB));
    // Delivered again (restart): journaled once, credited once.
    gw.credit_lightning_receipt(hash_of(&inv), 1000).await.unwrap();
    assert_eq!(meter.credit(MAC_A), Some(MIB));
    assert_eq!(store.ln_totals().unwrap().receipts, 1);

    // The same MAC gets the same token; an overpaid invoice credits proportionally.
    let inv2 = gw.create_invoice(ip(A), InvoiceRequest { bytes: Some(MIB), ..Default::default() }).await.unwrap();
    assert_eq!(inv2.token, inv.token, "one account per MAC");
    gw.credit_lightning_receipt(hash_of(&inv2), 3000).await.unwrap();
    assert_eq!(meter.credit(MAC_A), Some(4 * MIB));

    // Bad requests change nothing.
    for (req, code) in [
        (InvoiceRequest { bundle: Some("7MiB".into()), ..Default::default() }, ErrorCode::UnknownBundle),
        (InvoiceRequest { bytes: Some(10), ..Default::default() }, ErrorCode::BytesOutOfRange),
        (InvoiceRequest { bytes: Some(MIB), bundle: Some("1MiB".into()), ..Default::default() }, ErrorCode::BadRequest),
        (InvoiceRequest::default(), ErrorCode::BadRequest),
    ] {
        assert_eq!(crate::api::ApiError::from(gw.create_invoice(ip(A), req).await.unwrap_err()).code(), code);
    }
    assert_eq!(crate::api::ApiError::from(gw.invoice_status(&"ab".repeat(32)).unwrap_err()).code(), ErrorCode::UnknownInvoice);
    // A payment to a hash never issued is journaled and credits nothing.
    gw.credit_lightning_receipt(PaymentHash([0xee; 32]), 5000).await.unwrap();
    assert_eq!(meter.credit(MAC_A), Some(4 * MIB));
    // What `bitmesh clients` shows as paid: A's two receipts once each, the stray
    // payment against no MAC.
    assert_eq!(store.ln_paid_msat_by_mac().unwrap(), vec![(MAC_A, 4000)]);
}

#[tokio::test]
async fn restore_moves_the_credit_and_the_old_mac_loses_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let meter = SharedMeter::default();
    let gw = lab(store.clone(), meter.clone());
    let inv = buy(&gw, A, bundle("10MiB")).await;
    meter.use_bytes(MAC_A, 3 * MIB);

    let bad = gw.restore(ip(B), RestoreRequest { token: "AAAA".into() }).await.unwrap_err();
    assert_eq!(code(bad), ErrorCode::UnknownToken);
    let r = gw.restore(ip(B), RestoreRequest { token: inv.token.to_lowercase() }).await.unwrap();
    assert_eq!(r.bytes_remaining, 7 * MIB, "what A had not used");
    assert_eq!(meter.credit(MAC_A), None, "the old MAC lost its entries");
    assert_eq!(meter.remaining(MAC_B), Some(7 * MIB));
    assert_eq!(gw.device_credit(MAC_B).unwrap().lightning_bytes_remaining, 7 * MIB);
    // Again from the same MAC: nothing moves twice.
    let again = gw.restore(ip(B), RestoreRequest { token: inv.token.clone() }).await.unwrap();
    assert_eq!(again.bytes_remaining, 7 * MIB);
    assert_eq!(meter.remaining(MAC_B), Some(7 * MIB));

    // A reboot (empty maps) brings B back with its Lightning credit, A stays unpaid.
    meter.use_bytes(MAC_B, MIB);
    gw.snapshot_usage().unwrap();
    drop(gw);
    let meter2 = SharedMeter::default();
    let gw = lab(store.clone(), meter2.clone());
    let rep = gw.reconcile(false).unwrap();
    assert_eq!(rep.lightning_clients, 1);
    assert_eq!(meter2.remaining(MAC_B), Some(6 * MIB));
    assert_eq!(meter2.credit(MAC_A), None);
}

#[tokio::test]
async fn channel_and_lightning_share_one_meter_and_a_close_keeps_the_lightning_part() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let meter = SharedMeter::default();
    let gw = lab(store.clone(), meter.clone());

    // A buys 10 MiB over Lightning, uses 1 MiB, then opens a channel.
    buy(&gw, A, bundle("10MiB")).await;
    meter.use_bytes(MAC_A, MIB);
    let secp = bitcoin::secp256k1::Secp256k1::new();
    let client_sk = bitcoin::secp256k1::SecretKey::from_slice(&[3; 32]).unwrap();
    let client_pk = bitcoin::PublicKey::new(bitcoin::secp256k1::PublicKey::from_secret_key(&secp, &client_sk));
    let change = ScriptBuf::new_p2wpkh(&client_pk.wpubkey_hash().unwrap());
    let req = OpenRequest { client_pubkey: client_pk, expiry: absolute::Height::from_consensus(700).unwrap(), client_change_script: change };
    let open = ClientGateway::open(&*gw, ip(A), req).await.unwrap();
    let funding = Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn { witness: Witness::from_slice(&[[1u8; 72].as_slice(), [2u8; 33].as_slice()]), ..Default::default() }],
        output: vec![TxOut { value: Amount::from_sat(40_000), script_pubkey: open.funding_script_pubkey.clone() }],
    };
    ClientGateway::fund(&*gw, ip(A), FundRequest { channel_id: open.channel_id, funding_tx: funding, funding_vout: 0 }).await.unwrap();
    assert_eq!(meter.remaining(MAC_A), Some(9 * MIB), "funding a channel keeps the Lightning entries and their count");
    store.set_funding_height(open.channel_id, Height::from_consensus(200).unwrap()).unwrap();
    let rec = store.channel(open.channel_id).unwrap().unwrap();
    let channel = Gateway::channel_of(&rec).unwrap();
    let total = open.min_first_payment + Amount::from_sat(2000);
    let update = bitmesh_common::wire::PaymentUpdate {
        channel_id: open.channel_id,
        total_paid: total,
        signature: bitmesh_channel::sign_update(&channel, total, &client_sk).unwrap(),
    };
    let ack = gw.pay(update).await.unwrap();
    let ch = ack.credited_bytes.0;
    assert_eq!(meter.credit(MAC_A), Some(10 * MIB + ch), "one total: the channel's credit on top of the Lightning bytes");

    // A uses 2 MiB more; usage since the channel opened goes to the channel first.
    meter.use_bytes(MAC_A, 2 * MIB);
    let d = gw.device_credit(MAC_A).unwrap();
    assert_eq!(d.lightning_bytes_remaining, 9 * MIB - (2 * MIB).saturating_sub(ch));
    assert_eq!(d.rails.len(), 2);

    // The operator settles the channel: A keeps its Lightning credit, nothing else.
    gw.settle_now(None).await.unwrap();
    let left = 9 * MIB - (2 * MIB).saturating_sub(ch);
    assert_eq!(meter.remaining(MAC_A), Some(left), "after the close only the Lightning part is left");
    assert_eq!(gw.device_credit(MAC_A).unwrap().lightning_bytes_remaining, left);
    // Housekeeping does not take a Lightning device for stale.
    gw.housekeeping().await.unwrap();
    assert_eq!(meter.remaining(MAC_A), Some(left));
}

#[tokio::test]
async fn expired_credit_is_removed_from_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let meter = SharedMeter::default();
    let gw = lab(store.clone(), meter.clone());
    let inv = buy(&gw, A, bundle("1MiB")).await;
    assert_eq!(gw.expire_lightning().await.unwrap(), 0, "not yet");
    // Let it expire (the TTL is 24 h; move the clock by editing the account).
    {
        let acc = store.ln_account_for_mac(MAC_A).unwrap().unwrap();
        store.ln_set_expiry_for_test(acc.token_hash, 1).unwrap();
    }
    assert_eq!(gw.expire_lightning().await.unwrap(), 1);
    assert_eq!(meter.credit(MAC_A), None, "expired credit is removed");
    let err = gw.restore(ip(B), RestoreRequest { token: inv.token.clone() }).await.unwrap_err();
    assert_eq!(code(err), ErrorCode::TokenExpired);
    assert_eq!(store.ln_totals().unwrap().bytes_expired, MIB);

    // The same code still tops up: from a new MAC, the purchase revives the account
    // there and the code names the new credit.
    let inv2 = buy(&gw, B, InvoiceRequest { token: Some(inv.token.clone()), ..bundle("1MiB") }).await;
    assert_eq!(inv2.token, inv.token);
    assert_eq!(meter.remaining(MAC_B), Some(MIB));
    assert_eq!(meter.credit(MAC_A), None);
}

#[tokio::test]
async fn a_payment_that_arrives_after_the_invoice_expired_is_still_credited() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let meter = SharedMeter::default();
    let gw = lab_with(store.clone(), meter.clone(), |s| s.invoice_expiry = std::time::Duration::ZERO);
    let inv = gw.create_invoice(ip(A), InvoiceRequest { bundle: Some("1MiB".into()), ..Default::default() }).await.unwrap();
    assert_eq!(gw.invoice_status(&inv.payment_hash).unwrap().state, InvoiceState::Expired);
    // The node accepted it anyway (its clock is the chain's): the buyer paid, so it is credited.
    gw.credit_lightning_receipt(hash_of(&inv), inv.amount_msat).await.unwrap();
    let st = gw.invoice_status(&inv.payment_hash).unwrap();
    assert_eq!((st.state, st.bytes_credited), (InvoiceState::Paid, MIB));
    assert_eq!(meter.credit(MAC_A), Some(MIB));
}

#[tokio::test]
async fn a_presented_token_tops_up_its_account_and_moves_it_to_the_new_mac() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let meter = SharedMeter::default();
    let gw = lab(store.clone(), meter.clone());
    let first = buy(&gw, A, bundle("10MiB")).await;
    meter.use_bytes(MAC_A, 3 * MIB);

    // A wrong code: refused, and nothing is issued, created or moved.
    let before = (store.ln_pending_invoices(0).unwrap().len(), store.ln_totals().unwrap());
    let unknown = crate::lightning::PurchaseToken::generate().unwrap().display();
    for bad in ["AAAA-BBBB", "ABCD-EFGH-IJKL-MNOP-QRST-UVWX-YZ", unknown.as_str()] {
        let req = InvoiceRequest { token: Some(bad.to_owned()), ..bundle("1MiB") };
        assert_eq!(code(gw.create_invoice(ip(B), req).await.unwrap_err()), ErrorCode::UnknownToken, "{bad}");
    }
    assert_eq!((store.ln_pending_invoices(0).unwrap().len(), store.ln_totals().unwrap()), before);
    assert!(store.ln_account_for_mac(MAC_B).unwrap().is_none(), "no account made for B");
    assert_eq!(meter.remaining(MAC_A), Some(7 * MIB), "A keeps its credit");

    // The same device on MAC B buys more with its code: one account, now on B, with
    // what A had left plus the new bundle.
    let more = gw.create_invoice(ip(B), InvoiceRequest { token: Some(first.token.to_lowercase()), ..bundle("1MiB") }).await.unwrap();
    assert_eq!(more.token, first.token, "the code keeps naming all the credit");
    assert_eq!(meter.credit(MAC_A), None, "the old MAC lost it when it moved");
    assert_eq!(meter.remaining(MAC_B), Some(7 * MIB));
    gw.credit_lightning_receipt(hash_of(&more), more.amount_msat).await.unwrap();
    assert_eq!(meter.remaining(MAC_B), Some(8 * MIB));
    assert_eq!(gw.device_credit(MAC_B).unwrap().lightning_bytes_remaining, 8 * MIB);
    // And from B without the code: the same account (it is B's now).
    let again = gw.create_invoice(ip(B), bundle("1MiB")).await.unwrap();
    assert_eq!(again.token, first.token);
}

#[tokio::test]
async fn an_unpaid_invoice_follows_its_account_when_a_restore_merges_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let meter = SharedMeter::default();
    let gw = lab(store.clone(), meter.clone());
    let on_a = buy(&gw, A, bundle("10MiB")).await;
    // B asks for an invoice of its own (a new account), then restores A's code
    // before paying it: B's account is merged into A's.
    let pending = gw.create_invoice(ip(B), bundle("1MiB")).await.unwrap();
    assert_ne!(pending.token, on_a.token);
    gw.restore(ip(B), RestoreRequest { token: on_a.token.clone() }).await.unwrap();
    assert_eq!(meter.remaining(MAC_B), Some(10 * MIB));
    // The wallet pays B's invoice now: its bytes land on B, not on the emptied account.
    gw.credit_lightning_receipt(hash_of(&pending), pending.amount_msat).await.unwrap();
    assert_eq!(meter.remaining(MAC_B), Some(11 * MIB), "paid after the merge, still credited to the device");
    assert_eq!(gw.invoice_status(&pending.payment_hash).unwrap().bytes_credited, MIB);
}

#[tokio::test]
async fn the_device_stream_hears_its_own_payment_after_the_credit_and_nothing_else() {
    use bitmesh_common::wire::DeviceEvent;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let meter = SharedMeter::default();
    let gw = lab(store.clone(), meter.clone());
    // Nothing to wait for: no stream.
    assert_eq!(code(gw.subscribe_device(ip(A)).unwrap_err()), ErrorCode::UnknownInvoice);

    let inv = gw.create_invoice(ip(A), bundle("1MiB")).await.unwrap();
    let mut a = gw.subscribe_device(ip(A)).unwrap();
    let _a2 = gw.subscribe_device(ip(A)).unwrap();
    assert_eq!(code(gw.subscribe_device(ip(A)).unwrap_err()), ErrorCode::RateLimited, "per-device cap");
    let first = a.try_recv().unwrap();
    assert!(matches!(&first, DeviceEvent::Credit(s) if s.bytes_remaining == 0), "{first:?}");
    // B has its own invoice and stream; it hears nothing of A's payment.
    gw.create_invoice(ip(B), bundle("1MiB")).await.unwrap();
    let mut b = gw.subscribe_device(ip(B)).unwrap();
    let _ = b.try_recv().unwrap();

    gw.credit_lightning_receipt(hash_of(&inv), inv.amount_msat).await.unwrap();
    match a.try_recv().unwrap() {
        DeviceEvent::InvoicePaid(p) => {
            assert_eq!((p.payment_hash.as_str(), p.bytes_credited, p.amount_msat), (inv.payment_hash.as_str(), MIB, 1000));
        }
        other => panic!("expected invoice_paid, got {other:?}"),
    }
    match a.try_recv().unwrap() {
        DeviceEvent::Credit(s) => assert_eq!((s.bytes_remaining, s.lightning_bytes_remaining), (MIB, Some(MIB))),
        other => panic!("expected credit, got {other:?}"),
    }
    assert!(b.try_recv().is_err(), "B hears nothing of A");
    // Usage changes the figures: one credit event per change, none without one.
    gw.push_device_events();
    assert!(a.try_recv().is_err(), "no change, no event");
    meter.use_bytes(MAC_A, 1000);
    gw.push_device_events();
    assert!(matches!(a.try_recv().unwrap(), DeviceEvent::Credit(s) if s.bytes_remaining == MIB - 1000));
    assert_eq!(gw.device_streams_open(), 3);
    drop(a);
    gw.push_device_events();
    assert_eq!(gw.device_streams_open(), 2, "a closed reader is dropped");
}

/// A status read between the journal and the kernel credit says `pending`: a device
/// told `paid` (the page, `bitmesh pay --lightning`) uses its bytes at once, and they
/// must already be in the kernel. The test holds the meter, so the credit stops
/// right after the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)]
async fn an_invoice_reads_paid_only_once_its_bytes_are_in_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let meter = SharedMeter::default();
    let gw = lab(store.clone(), meter.clone());
    let inv = gw.create_invoice(ip(A), bundle("1MiB")).await.unwrap();
    let hash = hash_of(&inv);

    let held = meter.0.lock().unwrap();
    let crediting = tokio::spawn({
        let gw = gw.clone();
        async move { gw.credit_lightning_receipt(hash, inv.amount_msat).await }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.ln_invoice(hash).unwrap().unwrap().receipt.is_none() {
        assert!(std::time::Instant::now() < deadline, "the payment was never journaled");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Journaled; the kernel has nothing yet.
    assert!(!held.clients.contains_key(&MAC_A));
    let st = gw.invoice_status(&inv.payment_hash).unwrap();
    assert_eq!((st.state, st.bytes_credited), (InvoiceState::Pending, 0), "paid before the kernel has the bytes");
    drop(held);
    crediting.await.unwrap().unwrap();
    let st = gw.invoice_status(&inv.payment_hash).unwrap();
    assert_eq!((st.state, st.bytes_credited), (InvoiceState::Paid, MIB));
    assert_eq!(meter.credit(MAC_A), Some(MIB));
}

/// The gateway holds at most `MAX_DEVICE_STREAMS` event streams in all, however many
/// devices ask (each within its own cap); a closed stream frees its place.
#[tokio::test]
async fn the_gateway_holds_at_most_its_cap_of_device_streams_in_all() {
    use super::lightning_events::{MAX_DEVICE_STREAMS, MAX_DEVICE_STREAMS_PER_DEVICE};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&Store::path_in(dir.path())).unwrap());
    let full = MAX_DEVICE_STREAMS / MAX_DEVICE_STREAMS_PER_DEVICE;
    let addr = |i: usize| IpAddr::from([10, 0, 1, i as u8]);
    let devices = (0..=full).map(|i| (addr(i), Mac([2, 0, 0, 0, 1, i as u8]))).collect();
    let gw = lab_on(store, SharedMeter::default(), devices, |_| {});
    let mut held = Vec::new();
    for i in 0..=full {
        gw.create_invoice(addr(i), bundle("1MiB")).await.unwrap();
    }
    for i in 0..full {
        for _ in 0..MAX_DEVICE_STREAMS_PER_DEVICE {
            held.push(gw.subscribe_device(addr(i)).unwrap());
        }
    }
    assert_eq!(gw.device_streams_open(), MAX_DEVICE_STREAMS);
    // One more device, with its own first stream: refused, the gateway is full.
    let refused = gw.subscribe_device(addr(full)).unwrap_err();
    assert!(refused.to_string().contains("the gateway"), "{refused}");
    assert_eq!(code(refused), ErrorCode::RateLimited);
    assert_eq!(gw.device_streams_open(), MAX_DEVICE_STREAMS);
    // A phone leaves (its stream closes): the next one gets the place.
    drop(held.pop());
    let _late = gw.subscribe_device(addr(full)).unwrap();
    assert_eq!(gw.device_streams_open(), MAX_DEVICE_STREAMS);
}
