//! The chain job of the harness: a regtest Bitcoin Core node owned by a guard, a tiny
//! coinbase wallet, and the [`LoopbackRelay`] that lets a controller in a namespace
//! reach the node on its own 127.0.0.1.
//!
//! The node is built by `cargo xtask bitcoind` (no wallet: ENABLE_WALLET=OFF), so
//! tests fund channels from coinbase outputs paid to keys the test holds
//! ([`CoinbaseWallet`]). The node listens on 127.0.0.1 only, on free ports, with a
//! temporary data directory, and is stopped when the guard drops (also on panic).

// Test harness: any failure here must fail the test loudly, so unwrap is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bitcoin::consensus::encode;
use bitcoin::secp256k1::{rand, Message, Secp256k1, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::{absolute, ecdsa, transaction, Address, Amount, Block, CompressedPublicKey};
use bitcoin::{
    Network, OutPoint, PublicKey, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Witness,
};
use bitmesh_channel::chain::{BitcoindAuth, BitcoindRpc, Chain};
use serde_json::json;

use crate::env;
use crate::network::{in_netns, Netns, ServerThread};

/// Version key of the cached build (the libbitcoinkernel-sys version it comes from).
pub const BUILD_KEY: &str = "bitcoin-core-0.4.1";

/// Where `cargo xtask bitcoind` puts the binaries: `$BITMESH_BITCOIND` /
/// `$BITMESH_BITCOIN_CLI`, else `$BITMESH_CACHE` (or `$HOME/.cache/bitmesh`) +
/// `bitcoin-core-0.4.1/bin`.
pub fn binaries() -> (PathBuf, PathBuf) {
    let cache = std::env::var_os("BITMESH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/bitmesh")
        });
    let bin = cache.join(BUILD_KEY).join("bin");
    let d = std::env::var_os("BITMESH_BITCOIND")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin.join("bitcoind"));
    let c = std::env::var_os("BITMESH_BITCOIN_CLI")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin.join("bitcoin-cli"));
    (d, c)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// A running regtest node; dropped = stopped and its data directory removed.
pub struct Bitcoind {
    child: Child,
    datadir: tempfile::TempDir,
    /// JSON-RPC port on 127.0.0.1.
    pub rpc_port: u16,
    /// P2P port on 127.0.0.1.
    pub p2p_port: u16,
    rpc: BitcoindRpc,
}

impl Bitcoind {
    /// Start a node, or skip (returns `None`; panics under CI) if it is not built.
    pub fn start() -> Option<Bitcoind> {
        Self::start_with(|_| {})
    }

