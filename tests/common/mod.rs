//! Black-box test harness shared by the integration tests.
//!
//! It starts the real `webvac` binary, or the reference memcached 1.6.18, as a
//! child process and speaks raw bytes to it:
//!
//! ```text
//!   test ──Client (raw bytes)──▶ webvac  (127.0.0.1:ephemeral, via Server)
//!        └─Client (raw bytes)──▶ memcached (unix socket in a temp dir, via Memcached)
//! ```
//!
//! Everything here is bounded: start-up, shutdown and every socket read have a
//! deadline, and the child's stderr is drained for its whole life so a chatty
//! server can never block on a full pipe. A hung server fails the test instead
//! of hanging CI.

// Each test crate (`differential`, `compat`, ...) uses a different subset of
// the harness; the unused rest would otherwise warn in every one of them.
#![allow(dead_code)]

pub mod cluster;
pub mod compat;
pub mod history;
pub mod hostile;
pub mod tls;

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The webvac server binary that Cargo built for this test run.
pub const WEBVAC_BIN: &str = env!("CARGO_BIN_EXE_webvac");
/// The reference implementation. `.ci/run` installs it (Debian `memcached`).
pub const MEMCACHED_BIN: &str = "/usr/bin/memcached";
/// The reference version the protocol is pinned to.
pub const MEMCACHED_VERSION: &str = "memcached 1.6.18";
/// Debian's python, which has `python3-pymemcache`; the pyenv python on PATH does not.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// libmemcached's protocol checker (Debian `libmemcached-tools`).
pub const MEMCCAPABLE_BIN: &str = "/usr/bin/memccapable";

/// How long webvac may take to print its `listening addr=` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long memcached may take to accept its first connection.
pub const MEMCACHED_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a child gets between SIGTERM and SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Interval of the bounded readiness / exit polls (the only sleeps in the harness).
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Default deadline for one reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// A reply larger than this is a runaway server, not a reply.
pub const REPLY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How many of a child's last stderr lines are kept for failure messages.
pub const STDERR_TAIL_LINES: usize = 200;
/// A stderr "line" longer than this is cut (bounds the drain's memory).
pub const STDERR_LINE_BYTES_MAX: u64 = 64 * 1024;
/// Escaped byte strings longer than this are shown as head … tail.
pub const ESCAPE_BYTES_MAX: usize = 2048;

/// The last lines a child wrote to stderr, for failure messages.
#[derive(Clone, Default)]
pub struct StderrTail {
    /// At most `STDERR_TAIL_LINES` lines, oldest first, ANSI colour stripped.
    lines: Arc<Mutex<VecDeque<String>>>,
}

impl StderrTail {
    fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == STDERR_TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The kept lines joined with newlines.
    pub fn text(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Reads `stderr` line by line until EOF (the child exited) in a thread,
/// keeping the tail and handing every line to `on_line`. Draining for the
/// child's whole life is what keeps the pipe from filling and blocking it.
fn spawn_stderr_drain(
    stderr: ChildStderr,
    name: &str,
    mut on_line: impl FnMut(&str) + Send + 'static,
) -> StderrTail {
    let tail = StderrTail::default();
    let thread_tail = tail.clone();
    thread::Builder::new()
        .name(format!("{name}-stderr"))
        .spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                // `take` bounds a single line; EOF ends the loop.
                match (&mut reader)
                    .take(STDERR_LINE_BYTES_MAX)
                    .read_until(b'\n', &mut buf)
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = strip_ansi(&String::from_utf8_lossy(&buf));
                        let line = line.trim_end_matches(['\r', '\n']).to_string();
                        on_line(&line);
                        thread_tail.push(line);
                    }
                }
            }
        })
        .expect("spawn stderr drain thread");
    tail
}

/// Removes ANSI escape sequences (`ESC [ ... letter`): tracing's fmt layer
/// colours field names, which would split `addr=` apart.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates, then one final byte in '@'..='~'.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Finds the socket address in a `... listening addr=127.0.0.1:PORT ...` log
/// line (the first, when it lists several).
pub fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    if !line.contains("listening") {
        return None;
    }
    let rest = &line[line.find("addr=")? + "addr=".len()..];
    let token = rest.split_whitespace().next()?;
    token
        .trim_matches(|c| c == '"' || c == '\'' || c == ',')
        .split(',')
        .next()?
        .parse()
        .ok()
}

