//! The Lightning rail of the client API (docs/api.md, "Lightning"): bundles in the
//! terms, invoices, their status, and moving a purchase to a new MAC.
//!
//! A device buys bytes with a BOLT11 invoice; the bytes land on the device's
//! Lightning credit account, named by its purchase token (a secret the device keeps,
//! shown as a short code such as `ABCD-EFGH-IJKL-MNOP-QRST-UVWX-YZ`). The gateway
//! stores only a hash of the token. With the token a device that changed its MAC
//! moves its remaining credit to the new MAC ([`RestoreRequest`]).

use serde::{Deserialize, Serialize};

use super::{ChannelId, DeviceStatus};

/// What `GET /v1/terms` says about Lightning (absent when the gateway has no node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LightningTerms {
    /// The gateway's Lightning node id (hex public key).
    pub node_id: String,
    /// The operator's bundles, in the order configured.
    pub bundles: Vec<Bundle>,
    /// Lightning credit is lost this long after the account's last purchase, in seconds.
    pub credit_ttl_secs: u64,
}

/// One bundle on sale: `bytes` for `price_msat` (the price flag, rounded up to a
/// whole satoshi).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// The name as the operator wrote it (`50MiB`); what [`InvoiceRequest::bundle`] names.
    pub name: String,
    /// Bytes the bundle credits.
    pub bytes: u64,
    /// What the invoice asks, in millisatoshis.
    pub price_msat: u64,
}

/// `POST /v1/invoices`: exactly one of `bundle` or `bytes`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvoiceRequest {
    /// A bundle name from the terms.
    #[serde(default)]
    pub bundle: Option<String>,
    /// Or a number of bytes.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// The device's purchase token, if it has one: the purchase tops up that
    /// token's account, so one code keeps naming all of the device's credit. If the
    /// account is on another MAC (the device's MAC changed), it moves to the
    /// requesting MAC first, as with [`RestoreRequest`]. Without it, the requesting
    /// MAC's own account is used (created on its first invoice).
    #[serde(default)]
    pub token: Option<String>,
}

/// The answer to [`InvoiceRequest`] (201): pay `bolt11` with any Lightning wallet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    /// Hex payment hash: the invoice's id for [`InvoiceStatus`].
    pub payment_hash: String,
    /// The BOLT11 invoice.
    pub bolt11: String,
    /// Amount asked, in millisatoshis.
    pub amount_msat: u64,
    /// Bytes the payment credits.
    pub bytes: u64,
    /// The invoice description (names the gateway and the bytes).
    pub description: String,
    /// Unix seconds after which a wallet should not pay it any more.
    pub expires_at: u64,
    /// The device's purchase token: keep it to move the credit to a new MAC.
    pub token: String,
}

/// Where an invoice stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvoiceState {
    /// Not paid yet, not expired.
    Pending,
    /// Paid: the receipt is journaled and the bytes are credited.
    Paid,
    /// Past its expiry and not paid.
    Expired,
}

/// `GET /v1/invoices/{payment_hash}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceStatus {
    /// Hex payment hash.
    pub payment_hash: String,
    /// Pending, paid or expired.
    pub state: InvoiceState,
    /// Bytes the invoice was asked for.
    pub bytes: u64,
    /// Bytes credited for it (0 until paid; more than `bytes` after an overpayment).
    pub bytes_credited: u64,
}

/// `POST /v1/restore`: move the token's remaining credit to the requesting MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The purchase token, as shown (case, dashes and spaces do not matter).
    pub token: String,
}

/// The answer to [`RestoreRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreResponse {
    /// Lightning bytes now credited to the requesting MAC.
    pub bytes_remaining: u64,
    /// Unix seconds when they expire.
    pub expires_at: u64,
}

