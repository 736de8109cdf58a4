//! The verified update: what `update` produces, what the store journals and what
//! `close` spends. Its own module so the dependency runs one way: `update` builds a
//! close to check an update, and `close` only reads the verified result.

use bitcoin::{ecdsa, Amount};
use bitmesh_common::wire::SignatureBytes;

/// An update that passed every check; what the store journals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedUpdate {
    /// New cumulative total paid to the gateway.
    pub total_paid: Amount,
    /// `capacity - total_paid`, output 0 of the client's part of the close.
    pub client_change: Amount,
    /// The client's signature with its sighash flag.
    pub signature: ecdsa::Signature,
}

impl VerifiedUpdate {
    /// The signature as sent on the wire (DER + flag), for the journal.
    pub fn signature_bytes(&self) -> SignatureBytes {
        SignatureBytes(self.signature.to_vec())
    }
}
