//! `bitmesh pay` and `bitmesh refund`: flags, and everything the agent prints.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bitcoin::address::NetworkUnchecked;
use bitcoin::{Address, Amount, FeeRate, Network};
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::pricing::{ByteCount, PriceMsatPerMib, MIB};
use bitmesh_common::wire::ChannelId;
use clap::Args;

use super::discovery::{self, Source};
use super::funding::FundingSource;
use super::meter::IfaceMeter;
use super::policy::Hold;
use super::refund::{refund as do_refund, RefundOutcome};
use super::session::{self, FundingMode, PayConfig, Status, Ui};
use super::state::{Phase, StateDir};
use super::terms::{parse_sat_per_mib, UserLimits};
use bitmesh_channel::chain::{BitcoindAuth, BitcoindRpc, Chain, Esplora};

/// A chain backend for the client (refund broadcast, txid lookup).
#[derive(Debug, Clone, Args)]
pub struct ChainArgs {
    /// Bitcoin Core JSON-RPC URL, e.g. http://127.0.0.1:8332.
    #[arg(long, value_name = "URL", env = "BITMESH_BITCOIND_URL")]
    pub bitcoind_url: Option<String>,
    /// Cookie file of that node (default auth).
    #[arg(long, value_name = "FILE")]
    pub bitcoind_cookie: Option<PathBuf>,
    /// RPC user (with --bitcoind-password).
    #[arg(long, value_name = "USER")]
    pub bitcoind_user: Option<String>,
    /// RPC password.
    #[arg(long, value_name = "PASS", env = "BITMESH_BITCOIND_PASSWORD")]
    pub bitcoind_password: Option<String>,
    /// Esplora API base URL, e.g. https://blockstream.info/api.
    #[arg(long, value_name = "URL", env = "BITMESH_ESPLORA_URL")]
    pub esplora_url: Option<String>,
}

impl ChainArgs {
    /// The backend these flags select, if any.
    pub fn backend(&self) -> anyhow::Result<Option<Box<dyn Chain>>> {
        if let Some(url) = &self.bitcoind_url {
            let auth = match (&self.bitcoind_user, &self.bitcoind_password, &self.bitcoind_cookie) {
                (Some(u), Some(p), _) => BitcoindAuth::UserPass(u.clone(), p.clone()),
                (_, _, Some(c)) => BitcoindAuth::Cookie(c.clone()),
                _ => bail!("--bitcoind-url needs --bitcoind-cookie FILE or --bitcoind-user and --bitcoind-password"),
            };
            return Ok(Some(Box::new(BitcoindRpc::new(url, auth)?)));
        }
        if let Some(url) = &self.esplora_url {
            return Ok(Some(Box::new(Esplora::new(url.trim_end_matches('/')))));
        }
        Ok(None)
    }
}

