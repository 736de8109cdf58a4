//! Host tests of signing and verification (no chain: the funding outpoint is made up).
//! The same rules against a real node are in `tests/tests/chain_channel.rs`.

use bitcoin::hashes::Hash;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{absolute, Amount, FeeRate, Network, OutPoint, PublicKey, ScriptBuf, Txid};
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::wire::ChannelLimits;

use crate::*;

struct Fixture {
    channel: Channel,
    gateway: ChannelKey,
    client: SecretKey,
    policy: ChannelPolicy,
    tip: absolute::Height,
}

fn fixture() -> Fixture {
    let seed = GatewaySeed::from_seed(&[3; 32], Network::Regtest).unwrap();
    let gateway = seed.channel_key(0).unwrap();
    let client = SecretKey::from_slice(&[7; 32]).unwrap();
    let client_pk = PublicKey::new(client.public_key(secp()));
    let payout = ScriptBuf::new_p2wpkh(&gateway.public.wpubkey_hash().unwrap());
    let policy = ChannelPolicy {
        limits: ChannelLimits {
            min_capacity: Amount::from_sat(10_000),
            max_capacity: Amount::from_sat(10_000_000),
            zero_conf_cap: Amount::from_sat(100_000),
            confirmations_required: 1,
            min_expiry_blocks: BlockCount(20),
            max_expiry_blocks: BlockCount(1000),
            close_margin_blocks: BlockCount(6),
            close_fee_rate: FeeRate::from_sat_per_vb_u32(2),
        },
        gateway_payout_script: payout,
    };
    let channel = Channel {
        script: ChannelScript {
            gateway: gateway.public,
            client: client_pk,
            expiry: absolute::Height::from_consensus(300).unwrap(),
        },
        funding_outpoint: OutPoint {
            txid: Txid::from_byte_array([5; 32]),
            vout: 1,
        },
        capacity: Amount::from_sat(100_000),
        client_change_script: ScriptBuf::new_p2wpkh(&client_pk.wpubkey_hash().unwrap()),
        min_first_payment: policy.min_first_payment(),
    };
    Fixture {
        channel,
        gateway,
        client,
        policy,
        tip: absolute::Height::from_consensus(200).unwrap(),
    }
}

fn verify(
    f: &Fixture,
    last: u64,
    total: u64,
    sig: &bitmesh_common::wire::SignatureBytes,
) -> Result<VerifiedUpdate, ChannelError> {
    verify_update(
        &f.channel,
        &f.gateway,
        &f.policy,
        Amount::from_sat(last),
        f.tip,
        Amount::from_sat(total),
        sig,
    )
}

#[test]
fn client_signed_update_verifies_and_builds_a_valid_close() {
    let f = fixture();
    let sig = sign_update(&f.channel, Amount::from_sat(5_000), &f.client).unwrap();
    let u = verify(&f, 0, 5_000, &sig).unwrap();
    assert_eq!(u.client_change, Amount::from_sat(95_000));
    let close = build_close(
        &[CloseInput {
            channel: &f.channel,
            gateway_key: &f.gateway.secret,
            update: &u,
        }],
        &f.policy.gateway_payout_script,
        f.policy.limits.close_fee_rate,
    )
    .unwrap();
    assert_eq!(close.tx.output[0].value, Amount::from_sat(95_000));
    assert_eq!(close.gateway_amount + close.fee, Amount::from_sat(5_000));
}

#[test]
fn paying_the_whole_capacity_uses_sighash_none() {
    let f = fixture();
    let sig = sign_update(&f.channel, f.channel.capacity, &f.client).unwrap();
    assert_eq!(*sig.0.last().unwrap(), 0x82);
    let u = verify(&f, 0, 100_000, &sig).unwrap();
    assert_eq!(u.client_change, Amount::ZERO);
}

