//! A cluster of real `webvac` processes on loopback, for black-box cluster tests.
//!
//! ```text
//!   test ──Client (raw bytes)──▶ node 1 client port ◀──peer──▶ node 2 peer port
//!        ──Client (raw bytes)──▶ node 2 client port ◀──peer──▶ node 3 peer port ...
//! ```
//!
//! Every node gets two free 127.0.0.1 ports (client and peer), found by binding
//! `:0` and releasing them. Another process may grab one in between, so a
//! start whose node fails to bind is retried from scratch with fresh ports.
//! Nodes can be killed with SIGKILL and restarted with exactly the flags they
//! had; the `Cluster` kills whatever still runs when it is dropped.
//!
//! Faults: besides kill, pause and resume, a layout with
//! [`Layout::fault_control`] lets a test skew a node's clock or cut it off
//! from peers while it runs ([`Cluster::set_clock_offset`],
//! [`Cluster::partition`], ...). Those runtime settings live in the process
//! and die with it: a restarted node comes back with only its flags, the
//! layout's and its own ([`Layout::node_arg`], [`Cluster::set_node_args`]).
//!
//! Every wait is bounded and polls (readiness, member states, partition
//! digests); every reply has a deadline. A node that hangs fails the test
//! instead of hanging CI.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use webvac::protocol::fault::{self, FaultCmd};

use super::{
    Client, STARTUP_TIMEOUT, StderrTail, WEBVAC_BIN, escape, parse_listening_line,
    spawn_stderr_drain,
};

/// A member id, as on the command line (`--node-id`, `--member ID=...`).
pub type NodeId = u16;

/// How long a cluster may take until every running node sees every other up.
/// Peers reconnect with a backoff capped at 2 s, so this leaves room for a
/// couple of missed attempts after a restart.
pub const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of the readiness and member-state polls.
pub const CLUSTER_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Starts tried with fresh ports when a node cannot bind its ports.
pub const START_ATTEMPTS: usize = 5;
/// Deadline of one reply during readiness polls.
pub const PROBE_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Interval of the `stats partitions` polls: each walks a node's whole
/// store, so not as often as the member-state polls.
pub const PARTITIONS_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Deadline of a `fault` command's `OK`.
pub const FAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Serialises the cluster tests of one test binary.
///
/// Each test runs several server processes and some assert latency bounds
/// (fail-fast within a request timeout); running them side by side on a small
/// CI machine would turn scheduler noise into flaky failures.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the next test may still run.
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The settings every member of a cluster shares, as flags.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Members, with ids `1..=nodes`.
    pub nodes: usize,
    /// `--replicas` (N), if not the default.
    pub replicas: Option<usize>,
    /// `--read-quorum` (R), if not the default.
    pub read_quorum: Option<usize>,
    /// `--write-quorum` (W), if not the default.
    pub write_quorum: Option<usize>,
    /// `--request-timeout-ms`, if not the default.
    pub request_timeout_ms: Option<u64>,
    /// `-m`, item memory per node in MiB.
    pub memory_limit_mb: usize,
    /// `--sloppy-quorum`.
    pub sloppy_quorum: bool,
    /// `--no-refill`.
    pub no_refill: bool,
    /// More flags, passed as they are after all the others (anti-entropy,
    /// hinted handoff, tombstone grace, ...). The typed builders below add
    /// the common ones; [`Layout::arg`] adds any.
    pub extra_args: Vec<String>,
    /// Flags of one node only, after the shared ones (a clock offset from
    /// its start, say); kept across restarts.
    pub node_args: BTreeMap<NodeId, Vec<String>>,
}

impl Layout {
    /// `nodes` members with the server's default N, R, W and timeout.
    pub fn new(nodes: usize) -> Layout {
        assert!(nodes >= 1, "a cluster has at least one member");
        Layout {
            nodes,
            replicas: None,
            read_quorum: None,
            write_quorum: None,
            request_timeout_ms: None,
            memory_limit_mb: 64,
            sloppy_quorum: false,
            no_refill: false,
            extra_args: Vec::new(),
            node_args: BTreeMap::new(),
        }
    }

    pub fn replicas(mut self, n: usize) -> Layout {
        self.replicas = Some(n);
        self
    }

    pub fn quorums(mut self, read: usize, write: usize) -> Layout {
        self.read_quorum = Some(read);
        self.write_quorum = Some(write);
        self
    }

