//! The client's MAC address as the store and the API show it (`aa:bb:cc:dd:ee:ff`).
//! The kernel's map key for it is `bitmesh_common::kernel::abi::MacKey`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a [`MacAddr`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseIdError {
    #[error("MAC address must be six hex octets separated by ':' (aa:bb:cc:dd:ee:ff)")]
    Mac,
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A client's Ethernet/WiFi MAC address: the key the kernel meters by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl FromStr for MacAddr {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or(ParseIdError::Mac)?.as_bytes();
            if p.len() != 2 {
                return Err(ParseIdError::Mac);
            }
            *o = hex_val(p[0]).ok_or(ParseIdError::Mac)? << 4 | hex_val(p[1]).ok_or(ParseIdError::Mac)?;
        }
        if parts.next().is_some() {
            return Err(ParseIdError::Mac);
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_through_text() {
        let mac: MacAddr = "02:00:00:0a:0B:ff".parse().unwrap();
        assert_eq!(mac.to_string(), "02:00:00:0a:0b:ff");
        assert!("02:00:00:0a:0b".parse::<MacAddr>().is_err());
        assert!("02:00:00:0a:0b:ff:00".parse::<MacAddr>().is_err());
    }
}
