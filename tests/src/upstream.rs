//! "The internet" in the testbed's upstream namespace: a tiny HTTP/1.1 server that
//! answers `GET /<n>` with an `n`-byte body (optionally paced), and a UDP echo server.
//! The client side is [`crate::http::fetch`] and `udp_round_trips`.
//!
//! In-process threads, not an external server: no interpreter to provision, any body
//! size without files, and the sockets live in the namespace they were created in.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::network::{in_netns, Netns, ServerThread};

/// The HTTP server; stopped on drop.
pub struct HttpServer {
    _server: ServerThread,
}

impl HttpServer {
    /// Listen on `addr` inside `ns` and serve until dropped.
    pub fn start(ns: &Netns, addr: SocketAddrV4) -> Result<HttpServer> {
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
        Ok(HttpServer { _server: server })
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

/// A UDP echo server on a socket created inside a namespace; stopped on drop.
pub struct UdpEcho {
    _server: ServerThread,
}

impl UdpEcho {
    /// Echo every datagram to `addr` (inside `ns`) back to its sender.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<UdpEcho> {
        let sock = in_netns(ns, || Ok(UdpSocket::bind(addr)?))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let server = ServerThread::spawn(move |stop| {
            let mut buf = [0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Ok(UdpEcho { _server: server })
    }
}

/// The client side of [`UdpEcho`]: send `count` datagrams of `size` bytes through the
/// gateway and count the echoes that come back (waiting up to 100 ms for each).
pub fn udp_round_trips(sock: &std::net::UdpSocket, count: usize, size: usize) -> usize {
    let payload = vec![0x5a; size];
    let mut buf = vec![0u8; size + 64];
    let mut ok = 0;
    // Drain stragglers from an earlier burst.
    let _ = sock.set_nonblocking(true);
    while sock.recv(&mut buf).is_ok() {}
    let _ = sock.set_nonblocking(false);
    for _ in 0..count {
        if sock.send(&payload).is_err() {
            continue;
        }
        if matches!(sock.recv(&mut buf), Ok(n) if n == size) {
            ok += 1;
        }
    }
    ok
}
