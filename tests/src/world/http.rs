//! "The internet": a tiny HTTP/1.1 server in the upstream namespace that answers
//! `GET /<n>` with an `n`-byte body, and the client side that fetches from inside a
//! client namespace, measuring bytes and the longest stall (a streaming read, unlike
//! the request/response client of [`crate::http`], which `get` uses).
//!
//! In-process threads, not an external server: no interpreter to provision, any body
//! size without files, and the sockets live in the namespace they were created in.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::netns::{in_netns, Netns, ServerThread};

/// The HTTP server; stopped on drop.
pub struct Upstream {
    _server: ServerThread,
}

impl Upstream {
    /// Listen on `addr` inside `ns` and serve until dropped.
    pub fn start(ns: &Netns, addr: SocketAddrV4) -> Result<Upstream> {
        // The socket belongs to the namespace of the thread that creates it; the
        // accept loop may then run anywhere.
        let listener = in_netns(ns, || Ok(TcpListener::bind(addr)?))?;
        listener.set_nonblocking(true)?;
        let server = ServerThread::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let stop = stop.clone();
                        std::thread::spawn(move || serve(conn, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Upstream { _server: server })
    }
}

fn serve(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    // A cut-off client never drains its socket: give up on it after a while.
    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
        if req.len() > 8192 {
            return;
        }
    }
    let line = String::from_utf8_lossy(&req);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    // `/<size>` or `/<size>?bps=<bytes per second>` (a paced link, like real WiFi).
    let (size, bps) = match path.trim_start_matches('/').split_once("?bps=") {
        Some((s, r)) => (s.parse::<u64>(), r.parse::<u64>().ok()),
        None => (path.trim_start_matches('/').parse::<u64>(), None),
    };
    let Ok(size) = size else {
        let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n");
    if conn.write_all(head.as_bytes()).is_err() {
        return;
    }
    let chunk = vec![b'x'; 64 * 1024];
    let started = Instant::now();
    let mut left = size;
    let mut stalled_since: Option<Instant> = None;
    while left > 0 && !stop.load(Ordering::Relaxed) {
        if let Some(bps) = bps.filter(|b| *b > 0) {
            // Send no faster than the rate: sleep until the bytes sent so far are due.
            let due = Duration::from_secs_f64((size - left) as f64 / bps as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let n = left.min(if bps.is_some() { 16 * 1024 } else { chunk.len() as u64 }) as usize;
        match conn.write(&chunk[..n]) {
            Ok(w) => {
                left -= w as u64;
                stalled_since = None;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                // A client out of budget is dropped in the kernel; it may pay again, so
                // wait a while before giving up on it.
                if stalled_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(60) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// What a fetch got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// Body bytes received.
    pub bytes: u64,
    /// Whether the whole body arrived.
    pub complete: bool,
    /// The longest gap between two reads once the body started (a stall).
    pub longest_stall: Duration,
    /// How long it took.
    pub elapsed: Duration,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

impl Fetch {
    fn failed(error: String, start: Instant) -> Fetch {
        Fetch {
            bytes: 0,
            complete: false,
            longest_stall: Duration::ZERO,
            elapsed: start.elapsed(),
            error: Some(error),
        }
    }
}

/// GET `/<bytes>` from `server` (at most `bps` bytes per second if given), from a
/// thread inside `ns`.
pub fn fetch(ns: &Netns, server: SocketAddrV4, bytes: u64, bps: Option<u64>, timeout: Duration) -> Fetch {
    let path = match bps {
        Some(r) => format!("/{bytes}?bps={r}"),
        None => format!("/{bytes}"),
    };
    let start = Instant::now();
    let r = in_netns(ns, || {
        let mut conn = match TcpStream::connect_timeout(&SocketAddr::V4(server), timeout) {
            Ok(c) => c,
            Err(e) => return Ok(Fetch::failed(format!("connect to {server}: {e}"), start)),
        };
        conn.set_read_timeout(Some(timeout))?;
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut head = Vec::new();
        let mut body = 0u64;
        let mut in_body = false;
        let mut last = Instant::now();
        let mut longest = Duration::ZERO;
        loop {
            let n = match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    return Ok(Fetch {
                        bytes: body,
                        complete: false,
                        longest_stall: longest.max(last.elapsed()),
                        elapsed: start.elapsed(),
                        error: Some(format!("read: {e}")),
                    })
                }
            };
            if in_body {
                longest = longest.max(last.elapsed());
                body += n as u64;
            } else {
                head.extend_from_slice(&buf[..n]);
                if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    in_body = true;
                    body = (head.len() - p - 4) as u64;
                }
            }
            last = Instant::now();
        }
        Ok(Fetch {
            bytes: body,
            complete: in_body && body == bytes,
            longest_stall: longest,
            elapsed: start.elapsed(),
            error: (!(in_body && body == bytes)).then(|| "connection closed early".to_owned()),
        })
    });
    r.unwrap_or_else(|e| Fetch::failed(e.to_string(), start))
}

/// A plain GET of `path` on `server` from inside `ns` (the shared client of
/// [`crate::http`], each read waiting at most `timeout`): status code and body.
pub fn get(ns: &Netns, server: SocketAddrV4, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let r = in_netns(ns, || crate::http::get_within(SocketAddr::V4(server), path, timeout))?;
    Ok((r.status, r.text()))
}
