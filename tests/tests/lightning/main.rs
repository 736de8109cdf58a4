//! The Lightning rail end to end: the real controller with its embedded ldk-node in
//! the gateway namespace, a payer ldk-node (and an LSPS2 provider) in the test
//! process, all on one regtest bitcoind; clients ask for invoices over the API from
//! the client namespace and their traffic passes the real kernel meter.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bitmesh::store::Store;
use bitmesh_common::wire::{DeviceEvent, Invoice, InvoiceState, InvoiceStatus, RestoreResponse};
use bitmesh_tests::chain::LoopbackRelay;
use bitmesh_tests::client::ScriptedClient;
use bitmesh_tests::controller::{Controller, ControllerOpts};
use bitmesh_tests::env::wait_for_true;
use bitmesh_tests::lightning::{wait_gateway_channel, DeviceEvents, LightningWallet, TestNode, GATEWAY_LN_PORT};
use bitmesh_tests::network::ClientIdentity;
use bitmesh_tests::testbed::Testbed;
use bitmesh_tests::upstream::udp_round_trips;
use serde_json::json;

/// 8,000 sat per MiB: a few hundred bytes cost a satoshi, so byte counts stay small.
const PRICE: &str = "8000000";
const DATAGRAM: usize = 1000;
/// One UDP echo of DATAGRAM bytes, billed both ways (Ethernet + IPv4 + UDP headers).
const ROUND_TRIP_BYTES: u64 = 2 * (DATAGRAM as u64 + 42);

/// The controller options: Lightning on, the test price and bundles, and `extra`.
fn opts(extra: &[&str]) -> ControllerOpts {
    let listen = format!("127.0.0.1:{GATEWAY_LN_PORT}");
    ControllerOpts::new()
        .with(&["--lightning", "--lightning-listen", &listen, "--price-msat-per-mib", PRICE, "--bundles", "40KiB,1MiB"])
        .with(extra)
}

fn node_info(ctl: &Controller<'_>) -> serde_json::Value {
    ctl.cli_json(&["lightning"]).unwrap()
}

