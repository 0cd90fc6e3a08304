//! Every bound webvac enforces, named in one place.
//!
//! Units go last in names (`_bytes`, `_ms`, `_count`). Relations between the
//! constants are checked at compile time at the bottom of the file, so a change
//! that breaks an assumption fails the build instead of a production node.

/// Longest key memcached accepts (`KEY_MAX_LENGTH`). A longer key gets
/// `CLIENT_ERROR bad command line format`.
pub const KEY_BYTES_MAX: usize = 250;

/// Default largest item (memcached `-I 1m`). The limit covers memcached's item
/// header as well as key and value, so the largest storable value is a little
/// smaller; see [`crate::store::item_fits`].
pub const ITEM_BYTES_MAX_DEFAULT: usize = 1024 * 1024;

/// Smallest `-I` value memcached allows: 1 KiB.
pub const ITEM_BYTES_MAX_MIN: usize = 1024;
/// Largest `-I` value memcached allows: 1 GiB.
pub const ITEM_BYTES_MAX_MAX: usize = 1024 * 1024 * 1024;

/// memcached's per-item header (`sizeof(item)` on 64-bit) that counts toward
/// the `-I` item size limit.
pub const MEMCACHED_ITEM_HEADER_BYTES: usize = 48;
/// memcached's slab page (`-o slab_page_size`, 1 MiB): the unit of its
/// `total_malloced`, which `stats slabs` reports in.
pub const MEMCACHED_SLAB_PAGE_BYTES: u64 = 1024 * 1024;
/// memcached's CAS suffix, which also counts toward the `-I` limit.
pub const MEMCACHED_CAS_BYTES: usize = 8;

/// A command line without a newline after this many bytes is abuse unless it
/// is a multi-get (`get `/`gets ` prefix); memcached closes such connections.
pub const LINE_BYTES_MAX: usize = 2048;

/// A get-family line is parsed whole up to this length; past it, one whose
/// newline has not arrived is served in pieces as it arrives, so a line of
/// any length costs its reply, not its line (memcached buffers such a line
/// whole). Also the longest line of any other command (longer ones close
/// the connection).
pub const GET_LINE_WHOLE_BYTES_MAX: usize = 64 * 1024;

/// A piece of a long get line is served once this many bytes of it are
/// buffered (or its newline arrives).
pub const GET_PIECE_BYTES_MIN: usize = 16 * 1024;

/// memcached tokenizes a command into at most this many tokens (`MAX_TOKENS`),
/// including the empty terminal token.
pub const TOKENS_MAX: usize = 24;

/// Longest `O` opaque token a meta command may carry (memcached: 32).
pub const OPAQUE_BYTES_MAX: usize = 32;

/// Relative exptimes above this many seconds (30 days) are absolute unix times
/// (memcached `REALTIME_MAXDELTA`).
pub const EXPTIME_RELATIVE_MAX_SECS: i64 = 60 * 60 * 24 * 30;

/// Default memory limit for item storage (memcached `-m 64`).
pub const MEMORY_LIMIT_MB_DEFAULT: usize = 64;

/// Default maximum number of simultaneous client connections (`-c 1024`).
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;

/// Default number of worker threads (`-t 4`, as memcached).
pub const THREADS_DEFAULT: usize = 4;

/// Default client port.
pub const PORT_DEFAULT: u16 = 11211;

/// Connections the kernel queues before they are accepted (memcached's
/// `-b` default).
pub const LISTEN_BACKLOG_DEFAULT: u32 = 1024;

/// memcached's default access mask for its unix socket (`-a`).
pub const UNIX_MASK_DEFAULT: u32 = 0o700;

/// Copies of each partition in a cluster (N), as in Dynamo and Riak.
pub const REPLICAS_DEFAULT: usize = 3;

/// How long a cluster delete's tombstone outlives the delete, so a late or
/// resent copy of the deleted item cannot bring it back: the 3-hour hint
/// window DESIGN sets, plus ten minutes, more than one anti-entropy cycle.
/// Configurable (`tombstone_grace_secs`), checked against both.
pub const TOMBSTONE_GRACE_SECS: u32 = 3 * 3600 + 600;

