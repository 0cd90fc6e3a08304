//! Seeded simulation (turmoil) of a network partition in a 3-node cluster.
//!
//! ```text
//!   c1 ──memcached text──▶ n1 ◀──peer──▶ n2
//!                            ▲          ▲
//!                            └── peer ──┴──▶ n3 ◀──memcached text── c3
//! ```
//!
//! Each node is the library's own cluster stack (`Cluster`, `Peer`,
//! `serve_connection`, `Shared`) on turmoil's simulated TCP, with a store
//! clock that reads simulated time. A small memcached front door per node
//! stands in for `server::connection` (which is tied to tokio's `TcpStream`).
//!
//! The scenario, with N = 3, R = W = 2:
//! 1. all connected: c1 sets `k0..k19 = v1` through n1, all `STORED`;
//! 2. n3 is cut off from n1 and n2 (c3 still reaches n3): every `set` c3 sends
//!    through n3 is a `SERVER_ERROR` (a minority cannot reach W = 2) within a
//!    bound; then c1 sets `v3` through n1, all `STORED`, and reads `v3` back;
//! 3. healed: once n3 sees its peers again, c3 reads every key through n3 and
//!    gets `v3`; `mg <key> v Pr3` gets an answer from all three replicas.
//!
//! Seeded: every run prints its seed; `WEBVAC_SIM_SEED=<n>` reruns one seed.
//! Network latency, message order and time are the seed's; the run is not yet
//! replayed exactly, because the transport draws reconnect jitter from the
//! real clock (see [`one_seed_replays_the_same_history`]). `RUST_LOG=debug`
//! shows the nodes' logs.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::{TcpListener, TcpStream};
use webvac::cluster::coordinator::{Cluster, Local};
use webvac::cluster::transport::{Connector, Identity, TransportConfig};
use webvac::config::{ClusterConfig, Config, MemberConfig};
use webvac::protocol::{Parsed, parse};
use webvac::server::Shared;
use webvac::server::cluster;
use webvac::store::Clock;

/// Seeds run when `WEBVAC_SIM_SEED` is not set.
const SEEDS: [u64; 5] = [1, 2, 3, 0x5eed, 0xdead_beef];
/// Nodes, by turmoil host name and member id.
const NODES: [(&str, u16); 3] = [("n1", 1), ("n2", 2), ("n3", 3)];
const CLIENT_PORT: u16 = 11211;
const PEER_PORT: u16 = 12211;
const KEYS: usize = 20;
/// The cluster's hop timeout (`request_timeout_ms`), also the peers' call timeout.
const HOP_TIMEOUT_MS: u64 = 200;
/// Link latency is drawn from [0, this] (turmoil's exponential curve).
const LATENCY_MAX_MS: u64 = 10;
/// A forwarded write waits at most two hops (coordinator to primary, primary
/// to replicas), plus the client's own round trip and a few 1 ms ticks.
const MINORITY_REPLY_BOUND: Duration =
    Duration::from_millis(2 * HOP_TIMEOUT_MS + 2 * LATENCY_MAX_MS + 10);
/// Any single client request: a reply later than this is a hang.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a node may take to see its peers up (startup, or after healing:
/// reconnect backoff is capped at 2 s, plus a connect timeout).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for a phase or a peer state (simulated time).
const POLL: Duration = Duration::from_millis(5);
/// Simulated time the whole scenario may take.
const SIMULATION_DURATION: Duration = Duration::from_secs(60);
/// Simulated wall-clock start (2025-06-15), after the HLC epoch (2024-01-01).
const EPOCH_UNIX_SECS: u64 = 1_750_000_000;

/// Fails the client with a message instead of panicking inside the sim.
macro_rules! ensure {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err(format!($($why)+).into());
        }
    };
}

/// The store clock: simulated wall time, so version stamps (HLC) follow the
/// simulation instead of the host's real clock.
struct SimClock;

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        let since =
            turmoil::since_epoch().expect("the store clock is read inside a simulated host");
        u64::try_from(since.as_millis()).expect("simulated time fits u64 ms")
    }
}

/// Peer connections over turmoil's simulated TCP.
#[derive(Clone, Copy, Debug)]
struct TurmoilConnector;

impl Connector for TurmoilConnector {
    type Stream = TcpStream;

    fn connect(
        &self,
        addr: &str,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'static>> {
        let addr = addr.to_owned();
        Box::pin(async move { TcpStream::connect(addr.as_str()).await })
    }
}

