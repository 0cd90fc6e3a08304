//! memcached's ASCII authentication (`-Y authfile`), side by side with the
//! real memcached 1.6.18: every conversation below gets the same bytes back
//! from both, errors before authentication included, and both count the
//! same `auth_cmds` and `auth_errors`. Then what only webvac does: a `set`
//! announcing 2 GB (memcached 1.6.18 crashes on it; webvac answers as later
//! memcached does) and a reload on SIGHUP.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Client, Memcached, ReplyErrorKind, Server, escape, fresh_temp_dir, stat_value};

const FINISH_MAX: Duration = Duration::from_secs(10);

/// Conversations, each on a new connection: each request is sent alone
/// and its reply read before the next is sent, then the writing side is
/// closed and everything left read until the server closes. One at a
/// time, because memcached 1.6.18 keeps only the last of the replies to
/// requests before authentication that arrive in one read (they share one
/// response slot); webvac answers each (see the pipelined test below).
const CONVERSATIONS: &[(&str, &[&[u8]])] = &[
    (
        "memcached's t/ascii-auth.t, first socket",
        &[
            b"set foo 0 0 2\r\nhi\r\n",
            b"get foo\r\n",
            b"set foo 0 0 7\r\nfoo bab\r\n",
            b"set foo 0 0 7\r\nfoo bar\r\n",
            b"set toast 0 0 2\r\nhi\r\n",
            b"get toast\r\n",
        ],
    ),
    (
        "the second user",
        &[
            b"set foo 0 0 10\r\nbaaaz quux\r\n",
            b"set toast2 0 0 2\r\nho\r\n",
            b"get toast2\r\n",
        ],
    ),
    (
        "other commands before authentication",
        &[
            b"mn\r\n",
            b"version\r\n",
            b"mg foo v\r\n",
            b"stats\r\n",
            b"delete foo\r\n",
            b"flush_all\r\n",
        ],
    ),
    (
        "a malformed set line",
        &[
            b"set foo 0 0\r\n",
            b"set foo 0 0 x\r\n",
            b"set foo 0 0 -1\r\n",
            // Two requests before authentication: each line is one.
            b"add foo 0 0 7\r\n",
            b"foo bar\r\n",
        ],
    ),
    (
        "noreply is answered anyway",
        &[b"set foo 0 0 7 noreply\r\nfoo bar\r\n", b"get toast\r\n"],
    ),
    (
        "a value not ending in \\r\\n",
        &[b"set foo 0 0 7\r\nfoo barX\r\n"],
    ),
    (
        "extra spaces and words",
        &[b"set k 0 0 12\r\nfoo  bar  xx\r\n", b"get toast\r\n"],
    ),
    (
        "a user with another's password",
        &[
            b"set foo 0 0 8\r\nfoo quux\r\n",
            b"set foo 0 0 9\r\nbaaaz bar\r\n",
        ],
    ),
    ("a line that never ends", &[&[b'x'; 3000]]),
    (
        "sizes as safe_strtoul reads them, and C strings",
        &[
            b"set foo 0 0 -0\r\n\r\n",
            b"set foo 0 0 8\r\n\0foo bar\r\n",
            b"set foo 0 0 \t7\r\nfoo bar\r\n",
        ],
    ),
    (
        "a size with a plus sign",
        &[b"set foo 0 0 +7\r\nfoo bar\r\n"],
    ),
    (
        "a size ending in \\v",
        &[b"set foo 0 0 7\x0b\r\nfoo bar\r\n"],
    ),
    (
        "a size past 2^32",
        &[b"set foo 0 0 4294967303\r\nfoo bar\r\n"],
    ),
    (
        "a NUL in the line",
        &[b"set foo 0 0 7\0junk\r\nfoo bar\r\n"],
    ),
    (
        "a NUL after the password",
        &[b"set foo 0 0 8\r\nfoo bar\0\r\n"],
    ),
];

/// An auth file of memcached's test users in a new directory.
fn authfile(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("authfile");
    std::fs::write(&path, text).expect("write the auth file");
    path
}

/// A webvac node started with `-Y` and a new auth file of `users`.
fn server_with_users(users: &str) -> (PathBuf, Server) {
    let path = authfile(&fresh_temp_dir("webvac-auth"), users);
    let server = Server::start(&["-Y", path.to_str().expect("utf-8 path")]);
    (path, server)
}

fn converse(mut c: Client, bytes: &[u8]) -> String {
    c.send(bytes).expect("send");
    String::from_utf8_lossy(&c.finish(FINISH_MAX)).into_owned()
}

/// Each request, then its reply, in order; `<closed>` where the server
/// closed the connection instead of answering.
fn converse_one_at_a_time(mut c: Client, requests: &[&[u8]]) -> String {
    let mut transcript = String::new();
    for request in requests {
        transcript.push_str(&format!("> {}\n", escape(request)));
        match c.call(request, FINISH_MAX) {
            Ok(reply) => transcript.push_str(&String::from_utf8_lossy(&reply)),
            Err(e) if matches!(e.kind, ReplyErrorKind::Closed) => {
                transcript.push_str(&String::from_utf8_lossy(&e.partial));
                transcript.push_str("<closed>\n");
                return transcript;
            }
            Err(e) => panic!("reply to \"{}\": {e}", escape(request)),
        }
    }
    transcript.push_str(&String::from_utf8_lossy(&c.finish(FINISH_MAX)));
    transcript
}

/// `stats` through an authenticated connection.
fn stats(mut c: Client) -> String {
    assert_eq!(c.ask(b"set a 0 0 7\r\nfoo bar\r\n"), "STORED\r\n");
    String::from_utf8_lossy(&c.request(b"stats\r\n", &[b"END\r\n"])).into_owned()
}

