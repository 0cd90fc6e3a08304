//! Clock and partition fault injection (`[faults] clock_offset_ms`,
//! `clock_rate`, `drop_peers`, `control`), black-box against real `webvac`
//! processes: what a skewed clock does to the versions a node stamps, what a
//! dropped-peer partition looks like from every side, and that the `fault`
//! command exists only where `control` is on.
//!
//! A version is an HLC stamp whose physical part is the stamping node's clock
//! (`webvac::store::hlc::version_unix_ms`), and `mg <key> c` returns it as
//! the CAS: so the CAS shows which time the node read.

mod common;

use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::cluster::{Cluster, Layout, NodeId, exclusive, member_states, parse_stats};
use common::{Client, Server};
use webvac::store::hlc::version_unix_ms;

/// Slack between the time a test reads and the time the node stamps: one
/// request on loopback, plus scheduling noise on a busy 2-core machine.
const STAMP_SLACK_MS: i64 = 1_500;
/// Hop timeout of the cluster tests: also how long a silent peer takes to be
/// marked down, so partitions show quickly.
const REQUEST_TIMEOUT_MS: u64 = 300;

fn now_ms() -> i64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    i64::try_from(ms).expect("fits")
}

/// Sets `key` and returns how far ahead of the test's clock the node's
/// version stamp for it is, in ms.
fn stamp_skew_ms(client: &mut Client, key: &str) -> i64 {
    assert_eq!(
        client.ask(format!("set {key} 0 0 1\r\nx\r\n").as_bytes()),
        "STORED\r\n"
    );
    let before = now_ms();
    let reply = client.ask(format!("mg {key} c\r\n").as_bytes());
    let cas: u64 = reply
        .trim_end()
        .strip_prefix("HD c")
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("mg {key} c answered {reply:?}"));
    i64::try_from(version_unix_ms(cas)).expect("fits") - before
}

fn assert_near(skew: i64, want: i64, what: &str) {
    assert!(
        (skew - want).abs() <= STAMP_SLACK_MS,
        "{what}: stamp is {skew} ms off real time, want {want} ± {STAMP_SLACK_MS}"
    );
}

fn stats(client: &mut Client) -> std::collections::BTreeMap<String, String> {
    parse_stats(&client.ask(b"stats\r\n"))
}

#[test]
fn without_control_the_fault_command_is_an_unknown_command() {
    let server = Server::start(&["--fault-clock-offset-ms", "5000"]);
    let mut c = server.connect();
    for line in [
        &b"fault clock_offset_ms 0\r\n"[..],
        b"fault clock_rate 1.0\r\n",
        b"fault drop_peers -\r\n",
        b"fault nonsense\r\n",
        b"fault\r\n",
    ] {
        assert_eq!(c.ask(line), "ERROR\r\n", "{line:?}");
    }
    // The configured offset holds, and stats shows it, control or not.
    assert_near(
        stamp_skew_ms(&mut c, "k"),
        5000,
        "--fault-clock-offset-ms 5000",
    );
    let s = stats(&mut c);
    assert_eq!(s["fault_control"], "0");
    assert_eq!(s["fault_clock_offset_ms"], "5000");
    // A node without clock or partition faults reports none.
    let plain = Server::start(&[]);
    let s = stats(&mut plain.connect());
    assert!(!s.keys().any(|k| k.starts_with("fault_")), "{s:?}");
}

#[test]
fn the_clock_offset_and_rate_move_the_versions_a_node_stamps() {
    let server = Server::start(&["--fault-control", "--fault-clock-offset-ms", "-30000"]);
    let mut c = server.connect();
    assert_near(stamp_skew_ms(&mut c, "a"), -30_000, "offset from the flag");
    assert_eq!(c.ask(b"fault clock_offset_ms 60000\r\n"), "OK\r\n");
    assert_near(
        stamp_skew_ms(&mut c, "b"),
        60_000,
        "offset from the command",
    );
    let s = stats(&mut c);
    assert_eq!(
        (
            s["fault_control"].as_str(),
            s["fault_clock_offset_ms"].as_str()
        ),
        ("1", "60000")
    );
    // `time` is the node's clock too.
    let time: i64 = s["time"].parse().unwrap();
    assert!(
        (time * 1000 - now_ms() - 60_000).abs() <= STAMP_SLACK_MS + 1000,
        "{time}"
    );

    // Double speed from here: over 2 s of real time it gains 2 s more.
    assert_eq!(c.ask(b"fault clock_rate 2\r\n"), "OK\r\n");
    let start = stamp_skew_ms(&mut c, "c");
    thread::sleep(Duration::from_secs(2));
    let gained = stamp_skew_ms(&mut c, "d") - start;
    assert!(
        (1_500..=2_500 + STAMP_SLACK_MS).contains(&gained),
        "gained {gained} ms"
    );
    let s = stats(&mut c);
    assert_eq!(s["fault_clock_rate"], "2");
    let skew: i64 = s["fault_clock_skew_ms"].parse().unwrap();
    assert!((61_500..70_000).contains(&skew), "skew {skew}");
    // A new offset drops the drift gained: back in sync, still fast.
    assert_eq!(c.ask(b"fault clock_offset_ms 0\r\n"), "OK\r\n");
    let skew: i64 = stats(&mut c)["fault_clock_skew_ms"].parse().unwrap();
    assert!((0..500).contains(&skew), "skew {skew}");

    // Bad values are refused and change nothing.
    for line in [
        &b"fault clock_rate 3\r\n"[..],
        b"fault clock_rate 0\r\n",
        b"fault clock_offset_ms 1.5\r\n",
        b"fault clock_offset_ms 99999999999999\r\n",
        b"fault drop_peers 2\r\n", // a single node has no peers
        b"fault drop_peers x\r\n",
        b"fault bogus 1\r\n",
        b"fault clock_rate\r\n",
    ] {
        assert_eq!(
            c.ask(line),
            "CLIENT_ERROR bad command line format\r\n",
            "{line:?}"
        );
    }
    assert_eq!(c.ask(b"fault drop_peers -\r\n"), "OK\r\n");
    assert_eq!(stats(&mut c)["fault_clock_rate"], "2");
}

