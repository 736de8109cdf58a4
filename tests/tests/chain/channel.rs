//! Payment channels against a real regtest Bitcoin Core node (docs/design.md section 4,
//! test layer 4). Every transaction the library builds goes through the node's
//! `testmempoolaccept` before it is broadcast.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test should panic

use std::collections::HashSet;

use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{absolute, Amount, FeeRate, Network, OutPoint, PublicKey, ScriptBuf, Transaction};
use bitmesh_channel::chain::Chain;
use bitmesh_channel::*;
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::wire::{ChannelLimits, SignatureBytes};
use bitmesh_tests::chain::{Bitcoind, CoinbaseWallet};

const CAPACITY: Amount = Amount::from_sat(200_000);

fn h(n: u32) -> absolute::Height {
    absolute::Height::from_consensus(n).unwrap()
}

fn policy(seed: &GatewaySeed) -> ChannelPolicy {
    let payout = seed.channel_key(1_000_000).unwrap().public;
    ChannelPolicy {
        limits: ChannelLimits {
            min_capacity: Amount::from_sat(50_000),
            max_capacity: Amount::from_sat(5_000_000),
            zero_conf_cap: Amount::from_sat(100_000),
            confirmations_required: 1,
            min_expiry_blocks: BlockCount(20),
            max_expiry_blocks: BlockCount(2_000),
            close_margin_blocks: BlockCount(6),
            close_fee_rate: FeeRate::from_sat_per_vb_u32(2),
        },
        gateway_payout_script: ScriptBuf::new_p2wpkh(&payout.wpubkey_hash().unwrap()),
    }
}

/// The client's side of one channel.
struct Client {
    secret: SecretKey,
    public: PublicKey,
    change: ScriptBuf,
}

fn client() -> Client {
    let secp = Secp256k1::new();
    let secret = SecretKey::new(&mut bitcoin::secp256k1::rand::thread_rng());
    let public = PublicKey::new(secret.public_key(&secp));
    let change = ScriptBuf::new_p2wpkh(&public.wpubkey_hash().unwrap());
    Client {
        secret,
        public,
        change,
    }
}

/// What the gateway stores per channel; verification never mutates it on failure.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    channel: Channel,
    key: ChannelKey,
    last: Option<VerifiedUpdate>,
}

impl Record {
    fn total(&self) -> Amount {
        self.last.map_or(Amount::ZERO, |u| u.total_paid)
    }
}

struct World {
    node: Bitcoind,
    wallet: CoinbaseWallet,
    seed: GatewaySeed,
    policy: ChannelPolicy,
    outpoints: HashSet<OutPoint>,
    next_index: u32,
}

impl World {
    fn new() -> Option<World> {
        let node = Bitcoind::start()?;
        let wallet = CoinbaseWallet::fund(&node, 8, 1);
        let seed = GatewaySeed::from_seed(&[42; 32], Network::Regtest).unwrap();
        let policy = policy(&seed);
        Some(World {
            node,
            wallet,
            seed,
            policy,
            outpoints: HashSet::new(),
            next_index: 0,
        })
    }

    fn tip(&self) -> absolute::Height {
        self.node.tip()
    }

    /// Open (check_open + key), fund through the node, verify funding: a Record.
    fn open(
        &mut self,
        c: &Client,
        capacity: Amount,
        expiry_in: u32,
    ) -> Result<(Record, Transaction), ChannelError> {
        let tip = self.tip();
        let expiry = h(tip.to_consensus_u32() + expiry_in);
        check_open(&c.public, expiry, &c.change, tip, &self.policy)?;
        let key = self.seed.channel_key(self.next_index).unwrap();
        self.next_index += 1;
        let script = ChannelScript {
            gateway: key.public,
            client: c.public,
            expiry,
        };
        let funding = self.wallet.pay(&script.script_pubkey(), capacity, false);
        self.node
            .accepts(&funding)
            .expect("funding passes testmempoolaccept");
        self.node.rpc().broadcast(&funding).unwrap();
        self.node.mine(1);
        let record = self.accept_funding(script, &funding, c)?;
        Ok((record, funding))
    }

