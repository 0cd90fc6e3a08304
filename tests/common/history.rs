//! What clients saw during a nemesis run (`tests/nemesis.rs`), and the
//! checker that finds, key by key, what the cluster promises never happens.
//!
//! ```text
//!  clients ──Op{key, kind, attempts: [node, start, end, reply]}──▶ History
//!  nemesis ──Outage{node, from, to} (killed, restarting, paused)──▶ History
//!                                                  check() ──▶ [Anomaly]
//! ```
//!
//! The promises (README, "Promises under faults"), and the anomaly that
//! breaks each:
//!
//! - **lost**: an acknowledged write not visible to a quorum read that
//!   started after it was acknowledged, while no later write, delete or
//!   expiry can explain it; for a counter, fewer increments counted than
//!   were acknowledged.
//! - **resurrected**: a read returns a value that was deleted or expired
//!   (or replaced by a write that has since expired) before the read began.
//! - **double-applied**: a counter's request id applied twice: a retry
//!   answers another number than the first attempt, or the counter counts
//!   more increments than may have been applied.
//! - **bogus**: a value or reply never written or possible.
//! - **hung**: no answer within the attempt timeout from a node that was
//!   running (not killed, not paused) the whole time.
//!
//! ## What may explain what
//!
//! An attempt that timed out, lost its connection or got `SERVER_ERROR` may
//! or may not have been applied (it is *indeterminate*), and may have been
//! applied late: a request queued in a paused node runs when the node
//! resumes. Its state can surface later still (a hint, read repair,
//! anti-entropy), but carrying the version it was stamped with when it ran.
//! So an operation with an indeterminate attempt counts as possibly ordered
//! after any operation that started before
//!
//! ```text
//!  cutoff = last time any attempt may have run + 2 × the clock skew bound
//! ```
//!
//! (its version is at most one skew ahead of real time, a later writer's at
//! most one skew behind); an operation whose attempts all answered orders
//! after anything that started before it was acknowledged, and before
//! anything that started after. Expiry is judged in whole seconds by each
//! replica's own clock, so a TTL write may have expired from `ttl − 1 s − 2 ×
//! skew` after it started, and has surely expired `ttl + 2 × skew` after it
//! last ran.
//!
//! ## Why not stateright's `LinearizabilityTester`
//!
//! It was the first choice (issue 15 asks for a well-kept crate's checker
//! where it fits); it does not fit here:
//! - The cluster does not promise linearizability, and the checker must
//!   test what it does promise: with R + W > N and asynchronous repair, a
//!   read may see a write still in flight and a later read not see it (it
//!   was not acknowledged), which a linearizability checker flags.
//! - Expiry in whole seconds on skewed clocks has no deterministic
//!   sequential specification; the tester's `SequentialSpec` is one.
//! - Indeterminate operations stay open forever, each thread may have only
//!   one open, and its search is exponential in concurrent open operations:
//!   minutes of faults leave hundreds per key.
//! - It reports consistent or not, with no kind, keys or witnesses.
//! - Its dependencies (0.31: tiny_http for its explorer, dashmap, ahash,
//!   id-set, choice, a second rand) for one function.
//!
//! So this checker is written for the promises. Its rules are tested below
//! on hand-built histories, including ones it must flag.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};

/// Milliseconds since the run started, on the test's monotonic clock.
pub type Ms = u64;

/// A member id.
pub type NodeId = u16;

/// How one attempt of an operation ended, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `STORED` to `set`.
    Stored,
    /// `HD` to `md`: deleted (or the retry of an attempt that deleted).
    Deleted,
    /// `NF` to `md` (nothing to delete) or `ma` (no counter).
    NotFound,
    /// A read's value.
    Value(Vec<u8>),
    /// A read's miss.
    Miss,
    /// `ma`'s number.
    Number(u64),
    /// A `SERVER_ERROR` line: may or may not have been applied.
    ServerError(String),
    /// No answer within the attempt timeout: may or may not have been
    /// applied.
    Timeout,
    /// The connection broke after the request was sent: may or may not.
    Closed(String),
    /// Never sent (the connection was refused): not applied.
    NotSent(String),
    /// Not an answer this command can have.
    Unexpected(String),
}

impl Reply {
    /// Whether the attempt may have been applied, unknown to the client.
    pub fn indeterminate(&self) -> bool {
        matches!(
            self,
            Reply::ServerError(_) | Reply::Timeout | Reply::Closed(_)
        )
    }

