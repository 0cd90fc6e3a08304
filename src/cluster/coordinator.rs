//! The coordinator: any node accepts any request and sees it through.
//!
//! - **Writes** go to the key's primary: the first reachable node of its
//!   preference list. The primary executes the command on its own store
//!   (the shard lock serialises read-modify-write operations per key), which
//!   stamps the new version and turns a relative TTL into an absolute one,
//!   then ships the resulting *state* to the other replicas and answers once
//!   `W` replicas, itself included, hold it. Fewer: `SERVER_ERROR`, never a
//!   false `STORED`.
//! - **Reads** ask the replicas, wait for `R` answers and return the newest
//!   version. With `R = 1` a replica answers from its own memory.
//! - A replica that does not answer within the hop timeout is passed over; a
//!   peer the transport knows to be down is skipped without waiting.
//!
//! Commands travel as raw protocol bytes, so a command runs through exactly
//! the single-node code wherever it runs (see [`super::message`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::join_all;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use xxhash_rust::xxh3::xxh3_64;

use super::anti_entropy;
use super::hints::{HintLimits, HintStore};
use super::layout::{EPOCH_LIMIT, Layout, LayoutDesc, Topology};
use super::message::{PeerRequest, PeerResponse};
use super::paxos::{Acceptor, Ask, Ballot, Outcome, Proposer, Vote};
use super::quorum::{Decision, Need, Quorum};
use super::ring::NodeId;
use super::transport::{CallError, EpochCell, Peer, PeerState, TransportStats};
use crate::budget::{InflightBudget, Reservation};
use crate::config::{ClusterConfig, MemberConfig};
use crate::protocol::cluster_admin::ClusterCmd;
use crate::protocol::get::{Get, compose_end, compose_value};
use crate::protocol::meta::{MetaRequest, hints};
use crate::protocol::stats::put_stat;
use crate::protocol::{ParseLimits, Parsed, Refused, Request, parse, put_line};
use crate::store::{Applied, Condition, Fill, KeyState, Mode, Store, hlc, valid_key};

mod handoff;
mod listing;
mod repair;

/// Bound on the waits for the clock to leave a flush's millisecond (each
/// waits about a millisecond; a clock that does not move is a test clock).
const FLUSH_CLOCK_WAITS_MAX: usize = 10;

/// Bytes of values one replica puts in one read answer (at least one key
/// always goes in); well inside the transport's 4 MiB frame.
const READ_ANSWER_BYTES_MAX: usize = 1024 * 1024;

/// A multi-get's local reads let other connections run after this many
/// bytes copied (a 64 MiB reply would otherwise hold a worker thread for
/// the whole copy).
const LOCAL_READ_TURN_BYTES: usize = 1024 * 1024;

/// A cluster multi-get gathers its replicas' answers before replying
/// (newest wins per key), so its reply is bounded: past this, the client
/// gets a `SERVER_ERROR` asking it to split the request.
const MULTI_GET_REPLY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// How often held hints are offered to their replicas, and how many per
/// replica per pass.
const HINT_DELIVERY_INTERVAL_MS: u64 = 200;
const HINT_DELIVERY_BATCH: usize = 256;
const HINT_DELIVERY_BATCHES_PER_PASS: usize = 64;

/// Refill after a start: page size, how long to wait for each peer to come
/// up, and how often to retry a page before giving up on that peer.
const REFILL_PAGE_ITEMS: usize = 1024;
const REFILL_PAGE_BYTES: usize = 1024 * 1024;
const REFILL_POLL_MS: u64 = 50;
const REFILL_WAIT_FOR_PEER_POLLS: usize = 100;
const REFILL_RETRIES_MAX: usize = 5;

/// Times a write is sent, each under a newer layout than the last, when
/// its primary refuses it for a newer layout.
const WRITE_LAYOUT_ATTEMPTS_MAX: usize = 2;

/// A fetch of a peer's layout that failed is not repeated for the same
/// peer and epoch sooner than this.
const LAYOUT_REFETCH_AFTER: Duration = Duration::from_secs(1);

/// Tries of one proposal that another proposer preempts.
const PROPOSE_TRIES_MAX: usize = 8;

/// How long a member asked to admit a joiner keeps proposing while the
/// members cannot decide yet (recovering, or another change first), and
/// how long it works on one join in all: below the joiner's own wait
/// (`JOIN_TIMEOUT`, 15 s), so the joiner hears why.
const JOIN_DECIDE_WAIT: Duration = Duration::from_secs(10);

/// Why [`Cluster::propose`] did not make a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecided {
    /// For the operator.
    pub why: String,
    /// Whether the same change may succeed if asked again (too few voters
    /// now, another change first, an unknown outcome), as opposed to one
    /// the layout refuses.
    pub retry: bool,
}

/// Refuses a change of `base` while partitions move, naming the move.
fn no_move_pending(base: &Layout) -> Result<(), String> {
    match &base.target {
        None => Ok(()),
        Some(_) => Err(format!(
            "a change is pending: {} (epoch {}); wait until it settles (transfers_pending 0) or run 'cluster cancel'",
            describe_move(base),
            base.epoch
        )),
    }
}

/// The move under way in `layout`, in words.
fn describe_move(layout: &Layout) -> String {
    let (joining, leaving) = layout.movers();
    let mut parts = Vec::new();
    if !joining.is_empty() {
        parts.push(format!("node {joining:?} takes partitions"));
    }
    if !leaving.is_empty() {
        parts.push(format!("node {leaving:?} hands its partitions off"));
    }
    if parts.is_empty() {
        parts.push("partitions move".into());
    }
    parts.join(", ")
}

/// A layout in words, for an operator reading an error.
fn describe(d: &LayoutDesc) -> String {
    let ids: Vec<String> = d.members.iter().map(|m| m.0.to_string()).collect();
    let standby: Vec<String> = d.standby.iter().map(ToString::to_string).collect();
    format!(
        "members {}{} N={} R={} W={}{}",
        ids.join(","),
        if standby.is_empty() {
            String::new()
        } else {
            format!(" (standby {})", standby.join(","))
        },
        d.replicas,
        d.read_quorum,
        d.write_quorum,
        d.target
            .as_ref()
            .map_or(String::new(), |t| format!(", partitions moving to {t:?}"))
    )
}

/// How long a node removed from the layout waits for the other members to
/// install that layout before it stops.
const REMOVED_WAIT: Duration = Duration::from_secs(10);

/// The layout follower checks for a newer layout at least this often.
const LAYOUT_FOLLOW_INTERVAL_MS: u64 = 1000;

/// gat/gats keys touched at once, each at its own primary.
const TOUCH_KEYS_IN_FLIGHT: usize = 64;

/// Times a primary executes one command when replicas keep answering that
/// they hold a newer state (see [`Cluster::execute_as_primary`]). Each
/// attempt takes the newer state first, so a second one normally succeeds;
/// two primaries writing one key at once (a split view) can each make the
/// other's attempt lose several times, and the bound stops them racing on
/// one key forever.
const WRITE_ATTEMPTS_MAX: usize = 8;

/// Locks that serialise a primary's read-modify-writes per key (a key takes
/// the lock its hash picks). A power of two.
const RMW_LOCKS: usize = 4096;

/// Times a replica re-reads a meta get whose key changed while it ran, so
/// the reply and the version it reports belong together.
const META_READ_ATTEMPTS_MAX: usize = 3;

/// What became of one replica's copy of a write.
enum ReplicaCopy {
    Applied,
    /// The replica holds a newer state than the one sent: this one.
    Newer(KeyState),
    /// Not confirmed by the replica; held as a hint for it.
    Hinted,
    /// The replica is at a newer layout epoch than the write was placed
    /// under: refused unapplied, and not hinted (the newer layout may
    /// place the key elsewhere).
    Stale(u64),
    /// Neither the replica nor a hint holder took it.
    Failed {
        why: String,
        timed_out: bool,
    },
}

/// Why a write did not reach its W replicas.
enum NotReplicated {
    /// Too few replicas (or hint holders) took it; why.
    Quorum(String),
    /// A replica holds this state, newer than the one sent.
    Newer(KeyState),
    /// Replica `node` is at layout `epoch`, past the one the write was
    /// placed under, and refused it unapplied.
    Stale {
        /// The replica.
        node: NodeId,
        /// Its epoch.
        epoch: u64,
    },
}

/// What the coordinator needs from the node it runs in: its store and the
/// single-node executor. The server implements it; keeping it a trait keeps
/// the layers one-way (the cluster never reaches up into the server).
pub trait Local: Send + Sync + 'static {
    /// The node's store.
    fn store(&self) -> &Store;
    /// The limits the node parses client commands with, also used to parse
    /// commands forwarded to it.
    fn limits(&self) -> &ParseLimits;
    /// The key that authenticates listing tokens (the same on every node).
    fn listing_key(&self) -> &crate::cluster::listing::TokenKey;
    /// Executes one complete command exactly as a single node would and
    /// appends its reply.
    fn execute(&self, command: &[u8], out: &mut Vec<u8>);
    /// The node's in-flight budget, which gathered answers hold.
    fn budget(&self) -> &Arc<InflightBudget>;
}

/// A connection to one other member, carrying [`PeerRequest`]s.
pub type PeerHandle = Peer<PeerRequest, PeerResponse>;

/// Makes the handle that reaches a member (see [`Cluster::new`]).
pub type SpawnPeer = Box<dyn Fn(&MemberConfig) -> PeerHandle + Send + Sync>;

/// One replica's answer for one key: its version and `VALUE` block, or a miss.
type KeyAnswer = Option<(u64, Vec<u8>)>;

/// Anti-entropy with one peer (run by the lower id of the pair), for
/// `stats cluster`'s member lines and `webvac cluster repair`.
#[derive(Debug, Default)]
pub struct PairRepair {
    /// The clock's ms when the last exchange completed; 0: never.
    pub last_ms: AtomicU64,
    /// Exchanges completed.
    pub exchanges: AtomicU64,
    /// Keys pulled from and pushed to the peer.
    pub keys_moved: AtomicU64,
}

/// Counters for `stats cluster`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Client commands sent on to another node's primary.
    pub forwarded: AtomicU64,
    /// Commands this node executed as a key's primary.
    pub primary_writes: AtomicU64,
    /// Item states shipped to replicas.
    pub replica_writes_sent: AtomicU64,
    /// Item states received and applied (newer than ours).
    pub replica_writes_applied: AtomicU64,
    /// Item states received that were older than ours (answered with ours,
    /// not counted as held).
    pub replica_writes_stale: AtomicU64,
    /// Writes a primary executed again because a replica held a newer
    /// state than the one it had just stamped (a clock behind, or a write
    /// it missed while paused or cut off).
    pub write_conflicts: AtomicU64,
    /// Replicated states and flushes refused for a version too far ahead
    /// of this node's clock (see the store's counter for all of them).
    pub versions_refused: AtomicU64,
    /// Read-modify-writes that gave up after a conflict and re-sent the
    /// state they had taken, to replace their abandoned attempts.
    pub write_restores: AtomicU64,
    /// Reads answered from more than this node's memory.
    pub quorum_reads: AtomicU64,
    /// Writes refused because fewer than W replicas acknowledged.
    pub write_quorum_failures: AtomicU64,
    /// Reads refused because fewer than R replicas answered.
    pub read_quorum_failures: AtomicU64,
    /// Peer calls that timed out.
    pub timeouts: AtomicU64,
    /// Read-modify-writes that first fetched the key from other replicas
    /// (a failed-over primary, or one that lost its memory).
    pub catch_up_reads: AtomicU64,
    /// Stale replicas sent the newest state after a read saw them differ.
    pub read_repairs: AtomicU64,
    /// States pulled from peers by the refill after a start.
    pub refill_keys: AtomicU64,
    /// Key and value bytes of the states the refill pulled.
    pub refill_bytes: AtomicU64,
    /// Peers the refill has finished with.
    pub refill_peers_done: AtomicU64,
    /// Anti-entropy rounds run.
    pub ae_rounds: AtomicU64,
    /// Partitions anti-entropy compared with a peer.
    pub ae_partitions_compared: AtomicU64,
    /// Compared partitions whose trees differed.
    pub ae_partitions_differing: AtomicU64,
    /// (key, version) entries listed from differing leaves.
    pub ae_keys_listed: AtomicU64,
    /// Keys anti-entropy found newer on (or only on) a peer, to pull.
    pub ae_keys_pulled: AtomicU64,
    /// Keys anti-entropy found newer on (or only on) this node, to push.
    pub ae_keys_pushed: AtomicU64,
    /// Bytes of every anti-entropy message, both ways.
    pub ae_bytes: AtomicU64,
    /// Repaired states not taken for lack of free memory (here or at the
    /// peer): repair does not evict.
    pub ae_no_room: AtomicU64,
    /// Exchanges cut short by a failed call.
    pub ae_errors: AtomicU64,
    /// Requests from a peer behind this node's layout, refused with
    /// `StaleEpoch`.
    pub stale_epoch_refused: AtomicU64,
    /// Layouts fetched from a peer ahead and installed.
    pub layouts_installed: AtomicU64,
    /// Keys pulled from current owners by a partition move (handoff).
    pub handoff_keys: AtomicU64,
    /// Key and value bytes of the keys the handoff pulled.
    pub handoff_bytes: AtomicU64,
    /// Copies dropped after their partitions moved away.
    pub handoff_keys_dropped: AtomicU64,
}

/// One node's view of the cluster and its request path.
pub struct Cluster {
    me: NodeId,
    /// The partition count, fixed for the life of the cluster.
    partitions: u32,
    /// The layout and the handles of its members, as one snapshot: a
    /// request loads it once and keeps it to its end.
    view: ArcSwap<Topology>,
    /// Held while a snapshot is installed: the epoch check and the store
    /// are one step.
    installing: Mutex<()>,
    /// Held while a layout is fetched from a peer (one at a time): the
    /// last fetch that failed, from which node, for which epoch, when.
    fetching: tokio::sync::Mutex<Option<(NodeId, u64, std::time::Instant)>>,
    /// Makes the handle that reaches a member of a newly installed layout.
    spawn_peer: SpawnPeer,
    /// The installed epoch, as this node's transport reports it.
    epoch: EpochCell,
    /// This node's vote in layout decrees. Starts recovering: a node
    /// cannot tell its first start from a restart, and after a restart it
    /// must not vote again where it may have voted before.
    acceptor: Mutex<Acceptor<LayoutDesc>>,
    /// The round of this node's next ballot.
    next_round: AtomicU64,
    /// One proposal from this node at a time.
    proposing: tokio::sync::Mutex<()>,
    hop_timeout: Duration,
    /// Hints this node holds for unreachable replicas.
    hints: Arc<Mutex<HintStore>>,
    /// Whether a hint counts toward W.
    sloppy_quorum: bool,
    /// Anti-entropy's settings; `None`: off.
    anti_entropy: Option<anti_entropy::Settings>,
    /// Request-path, refill and anti-entropy counters (`stats cluster`).
    pub stats: ClusterStats,
    /// Counters of the connections to and from peers, shared with them.
    pub transport: Arc<TransportStats>,
    /// A read-modify-write holds its key's lock from its catch-up to its
    /// reply ([`RMW_LOCKS`]).
    rmw_locks: Box<[tokio::sync::Mutex<()>]>,
    /// The epoch of a decided layout that no longer names this node: it
    /// left the cluster, and the server stops ([`Cluster::removed`]).
    removed: tokio::sync::watch::Sender<Option<u64>>,
    /// This node's part in partition moves ([`handoff`]).
    moves: Mutex<handoff::Moves>,
    /// Whether this node's store holds what it replicates: false while the
    /// refill after a start runs (a move does not pull from it then).
    warm: std::sync::atomic::AtomicBool,
    /// Handoff: bytes per second pulled from each source.
    handoff_rate: u64,
    /// The node's store, once its background work runs: a layout that
    /// gives this node partitions clears what it holds of them first.
    /// (Weak: the store's owner holds this cluster.)
    local: std::sync::OnceLock<std::sync::Weak<dyn Local>>,
    /// A node that joined and was never a member before: it holds nothing
    /// of the cluster's, and a move hands it its partitions, so it has
    /// nothing to refill.
    fresh: std::sync::atomic::AtomicBool,
    /// A [`Cluster::vote_again`] is under way.
    voting_again: std::sync::atomic::AtomicBool,
    /// Handoff: how long a move may run before its driver cancels it.
    handoff_timeout: Duration,
}

/// The error line for a classic command, or nothing when the client asked
/// for no reply (`noreply` hides errors too, as in memcached).
fn server_error(out: &mut Vec<u8>, silent: bool, why: &str) {
    if !silent {
        out.extend_from_slice(b"SERVER_ERROR ");
        put_line(out, why.as_bytes());
    }
}

/// Whether a request's meaning depends on the caller's placement of its
/// key (which node is primary, which nodes are replicas): those are
/// refused from a caller behind this node's layout. Repair, listing,
/// refill and hints are checked against this node's own layout instead.
fn placed_by_caller(request: &PeerRequest) -> bool {
    matches!(
        request,
        PeerRequest::Execute { .. }
            | PeerRequest::Hint { .. }
            | PeerRequest::ReadKeys { .. }
            | PeerRequest::ReadMeta { .. }
            | PeerRequest::Fetch { .. }
            | PeerRequest::Apply { .. }
            | PeerRequest::ApplyIf { .. }
            // A handoff is planned on the layout of its epoch (a refill's
            // scan is not: it takes what the source's layout says).
            | PeerRequest::Scan { moving: true, .. }
    )
}

/// Whether `me` is a replica of `key` (on its preference list) in `layout`.
fn holds(layout: &Layout, me: NodeId, key: &[u8]) -> bool {
    layout.ring.preference_list_for_key(key).contains(&me)
}

/// What a request asks of the cluster.
enum Plan<'r> {
    /// Runs on this node alone (stats, version, errors, ...).
    Local,
    /// get / gets: a quorum read of every key.
    Read {
        get: &'r Get<'r>,
    },
    /// gat / gats: a write (the touch) per key at its primary.
    TouchRead {
        get: &'r Get<'r>,
    },
    /// A meta get that changes nothing: quorum read of one key.
    MetaRead {
        key: &'r [u8],
    },
    /// Any other single-key command: executed by the key's primary.
    Write {
        key: &'r [u8],
        silent: bool,
    },
    /// A store refused before its value was read (too large, or no
    /// in-flight memory to buffer it) that drops the key's old value, as
    /// memcached's does: the removal is a delete through the key's primary,
    /// replicated, so no replica keeps serving the value the client meant
    /// to replace.
    RefusedStore {
        key: &'r [u8],
    },
    FlushAll {
        delay_secs: i64,
        silent: bool,
    },
    ClusterStats,
    /// `stats partitions`: a digest of what this node holds per partition.
    PartitionDigests,
    /// `lk`: a page of the whole cluster's keys.
    ListKeys {
        token: &'r [u8],
        count: usize,
    },
    /// `cluster <change>`: a layout decree; `None`: a malformed line.
    Admin(Option<&'r ClusterCmd>),
}

