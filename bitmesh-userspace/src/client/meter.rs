//! The agent's own count of its traffic, the number the payment policy trusts.
//!
//! [`IfaceMeter`] reads `/sys/class/net/IFACE/statistics/{rx,tx}_bytes` of the
//! interface that reaches the gateway. Both directions count, because the gateway
//! bills both (upload + download, DESIGN.md section 3); these are L2 byte counts,
//! like the gateway's. The interface also counts traffic the gateway does not bill
//! (the payment API, DNS, DHCP, ARP) and, on a shared interface, traffic of other
//! programs to other hosts; both only make the agent's count larger than the
//! gateway's, i.e. they loosen the cap by what the agent really sent or received,
//! never beyond. Counters are sampled relative to a baseline taken at start, so a
//! restart of the agent continues from the count stored in the state file.

use std::path::PathBuf;

use bitmesh_common::pricing::ByteCount;

/// A source of "bytes this device exchanged through the gateway" (monotonic).
pub trait ByteMeter: Send {
    /// Bytes counted since the meter was created.
    fn bytes(&mut self) -> Result<ByteCount, MeterError>;
}

/// The counters could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// A counter file is missing or unreadable.
    #[error("cannot read {path}: {message}: pass --iface with the interface that reaches the gateway")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Interface counters.
#[derive(Debug)]
pub struct IfaceMeter {
    iface: String,
    base: u64,
    last: u64,
}

impl IfaceMeter {
    /// Start counting on `iface` from now.
    pub fn new(iface: &str) -> Result<IfaceMeter, MeterError> {
        let mut m = IfaceMeter { iface: iface.to_owned(), base: 0, last: 0 };
        m.base = m.raw()?;
        m.last = m.base;
        Ok(m)
    }

    /// The interface.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    fn read(&self, name: &str) -> Result<u64, MeterError> {
        let path = PathBuf::from(format!("/sys/class/net/{}/statistics/{name}", self.iface));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| MeterError::Read { path: path.clone(), message: e.to_string() })?;
        text.trim().parse().map_err(|e: std::num::ParseIntError| MeterError::Read { path, message: e.to_string() })
    }

    fn raw(&self) -> Result<u64, MeterError> {
        Ok(self.read("rx_bytes")?.saturating_add(self.read("tx_bytes")?))
    }
}

impl ByteMeter for IfaceMeter {
    fn bytes(&mut self) -> Result<ByteCount, MeterError> {
        let now = self.raw()?;
        // Counters never go backwards unless the interface was re-created; then keep
        // the last value rather than a bogus difference.
        if now >= self.last {
            self.last = now;
        }
        Ok(ByteCount(self.last - self.base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_counters_start_at_zero_and_grow() {
        let Ok(mut m) = IfaceMeter::new("lo") else { return }; // no sysfs in this sandbox
        let a = m.bytes().unwrap();
        assert!(a.to_u64() < 1 << 30);
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.send_to(&[0u8; 1000], sock.local_addr().unwrap()).unwrap();
        let b = m.bytes().unwrap();
        assert!(b.to_u64() >= a.to_u64() + 2000, "{a} -> {b}");
    }

    #[test]
    fn a_missing_interface_says_to_pass_iface() {
        let e = IfaceMeter::new("bitmesh-nope0").unwrap_err();
        assert!(e.to_string().contains("--iface"));
    }
}