/// `bitmesh pay`: find the gateway, check its terms, open and fund a channel, pay as
/// you go, close on exit.
#[derive(Debug, Clone, Args)]
pub struct PayArgs {
    /// Gateway base URL (default: the DHCP captive-portal URI, else the default
    /// route's gateway on port 3141).
    #[arg(long, value_name = "URL", env = "BITMESH_GATEWAY")]
    pub gateway: Option<String>,
    /// Highest price accepted, in sat per MiB (e.g. 2 or 0.25).
    #[arg(long, value_name = "SAT_PER_MIB", value_parser = parse_sat_per_mib)]
    pub max_price: PriceMsatPerMib,
    /// Most this session may pay, in sat.
    #[arg(long, value_name = "SAT")]
    pub max_spend: u64,
    /// Channel capacity in sat (default: --max-spend, within the gateway's range).
    #[arg(long, value_name = "SAT")]
    pub capacity: Option<u64>,
    /// Most bytes paid ahead of use, in MiB: a gateway asking for a bigger chunk is
    /// paid this far ahead (more top-ups, never more money at risk).
    #[arg(long, value_name = "MIB", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_chunk_mib: u64,
    /// Most paid ahead of the bytes received, in sat: bounds the chunk in money, and a
    /// gateway whose first payment (close fee + dust) is above it is refused.
    #[arg(long, value_name = "SAT", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_prepaid: u64,
    /// Shortest lock of your money accepted, in blocks.
    #[arg(long, value_name = "BLOCKS", default_value_t = 6)]
    pub min_expiry_blocks: u32,
    /// Longest lock of your money accepted, in blocks (1008 = about a week).
    #[arg(long, value_name = "BLOCKS", default_value_t = 1008)]
    pub max_expiry_blocks: u32,
    /// Chain your money is on.
    #[arg(long, default_value = "bitcoin")]
    pub network: Network,
    /// Fund from these keys and UTXOs (JSON, see docs/client.md); else show a BIP21
    /// URI and QR code for any wallet.
    #[arg(long, value_name = "FILE")]
    pub fund_from: Option<PathBuf>,
    /// Where your change and refund go (default: the --fund-from change address).
    #[arg(long, value_name = "ADDRESS")]
    pub refund_address: Option<Address<NetworkUnchecked>>,
    /// Fee rate of the funding and refund transactions, in sat/vB.
    #[arg(long, value_name = "SAT_PER_VB", default_value_t = 2)]
    pub fee_rate: u64,
    /// Do not ask before paying.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// State directory (channel keys, signed states, refunds; mode 0700).
    #[arg(long, value_name = "DIR", env = "BITMESH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Interface whose counters are the agent's own byte count (default: the one
    /// that routes to the gateway).
    #[arg(long, value_name = "IFACE")]
    pub iface: Option<String>,
    /// Poll the gateway this often when it pushes nothing, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub poll_ms: u64,
    /// Exit (and close) once --max-spend is reached and its budget used up.
    #[arg(long)]
    pub exit_when_spent: bool,
    /// On exit, leave the channel open (the next `bitmesh pay` resumes it) instead
    /// of asking the gateway to close.
    #[arg(long)]
    pub keep_open: bool,
    /// Buy the gateway's Lightning bundles instead of opening a channel: each invoice
    /// is printed (text and QR) for any Lightning wallet; the next is asked for when
    /// half the bundle is used, within --max-spend and --max-price.
    #[arg(long)]
    pub lightning: bool,
    /// With --lightning: the bundle to buy (as in the gateway's terms). [default: the smallest]
    #[arg(long, value_name = "NAME", requires = "lightning")]
    pub bundle: Option<String>,
    /// Chain backend to check the gateway's chain tip (it sets your refund lock)
    /// and, with BIP21 funding, to find the wallet's payment by itself (else the
    /// funding transaction is pasted).
    #[command(flatten)]
    pub chain: ChainArgs,
}

/// `bitmesh refund`: broadcast the refund of channels the gateway never closed.
#[derive(Debug, Clone, Args)]
pub struct RefundArgs {
    /// Only this channel (default: every funded channel not yet refunded).
    #[arg(long, value_name = "CHANNEL_ID")]
    pub channel: Option<String>,
    /// State directory.
    #[arg(long, value_name = "DIR", env = "BITMESH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Re-sign the refund at this fee rate (sat/vB) instead of the pre-signed one.
    #[arg(long, value_name = "SAT_PER_VB")]
    pub fee_rate: Option<u64>,
    /// Chain backend to check the tip and broadcast through (required).
    #[command(flatten)]
    pub chain: ChainArgs,
}

/// Set by SIGINT/SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.context("installing the Ctrl-C handler")?;
    }
    std::thread::spawn(move || loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            stop.store(true, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    });
    Ok(())
}

fn state_dir(flag: &Option<PathBuf>) -> anyhow::Result<StateDir> {
    let path = flag.clone().unwrap_or_else(StateDir::default_path);
    Ok(StateDir::open(&path)?)
}