fn plan<'r>(request: &'r Request<'r>) -> Plan<'r> {
    match request {
        Request::Cluster(cmd) => Plan::Admin(cmd.as_ref()),
        Request::ListKeys(l) => Plan::ListKeys {
            token: l.token,
            count: l.count,
        },
        Request::Get(g) if g.fails_after_keys => Plan::Local,
        Request::Get(g) if g.touch.is_none() => Plan::Read { get: g },
        Request::Get(g) => Plan::TouchRead { get: g },
        // The single node's rule for which refused stores drop the old
        // value (`reject_write`): a plain set, and every meta set.
        Request::Storage(s) if s.refused.is_some() && s.mode == Mode::Set && s.cas.is_none() => {
            Plan::RefusedStore { key: s.key }
        }
        Request::Storage(s) if s.refused.is_some() => Plan::Local,
        Request::Storage(s) => Plan::Write {
            key: s.key,
            silent: s.noreply,
        },
        Request::Arith(a) => Plan::Write {
            key: a.key,
            silent: a.noreply,
        },
        Request::Delete(d) => Plan::Write {
            key: d.key,
            silent: d.noreply,
        },
        Request::Touch(t) => Plan::Write {
            key: t.key,
            silent: t.noreply,
        },
        Request::FlushAll(f) => Plan::FlushAll {
            delay_secs: f.delay,
            silent: f.noreply,
        },
        Request::Stats(crate::protocol::stats::StatsCmd::Group(b"cluster")) => Plan::ClusterStats,
        Request::Stats(crate::protocol::stats::StatsCmd::Group(b"partitions")) => {
            Plan::PartitionDigests
        }
        Request::Meta(m) => match m {
            MetaRequest::Get(g)
                if !(g.flags.has(b'N') || g.flags.has(b'T') || g.flags.has(b'R')) =>
            {
                Plan::MetaRead { key: &g.key }
            }
            MetaRequest::Get(g) => Plan::Write {
                key: &g.key,
                silent: false,
            },
            MetaRequest::Set(s) if s.refused.is_some() => Plan::RefusedStore { key: &s.key },
            MetaRequest::Set(s) => Plan::Write {
                key: &s.key,
                silent: false,
            },
            MetaRequest::Delete(d) => Plan::Write {
                key: &d.key,
                silent: false,
            },
            MetaRequest::Arith(a) => Plan::Write {
                key: &a.key,
                silent: false,
            },
            MetaRequest::Debug(_) | MetaRequest::Noop => Plan::Local,
        },
        _ => Plan::Local,
    }
}

/// Whether a command's outcome depends on the key's current state (so a
/// primary that may have missed writes must catch up first). A plain set
/// or delete does not.
fn reads_before_writing(request: &Request<'_>) -> bool {
    match request {
        Request::Storage(s) => s.mode != Mode::Set || s.cas.is_some(),
        Request::Delete(_) => false,
        Request::Meta(MetaRequest::Set(s)) => {
            s.mode != Mode::Set || s.flags.has(b'C') || s.flags.has(b'I')
        }
        Request::Meta(MetaRequest::Delete(d)) => d.flags.has(b'C') || d.flags.has(b'I'),
        _ => true,
    }
}

/// How many times each of `distinct` keys occurs, from [`distinct_keys`]'s
/// occurrences.
fn times_asked(occurrences: &[usize], distinct: usize) -> Vec<u64> {
    let mut times = vec![0u64; distinct];
    for &d in occurrences {
        times[d] += 1;
    }
    times
}

/// What a get-family request's answers hold so far, reserved from the
/// node's in-flight budget as they arrive: past [`MULTI_GET_REPLY_BYTES_MAX`]
/// or past the budget, nothing more is gathered.
struct Gathered {
    held: Mutex<Reservation>,
    /// Set once an answer did not fit: why.
    refused: std::sync::OnceLock<Refusal>,
}

/// Why a get-family reply was refused before it was built.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    OverCap,
    NoMemory,
}

impl Gathered {
    fn new(budget: &Arc<InflightBudget>) -> Self {
        Self {
            held: Mutex::new(Reservation::new(budget)),
            refused: std::sync::OnceLock::new(),
        }
    }

    /// Counts `bytes` more; false (and nothing held for them) if they do
    /// not fit, from then on.
    fn add(&self, bytes: usize) -> bool {
        if self.refused.get().is_some() {
            return false;
        }
        let mut held = self.held.lock();
        let total = held.bytes() + bytes;
        let refusal = if total > MULTI_GET_REPLY_BYTES_MAX {
            Refusal::OverCap
        } else if !held.hold(total) {
            Refusal::NoMemory
        } else {
            return true;
        };
        let _ = self.refused.set(refusal);
        false
    }

    /// Whether more may be gathered.
    fn open(&self) -> bool {
        self.refused.get().is_none()
    }

    /// The reply to a refused request, `what` naming it ("multi-get",
    /// "gat"); false if nothing was refused.
    fn answer_refusal(&self, out: &mut Vec<u8>, what: &str) -> bool {
        match self.refused.get() {
            None => false,
            Some(Refusal::OverCap) => {
                server_error(
                    out,
                    false,
                    &format!(
                        "{what} reply over {} MiB in a cluster; split the request",
                        MULTI_GET_REPLY_BYTES_MAX >> 20
                    ),
                );
                true
            }
            // memcached's words when it cannot hold a get's reply.
            Some(Refusal::NoMemory) => {
                server_error(out, false, "out of memory writing get response");
                true
            }
        }
    }
}

/// A get's distinct keys in first-seen order, and for each key as given
/// (repeats too) the index of its distinct key.
fn distinct_keys<'g>(get: &'g Get<'_>) -> (Vec<&'g [u8]>, Vec<usize>) {
    /// Up to this many keys, a scan of those seen beats hashing them.
    const SCAN_KEYS_MAX: usize = 16;
    let mut distinct: Vec<&[u8]> = Vec::new();
    let mut seen: std::collections::HashMap<&[u8], usize> = std::collections::HashMap::new();
    let occurrences = get
        .keys()
        .enumerate()
        .map(|(n, key)| {
            if n < SCAN_KEYS_MAX {
                if let Some(d) = distinct.iter().position(|&k| k == key) {
                    return d;
                }
                distinct.push(key);
                return distinct.len() - 1;
            }
            if seen.is_empty() {
                seen.extend(distinct.iter().enumerate().map(|(d, &k)| (k, d)));
            }
            *seen.entry(key).or_insert_with(|| {
                distinct.push(key);
                distinct.len() - 1
            })
        })
        .collect();
    (distinct, occurrences)
}

/// Whether a meta mutation carries a request id (`P` token item `i`).
fn carries_request_id(request: &Request<'_>) -> bool {
    hints::parse(meta_tokens(request)).is_ok_and(|h| h.request_id.is_some())
}

/// A node's `cmd_*` counters count the commands its clients sent, wherever
/// they ran: a write forwarded to another primary is counted here too.
fn count_forwarded(store: &Store, key: &[u8], request: &Request<'_>) {
    store.with_key(key, |ctx| {
        let st = ctx.stats();
        match request {
            Request::Storage(_) | Request::Meta(MetaRequest::Set(_)) => st.cmd_set += 1,
            Request::Touch(_) => st.cmd_touch += 1,
            Request::Meta(MetaRequest::Get(_)) => st.cmd_get += 1,
            _ => {}
        }
    });
}

/// `flush_all` on this node's store. An immediate flush also raises the
/// flush barrier to `version`, so replicated copies written before it and
/// still in flight are dropped when they arrive. (A delayed flush has no
/// barrier: it removes what is there when its time comes.)
/// Returns `false`, having done nothing, when `version` is further ahead of
/// this node's clock than the drift bound allows.
fn flush_local(store: &Store, delay_secs: i64, version: u64) -> bool {
    // Barrier first: a copy applied while the shards are being cleared is
    // then either cleared or refused, never kept.
    if delay_secs <= 0 && !store.set_flush_barrier(version) {
        return false;
    }
    store.flush_all(delay_secs);
    true
}

fn meta_tokens<'r>(request: &'r Request<'r>) -> &'r [&'r [u8]] {
    match request {
        Request::Meta(MetaRequest::Get(g)) => &g.flags.tokens,
        Request::Meta(MetaRequest::Set(s)) => &s.flags.tokens,
        Request::Meta(MetaRequest::Delete(d)) => &d.flags.tokens,
        Request::Meta(MetaRequest::Arith(a)) => &a.flags.tokens,
        _ => &[],
    }
}

/// Reads one key from the local store: its version and `VALUE` block; a
/// tombstone answers its version with an empty block (a delete that
/// outranks older copies elsewhere). `room` is asked for the block's size
/// before it is copied; `None` if it said no (nothing was copied then).
/// The value and the version come from one look under the key's lock, so
/// a write landing in between cannot pair a miss with a newer version.
fn read_local(
    store: &Store,
    key: &[u8],
    with_cas: bool,
    room: impl FnOnce(usize) -> bool,
) -> Option<KeyAnswer> {
    let mut fits = true;
    let answer = store
        .read_versioned(key, |e| {
            let bytes = key.len() + e.value().len() + 48;
            if !room(bytes) {
                fits = false;
                return Vec::new();
            }
            let mut block = Vec::with_capacity(bytes);
            let cas = with_cas.then_some(e.cas());
            compose_value(&mut block, key, e.flags(), e.value(), cas);
            block
        })
        .map(|(version, block)| (version, block.unwrap_or_default()));
    fits.then_some(answer)
}

/// A replica's answer to [`PeerRequest::ReadKeys`]: a prefix of `keys` of
/// at most [`READ_ANSWER_BYTES_MAX`] (at least one key), so an answer
/// always fits a frame; the caller asks again for the rest.
///
/// Each value is held in the in-flight budget before it is copied, until
/// the answer is built: under pressure the prefix is shorter, and with no
/// room at all the call is refused before anything is copied. A peer that
/// asks for large answers and never reads them so costs a lookup per
/// request, not two copies of each value thrown away (issue 16, row 8: that
/// work, two 1 MB copies per request on every connection whose own answers
/// were not yet queued, stalled other clients for up to 0.5 s).
fn serve_read_keys(
    store: &Store,
    budget: &Arc<InflightBudget>,
    keys: &[Vec<u8>],
    with_cas: bool,
) -> PeerResponse {
    let mut held = Reservation::new(budget);
    let mut values = Vec::new();
    let mut bytes = 0usize;
    for key in keys {
        if bytes >= READ_ANSWER_BYTES_MAX {
            break;
        }
        let room = |b: usize| held.hold(held.bytes() + b);
        let Some(answer) = read_local(store, key, with_cas, room) else {
            break;
        };
        bytes += answer.as_ref().map_or(0, |(_, block)| block.len()) + key.len();
        values.push(answer);
    }
    if values.is_empty() && !keys.is_empty() {
        return PeerResponse::Refused("out of memory".into());
    }
    PeerResponse::Values(values)
}

/// The newest of several replicas' answers: the highest version, and at
/// one version a value over a miss (a replica whose clock runs ahead may
/// already count the item as expired), then the earliest answer (this
/// node's, then preference order).
fn newest<T>(answers: impl IntoIterator<Item = T>, rank: impl Fn(&T) -> (u64, bool)) -> Option<T> {
    let mut best: Option<(T, (u64, bool))> = None;
    for a in answers {
        let r = rank(&a);
        if best.as_ref().is_none_or(|(_, b)| r > *b) {
            best = Some((a, r));
        }
    }
    best.map(|(a, _)| a)
}

/// A meta get run on this node, with the version of the state it read: the
/// version is read before and after, and the get runs again if they differ,
/// so a write landing in between cannot pair an old reply with a newer
/// version. Returns `None` if the key kept changing.
fn read_meta_local(local: &dyn Local, key: &[u8], command: &[u8]) -> Option<(u64, Vec<u8>)> {
    let store = local.store();
    for _ in 0..META_READ_ATTEMPTS_MAX {
        let before = store.version_or_tombstone(key).unwrap_or(0);
        let mut reply = Vec::new();
        local.execute(command, &mut reply);
        if store.version_or_tombstone(key).unwrap_or(0) == before {
            return Some((before, reply));
        }
    }
    None
}

impl Cluster {
    /// Builds the ring and a peer handle per other member; the peers connect
    /// in the background.
    ///
    /// `spawn_peer` makes the handle that reaches a member, for this
    /// layout's members and every later one's; `epoch` is the cell the
    /// node's transport reports (set on each install).
    pub fn new(
        config: &ClusterConfig,
        spawn_peer: SpawnPeer,
        transport: Arc<TransportStats>,
        epoch: EpochCell,
    ) -> Self {
        Self::with_layout(config, Layout::of(config), spawn_peer, transport, epoch)
    }

