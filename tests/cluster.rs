//! Cluster tests: several real `webvac` processes on loopback, raw bytes.
//!
//! Each test starts its own cluster (`common::cluster::Cluster`), talks to
//! its nodes as a memcached client would, kills nodes with SIGKILL and
//! restarts them, and checks what clients were promised: a write answered
//! `STORED` is read back through every node that is still up, a request
//! whose quorum cannot be met fails fast with `SERVER_ERROR`, and each key
//! lives on exactly N nodes. `me <key>` answers from the node's own memory,
//! so it shows where a key is held.
//!
//! The tests run one at a time (`cluster::exclusive`): some assert latency
//! bounds that parallel clusters on a small machine would blur. Randomised
//! tests print their seed; set `WEBVAC_TEST_SEED` to replay one.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::cluster::{
    Cluster, Layout, NodeId, cluster_stats, exclusive, member_fields, member_states, parse_stats,
    partition_keys, preference_of,
};
use common::compat::{
    assert_memccapable_passed, assert_pymemcache_passed, run_memccapable, run_pymemcache,
};
use common::{
    Client, REPLY_TIMEOUT, ReplyErrorKind, RunOutput, escape, one_reply_len, run_bounded, seed,
};

/// Bounded wait for replicas that a write did not wait for (N > W) to catch up.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

fn set_request(verb: &str, key: &str, exptime: u32, value: &str) -> Vec<u8> {
    format!("{verb} {key} 0 {exptime} {}\r\n{value}\r\n", value.len()).into_bytes()
}

/// `VALUE` blocks of a get/gets reply: key -> (value, cas).
///
/// # Panics
/// If the reply is not a well-formed get reply (e.g. a `SERVER_ERROR`).
fn parse_get_reply(reply: &str) -> BTreeMap<String, (String, Option<u64>)> {
    let mut found = BTreeMap::new();
    let mut rest = reply;
    loop {
        let (line, after) = rest
            .split_once("\r\n")
            .unwrap_or_else(|| panic!("not a get reply: {reply:?}"));
        if line == "END" {
            assert!(after.is_empty(), "bytes after END in {reply:?}");
            return found;
        }
        let fields: Vec<&str> = line.split(' ').collect();
        assert!(
            fields[0] == "VALUE" && (fields.len() == 4 || fields.len() == 5),
            "not a get reply: {reply:?}"
        );
        let len: usize = fields[3].parse().expect("VALUE length");
        let value = &after[..len];
        assert_eq!(&after[len..len + 2], "\r\n", "data block end in {reply:?}");
        let cas = fields.get(4).map(|c| c.parse().expect("cas unique"));
        found.insert(fields[1].to_string(), (value.to_string(), cas));
        rest = &after[len + 2..];
    }
}

/// The value of `key` read through `client` with `get`.
fn get(client: &mut Client, key: &str) -> Option<String> {
    let reply = client.ask(format!("get {key}\r\n").as_bytes());
    let mut found = parse_get_reply(&reply);
    let value = found.remove(key).map(|(v, _)| v);
    assert!(found.is_empty(), "get {key} answered other keys: {reply:?}");
    value
}

/// The value and CAS unique of `key` read through `client` with `gets`.
fn gets(client: &mut Client, key: &str) -> Option<(String, u64)> {
    let reply = client.ask(format!("gets {key}\r\n").as_bytes());
    parse_get_reply(&reply)
        .remove(key)
        .map(|(v, cas)| (v, cas.expect("gets shows the cas unique")))
}

/// Whether the node behind `client` holds `key` in its own memory (`me`).
fn holds(client: &mut Client, key: &str) -> bool {
    let reply = client.ask(format!("me {key}\r\n").as_bytes());
    match reply.as_str() {
        "EN\r\n" => false,
        r if r.starts_with(&format!("ME {key} ")) => true,
        r => panic!("me {key} answered {r:?}"),
    }
}

/// `me`'s `exp=` field; memcached (and so webvac) prints now - exptime,
/// i.e. minus the remaining TTL.
fn me_exp(client: &mut Client, key: &str) -> i64 {
    let reply = client.ask(format!("me {key}\r\n").as_bytes());
    reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix("exp="))
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("me {key} answered {reply:?}"))
}

/// The `t` (remaining TTL) token of an `mg ... t` reply.
fn mg_ttl(client: &mut Client, request: &str) -> i64 {
    let reply = client.ask(request.as_bytes());
    assert!(reply.starts_with("HD "), "{request:?} answered {reply:?}");
    reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix('t'))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{request:?} answered {reply:?}"))
}

/// A client per member, in member order (`clients[0]` talks to node 1).
fn connect_all(cluster: &Cluster) -> Vec<Client> {
    cluster
        .ids()
        .into_iter()
        .map(|id| cluster.connect(id))
        .collect()
}

/// `key` reads as `want` through every client, with both get and gets; all
/// nodes report the same CAS unique. Returns it.
fn assert_everywhere(clients: &mut [Client], key: &str, want: Option<&str>) -> Option<u64> {
    let mut cas_seen = None;
    for (i, c) in clients.iter_mut().enumerate() {
        let node = i + 1;
        assert_eq!(
            get(c, key).as_deref(),
            want,
            "get {key} through node {node}"
        );
        let g = gets(c, key);
        assert_eq!(
            g.as_ref().map(|(v, _)| v.as_str()),
            want,
            "gets {key} through node {node}"
        );
        if let Some((_, cas)) = g {
            if let Some(seen) = cas_seen {
                assert_eq!(
                    cas, seen,
                    "gets {key}: node {node} shows another cas unique"
                );
            }
            cas_seen = Some(cas);
        }
    }
    cas_seen
}

#[test]
fn write_through_one_node_reads_through_every_node() {
    let _serial = exclusive();
    let cluster = Cluster::start(Layout::new(3));
    let mut c = connect_all(&cluster);

    // Storage commands through different coordinators.
    assert_eq!(
        c[0].ask(&set_request("set", "k1", 0, "hello")),
        "STORED\r\n"
    );
    assert_everywhere(&mut c, "k1", Some("hello"));
    assert_eq!(
        c[1].ask(&set_request("add", "k1", 0, "nope")),
        "NOT_STORED\r\n"
    );
    assert_eq!(c[1].ask(&set_request("add", "k2", 0, "two")), "STORED\r\n");
    assert_everywhere(&mut c, "k1", Some("hello"));
    assert_everywhere(&mut c, "k2", Some("two"));
    assert_eq!(
        c[2].ask(&set_request("append", "k1", 0, " world")),
        "STORED\r\n"
    );
    assert_eq!(
        c[0].ask(&set_request("prepend", "k1", 0, "> ")),
        "STORED\r\n"
    );
    assert_everywhere(&mut c, "k1", Some("> hello world"));
    assert_eq!(
        c[1].ask(&set_request("replace", "k2", 0, "TWO")),
        "STORED\r\n"
    );
    assert_eq!(
        c[2].ask(&set_request("replace", "k3", 0, "x")),
        "NOT_STORED\r\n"
    );
    assert_everywhere(&mut c, "k2", Some("TWO"));
    assert_everywhere(&mut c, "k3", None);

    // Arithmetic: each step runs on the key's primary whoever coordinates.
    assert_eq!(c[0].ask(&set_request("set", "n", 0, "10")), "STORED\r\n");
    assert_eq!(c[1].ask(b"incr n 5\r\n"), "15\r\n");
    assert_eq!(c[2].ask(b"decr n 3\r\n"), "12\r\n");
    assert_eq!(c[0].ask(b"incr n 100\r\n"), "112\r\n");
    assert_everywhere(&mut c, "n", Some("112"));
    assert_eq!(c[2].ask(b"incr missing 1\r\n"), "NOT_FOUND\r\n");

    // touch changes the expiry on every copy.
    assert_eq!(c[2].ask(b"touch k2 1000\r\n"), "TOUCHED\r\n");
    assert_eq!(c[0].ask(b"touch missing 1000\r\n"), "NOT_FOUND\r\n");
    for (i, client) in c.iter_mut().enumerate() {
        let exp = me_exp(client, "k2");
        assert!(
            (-1000..=-998).contains(&exp),
            "node {} holds k2 with exp={exp} after touch 1000",
            i + 1
        );
    }

    // delete
    assert_eq!(c[2].ask(b"delete k1\r\n"), "DELETED\r\n");
    assert_everywhere(&mut c, "k1", None);
    assert_eq!(c[1].ask(b"delete k1\r\n"), "NOT_FOUND\r\n");

    // A CAS unique read on one node is good on another, and only once.
    assert_eq!(c[0].ask(&set_request("set", "cas", 0, "v1")), "STORED\r\n");
    let cas = assert_everywhere(&mut c, "cas", Some("v1")).expect("cas is set");
    let (_, cas_on_a) = gets(&mut c[0], "cas").expect("cas is set");
    assert_eq!(cas_on_a, cas);
    let swap = format!("cas cas 0 0 2 {cas_on_a}\r\nv2\r\n");
    assert_eq!(c[1].ask(swap.as_bytes()), "STORED\r\n");
    let stale = format!("cas cas 0 0 2 {cas_on_a}\r\nv3\r\n");
    assert_eq!(c[2].ask(stale.as_bytes()), "EXISTS\r\n");
    let new_cas = assert_everywhere(&mut c, "cas", Some("v2")).expect("cas is set");
    assert_ne!(new_cas, cas_on_a, "a successful cas changes the unique");
    let fresh = format!("cas cas 0 0 2 {new_cas}\r\nv4\r\n");
    assert_eq!(c[2].ask(fresh.as_bytes()), "STORED\r\n");
    assert_everywhere(&mut c, "cas", Some("v4"));

    // A relative TTL becomes one absolute expiry, the same on every copy.
    assert_eq!(c[0].ask(&set_request("set", "ttl", 100, "t")), "STORED\r\n");
    for (i, client) in c.iter_mut().enumerate() {
        let node = i + 1;
        let quorum = mg_ttl(client, "mg ttl t\r\n");
        let own = mg_ttl(client, "mg ttl t Pr1\r\n");
        let exp = me_exp(client, "ttl");
        assert!(
            (98..=100).contains(&quorum)
                && (98..=100).contains(&own)
                && (-100..=-98).contains(&exp),
            "node {node}: mg t (R=2) {quorum}, mg t Pr1 {own}, me exp={exp}; want a TTL of 98..=100"
        );
    }

    // flush_all through one node empties every node.
    assert_eq!(c[1].ask(b"flush_all\r\n"), "OK\r\n");
    for key in ["k1", "k2", "k3", "n", "cas", "ttl"] {
        assert_everywhere(&mut c, key, None);
        for (i, client) in c.iter_mut().enumerate() {
            assert!(
                !holds(client, key),
                "node {} still holds {key} after flush_all",
                i + 1
            );
        }
    }
}

