//! `Mac`: a client's hardware address, the key of everything the kernel meters.

use core::fmt;
use core::str::FromStr;

use super::abi::MacKey;

/// A 48-bit MAC address, displayed and parsed as `aa:bb:cc:dd:ee:ff`: the same value
/// from the kernel map key to the store row, the JSON and the CLI.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

// Debug shows the address as text too, so logs and records that derive Debug read
// `02:c0:00:00:00:01` rather than a byte array.
impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
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
            // Exactly two hex digits: `from_str_radix` alone would also take a sign ("+f").
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
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

/// JSON (API, `bitmesh clients --json`) carries the address as its text form.
#[cfg(feature = "user")]
impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "user")]
impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::string::String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

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
        assert_eq!(std::format!("{mac:?}"), "02:00:0a:ff:00:0c");
    }

    #[cfg(feature = "user")]
    #[test]
    fn json_carries_the_text_form() {
        let mac = Mac([0x02, 0xc0, 0, 0, 0, 0x01]);
        let json = serde_json::to_string(&mac).unwrap_or_default();
        assert_eq!(json, "\"02:c0:00:00:00:01\"");
        assert_eq!(serde_json::from_str::<Mac>(&json).ok(), Some(mac));
        assert!(serde_json::from_str::<Mac>("\"02:c0:00:00:00\"").is_err());
    }

    #[test]
    fn malformed_macs_are_rejected() {
        for bad in ["", "02:00:0a:ff:00", "02:00:0a:ff:00:0c:01", "2:00:0a:ff:00:0c", "zz:00:0a:ff:00:0c", "+2:00:0a:ff:00:0c"] {
            assert_eq!(bad.parse::<Mac>(), Err(ParseMacError), "{bad}");
        }
    }
}
