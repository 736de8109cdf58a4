//! The two small interfaces the controller uses for the kernel and the link layer,
//! so the controller logic can be unit-tested without BPF or namespaces.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use bitmesh_common::kernel::{Mac, Usage};
use bitmesh_common::pricing::ByteCount;

use crate::meter::{ClientUsage, MeterError, MeterMaps};

/// What the controller does to the kernel maps.
pub trait MeterPort: Send {
    /// Start metering (zero credit, zeroed or restored usage); existing entries are kept.
    fn restore_client(&mut self, mac: Mac, usage: Usage) -> Result<(), MeterError>;
    /// Raise CREDIT to `total`: never lowers it (`CreditDecrease`) and never creates
    /// a client (`NotMetered`: only [`Self::restore_client`] does, when a channel opens).
    fn raise_credit(&mut self, mac: Mac, total: ByteCount) -> Result<(), MeterError>;
    /// Set CREDIT to exactly `total`, lower too. Only for a MAC whose credit has a
    /// Lightning part (moved away or expired: docs/design.md section 5.7); the
    /// client must be metered.
    fn set_credit(&mut self, mac: Mac, total: ByteCount) -> Result<(), MeterError>;
    /// Budget and counters of a client, if metered.
    fn usage(&self, mac: Mac) -> Result<Option<ClientUsage>, MeterError>;
    /// Every metered client.
    fn all_usage(&self) -> Result<Vec<ClientUsage>, MeterError>;
    /// Stop metering (the client becomes unpaid); its final budget and counters, if
    /// it was metered.
    fn remove_client(&mut self, mac: Mac) -> Result<Option<ClientUsage>, MeterError>;
    /// Bind a metered client to the source address it paid from (MAC-cloning defence).
    fn bind_source(&mut self, _mac: Mac, _ip: IpAddr) -> Result<(), MeterError> {
        Ok(())
    }
    /// Bound clients the kernel saw billable frames from with another source:
    /// (MAC, such frames so far, the last such source).
    fn source_violations(&self) -> Result<Vec<(Mac, u64, Option<IpAddr>)>, MeterError> {
        Ok(Vec::new())
    }
}

impl MeterPort for MeterMaps {
    fn restore_client(&mut self, m: Mac, usage: Usage) -> Result<(), MeterError> {
        MeterMaps::restore_client(self, m, usage)
    }
    fn raise_credit(&mut self, m: Mac, total: ByteCount) -> Result<(), MeterError> {
        MeterMaps::raise_credit(self, m, total).map(|_| ())
    }
    fn set_credit(&mut self, m: Mac, total: ByteCount) -> Result<(), MeterError> {
        MeterMaps::set_credit(self, m, total)
    }
    fn usage(&self, m: Mac) -> Result<Option<ClientUsage>, MeterError> {
        MeterMaps::usage(self, m)
    }
    fn all_usage(&self) -> Result<Vec<ClientUsage>, MeterError> {
        MeterMaps::all_usage(self)
    }
    fn remove_client(&mut self, m: Mac) -> Result<Option<ClientUsage>, MeterError> {
        MeterMaps::remove_client(self, m)
    }
    fn bind_source(&mut self, m: Mac, ip: IpAddr) -> Result<(), MeterError> {
        MeterMaps::bind_source(self, m, ip)
    }
    fn source_violations(&self) -> Result<Vec<(Mac, u64, Option<IpAddr>)>, MeterError> {
        Ok(MeterMaps::bindings(self)?
            .into_iter()
            .filter(|b| b.wrong_source_frames > 0)
            .map(|b| (b.mac, b.wrong_source_frames, b.last_wrong_source))
            .collect())
    }
}

/// An in-memory meter (unit tests, and `--dry-run`-style diagnostics).
#[derive(Default)]
pub struct MemoryMeter {
    pub clients: HashMap<Mac, ClientUsage>,
}

impl MeterPort for MemoryMeter {
    fn restore_client(&mut self, mac: Mac, usage: Usage) -> Result<(), MeterError> {
        self.clients.entry(mac).or_insert(ClientUsage { mac, credited: ByteCount::ZERO, usage });
        Ok(())
    }
    fn raise_credit(&mut self, mac: Mac, total: ByteCount) -> Result<(), MeterError> {
        // Like the kernel maps: never creates a client, never lowers credit.
        let e = self.clients.get_mut(&mac).ok_or(MeterError::NotMetered { mac })?;
        if total < e.credited {
            return Err(MeterError::CreditDecrease { mac, current: e.credited.0, requested: total.0 });
        }
        e.credited = total;
        Ok(())
    }
    fn set_credit(&mut self, mac: Mac, total: ByteCount) -> Result<(), MeterError> {
        let e = self.clients.get_mut(&mac).ok_or(MeterError::NotMetered { mac })?;
        e.credited = total;
        Ok(())
    }
    fn usage(&self, mac: Mac) -> Result<Option<ClientUsage>, MeterError> {
        Ok(self.clients.get(&mac).copied())
    }
    fn all_usage(&self) -> Result<Vec<ClientUsage>, MeterError> {
        let mut all: Vec<ClientUsage> = self.clients.values().copied().collect();
        all.sort_by_key(|u| u.mac);
        Ok(all)
    }
    fn remove_client(&mut self, mac: Mac) -> Result<Option<ClientUsage>, MeterError> {
        Ok(self.clients.remove(&mac))
    }
}

/// Resolves the TCP peer of a request to the MAC the kernel meters it by.
pub trait Neighbours: Send + Sync {
    fn mac_of(&self, ip: IpAddr) -> Option<Mac>;
}

