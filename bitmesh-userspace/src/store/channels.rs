//! Channel rows: offered at open, funded, then closing and closed by a settlement.

use std::net::IpAddr;

use bitcoin::absolute::Height;
use bitcoin::{Amount, OutPoint, PublicKey, ScriptBuf, Txid};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use bitmesh_common::kernel::{Mac, Usage};

use super::{col_err, corrupt, unix_now, ByteCount, ChannelId, PriceMsatPerMib, Store, StoreError};

/// Where a channel is in its life, as the gateway records it (what a client is
/// shown is `wire::ChannelState`, mapped from this).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelStage {
    /// Script handed to the client; no accepted funding yet.
    Offered,
    /// Funding accepted (confirmed, or unconfirmed within the zero-conf cap); payments credited.
    Open,
    /// A settlement transaction spending the funding output has been broadcast.
    Closing,
    /// The settlement confirmed.
    Closed,
    /// Offer never funded before its expiry window passed; nothing to settle.
    Abandoned,
    /// The funding output vanished before it confirmed (a conflicting spend replaced
    /// the funding transaction, or it left the mempool): credit withdrawn, never
    /// settled, later updates refused.
    DoubleSpent,
}

impl ChannelStage {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelStage::Offered => "offered",
            ChannelStage::Open => "open",
            ChannelStage::Closing => "closing",
            ChannelStage::Closed => "closed",
            ChannelStage::Abandoned => "abandoned",
            ChannelStage::DoubleSpent => "double_spent",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "offered" => ChannelStage::Offered,
            "open" => ChannelStage::Open,
            "closing" => ChannelStage::Closing,
            "closed" => ChannelStage::Closed,
            "abandoned" => ChannelStage::Abandoned,
            "double_spent" => ChannelStage::DoubleSpent,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ChannelStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a channel was marked for settlement (stored as its snake_case name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The client asked (`POST /v1/channels/{id}/close`).
    Client,
    /// No payment and no metered frame for longer than `--idle-timeout-secs`.
    Idle,
    /// The tip reached `expiry - close_margin`.
    Expiry,
    /// Nothing left for the client: the whole capacity is paid.
    FullyPaid,
    /// `bitmesh settle`.
    Operator,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Idle => "idle",
            CloseReason::Expiry => "expiry",
            CloseReason::FullyPaid => "fully_paid",
            CloseReason::Operator => "operator",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "client" => CloseReason::Client,
            "idle" => CloseReason::Idle,
            "expiry" => CloseReason::Expiry,
            "fully_paid" => CloseReason::FullyPaid,
            "operator" => CloseReason::Operator,
            _ => return None,
        })
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The accepted funding output of a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Funding {
    pub outpoint: OutPoint,
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub capacity: Amount,
    /// Height of the block that confirmed it, if confirmed.
    pub height: Option<Height>,
}

/// What the kernel had billed a channel's client when metering stopped: the byte
/// counters of its last [`Usage`] (the store keeps no more of it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FinalUsage {
    pub up: ByteCount,
    pub down: ByteCount,
}

impl FinalUsage {
    /// The billed bytes of the kernel's last counters.
    pub fn of(usage: &Usage) -> FinalUsage {
        FinalUsage { up: ByteCount(usage.up_bytes), down: ByteCount(usage.down_bytes) }
    }
}

/// What the gateway decided at open; everything the channel's script and close
/// transaction depend on.
#[derive(Clone, Debug, Serialize)]
pub struct NewChannel {
    pub id: ChannelId,
    pub mac: Mac,
    pub ip: IpAddr,
    pub client_pubkey: PublicKey,
    pub gateway_key_index: u32,
    pub gateway_pubkey: PublicKey,
    pub expiry: Height,
    /// Where the client's change goes in every close transaction (fixed at open).
    pub client_change_script: ScriptBuf,
    /// Price in force for this channel for its whole life.
    pub price: PriceMsatPerMib,
    pub chunk: ByteCount,
    /// The least the first update must pay (close fee + dust at open time).
    pub min_first_payment: Amount,
}

