//! Per-client rate limits (token buckets keyed by the client's MAC, else its IP) and
//! the request timeout.
//!
//! Why the MAC: on the open WiFi a station can take as many IPv4 addresses as it
//! likes, but the kernel meters (and the gateway bills) by MAC; keying limits by MAC
//! makes extra addresses buy nothing. A peer the neighbour table does not know
//! (loopback, a routed peer when `--api-addr` is set) is keyed by its IP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use bitmesh_common::kernel::Mac;

/// Who a limit counts against: the device's MAC on the client interface, or the
/// peer IP when no MAC is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Mac(Mac),
    Ip(IpAddr),
}

/// Resolves a TCP peer to its [`ClientKey`] (the gateway's neighbour table).
pub type ClientKeys = Arc<dyn Fn(IpAddr) -> ClientKey + Send + Sync>;

/// A token bucket per client: `capacity` tokens, refilled at `capacity` per `period`.
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Mutex<HashMap<ClientKey, (f64, Instant)>>>,
    capacity: f64,
    per_sec: f64,
    keys: ClientKeys,
}

impl RateLimiter {
    pub fn new(capacity: u32, period: Duration, keys: ClientKeys) -> Self {
        let capacity = f64::from(capacity.max(1));
        RateLimiter {
            inner: Arc::new(Mutex::new(HashMap::new())),
            capacity,
            per_sec: capacity / period.as_secs_f64().max(0.001),
            keys,
        }
    }

    /// Take one token for the client behind `peer`, or say how long to wait.
    pub fn check_peer(&self, peer: IpAddr) -> Result<(), ApiError> {
        self.check((self.keys)(peer))
    }

    /// Take one token for `key`, or say how long to wait.
    pub fn check(&self, key: ClientKey) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut map = self.inner.lock().map_err(|_| ApiError::Internal("rate limiter poisoned".into()))?;
        // Bound memory: forget clients whose bucket is full again.
        if map.len() > 16_384 {
            let (cap, rate) = (self.capacity, self.per_sec);
            map.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < cap);
        }
        let (tokens, at) = map.entry(key).or_insert((self.capacity, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - *tokens) / self.per_sec).ceil() as u64;
            Err(ApiError::RateLimited { retry_after_secs: wait.max(1) })
        }
    }
}

/// Middleware: refuse a client over its request rate.
pub async fn rate_limit(
    State(limiter): State<RateLimiter>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    match limiter.check_peer(peer.ip()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Middleware: answer `timeout` with a JSON error if the handler takes too long.
/// (The SSE stream body is not covered: only producing the response is.)
pub async fn timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::Timeout { secs: limit.as_secs() }.into_response(),
    }
}
