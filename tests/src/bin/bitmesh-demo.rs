//! `cargo xtask demo`: the whole BitMesh story on one machine, narrated, with the
//! operator's view (`bitmesh clients`, `channels`, `earnings`) printed as it goes.
//!
//! The network is the harness's testbed (docs/design.md section 8): a gateway with
//! one client-facing bridge standing in for wlan0, four clients (three pay through
//! on-chain payment channels, one with a Lightning wallet), an upstream HTTP server
//! standing in for the internet, a regtest node. Everything it creates is a
//! guard: it is removed on success, on failure and on Ctrl-C (the handler only sets a
//! flag; every wait checks it and unwinds, which drops the guards in order).

// A demo driver, not product code: a broken step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitcoin::Amount;
use bitmesh_tests::client::{Agent, AgentOpts};
use bitmesh_tests::controller::{Controller, ControllerOpts};
use bitmesh_tests::http::Fetch;
use bitmesh_tests::lightning::{LightningWallet, GATEWAY_LN_PORT};
use bitmesh_tests::network::{GATEWAY_IPV4, UPSTREAM_IPV4 as UPSTREAM_IP};
use bitmesh_tests::process::bitmesh_bin;
use bitmesh_tests::testbed::{Testbed, UPSTREAM_HTTP_PORT};
use serde_json::Value;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleep, but give up at once on Ctrl-C.
fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check()?;
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    check()
}

/// Poll `f` until it returns `Some`, or fail after `timeout` saying `what`.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + timeout;
    loop {
        check()?;
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const MIB: u64 = 1024 * 1024;
/// The paced "WiFi" rate of the downloads, bytes per second.
const LINK_BPS: u64 = 3 * MIB / 2;
/// Idle timeout the controller runs with in the demo.
const IDLE_SECS: u64 = 15;
/// The bundles sold over Lightning (`--bundles`).
const LN_BUNDLES: &str = "2MiB,8MiB";

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / MIB as f64)
}

fn heading(n: u32, text: &str) {
    println!("\n\x1b[1m== {n}. {text}\x1b[0m");
}

fn say(text: &str) {
    println!("   {text}");
}

/// The operator's view: run a CLI command and print it indented.
fn operator(ctl: &Controller, args: &[&str]) -> Result<()> {
    println!("\n   operator $ bitmesh {}", args.join(" "));
    for line in ctl.cli_text(args)?.lines() {
        println!("   | {line}");
    }
    Ok(())
}

/// The client agent's own messages so far (not its live status line).
fn agent_notes(agent: &Agent, name: &str, skip: usize) -> usize {
    let text = agent.output();
    let lines: Vec<&str> = text
        .split(['\n', '\r'])
        .map(|l| l.trim_end_matches("\x1b[K"))
        .filter(|l| !l.trim().is_empty() && !l.starts_with("paid "))
        .collect();
    for l in lines.iter().skip(skip) {
        println!("   {name} agent> {l}");
    }
    lines.len()
}

/// The agent's last live status line.
fn agent_status(agent: &Agent) -> Option<String> {
    let text = agent.output();
    text.split(['\n', '\r'])
        .map(|l| l.trim_end_matches("\x1b[K"))
        .rfind(|l| l.starts_with("paid "))
        .map(str::to_owned)
}

/// Wait (interruptibly) until the agent has a funded channel.
fn funded(agent: &mut Agent) -> Result<()> {
    wait_for("the client's channel to be funded", Duration::from_secs(30), || {
        (agent.output().contains("channel funded") || !agent.running()).then_some(())
    })?;
    if !agent.output().contains("channel funded") {
        bail!("the client agent exited before its channel was funded; its log:\n{}", agent.output());
    }
    Ok(())
}

fn describe_fetch(f: &Fetch, wanted: u64) -> String {
    if f.complete {
        format!(
            "got all {} in {:.1} s; longest pause between reads {} ms",
            mib(f.bytes),
            f.elapsed.as_secs_f64(),
            f.longest_stall.as_millis()
        )
    } else {
        format!(
            "stopped after {} of {} ({})",
            mib(f.bytes),
            mib(wanted),
            f.error.as_deref().unwrap_or("incomplete")
        )
    }
}

