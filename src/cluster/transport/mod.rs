//! Node-to-node transport: multiplexed request/response over one connection
//! per peer, in [`frame`]s of `length | crc32 | postcard payload`.
//!
//! ```text
//!  caller ──call()──▶ Peer ─┬─ pending: id → oneshot   (bounded: inflight_max)
//!                           └─ outbox (bounded mpsc) ──▶ writer ──▶ socket
//!                  reader ◀── socket: Response{id} ─▶ pending[id]   Pong ─▶ heartbeat
//!
//!  accept ──▶ Slot (PeerConnections: ≤ total, ≤ per member) ──▶ serve_connection:
//!             Hello → Challenge → Proof (both sides prove the cluster key:
//!             see [`auth`]) → Welcome | Refused
//!             Request{id} (> 16 KiB: budget first) ──▶ spawn handler (≤ inflight_max
//!             at once) ──▶ Response{id} (counted: allowance | budget | Failed) ──▶ writer
//! ```
//!
//! The message types are the caller's (`Req`, `Resp`); this module adds only
//! the envelope: a handshake that checks both nodes agree on the cluster
//! layout, request ids, and heartbeats. A [`Peer`] owns a background task that
//! dials, handshakes, reconnects with exponential backoff and full jitter, and
//! pings; calls never wait on a dead peer: while it is down they fail at once
//! with [`CallError::Down`], and a full queue is [`CallError::Busy`]. Sockets
//! come from an injected [`Connector`], so simulation tests can swap TCP for
//! turmoil.
//!
//! Bounds hold for a peer that passed the handshake too (issue 16): the
//! acceptor caps its connections ([`admission`]); a large frame is read
//! only once the node's in-flight budget holds its length ([`reader`]); an
//! answer is counted in the budget from before it is queued until it is
//! written ([`answers`]); and a write that makes no progress for
//! [`WRITE_STALL_PERIODS_MAX`] periods ends the connection, on both sides,
//! freeing everything queued on it.
//!
//! An injected partition ([`BlockedPeers`], in [`TransportStats::blocked`])
//! drops every frame to and from the members it names, on both the dialling
//! and the accepting side, so callers see what a real partition shows them:
//! timeouts, then the peer down.

pub mod admission;
mod answers;
pub mod auth;
pub mod blocked;
pub mod frame;
mod reader;

use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use admission::{PeerConnections, Slot};
use answers::{Answers, Held, OUT_OF_MEMORY};
pub use blocked::BlockedPeers;
use frame::{Decoded, FrameError};
use reader::{FrameBudget, FrameReader};

pub use auth::PeerKey;
use auth::{Nonce, Role, Transcript};

use crate::budget::{INFLIGHT_FREE_BYTES, InflightBudget};
use crate::limits::HANDSHAKE_LAYOUT_TEXTS_MAX;

/// A node's id in the cluster (fits the HLC's 12 node bits).
pub type NodeId = u16;

/// Default time a call waits for its answer.
pub const CALL_TIMEOUT_MS_DEFAULT: u64 = 1000;
/// Default time to dial a peer and complete the handshake.
pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 500;
/// Default bound on calls in flight to one peer (and on requests one served
/// connection runs at once).
pub const INFLIGHT_MAX_DEFAULT: usize = 1024;
/// Default bound on one frame's payload.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 4 * 1024 * 1024;
/// Default first reconnect backoff, in milliseconds.
pub const BACKOFF_MIN_MS_DEFAULT: u64 = 20;
/// Default largest reconnect backoff, in milliseconds.
pub const BACKOFF_MAX_MS_DEFAULT: u64 = 2000;
/// Default interval between heartbeat pings.
pub const HEARTBEAT_INTERVAL_MS_DEFAULT: u64 = 250;

/// A writer gathers queued frames into one write up to about this many bytes
/// (plus one frame), so small messages share syscalls without an unbounded
/// buffer.
pub const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;
/// Room reserved in a read buffer before each read.
pub const READ_CHUNK_BYTES: usize = crate::limits::READ_CHUNK_BYTES;
/// Heartbeat frames queued at once per connection: one ping (or pong) is in
/// flight at a time, so this never fills in normal operation.
pub const CONTROL_QUEUE_FRAMES: usize = 2;
/// A served connection that sends no frame for this many
/// `call_timeout + heartbeat_interval` periods is dropped: a live peer pings
/// at least once per such period, so it is a peer that died silently.
pub const IDLE_PERIODS_MAX: u32 = 2;
/// A write that makes no progress for this many
/// `call_timeout + heartbeat_interval` periods ends its connection, on
/// either side. A live peer reads all the time: the dialling side's reader
/// only hands answers to calls, and the accepting side's is held up only
/// while a handler slot or budget room frees, for at most a call timeout.
/// Past one period the peer has given up on the connection anyway (our
/// answer to its ping is behind the stuck write, so its heartbeat fails);
/// the second is margin, as for [`IDLE_PERIODS_MAX`].
pub const WRITE_STALL_PERIODS_MAX: u32 = 2;
/// Frames one write takes at most: small frames share a syscall, each
/// written from its own buffer (no copy to hold beside it).
pub const WRITE_BATCH_FRAMES_MAX: usize = 128;
/// Doublings of the backoff before it stays at its cap (2^16 × backoff_min is
/// far past any sane backoff_max).
pub const BACKOFF_DOUBLINGS_MAX: u32 = 16;
/// Version of the envelope below; nodes that speak different ones refuse
/// each other in the handshake. 4: the handshake authenticates both sides.
/// 5: the handshake, pongs and requests carry the sender's layout epoch.
/// 6: a node may dial as a joiner, and layouts name standby members.
pub const WIRE_VERSION: u16 = 7;

const _: () = assert!(BACKOFF_MIN_MS_DEFAULT <= BACKOFF_MAX_MS_DEFAULT);
const _: () = assert!(HEARTBEAT_INTERVAL_MS_DEFAULT < CALL_TIMEOUT_MS_DEFAULT);
const _: () = assert!(FRAME_BYTES_MAX_DEFAULT <= frame::FRAME_PAYLOAD_BYTES_LIMIT);
const _: () = assert!(INFLIGHT_MAX_DEFAULT > 0 && CONTROL_QUEUE_FRAMES > 0);
const _: () = assert!(
    IDLE_PERIODS_MAX >= 2 && WRITE_STALL_PERIODS_MAX >= 2,
    "one period is too tight for a live peer"
);
const _: () = assert!(WRITE_BATCH_FRAMES_MAX > 1);

/// Timeouts and bounds of the transport; the same for every peer of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportConfig {
    /// How long [`Peer::call`] waits for an answer, and how long a heartbeat
    /// may go unanswered before the peer is marked down.
    pub call_timeout: Duration,
    /// How long dialling plus the handshake may take, on either side.
    pub connect_timeout: Duration,
    /// Calls in flight per peer; beyond it [`Peer::call`] fails fast with
    /// [`CallError::Busy`]. Also the requests one served connection runs at
    /// once before it stops reading.
    pub inflight_max: usize,
    /// Largest frame payload sent or accepted; a peer sending a larger one is
    /// disconnected.
    pub frame_bytes_max: usize,
    /// Reconnect backoff: the cap starts here and doubles per failed attempt.
    pub backoff_min: Duration,
    /// Reconnect backoff cap.
    pub backoff_max: Duration,
    /// Interval between heartbeat pings on an idle or busy connection alike.
    pub heartbeat_interval: Duration,
    /// Seed of the reconnect jitter; `None` seeds from the wall clock. A
    /// simulation sets it so a seed replays the same run.
    pub jitter_seed: Option<u64>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_millis(CALL_TIMEOUT_MS_DEFAULT),
            connect_timeout: Duration::from_millis(CONNECT_TIMEOUT_MS_DEFAULT),
            inflight_max: INFLIGHT_MAX_DEFAULT,
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            backoff_min: Duration::from_millis(BACKOFF_MIN_MS_DEFAULT),
            backoff_max: Duration::from_millis(BACKOFF_MAX_MS_DEFAULT),
            heartbeat_interval: Duration::from_millis(HEARTBEAT_INTERVAL_MS_DEFAULT),
            jitter_seed: None,
        }
    }
}

impl TransportConfig {
    /// Programmer errors in a config: the config loader validates user input
    /// before it gets here.
    fn assert_valid(&self) {
        assert!(self.inflight_max > 0, "inflight_max must be positive");
        assert!(
            self.frame_bytes_max <= frame::FRAME_PAYLOAD_BYTES_LIMIT,
            "frame_bytes_max {} exceeds the u32 length field",
            self.frame_bytes_max
        );
        assert!(
            !self.heartbeat_interval.is_zero(),
            "heartbeat_interval must be positive"
        );
        assert!(
            self.backoff_min <= self.backoff_max,
            "backoff_min exceeds backoff_max"
        );
    }

