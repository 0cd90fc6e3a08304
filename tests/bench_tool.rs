//! `webvac-bench` against real servers: it drives the reference memcached and
//! webvac alike, in both protocols, and its compare mode reports both sides.
//! These runs are bounded by an operation count, not a duration, and assert
//! what was counted, never how fast it went: speed is measured by
//! `scripts/bench-table`, not by tests.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Memcached, Server, run_bounded};
use serde_json::Value;

const BENCH_BIN: &str = env!("CARGO_BIN_EXE_webvac-bench");
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn bench(args: &[&str]) -> Value {
    let mut cmd = Command::new(BENCH_BIN);
    cmd.args(args)
        .args(["--json", "--quiet", "--warmup", "0", "--stall", "20"]);
    let out = run_bounded(cmd, RUN_TIMEOUT);
    assert!(
        out.status.is_some_and(|s| s.success()),
        "webvac-bench {args:?} failed: {}",
        out.stderr
    );
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn u(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

fn f(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

#[test]
fn compare_drives_memcached_and_webvac_alike() {
    let memcached = Memcached::start_tcp();
    let webvac = Server::start(&[]);
    let (a, b) = (memcached.tcp_addr().to_string(), webvac.addr().to_string());
    let doc = bench(&[
        "compare",
        "-a",
        &a,
        "-b",
        &b,
        "--names",
        "memcached,webvac",
        "--rounds",
        "3",
        "--ops",
        "3000",
        "--connections",
        "4",
        "--depth",
        "4",
        "--keys",
        "500",
        "--prefill",
    ]);
    for side in ["a", "b"] {
        let rounds = doc[side].as_array().expect("rounds");
        assert_eq!(rounds.len(), 3, "{side}: {doc}");
        for r in rounds {
            assert_eq!(u(r, "ops"), 3000, "{side}: every admitted request answered");
            assert_eq!(u(r, "errors"), 0, "{side}: {r}");
            assert_eq!(u(r, "gets") + u(r, "sets"), 3000);
            // Prefilled and far below the memory limit: every get hits.
            assert_eq!(f(r, "hit_ratio"), 1.0, "{side}: {r}");
            assert!(
                u(r, "gets") > 2400 && u(r, "sets") > 100,
                "a 90/10 mix: {r}"
            );
            let l = &r["latency_us"];
            assert!(f(l, "p50") > 0.0 && f(l, "p50") <= f(l, "p99") && f(l, "p99") <= f(l, "max"));
        }
    }
    let metrics = doc["metrics"].as_array().expect("metrics");
    let ops = metrics
        .iter()
        .find(|m| m["metric"] == "ops/s")
        .expect("ops/s row");
    let ratio = f(ops, "ratio");
    assert!(ratio > 0.0 && ratio.is_finite());
    assert!((ratio - f(ops, "b_median") / f(ops, "a_median")).abs() < 1e-9);
}

#[test]
fn meta_protocol_multiget_counts_hits_and_misses() {
    let webvac = Server::start(&[]);
    let addr = webvac.addr().to_string();
    // Keys 0..199 are set; gets draw from 0..399, so about half miss.
    bench(&[
        "run",
        "-s",
        &addr,
        "--protocol",
        "meta",
        "--keys",
        "200",
        "--prefill",
        "--ops",
        "0",
    ]);
    let r = bench(&[
        "run",
        "-s",
        &addr,
        "--protocol",
        "meta",
        "--keys",
        "400",
        "--get-ratio",
        "1",
        "--multiget",
        "10",
        "--ops",
        "500",
        "--connections",
        "2",
        "--depth",
        "8",
    ]);
    assert_eq!(u(&r, "gets"), 500);
    assert_eq!(u(&r, "get_keys"), 5000);
    assert_eq!(u(&r, "errors"), 0);
    let ratio = f(&r, "hit_ratio");
    assert!(
        (0.35..0.65).contains(&ratio),
        "about half the keys exist: {r}"
    );
}

#[test]
fn open_loop_and_set_on_miss_against_memcached() {
    let memcached = Memcached::start_tcp();
    let addr = memcached.tcp_addr().to_string();
    let r = bench(&[
        "run",
        "-s",
        &addr,
        "--rate",
        "2000",
        "--ops",
        "1000",
        "--connections",
        "4",
        "--keys",
        "100",
        "--get-ratio",
        "1",
        "--dist",
        "zipf:0.99",
    ]);
    assert_eq!(u(&r, "ops"), 1000);
    assert_eq!(u(&r, "hits"), 0, "nothing was ever set");
    // Cache-aside: every miss is followed by a set of that key, so the
    // hit ratio climbs as the hot keys fill in.
    let r = bench(&[
        "run",
        "-s",
        &addr,
        "--set-on-miss",
        "--ops",
        "3000",
        "--connections",
        "2",
        "--keys",
        "100",
        "--get-ratio",
        "1",
    ]);
    let misses = u(&r, "get_keys") - u(&r, "hits");
    let sets = u(&r, "sets");
    // One set follows each miss; a connection's last few may be cut off by
    // the operation budget.
    assert!(
        sets > 0 && sets <= misses && misses - sets <= 2,
        "one set per miss: {r}"
    );
    assert!(f(&r, "hit_ratio") > 0.9, "{r}");
}

#[test]
fn responder_answers_what_the_bench_sends() {
    let port = common::free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(BENCH_BIN)
        .args(["respond", "--listen", &listen])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the responder");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "responder never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = bench(&[
        "run",
        "-s",
        &listen,
        "--ops",
        "1000",
        "--multiget",
        "3",
        "--depth",
        "4",
    ]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(u(&r, "ops"), 1000);
    assert_eq!(f(&r, "hit_ratio"), 1.0, "the responder always hits");
}

fn reliability(server: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(BENCH_BIN);
    cmd.args(["reliability", "-s", server]).args(args);
    let out = run_bounded(cmd, RUN_TIMEOUT);
    assert!(
        out.status.is_some_and(|s| s.success()),
        "webvac-bench reliability {args:?} failed: {}",
        out.stderr
    );
    out.stdout
}

/// The listing experiment prints one row per (N, K) with the model, the
/// measured rate and its interval; every listing that finished listed
/// every key (the tool checks and fails otherwise).
#[test]
fn reliability_listing_prints_a_row_per_n_and_k() {
    let webvac = Server::start(&[]);
    let text = reliability(
        &webvac.addr().to_string(),
        &[
            "--keys",
            "1,30",
            "--retries",
            "1,3",
            "--trials",
            "5",
            "--page",
            "4",
            "--loss",
            "0.1",
        ],
    );
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() >= 9 && w[0].parse::<u64>().is_ok())
        .collect();
    assert_eq!(rows.len(), 4, "{text}");
    for (row, (n, k)) in rows
        .iter()
        .zip([("1", "1"), ("1", "3"), ("30", "1"), ("30", "3")])
    {
        assert_eq!((row[0], row[1]), (n, k), "{text}");
        // 30 keys in pages of 4: 8 calls; 1 key: 1 call.
        assert_eq!(row[2], if n == "1" { "1" } else { "8" }, "{text}");
        let measured: f64 = row[4].parse().unwrap();
        assert!((0.0..=1.0).contains(&measured), "{text}");
    }
}

/// Counting under reply loss: exact with request ids, over-counted without
/// (the loss pattern is seeded, so this is the same every run).
#[test]
fn reliability_incr_is_exact_with_ids_and_over_without() {
    let webvac = Server::start(&[]);
    let text = reliability(
        &webvac.addr().to_string(),
        &[
            "--op",
            "incr",
            "--ops",
            "200",
            "--loss",
            "0.2",
            "--retries",
            "3",
        ],
    );
    let row = |ids: &str| -> (u64, u64) {
        let w: Vec<&str> = text
            .lines()
            .map(str::split_whitespace)
            .map(Iterator::collect::<Vec<_>>)
            .find(|w| w.first() == Some(&ids) && w.len() == 5)
            .unwrap_or_else(|| panic!("no {ids} row in {text}"));
        (w[1].parse().unwrap(), w[2].parse().unwrap())
    };
    assert_eq!(row("yes"), (200, 200), "{text}");
    let (m, counter) = row("no");
    assert_eq!(m, 200);
    assert!(counter > 200, "blind retries should over-count: {text}");
}

/// `--tls` and `--auth`: the bench speaks TLS to memcached and webvac
/// started with `-Z` (so the TLS cost can be measured side by side), checks
/// the server's certificate, and authenticates to a node started with
/// `-Y`; a server it cannot trust, or a wrong password, fails the run with
/// the reason.
#[test]
fn tls_and_auth_reach_memcached_and_webvac_alike() {
    let files = common::tls::Files::new("bench");
    let ca = files.path("ca.pem");
    let memcached = Memcached::start_with_tcp(&files.server_args(""));
    let webvac = Server::start(
        &files
            .server_args("")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    for addr in [memcached.tcp_addr().to_string(), webvac.addr().to_string()] {
        let r = bench(&[
            "run",
            "-s",
            &addr,
            "--tls",
            "--tls-ca",
            &ca,
            "--ops",
            "2000",
            "--connections",
            "4",
            "--depth",
            "4",
        ]);
        assert_eq!(u(&r, "gets") + u(&r, "sets"), 2000, "{addr}: {r}");
        assert_eq!(u(&r, "errors"), 0, "{addr}: {r}");
    }
    let other = common::tls::Ca::new("untrusted");
    common::tls::write(&files.dir.join("other.pem"), &other.pem);
    let mut cmd = Command::new(BENCH_BIN);
    cmd.args(["run", "-s", &webvac.addr().to_string(), "--tls", "--tls-ca"])
        .arg(files.dir.join("other.pem"))
        .args(["--ops", "10", "--quiet"]);
    let out = run_bounded(cmd, RUN_TIMEOUT);
    assert!(!out.status.is_some_and(|s| s.success()));
    assert!(out.stderr.contains("TLS handshake"), "{}", out.stderr);

    let users = files.dir.join("users");
    common::tls::write(&users, "bench:secret\n");
    let users = users.display().to_string();
    let authed = Server::start(&["-Y", &users]);
    let r = bench(&[
        "run",
        "-s",
        &authed.addr().to_string(),
        "--auth",
        "bench:secret",
        "--ops",
        "500",
    ]);
    assert_eq!(u(&r, "errors"), 0, "{r}");
    let mut cmd = Command::new(BENCH_BIN);
    cmd.args([
        "run",
        "-s",
        &authed.addr().to_string(),
        "--auth",
        "bench:wrong",
    ])
    .args(["--ops", "10", "--quiet"]);
    let out = run_bounded(cmd, RUN_TIMEOUT);
    assert!(!out.status.is_some_and(|s| s.success()));
    assert!(
        out.stderr.contains("authentication refused"),
        "{}",
        out.stderr
    );
}

/// A run whose connections fail ends at once with the reason, however many
/// load threads it has. (The main thread once held the error's lock while
/// joining threads that took it after the barrier: 28 runs in 30 hung.)
#[test]
fn a_server_it_cannot_reach_fails_the_run_with_the_reason() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .to_string(); // the listener is gone: connections are refused
    for round in 0..10 {
        let mut cmd = Command::new(BENCH_BIN);
        cmd.args(["run", "-s", &closed, "--threads", "8", "--connections", "8"])
            .args(["--ops", "10", "--quiet"]);
        let out = run_bounded(cmd, Duration::from_secs(30));
        let status = out
            .status
            .unwrap_or_else(|| panic!("round {round}: the run hung"));
        assert!(!status.success(), "round {round}: {}", out.stderr);
        assert!(
            out.stderr.contains(&format!("cannot connect to {closed}")),
            "round {round}: {}",
            out.stderr
        );
    }
}
