//! Lightning test helpers: an ldk-node in the test process (a payer, or an LSPS2
//! provider) on the lab's regtest node, and a relay that lets such a node reach the
//! gateway's embedded node inside the gateway namespace.

// Test harness: any failure here must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::config::{AnchorChannelsConfig, Config};
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::lightning_invoice::Bolt11Invoice;
use ldk_node::liquidity::LSPS2ServiceConfig;
use ldk_node::payment::{PaymentDirection, PaymentStatus};
use ldk_node::{Builder, Event, Node};

use bitmesh_common::wire::{DeviceEvent, InvoicePaid};

use crate::chain::{pump_holding, Bitcoind};
use crate::client::ScriptedClient;
use crate::network::{in_netns_named, Netns, ServerThread};

/// Where the gateway's Lightning node listens inside its namespace, in the tests and
/// the demo (`--lightning-listen 127.0.0.1:9735`).
pub const GATEWAY_LN_PORT: u16 = 9735;

/// A buyer's Lightning wallet: an ldk-node in the test's own namespace, funded on the
/// regtest node, with a usable channel to the gateway's embedded node (through a relay
/// into the gateway namespace). What a phone user's wallet does when it scans the
/// page's invoice, or pays what `bitmesh pay --lightning` prints.
pub struct LightningWallet {
    /// The payer's node.
    pub node: TestNode,
    /// The way into the gateway namespace; [`IntoNetnsRelay::hold`] delays payments.
    pub relay: IntoNetnsRelay,
    /// The gateway node's id.
    pub gateway_id: String,
}

impl LightningWallet {
    /// Start, fund and connect a payer to the controller `ctl` (run with
    /// `--lightning --lightning-listen 127.0.0.1:GATEWAY_LN_PORT`): returns once both
    /// sides see a usable channel of 2,000,000 sat and the controller is at the tip.
    pub fn connect(world: &crate::testbed::Testbed, ctl: &crate::controller::Controller<'_>) -> Result<LightningWallet> {
        let info = ctl.cli_json(&["lightning"])?;
        let gateway_id = info["node_id"].as_str().context("the gateway's node id")?.to_owned();
        let relay = IntoNetnsRelay::start(world.gateway(), ([127, 0, 0, 1], GATEWAY_LN_PORT).into())?;
        let node = TestNode::start(&world.node, "wallet")?;
        node.fund(&world.node, 1)?;
        node.open_channel_to(&world.node, &format!("{gateway_id}@127.0.0.1:{}", relay.port), 2_000_000)?;
        wait_gateway_channel(ctl);
        world.wait_synced()?;
        Ok(LightningWallet { node, relay, gateway_id })
    }

    /// Pay `bolt11`; `Ok(true)` once the payment succeeded. Runs on a thread in the
    /// test's own namespace (where the node's peers are), so it may be called from
    /// any thread, a browser session's inside a client namespace included.
    pub fn pay(&self, bolt11: &str) -> Result<bool> {
        crate::browser::outside(|| self.node.pay(bolt11))?
    }
}

/// Wait until the gateway's node (`bitmesh lightning`) lists a usable channel.
pub fn wait_gateway_channel(ctl: &crate::controller::Controller<'_>) {
    crate::env::wait_for_true("the gateway's Lightning channel is usable", Duration::from_secs(60), || {
        ctl.cli_json(&["lightning"])
            .ok()
            .and_then(|v| v["channels"].as_array().map(|c| c.iter().any(|c| c["usable"] == true)))
            .unwrap_or(false)
    });
}

/// An ldk-node in the test's own namespace, on the test's regtest node.
pub struct TestNode {
    pub node: Arc<Node>,
    /// Where it listens (127.0.0.1 in the test namespace).
    pub port: u16,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn cookie(node: &Bitcoind) -> (String, String) {
    let text = std::fs::read_to_string(node.cookie_path()).unwrap();
    let (u, p) = text.trim().split_once(':').unwrap();
    (u.to_owned(), p.to_owned())
}

impl TestNode {
    /// A plain node (a payer).
    pub fn start(chain: &Bitcoind, alias: &str) -> Result<TestNode> {
        Self::start_with(chain, alias, |_| {})
    }

    /// A node acting as an LSPS2 provider (fee 0 ppm, no token).
    pub fn start_lsp(chain: &Bitcoind) -> Result<TestNode> {
        Self::start_with(chain, "lsp", |b| {
            b.set_liquidity_provider_lsps2(LSPS2ServiceConfig {
                require_token: None,
                advertise_service: false,
                channel_opening_fee_ppm: 0,
                channel_over_provisioning_ppm: 1_000_000,
                min_channel_opening_fee_msat: 0,
                min_channel_lifetime: 100,
                max_client_to_self_delay: 1024,
                min_payment_size_msat: 0,
                max_payment_size_msat: 100_000_000_000,
                client_trusts_lsp: true,
            });
        })
    }

