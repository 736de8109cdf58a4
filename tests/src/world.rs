//! The namespace world of docs/design.md section 8, for the end-to-end tests and the demo.
//!
//! ```text
//!  client 0 (10.88.0.10) --veth--+
//!  client 1 (10.88.0.11) --veth--+-- bridge (10.88.0.1, stands in for wlan0; the meter
//!  ...                           |   attaches here)      gateway namespace: controller,
//!  client N-1            --veth--+                        regtest bitcoind on 127.0.0.1,
//!                                                         NAT (nft masquerade) out of
//!                                 uplink 10.89.0.1 --veth-- 10.89.0.2:8080 upstream namespace:
//!                                                           HTTP server ("the internet")
//! ```
//!
//! Every resource is a guard: namespaces, veths, the bridge, the pin directory, the
//! regtest node, the HTTP server; processes (controller, client agents) are guards that
//! borrow the world, so the compiler makes them go first. Nothing outside the
//! namespaces created here is touched: bitcoind listens on the gateway namespace's own
//! loopback, and the harness makes its RPC calls from a thread inside that namespace.

// Test harness: a failure here must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod http;
mod procs;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use bitcoin::secp256k1::{rand, Secp256k1, SecretKey};
use bitcoin::{Amount, CompressedPublicKey, Network, PrivateKey, ScriptBuf, Txid};
use bitmesh::chain::Chain;
use bitmesh::meter::{ClientUsage, MeterMaps};
use serde_json::json;

pub use http::{Fetch, Upstream};
pub use procs::{Agent, AgentOpts, Controller, ControllerOpts};
pub use crate::process::{bitmesh_bin, use_own_process_groups};

use crate::bitcoind::{Bitcoind, CoinbaseWallet};
use crate::env;
use crate::netns::{in_netns, unique_name, Netns, PinDir, VethPair};
use crate::process::{bitmesh_bin_or_skip, own_process_groups};

/// The gateway's address on the client-facing bridge.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// The gateway's MAC on the bridge (fixed, so it does not follow the lowest port MAC).
pub const BRIDGE_MAC: &str = "02:b0:00:00:00:01";
/// The gateway's address towards the upstream namespace.
pub const UPLINK_GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 89, 0, 1);
/// The "internet": the upstream HTTP server's address.
pub const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(10, 89, 0, 2);
/// The upstream HTTP server's port. Not 80: an unpaid client's port 80 is answered by
/// the gateway's captive portal (tests/tests/portal.rs), and these tests measure
/// what the meter passes and drops on plain traffic.
pub const UPSTREAM_PORT: u16 = 8080;
/// The controller's client API port (the walled-garden port).
pub const API_PORT: u16 = 3141;
/// Clients the world can hold (addresses 10.88.0.10 ..= 10.88.0.249).
pub const MAX_CLIENTS: usize = 240;

/// The client API's base URL, as a client sees it.
pub fn gateway_url() -> String {
    format!("http://{GATEWAY_IP}:{API_PORT}")
}

/// Everything an end-to-end test needs, or `None` after [`env::skip`] saying what is
/// missing (root, the bitmesh binary, bitcoind).
pub fn preflight() -> Option<PathBuf> {
    if !env::is_root() {
        env::skip("end-to-end tests need root (namespaces, BPF): run with sudo or cargo xtask test");
        return None;
    }
    let bin = bitmesh_bin_or_skip()?;
    if !crate::bitcoind::binaries().0.exists() {
        env::skip("bitcoind not built: run cargo xtask bitcoind");
        return None;
    }
    Some(bin)
}

pub use crate::env::wait_until;

/// One client: its namespace, its interface there, address and MAC.
pub struct ClientNs {
    /// Index (0-based).
    pub index: usize,
    /// Its namespace.
    pub ns: Netns,
    /// Its interface (the client end of the veth; the other end is a bridge port).
    pub iface: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: String,
}

