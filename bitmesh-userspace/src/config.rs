//! `bitmesh run` policy: every flag with its unit and default, optionally read from a
//! TOML file (`--config FILE`) where flags given on the command line win.
//!
//! The file uses the flag names with `_` instead of `-`:
//!
//! ```toml
//! iface = "wlan0"
//! price_msat_per_mib = 2000
//! chain = "bitcoind"
//! rpc_cookie = "/var/lib/bitcoind/.cookie"
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use bitcoin::address::NetworkUnchecked;
use bitcoin::{Address, Amount, FeeRate, Network, ScriptBuf};
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::pricing::{ByteCount, PriceMsatPerMib};
use bitmesh_common::wire::ChannelLimits;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::api::ConnLimits;

/// Errors in the configuration. Each names the flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("no client-facing interface: pass --iface IFACE (e.g. --iface wlan0) or set iface in the config file")]
    NoIface,
    #[error("--{flag}: {message}")]
    Value { flag: &'static str, message: String },
}

/// Which hook meters upload (client -> gateway) traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookChoice {
    /// XDP if the driver supports it natively, else TC ingress.
    Auto,
    /// XDP in the driver (native); fails if the driver has no native XDP.
    Xdp,
    /// XDP emulated on the skb (generic mode): any driver, e.g. the Pi's brcmfmac.
    #[serde(rename = "xdp-generic")]
    XdpGeneric,
    /// TC (tcx/clsact) ingress.
    Tc,
}

/// Which chain backend the controller talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChainChoice {
    /// Bitcoin Core JSON-RPC (cookie or user/password auth).
    Bitcoind,
    /// An Esplora HTTP API.
    Esplora,
}

/// The bitcoin networks a gateway can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkChoice {
    Bitcoin,
    Testnet,
    Testnet4,
    Signet,
    Regtest,
}

impl From<NetworkChoice> for Network {
    fn from(n: NetworkChoice) -> Network {
        match n {
            NetworkChoice::Bitcoin => Network::Bitcoin,
            NetworkChoice::Testnet => Network::Testnet,
            NetworkChoice::Testnet4 => Network::Testnet4,
            NetworkChoice::Signet => Network::Signet,
            NetworkChoice::Regtest => Network::Regtest,
        }
    }
}

