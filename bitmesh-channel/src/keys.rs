//! The gateway's seed file and its per-channel keys.
//!
//! The only I/O in `channel`: reading or creating the seed file. Each channel gets
//! the key at `m/1017'/0'/<index>'` of the BIP32 tree rooted at the seed. Hardened
//! derivation means a leaked channel key reveals neither the seed nor any other
//! channel's key (with non-hardened steps, one child key plus the parent xpub would
//! expose every sibling). The store allocates indices and never reuses one.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bitcoin::bip32::{ChildNumber, Xpriv};
use bitcoin::hex::{DisplayHex, FromHex};
use bitcoin::secp256k1::rand::RngCore;
use bitcoin::secp256k1::{rand, SecretKey};
use bitcoin::{NetworkKind, PublicKey};

use super::secp;

/// Purpose index of the derivation path (`m/1017'/...`), unused by wallet BIPs.
const PURPOSE: u32 = 1017;

/// Why the seed or a key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// Reading or creating the seed file failed.
    #[error("seed file {path}: {source}: check the directory exists and is writable by this user")]
    Io {
        /// The seed file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold 64 hex digits.
    #[error("seed file {path} is not 64 hex digits: restore it from backup or move it away to create a new one (channels keyed by it are then unspendable by the gateway)")]
    Malformed {
        /// The seed file.
        path: PathBuf,
    },
    /// The file is readable by group or others.
    #[error(
        "seed file {path} has mode {mode:o}: run `chmod 600 {path}` (it holds every channel key)"
    )]
    Permissions {
        /// The seed file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// BIP32 derivation failed (index out of range).
    #[error("cannot derive channel key {index}: {source}: use an index below 2^31")]
    Derive {
        /// The channel index.
        index: u32,
        /// The BIP32 error.
        #[source]
        source: bitcoin::bip32::Error,
    },
}

/// A channel's gateway key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelKey {
    /// Index in the derivation path (stored with the channel).
    pub index: u32,
    /// The secret key (signs the close).
    pub secret: SecretKey,
    /// Its public key (goes into the witness script).
    pub public: PublicKey,
}

/// The gateway's BIP32 master key, from the seed file.
#[derive(Clone)]
pub struct GatewaySeed {
    master: Xpriv,
}

impl std::fmt::Debug for GatewaySeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewaySeed(..)") // never print key material
    }
}

impl GatewaySeed {
    /// The master key for a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32], network: impl Into<NetworkKind>) -> Result<Self, KeysError> {
        let master = Xpriv::new_master(network, seed)
            .map_err(|source| KeysError::Derive { index: 0, source })?;
        Ok(GatewaySeed { master })
    }

    /// Load the seed from `path`, creating it (32 random bytes, hex, mode 0600) if it
    /// does not exist. An existing file readable by group or others is refused.
    pub fn load_or_create(path: &Path, network: impl Into<NetworkKind>) -> Result<Self, KeysError> {
        let io = |source| KeysError::Io {
            path: path.to_path_buf(),
            source,
        };
        let seed = match OpenOptions::new().read(true).open(path) {
            Ok(mut file) => {
                let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeysError::Permissions {
                        path: path.to_path_buf(),
                        mode,
                    });
                }
                let mut text = String::new();
                file.read_to_string(&mut text).map_err(io)?;
                <[u8; 32]>::from_hex(text.trim()).map_err(|_| KeysError::Malformed {
                    path: path.to_path_buf(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut seed);
                // create_new: never overwrite a seed that appeared meanwhile; mode 0600
                // is set at creation, so the secret is never readable by others.
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                file.write_all(format!("{}\n", seed.as_hex()).as_bytes())
                    .map_err(io)?;
                file.sync_all().map_err(io)?;
                // Make the new directory entry durable too: a seed lost in a crash
                // after channels were opened with it would strand their funds.
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
                }
                seed
            }
            Err(e) => return Err(io(e)),
        };
        Self::from_seed(&seed, network)
    }

    /// The key of channel `index` (`m/1017'/0'/index'`).
    pub fn channel_key(&self, index: u32) -> Result<ChannelKey, KeysError> {
        let derive = |source| KeysError::Derive { index, source };
        let path = [
            ChildNumber::from_hardened_idx(PURPOSE).map_err(derive)?,
            ChildNumber::from_hardened_idx(0).map_err(derive)?,
            ChildNumber::from_hardened_idx(index).map_err(derive)?,
        ];
        let xpriv = self.master.derive_priv(secp(), &path).map_err(derive)?;
        let secret = xpriv.private_key;
        let public = PublicKey::new(secret.public_key(secp()));
        Ok(ChannelKey {
            index,
            secret,
            public,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a failed test should panic
mod tests {
    use super::*;
    use bitcoin::Network;

    #[test]
    fn seed_file_is_created_private_and_reloads_the_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed");
        let a = GatewaySeed::load_or_create(&path, Network::Regtest).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = GatewaySeed::load_or_create(&path, Network::Regtest).unwrap();
        assert_eq!(a.channel_key(7).unwrap(), b.channel_key(7).unwrap());
    }

    #[test]
    fn every_channel_gets_its_own_key() {
        let seed = GatewaySeed::from_seed(&[9; 32], Network::Regtest).unwrap();
        let k0 = seed.channel_key(0).unwrap();
        let k1 = seed.channel_key(1).unwrap();
        assert_ne!(k0.public, k1.public);
        assert!(k0.public.compressed);
    }

    #[test]
    fn world_readable_seed_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed");
        GatewaySeed::load_or_create(&path, Network::Regtest).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = GatewaySeed::load_or_create(&path, Network::Regtest).unwrap_err();
        assert!(
            matches!(err, KeysError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
    }

    #[test]
    fn malformed_seed_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed");
        fs::write(&path, "not hex").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = GatewaySeed::load_or_create(&path, Network::Regtest).unwrap_err();
        assert!(matches!(err, KeysError::Malformed { .. }));
        assert_eq!(fs::read_to_string(&path).unwrap(), "not hex");
    }

    #[test]
    fn hardened_index_out_of_range_is_an_error() {
        let seed = GatewaySeed::from_seed(&[9; 32], Network::Regtest).unwrap();
        assert!(seed.channel_key(1 << 31).is_err());
    }
}
