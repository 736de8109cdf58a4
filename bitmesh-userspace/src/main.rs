//! `bitmesh`: controller (`run`), operator CLI and (later) the client agent
//! (`pay`, `refund`). Clap commands -> library functions; anyhow only here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bitmesh::admin::{self, format, AdminRequest, AdminResponse};
use bitmesh::api::{self, ApiLimits};
use bitmesh::chain::{BitcoindAuth, BitcoindRpc, Chain, Esplora};
use bitmesh::channel::GatewaySeed;
use bitmesh::config::{ChainChoice, HookChoice, RunArgs};
use bitmesh::gateway::{Gateway, GatewayParts, KernelNeighbours};
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

#[derive(Subcommand)]
enum Command {
    /// Run the gateway controller (as root): meter, client API, settlement.
    Run(RunArgs),
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
    /// `pay` and `refund`: the client agent, defined in bitmesh-client.
    #[command(flatten)]
    Client(bitmesh_client::ClientCommand),
    /// Show, or set, the price for NEW channels in msat per MiB (open channels keep theirs).
    Price {
        /// New price in millisatoshis per MiB. [default: show the current price]
        msat_per_mib: Option<u64>,
        #[command(flatten)]
        socket: SocketArg,
    },
}

fn main() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        Command::Client(command) => command.run(),
        Command::Run(_) => {
            let sub = matches.subcommand_matches("run").ok_or_else(|| anyhow!("run: no arguments"))?;
            let args = RunArgs::from_matches(sub)?;
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            rt.block_on(run(args))
        }
        Command::Clients { json, watch, socket } => rt.block_on(async {
            loop {
                let AdminResponse::Clients { clients } = admin::request(&socket.admin_socket, &AdminRequest::Clients).await? else {
                    bail!("unexpected answer from the controller");
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&clients)?);
                } else {
                    if watch.is_some() {
                        print!("\x1b[2J\x1b[H");
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
        Command::Price { msat_per_mib, socket } => rt.block_on(async {
            match admin::request(&socket.admin_socket, &AdminRequest::Price { set_msat_per_mib: msat_per_mib }).await? {
                AdminResponse::Price { msat_per_mib } => {
                    println!("price for new channels: {msat_per_mib} msat/MiB");
                    Ok(())
                }
                _ => bail!("unexpected answer from the controller"),
            }
        }),
    }
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
    let payout_flag = args.payout_script()?;
    let iface = args.iface()?.to_owned();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bitmesh run must run as root (it loads BPF programs and owns the admin socket): use sudo");
    }
    if nix::net::if_::if_nametoindex(iface.as_str()).is_err() {
        bail!("interface {iface} not found: pass the client-facing interface with --iface (e.g. --iface wlan0)");
    }
    let gateway_ip = iface_ipv4(&iface)
        .ok_or_else(|| anyhow!("interface {iface} has no IPv4 address: give it the gateway address clients use"))?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create --data-dir {}", args.data_dir.display()))?;
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
    };
    let mut meter = Meter::load(&meter_config)?;
    let hook = match args.hook {
        HookChoice::Auto => UploadHook::Auto,
        HookChoice::Xdp => UploadHook::XdpNative,
        HookChoice::XdpGeneric => UploadHook::XdpGeneric,
        HookChoice::Tc => UploadHook::Tc,
    };
    let hook = meter.attach(&iface, hook)?;
    info!(%iface, %hook, pinned = maps_were_pinned, "meter attached");

    let portal_url = format!("http://{}:{}/v1/terms", gateway_ip, args.api_port);
    let gw = Gateway::new(
        GatewayParts {
            store,
            meter: Box::new(meter),
            chain,
            seed,
            policy,
            payout_script,
            neighbours: Box::new(KernelNeighbours { iface: iface.clone() }),
            portal_url,
        },
        tip,
    )?;
    gw.reconcile(maps_were_pinned)?;

    let limits = ApiLimits {
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_secs(args.request_timeout_secs),
        requests_per_min: args.rate_limit_per_min,
        relays_per_hour: args.relay_limit_per_hour,
        relay_max_tx_bytes: args.relay_max_tx_bytes,
    };
    let app = api::router(gw.clone(), limits);
    let addr = args.api_socket();
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (--api-addr/--api-port)"))?;
    info!(%addr, "client API listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await {
            warn!(error = %e, "client API stopped");
        }
    });
    let admin_path = args.admin_socket.clone();
    let admin_gw = gw.clone();
    tokio::spawn(async move {
        if let Err(e) = admin::serve(admin_gw, &admin_path).await {
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
        }
    });
    let egw = gw.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            egw.push_events();
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Programs and maps stay pinned: the kernel keeps enforcing budgets while we are down.
    if let Err(e) = gw.snapshot_usage() {
        warn!(error = %e, "final usage snapshot failed");
    }
    info!("controller stopped; the kernel keeps enforcing paid budgets");
    let _ = IpAddr::V4(gateway_ip);
    Ok(())
}
