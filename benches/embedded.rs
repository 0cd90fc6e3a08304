//! Latency of one get (hit) and one set (100-byte value) through the
//! embedded API, against a TCP round trip to a local server.
//!
//! ```text
//!   embedded/lone/*              Node, no port                      in-process
//!   embedded/cluster3/*          3 Nodes (N=3) in this process      in-process; R=2 and W=2
//!                                                                   also cross the peer transport
//!   embedded/tcp_client_webvac/* webvac::client::Client ──TCP──▶ `webvac -t 2` (child process)
//!   embedded/tcp_client_node/*   webvac::client::Client ──TCP──▶ Node::serve_memcached, this
//!                                                                process and runtime
//!   embedded/tcp_raw_webvac/*    blocking TcpStream     ──TCP──▶ `webvac -t 2` (child process)
//!   embedded/tcp_raw_memcached/* blocking TcpStream     ──TCP──▶ `memcached -t 2` (child process)
//!   embedded/tcp_client_memcached/* Client              ──TCP──▶ the same memcached
//! ```
//!
//! How calls are timed: criterion's `async_tokio` feature is not enabled
//! (Cargo.toml asks only for `html_reports`), so `b.to_async` is not
//! available. `b.iter(|| rt.block_on(call))` would add entering and
//! leaving the runtime to every call (about 0.1 µs here, some 8% of an
//! in-process hit: 1.22 against 1.16 µs when tried), so every async case
//! uses `iter_custom` and runs all of a sample's calls, back to back,
//! inside one `block_on` on a 2-worker multi-thread runtime, timing the
//! loop. The blocking raw-TCP cases time the same kind of loop with no
//! runtime. Every figure is therefore wall time per call with one call in
//! flight, measured the same way on both sides of the comparison.
//!
//! After each case that criterion runs (only under `cargo bench`, and unless
//! `WEBVAC_BENCH_HDR=0`) an hdrhistogram loop times [`HDR_OPS`] calls one
//! by one and prints p50/p90/p99/p99.9/max; each of those samples includes
//! one `Instant::now()` pair (some tens of ns), the criterion figures do not.
//!
//! The `webvac` binary comes from `WEBVAC_BIN`, else from next to the bench
//! executable (`$CARGO_TARGET_DIR/release/webvac`: build it first with
//! `cargo build --release --bin webvac`); `memcached` from `MEMCACHED_BIN`,
//! else `PATH`. A missing server skips its cases with a message. Children
//! are killed when their cases end, and by the kernel if the bench dies
//! (`PR_SET_PDEATHSIG`).

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use hdrhistogram::Histogram;
use tokio::runtime::Runtime;
use webvac::Node;
use webvac::client::{Client, ClientConfig, Options};
use webvac::config::{ClusterConfig, Config, MemberConfig};

/// The value every set writes and every get reads.
const VALUE: [u8; VALUE_BYTES] = [b'v'; VALUE_BYTES];
const VALUE_BYTES: usize = 100;
/// Members of the in-process cluster, and its replica count (every member
/// holds every key).
const CLUSTER_MEMBERS: u16 = 3;
const CLUSTER_REPLICAS: usize = 3;
/// Worker threads of the bench's runtime and of each server child (the
/// machine this was written for has 2 cores).
const THREADS: usize = 2;
/// Calls timed one by one for the percentiles, after `HDR_WARMUP_OPS`.
const HDR_OPS: u64 = 100_000;
const HDR_WARMUP_OPS: u64 = 5_000;
/// Highest latency the histogram tracks, in ns; slower calls are clamped.
const HDR_NS_MAX: u64 = 10_000_000_000;
/// How long a child server may take to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// A raw reply larger than this is a broken server, not a reply.
const RAW_REPLY_BYTES_MAX: usize = 4096;
/// Candidate keys tried to find one the first member is primary for.
const PRIMARY_KEY_TRIES_MAX: usize = 10_000;
/// The criterion group every case is in.
const GROUP: &str = "embedded";

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .enable_all()
        .build()
        .expect("build the tokio runtime")
}

/// `n` distinct free 127.0.0.1 ports: all bound at once so none repeats,
/// then released for the servers to bind (a small race, fine for a bench).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

// ---- Child servers ----------------------------------------------------------

