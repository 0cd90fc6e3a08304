//! End-to-end test of the embedded-mode example, `examples/cache_aside.rs`:
//! a three-member cluster of two example instances and one `webvac` server
//! on loopback, plus a client-only instance, driven over HTTP and the
//! memcached protocol.
//!
//! ```text
//!   test ─HTTP─▶ cache_aside (member 1) ◀─peer─▶ cache_aside (member 2)
//!        ─HTTP─▶ cache_aside (client only)              ▲ peer
//!        ─memcached (raw bytes)────────────────▶ webvac (member 3)
//! ```
//!
//! The example runs as its own binary, which Cargo builds for a plain
//! `cargo test` but not for `cargo test --test example`: the test finds it
//! next to its own executable and fails, saying to build it, when it is
//! missing or older than its source.
//!
//! Every process writes its output to a log file in a fresh temp dir (no
//! pipe can fill up) and is killed when the test ends, passed or not. Every
//! wait polls with a deadline; every socket read has one.

mod common;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::{
    CLUSTER_POLL_INTERVAL, CLUSTER_READY_TIMEOUT, Cluster, Member, NodeId, PROBE_REPLY_TIMEOUT,
    START_ATTEMPTS, member_states, parse_stats,
};
use common::{Client, POLL_INTERVAL, SHUTDOWN_GRACE, STARTUP_TIMEOUT, fresh_temp_dir, stop_child};

/// Deadline of one HTTP exchange. Above the example's cache deadline (6 s):
/// a request that waits for a dead member still gets its answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// An HTTP response larger than this is a runaway, not a response.
const HTTP_RESPONSE_BYTES_MAX: usize = 1024 * 1024;
/// Bytes of a log file shown in a failure message (its end).
const LOG_TAIL_BYTES: u64 = 16 * 1024;
/// The simulated origin's delay, shorter than the example's default.
const ORIGIN_DELAY_MS: &str = "20";

/// Product 7 as the example's origin serves it.
const PRODUCT_7: &str = r#"{"id":7,"name":"product 7","price_cents":5533}"#;
/// Product 9 as the example's origin serves it.
const PRODUCT_9: &str = r#"{"id":9,"name":"product 9","price_cents":1371}"#;

