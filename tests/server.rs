//! Black-box tests: the real `webvac` binary on 127.0.0.1:0, raw bytes.
//! Connection handling, limits and abuse; protocol replies are covered
//! byte-for-byte by the differential test against memcached.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::{Client, REPLY_TIMEOUT, Server};

/// A client whose `version` is answered, retrying (boundedly) while closed
/// connections release their slots asynchronously.
fn connect_when_a_slot_frees(server: &Server) -> Option<Client> {
    for _ in 0..500 {
        let mut c = server.connect();
        c.send(b"version\r\n").ok()?;
        if let Ok(r) = c.read_until_suffix(&[b"\r\n"], REPLY_TIMEOUT) {
            if r.starts_with(b"VERSION") {
                return Some(c);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

const END: &[&[u8]] = &[b"END\r\n"];

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let mut batch = Vec::new();
    for i in 0..500 {
        batch.extend_from_slice(
            format!("set k{i} {i} 0 {}\r\nv{i}\r\n", format!("v{i}").len()).as_bytes(),
        );
    }
    for i in 0..500 {
        batch.extend_from_slice(format!("get k{i}\r\n").as_bytes());
    }
    batch.extend_from_slice(b"mn\r\n");
    let reply = c.request(&batch, &[b"MN\r\n"]);
    let mut expected = b"STORED\r\n".repeat(500);
    for i in 0..500 {
        expected.extend_from_slice(
            format!(
                "VALUE k{i} {i} {}\r\nv{i}\r\nEND\r\n",
                format!("v{i}").len()
            )
            .as_bytes(),
        );
    }
    expected.extend_from_slice(b"MN\r\n");
    assert_eq!(reply, expected);
}

/// Multi-gets are looked up in prefetched batches of 16 keys: a 40-key get
/// (three batches, the last partial) with misses and a repeated key must
/// answer every key in order.
#[test]
fn long_multi_gets_answer_every_key_in_order() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    for i in (0..40).step_by(3) {
        let reply = c.request(format!("set m{i} {i} 0 1\r\nx\r\n").as_bytes(), &[b"\r\n"]);
        assert_eq!(reply, b"STORED\r\n");
    }
    let keys: Vec<String> = (0..40)
        .map(|i| format!("m{}", if i == 39 { 0 } else { i }))
        .collect();
    let reply = c.request(
        format!("get {}\r\n", keys.join(" ")).as_bytes(),
        &[b"END\r\n"],
    );
    let mut expected = Vec::new();
    for i in (0..40).map(|i| if i == 39 { 0 } else { i }) {
        if i % 3 == 0 {
            expected.extend_from_slice(format!("VALUE m{i} {i} 1\r\nx\r\n").as_bytes());
        }
    }
    expected.extend_from_slice(b"END\r\n");
    assert_eq!(
        String::from_utf8_lossy(&reply),
        String::from_utf8_lossy(&expected)
    );
}

#[test]
fn max_size_values_round_trip_and_oversized_ones_are_swallowed() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let value = vec![b'v'; 1_048_516]; // the largest value -I 1m allows for a 1-byte key
    let mut req = format!("set k 0 0 {}\r\n", value.len()).into_bytes();
    req.extend_from_slice(&value);
    req.extend_from_slice(b"\r\n");
    assert_eq!(c.request(&req, &[b"\r\n"]), b"STORED\r\n");
    let reply = c.request(b"get k\r\n", END);
    assert_eq!(
        reply.len(),
        "VALUE k 0 1048516\r\n".len() + value.len() + "\r\nEND\r\n".len()
    );
    // One byte more is refused, its data discarded, and the old value dropped.
    let mut big = b"set k 0 0 1048517\r\n".to_vec();
    big.extend_from_slice(&vec![b'x'; 1_048_517]);
    big.extend_from_slice(b"\r\nget k\r\n");
    assert_eq!(
        c.request(&big, END),
        b"SERVER_ERROR object too large for cache\r\nEND\r\n"
    );
}

#[test]
fn too_many_connections_are_refused_politely() {
    let server = Server::start(&["-c", "4"]);
    let mut held: Vec<_> = (0..4).map(|_| server.connect()).collect();
    for c in &mut held {
        assert!(
            c.request(b"version\r\n", &[b"\r\n"])
                .starts_with(b"VERSION ")
        );
    }
    let mut extra = TcpStream::connect(server.addr()).unwrap();
    extra.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    let mut buf = Vec::new();
    extra.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"ERROR Too many open connections\r\n");
    // Freeing a slot lets a new client in; the held ones kept working.
    drop(held.pop());
    let again = connect_when_a_slot_frees(&server);
    assert!(again.is_some(), "no slot freed after a client left");
    let mut stats = held[0].request(b"stats\r\n", END);
    stats.retain(|&b| b != b'\r');
    let text = String::from_utf8(stats).unwrap();
    assert!(text.contains("STAT rejected_connections "), "{text}");
    assert!(!text.contains("STAT rejected_connections 0\n"), "{text}");
}