/// Sends SIGTERM, waits up to `grace` for the child to exit, then SIGKILLs it.
/// Returns the exit status if the child exited by itself within the grace.
pub fn stop_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // std has no portable SIGTERM and libc is not a dependency: use kill(1).
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => thread::sleep(POLL_INTERVAL),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A running webvac server on an ephemeral 127.0.0.1 port. Killed on drop.
pub struct Server {
    child: Child,
    /// Where it listens, parsed from its `listening addr=` log line.
    addr: SocketAddr,
    /// Its last stderr lines (the drain keeps running until it exits).
    stderr: StderrTail,
    /// Set once the child has been stopped and reaped.
    stopped: bool,
}

impl Server {
    /// Starts `webvac -p 0 -l 127.0.0.1 ARGS...` and waits (at most
    /// `STARTUP_TIMEOUT`) for its `listening addr=` line on stderr.
    ///
    /// # Panics
    /// If the binary cannot be spawned, exits early, or does not announce its
    /// address in time; the message carries its stderr.
    pub fn start(args: &[&str]) -> Server {
        let mut cmd = Command::new(WEBVAC_BIN);
        cmd.args(["-p", "0", "-l", "127.0.0.1"])
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The listening line is logged at INFO: make sure it is not filtered
        // out, but let a developer's own RUST_LOG (e.g. debug) through.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {WEBVAC_BIN} {args:?}: {e}"));
        let stderr_pipe = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::sync_channel::<SocketAddr>(1);
        let mut tx = Some(tx);
        let stderr = spawn_stderr_drain(stderr_pipe, "webvac", move |line| {
            if let Some(addr) = parse_listening_line(line) {
                if let Some(tx) = tx.take() {
                    let _ = tx.try_send(addr);
                }
            }
        });
        let addr = match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(addr) => addr,
            Err(e) => {
                let status = stop_child(&mut child, Duration::from_secs(2));
                panic!(
                    "webvac {args:?} did not log `listening addr=...` within {STARTUP_TIMEOUT:?} \
                     ({e}; exit status {status:?}); its stderr:\n{}",
                    stderr.text()
                );
            }
        };
        Server {
            child,
            addr,
            stderr,
            stopped: false,
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Opens a new raw client connection.
    pub fn connect(&self) -> Client {
        Client::connect_tcp(self.addr).unwrap_or_else(|e| {
            panic!(
                "connect to webvac at {}: {e}\nstderr:\n{}",
                self.addr,
                self.stderr_text()
            )
        })
    }

    /// The server's last stderr lines.
    pub fn stderr_text(&self) -> String {
        self.stderr.text()
    }

    /// Whether the process has exited (e.g. crashed).
    pub fn has_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits up to `SHUTDOWN_GRACE`. Returns the exit status,
    /// or `None` if the server had to be killed with SIGKILL.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let status = stop_child(&mut self.child, SHUTDOWN_GRACE);
        self.stopped = true;
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.stopped {
            stop_child(&mut self.child, SHUTDOWN_GRACE);
        }
    }
}

/// A unique, fresh directory under the system temp dir.
pub fn fresh_temp_dir(prefix: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("create temp dir {}: {e}", dir.display()));
    dir
}

/// Panics with the standard "install it" message if `path` is missing.
pub fn require_tool(path: &str, what: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} ({what}) is not installed. These tests need it and never skip: \
         run `.ci/run` (its scripts/install-deps installs memcached, libmemcached-tools and the clients)."
    );
}

/// Panics unless the installed memcached is the pinned reference version.
pub fn require_reference_memcached() {
    require_tool(MEMCACHED_BIN, "the reference memcached");
    let out = Command::new(MEMCACHED_BIN)
        .arg("-V")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {MEMCACHED_BIN} -V: {e}"));
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.trim() == MEMCACHED_VERSION,
        "the differential reference must be {MEMCACHED_VERSION}, found {:?}; run `.ci/run`",
        version.trim()
    );
}

/// Where a memcached instance listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A running reference memcached in a fresh temp dir. Killed on drop.
pub struct Memcached {
    child: Child,
    endpoint: Endpoint,
    dir: PathBuf,
    stderr: StderrTail,
}

