//! What the CLI prints: aligned tables for people, JSON for scripts. The only place
//! that formats operator output.

use bitmesh_common::pricing::PriceMsatPerMib;

use super::{ChannelRow, ClientRow, PriceSetting};
#[cfg(test)]
use super::ClientState;
use crate::store::Earnings;

/// Human byte count (binary units).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    let mut out = vec![line(header.iter().map(|s| s.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n") + "\n"
}

fn short(id: &impl std::fmt::Display) -> String {
    let s = id.to_string();
    s.chars().take(12).collect()
}

/// `bitmesh clients` as a table.
pub fn clients_table(rows: &[ClientRow]) -> String {
    table(
        &["MAC", "IP", "CHANNEL", "PAID", "CREDITED", "UP", "DOWN", "REMAINING", "RATE", "LAST SEEN", "STATE"],
        rows.iter()
            .map(|r| {
                vec![
                    r.mac.clone(),
                    r.ip.clone().unwrap_or_else(|| "-".into()),
                    r.channel.map(|c| short(&c)).unwrap_or_else(|| "-".into()),
                    format!("{} sat", r.paid_sat),
                    bytes(r.credited_bytes),
                    bytes(r.up_bytes),
                    bytes(r.down_bytes),
                    bytes(r.remaining_bytes),
                    if r.metered { format!("{}/s", bytes(r.rate_bps as u64)) } else { "-".into() },
                    match (r.metered, r.last_seen_secs_ago) {
                        (false, _) => "-".into(),
                        (true, Some(s)) => format!("{s}s ago"),
                        (true, None) => "never".into(),
                    },
                    r.state.to_string(),
                ]
            })
            .collect(),
    )
}