    /// Silence after which a served connection is presumed dead.
    fn idle_timeout(&self) -> Duration {
        (self.call_timeout + self.heartbeat_interval) * IDLE_PERIODS_MAX
    }

    /// How long a write may make no progress before its connection ends.
    fn write_stall_timeout(&self) -> Duration {
        (self.call_timeout + self.heartbeat_interval) * WRITE_STALL_PERIODS_MAX
    }

    /// How long a large incoming frame waits for room in the in-flight
    /// budget: the caller's own patience, past which it has given up.
    fn budget_wait(&self) -> Duration {
        self.call_timeout
    }
}

/// Identity checked in the handshake: both ends must have equal `layout` hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// This node's id.
    pub node_id: NodeId,
    /// Hash of the cluster layout (members, partitions, replication) this
    /// node runs with; nodes that disagree would place keys differently.
    pub layout: u64,
    /// The layout in words, quoted in refusals so an operator can see what differs.
    pub layout_text: String,
    /// The key both sides of a handshake prove they hold.
    pub key: PeerKey,
    /// The epoch of the layout this node has installed, shared with its
    /// cluster: sent in the handshake and in pongs, and stamped on
    /// requests that name no other.
    pub epoch: EpochCell,
}

/// A node's installed layout epoch, shared by its cluster (which sets it)
/// and its transport (which reports it).
#[derive(Clone, Debug, Default)]
pub struct EpochCell(Arc<AtomicU64>);

impl EpochCell {
    /// The epoch now.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }

    /// Records an installed epoch (never lower than the one before).
    pub fn set(&self, epoch: u64) {
        self.0.fetch_max(epoch, Relaxed);
    }
}

impl PartialEq for EpochCell {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for EpochCell {}

/// Counters (AtomicU64, Relaxed), shared by every peer and the acceptor of one node.
#[derive(Default, Debug)]
pub struct TransportStats {
    /// Calls made through any [`Peer`].
    pub calls: AtomicU64,
    /// Calls that got no answer in time.
    pub call_timeouts: AtomicU64,
    /// Calls refused because the in-flight bound was reached.
    pub call_busy: AtomicU64,
    /// Calls not sent because the peer was down, refused us, or the request
    /// could not be encoded.
    pub call_down: AtomicU64,
    /// Frames received with a bad checksum or an undecodable payload.
    pub frames_corrupt: AtomicU64,
    /// Frame headers received that announced a payload over `frame_bytes_max`.
    pub frames_oversized: AtomicU64,
    /// Outgoing connections that completed the handshake.
    pub connects: AtomicU64,
    /// Outgoing connections lost after completing the handshake.
    pub disconnects: AtomicU64,
    /// Handshakes this node refused as a server (layout or version mismatch).
    pub handshakes_refused: AtomicU64,
    /// Handshakes, either side, whose other side did not prove it holds
    /// the cluster key (`peer_auth_failures`).
    pub auth_failures: AtomicU64,
    /// Limits the warnings about them.
    pub auth_failure_log: crate::log_limit::LogLimit,
    /// Requests this node's handlers answered.
    pub requests_served: AtomicU64,
    /// Connections, either side, ended by a write that made no progress
    /// for [`WRITE_STALL_PERIODS_MAX`] periods (a peer that does not read).
    pub write_timeouts: AtomicU64,
    /// Accepted connections closed at once: [`PeerConnections`]' total cap
    /// was reached.
    pub accepts_refused: AtomicU64,
    /// Accepted connections closed because a newer one named the same
    /// member past its cap.
    pub accepts_evicted: AtomicU64,
    /// Answers replaced by a small `Failed` (out of memory) because the
    /// in-flight budget had no room for them, or the connection's last
    /// answer did not fit and one its size still would not.
    pub answers_over_budget: AtomicU64,
    /// Connections dropped because a large incoming frame found no room in
    /// the in-flight budget within its wait.
    pub frames_over_budget: AtomicU64,
    /// Frames dropped, sent or received, because the other end is in
    /// [`TransportStats::blocked`] (an injected partition).
    pub frames_dropped_fault: AtomicU64,
    /// Members whose traffic is dropped (`[faults] drop_peers`). Not a
    /// counter: it lives here because this is the one value every peer and
    /// the acceptor of a node share, and it is empty unless a test asks.
    pub blocked: BlockedPeers,
    /// The newest layout epoch any peer has reported above this node's
    /// own, and the peer that reported it: `epoch << 16 | node` (0: none).
    newer_epoch: AtomicU64,
    /// Woken when `newer_epoch` grows, for the task that fetches the
    /// layout.
    pub newer_epoch_seen: tokio::sync::Notify,
}

impl TransportStats {
    /// Notes that `peer` reports layout epoch `epoch` while this node is at
    /// `mine`: a newer one than any noted before wakes
    /// [`TransportStats::newer_epoch_seen`]. One atomic load when it is not
    /// newer, so it runs on every request.
    #[inline]
    pub fn note_epoch(&self, peer: NodeId, epoch: u64, mine: u64) {
        if epoch <= mine || epoch >= 1 << 48 {
            return;
        }
        let packed = epoch << 16 | u64::from(peer);
        if self.newer_epoch.load(Relaxed) >> 16 < epoch
            && self.newer_epoch.fetch_max(packed, Relaxed) >> 16 < epoch
        {
            self.newer_epoch_seen.notify_one();
        }
    }

    /// Forgets the newest reported epoch, after a fetch from its reporter
    /// led nowhere: the next report, from any peer, counts again.
    pub fn forget_newer_epoch(&self) {
        self.newer_epoch.store(0, Relaxed);
    }

    /// The newest epoch a peer reported above `mine`, and that peer.
    pub fn newer_epoch(&self, mine: u64) -> Option<(u64, NodeId)> {
        let packed = self.newer_epoch.load(Relaxed);
        let epoch = packed >> 16;
        (epoch > mine).then_some((epoch, (packed & 0xffff) as NodeId))
    }

    /// Whether a frame to or from `peer` is dropped by an injected
    /// partition; counts it if so.
    #[inline]
    fn drops(&self, peer: NodeId) -> bool {
        let blocked = self.blocked.contains(peer);
        if blocked {
            self.frames_dropped_fault.fetch_add(1, Relaxed);
        }
        blocked
    }
}

/// How a node opens connections: real TCP here; the simulation tests will supply a turmoil one.
pub trait Connector: Send + Sync + 'static {
    /// The byte stream a connection runs over.
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// Opens a stream to `addr` (`host:port`); the caller bounds the wait.
    fn connect(
        &self,
        addr: &str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Self::Stream>> + Send + 'static>>;
}

/// Plain TCP with Nagle off: frames are small and latency-bound.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    type Stream = tokio::net::TcpStream;

    fn connect(
        &self,
        addr: &str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Self::Stream>> + Send + 'static>> {
        let addr = addr.to_owned();
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

/// Why a call failed, and whether the peer may have acted on it.
#[derive(Error, Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Not connected (and why, e.g. "connection refused"), or the request
    /// could not be encoded. The request was NOT sent.
    #[error("peer down: {0}")]
    Down(String),
    /// The peer's in-flight bound was reached. NOT sent.
    #[error("peer busy: too many calls in flight")]
    Busy,
    /// The peer refused our handshake (the layouts disagree; the message says
    /// how). NOT sent.
    #[error("peer refused us: {0}")]
    Refused(String),
    /// Sent, no answer within the timeout: may or may not have been applied.
    #[error("call timed out")]
    Timeout,
    /// Sent, and the connection dropped before the answer (or the peer could
    /// not encode its answer): may or may not have been applied.
    #[error("connection lost before the answer")]
    Disconnected,
}

impl CallError {
    /// Whether the peer may have applied the request: true for
    /// [`CallError::Timeout`] and [`CallError::Disconnected`].
    pub fn maybe_applied(&self) -> bool {
        matches!(self, CallError::Timeout | CallError::Disconnected)
    }
}

/// A peer's connection state as its calls see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// The first dial has not finished yet.
    Connecting,
    /// Connected and handshaken: calls are sent.
    Up,
    /// Not connected (redialling in the background); calls fail at once.
    Down {
        /// Why the last dial or connection failed, e.g. "connection refused".
        reason: String,
    },
}

// ---------------------------------------------------------------------------
// Wire envelope. Handshake messages are separate types so a connection
// accepts exactly one of them, first.

