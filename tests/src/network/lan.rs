//! The testbed's network (docs/design.md section 8): a gateway namespace whose
//! client-facing bridge stands in for `wlan0`, client namespaces on it, and an
//! upstream namespace standing in for the internet.
//!
//! ```text
//!  client 0 (10.77.0.2) --veth--+
//!  client 1 (10.77.0.3) --veth--+-- bridge (10.77.0.1, the meter attaches here)
//!  ...                          |   gateway namespace: controller, forwarding,
//!  client N-1           --veth--+   NAT (nft masquerade) out of the uplink
//!                                   uplink 10.89.0.1 --veth-- 10.89.0.2 upstream namespace:
//!                                                             HTTP server, UDP echo
//! ```
//!
//! Client 0 is the device of the controller tests (`CLIENT_MAC`, `CLIENT_IPV4`, the
//! addresses the kernel tests use too); more devices on client 0's link are
//! [`ClientIdentity`] macvlans ([`Lan::add_client_identities`]). IPv6 is off in every
//! namespace: the tests count bytes, and autoconfiguration chatter would only add
//! noise. Everything lives in the namespaces made here and goes with them.

use std::io::Write;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

use super::{unique_name, Netns, VethPair, CLIENT_IPV4, CLIENT_MAC, GATEWAY_IPV4, GATEWAY_MAC};

/// The gateway's address towards the upstream namespace.
pub const UPSTREAM_GATEWAY_IPV4: Ipv4Addr = Ipv4Addr::new(10, 89, 0, 1);
/// The upstream host ("the internet": HTTP server and UDP echo).
pub const UPSTREAM_IPV4: Ipv4Addr = Ipv4Addr::new(10, 89, 0, 2);
/// Client namespaces a [`Lan`] can hold (addresses 10.77.0.2 ..= 10.77.0.201).
pub const MAX_CLIENTS: usize = 200;

/// The MAC of client `i` (client 0's is [`CLIENT_MAC`]).
pub fn client_mac(i: usize) -> String {
    let n = i + 2;
    format!("02:c1:00:00:{:02x}:{:02x}", n >> 8, n & 0xff)
}

/// The address of client `i` (client 0's is [`CLIENT_IPV4`]).
pub fn client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 2 + i as u8)
}

/// One client device with its own namespace.
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

/// One more client device in client 0's namespace: a macvlan interface on client 0's
/// link, with its own MAC and IPv4 address. Made by [`Lan::add_client_identities`];
/// used by `ScriptedClient::with_identity` and `http::connect_from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The macvlan interface in client 0's namespace.
    pub iface: String,
    /// Its MAC (`02:c2:..`), the one the gateway binds the channel to.
    pub mac: String,
    /// Its address, in 10.77.0.0/16 (10.77.1.2 onwards).
    pub ip: Ipv4Addr,
}

impl ClientIdentity {
    /// Identity number `k` (unique within a testbed).
    fn numbered(k: u32) -> ClientIdentity {
        ClientIdentity {
            iface: format!("mc{k}"),
            mac: format!("02:c2:00:{:02x}:{:02x}:{:02x}", (k >> 16) & 0xff, (k >> 8) & 0xff, k & 0xff),
            ip: Ipv4Addr::new(10, 77, (1 + k / 250) as u8, (2 + k % 250) as u8),
        }
    }
}

/// The namespaces and links of the picture above; removed on drop. Field order is
/// drop order: links first, then the namespaces.
pub struct Lan {
    veths: Vec<VethPair>,
    /// The clients.
    pub clients: Vec<ClientNs>,
    /// The gateway namespace.
    pub gateway: Netns,
    /// The upstream ("internet") namespace.
    pub upstream: Netns,
    /// The client-facing bridge in the gateway namespace (the meter's interface).
    pub bridge: String,
    /// How many client identities [`Lan::add_client_identities`] made so far.
    identities: AtomicU32,
}

fn sysctl(ns: &Netns, kv: &str) -> Result<()> {
    ns.exec("sysctl", &["-qw", kv]).map(|_| ())
}

fn ipv6_off(ns: &Netns) -> Result<()> {
    sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1")?;
    sysctl(ns, "net.ipv6.conf.default.disable_ipv6=1")
}

/// Run `ip -batch` with `text` inside `ns`.
fn ip_batch(ns: &Netns, text: &str) -> Result<()> {
    let mut file = tempfile::Builder::new().prefix("bitmesh-ip-batch-").tempfile()?;
    file.write_all(text.as_bytes())?;
    file.flush()?;
    ns.ip(&["-batch", &file.path().to_string_lossy()])?;
    Ok(())
}

impl Lan {
    /// Build the gateway, the upstream namespace and `n` (at least 1) clients.
    pub fn new(n: usize) -> Result<Lan> {
        assert!((1..=MAX_CLIENTS).contains(&n), "1 to {MAX_CLIENTS} clients");
        let mut lan = Lan {
            veths: Vec::new(),
            clients: Vec::new(),
            gateway: Netns::new()?,
            upstream: Netns::new()?,
            bridge: unique_name("br"),
            identities: AtomicU32::new(0),
        };
        lan.build_gateway()?;
        for i in 0..n {
            lan.add_client(i)?;
        }
        debug_assert_eq!((lan.clients[0].mac.as_str(), lan.clients[0].ip), (CLIENT_MAC, CLIENT_IPV4));
        Ok(lan)
    }

    /// The client-facing interface (where the meter attaches).
    pub fn gateway_if(&self) -> &str {
        &self.bridge
    }

