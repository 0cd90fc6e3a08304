//! The nemesis suite: real `webvac` processes under a seeded schedule of
//! faults, clients writing and reading through every node meanwhile, and a
//! checker that reads their history for anything the cluster promises never
//! happens (`tests/common/history.rs`).
//!
//! ```text
//!  plan(seed) ─▶ nemesis (this thread): kill -9 + restart empty, SIGSTOP/SIGCONT,
//!                 isolate a node, split minority/majority, clock offset + drift
//!  clients (threads, seeded): set / get / TTL set / md / ma with request ids,
//!                 through random nodes, retried elsewhere, every op with a deadline
//!  then: heal everything ─▶ quiet until replicas agree ─▶ final read of every key (R=2)
//!        ─▶ check(history, outages) ─▶ report; any anomaly fails the test
//! ```
//!
//! Every run prints its seed. `WEBVAC_NEMESIS_SEED=<n>` replays the same
//! schedule and the same client choices (not the same interleaving: the
//! processes are real). `WEBVAC_NEMESIS_SECS` (fault phase, default 40),
//! `WEBVAC_NEMESIS_NODES` (3 or 5) and `WEBVAC_NEMESIS_CLIENTS` size a run;
//! `scripts/nemesis --minutes N` runs a long one in release.
//!
//! Clocks stay within ±[`SKEW_MAX_MS`] of real time, inside the drift the
//! cluster tolerates, so every anomaly is a broken promise, not a clock
//! outside the contract. Faults that stop a node are one at a time (the
//! cluster promises availability with one node down); clock skew overlaps
//! them.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Layout, Member, NodeId, disagreeing_partitions, parse_stats};
use common::history::{self, Attempt, Bounds, Kind, Ms, Op, OpKind, Outage, Reply};
use common::{Client, ReplyErrorKind, escape};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// One hop's timeout (`--request-timeout-ms`): short, so faults show fast.
const REQUEST_TIMEOUT_MS: u64 = 500;
/// How long a client waits for one attempt's answer. A node that is up
/// answers within a few hops (a failover, a catch-up read, the replica
/// writes); past this it is hung.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(10 * REQUEST_TIMEOUT_MS);
/// How long a client keeps retrying one operation. Well inside the dedup
/// window, so a retried request id is always remembered.
const OP_DEADLINE: Duration = Duration::from_secs(12);
/// Pause between two attempts of one operation.
const RETRY_BACKOFF_MS: std::ops::RangeInclusive<u64> = 20..=200;
/// Pause between two operations of one client.
const THINK_MS: std::ops::RangeInclusive<u64> = 1..=6;

/// The furthest any node's clock is set from real time, either way: inside
/// the drift the cluster tolerates, so the promises must hold.
const SKEW_MAX_MS: i64 = 1_500;
/// Offsets drawn for a node's clock; drift may add up to the skew bound.
const OFFSET_MAX_MS: i64 = 1_000;
/// Fastest drift drawn: 20 ms a second either way.
const DRIFT_RATE_MAX: f64 = 0.02;
/// What a step may take beyond its plan (a restart, the fault commands):
/// the planner keeps drift inside the bound over this much more.
const STEP_SLACK_MS: u64 = 5_000;

/// Longest a node stays killed before its restart.
const KILL_DOWN_MS: std::ops::RangeInclusive<u64> = 500..=4_000;
/// How long after a node restarted empty no other node is: refill, or
/// without it one anti-entropy cycle (4 s at the defaults: 1,024
/// partitions, 256 a round, a round a second), has given it back its data
/// by then, with room for a loaded machine.
const REPAIR_MS: u64 = 12_000;
/// Longest a node stays paused.
const PAUSE_MS: std::ops::RangeInclusive<u64> = 500..=5_000;
/// Longest a partition lasts.
const PARTITION_MS: std::ops::RangeInclusive<u64> = 1_000..=6_000;
/// A step without a fault.
const CALM_MS: std::ops::RangeInclusive<u64> = 500..=2_000;
/// What the planner allows for a leave and a join (their moves run as
/// long as they take; each wait is bounded by [`MOVE_WAIT`]).
const MEMBERSHIP_MS: u64 = 10_000;
/// The longest a leave, a join or the move after either may take.
const MOVE_WAIT: Duration = Duration::from_secs(120);
/// Between two steps.
const GAP_MS: std::ops::RangeInclusive<u64> = 200..=1_500;
/// How long after the client gave up an attempt may still run: a request
/// queued in a paused node runs when it resumes, then takes a few hops.
const LATE_MS: Ms = *PAUSE_MS.end() + 6 * REQUEST_TIMEOUT_MS;
/// Added to an outage's end: a node that was paused or restarted works off
/// its backlog and reconnects before it answers promptly again.
const RECOVERY_MS: Ms = 3_000;

/// Hint window, tombstone grace and dedup window: short, so hints expire
/// and tombstones are collected during a run, yet longer than any fault
/// (the grace must also exceed the hint window plus an anti-entropy cycle).
const HINT_WINDOW_SECS: u64 = 10;
const TOMBSTONE_GRACE_SECS: u64 = 20;
const _: () = assert!(OP_DEADLINE.as_secs() < TOMBSTONE_GRACE_SECS);
const _: () = assert!(*PARTITION_MS.end() < HINT_WINDOW_SECS * 1000);
/// Request-id records per key: the most a node keeps, so a retry within
/// the deadline always finds its record. Records live the dedup window
/// plus the drift bound (30 s here); at under one increment a second per
/// counter key ([`COUNTER_KEYS`]), about 20 are live at once.
const RECORDS_PER_KEY: usize = 64;