    /// [`Cluster::new`] with `layout` installed from the start instead of
    /// the configuration's (a node that joined: the layout the cluster
    /// gave it). `layout` must name `config.node_id`.
    pub fn with_layout(
        config: &ClusterConfig,
        layout: Layout,
        spawn_peer: SpawnPeer,
        transport: Arc<TransportStats>,
        epoch: EpochCell,
    ) -> Self {
        let layout = Arc::new(layout);
        let peers = layout
            .members
            .iter()
            .filter(|m| m.id != config.node_id)
            .map(|m| (m.id, spawn_peer(m)))
            .collect();
        let view = Topology::new(layout, config.node_id, peers, BTreeMap::new());
        epoch.set(view.layout.epoch);
        let initial_epoch = view.layout.epoch;
        let acceptor = Acceptor::recovering(view.layout.epoch);
        let hints = HintStore::new(HintLimits {
            per_target_max: config.hints_per_target_max,
            bytes_max: config
                .hints_memory_mb
                .unwrap_or(crate::limits::HINTS_MEMORY_MB_MIN)
                .saturating_mul(1024 * 1024),
            window_ms: config.hint_window_secs.saturating_mul(1000),
        });
        Self {
            view: ArcSwap::from_pointee(view),
            installing: Mutex::new(()),
            fetching: tokio::sync::Mutex::new(None),
            spawn_peer,
            epoch,
            acceptor: Mutex::new(acceptor),
            next_round: AtomicU64::new(1),
            proposing: tokio::sync::Mutex::new(()),
            hints: Arc::new(Mutex::new(hints)),
            sloppy_quorum: config.sloppy_quorum,
            anti_entropy: anti_entropy::Settings::of(config),
            me: config.node_id,
            partitions: config.partitions,
            hop_timeout: Duration::from_millis(config.request_timeout_ms),
            stats: ClusterStats::default(),
            transport,
            rmw_locks: (0..RMW_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            removed: tokio::sync::watch::channel(None).0,
            moves: Mutex::new(handoff::Moves::starting_at(initial_epoch)),
            warm: std::sync::atomic::AtomicBool::new(true),
            handoff_rate: config.handoff_bytes_per_sec.max(1),
            fresh: std::sync::atomic::AtomicBool::new(false),
            voting_again: std::sync::atomic::AtomicBool::new(false),
            local: std::sync::OnceLock::new(),
            handoff_timeout: Duration::from_secs(config.handoff_timeout_secs),
        }
    }

    /// The refill after a start is about to run: until it ends, a move
    /// does not take this node's store as a source. Returns false for a
    /// node that joined fresh: it has nothing to refill (the move that
    /// gives it partitions hands them over once, where a refill would pull
    /// every copy from every member).
    pub fn refilling(&self) -> bool {
        if self.fresh.load(Relaxed) {
            return false;
        }
        self.warm.store(false, Relaxed);
        true
    }

    /// Resolves with the epoch of the layout that removed this node, once
    /// one is decided (`cluster leave`): the node holds nothing the
    /// cluster needs and stops.
    ///
    /// Resolves once every other member has that layout, or after
    /// [`REMOVED_WAIT`]: until then one may still send this node a read.
    pub async fn removed(&self) -> u64 {
        let epoch = self.removal_decided().await;
        let view = self.view();
        let deadline = tokio::time::Instant::now() + REMOVED_WAIT;
        while tokio::time::Instant::now() < deadline {
            let reports = join_all(view.peers().map(|(_, p)| async move {
                matches!(
                    p.call_timeout(PeerRequest::LayoutReport, self.hop_timeout).await,
                    Ok(PeerResponse::LayoutReport { installed, .. }) if installed >= epoch
                )
            }))
            .await;
            if reports.iter().all(|r| *r) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        epoch
    }

    /// Resolves with the epoch of the layout that removed this node, as
    /// soon as it is decided (without [`Cluster::removed`]'s wait).
    pub async fn removal_decided(&self) -> u64 {
        let mut rx = self.removed.subscribe();
        let epoch = rx.wait_for(Option::is_some).await.ok().and_then(|e| *e);
        match epoch {
            Some(epoch) => epoch,
            // The sender lives as long as self: never reached.
            None => std::future::pending().await,
        }
    }

    /// Stops every peer connection.
    pub fn shutdown(&self) {
        for (_, p) in self.view.load().peers() {
            p.shutdown();
        }
    }

    /// The current snapshot of the layout and its peers. A request takes
    /// one and keeps it to its end, so it never mixes two layouts.
    pub fn view(&self) -> Arc<Topology> {
        self.view.load_full()
    }

    /// Publishes `layout` if it is newer than the installed one, keeping
    /// the handle of each member that stays at the same peer address (its
    /// connection and counters go on), making one for each other member,
    /// and shutting down the handles of members it no longer has. Requests
    /// under way keep the snapshot they started with. Returns whether it
    /// was installed: an epoch this node has already passed is ignored, as
    /// two fetches of one layout may arrive in either order.
    ///
    /// # Errors
    /// If `layout` does not name this node, or has the installed epoch but
    /// differs from the installed layout (two layouts for one epoch: never
    /// installed, and worth an operator's look).
    pub fn install_layout(&self, layout: Layout) -> Result<bool, String> {
        if layout.epoch >= EPOCH_LIMIT {
            return Err(format!("layout epoch {} out of range", layout.epoch));
        }
        // This node is in `layout` only with its own addresses: a member of
        // the same id elsewhere is another node that took the id after this
        // one was removed.
        let me_now = self
            .view
            .load()
            .layout
            .members
            .iter()
            .find(|m| m.id == self.me)
            .cloned();
        if !layout.members.iter().any(|m| Some(m) == me_now.as_ref()) {
            if layout.epoch > self.view.load().layout.epoch && self.removed.borrow().is_none() {
                // Decided without this node (it left): nothing to install;
                // the server stops.
                info!(
                    epoch = layout.epoch,
                    members = ?layout.member_ids(),
                    "removed from the cluster"
                );
                self.removed.send_replace(Some(layout.epoch));
                return Ok(false);
            }
            return Err(format!(
                "layout epoch {} does not name node {}",
                layout.epoch, self.me
            ));
        }
        let _one_at_a_time = self.installing.lock();
        let current = self.view.load_full();
        if layout.epoch <= current.layout.epoch {
            if layout.epoch == current.layout.epoch && layout != *current.layout {
                return Err(format!(
                    "another layout for installed epoch {}",
                    layout.epoch
                ));
            }
            return Ok(false);
        }
        let unchanged = |m: &MemberConfig| {
            current
                .layout
                .members
                .iter()
                .any(|c| c.id == m.id && c.peer == m.peer)
        };
        let peers = layout
            .members
            .iter()
            .filter(|m| m.id != self.me)
            .map(|m| {
                let handle = match current.peer(m.id) {
                    Some(h) if unchanged(m) => h.clone(),
                    _ => (self.spawn_peer)(m),
                };
                (m.id, handle)
            })
            .collect();
        let next = Topology::new(Arc::new(layout), self.me, peers, current.ae_pairs());
        let epoch = next.layout.epoch;
        // Partitions this node gains in a move: what it still holds of
        // them is left from an earlier time it held them (not dropped yet),
        // and may be a value whose tombstone has since gone from the
        // owners; a pull would take it back in, and a check would push it
        // to them. Cleared before any write of the move can reach it.
        if next.layout.gains_any(self.me) {
            if let Some(local) = self.local.get().and_then(std::sync::Weak::upgrade) {
                let mut cursor = Some(0);
                let mut cleared = 0;
                while let Some(c) = cursor {
                    let (n, more) = local
                        .store()
                        .drop_step(c, |key| next.layout.gains(self.me, key));
                    cleared += n;
                    cursor = more;
                }
                if cleared > 0 {
                    info!(
                        epoch,
                        cleared, "cleared old copies of partitions this node gains"
                    );
                }
            }
        }
        self.view.store(Arc::new(next));
        self.epoch.set(epoch);
        self.acceptor.lock().installed(epoch);
        let next = self.view.load();
        for (id, p) in current.peers() {
            if next.peer(id).is_none_or(|n| !n.same_as(p)) {
                p.shutdown();
            }
        }
        info!(
            epoch,
            from = current.layout.epoch,
            members = ?next.layout.member_ids(),
            replicas = next.layout.ring.replicas(),
            read_quorum = next.layout.read_quorum,
            write_quorum = next.layout.write_quorum,
            "layout installed"
        );
        Ok(true)
    }

    /// Follows the cluster's layout, until the node stops: whenever a peer
    /// reports a newer epoch (in a handshake, a pong, a request or an
    /// answer), fetches that peer's layout and installs it. Checks at least
    /// once a second, so a wake-up lost to a failed fetch is retried.
    pub async fn follow_layouts(self: Arc<Self>) {
        loop {
            let _ = tokio::time::timeout(
                Duration::from_millis(LAYOUT_FOLLOW_INTERVAL_MS),
                self.transport.newer_epoch_seen.notified(),
            )
            .await;
            let mine = self.view.load().layout.epoch;
            if let Some((epoch, node)) = self.transport.newer_epoch(mine) {
                self.fetch_layout(node, epoch).await;
            }
            if !self.acceptor.lock().is_recovered() {
                self.recover().await;
            }
            let abstains = self.acceptor.lock().abstains_from_next();
            if abstains && !self.voting_again.swap(true, Relaxed) {
                let me = self.clone();
                tokio::spawn(async move {
                    me.vote_again().await;
                    me.voting_again.store(false, Relaxed);
                });
            }
        }
    }

    /// This node recovered from a restart and abstains from the next
    /// layout decree, having perhaps voted on it before: asks the others
    /// to decide that slot as an empty change (the same layout, one epoch
    /// on), after which it votes again. Without it, each member restarted
    /// since the last change would sit out the next one, and a rolling
    /// restart of most members would leave too few voters for any change.
    /// Not while a move is under way: its settle or cancel passes the
    /// slot, and an epoch on in the middle would restart its pulls.
    async fn vote_again(&self) {
        let view = self.view();
        if view.layout.target.is_some() || !view.layout.is_member(self.me) {
            return;
        }
        let what = "an empty change, so that a restarted member votes again";
        let epoch = view.layout.epoch;
        match self
            .propose(what, |base| {
                if base.epoch != epoch {
                    return Err(format!("epoch {} is installed, not {epoch}", base.epoch));
                }
                Ok(base.clone())
            })
            .await
        {
            Ok(e) => info!(epoch = e, "layout decrees: this node votes again"),
            Err(e) => debug!(why = e.why, "layout decrees: not voting again yet"),
        }
    }

    /// Ends the acceptor's recovery once enough members have reported what
    /// they know of layout decrees (see [`super::paxos::recovery_floor`]):
    /// - recovered voters of a majority: abstain up to one above the
    ///   highest slot they know of;
    /// - otherwise, when a majority of the voters, this node included, is
    ///   recovering and every voter answered: the cluster is starting (or a
    ///   majority restarted at once, past the documented limit, which is a
    ///   restart from the configured layout, as a whole-cluster restart
    ///   is): abstain up to the highest epoch any of them installed or
    ///   knows of.
    async fn recover(&self) {
        let view = self.view();
        let voters = view.layout.members.len();
        let answers = join_all(view.peers().map(|(node, peer)| async move {
            match peer
                .call_timeout(PeerRequest::LayoutReport, self.hop_timeout)
                .await
            {
                Ok(PeerResponse::LayoutReport { installed, known }) => {
                    Some((node, installed, known))
                }
                _ => None,
            }
        }))
        .await;
        let answers: Vec<(NodeId, u64, Option<u64>)> = answers.into_iter().flatten().collect();
        // A member has installed a newer layout: its voters, not this
        // view's, are the ones to count (a founder restarted from its flags
        // would count the founders only). Fetch it first; recover next turn.
        if let Some(&(node, installed, _)) = answers.iter().find(|a| a.1 > view.layout.epoch) {
            self.transport
                .note_epoch(node, installed, view.layout.epoch);
            return;
        }
        let known: Vec<u64> = answers.iter().filter_map(|a| a.2).collect();
        let floor = super::paxos::recovery_floor(voters, &known).or_else(|| {
            let recovering = 1 + answers.iter().filter(|a| a.2.is_none()).count();
            let all_answered = answers.len() + 1 == voters;
            (all_answered && recovering > voters / 2).then(|| {
                answers
                    .iter()
                    .map(|a| a.1.max(a.2.unwrap_or(0)))
                    .chain([view.layout.epoch])
                    .max()
                    .unwrap_or(0)
            })
        });
        if let Some(floor) = floor {
            self.acceptor.lock().recovered(floor);
            info!(
                floor,
                "layout decrees: this node votes on epochs above {floor}"
            );
        }
    }

    /// Decides the next layout, `change` of the installed one, with the
    /// members of the installed one (Paxos, [`super::paxos`]), and installs
    /// it here; the other members follow it as they follow any newer
    /// layout. Returns its epoch.
    ///
    /// # Errors
    /// With a message for the operator: `change` refused it; another
    /// change was being decided and won (named); too few members could
    /// vote; or the outcome is unknown (answers timed out: the change may
    /// or may not be decided).
    pub async fn propose(
        &self,
        what: &str,
        change: impl Fn(&Layout) -> Result<Layout, String>,
    ) -> Result<u64, Undecided> {
        let _one_at_a_time = self.proposing.lock().await;
        let again = |why: String| Undecided { why, retry: true };
        let refused = |why: String| Undecided { why, retry: false };
        for _try in 0..PROPOSE_TRIES_MAX {
            let view = self.view();
            let base = &view.layout;
            let next = Layout {
                epoch: base.epoch + 1,
                ..change(base).map_err(refused)?
            };
            let slot = next.epoch;
            if slot >= EPOCH_LIMIT {
                return Err(refused("layout epoch out of range".into()));
            }
            let ballot = Ballot {
                round: self.next_round.fetch_add(1, Relaxed),
                node: self.me,
            };
            let voters = base.member_ids().into_iter().collect();
            let (mut proposer, prepare) = Proposer::start(slot, ballot, voters, next.desc());
            let mut ask = Some(prepare);
            while let Some(a) = ask.take() {
                for (node, vote) in self.ask_voters(&view, &a).await {
                    if let Some(accept) = proposer.on_vote(node, vote) {
                        ask = Some(accept);
                    }
                }
            }
            match proposer.outcome().clone() {
                Outcome::Chosen { value, own } => {
                    let epoch = value.epoch;
                    let layout = Layout::from_desc(&value, self.partitions).map_err(refused)?;
                    self.install_layout(layout).map_err(refused)?;
                    if own {
                        info!(epoch, change = what, "layout decided");
                        return Ok(epoch);
                    }
                    return Err(again(format!(
                        "another change was pending and is now decided as epoch {epoch} ({}); yours ({what}) was not made",
                        describe(&value)
                    )));
                }
                Outcome::Preempted(b) => {
                    // Another proposer: go above its ballot, after a pause
                    // that lets it finish first.
                    self.next_round.fetch_max(b.round + 1, Relaxed);
                    let pause = 10 + (xxh3_64(&b.round.to_le_bytes()) ^ u64::from(self.me)) % 40;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Outcome::Decided(epoch) => {
                    return Err(again(format!(
                        "another change was decided as epoch {epoch} first; yours ({what}) was not made, retry it"
                    )));
                }
                Outcome::NoMajority => {
                    return Err(again(format!(
                        "too few members can vote on epoch {slot} (restarting, or behind); retry"
                    )));
                }
                Outcome::Pending => {
                    return Err(again(format!(
                        "no majority answered for epoch {slot} in time; the change ({what}) may or may not be decided: see stats cluster"
                    )));
                }
            }
        }
        Err(again(format!(
            "other proposals kept preempting this one ({what}); retry"
        )))
    }

    /// Makes `joiner` (a node started with `--join` that asked this one) a
    /// standby member: a new layout epoch with it, holding no partitions.
    /// A member asking again with the same addresses (it restarted) gets
    /// the layout it is in. Returns the layout installed here, and whether
    /// this call added the joiner (false: it was a member already).
    ///
    /// # Errors
    /// Naming the problem: another partition count; an id or an address
    /// another member has; too many members; or why the change was not
    /// decided.
    async fn admit_joiner(
        &self,
        joiner: &MemberConfig,
        partitions: Option<u32>,
    ) -> Result<(LayoutDesc, bool), String> {
        if let Some(p) = partitions.filter(|&p| p != self.partitions) {
            return Err(format!(
                "this cluster has {} partitions, node {} was started with {p}; a joining node takes the cluster's (drop --partitions)",
                self.partitions, joiner.id
            ));
        }
        let fits = |a: &str| !a.is_empty() && a.len() <= super::layout::ADDRESS_BYTES_MAX;
        if !fits(&joiner.client) || !fits(&joiner.peer) {
            return Err(format!(
                "node {}: an address empty or over {} bytes",
                joiner.id,
                super::layout::ADDRESS_BYTES_MAX
            ));
        }
        let check = |base: &Layout| -> Result<bool, String> {
            if let Some(m) = base.members.iter().find(|m| m.id == joiner.id) {
                if m.client == joiner.client && m.peer == joiner.peer {
                    return Ok(false); // a member restarted: already in
                }
                return Err(format!(
                    "node id {} is taken: the member at {} (client {}) has it",
                    m.id, m.peer, m.client
                ));
            }
            if let Some(m) = base
                .members
                .iter()
                .find(|m| m.peer == joiner.peer || m.client == joiner.client)
            {
                return Err(format!(
                    "node {} has the address {} or {} already",
                    m.id, joiner.peer, joiner.client
                ));
            }
            if base.members.len() >= super::layout::LAYOUT_MEMBERS_MAX {
                return Err(format!(
                    "the cluster has {} members, the most it may have",
                    base.members.len()
                ));
            }
            Ok(true)
        };
        let deadline = tokio::time::Instant::now() + JOIN_DECIDE_WAIT;
        let mut fresh = false;
        while check(&self.view().layout)? {
            let what = format!("node {} joins as a standby", joiner.id);
            let decided = self
                .propose(&what, |base| {
                    if !check(base)? {
                        return Ok(base.clone());
                    }
                    let mut members = base.members.clone();
                    members.push(joiner.clone());
                    members.sort_by_key(|m| m.id);
                    let mut standby = base.standby.clone();
                    standby.push(joiner.id);
                    standby.sort_unstable();
                    Ok(base.with_members(members, standby))
                })
                .await;
            match decided {
                Ok(_) => {
                    fresh = true;
                    break;
                }
                // Members still recovering, or another change first: try
                // again on the layout as it is then, for a while.
                Err(e) if e.retry && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.why),
            }
        }
        Ok((self.view().layout.desc(), fresh))
    }

    /// This node joined the cluster in the layout of `epoch` and has
    /// never been a member before it: it cannot have voted on any layout
    /// decree, so it votes on those after `epoch` at once instead of
    /// recovering as a restarted member does.
    pub fn joined_fresh(&self, epoch: u64) {
        self.acceptor.lock().recovered(epoch);
        self.fresh.store(true, Relaxed);
        info!(
            epoch,
            "layout decrees: a new member votes on epochs above {epoch}"
        );
    }

    /// Standby member `id` takes its share of the partitions: decides the
    /// transition epoch of that move.
    ///
    /// # Errors
    /// `id` is not a standby member, or another move is under way, or the
    /// decree was not decided.
    pub async fn promote(&self, id: NodeId) -> Result<u64, Undecided> {
        let what = format!("node {id} takes its share of the partitions");
        self.propose(&what, |base| {
            no_move_pending(base)?;
            if !base.is_member(id) {
                return Err(format!("node {id} is not a member"));
            }
            if !base.is_standby(id) {
                return Err(format!("node {id} holds partitions already"));
            }
            let mut target = base.ring.members().to_vec();
            target.push(id);
            target.sort_unstable();
            Ok(base.moving_to(target))
        })
        .await
    }

    /// This node, a standby that joined to take partitions: asks for its
    /// share, retrying while other changes or recovering members stand in
    /// the way, for up to `wait`.
    pub async fn take_partitions(self: Arc<Self>, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let layout = self.view().layout.clone();
            let moving_here = layout
                .target
                .as_ref()
                .is_some_and(|m| m.members.contains(&self.me));
            if !layout.is_standby(self.me) || moving_here {
                return;
            }
            match self.promote(self.me).await {
                Ok(epoch) => {
                    info!(epoch, "this node takes its share of the partitions");
                    return;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    debug!(why = e.why, "taking partitions: not yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    warn!(
                        why = e.why,
                        "this node could not take partitions; it stays a standby member (cluster join {} to try again)",
                        self.me
                    );
                    return;
                }
            }
        }
    }

    /// `cluster <change>`: decides the change and answers `OK epoch <E>`,
    /// or why not.
    async fn admin(&self, cmd: Option<&ClusterCmd>, out: &mut Vec<u8>) {
        let Some(cmd) = cmd else {
            return put_line(out, crate::protocol::reply::BAD_FORMAT.as_bytes());
        };
        let decided = match *cmd {
            ClusterCmd::Quorums { read, write } => {
                let n = self.view.load().layout.ring.replicas();
                if !(1..=n).contains(&usize::from(read)) || !(1..=n).contains(&usize::from(write)) {
                    return put_line(
                        out,
                        format!("CLIENT_ERROR quorums must be within 1..={n} (N)").as_bytes(),
                    );
                }
                let what = format!("quorums R={read} W={write}");
                self.propose(&what, |base| {
                    let n = base.ring.replicas();
                    let (r, w) = (usize::from(read), usize::from(write));
                    if !(1..=n).contains(&r) || !(1..=n).contains(&w) {
                        return Err(format!("quorums must be within 1..={n} (N)"));
                    }
                    Ok(Layout {
                        read_quorum: r,
                        write_quorum: w,
                        ..base.clone()
                    })
                })
                .await
            }
            ClusterCmd::Leave { id } if NodeId::from(id) == self.me => {
                // It would stop before the others learn the decision.
                Err(Undecided {
                    why: format!("node {id} cannot decide its own leave: ask another member"),
                    retry: false,
                })
            }
            ClusterCmd::Leave { id } => {
                let what = format!("node {id} leaves");
                self.propose(&what, |base| {
                    let id = NodeId::from(id);
                    no_move_pending(base)?;
                    if !base.is_member(id) {
                        return Err(format!("node {id} is not a member"));
                    }
                    if base.is_standby(id) {
                        let members = base.members.iter().filter(|m| m.id != id).cloned().collect();
                        let standby = base.standby.iter().copied().filter(|&s| s != id).collect();
                        return Ok(base.with_members(members, standby));
                    }
                    let target: Vec<NodeId> =
                        base.ring.members().iter().copied().filter(|&m| m != id).collect();
                    let n = base.ring.replicas();
                    if target.len() < n {
                        return Err(format!(
                            "node {id} leaving would leave {} members holding partitions, fewer than N={n}",
                            target.len()
                        ));
                    }
                    Ok(base.moving_to(target))
                })
                .await
            }
            ClusterCmd::Join { id } => self.promote(NodeId::from(id)).await,
            ClusterCmd::Replace { old, new } => {
                let what = format!("node {new} replaces node {old}");
                self.propose(&what, |base| {
                    let (old, new) = (NodeId::from(old), NodeId::from(new));
                    no_move_pending(base)?;
                    if !base.is_member(new) {
                        return Err(format!("node {new} is not a member: start it with --join --standby first"));
                    }
                    if !base.is_standby(new) {
                        return Err(format!("node {new} holds partitions already: only a standby member can replace another"));
                    }
                    if !base.is_member(old) || base.is_standby(old) {
                        return Err(format!("node {old} is not a member that holds partitions"));
                    }
                    let mut target: Vec<NodeId> =
                        base.ring.members().iter().copied().filter(|&m| m != old).collect();
                    target.push(new);
                    target.sort_unstable();
                    Ok(base.moving_to(target))
                })
                .await
            }
            ClusterCmd::Cancel => {
                self.propose("the move is cancelled", |base| {
                    base.cancelled()
                        .ok_or_else(|| "no move is under way".to_string())
                })
                .await
            }
        };
        match decided {
            Ok(epoch) => put_line(out, format!("OK epoch {epoch}").as_bytes()),
            Err(e) => server_error(out, false, &e.why),
        }
    }

    /// Sends one Paxos message to every voter of `view` (this node's own
    /// acceptor included) and gathers the answers that arrive within a hop.
    async fn ask_voters(
        &self,
        view: &Topology,
        ask: &Ask<LayoutDesc>,
    ) -> Vec<(NodeId, Vote<LayoutDesc>)> {
        let local = match ask.clone() {
            Ask::Prepare { slot, ballot } => self.acceptor.lock().prepare(slot, ballot),
            Ask::Accept {
                slot,
                ballot,
                value,
            } => self.acceptor.lock().accept(slot, ballot, value),
        };
        let request = || match ask.clone() {
            Ask::Prepare { slot, ballot } => PeerRequest::LayoutPrepare { slot, ballot },
            Ask::Accept {
                slot,
                ballot,
                value,
            } => PeerRequest::LayoutAccept {
                slot,
                ballot,
                layout: value,
            },
        };
        let remote = join_all(view.peers().map(|(node, peer)| {
            let req = request();
            async move {
                match peer.call_timeout(req, self.hop_timeout).await {
                    Ok(PeerResponse::LayoutVote(v)) => Some((node, v)),
                    _ => None,
                }
            }
        }))
        .await;
        std::iter::once(Some((self.me, local)))
            .chain(remote)
            .flatten()
            .collect()
    }

    /// Asks `node` for its layout, which it reported to be at epoch
    /// `wanted`, and installs it if it is newer than the installed one;
    /// bounded by one hop. One fetch at a time: a burst of requests from a
    /// caller ahead waits for the first fetch instead of each sending its
    /// own, and then finds the layout installed. A failure is logged
    /// (rate-limited) and left to the next report of a newer epoch: the
    /// node goes on under the layout it has.
    async fn fetch_layout(&self, node: NodeId, wanted: u64) {
        let mut last_failed = self.fetching.lock().await;
        let view = self.view();
        if view.layout.epoch >= wanted {
            return;
        }
        // A peer whose layout was just refused is not asked again for the
        // same epoch at once: each of its requests would cost a fetch.
        if let Some((n, e, at)) = *last_failed {
            if n == node && e >= wanted && at.elapsed() < LAYOUT_REFETCH_AFTER {
                return;
            }
        }
        // The reporter, or, for a newcomer this node has no handle for (a
        // member added since it last heard), every member that is up, in
        // turn, until one has the newer layout.
        let asked: Vec<&PeerHandle> = match view.peer(node) {
            Some(peer) => vec![peer],
            None => view
                .peers()
                .map(|(_, p)| p)
                .filter(|p| matches!(p.state(), PeerState::Up))
                .collect(),
        };
        let mut layout = Ok(None);
        for peer in asked {
            layout = match peer
                .call_timeout(PeerRequest::LayoutGet, self.hop_timeout)
                .await
            {
                Ok(PeerResponse::Layout(desc)) if desc.epoch <= self.view.load().layout.epoch => {
                    Ok(None)
                }
                Ok(PeerResponse::Layout(desc)) => {
                    Layout::from_desc(&desc, self.partitions).map(Some)
                }
                Ok(other) => Err(format!("answered {other:?}")),
                Err(e) => Err(e.to_string()),
            };
            if matches!(layout, Ok(Some(_))) {
                break;
            }
        }
        let installed = layout.and_then(|l| match l {
            Some(l) => self.install_layout(l),
            None => Ok(false),
        });
        if installed != Ok(true) {
            // That report led nowhere: let the next one, from any peer,
            // wake the follower again.
            self.transport.forget_newer_epoch();
            *last_failed = Some((node, wanted, std::time::Instant::now()));
        }
        match installed {
            Ok(true) => {
                self.stats.layouts_installed.fetch_add(1, Relaxed);
            }
            Ok(false) => {}
            Err(why) => {
                crate::warn_limited!(peer = node, reason = %crate::log_limit::clip(&why), "cannot take a peer's newer layout");
            }
        }
    }

    /// Installs the next epoch of the current layout with default quorums
    /// `read_quorum` and `write_quorum` (a fault-injection hook for tests:
    /// the other members follow as they would any newer layout).
    ///
    /// # Errors
    /// If either is outside `1..=N`.
    pub fn bump_quorums(&self, read_quorum: usize, write_quorum: usize) -> Result<u64, String> {
        let current = self.view();
        let n = current.layout.ring.replicas();
        if !(1..=n).contains(&read_quorum) || !(1..=n).contains(&write_quorum) {
            return Err(format!("quorums outside 1..={n}"));
        }
        let next = Layout {
            epoch: current.layout.epoch + 1, // < EPOCH_LIMIT: checked on every install
            read_quorum,
            write_quorum,
            ..(*current.layout).clone()
        };
        let epoch = next.epoch;
        match self.install_layout(next)? {
            true => Ok(epoch),
            false => Err(format!(
                "a layout newer than epoch {} arrived meanwhile; retry",
                current.layout.epoch
            )),
        }
    }

    /// Whether this node is a replica of `key` (on its preference list).
    pub fn holds(&self, key: &[u8]) -> bool {
        holds(&self.view.load().layout, self.me, key)
    }

    /// Whether the request needs the cluster; if not, the connection runs it
    /// on the fast single-node path.
    pub fn is_local(&self, request: &Request<'_>) -> bool {
        let plan = plan(request);
        if matches!(plan, Plan::Local) {
            return true;
        }
        let view = self.view.load();
        let layout = &*view.layout;
        match plan {
            // get/gets at R=1 on a node that holds every key: the
            // single-node path, which also streams a long reply.
            Plan::Read { get } => {
                layout.read_quorum == 1 && get.keys().all(|k| holds(layout, self.me, k))
            }
            // A meta get at R = 1 (the cluster's, or its own `Pr1`) of a key
            // this node holds: answered from memory, as `read_meta` would.
            Plan::MetaRead { key } => {
                let Ok(hints) = hints::parse(meta_tokens(request)) else {
                    return false; // the coordinator answers the error
                };
                let n = layout.ring.replicas();
                let r = hints.read_quorum.map_or(layout.read_quorum, usize::from);
                let w = hints.write_quorum.map_or(layout.write_quorum, usize::from);
                r == 1 && w <= n && holds(layout, self.me, key)
            }
            _ => false,
        }
    }

    /// Sees one client request through the cluster and appends its reply.
    /// `raw` is the request's exact bytes (command line and data block).
    pub async fn coordinate(
        &self,
        local: &dyn Local,
        request: &Request<'_>,
        raw: &[u8],
        out: &mut Vec<u8>,
    ) {
        let hints = match hints::parse(meta_tokens(request)) {
            Ok(h) => h,
            Err(e) => return put_line(out, e.as_bytes()),
        };
        let view = self.view();
        let view = &*view;
        let n = view.layout.ring.replicas();
        let r = hints
            .read_quorum
            .map_or(view.layout.read_quorum, usize::from);
        let w = hints
            .write_quorum
            .map_or(view.layout.write_quorum, usize::from);
        if r > n || w > n {
            return put_line(
                out,
                format!("CLIENT_ERROR quorum larger than the replica count {n}").as_bytes(),
            );
        }
        match plan(request) {
            Plan::Local => local.execute(raw, out),
            Plan::Read { get } => self.read_keys(view, local, get, r, out).await,
            Plan::TouchRead { get } => self.touch_keys(view, local, get, w, out).await,
            Plan::MetaRead { key } => self.read_meta(view, local, key, raw, r, out).await,
            Plan::Write { key, silent } => {
                if self.write(view, local, key, raw, w, silent, out).await {
                    count_forwarded(local.store(), key, request);
                }
            }
            Plan::RefusedStore { key } => {
                // Quiet meta delete, key in base64 (any bytes travel):
                // nothing to answer on success; a failure is logged, and
                // the client gets the refusal either way.
                let mut delete = b"md ".to_vec();
                delete.extend_from_slice(crate::protocol::meta::base64::encode(key).as_bytes());
                delete.extend_from_slice(b" b q\r\n");
                let mut reply = Vec::new();
                self.write(view, local, key, &delete, w, true, &mut reply)
                    .await;
                // `NF`: there was nothing to drop.
                if !reply.is_empty() && reply != b"NF\r\n" {
                    crate::warn_limited!(reply = %String::from_utf8_lossy(&reply).trim_end(), "dropping the old value of a refused store failed");
                }
                // The refusal's own reply, as a single node gives it; the
                // data block never arrived, so nothing runs again here (the
                // delete already removed this node's copy, if it has one).
                let refused = request.refused().expect("planned from a refused store");
                let too_large = matches!(refused, Refused::TooLarge { .. });
                local.store().reject_write(key, false, too_large);
                if !matches!(request, Request::Storage(s) if s.noreply) {
                    put_line(out, refused.reply().as_bytes());
                }
            }
            Plan::FlushAll { delay_secs, silent } => {
                self.flush_all(view, local, delay_secs, silent, out).await
            }
            Plan::ClusterStats => self.compose_stats(view, local, out),
            Plan::PartitionDigests => {
                self.compose_partition_digests(view, local.store(), out)
                    .await
            }
            Plan::ListKeys { token, count } => self.list_keys(view, local, token, count, out).await,
            Plan::Admin(cmd) => self.admin(cmd, out).await,
        }
    }

    /// Sends a write to the key's primary: this node, or the first peer of
    /// the preference list that is not known to be down. Returns whether it
    /// went to another node.
    ///
    /// A primary past this node's layout refuses the command unexecuted;
    /// this node then takes the newer layout and sends the command once
    /// more under it.
    #[allow(clippy::too_many_arguments)] // the request's snapshot, then its own arguments
    async fn write(
        &self,
        view: &Topology,
        local: &dyn Local,
        key: &[u8],
        raw: &[u8],
        w: usize,
        silent: bool,
        out: &mut Vec<u8>,
    ) -> bool {
        let mut newer: Option<Arc<Topology>> = None;
        for _attempt in 0..WRITE_LAYOUT_ATTEMPTS_MAX {
            let under = newer.as_deref().unwrap_or(view);
            match self
                .write_under(under, local, key, raw, w, silent, out)
                .await
            {
                Ok(forwarded) => return forwarded,
                Err(node) => {
                    let epoch = under.layout.epoch;
                    self.fetch_layout(node, epoch + 1).await;
                    let now = self.view();
                    if now.layout.epoch <= epoch {
                        break;
                    }
                    newer = Some(now);
                }
            }
        }
        server_error(
            out,
            silent,
            "the cluster's layout changed while this write was sent; nothing was applied, retry it",
        );
        true
    }

    /// [`Cluster::write`] under one snapshot; `Err(node)`: the primary
    /// `node` refused it for a newer layout, unexecuted.
    #[allow(clippy::too_many_arguments)] // the request's snapshot, then its own arguments
    async fn write_under(
        &self,
        view: &Topology,
        local: &dyn Local,
        key: &[u8],
        raw: &[u8],
        w: usize,
        silent: bool,
        out: &mut Vec<u8>,
    ) -> Result<bool, NodeId> {
        let pref = view.layout.ring.preference_list_for_key(key);
        let mut skipped = Vec::new();
        for &node in pref {
            if node == self.me {
                self.execute_as_primary(view, local, raw, w, out).await;
                return Ok(false);
            }
            let peer = &view.handle(node);
            if let PeerState::Down { reason } = peer.state() {
                skipped.push(format!("node {node}: {reason}"));
                continue;
            }
            self.stats.forwarded.fetch_add(1, Relaxed);
            let req = PeerRequest::Execute {
                command: raw.to_vec(),
                write_quorum: u8::try_from(w).unwrap_or(u8::MAX),
            };
            // The primary may wait a full hop for its replicas.
            match peer
                .call_at(view.layout.epoch, req, self.hop_timeout * 2)
                .await
            {
                Ok(PeerResponse::StaleEpoch { .. }) => return Err(node),
                Ok(PeerResponse::Executed { reply }) => {
                    out.extend_from_slice(&reply);
                    return Ok(true);
                }
                Ok(other) => {
                    warn!(node, response = ?other, "primary answered out of turn");
                    server_error(
                        out,
                        silent,
                        &format!("primary node {node} answered out of turn"),
                    );
                    return Ok(true);
                }
                Err(e @ CallError::Busy) => {
                    // Alive but overloaded: a second primary for the key
                    // would race it, so answer busy instead.
                    server_error(out, silent, &format!("primary node {node}: {e}"));
                    return Ok(true);
                }
                Err(e) if !e.maybe_applied() => {
                    // Known not sent: the next replica may act as primary.
                    skipped.push(format!("node {node}: {e}"));
                }
                Err(e) => {
                    self.stats.timeouts.fetch_add(1, Relaxed);
                    server_error(
                        out,
                        silent,
                        &format!(
                            "primary node {node}: {e}; the write may or may not have been applied"
                        ),
                    );
                    return Ok(true);
                }
            }
        }
        self.stats.write_quorum_failures.fetch_add(1, Relaxed);
        server_error(
            out,
            silent,
            &format!(
                "no replica of this key is reachable ({})",
                skipped.join("; ")
            ),
        );
        Ok(false)
    }

    /// Runs a command as the key's primary: catch up if this node may be
    /// stale, execute, then replicate the key's new state to W replicas.
    pub async fn execute_as_primary(
        &self,
        view: &Topology,
        local: &dyn Local,
        raw: &[u8],
        w: usize,
        out: &mut Vec<u8>,
    ) {
        let Parsed::Complete { request, .. } = parse(raw, local.limits()) else {
            return put_line(out, b"SERVER_ERROR incomplete command forwarded");
        };
        let (key, silent) = match plan(&request) {
            Plan::Write { key, silent } => (key, silent),
            // A one-key gat/gats, as `touch_keys` sends it: the touch is
            // the write.
            Plan::TouchRead { get } if get.keys().nth(1).is_none() => match get.keys().next() {
                Some(key) => (key, false),
                None => return local.execute(raw, out),
            },
            // Not a single-key write after all: run it as it is.
            _ => return local.execute(raw, out),
        };
        self.stats.primary_writes.fetch_add(1, Relaxed);
        let store = local.store();
        let pref = view.layout.ring.preference_list_for_key(key);
        let others: Vec<NodeId> = pref.iter().copied().filter(|&n| n != self.me).collect();
        // Where the new state goes: the replicas, and while partitions
        // move, the new owners too (W needed on each set).
        let (mut copies, mut need) = self.placement(&view.layout, key, pref, &others, w);
        // Catch up first where this node's copy may be stale: a failed-over
        // primary may have missed writes and its clock may be behind their
        // versions; any read-modify-write must see the latest acknowledged
        // value even if this node was paused or cut off while it was
        // written; a delete on a node without a live item must find the
        // item to delete. A plain set on the preferred primary needs none
        // of it.
        // A request id is looked up in the key's newest state, which a
        // failed-over or lagging primary may not hold yet.
        let has_id = carries_request_id(&request);
        let rmw = has_id || reads_before_writing(&request);
        let is_delete = matches!(
            request,
            Request::Delete(_) | Request::Meta(MetaRequest::Delete(_))
        );
        let failover = pref[0] != self.me;
        // One read-modify-write of a key at a time on this node, from its
        // catch-up to its reply: a second one computed on the first's
        // attempt before replicas took it would ship a result based on a
        // state that may yet be abandoned, and a replica comparing
        // versions would take it over a write the attempt lost to,
        // dropping that write (found in review). A plain set needs no
        // lock: it reads nothing.
        let _serial = if rmw && !copies.is_empty() {
            let slot = xxh3_64(key) as usize & (RMW_LOCKS - 1);
            Some(self.rmw_locks[slot].lock().await)
        } else {
            None
        };
        // A delete's answer depends on what it finds: one that finds no live
        // item here (restarted empty, or a tombstone while another primary
        // stored the key again) must look at the other replicas first.
        let absent_here = store.version_of(key).is_none();
        if !others.is_empty() && (failover || rmw || (is_delete && absent_here)) {
            // Any W replicas hold every acknowledged write, so N - W others
            // plus this node meet all of them. Even the preferred primary
            // with its own copy must hear from them: it may have been paused
            // or cut off while a failover primary took writes, and a
            // read-modify-write on a stale base would lose them for good.
            let needed = (pref.len() - w).max(1).min(others.len());
            let answered = self.catch_up(view, store, key, &others).await;
            // W = 1 and a sloppy quorum promise no such intersection (an
            // acknowledged write may sit on one node, or on a hint holder):
            // there the preferred primary with its own copy goes on with
            // what answered, and stays available with a replica down.
            let strict = w > 1 && !self.sloppy_quorum;
            if answered < needed && (strict || failover || absent_here) {
                self.stats.write_quorum_failures.fetch_add(1, Relaxed);
                return server_error(
                    out,
                    silent,
                    &format!(
                        "cannot read the key's current state: {answered} of {needed} other replicas answered"
                    ),
                );
            }
        }
        // The layout the state is shipped under: a replica past it refuses
        // the state unapplied, and it goes again under the newer one.
        let mut newer_view: Option<Arc<Topology>> = None;
        let mut relayouts = 0;
        let start = out.len();
        let request_id = hints::parse(meta_tokens(&request))
            .ok()
            .and_then(|h| h.request_id);
        // A read-modify-write ships its result with the version it was
        // computed on, and replicas that hold something newer refuse it;
        // `abandoned` are this command's earlier attempts, which replicas
        // that took them may give up for the next one.
        let mut abandoned: Vec<u64> = Vec::new();
        for _attempt in 0..WRITE_ATTEMPTS_MAX {
            let before = store.entry_version(key);
            let recorded_before =
                request_id.is_some_and(|id| store.with_key(key, |ctx| ctx.has_record(id)));
            // While replicas take a read-modify-write's attempt, a state not
            // computed on it can still replace it here (another primary's
            // write by read repair, a hint, anti-entropy): then this node no
            // longer holds the effect, and acknowledging it could be
            // acknowledging a write that has already lost. The attempt is
            // marked under the lock of its own write, so no such state
            // lands unseen.
            let in_flight = if rmw && !copies.is_empty() {
                store.claim_attempt(key, || local.execute(raw, out)).1
            } else {
                local.execute(raw, out);
                None
            };
            if copies.is_empty() {
                return;
            }
            // A mutation with a request id that changed nothing may be the
            // retry of one that ran here but did not reach W replicas: ship
            // the state again (it is idempotent), so the retry's answer
            // means what a first answer means.
            let after = store.entry_version(key);
            let state = match (before, after) {
                (None, None) => return,
                (Some(b), Some(a)) if b == a && !has_id => return,
                (_, Some(_)) => match store.replica_state(key) {
                    // The command expired the item at its own version (a
                    // touch into the past): replicas judge expiry by their
                    // own clocks and never let that tombstone outrank the
                    // live item at its version, so the removal gets a new
                    // version, as a delete would.
                    // (Same version, other expiry: the item before it, not
                    // an unchanged tombstone.)
                    Some(KeyState::Absent { version, dedup })
                        if before.is_some_and(|(v, _)| v == version) && before != after =>
                    {
                        let gone = KeyState::Absent {
                            version: store.next_version(),
                            dedup,
                        };
                        store.apply(key, &gone);
                        gone
                    }
                    Some(state) => state,
                    None => return,
                },
                (Some(_), None) => {
                    // Removed without a tombstone (evicted meanwhile): leave
                    // one here too, so a late copy of the old item cannot
                    // bring it back on this node either.
                    let gone = KeyState::absent(store.next_version());
                    store.apply(key, &gone);
                    gone
                }
            };
            let attempt = state.version();
            let changed = before.map(|(v, _)| v) != Some(attempt);
            let base = before.map_or(0, |(v, _)| v);
            let condition = rmw.then_some((base, abandoned.as_slice()));
            let now_ms = store.clock().now_ms();
            let quorum = loop {
                let under = newer_view.as_deref().unwrap_or(view);
                let shipped = self
                    .replicate(under, key, &state, &copies, &need, now_ms, condition)
                    .await;
                // A replica took a newer layout while the state was on its
                // way, and refused it unapplied: the state is idempotent
                // (its version and records), so ship it again under the
                // newer layout, to the replicas it names, rather than fail
                // a write that a retry would have to repeat anyway.
                let Err(NotReplicated::Stale { node, epoch }) = shipped else {
                    break shipped;
                };
                let was = under.layout.epoch;
                self.fetch_layout(node, epoch).await;
                let now = self.view();
                if now.layout.epoch <= was || relayouts >= WRITE_LAYOUT_ATTEMPTS_MAX {
                    break shipped;
                }
                relayouts += 1;
                let pref = now.layout.ring.preference_list_for_key(key);
                let others: Vec<NodeId> = pref.iter().copied().filter(|&n| n != self.me).collect();
                let (to, needed) = self.placement(&now.layout, key, pref, &others, w);
                (copies, need) = (Cow::Owned(to.into_owned()), needed);
                newer_view = Some(now);
            };
            let view = newer_view.as_deref().unwrap_or(view);
            let overrun = in_flight.as_ref().is_some_and(|a| a.overrun());
            drop(in_flight);
            let held_now = || store.replica_state(key).filter(|_| request_id.is_some());
            let newer = match quorum {
                Ok(()) if !overrun => return,
                // Overrun: with a request id, run the command again on what
                // this node holds now; it replays if that state was built
                // on the attempt (the record came with it), and applies
                // otherwise. Without one the two cannot be told apart, and
                // running it again could count it twice.
                Ok(()) => match held_now() {
                    Some(held) => held,
                    None => {
                        self.stats.write_quorum_failures.fetch_add(1, Relaxed);
                        out.truncate(start);
                        return server_error(
                            out,
                            silent,
                            "another write replaced this one on its primary while it replicated; \
                             it may or may not have been applied",
                        );
                    }
                },
                Err(failed @ (NotReplicated::Quorum(_) | NotReplicated::Stale { .. })) => {
                    self.stats.write_quorum_failures.fetch_add(1, Relaxed);
                    out.truncate(start);
                    self.restore(view, store, key, &copies, &abandoned).await;
                    let why = match failed {
                        NotReplicated::Stale { node, epoch } => format!(
                            "node {node} is at layout epoch {epoch}, past this write's ({}); the layout changed, retry",
                            view.layout.epoch
                        ),
                        NotReplicated::Quorum(why) => why,
                        NotReplicated::Newer(_) => unreachable!("matched above"),
                    };
                    return server_error(out, silent, &format!("write quorum not met: {why}"));
                }
                Err(NotReplicated::Newer(newer)) => newer,
            };
            // A replica holds a state this node never saw (or, overrun, this
            // node took one): a write taken by
            // another primary while this one was paused or cut off, one
            // stamped by a clock ahead of this one, or (for a
            // read-modify-write) any write its result did not see. Counting
            // the replica toward W would acknowledge a write that loses to
            // it, or drops it. Take that state in place of this attempt
            // (this node's clock moves past it) and run the command again on
            // it: its reply has not been sent, so it has not happened yet.
            self.stats.write_conflicts.fetch_add(1, Relaxed);
            out.truncate(start);
            if changed {
                abandoned.push(attempt);
            }
            // The attempt's own record of the id goes with it; one it found
            // (a replay) stays, and so does one the newer state carries: that
            // state was computed on this attempt (another primary read it
            // from a replica that took it), so the command has taken effect
            // and runs again only to replay its answer.
            let in_newer = request_id
                .is_some_and(|id| crate::store::dedup::records(newer.dedup()).any(|r| r.id == id));
            let forget = request_id.filter(|_| changed && !recorded_before && !in_newer);
            // A command that changed nothing (a replay, or a state shipped
            // again) made no attempt to abandon: the state it held was
            // there before it, so only a newer one replaces it.
            let adopt = if changed {
                Condition::Adopt { attempt, forget }
            } else {
                Condition::Newest
            };
            if store.apply_if(key, &newer, Fill::Evict, adopt) == Applied::TooFarAhead {
                self.stats.versions_refused.fetch_add(1, Relaxed);
                self.restore(view, store, key, &copies, &abandoned).await;
                return server_error(
                    out,
                    silent,
                    "a replica holds a version too far ahead of this node's clock",
                );
            }
            debug!(
                attempt,
                newer = newer.version(),
                "write conflict: running the command again"
            );
        }
        self.stats.write_quorum_failures.fetch_add(1, Relaxed);
        let view = newer_view.as_deref().unwrap_or(view);
        self.restore(view, store, key, &copies, &abandoned).await;
        server_error(
            out,
            silent,
            &format!(
                "write conflict: replicas held newer versions {WRITE_ATTEMPTS_MAX} times; the write may or may not have been applied"
            ),
        );
    }

    /// Where a write of `key` that this node executed goes under `layout`
    /// (`pref`, its replicas; `others`, those but this node), and the
    /// quorum it needs there: as [`Layout::write_set`] and
    /// [`Layout::write_need`] for a primary, and W of the replicas
    /// themselves where this node is not one of them (the layout moved
    /// the key away while the write ran). Nothing moving, it allocates
    /// nothing.
    fn placement<'a>(
        &self,
        layout: &Layout,
        key: &[u8],
        pref: &[NodeId],
        others: &'a [NodeId],
        w: usize,
    ) -> (Cow<'a, [NodeId]>, Need) {
        let copies = layout.write_set(key, self.me, others);
        let need = match layout.write_need(key, self.me, w) {
            Need::Any(_) if others.len() == pref.len() => Need::Sets(vec![(w, others.to_vec())]),
            need => need,
        };
        (copies, need)
    }

