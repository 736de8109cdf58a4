//! The operator's interface: a root-only unix socket (mode 0600) speaking one JSON
//! request line -> one JSON response line, the CLI client for it, which clients
//! `bitmesh clients` lists (`clients`), the table/JSON formatting of what the CLI
//! prints (`format`), and Prometheus metrics (`metrics`).

pub mod clients;
pub mod format;
pub mod metrics;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bitmesh_common::kernel::Mac;
use bitmesh_common::pricing::PriceMsatPerMib;
use bitmesh_common::wire::ChannelId;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::gateway::{Gateway, GatewayError};
use crate::store::{unix_now, ChannelRecord, ChannelStage, CloseReason, Earnings};

/// Errors of the admin socket and its client.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot create the admin socket {path}: {source}; run as root and check --admin-socket")]
    Bind { path: PathBuf, #[source] source: std::io::Error },
    #[error("cannot reach the controller at {path}: {source}; is `bitmesh run` running, and are you root?")]
    Connect { path: PathBuf, #[source] source: std::io::Error },
    #[error("admin socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the controller sent an unreadable answer: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the controller refused: {0}")]
    Refused(String),
}

/// A CLI request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AdminRequest {
    Clients,
    Channels,
    Earnings,
    /// Close one channel, or all open channels when `channel` is `None`.
    Settle { channel: Option<ChannelId> },
    /// Read (`set` = None) or change the price for new channels; `reset` forgets a
    /// price set this way, so the flag or config file's applies again.
    Price {
        set_msat_per_mib: Option<u64>,
        #[serde(default)]
        reset: bool,
    },
    /// The Lightning node: balances, channels, pending invoices.
    Lightning,
    /// Lightning: open a channel from the node's on-chain funds.
    LightningOpenChannel { target: String, sat: u64 },
    /// Lightning: connect to a peer (it may then open a channel to the gateway).
    LightningConnect { target: String },
    /// Lightning: send on-chain funds (`sat` None = all spendable) or pay an invoice.
    LightningWithdraw {
        #[serde(default)]
        address: Option<String>,
        #[serde(default)]
        sat: Option<u64>,
        #[serde(default)]
        invoice: Option<String>,
    },
    /// Lightning: the node's seed, hex (back it up).
    LightningExportSeed,
}

/// The price for new channels and where it comes from. A price set with
/// `bitmesh price` is kept in the store and overrides `--price-msat-per-mib` (flag or
/// config file) at every start until `bitmesh price --reset`, so the CLI says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceSetting {
    /// In force for new channels, msat per MiB.
    pub msat_per_mib: u64,
    /// What `--price-msat-per-mib` (flag, config file or default) asks for.
    #[serde(default)]
    pub configured_msat_per_mib: Option<u64>,
    /// Set with `bitmesh price` (overrides the configured price).
    #[serde(default)]
    pub set_at_runtime: bool,
}

impl PriceSetting {
    /// The gateway's price now and its origin.
    pub fn of(gw: &Gateway) -> Result<PriceSetting, GatewayError> {
        Ok(PriceSetting {
            msat_per_mib: gw.policy().price.to_msat(),
            configured_msat_per_mib: Some(gw.configured_price().to_msat()),
            set_at_runtime: gw.price_set_at_runtime()?,
        })
    }
}

/// The `state` of a `bitmesh clients` row: the stage of the channel that matters most
/// for the device, or how it is metered without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientState {
    AwaitingFunding,
    Open,
    Closing,
    Closed,
    /// The funding vanished before confirming: credit withdrawn, never settled.
    DoubleSpent,
    /// Metered on Lightning credit, no open channel.
    Lightning,
    /// Metered, no credit.
    Unpaid,
}

impl ClientState {
    /// The name `bitmesh clients` and its `--json` show.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::AwaitingFunding => "awaiting_funding",
            ClientState::Open => "open",
            ClientState::Closing => "closing",
            ClientState::Closed => "closed",
            ClientState::DoubleSpent => "double_spent",
            ClientState::Lightning => "lightning",
            ClientState::Unpaid => "unpaid",
        }
    }
}