    fn accept_funding(
        &mut self,
        script: ChannelScript,
        funding: &Transaction,
        c: &Client,
    ) -> Result<Record, ChannelError> {
        let txid = funding.compute_txid();
        let confirmations = self
            .node
            .rpc()
            .transaction(&txid)
            .unwrap()
            .map_or(0, |s| s.confirmations);
        let outpoint = OutPoint { txid, vout: 0 };
        let check = FundingCheck {
            tx: funding,
            vout: 0,
            confirmations,
            outpoint_in_use: self.outpoints.contains(&outpoint),
            tip: self.tip(),
        };
        let ok = verify_funding(&script, check, &self.policy)?;
        self.outpoints.insert(ok.outpoint);
        let key = self.seed.channel_key(self.next_index - 1).unwrap();
        let channel = Channel {
            script,
            funding_outpoint: ok.outpoint,
            capacity: ok.capacity,
            client_change_script: c.change.clone(),
            min_first_payment: self.policy.min_first_payment(),
        };
        Ok(Record {
            channel,
            key,
            last: None,
        })
    }

    fn pay(&self, r: &mut Record, c: &Client, total: Amount) -> Result<(), ChannelError> {
        let sig = sign_update(&r.channel, total, &c.secret)?;
        let u = verify_update(
            &r.channel,
            &r.key,
            &self.policy,
            r.total(),
            self.tip(),
            total,
            &sig,
        )?;
        r.last = Some(u);
        Ok(())
    }

    fn close(&self, records: &[&Record]) -> CloseTx {
        let inputs: Vec<CloseInput<'_>> = records
            .iter()
            .map(|r| CloseInput {
                channel: &r.channel,
                gateway_key: &r.key.secret,
                update: r.last.as_ref().unwrap(),
            })
            .collect();
        build_close(
            &inputs,
            &self.policy.gateway_payout_script,
            self.policy.limits.close_fee_rate,
        )
        .unwrap()
    }

    fn broadcast_and_confirm(&self, tx: &Transaction) -> u64 {
        let vsize = self
            .node
            .accepts(tx)
            .unwrap_or_else(|r| panic!("node rejects {}: {r}", tx.compute_txid()));
        self.node.rpc().broadcast(tx).unwrap();
        self.node.mine(1);
        let st = self
            .node
            .rpc()
            .transaction(&tx.compute_txid())
            .unwrap()
            .unwrap();
        assert_eq!(st.confirmations, 1, "confirmed in the next block");
        vsize
    }
}

#[test]
fn hundred_increasing_updates_then_close_pays_each_side_exactly() {
    let Some(mut w) = World::new() else { return };
    let c = client();
    let (mut r, funding) = w.open(&c, CAPACITY, 100).unwrap();
    eprintln!(
        "MEASURE funding vsize (1 P2WPKH in, P2WSH + P2WPKH out): {}",
        funding.vsize()
    );
    let first = w.policy.min_first_payment();
    for i in 0..100u64 {
        w.pay(&mut r, &c, first + Amount::from_sat(i * 1_000))
            .unwrap();
    }
    let last = r.last.unwrap();
    assert_eq!(last.total_paid, first + Amount::from_sat(99_000));
    let close = w.close(&[&r]);
    let vsize = w.broadcast_and_confirm(&close.tx);
    eprintln!("MEASURE close vsize (1 channel): {vsize}");
    let out = &close.tx.output;
    assert_eq!(out[0].script_pubkey, c.change);
    assert_eq!(
        out[0].value,
        CAPACITY - last.total_paid,
        "client gets exactly its change"
    );
    assert_eq!(out[1].script_pubkey, w.policy.gateway_payout_script);
    assert_eq!(
        out[1].value,
        last.total_paid - close.fee,
        "gateway gets the total minus the fee"
    );
    assert!(
        w.node
            .rpc()
            .unspent_output(&r.channel.funding_outpoint)
            .unwrap()
            .is_none(),
        "funding spent"
    );
}

