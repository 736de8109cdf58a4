//! API request decoding: raw requests (method, path, the auth header, a JSON body)
//! through the controller's real axum router (`bitmesh::api::router`) over a stub
//! gateway. Invariants: never panic; a bad request always gets a 4xx with the JSON
//! error body and a stable code (never a 5xx: the stub never fails); what a handler
//! receives re-encodes to the same value (no lossy decoding the signature would
//! not cover).
//!
//! Input: byte 0 picks the route, then the auth header value up to the first 0x00
//! byte, then the body.

#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::Router;
use bitmesh::api::{self, ApiError, ApiLimits, ClientGateway};
use bitmesh_common::wire::{
    CaptiveStatus, ChannelId, ChannelStatus, ClientEvent, CloseRequest, CloseResponse, ErrorBody, FundRequest, Invoice, InvoiceRequest,
    InvoiceStatus, OpenRequest, OpenResponse, PaymentAck, PaymentUpdate, RestoreRequest, RestoreResponse, SignedRequest, Terms,
};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tower::ServiceExt;

/// Re-encode what a handler received and decode it again: it must be the same.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
    let json = serde_json::to_vec(v).expect("a decoded request encodes");
    let again: T = serde_json::from_slice(&json).expect("its encoding decodes");
    assert_eq!(&again, v, "decode(encode(x)) != x");
}

/// Checks what it is handed, then refuses everything with a 4xx.
struct Stub;

fn no(id: ChannelId) -> ApiError {
    ApiError::UnknownChannel(id)
}

impl ClientGateway for Stub {
    type Error = ApiError;

    async fn terms(&self) -> Result<Terms, ApiError> {
        Err(ApiError::BadRequest("stub".into()))
    }
    async fn open(&self, _: IpAddr, req: OpenRequest) -> Result<OpenResponse, ApiError> {
        round_trip(&req);
        Err(ApiError::BadRequest("stub".into()))
    }
    async fn fund(&self, _: IpAddr, req: FundRequest) -> Result<ChannelStatus, ApiError> {
        round_trip(&req);
        Err(no(req.channel_id))
    }
    async fn pay(&self, _: IpAddr, u: PaymentUpdate) -> Result<PaymentAck, ApiError> {
        round_trip(&u);
        Err(no(u.channel_id))
    }
    async fn status(&self, _: IpAddr, req: SignedRequest) -> Result<ChannelStatus, ApiError> {
        Err(no(req.channel_id))
    }
    async fn close(&self, _: IpAddr, req: CloseRequest) -> Result<CloseResponse, ApiError> {
        round_trip(&req);
        Err(no(req.channel_id))
    }
    async fn events(&self, _: IpAddr, req: SignedRequest) -> Result<mpsc::Receiver<ClientEvent>, ApiError> {
        Err(no(req.channel_id))
    }
    async fn captive(&self, _: IpAddr) -> Result<CaptiveStatus, ApiError> {
        Err(ApiError::BadRequest("stub".into()))
    }
    async fn invoice(&self, _: IpAddr, req: InvoiceRequest) -> Result<Invoice, ApiError> {
        round_trip(&req);
        Err(ApiError::BadRequest("stub".into()))
    }
    async fn invoice_status(&self, _: String) -> Result<InvoiceStatus, ApiError> {
        Err(ApiError::BadRequest("stub".into()))
    }
    async fn restore(&self, _: IpAddr, req: RestoreRequest) -> Result<RestoreResponse, ApiError> {
        round_trip(&req);
        Err(ApiError::BadRequest("stub".into()))
    }
}

struct World {
    rt: tokio::runtime::Runtime,
    router: Router,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let limits = ApiLimits { requests_per_min: u32::MAX, relays_per_hour: u32::MAX, ..ApiLimits::default() };
        let router = rt.block_on(async { api::router(Arc::new(Stub), limits) });
        World { rt, router }
    })
}

const ID: &str = "0707070707070707070707070707070707070707070707070707070707070707";

fuzz_target!(|data: &[u8]| {
    let Some((&route, rest)) = data.split_first() else { return };
    let (header, body) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let (method, path) = match route % 8 {
        0 => ("GET", "/v1/terms".to_owned()),
        1 => ("POST", "/v1/channels".to_owned()),
        2 => ("POST", format!("/v1/channels/{ID}/funding")),
        3 => ("POST", format!("/v1/channels/{ID}/payments")),
        4 => ("GET", format!("/v1/channels/{ID}")),
        5 => ("POST", format!("/v1/channels/{ID}/close")),
        6 => ("GET", format!("/v1/channels/{ID}/events")),
        _ => ("GET", "/captive-portal/api".to_owned()),
    };
    let mut req = Request::builder().method(method).uri(path.as_str());
    // Header bytes axum would never see (not a valid header value) are left out,
    // as hyper would have refused the request before the router.
    if let Ok(value) = axum::http::HeaderValue::from_bytes(header) {
        req = req.header(bitmesh_common::wire::AUTH_HEADER, value);
    }
    if route & 8 == 0 {
        req = req.header("content-type", "application/json");
    }
    let Ok(mut req) = req.body(Body::from(body.to_vec())) else { return };
    req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([10, 0, 0, 2], 40_000))));

    let w = world();
    let resp = w.rt.block_on(w.router.clone().oneshot(req)).expect("infallible");
    let status = resp.status();
    assert!(!status.is_server_error(), "{method} {path}: {status} for a bad request");
    if status != StatusCode::OK {
        let bytes = w.rt.block_on(axum::body::to_bytes(resp.into_body(), 1 << 20)).expect("body");
        let err: Result<ErrorBody, _> = serde_json::from_slice(&bytes);
        assert!(err.is_ok(), "{method} {path}: {status} without the JSON error body: {:?}", String::from_utf8_lossy(&bytes));
    }
});
