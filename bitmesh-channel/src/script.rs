//! The channel's witness script and funding output.

use bitcoin::blockdata::opcodes::all::{
    OP_CHECKSIG, OP_CHECKSIGVERIFY, OP_CLTV, OP_DROP, OP_ELSE, OP_ENDIF, OP_IF,
};
use bitcoin::script::Builder;
use bitcoin::{absolute, Address, Network, PublicKey, ScriptBuf};
use bitmesh_common::wire::ChannelId;

/// The three values that define a channel's script. Both sides rebuild the script
/// from these and compare byte-for-byte; neither trusts a script the other sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelScript {
    /// The gateway's per-channel key (BIP32-derived, never reused).
    pub gateway: PublicKey,
    /// The client's key.
    pub client: PublicKey,
    /// Block height after which the client alone can spend (refund).
    pub expiry: absolute::Height,
}

impl ChannelScript {
    /// ```text
    /// OP_IF <gateway_pk> OP_CHECKSIGVERIFY
    /// OP_ELSE <expiry> OP_CHECKLOCKTIMEVERIFY OP_DROP
    /// OP_ENDIF <client_pk> OP_CHECKSIG
    /// ```
    /// The client's signature is required on both branches: cooperative close needs
    /// both keys, the refund needs the client's key and a lock time past `expiry`.
    pub fn witness_script(&self) -> ScriptBuf {
        Builder::new()
            .push_opcode(OP_IF)
            .push_key(&self.gateway)
            .push_opcode(OP_CHECKSIGVERIFY)
            .push_opcode(OP_ELSE)
            .push_lock_time(absolute::LockTime::Blocks(self.expiry))
            .push_opcode(OP_CLTV)
            .push_opcode(OP_DROP)
            .push_opcode(OP_ENDIF)
            .push_key(&self.client)
            .push_opcode(OP_CHECKSIG)
            .into_script()
    }

    /// The funding output script: P2WSH of [`Self::witness_script`].
    pub fn script_pubkey(&self) -> ScriptBuf {
        ScriptBuf::new_p2wsh(&self.witness_script().wscript_hash())
    }

    /// The funding address on `network`.
    pub fn address(&self, network: Network) -> Address {
        Address::p2wsh(&self.witness_script(), network)
    }

    /// The channel id: SHA-256 of the witness script (= the P2WSH program).
    pub fn channel_id(&self) -> ChannelId {
        ChannelId::from_witness_script(&self.witness_script())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a failed test should panic
mod tests {
    use super::*;
    use bitcoin::hex::DisplayHex;
    use std::str::FromStr;

    fn keys() -> (PublicKey, PublicKey) {
        let g = PublicKey::from_str(
            "02c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee5",
        )
        .unwrap();
        let c = PublicKey::from_str(
            "02f9308a019258c31049344f85f89d5229b531c845836f99b08601f113bce036f9",
        )
        .unwrap();
        (g, c)
    }

    #[test]
    fn witness_script_matches_the_protocol_bytes() {
        let (g, c) = keys();
        let s = ChannelScript {
            gateway: g,
            client: c,
            expiry: absolute::Height::from_consensus(500).unwrap(),
        };
        let hex = s.witness_script().as_bytes().to_lower_hex_string();
        // 63 (IF) 21<g> ad (CHECKSIGVERIFY) 67 (ELSE) 02f401 (500) b1 (CLTV) 75 (DROP)
        // 68 (ENDIF) 21<c> ac (CHECKSIG)
        let expected = format!("6321{g}ad6702f401b1756821{c}ac");
        assert_eq!(hex, expected);
        assert!(s.script_pubkey().is_p2wsh());
        assert_eq!(
            s.channel_id().0,
            s.witness_script().wscript_hash().to_byte_array()
        );
    }

    #[test]
    fn any_change_of_key_or_expiry_changes_the_address() {
        let (g, c) = keys();
        let h = |n| absolute::Height::from_consensus(n).unwrap();
        let base = ChannelScript {
            gateway: g,
            client: c,
            expiry: h(500),
        };
        let swapped = ChannelScript {
            gateway: c,
            client: g,
            expiry: h(500),
        };
        let later = ChannelScript {
            expiry: h(501),
            ..base
        };
        assert_ne!(base.script_pubkey(), swapped.script_pubkey());
        assert_ne!(base.script_pubkey(), later.script_pubkey());
    }

    use bitcoin::hashes::Hash;
}
