//! Request ids: black-box tests against real `webvac` processes, raw bytes.
//!
//! A client that sent a mutation and got no reply cannot tell whether it
//! ran. With a request id (`P` token item `i<id>` on `ms`, `md`, `ma`) it
//! may send it again: the mutation is applied at most once and the retry
//! answers what the first attempt answered. These tests lose replies on
//! purpose (read and thrown away, or dropped by the server's fault
//! injection), retry, and check two things a client relies on:
//!
//! ```text
//!   retry's reply   == the first attempt's reply (byte for byte)
//!   key's value     == what ONE application of the mutation gives
//! ```
//!
//! The single-application value is not written down by hand: the tests run
//! each mutation once, without an id, on a control key set up the same way,
//! and show on it that without an id a retry is not safe (an incr counts
//! twice, an add answers `NS`, ...), so a server that ignored ids could not
//! pass.
//!
//! The cluster tests run one at a time (`cluster::exclusive`), like
//! `tests/cluster.rs`.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Cluster, Layout, NodeId, exclusive, parse_stats};
use common::{Client, ReplyErrorKind, Server, escape};

/// Nodes of the cluster tests; with the default N = 3 every node is a replica
/// of every key, so a key's "other" and "third" node are replicas too.
const NODES: u16 = 3;
/// The server's default N, which `preference_of` mirrors.
const REPLICAS: usize = 3;
/// How long a retry after a failover may keep meeting `SERVER_ERROR` (the
/// surviving nodes settling who is primary) before the test fails.
const FAILOVER_RETRY_DEADLINE: Duration = Duration::from_secs(10);
/// Pause between two such retries.
const RETRY_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Candidate keys tried when looking for a key with a given placement.
const KEY_CANDIDATES_MAX: usize = 10_000;

/// The mutations a request id makes safe to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Incr,
    Decr,
    Append,
    Prepend,
    Add,
    Cas,
    Delete,
}

const OPS: [Op; 7] = [
    Op::Incr,
    Op::Decr,
    Op::Append,
    Op::Prepend,
    Op::Add,
    Op::Cas,
    Op::Delete,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Incr => "incr",
            Op::Decr => "decr",
            Op::Append => "append",
            Op::Prepend => "prepend",
            Op::Add => "add",
            Op::Cas => "cas",
            Op::Delete => "delete",
        }
    }

    /// What the key holds before the mutation (`None`: it does not exist).
    fn initial(self) -> Option<&'static str> {
        match self {
            Op::Incr | Op::Decr => Some("10"),
            Op::Append | Op::Prepend => Some("ab"),
            Op::Add => None,
            Op::Cas => Some("old"),
            Op::Delete => Some("v"),
        }
    }

    /// The mutation of `key`, carrying request `id` if given. `cas` is the
    /// key's CAS unique, read before (only the cas op uses it).
    fn command(self, key: &str, id: Option<&str>, cas: Option<u64>) -> Vec<u8> {
        let p = id.map(|id| format!(" Pi{id}")).unwrap_or_default();
        match self {
            Op::Incr => format!("ma {key} v D5{p}\r\n"),
            // memcached rewrites a shrinking number in place, padded with
            // spaces: "10" becomes "7 ".
            Op::Decr => format!("ma {key} v MD D3{p}\r\n"),
            Op::Append => format!("ms {key} 2 MA{p}\r\ncd\r\n"),
            Op::Prepend => format!("ms {key} 2 MP{p}\r\nxy\r\n"),
            Op::Add => format!("ms {key} 1 ME{p}\r\nv\r\n"),
            Op::Cas => {
                let cas = cas.expect("the cas op needs the key's cas unique");
                format!("ms {key} 3 C{cas}{p}\r\nnew\r\n")
            }
            Op::Delete => format!("md {key}{p}\r\n"),
        }
        .into_bytes()
    }

    /// Sets `key` up to the op's initial state through `client` and returns
    /// the mutation to send (for the cas op, with the CAS it now has).
    fn prepare(self, client: &mut Client, key: &str, id: Option<&str>) -> Vec<u8> {
        if let Some(value) = self.initial() {
            let set = format!("set {key} 0 0 {}\r\n{value}\r\n", value.len());
            assert_eq!(client.ask(set.as_bytes()), "STORED\r\n", "set up {key}");
        }
        let cas = (self == Op::Cas).then(|| cas_of(client, key));
        self.command(key, id, cas)
    }

    /// Checks what a second application WITHOUT an id did, given the reply
    /// and value after one application and after two: it must not be what a
    /// single application gives, or the test would prove nothing.
    fn assert_unsafe_twice(self, once: &(String, String), twice: &(String, String)) {
        let what = match self {
            Op::Incr | Op::Decr => "counts twice",
            Op::Append | Op::Prepend => "adds its data twice",
            Op::Add => "answers NS",
            Op::Cas => "answers EX",
            Op::Delete => "answers NF",
        };
        let holds = match self {
            Op::Incr | Op::Decr | Op::Append | Op::Prepend => twice.1 != once.1,
            Op::Add => twice.0 == "NS\r\n",
            Op::Cas => twice.0 == "EX\r\n",
            Op::Delete => twice.0 == "NF\r\n",
        };
        assert!(
            holds,
            "{}: without an id a second application {what}; once {once:?}, twice {twice:?}",
            self.name()
        );
    }
}

