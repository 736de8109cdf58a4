//! Attacks on the client API's sockets, against the real controller in namespaces
//! with a real regtest node:
//!
//! * an unpaid station floods the API with idle and slow-loris connections while the
//!   controller runs under a file-descriptor limit of 1,024 (systemd's default): a
//!   paying client's updates are still acknowledged and its download never stalls;
//! * the API does not answer from the upstream side;
//! * a second `bitmesh run` on the same data and pin directories is refused up front
//!   and touches nothing of the first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitcoin::Amount;
use bitmesh_tests::chain::CoinbaseWallet;
use bitmesh_tests::http;
use bitmesh_tests::client::ScriptedClient;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::network::{in_netns, in_netns_named, GATEWAY_IPV4, UPSTREAM_GATEWAY_IPV4, UPSTREAM_IPV4};
use bitmesh_tests::testbed::Testbed;

/// 100 sat per MiB: the first payment buys a few MiB, so credit stays tight.
const PRICE: &str = "100000";
const CAPACITY: Amount = Amount::from_sat(40_000);
/// Not the testbed's own upstream HTTP server's port (`UPSTREAM_HTTP_PORT`, 8080).
const DOWNLOAD_PORT: u16 = 8081;
const IDLE_CONNECTIONS: usize = 2_000;
const SLOW_LORIS_CONNECTIONS: usize = 200;
const ATTACK: Duration = Duration::from_secs(30);

/// Raise this process's own descriptor limit (the attacker's sockets live here).
fn raise_own_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur = lim.rlim_max;
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert!(lim.rlim_cur >= 8_192, "the test needs a descriptor limit of 8,192 (hard limit is {})", lim.rlim_max);
}

/// Set the running controller's descriptor limit, as `LimitNOFILE=1024` would.
fn limit_nofile(pid: u32, n: u64) {
    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// The attacker's connections, kept up for as long as `stop` is unset: every one the
/// server closes is opened again. Counts connections opened and closed by the server.
#[derive(Default)]
struct Flood {
    opened: AtomicU64,
    closed_by_server: AtomicU64,
    connect_failures: AtomicU64,
}

fn connect(addr: SocketAddr) -> Option<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_nonblocking(true).ok()?;
    Some(s)
}

