//! `bitmesh`: controller (`run`), operator CLI and the client agent (`pay`,
//! `refund`). Clap commands -> library functions; anyhow only here, and every error
//! leaves as one line (see `main`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bitmesh::admin::{self, format, AdminRequest, AdminResponse};
use bitmesh::api::{self, ApiLimits};
use bitmesh_channel::chain::{BitcoindAuth, BitcoindRpc, Chain, Esplora};
use bitmesh_channel::GatewaySeed;
use bitmesh::config::{ChainChoice, HookChoice, RunArgs};
use bitmesh::gateway::{Gateway, GatewayParts, KernelNeighbours, LightningRail};
use bitmesh::lightning::{self, LightningSettings};
use bitmesh::meter::{Meter, MeterConfig, UploadHook};
use bitmesh::store::Store;
use bitmesh_common::wire::ChannelId;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing::{info, warn};

#[derive(Parser)]
#[command(name = "bitmesh", version, about = "Sell WiFi by the byte for Bitcoin: controller and operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct SocketArg {
    /// The controller's admin socket.
    #[arg(long, value_name = "PATH", default_value = "/run/bitmesh/admin.sock", global = true)]
    admin_socket: PathBuf,
}

// Parsed once per process: the size of `Run`'s flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the gateway controller (as root): meter, client API, settlement.
    Run(Box<RunArgs>),
    /// Per-client counters: MAC, IP, channel, paid, credited, up, down, remaining, rate, last seen.
    Clients {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds until interrupted. [default: off]
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Every channel with its state, capacity, paid total and close transaction.
    Channels {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Money: settled on chain, pending confirmation, held in open channels.
    Earnings {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Close a channel now (or every open channel with --all), in one transaction.
    Settle {
        /// Channel id (64 hex digits).
        #[arg(required_unless_present = "all")]
        channel: Option<ChannelId>,
        /// Close every open channel.
        #[arg(long, conflicts_with = "channel")]
        all: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// The Lightning node: node id, balances, deposit address, channels, pending
    /// invoices; or one of its actions.
    Lightning {
        #[command(subcommand)]
        action: Option<LightningCmd>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// `pay` and `refund`: the client agent, defined in bitmesh-client.
    #[command(flatten)]
    Client(Box<bitmesh_client::ClientCommand>),
    /// Show, or set, the price for NEW channels in msat per MiB (open channels keep theirs).
    /// A price set here is kept in the store and overrides --price-msat-per-mib (flag or
    /// config file) at every start, until `bitmesh price --reset`.
    Price {
        /// New price in millisatoshis per MiB (1000 = 1 sat/MiB). [default: show the current price]
        #[arg(conflicts_with = "reset")]
        msat_per_mib: Option<u64>,
        /// Forget the price set with `bitmesh price`: --price-msat-per-mib applies again.
        #[arg(long)]
        reset: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Subcommand)]
enum LightningCmd {
    /// Open a channel of SAT satoshis to a peer, from the node's on-chain funds.
    OpenChannel {
        /// The peer, NODE_ID@HOST:PORT.
        target: String,
        /// Channel size in satoshis.
        sat: u64,
    },
    /// Connect to a peer (it can then open a channel to the gateway).
    Connect {
        /// The peer, NODE_ID@HOST:PORT.
        target: String,
    },
    /// Send on-chain funds to an address, or pay out over Lightning to an invoice.
    Withdraw {
        /// On-chain destination.
        #[arg(long, required_unless_present = "invoice", conflicts_with = "invoice")]
        address: Option<String>,
        /// Amount in satoshis. [default: everything spendable]
        #[arg(long, requires = "address")]
        sat: Option<u64>,
        /// A BOLT11 invoice to pay from the node's channels.
        #[arg(long)]
        invoice: Option<String>,
    },
    /// Print the node's seed (hex): keep it offline, with a backup of --data-dir/lightning.
    ExportSeed,
}

/// Every expected failure ends here: one line on stderr (the chain of causes, `{:#}`)
/// and exit status 1. `main` returning `Result` would print anyhow's `Debug` form,
/// which carries a backtrace of the error's creation whenever `RUST_BACKTRACE` is set;
/// only panics, which are bugs, keep their backtrace. Usage errors are clap's own
/// (the message and a hint, exit status 2).
fn main() -> ExitCode {
    match run_command() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, as `{:#}` joins them (`a: b: c`), with two
/// fixes: a cause that a message already quotes (many say `...: {source}` and also
/// name it as their source) is printed once, and line breaks inside a message are
/// folded.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(text.as_str()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

fn run_command() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        Command::Client(command) => command.run(),
        Command::Run(_) => {
            let sub = matches.subcommand_matches("run").ok_or_else(|| anyhow!("run: no arguments"))?;
            let args = RunArgs::from_matches(sub)?;
            init_logging();
            rt.block_on(run(args))
        }
        Command::Clients { json, watch, socket } => rt.block_on(async {
            loop {
                let AdminResponse::Clients { clients, price } = admin::request(&socket.admin_socket, &AdminRequest::Clients).await? else {
                    bail!("unexpected answer from the controller");
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&clients)?);
                } else {
                    if watch.is_some() {
                        print!("\x1b[2J\x1b[H");
                    }
                    if let Some(p) = &price {
                        println!("{}", format::price_line(p));
                    }
                    print!("{}", format::clients_table(&clients));
                }
                match watch {
                    Some(secs) => tokio::time::sleep(Duration::from_secs(secs.max(1))).await,
                    None => return Ok(()),
                }
            }
        }),
        Command::Channels { json, socket } => rt.block_on(async {
            let AdminResponse::Channels { channels } = admin::request(&socket.admin_socket, &AdminRequest::Channels).await? else {
                bail!("unexpected answer from the controller");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&channels)?);
            } else {
                print!("{}", format::channels_table(&channels));
            }
            Ok(())
        }),
        Command::Earnings { json, socket } => rt.block_on(async {
            let AdminResponse::Earnings { earnings } = admin::request(&socket.admin_socket, &AdminRequest::Earnings).await? else {
                bail!("unexpected answer from the controller");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&earnings)?);
            } else {
                print!("{}", format::earnings_text(&earnings));
            }
            Ok(())
        }),
        Command::Settle { channel, all, socket } => rt.block_on(async {
            let req = AdminRequest::Settle { channel: if all { None } else { channel } };
            match admin::request(&socket.admin_socket, &req).await? {
                AdminResponse::Settled { closed, txids } => {
                    println!("closed {} channel(s); settlement txid(s): {}", closed.len(), if txids.is_empty() { "none".into() } else { txids.join(", ") });
                    Ok(())
                }
                _ => bail!("unexpected answer from the controller"),
            }
        }),
        Command::Lightning { action, json, socket } => rt.block_on(async {
            let req = match action {
                None => AdminRequest::Lightning,
                Some(LightningCmd::OpenChannel { target, sat }) => AdminRequest::LightningOpenChannel { target, sat },
                Some(LightningCmd::Connect { target }) => AdminRequest::LightningConnect { target },
                Some(LightningCmd::Withdraw { address, sat, invoice }) => AdminRequest::LightningWithdraw { address, sat, invoice },
                Some(LightningCmd::ExportSeed) => AdminRequest::LightningExportSeed,
            };
            match admin::request(&socket.admin_socket, &req).await? {
                AdminResponse::Lightning { info } if json => println!("{}", serde_json::to_string_pretty(&info)?),
                AdminResponse::Lightning { info } => print!("{}", format::lightning_text(&info)),
                AdminResponse::LightningDone { message } => println!("{message}"),
                AdminResponse::LightningSeed { seed_hex } => println!("{seed_hex}"),
                _ => bail!("unexpected answer from the controller"),
            }
            Ok(())
        }),
        Command::Price { msat_per_mib, reset, socket } => rt.block_on(async {
            match admin::request(&socket.admin_socket, &AdminRequest::Price { set_msat_per_mib: msat_per_mib, reset }).await? {
                AdminResponse::Price(p) => {
                    println!("{}", format::price_line(&p));
                    Ok(())
                }
                _ => bail!("unexpected answer from the controller"),
            }
        }),
    }
}