/// The CAS unique of `key` from `mg <key> c` (`HD c<cas>`).
fn cas_of(client: &mut Client, key: &str) -> u64 {
    let reply = client.ask(format!("mg {key} c\r\n").as_bytes());
    reply
        .strip_prefix("HD c")
        .and_then(|r| r.strip_suffix("\r\n"))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("mg {key} c answered {reply:?}"))
}

/// `key`'s value as `mg` shows it: `VA <n>\r\n<data>\r\n`, or `EN\r\n`.
fn value_of(client: &mut Client, key: &str, extra_flags: &str) -> String {
    let reply = client.ask(format!("mg {key} v{extra_flags}\r\n").as_bytes());
    assert!(
        reply.starts_with("VA ") || reply == "EN\r\n",
        "mg {key} v{extra_flags} answered {reply:?}"
    );
    reply
}

/// Whether a mutation's reply says it was applied (as a lost reply must
/// have been for the test to mean anything).
fn applied(reply: &str) -> bool {
    reply == "HD\r\n" || reply.starts_with("VA ")
}

/// `STAT request_id_replays` of the node behind `client`.
fn replays(client: &mut Client) -> u64 {
    stat_u64(&client.ask(b"stats\r\n"), "request_id_replays")
}

fn stat_u64(stats_reply: &str, name: &str) -> u64 {
    parse_stats(stats_reply)
        .get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric STAT {name} in {stats_reply:?}"))
}

/// What one application of each op answers and leaves, measured on control
/// keys (no id) through `client`; `read` reads a key's value. Also checks,
/// on the same keys, that a second application without an id is not safe.
fn single_applications(
    client: &mut Client,
    prefix: &str,
    mut read: impl FnMut(&mut Client, &str) -> String,
) -> Vec<(String, String)> {
    OPS.iter()
        .map(|&op| {
            let key = format!("{prefix}-control-{}", op.name());
            let command = op.prepare(client, &key, None);
            let once = (client.ask(&command), read(client, &key));
            let twice = (client.ask(&command), read(client, &key));
            op.assert_unsafe_twice(&once, &twice);
            once
        })
        .collect()
}

/// The key's preference list (primary first), as every node computes it
/// (the server's default partitions and N).
fn preference_of(key: &str) -> Vec<NodeId> {
    common::cluster::preference_of(key, NODES, REPLICAS)
}

/// The key's preferred primary.
fn primary_of(key: &str) -> NodeId {
    preference_of(key)[0]
}

/// The first `{prefix}-{i}` key whose preferred primary is `primary`.
fn key_with_primary(prefix: &str, primary: NodeId) -> String {
    (0..KEY_CANDIDATES_MAX)
        .map(|i| format!("{prefix}-{i}"))
        .find(|k| primary_of(k) == primary)
        .unwrap_or_else(|| panic!("no key {prefix}-0..{KEY_CANDIDATES_MAX} has primary {primary}"))
}

