//! The agent's reading of what a (hostile) gateway sends: HTTP answers decoded into
//! each API type or a typed error (`client::http::decode_parts`), the `Date` and
//! `Retry-After` headers, the server-sent-event stream (`client::events`), and the
//! checks the decoded terms and open answers go through before anything is paid.
//! Invariants: never panic; the event parser's memory stays bounded; a
//! `Retry-After` never parks the agent beyond its cap; accepted terms never pay
//! more ahead than the user's caps.
//!
//! Input: byte 0 picks what to parse, byte 1 the HTTP status, then headers
//! (`retry-after` and `date`, up to 0x00 bytes), then the body.

#![no_main]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bitcoin::{Amount, Network};
use bitmesh_client::events::{SseParser, MAX_EVENT, MAX_LINE};
use bitmesh_client::http::{clock_offset_ms, decode_parts, parse_event, HttpError, MAX_RETRY_AFTER};
use bitmesh_client::session::{check_open_response, check_open_terms};
use bitmesh_client::terms::{check_terms, describe, UserLimits, DEFAULT_MAX_CHUNK, DEFAULT_MAX_PREPAID};
use bitmesh_client::tip::{check_tip, TipEvidence};
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::pricing::{payment_for_bytes, PriceMsatPerMib};
use bitmesh_common::wire::{CaptiveStatus, ChannelStatus, CloseResponse, OpenRequest, OpenResponse, PaymentAck, Terms};
use libfuzzer_sys::fuzz_target;

fn user() -> UserLimits {
    UserLimits {
        max_price: PriceMsatPerMib::new(5_000).expect("price"),
        network: Network::Regtest,
        min_expiry_blocks: BlockCount(6),
        max_expiry_blocks: BlockCount(1008),
        max_spend: Amount::from_sat(50_000),
        capacity: None,
        max_chunk: DEFAULT_MAX_CHUNK,
        max_prepaid: DEFAULT_MAX_PREPAID,
    }
}

fn check_error(e: &HttpError) {
    let _ = e.to_string();
    if let Some(wait) = e.retry_after() {
        assert!(wait <= MAX_RETRY_AFTER, "Retry-After {wait:?} above the cap");
    }
}

fn answer<T: serde::de::DeserializeOwned>(status: i32, headers: &BTreeMap<String, String>, body: &[u8]) -> Option<T> {
    match decode_parts::<T>("/fuzz", status, headers, body) {
        Ok(v) => Some(v),
        Err(e) => {
            check_error(&e);
            None
        }
    }
}

fn terms_checks(terms: &Terms) {
    let u = user();
    if let Ok(accepted) = check_terms(terms, &u) {
        let _ = describe(terms, &accepted);
        assert!(accepted.chunk <= u.max_chunk && accepted.chunk <= terms.chunk_bytes);
        assert!(payment_for_bytes(accepted.chunk, terms.price_msat_per_mib) <= u.max_prepaid + Amount::from_sat(1));
        assert!(terms.min_first_payment <= u.max_prepaid);
        assert!(accepted.max_spend <= accepted.capacity);
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let _ = check_tip(terms.tip_height, &TipEvidence { network: terms.network, own: None, last: None, now_unix: now });
}

fuzz_target!(|data: &[u8]| {
    let Some((&what, rest)) = data.split_first() else { return };
    let Some((&status, rest)) = rest.split_first() else { return };
    let mut parts = rest.splitn(3, |&b| b == 0);
    let retry = parts.next().unwrap_or_default();
    let date = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let status = match status {
        0..=99 => 200,
        100..=199 => i32::from(status) + 300,
        _ => i32::from(status),
    };
    let mut headers = BTreeMap::new();
    if !retry.is_empty() {
        headers.insert("retry-after".to_owned(), String::from_utf8_lossy(retry).into_owned());
    }
    if !date.is_empty() {
        let date = String::from_utf8_lossy(date).into_owned();
        let _ = clock_offset_ms(&date, UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        headers.insert("date".to_owned(), date);
    }

    match what % 8 {
        0 => {
            if let Some(t) = answer::<Terms>(status, &headers, body) {
                terms_checks(&t);
            }
        }
        1 => {
            if let Some(resp) = answer::<OpenResponse>(status, &headers, body) {
                // Against a request naming the answer's own key and expiry: the checks
                // must answer, never panic, whatever the rest says.
                let req = OpenRequest {
                    client_pubkey: resp.client_pubkey,
                    expiry: resp.expiry,
                    client_change_script: bitcoin::ScriptBuf::new(),
                };
                let _ = check_open_response(&req, &resp, Network::Regtest);
                let terms: Option<Terms> = serde_json::from_slice(body).ok();
                if let Some(t) = terms {
                    let _ = check_open_terms(&t, &resp);
                }
            }
        }
        2 => {
            let _ = answer::<PaymentAck>(status, &headers, body);
        }
        3 => {
            let _ = answer::<ChannelStatus>(status, &headers, body);
        }
        4 => {
            let _ = answer::<CloseResponse>(status, &headers, body);
        }
        5 => {
            let _ = answer::<CaptiveStatus>(status, &headers, body);
        }
        _ => {
            // The event stream, fed byte by byte as it arrives.
            let mut parser = SseParser::default();
            for &b in body {
                if let Some(data) = parser.push(b) {
                    assert!(data.len() <= MAX_EVENT, "event of {} bytes", data.len());
                    let _ = parse_event(&data);
                }
                assert!(parser.pending_len() <= MAX_EVENT + MAX_LINE, "parser holds {} bytes", parser.pending_len());
            }
        }
    }
});
