//! Serving the API on a listening socket: our own accept loop instead of bare
//! `axum::serve`, so a station on the open WiFi cannot hold the controller's file
//! descriptors.
//!
//! * A global and a per-client cap on open connections ([`ConnSlots`], client = MAC
//!   when the neighbour table knows it, else IP). A connection over a cap gets one
//!   pre-rendered JSON answer (429 per client, 503 global) and is closed at once:
//!   refusing costs one descriptor for microseconds.
//! * A header-read timeout (hyper's): a connection that does not complete its
//!   request headers in time (slow-loris, or an idle keep-alive connection) is closed.
//! * An idle timeout: a connection on which nothing was read or written for that
//!   long is dropped, whatever state the request is in (a reader that stopped
//!   reading an event stream, a half-sent body).
//! * Accept errors (EMFILE under a low `LimitNOFILE`) back off briefly instead of
//!   spinning, and never stop the loop.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower::Layer;
use tracing::{debug, warn};

use super::limits::{ClientKey, ClientKeys};

/// Connection limits of the API listener (flags in `config.rs`, defaults there).
#[derive(Clone, Debug)]
pub struct ConnLimits {
    /// Open connections, all clients together.
    pub max_connections: usize,
    /// Open connections of one client (MAC, else IP).
    pub max_per_client: usize,
    /// Time a connection has to send complete request headers (also the longest a
    /// keep-alive connection may sit between requests).
    pub header_timeout: Duration,
    /// Time without a byte read or written after which a connection is dropped.
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 256,
            max_per_client: 8,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client already holds `max_per_client` connections.
    PerClient,
    /// The listener holds `max_connections`.
    Global,
}

impl Refusal {
    /// The whole HTTP answer written before closing (fixed bytes: no allocation,
    /// no parsing of what the client sent).
    fn answer(self) -> &'static [u8] {
        match self {
            Refusal::PerClient => b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 112\r\n\r\n{\"code\":\"rate_limited\",\"message\":\"too many open connections from your device: close idle ones and retry in 1 s\"}",
            Refusal::Global => b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 2\r\nconnection: close\r\ncontent-length: 88\r\n\r\n{\"code\":\"rate_limited\",\"message\":\"the gateway is at its connection limit: retry in 2 s\"}",
        }
    }
}

/// Counts of open connections, globally and per client.
pub struct ConnSlots {
    limits: ConnLimits,
    inner: Mutex<SlotCounts>,
}

#[derive(Default)]
struct SlotCounts {
    total: usize,
    per_client: HashMap<ClientKey, usize>,
}

/// One open connection's place; given back on drop.
pub struct ConnPermit {
    slots: Arc<ConnSlots>,
    key: ClientKey,
}

impl ConnSlots {
    pub fn new(limits: ConnLimits) -> Arc<ConnSlots> {
        Arc::new(ConnSlots { limits, inner: Mutex::new(SlotCounts::default()) })
    }

    /// Take a place for `key`, or say which cap is full.
    pub fn try_acquire(self: &Arc<Self>, key: ClientKey) -> Result<ConnPermit, Refusal> {
        // A poisoned lock only means a panic elsewhere mid-update: the counts are
        // still plain integers, keep serving.
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mine = c.per_client.get(&key).copied().unwrap_or(0);
        if mine >= self.limits.max_per_client {
            return Err(Refusal::PerClient);
        }
        if c.total >= self.limits.max_connections {
            return Err(Refusal::Global);
        }
        c.total += 1;
        c.per_client.insert(key, mine + 1);
        Ok(ConnPermit { slots: self.clone(), key })
    }

    /// Open connections now (all clients).
    pub fn open(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = self.slots.inner.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_client.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_client.remove(&self.key);
            }
        }
    }
}

/// Serve `app` on `listener` until the listener fails for good (never, in practice:
/// accept errors back off and continue). `slots` may be shared by several
/// listeners (the client interface and loopback), so the caps are per process.
pub async fn serve(listener: TcpListener, app: Router, slots: Arc<ConnSlots>, keys: ClientKeys) {
    serve_tls(listener, app, slots, keys, None).await
}