#[test]
fn three_channels_close_in_one_batch_transaction() {
    let Some(mut w) = World::new() else { return };
    let clients = [client(), client(), client()];
    let mut records = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let (mut r, _) = w.open(c, CAPACITY, 100).unwrap();
        // The third channel is paid in full: no change output, SIGHASH_NONE.
        let total = if i == 2 {
            CAPACITY
        } else {
            w.policy.min_first_payment() + Amount::from_sat(10_000 * (i as u64 + 1))
        };
        w.pay(&mut r, c, total).unwrap();
        records.push(r);
    }
    let refs: Vec<&Record> = records.iter().collect();
    let close = w.close(&refs);
    assert_eq!(close.tx.input.len(), 3);
    assert_eq!(
        close.tx.output.len(),
        3,
        "two client changes + the gateway payout"
    );
    let vsize = w.broadcast_and_confirm(&close.tx);
    eprintln!("MEASURE close vsize (3-channel batch): {vsize}");
    let paid: Amount = records.iter().map(|r| r.total()).sum();
    assert_eq!(close.gateway_amount, paid - close.fee);
    for r in &records[..2] {
        let out = close
            .tx
            .output
            .iter()
            .find(|o| o.script_pubkey == r.channel.client_change_script)
            .unwrap();
        assert_eq!(out.value, CAPACITY - r.total());
    }
}

#[test]
fn refund_is_rejected_until_expiry_and_accepted_after() {
    let Some(mut w) = World::new() else { return };
    let c = client();
    let (r, _) = w.open(&c, CAPACITY, 25).unwrap();
    let expiry = r.channel.script.expiry.to_consensus_u32();
    let refund = build_refund(
        &r.channel,
        &c.secret,
        &c.change,
        FeeRate::from_sat_per_vb_u32(2),
    )
    .unwrap();
    // A transaction in the mempool goes into block tip+1; nLockTime = expiry means
    // only blocks above expiry may hold it.
    while w.tip().to_consensus_u32() < expiry {
        let reason = w.node.accepts(&refund).unwrap_err();
        assert!(
            reason.contains("non-final"),
            "next block {}: {reason}",
            w.tip().to_consensus_u32() + 1
        );
        assert!(w.node.rpc().broadcast(&refund).is_err());
        w.node.mine(1);
    }
    assert_eq!(w.tip().to_consensus_u32(), expiry);
    let vsize = w.broadcast_and_confirm(&refund);
    eprintln!("MEASURE refund vsize: {vsize}");
    let st = w
        .node
        .rpc()
        .transaction(&refund.compute_txid())
        .unwrap()
        .unwrap();
    assert_eq!(
        st.block_height,
        Some(h(expiry + 1)),
        "refund mined at expiry + 1"
    );
}

/// Flip S to n - S (same signature, high-S form).
fn high_s(sig: &SignatureBytes) -> SignatureBytes {
    let (flag, der) = sig.0.split_last().unwrap();
    let s = bitcoin::secp256k1::ecdsa::Signature::from_der(der).unwrap();
    let mut compact = s.serialize_compact();
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xfe, 0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36,
        0x41, 0x41,
    ];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = N[i] as i16 - compact[32 + i] as i16 - borrow;
        compact[32 + i] = d.rem_euclid(256) as u8;
        borrow = i16::from(d < 0);
    }
    let high = bitcoin::secp256k1::ecdsa::Signature::from_compact(&compact).unwrap();
    let mut bytes = high.serialize_der().to_vec();
    bytes.push(*flag);
    SignatureBytes(bytes)
}

