//! RFC 8908 captive-portal API answer (`application/captive+json`); the JSON object
//! itself is `bitmesh_common::wire::CaptiveStatus`.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bitmesh_common::wire::{CaptiveStatus, CAPTIVE_JSON};

/// The HTTP answer carrying `status`.
pub(super) fn answer(status: CaptiveStatus) -> Response {
    let mut r = Json(status).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CAPTIVE_JSON));
    // RFC 8908 section 5: the API must not be cached beyond its freshness.
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    r
}
