//! The controller's own nftables table: the netfilter half of captive-portal
//! interception (the kernel half is `bitmesh_common::kernel::portal`).
//!
//! Only packets the TC ingress program marked (`PORTAL_MARK`: an unpaid client's TCP
//! to port 80 or 443 of an IPv4 address) are touched:
//!
//! * port 80 is DNATed to the redirect listener on the gateway's client address;
//! * port 443 is answered with a TCP reset (the browser fails at once, no 30 s hang);
//! * anything else marked that would be forwarded is dropped.
//!
//! The table is named [`NftTable::NAME`]; nothing else in the ruleset is read or
//! changed. It is installed at start and removed at a clean stop. Its absence opens
//! nothing: the kernel passes an unpaid client's answers only when the gateway itself
//! generated them, so without the DNAT a marked SYN's answer from upstream is dropped
//! at egress and no connection to upstream completes (docs/threat-model.md).

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use bitmesh_common::kernel::PORTAL_MARK;

/// Installing or removing the table failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("{iface} is a bridge and net.bridge.bridge-nf-call-iptables is 1: netfilter would see an unpaid client's packets before the meter marks them, so the portal could not redirect (unpaid stays blocked either way); set the sysctl to 0 or run with --portal false")]
    BridgeNetfilter { iface: String },
    #[error("cannot run nft (install Debian's nftables package, or pass --portal false): {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the captive-portal table ({0}); pass --portal false to run without interception")]
    Refused(String),
}

/// The installed table; removed on [`NftTable::remove`] or drop.
#[derive(Debug)]
pub struct NftTable {
    installed: bool,
}

impl NftTable {
    /// The table's name (family `ip`).
    pub const NAME: &'static str = "bitmesh_portal";

    /// The ruleset: the table created empty (or emptied if a crashed run left it),
    /// then filled, in one atomic nft transaction.
    pub fn ruleset(iface: &str, gateway: Ipv4Addr, redirect_port: u16) -> String {
        let name = Self::NAME;
        let mark = format!("{PORTAL_MARK:#010x}");
        format!(
            "table ip {name}\n\
             delete table ip {name}\n\
             table ip {name} {{\n\
             \x20 chain intercept {{\n\
             \x20   type nat hook prerouting priority dstnat; policy accept;\n\
             \x20   iifname \"{iface}\" meta mark {mark} tcp dport 80 counter dnat to {gateway}:{redirect_port}\n\
             \x20 }}\n\
             \x20 chain refuse {{\n\
             \x20   type filter hook forward priority filter; policy accept;\n\
             \x20   iifname \"{iface}\" meta mark {mark} tcp dport 443 counter reject with tcp reset\n\
             \x20   iifname \"{iface}\" meta mark {mark} counter drop\n\
             \x20 }}\n\
             }}\n"
        )
    }

    /// Install the table for `iface`, DNATing to `gateway:redirect_port`.
    pub fn install(iface: &str, gateway: Ipv4Addr, redirect_port: u16) -> Result<NftTable, NftError> {
        if bridge_netfilter_first(iface) {
            return Err(NftError::BridgeNetfilter { iface: iface.to_owned() });
        }
        nft(&Self::ruleset(iface, gateway, redirect_port))?;
        Ok(NftTable { installed: true })
    }

    /// Remove the table (a missing table is fine: someone removed it already).
    pub fn remove(&mut self) -> Result<(), NftError> {
        if self.installed {
            self.installed = false;
            let name = Self::NAME;
            nft(&format!("table ip {name}\ndelete table ip {name}\n"))?;
        }
        Ok(())
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "removing the captive-portal nftables table failed");
        }
    }
}

/// Whether `iface` is a bridge whose IPv4 traffic netfilter sees at the bridge layer
/// (`br_netfilter` with `bridge-nf-call-iptables = 1`, per network namespace): its
/// prerouting hook then runs before the bridge device's TC ingress, where the meter
/// sets the mark, so the DNAT could never match.
fn bridge_netfilter_first(iface: &str) -> bool {
    let is_bridge = std::path::Path::new("/sys/class/net").join(iface).join("bridge").exists();
    is_bridge
        && std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").is_ok_and(|v| v.trim() == "1")
}

/// Run `nft -f -` with `script` on stdin.
fn nft(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Refused(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_touches_only_marked_packets_in_its_own_table() {
        let r = NftTable::ruleset("wlan0", Ipv4Addr::new(10, 0, 0, 1), 3142);
        assert!(r.contains("dnat to 10.0.0.1:3142"));
        assert!(r.contains("meta mark 0x42544d50 tcp dport 443 counter reject with tcp reset"));
        for line in r.lines().filter(|l| l.contains("dnat") || l.contains("reject") || l.trim_end().ends_with("drop")) {
            assert!(line.contains("meta mark 0x42544d50") && line.contains("iifname \"wlan0\""), "{line}");
        }
        assert_eq!(r.matches("table ip bitmesh_portal").count(), 3);
    }
}