    /// Whether it is a mutation's success.
    fn success(&self) -> bool {
        matches!(self, Reply::Stored | Reply::Deleted | Reply::Number(_))
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Stored => f.write_str("STORED"),
            Reply::Deleted => f.write_str("HD (deleted)"),
            Reply::NotFound => f.write_str("NF"),
            Reply::Value(v) => write!(f, "value {}", String::from_utf8_lossy(v)),
            Reply::Miss => f.write_str("miss"),
            Reply::Number(n) => write!(f, "{n}"),
            Reply::ServerError(e) => write!(f, "SERVER_ERROR {e}"),
            Reply::Timeout => f.write_str("timeout"),
            Reply::Closed(e) => write!(f, "connection lost ({e})"),
            Reply::NotSent(e) => write!(f, "not sent ({e})"),
            Reply::Unexpected(r) => write!(f, "unexpected {r:?}"),
        }
    }
}

/// One try of an operation, through one node.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// The node the request went to (its coordinator).
    pub node: NodeId,
    /// When the request was sent.
    pub start: Ms,
    /// When the answer came, or the client gave up.
    pub end: Ms,
    /// What came back.
    pub reply: Reply,
}

/// What an operation does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// `set` of a value unique to the key, with a TTL in seconds (0: none).
    Set { value: Vec<u8>, ttl_secs: u32 },
    /// A quorum read of the key.
    Read,
    /// `md` with request id `id`; every attempt carries it.
    Delete { id: String },
    /// `ma … v` (+1) with request id `id`; every attempt carries it.
    Incr { id: String },
}

/// One client operation: every attempt of it, retries included.
#[derive(Clone, Debug)]
pub struct Op {
    /// Unique within the history.
    pub id: usize,
    /// The client that ran it.
    pub client: usize,
    pub key: String,
    pub kind: OpKind,
    /// In the order sent; never empty.
    pub attempts: Vec<Attempt>,
    /// A read made after every fault healed and the replicas converged.
    pub final_read: bool,
}

impl Op {
    /// When its first attempt was sent.
    pub fn invoked(&self) -> Ms {
        self.attempts[0].start
    }

    /// When it was first acknowledged (a mutation's success answer).
    pub fn acked(&self) -> Option<Ms> {
        self.attempts
            .iter()
            .find(|a| a.reply.success())
            .map(|a| a.end)
    }

    /// Whether some attempt ended without the client knowing.
    pub fn indeterminate(&self) -> bool {
        self.attempts.iter().any(|a| a.reply.indeterminate())
    }

    /// Whether it may have changed the key.
    pub fn maybe_applied(&self) -> bool {
        self.acked().is_some() || self.indeterminate()
    }

    /// The last time any attempt may have run: an answered one by its end,
    /// an indeterminate one by its end plus `late_ms`.
    pub fn ran_by(&self, late_ms: Ms) -> Ms {
        self.attempts
            .iter()
            .filter(|a| !matches!(a.reply, Reply::NotSent(_)))
            .map(|a| {
                if a.reply.indeterminate() {
                    a.end + late_ms
                } else {
                    a.end
                }
            })
            .max()
            .unwrap_or(self.invoked())
    }

    /// The read's answer and the attempt that got it.
    fn read_result(&self) -> Option<&Attempt> {
        self.attempts
            .iter()
            .rev()
            .find(|a| matches!(a.reply, Reply::Value(_) | Reply::Miss))
    }

    fn ttl_secs(&self) -> u32 {
        match self.kind {
            OpKind::Set { ttl_secs, .. } => ttl_secs,
            _ => 0,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            OpKind::Set { value, ttl_secs: 0 } => {
                format!("set {}", String::from_utf8_lossy(value))
            }
            OpKind::Set { value, ttl_secs } => {
                format!("set {} ttl {ttl_secs}s", String::from_utf8_lossy(value))
            }
            OpKind::Read if self.final_read => "final read".to_string(),
            OpKind::Read => "read".to_string(),
            OpKind::Delete { id } => format!("delete id {id}"),
            OpKind::Incr { id } => format!("incr id {id}"),
        };
        write!(
            f,
            "op {} client {} {} {what}:",
            self.id, self.client, self.key
        )?;
        for a in &self.attempts {
            write!(
                f,
                " [node {} {}–{} ms: {}]",
                a.node, a.start, a.end, a.reply
            )?;
        }
        Ok(())
    }
}

/// A span during which a node could not answer: killed and not yet
/// listening again, or paused. The caller widens it by the time a node
/// needs to work off its backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outage {
    pub node: NodeId,
    pub from: Ms,
    pub to: Ms,
}

/// The bounds the rules above use.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// The most any node's clock may be off real time, in ms, either way.
    pub skew_ms: Ms,
    /// How long after the client gave up on an attempt it may still run.
    pub late_ms: Ms,
}

impl Bounds {
    /// After this, anything that starts is ordered after `op`.
    fn cutoff(&self, op: &Op) -> Ms {
        if op.indeterminate() {
            op.ran_by(self.late_ms) + 2 * self.skew_ms
        } else {
            op.acked().unwrap_or_else(|| op.ran_by(0))
        }
    }

