//! The controller's durable state in SQLite: channels, the append-only payment
//! journal, usage snapshots, settlements, client bindings and runtime settings.
//!
//! Durability: the database runs in WAL mode with `synchronous=FULL`, so a
//! committed transaction is on disk (the WAL is fsynced) when `commit` returns.
//! Every write method here is one transaction, so when it returns `Ok` the change
//! survives a crash or power cut. The gateway relies on this for the rule
//! "persist before credit, persist before ack".
//!
//! The API is synchronous (rusqlite); async callers run it on a blocking thread.

mod channels;
mod lightning;
mod payments;
mod schema;
mod settlements;
mod usage;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

pub use lightning::{
    LnAccount, LnInvoiceRecord, LnReceipt, LnSettle, LnTotals, NewLnInvoice, PaymentHash, ReceiptOutcome, TokenHash,
};
pub use channels::{ChannelRecord, ChannelStage, CloseReason, FinalUsage, Funding, NewChannel};
pub use payments::{AppendOutcome, NewPayment, PaymentRecord};
pub use schema::SCHEMA_VERSION;
pub use settlements::{Earnings, NewSettlement, SettlementRecord, SettlementState};
pub use bitmesh_common::pricing::{ByteCount, PriceMsatPerMib};
pub use bitmesh_common::wire::ChannelId;
pub use usage::{ClientBinding, UsageSnapshot};

/// Errors from the store. Each says what the operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database at {path}: {source}; check that --data-dir exists and is writable by root")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create or restrict {path} to mode 0600: {source}; check that --data-dir is writable by root")]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the database schema is version {found} but this bitmesh supports up to {supported}; run a newer bitmesh")]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("database error: {0}; the data directory may be full or damaged")]
    Sqlite(#[from] rusqlite::Error),
    #[error("a previous database operation panicked; restart the controller")]
    Poisoned,
    #[error("channel {0} is not in the store")]
    UnknownChannel(ChannelId),
    #[error("channel {channel}: paid total {offered_sat} sat is not above the last stored total {last_sat} sat")]
    NotIncreasing { channel: ChannelId, offered_sat: u64, last_sat: u64 },
    #[error("channel {channel} is {state}: only an offered channel can be funded")]
    NotOffered { channel: ChannelId, state: ChannelStage },
    #[error("funding outpoint {0} already belongs to another channel")]
    OutpointInUse(bitcoin::OutPoint),
    #[error("settlement {0} is not in the store")]
    UnknownSettlement(i64),
    #[error("corrupt value in column {column}: {detail}; the database was edited by hand or is damaged")]
    Corrupt { column: &'static str, detail: String },
}

/// A handle to the controller's database. Cheap to share behind an `Arc`.
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl Store {
    /// The database file inside a data directory.
    pub fn path_in(data_dir: &Path) -> PathBuf {
        data_dir.join("bitmesh.sqlite3")
    }

    /// Open (creating if needed) the database at `path`, set WAL + synchronous=FULL
    /// and migrate it to the current schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: path.to_owned(), source };
        // Created 0600 before SQLite opens it: SQLite gives the -wal and -shm files
        // the database file's mode, so the journal is never readable by others.
        create_private(path)?;
        let mut conn = Connection::open(path).map_err(open_err)?;
        // WAL: readers (CLI queries) never block the payment path's writer.
        // synchronous=FULL: the WAL is fsynced at every commit, so an acknowledged
        // payment survives power loss, not only a process crash.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt { column: "journal_mode", detail: format!("expected wal, got {mode}") });
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;")
            .map_err(open_err)?;
        schema::migrate(&mut conn)?;
        // Tighten files a bitmesh before this rule created (mode from the umask).
        for file in [path.to_owned(), sibling(path, "-wal"), sibling(path, "-shm")] {
            if file.exists() {
                make_private(&file)?;
            }
        }
        Ok(Store { conn: Mutex::new(conn), path: path.to_owned() })
    }

    /// Where this store lives on disk.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Read a runtime setting.
    pub fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let conn = self.conn()?;
        usage::setting(&conn, key)
    }

    /// Write a runtime setting (durably).
    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let conn = self.conn()?;
        usage::set_setting(&conn, key, value)
    }

    /// Forget a runtime setting (durably); the flag or config value applies again.
    pub fn delete_setting(&self, key: &str) -> Result<(), StoreError> {
        let conn = self.conn()?;
        usage::delete_setting(&conn, key)
    }
}

/// `path` with `suffix` appended to its file name (SQLite's `-wal`, `-shm`).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Create `path` with mode 0600 if it does not exist.
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Permissions { path: path.to_owned(), source: e }),
    }
}

/// Set mode 0600 on an existing file.
fn make_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| StoreError::Permissions { path: path.to_owned(), source })
}

/// Seconds since the Unix epoch (wall clock: only for display and idle timers;
/// settlement decisions use block heights).
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

pub(crate) fn corrupt(column: &'static str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { column, detail: detail.to_string() }
}

/// Convert a conversion failure inside a row mapper into a rusqlite error, so
/// row-reading closures can use `?` on our own parsers.
pub(crate) fn col_err(idx: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
}

#[cfg(test)]
mod tests;