/// Flags of `bitmesh run`.
#[derive(Args, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// TOML file with any of these settings (keys are flag names with `_`); flags on the
    /// command line override it. [default: none]
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    // --- network and kernel ---
    /// Client-facing interface the meter attaches to (e.g. wlan0, or a bridge). Required.
    #[arg(long, value_name = "IFACE")]
    pub iface: Option<String>,
    /// Upload hook: auto (native XDP if the driver has it, else TC), xdp (native only),
    /// xdp-generic (XDP on the skb, any driver), or tc (tcx/clsact ingress).
    #[arg(long, value_enum, default_value = "auto")]
    pub hook: HookChoice,
    /// bpffs directory where maps are pinned so counters survive a restart.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/bitmesh")]
    pub pin_dir: PathBuf,
    /// Let unpaid clients use DNS on the gateway (walled garden): true or false.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_allowed: bool,
    /// Drop a paying client's billable upload frames that do not come from the address
    /// it paid from (MAC-cloning defence; false only counts and warns): true or false.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub enforce_bound_ip: bool,

    // --- client API ---
    /// Address the client API listens on. By default it listens only on the --iface
    /// address, bound to that interface (SO_BINDTODEVICE), so the upstream side
    /// never reaches it, plus 127.0.0.1 for the operator. Given explicitly (e.g.
    /// 0.0.0.0), it listens there and nowhere else. [default: the --iface address]
    #[arg(long, value_name = "IP")]
    pub api_addr: Option<IpAddr>,
    /// TCP port of the client API; the kernel lets unpaid clients reach it.
    #[arg(long, value_name = "PORT", default_value_t = 3141)]
    pub api_port: u16,
    /// Largest request body the API accepts, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Time limit for one API request, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub request_timeout_secs: u64,
    /// Open API connections, all clients together; more are answered 503 and closed.
    /// Needs this many file descriptors plus about 128 (see LimitNOFILE).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub api_max_connections: usize,
    /// Open API connections of one client (by MAC, else IP); more are answered 429
    /// and closed.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub api_max_connections_per_client: usize,
    /// Time a connection has to send its request headers, and the longest it may
    /// sit idle between requests, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub api_header_timeout_secs: u64,
    /// Close an API connection after this long without a byte read or written, in
    /// seconds (event streams send every second, so they stay open).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub api_idle_timeout_secs: u64,
    /// Requests per minute one client (by MAC, else IP) may make (burst: the same number).
    #[arg(long, value_name = "N", default_value_t = 600)]
    pub rate_limit_per_min: u32,
    /// Funding transactions per hour one client may ask the gateway to relay.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub relay_limit_per_hour: u32,
    /// Largest funding transaction the relay accepts, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 10_000)]
    pub relay_max_tx_bytes: usize,

    // --- captive portal ---
    /// Answer an unpaid client's plain HTTP (TCP 80, any address) with a redirect to
    /// the portal page and refuse its HTTPS (443) with a reset, so phones open their
    /// sign-in sheet; installs the nftables table `bitmesh_portal` (needs the TC upload
    /// hook: with XDP, unpaid HTTP is only dropped): true or false.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub portal: bool,
    /// TCP port of the redirect listener on the --iface address (intercepted port 80
    /// is DNATed here; unpaid clients cannot reach it directly).
    #[arg(long, value_name = "PORT", default_value_t = 3142)]
    pub portal_port: u16,
    /// The venue's name, shown on the portal page.
    #[arg(long, value_name = "NAME", default_value = "BitMesh WiFi")]
    pub venue: String,
    /// RFC 8908 venue-info-url: a page about the venue. [default: none]
    #[arg(long, value_name = "URL")]
    pub venue_info_url: Option<String>,
    /// Host name in the portal and API URLs given to clients (RFC 8908
    /// user-portal-url); with --tls-cert it must be a name on the certificate and
    /// resolve to the --iface address on the client side. [default: the --iface address]
    #[arg(long, value_name = "NAME")]
    pub portal_host: Option<String>,
    /// PEM certificate chain: serve the API and the page over HTTPS too (same port;
    /// plain HTTP keeps working for `bitmesh pay`). Needs --tls-key. [default: none]
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert. [default: none]
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    // --- operator ---
    /// Root-only unix socket for the operator CLI (created with mode 0600).
    #[arg(long, value_name = "PATH", default_value = "/run/bitmesh/admin.sock")]
    pub admin_socket: PathBuf,
    /// Address for Prometheus metrics (GET /metrics); "off" to disable.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,
    /// Address the gateway's share of every close is paid to. [default: a key derived
    /// from the gateway's seed (index 2^31-1), logged at start]
    #[arg(long, value_name = "ADDRESS")]
    pub payout_address: Option<String>,
    /// Directory for the SQLite store and the gateway's key seed.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/bitmesh")]
    pub data_dir: PathBuf,

    // --- price and channel policy ---
    /// Price of data for new channels, in millisatoshis per MiB (1000 = 1 sat/MiB).
    #[arg(long, value_name = "MSAT", default_value_t = 1000)]
    pub price_msat_per_mib: u64,
    /// Bytes one prepaid update should buy ahead of use (the client's chunk), in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 4 * 1024 * 1024)]
    pub chunk_bytes: u64,
    /// Push a low-water event when a client's remaining budget falls below this, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    pub low_water_bytes: u64,
    /// Smallest channel capacity accepted, in satoshis.
    #[arg(long, value_name = "SAT", default_value_t = 10_000)]
    pub min_channel_sat: u64,
    /// Largest channel capacity accepted, in satoshis.
    #[arg(long, value_name = "SAT", default_value_t = 1_000_000)]
    pub max_channel_sat: u64,
    /// Shortest accepted expiry, in blocks above the tip at open.
    #[arg(long, value_name = "BLOCKS", default_value_t = 144)]
    pub min_expiry_blocks: u32,
    /// Longest accepted expiry, in blocks above the tip at open.
    #[arg(long, value_name = "BLOCKS", default_value_t = 4032)]
    pub max_expiry_blocks: u32,
    /// Stop crediting and close this many blocks before a channel's expiry, in blocks.
    #[arg(long, value_name = "BLOCKS", default_value_t = 36)]
    pub close_margin_blocks: u32,
    /// Confirmations a funding transaction needs (above the zero-conf cap), in blocks.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub confirmations: u32,
    /// Largest channel accepted before its funding confirms, in satoshis (0 = never).
    #[arg(long, value_name = "SAT", default_value_t = 50_000)]
    pub zero_conf_cap_sat: u64,
    /// Most the gateway credits across ALL channels whose funding has not confirmed
    /// yet, in satoshis (each such channel reserves its first payment plus one chunk);
    /// further unconfirmed funding waits for confirmations.
    #[arg(long, value_name = "SAT", default_value_t = 20_000)]
    pub zero_conf_exposure_sat: u64,
    /// Close a channel whose client sent no traffic for this long, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub idle_timeout_secs: u64,
    /// An offered channel not funded within this long expires (becomes abandoned),
    /// so unfunded offers do not pile up as live rows, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 7200)]
    pub offer_ttl_secs: u64,
    /// Fee rate closes are planned at (and the first payment must cover), in sat/vB.
    #[arg(long, value_name = "SAT/VB", default_value_t = 2)]
    pub close_fee_rate_sat_vb: u64,
    /// Highest fee rate a fee bump may reach, in sat/vB.
    #[arg(long, value_name = "SAT/VB", default_value_t = 50)]
    pub max_fee_rate_sat_vb: u64,
    /// Bump a settlement's fee after this many blocks without confirmation, in blocks.
    #[arg(long, value_name = "BLOCKS", default_value_t = 3)]
    pub bump_after_blocks: u32,
    /// How often USAGE is snapshotted to the store (restored after a reboot), in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub snapshot_interval_secs: u64,

    // --- chain ---
    /// Bitcoin network.
    #[arg(long, value_enum, default_value = "bitcoin")]
    pub network: NetworkChoice,
    /// Chain backend: bitcoind (JSON-RPC) or esplora (HTTP).
    #[arg(long, value_enum, default_value = "bitcoind")]
    pub chain: ChainChoice,
    /// Bitcoin Core RPC URL (with --chain bitcoind).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8332")]
    pub rpc_url: String,
    /// Bitcoin Core cookie file (with --chain bitcoind); used unless --rpc-user is given. [default: none]
    #[arg(long, value_name = "FILE")]
    pub rpc_cookie: Option<PathBuf>,
    /// Bitcoin Core RPC user (with --rpc-password). [default: none]
    #[arg(long, value_name = "USER")]
    pub rpc_user: Option<String>,
    /// Bitcoin Core RPC password; prefer the environment variable. [default: none]
    #[arg(long, value_name = "PASS", env = "BITMESH_RPC_PASSWORD", hide_env_values = true)]
    pub rpc_password: Option<String>,
    /// Esplora API base URL (with --chain esplora).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:3002")]
    pub esplora_url: String,
    /// How often the chain tip is polled, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub chain_poll_secs: u64,

    // --- Lightning (docs/operator.md, "Lightning") ---
    /// Run the embedded Lightning node (data under --data-dir/lightning) and sell
    /// bundles for Lightning payments. [default: off]
    #[arg(long)]
    pub lightning: bool,
    /// Address the Lightning node accepts peers on.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:9735")]
    pub lightning_listen: String,
    /// The Lightning node's alias (at most 32 bytes), also named in invoices.
    #[arg(long, value_name = "NAME", default_value = "BitMesh")]
    pub lightning_alias: String,
    /// Bundles sold for Lightning, priced at --price-msat-per-mib (rounded up to a sat).
    #[arg(long, value_name = "SIZES", default_value = "50MiB,200MiB,1GiB")]
    pub bundles: String,
    /// Lightning credit expires this long after the device's last purchase (e.g. 24h, 90m).
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    pub lightning_credit_ttl: String,
    /// LSPS2 liquidity provider: invoices ask it for a just-in-time channel, so a node
    /// without inbound liquidity can be paid. [default: none]
    #[arg(long, value_name = "NODE_ID@HOST:PORT")]
    pub lsp: Option<String>,
    /// Token the LSP asked for (with --lsp). [default: none]
    #[arg(long, value_name = "TOKEN")]
    pub lsp_token: Option<String>,
    /// On-chain reserve kept per anchor channel for fee bumps at a force close, in sat
    /// (a fresh node with no on-chain funds refuses inbound channels unless this is 0).
    #[arg(long, value_name = "SAT", default_value_t = 0)]
    pub lightning_anchor_reserve_sat: u64,
    /// How long an invoice may be paid, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub invoice_expiry_secs: u32,
}

