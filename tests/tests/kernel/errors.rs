//! The loader's errors say what to do: missing interface, unsupported hook, not root.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test should panic

use std::process::Command;

use bitmesh::meter::{Meter, MeterConfig, MeterError, UploadHook};
use bitmesh_tests::env::{is_root, skip};
use bitmesh_tests::network::{in_netns, Netns, PinDir, TestMeter};

#[test]
fn attaching_to_a_missing_interface_names_it() {
    if !is_root() {
        return skip("needs root");
    }
    let mut t = TestMeter::load().expect("load");
    let err = t.meter.attach("bm-no-such-if", UploadHook::Auto).expect_err("must fail");
    assert!(matches!(err, MeterError::InterfaceNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("bm-no-such-if") && err.to_string().contains("ip link"), "{err}");
}

#[test]
fn native_xdp_where_the_driver_lacks_it_is_unsupported_and_auto_falls_back_to_tc() {
    if !is_root() {
        return skip("needs root");
    }
    // Loopback has no native XDP; this one lives in a namespace of our own.
    let ns = Netns::new().expect("netns");
    let mut t = TestMeter::load().expect("load");
    let err = in_netns(&ns, || Ok(t.meter.attach("lo", UploadHook::XdpNative))).expect("thread");
    let err = err.expect_err("native XDP on lo must fail");
    assert!(matches!(err, MeterError::HookUnsupported { .. }), "{err:?}");
    assert!(err.to_string().contains("`tc`"), "message suggests another hook: {err}");
    let used = in_netns(&ns, || Ok(t.meter.attach("lo", UploadHook::Auto)?)).expect("auto");
    assert_eq!(used, UploadHook::Tc);
    t.meter.detach().expect("detach");
}

/// Re-runs this binary as `nobody` (setpriv) to load the meter without privileges.
#[test]
fn loading_without_root_says_run_as_root() {
    if !is_root() {
        return skip("needs root to drop to nobody");
    }
    let exe = std::env::current_exe().expect("exe");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(exe)
        // The test's full name in this layer's binary (`<module>::<test>`).
        .args(["--ignored", "--exact", "errors::unprivileged_child", "--nocapture"])
        .env("BITMESH_UNPRIVILEGED_CHILD", "1")
        .output()
        .expect("spawn setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("CHILD-ERROR:") && stdout.contains("run the controller as root"), "{stdout}");
}

#[test]
#[ignore = "run by loading_without_root_says_run_as_root as nobody"]
fn unprivileged_child() {
    if std::env::var_os("BITMESH_UNPRIVILEGED_CHILD").is_none() {
        return;
    }
    let pins = PinDir::new();
    let mut config = MeterConfig::new(std::net::Ipv4Addr::new(10, 0, 0, 1));
    config.pin_dir = pins.path().to_path_buf();
    let err = Meter::load(&config).err().expect("loading as nobody must fail");
    assert!(matches!(err, MeterError::NotRoot { .. }), "{err:?}");
    println!("CHILD-ERROR: {err}");
}
