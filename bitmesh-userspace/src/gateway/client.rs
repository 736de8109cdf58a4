//! The client API's side of the controller: terms, open, funding relay, payment,
//! status, close, events and the captive-portal answer.

use std::net::IpAddr;

use bitcoin::secp256k1::{ecdsa, Message, Secp256k1};
use bitcoin::{Amount, OutPoint, Transaction};
use bitmesh_common::blocks::{mined_at, BlockCount};
use bitmesh_common::pricing::{bytes_for_payment, ByteCount};
use bitmesh_common::wire::{
    ChannelId, ChannelState, ChannelStatus, CloseRequest, CloseResponse, FundRequest, Invoice, InvoiceRequest,
    InvoiceStatus, OpenRequest, OpenResponse, PaymentAck, PaymentUpdate, RestoreRequest, RestoreResponse, SignedRequest,
    Terms, CLIENT_AUTH_WINDOW_MS, PROTOCOL_VERSION,
};
use bitmesh_common::wire::{CaptiveStatus, ClientEvent, UsageReport};
use tokio::sync::mpsc;
use tracing::{info, instrument, warn};

use super::{script_of, Gateway, GatewayError};
use crate::api::{ClientGateway, ClientKey};
use bitmesh_channel::{check_open, verify_funding, verify_update, FundingCheck};
use crate::store::{AppendOutcome, ChannelRecord, ChannelStage, CloseReason, Funding, NewChannel, NewPayment, StoreError};

/// Largest untagged Ethernet frame (1500 + 14): below this budget, RFC 8908 says captive.
pub(super) const FULL_FRAME_BYTES: u64 = 1514;

/// Seconds per block, for the RFC 8908 `seconds-remaining` estimate.
pub(super) const SECS_PER_BLOCK: u64 = 600;

/// Open event streams one channel may hold (the agent needs one; a few allow a
/// reconnect before the old stream is noticed dead).
pub const MAX_EVENT_STREAMS_PER_CHANNEL: usize = 3;

fn wire_state(s: ChannelStage) -> ChannelState {
    match s {
        ChannelStage::Offered => ChannelState::AwaitingFunding,
        ChannelStage::Open => ChannelState::Open,
        ChannelStage::Closing => ChannelState::Closing,
        ChannelStage::Closed => ChannelState::Closed,
        ChannelStage::Abandoned => ChannelState::Expired,
        ChannelStage::DoubleSpent => ChannelState::Closed,
    }
}

impl Gateway {
    fn channel_record(&self, id: ChannelId) -> Result<ChannelRecord, GatewayError> {
        Ok(self.store.channel(id)?.ok_or(StoreError::UnknownChannel(id))?)
    }

    /// The channel a signed request (`status`, `events` GETs, the `close` body) is
    /// about, once the request checks out: the signature over its digest with the
    /// channel's client key, then the counter: within ±120 s of our clock and above
    /// the last one accepted for (channel, action). Only a verified, fresh counter is
    /// recorded, so a forger cannot push it up.
    fn signed_channel(&self, req: &SignedRequest) -> Result<ChannelRecord, GatewayError> {
        let rec = self.channel_record(req.channel_id)?;
        let refuse = || GatewayError::RequestSignature(req.action);
        let sig = ecdsa::Signature::from_der(&req.signature.0).map_err(|_| refuse())?;
        let msg = Message::from_digest(req.digest());
        Secp256k1::verification_only().verify_ecdsa(&msg, &sig, &rec.client_pubkey.inner).map_err(|_| refuse())?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .map_err(|_| GatewayError::ClockBeforeEpoch)?;
        if req.counter.abs_diff(now_ms) > CLIENT_AUTH_WINDOW_MS {
            return Err(GatewayError::CounterOutsideWindow { counter: req.counter, now_ms });
        }
        let mut seen = self.auth_counters.lock().map_err(|_| GatewayError::Poisoned("auth counter"))?;
        let last = seen.entry((rec.id, req.action)).or_insert(0);
        if req.counter <= *last {
            return Err(GatewayError::CounterReused { counter: req.counter, last: *last });
        }
        *last = req.counter;
        Ok(rec)
    }

