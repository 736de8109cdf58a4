//! The gateway's JSON API, from the client side (blocking HTTP over `bitreq`, which
//! the tree already carries for the bitcoind RPC client).
//!
//! Every route path and wire type comes from `bitmesh_common::wire` (docs/api.md),
//! the same definitions the controller's router serves.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bitcoin::hex::DisplayHex;
use bitcoin::secp256k1::{Message, SecretKey};
use bitmesh_common::wire::{
    routes, CaptiveStatus, ChannelId, ChannelStatus, ClientEvent, CloseRequest,
    CloseResponse, DeviceEvent, ErrorBody, ErrorCode, FundRequest, Invoice, InvoiceRequest, InvoiceStatus, OpenRequest,
    OpenResponse, PaymentAck, PaymentUpdate, SignatureBytes, SignedAction, Terms, AUTH_HEADER,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How long one request may take (the gateway is one hop away).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest answer accepted (a status is a few hundred bytes).
const MAX_BODY: usize = 1 << 20;

/// A failed gateway request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The gateway could not be reached.
    #[error("cannot reach the gateway at {url}: {message}: check you are on its WiFi, or pass --gateway URL")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The gateway refused the request with a stable error code.
    #[error("gateway refused {path}: {} ({})", .body.message, .body.code)]
    Refused {
        /// The route.
        path: String,
        /// HTTP status.
        status: i32,
        /// The error body.
        body: ErrorBody,
        /// The `Retry-After` header (seconds), when the gateway sent one
        /// (`rate_limited` answers carry it).
        retry_after: Option<Duration>,
    },
    /// The gateway answered something that is not the expected JSON.
    #[error("gateway answered {path} with HTTP {status} and an unexpected body ({message}): is this a BitMesh gateway?")]
    Malformed {
        /// The route.
        path: String,
        /// HTTP status.
        status: i32,
        /// What was wrong.
        message: String,
    },
}

impl HttpError {
    /// The gateway's error code, when it refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            HttpError::Refused { body, .. } => Some(body.code),
            _ => None,
        }
    }

    /// How long the gateway asked the agent to wait before the next request
    /// (`Retry-After` of a `rate_limited` answer), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            HttpError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A client of one gateway.
#[derive(Debug, Clone)]
pub struct GatewayApi {
    base: String,
}

