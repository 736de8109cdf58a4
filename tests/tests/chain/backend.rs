//! The chain trait's backends: Bitcoin Core RPC against a real regtest node, and the
//! error reporting of both backends when the server is unreachable.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test should panic

use bitcoin::{Amount, FeeRate, OutPoint, ScriptBuf};
use bitmesh_channel::chain::{BitcoindAuth, BitcoindRpc, Chain, ChainError, Esplora};
use bitmesh_tests::chain::{Bitcoind, CoinbaseWallet};

fn closed_port() -> u16 {
    // Bind and drop: nothing listens there afterwards.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn bitcoind_backend_follows_a_transaction_from_mempool_to_spent() {
    let Some(node) = Bitcoind::start() else {
        return;
    };
    let mut wallet = CoinbaseWallet::fund(&node, 2, 0);
    let rpc = node.rpc();
    assert_eq!(rpc.backend(), "bitcoind");
    let target = ScriptBuf::new_p2wpkh(&wallet.public.wpubkey_hash().unwrap());
    let tx = wallet.pay(&target, Amount::from_sat(70_000), false);
    let txid = tx.compute_txid();
    let accept = rpc.test_mempool_accept(std::slice::from_ref(&tx)).unwrap();
    assert!(accept[0].allowed && accept[0].txid == txid);
    assert_eq!(rpc.broadcast(&tx).unwrap(), txid);
    assert_eq!(
        rpc.broadcast(&tx).unwrap(),
        txid,
        "re-broadcast is not an error"
    );

    let st = rpc.transaction(&txid).unwrap().unwrap();
    assert_eq!((st.confirmations, st.block_height), (0, None));
    let out = rpc
        .unspent_output(&OutPoint { txid, vout: 0 })
        .unwrap()
        .unwrap();
    assert_eq!(
        (out.txout.value, out.confirmations),
        (Amount::from_sat(70_000), 0)
    );

    node.mine(2);
    let st = rpc.transaction(&txid).unwrap().unwrap();
    assert_eq!(st.confirmations, 2);
    assert_eq!(
        st.block_height.unwrap().to_consensus_u32(),
        node.tip().to_consensus_u32() - 1
    );
    assert_eq!(
        rpc.unspent_output(&OutPoint { txid, vout: 0 })
            .unwrap()
            .unwrap()
            .confirmations,
        2
    );
    assert!(rpc
        .unspent_output(&OutPoint { txid, vout: 7 })
        .unwrap()
        .is_none());
}

#[test]
fn rejected_broadcast_names_the_backend_and_the_reason() {
    let Some(node) = Bitcoind::start() else {
        return;
    };
    let mut wallet = CoinbaseWallet::fund(&node, 1, 0);
    let target = ScriptBuf::new_p2wpkh(&wallet.public.wpubkey_hash().unwrap());
    let mut tx = wallet.pay(&target, Amount::from_sat(70_000), false);
    tx.input[0].witness.clear(); // no signature
    let err = node.rpc().broadcast(&tx).unwrap_err();
    assert!(
        matches!(
            err,
            ChainError::Rejected {
                backend: "bitcoind",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().starts_with("bitcoind rejected transaction"),
        "{err}"
    );
}

#[test]
fn user_password_auth_works_and_a_wrong_password_is_reported() {
    let Some(node) = Bitcoind::start() else {
        return;
    };
    // The cookie is "__cookie__:<password>": use it as plain user/password.
    let cookie = std::fs::read_to_string(node.cookie_path()).unwrap();
    let (user, pass) = cookie.trim().split_once(':').unwrap();
    let ok = BitcoindRpc::new(
        &node.rpc_url(),
        BitcoindAuth::UserPass(user.into(), pass.into()),
    )
    .unwrap();
    assert_eq!(ok.tip_height().unwrap(), node.tip());
    let bad = BitcoindRpc::new(
        &node.rpc_url(),
        BitcoindAuth::UserPass(user.into(), "wrong".into()),
    )
    .unwrap();
    let err = bad.tip_height().unwrap_err();
    assert!(
        err.to_string().starts_with("bitcoind getblockcount failed"),
        "{err}"
    );
}

#[test]
fn fee_rate_never_goes_below_the_floor() {
    let Some(node) = Bitcoind::start() else {
        return;
    };
    for floor in [1, 2, 25] {
        let floor = FeeRate::from_sat_per_vb_u32(floor);
        assert_eq!(
            node.rpc().fee_rate(3, floor).unwrap(),
            floor,
            "no estimate on regtest"
        );
    }
}

#[test]
fn unreachable_backends_say_which_backend_and_call_failed() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let rpc = BitcoindRpc::new(&url, BitcoindAuth::UserPass("u".into(), "p".into())).unwrap();
    let err = rpc.tip_height().unwrap_err().to_string();
    assert!(err.starts_with("bitcoind getblockcount failed"), "{err}");

    let missing =
        BitcoindRpc::new(&url, BitcoindAuth::Cookie("/nonexistent/.cookie".into())).unwrap_err();
    assert!(
        missing.to_string().contains("cannot read cookie file"),
        "{missing}"
    );

    let esplora = Esplora::new(&url);
    assert_eq!(esplora.backend(), "esplora");
    let err = esplora.tip_height().unwrap_err().to_string();
    assert!(
        err.starts_with("esplora GET /blocks/tip/height failed"),
        "{err}"
    );
    let err = esplora.test_mempool_accept(&[]).unwrap_err();
    assert!(matches!(
        err,
        ChainError::Unsupported {
            backend: "esplora",
            call: "testmempoolaccept"
        }
    ));
}

#[test]
fn bitcoind_backend_finds_confirmed_outputs_paying_a_script() {
    let Some(node) = Bitcoind::start() else {
        return;
    };
    let mut wallet = CoinbaseWallet::fund(&node, 2, 0);
    let rpc = node.rpc();
    let target = ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_raw_hash(bitcoin::hashes::Hash::all_zeros()));
    assert!(rpc.outputs_paying(&target).unwrap().is_empty(), "nothing pays it yet");
    let tx = wallet.pay(&target, Amount::from_sat(70_000), false);
    rpc.broadcast(&tx).unwrap();
    // scantxoutset reads the UTXO set: a mempool payment is not there yet.
    assert!(rpc.outputs_paying(&target).unwrap().is_empty());
    node.mine(1);
    let found = rpc.outputs_paying(&target).unwrap();
    let vout = tx.output.iter().position(|o| o.script_pubkey == target).unwrap() as u32;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].outpoint, OutPoint { txid: tx.compute_txid(), vout });
    assert_eq!((found[0].value, found[0].confirmations), (Amount::from_sat(70_000), 1));
}

