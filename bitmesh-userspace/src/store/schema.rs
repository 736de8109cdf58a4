//! Schema and migrations, versioned with SQLite's `user_version`.
//!
//! Each migration runs once, in order, inside one transaction together with the
//! `user_version` bump, so a crash mid-migration leaves the previous version intact.

use rusqlite::Connection;

use super::StoreError;

/// Migration N (1-based) brings the schema from version N-1 to N. Append only:
/// never edit a migration that has shipped, add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE channels (
        id                 TEXT PRIMARY KEY,
        mac                TEXT NOT NULL,
        ip                 TEXT NOT NULL,
        client_pubkey      BLOB NOT NULL,
        client_change_script BLOB NOT NULL,
        gateway_key_index  INTEGER NOT NULL UNIQUE,
        gateway_pubkey     BLOB NOT NULL,
        expiry_height      INTEGER NOT NULL,
        price_msat_per_mib INTEGER NOT NULL,
        chunk_bytes        INTEGER NOT NULL,
        state              TEXT NOT NULL,
        funding_txid       TEXT,
        funding_vout       INTEGER,
        capacity_sat       INTEGER,
        funding_height     INTEGER,
        close_reason       TEXT,
        settlement_id      INTEGER,
        opened_at          INTEGER NOT NULL,
        last_activity_at   INTEGER NOT NULL
    );
    -- One channel per funding outpoint (NULLs, i.e. unfunded offers, are distinct).
    CREATE UNIQUE INDEX channels_outpoint ON channels(funding_txid, funding_vout);
    CREATE INDEX channels_mac ON channels(mac);
    CREATE INDEX channels_state ON channels(state);

    -- The payment journal: append-only. A row is the client's signature over the
    -- close transaction paying `paid_total_sat` to the gateway; it is written and
    -- synced before any byte is credited for it.
    CREATE TABLE payments (
        channel_id      TEXT NOT NULL REFERENCES channels(id),
        sequence        INTEGER NOT NULL,
        paid_total_sat  INTEGER NOT NULL,
        client_change_sat INTEGER NOT NULL,
        signature       BLOB NOT NULL,
        credited_bytes  INTEGER NOT NULL,
        received_at     INTEGER NOT NULL,
        PRIMARY KEY (channel_id, sequence),
        UNIQUE (channel_id, paid_total_sat)
    );
    CREATE TRIGGER payments_no_update BEFORE UPDATE ON payments
    BEGIN SELECT RAISE(ABORT, 'the payment journal is append-only'); END;
    CREATE TRIGGER payments_no_delete BEFORE DELETE ON payments
    BEGIN SELECT RAISE(ABORT, 'the payment journal is append-only'); END;

    -- Latest kernel USAGE per MAC, so a reboot (maps lost) restores the counters.
    CREATE TABLE usage_snapshots (
        mac         TEXT PRIMARY KEY,
        up_bytes    INTEGER NOT NULL,
        down_bytes  INTEGER NOT NULL,
        up_pkts     INTEGER NOT NULL,
        down_pkts   INTEGER NOT NULL,
        last_seen_ns INTEGER NOT NULL,
        taken_at    INTEGER NOT NULL
    );

    CREATE TABLE settlements (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        txid             TEXT NOT NULL UNIQUE,
        raw_tx           BLOB NOT NULL,
        state            TEXT NOT NULL,
        fee_sat          INTEGER NOT NULL,
        gateway_payout_sat INTEGER NOT NULL,
        broadcast_height INTEGER NOT NULL,
        confirmed_height INTEGER,
        replaces         INTEGER REFERENCES settlements(id),
        created_at       INTEGER NOT NULL
    );
    CREATE TABLE settlement_channels (
        settlement_id INTEGER NOT NULL REFERENCES settlements(id),
        channel_id    TEXT NOT NULL REFERENCES channels(id),
        PRIMARY KEY (settlement_id, channel_id)
    );

    -- Which IP a MAC was last seen with (the binding the API authenticates against).
    CREATE TABLE client_bindings (
        mac          TEXT PRIMARY KEY,
        ip           TEXT NOT NULL,
        last_seen_at INTEGER NOT NULL
    );

    -- Runtime settings the operator changed (e.g. price for new channels).
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    "#,
    // 2: the first-payment minimum is part of the channel's terms (fixed at open).
    r#"
    ALTER TABLE channels ADD COLUMN min_first_payment_sat INTEGER NOT NULL DEFAULT 0;
    "#,
    // 3: what the kernel had billed a channel's client when metering stopped (the
    // channel started closing), so the operator still sees it once the maps forget it.
    r#"
    ALTER TABLE channels ADD COLUMN final_up_bytes INTEGER;
    ALTER TABLE channels ADD COLUMN final_down_bytes INTEGER;
    "#,
    // 4: Lightning (docs/design.md section 5.7). Accounts are named by the hash of
    // the device's purchase token; invoices are recorded before they are shown;
    // receipts are the append-only journal, one per payment hash; `ln_meter` keeps,
    // per MAC, how much of the kernel's USAGE count is already accounted for.
    r#"
    CREATE TABLE ln_accounts (
        token_hash    TEXT PRIMARY KEY,
        nonce         TEXT NOT NULL UNIQUE,
        mac           TEXT UNIQUE,
        bytes_in      INTEGER NOT NULL DEFAULT 0,
        bytes_out     INTEGER NOT NULL DEFAULT 0,
        bytes_expired INTEGER NOT NULL DEFAULT 0,
        expires_at    INTEGER NOT NULL,
        created_at    INTEGER NOT NULL
    );
    CREATE TABLE ln_invoices (
        payment_hash TEXT PRIMARY KEY,
        account      TEXT NOT NULL REFERENCES ln_accounts(token_hash),
        mac          TEXT NOT NULL,
        bytes        INTEGER NOT NULL,
        amount_msat  INTEGER NOT NULL,
        bolt11       TEXT NOT NULL,
        expires_at   INTEGER NOT NULL,
        created_at   INTEGER NOT NULL
    );
    CREATE INDEX ln_invoices_account ON ln_invoices(account);
    CREATE TABLE ln_receipts (
        payment_hash   TEXT PRIMARY KEY,
        account        TEXT REFERENCES ln_accounts(token_hash),
        amount_msat    INTEGER NOT NULL,
        bytes_credited INTEGER NOT NULL,
        received_at    INTEGER NOT NULL
    );
    CREATE TRIGGER ln_receipts_no_update BEFORE UPDATE ON ln_receipts
    BEGIN SELECT RAISE(ABORT, 'the Lightning receipt journal is append-only'); END;
    CREATE TRIGGER ln_receipts_no_delete BEFORE DELETE ON ln_receipts
    BEGIN SELECT RAISE(ABORT, 'the Lightning receipt journal is append-only'); END;
    CREATE TABLE ln_meter (
        mac           TEXT PRIMARY KEY,
        settled_bytes INTEGER NOT NULL
    );
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Bring `conn` up to [`SCHEMA_VERSION`]. Refuses a database written by a newer build.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found: current, supported: SCHEMA_VERSION });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        // PRAGMA cannot take bound parameters; the value is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}
