//! Usage snapshots (to restore USAGE after a reboot), client bindings and settings.

use std::net::IpAddr;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use bitmesh_common::kernel::{Mac, Usage};

use super::{col_err, unix_now, Store, StoreError};

/// The kernel's USAGE entry for a MAC at some moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageSnapshot {
    pub mac: Mac,
    /// The counters as the kernel held them.
    pub usage: Usage,
    /// Unix seconds when the snapshot was taken.
    pub taken_at: i64,
}

/// The IP a MAC was last seen with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ClientBinding {
    pub mac: Mac,
    pub ip: IpAddr,
    pub last_seen_at: i64,
}

impl Store {
    /// Replace the stored snapshots with these (one synced transaction).
    pub fn save_usage(&self, snaps: &[UsageSnapshot]) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        for s in snaps {
            tx.execute(
                "INSERT INTO usage_snapshots (mac, up_bytes, down_bytes, up_pkts, down_pkts, last_seen_ns, taken_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(mac) DO UPDATE SET up_bytes = excluded.up_bytes, down_bytes = excluded.down_bytes,
                   up_pkts = excluded.up_pkts, down_pkts = excluded.down_pkts,
                   last_seen_ns = excluded.last_seen_ns, taken_at = excluded.taken_at",
                params![
                    s.mac.to_string(),
                    s.usage.up_bytes as i64,
                    s.usage.down_bytes as i64,
                    s.usage.up_pkts as i64,
                    s.usage.down_pkts as i64,
                    s.usage.last_seen_ns as i64,
                    s.taken_at
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The last snapshot of every MAC.
    pub fn usage_snapshots(&self) -> Result<Vec<UsageSnapshot>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT mac, up_bytes, down_bytes, up_pkts, down_pkts, last_seen_ns, taken_at FROM usage_snapshots ORDER BY mac",
        )?;
        let rows = stmt.query_map([], |r| {
            let mac: String = r.get(0)?;
            Ok(UsageSnapshot {
                mac: mac.parse().map_err(|e| col_err(0, e))?,
                usage: Usage {
                    up_bytes: r.get::<_, i64>(1)? as u64,
                    down_bytes: r.get::<_, i64>(2)? as u64,
                    up_pkts: r.get::<_, i64>(3)? as u64,
                    down_pkts: r.get::<_, i64>(4)? as u64,
                    last_seen_ns: r.get::<_, i64>(5)? as u64,
                },
                taken_at: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Remember that `mac` was seen with `ip`.
    pub fn bind_client(&self, mac: Mac, ip: IpAddr) -> Result<(), StoreError> {
        self.conn()?.execute(
            "INSERT INTO client_bindings (mac, ip, last_seen_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(mac) DO UPDATE SET ip = excluded.ip, last_seen_at = excluded.last_seen_at",
            params![mac.to_string(), ip.to_string(), unix_now()],
        )?;
        Ok(())
    }

    /// Every MAC -> IP binding.
    pub fn client_bindings(&self) -> Result<Vec<ClientBinding>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare("SELECT mac, ip, last_seen_at FROM client_bindings ORDER BY mac")?;
        let rows = stmt.query_map([], |r| {
            let mac: String = r.get(0)?;
            let ip: String = r.get(1)?;
            Ok(ClientBinding {
                mac: mac.parse().map_err(|e| col_err(0, e))?,
                ip: ip.parse().map_err(|e| col_err(1, e))?,
                last_seen_at: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

pub(super) fn setting(conn: &Connection, key: &str) -> Result<Option<String>, StoreError> {
    Ok(conn.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0)).optional()?)
}

pub(super) fn set_setting(conn: &Connection, key: &str, value: &str) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

pub(super) fn delete_setting(conn: &Connection, key: &str) -> Result<(), StoreError> {
    conn.execute("DELETE FROM settings WHERE key = ?1", [key])?;
    Ok(())
}
