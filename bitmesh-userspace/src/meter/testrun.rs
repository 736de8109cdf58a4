//! BPF_PROG_TEST_RUN: run a loaded program on a crafted frame inside the kernel,
//! against the real maps, without attaching it anywhere. Used by the kernel tests
//! and the benchmark.

use std::time::Duration;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use bitmesh_common::kernel::{tc_action, xdp_action};

use super::attach::{Meter, MeterProgram};
use super::error::MeterError;

/// What one test run returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The program's return code (XDP action or TC action).
    pub return_value: u32,
    /// Whether that code lets the frame through.
    pub passed: bool,
    /// Mean time per run as measured by the kernel.
    pub duration: Duration,
}

impl Meter {
    /// Run `program` on `frame` `repeat` times (>= 1) in the kernel. Every run
    /// updates the maps, as real traffic would. Frames shorter than 14 bytes are
    /// refused by the kernel (EINVAL).
    pub fn test_run(&self, program: MeterProgram, frame: &[u8], repeat: u32) -> Result<TestRunOutcome, MeterError> {
        let name = program.name();
        let prog = self
            .ebpf
            .program(name)
            .ok_or(MeterError::MissingInObject { what: "program", name })?;
        let opts = TestRunOptions { data_in: Some(frame), repeat: repeat.max(1), ..TestRunOptions::default() };
        let to_err = |source| MeterError::Program { operation: "test run", program: name, source: Box::new(source) };
        let result = if program.is_xdp() {
            let xdp: &Xdp = prog.try_into().map_err(to_err)?;
            xdp.test_run(opts).map_err(to_err)?
        } else {
            let tc: &SchedClassifier = prog.try_into().map_err(to_err)?;
            tc.test_run(opts).map_err(to_err)?
        };
        let passed = if program.is_xdp() {
            result.return_value == xdp_action::PASS
        } else {
            result.return_value as i32 == tc_action::OK
        };
        Ok(TestRunOutcome { return_value: result.return_value, passed, duration: result.duration })
    }
}