/// The MAC of client `i`.
pub fn client_mac(i: usize) -> String {
    format!("02:c0:00:00:{:02x}:{:02x}", i >> 8, i & 0xff)
}

/// The address of client `i`.
pub fn client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 88, 0, 10 + i as u8)
}

/// A client's funding: the `--fund-from` file and what it holds.
pub struct Funding {
    /// The JSON file for `bitmesh pay --fund-from`.
    pub file: PathBuf,
    /// Its one UTXO's value.
    pub amount: Amount,
}

/// The whole namespace world. Drop order is explicit in `Drop`.
pub struct World {
    /// The `bitmesh` binary the processes run.
    pub bin: PathBuf,
    /// The gateway namespace.
    pub gateway: Netns,
    /// The upstream ("internet") namespace.
    pub upstream: Netns,
    /// The clients.
    pub clients: Vec<ClientNs>,
    /// The client-facing bridge in the gateway namespace (the meter's interface).
    pub bridge: String,
    /// Pin directory of the controller's maps and links.
    pub pins: PinDir,
    node: Option<Bitcoind>,
    http: Option<Upstream>,
    veths: Vec<VethPair>,
    /// Scratch space: controller data dir, admin socket, client state, logs.
    pub dir: tempfile::TempDir,
}

impl World {
    /// Build the world with `n` clients, start the regtest node in the gateway
    /// namespace and the HTTP server upstream.
    pub fn new(bin: PathBuf, n: usize) -> Result<World> {
        assert!(n <= MAX_CLIENTS, "at most {MAX_CLIENTS} clients");
        let dir = tempfile::Builder::new().prefix("bitmesh-world-").tempdir()?;
        let gateway = Netns::new()?;
        let upstream = Netns::new()?;
        let bridge = unique_name("br");
        let mut world = World {
            bin,
            gateway,
            upstream,
            clients: Vec::new(),
            bridge,
            pins: PinDir::new(),
            node: None,
            http: None,
            veths: Vec::new(),
            dir,
        };
        world.build_gateway()?;
        for i in 0..n {
            world.add_client(i)?;
        }
        world.start_node()?;
        world.http = Some(Upstream::start(&world.upstream, SocketAddrV4::new(UPSTREAM_IP, UPSTREAM_PORT))?);
        Ok(world)
    }

    fn sysctl(ns: &Netns, kv: &str) -> Result<()> {
        ns.exec("sysctl", &["-qw", kv]).map(|_| ())
    }

    fn build_gateway(&mut self) -> Result<()> {
        let gw = &self.gateway;
        // IPv6 off everywhere: the tests count bytes, and router/neighbour chatter from
        // autoconfiguration would only add noise (the walled garden passes it anyway).
        Self::sysctl(gw, "net.ipv6.conf.all.disable_ipv6=1")?;
        Self::sysctl(gw, "net.ipv6.conf.default.disable_ipv6=1")?;
        Self::sysctl(gw, "net.ipv4.ip_forward=1")?;
        // A bridge's IPv4 must reach netfilter after the meter's TC ingress (which
        // marks captive-portal packets), not at the bridge layer (br_netfilter):
        // `bitmesh run` refuses to intercept otherwise. Per namespace; absent without
        // the br_netfilter module.
        let _ = Self::sysctl(gw, "net.bridge.bridge-nf-call-iptables=0");
        gw.ip(&["link", "add", &self.bridge, "address", BRIDGE_MAC, "type", "bridge", "forward_delay", "0"])?;
        gw.ip(&["addr", "add", &format!("{GATEWAY_IP}/24"), "dev", &self.bridge])?;
        gw.ip(&["link", "set", &self.bridge, "up"])?;

        let up = &self.upstream;
        Self::sysctl(up, "net.ipv6.conf.all.disable_ipv6=1")?;
        Self::sysctl(up, "net.ipv6.conf.default.disable_ipv6=1")?;
        let uplink = VethPair::new(gw, "02:a0:00:00:00:01", up, "02:a0:00:00:00:02")?;
        gw.ip(&["addr", "add", &format!("{UPLINK_GATEWAY_IP}/24"), "dev", &uplink.a])?;
        up.ip(&["addr", "add", &format!("{UPSTREAM_IP}/24"), "dev", &uplink.b])?;
        // NAT as on the Pi's eth0: upstream sees only the gateway's address, so it
        // needs no route back to the client subnet.
        let ruleset = format!(
            "table ip bitmesh_world {{\n  chain post {{\n    type nat hook postrouting priority 100; policy accept;\n    oifname \"{}\" masquerade\n  }}\n}}\n",
            uplink.a
        );
        let file = self.dir.path().join("nat.nft");
        std::fs::write(&file, ruleset)?;
        gw.exec("nft", &["-f", file.to_str().unwrap()]).context("installing the NAT rule (nft)")?;
        self.veths.push(uplink);
        Ok(())
    }

