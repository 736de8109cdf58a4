//! `bitmesh run` starts for real in a namespace, answers its API and admin socket,
//! and survives kill -9 and a restart on the same data and pin directories.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bitmesh_tests::controller::Lab;

#[test]
fn controller_starts_answers_terms_and_admin_and_restarts_after_kill_9() {
    let Some(mut lab) = Lab::start(&["--metrics-addr", "127.0.0.1:9464"]).unwrap() else { return };
    let terms = bitmesh_tests::controller::ScriptedClient::new(&lab.topo.client, lab.api()).terms().unwrap();
    assert_eq!(terms.network, bitcoin::Network::Regtest);
    assert_eq!(terms.tip_height, lab.node.tip(), "tip read from the node through the relay");
    assert!(lab.controller.clients().unwrap().is_empty());
    let table = String::from_utf8(lab.controller.cli(&["clients"]).unwrap().stdout).unwrap();
    assert!(table.to_lowercase().contains("mac"), "clients table has a header: {table}");
    let price = String::from_utf8(lab.controller.cli(&["price"]).unwrap().stdout).unwrap();
    assert!(price.contains("1000 msat/MiB"), "{price}");
    let metrics = bitmesh_tests::netns::in_netns(&lab.topo.gateway, || {
        bitmesh_tests::controller::http::get(([127, 0, 0, 1], 9464).into(), "/metrics", &[])
    })
    .unwrap();
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("bitmesh_"), "Prometheus text: {text}");
    let pid = lab.controller.pid().unwrap();
    lab.controller.kill9();
    lab.controller.restart().unwrap();
    assert_ne!(lab.controller.pid().unwrap(), pid);
    assert!(lab.controller.channels().unwrap().is_empty());
    assert!(lab.controller.pin_dir().join("CREDIT").exists(), "maps stay pinned: {}", lab.controller.log_tail(20));
}