    pub fn no_refill(mut self) -> Layout {
        self.no_refill = true;
        self
    }

    pub fn sloppy_quorum(mut self) -> Layout {
        self.sloppy_quorum = true;
        self
    }

    pub fn request_timeout_ms(mut self, ms: u64) -> Layout {
        self.request_timeout_ms = Some(ms);
        self
    }

    /// `-m`: item memory per node in MiB.
    pub fn memory_limit_mb(mut self, mb: usize) -> Layout {
        self.memory_limit_mb = mb;
        self
    }

    /// Appends one flag or value, as is, to every node's command line.
    pub fn arg(mut self, arg: impl Into<String>) -> Layout {
        self.extra_args.push(arg.into());
        self
    }

    /// Appends one flag or value to node `id`'s command line only.
    pub fn node_arg(mut self, id: NodeId, arg: impl Into<String>) -> Layout {
        self.node_args.entry(id).or_default().push(arg.into());
        self
    }

    /// `--fault-control`: every node accepts the `fault` command, so the
    /// test can skew clocks and cut nodes off while they run.
    pub fn fault_control(self) -> Layout {
        self.arg("--fault-control")
    }

    /// `--no-anti-entropy`: replicas never compare hash trees, so a test
    /// of another repair mechanism sees only that mechanism's work.
    pub fn no_anti_entropy(self) -> Layout {
        self.arg("--no-anti-entropy")
    }

    /// `--anti-entropy-interval-ms`: time between anti-entropy rounds.
    pub fn anti_entropy_interval_ms(self, ms: u64) -> Layout {
        self.arg("--anti-entropy-interval-ms").arg(ms.to_string())
    }

    /// `--anti-entropy-partitions-per-round`: 1024 (every partition) makes
    /// one round a whole cycle.
    pub fn anti_entropy_partitions_per_round(self, partitions: usize) -> Layout {
        self.arg("--anti-entropy-partitions-per-round")
            .arg(partitions.to_string())
    }

    /// `--hints-per-target-max 0`: no hinted handoff.
    pub fn no_hints(self) -> Layout {
        self.arg("--hints-per-target-max").arg("0")
    }

    /// `--hint-window-secs`: how long a hint waits for its replica.
    pub fn hint_window_secs(self, secs: u64) -> Layout {
        self.arg("--hint-window-secs").arg(secs.to_string())
    }

    /// `--tombstone-grace-secs`: how long a delete's tombstone lives. The
    /// node refuses to start unless it exceeds the hint window plus one
    /// anti-entropy cycle.
    /// A short tombstone grace, and a dedup window no longer than it (a
    /// node refuses a window longer than the grace: a delete's request id
    /// lives in its tombstone).
    pub fn tombstone_grace_secs(self, secs: u64) -> Layout {
        self.arg("--tombstone-grace-secs")
            .arg(secs.to_string())
            .arg("--dedup-window-secs")
            .arg(secs.to_string())
    }
}

/// One member's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    /// Where it speaks the memcached protocol.
    pub client: SocketAddr,
    /// Where other members call it.
    pub peer: SocketAddr,
}

/// A running node process.
struct Process {
    child: Child,
    stderr: StderrTail,
    /// Set once the node logged its `listening addr=` line.
    listening: Arc<AtomicBool>,
}

impl Process {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why a node did not come up.
enum StartFailure {
    /// A port was taken: worth another attempt with fresh ports.
    PortTaken(String),
    Other(String),
}

/// Real `webvac` processes forming one cluster on 127.0.0.1.
pub struct Cluster {
    layout: Layout,
    members: Vec<Member>,
    /// The nodes that run now.
    running: BTreeMap<NodeId, Process>,
    /// Each node's most recent stderr, kept after it is killed.
    stderr: BTreeMap<NodeId, StderrTail>,
    /// Members that start with `--join`, each with the member whose peer
    /// address it names; the others start from the founding member list.
    joined: BTreeMap<NodeId, NodeId>,
    /// The founding members: a node that is not `joined` starts with their
    /// list (a founder that left and joined again keeps its place in it,
    /// as in an operator's unchanged flags).
    founders: Vec<NodeId>,
    /// Nodes that exited by themselves (left the cluster) and have not
    /// started since: no longer members, so not cut off by name.
    left: std::collections::BTreeSet<NodeId>,
}

impl Cluster {
    /// Starts every member and waits until each sees every other `up`.
    ///
    /// # Panics
    /// If the cluster does not come up (the message carries every node's stderr).
    pub fn start(layout: Layout) -> Cluster {
        let ids: Vec<NodeId> = (1..=layout.nodes).map(node_id).collect();
        Self::start_members(layout, &ids)
    }