    /// Like [`Self::start`], letting the caller adjust the command first (e.g. put
    /// the node in its own process group, so that a Ctrl-C meant for the demo does
    /// not stop the node before the demo's guards stop it in order).
    pub fn start_with(adjust: impl Fn(&mut Command)) -> Option<Bitcoind> {
        let (bitcoind, _cli) = binaries();
        if !bitcoind.exists() {
            env::skip("bitcoind not built: run cargo xtask bitcoind");
            return None;
        }
        // `free_port` only probes: another process (a parallel test, another node)
        // can take the port before bitcoind binds it. Such a start is retried on
        // fresh ports; any other failure is final.
        const ATTEMPTS: u32 = 5;
        for attempt in 1..=ATTEMPTS {
            match Self::try_start(&bitcoind, &adjust) {
                Ok(node) => return Some(node),
                Err(log) if log.contains("Unable to bind") && attempt < ATTEMPTS => {
                    eprintln!("bitcoind could not bind its ports (attempt {attempt}), retrying on others");
                }
                Err(log) => panic!("{log}"),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// One start on freshly probed ports; `Err` carries the reason and the log tail
    /// when the node exits during startup.
    fn try_start(bitcoind: &std::path::Path, adjust: &impl Fn(&mut Command)) -> Result<Bitcoind, String> {
        let datadir = tempfile::Builder::new()
            .prefix("bitmesh-regtest-")
            .tempdir()
            .unwrap();
        let (rpc_port, p2p_port) = (free_port(), free_port());
        let mut cmd = Command::new(bitcoind);
        cmd.arg("-regtest")
            .arg(format!("-datadir={}", datadir.path().display()))
            .arg(format!("-rpcport={rpc_port}"))
            .arg(format!("-port={p2p_port}"))
            .arg(format!("-bind=127.0.0.1:{p2p_port}"))
            .args([
                "-rpcbind=127.0.0.1",
                "-rpcallowip=127.0.0.1",
                "-server=1",
                "-txindex=1",
            ])
            // Regtest accepts non-standard transactions by default; the tests want
            // mainnet relay policy so testmempoolaccept checks standardness too.
            .args([
                "-acceptnonstdtxn=0",
                "-dnsseed=0",
                "-fixedseeds=0",
                "-listenonion=0",
            ])
            .args(["-printtoconsole=0", "-daemon=0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        adjust(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bitcoind.display()));
        let cookie = datadir.path().join("regtest/.cookie");
        let url = format!("http://127.0.0.1:{rpc_port}");
        let mut node = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut child = child;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(datadir.path().join("regtest/debug.log"))
                    .unwrap_or_default();
                let tail: Vec<_> = log.lines().rev().take(20).collect();
                return Err(format!(
                    "bitcoind exited with {status} during startup; debug.log tail:\n{}",
                    tail.join("\n")
                ));
            }
            if cookie.exists() {
                if let Ok(rpc) = BitcoindRpc::new(&url, BitcoindAuth::Cookie(cookie.clone())) {
                    if rpc.tip_height().is_ok() {
                        node = Some(rpc);
                        break;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let Some(rpc) = node else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bitcoind RPC did not answer within 60 s on port {rpc_port}");
        };
        Ok(Bitcoind {
            child,
            datadir,
            rpc_port,
            p2p_port,
            rpc,
        })
    }

    /// The node's RPC client (also the [`Chain`] under test).
    pub fn rpc(&self) -> &BitcoindRpc {
        &self.rpc
    }

    /// RPC URL.
    pub fn rpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.rpc_port)
    }

    /// The cookie file for RPC authentication.
    pub fn cookie_path(&self) -> PathBuf {
        self.datadir.path().join("regtest/.cookie")
    }

    /// Mine `n` blocks paying `script_pubkey`.
    pub fn mine_to(&self, n: u32, address: &Address) {
        self.rpc
            .call_raw("generatetoaddress", &[json!(n), json!(address.to_string())])
            .unwrap();
    }

    /// Mine `n` blocks to a throwaway address.
    pub fn mine(&self, n: u32) {
        let burn = Address::p2wsh(&ScriptBuf::new(), Network::Regtest);
        self.mine_to(n, &burn);
    }

    /// Current tip height.
    pub fn tip(&self) -> absolute::Height {
        self.rpc.tip_height().unwrap()
    }

    /// The block at `height`.
    pub fn block(&self, height: u32) -> Block {
        let hash = self.rpc.call_raw("getblockhash", &[json!(height)]).unwrap();
        let hex = self.rpc.call_raw("getblock", &[hash, json!(0)]).unwrap();
        encode::deserialize_hex(hex.as_str().unwrap()).unwrap()
    }

    /// `testmempoolaccept` for one transaction: `Ok(vsize)` or `Err(reject reason)`.
    pub fn accepts(&self, tx: &Transaction) -> Result<u64, String> {
        let r = self
            .rpc
            .test_mempool_accept(std::slice::from_ref(tx))
            .unwrap()
            .remove(0);
        if r.allowed {
            Ok(r.vsize.unwrap_or(0))
        } else {
            Err(r.reject_reason.unwrap_or_default())
        }
    }
}

impl Bitcoind {
    /// Ask the node to stop (the chain backend dies under a running controller); the
    /// guard still reaps it and removes its data directory on drop.
    pub fn stop(&self) {
        let _ = self.rpc.call_raw("stop", &[]);
    }
}

impl Drop for Bitcoind {
    fn drop(&mut self) {
        // Ask politely, then make sure: a node must never outlive its test.
        let _ = self.rpc.call_raw("stop", &[]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keys the test holds and the mature coinbase outputs paid to them.
pub struct CoinbaseWallet {
    secp: Secp256k1<bitcoin::secp256k1::All>,
    /// Secret key of both addresses.
    pub secret: SecretKey,
    /// Its public key.
    pub public: PublicKey,
    /// P2WPKH address (segwit coinbase outputs).
    pub segwit: Address,
    /// P2PKH address (legacy coinbase outputs, for the non-segwit funding case).
    pub legacy: Address,
    utxos: Vec<(OutPoint, TxOut)>,
    /// Outputs already spent by a transaction this wallet built (for double spends).
    spent: Vec<(OutPoint, TxOut)>,
}

impl CoinbaseWallet {
    /// A new key; mines `segwit_blocks` to its P2WPKH address and `legacy_blocks` to its
    /// P2PKH address, then 100 more blocks so every one of those coinbases is mature.
    pub fn fund(node: &Bitcoind, segwit_blocks: u32, legacy_blocks: u32) -> CoinbaseWallet {
        let secp = Secp256k1::new();
        let secret = SecretKey::new(&mut rand::thread_rng());
        let compressed = CompressedPublicKey(secret.public_key(&secp));
        let public = PublicKey::from(compressed);
        let segwit = Address::p2wpkh(&compressed, Network::Regtest);
        let legacy = Address::p2pkh(compressed, Network::Regtest);
        let start = node.tip().to_consensus_u32() + 1;
        node.mine_to(segwit_blocks, &segwit);
        node.mine_to(legacy_blocks, &legacy);
        node.mine(100);
        let mut utxos = Vec::new();
        for h in start..start + segwit_blocks + legacy_blocks {
            let cb = node.block(h).txdata.remove(0);
            let txid = cb.compute_txid();
            for (vout, out) in cb.output.iter().enumerate() {
                if out.script_pubkey == segwit.script_pubkey()
                    || out.script_pubkey == legacy.script_pubkey()
                {
                    utxos.push((
                        OutPoint {
                            txid,
                            vout: vout as u32,
                        },
                        out.clone(),
                    ));
                }
            }
        }
        CoinbaseWallet {
            secp,
            secret,
            public,
            segwit,
            legacy,
            utxos,
            spent: Vec::new(),
        }
    }

    fn take(&mut self, legacy: bool) -> (OutPoint, TxOut) {
        let spk = if legacy {
            self.legacy.script_pubkey()
        } else {
            self.segwit.script_pubkey()
        };
        let i = self
            .utxos
            .iter()
            .position(|(_, o)| o.script_pubkey == spk)
            .expect("wallet has no coinbase of that kind left");
        let taken = self.utxos.remove(i);
        self.spent.push(taken.clone());
        taken
    }

    /// A transaction conflicting with `tx` (which this wallet built from a P2WPKH
    /// coinbase): it spends the same input back to the wallet, paying `fee`. With a
    /// fee above `tx`'s (and its descendants'), the node replaces `tx` with it (full
    /// RBF): a double spend of everything `tx` paid.
    pub fn conflicting(&self, tx: &Transaction, fee: Amount) -> Transaction {
        let outpoint = tx.input[0].previous_output;
        let (_, prev) = self.spent.iter().find(|(o, _)| *o == outpoint).expect("tx spends an output of this wallet").clone();
        let output = vec![TxOut { value: prev.value - fee, script_pubkey: self.segwit.script_pubkey() }];
        self.sign_p2wpkh_input(unsigned_spend(outpoint, output), &prev)
    }

    /// A signed transaction paying `value` to `script_pubkey` (output 0), change back
    /// to the wallet (output 1), 2 sat/vB. Spends a P2PKH coinbase when `legacy`.
    pub fn pay(&mut self, script_pubkey: &ScriptBuf, value: Amount, legacy: bool) -> Transaction {
        let (outpoint, prev) = self.take(legacy);
        let fee = Amount::from_sat(if legacy { 2 * 230 } else { 2 * 145 });
        let output = vec![
            TxOut { value, script_pubkey: script_pubkey.clone() },
            TxOut { value: prev.value - value - fee, script_pubkey: self.segwit.script_pubkey() },
        ];
        let mut tx = unsigned_spend(outpoint, output);
        if legacy {
            let hash = SighashCache::new(&tx)
                .legacy_signature_hash(0, &prev.script_pubkey, EcdsaSighashType::All.to_u32())
                .unwrap();
            let sig = self.secp.sign_ecdsa(&Message::from(hash), &self.secret);
            let sig = ecdsa::Signature {
                signature: sig,
                sighash_type: EcdsaSighashType::All,
            };
            let script_sig = bitcoin::script::Builder::new()
                .push_slice(
                    <&bitcoin::script::PushBytes>::try_from(sig.to_vec().as_slice()).unwrap(),
                )
                .push_key(&self.public)
                .into_script();
            tx.input[0].script_sig = script_sig;
            tx
        } else {
            self.sign_p2wpkh_input(tx, &prev)
        }
    }

    /// A signed transaction paying each of `outputs` (outputs 0..n, in order), change
    /// back to the wallet last, 2 sat/vB, spending one P2WPKH coinbase: funds many
    /// channels at once.
    pub fn pay_many(&mut self, outputs: &[TxOut]) -> Transaction {
        let (outpoint, prev) = self.take(false);
        // 1 P2WPKH input (~68 vB) + n outputs + change + overhead, rounded up.
        let vsize: u64 = 11 + 69 + 31 + outputs.iter().map(|o| 9 + o.script_pubkey.len() as u64).sum::<u64>();
        let fee = Amount::from_sat(2 * vsize);
        let spent: Amount = outputs.iter().map(|o| o.value).sum();
        let mut output = outputs.to_vec();
        output.push(TxOut {
            value: prev.value - spent - fee,
            script_pubkey: self.segwit.script_pubkey(),
        });
        self.sign_p2wpkh_input(unsigned_spend(outpoint, output), &prev)
    }

    /// Sign input 0 of `tx`, which spends the wallet's P2WPKH output `prev`.
    fn sign_p2wpkh_input(&self, mut tx: Transaction, prev: &TxOut) -> Transaction {
        let hash = SighashCache::new(&tx)
            .p2wpkh_signature_hash(0, &prev.script_pubkey, prev.value, EcdsaSighashType::All)
            .unwrap();
        let sig = self.secp.sign_ecdsa(&Message::from(hash), &self.secret);
        let sig = ecdsa::Signature {
            signature: sig,
            sighash_type: EcdsaSighashType::All,
        };
        tx.input[0].witness = Witness::p2wpkh(&sig, &self.public.inner);
        tx
    }
}

/// Version 2, no lock time, one RBF-signalling input spending `outpoint`, unsigned.
fn unsigned_spend(outpoint: OutPoint, output: Vec<TxOut>) -> Transaction {
    Transaction {
        version: transaction::Version::TWO,
        lock_time: absolute::LockTime::ZERO,
        input: vec![TxIn {
            previous_output: outpoint,
            script_sig: ScriptBuf::new(),
            sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
            witness: Witness::new(),
        }],
        output,
    }
}

/// Forwards `127.0.0.1:<port>` inside a namespace to `target` in the test's own
/// namespace (one thread per direction per connection): the controller reaches the
/// regtest node on its loopback exactly as on a Pi, and the test keeps calling the
/// node directly. Stopped on drop; open connections end when either side closes.
pub struct LoopbackRelay {
    /// The port on 127.0.0.1 inside the namespace.
    pub port: u16,
    _server: ServerThread,
}

impl LoopbackRelay {
    /// Listen on 127.0.0.1:`port` (0 = any) inside `ns`, forwarding to `target`.
    pub fn start(ns: &Netns, port: u16, target: SocketAddr) -> anyhow::Result<LoopbackRelay> {
        // The listening socket belongs to the namespace it was created in; the
        // accepting thread (and the outgoing connections) stay in ours.
        let listener = in_netns(ns, || Ok(TcpListener::bind(("127.0.0.1", port))?))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let server = ServerThread::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inside, _)) => {
                        let _ = inside.set_nonblocking(false);
                        let Ok(outside) = TcpStream::connect(target) else { continue };
                        let _ = inside.set_nodelay(true);
                        let _ = outside.set_nodelay(true);
                        pump(inside, outside);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(LoopbackRelay { port, _server: server })
    }

    /// `http://127.0.0.1:<port>` (the URL to give the controller).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Copy bytes both ways between two connected streams until either side closes
/// (the relays' forwarding; also used by `lightning::IntoNetnsRelay`).
pub(crate) fn pump(a: TcpStream, b: TcpStream) {
    pump_holding(a, b, None)
}

/// [`pump`], and while `hold_a_to_b` is set, bytes from `a` wait in the relay
/// instead of reaching `b` (a slow path, for tests that need a message late).
pub(crate) fn pump_holding(a: TcpStream, b: TcpStream, hold_a_to_b: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    let copy = |mut from: TcpStream, mut to: TcpStream, hold: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        while hold.as_ref().is_some_and(|h| h.load(Ordering::SeqCst)) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Read);
        });
    };
    copy(a, b2, hold_a_to_b);
    copy(b, a2, None);
}
