//! The client-facing HTTP/JSON API (axum): routing, decoding, limits and error codes.
//!
//! The HTTP layer decides nothing about money: every handler decodes, checks limits
//! and calls one method of [`ClientGateway`], the narrow interface the controller
//! (`gateway`) implements. Tests drive the router with a fake gateway.
//!
//! Routes (details and the error table: `docs/api.md`):
//!
//! | method | path | body -> answer |
//! | --- | --- | --- |
//! | GET  | /v1/terms | -> `Terms` |
//! | POST | /v1/channels | `OpenRequest` -> `OpenResponse` |
//! | POST | /v1/channels/{id}/funding | `FundRequest` -> `ChannelStatus` (relays the tx) |
//! | POST | /v1/channels/{id}/payments | `PaymentUpdate` -> `PaymentAck` |
//! | GET  | /v1/channels/{id} | -> `ChannelStatus` (signed header) |
//! | POST | /v1/channels/{id}/close | `CloseRequest` -> `CloseResponse` |
//! | GET  | /v1/channels/{id}/events | -> SSE stream of [`ClientEvent`] (signed header) |
//! | GET  | /captive-portal/api | -> RFC 8908 [`CaptiveStatus`] |
//! | GET  | /v1/device | -> `DeviceStatus` (the requester's device, by MAC) |
//! | GET  | /v1/device/events | -> SSE stream of [`DeviceEvent`] (the requester's device, by MAC) |
//! | GET  | /portal/ | the captive-portal page (`crate::portal::page`) |
//! | POST | /v1/invoices | `InvoiceRequest` -> 201 `Invoice` (Lightning) |
//! | GET  | /v1/invoices/{payment_hash} | -> `InvoiceStatus` |
//! | POST | /v1/restore | `RestoreRequest` -> `RestoreResponse` |

mod captive;
mod error;
mod extract;
mod limits;
mod serve;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use bitmesh_common::wire::routes;
use bitmesh_common::wire::{
    CaptiveStatus, ChannelStatus, ClientEvent, CloseRequest, CloseResponse, DeviceEvent, DeviceStatus, FundRequest, Invoice,
    InvoiceRequest, InvoiceStatus, OpenRequest, OpenResponse, PaymentAck, PaymentUpdate, RestoreRequest,
    RestoreResponse, SignedRequest, Terms,
};
use extract::{ChannelJson, Signed};
use tokio::sync::mpsc;

pub use error::ApiError;
pub use extract::ApiJson;
pub use limits::{ClientKey, ClientKeys, RateLimiter};
pub use serve::{serve, serve_tls, ConnLimits, ConnPermit, ConnSlots, Refusal};

/// What the API needs from the controller. `peer` is the TCP peer address of the
/// request: the gateway resolves it to the device's MAC on the client interface.
///
/// The gateway answers in its own error type; the handlers turn it into an
/// [`ApiError`] (code and HTTP status) with `?`, through its one `From` impl.
pub trait ClientGateway: Send + Sync + 'static {
    /// The gateway's own error.
    type Error: Send;
    fn terms(&self) -> impl Future<Output = Result<Terms, Self::Error>> + Send;
    fn open(&self, peer: IpAddr, req: OpenRequest) -> impl Future<Output = Result<OpenResponse, Self::Error>> + Send;
    fn fund(&self, peer: IpAddr, req: FundRequest) -> impl Future<Output = Result<ChannelStatus, Self::Error>> + Send;
    /// Verify, persist (synced), credit, then return the ack. Nothing else.
    fn pay(&self, peer: IpAddr, update: PaymentUpdate) -> impl Future<Output = Result<PaymentAck, Self::Error>> + Send;
    /// `req` is parsed, not yet verified (action `status`).
    fn status(&self, peer: IpAddr, req: SignedRequest) -> impl Future<Output = Result<ChannelStatus, Self::Error>> + Send;
    fn close(&self, peer: IpAddr, req: CloseRequest) -> impl Future<Output = Result<CloseResponse, Self::Error>> + Send;
    /// `req` is parsed, not yet verified (action `events`).
    fn events(
        &self,
        peer: IpAddr,
        req: SignedRequest,
    ) -> impl Future<Output = Result<mpsc::Receiver<ClientEvent>, Self::Error>> + Send;
    fn captive(&self, peer: IpAddr) -> impl Future<Output = Result<CaptiveStatus, Self::Error>> + Send;
    /// The requester's own device status (by its MAC), for the portal page; `None`
    /// from a gateway that does not report devices (the route answers `bad_request`).
    fn device(&self, _peer: IpAddr) -> impl Future<Output = Result<Option<DeviceStatus>, Self::Error>> + Send {
        async { Ok(None) }
    }
    /// The requester's device event stream (Lightning payments credited, credit
    /// changes), by its MAC; `None` from a gateway that has none (the route then
    /// answers `bad_request`).
    fn device_events(
        &self,
        _peer: IpAddr,
    ) -> impl Future<Output = Result<Option<mpsc::Receiver<DeviceEvent>>, Self::Error>> + Send {
        async { Ok(None) }
    }
    /// A Lightning invoice for the requesting device (recorded before it is returned).
    fn invoice(&self, peer: IpAddr, req: InvoiceRequest) -> impl Future<Output = Result<Invoice, Self::Error>> + Send;
    /// An invoice's status, by hex payment hash.
    fn invoice_status(&self, payment_hash: String) -> impl Future<Output = Result<InvoiceStatus, Self::Error>> + Send;
    /// Move a purchase token's Lightning credit to the requesting device.
    fn restore(&self, peer: IpAddr, req: RestoreRequest) -> impl Future<Output = Result<RestoreResponse, Self::Error>> + Send;
    /// Who limits count `peer` against (rate limits, connection caps): its MAC on
    /// the client interface when known. Called per connection and per request, so
    /// it must be cheap and must not block for long.
    fn client_key(&self, peer: IpAddr) -> ClientKey {
        ClientKey::Ip(peer)
    }
}

