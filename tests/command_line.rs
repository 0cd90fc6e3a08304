//! memcached's command line carries over (issue 17, item 4): an operator
//! swaps the binary in a unit file or in Debian's `/etc/memcached.conf`.
//! Every flag memcached 1.6.18's `-h` lists is either taken, where it means
//! something for webvac, or refused by name with the reason; each test
//! checks one side of that against the real binary, and where memcached
//! answers a command differently under a flag (`-F`, `-A`), against the
//! real memcached started with the same flag.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Memcached, Server, WEBVAC_BIN, stat_value};

const END: &[&[u8]] = &[b"END\r\n"];

/// webvac with `args`, which must refuse to start: its stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(WEBVAC_BIN)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .expect("run webvac");
    assert!(!out.status.success(), "{args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `stats settings` through `c`.
fn settings(c: &mut Client) -> String {
    String::from_utf8(c.request(b"stats settings\r\n", END)).expect("utf-8")
}

/// Waits (bounded) until `path` exists.
fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A line such as Debian's and common unit files carry starts, and the
/// options it sets take effect.
#[test]
fn a_memcached_command_line_starts_webvac() {
    let server = Server::start(&[
        "-m",
        "64m",
        "-c",
        "1024",
        "-t",
        "4",
        "-v",
        "-U",
        "0",
        "-u",
        "root",
        "-b",
        "512",
        "-R",
        "20",
        "-B",
        "ascii",
        "-X",
        "-W",
        "-r",
        "-o",
        "modern,idle_timeout=60",
        "--conn-limit",
        "1000",
    ]);
    let mut c = server.connect();
    assert_eq!(c.ask(b"set k 0 0 1\r\nv\r\n"), "STORED\r\n");
    let s = settings(&mut c);
    assert_eq!(stat_value(&s, "idle_timeout"), 60);
    assert_eq!(stat_value(&s, "reqs_per_event"), 20);
    assert_eq!(stat_value(&s, "maxconns"), 1000);
    assert_eq!(stat_value(&s, "maxbytes"), 64 << 20, "-m 64m");
    assert_eq!(stat_value(&s, "verbosity"), 1, "the -v count, as memcached");
}

/// Flags that cannot mean anything for webvac are refused, each by name
/// and with its reason, not with clap's "unexpected argument".
#[test]
fn flags_that_cannot_mean_anything_are_refused_by_name() {
    for (args, words) in [
        (&["-C"][..], "CAS"),
        (&["-f", "1.5"], "slab"),
        (&["-n", "48"], "slab"),
        (&["-L"], "pages"),
        (&["-D", ":"], "per-prefix"),
        (&["-S"], "binary protocol"),
        (&["-e", "/dev/shm/x"], "restartable"),
        (&["-Z"], "ssl_chain_cert"),
        (&["-N", "2"], "NAPI"),
        (&["-B", "binary"], "binary protocol"),
        (&["-U", "11211"], "UDP"),
        (&["-o", "ext_path=/mnt/x:1G"], "extstore"),
        (&["-o", "ssl_ciphers=HIGH"], "cipher"),
        (
            &["-o", "ssl_kernel_tls"],
            "Kernel TLS offload is not available",
        ),
        (&["-o", "ssl_keyformat=2"], "PEM"),
        (&["-o", "ssl_verify_mode=4"], "ssl_verify_mode must be"),
        (&["-o", "modern,hashpower=20"], "slab allocator"),
        (&["-o", "no_maxconns_fast"], "queue"),
        (&["-o", "bogus"], "not an extended option"),
        (&["-o", "slab_automove_window=30"], "slab allocator"),
        (&["-o", "proxy_config=/x.lua"], "proxy"),
        (&["--napi-ids", "2"], "NAPI"),
    ] {
        let err = refused(args);
        assert!(
            err.contains(args[0]) || err.contains(args[args.len() - 1].split('=').next().unwrap()),
            "{args:?} not named: {err}"
        );
        assert!(err.contains(words), "{args:?}: {err}");
    }
}

/// `-F`: `flush_all` is refused with memcached's own answer (checked
/// beside memcached started with `-F`) and flushes nothing.
#[test]
fn disable_flush_all_answers_as_memcached() {
    let reference = Memcached::start_with(&["-F"]);
    let server = Server::start(&["-F"]);
    let mut replies = Vec::new();
    for mut c in [reference.connect(), server.connect()] {
        assert_eq!(c.ask(b"set k 0 0 1\r\nv\r\n"), "STORED\r\n");
        let flush = c.ask(b"flush_all\r\n");
        // noreply: nothing, and the next command is answered as usual.
        let quiet = c.ask(b"flush_all noreply\r\nget k\r\n");
        replies.push((flush, quiet));
    }
    assert_eq!(replies[0], replies[1]);
    assert_eq!(replies[1].0, "CLIENT_ERROR flush_all not allowed\r\n");
    assert_eq!(replies[1].1, "VALUE k 0 1\r\nv\r\nEND\r\n");
    let mut c = server.connect();
    assert!(settings(&mut c).contains("STAT flush_enabled no\r\n"));
}

/// `-A`: `shutdown` stops the node as SIGTERM does (exit 0); without it
/// the command gets memcached's refusal, and a bad mode memcached's error.
#[test]
fn enable_shutdown_lets_a_client_stop_the_node() {
    let reference = Memcached::start();
    let plain = Server::start(&[]);
    assert_eq!(
        plain.connect().ask(b"shutdown\r\n"),
        reference.connect().ask(b"shutdown\r\n")
    );
    let mut server = Server::start(&["-A"]);
    let mut c = server.connect();
    assert_eq!(
        c.ask(b"shutdown now\r\n"),
        "CLIENT_ERROR invalid shutdown mode\r\n"
    );
    c.send(b"shutdown graceful\r\n").expect("send");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.has_exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
}

/// `-d` with `-P` and `-s`: the node detaches, writes its pid, serves the
/// socket, and goes at SIGTERM, removing both files.
#[test]
fn daemon_mode_detaches_and_serves() {
    let dir: PathBuf = common::fresh_temp_dir("webvac-daemon");
    let socket = dir.join("webvac.sock");
    let pidfile = dir.join("webvac.pid");
    let status = Command::new(WEBVAC_BIN)
        .arg("-d")
        .arg("-s")
        .arg(&socket)
        .arg("-P")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .status()
        .expect("run webvac -d");
    assert!(status.success(), "the parent returns at once: {status:?}");
    wait_for_file(&pidfile);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    let mut c = Client::connect_unix(&socket).expect("the daemon serves its socket");
    assert_eq!(c.ask(b"set k 0 0 1\r\nv\r\n"), "STORED\r\n");
    // SAFETY: kill only sends a signal.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pidfile.exists() || socket.exists() {
        assert!(Instant::now() < deadline, "files left after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `-i` prints the license and exits, as memcached's does.
#[test]
fn license_prints_and_exits() {
    let out = Command::new(WEBVAC_BIN).arg("-i").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Apache License"));
}

/// memcached's `-l` takes several addresses (Debian's unit file suggests
/// `-l 127.0.0.1,::1`): webvac listens on each, with `-p`'s port.
#[test]
fn listen_takes_several_addresses() {
    let port = common::free_tcp_port();
    let list = "127.0.0.1,127.0.0.2";
    let mut child = Command::new(WEBVAC_BIN)
        .args(["-l", list, "-p", &port.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    for host in ["127.0.0.1", "127.0.0.2"] {
        let addr: std::net::SocketAddr = format!("{host}:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut c = loop {
            if let Ok(c) = Client::connect_tcp(addr) {
                break c;
            }
            assert!(Instant::now() < deadline, "nothing listens on {addr}");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(c.ask(b"version\r\n"), "VERSION 1.6.18\r\n", "{addr}");
    }
    let exit = common::stop_child(&mut child, Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
}
