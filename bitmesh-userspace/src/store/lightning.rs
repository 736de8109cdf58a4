//! The Lightning rail's durable state (docs/design.md section 5.7):
//!
//! * `ln_accounts`: a device's Lightning credit, named by the SHA-256 of its purchase
//!   token, on at most one MAC at a time (`UNIQUE(mac)`). Its live bytes are
//!   `bytes_in - bytes_out - bytes_expired`: `in` counts purchases and credit merged
//!   in, `out` what the device used (accounted at settle points) or moved away.
//! * `ln_invoices`: every invoice handed out, recorded (synced) before it is shown.
//! * `ln_receipts`: the append-only journal of claimed payments, one row per payment
//!   hash: a second delivery of the same payment finds its row and credits nothing.
//! * `ln_meter`: per MAC, how many bytes of the kernel's USAGE count are already
//!   accounted for (charged to a channel that ended, or to an account). The kernel
//!   CREDIT of a MAC is `channel credited + settled + live Lightning bytes`.
//!
//! Every write is one transaction (synced), like the rest of the store.

use std::fmt;
use std::str::FromStr;

use bitcoin::hex::{DisplayHex, FromHex};
use bitmesh_common::kernel::Mac;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;

use super::{col_err, Store, StoreError};

/// A Lightning payment hash (the invoice's id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PaymentHash(pub [u8; 32]);

/// The SHA-256 of a purchase token: all the gateway keeps of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

macro_rules! hex32 {
    ($t:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0.as_hex())
            }
        }
        impl FromStr for $t {
            type Err = bitcoin::hex::HexToArrayError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <[u8; 32]>::from_hex(s).map($t)
            }
        }
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}
hex32!(PaymentHash);
hex32!(TokenHash);

/// A Lightning credit account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LnAccount {
    pub token_hash: TokenHash,
    /// The random input the token is derived from with the gateway's token key (so
    /// the gateway can show a device its token again without storing it).
    pub nonce: [u8; 16],
    /// The MAC the credit is on now.
    pub mac: Option<Mac>,
    /// Bytes bought, plus bytes merged in from another account.
    pub bytes_in: u64,
    /// Bytes used (accounted at settle points) or moved to another account.
    pub bytes_out: u64,
    /// Bytes lost at expiry.
    pub bytes_expired: u64,
    /// Unix seconds: the credit expires then (last purchase + TTL).
    pub expires_at: i64,
    pub created_at: i64,
}

impl LnAccount {
    /// Bytes not yet accounted as used, moved or expired. Part of them may already be
    /// used in the kernel count since the last settle point.
    pub fn live(&self) -> u64 {
        self.bytes_in.saturating_sub(self.bytes_out).saturating_sub(self.bytes_expired)
    }
}

/// A recorded invoice, with its receipt once paid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LnInvoiceRecord {
    pub payment_hash: PaymentHash,
    pub account: TokenHash,
    /// The MAC that asked for it.
    pub mac: Mac,
    pub bytes: u64,
    pub amount_msat: u64,
    pub bolt11: String,
    pub expires_at: i64,
    pub created_at: i64,
    pub receipt: Option<LnReceipt>,
}

/// A claimed payment, as journaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LnReceipt {
    pub payment_hash: PaymentHash,
    /// The account credited (`None`: a payment to a hash the gateway never issued).
    pub account: Option<TokenHash>,
    pub amount_msat: u64,
    pub bytes_credited: u64,
    pub received_at: i64,
}

/// What recording a receipt did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiptOutcome {
    /// First time: journaled and added to the account (returned as it is now).
    Recorded(LnReceipt, Option<LnAccount>),
    /// Already journaled (a re-delivered event): nothing changed.
    Duplicate(LnReceipt, Option<LnAccount>),
}

