//! Settlement transactions: one close (or a batch of closes) broadcast, watched
//! until confirmed, and replaced (RBF) when it does not confirm.

use bitcoin::absolute::Height;
use bitcoin::consensus::{deserialize, serialize};
use bitcoin::{Amount, Transaction, Txid};
use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

use super::channels::opt_height;
use super::{col_err, corrupt, unix_now, ChannelId, Store, StoreError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SettlementState {
    /// Broadcast, not yet confirmed: the settlement engine watches it.
    Broadcast,
    /// Confirmed at `confirmed_height`.
    Confirmed,
    /// Superseded by a fee-bumped replacement.
    Replaced,
}

impl SettlementState {
    fn as_str(self) -> &'static str {
        match self {
            SettlementState::Broadcast => "broadcast",
            SettlementState::Confirmed => "confirmed",
            SettlementState::Replaced => "replaced",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "broadcast" => SettlementState::Broadcast,
            "confirmed" => SettlementState::Confirmed,
            "replaced" => SettlementState::Replaced,
            _ => return None,
        })
    }
}

/// A settlement transaction about to be broadcast.
#[derive(Clone, Debug)]
pub struct NewSettlement {
    pub tx: Transaction,
    pub fee: Amount,
    /// What the gateway receives (its output), after the fee.
    pub gateway_payout: Amount,
    pub broadcast_height: Height,
    pub channels: Vec<ChannelId>,
    /// The settlement this one replaces (fee bump), if any.
    pub replaces: Option<i64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SettlementRecord {
    pub id: i64,
    pub txid: Txid,
    #[serde(skip)]
    pub tx: Transaction,
    pub state: SettlementState,
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub fee: Amount,
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub gateway_payout: Amount,
    pub broadcast_height: Height,
    pub confirmed_height: Option<Height>,
    pub replaces: Option<i64>,
    pub channels: Vec<ChannelId>,
    pub created_at: i64,
}

/// The operator's money, in three buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Earnings {
    /// Gateway outputs of confirmed settlements.
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub settled: Amount,
    /// Gateway outputs of broadcast, unconfirmed settlements.
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub pending: Amount,
    /// Paid totals of channels still open (before the close fee).
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub held_open: Amount,
    /// Lightning payments received (journaled receipts).
    #[serde(default)]
    pub lightning_receipts: u64,
    /// Their total, in millisatoshis (in the node's channels, not on chain).
    #[serde(default)]
    pub lightning_received_msat: u64,
}

const SELECT: &str = "SELECT id, txid, raw_tx, state, fee_sat, gateway_payout_sat, broadcast_height,
    confirmed_height, replaces, created_at FROM settlements";

fn from_row(row: &Row) -> rusqlite::Result<SettlementRecord> {
    let txid: String = row.get(1)?;
    let raw: Vec<u8> = row.get(2)?;
    let state: String = row.get(3)?;
    Ok(SettlementRecord {
        id: row.get(0)?,
        txid: txid.parse().map_err(|e| col_err(1, e))?,
        tx: deserialize(&raw).map_err(|e| col_err(2, e))?,
        state: SettlementState::parse(&state).ok_or_else(|| col_err(3, corrupt("state", &state)))?,
        fee: Amount::from_sat(row.get::<_, i64>(4)? as u64),
        gateway_payout: Amount::from_sat(row.get::<_, i64>(5)? as u64),
        broadcast_height: opt_height(6, Some(row.get(6)?))?.unwrap_or(Height::ZERO),
        confirmed_height: opt_height(7, row.get(7)?)?,
        replaces: row.get(8)?,
        channels: Vec::new(),
        created_at: row.get(9)?,
    })
}

