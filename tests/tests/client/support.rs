//! Shared by the client tests: a test gateway serving the controller's real API
//! router (`bitmesh::api::router`) over a scripted [`ClientGateway`] — honest, or
//! hostile (claims more usage than it carried, the adversary the agent's policy
//! defends against) — plus a test byte meter and a recording UI.

// Test code: unwrap is how a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Each test file uses part of it.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitcoin::secp256k1::{rand, SecretKey};
use bitcoin::{absolute, Amount, FeeRate, Network, OutPoint, PrivateKey, PublicKey, ScriptBuf, Txid};
use bitmesh::api::{self, ApiError, ApiLimits, ClientGateway};
use bitmesh_channel::{ChannelError, ChannelScript};
use bitmesh_client::funding::{FundingSource, Utxo};
use bitmesh_client::meter::{ByteMeter, ByteMeterError};
use bitmesh_client::session::{FundingMode, PayConfig, Status, Ui};
use bitmesh_client::state::StateDir;
use bitmesh_client::terms::{UserLimits, DEFAULT_MAX_CHUNK, DEFAULT_MAX_PREPAID};
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::pricing::{bytes_for_payment, ByteCount, PriceMsatPerMib};
use bitmesh_common::wire::*;
use tokio::sync::mpsc;

/// What the test gateway did and claims.
pub struct Book {
    pub terms: Terms,
    /// Claim `credited + over_report` used (hostile) instead of `used`.
    pub hostile: bool,
    pub over_report: ByteCount,
    /// Usage an honest gateway reports.
    pub used: ByteCount,
    pub opens: u32,
    pub totals: Vec<Amount>,
    pub closes: u32,
    pub funded: Option<OutPoint>,
    /// Hostile: the open answer states this first payment instead of the terms'.
    pub open_first_payment: Option<Amount>,
}

impl Book {
    fn paid(&self) -> Amount {
        self.totals.last().copied().unwrap_or(Amount::ZERO)
    }
    fn credited(&self) -> ByteCount {
        bytes_for_payment(self.paid(), self.terms.price_msat_per_mib)
    }
    fn claimed(&self) -> ByteCount {
        if self.hostile {
            self.credited().saturating_add(self.over_report)
        } else {
            self.used
        }
    }
    fn status(&self, id: ChannelId) -> ChannelStatus {
        ChannelStatus {
            channel_id: id,
            state: ChannelState::Open,
            funding_outpoint: self.funded,
            capacity: None,
            expiry: absolute::Height::from_consensus(1000).unwrap(),
            total_paid: self.paid(),
            credited_bytes: self.credited(),
            used_bytes: self.claimed(),
            remaining_bytes: self.credited().saturating_sub(self.claimed()),
            close_txid: None,
        }
    }
}

/// Terms: 1 sat per MiB, 1 MiB chunks, first payment 3 sat.
pub fn terms() -> Terms {
    Terms {
        limits: ChannelLimits {
            min_capacity: Amount::from_sat(10_000),
            max_capacity: Amount::from_sat(1_000_000),
            zero_conf_cap: Amount::from_sat(1_000_000),
            confirmations_required: 1,
            min_expiry_blocks: BlockCount(20),
            max_expiry_blocks: BlockCount(2000),
            close_margin_blocks: BlockCount(6),
            close_fee_rate: FeeRate::from_sat_per_vb_u32(1),
        },
        protocol_version: PROTOCOL_VERSION,
        network: Network::Regtest,
        price_msat_per_mib: PriceMsatPerMib::from_sat_per_mib(1).unwrap(),
        chunk_bytes: ByteCount::from_mib(1),
        min_first_payment: Amount::from_sat(3),
        tip_height: absolute::Height::from_consensus(500).unwrap(),
        lightning: None,
    }
}

struct Scripted(Arc<Mutex<Book>>);

impl Scripted {
    fn book(&self) -> Result<std::sync::MutexGuard<'_, Book>, ApiError> {
        self.0.lock().map_err(|_| ApiError::Internal("poisoned".into()))
    }
}

impl ClientGateway for Scripted {
    type Error = ApiError;