impl Memcached {
    /// Starts `memcached -u root -s DIR/memcached.sock -m 64 -U 0` and waits
    /// (bounded) until it accepts a connection.
    ///
    /// # Panics
    /// If memcached is not installed (with a message to run `.ci/run`), or does
    /// not come up within `MEMCACHED_READY_TIMEOUT`.
    pub fn start() -> Memcached {
        Self::start_with(&[])
    }

    /// Like `start`, with extra memcached options appended.
    pub fn start_with(extra_args: &[&str]) -> Memcached {
        require_tool(MEMCACHED_BIN, "the reference memcached");
        let dir = fresh_temp_dir("webvac-memcached");
        let socket = dir.join("memcached.sock");
        let args: Vec<String> = [
            "-u",
            "root",
            "-s",
            socket.to_str().expect("utf-8 temp path"),
            "-m",
            "64",
            "-U",
            "0",
        ]
        .iter()
        .chain(extra_args)
        .map(|s| s.to_string())
        .collect();
        Self::spawn_and_wait(args, Endpoint::Unix(socket), dir)
            .unwrap_or_else(|e| panic!("memcached on a unix socket: {e}"))
    }

    /// Starts memcached on 127.0.0.1 with a free TCP port (for clients that
    /// only speak TCP). The port is found by binding :0 and releasing it;
    /// should another process grab it in between, a few fresh ports are tried.
    pub fn start_tcp() -> Memcached {
        Self::start_with_tcp(&[])
    }