/// Log records go to journald, each field its own journal field (`CHANNEL`, `MAC`,
/// `TXID`, `ERROR`, ...; fields of an enclosing span as `S0_CHANNEL`, ...), when
/// stderr is the journal (systemd sets `JOURNAL_STREAM` to its device and inode);
/// else as text lines on stderr. `RUST_LOG` filters both (default `info`).
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    if stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            let journald = journald.with_field_prefix(None).with_syslog_identifier("bitmesh".to_string());
            tracing_subscriber::registry().with(filter()).with(journald).init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Whether stderr is connected to journald (`JOURNAL_STREAM=<dev>:<inode>` names it).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        let (d, i) = v.split_once(':')?;
        Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
    }) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

fn iface_ipv4(iface: &str) -> Option<Ipv4Addr> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs {
        if a.interface_name != iface {
            continue;
        }
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            return Some(sin.ip());
        }
    }
    None
}

fn chain_backend(args: &RunArgs) -> Result<Arc<dyn Chain>> {
    Ok(match args.chain {
        ChainChoice::Bitcoind => {
            let auth = match (&args.rpc_user, &args.rpc_password, &args.rpc_cookie) {
                (Some(u), Some(p), _) => BitcoindAuth::UserPass(u.clone(), p.clone()),
                (Some(_), None, _) => bail!("--rpc-user needs --rpc-password (or BITMESH_RPC_PASSWORD)"),
                (None, _, Some(c)) => BitcoindAuth::Cookie(c.clone()),
                (None, _, None) => bail!("--chain bitcoind needs --rpc-cookie FILE or --rpc-user/--rpc-password"),
            };
            Arc::new(BitcoindRpc::new(&args.rpc_url, auth)?)
        }
        ChainChoice::Esplora => Arc::new(Esplora::new(&args.esplora_url)),
    })
}

