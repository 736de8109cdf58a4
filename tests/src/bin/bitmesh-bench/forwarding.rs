//! Forwarding rate through a gateway namespace over veth, TCP (iperf3), upload and
//! download, for: no program (the baseline), the BitMesh meter, and per-MAC rule
//! lists in iptables and nftables (the way captive portals meter today), at 1, 100
//! and 1,000 clients. The measured client's entry is last in the rule lists (rules
//! are matched in order); the meter's hash lookup does not care where it is.
//!
//! ```text
//! client ns --veth-- gateway ns (meter / rules on the client-facing end) --veth-- upstream ns (iperf3 -s)
//! ```

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bitmesh::meter::{Mac, UploadHook};
use bitmesh_common::pricing::ByteCount;
use bitmesh_tests::network::{in_netns, Netns, TestMeter, VethPair};

use crate::report::Report;

const CLIENT_COUNTS: [u32; 3] = [1, 100, 1_000];
const UPSTREAM_IP: &str = "10.78.0.2";

/// The three namespaces and two veth pairs. Field order: links before namespaces.
struct Topology {
    /// `a` in the client namespace, `b` (the metered, client-facing end) in the gateway.
    access: VethPair,
    _uplink: VethPair,
    client: Netns,
    gateway: Netns,
    upstream: Netns,
}

impl Topology {
    fn new() -> Result<Self> {
        let (client, gateway, upstream) = (Netns::new()?, Netns::new()?, Netns::new()?);
        let access = VethPair::new(&client, &client_mac(0).to_string(), &gateway, "02:be:00:00:00:01")?;
        let uplink = VethPair::new(&gateway, "02:be:00:00:01:01", &upstream, "02:ee:00:00:00:02")?;
        client.ip(&["addr", "add", "10.77.0.2/16", "dev", &access.a])?;
        gateway.ip(&["addr", "add", "10.77.0.1/16", "dev", &access.b])?;
        gateway.ip(&["addr", "add", "10.78.0.1/24", "dev", &uplink.a])?;
        upstream.ip(&["addr", "add", "10.78.0.2/24", "dev", &uplink.b])?;
        client.ip(&["route", "add", "default", "via", "10.77.0.1"])?;
        upstream.ip(&["route", "add", "10.77.0.0/16", "via", "10.78.0.1"])?;
        gateway.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        Ok(Self { access, _uplink: uplink, client, gateway, upstream })
    }

    /// TCP goodput in Gbit/s over `seconds`, client to upstream (`download` reverses it).
    fn iperf(&self, seconds: u32, download: bool) -> Result<f64> {
        let secs = seconds.to_string();
        let mut args = vec!["-c", UPSTREAM_IP, "-t", &secs, "-J"];
        if download {
            args.push("-R");
        }
        let mut last_err = None;
        for _ in 0..5 {
            let out = self.client.command("iperf3").args(&args).stdin(Stdio::null()).output()?;
            let json: serde_json::Value = match serde_json::from_slice(&out.stdout) {
                Ok(j) => j,
                Err(e) => {
                    last_err = Some(anyhow::anyhow!("iperf3 printed no JSON: {e}"));
                    std::thread::sleep(Duration::from_millis(300));
                    continue;
                }
            };
            if let Some(bps) = json["end"]["sum_received"]["bits_per_second"].as_f64() {
                return Ok(bps / 1e9);
            }
            last_err = Some(anyhow::anyhow!("iperf3: {}", json["error"]));
            std::thread::sleep(Duration::from_millis(300));
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("iperf3 failed")))
    }
}

/// The MAC of client number `i` (locally administered, unicast); 0 is the measured one.
fn client_mac(i: u32) -> Mac {
    let b = i.to_be_bytes();
    Mac([0x02, 0xc1, b[0], b[1], b[2], b[3]])
}

/// A child process killed on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Download rules match the client by IP: client `i` is 10.77.x.y, the measured one 10.77.0.2.
fn client_ip(i: u32) -> String {
    if i == 0 {
        "10.77.0.2".to_string()
    } else {
        format!("10.77.{}.{}", 1 + i / 250, 1 + i % 250)
    }
}

