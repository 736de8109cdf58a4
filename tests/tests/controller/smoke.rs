//! `bitmesh run` starts for real in a namespace, answers its API and admin socket,
//! and survives kill -9 and a restart on the same data and pin directories.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::Testbed;

#[test]
fn controller_starts_answers_terms_and_admin_and_restarts_after_kill_9() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let mut ctl = lab.start_controller(&ControllerOpts::new().with(&["--metrics-addr", "127.0.0.1:9464"])).unwrap();
    let terms = lab.scripted_client().terms().unwrap();
    assert_eq!(terms.network, bitcoin::Network::Regtest);
    assert_eq!(terms.tip_height, lab.node.tip(), "tip read from the node through the relay");
    assert!(ctl.clients().unwrap().is_empty());
    let table = String::from_utf8(ctl.cli(&["clients"]).unwrap().stdout).unwrap();
    assert!(table.to_lowercase().contains("mac"), "clients table has a header: {table}");
    let price = String::from_utf8(ctl.cli(&["price"]).unwrap().stdout).unwrap();
    assert!(price.contains("1000 msat/MiB"), "{price}");
    let metrics = bitmesh_tests::network::in_netns(lab.gateway(), || {
        bitmesh_tests::http::get(([127, 0, 0, 1], 9464).into(), "/metrics", &[])
    })
    .unwrap();
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("bitmesh_"), "Prometheus text: {text}");
    let pid = ctl.pid().unwrap();
    ctl.kill9();
    ctl.restart().unwrap();
    assert_ne!(ctl.pid().unwrap(), pid);
    assert!(ctl.channels().unwrap().is_empty());
    assert!(ctl.pin_dir().join("CREDIT").exists(), "maps stay pinned: {}", ctl.log_tail(20));
}