/// A server child process, killed (and reaped) on drop.
struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// Spawns `program args`, which must listen on `127.0.0.1:port`, and
    /// waits until it accepts a connection.
    fn start(name: &'static str, program: &PathBuf, args: &[String], port: u16) -> Server {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl(2), which is async-signal-safe. It makes the
        // kernel kill the server if the bench dies without dropping it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", program.display()));
        let mut server = Server {
            name,
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{name} exited at startup: {status}");
            }
            if TcpStream::connect(server.addr).is_ok() {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not accept connections on {} within {STARTUP_TIMEOUT:?}",
                server.addr
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("stopped {} (pid {})", self.name, self.child.id());
    }
}

/// The `webvac` binary: `WEBVAC_BIN`, else the one Cargo built next to
/// this bench (`target/release/deps/embedded-*` → `target/release/webvac`).
fn webvac_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WEBVAC_BIN") {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("webvac");
    path.is_file().then_some(path)
}

/// The `memcached` binary: `MEMCACHED_BIN`, else the first on `PATH`.
fn memcached_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("MEMCACHED_BIN") {
        return Some(PathBuf::from(path));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("memcached"))
        .find(|p| p.is_file())
}

fn start_webvac() -> Option<Server> {
    let Some(bin) = webvac_bin() else {
        eprintln!(
            "SKIP webvac child cases: no webvac binary; run `cargo build --release --bin webvac` \
             (same CARGO_TARGET_DIR) or set WEBVAC_BIN"
        );
        return None;
    };
    let port = free_ports(1)[0];
    let args = [
        "-p".to_string(),
        port.to_string(),
        "-l".to_string(),
        "127.0.0.1".to_string(),
        "-t".to_string(),
        THREADS.to_string(),
    ];
    Some(Server::start("webvac", &bin, &args, port))
}

fn start_memcached() -> Option<Server> {
    let Some(bin) = memcached_bin() else {
        eprintln!("SKIP memcached cases: memcached is not installed (or set MEMCACHED_BIN)");
        return None;
    };
    let port = free_ports(1)[0];
    let args = [
        "-u".to_string(),
        "root".to_string(),
        "-p".to_string(),
        port.to_string(),
        "-l".to_string(),
        "127.0.0.1".to_string(),
        "-t".to_string(),
        THREADS.to_string(),
        "-U".to_string(),
        "0".to_string(),
    ];
    Some(Server::start("memcached", &bin, &args, port))
}

// ---- Raw blocking TCP -------------------------------------------------------

/// One blocking text-protocol connection: a request written whole, its
/// reply read until it ends with the expected terminator.
struct Raw {
    stream: TcpStream,
    buf: [u8; RAW_REPLY_BYTES_MAX],
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        Raw {
            stream,
            buf: [0; RAW_REPLY_BYTES_MAX],
        }
    }

    /// One round trip; returns the reply's length.
    fn round_trip(&mut self, request: &[u8], end: &[u8]) -> usize {
        self.stream.write_all(request).expect("write request");
        let mut len = 0;
        loop {
            let n = self.stream.read(&mut self.buf[len..]).expect("read reply");
            assert!(n > 0, "server closed the connection");
            len += n;
            if self.buf[..len].ends_with(end) {
                return len;
            }
            assert!(len < RAW_REPLY_BYTES_MAX, "reply too long");
        }
    }
}

fn raw_get_request(key: &str) -> Vec<u8> {
    format!("get {key}\r\n").into_bytes()
}

fn raw_set_request(key: &str) -> Vec<u8> {
    let mut request = format!("set {key} 0 0 {VALUE_BYTES}\r\n").into_bytes();
    request.extend_from_slice(&VALUE);
    request.extend_from_slice(b"\r\n");
    request
}

/// `get`'s reply to a hit on `key`: `VALUE key 0 100`, the data, `END`.
fn raw_hit_reply_len(key: &str) -> usize {
    format!("VALUE {key} 0 {VALUE_BYTES}\r\n").len() + VALUE_BYTES + "\r\nEND\r\n".len()
}

// ---- Timing -----------------------------------------------------------------

