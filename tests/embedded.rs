//! Embedded mode: `webvac::Node` members running inside this test process
//! and real `webvac` processes form one cluster.
//!
//! Data written through the embedded API reads back through the memcached
//! protocol on every member, and the other way round, with every member up
//! and with one killed. The embedded nodes run on a runtime of their own
//! (`Embedded`), so the test body can use blocking raw-protocol clients
//! without starving them.
//!
//! The cluster tests run one at a time (`cluster::exclusive`), like
//! `tests/cluster.rs`.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Client as Raw;
use common::cluster::{Cluster, Layout, NodeId, exclusive, parse_stats};
use webvac::client::{CasOutcome, ClientError, Options};
use webvac::config::{ClusterConfig, Config};
use webvac::node::{Node, Role};
use webvac::store::ManualClock;

/// How long a member may take to see another come up or go down.
const MEMBER_STATE_DEADLINE: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Keys per batch: enough that every member is the primary of some.
const KEYS: usize = 40;

/// A tokio runtime for the embedded nodes, apart from the test thread.
struct Embedded {
    rt: tokio::runtime::Runtime,
}

impl Embedded {
    fn new() -> Embedded {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        Embedded { rt }
    }

    fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// Starts member `id` of `cluster`'s layout in this process, serving
    /// the memcached port at the member's client address.
    fn start_member(&self, cluster: &Cluster, id: NodeId) -> Node {
        let config = member_config(cluster, id);
        self.run(Node::builder().config(config).serve_memcached(true).start())
            .unwrap_or_else(|e| panic!("embedded member {id} did not start: {e}"))
    }
}

/// The configuration the harness's `webvac` processes get from their flags
/// (`Cluster::args`), for member `id`.
fn member_config(cluster: &Cluster, id: NodeId) -> Config {
    let layout = cluster.layout();
    let mut c = ClusterConfig::new(id, cluster.member_configs());
    if let Some(n) = layout.replicas {
        c.replicas = n;
    }
    c.read_quorum = layout.read_quorum;
    c.write_quorum = layout.write_quorum;
    Config {
        memory_limit_mb: layout.memory_limit_mb,
        cluster: Some(c),
        ..Config::default()
    }
}

