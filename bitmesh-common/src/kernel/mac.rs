//! `Mac`: a client's hardware address, the key of everything the kernel meters.

use core::fmt;
use core::str::FromStr;

use super::abi::MacKey;

/// A 48-bit MAC address, displayed and parsed as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The map key for this address.
    pub const fn key(self) -> MacKey {
        MacKey::new(self.0)
    }

    /// Whether the group bit is set (broadcast or multicast): never a client.
    pub const fn is_group(self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl From<MacKey> for Mac {
    fn from(key: MacKey) -> Self {
        Mac(key.addr)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Why a string is not a MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseMacError;

impl fmt::Display for ParseMacError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("expected a MAC address like aa:bb:cc:dd:ee:ff")
    }
}

impl FromStr for Mac {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let part = parts.next().ok_or(ParseMacError)?;
            if part.len() != 2 {
                return Err(ParseMacError);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ParseMacError)?;
        }
        if parts.next().is_some() {
            return Err(ParseMacError);
        }
        Ok(Mac(out))
    }
}

#[cfg(feature = "user")]
impl std::error::Error for ParseMacError {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn mac_round_trips_through_text() {
        let mac: Mac = "02:00:0a:FF:00:0c".parse().unwrap_or_default();
        assert_eq!(mac, Mac([2, 0, 0x0a, 0xff, 0, 0x0c]));
        assert_eq!(mac.to_string(), "02:00:0a:ff:00:0c");
        assert_eq!("02-00-0a-ff-00-0c".parse::<Mac>(), Ok(mac));
    }

    #[test]
    fn malformed_macs_are_rejected() {
        for bad in ["", "02:00:0a:ff:00", "02:00:0a:ff:00:0c:01", "2:00:0a:ff:00:0c", "zz:00:0a:ff:00:0c"] {
            assert_eq!(bad.parse::<Mac>(), Err(ParseMacError), "{bad}");
        }
    }
}
