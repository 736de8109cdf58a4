//! `bitmesh run` as the packaged systemd unit runs it (dist/bitmesh.service): bounded
//! to the unit's capabilities, and `Type=notify`. systemd itself does not run on the
//! test machine, so the test plays its part: it bounds the process with `setpriv`
//! (root's uid, as `User=root` with `CapabilityBoundingSet=`) and listens on the
//! `$NOTIFY_SOCKET` datagram socket a service manager would.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use bitmesh_tests::chain::{Bitcoind, LoopbackRelay};
use bitmesh_tests::env::{is_root, skip};
use bitmesh_tests::http;
use bitmesh_tests::network::{in_netns_named, PinDir, Topology};
use bitmesh_tests::process::{bitmesh_bin_or_skip, spawn_logged};

/// The capabilities the unit grants (CapabilityBoundingSet= and AmbientCapabilities=).
const UNIT_CAPS: &[&str] = &["bpf", "net_admin", "perfmon"];

/// What a systemd-started controller has around it.
struct Service {
    node: Bitcoind,
    relay: LoopbackRelay,
    topo: Topology,
    pins: PinDir,
    dir: tempfile::TempDir,
    notify: UnixDatagram,
    bin: PathBuf,
}

impl Service {
    fn new() -> Option<Service> {
        if !is_root() {
            skip("the systemd unit test needs root (namespaces, BPF)");
            return None;
        }
        if Command::new("setpriv").arg("--version").output().is_err() {
            skip("setpriv (util-linux) is missing");
            return None;
        }
        let bin = bitmesh_bin_or_skip()?;
        let node = Bitcoind::start()?;
        let topo = Topology::new().unwrap();
        let relay = LoopbackRelay::start(&topo.gateway, 0, ([127, 0, 0, 1], node.rpc_port).into()).unwrap();
        let dir = tempfile::Builder::new().prefix("bitmesh-unit-").tempdir().unwrap();
        let notify = UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();
        notify.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Some(Service { node, relay, topo, pins: PinDir::new(), dir, notify, bin })
    }

    fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("controller.log")
    }

    /// Start the controller in the gateway namespace bounded to `caps`, with
    /// `$NOTIFY_SOCKET` pointing at our socket.
    fn start(&self, caps: &[&str]) -> Child {
        self.start_with(caps, |_| {})
    }

    fn start_with(&self, caps: &[&str], adjust: impl FnOnce(&mut Command)) -> Child {
        let bounding = std::iter::once("-all".to_string()).chain(caps.iter().map(|c| format!("+{c}"))).collect::<Vec<_>>().join(",");
        let mut cmd = Command::new("setpriv");
        cmd.args(["--bounding-set", &bounding, "--inh-caps", "-all", "--"]).arg(&self.bin).arg("run");
        cmd.args(["--iface", self.topo.gateway_if(), "--network", "regtest", "--hook", "tc"])
            .arg("--pin-dir")
            .arg(self.pins.path())
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--admin-socket")
            .arg(self.admin_socket())
            .args(["--rpc-url", &self.relay.url(), "--chain-poll-secs", "1", "--metrics-addr", "off"])
            .arg("--rpc-cookie")
            .arg(self.node.cookie_path())
            .env("NOTIFY_SOCKET", self.dir.path().join("notify.sock"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        adjust(&mut cmd);
        in_netns_named(self.topo.gateway.name(), || spawn_logged(&mut cmd, &self.log())).unwrap()
    }

    /// The next notification, or `None` after the read timeout.
    fn next_state(&self) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = self.notify.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

fn pinned(pins: &Path, name: &str) -> bool {
    pins.join(name).exists()
}

#[test]
fn with_only_the_units_capabilities_it_is_ready_once_enforcing_and_listening_and_stops_with_maps_pinned() {
    let Some(svc) = Service::new() else { return };
    let mut child = svc.start(UNIT_CAPS);
    let ready = svc.next_state().unwrap_or_else(|| panic!("no READY=1 within 60 s; log:\n{}", svc.log_text()));
    // Everything READY=1 promises holds at the moment it arrives.
    let iface = svc.topo.gateway_if();
    let (pins, admin) = (svc.pins.path(), svc.admin_socket());
    let attached = [format!("link_{iface}_upload_tc"), format!("link_{iface}_download_tc")].map(|l| pinned(pins, &l));
    let api = in_netns_named(svc.topo.gateway.name(), || http::get(([127, 0, 0, 1], 3141).into(), "/v1/terms", &[])).map(|r| r.status);
    let admin_answers = admin.exists();
    assert!(ready.lines().any(|l| l == "READY=1"), "first notification is READY=1: {ready:?}");
    assert!(ready.contains(&format!("STATUS=metering {iface}")), "{ready:?}");
    assert!(pinned(pins, "CREDIT"), "maps pinned at READY; log:\n{}", svc.log_text());
    assert_eq!(attached, [true, true], "upload and download attached (tcx links pinned) at READY");
    assert_eq!(api.ok(), Some(200), "the client API answers at READY");
    assert!(admin_answers, "the admin socket exists at READY");
    let clients = Command::new(&svc.bin).args(["clients", "--json", "--admin-socket"]).arg(&admin).output().unwrap();
    assert!(clients.status.success(), "admin socket answers: {}", String::from_utf8_lossy(&clients.stderr));

    // systemctl stop: SIGTERM; the controller says STOPPING=1 and exits cleanly,
    // leaving programs and maps pinned (the kernel keeps enforcing).
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let stopping = svc.next_state().unwrap_or_else(|| panic!("no STOPPING=1 after SIGTERM; log:\n{}", svc.log_text()));
    assert_eq!(stopping, "STOPPING=1");
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}; log:\n{}", svc.log_text());
    assert!(pinned(pins, "CREDIT"), "maps stay pinned after a stop");
    assert!(pinned(pins, &format!("link_{iface}_download_tc")), "the meter stays attached after a stop");
}

#[test]
fn without_any_one_of_the_units_capabilities_it_refuses_to_start_and_names_it() {
    let Some(svc) = Service::new() else { return };
    // Each start exits before it could be ready: a short wait shows nothing came.
    svc.notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    for missing in UNIT_CAPS {
        let caps: Vec<&str> = UNIT_CAPS.iter().copied().filter(|c| c != missing).collect();
        let before = svc.log_text().len();
        let status = svc.start(&caps).wait().unwrap();
        let log = svc.log_text()[before..].to_string();
        assert_eq!(status.code(), Some(1), "without {missing}: exit 1; log:\n{log}");
        let name = format!("CAP_{}", missing.to_uppercase());
        assert!(log.lines().any(|l| l.starts_with("error: bitmesh run needs") && l.contains(&name)), "one line naming {name}:\n{log}");
        assert!(!pinned(svc.pins.path(), "CREDIT"), "nothing touched in the kernel without {missing}");
        assert!(svc.next_state().is_none_or(|s| !s.contains("READY=1")), "never ready without {missing}");
    }
}

/// journald's native socket: the path is fixed in systemd and in tracing-journald.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// One record of journald's native protocol: `KEY=value` lines, or `KEY`, a
/// little-endian u64 length and the raw value for values with a line break.
fn journal_fields(mut d: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while !d.is_empty() {
        let line_end = d.iter().position(|&b| b == b'\n').unwrap_or(d.len());
        let line = &d[..line_end];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.push((String::from_utf8_lossy(&line[..eq]).into_owned(), String::from_utf8_lossy(&line[eq + 1..]).into_owned()));
            d = &d[(line_end + 1).min(d.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &d[line_end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            fields.push((key, String::from_utf8_lossy(&rest[8..8 + len]).into_owned()));
            d = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    fields
}

#[test]
fn under_systemd_log_records_reach_journald_with_their_fields_as_journal_fields() {
    let Some(svc) = Service::new() else { return };
    if Path::new(JOURNAL_SOCKET).exists() {
        // A real journald runs here: the test must not stand in for it.
        skip("journald runs on this machine; this test plays journald and needs its socket free");
        return;
    }
    let made_dir = !Path::new("/run/systemd/journal").exists();
    std::fs::create_dir_all("/run/systemd/journal").unwrap();
    let journal = UnixDatagram::bind(JOURNAL_SOCKET).unwrap();
    /// Removes the socket, and its directory if this test made it.
    struct RemoveOnDrop(bool);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(JOURNAL_SOCKET);
            if self.0 {
                let _ = std::fs::remove_dir("/run/systemd/journal");
            }
        }
    }
    let _cleanup = RemoveOnDrop(made_dir);
    journal.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // systemd names the journal stream it connected to stderr: <device>:<inode>.
    std::fs::File::create(svc.log()).unwrap();
    let meta = std::fs::metadata(svc.log()).unwrap();
    let stream = { use std::os::unix::fs::MetadataExt; format!("{}:{}", meta.dev(), meta.ino()) };
    let mut child = svc.start_with(UNIT_CAPS, |cmd| {
        cmd.env("JOURNAL_STREAM", &stream);
    });
    let ready = svc.next_state();
    let mut records = Vec::new();
    journal.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(n) = journal.recv(&mut buf) {
        records.push(journal_fields(&buf[..n]));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready.is_some_and(|r| r.contains("READY=1")), "ready; log:\n{}", svc.log_text());
    let field = |r: &[(String, String)], k: &str| r.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    // The record with `message` that has the field `key`.
    let find = |message: &str, key: &str| {
        records.iter().find(|r| field(r, "MESSAGE").is_some_and(|m| m.contains(message)) && field(r, key).is_some()).cloned()
    };
    let attached = find("meter attached", "IFACE").unwrap_or_else(|| panic!("no \"meter attached\" record with IFACE among {records:?}"));
    assert_eq!(field(&attached, "IFACE").as_deref(), Some(svc.topo.gateway_if()), "{attached:?}");
    assert_eq!(field(&attached, "HOOK").as_deref(), Some("tc"), "{attached:?}");
    assert_eq!(field(&attached, "PRIORITY").as_deref(), Some("5"), "INFO is journald's notice: {attached:?}");
    assert_eq!(field(&attached, "SYSLOG_IDENTIFIER").as_deref(), Some("bitmesh"));
    let payout = find("gateway payout address", "PAYOUT").unwrap_or_else(|| panic!("no payout record among {records:?}"));
    assert!(field(&payout, "PAYOUT").is_some_and(|a| a.starts_with("bcrt1")), "{payout:?}");
    // Nothing went to stderr as text: the journal has it all once.
    assert!(!svc.log_text().contains("meter attached"), "records are not duplicated on stderr:\n{}", svc.log_text());
}
