//! Controller memory with many clients (docs/design.md section 10): a real `bitmesh run` in a
//! [`Testbed`], its resident set read from `/proc/PID/status` idle and again after
//! `clients` devices (one [`ClientIdentity`] each) have opened, funded and paid one
//! channel over HTTP: real store rows, real journal entries, real kernel map entries.

// Test harness: any failure here must fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bitcoin::Amount;

use crate::chain::CoinbaseWallet;
use crate::client::ScriptedClient;
use crate::controller::ControllerOpts;
use crate::testbed::Testbed;

/// Resident memory of the controller before and after `clients` paying clients.
#[derive(Debug, Clone)]
pub struct MemoryFigures {
    /// Clients opened, funded and paid.
    pub clients: usize,
    /// VmRSS of the idle controller (synced to the chain, no channel).
    pub rss_idle: u64,
    /// VmHWM (peak RSS) at that point.
    pub hwm_idle: u64,
    /// VmRSS with every client paid, after the controller settled down.
    pub rss_loaded: u64,
    /// VmHWM at the end (peak over the whole run, including the request bursts).
    pub hwm_loaded: u64,
    /// (rss_loaded - rss_idle) / clients.
    pub per_client: f64,
    /// The SQLite database file, after a checkpoint of the write-ahead log is due.
    pub sqlite_bytes: u64,
    /// Its write-ahead log (`-wal`) at the same moment.
    pub sqlite_wal_bytes: u64,
    /// Wall time to bring all clients to paid (identities, opens, funding, payments).
    pub setup: Duration,
}

/// `VmRSS` and `VmHWM` of `pid`, in bytes.
fn rss_of(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: u64 = line.split_whitespace().nth(1).context("malformed line")?.parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Sizes of the SQLite files in `data_dir`: (database files, their `-wal` files).
fn sqlite_sizes(data_dir: &Path) -> Result<(u64, u64)> {
    let (mut db, mut wal) = (0, 0);
    for entry in std::fs::read_dir(data_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let len = entry.metadata()?.len();
        if name.ends_with("-wal") {
            wal += len;
        } else if name.ends_with(".db") || name.ends_with(".sqlite") || name.ends_with(".sqlite3") {
            db += len;
        }
    }
    Ok((db, wal))
}

/// Run `f` over `items` on `workers` threads (each gets a contiguous share).
fn parallel<T: Send>(items: &mut [T], workers: usize, f: impl Fn(&mut T) -> Result<()> + Sync) -> Result<()> {
    let per = items.len().div_ceil(workers.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = items.chunks_mut(per).map(|chunk| s.spawn(|| chunk.iter_mut().try_for_each(&f))).collect();
        handles.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("worker panicked"))?)
    })
}

/// Start a lab, read the controller's RSS idle, then bring `clients` clients (each its
/// own MAC and IP) through open, fund (confirmed, 100 channels per funding
/// transaction) and one payment each over HTTP, and read it again. `None` when the
/// machine cannot run it (skip notice printed). For the benchmark binary:
/// `bitmesh_tests::bench::memory::measure_memory(1_000)`.
pub fn measure_memory(clients: usize) -> Result<Option<MemoryFigures>> {
    const PER_FUNDING_TX: usize = 100;
    const CAPACITY: Amount = Amount::from_sat(20_000);
    const WORKERS: usize = 4;
    let Some(lab) = Testbed::start(1)? else { return Ok(None) };
    let controller = lab.start_controller(&ControllerOpts::new())?;
    let mut wallet = CoinbaseWallet::fund(&lab.node, clients.div_ceil(PER_FUNDING_TX) as u32 + 1, 0);
    lab.wait_synced()?;
    let pid = controller.pid().context("controller not running")?;
    // Let the first settlement passes and snapshots run before reading idle memory.
    std::thread::sleep(Duration::from_secs(3));
    let (rss_idle, hwm_idle) = rss_of(pid)?;

    let started = Instant::now();
    let ids = lab.add_client_identities(clients, true)?;
    let mut devices: Vec<ScriptedClient> =
        ids.into_iter().map(|id| ScriptedClient::with_identity(lab.client_ns(), lab.api(), id)).collect();
    parallel(&mut devices, WORKERS, |c| c.open(200).map(|_| ()))?;
    let funding = lab.confirmed_funding(&mut wallet, &devices, CAPACITY, PER_FUNDING_TX)?;
    let mut pairs: Vec<(ScriptedClient, _)> = devices.into_iter().zip(funding).collect();
    parallel(&mut pairs, WORKERS, |(c, (tx, vout))| c.fund_with(tx, *vout).map(|_| ()))?;
    // Sign every first payment before sending any (client CPU is not the gateway's).
    let mut updates: Vec<_> = pairs
        .iter()
        .map(|(c, _)| (c, c.update(c.offer.as_ref().expect("opened").min_first_payment)))
        .collect();
    parallel(&mut updates, WORKERS, |(c, u)| {
        let r = c.send(u)?;
        anyhow::ensure!(r.status == 200, "payment refused: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(())
    })?;
    let setup = started.elapsed();

    // A few snapshot intervals and settlement passes over the loaded store.
    std::thread::sleep(Duration::from_secs(5));
    let (rss_loaded, hwm_loaded) = rss_of(pid)?;
    let (sqlite_bytes, sqlite_wal_bytes) = sqlite_sizes(&controller.data_dir())?;

    // Only now ask the controller (its answer allocates): every client is paid.
    let paid = controller.channels()?.iter().filter(|c| c["state"] == "open" && c["payments"].as_u64() == Some(1)).count();
    anyhow::ensure!(paid == clients, "{paid} of {clients} channels open and paid");
    Ok(Some(MemoryFigures {
        clients,
        rss_idle,
        hwm_idle,
        rss_loaded,
        hwm_loaded,
        per_client: (rss_loaded as f64 - rss_idle as f64) / clients.max(1) as f64,
        sqlite_bytes,
        sqlite_wal_bytes,
        setup,
    }))
}
