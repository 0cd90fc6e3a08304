//! Multi-gets of any length (issue 17, item 1): memcached answers a `get`
//! line of any length, and clients rely on it (python-memcached sends one
//! line per server, 1.3 MB for 20,000 keys of 64 bytes). webvac closed the
//! connection at a 1 MiB line, and clients then returned nothing and marked
//! the server dead. A long line is now served in pieces as it arrives.
//!
//! Each test runs the same bytes against the reference memcached and
//! against webvac (one node, and a node of a three-node cluster at R = 2),
//! and asserts byte-for-byte equal replies, or where webvac differs on
//! purpose (a bad key far down a long line), exactly the documented reply.

mod common;

use std::time::Duration;

use common::cluster::{Cluster, Layout, exclusive};
use common::hostile::{MIB, bound, pid_and_budget, set_value, stats, wait_for};
use common::{Client, Memcached, Server, proc_status_bytes, stat_value};

/// A reply this large takes a while through a debug build's cluster.
const LONG_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The keys of a long line: 64 bytes each, as python-memcached's were.
fn key(i: usize) -> String {
    format!("{i:0>64}")
}

/// Stores every `every`th of `keys` keys, values of 1 to 1,000 bytes (so
/// the reply is larger than what the sockets buffer between a client that
/// sends the whole line before it reads, and the server).
fn load(c: &mut Client, keys: usize, every: usize) {
    let mut batch = Vec::new();
    for i in (0..keys).step_by(every) {
        let len = 1 + i % 1000;
        batch.extend_from_slice(format!("set {} {} 0 {len} noreply\r\n", key(i), i % 7).as_bytes());
        batch.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, len));
        batch.extend_from_slice(b"\r\n");
        if batch.len() > 256 * 1024 {
            batch.extend_from_slice(b"mn\r\n");
            c.request(&batch, &[b"MN\r\n"]);
            batch.clear();
        }
    }
    batch.extend_from_slice(b"mn\r\n");
    c.request(&batch, &[b"MN\r\n"]);
}

/// `cmd` and the keys `0..keys`, one line, then `mn` (so the reply is
/// framed by its `MN`). Sent whole before anything is read, as a blocking
/// client does.
fn ask_long(c: &mut Client, cmd: &str, keys: usize) -> Vec<u8> {
    let mut line = cmd.as_bytes().to_vec();
    for i in 0..keys {
        line.push(b' ');
        line.extend_from_slice(key(i).as_bytes());
    }
    line.extend_from_slice(b"\r\nmn\r\n");
    c.send(&line).expect("send the line");
    c.read_until_suffix(&[b"MN\r\n"], LONG_REPLY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{cmd} of {keys} keys: {e}"))
}

/// The replies a server gives to `cmds`, after the same load, and then to
/// a short get on the same connection.
fn replies(c: &mut Client, cmds: &[&str]) -> Vec<Vec<u8>> {
    const KEYS: usize = 20_000;
    load(c, KEYS, 2);
    let mut got: Vec<Vec<u8>> = cmds.iter().map(|cmd| ask_long(c, cmd, KEYS)).collect();
    got.push(c.request(format!("get {}\r\n", key(0)).as_bytes(), &[b"END\r\n"]));
    got
}

/// Issue 17, item 1: a `get` of 20,000 keys of 64 bytes in one line, 1.3
/// MB, half of them stored, and a `gat` of the same (memcached closes the
/// connection on a `gat` line past 2 KiB, so its answer is checked against
/// memcached's `get`: `gat 0` answers the same values). Before: the
/// connection was closed at 1 MiB, with no reply.
#[test]
fn a_multi_get_of_20000_keys_in_one_line_answers_as_memcached() {
    let _serial = exclusive();
    let memcached = Memcached::start();
    let expected = replies(&mut memcached.connect(), &["get"]);
    assert!(
        expected[0].len() > 4 << 20,
        "the reply outgrows what the sockets buffer"
    );
    let expected = [&expected[0], &expected[0], &expected[1]];
    let server = Server::start(&[]);
    let cluster = Cluster::start(Layout::new(3).quorums(2, 2));
    for (name, mut c) in [
        ("one node", server.connect()),
        ("a cluster node", cluster.connect(1)),
    ] {
        let got = replies(&mut c, &["get", "gat 0"]);
        for (what, (want, got)) in ["get", "gat 0", "the next get"]
            .iter()
            .zip(expected.iter().zip(&got))
        {
            assert!(
                *want == got,
                "{name}, {what}: {} bytes, memcached {} bytes; first difference at {:?}",
                got.len(),
                want.len(),
                want.iter().zip(got).position(|(a, b)| a != b)
            );
        }
    }
}

/// A key over 250 bytes past the first piece of a long line: the values
/// already sent stand, the reply ends with memcached's error, the rest of
/// the line is discarded, and the next command is answered as usual.
/// (memcached, which buffers the line whole, sends the error alone.)
#[test]
fn a_long_key_far_down_a_long_line_ends_its_reply_with_the_error() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    load(&mut c, 4000, 1);
    let mut line = b"get".to_vec();
    for i in 0..4000 {
        line.push(b' ');
        line.extend_from_slice(key(i).as_bytes());
    }
    line.push(b' ');
    line.extend_from_slice(&[b'x'; 300]);
    for i in 0..4000 {
        line.push(b' ');
        line.extend_from_slice(key(i).as_bytes());
    }
    line.extend_from_slice(b"\r\nget ");
    line.extend_from_slice(key(1).as_bytes());
    line.extend_from_slice(b"\r\n");
    c.send(&line).expect("send");
    let reply = c
        .read_until_suffix(&[b"END\r\n"], LONG_REPLY_TIMEOUT)
        .expect("a reply");
    let error = b"CLIENT_ERROR bad command line format\r\n";
    let at = reply
        .windows(error.len())
        .position(|w| w == error)
        .expect("the error");
    let values = &reply[..at];
    assert!(
        values.starts_with(b"VALUE ") && values.ends_with(b"\r\n"),
        "whole values before it"
    );
    assert!(!values.windows(5).any(|w| w == b"END\r\n"));
    assert_eq!(
        String::from_utf8_lossy(&reply[at + error.len()..]),
        format!("VALUE {} 1 2\r\nbb\r\nEND\r\n", key(1)),
        "the next command, answered once"
    );
}