/// `bitmesh channels` as a table.
pub fn channels_table(rows: &[ChannelRow]) -> String {
    table(
        &["CHANNEL", "MAC", "STATE", "CAPACITY", "PAID", "CREDITED", "UPDATES", "EXPIRY", "CLOSE", "TXID"],
        rows.iter()
            .map(|r| {
                vec![
                    short(&r.id),
                    r.mac.clone(),
                    r.state.to_string(),
                    r.capacity_sat.map(|c| format!("{c} sat")).unwrap_or_else(|| "-".into()),
                    format!("{} sat", r.paid_sat),
                    bytes(r.credited_bytes),
                    r.payments.to_string(),
                    r.expiry.to_string(),
                    r.close_reason.map_or_else(|| "-".into(), |c| c.to_string()),
                    r.close_txid.as_ref().map(short).unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    )
}

/// A price as people read it, in sat/MiB, with the msat/MiB the flags take beside it.
fn price(msat: u64) -> String {
    match PriceMsatPerMib::new(msat) {
        Ok(p) => format!("{p} ({msat} msat/MiB)"),
        Err(_) => format!("{msat} msat/MiB"),
    }
}

/// The price for new channels and where it comes from (`bitmesh price`, and the line
/// above `bitmesh clients`). A price set with `bitmesh price` outlives restarts and
/// silently beats the flag and config file otherwise, so that is spelled out.
pub fn price_line(p: &PriceSetting) -> String {
    let now = price(p.msat_per_mib);
    match (p.set_at_runtime, p.configured_msat_per_mib) {
        (true, Some(conf)) => format!(
            "price for new channels: {now}, set with `bitmesh price`: it overrides --price-msat-per-mib {} at every start; `bitmesh price --reset` goes back to it",
            price(conf)
        ),
        (true, None) => format!("price for new channels: {now}, set with `bitmesh price`"),
        (false, _) => format!("price for new channels: {now}, from --price-msat-per-mib (flag, config file or default)"),
    }
}

/// `bitmesh earnings`.
pub fn earnings_text(e: &Earnings) -> String {
    let mut s = format!(
        "settled (confirmed):        {:>12} sat\npending (broadcast):        {:>12} sat\nheld in open channels:      {:>12} sat\n",
        e.settled.to_sat(),
        e.pending.to_sat(),
        e.held_open.to_sat()
    );
    if e.lightning_receipts > 0 {
        s.push_str(&format!(
            "received over Lightning:    {:>12} sat ({} payments)\n",
            e.lightning_received_msat / 1000,
            e.lightning_receipts
        ));
    }
    s
}

/// `bitmesh lightning`: the node, its balances and channels, pending invoices.
pub fn lightning_text(i: &crate::lightning::operator::LightningInfo) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "node id:          {}", i.node_id);
    let _ = writeln!(out, "listening on:     {}", if i.listening.is_empty() { "-".into() } else { i.listening.join(", ") });
    let _ = writeln!(out, "on-chain:         {} sat ({} spendable, {} anchor reserve)", i.onchain_total_sat, i.onchain_spendable_sat, i.anchor_reserve_sat);
    let _ = writeln!(out, "deposit address:  {}", i.deposit_address);
    let _ = writeln!(out, "in channels:      {} sat", i.lightning_balance_sat);
    let _ = writeln!(out, "channels ({}):", i.channels.len());
    for c in &i.channels {
        let _ = writeln!(
            out,
            "  {}  peer {}  {} sat  outbound {} sat  inbound {} sat  {}",
            c.channel_id,
            c.counterparty,
            c.capacity_sat,
            c.outbound_msat / 1000,
            c.inbound_msat / 1000,
            if c.usable { "usable" } else if c.ready { "ready" } else { "pending" }
        );
    }
    let _ = writeln!(out, "pending invoices ({}):", i.pending_invoices.len());
    for p in &i.pending_invoices {
        let _ = writeln!(out, "  {}  {}  {} bytes  {} msat  expires {}", p.payment_hash, p.mac, p.bytes, p.amount_msat, p.expires_at);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CloseReason;

    #[test]
    fn price_line_says_when_bitmesh_price_overrides_the_flag() {
        let flag = PriceSetting { msat_per_mib: 1000, configured_msat_per_mib: Some(1000), set_at_runtime: false };
        let line = price_line(&flag);
        assert!(line.contains("1 sat/MiB (1000 msat/MiB)") && line.contains("from --price-msat-per-mib"), "{line}");
        let set = PriceSetting { msat_per_mib: 2500, configured_msat_per_mib: Some(1000), set_at_runtime: true };
        let line = price_line(&set);
        assert!(line.contains("2.5 sat/MiB (2500 msat/MiB)"), "{line}");
        assert!(line.contains("overrides --price-msat-per-mib 1 sat/MiB (1000 msat/MiB)"), "{line}");
        assert!(line.contains("bitmesh price --reset"), "{line}");
    }

    #[test]
    fn byte_counts_use_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024), "5.0 MiB");
    }

    #[test]
    fn clients_table_aligns_columns_and_shows_every_field() {
        let row = ClientRow {
            mac: "02:00:00:00:00:01".into(),
            ip: Some("10.0.0.2".into()),
            channel: None,
            state: ClientState::Unpaid,
            paid_sat: 0,
            credited_bytes: 0,
            up_bytes: 100,
            down_bytes: 2048,
            remaining_bytes: 0,
            rate_bps: 0.0,
            last_seen_secs_ago: Some(3),
            metered: true,
            capacity_sat: None,
            close_reason: None,
            close_txid: None,
            rail: None,
        };
        let t = clients_table(&[row]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("MAC "));
        for want in ["02:00:00:00:00:01", "10.0.0.2", "2.0 KiB", "3s ago", "unpaid", "0 sat"] {
            assert!(lines[1].contains(want), "{want} missing in {}", lines[1]);
        }
        assert_eq!(lines[0].find("IP"), lines[1].find("10.0.0.2"));
    }

    #[test]
    fn clients_table_shows_no_rate_or_last_seen_for_an_unmetered_client() {
        let row = ClientRow {
            mac: "02:00:00:00:00:02".into(),
            ip: None,
            channel: None,
            state: ClientState::Closed,
            paid_sat: 900,
            credited_bytes: 0,
            up_bytes: 10,
            down_bytes: 20,
            remaining_bytes: 0,
            rate_bps: 0.0,
            last_seen_secs_ago: None,
            metered: false,
            capacity_sat: Some(20_000),
            close_reason: Some(CloseReason::Client),
            close_txid: Some("ab".into()),
            rail: None,
        };
        let t = clients_table(&[row]);
        let line = t.lines().nth(1).unwrap();
        assert!(line.contains("900 sat") && line.ends_with("closed"), "{line}");
        assert!(!line.contains("never") && !line.contains("/s"), "{line}");
    }
}

