//! The HTTP layer against a fake gateway: shapes, codes, limits; hostile requests
//! never reach the gateway.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode};
use bitcoin::{absolute, Amount, FeeRate, Network};
use bitmesh_common::pricing::{ByteCount, PriceMsatPerMib};
use bitmesh_common::blocks::BlockCount;
use bitmesh_common::wire::{ChannelId, ChannelLimits, ChannelState, ErrorBody, ErrorCode, UsageReport, AUTH_HEADER};
use tower::ServiceExt;

use super::*;
use bitmesh_channel::ChannelError;

#[derive(Default)]
struct Fake {
    calls: AtomicUsize,
}

fn status_of(id: ChannelId) -> ChannelStatus {
    ChannelStatus {
        channel_id: id,
        state: ChannelState::Open,
        funding_outpoint: None,
        capacity: None,
        expiry: absolute::Height::from_consensus(500).unwrap(),
        total_paid: Amount::from_sat(1000),
        credited_bytes: ByteCount(10),
        used_bytes: ByteCount(4),
        remaining_bytes: ByteCount(6),
        close_txid: None,
    }
}

impl ClientGateway for Fake {
    type Error = ApiError;

    async fn terms(&self) -> Result<Terms, ApiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Terms {
            protocol_version: 1,
            limits: ChannelLimits {
                min_capacity: Amount::from_sat(10_000),
                max_capacity: Amount::from_sat(1_000_000),
                zero_conf_cap: Amount::from_sat(50_000),
                confirmations_required: 1,
                min_expiry_blocks: BlockCount(144),
                max_expiry_blocks: BlockCount(4032),
                close_margin_blocks: BlockCount(36),
                close_fee_rate: FeeRate::from_sat_per_kwu(500),
            },
            network: Network::Regtest,
            price_msat_per_mib: PriceMsatPerMib::new(1000).unwrap(),
            chunk_bytes: ByteCount(1 << 20),
            min_first_payment: Amount::from_sat(700),
            tip_height: absolute::Height::from_consensus(200).unwrap(),
            lightning: None,
        })
    }
    async fn open(&self, _: IpAddr, _: OpenRequest) -> Result<OpenResponse, ApiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(ApiError::NotOnLink)
    }
    async fn fund(&self, _: IpAddr, r: FundRequest) -> Result<ChannelStatus, ApiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(status_of(r.channel_id))
    }
    async fn pay(&self, _: IpAddr, u: PaymentUpdate) -> Result<PaymentAck, ApiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if u.signature.0.is_empty() {
            return Err(ChannelError::SignatureInvalid.into());
        }
        Ok(PaymentAck {
            channel_id: u.channel_id,
            total_paid: u.total_paid,
            client_change: Amount::ZERO,
            credited_bytes: ByteCount(1),
            used_bytes: ByteCount(0),
        })
    }
    async fn status(&self, _: IpAddr, req: SignedRequest) -> Result<ChannelStatus, ApiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(status_of(req.channel_id))
    }
    async fn close(&self, _: IpAddr, r: CloseRequest) -> Result<CloseResponse, ApiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(ApiError::UnknownChannel(r.channel_id))
    }
    async fn events(&self, _: IpAddr, req: SignedRequest) -> Result<mpsc::Receiver<ClientEvent>, ApiError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel(4);
        let r = UsageReport { channel_id: req.channel_id, credited_bytes: ByteCount(10), used_bytes: ByteCount(9), remaining_bytes: ByteCount(1) };
        tx.send(ClientEvent::LowWater(r)).await.unwrap();
        Ok(rx)
    }
    /// 10.0.0.2 and 10.0.0.3 are one device (one MAC, two addresses).
    fn client_key(&self, peer: IpAddr) -> ClientKey {
        if peer == IpAddr::from([10, 0, 0, 2]) || peer == IpAddr::from([10, 0, 0, 3]) {
            ClientKey::Mac(bitmesh_common::kernel::Mac([2, 0, 0, 0, 0, 2]))
        } else {
            ClientKey::Ip(peer)
        }
    }
    async fn captive(&self, _: IpAddr) -> Result<CaptiveStatus, ApiError> {
        Ok(CaptiveStatus {
            captive: false,
            user_portal_url: Some("http://10.0.0.1:3141/".into()),
            venue_info_url: None,
            bytes_remaining: Some(6),
            seconds_remaining: Some(600),
            can_extend_session: Some(true),
        })
    }
    async fn invoice(&self, _: IpAddr, _: bitmesh_common::wire::InvoiceRequest) -> Result<bitmesh_common::wire::Invoice, ApiError> {
        Err(crate::gateway::GatewayError::LightningUnavailable.into())
    }
    async fn invoice_status(&self, _: String) -> Result<bitmesh_common::wire::InvoiceStatus, ApiError> {
        Err(crate::gateway::GatewayError::LightningUnavailable.into())
    }
    async fn restore(&self, _: IpAddr, _: bitmesh_common::wire::RestoreRequest) -> Result<bitmesh_common::wire::RestoreResponse, ApiError> {
        Err(crate::gateway::GatewayError::LightningUnavailable.into())
    }
}