const REGISTER_KEYS: usize = 16;
const TTL_KEYS: usize = 8;
const COUNTER_KEYS: usize = 96;
/// TTLs of the TTL writes: expiry lands in the middle of faults.
const TTL_SECS: std::ops::RangeInclusive<u32> = 1..=3;

/// How long the healed cluster may take to agree on every partition.
const QUIET_MAX: Duration = Duration::from_secs(60);
/// Operations printed around each anomaly.
const CONTEXT_OPS: usize = 12;
/// Anomalies printed in full.
const ANOMALIES_SHOWN: usize = 20;

/// One run's size, from the environment.
#[derive(Clone, Debug)]
struct Settings {
    seed: u64,
    nodes: usize,
    fault_ms: u64,
    clients: usize,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let seed = var("WEBVAC_NEMESIS_SEED").unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let nodes = var("WEBVAC_NEMESIS_NODES").unwrap_or(3) as usize;
        assert!(nodes == 3 || nodes == 5, "WEBVAC_NEMESIS_NODES is 3 or 5");
        Settings {
            seed,
            nodes,
            fault_ms: var("WEBVAC_NEMESIS_SECS").unwrap_or(40) * 1000,
            clients: var("WEBVAC_NEMESIS_CLIENTS").unwrap_or(4) as usize,
        }
    }
}

// ---------------------------------------------------------------------------
// The schedule.

/// A fault that stops or cuts off nodes for a while; one at a time.
#[derive(Clone, Debug, PartialEq)]
enum Fault {
    /// kill -9, then restart empty (without refill when `no_refill`).
    Kill {
        node: NodeId,
        down_ms: u64,
        no_refill: bool,
    },
    /// SIGSTOP, then SIGCONT.
    Pause { node: NodeId, ms: u64 },
    /// Drop every peer message to and from the node.
    Isolate { node: NodeId, ms: u64 },
    /// Cut a minority off from the majority.
    Split { minority: Vec<NodeId>, ms: u64 },
    /// No fault: the cluster settles (hints, anti-entropy) under load.
    Calm { ms: u64 },
    /// A membership change and its undoing, partitions moving both ways:
    /// a member (5 nodes) leaves through another and joins again, empty;
    /// a spare (3 nodes: node 4, outside the clients' list) joins, takes
    /// its share, and leaves.
    Membership { node: NodeId },
}

impl Fault {
    fn name(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "kill -9 + restart",
            Fault::Pause { .. } => "pause",
            Fault::Isolate { .. } => "isolate",
            Fault::Split { .. } => "split",
            Fault::Calm { .. } => "calm",
            Fault::Membership { .. } => "leave + join",
        }
    }

    fn ms(&self) -> u64 {
        match self {
            Fault::Kill { down_ms, .. } => *down_ms,
            Fault::Pause { ms, .. }
            | Fault::Isolate { ms, .. }
            | Fault::Split { ms, .. }
            | Fault::Calm { ms } => *ms,
            Fault::Membership { .. } => MEMBERSHIP_MS,
        }
    }
}

/// A node's clock from now on: `offset_ms` ahead, running at `rate`.
#[derive(Clone, Debug, PartialEq)]
struct ClockChange {
    node: NodeId,
    offset_ms: i64,
    rate: f64,
}

impl ClockChange {
    /// The clock it sets, from time `since`.
    fn state(&self, since: u64) -> ClockState {
        ClockState {
            offset_ms: self.offset_ms,
            rate: self.rate,
            since,
        }
    }
}

/// Clock changes, then a fault, then a gap.
#[derive(Clone, Debug, PartialEq)]
struct Step {
    clocks: Vec<ClockChange>,
    fault: Fault,
    gap_ms: u64,
}

/// A node's clock as the planner (and the nemesis) tracks it.
#[derive(Clone, Copy, Debug)]
struct ClockState {
    offset_ms: i64,
    rate: f64,
    /// When it was set (planned or real ms).
    since: u64,
}

impl ClockState {
    const IN_SYNC: ClockState = ClockState {
        offset_ms: 0,
        rate: 1.0,
        since: 0,
    };

    fn skew_at(&self, t: u64) -> f64 {
        self.offset_ms as f64 + t.saturating_sub(self.since) as f64 * (self.rate - 1.0)
    }
}

