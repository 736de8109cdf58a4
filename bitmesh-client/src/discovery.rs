//! Finding the gateway, in order:
//!
//! 1. `--gateway URL` (or `$BITMESH_GATEWAY`);
//! 2. the RFC 8910 captive-portal API URI (DHCP option 114) the system learned on the
//!    interface that routes to it (a lease of another interface, or one whose URI
//!    points elsewhere, is ignored; the default route's interface first), read
//!    from the lease files of systemd-networkd (`/run/systemd/netif/leases/*`,
//!    `CAPTIVE_PORTAL=`), NetworkManager (`/run/NetworkManager/devices/*`,
//!    `option_114=`/`captive_portal=`; its dhclient leases are covered by 3.) and
//!    dhclient (`/var/lib/dhcp*/*.lease*`, `/var/lib/NetworkManager/*.lease`:
//!    `option captive-portal`, `option default-url` or `option unknown-114`, quoted
//!    or as hex bytes). The gateway's base URL is the origin of that URI: the
//!    BitMesh gateway serves its RFC 8908 API on the payment port, and an operator
//!    who hands out a captive URI on another host is not a BitMesh gateway;
//! 3. the default route's gateway from `/proc/net/route`, at port [`DEFAULT_PORT`].
//!
//! Parsing is pure and tested on sample files; only [`discover`] reads the system.

use std::net::Ipv4Addr;
use std::path::Path;

/// The payment API's standard port.
pub const DEFAULT_PORT: u16 = 3141;

/// Where the gateway URL came from (printed to the user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--gateway`.
    Flag,
    /// The captive-portal URI in a DHCP lease file.
    CaptivePortal(String),
    /// The default route.
    DefaultRoute {
        /// Interface of the route.
        iface: String,
    },
}

/// No gateway could be found.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// Nothing to go on.
    #[error("no gateway found: no captive-portal URI in the DHCP leases and no default route: join the gateway's WiFi or pass --gateway http://HOST:3141")]
    NotFound,
}

/// An IPv4 route from `/proc/net/route`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Interface name.
    pub iface: String,
    /// Destination network.
    pub destination: Ipv4Addr,
    /// Next hop (0.0.0.0 for on-link routes).
    pub gateway: Ipv4Addr,
    /// Netmask.
    pub mask: Ipv4Addr,
    /// Metric.
    pub metric: u32,
}

const RTF_UP: u32 = 0x1;

/// Parse `/proc/net/route` (addresses are host-order hex of network-order bytes).
pub fn parse_routes(text: &str) -> Vec<Route> {
    let hex_ip = |s: &str| u32::from_str_radix(s, 16).ok().map(|v| Ipv4Addr::from(v.to_le_bytes()));
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            if flags & RTF_UP == 0 {
                return None;
            }
            Some(Route {
                iface: f[0].to_owned(),
                destination: hex_ip(f[1])?,
                gateway: hex_ip(f[2])?,
                mask: hex_ip(f[7])?,
                metric: f[6].parse().ok()?,
            })
        })
        .collect()
}

/// The default route with the lowest metric that has a next hop.
pub fn default_route(routes: &[Route]) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| r.destination.is_unspecified() && r.mask.is_unspecified() && !r.gateway.is_unspecified())
        .min_by_key(|r| r.metric)
}

/// The interface traffic to `ip` leaves by (longest prefix, then lowest metric).
pub fn route_to(routes: &[Route], ip: Ipv4Addr) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| u32::from(ip) & u32::from(r.mask) == u32::from(r.destination) & u32::from(r.mask))
        .min_by_key(|r| (std::cmp::Reverse(u32::from(r.mask).count_ones()), r.metric))
}

/// The captive-portal URI in one lease file's text, whatever the format.
pub fn captive_uri_in_lease(text: &str) -> Option<String> {
    for line in text.lines().rev() {
        let line = line.trim().trim_end_matches(';');
        // systemd-networkd and NetworkManager's keyfiles: KEY=VALUE
        if let Some((k, v)) = line.split_once('=') {
            let k = k.trim().to_ascii_lowercase();
            if matches!(k.as_str(), "captive_portal" | "option_114" | "dhcp4.option_114") {
                if let Some(uri) = uri_from_value(v.trim()) {
                    return Some(uri);
                }
            }
        }
        // dhclient: option NAME VALUE
        if let Some(rest) = line.strip_prefix("option ") {
            let (name, value) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            if matches!(name, "captive-portal" | "default-url" | "unknown-114" | "unknown-160") {
                if let Some(uri) = uri_from_value(value.trim()) {
                    return Some(uri);
                }
            }
        }
    }
    None
}