/// A new invoice, and the account to create with it when the MAC has none.
#[derive(Clone, Debug)]
pub struct NewLnInvoice {
    pub payment_hash: PaymentHash,
    pub account: TokenHash,
    /// Create `account` (linked to `mac`, with this nonce) in the same transaction.
    pub create_account: Option<[u8; 16]>,
    pub mac: Mac,
    pub bytes: u64,
    pub amount_msat: u64,
    pub bolt11: String,
    pub expires_at: i64,
    pub now: i64,
}

/// Accounting at a settle point for one MAC: `used` bytes of its kernel count go to
/// its account (`bytes_out`), and `settled_after` of its count are accounted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LnSettle {
    pub mac: Mac,
    pub account: Option<TokenHash>,
    pub used: u64,
    pub settled_after: u64,
}

/// Totals for `bitmesh earnings` and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LnTotals {
    pub receipts: u64,
    pub received_msat: u64,
    pub bytes_sold: u64,
    /// Live bytes on accounts now.
    pub bytes_live: u64,
    pub bytes_expired: u64,
    pub accounts_live: u64,
}

fn account_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LnAccount> {
    let token: String = r.get(0)?;
    let mac: Option<String> = r.get(1)?;
    let nonce: String = r.get(7)?;
    Ok(LnAccount {
        token_hash: token.parse().map_err(|e| col_err(0, e))?,
        nonce: <[u8; 16]>::from_hex(&nonce).map_err(|e| col_err(7, e))?,
        mac: mac.map(|m| m.parse().map_err(|e| col_err(1, e))).transpose()?,
        bytes_in: r.get::<_, i64>(2)? as u64,
        bytes_out: r.get::<_, i64>(3)? as u64,
        bytes_expired: r.get::<_, i64>(4)? as u64,
        expires_at: r.get(5)?,
        created_at: r.get(6)?,
    })
}

const ACCOUNT_COLS: &str = "token_hash, mac, bytes_in, bytes_out, bytes_expired, expires_at, created_at, nonce";

fn account_by(conn: &Connection, clause: &str, arg: String) -> Result<Option<LnAccount>, StoreError> {
    Ok(conn
        .query_row(&format!("SELECT {ACCOUNT_COLS} FROM ln_accounts WHERE {clause}"), [arg], account_row)
        .optional()?)
}

fn receipt_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LnReceipt> {
    let hash: String = r.get(0)?;
    let account: Option<String> = r.get(1)?;
    Ok(LnReceipt {
        payment_hash: hash.parse().map_err(|e| col_err(0, e))?,
        account: account.map(|a| a.parse().map_err(|e| col_err(1, e))).transpose()?,
        amount_msat: r.get::<_, i64>(2)? as u64,
        bytes_credited: r.get::<_, i64>(3)? as u64,
        received_at: r.get(4)?,
    })
}

fn receipt(conn: &Connection, hash: PaymentHash) -> Result<Option<LnReceipt>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT payment_hash, account, amount_msat, bytes_credited, received_at FROM ln_receipts WHERE payment_hash = ?1",
            [hash.to_string()],
            receipt_row,
        )
        .optional()?)
}

fn apply_settle(tx: &Transaction<'_>, s: &LnSettle) -> Result<(), StoreError> {
    if let Some(acc) = s.account {
        tx.execute(
            "UPDATE ln_accounts SET bytes_out = bytes_out + ?2 WHERE token_hash = ?1",
            params![acc.to_string(), s.used as i64],
        )?;
    }
    tx.execute(
        "INSERT INTO ln_meter (mac, settled_bytes) VALUES (?1, ?2)
         ON CONFLICT(mac) DO UPDATE SET settled_bytes = excluded.settled_bytes",
        params![s.mac.to_string(), s.settled_after as i64],
    )?;
    Ok(())
}

impl Store {
    /// The account whose credit is on `mac`, if any.
    pub fn ln_account_for_mac(&self, mac: Mac) -> Result<Option<LnAccount>, StoreError> {
        account_by(&*self.conn()?, "mac = ?1", mac.to_string())
    }

    /// The account named by `token`.
    pub fn ln_account(&self, token: TokenHash) -> Result<Option<LnAccount>, StoreError> {
        account_by(&*self.conn()?, "token_hash = ?1", token.to_string())
    }