    /// Like `start_tcp`, with extra memcached options appended (`-Z -o
    /// ssl_chain_cert=…` for TLS, say).
    pub fn start_with_tcp(extra_args: &[String]) -> Memcached {
        require_tool(MEMCACHED_BIN, "the reference memcached");
        const ATTEMPTS: usize = 5;
        let mut last_error = String::new();
        for _ in 0..ATTEMPTS {
            let port = free_tcp_port();
            let dir = fresh_temp_dir("webvac-memcached");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let args: Vec<String> = [
                "-u",
                "root",
                "-l",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                "64",
                "-U",
                "0",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(extra_args.iter().cloned())
            .collect();
            match Self::spawn_and_wait(args, Endpoint::Tcp(addr), dir) {
                Ok(m) => return m,
                Err(e) => last_error = e,
            }
        }
        panic!("memcached on TCP did not start in {ATTEMPTS} attempts; last error: {last_error}");
    }

    fn spawn_and_wait(
        args: Vec<String>,
        endpoint: Endpoint,
        dir: PathBuf,
    ) -> Result<Memcached, String> {
        let mut child = Command::new(MEMCACHED_BIN)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot spawn {MEMCACHED_BIN} {args:?}: {e}"))?;
        let stderr = spawn_stderr_drain(
            child.stderr.take().expect("stderr is piped"),
            "memcached",
            |_| {},
        );
        let mut me = Memcached {
            child,
            endpoint,
            dir,
            stderr,
        };
        let deadline = Instant::now() + MEMCACHED_READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = me.child.try_wait() {
                return Err(format!(
                    "memcached {args:?} exited with {status}; stderr:\n{}",
                    me.stderr.text()
                ));
            }
            let ready = match &me.endpoint {
                Endpoint::Unix(path) => UnixStream::connect(path).is_ok(),
                Endpoint::Tcp(addr) => {
                    TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok()
                }
            };
            if ready {
                return Ok(me);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "memcached {args:?} not accepting connections after {MEMCACHED_READY_TIMEOUT:?}; stderr:\n{}",
                    me.stderr.text()
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Where this instance listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The TCP address, for instances started with `start_tcp`.
    pub fn tcp_addr(&self) -> SocketAddr {
        match &self.endpoint {
            Endpoint::Tcp(addr) => *addr,
            Endpoint::Unix(path) => panic!(
                "memcached listens on unix socket {}, not TCP",
                path.display()
            ),
        }
    }

    /// Opens a new raw client connection.
    pub fn connect(&self) -> Client {
        let result = match &self.endpoint {
            Endpoint::Unix(path) => Client::connect_unix(path),
            Endpoint::Tcp(addr) => Client::connect_tcp(*addr),
        };
        result.unwrap_or_else(|e| panic!("connect to memcached at {:?}: {e}", self.endpoint))
    }

    /// memcached's last stderr lines.
    pub fn stderr_text(&self) -> String {
        self.stderr.text()
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        // SIGKILL at once: memcached only notices SIGTERM on its next clock
        // tick (up to a second), and the reference keeps no state worth a
        // clean shutdown.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free 127.0.0.1 TCP port, found by binding :0 and releasing it.
pub fn free_tcp_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Why a reply could not be read. Carries whatever did arrive.
#[derive(Debug)]
pub struct ReplyError {
    pub kind: ReplyErrorKind,
    /// The bytes received before the failure.
    pub partial: Vec<u8>,
}

#[derive(Debug)]
pub enum ReplyErrorKind {
    /// The deadline passed before the reply was complete.
    Timeout(Duration),
    /// The peer closed the connection.
    Closed,
    /// More than `REPLY_BYTES_MAX` bytes without a complete reply.
    TooLarge,
    Io(io::Error),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            ReplyErrorKind::Timeout(t) => format!("no complete reply within {t:?}"),
            ReplyErrorKind::Closed => "connection closed by the server".to_string(),
            ReplyErrorKind::TooLarge => format!("reply exceeds {REPLY_BYTES_MAX} bytes"),
            ReplyErrorKind::Io(e) => format!("i/o error: {e}"),
        };
        write!(f, "{what}; received so far: \"{}\"", escape(&self.partial))
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// A tiny raw-bytes client. Every read has a deadline; bytes that arrive past
/// the end of one reply are kept for the next.
pub struct Client {
    stream: Stream,
    /// Received bytes not yet returned as (part of) a reply.
    pending: Vec<u8>,
}

impl Client {
    pub fn connect_tcp(addr: SocketAddr) -> io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Client {
            stream: Stream::Tcp(stream),
            pending: Vec::new(),
        })
    }

    pub fn connect_unix(path: &Path) -> io::Result<Client> {
        let stream = UnixStream::connect(path)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Client {
            stream: Stream::Unix(stream),
            pending: Vec::new(),
        })
    }

    /// A client over an established TLS session (see `tests/common/tls.rs`).
    #[allow(dead_code)] // only the TLS tests connect this way
    pub fn from_tls(stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> Client {
        Client {
            stream: Stream::Tls(Box::new(stream)),
            pending: Vec::new(),
        }
    }

    /// Writes all of `bytes` (bounded by the write timeout).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write_all(bytes),
            Stream::Unix(s) => s.write_all(bytes),
            Stream::Tls(s) => s.write_all(bytes).and_then(|()| s.flush()),
        }
    }

    /// Closes the writing side, then reads everything the server sends
    /// until it closes the connection (within `timeout` in all).
    ///
    /// # Panics
    /// If the server keeps the connection open past `timeout`.
    #[allow(dead_code)] // not every test binary ends a conversation this way
    pub fn finish(&mut self, timeout: Duration) -> Vec<u8> {
        let _ = match &mut self.stream {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Tls(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
                s.sock.shutdown(std::net::Shutdown::Write)
            }
        };
        let deadline = std::time::Instant::now() + timeout;
        let mut got = std::mem::take(&mut self.pending);
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "still open after {timeout:?}; got {got:?}");
            match self.read_some(&mut buf, left) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return got,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => panic!("reading to the end: {e}"),
            }
        }
    }

    fn read_some(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        // A zero timeout means "block forever" to std: never pass one.
        let timeout = timeout.max(Duration::from_millis(1));
        match &mut self.stream {
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.read(buf)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.read(buf)
            }
            Stream::Tls(s) => {
                s.sock.set_read_timeout(Some(timeout))?;
                s.read(buf)
            }
        }
    }

    /// Reads until `complete(received)` returns `Some(n)`: the first `n`
    /// bytes are the reply; any bytes after them are kept for the next call.
    /// Gives up at `timeout` after the call, on EOF, or past `REPLY_BYTES_MAX`.
    pub fn read_reply_until(
        &mut self,
        mut complete: impl FnMut(&[u8]) -> Option<usize>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ReplyError> {
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some(n) = complete(&self.pending) {
                assert!(
                    n <= self.pending.len(),
                    "reply framer consumed more than it was given"
                );
                let rest = self.pending.split_off(n);
                return Ok(std::mem::replace(&mut self.pending, rest));
            }
            if self.pending.len() > REPLY_BYTES_MAX {
                return Err(self.fail(ReplyErrorKind::TooLarge));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.fail(ReplyErrorKind::Timeout(timeout)));
            }
            match self.read_some(&mut chunk, deadline - now) {
                Ok(0) => return Err(self.fail(ReplyErrorKind::Closed)),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(self.fail(ReplyErrorKind::Io(e))),
            }
        }
    }

    fn fail(&mut self, kind: ReplyErrorKind) -> ReplyError {
        ReplyError {
            kind,
            partial: std::mem::take(&mut self.pending),
        }
    }

    /// Reads until the received bytes end with one of `terminators`.
    pub fn read_until_suffix(
        &mut self,
        terminators: &[&[u8]],
        timeout: Duration,
    ) -> Result<Vec<u8>, ReplyError> {
        self.read_reply_until(
            |buf| {
                terminators
                    .iter()
                    .any(|t| buf.ends_with(t))
                    .then_some(buf.len())
            },
            timeout,
        )
    }

    /// Sends one command (not `noreply`) and reads exactly its reply, framed
    /// by [`one_reply_len`], within `timeout`. Unlike [`Client::request`] it
    /// does not panic: a closed or broken connection is an outcome callers
    /// such as the cluster tests must handle.
    ///
    /// # Errors
    /// A failed send (as [`ReplyErrorKind::Io`]) or any [`Client::read_reply_until`] failure.
    pub fn call(&mut self, request: &[u8], timeout: Duration) -> Result<Vec<u8>, ReplyError> {
        self.send(request).map_err(|e| ReplyError {
            kind: ReplyErrorKind::Io(e),
            partial: Vec::new(),
        })?;
        self.read_reply_until(one_reply_len, timeout)
    }

    /// [`Client::call`] with `REPLY_TIMEOUT`, as text.
    ///
    /// # Panics
    /// On any send or read failure, showing the request and partial reply.
    pub fn ask(&mut self, request: &[u8]) -> String {
        match self.call(request, REPLY_TIMEOUT) {
            Ok(reply) => String::from_utf8_lossy(&reply).into_owned(),
            Err(e) => panic!("reply to \"{}\": {e}", escape(request)),
        }
    }

    /// Sends `request` and reads until the reply ends with one of `terminators`.
    ///
    /// # Panics
    /// On any send or read failure, showing the request and partial reply.
    pub fn request(&mut self, request: &[u8], terminators: &[&[u8]]) -> Vec<u8> {
        self.send(request)
            .unwrap_or_else(|e| panic!("send \"{}\": {e}", escape(request)));
        self.read_until_suffix(terminators, REPLY_TIMEOUT)
            .unwrap_or_else(|e| panic!("reply to \"{}\": {e}", escape(request)))
    }
}