    fn add_client(&mut self, i: usize) -> Result<()> {
        let ns = Netns::new()?;
        Self::sysctl(&ns, "net.ipv6.conf.all.disable_ipv6=1")?;
        Self::sysctl(&ns, "net.ipv6.conf.default.disable_ipv6=1")?;
        let port_mac = format!("02:b1:00:00:{:02x}:{:02x}", i >> 8, i & 0xff);
        let mac = client_mac(i);
        let veth = VethPair::new(&self.gateway, &port_mac, &ns, &mac)?;
        self.gateway.ip(&["link", "set", &veth.a, "master", &self.bridge])?;
        let ip = client_ip(i);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", &veth.b])?;
        ns.ip(&["route", "add", "default", "via", &GATEWAY_IP.to_string()])?;
        let iface = veth.b.clone();
        self.veths.push(veth);
        self.clients.push(ClientNs { index: i, ns, iface, ip, mac });
        Ok(())
    }

    fn start_node(&mut self) -> Result<()> {
        // Started from a thread inside the gateway namespace: the node's 127.0.0.1 is
        // that namespace's loopback, where the controller finds it.
        let node = in_netns(&self.gateway, || {
            let node = Bitcoind::start_with(|cmd| {
                if own_process_groups() {
                    cmd.process_group(0);
                }
            })
            .context("bitcoind is not built (cargo xtask bitcoind)")?;
            Ok(node)
        })?;
        self.node = Some(node);
        Ok(())
    }

    /// Run `f` with the regtest node, on a thread inside the gateway namespace (where
    /// its RPC port is reachable).
    pub fn with_node<T: Send>(&self, f: impl FnOnce(&Bitcoind) -> T + Send) -> T {
        let node = self.node.as_ref().expect("node running");
        in_netns(&self.gateway, || Ok(f(node))).expect("RPC thread in the gateway namespace")
    }

    /// The node's RPC port (on the gateway namespace's loopback).
    pub fn rpc_port(&self) -> u16 {
        self.node.as_ref().expect("node running").rpc_port
    }

    /// The node's RPC cookie file.
    pub fn rpc_cookie(&self) -> PathBuf {
        self.node.as_ref().expect("node running").cookie_path()
    }

    /// Mine `n` blocks; returns the new tip height.
    pub fn mine(&self, n: u32) -> u32 {
        self.with_node(|node| {
            node.mine(n);
            node.tip().to_consensus_u32()
        })
    }

    /// The chain tip height.
    pub fn tip(&self) -> u32 {
        self.with_node(|node| node.tip().to_consensus_u32())
    }