#[test]
fn garbage_does_not_hurt_other_clients() {
    let server = Server::start(&[]);
    let mut good = server.connect();
    assert_eq!(
        good.request(b"set safe 0 0 4\r\nsafe\r\n", &[b"\r\n"]),
        b"STORED\r\n"
    );
    // Pseudo-random bytes from a fixed seed, including newlines, NULs and high bytes.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut junk = Vec::with_capacity(256 * 1024);
    for _ in 0..256 * 1024 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        junk.push((x >> 24) as u8);
    }
    for chunk in junk.chunks(2000) {
        let mut bad = server.connect();
        let _ = bad.send(chunk);
        let _ = bad.send(b"\r\n");
        let _ = bad.read_until_suffix(&[b"\r\n"], Duration::from_millis(200));
    }
    assert_eq!(
        good.request(b"get safe\r\n", END),
        b"VALUE safe 0 4\r\nsafe\r\nEND\r\n"
    );
    let mut fresh = server.connect();
    assert_eq!(
        fresh.request(b"get safe\r\n", END),
        b"VALUE safe 0 4\r\nsafe\r\nEND\r\n"
    );
}

#[test]
fn a_long_line_without_newline_closes_that_connection_only() {
    let server = Server::start(&[]);
    let mut bad = TcpStream::connect(server.addr()).unwrap();
    bad.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    bad.write_all(&vec![b'x'; 4096]).unwrap();
    let mut buf = Vec::new();
    let _ = bad.read_to_end(&mut buf); // closed by the server (EOF or reset)
    assert!(buf.is_empty(), "memcached closes without a reply");
    let mut good = server.connect();
    assert_eq!(good.request(b"get x\r\n", END), b"END\r\n");
}

#[test]
fn half_closed_connections_still_get_their_replies() {
    let server = Server::start(&[]);
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    s.write_all(b"set h 0 0 2\r\nhi\r\nget h\r\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"STORED\r\nVALUE h 0 2\r\nhi\r\nEND\r\n");
}

#[test]
fn a_stalled_sender_does_not_block_others() {
    let server = Server::start(&["-t", "1"]);
    // Half a storage command, then silence: its connection waits for the rest.
    let mut slow = server.connect();
    slow.send(b"set slow 0 0 10\r\nabc").unwrap();
    // Someone else is served meanwhile, on the only worker thread.
    let mut other = server.connect();
    assert_eq!(
        other.request(b"set o 0 0 1\r\n1\r\nget o\r\n", END),
        b"STORED\r\nVALUE o 0 1\r\n1\r\nEND\r\n"
    );
    // A client that never reads its replies only stalls itself.
    let mut hog = TcpStream::connect(server.addr()).unwrap();
    hog.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let value = vec![b'z'; 512 * 1024];
    let mut set = b"set big 0 0 524288\r\n".to_vec();
    set.extend_from_slice(&value);
    set.extend_from_slice(b"\r\n");
    assert_eq!(other.request(&set, &[b"\r\n"]), b"STORED\r\n");
    let gets = b"get big\r\n".repeat(64);
    for _ in 0..64 {
        if hog.write_all(&gets).is_err() {
            break; // its socket buffers are full: fine, the server must still serve others
        }
    }
    assert_eq!(
        other.request(b"get o\r\n", END),
        b"VALUE o 0 1\r\n1\r\nEND\r\n"
    );
    slow.send(b"defghij\r\n").unwrap();
    assert_eq!(
        slow.read_until_suffix(&[b"\r\n"], REPLY_TIMEOUT).unwrap(),
        b"STORED\r\n"
    );
}

#[test]
fn a_flood_of_connections_is_bounded_and_survived() {
    let server = Server::start(&["-c", "64"]);
    let mut opened = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = TcpStream::connect(server.addr()) {
            opened.push(s);
        }
    }
    drop(opened);
    let c = connect_when_a_slot_frees(&server);
    let mut c = c.expect("server stopped accepting after a connection flood");
    assert_eq!(
        c.request(b"set a 0 0 1\r\n1\r\n", &[b"\r\n"]),
        b"STORED\r\n"
    );
}