    /// The earliest a TTL write may have expired on some replica.
    fn may_expire_from(&self, op: &Op) -> Option<Ms> {
        let ttl = op.ttl_secs();
        (ttl > 0)
            .then(|| (op.invoked() + u64::from(ttl) * 1000).saturating_sub(1000 + 2 * self.skew_ms))
    }

    /// When a TTL write has surely expired on every replica.
    fn expired_by(&self, op: &Op) -> Option<Ms> {
        let ttl = op.ttl_secs();
        (ttl > 0).then(|| op.ran_by(self.late_ms) + u64::from(ttl) * 1000 + 2 * self.skew_ms)
    }
}

/// A kind of anomaly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Lost,
    Resurrected,
    DoubleApplied,
    Bogus,
    Hung,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 5] = [
        Kind::Lost,
        Kind::Resurrected,
        Kind::DoubleApplied,
        Kind::Bogus,
        Kind::Hung,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Lost => "lost",
            Kind::Resurrected => "resurrected",
            Kind::DoubleApplied => "double-applied",
            Kind::Bogus => "bogus",
            Kind::Hung => "hung",
        }
    }
}

/// One thing that must not happen, and the operations that show it.
#[derive(Clone, Debug)]
pub struct Anomaly {
    pub kind: Kind,
    pub key: String,
    /// What happened, in words, with times.
    pub what: String,
    /// The operations involved (ids), the one that saw it first.
    pub ops: Vec<usize>,
}

/// Finds every anomaly in `ops`, given when nodes were out.
pub fn check(ops: &[Op], outages: &[Outage], bounds: &Bounds) -> Vec<Anomaly> {
    let mut found = Vec::new();
    check_replies(ops, outages, &mut found);
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, ops) in by_key {
        if ops.iter().any(|o| matches!(o.kind, OpKind::Incr { .. })) {
            check_counter(key, &ops, &mut found);
        } else {
            check_register(key, &ops, bounds, &mut found);
        }
    }
    found
}

/// Hung attempts, unanswered final reads and impossible replies.
fn check_replies(ops: &[Op], outages: &[Outage], found: &mut Vec<Anomaly>) {
    for op in ops {
        for a in &op.attempts {
            let node_out = outages
                .iter()
                .any(|o| o.node == a.node && o.from <= a.end && a.start <= o.to);
            if a.reply == Reply::Timeout && !node_out {
                found.push(Anomaly {
                    kind: Kind::Hung,
                    key: op.key.clone(),
                    what: format!(
                        "node {} was up but did not answer within {} ms (from {} ms)",
                        a.node,
                        a.end - a.start,
                        a.start
                    ),
                    ops: vec![op.id],
                });
            }
            if let Reply::Unexpected(r) = &a.reply {
                found.push(Anomaly {
                    kind: Kind::Bogus,
                    key: op.key.clone(),
                    what: format!("node {} answered {r:?}", a.node),
                    ops: vec![op.id],
                });
            }
        }
        if op.final_read && op.read_result().is_none() {
            found.push(Anomaly {
                kind: Kind::Hung,
                key: op.key.clone(),
                what: "no answer to a read after every fault healed".into(),
                ops: vec![op.id],
            });
        }
    }
}

/// A read of the key: a read op's answer, or an `md` that found nothing.
struct Observation<'a> {
    op: &'a Op,
    start: Ms,
    end: Ms,
    value: Option<&'a [u8]>,
}

fn observations<'a>(ops: &[&'a Op]) -> Vec<Observation<'a>> {
    let mut seen = Vec::new();
    for &op in ops {
        match op.kind {
            OpKind::Read => {
                if let Some(a) = op.read_result() {
                    let value = match &a.reply {
                        Reply::Value(v) => Some(v.as_slice()),
                        _ => None,
                    };
                    seen.push(Observation {
                        op,
                        start: a.start,
                        end: a.end,
                        value,
                    });
                }
            }
            OpKind::Delete { .. } => {
                for a in op.attempts.iter().filter(|a| a.reply == Reply::NotFound) {
                    seen.push(Observation {
                        op,
                        start: a.start,
                        end: a.end,
                        value: None,
                    });
                }
            }
            OpKind::Set { .. } | OpKind::Incr { .. } => {}
        }
    }
    seen
}

