//! The one harness of the controller tests, the end-to-end tests and the demo: a
//! [`Testbed`] puts together what the jobs below build, and starts the processes.
//!
//! * network ([`crate::network::Lan`]): the gateway namespace with its client-facing
//!   bridge, client namespaces on it, the upstream namespace behind NAT;
//! * chain ([`crate::chain`]): a regtest node in the test's own namespace, reachable
//!   from the gateway namespace on 127.0.0.1 through a [`LoopbackRelay`], so the
//!   controller reaches it as on a Pi and the test calls it directly;
//! * "the internet" ([`crate::upstream`]): an HTTP server and a UDP echo upstream;
//! * the controller process ([`Controller`], `bitmesh run` in the gateway namespace)
//!   and client processes ([`Agent`], `bitmesh pay` in a client namespace), each a
//!   guard that borrows the testbed, so the compiler makes them go first;
//! * HTTP ([`crate::http`]) and scripted clients ([`crate::client::ScriptedClient`])
//!   from inside the client namespaces.
//!
//! [`Testbed::start`] is `None` (after a skip notice; a failure under `CI=true`) when
//! the machine cannot run it: no root, no `bitmesh` binary, no bitcoind.

// Test harness: any failure here must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitcoin::secp256k1::{rand, Secp256k1, SecretKey};
use bitcoin::{Amount, CompressedPublicKey, Network, PrivateKey, ScriptBuf, Txid};
use bitmesh_channel::chain::Chain;
use bitmesh::meter::{ClientUsage, MeterMaps};
use serde_json::json;

use crate::chain::{Bitcoind, CoinbaseWallet, LoopbackRelay};
use crate::client::{Agent, AgentOpts, ScriptedClient};
use crate::controller::{Controller, ControllerOpts};
use crate::env;
use crate::http::{self, Fetch};
use crate::network::{in_netns, unique_name, ClientIdentity, Lan, Netns, PinDir, GATEWAY_IPV4, UPSTREAM_IPV4};
use crate::process::{bitmesh_bin_or_skip, own_process_groups};
use crate::upstream::{HttpServer, UdpEcho};

/// The controller's client API port (the walled-garden port).
pub const API_PORT: u16 = 3141;
/// The upstream HTTP server's port. Not 80: an unpaid client's port 80 is answered by
/// the gateway's captive portal (`tests/tests/portal.rs`), and these tests measure
/// what the meter passes and drops on plain traffic.
pub const UPSTREAM_HTTP_PORT: u16 = 8080;
/// The upstream UDP echo port.
pub const ECHO_PORT: u16 = 7777;

/// A client's funding for `bitmesh pay --fund-from`: the file and what it holds.
pub struct Funding {
    /// The JSON file.
    pub file: PathBuf,
    /// Its one UTXO's value.
    pub amount: Amount,
}

/// Namespaces, a regtest node, the upstream servers and a scratch directory, built
/// and torn down as one guard. Field order is drop order: the servers (their threads
/// hold sockets in the upstream namespace), the relay and the node, then the
/// namespaces, then the pin and scratch directories.
pub struct Testbed {
    /// The `bitmesh` binary the processes run.
    pub bin: PathBuf,
    _http: HttpServer,
    _echo: UdpEcho,
    /// bitcoind's RPC on 127.0.0.1 inside the gateway namespace.
    pub relay: LoopbackRelay,
    /// The regtest node (RPC from the test's namespace).
    pub node: Bitcoind,
    /// The namespaces and links.
    pub lan: Lan,
    pins: PinDir,
    dir: tempfile::TempDir,
}

impl Testbed {
    /// Build a testbed with `clients` client namespaces (at least 1), start the regtest
    /// node and the upstream servers. No controller runs yet
    /// ([`Self::start_controller`]).
    pub fn start(clients: usize) -> Result<Option<Testbed>> {
        if !env::is_root() {
            env::skip("testbed tests need root (namespaces, BPF): run with sudo or cargo xtask test");
            return Ok(None);
        }
        let Some(bin) = bitmesh_bin_or_skip() else { return Ok(None) };
        // In the demo the node gets its own process group, so that a Ctrl-C meant for
        // the demo does not stop it before the demo's guards stop everything in order.
        let Some(node) = Bitcoind::start_with(|cmd| {
            if own_process_groups() {
                cmd.process_group(0);
            }
        }) else {
            return Ok(None);
        };
        let dir = tempfile::Builder::new().prefix("bitmesh-testbed-").tempdir()?;
        let lan = Lan::new(clients)?;
        let relay = LoopbackRelay::start(&lan.gateway, 0, ([127, 0, 0, 1], node.rpc_port).into())?;
        let echo = UdpEcho::start(&lan.upstream, (UPSTREAM_IPV4, ECHO_PORT).into())?;
        let http = HttpServer::start(&lan.upstream, SocketAddrV4::new(UPSTREAM_IPV4, UPSTREAM_HTTP_PORT))?;
        Ok(Some(Testbed { bin, _http: http, _echo: echo, relay, node, lan, pins: PinDir::new(), dir }))
    }

