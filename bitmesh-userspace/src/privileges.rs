//! The capabilities `bitmesh run` needs, checked before it touches the kernel, so a
//! unit with too few says which one is missing instead of failing deep in a BPF call.
//!
//! Root has them all; the systemd unit (dist/bitmesh.service) keeps root's uid but
//! bounds the process to exactly these.

/// A Linux capability the controller uses, with why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Its name in `capabilities(7)` and in unit files.
    pub name: &'static str,
    /// Its bit in the capability sets.
    pub bit: u32,
    /// What the controller does with it.
    pub used_for: &'static str,
}

/// CAP_BPF (kernel >= 5.8): create maps, load programs, pin and reopen pinned objects.
pub const CAP_BPF: Capability = Capability { name: "CAP_BPF", bit: 39, used_for: "create BPF maps, load and pin the meter programs" };
/// CAP_NET_ADMIN: attach XDP and TC programs (tcx links, or clsact and cls_bpf).
pub const CAP_NET_ADMIN: Capability = Capability { name: "CAP_NET_ADMIN", bit: 12, used_for: "attach the meter to the interface (XDP, tcx or clsact)" };
/// CAP_PERFMON: the meter subtracts packet pointers (frame lengths), which the
/// verifier allows only for a loader with it ("pointer -= pointer prohibited").
pub const CAP_PERFMON: Capability = Capability { name: "CAP_PERFMON", bit: 38, used_for: "let the verifier accept the meter's packet-pointer arithmetic" };
/// CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON on kernels before 5.8.
pub const CAP_SYS_ADMIN: Capability = Capability { name: "CAP_SYS_ADMIN", bit: 21, used_for: "BPF on kernels before 5.8" };

/// What `bitmesh run` needs.
pub const NEEDED: [Capability; 3] = [CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON];

/// The effective capability set of this process (`CapEff` in /proc/self/status).
pub fn effective() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    parse_cap_eff(&status).ok_or_else(|| std::io::Error::other("/proc/self/status has no CapEff line"))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The needed capabilities missing from `effective`. CAP_SYS_ADMIN covers CAP_BPF and
/// CAP_PERFMON (what kernels before 5.8 ask for, and what they still accept).
pub fn missing(effective: u64) -> Vec<Capability> {
    let has = |c: Capability| effective & (1u64 << c.bit) != 0;
    NEEDED
        .into_iter()
        .filter(|&c| {
            let covered_by_sys_admin = c != CAP_NET_ADMIN && has(CAP_SYS_ADMIN);
            !(has(c) || covered_by_sys_admin)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything_and_a_bounded_set_names_what_is_missing() {
        let status = "Name:\tbitmesh\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let all = parse_cap_eff(status).unwrap();
        assert!(missing(all).is_empty());
        let bpf_and_net_admin = (1 << 39) | (1 << 12);
        assert_eq!(missing(bpf_and_net_admin), vec![CAP_PERFMON]);
        assert_eq!(missing(1 << 21), vec![CAP_NET_ADMIN], "CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON");
        assert_eq!(missing(0).len(), 3);
    }

    #[test]
    fn this_process_has_a_readable_effective_set() {
        effective().unwrap();
    }
}