#[test]
fn sigterm_finishes_work_and_exits_zero() {
    let mut server = Server::start(&[]);
    let mut c = server.connect();
    let _idle = server.connect();
    let reply = c.request(b"set a 0 0 1\r\n1\r\nget a\r\n", END);
    assert_eq!(reply, b"STORED\r\nVALUE a 0 1\r\n1\r\nEND\r\n");
    let status = server
        .terminate()
        .expect("server did not exit after SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        server.stderr_text()
    );
    assert!(server.stderr_text().contains("shutting down"));
}

#[test]
fn config_file_and_flags_combine() {
    let dir = std::env::temp_dir().join(format!("webvac-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("webvac.toml");
    std::fs::write(
        &path,
        "memory_limit_mb = 8\nmax_item_size = \"512k\"\nthreads = 2\n",
    )
    .unwrap();
    let server = Server::start(&["--config", path.to_str().unwrap(), "-t", "3"]);
    let mut c = server.connect();
    let mut reply = c.request(b"stats settings\r\n", END);
    reply.retain(|&b| b != b'\r');
    let text = String::from_utf8(reply).unwrap();
    assert!(text.contains("STAT maxbytes 8388608\n"), "{text}");
    assert!(text.contains("STAT item_size_max 524288\n"), "{text}");
    assert!(
        text.contains("STAT num_threads 3\n"),
        "flags override the file: {text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_configuration_is_refused_with_a_clear_error() {
    let out = std::process::Command::new(common::WEBVAC_BIN)
        .args(["-p", "0", "-m", "1", "-I", "1m"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_item_size"), "{err}");
}

#[test]
fn stats_report_memcached_fields() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.request(
        b"set a 0 0 1\r\n1\r\nget a\r\nget b\r\nincr a 1\r\ndelete zz\r\ntouch a 10\r\n",
        &[b"TOUCHED\r\n"],
    );
    let mut reply = c.request(b"stats\r\n", END);
    reply.retain(|&b| b != b'\r');
    let text = String::from_utf8(reply).unwrap();
    for field in [
        "pid",
        "uptime",
        "time",
        "version",
        "curr_connections",
        "total_connections",
        "cmd_get",
        "cmd_set",
        "cmd_touch",
        "cmd_flush",
        "get_hits",
        "get_misses",
        "get_expired",
        "delete_hits",
        "delete_misses",
        "incr_hits",
        "incr_misses",
        "decr_hits",
        "decr_misses",
        "cas_hits",
        "cas_misses",
        "cas_badval",
        "touch_hits",
        "touch_misses",
        "curr_items",
        "total_items",
        "bytes",
        "limit_maxbytes",
        "evictions",
        "expired_unfetched",
        "evicted_unfetched",
        "threads",
    ] {
        assert!(
            text.contains(&format!("STAT {field} ")),
            "missing {field}:\n{text}"
        );
    }
    for line in [
        "STAT get_hits 1\n",
        "STAT get_misses 1\n",
        "STAT incr_hits 1\n",
        "STAT delete_misses 1\n",
        "STAT touch_hits 1\n",
        "STAT curr_items 1\n",
        "STAT limit_maxbytes 67108864\n",
    ] {
        assert!(text.contains(line), "expected {line:?} in\n{text}");
    }
}

#[test]
fn a_line_longer_than_any_command_closes_that_connection_only() {
    // However the reads fall, a 1.1 MB line closes the connection (without a
    // newline past 2 KiB, or as a complete line over 1 MiB) and nothing else.
    let mut server = Server::start(&[]);
    let mut huge = b"set k 0 0 1".to_vec();
    huge.resize(1_100_000, b' ');
    huge.extend_from_slice(b"\r\n");
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    let _ = s.write_all(&huge);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty());
    let mut c = server.connect();
    assert_eq!(c.request(b"get k\r\n", END), b"END\r\n");
    assert!(
        !server.stderr_text().contains("panicked"),
        "{}",
        server.stderr_text()
    );
    assert!(server.has_exited().is_none());
}

#[test]
fn the_open_file_limit_is_raised_or_startup_refused() {
    // Hard limit too low for -c: refuse to start, naming the remedies.
    let refuse = format!(
        "ulimit -Sn 100; ulimit -Hn 200; exec {} -p 0 -c 1024",
        common::WEBVAC_BIN
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &refuse])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs 1088 open files") && err.contains("ulimit"),
        "{err}"
    );
    // Soft limit too low but the hard limit allows it: raised, and serving.
    let raise = format!(
        "ulimit -Sn 100; ulimit -Hn 400; exec {} -p 0 -l 127.0.0.1 -c 300",
        common::WEBVAC_BIN
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &raise])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let mut listening = false;
    for _ in 0..50 {
        line.clear();
        if std::io::BufRead::read_line(&mut stderr, &mut line).unwrap_or(0) == 0 {
            break;
        }
        if line.contains("listening") {
            listening = true;
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening, "did not start with a raisable limit: {line}");
}

/// `STAT <name> <n>` from a `stats` reply.
fn stat_of(c: &mut Client, name: &str) -> u64 {
    let reply = String::from_utf8(c.request(b"stats\r\n", END)).unwrap();
    let prefix = format!("STAT {name} ");
    reply
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name}:\n{reply}"))
}