impl RunArgs {
    /// Parse `run`'s matches and merge the TOML file named by `--config`, if any.
    /// A flag given on the command line (or via its environment variable) wins over the file.
    pub fn from_matches(matches: &ArgMatches) -> Result<RunArgs, ConfigError> {
        let args = RunArgs::from_arg_matches(matches).map_err(|e| ConfigError::Value {
            flag: "config",
            message: e.to_string(),
        })?;
        let Some(path) = args.config.clone() else { return Ok(args) };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let explicit = |id: &str| {
            matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
        };
        args.merge_file(&path, &text, explicit)
    }

    /// Overlay `text` (TOML) on these args, except keys for which `explicit(key)` is true.
    pub fn merge_file(
        self,
        path: &Path,
        text: &str,
        explicit: impl Fn(&str) -> bool,
    ) -> Result<RunArgs, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: path.to_owned(), message };
        let file: toml::Table = text.parse().map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        let mut merged = match toml::Value::try_from(&self).map_err(|e| invalid(e.to_string()))? {
            toml::Value::Table(t) => t,
            _ => return Err(invalid("flags did not serialize to a table".into())),
        };
        for (k, v) in file {
            if !explicit(&k) {
                merged.insert(k, v);
            }
        }
        let config = self.config;
        let mut out: RunArgs =
            toml::Value::Table(merged).try_into().map_err(|e: toml::de::Error| invalid(e.to_string()))?;
        out.config = config;
        Ok(out)
    }

    /// Check and convert into the typed policy the controller runs with.
    pub fn policy(&self) -> Result<Policy, ConfigError> {
        let bad = |flag, message: &str| ConfigError::Value { flag, message: message.to_owned() };
        let price = PriceMsatPerMib::new(self.price_msat_per_mib)
            .map_err(|e| bad("price-msat-per-mib", &e.to_string()))?;
        if self.min_channel_sat > self.max_channel_sat {
            return Err(bad("min-channel-sat", "must not exceed --max-channel-sat"));
        }
        if self.min_expiry_blocks > self.max_expiry_blocks {
            return Err(bad("min-expiry-blocks", "must not exceed --max-expiry-blocks"));
        }
        if self.close_margin_blocks >= self.min_expiry_blocks {
            return Err(bad("close-margin-blocks", "must be below --min-expiry-blocks, or channels close at open"));
        }
        if self.chunk_bytes == 0 {
            return Err(bad("chunk-bytes", "must be at least 1"));
        }
        if self.close_fee_rate_sat_vb < 1 {
            return Err(bad("close-fee-rate-sat-vb", "must be at least 1 sat/vB (the relay minimum), or closes never confirm"));
        }
        if self.close_fee_rate_sat_vb > self.max_fee_rate_sat_vb {
            return Err(bad("close-fee-rate-sat-vb", "must not exceed --max-fee-rate-sat-vb"));
        }
        let fee = |flag, v: u64| FeeRate::from_sat_per_vb(v).ok_or_else(|| bad(flag, "is too large"));
        Ok(Policy {
            network: self.network.into(),
            price,
            chunk: ByteCount(self.chunk_bytes),
            low_water: ByteCount(self.low_water_bytes),
            limits: ChannelLimits {
                min_capacity: Amount::from_sat(self.min_channel_sat),
                max_capacity: Amount::from_sat(self.max_channel_sat),
                zero_conf_cap: Amount::from_sat(self.zero_conf_cap_sat),
                confirmations_required: self.confirmations,
                min_expiry_blocks: BlockCount(self.min_expiry_blocks),
                max_expiry_blocks: BlockCount(self.max_expiry_blocks),
                close_margin_blocks: BlockCount(self.close_margin_blocks),
                close_fee_rate: fee("close-fee-rate-sat-vb", self.close_fee_rate_sat_vb)?,
            },
            zero_conf_exposure: Amount::from_sat(self.zero_conf_exposure_sat),
            chain_stale_after: chain_stale_after(self.chain_poll_secs),
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_secs),
            offer_ttl: std::time::Duration::from_secs(self.offer_ttl_secs),
            max_fee_rate: fee("max-fee-rate-sat-vb", self.max_fee_rate_sat_vb)?,
            bump_after_blocks: BlockCount(self.bump_after_blocks),
        })
    }

    /// The payout script from `--payout-address`, checked against `--network`;
    /// `None` when the flag is absent (the seed-derived key is used).
    pub fn payout_script(&self) -> Result<Option<ScriptBuf>, ConfigError> {
        let Some(text) = &self.payout_address else { return Ok(None) };
        let bad = |message: String| ConfigError::Value { flag: "payout-address", message };
        let addr: Address<NetworkUnchecked> = text.parse().map_err(|e| bad(format!("{text:?} is not an address: {e}")))?;
        let network: Network = self.network.into();
        let addr = addr
            .require_network(network)
            .map_err(|_| bad(format!("{text} is not an address on {network} (--network)")))?;
        Ok(Some(addr.script_pubkey()))
    }

    /// The client API's explicit socket address (`--api-addr`), or `None` for the
    /// default (the --iface address, bound to the interface, plus loopback).
    /// The API's base URL as clients reach it (`https://` with --tls-cert), on
    /// --portal-host or the gateway's client-side address `gateway`.
    pub fn api_base_url(&self, gateway: Ipv4Addr) -> String {
        let scheme = if self.tls_cert.is_some() { "https" } else { "http" };
        let host = self.portal_host.clone().unwrap_or_else(|| gateway.to_string());
        format!("{scheme}://{host}:{}", self.api_port)
    }

    /// The certificate and key for HTTPS, if both are given; one without the other
    /// is an error.
    pub fn tls_files(&self) -> Result<Option<(&Path, &Path)>, ConfigError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Ok(Some((c, k))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(ConfigError::Value { flag: "tls-key", message: "--tls-cert needs --tls-key (the certificate's PEM private key)".into() }),
            (None, Some(_)) => Err(ConfigError::Value { flag: "tls-cert", message: "--tls-key needs --tls-cert (the PEM certificate chain)".into() }),
        }
    }

    /// RFC 8908 `user-portal-url`: the portal page.
    pub fn portal_url(&self, gateway: Ipv4Addr) -> String {
        format!("{}{}", self.api_base_url(gateway), bitmesh_common::wire::routes::PORTAL)
    }

    pub fn api_socket(&self) -> Option<SocketAddr> {
        self.api_addr.map(|a| SocketAddr::new(a, self.api_port))
    }

    /// The API's connection limits, checked.
    pub fn conn_limits(&self) -> Result<ConnLimits, ConfigError> {
        let bad = |flag, message: &str| ConfigError::Value { flag, message: message.to_owned() };
        if self.api_max_connections == 0 {
            return Err(bad("api-max-connections", "must be at least 1"));
        }
        if self.api_max_connections_per_client == 0 {
            return Err(bad("api-max-connections-per-client", "must be at least 1"));
        }
        if self.api_header_timeout_secs == 0 {
            return Err(bad("api-header-timeout-secs", "must be at least 1"));
        }
        if self.api_idle_timeout_secs == 0 {
            return Err(bad("api-idle-timeout-secs", "must be at least 1"));
        }
        Ok(ConnLimits {
            max_connections: self.api_max_connections,
            max_per_client: self.api_max_connections_per_client,
            header_timeout: std::time::Duration::from_secs(self.api_header_timeout_secs),
            idle_timeout: std::time::Duration::from_secs(self.api_idle_timeout_secs),
        })
    }

    /// The metrics address, or `None` when disabled.
    pub fn metrics_socket(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics_addr == "off" {
            return Ok(None);
        }
        self.metrics_addr
            .parse()
            .map(Some)
            .map_err(|_| ConfigError::Value { flag: "metrics-addr", message: "expected ADDR:PORT or off".into() })
    }

    /// The interface, which must be given by flag or file.
    pub fn iface(&self) -> Result<&str, ConfigError> {
        self.iface.as_deref().ok_or(ConfigError::NoIface)
    }
}

