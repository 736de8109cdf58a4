//! The embedded Lightning node: ldk-node, built against the controller's own chain
//! backend, with its seed and storage under `<data-dir>/lightning`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use bitcoin::Network;
use ldk_node::bitcoin::secp256k1::PublicKey;
use ldk_node::config::{AnchorChannelsConfig, Config};
use ldk_node::lightning::ln::msgs::SocketAddress;
use ldk_node::lightning_invoice::{Bolt11InvoiceDescription, Description};
use ldk_node::{Builder, Node};

use super::settings::LightningSettings;
use super::LightningError;
use crate::store::PaymentHash;

/// Length of the node's seed file.
const SEED_LEN: usize = 64;

/// How the node reaches the chain: the same backend `bitmesh run` uses.
#[derive(Clone, Debug)]
pub enum NodeChain {
    /// Bitcoin Core RPC (user and password; a cookie file is read into them).
    Bitcoind { host: String, port: u16, user: String, password: String },
    /// An Esplora HTTP API.
    Esplora { url: String },
}

impl NodeChain {
    /// From `--rpc-url` and either the cookie file or user/password.
    pub fn bitcoind(rpc_url: &str, cookie: Option<&Path>, user_pass: Option<(String, String)>) -> Result<NodeChain, LightningError> {
        let rest = rpc_url.trim_start_matches("http://");
        let hostport = rest.split('/').next().unwrap_or(rest);
        let (host, port) = hostport
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| LightningError::Setup(format!("--rpc-url {rpc_url} has no host:port for the Lightning node")))?;
        let (user, password) = match (user_pass, cookie) {
            (Some(up), _) => up,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| LightningError::Setup(format!("cannot read the RPC cookie {}: {e}", path.display())))?;
                let (u, p) = text
                    .trim()
                    .split_once(':')
                    .ok_or_else(|| LightningError::Setup(format!("RPC cookie {} is not user:password", path.display())))?;
                (u.to_owned(), p.to_owned())
            }
            (None, None) => return Err(LightningError::Setup("the Lightning node needs --rpc-cookie or --rpc-user/--rpc-password".into())),
        };
        Ok(NodeChain::Bitcoind { host, port, user, password })
    }
}

/// The node's directory inside the data dir.
pub fn node_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("lightning")
}

/// The node's seed file (64 random bytes, 0600, created once): back it up.
pub fn seed_path(data_dir: &Path) -> PathBuf {
    node_dir(data_dir).join("seed")
}

/// Read the seed, creating it (0600, synced) if absent. Never overwritten.
fn load_or_create_seed(path: &Path) -> Result<[u8; SEED_LEN], LightningError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what: &str, e: std::io::Error| LightningError::Setup(format!("{what} {}: {e}", path.display()));
    match std::fs::read(path) {
        Ok(bytes) => {
            return <[u8; SEED_LEN]>::try_from(bytes.as_slice())
                .map_err(|_| LightningError::Setup(format!("Lightning seed {} is not {SEED_LEN} bytes: restore it from your backup", path.display())));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot read the Lightning seed", e)),
    }
    let mut seed = [0u8; SEED_LEN];
    super::token::random_bytes(&mut seed).map_err(|e| io("no randomness for the Lightning seed", e))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io("cannot create the Lightning seed", e))?;
    f.write_all(&seed).and_then(|_| f.sync_all()).map_err(|e| io("cannot write the Lightning seed", e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("cannot sync the directory of", e))?;
    }
    tracing::warn!(seed = %path.display(), "created a new Lightning seed: back it up (bitmesh lightning export-seed)");
    Ok(seed)
}

/// What `bitmesh run` starts the node with.
pub struct NodeSpec {
    pub data_dir: PathBuf,
    pub network: Network,
    pub chain: NodeChain,
    pub settings: LightningSettings,
}

