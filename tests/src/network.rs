//! The network job of the harness: network namespaces, veth pairs, private bpffs pin
//! directories, a loaded meter on one ([`TestMeter`]), the two-namespace [`Topology`]
//! of the kernel tests, and the testbed's [`Lan`] (gateway, bridge, clients, upstream).
//! Every guard removes what it created on drop, on every exit path, and never touches
//! anything it did not create.
//!
//! Names are unique per process and per guard (`bm<pid>x<n>...`), so tests can run in
//! parallel and leftovers of a killed run are recognisable.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bitmesh::meter::{Meter, MeterConfig};

mod lan;

pub use lan::{client_ip, client_mac, ClientIdentity, ClientNs, Lan, MAX_CLIENTS, UPSTREAM_GATEWAY_IPV4, UPSTREAM_IPV4};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique in this process: `<prefix><pid>x<n>` (fits IFNAMSIZ for
/// prefixes of up to 3 characters).
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

/// Run a command, failing with its stderr if it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// `ip <args>`.
pub fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// Signal number that asked this process to stop (0: none).
static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe. The sweeper thread does the rest.
    STOP_SIGNAL.store(sig, Ordering::Relaxed);
}

/// Guards clean up when they drop, which a test process killed by SIGTERM, SIGINT or
/// SIGHUP never reaches. From the first namespace on, such a signal makes a sweeper
/// thread remove what this process created (names carry its pid): processes inside
/// its namespaces, the namespaces, its pin directories; then the process exits.
fn sweep_on_signal() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
        }
        std::thread::spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let sig = STOP_SIGNAL.load(Ordering::Relaxed);
            if sig != 0 {
                sweep_own_leftovers();
                // SAFETY: _exit ends the process at once, as the signal would have.
                unsafe { libc::_exit(128 + sig) };
            }
        });
    });
}

/// Remove the namespaces (`bm<pid>x*`, after killing what runs in them) and pin
/// directories (`bitmesh-test-<pid>-*`) of this process.
fn sweep_own_leftovers() {
    let pid = std::process::id();
    let own = |dir: &str, prefix: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(prefix)).collect())
            .unwrap_or_default()
    };
    for ns in own("/run/netns", &format!("bm{pid}x")) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
            for p in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill(2) on a pid listed in our own namespace.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &ns]).stdin(Stdio::null()).output();
    }
    for dir in own("/sys/fs/bpf", &format!("bitmesh-test-{pid}-")) {
        let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf").join(dir));
    }
}

/// A private pin directory `/sys/fs/bpf/bitmesh-test-<pid>-<n>`, removed with
/// everything in it on drop (maps and links pinned there go with it).
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// A fresh, not yet existing directory path under /sys/fs/bpf.
    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/sys/fs/bpf/bitmesh-test-{}-{n}", std::process::id()));
        Self { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // bpffs has no recursive unlink of pinned objects beyond remove_dir_all,
        // which works: pins are plain inodes.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The gateway's client-side address (kernel tests and the [`Lan`]).
pub const GATEWAY_IPV4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The client's address (kernel tests and the [`Lan`]'s client 0).
pub const CLIENT_IPV4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The payment port the kernel tests configure.
pub const PAYMENT_PORT: u16 = 3141;

/// A loaded (not attached) meter on a private pin directory. Field order matters:
/// the meter drops (closing its fds) before the pin directory is removed.
pub struct TestMeter {
    /// The meter.
    pub meter: Meter,
    /// Its config.
    pub config: MeterConfig,
    /// Where its maps are pinned.
    pub pins: PinDir,
}

impl TestMeter {
    /// Load the meter with the test gateway configuration on a new pin directory.
    pub fn load() -> Result<Self> {
        Self::load_with(|_| {})
    }

    /// Like [`Self::load`], adjusting the config first.
    pub fn load_with(adjust: impl FnOnce(&mut MeterConfig)) -> Result<Self> {
        let pins = PinDir::new();
        let mut config = MeterConfig::new(GATEWAY_IPV4);
        config.pin_dir = pins.path().to_path_buf();
        config.gateway_ipv6 = Some("2001:db8:77::1".parse()?);
        config.payment_port = PAYMENT_PORT;
        adjust(&mut config);
        let meter = Meter::load(&config).context("loading the meter")?;
        Ok(Self { meter, config, pins })
    }

    /// Load a second meter on the same pin directory (a controller restart).
    pub fn reload(self) -> Result<Self> {
        let TestMeter { meter, config, pins } = self;
        drop(meter);
        let meter = Meter::load(&config).context("reloading the meter")?;
        Ok(Self { meter, config, pins })
    }
}