#[test]
fn each_key_is_held_by_exactly_n_nodes() {
    const KEYS: usize = 200;
    const REPLICAS: usize = 3;
    let _serial = exclusive();
    let mut rng = StdRng::seed_from_u64(seed("each_key_is_held_by_exactly_n_nodes"));
    let cluster = Cluster::start(Layout::new(5).replicas(REPLICAS));
    let mut c = connect_all(&cluster);
    let keys: Vec<String> = (0..KEYS).map(|i| format!("key:{i}")).collect();
    for key in &keys {
        let via = rng.gen_range(0..c.len());
        let reply = c[via].ask(&set_request("set", key, 0, &format!("value of {key}")));
        assert_eq!(reply, "STORED\r\n", "set {key} through node {}", via + 1);
    }
    // W = 2 of N = 3: the third copy may still be on its way. Never more
    // than N copies, and all N within a bound.
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let mut pending: Vec<&String> = keys.iter().collect();
    loop {
        let mut still = Vec::new();
        for key in pending {
            let holders: Vec<usize> = (0..c.len())
                .filter(|&i| holds(&mut c[i], key))
                .map(|i| i + 1)
                .collect();
            assert!(
                holders.len() <= REPLICAS,
                "{key} is held by nodes {holders:?}, more than N={REPLICAS}"
            );
            if holders.len() < REPLICAS {
                still.push((key, holders));
            }
        }
        if still.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} keys not on N={REPLICAS} nodes after {CONVERGE_TIMEOUT:?}, e.g. {:?}",
            still.len(),
            &still[..still.len().min(5)]
        );
        pending = still.into_iter().map(|(k, _)| k).collect();
        thread::sleep(POLL_INTERVAL);
    }
    for key in &keys {
        let want = format!("value of {key}");
        for (i, client) in c.iter_mut().enumerate() {
            assert_eq!(
                get(client, key).as_deref(),
                Some(want.as_str()),
                "get {key} through node {}",
                i + 1
            );
        }
    }
}

/// What one writer knows about one of its keys.
#[derive(Clone, Copy, Default, Debug)]
struct KeyLog {
    /// The last value answered STORED.
    last_acked: Option<u64>,
    /// The last value sent (values are 1, 2, 3, ... per key).
    attempted: u64,
}

#[derive(Default)]
struct WriterReport {
    keys: Vec<KeyLog>,
    acked: u64,
    server_errors: u64,
    /// Writes whose connection broke: applied or not, nobody knows.
    unknown: u64,
    slowest: Duration,
    first_server_errors: Vec<String>,
    violations: Vec<String>,
}

/// Bound on one request during the load: a hang is a failure.
const REQUEST_BOUND: Duration = Duration::from_secs(5);
const WRITERS: usize = 4;
const KEYS_PER_WRITER: usize = 25;
const LOAD_BEFORE_KILL: Duration = Duration::from_secs(1);
const LOAD_AFTER_KILL: Duration = Duration::from_secs(1);

/// The `killed` node index before any node is killed (no index is `usize::MAX`).
const NONE_KILLED: usize = usize::MAX;

/// One writer: `set wTkJ` with increasing values through one node at a time,
/// moving to the next node when its connection breaks.
fn writer(
    t: usize,
    addrs: &[SocketAddr],
    seed: u64,
    stop: &AtomicBool,
    killed: &AtomicUsize,
    acked_total: &AtomicU64,
) -> WriterReport {
    let mut rng = StdRng::seed_from_u64(seed ^ (t as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut report = WriterReport {
        keys: vec![KeyLog::default(); KEYS_PER_WRITER],
        ..WriterReport::default()
    };
    let mut node = t % addrs.len();
    let mut conn: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let client = match &mut conn {
            Some(c) => c,
            None => match Client::connect_tcp(addrs[node]) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    if killed.load(Ordering::SeqCst) != node {
                        report.violations.push(format!(
                            "writer {t}: cannot connect to live node {}: {e}",
                            node + 1
                        ));
                    }
                    node = (node + 1) % addrs.len();
                    continue;
                }
            },
        };
        let j = rng.gen_range(0..KEYS_PER_WRITER);
        let log = &mut report.keys[j];
        log.attempted += 1;
        let value = log.attempted.to_string();
        let key = format!("w{t}k{j}");
        let started = Instant::now();
        let result = client.call(&set_request("set", &key, 0, &value), REQUEST_BOUND);
        report.slowest = report.slowest.max(started.elapsed());
        match result {
            Ok(reply) if reply == b"STORED\r\n" => {
                log.last_acked = Some(log.attempted);
                report.acked += 1;
                acked_total.fetch_add(1, Ordering::Relaxed);
            }
            Ok(reply) if reply.starts_with(b"SERVER_ERROR ") => {
                report.server_errors += 1;
                if report.first_server_errors.len() < 3 {
                    report
                        .first_server_errors
                        .push(String::from_utf8_lossy(&reply).trim_end().to_string());
                }
            }
            Ok(reply) => report.violations.push(format!(
                "writer {t}: set {key} = {value} through node {} answered {:?}",
                node + 1,
                String::from_utf8_lossy(&reply)
            )),
            Err(e) => {
                let dead = killed.load(Ordering::SeqCst) == node;
                match e.kind {
                    ReplyErrorKind::Timeout(_) => report.violations.push(format!(
                        "writer {t}: set {key} = {value} through node {} hung: {e}",
                        node + 1
                    )),
                    _ if dead => report.unknown += 1,
                    _ => report.violations.push(format!(
                        "writer {t}: connection to live node {} failed on set {key} = {value}: {e}",
                        node + 1
                    )),
                }
                conn = None;
                node = (node + 1) % addrs.len();
            }
        }
    }
    report
}

/// Checks one value read back against what the writer knows of the key.
fn check_read(log: &KeyLog, read: Option<&str>) -> Result<(), String> {
    let value = match read {
        None if log.last_acked.is_none() => return Ok(()),
        None => return Err(format!("missing; last acked {:?}", log.last_acked)),
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| format!("{v:?} was never written"))?,
    };
    let lowest = log.last_acked.unwrap_or(1);
    if (lowest..=log.attempted).contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "read {value}; last acked {:?}, last attempted {}",
            log.last_acked, log.attempted
        ))
    }
}

