//! One `bitmesh pay` session: terms, open, fund, pay as you go, close.
//!
//! Effects at the edges: the gateway through [`GatewayApi`], the disk through
//! [`StateDir`], the own byte count through a [`ByteMeter`], the user through
//! [`Ui`]. Decisions are the pure [`policy`](super::policy) and
//! [`terms`](super::terms) functions. Every update is saved (fsynced) before it is
//! sent, so the state file always holds the highest total ever handed out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bitcoin::secp256k1::{rand, SecretKey};
use bitcoin::{Amount, FeeRate, Network, PublicKey, ScriptBuf, Transaction, Txid};
use bitmesh_common::pricing::{bytes_for_payment, ByteCount};
use bitmesh_common::wire::{ClientEvent, ErrorCode, FundRequest, OpenRequest, OpenResponse, PaymentUpdate};

use super::funding::{bip21_uri, qr_text, FundingError, FundingSource};
use super::http::{GatewayApi, HttpError};
use super::meter::{ByteMeter, ByteMeterError};
use super::policy::{next_payment, Hold, Next, PolicyLimits, PolicyState};
use super::state::{SavedChannel, FundingRecord, Phase, SignedState, StateDir, StateError, STATE_VERSION};
use super::terms::{check_terms, describe, TermsError, UserLimits};
use super::tip::{check_tip, SeenTip, TipError, TipEvidence, TipLog};
use bitmesh_channel::chain::{Chain, ChainError};
use bitmesh_channel::{build_refund, sign_update, ChannelError};

/// How the channel gets funded.
pub enum FundingMode {
    /// Build and sign from the user's keys and UTXOs; submit through the gateway.
    FromFile(FundingSource),
    /// Show a BIP21 URI and QR code. With a `chain`, the agent watches it for the
    /// payment by itself; without (or when the backend cannot look outputs up by
    /// script), the user pastes the transaction once a wallet paid it.
    Bip21 {
        /// Optional chain backend to find the payment (or fetch a pasted txid).
        chain: Option<Box<dyn Chain>>,
    },
}

/// Everything a session needs to know.
pub struct PayConfig {
    /// The gateway's base URL.
    pub gateway: String,
    /// Where channel state lives.
    pub state: StateDir,
    /// The user's limits.
    pub limits: UserLimits,
    /// Funding.
    pub funding: FundingMode,
    /// Where the client's change and refund go (`None`: the funding file's change).
    pub refund_script: Option<ScriptBuf>,
    /// Fee rate of the funding and the pre-signed refund.
    pub fee_rate: FeeRate,
    /// Skip the confirmation prompt.
    pub yes: bool,
    /// How often to poll the gateway when no event arrives.
    pub poll: Duration,
    /// Set to end the session (Ctrl-C); the gateway is then asked to close.
    pub stop: Arc<AtomicBool>,
    /// End the session by itself once the spending cap is reached and the budget
    /// is used up.
    pub exit_when_spent: bool,
    /// Ask the gateway to close on exit (else the channel stays open, to resume).
    pub close_on_exit: bool,
    /// The agent's own chain backend, to check the gateway's tip against (with
    /// BIP21 funding, the funding mode's backend is used when this is `None`).
    pub tip_chain: Option<Box<dyn Chain>>,
}

impl PayConfig {
    /// The agent's own chain backend, if it has one.
    fn own_chain(&self) -> Option<&dyn Chain> {
        match (&self.tip_chain, &self.funding) {
            (Some(c), _) => Some(c.as_ref()),
            (None, FundingMode::Bip21 { chain: Some(c) }) => Some(c.as_ref()),
            _ => None,
        }
    }
}

/// One line of live status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Total signed.
    pub paid: Amount,
    /// Bytes credited for it.
    pub credited: ByteCount,
    /// Bytes the gateway says were used.
    pub gateway_used: ByteCount,
    /// Bytes the agent counted.
    pub received: ByteCount,
    /// Bytes per second over the last interval (own count).
    pub rate_bytes_per_sec: u64,
    /// Why the agent is not paying, if it is holding back for a reason other than
    /// being ahead.
    pub hold: Option<Hold>,
}