/// A register (or TTL) key: sets of unique values, deletes and reads.
fn check_register(key: &str, ops: &[&Op], b: &Bounds, found: &mut Vec<Anomaly>) {
    let mut by_value: HashMap<&[u8], &Op> = HashMap::new();
    for &op in ops {
        if let OpKind::Set { value, .. } = &op.kind {
            let previous = by_value.insert(value.as_slice(), op);
            assert!(previous.is_none(), "values must be unique per key");
        }
    }
    // Acknowledged mutations, by acknowledgement time, with the latest
    // start among those acknowledged so far: the strongest "everything
    // before this was replaced" witness for a read starting then.
    let mut acked: Vec<(Ms, &Op)> = ops
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Set { .. } | OpKind::Delete { .. }))
        .filter_map(|o| o.acked().map(|t| (t, *o)))
        .collect();
    acked.sort_by_key(|(t, o)| (*t, o.id));
    let mut latest_started: Vec<&Op> = Vec::with_capacity(acked.len());
    for (_, op) in &acked {
        let keep = match latest_started.last() {
            Some(last) if last.invoked() >= op.invoked() => *last,
            _ => op,
        };
        latest_started.push(keep);
    }
    let acked_sets: Vec<&Op> = acked
        .iter()
        .map(|(_, o)| *o)
        .filter(|o| matches!(o.kind, OpKind::Set { .. }))
        .collect();
    // What may hide a write: deletes and TTL writes that may have run.
    let hiders: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| o.maybe_applied())
        .filter(|o| matches!(o.kind, OpKind::Delete { .. }) || o.ttl_secs() > 0)
        .collect();

    for seen in observations(ops) {
        match seen.value {
            Some(value) => {
                let Some(&writer) = by_value.get(value) else {
                    found.push(Anomaly {
                        kind: Kind::Bogus,
                        key: key.into(),
                        what: format!(
                            "read {:?}, which no client wrote",
                            String::from_utf8_lossy(value)
                        ),
                        ops: vec![seen.op.id],
                    });
                    continue;
                };
                if writer
                    .attempts
                    .iter()
                    .all(|a| matches!(a.reply, Reply::NotSent(_)))
                {
                    found.push(Anomaly {
                        kind: Kind::Bogus,
                        key: key.into(),
                        what: "read a value that was never sent".into(),
                        ops: vec![seen.op.id, writer.id],
                    });
                    continue;
                }
                if writer.invoked() > seen.end {
                    found.push(Anomaly {
                        kind: Kind::Bogus,
                        key: key.into(),
                        what: format!(
                            "read at {}–{} ms a value first sent at {} ms",
                            seen.start,
                            seen.end,
                            writer.invoked()
                        ),
                        ops: vec![seen.op.id, writer.id],
                    });
                    continue;
                }
                check_value_read(key, &seen, writer, &acked, &latest_started, b, found);
            }
            None => check_miss(key, &seen, &acked_sets, &hiders, b, found),
        }
    }
}

/// A read that returned `writer`'s value: it must not have been replaced,
/// deleted or expired before the read began.
fn check_value_read(
    key: &str,
    seen: &Observation<'_>,
    writer: &Op,
    acked: &[(Ms, &Op)],
    latest_started: &[&Op],
    b: &Bounds,
    found: &mut Vec<Anomaly>,
) {
    let cutoff = b.cutoff(writer);
    let before = acked.partition_point(|(t, _)| *t < seen.start);
    if let Some(&replacer) = before.checked_sub(1).map(|i| &latest_started[i]) {
        if replacer.invoked() > cutoff && replacer.id != writer.id {
            let acked_at = replacer.acked().expect("acked");
            let (kind, what) = match (&replacer.kind, b.expired_by(replacer)) {
                (OpKind::Delete { .. }, _) => (
                    Kind::Resurrected,
                    format!("deleted (acknowledged at {acked_at} ms)"),
                ),
                (_, Some(t)) if t < seen.start => (
                    Kind::Resurrected,
                    format!(
                        "replaced by a TTL write (acknowledged at {acked_at} ms) that expired by {t} ms, which must not bring back what it replaced"
                    ),
                ),
                _ => (
                    Kind::Lost,
                    format!(
                        "replaced by a write acknowledged at {acked_at} ms that the read does not see"
                    ),
                ),
            };
            found.push(Anomaly {
                kind,
                key: key.into(),
                what: format!(
                    "read at {}–{} ms returned the value of op {}, {what}",
                    seen.start, seen.end, writer.id
                ),
                ops: vec![seen.op.id, writer.id, replacer.id],
            });
            return;
        }
    }
    if let Some(expired) = b.expired_by(writer) {
        if expired < seen.start {
            found.push(Anomaly {
                kind: Kind::Resurrected,
                key: key.into(),
                what: format!(
                    "read at {}–{} ms returned the value of op {}, which had expired by {expired} ms",
                    seen.start, seen.end, writer.id
                ),
                ops: vec![seen.op.id, writer.id],
            });
        }
    }
}

