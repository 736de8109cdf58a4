//! RFC 8908 captive-portal API answer (`application/captive+json`).

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

/// The RFC 8908 JSON object. Keys use the RFC's hyphenated names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptiveStatus {
    /// True while the client has no paid budget left (traffic beyond the walled
    /// garden is dropped).
    pub captive: bool,
    /// Where a person can see the terms and pay.
    #[serde(rename = "user-portal-url", skip_serializing_if = "Option::is_none")]
    pub user_portal_url: Option<String>,
    /// Bytes the client may still use before it must pay again.
    #[serde(rename = "bytes-remaining", skip_serializing_if = "Option::is_none")]
    pub bytes_remaining: Option<u64>,
    /// Estimated seconds until the channel stops taking payments (10 min per block).
    #[serde(rename = "seconds-remaining", skip_serializing_if = "Option::is_none")]
    pub seconds_remaining: Option<u64>,
    /// Paying more extends the session.
    #[serde(rename = "can-extend-session", skip_serializing_if = "Option::is_none")]
    pub can_extend_session: Option<bool>,
}

/// RFC 8908's media type.
pub const CAPTIVE_JSON: &str = "application/captive+json";

impl IntoResponse for CaptiveStatus {
    fn into_response(self) -> Response {
        let mut r = Json(self).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CAPTIVE_JSON));
        // RFC 8908 section 5: the API must not be cached beyond its freshness.
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
        r
    }
}