#[test]
fn adversarial_funding_is_rejected_each_with_its_own_code() {
    let Some(mut w) = World::new() else { return };
    let c = client();
    let tip = w.tip().to_consensus_u32();
    // Opening-time expiry checks.
    let cases_open = [
        ("expiry already past", tip, "expiry_in_past"),
        ("expiry too close", tip + 5, "expiry_too_close"),
    ];
    for (name, expiry, code) in cases_open {
        let err = check_open(&c.public, h(expiry), &c.change, w.tip(), &w.policy).unwrap_err();
        assert_eq!(err.code().as_str(), code, "{name}: {err}");
    }

    let (good, good_funding) = w.open(&c, CAPACITY, 100).unwrap();
    let script = good.channel.script;
    let other_script = ChannelScript {
        expiry: h(script.expiry.to_consensus_u32() + 1),
        ..script
    };

    struct Case {
        name: &'static str,
        funding: Transaction,
        mine: bool,
        code: &'static str,
    }
    let cases = vec![
        Case {
            name: "wrong script",
            funding: w.wallet.pay(&other_script.script_pubkey(), CAPACITY, false),
            mine: true,
            code: "funding_script_mismatch",
        },
        Case {
            name: "wrong value",
            funding: w
                .wallet
                .pay(&script.script_pubkey(), Amount::from_sat(10_000), false),
            mine: true,
            code: "capacity_out_of_range",
        },
        Case {
            name: "duplicate outpoint",
            funding: good_funding.clone(),
            mine: false,
            code: "duplicate_outpoint",
        },
        Case {
            name: "non-segwit funding input",
            funding: w.wallet.pay(&script.script_pubkey(), CAPACITY, true),
            mine: true,
            code: "funding_input_not_segwit",
        },
        Case {
            name: "unconfirmed above zero-conf cap",
            funding: w.wallet.pay(&script.script_pubkey(), CAPACITY, false),
            mine: false,
            code: "funding_unconfirmed",
        },
    ];
    for case in cases {
        if case.funding != good_funding {
            w.node
                .accepts(&case.funding)
                .unwrap_or_else(|r| panic!("{}: node rejects: {r}", case.name));
            w.node.rpc().broadcast(&case.funding).unwrap();
            if case.mine {
                w.node.mine(1);
            }
        }
        let before = w.outpoints.clone();
        let err = w.accept_funding(script, &case.funding, &c).unwrap_err();
        assert_eq!(err.code().as_str(), case.code, "{}: {err}", case.name);
        assert_eq!(w.outpoints, before, "{}: no state change", case.name);
    }
    // Unconfirmed funding under the cap is accepted (zero-conf).
    let small = w
        .wallet
        .pay(&script.script_pubkey(), Amount::from_sat(60_000), false);
    w.node.rpc().broadcast(&small).unwrap();
    w.accept_funding(script, &small, &c)
        .expect("zero-conf under the cap");
    w.node.mine(1);
    // Expiry checked again at funding time: too close now.
    let late = ChannelScript {
        expiry: h(w.tip().to_consensus_u32() + 3),
        ..script
    };
    let f = w.wallet.pay(&late.script_pubkey(), CAPACITY, false);
    w.node.rpc().broadcast(&f).unwrap();
    w.node.mine(1);
    let err = w.accept_funding(late, &f, &c).unwrap_err();
    assert_eq!(err.code().as_str(), "expiry_too_close");
}

