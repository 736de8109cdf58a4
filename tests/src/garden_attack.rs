//! The DNS-tunnel attack on the walled garden, shared by the kernel-level
//! (`netns_metering`) and controller-level (`controller_garden_attacks`) tests: a
//! "resolver" on the gateway's port 53 that answers anything (it echoes), and clients
//! that push data through it over UDP and TCP.

// Test harness: a failure here must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::network::{in_netns, Netns, ServerThread};

/// What the attacker tries to push through port 53.
pub const ATTACK_BYTES: u64 = 10 << 20;
/// The default walled-garden budget for DNS and ping, per MAC (`bitmesh::meter`).
pub const GARDEN_BURST: u64 = bitmesh::meter::GARDEN_SERVICES_BURST;
pub const GARDEN_RATE: u64 = bitmesh::meter::GARDEN_SERVICES_RATE;

/// The most a MAC can move through its garden budget in `elapsed`: the burst, the
/// refill, and one full frame per CPU that may race the bucket (docs/kernel-abi.md).
pub fn garden_bound(elapsed: Duration) -> u64 {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    GARDEN_BURST + GARDEN_RATE * (elapsed.as_secs() + 1) + 2 * cpus * 1514
}

/// A "resolver" on the gateway's port 53 that answers anything: it echoes every UDP
/// datagram and every TCP byte back, counting what it received.
pub struct TunnelResolver {
    received: Arc<AtomicU64>,
    _udp: ServerThread,
    _tcp: ServerThread,
}

impl TunnelResolver {
    /// Listen on `addr` port 53 (UDP and TCP) inside `ns`.
    pub fn start(ns: &Netns, addr: Ipv4Addr) -> TunnelResolver {
        let received = Arc::new(AtomicU64::new(0));
        let udp = in_netns(ns, || Ok(UdpSocket::bind((addr, 53))?)).expect("udp 53");
        udp.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let count = received.clone();
        let udp = ServerThread::spawn(move |stop| {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        });
        let tcp = in_netns(ns, || Ok(TcpListener::bind((addr, 53))?)).expect("tcp 53");
        tcp.set_nonblocking(true).unwrap();
        let count = received.clone();
        let tcp = ServerThread::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = tcp.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                s.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            count.fetch_add(n as u64, Ordering::Relaxed);
                            let _ = s.write_all(&buf[..n]);
                        }
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                        Err(_) => break,
                    }
                }
            }
        });
        TunnelResolver { received, _udp: udp, _tcp: tcp }
    }

    /// Bytes received since the last call.
    pub fn take(&self) -> u64 {
        self.received.swap(0, Ordering::Relaxed)
    }
}

/// Blast `ATTACK_BYTES` in 1,000-byte datagrams at the gateway's port 53 from `sock`
/// (for at most 5 s) and count the answers' bytes.
pub fn udp_tunnel(sock: &UdpSocket) -> u64 {
    sock.set_nonblocking(true).unwrap();
    let payload = vec![0x7au8; 1000];
    let mut buf = vec![0u8; 2048];
    let mut back = 0u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut sent = 0u64;
    while sent < ATTACK_BYTES && Instant::now() < deadline {
        if sock.send(&payload).is_ok() {
            sent += payload.len() as u64;
        }
        while let Ok(n) = sock.recv(&mut buf) {
            back += n as u64;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    while let Ok(n) = sock.recv(&mut buf) {
        back += n as u64;
    }
    back
}

/// Push `ATTACK_BYTES` through a TCP connection to port 53 of the gateway (for at
/// most 5 s), reading the echo; returns the echoed bytes.
pub fn tcp_tunnel(mut s: std::net::TcpStream) -> u64 {
    s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let chunk = vec![0x7bu8; 64 * 1024];
    let mut buf = vec![0u8; 64 * 1024];
    let (mut sent, mut back) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sent < ATTACK_BYTES && Instant::now() < deadline {
        if let Ok(n) = s.write(&chunk) {
            sent += n as u64;
        }
        if let Ok(n) = s.read(&mut buf) {
            back += n as u64;
        }
    }
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        back += n as u64;
    }
    back
}