/// One thread: `n` connections, idle (`loris == false`) or sending one header line
/// per second and never finishing the request (`loris == true`).
fn flood(addr: SocketAddr, n: usize, loris: bool, stop: &AtomicBool, stats: &Flood) {
    let mut socks: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    while !stop.load(Ordering::Relaxed) {
        let round = Instant::now();
        for slot in socks.iter_mut() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Some(s) = slot {
                let mut b = [0u8; 512];
                let mut alive = match s.read(&mut b) {
                    // EOF, or an answer (a refusal or a timeout): the server is closing it.
                    Ok(_) => false,
                    Err(e) => e.kind() == ErrorKind::WouldBlock,
                };
                if alive && loris {
                    alive = s.write_all(b"x-a: b\r\n").is_ok();
                }
                if !alive {
                    stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
                    *slot = None;
                }
                continue;
            }
            match connect(addr) {
                Some(mut s) => {
                    if loris {
                        let _ = s.write_all(b"POST /v1/channels HTTP/1.1\r\nhost: gw\r\n");
                    }
                    stats.opened.fetch_add(1, Ordering::Relaxed);
                    *slot = Some(s);
                }
                None => {
                    stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if let Some(rest) = Duration::from_secs(1).checked_sub(round.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

/// A paced TCP source in the upstream namespace: 64 KiB every 50 ms per connection.
fn start_download_server(lab: &Testbed, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let listener = in_netns(&lab.lan.upstream, || Ok(TcpListener::bind((UPSTREAM_IPV4, DOWNLOAD_PORT))?)).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; 64 * 1024];
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
            let (stop, chunk) = (stop.clone(), chunk.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match s.write(&chunk) {
                        Ok(_) => {}
                        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => return,
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[test]
fn idle_and_slow_loris_flood_does_not_stop_a_paying_client() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let mut ctl = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", PRICE])).unwrap();
    raise_own_nofile();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 3, 0);
    lab.wait_synced().unwrap();
    let payer_id = lab.add_client_identities(1, false).unwrap().remove(0);
    // The payer's sockets are bound to its interface: give it a route upstream.
    lab.client_ns().ip(&["route", "add", &format!("{UPSTREAM_IPV4}/32"), "via", &GATEWAY_IPV4.to_string(), "dev", &payer_id.iface, "onlink"]).unwrap();
    let mut payer = ScriptedClient::with_identity(lab.client_ns(), lab.api(), payer_id.clone());
    let offer = payer.open(200).unwrap();
    payer.fund(&mut wallet, CAPACITY).unwrap();
    lab.node.mine(1);
    lab.wait_synced().unwrap();
    let mut paid = offer.min_first_payment;
    payer.pay(paid).unwrap();

    // systemd's default: the controller may hold 1,024 descriptors.
    limit_nofile(ctl.pid().unwrap(), 1_024);

    let stop = Arc::new(AtomicBool::new(false));
    let server = start_download_server(&lab, stop.clone());
    // The download: the paying device reads; the longest gap between two reads
    // that returned data is the stall.
    let received = Arc::new(AtomicU64::new(0));
    let longest_gap = Arc::new(Mutex::new(Duration::ZERO));
    let download = {
        let (stop, received, longest_gap, id, ns) = (stop.clone(), received.clone(), longest_gap.clone(), payer_id.clone(), lab.client_ns().name().to_string());
        std::thread::spawn(move || {
            let mut s = in_netns_named(&ns, || http::connect_from(Some(&id), (UPSTREAM_IPV4, DOWNLOAD_PORT).into())).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(250))).unwrap();
            let mut buf = vec![0u8; 256 * 1024];
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                        let mut g = longest_gap.lock().unwrap();
                        *g = (*g).max(last.elapsed());
                        last = Instant::now();
                    }
                    Err(_) => {}
                }
            }
            let mut g = longest_gap.lock().unwrap();
            *g = (*g).max(last.elapsed());
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let before_attack = received.load(Ordering::Relaxed);
    assert!(before_attack > 0, "the download does not run even before the attack:\n{}", ctl.log_tail(30));

    // The unpaid station: the client namespace's own address (its own MAC).
    let api = lab.api();
    let flood_stats = Arc::new(Flood::default());
    let mut attackers = Vec::new();
    for (n, loris) in [(IDLE_CONNECTIONS / 2, false), (IDLE_CONNECTIONS / 2, false), (SLOW_LORIS_CONNECTIONS, true)] {
        let (stop, stats, ns) = (stop.clone(), flood_stats.clone(), lab.client_ns().name().to_string());
        attackers.push(std::thread::spawn(move || {
            in_netns_named(&ns, || {
                flood(api, n, loris, &stop, &stats);
                Ok(())
            })
            .unwrap()
        }));
    }

    // The paying client keeps paying (50 sat = 0.5 MiB every 250 ms, twice what the
    // download uses) and times every acknowledgement.
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    // Descriptors the controller holds while the flood runs: whatever stops the
    // flood (the kernel's walled-garden budget for the unpaid station, or the
    // server's caps and timeouts), the controller must never hold it.
    let pid = ctl.pid().unwrap();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let mut most_fds = 0;
    let start = Instant::now();
    while start.elapsed() < ATTACK {
        most_fds = most_fds.max(fds());
        paid += Amount::from_sat(50);
        let t = Instant::now();
        match payer.pay(paid) {
            Ok(ack) => {
                assert_eq!(ack.total_paid, paid);
                latencies.push(t.elapsed());
            }
            Err(e) => {
                failures.push(format!("{paid}: {e:#} after {:?}", t.elapsed()));
                paid -= Amount::from_sat(50);
            }
        }
        std::thread::sleep(Duration::from_millis(250).saturating_sub(t.elapsed()));
    }
    let during_attack = received.load(Ordering::Relaxed) - before_attack;
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    download.join().unwrap();
    server.join().unwrap();

    latencies.sort();
    let longest_gap = *longest_gap.lock().unwrap();
    let (opened, closed, refused) = (
        flood_stats.opened.load(Ordering::Relaxed),
        flood_stats.closed_by_server.load(Ordering::Relaxed),
        flood_stats.connect_failures.load(Ordering::Relaxed),
    );
    eprintln!(
        "flood: {opened} attacker connections opened, {closed} closed by the server, {refused} connects failed; \
         payer: {} payments acknowledged, {} failed, p50 {:?}, p99 {:?}, max {:?}; download: {during_attack} B during the attack, longest stall {longest_gap:?}",
        latencies.len(),
        failures.len(),
        latencies.get(latencies.len() / 2),
        (!latencies.is_empty()).then(|| percentile(&latencies, 0.99)),
        latencies.last(),
    );
    assert!(failures.is_empty(), "payments failed during the flood:\n{}\n{}", failures.join("\n"), ctl.log_tail(30));
    assert!(latencies.len() >= 20, "only {} payments in {ATTACK:?}", latencies.len());
    // Liveness, generously: the download kept moving (it pays 1.3 MB/s).
    assert!(longest_gap < Duration::from_secs(10), "the paying client's download stalled for {longest_gap:?}");
    assert!(during_attack > 5 * 1024 * 1024, "only {during_attack} B downloaded during the attack");
    // The flood never held the controller's descriptors: at most the global
    // connection cap (256) plus its own files (128), far below the 1,024 limit.
    eprintln!("controller descriptors during the flood: at most {most_fds}");
    assert!(most_fds <= 256 + 128, "the controller held {most_fds} descriptors during the flood ({opened} attacker connections opened, {closed} closed by the server)");
    assert!(ctl.running(), "controller died:\n{}", ctl.log_tail(30));
}

#[test]
fn the_api_does_not_answer_from_the_upstream_side() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new()).unwrap();
    let port = ctl.api_port();
    // From the client side it answers.
    let api = lab.api();
    let r = lab.as_client(|| http::get_within(api, "/v1/terms", Duration::from_secs(5))).unwrap();
    assert_eq!(r.status, 200);
    // From upstream: neither the uplink address nor the client-side address (routed
    // through the gateway) may answer, not a GET and not a payment POST.
    for ip in [UPSTREAM_GATEWAY_IPV4, GATEWAY_IPV4] {
        let addr: SocketAddr = (ip, port).into();
        let got = in_netns(&lab.lan.upstream, || Ok(http::get_within(addr, "/v1/terms", Duration::from_secs(3)))).unwrap();
        assert!(got.is_err(), "GET /v1/terms from upstream to {addr} answered {:?}", got.map(|r| (r.status, r.text())));
        let body = serde_json::json!({ "channel_id": "ab".repeat(32), "total_paid": 1, "signature": "00" });
        let path = format!("/v1/channels/{}/payments", "ab".repeat(32));
        let got = in_netns(&lab.lan.upstream, || Ok(http::post_json(addr, &path, &body))).unwrap();
        assert!(got.is_err(), "a payment POST from upstream to {addr} answered {:?}", got.map(|r| (r.status, r.text())));
    }
}

/// Open `GET /v1/channels/{id}/events` on a raw connection; the status and the
/// connection (kept open by the caller).
fn open_event_stream(client: &ScriptedClient, auth: &str) -> (u16, TcpStream) {
    let (api, id, source) = (client.api(), client.channel_id(), client.identity().cloned());
    let req = format!("GET /v1/channels/{id}/events HTTP/1.1\r\nhost: gw\r\n{}: {auth}\r\n\r\n", bitmesh_common::wire::AUTH_HEADER);
    client
        .in_ns(|| {
            let mut s = http::connect_from(source.as_ref(), api)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(req.as_bytes())?;
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                anyhow::ensure!(s.read(&mut b)? == 1, "connection closed before the answer's headers");
                head.push(b[0]);
            }
            let status = String::from_utf8_lossy(&head).split_whitespace().nth(1).unwrap_or("0").parse()?;
            Ok((status, s))
        })
        .unwrap()
}

