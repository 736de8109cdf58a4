//! Prometheus text exposition (`GET /metrics`) on the operator-chosen address.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::gateway::Gateway;
use crate::store::ChannelStage;

/// Render the metrics.
pub fn render(gw: &Gateway) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let (counts, payments) = gw.store().channel_counts().unwrap_or_default();
    let states = [
        ChannelStage::Offered,
        ChannelStage::Open,
        ChannelStage::Closing,
        ChannelStage::Closed,
        ChannelStage::Abandoned,
        ChannelStage::DoubleSpent,
    ];
    gauge(
        "bitmesh_channels",
        "Channels by state.",
        states
            .iter()
            .map(|s| (format!("{{state=\"{s}\"}}"), counts.iter().find(|(c, _)| c == s).map_or(0, |(_, n)| *n)))
            .collect(),
    );
    if let Ok(e) = gw.store().earnings() {
        gauge(
            "bitmesh_earnings_sat",
            "Gateway money in satoshis: settled, pending, held in open channels.",
            vec![
                ("{bucket=\"settled\"}".into(), e.settled.to_sat()),
                ("{bucket=\"pending\"}".into(), e.pending.to_sat()),
                ("{bucket=\"held_open\"}".into(), e.held_open.to_sat()),
            ],
        );
    }
    gauge("bitmesh_payments", "Payment updates journaled (all channels).", vec![(String::new(), payments)]);
    let metered = gw.metered_clients().unwrap_or_default();
    gauge("bitmesh_metered_clients", "Clients in the kernel maps.", vec![(String::new(), metered.len() as u64)]);
    gauge(
        "bitmesh_credited_bytes",
        "Bytes credited, all metered clients.",
        vec![(String::new(), metered.iter().map(|c| c.credited.0).sum())],
    );
    gauge(
        "bitmesh_used_bytes",
        "Bytes billed by the kernel, by direction.",
        vec![
            ("{direction=\"up\"}".into(), metered.iter().map(|c| c.usage.up_bytes).sum()),
            ("{direction=\"down\"}".into(), metered.iter().map(|c| c.usage.down_bytes).sum()),
        ],
    );
    gauge(
        "bitmesh_second_source_frames",
        "Billable frames from bound clients' MACs with another source address (MAC cloning; dropped when --enforce-bound-ip).",
        vec![(String::new(), gw.second_source_frames())],
    );
    gauge("bitmesh_chain_tip_height", "Chain tip as last seen.", vec![(String::new(), gw.tip().to_consensus_u32() as u64)]);
    if gw.lightning().is_some() {
        let t = gw.store().ln_totals().unwrap_or_default();
        gauge("bitmesh_lightning_receipts_total", "Lightning payments journaled.", vec![(String::new(), t.receipts)]);
        gauge("bitmesh_lightning_received_msat_total", "Lightning payments received, msat.", vec![(String::new(), t.received_msat)]);
        gauge("bitmesh_lightning_credit_live_bytes", "Lightning bytes on accounts, not yet used, moved or expired.", vec![(String::new(), t.bytes_live)]);
        gauge("bitmesh_lightning_credit_expired_bytes_total", "Lightning bytes lost at expiry.", vec![(String::new(), t.bytes_expired)]);
        gauge("bitmesh_lightning_accounts_live", "Devices with live Lightning credit.", vec![(String::new(), t.accounts_live)]);
        if let Some(node) = gw.lightning().and_then(|r| r.node.as_ref()) {
            let b = node.list_balances();
            let ch = node.list_channels();
            gauge("bitmesh_lightning_onchain_sat", "The Lightning node's on-chain balance.", vec![(String::new(), b.total_onchain_balance_sats)]);
            gauge("bitmesh_lightning_balance_sat", "The Lightning node's balance in its channels (what it could withdraw).", vec![(String::new(), b.total_lightning_balance_sats)]);
            gauge("bitmesh_lightning_channels", "The Lightning node's channels.", vec![(String::new(), ch.len() as u64)]);
            gauge(
                "bitmesh_lightning_capacity_msat",
                "Capacity of the Lightning node's channels, by direction.",
                vec![
                    ("{direction=\"inbound\"}".into(), ch.iter().map(|c| c.inbound_capacity_msat).sum()),
                    ("{direction=\"outbound\"}".into(), ch.iter().map(|c| c.outbound_capacity_msat).sum()),
                ],
            );
        }
    }
    out
}

/// Serve `/metrics` on `addr` forever.
pub async fn serve(gw: Arc<Gateway>, addr: SocketAddr) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let gw = gw.clone();
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render(&gw)).into_response() }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}