/// The [`ClientKeys`] resolver of a gateway (for [`serve`] and the rate limits).
pub fn client_keys<G: ClientGateway>(gw: Arc<G>) -> ClientKeys {
    Arc::new(move |peer| gw.client_key(peer))
}

/// Request limits of the API.
#[derive(Clone, Debug)]
pub struct ApiLimits {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// Requests per minute per client (MAC, else IP).
    pub requests_per_min: u32,
    /// Funding relays per hour per client (MAC, else IP).
    pub relays_per_hour: u32,
    /// Largest funding transaction relayed (serialized bytes).
    pub relay_max_tx_bytes: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_body_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(10),
            requests_per_min: 600,
            relays_per_hour: 10,
            relay_max_tx_bytes: 10_000,
        }
    }
}

struct AppState<G> {
    gw: Arc<G>,
    limits: ApiLimits,
}

type St<G> = State<Arc<AppState<G>>>;

/// The API router. Serve it with [`serve`] (or anything that inserts
/// `ConnectInfo<SocketAddr>`: handlers need the peer address).
pub fn router<G: ClientGateway>(gw: Arc<G>, limits: ApiLimits) -> Router
where
    ApiError: From<G::Error>,
{
    router_with(gw, limits, Router::new())
}

/// [`router`] with `extra` routes (the portal page) under the same limits.
pub fn router_with<G: ClientGateway>(gw: Arc<G>, limits: ApiLimits, extra: Router) -> Router
where
    ApiError: From<G::Error>,
{
    let keys = client_keys(gw.clone());
    let relay_limiter = RateLimiter::new(limits.relays_per_hour, Duration::from_secs(3600), keys.clone());
    let limiter = RateLimiter::new(limits.requests_per_min, Duration::from_secs(60), keys);
    let timeout = limits.request_timeout;
    let body_limit = limits.max_body_bytes;
    let state = Arc::new(AppState { gw, limits });
    Router::new()
        .route(routes::TERMS, get(terms::<G>))
        .route(routes::CHANNELS, post(open::<G>))
        .route(
            routes::FUNDING,
            post(fund::<G>).route_layer(middleware::from_fn_with_state(relay_limiter, limits::rate_limit)),
        )
        .route(routes::PAYMENTS, post(pay::<G>))
        .route(routes::CHANNEL, get(status::<G>))
        .route(routes::CLOSE, post(close::<G>))
        .route(routes::EVENTS, get(events::<G>))
        .route(routes::CAPTIVE, get(captive::<G>))
        .route(routes::DEVICE, get(device::<G>))
        .route(routes::DEVICE_EVENTS, get(device_events::<G>))
        .route(routes::INVOICES, post(invoice::<G>))
        .route(routes::INVOICE, get(invoice_status::<G>))
        .route(routes::RESTORE, post(restore::<G>))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::NoRoute })
        .with_state(state)
        .merge(extra)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(timeout, limits::timeout))
        .layer(middleware::from_fn_with_state(limiter, limits::rate_limit))
}