/// A read that found nothing: every write acknowledged before it began
/// must have been deleted or expired, or replaced by a TTL write that may
/// have expired.
fn check_miss(
    key: &str,
    seen: &Observation<'_>,
    acked_sets: &[&Op],
    hiders: &[&Op],
    b: &Bounds,
    found: &mut Vec<Anomaly>,
) {
    // Writes starting before this may be hidden by a delete or TTL write
    // that may have run after them and before the read ended. Times are
    // whole milliseconds: a tie may be either order.
    let hidden_before = hiders
        .iter()
        .filter(|h| h.invoked() <= seen.end)
        .filter(|h| b.may_expire_from(h).is_none_or(|t| t <= seen.end))
        .map(|h| b.cutoff(h))
        .max();
    // The latest such write is the most telling witness.
    let unexplained = acked_sets.iter().rev().find(|w| {
        w.acked().expect("acked") < seen.start
            && hidden_before.is_none_or(|h| w.invoked() > h)
            && b.may_expire_from(w).is_none_or(|t| t > seen.end)
    });
    if let Some(w) = unexplained {
        found.push(Anomaly {
            kind: Kind::Lost,
            key: key.into(),
            what: format!(
                "read at {}–{} ms found nothing, though op {} was acknowledged at {} ms and no delete or expiry can explain it",
                seen.start,
                seen.end,
                w.id,
                w.acked().expect("acked")
            ),
            ops: vec![seen.op.id, w.id],
        });
    }
}

/// A counter: created as 0 (acknowledged), then `ma` with request ids, then
/// read at the end.
fn check_counter(key: &str, ops: &[&Op], found: &mut Vec<Anomaly>) {
    let incrs: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| matches!(o.kind, OpKind::Incr { .. }))
        .collect();
    let mut first_answers: BTreeMap<u64, &Op> = BTreeMap::new();
    let mut acked = 0u64;
    let mut maybe = 0u64;
    for op in &incrs {
        let numbers: Vec<u64> = op
            .attempts
            .iter()
            .filter_map(|a| match a.reply {
                Reply::Number(n) => Some(n),
                _ => None,
            })
            .collect();
        if let Some(&first) = numbers.first() {
            acked += 1;
            if let Some(&other) = numbers.iter().find(|&&n| n != first) {
                found.push(Anomaly {
                    kind: Kind::DoubleApplied,
                    key: key.into(),
                    what: format!("a retry answered {other}, the first attempt {first}"),
                    ops: vec![op.id],
                });
            }
            if let Some(twin) = first_answers.insert(first, op) {
                found.push(Anomaly {
                    kind: Kind::Lost,
                    key: key.into(),
                    what: format!(
                        "two increments both answered {first}: one counted on a stale counter"
                    ),
                    ops: vec![twin.id, op.id],
                });
            }
        }
        if op.maybe_applied() {
            maybe += 1;
        }
        if op.attempts.iter().any(|a| a.reply == Reply::NotFound) {
            found.push(Anomaly {
                kind: Kind::Lost,
                key: key.into(),
                what: "the counter, created acknowledged, was not found".into(),
                ops: vec![op.id],
            });
        }
    }
    if let Some((&highest, op)) = first_answers.iter().next_back() {
        if highest > maybe {
            found.push(Anomaly {
                kind: Kind::DoubleApplied,
                key: key.into(),
                what: format!(
                    "an increment answered {highest}, but at most {maybe} increments may have run"
                ),
                ops: vec![op.id],
            });
        }
    }
    let Some((read, attempt)) = ops
        .iter()
        .filter(|o| o.final_read)
        .find_map(|o| o.read_result().map(|a| (o, a)))
    else {
        return; // no final read: reported as hung
    };
    let value = match &attempt.reply {
        Reply::Value(v) => v,
        _ => {
            found.push(Anomaly {
                kind: Kind::Lost,
                key: key.into(),
                what: format!("the counter is gone at the end ({acked} increments acknowledged)"),
                ops: vec![read.id],
            });
            return;
        }
    };
    let Some(total) = std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        found.push(Anomaly {
            kind: Kind::Bogus,
            key: key.into(),
            what: format!("the counter reads {:?}", String::from_utf8_lossy(value)),
            ops: vec![read.id],
        });
        return;
    };
    if total > maybe {
        found.push(Anomaly {
            kind: Kind::DoubleApplied,
            key: key.into(),
            what: format!(
                "the counter ends at {total}, but at most {maybe} increments may have run ({acked} acknowledged)"
            ),
            ops: vec![read.id],
        });
    }
    if total < acked {
        found.push(Anomaly {
            kind: Kind::Lost,
            key: key.into(),
            what: format!("the counter ends at {total}, but {acked} increments were acknowledged"),
            ops: vec![read.id],
        });
    }
}

