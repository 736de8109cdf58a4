//! The HTTP job of the harness, client side: a minimal blocking HTTP/1.1 client
//! (`Connection: close`), enough for the JSON API and the captive-portal answers, and
//! [`fetch`], a streaming download from the upstream server that measures bytes and
//! the longest stall. Call the request functions from a thread inside the client's
//! namespace (`network::in_netns`): the TCP socket is created in the calling thread's
//! namespace. Used by the scripted clients, the testbed's `api_get` and `fetch`, and
//! the controller guard's readiness check. The servers are in [`crate::upstream`].

// Test harness: any failure here must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::network::{in_netns, ClientIdentity, Netns};

/// How long a connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a read may wait, unless the caller says otherwise.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A response: status, headers (lower-case names) and body (de-chunked).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The error `code` of a JSON error body.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or("").to_string()
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` with extra headers.
pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
    request(addr, "GET", path, headers, None)
}

/// `GET path`, connecting and each read waiting at most `timeout`.
pub fn get_within(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    send(TcpStream::connect_timeout(&addr, timeout)?, addr, "GET", path, &[], None, timeout)
}

/// `POST path` with a JSON body.
pub fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Result<Response> {
    post_json_from(None, addr, path, body)
}

/// Any request; `body` is sent as is with its length.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Result<Response> {
    request_from(None, addr, method, path, headers, body)
}

/// `POST path` with a JSON body, from `source` (see [`request_from`]).
pub fn post_json_from(source: Option<&ClientIdentity>, addr: SocketAddr, path: &str, body: &serde_json::Value) -> Result<Response> {
    request_from(source, addr, "POST", path, &[("content-type", "application/json")], Some(body.to_string().as_bytes()))
}

/// A TCP connection to `addr`; with a `source`, bound to that identity's interface
/// (`SO_BINDTODEVICE`, so it leaves with the identity's MAC) and source IP before
/// connecting. Connecting times out after 5 s either way.
pub fn connect_from(source: Option<&ClientIdentity>, addr: SocketAddr) -> Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let Some(id) = source else { return Ok(TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?) };
    let SocketAddr::V4(dst) = addr else { bail!("client identities are IPv4; {addr} is not") };
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let check = |rc: libc::c_int, what: &str| -> Result<()> {
        if rc != 0 {
            bail!("{what} ({} on {}): {}", id.ip, id.iface, std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: plain socket(2); the fd is owned by the OwnedFd right below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh, valid socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let dev = id.iface.as_bytes();
    // SAFETY: setsockopt reads `dev.len()` bytes of the interface name we pass.
    check(
        unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_BINDTODEVICE, dev.as_ptr().cast(), dev.len() as libc::socklen_t) },
        "SO_BINDTODEVICE",
    )?;
    // On Linux SO_SNDTIMEO also bounds a blocking connect(2).
    let timeout = libc::timeval { tv_sec: CONNECT_TIMEOUT.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: setsockopt reads one timeval we own.
    check(
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        },
        "SO_SNDTIMEO",
    )?;
    let local = sockaddr(id.ip, 0);
    // SAFETY: bind(2) reads one sockaddr_in of `len` bytes we own.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&local as *const libc::sockaddr_in).cast(), len) }, "bind")?;
    let remote = sockaddr(*dst.ip(), dst.port());
    // SAFETY: connect(2) reads one sockaddr_in of `len` bytes we own.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&remote as *const libc::sockaddr_in).cast(), len) }, "connect")?;
    Ok(TcpStream::from(fd))
}

/// Any request, its connection made by [`connect_from`] (`None`: the namespace's
/// default source address and route).
pub fn request_from(
    source: Option<&ClientIdentity>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response> {
    send(connect_from(source, addr)?, addr, method, path, headers, body, READ_TIMEOUT)
}

fn send(
    mut s: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    read_timeout: Duration,
) -> Result<Response> {
    s.set_read_timeout(Some(read_timeout))?;
    s.set_nodelay(true)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or_default();
    if method != "GET" || !body.is_empty() {
        req.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse(&raw)
}

fn parse(raw: &[u8]) -> Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("no HTTP answer (no end of headers): {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body);
    }
    Ok(Response { status, headers, body })
}

/// Decode a `Transfer-Encoding: chunked` body.
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = b.windows(2).position(|w| w == b"\r\n") {
        let len = usize::from_str_radix(String::from_utf8_lossy(&b[..pos]).trim(), 16).unwrap_or(0);
        if len == 0 || b.len() < pos + 2 + len {
            break;
        }
        out.extend_from_slice(&b[pos + 2..pos + 2 + len]);
        b = &b[(pos + 4 + len).min(b.len())..];
    }
    out
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
