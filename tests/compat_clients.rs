//! Real memcached clients get from webvac exactly what they get from
//! memcached 1.6.18 (issue 17).
//!
//! Each client is driven by a script under `tests/clients/` through one
//! scenario: set/get, add/replace, append/prepend, gets + cas (success,
//! stale token, deleted key), incr/decr (wrap at 2^64, non-numeric value),
//! touch, delete, values of 1 byte to 1 MB and over memcached's 1 MiB item
//! limit, a multi-get of 20,000 keys of 64 bytes in one call, stats (that
//! the fields are numbers), version (that the client got one), flush_all.
//! The script prints a transcript, one JSON line per step with what the
//! client returned, CAS tokens, stats values, version strings and addresses
//! replaced by their kind. Each transcript is taken five times:
//!
//! ```text
//!   memcached ─────────────────────────┐ equal?  webvac, one node
//!                                      └──────── webvac, a cluster node
//!   3 memcached as the client's pool ─── equal?  the 3 cluster nodes as the pool
//! ```
//!
//! The pool's reference is three memcached instances the client hashes keys
//! across, as it would in production; on a cluster every node serves every
//! key, so the client's hashing only spreads the load.
//!
//! Clients: pymemcache, python-memcached and pylibmc under Debian's
//! python3, and PHP's memcached extension (libmemcached). The memcached
//! transcripts are also checked to show the scenario ran through (every
//! step, the multi-get answered whole), so two equally broken runs cannot
//! pass.

mod common;

use std::net::SocketAddr;
use std::time::Instant;

use common::cluster::{Cluster, Layout, exclusive};
use common::compat::{ClientDriver, PHP_BIN, transcript_diff};
use common::{Memcached, SYSTEM_PYTHON, Server};

/// Steps in the scenario (`tests/clients/scenario.py`, `php_memcached.php`).
const SCENARIO_STEPS: usize = 95;
/// The multi-get step, and what it shows when every stored key came back.
const MULTI_GET_STEP: &str = "get_multi 20000 keys in one call";
const MULTI_GET_WHOLE: &str = "\"every stored key found\":true";
/// Members of the cluster, and memcached instances in the reference pool.
const POOL_SERVERS: usize = 3;

const PYMEMCACHE: ClientDriver = ClientDriver {
    name: "pymemcache",
    program: SYSTEM_PYTHON,
    script: "pymemcache_client.py",
    packages: "Debian's python3 with python3-pymemcache",
};
const PYTHON_MEMCACHED: ClientDriver = ClientDriver {
    name: "python-memcached",
    program: SYSTEM_PYTHON,
    script: "python_memcached.py",
    packages: "Debian's python3 with python3-memcache",
};
const PYLIBMC: ClientDriver = ClientDriver {
    name: "pylibmc",
    program: SYSTEM_PYTHON,
    script: "pylibmc_client.py",
    packages: "Debian's python3 with python3-pylibmc",
};
const PHP_MEMCACHED: ClientDriver = ClientDriver {
    name: "php-memcached",
    program: PHP_BIN,
    script: "php_memcached.php",
    packages: "php-cli with php-memcached",
};

/// One transcript, timed.
fn take(driver: &ClientDriver, target: &str, addrs: &[SocketAddr]) -> Vec<String> {
    let started = Instant::now();
    let lines = driver.transcript(addrs);
    eprintln!(
        "{}: {target}: {} steps in {:.1} s",
        driver.name,
        lines.len(),
        started.elapsed().as_secs_f64()
    );
    lines
}

/// The reference ran the whole scenario and the multi-get came back whole.
fn assert_reference_ran_through(driver: &ClientDriver, target: &str, lines: &[String]) {
    let shown = lines.join("\n");
    assert_eq!(
        lines.len(),
        SCENARIO_STEPS,
        "{} against {target}: the scenario has {SCENARIO_STEPS} steps\n{shown}",
        driver.name
    );
    let multi_get = lines
        .iter()
        .find(|l| l.contains(MULTI_GET_STEP))
        .unwrap_or_else(|| panic!("{}: no multi-get step\n{shown}", driver.name));
    assert!(
        multi_get.replace(": ", ":").contains(MULTI_GET_WHOLE),
        "{} against {target}: the multi-get did not come back whole: {multi_get}",
        driver.name
    );
}

/// Runs `driver` against memcached (one, and three as a pool) and against
/// webvac (one node, a cluster node, the cluster's nodes as a pool), and
/// asserts webvac's transcripts equal memcached's, listing every differing
/// step.
fn client_gets_what_memcached_gives(driver: &ClientDriver) {
    let _serial = exclusive();
    let memcached = Memcached::start_tcp();
    let memcached_pool: Vec<Memcached> =
        (0..POOL_SERVERS).map(|_| Memcached::start_tcp()).collect();
    let webvac = Server::start(&[]);
    let cluster = Cluster::start(Layout::new(POOL_SERVERS).quorums(2, 2));

    let one = take(driver, "memcached", &[memcached.tcp_addr()]);
    assert_reference_ran_through(driver, "memcached", &one);
    let pool_addrs: Vec<SocketAddr> = memcached_pool.iter().map(|m| m.tcp_addr()).collect();
    let pool = take(driver, "3 memcached as a pool", &pool_addrs);
    assert_reference_ran_through(driver, "3 memcached as a pool", &pool);

    let cluster_addrs: Vec<SocketAddr> = cluster.members().iter().map(|m| m.client).collect();
    let runs = [
        ("memcached", &one, "webvac, one node", vec![webvac.addr()]),
        (
            "memcached",
            &one,
            "webvac, cluster node 1",
            vec![cluster.member(1).client],
        ),
        (
            "3 memcached as a pool",
            &pool,
            "3 cluster nodes as a pool",
            cluster_addrs,
        ),
    ];
    let mut failures = Vec::new();
    for (want_name, want, got_name, addrs) in runs {
        let got = take(driver, got_name, &addrs);
        if let Some(diff) = transcript_diff(want_name, want, got_name, &got) {
            failures.push(format!("{} against {got_name}: {diff}", driver.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} gets from webvac what it does not get from memcached 1.6.18:\n{}",
        driver.name,
        failures.join("\n")
    );
}

#[test]
fn pymemcache_gets_what_memcached_gives() {
    client_gets_what_memcached_gives(&PYMEMCACHE);
}

#[test]
fn python_memcached_gets_what_memcached_gives() {
    client_gets_what_memcached_gives(&PYTHON_MEMCACHED);
}

#[test]
fn pylibmc_gets_what_memcached_gives() {
    client_gets_what_memcached_gives(&PYLIBMC);
}

#[test]
fn php_memcached_gets_what_memcached_gives() {
    client_gets_what_memcached_gives(&PHP_MEMCACHED);
}

/// A failure names every differing step with both lines, and steps that
/// only one transcript has.
#[test]
fn transcript_diff_lists_each_differing_step() {
    let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let want = lines(&["a", "b", "c"]);
    assert_eq!(transcript_diff("memcached", &want, "webvac", &want), None);
    let diff =
        transcript_diff("memcached", &want, "webvac", &lines(&["a", "B"])).expect("a difference");
    assert_eq!(
        diff,
        "2 of 3 steps differ:\n  step 2:\n    memcached  b\n    webvac     B\n  \
         step 3:\n    memcached  c\n    webvac     (no such step)\n"
    );
}