/// The length of the first complete reply in `buf` to a single text or meta
/// command (one sent without `noreply`/`q`), or `None` if more bytes are needed.
///
/// `VALUE` blocks and `STAT` lines continue a reply until `END`; a `VA` line is
/// followed by its data block; any other line (`STORED`, `HD`, `EN`, a number,
/// `SERVER_ERROR ...`, `END`, ...) completes it. An error line in the middle
/// of a multi-get ends the reply, as it does on the wire.
pub fn one_reply_len(buf: &[u8]) -> Option<usize> {
    fn data_len(line: &[u8], index: usize) -> Option<usize> {
        std::str::from_utf8(line)
            .ok()?
            .split_whitespace()
            .nth(index)?
            .parse()
            .ok()
    }
    let mut pos = 0;
    loop {
        let eol = pos + buf[pos..].windows(2).position(|w| w == b"\r\n")?;
        let line = &buf[pos..eol];
        let next = eol + 2;
        if line.starts_with(b"VALUE ") {
            // VALUE <key> <flags> <bytes> [<cas>]
            let Some(bytes) = data_len(line, 3) else {
                return Some(next);
            };
            pos = next + bytes + 2;
            if pos > buf.len() {
                return None;
            }
        } else if line.starts_with(b"STAT ") {
            pos = next;
        } else if line.starts_with(b"VA ") {
            // VA <bytes> <flags>*
            let Some(bytes) = data_len(line, 1) else {
                return Some(next);
            };
            let end = next + bytes + 2;
            return (end <= buf.len()).then_some(end);
        } else {
            return Some(next);
        }
    }
}

