//! Load: many clients paying and moving bytes at once through a real `bitmesh run`
//! (a [`Testbed`]: namespaces, regtest node, the kernel meter on the client link).
//!
//! Each client is its own device ([`ClientIdentity`]: a macvlan with its own MAC and
//! IP). For the whole run every client repeats: pay the next step over HTTP (timed),
//! then push a burst of UDP datagrams through the gateway to the upstream echo server
//! and back, never more than the step just bought. At the end the books are checked
//! three ways: every acknowledged total is the one the store holds, the kernel's
//! CREDIT for every MAC is what the journal credited, and the kernel billed every
//! datagram sent exactly (`S + 42` bytes each way).
//!
//! Not a timed test: the latency figures are printed, and the assertions are about
//! money and bytes. `cargo xtask load` runs it with 200 clients for 60 s.

// Test harness: any failure here must fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bitcoin::Amount;
use bitmesh::meter::MeterMaps;
use bitmesh_common::kernel::Mac;
use bitmesh_common::pricing::{bytes_for_payment, PriceMsatPerMib};

use crate::chain::CoinbaseWallet;
use crate::client::ScriptedClient;
use crate::controller::ControllerOpts;
use crate::network::{in_netns_named, ClientIdentity, GATEWAY_IPV4, UPSTREAM_IPV4};
use super::percentile;
use crate::testbed::{Testbed, ECHO_PORT};

/// Price for the run: 1 sat buys 1 KiB, so each step's arithmetic is visible.
const PRICE_MSAT_PER_MIB: u64 = 1_000_000;
/// What each client pays per step, after its first payment.
const STEP: Amount = Amount::from_sat(80);
/// UDP payload per datagram.
const DATAGRAM: usize = 1000;
/// Datagrams per step: 32 x (1000 + 42) bytes up and the same down = 66,688 bytes,
/// under the 81,920 bytes one step buys.
const BURST: usize = 32;
/// Channel capacity per client (confirmed funding, 100 channels per transaction).
const CAPACITY: Amount = Amount::from_sat(60_000);
/// Client threads; each drives its share of the clients in turn.
const WORKERS: usize = 25;

/// What [`run_load`] measured.
#[derive(Debug, Clone)]
pub struct LoadFigures {
    pub clients: usize,
    pub duration: Duration,
    /// Payment updates acknowledged during the run (first payments included).
    pub payments: usize,
    /// Median and 99th percentile of one payment's HTTP round trip (durable commit
    /// and CREDIT raised before the answer).
    pub payment_p50: Duration,
    pub payment_p99: Duration,
    pub payment_max: Duration,
    /// Datagrams sent and echoed back through the gateway.
    pub datagrams_sent: u64,
    pub datagrams_echoed: u64,
    /// Bytes the kernel billed (up + down, every client).
    pub billed_bytes: u64,
}

/// One client device and what it has done.
struct Device {
    client: ScriptedClient,
    identity: ClientIdentity,
    netns: String,
    /// Last acknowledged cumulative total.
    acked: Amount,
    /// Payment updates acknowledged.
    acks: u64,
    sent: u64,
    echoed: u64,
    latencies: Vec<Duration>,
}

impl Device {
    /// Pay `total`; record the round trip. Any answer but 200 fails the run.
    fn pay(&mut self, total: Amount) -> Result<()> {
        let update = self.client.update(total);
        let started = Instant::now();
        let r = self.client.send(&update)?;
        let took = started.elapsed();
        ensure!(r.status == 200, "{}: payment of {total} refused: {} {}", self.identity.mac, r.status, r.text());
        self.latencies.push(took);
        self.acked = total;
        self.acks += 1;
        Ok(())
    }

