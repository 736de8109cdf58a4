//! What a test may assume about the machine, and how a missing capability is reported.
//!
//! Outside CI a test that cannot run (no root, no BPF, no namespaces, no bitcoind)
//! prints why and returns; under `CI=true` the same condition is a failure.

/// True when running under CI (`CI=true`), where a skip must fail instead.
pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
}

/// Skip (outside CI) or fail (under CI) a test that cannot run here.
///
/// Usage: `if !is_root() { return skip("needs root"); }`
#[track_caller]
pub fn skip(why: &str) {
    if in_ci() {
        panic!("test cannot run under CI=true: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// Whether this process runs as root (needed for BPF and namespaces).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Poll `f` every 100 ms until it returns `Some`, or panic after `timeout` with `what`.
pub fn wait_until<T>(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < end, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// [`wait_until`] for a condition: poll until `f` is true.
pub fn wait_for_true(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> bool) {
    wait_until(what, timeout, || f().then_some(()))
}