/// Escapes bytes for a failure message: printable ASCII as is, `\r \n \t \\`
/// and `\xNN` otherwise. Long input is shown as head … tail.
pub fn escape(bytes: &[u8]) -> String {
    if bytes.len() > ESCAPE_BYTES_MAX {
        let half = ESCAPE_BYTES_MAX / 2;
        return format!(
            "{}…[{} bytes omitted]…{}",
            escape(&bytes[..half]),
            bytes.len() - 2 * half,
            escape(&bytes[bytes.len() - half..])
        );
    }
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// Output of a child run with `run_bounded`.
pub struct RunOutput {
    /// `None` if it was killed for running past its deadline.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion with piped output, killing it after `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> RunOutput {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    // Read both pipes in threads so a full pipe never blocks the child; the
    // threads end when the child exits or is killed (EOF).
    fn collect(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    }
    let out = collect(child.stdout.take().expect("piped"));
    let err = collect(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    RunOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// The seed for a randomised test: `WEBVAC_TEST_SEED` or the clock. Printed,
/// so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("WEBVAC_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
    println!("{test}: seed {seed} (replay with WEBVAC_TEST_SEED={seed})");
    seed
}

/// The numeric value of `STAT name` in a `stats` reply.
pub fn stat_value(text: &str, name: &str) -> u64 {
    let prefix = format!("STAT {name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no numeric {name} in:\n{text}"))
}

/// A field of /proc/PID/status in bytes (the file gives kB): `VmRSS:`,
/// `VmHWM:`.
pub fn proc_status_bytes(pid: u64, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        * 1024
}

/// The length of the first complete `lk` reply in `buf`: any number of `KY`
/// lines, then the line that ends it (`NT`, `EN`, or an error line).
/// [`one_reply_len`] would stop after the first `KY` line.
pub fn lk_reply_len(buf: &[u8]) -> Option<usize> {
    let mut pos = 0;
    loop {
        let eol = pos + buf[pos..].windows(2).position(|w| w == b"\r\n")?;
        if !buf[pos..eol].starts_with(b"KY ") {
            return Some(eol + 2);
        }
        pos = eol + 2;
    }
}

#[cfg(test)]
mod harness_tests {
    use super::*;

    #[test]
    fn frames_one_reply_of_each_shape() {
        assert_eq!(one_reply_len(b"STORED\r\nHD\r\n"), Some(8));
        assert_eq!(one_reply_len(b"STORED\r"), None);
        assert_eq!(one_reply_len(b"END\r\n"), Some(5));
        let get = b"VALUE k 0 5\r\na\r\nEN\r\nEND\r\n";
        assert_eq!(one_reply_len(get), Some(get.len()));
        assert_eq!(one_reply_len(&get[..get.len() - 1]), None);
        assert_eq!(one_reply_len(b"VALUE k 0 5 7\r\nab"), None);
        assert_eq!(one_reply_len(b"VA 2 t9\r\nab\r\nMN\r\n"), Some(13));
        assert_eq!(one_reply_len(b"VA 2 t9\r\nab"), None);
        assert_eq!(one_reply_len(b"STAT a 1\r\nSTAT b 2\r\nEND\r\n"), Some(25));
        assert_eq!(one_reply_len(b"STAT a 1\r\n"), None);
        assert_eq!(
            one_reply_len(b"SERVER_ERROR read quorum not met\r\n"),
            Some(34)
        );
    }

    #[test]
    fn parses_plain_and_coloured_listening_lines() {
        let plain = "2026-11-22T05:40:01.123Z  INFO webvac::server: listening addr=127.0.0.1:40123";
        assert_eq!(
            parse_listening_line(plain),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        let coloured = "\u{1b}[2m2026-11-22T05:40:01.123Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \
                        \u{1b}[2mwebvac::server\u{1b}[0m\u{1b}[2m:\u{1b}[0m listening \
                        \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:40123 \u{1b}[3mother\u{1b}[0m=1";
        assert_eq!(
            parse_listening_line(coloured),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        assert_eq!(
            parse_listening_line("INFO webvac: starting addr=127.0.0.1:1"),
            None
        );
    }
}