    /// A UDP socket on this device's interface and address, connected to the echo server.
    fn udp(&self) -> Result<UdpSocket> {
        let (iface, ip) = (self.identity.iface.clone(), self.identity.ip);
        let sock = in_netns_named(&self.netns, move || {
            let s = UdpSocket::bind((ip, 0))?;
            bind_to_device(&s, &iface)?;
            s.connect(SocketAddr::from((UPSTREAM_IPV4, ECHO_PORT)))?;
            Ok(s)
        })?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(sock)
    }

    /// Send one burst and collect the echoes.
    fn burst(&mut self, sock: &UdpSocket) -> Result<()> {
        let payload = [0x42u8; DATAGRAM];
        let mut buf = [0u8; DATAGRAM + 64];
        for _ in 0..BURST {
            sock.send(&payload).with_context(|| format!("{}: send", self.identity.mac))?;
            self.sent += 1;
        }
        for _ in 0..BURST {
            match sock.recv(&mut buf) {
                Ok(_) => self.echoed += 1,
                Err(_) => break,
            }
        }
        Ok(())
    }
}

/// `SO_BINDTODEVICE`: the datagrams leave through the identity's macvlan, with its MAC.
fn bind_to_device(sock: &UdpSocket, iface: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let dev = iface.as_bytes();
    // SAFETY: setsockopt reads `dev.len()` bytes of the interface name we own.
    let rc = unsafe {
        libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_BINDTODEVICE, dev.as_ptr().cast(), dev.len() as libc::socklen_t)
    };
    ensure!(rc == 0, "SO_BINDTODEVICE {iface}: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Run `f` over `items` on `workers` threads (each gets a contiguous share).
fn parallel<T: Send>(items: &mut [T], workers: usize, f: impl Fn(&mut T) -> Result<()> + Sync) -> Result<()> {
    let per = items.len().div_ceil(workers.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = items.chunks_mut(per).map(|chunk| s.spawn(|| chunk.iter_mut().try_for_each(&f))).collect();
        handles.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("worker panicked"))?)
    })
}