    async fn terms(&self) -> Result<Terms, ApiError> {
        Ok(self.book()?.terms.clone())
    }
    async fn open(&self, _: IpAddr, req: OpenRequest) -> Result<OpenResponse, ApiError> {
        let mut book = self.book()?;
        book.opens += 1;
        let secp = bitcoin::secp256k1::Secp256k1::new();
        let gw = PublicKey::new(SecretKey::new(&mut rand::thread_rng()).public_key(&secp));
        let script = ChannelScript { gateway: gw, client: req.client_pubkey, expiry: req.expiry };
        Ok(OpenResponse {
            channel_id: script.channel_id(),
            gateway_pubkey: gw,
            client_pubkey: req.client_pubkey,
            expiry: req.expiry,
            witness_script: script.witness_script(),
            funding_script_pubkey: script.script_pubkey(),
            funding_address: script.address(Network::Regtest).as_unchecked().clone(),
            min_capacity: book.terms.limits.min_capacity,
            max_capacity: book.terms.limits.max_capacity,
            min_first_payment: book.open_first_payment.unwrap_or(book.terms.min_first_payment),
        })
    }
    async fn fund(&self, _: IpAddr, req: FundRequest) -> Result<ChannelStatus, ApiError> {
        let mut book = self.book()?;
        book.funded = Some(OutPoint { txid: req.funding_tx.compute_txid(), vout: req.funding_vout });
        Ok(book.status(req.channel_id))
    }
    async fn pay(&self, _: IpAddr, u: PaymentUpdate) -> Result<PaymentAck, ApiError> {
        let mut book = self.book()?;
        if u.total_paid <= book.paid() {
            return Err(ChannelError::AmountNotIncreasing { total: u.total_paid, last: book.paid() }.into());
        }
        book.totals.push(u.total_paid);
        Ok(PaymentAck {
            channel_id: u.channel_id,
            total_paid: u.total_paid,
            client_change: Amount::ZERO,
            credited_bytes: book.credited(),
            used_bytes: book.claimed(),
        })
    }
    async fn status(&self, _: IpAddr, req: SignedRequest) -> Result<ChannelStatus, ApiError> {
        Ok(self.book()?.status(req.channel_id))
    }
    async fn close(&self, _: IpAddr, req: CloseRequest) -> Result<CloseResponse, ApiError> {
        let mut book = self.book()?;
        book.closes += 1;
        Ok(CloseResponse {
            channel_id: req.channel_id,
            state: ChannelState::Closing,
            close_txid: None,
            total_paid: book.paid(),
            client_change: Amount::ZERO,
        })
    }
    async fn events(&self, _: IpAddr, _: SignedRequest) -> Result<mpsc::Receiver<ClientEvent>, ApiError> {
        // No pushes: the agent must work from polls alone.
        let (_tx, rx) = mpsc::channel(1);
        Ok(rx)
    }
    async fn captive(&self, _: IpAddr) -> Result<CaptiveStatus, ApiError> {
        Ok(CaptiveStatus { captive: false, user_portal_url: None, venue_info_url: None, bytes_remaining: None, seconds_remaining: None, can_extend_session: None })
    }
    async fn invoice(&self, _: IpAddr, _: InvoiceRequest) -> Result<Invoice, ApiError> {
        Err(bitmesh::gateway::GatewayError::LightningUnavailable.into())
    }
    async fn invoice_status(&self, _: String) -> Result<InvoiceStatus, ApiError> {
        Err(bitmesh::gateway::GatewayError::LightningUnavailable.into())
    }
    async fn restore(&self, _: IpAddr, _: RestoreRequest) -> Result<RestoreResponse, ApiError> {
        Err(bitmesh::gateway::GatewayError::LightningUnavailable.into())
    }
}

/// A test gateway on 127.0.0.1; stops when dropped.
pub struct TestGateway {
    pub url: String,
    pub book: Arc<Mutex<Book>>,
    /// Every HTTP request that reached the server, refused by its rate limit or not.
    pub requests: Arc<AtomicU64>,
    rt: Option<tokio::runtime::Runtime>,
}

/// Counts requests before the router's own rate limit sees them.
async fn count_requests(
    axum::extract::State(n): axum::extract::State<Arc<AtomicU64>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    n.fetch_add(1, Ordering::SeqCst);
    next.run(req).await
}

impl TestGateway {
    pub fn start(hostile: bool) -> TestGateway {
        Self::start_limited(hostile, 1_000_000)
    }

    /// A gateway whose per-IP rate limit is `requests_per_min` (the controller's
    /// default is 600).
    pub fn start_limited(hostile: bool, requests_per_min: u32) -> TestGateway {
        let book = Arc::new(Mutex::new(Book {
            terms: terms(),
            hostile,
            over_report: ByteCount::from_mib(50),
            used: ByteCount::ZERO,
            opens: 0,
            totals: Vec::new(),
            closes: 0,
            funded: None,
            open_first_payment: None,
        }));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let limits = ApiLimits { requests_per_min, ..ApiLimits::default() };
        let requests = Arc::new(AtomicU64::new(0));
        let router = api::router(Arc::new(Scripted(book.clone())), limits)
            .layer(axum::middleware::from_fn_with_state(requests.clone(), count_requests));
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        rt.spawn(async move {
            let _ = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await;
        });
        TestGateway { url, book, requests, rt: Some(rt) }
    }

