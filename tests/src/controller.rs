//! A `bitmesh run` process owned by a guard, and what a test needs around it.
//!
//! * [`Controller`]: starts the real `bitmesh` binary inside a network namespace,
//!   waits until its client API answers, can `kill -9` it and start it again on the
//!   same data and pin directories, and kills it on drop. [`Controller::cli`] runs the
//!   operator CLI (`bitmesh clients --json`, ...) against its admin socket.
//! * [`LoopbackRelay`]: makes a TCP service of the test's namespace (the regtest node
//!   on 127.0.0.1) reachable on 127.0.0.1 inside another namespace, so the controller
//!   reaches bitcoind exactly as on a Pi, and the test keeps calling the node directly.
//! * [`http`]: a tiny blocking HTTP/1.1 client whose sockets are created inside a
//!   namespace (a client device talking to the gateway's API).
//!
//! The binary comes from `$BITMESH_BIN` (set by `cargo xtask test`), else
//! `<repo>/target/debug/bitmesh`; [`bitmesh_bin`] returns `None` (after
//! [`env::skip`], which panics under `CI=true`) when it is missing.
//!
//! Why not `ip netns exec`: it also unshares the mount namespace and remounts /sys,
//! which hides /sys/fs/bpf; the controller would then mount a private bpffs whose
//! pins die with the process, and a restart could not take the pinned maps over.
//! The guard enters only the network namespace (`setns(CLONE_NEWNET)` between fork
//! and exec), which is what `ip netns exec` does for the network.

// Test harness: any failure here must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::env;
use crate::netns::{in_netns, Netns, PinDir};

/// The `bitmesh` binary under test, or `None` after reporting a skip.
pub fn bitmesh_bin() -> Option<PathBuf> {
    let path = match std::env::var_os("BITMESH_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/bitmesh"),
    };
    if path.is_file() {
        Some(path)
    } else {
        env::skip(&format!(
            "the bitmesh binary {} is missing: build it (cargo build -p bitmesh-userspace) or set BITMESH_BIN",
            path.display()
        ));
        None
    }
}

/// How to start a controller. [`ControllerOptions::new`] fills the test defaults.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Client-facing interface inside the namespace.
    pub iface: String,
    /// Port of the client API (listening on every address of the namespace).
    pub api_port: u16,
    /// Bitcoin Core RPC URL as seen from inside the namespace.
    pub rpc_url: String,
    /// Cookie file of the node.
    pub rpc_cookie: PathBuf,
    /// Upload hook (`auto`, `xdp`, `xdp-generic`, `tc`).
    pub hook: String,
    /// Further `run` flags (`--price-msat-per-mib`, `--payout-address`, ...).
    pub extra: Vec<String>,
}

impl ControllerOptions {
    /// Regtest, chain polled every second, snapshots every second, metrics off.
    pub fn new(iface: &str, rpc_url: &str, rpc_cookie: &Path) -> Self {
        Self {
            iface: iface.to_string(),
            api_port: 3141,
            rpc_url: rpc_url.to_string(),
            rpc_cookie: rpc_cookie.to_path_buf(),
            hook: "tc".into(),
            extra: Vec::new(),
        }
    }

    /// Add `run` flags.
    pub fn with(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|s| s.to_string()));
        self
    }
}

/// A `bitmesh run` process inside a namespace; killed on drop. Its data directory
/// and pin directory live as long as the guard, across restarts.
pub struct Controller {
    child: Option<Child>,
    bin: PathBuf,
    netns: String,
    args: Vec<OsString>,
    /// The API port inside the namespace.
    pub api_port: u16,
    /// The admin socket (in the filesystem, shared with the test).
    pub admin_socket: PathBuf,
    /// Where the SQLite store and the seed live.
    pub data_dir: PathBuf,
    log_path: PathBuf,
    starts: u32,
    // Dropped after the process is killed (Drop below runs first).
    pins: PinDir,
    dir: tempfile::TempDir,
}

