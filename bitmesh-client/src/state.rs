//! Durable channel state: one JSON file per channel, `<state dir>/<channel id>.json`,
//! mode 0600 in a 0700 directory, replaced atomically (write a temporary file,
//! fsync it, rename over the old one, fsync the directory).
//!
//! The file holds the client's channel key, the channel parameters, the latest
//! signed state and the pre-signed refund. It is written BEFORE each update is sent,
//! so after a crash the agent knows every total it may have handed out, and it can
//! always take its money back after expiry.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bitcoin::secp256k1::SecretKey;
use bitcoin::{absolute, Amount, Network, OutPoint, PublicKey, ScriptBuf, Transaction, Txid};
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::pricing::{ByteCount, PriceMsatPerMib};
use bitmesh_common::wire::{tx_hex, ChannelId, SignatureBytes};
use serde::{Deserialize, Serialize};

use bitmesh_channel::{Channel, ChannelScript};

/// Format version of the state file.
pub const STATE_VERSION: u32 = 1;

/// Where a channel is, from the agent's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Opened; the funding is not yet accepted by the gateway.
    AwaitingFunding,
    /// Funded; payments flow.
    Open,
    /// The agent asked the gateway to close (or the gateway said it closed).
    CloseRequested,
    /// The refund was broadcast.
    Refunded,
}

/// The funding output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FundingRecord {
    /// The channel's outpoint.
    pub outpoint: OutPoint,
    /// Its value.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "capacity_sat")]
    pub capacity: Amount,
    /// The whole funding transaction (to relay again if needed).
    #[serde(with = "tx_hex")]
    pub tx: Transaction,
}

/// The latest update the agent signed (and possibly sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedState {
    /// Cumulative total.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "total_paid_sat")]
    pub total_paid: Amount,
    /// The signature (DER + sighash flag).
    pub signature: SignatureBytes,
    /// Whether the gateway acknowledged it.
    pub acked: bool,
}

/// Everything the agent keeps about one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedChannel {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The gateway's base URL.
    pub gateway: String,
    /// The chain.
    pub network: Network,
    /// The client's channel key (secret: the reason for 0600).
    pub client_secret: SecretKey,
    /// The channel id.
    pub channel_id: ChannelId,
    /// The gateway's key for this channel.
    pub gateway_pubkey: PublicKey,
    /// The client's key.
    pub client_pubkey: PublicKey,
    /// Expiry height.
    pub expiry: absolute::Height,
    /// Where the client's change goes at close.
    pub client_change_script: ScriptBuf,
    /// Where the refund goes.
    pub refund_script: ScriptBuf,
    /// Price of the channel's terms.
    pub price: PriceMsatPerMib,
    /// Chunk size of the terms.
    pub chunk: ByteCount,
    /// First-payment minimum of the terms.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "min_first_payment_sat")]
    pub min_first_payment: Amount,
    /// Blocks before expiry at which the gateway stops crediting.
    pub close_margin_blocks: BlockCount,
    /// The user's spending cap for this channel.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "max_spend_sat")]
    pub max_spend: Amount,
    /// Capacity the agent means to fund.
    #[serde(with = "bitcoin::amount::serde::as_sat", rename = "planned_capacity_sat")]
    pub planned_capacity: Amount,
    /// The funding, once built or seen.
    pub funding: Option<FundingRecord>,
    /// The latest signed update.
    pub latest: Option<SignedState>,
    /// The refund, signed as soon as the funding is known.
    #[serde(with = "opt_tx_hex", default)]
    pub refund_tx: Option<Transaction>,
    /// Bytes the agent counted for this channel so far (carried across restarts).
    pub received: ByteCount,
    /// Where the channel is.
    pub phase: Phase,
    /// The close transaction, when the gateway reported one.
    pub close_txid: Option<Txid>,
}

impl SavedChannel {
    /// The channel's script parameters.
    pub fn script(&self) -> ChannelScript {
        ChannelScript { gateway: self.gateway_pubkey, client: self.client_pubkey, expiry: self.expiry }
    }

    /// The funded channel, for signing (None before funding).
    pub fn channel(&self) -> Option<Channel> {
        let f = self.funding.as_ref()?;
        Some(Channel {
            script: self.script(),
            funding_outpoint: f.outpoint,
            capacity: f.capacity,
            client_change_script: self.client_change_script.clone(),
            min_first_payment: self.min_first_payment,
        })
    }

    /// Total signed so far.
    pub fn paid(&self) -> Amount {
        self.latest.as_ref().map_or(Amount::ZERO, |s| s.total_paid)
    }
}