#[test]
fn a_bad_fault_flag_is_refused_at_start() {
    for args in [
        &["--fault-clock-rate", "0"][..],
        &["--fault-clock-rate", "2.5"],
        &["--fault-drop-peers", "2"], // no cluster
        &["--fault-drop-peers", "2,,3"],
    ] {
        let out = common::run_bounded(
            {
                let mut cmd = std::process::Command::new(common::WEBVAC_BIN);
                cmd.args(["-p", "0"]).args(args);
                cmd
            },
            Duration::from_secs(20),
        );
        let status = out.status.expect("exits by itself");
        // 1: the configuration was refused; 2: clap refused the flag. Not a
        // panic (101), not a start.
        assert!(
            matches!(status.code(), Some(1 | 2)),
            "{args:?}: {status}\n{}",
            out.stderr
        );
        assert!(
            out.stderr.contains("fault") || out.stderr.contains("drop"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

/// Polls `observer`'s view of `member` until `want` holds.
fn wait_state(cluster: &Cluster, observer: NodeId, member: NodeId, want: fn(&str) -> bool) {
    cluster.wait_member_state(observer, member, want);
}

fn is_down(state: &str) -> bool {
    state.starts_with("down")
}

fn is_up(state: &str) -> bool {
    state == "up"
}

#[test]
fn drop_peers_partitions_nodes_until_healed() {
    let _serial = exclusive();
    let mut cluster = Cluster::start(
        Layout::new(3)
            .quorums(2, 2)
            .request_timeout_ms(REQUEST_TIMEOUT_MS)
            .fault_control(),
    );
    // Node 3 cut off from both others: everyone sees it down, it sees them
    // down, and with only itself it cannot reach W = 2.
    cluster.isolate(3);
    for observer in [1, 2] {
        wait_state(&cluster, observer, 3, is_down);
    }
    wait_state(&cluster, 3, 1, is_down);
    wait_state(&cluster, 3, 2, is_down);
    let mut c3 = cluster.connect(3);
    let reply = c3.ask(b"set iso 0 0 1\r\nx\r\n");
    assert!(reply.starts_with("SERVER_ERROR"), "{reply:?}");
    let mut c1 = cluster.connect(1);
    assert_eq!(c1.ask(b"set maj 0 0 1\r\ny\r\n"), "STORED\r\n");
    let s = stats(&mut c3);
    assert_eq!(s["fault_drop_peers"], "1,2");
    assert!(
        s["fault_peer_frames_dropped"].parse::<u64>().unwrap() > 0,
        "{s:?}"
    );
    cluster.heal(3);
    cluster.wait_ready();
    assert_eq!(stats(&mut c3)["fault_drop_peers"], "-");
    assert_eq!(
        cluster.connect(3).ask(b"mg maj v\r\n"),
        "VA 1\r\ny\r\n",
        "node 3 reads the majority's write after the heal"
    );

    // One side's setting cuts both directions: node 1 drops node 2, and
    // node 2, which drops nothing, sees node 1 down too.
    cluster.partition(1, &[2]);
    wait_state(&cluster, 2, 1, is_down);
    wait_state(&cluster, 1, 2, is_down);
    assert_eq!(
        member_states(&common::cluster::cluster_stats(&mut cluster.connect(3)))[&1],
        "up"
    );
    cluster.heal(1);
    cluster.wait_ready();

    // From the flag, and the runtime setting lost on restart: node 3
    // restarts cut off by its flags, heals at run time, and a runtime
    // offset it had is gone.
    cluster.set_clock_offset(2, 1000);
    cluster.kill(2);
    cluster.restart(2);
    assert_eq!(stats(&mut cluster.connect(2))["fault_clock_offset_ms"], "0");
    cluster.set_node_args(3, vec!["--fault-drop-peers".into(), "1,2".into()]);
    cluster.kill(3);
    cluster.restart_listening(3);
    // Long enough for several dials both ways: a leaky partition would
    // show node 3 up by now.
    thread::sleep(Duration::from_millis(4 * REQUEST_TIMEOUT_MS));
    wait_state(&cluster, 1, 3, is_down);
    wait_state(&cluster, 3, 2, is_down);
    cluster.heal(3);
    cluster.wait_ready();
    wait_state(&cluster, 1, 3, is_up);
}