/// The anomaly with its operations and, for context, the other operations
/// on the key around them (at most `context_max`) and the outages then.
pub fn describe(anomaly: &Anomaly, ops: &[Op], outages: &[Outage], context_max: usize) -> String {
    let by_id: HashMap<usize, &Op> = ops.iter().map(|o| (o.id, o)).collect();
    let involved: Vec<&Op> = anomaly
        .ops
        .iter()
        .filter_map(|id| by_id.get(id).copied())
        .collect();
    let from = involved.iter().map(|o| o.invoked()).min().unwrap_or(0);
    let to = involved
        .iter()
        .flat_map(|o| o.attempts.iter().map(|a| a.end))
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "{} on key {}: {}\n",
        anomaly.kind.name(),
        anomaly.key,
        anomaly.what
    );
    for op in &involved {
        let _ = writeln!(out, "  * {op}");
    }
    let context: Vec<&Op> = ops
        .iter()
        .filter(|o| o.key == anomaly.key && !anomaly.ops.contains(&o.id))
        .filter(|o| {
            o.invoked() <= to + 1000 && o.attempts.last().is_some_and(|a| a.end + 1000 >= from)
        })
        .collect();
    for op in context.iter().take(context_max) {
        let _ = writeln!(out, "    {op}");
    }
    if context.len() > context_max {
        let _ = writeln!(
            out,
            "    … {} more on this key then",
            context.len() - context_max
        );
    }
    for o in outages
        .iter()
        .filter(|o| o.from <= to + 1000 && o.to + 1000 >= from)
    {
        let _ = writeln!(out, "    node {} out {}–{} ms", o.node, o.from, o.to);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXACT: Bounds = Bounds {
        skew_ms: 0,
        late_ms: 0,
    };

    /// Builds histories by hand: ops on key `k`, one attempt each unless
    /// given more.
    #[derive(Default)]
    struct H {
        ops: Vec<Op>,
    }

    impl H {
        fn op(&mut self, kind: OpKind, attempts: &[(Ms, Ms, Reply)]) -> usize {
            let id = self.ops.len();
            self.ops.push(Op {
                id,
                client: 0,
                key: "k".into(),
                kind,
                attempts: attempts
                    .iter()
                    .map(|(start, end, reply)| Attempt {
                        node: 1,
                        start: *start,
                        end: *end,
                        reply: reply.clone(),
                    })
                    .collect(),
                final_read: false,
            });
            id
        }

        fn set(&mut self, value: &str, ttl_secs: u32, start: Ms, end: Ms, reply: Reply) -> usize {
            let kind = OpKind::Set {
                value: value.into(),
                ttl_secs,
            };
            self.op(kind, &[(start, end, reply)])
        }

        fn read(&mut self, start: Ms, end: Ms, value: Option<&str>) -> usize {
            let reply = value.map_or(Reply::Miss, |v| Reply::Value(v.into()));
            self.op(OpKind::Read, &[(start, end, reply)])
        }

        fn delete(&mut self, start: Ms, end: Ms, reply: Reply) -> usize {
            let id = format!("d{}", self.ops.len());
            self.op(OpKind::Delete { id }, &[(start, end, reply)])
        }

        fn incr(&mut self, id: &str, attempts: &[(Ms, Ms, Reply)]) -> usize {
            self.op(OpKind::Incr { id: id.into() }, attempts)
        }

        fn final_read(&mut self, at: Ms, value: Option<&str>) -> usize {
            let id = self.read(at, at + 1, value);
            self.ops[id].final_read = true;
            id
        }

        /// The kinds found, with node 1 (every attempt's) out all along,
        /// so timeouts are not hung (that rule has its own test).
        fn kinds(&self, bounds: &Bounds) -> Vec<Kind> {
            let out = Outage {
                node: 1,
                from: 0,
                to: Ms::MAX,
            };
            let mut kinds: Vec<Kind> = check(&self.ops, &[out], bounds)
                .iter()
                .map(|a| a.kind)
                .collect();
            kinds.sort();
            kinds
        }
    }

    #[test]
    fn a_read_sees_the_last_acknowledged_write_or_a_later_one() {
        let mut h = H::default();
        h.set("a", 0, 0, 10, Reply::Stored);
        h.set("b", 0, 20, 30, Reply::Stored);
        h.read(40, 50, Some("b"));
        // Concurrent writes: either order is fine.
        h.set("c", 0, 60, 100, Reply::Stored);
        h.set("d", 0, 70, 80, Reply::Stored);
        h.read(110, 120, Some("c"));
        h.read(130, 140, Some("d"));
        // A read concurrent with a write may see it or not.
        h.set("e", 0, 150, 200, Reply::Stored);
        h.read(160, 170, Some("e"));
        h.read(175, 180, Some("d"));
        assert_eq!(h.kinds(&EXACT), vec![]);
    }

    #[test]
    fn an_older_value_after_an_acknowledged_write_is_lost() {
        let mut h = H::default();
        let a = h.set("a", 0, 0, 10, Reply::Stored);
        let b = h.set("b", 0, 20, 30, Reply::Stored);
        let r = h.read(40, 50, Some("a"));
        let found = check(&h.ops, &[], &EXACT);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, Kind::Lost);
        assert_eq!(found[0].ops, vec![r, a, b]);
        let text = describe(&found[0], &h.ops, &[], 10);
        assert!(text.starts_with("lost on key k"), "{text}");
    }

    #[test]
    fn a_miss_after_an_acknowledged_write_is_lost_unless_deleted_or_expired() {
        let mut h = H::default();
        h.set("a", 0, 0, 10, Reply::Stored);
        h.read(20, 30, None);
        assert_eq!(h.kinds(&EXACT), vec![Kind::Lost]);

        // A delete that may have run in between explains it, acknowledged
        // or not; a delete that found nothing is a read of a miss.
        let mut h = H::default();
        h.set("a", 0, 0, 10, Reply::Stored);
        h.delete(12, 15, Reply::Timeout);
        h.read(20, 30, None);
        assert_eq!(h.kinds(&EXACT), vec![]);
        let mut h = H::default();
        h.set("a", 0, 0, 10, Reply::Stored);
        h.delete(12, 15, Reply::NotFound);
        assert_eq!(h.kinds(&EXACT), vec![Kind::Lost]);
        // A delete sent in the same millisecond as the read ended may have
        // run first.
        let mut h = H::default();
        h.set("a", 0, 0, 10, Reply::Stored);
        h.read(20, 30, None);
        h.delete(30, 31, Reply::Deleted);
        assert_eq!(h.kinds(&EXACT), vec![]);
        // A delete that ended before the write began explains nothing.
        let mut h = H::default();
        h.delete(0, 5, Reply::Deleted);
        h.set("a", 0, 10, 20, Reply::Stored);
        h.read(30, 40, None);
        assert_eq!(h.kinds(&EXACT), vec![Kind::Lost]);

        // Its own TTL: from ttl − 1 s after it began (exact clocks).
        let mut h = H::default();
        h.set("a", 3, 0, 10, Reply::Stored);
        h.read(100, 110, None);
        h.read(2000, 2010, None);
        assert_eq!(h.kinds(&EXACT), vec![Kind::Lost]);
        // With clocks 1.5 s off, a 3 s TTL may be gone at once.
        let skewed = Bounds {
            skew_ms: 1500,
            late_ms: 0,
        };
        assert_eq!(h.kinds(&skewed), vec![]);
        // A later TTL write that may have expired explains it too, once it
        // may have.
        let mut h = H::default();
        h.set("a", 0, 0, 10, Reply::Stored);
        h.set("b", 2, 20, 30, Reply::Stored);
        h.read(100, 110, None);
        h.read(1500, 1510, None);
        assert_eq!(h.kinds(&EXACT), vec![Kind::Lost]);
    }

    #[test]
    fn a_value_back_after_a_delete_or_its_expiry_is_resurrected() {
        let mut h = H::default();
        h.set("a", 0, 0, 10, Reply::Stored);
        h.delete(20, 30, Reply::Deleted);
        h.read(40, 50, Some("a"));
        assert_eq!(h.kinds(&EXACT), vec![Kind::Resurrected]);

        let mut h = H::default();
        h.set("a", 1, 0, 10, Reply::Stored);
        h.read(500, 510, Some("a"));
        h.read(2000, 2010, Some("a"));
        assert_eq!(h.kinds(&EXACT), vec![Kind::Resurrected]);
        // Clocks 1.5 s off may keep it 3 s longer, but not 4.
        let skewed = Bounds {
            skew_ms: 1500,
            late_ms: 0,
        };
        assert_eq!(h.kinds(&skewed), vec![]);
        h.read(4100, 4110, Some("a"));
        assert_eq!(h.kinds(&skewed), vec![Kind::Resurrected]);

        // Issue 15 #2: an expired write brings back the value it replaced.
        let mut h = H::default();
        h.set("old", 0, 0, 10, Reply::Stored);
        h.set("new", 2, 20, 30, Reply::Stored);
        h.read(40, 50, Some("new"));
        h.read(3000, 3010, Some("old"));
        assert_eq!(h.kinds(&EXACT), vec![Kind::Resurrected]);
        // Before the new value has surely expired, the old one coming back
        // is the new one lost (had it expired, it would be resurrected).
        h.read(1000, 1010, Some("old"));
        assert_eq!(h.kinds(&EXACT), vec![Kind::Lost, Kind::Resurrected]);
    }

    #[test]
    fn an_indeterminate_write_may_run_late_but_not_forever() {
        let bounds = Bounds {
            skew_ms: 1500,
            late_ms: 1000,
        };
        let mut h = H::default();
        // Timed out at 5 s: may run until 6 s and carry a version up to
        // 1.5 s ahead, so it may still beat a write started before 9 s.
        h.set("x", 0, 0, 5000, Reply::Timeout);
        h.set("w", 0, 8000, 8010, Reply::Stored);
        h.read(8100, 8110, Some("x"));
        assert_eq!(h.kinds(&bounds), vec![]);
        h.set("v", 0, 9100, 9110, Reply::Stored);
        h.read(9200, 9210, Some("x"));
        assert_eq!(h.kinds(&bounds), vec![Kind::Lost]);
        // A retry that succeeded does not make the first attempt certain.
        let mut h = H::default();
        let kind = OpKind::Set {
            value: "x".into(),
            ttl_secs: 0,
        };
        h.op(
            kind,
            &[(0, 5000, Reply::Timeout), (5010, 5020, Reply::Stored)],
        );
        h.set("w", 0, 6000, 6010, Reply::Stored);
        h.read(6100, 6110, Some("x"));
        assert_eq!(h.kinds(&bounds), vec![]);
        // A write that was never sent cannot be read.
        let mut h = H::default();
        h.set("a", 0, 0, 10, Reply::Stored);
        h.set("x", 0, 20, 21, Reply::NotSent("refused".into()));
        h.read(30, 40, Some("x"));
        assert_eq!(h.kinds(&bounds), vec![Kind::Bogus]);
    }

    #[test]
    fn values_never_written_are_bogus() {
        let mut h = H::default();
        h.set("a", 0, 0, 10, Reply::Stored);
        h.read(20, 30, Some("zzz"));
        h.read(40, 50, Some("later"));
        h.set("later", 0, 60, 70, Reply::Stored);
        assert_eq!(h.kinds(&EXACT), vec![Kind::Bogus, Kind::Bogus]);
        let mut h = H::default();
        h.set("a", 0, 0, 10, Reply::Unexpected("NOT_STORED".into()));
        assert_eq!(h.kinds(&EXACT), vec![Kind::Bogus]);
    }

    #[test]
    fn a_timeout_from_a_node_that_was_up_is_hung() {
        let mut h = H::default();
        h.read(0, 5000, None);
        h.ops[0].attempts[0].reply = Reply::Timeout;
        let out = Outage {
            node: 1,
            from: 4000,
            to: 9000,
        };
        let other = Outage { node: 2, ..out };
        assert_eq!(check(&h.ops, &[out], &EXACT).len(), 0);
        let found = check(&h.ops, &[other], &EXACT);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, Kind::Hung);
        // A final read that never got an answer is hung too.
        let mut h = H::default();
        h.final_read(0, None);
        h.ops[0].attempts[0].reply = Reply::ServerError("read quorum not met".into());
        assert_eq!(h.kinds(&EXACT), vec![Kind::Hung]);
    }

    fn counter(final_value: &str, extra: impl FnOnce(&mut H)) -> Vec<Kind> {
        let mut h = H::default();
        h.set("0", 0, 0, 1, Reply::Stored);
        h.incr("i1", &[(10, 20, Reply::Number(1))]);
        h.incr(
            "i2",
            &[(30, 5030, Reply::Timeout), (5040, 5050, Reply::Number(2))],
        );
        h.incr(
            "i3",
            &[(60, 5060, Reply::ServerError("write quorum not met".into()))],
        );
        extra(&mut h);
        h.final_read(9000, Some(final_value));
        h.kinds(&EXACT)
    }

    #[test]
    fn counters_count_each_id_once() {
        // i3 may or may not have run.
        assert_eq!(counter("2", |_| {}), vec![]);
        assert_eq!(counter("3", |_| {}), vec![]);
        assert_eq!(counter("4", |_| {}), vec![Kind::DoubleApplied]);
        assert_eq!(counter("1", |_| {}), vec![Kind::Lost]);
        assert_eq!(counter("x", |_| {}), vec![Kind::Bogus]);
        // A retry must answer what the first attempt answered.
        let retried = |h: &mut H| {
            h.incr(
                "i4",
                &[(100, 110, Reply::Number(3)), (120, 130, Reply::Number(4))],
            );
        };
        assert_eq!(counter("4", retried), vec![Kind::DoubleApplied]);
        // Two ids answering the same number: one increment was lost.
        let twins = |h: &mut H| {
            h.incr("i4", &[(100, 110, Reply::Number(2))]);
        };
        assert_eq!(counter("3", twins), vec![Kind::Lost]);
        // An answer past what may have run.
        let past = |h: &mut H| {
            h.incr("i4", &[(100, 110, Reply::Number(9))]);
        };
        assert_eq!(counter("4", past), vec![Kind::DoubleApplied]);
        // The counter gone.
        let mut h = H::default();
        h.set("0", 0, 0, 1, Reply::Stored);
        h.incr("i1", &[(10, 20, Reply::NotFound)]);
        h.final_read(100, None);
        assert_eq!(h.kinds(&EXACT), vec![Kind::Lost, Kind::Lost]);
    }
}
