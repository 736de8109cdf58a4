//! The controller: the one place that calls meter + channel + chain + store.
//!
//! * [`Gateway::pay`] (in `client.rs`) is the payment rule of docs/design.md section 4:
//!   verify, persist (synced), credit, acknowledge.
//! * `client.rs`: the rest of the client API (terms, open, funding relay, status,
//!   close, events, captive portal), implementing [`crate::api::ClientGateway`].
//! * `settle.rs`: the settlement engine, driven by block height.
//! * `reconcile.rs`: restart reconciliation and periodic usage snapshots.
//! * `ports.rs`: the narrow kernel/link interfaces (real and in-memory).
//! * `edge.rs`: the one conversion of a [`GatewayError`] into the client API's error.

mod binding;
mod batch;
mod chain_guard;
mod client;
mod device;
mod edge;
mod exposure;
mod lightning;
mod lightning_events;
mod ports;
mod reconcile;
mod settle;
#[cfg(test)]
mod lightning_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bitcoin::absolute::Height;
use bitcoin::{Amount, ScriptBuf};
use bitmesh_common::blocks::{BlockCount, HeightExt};
use bitmesh_common::kernel::Mac;
use bitmesh_common::pricing::PriceMsatPerMib;
use bitmesh_common::wire::{ChannelId, SignedAction, CLIENT_AUTH_WINDOW_MS};
use tokio::sync::mpsc;

use bitmesh_common::wire::ClientEvent;
use bitmesh_channel::chain::{Chain, ChainError};
use bitmesh_channel::{Channel, ChannelError, ChannelPolicy, ChannelScript, GatewaySeed, KeysError};
use crate::config::Policy;
use crate::meter::{ClientUsage, MeterError};
use crate::store::{ChannelRecord, ChannelStage, CloseReason, Store, StoreError};

pub use binding::SourceWatch;
pub use lightning::LightningRail;
pub use lightning_events::{MAX_DEVICE_STREAMS, MAX_DEVICE_STREAMS_PER_DEVICE};
pub use ports::{KernelNeighbours, MemoryMeter, MeterPort, Neighbours, StaticNeighbours};
pub use reconcile::ReconcileReport;
pub use settle::SettleReport;

/// Store key of the runtime price for new channels.
const PRICE_SETTING: &str = "price_msat_per_mib";