    /// Starts only `ids` of the layout's members (the others stay down) and
    /// waits until each started node answers and sees the other started ones `up`.
    ///
    /// # Panics
    /// As [`Cluster::start`].
    pub fn start_members(layout: Layout, ids: &[NodeId]) -> Cluster {
        let mut last_failure = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let members = pick_members(layout.nodes);
            let mut cluster = Cluster {
                founders: members.iter().map(|m| m.id).collect(),
                members,
                layout: layout.clone(),
                running: BTreeMap::new(),
                stderr: BTreeMap::new(),
                joined: BTreeMap::new(),
                left: std::collections::BTreeSet::new(),
            };
            match cluster.spawn_and_wait_listening(ids) {
                Ok(()) => {
                    cluster.wait_ready();
                    return cluster;
                }
                Err(StartFailure::PortTaken(why)) => {
                    // Dropping the cluster kills the nodes that did start.
                    eprintln!("cluster start attempt {attempt} lost a port race: {why}");
                    last_failure = why;
                }
                Err(StartFailure::Other(why)) => panic!("cluster did not start: {why}"),
            }
        }
        panic!("cluster did not start in {START_ATTEMPTS} attempts; last failure: {last_failure}");
    }

    /// Every member of the layout, running or not.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Every member as the library's configuration names it: what a
    /// process needs to join this cluster, or to speak as one of its members.
    pub fn member_configs(&self) -> Vec<webvac::config::MemberConfig> {
        self.members
            .iter()
            .map(|m| webvac::config::MemberConfig {
                id: m.id,
                client: m.client.to_string(),
                peer: m.peer.to_string(),
            })
            .collect()
    }

