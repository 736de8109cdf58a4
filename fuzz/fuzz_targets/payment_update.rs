//! Payment-update verification (`channel::verify_update`) against one fixed
//! channel. Invariants: never panic, and never accept an update the client key did
//! not sign for exactly that total.
//!
//! Input: byte 0 picks how the signature is made (fuzzed bytes; the client key over
//! a fuzzed total, possibly mutated; another key), then the claimed total, the last
//! acknowledged total, the tip, and the rest as signature bytes or mutations.

#![no_main]

use std::sync::OnceLock;

use bitcoin::hashes::Hash;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{absolute, Amount, FeeRate, Network, OutPoint, PublicKey, ScriptBuf, Txid};
use bitmesh_channel::{sign_update, verify_update, Channel, ChannelKey, ChannelPolicy, ChannelScript, GatewaySeed};
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::wire::{ChannelLimits, SignatureBytes};
use libfuzzer_sys::fuzz_target;

/// A 100,000 sat channel expiring at 1,000 (crediting ends at 994).
struct Fixed {
    channel: Channel,
    gateway: ChannelKey,
    policy: ChannelPolicy,
    client: SecretKey,
    stranger: SecretKey,
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let gateway = GatewaySeed::from_seed(&[1; 32], Network::Regtest).and_then(|s| s.channel_key(0)).expect("gateway key");
        let client = SecretKey::from_slice(&[2; 32]).expect("client key");
        let stranger = SecretKey::from_slice(&[3; 32]).expect("other key");
        let client_pk = PublicKey::new(client.public_key(&bitcoin::secp256k1::Secp256k1::new()));
        let policy = ChannelPolicy {
            limits: ChannelLimits {
                min_capacity: Amount::from_sat(10_000),
                max_capacity: Amount::from_sat(1_000_000),
                zero_conf_cap: Amount::ZERO,
                confirmations_required: 1,
                min_expiry_blocks: BlockCount(1),
                max_expiry_blocks: BlockCount(10_000),
                close_margin_blocks: BlockCount(6),
                close_fee_rate: FeeRate::from_sat_per_vb_u32(2),
            },
            gateway_payout_script: ScriptBuf::new_p2wpkh(&gateway.public.wpubkey_hash().expect("compressed")),
        };
        let channel = Channel {
            script: ChannelScript { gateway: gateway.public, client: client_pk, expiry: absolute::Height::from_consensus(1_000).expect("height") },
            funding_outpoint: OutPoint { txid: Txid::from_byte_array([7; 32]), vout: 0 },
            capacity: Amount::from_sat(100_000),
            client_change_script: ScriptBuf::new_p2wpkh(&client_pk.wpubkey_hash().expect("compressed")),
            min_first_payment: policy.min_first_payment(),
        };
        Fixed { channel, gateway, policy, client, stranger }
    })
}

/// Totals around the interesting range (dust, capacity) most of the time.
fn amount(raw: u64) -> Amount {
    if raw & 1 == 0 {
        Amount::from_sat((raw >> 1) % 200_000)
    } else {
        Amount::from_sat(raw >> 1)
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 21 {
        return;
    }
    let f = fixed();
    let mode = data[0] % 4;
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap_or_default());
    let total = amount(word(1));
    let last = amount(word(9));
    let tip = absolute::Height::from_consensus(u32::from_le_bytes(data[17..21].try_into().unwrap_or_default()) % 1_200).unwrap_or(absolute::Height::ZERO);
    let rest = &data[21..];

    // The total the signature was made over, when a key made it.
    let (signature, signed_for): (SignatureBytes, Option<Amount>) = match mode {
        // Raw bytes: a forgery attempt.
        0 => (SignatureBytes(rest.to_vec()), None),
        // The client's signature over `total`, bytes XOR-ed with the input.
        1 | 2 => match sign_update(&f.channel, total, &f.client) {
            Ok(mut sig) => {
                let honest = sig.clone();
                if mode == 2 {
                    for (i, m) in rest.iter().enumerate() {
                        if let Some(b) = sig.0.get_mut(i % honest.0.len().max(1)) {
                            *b ^= m;
                        }
                    }
                    if rest.len() > honest.0.len() && rest[0] & 1 == 1 {
                        sig.0.extend_from_slice(&rest[honest.0.len()..]);
                    }
                }
                let same = sig == honest;
                (sig, same.then_some(total))
            }
            Err(_) => (SignatureBytes(rest.to_vec()), None),
        },
        // Someone else's key over the same total.
        _ => match sign_update(&f.channel, total, &f.stranger) {
            Ok(sig) => (sig, None),
            Err(_) => return,
        },
    };

    let verdict = verify_update(&f.channel, &f.gateway, &f.policy, last, tip, total, &signature);
    if let Ok(update) = verdict {
        assert_eq!(signed_for, Some(total), "accepted an update the client key did not sign for {total} (mode {mode})");
        assert_eq!(update.total_paid, total);
        assert!(total > last && total <= f.channel.capacity);
        assert_eq!(update.client_change, f.channel.capacity - total);
    }
});
