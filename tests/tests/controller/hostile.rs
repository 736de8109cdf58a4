//! Hostile requests over real HTTP to a running controller: each gets its stable
//! error code and changes nothing (journal, channels, kernel CREDIT).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bitcoin::hex::DisplayHex;
use bitcoin::Amount;
use bitmesh_channel::chain::Chain;
use bitmesh::store::Store;
use bitmesh_tests::chain::CoinbaseWallet;
use bitmesh_tests::http;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::Testbed;
use serde_json::json;

const CAPACITY: Amount = Amount::from_sat(20_000);

/// The same signature with S replaced by n - S (valid ECDSA, but high-S).
fn high_s(sig: &[u8]) -> Vec<u8> {
    let (flag, der) = sig.split_last().unwrap();
    let compact = bitcoin::secp256k1::ecdsa::Signature::from_der(der).unwrap().serialize_compact();
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0xba, 0xae,
        0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36, 0x41, 0x41,
    ];
    let mut s = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = N[i] as i16 - compact[32 + i] as i16 - borrow;
        borrow = i16::from(d < 0);
        s[i] = d.rem_euclid(256) as u8;
    }
    // DER by hand (the library would normalize): 0x30 len 0x02 rlen r 0x02 slen s.
    let int = |v: &[u8]| {
        let v: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
        let mut out = if v[0] & 0x80 != 0 { vec![0] } else { vec![] };
        out.extend(v);
        out
    };
    let (r, s) = (int(&compact[..32]), int(&s));
    let mut out = vec![0x30, (4 + r.len() + s.len()) as u8, 0x02, r.len() as u8];
    out.extend(&r);
    out.extend([0x02, s.len() as u8]);
    out.extend(&s);
    out.push(*flag);
    out
}

