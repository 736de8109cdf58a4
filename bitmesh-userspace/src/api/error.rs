//! `ApiError`: every way a client request can fail, each with a stable wire code
//! ([`ErrorCode`]) and an HTTP status. The body is always a JSON [`ErrorBody`].

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bitmesh_common::wire::{ChannelId, ErrorBody, ErrorCode};

use bitmesh_channel::ChannelError;

/// A refused or failed client request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The channel library refused the request (its own code, e.g. `signature_invalid`).
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// Malformed JSON, wrong types, path and body disagree, unknown route.
    #[error("{0}")]
    BadRequest(String),
    /// Body above the configured limit.
    #[error("request body is larger than the gateway accepts: send a smaller request")]
    BodyTooLarge,
    /// No route or method here.
    #[error("no such endpoint: see docs/api.md for the routes")]
    NoRoute,
    #[error("no channel {0}: open one with POST /v1/channels")]
    UnknownChannel(ChannelId),
    /// Not signed by the channel's client key, or not from the channel's device.
    #[error("{0}")]
    Unauthorized(String),
    /// The signed request counter was already accepted, or is outside the clock window.
    #[error("{0}")]
    AuthReplayed(String),
    /// The gateway could not find the MAC of the connecting device.
    #[error("the gateway cannot see your device's MAC address on its client interface: connect through the gateway's WiFi")]
    NotOnLink,
    #[error("channel is {state}: {hint}")]
    ChannelNotOpen { state: &'static str, hint: &'static str },
    #[error("too many requests: retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// The channel already has `max` open event streams.
    #[error("this channel already has {max} open event streams: close one and retry")]
    TooManyStreams { max: usize },
    /// The funding transaction is unknown to the chain and relaying it failed.
    #[error("funding transaction was not found and could not be relayed: {0}")]
    FundingNotFound(String),
    #[error("the gateway cannot reach its chain backend: retry later")]
    ChainUnavailable,
    /// The channel's funding output vanished before it confirmed.
    #[error("the funding output of channel {0} was double-spent (or dropped) before it confirmed: the channel takes no more payments; open a new channel with confirmed funds")]
    FundingDoubleSpent(ChannelId),
    /// Unconfirmed funding: this payment would credit more than the gateway gives
    /// before confirmation (per channel, or across all unconfirmed channels).
    #[error("{0}")]
    ZeroConfLimit(String),
    #[error("request took longer than {secs} s: retry")]
    Timeout { secs: u64 },
    /// A refusal of the Lightning rail: `lightning_unavailable`, `unknown_bundle`,
    /// `bytes_out_of_range`, `unknown_invoice`, `unknown_token`, `token_expired`, or
    /// `rate_limited` (device event streams). The gateway names and words it
    /// (`GatewayError`); the edge carries its code and sentence unchanged.
    #[error("{message}")]
    Lightning { code: ErrorCode, message: String },
    /// Anything else; the detail is logged, not sent.
    #[error("internal error on the gateway: retry later")]
    Internal(String),
}

impl ApiError {
    /// The stable code clients branch on.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::Channel(e) => e.code(),
            ApiError::BadRequest(_) | ApiError::BodyTooLarge | ApiError::NoRoute => ErrorCode::BadRequest,
            ApiError::UnknownChannel(_) => ErrorCode::UnknownChannel,
            ApiError::Unauthorized(_) | ApiError::NotOnLink => ErrorCode::Unauthorized,
            ApiError::AuthReplayed(_) => ErrorCode::AuthReplayed,
            ApiError::ChannelNotOpen { .. } => ErrorCode::ChannelNotOpen,
            ApiError::RateLimited { .. } | ApiError::TooManyStreams { .. } => ErrorCode::RateLimited,
            ApiError::FundingNotFound(_) => ErrorCode::FundingNotFound,
            ApiError::ChainUnavailable => ErrorCode::ChainUnavailable,
            ApiError::FundingDoubleSpent(_) => ErrorCode::FundingDoubleSpent,
            ApiError::ZeroConfLimit(_) => ErrorCode::FundingUnconfirmed,
            ApiError::Timeout { .. } | ApiError::Internal(_) => ErrorCode::Internal,
            ApiError::Lightning { code, .. } => *code,
        }
    }

    /// The HTTP status that goes with it.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Channel(e) => match e.code() {
                ErrorCode::DuplicateOutpoint | ErrorCode::AmountNotIncreasing => StatusCode::CONFLICT,
                ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            },
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NoRoute | ApiError::UnknownChannel(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) | ApiError::NotOnLink => StatusCode::FORBIDDEN,
            ApiError::AuthReplayed(_) => StatusCode::UNAUTHORIZED,
            ApiError::ChannelNotOpen { .. } => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } | ApiError::TooManyStreams { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::FundingNotFound(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::ChainUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::FundingDoubleSpent(_) | ApiError::ZeroConfLimit(_) => StatusCode::CONFLICT,
            ApiError::Timeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Lightning { code, .. } => match code {
                ErrorCode::LightningUnavailable => StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::UnknownBundle | ErrorCode::BytesOutOfRange => StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::UnknownInvoice | ErrorCode::UnknownToken => StatusCode::NOT_FOUND,
                ErrorCode::TokenExpired => StatusCode::GONE,
                ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::BAD_REQUEST,
            },
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { code: self.code(), message: self.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error answering a client");
        }
        let retry = match &self {
            ApiError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            ApiError::TooManyStreams { .. } | ApiError::Lightning { code: ErrorCode::RateLimited, .. } => Some(5),
            _ => None,
        };
        let mut resp = (self.status(), Json(self.body())).into_response();
        if let Some(secs) = retry {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
