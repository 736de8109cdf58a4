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

/// The `__sk_buff` fields a TC test run may set and read back (what the kernel's
/// `bpf_prog_test_run_skb` accepts in `ctx_in`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbContext {
    /// `skb->mark`.
    pub mark: u32,
    /// `skb->skb_iif`: 0 for a packet the host generated, the receiving interface's
    /// index for a forwarded one.
    pub ingress_ifindex: u32,
}

/// `sizeof(struct __sk_buff)` (uapi, stable) and the offsets used here.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK: usize = 8;
const SKB_INGRESS_IFINDEX: usize = 36;

impl Meter {
    /// Run a TC `program` once on `frame` with the given `__sk_buff` fields; returns
    /// the outcome and the context as the program left it (the mark it set).
    pub fn test_run_skb(&self, program: MeterProgram, frame: &[u8], ctx: SkbContext) -> Result<(TestRunOutcome, SkbContext), MeterError> {
        let name = program.name();
        let prog = self
            .ebpf
            .program(name)
            .ok_or(MeterError::MissingInObject { what: "program", name })?;
        let to_err = |source| MeterError::Program { operation: "test run", program: name, source: Box::new(source) };
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[SKB_MARK..SKB_MARK + 4].copy_from_slice(&ctx.mark.to_ne_bytes());
        ctx_in[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4].copy_from_slice(&ctx.ingress_ifindex.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let opts = TestRunOptions { data_in: Some(frame), ctx_in: Some(&ctx_in), ctx_out: Some(&mut ctx_out), ..TestRunOptions::default() };
        let tc: &SchedClassifier = prog.try_into().map_err(to_err)?;
        let result = tc.test_run(opts).map_err(to_err)?;
        let word = |at: usize| u32::from_ne_bytes([ctx_out[at], ctx_out[at + 1], ctx_out[at + 2], ctx_out[at + 3]]);
        let out = SkbContext { mark: word(SKB_MARK), ingress_ifindex: word(SKB_INGRESS_IFINDEX) };
        let outcome = TestRunOutcome {
            return_value: result.return_value,
            passed: result.return_value as i32 == tc_action::OK,
            duration: result.duration,
        };
        Ok((outcome, out))
    }

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