    /// Budget figures of a channel from the kernel (falling back to the store).
    fn report(&self, rec: &ChannelRecord) -> UsageReport {
        let used = match self.with_meter(|m| m.usage(rec.mac)) {
            Ok(Some(u)) if rec.state == ChannelStage::Open => u.used(),
            _ => ByteCount::ZERO,
        };
        UsageReport {
            channel_id: rec.id,
            credited_bytes: rec.credited,
            used_bytes: used,
            remaining_bytes: rec.credited.saturating_sub(used),
        }
    }

    fn status_of(&self, rec: &ChannelRecord) -> ChannelStatus {
        let r = self.report(rec);
        let close_txid = rec
            .settlement_id
            .and_then(|s| self.store.settlement(s).ok().flatten())
            .map(|s| s.txid);
        ChannelStatus {
            channel_id: rec.id,
            state: wire_state(rec.state),
            funding_outpoint: rec.funding.map(|f| f.outpoint),
            capacity: rec.funding.map(|f| f.capacity),
            expiry: rec.expiry,
            total_paid: rec.paid_total,
            credited_bytes: r.credited_bytes,
            used_bytes: r.used_bytes,
            remaining_bytes: r.remaining_bytes,
            close_txid,
        }
    }

    fn ack(&self, rec: &ChannelRecord, total: Amount, credited: ByteCount) -> PaymentAck {
        let capacity = rec.funding.map(|f| f.capacity).unwrap_or(Amount::ZERO);
        let used = match self.with_meter(|m| m.usage(rec.mac)) {
            Ok(Some(u)) => u.used(),
            _ => ByteCount::ZERO,
        };
        PaymentAck {
            channel_id: rec.id,
            total_paid: total,
            client_change: capacity.checked_sub(total).unwrap_or(Amount::ZERO),
            credited_bytes: credited,
            used_bytes: used,
        }
    }

    /// A payment arrives. The rule of docs/design.md section 4, in order:
    /// 1. verify (every check of the channel library, against the stored channel);
    /// 2. persist: journal it and sync to disk;
    /// 3. credit: raise CREDIT in the kernel to the budget the new total buys;
    /// 4. acknowledge.
    /// A crash between 2 and 3 is repaired at restart (CREDIT is rebuilt from the
    /// journal); a re-sent update is answered from the journal and credits nothing new.
    ///
    /// Anything that raises CREDIT first proves the channel is the MAC's current
    /// open channel ([`Self::current_channel`]): an update of a closed channel, or of
    /// an older channel of the same device, is refused before it is looked up, so a
    /// replay sniffed off the air can never bring credit back.
    #[instrument(skip_all, fields(channel = %update.channel_id, total_sat = update.total_paid.to_sat(), mac))]
    pub async fn pay(&self, update: PaymentUpdate) -> Result<PaymentAck, GatewayError> {
        let _serial = self.write_lock.lock().await;
        let rec = self.channel_record(update.channel_id)?;
        tracing::Span::current().record("mac", tracing::field::display(rec.mac));
        self.admit_payment(&rec, update.total_paid).await?; // chain_guard.rs: fresh tip, funding still there, zero-conf cap
        self.current_channel(&rec)?;
        if update.total_paid == rec.paid_total && rec.payments > 0 {
            // Only the latest total is answered idempotently (e.g. the ack was lost);
            // an older one falls through to verification: `amount_not_increasing`.
            if let Some(stored) = self.store.payment_with_total(rec.id, update.total_paid)? {
                if stored.signature == update.signature.0 {
                    let target = self.credit_target(rec.mac, stored.credited)?;
                    self.with_meter(|m| m.raise_credit(rec.mac, target))?;
                    return Ok(self.ack(&rec, stored.paid_total, stored.credited));
                }
            }
        }
        let channel = Self::channel_of(&rec).ok_or(GatewayError::NotOpen(rec.state))?;
        let key = self.seed.channel_key(rec.gateway_key_index)?;

        // 1. verify
        let verified = verify_update(
            &channel,
            &key,
            &self.channel_policy(),
            rec.paid_total,
            self.tip(),
            update.total_paid,
            &update.signature,
        )?;
        let credited = bytes_for_payment(verified.total_paid, rec.price);

        // 2. persist (synced)
        let store = self.store.clone();
        let entry = NewPayment {
            channel: rec.id,
            paid_total: verified.total_paid,
            client_change: verified.client_change,
            signature: verified.signature.to_vec(),
            credited,
        };
        let outcome = tokio::task::spawn_blocking(move || store.append_payment(&entry))
            .await
            .map_err(|e| GatewayError::Task(e.to_string()))??;
        let record = match outcome {
            AppendOutcome::Appended(r) | AppendOutcome::Duplicate(r) => r,
        };

        // 3. credit: the channel's total plus the device's Lightning part, if any
        // (one kernel meter for both rails, docs/design.md section 5.7).
        let target = self.credit_target(rec.mac, record.credited)?;
        self.with_meter(|m| m.raise_credit(rec.mac, target))?;

        if verified.client_change == Amount::ZERO {
            // Nothing left to pay: settle now rather than at expiry.
            let id = rec.id;
            self.store_call(move |s| s.request_close(id, CloseReason::FullyPaid)).await?;
        }
        self.low_water_reset(rec.id);
        info!(credited = record.credited.0, sequence = record.sequence, "payment credited");

        // 4. acknowledge
        Ok(self.ack(&rec, record.paid_total, record.credited))
    }