/// A URI from a quoted string, a bare string, or colon-separated hex bytes.
fn uri_from_value(v: &str) -> Option<String> {
    let v = v.trim().trim_matches('"');
    let text = if v.contains(':') && v.split(':').all(|b| b.len() <= 2 && u8::from_str_radix(b, 16).is_ok()) {
        let bytes: Option<Vec<u8>> = v.split(':').map(|b| u8::from_str_radix(b, 16).ok()).collect();
        String::from_utf8(bytes?).ok()?
    } else {
        v.to_owned()
    };
    let text = text.trim_end_matches('\0').to_owned();
    // RFC 8910: "urn:ietf:params:capport:unrestricted" means "no captive portal".
    (text.starts_with("http://") || text.starts_with("https://")).then_some(text)
}

/// `scheme://authority` of a URI.
pub fn origin(uri: &str) -> Option<String> {
    let (scheme, rest) = uri.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    (!authority.is_empty()).then(|| format!("{scheme}://{authority}"))
}

/// The gateway base URL for a default route.
pub fn url_for(ip: Ipv4Addr) -> String {
    format!("http://{ip}:{DEFAULT_PORT}")
}

/// One lease file as read from disk: its file name (which often names the
/// interface or its index) and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseFile {
    /// File name (no directory).
    pub name: String,
    /// Contents.
    pub text: String,
}

/// What discovery reads from the system, so the choice itself is pure and tested.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemView {
    /// `/proc/net/route`, parsed.
    pub routes: Vec<Route>,
    /// Interface index -> name (`/sys/class/net/*/ifindex`).
    pub ifaces: Vec<(u32, String)>,
    /// Every lease file of the known lease directories.
    pub leases: Vec<LeaseFile>,
}

/// The interface a dhclient-style lease file name stands for:
/// `dhclient.wlan0.leases`, NetworkManager's `dhclient-<uuid>-wlan0.lease` and
/// `internal-<uuid>-wlan0.lease`. `None` for a file shared by every interface.
fn iface_from_lease_name(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".leases").or_else(|| name.strip_suffix(".lease"))?;
    if let Some(rest) = stem.strip_prefix("dhclient.") {
        return (!rest.is_empty()).then_some(rest);
    }
    let (_, iface) = stem.rsplit_once('-')?;
    (!iface.is_empty()).then_some(iface)
}

/// The `(interface, captive URI)` pairs one lease file states; an entry whose
/// interface cannot be told is left out (it might be any network's).
pub fn captive_uris_in_file(file: &LeaseFile, ifaces: &[(u32, String)]) -> Vec<(String, String)> {
    // systemd-networkd and NetworkManager's run-time files are named by ifindex.
    if let Ok(index) = file.name.parse::<u32>() {
        let iface = ifaces.iter().find(|(i, _)| *i == index).map(|(_, n)| n.clone());
        return match (iface, captive_uri_in_lease(&file.text)) {
            (Some(iface), Some(uri)) => vec![(iface, uri)],
            _ => Vec::new(),
        };
    }
    // dhclient: `lease { interface "wlan0"; ... }` blocks, oldest first.
    let by_name = iface_from_lease_name(&file.name);
    let mut found = Vec::new();
    for block in file.text.split("lease {").skip(1) {
        let block = block.split('}').next().unwrap_or(block);
        let named = block.lines().find_map(|l| {
            let rest = l.trim().strip_prefix("interface ")?;
            Some(rest.trim().trim_end_matches(';').trim().trim_matches('"').to_owned())
        });
        let Some(iface) = named.or_else(|| by_name.map(str::to_owned)) else { continue };
        if let Some(uri) = captive_uri_in_lease(block) {
            found.push((iface, uri));
        }
    }
    found
}

/// The captive-portal URI to use: only from a lease of an interface that routes to
/// the URI's host (a lease of another network, or a stale one, must not send the
/// agent to pay someone else), the default route's interface first, newest lease of
/// an interface last in its file.
pub fn captive_uri_for_routes(view: &SystemView) -> Option<String> {
    let default_iface = default_route(&view.routes).map(|r| r.iface.as_str());
    let mut candidates: Vec<(String, String)> = Vec::new();
    for file in &view.leases {
        for (iface, uri) in captive_uris_in_file(file, &view.ifaces) {
            // A later entry of the same interface is the newer lease.
            candidates.retain(|(i, _)| *i != iface);
            candidates.push((iface, uri));
        }
    }
    let routes_via = |iface: &str, uri: &str| -> bool {
        let Some(host) = host_of(uri) else { return false };
        match host.parse::<Ipv4Addr>() {
            Ok(ip) => route_to(&view.routes, ip).is_some_and(|r| r.iface == iface),
            // A host name cannot be placed without DNS: only on the default route.
            Err(_) => default_iface == Some(iface),
        }
    };
    let usable: Vec<&(String, String)> = candidates.iter().filter(|(i, u)| routes_via(i, u)).collect();
    usable
        .iter()
        .find(|(i, _)| Some(i.as_str()) == default_iface)
        .or_else(|| usable.first())
        .map(|(_, u)| u.clone())
}