/// Anti-entropy: time between rounds.
pub const ANTI_ENTROPY_INTERVAL_MS_DEFAULT: u64 = 1000;
/// Anti-entropy: partitions one round compares with each peer. With 1,024
/// partitions and one round a second, a node compares everything it holds
/// every 4 seconds.
pub const ANTI_ENTROPY_PARTITIONS_PER_ROUND_DEFAULT: usize = 256;
/// Anti-entropy: entries one round lists per peer (at most as many keys move).
pub const ANTI_ENTROPY_KEYS_PER_ROUND_DEFAULT: usize = 10_000;
/// Anti-entropy: bytes per second one node sends and asks for, per peer.
pub const ANTI_ENTROPY_BYTES_PER_SEC_DEFAULT: u64 = 8 * 1024 * 1024;
/// Anti-entropy: tree nodes asked for in one message.
pub const ANTI_ENTROPY_NODES_PER_MESSAGE_MAX: usize = 4096;
/// Anti-entropy: (key, version) entries in one listing message: at 250-byte
/// keys, about 1 MiB.
pub const ANTI_ENTROPY_ENTRIES_PER_MESSAGE_MAX: usize = 4096;
/// Anti-entropy: item bytes in one pull or push message.
pub const ANTI_ENTROPY_MESSAGE_BYTES_MAX: usize = 1024 * 1024;

/// One cycle over the default partitions at the default settings.
const ANTI_ENTROPY_CYCLE_SECS_DEFAULT: u64 = (crate::cluster::ring::PARTITIONS_DEFAULT as u64)
    .div_ceil(ANTI_ENTROPY_PARTITIONS_PER_ROUND_DEFAULT as u64)
    * ANTI_ENTROPY_INTERVAL_MS_DEFAULT.div_ceil(1000);
const _: () = assert!(
    HINT_WINDOW_SECS_DEFAULT + ANTI_ENTROPY_CYCLE_SECS_DEFAULT < TOMBSTONE_GRACE_SECS as u64
);
const _: () = assert!(
    ANTI_ENTROPY_ENTRIES_PER_MESSAGE_MAX * (KEY_BYTES_MAX + 8 + 8)
        < crate::cluster::transport::FRAME_BYTES_MAX_DEFAULT / 2
);
const _: () = assert!(
    ANTI_ENTROPY_MESSAGE_BYTES_MAX + (1 << 20) < crate::cluster::transport::FRAME_BYTES_MAX_DEFAULT
);

/// Index buckets a store walk (refill) visits under one shard lock.
pub const SCAN_BUCKETS_PER_LOCK: usize = 4096;

/// How long a hint waits for its replica (DESIGN: 3 hours).
pub const HINT_WINDOW_SECS_DEFAULT: u64 = 3 * 3600;

/// Hints held per unreachable replica.
pub const HINTS_PER_TARGET_MAX_DEFAULT: usize = 100_000;

/// Default memory for hints per node, beside the item memory: this
/// fraction (1/n) of the item memory limit...
pub const HINTS_MEMORY_SHARE_OF_ITEMS: usize = 16;

/// ...and at least this many MiB.
pub const HINTS_MEMORY_MB_MIN: usize = 8;

const _: () = assert!(HINT_WINDOW_SECS_DEFAULT < TOMBSTONE_GRACE_SECS as u64);

/// Most index buckets one `lk` call walks (on a node, or on each replica a
/// cluster `lk` asks) before it answers with what it found: about a
/// millisecond, however sparse the table.
pub const LIST_BUCKETS_PER_CALL_MAX: usize = 256 * 1024;

/// An `lk` page is listed in pieces of at most this many keys, and its
/// connection lets others run between them.
pub const LIST_KEYS_PER_PIECE: usize = 500;

/// Most keys one `lk` call returns (its `count` argument).
pub const LIST_KEYS_PER_CALL_MAX: usize = 10_000;

/// Most partitions one `lk` call walks before it answers (with fewer keys
/// than asked and a token to go on), so a sparse cluster cannot make one
/// call ask every partition.
pub const LIST_PARTITIONS_PER_CALL_MAX: u32 = 64;

/// Longest listing token a client may send (ours are 50 hex digits).
pub const LIST_TOKEN_BYTES_MAX: usize = 64;

/// Longest request id (`P` token item `i<id>`), like an opaque.
pub const REQUEST_ID_BYTES_MAX: usize = 32;

/// Default for how long a request id's record makes a retry safe: at least
/// ten minutes, as long as any client keeps retrying one call.
pub const DEDUP_WINDOW_SECS_DEFAULT: u32 = 600;

/// Default for how many request-id records one key keeps.
pub const REQUEST_ID_RECORDS_PER_KEY_DEFAULT: usize = 16;

/// The most request-id records one key may keep (the area's length is a
/// `u16` in the item header).
pub const REQUEST_ID_RECORDS_PER_KEY_LIMIT: usize = 64;

const _: () = assert!(REQUEST_ID_RECORDS_PER_KEY_DEFAULT <= REQUEST_ID_RECORDS_PER_KEY_LIMIT);
// A delete's record lives in its tombstone, so tombstones outlive the window.
const _: () = assert!(DEDUP_WINDOW_SECS_DEFAULT < TOMBSTONE_GRACE_SECS);