    /// After a read-modify-write gave up: replicas may still hold its
    /// abandoned attempts, whose versions can outrank the state they were
    /// abandoned for (and would then win it everywhere, dropping the
    /// writes it holds). Sends what this node holds now, under a fresh
    /// version, to the replicas that hold an abandoned attempt or that
    /// state; replicas holding anything else keep it. Best effort, in the
    /// background.
    async fn restore(
        &self,
        view: &Topology,
        store: &Store,
        key: &[u8],
        others: &[NodeId],
        abandoned: &[u64],
    ) {
        if abandoned.is_empty() {
            return;
        }
        let Some(held) = store.replica_state(key) else {
            return;
        };
        let base = held.version();
        let restamped = held.with_version(store.next_version());
        // Not applied here: this node keeps the state it took, at its own
        // version, so a later catch-up still sees a newer write elsewhere
        // as newer.
        self.stats.write_restores.fetch_add(1, Relaxed);
        let now_ms = store.clock().now_ms();
        let _ = self
            .replicate(
                view,
                key,
                &restamped,
                others,
                &Need::Any(0),
                now_ms,
                Some((base, abandoned)),
            )
            .await;
    }

    /// Before a read-modify-write on a primary that may be stale: take the
    /// newest state any other replica holds.
    /// Returns how many replicas answered.
    async fn catch_up(
        &self,
        view: &Topology,
        store: &Store,
        key: &[u8],
        others: &[NodeId],
    ) -> usize {
        self.stats.catch_up_reads.fetch_add(1, Relaxed);
        let calls = others.iter().map(|n| {
            let peer = view.handle(*n).clone();
            let req = PeerRequest::Fetch { key: key.to_vec() };
            let timeout = self.hop_timeout;
            async move { peer.call_at(view.layout.epoch, req, timeout).await }
        });
        let mut answered = 0;
        let mut take = |state: Option<KeyState>| {
            answered += 1;
            if let Some(state) = state {
                store.apply(key, &state);
            }
        };
        let mut ahead = Vec::new();
        for (&node, answer) in others.iter().zip(join_all(calls).await) {
            match answer {
                Ok(PeerResponse::State(state)) => take(state),
                Ok(PeerResponse::StaleEpoch { epoch }) => ahead.push((node, epoch)),
                _ => {}
            }
        }
        // A replica past this node's layout refused: a state is the same
        // under any layout, so take the newer one and ask it again.
        if let Some(&(node, epoch)) = ahead.iter().max_by_key(|a| a.1) {
            self.fetch_layout(node, epoch).await;
            let now = self.view();
            for (node, _) in ahead {
                let Some(peer) = now.peer(node) else { continue };
                let req = PeerRequest::Fetch { key: key.to_vec() };
                if let Ok(PeerResponse::State(state)) =
                    peer.call_at(now.layout.epoch, req, self.hop_timeout).await
                {
                    take(state);
                }
            }
        }
        answered
    }

