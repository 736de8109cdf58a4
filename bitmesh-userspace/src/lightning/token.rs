//! Purchase tokens: 128 random bits naming a device's Lightning credit account,
//! shown as base32 in groups of four (`ABCD-EFGH-IJKL-MNOP-QRST-UVWX-YZ`, 26 letters
//! and digits 2-7), typed back in any case, with or without dashes and spaces. The
//! gateway keeps only the SHA-256 of the 16 bytes ([`TokenHash`]).
//!
//! A token is derived, not stored: `HMAC-SHA256(token key, account nonce)[..16]`, the
//! key coming from the Lightning seed. So a device asking for another invoice is
//! shown its token again, while a copy of the database alone reveals no token.

use bitcoin::hashes::{hmac, sha256, Hash, HashEngine};

use crate::store::TokenHash;

/// Fill `buf` from the kernel's CSPRNG (`getrandom(2)`).
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// A purchase token (the secret itself, held only while it is handed out or checked).
#[derive(Clone, PartialEq, Eq)]
pub struct PurchaseToken([u8; 16]);

impl std::fmt::Debug for PurchaseToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PurchaseToken(..)")
    }
}

/// The secret tokens are derived with (from the Lightning seed).
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl TokenKey {
    /// `SHA256("bitmesh/v1/purchase-token-key" || seed)`.
    pub fn from_seed(seed: &[u8]) -> TokenKey {
        let mut e = sha256::Hash::engine();
        e.input(b"bitmesh/v1/purchase-token-key");
        e.input(seed);
        TokenKey(sha256::Hash::from_engine(e).to_byte_array())
    }
}

impl PurchaseToken {
    /// A fresh random token from the kernel's CSPRNG (tests).
    pub fn generate() -> std::io::Result<PurchaseToken> {
        let mut b = [0u8; 16];
        random_bytes(&mut b)?;
        Ok(PurchaseToken(b))
    }

    /// The token of the account with `nonce`.
    pub fn derive(key: &TokenKey, nonce: &[u8; 16]) -> PurchaseToken {
        let mut e = hmac::HmacEngine::<sha256::Hash>::new(&key.0);
        e.input(nonce);
        let mac = hmac::Hmac::<sha256::Hash>::from_engine(e).to_byte_array();
        let mut b = [0u8; 16];
        b.copy_from_slice(&mac[..16]);
        PurchaseToken(b)
    }

    /// What the gateway stores.
    pub fn hash(&self) -> TokenHash {
        TokenHash(sha256::Hash::hash(&self.0).to_byte_array())
    }

    /// The short code shown to the user.
    pub fn display(&self) -> String {
        let mut bits: u32 = 0;
        let mut nbits = 0;
        let mut letters = String::with_capacity(32);
        for &byte in &self.0 {
            bits = (bits << 8) | u32::from(byte);
            nbits += 8;
            while nbits >= 5 {
                nbits -= 5;
                letters.push(ALPHABET[((bits >> nbits) & 31) as usize] as char);
            }
        }
        if nbits > 0 {
            letters.push(ALPHABET[((bits << (5 - nbits)) & 31) as usize] as char);
        }
        let groups: Vec<String> = letters.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        groups.join("-")
    }

    /// Parse a code as the user typed it; `None` if it is not a token.
    pub fn parse(text: &str) -> Option<PurchaseToken> {
        let mut bits: u32 = 0;
        let mut nbits = 0;
        let mut out = Vec::with_capacity(16);
        let mut letters = 0;
        for c in text.chars().filter(|c| !matches!(c, '-' | ' ')) {
            let v = ALPHABET.iter().position(|&a| a as char == c.to_ascii_uppercase())? as u32;
            letters += 1;
            bits = (bits << 5) | v;
            nbits += 5;
            if nbits >= 8 {
                nbits -= 8;
                out.push((bits >> nbits) as u8);
                bits &= (1 << nbits) - 1;
            }
        }
        // 26 letters = 130 bits: 16 bytes and two zero padding bits.
        if letters != 26 || bits != 0 {
            return None;
        }
        <[u8; 16]>::try_from(out.as_slice()).ok().map(PurchaseToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_in_any_case_and_spacing() {
        let t = PurchaseToken::generate().unwrap();
        let shown = t.display();
        assert_eq!(shown.len(), 26 + 6, "{shown}");
        assert_eq!(PurchaseToken::parse(&shown), Some(t.clone()));
        assert_eq!(PurchaseToken::parse(&shown.to_lowercase().replace('-', " ")), Some(t.clone()));
        assert_ne!(PurchaseToken::generate().unwrap().hash(), t.hash());
        for bad in ["", "ABCD", &shown[..shown.len() - 1], "ABCD-EFGH-IJKL-MNOP-QRST-UVWX-Y1", "ABCD-EFGH-IJKL-MNOP-QRST-UVWX-YZ"] {
            // The last one has non-zero padding bits (Z = 25).
            assert_eq!(PurchaseToken::parse(bad), None, "{bad:?}");
        }
    }
}