impl std::fmt::Display for ClientState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `bitmesh clients`: one client device (MAC) and the channel that matters
/// most for it (see [`clients`] for which rows and what each column holds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientRow {
    pub mac: String,
    pub ip: Option<String>,
    pub channel: Option<ChannelId>,
    pub state: ClientState,
    pub paid_sat: u64,
    /// What the kernel credits now (0 once metering stops).
    pub credited_bytes: u64,
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub remaining_bytes: u64,
    /// Bytes per second over the last sampling interval.
    pub rate_bps: f64,
    /// Seconds since the kernel last billed a frame for this client.
    pub last_seen_secs_ago: Option<u64>,
    /// Whether the kernel meters the client now.
    #[serde(default)]
    pub metered: bool,
    /// The channel's funded capacity.
    #[serde(default)]
    pub capacity_sat: Option<u64>,
    /// Why the channel is closing or closed.
    #[serde(default)]
    pub close_reason: Option<CloseReason>,
    /// The settlement transaction of a closing or closed channel.
    #[serde(default)]
    pub close_txid: Option<String>,
    /// How the device pays now: `channel`, `lightning` or `channel+lightning`.
    #[serde(default)]
    pub rail: Option<String>,
}

/// One row of `bitmesh channels`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelRow {
    pub id: ChannelId,
    pub mac: String,
    pub state: ChannelStage,
    pub capacity_sat: Option<u64>,
    pub paid_sat: u64,
    pub credited_bytes: u64,
    pub payments: u64,
    pub expiry: u32,
    pub close_reason: Option<CloseReason>,
    pub close_txid: Option<String>,
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdminResponse {
    Clients {
        clients: Vec<ClientRow>,
        /// The price for new channels (shown above the table).
        #[serde(default)]
        price: Option<PriceSetting>,
    },
    Channels { channels: Vec<ChannelRow> },
    Earnings { earnings: Earnings },
    Settled { closed: Vec<ChannelId>, txids: Vec<String> },
    Price(PriceSetting),
    Lightning { info: crate::lightning::operator::LightningInfo },
    /// A Lightning action's result (txid, payment id, channel id).
    LightningDone { message: String },
    LightningSeed { seed_hex: String },
    Error { message: String },
}

/// Per-MAC rate sampling for the `rate` column.
#[derive(Default)]
pub struct RateSampler {
    last: Mutex<HashMap<Mac, (Instant, u64, f64)>>,
}

impl RateSampler {
    /// Record `used` bytes for `mac` now; returns the rate since the previous sample.
    pub fn sample(&self, mac: Mac, used: u64) -> f64 {
        let now = Instant::now();
        let Ok(mut m) = self.last.lock() else { return 0.0 };
        let rate = match m.get(&mac) {
            Some((at, prev, rate)) => {
                let dt = now.duration_since(*at).as_secs_f64();
                if dt < 0.5 {
                    return *rate; // too soon: keep the last figure
                }
                used.saturating_sub(*prev) as f64 / dt
            }
            None => 0.0,
        };
        m.insert(mac, (now, used, rate));
        rate
    }
}

fn boottime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes into our timespec only.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn channel_row(gw: &Gateway, c: &ChannelRecord) -> ChannelRow {
    ChannelRow {
        id: c.id,
        mac: c.mac.to_string(),
        state: c.state,
        capacity_sat: c.funding.map(|f| f.capacity.to_sat()),
        paid_sat: c.paid_total.to_sat(),
        credited_bytes: c.credited.0,
        payments: c.payments,
        expiry: c.expiry.to_consensus_u32(),
        close_reason: c.close_reason,
        close_txid: c.settlement_id.and_then(|s| gw.store().settlement(s).ok().flatten()).map(|s| s.txid.to_string()),
    }
}