/// The whole schedule of a run, from its seed alone.
fn plan(seed: u64, nodes: usize, fault_ms: u64) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
    let ids: Vec<NodeId> = (1..=nodes as NodeId).collect();
    let mut clocks: BTreeMap<NodeId, ClockState> =
        ids.iter().map(|&i| (i, ClockState::IN_SYNC)).collect();
    let mut steps = Vec::new();
    let mut t = 0;
    // The last node restarted empty and when it came back (planned time):
    // until it has its data back, no other node loses its memory.
    let mut cold: Option<(NodeId, u64)> = None;
    while t < fault_ms {
        let mut changes = Vec::new();
        if rng.gen_bool(0.5) {
            let node = *ids.choose(&mut rng).expect("nodes");
            let rate = if rng.gen_bool(0.5) {
                1.0
            } else {
                1.0 + rng.gen_range(-DRIFT_RATE_MAX..=DRIFT_RATE_MAX)
            };
            changes.push(ClockChange {
                node,
                offset_ms: rng.gen_range(-OFFSET_MAX_MS..=OFFSET_MAX_MS),
                rate,
            });
        }
        let node = *ids.choose(&mut rng).expect("nodes");
        // (weight, kind): kill, pause, isolate, split (5 nodes), calm,
        // membership.
        let weights: &[(u32, u8)] = if nodes >= 5 {
            &[(3, 0), (3, 1), (2, 2), (2, 3), (1, 4), (1, 5)]
        } else {
            &[(3, 0), (3, 1), (3, 2), (1, 4), (1, 5)]
        };
        let kind = weights
            .choose_weighted(&mut rng, |(w, _)| *w)
            .expect("positive weights")
            .1;
        // Memory is all a replica has: two replicas that lose it before
        // repair brings either back can lose a write that lived on them
        // alone (README, "Promises under faults"). So a kill of another
        // node waits out the first one's repair window: a pause instead.
        // A membership change empties the node that joins again, and its
        // move checks against every owner that is up: it waits that out
        // too.
        // (With 3 nodes and N = 3 no member can leave: a spare, node 4,
        // joins and leaves instead.)
        let emptied = if kind == 5 && nodes < 5 {
            nodes as NodeId + 1
        } else {
            node
        };
        let repairing = cold.is_some_and(|(n, back)| n != emptied && t < back + REPAIR_MS);
        let kind = if (kind == 0 || kind == 5) && repairing {
            1
        } else {
            kind
        };
        let fault = match kind {
            0 => Fault::Kill {
                node,
                down_ms: rng.gen_range(KILL_DOWN_MS),
                no_refill: rng.gen_ratio(1, 3),
            },
            1 => Fault::Pause {
                node,
                ms: rng.gen_range(PAUSE_MS),
            },
            2 => Fault::Isolate {
                node,
                ms: rng.gen_range(PARTITION_MS),
            },
            3 => {
                let mut minority = ids.clone();
                minority.shuffle(&mut rng);
                minority.truncate((nodes - 1) / 2);
                minority.sort_unstable();
                Fault::Split {
                    minority,
                    ms: rng.gen_range(PARTITION_MS),
                }
            }
            4 => Fault::Calm {
                ms: rng.gen_range(CALM_MS),
            },
            _ => Fault::Membership { node: emptied },
        };
        let gap_ms = rng.gen_range(GAP_MS);
        match fault {
            Fault::Kill { node, down_ms, .. } => cold = Some((node, t + down_ms)),
            Fault::Membership { node } => cold = Some((node, t + MEMBERSHIP_MS)),
            _ => {}
        }
        let end = t + fault.ms() + gap_ms + STEP_SLACK_MS;
        // Apply this step's changes, then put back in step any clock that
        // could drift past the bound before the step ends.
        for c in &changes {
            clocks.insert(c.node, c.state(t));
        }
        for (&node, clock) in &mut clocks {
            if clock.skew_at(end).abs() > SKEW_MAX_MS as f64 {
                let offset_ms = rng.gen_range(-OFFSET_MAX_MS..=OFFSET_MAX_MS);
                *clock = ClockState {
                    offset_ms,
                    rate: 1.0,
                    since: t,
                };
                changes.retain(|c| c.node != node);
                changes.push(ClockChange {
                    node,
                    offset_ms,
                    rate: 1.0,
                });
            }
        }
        t = end - STEP_SLACK_MS;
        steps.push(Step {
            clocks: changes,
            fault,
            gap_ms,
        });
    }
    steps
}

// ---------------------------------------------------------------------------
// The workload.

/// Key names: plain registers, TTL registers, counters.
fn register_key(i: usize) -> String {
    format!("r:{i}")
}
fn ttl_key(i: usize) -> String {
    format!("t:{i}")
}
fn counter_key(i: usize) -> String {
    format!("c:{i}")
}

/// Milliseconds since `start`.
fn ms_since(start: Instant) -> Ms {
    u64::try_from(start.elapsed().as_millis()).expect("fits")
}

/// One client's connections (one per node, reopened after any failure).
struct Connections {
    members: Vec<Member>,
    open: BTreeMap<NodeId, Client>,
}

impl Connections {
    fn new(members: Vec<Member>) -> Self {
        Self {
            members,
            open: BTreeMap::new(),
        }
    }

    /// Sends `request` to `node` and reads one reply.
    fn call(&mut self, node: NodeId, request: &[u8]) -> Result<Vec<u8>, Reply> {
        let addr = self
            .members
            .iter()
            .find(|m| m.id == node)
            .expect("a member")
            .client;
        let client = match self.open.entry(node) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(Client::connect_tcp(addr).map_err(|e| Reply::NotSent(e.to_string()))?)
            }
        };
        match client.call(request, ATTEMPT_TIMEOUT) {
            Ok(reply) => Ok(reply),
            Err(e) => {
                // A late answer would be taken for the next request's.
                self.open.remove(&node);
                Err(match e.kind {
                    ReplyErrorKind::Timeout(_) => Reply::Timeout,
                    ReplyErrorKind::Closed => Reply::Closed("closed".into()),
                    ReplyErrorKind::Io(e) => Reply::Closed(e.to_string()),
                    ReplyErrorKind::TooLarge => Reply::Unexpected("reply too large".into()),
                })
            }
        }
    }
}