    fn build_gateway(&mut self) -> Result<()> {
        let (gw, up) = (&self.gateway, &self.upstream);
        ipv6_off(gw)?;
        sysctl(gw, "net.ipv4.ip_forward=1")?;
        // A bridge's IPv4 must reach netfilter after the meter's TC ingress (which
        // marks captive-portal packets), not at the bridge layer (br_netfilter):
        // `bitmesh run` refuses to intercept otherwise. Per namespace; absent without
        // the br_netfilter module.
        let _ = sysctl(gw, "net.bridge.bridge-nf-call-iptables=0");
        gw.ip(&["link", "add", &self.bridge, "address", GATEWAY_MAC, "type", "bridge", "forward_delay", "0"])?;
        gw.ip(&["addr", "add", &format!("{GATEWAY_IPV4}/24"), "dev", &self.bridge])?;
        gw.ip(&["link", "set", &self.bridge, "up"])?;

        ipv6_off(up)?;
        let uplink = VethPair::new(gw, "02:a0:00:00:00:01", up, "02:a0:00:00:00:02")?;
        gw.ip(&["addr", "add", &format!("{UPSTREAM_GATEWAY_IPV4}/24"), "dev", &uplink.a])?;
        up.ip(&["addr", "add", &format!("{UPSTREAM_IPV4}/24"), "dev", &uplink.b])?;
        // Upstream reaches the client side through the gateway (as a routed ISP link
        // would), and NAT as on the Pi's eth0 makes the answers to the clients' own
        // connections need no such route.
        up.ip(&["route", "add", "default", "via", &UPSTREAM_GATEWAY_IPV4.to_string()])?;
        let ruleset = format!(
            "table ip bitmesh_testbed {{\n  chain post {{\n    type nat hook postrouting priority 100; policy accept;\n    oifname \"{}\" masquerade\n  }}\n}}\n",
            uplink.a
        );
        let mut file = tempfile::Builder::new().prefix("bitmesh-nat-").suffix(".nft").tempfile()?;
        file.write_all(ruleset.as_bytes())?;
        file.flush()?;
        gw.exec("nft", &["-f", &file.path().to_string_lossy()]).context("installing the NAT rule (nft)")?;
        self.veths.push(uplink);
        Ok(())
    }

    fn add_client(&mut self, i: usize) -> Result<()> {
        let ns = Netns::new()?;
        ipv6_off(&ns)?;
        let port_mac = format!("02:b1:00:00:{:02x}:{:02x}", i >> 8, i & 0xff);
        let mac = client_mac(i);
        let veth = VethPair::new(&self.gateway, &port_mac, &ns, &mac)?;
        self.gateway.ip(&["link", "set", &veth.a, "master", &self.bridge])?;
        let ip = client_ip(i);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", &veth.b])?;
        ns.ip(&["route", "add", "default", "via", &GATEWAY_IPV4.to_string()])?;
        let iface = veth.b.clone();
        self.veths.push(veth);
        self.clients.push(ClientNs { index: i, ns, iface, ip, mac });
        Ok(())
    }

    /// Give client 0's namespace `n` more client devices ([`ClientIdentity`]), made in
    /// two `ip -batch` runs (1,000 take a few seconds). Everything lives in the
    /// testbed's namespaces and goes with them.
    ///
    /// Client 0's namespace answers ARP only on the interface that holds the asked
    /// address (`arp_ignore=1`, so the veth end never claims an identity's IP), has
    /// reverse-path filtering off, and a permanent neighbour entry for the gateway on
    /// each identity. The gateway namespace gets an on-link route to 10.77.0.0/16 on
    /// its client-facing bridge (its own address stays 10.77.0.1/24).
    ///
    /// With `pin_gateway_neighbours` the gateway's neighbour table also gets permanent
    /// IP -> MAC entries for the identities instead of learning them by ARP. Use it for
    /// hundreds of identities: dynamic neighbour entries count against the host-wide
    /// `gc_thresh3` (1,024 by default, shared by every namespace), permanent ones do not.
    pub fn add_client_identities(&self, n: usize, pin_gateway_neighbours: bool) -> Result<Vec<ClientIdentity>> {
        let first = self.identities.fetch_add(n as u32, Ordering::Relaxed);
        anyhow::ensure!(first as usize + n <= 250 * 250, "at most 62,500 client identities per testbed");
        let client = &self.clients[0];
        if first == 0 {
            client.ns.exec(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.conf.all.arp_ignore=1",
                    "net.ipv4.conf.all.arp_announce=2",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
            self.gateway.ip(&["route", "add", "10.77.0.0/16", "dev", self.gateway_if(), "scope", "link"])?;
        }
        let ids: Vec<ClientIdentity> = (first..first + n as u32).map(ClientIdentity::numbered).collect();
        let lower = &client.iface;
        let mut on_client = String::new();
        let mut on_gateway = String::new();
        for id in &ids {
            let ClientIdentity { iface, mac, ip } = id;
            on_client.push_str(&format!("link add link {lower} name {iface} address {mac} type macvlan mode bridge\n"));
            on_client.push_str(&format!("addr add {ip}/16 dev {iface}\n"));
            on_client.push_str(&format!("link set {iface} up\n"));
            on_client.push_str(&format!("neigh replace {GATEWAY_IPV4} lladdr {GATEWAY_MAC} dev {iface} nud permanent\n"));
            on_gateway.push_str(&format!("neigh replace {ip} lladdr {mac} dev {} nud permanent\n", self.gateway_if()));
        }
        ip_batch(&client.ns, &on_client)?;
        if pin_gateway_neighbours {
            ip_batch(&self.gateway, &on_gateway)?;
        }
        Ok(ids)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Veths (and with them the bridge ports) go with the namespaces; the bridge too,
        // but say so explicitly rather than rely on the order of namespace deletion.
        let _ = self.gateway.ip(&["link", "del", &self.bridge]);
        self.veths.clear();
    }
}