/// `bitmesh clients`: the store's channels and the kernel's counters, through
/// [`clients::client_rows`], with the rate sampled for metered clients.
fn client_list(gw: &Gateway, rates: &RateSampler) -> Result<Vec<ClientRow>, GatewayError> {
    let metered = gw.metered_clients()?;
    let store = gw.store();
    let channels = store.channels()?;
    let ips: HashMap<Mac, String> =
        store.client_bindings().unwrap_or_default().into_iter().map(|b| (b.mac, b.ip.to_string())).collect();
    let mut closes = HashMap::new();
    let settled = channels.iter().filter(|c| matches!(c.state, ChannelStage::Closing | ChannelStage::Closed));
    for id in settled.filter_map(|c| c.settlement_id) {
        if closes.contains_key(&id) {
            continue;
        }
        if let Some(s) = store.settlement(id)? {
            closes.insert(id, clients::CloseInfo { txid: s.txid.to_string(), broadcast_at: s.created_at });
        }
    }
    let now = clients::Now { unix: unix_now(), boot_ns: boottime_ns() };
    let mut rows = clients::client_rows(&channels, &metered, &ips, &closes, now);
    // The rail of each device (docs/design.md section 5.7): a Lightning-only device
    // is metered without a channel, so its state says `lightning`, not `unpaid`.
    let lightning: std::collections::HashSet<Mac> =
        store.ln_live_accounts()?.into_iter().filter_map(|a| a.mac).collect();
    let ln_paid: HashMap<Mac, u64> = store.ln_paid_msat_by_mac()?.into_iter().collect();
    for r in rows.iter_mut() {
        let Ok(mac) = r.mac.parse::<Mac>() else { continue };
        // PAID counts both rails: the channel's signed total and the Lightning receipts.
        r.paid_sat += ln_paid.get(&mac).copied().unwrap_or(0) / 1000;
        let ln = lightning.contains(&mac);
        let ch = r.state == ClientState::Open;
        r.rail = match (ch, ln) {
            (true, true) => Some("channel+lightning".into()),
            (true, false) => Some("channel".into()),
            (false, true) => Some("lightning".into()),
            (false, false) => None,
        };
        if ln && r.state == ClientState::Unpaid {
            r.state = ClientState::Lightning;
        }
    }
    for r in rows.iter_mut().filter(|r| r.metered) {
        if let Ok(mac) = r.mac.parse::<Mac>() {
            r.rate_bps = rates.sample(mac, r.up_bytes.saturating_add(r.down_bytes));
        }
    }
    Ok(rows)
}

/// Answer one request.
pub async fn handle(gw: &Gateway, rates: &RateSampler, req: AdminRequest) -> AdminResponse {
    let err = |e: &dyn std::fmt::Display| AdminResponse::Error { message: e.to_string() };
    match req {
        AdminRequest::Clients => match client_list(gw, rates) {
            Ok(clients) => AdminResponse::Clients { clients, price: PriceSetting::of(gw).ok() },
            Err(e) => err(&e),
        },
        AdminRequest::Channels => match gw.store().channels() {
            Ok(cs) => AdminResponse::Channels { channels: cs.iter().map(|c| channel_row(gw, c)).collect() },
            Err(e) => err(&e),
        },
        AdminRequest::Earnings => match gw.store().earnings() {
            Ok(earnings) => AdminResponse::Earnings { earnings },
            Err(e) => err(&e),
        },
        AdminRequest::Settle { channel } => match gw.settle_now(channel.map(|c| vec![c])).await {
            Ok(r) => AdminResponse::Settled { closed: r.closed, txids: r.broadcast.iter().map(|t| t.to_string()).collect() },
            Err(e) => err(&e),
        },
        req @ (AdminRequest::Lightning
        | AdminRequest::LightningOpenChannel { .. }
        | AdminRequest::LightningConnect { .. }
        | AdminRequest::LightningWithdraw { .. }
        | AdminRequest::LightningExportSeed) => lightning(gw, req).await,
        AdminRequest::Price { set_msat_per_mib, reset } => {
            if reset {
                if let Err(e) = gw.reset_price() {
                    return err(&e);
                }
            }
            if let Some(v) = set_msat_per_mib {
                let price = match PriceMsatPerMib::new(v) {
                    Ok(p) => p,
                    Err(e) => return err(&e),
                };
                if let Err(e) = gw.set_price(price) {
                    return err(&e);
                }
            }
            match PriceSetting::of(gw) {
                Ok(p) => AdminResponse::Price(p),
                Err(e) => err(&e),
            }
        }
    }
}