/// Build and start the node on the current tokio runtime, and return it with the
/// purchase-token key derived from its seed. Blocking: call it from a blocking thread.
pub fn start(spec: NodeSpec, runtime: tokio::runtime::Handle) -> Result<(Arc<Node>, super::token::TokenKey), LightningError> {
    let dir = node_dir(&spec.data_dir);
    std::fs::create_dir_all(&dir).map_err(|e| LightningError::Setup(format!("cannot create {}: {e}", dir.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| LightningError::Setup(format!("cannot make {} private: {e}", dir.display())))?;
    }
    let seed = load_or_create_seed(&seed_path(&spec.data_dir))?;
    let token_key = super::token::TokenKey::from_seed(&seed);
    let s = &spec.settings;
    let config = Config {
        network: spec.network,
        storage_dir_path: dir.to_string_lossy().into_owned(),
        // A fresh gateway node has no on-chain funds; with the default reserve
        // (25,000 sat per anchor channel) it would refuse every inbound channel.
        anchor_channels_config: Some(AnchorChannelsConfig {
            trusted_peers_no_reserve: Vec::new(),
            per_channel_reserve_sats: s.anchor_reserve_sat,
        }),
        ..Config::default()
    };
    let mut builder = Builder::from_config(config);
    builder.set_runtime(runtime);
    builder.set_entropy_seed_bytes(seed);
    builder.set_log_facade_logger();
    let listen = SocketAddress::from_str(&s.listen)
        .map_err(|_| LightningError::Setup(format!("--lightning-listen {} is not HOST:PORT", s.listen)))?;
    builder
        .set_listening_addresses(vec![listen])
        .map_err(|e| LightningError::Setup(format!("--lightning-listen {}: {e}", s.listen)))?;
    builder.set_node_alias(s.alias.clone()).map_err(|e| LightningError::Setup(format!("--lightning-alias: {e}")))?;
    match spec.chain {
        NodeChain::Bitcoind { host, port, user, password } => {
            builder.set_chain_source_bitcoind_rpc(host, port, user, password);
        }
        NodeChain::Esplora { url } => {
            builder.set_chain_source_esplora(url, None);
        }
    }
    if let Some(lsp) = &s.lsp {
        let id = PublicKey::from_str(&lsp.node_id).map_err(|e| LightningError::Setup(format!("--lsp node id: {e}")))?;
        let addr = SocketAddress::from_str(&lsp.address)
            .map_err(|_| LightningError::Setup(format!("--lsp address {} is not HOST:PORT", lsp.address)))?;
        builder.set_liquidity_source_lsps2(id, addr, lsp.token.clone());
    }
    let node = builder.build().map_err(|e| LightningError::Setup(format!("cannot build the Lightning node: {e}")))?;
    node.start().map_err(|e| LightningError::Setup(format!("cannot start the Lightning node: {e}")))?;
    Ok((Arc::new(node), token_key))
}

/// A new invoice as the node made it.
#[derive(Clone, Debug)]
pub struct NewInvoice {
    pub payment_hash: PaymentHash,
    pub bolt11: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// What the gateway needs from a Lightning node (a trait so the gateway's logic is
/// unit-tested without one).
pub trait InvoiceSource: Send + Sync {
    /// The node id, hex.
    fn node_id(&self) -> String;
    /// A BOLT11 invoice for exactly `amount_msat`.
    fn invoice(&self, amount_msat: u64, description: &str, expiry_secs: u32) -> Result<NewInvoice, LightningError>;
}

/// The embedded node as an [`InvoiceSource`]; with an LSP, invoices ask for a
/// just-in-time channel (LSPS2) so the first payments arrive without inbound liquidity.
pub struct LdkInvoices {
    pub node: Arc<Node>,
    pub via_lsp: bool,
}

impl InvoiceSource for LdkInvoices {
    fn node_id(&self) -> String {
        self.node.node_id().to_string()
    }

    fn invoice(&self, amount_msat: u64, description: &str, expiry_secs: u32) -> Result<NewInvoice, LightningError> {
        let desc = Description::new(description.to_owned()).map_err(|e| LightningError::Node(format!("invoice description: {e}")))?;
        let desc = Bolt11InvoiceDescription::Direct(desc);
        let pay = self.node.bolt11_payment();
        let inv = if self.via_lsp {
            pay.receive_via_jit_channel(amount_msat, &desc, expiry_secs, None)
        } else {
            pay.receive(amount_msat, &desc, expiry_secs)
        }
        .map_err(|e| LightningError::Node(format!("the node could not make an invoice: {e}")))?;
        let expires_at = inv.expires_at().map(|d| d.as_secs()).unwrap_or(u64::MAX);
        Ok(NewInvoice {
            payment_hash: PaymentHash(*inv.payment_hash().as_ref()),
            bolt11: inv.to_string(),
            expires_at,
        })
    }
}