#[test]
fn lost_replies_on_one_node_apply_once() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let once = single_applications(&mut c, "one", |c, k| value_of(c, k, ""));
    let replays_before = replays(&mut c);

    for (&op, (once_reply, once_value)) in OPS.iter().zip(&once) {
        let key = format!("one-{}", op.name());
        let id = format!("req-{}-1", op.name());
        let command = op.prepare(&mut c, &key, Some(&id));
        // The reply "was lost": the client never reads it. The server
        // cannot tell this from a reply lost on the wire.
        let lost = c.ask(&command);
        // A client that lost a reply retries on a fresh connection.
        let mut retry_conn = server.connect();
        let retry = retry_conn.ask(&command);
        assert_eq!(
            retry,
            lost,
            "{}: the retry of {:?} answers what the first attempt answered",
            op.name(),
            escape(&command)
        );
        assert_eq!(
            &lost,
            once_reply,
            "{}: an id does not change the first reply",
            op.name()
        );
        assert_eq!(
            &value_of(&mut c, &key, ""),
            once_value,
            "{}: {key} holds what one application gives",
            op.name()
        );
    }
    assert_eq!(
        replays(&mut c) - replays_before,
        OPS.len() as u64,
        "each retry is counted as a replay"
    );

    // A delete's retry that arrives after the key was written again by a
    // plain set answers HD and deletes nothing: the delete already ran.
    let key = "one-delete-recreated";
    assert_eq!(
        c.ask(format!("set {key} 0 0 1\r\nv\r\n").as_bytes()),
        "STORED\r\n"
    );
    let delete = format!("md {key} Pireq-delete-recreated\r\n");
    assert_eq!(c.ask(delete.as_bytes()), "HD\r\n", "the first delete");
    assert_eq!(value_of(&mut c, key, ""), "EN\r\n");
    assert_eq!(
        c.ask(format!("set {key} 0 0 3\r\nnew\r\n").as_bytes()),
        "STORED\r\n"
    );
    assert_eq!(c.ask(delete.as_bytes()), "HD\r\n", "the delete's retry");
    assert_eq!(
        value_of(&mut c, key, ""),
        "VA 3\r\nnew\r\n",
        "a delete's retry must not delete the value written after the delete"
    );
}

#[test]
fn a_retry_through_another_node_applies_once() {
    let _serial = exclusive();
    let cluster = Cluster::start(Layout::new(usize::from(NODES)));
    let mut clients: Vec<Client> = (1..=NODES).map(|id| cluster.connect(id)).collect();
    // Reads ask every replica, so a replica the write did not wait for
    // cannot hide a second application (or a missing first one).
    let read_all = |c: &mut Client, k: &str| value_of(c, k, " Pr3");
    let once = single_applications(&mut clients[0], "other", read_all);

    for (&op, (once_reply, once_value)) in OPS.iter().zip(&once) {
        let key = format!("other-{}", op.name());
        let primary = primary_of(&key);
        let first = (1..=NODES).find(|&n| n != primary).expect("3 nodes");
        let third = (1..=NODES)
            .find(|&n| n != primary && n != first)
            .expect("3 nodes");
        let id = format!("req-{}-2", op.name());
        let at = |n: NodeId| usize::from(n - 1);
        let command = op.prepare(&mut clients[at(first)], &key, Some(&id));
        let lost = clients[at(first)].ask(&command);
        assert!(
            applied(&lost),
            "{}: the first attempt through node {first} answered {lost:?}",
            op.name()
        );
        let retry = clients[at(third)].ask(&command);
        assert_eq!(
            retry,
            lost,
            "{}: {key} (primary {primary}) first sent to node {first}, retried through \
             node {third}: the retry answers what the first attempt answered",
            op.name()
        );
        assert_eq!(&lost, once_reply, "{}: the first reply", op.name());
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(
                &read_all(c, &key),
                once_value,
                "{}: {key} read through node {} holds what one application gives",
                op.name(),
                i + 1
            );
        }
    }

    // A delete sent to one node, the key written again by a plain set
    // through another, the delete's retry through the third: it answers HD
    // and the new value stays.
    let key = "other-delete-recreated";
    assert_eq!(
        clients[0].ask(format!("set {key} 0 0 1\r\nv\r\n").as_bytes()),
        "STORED\r\n"
    );
    let delete = format!("md {key} Pireq-delete-recreated-2\r\n");
    assert_eq!(clients[0].ask(delete.as_bytes()), "HD\r\n");
    assert_eq!(
        clients[1].ask(format!("set {key} 0 0 3\r\nnew\r\n").as_bytes()),
        "STORED\r\n"
    );
    assert_eq!(
        clients[2].ask(delete.as_bytes()),
        "HD\r\n",
        "the delete's retry"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            read_all(c, key),
            "VA 3\r\nnew\r\n",
            "{key} through node {}: a delete's retry must not delete the value written after it",
            i + 1
        );
    }
}