/// First frame from the dialling node. The version comes first, so a
/// node of another version can still read it and say why it refuses.
#[derive(Serialize, Deserialize, Debug)]
struct Hello {
    wire_version: u16,
    node_id: NodeId,
    nonce: Nonce,
}

/// The accepting node's answer to [`Hello`]: its proof, or a refusal that
/// names only the wire versions.
#[derive(Serialize, Deserialize, Debug)]
enum Challenge {
    Prove {
        node_id: NodeId,
        nonce: Nonce,
        proof: auth::Proof,
    },
    Refused {
        reason: String,
    },
}

/// The dialling node's proof, sent once the acceptor has proved itself,
/// with the layout it runs.
#[derive(Serialize, Deserialize, Debug)]
struct Proven {
    proof: auth::Proof,
    layout: u64,
    layout_text: String,
    epoch: u64,
    /// A node starting with `--join`: it has no layout yet, so its
    /// `layout` is not checked, and the Welcome tells it the cluster's.
    joining: bool,
}

/// The accepting node's verdict on [`Proven`].
#[derive(Serialize, Deserialize, Debug)]
enum HelloReply {
    Welcome {
        node_id: NodeId,
        epoch: u64,
        /// To a joining dialler only: the cluster's layout hash and text,
        /// which its later handshakes must show.
        cluster: Option<(u64, String)>,
    },
    Refused {
        reason: String,
    },
}

/// What an acceptor answers a dialler that did not prove it holds the key:
/// nothing about the cluster.
const AUTH_REFUSAL: &str = "authentication failed";

/// Frames from the dialling node after the handshake.
#[derive(Serialize, Deserialize, Debug)]
enum ToServer<Req> {
    Ping { id: u64 },
    Request { id: u64, epoch: u64, body: Req },
}

/// Frames from the accepting node after the handshake.
#[derive(Serialize, Deserialize, Debug)]
enum ToClient<Resp> {
    Pong {
        id: u64,
        epoch: u64,
    },
    /// An answer, with the answering node's layout epoch when it sent it.
    Response {
        id: u64,
        epoch: u64,
        body: Resp,
    },
    /// The handler answered but the answer could not be sent (too large to
    /// encode); the caller gets [`CallError::Disconnected`].
    Failed {
        id: u64,
        reason: String,
    },
}

/// Why a connection (or an attempt at one) ended; becomes a Down reason.
#[derive(Error, Debug)]
enum LinkError {
    #[error("{0}")]
    Connect(io::Error),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed by the peer")]
    Closed,
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    AuthFailed(String),
    #[error("no heartbeat answer within {0:?}")]
    HeartbeatTimeout(Duration),
    #[error("no frame for {0:?}")]
    Idle(Duration),
    #[error("connect and handshake took over {0:?}")]
    ConnectTimeout(Duration),
    #[error("no write progress for {0:?}")]
    WriteStalled(Duration),
    #[error("no room in the in-flight budget for a {bytes}-byte frame within {waited:?}")]
    OverBudget { bytes: usize, waited: Duration },
    #[error("a newer connection of the same member replaced this one")]
    Evicted,
}

/// Counts a received bad frame; returns whether it was one.
fn count_frame_error(stats: &TransportStats, e: &LinkError) -> bool {
    match e {
        LinkError::Frame(FrameError::Oversized { .. }) => {
            stats.frames_oversized.fetch_add(1, Relaxed);
            true
        }
        LinkError::Frame(FrameError::Checksum | FrameError::Decode(_)) => {
            stats.frames_corrupt.fetch_add(1, Relaxed);
            true
        }
        _ => false,
    }
}

/// Encodes a frame we build ourselves from fixed-size fields.
///
/// # Panics
/// If it does not fit `frame_bytes_max`, which only a config with an absurd
/// limit (a few bytes) can cause.
fn encode_control<T: Serialize>(msg: &T, frame_bytes_max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(msg, &mut out, frame_bytes_max).expect("a control frame always encodes");
    out
}

/// Reads until one whole frame is in `buf`, takes it out and returns it.
/// Only for a dial's handshake reply, from a configured member's address;
/// connections read through a [`FrameReader`].
async fn read_frame<R, T>(rd: &mut R, buf: &mut BytesMut, max: usize) -> Result<T, LinkError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    loop {
        if let Decoded::Frame { msg, consumed } = frame::decode::<T>(buf, max)? {
            buf.advance(consumed);
            return Ok(msg);
        }
        reserve_for_frame(buf);
        if rd.read_buf(buf).await? == 0 {
            return Err(LinkError::Closed);
        }
    }
}

/// Makes room for the rest of the frame at the front of `buf` (its length
/// was checked against the limit by `decode`), or for one read chunk.
fn reserve_for_frame(buf: &mut BytesMut) {
    let want = frame::announced_payload_bytes(buf)
        .map_or(READ_CHUNK_BYTES, |len| {
            (frame::FRAME_HEADER_BYTES + len).saturating_sub(buf.len())
        })
        .max(READ_CHUNK_BYTES);
    buf.reserve(want);
}

/// A frame taken from a connection's queues.
enum Queued<T> {
    /// A ping or pong.
    Control(Vec<u8>),
    /// A request or answer, with whatever it holds until it is written.
    Data(T),
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Queued<T> {
    fn as_ref(&self) -> &[u8] {
        match self {
            Queued::Control(frame) => frame,
            Queued::Data(frame) => frame.as_ref(),
        }
    }
}

/// Sends queued frames, control frames first, up to
/// [`WRITE_BATCH_FRAMES_MAX`] (and about [`WRITE_BATCH_BYTES_MAX`]) in one
/// vectored write, each from its own buffer: a frame is dropped, giving back
/// what it holds, once it is written whole, and no copy of it is kept
/// beside it. Returns when the queues close (the connection is being
/// dropped), a write fails, or a write makes no progress for `stall`
/// (counted in [`TransportStats::write_timeouts`]).
async fn write_loop<W, T>(
    mut wr: W,
    mut data: mpsc::Receiver<T>,
    mut control: mpsc::Receiver<Vec<u8>>,
    stall: Duration,
    stats: &TransportStats,
) -> LinkError
where
    W: AsyncWrite + Unpin,
    T: AsRef<[u8]>,
{
    // Frames taken and not yet written whole, oldest first; `written`
    // bytes of the first one are out already.
    let mut batch: VecDeque<Queued<T>> = VecDeque::with_capacity(WRITE_BATCH_FRAMES_MAX);
    let mut written = 0;
    loop {
        if batch.is_empty() {
            tokio::select! {
                biased;
                Some(frame) = control.recv() => batch.push_back(Queued::Control(frame)),
                Some(frame) = data.recv() => batch.push_back(Queued::Data(frame)),
                else => return LinkError::Closed,
            }
        }
        let mut queued = batch.iter().map(|f| f.as_ref().len()).sum::<usize>() - written;
        while queued < WRITE_BATCH_BYTES_MAX && batch.len() < WRITE_BATCH_FRAMES_MAX {
            let frame = if let Ok(frame) = control.try_recv() {
                Queued::Control(frame)
            } else if let Ok(frame) = data.try_recv() {
                Queued::Data(frame)
            } else {
                break;
            };
            queued += frame.as_ref().len();
            batch.push_back(frame);
        }
        let wrote = {
            let mut slices = [IoSlice::new(&[]); WRITE_BATCH_FRAMES_MAX];
            for (slice, (i, frame)) in slices.iter_mut().zip(batch.iter().enumerate()) {
                let skip = if i == 0 { written } else { 0 };
                *slice = IoSlice::new(&frame.as_ref()[skip..]);
            }
            let slices = &slices[..batch.len()];
            match within(stall, wr.write_vectored(slices)).await {
                None => {
                    stats.write_timeouts.fetch_add(1, Relaxed);
                    return LinkError::WriteStalled(stall);
                }
                Some(Err(e)) => return LinkError::Io(e),
                Some(Ok(0)) => return LinkError::Io(io::ErrorKind::WriteZero.into()),
                Some(Ok(n)) => n,
            }
        };
        let mut left = wrote;
        while left > 0 {
            let front = batch
                .front()
                .expect("a write takes no more than it is given");
            let rest = front.as_ref().len() - written;
            if left < rest {
                written += left;
                break;
            }
            left -= rest;
            written = 0;
            batch.pop_front();
        }
        if batch.is_empty() {
            match within(stall, wr.flush()).await {
                None => {
                    stats.write_timeouts.fetch_add(1, Relaxed);
                    return LinkError::WriteStalled(stall);
                }
                Some(Err(e)) => return LinkError::Io(e),
                Some(Ok(())) => {}
            }
        }
    }
}

/// Runs `io` to its end, or gives up (`None`) once it has waited `stall`.
/// Polls it once before making the timer: most writes finish at once, and
/// then the write path makes no timer at all.
async fn within<F: Future>(stall: Duration, io: F) -> Option<F::Output> {
    let mut io = std::pin::pin!(io);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(io.as_mut().poll(cx))).await;
    match first {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => tokio::time::timeout(stall, io).await.ok(),
    }
}