/// Entry point of `bitmesh pay`.
pub fn pay(args: PayArgs) -> anyhow::Result<()> {
    let (gateway, source) = discovery::discover(args.gateway.as_deref())?;
    match &source {
        Source::Flag => eprintln!("gateway: {gateway}"),
        Source::CaptivePortal(uri) => eprintln!("gateway: {gateway} (captive-portal URI {uri} from DHCP)"),
        Source::DefaultRoute { iface } => eprintln!("gateway: {gateway} (default route via {iface})"),
    }
    let iface = match (&args.iface, &source) {
        (Some(i), _) => i.clone(),
        (None, Source::DefaultRoute { iface }) => iface.clone(),
        (None, _) => discovery::iface_for(&gateway)
            .context("cannot tell which interface reaches the gateway: pass --iface")?,
    };
    let mut meter = IfaceMeter::new(&iface)?;
    eprintln!("counting own traffic on {iface} (rx + tx, as the wire frames the gateway bills)");
    if args.lightning {
        return pay_lightning(&args, &gateway, &mut meter);
    }

    // One backend: it checks the gateway's tip, and finds a BIP21 payment.
    let (funding, tip_chain) = match &args.fund_from {
        Some(path) => (FundingMode::FromFile(FundingSource::read(path)?), args.chain.backend()?),
        None => (FundingMode::Bip21 { chain: args.chain.backend()? }, None),
    };
    let refund_script = match &args.refund_address {
        Some(a) => Some(
            a.clone()
                .require_network(args.network)
                .with_context(|| format!("--refund-address is not a {} address", args.network))?
                .script_pubkey(),
        ),
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    install_signal_handlers(stop.clone())?;
    let cfg = PayConfig {
        gateway,
        state: state_dir(&args.state_dir)?,
        limits: UserLimits {
            max_price: args.max_price,
            network: args.network,
            min_expiry_blocks: BlockCount(args.min_expiry_blocks),
            max_expiry_blocks: BlockCount(args.max_expiry_blocks),
            max_spend: Amount::from_sat(args.max_spend),
            capacity: args.capacity.map(Amount::from_sat),
            max_chunk: ByteCount::from_mib(args.max_chunk_mib),
            max_prepaid: Amount::from_sat(args.max_prepaid),
        },
        funding,
        refund_script,
        fee_rate: FeeRate::from_sat_per_vb(args.fee_rate).context("--fee-rate is too large")?,
        yes: args.yes,
        poll: Duration::from_millis(args.poll_ms.max(50)),
        stop,
        exit_when_spent: args.exit_when_spent,
        close_on_exit: !args.keep_open,
        tip_chain,
    };
    let summary = session::run(cfg, &mut meter, &mut TerminalUi::default())?;
    eprintln!();
    let r = &summary.record;
    println!(
        "channel {}: paid {} sat for {:.2} MiB counted; close: {}",
        r.channel_id,
        r.paid().to_sat(),
        r.received.to_u64() as f64 / MIB as f64,
        match (r.phase, summary.close_txid) {
            (_, Some(t)) => format!("txid {t}"),
            (Phase::CloseRequested, None) => "requested".to_owned(),
            _ => "not requested".to_owned(),
        },
    );
    if r.phase == Phase::Open {
        println!("channel left open; `bitmesh pay` resumes it");
    }
    println!("if the gateway never closes, run `bitmesh refund` from height {}", r.expiry.to_consensus_u32());
    Ok(())
}

/// `bitmesh pay --lightning`.
fn pay_lightning(args: &PayArgs, gateway: &str, meter: &mut IfaceMeter) -> anyhow::Result<()> {
    use crate::lightning::{run, LightningLimits, LightningUi};
    use bitmesh_common::wire::{Bundle, Invoice};
    struct Term;
    impl LightningUi for Term {
        fn show_invoice(&mut self, bundle: &Bundle, inv: &Invoice, qr: Option<&str>) {
            eprintln!();
            if let Some(qr) = qr {
                eprintln!("{qr}");
            }
            eprintln!("pay {} sat for {} ({} bytes) with any Lightning wallet:", inv.amount_msat.div_ceil(1000), bundle.name, inv.bytes);
            println!("{}", inv.bolt11);
            eprintln!("your purchase token (moves the credit to a new MAC): {}", inv.token);
        }
        fn paid(&mut self, inv: &Invoice, bytes: u64) {
            eprintln!("paid: {bytes} bytes credited (invoice {})", inv.payment_hash);
        }
        fn expired(&mut self, inv: &Invoice) {
            eprintln!("invoice {} expired unpaid", inv.payment_hash);
        }
        fn status(&mut self, remaining: u64, spent_msat: u64) {
            eprint!("\r{:.2} MiB left, {} sat spent   ", mib(remaining), spent_msat / 1000);
            let _ = std::io::stderr().flush();
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    install_signal_handlers(stop.clone())?;
    let limits = LightningLimits {
        max_price: args.max_price,
        max_spend_sat: args.max_spend,
        bundle: args.bundle.clone(),
        poll: Duration::from_millis(args.poll_ms.max(50)),
        exit_when_spent: args.exit_when_spent,
    };
    let api = crate::http::GatewayApi::new(gateway);
    let sum = run(&api, &limits, meter, &stop, &mut Term)?;
    eprintln!();
    println!("bought {} bundle(s), {} bytes, for {} sat", sum.bundles, sum.bytes, sum.spent_msat.div_ceil(1000));
    if let Some(t) = sum.token {
        println!("purchase token: {t}");
    }
    Ok(())
}

/// Entry point of `bitmesh refund`.
pub fn refund(args: RefundArgs) -> anyhow::Result<()> {
    let dir = state_dir(&args.state_dir)?;
    let chain = args
        .chain
        .backend()?
        .context("bitmesh refund needs a chain backend: pass --bitcoind-url (with --bitcoind-cookie) or --esplora-url")?;
    let only = args.channel.as_deref().map(ChannelId::from_str).transpose().context("--channel is not a channel id")?;
    let fee_rate = match args.fee_rate {
        Some(r) => Some(FeeRate::from_sat_per_vb(r).context("--fee-rate is too large")?),
        None => None,
    };
    let mut any = false;
    for mut record in dir.all()? {
        if only.is_some_and(|id| id != record.channel_id) || record.phase == Phase::Refunded || record.funding.is_none() {
            continue;
        }
        any = true;
        let outcome = do_refund(&mut record, chain.as_ref(), fee_rate)?;
        match outcome {
            RefundOutcome::NotFunded => println!("{}: never funded, nothing to refund", record.channel_id),
            RefundOutcome::AlreadySpent => println!("{}: the channel output is already spent (closed by the gateway)", record.channel_id),
            RefundOutcome::TooEarly { tip, broadcast_from } => println!(
                "{}: too early: the refund can be broadcast from height {broadcast_from} (confirms from {}); the tip is {tip}, {} blocks to go",
                record.channel_id,
                broadcast_from.to_consensus_u32() + 1,
                broadcast_from.to_consensus_u32() - tip.to_consensus_u32()
            ),
            RefundOutcome::Broadcast(txid) => {
                dir.save(&record)?;
                println!("{}: refund broadcast, txid {txid}", record.channel_id);
            }
        }
    }
    if !any {
        println!("no funded channel to refund in {}", dir.path().display());
    }
    Ok(())
}

/// Prints to the terminal: terms and prompt on stderr, a `\r` status line.
#[derive(Default)]
struct TerminalUi {
    status_shown: bool,
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

impl TerminalUi {
    fn end_status_line(&mut self) {
        if std::mem::take(&mut self.status_shown) {
            eprintln!();
        }
    }
}

impl Ui for TerminalUi {
    fn confirm_terms(&mut self, lines: &[String], ask: bool) -> bool {
        eprintln!("gateway terms:");
        for l in lines {
            eprintln!("  {l}");
        }
        if !ask {
            return true;
        }
        if !std::io::stdin().is_terminal() {
            eprintln!("not a terminal and no --yes: not paying");
            return false;
        }
        eprint!("pay this gateway? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        matches!(answer.trim(), "y" | "Y" | "yes")
    }

    fn show_funding_request(&mut self, uri: &str, qr: Option<&str>) {
        self.end_status_line();
        if let Some(qr) = qr {
            eprintln!("{qr}");
        }
        eprintln!("pay with any wallet: {uri}");
    }

    fn read_funding(&mut self) -> Option<String> {
        let mut line = String::new();
        match std::io::stdin().lock().read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line),
        }
    }

    fn status(&mut self, s: &Status) {
        let remaining = s.credited.to_u64().saturating_sub(s.gateway_used.to_u64());
        let hold = match s.hold {
            None | Some(Hold::Ahead) => "",
            Some(Hold::Unearned) => "  [gateway claims more than we received: not paying ahead]",
            Some(Hold::SpendCap) => "  [--max-spend reached]",
            Some(Hold::ChannelFull) => "  [channel fully paid]",
            Some(Hold::FirstPaymentNotAllowed) => "  [first payment not allowed by your cap]",
        };
        eprint!(
            "\rpaid {} sat | used {:.2} MiB (counted {:.2}) | remaining {:.2} MiB | {:.2} MiB/s{hold}\x1b[K",
            s.paid.to_sat(),
            mib(s.gateway_used.to_u64()),
            mib(s.received.to_u64()),
            mib(remaining),
            mib(s.rate_bytes_per_sec),
        );
        let _ = std::io::stderr().flush();
        self.status_shown = true;
    }

    fn note(&mut self, message: &str) {
        self.end_status_line();
        eprintln!("{message}");
    }
}