/// The host of a URI (no port, no brackets).
fn host_of(uri: &str) -> Option<String> {
    let origin = origin(uri)?;
    let authority = origin.split_once("://")?.1;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    (!host.is_empty()).then(|| host.to_owned())
}

fn read_lease_files(dir: &Path) -> Vec<LeaseFile> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            let text = std::fs::read_to_string(p).ok()?;
            Some(LeaseFile { name, text })
        })
        .collect()
}

fn read_ifaces() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else { return Vec::new() };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let index = std::fs::read_to_string(e.path().join("ifindex")).ok()?.trim().parse().ok()?;
            Some((index, e.file_name().to_string_lossy().into_owned()))
        })
        .collect()
}

/// Read what discovery needs from the system.
pub fn system_view() -> SystemView {
    let lease_dirs = [
        "/run/systemd/netif/leases",
        "/run/NetworkManager/devices",
        "/var/lib/NetworkManager",
        "/var/lib/dhcp",
        "/var/lib/dhclient",
        "/var/lib/dhcp3",
    ];
    SystemView {
        routes: parse_routes(&std::fs::read_to_string("/proc/net/route").unwrap_or_default()),
        ifaces: read_ifaces(),
        leases: lease_dirs.iter().flat_map(|d| read_lease_files(Path::new(d))).collect(),
    }
}

/// Find the gateway (see the module docs). `flag` is `--gateway`.
pub fn discover(flag: Option<&str>) -> Result<(String, Source), DiscoveryError> {
    if let Some(url) = flag {
        return Ok((url.trim_end_matches('/').to_owned(), Source::Flag));
    }
    discover_in(&system_view())
}

/// [`discover`] without a flag, on a given view of the system.
pub fn discover_in(view: &SystemView) -> Result<(String, Source), DiscoveryError> {
    if let Some(uri) = captive_uri_for_routes(view) {
        if let Some(base) = origin(&uri) {
            return Ok((base, Source::CaptivePortal(uri)));
        }
    }
    let r = default_route(&view.routes).ok_or(DiscoveryError::NotFound)?;
    Ok((url_for(r.gateway), Source::DefaultRoute { iface: r.iface.clone() }))
}