/// A client that sends a long line of keys with large values and never
/// reads: what it is owed waits in the in-flight budget, past it the get
/// is refused (memcached's out-of-memory answer ends the reply, the rest of
/// the line is read and discarded), the data timeout closes the connection,
/// and the node stays within its bound and serves others throughout.
#[test]
fn a_long_line_from_a_client_that_never_reads_is_held_to_the_budget() {
    let _serial = exclusive();
    let server = Server::start(&["-m", "64", "--data-timeout", "2"]);
    let mut good = server.connect();
    let (pid, limit) = pid_and_budget(&mut good);
    // 20 values of 500 KB.
    for i in 0..20 {
        set_value(&mut good, &format!("big{i}"), &[b'v'; 500_000]);
    }
    assert_eq!(good.ask(b"set small 0 0 1\r\ns\r\n"), "STORED\r\n");
    // 200,000 keys naming them: 1.4 MB of line, 100 GB of reply.
    let mut line = b"get".to_vec();
    for i in 0..200_000 {
        line.extend_from_slice(format!(" big{}", i % 20).as_bytes());
    }
    line.extend_from_slice(b"\r\n");
    let mut hostile = server.connect();
    // Sent whole: the node reads the line on while the reply waits.
    hostile.send(&line).expect("the whole line is read");
    let mut held_max = 0;
    wait_for("the hostile connection to be closed", || {
        let s = stats(&mut good, "");
        held_max = held_max.max(stat_value(&s, "inflight_bytes"));
        assert_eq!(
            good.ask(b"get small\r\n"),
            "VALUE small 0 1\r\ns\r\nEND\r\n"
        );
        stat_value(&s, "data_timeouts") > 0 && stat_value(&s, "inflight_bytes") == 0
    });
    assert!(held_max <= limit, "{held_max} bytes held past the budget");
    let peak = proc_status_bytes(pid, "VmHWM:");
    eprintln!(
        "peak RSS {} MiB, budget held at most {} of {} MiB",
        peak / MIB,
        held_max / MIB,
        limit / MIB
    );
    assert!(peak <= bound(64, 2), "peak RSS {} MiB", peak / MIB);
}

/// Found in review: a long line whose newline never comes, from a client
/// that never reads, kept what it was owed in the in-flight budget for
/// ever (the data timeout looked only at request bytes, and each piece
/// cleared them), so two such clients starved every other of the budget.
/// Its replies now hold the data timeout from when writing last made
/// progress, however much more of the line it sends.
#[test]
fn an_unending_line_from_a_client_that_never_reads_is_closed_by_the_data_timeout() {
    let _serial = exclusive();
    let server = Server::start(&["-m", "64", "--data-timeout", "2"]);
    let mut good = server.connect();
    for i in 0..20 {
        set_value(&mut good, &format!("big{i}"), &[b'v'; 500_000]);
    }
    let mut line = b"get".to_vec();
    for i in 0..30_000 {
        line.extend_from_slice(format!(" big{}", i % 20).as_bytes());
    }
    // No newline, ever; and nothing is read.
    let mut hostile = server.connect();
    hostile.send(&line).expect("the line is read on");
    wait_for(
        "the data timeout to close it and give the budget back",
        || {
            let s = stats(&mut good, "");
            stat_value(&s, "data_timeouts") > 0 && stat_value(&s, "inflight_bytes") == 0
        },
    );
    assert_eq!(good.ask(b"get big0 none\r\n").len(), 500_000 + 28);
}
