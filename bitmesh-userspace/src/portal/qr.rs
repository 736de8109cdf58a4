//! The invoice QR code, rendered on the gateway as SVG (the page loads no library and
//! the phone has no internet to fetch one).

use axum::extract::Query;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use qrcode::render::svg;
use qrcode::{EcLevel, QrCode};
use serde::Deserialize;

use crate::api::ApiError;

/// Longest text encoded: a BOLT11 invoice with a long description and routing hints
/// stays well under it; more is refused rather than rendered.
pub const MAX_QR_TEXT: usize = 2048;

#[derive(Deserialize)]
pub(super) struct QrQuery {
    d: String,
}

/// `GET /portal/qr.svg?d=<text>`: the QR code of `text` as SVG.
pub(super) async fn handler(Query(q): Query<QrQuery>) -> Result<Response, ApiError> {
    let svg = render(&q.d)?;
    let mut r = svg.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("image/svg+xml"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=3600"));
    Ok(r)
}

/// The SVG of `text`'s QR code (error correction M, quiet zone included).
pub fn render(text: &str) -> Result<String, ApiError> {
    if text.is_empty() || text.len() > MAX_QR_TEXT {
        return Err(ApiError::BadRequest(format!("QR text must be 1 to {MAX_QR_TEXT} bytes long")));
    }
    let code = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M)
        .map_err(|e| ApiError::BadRequest(format!("cannot encode this text as a QR code: {e}")))?;
    Ok(code.render::<svg::Color<'_>>().min_dimensions(240, 240).quiet_zone(true).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invoice_renders_and_oversized_text_is_refused() {
        let svg = render("LIGHTNING:LNBCRT10U1PJ").unwrap();
        assert!(svg.starts_with("<?xml") && svg.contains("<svg"), "{}", &svg[..80]);
        assert!(render("").is_err());
        assert!(render(&"A".repeat(MAX_QR_TEXT + 1)).is_err());
    }
}
