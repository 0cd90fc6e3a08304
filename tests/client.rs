//! Black-box tests of `webvac::client` against real servers: a single
//! webvac node, the reference memcached, and clusters of real `webvac`
//! processes on loopback (`common::cluster`).
//!
//! Faults are injected on the client side (`ClientFaults`): a dropped reply
//! is read from the socket and thrown away, so the server did the work and
//! the client cannot know. `drop_first_replies: 1` loses exactly the first
//! reply, which makes "the retry of a lost incr counts once" deterministic.
//!
//! Each test runs its own tokio runtime; harness calls (starting, killing,
//! `stats cluster` over raw sockets) run on the test thread outside it.
//! Cluster tests run one at a time (`cluster::exclusive`). Every wait is
//! bounded: readiness comes from the harness, and the few polls below have
//! deadlines.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use common::cluster::{Cluster, Layout, NodeId, cluster_stats, exclusive};
use common::{Memcached, Server};
use webvac::client::{
    CasOutcome, Client, ClientConfig, ClientError, ClientFaults, Options, ServerKind,
};

/// Bound of the polls in these tests.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs one future to completion on `rt`.
fn run<F: Future>(rt: &tokio::runtime::Runtime, f: F) -> F::Output {
    rt.block_on(f)
}

/// Short timeouts so fault tests are quick; still far above loopback latency.
fn quick_config() -> ClientConfig {
    ClientConfig {
        attempt_timeout: Duration::from_millis(500),
        deadline: Duration::from_secs(5),
        refresh_interval: Duration::from_secs(60),
        ..ClientConfig::default()
    }
}

fn connect(rt: &tokio::runtime::Runtime, seeds: &[SocketAddr], config: ClientConfig) -> Client {
    run(rt, Client::connect(seeds, config)).expect("client connects")
}

fn drop_first_replies(n: u32) -> ClientConfig {
    ClientConfig {
        faults: ClientFaults {
            drop_first_replies: n,
            ..ClientFaults::default()
        },
        ..quick_config()
    }
}