/// Dials `addr` and handshakes (see [`auth`]): sends a nonce, checks the
/// acceptor's proof, then sends its own with the layout. `expect` is the
/// node id that should answer there (none for a probe).
async fn dial<C: Connector>(
    connector: &C,
    me: &Identity,
    addr: &str,
    expect: Option<NodeId>,
    frame_bytes_max: usize,
) -> Result<(C::Stream, BytesMut, u64), LinkError> {
    let mut stream = connector.connect(addr).await.map_err(LinkError::Connect)?;
    let (buf, epoch, _) =
        dial_handshake(&mut stream, me, addr, expect, false, frame_bytes_max).await?;
    Ok((stream, buf, epoch))
}

/// The dialling side of the handshake on `stream`, connected to `addr`:
/// what was read past the Welcome, the acceptor's epoch and, if
/// `joining`, the cluster's layout hash and text; or why there was none.
async fn dial_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    me: &Identity,
    addr: &str,
    expect: Option<NodeId>,
    joining: bool,
    frame_bytes_max: usize,
) -> Result<(BytesMut, u64, Option<(u64, String)>), LinkError> {
    let dialler_nonce = auth::nonce();
    let mut out = Vec::new();
    let hello = Hello {
        wire_version: WIRE_VERSION,
        node_id: me.node_id,
        nonce: dialler_nonce,
    };
    frame::encode(&hello, &mut out, frame_bytes_max)?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let (acceptor, acceptor_nonce, proof) =
        match read_frame::<_, Challenge>(stream, &mut buf, frame_bytes_max).await? {
            Challenge::Prove {
                node_id,
                nonce,
                proof,
            } => (node_id, nonce, proof),
            Challenge::Refused { reason } => return Err(LinkError::Refused(reason)),
        };
    let transcript = Transcript::of(me.node_id, acceptor, dialler_nonce, acceptor_nonce);
    if !me.key.verify(Role::Acceptor, &transcript, &proof) {
        // An empty proof and no layout, so that a member with another key
        // counts the failure too, and learns nothing.
        let empty = Proven {
            proof: [0; 32],
            layout: 0,
            layout_text: String::new(),
            epoch: 0,
            joining: false,
        };
        out.clear();
        frame::encode(&empty, &mut out, frame_bytes_max)?;
        // Best effort: the handshake has failed whatever happens to it.
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
        return Err(LinkError::AuthFailed(format!(
            "the node at {addr} does not hold this cluster's key (cluster.secret_file differs)"
        )));
    }
    if let Some(expected) = expect.filter(|&e| e != acceptor) {
        return Err(LinkError::Refused(format!(
            "expected node {expected} at {addr}, found node {acceptor}"
        )));
    }
    let proven = Proven {
        proof: me.key.prove(Role::Dialler, &transcript),
        layout: me.layout,
        layout_text: me.layout_text.clone(),
        epoch: me.epoch.get(),
        joining,
    };
    out.clear();
    frame::encode(&proven, &mut out, frame_bytes_max)?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    match read_frame::<_, HelloReply>(stream, &mut buf, frame_bytes_max).await? {
        HelloReply::Welcome { epoch, cluster, .. } => Ok((buf, epoch, cluster)),
        HelloReply::Refused { reason } if reason == AUTH_REFUSAL => Err(LinkError::AuthFailed(
            format!("the node at {addr} refused this node's key (cluster.secret_file differs)"),
        )),
        HelloReply::Refused { reason } => Err(LinkError::Refused(reason)),
    }
}

/// One-shot startup check: connect, handshake, disconnect. Ok(()) if layouts agree;
/// Err(CallError::Refused(reason)) if the peer refused us; Err(Down(..)) if unreachable.
///
/// # Errors
/// As above; a connection that fails mid-handshake or takes over `timeout`
/// is `Down`.
pub async fn probe<C: Connector>(
    connector: &C,
    me: &Identity,
    addr: &str,
    timeout: Duration,
) -> Result<(), CallError> {
    let dialled = tokio::time::timeout(
        timeout,
        dial(connector, me, addr, None, FRAME_BYTES_MAX_DEFAULT),
    )
    .await;
    match dialled {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(LinkError::Refused(reason) | LinkError::AuthFailed(reason))) => {
            Err(CallError::Refused(reason))
        }
        Ok(Err(e)) => Err(CallError::Down(e.to_string())),
        Err(_) => Err(CallError::Down(
            LinkError::ConnectTimeout(timeout).to_string(),
        )),
    }
}

/// What a joining node learns from one call to a member ([`call_joining`]).
#[derive(Debug)]
pub struct Joined<Resp> {
    /// The member's answer.
    pub answer: Resp,
    /// The cluster's layout hash and text, which this node's handshakes
    /// must show from now on.
    pub cluster: (u64, String),
}

/// One request from a node that is not a member yet (`--join`): dials
/// `addr` as a joiner (its layout is not checked; the member tells it the
/// cluster's), sends `request`, waits for the answer, and closes; all
/// within `timeout`.
///
/// # Errors
/// `Refused` if the member refused the handshake (another wire version,
/// another secret: the reason names it), `Down` if it could not be
/// reached or did not answer in time.
pub async fn call_joining<C, Req, Resp>(
    connector: &C,
    me: &Identity,
    addr: &str,
    request: Req,
    timeout: Duration,
) -> Result<Joined<Resp>, CallError>
where
    C: Connector,
    Req: Serialize,
    Resp: DeserializeOwned,
{
    let max = FRAME_BYTES_MAX_DEFAULT;
    let exchange = async {
        let mut stream = connector.connect(addr).await.map_err(LinkError::Connect)?;
        let (mut buf, _, cluster) = dial_handshake(&mut stream, me, addr, None, true, max).await?;
        let Some(cluster) = cluster else {
            return Err(LinkError::Refused(format!(
                "the node at {addr} did not take this node as a joiner"
            )));
        };
        let mut out = Vec::new();
        frame::encode(
            &ToServer::Request {
                id: 1,
                epoch: 0,
                body: request,
            },
            &mut out,
            max,
        )?;
        stream.write_all(&out).await?;
        stream.flush().await?;
        loop {
            match read_frame::<_, ToClient<Resp>>(&mut stream, &mut buf, max).await? {
                ToClient::Response { id: 1, body, .. } => return Ok((body, cluster)),
                ToClient::Failed { reason, .. } => return Err(LinkError::Refused(reason)),
                _ => {}
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok((answer, cluster))) => Ok(Joined { answer, cluster }),
        Ok(Err(LinkError::Refused(reason) | LinkError::AuthFailed(reason))) => {
            Err(CallError::Refused(reason))
        }
        Ok(Err(e)) => Err(CallError::Down(e.to_string())),
        Err(_) => Err(CallError::Down(format!(
            "no answer from {addr} within {timeout:?}"
        ))),
    }
}

// ---------------------------------------------------------------------------
// Client side.

/// What calls need to know about the connection, published by the peer task.
#[derive(Debug)]
struct Link {
    /// The state [`Peer::state`] reports.
    state: PeerState,
    /// Queue into the current connection's writer; `Some` exactly while `Up`.
    outbox: Option<mpsc::Sender<Vec<u8>>>,
    /// While `Down`: whether because the peer refused our handshake.
    refused: bool,
}

/// What calls answer from: oneshot senders keyed by request id.
type Pending<Resp> = Mutex<HashMap<u64, oneshot::Sender<Result<Resp, CallError>>>>;

/// State shared by a peer's handles and its background task.
struct Shared<Resp> {
    /// The node at the other end.
    remote: NodeId,
    /// Where it listens.
    addr: String,
    /// Timeouts and bounds, fixed at spawn.
    config: TransportConfig,
    /// The node's transport counters, shared with its other peers.
    stats: Arc<TransportStats>,
    /// Calls sent and not yet answered, by request id; at most
    /// `config.inflight_max`. Locked only for map operations, never across
    /// `.await`.
    pending: Pending<Resp>,
    /// Source of request and ping ids; never reused, so a late answer cannot
    /// reach the wrong call.
    next_id: AtomicU64,
    /// Connection state, written only by the background task.
    link: watch::Sender<Link>,
    /// Set once to stop the background task.
    shutdown: watch::Sender<bool>,
    /// The last heartbeat's round trip, µs; 0 until one is answered.
    rtt_us: AtomicU64,
    /// This node's installed epoch, stamped on calls that name none.
    epoch: EpochCell,
    /// "peer down" and "peer up" lines, each at most once a second.
    down_log: crate::log_limit::LogLimit,
    up_log: crate::log_limit::LogLimit,
}

impl<Resp> Shared<Resp> {
    /// Publishes a Down state; logs when the reason changes, so a peer that
    /// stays down does not log every redial.
    fn set_down(&self, reason: String, refused: bool) {
        // A refusal's reason is the remote's text, from before it proved
        // anything: kept (and shown in `stats cluster`) only in part.
        let reason = crate::log_limit::clip(&reason).to_string();
        self.link.send_if_modified(|link| {
            let changed = !matches!(&link.state, PeerState::Down { reason: r } if *r == reason);
            // A link that dies right after each handshake is up between
            // failures, so "changed" holds every time: at most a line a
            // second per peer, counting the rest.
            if let Some(suppressed) = changed.then(|| self.down_log.allow()).flatten() {
                if refused {
                    warn!(peer = self.remote, addr = %self.addr, reason = %reason, suppressed, "peer refused our handshake");
                } else {
                    warn!(peer = self.remote, addr = %self.addr, reason = %reason, suppressed, "peer down");
                }
            }
            link.state = PeerState::Down { reason };
            link.outbox = None;
            link.refused = refused;
            changed
        });
    }

    /// Fails every call waiting on the connection that just ended.
    fn fail_pending(&self) {
        let drained: Vec<_> = self.pending.lock().drain().collect();
        for (_, tx) in drained {
            let _ = tx.send(Err(CallError::Disconnected));
        }
    }
}

/// Stops the background task when the last [`Peer`] handle is dropped.
struct Owner<Resp> {
    shared: Arc<Shared<Resp>>,
}

impl<Resp> Drop for Owner<Resp> {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

/// Removes a call's pending entry however the call ends (answer, timeout,
/// error or the caller dropping the future).
struct PendingGuard<'a, Resp> {
    pending: &'a Pending<Resp>,
    id: u64,
}

impl<Resp> Drop for PendingGuard<'_, Resp> {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.id);
    }
}

