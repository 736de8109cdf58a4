//! The controller tests' lab: a `bitmesh run` process and what a test needs around it.
//!
//! * [`Controller`]: the lab's layer over [`ControllerProcess`] (start, wait-ready,
//!   `kill -9`, restart on the same data and pin directories, log, the operator CLI:
//!   all of that lives in [`crate::process`] and is reached through `Deref`). The lab
//!   layer only chooses the flags ([`ControllerOptions`]) and owns a temporary data
//!   directory and a pin directory, which live as long as the guard, across restarts.
//! * [`LoopbackRelay`]: makes a TCP service of the test's namespace (the regtest node
//!   on 127.0.0.1) reachable on 127.0.0.1 inside another namespace, so the controller
//!   reaches bitcoind exactly as on a Pi, and the test keeps calling the node directly.
//! * [`http`]: a tiny blocking HTTP/1.1 client (re-exported from [`crate::http`]).
//! * [`Lab`], [`ScriptedClient`], [`measure_controller`]: the lab itself, a client
//!   device driven by library calls, and the latency benchmark.
//!
//! The binary comes from [`crate::process::bitmesh_bin`]; the lab skips (a failure
//! under `CI=true`) when it is missing.

// Test harness: any failure here must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use crate::http;
use crate::env;
use crate::netns::{in_netns, in_netns_named, Netns, PinDir, ServerThread};
use crate::process::{bitmesh_bin_or_skip, ControllerProcess, OnDrop, RunSpec};

/// How to start a controller. [`ControllerOptions::new`] fills the test defaults.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Client-facing interface inside the namespace.
    pub iface: String,
    /// Port of the client API (listening on every address of the namespace).
    pub api_port: u16,
    /// Bitcoin Core RPC URL as seen from inside the namespace.
    pub rpc_url: String,
    /// Cookie file of the node.
    pub rpc_cookie: PathBuf,
    /// Upload hook (`auto`, `xdp`, `xdp-generic`, `tc`).
    pub hook: String,
    /// Further `run` flags (`--price-msat-per-mib`, `--payout-address`, ...).
    pub extra: Vec<String>,
}

impl ControllerOptions {
    /// Regtest, chain polled every second, snapshots every second, metrics off.
    pub fn new(iface: &str, rpc_url: &str, rpc_cookie: &Path) -> Self {
        Self {
            iface: iface.to_string(),
            api_port: 3141,
            rpc_url: rpc_url.to_string(),
            rpc_cookie: rpc_cookie.to_path_buf(),
            hook: "tc".into(),
            extra: Vec::new(),
        }
    }

    /// Add `run` flags.
    pub fn with(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|s| s.to_string()));
        self
    }
}

/// The lab's `bitmesh run` inside a namespace; killed (`kill -9`) on drop. Everything
/// about the process is [`ControllerProcess`] (through `Deref`); this layer owns the
/// data directory and the pin directory, which live as long as the guard.
pub struct Controller {
    // Dropped first: the process is killed before its directories go.
    process: ControllerProcess,
    /// The API port inside the namespace.
    pub api_port: u16,
    /// The admin socket (in the filesystem, shared with the test).
    pub admin_socket: PathBuf,
    /// Where the SQLite store and the seed live.
    pub data_dir: PathBuf,
    pins: PinDir,
    dir: tempfile::TempDir,
}

impl Controller {
    /// Start `bin run ...` inside `ns` and wait until the API and the admin socket answer.
    pub fn start(bin: &Path, ns: &Netns, opts: &ControllerOptions) -> Result<Controller> {
        let dir = tempfile::Builder::new().prefix("bitmesh-ctl-").tempdir()?;
        let pins = PinDir::new();
        let data_dir = dir.path().join("data");
        let admin_socket = dir.path().join("admin.sock");
        let mut flags: Vec<String> = ["--hook", opts.hook.as_str(), "--snapshot-interval-secs", "1"].map(String::from).into();
        flags.extend(opts.extra.iter().cloned());
        let process = ControllerProcess::start(RunSpec {
            bin: bin.to_path_buf(),
            netns: ns.name().to_string(),
            iface: opts.iface.clone(),
            pin_dir: pins.path().to_path_buf(),
            data_dir: data_dir.clone(),
            admin_socket: admin_socket.clone(),
            api_port: opts.api_port,
            rpc_url: opts.rpc_url.clone(),
            rpc_cookie: opts.rpc_cookie.clone(),
            flags,
            log: dir.path().join("controller.log"),
            on_drop: OnDrop::Kill,
        })?;
        Ok(Controller { process, api_port: opts.api_port, admin_socket, data_dir, pins, dir })
    }