#[test]
fn cache_aside_cluster_end_to_end() {
    let mut d = Deployment::start();
    let [a, b] = [d.instances[0].http, d.instances[1].http];
    let c = d.client_only.as_ref().expect("started").http;

    // Cache-aside: a miss loads the origin once; then every instance hits.
    let first = d.get(a, "/products/7");
    assert_eq!((first.status, first.cache()), (200, "miss"), "{first:?}");
    assert_eq!(first.body, PRODUCT_7);
    for (via, name) in [
        (a, "the same instance"),
        (b, "the other member"),
        (c, "client only"),
    ] {
        let again = d.get(via, "/products/7");
        assert_eq!(
            (again.status, again.cache()),
            (200, "hit"),
            "via {name}: {again:?}"
        );
        assert_eq!(again.body, PRODUCT_7, "via {name}");
    }
    assert_eq!(d.stat(a, "origin_loads"), 1);
    assert_eq!(d.stat(b, "origin_loads"), 0);
    assert_eq!(d.stat(c, "origin_loads"), 0);

    // One cluster: the standalone webvac serves what the example cached...
    let mut webvac = d.memcached(3);
    let reply = webvac.ask(b"get product:7\r\n");
    let want = format!(
        "VALUE product:7 0 {}\r\n{PRODUCT_7}\r\nEND\r\n",
        PRODUCT_7.len()
    );
    assert_eq!(reply, want);
    // ...and the example serves what a memcached client stored.
    let product_8 = r#"{"id":8,"name":"stored over memcached"}"#;
    let set = format!("set product:8 0 60 {}\r\n{product_8}\r\n", product_8.len());
    assert_eq!(webvac.ask(set.as_bytes()), "STORED\r\n");
    let eight = d.get(a, "/products/8");
    assert_eq!((eight.status, eight.cache()), (200, "hit"), "{eight:?}");
    assert_eq!(eight.body, product_8);
    assert_eq!(
        d.stat(a, "origin_loads"),
        1,
        "a hit must not load the origin"
    );

    // A view POSTed twice with one Idempotency-Key counts once, whichever
    // instance each attempt reaches; another key counts again.
    assert_eq!(d.view(a, 7, Some("retry-me")), 1);
    assert_eq!(
        d.view(b, 7, Some("retry-me")),
        1,
        "a retry through the other member"
    );
    assert_eq!(
        d.view(c, 7, Some("retry-me")),
        1,
        "a retry through client only"
    );
    assert_eq!(d.view(b, 7, Some("another-view")), 2);
    // Keys longer than a request id (a UUID) work the same.
    let uuid = "3f2b6a9e-8c1d-4e7a-9b5f-0a1c2d3e4f50";
    assert_eq!(d.view(c, 7, Some(uuid)), 3);
    assert_eq!(d.view(a, 7, Some(uuid)), 3);
    // Without a key every POST is a new view.
    assert_eq!(d.view(a, 7, None), 4);
    assert_eq!(d.view(a, 7, None), 5);
    // Another product has its own counter, even with a key used above.
    assert_eq!(d.view(b, 8, Some("retry-me")), 1);

    // Write-through: every instance and memcached clients see the new
    // document at once.
    let renamed = r#"{"id":7,"name":"renamed","price_cents":1}"#;
    let put = d.http(b, "PUT", "/products/7", &[], renamed);
    assert_eq!(put.status, 204, "{put:?}");
    let read = d.get(a, "/products/7");
    assert_eq!((read.cache(), read.body.as_str()), ("hit", renamed));
    let reply = webvac.ask(b"get product:7\r\n");
    assert!(reply.contains(renamed), "{reply:?}");
    let wrong = d.http(b, "PUT", "/products/7", &[], r#"{"id":8}"#);
    assert_eq!(
        wrong.status, 400,
        "a document about another product: {wrong:?}"
    );
    let garbage = d.http(b, "PUT", "/products/7", &[], "not json");
    assert_eq!(garbage.status, 400, "{garbage:?}");

    // Invalidation: the next read loads the origin again.
    let delete = d.http(a, "DELETE", "/products/7", &[], "");
    assert_eq!(delete.status, 204, "{delete:?}");
    let reloaded = d.get(b, "/products/7");
    assert_eq!(
        (reloaded.cache(), reloaded.body.as_str()),
        ("miss", PRODUCT_7)
    );
    assert_eq!(d.stat(b, "origin_loads"), 1);

    // Stats say what each instance is.
    let stats = d.get(a, "/stats").body;
    assert!(stats.contains(r#""role":"member""#), "{stats}");
    assert_eq!(json_u64(&stats, "node_id"), Some(1), "{stats}");
    let stats = d.get(c, "/stats").body;
    assert!(stats.contains(r#""role":"client-only""#), "{stats}");
    assert!(stats.contains(r#""node_id":null"#), "{stats}");

    // The webvac member dies: with N=3, R=2, W=2 the two members left are
    // a quorum, and the service keeps working through every instance.
    drop(webvac);
    d.kill_webvac();
    for (via, name) in [(a, "member 1"), (b, "member 2"), (c, "client only")] {
        let read = d.get(via, "/products/7");
        assert_eq!(read.status, 200, "via {name}: {read:?}");
        assert_eq!(
            (read.cache(), read.body.as_str()),
            ("hit", PRODUCT_7),
            "via {name}"
        );
    }
    let nine = d.get(b, "/products/9");
    assert_eq!((nine.cache(), nine.body.as_str()), ("miss", PRODUCT_9));
    let nine = d.get(a, "/products/9");
    assert_eq!((nine.cache(), nine.body.as_str()), ("hit", PRODUCT_9));
    assert_eq!(d.view(a, 7, Some("after-the-crash")), 6);
    assert_eq!(d.view(b, 7, Some("after-the-crash")), 6);
    assert_eq!(d.view(c, 7, Some("after-the-crash")), 6);
    assert_eq!(d.view(c, 7, Some("and-one-more")), 7);

    // SIGTERM stops each instance gracefully: HTTP server, then node.
    d.stop_instances_gracefully();
}

// ---- The deployment under test ---------------------------------------------

/// A running instance of the example.
struct Instance {
    process: Process,
    /// Where its HTTP API listens.
    http: SocketAddr,
}

/// The processes of one test: a `webvac` member, two example members and a
/// client-only example, with their config and log files in `dir`.
struct Deployment {
    dir: PathBuf,
    members: Vec<Member>,
    /// Member 3, until it is killed.
    webvac: Option<Process>,
    /// Members 1 and 2.
    instances: Vec<Instance>,
    client_only: Option<Instance>,
}

/// Why a deployment did not come up.
enum StartFailure {
    /// A port was taken between picking and binding it: worth another try
    /// with fresh ports.
    PortTaken(String),
    Other(String),
}

impl Deployment {
    /// Starts everything and waits until every member sees every other up
    /// and every instance answers HTTP.
    ///
    /// # Panics
    /// If it does not come up (the message carries every log).
    fn start() -> Deployment {
        let example = example_bin();
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let dir = fresh_temp_dir("webvac-example");
            let mut d = Deployment {
                dir,
                members: Vec::new(),
                webvac: None,
                instances: Vec::new(),
                client_only: None,
            };
            match d.try_start(&example) {
                Ok(()) => return d,
                Err(StartFailure::PortTaken(why)) => {
                    eprintln!("start attempt {attempt} lost a port race: {why}");
                    last = why;
                }
                Err(StartFailure::Other(why)) => panic!("the deployment did not start: {why}"),
            }
        }
        panic!("the deployment did not start in {START_ATTEMPTS} attempts; last: {last}");
    }

    fn try_start(&mut self, example: &Path) -> Result<(), StartFailure> {
        let ports = free_ports(3 * 2 + 3);
        self.members = (0..3)
            .map(|i| Member {
                id: NodeId::try_from(i + 1).expect("small"),
                client: ports[2 * i],
                peer: ports[2 * i + 1],
            })
            .collect();
        let http = &ports[6..];
        let config = |id: NodeId| {
            let path = self.dir.join(format!("node{id}.toml"));
            fs::write(&path, config_toml(id, &self.members)).expect("write config");
            path.to_str().expect("utf-8 temp path").to_string()
        };
        let (c1, c2, c3) = (config(1), config(2), config(3));

        let args = ["--config".to_string(), c3];
        self.webvac = Some(Process::spawn("webvac", Cluster::command(&args), &self.dir));
        for (config, http) in [(c1, http[0]), (c2, http[1])] {
            let name = format!("cache_aside-{}", self.instances.len() + 1);
            let cmd = example_command(example, &["--config", &config], http);
            let process = Process::spawn(&name, cmd, &self.dir);
            self.instances.push(Instance { process, http });
        }
        self.wait_members_up()?;
        for i in 0..self.instances.len() {
            self.wait_http(self.instances[i].http)?;
        }

        // Client only: discovers the cluster from the first seed that
        // answers (the first is deliberately one that is not there).
        let seeds = format!(
            "127.0.0.1:1,{},{}",
            self.members[2].client, self.members[0].client
        );
        let cmd = example_command(example, &["--client-only", &seeds], http[2]);
        self.client_only = Some(Instance {
            process: Process::spawn("cache_aside-client-only", cmd, &self.dir),
            http: http[2],
        });
        self.wait_http(http[2])
    }

    /// Every process, running or not.
    fn processes(&mut self) -> impl Iterator<Item = &mut Process> {
        self.webvac.iter_mut().chain(
            self.instances
                .iter_mut()
                .chain(self.client_only.as_mut())
                .map(|i| &mut i.process),
        )
    }

    /// Fails if a process exited by itself: a port race or a real error.
    fn check_running(&mut self) -> Result<(), StartFailure> {
        for p in self.processes() {
            if let Some(status) = p.exited() {
                let log = p.log_tail();
                let why = format!("{} exited with {status}; its log:\n{log}", p.name);
                let lower = log.to_ascii_lowercase();
                return Err(
                    if lower.contains("address already in use") || lower.contains("addrinuse") {
                        StartFailure::PortTaken(why)
                    } else {
                        StartFailure::Other(why)
                    },
                );
            }
        }
        Ok(())
    }

    /// Waits until each member's `stats cluster` shows every other member
    /// `up`.
    fn wait_members_up(&mut self) -> Result<(), StartFailure> {
        let deadline = Instant::now() + STARTUP_TIMEOUT + CLUSTER_READY_TIMEOUT;
        loop {
            self.check_running()?;
            let members = &self.members;
            let Err(why) = members
                .iter()
                .try_for_each(|m| member_sees_all_up(m, members))
            else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(StartFailure::Other(format!(
                    "members not all up within {:?}: {why}\n{}",
                    STARTUP_TIMEOUT + CLUSTER_READY_TIMEOUT,
                    self.describe()
                )));
            }
            thread::sleep(CLUSTER_POLL_INTERVAL);
        }
    }

    /// Waits until the instance at `addr` answers `GET /stats`.
    fn wait_http(&mut self, addr: SocketAddr) -> Result<(), StartFailure> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.check_running()?;
            match http(addr, "GET", "/stats", &[], "") {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => {
                    let why = format!("GET /stats at {addr} answered {r:?}\n{}", self.describe());
                    return Err(StartFailure::Other(why));
                }
                Err(_) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
                Err(e) => {
                    let why = format!(
                        "no HTTP at {addr} within {STARTUP_TIMEOUT:?}: {e}\n{}",
                        self.describe()
                    );
                    return Err(StartFailure::Other(why));
                }
            }
        }
    }

    /// Sends one HTTP request.
    ///
    /// # Panics
    /// If it gets no complete response, with every process's log.
    fn http(
        &mut self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpResponse {
        match http(addr, method, path, headers, body) {
            Ok(r) => r,
            Err(e) => panic!("{method} {path} at {addr}: {e}\n{}", self.describe()),
        }
    }

    fn get(&mut self, addr: SocketAddr, path: &str) -> HttpResponse {
        self.http(addr, "GET", path, &[], "")
    }

    /// POSTs a view of product `id` and returns the count.
    fn view(&mut self, addr: SocketAddr, id: u64, idempotency_key: Option<&str>) -> u64 {
        let headers: Vec<(&str, &str)> = idempotency_key
            .map(|k| ("Idempotency-Key", k))
            .into_iter()
            .collect();
        let r = self.http(addr, "POST", &format!("/products/{id}/views"), &headers, "");
        assert_eq!(
            r.status,
            200,
            "view of {id} at {addr}: {r:?}\n{}",
            self.describe()
        );
        assert_eq!(json_u64(&r.body, "id"), Some(id), "{r:?}");
        json_u64(&r.body, "views").unwrap_or_else(|| panic!("no views in {r:?}"))
    }

    /// One number from the instance's `GET /stats`.
    fn stat(&mut self, addr: SocketAddr, field: &str) -> u64 {
        let r = self.get(addr, "/stats");
        assert_eq!(r.status, 200, "{r:?}");
        json_u64(&r.body, field).unwrap_or_else(|| panic!("no {field} in {r:?}"))
    }

    /// A raw memcached connection to member `id`.
    fn memcached(&self, id: NodeId) -> Client {
        let addr = self.members[usize::from(id) - 1].client;
        Client::connect_tcp(addr)
            .unwrap_or_else(|e| panic!("connect to member {id} at {addr}: {e}"))
    }

    /// Kills the `webvac` member with SIGKILL. The test goes on at once:
    /// the members learn of it from their first request that fails.
    fn kill_webvac(&mut self) {
        self.webvac.as_mut().expect("webvac runs").kill();
    }

    /// Sends SIGTERM to every example instance and checks that each stops
    /// by itself, cleanly, in time.
    fn stop_instances_gracefully(&mut self) {
        let instances = self.instances.iter_mut().chain(self.client_only.as_mut());
        for i in instances {
            let status = i.process.terminate();
            let log = i.process.log_tail();
            assert!(
                status.is_some_and(|s| s.success()),
                "{} did not stop cleanly on SIGTERM ({status:?}); its log:\n{log}",
                i.process.name
            );
            assert!(log.contains("cache_aside stopped"), "{log}");
        }
    }

    /// Every process's state and the end of its log, for failure messages.
    fn describe(&mut self) -> String {
        let mut out = format!("logs in {}\n", self.dir.display());
        for p in self.processes() {
            let state = match p.exited() {
                Some(status) => format!("exited: {status}"),
                None => "running".to_string(),
            };
            out.push_str(&format!("--- {} ({state}) ---\n{}\n", p.name, p.log_tail()));
        }
        out
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for p in self.processes() {
            p.kill();
        }
        if thread::panicking() {
            eprintln!("logs kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A member's TOML: the three members, N=3, R=2, W=2 (the defaults).
fn config_toml(id: NodeId, members: &[Member]) -> String {
    let mut toml = format!("memory_limit_mb = 64\n\n[cluster]\nnode_id = {id}\n");
    for m in members {
        toml.push_str(&format!(
            "\n[[cluster.members]]\nid = {}\nclient = \"{}\"\npeer = \"{}\"\n",
            m.id, m.client, m.peer
        ));
    }
    toml
}

/// The example binary Cargo built next to this test's executable
/// (`<target>/<profile>/deps/example-<hash>` →
/// `<target>/<profile>/examples/cache_aside`).
///
/// # Panics
/// If it is missing or older than its source: the test would run something
/// else than what it reads.
fn example_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not in <target>/<profile>/deps", exe.display()));
    let name = format!("cache_aside{}", std::env::consts::EXE_SUFFIX);
    let bin = profile_dir.join("examples").join(name);
    let how = "build it with `cargo build --examples` (add --release for a release test run); \
                 a plain `cargo test` builds it too, `cargo test --test example` and \
                 `cargo test --all-targets` do not";
    let built = fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "the example binary {} is missing ({e}): {how}",
                bin.display()
            )
        });
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/cache_aside.rs");
    let edited = fs::metadata(source).and_then(|m| m.modified());
    assert!(
        edited.is_ok_and(|edited| edited <= built),
        "the example binary {} is older than {source}: {how}",
        bin.display()
    );
    bin
}

/// `cache_aside ARGS --http ADDR`, logging at INFO without colour.
fn example_command(bin: &Path, args: &[&str], http: SocketAddr) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .args([
            "--http",
            &http.to_string(),
            "--origin-delay-ms",
            ORIGIN_DELAY_MS,
        ])
        .env("NO_COLOR", "1");
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    cmd
}

/// `count` distinct free 127.0.0.1 ports: all are held while picking, then
/// released for the processes to bind.
fn free_ports(count: usize) -> Vec<SocketAddr> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr"))
        .collect()
}

/// Whether member `m` sees every other member `up`.
fn member_sees_all_up(m: &Member, members: &[Member]) -> Result<(), String> {
    for other in members.iter().filter(|o| o.id != m.id) {
        let state = member_state(m, other.id)?;
        if state != "up" {
            return Err(format!(
                "member {} sees member {} as {state:?}",
                m.id, other.id
            ));
        }
    }
    Ok(())
}

/// The state member `m` reports for member `of` in `stats cluster`.
fn member_state(m: &Member, of: NodeId) -> Result<String, String> {
    let mut client =
        Client::connect_tcp(m.client).map_err(|e| format!("connect to member {}: {e}", m.id))?;
    let reply = client
        .call(b"stats cluster\r\n", PROBE_REPLY_TIMEOUT)
        .map_err(|e| format!("stats cluster of member {}: {e}", m.id))?;
    let states = member_states(&parse_stats(&String::from_utf8_lossy(&reply)));
    states
        .get(&of)
        .cloned()
        .ok_or_else(|| format!("member {} does not list member {of}", m.id))
}

/// The number after `"field":` in a flat JSON object.
fn json_u64(json: &str, field: &str) -> Option<u64> {
    let at = json.find(&format!("\"{field}\":"))? + field.len() + 3;
    let digits: String = json[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

// ---- Child processes ------------------------------------------------------

/// A child process whose stdout and stderr go to a log file. Killed on drop.
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    /// Set once the child has been reaped.
    status: Option<ExitStatus>,
}

impl Process {
    /// # Panics
    /// If the log file cannot be created or the program not started.
    fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Process {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("clone a file handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Process {
            name: name.to_string(),
            child,
            log,
            status: None,
        }
    }

    /// How the process ended, if it has.
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM, then waits up to `SHUTDOWN_GRACE` for the process to exit.
    /// Returns its status, or `None` if it had to be killed.
    fn terminate(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        // Killed after the grace if need be, and reaped either way.
        let status = stop_child(&mut self.child, SHUTDOWN_GRACE);
        self.status = status.or_else(|| self.child.wait().ok());
        status
    }

    /// The end of the process's log.
    fn log_tail(&self) -> String {
        let Ok(mut file) = File::open(&self.log) else {
            return String::new();
        };
        let len = file.metadata().map_or(0, |m| m.len());
        let skip = len.saturating_sub(LOG_TAIL_BYTES);
        let mut bytes = Vec::new();
        let _ = io::Seek::seek(&mut file, io::SeekFrom::Start(skip))
            .and_then(|_| file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes));
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---- A tiny HTTP/1.1 client -----------------------------------------------

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    /// Names lowercased.
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `x-cache` header: `hit` or `miss`.
    fn cache(&self) -> &str {
        self.header("x-cache").unwrap_or("(no x-cache header)")
    }
}

/// One request on a fresh connection (`Connection: close`), its response
/// read to the end within `HTTP_TIMEOUT`.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<HttpResponse> {
    let deadline = Instant::now() + HTTP_TIMEOUT;
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;

    let mut received = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete response",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if received.len() > HTTP_RESPONSE_BYTES_MAX {
            return Err(io::Error::other("response too large"));
        }
    }
    parse_response(&received)
}

/// Parses a whole `Connection: close` response (no chunked bodies: the
/// example always sends a length).
fn parse_response(bytes: &[u8]) -> io::Result<HttpResponse> {
    let bad = |why: &str| {
        let text = String::from_utf8_lossy(bytes);
        io::Error::new(io::ErrorKind::InvalidData, format!("{why}: {text:?}"))
    };
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|l| l.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let response = HttpResponse {
        status,
        headers,
        body: body.to_string(),
    };
    if let Some(length) = response.header("content-length") {
        if length.parse() != Ok(body.len()) {
            return Err(bad("body length differs from content-length"));
        }
    } else if response.header("transfer-encoding").is_some() {
        return Err(bad("transfer-encoding is not supported"));
    }
    Ok(response)
}