/// Percentiles of one case, in ns.
struct Row {
    name: String,
    mean: f64,
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

/// Runs the per-call percentile loops and keeps their results.
struct Percentiles {
    enabled: bool,
    rows: Vec<Row>,
}

impl Percentiles {
    fn new() -> Percentiles {
        // Only a real `cargo bench` run (criterion's `--bench`), not its
        // one-iteration `--test` mode, `--list` or `--profile-time`.
        let args: Vec<String> = std::env::args().collect();
        let bench_mode = args.iter().any(|a| a == "--bench")
            && !args
                .iter()
                .any(|a| a == "--test" || a == "--list" || a == "--profile-time");
        let wanted = std::env::var("WEBVAC_BENCH_HDR").map_or(true, |v| v != "0");
        Percentiles {
            enabled: bench_mode && wanted,
            rows: Vec::new(),
        }
    }

    fn histogram() -> Histogram<u64> {
        Histogram::new_with_bounds(1, HDR_NS_MAX, 3).expect("histogram bounds")
    }

    fn push(&mut self, name: &str, h: &Histogram<u64>) {
        let row = Row {
            name: name.to_string(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        };
        eprintln!(
            "hdr {name}: n={} mean={:.0}ns p50={}ns p90={}ns p99={}ns p99.9={}ns max={}ns",
            h.len(),
            row.mean,
            row.p50,
            row.p90,
            row.p99,
            row.p999,
            row.max
        );
        self.rows.push(row);
    }

    fn run_async<F: AsyncFnMut()>(&mut self, rt: &Runtime, name: &str, op: &mut F) {
        if !self.enabled {
            return;
        }
        let mut h = Self::histogram();
        rt.block_on(async {
            for _ in 0..HDR_WARMUP_OPS {
                op().await;
            }
            for _ in 0..HDR_OPS {
                let start = Instant::now();
                op().await;
                h.saturating_record(elapsed_ns(start));
            }
        });
        self.push(name, &h);
    }

    fn run_sync<F: FnMut()>(&mut self, name: &str, op: &mut F) {
        if !self.enabled {
            return;
        }
        let mut h = Self::histogram();
        for _ in 0..HDR_WARMUP_OPS {
            op();
        }
        for _ in 0..HDR_OPS {
            let start = Instant::now();
            op();
            h.saturating_record(elapsed_ns(start));
        }
        self.push(name, &h);
    }

    /// The table, in markdown, on stdout.
    fn print(&self) {
        if self.rows.is_empty() {
            return;
        }
        println!("\nPer-call latency ({HDR_OPS} calls each, ns, hdrhistogram):\n");
        println!("| case | mean | p50 | p90 | p99 | p99.9 | max |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for r in &self.rows {
            println!(
                "| {} | {:.0} | {} | {} | {} | {} | {} |",
                r.name, r.mean, r.p50, r.p90, r.p99, r.p999, r.max
            );
        }
    }
}

fn elapsed_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One async case: criterion over `iter_custom` (a sample's calls inside
/// one `block_on`), then the percentile loop, unless criterion's filter
/// left the case out (it then never calls the routine).
fn async_case<F: AsyncFnMut()>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    hdr: &mut Percentiles,
    name: &str,
    mut op: F,
) {
    let mut ran = false;
    g.bench_function(name, |b| {
        ran = true;
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    op().await;
                }
                start.elapsed()
            })
        })
    });
    if ran {
        hdr.run_async(rt, &format!("{GROUP}/{name}"), &mut op);
    }
}

/// One blocking case, timed the same way as [`async_case`].
fn sync_case<F: FnMut()>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    hdr: &mut Percentiles,
    name: &str,
    mut op: F,
) {
    let mut ran = false;
    g.bench_function(name, |b| {
        ran = true;
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                op();
            }
            start.elapsed()
        })
    });
    if ran {
        hdr.run_sync(&format!("{GROUP}/{name}"), &mut op);
    }
}

// ---- Cases ------------------------------------------------------------------

/// (a) A lone node, no port: every call runs in this process.
fn lone(g: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, hdr: &mut Percentiles) {
    let node = rt
        .block_on(Node::builder().start())
        .expect("start a lone node");
    let key = "bench:hit";
    rt.block_on(node.set(key, VALUE, &Options::default()))
        .expect("preload");
    assert!(node.holds(key));
    let default = Options::default();
    async_case(g, rt, hdr, "lone/get_hit", async || {
        let v = node.get(black_box(key)).await.expect("get");
        assert_eq!(v.map(|v| v.data.len()), Some(VALUE_BYTES));
    });
    async_case(g, rt, hdr, "lone/set", async || {
        black_box(
            node.set(black_box("bench:set"), &VALUE, &default)
                .await
                .expect("set"),
        );
    });
    rt.block_on(node.shutdown())
        .expect("shutdown the lone node");
}

