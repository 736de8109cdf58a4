//! Extractors whose rejections are [`ApiError`]s, so every malformed request gets the
//! JSON error shape with a stable code, and handlers hold no parsing preamble:
//!
//! * [`ApiJson`]: a JSON body (`bad_request`, or 413 when too large);
//! * [`ChannelPath`]: the `{id}` of a channel route, parsed (`bad_request`);
//! * [`ChannelJson`]: a body about one channel, posted to that channel's route (the
//!   path and the body must name the same channel: `bad_request`);
//! * [`Signed`]: a signed channel GET, the path's channel and the [`AUTH_HEADER`]
//!   (`unauthorized` when missing or malformed; the gateway checks the signature).

use std::marker::PhantomData;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use bitcoin::hex::FromHex;
use bitmesh_common::wire::{
    ChannelId, CloseRequest, FundRequest, PaymentUpdate, SignatureBytes, SignedAction, SignedRequest, AUTH_HEADER,
};
use serde::de::DeserializeOwned;

use super::ApiError;

/// `Json<T>` with API errors.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(map_rejection(rej)),
        }
    }
}

fn map_rejection(rej: JsonRejection) -> ApiError {
    if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::BodyTooLarge;
    }
    ApiError::BadRequest(rej.body_text())
}

/// The channel a channel route (`/v1/channels/{id}/...`) names.
pub struct ChannelPath(pub ChannelId);

impl<S: Send + Sync> FromRequestParts<S> for ChannelPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rej| ApiError::BadRequest(rej.body_text()))?;
        parse_channel_id(&id).map(ChannelPath)
    }
}

fn parse_channel_id(s: &str) -> Result<ChannelId, ApiError> {
    s.parse().map_err(|_| ApiError::BadRequest(format!("{s:?} is not a channel id (64 hex digits)")))
}

/// A request body that is about one channel.
pub trait ChannelBody {
    /// The channel the body names.
    fn channel_id(&self) -> ChannelId;
}

impl ChannelBody for FundRequest {
    fn channel_id(&self) -> ChannelId {
        self.channel_id
    }
}

impl ChannelBody for PaymentUpdate {
    fn channel_id(&self) -> ChannelId {
        self.channel_id
    }
}

impl ChannelBody for CloseRequest {
    fn channel_id(&self) -> ChannelId {
        self.channel_id
    }
}

/// A JSON body about the channel its route names. The body is decoded first (a bad
/// body is refused as such), then the path, then the two must agree.
pub struct ChannelJson<T>(pub T);

impl<T: DeserializeOwned + ChannelBody, S: Send + Sync> FromRequest<S> for ChannelJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let path = Path::<String>::from_request_parts(&mut parts, state).await;
        let ApiJson(value) = ApiJson::<T>::from_request(Request::from_parts(parts, body), state).await?;
        let Path(id) = path.map_err(|rej| ApiError::BadRequest(rej.body_text()))?;
        let path = parse_channel_id(&id)?;
        let named = value.channel_id();
        if named != path {
            return Err(ApiError::BadRequest(format!("channel_id {named} in the body differs from {path} in the path")));
        }
        Ok(ChannelJson(value))
    }
}

/// The action a [`Signed`] request is signed for, named by a type so that each route
/// states its signature domain in its handler's signature.
pub trait Action {
    /// The signature domain.
    const ACTION: SignedAction;
}

/// `GET /v1/channels/{id}` is signed for [`SignedAction::Status`].
pub struct ForStatus;
impl Action for ForStatus {
    const ACTION: SignedAction = SignedAction::Status;
}

/// `GET /v1/channels/{id}/events` is signed for [`SignedAction::Events`].
pub struct ForEvents;
impl Action for ForEvents {
    const ACTION: SignedAction = SignedAction::Events;
}

/// A channel GET signed for `A`: the path's channel and the [`AUTH_HEADER`]
/// (`<counter>.<hex DER signature>`). Only parsed here; the gateway verifies it.
pub struct Signed<A>(pub SignedRequest, pub PhantomData<A>);

impl<A: Action, S: Send + Sync> FromRequestParts<S> for Signed<A> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let ChannelPath(channel_id) = ChannelPath::from_request_parts(parts, state).await?;
        let (counter, signature) = auth_header(&parts.headers)?;
        Ok(Signed(SignedRequest { action: A::ACTION, channel_id, counter, signature }, PhantomData))
    }
}

fn auth_header(headers: &HeaderMap) -> Result<(u64, SignatureBytes), ApiError> {
    let v = headers
        .get(AUTH_HEADER)
        .ok_or_else(|| ApiError::Unauthorized(format!("missing {AUTH_HEADER} header: sign the request with the channel's client key")))?;
    let malformed = || ApiError::Unauthorized(format!("{AUTH_HEADER} is not <counter>.<hex signature>"));
    let s = v.to_str().map_err(|_| malformed())?;
    let (counter, sig) = s.trim().split_once('.').ok_or_else(malformed)?;
    let counter = counter.parse::<u64>().map_err(|_| malformed())?;
    let signature = Vec::<u8>::from_hex(sig).map(SignatureBytes).map_err(|_| malformed())?;
    Ok((counter, signature))
}