/// N=3, R=2, W=2: kill -9 one node under write load. Every request answers
/// in bounded time, the others keep taking writes, and every acknowledged
/// write reads back through every surviving node.
#[test]
fn kill_one_node_mid_load() {
    let _serial = exclusive();
    let seed = seed("kill_one_node_mid_load");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = Cluster::start(
        Layout::new(3)
            .replicas(3)
            .quorums(2, 2)
            .request_timeout_ms(300),
    );
    let addrs: Vec<SocketAddr> = cluster.members().iter().map(|m| m.client).collect();
    let victim_index = rng.gen_range(0..addrs.len());
    let victim = cluster.ids()[victim_index];
    let stop = AtomicBool::new(false);
    let killed = AtomicUsize::new(NONE_KILLED);
    let acked_total = AtomicU64::new(0);
    let mut acked_before_kill = 0;
    let reports: Vec<WriterReport> = thread::scope(|s| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|t| {
                let (addrs, stop, killed, acked_total) = (&addrs, &stop, &killed, &acked_total);
                s.spawn(move || writer(t, addrs, seed, stop, killed, acked_total))
            })
            .collect();
        thread::sleep(LOAD_BEFORE_KILL);
        acked_before_kill = acked_total.load(Ordering::Relaxed);
        killed.store(victim_index, Ordering::SeqCst);
        cluster.kill(victim);
        thread::sleep(LOAD_AFTER_KILL);
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().expect("writer thread panicked"))
            .collect()
    });
    let acked: u64 = reports.iter().map(|r| r.acked).sum();
    let errors: u64 = reports.iter().map(|r| r.server_errors).sum();
    let unknown: u64 = reports.iter().map(|r| r.unknown).sum();
    let slowest = reports.iter().map(|r| r.slowest).max().unwrap_or_default();
    let summary = format!(
        "seed {seed}: killed node {victim}; {} keys, {acked} writes acked ({acked_before_kill} before the kill), \
         {errors} SERVER_ERROR, {unknown} unknown (connection lost), slowest reply {slowest:?}; \
         first errors {:?}",
        WRITERS * KEYS_PER_WRITER,
        reports
            .iter()
            .flat_map(|r| &r.first_server_errors)
            .take(3)
            .collect::<Vec<_>>()
    );
    println!("{summary}");
    let violations: Vec<&String> = reports.iter().flat_map(|r| &r.violations).collect();
    assert!(
        violations.is_empty(),
        "{summary}\nviolations: {violations:#?}"
    );
    assert!(
        acked_before_kill > 0,
        "no write acked before the kill\n{summary}"
    );
    assert!(
        acked > acked_before_kill,
        "no write acked after the kill: 2 of 3 nodes must take W=2 writes\n{summary}"
    );

    let mut failures = Vec::new();
    for id in cluster.running_ids() {
        assert_eq!(
            cluster.exited(id),
            None,
            "node {id} died\n{}",
            cluster.describe_nodes()
        );
        let mut client = cluster.connect(id);
        for (t, report) in reports.iter().enumerate() {
            for (j, log) in report.keys.iter().enumerate() {
                let key = format!("w{t}k{j}");
                let by_get = get(&mut client, &key);
                if let Err(why) = check_read(log, by_get.as_deref()) {
                    failures.push(format!("node {id}: get {key}: {why}"));
                }
                let reply = client.ask(format!("mg {key} v Pr2\r\n").as_bytes());
                let by_mg = if reply == "EN\r\n" {
                    None
                } else {
                    let value = reply
                        .strip_prefix("VA ")
                        .and_then(|r| r.split_once("\r\n"))
                        .map(|(_, v)| v.trim_end_matches("\r\n").to_string());
                    Some(value.unwrap_or_else(|| format!("<reply {reply:?}>")))
                };
                if let Err(why) = check_read(log, by_mg.as_deref()) {
                    failures.push(format!("node {id}: mg {key} v Pr2: {why}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{summary}\n{} reads lost acknowledged writes, e.g. {:#?}\n{}",
        failures.len(),
        &failures[..failures.len().min(20)],
        cluster.describe_nodes()
    );
}

/// Runs `request` and checks it fails with a SERVER_ERROR within `bound`.
fn assert_fails_fast(client: &mut Client, request: &str, bound: Duration, node: NodeId) -> String {
    let started = Instant::now();
    let reply = client
        .call(request.as_bytes(), bound + Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{request:?} through node {node}: {e}"));
    let took = started.elapsed();
    let reply = String::from_utf8_lossy(&reply).into_owned();
    assert!(
        reply.starts_with("SERVER_ERROR ") && reply.ends_with("\r\n") && reply.lines().count() == 1,
        "{request:?} through node {node} answered {reply:?}"
    );
    assert!(
        took < bound,
        "{request:?} through node {node} took {took:?} (bound {bound:?}) to answer {reply:?}"
    );
    reply
}

#[test]
fn two_nodes_down_fail_fast() {
    const TIMEOUT_MS: u64 = 500;
    let bound = Duration::from_millis(2 * TIMEOUT_MS) + Duration::from_secs(1);
    let _serial = exclusive();
    let mut cluster = Cluster::start(Layout::new(3).request_timeout_ms(TIMEOUT_MS));
    let mut c1 = cluster.connect(1);
    for i in 0..5 {
        let reply = c1.ask(&set_request(
            "set",
            &format!("before{i}"),
            0,
            &format!("old{i}"),
        ));
        assert_eq!(reply, "STORED\r\n");
    }
    cluster.kill(2);
    cluster.kill(3);
    // Both right after the kill (the survivor may not know yet) and once it
    // has marked both down.
    for phase in ["just killed", "known down"] {
        if phase == "known down" {
            for dead in [2, 3] {
                cluster.wait_member_state(1, dead, |s| s.starts_with("down"));
            }
        }
        for i in 0..5 {
            let key = format!("during{i}");
            let set = String::from_utf8(set_request("set", &key, 0, "x")).expect("ascii");
            let reply = assert_fails_fast(&mut c1, &set, bound, 1);
            println!("{phase}: set {key}: {}", reply.trim_end());
            let reply = assert_fails_fast(&mut c1, &format!("get {key}\r\n"), bound, 1);
            assert!(
                reply.contains("read quorum not met"),
                "{phase}: get {key}: {reply:?}"
            );
            let reply = assert_fails_fast(&mut c1, &format!("get before{i}\r\n"), bound, 1);
            assert!(
                reply.contains("read quorum not met"),
                "{phase}: get before{i}: {reply:?}"
            );
        }
        if phase == "known down" {
            let reply = assert_fails_fast(&mut c1, "set after 0 0 1\r\nx\r\n", bound, 1);
            assert!(
                reply.contains("write quorum not met")
                    || reply.contains("no replica of this key is reachable"),
                "{reply:?}"
            );
        }
    }
    // One of the two comes back (empty): W=2 and R=2 are possible again.
    cluster.restart(2);
    cluster.wait_member_state(1, 2, |s| s == "up");
    let mut c2 = cluster.connect(2);
    for i in 0..5 {
        let key = format!("again{i}");
        let value = format!("new{i}");
        let via = if i % 2 == 0 { &mut c1 } else { &mut c2 };
        assert_eq!(
            via.ask(&set_request("set", &key, 0, &value)),
            "STORED\r\n",
            "set {key}"
        );
        for (node, client) in [(1, &mut c1), (2, &mut c2)] {
            assert_eq!(
                get(client, &key),
                Some(value.clone()),
                "get {key} through node {node}"
            );
        }
    }
    // Written while all three were up: node 1 kept it, node 2 lost it.
    for i in 0..5 {
        let key = format!("before{i}");
        for (node, client) in [(1, &mut c1), (2, &mut c2)] {
            assert_eq!(
                get(client, &key),
                Some(format!("old{i}")),
                "get {key} through node {node}"
            );
        }
    }
}

#[test]
fn per_request_quorum() {
    let _serial = exclusive();
    let mut cluster = Cluster::start(Layout::new(3));
    cluster.kill(3);
    for via in [1, 2] {
        cluster.wait_member_state(via, 3, |s| s.starts_with("down"));
    }
    for via in [1, 2] {
        let mut c = cluster.connect(via);
        let mut ask = |request: &str| c.ask(request.as_bytes());
        for key in [
            format!("pq{via}"),
            format!("other{via}"),
            format!("third{via}"),
        ] {
            let what = |r: &str| format!("{r:?} through node {via}");
            let r = ask(&format!("ms {key} 1 Pw3\r\na\r\n"));
            assert!(
                r.starts_with("SERVER_ERROR ") && r.contains("write quorum not met"),
                "{}: {r:?}",
                what("ms Pw3")
            );
            assert_eq!(
                ask(&format!("ms {key} 1 Pw2\r\nb\r\n")),
                "HD\r\n",
                "{}",
                what("ms Pw2")
            );
            let r = ask(&format!("mg {key} v Pr3\r\n"));
            assert!(
                r.starts_with("SERVER_ERROR ") && r.contains("read quorum not met"),
                "{}: {r:?}",
                what("mg Pr3")
            );
            assert_eq!(
                ask(&format!("mg {key} v Pr1\r\n")),
                "VA 1\r\nb\r\n",
                "{}",
                what("mg Pr1")
            );
            assert_eq!(
                ask(&format!("mg {key} v Pr2\r\n")),
                "VA 1\r\nb\r\n",
                "{}",
                what("mg Pr2")
            );
            let r = ask(&format!("mg {key} v Pr9\r\n"));
            assert!(r.starts_with("CLIENT_ERROR "), "{}: {r:?}", what("mg Pr9"));
            let r = ask(&format!("mg {key} v Pr0\r\n"));
            assert!(r.starts_with("CLIENT_ERROR "), "{}: {r:?}", what("mg Pr0"));
            let r = ask(&format!("ms {key} 1 Pw9\r\nz\r\n"));
            assert!(r.starts_with("CLIENT_ERROR "), "{}: {r:?}", what("ms Pw9"));
            // A memcached proxy hint is not ours: ignored, default R=2.
            assert_eq!(
                ask(&format!("mg {key} v Pfoo/bar\r\n")),
                "VA 1\r\nb\r\n",
                "{}",
                what("mg Pfoo/bar")
            );
            // Several items in one token.
            assert_eq!(
                ask(&format!("ms {key} 1 Pr1,w2\r\nc\r\n")),
                "HD\r\n",
                "{}",
                what("ms Pr1,w2")
            );
            assert_eq!(
                ask(&format!("mg {key} v Pw3,r2\r\n")),
                "VA 1\r\nc\r\n",
                "{}",
                what("mg Pw3,r2")
            );
        }
    }
}

/// Runs a node by hand and expects it to refuse to start.
fn assert_refuses_layout(args: &[String], what: &str) {
    let started = Instant::now();
    let out: RunOutput = run_bounded(Cluster::command(args), Duration::from_secs(10));
    let took = started.elapsed();
    let report = format!(
        "{what}: exit {:?} after {took:?}\n--- stderr ---\n{}",
        out.status, out.stderr
    );
    let status = out
        .status
        .unwrap_or_else(|| panic!("still running, killed\n{report}"));
    assert!(!status.success(), "{report}");
    assert!(took < Duration::from_secs(5), "{report}");
    assert!(
        out.stderr.contains("cannot form a cluster with node")
            && out.stderr.contains("layout mismatch"),
        "{report}"
    );
}

#[test]
fn layout_mismatch_refuses_to_start() {
    let _serial = exclusive();
    let mut cluster = Cluster::start_members(Layout::new(3), &[1, 2]);

    // Another N.
    let mut args = cluster.args(3);
    args.extend(["--replicas".to_string(), "2".to_string()]);
    assert_refuses_layout(&args, "node 3 with --replicas 2");

    // Another member list: a fourth member nobody else knows.
    let mut args = cluster.args(3);
    let (client, peer) = (common::free_tcp_port(), common::free_tcp_port());
    args.extend([
        "--member".to_string(),
        format!("4=127.0.0.1:{client},127.0.0.1:{peer}"),
    ]);
    assert_refuses_layout(&args, "node 3 with a fourth member");

    // The two good nodes are unaffected and take the right node 3.
    for id in [1, 2] {
        assert_eq!(
            cluster.exited(id),
            None,
            "node {id} died\n{}",
            cluster.describe_nodes()
        );
        let states = member_states(&cluster_stats(&mut cluster.connect(id)));
        assert_ne!(
            states.get(&3).map(String::as_str),
            Some("up"),
            "node {id}: {states:?}"
        );
    }
    cluster.restart(3);
    let mut c3 = cluster.connect(3);
    assert_eq!(c3.ask(&set_request("set", "k", 0, "v")), "STORED\r\n");
    assert_eq!(get(&mut cluster.connect(1), "k").as_deref(), Some("v"));
}

#[test]
fn stats_cluster_reports_members_and_counters() {
    const KEYS: usize = 60;
    const REPLICAS: usize = 2;
    let _serial = exclusive();
    let mut rng = StdRng::seed_from_u64(seed("stats_cluster_reports_members_and_counters"));
    // N=2 of 3 nodes (W=2: every copy is written before the reply), so
    // nodes hold different keys.
    let cluster = Cluster::start(Layout::new(3).replicas(REPLICAS));
    let mut c = connect_all(&cluster);
    let keys: Vec<String> = (0..KEYS).map(|i| format!("s{i}")).collect();
    for key in &keys {
        let via = rng.gen_range(0..c.len());
        assert_eq!(c[via].ask(&set_request("set", key, 0, "v")), "STORED\r\n");
    }

    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    for (i, client) in c.iter_mut().enumerate() {
        let node = cluster.ids()[i];
        let stats = cluster_stats(client);
        let num = |name: &str| -> u64 {
            stats
                .get(name)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("node {node}: no numeric {name} in {stats:?}"))
        };
        let partitions = num("partitions");
        assert_eq!(num("node_id"), u64::from(node));
        assert_eq!(num("replicas"), REPLICAS as u64);
        let (mut primary, mut replica) = (0, 0);
        for m in cluster.members() {
            let line = stats
                .get(&format!("member:{}", m.id))
                .unwrap_or_else(|| panic!("node {node}: no member:{} in {stats:?}", m.id));
            let state = line.split_whitespace().next().unwrap_or_default();
            let want = if m.id == node { "self" } else { "up" };
            assert_eq!(state, want, "node {node}: member:{} {line}", m.id);
            let fields = member_fields(line);
            assert_eq!(fields.get("client"), Some(&m.client.to_string()), "{line}");
            assert_eq!(fields.get("peer"), Some(&m.peer.to_string()), "{line}");
            let field = |f: &str| -> u64 {
                fields
                    .get(f)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{line}"))
            };
            assert!(field("primary_partitions") > 0, "node {node}: {line}");
            primary += field("primary_partitions");
            replica += field("replica_partitions");
        }
        assert_eq!(
            primary, partitions,
            "node {node}: primary partitions of all members"
        );
        assert_eq!(
            replica,
            partitions * (REPLICAS as u64 - 1),
            "node {node}: replica partitions of all members"
        );
        for name in [
            "forwarded",
            "primary_writes",
            "replica_writes_sent",
            "replica_writes_applied",
            "write_quorum_failures",
            "read_quorum_failures",
            "timeouts",
        ] {
            *totals.entry(name).or_default() += num(name);
        }

        // curr_items counts exactly the keys this node holds.
        let held = keys.iter().filter(|k| holds(client, k)).count();
        let plain = parse_stats(&client.ask(b"stats\r\n"));
        assert_eq!(
            plain.get("curr_items").map(String::as_str),
            Some(held.to_string().as_str()),
            "node {node}: curr_items vs keys held (me)"
        );
    }
    println!("stats cluster totals: {totals:?}");
    let n = KEYS as u64;
    assert!((1..=n).contains(&totals["forwarded"]), "{totals:?}");
    // Every set ran once on its primary and was copied to the one other replica.
    assert_eq!(totals["primary_writes"], n, "{totals:?}");
    assert_eq!(
        totals["replica_writes_sent"],
        n * (REPLICAS as u64 - 1),
        "{totals:?}"
    );
    assert_eq!(
        totals["replica_writes_applied"],
        n * (REPLICAS as u64 - 1),
        "{totals:?}"
    );
    for name in ["write_quorum_failures", "read_quorum_failures", "timeouts"] {
        assert_eq!(totals[name], 0, "{name} in a healthy cluster: {totals:?}");
    }
    // Every key is on exactly N nodes.
    for key in &keys {
        let holders = c
            .iter_mut()
            .map(|client| holds(client, key))
            .filter(|&h| h)
            .count();
        assert_eq!(holders, REPLICAS, "{key}");
    }
}

#[test]
fn real_clients_pass_against_every_node() {
    let _serial = exclusive();
    let cluster = Cluster::start(Layout::new(3));
    for m in cluster.members() {
        let target = format!("cluster node {} ({})", m.id, m.client);
        let out = run_memccapable(m.client.port());
        assert_memccapable_passed(&target, &out);
        let out = run_pymemcache("127.0.0.1", m.client.port());
        assert_pymemcache_passed(&target, &out);
    }
}

/// A delete acknowledged at W=2 stays deleted when the third replica, which
/// missed it (paused, as behind a partition), comes back with the old item.
/// R + W > N promises that reads see the delete.
#[test]
fn acknowledged_delete_survives_a_replica_that_missed_it() {
    let _serial = exclusive();
    // Without hints or anti-entropy, which could hand the tombstone to node
    // 3 before the reads: only the quorum read may hide the old item.
    let mut cluster = Cluster::start(
        Layout::new(3)
            .quorums(2, 2)
            .request_timeout_ms(300)
            .no_hints()
            .no_anti_entropy(),
    );
    let mut c1 = cluster.connect(1);
    let mut c2 = cluster.connect(2);
    assert_eq!(c1.ask(b"ms gone 3 Pw3\r\nold\r\n"), "HD\r\n");
    let mut c3 = cluster.connect(3);
    assert!(holds(&mut c3, "gone"), "Pw3: node 3 holds the item");
    drop(c3);

    cluster.pause(3);
    for via in [1, 2] {
        cluster.wait_member_state(via, 3, |s| s.starts_with("down"));
    }
    assert_eq!(c1.ask(b"delete gone\r\n"), "DELETED\r\n");
    assert!(!holds(&mut c1, "gone") && !holds(&mut c2, "gone"));
    cluster.resume(3);
    cluster.wait_ready();

    let mut c3 = cluster.connect(3);
    let reads: Vec<(NodeId, Option<String>)> = [(1, &mut c1), (2, &mut c2), (3, &mut c3)]
        .into_iter()
        .map(|(node, c)| (node, get(c, "gone")))
        .collect();
    let add = c1.ask(b"add gone 0 0 3\r\nnew\r\n");
    assert!(
        reads.iter().all(|(_, v)| v.is_none()) && add == "STORED\r\n",
        "after `delete gone` answered DELETED (W=2, node 3 paused and known down), node 3 resumed: \
         get gone through nodes 1, 2, 3 gave {reads:?} (want all misses); `add gone` gave {add:?} (want STORED)"
    );
}

/// A delete answered DELETED is seen by the next command through any node,
/// also while the third replica is still applying it in the background
/// (W=2 of N=3): `add` after `delete` stores. Repeated, since the window is
/// a race between the background copy and the next command.
#[test]
fn delete_is_seen_by_the_next_write_through_any_node() {
    const ROUNDS: usize = 2000;
    let _serial = exclusive();
    let cluster = Cluster::start(Layout::new(3));
    let mut c = connect_all(&cluster);
    let mut wrong = Vec::new();
    for i in 0..ROUNDS {
        let key = format!("d{}", i % 7);
        let via = i % c.len();
        let (next, third) = ((via + 1) % c.len(), (via + 2) % c.len());
        let set = set_request("set", &key, 0, &format!("v{i}"));
        assert_eq!(c[via].ask(&set), "STORED\r\n", "round {i}");
        let delete = format!("delete {key}\r\n");
        assert_eq!(c[next].ask(delete.as_bytes()), "DELETED\r\n", "round {i}");
        let add = c[third].ask(&set_request("add", &key, 0, "new"));
        if add != "STORED\r\n" {
            wrong.push(format!(
                "round {i}: set {key} via node {}, delete via node {} (DELETED), add via node {}: {add:?}",
                via + 1,
                next + 1,
                third + 1
            ));
        }
        // Start the next round from a missing key whatever add did.
        let reply = c[via].ask(delete.as_bytes());
        assert!(
            reply == "DELETED\r\n" || reply == "NOT_FOUND\r\n",
            "round {i}: {reply:?}"
        );
    }
    assert!(
        wrong.is_empty(),
        "{} of {ROUNDS} adds right after an acknowledged delete did not store, e.g. {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// flush_all answered OK leaves nothing that was stored before it, also
/// while the third copy of a W=2 write is still on its way. Repeated, since
/// the window is a race between that copy and the flush.
#[test]
fn flush_all_is_seen_by_the_next_read_through_any_node() {
    const ROUNDS: usize = 1000;
    let _serial = exclusive();
    let cluster = Cluster::start(Layout::new(3));
    let mut c = connect_all(&cluster);
    let mut wrong = Vec::new();
    for i in 0..ROUNDS {
        let key = format!("f{}", i % 7);
        let via = i % c.len();
        let (next, third) = ((via + 1) % c.len(), (via + 2) % c.len());
        let set = set_request("set", &key, 0, &format!("v{i}"));
        assert_eq!(c[via].ask(&set), "STORED\r\n", "round {i}");
        assert_eq!(c[next].ask(b"flush_all\r\n"), "OK\r\n", "round {i}");
        if let Some(value) = get(&mut c[third], &key) {
            wrong.push(format!(
                "round {i}: set {key} via node {}, flush_all via node {} (OK), get via node {}: {value:?}",
                via + 1,
                next + 1,
                third + 1
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {ROUNDS} reads right after an acknowledged flush_all found an item stored before it, e.g. {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// Read repair: a node restarted empty gets each key back the first time a
/// quorum read through it sees the other replicas hold a newer copy; a read
/// elsewhere repairs it too, in the background.
#[test]
fn read_repair_refills_a_node_restarted_empty() {
    const KEYS: usize = 50;
    let _serial = exclusive();
    // Without the start-up refill or anti-entropy, so only reads can bring
    // keys back.
    let mut cluster = Cluster::start(Layout::new(3).no_refill().no_anti_entropy());
    let mut c1 = cluster.connect(1);
    for i in 0..KEYS {
        let reply = c1.ask(&set_request("set", &format!("rr{i}"), 0, &format!("v{i}")));
        assert_eq!(reply, "STORED\r\n", "key rr{i}");
    }
    cluster.kill(3);
    cluster.restart(3);
    let mut c3 = cluster.connect(3);
    assert!(
        (0..KEYS).all(|i| !holds(&mut c3, &format!("rr{i}"))),
        "a restarted node starts empty"
    );
    // Reads through node 3 at R=2: its own empty answer is stale.
    for i in 0..KEYS / 2 {
        assert_eq!(
            get(&mut c3, &format!("rr{i}")).as_deref(),
            Some(format!("v{i}").as_str())
        );
        assert!(
            holds(&mut c3, &format!("rr{i}")),
            "rr{i} repaired on node 3 by its own read"
        );
    }
    // Reads through node 2: node 3 is repaired in the background when it is
    // one of the replicas asked; wait (bounded) for every such key.
    let mut c2 = cluster.connect(2);
    for i in KEYS / 2..KEYS {
        // Ask with R=3 so node 3 is certainly among the replicas read.
        let reply = c2.ask(format!("mg rr{i} v Pr3\r\n").as_bytes());
        assert!(
            reply.starts_with("VA "),
            "mg rr{i} v Pr3 through node 2: {reply:?}"
        );
    }
    let keys: Vec<String> = (KEYS / 2..KEYS).map(|i| format!("rr{i}")).collect();
    let missing = wait_until_held(&mut c3, &keys, Duration::from_secs(5));
    assert!(missing.is_empty(), "not repaired on node 3: {missing:?}");
    let repairs = summed_stat(&cluster, &[1, 2, 3], "read_repairs");
    assert!(
        repairs >= KEYS as u64,
        "read_repairs summed over nodes: {repairs}"
    );
}

/// The preferred primary of `key` on members 1..=nodes (default 1024
/// partitions), from the library's own ring.
fn primary_of(key: &str, nodes: u16, replicas: usize) -> u16 {
    preference_of(key, nodes, replicas)[0]
}

/// A primary that was paused while its key was rewritten elsewhere catches
/// up before a read-modify-write: the acknowledged value is not lost.
#[test]
fn a_primary_that_missed_writes_catches_up_before_incr() {
    let _serial = exclusive();
    // Without hints or anti-entropy, which could hand the missed write to
    // the primary before the incr: only its catch-up read may find it.
    let mut cluster = Cluster::start(
        Layout::new(3)
            .request_timeout_ms(300)
            .no_hints()
            .no_anti_entropy(),
    );
    let key = "counter";
    let primary = primary_of(key, 3, 3);
    let other = if primary == 1 { 2 } else { 1 };
    let mut c = cluster.connect(other);
    assert_eq!(c.ask(&set_request("set", key, 0, "1")), "STORED\r\n");
    cluster.pause(primary);
    cluster.wait_member_state(other, primary, |s| s.starts_with("down"));
    assert_eq!(c.ask(&set_request("set", key, 0, "5")), "STORED\r\n");
    cluster.resume(primary);
    cluster.wait_member_state(other, primary, |s| s == "up");
    let mut p = cluster.connect(primary);
    assert_eq!(p.ask(format!("incr {key} 1\r\n").as_bytes()), "6\r\n");
    for id in [1, 2, 3] {
        assert_eq!(
            get(&mut cluster.connect(id), key).as_deref(),
            Some("6"),
            "node {id}"
        );
    }
}

/// gat replicates its touch: every replica holds the new expiry.
#[test]
fn gat_replicates_the_new_expiry() {
    let _serial = exclusive();
    let cluster = Cluster::start(Layout::new(3));
    let mut c1 = cluster.connect(1);
    assert_eq!(c1.ask(&set_request("set", "g", 0, "v")), "STORED\r\n");
    let reply = c1.ask(b"gat 100 g\r\n");
    assert_eq!(reply, "VALUE g 0 1\r\nv\r\nEND\r\n");
    for id in [1, 2, 3] {
        let mut c = cluster.connect(id);
        let reply = c.ask(b"mg g t\r\n");
        let ttl: i64 = reply
            .trim_end()
            .strip_prefix("HD t")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("node {id}: mg g t answered {reply:?}"));
        assert!((98..=100).contains(&ttl), "node {id}: ttl {ttl}");
    }
}

/// A gat that fails leaves the replies to earlier pipelined requests alone.
#[test]
fn a_failed_gat_keeps_earlier_pipelined_replies() {
    let _serial = exclusive();
    let mut cluster = Cluster::start(Layout::new(3).replicas(1).quorums(1, 1));
    let key = (0..)
        .map(|i| format!("only{i}"))
        .find(|k| primary_of(k, 3, 1) == 3)
        .expect("some key lives on node 3");
    cluster.kill(3);
    cluster.wait_member_state(1, 3, |s| s.starts_with("down"));
    let mut c = cluster.connect(1);
    c.send(format!("version\r\nmn\r\ngat 100 {key}\r\nmn\r\n").as_bytes())
        .expect("send");
    let replies: Vec<String> = (0..4)
        .map(|_| {
            let r = c
                .read_reply_until(
                    |b| b.windows(2).position(|w| w == b"\r\n").map(|p| p + 2),
                    Duration::from_secs(5),
                )
                .expect("a reply line");
            String::from_utf8(r).expect("text")
        })
        .collect();
    assert!(replies[0].starts_with("VERSION "), "{replies:?}");
    assert_eq!(replies[1], "MN\r\n", "{replies:?}");
    assert!(replies[2].starts_with("SERVER_ERROR "), "{replies:?}");
    assert_eq!(replies[3], "MN\r\n", "{replies:?}");
}

/// A delete through a primary that restarted empty still deletes.
#[test]
fn delete_through_a_primary_restarted_empty() {
    let _serial = exclusive();
    // Without the start-up refill or anti-entropy, so the primary really is
    // empty when the delete reaches it.
    let mut cluster = Cluster::start(Layout::new(3).no_refill().no_anti_entropy());
    let key = "doomed";
    let primary = primary_of(key, 3, 3);
    let mut c = cluster.connect(if primary == 1 { 2 } else { 1 });
    assert_eq!(c.ask(&set_request("set", key, 0, "old")), "STORED\r\n");
    cluster.kill(primary);
    cluster.restart(primary);
    let mut p = cluster.connect(primary);
    assert_eq!(p.ask(format!("delete {key}\r\n").as_bytes()), "DELETED\r\n");
    for id in [1, 2, 3] {
        assert_eq!(get(&mut cluster.connect(id), key), None, "node {id}");
    }
}

/// A multi-get whose values add up to more than one node-to-node frame is
/// answered in full: replicas answer byte-bounded pieces.
#[test]
fn multi_get_of_large_values_crosses_frames() {
    let _serial = exclusive();
    let cluster = Cluster::start(Layout::new(3));
    let mut c1 = cluster.connect(1);
    let value = "x".repeat(900_000);
    for i in 0..6 {
        assert_eq!(
            c1.ask(&set_request("set", &format!("big{i}"), 0, &value)),
            "STORED\r\n"
        );
    }
    let mut c2 = cluster.connect(2);
    let reply = c2.ask(b"get big0 big1 big2 big3 big4 big5 big0\r\n");
    let values = reply.matches("VALUE big").count();
    assert_eq!(
        values,
        7,
        "reply starts {:?}",
        &reply[..reply.len().min(120)]
    );
    assert!(reply.ends_with("END\r\n"));
    assert_eq!(
        reply.len(),
        7 * (value.len() + "VALUE big0 0 900000\r\n\r\n".len()) + 5
    );
}

/// Polls (bounded) until the node behind `client` holds every key (`me`);
/// returns the keys still missing at the deadline.
fn wait_until_held(client: &mut Client, keys: &[String], within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let missing: Vec<String> = keys.iter().filter(|k| !holds(client, k)).cloned().collect();
        if missing.is_empty() || Instant::now() > deadline {
            return missing;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn summed_stat(cluster: &Cluster, ids: &[u16], name: &str) -> u64 {
    ids.iter()
        .map(|&id| stat_u64(&cluster_stats(&mut cluster.connect(id)), name))
        .sum()
}

/// Hinted handoff: writes made while a replica is down are held as hints
/// and handed to it when it is back, even though it restarted empty.
#[test]
fn hints_hand_missed_writes_to_a_restarted_replica() {
    const KEYS: usize = 100;
    let _serial = exclusive();
    // Without the start-up refill or anti-entropy, so only hints can bring
    // the keys.
    let mut cluster = Cluster::start(Layout::new(3).no_refill().no_anti_entropy());
    cluster.kill(3);
    cluster.wait_member_state(1, 3, |s| s.starts_with("down"));
    cluster.wait_member_state(2, 3, |s| s.starts_with("down"));
    let mut c1 = cluster.connect(1);
    for i in 0..KEYS {
        let reply = c1.ask(&set_request("set", &format!("h{i}"), 0, &format!("v{i}")));
        assert_eq!(reply, "STORED\r\n", "h{i}");
    }
    assert!(summed_stat(&cluster, &[1, 2], "hints_pending") >= KEYS as u64);
    cluster.restart(3);
    let mut c3 = cluster.connect(3);
    let keys: Vec<String> = (0..KEYS).map(|i| format!("h{i}")).collect();
    let missing = wait_until_held(&mut c3, &keys, Duration::from_secs(10));
    assert!(missing.is_empty(), "not handed to node 3: {missing:?}");
    assert!(summed_stat(&cluster, &[1, 2], "hints_delivered") >= KEYS as u64);
    assert_eq!(summed_stat(&cluster, &[1, 2], "hints_pending"), 0);
}

/// With a replica down, W=3 fails under a strict quorum and succeeds under
/// a sloppy one (the hint counts).
#[test]
fn sloppy_quorum_counts_hints_toward_w() {
    let _serial = exclusive();
    for sloppy in [false, true] {
        let layout = Layout::new(3).quorums(2, 3);
        let layout = if sloppy {
            layout.sloppy_quorum()
        } else {
            layout
        };
        let mut cluster = Cluster::start(layout);
        cluster.kill(3);
        cluster.wait_member_state(1, 3, |s| s.starts_with("down"));
        cluster.wait_member_state(2, 3, |s| s.starts_with("down"));
        let mut c1 = cluster.connect(1);
        let reply = c1.ask(&set_request("set", "sq", 0, "v"));
        if sloppy {
            assert_eq!(reply, "STORED\r\n");
        } else {
            assert!(
                reply.starts_with("SERVER_ERROR write quorum not met"),
                "{reply:?}"
            );
            assert!(reply.contains("hinted to node"), "{reply:?}");
        }
    }
}

/// A node restarted empty refills itself from its peers while it serves:
/// keys written before it went down come back without being read, deleted
/// ones stay deleted.
#[test]
fn a_node_restarted_empty_refills_from_its_peers() {
    const KEYS: usize = 2000;
    const DELETED: usize = 100;
    let _serial = exclusive();
    // Without anti-entropy, so only the refill can bring the keys.
    let mut cluster = Cluster::start(Layout::new(3).no_anti_entropy());
    let mut c1 = cluster.connect(1);
    for i in 0..KEYS {
        let reply = c1.ask(&set_request("set", &format!("f{i}"), 0, &format!("v{i}")));
        assert_eq!(reply, "STORED\r\n", "f{i}");
    }
    for i in 0..DELETED {
        assert_eq!(c1.ask(format!("delete f{i}\r\n").as_bytes()), "DELETED\r\n");
    }
    cluster.kill(3);
    cluster.restart(3);
    let mut c3 = cluster.connect(3);
    let deadline = Instant::now() + Duration::from_secs(20);
    let items = loop {
        let stats = parse_stats(&c3.ask(b"stats\r\n"));
        let items: usize = stats["curr_items"].parse().expect("number");
        if items >= KEYS - DELETED || Instant::now() > deadline {
            break items;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(items, KEYS - DELETED, "node 3 after its refill");
    let live: Vec<String> = (DELETED..KEYS).map(|i| format!("f{i}")).collect();
    assert!(wait_until_held(&mut c3, &live, Duration::ZERO).is_empty());
    for i in 0..DELETED {
        assert!(!holds(&mut c3, &format!("f{i}")), "deleted f{i} came back");
        assert_eq!(get(&mut c3, &format!("f{i}")), None, "deleted f{i}");
    }
    assert!(summed_stat(&cluster, &[3], "refill_keys") >= (KEYS - DELETED) as u64);
    // Every partition's replicas hold the same (key, version) set,
    // tombstones included: `stats partitions` agrees on all three nodes.
    let digests = |id: u16| cluster.connect(id).ask(b"stats partitions\r\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (d1, d2, d3) = (digests(1), digests(2), digests(3));
        assert_eq!(
            d1.matches("STAT partition:").count(),
            1024,
            "{}",
            &d1[..200]
        );
        if d1 == d2 && d2 == d3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partition digests differ after the refill"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Requests sent at once when pipelining. A batch's requests (and their
/// replies) fit in the socket buffers, so sending a whole batch before
/// reading any reply never leaves both sides blocked on a full buffer.
const PIPELINE_BATCH: usize = 500;

/// Sends `requests` (none `noreply`) pipelined, [`PIPELINE_BATCH`] at a
/// time, and returns their replies in order, each read within
/// `REPLY_TIMEOUT`.
///
/// # Panics
/// On a send or read failure.
fn pipelined(client: &mut Client, requests: &[Vec<u8>]) -> Vec<String> {
    let mut replies = Vec::with_capacity(requests.len());
    for batch in requests.chunks(PIPELINE_BATCH) {
        client
            .send(&batch.concat())
            .unwrap_or_else(|e| panic!("send a batch of {} requests: {e}", batch.len()));
        for request in batch {
            let reply = client
                .read_reply_until(one_reply_len, REPLY_TIMEOUT)
                .unwrap_or_else(|e| panic!("pipelined reply to \"{}\": {e}", escape(request)));
            replies.push(String::from_utf8_lossy(&reply).into_owned());
        }
    }
    replies
}

/// The `i`-th key and value of the anti-entropy tests.
fn ae_key(i: usize) -> String {
    format!("ae:{i}")
}

/// About 60 bytes, different for every key.
fn ae_value(i: usize) -> String {
    format!("value-{i:08}-{}", "x".repeat(40))
}

/// Sets `ae_key(i)` = `ae_value(i)` for every `i` in `range`, pipelined and
/// spread over `clients` batch by batch; asserts each is acknowledged.
fn set_ae_keys(clients: &mut [Client], range: std::ops::Range<usize>) {
    let requests: Vec<Vec<u8>> = range
        .clone()
        .map(|i| set_request("set", &ae_key(i), 0, &ae_value(i)))
        .collect();
    let mut failed = Vec::new();
    for (n, batch) in requests.chunks(PIPELINE_BATCH).enumerate() {
        let client = &mut clients[n % clients.len()];
        for (j, reply) in pipelined(client, batch).into_iter().enumerate() {
            if reply != "STORED\r\n" {
                failed.push((ae_key(range.start + n * PIPELINE_BATCH + j), reply));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} sets not acknowledged, e.g. {:?}",
        failed.len(),
        range.len(),
        &failed[..failed.len().min(5)]
    );
}

/// A numeric field of a stats map.
fn stat_u64(stats: &BTreeMap<String, String>, name: &str) -> u64 {
    stats
        .get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {name} in {stats:?}"))
}

/// A numeric field of node `id`'s plain `stats`.
fn plain_stat(cluster: &Cluster, id: NodeId, name: &str) -> u64 {
    stat_u64(&parse_stats(&cluster.connect(id).ask(b"stats\r\n")), name)
}

/// The anti-entropy, refill and hint counters of every running node, for
/// the log.
fn repair_counters(cluster: &Cluster) -> String {
    let names = [
        "anti_entropy_rounds",
        "anti_entropy_partitions_differing",
        "anti_entropy_keys_listed",
        "anti_entropy_keys_pulled",
        "anti_entropy_keys_pushed",
        "anti_entropy_bytes",
        "anti_entropy_no_room",
        "anti_entropy_errors",
        "read_repairs",
        "refill_keys",
        "hints_stored",
        "hints_delivered",
    ];
    let mut out = String::new();
    for id in cluster.running_ids() {
        let stats = cluster_stats(&mut cluster.connect(id));
        let fields: Vec<String> = names
            .iter()
            .map(|n| format!("{}={}", n, stats.get(*n).map_or("?", String::as_str)))
            .collect();
        out.push_str(&format!("node {id}: {}\n", fields.join(" ")));
    }
    out
}

/// The sum of the `keys=` counts of node `id`'s partitions.
fn keys_in_partitions(lines: &BTreeMap<NodeId, BTreeMap<u32, String>>, id: NodeId) -> u64 {
    lines[&id].values().map(|l| partition_keys(l)).sum()
}

/// Asserts node `id` holds `ae_key(i)` for every `i` in `range` in its own
/// memory (`me`), and reads the right value of every 50th of them with
/// `mg <key> v Pr1` through it.
fn assert_node_holds_ae_keys(cluster: &Cluster, id: NodeId, range: std::ops::Range<usize>) {
    let mut c = cluster.connect(id);
    let requests: Vec<Vec<u8>> = range
        .clone()
        .map(|i| format!("me {}\r\n", ae_key(i)).into_bytes())
        .collect();
    let missing: Vec<String> = range
        .clone()
        .zip(pipelined(&mut c, &requests))
        .filter(|(_, reply)| !reply.starts_with("ME "))
        .map(|(i, reply)| format!("{}: {reply:?}", ae_key(i)))
        .collect();
    assert!(
        missing.is_empty(),
        "node {id} lacks {} of {} keys, e.g. {:?}",
        missing.len(),
        range.len(),
        &missing[..missing.len().min(5)]
    );
    let sample: Vec<usize> = range.step_by(50).collect();
    let requests: Vec<Vec<u8>> = sample
        .iter()
        .map(|&i| format!("mg {} v Pr1\r\n", ae_key(i)).into_bytes())
        .collect();
    for (&i, reply) in sample.iter().zip(pipelined(&mut c, &requests)) {
        let value = ae_value(i);
        assert_eq!(
            reply,
            format!("VA {}\r\n{value}\r\n", value.len()),
            "mg {} v Pr1 through node {id}",
            ae_key(i)
        );
    }
}

/// Keys written while the anti-entropy tests' node 3 is down.
const AE_KEYS: usize = 50_000;
/// Bound on the convergence after node 3 restarts empty: at the default
/// 10,000 keys per round and one round a second, 50,000 keys take a few
/// cycles of 4 s.
const AE_CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Kills node 3 of a 3-node N=3 cluster, writes [`AE_KEYS`] keys through
/// nodes 1 and 2 (every write acknowledged at W=2), restarts node 3 empty
/// and waits until every partition's replicas agree; prints how long that
/// took. Then checks node 3 holds every key.
fn converge_a_node_killed_and_restarted_empty(cluster: &mut Cluster, test: &str) {
    cluster.kill(3);
    for via in [1, 2] {
        cluster.wait_member_state(via, 3, |s| s.starts_with("down"));
    }
    let mut writers = vec![cluster.connect(1), cluster.connect(2)];
    let started = Instant::now();
    set_ae_keys(&mut writers, 0..AE_KEYS);
    eprintln!(
        "{test}: {AE_KEYS} sets acknowledged through nodes 1 and 2 in {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    cluster.restart(3);
    let restarted = started.elapsed();
    let (converged, lines) = cluster.wait_partitions_agree(AE_CONVERGE_TIMEOUT);
    eprintln!(
        "{test}: node 3 restarted (seen up by all) in {restarted:?}; every partition agreed \
         on all 3 nodes {converged:?} later ({:?} from the restart)\n{}",
        restarted + converged,
        repair_counters(cluster)
    );
    for id in [1, 2, 3] {
        assert_eq!(
            lines[&id].len(),
            1024,
            "node {id} replicates every partition (N=3 of 3)"
        );
        assert_eq!(
            keys_in_partitions(&lines, id),
            AE_KEYS as u64,
            "entries on node {id} once the replicas agree"
        );
    }
    assert_node_holds_ae_keys(cluster, 3, 0..AE_KEYS);
}

/// Anti-entropy alone repairs a replica that lost everything: with the
/// start-up refill and hinted handoff off, and no reads, a node killed with
/// SIGKILL while 50,000 keys were written and restarted empty ends up with
/// every key at the version the others hold, in every partition.
#[test]
fn anti_entropy_converges_a_node_killed_and_restarted_empty() {
    let _serial = exclusive();
    let mut cluster = Cluster::start(
        Layout::new(3)
            .replicas(3)
            .quorums(2, 2)
            .no_refill()
            .no_hints(),
    );
    converge_a_node_killed_and_restarted_empty(
        &mut cluster,
        "anti_entropy_converges_a_node_killed_and_restarted_empty",
    );
    let moved = summed_stat(&cluster, &[1, 2, 3], "anti_entropy_keys_pushed")
        + summed_stat(&cluster, &[1, 2, 3], "anti_entropy_keys_pulled");
    assert!(
        moved >= AE_KEYS as u64,
        "anti-entropy moved {moved} keys; node 3 lacked {AE_KEYS}\n{}",
        repair_counters(&cluster)
    );
    // Nothing else did the work.
    assert_eq!(summed_stat(&cluster, &[3], "refill_keys"), 0);
    assert_eq!(summed_stat(&cluster, &[1, 2, 3], "hints_delivered"), 0);
    assert_eq!(summed_stat(&cluster, &[1, 2, 3], "read_repairs"), 0);
}

/// With the default settings (refill, hints and anti-entropy all on) a node
/// killed while 50,000 keys were written and restarted empty converges:
/// every partition's replicas agree. The time printed is the README's
/// figure for 50,000 keys.
#[test]
fn default_settings_converge_a_node_killed_and_restarted_empty() {
    let _serial = exclusive();
    let mut cluster = Cluster::start(Layout::new(3));
    converge_a_node_killed_and_restarted_empty(
        &mut cluster,
        "default_settings_converge_a_node_killed_and_restarted_empty",
    );
}

/// Reads every `ae_key(i)` for `i` in `0..keys` through every running node
/// with `mg <key> v Pr1` and `Pr3`; returns what disagrees with "the first
/// `deleted` keys are gone, the rest hold their value".
fn wrong_reads_after_deletes(cluster: &Cluster, keys: usize, deleted: usize) -> Vec<String> {
    let mut wrong = Vec::new();
    for id in cluster.running_ids() {
        let mut c = cluster.connect(id);
        for r in [1, 3] {
            let requests: Vec<Vec<u8>> = (0..keys)
                .map(|i| format!("mg {} v Pr{r}\r\n", ae_key(i)).into_bytes())
                .collect();
            for (i, reply) in pipelined(&mut c, &requests).into_iter().enumerate() {
                let want = if i < deleted {
                    "EN\r\n".to_string()
                } else {
                    let value = ae_value(i);
                    format!("VA {}\r\n{value}\r\n", value.len())
                };
                if reply != want {
                    wrong.push(format!(
                        "mg {} v Pr{r} through node {id}: {reply:?}, want {want:?}",
                        ae_key(i)
                    ));
                }
            }
        }
        let requests: Vec<Vec<u8>> = (0..deleted)
            .map(|i| format!("me {}\r\n", ae_key(i)).into_bytes())
            .collect();
        for (i, reply) in pipelined(&mut c, &requests).into_iter().enumerate() {
            if reply != "EN\r\n" {
                wrong.push(format!("me {} on node {id}: {reply:?}", ae_key(i)));
            }
        }
    }
    wrong
}

/// Deletes acknowledged while a replica is cut off (paused: it keeps the old
/// items) reach it through anti-entropy alone (no hints), as tombstones that
/// outrank its older copies; and once the tombstones' grace has passed and
/// they are gone everywhere, no deleted key comes back, through any node,
/// at R=1 or R=3, however many anti-entropy rounds run.
#[test]
fn deletes_while_a_replica_is_down_never_come_back() {
    const KEYS: usize = 2000;
    const DELETED: usize = 500;
    const GRACE_SECS: u64 = 4;
    let test = "deletes_while_a_replica_is_down_never_come_back";
    let _serial = exclusive();
    // A cycle is one round of 0.2 s, counted as 1 s: 1 s of hint window
    // plus 1 s of cycle is below the 4 s grace, so the nodes accept it.
    let mut cluster = Cluster::start(
        Layout::new(3)
            .replicas(3)
            .quorums(2, 2)
            .request_timeout_ms(300)
            .no_hints()
            .hint_window_secs(1)
            .anti_entropy_interval_ms(200)
            .anti_entropy_partitions_per_round(1024)
            .tombstone_grace_secs(GRACE_SECS),
    );
    let mut c1 = cluster.connect(1);
    set_ae_keys(std::slice::from_mut(&mut c1), 0..KEYS);
    // Every replica holds every key before node 3 is cut off.
    let (took, lines) = cluster.wait_partitions_agree(CONVERGE_TIMEOUT);
    eprintln!("{test}: {KEYS} keys on all 3 nodes {took:?} after the last set");
    for id in [1, 2, 3] {
        assert_eq!(keys_in_partitions(&lines, id), KEYS as u64, "node {id}");
    }

    cluster.pause(3);
    for via in [1, 2] {
        cluster.wait_member_state(via, 3, |s| s.starts_with("down"));
    }
    let deletes_started = Instant::now();
    let requests: Vec<Vec<u8>> = (0..DELETED)
        .map(|i| format!("delete {}\r\n", ae_key(i)).into_bytes())
        .collect();
    let replies = pipelined(&mut c1, &requests);
    let deleting = deletes_started.elapsed();
    let refused: Vec<(usize, &String)> = replies
        .iter()
        .enumerate()
        .filter(|(_, r)| *r != "DELETED\r\n")
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {DELETED} deletes with node 3 paused not acknowledged, e.g. {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    cluster.resume(3);
    cluster.wait_ready();
    let resumed = deletes_started.elapsed();
    let (took, lines) = cluster.wait_partitions_agree(Duration::from_secs(10));
    let converged = deletes_started.elapsed();
    eprintln!(
        "{test}: {DELETED} deletes took {deleting:?}; node 3 resumed and seen up {resumed:?} \
         after the first delete; the replicas agreed {took:?} later ({converged:?} after the \
         first delete)\n{}",
        repair_counters(&cluster)
    );
    // Past the grace the tombstones may be gone from nodes 1 and 2 before
    // node 3 got them: the test's premise, not anti-entropy, would fail.
    // Expiry counts whole seconds, so a tombstone may go up to a second
    // early.
    assert!(
        converged < Duration::from_secs(GRACE_SECS - 1),
        "the replicas agreed {converged:?} after the first delete, too close to the \
         {GRACE_SECS} s grace for the test to mean anything"
    );
    // Node 3 holds tombstones for the deleted keys, not its old items.
    for id in [1, 2, 3] {
        assert_eq!(
            keys_in_partitions(&lines, id),
            KEYS as u64,
            "node {id}: {} live keys and {DELETED} tombstones",
            KEYS - DELETED
        );
        assert_eq!(
            plain_stat(&cluster, id, "curr_items"),
            (KEYS - DELETED) as u64,
            "node {id}"
        );
    }
    let wrong = wrong_reads_after_deletes(&cluster, KEYS, DELETED);
    assert!(
        wrong.is_empty(),
        "{} wrong reads once the replicas agree, e.g. {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    let moved = summed_stat(&cluster, &[1, 2, 3], "anti_entropy_keys_pushed")
        + summed_stat(&cluster, &[1, 2, 3], "anti_entropy_keys_pulled");
    assert!(
        moved >= DELETED as u64,
        "anti-entropy moved {moved} keys; node 3 missed {DELETED} deletes"
    );
    assert_eq!(summed_stat(&cluster, &[1, 2, 3], "hints_stored"), 0);

    // Past the grace every tombstone goes, on every node.
    let deadline = Instant::now() + Duration::from_secs(GRACE_SECS + 15);
    loop {
        let lines = cluster.partition_lines();
        let counts: Vec<u64> = [1, 2, 3]
            .iter()
            .map(|&id| keys_in_partitions(&lines, id))
            .collect();
        if counts.iter().all(|&c| c == (KEYS - DELETED) as u64) {
            eprintln!(
                "{test}: tombstones gone from all 3 nodes {:?} after the first delete",
                deletes_started.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "entries per node {counts:?} {:?} after the first delete; want {} once the \
             tombstones' {GRACE_SECS} s grace has passed\n{}",
            deletes_started.elapsed(),
            KEYS - DELETED,
            repair_counters(&cluster)
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Let anti-entropy run a few more full cycles over the tombstone-free
    // replicas before looking again.
    let rounds = |cluster: &Cluster| summed_stat(cluster, &[1, 2], "anti_entropy_rounds");
    let before = rounds(&cluster);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rounds(&cluster) < before + 10 {
        assert!(
            Instant::now() < deadline,
            "anti-entropy rounds stalled at {}",
            rounds(&cluster)
        );
        thread::sleep(POLL_INTERVAL);
    }
    let (_, lines) = cluster.wait_partitions_agree(CONVERGE_TIMEOUT);
    for id in [1, 2, 3] {
        assert_eq!(
            keys_in_partitions(&lines, id),
            (KEYS - DELETED) as u64,
            "node {id}"
        );
        assert_eq!(
            plain_stat(&cluster, id, "curr_items"),
            (KEYS - DELETED) as u64,
            "node {id}"
        );
    }
    let wrong = wrong_reads_after_deletes(&cluster, KEYS, DELETED);
    assert!(
        wrong.is_empty(),
        "{} wrong reads after the tombstones' grace, e.g. {:#?}\n{}",
        wrong.len(),
        &wrong[..wrong.len().min(10)],
        repair_counters(&cluster)
    );
}

/// Anti-entropy applies into free memory only: on nodes whose memory is full
/// and which evicted different keys, it does not evict to make room for
/// the keys another replica still holds (which would make that replica's
/// copies differ in turn, round after round). After the writes stop, the
/// `evictions` count of every node stays put while anti-entropy runs, and
/// what it could not place is counted as `anti_entropy_no_room`.
#[test]
fn anti_entropy_does_not_fight_eviction() {
    const MEMORY_MB: usize = 8;
    const VALUE_BYTES: usize = 1000;
    /// About what one node holds.
    const FULL: usize = MEMORY_MB * 1024 * 1024 / VALUE_BYTES;
    const ROUNDS: u64 = 10;
    /// Anti-entropy's bandwidth bound, per peer (the default).
    const BYTES_PER_SEC: u64 = 8 * 1024 * 1024;
    /// What one exchange may overdraw its bound by: a message whose size is
    /// known only when it arrives (at most about 1 MiB of states).
    const MESSAGE_DEBT_BYTES: u64 = 2 * 1024 * 1024;
    let test = "anti_entropy_does_not_fight_eviction";
    let _serial = exclusive();
    let cluster = Cluster::start(
        Layout::new(3)
            .replicas(3)
            .quorums(2, 2)
            .memory_limit_mb(MEMORY_MB)
            .anti_entropy_interval_ms(200)
            .anti_entropy_partitions_per_round(1024)
            .arg("--anti-entropy-bytes-per-sec")
            .arg(BYTES_PER_SEC.to_string()),
    );
    let mut clients = connect_all(&cluster);
    let value = "e".repeat(VALUE_BYTES);
    let key = |i: usize| format!("ev:{i}");
    let set_all = |clients: &mut [Client], range: std::ops::Range<usize>| {
        let requests: Vec<Vec<u8>> = range
            .map(|i| set_request("set", &key(i), 0, &value))
            .collect();
        for (n, batch) in requests.chunks(PIPELINE_BATCH).enumerate() {
            let client = &mut clients[n % clients.len()];
            for reply in pipelined(client, batch) {
                assert_eq!(reply, "STORED\r\n");
            }
        }
    };
    let started = Instant::now();
    // Every node sees the same writes and evicts the same keys...
    set_all(&mut clients, 0..FULL * 3 / 2);
    // ...until every other key is read on node 1 alone (R=1 on a node
    // holding every key reads its own memory): those survive its next
    // evictions (SIEVE) and newer ones go in their place, while nodes 2
    // and 3 evict the oldest.
    let requests: Vec<Vec<u8>> = (0..FULL * 3 / 2)
        .step_by(2)
        .map(|i| format!("mg {} Pr1\r\n", key(i)).into_bytes())
        .collect();
    let hits = pipelined(&mut clients[0], &requests)
        .iter()
        .filter(|r| r.starts_with("HD"))
        .count();
    set_all(&mut clients, FULL * 3 / 2..FULL * 2);
    eprintln!(
        "{test}: {} sets of {VALUE_BYTES} bytes into {MEMORY_MB} MiB nodes, {hits} keys read \
         on node 1 in between, in {:?}",
        FULL * 2,
        started.elapsed()
    );
    let evictions = |cluster: &Cluster| -> Vec<u64> {
        [1, 2, 3]
            .iter()
            .map(|&id| plain_stat(cluster, id, "evictions"))
            .collect()
    };
    // Node 1 starts the exchanges with both others.
    let wait_rounds = |cluster: &Cluster, n: u64| {
        let rounds = || summed_stat(cluster, &[1], "anti_entropy_rounds");
        let before = rounds();
        let deadline = Instant::now() + Duration::from_secs(30);
        while rounds() < before + n {
            assert!(Instant::now() < deadline, "anti-entropy rounds stalled");
            thread::sleep(POLL_INTERVAL);
        }
    };
    // Wait out the copies still in flight for the last writes, then count
    // rounds from there.
    wait_rounds(&cluster, 2);
    let ae_bytes = || summed_stat(&cluster, &[1], "anti_entropy_bytes");
    let (first_at, first_bytes) = (Instant::now(), ae_bytes());
    let first = evictions(&cluster);
    let counters_first = repair_counters(&cluster);
    assert!(
        first.iter().all(|&e| e > 0),
        "every node evicted: {first:?}"
    );
    wait_rounds(&cluster, ROUNDS);
    let second = evictions(&cluster);
    // Bytes first: the time then covers at least what they count.
    let sent = ae_bytes() - first_bytes;
    let elapsed = first_at.elapsed();
    let counters_second = repair_counters(&cluster);
    let differing = common::cluster::disagreeing_partitions(&cluster.partition_lines()).len();
    eprintln!(
        "{test}: evictions per node {first:?}, then {second:?} after {ROUNDS} more rounds \
         ({elapsed:?}); {differing} partitions differ between replicas; node 1's anti-entropy \
         moved {sent} bytes meanwhile ({:.1} MiB/s)\n{counters_first}then\n{counters_second}",
        sent as f64 / elapsed.as_secs_f64() / (1024.0 * 1024.0)
    );
    assert_eq!(
        first, second,
        "evictions grew while anti-entropy ran with no client writes\n{counters_second}"
    );
    let no_room = summed_stat(&cluster, &[1, 2, 3], "anti_entropy_no_room");
    assert!(
        no_room > 0,
        "the replicas evicted different keys, so anti-entropy found keys it had no room \
         for\n{counters_second}"
    );
    // However little it achieves, it stays within its bandwidth: per peer
    // (node 1 compares with two), a second's saved-up budget, the rate over
    // the time measured, and one message of debt.
    let budget =
        2 * (BYTES_PER_SEC * (elapsed.as_millis() as u64 + 1000) / 1000 + MESSAGE_DEBT_BYTES);
    assert!(
        sent <= budget,
        "node 1's anti-entropy moved {sent} bytes in {elapsed:?}, over its budget of {budget}"
    );
    for id in [1, 2, 3] {
        let bytes = plain_stat(&cluster, id, "bytes");
        let limit = plain_stat(&cluster, id, "limit_maxbytes");
        assert!(bytes <= limit, "node {id}: bytes {bytes} > limit {limit}");
    }
}