    fn start_with(chain: &Bitcoind, alias: &str, adjust: impl FnOnce(&mut Builder)) -> Result<TestNode> {
        let dir = tempfile::Builder::new().prefix("bitmesh-ldk-").tempdir()?;
        let port = free_port();
        let config = Config {
            network: bitcoin::Network::Regtest,
            storage_dir_path: dir.path().to_string_lossy().into_owned(),
            anchor_channels_config: Some(AnchorChannelsConfig { trusted_peers_no_reserve: Vec::new(), per_channel_reserve_sats: 0 }),
            ..Config::default()
        };
        let mut b = Builder::from_config(config);
        let (user, pass) = cookie(chain);
        b.set_chain_source_bitcoind_rpc("127.0.0.1".into(), chain.rpc_port, user, pass);
        b.set_listening_addresses(vec![SocketAddress::from_str(&format!("127.0.0.1:{port}")).unwrap()])?;
        b.set_node_alias(alias.to_owned())?;
        adjust(&mut b);
        let node = b.build().context("building a test Lightning node")?;
        node.start().context("starting a test Lightning node")?;
        Ok(TestNode { node: Arc::new(node), port, _dir: dir })
    }

    /// `NODE_ID@127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("{}@127.0.0.1:{}", self.node.node_id(), self.port)
    }