/// `clients` devices open, fund (confirmed) and pay a first payment, then pay and move
/// bytes for `duration`; the books are checked at the end. `None` when the machine
/// cannot run it (skip notice printed; a failure under `CI=true`).
pub fn run_load(clients: usize, duration: Duration) -> Result<Option<LoadFigures>> {
    let price = PriceMsatPerMib::new(PRICE_MSAT_PER_MIB)?;
    let price_flag = PRICE_MSAT_PER_MIB.to_string();
    // Rate limits are per device; one device here pays about once a second.
    let Some(lab) = Testbed::start(1)? else { return Ok(None) };
    let controller = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", &price_flag]))?;
    let mut wallet = CoinbaseWallet::fund(&lab.node, clients.div_ceil(100) as u32 + 1, 0);
    lab.wait_synced()?;

    let ids = lab.add_client_identities(clients, true)?;
    // A route to the upstream network through each identity, so a socket bound to the
    // identity's interface reaches the echo server via the gateway.
    let mut routes = String::new();
    for (k, id) in ids.iter().enumerate() {
        routes.push_str(&format!(
            "route add {UPSTREAM_IPV4}/32 via {} dev {} metric {}\n",
            GATEWAY_IPV4,
            id.iface,
            100 + k
        ));
    }
    let mut file = tempfile::Builder::new().prefix("bitmesh-ip-batch-").tempfile()?;
    std::io::Write::write_all(&mut file, routes.as_bytes())?;
    lab.client_ns().ip(&["-batch", &file.path().to_string_lossy()])?;

    let netns = lab.client_ns().name().to_string();
    let mut scripted: Vec<ScriptedClient> =
        ids.iter().map(|id| ScriptedClient::with_identity(lab.client_ns(), lab.api(), id.clone())).collect();
    parallel(&mut scripted, WORKERS, |c| c.open(200).map(|_| ()))?;
    let funding = lab.confirmed_funding(&mut wallet, &scripted, CAPACITY, 100)?;
    let mut devices: Vec<Device> = Vec::with_capacity(clients);
    for ((mut client, identity), (tx, vout)) in scripted.into_iter().zip(ids).zip(funding) {
        client.fund_with(&tx, vout)?;
        devices.push(Device {
            client,
            identity,
            netns: netns.clone(),
            acked: Amount::ZERO,
            acks: 0,
            sent: 0,
            echoed: 0,
            latencies: Vec::new(),
        });
    }
    parallel(&mut devices, WORKERS, |d| {
        let first = d.client.offer.as_ref().expect("opened").min_first_payment;
        d.pay(first)
    })?;

    // The run: every worker cycles through its devices until the clock runs out.
    let started = Instant::now();
    let per = devices.len().div_ceil(WORKERS).max(1);
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = devices
            .chunks_mut(per)
            .map(|chunk| {
                s.spawn(move || -> Result<()> {
                    let socks: Vec<UdpSocket> = chunk.iter().map(Device::udp).collect::<Result<_>>()?;
                    while started.elapsed() < duration {
                        for (d, sock) in chunk.iter_mut().zip(&socks) {
                            let next = d.acked + STEP;
                            d.pay(next)?;
                            d.burst(sock)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("worker panicked"))?)
    })?;
    let ran = started.elapsed();
    // Echoes still in flight are billed on the way down; let them land.
    std::thread::sleep(Duration::from_millis(500));

    // The books, three ways.
    let channels = controller.channels()?;
    let maps = MeterMaps::open_pinned(controller.pin_dir())?;
    let mut billed = 0;
    for d in &devices {
        let id = d.client.channel_id().to_string();
        let row = channels
            .iter()
            .find(|c| c["id"] == id.as_str() || c["channel_id"] == id.as_str())
            .with_context(|| format!("channel {id} missing from `bitmesh channels`"))?;
        let paid = row["paid_sat"].as_u64().with_context(|| format!("no paid_sat in {row}"))?;
        ensure!(paid == d.acked.to_sat(), "{}: acknowledged {} but the store holds {paid} sat", d.identity.mac, d.acked);
        ensure!(row["payments"].as_u64() == Some(d.acks), "{}: {} acks but the store has {row}", d.identity.mac, d.acks);
        let mac: Mac = d.identity.mac.parse().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let kernel = maps.usage(mac)?.with_context(|| format!("{} not metered", d.identity.mac))?;
        let journal = bytes_for_payment(d.acked, price);
        ensure!(kernel.credited == journal, "{}: kernel CREDIT {:?} vs journal {:?}", d.identity.mac, kernel.credited, journal);
        let wire = (DATAGRAM as u64 + 42) * d.sent;
        ensure!(kernel.usage.up_bytes == wire, "{}: billed up {} for {} datagrams ({wire} bytes)", d.identity.mac, kernel.usage.up_bytes, d.sent);
        ensure!(kernel.usage.down_bytes <= wire, "{}: billed down {} > sent {wire}", d.identity.mac, kernel.usage.down_bytes);
        ensure!(kernel.usage.up_bytes + kernel.usage.down_bytes <= kernel.credited.to_u64(), "{}: used past its credit", d.identity.mac);
        billed += kernel.usage.up_bytes + kernel.usage.down_bytes;
    }
    let mut lat: Vec<Duration> = devices.iter().flat_map(|d| d.latencies.iter().copied()).collect();
    lat.sort();
    let sent: u64 = devices.iter().map(|d| d.sent).sum();
    let echoed: u64 = devices.iter().map(|d| d.echoed).sum();
    ensure!(echoed * 100 >= sent * 99, "only {echoed} of {sent} datagrams came back through the gateway");
    Ok(Some(LoadFigures {
        clients,
        duration: ran,
        payments: lat.len(),
        payment_p50: percentile(&lat, 50),
        payment_p99: percentile(&lat, 99),
        payment_max: lat.last().copied().unwrap_or_default(),
        datagrams_sent: sent,
        datagrams_echoed: echoed,
        billed_bytes: billed,
    }))
}