#[test]
fn hostile_requests_get_their_error_code_and_change_nothing() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", "8000000", "--zero-conf-exposure-sat", "1000000"])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 3, 0);
    lab.wait_synced().unwrap();
    let mut client = lab.scripted_client();
    let offer = client.open(200).unwrap();
    client.fund(&mut wallet, CAPACITY).unwrap();
    let paid = offer.min_first_payment + Amount::from_sat(1_000);
    client.pay(paid).unwrap();
    let id = client.channel_id();
    let pay_path = format!("/v1/channels/{id}/payments");
    let good = client.update(paid + Amount::from_sat(10));
    let mut stranger = lab.scripted_client();
    stranger.offer = client.offer.clone();
    stranger.channel = client.channel.clone().map(|mut c| {
        c.script.client = stranger.pubkey;
        c
    });
    let forged = stranger.update(paid + Amount::from_sat(10)).signature.0.to_lower_hex_string();
    let sig_hex = good.signature.0.to_lower_hex_string();
    let mut wrong_flag = good.signature.0.clone();
    *wrong_flag.last_mut().unwrap() = 0x01;
    let lower = client.update(paid - Amount::from_sat(1));
    let other_tx = client.funding_tx(&mut wallet, CAPACITY);
    let other_txid = other_tx.compute_txid();
    let unknown = "ab".repeat(32);
    let tip = client.terms().unwrap().tip_height.to_consensus_u32();
    // A status auth sniffed off the air: the client uses it once (accepted), the
    // table replays it. And counters far from the gateway's clock, validly signed.
    let sniffed = client.auth_header("status");
    let first = client.request("GET", &format!("/v1/channels/{id}"), &[(bitmesh_common::wire::AUTH_HEADER, &sniffed)], None).unwrap();
    assert_eq!(first.status, 200, "a fresh status auth is accepted: {}", String::from_utf8_lossy(&first.body));
    let now_ms = bitmesh_client::http::next_counter();
    let stale = client.auth_at("status", now_ms - 10 * 60 * 1000);
    let future = client.auth_at("events", now_ms + 10 * 60 * 1000);

    let pay_body = |total: u64, sig: &str| json!({ "channel_id": id, "total_paid_sat": total, "signature": sig });
    let p = paid.to_sat() + 10;
    // (name, method, path, headers, body, HTTP status, error code)
    type Row = (&'static str, &'static str, String, Vec<(&'static str, String)>, Vec<u8>, u16, &'static str);
    let j = |v: serde_json::Value| v.to_string().into_bytes();
    let rows: Vec<Row> = vec![
        ("malformed json", "POST", pay_path.clone(), vec![], b"{\"channel_id\":".to_vec(), 400, "bad_request"),
        ("wrong type", "POST", pay_path.clone(), vec![], j(json!({ "channel_id": id, "total_paid_sat": "lots", "signature": sig_hex })), 400, "bad_request"),
        ("body too large", "POST", pay_path.clone(), vec![], vec![b' '; 70 * 1024], 413, "bad_request"),
        ("no such route", "GET", "/v1/nope".into(), vec![], vec![], 404, "bad_request"),
        ("wrong method", "DELETE", format!("/v1/channels/{id}"), vec![], vec![], 404, "bad_request"),
        ("unknown channel", "POST", format!("/v1/channels/{unknown}/payments"), vec![], j(json!({ "channel_id": unknown, "total_paid_sat": p, "signature": sig_hex })), 404, "unknown_channel"),
        ("path and body disagree", "POST", format!("/v1/channels/{unknown}/payments"), vec![], j(pay_body(p, &sig_hex)), 400, "bad_request"),
        ("signed by another key", "POST", pay_path.clone(), vec![], j(pay_body(p, &forged)), 422, "signature_invalid"),
        ("signature for another total", "POST", pay_path.clone(), vec![], j(pay_body(p + 1, &sig_hex)), 422, "signature_invalid"),
        ("lower total", "POST", pay_path.clone(), vec![], j(pay_body(lower.total_paid.to_sat(), &lower.signature.0.to_lower_hex_string())), 409, "amount_not_increasing"),
        ("above capacity", "POST", pay_path.clone(), vec![], j(pay_body(CAPACITY.to_sat() + 1, &sig_hex)), 422, "amount_above_capacity"),
        ("wrong sighash flag", "POST", pay_path.clone(), vec![], j(pay_body(p, &wrong_flag.to_lower_hex_string())), 422, "wrong_sighash_flag"),
        ("not DER", "POST", pay_path.clone(), vec![], j(pay_body(p, "3006020101020183")), 422, "signature_not_der"),
        ("high S", "POST", pay_path.clone(), vec![], j(pay_body(p, &high_s(&good.signature.0).to_lower_hex_string())), 422, "signature_high_s"),
        ("status unsigned", "GET", format!("/v1/channels/{id}"), vec![], vec![], 403, "unauthorized"),
        ("status signed by another key", "GET", format!("/v1/channels/{id}"), vec![(bitmesh_common::wire::AUTH_HEADER, stranger.auth_header("status"))], vec![], 403, "unauthorized"),
        ("status replayed", "GET", format!("/v1/channels/{id}"), vec![(bitmesh_common::wire::AUTH_HEADER, sniffed.clone())], vec![], 401, "auth_replayed"),
        ("status counter 10 min in the past", "GET", format!("/v1/channels/{id}"), vec![(bitmesh_common::wire::AUTH_HEADER, stale)], vec![], 401, "auth_replayed"),
        ("events counter 10 min in the future", "GET", format!("/v1/channels/{id}/events"), vec![(bitmesh_common::wire::AUTH_HEADER, future)], vec![], 401, "auth_replayed"),
        ("status with the old counterless header", "GET", format!("/v1/channels/{id}"), vec![(bitmesh_common::wire::AUTH_HEADER, client.auth("status"))], vec![], 403, "unauthorized"),
        ("events unsigned", "GET", format!("/v1/channels/{id}/events"), vec![], vec![], 403, "unauthorized"),
        ("close signed by another key", "POST", format!("/v1/channels/{id}/close"), vec![], j(stranger.close_body()), 403, "unauthorized"),
        ("close without a counter", "POST", format!("/v1/channels/{id}/close"), vec![], j(json!({ "channel_id": id, "signature": client.auth("close") })), 400, "bad_request"),
        ("refund a funded channel with another tx", "POST", format!("/v1/channels/{id}/funding"), vec![],
            j(json!({ "channel_id": id, "funding_tx": bitcoin::consensus::encode::serialize_hex(&other_tx), "funding_vout": 0 })), 409, "channel_not_open"),
        ("second channel while one is open", "POST", "/v1/channels".into(), vec![],
            j(json!({ "client_pubkey": stranger.pubkey.to_string(), "expiry": tip + 200, "client_change_script": stranger.change_script.to_hex_string() })), 400, "bad_request"),
        ("open with a bad key", "POST", "/v1/channels".into(), vec![],
            j(json!({ "client_pubkey": "02".repeat(33), "expiry": tip + 200, "client_change_script": stranger.change_script.to_hex_string() })), 400, "bad_request"),
    ];

    let store = Store::open(&Store::path_in(&ctl.data_dir())).unwrap();
    let snapshot = || {
        let credited = ctl.client_row().unwrap().unwrap()["credited_bytes"].clone();
        (store.payments(id).unwrap(), ctl.channels().unwrap(), credited)
    };
    let before = snapshot();
    let mut failures = Vec::new();
    for (name, method, path, headers, body, status, code) in rows {
        let mut hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if !body.is_empty() {
            hs.push(("content-type", "application/json"));
        }
        let api = lab.api();
        let r = lab
            .as_client(|| http::request(api, method, &path, &hs, (!body.is_empty() || method == "POST").then_some(&body[..])))
            .unwrap();
        if r.status != status || r.code() != code {
            failures.push(format!("{name}: got {} {:?}, want {status} {code}", r.status, String::from_utf8_lossy(&r.body)));
        }
        if snapshot() != before {
            failures.push(format!("{name}: changed the store or CREDIT"));
        }
    }
    assert!(lab.node.rpc().transaction(&other_txid).unwrap().is_none(), "a refused funding tx was relayed");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // And the channel still works.
    assert_eq!(client.send(&good).unwrap().status, 200);
}