// Each handler extracts a decoded, checked request and makes one gateway call; the
// gateway's error becomes an `ApiError` at the `?`.

async fn terms<G: ClientGateway>(State(s): St<G>) -> Result<Json<Terms>, ApiError>
where
    ApiError: From<G::Error>,
{
    Ok(Json(s.gw.terms().await?))
}

async fn open<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<OpenRequest>,
) -> Result<Json<OpenResponse>, ApiError>
where
    ApiError: From<G::Error>,
{
    Ok(Json(s.gw.open(peer.ip(), req).await?))
}

async fn fund<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ChannelJson(req): ChannelJson<FundRequest>,
) -> Result<Json<ChannelStatus>, ApiError>
where
    ApiError: From<G::Error>,
{
    let size = bitcoin::consensus::serialize(&req.funding_tx).len();
    if size > s.limits.relay_max_tx_bytes {
        return Err(ApiError::BadRequest(format!(
            "funding transaction is {size} bytes, above the relay limit of {} bytes",
            s.limits.relay_max_tx_bytes
        )));
    }
    Ok(Json(s.gw.fund(peer.ip(), req).await?))
}

async fn pay<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ChannelJson(update): ChannelJson<PaymentUpdate>,
) -> Result<Json<PaymentAck>, ApiError>
where
    ApiError: From<G::Error>,
{
    Ok(Json(s.gw.pay(peer.ip(), update).await?))
}

async fn status<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Signed(req, _): Signed<extract::ForStatus>,
) -> Result<Json<ChannelStatus>, ApiError>
where
    ApiError: From<G::Error>,
{
    Ok(Json(s.gw.status(peer.ip(), req).await?))
}

async fn close<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ChannelJson(req): ChannelJson<CloseRequest>,
) -> Result<Json<CloseResponse>, ApiError>
where
    ApiError: From<G::Error>,
{
    Ok(Json(s.gw.close(peer.ip(), req).await?))
}

async fn events<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Signed(req, _): Signed<extract::ForEvents>,
) -> Result<Response, ApiError>
where
    ApiError: From<G::Error>,
{
    let rx = s.gw.events(peer.ip(), req).await?;
    Ok(server_sent(rx, ClientEvent::name))
}

/// An event stream answer: each event from `rx` as JSON under its `name`, with
/// keep-alives, until the gateway drops the sender.
fn server_sent<E: serde::Serialize + Send + 'static>(rx: mpsc::Receiver<E>, name: fn(&E) -> &'static str) -> Response {
    let stream = futures_util::stream::unfold(rx, move |mut rx| async move {
        let ev = rx.recv().await?;
        let sse = Event::default().event(name(&ev)).json_data(&ev).unwrap_or_else(|_| Event::default());
        Some((Ok::<_, Infallible>(sse), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

async fn captive<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<Response, ApiError>
where
    ApiError: From<G::Error>,
{
    Ok(captive::answer(s.gw.captive(peer.ip()).await?))
}

async fn device<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<Response, ApiError>
where
    ApiError: From<G::Error>,
{
    let device = s.gw.device(peer.ip()).await?.ok_or(ApiError::NoRoute)?;
    let mut r = Json(device).into_response();
    // Live figures: never cached.
    r.headers_mut().insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    Ok(r)
}

async fn device_events<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<Response, ApiError>
where
    ApiError: From<G::Error>,
{
    let rx = s.gw.device_events(peer.ip()).await?.ok_or(ApiError::NoRoute)?;
    Ok(server_sent(rx, DeviceEvent::name))
}

async fn invoice<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<InvoiceRequest>,
) -> Result<(axum::http::StatusCode, Json<Invoice>), ApiError>
where
    ApiError: From<G::Error>,
{
    Ok((axum::http::StatusCode::CREATED, Json(s.gw.invoice(peer.ip(), req).await?)))
}

async fn invoice_status<G: ClientGateway>(
    State(s): St<G>,
    Path(payment_hash): Path<String>,
) -> Result<Json<InvoiceStatus>, ApiError>
where
    ApiError: From<G::Error>,
{
    Ok(Json(s.gw.invoice_status(payment_hash).await?))
}

async fn restore<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<RestoreRequest>,
) -> Result<Json<RestoreResponse>, ApiError>
where
    ApiError: From<G::Error>,
{
    Ok(Json(s.gw.restore(peer.ip(), req).await?))
}
