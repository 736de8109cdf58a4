//! `bitmesh clients` lists every client the operator cares about, through a channel's
//! whole life: awaiting funding, open before any payment, open and paying, closing,
//! closed. Before this, a client showed only while the kernel metered it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bitcoin::Amount;
use bitmesh_common::pricing::{bytes_for_payment, PriceMsatPerMib};
use bitmesh_tests::chain::CoinbaseWallet;
use bitmesh_tests::client::ScriptedClient;
use bitmesh_tests::controller::ControllerOpts;
use bitmesh_tests::testbed::Testbed;
use bitmesh_tests::upstream::udp_round_trips;
use bitmesh_tests::network::CLIENT_MAC;
use serde_json::Value;

const PRICE: u64 = 8_000_000;
const CAPACITY: Amount = Amount::from_sat(20_000);
const DATAGRAM: usize = 1000;

fn n(row: &Value, field: &str) -> u64 {
    row[field].as_u64().unwrap_or_else(|| panic!("{field} missing in {row}"))
}

#[test]
fn clients_lists_unfunded_unpaid_and_settled_clients_with_their_state() {
    let Some(lab) = Testbed::start(1).unwrap() else { return };
    let ctl = lab.start_controller(&ControllerOpts::new().with(&["--price-msat-per-mib", &PRICE.to_string(), "--zero-conf-exposure-sat", "1000000"])).unwrap();
    let mut wallet = CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced().unwrap();
    assert!(ctl.clients().unwrap().is_empty(), "nobody has asked for a channel yet");

    // Two devices: one that will pay and settle (the lab's own client, so real traffic
    // crosses the meter), one that opens and funds a channel and never pays.
    let unpaid_id = lab.add_client_identities(1, false).unwrap().remove(0);
    let mut payer = lab.scripted_client();
    let mut unpaid = ScriptedClient::with_identity(lab.client_ns(), lab.api(), unpaid_id.clone());
    let row_of = |mac: &str| ctl.client(mac).unwrap_or_else(|| panic!("{mac} not listed: {:?}", ctl.clients()));

    // Offered, not funded: awaiting funding, nothing paid or credited, not metered.
    let offer = unpaid.open(200).unwrap();
    payer.open(200).unwrap();
    let row = row_of(&unpaid_id.mac);
    assert_eq!(row["state"], "awaiting_funding", "{row}");
    assert_eq!(row["channel"].as_str(), Some(offer.channel_id.to_string().as_str()), "{row}");
    assert_eq!(row["ip"].as_str(), Some(unpaid_id.ip.to_string().as_str()), "{row}");
    assert_eq!((n(&row, "paid_sat"), n(&row, "credited_bytes")), (0, 0), "{row}");
    assert_eq!(row["metered"], false, "{row}");

    // Funded, never paid: open, metered with nothing credited.
    unpaid.fund(&mut wallet, CAPACITY).unwrap();
    payer.fund(&mut wallet, CAPACITY).unwrap();
    let row = row_of(&unpaid_id.mac);
    assert_eq!(row["state"], "open", "{row}");
    assert_eq!((n(&row, "paid_sat"), n(&row, "credited_bytes"), n(&row, "remaining_bytes")), (0, 0, 0), "{row}");
    assert_eq!(row["metered"], true, "{row}");
    assert_eq!(n(&row, "capacity_sat"), CAPACITY.to_sat(), "{row}");

    // The payer pays and sends real traffic.
    let first = payer.offer.as_ref().unwrap().min_first_payment;
    payer.pay(first).unwrap();
    let udp = lab.client_udp().unwrap();
    assert_eq!(udp_round_trips(&udp, 5, DATAGRAM), 5, "paid client blocked");
    let row = row_of(CLIENT_MAC);
    let budget = bytes_for_payment(first, PriceMsatPerMib::new(PRICE).unwrap()).0;
    assert_eq!(row["state"], "open", "{row}");
    assert_eq!((n(&row, "paid_sat"), n(&row, "credited_bytes")), (first.to_sat(), budget), "{row}");
    let used = n(&row, "up_bytes") + n(&row, "down_bytes");
    assert!(used >= 5 * 2 * DATAGRAM as u64, "traffic billed: {row}");

    // It closes: closing at once (metering stops), closed once the settlement confirms.
    // The row keeps what was paid and used; nothing is credited any more.
    let close_txid = payer.close().unwrap().close_txid.expect("close broadcast at once").to_string();
    let row = row_of(CLIENT_MAC);
    assert_eq!(row["state"], "closing", "{row}");
    assert_eq!(row["close_txid"].as_str(), Some(close_txid.as_str()), "{row}");
    assert_eq!(row["close_reason"], "client", "{row}");
    lab.node.mine(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let row = loop {
        let row = row_of(CLIENT_MAC);
        if row["state"] == "closed" {
            break row;
        }
        assert!(Instant::now() < deadline, "settlement not seen confirmed: {row}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(row["channel"].as_str(), Some(payer.channel_id().to_string().as_str()), "{row}");
    assert_eq!(n(&row, "paid_sat"), first.to_sat(), "{row}");
    assert_eq!((n(&row, "credited_bytes"), n(&row, "remaining_bytes")), (0, 0), "{row}");
    assert_eq!(row["metered"], false, "{row}");
    assert_eq!(n(&row, "up_bytes") + n(&row, "down_bytes"), used, "what it used, kept after metering stopped: {row}");

    // The unpaid client is still open; the table shows both states.
    assert_eq!(row_of(&unpaid_id.mac)["state"], "open");
    let table = ctl.cli_text(&["clients"]).unwrap();
    for want in [CLIENT_MAC, "closed", unpaid_id.mac.as_str(), "open", "STATE"] {
        assert!(table.contains(want), "{want} missing in the table:\n{table}");
    }
}
