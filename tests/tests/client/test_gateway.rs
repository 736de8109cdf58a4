//! The client agent against a test gateway that serves the controller's real API
//! router: refusal of expensive terms, a hostile gateway that over-reports usage,
//! resuming a channel after the agent restarts, and an agent that must not spin when
//! the event stream keeps ending or the gateway rate-limits it. No root, no chain
//! needed.

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bitcoin::Amount;
use bitmesh_client::policy::Hold;
use bitmesh_client::session::{self, SessionError};
use bitmesh_client::state::{Phase, StateDir};
use bitmesh_client::terms::TermsError;
use bitmesh_client::tip::{SeenTip, TipError, TipLog};
use bitmesh_common::pricing::{payment_for_bytes, ByteCount, PriceMsatPerMib, MIB};
use crate::support::*;

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn agent_refuses_a_gateway_priced_above_its_limit() {
    let gw = TestGateway::start(false);
    let dir = tempfile::tempdir().unwrap();
    // The gateway asks 1 sat/MiB; the user accepts at most 0.5.
    let (cfg, _stop) = config(&gw.url, dir.path(), fake_funding(), 500);
    let err = session::run(cfg, &mut TestMeter::default(), &mut RecordingUi::default()).unwrap_err();
    assert!(
        matches!(err, SessionError::Terms(TermsError::PriceAboveLimit { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("--max-price"), "says what to do: {err}");
    let book = gw.book.lock().unwrap();
    assert_eq!((book.opens, book.totals.len()), (0, 0), "nothing opened, nothing paid");
    assert!(StateDir::open(dir.path()).unwrap().all().unwrap().is_empty());
}

#[test]
fn agent_stops_paying_at_received_plus_one_chunk_when_the_gateway_over_reports() {
    let gw = TestGateway::start(true);
    let dir = tempfile::tempdir().unwrap();
    let (cfg, stop) = config(&gw.url, dir.path(), fake_funding(), 1000);
    let meter = TestMeter::default();
    meter.set(5 * MIB);
    let price = PriceMsatPerMib::from_sat_per_mib(1).unwrap();
    let ceiling = |received: u64| payment_for_bytes(ByteCount(received + MIB), price);

    let mut m = meter.clone();
    let agent = std::thread::spawn(move || {
        let mut ui = RecordingUi::default();
        let r = session::run(cfg, &mut m, &mut ui);
        (r, ui)
    });
    // The gateway claims 50 MiB beyond whatever is paid: the agent pays up to its
    // own count (5 MiB) + one chunk (1 MiB) and then holds.
    wait_until("payments up to the ceiling", || gw.totals().last() == Some(&ceiling(5 * MIB)));
    std::thread::sleep(Duration::from_millis(300)); // many polls, all of them claiming more
    assert_eq!(gw.totals().last(), Some(&ceiling(5 * MIB)), "no payment beyond received + one chunk");

    // More real traffic: the agent pays for it, and again only one chunk ahead.
    meter.set(9 * MIB);
    wait_until("payments up to the new ceiling", || gw.totals().last() == Some(&ceiling(9 * MIB)));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (result, ui) = agent.join().unwrap();
    let summary = result.unwrap();

    let totals = gw.totals();
    assert!(totals.windows(2).all(|w| w[0] < w[1]), "strictly increasing: {totals:?}");
    assert!(totals.iter().all(|t| *t <= ceiling(9 * MIB)), "{totals:?}");
    assert_eq!(*totals.last().unwrap(), Amount::from_sat(10));
    assert_eq!(ui.last.unwrap().hold, Some(Hold::Unearned), "the status line says why it holds");
    assert_eq!(gw.book.lock().unwrap().closes, 1, "asked the gateway to close on exit");
    assert_eq!(summary.record.phase, Phase::CloseRequested);
    assert_eq!(summary.record.paid(), Amount::from_sat(10));
}

#[test]
fn agent_restart_resumes_the_same_channel() {
    let gw = TestGateway::start(false);
    let dir = tempfile::tempdir().unwrap();
    let meter = TestMeter::default();
    let run = |received_now: u64, used: u64, close: bool| {
        meter.set(received_now);
        gw.book.lock().unwrap().used = ByteCount(used);
        let (mut cfg, stop) = config(&gw.url, dir.path(), fake_funding(), 1000);
        cfg.close_on_exit = close;
        let mut m = meter.clone();
        let before = gw.totals().len();
        let agent = std::thread::spawn(move || session::run(cfg, &mut m, &mut RecordingUi::default()));
        wait_until("a payment", || gw.totals().len() > before);
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::SeqCst);
        agent.join().unwrap().unwrap()
    };
    // First run: 2 MiB used, paid 3 sat (2 MiB + one chunk), left open.
    let first = run(2 * MIB, 2 * MIB, false);
    assert_eq!(first.record.phase, Phase::Open);
    assert_eq!(first.record.paid(), Amount::from_sat(3));
    assert_eq!(first.record.received, ByteCount(2 * MIB));
    // Second run (a new process would start its meter at zero): 4 MiB more.
    let second = run(4 * MIB, 6 * MIB, true);
    assert_eq!(second.record.channel_id, first.record.channel_id, "same channel");
    assert_eq!(gw.book.lock().unwrap().opens, 1, "no second open");
    assert_eq!(second.record.received, ByteCount(6 * MIB), "count carried across the restart");
    assert_eq!(second.record.paid(), Amount::from_sat(7), "6 MiB + one chunk");
    assert_eq!(gw.totals(), vec![Amount::from_sat(3), Amount::from_sat(7)]);
}

#[test]
fn agent_polls_at_its_interval_while_the_event_stream_keeps_ending() {
    // The test gateway's event stream ends as soon as it opens, like a controller
    // that died: the agent must neither spin on the dead stream nor re-open it in a
    // tight loop (the gateway would rate-limit it, payments included).
    let gw = TestGateway::start(false);
    let dir = tempfile::tempdir().unwrap();
    let (cfg, stop) = config(&gw.url, dir.path(), fake_funding(), 1000);
    let poll = cfg.poll;
    let meter = TestMeter::default();
    meter.set(MIB);
    gw.book.lock().unwrap().used = ByteCount(MIB);
    let mut m = meter.clone();
    let agent = std::thread::spawn(move || session::run(cfg, &mut m, &mut RecordingUi::default()));
    wait_until("the first payment", || !gw.totals().is_empty());

    let (from, t0) = (gw.requests.load(Ordering::SeqCst), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let (requests, elapsed) = (gw.requests.load(Ordering::SeqCst) - from, t0.elapsed());
    stop.store(true, Ordering::SeqCst);
    agent.join().unwrap().unwrap();
    // One status poll per interval, plus stream re-opens backing off (20, 40, 80 ms...).
    let polls = (elapsed.as_millis() / poll.as_millis()) as u64;
    assert!(requests <= polls + 15, "{requests} requests in {elapsed:?} at a {poll:?} poll");
    assert!(requests >= polls / 4, "still polling: {requests} requests in {elapsed:?}");
}

#[test]
fn a_rate_limited_agent_waits_out_retry_after_and_its_payment_still_gets_through() {
    // 60 requests a minute: the agent's 20 ms polls use them up in about a second;
    // then every answer is `rate_limited` with Retry-After 1 s.
    let gw = TestGateway::start_limited(false, 60);
    let dir = tempfile::tempdir().unwrap();
    let (cfg, stop) = config(&gw.url, dir.path(), fake_funding(), 1000);
    let meter = TestMeter::default();
    meter.set(8 * MIB);
    let mut m = meter.clone();
    let t0 = Instant::now();
    let agent = std::thread::spawn(move || {
        let mut ui = RecordingUi::default();
        let r = session::run(cfg, &mut m, &mut ui);
        (r, ui)
    });
    wait_until("the first payment", || !gw.totals().is_empty());
    std::thread::sleep(Duration::from_secs(2));
    // Now the gateway has used the first chunk: a top-up is due.
    gw.book.lock().unwrap().used = ByteCount(3 * MIB);
    let price = PriceMsatPerMib::from_sat_per_mib(1).unwrap();
    let due = payment_for_bytes(ByteCount(4 * MIB), price);
    wait_until("the top-up through the rate limit", || gw.totals().last() == Some(&due));
    let (requests, elapsed) = (gw.requests.load(Ordering::SeqCst), t0.elapsed());
    stop.store(true, Ordering::SeqCst);
    let (result, ui) = agent.join().unwrap();
    result.unwrap();
    // The bucket's 60, one more per second of refill, and per Retry-After period at
    // most a couple of requests that find the bucket empty again.
    let secs = elapsed.as_secs() + 1;
    assert!(requests <= 60 + 3 * secs + 10, "{requests} requests in {elapsed:?}: the agent does not wait");
    assert!(ui.notes.iter().any(|n| n.contains("rate_limited")), "says why: {:?}", ui.notes);
}

/// A chain on which a wallet pays the channel address on the third look-up (clones
/// share the state: the test keeps one, the agent gets another).
#[derive(Clone, Default)]
struct WalletPaysLater {
    lookups: std::sync::Arc<std::sync::Mutex<u32>>,
    paid: std::sync::Arc<std::sync::Mutex<Option<bitcoin::Transaction>>>,
}

impl bitmesh_channel::chain::Chain for WalletPaysLater {
    fn backend(&self) -> &'static str {
        "test-chain"
    }
    fn tip_height(&self) -> Result<bitcoin::absolute::Height, bitmesh_channel::chain::ChainError> {
        Ok(bitcoin::absolute::Height::from_consensus(500).unwrap())
    }
    fn transaction(&self, txid: &bitcoin::Txid) -> Result<Option<bitmesh_channel::chain::TxStatus>, bitmesh_channel::chain::ChainError> {
        let paid = self.paid.lock().unwrap();
        Ok(paid.iter().find(|t| t.compute_txid() == *txid).map(|tx| bitmesh_channel::chain::TxStatus {
            tx: tx.clone(),
            confirmations: 0,
            block_height: None,
        }))
    }
    fn unspent_output(&self, _: &bitcoin::OutPoint) -> Result<Option<bitmesh_channel::chain::OutputStatus>, bitmesh_channel::chain::ChainError> {
        Ok(None)
    }
    fn broadcast(&self, tx: &bitcoin::Transaction) -> Result<bitcoin::Txid, bitmesh_channel::chain::ChainError> {
        Ok(tx.compute_txid())
    }
    fn fee_rate(&self, _: u16, floor: bitcoin::FeeRate) -> Result<bitcoin::FeeRate, bitmesh_channel::chain::ChainError> {
        Ok(floor)
    }
    fn test_mempool_accept(&self, _: &[bitcoin::Transaction]) -> Result<Vec<bitmesh_channel::chain::MempoolAcceptance>, bitmesh_channel::chain::ChainError> {
        Ok(Vec::new())
    }
    fn outputs_paying(&self, script: &bitcoin::Script) -> Result<Vec<bitmesh_channel::chain::ScriptUtxo>, bitmesh_channel::chain::ChainError> {
        let mut n = self.lookups.lock().unwrap();
        *n += 1;
        if *n < 3 {
            return Ok(Vec::new());
        }
        // The wallet's transaction: some other output first, the channel at index 1.
        let tx = bitcoin::Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::ZERO,
            input: vec![bitcoin::TxIn {
                previous_output: bitcoin::OutPoint { txid: bitcoin::Txid::from_raw_hash(bitcoin::hashes::Hash::all_zeros()), vout: 3 },
                ..Default::default()
            }],
            output: vec![
                bitcoin::TxOut { value: Amount::from_sat(5_000), script_pubkey: bitcoin::ScriptBuf::new_op_return([1u8; 4]) },
                bitcoin::TxOut { value: Amount::from_sat(100_000), script_pubkey: script.to_owned() },
            ],
        };
        let outpoint = bitcoin::OutPoint { txid: tx.compute_txid(), vout: 1 };
        *self.paid.lock().unwrap() = Some(tx);
        Ok(vec![bitmesh_channel::chain::ScriptUtxo { outpoint, value: Amount::from_sat(100_000), confirmations: 0 }])
    }
}

#[test]
fn bip21_funding_is_found_on_the_chain_without_pasting_anything() {
    let gw = TestGateway::start(false);
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, stop) = config(&gw.url, dir.path(), fake_funding(), 1000);
    let chain = WalletPaysLater::default();
    cfg.funding = bitmesh_client::session::FundingMode::Bip21 { chain: Some(Box::new(chain.clone())) };
    let refund = bitcoin::ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_raw_hash(bitcoin::hashes::Hash::all_zeros()));
    cfg.refund_script = Some(refund);
    let meter = TestMeter::default();
    let mut m = meter.clone();
    let agent = std::thread::spawn(move || {
        // RecordingUi answers no paste (read_funding = None): only the chain can fund.
        let mut ui = RecordingUi::default();
        let r = session::run(cfg, &mut m, &mut ui);
        (r, ui)
    });
    wait_until("the first payment on the found funding", || !gw.totals().is_empty());
    stop.store(true, Ordering::SeqCst);
    let (result, ui) = agent.join().unwrap();
    let summary = result.unwrap();
    let paid = chain.paid.lock().unwrap().clone().unwrap();
    let outpoint = bitcoin::OutPoint { txid: paid.compute_txid(), vout: 1 };
    assert_eq!(gw.book.lock().unwrap().funded, Some(outpoint), "funded with the wallet's output");
    assert_eq!(summary.record.funding.unwrap().outpoint, outpoint);
    assert!(*chain.lookups.lock().unwrap() >= 3, "watched until the payment appeared");
    assert!(ui.notes.iter().any(|n| n.starts_with("payment seen")), "{:?}", ui.notes);
}