#[test]
fn a_retry_after_the_primary_failed_over_applies_once() {
    let _serial = exclusive();
    let mut cluster = Cluster::start(Layout::new(usize::from(NODES)).request_timeout_ms(300));
    let (doomed, coordinator, survivor): (NodeId, NodeId, NodeId) = (1, 2, 3);
    let mut c2 = cluster.connect(coordinator);
    let once = single_applications(&mut c2, "failover", |c, k| value_of(c, k, ""));

    // Every key's preferred primary is the node that will be killed.
    let mut pending = Vec::new();
    for &op in &OPS {
        let key = key_with_primary(&format!("failover-{}", op.name()), doomed);
        let id = format!("req-{}-3", op.name());
        let command = op.prepare(&mut c2, &key, Some(&id));
        let lost = c2.ask(&command);
        // Only an acknowledged write reached W replicas; a retry of one
        // that did not may legitimately apply it.
        assert!(
            applied(&lost),
            "{}: the first attempt through node {coordinator} answered {lost:?}",
            op.name()
        );
        pending.push((op, key, command, lost));
    }

    cluster.kill(doomed);
    for observer in [coordinator, survivor] {
        cluster.wait_member_state(observer, doomed, |s| s.starts_with("down"));
    }

    let mut c3 = cluster.connect(survivor);
    let mut c2 = cluster.connect(coordinator);
    for ((op, key, command, lost), (once_reply, once_value)) in pending.iter().zip(&once) {
        // Right after a failover a request may meet SERVER_ERROR while the
        // survivors settle; the client retries the same id until it gets an
        // answer (bounded).
        let deadline = Instant::now() + FAILOVER_RETRY_DEADLINE;
        let mut attempts = 0;
        let retry = loop {
            attempts += 1;
            let reply = c3.ask(command);
            if !reply.starts_with("SERVER_ERROR") {
                break reply;
            }
            assert!(
                Instant::now() < deadline,
                "{}: retry of {key} through node {survivor} still answers {reply:?} after \
                 {attempts} attempts\n{}",
                op.name(),
                cluster.describe_nodes()
            );
            std::thread::sleep(RETRY_POLL_INTERVAL);
        };
        if attempts > 1 {
            println!("{}: retry answered after {attempts} attempts", op.name());
        }
        assert_eq!(
            &retry,
            lost,
            "{}: {key} written through node {coordinator} with primary {doomed}, retried \
             through node {survivor} after node {doomed} died",
            op.name()
        );
        assert_eq!(lost, once_reply, "{}: the first reply", op.name());
        for (node, c) in [(coordinator, &mut c2), (survivor, &mut c3)] {
            assert_eq!(
                &value_of(c, key, ""),
                once_value,
                "{}: {key} read through node {node} after the failover holds what one \
                 application gives",
                op.name()
            );
        }
    }
}

/// Sends `request` on `conn` until a reply arrives within `timeout`; a
/// reply that does not come was dropped, so the client gives the connection
/// up, opens a new one and sends the same request again. Returns the reply
/// and how many times it was resent.
fn call_until_answered(
    server: &Server,
    conn: &mut Client,
    request: &[u8],
    timeout: Duration,
    attempts_max: usize,
) -> (String, usize) {
    for attempt in 0..attempts_max {
        match conn.call(request, timeout) {
            Ok(reply) => return (String::from_utf8_lossy(&reply).into_owned(), attempt),
            Err(e) if matches!(e.kind, ReplyErrorKind::Timeout(_)) && e.partial.is_empty() => {
                *conn = server.connect();
            }
            Err(e) => panic!("reply to \"{}\": {e}", escape(request)),
        }
    }
    panic!(
        "no reply to \"{}\" in {attempts_max} attempts\n{}",
        escape(request),
        server.stderr_text()
    );
}