mod opt_tx_hex {
    use bitcoin::consensus::encode;
    use bitcoin::Transaction;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(tx: &Option<Transaction>, s: S) -> Result<S::Ok, S::Error> {
        match tx {
            Some(tx) => s.serialize_some(&encode::serialize_hex(tx)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Transaction>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|h| encode::deserialize_hex(&h).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A state file or directory that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O on the state directory failed.
    #[error("state {path}: {source}: check the directory exists and is writable by you (--state-dir)")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not a channel record.
    #[error("state file {path} is corrupt ({message}): move it away; if it held a funded channel keep it, it has your refund key")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Another user could read the file.
    #[error("state file {path} has mode {mode:o}, readable by others: chmod 600 it (it holds your channel key)")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Open (creating with mode 0700 if needed) the state directory.
    pub fn open(dir: &Path) -> Result<StateDir, StateError> {
        let io = |source| StateError::Io { path: dir.to_owned(), source };
        fs::create_dir_all(dir).map_err(io)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        Ok(StateDir { dir: dir.to_owned() })
    }

    /// The default: `$BITMESH_STATE_DIR`, else `$XDG_STATE_HOME/bitmesh`, else
    /// `$HOME/.local/state/bitmesh`.
    pub fn default_path() -> PathBuf {
        if let Some(d) = std::env::var_os("BITMESH_STATE_DIR") {
            return PathBuf::from(d);
        }
        if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
            return PathBuf::from(d).join("bitmesh");
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
        home.join(".local/state/bitmesh")
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The file of channel `id`.
    pub fn file(&self, id: &ChannelId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Write `record` atomically (tmp + fsync + rename + fsync dir), mode 0600.
    pub fn save(&self, record: &SavedChannel) -> Result<(), StateError> {
        let path = self.file(&record.channel_id);
        let tmp = self.dir.join(format!(".{}.json.tmp", record.channel_id));
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| StateError::Io { path: p, source }
        };
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| StateError::Corrupt { path: path.clone(), message: e.to_string() })?;
        // A stale tmp from a crash mid-write is garbage: start over.
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
        f.write_all(&json).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }

    /// Read one record, refusing a file others can read.
    pub fn load_file(path: &Path) -> Result<SavedChannel, StateError> {
        let io = |source| StateError::Io { path: path.to_owned(), source };
        let meta = fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(StateError::Permissions { path: path.to_owned(), mode });
        }
        let bytes = fs::read(path).map_err(io)?;
        serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt { path: path.to_owned(), message: e.to_string() })
    }

    /// Every channel record in the directory, oldest file first.
    pub fn all(&self) -> Result<Vec<SavedChannel>, StateError> {
        let io = |source| StateError::Io { path: self.dir.clone(), source };
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".json") && !name.starts_with('.') {
                let modified = entry.metadata().and_then(|m| m.modified()).map_err(io)?;
                files.push((modified, entry.path()));
            }
        }
        files.sort();
        files.into_iter().map(|(_, p)| StateDir::load_file(&p)).collect()
    }

    /// The channel to resume with `gateway`: the newest one still open or awaiting
    /// funding.
    pub fn resumable(&self, gateway: &str) -> Result<Option<SavedChannel>, StateError> {
        Ok(self
            .all()?
            .into_iter()
            .rev()
            .find(|r| r.gateway == gateway && matches!(r.phase, Phase::Open | Phase::AwaitingFunding)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bitcoin::secp256k1::Secp256k1;

    pub(crate) fn record() -> SavedChannel {
        let secp = Secp256k1::new();
        let client_secret = SecretKey::from_slice(&[7; 32]).unwrap();
        let gw = SecretKey::from_slice(&[9; 32]).unwrap();
        let client_pubkey = PublicKey::new(client_secret.public_key(&secp));
        let gateway_pubkey = PublicKey::new(gw.public_key(&secp));
        let expiry = absolute::Height::from_consensus(600).unwrap();
        let script = ChannelScript { gateway: gateway_pubkey, client: client_pubkey, expiry };
        let change = ScriptBuf::new_p2wpkh(&client_pubkey.wpubkey_hash().unwrap());
        SavedChannel {
            version: STATE_VERSION,
            gateway: "http://10.0.0.1:3141".into(),
            network: Network::Regtest,
            client_secret,
            channel_id: script.channel_id(),
            gateway_pubkey,
            client_pubkey,
            expiry,
            client_change_script: change.clone(),
            refund_script: change,
            price: PriceMsatPerMib::from_sat_per_mib(1).unwrap(),
            chunk: ByteCount::from_mib(1),
            min_first_payment: Amount::from_sat(700),
            close_margin_blocks: BlockCount(6),
            max_spend: Amount::from_sat(10_000),
            planned_capacity: Amount::from_sat(20_000),
            funding: None,
            latest: Some(SignedState { total_paid: Amount::from_sat(800), signature: SignatureBytes(vec![0x30, 0x83]), acked: false }),
            refund_tx: None,
            received: ByteCount(12345),
            phase: Phase::Open,
            close_txid: None,
        }
    }

    #[test]
    fn saved_state_is_private_and_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("state")).unwrap();
        let r = record();
        dir.save(&r).unwrap();
        let path = dir.file(&r.channel_id);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(StateDir::load_file(&path).unwrap(), r);
        assert_eq!(dir.resumable("http://10.0.0.1:3141").unwrap(), Some(r.clone()));
        assert_eq!(dir.resumable("http://other:3141").unwrap(), None);
    }

    #[test]
    fn a_later_save_replaces_the_file_and_leaves_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        let mut r = record();
        dir.save(&r).unwrap();
        r.latest = Some(SignedState { total_paid: Amount::from_sat(900), signature: SignatureBytes(vec![1]), acked: true });
        dir.save(&r).unwrap();
        assert_eq!(StateDir::load_file(&dir.file(&r.channel_id)).unwrap().paid(), Amount::from_sat(900));
        let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_world_readable_state_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        let r = record();
        dir.save(&r).unwrap();
        let path = dir.file(&r.channel_id);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(StateDir::load_file(&path), Err(StateError::Permissions { .. })));
    }

    #[test]
    fn closed_channels_are_not_resumed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        let r = SavedChannel { phase: Phase::CloseRequested, ..record() };
        dir.save(&r).unwrap();
        assert_eq!(dir.resumable(&r.gateway).unwrap(), None);
    }
}
