//! Captive-portal harness: "the internet" as a logging HTTP server that answers the
//! four platforms' connectivity probes for real, and the raw client checks the portal
//! tests make from inside a client namespace (any Host header, connect outcomes).

// Test harness: a failure here must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::network::{in_netns, Netns, ServerThread};

/// The four platforms' captive-portal probes: (host, path, what the real site answers).
pub const PROBES: [(&str, &str, u16, &str); 4] = [
    ("captive.apple.com", "/hotspot-detect.html", 200, "<HTML><HEAD><TITLE>Success</TITLE></HEAD><BODY>Success</BODY></HTML>"),
    ("connectivitycheck.gstatic.com", "/generate_204", 204, ""),
    ("www.msftconnecttest.com", "/connecttest.txt", 200, "Microsoft Connect Test"),
    ("detectportal.firefox.com", "/success.txt", 200, "success\n"),
];

/// Title of the upstream's HTML page (`/page`).
pub const UPSTREAM_TITLE: &str = "Upstream test page";

/// One request the upstream server read.
#[derive(Clone, Debug)]
pub struct LoggedRequest {
    /// The TCP peer (the gateway's NAT address).
    pub peer: SocketAddr,
    /// `GET /path HTTP/1.1`.
    pub line: String,
    /// The Host header.
    pub host: String,
}

/// The logging "internet": HTTP on port 80 and a TCP listener on 443 of one address.
pub struct Internet {
    /// The address it listens on.
    pub ip: Ipv4Addr,
    requests: Arc<Mutex<Vec<LoggedRequest>>>,
    http_conns: Arc<AtomicUsize>,
    tls_conns: Arc<AtomicUsize>,
    _servers: Vec<ServerThread>,
}

impl Internet {
    /// Listen on `ip`:80 and `ip`:443 inside `ns`.
    pub fn start(ns: &Netns, ip: Ipv4Addr) -> Result<Internet> {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let http_conns = Arc::new(AtomicUsize::new(0));
        let tls_conns = Arc::new(AtomicUsize::new(0));
        let http = in_netns(ns, || Ok(TcpListener::bind(SocketAddrV4::new(ip, 80))?))?;
        let tls = in_netns(ns, || Ok(TcpListener::bind(SocketAddrV4::new(ip, 443))?))?;
        http.set_nonblocking(true)?;
        tls.set_nonblocking(true)?;
        let (log, conns) = (requests.clone(), http_conns.clone());
        let s1 = ServerThread::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match http.accept() {
                    Ok((conn, peer)) => {
                        conns.fetch_add(1, Ordering::SeqCst);
                        let log = log.clone();
                        std::thread::spawn(move || serve(conn, peer, &log));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let conns = tls_conns.clone();
        let s2 = ServerThread::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match tls.accept() {
                    Ok(_) => {
                        conns.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Internet { ip, requests, http_conns, tls_conns, _servers: vec![s1, s2] })
    }

    /// Every request read so far.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// TCP connections accepted on port 80 (a completed handshake) so far.
    pub fn http_connections(&self) -> usize {
        self.http_conns.load(Ordering::SeqCst)
    }

    /// TCP connections accepted on port 443 so far.
    pub fn tls_connections(&self) -> usize {
        self.tls_conns.load(Ordering::SeqCst)
    }
}

fn serve(mut conn: TcpStream, peer: SocketAddr, log: &Mutex<Vec<LoggedRequest>>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut req = Vec::new();
    let mut buf = [0u8; 2048];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
        if req.len() > 16384 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&req).to_string();
    let line = text.lines().next().unwrap_or("").to_string();
    let host = text
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("host")).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_default();
    log.lock().unwrap().push(LoggedRequest { peer, line: line.clone(), host: host.clone() });
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let host_only = host.split(':').next().unwrap_or("");
    let probe = PROBES.iter().find(|(h, p, _, _)| *p == path && (*h == host_only || host_only.parse::<Ipv4Addr>().is_ok()));
    let (status, ctype, body): (u16, &str, String) = match probe {
        Some((_, _, status, body)) => (*status, "text/html", body.to_string()),
        None if path == "/page" => (
            200,
            "text/html; charset=utf-8",
            format!("<!doctype html><html><head><title>{UPSTREAM_TITLE}</title></head><body><h1 id=\"upstream\">{UPSTREAM_TITLE}</h1></body></html>"),
        ),
        None => (404, "text/plain", "not found\n".into()),
    };
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        _ => "Not Found",
    };
    let head = if status == 204 {
        format!("HTTP/1.1 204 {reason}\r\nConnection: close\r\n\r\n")
    } else {
        format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
    };
    let _ = conn.write_all(head.as_bytes());
    if status != 204 {
        let _ = conn.write_all(body.as_bytes());
    }
}

/// Give the interface that holds `existing` in `ns` the further address `extra/24`.
pub fn add_address(ns: &Netns, existing: Ipv4Addr, extra: Ipv4Addr) -> Result<()> {
    let out = ns.ip(&["-o", "-4", "addr", "show"])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let dev = text
        .lines()
        .find(|l| l.contains(&format!("inet {existing}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .with_context(|| format!("no interface with {existing} in {}: {text}", ns.name()))?
        .to_string();
    ns.ip(&["addr", "add", &format!("{extra}/24"), "dev", &dev])?;
    Ok(())
}

/// An HTTP answer as a client got it.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
}

/// `GET path` with `Host: host` to `addr` from inside `ns`; connect and each read wait
/// at most `timeout`.
pub fn get_as(ns: &Netns, addr: SocketAddrV4, host: &str, path: &str, timeout: Duration) -> Result<Answer> {
    let (host, path) = (host.to_string(), path.to_string());
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bitmesh-test\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).to_string();
        let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("no HTTP answer: {text:?}") };
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
        let location = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("location")).map(|(_, v)| v.trim().to_string()));
        Ok(Answer { status, location, body: body.to_string() })
    })
}

/// How a TCP connect from a client ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connect {
    /// The handshake completed.
    Connected,
    /// A reset came back (connection refused).
    Refused,
    /// Nothing came back within the timeout.
    TimedOut,
    /// Anything else.
    Failed(String),
}

/// Try a TCP connect to `addr` from inside `ns`.
pub fn connect(ns: &Netns, addr: SocketAddrV4, timeout: Duration) -> Connect {
    in_netns(ns, move || {
        Ok(match TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout) {
            Ok(_) => Connect::Connected,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Connect::Refused,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => Connect::TimedOut,
            Err(e) => Connect::Failed(e.to_string()),
        })
    })
    .unwrap_or_else(|e| Connect::Failed(e.to_string()))
}