    /// Refuse unless `rec` is open AND is the open channel of its MAC, whose CREDIT
    /// it owns, AND the kernel meters that MAC (its entries were created when the
    /// channel was funded). Checked before anything is journaled or credited.
    fn current_channel(&self, rec: &ChannelRecord) -> Result<(), GatewayError> {
        if rec.state != ChannelStage::Open {
            return Err(GatewayError::NotOpen(rec.state));
        }
        let current = self.store.live_channel_for_mac(rec.mac)?;
        if current.as_ref().map(|c| c.id) != Some(rec.id) {
            // Cannot happen while one open channel per MAC holds (open() refuses a
            // second); if it ever did, CREDIT belongs to the other channel.
            warn!(channel = %rec.id, mac = %rec.mac, "update for a channel that is not its device's current channel");
            return Err(GatewayError::NotOpen(ChannelStage::Abandoned));
        }
        if self.with_meter(|m| m.usage(rec.mac))?.is_none() {
            return Err(GatewayError::NoKernelEntries { channel: rec.id, mac: rec.mac });
        }
        Ok(())
    }

    fn low_water_reset(&self, id: ChannelId) {
        if let Ok(mut m) = self.low_water_sent.lock() {
            m.remove(&id);
        }
    }

    /// Push usage (and low-water once per crossing) to every subscriber. Called by
    /// the event loop.
    pub fn push_events(&self) {
        let ids: Vec<ChannelId> = match self.subscribers.lock() {
            Ok(s) => s.keys().copied().collect(),
            Err(_) => return,
        };
        let low_water = self.policy().low_water;
        for id in ids {
            let Ok(Some(rec)) = self.store.channel(id) else { continue };
            let mut events = Vec::new();
            if rec.state == ChannelStage::Open {
                let r = self.report(&rec);
                events.push(ClientEvent::Usage(r));
                let low = r.remaining_bytes < low_water;
                let first_crossing = match self.low_water_sent.lock() {
                    Ok(mut m) => {
                        let was = m.insert(id, low).unwrap_or(false);
                        low && !was
                    }
                    Err(_) => false,
                };
                if first_crossing {
                    events.push(ClientEvent::LowWater(r));
                }
            } else if rec.state != ChannelStage::Offered {
                events.push(ClientEvent::Closed { channel_id: id });
            }
            if let Ok(mut subs) = self.subscribers.lock() {
                if let Some(list) = subs.get_mut(&id) {
                    list.retain(|tx| events.iter().all(|e| tx.try_send(e.clone()).is_ok() || !tx.is_closed()));
                    list.retain(|tx| !tx.is_closed());
                    if list.is_empty() {
                        subs.remove(&id);
                    }
                }
            }
        }
    }

