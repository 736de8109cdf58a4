//! What the loader needs to know: where to pin, which hook, the gateway's identity.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;

use bitmesh_common::kernel::{BucketParams, GardenLimits};

/// Default bpffs directory for the pinned maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/bitmesh";

/// Where the upload (client -> gateway) meter runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum UploadHook {
    /// XDP in native (driver) mode if the driver supports it, else TC ingress.
    #[default]
    Auto,
    /// XDP in the driver: fastest, needs driver support (not brcmfmac on the Pi).
    XdpNative,
    /// XDP emulated on the skb (any driver, slower than native).
    XdpGeneric,
    /// TC ingress: tcx on kernels >= 6.6, clsact otherwise.
    Tc,
}

impl fmt::Display for UploadHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UploadHook::Auto => "auto",
            UploadHook::XdpNative => "xdp",
            UploadHook::XdpGeneric => "xdp-generic",
            UploadHook::Tc => "tc",
        })
    }
}

impl FromStr for UploadHook {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(UploadHook::Auto),
            "xdp" | "xdp-native" => Ok(UploadHook::XdpNative),
            "xdp-generic" | "xdp-skb" => Ok(UploadHook::XdpGeneric),
            "tc" | "tcx" => Ok(UploadHook::Tc),
            other => Err(format!("unknown hook {other:?}: use auto, xdp, xdp-generic or tc")),
        }
    }
}

/// Load-time configuration of the kernel programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeterConfig {
    /// bpffs directory holding the pinned maps and links.
    pub pin_dir: PathBuf,
    /// Gateway IPv4 on the client-facing interface (walled-garden DNS, DHCP, payment, ping).
    pub gateway_ipv4: Option<Ipv4Addr>,
    /// Gateway IPv6 on the client-facing interface.
    pub gateway_ipv6: Option<Ipv6Addr>,
    /// TCP port of the payment API (walled garden).
    pub payment_port: u16,
    /// Whether DNS to and from the gateway is in the walled garden.
    pub dns_allowed: bool,
    /// Per-MAC budgets of the walled garden's forwardable services (DNS, ICMP echo,
    /// payment API); see [`default_garden_limits`].
    pub garden: GardenLimits,
    /// Whether a bound client's billable upload frames must carry its bound source
    /// address (else they are only counted as violations).
    pub enforce_bound_ip: bool,
}

/// Walled-garden DNS + ICMP echo budget per MAC: 16 KiB burst, 512 B/s. A captive
/// device's lookups (a few hundred bytes each) fit; a DNS tunnel gets ~4 kbit/s.
pub const GARDEN_SERVICES_BURST: u64 = 16 * 1024;
/// Refill of [`GARDEN_SERVICES_BURST`], bytes per second.
pub const GARDEN_SERVICES_RATE: u64 = 512;
/// Payment API budget per MAC: 64 KiB burst, enough to read the terms, open, relay
/// a funding transaction of up to 10 kB and send the first payments (about 15 KB on
/// the wire with TCP overhead), refilled at 4 KiB/s for top-ups of an exhausted client.
pub const GARDEN_PAYMENT_BURST: u64 = 64 * 1024;
/// Refill of [`GARDEN_PAYMENT_BURST`], bytes per second.
pub const GARDEN_PAYMENT_RATE: u64 = 4 * 1024;

/// The default walled-garden budgets (documented in docs/kernel-abi.md).
pub const fn default_garden_limits() -> GardenLimits {
    GardenLimits {
        services: BucketParams::new(GARDEN_SERVICES_RATE, GARDEN_SERVICES_BURST),
        payment: BucketParams::new(GARDEN_PAYMENT_RATE, GARDEN_PAYMENT_BURST),
    }
}

impl MeterConfig {
    /// Defaults: pins under [`DEFAULT_PIN_DIR`], payment port 3141, DNS allowed, no IPv6,
    /// the default garden budgets, bound addresses enforced.
    pub fn new(gateway_ipv4: Ipv4Addr) -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            gateway_ipv4: Some(gateway_ipv4),
            gateway_ipv6: None,
            payment_port: 3141,
            dns_allowed: true,
            garden: default_garden_limits(),
            enforce_bound_ip: true,
        }
    }
}