    pub fn member(&self, id: NodeId) -> Member {
        *self
            .members
            .iter()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("no member {id}"))
    }

    /// Every member id.
    pub fn ids(&self) -> Vec<NodeId> {
        self.members.iter().map(|m| m.id).collect()
    }

    /// The ids of the nodes that run now.
    pub fn running_ids(&self) -> Vec<NodeId> {
        self.running.keys().copied().collect()
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The exact flags node `id` runs with.
    pub fn args(&self, id: NodeId) -> Vec<String> {
        let l = &self.layout;
        let mut args = vec![
            "--node-id".to_string(),
            id.to_string(),
            "-m".to_string(),
            l.memory_limit_mb.to_string(),
        ];
        match self.joined.get(&id) {
            Some(&seed) => {
                let m = self.member(id);
                args.push("--member".to_string());
                args.push(format!("{}={},{}", m.id, m.client, m.peer));
                args.push("--join".to_string());
                args.push(self.member(seed).peer.to_string());
            }
            None => {
                for m in self
                    .members
                    .iter()
                    .filter(|m| self.founders.contains(&m.id))
                {
                    args.push("--member".to_string());
                    args.push(format!("{}={},{}", m.id, m.client, m.peer));
                }
            }
        }
        let optional = [
            ("--replicas", l.replicas.map(|v| v.to_string())),
            ("--read-quorum", l.read_quorum.map(|v| v.to_string())),
            ("--write-quorum", l.write_quorum.map(|v| v.to_string())),
            (
                "--request-timeout-ms",
                l.request_timeout_ms.map(|v| v.to_string()),
            ),
        ];
        for (flag, value) in optional {
            if let Some(v) = value {
                args.push(flag.to_string());
                args.push(v);
            }
        }
        if l.sloppy_quorum {
            args.push("--sloppy-quorum".to_string());
        }
        if l.no_refill {
            args.push("--no-refill".to_string());
        }
        args.extend(l.extra_args.iter().cloned());
        args.extend(l.node_args.get(&id).into_iter().flatten().cloned());
        args
    }

    /// Replaces node `id`'s own flags ([`Layout::node_arg`]); they take
    /// effect when it next starts ([`Cluster::restart`]).
    pub fn set_node_args(&mut self, id: NodeId, args: Vec<String>) {
        self.layout.node_args.insert(id, args);
    }

    /// Sends `fault …` to node `id` and waits for its `OK`.
    ///
    /// # Errors
    /// Any other answer, or none within [`FAULT_REPLY_TIMEOUT`] (a paused
    /// node answers nothing), as text.
    pub fn try_fault(&self, id: NodeId, cmd: &FaultCmd) -> Result<(), String> {
        let mut line = Vec::new();
        fault::compose(&mut line, cmd);
        let mut client = Client::connect_tcp(self.member(id).client)
            .map_err(|e| format!("connect to node {id}: {e}"))?;
        match client.call(&line, FAULT_REPLY_TIMEOUT) {
            Ok(reply) if reply == b"OK\r\n" => Ok(()),
            Ok(reply) => Err(format!(
                "node {id} answered \"{}\" to \"{}\"",
                escape(&reply),
                escape(&line)
            )),
            Err(e) => Err(format!("node {id}, \"{}\": {e}", escape(&line))),
        }
    }

    /// [`Cluster::try_fault`] that panics on failure.
    ///
    /// # Panics
    /// Unless the node answers `OK` (it needs [`Layout::fault_control`]).
    pub fn fault(&self, id: NodeId, cmd: &FaultCmd) {
        if let Err(e) = self.try_fault(id, cmd) {
            panic!("{e}\n{}", self.describe_nodes());
        }
    }

    /// Steps node `id`'s clock to read `ms` ahead of real time (negative:
    /// behind), until it is changed again or the node restarts.
    pub fn set_clock_offset(&self, id: NodeId, ms: i64) {
        self.fault(id, &FaultCmd::ClockOffsetMs(ms));
    }

    /// Makes node `id`'s clock run at `rate` from now on, until it is
    /// changed again or the node restarts.
    pub fn set_clock_rate(&self, id: NodeId, rate: f64) {
        self.fault(id, &FaultCmd::ClockRate(rate));
    }

    /// Cuts node `id` off from `peers` (replacing whom it was cut off from
    /// before): every peer message between them is dropped, both ways. One
    /// side's setting is enough for both directions. Lasts until
    /// [`Cluster::heal`] or the node restarts.
    pub fn partition(&self, id: NodeId, peers: &[NodeId]) {
        self.fault(id, &FaultCmd::DropPeers(peers.to_vec()));
    }

    /// Waits until every running member votes on the next layout decree
    /// (`layout_vote votes`: its recovery after a start is over, and the
    /// empty decree a member that recovered late asks for is made) and all
    /// are at one epoch; returns that epoch. A change made before then can
    /// race that empty decree for its epoch.
    ///
    /// # Panics
    /// If they do not within [`super::hostile::WAIT_MAX`].
    pub fn all_voting(&self) -> u64 {
        let mut epoch = 0;
        super::hostile::wait_for("every member to vote on the next layout decree", || {
            let running = self.running_ids();
            let all: Vec<BTreeMap<String, String>> = running
                .iter()
                .map(|&id| cluster_stats(&mut self.connect(id)))
                .collect();
            let epochs: std::collections::BTreeSet<&str> = all
                .iter()
                .map(|s| s.get("epoch").map_or("", String::as_str))
                .collect();
            epoch = epochs.first().and_then(|e| e.parse().ok()).unwrap_or(0);
            epochs.len() == 1
                && all
                    .iter()
                    .all(|s| s.get("layout_vote").map(String::as_str) == Some("votes"))
        });
        epoch
    }

    /// Every node but those that exited by themselves ([`Cluster::wait_exit`],
    /// a node that left) and have not started since: the members, as far
    /// as this harness knows.
    pub fn member_ids(&self) -> Vec<NodeId> {
        self.ids()
            .into_iter()
            .filter(|o| !self.left.contains(o))
            .collect()
    }

    /// Cuts node `id` off from every other member ([`Cluster::member_ids`]).
    pub fn isolate(&self, id: NodeId) {
        let others: Vec<NodeId> = self.member_ids().into_iter().filter(|&o| o != id).collect();
        self.partition(id, &others);
    }

    /// Clears node `id`'s partition.
    pub fn heal(&self, id: NodeId) {
        self.partition(id, &[]);
    }

    /// A `webvac ARGS` command set up as the harness runs nodes (plain-text
    /// INFO logs), for tests that run a node by hand.
    pub fn command(args: &[String]) -> Command {
        let mut cmd = Command::new(WEBVAC_BIN);
        cmd.args(args).env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd
    }

    /// Opens a raw client connection to node `id`.
    ///
    /// # Panics
    /// If the node does not accept it.
    pub fn connect(&self, id: NodeId) -> Client {
        let addr = self.member(id).client;
        Client::connect_tcp(addr).unwrap_or_else(|e| {
            panic!(
                "connect to node {id} at {addr}: {e}\n{}",
                self.describe_nodes()
            )
        })
    }

    /// Kills node `id` with SIGKILL and reaps it.
    ///
    /// # Panics
    /// If the node is not running.
    pub fn kill(&mut self, id: NodeId) {
        let mut process = self
            .running
            .remove(&id)
            .unwrap_or_else(|| panic!("node {id} is not running"));
        process.kill();
    }

    /// Freezes node `id` with SIGSTOP: it keeps its memory and its sockets
    /// but answers nothing, as a node behind a partition would.
    ///
    /// # Panics
    /// If the node is not running or the signal cannot be sent.
    pub fn pause(&mut self, id: NodeId) {
        self.signal(id, "STOP");
    }

    /// Lets a paused node run again (SIGCONT).
    ///
    /// # Panics
    /// As [`Cluster::pause`].
    pub fn resume(&mut self, id: NodeId) {
        self.signal(id, "CONT");
    }

    fn signal(&mut self, id: NodeId, signal: &str) {
        let pid = self
            .running
            .get(&id)
            .unwrap_or_else(|| panic!("node {id} is not running"))
            .child
            .id();
        // std has no portable signal sending and libc is not a dependency.
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("run kill -{signal} {pid}: {e}"));
        assert!(
            status.success(),
            "kill -{signal} {pid} (node {id}): {status}"
        );
    }

    /// Starts node `id` again with the same flags (it comes back empty) and
    /// waits until every running node sees every other `up`.
    ///
    /// # Panics
    /// If it is already running or does not come up in time.
    pub fn restart(&mut self, id: NodeId) {
        self.restart_listening(id);
        self.wait_ready();
    }

    /// Starts node `id` again with its flags and waits only until it
    /// listens, not until its peers see it up (a node started cut off from
    /// them never is).
    ///
    /// # Panics
    /// If it is already running or does not listen in time.
    pub fn restart_listening(&mut self, id: NodeId) {
        assert!(
            !self.running.contains_key(&id),
            "node {id} is already running"
        );
        match self.spawn_and_wait_listening(&[id]) {
            Ok(()) => {}
            Err(StartFailure::PortTaken(why) | StartFailure::Other(why)) => {
                panic!("node {id} did not restart: {why}")
            }
        }
    }

    /// Starts node `id` on fresh ports with `--join` naming member `seed`'s
    /// peer address, and waits until it listens (it has joined then: a
    /// node joins before it listens). It starts with the layout's flags
    /// and its own ([`Layout::node_arg`]).
    ///
    /// # Errors
    /// Its stderr, if it exited instead (a refused join); it is not a
    /// member of this harness then.
    pub fn try_join(&mut self, id: NodeId, seed: NodeId) -> Result<(), String> {
        assert!(
            self.members.iter().all(|m| m.id != id),
            "node {id} is in the harness already"
        );
        let mut last = String::new();
        for _attempt in 1..=START_ATTEMPTS {
            let mut picked = pick_members(1)[0];
            picked.id = id;
            self.members.push(picked);
            self.joined.insert(id, seed);
            match self.spawn_and_wait_listening(&[id]) {
                Ok(()) => return Ok(()),
                Err(failure) => {
                    self.running.remove(&id);
                    self.members.retain(|m| m.id != id);
                    self.joined.remove(&id);
                    match failure {
                        StartFailure::PortTaken(why) => last = why,
                        StartFailure::Other(why) => return Err(why),
                    }
                }
            }
        }
        Err(last)
    }

    /// Starts node `id` with `--join` naming member `seed`: on the
    /// addresses it had if it was in this harness before (a member that
    /// left joins again as itself), else on fresh ones
    /// ([`Cluster::try_join`]); waits until it listens.
    ///
    /// # Errors
    /// As [`Cluster::try_join`].
    pub fn join_again(&mut self, id: NodeId, seed: NodeId) -> Result<(), String> {
        if self.members.iter().all(|m| m.id != id) {
            return self.try_join(id, seed);
        }
        self.joined.insert(id, seed);
        match self.spawn_and_wait_listening(&[id]) {
            Ok(()) => Ok(()),
            Err(StartFailure::PortTaken(why) | StartFailure::Other(why)) => {
                self.running.remove(&id);
                Err(why)
            }
        }
    }

    /// [`Cluster::try_join`], then waits until every running node sees
    /// every other `up`.
    ///
    /// # Panics
    /// If the join is refused or the cluster does not settle in time.
    pub fn join(&mut self, id: NodeId, seed: NodeId) {
        if let Err(why) = self.try_join(id, seed) {
            panic!("node {id} did not join through node {seed}: {why}");
        }
        self.wait_ready();
    }

    /// Waits (bounded) until node `id` exits by itself, and returns how.
    ///
    /// # Panics
    /// If it is not running, or still runs after `within`.
    pub fn wait_exit(&mut self, id: NodeId, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let p = self
                .running
                .get_mut(&id)
                .unwrap_or_else(|| panic!("node {id} is not running"));
            if let Ok(Some(status)) = p.child.try_wait() {
                self.running.remove(&id);
                self.left.insert(id);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} still runs after {within:?}\n{}",
                self.describe_nodes()
            );
            thread::sleep(CLUSTER_POLL_INTERVAL);
        }
    }

    /// Whether node `id` exited by itself (a crash).
    pub fn exited(&mut self, id: NodeId) -> Option<ExitStatus> {
        self.running
            .get_mut(&id)
            .and_then(|p| p.child.try_wait().ok().flatten())
    }

    /// Waits until every running node answers `version` and its `stats
    /// cluster` shows every other running node `up`.
    ///
    /// # Panics
    /// After `CLUSTER_READY_TIMEOUT`, with the last states seen and every stderr.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        let running = self.running_ids();
        let mut clients: BTreeMap<NodeId, Client> = BTreeMap::new();
        let mut last_seen = String::new();
        loop {
            self.assert_none_exited();
            let mut ready = true;
            for &id in &running {
                match self.probe(id, &running, &mut clients) {
                    Ok(()) => {}
                    Err(why) => {
                        last_seen = format!("node {id}: {why}");
                        ready = false;
                        break;
                    }
                }
            }
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ready within {CLUSTER_READY_TIMEOUT:?}: {last_seen}\n{}",
                self.describe_nodes()
            );
            thread::sleep(CLUSTER_POLL_INTERVAL);
        }
    }

    /// Waits until node `observer`'s `stats cluster` shows member `member` in
    /// a state for which `want` holds (e.g. `|s| s.starts_with("down")`), and
    /// returns that state.
    ///
    /// # Panics
    /// After `CLUSTER_READY_TIMEOUT`.
    pub fn wait_member_state(
        &self,
        observer: NodeId,
        member: NodeId,
        want: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        let mut client = self.connect(observer);
        let mut last = String::new();
        loop {
            let states = member_states(&cluster_stats(&mut client));
            if let Some(state) = states.get(&member) {
                if want(state) {
                    return state.clone();
                }
                last.clone_from(state);
            }
            assert!(
                Instant::now() < deadline,
                "node {observer} still sees member {member} as {last:?} after {CLUSTER_READY_TIMEOUT:?}\n{}",
                self.describe_nodes()
            );
            thread::sleep(CLUSTER_POLL_INTERVAL);
        }
    }

    /// Each running node's `stats partitions`.
    pub fn partition_lines(&self) -> BTreeMap<NodeId, BTreeMap<u32, String>> {
        self.running_ids()
            .into_iter()
            .map(|id| (id, partition_lines(&mut self.connect(id))))
            .collect()
    }

    /// Polls until every partition's `stats partitions` line is the same on
    /// every running node that holds it (the replicas hold the same keys at
    /// the same versions, tombstones included); returns how long that took
    /// and the lines they agree on.
    ///
    /// # Panics
    /// After `within`, naming a few partitions that still differ; or if a
    /// node exits.
    pub fn wait_partitions_agree(
        &mut self,
        within: Duration,
    ) -> (Duration, BTreeMap<NodeId, BTreeMap<u32, String>>) {
        let started = Instant::now();
        let deadline = started + within;
        loop {
            self.assert_none_exited();
            let lines = self.partition_lines();
            let differing = disagreeing_partitions(&lines);
            if differing.is_empty() {
                return (started.elapsed(), lines);
            }
            assert!(
                Instant::now() < deadline,
                "{} partitions still differ between replicas after {within:?}, e.g. {:#?}\n{}",
                differing.len(),
                differing.iter().take(3).collect::<Vec<_>>(),
                self.describe_nodes()
            );
            thread::sleep(PARTITIONS_POLL_INTERVAL);
        }
    }

    /// Node `id`'s last stderr lines (also after it was killed).
    pub fn stderr_text(&self, id: NodeId) -> String {
        self.stderr
            .get(&id)
            .map(StderrTail::text)
            .unwrap_or_default()
    }

    /// Every node's state and last stderr lines, for failure messages.
    pub fn describe_nodes(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let state = if self.running.contains_key(&m.id) {
                "running"
            } else {
                "not running"
            };
            out.push_str(&format!(
                "--- node {} ({state}) client={} peer={} stderr ---\n{}\n",
                m.id,
                m.client,
                m.peer,
                self.stderr_text(m.id)
            ));
        }
        out
    }

    /// One readiness check of node `id`, reusing (or reopening) its client.
    fn probe(
        &self,
        id: NodeId,
        running: &[NodeId],
        clients: &mut BTreeMap<NodeId, Client>,
    ) -> Result<(), String> {
        let client = match clients.entry(id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(
                Client::connect_tcp(self.member(id).client).map_err(|e| format!("connect: {e}"))?,
            ),
        };
        let result = (|| {
            let version = client
                .call(b"version\r\n", PROBE_REPLY_TIMEOUT)
                .map_err(|e| format!("version: {e}"))?;
            if !version.starts_with(b"VERSION ") {
                return Err(format!("version: {}", String::from_utf8_lossy(&version)));
            }
            let stats = client
                .call(b"stats cluster\r\n", PROBE_REPLY_TIMEOUT)
                .map_err(|e| format!("stats cluster: {e}"))?;
            let states = member_states(&parse_stats(&String::from_utf8_lossy(&stats)));
            for &other in running.iter().filter(|&&o| o != id) {
                match states.get(&other) {
                    Some(s) if s == "up" => {}
                    s => return Err(format!("sees member {other} as {s:?}")),
                }
            }
            Ok(())
        })();
        if result.is_err() {
            // A broken connection is reopened on the next poll.
            clients.remove(&id);
        }
        result
    }

    fn assert_none_exited(&mut self) {
        let exited: Vec<(NodeId, ExitStatus)> = self
            .running
            .iter_mut()
            .filter_map(|(&id, p)| p.child.try_wait().ok().flatten().map(|s| (id, s)))
            .collect();
        assert!(
            exited.is_empty(),
            "nodes exited by themselves: {exited:?}\n{}",
            self.describe_nodes()
        );
    }

    /// Spawns `ids` and waits (bounded) until each logged `listening`.
    fn spawn_and_wait_listening(&mut self, ids: &[NodeId]) -> Result<(), StartFailure> {
        for &id in ids {
            self.left.remove(&id);
            let args = self.args(id);
            let mut cmd = Self::command(&args);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn {WEBVAC_BIN} {args:?}: {e}"));
            let listening = Arc::new(AtomicBool::new(false));
            let flag = listening.clone();
            let stderr = spawn_stderr_drain(
                child.stderr.take().expect("stderr is piped"),
                &format!("node{id}"),
                move |line| {
                    if parse_listening_line(line).is_some() {
                        flag.store(true, Ordering::Release);
                    }
                },
            );
            self.stderr.insert(id, stderr.clone());
            self.running.insert(
                id,
                Process {
                    child,
                    stderr,
                    listening,
                },
            );
        }
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let mut all_listening = true;
            for &id in ids {
                let p = self.running.get_mut(&id).expect("spawned above");
                if let Ok(Some(status)) = p.child.try_wait() {
                    let text = p.stderr.text();
                    let why = format!("node {id} exited with {status}; stderr:\n{text}");
                    let lower = text.to_ascii_lowercase();
                    return Err(
                        if lower.contains("address already in use") || lower.contains("addrinuse") {
                            StartFailure::PortTaken(why)
                        } else {
                            StartFailure::Other(why)
                        },
                    );
                }
                all_listening &= p.listening.load(Ordering::Acquire);
            }
            if all_listening {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartFailure::Other(format!(
                    "not every node of {ids:?} logged `listening` within {STARTUP_TIMEOUT:?}\n{}",
                    self.describe_nodes()
                )));
            }
            thread::sleep(CLUSTER_POLL_INTERVAL);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.running.values_mut() {
            p.kill();
        }
    }
}

