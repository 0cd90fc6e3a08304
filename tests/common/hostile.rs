//! What the hostile-load tests (`tests/hostile.rs`, `tests/hostile_peer.rs`)
//! share: the documented memory bound, bounded waits, `stats` and latency
//! percentiles.

use std::time::{Duration, Instant};

use super::Client;

pub const MIB: u64 = 1024 * 1024;

/// The longest any wait in a hostile test may take before the test fails.
pub const WAIT_MAX: Duration = Duration::from_secs(20);

/// The documented bound on a node's resident memory (README, Limits):
/// 1.25 × `-m` + 16 KiB per connection + 32 MiB.
pub fn bound(memory_limit_mb: u64, connections: usize) -> u64 {
    memory_limit_mb * MIB * 5 / 4 + connections as u64 * 16 * 1024 + 32 * MIB
}

/// `stats` (or `stats <group>`) through `c`, up to and including `END`.
pub fn stats(c: &mut Client, group: &str) -> String {
    let request = if group.is_empty() {
        "stats\r\n".to_string()
    } else {
        format!("stats {group}\r\n")
    };
    String::from_utf8(c.request(request.as_bytes(), &[b"END\r\n"])).expect("utf-8 stats")
}

/// Waits (bounded by [`WAIT_MAX`]) until `f` holds; panics with `what` if
/// it never does.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The 99th percentile of `latencies` (sorted in place).
pub fn p99(latencies: &mut [Duration]) -> Duration {
    assert!(!latencies.is_empty(), "no latency measured");
    latencies.sort();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

/// The node's pid and in-flight budget (`inflight_limit`), from `stats`
/// through `c`.
pub fn pid_and_budget(c: &mut Client) -> (u64, u64) {
    let general = stats(c, "");
    (
        super::stat_value(&general, "pid"),
        super::stat_value(&general, "inflight_limit"),
    )
}

/// Stores `value` under `key` through `c`: the line and the value sent
/// apart, as a client streaming a large value does.
pub fn set_value(c: &mut Client, key: &str, value: &[u8]) {
    c.send(format!("set {key} 0 0 {}\r\n", value.len()).as_bytes())
        .expect("send");
    c.send(value).expect("send");
    assert_eq!(c.request(b"\r\n", &[b"\r\n"]), b"STORED\r\n", "set {key}");
}

/// Reads until the server closes the connection (bounded by the socket's
/// read timeout); returns what it sent before closing, or `None` if it
/// kept the connection open.
pub fn read_to_close(mut s: &std::net::TcpStream) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(_) => return None,
        }
    }
}