#[test]
fn adversarial_updates_are_rejected_each_with_its_own_code_and_change_nothing() {
    let Some(mut w) = World::new() else { return };
    let c = client();
    let (mut r, _) = w.open(&c, CAPACITY, 60).unwrap();
    let (mut other, _) = w.open(&c, CAPACITY, 60).unwrap();
    let first = w.policy.min_first_payment();
    w.pay(&mut r, &c, first).unwrap();
    w.pay(&mut other, &c, first).unwrap();
    let next = first + Amount::from_sat(1_000);
    let good = sign_update(&r.channel, next, &c.secret).unwrap();
    let mut bad = good.clone();
    let n = bad.0.len();
    bad.0[n - 3] ^= 0x01;
    let mut all_flag = good.clone();
    *all_flag.0.last_mut().unwrap() = 0x01;
    let for_other = sign_update(&other.channel, next, &c.secret).unwrap();
    let dust_total = CAPACITY - Amount::from_sat(100);
    let mut expensive = w.policy.clone();
    expensive.limits.close_fee_rate = FeeRate::from_sat_per_vb_u32(500);

    type Case = (
        &'static str,
        Amount,
        SignatureBytes,
        Option<ChannelPolicy>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "total not strictly increasing",
            first,
            sign_update(&r.channel, first, &c.secret).unwrap(),
            None,
            "amount_not_increasing",
        ),
        (
            "total above capacity",
            CAPACITY + Amount::from_sat(1),
            good.clone(),
            None,
            "amount_above_capacity",
        ),
        ("bad signature", next, bad, None, "signature_invalid"),
        (
            "high-S signature",
            next,
            high_s(&good),
            None,
            "signature_high_s",
        ),
        (
            "wrong sighash flag",
            next,
            all_flag,
            None,
            "wrong_sighash_flag",
        ),
        (
            "client change below dust",
            dust_total,
            good.clone(),
            None,
            "client_change_below_dust",
        ),
        (
            "gateway output below dust after fee",
            next,
            good.clone(),
            Some(expensive),
            "gateway_output_below_dust",
        ),
        (
            "signature made for another channel",
            next,
            for_other,
            None,
            "signature_invalid",
        ),
    ];
    for (name, total, sig, pol, code) in cases {
        let before = r.clone();
        let pol = pol.unwrap_or_else(|| w.policy.clone());
        let err =
            verify_update(&r.channel, &r.key, &pol, r.total(), w.tip(), total, &sig).unwrap_err();
        assert_eq!(err.code().as_str(), code, "{name}: {err}");
        assert_eq!(r, before, "{name}: no state change");
    }
    // After all that, the honest next update still goes through.
    w.pay(&mut r, &c, next).unwrap();

    // Past expiry - close_margin the channel takes no more payments.
    let ends = r
        .channel
        .crediting_ends_at(w.policy.limits.close_margin_blocks)
        .to_consensus_u32();
    w.node.mine(ends - w.tip().to_consensus_u32());
    let more = next + Amount::from_sat(1_000);
    let sig = sign_update(&r.channel, more, &c.secret).unwrap();
    let err = verify_update(
        &r.channel,
        &r.key,
        &w.policy,
        r.total(),
        w.tip(),
        more,
        &sig,
    )
    .unwrap_err();
    assert_eq!(err.code().as_str(), "channel_expired");
    // The gateway still closes, before the refund becomes valid.
    let close = w.close(&[&r]);
    w.broadcast_and_confirm(&close.tx);
}

#[test]
fn close_fee_is_bumped_by_replacing_the_close() {
    let Some(mut w) = World::new() else { return };
    let c = client();
    let (mut r, _) = w.open(&c, CAPACITY, 100).unwrap();
    w.pay(
        &mut r,
        &c,
        w.policy.min_first_payment() + Amount::from_sat(20_000),
    )
    .unwrap();
    let low = w.close(&[&r]);
    w.node.accepts(&low.tx).unwrap();
    w.node.rpc().broadcast(&low.tx).unwrap();
    // Same inputs, higher fee rate: the node replaces the first close (BIP125 signal).
    let inputs = [CloseInput {
        channel: &r.channel,
        gateway_key: &r.key.secret,
        update: r.last.as_ref().unwrap(),
    }];
    let high = build_close(
        &inputs,
        &w.policy.gateway_payout_script,
        FeeRate::from_sat_per_vb_u32(10),
    )
    .unwrap();
    assert!(high.fee > low.fee);
    assert_eq!(
        high.tx.output[0], low.tx.output[0],
        "the client's change is untouched by the bump"
    );
    w.node.rpc().broadcast(&high.tx).unwrap();
    assert!(
        w.node
            .rpc()
            .transaction(&low.tx.compute_txid())
            .unwrap()
            .is_none(),
        "replaced"
    );
    w.node.mine(1);
    assert_eq!(
        w.node
            .rpc()
            .transaction(&high.tx.compute_txid())
            .unwrap()
            .unwrap()
            .confirmations,
        1
    );
}

#[test]
fn fee_estimate_falls_back_to_the_floor_on_a_quiet_chain() {
    let Some(w) = World::new() else { return };
    let floor = FeeRate::from_sat_per_vb_u32(3);
    assert_eq!(w.node.rpc().fee_rate(6, floor).unwrap(), floor);
    assert!(w
        .node
        .rpc()
        .transaction(&bitcoin::Txid::from_byte_array([9; 32]))
        .unwrap()
        .is_none());
}

use bitcoin::hashes::Hash;