impl Controller {
    /// Start `bin run ...` inside `ns` and wait until the API answers `/v1/terms`.
    pub fn start(bin: &Path, ns: &Netns, opts: &ControllerOptions) -> Result<Controller> {
        let dir = tempfile::Builder::new().prefix("bitmesh-ctl-").tempdir()?;
        let pins = PinDir::new();
        let data_dir = dir.path().join("data");
        let admin_socket = dir.path().join("admin.sock");
        let mut args: Vec<OsString> = vec!["run".into()];
        let mut push = |k: &str, v: &std::ffi::OsStr| {
            args.push(k.into());
            args.push(v.to_owned());
        };
        push("--iface", opts.iface.as_ref());
        push("--hook", opts.hook.as_ref());
        push("--network", "regtest".as_ref());
        push("--pin-dir", pins.path().as_os_str());
        push("--data-dir", data_dir.as_os_str());
        push("--admin-socket", admin_socket.as_os_str());
        push("--api-port", opts.api_port.to_string().as_ref());
        push("--rpc-url", opts.rpc_url.as_ref());
        push("--rpc-cookie", opts.rpc_cookie.as_os_str());
        push("--chain-poll-secs", "1".as_ref());
        push("--snapshot-interval-secs", "1".as_ref());
        if !opts.extra.iter().any(|a| a == "--metrics-addr") {
            push("--metrics-addr", "off".as_ref());
        }
        args.extend(opts.extra.iter().map(OsString::from));
        let mut c = Controller {
            child: None,
            bin: bin.to_path_buf(),
            netns: ns.name().to_string(),
            args,
            api_port: opts.api_port,
            admin_socket,
            data_dir,
            log_path: dir.path().join("controller.log"),
            starts: 0,
            pins,
            dir,
        };
        c.spawn()?;
        Ok(c)
    }

    /// The bpffs directory the controller pins its maps and links in.
    pub fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    /// The temporary directory holding data dir, socket and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
        writeln!(&log, "===== start #{} =====", self.starts)?;
        let ns_file = std::fs::File::open(format!("/var/run/netns/{}", self.netns))
            .with_context(|| format!("opening namespace {}", self.netns))?;
        let ns_fd = ns_file.as_raw_fd();
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .env("RUST_LOG", std::env::var("BITMESH_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: between fork and exec only the async-signal-safe setns(2) runs; the
        // fd is open in the parent (ns_file lives until after spawn) and CLOEXEC.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("spawning {}", self.bin.display()))?;
        drop(ns_file);
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    /// Wait until the API answers `GET /v1/terms` and the admin socket exists.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let addr: SocketAddr = ([127, 0, 0, 1], self.api_port).into();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!("bitmesh run exited with {status} during startup:\n{}", self.log_tail(30));
                }
            }
            let ns = self.netns.clone();
            let up = in_netns_named(&ns, || Ok(http::get(addr, "/v1/terms", &[]).map(|r| r.status == 200).unwrap_or(false)))?;
            if up && self.admin_socket.exists() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("bitmesh run did not answer within {timeout:?}:\n{}", self.log_tail(30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `kill -9` the controller (no shutdown code runs) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (graceful stop: final snapshot) and reap; kill -9 after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again with the same flags, data dir and pin dir (after [`Self::kill9`]
    /// or [`Self::stop`]).
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Everything the controller logged, over all starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `n` log lines.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Run `bitmesh <args> --admin-socket <ours>` (the operator CLI), failing on a
    /// non-zero exit.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running bitmesh {args:?}"))?;
        if !out.status.success() {
            bail!("bitmesh {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(out)
    }

    /// Run a CLI command with `--json` and parse its output.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all)?;
        serde_json::from_slice(&out.stdout).with_context(|| format!("bitmesh {all:?} printed no JSON"))
    }

    /// `bitmesh clients --json`.
    pub fn clients(&self) -> Result<Vec<serde_json::Value>> {
        Ok(self.cli_json(&["clients"])?.as_array().cloned().unwrap_or_default())
    }

    /// `bitmesh channels --json`.
    pub fn channels(&self) -> Result<Vec<serde_json::Value>> {
        Ok(self.cli_json(&["channels"])?.as_array().cloned().unwrap_or_default())
    }

    /// `bitmesh earnings --json`.
    pub fn earnings(&self) -> Result<serde_json::Value> {
        self.cli_json(&["earnings"])
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- controller log (last 40 lines) ---\n{}", self.log_tail(40));
        }
    }
}

fn in_netns_named<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/var/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on a valid namespace fd affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns into {name}: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside namespace panicked"))?
    })
}

