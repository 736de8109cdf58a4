//! Kernel cost per frame: each meter program against the empty program of the same
//! hook type, on the same frame, in the same run, at 10 and 10,000 clients.

use anyhow::Result;
use bitmesh::meter::MeterProgram;
use bitmesh_common::kernel::frames::Eth;
use bitmesh_common::kernel::Mac;
use bitmesh_common::pricing::ByteCount;

use bitmesh_tests::netns::TestMeter;

use crate::report::Report;

const GATEWAY_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 1];
const STRANGER_MAC: [u8; 6] = [0x02, 0xee, 0xee, 0xee, 0xee, 0xee];

/// The MAC of client number `i` (locally administered, unicast).
pub fn client_mac(i: u32) -> Mac {
    let b = i.to_be_bytes();
    Mac([0x02, 0xc1, b[0], b[1], b[2], b[3]])
}

pub fn run(report: &mut Report, repeat: u32) -> Result<()> {
    for clients in [10u32, 10_000] {
        let TestMeter { mut meter, pins, .. } = TestMeter::load()?;
        for i in 0..clients {
            // Enough credit that a million repeats never exhaust it.
            meter.maps_mut().raise_credit(client_mac(i), ByteCount(u64::MAX / 4))?;
        }
        let paid = client_mac(clients / 2).0;
        let up = Eth::new(paid, GATEWAY_MAC).ipv4_udp([10, 77, 0, 50], [198, 51, 100, 7], 40000, 443, 1000);
        let down = Eth::new(GATEWAY_MAC, paid).ipv4_udp([198, 51, 100, 7], [10, 77, 0, 50], 443, 40000, 1000);
        let garden = Eth::new(STRANGER_MAC, [0xff; 6]).ipv4_udp([0, 0, 0, 0], [255, 255, 255, 255], 68, 67, 300);
        let dropped = Eth::new(STRANGER_MAC, GATEWAY_MAC).ipv4_udp([10, 77, 0, 99], [198, 51, 100, 7], 40000, 443, 1000);
        let cases: [(&str, MeterProgram, MeterProgram, &[u8]); 6] = [
            ("XDP upload, paid", MeterProgram::XdpUpload, MeterProgram::XdpEmpty, &up),
            ("XDP upload, walled garden (DHCP)", MeterProgram::XdpUpload, MeterProgram::XdpEmpty, &garden),
            ("XDP upload, unpaid drop", MeterProgram::XdpUpload, MeterProgram::XdpEmpty, &dropped),
            ("TC upload, paid", MeterProgram::TcUpload, MeterProgram::TcEmpty, &up),
            ("TC upload, unpaid drop", MeterProgram::TcUpload, MeterProgram::TcEmpty, &dropped),
            ("TC download, paid", MeterProgram::TcDownload, MeterProgram::TcEmpty, &down),
        ];
        for (name, program, baseline, frame) in cases {
            let base = meter.test_run(baseline, frame, repeat)?;
            let cost = meter.test_run(program, frame, repeat)?;
            report.kernel(name, clients, cost.duration.as_nanos() as f64, base.duration.as_nanos() as f64, cost.passed);
        }
        // The meter closes its descriptors before its pin directory goes.
        drop(meter);
        drop(pins);
    }
    Ok(())
}