impl Store {
    /// Record a settlement BEFORE broadcasting it (so a crash after broadcast still
    /// knows the txid), mark its channels `closing`, and mark the settlement it
    /// replaces as `replaced`. One synced transaction.
    pub fn record_settlement(&self, s: &NewSettlement) -> Result<SettlementRecord, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let txid = s.tx.compute_txid();
        tx.execute(
            "INSERT INTO settlements (txid, raw_tx, state, fee_sat, gateway_payout_sat, broadcast_height,
                replaces, created_at) VALUES (?1, ?2, 'broadcast', ?3, ?4, ?5, ?6, ?7)",
            params![
                txid.to_string(),
                serialize(&s.tx),
                s.fee.to_sat() as i64,
                s.gateway_payout.to_sat() as i64,
                s.broadcast_height.to_consensus_u32(),
                s.replaces,
                unix_now()
            ],
        )?;
        let id = tx.last_insert_rowid();
        for c in &s.channels {
            tx.execute(
                "INSERT INTO settlement_channels (settlement_id, channel_id) VALUES (?1, ?2)",
                params![id, c.to_string()],
            )?;
            let n = tx.execute(
                "UPDATE channels SET state = 'closing', settlement_id = ?2 WHERE id = ?1",
                params![c.to_string(), id],
            )?;
            if n == 0 {
                return Err(StoreError::UnknownChannel(*c));
            }
        }
        if let Some(old) = s.replaces {
            tx.execute("UPDATE settlements SET state = 'replaced' WHERE id = ?1", [old])?;
        }
        tx.commit()?;
        drop(conn);
        self.settlement(id)?.ok_or(StoreError::UnknownSettlement(id))
    }

    /// The settlement confirmed: its channels are `closed`.
    pub fn mark_settlement_confirmed(&self, id: i64, height: Height) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let n = tx.execute(
            "UPDATE settlements SET state = 'confirmed', confirmed_height = ?2 WHERE id = ?1",
            params![id, height.to_consensus_u32()],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownSettlement(id));
        }
        // A replaced ancestor may be the one that confirmed: the caller passes the id
        // that actually confirmed, and its channels are the same set.
        tx.execute(
            "UPDATE channels SET state = 'closed', settlement_id = ?1
             WHERE id IN (SELECT channel_id FROM settlement_channels WHERE settlement_id = ?1)",
            [id],
        )?;
        tx.execute(
            "UPDATE settlements SET state = 'replaced' WHERE state = 'broadcast' AND id != ?1 AND id IN
             (SELECT settlement_id FROM settlement_channels WHERE channel_id IN
               (SELECT channel_id FROM settlement_channels WHERE settlement_id = ?1))",
            [id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// One settlement with its channels.
    pub fn settlement(&self, id: i64) -> Result<Option<SettlementRecord>, StoreError> {
        let conn = self.conn()?;
        let rec = conn.query_row(&format!("{SELECT} WHERE id = ?1"), [id], from_row).optional()?;
        let Some(mut rec) = rec else { return Ok(None) };
        rec.channels = settlement_channels(&conn, id)?;
        Ok(Some(rec))
    }

    /// Settlements in the given state, oldest first, with their channels.
    pub fn settlements_in(&self, state: SettlementState) -> Result<Vec<SettlementRecord>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(&format!("{SELECT} WHERE state = ?1 ORDER BY id"))?;
        let mut recs: Vec<SettlementRecord> =
            stmt.query_map([state.as_str()], from_row)?.collect::<Result<_, _>>()?;
        for r in &mut recs {
            r.channels = settlement_channels(&conn, r.id)?;
        }
        Ok(recs)
    }

    /// Settled, pending and held-open money.
    pub fn earnings(&self) -> Result<Earnings, StoreError> {
        let conn = self.conn()?;
        let sum = |sql: &str| -> Result<Amount, StoreError> {
            let v: i64 = conn.query_row(sql, [], |r| r.get(0))?;
            Ok(Amount::from_sat(v as u64))
        };
        Ok(Earnings {
            settled: sum("SELECT COALESCE(SUM(gateway_payout_sat), 0) FROM settlements WHERE state = 'confirmed'")?,
            pending: sum("SELECT COALESCE(SUM(gateway_payout_sat), 0) FROM settlements WHERE state = 'broadcast'")?,
            held_open: sum(
                "SELECT COALESCE(SUM((SELECT MAX(paid_total_sat) FROM payments p WHERE p.channel_id = c.id)), 0)
                 FROM channels c WHERE c.state = 'open'",
            )?,
            lightning_receipts: conn.query_row("SELECT COUNT(*) FROM ln_receipts", [], |r| r.get::<_, i64>(0))? as u64,
            lightning_received_msat: conn
                .query_row("SELECT COALESCE(SUM(amount_msat), 0) FROM ln_receipts", [], |r| r.get::<_, i64>(0))?
                as u64,
        })
    }
}

/// Channel transitions the settlement engine makes when a funding output is gone or
/// a channel cannot join a verified batch.
impl Store {
    /// The channel's funding output vanished before it confirmed: it becomes
    /// `double_spent` (from `open`, or from `closing` when the settlement that spent it
    /// was evicted with it) and leaves its settlement. Never settled afterwards.
    /// Returns whether the row changed.
    pub fn mark_double_spent(&self, id: ChannelId) -> Result<bool, StoreError> {
        let n = self.conn()?.execute(
            "UPDATE channels SET state = 'double_spent', settlement_id = NULL
             WHERE id = ?1 AND state IN ('open', 'closing')",
            [id.to_string()],
        )?;
        Ok(n > 0)
    }

    /// A rejected settlement was split (or emptied): stop watching it.
    pub fn retire_settlement(&self, id: i64) -> Result<(), StoreError> {
        self.conn()?.execute("UPDATE settlements SET state = 'replaced' WHERE id = ?1 AND state = 'broadcast'", [id])?;
        Ok(())
    }

    /// Take a channel out of a settlement that will not confirm (it failed
    /// verification on its own): back to `open` with its close reason kept, so the
    /// next settlement pass tries it again on its own instead of holding others back.
    pub fn release_from_settlement(&self, id: ChannelId, settlement: i64) -> Result<(), StoreError> {
        self.conn()?.execute(
            "UPDATE channels SET state = 'open', settlement_id = NULL
             WHERE id = ?1 AND state = 'closing' AND settlement_id = ?2",
            params![id.to_string(), settlement],
        )?;
        Ok(())
    }
}

fn settlement_channels(conn: &rusqlite::Connection, id: i64) -> Result<Vec<ChannelId>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT channel_id FROM settlement_channels WHERE settlement_id = ?1 ORDER BY channel_id")?;
    let ids: Vec<String> = stmt.query_map([id], |r| r.get(0))?.collect::<Result<_, _>>()?;
    ids.iter()
        .map(|s| s.parse().map_err(|e| corrupt("settlement_channels.channel_id", e)))
        .collect()
}