/// A multiplexed connection to one peer, owned by a background task that connects,
/// handshakes, reconnects with exponential backoff and full jitter, and sends a heartbeat
/// (a Ping frame) every heartbeat_interval; a peer that does not answer a heartbeat within
/// call_timeout is marked Down and its connection is dropped and re-dialled.
///
/// Cheap to clone; the task stops on [`Peer::shutdown`] or when the last
/// clone is dropped.
pub struct Peer<Req, Resp> {
    owner: Arc<Owner<Resp>>,
    _req: PhantomData<fn(Req)>,
}

impl<Req, Resp> Clone for Peer<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            owner: self.owner.clone(),
            _req: PhantomData,
        }
    }
}

impl<Req, Resp> std::fmt::Debug for Peer<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = &self.owner.shared;
        f.debug_struct("Peer")
            .field("remote", &shared.remote)
            .field("addr", &shared.addr)
            .field("state", &shared.link.borrow().state)
            .finish()
    }
}

impl<Req, Resp> Peer<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    /// Starts the background task that connects to `remote` at `addr`.
    ///
    /// # Panics
    /// Outside a tokio runtime, or if `config` is invalid (zero
    /// `inflight_max` or `heartbeat_interval`, `backoff_min > backoff_max`).
    pub fn spawn<C: Connector>(
        me: Identity,
        remote: NodeId,
        addr: String,
        connector: Arc<C>,
        config: TransportConfig,
        stats: Arc<TransportStats>,
    ) -> Self {
        config.assert_valid();
        let (link, _) = watch::channel(Link {
            state: PeerState::Connecting,
            outbox: None,
            refused: false,
        });
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            remote,
            addr,
            config,
            stats,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            link,
            shutdown,
            rtt_us: AtomicU64::new(0),
            epoch: me.epoch.clone(),
            down_log: crate::log_limit::LogLimit::default(),
            up_log: crate::log_limit::LogLimit::default(),
        });
        tokio::spawn(run_peer::<Req, Resp, C>(shared.clone(), me, connector));
        Self {
            owner: Arc::new(Owner { shared }),
            _req: PhantomData,
        }
    }

    /// Sends `req` and waits up to `config.call_timeout` for the answer.
    ///
    /// # Errors
    /// See [`CallError`]; [`CallError::maybe_applied`] tells whether the peer
    /// may have acted on it.
    pub async fn call(&self, req: Req) -> Result<Resp, CallError> {
        self.call_timeout(req, self.owner.shared.config.call_timeout)
            .await
    }

    /// Sends `req` and waits up to `timeout` (in all, counting any wait for
    /// the first connection) for the answer.
    ///
    /// # Errors
    /// See [`CallError`].
    pub async fn call_timeout(&self, req: Req, timeout: Duration) -> Result<Resp, CallError> {
        let epoch = self.owner.shared.epoch.get();
        self.call_at(epoch, req, timeout).await
    }

    /// [`Peer::call_timeout`] stamped with layout epoch `epoch`: the epoch
    /// of the snapshot the request was planned under, which the receiver
    /// checks against its own.
    ///
    /// # Errors
    /// See [`CallError`].
    pub async fn call_at(
        &self,
        epoch: u64,
        req: Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let shared = &*self.owner.shared;
        let stats = &shared.stats;
        stats.calls.fetch_add(1, Relaxed);
        let deadline = Instant::now() + timeout;
        let outbox = match self.outbox(deadline).await {
            Ok(outbox) => outbox,
            Err(e) => {
                stats.call_down.fetch_add(1, Relaxed);
                return Err(e);
            }
        };

        if stats.drops(shared.remote) {
            // Partitioned: the request is lost, so the call times out.
            drop(outbox);
            tokio::time::sleep_until(deadline).await;
            stats.call_timeouts.fetch_add(1, Relaxed);
            return Err(CallError::Timeout);
        }
        let id = shared.next_id.fetch_add(1, Relaxed);
        let mut frame = Vec::new();
        let request = ToServer::Request {
            id,
            epoch,
            body: req,
        };
        if let Err(e) = frame::encode(&request, &mut frame, shared.config.frame_bytes_max) {
            warn!(peer = shared.remote, error = %e, "request not sent");
            stats.call_down.fetch_add(1, Relaxed);
            return Err(CallError::Down(format!("request not sent: {e}")));
        }

        let (tx, rx) = oneshot::channel();
        {
            let mut pending = shared.pending.lock();
            if pending.len() >= shared.config.inflight_max {
                drop(pending);
                stats.call_busy.fetch_add(1, Relaxed);
                return Err(CallError::Busy);
            }
            let previous = pending.insert(id, tx);
            assert!(previous.is_none(), "request id {id} reused");
        }
        let _guard = PendingGuard {
            pending: &shared.pending,
            id,
        };
        // The entry is in `pending` before the frame is queued, and the
        // connection drops its queue before failing `pending`: a queued
        // frame's call is always answered or failed.
        match outbox.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                stats.call_busy.fetch_add(1, Relaxed);
                return Err(CallError::Busy);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                stats.call_down.fetch_add(1, Relaxed);
                return Err(CallError::Down(LinkError::Closed.to_string()));
            }
        }
        drop(outbox);

        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(CallError::Disconnected),
            Err(_) => {
                stats.call_timeouts.fetch_add(1, Relaxed);
                Err(CallError::Timeout)
            }
        }
    }

    /// The current connection's queue, or why there is none. Waits for the
    /// first dial up to `connect_timeout` (and `deadline`).
    async fn outbox(&self, deadline: Instant) -> Result<mpsc::Sender<Vec<u8>>, CallError> {
        let shared = &*self.owner.shared;
        let mut link = shared.link.subscribe();
        if let Some(ready) = link_outbox(&link.borrow_and_update()) {
            return ready;
        }
        let until = deadline.min(Instant::now() + shared.config.connect_timeout);
        let waited =
            tokio::time::timeout_at(until, link.wait_for(|l| l.state != PeerState::Connecting))
                .await;
        if let Ok(Ok(current)) = waited {
            if let Some(ready) = link_outbox(&current) {
                return ready;
            }
        }
        Err(CallError::Down("still connecting".into()))
    }

    /// The last heartbeat's round trip (ping sent to pong read); `None`
    /// until one has been answered.
    pub fn rtt(&self) -> Option<Duration> {
        match self.owner.shared.rtt_us.load(Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The connection state right now.
    pub fn state(&self) -> PeerState {
        self.owner.shared.link.borrow().state.clone()
    }

    /// The node this peer connects to.
    pub fn remote(&self) -> NodeId {
        self.owner.shared.remote
    }

    /// Whether `other` is a clone of this handle (the same connection).
    pub fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.owner, &other.owner)
    }

    /// Stops the background task and drops the connection; pending calls fail
    /// with [`CallError::Disconnected`], later ones with [`CallError::Down`].
    pub fn shutdown(&self) {
        self.owner.shared.shutdown.send_replace(true);
    }
}