    /// The bpffs directory the controller pins its maps and links in.
    pub fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    /// The temporary directory holding data dir, socket and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Deref for Controller {
    type Target = ControllerProcess;
    fn deref(&self) -> &ControllerProcess {
        &self.process
    }
}

impl DerefMut for Controller {
    fn deref_mut(&mut self) -> &mut ControllerProcess {
        &mut self.process
    }
}

/// Forwards `127.0.0.1:<port>` inside a namespace to `target` in the test's own
/// namespace (one thread per direction per connection). Stopped on drop; open
/// connections end when either side closes.
pub struct LoopbackRelay {
    /// The port on 127.0.0.1 inside the namespace.
    pub port: u16,
    _server: ServerThread,
}

impl LoopbackRelay {
    /// Listen on 127.0.0.1:`port` (0 = any) inside `ns`, forwarding to `target`.
    pub fn start(ns: &Netns, port: u16, target: SocketAddr) -> Result<LoopbackRelay> {
        // The listening socket belongs to the namespace it was created in; the
        // accepting thread (and the outgoing connections) stay in ours.
        let listener = in_netns(ns, || Ok(TcpListener::bind(("127.0.0.1", port))?))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let server = ServerThread::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inside, _)) => {
                        let _ = inside.set_nonblocking(false);
                        let Ok(outside) = TcpStream::connect(target) else { continue };
                        let _ = inside.set_nodelay(true);
                        let _ = outside.set_nodelay(true);
                        pump(inside, outside);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(LoopbackRelay { port, _server: server })
    }

    /// `http://127.0.0.1:<port>` (the URL to give the controller).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn pump(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Read);
        });
    };
    copy(a, b2);
    copy(b, a2);
}

/// Upstream side of the [`Lab`]: the "internet" beyond the gateway.
pub const UPSTREAM_GATEWAY_IPV4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 88, 0, 1);
/// The upstream host (UDP echo server).
pub const UPSTREAM_IPV4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 88, 0, 2);
/// UDP echo port on the upstream host.
pub const ECHO_PORT: u16 = 7777;

/// A UDP echo server on a socket created inside a namespace; stopped on drop.
pub struct UdpEcho {
    _server: ServerThread,
}

