//! Which clients `bitmesh clients` lists, and what each row says. A pure function of
//! the store's channels, the kernel's counters and the client bindings, so every case
//! is unit-tested without a controller.
//!
//! One row per MAC (scripts index rows by MAC). The row follows the MAC's channel that
//! matters most to an operator: an open one, else one awaiting funding, else one
//! closing, else one closed within [`RECENTLY_CLOSED_SECS`]. A MAC the kernel meters
//! without any such channel is listed as `unpaid`. Abandoned offers (never funded, or
//! funded and never paid, and given up) are not listed: `bitmesh channels` has them.
//!
//! The byte columns: `credited_bytes` and `remaining_bytes` are what the kernel
//! allows now (0 once metering stops, when the channel starts closing; `bitmesh
//! channels` keeps what each channel bought); `up_bytes` and `down_bytes` are the
//! kernel's counters while metered, and what they were when metering stopped for a
//! closing or closed channel.

use std::collections::{BTreeMap, HashMap};

use bitmesh_common::kernel::Mac;

use super::{ClientRow, ClientState};
use crate::meter::ClientUsage;
use crate::store::{ChannelRecord, ChannelStage};

/// How long a closed client stays in `bitmesh clients` after its settlement was
/// broadcast (a day).
pub const RECENTLY_CLOSED_SECS: i64 = 24 * 60 * 60;

/// What a closing or closed channel's settlement says: its txid and when it was
/// broadcast (unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseInfo {
    pub txid: String,
    pub broadcast_at: i64,
}

/// The moment the rows are computed for.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// Unix seconds (settlement times).
    pub unix: i64,
    /// `CLOCK_BOOTTIME` nanoseconds (the kernel's last-seen stamps).
    pub boot_ns: u64,
}

/// The `state` column of a channel's client.
fn state_of(s: ChannelStage) -> Option<ClientState> {
    match s {
        ChannelStage::Offered => Some(ClientState::AwaitingFunding),
        ChannelStage::Open => Some(ClientState::Open),
        ChannelStage::Closing => Some(ClientState::Closing),
        ChannelStage::Closed => Some(ClientState::Closed),
        ChannelStage::DoubleSpent => Some(ClientState::DoubleSpent),
        ChannelStage::Abandoned => None,
    }
}

/// How much a channel matters for its MAC's row (higher wins), or `None` if it is not
/// listed at all.
fn rank(c: &ChannelRecord, close: Option<&CloseInfo>, now: Now) -> Option<u8> {
    match c.state {
        ChannelStage::Open => Some(4),
        ChannelStage::Offered => Some(3),
        ChannelStage::Closing => Some(2),
        ChannelStage::Closed => close.filter(|i| now.unix.saturating_sub(i.broadcast_at) <= RECENTLY_CLOSED_SECS).map(|_| 1),
        // Shown until the device opens another channel: the operator should see it.
        ChannelStage::DoubleSpent => Some(1),
        ChannelStage::Abandoned => None,
    }
}

fn close_info<'a>(c: &ChannelRecord, closes: &'a HashMap<i64, CloseInfo>) -> Option<&'a CloseInfo> {
    c.settlement_id.and_then(|s| closes.get(&s))
}