// --- A hostile gateway: terms that change or hide a cost (issue 13) ---

/// Run a session that is expected to be refused before anything is funded; returns
/// the error.
fn refused(gw: &TestGateway, cfg: bitmesh_client::session::PayConfig) -> SessionError {
    let agent = std::thread::spawn(move || session::run(cfg, &mut TestMeter::default(), &mut RecordingUi::default()));
    // A session that is (wrongly) not refused pays and keeps running: stop it after
    // its first payment so the test fails with the assertion below, not a hang.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.is_finished() && Instant::now() < deadline && gw.totals().is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let book = gw.book.lock().unwrap();
    assert_eq!((book.funded, book.totals.clone()), (None, vec![]), "nothing may be funded or paid");
    drop(book);
    agent.join().unwrap().expect_err("the session must be refused")
}

#[test]
fn agent_refuses_an_open_answer_that_raises_the_first_payment() {
    // The terms say 3 sat; the open answer says 20,000 (within --max-spend): the
    // agent used to take the larger of the two and pay it as its first payment.
    let gw = TestGateway::start(false);
    gw.book.lock().unwrap().open_first_payment = Some(Amount::from_sat(20_000));
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _stop) = config(&gw.url, dir.path(), fake_funding(), 1000);
    let err = refused(&gw, cfg);
    assert!(matches!(err, SessionError::TermsChanged { term: "first payment", .. }), "{err}");
    assert!(err.to_string().contains("nothing was funded"), "{err}");
}