/// Polls a stat (boundedly: at most 1,000 × 10 ms) until it reads `want`;
/// returns the last reading.
fn stat_when(c: &mut Client, name: &str, want: u64) -> u64 {
    let mut seen = stat_of(c, name);
    for _ in 0..1000 {
        if seen == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        seen = stat_of(c, name);
    }
    seen
}

#[test]
fn half_sent_large_values_are_held_to_a_budget_like_memcached_memory() {
    // -m 8: the in-flight budget is its floor, 16 MiB. Sixteen clients park
    // a 1 MB `set` half-way; a seventeenth is refused as memcached refuses an item it cannot
    // allocate, its data discarded; once a parked set completes there is room.
    let server = Server::start(&["-m", "8"]);
    let line = b"set parked 0 0 1000000\r\n";
    let frame = (line.len() + 1_000_002) as u64;
    let mut parked: Vec<Client> = (0..16).map(|_| server.connect()).collect();
    for c in &mut parked {
        let mut start = line.to_vec();
        start.extend_from_slice(&vec![b'p'; 20_000]);
        c.send(&start).unwrap();
    }
    let mut admin = server.connect();
    // The server reads the parked lines asynchronously.
    let held = stat_when(&mut admin, "inflight_bytes", 16 * frame);
    assert_eq!(
        held,
        16 * frame,
        "parked requests did not reserve their frames"
    );

    let mut late = server.connect();
    let mut full = b"set late 0 0 1000000\r\n".to_vec();
    full.extend_from_slice(&vec![b'l'; 1_000_000]);
    full.extend_from_slice(b"\r\nget late\r\n");
    assert_eq!(
        late.request(&full, END),
        b"SERVER_ERROR out of memory storing object\r\nEND\r\n"
    );
    assert!(stat_of(&mut admin, "store_no_memory") >= 1);

    // Complete one parked set: stored, and its reservation returned.
    let mut rest = vec![b'p'; 1_000_000 - 20_000];
    rest.extend_from_slice(b"\r\n");
    parked[0].send(&rest).unwrap();
    assert_eq!(
        parked[0]
            .read_until_suffix(&[b"\r\n"], REPLY_TIMEOUT)
            .unwrap(),
        b"STORED\r\n"
    );
    assert_eq!(stat_of(&mut admin, "inflight_bytes"), 15 * frame);
    assert_eq!(
        late.request(&full, END).len(),
        "STORED\r\nVALUE late 0 1000000\r\n".len() + 1_000_000 + "\r\nEND\r\n".len()
    );
    // Dropping parked clients returns their reservations.
    drop(parked);
    // Connections close asynchronously.
    assert_eq!(stat_when(&mut admin, "inflight_bytes", 0), 0);
}