/// A network namespace, deleted on drop (which also destroys interfaces inside it).
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create `bm<pid>x<n>` with loopback up.
    pub fn new() -> Result<Self> {
        sweep_on_signal();
        let name = unique_name("bm");
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command run inside the namespace (`ip netns exec <ns> <program> ...`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Run `program args` inside the namespace, failing on a non-zero exit.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        run(self.command(program).args(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A veth pair with one end in each of two namespaces, deleted on drop (deleting
/// one end deletes both).
pub struct VethPair {
    /// Name of the end in the first namespace.
    pub a: String,
    /// Name of the end in the second namespace.
    pub b: String,
    ns_a: String,
}

impl VethPair {
    /// Create the pair `a` in `ns_a`, `b` in `ns_b`, both up, with the given MACs.
    pub fn new(ns_a: &Netns, mac_a: &str, ns_b: &Netns, mac_b: &str) -> Result<Self> {
        let a = unique_name("va");
        let b = unique_name("vb");
        // Created directly inside the namespaces: never visible in the host's.
        ip(&[
            "link", "add", &a, "netns", ns_a.name(), "address", mac_a, "type", "veth", "peer", "name", &b,
            "netns", ns_b.name(), "address", mac_b,
        ])?;
        let pair = Self { a, b, ns_a: ns_a.name().to_string() };
        ns_a.ip(&["link", "set", &pair.a, "up"])?;
        ns_b.ip(&["link", "set", &pair.b, "up"])?;
        Ok(pair)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.ns_a, "link", "del", &self.a])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Run `f` with the calling thread moved into namespace `ns` (on a scoped thread,
/// so the test's own thread never changes namespace). Used to attach the meter to
/// an interface that only exists inside a namespace, to make sockets that belong to
/// it, and to spawn processes into it.
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    in_netns_named(ns.name(), f)
}

/// [`in_netns`] for a namespace known by name (`/var/run/netns/<name>`).
pub fn in_netns_named<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/var/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns into {name}: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside namespace panicked"))?
    })
}

/// A background thread (a server whose socket was made inside a namespace) that runs
/// until this guard drops: drop raises the stop flag the thread polls, then joins it.
pub struct ServerThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Run `serve(stop)` on a new thread; it should return soon after `stop` is set.
    pub fn spawn(serve: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> ServerThread {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        ServerThread { stop, thread: Some(std::thread::spawn(move || serve(flag))) }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// MAC of the gateway's client-facing interface: the [`Topology`] veth's gateway end,
/// the [`Lan`]'s bridge.
pub const GATEWAY_MAC: &str = "02:77:00:00:00:01";
/// MAC of the client: the [`Topology`] veth's client end, the [`Lan`]'s client 0.
pub const CLIENT_MAC: &str = "02:c1:00:00:00:02";

/// Two namespaces joined by a veth pair: a gateway (10.77.0.1/24, the meter's side)
/// and a client (10.77.0.2/24). IPv6 is off on both ends so only the traffic a
/// test sends (and ARP) crosses the link. Field order: the veth goes before the
/// namespaces.
pub struct Topology {
    /// The veth pair: `a` in the gateway namespace, `b` in the client's.
    pub veth: VethPair,
    /// The gateway namespace.
    pub gateway: Netns,
    /// The client namespace.
    pub client: Netns,
}

impl Topology {
    /// Build the two namespaces and the link between them.
    pub fn new() -> Result<Self> {
        Self::build(false)
    }

    /// Like [`Self::new`] with IPv6 on as well: gateway 2001:db8:77::1/64, client
    /// 2001:db8:77::2/64 (no DAD delay), plus the link-local addresses, so neighbour
    /// discovery and MLD cross the meter.
    pub fn dual_stack() -> Result<Self> {
        Self::build(true)
    }

    fn build(ipv6: bool) -> Result<Self> {
        let gateway = Netns::new()?;
        let client = Netns::new()?;
        let veth = VethPair::new(&gateway, GATEWAY_MAC, &client, CLIENT_MAC)?;
        let v6 = [(&gateway, &veth.a, "2001:db8:77::1/64"), (&client, &veth.b, "2001:db8:77::2/64")];
        for (ns, dev, addr) in v6 {
            if ipv6 {
                ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"])?;
            } else {
                ns.exec("sysctl", &["-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=1")])?;
            }
        }
        for (ns, dev, addr) in [(&gateway, &veth.a, "10.77.0.1/24"), (&client, &veth.b, "10.77.0.2/24")] {
            ns.ip(&["addr", "add", addr, "dev", dev])?;
            // Let unprivileged-style ICMP sockets work for `ping` below.
            ns.exec("sysctl", &["-qw", "net.ipv4.ping_group_range=0 2147483647"])?;
        }
        Ok(Self { veth, gateway, client })
    }

    /// The gateway-side interface (where the meter attaches).
    pub fn gateway_if(&self) -> &str {
        &self.veth.a
    }
}

/// Send one ICMP echo request to `addr` from inside `ns` and wait up to `timeout`
/// for the reply (an ICMP datagram socket: no ping binary needed).
pub fn ping(ns: &Netns, addr: Ipv4Addr, timeout: std::time::Duration) -> Result<bool> {
    in_netns(ns, || {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2) call; the fd is owned by the UdpSocket below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP) };
        if fd < 0 {
            bail!("ICMP socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid socket we own; sendto/recvfrom are all we use.
        let sock = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
        sock.set_read_timeout(Some(timeout))?;
        // Echo request: type 8, code 0; the kernel fills identifier and checksum.
        sock.send_to(&[8, 0, 0, 0, 0, 0, 0, 1, b'b', b'm'], (addr, 0))?;
        let mut buf = [0u8; 64];
        Ok(matches!(sock.recv_from(&mut buf), Ok((n, _)) if n >= 8 && buf[0] == 0))
    })
}

/// [`ping`] over IPv6 (ICMPv6 echo 128 -> 129); needs neighbour discovery to work.
pub fn ping6(ns: &Netns, addr: std::net::Ipv6Addr, timeout: std::time::Duration) -> Result<bool> {
    in_netns(ns, || {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2) call; the fd is owned by the UdpSocket below.
        let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_ICMPV6) };
        if fd < 0 {
            bail!("ICMPv6 socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid socket we own; sendto/recvfrom are all we use.
        let sock = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
        sock.set_read_timeout(Some(timeout))?;
        sock.send_to(&[128, 0, 0, 0, 0, 0, 0, 1, b'b', b'm'], (addr, 0))?;
        let mut buf = [0u8; 64];
        Ok(matches!(sock.recv_from(&mut buf), Ok((n, _)) if n >= 8 && buf[0] == 129))
    })
}
