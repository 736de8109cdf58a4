//! The device event stream (`GET /v1/device/events`, docs/api.md "Device events"):
//! how a Lightning buyer (a phone's portal page, `bitmesh pay --lightning`) learns
//! that its payment is credited without polling, and sees its credit change.
//!
//! A phone has no channel key to sign with, so the stream is the requester's own
//! device, found by its MAC in the neighbour table like `GET /v1/device`: a device
//! only ever hears about its own MAC. Streams are long-lived connections, so they
//! are bounded three ways: only a device with something to wait for gets one (a
//! pending invoice or live Lightning credit; the stream ends when it has neither),
//! at most [`MAX_DEVICE_STREAMS_PER_DEVICE`] per device and [`MAX_DEVICE_STREAMS`] in
//! all, on top of the API's connection caps.
//!
//! `invoice_paid` is sent from [`Gateway::credit_lightning_receipt`] only after the
//! receipt is journaled (synced) and the kernel CREDIT is raised; `credit` is the
//! device's [`DeviceStatus`], first when the stream opens, then whenever it changes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use bitmesh_common::kernel::Mac;
use bitmesh_common::wire::{DeviceEvent, DeviceStatus, InvoicePaid};
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::{Gateway, GatewayError};
use crate::store::unix_now;

/// Open streams one device may hold: its page and an agent, or a reconnect before
/// the old stream is noticed dead.
pub const MAX_DEVICE_STREAMS_PER_DEVICE: usize = 2;

/// Open device streams, all devices together: a quarter of the API's default
/// connection cap (256), so streams never take every connection. Past it a device
/// is refused (429) and polls `GET /v1/invoices/{hash}` instead.
pub const MAX_DEVICE_STREAMS: usize = 64;

/// Events queued per stream; a reader that falls this far behind misses events
/// (the next `credit` carries the state anyway).
const QUEUE: usize = 16;

struct Subscriber {
    tx: mpsc::Sender<DeviceEvent>,
    /// The last `credit` this subscriber was sent (a change sends the next one).
    last: Option<DeviceStatus>,
}

/// The open streams, per MAC.
#[derive(Default)]
pub(super) struct DeviceStreams {
    inner: Mutex<HashMap<Mac, Vec<Subscriber>>>,
}

impl DeviceStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Mac, Vec<Subscriber>>> {
        // A poisoned lock only means a panic elsewhere mid-update: the map still
        // holds plain senders, keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drop subscribers whose reader went away; forget MACs with none left.
    fn prune(map: &mut HashMap<Mac, Vec<Subscriber>>) {
        map.retain(|_, subs| {
            subs.retain(|s| !s.tx.is_closed());
            !subs.is_empty()
        });
    }

    /// Send `ev` to every subscriber of `mac` (a full queue drops it for that one).
    fn send(&self, mac: Mac, ev: &DeviceEvent) {
        if let Some(subs) = self.lock().get_mut(&mac) {
            for s in subs.iter() {
                let _ = s.tx.try_send(ev.clone());
            }
        }
    }

    /// Send `status` to the subscribers of `mac` that have not seen it yet.
    fn send_credit(&self, mac: Mac, status: &DeviceStatus) {
        if let Some(subs) = self.lock().get_mut(&mac) {
            for s in subs.iter_mut().filter(|s| s.last.as_ref() != Some(status)) {
                if s.tx.try_send(DeviceEvent::Credit(status.clone())).is_ok() {
                    s.last = Some(status.clone());
                }
            }
        }
    }

    fn macs(&self) -> Vec<Mac> {
        let mut map = self.lock();
        Self::prune(&mut map);
        map.keys().copied().collect()
    }

    /// Open streams now (all devices).
    fn open(&self) -> usize {
        self.lock().values().map(|subs| subs.iter().filter(|s| !s.tx.is_closed()).count()).sum()
    }
}

impl Gateway {
    /// Whether `mac` has something a stream can report: an unpaid invoice that has
    /// not expired (asked from this MAC or for the account on it), or live
    /// Lightning credit.
    fn has_purchase(&self, mac: Mac) -> Result<bool, GatewayError> {
        Ok(self.has_live_lightning(mac)? || self.store.ln_has_pending_invoice(mac, unix_now())?)
    }

    /// `GET /v1/device/events`: a stream of the requesting device's events, its
    /// current `credit` first.
    pub fn subscribe_device(&self, peer: IpAddr) -> Result<mpsc::Receiver<DeviceEvent>, GatewayError> {
        self.rail()?;
        let mac = self.mac_of(peer)?;
        if !self.has_purchase(mac)? {
            return Err(GatewayError::NoPurchase);
        }
        let status = self.device_status(mac)?;
        let mut map = self.device_streams.lock();
        DeviceStreams::prune(&mut map);
        let total: usize = map.values().map(Vec::len).sum();
        let mine = map.get(&mac).map_or(0, Vec::len);
        if mine >= MAX_DEVICE_STREAMS_PER_DEVICE {
            return Err(GatewayError::TooManyDeviceStreams { max: MAX_DEVICE_STREAMS_PER_DEVICE, scope: "this device" });
        }
        if total >= MAX_DEVICE_STREAMS {
            return Err(GatewayError::TooManyDeviceStreams { max: MAX_DEVICE_STREAMS, scope: "the gateway" });
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let _ = tx.try_send(DeviceEvent::Credit(status.clone()));
        map.entry(mac).or_default().push(Subscriber { tx, last: Some(status) });
        info!(%mac, open = total + 1, "device event stream opened");
        Ok(rx)
    }

    /// A payment for `mac` is journaled and credited: tell its streams, then send
    /// its new figures. Called by [`Gateway::credit_lightning_receipt`] after the
    /// kernel is raised, never before.
    pub(super) fn notify_paid(&self, mac: Mac, paid: InvoicePaid) {
        self.device_streams.send(mac, &DeviceEvent::InvoicePaid(paid));
        match self.device_status(mac) {
            Ok(status) => self.device_streams.send_credit(mac, &status),
            Err(e) => debug!(%mac, error = %e, "no device status for the stream after a payment"),
        }
    }

    /// Push each streamed device's figures when they changed, and end the streams
    /// of devices with nothing left to report (no pending invoice, no live
    /// Lightning credit). Called about once a second.
    pub fn push_device_events(&self) {
        for mac in self.device_streams.macs() {
            let Ok(status) = self.device_status(mac) else { continue };
            self.device_streams.send_credit(mac, &status);
            if matches!(self.has_purchase(mac), Ok(false)) {
                self.device_streams.lock().remove(&mac);
                debug!(%mac, "device event streams ended: no pending invoice and no Lightning credit");
            }
        }
    }

    /// Open device event streams (metrics, tests).
    pub fn device_streams_open(&self) -> usize {
        self.device_streams.open()
    }
}