/// Every basic operation through `c`; the same script for webvac and
/// memcached.
fn exercise_basic_ops(rt: &tokio::runtime::Runtime, c: &Client) {
    run(rt, async {
        let none = Options::default();
        assert_eq!(c.get("missing").await.unwrap(), None);

        // set / get with flags; the CAS from set is the one get reports.
        let flagged = Options {
            flags: 42,
            ..Options::default()
        };
        let cas = c.set("k1", "hello", &flagged).await.unwrap();
        let v = c.get("k1").await.unwrap().expect("k1 stored");
        assert_eq!((&v.data[..], v.flags), (&b"hello"[..], 42));
        assert_ne!(v.cas, 0);
        assert_eq!(v.cas, cas, "set reports the new CAS");

        // add / replace
        assert!(
            !c.add("k1", "x", &none).await.unwrap(),
            "add over an existing key"
        );
        assert!(c.add("k2", "two", &none).await.unwrap());
        assert!(c.replace("k2", "TWO", &none).await.unwrap());
        assert!(!c.replace("nope", "x", &none).await.unwrap());
        assert_eq!(&c.get("k2").await.unwrap().unwrap().data[..], b"TWO");

        // append / prepend keep the flags
        assert!(c.append("k1", " world", &none).await.unwrap());
        assert!(c.prepend("k1", ">", &none).await.unwrap());
        assert!(!c.append("nope", "x", &none).await.unwrap());
        let v = c.get("k1").await.unwrap().unwrap();
        assert_eq!((&v.data[..], v.flags), (&b">hello world"[..], 42));

        // cas
        assert_eq!(
            c.cas("k1", "new", v.cas, &none).await.unwrap(),
            CasOutcome::Stored
        );
        assert_eq!(
            c.cas("k1", "newer", v.cas, &none).await.unwrap(),
            CasOutcome::Exists
        );
        assert_eq!(
            c.cas("nope", "x", 1, &none).await.unwrap(),
            CasOutcome::NotFound
        );

        // incr / decr
        assert_eq!(c.incr("n", 1, &none).await.unwrap(), None);
        c.set("n", "10", &none).await.unwrap();
        assert_eq!(c.incr("n", 5, &none).await.unwrap(), Some(15));
        assert_eq!(c.decr("n", 1, &none).await.unwrap(), Some(14));
        assert_eq!(c.decr("n", 100, &none).await.unwrap(), Some(0));
        assert_eq!(c.incr("n", u64::MAX, &none).await.unwrap(), Some(u64::MAX));
        assert!(matches!(
            c.incr("k1", 1, &none).await,
            Err(ClientError::Client(_))
        ));

        // touch / delete
        assert!(c.touch("k2", 3600).await.unwrap());
        assert!(!c.touch("nope", 3600).await.unwrap());
        assert!(c.delete("k2", &none).await.unwrap());
        assert!(!c.delete("k2", &none).await.unwrap());
        assert_eq!(c.get("k2").await.unwrap(), None);

        // binary and awkward keys travel as base64, values are any bytes
        let binary: &[u8] = &[0, 1, b' ', b'\r', b'\n', 0xff];
        let value: Vec<u8> = (0..=255u8).collect();
        c.set(binary, &value, &none).await.unwrap();
        assert_eq!(&c.get(binary).await.unwrap().unwrap().data[..], &value[..]);
        c.set("with space", "v", &none).await.unwrap();
        assert_eq!(&c.get("with space").await.unwrap().unwrap().data[..], b"v");

        // an expired TTL (absolute time in the past) is a miss
        c.set("gone", "v", &Options::ttl(1)).await.unwrap();
        c.set("gone", "v", &Options::ttl(1_000_000_000 + 1))
            .await
            .unwrap();
        assert_eq!(c.get("gone").await.unwrap(), None);

        // get_many keeps the order
        let got = c.get_many(&["k1", "missing", "n"]).await.unwrap();
        let data: Vec<Option<Vec<u8>>> = got
            .into_iter()
            .map(|v| v.map(|v| v.data.to_vec()))
            .collect();
        let max = u64::MAX.to_string().into_bytes();
        assert_eq!(data, [Some(b"new".to_vec()), None, Some(max)]);

        // bad keys are refused before anything is sent
        assert!(matches!(c.get("").await, Err(ClientError::InvalidKey(_))));
        assert!(matches!(
            c.get("x".repeat(251)).await,
            Err(ClientError::InvalidKey(_))
        ));
        // a value over the server's item limit is a server error, not retried
        let attempts = c.stats().attempts;
        let huge = vec![b'x'; 2 << 20];
        assert!(matches!(
            c.set("huge", &huge, &none).await,
            Err(ClientError::Server(_))
        ));
        assert_eq!(c.stats().attempts, attempts + 1);
    });
}

#[test]
fn basic_ops_against_a_single_webvac_node() {
    let server = Server::start(&[]);
    let rt = runtime();
    let c = connect(&rt, &[server.addr()], quick_config());
    assert_eq!(c.server_kind(), ServerKind::Webvac);
    assert!(
        c.server_version().contains("webvac"),
        "{}",
        c.server_version()
    );
    assert_eq!(c.members().len(), 1);
    assert_eq!(c.members()[0].addr, server.addr());
    exercise_basic_ops(&rt, &c);
    let stats = c.stats();
    assert_eq!(stats.retries, 0, "{stats:?}");
    assert_eq!(stats.timeouts, 0, "{stats:?}");
    // Every non-idempotent mutation carried an id (replace too).
    assert!(stats.request_ids_sent > 0, "{stats:?}");
}

#[test]
fn basic_ops_against_memcached() {
    let memcached = Memcached::start_tcp();
    let rt = runtime();
    // Seeds may be strings.
    let seed = memcached.tcp_addr().to_string();
    let c = run(&rt, Client::connect(&[seed.as_str()], quick_config())).unwrap();
    assert_eq!(c.server_kind(), ServerKind::Memcached);
    exercise_basic_ops(&rt, &c);
    assert_eq!(c.stats().request_ids_sent, 0, "no ids to memcached");
    assert!(matches!(
        run(&rt, c.list_page(None, 10)),
        Err(ClientError::NotSupported(_))
    ));
}