/// What a call does given the link: send on the outbox, fail, or wait
/// (`None`, while the first dial runs).
fn link_outbox(link: &Link) -> Option<Result<mpsc::Sender<Vec<u8>>, CallError>> {
    match &link.state {
        PeerState::Connecting => None,
        PeerState::Up => Some(Ok(link.outbox.clone().expect("an up link has an outbox"))),
        PeerState::Down { reason } if link.refused => Some(Err(CallError::Refused(reason.clone()))),
        PeerState::Down { reason } => Some(Err(CallError::Down(reason.clone()))),
    }
}

/// The peer's background task: dial, serve the connection until it fails,
/// back off, again; until shutdown.
async fn run_peer<Req, Resp, C>(shared: Arc<Shared<Resp>>, me: Identity, connector: Arc<C>)
where
    Req: Serialize + Send + 'static,
    Resp: DeserializeOwned + Send + 'static,
    C: Connector,
{
    let config = shared.config.clone();
    let mut shutdown = shared.shutdown.subscribe();
    let mut jitter = Jitter::seeded(u64::from(shared.remote), config.jitter_seed);
    let mut failures: u32 = 0;
    'dial: loop {
        let dialled = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break 'dial,
            dialled = tokio::time::timeout(config.connect_timeout, async {
                if shared.stats.drops(shared.remote) {
                    // Partitioned: the Hello is lost, and the dial times
                    // out as it would behind a real partition.
                    std::future::pending::<()>().await;
                }
                dial(&*connector, &me, &shared.addr, Some(shared.remote), config.frame_bytes_max).await
            }) => dialled,
        };
        match dialled {
            Ok(Ok((stream, buf, epoch))) => {
                shared
                    .stats
                    .note_epoch(shared.remote, epoch, shared.epoch.get());
                failures = 0;
                shared.stats.connects.fetch_add(1, Relaxed);
                if let Some(suppressed) = shared.up_log.allow() {
                    info!(peer = shared.remote, addr = %shared.addr, suppressed, "peer up");
                }
                let ended = tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|stop| *stop) => None,
                    e = drive::<Req, Resp, C::Stream>(&shared, stream, buf) => Some(e),
                };
                // The connection's queue is gone now; fail what it carried.
                shared.stats.disconnects.fetch_add(1, Relaxed);
                // (client_read_loop counted and logged a bad frame.)
                let Some(e) = ended else { break 'dial };
                shared.set_down(e.to_string(), false);
                shared.fail_pending();
            }
            Ok(Err(LinkError::Refused(reason))) => shared.set_down(reason, true),
            Ok(Err(LinkError::AuthFailed(reason))) => {
                auth_failed(&shared.stats, &reason);
                shared.set_down(reason, true);
            }
            Ok(Err(e)) => {
                count_frame_error(&shared.stats, &e);
                shared.set_down(e.to_string(), false);
            }
            Err(_) => shared.set_down(
                LinkError::ConnectTimeout(config.connect_timeout).to_string(),
                false,
            ),
        }
        let cap = config
            .backoff_min
            .saturating_mul(1 << failures.min(BACKOFF_DOUBLINGS_MAX))
            .min(config.backoff_max);
        failures = failures.saturating_add(1);
        let pause = jitter.up_to(cap);
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break 'dial,
            () = tokio::time::sleep(pause) => {}
        }
    }
    shared.set_down("shut down".into(), false);
    shared.fail_pending();
    debug!(peer = shared.remote, "peer task stopped");
}

/// Runs one handshaken connection until it fails; returns why.
async fn drive<Req, Resp, S>(shared: &Shared<Resp>, stream: S, buf: BytesMut) -> LinkError
where
    Req: Serialize,
    Resp: DeserializeOwned,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = &shared.config;
    let (rd, wr) = tokio::io::split(stream);
    let (data_tx, data_rx) = mpsc::channel::<Vec<u8>>(config.inflight_max);
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE_FRAMES);
    // The id of the last pong received, and the last ping sent with when.
    let pong = Heartbeat {
        answered: AtomicU64::new(u64::MAX),
        sent: Mutex::new(None),
    };
    shared.link.send_modify(|link| {
        link.state = PeerState::Up;
        link.outbox = Some(data_tx);
        link.refused = false;
    });
    // Biased: a fixed polling order keeps simulations replayable.
    // No budget on this side: it reads only answers to its own calls, one
    // frame at a time per configured member.
    let reader = FrameReader::new(rd, buf, config.frame_bytes_max, None);
    let stall = config.write_stall_timeout();
    tokio::select! {
        biased;
        e = client_read_loop(shared, reader, &pong) => e,
        e = write_loop(wr, data_rx, control_rx, stall, &shared.stats) => e,
        e = heartbeat::<Req, Resp>(shared, control_tx, &pong) => e,
    }
}

/// What the heartbeat and the reader of one connection share.
struct Heartbeat {
    /// The id of the last pong read.
    answered: AtomicU64,
    /// The last ping sent, and when.
    sent: Mutex<Option<(u64, Instant)>>,
}

/// Hands each answer to its call; records pongs and the round trip.
async fn client_read_loop<R, Resp>(
    shared: &Shared<Resp>,
    mut reader: FrameReader<R>,
    pong: &Heartbeat,
) -> LinkError
where
    R: AsyncRead + Unpin,
    Resp: DeserializeOwned,
{
    loop {
        let msg = match reader.next::<ToClient<Resp>>(&shared.stats).await {
            Ok((msg, _, _)) => msg,
            Err(e) => {
                if count_frame_error(&shared.stats, &e) {
                    crate::warn_limited!(peer = shared.remote, addr = %shared.addr, error = %e, "bad frame from peer, reconnecting");
                }
                return e;
            }
        };
        if shared.stats.drops(shared.remote) {
            continue; // partitioned: the answer or pong is lost
        }
        let (id, answer) = match msg {
            ToClient::Pong { id, epoch } => {
                shared
                    .stats
                    .note_epoch(shared.remote, epoch, shared.epoch.get());
                pong.answered.store(id, Relaxed);
                if let Some((sent_id, at)) = *pong.sent.lock() {
                    if sent_id == id {
                        let us = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
                        shared.rtt_us.store(us.max(1), Relaxed);
                    }
                }
                continue;
            }
            ToClient::Response { id, epoch, body } => {
                shared
                    .stats
                    .note_epoch(shared.remote, epoch, shared.epoch.get());
                (id, Ok(body))
            }
            ToClient::Failed { id, reason } => {
                crate::warn_limited!(peer = shared.remote, id, reason = %crate::log_limit::clip(&reason), "peer could not answer a call");
                (id, Err(CallError::Disconnected))
            }
        };
        let waiting = shared.pending.lock().remove(&id);
        match waiting {
            Some(tx) => {
                let _ = tx.send(answer);
            }
            None => debug!(peer = shared.remote, id, "answer after its call gave up"),
        }
    }
}

/// Pings every `heartbeat_interval` (one ping outstanding at a time); ends
/// the connection when a ping goes unanswered for `call_timeout`.
async fn heartbeat<Req, Resp>(
    shared: &Shared<Resp>,
    control: mpsc::Sender<Vec<u8>>,
    pong: &Heartbeat,
) -> LinkError
where
    Req: Serialize,
{
    let config = &shared.config;
    let mut tick = tokio::time::interval(config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The last ping sent, which the reader also times its pong against.
        let outstanding = *pong.sent.lock();
        if let Some((id, sent_at)) = outstanding {
            let answered = pong.answered.load(Relaxed) == id;
            if !answered && sent_at.elapsed() >= config.call_timeout {
                return LinkError::HeartbeatTimeout(config.call_timeout);
            }
            if !answered {
                continue;
            }
        }
        let id = shared.next_id.fetch_add(1, Relaxed);
        *pong.sent.lock() = Some((id, Instant::now()));
        if shared.stats.drops(shared.remote) {
            continue; // partitioned: the ping is lost and will go unanswered
        }
        let ping = encode_control(&ToServer::<Req>::Ping { id }, config.frame_bytes_max);
        if control.try_send(ping).is_err() {
            // The previous ping was answered, so it left the queue: only the
            // writer being gone can make this fail.
            return LinkError::Closed;
        }
    }
}

