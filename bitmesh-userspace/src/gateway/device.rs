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
    /// The status of `mac` now.
    pub fn device_status(&self, mac: Mac) -> Result<DeviceStatus, GatewayError> {
        let (credited, used) = match self.with_meter(|m| m.usage(mac))? {
            Some(u) => (u.credited.0, u.used().0),
            None => (0, 0),
        };
        let remaining = credited.saturating_sub(used);
        let channel = self.store.live_channel_for_mac(mac)?.filter(|r| r.state == ChannelStage::Open);
        let seconds_remaining = channel.as_ref().map(|rec| {
            let ends = crediting_ends_at(rec, self.policy().close_margin_blocks).to_consensus_u32();
            u64::from(ends.saturating_sub(self.tip().to_consensus_u32())) * SECS_PER_BLOCK
        });
        Ok(DeviceStatus {
            mac: mac.to_string(),
            // Less than one full Ethernet frame left: bulk traffic is already cut.
            captive: remaining < FULL_FRAME_BYTES,
            bytes_credited: credited,
            bytes_used: used,
            bytes_remaining: remaining,
            seconds_remaining,
            channel: channel.map(|c| c.id),
            lightning_bytes_remaining: None,
            lightning_expires_at: None,
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
