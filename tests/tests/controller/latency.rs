//! Latency of the real controller (not a timed assertion: prints the figures).
//! `cargo test -p bitmesh-tests --test controller latency:: -- --ignored --nocapture`

#![allow(clippy::unwrap_used)]

#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn payment_round_trip_and_resume_after_stall() {
    let Some(m) = bitmesh_tests::bench::latency::measure_controller(500, 30).unwrap() else { return };
    eprintln!(
        "payment update round trip over HTTP (durable): p50 {:?} p99 {:?} ({} updates)\n\
         ack -> traffic passing again after a stall: p50 {:?} max {:?} ({} stalls)",
        m.payment_p50, m.payment_p99, m.payments, m.resume_p50, m.resume_max, m.stalls
    );
}