/// The interface that carries traffic to the gateway at `base_url` (for metering),
/// from `/proc/net/route`; for a host name, the default route's interface.
pub fn iface_for(base_url: &str) -> Option<String> {
    let routes = parse_routes(&std::fs::read_to_string("/proc/net/route").ok()?);
    let host = origin(base_url)?.split_once("://")?.1.to_owned();
    let host = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h).to_owned();
    match host.parse::<Ipv4Addr>() {
        Ok(ip) => route_to(&routes, ip).map(|r| r.iface.clone()),
        Err(_) => default_route(&routes).map(|r| r.iface.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        wlan0\t00000000\t0100000A\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
        eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
        wlan0\t0000000A\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0\n\
        eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";

    #[test]
    fn default_route_with_the_lowest_metric_wins() {
        let routes = parse_routes(ROUTES);
        assert_eq!(routes.len(), 4);
        let r = default_route(&routes).unwrap();
        assert_eq!((r.iface.as_str(), r.gateway), ("eth0", Ipv4Addr::new(192, 168, 1, 1)));
        assert_eq!(url_for(r.gateway), "http://192.168.1.1:3141");
    }

    #[test]
    fn the_route_to_a_gateway_is_the_longest_prefix() {
        let routes = parse_routes(ROUTES);
        assert_eq!(route_to(&routes, Ipv4Addr::new(10, 0, 0, 1)).unwrap().iface, "wlan0");
        assert_eq!(route_to(&routes, Ipv4Addr::new(8, 8, 8, 8)).unwrap().iface, "eth0");
    }

    #[test]
    fn captive_portal_uri_is_found_in_every_lease_format() {
        let networkd = "# This is private data. Do not parse.\nADDRESS=10.0.0.23\nCAPTIVE_PORTAL=http://10.0.0.1:3141/captive-portal/api\n";
        let nm = "[dhcp4]\noption_114=http://10.0.0.1:3141/captive-portal/api\n";
        let dhclient_named = "lease {\n  interface \"wlan0\";\n  option captive-portal \"http://10.0.0.1:3141/captive-portal/api\";\n}\n";
        let hex: Vec<String> = "http://10.0.0.1:3141/captive-portal/api".bytes().map(|b| format!("{b:02x}")).collect();
        let dhclient_hex = format!("lease {{\n  option unknown-114 {};\n}}\n", hex.join(":"));
        for (name, text) in [("networkd", networkd), ("nm", nm), ("dhclient", dhclient_named), ("hex", &dhclient_hex)] {
            assert_eq!(
                captive_uri_in_lease(text).as_deref(),
                Some("http://10.0.0.1:3141/captive-portal/api"),
                "{name}"
            );
        }
    }

    #[test]
    fn unrestricted_captive_value_and_other_options_are_ignored() {
        assert_eq!(captive_uri_in_lease("CAPTIVE_PORTAL=urn:ietf:params:capport:unrestricted\n"), None);
        assert_eq!(captive_uri_in_lease("option domain-name \"http://x\";\n"), None);
    }

    #[test]
    fn base_url_is_the_origin_of_the_captive_uri() {
        assert_eq!(origin("http://10.0.0.1:3141/captive-portal/api").as_deref(), Some("http://10.0.0.1:3141"));
        assert_eq!(origin("https://gw.example/x?y").as_deref(), Some("https://gw.example"));
        assert_eq!(origin("nonsense"), None);
    }

    fn lease(name: &str, text: &str) -> LeaseFile {
        LeaseFile { name: name.to_owned(), text: text.to_owned() }
    }

    /// Default route via wlan0 (10.0.0.1); eth1 on 192.168.50.0/24 with no default.
    fn view(leases: Vec<LeaseFile>) -> SystemView {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            wlan0\t00000000\t0100000A\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            wlan0\t0000000A\t00000000\t0001\t0\t0\t600\t00FFFFFF\t0\t0\t0\n\
            eth1\t0032A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";
        SystemView { routes: parse_routes(routes), ifaces: vec![(2, "eth1".into()), (3, "wlan0".into())], leases }
    }

    #[test]
    fn only_the_lease_of_the_interface_that_routes_to_the_gateway_is_read() {
        let ours = "CAPTIVE_PORTAL=http://10.0.0.1:3141/captive-portal/api\n";
        let other = "CAPTIVE_PORTAL=http://192.168.50.1:3141/captive-portal/api\n";
        // The other interface's lease sorts first (ifindex 2): it used to win.
        let got = discover_in(&view(vec![lease("2", other), lease("3", ours)])).unwrap();
        assert_eq!(got.0, "http://10.0.0.1:3141");
        // A lease on wlan0 naming a host that is not reached through wlan0 is ignored.
        let elsewhere = "CAPTIVE_PORTAL=http://192.168.50.7:3141/captive-portal/api\n";
        let got = discover_in(&view(vec![lease("3", elsewhere)])).unwrap();
        assert_eq!(got, ("http://10.0.0.1:3141".to_owned(), Source::DefaultRoute { iface: "wlan0".into() }));
        // A lease of an interface the system does not have (stale) is ignored.
        let got = discover_in(&view(vec![lease("9", other)])).unwrap();
        assert!(matches!(got.1, Source::DefaultRoute { .. }), "{got:?}");
    }

    #[test]
    fn dhclient_leases_are_taken_per_interface_block() {
        let shared = "lease {\n  interface \"eth1\";\n  option captive-portal \"http://192.168.50.1:3141/captive-portal/api\";\n}\n\
                      lease {\n  interface \"wlan0\";\n  option captive-portal \"http://10.0.0.1:3141/captive-portal/api\";\n}\n\
                      lease {\n  interface \"eth1\";\n  option captive-portal \"http://192.168.50.2:3141/captive-portal/api\";\n}\n";
        let file = lease("dhclient.leases", shared);
        let found = captive_uris_in_file(&file, &[]);
        assert_eq!(found.len(), 3);
        assert_eq!(captive_uri_for_routes(&view(vec![file])).as_deref(), Some("http://10.0.0.1:3141/captive-portal/api"));
        // Named by the file: NetworkManager's dhclient-<uuid>-<iface>.lease.
        let nm = lease("dhclient-4f1c-aa-wlan0.lease", "lease {\n  option captive-portal \"http://10.0.0.1:3141/x\";\n}\n");
        assert_eq!(captive_uris_in_file(&nm, &[]), vec![("wlan0".to_owned(), "http://10.0.0.1:3141/x".to_owned())]);
        // A shared file without interface lines says nothing usable.
        assert!(captive_uris_in_file(&lease("dhclient.leases", "lease {\n  option captive-portal \"http://10.0.0.1:3141/x\";\n}\n"), &[]).is_empty());
    }

    #[test]
    fn a_flag_wins_over_everything() {
        let (url, src) = discover(Some("http://10.9.9.1:3141/")).unwrap();
        assert_eq!((url.as_str(), src), ("http://10.9.9.1:3141", Source::Flag));
    }
}