/// A channel row with its journal totals: the [`NewChannel`] decided at open, and
/// what happened to it since.
///
/// The offer's fields read through `Deref` (`rec.mac`, `rec.expiry`): a record *is*
/// its offer plus its life, and every reader of a record reads the offer's fields.
#[derive(Clone, Debug, Serialize)]
pub struct ChannelRecord {
    /// What the gateway decided at open (fixed for the channel's life).
    #[serde(flatten)]
    pub offer: NewChannel,
    pub state: ChannelStage,
    pub funding: Option<Funding>,
    /// Why a close was requested, once it was.
    pub close_reason: Option<CloseReason>,
    pub settlement_id: Option<i64>,
    pub opened_at: i64,
    pub last_activity_at: i64,
    /// Highest total the client has signed (0 before the first payment).
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub paid_total: Amount,
    /// Byte budget that paid total buys (what CREDIT holds for this channel).
    pub credited: ByteCount,
    /// Number of payments in the journal.
    pub payments: u64,
    /// What the client had used when metering stopped (set when the channel starts
    /// closing or is abandoned; `None` before, and for channels closed by older builds).
    pub final_usage: Option<FinalUsage>,
}

const SELECT: &str = "SELECT c.id, c.mac, c.ip, c.client_pubkey, c.gateway_key_index, c.gateway_pubkey,
    c.expiry_height, c.price_msat_per_mib, c.chunk_bytes, c.state, c.funding_txid, c.funding_vout,
    c.capacity_sat, c.funding_height, c.close_reason, c.settlement_id, c.opened_at, c.last_activity_at,
    c.client_change_script, c.min_first_payment_sat,
    COALESCE((SELECT MAX(p.paid_total_sat) FROM payments p WHERE p.channel_id = c.id), 0),
    COALESCE((SELECT MAX(p.credited_bytes) FROM payments p WHERE p.channel_id = c.id), 0),
    (SELECT COUNT(*) FROM payments p WHERE p.channel_id = c.id),
    c.final_up_bytes, c.final_down_bytes
    FROM channels c";

fn pubkey(row: &Row, idx: usize) -> rusqlite::Result<PublicKey> {
    let b: Vec<u8> = row.get(idx)?;
    PublicKey::from_slice(&b).map_err(|e| col_err(idx, e))
}

fn height(idx: usize, v: i64) -> rusqlite::Result<Height> {
    u32::try_from(v)
        .ok()
        .and_then(|h| Height::from_consensus(h).ok())
        .ok_or_else(|| col_err(idx, corrupt("height", v)))
}

fn sat(idx: usize, v: i64) -> rusqlite::Result<Amount> {
    u64::try_from(v).map(Amount::from_sat).map_err(|e| col_err(idx, e))
}

pub(crate) fn opt_height(idx: usize, v: Option<i64>) -> rusqlite::Result<Option<Height>> {
    v.map(|v| height(idx, v)).transpose()
}

fn from_row(row: &Row) -> rusqlite::Result<ChannelRecord> {
    let id: String = row.get(0)?;
    let mac: String = row.get(1)?;
    let ip: String = row.get(2)?;
    let state: String = row.get(9)?;
    let txid: Option<String> = row.get(10)?;
    let vout: Option<u32> = row.get(11)?;
    let capacity: Option<i64> = row.get(12)?;
    let final_up: Option<i64> = row.get(23)?;
    let final_down: Option<i64> = row.get(24)?;
    let funding = match (txid, vout, capacity) {
        (Some(t), Some(v), Some(c)) => Some(Funding {
            outpoint: OutPoint { txid: t.parse::<Txid>().map_err(|e| col_err(10, e))?, vout: v },
            capacity: sat(12, c)?,
            height: opt_height(13, row.get(13)?)?,
        }),
        _ => None,
    };
    Ok(ChannelRecord {
        offer: NewChannel {
            id: id.parse().map_err(|e| col_err(0, e))?,
            mac: mac.parse().map_err(|e| col_err(1, e))?,
            ip: ip.parse().map_err(|e| col_err(2, e))?,
            client_pubkey: pubkey(row, 3)?,
            gateway_key_index: row.get(4)?,
            gateway_pubkey: pubkey(row, 5)?,
            expiry: height(6, row.get(6)?)?,
            client_change_script: ScriptBuf::from_bytes(row.get(18)?),
            price: PriceMsatPerMib::new(row.get::<_, i64>(7)? as u64).map_err(|e| col_err(7, e))?,
            chunk: ByteCount(row.get::<_, i64>(8)? as u64),
            min_first_payment: sat(19, row.get(19)?)?,
        },
        state: ChannelStage::parse(&state).ok_or_else(|| col_err(9, corrupt("state", &state)))?,
        funding,
        close_reason: match row.get::<_, Option<String>>(14)? {
            Some(r) => Some(CloseReason::parse(&r).ok_or_else(|| col_err(14, corrupt("close_reason", &r)))?),
            None => None,
        },
        settlement_id: row.get(15)?,
        opened_at: row.get(16)?,
        last_activity_at: row.get(17)?,
        paid_total: sat(20, row.get(20)?)?,
        credited: ByteCount(row.get::<_, i64>(21)? as u64),
        payments: row.get::<_, i64>(22)? as u64,
        final_usage: match (final_up, final_down) {
            (Some(up), Some(down)) => Some(FinalUsage { up: ByteCount(up as u64), down: ByteCount(down as u64) }),
            _ => None,
        },
    })
}

