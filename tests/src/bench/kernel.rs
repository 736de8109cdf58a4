//! Kernel cost per frame through BPF_PROG_TEST_RUN, each meter path measured next
//! to an empty program of the same type in the same run (docs/design.md section 10).
//!
//! `cargo xtask bench` calls [`kernel_cost_per_frame`]; the `#[ignore]`d test
//! `bench` of the kernel tests prints the same table.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use bitmesh::meter::{Mac, MeterProgram};
use bitmesh_common::kernel::frames::Eth;
use bitmesh_common::kernel::{BucketParams, GardenLimits};
use bitmesh_common::pricing::ByteCount;

use crate::network::{TestMeter, CLIENT_IPV4, GATEWAY_IPV4};

/// One measured path.
#[derive(Clone, Debug)]
pub struct CostRow {
    /// Which verdict path: "paid", "paid (unbound)", "walled garden", "garden (no
    /// budget)", "drop (unpaid)".
    pub path: &'static str,
    /// The meter program measured.
    pub program: MeterProgram,
    /// Clients in the maps during the run.
    pub clients: u32,
    /// Mean ns per frame of the meter program.
    pub meter_ns: f64,
    /// Mean ns per frame of the empty program of the same type, same run.
    pub empty_ns: f64,
}

impl CostRow {
    /// Meter cost above the empty program, in ns per frame.
    pub fn overhead_ns(&self) -> f64 {
        self.meter_ns - self.empty_ns
    }
}

fn mac(n: u32) -> Mac {
    let b = n.to_be_bytes();
    Mac([0x02, 0xbe, b[0], b[1], b[2], b[3]])
}

/// Measure every path with `clients` paying clients in the maps, `repeat` runs
/// each (>= 1,000,000 for the published figures). Needs root.
pub fn kernel_cost_per_frame(repeat: u32, clients: u32) -> Result<Vec<CostRow>> {
    // The walled-garden budget runs (lookup, GCRA, add) but never runs out here, so
    // the garden rows keep passing for a million runs; a second meter without it
    // gives the "no budget" baseline of the same path.
    let unlimited = BucketParams { ns_per_byte: 1, burst_ns: u64::MAX / 4 };
    let mut t = TestMeter::load_with(|c| c.garden = GardenLimits { services: unlimited, payment: unlimited })?;
    let no_budget = TestMeter::load_with(|c| c.garden = GardenLimits::default())?;
    for n in 0..clients.max(1) {
        t.meter.maps_mut().add_client(mac(n)).context("populating clients")?;
        t.meter.maps_mut().raise_credit(mac(n), ByteCount(u64::MAX / 2)).context("populating clients")?;
        // Every paying client is bound to its address (the controller does so).
        t.meter.maps_mut().bind_source(mac(n), CLIENT_IPV4.into()).context("binding clients")?;
    }
    let paid = mac(clients.max(1) / 2);
    // One more paying client without a binding: the cost of the source check.
    let unbound = Mac([0x02, 0xdd, 0, 0, 0, 2]);
    t.meter.maps_mut().add_client(unbound).context("unbound client")?;
    t.meter.maps_mut().raise_credit(unbound, ByteCount(u64::MAX / 2)).context("unbound client")?;
    let stranger = Mac([0x02, 0xdd, 0, 0, 0, 1]);
    let gw_mac = [0x02, 0x77, 0, 0, 0, 1];
    let (cl, gw, net) = (CLIENT_IPV4.octets(), GATEWAY_IPV4.octets(), [93, 184, 216, 34]);
    let up = |m: Mac| Eth::new(m.0, gw_mac);
    let down = |m: Mac| Eth::new(gw_mac, m.0);
    // 1000-byte frames for the data paths, a small DNS query for the walled garden.
    let cases: Vec<(&'static str, MeterProgram, Vec<u8>)> = vec![
        ("paid", MeterProgram::XdpUpload, up(paid).ipv4_udp(cl, net, 5000, 5000, 958)),
        ("walled garden", MeterProgram::XdpUpload, up(stranger).ipv4_udp(cl, gw, 40000, 53, 40)),
        ("drop (unpaid)", MeterProgram::XdpUpload, up(stranger).ipv4_udp(cl, net, 5000, 5000, 958)),
        ("paid", MeterProgram::TcUpload, up(paid).ipv4_udp(cl, net, 5000, 5000, 958)),
        ("walled garden", MeterProgram::TcUpload, up(stranger).ipv4_udp(cl, gw, 40000, 53, 40)),
        ("drop (unpaid)", MeterProgram::TcUpload, up(stranger).ipv4_udp(cl, net, 5000, 5000, 958)),
        ("paid (unbound)", MeterProgram::XdpUpload, up(unbound).ipv4_udp(cl, net, 5000, 5000, 958)),
        ("paid (unbound)", MeterProgram::TcUpload, up(unbound).ipv4_udp(cl, net, 5000, 5000, 958)),
        ("paid", MeterProgram::TcDownload, down(paid).ipv4_udp(net, cl, 5000, 5000, 958)),
        ("walled garden", MeterProgram::TcDownload, down(stranger).ipv4_udp(gw, cl, 53, 40000, 100)),
        ("drop (unpaid)", MeterProgram::TcDownload, down(stranger).ipv4_udp(net, cl, 5000, 5000, 958)),
    ];
    let baseline: Vec<(&'static str, MeterProgram, Vec<u8>)> = vec![
        ("garden (no budget)", MeterProgram::XdpUpload, up(stranger).ipv4_udp(cl, gw, 40000, 53, 40)),
        ("garden (no budget)", MeterProgram::TcUpload, up(stranger).ipv4_udp(cl, gw, 40000, 53, 40)),
        ("garden (no budget)", MeterProgram::TcDownload, down(stranger).ipv4_udp(gw, cl, 53, 40000, 100)),
    ];
    let cases = cases.into_iter().map(|c| (&t, c)).chain(baseline.into_iter().map(|c| (&no_budget, c)));
    let mut rows = Vec::new();
    for (t, (path, program, frame)) in cases {
        let empty = if program.is_xdp() { MeterProgram::XdpEmpty } else { MeterProgram::TcEmpty };
        // Empty before and after, so drift during the run affects both sides alike.
        let e1 = t.meter.test_run(empty, &frame, repeat)?;
        let m = t.meter.test_run(program, &frame, repeat)?;
        let e2 = t.meter.test_run(empty, &frame, repeat)?;
        let expect_pass = path != "drop (unpaid)";
        anyhow::ensure!(m.passed == expect_pass, "{path} on {program:?}: unexpected verdict {}", m.return_value);
        rows.push(CostRow {
            path,
            program,
            clients: clients.max(1),
            meter_ns: m.duration.as_nanos() as f64,
            empty_ns: (e1.duration.as_nanos() + e2.duration.as_nanos()) as f64 / 2.0,
        });
    }
    Ok(rows)
}

/// The rows as a plain-text table.
pub fn format_table(rows: &[CostRow]) -> String {
    let mut out = String::from("program      path                clients  meter ns  empty ns  overhead ns\n");
    for r in rows {
        let _ = writeln!(
            out,
            "{:<12} {:<19} {:>7} {:>9.1} {:>9.1} {:>12.1}",
            format!("{:?}", r.program),
            r.path,
            r.clients,
            r.meter_ns,
            r.empty_ns,
            r.overhead_ns()
        );
    }
    out
}
