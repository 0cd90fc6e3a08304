//! Compatibility with real memcached clients, run against the real binary.
//!
//! - libmemcached's `memccapable -a` (ASCII protocol conformance checks);
//! - pymemcache's `Client`, driven by `tests/compat_pymemcache.py` under
//!   Debian's `/usr/bin/python3` (which has `python3-pymemcache`).
//!
//! Each tool also runs once against the reference memcached, which shows the
//! tool and script themselves are right before they judge webvac. Missing
//! tools fail the test with a pointer to `.ci/run`; nothing is skipped.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    MEMCCAPABLE_BIN, Memcached, RunOutput, SYSTEM_PYTHON, Server, require_tool, run_bounded,
};

/// memccapable runs ~30 small checks; generous for a debug build.
const MEMCCAPABLE_TIMEOUT: Duration = Duration::from_secs(120);
/// memccapable's own per-operation I/O timeout, seconds.
const MEMCCAPABLE_IO_TIMEOUT_SECS: &str = "10";
const PYMEMCACHE_TIMEOUT: Duration = Duration::from_secs(180);

fn script_path() -> String {
    format!("{}/tests/compat_pymemcache.py", env!("CARGO_MANIFEST_DIR"))
}

fn describe(what: &str, out: &RunOutput) -> String {
    format!(
        "{what}: exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "killed after the timeout".to_string()),
        out.stdout,
        out.stderr
    )
}

fn run_memccapable(port: u16) -> RunOutput {
    require_tool(MEMCCAPABLE_BIN, "libmemcached-tools' memccapable");
    let mut cmd = Command::new(MEMCCAPABLE_BIN);
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-a",
        "-t",
        MEMCCAPABLE_IO_TIMEOUT_SECS,
    ]);
    run_bounded(cmd, MEMCCAPABLE_TIMEOUT)
}

/// memccapable prints one `name [pass]` / `[FAIL]` line per check and exits
/// non-zero when any fails.
fn assert_memccapable_passed(target: &str, out: &RunOutput) {
    let report = describe(&format!("memccapable -a against {target}"), out);
    println!("{report}");
    let failures: Vec<&str> = out
        .stdout
        .lines()
        .chain(out.stderr.lines())
        .filter(|l| l.to_ascii_lowercase().contains("[fail]"))
        .collect();
    assert!(out.status.is_some_and(|s| s.success()), "{report}");
    assert!(failures.is_empty(), "failed checks {failures:?}\n{report}");
    assert!(
        out.stdout.contains("[pass]"),
        "memccapable ran no check\n{report}"
    );
}

fn run_pymemcache(host: &str, port: u16) -> RunOutput {
    require_tool(SYSTEM_PYTHON, "Debian's python3 with python3-pymemcache");
    let mut cmd = Command::new(SYSTEM_PYTHON);
    cmd.arg(script_path()).arg(host).arg(port.to_string());
    run_bounded(cmd, PYMEMCACHE_TIMEOUT)
}

fn assert_pymemcache_passed(target: &str, out: &RunOutput) {
    let report = describe(&format!("compat_pymemcache.py against {target}"), out);
    println!("{report}");
    assert!(out.status.is_some_and(|s| s.success()), "{report}");
    assert!(
        out.stdout.contains(" passed, 0 failed"),
        "no summary line\n{report}"
    );
}

#[test]
fn memccapable_ascii_passes_against_webvac() {
    let server = Server::start(&[]);
    let out = run_memccapable(server.port());
    assert_memccapable_passed("webvac", &out);
}

#[test]
fn pymemcache_suite_passes_against_webvac() {
    let server = Server::start(&[]);
    let out = run_pymemcache("127.0.0.1", server.port());
    assert_pymemcache_passed("webvac", &out);
}

/// The checker itself is sound: the reference passes it.
#[test]
fn memccapable_ascii_passes_against_memcached() {
    let reference = Memcached::start_tcp();
    let out = run_memccapable(reference.tcp_addr().port());
    assert_memccapable_passed("memcached", &out);
}

/// The script itself is sound: the reference passes it.
#[test]
fn pymemcache_suite_passes_against_memcached() {
    let reference = Memcached::start_tcp();
    let out = run_pymemcache("127.0.0.1", reference.tcp_addr().port());
    assert_pymemcache_passed("memcached", &out);
}

/// The contract says webvac exits 0 on SIGTERM, also with a client connected.
#[test]
fn webvac_exits_zero_on_sigterm() {
    let mut server = Server::start(&[]);
    let mut client = server.connect();
    let reply = client.request(b"set k 0 0 1\r\nx\r\n", &[b"\r\n"]);
    assert_eq!(reply, b"STORED\r\n");
    let status = server.terminate();
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "webvac did not exit 0 within the grace period after SIGTERM: {status:?}\nstderr:\n{}",
        server.stderr_text()
    );
}
