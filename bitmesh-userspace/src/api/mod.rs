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
//! | GET  | /portal/ | the captive-portal page (`crate::portal::page`) |

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
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use bitmesh_common::wire::routes;
use bitmesh_common::wire::{
    ChannelId, ChannelStatus, CloseRequest, CloseResponse, DeviceStatus, FundRequest, OpenRequest, OpenResponse,
    PaymentAck, PaymentUpdate, SignatureBytes, Terms,
};
use bitcoin::hex::FromHex;
use tokio::sync::mpsc;

// The wire types the gateway trait's signatures name, and the signed-request header,
// are defined once in `bitmesh_common::wire` (shared with the client agent).
pub use bitmesh_common::wire::{CaptiveStatus, ClientEvent, UsageReport, AUTH_HEADER};
pub use error::ApiError;
pub use extract::ApiJson;
pub use limits::{ClientKey, ClientKeys, RateLimiter};
pub use serve::{serve, serve_tls, ConnLimits, ConnPermit, ConnSlots, Refusal};

/// A parsed [`AUTH_HEADER`]: the client's counter (milliseconds since the Unix
/// epoch, strictly increasing per channel) and its signature over
/// `client_request_digest(action, channel_id, counter)`. The gateway accepts each
/// counter once per (channel, action), and only within 120 s of its clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientAuth {
    /// The signed counter.
    pub counter: u64,
    /// DER ECDSA signature by the channel's client key.
    pub signature: SignatureBytes,
}

/// What the API needs from the controller. `peer` is the TCP peer address of the
/// request: the gateway resolves it to the device's MAC on the client interface.
pub trait ClientGateway: Send + Sync + 'static {
    fn terms(&self) -> impl Future<Output = Result<Terms, ApiError>> + Send;
    fn open(&self, peer: IpAddr, req: OpenRequest) -> impl Future<Output = Result<OpenResponse, ApiError>> + Send;
    fn fund(&self, peer: IpAddr, req: FundRequest) -> impl Future<Output = Result<ChannelStatus, ApiError>> + Send;
    /// Verify, persist (synced), credit, then return the ack. Nothing else.
    fn pay(&self, peer: IpAddr, update: PaymentUpdate) -> impl Future<Output = Result<PaymentAck, ApiError>> + Send;
    fn status(
        &self,
        peer: IpAddr,
        id: ChannelId,
        auth: ClientAuth,
    ) -> impl Future<Output = Result<ChannelStatus, ApiError>> + Send;
    fn close(&self, peer: IpAddr, req: CloseRequest) -> impl Future<Output = Result<CloseResponse, ApiError>> + Send;
    fn events(
        &self,
        peer: IpAddr,
        id: ChannelId,
        auth: ClientAuth,
    ) -> impl Future<Output = Result<mpsc::Receiver<ClientEvent>, ApiError>> + Send;
    fn captive(&self, peer: IpAddr) -> impl Future<Output = Result<CaptiveStatus, ApiError>> + Send;
    /// The requester's own device status (by its MAC), for the portal page.
    fn device(&self, _peer: IpAddr) -> impl Future<Output = Result<DeviceStatus, ApiError>> + Send {
        async { Err(ApiError::NoRoute) }
    }
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
pub fn router<G: ClientGateway>(gw: Arc<G>, limits: ApiLimits) -> Router {
    router_with(gw, limits, Router::new())
}

/// [`router`] with `extra` routes (the portal page) under the same limits.
pub fn router_with<G: ClientGateway>(gw: Arc<G>, limits: ApiLimits, extra: Router) -> Router {
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
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::NoRoute })
        .with_state(state)
        .merge(extra)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(timeout, limits::timeout))
        .layer(middleware::from_fn_with_state(limiter, limits::rate_limit))
}

fn channel_id(s: &str) -> Result<ChannelId, ApiError> {
    s.parse().map_err(|_| ApiError::BadRequest(format!("{s:?} is not a channel id (64 hex digits)")))
}

fn same_channel(path: ChannelId, body: ChannelId) -> Result<(), ApiError> {
    if path != body {
        return Err(ApiError::BadRequest(format!("channel_id {body} in the body differs from {path} in the path")));
    }
    Ok(())
}

fn auth_header(headers: &HeaderMap) -> Result<ClientAuth, ApiError> {
    let v = headers
        .get(AUTH_HEADER)
        .ok_or_else(|| ApiError::Unauthorized(format!("missing {AUTH_HEADER} header: sign the request with the channel's client key")))?;
    let malformed = || ApiError::Unauthorized(format!("{AUTH_HEADER} is not <counter>.<hex signature>"));
    let s = v.to_str().map_err(|_| malformed())?;
    let (counter, sig) = s.trim().split_once('.').ok_or_else(malformed)?;
    let counter = counter.parse::<u64>().map_err(|_| malformed())?;
    let signature = Vec::<u8>::from_hex(sig).map(SignatureBytes).map_err(|_| malformed())?;
    Ok(ClientAuth { counter, signature })
}

async fn terms<G: ClientGateway>(State(s): St<G>) -> Result<Json<Terms>, ApiError> {
    Ok(Json(s.gw.terms().await?))
}

async fn open<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<OpenRequest>,
) -> Result<Json<OpenResponse>, ApiError> {
    Ok(Json(s.gw.open(peer.ip(), req).await?))
}

async fn fund<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<FundRequest>,
) -> Result<Json<ChannelStatus>, ApiError> {
    same_channel(channel_id(&id)?, req.channel_id)?;
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
    Path(id): Path<String>,
    ApiJson(update): ApiJson<PaymentUpdate>,
) -> Result<Json<PaymentAck>, ApiError> {
    same_channel(channel_id(&id)?, update.channel_id)?;
    Ok(Json(s.gw.pay(peer.ip(), update).await?))
}

async fn status<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ChannelStatus>, ApiError> {
    let id = channel_id(&id)?;
    Ok(Json(s.gw.status(peer.ip(), id, auth_header(&headers)?).await?))
}

async fn close<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CloseRequest>,
) -> Result<Json<CloseResponse>, ApiError> {
    same_channel(channel_id(&id)?, req.channel_id)?;
    Ok(Json(s.gw.close(peer.ip(), req).await?))
}

async fn events<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = channel_id(&id)?;
    let rx = s.gw.events(peer.ip(), id, auth_header(&headers)?).await?;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let sse = Event::default().event(ev.name()).json_data(&ev).unwrap_or_else(|_| Event::default());
        Some((Ok::<_, Infallible>(sse), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

async fn captive<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<Response, ApiError> {
    Ok(captive::answer(s.gw.captive(peer.ip()).await?))
}

async fn device<G: ClientGateway>(
    State(s): St<G>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<Response, ApiError> {
    let mut r = Json(s.gw.device(peer.ip()).await?).into_response();
    // Live figures: never cached.
    r.headers_mut().insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    Ok(r)
}