#[test]
fn ids_make_incr_exact_under_injected_reply_loss() {
    const INCREMENTS: u64 = 100;
    /// A dropped reply never comes; a kept one comes in well under this.
    const LOST_REPLY_TIMEOUT: Duration = Duration::from_millis(150);
    /// 0.2^30: a request that loses 30 replies in a row is a broken server.
    const ATTEMPTS_MAX: usize = 30;
    let server = Server::start(&["--fault-drop-reply", "0.2", "--fault-seed", "7"]);
    let mut conn = server.connect();
    let call = |conn: &mut Client, request: &[u8]| {
        call_until_answered(&server, conn, request, LOST_REPLY_TIMEOUT, ATTEMPTS_MAX)
    };

    // With ids: every increment is applied once, so each answers the count
    // so far, retries included.
    let (reply, _) = call(&mut conn, b"set exact 0 0 1\r\n0\r\n");
    assert_eq!(reply, "STORED\r\n");
    let mut resent_with_ids = 0;
    for n in 1..=INCREMENTS {
        let request = format!("ma exact v Piinc-{n}\r\n");
        let (reply, resent) = call(&mut conn, request.as_bytes());
        resent_with_ids += resent;
        assert_eq!(
            reply,
            format!("VA {}\r\n{n}\r\n", n.to_string().len()),
            "increment {n} (resent {resent} times)"
        );
    }
    let (exact, _) = call(&mut conn, b"mg exact v\r\n");
    let (stats, _) = call(&mut conn, b"stats\r\n");
    let replayed = stat_u64(&stats, "request_id_replays");

    // Without ids: the same client, the same retries, on another key.
    let (reply, _) = call(&mut conn, b"set blind 0 0 1\r\n0\r\n");
    assert_eq!(reply, "STORED\r\n");
    let mut resent_without_ids = 0;
    for _ in 1..=INCREMENTS {
        let (reply, resent) = call(&mut conn, b"ma blind v\r\n");
        resent_without_ids += resent;
        assert!(reply.starts_with("VA "), "ma blind v answered {reply:?}");
    }
    let (blind, _) = call(&mut conn, b"mg blind v\r\n");
    let blind: u64 = blind
        .strip_prefix("VA ")
        .and_then(|r| r.split("\r\n").nth(1))
        .and_then(|v| v.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("mg blind v answered {blind:?}"));

    println!(
        "{INCREMENTS} increments, 20% of replies dropped (seed 7): with ids {} resent, \
         counter {:?}, {replayed} replays; without ids {resent_without_ids} resent, counter {blind}",
        resent_with_ids,
        exact.trim_end()
    );
    assert!(
        resent_with_ids > 0,
        "no reply was dropped: the fault injection is off"
    );
    assert_eq!(
        exact,
        format!("VA 3\r\n{INCREMENTS}\r\n"),
        "with ids the counter counts each increment once"
    );
    assert_eq!(
        replayed, resent_with_ids as u64,
        "every resent increment was answered from its record"
    );
    assert!(
        blind > INCREMENTS,
        "without ids resent increments count twice: {blind} after {INCREMENTS} increments \
         and {resent_without_ids} resends"
    );
}

#[test]
fn bad_request_ids_are_client_errors() {
    const BAD_ID: &str = "CLIENT_ERROR bad request id in P token\r\n";
    const REUSED: &str = "CLIENT_ERROR request id already used by another command on this key\r\n";
    let server = Server::start(&[]);
    let mut c = server.connect();
    assert_eq!(c.ask(b"set k 0 0 1\r\n5\r\n"), "STORED\r\n");

    let longest = "x".repeat(32);
    let too_long = "x".repeat(33);
    for bad in [
        "ma k Pi\r\n".to_string(),
        "ma k v Pw2,i\r\n".to_string(),
        format!("ma k Pi{too_long}\r\n"),
        "ma k Pi\x7fdel\r\n".to_string(),
        "md k Pi\r\n".to_string(),
        format!("md k Pi{too_long}\r\n"),
        "ms k 1 Pi\r\nz\r\n".to_string(),
        format!("ms k 1 Pi{too_long}\r\nz\r\n"),
    ] {
        assert_eq!(c.ask(bad.as_bytes()), BAD_ID, "{}", escape(bad.as_bytes()));
    }
    assert_eq!(
        value_of(&mut c, "k", ""),
        "VA 1\r\n5\r\n",
        "bad ids apply nothing"
    );

    // 32 bytes is the longest id.
    assert_eq!(
        c.ask(format!("ma k v Pi{longest}\r\n").as_bytes()),
        "VA 1\r\n6\r\n"
    );
    assert_eq!(
        c.ask(format!("ma k v Pi{longest}\r\n").as_bytes()),
        "VA 1\r\n6\r\n"
    );

    // An id names one mutation: another kind of command with it is refused.
    assert_eq!(c.ask(b"ma k v Pireused\r\n"), "VA 1\r\n7\r\n");
    assert_eq!(c.ask(b"ms k 1 Pireused\r\nz\r\n"), REUSED);
    assert_eq!(c.ask(b"md k Pireused\r\n"), REUSED);
    assert_eq!(
        value_of(&mut c, "k", ""),
        "VA 1\r\n7\r\n",
        "refused ids apply nothing"
    );

    // The node keeps serving, on this connection and a new one.
    assert_eq!(c.ask(b"ma k v Pifresh\r\n"), "VA 1\r\n8\r\n");
    assert!(c.ask(b"version\r\n").starts_with("VERSION "));
    assert_eq!(value_of(&mut server.connect(), "k", ""), "VA 1\r\n8\r\n");
}