#[test]
fn agent_refuses_a_first_payment_above_its_prepaid_cap() {
    // Consistent terms, but a 20,000 sat first payment: above the default
    // --max-prepaid (2,000 sat) although below --max-spend (50,000).
    let gw = TestGateway::start(false);
    gw.book.lock().unwrap().terms.min_first_payment = Amount::from_sat(20_000);
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _stop) = config(&gw.url, dir.path(), fake_funding(), 1000);
    let err = refused(&gw, cfg);
    assert!(matches!(err, SessionError::Terms(TermsError::FirstPaymentAbovePrepaidCap { .. })), "{err}");
    assert!(err.to_string().contains("--max-prepaid"), "{err}");
    assert_eq!(gw.book.lock().unwrap().opens, 0);
}

#[test]
fn agent_pays_at_most_its_chunk_cap_ahead_whatever_chunk_the_gateway_asks() {
    // A 10 GiB chunk at 1 sat/MiB: the agent used to pay 10,240 sat ahead of use.
    let gw = TestGateway::start(false);
    gw.book.lock().unwrap().terms.chunk_bytes = ByteCount::from_mib(10 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let (cfg, stop) = config(&gw.url, dir.path(), fake_funding(), 1000);
    let cap = payment_for_bytes(bitmesh_client::terms::DEFAULT_MAX_CHUNK, PriceMsatPerMib::from_sat_per_mib(1).unwrap());
    let mut m = TestMeter::default();
    let agent = std::thread::spawn(move || session::run(cfg, &mut m, &mut RecordingUi::default()));
    wait_until("the first payment", || !gw.totals().is_empty());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let summary = agent.join().unwrap().unwrap();
    assert_eq!(gw.totals(), vec![cap], "one chunk of at most --max-chunk-mib ahead, nothing received");
    assert_eq!(summary.record.chunk, bitmesh_client::terms::DEFAULT_MAX_CHUNK);
}

#[test]
fn agent_refuses_a_gateway_tip_far_from_its_own_chain() {
    // The gateway claims tip 5,000 while the agent's own node says 500: the refund
    // lock would be 4,500 blocks (a month) longer than the user agreed to.
    let gw = TestGateway::start(false);
    gw.book.lock().unwrap().terms.tip_height = bitcoin::absolute::Height::from_consensus(5_000).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, _stop) = config(&gw.url, dir.path(), fake_funding(), 1000);
    cfg.tip_chain = Some(Box::new(FixedTip(500)));
    let err = refused(&gw, cfg);
    assert!(matches!(err, SessionError::Tip(TipError::DisagreesWithOwnChain { gateway: 5_000, own: 500, .. })), "{err}");
    assert_eq!(gw.book.lock().unwrap().opens, 0);
}

