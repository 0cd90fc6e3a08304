//! `webvac stats` and `webvac cluster status|partitions|repair` against
//! real clusters: all up and agreeing, one replica stale, one node down,
//! and anti-entropy repairing the stale one while `repair` watches.

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::{Cluster, Layout};
use common::hostile::wait_for;
use common::{Server, run_bounded};
use serde_json::Value;

const WEBVAC_BIN: &str = env!("CARGO_BIN_EXE_webvac");
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `webvac ARGS`; returns its exit success and stdout (stderr on
/// failure).
fn webvac(args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(WEBVAC_BIN);
    cmd.args(args);
    let out = run_bounded(cmd, RUN_TIMEOUT);
    let ok = out.status.is_some_and(|s| s.success());
    (ok, if ok { out.stdout } else { out.stderr })
}

fn json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out) = webvac(&all);
    assert!(ok, "webvac {all:?}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn n(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {path} in {v}"))
}

#[test]
fn stats_prints_a_table_and_json() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.ask(b"set a 0 0 1\r\nx\r\n");
    let node = server.addr().to_string();
    let doc = json(&["stats", "--node", &node]);
    assert_eq!(n(&doc, "/curr_items"), 1);
    assert_eq!(doc["version"], "1.6.18");
    let (ok, table) = webvac(&["stats", "--node", &node]);
    assert!(ok, "{table}");
    let line = table
        .lines()
        .find(|l| l.starts_with("curr_items "))
        .unwrap_or_else(|| panic!("{table}"));
    assert_eq!(line.split_whitespace().nth(1), Some("1"), "{table}");
    let (ok, settings) = webvac(&["stats", "--node", &node, "settings"]);
    assert!(ok && settings.contains("maxconns"), "{settings}");
    // A reader that stops early (`| head -1`) ends it quietly: killed by
    // SIGPIPE like any filter, not a panic.
    let mut cmd = Command::new(WEBVAC_BIN);
    cmd.args(["stats", "--node", &node])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success()
            || std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(libc_sigpipe()),
        "{:?} {stderr}",
        out.status
    );
    // A node that is not there: a clear error and a failed exit.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .to_string();
    let (ok, err) = webvac(&["stats", "--node", &closed]);
    assert!(!ok && err.contains("cannot connect"), "{err}");
    // A single node has no cluster to describe.
    let (ok, err) = webvac(&["cluster", "status", "--node", &node]);
    assert!(!ok && err.contains("stats cluster"), "{err}");
}

/// Members listed with one shared wildcard client address (as on hosts
/// that each bind 0.0.0.0:11211): the commands reach each member through
/// its peer host, and a node that answers as another member is not taken
/// for it. (Before: every member was asked at `--node`'s host, node 1
/// answered for all three, and status said every partition agreed.)
#[test]
fn a_member_answering_for_another_is_not_taken_for_it() {
    let _serial = common::cluster::exclusive();
    let ports: Vec<u16> = (0..4)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port()
        })
        .collect();
    let client = ports[0];
    let mut args = vec!["--node-id".to_string(), "1".to_string()];
    for (id, peer) in ports.iter().enumerate().skip(1) {
        args.push("--member".into());
        args.push(format!("{id}=0.0.0.0:{client},127.0.0.1:{peer}"));
    }
    let node = Server::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let addr = format!("127.0.0.1:{client}");
    let mut c = node.connect();
    c.ask(b"set a 0 0 1\r\nx\r\n");
    let status = json(&["cluster", "status", "--node", &addr]);
    assert_eq!(n(&status, "/replicas_agree/agree"), 0, "{status}");
    let unreachable = status["unreachable"].as_array().unwrap();
    assert_eq!(unreachable.len(), 2, "{status}");
    for u in unreachable {
        assert!(
            u["error"].as_str().unwrap().contains("answers as node 1"),
            "{status}"
        );
    }
    let repair = json(&["cluster", "repair", "--node", &addr]);
    assert_eq!(
        repair["unreachable"].as_array().unwrap().len(),
        2,
        "{repair}"
    );
    // And `webvac stats` asks only the groups that read.
    let (ok, err) = webvac(&["stats", "--node", &addr, "reset"]);
    assert!(!ok && err.contains("only the groups that read"), "{err}");
    let after = common::hostile::stats(&mut c, "");
    assert!(
        common::stat_value(&after, "total_connections") >= 4,
        "the counters were not reset: {after}"
    );
}