    /// Start the controller (`bitmesh run`) in the gateway namespace; it is ready
    /// (API and admin socket answer) when this returns.
    pub fn start_controller(&self, opts: &ControllerOpts) -> Result<Controller<'_>> {
        Controller::start(self, opts)
    }

    /// Start a client agent (`bitmesh pay`) in client `i`'s namespace.
    pub fn start_agent(&self, i: usize, opts: &AgentOpts) -> Result<Agent<'_>> {
        Agent::start(self, i, opts)
    }

    /// Start `bitmesh pay --lightning` for client `i` (see [`Agent::invoices`]).
    pub fn start_lightning_agent(&self, i: usize, bundle: &str, max_spend_sat: u64, max_price_sat_per_mib: u64) -> Result<Agent<'_>> {
        Agent::start_lightning(self, i, bundle, max_spend_sat, max_price_sat_per_mib)
    }

    // --- where things are ---

    /// The gateway namespace.
    pub fn gateway(&self) -> &Netns {
        &self.lan.gateway
    }

    /// The client-facing interface (the bridge the meter attaches to).
    pub fn gateway_if(&self) -> &str {
        self.lan.gateway_if()
    }

    /// Client 0's namespace (the controller tests' client device and its identities).
    pub fn client_ns(&self) -> &Netns {
        &self.lan.clients[0].ns
    }

    /// The API address as the clients see it.
    pub fn api(&self) -> SocketAddr {
        (GATEWAY_IPV4, API_PORT).into()
    }

    /// The client API's base URL, as a client sees it.
    pub fn gateway_url(&self) -> String {
        format!("http://{GATEWAY_IPV4}:{API_PORT}")
    }

    /// The node's RPC URL as the controller sees it (through the relay).
    pub fn rpc_url(&self) -> String {
        self.relay.url()
    }

    /// The controller's pin directory (maps and links; survives controller restarts).
    pub fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    /// Scratch space: controller data dir, admin socket, client state, logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The controller's data directory (store and seed; survives controller restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// The controller's admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir().join("admin.sock")
    }

    /// The log every controller of this testbed appends to.
    pub fn controller_log(&self) -> PathBuf {
        self.dir().join("controller.log")
    }

    // --- clients ---

    /// Run `f` on a thread inside client 0's namespace (its sockets are the client's).
    pub fn as_client<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        in_netns(self.client_ns(), f)
    }

    /// A UDP socket in client 0's namespace, connected to the upstream echo server.
    pub fn client_udp(&self) -> Result<UdpSocket> {
        let ip = self.lan.clients[0].ip;
        let s = self.as_client(|| {
            let s = UdpSocket::bind((ip, 0))?;
            s.connect((UPSTREAM_IPV4, ECHO_PORT))?;
            Ok(s)
        })?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(s)
    }

    /// A scripted client with a fresh key on client 0's device.
    pub fn scripted_client(&self) -> ScriptedClient {
        ScriptedClient::new(self.client_ns(), self.api())
    }

    /// `n` more client devices in client 0's namespace (see
    /// [`Lan::add_client_identities`]).
    pub fn add_client_identities(&self, n: usize, pin_gateway_neighbours: bool) -> Result<Vec<ClientIdentity>> {
        self.lan.add_client_identities(n, pin_gateway_neighbours)
    }

    /// A command run inside client `i`'s namespace (`ip netns exec`, which also
    /// remounts /sys so the agent sees its own interface counters).
    pub fn client_command(&self, i: usize, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.lan.clients[i].ns.name()]).arg(program);
        c
    }

    /// Fetch `http://<upstream>/<bytes>` from client `i`: the body is `bytes` long.
    /// `timeout` bounds connecting and each silent gap between reads.
    pub fn fetch(&self, i: usize, bytes: u64, timeout: Duration) -> Fetch {
        http::fetch(&self.lan.clients[i].ns, SocketAddrV4::new(UPSTREAM_IPV4, UPSTREAM_HTTP_PORT), bytes, None, timeout)
    }

    /// Like [`Self::fetch`] over a link paced at `bytes_per_sec` (the server paces).
    pub fn fetch_paced(&self, i: usize, bytes: u64, bytes_per_sec: u64, timeout: Duration) -> Fetch {
        let server = SocketAddrV4::new(UPSTREAM_IPV4, UPSTREAM_HTTP_PORT);
        http::fetch(&self.lan.clients[i].ns, server, bytes, Some(bytes_per_sec), timeout)
    }

    /// GET `path` of the gateway's client API from client `i` (the walled garden),
    /// each read waiting at most `timeout`: status code and body.
    pub fn api_get(&self, i: usize, path: &str, timeout: Duration) -> Result<(u16, String)> {
        let api = self.api();
        let r = in_netns(&self.lan.clients[i].ns, || http::get_within(api, path, timeout))?;
        Ok((r.status, r.text()))
    }

    // --- chain ---

    /// Mine `n` blocks; returns the new tip height.
    pub fn mine(&self, n: u32) -> u32 {
        self.node.mine(n);
        self.tip()
    }

    /// The chain tip height.
    pub fn tip(&self) -> u32 {
        self.node.tip().to_consensus_u32()
    }

    /// Confirmations of `txid` (0 = in the mempool), or `None` if the node does not
    /// know it.
    pub fn confirmations(&self, txid: &Txid) -> Option<u32> {
        self.node
            .rpc()
            .call_raw("getrawtransaction", &[json!(txid.to_string()), json!(true)])
            .ok()
            .map(|v| v["confirmations"].as_u64().unwrap_or(0) as u32)
    }

    /// Wait until the controller's view of the tip (in `/v1/terms`) is the node's.
    pub fn wait_synced(&self) -> Result<()> {
        let want = self.node.tip();
        let client = self.scripted_client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if client.terms()?.tip_height == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "controller did not see tip {want} within 20 s:\n{}",
                    crate::process::log_tail(&self.controller_log(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Give `count` clients their own key and one confirmed P2WPKH output of `amount`
    /// each (paid from mature coinbases), written as `--fund-from` files.
    pub fn fund(&self, count: usize, amount: Amount) -> Result<Vec<Funding>> {
        let keys: Vec<SecretKey> = (0..count).map(|_| SecretKey::new(&mut rand::thread_rng())).collect();
        let secp = Secp256k1::new();
        let spks: Vec<ScriptBuf> = keys
            .iter()
            .map(|k| ScriptBuf::new_p2wpkh(&CompressedPublicKey(k.public_key(&secp)).wpubkey_hash()))
            .collect();
        let mut wallet = CoinbaseWallet::fund(&self.node, count as u32, 0);
        let txs: Vec<_> = spks.iter().map(|spk| wallet.pay(spk, amount, false)).collect();
        for tx in &txs {
            self.node.rpc().broadcast(tx).context("broadcasting a funding transaction")?;
        }
        self.node.mine(1);
        let mut out = Vec::new();
        for (i, ((key, spk), tx)) in keys.iter().zip(&spks).zip(&txs).enumerate() {
            let wif = PrivateKey::new(*key, Network::Regtest).to_wif();
            let body = json!({
                "keys": [wif],
                "utxos": [{
                    "outpoint": format!("{}:0", tx.compute_txid()),
                    "amount_sat": amount.to_sat(),
                    "script_pubkey": spk.to_hex_string(),
                }],
            });
            let n = unique_name("f");
            let file = self.dir().join(format!("funding-{i}-{n}.json"));
            std::fs::write(&file, serde_json::to_vec_pretty(&body)?)?;
            out.push(Funding { file, amount });
        }
        Ok(out)
    }

    /// Fund every scripted client's offered channel with `capacity`, `per_tx` channels
    /// per funding transaction (one wallet coinbase each; keep `per_tx` <= 200 so a
    /// transaction stays under the gateway's 10,000-byte relay limit), broadcast
    /// straight to the node and confirmed by one block. Returns, per client in order,
    /// the transaction and output to announce with [`ScriptedClient::fund_with`]; the
    /// gateway then sees them confirmed and relays nothing.
    pub fn confirmed_funding(
        &self,
        wallet: &mut CoinbaseWallet,
        clients: &[ScriptedClient],
        capacity: Amount,
        per_tx: usize,
    ) -> Result<Vec<(Arc<bitcoin::Transaction>, u32)>> {
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

    // --- kernel ---

    /// The kernel's own view of `mac` (CREDIT and USAGE), read from the pinned maps
    /// directly: the truth while no controller runs. `None` if not metered.
    pub fn kernel_usage(&self, mac: &str) -> Option<ClientUsage> {
        let maps = MeterMaps::open_pinned(self.pin_dir()).ok()?;
        maps.usage(mac.parse().ok()?).ok().flatten()
    }

    /// A "reboot" of the gateway: the pinned maps and links are gone (bpffs is empty
    /// after a reboot). The controller must be stopped first.
    pub fn wipe_pins(&self) {
        let _ = std::fs::remove_dir_all(self.pin_dir());
    }
}
