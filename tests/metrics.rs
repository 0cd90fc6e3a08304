//! The Prometheus endpoint (`--metrics-listen`): scraped under load from a
//! single node and from a 3-node cluster, checked by `promtool check
//! metrics`, against memcached_exporter's names, and against `stats` taken
//! around the same moment. And its port held to its bounds.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Layout};
use common::hostile::{stats, wait_for};
use common::{Server, stat_value};

/// The names memcached_exporter exports that webvac must keep.
const EXPORTER_NAMES: [&str; 13] = [
    "memcached_up",
    "memcached_commands_total",
    "memcached_current_bytes",
    "memcached_limit_bytes",
    "memcached_current_items",
    "memcached_items_total",
    "memcached_items_evicted_total",
    "memcached_items_reclaimed_total",
    "memcached_current_connections",
    "memcached_connections_total",
    "memcached_connections_rejected_total",
    "memcached_read_bytes_total",
    "memcached_written_bytes_total",
];

/// The `metrics_addr=` a node logged.
fn metrics_addr(stderr: &str) -> SocketAddr {
    stderr
        .lines()
        .filter(|l| l.contains("serving metrics"))
        .find_map(|l| {
            let at = l.find("metrics_addr=")? + "metrics_addr=".len();
            l[at..]
                .split_whitespace()
                .next()?
                .trim_matches('"')
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no `serving metrics metrics_addr=` line in:\n{stderr}"))
}

/// A reply: status code, headers, body.
struct Http {
    status: u16,
    headers: String,
    body: String,
}

/// One HTTP/1.1 request on a fresh connection, read to its close.
fn http(addr: SocketAddr, request: &str) -> Http {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the reply");
    let text = String::from_utf8(raw).expect("utf-8 reply");
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    Http {
        status,
        headers: head.to_string(),
        body: body.to_string(),
    }
}

fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Http {
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n"),
    )
}

/// A scrape; one refused for the scrape rate (429) is retried, a bounded
/// number of times.
fn scrape(addr: SocketAddr) -> String {
    let mut r = get(addr, "/metrics", None);
    for _ in 0..100 {
        if r.status != 429 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        r = get(addr, "/metrics", None);
    }
    assert_eq!(r.status, 200, "{}", r.headers);
    assert!(
        r.headers
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        r.headers
    );
    r.body
}

/// `promtool check metrics` accepts the exposition (lint included).
fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/install-deps installs Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `series` (name and labels exactly as printed).
fn sample(text: &str, series: &str) -> f64 {
    try_sample(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

fn try_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Every name a dashboard built on memcached_exporter reads is there.
fn exporter_names_present(text: &str) {
    for name in EXPORTER_NAMES {
        assert!(
            text.lines()
                .any(|l| !l.starts_with('#') && l.starts_with(name)),
            "no {name} in:\n{text}"
        );
    }
}

/// Counters compared with `stats`: (stats field, metric series).
const COUNTERS: [(&str, &str); 8] = [
    (
        "get_hits",
        "memcached_commands_total{command=\"get\",status=\"hit\"}",
    ),
    (
        "get_misses",
        "memcached_commands_total{command=\"get\",status=\"miss\"}",
    ),
    (
        "cmd_set",
        "memcached_commands_total{command=\"set\",status=\"hit\"}",
    ),
    (
        "incr_hits",
        "memcached_commands_total{command=\"incr\",status=\"hit\"}",
    ),
    (
        "delete_hits",
        "memcached_commands_total{command=\"delete\",status=\"hit\"}",
    ),
    ("total_items", "memcached_items_total"),
    ("total_connections", "memcached_connections_total"),
    ("bytes_read", "memcached_read_bytes_total"),
];

/// Sets, gets (hits and misses), incrs and deletes on `conns` connections
/// until `stop`; counts the gets it sends.
fn load(
    server: &Server,
    conns: usize,
    stop: &Arc<AtomicBool>,
    gets: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..conns)
        .map(|c| {
            let mut client = server.connect();
            let (stop, gets) = (stop.clone(), gets.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut i = 0u64;
                while !stop.load(Relaxed) && Instant::now() < deadline {
                    let key = format!("k{c}-{}", i % 50);
                    client.ask(format!("set {key} 0 0 5\r\nhello\r\n").as_bytes());
                    client.ask(format!("get {key}\r\n").as_bytes());
                    client.ask(format!("get nothing-{c}-{i}\r\n").as_bytes());
                    gets.fetch_add(2, Relaxed);
                    client.ask(format!("set n{c} 0 0 1\r\n1\r\n").as_bytes());
                    client.ask(format!("incr n{c} 2\r\n").as_bytes());
                    client.ask(format!("delete {key}\r\n").as_bytes());
                    i += 1;
                }
            })
        })
        .collect()
}

#[test]
fn a_node_under_load_reports_what_stats_reports_in_memcached_exporter_names() {
    let server = Server::start(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = metrics_addr(&server.stderr_text());
    let mut probe = server.connect();
    let stop = Arc::new(AtomicBool::new(false));
    let gets = Arc::new(AtomicU64::new(0));
    let workers = load(&server, 4, &stop, &gets);
    wait_for("load under way", || {
        stat_value(&stats(&mut probe, ""), "cmd_set") > 200
    });
    // Under load: each counter lies between `stats` just before and just
    // after the scrape.
    for _ in 0..5 {
        let before = stats(&mut probe, "");
        let text = scrape(addr);
        let after = stats(&mut probe, "");
        for (field, series) in COUNTERS {
            let (lo, hi) = (stat_value(&before, field), stat_value(&after, field));
            let v = sample(&text, series) as u64;
            assert!(
                lo <= v && v <= hi,
                "{series} = {v}, stats {field} {lo}..{hi}"
            );
        }
        promtool_accepts(&text);
        exporter_names_present(&text);
    }
    stop.store(true, Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    // At rest: equal, and the histograms counted every get.
    let before = stats(&mut probe, "");
    let text = scrape(addr);
    for (field, series) in COUNTERS {
        if field == "bytes_read" || field == "total_connections" {
            continue; // the probe's own `stats` moves these
        }
        assert_eq!(
            sample(&text, series) as u64,
            stat_value(&before, field),
            "{series}"
        );
    }
    assert_eq!(
        sample(&text, "memcached_limit_bytes"),
        stat_value(&before, "limit_maxbytes") as f64
    );
    assert_eq!(
        sample(&text, "memcached_current_items"),
        stat_value(&before, "curr_items") as f64
    );
    assert_eq!(sample(&text, "memcached_max_connections"), 1024.0);
    assert_eq!(sample(&text, "memcached_up"), 1.0);
    assert_eq!(
        sample(
            &text,
            "webvac_command_duration_seconds_count{command=\"get\"}"
        ) as u64,
        gets.load(Relaxed)
    );
    let inf = sample(
        &text,
        "webvac_command_duration_seconds_bucket{command=\"get\",le=\"+Inf\"}",
    );
    assert_eq!(inf as u64, gets.load(Relaxed));
    promtool_accepts(&text);

    // OpenMetrics when asked for, the classic format otherwise.
    let om = get(
        addr,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert_eq!(om.status, 200);
    assert!(
        om.headers
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{}",
        om.headers
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert!(om.body.contains("# TYPE memcached_commands counter"));
    assert!(!scrape(addr).contains("# EOF"));
    // Anything else is refused plainly.
    assert_eq!(get(addr, "/nope", None).status, 404);
    let post = http(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(post.status, 405);
}

#[test]
fn the_metrics_port_is_bounded_and_never_holds_up_clients() {
    let server = Server::start(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = metrics_addr(&server.stderr_text());
    // A header that never ends is cut off after the header timeout (5 s).
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let n = slow.read(&mut buf).unwrap_or(0);
    let reply = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        n == 0 || reply.starts_with("HTTP/1.1 408"),
        "a stalled header: {reply}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));

    // A header past the read buffer is refused, not buffered.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(256 * 1024)
    );
    let mut big = TcpStream::connect(addr).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = big.write_all(huge.as_bytes()); // may fail once it closes
    let mut raw = Vec::new();
    let _ = big.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(
        raw.is_empty() || text.starts_with("HTTP/1.1 431"),
        "an oversized header: {text}"
    );

    // Scrapes pipelined on one connection: past the burst, `429`s.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let one = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let last = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    s.write_all(format!("{}{last}", one.repeat(59)).as_bytes())
        .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let ok = text.matches("HTTP/1.1 200").count();
    let refused = text.matches("HTTP/1.1 429").count();
    assert_eq!(ok + refused, 60, "{text}");
    assert!(
        (20..=30).contains(&ok),
        "{ok} scrapes rendered of 60 at once"
    );
    assert!(text.contains("retry-after: 1"), "{text}");
    wait_for("scrapes served again", || {
        get(addr, "/metrics", None).status == 200
    });

    // Past 16 connections at once, more are closed at once; memcached
    // clients are served all along.
    let held: Vec<TcpStream> = (0..16).map(|_| TcpStream::connect(addr).unwrap()).collect();
    wait_for("the 17th metrics connection closed at once", || {
        let mut extra = TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let _ = extra.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut b = [0u8; 16];
        matches!(extra.read(&mut b), Ok(0) | Err(_))
    });
    let mut client = server.connect();
    assert_eq!(
        client.ask(b"version\r\n").split_whitespace().next(),
        Some("VERSION")
    );
    drop(held);
    wait_for("scrapes served again once the slots are free", || {
        std::panic::catch_unwind(|| scrape(addr)).is_ok()
    });
}

#[test]
fn a_cluster_reports_members_peers_and_replication() {
    let _serial = common::cluster::exclusive();
    let mut cluster = Cluster::start(
        Layout::new(3)
            .quorums(1, 2)
            .arg("--metrics-listen")
            .arg("127.0.0.1:0"),
    );
    let ids = cluster.ids();
    let addrs: Vec<SocketAddr> = ids
        .iter()
        .map(|&id| metrics_addr(&cluster.stderr_text(id)))
        .collect();
    let mut c = cluster.connect(ids[0]);
    for i in 0..100 {
        assert_eq!(
            c.ask(format!("set key{i} 0 0 1\r\nv\r\n").as_bytes()),
            "STORED\r\n"
        );
    }
    wait_for("every node sees both peers' round trips", || {
        addrs.iter().all(|&a| {
            let text = scrape(a);
            text.lines()
                .filter(|l| l.starts_with("webvac_peer_rtt_seconds{"))
                .count()
                == 2
        })
    });
    let (mut primary, mut applied) = (0.0, 0.0);
    for (&id, &addr) in ids.iter().zip(&addrs) {
        let text = scrape(addr);
        promtool_accepts(&text);
        exporter_names_present(&text);
        for &m in &ids {
            assert_eq!(
                sample(
                    &text,
                    &format!("webvac_cluster_member_up{{member=\"{m}\"}}")
                ),
                1.0,
                "node {id}"
            );
        }
        assert_eq!(sample(&text, "webvac_cluster_replicas"), 3.0);
        primary += sample(&text, "webvac_primary_writes_total");
        applied += sample(&text, "webvac_replica_writes_applied_total");
    }
    // Every metric the Grafana dashboard (deploy/grafana/webvac.json) plots
    // is one a member exports.
    let text = scrape(addrs[0]);
    for name in dashboard_metrics() {
        assert!(
            text.lines().any(|l| !l.starts_with('#')
                && l.starts_with(&name)
                && l[name.len()..].starts_with(['{', ' '])),
            "the dashboard plots {name}, which no member exports:\n{text}"
        );
    }
    assert_eq!(primary, 100.0, "each set executed once, by its primary");
    assert!(applied >= 100.0, "at least W-1 acks per set: {applied}");
    wait_for("all N-1 replica writes applied", || {
        let applied: f64 = addrs
            .iter()
            .map(|&a| sample(&scrape(a), "webvac_replica_writes_applied_total"))
            .sum();
        applied == 200.0
    });
    // At rest, each member's cluster counters are its `stats cluster`.
    for (&id, &addr) in ids.iter().zip(&addrs) {
        let mut c = cluster.connect(id);
        let before = stats(&mut c, "cluster");
        let text = scrape(addr);
        for (field, series) in [
            ("primary_writes", "webvac_primary_writes_total"),
            ("replica_writes_sent", "webvac_replica_writes_sent_total"),
            (
                "replica_writes_applied",
                "webvac_replica_writes_applied_total",
            ),
            ("forwarded", "webvac_requests_forwarded_total"),
            (
                "write_quorum_failures",
                "webvac_write_quorum_failures_total",
            ),
            ("hints_pending", "webvac_hints_pending"),
        ] {
            assert_eq!(
                sample(&text, series) as u64,
                stat_value(&before, field),
                "node {id}: {series}"
            );
        }
    }
    cluster.kill(ids[2]);
    wait_for("node 1 reports node 3 down", || {
        sample(
            &scrape(addrs[0]),
            &format!("webvac_cluster_member_up{{member=\"{}\"}}", ids[2]),
        ) == 0.0
    });
    // A down peer has no round trip: the last one says nothing of it.
    let text = scrape(addrs[0]);
    let rtt = format!("webvac_peer_rtt_seconds{{peer=\"{}\"}}", ids[2]);
    assert_eq!(try_sample(&text, &rtt), None, "{text}");
}

/// The metric names in the Grafana dashboard's queries.
fn dashboard_metrics() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/webvac.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard")).expect("JSON");
    let mut names = Vec::new();
    for panel in doc["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find(|c: char| c.is_ascii_lowercase()) {
                rest = &rest[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let word = &rest[..end];
                if word.starts_with("memcached_") || word.starts_with("webvac_") {
                    names.push(word.to_string());
                }
                rest = &rest[end..];
            }
        }
    }
    names.sort();
    names.dedup();
    assert!(names.len() > 20, "{names:?}");
    names
}
