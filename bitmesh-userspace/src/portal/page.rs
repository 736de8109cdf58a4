//! The portal page: HTML, CSS and JS embedded in the binary (no external resources:
//! the phone has no internet yet), served on the API port under `/portal/`.
//!
//! Every string the page shows sits in one table, `assets/strings.json`, one object
//! per language (English and Spanish today; a translation is one more object). The
//! server picks the language (`?lang=` from the page's switch, else the browser's
//! `Accept-Language`), fills the HTML with it, and hands the same table to the script
//! for what it renders later.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use bitmesh_common::wire::routes;
use serde::Deserialize;

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
const STRINGS: &str = include_str!("assets/strings.json");

/// Languages in the table; the first is the default.
pub const LANGUAGES: [&str; 2] = ["en", "es"];

/// What the page shows that is not in the string table.
#[derive(Clone, Debug)]
pub struct PageConfig {
    /// The venue's name (`--venue`).
    pub venue: String,
    /// The API's base URL as clients reach it (`http://10.0.0.1:3141`), for the
    /// laptop section's `bitmesh pay --gateway`.
    pub api_base: String,
}

struct Page {
    config: PageConfig,
    /// The string table, per language.
    strings: BTreeMap<String, BTreeMap<String, String>>,
}

/// The routes of the page and its assets (merged into the API router).
pub fn router(config: PageConfig) -> Router {
    // The table is part of the binary: a malformed one is caught by the unit tests.
    let strings = serde_json::from_str(STRINGS).unwrap_or_default();
    let page = Arc::new(Page { config, strings });
    Router::new()
        .route("/", get(|| async { Redirect::to(routes::PORTAL) }))
        .route("/portal", get(|| async { Redirect::permanent(routes::PORTAL) }))
        .route(routes::PORTAL, get(index))
        .route("/portal/app.js", get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }))
        .route("/portal/style.css", get(|| async { asset(STYLE_CSS, "text/css; charset=utf-8") }))
        .route("/portal/qr.svg", get(super::qr::handler))
        .with_state(page)
}

#[derive(Deserialize)]
struct LangQuery {
    lang: Option<String>,
}

async fn index(State(page): State<Arc<Page>>, Query(q): Query<LangQuery>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let lang = q.lang.as_deref().filter(|l| LANGUAGES.contains(l)).unwrap_or_else(|| negotiate(accept));
    match render(&page, lang) {
        Some(html) => {
            let mut r = html.into_response();
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(header::VARY, HeaderValue::from_static("accept-language"));
            security_headers(h);
            r
        }
        None => (StatusCode::INTERNAL_SERVER_ERROR, "the portal's string table is broken").into_response(),
    }
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    security_headers(h);
    r
}

fn security_headers(h: &mut HeaderMap) {
    // Everything comes from the gateway itself; the inline block is JSON data, not script.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'"),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
}

