//! Headless Chromium inside a client namespace, driven over WebDriver from Rust
//! (docs/design.md section 11: Debian's `chromium-headless-shell` and `chromedriver`).
//!
//! `chromedriver` runs in the client's namespace (in its own process group, so the
//! browser it starts goes with it) and listens on that namespace's loopback; the
//! WebDriver session is driven by [`fantoccini`] from a thread inside the same
//! namespace ([`Browser::session`]), so every socket, the browser's included, is the
//! client's. The viewport is a phone's (`mobileEmulation.deviceMetrics`:
//! `--window-size` is ignored under WebDriver). The browser resolves only the names
//! the test maps (`--host-resolver-rules`): everything else is NOTFOUND, so nothing
//! leaves for the real internet and Chromium's own background lookups go nowhere.

// Test harness: a failure here must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::env;
use crate::network::{in_netns, Netns};

/// The browser binary (Debian `chromium-headless-shell`).
pub const CHROMIUM: &str = "/usr/lib/chromium/chromium-headless-shell";
/// The WebDriver server (Debian `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The phone the browser emulates: CSS pixels and device pixel ratio.
pub const PHONE: (u32, u32, f64) = (360, 740, 2.0);
/// Port chromedriver listens on, in the client namespace's loopback.
const DRIVER_PORT: u16 = 9515;

/// Whether the browser is installed; [`env::skip`] (a failure under CI) if not.
pub fn available() -> bool {
    for (path, package) in [(CHROMIUM, "chromium-headless-shell"), (CHROMEDRIVER, "chromium-driver")] {
        if !Path::new(path).exists() {
            env::skip(&format!("{path} missing: install Debian's {package} (cargo xtask test installs it)"));
            return false;
        }
    }
    true
}

/// chromedriver (and the browser under it) in one client namespace; killed on drop.
pub struct Browser {
    ns: String,
    driver: Option<Child>,
    /// Host name -> address the browser may resolve.
    hosts: Vec<(String, Ipv4Addr)>,
    /// Hosts (IP literals included) left to the normal resolver: the gateway.
    exclude: Vec<String>,
    log: PathBuf,
}

impl Browser {
    /// Start chromedriver in `ns`; the browser will resolve exactly `hosts`, and reach
    /// `exclude` (the gateway's address: the rules apply to IP literals too) as is.
    pub fn start(ns: &Netns, hosts: &[(&str, Ipv4Addr)], exclude: &[&str], log: &Path) -> Result<Browser> {
        let out = std::fs::File::options().create(true).append(true).open(log)?;
        let mut cmd = ns.command(CHROMEDRIVER);
        cmd.arg(format!("--port={DRIVER_PORT}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let driver = cmd.spawn().context("starting chromedriver")?;
        let b = Browser {
            ns: ns.name().to_string(),
            driver: Some(driver),
            hosts: hosts.iter().map(|(h, a)| (h.to_string(), *a)).collect(),
            exclude: exclude.iter().map(|h| h.to_string()).collect(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = in_netns(ns, || {
                Ok(TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], DRIVER_PORT)), Duration::from_millis(200)).is_ok())
            })?;
            if up {
                return Ok(b);
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not listen within 20 s; log:\n{}", crate::process::log_tail(log, 20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The WebDriver capabilities: headless shell, phone viewport, resolver rules.
    fn capabilities(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut rules: Vec<String> = self.hosts.iter().map(|(h, a)| format!("MAP {h} {a}")).collect();
        rules.push("MAP * ~NOTFOUND".into());
        rules.extend(self.exclude.iter().map(|h| format!("EXCLUDE {h}")));
        let (w, h, ratio) = PHONE;
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable",
                    format!("--host-resolver-rules={}", rules.join(", ")),
                ],
                "mobileEmulation": {
                    "deviceMetrics": { "width": w, "height": h, "pixelRatio": ratio, "touch": true },
                    "userAgent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Mobile Safari/537.36"
                }
            }
        });
        match caps {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    /// Open a WebDriver session and run `scenario` with it on a thread inside the
    /// client namespace (a current-thread runtime: the scenario may block, e.g. to
    /// mine a block). The session is closed afterwards, also when `scenario` fails.
    pub fn session<T, F, Fut>(&self, scenario: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(fantoccini::Client) -> Fut + Send,
        Fut: Future<Output = Result<T>>,
    {
        let caps = self.capabilities();
        let name = self.ns.clone();
        crate::network::in_netns_named(&name, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let client = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{DRIVER_PORT}"))
                    .await
                    .with_context(|| format!("WebDriver session; chromedriver log:\n{}", crate::process::log_tail(&self.log, 20)))?;
                let outcome = scenario(client.clone()).await;
                let _ = client.close().await;
                outcome
            })
        })
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(mut c) = self.driver.take() {
            // The process group we created: chromedriver and the browsers it started.
            // SAFETY: kill(2) on our own child's process group; no memory involved.
            unsafe { libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

/// Where screenshots go: `<target>/portal-screenshots/` (the latest are copied into
/// `docs/img/` by hand for the README).
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("portal-screenshots");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Save a screenshot of the current page as `<name>.png`.
pub async fn screenshot(client: &fantoccini::Client, name: &str) -> Result<PathBuf> {
    let png = client.screenshot().await?;
    let path = screenshot_dir().join(format!("{name}.png"));
    std::fs::write(&path, png)?;
    Ok(path)
}

/// Poll `f` until it returns `Some`, every 100 ms, failing after `timeout`.
pub async fn eventually<T, Fut: Future<Output = Option<T>>>(what: &str, timeout: Duration, mut f: impl FnMut() -> Fut) -> Result<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the element with id `id` ("" if absent).
pub async fn text_of(client: &fantoccini::Client, id: &str) -> String {
    match client.find(fantoccini::Locator::Id(id)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Run `f` on a thread in the process's own network namespace (the main thread's),
/// from inside a [`Browser::session`] scenario (which runs in the client's): for calls
/// that reach the test's own services, such as the regtest node's RPC.
pub fn outside<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open("/proc/self/ns/net").context("opening /proc/self/ns/net")?;
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns into the test's own namespace: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in the test's namespace panicked"))?
    })
}