fn app(limits: ApiLimits) -> (Arc<Fake>, Router) {
    let fake = Arc::new(Fake::default());
    let r = router(fake.clone(), limits).layer(MockConnectInfo(SocketAddr::from(([10, 0, 0, 2], 5555))));
    (fake, r)
}

async fn send(r: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .header(AUTH_HEADER, "1.3006020101020101")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, headers, bytes.to_vec())
}

const ID: &str = "0707070707070707070707070707070707070707070707070707070707070707";
const OTHER: &str = "0808080808080808080808080808080808080808080808080808080808080808";

#[tokio::test]
async fn terms_are_served_as_json() {
    let (_, r) = app(ApiLimits::default());
    let (st, _, body) = send(&r, "GET", "/v1/terms", "").await;
    assert_eq!(st, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["price_msat_per_mib"], 1000);
}

#[tokio::test]
async fn hostile_requests_get_their_code_and_never_reach_the_gateway() {
    let (fake, r) = app(ApiLimits { max_body_bytes: 512, ..ApiLimits::default() });
    let pay = |id: &str| format!(r#"{{"channel_id":"{id}","total_paid_sat":5,"signature":"300183"}}"#);
    let close = |id: &str| format!(r#"{{"channel_id":"{id}","counter":1,"signature":"300183"}}"#);
    let big = format!(r#"{{"channel_id":"{ID}","total_paid_sat":5,"signature":"{}"}}"#, "ab".repeat(600));
    let cases: Vec<(&str, &str, String, String, StatusCode, ErrorCode)> = vec![
        ("malformed json", "POST", format!("/v1/channels/{ID}/payments"), "{not json".into(), StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        ("wrong field type", "POST", format!("/v1/channels/{ID}/payments"), r#"{"channel_id":1}"#.into(), StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        ("odd-length hex signature", "POST", format!("/v1/channels/{ID}/payments"), pay(ID).replace("300183", "30018"), StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        ("body above limit", "POST", format!("/v1/channels/{ID}/payments"), big, StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::BadRequest),
        ("path and body disagree", "POST", format!("/v1/channels/{OTHER}/payments"), pay(ID), StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        ("channel id not hex", "POST", "/v1/channels/xyz/payments".into(), pay(ID), StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        ("close: path and body disagree", "POST", format!("/v1/channels/{OTHER}/close"), close(ID), StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        ("close: channel id not hex", "POST", "/v1/channels/xyz/close".into(), close(ID), StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        ("status: channel id not hex (before the missing signature)", "GET", "/v1/channels/xyz".into(), String::new(), StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        ("events: channel id not hex", "GET", "/v1/channels/xyz/events".into(), String::new(), StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        ("unknown route", "GET", "/v1/nothing".into(), String::new(), StatusCode::NOT_FOUND, ErrorCode::BadRequest),
        ("wrong method", "DELETE", "/v1/terms".into(), String::new(), StatusCode::NOT_FOUND, ErrorCode::BadRequest),
        ("negative amount", "POST", format!("/v1/channels/{ID}/payments"), pay(ID).replace(":5", ":-5"), StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
    ];
    for (name, method, uri, body, want_status, want_code) in cases {
        let (st, headers, bytes) = send(&r, method, &uri, &body).await;
        let err: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name}: not an error body ({e})"));
        assert_eq!((st, err.code), (want_status, want_code), "{name}: {}", err.message);
        assert!(headers["content-type"].to_str().unwrap().starts_with("application/json"), "{name}");
    }
    assert_eq!(fake.calls.load(Ordering::SeqCst), 0, "no hostile request reached the gateway");
}

#[tokio::test]
async fn channel_library_errors_keep_their_code() {
    let (_, r) = app(ApiLimits::default());
    let body = format!(r#"{{"channel_id":"{ID}","total_paid_sat":5,"signature":""}}"#);
    let (st, _, bytes) = send(&r, "POST", &format!("/v1/channels/{ID}/payments"), &body).await;
    let err: ErrorBody = serde_json::from_slice(&bytes).unwrap();
    assert_eq!((st, err.code), (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::SignatureInvalid));
}

#[tokio::test]
async fn status_without_signature_header_is_unauthorized() {
    let (fake, r) = app(ApiLimits::default());
    let req = Request::builder().uri(format!("/v1/channels/{ID}")).body(Body::empty()).unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let bytes = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
    assert_eq!(serde_json::from_slice::<ErrorBody>(&bytes).unwrap().code, ErrorCode::Unauthorized);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
    let (st, _, _) = send(&r, "GET", &format!("/v1/channels/{ID}"), "").await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn signature_header_without_a_counter_is_unauthorized() {
    let (fake, r) = app(ApiLimits::default());
    for value in ["3006020101020101", "x.3006020101020101", "1.zz"] {
        let req = Request::builder().uri(format!("/v1/channels/{ID}")).header(AUTH_HEADER, value).body(Body::empty()).unwrap();
        let resp = r.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{value}");
        let bytes = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
        assert_eq!(serde_json::from_slice::<ErrorBody>(&bytes).unwrap().code, ErrorCode::Unauthorized);
    }
    assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn auth_replayed_is_401() {
    let e = ApiError::AuthReplayed("again".into());
    assert_eq!((e.status(), e.code()), (StatusCode::UNAUTHORIZED, ErrorCode::AuthReplayed));
}

#[tokio::test]
async fn client_over_its_rate_gets_rate_limited_with_retry_after() {
    let (_, r) = app(ApiLimits { requests_per_min: 3, ..ApiLimits::default() });
    for _ in 0..3 {
        assert_eq!(send(&r, "GET", "/v1/terms", "").await.0, StatusCode::OK);
    }
    let (st, headers, bytes) = send(&r, "GET", "/v1/terms", "").await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(serde_json::from_slice::<ErrorBody>(&bytes).unwrap().code, ErrorCode::RateLimited);
}

#[tokio::test]
async fn rate_limits_count_per_mac_so_more_addresses_buy_nothing() {
    let (_, r) = app(ApiLimits { requests_per_min: 2, ..ApiLimits::default() });
    let from = |ip: [u8; 4]| {
        let mut req = Request::builder().uri("/v1/terms").body(Body::empty()).unwrap();
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from((ip, 4000))));
        req
    };
    assert_eq!(r.clone().oneshot(from([10, 0, 0, 2])).await.unwrap().status(), StatusCode::OK);
    assert_eq!(r.clone().oneshot(from([10, 0, 0, 3])).await.unwrap().status(), StatusCode::OK);
    // Third request of the same MAC, from yet another of its addresses: refused.
    assert_eq!(r.clone().oneshot(from([10, 0, 0, 3])).await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    // Another device is not affected.
    assert_eq!(r.clone().oneshot(from([10, 0, 0, 9])).await.unwrap().status(), StatusCode::OK);
}

#[test]
fn too_many_event_streams_is_rate_limited_with_retry_after() {
    let e = ApiError::TooManyStreams { max: 3 };
    assert_eq!((e.status(), e.code()), (StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited));
    assert!(e.into_response().headers().contains_key("retry-after"));
}

#[tokio::test]
async fn captive_portal_answer_follows_rfc_8908() {
    let (_, r) = app(ApiLimits::default());
    let (st, headers, bytes) = send(&r, "GET", "/captive-portal/api", "").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/captive+json");
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["captive"], false);
    assert_eq!(v["bytes-remaining"], 6);
    assert_eq!(v["user-portal-url"], "http://10.0.0.1:3141/");
}

#[tokio::test]
async fn event_stream_pushes_low_water_as_sse() {
    let (_, r) = app(ApiLimits::default());
    let req = Request::builder()
        .uri(format!("/v1/channels/{ID}/events"))
        .header(AUTH_HEADER, "1.00")
        .body(Body::empty())
        .unwrap();
    let resp = r.oneshot(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    // The fake drops its sender after one event, so the stream ends.
    let bytes = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(text.contains("event: low_water"), "{text}");
    assert!(text.contains("\"remaining_bytes\":1"), "{text}");
}