    /// Ships `state` to `others`; returns once the quorum `need` (per
    /// replica set, how many of which nodes; empty: none) holds it (the
    /// rest keep going in the background), or why they don't:
    /// too few answered, or one holds a newer state (returned at once; a
    /// replica never counts toward W for a state older than its own).
    ///
    /// `condition`: the state is a read-modify-write's result, computed on
    /// the key at this version, and replaces these abandoned attempts
    /// ([`PeerRequest::ApplyIf`]); `None`: highest version wins.
    #[allow(clippy::too_many_arguments)] // the request's snapshot, then its own arguments
    async fn replicate(
        &self,
        view: &Topology,
        key: &[u8],
        state: &KeyState,
        others: &[NodeId],
        need: &Need,
        now_ms: u64,
        condition: Option<(u64, &[u64])>,
    ) -> Result<(), NotReplicated> {
        let sent_version = state.version();
        let conditional = condition.is_some();
        let (base, replaces) = condition.map_or((0, Vec::new()), |(b, r)| (b, r.to_vec()));
        let (tx, mut rx) = mpsc::channel(others.len());
        let holder = self.hint_holder(view, key);
        for &node in others {
            let peer = view.handle(node).clone();
            let holder_peer = (holder != self.me).then(|| view.handle(holder).clone());
            let hints = self.hints.clone();
            let key = key.to_vec();
            let state = state.clone();
            let timeout = self.hop_timeout;
            let tx = tx.clone();
            let replaces = replaces.clone();
            let epoch = view.layout.epoch;
            self.stats.replica_writes_sent.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let req = if conditional {
                    PeerRequest::ApplyIf {
                        key: key.clone(),
                        state: state.clone(),
                        base,
                        replaces,
                    }
                } else {
                    PeerRequest::Apply {
                        key: key.clone(),
                        state: state.clone(),
                    }
                };
                let failed = match peer.call_at(epoch, req, timeout).await {
                    Ok(PeerResponse::Applied) => None,
                    Ok(PeerResponse::StaleEpoch { epoch }) => {
                        let _ = tx.send((node, ReplicaCopy::Stale(epoch))).await;
                        return;
                    }
                    Ok(PeerResponse::Newer(newer)) => {
                        let _ = tx.send((node, ReplicaCopy::Newer(newer))).await;
                        return;
                    }
                    Ok(other) => Some((format!("unexpected answer {other:?}"), false)),
                    Err(e) => Some((e.to_string(), matches!(e, CallError::Timeout))),
                };
                // Not confirmed: hand the state to the hint holder. The
                // state is idempotent, so a copy that did land is harmless.
                let outcome = match failed {
                    None => ReplicaCopy::Applied,
                    Some((why, timed_out)) => match holder_peer {
                        None => {
                            if hints.lock().add(node, &key, state, now_ms) {
                                ReplicaCopy::Hinted
                            } else {
                                ReplicaCopy::Failed {
                                    why: format!("{why}; no room for a hint"),
                                    timed_out,
                                }
                            }
                        }
                        Some(h) => {
                            let req = PeerRequest::Hint {
                                target: node,
                                key,
                                state,
                            };
                            match h.call_at(epoch, req, timeout).await {
                                Ok(PeerResponse::Applied) => ReplicaCopy::Hinted,
                                _ => ReplicaCopy::Failed { why, timed_out },
                            }
                        }
                    },
                };
                let _ = tx.send((node, outcome)).await;
            });
        }
        drop(tx);
        let Some(mut quorum) = need.quorum(others.len()) else {
            return Ok(());
        };
        let mut answered: Vec<NodeId> = Vec::with_capacity(others.len());
        while let Some((node, outcome)) = rx.recv().await {
            answered.push(node);
            let decision = match outcome {
                ReplicaCopy::Applied => quorum.succeeded(node),
                // Conditional: refused whatever the versions (the replica
                // holds a write the result did not see). Otherwise: only
                // a newer state counts against the write.
                ReplicaCopy::Newer(newer) if conditional || newer.version() > sent_version => {
                    return Err(NotReplicated::Newer(newer));
                }
                ReplicaCopy::Newer(_) => quorum.succeeded(node),
                ReplicaCopy::Hinted if self.sloppy_quorum => quorum.succeeded(node),
                ReplicaCopy::Hinted => {
                    quorum.failed(node, format!("unreachable; hinted to node {holder}"))
                }
                ReplicaCopy::Stale(epoch) => return Err(NotReplicated::Stale { node, epoch }),
                ReplicaCopy::Failed { why, timed_out } => {
                    if timed_out {
                        self.stats.timeouts.fetch_add(1, Relaxed);
                    }
                    quorum.failed(node, why)
                }
            };
            match decision {
                Decision::Met => break,
                Decision::Failed => return Err(NotReplicated::Quorum(explain_with_self(&quorum))),
                Decision::Pending => {}
            }
        }
        if quorum.decision() != Decision::Met {
            return Err(NotReplicated::Quorum(explain_with_self(&quorum)));
        }
        // W replicas hold it; the others' answers are on their way. One of
        // them may be the only replica holding a newer state (the others
        // that held it restarted empty, say): acknowledging now would let
        // that state win later. So wait for every replica not known to be
        // down, up to one hop; a slow or failing one does not fail the
        // write, but a newer state held anywhere does.
        let deadline = tokio::time::Instant::now() + self.hop_timeout;
        let waiting = |answered: &[NodeId]| {
            others
                .iter()
                .any(|n| !answered.contains(n) && !view.is_down(self.me, *n))
        };
        while waiting(&answered) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((node, outcome))) => {
                    answered.push(node);
                    if let ReplicaCopy::Newer(newer) = outcome {
                        if conditional || newer.version() > sent_version {
                            return Err(NotReplicated::Newer(newer));
                        }
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        Ok(())
    }

    /// Who holds hints for `key`'s replicas: the first member past its
    /// preference list on the ring that is not known to be down, else this
    /// node (a cluster of N members has no one past the list).
    fn hint_holder(&self, view: &Topology, key: &[u8]) -> NodeId {
        let all = view.layout.full_ring.preference_list_for_key(key);
        all[view.layout.ring.replicas()..]
            .iter()
            .copied()
            .find(|n| *n == self.me || !view.is_down(self.me, *n))
            .unwrap_or(self.me)
    }

    /// Hands held hints to their replicas once they are reachable again;
    /// runs until the node stops. Bounded work per pass.
    pub async fn deliver_hints(self: Arc<Self>, clock: Arc<dyn crate::store::Clock>) {
        let mut tick = tokio::time::interval(Duration::from_millis(HINT_DELIVERY_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let targets = {
                let mut hints = self.hints.lock();
                hints.expire(clock.now_ms());
                hints.targets()
            };
            let view = self.view();
            for target in targets {
                let Some(peer) = view.peer(target) else {
                    continue;
                };
                if peer.state() != PeerState::Up {
                    continue;
                }
                for _ in 0..HINT_DELIVERY_BATCHES_PER_PASS {
                    if !self.deliver_hint_batch(target, peer).await {
                        break;
                    }
                }
            }
        }
    }

    /// Hands one batch of `target`'s hints over. Returns whether a full
    /// batch landed (so there may be more to send now).
    async fn deliver_hint_batch(&self, target: NodeId, peer: &PeerHandle) -> bool {
        let batch = self.hints.lock().take(target, HINT_DELIVERY_BATCH);
        let full = batch.len() == HINT_DELIVERY_BATCH;
        let calls = batch.iter().map(|h| {
            let req = PeerRequest::Apply {
                key: h.key.clone(),
                state: h.state.clone(),
            };
            peer.call_timeout(req, self.hop_timeout)
        });
        let results = join_all(calls).await;
        let mut undelivered = Vec::new();
        let mut delivered = 0;
        let mut refused = 0;
        for (h, r) in batch.into_iter().zip(results) {
            match r {
                // Held already, or something newer is: done either way.
                Ok(PeerResponse::Applied | PeerResponse::Newer(_)) => delivered += 1,
                // Refused for good (flushed since, no memory, a version too
                // far ahead): putting it back would block the queue behind
                // it until the hint window ends.
                Ok(PeerResponse::Refused(why)) => {
                    debug!(target, why, "hint refused by its replica; dropped");
                    refused += 1;
                }
                _ => undelivered.push(h),
            }
        }
        let mut hints = self.hints.lock();
        hints.delivered(delivered);
        hints.refused(refused);
        let all_landed = undelivered.is_empty();
        if !all_landed {
            hints.put_back(target, undelivered);
        }
        full && all_landed
    }

    /// Refill after a start: pulls from every peer the states of the keys
    /// this node replicates, a page at a time, and applies them (highest
    /// version wins, so what it already has or writes meanwhile is kept).
    /// A node that restarted empty so gets its partitions back while it
    /// serves. Bounded: pages of at most 1,024 items or about 1 MiB, a
    /// bounded wait for peers, a bounded number of retries per page.
    pub async fn refill(self: Arc<Self>, local: Arc<dyn Local>) {
        let view = self.view();
        for (node, peer) in view.peers() {
            // Wait (bounded) for the peer to come up.
            for _ in 0..REFILL_WAIT_FOR_PEER_POLLS {
                if peer.state() == PeerState::Up {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(REFILL_POLL_MS)).await;
            }
            let mut cursor = 0u64;
            let mut failures = 0;
            loop {
                let req = PeerRequest::Scan {
                    for_node: self.me,
                    cursor,
                    moving: false,
                    only: Vec::new(),
                };
                match peer.call_timeout(req, self.hop_timeout).await {
                    Ok(PeerResponse::Page { states, next }) => {
                        failures = 0;
                        let mut bytes = 0u64;
                        for (key, state) in &states {
                            if valid_key(key) {
                                bytes += key.len() as u64;
                                if let KeyState::Item { value, .. } = state {
                                    bytes += value.len() as u64;
                                }
                                local.store().apply(key, state);
                            }
                        }
                        self.stats
                            .refill_keys
                            .fetch_add(states.len() as u64, Relaxed);
                        self.stats.refill_bytes.fetch_add(bytes, Relaxed);
                        match next {
                            Some(c) => cursor = c,
                            None => break,
                        }
                    }
                    other => {
                        failures += 1;
                        if failures > REFILL_RETRIES_MAX {
                            warn!(node, answer = ?other.err(), "refill from peer abandoned");
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(REFILL_POLL_MS)).await;
                    }
                }
            }
            self.stats.refill_peers_done.fetch_add(1, Relaxed);
        }
        self.warm.store(true, Relaxed);
        info!(
            keys = self.stats.refill_keys.load(Relaxed),
            bytes = self.stats.refill_bytes.load(Relaxed),
            "refill from peers finished"
        );
    }

    /// Replicas of `key` to read from, best first, skipping `asked`: this
    /// node, then peers not known to be down (in preference order), then
    /// the rest (they fail fast).
    fn read_order(&self, view: &Topology, key: &[u8], asked: &[NodeId]) -> Vec<NodeId> {
        let pref = view.layout.ring.preference_list_for_key(key);
        let rank = |n: &NodeId| {
            if *n == self.me {
                0
            } else if view.is_down(self.me, *n) {
                2
            } else {
                1
            }
        };
        let mut order: Vec<NodeId> = pref
            .iter()
            .copied()
            .filter(|n| !asked.contains(n))
            .collect();
        order.sort_by_key(rank); // stable: preference order within a rank
        order
    }

    /// get / gets: every key from R replicas, newest version wins. A
    /// replica past this node's layout refuses the read; if R are not met
    /// without it, the read goes once more under the newer layout.
    async fn read_keys(
        &self,
        view: &Topology,
        local: &dyn Local,
        get: &Get<'_>,
        r: usize,
        out: &mut Vec<u8>,
    ) {
        let Err(ahead) = self.read_keys_under(view, local, get, r, out).await else {
            return;
        };
        let now = self.after_refusal(ahead).await;
        if let Err(ahead) = self.read_keys_under(&now, local, get, r, out).await {
            self.refused_twice(&now, ahead, out);
        }
    }

    /// A quorum read missed R because replica `node` refused it for its
    /// newer `epoch`: fetches that layout, and returns the one to read
    /// under once more (this node's newest).
    async fn after_refusal(&self, (node, epoch): (NodeId, u64)) -> Arc<Topology> {
        self.fetch_layout(node, epoch).await;
        self.view()
    }

    /// The read under the newer layout was refused too: the quorum error.
    fn refused_twice(&self, under: &Topology, (node, epoch): (NodeId, u64), out: &mut Vec<u8>) {
        self.stats.read_quorum_failures.fetch_add(1, Relaxed);
        server_error(
            out,
            false,
            &format!(
                "read quorum not met: node {node} is at layout epoch {epoch}, past this read's ({}); the layout changed, retry",
                under.layout.epoch
            ),
        );
    }

    /// [`Cluster::read_keys`] under one layout; `Err((node, epoch))`: R
    /// were not met, and replica `node` refused for its newer `epoch`
    /// (nothing written to `out`).
    async fn read_keys_under(
        &self,
        view: &Topology,
        local: &dyn Local,
        get: &Get<'_>,
        r: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), (NodeId, u64)> {
        // Each distinct key is read once; memcached answers every
        // occurrence, and so does the reply below, from that one read.
        let (keys, occurrences) = distinct_keys(get);
        // What the replicas' answers hold so far, over all calls: past the
        // cap or the budget, nothing more is fetched.
        let gathered = Gathered::new(local.budget());
        let mut answers: Vec<Vec<(NodeId, KeyAnswer)>> = vec![Vec::new(); keys.len()];
        let mut asked: Vec<Vec<NodeId>> = vec![Vec::new(); keys.len()];
        let mut read_here = vec![false; keys.len()];
        // A replica that refused for its newer layout, and that epoch.
        let mut ahead_of_me = None;
        // Ask exactly as many replicas as are still missing, this node
        // first, then peers not known to be down in preference order; a
        // replica that fails or times out is replaced in the next round.
        for _round in 0..view.layout.ring.replicas() {
            let mut asks: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
            for (i, key) in keys.iter().enumerate() {
                let need = r.saturating_sub(answers[i].len());
                for node in self.read_order(view, key, &asked[i]).into_iter().take(need) {
                    asked[i].push(node);
                    asks.entry(node).or_default().push(i);
                }
            }
            if asks.is_empty() {
                break;
            }
            if let Some(mine) = asks.remove(&self.me) {
                // Key by key, each answer held as it is read, so the cap
                // and the budget stop local reads within one item; other
                // connections get a turn every LOCAL_READ_TURN_BYTES.
                let mut copied = 0;
                for i in mine {
                    if copied >= LOCAL_READ_TURN_BYTES {
                        copied = 0;
                        tokio::task::yield_now().await;
                    }
                    let Some(answer) =
                        read_local(local.store(), keys[i], get.with_cas, |b| gathered.add(b))
                    else {
                        gathered.answer_refusal(out, "multi-get");
                        return Ok(());
                    };
                    copied += answer.as_ref().map_or(0, |(_, block)| block.len());
                    read_here[i] = true;
                    answers[i].push((self.me, answer));
                }
            }
            if asks.is_empty() {
                continue;
            }
            self.stats.quorum_reads.fetch_add(1, Relaxed);
            let calls = asks.into_iter().map(|(node, idx)| {
                let peer = view.handle(node).clone();
                let timeout = self.hop_timeout;
                let with_cas = get.with_cas;
                let keys = &keys;
                let gathered = &gathered;
                async move {
                    // A replica answers a byte-bounded prefix; ask on for
                    // the rest until every key is answered, a call fails or
                    // the answers pass the cap.
                    let mut got: Vec<KeyAnswer> = Vec::new();
                    let mut error = None;
                    let mut ahead = None;
                    while got.len() < idx.len() && gathered.open() {
                        let req = PeerRequest::ReadKeys {
                            keys: idx[got.len()..].iter().map(|&i| keys[i].to_vec()).collect(),
                            with_cas,
                        };
                        match peer.call_at(view.layout.epoch, req, timeout).await {
                            Ok(PeerResponse::Values(v))
                                if !v.is_empty() && v.len() <= idx.len() - got.len() =>
                            {
                                let bytes: usize = v
                                    .iter()
                                    .map(|a| a.as_ref().map_or(0, |(_, block)| block.len()))
                                    .sum();
                                if !gathered.add(bytes) {
                                    break;
                                }
                                got.extend(v);
                            }
                            Ok(PeerResponse::StaleEpoch { epoch }) => {
                                ahead = Some(epoch);
                                break;
                            }
                            Ok(other) => {
                                debug!(node, answer = ?other, "unexpected read answer");
                                break;
                            }
                            Err(e) => {
                                error = Some(e);
                                break;
                            }
                        }
                    }
                    (node, idx, got, error, ahead)
                }
            });
            for (node, idx, got, error, ahead) in join_all(calls).await {
                if let Some(epoch) = ahead {
                    ahead_of_me = Some((node, epoch));
                }
                if let Some(e) = error {
                    if matches!(e, CallError::Timeout) {
                        self.stats.timeouts.fetch_add(1, Relaxed);
                    }
                    debug!(node, error = %e, "replica read failed");
                }
                for (i, v) in idx.into_iter().zip(got) {
                    answers[i].push((node, v));
                }
            }
            if gathered.answer_refusal(out, "multi-get") {
                return Ok(());
            }
        }
        if let Some(i) = answers.iter().position(|a| a.len() < r) {
            if let Some(ahead) = ahead_of_me {
                return Err(ahead);
            }
            self.stats.read_quorum_failures.fetch_add(1, Relaxed);
            server_error(
                out,
                false,
                &format!(
                    "read quorum not met: {} of {r} replicas answered for key {}",
                    answers[i].len(),
                    String::from_utf8_lossy(keys[i])
                ),
            );
            return Ok(());
        }
        let mut repairs: Vec<(&[u8], NodeId, Vec<NodeId>)> = Vec::new();
        let mut blocks: Vec<Option<Vec<u8>>> = Vec::with_capacity(keys.len());
        let times_asked = times_asked(&occurrences, keys.len());
        for (i, a) in answers.into_iter().enumerate() {
            let version_of = |answer: &KeyAnswer| answer.as_ref().map_or(0, |(v, _)| *v);
            let rank = |answer: &KeyAnswer| {
                answer
                    .as_ref()
                    .map_or((0, false), |(v, block)| (*v, !block.is_empty()))
            };
            let newest_at = newest(a.iter(), |(_, answer)| rank(answer))
                .map(|(n, answer)| (*n, version_of(answer)));
            if let Some((source, newest_version)) = newest_at {
                let stale: Vec<NodeId> = a
                    .iter()
                    .filter(|(_, answer)| version_of(answer) < newest_version)
                    .map(|(n, _)| *n)
                    .collect();
                if !stale.is_empty() {
                    repairs.push((keys[i], source, stale));
                }
            }
            // The newest answer wins; a tombstone (empty block) is a miss.
            let newest = newest(a.into_iter().map(|(_, answer)| answer), rank)
                .flatten()
                .filter(|(_, block)| !block.is_empty());
            // Counted where the client asked, as the local path counts, once
            // per occurrence as memcached counts (a local read counted one).
            let times = times_asked[i] - u64::from(read_here[i]);
            if times > 0 {
                local.store().with_key(keys[i], |ctx| {
                    let st = ctx.stats();
                    st.cmd_get += times;
                    if newest.is_some() {
                        st.get_hits += times;
                    } else {
                        st.get_misses += times;
                    }
                });
            }
            blocks.push(newest.map(|(_, block)| block));
        }
        let reply_bytes: usize = occurrences
            .iter()
            .map(|&d| blocks[d].as_ref().map_or(0, Vec::len))
            .sum();
        // Repeats are counted too: the reply holds every occurrence.
        let distinct_bytes: usize = blocks.iter().map(|b| b.as_ref().map_or(0, Vec::len)).sum();
        if !gathered.add(reply_bytes.saturating_sub(distinct_bytes)) {
            gathered.answer_refusal(out, "multi-get");
            return Ok(());
        }
        out.reserve(reply_bytes + 5);
        for &d in &occurrences {
            if let Some(block) = &blocks[d] {
                out.extend_from_slice(block);
            }
        }
        if !get.continues {
            compose_end(out);
        }
        // Repairs of different keys run side by side: one hop at most.
        let store = local.store();
        join_all(
            repairs
                .iter()
                .map(|(key, source, stale)| self.read_repair(view, store, key, *source, stale)),
        )
        .await;
        Ok(())
    }

    /// Read repair: replicas that answered a read with an older version (or
    /// nothing) get the newest state. Taking it from `source` is one hop
    /// when that is another node; the copies to stale peers go on in the
    /// background and the read does not wait for them.
    async fn read_repair(
        &self,
        view: &Topology,
        store: &Store,
        key: &[u8],
        source: NodeId,
        stale: &[NodeId],
    ) {
        let state = if source == self.me {
            store.replica_state(key)
        } else {
            let req = PeerRequest::Fetch { key: key.to_vec() };
            match view
                .handle(source)
                .call_at(view.layout.epoch, req, self.hop_timeout)
                .await
            {
                Ok(PeerResponse::State(state)) => state,
                _ => None,
            }
        };
        let Some(state) = state else {
            return;
        };
        for &node in stale {
            self.stats.read_repairs.fetch_add(1, Relaxed);
            if node == self.me {
                store.apply(key, &state);
                continue;
            }
            let peer = view.handle(node).clone();
            let req = PeerRequest::Apply {
                key: key.to_vec(),
                state: state.clone(),
            };
            let timeout = self.hop_timeout;
            let epoch = view.layout.epoch;
            tokio::spawn(async move {
                if let Err(e) = peer.call_at(epoch, req, timeout).await {
                    debug!(node, error = %e, "read repair not delivered");
                }
            });
        }
    }

    /// gat / gats: the touch is a write, so each key goes to its primary;
    /// up to [`TOUCH_KEYS_IN_FLIGHT`] keys at a time.
    async fn touch_keys(
        &self,
        view: &Topology,
        local: &dyn Local,
        get: &Get<'_>,
        w: usize,
        out: &mut Vec<u8>,
    ) {
        let verb: &[u8] = if get.with_cas { b"gats" } else { b"gat" };
        let exptime = get.touch.unwrap_or(0);
        // Each distinct key is touched once, and every occurrence answered
        // from it, as memcached answers them; the reply is capped as a
        // multi-get's is.
        let (keys, occurrences) = distinct_keys(get);
        let times_asked = times_asked(&occurrences, keys.len());
        let mut replies: Vec<Vec<u8>> = Vec::with_capacity(keys.len());
        let gathered = Gathered::new(local.budget());
        for chunk in keys.chunks(TOUCH_KEYS_IN_FLIGHT) {
            let calls = chunk.iter().map(|&key| async move {
                let mut command = Vec::with_capacity(key.len() + 32);
                command.extend_from_slice(verb);
                command.extend_from_slice(format!(" {exptime} ").as_bytes());
                command.extend_from_slice(key);
                command.extend_from_slice(b"\r\n");
                let mut reply = Vec::new();
                let forwarded = self
                    .write(view, local, key, &command, w, false, &mut reply)
                    .await;
                (key, forwarded, reply)
            });
            for (key, forwarded, reply) in join_all(calls).await {
                if forwarded {
                    // Once per occurrence, as memcached counts (the replies
                    // so far number this key's index).
                    let times = times_asked[replies.len()];
                    local
                        .store()
                        .with_key(key, |ctx| ctx.stats().cmd_touch += times);
                }
                if reply.starts_with(b"SERVER_ERROR") {
                    // This request's reply becomes the error alone (nothing
                    // of it is in `out` yet).
                    return out.extend_from_slice(&reply);
                }
                let mut reply = reply;
                if reply.ends_with(b"END\r\n") {
                    reply.truncate(reply.len() - b"END\r\n".len());
                }
                if !gathered.add(reply.len()) {
                    gathered.answer_refusal(out, "gat");
                    return;
                }
                replies.push(reply);
            }
        }
        let total: usize = occurrences.iter().map(|&d| replies[d].len()).sum();
        let distinct: usize = replies.iter().map(Vec::len).sum();
        if !gathered.add(total - distinct) {
            gathered.answer_refusal(out, "gat");
            return;
        }
        for &d in &occurrences {
            out.extend_from_slice(&replies[d]);
        }
        if !get.continues {
            compose_end(out);
        }
    }

    /// A meta get that changes nothing: run on R replicas, newest wins.
    async fn read_meta(
        &self,
        view: &Topology,
        local: &dyn Local,
        key: &[u8],
        raw: &[u8],
        r: usize,
        out: &mut Vec<u8>,
    ) {
        let pref = view.layout.ring.preference_list_for_key(key);
        if r == 1 && pref.contains(&self.me) {
            return local.execute(raw, out);
        }
        let Err(ahead) = self.read_meta_under(view, local, key, raw, r, out).await else {
            return;
        };
        let now = self.after_refusal(ahead).await;
        if let Err(ahead) = self.read_meta_under(&now, local, key, raw, r, out).await {
            self.refused_twice(&now, ahead, out);
        }
    }

    /// [`Cluster::read_meta`] under one layout; `Err((node, epoch))`: R
    /// were not met, and replica `node` refused for its newer `epoch`
    /// (nothing written to `out`).
    async fn read_meta_under(
        &self,
        view: &Topology,
        local: &dyn Local,
        key: &[u8],
        raw: &[u8],
        r: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), (NodeId, u64)> {
        let mut ahead_of_me = None;
        let mut replies: Vec<(NodeId, u64, Vec<u8>)> = Vec::new();
        let mut asked: Vec<NodeId> = Vec::new();
        for _round in 0..view.layout.ring.replicas() {
            let need = r.saturating_sub(replies.len());
            let nodes: Vec<NodeId> = self
                .read_order(view, key, &asked)
                .into_iter()
                .take(need)
                .collect();
            if nodes.is_empty() {
                break;
            }
            asked.extend_from_slice(&nodes);
            let mut remote = Vec::new();
            for node in nodes {
                if node == self.me {
                    if let Some((version, reply)) = read_meta_local(local, key, raw) {
                        replies.push((self.me, version, reply));
                    }
                } else {
                    remote.push(node);
                }
            }
            if remote.is_empty() {
                continue;
            }
            self.stats.quorum_reads.fetch_add(1, Relaxed);
            let calls = remote.into_iter().map(|node| {
                let peer = view.handle(node).clone();
                let req = PeerRequest::ReadMeta {
                    command: raw.to_vec(),
                    key: key.to_vec(),
                };
                let timeout = self.hop_timeout;
                async move { (node, peer.call_at(view.layout.epoch, req, timeout).await) }
            });
            for (node, result) in join_all(calls).await {
                match result {
                    Ok(PeerResponse::MetaRead { version, reply }) => {
                        replies.push((node, version, reply));
                    }
                    Ok(PeerResponse::StaleEpoch { epoch }) => ahead_of_me = Some((node, epoch)),
                    _ => {}
                }
            }
        }
        if replies.len() < r {
            if let Some(ahead) = ahead_of_me {
                return Err(ahead);
            }
            self.stats.read_quorum_failures.fetch_add(1, Relaxed);
            server_error(
                out,
                false,
                &format!(
                    "read quorum not met: {} of {r} replicas answered",
                    replies.len()
                ),
            );
            return Ok(());
        }
        // A hit answers `VA` or `HD`; a miss `EN`, or nothing under `q`.
        let hit = |reply: &[u8]| reply.starts_with(b"VA") || reply.starts_with(b"HD");
        let rank = |(_, v, reply): &(NodeId, u64, Vec<u8>)| (*v, hit(reply));
        if let Some(&(source, newest_version, _)) = newest(replies.iter(), |r| rank(r)) {
            let stale: Vec<NodeId> = replies
                .iter()
                .filter(|(_, v, _)| *v < newest_version)
                .map(|(n, _, _)| *n)
                .collect();
            if !stale.is_empty() {
                self.read_repair(view, local.store(), key, source, &stale)
                    .await;
            }
        }
        if let Some((_, _, reply)) = newest(replies, rank) {
            out.extend_from_slice(&reply);
        }
        Ok(())
    }

    /// flush_all on every member. OK only if every member acknowledged.
    async fn flush_all(
        &self,
        view: &Topology,
        local: &dyn Local,
        delay_secs: i64,
        silent: bool,
        out: &mut Vec<u8>,
    ) {
        // Every write stamped in the flush's millisecond falls below the
        // barrier, including one whose copy is still on its way; waiting for
        // the clock to leave that millisecond keeps writes made after the
        // OK above it.
        let version = hlc::end_of_millisecond(local.store().next_version());
        let flushed = flush_local(local.store(), delay_secs, version);
        debug_assert!(flushed, "this node's own stamp is never too far ahead");
        let barrier_ms = hlc::version_unix_ms(version);
        for _ in 0..FLUSH_CLOCK_WAITS_MAX {
            if local.store().clock().now_ms() > barrier_ms {
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let calls = view.peers().map(|(node, peer)| {
            let peer = peer.clone();
            let timeout = self.hop_timeout;
            async move {
                (
                    node,
                    peer.call_timeout(
                        PeerRequest::FlushAll {
                            delay_secs,
                            version,
                        },
                        timeout,
                    )
                    .await,
                )
            }
        });
        let failed: Vec<String> = join_all(calls)
            .await
            .into_iter()
            .filter_map(|(node, r)| match r {
                Ok(PeerResponse::Flushed) => None,
                Ok(other) => Some(format!("node {node}: {other:?}")),
                Err(e) => Some(format!("node {node}: {e}")),
            })
            .collect();
        if failed.is_empty() {
            if !silent {
                put_line(out, b"OK");
            }
        } else {
            server_error(
                out,
                silent,
                &format!(
                    "flush_all reached {} of {} members; {}",
                    view.layout.members.len() - failed.len(),
                    view.layout.members.len(),
                    failed.join("; ")
                ),
            );
        }
    }

    /// Serves a request from another node.
    ///
    /// `caller_epoch` is the layout epoch the request was planned under. A
    /// caller ahead of this node is asked for its layout first (for at most
    /// a hop); a request placed by a caller behind is refused with
    /// [`PeerResponse::StaleEpoch`] and nothing done, so a node that missed
    /// a layout change cannot collect a quorum from nodes past it.
    pub async fn serve(
        &self,
        local: &dyn Local,
        caller: NodeId,
        caller_epoch: u64,
        request: PeerRequest,
    ) -> PeerResponse {
        let bad_key = |k: &[u8]| !valid_key(k);
        if caller_epoch >= EPOCH_LIMIT {
            return PeerResponse::Refused("layout epoch out of range".into());
        }
        if caller_epoch > self.view.load().layout.epoch
            && !matches!(request, PeerRequest::LayoutGet | PeerRequest::LayoutReport)
        {
            self.fetch_layout(caller, caller_epoch).await;
        }
        let view = self.view();
        let view = &*view;
        if caller_epoch < view.layout.epoch && placed_by_caller(&request) {
            self.stats.stale_epoch_refused.fetch_add(1, Relaxed);
            return PeerResponse::StaleEpoch {
                epoch: view.layout.epoch,
            };
        }
        // A caller that is not a member (a joiner, a node removed, a
        // newcomer whose newer layout did not name it a member here after
        // all) may only join, fetch the layout or report on decrees. One
        // behind is told the epoch, so that it fetches the layout and
        // learns that it was removed.
        let open_to_all = matches!(
            request,
            PeerRequest::Join { .. } | PeerRequest::LayoutGet | PeerRequest::LayoutReport
        );
        if !open_to_all && !view.layout.is_member(caller) {
            if caller_epoch < view.layout.epoch {
                self.stats.stale_epoch_refused.fetch_add(1, Relaxed);
                return PeerResponse::StaleEpoch {
                    epoch: view.layout.epoch,
                };
            }
            return PeerResponse::Refused(format!(
                "node {caller} is not a member at layout epoch {}",
                view.layout.epoch
            ));
        }
        match request {
            PeerRequest::LayoutGet => PeerResponse::Layout(view.layout.desc()),
            PeerRequest::LayoutPrepare { slot, ballot } => {
                PeerResponse::LayoutVote(self.acceptor.lock().prepare(slot, ballot))
            }
            PeerRequest::LayoutAccept {
                slot,
                ballot,
                layout,
            } => {
                if layout.epoch != slot || Layout::from_desc(&layout, self.partitions).is_err() {
                    return PeerResponse::Refused("invalid layout".into());
                }
                PeerResponse::LayoutVote(self.acceptor.lock().accept(slot, ballot, layout))
            }
            PeerRequest::Join {
                id,
                client,
                peer,
                partitions,
            } => {
                if id != caller {
                    return PeerResponse::Refused(format!(
                        "node {caller} cannot ask to join as node {id}"
                    ));
                }
                let joiner = MemberConfig { id, client, peer };
                // Bounded below the joiner's own wait, so that it hears the
                // outcome (a proposal cut short may still be decided: the
                // node started again finds itself a member).
                let admitted =
                    tokio::time::timeout(JOIN_DECIDE_WAIT, self.admit_joiner(&joiner, partitions))
                        .await;
                match admitted {
                    Ok(Ok((layout, fresh))) => PeerResponse::Joined { layout, fresh },
                    Ok(Err(why)) => PeerResponse::Refused(why),
                    Err(_) => PeerResponse::Refused(format!(
                        "no decision within {JOIN_DECIDE_WAIT:?}; the join may or may not be decided: start the node again (a member already, it just takes the layout)"
                    )),
                }
            }
            PeerRequest::LayoutReport => {
                let a = self.acceptor.lock();
                PeerResponse::LayoutReport {
                    installed: view.layout.epoch,
                    known: a.report(),
                }
            }
            PeerRequest::Execute {
                command,
                write_quorum,
            } => {
                let w = usize::from(write_quorum).clamp(1, view.layout.ring.replicas());
                let mut reply = Vec::new();
                self.execute_as_primary(view, local, &command, w, &mut reply)
                    .await;
                PeerResponse::Executed { reply }
            }
            PeerRequest::ReadKeys { keys, with_cas } => {
                if keys.iter().any(|k| bad_key(k)) {
                    return PeerResponse::Refused("invalid key".into());
                }
                serve_read_keys(local.store(), local.budget(), &keys, with_cas)
            }
            PeerRequest::ReadMeta { command, key } => {
                if bad_key(&key) {
                    return PeerResponse::Refused("invalid key".into());
                }
                match read_meta_local(local, &key, &command) {
                    Some((version, reply)) => PeerResponse::MetaRead { version, reply },
                    None => PeerResponse::Refused("the key kept changing during the read".into()),
                }
            }
            PeerRequest::Fetch { key } => {
                if bad_key(&key) {
                    return PeerResponse::Refused("invalid key".into());
                }
                PeerResponse::State(local.store().replica_state(&key))
            }
            PeerRequest::Apply { key, state } => {
                if bad_key(&key) {
                    return PeerResponse::Refused("invalid key".into());
                }
                let applied = local.store().apply(&key, &state);
                self.answer_apply(local.store(), caller, &key, &state, applied)
            }
            PeerRequest::ApplyIf {
                key,
                state,
                base,
                replaces,
            } => {
                if bad_key(&key) || replaces.len() > WRITE_ATTEMPTS_MAX {
                    return PeerResponse::Refused("invalid conditional state".into());
                }
                let condition = Condition::Based {
                    base,
                    replaces: &replaces,
                };
                let applied = local.store().apply_if(&key, &state, Fill::Evict, condition);
                self.answer_apply(local.store(), caller, &key, &state, applied)
            }
            PeerRequest::Scan {
                for_node,
                cursor,
                moving,
                only,
            } => {
                if view.peer(for_node).is_none() {
                    return PeerResponse::Refused("unknown node".into());
                }
                if only.len() > self.partitions as usize || only.windows(2).any(|w| w[0] >= w[1]) {
                    return PeerResponse::Refused("invalid partition list".into());
                }
                if moving {
                    // Behind the caller (the layout could not be fetched),
                    // or nothing moving: the pages would be empty, and the
                    // caller would take them for the whole partition.
                    if caller_epoch != view.layout.epoch || view.layout.target.is_none() {
                        return PeerResponse::Refused(format!(
                            "no move at epoch {caller_epoch} here (at epoch {})",
                            view.layout.epoch
                        ));
                    }
                    // A source that restarted and is refilling may lack
                    // writes it acknowledged before.
                    if !self.warm.load(Relaxed) {
                        return PeerResponse::Refused(
                            "cold: refilling after a start, not a handoff source yet".into(),
                        );
                    }
                }
                let layout = &view.layout;
                let (states, next) =
                    local
                        .store()
                        .scan_page(cursor, REFILL_PAGE_ITEMS, REFILL_PAGE_BYTES, |key| {
                            if moving {
                                layout.gains(for_node, key)
                                    && (only.is_empty()
                                        || only
                                            .binary_search(&super::ring::partition_of(
                                                key,
                                                self.partitions,
                                            ))
                                            .is_ok())
                            } else {
                                layout.writes_to(for_node, key)
                            }
                        });
                PeerResponse::Page { states, next }
            }
            PeerRequest::TransferStatus { epoch } => self.transfer_status(&view.layout, epoch),
            PeerRequest::Hint { target, key, state } => {
                if bad_key(&key) || view.peer(target).is_none() {
                    return PeerResponse::Refused("invalid hint".into());
                }
                let now_ms = local.store().clock().now_ms();
                if self.hints.lock().add(target, &key, state, now_ms) {
                    PeerResponse::Applied
                } else {
                    PeerResponse::Refused("no room for the hint".into())
                }
            }
            PeerRequest::FlushAll {
                delay_secs,
                version,
            } => {
                if flush_local(local.store(), delay_secs, version) {
                    PeerResponse::Flushed
                } else {
                    self.stats.versions_refused.fetch_add(1, Relaxed);
                    crate::warn_limited!(
                        caller,
                        version,
                        "refused a flush_all stamped too far ahead of this node's clock"
                    );
                    PeerResponse::Refused("flush version too far ahead of this node's clock".into())
                }
            }
            PeerRequest::TreeHashes { nodes } => self.serve_tree_hashes(local.store(), &nodes),
            PeerRequest::LeafEntries {
                leaves,
                max_entries,
            } => {
                self.serve_leaf_entries(local.store(), &leaves, max_entries)
                    .await
            }
            PeerRequest::FetchStates { keys } => repair::serve_fetch_states(local.store(), &keys),
            PeerRequest::Repair { states } => self.serve_repair(local.store(), &states),
            PeerRequest::ListKeys { from, to, max } => {
                listing::serve_list_keys(local.store(), from, to, max)
            }
        }
    }

    /// The answer to an [`PeerRequest::Apply`] or [`PeerRequest::ApplyIf`]:
    /// a state not taken is never a success; the replica says what it
    /// holds instead.
    fn answer_apply(
        &self,
        store: &Store,
        caller: NodeId,
        key: &[u8],
        state: &KeyState,
        applied: Applied,
    ) -> PeerResponse {
        match applied {
            Applied::Newer | Applied::Same => {
                self.stats.replica_writes_applied.fetch_add(1, Relaxed);
                PeerResponse::Applied
            }
            Applied::Older => {
                // Say what we hold (for a plain state, its records now
                // merged with the ones sent), so the sender can take it.
                self.stats.replica_writes_stale.fetch_add(1, Relaxed);
                match store.replica_state(key) {
                    Some(held) if held.version() != state.version() => PeerResponse::Newer(held),
                    // Gone since (evicted: a cache may drop anything), or
                    // the sent one after all: nothing newer to report.
                    _ => PeerResponse::Applied,
                }
            }
            Applied::Flushed => PeerResponse::Refused("older than the last flush_all".into()),
            Applied::TooFarAhead => {
                self.stats.versions_refused.fetch_add(1, Relaxed);
                crate::warn_limited!(
                    caller,
                    version = state.version(),
                    "refused a version too far ahead of this node's clock"
                );
                PeerResponse::Refused("version too far ahead of this node's clock".into())
            }
            Applied::NoMemory | Applied::NoRoom => {
                crate::warn_limited!(caller, "no memory for a replicated item");
                PeerResponse::Refused("out of memory".into())
            }
        }
    }

    /// `stats cluster`: members and their state, what each owns, counters.
    /// `stats partitions`: for every partition this node replicates, its
    /// entry count and an order-free digest (XOR of xxh3 over each key and
    /// version, tombstones included), so an operator or a test can check
    /// that replicas agree. Walks the whole store a lock's worth at a time,
    /// copying nothing, and lets other tasks run between steps.
    async fn compose_partition_digests(&self, view: &Topology, store: &Store, out: &mut Vec<u8>) {
        let partitions = view.layout.ring.partitions();
        let mut digests = vec![(0u64, 0u64); partitions as usize];
        let mut cursor = Some(0);
        while let Some(c) = cursor {
            cursor = store.digest_step(c, partitions, &mut digests);
            tokio::task::yield_now().await;
        }
        for (p, _) in view.layout.ring.partitions_of(self.me) {
            let (keys, digest) = digests[p as usize];
            put_stat(
                out,
                &format!("partition:{p}"),
                format!("keys={keys} digest={digest:016x}"),
            );
        }
        put_line(out, b"END");
    }

    /// Whether `id` is a member of the installed layout.
    pub fn is_member(&self, id: NodeId) -> bool {
        self.view.load().layout.is_member(id)
    }

    /// How long one hop to a peer may take (`request_timeout_ms`).
    pub fn call_timeout(&self) -> Duration {
        self.hop_timeout
    }

    fn compose_stats(&self, view: &Topology, local: &dyn Local, out: &mut Vec<u8>) {
        put_stat(out, "node_id", self.me);
        put_stat(out, "epoch", view.layout.epoch);
        put_stat(out, "members", view.layout.members.len());
        put_stat(
            out,
            "transfers_pending",
            self.transfers_pending(&view.layout),
        );
        put_stat(out, "layout_vote", self.acceptor.lock().standing());
        put_stat(out, "partitions", view.layout.ring.partitions());
        put_stat(out, "replicas", view.layout.ring.replicas());
        put_stat(out, "read_quorum", view.layout.read_quorum);
        put_stat(out, "write_quorum", view.layout.write_quorum);
        let (joining, leaving) = view.layout.movers();
        for m in &view.layout.members {
            let state = if m.id == self.me {
                "self".to_string()
            } else {
                match view.handle(m.id).state() {
                    PeerState::Up => "up".to_string(),
                    PeerState::Connecting => "connecting".to_string(),
                    PeerState::Down { reason } => {
                        format!("down({})", reason.replace([' ', '\r', '\n'], "_"))
                    }
                }
            };
            let (mut primary, mut replica) = (0usize, 0usize);
            for (_, pos) in view.layout.ring.partitions_of(m.id) {
                if pos == 0 {
                    primary += 1;
                } else {
                    replica += 1;
                }
            }
            let mut line = format!(
                "{state} client={} peer={} primary_partitions={primary} replica_partitions={replica}",
                m.client, m.peer
            );
            if view.layout.is_standby(m.id) {
                line.push_str(" standby=1");
            }
            if joining.contains(&m.id) {
                line.push_str(" joining=1");
            }
            if leaving.contains(&m.id) {
                line.push_str(" leaving=1");
            }
            // A round trip is reported only while the peer is up: the last
            // one measured says nothing about a peer that is down.
            let up = |p: &&PeerHandle| matches!(p.state(), PeerState::Up);
            if let Some(rtt) = view.peer(m.id).filter(up).and_then(PeerHandle::rtt) {
                line.push_str(&format!(" rtt_us={}", rtt.as_micros()));
            }
            // Anti-entropy with this peer, if this node runs it (the lower
            // id of each pair does).
            if let (Some(pair), Some(_)) = (view.ae_pair(m.id), self.anti_entropy) {
                if m.id > self.me {
                    let last = pair.last_ms.load(Relaxed);
                    line.push_str(&format!(
                        " ae_exchanges={} ae_keys_moved={}",
                        pair.exchanges.load(Relaxed),
                        pair.keys_moved.load(Relaxed)
                    ));
                    if last > 0 {
                        let ago = local.store().clock().now_ms().saturating_sub(last);
                        line.push_str(&format!(" ae_last_ms_ago={ago}"));
                    }
                }
            }
            put_stat(out, &format!("member:{}", m.id), line);
        }
        let s = &self.stats;
        for (name, v) in [
            ("forwarded", &s.forwarded),
            ("primary_writes", &s.primary_writes),
            ("replica_writes_sent", &s.replica_writes_sent),
            ("replica_writes_applied", &s.replica_writes_applied),
            ("replica_writes_stale", &s.replica_writes_stale),
            ("write_conflicts", &s.write_conflicts),
            ("write_restores", &s.write_restores),
            ("quorum_reads", &s.quorum_reads),
            ("write_quorum_failures", &s.write_quorum_failures),
            ("read_quorum_failures", &s.read_quorum_failures),
            ("timeouts", &s.timeouts),
            ("catch_up_reads", &s.catch_up_reads),
            ("read_repairs", &s.read_repairs),
            ("refill_keys", &s.refill_keys),
            ("refill_bytes", &s.refill_bytes),
            ("refill_peers_done", &s.refill_peers_done),
        ] {
            put_stat(out, name, v.load(Relaxed));
        }
        // Every refusal (replication, hints, refill, repair, catch-up,
        // flushes), as the store counts them.
        put_stat(
            out,
            "versions_refused",
            local.store().versions_too_far_ahead(),
        );
        put_stat(out, "tombstones", local.store().stats().tombstones);
        put_stat(out, "anti_entropy", u8::from(self.anti_entropy.is_some()));
        for (name, v) in [
            ("anti_entropy_rounds", &s.ae_rounds),
            (
                "anti_entropy_partitions_compared",
                &s.ae_partitions_compared,
            ),
            (
                "anti_entropy_partitions_differing",
                &s.ae_partitions_differing,
            ),
            ("anti_entropy_keys_listed", &s.ae_keys_listed),
            ("anti_entropy_keys_pulled", &s.ae_keys_pulled),
            ("anti_entropy_keys_pushed", &s.ae_keys_pushed),
            ("anti_entropy_bytes", &s.ae_bytes),
            ("anti_entropy_no_room", &s.ae_no_room),
            ("anti_entropy_errors", &s.ae_errors),
            ("stale_epoch_refused", &s.stale_epoch_refused),
            ("layouts_installed", &s.layouts_installed),
            ("handoff_keys", &s.handoff_keys),
            ("handoff_bytes", &s.handoff_bytes),
            ("handoff_keys_dropped", &s.handoff_keys_dropped),
        ] {
            put_stat(out, name, v.load(Relaxed));
        }
        let (counts, pending, bytes) = {
            let h = self.hints.lock();
            (h.counts, h.pending(), h.bytes())
        };
        put_stat(out, "sloppy_quorum", u8::from(self.sloppy_quorum));
        put_stat(out, "hints_stored", counts.stored);
        put_stat(out, "hints_delivered", counts.delivered);
        put_stat(out, "hints_dropped", counts.dropped);
        put_stat(out, "hints_expired", counts.expired);
        put_stat(out, "hints_pending", pending);
        put_stat(out, "hints_bytes", bytes);
        let t = &self.transport;
        for (name, v) in [
            ("peer_calls", &t.calls),
            ("peer_call_timeouts", &t.call_timeouts),
            ("peer_call_busy", &t.call_busy),
            ("peer_call_down", &t.call_down),
            ("peer_connects", &t.connects),
            ("peer_disconnects", &t.disconnects),
            ("peer_frames_corrupt", &t.frames_corrupt),
            ("peer_frames_oversized", &t.frames_oversized),
            ("peer_frames_dropped_fault", &t.frames_dropped_fault),
            ("peer_handshakes_refused", &t.handshakes_refused),
            ("peer_auth_failures", &t.auth_failures),
            ("peer_requests_served", &t.requests_served),
            ("peer_write_timeouts", &t.write_timeouts),
            ("peer_accepts_refused", &t.accepts_refused),
            ("peer_accepts_evicted", &t.accepts_evicted),
            ("peer_answers_over_budget", &t.answers_over_budget),
            ("peer_frames_over_budget", &t.frames_over_budget),
        ] {
            put_stat(out, name, v.load(Relaxed));
        }
        put_line(out, b"END");
    }
}

fn explain_with_self(q: &Quorum) -> String {
    // The primary itself is the first copy; the quorum tracks the others.
    format!(
        "{} of {} replicas hold the write{}",
        q.acks() + 1,
        q.needed() + 1,
        q.failures()
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    #[test]
    fn a_gets_repeated_keys_map_to_one_read_each() {
        for n in [1usize, 3, 16, 17, 40] {
            let names: Vec<String> = (0..n).map(|i| format!("k{}", i % 5)).collect();
            let line = format!("get {}\r\n", names.join(" "));
            let limits = ParseLimits::new(1024 * 1024);
            let Parsed::Complete {
                request: Request::Get(get),
                ..
            } = parse(line.as_bytes(), &limits)
            else {
                panic!("a get")
            };
            let (distinct, occurrences) = distinct_keys(&get);
            assert_eq!(distinct.len(), n.min(5), "{n} keys");
            assert_eq!(occurrences.len(), n);
            for (name, &d) in names.iter().zip(&occurrences) {
                assert_eq!(distinct[d], name.as_bytes());
            }
            assert_eq!(
                times_asked(&occurrences, distinct.len())
                    .iter()
                    .sum::<u64>(),
                n as u64
            );
        }
    }

    use super::*;
    use crate::cluster::listing::TokenKey;
    use crate::store::{ManualClock, StoreConfig};

    /// A node whose first meta get has a replicated write land on the key
    /// while it runs: the reply it composes is of the old value, the key's
    /// version afterwards the new one's.
    struct RacingLocal {
        store: Store,
        limits: ParseLimits,
        key: TokenKey,
        raced: AtomicBool,
        newer: KeyState,
        budget: Arc<InflightBudget>,
    }

    impl Local for RacingLocal {
        fn store(&self) -> &Store {
            &self.store
        }
        fn limits(&self) -> &ParseLimits {
            &self.limits
        }
        fn listing_key(&self) -> &TokenKey {
            &self.key
        }
        fn budget(&self) -> &Arc<InflightBudget> {
            &self.budget
        }
        fn execute(&self, _command: &[u8], out: &mut Vec<u8>) {
            let value = self.store.get(b"k", None, |e| e.value().to_vec());
            if !self.raced.swap(true, Relaxed) {
                assert_eq!(self.store.apply(b"k", &self.newer), Applied::Newer);
            }
            match value {
                Some(v) => {
                    out.extend_from_slice(format!("VA {}\r\n", v.len()).as_bytes());
                    out.extend_from_slice(&v);
                    out.extend_from_slice(b"\r\n");
                }
                None => out.extend_from_slice(b"EN\r\n"),
            }
        }
    }

    /// Issue 15, defect 6: a replica's meta read took its reply and its
    /// version under different locks, so a write in between paired the old
    /// reply with the new version, and that old reply then won the read.
    #[test]
    fn a_meta_read_never_pairs_an_old_reply_with_a_newer_version() {
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let store = Store::new(&StoreConfig::default(), clock);
        let state = |version: u64, value: &[u8]| KeyState::Item {
            version,
            flags: 0,
            exptime: 0,
            bits: 0,
            value: value.to_vec(),
            dedup: Vec::new(),
        };
        let old = store.next_version();
        assert_eq!(store.apply(b"k", &state(old, b"old")), Applied::Newer);
        let newer = store.next_version();
        let local = RacingLocal {
            store,
            limits: ParseLimits::new(1 << 20),
            key: TokenKey::random(),
            raced: AtomicBool::new(false),
            newer: state(newer, b"new"),
            budget: Arc::new(InflightBudget::new(1 << 20)),
        };
        let (version, reply) = read_meta_local(&local, b"k", b"mg k v\r\n").expect("settles");
        assert_eq!(
            (version, reply.as_slice()),
            (newer, &b"VA 3\r\nnew\r\n"[..]),
            "the version and the reply belong to one state"
        );
    }

    /// Issue 16, row 8: a replica built every `ReadKeys` answer (two
    /// copies of each value) before it asked the budget for room, and
    /// threw it away when there was none.
    #[test]
    fn a_replica_asks_the_budget_before_it_copies_a_value() {
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let store = Store::new(&StoreConfig::default(), clock);
        let big = |version: u64, fill: u8| KeyState::Item {
            version,
            flags: 0,
            exptime: 0,
            bits: 0,
            value: vec![fill; 300_000],
            dedup: Vec::new(),
        };
        for (key, fill) in [(b"a", b'a'), (b"b", b'b')] {
            assert_eq!(
                store.apply(key, &big(store.next_version(), fill)),
                Applied::Newer
            );
        }
        let keys = [b"a".to_vec(), b"b".to_vec()];
        let values = |answer: PeerResponse| match answer {
            PeerResponse::Values(v) => v.len(),
            other => panic!("{other:?}"),
        };
        let roomy = Arc::new(InflightBudget::new(1 << 20));
        assert_eq!(values(serve_read_keys(&store, &roomy, &keys, false)), 2);
        assert_eq!(roomy.used(), 0, "held only while the answer is built");
        // Room for one value: the answer is the prefix that fits.
        let one = Arc::new(InflightBudget::new(400_000));
        assert_eq!(values(serve_read_keys(&store, &one, &keys, false)), 1);
        // No room: refused, and the budget's other holder keeps its bytes.
        let full = Arc::new(InflightBudget::new(400_000));
        let other = Reservation::of(&full, 200_000).expect("room");
        assert!(matches!(
            serve_read_keys(&store, &full, &keys, false),
            PeerResponse::Refused(why) if why == "out of memory"
        ));
        assert_eq!(full.used(), other.bytes());
    }

    #[test]
    fn the_newest_answer_prefers_a_value_at_one_version_then_the_first() {
        let answers = [
            (1, 5, false),
            (2, 7, false),
            (3, 7, true),
            (4, 7, true),
            (5, 6, true),
        ];
        let best = newest(answers, |&(_, v, hit)| (v, hit)).unwrap();
        assert_eq!(best.0, 3, "highest version, a hit over a miss, earliest");
        assert!(newest(Vec::<(u64, bool)>::new(), |&a| a).is_none());
    }
}

/// Installing a layout: one snapshot, handles kept or made, never a member
/// without a handle.
#[cfg(test)]
mod install_tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::cluster::layout::LayoutDesc;
    use crate::cluster::ring::Ring;
    use crate::cluster::transport::{Identity, PeerKey, TcpConnector, TransportConfig};
    use crate::config::MemberConfig;

    fn member(id: NodeId) -> MemberConfig {
        // Port 1 on loopback refuses: these peers never come up.
        MemberConfig {
            id,
            client: format!("127.0.0.1:{}", 20000 + id),
            peer: "127.0.0.1:1".into(),
        }
    }

    fn layout(epoch: u64, ids: &[NodeId]) -> Layout {
        let mut config = ClusterConfig::new(1, ids.iter().map(|&id| member(id)).collect());
        config.partitions = 64;
        config.replicas = 2;
        Layout {
            epoch,
            ..Layout::of(&config)
        }
    }

    fn spawner() -> SpawnPeer {
        let identity = Identity {
            node_id: 1,
            layout: 0,
            layout_text: String::new(),
            key: PeerKey::open(),
            epoch: EpochCell::default(),
        };
        Box::new(move |m: &MemberConfig| {
            Peer::spawn(
                identity.clone(),
                m.id,
                m.peer.clone(),
                Arc::new(TcpConnector),
                TransportConfig::default(),
                Arc::new(TransportStats::default()),
            )
        })
    }

    fn cluster(ids: &[NodeId]) -> Cluster {
        let mut config = ClusterConfig::new(1, ids.iter().map(|&id| member(id)).collect());
        config.partitions = 64;
        config.replicas = 2;
        Cluster::new(
            &config,
            spawner(),
            Arc::new(TransportStats::default()),
            EpochCell::default(),
        )
    }

    fn shut_down(p: &PeerHandle) -> bool {
        matches!(p.state(), PeerState::Down { reason } if reason.contains("shut down"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_layout_keeps_staying_peers_and_shuts_down_removed_ones() {
        let c = Arc::new(cluster(&[1, 2, 3]));
        let before = c.view();
        assert_eq!(before.layout.epoch, 0);
        let (h2, h3) = (before.handle(2).clone(), before.handle(3).clone());

        // Readers load snapshots the whole time: each must name a handle
        // for every member but this node, and place keys by its own ring.
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (c, stop, running) = (c.clone(), stop.clone(), running.clone());
                std::thread::spawn(move || {
                    let mut seen = 0u64;
                    running.fetch_add(1, Relaxed);
                    loop {
                        let v = c.view();
                        for m in &v.layout.members {
                            assert_eq!(
                                v.peer(m.id).is_some(),
                                m.id != 1,
                                "epoch {}",
                                v.layout.epoch
                            );
                        }
                        assert_eq!(v.peers().count(), v.layout.members.len() - 1);
                        seen += 1;
                        if stop.load(Relaxed) {
                            break seen;
                        }
                    }
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while running.load(Relaxed) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "readers never started"
            );
            std::thread::yield_now();
        }
        for epoch in 1..=200u64 {
            let ids: &[NodeId] = if epoch % 2 == 1 {
                &[1, 2, 4]
            } else {
                &[1, 2, 3, 5]
            };
            assert_eq!(c.install_layout(layout(epoch, ids)), Ok(true));
        }
        stop.store(true, Relaxed);
        for r in readers {
            assert!(r.join().expect("no reader panicked") > 0);
        }

        let after = c.view();
        assert_eq!(after.layout.epoch, 200);
        assert_eq!(c.view().layout.member_ids(), vec![1, 2, 3, 5]);
        // Member 2 kept its address, so its handle is the same connection;
        // member 3 left at epoch 1 and its first handle was shut down (the
        // one it has now is a later one).
        assert!(after.handle(2).same_as(&h2));
        assert!(!after.handle(3).same_as(&h3));
        assert!(!shut_down(&h2));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !shut_down(&h3) {
            assert!(std::time::Instant::now() < deadline, "{:?}", h3.state());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Keys are placed by the installed ring.
        let ring = Ring::new(&[1, 2, 3, 5], 64, 2);
        for i in 0..200 {
            let key = format!("key{i}");
            let mine = ring.preference_list_for_key(key.as_bytes()).contains(&1);
            assert_eq!(c.holds(key.as_bytes()), mine, "{key}");
        }
        c.shutdown();
    }

    #[tokio::test]
    async fn a_layout_naming_this_id_at_other_addresses_removes_this_node() {
        let c = cluster(&[1, 2]);
        let mut elsewhere = layout(5, &[1, 2]);
        elsewhere.members[0].peer = "10.9.9.9:1".into();
        assert_eq!(c.install_layout(elsewhere), Ok(false));
        let removed = tokio::time::timeout(Duration::from_secs(1), c.removal_decided()).await;
        assert_eq!(removed, Ok(5), "another node has taken id 1");
        assert_eq!(c.view().layout.epoch, 0);
    }

    #[tokio::test]
    async fn a_node_never_goes_back_nor_takes_two_layouts_for_one_epoch() {
        let c = cluster(&[1, 2]);
        assert_eq!(c.install_layout(layout(3, &[1, 2, 3])), Ok(true));
        assert_eq!(c.install_layout(layout(2, &[1, 2])), Ok(false));
        assert_eq!(c.install_layout(layout(3, &[1, 2, 3])), Ok(false));
        let two = c.install_layout(layout(3, &[1, 2])).unwrap_err();
        assert!(
            two.contains("another layout for installed epoch 3"),
            "{two}"
        );
        // An older layout without this node is an error; a newer one means
        // it was removed: not installed, and the node is told to stop.
        let old_without_me = c.install_layout(layout(3, &[2, 3])).unwrap_err();
        assert!(
            old_without_me.contains("does not name node 1"),
            "{old_without_me}"
        );
        let stopped = tokio::time::timeout(Duration::from_millis(20), c.removal_decided()).await;
        assert!(stopped.is_err(), "not removed yet");
        assert_eq!(c.install_layout(layout(4, &[2, 3])), Ok(false));
        let removed = tokio::time::timeout(Duration::from_secs(1), c.removal_decided()).await;
        assert_eq!(removed, Ok(4));
        assert_eq!(c.view().layout.member_ids(), vec![1, 2, 3]);
        assert_eq!(c.view().layout.epoch, 3);
        assert_eq!(
            c.epoch.get(),
            3,
            "the transport reports the installed epoch"
        );
        c.shutdown();
    }

    #[test]
    fn a_layout_travels_whole_and_a_bad_one_is_refused() {
        let l = layout(7, &[1, 2, 5]);
        let desc = l.desc();
        assert_eq!(Layout::from_desc(&desc, 64), Ok(l.clone()));
        let refused = |edit: &dyn Fn(&mut LayoutDesc), words: &str| {
            let mut d = desc.clone();
            edit(&mut d);
            let e = Layout::from_desc(&d, 64).unwrap_err();
            assert!(e.contains(words), "{e}");
        };
        refused(&|d| d.partitions = 128, "partitions");
        refused(&|d| d.members.clear(), "0 members");
        refused(&|d| d.members.swap(0, 1), "ascending");
        refused(&|d| d.members[0].0 = 0, "ascending");
        refused(&|d| d.members[2].0 = 4096, "in 1..=4095");
        refused(&|d| d.members[1].2 = "h".repeat(257), "over 256 bytes");
        refused(&|d| d.epoch = 1 << 48, "out of range");
        refused(&|d| d.replicas = 4, "N=4");
        refused(&|d| d.read_quorum = 0, "R=0");
        refused(&|d| d.write_quorum = 3, "W=3");
        refused(
            &|d| {
                d.members = (1..=65)
                    .map(|id| (id, String::new(), String::new()))
                    .collect();
            },
            "65 members",
        );
        assert!(Layout::from_desc(&desc, 32).is_err());
    }

    /// A node whose every command run is a failure of the test: what is
    /// fenced must not run.
    struct NoRun {
        store: Store,
        limits: ParseLimits,
        key: crate::cluster::listing::TokenKey,
        budget: Arc<InflightBudget>,
        ran: std::sync::atomic::AtomicUsize,
    }

    impl NoRun {
        fn new() -> Self {
            NoRun {
                store: Store::new(
                    &crate::store::StoreConfig::default(),
                    Arc::new(crate::store::ManualClock::new(1_800_000_000_000)),
                ),
                limits: ParseLimits::new(1 << 20),
                key: crate::cluster::listing::TokenKey::random(),
                budget: Arc::new(InflightBudget::new(1 << 20)),
                ran: std::sync::atomic::AtomicUsize::new(0),
            }
        }
    }

    impl Local for NoRun {
        fn store(&self) -> &Store {
            &self.store
        }
        fn limits(&self) -> &ParseLimits {
            &self.limits
        }
        fn listing_key(&self) -> &crate::cluster::listing::TokenKey {
            &self.key
        }
        fn budget(&self) -> &Arc<InflightBudget> {
            &self.budget
        }
        fn execute(&self, _command: &[u8], out: &mut Vec<u8>) {
            self.ran.fetch_add(1, Relaxed);
            out.extend_from_slice(b"STORED\r\n");
        }
    }

    /// A request placed under an older layout is refused unexecuted, with
    /// the newer epoch; one under the node's own is served; the layout is
    /// answered to anyone.
    #[tokio::test]
    async fn a_handoff_scan_is_served_only_within_the_callers_move() {
        let c = cluster(&[1, 2]);
        let local = NoRun::new();
        let scan = |cursor| PeerRequest::Scan {
            for_node: 2,
            cursor,
            moving: true,
            only: Vec::new(),
        };
        // Nothing moving here (a node that could not fetch the caller's
        // layout): refused, never an empty page the caller would take for
        // the whole partition.
        match c.serve(&local, 2, 0, scan(0)).await {
            PeerResponse::Refused(why) => assert!(why.contains("no move"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Node 3 leaves a 3-member layout (N = 2): node 2 gains the
        // partitions node 3 held with node 1.
        let moving = layout(1, &[1, 2, 3]).moving_to(vec![1, 2]);
        assert!(moving.gains_any(2));
        assert_eq!(c.install_layout(moving), Ok(true));
        match c.serve(&local, 2, 0, scan(0)).await {
            PeerResponse::StaleEpoch { epoch: 1 } => {}
            other => panic!("{other:?}"),
        }
        match c.serve(&local, 2, 1, scan(0)).await {
            PeerResponse::Page { .. } => {}
            other => panic!("{other:?}"),
        }
        let bad = PeerRequest::Scan {
            for_node: 2,
            cursor: 0,
            moving: true,
            only: vec![3, 2],
        };
        assert!(matches!(
            c.serve(&local, 2, 1, bad).await,
            PeerResponse::Refused(_)
        ));
        c.shutdown();
    }

    #[test]
    fn a_move_settles_to_its_target_or_cancels_back() {
        let base = layout(4, &[1, 2, 3]);
        assert_eq!(base.settled(), None);
        assert_eq!(base.cancelled(), None);
        // Node 2 leaves: writes need W on both sets, so never on 2 alone.
        let moving = base.moving_to(vec![1, 3]);
        assert_eq!(moving.movers(), (vec![], vec![2]));
        let settled = moving.settled().expect("a move");
        assert_eq!(settled.member_ids(), vec![1, 3]);
        assert!(settled.target.is_none());
        assert_eq!(moving.cancelled().expect("a move"), base);
        let desc = moving.desc();
        assert_eq!(desc.target, Some(vec![1, 3]));
        assert_eq!(Layout::from_desc(&desc, 64), Ok(moving.clone()));
        let mut short = desc.clone();
        short.target = Some(vec![1]);
        assert!(Layout::from_desc(&short, 64).is_err(), "fewer than N");
        for key in (0..200).map(|i| format!("k{i}")) {
            let Need::Sets(need) = moving.write_need(key.as_bytes(), 1, 2) else {
                panic!("a move needs W on each replica set");
            };
            for (needed, nodes) in &need {
                assert!(*needed >= 1 && !nodes.contains(&1));
            }
            let new_set = moving
                .target
                .as_ref()
                .map(|m| m.ring.preference_list_for_key(key.as_bytes()).to_vec())
                .unwrap_or_default();
            // The target set's need never counts node 2.
            if let Some((_, nodes)) = need.iter().find(|(_, n)| !n.contains(&2)) {
                assert!(nodes.iter().all(|n| new_set.contains(n)), "{key}");
            }
        }
    }

    #[tokio::test]
    async fn a_request_placed_under_an_older_layout_is_refused_unexecuted() {
        let c = cluster(&[1, 2]);
        let local = NoRun::new();
        assert_eq!(c.bump_quorums(1, 1), Ok(1));
        let execute = || PeerRequest::Execute {
            command: b"set k 0 0 1\r\nv\r\n".to_vec(),
            write_quorum: 1,
        };
        let state = KeyState::Item {
            version: local.store.next_version(),
            flags: 0,
            exptime: 0,
            bits: 0,
            value: b"v".to_vec(),
            dedup: Vec::new(),
        };
        let apply = PeerRequest::Apply {
            key: b"k".to_vec(),
            state,
        };
        for stale in [execute(), apply] {
            match c.serve(&local, 2, 0, stale).await {
                PeerResponse::StaleEpoch { epoch: 1 } => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(local.ran.load(Relaxed), 0);
        assert!(local.store.replica_state(b"k").is_none(), "nothing applied");
        assert_eq!(c.stats.stale_epoch_refused.load(Relaxed), 2);
        match c.serve(&local, 2, 0, PeerRequest::LayoutGet).await {
            PeerResponse::Layout(desc) => assert_eq!(desc, c.view().layout.desc()),
            other => panic!("{other:?}"),
        }
        match c.serve(&local, 2, 1, execute()).await {
            PeerResponse::Executed { reply } => assert_eq!(reply, b"STORED\r\n"),
            other => panic!("{other:?}"),
        }
        assert_eq!(local.ran.load(Relaxed), 1);
        // A caller that is not a member gets the layout, and nothing else:
        // one behind is told the epoch (so it learns it was removed).
        match c.serve(&local, 9, 1, execute()).await {
            PeerResponse::Refused(why) => assert!(why.contains("not a member"), "{why}"),
            other => panic!("{other:?}"),
        }
        match c
            .serve(
                &local,
                9,
                0,
                PeerRequest::Scan {
                    for_node: 9,
                    cursor: 0,
                    moving: false,
                    only: Vec::new(),
                },
            )
            .await
        {
            PeerResponse::StaleEpoch { epoch: 1 } => {}
            other => panic!("{other:?}"),
        }
        match c.serve(&local, 9, 0, PeerRequest::LayoutGet).await {
            PeerResponse::Layout(_) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(local.ran.load(Relaxed), 1);
    }

    /// Member 2's peer listener on a free port, and members 1 and 2 with
    /// it as member 2's peer address.
    async fn member_2_listening() -> (tokio::net::TcpListener, Vec<MemberConfig>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b_addr = listener.local_addr().unwrap().to_string();
        let members = vec![
            member(1),
            MemberConfig {
                id: 2,
                client: "127.0.0.1:20002".into(),
                peer: b_addr,
            },
        ];
        (listener, members)
    }

    /// The caller's side of fencing, over real sockets: a node behind
    /// forwards a write to a primary ahead of it, is refused, fetches the
    /// primary's layout and sends the write once more under it. No layout
    /// follower runs here, so only the refusal can teach the caller.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_refused_for_an_older_layout_is_sent_again_under_the_newer_one() {
        let (listener, members) = member_2_listening().await;
        let node = |id: NodeId| {
            let mut config = ClusterConfig::new(id, members.clone());
            config.partitions = 64;
            config.replicas = 1;
            let identity = Identity {
                node_id: id,
                layout: 0,
                layout_text: String::new(),
                key: PeerKey::open(),
                epoch: EpochCell::default(),
            };
            let epoch = identity.epoch.clone();
            let spawn: SpawnPeer = Box::new(move |m: &MemberConfig| {
                Peer::spawn(
                    identity.clone(),
                    m.id,
                    m.peer.clone(),
                    Arc::new(TcpConnector),
                    TransportConfig::default(),
                    Arc::new(TransportStats::default()),
                )
            });
            let stats = Arc::new(TransportStats::default());
            Arc::new(Cluster::new(&config, spawn, stats, epoch))
        };
        let (a, b) = (node(1), node(2));
        let b_local = Arc::new(NoRun::new());
        {
            let (b, b_local) = (b.clone(), b_local.clone());
            tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                let identity = Identity {
                    node_id: 2,
                    layout: 0,
                    layout_text: String::new(),
                    key: PeerKey::open(),
                    epoch: b.epoch.clone(),
                };
                let handler = move |caller, epoch, req| {
                    let (b, b_local) = (b.clone(), b_local.clone());
                    async move { b.serve(&*b_local, caller, epoch, req).await }
                };
                crate::cluster::transport::serve_connection(
                    stream,
                    identity,
                    handler,
                    TransportConfig::default(),
                    Arc::new(TransportStats::default()),
                    Arc::new(InflightBudget::new(1 << 20)),
                    crate::cluster::transport::PeerConnections::unbounded()
                        .try_open(&TransportStats::default())
                        .expect("no cap"),
                )
                .await;
            });
        }
        assert_eq!(b.bump_quorums(1, 1), Ok(1));
        // A key whose one replica is node 2.
        let key = (0..)
            .map(|i| format!("key{i}"))
            .find(|k| !a.holds(k.as_bytes()))
            .unwrap();
        let raw = format!("set {key} 0 0 1\r\nv\r\n");
        let Parsed::Complete { request, .. } = parse(raw.as_bytes(), &ParseLimits::new(1 << 20))
        else {
            panic!("a set")
        };
        let a_local = NoRun::new();
        let mut out = Vec::new();
        a.coordinate(&a_local, &request, raw.as_bytes(), &mut out)
            .await;
        assert_eq!(String::from_utf8_lossy(&out), "STORED\r\n");
        assert_eq!(b.stats.stale_epoch_refused.load(Relaxed), 1);
        assert_eq!(a.stats.layouts_installed.load(Relaxed), 1);
        assert_eq!(a.view().layout.epoch, 1);
        assert_eq!(b_local.ran.load(Relaxed), 1, "executed once, under epoch 1");
        assert_eq!(a_local.ran.load(Relaxed), 0);
        a.shutdown();
        b.shutdown();
    }

    /// A primary behind the layout ships a write to a replica ahead of it:
    /// the replica refuses it unapplied, and the state is not handed to a
    /// hint holder (which would apply it behind the refusal's back); the
    /// primary takes the newer layout and ships the state again under it,
    /// so the client sees the write stored, not an error to retry. Real
    /// nodes (`server::Shared`), real sockets.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_ahead_refuses_a_stale_primarys_state_which_goes_again_under_its_layout() {
        use crate::server::Shared;
        let (listener, members) = member_2_listening().await;
        let node = |id: NodeId| {
            let mut cluster = ClusterConfig::new(id, members.clone());
            cluster.partitions = 64;
            cluster.replicas = 2;
            cluster.write_quorum = Some(2);
            let config = crate::config::Config {
                memory_limit_mb: 8,
                cluster: Some(cluster.clone()),
                ..crate::config::Config::default()
            };
            let identity = crate::server::cluster::identity(&cluster, PeerKey::open());
            let c = Arc::new(crate::server::cluster::connect_peers(
                &cluster,
                &identity,
                Arc::new(TcpConnector),
                |_| TransportConfig::default(),
            ));
            let clock: Arc<dyn crate::store::Clock> = Arc::new(crate::store::SystemClock);
            (
                Arc::new(Shared::new(&config, clock, 0, Some(c.clone()))),
                c,
                identity,
            )
        };
        let (a_shared, a, _) = node(1);
        let (b_shared, b, b_identity) = node(2);
        let b_node = b_shared.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            crate::server::cluster::serve_peer_connection(stream, b_identity, b_shared).await;
        });
        assert_eq!(b.bump_quorums(1, 2), Ok(1));
        // A key whose primary is node 1.
        let key = (0..)
            .map(|i| format!("key{i}"))
            .find(|k| a.view().layout.ring.preference_list_for_key(k.as_bytes())[0] == 1)
            .unwrap();
        let raw = format!("set {key} 0 0 1\r\nv\r\n");
        let Parsed::Complete { request, .. } = parse(raw.as_bytes(), &ParseLimits::new(1 << 20))
        else {
            panic!("a set")
        };
        let mut out = Vec::new();
        a.coordinate(&*a_shared, &request, raw.as_bytes(), &mut out)
            .await;
        assert_eq!(String::from_utf8_lossy(&out), "STORED\r\n");
        assert_eq!(b.stats.stale_epoch_refused.load(Relaxed), 1);
        assert_eq!(
            a.view().layout.epoch,
            1,
            "the primary took the newer layout"
        );
        assert_eq!(
            a.hints.lock().targets(),
            Vec::<NodeId>::new(),
            "nothing hinted"
        );
        let held = |shared: &crate::server::Shared| {
            Local::store(shared)
                .replica_state(key.as_bytes())
                .map(|s| s.version())
        };
        let at_primary = held(&a_shared).expect("the primary holds the write");
        assert_eq!(
            held(&b_node),
            Some(at_primary),
            "the replica ahead took the same state, under its layout"
        );
        a.shutdown();
        b.shutdown();
    }
}