async fn run(args: RunArgs) -> Result<()> {
    let policy = args.policy()?;
    let policy_network = policy.network;
    let payout_flag = args.payout_script()?;
    let iface = args.iface()?.to_owned();
    let missing = bitmesh::privileges::missing(bitmesh::privileges::effective().context("cannot read this process's capabilities")?);
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|c| c.name).collect();
        let uses: Vec<&str> = missing.iter().map(|c| c.used_for).collect();
        bail!(
            "bitmesh run needs {} (to {}): run it as root (sudo), or add them to the unit's CapabilityBoundingSet and AmbientCapabilities",
            names.join(" and "),
            uses.join("; ")
        );
    }
    if nix::net::if_::if_nametoindex(iface.as_str()).is_err() {
        bail!("interface {iface} not found: pass the client-facing interface with --iface (e.g. --iface wlan0)");
    }
    let gateway_ip = iface_ipv4(&iface)
        .ok_or_else(|| anyhow!("interface {iface} has no IPv4 address: give it the gateway address clients use"))?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create --data-dir {}", args.data_dir.display()))?;
    // The seed and the payment journal live here: root only.
    std::fs::set_permissions(&args.data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make --data-dir {} private (mode 0700)", args.data_dir.display()))?;
    // One controller per data and pin directory, decided before anything is touched:
    // a second one would otherwise reconcile the maps and re-attach the meter of
    // the first. The locks are held until the process exits.
    let _data_lock = run_lock::data_dir(&args.data_dir)?;
    let mut _pin_lock = run_lock::pin_dir_if_present(&args.pin_dir)?;
    let conn_limits = args.conn_limits()?;
    run_lock::ensure_fd_budget(conn_limits.max_connections)?;
    let store = Arc::new(Store::open(&Store::path_in(&args.data_dir))?);
    let seed = GatewaySeed::load_or_create(&args.data_dir.join("seed"), policy.network)?;

    let chain = chain_backend(&args)?;
    let probe = chain.clone();
    let tip = tokio::task::spawn_blocking(move || probe.tip_height())
        .await?
        .map_err(|e| anyhow!("cannot reach the chain backend ({:?} at {}): {e}", args.chain, match args.chain {
            ChainChoice::Bitcoind => &args.rpc_url,
            ChainChoice::Esplora => &args.esplora_url,
        }))?;

    let probe = chain.clone();
    tokio::task::spawn_blocking(move || probe.check_ready()).await?.map_err(|e| anyhow!("{e}"))?;

    // The gateway's share of every close goes to --payout-address, else to a key
    // derived from the same seed (index 2^31-1, never used for a channel).
    let payout_script = match payout_flag {
        Some(script) => script,
        None => {
            let payout_key = seed.channel_key(0x7fff_ffff)?;
            bitcoin::ScriptBuf::new_p2wpkh(&payout_key.public.wpubkey_hash()?)
        }
    };
    info!(payout = %bitcoin::Address::from_script(&payout_script, policy.network)?, "gateway payout address");

    let maps_were_pinned = args.pin_dir.join(bitmesh_common::kernel::MAP_CREDIT).exists();
    let meter_config = MeterConfig {
        pin_dir: args.pin_dir.clone(),
        gateway_ipv4: Some(gateway_ip),
        gateway_ipv6: None,
        payment_port: args.api_port,
        dns_allowed: args.dns_allowed,
        garden: bitmesh::meter::default_garden_limits(),
        enforce_bound_ip: args.enforce_bound_ip,
    };
    let mut meter = Meter::load(&meter_config)?;
    if _pin_lock.is_none() {
        // The pin directory did not exist before Meter::load created it.
        _pin_lock = run_lock::pin_dir_if_present(&args.pin_dir)?;
    }
    let hook = match args.hook {
        HookChoice::Auto => UploadHook::Auto,
        HookChoice::Xdp => UploadHook::XdpNative,
        HookChoice::XdpGeneric => UploadHook::XdpGeneric,
        HookChoice::Tc => UploadHook::Tc,
    };
    let hook = meter.attach(&iface, hook)?;
    info!(%iface, %hook, pinned = maps_were_pinned, "meter attached");

    let portal_url = args.portal_url(gateway_ip);
    let tls = match args.tls_files()? {
        Some((cert, key)) => Some(bitmesh::portal::tls::acceptor(cert, key)?),
        None => None,
    };
    let gw = Gateway::new(
        GatewayParts {
            store,
            meter: Box::new(meter),
            chain,
            seed,
            policy,
            payout_script,
            neighbours: Box::new(KernelNeighbours { iface: iface.clone() }),
            portal_url: portal_url.clone(),
            venue_info_url: args.venue_info_url.clone(),
        },
        tip,
    )?;
    gw.reconcile(maps_were_pinned)?;
    // The Lightning node, after the chain probe above: ldk-node starts "successfully"
    // even when bitcoind is down or the password is wrong, so that check comes first.
    let ln_node = start_lightning(&args, &gw, policy_network).await?;
    // A price set with `bitmesh price` beats the flag and the file: say so at start.
    let price = admin::PriceSetting::of(&gw)?;
    if price.set_at_runtime && Some(price.msat_per_mib) != price.configured_msat_per_mib {
        warn!("{}", format::price_line(&price));
    } else {
        info!("{}", format::price_line(&price));
    }

    let limits = ApiLimits {
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_secs(args.request_timeout_secs),
        requests_per_min: args.rate_limit_per_min,
        relays_per_hour: args.relay_limit_per_hour,
        relay_max_tx_bytes: args.relay_max_tx_bytes,
    };
    let page = bitmesh::portal::page::router(bitmesh::portal::PageConfig {
        venue: args.venue.clone(),
        api_base: args.api_base_url(gateway_ip),
    });
    let app = api::router_with(gw.clone(), limits, page);
    let listeners = match args.api_socket() {
        Some(addr) => vec![listen(addr, None)?],
        // The client interface only (bound to the device, so a packet for this
        // address arriving from upstream is not answered), and loopback.
        None => vec![
            listen(SocketAddr::new(IpAddr::V4(gateway_ip), args.api_port), Some(&iface))?,
            listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), args.api_port), None)?,
        ],
    };
    let slots = api::ConnSlots::new(conn_limits.clone());
    let keys = api::client_keys(gw.clone());
    for listener in listeners {
        let addr = listener.local_addr()?;
        info!(%addr, max_connections = conn_limits.max_connections, per_client = conn_limits.max_per_client, "client API listening");
        tokio::spawn(api::serve_tls(listener, app.clone(), slots.clone(), keys.clone(), tls.clone()));
    }
    info!(url = %portal_url, https = tls.is_some(), venue = %args.venue, "captive portal page");
    // Captive-portal interception: the redirect listener first, then the nftables
    // table that sends intercepted port 80 to it (docs/design.md section 5.8).
    let mut portal_table = None;
    if args.portal {
        if matches!(hook, UploadHook::XdpNative | UploadHook::XdpGeneric) {
            warn!(%hook, "the XDP upload hook cannot mark packets: unpaid HTTP is dropped, not redirected (use --hook tc or auto)");
        }
        let redirect = listen(SocketAddr::new(IpAddr::V4(gateway_ip), args.portal_port), Some(&iface))?;
        tokio::spawn(api::serve(redirect, bitmesh::portal::redirect::router(portal_url.clone()), slots.clone(), keys.clone()));
        portal_table = Some(bitmesh::portal::NftTable::install(&iface, gateway_ip, args.portal_port)?);
        info!(port = args.portal_port, table = bitmesh::portal::NftTable::NAME, "unpaid HTTP redirected to the portal, unpaid HTTPS reset");
    }
    let admin_listener = admin::bind(&args.admin_socket)?;
    let admin_gw = gw.clone();
    tokio::spawn(async move {
        if let Err(e) = admin::serve_on(admin_gw, admin_listener).await {
            warn!(error = %e, "admin socket stopped");
        }
    });
    if let Some(maddr) = args.metrics_socket()? {
        let mgw = gw.clone();
        tokio::spawn(async move {
            if let Err(e) = admin::metrics::serve(mgw, maddr).await {
                warn!(error = %e, %maddr, "metrics endpoint stopped");
            }
        });
    }
    // Settlement engine: driven by the chain tip, polled.
    let tgw = gw.clone();
    let poll = Duration::from_secs(args.chain_poll_secs.max(1));
    tokio::spawn(async move {
        loop {
            match tgw.tick().await {
                Ok(r) if r != Default::default() => info!(?r, "settlement pass"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "settlement pass failed; retrying"),
            }
            tokio::time::sleep(poll).await;
        }
    });
    let sgw = gw.clone();
    let every = Duration::from_secs(args.snapshot_interval_secs.max(1));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = sgw.snapshot_usage() {
                warn!(error = %e, "usage snapshot failed");
            }
            if let Err(e) = sgw.housekeeping().await {
                warn!(error = %e, "housekeeping (offer expiry, stale kernel entries) failed");
            }
        }
    });
    let egw = gw.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            egw.push_events();
            egw.push_device_events();
        }
    });
    // MAC-cloning alert: a bound client's MAC sending from another address.
    let wgw = gw.clone();
    tokio::spawn(async move {
        let mut watch = bitmesh::gateway::SourceWatch::default();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(e) = wgw.warn_on_second_sources(&mut watch) {
                warn!(error = %e, "reading the bound-address counters failed");
            }
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // The meter is attached and enforcing, the API and the admin socket listen:
    // a Type=notify unit counts as started from here.
    if let Err(e) = bitmesh::notify::notify(&format!("READY=1\nSTATUS=metering {iface} ({hook})")) {
        warn!(error = %e, "could not tell systemd the controller is ready");
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    if let Err(e) = bitmesh::notify::notify("STOPPING=1") {
        warn!(error = %e, "could not tell systemd the controller is stopping");
    }
    // Without the table an unpaid client's HTTP is dropped, never passed (fail closed).
    if let Some(mut table) = portal_table.take() {
        if let Err(e) = table.remove() {
            warn!(error = %e, "removing the captive-portal nftables table failed");
        }
    }
    if let Some(node) = ln_node {
        if let Err(e) = tokio::task::spawn_blocking(move || node.stop()).await {
            warn!(error = %e, "stopping the Lightning node failed");
        }
    }
    // Programs and maps stay pinned: the kernel keeps enforcing budgets while we are down.
    if let Err(e) = gw.snapshot_usage() {
        warn!(error = %e, "final usage snapshot failed");
    }
    info!("controller stopped; the kernel keeps enforcing paid budgets");
    Ok(())
}

/// Start the embedded Lightning node when `--lightning` is on, attach it to the
/// gateway and run its event loop; `None` when off.
async fn start_lightning(
    args: &RunArgs,
    gw: &Arc<Gateway>,
    network: bitcoin::Network,
) -> Result<Option<Arc<ldk_node::Node>>> {
    let Some(settings) = LightningSettings::from_args(args)? else { return Ok(None) };
    let chain = match args.chain {
        ChainChoice::Bitcoind => {
            let user_pass = match (&args.rpc_user, &args.rpc_password) {
                (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                _ => None,
            };
            lightning::NodeChain::bitcoind(&args.rpc_url, args.rpc_cookie.as_deref(), user_pass)?
        }
        ChainChoice::Esplora => lightning::NodeChain::Esplora { url: args.esplora_url.clone() },
    };
    let spec = lightning::NodeSpec { data_dir: args.data_dir.clone(), network, chain, settings: settings.clone() };
    let handle = tokio::runtime::Handle::current();
    let (node, token_key) = tokio::task::spawn_blocking(move || lightning::start(spec, handle)).await??;
    let via_lsp = settings.lsp.is_some();
    info!(node_id = %node.node_id(), listen = %settings.listen, lsp = via_lsp, "Lightning node running");
    gw.attach_lightning(LightningRail {
        invoices: Arc::new(lightning::LdkInvoices { node: node.clone(), via_lsp }),
        settings,
        token_key,
        node: Some(node.clone()),
    });
    tokio::spawn(lightning::run_event_loop(node.clone(), gw.clone()));
    Ok(Some(node))
}

/// A listening socket for the client API on `addr`, bound to `device` if given.
fn listen(addr: SocketAddr, device: Option<&str>) -> Result<tokio::net::TcpListener> {
    let what = || format!("cannot listen on {addr} (--api-addr/--api-port)");
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .with_context(what)?;
    socket.set_reuseaddr(true).with_context(what)?;
    if let Some(dev) = device {
        socket.bind_device(Some(dev.as_bytes())).with_context(|| format!("cannot bind the client API to interface {dev}"))?;
    }
    socket.bind(addr).with_context(what)?;
    socket.listen(1024).with_context(what)
}

/// One controller per data and pin directory: exclusive `flock`s, taken first.
mod run_lock {
    use std::fs::File;
    use std::path::Path;

    use anyhow::{bail, Context, Result};
    use nix::fcntl::{Flock, FlockArg};

    /// Descriptors kept free beyond the API's connections: store, node RPC,
    /// BPF maps and links, admin and metrics sockets.
    const FD_RESERVE: u64 = 128;

    fn lock(file: File, what: &str, path: &Path) -> Result<Flock<File>> {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(l),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
                "another bitmesh run is already using {what} {}: stop it first (one controller per directory)",
                path.display()
            ),
            Err((_, e)) => bail!("cannot lock {what} {}: {e}", path.display()),
        }
    }

    /// Lock `<data_dir>/bitmesh.lock` (created with mode 0600).
    pub fn data_dir(dir: &Path) -> Result<Flock<File>> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("bitmesh.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create the lock file {}", path.display()))?;
        lock(file, "--data-dir", dir)
    }

    /// Lock the pin directory itself (bpffs holds no regular files), if it exists.
    pub fn pin_dir_if_present(dir: &Path) -> Result<Option<Flock<File>>> {
        match File::open(dir) {
            Ok(f) => Ok(Some(lock(f, "--pin-dir", dir)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => bail!("cannot open --pin-dir {}: {e}", dir.display()),
        }
    }

    /// Raise the soft descriptor limit to the hard one, and refuse to start when
    /// it cannot hold the API's connection cap plus the controller's own files:
    /// past it, accepting clients would starve the store and the node RPC.
    pub fn ensure_fd_budget(max_connections: usize) -> Result<()> {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one rlimit into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            bail!("cannot read the file-descriptor limit: {}", std::io::Error::last_os_error());
        }
        let mut soft = lim.rlim_cur;
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            // SAFETY: setrlimit reads one rlimit from a struct we own.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                soft = lim.rlim_max;
            }
        }
        let need = max_connections as u64 + FD_RESERVE;
        if soft < need {
            bail!(
                "--api-max-connections {max_connections} needs {need} file descriptors but the limit is {soft}: raise LimitNOFILE or lower --api-max-connections"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot reach the controller at /x: {source}")]
    struct QuotesItsSource {
        source: std::io::Error,
    }

    #[test]
    fn errors_print_as_one_line_with_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(QuotesItsSource { source: io }).context("bitmesh clients");
        assert_eq!(one_line(&e), "bitmesh clients: cannot reach the controller at /x: no such file");
        let e = anyhow::anyhow!("clap says\n\n  usage: x\n").context("--config");
        assert_eq!(one_line(&e), "--config: clap says usage: x");
    }
}