impl GatewayApi {
    /// A client of the gateway at `base` (e.g. `http://10.0.0.1:3141`).
    pub fn new(base: &str) -> GatewayApi {
        GatewayApi { base: base.trim_end_matches('/').to_owned() }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /v1/terms`.
    pub fn terms(&self) -> Result<Terms, HttpError> {
        self.get(routes::TERMS, None)
    }

    /// `GET /captive-portal/api`.
    pub fn captive(&self) -> Result<CaptiveStatus, HttpError> {
        self.get(routes::CAPTIVE, None)
    }

    /// `POST /v1/invoices`: a Lightning invoice for a bundle or bytes.
    pub fn invoice(&self, req: &InvoiceRequest) -> Result<Invoice, HttpError> {
        self.post(routes::INVOICES, req)
    }

    /// `GET /v1/invoices/{payment_hash}`.
    pub fn invoice_status(&self, payment_hash: &str) -> Result<InvoiceStatus, HttpError> {
        self.get(&routes::invoice(payment_hash), None)
    }

    /// `POST /v1/channels`.
    pub fn open(&self, req: &OpenRequest) -> Result<OpenResponse, HttpError> {
        self.post(routes::CHANNELS, req)
    }

    /// `POST /v1/channels/{id}/funding`: the gateway relays the transaction.
    pub fn fund(&self, req: &FundRequest) -> Result<ChannelStatus, HttpError> {
        self.post(&routes::funding(&req.channel_id), req)
    }

    /// `POST /v1/channels/{id}/payments`.
    pub fn pay(&self, update: &PaymentUpdate) -> Result<PaymentAck, HttpError> {
        self.post(&routes::payments(&update.channel_id), update)
    }

    /// `GET /v1/channels/{id}`, signed with the channel's client key.
    pub fn status(&self, id: &ChannelId, key: &SecretKey) -> Result<ChannelStatus, HttpError> {
        self.get(&routes::channel(id), Some(auth_header(SignedAction::Status, id, key)))
    }

    /// `POST /v1/channels/{id}/close`, signed with the channel's client key.
    pub fn close(&self, id: &ChannelId, key: &SecretKey) -> Result<CloseResponse, HttpError> {
        let (counter, signature) = signed_request(SignedAction::Close, id, key);
        let req = CloseRequest { channel_id: *id, counter, signature };
        self.post(&routes::close(id), &req)
    }

    /// Open the event stream: a reader of [`ClientEvent`]s, one per `next()`.
    pub fn events(&self, id: &ChannelId, key: &SecretKey) -> Result<EventStream, HttpError> {
        let resp = self.open_stream(&routes::events(id), Some(auth_header(SignedAction::Events, id, key)))?;
        Ok(SseStream::new(resp))
    }

    /// `GET /v1/device/events`: this device's event stream (its Lightning payments
    /// credited, its credit), a reader of [`DeviceEvent`]s.
    pub fn device_events(&self) -> Result<DeviceEventStream, HttpError> {
        let resp = self.open_stream(routes::DEVICE_EVENTS, None)?;
        Ok(SseStream::new(resp))
    }

    /// A `text/event-stream` GET: the open response, or the gateway's refusal.
    fn open_stream(&self, path: &str, auth: Option<String>) -> Result<bitreq::ResponseLazy, HttpError> {
        let url = format!("{}{path}", self.base);
        let mut req = bitreq::get(url.as_str()).with_header("Accept", "text/event-stream");
        if let Some(value) = auth {
            req = req.with_header(AUTH_HEADER, value);
        }
        let resp = req.send_lazy().map_err(|e| HttpError::Unreachable { url: url.clone(), message: e.to_string() })?;
        learn_gateway_clock(&resp.headers);
        if resp.status_code != 200 {
            let (status, wait) = (resp.status_code, retry_after(&resp.headers));
            let body: Vec<u8> = resp.take(MAX_BODY).filter_map(|b| b.ok().map(|(b, _)| b)).collect();
            return Err(error_from(path, status, wait, &body));
        }
        Ok(resp)
    }

    fn get<T: DeserializeOwned>(&self, path: &str, auth: Option<String>) -> Result<T, HttpError> {
        let url = format!("{}{path}", self.base);
        let mut req = bitreq::get(url.as_str()).with_timeout(REQUEST_TIMEOUT.as_secs()).with_max_body_size(MAX_BODY);
        if let Some(value) = auth {
            req = req.with_header(AUTH_HEADER, value);
        }
        let resp = req.send().map_err(|e| HttpError::Unreachable { url, message: e.to_string() })?;
        decode(path, &resp)
    }

    fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, HttpError> {
        let url = format!("{}{path}", self.base);
        let json = serde_json::to_vec(body).map_err(|e| HttpError::Malformed {
            path: path.to_owned(),
            status: 0,
            message: format!("cannot encode the request: {e}"),
        })?;
        let resp = bitreq::post(url.as_str())
            .with_header("Content-Type", "application/json")
            .with_body(json)
            .with_timeout(REQUEST_TIMEOUT.as_secs())
            .with_max_body_size(MAX_BODY)
            .send()
            .map_err(|e| HttpError::Unreachable { url, message: e.to_string() })?;
        decode(path, &resp)
    }
}


/// Last request counter this process signed (any channel).
static LAST_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The gateway's clock minus ours, in ms, learned from its `Date` headers: a client
/// that has not paid yet has no internet and maybe no NTP, and the gateway takes a
/// counter only within 120 s of its own clock.
static GATEWAY_CLOCK_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Offsets smaller than this are left at zero: `Date` has one-second resolution.
const CLOCK_OFFSET_MIN_MS: i64 = 5_000;

/// The gateway's clock minus `now`, from an HTTP `Date` header value; `None` when the
/// header does not parse, `Some(0)` when the clocks agree to within the header's
/// resolution.
pub fn clock_offset_ms(date: &str, now: SystemTime) -> Option<i64> {
    let gateway = httpdate::parse_http_date(date).ok()?;
    let offset = match gateway.duration_since(now) {
        Ok(ahead) => i64::try_from(ahead.as_millis()).ok()?,
        Err(behind) => -i64::try_from(behind.duration().as_millis()).ok()?,
    };
    Some(if offset.abs() < CLOCK_OFFSET_MIN_MS { 0 } else { offset })
}

/// Follow the gateway's clock as its latest response states it.
fn learn_gateway_clock(headers: &std::collections::BTreeMap<String, String>) {
    if let Some(offset) = headers.get("date").and_then(|d| clock_offset_ms(d, SystemTime::now())) {
        GATEWAY_CLOCK_OFFSET_MS.store(offset, Ordering::Relaxed);
    }
}

/// A fresh request counter: milliseconds since the Unix epoch on the gateway's clock
/// (ours, corrected by what its `Date` headers say), strictly above every counter this
/// process signed before (`max(now_ms, last + 1)`), so two requests in the same
/// millisecond still get distinct counters and the gateway takes both.
pub fn next_counter() -> u64 {
    let ours = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let now = u64::try_from(ours.saturating_add(GATEWAY_CLOCK_OFFSET_MS.load(Ordering::Relaxed))).unwrap_or(0);
    let step = |last: u64| Some(now.max(last.saturating_add(1)));
    match LAST_COUNTER.fetch_update(Ordering::SeqCst, Ordering::SeqCst, step) {
        Ok(last) | Err(last) => now.max(last.saturating_add(1)),
    }
}

/// The [`AUTH_HEADER`] value of a channel-scoped GET: `<counter>.<hex DER signature>`,
/// the signature over [`SignedAction::digest`]`(id, counter)` with a fresh
/// [`next_counter`] (the gateway takes each counter once, within 120 s of its clock).
pub fn auth_header(action: SignedAction, id: &ChannelId, key: &SecretKey) -> String {
    let (counter, sig) = signed_request(action, id, key);
    format!("{counter}.{}", sig.0.to_lower_hex_string())
}

/// A fresh [`next_counter`] and the DER signature over
/// [`SignedAction::digest`]`(id, counter)` with the channel's client key (a signed
/// GET's header, a close request's body): each is single-use at the gateway.
pub fn signed_request(action: SignedAction, id: &ChannelId, key: &SecretKey) -> (u64, SignatureBytes) {
    let counter = next_counter();
    let msg = Message::from_digest(action.digest(id, counter));
    let sig = bitmesh_channel::secp().sign_ecdsa(&msg, key);
    (counter, SignatureBytes(sig.serialize_der().to_vec()))
}

fn decode<T: DeserializeOwned>(path: &str, resp: &bitreq::Response) -> Result<T, HttpError> {
    learn_gateway_clock(&resp.headers);
    decode_parts(path, resp.status_code, &resp.headers, resp.as_bytes())
}

/// How the agent reads one gateway answer (status, lowercased headers, body) as
/// `T` or a typed error. Public so the fuzz targets reach it without a socket.
pub fn decode_parts<T: DeserializeOwned>(
    path: &str,
    status: i32,
    headers: &std::collections::BTreeMap<String, String>,
    body: &[u8],
) -> Result<T, HttpError> {
    if (200..300).contains(&status) {
        return serde_json::from_slice(body).map_err(|e| HttpError::Malformed {
            path: path.to_owned(),
            status,
            message: e.to_string(),
        });
    }
    Err(error_from(path, status, retry_after(headers), body))
}

/// Longest `Retry-After` honoured: a gateway asking for more is treated as asking
/// for this, so a bogus header cannot park the agent (and its payments) for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// `Retry-After` in its delay-seconds form (the only one the controller sends;
/// bitreq lowercases header names), capped at [`MAX_RETRY_AFTER`].
fn retry_after(headers: &std::collections::BTreeMap<String, String>) -> Option<Duration> {
    let secs: u64 = headers.get("retry-after")?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

fn error_from(path: &str, status: i32, retry_after: Option<Duration>, body: &[u8]) -> HttpError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(body) => HttpError::Refused { path: path.to_owned(), status, body, retry_after },
        Err(_) => HttpError::Malformed {
            path: path.to_owned(),
            status,
            message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        },
    }
}

/// The channel event a `data` payload of the stream carries, if the agent
/// understands it (what [`EventStream::next_event`] returns for it).
pub fn parse_event(data: &str) -> Option<ClientEvent> {
    decode_event(data)
}

/// An event of type `E` from a `data` payload; `None` for one the agent does not
/// understand (a newer gateway may add some).
fn decode_event<E: DeserializeOwned>(data: &str) -> Option<E> {
    serde_json::from_str::<E>(data).ok()
}

/// An open server-sent event stream of `E`: the channel's ([`EventStream`]) or the
/// device's ([`DeviceEventStream`]).
pub struct SseStream<E> {
    inner: bitreq::ResponseLazy,
    parser: super::events::SseParser,
    _event: std::marker::PhantomData<fn() -> E>,
}

/// A channel's event stream (`GET /v1/channels/{id}/events`).
pub type EventStream = SseStream<ClientEvent>;
/// A device's event stream (`GET /v1/device/events`).
pub type DeviceEventStream = SseStream<DeviceEvent>;

impl<E: DeserializeOwned> SseStream<E> {
    fn new(inner: bitreq::ResponseLazy) -> SseStream<E> {
        SseStream { inner, parser: super::events::SseParser::default(), _event: std::marker::PhantomData }
    }

    /// The next event, blocking; `None` when the stream ended or broke. Events the
    /// agent does not understand are skipped (a newer gateway may add some).
    pub fn next_event(&mut self) -> Option<E> {
        loop {
            let (byte, _) = self.inner.next()?.ok()?;
            if let Some(ev) = self.parser.push(byte).as_deref().and_then(decode_event) {
                return Some(ev);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counters_are_current_ms_and_strictly_increasing() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let counters: Vec<u64> = (0..1000).map(|_| next_counter()).collect();
        assert!(counters.windows(2).all(|w| w[1] > w[0]), "strictly increasing");
        assert!(counters[0] >= now && counters[0] < now + 60_000, "milliseconds since the epoch");
    }

    #[test]
    fn counters_follow_the_gateway_clock_from_its_date_header() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |secs: u64| httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs));
        // Ten minutes ahead, ten minutes behind, and within the header's resolution.
        assert_eq!(clock_offset_ms(&at(1_800_000_600), now), Some(600_000));
        assert_eq!(clock_offset_ms(&at(1_799_999_400), now), Some(-600_000));
        assert_eq!(clock_offset_ms(&at(1_800_000_001), now), Some(0));
        assert_eq!(clock_offset_ms("not a date", now), None);
    }
}