/// Full-jitter source: xorshift64* seeded from the clock (or a given seed).
/// Not for anything but spreading reconnects.
struct Jitter(u64);

impl Jitter {
    fn seeded(salt: u64, seed: Option<u64>) -> Self {
        let nanos = seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        // splitmix64 of the seed, never zero
        let mut z = (nanos ^ salt.rotate_left(32)).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, cap]`, to the microsecond.
    fn up_to(&mut self, cap: Duration) -> Duration {
        let cap_us = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(self.next() % cap_us.saturating_add(1).max(1))
    }
}

// ---------------------------------------------------------------------------
// Server side.

/// A response on its way to the writer, holding its request's in-flight
/// permit and its bytes' count until it is written.
struct Outgoing {
    /// The encoded Response (or Failed) frame.
    frame: Vec<u8>,
    /// Returned to the connection's semaphore when the frame is dropped.
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// The frame's bytes in the connection's allowance or the budget.
    _held: Held,
}

impl AsRef<[u8]> for Outgoing {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

/// Why the other node, which proved it holds the key, must be refused, if
/// it must.
fn refusal(me: &Identity, caller: NodeId, proven: &Proven) -> Option<String> {
    if proven.layout != me.layout {
        return Some(format!(
            "layout mismatch: node {} has {:#018x} ({}), node {} has {:#018x} ({})",
            me.node_id, me.layout, me.layout_text, caller, proven.layout, proven.layout_text
        ));
    }
    None
}

/// Counts a handshake whose other side did not prove it holds the key, and
/// warns about it at most once a second (a flood of them is one line a
/// second, with how many it stands for).
fn auth_failed(stats: &TransportStats, reason: &str) {
    stats.auth_failures.fetch_add(1, Relaxed);
    if let Some(suppressed) = stats.auth_failure_log.allow() {
        warn!(
            reason,
            failures = stats.auth_failures.load(Relaxed),
            suppressed,
            "peer authentication failed"
        );
    }
}

/// The largest handshake frame a node reads or sends back: a few of its
/// own layout texts ([`HANDSHAKE_LAYOUT_TEXTS_MAX`]), not a whole frame.
fn handshake_bytes_max(me: &Identity, config: &TransportConfig) -> usize {
    let texts = me
        .layout_text
        .len()
        .saturating_mul(HANDSHAKE_LAYOUT_TEXTS_MAX);
    INFLIGHT_FREE_BYTES
        .saturating_add(texts)
        .min(config.frame_bytes_max)
}

/// Runs the accepting side of the handshake (see [`auth`]) within
/// [`handshake_bytes_max`] a frame: reads the Hello, proves this node
/// holds the key, checks the caller's proof, then its layout; the caller's
/// id if we welcomed it. Before the caller has proved itself, nothing it
/// is sent names the layout or the members. `slot` counts the connection
/// as the caller's before the Welcome goes out, so a member's connections
/// The accepting side's answer to `hello`: a fresh nonce and its proof over
/// the handshake's transcript, which the dialler's proof must then match.
fn challenge(me: &Identity, hello: &Hello) -> (Transcript, Challenge) {
    let transcript = Transcript::of(hello.node_id, me.node_id, hello.nonce, auth::nonce());
    let challenge = Challenge::Prove {
        node_id: me.node_id,
        nonce: transcript.acceptor_nonce,
        proof: me.key.prove(Role::Acceptor, &transcript),
    };
    (transcript, challenge)
}

/// are ordered as the member saw them accepted.
async fn accept_handshake<R, W>(
    reader: &mut FrameReader<R>,
    wr: &mut W,
    slot: &mut Slot,
    me: &Identity,
    config: &TransportConfig,
    stats: &TransportStats,
) -> Result<(NodeId, u64), LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = handshake_bytes_max(me, config);
    reader.max = max;
    let (hello, _, _): (Hello, _, _) = reader.next(stats).await?;
    if stats.drops(hello.node_id) {
        // Partitioned: no answer; the handshake times out on both sides.
        std::future::pending::<()>().await;
    }
    if hello.wire_version != WIRE_VERSION {
        stats.handshakes_refused.fetch_add(1, Relaxed);
        let reason = format!(
            "wire version mismatch: node {} speaks {}, node {} speaks {}",
            me.node_id, WIRE_VERSION, hello.node_id, hello.wire_version
        );
        let refused = Challenge::Refused {
            reason: reason.clone(),
        };
        wr.write_all(&encode_control(&refused, max)).await?;
        wr.flush().await?;
        return Err(LinkError::Refused(reason));
    }
    let (transcript, challenge) = challenge(me, &hello);
    wr.write_all(&encode_control(&challenge, max)).await?;
    wr.flush().await?;
    let (proven, _, _): (Proven, _, _) = reader.next(stats).await?;
    reader.max = config.frame_bytes_max;
    let (reply, outcome) = if !me.key.verify(Role::Dialler, &transcript, &proven.proof) {
        let reason = format!(
            "a caller claiming to be node {} gave a wrong proof",
            hello.node_id
        );
        auth_failed(stats, &reason);
        (
            HelloReply::Refused {
                reason: AUTH_REFUSAL.into(),
            },
            Err(LinkError::AuthFailed(reason)),
        )
    } else if let Some(reason) = (!proven.joining)
        .then(|| refusal(me, hello.node_id, &proven))
        .flatten()
    {
        stats.handshakes_refused.fetch_add(1, Relaxed);
        (
            HelloReply::Refused {
                reason: reason.clone(),
            },
            Err(LinkError::Refused(reason)),
        )
    } else if !slot.admit(
        hello.node_id,
        proven.joining || proven.epoch > me.epoch.get(),
        stats,
    ) {
        stats.handshakes_refused.fetch_add(1, Relaxed);
        let reason = format!("node {} is not a member of this cluster", hello.node_id);
        (
            HelloReply::Refused {
                reason: reason.clone(),
            },
            Err(LinkError::Refused(reason)),
        )
    } else {
        (
            HelloReply::Welcome {
                node_id: me.node_id,
                epoch: me.epoch.get(),
                cluster: proven.joining.then(|| (me.layout, me.layout_text.clone())),
            },
            Ok((hello.node_id, proven.epoch)),
        )
    };
    wr.write_all(&encode_reply(&reply, max)).await?;
    wr.flush().await?;
    outcome
}

/// Encodes a handshake reply; a refusal quoting two huge layout texts is cut
/// to fit the frame limit rather than not sent.
fn encode_reply(reply: &HelloReply, frame_bytes_max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    if frame::encode(reply, &mut out, frame_bytes_max).is_ok() {
        return out;
    }
    let short = HelloReply::Refused {
        reason: "layout mismatch (layout texts too long to quote)".into(),
    };
    encode_control(&short, frame_bytes_max)
}

/// Serves one accepted connection: reads the peer's Hello, answers Welcome or Refused (layout
/// mismatch: the reason names both layout_texts), then reads request frames, runs
/// `handler` for each concurrently (spawned tasks, at most config.inflight_max at once per
/// connection: beyond that, stop reading until one finishes — backpressure), and writes the
/// responses (any order; matched by id). Pings get Pongs. A corrupt (bad crc / undecodable)
/// or oversized frame: count it in stats, log `warn!`, drop the connection.
///
/// The handshake must finish within `config.connect_timeout` and fit
/// [`handshake_bytes_max`]; once it names the caller, `slot` counts the
/// connection as that member's, and a newer connection of the same member
/// past its cap ends this one. A connection silent for
/// [`IDLE_PERIODS_MAX`] heartbeat periods is dropped, and so is one whose
/// writes make no progress for [`WRITE_STALL_PERIODS_MAX`] periods.
/// Memory: a request frame past [`INFLIGHT_FREE_BYTES`] is read only once
/// `budget` holds it, and stays held until its handler is done; each answer
/// is counted before it is queued until it is written (see [`answers`]).
/// Handlers already running when the connection drops run to completion
/// (their answers are discarded), so a request is never cut off half-applied.
///
/// # Panics
/// If `config` is invalid (see [`Peer::spawn`]).
#[allow(clippy::too_many_arguments)] // each is one of the node's own; a struct would only rename them
pub async fn serve_connection<S, Req, Resp, H, F>(
    stream: S,
    me: Identity,
    handler: H,
    config: TransportConfig,
    stats: Arc<TransportStats>,
    budget: Arc<InflightBudget>,
    mut slot: Slot,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Fn(NodeId, u64, Req) -> F + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    config.assert_valid();
    let (rd, mut wr) = tokio::io::split(stream);
    let frame_budget = FrameBudget {
        budget: budget.clone(),
        wait: config.budget_wait(),
    };
    let mut reader = FrameReader::new(
        rd,
        BytesMut::with_capacity(READ_CHUNK_BYTES),
        config.frame_bytes_max,
        Some(frame_budget),
    );
    let handshake = tokio::time::timeout(
        config.connect_timeout,
        accept_handshake(&mut reader, &mut wr, &mut slot, &me, &config, &stats),
    )
    .await;
    let caller = match handshake {
        Ok(Ok((caller, epoch))) => {
            stats.note_epoch(caller, epoch, me.epoch.get());
            caller
        }
        Ok(Err(e)) => {
            if count_frame_error(&stats, &e) {
                crate::warn_limited!(error = %e, "bad frame in handshake, dropping connection");
            } else if let LinkError::Refused(reason) = &e {
                crate::warn_limited!(reason = %reason, "refused a peer's handshake");
            } else if let LinkError::AuthFailed(_) = &e {
                // Counted and logged, rate-limited, where it failed.
            } else {
                debug!(error = %e, "handshake failed");
            }
            return;
        }
        Err(_) => {
            debug!(timeout = ?config.connect_timeout, "handshake timed out");
            return;
        }
    };
    debug!(peer = caller, "peer connection accepted");

    let (data_tx, data_rx) = mpsc::channel::<Outgoing>(config.inflight_max);
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE_FRAMES);
    let requests = Answers::new(budget.clone());
    let answers = Answers::new(budget);
    let reads = server_read_loop(
        caller, &me.epoch, reader, &handler, &config, &stats, &answers, &requests, data_tx,
        control_tx,
    );
    let stall = config.write_stall_timeout();
    let ended = tokio::select! {
        biased;
        () = slot.evicted() => LinkError::Evicted,
        e = reads => e,
        e = write_loop(wr, data_rx, control_rx, stall, &stats) => e,
    };
    if count_frame_error(&stats, &ended) {
        crate::warn_limited!(peer = caller, error = %ended, "bad frame from peer, dropping connection");
    } else if matches!(
        ended,
        LinkError::WriteStalled(_) | LinkError::OverBudget { .. } | LinkError::Evicted
    ) {
        crate::warn_limited!(peer = caller, reason = %ended, "dropping peer connection");
    } else {
        debug!(peer = caller, reason = %ended, "peer connection closed");
    }
}

/// Reads requests and spawns their handlers, at most `inflight_max` at once;
/// answers pings.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn server_read_loop<R, Req, Resp, H, F>(
    caller: NodeId,
    me_epoch: &EpochCell,
    mut reader: FrameReader<R>,
    handler: &H,
    config: &TransportConfig,
    stats: &Arc<TransportStats>,
    answers: &Arc<Answers>,
    requests: &Arc<Answers>,
    data: mpsc::Sender<Outgoing>,
    control: mpsc::Sender<Vec<u8>>,
) -> LinkError
where
    R: AsyncRead + Unpin,
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Fn(NodeId, u64, Req) -> F,
    F: Future<Output = Resp> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(config.inflight_max));
    let running = Arc::new(Semaphore::new(
        config
            .inflight_max
            .min(crate::limits::PEER_HANDLERS_RUNNING_MAX),
    ));
    let idle = config.idle_timeout();
    let max = config.frame_bytes_max;
    let mut last_frame_at = Instant::now();
    loop {
        let (msg, large, frame_bytes) = match tokio::time::timeout_at(
            last_frame_at + idle,
            reader.next::<ToServer<Req>>(stats),
        )
        .await
        {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => return e,
            Err(_) => return LinkError::Idle(idle),
        };
        if stats.drops(caller) {
            // Partitioned: the frame is lost. It does not count as a sign
            // of life either, so a long partition ends the connection as
            // silence would.
            continue;
        }
        match msg {
            ToServer::Ping { id } => {
                let epoch = me_epoch.get();
                let pong = encode_control(&ToClient::<Resp>::Pong { id, epoch }, max);
                if control.send(pong).await.is_err() {
                    return LinkError::Closed;
                }
            }
            ToServer::Request { id, epoch, body } => {
                stats.note_epoch(caller, epoch, me_epoch.get());
                // A small request's bytes are counted too, in the
                // connection's allowance or the budget, until its handler
                // is done: a thousand of them in flight are not free.
                let request_held = match large {
                    Some(reservation) => RequestHeld::Large {
                        _reservation: reservation,
                    },
                    None => match reader::wait_for_room(config.call_timeout, || {
                        requests.hold(frame_bytes)
                    })
                    .await
                    {
                        Some(held) => RequestHeld::Small { _held: held },
                        None => {
                            stats.frames_over_budget.fetch_add(1, Relaxed);
                            return LinkError::OverBudget {
                                bytes: frame_bytes,
                                waited: config.call_timeout,
                            };
                        }
                    },
                };
                // Backpressure: no more reading until a handler finishes.
                let permit = permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                // At most a few handlers of one connection run at once (the
                // rest of its in-flight calls wait here, read and counted):
                // a burst of a thousand requests must not put a thousand
                // tasks ahead of every other connection on the node.
                let running = running
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let answer = handler(caller, epoch, body);
                let data = data.clone();
                let stats = stats.clone();
                let answers = answers.clone();
                let me_epoch = me_epoch.clone();
                tokio::spawn(async move {
                    let (frame, held) = if answers.refusing() {
                        // Its last answer did not fit and one its size
                        // still would not: do not build another.
                        drop((answer, request_held));
                        stats.answers_over_budget.fetch_add(1, Relaxed);
                        (failed_frame::<Resp>(id, OUT_OF_MEMORY, max), Held::Nothing)
                    } else {
                        let body = answer.await;
                        // The request's bytes lived in the handler.
                        drop(request_held);
                        stats.requests_served.fetch_add(1, Relaxed);
                        if stats.drops(caller) {
                            return; // partitioned since the request came: the answer is lost
                        }
                        answer_frame(caller, (id, me_epoch.get()), body, max, &answers, &stats)
                    };
                    // Built: another handler of this connection may run.
                    drop(running);
                    // Fails only once the connection is gone: nobody to tell.
                    let _ = data
                        .send(Outgoing {
                            frame,
                            _permit: permit,
                            _held: held,
                        })
                        .await;
                });
            }
        }
        last_frame_at = Instant::now();
    }
}

/// Where a request's bytes are counted while its handler runs.
enum RequestHeld {
    /// A large frame, reserved from its header on.
    Large {
        /// Given back when the handler is done.
        _reservation: crate::budget::Reservation,
    },
    /// A small frame, in the connection's allowance or the budget.
    Small {
        /// Given back when the handler is done.
        _held: Held,
    },
}

/// A `Failed` frame for call `id`.
fn failed_frame<Resp: Serialize>(id: u64, reason: &str, max: usize) -> Vec<u8> {
    let failed = ToClient::<Resp>::Failed {
        id,
        reason: reason.to_owned(),
    };
    encode_control(&failed, max)
}

/// Encodes the answer to call `id` and counts its bytes (see [`answers`]);
/// a small `Failed` instead when it cannot be encoded or counted.
fn answer_frame<Resp: Serialize>(
    caller: NodeId,
    (id, epoch): (u64, u64),
    body: Resp,
    max: usize,
    answers: &Arc<Answers>,
    stats: &TransportStats,
) -> (Vec<u8>, Held) {
    let mut frame = Vec::new();
    let response = ToClient::Response { id, epoch, body };
    if let Err(e) = frame::encode(&response, &mut frame, max) {
        warn!(peer = caller, id, error = %e, "answer not sent");
        return (failed_frame::<Resp>(id, &e.to_string(), max), Held::Nothing);
    }
    // Encoded before it is counted: nothing awaits in between, so at most
    // one uncounted answer per worker thread exists at a time. Counted at
    // its allocation, which the encoder grew by doubling.
    match answers.hold(frame.capacity()) {
        Some(held) => (frame, held),
        None => {
            stats.answers_over_budget.fetch_add(1, Relaxed);
            debug!(
                peer = caller,
                id,
                bytes = frame.len(),
                "answer past the in-flight budget"
            );
            (failed_frame::<Resp>(id, OUT_OF_MEMORY, max), Held::Nothing)
        }
    }
}

#[cfg(test)]
mod tests;