impl UdpEcho {
    /// Echo every datagram to `addr` (inside `ns`) back to its sender.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<UdpEcho> {
        let sock = in_netns(ns, || Ok(std::net::UdpSocket::bind(addr)?))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let server = ServerThread::spawn(move |stop| {
            let mut buf = [0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Ok(UdpEcho { _server: server })
    }
}

/// Everything a controller test needs, built and torn down as one guard:
/// client ns --veth (metered, 10.77.0.0/24)-- gateway ns --veth (10.88.0.0/24)-- upstream ns,
/// the gateway forwarding between them, a regtest node in the test's namespace
/// reachable from the gateway namespace on 127.0.0.1 through a [`LoopbackRelay`],
/// a UDP echo server upstream, and `bitmesh run` in the gateway namespace.
/// Field order is drop order: the controller dies first, the namespaces last.
pub struct Lab {
    /// The controller process.
    pub controller: Controller,
    /// bitcoind RPC inside the gateway namespace.
    pub relay: LoopbackRelay,
    /// The upstream echo server.
    pub echo: UdpEcho,
    /// The regtest node (RPC from the test's namespace).
    pub node: crate::bitcoind::Bitcoind,
    /// Gateway <-> upstream link (`a` in the gateway namespace).
    pub upstream_link: crate::netns::VethPair,
    /// Gateway and client namespaces and the metered link (`veth.a` = client-facing).
    pub topo: crate::netns::Topology,
    /// The upstream namespace.
    pub upstream: Netns,
    /// How many client identities [`Lab::add_client_identities`] made so far.
    identities: std::sync::atomic::AtomicU32,
}

impl Lab {
    /// Build the lab and start the controller with `extra` `run` flags (e.g. a
    /// price). `None` (after a skip notice; a failure under CI) when the machine
    /// cannot run it: no root, no bitmesh binary, no bitcoind.
    pub fn start(extra: &[&str]) -> Result<Option<Lab>> {
        Self::start_with(|o| o.with(extra))
    }

    /// Like [`Lab::start`], adjusting the controller options.
    pub fn start_with(adjust: impl FnOnce(ControllerOptions) -> ControllerOptions) -> Result<Option<Lab>> {
        if !env::is_root() {
            env::skip("controller tests need root (namespaces, BPF)");
            return Ok(None);
        }
        let Some(bin) = bitmesh_bin_or_skip() else { return Ok(None) };
        let Some(node) = crate::bitcoind::Bitcoind::start() else { return Ok(None) };
        let topo = crate::netns::Topology::new()?;
        let upstream = Netns::new()?;
        let upstream_link = crate::netns::VethPair::new(&topo.gateway, "02:77:00:00:01:01", &upstream, "02:88:00:00:00:02")?;
        topo.gateway.exec("sysctl", &["-qw", &format!("net.ipv6.conf.{}.disable_ipv6=1", upstream_link.a)])?;
        upstream.exec("sysctl", &["-qw", &format!("net.ipv6.conf.{}.disable_ipv6=1", upstream_link.b)])?;
        topo.gateway.ip(&["addr", "add", &format!("{UPSTREAM_GATEWAY_IPV4}/24"), "dev", &upstream_link.a])?;
        upstream.ip(&["addr", "add", &format!("{UPSTREAM_IPV4}/24"), "dev", &upstream_link.b])?;
        topo.gateway.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        topo.client.ip(&["route", "add", "default", "via", "10.77.0.1"])?;
        upstream.ip(&["route", "add", "default", "via", &UPSTREAM_GATEWAY_IPV4.to_string()])?;
        let echo = UdpEcho::start(&upstream, (UPSTREAM_IPV4, ECHO_PORT).into())?;
        let relay = LoopbackRelay::start(&topo.gateway, 0, ([127, 0, 0, 1], node.rpc_port).into())?;
        let opts = adjust(ControllerOptions::new(topo.gateway_if(), &relay.url(), &node.cookie_path()));
        let controller = Controller::start(&bin, &topo.gateway, &opts)?;
        Ok(Some(Lab { controller, relay, echo, node, upstream_link, topo, upstream, identities: Default::default() }))
    }

    /// The API address as the client sees it.
    pub fn api(&self) -> SocketAddr {
        (crate::netns::GATEWAY_IPV4, self.controller.api_port).into()
    }

    /// A UDP socket in the client namespace, connected to the upstream echo server.
    pub fn client_udp(&self) -> Result<std::net::UdpSocket> {
        let s = in_netns(&self.topo.client, || {
            let s = std::net::UdpSocket::bind("10.77.0.2:0")?;
            s.connect((UPSTREAM_IPV4, ECHO_PORT))?;
            Ok(s)
        })?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(s)
    }

    /// Wait until the controller's view of the tip (in `/v1/terms`) is the node's.
    pub fn wait_synced(&self) -> Result<()> {
        let want = self.node.tip();
        let client = ScriptedClient::new(&self.topo.client, self.api());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if client.terms()?.tip_height == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("controller did not see tip {want} within 20 s:\n{}", self.controller.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `bitmesh clients --json` row of the lab's client device.
    pub fn client_row(&self) -> Result<Option<serde_json::Value>> {
        Ok(self.controller.clients()?.into_iter().find(|r| r["mac"] == crate::netns::CLIENT_MAC))
    }

    /// Run `f` on a thread inside the client namespace (its sockets are the client's).
    pub fn as_client<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        in_netns(&self.topo.client, f)
    }
}

/// One more client device in the [`Lab`]'s client namespace: a macvlan interface on
/// the client's veth end, with its own MAC and IPv4 address on the gateway's link.
/// Made by [`Lab::add_client_identities`]; used by [`ScriptedClient::with_identity`]
/// and [`http::connect_from`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The macvlan interface in the client namespace.
    pub iface: String,
    /// Its MAC (`02:c2:..`), the one the gateway binds the channel to.
    pub mac: String,
    /// Its address, in 10.77.0.0/16 (10.77.1.2 onwards).
    pub ip: std::net::Ipv4Addr,
}

impl ClientIdentity {
    /// Identity number `k` (unique within a lab).
    fn numbered(k: u32) -> ClientIdentity {
        ClientIdentity {
            iface: format!("mc{k}"),
            mac: format!("02:c2:00:{:02x}:{:02x}:{:02x}", (k >> 16) & 0xff, (k >> 8) & 0xff, k & 0xff),
            ip: std::net::Ipv4Addr::new(10, 77, (1 + k / 250) as u8, (2 + k % 250) as u8),
        }
    }
}

impl Lab {
    /// Give the client namespace `n` more client devices ([`ClientIdentity`]), made in
    /// two `ip -batch` runs (1,000 take a few seconds). Everything lives in the lab's
    /// namespaces and goes with them.
    ///
    /// The client namespace answers ARP only on the interface that holds the asked
    /// address (`arp_ignore=1`, so the veth end never claims an identity's IP), has
    /// reverse-path filtering off, IPv6 off on the new interfaces (no DAD, MLD or router
    /// solicitations through the meter), and a permanent neighbour entry for the
    /// gateway on each identity. The gateway namespace gets an on-link route to
    /// 10.77.0.0/16 on its client-facing veth (its own address stays 10.77.0.1/24).
    ///
    /// With `pin_gateway_neighbours` the gateway's neighbour table also gets permanent
    /// IP -> MAC entries for the identities instead of learning them by ARP. Use it for
    /// hundreds of identities: dynamic neighbour entries count against the host-wide
    /// `gc_thresh3` (1,024 by default, shared by every namespace), permanent ones do not.
    pub fn add_client_identities(&self, n: usize, pin_gateway_neighbours: bool) -> Result<Vec<ClientIdentity>> {
        use std::sync::atomic::Ordering::Relaxed;
        let first = self.identities.fetch_add(n as u32, Relaxed);
        anyhow::ensure!(first as usize + n <= 250 * 250, "at most 62,500 client identities per lab");
        if first == 0 {
            self.topo.client.exec(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.conf.all.arp_ignore=1",
                    "net.ipv4.conf.all.arp_announce=2",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ],
            )?;
            self.topo.gateway.ip(&["route", "add", "10.77.0.0/16", "dev", self.topo.gateway_if(), "scope", "link"])?;
        }
        let ids: Vec<ClientIdentity> = (first..first + n as u32).map(ClientIdentity::numbered).collect();
        let lower = &self.topo.veth.b;
        let gw = crate::netns::GATEWAY_IPV4;
        let gw_mac = crate::netns::GATEWAY_MAC;
        let mut client = String::new();
        let mut gateway = String::new();
        for id in &ids {
            let ClientIdentity { iface, mac, ip } = id;
            client.push_str(&format!("link add link {lower} name {iface} address {mac} type macvlan mode bridge\n"));
            client.push_str(&format!("addr add {ip}/16 dev {iface}\n"));
            client.push_str(&format!("link set {iface} up\n"));
            client.push_str(&format!("neigh replace {gw} lladdr {gw_mac} dev {iface} nud permanent\n"));
            gateway.push_str(&format!("neigh replace {ip} lladdr {mac} dev {} nud permanent\n", self.topo.gateway_if()));
        }
        let batch = |ns: &Netns, text: &str| -> Result<()> {
            let mut file = tempfile::Builder::new().prefix("bitmesh-ip-batch-").tempfile()?;
            file.write_all(text.as_bytes())?;
            file.flush()?;
            ns.ip(&["-batch", &file.path().to_string_lossy()])?;
            Ok(())
        };
        batch(&self.topo.client, &client)?;
        if pin_gateway_neighbours {
            batch(&self.topo.gateway, &gateway)?;
        }
        Ok(ids)
    }

    /// Fund every client's offered channel with `capacity`, `per_tx` channels per
    /// funding transaction (one wallet coinbase each; keep `per_tx` <= 200 so a
    /// transaction stays under the gateway's 10,000-byte relay limit), broadcast
    /// straight to the node and confirmed by one block. Returns, per client in order,
    /// the transaction and output to announce with [`ScriptedClient::fund_with`]; the
    /// gateway then sees them confirmed and relays nothing.
    pub fn confirmed_funding(
        &self,
        wallet: &mut crate::bitcoind::CoinbaseWallet,
        clients: &[ScriptedClient],
        capacity: bitcoin::Amount,
        per_tx: usize,
    ) -> Result<Vec<(Arc<bitcoin::Transaction>, u32)>> {
        use bitmesh_channel::chain::Chain;
        let mut out = Vec::with_capacity(clients.len());
        for group in clients.chunks(per_tx.max(1)) {
            let outputs: Vec<bitcoin::TxOut> = group
                .iter()
                .map(|c| bitcoin::TxOut {
                    value: capacity,
                    script_pubkey: c.offer.as_ref().expect("open first").funding_script_pubkey.clone(),
                })
                .collect();
            let tx = Arc::new(wallet.pay_many(&outputs));
            self.node.rpc().broadcast(&tx).context("broadcasting a funding transaction")?;
            out.extend((0..group.len() as u32).map(|vout| (tx.clone(), vout)));
        }
        self.node.mine(1);
        self.wait_synced()?;
        Ok(out)
    }
}

/// Send `count` datagrams of `size` bytes through the gateway and count the echoes
/// that come back (waiting up to 100 ms for each).
pub fn udp_round_trips(sock: &std::net::UdpSocket, count: usize, size: usize) -> usize {
    let payload = vec![0x5a; size];
    let mut buf = vec![0u8; size + 64];
    let mut ok = 0;
    // Drain stragglers from an earlier burst.
    let _ = sock.set_nonblocking(true);
    while sock.recv(&mut buf).is_ok() {}
    let _ = sock.set_nonblocking(false);
    for _ in 0..count {
        if sock.send(&payload).is_err() {
            continue;
        }
        if matches!(sock.recv(&mut buf), Ok(n) if n == size) {
            ok += 1;
        }
    }
    ok
}

/// A client device driven by library calls: its own key, the channel library for
/// signing, and HTTP to the gateway's API from inside the client namespace.
pub struct ScriptedClient {
    /// The client's channel key.
    pub secret: bitcoin::secp256k1::SecretKey,
    /// Its public key.
    pub pubkey: bitcoin::PublicKey,
    /// Where the client's change goes.
    pub change_script: bitcoin::ScriptBuf,
    /// The gateway's offer, after [`Self::open`].
    pub offer: Option<bitmesh_common::wire::OpenResponse>,
    /// The funded channel, after [`Self::fund`].
    pub channel: Option<bitmesh_channel::Channel>,
    api: SocketAddr,
    netns: String,
    source: Option<ClientIdentity>,
}

impl ScriptedClient {
    /// A fresh key, talking to `api` from inside `client_ns`.
    pub fn new(client_ns: &Netns, api: SocketAddr) -> ScriptedClient {
        use bitcoin::secp256k1::{rand, Secp256k1, SecretKey};
        let secp = Secp256k1::new();
        let secret = SecretKey::new(&mut rand::thread_rng());
        let pubkey = bitcoin::PublicKey::new(secret.public_key(&secp));
        let change_script = bitcoin::ScriptBuf::new_p2wpkh(&pubkey.wpubkey_hash().unwrap());
        ScriptedClient {
            secret,
            pubkey,
            change_script,
            offer: None,
            channel: None,
            api,
            netns: client_ns.name().to_string(),
            source: None,
        }
    }