#[test]
fn connect_fails_cleanly_without_servers_and_with_bad_settings() {
    let rt = runtime();
    let dead: SocketAddr = ([127, 0, 0, 1], common::free_tcp_port()).into();
    let started = Instant::now();
    assert!(matches!(
        run(&rt, Client::connect(&[dead], quick_config())),
        Err(ClientError::NoServer(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
    let none: [SocketAddr; 0] = [];
    assert!(matches!(
        run(&rt, Client::connect(&none, quick_config())),
        Err(ClientError::InvalidArgument(_))
    ));
    let bad = ClientConfig {
        pool_size: 0,
        ..ClientConfig::default()
    };
    assert!(matches!(
        run(&rt, Client::connect(&[dead], bad)),
        Err(ClientError::InvalidArgument(_))
    ));
}

// ---- Lost replies, retries, request ids --------------------------------------

#[test]
fn a_read_whose_reply_was_lost_is_retried() {
    let server = Server::start(&[]);
    let rt = runtime();
    let setup = connect(&rt, &[server.addr()], quick_config());
    run(&rt, setup.set("k", "v", &Options::default())).unwrap();
    let c = connect(&rt, &[server.addr()], drop_first_replies(1));
    let v = run(&rt, c.get("k")).unwrap().unwrap();
    assert_eq!(&v.data[..], b"v");
    let s = c.stats();
    assert_eq!((s.attempts, s.retries, s.timeouts), (2, 1, 1), "{s:?}");
}

#[test]
fn a_lost_request_is_retried() {
    let server = Server::start(&[]);
    let rt = runtime();
    let config = ClientConfig {
        faults: ClientFaults {
            drop_first_requests: 1,
            ..ClientFaults::default()
        },
        ..quick_config()
    };
    let c = connect(&rt, &[server.addr()], config);
    assert_eq!(run(&rt, c.get("k")).unwrap(), None);
    assert_eq!(c.stats().retries, 1);
}

/// Against memcached (no request ids) a non-idempotent op whose reply was
/// lost is not retried: the caller learns it may have been applied, and it
/// was applied exactly once.
#[test]
fn without_request_ids_a_lost_incr_is_maybe_applied_not_retried() {
    let memcached = Memcached::start_tcp();
    let rt = runtime();
    let setup = connect(&rt, &[memcached.tcp_addr()], quick_config());
    run(&rt, setup.set("n", "10", &Options::default())).unwrap();
    let c = connect(&rt, &[memcached.tcp_addr()], drop_first_replies(1));
    match run(&rt, c.incr("n", 1, &Options::default())) {
        Err(ClientError::MaybeApplied { op: "incr", last }) => {
            assert!(matches!(*last, ClientError::Timeout(_)), "{last:?}")
        }
        other => panic!("expected MaybeApplied, got {other:?}"),
    }
    let s = c.stats();
    assert_eq!((s.attempts, s.retries, s.maybe_applied), (1, 0, 1), "{s:?}");
    let v = run(&rt, setup.get("n")).unwrap().unwrap();
    assert_eq!(&v.data[..], b"11", "applied once, not retried");
}

/// The same against webvac with automatic ids switched off.
#[test]
fn with_ids_switched_off_a_lost_add_is_maybe_applied() {
    let server = Server::start(&[]);
    let rt = runtime();
    let config = ClientConfig {
        request_ids: false,
        ..drop_first_replies(1)
    };
    let c = connect(&rt, &[server.addr()], config);
    assert!(matches!(
        run(&rt, c.add("a", "v", &Options::default())),
        Err(ClientError::MaybeApplied { op: "add", .. })
    ));
    assert_eq!(c.stats().request_ids_sent, 0);
    assert!(run(&rt, c.get("a")).unwrap().is_some(), "the add did land");
}

/// Checks that each non-idempotent op, with its first reply lost, is
/// retried with the same id and answers what the first attempt did.
fn lost_replies_are_answered_from_the_request_id(
    rt: &tokio::runtime::Runtime,
    seeds: &[SocketAddr],
) {
    let setup = connect(rt, seeds, quick_config());
    let none = Options::default();
    run(rt, setup.set("counter", "10", &none)).unwrap();
    run(rt, setup.set("log", "a", &none)).unwrap();
    run(rt, setup.set("doomed", "x", &none)).unwrap();

    // Each op on a fresh client whose first reply is lost.
    let lossy = || connect(rt, seeds, drop_first_replies(1));
    let check_retried = |c: &Client, what: &str| {
        let s = c.stats();
        assert_eq!(
            (s.attempts, s.retries, s.timeouts),
            (2, 1, 1),
            "{what}: {s:?}"
        );
        assert_eq!(s.request_ids_sent, 1, "{what}: one id for both attempts");
    };

    let c = lossy();
    assert_eq!(
        run(rt, c.incr("counter", 1, &none)).unwrap(),
        Some(11),
        "incr"
    );
    check_retried(&c, "incr");
    let c = lossy();
    assert_eq!(
        run(rt, c.decr("counter", 3, &none)).unwrap(),
        Some(8),
        "decr"
    );
    check_retried(&c, "decr");
    // decr rewrites in place, space-padded, as memcached does.
    assert_eq!(
        &run(rt, setup.get("counter")).unwrap().unwrap().data[..],
        b"8 "
    );

    let c = lossy();
    assert!(
        run(rt, c.add("fresh", "v", &none)).unwrap(),
        "add answers stored"
    );
    check_retried(&c, "add");

    let c = lossy();
    assert!(run(rt, c.append("log", "b", &none)).unwrap());
    check_retried(&c, "append");
    assert_eq!(
        &run(rt, setup.get("log")).unwrap().unwrap().data[..],
        b"ab",
        "appended once"
    );

    let c = lossy();
    assert!(
        run(rt, c.delete("doomed", &none)).unwrap(),
        "delete answers deleted"
    );
    check_retried(&c, "delete");

    let cas = run(rt, setup.get("fresh")).unwrap().unwrap().cas;
    let c = lossy();
    assert_eq!(
        run(rt, c.cas("fresh", "w", cas, &none)).unwrap(),
        CasOutcome::Stored,
        "cas"
    );
    check_retried(&c, "cas");

    // An explicit id: the caller's own retry across calls counts once.
    let id = Options {
        request_id: Some("caller-chosen-id-1".into()),
        ..Options::default()
    };
    assert_eq!(run(rt, setup.incr("counter", 100, &id)).unwrap(), Some(108));
    assert_eq!(run(rt, setup.incr("counter", 100, &id)).unwrap(), Some(108));
    assert_eq!(
        &run(rt, setup.get("counter")).unwrap().unwrap().data[..],
        b"108"
    );
}

/// WAITS ON THE SERVER: needs request-id dedup (`Pi<id>`).
#[test]
fn lost_replies_of_mutations_are_retried_with_their_id_on_a_single_node() {
    let server = Server::start(&[]);
    let rt = runtime();
    lost_replies_are_answered_from_the_request_id(&rt, &[server.addr()]);
}

/// WAITS ON THE SERVER: the retry goes to the next node of the key's
/// preference list (the first node is excluded after it lost the reply),
/// so the dedup record must be replicated with the item.
#[test]
fn lost_replies_of_mutations_are_retried_with_their_id_on_another_node() {
    let _serial = exclusive();
    let cluster = Cluster::start(Layout::new(3));
    let rt = runtime();
    lost_replies_are_answered_from_the_request_id(&rt, &[cluster.member(1).client]);
}

#[test]
fn the_retry_budget_refuses_retries_when_exhausted() {
    let server = Server::start(&[]);
    let rt = runtime();
    let config = ClientConfig {
        retry_ratio: 0.0,
        min_retries_per_sec: 0.0,
        retry_tokens_max: 1.0,
        max_attempts: 5,
        attempt_timeout: Duration::from_millis(200),
        faults: ClientFaults {
            drop_reply: 1.0,
            ..ClientFaults::default()
        },
        ..quick_config()
    };
    let c = connect(&rt, &[server.addr()], config);
    // One token: the first call gets one retry, then is refused.
    match run(&rt, c.get("k")) {
        Err(ClientError::RetryBudgetExhausted { last }) => {
            assert!(matches!(*last, ClientError::Timeout(_)), "{last:?}")
        }
        other => panic!("{other:?}"),
    }
    // The bucket is empty: the next call may not retry at all.
    assert!(matches!(
        run(&rt, c.get("k")),
        Err(ClientError::RetryBudgetExhausted { .. })
    ));
    let s = c.stats();
    assert_eq!(
        (s.attempts, s.retries, s.budget_refusals),
        (3, 1, 2),
        "{s:?}"
    );
}

#[test]
fn the_deadline_bounds_a_call() {
    let server = Server::start(&[]);
    let rt = runtime();
    let config = ClientConfig {
        max_attempts: 100,
        attempt_timeout: Duration::from_millis(100),
        deadline: Duration::from_millis(450),
        backoff_cap: Duration::from_millis(20),
        faults: ClientFaults {
            drop_reply: 1.0,
            ..ClientFaults::default()
        },
        ..quick_config()
    };
    let c = connect(&rt, &[server.addr()], config);
    let started = Instant::now();
    let r = run(&rt, c.get("k"));
    let took = started.elapsed();
    assert!(
        matches!(r, Err(ClientError::DeadlineExceeded { .. })),
        "{r:?}"
    );
    assert!(took < Duration::from_millis(1000), "{took:?}");
    assert!((3..=5).contains(&c.stats().attempts), "{:?}", c.stats());
}

#[test]
fn a_full_connection_is_busy() {
    let server = Server::start(&[]);
    let rt = runtime();
    // One connection, one request in flight; requests are held 300 ms.
    let config = ClientConfig {
        pool_size: 1,
        in_flight_max: 1,
        faults: ClientFaults {
            delay: 1.0,
            delay_ms: 300,
            ..ClientFaults::default()
        },
        ..quick_config()
    };
    let c = connect(&rt, &[server.addr()], config);
    let (a, b) = run(&rt, async {
        tokio::join!(c.get("a"), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.get("b").await
        })
    });
    assert_eq!(a.unwrap(), None);
    assert!(matches!(b, Err(ClientError::Busy { .. })), "{b:?}");
    assert_eq!(c.stats().busy, 1);
}

#[test]
fn concurrent_callers_share_pipelined_connections() {
    let server = Server::start(&[]);
    let rt = runtime();
    let c = connect(&rt, &[server.addr()], quick_config());
    run(&rt, async {
        let tasks: Vec<_> = (0..64)
            .map(|t| {
                let c = c.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        let key = format!("t{t}:{i}");
                        c.set(&key, &key, &Options::default()).await.unwrap();
                        let v = c.get(&key).await.unwrap().unwrap();
                        assert_eq!(&v.data[..], key.as_bytes());
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let s = c.stats();
    assert_eq!(s.requests, 64 * 50 * 2);
    assert!(s.connects <= 2, "pool of 2, lazily filled: {s:?}");
}

// ---- Clusters: routing and failover -------------------------------------------

fn stat(cluster: &Cluster, id: NodeId, name: &str) -> u64 {
    let stats = cluster_stats(&mut cluster.connect(id));
    stats
        .get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("node {id}: no numeric {name}"))
}

fn summed(cluster: &Cluster, name: &str) -> u64 {
    cluster
        .running_ids()
        .into_iter()
        .map(|id| stat(cluster, id, name))
        .sum()
}

/// The library's own placement for members 1..=3, N=3, 1024 partitions.
fn preferred_primary(key: &str) -> NodeId {
    webvac::cluster::ring::Ring::new(&[1, 2, 3], 1024, 3).preference_list_for_key(key.as_bytes())[0]
}

#[test]
fn writes_go_straight_to_each_keys_primary() {
    const KEYS: usize = 300;
    let _serial = exclusive();
    let cluster = Cluster::start(Layout::new(3));
    let rt = runtime();
    // One seed is enough: the client learns the others.
    let c = connect(&rt, &[cluster.member(2).client], quick_config());
    assert_eq!(c.server_kind(), ServerKind::Webvac);
    let members: BTreeMap<NodeId, SocketAddr> =
        c.members().iter().map(|m| (m.id, m.addr)).collect();
    let expected: BTreeMap<NodeId, SocketAddr> =
        cluster.members().iter().map(|m| (m.id, m.client)).collect();
    assert_eq!(members, expected);

    let keys: Vec<String> = (0..KEYS).map(|i| format!("route:{i}")).collect();
    for key in &keys {
        let primary = preferred_primary(key);
        assert_eq!(
            c.preference_list(key)[0],
            cluster.member(primary).client,
            "{key}"
        );
    }
    let forwarded_before = summed(&cluster, "forwarded");
    let primary_writes_before = summed(&cluster, "primary_writes");
    run(&rt, async {
        for key in &keys {
            c.set(key, key, &Options::default()).await.unwrap();
            assert_eq!(
                c.incr(format!("{key}:n"), 1, &Options::default())
                    .await
                    .unwrap(),
                None
            );
        }
        for (key, v) in keys.iter().zip(c.get_many(&keys).await.unwrap()) {
            assert_eq!(&v.expect("written").data[..], key.as_bytes());
        }
    });
    let forwarded = summed(&cluster, "forwarded") - forwarded_before;
    let primary_writes = summed(&cluster, "primary_writes") - primary_writes_before;
    assert_eq!(forwarded, 0, "every write went to its primary");
    assert!(primary_writes >= KEYS as u64, "{primary_writes}");
    // Each node executed about its share of the writes as primary.
    for id in cluster.ids() {
        let own = keys.iter().filter(|k| preferred_primary(k) == id).count() as u64;
        assert!(own > 0, "node {id} is primary for some keys");
    }
    assert_eq!(c.stats().retries, 0);
}

/// Keys whose preferred primary is `id`.
fn keys_with_primary(id: NodeId, n: usize, prefix: &str) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|k| preferred_primary(k) == id)
        .take(n)
        .collect()
}

#[test]
fn requests_fail_over_when_a_primary_is_killed() {
    let _serial = exclusive();
    let mut cluster = Cluster::start(Layout::new(3).request_timeout_ms(300));
    let rt = runtime();
    let c = connect(&rt, &[cluster.member(1).client], quick_config());
    let keys = keys_with_primary(1, 50, "fo:");
    run(&rt, async {
        for key in &keys {
            c.set(key, "before", &Options::default()).await.unwrap();
        }
    });
    cluster.kill(1);
    // Reads and idempotent writes keep working through the next replicas,
    // at once: the dead primary refuses connections, which is failover,
    // not a retry.
    run(&rt, async {
        for key in &keys {
            let v = c
                .get(key)
                .await
                .unwrap()
                .expect("readable from the replicas");
            assert_eq!(&v.data[..], b"before");
            c.set(key, "after", &Options::default()).await.unwrap();
        }
        for key in &keys {
            assert_eq!(&c.get(key).await.unwrap().unwrap().data[..], b"after");
        }
    });
    let s = c.stats();
    assert!(s.failovers >= 1, "{s:?}");
    assert!(s.connect_failures >= 1, "{s:?}");
    // The map learns that node 1 is down (bounded wait for the peers to
    // notice, then an explicit refresh).
    cluster.wait_member_state(2, 1, |s| s.starts_with("down"));
    run(&rt, c.refresh()).unwrap();
    let down: Vec<NodeId> = c.members().iter().filter(|m| !m.up).map(|m| m.id).collect();
    assert_eq!(down, [1]);
    // The seed itself is gone, but the client knows the other members.
    run(&rt, c.refresh()).unwrap();
}

/// A frozen primary (SIGSTOP: it accepts connections and answers nothing)
/// costs a request one attempt timeout; the retry goes to the next
/// replica, and the map refresh that the timeout triggers reports the node
/// down, so later requests pass it over without waiting.
#[test]
fn a_frozen_primary_costs_one_timeout_then_is_passed_over() {
    let _serial = exclusive();
    let mut cluster = Cluster::start(Layout::new(3).request_timeout_ms(300));
    let rt = runtime();
    let c = connect(&rt, &[cluster.member(2).client], quick_config());
    let keys = keys_with_primary(1, 20, "frozen:");
    run(&rt, async {
        for key in &keys {
            c.set(key, "v", &Options::default()).await.unwrap();
        }
    });
    cluster.pause(1);
    cluster.wait_member_state(2, 1, |s| s.starts_with("down"));
    let started = Instant::now();
    run(&rt, async {
        for key in &keys {
            let v = c
                .get(key)
                .await
                .unwrap()
                .expect("readable from the replicas");
            assert_eq!(&v.data[..], b"v");
        }
    });
    let took = started.elapsed();
    let s = c.stats();
    cluster.resume(1);
    assert!((1..=3).contains(&s.timeouts), "{s:?}");
    assert!(
        took < Duration::from_secs(3),
        "{took:?} for {} reads",
        keys.len()
    );
    assert!(!c.members().iter().find(|m| m.id == 1).unwrap().up);
}

#[test]
fn a_node_that_comes_back_is_used_again_after_a_refresh() {
    let _serial = exclusive();
    let mut cluster = Cluster::start_members(Layout::new(3), &[1, 2]);
    // Past its first dial, node 1 reports node 3 `down`, not `connecting`.
    cluster.wait_member_state(1, 3, |s| s.starts_with("down"));
    let rt = runtime();
    let config = ClientConfig {
        refresh_interval: Duration::from_millis(200),
        ..quick_config()
    };
    let c = connect(&rt, &[cluster.member(1).client], config);
    assert!(
        !c.members().iter().find(|m| m.id == 3).unwrap().up,
        "node 3 starts down"
    );
    let keys = keys_with_primary(3, 20, "back:");
    run(&rt, async {
        for key in &keys {
            c.set(key, "v1", &Options::default()).await.unwrap();
        }
    });
    cluster.restart(3);
    // Bounded wait for the periodic refresh to see node 3 up.
    let deadline = Instant::now() + POLL_TIMEOUT;
    while !c.members().iter().find(|m| m.id == 3).unwrap().up {
        assert!(
            Instant::now() < deadline,
            "node 3 never seen up: {:?}",
            c.members()
        );
        std::thread::sleep(POLL_INTERVAL);
    }
    let forwarded_before = summed(&cluster, "forwarded");
    run(&rt, async {
        for key in &keys {
            c.set(key, "v2", &Options::default()).await.unwrap();
        }
    });
    assert_eq!(
        summed(&cluster, "forwarded") - forwarded_before,
        0,
        "writes went straight to node 3 again"
    );
}

// ---- Key listing (WAITS ON THE SERVER: `lk`) -----------------------------------

fn list_all(rt: &tokio::runtime::Runtime, c: &Client, count: u32) -> BTreeSet<Vec<u8>> {
    run(rt, async {
        let mut keys = BTreeSet::new();
        let mut stream = std::pin::pin!(c.list_keys(count));
        while let Some(key) = stream.next().await {
            assert!(keys.insert(key.expect("listing")), "a key listed twice");
        }
        keys
    })
}

fn check_listing(rt: &tokio::runtime::Runtime, c: &Client) {
    let mut written = BTreeSet::new();
    run(rt, async {
        for i in 0..500 {
            let key = format!("list:{i}").into_bytes();
            c.set(&key, "v", &Options::default()).await.unwrap();
            written.insert(key);
        }
        let binary = vec![0u8, 1, 2, b' ', 255];
        c.set(&binary, "v", &Options::default()).await.unwrap();
        written.insert(binary);
    });
    assert_eq!(list_all(rt, c, 37), written);
    assert_eq!(list_all(rt, c, 10_000), written);
    // Pages by hand: bounded loop, same keys.
    let mut token: Option<String> = None;
    let mut seen = BTreeSet::new();
    for _ in 0..10_000 {
        let page = run(rt, c.list_page(token.as_deref(), 100)).unwrap();
        assert!(page.keys.len() <= 100);
        seen.extend(page.keys);
        match page.next {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, written);
    assert!(matches!(
        run(rt, c.list_page(None, 0)),
        Err(ClientError::InvalidArgument(_))
    ));
    assert!(matches!(
        run(rt, c.list_page(Some("not-a-token"), 10)),
        Err(ClientError::Client(_))
    ));
}

#[test]
fn list_keys_on_a_single_node() {
    let server = Server::start(&[]);
    let rt = runtime();
    let c = connect(&rt, &[server.addr()], quick_config());
    check_listing(&rt, &c);
}

#[test]
fn list_keys_across_a_cluster_with_lost_replies() {
    let _serial = exclusive();
    let cluster = Cluster::start(Layout::new(3));
    let rt = runtime();
    let c = connect(&rt, &[cluster.member(3).client], quick_config());
    check_listing(&rt, &c);
    // A listing is retried like a read: lose a third of the replies.
    let lossy = ClientConfig {
        max_attempts: 10,
        attempt_timeout: Duration::from_millis(200),
        deadline: Duration::from_secs(10),
        retry_tokens_max: 1000.0,
        faults: ClientFaults {
            drop_reply: 0.3,
            seed: 7,
            ..ClientFaults::default()
        },
        ..quick_config()
    };
    let c2 = connect(&rt, &[cluster.member(1).client], lossy);
    let all = list_all(&rt, &c, 50);
    assert_eq!(list_all(&rt, &c2, 50), all);
    assert!(c2.stats().retries > 0);
}