/// A push on a device's event stream (`GET /v1/device/events`): the requester's
/// own MAC, like `GET /v1/device`. The JSON carries the kind in its `event` field,
/// the same word as the SSE event name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum DeviceEvent {
    /// A Lightning payment for this device is journaled and its bytes are credited
    /// in the kernel (sent only after both). May be sent again for the same
    /// payment (e.g. after a retried credit): key it by `payment_hash`.
    InvoicePaid(InvoicePaid),
    /// The device's figures: sent first when the stream opens, then whenever they
    /// change (at most once a second, plus right after a payment).
    Credit(DeviceStatus),
}

impl DeviceEvent {
    /// The SSE event name (equal to the JSON `event` tag).
    pub fn name(&self) -> &'static str {
        match self {
            DeviceEvent::InvoicePaid(_) => "invoice_paid",
            DeviceEvent::Credit(_) => "credit",
        }
    }
}

/// What [`DeviceEvent::InvoicePaid`] reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoicePaid {
    /// Hex payment hash of the invoice.
    pub payment_hash: String,
    /// What the payer sent, in millisatoshis.
    pub amount_msat: u64,
    /// Bytes credited for it (more than the invoice's bytes after an overpayment).
    pub bytes_credited: u64,
}

/// How a device pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rail {
    /// An on-chain payment channel (`bitmesh pay`).
    Channel,
    /// Lightning bundles.
    Lightning,
}

/// One device's credit across both rails (one kernel meter): what the portal page shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCredit {
    /// Everything the kernel lets this MAC use since its meter entries were made.
    pub bytes_credited_total: u64,
    /// What the kernel counted.
    pub bytes_used: u64,
    /// `credited - used`.
    pub bytes_remaining: u64,
    /// The Lightning part of `bytes_remaining`.
    pub lightning_bytes_remaining: u64,
    /// When the Lightning credit expires (unix seconds), if there is any.
    pub lightning_expires_at: Option<u64>,
    /// The device's open channel, if any.
    pub channel: Option<ChannelId>,
    /// The rails the device has credit on now.
    pub rails: Vec<Rail>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn invoice_request_takes_either_field_and_refuses_unknown_ones() {
        let r: InvoiceRequest = serde_json::from_str(r#"{"bundle":"50MiB"}"#).unwrap();
        assert_eq!(r.bundle.as_deref(), Some("50MiB"));
        assert_eq!(r.bytes, None);
        let r: InvoiceRequest = serde_json::from_str(r#"{"bytes":1000,"token":"AB"}"#).unwrap();
        assert_eq!((r.bytes, r.token.as_deref()), (Some(1000), Some("AB")));
        assert!(serde_json::from_str::<InvoiceRequest>(r#"{"bites":1}"#).is_err());
    }

    #[test]
    fn device_event_names_match_the_json_tag_and_round_trip() {
        let paid = DeviceEvent::InvoicePaid(InvoicePaid { payment_hash: "ab".repeat(32), amount_msat: 313_000, bytes_credited: 40_960 });
        let credit = DeviceEvent::Credit(DeviceStatus {
            mac: "02:c0:00:00:00:01".into(),
            captive: false,
            bytes_credited: 40_960,
            bytes_used: 0,
            bytes_remaining: 40_960,
            seconds_remaining: Some(86_400),
            channel: None,
            lightning_bytes_remaining: Some(40_960),
            lightning_expires_at: Some(1_800_000_000),
        });
        for ev in [paid, credit] {
            let v = serde_json::to_value(&ev).unwrap();
            assert_eq!(v["event"], ev.name());
            assert_eq!(serde_json::from_value::<DeviceEvent>(v).unwrap(), ev);
        }
    }

    #[test]
    fn invoice_state_is_snake_case() {
        let s = InvoiceStatus { payment_hash: "ab".into(), state: InvoiceState::Paid, bytes: 1, bytes_credited: 1 };
        assert!(serde_json::to_string(&s).unwrap().contains(r#""state":"paid""#));
        assert_eq!(serde_json::to_string(&Rail::Lightning).unwrap(), r#""lightning""#);
    }
}