#[test]
fn cluster_status_and_partitions_with_a_stale_replica_and_a_node_down() {
    let _serial = common::cluster::exclusive();
    // Nothing repairs behind the test's back: a replica restarted empty
    // stays stale.
    let mut cluster = Cluster::start(
        Layout::new(3)
            .quorums(1, 3)
            .no_anti_entropy()
            .no_hints()
            .no_refill(),
    );
    let ids = cluster.ids();
    let node = cluster.member(ids[0]).client.to_string();
    let mut c = cluster.connect(ids[0]);
    for i in 0..300 {
        assert_eq!(
            c.ask(format!("set key{i} 0 0 1\r\nv\r\n").as_bytes()),
            "STORED\r\n"
        );
    }
    let status = json(&["cluster", "status", "--node", &node]);
    let partitions = n(&status, "/partitions");
    assert_eq!(n(&status, "/replicas"), 3);
    assert_eq!(status["members"].as_array().unwrap().len(), 3);
    for m in status["members"].as_array().unwrap() {
        assert!(m["state"] == "up" || m["state"] == "self", "{status}");
        assert_eq!(m["holds_share"].as_f64(), Some(1.0), "N=3 of 3: {status}");
    }
    assert_eq!(n(&status, "/replicas_agree/agree"), partitions, "{status}");
    let (ok, table) = webvac(&["cluster", "status", "--node", &node]);
    assert!(ok, "{table}");
    assert!(table.starts_with("cluster of 3 members"), "{table}");
    assert!(
        table.contains(&format!(
            "replicas: {partitions} partitions agree, 0 differ"
        )),
        "{table}"
    );

    // Node 3 restarted empty: every partition holding a key differs.
    cluster.kill(ids[2]);
    cluster.restart(ids[2]);
    let doc = json(&["cluster", "partitions", "--node", &node]);
    let differ = n(&doc, "/differ");
    assert!(differ > 0 && differ <= 300, "{doc}");
    assert_eq!(n(&doc, "/agree") + differ, partitions, "{doc}");
    let listed = doc["partitions"].as_array().unwrap();
    assert_eq!(listed.len() as u64, differ, "only the differing are listed");
    for p in listed {
        assert_eq!(p["replicas"], "differ");
        let empty = p["holders"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["member"] == ids[2])
            .unwrap_or_else(|| panic!("{p}"));
        assert_eq!(empty["keys"], 0, "{p}");
    }
    let all = json(&["cluster", "partitions", "--node", &node, "--all"]);
    assert_eq!(
        all["partitions"].as_array().unwrap().len() as u64,
        partitions
    );

    // Node 2 down: it shows so, and its partitions cannot all be checked.
    cluster.kill(ids[1]);
    wait_for("node 1 sees node 2 down", || {
        let s = json(&["cluster", "status", "--node", &node]);
        s["members"][1]["state"] != "up"
    });
    let s = json(&["cluster", "status", "--node", &node]);
    assert_eq!(s["unreachable"][0]["id"], ids[1], "{s}");
    assert_eq!(n(&s, "/replicas_agree/agree"), 0, "{s}");
    let (ok, table) = webvac(&["cluster", "status", "--node", &node]);
    assert!(ok, "{table}");
    assert!(
        table.contains(&format!("member {} could not be asked", ids[1])),
        "{table}"
    );
}