/// (b) Three members in this process, N = 3: every member holds every key.
/// How long a member may take to see the others up.
const MEMBERS_UP_DEADLINE: Duration = Duration::from_secs(30);

/// Waits (bounded) until the member serving memcached at `addr` sees all
/// `members` up (`stats cluster`: `self` or `up`).
fn wait_all_up(addr: SocketAddr, members: usize) {
    let deadline = Instant::now() + MEMBERS_UP_DEADLINE;
    loop {
        let mut reply = Vec::new();
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            if s.write_all(b"stats cluster\r\n").is_ok() {
                let mut buf = [0u8; 8192];
                while !reply.ends_with(b"END\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => reply.extend_from_slice(&buf[..n]),
                    }
                }
            }
        }
        let text = String::from_utf8_lossy(&reply);
        let up = text
            .lines()
            .filter_map(|l| l.strip_prefix("STAT member:"))
            .filter(|l| {
                let state = l.split_whitespace().nth(1).unwrap_or("");
                state == "up" || state == "self"
            })
            .count();
        if up == members {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} sees {up} of {members} members up:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cluster(g: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, hdr: &mut Percentiles) {
    let ports = free_ports(2 * usize::from(CLUSTER_MEMBERS));
    let members: Vec<MemberConfig> = (1..=CLUSTER_MEMBERS)
        .zip(ports.chunks(2))
        .map(|(id, p)| MemberConfig {
            id,
            client: format!("127.0.0.1:{}", p[0]),
            peer: format!("127.0.0.1:{}", p[1]),
        })
        .collect();
    let config = |id: u16| {
        let mut cluster = ClusterConfig::new(id, members.clone());
        cluster.replicas = CLUSTER_REPLICAS;
        Config {
            cluster: Some(cluster),
            ..Config::default()
        }
    };
    // Started together; each serves its memcached port only so that the
    // bench can wait, below, until every member sees every other up (a
    // member whose link to a key's primary is still connecting fails over,
    // and a W=1 write through a failover primary needs every other replica:
    // run once right after start, as `cargo test --all-targets` does, that
    // failed the bench in CI). The timed calls are all in-process.
    let (n1, n2, n3) = rt.block_on(async {
        let member = |id| Node::builder().config(config(id)).serve_memcached(true);
        tokio::join!(member(1).start(), member(2).start(), member(3).start())
    });
    let nodes = [
        n1.expect("start member 1"),
        n2.expect("start member 2"),
        n3.expect("start member 3"),
    ];
    for n in &nodes {
        let addr = n.memcached_addr().expect("a member serving memcached");
        wait_all_up(addr, nodes.len());
    }
    let node = &nodes[0];
    // A key member 1 is the primary for, so a W=1 write stays local too.
    let me: SocketAddr = members[0].client.parse().expect("member address");
    let key = (0..PRIMARY_KEY_TRIES_MAX)
        .map(|i| format!("bench:{i}"))
        .find(|k| node.preference_list(k).first() == Some(&me))
        .expect("a key member 1 is primary for");
    assert!(node.holds(&key), "member 1 must hold {key}");
    rt.block_on(node.set(&key, VALUE, &Options::default()))
        .expect("preload (W=2)");
    let r1 = Options {
        read_quorum: Some(1),
        ..Options::default()
    };
    let w1 = Options {
        write_quorum: Some(1),
        ..Options::default()
    };
    let default = Options::default();
    let set_key = format!("{key}:set");
    async_case(g, rt, hdr, "cluster3/get_hit_r1_local", async || {
        let v = node.get_with(black_box(&key), &r1).await.expect("get R=1");
        assert_eq!(v.map(|v| v.data.len()), Some(VALUE_BYTES));
    });
    async_case(g, rt, hdr, "cluster3/get_hit_r2", async || {
        let v = node.get(black_box(&key)).await.expect("get R=2");
        assert_eq!(v.map(|v| v.data.len()), Some(VALUE_BYTES));
    });
    async_case(g, rt, hdr, "cluster3/set_w2", async || {
        black_box(node.set(&set_key, &VALUE, &default).await.expect("set W=2"));
    });
    async_case(g, rt, hdr, "cluster3/set_w1_primary", async || {
        black_box(node.set(&set_key, &VALUE, &w1).await.expect("set W=1"));
    });
    rt.block_on(async {
        for n in &nodes {
            n.shutdown().await.expect("shutdown a member");
        }
    });
}