fn cluster_config(node_id: u16) -> ClusterConfig {
    ClusterConfig {
        node_id,
        members: NODES
            .iter()
            .map(|&(host, id)| MemberConfig {
                id,
                client: format!("{host}:{CLIENT_PORT}"),
                peer: format!("{host}:{PEER_PORT}"),
            })
            .collect(),
        replicas: 3,
        read_quorum: Some(2),
        write_quorum: Some(2),
        partitions: 64,
        request_timeout_ms: HOP_TIMEOUT_MS,
        sloppy_quorum: false,
        hint_window_secs: 3 * 3600,
        hints_per_target_max: 10_000,
        hints_memory_mb: 16,
        refill_on_start: false,
        anti_entropy: true,
        anti_entropy_interval_ms: 200,
        anti_entropy_partitions_per_round: 64,
        anti_entropy_keys_per_round: 10_000,
        anti_entropy_bytes_per_sec: 8 << 20,
        tombstone_grace_secs: 3 * 3600 + 600,
    }
}

/// One node, wired as `server::cluster::{start, serve_peers}` wire a real one.
async fn node(node_id: u16, seed: u64) -> turmoil::Result {
    let cfg = cluster_config(node_id);
    let config = Config {
        memory_limit_mb: 8,
        cluster: Some(cfg.clone()),
        ..Config::default()
    };
    config.validate()?;
    let peer_listener = TcpListener::bind(("0.0.0.0", PEER_PORT)).await?;
    let client_listener = TcpListener::bind(("0.0.0.0", CLIENT_PORT)).await?;
    let identity = cluster::identity(&cfg);
    // Reconnect jitter from the simulation's seed: one seed, one history.
    let cluster = Arc::new(cluster::connect_peers(
        &cfg,
        &identity,
        Arc::new(TurmoilConnector),
        |peer| TransportConfig {
            jitter_seed: Some(seed ^ u64::from(node_id) << 32 ^ u64::from(peer)),
            ..cluster::transport_config(&cfg)
        },
    ));
    let shared = Arc::new(Shared::new(
        &config,
        Arc::new(SimClock),
        CLIENT_PORT,
        Some(cluster),
    ));
    tokio::spawn(serve_peers(peer_listener, identity, shared.clone()));
    let local: Arc<dyn Local> = shared.clone();
    tokio::spawn(cluster_handle(&shared).anti_entropy(local));
    loop {
        let (stream, _) = client_listener.accept().await?;
        tokio::spawn(serve_client(stream, shared.clone()));
    }
}

fn cluster_handle(shared: &Shared) -> Arc<Cluster> {
    shared.cluster.clone().expect("a member has a cluster")
}

/// `server::cluster::serve_peers` on a turmoil listener.
async fn serve_peers(listener: TcpListener, identity: Identity, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(cluster::serve_peer_connection(
            stream,
            identity.clone(),
            shared.clone(),
        ));
    }
}

/// The memcached front door: parse each complete request, run it on this
/// node or through the cluster, as `server::connection` does.
async fn serve_client(mut stream: TcpStream, shared: Arc<Shared>) -> io::Result<()> {
    let cluster = shared.cluster.clone().expect("a member has a cluster");
    let mut inbuf = Vec::new();
    let mut out = Vec::new();
    loop {
        loop {
            let consumed = match parse(&inbuf, &shared.limits) {
                Parsed::Incomplete => break,
                Parsed::Complete { request, consumed } => {
                    let raw = &inbuf[..consumed];
                    if cluster.is_local(&request) {
                        shared.execute(raw, &mut out);
                    } else {
                        cluster.coordinate(&*shared, &request, raw, &mut out).await;
                    }
                    consumed
                }
            };
            inbuf.drain(..consumed);
        }
        stream.write_all(&out).await?;
        out.clear();
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        inbuf.extend_from_slice(&chunk[..n]);
    }
}

/// Every request the clients sent and the reply they got, with the
/// simulated time and node: two runs of one seed must produce the same.
type History = Rc<RefCell<Vec<String>>>;

/// A client's connection to one node, speaking raw memcached text. Every
/// request is bounded by [`CLIENT_REQUEST_TIMEOUT`].
struct Client {
    node: &'static str,
    stream: TcpStream,
    buf: Vec<u8>,
    history: History,
}

impl Client {
    async fn connect(node: &'static str, history: &History) -> turmoil::Result<Self> {
        let stream = TcpStream::connect((node, CLIENT_PORT)).await?;
        Ok(Self {
            node,
            stream,
            buf: Vec::new(),
            history: history.clone(),
        })
    }