    /// Confirmations of a funding transaction, broadcasting it first if the node does
    /// not know it. The gateway relays at most one transaction per offer: a client
    /// cannot make it push an endless series of transactions for one free offer.
    async fn relay_once(&self, offer: ChannelId, tx: &Transaction) -> Result<u32, GatewayError> {
        let txid = tx.compute_txid();
        if let Some(status) = self.chain_call(move |c| c.transaction(&txid)).await? {
            return Ok(status.confirmations);
        }
        let first = self.relayed.lock().map_err(|_| GatewayError::Poisoned("relay"))?.insert(offer);
        if !first {
            return Err(GatewayError::RelayedOnce);
        }
        let t = tx.clone();
        let txid = self.chain_call(move |c| c.broadcast(&t)).await?;
        info!(%txid, "relayed funding transaction");
        Ok(0)
    }

    /// The open response for a stored offer (a repeated open request gets the same).
    fn offer_response(&self, rec: &ChannelRecord) -> OpenResponse {
        let p = self.policy();
        let script = script_of(rec);
        OpenResponse {
            channel_id: rec.id,
            gateway_pubkey: rec.gateway_pubkey,
            client_pubkey: rec.client_pubkey,
            expiry: rec.expiry,
            witness_script: script.witness_script(),
            funding_script_pubkey: script.script_pubkey(),
            funding_address: script.address(p.network).as_unchecked().clone(),
            min_capacity: p.limits.min_capacity,
            max_capacity: p.limits.max_capacity,
            min_first_payment: rec.min_first_payment,
        }
    }

    /// Whether `offer` (a live, unfunded offer) answers `req` as it stands: same key,
    /// expiry and change script, today's price and first-payment minimum, and not
    /// expired. Then a repeated open gets it back instead of a new durable row.
    fn offer_matches(&self, offer: &ChannelRecord, req: &OpenRequest) -> bool {
        let p = self.policy();
        let age = crate::store::unix_now().saturating_sub(offer.opened_at);
        offer.state == ChannelStage::Offered
            && offer.client_pubkey == req.client_pubkey
            && offer.expiry == req.expiry
            && offer.client_change_script == req.client_change_script
            && offer.price == p.price
            && offer.min_first_payment == self.channel_policy().min_first_payment()
            && u64::try_from(age).is_ok_and(|a| a < p.offer_ttl.as_secs())
    }
}

impl ClientGateway for Gateway {
    type Error = GatewayError;

    async fn terms(&self) -> Result<Terms, GatewayError> {
        let p = self.policy();
        Ok(Terms {
            protocol_version: PROTOCOL_VERSION,
            network: p.network,
            price_msat_per_mib: p.price,
            chunk_bytes: p.chunk,
            limits: p.limits,
            min_first_payment: self.channel_policy().min_first_payment(),
            tip_height: self.tip(),
            lightning: self.lightning_terms(),
        })
    }

    async fn invoice(&self, peer: IpAddr, req: InvoiceRequest) -> Result<Invoice, GatewayError> {
        self.create_invoice(peer, req).await
    }

    async fn invoice_status(&self, payment_hash: String) -> Result<InvoiceStatus, GatewayError> {
        Gateway::invoice_status(self, &payment_hash)
    }

    async fn restore(&self, peer: IpAddr, req: RestoreRequest) -> Result<RestoreResponse, GatewayError> {
        Gateway::restore(self, peer, req).await
    }

    async fn device_events(&self, peer: IpAddr) -> Result<Option<mpsc::Receiver<bitmesh_common::wire::DeviceEvent>>, GatewayError> {
        self.subscribe_device(peer).map(Some) // lightning_events.rs
    }