/// Forwards `127.0.0.1:<port>` inside a namespace to `target` in the test's own
/// namespace (one thread per direction per connection). Stopped on drop; open
/// connections end when either side closes.
pub struct LoopbackRelay {
    /// The port on 127.0.0.1 inside the namespace.
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopbackRelay {
    /// Listen on 127.0.0.1:`port` (0 = any) inside `ns`, forwarding to `target`.
    pub fn start(ns: &Netns, port: u16, target: SocketAddr) -> Result<LoopbackRelay> {
        // The listening socket belongs to the namespace it was created in; the
        // accepting thread (and the outgoing connections) stay in ours.
        let listener = in_netns(ns, || Ok(TcpListener::bind(("127.0.0.1", port))?))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inside, _)) => {
                        let _ = inside.set_nonblocking(false);
                        let Ok(outside) = TcpStream::connect(target) else { continue };
                        let _ = inside.set_nodelay(true);
                        let _ = outside.set_nodelay(true);
                        pump(inside, outside);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(LoopbackRelay { port, stop, thread: Some(thread) })
    }

    /// `http://127.0.0.1:<port>` (the URL to give the controller).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn pump(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Read);
        });
    };
    copy(a, b2);
    copy(b, a2);
}

impl Drop for LoopbackRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A minimal blocking HTTP/1.1 client (`Connection: close`), enough for the JSON
/// API. Call it from a thread inside the client's namespace (or pass a socket made
/// there): the TCP socket is created in the calling thread's namespace.
pub mod http {
    use super::*;

    /// A response: status, headers (lower-case names) and body.
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
    }

    /// `GET path` with extra headers.
    pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
        request(addr, "GET", path, headers, None)
    }

    /// `POST path` with a JSON body.
    pub fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Result<Response> {
        request(addr, "POST", path, &[("content-type", "application/json")], Some(body.to_string().as_bytes()))
    }

    /// Any request; `body` is sent as is with its length.
    pub fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response> {
        request_from(None, addr, method, path, headers, body)
    }

    /// `POST path` with a JSON body, from `source` (see [`request_from`]).
    pub fn post_json_from(source: Option<&ClientIdentity>, addr: SocketAddr, path: &str, body: &serde_json::Value) -> Result<Response> {
        request_from(source, addr, "POST", path, &[("content-type", "application/json")], Some(body.to_string().as_bytes()))
    }

    /// A TCP connection to `addr`; with a `source`, bound to that identity's
    /// interface (`SO_BINDTODEVICE`, so it leaves with the identity's MAC) and source
    /// IP before connecting. Connecting times out after 5 s either way.
    pub fn connect_from(source: Option<&ClientIdentity>, addr: SocketAddr) -> Result<TcpStream> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let Some(id) = source else { return Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?) };
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
        let timeout = libc::timeval { tv_sec: 5, tv_usec: 0 };
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
        let mut s = connect_from(source, addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
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
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
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
}

/// Upstream side of the [`Lab`]: the "internet" beyond the gateway.
pub const UPSTREAM_GATEWAY_IPV4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 88, 0, 1);
/// The upstream host (UDP echo server).
pub const UPSTREAM_IPV4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 88, 0, 2);
/// UDP echo port on the upstream host.
pub const ECHO_PORT: u16 = 7777;

/// A UDP echo server on a socket created inside a namespace; stopped on drop.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    /// Echo every datagram to `addr` (inside `ns`) back to its sender.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<UdpEcho> {
        let sock = in_netns(ns, || Ok(std::net::UdpSocket::bind(addr)?))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Ok(UdpEcho { stop, thread: Some(thread) })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Everything a controller test needs, built and torn down as one guard:
/// client ns --veth (metered, 10.77.0.0/24)-- gateway ns --veth (10.88.0.0/24)-- upstream ns,
/// the gateway forwarding between them, a regtest node in the test's namespace
/// reachable from the gateway namespace on 127.0.0.1 through a [`LoopbackRelay`],
/// a UDP echo server upstream, and `bitmesh run` in the gateway namespace.
/// Field order is drop order: the controller dies first, the namespaces last.
pub struct Lab {
    /// The controller process.
    pub controller: Controller,
    /// bitcoind RPC inside the gateway namespace.
    pub relay: LoopbackRelay,
    /// The upstream echo server.
    pub echo: UdpEcho,
    /// The regtest node (RPC from the test's namespace).
    pub node: crate::bitcoind::Bitcoind,
    /// Gateway <-> upstream link (`a` in the gateway namespace).
    pub upstream_link: crate::netns::VethPair,
    /// Gateway and client namespaces and the metered link (`veth.a` = client-facing).
    pub topo: crate::netns::Topology,
    /// The upstream namespace.
    pub upstream: Netns,
    /// How many client identities [`Lab::add_client_identities`] made so far.
    identities: std::sync::atomic::AtomicU32,
}

