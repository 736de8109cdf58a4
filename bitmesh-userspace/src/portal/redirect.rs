//! The redirect listener: an unpaid client's plain HTTP to any address arrives here
//! (DNAT of the kernel-marked packets, see `nft.rs`), and every request, whatever its
//! Host and path, is answered with the way to the portal page. Nothing from upstream
//! is ever fetched or relayed.
//!
//! GET and HEAD get `302 Found` (what iOS, Android, Windows and macOS probes expect
//! from a captive network: anything but their success answer opens the sign-in
//! sheet); other methods get `511 Network Authentication Required` (RFC 6585), which
//! a client must not mistake for the origin's answer.

use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

/// The router: one fallback answering everything.
pub fn router(portal_url: String) -> Router {
    let body = page_body(&portal_url);
    Router::new().fallback(move |method: Method| {
        let (url, body) = (portal_url.clone(), body.clone());
        async move { answer(&method, &url, body) }
    })
}

fn page_body(portal_url: &str) -> String {
    let url = super::page::escape_html(portal_url);
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Sign in to the WiFi</title>\
         <meta http-equiv=\"refresh\" content=\"0;url={url}\"></head>\
         <body><p>This network needs you to sign in: <a href=\"{url}\">{url}</a></p></body></html>\n"
    )
}

fn answer(method: &Method, portal_url: &str, body: String) -> Response {
    let status = if method == Method::GET || method == Method::HEAD {
        StatusCode::FOUND
    } else {
        StatusCode::NETWORK_AUTHENTICATION_REQUIRED
    };
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    // Never cached, and never reused: once paid, the same URL must reach the real
    // site, not a kept-alive connection that conntrack still maps to this listener.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    if status == StatusCode::FOUND {
        if let Ok(v) = HeaderValue::from_str(portal_url) {
            h.insert(header::LOCATION, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn ask(method: &str, uri: &str, host: &str) -> Response {
        let app = router("http://10.0.0.1:3141/portal/".into());
        let req = Request::builder().method(method).uri(uri).header("host", host).body(Body::empty()).unwrap();
        app.oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn every_probe_url_is_redirected_to_the_portal() {
        for (host, path) in [
            ("captive.apple.com", "/hotspot-detect.html"),
            ("connectivitycheck.gstatic.com", "/generate_204"),
            ("www.msftconnecttest.com", "/connecttest.txt"),
            ("detectportal.firefox.com", "/success.txt"),
            ("example.org", "/"),
        ] {
            let r = ask("GET", path, host).await;
            assert_eq!(r.status(), StatusCode::FOUND, "{host}{path}");
            assert_eq!(r.headers()["location"], "http://10.0.0.1:3141/portal/");
            assert_eq!(r.headers()["cache-control"], "no-store");
            assert_eq!(r.headers()["connection"], "close");
        }
        assert_eq!(ask("HEAD", "/x", "a").await.status(), StatusCode::FOUND);
    }

    #[tokio::test]
    async fn other_methods_get_511() {
        let r = ask("POST", "/api/login", "example.org").await;
        assert_eq!(r.status(), StatusCode::NETWORK_AUTHENTICATION_REQUIRED);
        assert!(r.headers().get("location").is_none());
    }
}