    /// A fresh key on its own device: every connection leaves from `identity`'s
    /// interface and IP (see [`Lab::add_client_identities`]), so the gateway binds its
    /// channel to that identity's MAC.
    pub fn with_identity(client_ns: &Netns, api: SocketAddr, identity: ClientIdentity) -> ScriptedClient {
        ScriptedClient { source: Some(identity), ..ScriptedClient::new(client_ns, api) }
    }

    /// The identity this client speaks from (`None`: the client namespace's own address).
    pub fn identity(&self) -> Option<&ClientIdentity> {
        self.source.as_ref()
    }

    /// One HTTP request from the client's namespace (and identity).
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Result<http::Response> {
        let api = self.api;
        let source = self.source.as_ref();
        in_netns_named(&self.netns, || http::request_from(source, api, method, path, headers, body))
    }

    /// POST a JSON body from the client's namespace (and identity).
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Result<http::Response> {
        let api = self.api;
        let source = self.source.as_ref();
        in_netns_named(&self.netns, || http::post_json_from(source, api, path, body))
    }

    /// Run `f` on one thread inside the client namespace (for timing loops).
    pub fn in_ns<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        in_netns_named(&self.netns, f)
    }

    /// The API address.
    pub fn api(&self) -> SocketAddr {
        self.api
    }