/// The channel and price policy in domain types (what `gateway` decides with).
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub network: Network,
    /// Price for new channels (the operator may change it at runtime).
    pub price: PriceMsatPerMib,
    pub chunk: ByteCount,
    pub low_water: ByteCount,
    /// The channel limits the terms announce and the channel library checks.
    pub limits: ChannelLimits,
    /// Cap on what all unconfirmed channels together may be credited.
    pub zero_conf_exposure: Amount,
    /// A chain tip older than this stops payments and opens (`chain_unavailable`).
    pub chain_stale_after: std::time::Duration,
    pub idle_timeout: std::time::Duration,
    /// How long an unfunded offer stays valid (`--offer-ttl-secs`).
    pub offer_ttl: std::time::Duration,
    pub max_fee_rate: FeeRate,
    pub bump_after_blocks: BlockCount,
}

/// How old the last successful tip read may be before payments and opens stop:
/// 12 polls, at least 60 s. Short against a block (600 s) and against the close
/// margin (hours), so a dead backend never lets the gateway credit past a
/// channel's deadline or skip the double-spend check; long enough that one slow
/// RPC answer does not stop payments.
pub fn chain_stale_after(chain_poll_secs: u64) -> std::time::Duration {
    std::time::Duration::from_secs(chain_poll_secs.max(1).saturating_mul(12).max(60))
}