/// [`serve`], and with `tls` also HTTPS on the same port: a connection whose first
/// byte starts a TLS handshake is served over TLS, any other as plain HTTP (see
/// `portal/tls.rs`).
pub async fn serve_tls(listener: TcpListener, app: Router, slots: Arc<ConnSlots>, keys: ClientKeys, tls: Option<TlsAcceptor>) {
    let mut last_warned: Option<Instant> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: out of descriptors or memory. The connection
                // stays in the backlog; wait for some to close instead of spinning.
                if last_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    warn!(error = %e, open = slots.open(), "client API cannot accept a connection (raise LimitNOFILE or lower --api-max-connections)");
                    last_warned = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let key = keys(peer.ip());
        match slots.try_acquire(key) {
            Ok(permit) => {
                let (app, limits, tls) = (app.clone(), slots.limits.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => serve_connection(stream, peer, app, limits, permit).await,
                        Some(tls) => serve_maybe_tls(stream, peer, app, limits, permit, tls).await,
                    }
                });
            }
            Err(refusal) => {
                debug!(%peer, ?refusal, "client API connection refused");
                // A fresh socket's send buffer is empty: this write does not block
                // and (for these few bytes) is not partial. Dropping closes it.
                let _ = stream.try_write(refusal.answer());
            }
        }
    }
}

/// Peek at the first byte (within the header timeout): a TLS handshake is accepted
/// and served over TLS, anything else is served as plain HTTP.
async fn serve_maybe_tls(stream: TcpStream, peer: SocketAddr, app: Router, limits: ConnLimits, permit: ConnPermit, tls: TlsAcceptor) {
    let mut first = [0u8; 1];
    match tokio::time::timeout(limits.header_timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == crate::portal::tls::TLS_HANDSHAKE => {
            match tokio::time::timeout(limits.header_timeout, tls.accept(stream)).await {
                Ok(Ok(tls_stream)) => serve_connection(tls_stream, peer, app, limits, permit).await,
                Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => debug!(%peer, "TLS handshake timed out"),
            }
        }
        Ok(Ok(_)) => serve_connection(stream, peer, app, limits, permit).await,
        _ => debug!(%peer, "client API connection sent nothing: closed"),
    }
}

/// A connection's byte stream: plain TCP or TLS over it.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn nodelay(&self);
}

impl Conn for TcpStream {
    fn nodelay(&self) {
        let _ = self.set_nodelay(true);
    }
}

impl Conn for tokio_rustls::server::TlsStream<TcpStream> {
    fn nodelay(&self) {
        let _ = self.get_ref().0.set_nodelay(true);
    }
}

async fn serve_connection<S: Conn>(stream: S, peer: SocketAddr, app: Router, limits: ConnLimits, _permit: ConnPermit) {
    stream.nodelay();
    let started = Instant::now();
    let last_active = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Activity { inner: stream, started, last_active: last_active.clone() });
    let service = TowerToHyperService::new(axum::Extension(ConnectInfo(peer)).layer(app));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let tick = (limits.idle_timeout / 4).max(Duration::from_millis(250));
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(%peer, error = %e, "client API connection ended");
                }
                return;
            }
            _ = tokio::time::sleep(tick) => {
                let idle_ms = (started.elapsed().as_millis() as u64).saturating_sub(last_active.load(Ordering::Relaxed));
                if Duration::from_millis(idle_ms) >= limits.idle_timeout {
                    debug!(%peer, "client API connection idle: closed");
                    return;
                }
            }
        }
    }
}

/// A connection that records when a byte last moved (for the idle timeout).
struct Activity<S> {
    inner: S,
    started: Instant,
    /// Milliseconds after `started` of the last read or write that moved bytes.
    last_active: Arc<AtomicU64>,
}

impl<S> Activity<S> {
    fn touch(&self) {
        self.last_active.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        res
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> ClientKey {
        ClientKey::Ip(s.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn caps_are_per_client_then_global_and_permits_give_back() {
        let slots = ConnSlots::new(ConnLimits { max_connections: 3, max_per_client: 2, ..ConnLimits::default() });
        let a1 = slots.try_acquire(ip("10.0.0.2")).unwrap();
        let _a2 = slots.try_acquire(ip("10.0.0.2")).unwrap();
        assert_eq!(slots.try_acquire(ip("10.0.0.2")).err(), Some(Refusal::PerClient));
        let _b1 = slots.try_acquire(ip("10.0.0.3")).unwrap();
        assert_eq!(slots.try_acquire(ip("10.0.0.4")).err(), Some(Refusal::Global));
        drop(a1);
        assert_eq!(slots.open(), 2);
        assert!(slots.try_acquire(ip("10.0.0.4")).is_ok());
    }

    #[test]
    fn refusal_answers_are_complete_http_with_the_right_length() {
        for r in [Refusal::PerClient, Refusal::Global] {
            let text = std::str::from_utf8(r.answer()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
            assert_eq!(len, body.len(), "{head}");
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["code"], "rate_limited");
        }
    }
}
