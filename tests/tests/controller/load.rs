//! Load: 200 clients paying and moving bytes for 60 s through the real controller;
//! every acknowledged payment is in the store, kernel CREDIT equals the journal and
//! the kernel billed every datagram exactly. Prints payment latency percentiles.
//! Long (about two minutes with setup): `cargo xtask load` runs it; the clients and
//! seconds can be changed with BITMESH_LOAD_CLIENTS and BITMESH_LOAD_SECS.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
#[ignore = "load run (minutes): cargo xtask load"]
fn two_hundred_clients_pay_and_transfer_with_consistent_books() {
    let clients = env_or("BITMESH_LOAD_CLIENTS", 200) as usize;
    let secs = env_or("BITMESH_LOAD_SECS", 60);
    let Some(f) = bitmesh_tests::bench::load::run_load(clients, Duration::from_secs(secs)).unwrap() else { return };
    eprintln!(
        "load: {} clients for {:.1} s: {} payments acknowledged ({:.0}/s), p50 {:?} p99 {:?} max {:?}; \
         {} of {} datagrams echoed; {} bytes billed; books consistent",
        f.clients,
        f.duration.as_secs_f64(),
        f.payments,
        f.payments as f64 / f.duration.as_secs_f64(),
        f.payment_p50,
        f.payment_p99,
        f.payment_max,
        f.datagrams_echoed,
        f.datagrams_sent,
        f.billed_bytes,
    );
}