fn main() -> std::process::ExitCode {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // Ctrl-C must reach only the demo, which then stops everything in order.
    bitmesh_tests::process::use_own_process_groups();
    let started = Instant::now();
    let result = run();
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            println!("\ndemo finished in {secs:.0} s; namespaces, processes and pinned maps removed.");
            std::process::ExitCode::SUCCESS
        }
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
            eprintln!("\ndemo interrupted after {secs:.0} s; everything it created is removed.");
            std::process::ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("\ndemo failed after {secs:.0} s: {e:#}\neverything it created is removed.");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root (sudo cargo xtask demo)");
    }
    bitmesh_bin().context("no bitmesh binary: run `cargo xtask demo`, which builds it")?;
    if !bitmesh_tests::chain::binaries().0.exists() {
        bail!("no regtest bitcoind: run `cargo xtask demo`, which builds it (about 8 minutes, once)");
    }

    heading(0, "The stage");
    let world = Testbed::start(4)?.context("the testbed cannot run here (the line above says why)")?;
    let names = ["A", "B", "C", "D"];
    say(&format!(
        "gateway namespace {}: bridge {} at {} stands in for wlan0; NAT to the upstream",
        world.gateway().name(),
        world.gateway_if(),
        GATEWAY_IPV4
    ));
    for c in &world.lan.clients {
        say(&format!("client {} : namespace {}, {} {} on a bridge port", names[c.index], c.ns.name(), c.ip, c.mac));
    }
    say(&format!("the internet: an HTTP server at {UPSTREAM_IP}:{UPSTREAM_HTTP_PORT} (downloads paced at {}/s, like WiFi)", mib(LINK_BPS)));
    say(&format!("regtest bitcoind, reached from the gateway namespace on 127.0.0.1, tip at height {}", world.tip()));
    let funding = world.fund(3, Amount::from_sat(100_000))?;
    say("A, B and C each hold one confirmed 100,000 sat output (their wallets)");
    check()?;

    let ln_listen = format!("127.0.0.1:{GATEWAY_LN_PORT}");
    let opts = ControllerOpts { idle_timeout_secs: Some(IDLE_SECS), ..ControllerOpts::story() }.with(&[
        "--lightning",
        "--lightning-listen",
        &ln_listen,
        "--bundles",
        LN_BUNDLES,
    ]);
    let ctl = world.start_controller(&opts)?;
    say(&format!(
        "controller: bitmesh run --iface {} --network regtest --price-msat-per-mib {} --chunk-bytes {} \
         --low-water-bytes {} --idle-timeout-secs {IDLE_SECS} --lightning --bundles {LN_BUNDLES} ...",
        world.gateway_if(),
        opts.price_msat_per_mib.unwrap_or_default(),
        opts.chunk_bytes.unwrap_or_default(),
        opts.low_water_bytes.unwrap_or_default()
    ));
    let log = ctl.log();
    if let Some(line) = log.lines().find(|l| l.contains("meter attached")) {
        // e.g. `... meter attached iface=br1x2 hook=tc pinned=false`
        let fields: Vec<&str> = line.split_whitespace().filter(|w| w.contains('=')).collect();
        say(&format!("meter attached to the bridge: {}", fields.join(" ")));
    }
    let wallet = LightningWallet::connect(&world, &ctl)?;
    say(&format!(
        "D's phone wallet: a Lightning node with a 2,000,000 sat channel to the gateway's embedded node {}...",
        &wallet.gateway_id[..16]
    ));
    check()?;

    // 1. Unpaid: only the walled garden.
    heading(1, "A joins the WiFi and has not paid: only the walled garden is open");
    let f = world.fetch(0, MIB, Duration::from_secs(3));
    say(&format!("A $ fetch http://{UPSTREAM_IP}:{UPSTREAM_HTTP_PORT}/1MiB   -> {}", if f.bytes == 0 { "BLOCKED (dropped in the kernel: no budget)".into() } else { describe_fetch(&f, MIB) }));
    if f.bytes != 0 {
        bail!("an unpaid client reached the internet: {f:?}");
    }
    let (code, body) = world.api_get(0, "/v1/terms", Duration::from_secs(5))?;
    let terms: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    say(&format!(
        "A $ GET {}/v1/terms -> {code}: price {} sat/MiB, chunk {}, network {}",
        world.gateway_url(),
        terms["price_msat_per_mib"].as_u64().unwrap_or(0) / 1000,
        mib(terms["chunk_bytes"].as_u64().unwrap_or(0)),
        terms["network"].as_str().unwrap_or("?")
    ));
    if code != 200 {
        bail!("the payment API is not reachable from an unpaid client: {code} {body}");
    }
    operator(&ctl, &["clients"])?;
    say("(nobody has paid: the meter knows no client, and drops their traffic)");

    // 2. A pays and downloads; tops up at the low-water mark.
    heading(2, "A opens a channel and downloads 12 MiB, topping up as it goes");
    let mut a = world.start_agent(0, &AgentOpts::new(funding[0].file.clone(), 30_000))?;
    say(&format!(
        "A $ bitmesh pay --gateway {} --max-price 1000 --max-spend 30000 --capacity 40000 --fund-from wallet.json --yes",
        world.gateway_url()
    ));
    funded(&mut a)?;
    // Until its funding confirms, a channel is credited at most one chunk past its
    // first payment: a 12 MiB download needs the block.
    world.mine(1);
    let mut a_seen = agent_notes(&a, "A", 0);
    let want = 12 * MIB;
    let f = std::thread::scope(|s| -> Result<Fetch> {
        let dl = s.spawn(|| world.fetch_paced(0, want, LINK_BPS, Duration::from_secs(5)));
        pause(Duration::from_secs(4))?;
        if let Some(st) = agent_status(&a) {
            say(&format!("A agent> {st}"));
        }
        operator(&ctl, &["clients"])?;
        Ok(dl.join().expect("download thread"))
    })?;
    say(&format!("A $ fetch http://{UPSTREAM_IP}:{UPSTREAM_HTTP_PORT}/12MiB  -> {}", describe_fetch(&f, want)));
    if let Some(ch) = ctl.channel(&world.lan.clients[0].mac) {
        say(&format!(
            "{} payment updates so far, {} sat paid: each sent at the low-water mark, before the budget ran out",
            ch["payments"], ch["paid_sat"]
        ));
    }
    if let Some(st) = agent_status(&a) {
        say(&format!("A agent> {st}"));
    }
    a_seen = agent_notes(&a, "A", a_seen);

    // 3. B stops paying: cut off at its budget.
    heading(3, "B caps its spending at 3,000 sat: cut off at its budget");
    let mut b = world.start_agent(1, &AgentOpts::new(funding[1].file.clone(), 3_000))?;
    say("B $ bitmesh pay ... --max-spend 3000 --yes");
    funded(&mut b)?;
    let want = 8 * MIB;
    let f = world.fetch_paced(1, want, LINK_BPS, Duration::from_secs(4));
    say(&format!("B $ fetch http://{UPSTREAM_IP}:{UPSTREAM_HTTP_PORT}/8MiB   -> {}", describe_fetch(&f, want)));
    if let Some(st) = agent_status(&b) {
        say(&format!("B agent> {st}"));
    }
    if let Some(row) = ctl.client(&world.lan.clients[1].mac) {
        let used = row["up_bytes"].as_u64().unwrap_or(0) + row["down_bytes"].as_u64().unwrap_or(0);
        let budget = row["credited_bytes"].as_u64().unwrap_or(0);
        say(&format!(
            "gateway: B paid {} sat = budget {} ({} bytes); used {} ({} bytes); over by {} bytes (at most one frame)",
            row["paid_sat"],
            mib(budget),
            budget,
            mib(used),
            used,
            used.saturating_sub(budget)
        ));
    }
    operator(&ctl, &["clients"])?;

    // A is done: its user stops the agent, which asks the gateway to close.
    heading(4, "A is done: Ctrl-C on its agent asks the gateway to close and settle");
    a.stop();
    agent_notes(&a, "A", a_seen);

    // 5. C uses a little and goes idle.
    heading(5, &format!("C downloads 1 MiB, then goes idle (--idle-timeout-secs {IDLE_SECS})"));
    let mut c = world.start_agent(2, &AgentOpts::new(funding[2].file.clone(), 10_000))?;
    funded(&mut c)?;
    let f = world.fetch_paced(2, MIB, LINK_BPS, Duration::from_secs(5));
    say(&format!("C $ fetch http://{UPSTREAM_IP}:{UPSTREAM_HTTP_PORT}/1MiB   -> {}", describe_fetch(&f, MIB)));
    let idle_from = Instant::now();
    say("C sends nothing more; B, cut off, sends nothing either. The controller closes idle channels:");
    let mac_b = world.lan.clients[1].mac.clone();
    let mac_c = world.lan.clients[2].mac.clone();
    wait_for("the idle channels of B and C to close", Duration::from_secs(IDLE_SECS + 45), || {
        let b = ctl.channel(&mac_b)?;
        let c = ctl.channel(&mac_c)?;
        (b["state"] != "open" && c["state"] != "open").then_some(())
    })?;
    say(&format!("closed {:.0} s after C went idle", idle_from.elapsed().as_secs_f64()));
    operator(&ctl, &["channels"])?;
    drop(c);
    drop(b);

    // 6. D pays with Lightning: no channel of its own to the gateway, no waiting for blocks.
    heading(6, "D buys bytes with a Lightning wallet: 2 MiB bundles, the next at half the last");
    let d = world.start_lightning_agent(3, "2MiB", 4_000, 1_000)?;
    say(&format!("D $ bitmesh pay --lightning --gateway {} --bundle 2MiB --max-price 1000 --max-spend 4000", world.gateway_url()));
    let mut paid = 0;
    let mut pay_printed = |d: &Agent| -> Result<()> {
        for bolt11 in d.invoices().into_iter().skip(paid) {
            let started = Instant::now();
            if !wallet.node.pay(&bolt11)? {
                bail!("D's wallet could not pay {bolt11}; the controller's log:\n{}", ctl.log_tail(30));
            }
            paid += 1;
            say(&format!(
                "D's wallet pays invoice {paid} ({}...): done in {} ms",
                &bolt11[..24],
                started.elapsed().as_millis()
            ));
        }
        Ok(())
    };
    wait_for("D's first invoice", Duration::from_secs(30), || (!d.invoices().is_empty()).then_some(()))?;
    pay_printed(&d)?;
    let mac_d = world.lan.clients[3].mac.clone();
    wait_for("D's first bundle to be credited", Duration::from_secs(30), || {
        ctl.client(&mac_d).filter(|r| r["remaining_bytes"].as_u64().unwrap_or(0) > 0).map(|_| ())
    })?;
    let want = 3 * MIB;
    let f = std::thread::scope(|s| -> Result<Fetch> {
        let dl = s.spawn(|| world.fetch_paced(3, want, LINK_BPS, Duration::from_secs(5)));
        // The agent asks for the next bundle at the low-water mark; the wallet pays
        // each invoice as it appears.
        while !dl.is_finished() {
            pay_printed(&d)?;
            pause(Duration::from_millis(50))?;
        }
        Ok(dl.join().expect("download thread"))
    })?;
    say(&format!("D $ fetch http://{UPSTREAM_IP}:{UPSTREAM_HTTP_PORT}/3MiB   -> {}", describe_fetch(&f, want)));
    let out = d.output();
    for line in out.lines().filter(|l| l.starts_with("paid:")) {
        say(&format!("D agent> {line}"));
    }
    // The same code comes with every invoice: it names all of D's credit.
    if let Some(token) = out.lines().rfind(|l| l.starts_with("your purchase token")) {
        say(&format!("D agent> {token}"));
    }
    if let Some(row) = ctl.client(&mac_d) {
        let used = row["up_bytes"].as_u64().unwrap_or(0) + row["down_bytes"].as_u64().unwrap_or(0);
        say(&format!(
            "gateway: D bought {} over Lightning, used {}; {} left for later, kept across restarts",
            mib(row["credited_bytes"].as_u64().unwrap_or(0)),
            mib(used),
            mib(row["remaining_bytes"].as_u64().unwrap_or(0))
        ));
    }
    drop(d);

    // 7. Blocks are mined; settlements confirm.
    heading(7, "A block is mined: the settlement transactions confirm");
    let height = world.mine(1);
    say(&format!("mined 1 block, tip {height}"));
    let txids: Vec<(String, String)> = wait_for("the settlements to be recorded as confirmed", Duration::from_secs(30), || {
        let rows = ctl.channels().ok()?;
        let all_closed = rows.iter().filter(|r| r["payments"].as_u64().unwrap_or(0) > 0).all(|r| r["state"] == "closed");
        all_closed.then(|| {
            rows.iter()
                .filter_map(|r| Some((r["mac"].as_str()?.to_owned(), r["close_txid"].as_str()?.to_owned())))
                .collect()
        })
    })?;
    let mut shown = std::collections::BTreeSet::new();
    for (mac, txid) in &txids {
        let who = world.lan.clients.iter().find(|c| &c.mac == mac).map_or("?", |c| names[c.index]);
        let conf = txid.parse().ok().and_then(|t| world.confirmations(&t));
        let dup = if shown.insert(txid.clone()) { "" } else { " (same batch)" };
        say(&format!("{who}: settlement {txid}: {} confirmation(s){dup}", conf.unwrap_or(0)));
    }

    heading(8, "The operator's final view");
    operator(&ctl, &["channels"])?;
    operator(&ctl, &["clients"])?;
    say("(every channel is settled: A, B and C show as closed, with what they paid and used; D's credit is on the Lightning rail)");
    operator(&ctl, &["earnings"])?;
    operator(&ctl, &["lightning"])?;
    ctl.shut_down();
    Ok(())
}
