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