    /// Sends `request` and reads reply lines until `done` says the reply is
    /// complete; an error line always completes it.
    async fn call(
        &mut self,
        request: &str,
        done: impl Fn(&[String]) -> bool,
    ) -> turmoil::Result<Vec<String>> {
        let node = self.node;
        let exchange = async {
            self.stream.write_all(request.as_bytes()).await?;
            let mut lines: Vec<String> = Vec::new();
            loop {
                while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=nl).collect();
                    let line = String::from_utf8_lossy(&line)
                        .trim_end_matches("\r\n")
                        .to_string();
                    let error = line.starts_with("SERVER_ERROR")
                        || line.starts_with("CLIENT_ERROR")
                        || line == "ERROR";
                    lines.push(line);
                    if error || done(&lines) {
                        return Ok::<_, io::Error>(lines);
                    }
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "node closed the connection",
                    ));
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        let outcome = tokio::time::timeout(CLIENT_REQUEST_TIMEOUT, exchange).await;
        self.history.borrow_mut().push(format!(
            "{:?} {node} {:?} -> {outcome:?}",
            turmoil::sim_elapsed().unwrap_or_default(),
            request.trim_end()
        ));
        match outcome {
            Ok(Ok(lines)) => Ok(lines),
            Ok(Err(e)) => Err(format!("{node}: {:?}: {e}", request.trim_end()).into()),
            Err(_) => Err(format!(
                "{node}: no reply to {:?} within {CLIENT_REQUEST_TIMEOUT:?} (hang)",
                request.trim_end()
            )
            .into()),
        }
    }

    /// `set <key> 0 0 <len>`: the one-line reply.
    async fn set(&mut self, key: &str, value: &str) -> turmoil::Result<String> {
        let request = format!("set {key} 0 0 {}\r\n{value}\r\n", value.len());
        let mut lines = self.call(&request, |_| true).await?;
        Ok(lines.remove(0))
    }

    /// `get <key>`: the value, or the error line.
    async fn get(&mut self, key: &str) -> turmoil::Result<Result<Option<String>, String>> {
        let lines = self
            .call(&format!("get {key}\r\n"), |l| {
                l.last().is_some_and(|s| s == "END")
            })
            .await?;
        Ok(match lines.as_slice() {
            [end] if end == "END" => Ok(None),
            [header, value, end] if header.starts_with("VALUE ") && end == "END" => {
                Ok(Some(value.clone()))
            }
            _ => Err(lines.join(" | ")),
        })
    }

    /// `mg <key> v <flags>`: the value, or the whole reply when it is not a hit.
    async fn mg(
        &mut self,
        key: &str,
        flags: &str,
    ) -> turmoil::Result<Result<Option<String>, String>> {
        let request = format!("mg {key} v {flags}\r\n");
        let lines = self
            .call(&request, |l| {
                l.len() == 2 || l.first().is_some_and(|s| !s.starts_with("VA "))
            })
            .await?;
        Ok(match lines.as_slice() {
            [miss] if miss == "EN" => Ok(None),
            [header, value] if header.starts_with("VA ") => Ok(Some(value.clone())),
            _ => Err(lines.join(" | ")),
        })
    }

    /// `stats cluster`: each other member's state (`up`, `connecting`, `down(...)`).
    async fn peer_states(&mut self) -> turmoil::Result<BTreeMap<u16, String>> {
        let lines = self
            .call("stats cluster\r\n", |l| {
                l.last().is_some_and(|s| s == "END")
            })
            .await?;
        let mut states = BTreeMap::new();
        for line in &lines {
            // STAT member:<id> <state> client=... peer=...
            let mut words = line.split(' ');
            let (Some("STAT"), Some(name), Some(state)) =
                (words.next(), words.next(), words.next())
            else {
                continue;
            };
            if let Some(id) = name.strip_prefix("member:") {
                if state != "self" {
                    states.insert(id.parse()?, state.to_string());
                }
            }
        }
        ensure!(
            states.len() == NODES.len() - 1,
            "{}: bad stats cluster reply {lines:?}",
            self.node
        );
        Ok(states)
    }

    /// Waits (bounded, simulated time) until `want` holds for this node's
    /// view of its peers.
    async fn await_peers(
        &mut self,
        what: &str,
        want: impl Fn(&BTreeMap<u16, String>) -> bool,
    ) -> turmoil::Result {
        let started = tokio::time::Instant::now();
        loop {
            let states = self.peer_states().await?;
            if want(&states) {
                return Ok(());
            }
            ensure!(
                started.elapsed() < CONVERGE_TIMEOUT,
                "{}: peers not {what} within {CONVERGE_TIMEOUT:?}: {states:?}",
                self.node
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

fn all_up(states: &BTreeMap<u16, String>) -> bool {
    states.values().all(|s| s == "up")
}

fn key(i: usize) -> String {
    format!("k{i}")
}

/// Where the scenario is; the clients hand it over to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Start,
    /// c1 stored v1 everywhere and cut n3 off.
    Partitioned,
    /// c3's minority writes all failed.
    MinorityWritten,
    /// c1 stored v3 through the majority and healed the partition.
    Healed,
}

async fn await_phase(phase: &Cell<Phase>, want: Phase) -> turmoil::Result {
    let started = tokio::time::Instant::now();
    while phase.get() < want {
        ensure!(
            started.elapsed() < SIMULATION_DURATION,
            "phase {want:?} never came (stuck at {:?})",
            phase.get()
        );
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// The majority side's client: talks to n1 (and to every node once, to see
/// the cluster connected before it starts).
async fn client_1(phase: Rc<Cell<Phase>>, history: History) -> turmoil::Result {
    let mut n1 = Client::connect("n1", &history).await?;
    for node in ["n1", "n2", "n3"] {
        let mut c = Client::connect(node, &history).await?;
        c.await_peers("up at start", all_up).await?;
    }

    // Phase 1: all connected, every write reaches W = 2.
    for i in 0..KEYS {
        let reply = n1.set(&key(i), "v1").await?;
        ensure!(
            reply == "STORED",
            "phase 1: set {} through n1: {reply}",
            key(i)
        );
    }

    // Phase 2: isolate n3 (its client link stays up).
    turmoil::partition("n3", "n1");
    turmoil::partition("n3", "n2");
    phase.set(Phase::Partitioned);
    await_phase(&phase, Phase::MinorityWritten).await?;

    // Until n1 notices n3 is gone (missed heartbeats), a write whose primary
    // is n3 is forwarded there and times out: the "may or may not have been
    // applied" answer is right then, but this phase is about the majority
    // after detection.
    n1.await_peers("showing n3 down", |s| s[&3].starts_with("down"))
        .await?;
    // The v2 stamps were taken at least this long ago: see `client_3`.
    tokio::time::sleep(Duration::from_millis(5)).await;
    for i in 0..KEYS {
        let reply = n1.set(&key(i), "v3").await?;
        ensure!(
            reply == "STORED",
            "phase 2: majority set {} through n1: {reply}",
            key(i)
        );
    }
    for i in 0..KEYS {
        let got = n1.get(&key(i)).await?;
        ensure!(
            got == Ok(Some("v3".into())),
            "phase 2: get {} through n1 (R=2): {got:?}",
            key(i)
        );
    }

    // Phase 3: heal.
    turmoil::repair("n3", "n1");
    turmoil::repair("n3", "n2");
    phase.set(Phase::Healed);
    Ok(())
}

/// The minority side's client: talks to n3 only.
async fn client_3(phase: Rc<Cell<Phase>>, history: History) -> turmoil::Result {
    let mut n3 = Client::connect("n3", &history).await?;
    await_phase(&phase, Phase::Partitioned).await?;

    let mut slowest = Duration::ZERO;
    let mut reasons = std::collections::BTreeSet::new();
    for i in 0..KEYS {
        let started = tokio::time::Instant::now();
        let reply = n3.set(&key(i), "v2").await?;
        let took = started.elapsed();
        slowest = slowest.max(took);
        reasons.insert(reply.clone());
        ensure!(
            reply.starts_with("SERVER_ERROR"),
            "phase 2: minority set {} through n3 must fail, got {reply:?}",
            key(i)
        );
        ensure!(
            took <= MINORITY_REPLY_BOUND,
            "phase 2: minority set {} took {took:?} > {MINORITY_REPLY_BOUND:?}: {reply}",
            key(i)
        );
    }
    eprintln!("  minority writes: {KEYS} SERVER_ERROR, slowest {slowest:?}: {reasons:#?}");
    phase.set(Phase::MinorityWritten);

    await_phase(&phase, Phase::Healed).await?;
    let mut local = BTreeMap::new();
    for i in 0..KEYS {
        let got = n3.mg(&key(i), "Pr1").await?;
        *local.entry(format!("{got:?}")).or_insert(0) += 1;
    }
    eprintln!("  n3 holds locally: {local:?}");
    let healing = tokio::time::Instant::now();
    n3.await_peers("up after healing", all_up).await?;
    eprintln!(
        "  n3 saw its peers again {:?} after the repair",
        healing.elapsed()
    );

    // Why v3 must win although n3 may still hold a v2: a failed minority
    // write was executed on n3 when n3 was its primary (stamped by n3's HLC,
    // kept locally, never acknowledged). Every v2 stamp was taken before c3
    // announced `MinorityWritten`; c1 then waited for n1 to see n3 down, and
    // 5 ms more, before its first v3 write. The HLC's physical part is the
    // simulated wall clock (`SimClock`), shared by all hosts to within one
    // 1 ms tick, so every v3 stamp has a larger millisecond than every v2
    // stamp and, the HLC being ordered by milliseconds first, is larger
    // whatever the logical counters and node ids. R = 2 with newest version
    // wins then returns v3 from n1 or n2 whatever n3 holds. (With the real
    // wall clock the sim could run both phases in the same real millisecond
    // and the outcome would depend on the logical counters.)
    for i in 0..KEYS {
        let got = n3.get(&key(i)).await?;
        ensure!(
            got == Ok(Some("v3".into())),
            "phase 3: get {} through n3 (R=2) must see the acknowledged v3: {got:?}",
            key(i)
        );
    }
    for i in 0..KEYS {
        let got = n3.mg(&key(i), "Pr3").await?;
        ensure!(
            got == Ok(Some("v3".into())),
            "phase 3: mg {} v Pr3 through n3: all three replicas must answer: {got:?}",
            key(i)
        );
    }
    Ok(())
}

/// One seeded run of the scenario: its client history, or why it failed.
fn run(seed: u64) -> Result<Vec<String>, String> {
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_UNIX_SECS))
        .simulation_duration(SIMULATION_DURATION)
        .max_message_latency(Duration::from_millis(LATENCY_MAX_MS))
        .build();
    for (host, id) in NODES {
        sim.host(host, move || node(id, seed));
    }
    let phase = Rc::new(Cell::new(Phase::Start));
    let history = History::default();
    sim.client("c1", client_1(phase.clone(), history.clone()));
    sim.client("c3", client_3(phase.clone(), history.clone()));
    let result = sim.run();
    eprintln!(
        "  ended at simulated {:?} in phase {:?}",
        sim.elapsed(),
        phase.get()
    );
    drop(sim);
    let history = history.take();
    match result {
        Ok(()) => Ok(history),
        Err(e) => Err(format!(
            "{e}\nlast replies:\n{}",
            history[history.len().saturating_sub(10)..].join("\n")
        )),
    }
}

/// The seeds to run: `WEBVAC_SIM_SEED` alone if set, else [`SEEDS`].
fn seeds() -> Vec<u64> {
    match std::env::var("WEBVAC_SIM_SEED") {
        Ok(s) => vec![s.trim().parse().expect("WEBVAC_SIM_SEED is a u64")],
        Err(_) => SEEDS.to_vec(),
    }
}

fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

#[test]
fn minority_partition_refuses_writes_and_heals_to_the_acknowledged_value() {
    init_logs();
    for seed in seeds() {
        eprintln!("simulation seed {seed} (rerun alone with WEBVAC_SIM_SEED={seed})");
        let started = SystemTime::now();
        match run(seed) {
            Ok(history) => eprintln!(
                "  passed in {:?} real time; history {:016x} ({} replies)",
                started.elapsed().unwrap_or_default(),
                xxhash_rust::xxh3::xxh3_64(history.join("\n").as_bytes()),
                history.len()
            ),
            Err(e) => {
                panic!("simulation seed {seed} failed: {e}\nrerun with WEBVAC_SIM_SEED={seed}")
            }
        }
    }
}

/// Turmoil's promise: one seed, one history. Holds because the transport's
/// reconnect jitter takes the seed and its `select!`s are biased (tokio's
/// own select randomness is outside the simulation's seed).
#[test]
fn one_seed_replays_the_same_history() {
    init_logs();
    for seed in seeds() {
        let first = run(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let second = run(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        if let Some(i) = (0..first.len().max(second.len())).find(|&i| first.get(i) != second.get(i))
        {
            panic!(
                "seed {seed}: runs diverge at reply {i}:\n  first:  {:?}\n  second: {:?}",
                first.get(i),
                second.get(i)
            );
        }
    }
}
