//! `GET /v1/device`: the requesting device's own status, for the portal page.

use serde::{Deserialize, Serialize};

use super::ChannelId;

/// One device (MAC) as the gateway meters it, whatever paid for it: the kernel keeps
/// one credited total per MAC, so these figures combine every payment rail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The device's MAC as the gateway sees it (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// True while traffic beyond the walled garden is dropped (less than one full
    /// Ethernet frame of budget left): the same rule as the RFC 8908 answer.
    pub captive: bool,
    /// Bytes credited to the device in total.
    pub bytes_credited: u64,
    /// Bytes used (both directions).
    pub bytes_used: u64,
    /// Bytes left: `bytes_credited - bytes_used`, never negative.
    pub bytes_remaining: u64,
    /// Seconds until the credit stops being usable (the channel's last crediting
    /// block at 600 s a block, or the Lightning credit's expiry), if it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_remaining: Option<u64>,
    /// The device's open on-chain channel, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelId>,
    /// Bytes of the remaining budget bought over Lightning, when the gateway sells it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lightning_bytes_remaining: Option<u64>,
    /// When the Lightning credit expires (Unix seconds), if the device has some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lightning_expires_at: Option<u64>,
}