/// The rows of `bitmesh clients`, sorted by MAC, with `rate_bps` left at 0 (the
/// caller samples it for metered rows).
///
/// * `channels`: every channel, oldest first (as the store lists them);
/// * `metered`: CREDIT and USAGE of every client in the kernel maps;
/// * `ips`: the IP each MAC was last seen with;
/// * `closes`: settlement facts of closing and closed channels, by settlement id.
pub fn client_rows(
    channels: &[ChannelRecord],
    metered: &[ClientUsage],
    ips: &HashMap<Mac, String>,
    closes: &HashMap<i64, CloseInfo>,
    now: Now,
) -> Vec<ClientRow> {
    let close_of = |c: &ChannelRecord| close_info(c, closes);
    // The channel each MAC's row follows; later (newer) channels win ties.
    let mut chosen: BTreeMap<Mac, (u8, &ChannelRecord)> = BTreeMap::new();
    for c in channels {
        let Some(r) = rank(c, close_of(c), now) else { continue };
        if chosen.get(&c.mac).is_none_or(|(best, _)| r >= *best) {
            chosen.insert(c.mac, (r, c));
        }
    }
    let kernel: HashMap<Mac, &ClientUsage> = metered.iter().map(|c| (c.mac, c)).collect();
    let mut macs: Vec<Mac> = chosen.keys().copied().chain(kernel.keys().copied()).collect();
    macs.sort();
    macs.dedup();
    macs.into_iter()
        .map(|mac| {
            let ch = chosen.get(&mac).map(|(_, c)| *c);
            let k = kernel.get(&mac);
            let (up, down) = match (k, ch.and_then(|c| c.final_usage)) {
                (Some(k), _) => (k.usage.up_bytes, k.usage.down_bytes),
                (None, Some(f)) => (f.up.0, f.down.0),
                (None, None) => (0, 0),
            };
            let credited = k.map_or(0, |k| k.credited.0);
            let close = ch.and_then(close_of);
            ClientRow {
                mac: mac.to_string(),
                ip: ips.get(&mac).cloned().or_else(|| ch.map(|c| c.ip.to_string())),
                channel: ch.map(|c| c.id),
                state: ch.and_then(|c| state_of(c.state)).unwrap_or(ClientState::Unpaid),
                paid_sat: ch.map_or(0, |c| c.paid_total.to_sat()),
                credited_bytes: credited,
                up_bytes: up,
                down_bytes: down,
                remaining_bytes: credited.saturating_sub(up.saturating_add(down)),
                rate_bps: 0.0,
                last_seen_secs_ago: k
                    .filter(|k| k.usage.last_seen_ns > 0)
                    .map(|k| now.boot_ns.saturating_sub(k.usage.last_seen_ns) / 1_000_000_000),
                metered: k.is_some(),
                capacity_sat: ch.and_then(|c| c.funding).map(|f| f.capacity.to_sat()),
                close_reason: ch.and_then(|c| c.close_reason),
                close_txid: close.map(|i| i.txid.clone()),
                rail: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use bitcoin::absolute::Height;
    use bitcoin::secp256k1::{Secp256k1, SecretKey};
    use bitcoin::{Amount, OutPoint, PublicKey, ScriptBuf};
    use bitmesh_common::pricing::PriceMsatPerMib;
    use bitmesh_common::wire::ChannelId;

    use super::*;
    use crate::store::{CloseReason, FinalUsage, Funding, NewChannel};
    use bitmesh_common::kernel::Usage;
    use bitmesh_common::pricing::ByteCount;

    const NOW: Now = Now { unix: 1_000_000, boot_ns: 50_000_000_000 };

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }

    fn metered(n: u8, credited: u64, usage: Usage) -> ClientUsage {
        ClientUsage { mac: mac(n), credited: ByteCount(credited), usage }
    }

    fn key() -> PublicKey {
        let sk = SecretKey::from_slice(&[7; 32]).unwrap();
        PublicKey::new(sk.public_key(&Secp256k1::new()))
    }

    /// A channel of `mac` in `state`, number `n` (its id and age), paid `paid` sat.
    fn channel(n: u8, m: Mac, state: ChannelStage, paid: u64) -> ChannelRecord {
        let funded = !matches!(state, ChannelStage::Offered);
        ChannelRecord {
            offer: NewChannel {
                id: ChannelId([n; 32]),
                mac: m,
                ip: format!("10.0.0.{n}").parse().unwrap(),
                client_pubkey: key(),
                gateway_key_index: n as u32,
                gateway_pubkey: key(),
                expiry: Height::from_consensus(500).unwrap(),
                client_change_script: ScriptBuf::new(),
                price: PriceMsatPerMib::new(1_000_000).unwrap(),
                chunk: ByteCount(1 << 20),
                min_first_payment: Amount::from_sat(500),
            },
            state,
            funding: funded.then(|| Funding { outpoint: OutPoint::null(), capacity: Amount::from_sat(20_000), height: None }),
            close_reason: matches!(state, ChannelStage::Closing | ChannelStage::Closed).then_some(CloseReason::Client),
            settlement_id: matches!(state, ChannelStage::Closing | ChannelStage::Closed).then_some(n as i64),
            opened_at: n as i64,
            last_activity_at: n as i64,
            paid_total: Amount::from_sat(paid),
            credited: ByteCount(paid * 1000),
            payments: u64::from(paid > 0),
            final_usage: None,
        }
    }

    fn close(n: u8, ago: i64) -> (i64, CloseInfo) {
        (n as i64, CloseInfo { txid: format!("tx{n}"), broadcast_at: NOW.unix - ago })
    }

    fn usage(up: u64, down: u64, seen_secs_ago: u64) -> Usage {
        Usage { up_bytes: up, down_bytes: down, up_pkts: 1, down_pkts: 1, last_seen_ns: NOW.boot_ns - seen_secs_ago * 1_000_000_000 }
    }

    fn row(rows: &[ClientRow], m: Mac) -> &ClientRow {
        rows.iter().find(|r| r.mac == m.to_string()).unwrap_or_else(|| panic!("{m} not listed: {rows:?}"))
    }

    #[test]
    fn every_client_with_a_live_or_recent_channel_is_listed_with_its_state() {
        let mut closing = channel(3, mac(3), ChannelStage::Closing, 900);
        closing.final_usage = Some(FinalUsage { up: ByteCount(100), down: ByteCount(4000) });
        let channels = vec![
            channel(1, mac(1), ChannelStage::Offered, 0),
            channel(2, mac(2), ChannelStage::Open, 0),
            closing,
            channel(4, mac(4), ChannelStage::Closed, 700),
            channel(5, mac(5), ChannelStage::Open, 600),
        ];
        let metered = vec![metered(2, 0, Usage::default()), metered(5, 600_000, usage(1000, 9000, 3))];
        let closes = HashMap::from([close(3, 60), close(4, 3600)]);
        let rows = client_rows(&channels, &metered, &HashMap::new(), &closes, NOW);
        let states: Vec<(&str, &str)> = rows.iter().map(|r| (&r.mac[15..], r.state.as_str())).collect();
        assert_eq!(states, [("01", "awaiting_funding"), ("02", "open"), ("03", "closing"), ("04", "closed"), ("05", "open")]);

        let awaiting = row(&rows, mac(1));
        assert_eq!((awaiting.paid_sat, awaiting.credited_bytes, awaiting.metered), (0, 0, false));
        assert_eq!(awaiting.channel, Some(ChannelId([1; 32])));
        assert_eq!(awaiting.ip.as_deref(), Some("10.0.0.1"), "the channel's IP when no binding is known");
        let unpaid_open = row(&rows, mac(2));
        assert_eq!((unpaid_open.paid_sat, unpaid_open.credited_bytes, unpaid_open.metered), (0, 0, true));
        assert_eq!(unpaid_open.last_seen_secs_ago, None);
        let closing = row(&rows, mac(3));
        assert_eq!((closing.paid_sat, closing.credited_bytes, closing.remaining_bytes), (900, 0, 0));
        assert_eq!((closing.up_bytes, closing.down_bytes), (100, 4000), "what the kernel counted when metering stopped");
        assert_eq!(closing.close_txid.as_deref(), Some("tx3"));
        assert_eq!(closing.close_reason, Some(CloseReason::Client));
        let closed = row(&rows, mac(4));
        assert_eq!((closed.paid_sat, closed.credited_bytes, closed.metered), (700, 0, false));
        let paying = row(&rows, mac(5));
        assert_eq!((paying.credited_bytes, paying.up_bytes, paying.down_bytes), (600_000, 1000, 9000));
        assert_eq!(paying.remaining_bytes, 590_000);
        assert_eq!(paying.last_seen_secs_ago, Some(3));
        assert_eq!(paying.capacity_sat, Some(20_000));
    }

    #[test]
    fn one_row_per_mac_following_the_channel_that_matters_most() {
        let m = mac(9);
        // An old closed channel, then a new one awaiting funding: the new one shows.
        let channels = vec![channel(1, m, ChannelStage::Closed, 500), channel(2, m, ChannelStage::Offered, 0)];
        let rows = client_rows(&channels, &[], &HashMap::new(), &HashMap::from([close(1, 10)]), NOW);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!((rows[0].state.as_str(), rows[0].channel), ("awaiting_funding", Some(ChannelId([2; 32]))));

        // Two closed channels: the newer one.
        let channels = vec![channel(1, m, ChannelStage::Closed, 500), channel(2, m, ChannelStage::Closed, 800)];
        let rows = client_rows(&channels, &[], &HashMap::new(), &HashMap::from([close(1, 10), close(2, 10)]), NOW);
        assert_eq!((rows.len(), rows[0].paid_sat), (1, 800));
    }

    #[test]
    fn old_closes_and_abandoned_offers_are_not_listed_but_metered_strangers_are() {
        let channels = vec![
            channel(1, mac(1), ChannelStage::Closed, 500),
            channel(2, mac(2), ChannelStage::Abandoned, 0),
        ];
        let closes = HashMap::from([close(1, RECENTLY_CLOSED_SECS + 1)]);
        let metered = vec![metered(7, 0, usage(60, 60, 1))];
        let ips = HashMap::from([(mac(7), "10.0.0.77".to_string())]);
        let rows = client_rows(&channels, &metered, &ips, &closes, NOW);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!((rows[0].mac.as_str(), rows[0].state.as_str(), rows[0].channel), ("02:00:00:00:00:07", "unpaid", None));
        assert_eq!(rows[0].ip.as_deref(), Some("10.0.0.77"));
        assert!(client_rows(&[], &[], &HashMap::new(), &HashMap::new(), NOW).is_empty());
    }
}