#[test]
fn cluster_repair_shows_anti_entropy_mending_a_stale_replica() {
    let _serial = common::cluster::exclusive();
    let mut cluster = Cluster::start(
        Layout::new(3)
            .quorums(1, 3)
            .no_hints()
            .no_refill()
            .anti_entropy_interval_ms(200),
    );
    let ids = cluster.ids();
    let node = cluster.member(ids[0]).client.to_string();
    let mut c = cluster.connect(ids[0]);
    for i in 0..200 {
        c.ask(format!("set key{i} 0 0 1\r\nv\r\n").as_bytes());
    }
    wait_for("every pair compared", || {
        let r = json(&["cluster", "repair", "--node", &node]);
        let pairs = r["pairs"].as_array().unwrap();
        pairs.len() == 3 && pairs.iter().all(|p| n(p, "/exchanges") > 0)
    });
    let r = json(&["cluster", "repair", "--node", &node]);
    for m in r["members"].as_array().unwrap() {
        assert_eq!(n(m, "/errors"), 0, "no member was down yet: {r}");
    }
    cluster.kill(ids[2]);
    cluster.restart(ids[2]);
    wait_for("anti-entropy refills the empty replica", || {
        let doc = json(&["cluster", "partitions", "--node", &node]);
        n(&doc, "/differ") == 0 && n(&doc, "/unchecked") == 0
    });
    let r = json(&["cluster", "repair", "--node", &node]);
    let moved: u64 = r["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["members"][1] == ids[2])
        .map(|p| n(p, "/keys_moved"))
        .sum();
    assert!(moved >= 200, "keys moved to the empty replica: {r}");
    for m in r["members"].as_array().unwrap() {
        assert_eq!(m["anti_entropy"], true, "{r}");
        // A round that was talking to the member as it was killed counts
        // an error; the count is reported, whatever it is.
        assert!(m["errors"].is_u64(), "{r}");
    }
    for p in r["pairs"].as_array().unwrap() {
        assert!(p["last_compared_ms_ago"].is_u64(), "{r}");
    }
    let (ok, table) = webvac(&["cluster", "repair", "--node", &node]);
    assert!(ok, "{table}");
    assert!(table.contains("LAST COMPARED"), "{table}");
    assert!(table.contains(&format!("{}-{}", ids[0], ids[1])), "{table}");
}

/// SIGPIPE's number on Linux.
fn libc_sigpipe() -> i32 {
    13
}

/// The operator commands reach a node that speaks only TLS (`-Z`) and
/// requires authentication (`-Y`): `--tls --tls-ca` and `--auth`; a node
/// they cannot trust, or a wrong password, fails with the reason.
#[test]
fn stats_over_tls_with_authentication() {
    let files = common::tls::Files::new("admin-cli");
    let users = files.dir.join("users");
    common::tls::write(&users, "ops:secret\n");
    let mut args = files.server_args("");
    args.push("-Y".into());
    args.push(users.display().to_string());
    let server = Server::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let node = server.addr().to_string();
    let ca = files.path("ca.pem");
    let tls = ["--tls", "--tls-ca", ca.as_str()];
    let mut ok_args = vec!["stats", "--node", node.as_str()];
    ok_args.extend(tls);
    ok_args.extend(["--auth", "ops:secret"]);
    let doc = json(&ok_args);
    assert_eq!(doc["version"], "1.6.18", "{doc}");
    assert!(n(&doc, "/auth_cmds") >= 1, "{doc}");

    let mut wrong = vec!["stats", "--node", node.as_str()];
    wrong.extend(tls);
    wrong.extend(["--auth", "ops:wrong"]);
    let (ok, err) = webvac(&wrong);
    assert!(!ok && err.contains("authentication refused"), "{err}");

    let other = common::tls::Ca::new("untrusted");
    common::tls::write(&files.dir.join("other.pem"), &other.pem);
    let other_ca = files.path("other.pem");
    let (ok, err) = webvac(&[
        "stats",
        "--node",
        &node,
        "--tls",
        "--tls-ca",
        &other_ca,
        "--auth",
        "ops:secret",
    ]);
    assert!(!ok && err.contains("TLS handshake"), "{err}");

    let (ok, err) = webvac(&["stats", "--node", &node, "--auth", "ops:secret"]);
    assert!(!ok, "plaintext to a TLS port: {err}");
}

/// `webvac cluster quorums R W`: the members decide a new layout epoch and
/// `cluster status` shows it; a value outside 1..=N is refused with the
/// node's reason and a failing exit.
#[test]
fn cluster_quorums_decides_a_new_epoch_that_status_shows() {
    let _serial = common::cluster::exclusive();
    let cluster = Cluster::start(Layout::new(3).quorums(2, 2));
    let ids = cluster.ids();
    let node = cluster.member(ids[1]).client.to_string();
    // The members recover their votes within a second of starting (a
    // founder that recovered last asks for an empty decree first).
    let e0 = cluster.all_voting();
    let mut last = (false, String::new());
    wait_for("the change decided", || {
        last = webvac(&["cluster", "quorums", "1", "3", "--node", &node]);
        last.0
    });
    assert_eq!(
        last.1,
        format!(
            "layout epoch {}: R=1 W=3; every member follows it\n",
            e0 + 1
        )
    );
    let other = cluster.member(ids[2]).client.to_string();
    wait_for("another member at the change's epoch", || {
        let status = json(&["cluster", "status", "--node", &other]);
        n(&status, "/epoch") == e0 + 1 && n(&status, "/write_quorum") == 3
    });
    let (ok, table) = webvac(&["cluster", "status", "--node", &other]);
    assert!(ok, "{table}");
    assert!(
        table.starts_with(&format!(
            "cluster of 3 members, layout epoch {}, 1024 partitions, N=3 R=1 W=3",
            e0 + 1
        )),
        "{table}"
    );
    let (ok, err) = webvac(&["cluster", "quorums", "4", "1", "--node", &node]);
    assert!(!ok);
    assert!(
        err.contains("CLIENT_ERROR quorums must be within 1..=3 (N)"),
        "{err}"
    );
    let doc = json(&["cluster", "quorums", "2", "2", "--node", &other]);
    assert_eq!(n(&doc, "/epoch"), e0 + 2, "{doc}");
}