    #[instrument(skip_all, fields(%peer, mac, channel))]
    async fn open(&self, peer: IpAddr, req: OpenRequest) -> Result<OpenResponse, GatewayError> {
        self.ensure_chain_fresh()?;
        let mac = self.mac_of(peer)?;
        tracing::Span::current().record("mac", tracing::field::display(mac));
        let cpolicy = self.channel_policy();
        check_open(&req.client_pubkey, req.expiry, &req.client_change_script, self.tip(), &cpolicy)?;
        let _serial = self.write_lock.lock().await;
        if let Some(live) = self.store.live_channel_for_mac(mac)? {
            match live.state {
                ChannelStage::Open => return Err(GatewayError::DeviceHasOpenChannel(live.id)),
                // The same request again (e.g. the answer was lost): the same offer,
                // not one more durable row.
                _ if self.offer_matches(&live, &req) => {
                    tracing::Span::current().record("channel", tracing::field::display(live.id));
                    info!("channel offer repeated");
                    return Ok(self.offer_response(&live));
                }
                _ => {
                    let id = live.id;
                    self.store_call(move |s| s.abandon(id)).await?;
                }
            }
        }
        let index = self.store.next_key_index()?;
        let key = self.seed.channel_key(index)?;
        let p = self.policy();
        let gateway_pubkey = key.public;
        let rec = NewChannel {
            id: ChannelId([0; 32]),
            mac,
            ip: peer,
            client_pubkey: req.client_pubkey,
            gateway_key_index: index,
            gateway_pubkey,
            expiry: req.expiry,
            client_change_script: req.client_change_script.clone(),
            price: p.price,
            chunk: p.chunk,
            min_first_payment: cpolicy.min_first_payment(),
        };
        let script = bitmesh_channel::ChannelScript { gateway: gateway_pubkey, client: req.client_pubkey, expiry: req.expiry };
        let rec = NewChannel { id: script.channel_id(), ..rec };
        tracing::Span::current().record("channel", tracing::field::display(rec.id));
        // Durable before the client sees the key: the key index is never reused.
        let stored = self
            .store_call(move |s| {
                let stored = s.insert_channel(&rec)?;
                s.bind_client(mac, peer)?;
                Ok(stored)
            })
            .await?;
        info!("channel offered");
        Ok(self.offer_response(&stored))
    }

    #[instrument(skip_all, fields(%peer, channel = %req.channel_id, txid = %req.funding_tx.compute_txid()))]
    async fn fund(&self, peer: IpAddr, req: FundRequest) -> Result<ChannelStatus, GatewayError> {
        let rec = self.channel_record(req.channel_id)?;
        // Relay only for the device the channel was offered to.
        if self.mac_of(peer)? != rec.mac {
            return Err(GatewayError::OtherDevice);
        }
        // One funding call at a time, and the record read again under the lock: of two
        // transactions sent at once, the second finds the channel open and is refused.
        let _funding = self.funding_lock.lock().await;
        let rec = self.channel_record(req.channel_id)?;
        let outpoint = OutPoint { txid: req.funding_tx.compute_txid(), vout: req.funding_vout };
        if rec.state == ChannelStage::Open && rec.funding.map(|f| f.outpoint) == Some(outpoint) {
            return Ok(self.status_of(&rec)); // already accepted: idempotent
        }
        if rec.state != ChannelStage::Offered {
            return Err(GatewayError::NotOpen(rec.state));
        }
        let cpolicy = self.channel_policy();
        let script = script_of(&rec);
        let in_use = self
            .store
            .channel_by_outpoint(outpoint)?
            .is_some_and(|c| c.id != rec.id);
        // Check everything but confirmations BEFORE relaying: the gateway broadcasts
        // only a transaction that funds the channel it offered to this client.
        let precheck = FundingCheck {
            tx: &req.funding_tx,
            vout: req.funding_vout,
            confirmations: u32::MAX,
            outpoint_in_use: in_use,
            tip: self.tip(),
        };
        verify_funding(&script, precheck, &cpolicy)?;
        let confirmations = self.relay_once(rec.id, &req.funding_tx).await?;
        let check = FundingCheck { confirmations, ..precheck };
        let funded = verify_funding(&script, check, &cpolicy)?;
        self.admit_funding(&rec, &funded)?; // exposure.rs: fresh tip, zero-conf exposure cap
        let height = mined_at(self.tip(), BlockCount(confirmations));
        let funding = Funding { outpoint: funded.outpoint, capacity: funded.capacity, height };
        let _serial = self.write_lock.lock().await;
        // Usage so far is Lightning's: account it before the channel counts (usage
        // after this point goes to the channel first, docs/design.md section 5.7).
        self.settle_before_channel(rec.mac)?;
        let id = rec.id;
        // The store itself refuses a channel that is no longer offered (`NotOffered`).
        let rec = self.store_call(move |s| s.set_funding(id, funding)).await?;
        if let Ok(mut r) = self.relayed.lock() {
            r.remove(&rec.id);
        }
        // The device's entries start fresh for this channel: no other channel of this
        // MAC is open, so anything still there is stale, and CREDIT must only ever be
        // this channel's own credited total. Unless the device holds Lightning credit:
        // then its entries (and their count) go on, and the channel's credit is added
        // on top as it is paid (docs/design.md section 5.7).
        if self.has_live_lightning(rec.mac)? {
            self.with_meter(|m| m.bind_source(rec.mac, rec.ip))?;
        } else {
            if self.with_meter(|m| m.usage(rec.mac))?.is_some() {
                warn!(mac = %rec.mac, "removing stale kernel entries before metering the new channel");
                self.with_meter(|m| m.remove_client(rec.mac))?;
            }
            self.store.ln_forget_meter(rec.mac).map_err(GatewayError::from)?;
            self.with_meter(|m| {
                m.restore_client(rec.mac, Default::default())?;
                m.bind_source(rec.mac, rec.ip)
            })?;
        }
        info!(capacity_sat = funded.capacity.to_sat(), zero_conf = funded.zero_conf, "channel funded");
        Ok(self.status_of(&rec))
    }