impl Lab {
    /// Build the lab and start the controller with `extra` `run` flags (e.g. a
    /// price). `None` (after a skip notice; a failure under CI) when the machine
    /// cannot run it: no root, no bitmesh binary, no bitcoind.
    pub fn start(extra: &[&str]) -> Result<Option<Lab>> {
        Self::start_with(|o| o.with(extra))
    }

    /// Like [`Lab::start`], adjusting the controller options.
    pub fn start_with(adjust: impl FnOnce(ControllerOptions) -> ControllerOptions) -> Result<Option<Lab>> {
        if !env::is_root() {
            env::skip("controller tests need root (namespaces, BPF)");
            return Ok(None);
        }
        let Some(bin) = bitmesh_bin() else { return Ok(None) };
        let Some(node) = crate::bitcoind::Bitcoind::start() else { return Ok(None) };
        let topo = crate::netns::Topology::new()?;
        let upstream = Netns::new()?;
        let upstream_link = crate::netns::VethPair::new(&topo.gateway, "02:77:00:00:01:01", &upstream, "02:88:00:00:00:02")?;
        topo.gateway.exec("sysctl", &["-qw", &format!("net.ipv6.conf.{}.disable_ipv6=1", upstream_link.a)])?;
        upstream.exec("sysctl", &["-qw", &format!("net.ipv6.conf.{}.disable_ipv6=1", upstream_link.b)])?;
        topo.gateway.ip(&["addr", "add", &format!("{UPSTREAM_GATEWAY_IPV4}/24"), "dev", &upstream_link.a])?;
        upstream.ip(&["addr", "add", &format!("{UPSTREAM_IPV4}/24"), "dev", &upstream_link.b])?;
        topo.gateway.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        topo.client.ip(&["route", "add", "default", "via", "10.77.0.1"])?;
        upstream.ip(&["route", "add", "default", "via", &UPSTREAM_GATEWAY_IPV4.to_string()])?;
        let echo = UdpEcho::start(&upstream, (UPSTREAM_IPV4, ECHO_PORT).into())?;
        let relay = LoopbackRelay::start(&topo.gateway, 0, ([127, 0, 0, 1], node.rpc_port).into())?;
        let opts = adjust(ControllerOptions::new(topo.gateway_if(), &relay.url(), &node.cookie_path()));
        let controller = Controller::start(&bin, &topo.gateway, &opts)?;
        Ok(Some(Lab { controller, relay, echo, node, upstream_link, topo, upstream, identities: Default::default() }))
    }

    /// The API address as the client sees it.
    pub fn api(&self) -> SocketAddr {
        (crate::netns::GATEWAY_IPV4, self.controller.api_port).into()
    }

    /// A UDP socket in the client namespace, connected to the upstream echo server.
    pub fn client_udp(&self) -> Result<std::net::UdpSocket> {
        let s = in_netns(&self.topo.client, || {
            let s = std::net::UdpSocket::bind("10.77.0.2:0")?;
            s.connect((UPSTREAM_IPV4, ECHO_PORT))?;
            Ok(s)
        })?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(s)
    }

    /// Wait until the controller's view of the tip (in `/v1/terms`) is the node's.
    pub fn wait_synced(&self) -> Result<()> {
        let want = self.node.tip();
        let client = ScriptedClient::new(&self.topo.client, self.api());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if client.terms()?.tip_height == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("controller did not see tip {want} within 20 s:\n{}", self.controller.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `bitmesh clients --json` row of the lab's client device.
    pub fn client_row(&self) -> Result<Option<serde_json::Value>> {
        Ok(self.controller.clients()?.into_iter().find(|r| r["mac"] == crate::netns::CLIENT_MAC))
    }

    /// Run `f` on a thread inside the client namespace (its sockets are the client's).
    pub fn as_client<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        in_netns(&self.topo.client, f)
    }
}

/// One more client device in the [`Lab`]'s client namespace: a macvlan interface on
/// the client's veth end, with its own MAC and IPv4 address on the gateway's link.
/// Made by [`Lab::add_client_identities`]; used by [`ScriptedClient::with_identity`]
/// and [`http::connect_from`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The macvlan interface in the client namespace.
    pub iface: String,
    /// Its MAC (`02:c2:..`), the one the gateway binds the channel to.
    pub mac: String,
    /// Its address, in 10.77.0.0/16 (10.77.1.2 onwards).
    pub ip: std::net::Ipv4Addr,
}