/// Waits until `observer` (a member serving the memcached port) sees
/// `member` in a state `want` accepts.
fn wait_state(observer: std::net::SocketAddr, member: NodeId, want: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + MEMBER_STATE_DEADLINE;
    let mut last = String::new();
    loop {
        if let Ok(mut raw) = Raw::connect_tcp(observer) {
            let stats = parse_stats(&raw.ask(b"stats cluster\r\n"));
            if let Some(state) = stats.get(&format!("member:{member}")) {
                let word = state.split_whitespace().next().unwrap_or("");
                if want(word) {
                    return;
                }
                last.clone_from(state);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{observer} still sees member {member} as {last:?}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn is_up(state: &str) -> bool {
    state == "up" || state == "self"
}

/// Every member (by memcached address) sees every other running one up.
fn wait_all_up(addrs: &[(NodeId, std::net::SocketAddr)]) {
    for &(_, observer) in addrs {
        for &(member, _) in addrs {
            wait_state(observer, member, is_up);
        }
    }
}

/// `get key` over the memcached text protocol: the value, or `None`.
fn text_get(raw: &mut Raw, key: &str) -> Option<String> {
    let reply = raw.ask(format!("get {key}\r\n").as_bytes());
    if reply == "END\r\n" {
        return None;
    }
    let mut lines = reply.split("\r\n");
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with(&format!("VALUE {key} ")),
        "get {key}: {reply:?}"
    );
    Some(lines.next().unwrap_or_default().to_string())
}

/// `get key` with its flags.
fn text_get_flags(raw: &mut Raw, key: &str) -> Option<(u32, String)> {
    let reply = raw.ask(format!("get {key}\r\n").as_bytes());
    if reply == "END\r\n" {
        return None;
    }
    let mut lines = reply.split("\r\n");
    let header: Vec<&str> = lines.next().unwrap_or_default().split(' ').collect();
    assert_eq!(header.get(..2), Some(&["VALUE", key][..]), "{reply:?}");
    let flags = header[2].parse().expect("flags");
    Some((flags, lines.next().unwrap_or_default().to_string()))
}

fn text_set(raw: &mut Raw, key: &str, flags: u32, value: &str) {
    let reply = raw.ask(format!("set {key} {flags} 0 {}\r\n{value}\r\n", value.len()).as_bytes());
    assert_eq!(reply, "STORED\r\n", "set {key}");
}

fn embedded_get(rt: &Embedded, node: &Node, key: &str) -> Option<String> {
    rt.run(node.get(key))
        .unwrap_or_else(|e| panic!("embedded get {key}: {e}"))
        .map(|v| String::from_utf8(v.data.to_vec()).expect("utf-8 value"))
}

/// Writes through the embedded API read back through the memcached
/// protocol on every member and the other way round, with all three
/// members up, with the `webvac` process killed, after it restarts, and
/// with an embedded member shut down.
#[test]
fn embedded_members_and_a_webvac_process_are_one_cluster() {
    let _serial = exclusive();
    let rt = Embedded::new();
    // Member 3 is a webvac process; members 1 and 2 run in this process.
    let mut cluster = Cluster::start_members(Layout::new(3), &[3]);
    let node1 = rt.start_member(&cluster, 1);
    let node2 = rt.start_member(&cluster, 2);
    assert_eq!(node1.role(), Role::Member);
    assert_eq!(node1.node_id(), Some(1));
    assert_eq!(node1.memcached_addr(), Some(cluster.member(1).client));
    assert_eq!(node1.peer_addr(), Some(cluster.member(1).peer));
    let addrs: Vec<(NodeId, std::net::SocketAddr)> =
        [1, 2, 3].map(|id| (id, cluster.member(id).client)).to_vec();
    wait_all_up(&addrs);

    // Embedded → memcached protocol, on the webvac process and on the
    // other embedded member's port.
    let with_flags = |flags: u32| Options {
        flags,
        ..Options::default()
    };
    for i in 0..KEYS {
        rt.run(node1.set(format!("e:{i}"), format!("from-node-1-{i}"), &with_flags(7)))
            .expect("embedded set");
    }
    let mut raw3 = cluster.connect(3);
    let mut raw2 = Raw::connect_tcp(cluster.member(2).client).expect("node 2's port");
    for i in 0..KEYS {
        let want = Some((7, format!("from-node-1-{i}")));
        assert_eq!(
            text_get_flags(&mut raw3, &format!("e:{i}")),
            want,
            "webvac e:{i}"
        );
        assert_eq!(
            text_get_flags(&mut raw2, &format!("e:{i}")),
            want,
            "node 2 e:{i}"
        );
    }

    // Memcached protocol → embedded, on both embedded members.
    for i in 0..KEYS {
        text_set(&mut raw3, &format!("m:{i}"), 3, &format!("from-webvac-{i}"));
    }
    for i in 0..KEYS {
        for node in [&node1, &node2] {
            let v = rt.run(node.get(format!("m:{i}"))).expect("embedded get");
            let v = v.unwrap_or_else(|| panic!("m:{i} missing on node {:?}", node.node_id()));
            assert_eq!(v.data, format!("from-webvac-{i}").into_bytes());
            assert_eq!(v.flags, 3);
        }
    }

    // At R = 1 (the call's own, the cluster's is 2) a member answers a key
    // it holds from its own memory: no quorum read.
    let quorum_reads = |raw: &mut Raw| -> u64 {
        parse_stats(&raw.ask(b"stats cluster\r\n"))["quorum_reads"]
            .parse()
            .expect("a number")
    };
    let before = quorum_reads(&mut raw2);
    let r1 = Options {
        read_quorum: Some(1),
        ..Options::default()
    };
    for i in 0..KEYS {
        let v = rt
            .run(node2.get_with(format!("m:{i}"), &r1))
            .expect("get at R=1");
        assert_eq!(v.map(|v| v.data), Some(format!("from-webvac-{i}").into()));
    }
    assert_eq!(
        quorum_reads(&mut raw2),
        before,
        "R=1 reads of held keys stay local"
    );
    assert!(rt.run(node2.get("m:0")).expect("get").is_some());
    assert!(
        quorum_reads(&mut raw2) > before,
        "the cluster's R=2 asks a peer"
    );

    // A counter with a request id: the retry through the other member
    // answers the first result and does not count again.
    rt.run(node1.set("views", "10", &Options::default()))
        .expect("set");
    let once = Options {
        request_id: Some("embedded-test-1".into()),
        ..Options::default()
    };
    assert_eq!(
        rt.run(node1.incr("views", 5, &once)).expect("incr"),
        Some(15)
    );
    assert_eq!(
        rt.run(node2.incr("views", 5, &once)).expect("retry"),
        Some(15)
    );
    assert_eq!(text_get(&mut raw3, "views").as_deref(), Some("15"));

    // Compare-and-swap with a CAS read through the other member.
    let read = rt.run(node2.get("e:0")).expect("get").expect("present");
    let cas = |node: &Node| rt.run(node.cas("e:0", "swapped", read.cas, &Options::default()));
    assert_eq!(cas(&node1).expect("cas"), CasOutcome::Stored);
    assert_eq!(cas(&node1).expect("cas again"), CasOutcome::Exists);
    assert_eq!(text_get(&mut raw3, "e:0").as_deref(), Some("swapped"));

    // The webvac process dies: both directions still work (N = 3, R = W = 2).
    drop(raw3);
    cluster.kill(3);
    wait_state(cluster.member(1).client, 3, |s| !is_up(s));
    for i in 0..KEYS {
        rt.run(node1.set(
            format!("d:{i}"),
            format!("while-3-down-{i}"),
            &Options::default(),
        ))
        .expect("embedded set with a member down");
        text_set(&mut raw2, &format!("n:{i}"), 0, &format!("via-node-2-{i}"));
    }
    for i in 0..KEYS {
        let want = format!("while-3-down-{i}");
        assert_eq!(text_get(&mut raw2, &format!("d:{i}")), Some(want));
        let want = format!("via-node-2-{i}");
        assert_eq!(embedded_get(&rt, &node1, &format!("n:{i}")), Some(want));
        // Written before the kill, still there.
        let want = format!("from-webvac-{i}");
        assert_eq!(embedded_get(&rt, &node2, &format!("m:{i}")), Some(want));
    }

    // It comes back (empty, refilling): it serves what was written while
    // it was down.
    cluster.restart(3);
    wait_all_up(&addrs);
    let mut raw3 = cluster.connect(3);
    for i in 0..KEYS {
        let want = format!("while-3-down-{i}");
        assert_eq!(text_get(&mut raw3, &format!("d:{i}")), Some(want));
    }

    // An embedded member shuts down: the webvac process and the other
    // embedded member carry on, both directions.
    rt.run(node1.shutdown()).expect("graceful shutdown");
    let refused = rt.run(node1.get("e:1"));
    assert!(
        matches!(refused, Err(ClientError::NoServer(_))),
        "a call after shutdown: {refused:?}"
    );
    assert!(
        Raw::connect_tcp(cluster.member(1).client).is_err(),
        "node 1's memcached port is closed"
    );
    wait_state(cluster.member(3).client, 1, |s| !is_up(s));
    text_set(&mut raw3, "after", 0, "node-1-left");
    assert_eq!(
        embedded_get(&rt, &node2, "after").as_deref(),
        Some("node-1-left")
    );
    rt.run(node2.set("after2", "from-node-2", &Options::default()))
        .expect("set with node 1 gone");
    assert_eq!(
        text_get(&mut raw3, "after2").as_deref(),
        Some("from-node-2")
    );
    rt.run(node2.shutdown()).expect("shutdown");
}

/// With one replica per key, each key lives on one member: a member
/// answers the keys it holds from its own memory, without a socket, and
/// fetches the others over the cluster transport. A client-only handle
/// holds nothing and reads everything.
#[test]
fn a_member_serves_its_own_keys_in_process_and_forwards_the_rest() {
    let _serial = exclusive();
    let rt = Embedded::new();
    let cluster = Cluster::start_members(Layout::new(3).replicas(1), &[3]);
    let node1 = rt.start_member(&cluster, 1);
    let node2 = rt.start_member(&cluster, 2);
    let addrs: Vec<(NodeId, std::net::SocketAddr)> =
        [1, 2, 3].map(|id| (id, cluster.member(id).client)).to_vec();
    wait_all_up(&addrs);

    let keys: Vec<String> = (0..60).map(|i| format!("k:{i}")).collect();
    let (mine, theirs): (Vec<&String>, Vec<&String>) = keys.iter().partition(|k| node1.holds(k));
    assert!(
        !mine.is_empty() && !theirs.is_empty(),
        "60 keys over 3 members: some are node 1's, some not"
    );
    let mut raw3 = cluster.connect(3);
    for k in &keys {
        text_set(&mut raw3, k, 0, &format!("v-{k}"));
    }
    let node1_cluster_stats = || {
        let mut raw1 = Raw::connect_tcp(cluster.member(1).client).expect("node 1's port");
        parse_stats(&raw1.ask(b"stats cluster\r\n"))
    };
    let forwarded = |s: &BTreeMap<String, String>| -> u64 { s["forwarded"].parse().unwrap() };
    let quorum_reads = |s: &BTreeMap<String, String>| -> u64 { s["quorum_reads"].parse().unwrap() };

    // Node 1's own keys: reads and writes stay in the process.
    let before = node1_cluster_stats();
    for k in &mine {
        assert_eq!(embedded_get(&rt, &node1, k), Some(format!("v-{k}")));
        rt.run(node1.set(k.as_str(), "local", &Options::default()))
            .expect("set");
    }
    let after = node1_cluster_stats();
    assert_eq!(
        forwarded(&after),
        forwarded(&before),
        "own keys are not forwarded"
    );
    assert_eq!(
        quorum_reads(&after),
        quorum_reads(&before),
        "own keys are read locally"
    );

    // The other members' keys: over the transport, and correct.
    for k in &theirs {
        assert_eq!(embedded_get(&rt, &node1, k), Some(format!("v-{k}")));
        rt.run(node1.set(k.as_str(), "remote", &Options::default()))
            .expect("set");
        assert_eq!(text_get(&mut raw3, k).as_deref(), Some("remote"));
    }
    let last = node1_cluster_stats();
    assert_eq!(
        forwarded(&last) - forwarded(&after),
        theirs.len() as u64,
        "each write of another member's key is forwarded once"
    );
    assert!(quorum_reads(&last) > quorum_reads(&after));

    // A client-only handle: the same operations, no data of its own.
    let seed = cluster.member(3).client;
    let client_only = rt
        .run(Node::builder().client_only(&[seed]).start())
        .expect("client-only handle");
    assert_eq!(client_only.role(), Role::ClientOnly);
    assert_eq!(client_only.node_id(), None);
    for k in &keys {
        assert!(!client_only.holds(k));
        let want = if node1.holds(k) { "local" } else { "remote" };
        assert_eq!(embedded_get(&rt, &client_only, k).as_deref(), Some(want));
    }
    let members: Vec<u16> = client_only.members().iter().map(|m| m.id).collect();
    assert_eq!(members, vec![1, 2, 3]);
    assert_eq!(node1.members().len(), 3);
    assert_eq!(
        node1.preference_list(&keys[0])[0],
        client_only.preference_list(&keys[0])[0],
        "the member and the client agree on the primary"
    );
    rt.run(client_only.shutdown())
        .expect("no-op for a client-only handle");
    rt.run(node1.shutdown()).expect("shutdown");
    rt.run(node2.shutdown()).expect("shutdown");
}

/// A lone embedded node: every operation, typed, with memcached's rules;
/// no port unless asked for; TTLs on the node's clock.
#[test]
fn a_lone_embedded_node_runs_every_operation() {
    let rt = Embedded::new();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let node = rt
        .run(Node::builder().clock(clock.clone()).start())
        .expect("start");
    assert_eq!(node.role(), Role::Member);
    assert_eq!(node.memcached_addr(), None, "no port unless asked");
    assert!(node.holds("anything"));
    let none = Options::default();
    let ttl = |secs: u32| Options {
        ttl: Some(secs),
        ..Options::default()
    };
    rt.run(async {
        assert!(node.set("a", "1", &ttl(10)).await.unwrap() > 0);
        assert!(!node.add("a", "x", &none).await.unwrap());
        assert!(node.add("b", "2", &none).await.unwrap());
        assert!(node.replace("b", "22", &none).await.unwrap());
        assert!(!node.replace("zz", "x", &none).await.unwrap());
        assert!(node.append("b", "3", &none).await.unwrap());
        assert!(node.prepend("b", "0", &none).await.unwrap());
        assert!(!node.append("zz", "x", &none).await.unwrap());
        let got = node.get_many(&["a", "b", "zz"]).await.unwrap();
        let values: Vec<Option<Vec<u8>>> = got
            .into_iter()
            .map(|v| v.map(|v| v.data.to_vec()))
            .collect();
        assert_eq!(
            values,
            vec![Some(b"1".to_vec()), Some(b"0223".to_vec()), None]
        );
        assert_eq!(node.incr("a", 41, &none).await.unwrap(), Some(42));
        assert_eq!(
            node.decr("a", 50, &none).await.unwrap(),
            Some(0),
            "decr stops at 0"
        );
        assert_eq!(node.incr("zz", 1, &none).await.unwrap(), None);
        assert!(matches!(node.incr("b", 1, &none).await, Ok(Some(224))));
        let cas = node.get("b").await.unwrap().unwrap().cas;
        assert_eq!(
            node.cas("b", "new", cas + 1, &none).await.unwrap(),
            CasOutcome::Exists
        );
        assert_eq!(
            node.cas("b", "new", cas, &none).await.unwrap(),
            CasOutcome::Stored
        );
        assert_eq!(
            node.cas("zz", "new", cas, &none).await.unwrap(),
            CasOutcome::NotFound
        );
        assert!(node.touch("b", 5).await.unwrap());
        assert!(!node.touch("zz", 5).await.unwrap());
        assert!(node.delete("b", &none).await.unwrap());
        assert!(!node.delete("b", &none).await.unwrap());
        assert!(matches!(
            node.get("").await,
            Err(ClientError::InvalidKey(_))
        ));
        let huge = vec![b'x'; 2 << 20];
        assert!(matches!(
            node.set("big", &huge, &none).await,
            Err(ClientError::Server(_))
        ));
    });
    // "a" was set with a 10 s TTL (incr and decr keep it).
    clock.advance_ms(9_000);
    assert!(rt.run(node.get("a")).unwrap().is_some());
    clock.advance_ms(2_000);
    assert_eq!(rt.run(node.get("a")).unwrap(), None, "expired after 10 s");
    // A binary key travels as base64, in-process too.
    rt.run(node.set(b"bin\x00 key\r\n".as_slice(), "ok", &none))
        .unwrap();
    assert_eq!(
        rt.run(node.get(b"bin\x00 key\r\n".as_slice()))
            .unwrap()
            .map(|v| v.data),
        Some("ok".into())
    );
    // The key listing works in-process.
    let keys: Vec<Vec<u8>> = rt.run(async {
        use futures_util::TryStreamExt;
        node.list_keys(100).try_collect().await.unwrap()
    });
    // "a" expired, "b" was deleted, "big" was refused: the binary key is all.
    assert_eq!(keys, vec![b"bin\x00 key\r\n".to_vec()]);
    rt.run(node.shutdown()).unwrap();
    rt.run(node.shutdown())
        .expect("a second shutdown is a no-op");
}

/// Several lone nodes in one process, one serving the memcached port: what
/// the embedded API writes, a memcached client reads, and each node has its
/// own data.
#[test]
fn several_nodes_run_in_one_process() {
    let rt = Embedded::new();
    let served = rt
        .run(
            Node::builder()
                .config(Config {
                    port: 0,
                    ..Config::default()
                })
                .serve_memcached(true)
                .start(),
        )
        .expect("start");
    let other = rt.run(Node::builder().start()).expect("start");
    let addr = served.memcached_addr().expect("served");
    rt.run(served.set("shared", "one", &Options::default()))
        .unwrap();
    rt.run(other.set("shared", "two", &Options::default()))
        .unwrap();
    let mut raw = Raw::connect_tcp(addr).expect("connect");
    assert_eq!(text_get(&mut raw, "shared").as_deref(), Some("one"));
    text_set(&mut raw, "from-text", 0, "hello");
    assert_eq!(
        embedded_get(&rt, &served, "from-text").as_deref(),
        Some("hello")
    );
    assert_eq!(embedded_get(&rt, &other, "from-text"), None);
    assert_eq!(embedded_get(&rt, &other, "shared").as_deref(), Some("two"));
    // The in-process calls count in the node's own stats, as a client's.
    let stats = parse_stats(&raw.ask(b"stats\r\n"));
    assert_eq!(stats["cmd_set"], "2");
    drop(raw);
    rt.run(served.shutdown()).unwrap();
    rt.run(other.shutdown()).unwrap();
}