    /// Confirmations of `txid` (0 = in the mempool), or `None` if the node does not
    /// know it.
    pub fn confirmations(&self, txid: &Txid) -> Option<u32> {
        self.with_node(|node| {
            node.rpc()
                .call_raw("getrawtransaction", &[json!(txid.to_string()), json!(true)])
                .ok()
                .map(|v| v["confirmations"].as_u64().unwrap_or(0) as u32)
        })
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
        let txs = self.with_node(|node| {
            let mut wallet = CoinbaseWallet::fund(node, count as u32, 0);
            let txs: Vec<_> = spks.iter().map(|spk| wallet.pay(spk, amount, false)).collect();
            for tx in &txs {
                node.rpc().broadcast(tx).unwrap();
            }
            node.mine(1);
            txs
        });
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
            let file = self.dir.path().join(format!("funding-{i}-{n}.json"));
            std::fs::write(&file, serde_json::to_vec_pretty(&body)?)?;
            out.push(Funding { file, amount });
        }
        Ok(out)
    }

    /// Fetch `http://<upstream>/<bytes>` from client `i`: the body is `bytes` long.
    /// `timeout` bounds connecting and each silent gap between reads.
    pub fn fetch(&self, i: usize, bytes: u64, timeout: Duration) -> Fetch {
        http::fetch(&self.clients[i].ns, SocketAddrV4::new(UPSTREAM_IP, UPSTREAM_PORT), bytes, None, timeout)
    }

    /// Like [`Self::fetch`] over a link paced at `bytes_per_sec` (the server paces).
    pub fn fetch_paced(&self, i: usize, bytes: u64, bytes_per_sec: u64, timeout: Duration) -> Fetch {
        let server = SocketAddrV4::new(UPSTREAM_IP, UPSTREAM_PORT);
        http::fetch(&self.clients[i].ns, server, bytes, Some(bytes_per_sec), timeout)
    }

    /// GET `path` of the gateway's client API from client `i` (the walled garden).
    pub fn api_get(&self, i: usize, path: &str, timeout: Duration) -> Result<(u16, String)> {
        http::get(&self.clients[i].ns, SocketAddrV4::new(GATEWAY_IP, API_PORT), path, timeout)
    }

    /// A command run inside client `i`'s namespace (`ip netns exec`, which also
    /// remounts /sys so the agent sees its own interface counters).
    pub fn client_command(&self, i: usize, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.clients[i].ns.name()]).arg(program);
        c
    }

    /// The controller's data directory (store and seed); survives controller restarts.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("gateway")
    }

    /// The controller's admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// Start the controller (`bitmesh run`) in the gateway namespace.
    pub fn start_controller(&self, opts: &ControllerOpts) -> Result<Controller<'_>> {
        Controller::start(self, opts)
    }

    /// Start a client agent (`bitmesh pay`) in client `i`'s namespace.
    pub fn start_agent(&self, i: usize, opts: &AgentOpts) -> Result<Agent<'_>> {
        Agent::start(self, i, opts)
    }

    /// The kernel's own view of `mac` (CREDIT and USAGE), read from the pinned maps
    /// directly: the truth while no controller runs. `None` if not metered.
    pub fn kernel_usage(&self, mac: &str) -> Option<ClientUsage> {
        let maps = MeterMaps::open_pinned(self.pins.path()).ok()?;
        maps.usage(mac.parse().ok()?).ok().flatten()
    }

    /// A "reboot" of the gateway: the pinned maps and links are gone (bpffs is empty
    /// after a reboot). The controller must be stopped first.
    pub fn wipe_pins(&self) {
        let _ = std::fs::remove_dir_all(self.pins.path());
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Processes borrow the world, so they are gone already. The HTTP server first
        // (its threads hold sockets in the upstream namespace), then the node, stopped
        // from inside its namespace (where its RPC answers, so it stops at once).
        drop(self.http.take());
        if let Some(node) = self.node.take() {
            let _ = in_netns(&self.gateway, move || {
                drop(node);
                Ok(())
            });
        }
        // Veths (and with them the bridge ports) go with the namespaces; the bridge too.
        let _ = self.gateway.ip(&["link", "del", &self.bridge]);
        self.veths.clear();
        // Namespaces and the pin directory drop as fields.
    }
}