/// The network client's get-hit and set cases against `addr`.
fn client_cases(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    hdr: &mut Percentiles,
    prefix: &str,
    addr: SocketAddr,
) {
    let client = rt
        .block_on(Client::connect(&[addr], ClientConfig::default()))
        .expect("connect the client");
    let key = "bench:client:hit";
    rt.block_on(client.set(key, VALUE, &Options::default()))
        .expect("preload");
    let default = Options::default();
    async_case(g, rt, hdr, &format!("{prefix}/get_hit"), async || {
        let v = client.get(black_box(key)).await.expect("get");
        assert_eq!(v.map(|v| v.data.len()), Some(VALUE_BYTES));
    });
    async_case(g, rt, hdr, &format!("{prefix}/set"), async || {
        black_box(
            client
                .set(black_box("bench:client:set"), &VALUE, &default)
                .await
                .expect("set"),
        );
    });
    // The client's connection tasks live on the runtime: drop it there.
    rt.block_on(async move { drop(client) });
}

/// The raw blocking get-hit and set cases against `addr`.
fn raw_cases(
    g: &mut BenchmarkGroup<'_, WallTime>,
    hdr: &mut Percentiles,
    prefix: &str,
    addr: SocketAddr,
) {
    let key = "bench:raw:hit";
    let mut raw = Raw::connect(addr);
    let set = raw_set_request(key);
    assert_eq!(
        raw.round_trip(&set, b"\r\n"),
        b"STORED\r\n".len(),
        "preload"
    );
    let get = raw_get_request(key);
    let hit_len = raw_hit_reply_len(key);
    assert_eq!(raw.round_trip(&get, b"END\r\n"), hit_len, "a hit");
    sync_case(g, hdr, &format!("{prefix}/get_hit"), || {
        let len = raw.round_trip(black_box(&get), b"END\r\n");
        assert_eq!(len, hit_len);
    });
    let set = raw_set_request("bench:raw:set");
    sync_case(g, hdr, &format!("{prefix}/set"), || {
        let len = raw.round_trip(black_box(&set), b"\r\n");
        assert_eq!(len, b"STORED\r\n".len());
    });
}

/// (c) and (d): TCP round trips.
fn tcp(g: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, hdr: &mut Percentiles) {
    if let Some(webvac) = start_webvac() {
        client_cases(g, rt, hdr, "tcp_client_webvac", webvac.addr);
        raw_cases(g, hdr, "tcp_raw_webvac", webvac.addr);
        drop(webvac);
    }
    // For context: the memcached port of a node in this process, on the
    // bench's own runtime (client and server share its 2 workers).
    let port = free_ports(1)[0];
    let node = rt
        .block_on(
            Node::builder()
                .config(Config {
                    listen: "127.0.0.1".to_string(),
                    port,
                    ..Config::default()
                })
                .serve_memcached(true)
                .start(),
        )
        .expect("start a serving node");
    let addr = node.memcached_addr().expect("the node serves memcached");
    client_cases(g, rt, hdr, "tcp_client_node", addr);
    rt.block_on(node.shutdown())
        .expect("shutdown the serving node");
    if let Some(memcached) = start_memcached() {
        raw_cases(g, hdr, "tcp_raw_memcached", memcached.addr);
        client_cases(g, rt, hdr, "tcp_client_memcached", memcached.addr);
        drop(memcached);
    }
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    let mut hdr = Percentiles::new();
    let mut g = c.benchmark_group(GROUP);
    lone(&mut g, &rt, &mut hdr);
    cluster(&mut g, &rt, &mut hdr);
    tcp(&mut g, &rt, &mut hdr);
    g.finish();
    hdr.print();
}

criterion_group!(embedded, benches);
criterion_main!(embedded);