/// Client indices in rule order: the measured client (0) last.
fn rule_order(clients: u32) -> impl Iterator<Item = u32> {
    (1..clients).chain(std::iter::once(0))
}

fn pipe_into(mut cmd: Command, input: &str) -> Result<()> {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().context("no stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn nft_rules(iface: &str, clients: u32) -> String {
    let mut s = String::from("table inet bmbench {\n chain accounting {\n  type filter hook forward priority 0; policy drop;\n");
    for i in rule_order(clients) {
        let _ = writeln!(s, "  iifname \"{iface}\" ether saddr {} counter accept", client_mac(i));
    }
    for i in rule_order(clients) {
        let _ = writeln!(s, "  oifname \"{iface}\" ip daddr {} counter accept", client_ip(i));
    }
    s.push_str(" }\n}\n");
    s
}

fn iptables_rules(iface: &str, clients: u32) -> String {
    let mut s = String::from("*filter\n:FORWARD DROP [0:0]\n");
    for i in rule_order(clients) {
        let _ = writeln!(s, "-A FORWARD -i {iface} -m mac --mac-source {} -j ACCEPT", client_mac(i));
    }
    for i in rule_order(clients) {
        let _ = writeln!(s, "-A FORWARD -o {iface} -d {} -j ACCEPT", client_ip(i));
    }
    s.push_str("COMMIT\n");
    s
}

pub fn run(report: &mut Report, quick: bool) -> Result<()> {
    let seconds = if quick { 1 } else { 3 };
    let topo = Topology::new()?;
    let _server = ChildGuard(
        topo.upstream
            .command("iperf3")
            .args(["-s", "-B", UPSTREAM_IP])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 (apt-get install iperf3)")?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let directions = [("upload", false), ("download", true)];
    let mut baseline = [0.0; 2];
    for (d, (name, download)) in directions.iter().enumerate() {
        baseline[d] = topo.iperf(seconds, *download)?;
        report.forwarding("no program", 1, name, baseline[d], baseline[d]);
    }
    let iface = topo.access.b.clone();
    for clients in CLIENT_COUNTS {
        // BitMesh: the meter on the client-facing end, every client credited, with
        // each upload hook (on veth, native XDP gives up GRO for the upload path).
        for hook in [UploadHook::XdpNative, UploadHook::Tc] {
            let mut test_meter = TestMeter::load()?;
            for i in rule_order(clients) {
                test_meter.meter.maps_mut().add_client(client_mac(i))?;
                test_meter.meter.maps_mut().raise_credit(client_mac(i), ByteCount(u64::MAX / 4))?;
            }
            let meter = &mut test_meter.meter;
            in_netns(&topo.gateway, || Ok(meter.attach(&iface, hook)?))?;
            for (d, (name, download)) in directions.iter().enumerate() {
                let rate = topo.iperf(seconds, *download)?;
                report.forwarding(&format!("bitmesh meter ({hook} up, tc down)"), clients, name, rate, baseline[d]);
            }
            let used = test_meter.meter.maps().usage(client_mac(0))?.map(|u| u.used().0).unwrap_or(0);
            if used == 0 {
                bail!("the meter was attached but counted no bytes for the measured client");
            }
            let TestMeter { meter, pins, .. } = test_meter;
            meter.detach()?;
            drop(pins);
        }

        // nftables: one counter rule per client and direction.
        let mut nft = topo.gateway.command("nft");
        nft.args(["-f", "-"]);
        match pipe_into(nft, &nft_rules(&iface, clients)) {
            Ok(()) => {
                for (d, (name, download)) in directions.iter().enumerate() {
                    let rate = topo.iperf(seconds, *download)?;
                    report.forwarding("nftables per-MAC rules", clients, name, rate, baseline[d]);
                }
                topo.gateway.exec("nft", &["delete", "table", "inet", "bmbench"])?;
            }
            Err(e) => report.note("Skipped", format!("nftables at {clients} clients: {e}")),
        }

        // iptables (legacy xtables, as OpenWrt-era captive portals use).
        let mut ipt = topo.gateway.command("iptables-legacy-restore");
        ipt.arg("--noflush");
        match pipe_into(ipt, &iptables_rules(&iface, clients)) {
            Ok(()) => {
                for (d, (name, download)) in directions.iter().enumerate() {
                    let rate = topo.iperf(seconds, *download)?;
                    report.forwarding("iptables per-MAC rules", clients, name, rate, baseline[d]);
                }
                topo.gateway.exec("iptables-legacy", &["-F", "FORWARD"])?;
                topo.gateway.exec("iptables-legacy", &["-P", "FORWARD", "ACCEPT"])?;
            }
            Err(e) => report.note("Skipped", format!("iptables-legacy at {clients} clients: {e}")),
        }
    }
    Ok(())
}

/// The captive portal's cost on paid traffic: a credited client's TCP to port 80 (the
/// port the kernel classifies for interception) through the meter on TC, without and
/// with the controller's nftables table (`bitmesh_portal`), side by side. The ratio
/// row compares "with the table" against "meter alone" on the same port.
pub fn portal(report: &mut Report, quick: bool) -> Result<()> {
    let seconds = if quick { 1 } else { 3 };
    let topo = Topology::new()?;
    let _server = ChildGuard(
        topo.upstream
            .command("iperf3")
            .args(["-s", "-B", UPSTREAM_IP, "-p", "80"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 (apt-get install iperf3)")?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let iperf80 = |download: bool| -> Result<f64> {
        let secs = seconds.to_string();
        let mut args = vec!["-c", UPSTREAM_IP, "-p", "80", "-t", &secs, "-J"];
        if download {
            args.push("-R");
        }
        let out = topo.client.command("iperf3").args(&args).stdin(Stdio::null()).output()?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 printed no JSON")?;
        json["end"]["sum_received"]["bits_per_second"].as_f64().map(|b| b / 1e9).context("iperf3 gave no rate")
    };
    let directions = [("upload", false), ("download", true)];
    let mut bare = [0.0; 2];
    for (d, (name, download)) in directions.iter().enumerate() {
        bare[d] = iperf80(*download)?;
        report.forwarding("no program, port 80", 1, name, bare[d], bare[d]);
    }
    let iface = topo.access.b.clone();
    let mut test_meter = TestMeter::load()?;
    test_meter.meter.maps_mut().add_client(client_mac(0))?;
    test_meter.meter.maps_mut().raise_credit(client_mac(0), ByteCount(u64::MAX / 4))?;
    let meter = &mut test_meter.meter;
    in_netns(&topo.gateway, || Ok(meter.attach(&iface, UploadHook::Tc)?))?;
    // Several rounds, alternating, so drift on a shared machine hits both alike.
    let rounds = if quick { 1 } else { 5 };
    let mut sums = [[0.0; 2]; 2]; // [without, with][direction]
    for _ in 0..rounds {
        for (d, (_, download)) in directions.iter().enumerate() {
            sums[0][d] += iperf80(*download)?;
        }
        let mut table = in_netns(&topo.gateway, || {
            Ok(bitmesh::portal::NftTable::install(&iface, std::net::Ipv4Addr::new(10, 77, 0, 1), 3142)?)
        })?;
        for (d, (_, download)) in directions.iter().enumerate() {
            sums[1][d] += iperf80(*download)?;
        }
        in_netns(&topo.gateway, || Ok(table.remove()?))?;
    }
    for (d, (name, _)) in directions.iter().enumerate() {
        let (without, with) = (sums[0][d] / rounds as f64, sums[1][d] / rounds as f64);
        report.forwarding("bitmesh meter (tc), port 80", 1, name, without, bare[d]);
        report.forwarding("meter + portal nftables table, port 80", 1, name, with, bare[d]);
        report.note("Captive portal", format!("paid port-80 {name}: {with:.2} Gbit/s with the portal table vs {without:.2} without (ratio {:.3})", with / without));
    }
    let TestMeter { meter, pins, .. } = test_meter;
    meter.detach()?;
    drop(pins);
    Ok(())
}