/// Default listen address for tests and docs.
pub const DEFAULT_API_PORT: u16 = 3141;
/// Loopback, for tests.
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(argv: &[&str]) -> (RunArgs, ArgMatches) {
        let m = Cli::command().try_get_matches_from(argv).unwrap();
        (RunArgs::from_arg_matches(&m).unwrap(), m)
    }

    #[test]
    fn every_flag_help_states_a_default_or_is_required() {
        let cmd = Cli::command();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "iface" {
                continue;
            }
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let has_default = !arg.get_default_values().is_empty() || help.contains("[default:");
            assert!(has_default, "--{id} has no default in its help");
        }
    }

    #[test]
    fn defaults_make_a_valid_policy() {
        let (args, _) = parse(&["x", "--iface", "wlan0"]);
        let p = args.policy().unwrap();
        assert_eq!(args.api_port, DEFAULT_API_PORT);
        assert_eq!(p.price.to_msat(), 1000);
        assert_eq!(args.iface().unwrap(), "wlan0");
    }

    #[test]
    fn bound_ip_is_enforced_unless_turned_off() {
        let (args, _) = parse(&["x", "--iface", "wlan0"]);
        assert!(args.enforce_bound_ip);
        let (args, _) = parse(&["x", "--iface", "wlan0", "--enforce-bound-ip", "false"]);
        assert!(!args.enforce_bound_ip);
    }

    #[test]
    fn flags_override_the_config_file() {
        let (args, m) = parse(&["x", "--price-msat-per-mib", "5000"]);
        let file = "iface = \"br0\"\nprice_msat_per_mib = 7000\nchunk_bytes = 1024\n";
        let explicit =
            |id: &str| matches!(m.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable));
        let merged = args.merge_file(Path::new("f.toml"), file, explicit).unwrap();
        assert_eq!(merged.price_msat_per_mib, 5000, "flag wins");
        assert_eq!(merged.chunk_bytes, 1024, "file beats default");
        assert_eq!(merged.iface.as_deref(), Some("br0"));
    }

    #[test]
    fn unknown_key_in_config_file_is_an_error() {
        let (args, _) = parse(&["x"]);
        let err = args.merge_file(Path::new("f.toml"), "prise = 1\n", |_| false).unwrap_err();
        assert!(err.to_string().contains("prise"), "{err}");
    }

    #[test]
    fn payout_address_must_be_on_the_network() {
        let (args, _) = parse(&["x", "--network", "regtest", "--payout-address", "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"]);
        assert!(args.payout_script().unwrap().is_some());
        let (args, _) = parse(&["x", "--payout-address", "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"]);
        assert!(args.payout_script().unwrap_err().to_string().contains("--payout-address"));
        let (args, _) = parse(&["x", "--hook", "xdp-generic"]);
        assert_eq!(args.hook, HookChoice::XdpGeneric);
        let (args, _) = parse(&["x"]);
        assert_eq!(args.payout_script().unwrap(), None);
    }

    #[test]
    fn inconsistent_policy_names_the_flag() {
        let (args, _) = parse(&["x", "--min-channel-sat", "10", "--max-channel-sat", "5"]);
        assert!(args.policy().unwrap_err().to_string().contains("--min-channel-sat"));
        let (args, _) = parse(&["x"]);
        assert!(matches!(args.iface(), Err(ConfigError::NoIface)));
        let (args, _) = parse(&["x", "--close-fee-rate-sat-vb", "0"]);
        assert!(args.policy().unwrap_err().to_string().contains("--close-fee-rate-sat-vb"));
        let (args, _) = parse(&["x", "--api-max-connections-per-client", "0"]);
        assert!(args.conn_limits().unwrap_err().to_string().contains("--api-max-connections-per-client"));
    }

    #[test]
    fn api_listens_on_the_client_interface_unless_told_otherwise() {
        let (args, _) = parse(&["x", "--iface", "wlan0"]);
        assert_eq!(args.api_socket(), None);
        let limits = args.conn_limits().unwrap();
        assert_eq!((limits.max_connections, limits.max_per_client), (256, 8));
        let (args, _) = parse(&["x", "--api-addr", "0.0.0.0"]);
        assert_eq!(args.api_socket(), Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_API_PORT)));
    }
}
