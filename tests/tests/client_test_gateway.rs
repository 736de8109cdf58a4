//! The client agent against a test gateway that serves the controller's real API
//! router: refusal of expensive terms, a hostile gateway that over-reports usage,
//! and resuming a channel after the agent restarts. No root, no chain needed.

mod client_support;

use std::time::{Duration, Instant};

use bitcoin::Amount;
use bitmesh::client::policy::Hold;
use bitmesh::client::session::{self, SessionError};
use bitmesh::client::state::{Phase, StateDir};
use bitmesh::client::terms::TermsError;
use bitmesh_common::pricing::{payment_for_bytes, ByteCount, PriceMsatPerMib, MIB};
use client_support::*;

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
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
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
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
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