/// Failures inside the controller, and the client requests it refuses. Turned into
/// the client API's error (code and HTTP status) in one place, `edge.rs`.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Meter(#[from] MeterError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("a background task failed: {0}")]
    Task(String),
    #[error("the {0} lock was poisoned by a panic; restart the controller")]
    Poisoned(&'static str),
    #[error("the system clock is before the Unix epoch")]
    ClockBeforeEpoch,
    /// The peer's MAC is not in the neighbour table of the client interface.
    #[error("the gateway cannot see your device's MAC address on its client interface: connect through the gateway's WiFi")]
    NotOnLink,
    #[error("this channel was offered to another device")]
    OtherDevice,
    #[error("signature does not verify: sign client_request_digest(\"{0}\", channel_id, counter) with the channel's client key (DER)")]
    RequestSignature(SignedAction),
    #[error("request counter {counter} is more than {} s from the gateway clock ({now_ms} ms): sign again with the current time in ms", CLIENT_AUTH_WINDOW_MS / 1000)]
    CounterOutsideWindow { counter: u64, now_ms: u64 },
    #[error("request counter {counter} is not above the last accepted ({last}): a signed request is single-use, sign again with a higher counter")]
    CounterReused { counter: u64, last: u64 },
    /// The channel is not in the state the request needs.
    #[error("channel is {}", .0.as_str())]
    NotOpen(ChannelStage),
    #[error("this device already has open channel {0}: keep paying on it or close it first")]
    DeviceHasOpenChannel(ChannelId),
    #[error("this channel already has {max} open event streams: close one and retry")]
    TooManyStreams { max: usize },
    #[error("the gateway relays one funding transaction per offer and has relayed one for this offer already: broadcast this transaction yourself, or open a new channel")]
    RelayedOnce,
    /// The tip was not read for longer than `--chain-stale-after`.
    #[error("the chain tip is stale: the backend has not answered")]
    ChainStale,
    #[error("the funding output of channel {0} was double-spent (or dropped) before it confirmed")]
    FundingDoubleSpent(ChannelId),
    #[error("the gateway already credits {} sat on unconfirmed funding (cap {} sat): wait for {confirmations} confirmation(s) and send the funding again", .used.to_sat(), .cap.to_sat())]
    ZeroConfExposure { used: Amount, cap: Amount, confirmations: u32 },
    #[error("total {} sat is above the {} sat this channel may pay before its funding confirms: re-send it after {confirmations} confirmation(s)", .total.to_sat(), .cap.to_sat())]
    UnconfirmedTotal { total: Amount, cap: Amount, confirmations: u32 },
    #[error("open channel {channel} has no kernel entries for {mac}: restart the controller to reconcile")]
    NoKernelEntries { channel: ChannelId, mac: Mac },
    // --- Lightning (gateway/lightning.rs) ---
    #[error("this gateway sells no Lightning bundles (no Lightning node running): open a channel instead")]
    LightningUnavailable,
    #[error("no bundle {0:?}: pick one of the bundles in GET /v1/terms")]
    UnknownBundle(String),
    #[error("bytes must be between {min} and {max}")]
    BytesOutOfRange { min: u64, max: u64 },
    #[error("name exactly one of bundle or bytes")]
    BundleOrBytes,
    #[error("{0:?} is not a payment hash (64 hex digits)")]
    BadPaymentHash(String),
    #[error("no invoice with this payment hash")]
    UnknownInvoice,
    #[error("no purchase with this token: check the code (letters A-Z and digits 2-7)")]
    UnknownToken,
    #[error("the credit of this token has expired")]
    TokenExpired,
    #[error("this device has no pending invoice and no Lightning credit: ask for an invoice first (POST /v1/invoices)")]
    NoPurchase,
    /// `scope` is "this device" or "the gateway" (all devices together).
    #[error("{scope} already has {max} open device event streams: close one, or poll GET /v1/invoices/{{payment_hash}} instead")]
    TooManyDeviceStreams { max: usize, scope: &'static str },
    #[error(transparent)]
    Lightning(#[from] crate::lightning::LightningError),
}

/// Everything `Gateway::new` needs.
pub struct GatewayParts {
    pub store: Arc<Store>,
    pub meter: Box<dyn MeterPort>,
    pub chain: Arc<dyn Chain>,
    pub seed: GatewaySeed,
    pub policy: Policy,
    /// Where the gateway's share of every close goes.
    pub payout_script: ScriptBuf,
    pub neighbours: Box<dyn Neighbours>,
    /// URL of the portal page shown in the RFC 8908 answer.
    pub portal_url: String,
    /// RFC 8908 `venue-info-url`, if the operator gave one.
    pub venue_info_url: Option<String>,
}

/// The controller. Shared behind an `Arc` by the API, admin socket and loops.
pub struct Gateway {
    store: Arc<Store>,
    meter: Mutex<Box<dyn MeterPort>>,
    chain: Arc<dyn Chain>,
    seed: GatewaySeed,
    policy: RwLock<Policy>,
    /// The price `--price-msat-per-mib` (flag, config file or default) asked for; a
    /// price set with `bitmesh price` overrides it until `bitmesh price --reset`.
    configured_price: PriceMsatPerMib,
    payout_script: ScriptBuf,
    neighbours: Box<dyn Neighbours>,
    portal_url: String,
    venue_info_url: Option<String>,
    tip: AtomicU32,
    /// When `tip` was last read from the backend (a stale tip stops payments).
    tip_read_at: Mutex<std::time::Instant>,
    /// Zero-conf credit reserved per channel at funding (see `exposure.rs`).
    zero_conf_book: exposure::ZeroConfBook,
    /// Serializes payments and opens: each is a read-check-write over one channel,
    /// and the rate is bounded by the synced commit anyway.
    write_lock: tokio::sync::Mutex<()>,
    subscribers: Mutex<HashMap<ChannelId, Vec<mpsc::Sender<ClientEvent>>>>,
    /// Last low-water state pushed per channel (push once per crossing).
    low_water_sent: Mutex<HashMap<ChannelId, bool>>,
    /// Last signed request counter accepted per (channel, action): a signed GET is
    /// single-use. In memory only: after a restart the 120 s window alone protects.
    auth_counters: Mutex<HashMap<(ChannelId, SignedAction), u64>>,
    /// Serializes funding calls: check offered, relay, record, meter, as one step,
    /// so two funding transactions sent at once cannot both be accepted.
    funding_lock: tokio::sync::Mutex<()>,
    /// Offers whose funding transaction the gateway has already broadcast: one
    /// relay per offer (in memory: after a restart one more may be relayed).
    relayed: Mutex<std::collections::HashSet<ChannelId>>,
    /// The Lightning rail, once `bitmesh run --lightning` has started its node.
    lightning: std::sync::OnceLock<LightningRail>,
    /// Open device event streams (`GET /v1/device/events`), per MAC.
    device_streams: lightning_events::DeviceStreams,
    /// Lightning payments journaled whose kernel credit is still being applied: their
    /// status stays `pending` until then, so a device told `paid` can use the bytes.
    crediting: Mutex<std::collections::HashSet<crate::store::PaymentHash>>,
}

impl Gateway {
    /// Build the controller. The runtime price (if the operator changed it) comes
    /// from the store; `tip` is the chain tip read at start.
    pub fn new(parts: GatewayParts, tip: Height) -> Result<Arc<Gateway>, GatewayError> {
        let mut policy = parts.policy;
        let configured_price = policy.price;
        if let Some(price) = stored_price(&parts.store)? {
            policy.price = price;
        }
        Ok(Arc::new(Gateway {
            store: parts.store,
            meter: Mutex::new(parts.meter),
            chain: parts.chain,
            seed: parts.seed,
            policy: RwLock::new(policy),
            configured_price,
            payout_script: parts.payout_script,
            neighbours: parts.neighbours,
            portal_url: parts.portal_url,
            venue_info_url: parts.venue_info_url,
            tip: AtomicU32::new(tip.to_consensus_u32()),
            tip_read_at: Mutex::new(std::time::Instant::now()),
            zero_conf_book: exposure::ZeroConfBook::default(),
            write_lock: tokio::sync::Mutex::new(()),
            subscribers: Mutex::new(HashMap::new()),
            low_water_sent: Mutex::new(HashMap::new()),
            auth_counters: Mutex::new(HashMap::new()),
            funding_lock: tokio::sync::Mutex::new(()),
            relayed: Mutex::new(std::collections::HashSet::new()),
            lightning: std::sync::OnceLock::new(),
            device_streams: Default::default(),
            crediting: Mutex::new(std::collections::HashSet::new()),
        }))
    }

    /// The store (admin queries).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The chain tip as last seen.
    pub fn tip(&self) -> Height {
        Height::from_consensus(self.tip.load(Ordering::Relaxed)).unwrap_or(Height::ZERO)
    }

    fn set_tip(&self, h: Height) {
        self.tip.store(h.to_consensus_u32(), Ordering::Relaxed);
        if let Ok(mut at) = self.tip_read_at.lock() {
            *at = std::time::Instant::now();
        }
    }

    /// The policy now in force (price may have been changed at runtime).
    pub fn policy(&self) -> Policy {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Change the price for channels opened from now on (durably).
    pub fn set_price(&self, price: PriceMsatPerMib) -> Result<(), GatewayError> {
        self.store.set_setting(PRICE_SETTING, &price.to_msat().to_string())?;
        match self.policy.write() {
            Ok(mut p) => p.price = price,
            Err(p) => p.into_inner().price = price,
        }
        tracing::info!(price_msat_per_mib = price.to_msat(), "price for new channels changed");
        Ok(())
    }

    /// The price the flag or config file asked for (in force unless
    /// [`Gateway::price_set_at_runtime`]).
    pub fn configured_price(&self) -> PriceMsatPerMib {
        self.configured_price
    }

    /// Whether the price in force was set with `bitmesh price` (kept in the store, so
    /// it overrides the flag and the config file at every start).
    pub fn price_set_at_runtime(&self) -> Result<bool, GatewayError> {
        Ok(stored_price(&self.store)?.is_some())
    }

    /// Forget the price set with `bitmesh price`: the flag or config file's price
    /// applies again to channels opened from now on (durably).
    pub fn reset_price(&self) -> Result<(), GatewayError> {
        self.store.delete_setting(PRICE_SETTING)?;
        let price = self.configured_price;
        match self.policy.write() {
            Ok(mut p) => p.price = price,
            Err(p) => p.into_inner().price = price,
        }
        tracing::info!(price_msat_per_mib = price.to_msat(), "price for new channels back to the configured one");
        Ok(())
    }

    /// The channel library's policy for the current terms.
    fn channel_policy(&self) -> ChannelPolicy {
        let p = self.policy();
        ChannelPolicy { limits: p.limits, gateway_payout_script: self.payout_script.clone() }
    }

    fn with_meter<T>(&self, f: impl FnOnce(&mut dyn MeterPort) -> Result<T, MeterError>) -> Result<T, GatewayError> {
        let mut m = self.meter.lock().map_err(|_| GatewayError::Poisoned("meter"))?;
        Ok(f(m.as_mut())?)
    }

    /// Run a blocking chain call off the async threads.
    async fn chain_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Chain) -> Result<T, ChainError> + Send + 'static,
    ) -> Result<T, GatewayError> {
        let c = self.chain.clone();
        tokio::task::spawn_blocking(move || f(&*c))
            .await
            .map_err(|e| GatewayError::Task(e.to_string()))?
            .map_err(GatewayError::from)
    }

    /// Run a store write (a synced commit) off the async threads.
    async fn store_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, GatewayError> {
        let s = self.store.clone();
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| GatewayError::Task(e.to_string()))?
            .map_err(GatewayError::from)
    }

    /// The funded channel's fixed parameters, rebuilt from the store row.
    fn channel_of(rec: &ChannelRecord) -> Option<Channel> {
        let f = rec.funding?;
        Some(Channel {
            script: script_of(rec),
            funding_outpoint: f.outpoint,
            capacity: f.capacity,
            client_change_script: rec.client_change_script.clone(),
            min_first_payment: rec.min_first_payment,
        })
    }

    /// Resolve a request's peer to the MAC the kernel sees, or refuse.
    fn mac_of(&self, peer: IpAddr) -> Result<Mac, GatewayError> {
        self.neighbours.mac_of(peer).ok_or(GatewayError::NotOnLink)
    }
}