fn ask_invoice(client: &ScriptedClient, body: serde_json::Value) -> Invoice {
    let r = client.post("/v1/invoices", &body).unwrap();
    assert_eq!(r.status, 201, "invoice refused: {}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

fn status(client: &ScriptedClient, hash: &str) -> InvoiceStatus {
    let r = client.request("GET", &format!("/v1/invoices/{hash}"), &[], None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

fn wait_paid(client: &ScriptedClient, hash: &str) -> InvoiceStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(client, hash);
        if s.state == InvoiceState::Paid {
            return s;
        }
        assert!(Instant::now() < deadline, "invoice {hash} not paid within 30 s: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn receipts(ctl: &Controller<'_>) -> u64 {
    Store::open(&Store::path_in(&ctl.data_dir())).unwrap().ln_totals().unwrap().receipts
}

#[test]
fn a_bundle_paid_over_lightning_passes_exactly_its_bytes_once() {
    let Some(bed) = Testbed::start(1).unwrap() else { return };
    let ctl = bed.start_controller(&opts(&[])).unwrap();
    let ln = LightningWallet::connect(&bed, &ctl).unwrap();
    let client = ScriptedClient::new(bed.client_ns(), bed.api());
    let udp = bed.client_udp().unwrap();
    assert_eq!(udp_round_trips(&udp, 2, DATAGRAM), 0, "unpaid: blocked");

    // The terms show the bundles, priced by the price flag.
    let terms = client.terms().unwrap();
    let lt = terms.lightning.expect("lightning terms");
    assert_eq!(lt.node_id, ln.gateway_id);
    assert_eq!(lt.bundles.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), vec!["40KiB", "1MiB"]);
    assert_eq!(lt.credit_ttl_secs, 86_400);

    // Exactly 20 round trips' worth.
    let k = 20;
    let inv = ask_invoice(&client, json!({ "bytes": k * ROUND_TRIP_BYTES }));
    assert_eq!(status(&client, &inv.payment_hash).state, InvoiceState::Pending);
    assert!(ln.node.pay(&inv.bolt11).unwrap(), "payment failed:\n{}", ctl.log_tail(30));
    let st = wait_paid(&client, &inv.payment_hash);
    assert_eq!(st.bytes_credited, k * ROUND_TRIP_BYTES);
    assert_eq!(udp_round_trips(&udp, k as usize + 5, DATAGRAM), k as usize, "exactly the bytes bought pass, then it stops");
    assert_eq!(udp_round_trips(&udp, 3, DATAGRAM), 0);

    // Paid twice (a second payer): refused by the gateway's node, credited once.
    let second = TestNode::start(&bed.node, "second").unwrap();
    second.fund(&bed.node, 1).unwrap();
    second.open_channel_to(&bed.node, &format!("{}@127.0.0.1:{}", ln.gateway_id, ln.relay.port), 500_000).unwrap();
    assert!(!second.pay(&inv.bolt11).unwrap(), "a second payment of a paid invoice must fail");
    assert_eq!(receipts(&ctl), 1);
    assert_eq!(udp_round_trips(&udp, 2, DATAGRAM), 0, "nothing credited for the second attempt");

    // Overpayment buys proportionally more: twice the amount, twice the bytes.
    let inv2 = ask_invoice(&client, json!({ "bytes": 10 * ROUND_TRIP_BYTES }));
    assert_eq!(inv2.token, inv.token, "a device keeps its purchase token");
    assert!(ln.node.pay_amount(&inv2.bolt11, inv2.amount_msat * 2).unwrap());
    let st2 = wait_paid(&client, &inv2.payment_hash);
    assert_eq!(st2.bytes_credited, 20 * ROUND_TRIP_BYTES);
    assert_eq!(udp_round_trips(&udp, 25, DATAGRAM), 20);

    // The operator sees the rail and the receipts.
    let row = ctl.client_row().unwrap().expect("client row");
    assert_eq!(row["rail"], "lightning", "{row}");
    assert_eq!(row["paid_sat"], (inv.amount_msat + 2 * inv2.amount_msat) / 1000, "PAID counts the Lightning receipts: {row}");
    let earnings = ctl.earnings().unwrap();
    assert_eq!(earnings["lightning_receipts"], 2, "{earnings}");
    assert_eq!(earnings["lightning_received_msat"], inv.amount_msat + 2 * inv2.amount_msat, "{earnings}");

    // Bad requests: typed errors, nothing changes.
    for (body, code) in [
        (json!({ "bundle": "3GiB" }), "unknown_bundle"),
        (json!({ "bytes": 10 }), "bytes_out_of_range"),
        (json!({ "bytes": 5000, "bundle": "1MiB" }), "bad_request"),
        (json!({ "bites": 5000 }), "bad_request"),
    ] {
        let r = client.post("/v1/invoices", &body).unwrap();
        assert_eq!(r.code(), code, "{body}: {}", r.text());
    }
    let r = client.request("GET", &format!("/v1/invoices/{}", "ab".repeat(32)), &[], None).unwrap();
    assert_eq!((r.status, r.code()), (404, "unknown_invoice".to_string()));
    let r = client.post("/v1/restore", &json!({ "token": "AAAA-BBBB" })).unwrap();
    assert_eq!(r.code(), "unknown_token");
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn a_purchase_follows_its_token_across_macs_and_a_payment_held_past_expiry_is_credited_once() {
    let Some(bed) = Testbed::start(1).unwrap() else { return };
    let ctl = bed.start_controller(&opts(&["--invoice-expiry-secs", "60"])).unwrap();
    let ln = LightningWallet::connect(&bed, &ctl).unwrap();
    let ids = bed.add_client_identities(3, false).unwrap();
    let phone_a = ScriptedClient::with_identity(bed.client_ns(), bed.api(), ids[0].clone());
    let phone_b = ScriptedClient::with_identity(bed.client_ns(), bed.api(), ids[1].clone());
    let phone_c = ScriptedClient::with_identity(bed.client_ns(), bed.api(), ids[2].clone());

    // The device asks from MAC A, then changes to MAC B before the payment lands.
    let inv = ask_invoice(&phone_a, json!({ "bundle": "40KiB" }));
    assert!(ln.node.pay(&inv.bolt11).unwrap());
    wait_paid(&phone_a, &inv.payment_hash);
    let row_a = ctl.client(&ids[0].mac).expect("A metered");
    assert_eq!(row_a["credited_bytes"], 40 * 1024);
    // On MAC B the device first asks for an invoice of its own (a new account, its
    // own code) and leaves it unpaid.
    let own_b = ask_invoice(&phone_b, json!({ "bundle": "40KiB" }));
    assert_ne!(own_b.token, inv.token);
    // Then the purchase token moves A's credit here, merging B's account into it;
    // A loses the credit in the kernel.
    let r = phone_b.post("/v1/restore", &json!({ "token": inv.token })).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let moved: RestoreResponse = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(moved.bytes_remaining, 40 * 1024);
    assert!(ctl.client(&ids[0].mac).is_none_or(|r| r["metered"] == false), "A lost its kernel entries");
    let row_b = ctl.client(&ids[1].mac).expect("B metered");
    assert_eq!(row_b["credited_bytes"], 40 * 1024);
    assert_eq!(row_b["remaining_bytes"], 40 * 1024);
    // The wallet pays B's own invoice after the merge: its bytes land on B (the
    // surviving account), not on the account the merge emptied, where they would be
    // paid for and never usable.
    assert!(ln.node.pay(&own_b.bolt11).unwrap());
    assert_eq!(wait_paid(&phone_b, &own_b.payment_hash).bytes_credited, 40 * 1024);
    let row_b = ctl.client(&ids[1].mac).expect("B metered");
    assert_eq!(row_b["remaining_bytes"], 80 * 1024, "paid after the merge, credited to the device: {row_b}");
    assert_eq!(receipts(&ctl), 2);

    // A wrong code in an invoice request: a typed error, and nothing is issued or moved.
    let pending_before = node_info(&ctl)["pending_invoices"].as_array().map(Vec::len);
    for bad in ["AAAA-BBBB", "ABCD-EFGH-IJKL-MNOP-QRST-UVWX-YZ", "AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AA"] {
        let r = phone_c.post("/v1/invoices", &json!({ "bundle": "40KiB", "token": bad })).unwrap();
        assert_eq!((r.status, r.code()), (404, "unknown_token".to_string()), "{bad}: {}", r.text());
    }
    assert_eq!(node_info(&ctl)["pending_invoices"].as_array().map(Vec::len), pending_before);
    assert!(ctl.client(&ids[2].mac).is_none_or(|r| r["metered"] == false), "C got nothing");
    assert_eq!(ctl.client(&ids[1].mac).expect("B metered")["remaining_bytes"], 80 * 1024, "B kept its credit");

    // The device moves again, to MAC C, and buys more with its code (as the portal
    // page does, from its stored token): one account, now on C, holding what B had
    // plus the new bundle; the code stays the same.
    let top_up = ask_invoice(&phone_c, json!({ "bundle": "40KiB", "token": inv.token }));
    assert_eq!(top_up.token, inv.token, "one code names all the credit");
    assert!(ctl.client(&ids[1].mac).is_none_or(|r| r["metered"] == false), "B lost it when it moved");
    assert!(ln.node.pay(&top_up.bolt11).unwrap());
    wait_paid(&phone_c, &top_up.payment_hash);
    let row_c = ctl.client(&ids[2].mac).expect("C metered");
    assert_eq!(row_c["remaining_bytes"], 120 * 1024, "{row_c}");
    assert_eq!(receipts(&ctl), 3);

    // Expiry. The gateway's node checks an incoming payment's expiry against the
    // highest block timestamp it has seen, plus two hours of slack (LDK's
    // `inbound_payment::verify`); the payer's wallet refuses to *start* paying an
    // invoice past its expiry by its own clock. So the late payment that really
    // happens is one started just before the expiry whose HTLC reaches the
    // gateway after it: made here by holding the payer's messages in the relay.
    let late = ask_invoice(&phone_c, json!({ "bundle": "40KiB" }));
    let never = ask_invoice(&phone_c, json!({ "bundle": "40KiB" }));
    while unix_now() + 3 < late.expires_at {
        std::thread::sleep(Duration::from_millis(100));
    }
    ln.relay.hold(true);
    std::thread::scope(|s| {
        let paying = s.spawn(|| ln.node.pay(&late.bolt11).unwrap());
        while unix_now() <= late.expires_at + 1 {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Past its expiry by the gateway's clock, and nothing has arrived.
        assert_eq!(status(&phone_c, &late.payment_hash).state, InvoiceState::Expired);
        assert_eq!(receipts(&ctl), 3);
        ln.relay.hold(false);
        assert!(paying.join().unwrap(), "the held payment went through:\n{}", ctl.log_tail(30));
    });
    let st = wait_paid(&phone_c, &late.payment_hash);
    assert_eq!(st.bytes_credited, 40 * 1024, "a payment that arrives after the expiry is credited");
    assert_eq!(receipts(&ctl), 4, "once");
    assert_eq!(ctl.client(&ids[2].mac).expect("C metered")["remaining_bytes"], 160 * 1024);

    // An invoice nobody started paying before its expiry: the payer's wallet refuses
    // it, nothing arrives, nothing is credited.
    assert!(!ln.node.pay(&never.bolt11).unwrap(), "a wallet does not start paying an expired invoice");
    assert_eq!(status(&phone_c, &never.payment_hash).state, InvoiceState::Expired);
    assert_eq!(receipts(&ctl), 4);
}

#[test]
fn kill_9_between_the_claim_and_the_credit_credits_exactly_once() {
    // The controller holds right after the node claimed the payment and before the
    // receipt is journaled, or after the journal and before the kernel credit, and
    // the test kills it there with SIGKILL. At the restart ldk-node delivers the
    // payment again.
    for point in ["ln-after-journal", "ln-before-journal"] {
        let Some(bed) = Testbed::start(1).unwrap() else { return };
        let mut ctl = bed.start_controller(&opts(&[])).unwrap();
        let ln = LightningWallet::connect(&bed, &ctl).unwrap();
        let client = ScriptedClient::new(bed.client_ns(), bed.api());
        let udp = bed.client_udp().unwrap();
        let k = 10;
        let inv = ask_invoice(&client, json!({ "bytes": k * ROUND_TRIP_BYTES }));
        ctl.set_env("BITMESH_FAULT", Some(&format!("{point}:{}", inv.payment_hash)));
        ctl.restart().unwrap();
        wait_gateway_channel(&ctl);
        std::thread::scope(|s| {
            let payer = &ln.node;
            let bolt11 = inv.bolt11.clone();
            s.spawn(move || {
                let _ = payer.pay(&bolt11);
            });
            wait_for_true("the controller to hold at the fault point", Duration::from_secs(60), || {
                ctl.log().contains("BITMESH_FAULT: holding here")
            });
            ctl.kill9();
            assert!(!ctl.running(), "{point}: still running after kill -9");
            assert_eq!(udp_round_trips(&udp, 2, DATAGRAM), 0, "{point}: nothing credited before the restart");
            ctl.set_env("BITMESH_FAULT", None);
            ctl.restart().unwrap();
            let st = wait_paid(&client, &inv.payment_hash);
            assert_eq!(st.bytes_credited, k * ROUND_TRIP_BYTES);
        });
        assert_eq!(receipts(&ctl), 1, "{point}: one receipt");
        assert_eq!(udp_round_trips(&udp, k as usize + 5, DATAGRAM), k as usize, "{point}: credited exactly once");
    }
}

#[test]
fn twenty_clients_buy_at_once() {
    let Some(bed) = Testbed::start(1).unwrap() else { return };
    let ctl = bed.start_controller(&opts(&[])).unwrap();
    let ln = LightningWallet::connect(&bed, &ctl).unwrap();
    let ids: Vec<ClientIdentity> = bed.add_client_identities(20, false).unwrap();
    let invoices: Vec<(ClientIdentity, Invoice)> = std::thread::scope(|s| {
        let hs: Vec<_> = ids
            .iter()
            .map(|id| {
                s.spawn(|| {
                    let c = ScriptedClient::with_identity(bed.client_ns(), bed.api(), id.clone());
                    (id.clone(), ask_invoice(&c, json!({ "bundle": "40KiB" })))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let tokens: std::collections::HashSet<_> = invoices.iter().map(|(_, i)| i.token.clone()).collect();
    assert_eq!(tokens.len(), 20, "one account per device");
    std::thread::scope(|s| {
        for (_, inv) in &invoices {
            let payer = &ln.node;
            s.spawn(move || assert!(payer.pay(&inv.bolt11).unwrap()));
        }
    });
    let c = ScriptedClient::new(bed.client_ns(), bed.api());
    for (id, inv) in &invoices {
        assert_eq!(wait_paid(&c, &inv.payment_hash).bytes_credited, 40 * 1024);
        let row = ctl.client(&id.mac).expect("metered");
        assert_eq!(row["credited_bytes"], 40 * 1024, "{}", id.mac);
    }
    assert_eq!(receipts(&ctl), 20);
}

#[test]
fn first_payments_arrive_through_an_lsps2_just_in_time_channel() {
    // The gateway's node starts with no channel at all; the payer has a channel to
    // the LSP only. The LSP (ldk-node as LSPS2 provider, in the test) opens a channel
    // to the gateway when the first payment arrives.
    let Some(bed) = Testbed::start(1).unwrap() else { return };
    let mut ctl = bed.start_controller(&opts(&[])).unwrap();
    let lsp = TestNode::start_lsp(&bed.node).unwrap();
    lsp.fund(&bed.node, 1).unwrap();
    let to_lsp = LoopbackRelay::start(bed.gateway(), 0, ([127, 0, 0, 1], lsp.port).into()).unwrap();
    let lsp_flag = format!("{}@127.0.0.1:{}", lsp.node.node_id(), to_lsp.port);
    ctl.add_args(&["--lsp", &lsp_flag]);
    ctl.restart().unwrap();
    let payer = TestNode::start(&bed.node, "payer").unwrap();
    payer.fund(&bed.node, 1).unwrap();
    payer.open_channel_to(&bed.node, &lsp.address(), 2_000_000).unwrap();
    lsp.wait_usable_channel(Duration::from_secs(30)).unwrap();
    bed.wait_synced().unwrap();
    assert_eq!(node_info(&ctl)["channels"].as_array().map(Vec::len), Some(0), "no inbound liquidity yet");

    let client = ScriptedClient::new(bed.client_ns(), bed.api());
    let inv = ask_invoice(&client, json!({ "bundle": "1MiB" }));
    assert!(payer.pay(&inv.bolt11).unwrap(), "JIT payment failed:\n{}", ctl.log_tail(40));
    let st = wait_paid(&client, &inv.payment_hash);
    assert_eq!(st.bytes_credited, 1 << 20, "the LSP's fee is the gateway's cost, not the buyer's");
    let row = ctl.client_row().unwrap().expect("metered");
    assert_eq!(row["credited_bytes"], 1 << 20);
    assert_eq!(node_info(&ctl)["channels"].as_array().map(Vec::len), Some(1), "the JIT channel");
}

#[test]
fn the_operator_opens_a_channel_from_the_gateway_node() {
    let Some(bed) = Testbed::start(1).unwrap() else { return };
    let ctl = bed.start_controller(&opts(&[])).unwrap();
    let peer = TestNode::start(&bed.node, "peer").unwrap();
    let to_peer = LoopbackRelay::start(bed.gateway(), 0, ([127, 0, 0, 1], peer.port).into()).unwrap();
    let info = node_info(&ctl);
    let deposit: bitcoin::Address = info["deposit_address"].as_str().unwrap().parse::<bitcoin::Address<_>>().unwrap().assume_checked();
    bed.node.mine_to(1, &deposit);
    bed.node.mine(100);
    wait_for_true("the gateway node sees its deposit", Duration::from_secs(60), || {
        node_info(&ctl)["onchain_spendable_sat"].as_u64().unwrap_or(0) > 0
    });
    let target = format!("{}@127.0.0.1:{}", peer.node.node_id(), to_peer.port);
    let out = ctl.cli_text(&["lightning", "open-channel", &target, "100000"]).unwrap();
    assert!(out.contains("opening"), "{out}");
    wait_for_true("the funding is broadcast", Duration::from_secs(30), || {
        bed.node.rpc().call_raw("getrawmempool", &[]).ok().and_then(|v| v.as_array().map(|a| !a.is_empty())).unwrap_or(false)
    });
    bed.node.mine(6);
    wait_for_true("the operator's channel is usable", Duration::from_secs(60), || {
        node_info(&ctl)["channels"].as_array().is_some_and(|c| c.iter().any(|c| c["usable"] == true && c["capacity_sat"] == 100_000))
    });
    peer.wait_usable_channel(Duration::from_secs(30)).unwrap();
    let text = ctl.cli_text(&["lightning"]).unwrap();
    assert!(text.contains("channels (1)") && text.contains("usable"), "{text}");
    // Withdraw on chain: the transaction reaches the node's mempool.
    let dest = peer.node.onchain_payment().new_address().unwrap().to_string();
    let out = ctl.cli_text(&["lightning", "withdraw", "--address", &dest, "--sat", "20000"]).unwrap();
    let txid = out.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(out.contains("sent: txid"), "{out}");
    // ldk-node hands the transaction to its broadcaster queue and returns the txid at
    // once; the broadcast itself follows asynchronously.
    wait_for_true("the withdrawal reaches the node's mempool", Duration::from_secs(30), || {
        let mempool = bed.node.rpc().call_raw("getrawmempool", &[]).ok();
        mempool.and_then(|m| m.as_array().map(|a| a.iter().any(|t| t == txid.as_str()))).unwrap_or(false)
    });
    // The seed can be exported (64 bytes, hex), and equals the 0600 file.
    let seed = ctl.cli_text(&["lightning", "export-seed"]).unwrap();
    assert_eq!(seed.trim().len(), 128);
    let path = ctl.data_dir().join("lightning/seed");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
}

/// `name` in the Prometheus text (a gauge without labels, or with `labels`).
fn gauge(text: &str, name: &str, labels: &str) -> u64 {
    let key = format!("{name}{labels} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .unwrap_or_else(|| panic!("no {name}{labels} in the metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn metrics(bed: &Testbed) -> String {
    let r = bitmesh_tests::network::in_netns(bed.gateway(), || {
        bitmesh_tests::http::get(([127, 0, 0, 1], METRICS_PORT).into(), "/metrics", &[])
    })
    .unwrap();
    assert_eq!(r.status, 200);
    r.text()
}

const METRICS_PORT: u16 = 9464;

#[test]
fn the_buyer_hears_its_payment_on_its_device_stream_and_the_operator_sees_and_withdraws_it() {
    let Some(bed) = Testbed::start(1).unwrap() else { return };
    let ctl = bed.start_controller(&opts(&["--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}")])).unwrap();
    let ln = LightningWallet::connect(&bed, &ctl).unwrap();
    let ids = bed.add_client_identities(2, false).unwrap();
    let phone = ScriptedClient::with_identity(bed.client_ns(), bed.api(), ids[0].clone());
    let other = ScriptedClient::with_identity(bed.client_ns(), bed.api(), ids[1].clone());

    // No purchase, no stream: a typed refusal.
    let (code, body) = DeviceEvents::open(&phone).unwrap().err().expect("refused");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("unknown_invoice"), "{body}");

    // Another device with an invoice of its own listens too.
    ask_invoice(&other, json!({ "bundle": "40KiB" }));
    let other_events = DeviceEvents::open(&other).unwrap().unwrap();

    // 4 MiB at 8,000 sat/MiB = 32,000 sat: enough for the gateway to pay out later.
    let bytes = 4u64 << 20;
    let inv = ask_invoice(&phone, json!({ "bytes": bytes }));
    let events = DeviceEvents::open(&phone).unwrap().unwrap();
    match events.next(Duration::from_secs(5)) {
        Some((_, DeviceEvent::Credit(s))) => {
            assert_eq!(s.mac, ids[0].mac.to_lowercase());
            assert_eq!(s.bytes_remaining, 0);
        }
        other => panic!("the stream starts with the device's credit, got {other:?}"),
    }
    assert!(ln.node.pay(&inv.bolt11).unwrap());
    let (_, paid) = events.wait_paid(&inv.payment_hash, Duration::from_secs(30)).unwrap();
    assert_eq!((paid.bytes_credited, paid.amount_msat), (bytes, inv.amount_msat));
    // Sent after the journal and the kernel: both already say so.
    assert_eq!(receipts(&ctl), 1);
    assert_eq!(ctl.client(&ids[0].mac).expect("metered")["credited_bytes"], bytes);
    match events.next(Duration::from_secs(5)) {
        Some((_, DeviceEvent::Credit(s))) => {
            assert_eq!((s.bytes_remaining, s.lightning_bytes_remaining), (bytes, Some(bytes)));
            assert!(s.lightning_expires_at.is_some_and(|t| t > unix_now() + 86_000), "{s:?}");
        }
        other => panic!("a credit update follows the payment, got {other:?}"),
    }
    // The other device heard nothing about it.
    for ev in other_events.drain(Duration::from_secs(2)) {
        match ev {
            DeviceEvent::Credit(s) => assert_eq!(s.mac, ids[1].mac.to_lowercase(), "only its own figures"),
            DeviceEvent::InvoicePaid(p) => panic!("another device's payment leaked: {p:?}"),
        }
    }

    // Prometheus: the receipt, the node's balance and its channel's capacity.
    let text = metrics(&bed);
    assert_eq!(gauge(&text, "bitmesh_lightning_receipts_total", ""), 1);
    assert_eq!(gauge(&text, "bitmesh_lightning_received_msat_total", ""), inv.amount_msat);
    assert_eq!(gauge(&text, "bitmesh_lightning_credit_live_bytes", ""), bytes);
    assert_eq!(gauge(&text, "bitmesh_lightning_accounts_live", ""), 1);
    assert_eq!(gauge(&text, "bitmesh_lightning_channels", ""), 1);
    assert_eq!(gauge(&text, "bitmesh_lightning_balance_sat", ""), inv.amount_msat / 1000, "the gateway holds what it was paid");
    // The capacity gauges are the node's own figures (`bitmesh lightning` shows the same).
    wait_for_true("the capacity gauges match the node's channels", Duration::from_secs(10), || {
        let text = metrics(&bed);
        let info = node_info(&ctl);
        let sum = |field: &str| info["channels"].as_array().unwrap().iter().map(|c| c[field].as_u64().unwrap()).sum::<u64>();
        gauge(&text, "bitmesh_lightning_capacity_msat", "{direction=\"inbound\"}") == sum("inbound_msat")
            && gauge(&text, "bitmesh_lightning_capacity_msat", "{direction=\"outbound\"}") == sum("outbound_msat")
    });
    let inbound = gauge(&metrics(&bed), "bitmesh_lightning_capacity_msat", "{direction=\"inbound\"}");
    assert!(inbound > 0 && inbound < 2_000_000_000 - inv.amount_msat, "{inbound}");

    // The operator pays out 5,000 sat to the payer's invoice from the gateway's channel.
    let desc = ldk_node::lightning_invoice::Bolt11InvoiceDescription::Direct(
        ldk_node::lightning_invoice::Description::new("withdrawal".into()).unwrap(),
    );
    let payout = ln.node.node.bolt11_payment().receive(5_000_000, &desc, 600).unwrap();
    let out = ctl.cli_text(&["lightning", "withdraw", "--invoice", &payout.to_string()]).unwrap();
    assert!(out.contains("paid"), "{out}");
    let hash = ldk_node::lightning::ln::channelmanager::PaymentId(*payout.payment_hash().as_ref());
    wait_for_true("the payer received the withdrawal", Duration::from_secs(30), || {
        let _ = ln.node.node.next_event().map(|_| ln.node.node.event_handled());
        ln.node.node.payment(&hash).is_some_and(|p| p.status == ldk_node::payment::PaymentStatus::Succeeded)
    });
    assert_eq!(gauge(&metrics(&bed), "bitmesh_lightning_balance_sat", ""), inv.amount_msat / 1000 - 5_000);
    // A withdrawal to an invoice the gateway cannot pay (more than it holds): one sentence, nothing sent.
    let too_much = ln.node.node.bolt11_payment().receive(500_000_000, &desc, 600).unwrap();
    let err = ctl.cli(&["lightning", "withdraw", "--invoice", &too_much.to_string()]).unwrap_err().to_string();
    let msg = err.split_once("failed: ").map(|(_, m)| m).unwrap_or(&err);
    assert!(msg.lines().count() == 1 && !msg.contains("panicked") && msg.contains("cannot pay"), "{msg}");
    assert_eq!(gauge(&metrics(&bed), "bitmesh_lightning_balance_sat", ""), inv.amount_msat / 1000 - 5_000);
}

/// Measurement, not a check: how long from the payer's wallet seeing the payment
/// succeed (and from the moment it starts paying) until the buyer's traffic passes
/// the kernel. `cargo test -p bitmesh-tests --test lightning -- --ignored --nocapture`
#[test]
#[ignore = "measurement: prints invoice-paid-to-traffic latency percentiles"]
fn measure_paid_to_traffic_latency() {
    let Some(bed) = Testbed::start(1).unwrap() else { return };
    let ctl = bed.start_controller(&opts(&[])).unwrap();
    let ln = LightningWallet::connect(&bed, &ctl).unwrap();
    let client = ScriptedClient::new(bed.client_ns(), bed.api());
    let udp = bed.client_udp().unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
    let payload = vec![0x5a; DATAGRAM];
    let mut buf = vec![0u8; DATAGRAM + 64];
    let (mut from_paid, mut from_start) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        let inv = ask_invoice(&client, json!({ "bytes": ROUND_TRIP_BYTES }));
        let start = Instant::now();
        assert!(ln.node.pay(&inv.bolt11).unwrap());
        let paid = Instant::now();
        loop {
            udp.send(&payload).unwrap();
            if matches!(udp.recv(&mut buf), Ok(n) if n == DATAGRAM) {
                break;
            }
            assert!(paid.elapsed() < Duration::from_secs(10), "traffic never passed");
        }
        let now = Instant::now();
        from_paid.push(now - paid);
        from_start.push(now - start);
    }
    from_paid.sort();
    from_start.sort();
    let pct = bitmesh_tests::bench::percentile;
    eprintln!(
        "Lightning paid -> traffic passes: p50 {:?} p99 {:?}; payer starts paying -> traffic: p50 {:?} p99 {:?} ({} purchases)",
        pct(&from_paid, 50),
        pct(&from_paid, 99),
        pct(&from_start, 50),
        pct(&from_start, 99),
        from_paid.len()
    );
}

/// Measurement, not a check: from the payer starting to pay (and from its wallet
/// seeing success) until the buyer's device stream says `invoice_paid`.
#[test]
#[ignore = "measurement: prints payment-to-device-event latency percentiles"]
fn measure_payment_to_device_event_latency() {
    let Some(bed) = Testbed::start(1).unwrap() else { return };
    let ctl = bed.start_controller(&opts(&[])).unwrap();
    let ln = LightningWallet::connect(&bed, &ctl).unwrap();
    let client = ScriptedClient::new(bed.client_ns(), bed.api());
    let first = ask_invoice(&client, json!({ "bytes": ROUND_TRIP_BYTES }));
    let events = DeviceEvents::open(&client).unwrap().unwrap();
    assert!(ln.node.pay(&first.bolt11).unwrap());
    events.wait_paid(&first.payment_hash, Duration::from_secs(30)).unwrap();
    let (mut from_start, mut from_paid) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        let inv = ask_invoice(&client, json!({ "bytes": ROUND_TRIP_BYTES }));
        let start = Instant::now();
        assert!(ln.node.pay(&inv.bolt11).unwrap());
        let paid = Instant::now();
        let (at, _) = events.wait_paid(&inv.payment_hash, Duration::from_secs(30)).unwrap();
        from_start.push(at - start);
        // The event may come before the payer's wallet learns of its success.
        from_paid.push(at.saturating_duration_since(paid));
    }
    from_start.sort();
    from_paid.sort();
    let pct = bitmesh_tests::bench::percentile;
    eprintln!(
        "Lightning payer starts paying -> invoice_paid on the device stream: p50 {:?} p99 {:?}; payer sees success -> event (0 = before): p50 {:?} p99 {:?} ({} purchases)",
        pct(&from_start, 50),
        pct(&from_start, 99),
        pct(&from_paid, 50),
        pct(&from_paid, 99),
        from_start.len()
    );
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
}

/// Measurement, not a check: the controller's resident memory without Lightning,
/// with its node running, and with 100 devices that bought over Lightning.
#[test]
#[ignore = "measurement: prints the controller's RSS with the Lightning node and 100 Lightning clients"]
fn measure_rss_with_the_node_and_100_lightning_clients() {
    let Some(bed) = Testbed::start(1).unwrap() else { return };
    let plain = bed.start_controller(&ControllerOpts::new()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let without = rss_kib(plain.pid().unwrap());
    plain.shut_down();
    let ctl = bed.start_controller(&opts(&[])).unwrap();
    let ln = LightningWallet::connect(&bed, &ctl).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let idle = rss_kib(ctl.pid().unwrap());
    let ids = bed.add_client_identities(100, true).unwrap();
    let bed = &bed;
    for chunk in ids.chunks(10) {
        std::thread::scope(|s| {
            for id in chunk {
                let payer = &ln.node;
                s.spawn(move || {
                    let c = ScriptedClient::with_identity(bed.client_ns(), bed.api(), id.clone());
                    let inv = ask_invoice(&c, json!({ "bundle": "40KiB" }));
                    assert!(payer.pay(&inv.bolt11).unwrap());
                    wait_paid(&c, &inv.payment_hash);
                });
            }
        });
    }
    assert_eq!(receipts(&ctl), 100);
    std::thread::sleep(Duration::from_secs(2));
    let loaded = rss_kib(ctl.pid().unwrap());
    eprintln!(
        "controller RSS: without Lightning {} MiB; with the node, idle {} MiB; with 100 Lightning clients {} MiB",
        without / 1024,
        idle / 1024,
        loaded / 1024
    );
}

#[test]
fn bitmesh_pay_lightning_prints_each_invoice_and_buys_the_next_at_half_the_bundle() {
    use std::io::BufRead;
    let Some(bed) = Testbed::start(1).unwrap() else { return };
    let ctl = bed.start_controller(&opts(&[])).unwrap();
    let ln = LightningWallet::connect(&bed, &ctl).unwrap();
    let bin = bitmesh_tests::process::bitmesh_bin().unwrap();
    let udp = bed.client_udp().unwrap();
    // 40 KiB at 8,000 sat/MiB = 313 sat a bundle: --max-spend 700 allows two.
    let mut child = bed
        .client_command(0, &bin)
        .args(["pay", "--lightning", "--gateway", &bed.gateway_url(), "--max-price", "8000", "--max-spend", "700"])
        .args(["--iface", &bed.lan.clients[0].iface, "--poll-ms", "100", "--exit-when-spent", "--bundle", "40KiB"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_invoice = || loop {
        let line = lines.next().expect("agent output ended").unwrap();
        if line.starts_with("lnbcrt") {
            return line;
        }
    };
    // The payer's wallet reports success when the gateway's node releases the
    // preimage, a moment before the controller has journaled and credited the
    // payment (as a phone's wallet does): wait for the kernel credit before sending.
    let mac = bed.lan.clients[0].mac.clone();
    let credited = |bytes: u64| {
        wait_for_true(&format!("{bytes} bytes credited in the kernel"), Duration::from_secs(30), || {
            ctl.client(&mac).is_some_and(|r| r["credited_bytes"] == bytes)
        })
    };
    let first = next_invoice();
    assert!(ln.node.pay(&first).unwrap());
    credited(40 * 1024);
    // Use a bit over half the bundle: the agent asks for the next one.
    assert_eq!(udp_round_trips(&udp, 11, DATAGRAM), 11);
    let second = next_invoice();
    assert_ne!(first, second);
    assert!(ln.node.pay(&second).unwrap());
    credited(80 * 1024);
    // Use everything: 80 KiB bought = 39 round trips in all.
    let mut passed = 11;
    for _ in 0..40 {
        passed += udp_round_trips(&udp, 1, DATAGRAM);
    }
    assert_eq!(passed as u64, 2 * 40 * 1024 / ROUND_TRIP_BYTES, "two bundles, exactly");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the agent did not exit once its budget was spent");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("bought 2 bundle(s)")), "{rest:?}");
    assert_eq!(receipts(&ctl), 2);
    assert!(ctl.log().contains("device event stream opened"), "the agent waited on its device stream");
}