/// The kernel neighbour table of one interface: `/proc/net/arp` for IPv4,
/// `ip -6 neigh show dev IFACE` for IPv6. The client has just completed a TCP
/// handshake with us, so its entry is present.
pub struct KernelNeighbours {
    pub iface: String,
}

impl Neighbours for KernelNeighbours {
    fn mac_of(&self, ip: IpAddr) -> Option<Mac> {
        match ip {
            IpAddr::V4(v4) => {
                let text = std::fs::read_to_string(Path::new("/proc/net/arp")).ok()?;
                parse_proc_arp(&text, &self.iface, v4.into())
            }
            IpAddr::V6(_) => {
                let out = std::process::Command::new("ip")
                    .args(["-6", "neigh", "show", "dev", &self.iface])
                    .output()
                    .ok()?;
                parse_ip_neigh(&String::from_utf8_lossy(&out.stdout), ip)
            }
        }
    }
}

/// `/proc/net/arp`: `IP HWtype Flags HWaddress Mask Device`; flags 0x0 = incomplete.
fn parse_proc_arp(text: &str, iface: &str, ip: IpAddr) -> Option<Mac> {
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[5] != iface || f[2] == "0x0" {
            return None;
        }
        (f[0].parse::<IpAddr>().ok()? == ip).then(|| f[3].parse().ok()).flatten()
    })
}

/// `ip neigh show dev X`: `ADDR lladdr MAC STATE`.
fn parse_ip_neigh(text: &str, ip: IpAddr) -> Option<Mac> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let pos = f.iter().position(|w| *w == "lladdr")?;
        (f.first()?.parse::<IpAddr>().ok()? == ip).then(|| f.get(pos + 1)?.parse().ok()).flatten()
    })
}

/// A fixed table (unit tests).
pub struct StaticNeighbours(pub HashMap<IpAddr, Mac>);

impl Neighbours for StaticNeighbours {
    fn mac_of(&self, ip: IpAddr) -> Option<Mac> {
        self.0.get(&ip).copied()
    }
}

/// The loaded meter (programs attached, maps pinned) as the controller's port.
impl MeterPort for crate::meter::Meter {
    fn restore_client(&mut self, m: Mac, usage: Usage) -> Result<(), MeterError> {
        MeterPort::restore_client(self.maps_mut(), m, usage)
    }
    fn raise_credit(&mut self, m: Mac, total: ByteCount) -> Result<(), MeterError> {
        MeterPort::raise_credit(self.maps_mut(), m, total)
    }
    fn set_credit(&mut self, m: Mac, total: ByteCount) -> Result<(), MeterError> {
        MeterPort::set_credit(self.maps_mut(), m, total)
    }
    fn usage(&self, m: Mac) -> Result<Option<ClientUsage>, MeterError> {
        MeterPort::usage(self.maps(), m)
    }
    fn all_usage(&self) -> Result<Vec<ClientUsage>, MeterError> {
        MeterPort::all_usage(self.maps())
    }
    fn remove_client(&mut self, m: Mac) -> Result<Option<ClientUsage>, MeterError> {
        MeterPort::remove_client(self.maps_mut(), m)
    }
    fn bind_source(&mut self, m: Mac, ip: IpAddr) -> Result<(), MeterError> {
        MeterPort::bind_source(self.maps_mut(), m, ip)
    }
    fn source_violations(&self) -> Result<Vec<(Mac, u64, Option<IpAddr>)>, MeterError> {
        MeterPort::source_violations(self.maps())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_meter_never_creates_a_client_nor_lowers_credit() {
        let mac = Mac([2, 0, 0, 0, 0, 9]);
        let mut m = MemoryMeter::default();
        assert!(matches!(m.raise_credit(mac, ByteCount(10)), Err(MeterError::NotMetered { .. })));
        assert_eq!(m.usage(mac).unwrap(), None, "a refused credit created nothing");
        m.restore_client(mac, Usage::default()).unwrap();
        m.raise_credit(mac, ByteCount(10)).unwrap();
        m.raise_credit(mac, ByteCount(10)).unwrap();
        assert!(matches!(m.raise_credit(mac, ByteCount(9)), Err(MeterError::CreditDecrease { .. })));
        assert_eq!(m.usage(mac).unwrap().map(|u| u.credited), Some(ByteCount(10)));
    }

    #[test]
    fn neighbour_tables_resolve_only_complete_entries_on_our_interface() {
        let arp = "IP address       HW type     Flags       HW address            Mask     Device\n\
                   10.0.0.2         0x1         0x2         02:00:00:00:00:02     *        br0\n\
                   10.0.0.3         0x1         0x0         00:00:00:00:00:00     *        br0\n\
                   10.0.0.4         0x1         0x2         02:00:00:00:00:04     *        eth0\n";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(parse_proc_arp(arp, "br0", ip("10.0.0.2")), Some(Mac([2, 0, 0, 0, 0, 2])));
        assert_eq!(parse_proc_arp(arp, "br0", ip("10.0.0.3")), None);
        assert_eq!(parse_proc_arp(arp, "br0", ip("10.0.0.4")), None);
        let neigh = "fe80::2 lladdr 02:00:00:00:00:05 REACHABLE\nfe80::3 FAILED\n";
        assert_eq!(parse_ip_neigh(neigh, ip("fe80::2")), Some(Mac([2, 0, 0, 0, 0, 5])));
        assert_eq!(parse_ip_neigh(neigh, ip("fe80::3")), None);
    }
}
