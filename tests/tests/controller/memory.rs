//! Controller memory with 1,000 clients (docs/design.md section 10), printed; a benchmark
//! run by hand or by `cargo xtask bench`, not a timed test:
//! `cargo test -p bitmesh-tests --test controller memory:: -- --ignored --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bitmesh_tests::bench::memory::measure_memory;

const MIB: f64 = 1024.0 * 1024.0;

#[test]
#[ignore = "benchmark: about a minute with 1,000 clients; run with --ignored"]
fn controller_memory_with_a_thousand_paying_clients() {
    // BITMESH_MEMORY_CLIENTS=100 for a quick look.
    let clients = std::env::var("BITMESH_MEMORY_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let Some(m) = measure_memory(clients).unwrap() else { return };
    println!("controller memory, {} clients opened + funded + paid once (setup {:.1?}):", m.clients, m.setup);
    println!("  RSS idle        {:>8.1} MiB (peak {:.1} MiB)", m.rss_idle as f64 / MIB, m.hwm_idle as f64 / MIB);
    println!("  RSS loaded      {:>8.1} MiB (peak {:.1} MiB)", m.rss_loaded as f64 / MIB, m.hwm_loaded as f64 / MIB);
    println!("  per client      {:>8.0} bytes", m.per_client);
    println!("  SQLite          {:>8.1} KiB (+ WAL {:.1} KiB)", m.sqlite_bytes as f64 / 1024.0, m.sqlite_wal_bytes as f64 / 1024.0);
    assert!(m.rss_loaded > 0 && m.sqlite_bytes > 0);
}