/// The first `{prefix}-{i}` key whose preference list is `want`.
fn key_with_preference(prefix: &str, want: &[NodeId]) -> String {
    (0..KEY_CANDIDATES_MAX)
        .map(|i| format!("{prefix}-{i}"))
        .find(|k| preference_of(k) == want)
        .unwrap_or_else(|| {
            panic!("no key {prefix}-0..{KEY_CANDIDATES_MAX} has preference {want:?}")
        })
}

/// The new primary after a failover missed the first attempt and a later
/// write (it was down and came back empty): it must catch up before it looks
/// the id up, so the retry replays instead of applying again on what it
/// holds (which would also lose the later write).
#[test]
fn a_retry_on_a_new_primary_that_missed_the_first_attempt_applies_once() {
    let _serial = exclusive();
    // Without hints, anti-entropy or refill on start, which could hand the
    // missed writes to the restarted node: only the new primary's catch-up
    // may find them.
    let mut cluster = Cluster::start(
        Layout::new(usize::from(NODES))
            .request_timeout_ms(300)
            .no_hints()
            .no_anti_entropy()
            .no_refill(),
    );
    let (doomed, coordinator, lagging): (NodeId, NodeId, NodeId) = (1, 2, 3);
    // (setup value, the id'd mutation, a later plain mutation, its first
    // reply, the value after both)
    let cases = [
        (
            "10",
            "ma {k} v D5 Pireq-missed-incr\r\n",
            "ma {k} v D100\r\n",
            "VA 2\r\n15\r\n",
            "VA 3\r\n115\r\n",
        ),
        (
            "ab",
            "ms {k} 2 MA Pireq-missed-append\r\ncd\r\n",
            "ms {k} 2 MA\r\nzz\r\n",
            "HD\r\n",
            "VA 6\r\nabcdzz\r\n",
        ),
    ];
    let keys: Vec<String> = (0..cases.len())
        .map(|i| key_with_preference(&format!("missed-{i}"), &[doomed, lagging, coordinator]))
        .collect();
    let mut c2 = cluster.connect(coordinator);
    for ((setup, ..), key) in cases.iter().zip(&keys) {
        let set = format!("set {key} 0 0 {}\r\n{setup}\r\n", setup.len());
        assert_eq!(c2.ask(set.as_bytes()), "STORED\r\n");
    }

    cluster.kill(lagging);
    for observer in [doomed, coordinator] {
        cluster.wait_member_state(observer, lagging, |s| s.starts_with("down"));
    }
    for ((_, first, later, first_reply, _), key) in cases.iter().zip(&keys) {
        let lost = c2.ask(first.replace("{k}", key).as_bytes());
        assert_eq!(&lost, first_reply, "{key}: first attempt");
        let later_reply = c2.ask(later.replace("{k}", key).as_bytes());
        assert!(
            applied(&later_reply),
            "{key}: later write answered {later_reply:?}"
        );
    }
    cluster.restart(lagging);
    // The precondition: the restarted node holds none of it (`me` shows a
    // node's own copy).
    let mut c3 = cluster.connect(lagging);
    for key in &keys {
        let me = c3.ask(format!("me {key}\r\n").as_bytes());
        assert_eq!(me, "EN\r\n", "node {lagging} came back empty");
    }
    cluster.kill(doomed);
    for observer in [coordinator, lagging] {
        cluster.wait_member_state(observer, doomed, |s| s.starts_with("down"));
    }

    let mut c3 = cluster.connect(lagging);
    let mut c2 = cluster.connect(coordinator);
    for ((_, first, _, first_reply, both), key) in cases.iter().zip(&keys) {
        let command = first.replace("{k}", key);
        let deadline = Instant::now() + FAILOVER_RETRY_DEADLINE;
        let retry = loop {
            let reply = c3.ask(command.as_bytes());
            if !reply.starts_with("SERVER_ERROR") || Instant::now() >= deadline {
                break reply;
            }
            std::thread::sleep(RETRY_POLL_INTERVAL);
        };
        assert_eq!(
            &retry, first_reply,
            "{key}: the retry through the new primary (node {lagging}, which missed the \
             first attempt) answers what the first attempt answered"
        );
        for (node, c) in [(coordinator, &mut c2), (lagging, &mut c3)] {
            assert_eq!(
                &value_of(c, key, ""),
                both,
                "{key} read through node {node}: the id'd write once, and the later write"
            );
        }
    }
}