#[test]
fn update_rejections_each_have_their_own_code() {
    let f = fixture();
    let good = sign_update(&f.channel, Amount::from_sat(5_000), &f.client).unwrap();
    let mut flipped = good.clone();
    let n = flipped.0.len();
    flipped.0[n - 2] ^= 1; // corrupt S
    let cases: Vec<(&str, u64, u64, bitmesh_common::wire::SignatureBytes, &str)> = vec![
        (
            "same total again",
            5_000,
            5_000,
            good.clone(),
            "amount_not_increasing",
        ),
        (
            "above capacity",
            0,
            100_001,
            good.clone(),
            "amount_above_capacity",
        ),
        (
            "tiny first payment",
            0,
            1,
            good.clone(),
            "first_payment_too_small",
        ),
        (
            "dust change",
            0,
            99_800,
            good.clone(),
            "client_change_below_dust",
        ),
        (
            "corrupted signature",
            0,
            5_000,
            flipped,
            "signature_invalid",
        ),
        (
            "signature for another total",
            0,
            6_000,
            good.clone(),
            "signature_invalid",
        ),
        (
            "empty signature",
            0,
            5_000,
            bitmesh_common::wire::SignatureBytes(vec![]),
            "signature_not_der",
        ),
    ];
    for (name, last, total, sig, code) in cases {
        let err = verify(&f, last, total, &sig).unwrap_err();
        assert_eq!(err.code().as_str(), code, "{name}: {err}");
    }
}

#[test]
fn strict_der_rejects_padding_and_accepts_real_signatures() {
    let f = fixture();
    let good = sign_update(&f.channel, Amount::from_sat(5_000), &f.client).unwrap();
    assert!(is_strict_der(&good.0));
    // Extra zero padding on R makes the same numbers non-strict.
    let mut padded = good.0.clone();
    padded.insert(4, 0);
    padded[3] += 1;
    padded[1] += 1;
    assert!(!is_strict_der(&padded));
}

#[test]
fn close_and_refund_weights_are_stable() {
    let f = fixture();
    let refund = build_refund(
        &f.channel,
        &f.client,
        &f.channel.client_change_script,
        FeeRate::from_sat_per_vb_u32(1),
    )
    .unwrap();
    assert_eq!(
        refund.lock_time,
        absolute::LockTime::Blocks(f.channel.script.expiry)
    );
    assert!(refund.vsize() < 200, "refund vsize {}", refund.vsize());
}

use super::super::secp;
use super::is_strict_der;

#[test]
fn client_refuses_an_offer_whose_script_does_not_match() {
    use bitmesh_common::wire::OpenResponse;
    let f = fixture();
    let s = f.channel.script;
    let offer = OpenResponse {
        channel_id: s.channel_id(),
        gateway_pubkey: s.gateway,
        client_pubkey: s.client,
        expiry: s.expiry,
        witness_script: s.witness_script(),
        funding_script_pubkey: s.script_pubkey(),
        funding_address: s.address(Network::Regtest).as_unchecked().clone(),
        min_capacity: Amount::from_sat(1),
        max_capacity: Amount::from_sat(2),
        min_first_payment: Amount::from_sat(1),
    };
    assert_eq!(
        check_offer(&offer, &s.client, s.expiry, Network::Regtest).unwrap(),
        s
    );
    // A gateway that swaps in a script paying itself on both branches is caught.
    let evil = ChannelScript {
        client: s.gateway,
        ..s
    };
    let bad = OpenResponse {
        witness_script: evil.witness_script(),
        ..offer.clone()
    };
    let err = check_offer(&bad, &s.client, s.expiry, Network::Regtest).unwrap_err();
    assert!(
        matches!(
            err,
            ChannelError::OfferMismatch {
                what: "witness script"
            }
        ),
        "{err}"
    );
    let later = check_offer(
        &offer,
        &s.client,
        absolute::Height::from_consensus(301).unwrap(),
        Network::Regtest,
    );
    assert!(later.is_err());
}