/// What the session tells the user (the CLI prints; tests record).
pub trait Ui {
    /// Show the terms; when `ask`, ask the user and return the answer, else true.
    fn confirm_terms(&mut self, lines: &[String], ask: bool) -> bool;
    /// Show the BIP21 URI and QR code to pay.
    fn show_funding_request(&mut self, uri: &str, qr: Option<&str>);
    /// The funding transaction (hex) or txid the user pastes; `None` to give up.
    fn read_funding(&mut self) -> Option<String>;
    /// Live status.
    fn status(&mut self, status: &Status);
    /// A one-off message.
    fn note(&mut self, message: &str);
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The channel's state file.
    pub record: SavedChannel,
    /// The close transaction, if the gateway broadcast one.
    pub close_txid: Option<Txid>,
}

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Terms refused.
    #[error(transparent)]
    Terms(#[from] TermsError),
    /// The user said no.
    #[error("you declined the terms; nothing was paid")]
    Declined,
    /// Gateway request failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// State file trouble.
    #[error(transparent)]
    State(#[from] StateError),
    /// Funding failed.
    #[error(transparent)]
    Funding(#[from] FundingError),
    /// Own meter failed.
    #[error(transparent)]
    Meter(#[from] ByteMeterError),
    /// Signing failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// Chain lookup failed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The gateway's chain tip is not believable (it sets the refund lock).
    #[error(transparent)]
    Tip(#[from] TipError),
    /// The open answer states terms other than the ones the user confirmed.
    #[error("the gateway's open answer changes the confirmed terms ({term}: confirmed {confirmed}, now {offered}): nothing was funded; this gateway is broken or hostile")]
    TermsChanged {
        /// Which term.
        term: &'static str,
        /// What the user confirmed.
        confirmed: String,
        /// What the open answer says.
        offered: String,
    },
    /// The gateway's open answer does not match what the agent rebuilt.
    #[error("the gateway's channel script does not match the one rebuilt from its key, our key and the expiry ({0}): do not fund it; this gateway is broken or hostile")]
    ScriptMismatch(&'static str),
    /// No refund address.
    #[error("no address for your change and refund: pass --refund-address (or --fund-from, whose change address is used)")]
    NoRefundAddress,
    /// The pasted funding does not pay the channel.
    #[error("that transaction does not pay the channel address {0}: paste the transaction that does")]
    FundingDoesNotPay(String),
    /// The user gave up waiting for funding.
    #[error("no funding given; channel {0} is saved and can be resumed with bitmesh pay")]
    NoFunding(String),
}

/// Run a session (resuming the newest open channel with this gateway, if any).
pub fn run(cfg: PayConfig, meter: &mut dyn ByteMeter, ui: &mut dyn Ui) -> Result<Summary, SessionError> {
    let api = GatewayApi::new(&cfg.gateway);
    let mut record = match cfg.state.resumable(api.base())? {
        Some(r) => {
            ui.note(&format!("resuming channel {} (paid {} sat)", r.channel_id, r.paid().to_sat()));
            r
        }
        None => open_channel(&cfg, &api, ui)?,
    };
    if record.phase == Phase::AwaitingFunding {
        fund_channel(&cfg, &api, &mut record, ui)?;
    }
    pay_loop(&cfg, &api, &mut record, meter, ui)?;
    if !cfg.close_on_exit {
        ui.note(&format!("channel {} left open: run bitmesh pay again to resume it", record.channel_id));
        return Ok(Summary { record, close_txid: None });
    }

    ui.note("asking the gateway to close the channel");
    let close = api.close(&record.channel_id, &record.client_secret);
    let close_txid = match close {
        Ok(c) => c.close_txid,
        Err(e) => {
            ui.note(&format!("close request failed ({e}); the gateway closes by itself before expiry, else run bitmesh refund after height {}", record.expiry));
            None
        }
    };
    record.phase = Phase::CloseRequested;
    record.close_txid = close_txid;
    cfg.state.save(&record)?;
    Ok(Summary { record, close_txid })
}

fn open_channel(cfg: &PayConfig, api: &GatewayApi, ui: &mut dyn Ui) -> Result<SavedChannel, SessionError> {
    let terms = api.terms()?;
    let accepted = check_terms(&terms, &cfg.limits)?;
    let tips = TipLog::new(cfg.state.path());
    let evidence = TipEvidence {
        network: terms.network,
        own: match cfg.own_chain() {
            Some(chain) => Some((chain.tip_height()?, chain.backend())),
            None => None,
        },
        last: tips.last(terms.network),
        now_unix: unix_now(),
    };
    check_tip(terms.tip_height, &evidence)?;
    if !ui.confirm_terms(&describe(&terms, &accepted), !cfg.yes) {
        return Err(SessionError::Declined);
    }
    let refund_script = match (&cfg.refund_script, &cfg.funding) {
        (Some(s), _) => s.clone(),
        (None, FundingMode::FromFile(src)) => src.change_script(terms.network)?,
        (None, FundingMode::Bip21 { .. }) => return Err(SessionError::NoRefundAddress),
    };
    let client_secret = SecretKey::new(&mut rand::thread_rng());
    let client_pubkey = PublicKey::new(client_secret.public_key(bitmesh_channel::secp()));
    let req = OpenRequest { client_pubkey, expiry: accepted.expiry, client_change_script: refund_script.clone() };
    let resp = api.open(&req)?;
    check_open_response(&req, &resp, terms.network)?;
    check_open_terms(&terms, &resp)?;
    // Remembered only once the open went through: rule 2 of `tip` compares the next
    // gateway with it.
    if let Err(e) = tips.record(terms.network, SeenTip { height: terms.tip_height.to_consensus_u32(), at_unix: evidence.now_unix }) {
        ui.note(&format!("could not remember the chain tip in {}: {e}", cfg.state.path().display()));
    }
    let record = SavedChannel {
        version: STATE_VERSION,
        gateway: api.base().to_owned(),
        network: terms.network,
        client_secret,
        channel_id: resp.channel_id,
        gateway_pubkey: resp.gateway_pubkey,
        client_pubkey,
        expiry: accepted.expiry,
        client_change_script: refund_script.clone(),
        refund_script,
        price: terms.price_msat_per_mib,
        chunk: accepted.chunk,
        min_first_payment: terms.min_first_payment,
        close_margin_blocks: terms.limits.close_margin_blocks,
        max_spend: accepted.max_spend,
        planned_capacity: accepted.capacity,
        funding: None,
        latest: None,
        refund_tx: None,
        received: ByteCount::ZERO,
        phase: Phase::AwaitingFunding,
        close_txid: None,
    };
    // The key must be on disk before any money goes to the script.
    cfg.state.save(&record)?;
    ui.note(&format!("opened channel {} (state {})", record.channel_id, cfg.state.file(&record.channel_id).display()));
    Ok(record)
}

/// docs/design.md section 4, client rules: check the script, gateway key and expiry before
/// funding. Everything is rebuilt from the three values; nothing the gateway sends
/// is trusted. The check is the channel library's [`bitmesh_channel::check_offer`], against the
/// request's own key and expiry and the confirmed terms' network.
pub fn check_open_response(req: &OpenRequest, resp: &OpenResponse, network: Network) -> Result<(), SessionError> {
    match bitmesh_channel::check_offer(resp, &req.client_pubkey, req.expiry, network) {
        Ok(_) => Ok(()),
        Err(ChannelError::OfferMismatch { what }) => Err(SessionError::ScriptMismatch(what)),
        Err(e) => Err(e.into()),
    }
}

/// The terms an open answer repeats must be the ones the user confirmed: a
/// gateway that raises its first payment (or moves the capacity range) between the
/// terms and the open would otherwise be paid what the user never saw.
pub fn check_open_terms(terms: &bitmesh_common::wire::Terms, resp: &OpenResponse) -> Result<(), SessionError> {
    let rows = [
        ("first payment", terms.min_first_payment, resp.min_first_payment),
        ("minimum capacity", terms.limits.min_capacity, resp.min_capacity),
        ("maximum capacity", terms.limits.max_capacity, resp.max_capacity),
    ];
    for (term, confirmed, offered) in rows {
        if confirmed != offered {
            return Err(SessionError::TermsChanged { term, confirmed: confirmed.to_string(), offered: offered.to_string() });
        }
    }
    Ok(())
}

/// Now, in Unix seconds (0 for a clock before 1970, which only makes the tip check
/// stricter).
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn fund_channel(
    cfg: &PayConfig,
    api: &GatewayApi,
    record: &mut SavedChannel,
    ui: &mut dyn Ui,
) -> Result<(), SessionError> {
    let spk = record.script().script_pubkey();
    if record.funding.is_none() {
        let (tx, vout) = match &cfg.funding {
            FundingMode::FromFile(src) => {
                let built = src.build(record.network, &spk, record.planned_capacity, cfg.fee_rate)?;
                ui.note(&format!(
                    "funding {} sat from your UTXOs (fee {} sat), txid {}",
                    record.planned_capacity.to_sat(),
                    built.fee.to_sat(),
                    built.tx.compute_txid()
                ));
                (built.tx, built.vout)
            }
            FundingMode::Bip21 { chain } => wait_for_wallet(record, chain.as_deref(), cfg, ui)?,
        };
        set_funding(cfg, record, tx, vout)?;
    }
    let Some(funding) = record.funding.clone() else { return Ok(()) };
    let req = FundRequest { channel_id: record.channel_id, funding_tx: funding.tx, funding_vout: funding.outpoint.vout };
    // Above the zero-conf cap the gateway waits for confirmations: ask again.
    let mut said = false;
    loop {
        match api.fund(&req) {
            Ok(_) => break,
            Err(e) if e.code() == Some(ErrorCode::FundingUnconfirmed) && !cfg.stop.load(Ordering::Relaxed) => {
                if !said {
                    ui.note("funding sent; waiting for the confirmations the gateway requires");
                    said = true;
                }
                std::thread::sleep(cfg.poll.max(Duration::from_millis(200)));
            }
            // Busy gateway: wait as asked, then send the same funding again.
            Err(e) if e.code() == Some(ErrorCode::RateLimited) && !cfg.stop.load(Ordering::Relaxed) => {
                nap(&cfg.stop, e.retry_after().unwrap_or(cfg.poll).max(cfg.poll));
            }
            Err(e) => return Err(e.into()),
        }
    }
    record.phase = Phase::Open;
    cfg.state.save(record)?;
    ui.note(&format!("channel funded: {}", funding.outpoint));
    Ok(())
}

/// Record the funding and the pre-signed refund BEFORE the funding is submitted.
fn set_funding(cfg: &PayConfig, record: &mut SavedChannel, tx: Transaction, vout: u32) -> Result<(), SessionError> {
    let spk = record.script().script_pubkey();
    let out = tx
        .output
        .get(vout as usize)
        .filter(|o| o.script_pubkey == spk)
        .ok_or_else(|| SessionError::FundingDoesNotPay(record.script().address(record.network).to_string()))?;
    record.funding = Some(FundingRecord {
        outpoint: bitcoin::OutPoint { txid: tx.compute_txid(), vout },
        capacity: out.value,
        tx: tx.clone(),
    });
    if let Some(channel) = record.channel() {
        record.refund_tx = Some(build_refund(&channel, &record.client_secret, &record.refund_script, cfg.fee_rate)?);
    }
    cfg.state.save(record)?;
    Ok(())
}

fn wait_for_wallet(
    record: &SavedChannel,
    chain: Option<&dyn Chain>,
    cfg: &PayConfig,
    ui: &mut dyn Ui,
) -> Result<(Transaction, u32), SessionError> {
    let address = record.script().address(record.network);
    let uri = bip21_uri(&address, record.planned_capacity);
    ui.show_funding_request(&uri, qr_text(&uri).as_deref());
    let spk = address.script_pubkey();
    if let Some(chain) = chain {
        if let Some(found) = watch_chain(record, chain, &spk, cfg, ui)? {
            return Ok(found);
        }
    }
    ui.note("then paste the funding transaction (raw hex, or its txid with a chain backend) and press Enter:");
    loop {
        let Some(line) = ui.read_funding() else {
            return Err(SessionError::NoFunding(record.channel_id.to_string()));
        };
        let line = line.trim();
        let tx = if let Ok(tx) = bitcoin::consensus::encode::deserialize_hex::<Transaction>(line) {
            Some(tx)
        } else if let (Ok(txid), Some(chain)) = (line.parse::<Txid>(), chain) {
            chain.transaction(&txid)?.map(|s| s.tx)
        } else {
            None
        };
        match tx.and_then(|tx| tx.output.iter().position(|o| o.script_pubkey == spk).map(|v| (tx, v as u32))) {
            Some(found) => return Ok(found),
            None => ui.note(&format!(
                "not a transaction paying {address}: paste its raw hex{}",
                if chain.is_some() { " or txid" } else { " (or pass a chain backend to paste a txid)" }
            )),
        }
    }
}

/// Shortest pause between two chain look-ups while waiting for a wallet (a
/// `scantxoutset` walks the whole UTXO set).
const CHAIN_POLL_MIN: Duration = Duration::from_secs(2);

/// Watch `chain` for an output paying the channel script: the wallet's payment,
/// found without the user pasting anything. `None` when the backend cannot look
/// outputs up by script (then the user pastes), an error when the user stops.
fn watch_chain(
    record: &SavedChannel,
    chain: &dyn Chain,
    spk: &ScriptBuf,
    cfg: &PayConfig,
    ui: &mut dyn Ui,
) -> Result<Option<(Transaction, u32)>, SessionError> {
    ui.note(&format!(
        "waiting for the payment to appear on {} (Ctrl-C to stop; bitcoind sees it once confirmed)",
        chain.backend()
    ));
    let mut notes = Notes::default();
    while !cfg.stop.load(Ordering::Relaxed) {
        match chain.outputs_paying(spk) {
            Ok(utxos) => {
                // Several payments (a wallet that paid twice): fund with the largest;
                // the others stay refundable with the same key after expiry.
                if let Some(u) = utxos.iter().max_by_key(|u| u.value) {
                    match chain.transaction(&u.outpoint.txid)? {
                        Some(st) => {
                            ui.note(&format!("payment seen: {} ({} sat)", u.outpoint, u.value.to_sat()));
                            return Ok(Some((st.tx, u.outpoint.vout)));
                        }
                        None => notes.say(
                            ui,
                            format!(
                                "payment {} seen, but {} cannot return its transaction (bitcoind needs -txindex=1): paste it instead",
                                u.outpoint,
                                chain.backend()
                            ),
                        ),
                    }
                }
            }
            Err(ChainError::Unsupported { .. }) => return Ok(None),
            // A flaky backend: say so once, keep watching.
            Err(e) => notes.say(ui, format!("looking for the payment: {e}")),
        }
        nap(&cfg.stop, cfg.poll.max(CHAIN_POLL_MIN));
    }
    Err(SessionError::NoFunding(record.channel_id.to_string()))
}

/// The gateway's view, refreshed by events and polls.
#[derive(Debug, Default, Clone, Copy)]
struct GatewayView {
    used: ByteCount,
    closed: bool,
}

/// Longest wait between two attempts to re-open a dropped event stream. Polls go on
/// meanwhile, so a longer wait only delays pushes, never payments.
const MAX_STREAM_BACKOFF: Duration = Duration::from_secs(30);

/// The gateway's event stream, read on a thread and re-opened when it drops (the
/// controller restarted, the WiFi blinked). A dropped stream never makes the loop
/// spin: every [`EventFeed::wait`] takes an event or about `poll` of wall time.
struct EventFeed {
    api: GatewayApi,
    id: bitmesh_common::wire::ChannelId,
    key: SecretKey,
    rx: Option<mpsc::Receiver<ClientEvent>>,
    opened_at: Instant,
    reopen_at: Instant,
    backoff: Duration,
    poll: Duration,
}

impl EventFeed {
    fn new(api: &GatewayApi, record: &SavedChannel, poll: Duration) -> EventFeed {
        let now = Instant::now();
        EventFeed {
            api: api.clone(),
            id: record.channel_id,
            key: record.client_secret,
            rx: None,
            opened_at: now,
            reopen_at: now,
            backoff: poll,
            poll,
        }
    }

    /// The next push, or `None` after about one poll interval without one.
    fn wait(&mut self, stop: &AtomicBool) -> Option<ClientEvent> {
        if self.rx.is_none() && Instant::now() >= self.reopen_at {
            self.rx = Some(spawn_events(self.api.clone(), self.id, self.key));
            self.opened_at = Instant::now();
        }
        let Some(rx) = &self.rx else {
            nap(stop, self.poll);
            return None;
        };
        match rx.recv_timeout(self.poll) {
            Ok(ev) => {
                // A stream that delivers is healthy: the next drop retries quickly.
                self.backoff = self.poll;
                Some(ev)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The stream ended (or never opened). recv_timeout now returns at
                // once on every call, so wait here, and re-open with backoff: a
                // gateway that is down or refusing must not be asked 5 times a second.
                self.rx = None;
                if self.opened_at.elapsed() > MAX_STREAM_BACKOFF {
                    self.backoff = self.poll;
                }
                self.reopen_at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_STREAM_BACKOFF).max(self.poll);
                nap(stop, self.poll);
                None
            }
        }
    }
}

/// Sleep `d`, waking early when `stop` is set (Ctrl-C must not wait out a
/// Retry-After).
fn nap(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Notes about failed requests, printed once per distinct message: a gateway that
/// is down for a minute must not print sixty identical lines.
#[derive(Default)]
struct Notes {
    last: Option<String>,
}

impl Notes {
    fn say(&mut self, ui: &mut dyn Ui, message: String) {
        if self.last.as_deref() != Some(message.as_str()) {
            ui.note(&message);
            self.last = Some(message);
        }
    }

    fn clear(&mut self) {
        self.last = None;
    }
}

/// What to do after a refused or failed request.
enum Failure {
    /// The channel takes no more payments: leave the loop.
    Over,
    /// Try again later (at the next poll, or after the gateway's Retry-After).
    Later,
}

/// Classify a request failure; `rate_limited` answers start a quiet period.
fn on_failure(e: &HttpError, quiet_until: &mut Option<Instant>, poll: Duration) -> Failure {
    match e.code() {
        Some(ErrorCode::ChannelExpired | ErrorCode::ChannelNotOpen | ErrorCode::FundingDoubleSpent) => Failure::Over,
        Some(ErrorCode::RateLimited) => {
            // Honour Retry-After (capped in http.rs); without one, wait a poll at least.
            let wait = e.retry_after().unwrap_or(poll).max(poll);
            *quiet_until = Some(Instant::now() + wait);
            Failure::Later
        }
        _ => Failure::Later,
    }
}

fn pay_loop(
    cfg: &PayConfig,
    api: &GatewayApi,
    record: &mut SavedChannel,
    meter: &mut dyn ByteMeter,
    ui: &mut dyn Ui,
) -> Result<(), SessionError> {
    let Some(channel) = record.channel() else { return Ok(()) };
    let limits = PolicyLimits {
        price: record.price,
        chunk: record.chunk,
        low_water: ByteCount(record.chunk.to_u64() / 2),
        capacity: channel.capacity,
        max_spend: record.max_spend,
        min_first_payment: record.min_first_payment,
        change_dust: record.client_change_script.minimal_non_dust(),
    };
    let mut events = EventFeed::new(api, record, cfg.poll);
    // Counted before this run (state file) + counted by this run's meter.
    let carried = record.received;
    let mut view = GatewayView::default();
    // When `view` was last refreshed (long ago: the first pass asks at once).
    let mut view_at = Instant::now().checked_sub(cfg.poll).unwrap_or_else(Instant::now);
    let mut last_rate = (Instant::now(), carried);
    let mut rate = 0u64;
    let mut last_save = Instant::now();
    let mut notes = Notes::default();
    // Set by a `rate_limited` answer: no request to the gateway before then.
    let mut quiet_until: Option<Instant> = None;

    let mut first = true;
    while !cfg.stop.load(Ordering::Relaxed) {
        // Wait for a push or the poll interval (not on the first round: pay at once).
        let event = if first { None } else { events.wait(&cfg.stop) };
        first = false;
        if let Some(until) = quiet_until {
            let now = Instant::now();
            if now < until {
                nap(&cfg.stop, until - now);
                continue;
            }
            quiet_until = None;
        }
        match event {
            Some(ClientEvent::Usage(u)) | Some(ClientEvent::LowWater(u)) => view.used = u.used_bytes,
            Some(ClientEvent::Closed { .. }) => view.closed = true,
            None => {}
        }
        if view.closed {
            ui.note("the gateway closed the channel");
            break;
        }
        // A push, or an acknowledgement less than a poll interval old, already says
        // how much the gateway counted: no status request then (at link speed the
        // acks come several times a second, and every request counts against the
        // gateway's per-client rate limit).
        if event.is_some() {
            view_at = Instant::now();
        }
        let mut fresh = view_at.elapsed() < cfg.poll;

        // An update saved but not acknowledged (the gateway was unreachable or busy,
        // or the agent crashed between saving and the answer) goes out again, the
        // same total and signature, before anything new is signed: the gateway
        // answers a duplicate from its journal and credits nothing twice. Without
        // this, the agent would count that total as paid and wait for a low-water
        // mark the gateway can never reach. It goes before the status poll: its
        // answer carries the usage too, and under a rate limit the payment is the
        // request that matters.
        if let Some(latest) = record.latest.clone().filter(|l| !l.acked) {
            match deliver(cfg, api, record, &latest, &mut view, &mut view_at, &mut notes)? {
                Delivery::Acked => fresh = true,
                // The gateway already holds this total (or more): nothing to re-send.
                Delivery::Refused(e) if e.code() == Some(ErrorCode::AmountNotIncreasing) => {
                    mark_acked(record);
                    cfg.state.save(record)?;
                }
                Delivery::Refused(e) => {
                    let message = format!("payment of {} sat not yet accepted, will re-send: {e}", latest.total_paid.to_sat());
                    match refused(ui, &mut notes, message, &e, &mut quiet_until, cfg.poll) {
                        Failure::Over => break,
                        Failure::Later => continue,
                    }
                }
            }
        }
        if !fresh {
            match api.status(&record.channel_id, &record.client_secret) {
                Ok(s) => {
                    view.used = s.used_bytes;
                    view_at = Instant::now();
                    // Reachable again: the next outage is reported again.
                    notes.clear();
                    view.closed = !matches!(s.state, bitmesh_common::wire::ChannelState::Open | bitmesh_common::wire::ChannelState::AwaitingFunding);
                }
                Err(e) => {
                    notes.say(ui, format!("status: {e}"));
                    let _ = on_failure(&e, &mut quiet_until, cfg.poll);
                    continue;
                }
            }
            if view.closed {
                ui.note("the gateway closed the channel");
                break;
            }
        }

        let received = carried.saturating_add(meter.bytes()?);
        record.received = received;
        let state = PolicyState { paid: record.paid(), received, gateway_used: view.used };
        let mut hold = None;
        match next_payment(&limits, &state) {
            Next::Sign { total, limited } => {
                hold = limited;
                let signature = sign_update(&channel, total, &record.client_secret)?;
                let latest = SignedState { total_paid: total, signature, acked: false };
                record.latest = Some(latest.clone());
                // Durable BEFORE it leaves the machine.
                cfg.state.save(record)?;
                last_save = Instant::now();
                if let Delivery::Refused(e) = deliver(cfg, api, record, &latest, &mut view, &mut view_at, &mut notes)? {
                    // Left unacknowledged: the next pass re-sends it.
                    let message = format!("payment of {} sat not accepted: {e}", total.to_sat());
                    if let Failure::Over = refused(ui, &mut notes, message, &e, &mut quiet_until, cfg.poll) {
                        break;
                    }
                }
            }
            Next::Hold(Hold::Ahead) => {}
            Next::Hold(h) => hold = Some(h),
        }
        let (at, bytes) = last_rate;
        let dt = at.elapsed();
        if dt >= Duration::from_secs(1) {
            rate = ((received.to_u64().saturating_sub(bytes.to_u64())) as f64 / dt.as_secs_f64()) as u64;
            last_rate = (Instant::now(), received);
        }
        ui.status(&Status {
            paid: record.paid(),
            credited: bytes_for_payment(record.paid(), record.price),
            gateway_used: view.used,
            received,
            rate_bytes_per_sec: rate,
            hold,
        });
        if last_save.elapsed() >= Duration::from_secs(5) {
            cfg.state.save(record)?;
            last_save = Instant::now();
        }
        let spent = matches!(hold, Some(Hold::SpendCap | Hold::ChannelFull));
        if cfg.exit_when_spent && spent && bytes_for_payment(record.paid(), record.price) <= view.used {
            ui.note("spending cap reached and its budget used up");
            break;
        }
    }
    cfg.state.save(record)?;
    Ok(())
}

/// What became of an update [`deliver`] sent.
enum Delivery {
    /// The gateway acknowledged it.
    Acked,
    /// Refused or not delivered: it stays saved and unacknowledged, and goes out
    /// again on a later pass.
    Refused(HttpError),
}

/// The one send-and-acknowledge path of [`pay_loop`]: send `latest` (already saved
/// in `record`) and, on the gateway's acknowledgement, take the usage it counted,
/// mark the update acknowledged and save that. A new update and the re-send of an
/// unacknowledged one both go through here.
fn deliver(
    cfg: &PayConfig,
    api: &GatewayApi,
    record: &mut SavedChannel,
    latest: &SignedState,
    view: &mut GatewayView,
    view_at: &mut Instant,
    notes: &mut Notes,
) -> Result<Delivery, SessionError> {
    let update = PaymentUpdate { channel_id: record.channel_id, total_paid: latest.total_paid, signature: latest.signature.clone() };
    match api.pay(&update) {
        Ok(ack) => {
            view.used = ack.used_bytes;
            *view_at = Instant::now();
            mark_acked(record);
            cfg.state.save(record)?;
            notes.clear();
            Ok(Delivery::Acked)
        }
        Err(e) => Ok(Delivery::Refused(e)),
    }
}

/// Report a refused update (once per distinct `message`) and classify the refusal;
/// a channel that takes no more payments is reported too.
fn refused(
    ui: &mut dyn Ui,
    notes: &mut Notes,
    message: String,
    e: &HttpError,
    quiet_until: &mut Option<Instant>,
    poll: Duration,
) -> Failure {
    notes.say(ui, message);
    let failure = on_failure(e, quiet_until, poll);
    if let Failure::Over = failure {
        ui.note(&format!("the gateway takes no more payments: {e}"));
    }
    failure
}

fn mark_acked(record: &mut SavedChannel) {
    if let Some(l) = record.latest.as_mut() {
        l.acked = true;
    }
}

/// Read the gateway's event stream on a thread; the loop polls when it is silent,
/// so a missing or broken stream only makes top-ups slower, never wrong. The
/// receiver disconnects when the stream ends or cannot be opened.
fn spawn_events(api: GatewayApi, id: bitmesh_common::wire::ChannelId, key: SecretKey) -> mpsc::Receiver<ClientEvent> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(mut stream) = api.events(&id, &key) {
            while let Some(ev) = stream.next_event() {
                if tx.send(ev).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitmesh_channel::ChannelScript;
    use bitmesh_common::wire::ChannelLimits;

    fn pair() -> (OpenRequest, OpenResponse) {
        let secp = bitmesh_channel::secp();
        let c = SecretKey::from_slice(&[5; 32]).unwrap();
        let g = SecretKey::from_slice(&[6; 32]).unwrap();
        let client = PublicKey::new(c.public_key(secp));
        let gateway = PublicKey::new(g.public_key(secp));
        let expiry = bitcoin::absolute::Height::from_consensus(700).unwrap();
        let change = ScriptBuf::new_p2wpkh(&client.wpubkey_hash().unwrap());
        let script = ChannelScript { gateway, client, expiry };
        let req = OpenRequest { client_pubkey: client, expiry, client_change_script: change };
        let resp = OpenResponse {
            channel_id: script.channel_id(),
            gateway_pubkey: gateway,
            client_pubkey: client,
            expiry,
            witness_script: script.witness_script(),
            funding_script_pubkey: script.script_pubkey(),
            funding_address: script.address(Network::Regtest).as_unchecked().clone(),
            min_capacity: Amount::from_sat(1),
            max_capacity: Amount::from_sat(1_000_000),
            min_first_payment: Amount::from_sat(1),
        };
        (req, resp)
    }

    #[test]
    fn an_honest_open_response_passes() {
        let (req, resp) = pair();
        check_open_response(&req, &resp, Network::Regtest).unwrap();
    }

    #[test]
    fn open_responses_that_change_a_confirmed_term_are_refused() {
        let (_, good) = pair();
        let terms = bitmesh_common::wire::Terms {
            min_first_payment: good.min_first_payment,
            limits: ChannelLimits {
                min_capacity: good.min_capacity,
                max_capacity: good.max_capacity,
                ..crate::terms::tests::terms().limits
            },
            ..crate::terms::tests::terms()
        };
        check_open_terms(&terms, &good).unwrap();
        let more = Amount::from_sat(50_000);
        #[rustfmt::skip]
        let rows: Vec<(&str, OpenResponse)> = vec![
            ("first payment", OpenResponse { min_first_payment: more, ..good.clone() }),
            ("minimum capacity", OpenResponse { min_capacity: more, ..good.clone() }),
            ("maximum capacity", OpenResponse { max_capacity: more, ..good.clone() }),
        ];
        for (name, resp) in rows {
            assert!(matches!(check_open_terms(&terms, &resp), Err(SessionError::TermsChanged { term, .. }) if term == name), "{name}");
        }
    }

    #[test]
    fn open_responses_that_do_not_match_the_rebuilt_script_are_refused() {
        let (req, good) = pair();
        let other = ChannelScript { gateway: good.client_pubkey, client: good.client_pubkey, expiry: good.expiry };
        let later = bitcoin::absolute::Height::from_consensus(900).unwrap();
        #[rustfmt::skip]
        let rows: Vec<(&str, OpenResponse)> = vec![
            ("script with another key", OpenResponse { witness_script: other.witness_script(), ..good.clone() }),
            ("funding output elsewhere", OpenResponse { funding_script_pubkey: other.script_pubkey(), ..good.clone() }),
            ("address elsewhere", OpenResponse { funding_address: other.address(Network::Regtest).as_unchecked().clone(), ..good.clone() }),
            ("other expiry", OpenResponse { expiry: later, ..good.clone() }),
            ("wrong channel id", OpenResponse { channel_id: other.channel_id(), ..good.clone() }),
        ];
        for (name, resp) in rows {
            assert!(matches!(check_open_response(&req, &resp, Network::Regtest), Err(SessionError::ScriptMismatch(_))), "{name}");
        }
    }
}
