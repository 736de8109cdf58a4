//! Controller figures from a real `bitmesh run` on a regtest node, measured by
//! `bitmesh_tests::bench::latency::measure_controller`: durable payment updates over HTTP
//! (round trip p50/p99, and the updates per second that gives one client) and the
//! time from a top-up's acknowledgement to traffic passing again after a stall.

use anyhow::Result;
use bitmesh_tests::bench::latency::measure_controller;

use crate::report::Report;

pub fn run(report: &mut Report, quick: bool) -> Result<()> {
    // The gateway's CPU work per update alone (no I/O): every check of the channel
    // rules, the close transaction signed and run through Core's script interpreter.
    let verify = bitmesh_channel::bench::verify_update_median(if quick { 200 } else { 2_000 })?;
    report.note(
        "Controller",
        format!("verifying one payment update (all channel checks + Core's script interpreter), no I/O: median {:.0} µs", verify.as_secs_f64() * 1e6),
    );
    let (payments, stalls) = if quick { (100, 5) } else { (500, 20) };
    let Some(m) = measure_controller(payments, stalls)? else {
        report.note("Skipped", "controller: the testbed could not start here (see the skip notice above)");
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

/// Controller memory with many paying clients (`measure_memory`: a real controller,
/// each client on its own MAC and IP, opened, funded and paid once).
pub fn memory(report: &mut Report, quick: bool) -> Result<()> {
    let clients = if quick { 100 } else { 1_000 };
    let Some(m) = bitmesh_tests::bench::memory::measure_memory(clients)? else {
        report.note("Skipped", "controller memory: the testbed could not start here (see the skip notice above)");
        return Ok(());
    };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    report.note(
        "Controller",
        format!(
            "memory: RSS {:.1} MiB idle, {:.1} MiB with {} clients opened, funded and paid (about {:.0} bytes per client; peak {:.1} MiB); SQLite {:.0} KiB + {:.0} KiB WAL; setup {:.1} s",
            mib(m.rss_idle),
            mib(m.rss_loaded),
            m.clients,
            m.per_client,
            mib(m.hwm_loaded),
            m.sqlite_bytes as f64 / 1024.0,
            m.sqlite_wal_bytes as f64 / 1024.0,
            m.setup.as_secs_f64()
        ),
    );
    Ok(())
}