/// What a reply means for each kind of operation.
fn classify(kind: &OpKind, raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    if let Some(why) = text.strip_prefix("SERVER_ERROR ") {
        return Reply::ServerError(why.trim_end().to_string());
    }
    match (kind, raw) {
        (OpKind::Set { .. }, b"STORED\r\n") => Reply::Stored,
        (OpKind::Read, b"END\r\n") => Reply::Miss,
        (OpKind::Read, _) if raw.starts_with(b"VALUE ") && raw.ends_with(b"\r\nEND\r\n") => {
            let header_end = raw.windows(2).position(|w| w == b"\r\n").expect("a line");
            Reply::Value(raw[header_end + 2..raw.len() - b"\r\nEND\r\n".len()].to_vec())
        }
        (OpKind::Delete { .. }, b"HD\r\n") => Reply::Deleted,
        (OpKind::Delete { .. } | OpKind::Incr { .. }, b"NF\r\n") => Reply::NotFound,
        (OpKind::Incr { .. }, _) if raw.starts_with(b"VA ") => {
            let number = text.split("\r\n").nth(1).and_then(|n| n.parse().ok());
            number.map_or_else(|| Reply::Unexpected(escape(raw)), Reply::Number)
        }
        _ => Reply::Unexpected(escape(raw)),
    }
}

/// The request line(s) for an operation.
fn request(key: &str, kind: &OpKind) -> Vec<u8> {
    match kind {
        OpKind::Set { value, ttl_secs } => {
            let mut r = format!("set {key} 0 {ttl_secs} {}\r\n", value.len()).into_bytes();
            r.extend_from_slice(value);
            r.extend_from_slice(b"\r\n");
            r
        }
        OpKind::Read => format!("get {key}\r\n").into_bytes(),
        // Deletes are retried like increments: one id per operation is
        // what makes a retry answer `HD` again after the first deleted.
        OpKind::Delete { id } => format!("md {key} Pi{id}\r\n").into_bytes(),
        OpKind::Incr { id } => format!("ma {key} v Pi{id}\r\n").into_bytes(),
    }
}

/// Runs one operation: attempts through random nodes (never the same twice
/// in a row) until a definite answer or the deadline.
fn run_op(
    conns: &mut Connections,
    rng: &mut StdRng,
    start: Instant,
    nodes: &[NodeId],
    op: &mut Op,
) {
    let deadline = Instant::now() + OP_DEADLINE;
    let raw = request(&op.key, &op.kind);
    let mut last = None;
    loop {
        let choices: Vec<NodeId> = nodes.iter().copied().filter(|&n| Some(n) != last).collect();
        let node = *choices.choose(rng).expect("nodes");
        last = Some(node);
        let sent = ms_since(start);
        let reply = match conns.call(node, &raw) {
            Ok(bytes) => classify(&op.kind, &bytes),
            Err(failure) => failure,
        };
        let done = !matches!(
            reply,
            Reply::ServerError(_) | Reply::Timeout | Reply::Closed(_) | Reply::NotSent(_)
        );
        op.attempts.push(Attempt {
            node,
            start: sent,
            end: ms_since(start),
            reply,
        });
        let pause = Duration::from_millis(rng.gen_range(RETRY_BACKOFF_MS));
        if done || Instant::now() + pause + ATTEMPT_TIMEOUT > deadline {
            return;
        }
        thread::sleep(pause);
    }
}

/// What every client shares.
#[derive(Clone)]
struct Workload {
    seed: u64,
    members: Vec<Member>,
    start: Instant,
    stop: Arc<AtomicBool>,
}

impl Workload {
    /// Client `client`'s operations until told to stop.
    fn client(&self, client: usize) -> Vec<Op> {
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(client as u64 + 1));
        let mut conns = Connections::new(self.members.clone());
        let nodes: Vec<NodeId> = self.members.iter().map(|m| m.id).collect();
        let mut ops = Vec::new();
        let mut seq = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            seq += 1;
            let value = format!("c{client}-{seq}").into_bytes();
            // At most 23 bytes, unique to the run, the client and the op.
            let id = format!("n{:x}c{client}s{seq}", self.seed & 0xffff_ffff);
            let (key, kind) = match rng.gen_range(0..100) {
                0..20 => (
                    register_key(rng.gen_range(0..REGISTER_KEYS)),
                    OpKind::Set { value, ttl_secs: 0 },
                ),
                20..42 => (register_key(rng.gen_range(0..REGISTER_KEYS)), OpKind::Read),
                42..52 => (
                    ttl_key(rng.gen_range(0..TTL_KEYS)),
                    OpKind::Set {
                        value,
                        ttl_secs: rng.gen_range(TTL_SECS),
                    },
                ),
                52..62 => (ttl_key(rng.gen_range(0..TTL_KEYS)), OpKind::Read),
                62..70 => {
                    let key = if rng.gen_bool(0.5) {
                        register_key(rng.gen_range(0..REGISTER_KEYS))
                    } else {
                        ttl_key(rng.gen_range(0..TTL_KEYS))
                    };
                    (key, OpKind::Delete { id })
                }
                _ => (
                    counter_key(rng.gen_range(0..COUNTER_KEYS)),
                    OpKind::Incr { id },
                ),
            };
            let mut op = Op {
                id: 0,
                client,
                key,
                kind,
                attempts: Vec::new(),
                final_read: false,
            };
            run_op(&mut conns, &mut rng, self.start, &nodes, &mut op);
            ops.push(op);
            thread::sleep(Duration::from_millis(rng.gen_range(THINK_MS)));
        }
        ops
    }
}

// ---------------------------------------------------------------------------
// The nemesis.

/// What the nemesis did, for the checker and the report.
#[derive(Default)]
struct FaultLog {
    /// Spans during which a node could not answer, widened by [`RECOVERY_MS`].
    outages: Vec<Outage>,
    /// Faults by kind.
    counts: BTreeMap<&'static str, u64>,
    /// Every action, with its time, for the report.
    events: Vec<(Ms, String)>,
    /// The largest clock skew any node reported, in ms.
    skew_max_seen: i64,
}