    /// `GET /v1/terms`.
    pub fn terms(&self) -> Result<bitmesh_common::wire::Terms> {
        let r = self.request("GET", "/v1/terms", &[], None)?;
        anyhow::ensure!(r.status == 200, "terms: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// Ask for a channel expiring `blocks` above the gateway's tip.
    pub fn open(&mut self, blocks: u32) -> Result<bitmesh_common::wire::OpenResponse> {
        let tip = self.terms()?.tip_height.to_consensus_u32();
        let req = bitmesh_common::wire::OpenRequest {
            client_pubkey: self.pubkey,
            expiry: bitcoin::absolute::Height::from_consensus(tip + blocks)?,
            client_change_script: self.change_script.clone(),
        };
        let r = self.post("/v1/channels", &serde_json::to_value(&req)?)?;
        anyhow::ensure!(r.status == 200, "open: {} {}", r.status, String::from_utf8_lossy(&r.body));
        let offer: bitmesh_common::wire::OpenResponse = serde_json::from_slice(&r.body)?;
        self.offer = Some(offer.clone());
        Ok(offer)
    }

    /// The funding transaction for `capacity` from `wallet` (not sent).
    pub fn funding_tx(&self, wallet: &mut crate::bitcoind::CoinbaseWallet, capacity: bitcoin::Amount) -> bitcoin::Transaction {
        let offer = self.offer.as_ref().expect("open first");
        wallet.pay(&offer.funding_script_pubkey, capacity, false)
    }

    /// Fund the offered channel with `capacity` from `wallet`, through the gateway's relay.
    pub fn fund(
        &mut self,
        wallet: &mut crate::bitcoind::CoinbaseWallet,
        capacity: bitcoin::Amount,
    ) -> Result<bitmesh_common::wire::ChannelStatus> {
        let tx = self.funding_tx(wallet, capacity);
        self.fund_with(&tx, 0)
    }

    /// Tell the gateway that output `vout` of `tx` funds the offered channel (the
    /// gateway relays `tx` if its node does not know it yet).
    pub fn fund_with(&mut self, tx: &bitcoin::Transaction, vout: u32) -> Result<bitmesh_common::wire::ChannelStatus> {
        let offer = self.offer.clone().expect("open first");
        let capacity = tx.output.get(vout as usize).context("no such funding output")?.value;
        let req = bitmesh_common::wire::FundRequest { channel_id: offer.channel_id, funding_tx: tx.clone(), funding_vout: vout };
        let r = self.post(&format!("/v1/channels/{}/funding", offer.channel_id), &serde_json::to_value(&req)?)?;
        anyhow::ensure!(r.status == 200, "fund: {} {}", r.status, String::from_utf8_lossy(&r.body));
        self.channel = Some(bitmesh_channel::Channel {
            script: bitmesh_channel::ChannelScript { gateway: offer.gateway_pubkey, client: self.pubkey, expiry: offer.expiry },
            funding_outpoint: bitcoin::OutPoint { txid: tx.compute_txid(), vout },
            capacity,
            client_change_script: self.change_script.clone(),
            min_first_payment: offer.min_first_payment,
        });
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// The channel id.
    pub fn channel_id(&self) -> bitmesh_common::wire::ChannelId {
        self.offer.as_ref().expect("open first").channel_id
    }

    /// A signed update paying a cumulative `total`.
    pub fn update(&self, total: bitcoin::Amount) -> bitmesh_common::wire::PaymentUpdate {
        let channel = self.channel.as_ref().expect("fund first");
        bitmesh_common::wire::PaymentUpdate {
            channel_id: self.channel_id(),
            total_paid: total,
            signature: bitmesh_channel::sign_update(channel, total, &self.secret).unwrap(),
        }
    }

    /// Send an update; the raw response.
    pub fn send(&self, update: &bitmesh_common::wire::PaymentUpdate) -> Result<http::Response> {
        self.post(&format!("/v1/channels/{}/payments", update.channel_id), &serde_json::to_value(update)?)
    }

    /// Pay a cumulative `total`; the acknowledgement (an error for anything else).
    pub fn pay(&self, total: bitcoin::Amount) -> Result<bitmesh_common::wire::PaymentAck> {
        let r = self.send(&self.update(total))?;
        anyhow::ensure!(r.status == 200, "pay {total}: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// Hex DER signature over `client_auth_digest(action, channel)` (the old,
    /// counterless form, which the gateway refuses).
    pub fn auth(&self, action: &str) -> String {
        use bitcoin::hex::DisplayHex;
        let digest = bitmesh_common::wire::client_auth_digest(action, &self.channel_id());
        let msg = bitcoin::secp256k1::Message::from_digest(digest);
        let sig = bitcoin::secp256k1::Secp256k1::new().sign_ecdsa(&msg, &self.secret);
        sig.serialize_der().to_lower_hex_string()
    }

    /// `X-BitMesh-Signature` value of a signed GET with an explicit counter:
    /// `<counter>.<hex DER signature over client_request_digest(action, channel, counter)>`.
    pub fn auth_at(&self, action: &str, counter: u64) -> String {
        use bitcoin::hex::DisplayHex;
        let digest = bitmesh_common::wire::client_request_digest(action, &self.channel_id(), counter);
        let msg = bitcoin::secp256k1::Message::from_digest(digest);
        let sig = bitcoin::secp256k1::Secp256k1::new().sign_ecdsa(&msg, &self.secret);
        format!("{counter}.{}", sig.serialize_der().to_lower_hex_string())
    }

    /// `X-BitMesh-Signature` value of a signed GET with a fresh counter (the agent's
    /// `max(now_ms, last + 1)`).
    pub fn auth_header(&self, action: &str) -> String {
        self.auth_at(action, bitmesh_client::http::next_counter())
    }

    /// `GET /v1/channels/{id}` (signed).
    pub fn status(&self) -> Result<bitmesh_common::wire::ChannelStatus> {
        let auth = self.auth_header("status");
        let r = self.request("GET", &format!("/v1/channels/{}", self.channel_id()), &[(bitmesh_common::wire::AUTH_HEADER, &auth)], None)?;
        anyhow::ensure!(r.status == 200, "status: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// A signed `CloseRequest` body with a fresh counter (single-use at the gateway).
    pub fn close_body(&self) -> serde_json::Value {
        let header = self.auth_header("close");
        let (counter, sig) = header.split_once('.').expect("counter.signature");
        serde_json::json!({ "channel_id": self.channel_id(), "counter": counter.parse::<u64>().expect("counter"), "signature": sig })
    }

    /// `POST /v1/channels/{id}/close` (signed).
    pub fn close(&self) -> Result<bitmesh_common::wire::CloseResponse> {
        let body = self.close_body();
        let r = self.post(&format!("/v1/channels/{}/close", self.channel_id()), &body)?;
        anyhow::ensure!(r.status == 200, "close: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(serde_json::from_slice(&r.body)?)
    }
}

/// Latency figures of a real controller (see [`measure_controller`]).
#[derive(Debug, Clone)]
pub struct ControllerLatency {
    /// Payment updates timed (client request sent -> acknowledgement received).
    pub payments: usize,
    /// Median payment round trip (HTTP over the client link, verify, synced
    /// SQLite commit, CREDIT raised, ack).
    pub payment_p50: Duration,
    /// 99th percentile of the same.
    pub payment_p99: Duration,
    /// Stalls timed (budget exhausted, top-up paid).
    pub stalls: usize,
    /// Median time from the top-up's acknowledgement to the first datagram echoed
    /// through the gateway (includes one UDP round trip over the veths).
    pub resume_p50: Duration,
    /// Slowest of the same.
    pub resume_max: Duration,
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Start a lab (controller, regtest node, namespaces), open and fund one channel,
/// then time `payments` durable payment updates over HTTP and `stalls` recoveries
/// from an exhausted budget. `None` when the machine cannot run it (skip notice
/// printed). For the benchmark binary: `bitmesh_tests::controller::measure_controller(500, 20)`.
pub fn measure_controller(payments: usize, stalls: usize) -> Result<Option<ControllerLatency>> {
    use bitcoin::Amount;
    let Some(lab) = Lab::start(&["--price-msat-per-mib", "8000000", "--rate-limit-per-min", "1000000", "--zero-conf-exposure-sat", "1000000"])? else {
        return Ok(None);
    };
    let mut wallet = crate::bitcoind::CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced()?;
    let mut client = ScriptedClient::new(&lab.topo.client, lab.api());
    let offer = client.open(200)?;
    client.fund(&mut wallet, Amount::from_sat(40_000))?;
    let mut total = offer.min_first_payment;
    client.pay(total)?;

    // Payment round trips: signatures made before the clock starts (client CPU is
    // not the gateway's latency); one TCP connection per update, as a client makes.
    let updates: Vec<_> = (1..=payments as u64).map(|i| client.update(total + Amount::from_sat(i))).collect();
    total += Amount::from_sat(payments as u64);
    let api = client.api();
    let mut lat = client.in_ns(|| {
        let mut lat = Vec::with_capacity(updates.len());
        for u in &updates {
            let body = serde_json::to_value(u)?;
            let path = format!("/v1/channels/{}/payments", u.channel_id);
            let t = Instant::now();
            let r = http::post_json(api, &path, &body)?;
            lat.push(t.elapsed());
            anyhow::ensure!(r.status == 200, "payment refused: {}", String::from_utf8_lossy(&r.body));
        }
        Ok(lat)
    })?;
    lat.sort();

    // Stall -> top-up -> traffic again.
    let udp = lab.client_udp()?;
    udp.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut resume = Vec::new();
    for _ in 0..stalls {
        let mut misses = 0;
        while misses < 3 {
            if udp_round_trips(&udp, 1, 200) == 0 {
                misses += 1;
            } else {
                misses = 0;
            }
        }
        total += Amount::from_sat(50);
        let update = client.update(total);
        let body = serde_json::to_value(&update)?;
        let path = format!("/v1/channels/{}/payments", update.channel_id);
        let r = client.in_ns(|| http::post_json(api, &path, &body))?;
        let acked = Instant::now();
        anyhow::ensure!(r.status == 200, "top-up refused: {}", String::from_utf8_lossy(&r.body));
        udp.set_read_timeout(Some(Duration::from_millis(2)))?;
        let deadline = acked + Duration::from_secs(2);
        loop {
            if udp_round_trips(&udp, 1, 200) == 1 {
                resume.push(acked.elapsed());
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "traffic did not resume within 2 s of the ack");
        }
        udp.set_read_timeout(Some(Duration::from_millis(20)))?;
    }
    resume.sort();
    Ok(Some(ControllerLatency {
        payments: lat.len(),
        payment_p50: percentile(&lat, 50),
        payment_p99: percentile(&lat, 99),
        stalls: resume.len(),
        resume_p50: if resume.is_empty() { Duration::ZERO } else { percentile(&resume, 50) },
        resume_max: resume.last().copied().unwrap_or_default(),
    }))
}