impl ClientIdentity {
    /// Identity number `k` (unique within a lab).
    fn numbered(k: u32) -> ClientIdentity {
        ClientIdentity {
            iface: format!("mc{k}"),
            mac: format!("02:c2:00:{:02x}:{:02x}:{:02x}", (k >> 16) & 0xff, (k >> 8) & 0xff, k & 0xff),
            ip: std::net::Ipv4Addr::new(10, 77, (1 + k / 250) as u8, (2 + k % 250) as u8),
        }
    }
}

impl Lab {
    /// Give the client namespace `n` more client devices ([`ClientIdentity`]), made in
    /// two `ip -batch` runs (1,000 take a few seconds). Everything lives in the lab's
    /// namespaces and goes with them.
    ///
    /// The client namespace answers ARP only on the interface that holds the asked
    /// address (`arp_ignore=1`, so the veth end never claims an identity's IP), has
    /// reverse-path filtering off, IPv6 off on the new interfaces (no DAD, MLD or router
    /// solicitations through the meter), and a permanent neighbour entry for the
    /// gateway on each identity. The gateway namespace gets an on-link route to
    /// 10.77.0.0/16 on its client-facing veth (its own address stays 10.77.0.1/24).
    ///
    /// With `pin_gateway_neighbours` the gateway's neighbour table also gets permanent
    /// IP -> MAC entries for the identities instead of learning them by ARP. Use it for
    /// hundreds of identities: dynamic neighbour entries count against the host-wide
    /// `gc_thresh3` (1,024 by default, shared by every namespace), permanent ones do not.
    pub fn add_client_identities(&self, n: usize, pin_gateway_neighbours: bool) -> Result<Vec<ClientIdentity>> {
        use std::sync::atomic::Ordering::Relaxed;
        let first = self.identities.fetch_add(n as u32, Relaxed);
        anyhow::ensure!(first as usize + n <= 250 * 250, "at most 62,500 client identities per lab");
        if first == 0 {
            self.topo.client.exec(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.conf.all.arp_ignore=1",
                    "net.ipv4.conf.all.arp_announce=2",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ],
            )?;
            self.topo.gateway.ip(&["route", "add", "10.77.0.0/16", "dev", self.topo.gateway_if(), "scope", "link"])?;
        }
        let ids: Vec<ClientIdentity> = (first..first + n as u32).map(ClientIdentity::numbered).collect();
        let lower = &self.topo.veth.b;
        let gw = crate::netns::GATEWAY_IPV4;
        let gw_mac = crate::netns::GATEWAY_MAC;
        let mut client = String::new();
        let mut gateway = String::new();
        for id in &ids {
            let ClientIdentity { iface, mac, ip } = id;
            client.push_str(&format!("link add link {lower} name {iface} address {mac} type macvlan mode bridge\n"));
            client.push_str(&format!("addr add {ip}/16 dev {iface}\n"));
            client.push_str(&format!("link set {iface} up\n"));
            client.push_str(&format!("neigh replace {gw} lladdr {gw_mac} dev {iface} nud permanent\n"));
            gateway.push_str(&format!("neigh replace {ip} lladdr {mac} dev {} nud permanent\n", self.topo.gateway_if()));
        }
        let batch = |ns: &Netns, text: &str| -> Result<()> {
            let mut file = tempfile::Builder::new().prefix("bitmesh-ip-batch-").tempfile()?;
            file.write_all(text.as_bytes())?;
            file.flush()?;
            ns.ip(&["-batch", &file.path().to_string_lossy()])?;
            Ok(())
        };
        batch(&self.topo.client, &client)?;
        if pin_gateway_neighbours {
            batch(&self.topo.gateway, &gateway)?;
        }
        Ok(ids)
    }

    /// Fund every client's offered channel with `capacity`, `per_tx` channels per
    /// funding transaction (one wallet coinbase each; keep `per_tx` <= 200 so a
    /// transaction stays under the gateway's 10,000-byte relay limit), broadcast
    /// straight to the node and confirmed by one block. Returns, per client in order,
    /// the transaction and output to announce with [`ScriptedClient::fund_with`]; the
    /// gateway then sees them confirmed and relays nothing.
    pub fn confirmed_funding(
        &self,
        wallet: &mut crate::bitcoind::CoinbaseWallet,
        clients: &[ScriptedClient],
        capacity: bitcoin::Amount,
        per_tx: usize,
    ) -> Result<Vec<(Arc<bitcoin::Transaction>, u32)>> {
        use bitmesh::chain::Chain;
        let mut out = Vec::with_capacity(clients.len());
        for group in clients.chunks(per_tx.max(1)) {
            let outputs: Vec<bitcoin::TxOut> = group
                .iter()
                .map(|c| bitcoin::TxOut {
                    value: capacity,
                    script_pubkey: c.offer.as_ref().expect("open first").funding_script_pubkey.clone(),
                })
                .collect();
            let tx = Arc::new(wallet.pay_many(&outputs));
            self.node.rpc().broadcast(&tx).context("broadcasting a funding transaction")?;
            out.extend((0..group.len() as u32).map(|vout| (tx.clone(), vout)));
        }
        self.node.mine(1);
        self.wait_synced()?;
        Ok(out)
    }
}

