//! Controller figures from a real `bitmesh run` on a regtest node, measured by
//! `bitmesh_tests::controller::measure_controller`: durable payment updates over HTTP
//! (round trip p50/p99, and the updates per second that gives one client) and the
//! time from a top-up's acknowledgement to traffic passing again after a stall.

use anyhow::Result;
use bitmesh_tests::controller::measure_controller;

use crate::report::Report;

pub fn run(report: &mut Report, quick: bool) -> Result<()> {
    let (payments, stalls) = if quick { (100, 5) } else { (500, 20) };
    let Some(m) = measure_controller(payments, stalls)? else {
        report.note("Skipped", "controller: the lab could not start here (see the skip notice above)");
        return Ok(());
    };
    let per_sec = if m.payment_p50.as_secs_f64() > 0.0 { 1.0 / m.payment_p50.as_secs_f64() } else { f64::NAN };
    report.note(
        "Controller",
        format!(
            "payment update round trip over HTTP, durable (synced SQLite commit before CREDIT and ack), {} updates: p50 {:.2} ms, p99 {:.2} ms (about {per_sec:.0} sequential updates/s for one client)",
            m.payments,
            m.payment_p50.as_secs_f64() * 1e3,
            m.payment_p99.as_secs_f64() * 1e3
        ),
    );
    report.note(
        "Controller",
        format!(
            "acknowledgement to traffic passing again after a stall, {} stalls: p50 {:.2} ms, max {:.2} ms (includes one UDP round trip over the veths)",
            m.stalls,
            m.resume_p50.as_secs_f64() * 1e3,
            m.resume_max.as_secs_f64() * 1e3
        ),
    );
    Ok(())
}
