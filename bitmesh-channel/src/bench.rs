//! Micro benchmark of the gateway's per-update work, for `cargo xtask bench`.

use std::time::{Duration, Instant};

use bitcoin::hashes::Hash;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{absolute, Amount, FeeRate, Network, OutPoint, PublicKey, ScriptBuf, Txid};
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::wire::ChannelLimits;

use super::{
    secp, sign_update, verify_update, Channel, ChannelError, ChannelPolicy, ChannelScript,
    GatewaySeed,
};

/// Median wall time of one [`verify_update`] (every check, including the signed close
/// through Bitcoin Core's interpreter) over `iterations` updates with increasing
/// totals on one channel. Signing happens outside the timed region.
pub fn verify_update_median(iterations: u32) -> Result<Duration, ChannelError> {
    let seed = GatewaySeed::from_seed(&[1; 32], Network::Regtest)
        .map_err(|e| ChannelError::Sighash(e.to_string()))?;
    let gateway = seed
        .channel_key(0)
        .map_err(|e| ChannelError::Sighash(e.to_string()))?;
    let client =
        SecretKey::from_slice(&[2; 32]).map_err(|e| ChannelError::Sighash(e.to_string()))?;
    let client_pk = PublicKey::new(client.public_key(secp()));
    let payout = ScriptBuf::new_p2wpkh(
        &gateway
            .public
            .wpubkey_hash()
            .map_err(|e| ChannelError::Sighash(e.to_string()))?,
    );
    let policy = ChannelPolicy {
        limits: ChannelLimits {
            min_capacity: Amount::from_sat(10_000),
            max_capacity: Amount::from_sat(100_000_000),
            zero_conf_cap: Amount::ZERO,
            confirmations_required: 1,
            min_expiry_blocks: BlockCount(1),
            max_expiry_blocks: BlockCount(10_000),
            close_margin_blocks: BlockCount(6),
            close_fee_rate: FeeRate::from_sat_per_vb_u32(2),
        },
        gateway_payout_script: payout,
    };
    let channel = Channel {
        script: ChannelScript {
            gateway: gateway.public,
            client: client_pk,
            expiry: absolute::Height::from_consensus(1_000)
                .map_err(|e| ChannelError::Sighash(e.to_string()))?,
        },
        funding_outpoint: OutPoint {
            txid: Txid::from_byte_array([7; 32]),
            vout: 0,
        },
        capacity: Amount::from_sat(50_000_000),
        client_change_script: ScriptBuf::new_p2wpkh(
            &client_pk
                .wpubkey_hash()
                .map_err(|e| ChannelError::Sighash(e.to_string()))?,
        ),
        min_first_payment: policy.min_first_payment(),
    };
    let tip = absolute::Height::ZERO;
    let mut last = Amount::ZERO;
    let mut times = Vec::with_capacity(iterations as usize);
    for i in 0..u64::from(iterations.max(1)) {
        let total = channel.min_first_payment + Amount::from_sat(i * 100);
        let sig = sign_update(&channel, total, &client)?;
        let start = Instant::now();
        let u = verify_update(&channel, &gateway, &policy, last, tip, total, &sig)?;
        times.push(start.elapsed());
        last = u.total_paid;
    }
    times.sort();
    Ok(times[times.len() / 2])
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a failed test should panic
mod tests {
    #[test]
    #[ignore = "benchmark: cargo test -p bitmesh-channel --release bench -- --ignored --nocapture"]
    fn median_update_verify_time() {
        let median = super::verify_update_median(1_000).unwrap();
        println!("median verify_update: {median:?}");
    }
}