/// How far ahead of a node's own clock a version from a peer may be: a
/// version stamped further ahead (a clock that is wrong by more, or a
/// forged message) is refused and counted, so no message can drag a node's
/// version clock, its flush barrier or its expiry decisions far into the
/// future. Lifetimes judged by the local clock (tombstones, request-id
/// records) are kept this much longer, so a node whose clock runs up to
/// this far ahead does not drop them early. Configurable
/// (`clock_drift_max_ms`).
pub const CLOCK_DRIFT_MAX_MS_DEFAULT: u64 = 10_000;
/// The largest drift bound a cluster may set: one hour. Versions carry 42
/// bits of milliseconds (until 2163), so no bound lets a stamp overflow.
pub const CLOCK_DRIFT_MAX_MS_LIMIT: u64 = 3_600_000;
const _: () = assert!(CLOCK_DRIFT_MAX_MS_DEFAULT <= CLOCK_DRIFT_MAX_MS_LIMIT);
// The margin a skewed clock takes off the dedup window must leave most of it.
const _: () = assert!(CLOCK_DRIFT_MAX_MS_DEFAULT < DEDUP_WINDOW_SECS_DEFAULT as u64 * 1000);

/// How long one cluster hop may take before the peer is passed over.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 1000;

/// Peer connections a node accepts at once that are still in the
/// handshake. Past it a new connection is closed at once. Members'
/// connections have places of their own ([`PEER_CONNECTIONS_PER_MEMBER_MAX`]
/// each), so connections that never finish a handshake cannot take them;
/// in all a node accepts at most members × that + this many.
pub const PEER_HANDSHAKES_MAX: usize = 16;

/// Peer connections one member may hold at once once its handshake names
/// it: it dials one per peer, and a redial may overlap the connection it
/// replaces until that one is noticed dead. A newer connection past this
/// closes the member's oldest, so an impostor cannot lock the member out.
pub const PEER_CONNECTIONS_PER_MEMBER_MAX: usize = 2;

/// Handlers of one peer connection that run at once; its other in-flight
/// requests wait, read and counted, so a burst from one peer cannot queue
/// a thousand tasks ahead of every other connection.
pub const PEER_HANDLERS_RUNNING_MAX: usize = 64;

/// How often a peer frame waiting for room in the in-flight budget tries
/// again. Rare (the budget is spent), so plain polling: no wake-up list to
/// keep on the budget's hot path.
pub const PEER_BUDGET_RETRY_MS: u64 = 5;

/// A peer's handshake frame (`Hello`) may be this many times the node's own
/// layout text, plus [`INFLIGHT_FREE_BYTES`]: a matching one carries the same
/// text once, a refusal quotes two, and a mismatched layout of up to a few
/// times ours still gets its refusal quoted instead of a size error.
pub const HANDSHAKE_LAYOUT_TEXTS_MAX: usize = 4;

/// Bytes read from a socket per read call.
pub const READ_CHUNK_BYTES: usize = 16 * 1024;

/// A connection may buffer this much of an incomplete request without
/// reserving from the shared in-flight budget (see `budget`).
pub const INFLIGHT_FREE_BYTES: usize = 6 * 1024;

/// The in-flight budget is this fraction (1/n) of the item memory limit...
pub const INFLIGHT_BUDGET_SHARE_OF_ITEMS: usize = 8;

/// ...and at least this many bytes, so a small node still takes a few
/// large values at once.
pub const INFLIGHT_BUDGET_BYTES_MIN: usize = 16 * 1024 * 1024;

/// How long a get line waits for room in the in-flight budget before it is
/// refused (`SERVER_ERROR out of memory reading request`): room comes back
/// as other connections' requests are answered, so a burst of long lines
/// is served a share at a time instead of refused.
pub const INFLIGHT_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Default `data_timeout_secs`: a connection that holds in-flight memory for
/// a data block and sends nothing for this long is closed. Generous for a
/// slow link, short next to "forever".
pub const DATA_TIMEOUT_SECS_DEFAULT: u32 = 30;

/// Replies are flushed to the socket once this many bytes are pending, even in
/// the middle of a pipelined batch, so a flood of requests cannot grow the
/// write buffer without bound.
pub const WRITE_FLUSH_BYTES: usize = 256 * 1024;

/// Most requests executed from one read before replies are flushed and other
/// connections get a turn.
pub const REQUESTS_PER_BATCH_MAX: usize = 1024;

/// A multi-get lets other connections run after this many keys (one of
/// 100,000 misses would otherwise hold its worker thread for all of them).
pub const GET_KEYS_PER_TURN: usize = 256;