/// The Lightning commands: each runs the node call on a blocking thread.
async fn lightning(gw: &Gateway, req: AdminRequest) -> AdminResponse {
    use crate::lightning::operator as op;
    let err = |e: &dyn std::fmt::Display| AdminResponse::Error { message: e.to_string() };
    let Some(node) = gw.lightning().and_then(|r| r.node.clone()) else {
        return err(&"the controller runs no Lightning node: start `bitmesh run` with --lightning");
    };
    let store = gw.store().clone();
    let network = gw.policy().network;
    let seed_path = crate::lightning::seed_path(store.path().parent().unwrap_or(std::path::Path::new(".")));
    let joined = tokio::task::spawn_blocking(move || -> Result<AdminResponse, crate::lightning::LightningError> {
        use crate::lightning::LightningError as E;
        Ok(match req {
            AdminRequest::Lightning => AdminResponse::Lightning { info: op::info(&node, &store)? },
            AdminRequest::LightningOpenChannel { target, sat } => {
                AdminResponse::LightningDone { message: format!("channel {} opening", op::open_channel(&node, &target, sat)?) }
            }
            AdminRequest::LightningConnect { target } => {
                op::connect(&node, &target)?;
                AdminResponse::LightningDone { message: format!("connected to {target}") }
            }
            AdminRequest::LightningWithdraw { address, sat, invoice } => match (address, invoice) {
                (Some(a), None) => AdminResponse::LightningDone { message: format!("sent: txid {}", op::withdraw_onchain(&node, network, &a, sat)?) },
                (None, Some(i)) => AdminResponse::LightningDone { message: format!("paid: payment {}", op::withdraw_invoice(&node, &i)?) },
                _ => return Err(E::Node("give exactly one of --address or --invoice".into())),
            },
            AdminRequest::LightningExportSeed => {
                let seed = std::fs::read(&seed_path).map_err(|e| E::Node(format!("cannot read {}: {e}", seed_path.display())))?;
                AdminResponse::LightningSeed { seed_hex: bitcoin::hex::DisplayHex::to_lower_hex_string(&seed[..]) }
            }
            _ => return Err(E::Node("not a Lightning command".into())),
        })
    })
    .await;
    match joined {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => err(&e),
        Err(e) => err(&e),
    }
}

/// Bind the admin socket with mode 0600 (root only) and serve it forever.
pub async fn serve(gw: Arc<Gateway>, path: &Path) -> Result<(), AdminError> {
    serve_on(gw, bind(path)?).await
}

/// Create the admin socket at `path` (mode 0600, replacing a stale one). Separate
/// from [`serve_on`] so the controller can report ready only once it exists.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let bind = |source| AdminError::Bind { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind)?;
    }
    let _ = std::fs::remove_file(path); // a stale socket from a killed controller
    // Create the socket under a restrictive umask so it is never briefly world-accessible.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(bind)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind)?;
    Ok(listener)
}

/// Answer operator requests on `listener` until it fails.
pub async fn serve_on(gw: Arc<Gateway>, listener: UnixListener) -> Result<(), AdminError> {
    let rates = Arc::new(RateSampler::default());
    loop {
        let (stream, _) = listener.accept().await?;
        let (gw, rates) = (gw.clone(), rates.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_one(&gw, &rates, stream).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

async fn serve_one(gw: &Gateway, rates: &RateSampler, stream: UnixStream) -> Result<(), AdminError> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let resp = match serde_json::from_str::<AdminRequest>(&line) {
            Ok(req) => handle(gw, rates, req).await,
            Err(e) => AdminResponse::Error { message: format!("bad request: {e}") },
        };
        let mut out = serde_json::to_vec(&resp)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

/// CLI side: send one request and read the answer.
pub async fn request(path: &Path, req: &AdminRequest) -> Result<AdminResponse, AdminError> {
    let stream = UnixStream::connect(path).await.map_err(|source| AdminError::Connect { path: path.to_owned(), source })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut lines = BufReader::new(r).lines();
    let answer = lines.next_line().await?.ok_or_else(|| AdminError::Refused("connection closed".into()))?;
    match serde_json::from_str(&answer)? {
        AdminResponse::Error { message } => Err(AdminError::Refused(message)),
        ok => Ok(ok),
    }
}
