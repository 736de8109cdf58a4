//! The append-only payment journal.
//!
//! A row is written once and never changed (triggers refuse UPDATE and DELETE).
//! `(channel, sequence)` and `(channel, paid_total)` are unique, so a payment can
//! never be credited twice: a re-submitted update finds its stored row and gets the
//! same acknowledgement back.

use bitcoin::Amount;
use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

use super::{col_err, unix_now, ByteCount, ChannelId, Store, StoreError};

/// A verified payment update, ready to be journaled.
#[derive(Clone, Debug)]
pub struct NewPayment {
    pub channel: ChannelId,
    /// Total paid to the gateway so far by this channel (not the increment).
    pub paid_total: Amount,
    /// The client's change output in the signed close transaction.
    pub client_change: Amount,
    /// The client's signature (DER + sighash byte) over the close transaction.
    pub signature: Vec<u8>,
    /// The byte budget `paid_total` buys on this channel.
    pub credited: ByteCount,
}

/// A journaled payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PaymentRecord {
    pub channel: ChannelId,
    /// 1 for the first payment of a channel, then +1 each.
    pub sequence: u64,
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub paid_total: Amount,
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub client_change: Amount,
    #[serde(skip)]
    pub signature: Vec<u8>,
    pub credited: ByteCount,
    pub received_at: i64,
}

/// What `append_payment` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// A new row, synced to disk: the caller may now credit and acknowledge it.
    Appended(PaymentRecord),
    /// The same total was already journaled: acknowledge with this stored row and
    /// credit nothing new (crediting is idempotent anyway: CREDIT is a total).
    Duplicate(PaymentRecord),
}

impl AppendOutcome {
    pub fn record(&self) -> &PaymentRecord {
        match self {
            AppendOutcome::Appended(r) | AppendOutcome::Duplicate(r) => r,
        }
    }
}

const SELECT: &str = "SELECT channel_id, sequence, paid_total_sat, client_change_sat, signature,
    credited_bytes, received_at FROM payments";

fn from_row(row: &Row) -> rusqlite::Result<PaymentRecord> {
    let id: String = row.get(0)?;
    Ok(PaymentRecord {
        channel: id.parse().map_err(|e| col_err(0, e))?,
        sequence: row.get::<_, i64>(1)? as u64,
        paid_total: Amount::from_sat(row.get::<_, i64>(2)? as u64),
        client_change: Amount::from_sat(row.get::<_, i64>(3)? as u64),
        signature: row.get(4)?,
        credited: ByteCount(row.get::<_, i64>(5)? as u64),
        received_at: row.get(6)?,
    })
}

impl Store {
    /// Journal a verified payment in one synced transaction.
    ///
    /// Returns [`AppendOutcome::Duplicate`] with the stored row if this total was
    /// already journaled, and [`StoreError::NotIncreasing`] if the total is below the
    /// latest one. When this returns `Ok(Appended)`, the row is on disk.
    pub fn append_payment(&self, p: &NewPayment) -> Result<AppendOutcome, StoreError> {
        let mut conn = self.conn()?;
        // IMMEDIATE: take the write lock up front so the read-check-insert is atomic
        // even against another process (e.g. a second controller by mistake).
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let cid = p.channel.to_string();
        let exists: Option<i64> =
            tx.query_row("SELECT 1 FROM channels WHERE id = ?1", [&cid], |r| r.get(0)).optional()?;
        if exists.is_none() {
            return Err(StoreError::UnknownChannel(p.channel));
        }
        let same = tx
            .query_row(
                &format!("{SELECT} WHERE channel_id = ?1 AND paid_total_sat = ?2"),
                params![cid, p.paid_total.to_sat() as i64],
                from_row,
            )
            .optional()?;
        if let Some(stored) = same {
            return Ok(AppendOutcome::Duplicate(stored));
        }
        let (last_total, last_seq): (i64, i64) = tx.query_row(
            "SELECT COALESCE(MAX(paid_total_sat), 0), COALESCE(MAX(sequence), 0) FROM payments WHERE channel_id = ?1",
            [&cid],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if p.paid_total.to_sat() as i64 <= last_total {
            return Err(StoreError::NotIncreasing {
                channel: p.channel,
                offered_sat: p.paid_total.to_sat(),
                last_sat: last_total as u64,
            });
        }
        let now = unix_now();
        tx.execute(
            "INSERT INTO payments (channel_id, sequence, paid_total_sat, client_change_sat, signature,
                credited_bytes, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                cid,
                last_seq + 1,
                p.paid_total.to_sat() as i64,
                p.client_change.to_sat() as i64,
                p.signature,
                p.credited.0 as i64,
                now
            ],
        )?;
        tx.execute("UPDATE channels SET last_activity_at = ?2 WHERE id = ?1", params![cid, now])?;
        tx.commit()?;
        Ok(AppendOutcome::Appended(PaymentRecord {
            channel: p.channel,
            sequence: (last_seq + 1) as u64,
            paid_total: p.paid_total,
            client_change: p.client_change,
            signature: p.signature.clone(),
            credited: p.credited,
            received_at: now,
        }))
    }

    /// The latest (highest) payment of a channel: the one a settlement spends with.
    pub fn latest_payment(&self, channel: ChannelId) -> Result<Option<PaymentRecord>, StoreError> {
        Ok(self
            .conn()?
            .query_row(
                &format!("{SELECT} WHERE channel_id = ?1 ORDER BY sequence DESC LIMIT 1"),
                [channel.to_string()],
                from_row,
            )
            .optional()?)
    }

    /// The journaled payment of `channel` with exactly this total, if any (a
    /// re-submitted update is answered from it).
    pub fn payment_with_total(&self, channel: ChannelId, total: Amount) -> Result<Option<PaymentRecord>, StoreError> {
        Ok(self
            .conn()?
            .query_row(
                &format!("{SELECT} WHERE channel_id = ?1 AND paid_total_sat = ?2"),
                params![channel.to_string(), total.to_sat() as i64],
                from_row,
            )
            .optional()?)
    }

    /// Every payment of a channel, in order.
    pub fn payments(&self, channel: ChannelId) -> Result<Vec<PaymentRecord>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(&format!("{SELECT} WHERE channel_id = ?1 ORDER BY sequence"))?;
        let rows = stmt.query_map([channel.to_string()], from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