impl std::ops::Deref for ChannelRecord {
    type Target = NewChannel;
    fn deref(&self) -> &NewChannel {
        &self.offer
    }
}

pub(crate) fn get(conn: &Connection, id: ChannelId) -> Result<Option<ChannelRecord>, StoreError> {
    Ok(conn
        .query_row(&format!("{SELECT} WHERE c.id = ?1"), [id.to_string()], from_row)
        .optional()?)
}

fn list(conn: &Connection, where_sql: &str, p: impl rusqlite::Params) -> Result<Vec<ChannelRecord>, StoreError> {
    let mut stmt = conn.prepare(&format!("{SELECT} {where_sql} ORDER BY c.opened_at, c.id"))?;
    let rows = stmt.query_map(p, from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

impl Store {
    /// The next unused BIP32 child index for a channel key. Callers serialize opens
    /// (the index column is UNIQUE, so a race fails loudly instead of reusing a key).
    pub fn next_key_index(&self) -> Result<u32, StoreError> {
        let conn = self.conn()?;
        let max: Option<i64> = conn.query_row("SELECT MAX(gateway_key_index) FROM channels", [], |r| r.get(0))?;
        Ok(max.map(|m| m as u32 + 1).unwrap_or(0))
    }

    /// Record a channel offer (durably) before the script is handed to the client.
    pub fn insert_channel(&self, c: &NewChannel) -> Result<ChannelRecord, StoreError> {
        let conn = self.conn()?;
        let now = unix_now();
        conn.execute(
            "INSERT INTO channels (id, mac, ip, client_pubkey, gateway_key_index, gateway_pubkey,
                expiry_height, price_msat_per_mib, chunk_bytes, state, opened_at, last_activity_at,
                client_change_script, min_first_payment_sat)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'offered', ?10, ?10, ?11, ?12)",
            params![
                c.id.to_string(),
                c.mac.to_string(),
                c.ip.to_string(),
                c.client_pubkey.to_bytes(),
                c.gateway_key_index,
                c.gateway_pubkey.to_bytes(),
                c.expiry.to_consensus_u32(),
                c.price.to_msat() as i64,
                c.chunk.0 as i64,
                now,
                c.client_change_script.as_bytes(),
                c.min_first_payment.to_sat() as i64
            ],
        )?;
        get(&conn, c.id)?.ok_or(StoreError::UnknownChannel(c.id))
    }

    /// One channel, if it exists.
    pub fn channel(&self, id: ChannelId) -> Result<Option<ChannelRecord>, StoreError> {
        let conn = self.conn()?;
        get(&conn, id)
    }

    /// Every channel, oldest first.
    pub fn channels(&self) -> Result<Vec<ChannelRecord>, StoreError> {
        let conn = self.conn()?;
        list(&conn, "", [])
    }

    /// Channels in any of `states`, oldest first. Selected in SQL through the state
    /// index: periodic work reads the few live channels, never every row ever offered.
    pub fn channels_in(&self, states: &[ChannelStage]) -> Result<Vec<ChannelRecord>, StoreError> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.conn()?;
        let marks = vec!["?"; states.len()].join(", ");
        let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        list(&conn, &format!("WHERE c.state IN ({marks})"), rusqlite::params_from_iter(names))
    }

    /// How many channels are in each state, and how many payments the journal holds
    /// (metrics): counted in SQL, without reading every row.
    pub fn channel_counts(&self) -> Result<(Vec<(ChannelStage, u64)>, u64), StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM channels GROUP BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut by_state = Vec::new();
        for row in rows {
            let (state, n) = row?;
            let state = ChannelStage::parse(&state).ok_or_else(|| corrupt("state", &state))?;
            by_state.push((state, n as u64));
        }
        let payments: i64 = conn.query_row("SELECT COUNT(*) FROM payments", [], |r| r.get(0))?;
        Ok((by_state, payments as u64))
    }

    /// Abandon every offer (never funded) made before `opened_before` (Unix seconds):
    /// an offer is not a live row forever. Returns the channels expired.
    pub fn expire_offers(&self, opened_before: i64) -> Result<Vec<ChannelId>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "UPDATE channels SET state = 'abandoned' WHERE state = 'offered' AND opened_at < ?1 RETURNING id",
        )?;
        let ids = stmt.query_map([opened_before], |r| r.get::<_, String>(0))?;
        ids.map(|id| id?.parse::<ChannelId>().map_err(|e| corrupt("id", e))).collect()
    }

    /// The channel (offered or open) currently bound to a MAC, if any.
    pub fn live_channel_for_mac(&self, mac: Mac) -> Result<Option<ChannelRecord>, StoreError> {
        let conn = self.conn()?;
        let rows = list(
            &conn,
            "WHERE c.mac = ?1 AND c.state IN ('offered', 'open')",
            [mac.to_string()],
        )?;
        Ok(rows.into_iter().last())
    }

    /// The channel funded by `outpoint`, if any.
    pub fn channel_by_outpoint(&self, outpoint: OutPoint) -> Result<Option<ChannelRecord>, StoreError> {
        let conn = self.conn()?;
        let rows = list(
            &conn,
            "WHERE c.funding_txid = ?1 AND c.funding_vout = ?2",
            params![outpoint.txid.to_string(), outpoint.vout],
        )?;
        Ok(rows.into_iter().next())
    }

    /// Accept the funding output of an offered channel: it becomes `open`.
    /// Fails with [`StoreError::OutpointInUse`] if another channel already has it, and
    /// with [`StoreError::NotOffered`] unless the channel is `offered`: a funded
    /// channel's outpoint never changes (its journaled signatures spend it).
    pub fn set_funding(&self, id: ChannelId, funding: Funding) -> Result<ChannelRecord, StoreError> {
        let conn = self.conn()?;
        let r = conn.execute(
            "UPDATE channels SET funding_txid = ?2, funding_vout = ?3, capacity_sat = ?4,
                funding_height = ?5, state = 'open' WHERE id = ?1 AND state = 'offered'",
            params![
                id.to_string(),
                funding.outpoint.txid.to_string(),
                funding.outpoint.vout,
                funding.capacity.to_sat() as i64,
                funding.height.map(|h| h.to_consensus_u32())
            ],
        );
        match r {
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                return Err(StoreError::OutpointInUse(funding.outpoint))
            }
            Err(e) => return Err(e.into()),
            Ok(0) => {
                return Err(match get(&conn, id)? {
                    Some(c) => StoreError::NotOffered { channel: id, state: c.state },
                    None => StoreError::UnknownChannel(id),
                })
            }
            Ok(_) => {}
        }
        get(&conn, id)?.ok_or(StoreError::UnknownChannel(id))
    }

    /// Record the height at which the funding confirmed.
    pub fn set_funding_height(&self, id: ChannelId, h: Height) -> Result<(), StoreError> {
        let n = self.conn()?.execute(
            "UPDATE channels SET funding_height = ?2 WHERE id = ?1",
            params![id.to_string(), h.to_consensus_u32()],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownChannel(id));
        }
        Ok(())
    }

    /// Mark a channel as due for settlement. The first reason wins; later calls are no-ops.
    pub fn request_close(&self, id: ChannelId, reason: CloseReason) -> Result<ChannelRecord, StoreError> {
        let conn = self.conn()?;
        conn.execute(
            "UPDATE channels SET close_reason = COALESCE(close_reason, ?2) WHERE id = ?1",
            params![id.to_string(), reason.as_str()],
        )?;
        get(&conn, id)?.ok_or(StoreError::UnknownChannel(id))
    }

    /// Record what the channel's client had used when metering stopped.
    pub fn set_final_usage(&self, id: ChannelId, usage: FinalUsage) -> Result<(), StoreError> {
        let n = self.conn()?.execute(
            "UPDATE channels SET final_up_bytes = ?2, final_down_bytes = ?3 WHERE id = ?1",
            params![id.to_string(), usage.up.0 as i64, usage.down.0 as i64],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownChannel(id));
        }
        Ok(())
    }

    /// Give up a channel with nothing to settle: an offer never funded, or a funded
    /// channel that never received a payment (the client refunds after expiry).
    pub fn abandon(&self, id: ChannelId) -> Result<(), StoreError> {
        self.conn()?.execute(
            "UPDATE channels SET state = 'abandoned' WHERE id = ?1 AND state IN ('offered', 'open')",
            [id.to_string()],
        )?;
        Ok(())
    }
}