    /// Give the node `blocks` coinbases (101 blocks make the first spendable) and
    /// wait until its wallet sees them.
    pub fn fund(&self, chain: &Bitcoind, blocks: u32) -> Result<()> {
        let addr = self.node.onchain_payment().new_address()?;
        let addr = bitcoin::Address::from_str(&addr.to_string()).unwrap().assume_checked();
        chain.mine_to(blocks, &addr);
        chain.mine(100);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.node.sync_wallets()?;
            if self.node.list_balances().spendable_onchain_balance_sats > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("test node saw no spendable funds within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Open a channel of `sat` to `peer` (`NODE_ID@HOST:PORT`), mine 6 blocks and
    /// wait until it is usable on this side.
    pub fn open_channel_to(&self, chain: &Bitcoind, peer: &str, sat: u64) -> Result<()> {
        let (id, addr) = peer.split_once('@').unwrap();
        let id = PublicKey::from_str(id).unwrap();
        let addr = SocketAddress::from_str(addr).unwrap();
        self.node.open_channel(id, addr, sat, None, None).context("opening a channel")?;
        self.wait_event("channel pending", Duration::from_secs(30), |e| matches!(e, Event::ChannelPending { .. }))?;
        chain.mine(6);
        self.wait_usable_channel(Duration::from_secs(60))
    }

    /// Wait until one of this node's channels is usable.
    pub fn wait_usable_channel(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let _ = self.node.sync_wallets();
            if self.node.list_channels().iter().any(|c| c.is_usable) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no usable channel within {timeout:?}: {:?}", self.node.list_channels());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait for an event matching `want` (others are acknowledged and dropped).
    pub fn wait_event(&self, what: &str, timeout: Duration, want: impl Fn(&Event) -> bool) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.node.next_event() {
                self.node.event_handled()?;
                if want(&e) {
                    return Ok(e);
                }
                continue;
            }
            if Instant::now() > deadline {
                bail!("no {what} event within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pay `bolt11` and wait for the outcome: `Ok(true)` paid, `Ok(false)` failed.
    pub fn pay(&self, bolt11: &str) -> Result<bool> {
        let inv = Bolt11Invoice::from_str(bolt11).context("parsing the invoice")?;
        let id = match self.node.bolt11_payment().send(&inv, None) {
            Ok(id) => id,
            Err(e) => {
                eprintln!("payer refused to send: {e}");
                return Ok(false);
            }
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(p) = self.node.payment(&id) {
                assert_eq!(p.direction, PaymentDirection::Outbound);
                match p.status {
                    PaymentStatus::Succeeded => return Ok(true),
                    PaymentStatus::Failed => return Ok(false),
                    PaymentStatus::Pending => {}
                }
            }
            while let Some(_e) = self.node.next_event() {
                self.node.event_handled()?;
            }
            if Instant::now() > deadline {
                bail!("payment still pending after 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Pay `bolt11` with `amount_msat` (more than asked: an overpayment).
    pub fn pay_amount(&self, bolt11: &str, amount_msat: u64) -> Result<bool> {
        let inv = Bolt11Invoice::from_str(bolt11)?;
        let id = self.node.bolt11_payment().send_using_amount(&inv, amount_msat, None)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(p) = self.node.payment(&id) {
                match p.status {
                    PaymentStatus::Succeeded => return Ok(true),
                    PaymentStatus::Failed => return Ok(false),
                    PaymentStatus::Pending => {}
                }
            }
            while self.node.next_event().is_some() {
                self.node.event_handled()?;
            }
            if Instant::now() > deadline {
                bail!("payment still pending after 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.node.stop();
    }
}

/// Forwards `127.0.0.1:<port>` in the test's namespace to `target` inside `ns`
/// (the reverse of [`crate::controller::LoopbackRelay`]): how a test node reaches
/// the gateway's Lightning node. Stopped on drop. [`IntoNetnsRelay::hold`] makes
/// what the test node sends wait in the relay (a slow path to the gateway).
pub struct IntoNetnsRelay {
    pub port: u16,
    hold: Arc<AtomicBool>,
    _server: ServerThread,
}

impl IntoNetnsRelay {
    /// Listen on a free port here, forwarding each connection to `target` in `ns`.
    pub fn start(ns: &Netns, target: std::net::SocketAddr) -> Result<IntoNetnsRelay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let ns_name = ns.name().to_string();
        let hold = Arc::new(AtomicBool::new(false));
        let held = hold.clone();
        let server = ServerThread::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((outside, _)) => {
                        let _ = outside.set_nonblocking(false);
                        // A socket made inside the namespace connects from there.
                        let Ok(inside) = in_netns_named(&ns_name, || Ok(TcpStream::connect(target)?)) else {
                            continue;
                        };
                        let _ = inside.set_nodelay(true);
                        let _ = outside.set_nodelay(true);
                        pump_holding(outside, inside, Some(held.clone()));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(IntoNetnsRelay { port, hold, _server: server })
    }

    /// While `on`, bytes from the test node towards the gateway wait in the relay
    /// (the gateway's answers still flow); released in order when set off.
    pub fn hold(&self, on: bool) {
        self.hold.store(on, Ordering::SeqCst);
    }
}

/// A device's event stream (`GET /v1/device/events`), opened over HTTP/1.0 (no
/// chunked encoding to undo) on a connection from `client`'s identity, read on a
/// thread: each event with the instant it arrived. Closed on drop.
pub struct DeviceEvents {
    rx: mpsc::Receiver<(Instant, DeviceEvent)>,
    conn: TcpStream,
}

impl DeviceEvents {
    /// Open the stream; `Err((status, body))` when the gateway refuses it.
    pub fn open(client: &ScriptedClient) -> Result<std::result::Result<DeviceEvents, (u16, String)>> {
        use std::io::Write;
        let mut conn = client.in_ns(|| crate::http::connect_from(client.identity(), client.api()))?;
        conn.write_all(b"GET /v1/device/events HTTP/1.0\r\nhost: gateway\r\naccept: text/event-stream\r\n\r\n")?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if conn.read(&mut byte)? == 0 {
                bail!("the gateway closed the event stream before its headers: {}", String::from_utf8_lossy(&head));
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
        if status != 200 {
            let mut body = String::new();
            let _ = conn.read_to_string(&mut body);
            return Ok(Err((status, body)));
        }
        conn.set_read_timeout(None)?;
        let mut reader = conn.try_clone()?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut parser = bitmesh_client::events::SseParser::default();
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                for &b in &buf[..n] {
                    if let Some(data) = parser.push(b) {
                        let ev: DeviceEvent = serde_json::from_str(&data).expect("a device event");
                        if tx.send((Instant::now(), ev)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Ok(DeviceEvents { rx, conn }))
    }

    /// The next event within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<(Instant, DeviceEvent)> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Wait for `invoice_paid` of `payment_hash` (other events are skipped).
    pub fn wait_paid(&self, payment_hash: &str, timeout: Duration) -> Result<(Instant, InvoicePaid)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some((at, DeviceEvent::InvoicePaid(p))) if p.payment_hash == payment_hash => return Ok((at, p)),
                Some(_) => continue,
                None => bail!("no invoice_paid for {payment_hash} within {timeout:?}"),
            }
        }
    }

    /// Every event that arrives within `within`.
    pub fn drain(&self, within: Duration) -> Vec<DeviceEvent> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while let Some((_, ev)) = self.next(deadline.saturating_duration_since(Instant::now())) {
            out.push(ev);
        }
        out
    }
}

impl Drop for DeviceEvents {
    fn drop(&mut self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
    }
}