#[test]
fn agent_refuses_a_gateway_tip_that_moves_backwards_between_sessions() {
    // First session at tip 500 (no chain backend): honest, remembered.
    let gw = TestGateway::start(false);
    let dir = tempfile::tempdir().unwrap();
    let (cfg, stop) = config(&gw.url, dir.path(), fake_funding(), 1000);
    let agent = std::thread::spawn(move || session::run(cfg, &mut TestMeter::default(), &mut RecordingUi::default()));
    wait_until("the first payment", || !gw.totals().is_empty());
    stop.store(true, Ordering::SeqCst);
    agent.join().unwrap().unwrap();
    // A later gateway (here: the same one) says 400: more than a reorg below.
    let gw2 = TestGateway::start(false);
    gw2.book.lock().unwrap().terms.tip_height = bitcoin::absolute::Height::from_consensus(400).unwrap();
    let (cfg, _stop) = config(&gw2.url, dir.path(), fake_funding(), 1000);
    let err = refused(&gw2, cfg);
    assert!(matches!(err, SessionError::Tip(TipError::Backwards { gateway: 400, seen: 500 })), "{err}");
}

#[test]
fn agent_refuses_a_gateway_tip_that_jumps_ahead_on_a_real_network() {
    // On signet, tip 500 was seen a minute ago; a gateway now claims 5,000.
    let gw = TestGateway::start(false);
    {
        let mut book = gw.book.lock().unwrap();
        book.terms.network = bitcoin::Network::Signet;
        book.terms.tip_height = bitcoin::absolute::Height::from_consensus(5_000).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    TipLog::new(dir.path()).record(bitcoin::Network::Signet, SeenTip { height: 500, at_unix: now - 60 }).unwrap();
    let (mut cfg, _stop) = config(&gw.url, dir.path(), fake_funding(), 1000);
    cfg.limits.network = bitcoin::Network::Signet;
    let err = refused(&gw, cfg);
    assert!(matches!(err, SessionError::Tip(TipError::Jump { gateway: 5_000, seen: 500, .. })), "{err}");
}

#[test]
fn agent_refuses_a_mainnet_tip_the_chain_cannot_have_reached() {
    let gw = TestGateway::start(false);
    {
        let mut book = gw.book.lock().unwrap();
        book.terms.network = bitcoin::Network::Bitcoin;
        book.terms.tip_height = bitcoin::absolute::Height::from_consensus(5_000_000).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, _stop) = config(&gw.url, dir.path(), fake_funding(), 1000);
    cfg.limits.network = bitcoin::Network::Bitcoin;
    let err = refused(&gw, cfg);
    assert!(matches!(err, SessionError::Tip(TipError::Implausible { gateway: 5_000_000, .. })), "{err}");
}