#[test]
fn every_reply_before_and_after_authentication_is_memcacheds() {
    let dir = fresh_temp_dir("webvac-auth");
    let path = authfile(&dir, "foo:bar\nbaaaz:quux\n");
    let path = path.to_str().expect("utf-8 path");
    let ours = Server::start(&["-Y", path]);
    let theirs = Memcached::start_with(&["-Y", path]);
    for (what, requests) in CONVERSATIONS {
        let want = converse_one_at_a_time(theirs.connect(), requests);
        let got = converse_one_at_a_time(ours.connect(), requests);
        assert_eq!(got, want, "{what}");
        eprintln!("{what}: {want:?}");
    }
    let (ours, theirs) = (stats(ours.connect()), stats(theirs.connect()));
    for name in ["auth_cmds", "auth_errors"] {
        assert_eq!(stat_value(&ours, name), stat_value(&theirs, name), "{name}");
    }
    assert!(stat_value(&ours, "auth_errors") >= 3);
}

#[test]
fn a_huge_token_is_refused_and_sighup_reloads_the_users() {
    let (path, server) = server_with_users("foo:bar\n");
    // memcached 1.6.18 crashes here; later versions answer this.
    assert_eq!(
        converse(server.connect(), b"set foo 0 0 2147483646\r\nversion\r\n"),
        "CLIENT_ERROR auth token too long\r\nCLIENT_ERROR unauthenticated\r\n"
    );
    let mut settings = server.connect();
    assert_eq!(settings.ask(b"set a 0 0 7\r\nfoo bar\r\n"), "STORED\r\n");
    let text = String::from_utf8_lossy(&settings.request(b"stats settings\r\n", &[b"END\r\n"]))
        .into_owned();
    assert!(
        text.contains(&format!("STAT auth_enabled_ascii {}\r\n", path.display())),
        "{text}"
    );
    let pid = stat_value(
        &String::from_utf8_lossy(&settings.request(b"stats\r\n", &[b"END\r\n"])),
        "pid",
    );
    // New users; the connection authenticated as foo stays authenticated.
    std::fs::write(&path, "new:secret\n").expect("rewrite the auth file");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    let reloaded = || converse(server.connect(), b"set a 0 0 10\r\nnew secret\r\n") == "STORED\r\n";
    let deadline = std::time::Instant::now() + FINISH_MAX;
    while !reloaded() {
        assert!(std::time::Instant::now() < deadline, "never reloaded");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        converse(server.connect(), b"set a 0 0 7\r\nfoo bar\r\n"),
        "CLIENT_ERROR authentication failure\r\n"
    );
    assert_eq!(settings.ask(b"mn\r\n"), "MN\r\n", "still authenticated");
    // A file that no longer parses leaves the users as they were.
    std::fs::write(&path, "no colon here\n").expect("rewrite the auth file");
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill -HUP")
            .success()
    );
    let deadline = std::time::Instant::now() + FINISH_MAX;
    while !server.stderr_text().contains("auth file not reloaded") {
        assert!(std::time::Instant::now() < deadline, "no warning");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(reloaded(), "the last good users stay");
}

/// webvac answers every request before authentication, even when they
/// arrive together: one reply per request, so a pipelining client stays in
/// step. (memcached 1.6.18 keeps only the last reply of such a batch.)
#[test]
fn pipelined_requests_before_authentication_each_get_their_reply() {
    let (_path, server) = server_with_users("foo:bar\n");
    assert_eq!(
        converse(
            server.connect(),
            b"set foo 0 0 2\r\nhi\r\nget foo\r\nset foo 0 0 7\r\nfoo bab\r\n\
              set foo 0 0 7\r\nfoo bar\r\nset toast 0 0 2\r\nhi\r\nget toast\r\n"
        ),
        "CLIENT_ERROR bad authentication token format\r\n\
         CLIENT_ERROR unauthenticated\r\n\
         CLIENT_ERROR authentication failure\r\n\
         STORED\r\nSTORED\r\nVALUE toast 0 2\r\nhi\r\nEND\r\n"
    );
}

/// `-Y` on a cluster member without a cluster secret would let anyone on
/// the host join as a member and read around the passwords: refused at
/// start, naming the setting. A missing file is refused with memcached's
/// own words.
#[test]
fn a_node_that_cannot_keep_its_promise_refuses_to_start() {
    let dir = fresh_temp_dir("webvac-auth");
    let path = authfile(&dir, "foo:bar\n");
    let path = path.to_str().expect("utf-8 path");
    let refused = |args: &[&str]| {
        let mut cmd = std::process::Command::new(common::WEBVAC_BIN);
        cmd.args(args).env("RUST_BACKTRACE", "0");
        let out = common::run_bounded(cmd, FINISH_MAX);
        let status = out.status.expect("exits at once");
        assert!(!status.success(), "{args:?} started");
        out.stderr
    };
    let (client, peer) = (common::free_tcp_port(), common::free_tcp_port());
    let member = format!("1=127.0.0.1:{client},127.0.0.1:{peer}");
    let err = refused(&["-Y", path, "--node-id", "1", "--member", &member]);
    assert!(err.contains("cluster.secret_file"), "{err}");
    let missing = dir.join("missing");
    let err = refused(&["-Y", missing.to_str().expect("utf-8 path")]);
    assert!(
        err.contains(&format!(
            "Could not open authfile [{}] for reading",
            missing.display()
        )),
        "{err}"
    );
}