    pub fn totals(&self) -> Vec<Amount> {
        self.book.lock().unwrap().totals.clone()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// A byte meter the test sets.
#[derive(Clone, Default)]
pub struct TestMeter(pub Arc<AtomicU64>);

impl TestMeter {
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::SeqCst);
    }
}

impl ByteMeter for TestMeter {
    fn bytes(&mut self) -> Result<ByteCount, ByteMeterError> {
        Ok(ByteCount(self.0.load(Ordering::SeqCst)))
    }
}

/// Says yes and remembers what it was told.
#[derive(Default)]
pub struct RecordingUi {
    pub terms_shown: Vec<String>,
    pub notes: Vec<String>,
    pub last: Option<Status>,
}

impl Ui for RecordingUi {
    fn confirm_terms(&mut self, lines: &[String], _ask: bool) -> bool {
        self.terms_shown = lines.to_vec();
        true
    }
    fn show_funding_request(&mut self, _: &str, _: Option<&str>) {}
    fn read_funding(&mut self) -> Option<String> {
        None
    }
    fn status(&mut self, s: &Status) {
        self.last = Some(*s);
    }
    fn note(&mut self, m: &str) {
        self.notes.push(m.to_owned());
    }
}

/// A funding file with one fake P2WPKH UTXO (the test gateway does not check the chain).
pub fn fake_funding() -> FundingSource {
    let key = PrivateKey::new(SecretKey::new(&mut rand::thread_rng()), Network::Regtest);
    let public = bitcoin::CompressedPublicKey::from_private_key(&bitcoin::secp256k1::Secp256k1::new(), &key).unwrap();
    FundingSource {
        keys: vec![key.to_wif()],
        utxos: vec![Utxo {
            outpoint: OutPoint { txid: Txid::from_raw_hash(bitcoin::hashes::Hash::all_zeros()), vout: 7 },
            amount: Amount::from_sat(1_000_000),
            script_pubkey: ScriptBuf::new_p2wpkh(&public.wpubkey_hash()),
        }],
        change_address: None,
    }
}

/// A session config against `url`.
pub fn config(url: &str, state: &std::path::Path, funding: FundingSource, max_price_msat: u64) -> (PayConfig, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = PayConfig {
        gateway: url.to_owned(),
        state: StateDir::open(state).unwrap(),
        limits: UserLimits {
            max_price: PriceMsatPerMib::new(max_price_msat).unwrap(),
            network: Network::Regtest,
            min_expiry_blocks: BlockCount(6),
            max_expiry_blocks: BlockCount(1000),
            max_spend: Amount::from_sat(50_000),
            capacity: Some(Amount::from_sat(100_000)),
            max_chunk: DEFAULT_MAX_CHUNK,
            max_prepaid: DEFAULT_MAX_PREPAID,
        },
        funding: FundingMode::FromFile(funding),
        refund_script: None,
        fee_rate: FeeRate::from_sat_per_vb_u32(2),
        yes: true,
        poll: Duration::from_millis(20),
        stop: stop.clone(),
        exit_when_spent: false,
        close_on_exit: true,
        tip_chain: None,
    };
    (cfg, stop)
}

/// A chain backend that only knows its tip (the agent's own node, for the tip check).
pub struct FixedTip(pub u32);

impl bitmesh_channel::chain::Chain for FixedTip {
    fn backend(&self) -> &'static str {
        "test-chain"
    }
    fn tip_height(&self) -> Result<absolute::Height, bitmesh_channel::chain::ChainError> {
        Ok(absolute::Height::from_consensus(self.0).unwrap())
    }
    fn transaction(&self, _: &Txid) -> Result<Option<bitmesh_channel::chain::TxStatus>, bitmesh_channel::chain::ChainError> {
        Ok(None)
    }
    fn unspent_output(&self, _: &OutPoint) -> Result<Option<bitmesh_channel::chain::OutputStatus>, bitmesh_channel::chain::ChainError> {
        Ok(None)
    }
    fn broadcast(&self, tx: &bitcoin::Transaction) -> Result<Txid, bitmesh_channel::chain::ChainError> {
        Ok(tx.compute_txid())
    }
    fn fee_rate(&self, _: u16, floor: FeeRate) -> Result<FeeRate, bitmesh_channel::chain::ChainError> {
        Ok(floor)
    }
    fn test_mempool_accept(&self, _: &[bitcoin::Transaction]) -> Result<Vec<bitmesh_channel::chain::MempoolAcceptance>, bitmesh_channel::chain::ChainError> {
        Ok(Vec::new())
    }
}
