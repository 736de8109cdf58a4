//! What the `bitmesh` binary prints when things go wrong or are not what the flags say.
//!
//! * Every expected failure prints one line on stderr (`error: ` and the chain of
//!   causes) and exits non-zero, also with `RUST_BACKTRACE=1`, where returning an
//!   `anyhow::Error` from `main` prints a backtrace of several dozen lines.
//! * A price set with `bitmesh price` outlives restarts and beats
//!   `--price-msat-per-mib`: `bitmesh run`'s start-up line and `bitmesh clients` say so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

use bitmesh_tests::controller::{Controller, ControllerOpts};
use bitmesh_tests::testbed::Testbed;
use bitmesh_tests::env;
use bitmesh_tests::process::bitmesh_bin_or_skip;

/// One failing command: its arguments, a fragment its error line must contain, and
/// how many progress lines it may print on stderr before the error (`bitmesh pay`
/// says which gateway and interface it uses before it fails to reach it).
struct Case {
    args: Vec<String>,
    says: &'static str,
    progress_lines: usize,
}

fn case(args: &[&str], says: &'static str) -> Case {
    Case { args: args.iter().map(|s| s.to_string()).collect(), says, progress_lines: 0 }
}

#[test]
fn expected_failures_print_one_line_and_exit_non_zero_even_with_rust_backtrace() {
    if !env::is_root() {
        // `run --iface nosuch0` only reaches the interface check as root.
        env::skip("the `bitmesh run` cases need root");
        return;
    }
    let Some(bin) = bitmesh_bin_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (sock, state, missing_toml) = (path("no-controller.sock"), path("state"), path("missing.toml"));
    let cases = vec![
        case(&["run", "--iface", "nosuch0"], "interface nosuch0 not found"),
        case(&["run"], "no client-facing interface"),
        case(&["run", "--config", &missing_toml], "cannot read config file"),
        case(&["run", "--iface", "lo", "--min-channel-sat", "10", "--max-channel-sat", "5"], "--min-channel-sat"),
        case(&["clients", "--admin-socket", &sock], "cannot reach the controller"),
        case(&["channels", "--admin-socket", &sock], "cannot reach the controller"),
        case(&["price", "2000", "--admin-socket", &sock], "cannot reach the controller"),
        case(&["settle", "--all", "--admin-socket", &sock], "cannot reach the controller"),
        case(&["refund", "--state-dir", &state], "needs a chain backend"),
        Case {
            progress_lines: 2,
            ..case(
                &["pay", "--gateway", "http://127.0.0.1:9", "--iface", "lo", "--max-price", "1", "--max-spend", "1000", "--state-dir", &state, "--yes"],
                "127.0.0.1:9",
            )
        },
    ];
    for c in cases {
        let out = Command::new(&bin)
            .args(&c.args)
            .env("RUST_BACKTRACE", "1")
            .env_remove("RUST_LIB_BACKTRACE")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let what = format!("bitmesh {:?}: exit {:?}, stderr:\n{stderr}", c.args, out.status.code());
        assert_eq!(out.status.code(), Some(1), "{what}");
        assert!(!stderr.to_lowercase().contains("backtrace"), "{what}");
        assert_eq!(lines.len(), c.progress_lines + 1, "one error line after {} progress line(s): {what}", c.progress_lines);
        let last = lines.last().copied().unwrap_or_default();
        assert!(last.starts_with("error: ") && last.contains(c.says), "{what}");
        // Each cause once: many messages quote their source and also chain it.
        let causes: Vec<&str> = last.split(": ").filter(|s| s.len() > 8).collect();
        for (i, cause) in causes.iter().enumerate() {
            assert!(!causes[i + 1..].contains(cause), "{cause:?} twice: {what}");
        }
    }
}

#[test]
fn a_price_set_with_bitmesh_price_is_shown_overriding_the_flag_at_start_and_in_clients() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let mut ctl = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", "1000"])).unwrap();
    let price_line = |ctl: &Controller<'_>| ctl.cli_text(&["clients"]).unwrap().lines().next().unwrap_or_default().to_owned();
    let terms_price = |lab: &Testbed| lab.scripted_client().terms().unwrap().price_msat_per_mib.to_msat();

    let line = price_line(&ctl);
    assert!(line.contains("1 sat/MiB (1000 msat/MiB), from --price-msat-per-mib"), "{line}");

    let set = ctl.cli_text(&["price", "2500"]).unwrap();
    assert!(set.contains("2.5 sat/MiB (2500 msat/MiB), set with `bitmesh price`"), "{set}");

    // The stored price survives a restart and beats the flag, which is still 1000.
    ctl.restart().unwrap();
    let log = ctl.log();
    let this_start = log.rsplit("===== start").next().unwrap_or_default();
    let startup = this_start.lines().find(|l| l.contains("price for new channels")).unwrap_or_default();
    assert!(
        startup.contains("2.5 sat/MiB") && startup.contains("overrides --price-msat-per-mib 1 sat/MiB (1000 msat/MiB)"),
        "start-up line: {startup:?}\n{}",
        ctl.log_tail(20)
    );
    assert_eq!(terms_price(&lab), 2500, "the stored price is the one clients are offered");
    let line = price_line(&ctl);
    assert!(line.contains("overrides --price-msat-per-mib") && line.contains("bitmesh price --reset"), "{line}");

    let reset = ctl.cli_text(&["price", "--reset"]).unwrap();
    assert!(reset.contains("1 sat/MiB (1000 msat/MiB), from --price-msat-per-mib"), "{reset}");
    assert_eq!(terms_price(&lab), 1000);
}