/// Issue 17, item 2: `version` answered `1.6.18-webvac-0.1.0`, and npm
/// `memcached`, which takes the last three numbers of the answer
/// (`/(\d+)\.(\d+)\.(\d+)$/`), read it as version 0.1.0. webvac now
/// answers memcached's own `VERSION 1.6.18`, as the real memcached does
/// (checked beside it), and says what it is in `stats` as
/// `webvac_version`, where clients do not parse.
#[test]
fn version_answers_as_memcached_and_stats_say_webvac() {
    let reference = common::Memcached::start();
    let server = Server::start(&[]);
    let mut c = server.connect();
    let ours = c.ask(b"version\r\n");
    assert_eq!(ours, reference.connect().ask(b"version\r\n"));
    assert_eq!(ours, "VERSION 1.6.18\r\n");
    // npm memcached's parse, by hand: the last three dot-separated numbers.
    let text = ours.trim_end().trim_start_matches("VERSION ");
    let last_three: Vec<u32> = text
        .rsplitn(3, '.')
        .map(|n| n.parse().expect("a number"))
        .collect();
    assert_eq!(last_three, [18, 6, 1]);
    let stats = String::from_utf8(c.request(b"stats\r\n", END)).unwrap();
    assert!(stats.contains("STAT version 1.6.18\r\n"), "{stats}");
    assert!(
        stats.contains(&format!(
            "STAT webvac_version {}\r\n",
            env!("CARGO_PKG_VERSION")
        )),
        "{stats}"
    );
}