/// Store shard count bounds. The count is a power of two chosen from the
/// memory limit so each shard can hold at least [`SHARD_ITEMS_OF_MAX_SIZE`]
/// maximum-size items.
pub const SHARDS_MAX: usize = 64;

/// A multi-get looks up its keys in batches of this many, prefetching each
/// batch's index buckets and items first so their cache misses overlap.
pub const PREFETCH_KEYS: usize = 16;
/// Maximum-size items every shard must be able to hold at once; with a small
/// memory limit this keeps the shard count down.
pub const SHARD_ITEMS_OF_MAX_SIZE: usize = 4;

/// Index buckets the background expiry sweep examines per shard per pass.
pub const SWEEP_SLOTS_PER_PASS: usize = 4096;

/// Interval between background expiry sweep passes.
pub const SWEEP_INTERVAL_MS: u64 = 1000;

/// How long a graceful shutdown waits for connections to finish in-flight work.
pub const SHUTDOWN_GRACE_MS: u64 = 5000;

/// Highest verbosity level (`verbosity N` clamps to it, as memcached).
pub const VERBOSITY_MAX: u32 = 2;

const _: () = assert!(KEY_BYTES_MAX < 256, "key length is stored in a u8");
const _: () = assert!(LINE_BYTES_MAX < GET_PIECE_BYTES_MIN);
const _: () = assert!(GET_PIECE_BYTES_MIN < GET_LINE_WHOLE_BYTES_MAX);
const _: () = assert!(KEY_BYTES_MAX < GET_PIECE_BYTES_MIN);
const _: () = assert!(ITEM_BYTES_MAX_MIN <= ITEM_BYTES_MAX_DEFAULT);
const _: () = assert!(ITEM_BYTES_MAX_DEFAULT <= ITEM_BYTES_MAX_MAX);
const _: () = assert!(SHARDS_MAX.is_power_of_two());
const _: () = assert!(READ_CHUNK_BYTES <= WRITE_FLUSH_BYTES);
const _: () = assert!(GET_KEYS_PER_TURN % PREFETCH_KEYS == 0);
const _: () = assert!(OPAQUE_BYTES_MAX < LINE_BYTES_MAX);
const _: () = assert!(PEER_CONNECTIONS_PER_MEMBER_MAX >= 1 && PEER_HANDSHAKES_MAX >= 1);
const _: () = assert!(PEER_BUDGET_RETRY_MS < REQUEST_TIMEOUT_MS_DEFAULT);

/// memcached's default `ssl_min_version`: 2, TLS 1.2.
pub const SSL_MIN_VERSION_DEFAULT: u8 = 2;

/// memcached's default `ssl_wbuf_size`, KiB: one TLS record. It bounds the
/// encrypted output a TLS connection holds beside its replies.
pub const SSL_WBUF_KIB_DEFAULT: u32 = 16;

/// Largest `ssl_wbuf_size`, KiB: past a few records a bigger buffer only
/// costs memory per connection.
pub const SSL_WBUF_KIB_MAX: u32 = 1024;

/// A TLS handshake not finished in this long is dropped (counted in
/// `ssl_handshake_errors`): a client that connects and stalls holds a
/// connection slot, not the node.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connections the Prometheus endpoint (`metrics_listen`) serves at once;
/// past it a new one is closed at once. A scraper needs one.
pub const METRICS_CONNECTIONS_MAX: usize = 16;
/// A metrics request's header must arrive within this long.
pub const METRICS_HEADER_TIMEOUT_MS: u64 = 5_000;
/// A metrics connection is closed after this long, whatever it does, so a
/// slow reader cannot hold a slot.
pub const METRICS_CONNECTION_LIFETIME_MS: u64 = 30_000;
/// hyper's read buffer per metrics connection: a request line and headers
/// past it are refused (hyper's own minimum is 8 KiB).
pub const METRICS_READ_BUFFER_BYTES: usize = 16 * 1024;
const _: () = assert!(METRICS_READ_BUFFER_BYTES >= 8192);
/// Scrapes the metrics endpoint renders a second, with bursts of up to
/// [`METRICS_SCRAPES_BURST`]; past them a request gets `429 Too Many
/// Requests`. A scrape costs tens of microseconds of a worker's time, so a
/// client pipelining scrapes could otherwise take a worker from clients.
/// Prometheus scrapes every 15 s or so; a few scrapers fit many times over.
pub const METRICS_SCRAPES_PER_SEC: u32 = 10;
/// See [`METRICS_SCRAPES_PER_SEC`].
pub const METRICS_SCRAPES_BURST: u32 = 20;