/// The price set with `bitmesh price`, if any (an unreadable value is ignored).
fn stored_price(store: &Store) -> Result<Option<PriceMsatPerMib>, StoreError> {
    Ok(store.setting(PRICE_SETTING)?.and_then(|p| p.parse::<u64>().ok()).and_then(|v| PriceMsatPerMib::new(v).ok()))
}

fn script_of(rec: &ChannelRecord) -> ChannelScript {
    ChannelScript { gateway: rec.gateway_pubkey, client: rec.client_pubkey, expiry: rec.expiry }
}

/// Last height at which the channel is still credited (see `Channel::crediting_ends_at`).
fn crediting_ends_at(rec: &ChannelRecord, margin: BlockCount) -> Height {
    rec.expiry.minus(margin)
}

/// Operator-facing queries and actions (used by the admin socket and metrics).
impl Gateway {
    /// (MAC, credited, usage) of every client the kernel meters.
    pub fn metered_clients(&self) -> Result<Vec<ClientUsage>, GatewayError> {
        self.with_meter(|m| m.all_usage())
    }

    /// Close `ids` (or every open channel) now, in one transaction.
    pub async fn settle_now(&self, ids: Option<Vec<ChannelId>>) -> Result<SettleReport, GatewayError> {
        // Held from the first mark to the broadcast: a settlement pass of the chain
        // loop in between would otherwise close the channels marked so far on their own.
        let _serial = self.write_lock.lock().await;
        let targets = match ids {
            Some(ids) => ids,
            None => self.store.channels_in(&[ChannelStage::Open])?.into_iter().map(|c| c.id).collect(),
        };
        for id in targets {
            self.store.request_close(id, CloseReason::Operator)?;
        }
        self.settle_due_locked().await
    }
}
