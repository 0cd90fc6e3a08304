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

use common::compat::{
    assert_memccapable_passed, assert_pymemcache_passed, run_memccapable, run_pymemcache,
};
use common::{Memcached, Server};

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
