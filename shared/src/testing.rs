//! Helpers for tests (feature `test-support`).

use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

/// A loopback port free for TCP and UDP (CA uses both), picked below the kernel's
/// ephemeral range: port 0 hands out ports from that range, where the source ports of
/// outgoing connections also come from, so a port picked, released and bound again a
/// moment later can be taken meanwhile (the flake this avoids). Processes start at
/// different places (by pid) and each walks the range. `tests/interop/conftest.py`
/// `free_port` does the same for the Python tests.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768)
        .clamp(16384, 65535);
    let (low, span) = (10000u32, ephemeral_low - 10000);
    let start = std::process::id() % span;
    for _ in 0..span {
        let port = (low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}
