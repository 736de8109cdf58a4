//! What one device (MAC) has, whatever paid for it: the page's `GET /v1/device` and
//! the RFC 8908 answer. The kernel keeps one credited total per MAC, so its `CREDIT`
//! and `USAGE` are the combined truth across payment rails; the store adds when the
//! credit stops being usable.

use std::net::IpAddr;

use bitmesh_common::kernel::Mac;
use bitmesh_common::wire::{CaptiveStatus, DeviceStatus};

use super::client::{FULL_FRAME_BYTES, SECS_PER_BLOCK};
use super::{crediting_ends_at, Gateway, GatewayError};
use crate::store::ChannelStage;

impl Gateway {
    /// The status of `mac` now: the combined credit across rails
    /// ([`Gateway::device_credit`], the kernel's CREDIT and USAGE split into rails),
    /// and when it stops being usable (the channel's end, or the Lightning credit's
    /// expiry, whichever comes first).
    pub fn device_status(&self, mac: Mac) -> Result<DeviceStatus, GatewayError> {
        let credit = self.device_credit(mac)?;
        let channel = self.store.live_channel_for_mac(mac)?.filter(|r| r.state == ChannelStage::Open);
        let channel_secs = channel.as_ref().map(|rec| {
            let ends = crediting_ends_at(rec, self.policy().limits.close_margin_blocks).to_consensus_u32();
            u64::from(ends.saturating_sub(self.tip().to_consensus_u32())) * SECS_PER_BLOCK
        });
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let lightning_secs = credit.lightning_expires_at.filter(|_| credit.lightning_bytes_remaining > 0).map(|at| at.saturating_sub(now));
        let seconds_remaining = match (channel_secs, lightning_secs) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Ok(DeviceStatus {
            mac: mac.to_string(),
            // Less than one full Ethernet frame left: bulk traffic is already cut.
            captive: credit.bytes_remaining < FULL_FRAME_BYTES,
            bytes_credited: credit.bytes_credited_total,
            bytes_used: credit.bytes_used,
            bytes_remaining: credit.bytes_remaining,
            seconds_remaining,
            channel: credit.channel,
            lightning_bytes_remaining: (credit.lightning_bytes_remaining > 0).then_some(credit.lightning_bytes_remaining),
            lightning_expires_at: credit.lightning_expires_at,
        })
    }

    /// `GET /v1/device`: the requester's own status, by the MAC its address has on
    /// the client interface.
    pub(super) fn device_of_peer(&self, peer: IpAddr) -> Result<DeviceStatus, GatewayError> {
        self.device_status(self.mac_of(peer)?)
    }

    /// The RFC 8908 answer for `peer`: captive unless its device has at least one
    /// full frame of budget, from any rail. A peer whose MAC is not visible is captive.
    pub(super) fn captive_of_peer(&self, peer: IpAddr) -> Result<CaptiveStatus, GatewayError> {
        let mut out = CaptiveStatus {
            captive: true,
            user_portal_url: Some(self.portal_url.clone()),
            venue_info_url: self.venue_info_url.clone(),
            bytes_remaining: None,
            seconds_remaining: None,
            can_extend_session: Some(true),
        };
        let Some(mac) = self.neighbours.mac_of(peer) else { return Ok(out) };
        let device = self.device_status(mac)?;
        out.captive = device.captive;
        if device.bytes_credited > 0 {
            out.bytes_remaining = Some(device.bytes_remaining);
            out.seconds_remaining = device.seconds_remaining;
        }
        Ok(out)
    }
}
