//! The invoice QR code, rendered on the gateway as SVG (the page loads no library and
//! the phone has no internet to fetch one).

use axum::extract::Query;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use std::fmt::Write as _;

use qrcode::{Color, EcLevel, QrCode};
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
    Ok(compact_svg(code.width(), &code.to_colors()))
}

/// Modules of light margin around the code (the QR "quiet zone").
const QUIET: usize = 4;

/// The code as one SVG path: each row's runs of dark modules as horizontal strokes
/// one module thick (`m<gap> 0h<run>`), in module units scaled by the viewBox. About
/// a third of the size of a rectangle per module (a 370-character invoice: some
/// 13 KB instead of 40 KB), which matters on a walled-garden budget.
fn compact_svg(width: usize, colors: &[Color]) -> String {
    let size = width + 2 * QUIET;
    let mut d = String::with_capacity(colors.len() * 3);
    for (y, row) in colors.chunks(width).enumerate() {
        let mut pen = 0; // where the last run ended on this row (module x)
        let mut first = true;
        let mut x = 0;
        while x < width {
            if row[x] != Color::Dark {
                x += 1;
                continue;
            }
            let start = x;
            while x < width && row[x] == Color::Dark {
                x += 1;
            }
            if first {
                // The stroke is centred on the line: half a module down.
                let _ = write!(d, "M{} {}.5", start + QUIET, y + QUIET);
                first = false;
            } else {
                let _ = write!(d, "m{} 0", start - pen);
            }
            let _ = write!(d, "h{}", x - start);
            pen = x;
        }
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {size} {size}\" width=\"240\" height=\"240\" \
         shape-rendering=\"crispEdges\"><rect width=\"{size}\" height=\"{size}\" fill=\"#fff\"/>\
         <path stroke=\"#000\" stroke-width=\"1\" d=\"{d}\"/></svg>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path draws exactly the code's dark modules: replay it onto a grid.
    #[test]
    fn the_compact_path_draws_exactly_the_dark_modules() {
        let code = QrCode::with_error_correction_level(b"LIGHTNING:LNBCRT1", EcLevel::M).unwrap();
        let (w, colors) = (code.width(), code.to_colors());
        let svg = compact_svg(w, &colors);
        let d = svg.split("d=\"").nth(1).unwrap().split('"').next().unwrap();
        let mut grid = vec![Color::Light; w * w];
        let (mut x, mut y) = (0i64, 0i64);
        let mut tokens = d.chars().peekable();
        let num = |t: &mut std::iter::Peekable<std::str::Chars<'_>>| -> f64 {
            let mut s = String::new();
            while let Some(c) = t.peek().copied().filter(|c| c.is_ascii_digit() || *c == '.') {
                s.push(c);
                t.next();
            }
            if t.peek() == Some(&' ') {
                t.next();
            }
            s.parse().unwrap()
        };
        while let Some(c) = tokens.next() {
            match c {
                'M' => {
                    x = num(&mut tokens) as i64;
                    y = num(&mut tokens).floor() as i64;
                }
                'm' => {
                    x += num(&mut tokens) as i64;
                    num(&mut tokens);
                }
                'h' => {
                    let n = num(&mut tokens) as i64;
                    for i in x..x + n {
                        grid[(y as usize - QUIET) * w + (i as usize - QUIET)] = Color::Dark;
                    }
                    x += n;
                }
                other => panic!("unexpected {other:?} in {d}"),
            }
        }
        assert_eq!(grid, colors);
    }

    #[test]
    fn an_invoice_renders_and_oversized_text_is_refused() {
        let svg = render("LIGHTNING:LNBCRT10U1PJ").unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<path"), "{}", &svg[..80]);
        assert!(render("").is_err());
        assert!(render(&"A".repeat(MAX_QR_TEXT + 1)).is_err());
        // A typical BOLT11 with the scheme, upper case: about 360 characters.
        let typical = format!("LIGHTNING:LNBCRT500U1{}", "QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L".repeat(11));
        let svg = render(&typical).unwrap();
        eprintln!("QR of a {}-character invoice: {} bytes of SVG", typical.len(), svg.len());
        assert!(svg.len() < 16 * 1024, "{}", svg.len());
    }
}