/// The language of the table that `Accept-Language` likes best (highest q, first on
/// ties), by primary subtag; English if none.
pub fn negotiate(accept_language: &str) -> &'static str {
    let mut best: Option<(&'static str, f32)> = None;
    for item in accept_language.split(',') {
        let mut parts = item.trim().split(';');
        let tag = parts.next().unwrap_or("").trim();
        let q = parts
            .find_map(|p| p.trim().strip_prefix("q="))
            .and_then(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        let primary = tag.split('-').next().unwrap_or("").to_ascii_lowercase();
        if let Some(lang) = LANGUAGES.iter().find(|l| **l == primary) {
            if q > 0.0 && best.is_none_or(|(_, bq)| q > bq) {
                best = Some((lang, q));
            }
        }
    }
    best.map_or(LANGUAGES[0], |(l, _)| l)
}

/// The page in `lang`, or `None` if the table lacks the language.
fn render(page: &Page, lang: &str) -> Option<String> {
    let table = page.strings.get(lang)?;
    let mut out = String::with_capacity(INDEX.len() + 4096);
    let mut rest = INDEX;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}")?;
        let key = &after[..end];
        match key {
            "lang" => out.push_str(lang),
            "venue" => out.push_str(&escape_html(&page.config.venue)),
            "api_base" => out.push_str(&escape_html(&page.config.api_base)),
            "lang_links" => out.push_str(&lang_links(page, lang)),
            // JSON inside <script>: "</" must not close the element.
            "strings" => out.push_str(&serde_json::to_string(table).ok()?.replace("</", "<\\/")),
            _ => out.push_str(&escape_html(table.get(key.strip_prefix("t:")?)?)),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Some(out)
}

/// The language switch: plain links (work without script, keyboard and screen reader).
fn lang_links(page: &Page, current: &str) -> String {
    let mut out = String::new();
    for lang in LANGUAGES {
        let name = page.strings.get(lang).and_then(|t| t.get("lang_name")).map_or(lang, |s| s.as_str());
        if lang == current {
            out.push_str(&format!("<a href=\"?lang={lang}\" lang=\"{lang}\" aria-current=\"page\">{}</a>", escape_html(name)));
        } else {
            out.push_str(&format!("<a href=\"?lang={lang}\" lang=\"{lang}\" hreflang=\"{lang}\">{}</a>", escape_html(name)));
        }
    }
    out
}

/// `s` safe inside HTML text and double-quoted attributes.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Bytes the page costs a phone on first load (HTML in `lang`, CSS, JS), for the docs
/// and the report.
pub fn weight(config: &PageConfig, lang: &str) -> Option<usize> {
    let page = Page { config: config.clone(), strings: serde_json::from_str(STRINGS).ok()? };
    Some(render(&page, lang)?.len() + APP_JS.len() + STYLE_CSS.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Page {
        Page {
            config: PageConfig { venue: "Café <Sol>".into(), api_base: "http://10.0.0.1:3141".into() },
            strings: serde_json::from_str(STRINGS).unwrap(),
        }
    }

    #[test]
    fn every_language_has_every_key_and_every_placeholder_is_filled() {
        let p = page();
        let en = &p.strings["en"];
        for lang in LANGUAGES {
            let table = &p.strings[lang];
            let missing: Vec<_> = en.keys().filter(|k| !table.contains_key(*k)).collect();
            assert!(missing.is_empty(), "{lang} lacks {missing:?}");
            assert_eq!(table.len(), en.len(), "{lang} has keys English does not");
            let html = render(&p, lang).unwrap();
            assert!(!html.contains("{{"), "{lang}: unfilled placeholder");
            assert!(html.contains(&format!("<html lang=\"{lang}\">")));
            assert!(html.contains("Café &lt;Sol&gt;"), "venue escaped");
        }
        // Every key the script asks for exists.
        let mut used = 0;
        for (at, _) in APP_JS.match_indices("t(\"") {
            let before = APP_JS[..at].chars().next_back().unwrap_or(' ');
            if before.is_alphanumeric() || before == '_' || before == '.' {
                continue; // createElement("..."), not the string lookup
            }
            let key = APP_JS[at + 3..].split('"').next().unwrap();
            assert!(en.contains_key(key), "app.js uses {key:?}, not in the table");
            used += 1;
        }
        assert!(used >= 15, "the scan found the lookups ({used})");
    }

    #[test]
    fn accept_language_picks_the_best_supported_language() {
        assert_eq!(negotiate(""), "en");
        assert_eq!(negotiate("es-ES,es;q=0.9,en;q=0.8"), "es");
        assert_eq!(negotiate("fr-FR,fr;q=0.9,es;q=0.5,en;q=0.4"), "es");
        assert_eq!(negotiate("de,en-GB;q=0.7"), "en");
        assert_eq!(negotiate("es;q=0"), "en");
    }

    #[test]
    fn the_page_is_small() {
        for lang in LANGUAGES {
            let w = weight(&page().config, lang).unwrap();
            eprintln!("first load in {lang}: {w} bytes (HTML + CSS + JS)");
            assert!(w < 20_000, "first load is {w} bytes");
        }
    }
}