/// Send `count` datagrams of `size` bytes through the gateway and count the echoes
/// that come back (waiting up to 100 ms for each).
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

/// A client device driven by library calls: its own key, the channel library for
/// signing, and HTTP to the gateway's API from inside the client namespace.
pub struct ScriptedClient {
    /// The client's channel key.
    pub secret: bitcoin::secp256k1::SecretKey,
    /// Its public key.
    pub pubkey: bitcoin::PublicKey,
    /// Where the client's change goes.
    pub change_script: bitcoin::ScriptBuf,
    /// The gateway's offer, after [`Self::open`].
    pub offer: Option<bitmesh_common::wire::OpenResponse>,
    /// The funded channel, after [`Self::fund`].
    pub channel: Option<bitmesh::channel::Channel>,
    api: SocketAddr,
    netns: String,
    source: Option<ClientIdentity>,
}

impl ScriptedClient {
    /// A fresh key, talking to `api` from inside `client_ns`.
    pub fn new(client_ns: &Netns, api: SocketAddr) -> ScriptedClient {
        use bitcoin::secp256k1::{rand, Secp256k1, SecretKey};
        let secp = Secp256k1::new();
        let secret = SecretKey::new(&mut rand::thread_rng());
        let pubkey = bitcoin::PublicKey::new(secret.public_key(&secp));
        let change_script = bitcoin::ScriptBuf::new_p2wpkh(&pubkey.wpubkey_hash().unwrap());
        ScriptedClient {
            secret,
            pubkey,
            change_script,
            offer: None,
            channel: None,
            api,
            netns: client_ns.name().to_string(),
            source: None,
        }
    }

    /// A fresh key on its own device: every connection leaves from `identity`'s
    /// interface and IP (see [`Lab::add_client_identities`]), so the gateway binds its
    /// channel to that identity's MAC.
    pub fn with_identity(client_ns: &Netns, api: SocketAddr, identity: ClientIdentity) -> ScriptedClient {
        ScriptedClient { source: Some(identity), ..ScriptedClient::new(client_ns, api) }
    }

    /// The identity this client speaks from (`None`: the client namespace's own address).
    pub fn identity(&self) -> Option<&ClientIdentity> {
        self.source.as_ref()
    }

    /// One HTTP request from the client's namespace (and identity).
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Result<http::Response> {
        let api = self.api;
        let source = self.source.as_ref();
        in_netns_named(&self.netns, || http::request_from(source, api, method, path, headers, body))
    }

    /// POST a JSON body from the client's namespace (and identity).
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Result<http::Response> {
        let api = self.api;
        let source = self.source.as_ref();
        in_netns_named(&self.netns, || http::post_json_from(source, api, path, body))
    }