/// Runs the schedule against the cluster; returns when every step is done
/// and every fault healed (clocks back in sync).
struct Nemesis<'a> {
    cluster: &'a mut Cluster,
    start: Instant,
    clocks: BTreeMap<NodeId, ClockState>,
    log: FaultLog,
}

impl Nemesis<'_> {
    fn now(&self) -> Ms {
        ms_since(self.start)
    }

    fn event(&mut self, what: String) {
        let at = self.now();
        self.log.events.push((at, what));
    }

    fn count(&mut self, kind: &'static str) {
        *self.log.counts.entry(kind).or_default() += 1;
    }

    fn set_clock(&mut self, c: &ClockChange) {
        self.cluster.set_clock_offset(c.node, c.offset_ms);
        self.cluster.set_clock_rate(c.node, c.rate);
        let since = self.now();
        self.clocks.insert(c.node, c.state(since));
        self.count("clock skew / drift");
        self.event(format!(
            "node {} clock {:+} ms, rate {:.4}",
            c.node, c.offset_ms, c.rate
        ));
    }

    /// The flags that restart node `id` with the clock it has now (a
    /// restarted process keeps its machine's clock).
    fn restart_args(&self, id: NodeId, no_refill: bool) -> Vec<String> {
        let clock = self.clocks.get(&id).copied().unwrap_or(ClockState::IN_SYNC);
        let skew = clock.skew_at(self.now()).round() as i64;
        let mut args = vec![
            "--fault-clock-offset-ms".to_string(),
            skew.to_string(),
            "--fault-clock-rate".to_string(),
            clock.rate.to_string(),
        ];
        if no_refill {
            args.push("--no-refill".to_string());
        }
        args
    }

    fn sleep(ms: u64) {
        thread::sleep(Duration::from_millis(ms));
    }

    fn outage(&mut self, node: NodeId, from: Ms) {
        let to = self.now() + RECOVERY_MS;
        self.log.outages.push(Outage { node, from, to });
    }

    fn run(&mut self, steps: &[Step]) {
        for step in steps {
            for c in &step.clocks {
                self.set_clock(c);
            }
            self.count(step.fault.name());
            match &step.fault {
                Fault::Kill {
                    node,
                    down_ms,
                    no_refill,
                } => {
                    let from = self.now();
                    self.cluster.kill(*node);
                    self.event(format!("node {node} killed"));
                    Self::sleep(*down_ms);
                    let args = self.restart_args(*node, *no_refill);
                    self.cluster.set_node_args(*node, args.clone());
                    self.cluster.restart_listening(*node);
                    self.outage(*node, from);
                    self.event(format!("node {node} restarted empty {args:?}"));
                }
                Fault::Pause { node, ms } => {
                    let from = self.now();
                    self.cluster.pause(*node);
                    self.event(format!("node {node} paused"));
                    Self::sleep(*ms);
                    self.cluster.resume(*node);
                    self.outage(*node, from);
                    self.event(format!("node {node} resumed"));
                }
                Fault::Isolate { node, ms } => {
                    self.cluster.isolate(*node);
                    self.event(format!("node {node} isolated"));
                    Self::sleep(*ms);
                    self.cluster.heal(*node);
                    self.event(format!("node {node} healed"));
                }
                Fault::Split { minority, ms } => {
                    let majority: Vec<NodeId> = self
                        .cluster
                        .member_ids()
                        .into_iter()
                        .filter(|id| !minority.contains(id))
                        .collect();
                    for &n in minority {
                        self.cluster.partition(n, &majority);
                    }
                    self.event(format!("split {minority:?} from {majority:?}"));
                    Self::sleep(*ms);
                    for &n in minority {
                        self.cluster.heal(n);
                    }
                    self.event("split healed".into());
                }
                Fault::Calm { ms } => Self::sleep(*ms),
                Fault::Membership { node } => {
                    let from = self.now();
                    let seed = self
                        .cluster
                        .running_ids()
                        .into_iter()
                        .find(|&id| id != *node)
                        .expect("another node runs");
                    if self.cluster.running_ids().contains(node) {
                        self.leave(*node, seed);
                        self.join(*node, seed);
                    } else {
                        self.join(*node, seed);
                        self.leave(*node, seed);
                    }
                    self.outage(*node, from);
                }
            }
            self.observe_skew();
            Self::sleep(step.gap_ms);
        }
        for id in self.cluster.running_ids() {
            self.set_clock(&ClockChange {
                node: id,
                offset_ms: 0,
                rate: 1.0,
            });
        }
        self.event("every fault healed, clocks in sync".into());
    }

    /// `cluster leave ID` through `via` (retried while the members cannot
    /// decide it yet), then waits until the node exits 0 and the others
    /// have settled without it. Panics past [`MOVE_WAIT`]: a leave that
    /// does not finish is a stuck transfer.
    fn leave(&mut self, node: NodeId, via: NodeId) {
        let deadline = Instant::now() + MOVE_WAIT;
        loop {
            let said = Client::connect_tcp(self.cluster.member(via).client)
                .map_err(|e| e.to_string())
                .and_then(|mut c| {
                    c.call(format!("cluster leave {node}\r\n").as_bytes(), MOVE_WAIT)
                        .map_err(|e| format!("{e:?}"))
                })
                .map(|r| String::from_utf8_lossy(&r).into_owned());
            match said {
                Ok(ok) if ok.starts_with("OK epoch") => break,
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "cluster leave {node} through node {via}: {other:?}"
                    );
                    Self::sleep(250);
                }
            }
        }
        self.event(format!("node {node} leaves (through node {via})"));
        let status = self.cluster.wait_exit(node, MOVE_WAIT);
        assert!(
            status.success(),
            "node {node} left and exited with {status}"
        );
        self.event(format!("node {node} left and exited"));
        self.settled();
    }

    /// Node `node` joins through `seed` (empty, taking its share), then
    /// waits until every member has settled with it.
    fn join(&mut self, node: NodeId, seed: NodeId) {
        let args = self.restart_args(node, false);
        self.cluster.set_node_args(node, args);
        if let Err(why) = self.cluster.join_again(node, seed) {
            panic!("node {node} did not join through node {seed}: {why}");
        }
        self.event(format!("node {node} joined (through node {seed})"));
        self.settled();
    }

    /// Waits until every running node is a member, all at one epoch, with
    /// no transfer pending (bounded by [`MOVE_WAIT`]).
    fn settled(&mut self) {
        let deadline = Instant::now() + MOVE_WAIT;
        loop {
            let running = self.cluster.running_ids();
            let stats: Vec<BTreeMap<String, String>> = running
                .iter()
                .filter_map(|&id| {
                    let mut c = Client::connect_tcp(self.cluster.member(id).client).ok()?;
                    let reply = c.call(b"stats cluster\r\n", ATTEMPT_TIMEOUT).ok()?;
                    Some(parse_stats(&String::from_utf8_lossy(&reply)))
                })
                .collect();
            let get = |s: &BTreeMap<String, String>, f: &str| s.get(f).cloned().unwrap_or_default();
            let epochs: std::collections::BTreeSet<String> =
                stats.iter().map(|s| get(s, "epoch")).collect();
            if stats.len() == running.len()
                && epochs.len() == 1
                && stats.iter().all(|s| {
                    get(s, "transfers_pending") == "0"
                        && get(s, "members") == running.len().to_string()
                })
            {
                self.event(format!("settled at epoch {:?}", epochs.first()));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not settle within {MOVE_WAIT:?} after a membership change: {stats:?}"
            );
            Self::sleep(200);
        }
    }

    /// Records the largest skew the nodes report, to show the run stayed
    /// inside the bound.
    fn observe_skew(&mut self) {
        for id in self.cluster.running_ids() {
            let Ok(mut c) = Client::connect_tcp(self.cluster.member(id).client) else {
                continue;
            };
            if let Ok(reply) = c.call(b"stats\r\n", ATTEMPT_TIMEOUT) {
                let stats = parse_stats(&String::from_utf8_lossy(&reply));
                if let Some(skew) = stats
                    .get("fault_clock_skew_ms")
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    self.log.skew_max_seen = self.log.skew_max_seen.max(skew.abs());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The run.

fn layout(nodes: usize) -> Layout {
    Layout::new(nodes)
        .replicas(3)
        .quorums(2, 2)
        .request_timeout_ms(REQUEST_TIMEOUT_MS)
        .fault_control()
        .hint_window_secs(HINT_WINDOW_SECS)
        .tombstone_grace_secs(TOMBSTONE_GRACE_SECS)
        .arg("--request-id-records-per-key")
        .arg(RECORDS_PER_KEY.to_string())
}

/// Polls until every partition's replicas agree; the time it took, or what
/// still differs.
fn converge(cluster: &mut Cluster) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let lines = cluster.partition_lines();
        let differing = disagreeing_partitions(&lines);
        if differing.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > QUIET_MAX {
            return Err(format!(
                "{} partitions still differ between replicas {QUIET_MAX:?} after every fault healed, e.g. {:?}",
                differing.len(),
                differing.iter().take(3).collect::<Vec<_>>()
            ));
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Counters summed over every node's `stats` and `stats cluster`.
fn summed_stats(cluster: &Cluster, names: &[&str]) -> BTreeMap<String, u64> {
    let mut sums = BTreeMap::new();
    for id in cluster.running_ids() {
        let mut c = cluster.connect(id);
        for group in [&b"stats\r\n"[..], b"stats cluster\r\n"] {
            let stats = parse_stats(&c.ask(group));
            for &name in names {
                if let Some(v) = stats.get(name).and_then(|v| v.parse::<u64>().ok()) {
                    *sums.entry(name.to_string()).or_default() += v;
                }
            }
        }
    }
    sums
}

/// Operation counts by kind and outcome, for the report.
fn op_figures(ops: &[Op]) -> String {
    let mut rows: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
    for op in ops {
        let name = match (&op.kind, op.final_read) {
            (OpKind::Set { ttl_secs: 0, .. }, _) => "set",
            (OpKind::Set { .. }, _) => "set with TTL",
            (OpKind::Read, false) => "get",
            (OpKind::Read, true) => "final get",
            (OpKind::Delete { .. }, _) => "md (request id)",
            (OpKind::Incr { .. }, _) => "ma (request id)",
        };
        let row = rows.entry(name).or_default();
        let settled = op
            .attempts
            .last()
            .is_some_and(|a| !a.reply.indeterminate() && !matches!(a.reply, Reply::NotSent(_)));
        row[0] += 1;
        row[1] += u64::from(settled);
        row[2] += u64::from(op.attempts.len() > 1);
    }
    let mut out = String::new();
    for (name, [n, settled, retried]) in rows {
        out.push_str(&format!(
            "  {name:<16} {n:>7}   answered {settled:>7}   retried {retried:>6}\n"
        ));
    }
    out
}

#[test]
fn nemesis() {
    let s = Settings::from_env();
    println!(
        "nemesis: seed {} (replay with WEBVAC_NEMESIS_SEED={}), {} nodes, {} clients, {} s of faults",
        s.seed,
        s.seed,
        s.nodes,
        s.clients,
        s.fault_ms / 1000
    );
    let steps = plan(s.seed, s.nodes, s.fault_ms);
    let mut cluster = Cluster::start(layout(s.nodes));
    let start = Instant::now();
    let members = cluster.members().to_vec();
    let nodes: Vec<NodeId> = cluster.ids();

    // Counters exist before the faults: an `ma` that finds none is a loss.
    let mut setup = Connections::new(members.clone());
    let mut rng = StdRng::seed_from_u64(s.seed);
    let mut ops: Vec<Op> = Vec::new();
    for i in 0..COUNTER_KEYS {
        let mut op = Op {
            id: 0,
            client: usize::MAX,
            key: counter_key(i),
            kind: OpKind::Set {
                value: b"0".to_vec(),
                ttl_secs: 0,
            },
            attempts: Vec::new(),
            final_read: false,
        };
        run_op(&mut setup, &mut rng, start, &nodes, &mut op);
        assert!(op.acked().is_some(), "counter set-up failed: {op}");
        ops.push(op);
    }

    let workload = Workload {
        seed: s.seed,
        members: members.clone(),
        start,
        stop: Arc::new(AtomicBool::new(false)),
    };
    let clients: Vec<_> = (0..s.clients)
        .map(|i| {
            let w = workload.clone();
            thread::Builder::new()
                .name(format!("client-{i}"))
                .spawn(move || w.client(i))
                .expect("spawn a client")
        })
        .collect();
    let mut nemesis = Nemesis {
        cluster: &mut cluster,
        start,
        clocks: nodes.iter().map(|&n| (n, ClockState::IN_SYNC)).collect(),
        log: FaultLog::default(),
    };
    nemesis.run(&steps);
    let log = nemesis.log;
    workload.stop.store(true, Ordering::Relaxed);
    for c in clients {
        ops.extend(c.join().expect("a client panicked"));
    }
    let faults_done = ms_since(start);

    let converged = converge(&mut cluster);
    let mut keys: Vec<String> = (0..REGISTER_KEYS).map(register_key).collect();
    keys.extend((0..TTL_KEYS).map(ttl_key));
    keys.extend((0..COUNTER_KEYS).map(counter_key));
    for key in keys {
        let mut op = Op {
            id: 0,
            client: usize::MAX,
            key,
            kind: OpKind::Read,
            attempts: Vec::new(),
            final_read: true,
        };
        run_op(&mut setup, &mut rng, start, &nodes, &mut op);
        ops.push(op);
    }
    for (i, op) in ops.iter_mut().enumerate() {
        op.id = i;
    }
    let stats = summed_stats(
        &cluster,
        &[
            "request_id_replays",
            "request_id_records_dropped",
            "fault_peer_frames_dropped",
            "write_conflicts",
            "versions_refused",
            "read_repairs",
            "hints_delivered",
            "hints_dropped",
            "anti_entropy_keys_pushed",
        ],
    );

    let bounds = Bounds {
        skew_ms: SKEW_MAX_MS as u64 + 250,
        late_ms: LATE_MS,
    };
    let anomalies = history::check(&ops, &log.outages, &bounds);

    let mut report = format!(
        "nemesis report: seed {}, {} nodes, {} clients, faults for {:.1} s, {:.1} s in all\n",
        s.seed,
        s.nodes,
        s.clients,
        faults_done as f64 / 1000.0,
        start.elapsed().as_secs_f64()
    );
    report.push_str(&format!("operations: {}\n{}", ops.len(), op_figures(&ops)));
    report.push_str("faults:\n");
    for (kind, n) in &log.counts {
        report.push_str(&format!("  {kind:<20} {n:>5}\n"));
    }
    report.push_str(&format!(
        "  largest clock skew reported: {} ms (bound {SKEW_MAX_MS})\n",
        log.skew_max_seen
    ));
    match &converged {
        Ok(took) => report.push_str(&format!(
            "replicas agreed {:.1} s after the faults healed\n",
            took.as_secs_f64()
        )),
        Err(e) => report.push_str(&format!("replicas did not converge: {e}\n")),
    }
    report.push_str(&format!("cluster counters (all nodes): {stats:?}\n"));
    report.push_str("anomalies:\n");
    for kind in Kind::ALL {
        let n = anomalies.iter().filter(|a| a.kind == kind).count();
        report.push_str(&format!("  {:<16} {n:>5}\n", kind.name()));
    }
    if stats
        .get("request_id_records_dropped")
        .copied()
        .unwrap_or(0)
        > 0
    {
        report.push_str("note: request-id records were dropped at the per-key bound; a double-applied increment on such a key may be that\n");
    }
    for a in anomalies.iter().take(ANOMALIES_SHOWN) {
        report.push('\n');
        report.push_str(&history::describe(a, &ops, &log.outages, CONTEXT_OPS));
    }
    if anomalies.len() > ANOMALIES_SHOWN {
        report.push_str(&format!(
            "\n… {} more anomalies\n",
            anomalies.len() - ANOMALIES_SHOWN
        ));
    }
    let path =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nemesis-{}.txt", s.seed));
    let mut full = String::new();
    for (at, what) in &log.events {
        full.push_str(&format!("{at:>8} ms  {what}\n"));
    }
    for op in &ops {
        full.push_str(&format!("{op}\n"));
    }
    if std::fs::write(&path, full).is_ok() {
        report.push_str(&format!(
            "\nfull history and fault timeline: {}\n",
            path.display()
        ));
    }
    println!("{report}");
    assert!(
        anomalies.is_empty() && converged.is_ok(),
        "the nemesis found anomalies (seed {}; replay with WEBVAC_NEMESIS_SEED={})",
        s.seed,
        s.seed
    );
}

/// No node loses its memory while another that lost it may still be
/// without its data (the CI failure of seed 1796300806479469412: two of
/// three replicas restarted empty 0.8 s apart, the third cut off, and a
/// counter read back from the two empty ones).
#[test]
fn a_second_node_is_never_restarted_empty_inside_the_first_ones_repair_window() {
    let mut kills = 0;
    let mut memberships = 0;
    for seed in (0..300).chain([1_796_300_806_479_469_412]) {
        for nodes in [3, 5] {
            let mut t = 0;
            let mut cold: Option<(NodeId, u64)> = None;
            for step in plan(seed, nodes, 120_000) {
                // A membership change empties the node that joins (again).
                let emptied = match step.fault {
                    Fault::Kill { node, down_ms, .. } => Some((node, down_ms)),
                    Fault::Membership { node } => {
                        memberships += 1;
                        Some((node, MEMBERSHIP_MS))
                    }
                    _ => None,
                };
                if let Some((node, down_ms)) = emptied {
                    kills += 1;
                    if let Some((other, back)) = cold {
                        assert!(
                            other == node || t >= back + REPAIR_MS,
                            "seed {seed}: node {node} emptied at {t} ms, node {other} back only at {back} ms"
                        );
                    }
                    cold = Some((node, t + down_ms));
                }
                t += step.fault.ms() + step.gap_ms;
            }
        }
    }
    assert!(kills > 1000, "the schedules still kill: {kills}");
    assert!(
        memberships > 200,
        "the schedules change membership: {memberships}"
    );
}

/// Seeds whose default run (3 nodes, 40 s) changes membership, to replay.
#[test]
fn some_short_runs_change_membership() {
    let seeds: Vec<u64> = (0..200)
        .filter(|&seed| {
            plan(seed, 3, 40_000)
                .iter()
                .any(|s| matches!(s.fault, Fault::Membership { .. }))
        })
        .collect();
    println!("seeds of 40 s runs with a membership change: {seeds:?}");
    assert!(seeds.len() > 20, "{seeds:?}");
}

#[test]
fn a_seed_gives_the_same_schedule_and_clocks_stay_in_bounds() {
    for seed in 0..200 {
        let steps = plan(seed, 5, 120_000);
        assert_eq!(steps, plan(seed, 5, 120_000));
        assert!(steps.len() > 10);
        // Replay each clock over the planned time, with every step taking
        // its slack longer still.
        let mut clocks: BTreeMap<NodeId, ClockState> =
            (1..=5).map(|i| (i, ClockState::IN_SYNC)).collect();
        let mut t = 0;
        for step in &steps {
            for c in &step.clocks {
                assert!(c.offset_ms.abs() <= OFFSET_MAX_MS);
                assert!((c.rate - 1.0).abs() <= DRIFT_RATE_MAX + 1e-9);
                clocks.insert(c.node, c.state(t));
            }
            let end = t + step.fault.ms() + step.gap_ms + STEP_SLACK_MS;
            for clock in clocks.values() {
                assert!(
                    clock.skew_at(end).abs() <= SKEW_MAX_MS as f64,
                    "seed {seed}: {clock:?} at {end}"
                );
            }
            if let Fault::Split { minority, .. } = &step.fault {
                assert_eq!(minority.len(), 2);
            }
            t = end - STEP_SLACK_MS;
        }
    }
    let kinds: std::collections::BTreeSet<&str> = (0..20)
        .flat_map(|seed| plan(seed, 5, 120_000))
        .map(|s| s.fault.name())
        .collect();
    assert_eq!(kinds.len(), 6, "{kinds:?}");
    assert!(
        plan(1, 3, 60_000)
            .iter()
            .all(|s| !matches!(s.fault, Fault::Split { .. }))
    );
}

#[test]
fn replies_are_read_as_the_checker_needs() {
    let set = OpKind::Set {
        value: b"v".to_vec(),
        ttl_secs: 0,
    };
    let incr = OpKind::Incr { id: "x".into() };
    assert_eq!(classify(&set, b"STORED\r\n"), Reply::Stored);
    assert_eq!(
        classify(&set, b"SERVER_ERROR write quorum not met\r\n"),
        Reply::ServerError("write quorum not met".into())
    );
    assert_eq!(classify(&OpKind::Read, b"END\r\n"), Reply::Miss);
    assert_eq!(
        classify(&OpKind::Read, b"VALUE r:1 0 4\r\nc1-2\r\nEND\r\n"),
        Reply::Value(b"c1-2".to_vec())
    );
    let delete = OpKind::Delete { id: "d".into() };
    assert_eq!(classify(&delete, b"HD\r\n"), Reply::Deleted);
    assert_eq!(classify(&delete, b"NF\r\n"), Reply::NotFound);
    assert_eq!(request("t:0", &delete), b"md t:0 Pid\r\n".to_vec());
    assert_eq!(classify(&incr, b"VA 2\r\n17\r\n"), Reply::Number(17));
    assert_eq!(classify(&incr, b"NF\r\n"), Reply::NotFound);
    assert!(matches!(classify(&incr, b"EX\r\n"), Reply::Unexpected(_)));
    assert!(matches!(
        classify(&set, b"NOT_STORED\r\n"),
        Reply::Unexpected(_)
    ));
    assert_eq!(request("c:1", &incr), b"ma c:1 v Pix\r\n".to_vec());
    assert_eq!(
        request(
            "r:1",
            &OpKind::Set {
                value: b"ab".to_vec(),
                ttl_secs: 2
            }
        ),
        b"set r:1 0 2 2\r\nab\r\n".to_vec()
    );
}