/// An HTTP server standing in for Esplora: answers a GET whose path starts with one
/// of the prefixes with that body, anything else with 404.
fn fake_esplora(routes: Vec<(&'static str, String)>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            // Drain the headers.
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let (status, body) = match routes.iter().find(|(p, _)| path.starts_with(p)) {
                Some((_, body)) => ("200 OK", body.clone()),
                None => ("404 Not Found", String::new()),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

#[test]
fn esplora_backend_finds_outputs_paying_a_script_mempool_included() {
    let txid = "5a".repeat(32);
    let utxos = format!(
        r#"[{{"txid":"{t}","vout":1,"status":{{"confirmed":true,"block_height":95,"block_hash":"{h}","block_time":1700000000}},"value":70000}},
            {{"txid":"{t}","vout":2,"status":{{"confirmed":false}},"value":5000}}]"#,
        t = txid,
        h = "00".repeat(32)
    );
    let url = fake_esplora(vec![("/scripthash/", utxos), ("/blocks/tip/height", "100".to_owned())]);
    let esplora = Esplora::new(&url);
    let target = ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_raw_hash(bitcoin::hashes::Hash::all_zeros()));
    let found = esplora.outputs_paying(&target).unwrap();
    let txid: bitcoin::Txid = txid.parse().unwrap();
    let got: Vec<_> = found.iter().map(|u| (u.outpoint, u.value.to_sat(), u.confirmations)).collect();
    assert_eq!(
        got,
        vec![(OutPoint { txid, vout: 1 }, 70_000, 6), (OutPoint { txid, vout: 2 }, 5_000, 0)],
        "confirmed at 95 with the tip at 100: 6 confirmations; the mempool one: 0"
    );
}

#[test]
fn a_node_without_txindex_is_refused_with_one_sentence_and_one_with_it_is_ready() {
    let Some(indexed) = Bitcoind::start() else {
        return;
    };
    indexed.rpc().check_ready().expect("a node with -txindex=1 is ready");
    // A pruned node cannot have a txindex; any node without one is refused up front
    // instead of failing later on a confirmed transaction lookup.
    let Some(plain) = Bitcoind::start_with(|cmd| {
        cmd.arg("-txindex=0");
    }) else {
        return;
    };
    let err = plain.rpc().check_ready().expect_err("a node without -txindex is refused");
    let text = err.to_string();
    assert!(text.contains("-txindex=1"), "{text}");
    assert_eq!(text.lines().count(), 1, "one sentence: {text}");
}