    /// Run `f` on one thread inside the client namespace (for timing loops).
    pub fn in_ns<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        in_netns_named(&self.netns, f)
    }

    /// The API address.
    pub fn api(&self) -> SocketAddr {
        self.api
    }

    /// `GET /v1/terms`.
    pub fn terms(&self) -> Result<bitmesh_common::wire::Terms> {
        let r = self.request("GET", "/v1/terms", &[], None)?;
        anyhow::ensure!(r.status == 200, "terms: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// Ask for a channel expiring `blocks` above the gateway's tip.
    pub fn open(&mut self, blocks: u32) -> Result<bitmesh_common::wire::OpenResponse> {
        let tip = self.terms()?.tip_height.to_consensus_u32();
        let req = bitmesh_common::wire::OpenRequest {
            client_pubkey: self.pubkey,
            expiry: bitcoin::absolute::Height::from_consensus(tip + blocks)?,
            client_change_script: self.change_script.clone(),
        };
        let r = self.post("/v1/channels", &serde_json::to_value(&req)?)?;
        anyhow::ensure!(r.status == 200, "open: {} {}", r.status, String::from_utf8_lossy(&r.body));
        let offer: bitmesh_common::wire::OpenResponse = serde_json::from_slice(&r.body)?;
        self.offer = Some(offer.clone());
        Ok(offer)
    }

    /// The funding transaction for `capacity` from `wallet` (not sent).
    pub fn funding_tx(&self, wallet: &mut crate::bitcoind::CoinbaseWallet, capacity: bitcoin::Amount) -> bitcoin::Transaction {
        let offer = self.offer.as_ref().expect("open first");
        wallet.pay(&offer.funding_script_pubkey, capacity, false)
    }

    /// Fund the offered channel with `capacity` from `wallet`, through the gateway's relay.
    pub fn fund(
        &mut self,
        wallet: &mut crate::bitcoind::CoinbaseWallet,
        capacity: bitcoin::Amount,
    ) -> Result<bitmesh_common::wire::ChannelStatus> {
        let tx = self.funding_tx(wallet, capacity);
        self.fund_with(&tx, 0)
    }

    /// Tell the gateway that output `vout` of `tx` funds the offered channel (the
    /// gateway relays `tx` if its node does not know it yet).
    pub fn fund_with(&mut self, tx: &bitcoin::Transaction, vout: u32) -> Result<bitmesh_common::wire::ChannelStatus> {
        let offer = self.offer.clone().expect("open first");
        let capacity = tx.output.get(vout as usize).context("no such funding output")?.value;
        let req = bitmesh_common::wire::FundRequest { channel_id: offer.channel_id, funding_tx: tx.clone(), funding_vout: vout };
        let r = self.post(&format!("/v1/channels/{}/funding", offer.channel_id), &serde_json::to_value(&req)?)?;
        anyhow::ensure!(r.status == 200, "fund: {} {}", r.status, String::from_utf8_lossy(&r.body));
        self.channel = Some(bitmesh::channel::Channel {
            script: bitmesh::channel::ChannelScript { gateway: offer.gateway_pubkey, client: self.pubkey, expiry: offer.expiry },
            funding_outpoint: bitcoin::OutPoint { txid: tx.compute_txid(), vout },
            capacity,
            client_change_script: self.change_script.clone(),
            min_first_payment: offer.min_first_payment,
        });
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// The channel id.
    pub fn channel_id(&self) -> bitmesh_common::wire::ChannelId {
        self.offer.as_ref().expect("open first").channel_id
    }

    /// A signed update paying a cumulative `total`.
    pub fn update(&self, total: bitcoin::Amount) -> bitmesh_common::wire::PaymentUpdate {
        let channel = self.channel.as_ref().expect("fund first");
        bitmesh_common::wire::PaymentUpdate {
            channel_id: self.channel_id(),
            total_paid: total,
            signature: bitmesh::channel::sign_update(channel, total, &self.secret).unwrap(),
        }
    }

    /// Send an update; the raw response.
    pub fn send(&self, update: &bitmesh_common::wire::PaymentUpdate) -> Result<http::Response> {
        self.post(&format!("/v1/channels/{}/payments", update.channel_id), &serde_json::to_value(update)?)
    }

    /// Pay a cumulative `total`; the acknowledgement (an error for anything else).
    pub fn pay(&self, total: bitcoin::Amount) -> Result<bitmesh_common::wire::PaymentAck> {
        let r = self.send(&self.update(total))?;
        anyhow::ensure!(r.status == 200, "pay {total}: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// Hex DER signature over `client_auth_digest(action, channel)`.
    pub fn auth(&self, action: &str) -> String {
        use bitcoin::hex::DisplayHex;
        let digest = bitmesh_common::wire::client_auth_digest(action, &self.channel_id());
        let msg = bitcoin::secp256k1::Message::from_digest(digest);
        let sig = bitcoin::secp256k1::Secp256k1::new().sign_ecdsa(&msg, &self.secret);
        sig.serialize_der().to_lower_hex_string()
    }

    /// `GET /v1/channels/{id}` (signed).
    pub fn status(&self) -> Result<bitmesh_common::wire::ChannelStatus> {
        let auth = self.auth("status");
        let r = self.request("GET", &format!("/v1/channels/{}", self.channel_id()), &[(bitmesh::api::AUTH_HEADER, &auth)], None)?;
        anyhow::ensure!(r.status == 200, "status: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// `POST /v1/channels/{id}/close` (signed).
    pub fn close(&self) -> Result<bitmesh_common::wire::CloseResponse> {
        let body = serde_json::json!({ "channel_id": self.channel_id(), "signature": self.auth("close") });
        let r = self.post(&format!("/v1/channels/{}/close", self.channel_id()), &body)?;
        anyhow::ensure!(r.status == 200, "close: {} {}", r.status, String::from_utf8_lossy(&r.body));
        Ok(serde_json::from_slice(&r.body)?)
    }
}

/// Latency figures of a real controller (see [`measure_controller`]).
#[derive(Debug, Clone)]
pub struct ControllerLatency {
    /// Payment updates timed (client request sent -> acknowledgement received).
    pub payments: usize,
    /// Median payment round trip (HTTP over the client link, verify, synced
    /// SQLite commit, CREDIT raised, ack).
    pub payment_p50: Duration,
    /// 99th percentile of the same.
    pub payment_p99: Duration,
    /// Stalls timed (budget exhausted, top-up paid).
    pub stalls: usize,
    /// Median time from the top-up's acknowledgement to the first datagram echoed
    /// through the gateway (includes one UDP round trip over the veths).
    pub resume_p50: Duration,
    /// Slowest of the same.
    pub resume_max: Duration,
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Start a lab (controller, regtest node, namespaces), open and fund one channel,
/// then time `payments` durable payment updates over HTTP and `stalls` recoveries
/// from an exhausted budget. `None` when the machine cannot run it (skip notice
/// printed). For the benchmark binary: `bitmesh_tests::controller::measure_controller(500, 20)`.
pub fn measure_controller(payments: usize, stalls: usize) -> Result<Option<ControllerLatency>> {
    use bitcoin::Amount;
    let Some(lab) = Lab::start(&["--price-msat-per-mib", "8000000", "--rate-limit-per-min", "1000000"])? else {
        return Ok(None);
    };
    let mut wallet = crate::bitcoind::CoinbaseWallet::fund(&lab.node, 2, 0);
    lab.wait_synced()?;
    let mut client = ScriptedClient::new(&lab.topo.client, lab.api());
    let offer = client.open(200)?;
    client.fund(&mut wallet, Amount::from_sat(40_000))?;
    let mut total = offer.min_first_payment;
    client.pay(total)?;

    // Payment round trips: signatures made before the clock starts (client CPU is
    // not the gateway's latency); one TCP connection per update, as a client makes.
    let updates: Vec<_> = (1..=payments as u64).map(|i| client.update(total + Amount::from_sat(i))).collect();
    total += Amount::from_sat(payments as u64);
    let api = client.api();
    let mut lat = client.in_ns(|| {
        let mut lat = Vec::with_capacity(updates.len());
        for u in &updates {
            let body = serde_json::to_value(u)?;
            let path = format!("/v1/channels/{}/payments", u.channel_id);
            let t = Instant::now();
            let r = http::post_json(api, &path, &body)?;
            lat.push(t.elapsed());
            anyhow::ensure!(r.status == 200, "payment refused: {}", String::from_utf8_lossy(&r.body));
        }
        Ok(lat)
    })?;
    lat.sort();

    // Stall -> top-up -> traffic again.
    let udp = lab.client_udp()?;
    udp.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut resume = Vec::new();
    for _ in 0..stalls {
        let mut misses = 0;
        while misses < 3 {
            if udp_round_trips(&udp, 1, 200) == 0 {
                misses += 1;
            } else {
                misses = 0;
            }
        }
        total += Amount::from_sat(50);
        let update = client.update(total);
        let body = serde_json::to_value(&update)?;
        let path = format!("/v1/channels/{}/payments", update.channel_id);
        let r = client.in_ns(|| http::post_json(api, &path, &body))?;
        let acked = Instant::now();
        anyhow::ensure!(r.status == 200, "top-up refused: {}", String::from_utf8_lossy(&r.body));
        udp.set_read_timeout(Some(Duration::from_millis(2)))?;
        let deadline = acked + Duration::from_secs(2);
        loop {
            if udp_round_trips(&udp, 1, 200) == 1 {
                resume.push(acked.elapsed());
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "traffic did not resume within 2 s of the ack");
        }
        udp.set_read_timeout(Some(Duration::from_millis(20)))?;
    }
    resume.sort();
    Ok(Some(ControllerLatency {
        payments: lat.len(),
        payment_p50: percentile(&lat, 50),
        payment_p99: percentile(&lat, 99),
        stalls: resume.len(),
        resume_p50: if resume.is_empty() { Duration::ZERO } else { percentile(&resume, 50) },
        resume_max: resume.last().copied().unwrap_or_default(),
    }))
}