fn node_id(index: usize) -> NodeId {
    NodeId::try_from(index).expect("member ids fit in u16")
}

/// Members `1..=nodes` with a distinct free client and peer port each. All
/// ports are held at once while picking, so they differ from each other.
fn pick_members(nodes: usize) -> Vec<Member> {
    let listeners: Vec<TcpListener> = (0..2 * nodes)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr"))
        .collect();
    (0..nodes)
        .map(|i| Member {
            id: node_id(i + 1),
            client: addrs[2 * i],
            peer: addrs[2 * i + 1],
        })
        .collect()
}

/// `STAT name value` lines as a map (the value is the rest of the line).
pub fn parse_stats(reply: &str) -> BTreeMap<String, String> {
    reply
        .lines()
        .filter_map(|l| l.strip_prefix("STAT "))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `stats cluster` from this connection.
///
/// # Panics
/// If the reply is not a stats listing.
pub fn cluster_stats(client: &mut Client) -> BTreeMap<String, String> {
    let reply = client.ask(b"stats cluster\r\n");
    assert!(
        reply.ends_with("END\r\n"),
        "stats cluster answered {reply:?}"
    );
    parse_stats(&reply)
}

/// The state word (`up`, `self`, `connecting`, `down(...)`) of each
/// `member:ID` in a `stats cluster` map.
pub fn member_states(stats: &BTreeMap<String, String>) -> BTreeMap<NodeId, String> {
    stats
        .iter()
        .filter_map(|(k, v)| {
            let id = k.strip_prefix("member:")?.parse().ok()?;
            Some((id, v.split_whitespace().next()?.to_string()))
        })
        .collect()
}

/// The `name=value` fields of a `member:ID` line.
pub fn member_fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `stats partitions` from this connection: for each partition the node
/// replicates, its `keys=N digest=HEX` (an order-free digest over key and
/// version, tombstones included).
///
/// # Panics
/// If the reply is not a stats listing.
pub fn partition_lines(client: &mut Client) -> BTreeMap<u32, String> {
    let reply = client.ask(b"stats partitions\r\n");
    assert!(
        reply.ends_with("END\r\n"),
        "stats partitions answered {:?}",
        &reply[..reply.len().min(200)]
    );
    parse_stats(&reply)
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("partition:")?.parse().ok()?, v)))
        .collect()
}