/// Issue 17: `mg … R<token>` took the token as seconds from now; memcached
/// reads it with its exptime rules, so one over 30 days is an absolute unix
/// time. An item with 1,000 s left wins a recache at `R2000` and at an
/// absolute time 2,000 s ahead, but not at one 500 s ahead. Checked beside
/// the real memcached.
#[test]
fn mg_recache_reads_its_token_as_an_exptime() {
    let reference = common::Memcached::start();
    let server = Server::start(&[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (token, wins) in [
        ("2000".to_string(), true),
        ((now + 2000).to_string(), true),
        ((now + 500).to_string(), false),
        ("500".to_string(), false),
    ] {
        let mut replies = Vec::new();
        for mut c in [reference.connect(), server.connect()] {
            assert_eq!(c.ask(b"set k 0 1000 1\r\nv\r\n"), "STORED\r\n");
            replies.push(c.ask(format!("mg k v R{token}\r\n").as_bytes()));
        }
        assert_eq!(replies[0], replies[1], "R{token}");
        let want = if wins {
            "VA 1 W\r\nv\r\n"
        } else {
            "VA 1\r\nv\r\n"
        };
        assert_eq!(replies[1], want, "R{token}");
    }
}

/// Issue 17, item 4: memcached's command line carries over. An operator
/// swaps the binary in a unit file such as Debian's: `-s SOCK -a 0770 -u
/// USER -U 0 -P PIDFILE` were refused. Now: the node serves the unix socket
/// (and no TCP port), created with the mask's permissions, runs as the
/// user when started as root, writes its pid file, and removes both files
/// at a clean exit; a socket file left by a killed node is replaced.
#[test]
fn memcached_unix_socket_user_and_pidfile_flags_work() {
    use std::os::unix::fs::PermissionsExt;
    let dir = common::fresh_temp_dir("webvac-unix");
    // Anyone may create files here, the user switched to too.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.join("webvac.sock");
    let pidfile = dir.join("webvac.pid");
    let start = || {
        let child = std::process::Command::new(common::WEBVAC_BIN)
            .arg("-s")
            .arg(&socket)
            .args(["-a", "0770", "-u", "nobody", "-U", "0", "-P"])
            .arg(&pidfile)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let client = loop {
            // The pid file is written once the socket is bound.
            if pidfile.exists() {
                if let Ok(c) = common::Client::connect_unix(&socket) {
                    break c;
                }
            }
            assert!(std::time::Instant::now() < deadline, "never listened");
            std::thread::sleep(Duration::from_millis(10));
        };
        (child, client)
    };
    let (mut child, mut c) = start();
    assert_eq!(c.ask(b"set k 0 0 2\r\nhi\r\n"), "STORED\r\n");
    assert_eq!(c.ask(b"get k\r\n"), "VALUE k 0 2\r\nhi\r\nEND\r\n");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o770, "the socket has the mask's permissions");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, child.id());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("Uid:") && l.contains("65534")),
            "runs as nobody: {status}"
        );
    }
    // No TCP port: the stats say so as memcached's do.
    let stats = String::from_utf8(c.request(b"stats settings\r\n", END)).unwrap();
    assert!(stats.contains("STAT tcpport 0\r\n"), "{stats}");
    let exit = common::stop_child(&mut child, Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    assert!(!socket.exists() && !pidfile.exists(), "both files removed");
    // Killed, it leaves its socket behind; the next start replaces it.
    let (mut child, _client) = start();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(socket.exists());
    std::fs::remove_file(&pidfile).unwrap();
    let (mut child, mut c) = start();
    assert_eq!(c.ask(b"get k\r\n"), "END\r\n", "a new node");
    let exit = common::stop_child(&mut child, Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
}

/// memcached's `-U` with a port: webvac serves no UDP, and says so.
#[test]
fn a_udp_port_is_refused_by_name() {
    let out = std::process::Command::new(common::WEBVAC_BIN)
        .args(["-p", "0", "-U", "11211"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-U 11211") && err.contains("UDP"), "{err}");
}

/// Issue 17, item 4: memcached's `-M` ("return error on memory exhausted
/// instead of evicting items") was refused. With it, a full node refuses
/// the write with memcached's `SERVER_ERROR out of memory storing object`
/// and evicts nothing; items that have expired still make room.
#[test]
fn disable_evictions_refuses_writes_at_the_limit_and_keeps_every_item() {
    let server = Server::start(&["-m", "1", "-I", "4k", "-M"]);
    let mut c = server.connect();
    let settings = String::from_utf8(c.request(b"stats settings\r\n", END)).unwrap();
    assert!(settings.contains("STAT evictions off\r\n"), "{settings}");
    let value = "v".repeat(1000);
    // A third of the memory in items that expire in two seconds.
    for i in 0..300 {
        let reply = c.ask(format!("set soon{i} 0 2 1000\r\n{value}\r\n").as_bytes());
        assert_eq!(reply, "STORED\r\n", "soon{i}");
    }
    let mut stored = 0;
    let refused = loop {
        let reply = c.ask(format!("set k{stored} 0 0 1000\r\n{value}\r\n").as_bytes());
        if reply != "STORED\r\n" {
            break reply;
        }
        stored += 1;
        assert!(stored < 10_000, "a 1 MiB node never filled up");
    };
    assert_eq!(refused, "SERVER_ERROR out of memory storing object\r\n");
    let stats = String::from_utf8(c.request(b"stats\r\n", END)).unwrap();
    assert_eq!(common::stat_value(&stats, "evictions"), 0);
    for i in 0..stored {
        assert!(
            c.ask(format!("mg k{i} s\r\n").as_bytes()).starts_with("HD"),
            "k{i} kept"
        );
    }
    // Once the first ones expire, their room is taken again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.ask(b"mg soon0 s\r\n") != "EN\r\n" {
        assert!(std::time::Instant::now() < deadline, "soon0 never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
    let reply = c.ask(format!("set k{stored} 0 0 1000\r\n{value}\r\n").as_bytes());
    assert_eq!(reply, "STORED\r\n", "expired items make room");
}

/// Issue 17: memcached's own `t/issue_14.t` (memory reused after expiry)
/// failed on webvac: `total_malloced` in `stats slabs` grew by 128 bytes
/// when ten expired 66,560-byte items were replaced by ten new ones (the
/// new keys are a byte longer). It now means what memcached's does, the
/// memory items occupy in 1 MiB pages, and the test's sequence leaves it
/// unchanged. (issue_14 sleeps 4 s for the expiry; here the wait is for
/// the sweep to have freed the expired items.)
#[test]
fn expired_items_memory_is_reused_as_in_memcached_issue_14() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    let value = "B".repeat(66_560);
    let stat = |c: &mut common::Client, group: &str, name: &str| {
        let request = format!("stats {group}\r\n").replace("stats \r", "stats\r");
        let text = String::from_utf8(c.request(request.as_bytes(), END)).unwrap();
        common::stat_value(&text, name)
    };
    let set = |c: &mut common::Client, key: usize| {
        let reply = c.ask(format!("set key{key} 0 2 66560\r\n{value}\r\n").as_bytes());
        assert_eq!(reply, "STORED\r\n", "key{key}");
    };
    for key in 0..10 {
        set(&mut c, key);
    }
    let first = stat(&mut c, "slabs", "total_malloced");
    assert_eq!(first, 1 << 20, "one page");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stat(&mut c, "", "curr_items") > 0 {
        assert!(std::time::Instant::now() < deadline, "never swept");
        std::thread::sleep(Duration::from_millis(50));
    }
    for key in 10..20 {
        set(&mut c, key);
    }
    assert_eq!(
        stat(&mut c, "slabs", "total_malloced"),
        first,
        "the memory is reused"
    );
}

/// Issue 17, item 3: `stats` lacked fields monitoring tools read
/// (`connection_structures`, `listen_disabled_num`, `accepting_conns`).
/// Every field webvac reports that memcached 1.6.18 also reports comes in
/// memcached's order (checked beside it), and those three are there with
/// webvac's true values.
#[test]
fn stats_fields_come_in_memcached_order_with_true_values() {
    let reference = common::Memcached::start();
    let server = Server::start(&[]);
    let names = |c: &mut common::Client, group: &str| -> Vec<String> {
        let request = if group.is_empty() {
            "stats\r\n".to_string()
        } else {
            format!("stats {group}\r\n")
        };
        String::from_utf8(c.request(request.as_bytes(), END))
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("STAT "))
            .map(|l| l.split(' ').next().unwrap_or_default().to_string())
            .collect()
    };
    let (mut theirs, mut ours) = (reference.connect(), server.connect());
    let _second = server.connect();
    for group in ["", "settings"] {
        let memcached = names(&mut theirs, group);
        let webvac = names(&mut ours, group);
        let shared: Vec<&String> = webvac.iter().filter(|n| memcached.contains(n)).collect();
        let in_their_order: Vec<&String> =
            memcached.iter().filter(|n| webvac.contains(n)).collect();
        assert_eq!(shared, in_their_order, "stats {group}: memcached's order");
    }
    let stats = String::from_utf8(ours.request(b"stats\r\n", END)).unwrap();
    assert!(common::stat_value(&stats, "connection_structures") >= 2);
    assert_eq!(common::stat_value(&stats, "accepting_conns"), 1);
    assert_eq!(common::stat_value(&stats, "listen_disabled_num"), 0);
}

/// Issue 17, item 3: `stats conns` answered `END` alone. It now lists the
/// listener and every client connection as memcached does: descriptor,
/// address, the listener's address, memcached's state name, and the
/// seconds since the client last sent anything.
#[test]
fn stats_conns_lists_the_listener_and_each_connection() {
    let server = Server::start(&[]);
    let mut partial = server.connect();
    partial.send(b"set foo 0 0 6\r\n").expect("send");
    let mut asker = server.connect();
    // The partial set has arrived once the node counts its bytes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = String::from_utf8(asker.request(b"stats conns\r\n", END)).unwrap();
        if text.contains(":state conn_nread\r\n") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let listen = format!("tcp:{}", server.addr());
    let listener_fd = text
        .lines()
        .find(|l| l.ends_with(&format!(":addr {listen}")))
        .and_then(|l| l.strip_prefix("STAT "))
        .and_then(|l| l.split(':').next())
        .expect("the listener's line")
        .to_string();
    assert!(text.contains(&format!("STAT {listener_fd}:state conn_listening\r\n")));
    assert_eq!(text.matches(":addr tcp:127.0.0.1:").count(), 3, "{text}");
    assert_eq!(
        text.matches(&format!(":listen_addr {listen}\r\n")).count(),
        2
    );
    assert!(
        text.contains(":state conn_parse_cmd\r\n"),
        "the asker: {text}"
    );
    assert!(text.contains(":secs_since_last_cmd 0\r\n"));
    drop(partial);
}