    async fn pay(&self, _peer: IpAddr, update: PaymentUpdate) -> Result<PaymentAck, GatewayError> {
        // The update signature authenticates the payer; the credit always goes to
        // the MAC the channel is bound to, whoever delivers the update.
        Gateway::pay(self, update).await
    }

    async fn status(&self, _peer: IpAddr, req: SignedRequest) -> Result<ChannelStatus, GatewayError> {
        let rec = self.signed_channel(&req)?;
        Ok(self.status_of(&rec))
    }

    #[instrument(skip_all, fields(channel = %req.channel_id))]
    async fn close(&self, _peer: IpAddr, req: CloseRequest) -> Result<CloseResponse, GatewayError> {
        let rec = self.signed_channel(&req.signed())?;
        if rec.state == ChannelStage::Open {
            let id = rec.id;
            self.store_call(move |s| s.request_close(id, CloseReason::Client)).await?;
            if let Err(e) = self.settle_due().await {
                warn!(error = %e, "settlement after a client close failed; it is retried each block");
            }
        }
        let rec = self.channel_record(req.channel_id)?;
        let status = self.status_of(&rec);
        let capacity = rec.funding.map(|f| f.capacity).unwrap_or(Amount::ZERO);
        Ok(CloseResponse {
            channel_id: rec.id,
            state: status.state,
            close_txid: status.close_txid,
            total_paid: rec.paid_total,
            client_change: capacity.checked_sub(rec.paid_total).unwrap_or(Amount::ZERO),
        })
    }

    async fn events(&self, _peer: IpAddr, req: SignedRequest) -> Result<mpsc::Receiver<ClientEvent>, GatewayError> {
        let rec = self.signed_channel(&req)?;
        let id = rec.id;
        // Streams are long-lived connections: only a paying (open) channel gets
        // them, and only a few, or an unfunded offer could hold sockets for free.
        if rec.state != ChannelStage::Open {
            return Err(GatewayError::NotOpen(rec.state));
        }
        let first = ClientEvent::Usage(self.report(&rec));
        let mut subs = self.subscribers.lock().map_err(|_| GatewayError::Poisoned("subscriber"))?;
        let list = subs.entry(id).or_default();
        list.retain(|tx| !tx.is_closed());
        if list.len() >= MAX_EVENT_STREAMS_PER_CHANNEL {
            return Err(GatewayError::TooManyStreams { max: MAX_EVENT_STREAMS_PER_CHANNEL });
        }
        let (tx, rx) = mpsc::channel(16);
        let _ = tx.try_send(first);
        list.push(tx);
        Ok(rx)
    }

    fn client_key(&self, peer: IpAddr) -> ClientKey {
        // IPv4 only: the IPv6 lookup runs `ip -6 neigh`, too costly per connection.
        match peer {
            IpAddr::V4(_) => self.neighbours.mac_of(peer).map_or(ClientKey::Ip(peer), ClientKey::Mac),
            IpAddr::V6(_) => ClientKey::Ip(peer),
        }
    }

    async fn captive(&self, peer: IpAddr) -> Result<CaptiveStatus, GatewayError> {
        self.captive_of_peer(peer) // device.rs
    }

    async fn device(&self, peer: IpAddr) -> Result<Option<bitmesh_common::wire::DeviceStatus>, GatewayError> {
        self.device_of_peer(peer).map(Some) // device.rs
    }
}