    /// Every account on a MAC with live bytes (reconciliation, snapshots, expiry).
    pub fn ln_live_accounts(&self) -> Result<Vec<LnAccount>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {ACCOUNT_COLS} FROM ln_accounts
             WHERE mac IS NOT NULL AND bytes_in > bytes_out + bytes_expired ORDER BY mac"
        ))?;
        let rows = stmt.query_map([], account_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Record an invoice (and its account, for a MAC that had none), synced, before
    /// the invoice is shown to anyone.
    pub fn ln_record_invoice(&self, inv: &NewLnInvoice) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        if let Some(nonce) = inv.create_account {
            tx.execute(
                "INSERT INTO ln_accounts (token_hash, nonce, mac, expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?4)",
                params![inv.account.to_string(), nonce.to_lower_hex_string(), inv.mac.to_string(), inv.now],
            )?;
        }
        tx.execute(
            "INSERT INTO ln_invoices (payment_hash, account, mac, bytes, amount_msat, bolt11, expires_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                inv.payment_hash.to_string(),
                inv.account.to_string(),
                inv.mac.to_string(),
                inv.bytes as i64,
                inv.amount_msat as i64,
                inv.bolt11,
                inv.expires_at,
                inv.now
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// One invoice with its receipt.
    pub fn ln_invoice(&self, hash: PaymentHash) -> Result<Option<LnInvoiceRecord>, StoreError> {
        let conn = self.conn()?;
        let row = conn
            .query_row(
                "SELECT payment_hash, account, mac, bytes, amount_msat, bolt11, expires_at, created_at
                 FROM ln_invoices WHERE payment_hash = ?1",
                [hash.to_string()],
                invoice_row,
            )
            .optional()?;
        let Some(mut inv) = row else { return Ok(None) };
        inv.receipt = receipt(&conn, hash)?;
        Ok(Some(inv))
    }

    /// Unpaid invoices that have not expired at `now` (for `bitmesh lightning`).
    pub fn ln_pending_invoices(&self, now: i64) -> Result<Vec<LnInvoiceRecord>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT i.payment_hash, i.account, i.mac, i.bytes, i.amount_msat, i.bolt11, i.expires_at, i.created_at
             FROM ln_invoices i LEFT JOIN ln_receipts r ON r.payment_hash = i.payment_hash
             WHERE r.payment_hash IS NULL AND i.expires_at > ?1 ORDER BY i.created_at",
        )?;
        let rows = stmt.query_map([now], invoice_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Whether `mac` has an unpaid invoice that has not expired at `now`: asked
    /// from `mac`, or for the account whose credit is on `mac`.
    pub fn ln_has_pending_invoice(&self, mac: Mac, now: i64) -> Result<bool, StoreError> {
        let conn = self.conn()?;
        let found: bool = conn.query_row(
            "SELECT EXISTS(
                SELECT 1 FROM ln_invoices i LEFT JOIN ln_receipts r ON r.payment_hash = i.payment_hash
                WHERE r.payment_hash IS NULL AND i.expires_at > ?2
                  AND (i.mac = ?1 OR i.account IN (SELECT token_hash FROM ln_accounts WHERE mac = ?1)))",
            params![mac.to_string(), now],
            |r| r.get(0),
        )?;
        Ok(found)
    }

    /// Journal a claimed payment (synced) and add its bytes to the invoice's account,
    /// extending the account's expiry to `now + ttl_secs`; `bytes_for` turns the
    /// invoice (bytes, amount) and the amount received into the bytes credited. A
    /// payment hash already journaled changes nothing (`Duplicate`). A payment to a
    /// hash the gateway never issued is journaled with no account, crediting nothing.
    pub fn ln_record_receipt(
        &self,
        hash: PaymentHash,
        amount_msat: u64,
        now: i64,
        ttl_secs: i64,
        bytes_for: impl Fn(u64, u64, u64) -> u64,
    ) -> Result<ReceiptOutcome, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let invoice: Option<(String, i64, i64)> = tx
            .query_row(
                "SELECT account, bytes, amount_msat FROM ln_invoices WHERE payment_hash = ?1",
                [hash.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let account: Option<TokenHash> = invoice.as_ref().map(|(a, _, _)| a.parse()).transpose().map_err(|e| super::corrupt("ln_invoices.account", e))?;
        if let Some(existing) = receipt(&tx, hash)? {
            let acc = match account {
                Some(a) => account_by(&tx, "token_hash = ?1", a.to_string())?,
                None => None,
            };
            return Ok(ReceiptOutcome::Duplicate(existing, acc));
        }
        let bytes = invoice.map(|(_, b, a)| bytes_for(b as u64, a as u64, amount_msat)).unwrap_or(0);
        let rec = LnReceipt { payment_hash: hash, account, amount_msat, bytes_credited: bytes, received_at: now };
        tx.execute(
            "INSERT INTO ln_receipts (payment_hash, account, amount_msat, bytes_credited, received_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![hash.to_string(), account.map(|a| a.to_string()), amount_msat as i64, bytes as i64, now],
        )?;
        if let Some(a) = account {
            tx.execute(
                "UPDATE ln_accounts SET bytes_in = bytes_in + ?2, expires_at = MAX(expires_at, ?3) WHERE token_hash = ?1",
                params![a.to_string(), bytes as i64, now.saturating_add(ttl_secs)],
            )?;
        }
        let acc = match account {
            Some(a) => account_by(&tx, "token_hash = ?1", a.to_string())?,
            None => None,
        };
        tx.commit()?;
        Ok(ReceiptOutcome::Recorded(rec, acc))
    }

    /// Bytes of `mac`'s kernel USAGE count already accounted for (0 if none).
    pub fn ln_settled(&self, mac: Mac) -> Result<u64, StoreError> {
        let conn = self.conn()?;
        let v: Option<i64> = conn
            .query_row("SELECT settled_bytes FROM ln_meter WHERE mac = ?1", [mac.to_string()], |r| r.get(0))
            .optional()?;
        Ok(v.unwrap_or(0) as u64)
    }

    /// Every MAC with an `ln_meter` row.
    pub fn ln_meter_macs(&self) -> Result<Vec<Mac>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare("SELECT mac FROM ln_meter ORDER BY mac")?;
        let rows = stmt
            .query_map([], |r| {
                let m: String = r.get(0)?;
                m.parse::<Mac>().map_err(|e| col_err(0, e))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Forget what was accounted of `mac`'s kernel count: its entries are gone (or
    /// about to be made fresh), so its count starts from zero.
    pub fn ln_forget_meter(&self, mac: Mac) -> Result<(), StoreError> {
        let conn = self.conn()?;
        conn.execute("DELETE FROM ln_meter WHERE mac = ?1", [mac.to_string()])?;
        Ok(())
    }

    /// Apply settle points (one transaction).
    pub fn ln_settle(&self, settles: &[LnSettle]) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        for s in settles {
            apply_settle(&tx, s)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Expire `token`'s live bytes after settling its MAC (one transaction).
    pub fn ln_expire(&self, token: TokenHash, settle: Option<LnSettle>) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        if let Some(s) = settle {
            apply_settle(&tx, &s)?;
        }
        tx.execute(
            "UPDATE ln_accounts SET bytes_expired = bytes_in - bytes_out WHERE token_hash = ?1",
            [token.to_string()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Move `token`'s credit to `to` in one transaction: settle the MACs involved
    /// (`settles`: the account's old MAC and `to`), merge the live bytes of the
    /// account already on `to` (if another) into `token`'s, with its unpaid
    /// invoices, and link `token` to `to`.
    pub fn ln_move_account(&self, token: TokenHash, to: Mac, settles: &[LnSettle]) -> Result<LnAccount, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        for s in settles {
            apply_settle(&tx, s)?;
        }
        if let Some(other) = account_by(&tx, "mac = ?1", to.to_string())? {
            if other.token_hash != token {
                let live = other.live() as i64;
                tx.execute(
                    "UPDATE ln_accounts SET bytes_out = bytes_out + ?2, mac = NULL WHERE token_hash = ?1",
                    params![other.token_hash.to_string(), live],
                )?;
                tx.execute(
                    "UPDATE ln_accounts SET bytes_in = bytes_in + ?2, expires_at = MAX(expires_at, ?3) WHERE token_hash = ?1",
                    params![token.to_string(), live, other.expires_at],
                )?;
                // Its unpaid invoices follow it: paid later, they must credit the
                // account that is on a MAC, not the emptied one (which is on none).
                tx.execute(
                    "UPDATE ln_invoices SET account = ?2
                     WHERE account = ?1 AND payment_hash NOT IN (SELECT payment_hash FROM ln_receipts)",
                    params![other.token_hash.to_string(), token.to_string()],
                )?;
            }
        }
        tx.execute("UPDATE ln_accounts SET mac = ?2 WHERE token_hash = ?1", params![token.to_string(), to.to_string()])?;
        let acc = account_by(&tx, "token_hash = ?1", token.to_string())?
            .ok_or_else(|| super::corrupt("ln_accounts", format!("account {token} vanished during a move")))?;
        tx.commit()?;
        Ok(acc)
    }

    /// Move an account's expiry (unit tests stand in for the clock with this).
    #[cfg(test)]
    pub fn ln_set_expiry_for_test(&self, token: TokenHash, expires_at: i64) -> Result<(), StoreError> {
        let conn = self.conn()?;
        conn.execute("UPDATE ln_accounts SET expires_at = ?2 WHERE token_hash = ?1", params![token.to_string(), expires_at])?;
        Ok(())
    }

    /// What each MAC has paid over Lightning, in msat: the receipts of the invoices
    /// it asked for (a restore moves credit, not what was paid from where).
    pub fn ln_paid_msat_by_mac(&self) -> Result<Vec<(Mac, u64)>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT i.mac, SUM(r.amount_msat) FROM ln_receipts r JOIN ln_invoices i ON i.payment_hash = r.payment_hash
             GROUP BY i.mac ORDER BY i.mac",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let mac: String = r.get(0)?;
                Ok((mac.parse().map_err(|e| col_err(0, e))?, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Receipt, sale and account totals.
    pub fn ln_totals(&self) -> Result<LnTotals, StoreError> {
        let conn = self.conn()?;
        let (receipts, msat, sold): (i64, i64, i64) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(amount_msat), 0), COALESCE(SUM(bytes_credited), 0) FROM ln_receipts",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let (live, expired, accounts): (i64, i64, i64) = conn.query_row(
            "SELECT COALESCE(SUM(MAX(bytes_in - bytes_out - bytes_expired, 0)), 0), COALESCE(SUM(bytes_expired), 0),
                    COALESCE(SUM(bytes_in > bytes_out + bytes_expired), 0)
             FROM ln_accounts",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        Ok(LnTotals {
            receipts: receipts as u64,
            received_msat: msat as u64,
            bytes_sold: sold as u64,
            bytes_live: live as u64,
            bytes_expired: expired as u64,
            accounts_live: accounts as u64,
        })
    }
}

fn invoice_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LnInvoiceRecord> {
    let hash: String = r.get(0)?;
    let account: String = r.get(1)?;
    let mac: String = r.get(2)?;
    Ok(LnInvoiceRecord {
        payment_hash: hash.parse().map_err(|e| col_err(0, e))?,
        account: account.parse().map_err(|e| col_err(1, e))?,
        mac: mac.parse().map_err(|e| col_err(2, e))?,
        bytes: r.get::<_, i64>(3)? as u64,
        amount_msat: r.get::<_, i64>(4)? as u64,
        bolt11: r.get(5)?,
        expires_at: r.get(6)?,
        created_at: r.get(7)?,
        receipt: None,
    })
}
