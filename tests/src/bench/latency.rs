//! Latency of a real controller: durable payment updates over HTTP and the recovery
//! from an exhausted budget, measured on a [`Testbed`] (printed by the ignored
//! `latency` controller test and by `cargo xtask bench`; never asserted as a time).

// Test harness: any failure here must fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::chain::CoinbaseWallet;
use crate::controller::ControllerOpts;
use crate::http;
use crate::testbed::Testbed;
use super::percentile;
use crate::upstream::udp_round_trips;

/// Latency figures of a real controller (see [`measure_controller`]).
#[derive(Debug, Clone)]
pub struct ControllerLatency {
    /// Payment updates timed (client request sent -> acknowledgement received).
    pub payments: usize,
    /// Median payment round trip (HTTP over the client link, verify, synced
    /// SQLite commit, CREDIT raised, ack).
    pub payment_p50: Duration,
    /// 99th percentile of the same.
    pub payment_p99: Duration,
    /// Stalls timed (budget exhausted, top-up paid).
    pub stalls: usize,
    /// Median time from the top-up's acknowledgement to the first datagram echoed
    /// through the gateway (includes one UDP round trip over the veths).
    pub resume_p50: Duration,
    /// Slowest of the same.
    pub resume_max: Duration,
}

/// Start a testbed and a controller, open and fund one channel,
/// then time `payments` durable payment updates over HTTP and `stalls` recoveries
/// from an exhausted budget. `None` when the machine cannot run it (skip notice
/// printed). For the benchmark binary: `bitmesh_tests::bench::latency::measure_controller(500, 20)`.
pub fn measure_controller(payments: usize, stalls: usize) -> Result<Option<ControllerLatency>> {
    use bitcoin::Amount;
    let Some(lab) = Testbed::start(1)? else { return Ok(None) };
    let flags = ["--price-msat-per-mib", "8000000", "--rate-limit-per-min", "1000000", "--zero-conf-exposure-sat", "1000000"];
    let _controller = lab.start_controller(&ControllerOpts::new().with(&flags))?;
    let mut wallet = CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced()?;
    let mut client = lab.scripted_client();
    let offer = client.open(200)?;
    client.fund(&mut wallet, Amount::from_sat(40_000))?;
    let mut total = offer.min_first_payment;
    client.pay(total)?;

    // Payment round trips: signatures made before the clock starts (client CPU is
    // not the gateway's latency); one TCP connection per update, as a client makes.
    let updates: Vec<_> = (1..=payments as u64).map(|i| client.update(total + Amount::from_sat(i))).collect();
    total += Amount::from_sat(payments as u64);
    let api = client.api();
    let mut lat = client.in_ns(|| {
        let mut lat = Vec::with_capacity(updates.len());
        for u in &updates {
            let body = serde_json::to_value(u)?;
            let path = format!("/v1/channels/{}/payments", u.channel_id);
            let t = Instant::now();
            let r = http::post_json(api, &path, &body)?;
            lat.push(t.elapsed());
            anyhow::ensure!(r.status == 200, "payment refused: {}", String::from_utf8_lossy(&r.body));
        }
        Ok(lat)
    })?;
    lat.sort();

    // Stall -> top-up -> traffic again.
    let udp = lab.client_udp()?;
    udp.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut resume = Vec::new();
    for _ in 0..stalls {
        let mut misses = 0;
        while misses < 3 {
            if udp_round_trips(&udp, 1, 200) == 0 {
                misses += 1;
            } else {
                misses = 0;
            }
        }
        total += Amount::from_sat(50);
        let update = client.update(total);
        let body = serde_json::to_value(&update)?;
        let path = format!("/v1/channels/{}/payments", update.channel_id);
        let r = client.in_ns(|| http::post_json(api, &path, &body))?;
        let acked = Instant::now();
        anyhow::ensure!(r.status == 200, "top-up refused: {}", String::from_utf8_lossy(&r.body));
        udp.set_read_timeout(Some(Duration::from_millis(2)))?;
        let deadline = acked + Duration::from_secs(2);
        loop {
            if udp_round_trips(&udp, 1, 200) == 1 {
                resume.push(acked.elapsed());
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "traffic did not resume within 2 s of the ack");
        }
        udp.set_read_timeout(Some(Duration::from_millis(20)))?;
    }
    resume.sort();
    Ok(Some(ControllerLatency {
        payments: lat.len(),
        payment_p50: percentile(&lat, 50),
        payment_p99: percentile(&lat, 99),
        stalls: resume.len(),
        resume_p50: if resume.is_empty() { Duration::ZERO } else { percentile(&resume, 50) },
        resume_max: resume.last().copied().unwrap_or_default(),
    }))
}