/// Program id of every link the controller pinned (`link_*`), by pin name.
fn pinned_program_ids(pin_dir: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(pin_dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("link_") {
            continue;
        }
        let link = aya::programs::links::PinnedLink::from_pin(entry.path()).unwrap();
        let info = aya::programs::links::FdLink::from(link).info().unwrap();
        out.push((name, info.program_id()));
    }
    out.sort();
    out
}

#[test]
fn a_second_run_on_the_same_directories_is_refused_before_it_touches_anything() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let mut ctl = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", PRICE])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 3, 0);
    lab.wait_synced().unwrap();
    let mut client = lab.scripted_client();
    let offer = client.open(200).unwrap();
    client.fund(&mut wallet, CAPACITY).unwrap();
    let mut paid = offer.min_first_payment;
    client.pay(paid).unwrap();

    // Data dir private, database files too.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let data_dir = ctl.data_dir().clone();
    assert_eq!(mode(&data_dir), 0o700, "data dir mode");
    for f in ["bitmesh.sqlite3", "bitmesh.sqlite3-wal", "bitmesh.sqlite3-shm"] {
        assert_eq!(mode(&data_dir.join(f)), 0o600, "{f} mode");
    }

    let programs = pinned_program_ids(ctl.pin_dir());
    assert!(!programs.is_empty(), "the first controller pinned no links");
    let bin = bitmesh_tests::process::bitmesh_bin().unwrap();
    let second_socket = ctl.dir().join("second.sock");
    let args: Vec<String> = [
        "run",
        "--iface",
        lab.gateway_if(),
        "--network",
        "regtest",
        "--hook",
        "tc",
        "--pin-dir",
        &ctl.pin_dir().display().to_string(),
        "--data-dir",
        &data_dir.display().to_string(),
        "--admin-socket",
        &second_socket.display().to_string(),
        "--api-port",
        &ctl.api_port().to_string(),
        "--rpc-url",
        &lab.relay.url(),
        "--rpc-cookie",
        &lab.node.cookie_path().display().to_string(),
        "--metrics-addr",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut child = in_netns_named(lab.gateway().name(), || {
        Ok(std::process::Command::new(&bin)
            .args(&args)
            .env("NO_COLOR", "1")
            // An operator's shell may ask for backtraces; the refusal must be one line anyway.
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?)
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut out).unwrap();
    let status = status.unwrap_or_else(|| panic!("the second run was still running after 20 s:\n{out}"));
    assert!(!status.success(), "the second run succeeded:\n{out}");
    assert_eq!(out.trim().lines().count(), 1, "the refusal is one line, got:\n{out}");
    assert!(out.contains("already"), "{out}");
    assert!(!second_socket.exists(), "the second run created its admin socket");
    assert_eq!(pinned_program_ids(ctl.pin_dir()), programs, "the second run replaced the first's programs");
    // The first controller still takes payments and raises credit.
    paid += Amount::from_sat(100);
    let ack = client.pay(paid).unwrap();
    assert_eq!(ack.total_paid, paid);
    assert!(ctl.running(), "first controller died");

    // Event streams: only on open channels, at most 3 per channel.
    let streams: Vec<(u16, TcpStream)> = (0..4).map(|_| open_event_stream(&client, &client.auth_header("events"))).collect();
    let codes: Vec<u16> = streams.iter().map(|(c, _)| *c).collect();
    assert_eq!(codes, [200, 200, 200, 429], "event streams per channel");
    // (Another device: one MAC holds one live channel.)
    let other = lab.add_client_identities(1, false).unwrap().remove(0);
    let mut unfunded = ScriptedClient::with_identity(lab.client_ns(), lab.api(), other);
    unfunded.open(200).unwrap();
    let (code, _) = open_event_stream(&unfunded, &unfunded.auth_header("events"));
    assert_eq!(code, 409, "an event stream on an unfunded offer");
    drop(streams);
}
