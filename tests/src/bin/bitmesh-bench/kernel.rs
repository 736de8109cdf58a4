//! Kernel cost per frame: each meter path against the empty program of the same hook
//! type, same frame, same run, at 10 and 10,000 clients (measured by
//! `bitmesh_tests::bench::kernel`, which the ignored kernel `bench` test also prints).

use anyhow::Result;
use bitmesh_tests::bench::kernel::kernel_cost_per_frame;

use crate::report::Report;

pub fn run(report: &mut Report, repeat: u32) -> Result<()> {
    for clients in [10u32, 10_000] {
        for row in kernel_cost_per_frame(repeat, clients)? {
            let case = format!("{:?}, {}", row.program, row.path);
            report.kernel(&case, row.clients, row.meter_ns, row.empty_ns, row.path != "drop (unpaid)");
        }
    }
    Ok(())
}