/// The `keys=` count of a `stats partitions` line.
///
/// # Panics
/// If the line has none.
pub fn partition_keys(line: &str) -> u64 {
    member_fields(line)
        .get("keys")
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("no keys= in partition line {line:?}"))
}

/// The partitions whose lines differ between the nodes that hold them,
/// with each holder's line, given each node's `stats partitions`.
pub fn disagreeing_partitions(
    lines: &BTreeMap<NodeId, BTreeMap<u32, String>>,
) -> BTreeMap<u32, Vec<(NodeId, String)>> {
    let mut holders: BTreeMap<u32, Vec<(NodeId, String)>> = BTreeMap::new();
    for (&id, partitions) in lines {
        for (&p, line) in partitions {
            holders.entry(p).or_default().push((id, line.clone()));
        }
    }
    holders.retain(|_, h| h.windows(2).any(|w| w[0].1 != w[1].1));
    holders
}

/// The preference list of `key` (primary first) on members 1..=nodes with
/// the default 1,024 partitions, from the library's own ring: what every
/// node computes.
pub fn preference_of(key: &str, nodes: NodeId, replicas: usize) -> Vec<NodeId> {
    let ids: Vec<NodeId> = (1..=nodes).collect();
    let ring = webvac::cluster::ring::Ring::new(&ids, 1024, replicas);
    ring.preference_list_for_key(key.as_bytes()).to_vec()
}
