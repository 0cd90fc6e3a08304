//! The lock-sharded item store: memcached semantics, memory limit, eviction,
//! expiry and versions. No sockets, no cluster.
//!
//! Keys are hashed once with xxh3-64 (never std `Hash`: nodes and clients must
//! agree on it). The top bits pick the shard (at most 6 of them, bits 58..64);
//! a shard's index takes its home bucket from the low bits and a 16-bit tag
//! from bits 24..40, so the three uses do not overlap (until an index passes
//! 2^24 buckets). A cluster's partitions also come from the top bits, so with
//! at least as many partitions as shards one partition lives in one shard (or
//! two, for a partition count that is not a power of two): a walk over one
//! partition's entries locks and reads only those shards.
//!
//! Every operation takes exactly one shard lock, does all its work under it
//! (read-modify-write included) and never holds it across I/O. The memory
//! limit is split evenly across shards, so each shard's budget is hard and the
//! total never exceeds the limit.

pub mod clock;
pub mod dedup;
pub mod exptime;
pub mod hlc;
mod index;
pub mod merkle;
pub mod shard;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

pub use clock::{Clock, ManualClock, SystemClock};
use merkle::{Trees, leaf_of};
pub use shard::bits;
pub use shard::{Entry, ShardStats, charge};
use shard::{Gone, NewItem, Shard, Slot};

use crate::limits::{
    LIST_BUCKETS_PER_CALL_MAX, MEMCACHED_CAS_BYTES, MEMCACHED_ITEM_HEADER_BYTES, PREFETCH_KEYS,
    SCAN_BUCKETS_PER_LOCK, SHARD_ITEMS_OF_MAX_SIZE, SHARDS_MAX, TOMBSTONE_GRACE_SECS,
};

/// Whether `key` is a key memcached accepts: 1 to 250 bytes. (The text
/// protocol cannot carry spaces or newlines in a key; the store does not care.)
pub fn valid_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= crate::limits::KEY_BYTES_MAX
}

/// xxh3-64 of the key: the one hash every node and client agrees on.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// Whether an item fits under memcached's `-I` limit. memcached counts its
/// item header, the key with a NUL, the flags (when non-zero), the value with
/// its CRLF and the CAS; we apply the same arithmetic so the largest storable
/// value matches memcached's byte for byte.
pub fn item_fits(key_len: usize, flags: u32, value_len: usize, item_bytes_max: usize) -> bool {
    let flags_bytes = if flags == 0 { 0 } else { 4 };
    MEMCACHED_ITEM_HEADER_BYTES + key_len + 1 + flags_bytes + value_len + 2 + MEMCACHED_CAS_BYTES
        <= item_bytes_max
}

/// How a write treats an existing item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Store unconditionally.
    Set,
    /// Store only if the key is absent.
    Add,
    /// Store only if the key is present.
    Replace,
    /// Add to the end of an existing value (flags and expiry stay).
    Append,
    /// Add to the front of an existing value (flags and expiry stay).
    Prepend,
}

/// A write request, after parsing.
#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    /// How to treat an existing item.
    pub mode: Mode,
    /// The key: 1 to 250 bytes (see [`valid_key`]).
    pub key: &'a [u8],
    /// The value, stored as given.
    pub value: &'a [u8],
    /// The client's opaque flags, returned with the value.
    pub flags: u32,
    /// Client exptime, memcached rules (see [`exptime`]).
    pub exptime: i64,
    /// Compare-and-swap: store only if the item's CAS equals this (text `cas`,
    /// meta `C`). `Some(0)` never matches an existing item.
    pub compare_cas: Option<u64>,
    /// Meta `I`: a CAS older than the item's stores the value marked stale.
    pub invalidate: bool,
}

impl<'a> Write<'a> {
    /// A write with no CAS check and no invalidation; `exptime` follows
    /// memcached's rules ([`exptime`]).
    pub fn new(mode: Mode, key: &'a [u8], value: &'a [u8], flags: u32, exptime: i64) -> Self {
        Self {
            mode,
            key,
            value,
            flags,
            exptime,
            compare_cas: None,
            invalidate: false,
        }
    }
}

/// The outcome of a write, named after memcached's replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Stored; carries the new CAS.
    Stored(u64),
    /// The mode's condition failed: `add` of a present key, or `replace`,
    /// `append` or `prepend` of an absent one.
    NotStored,
    /// CAS mismatch.
    Exists,
    /// CAS given but no item.
    NotFound,
    /// Larger than the item size limit.
    TooLarge,
    /// Could not make room within the memory limit.
    NoMemory,
}

/// The outcome of incr/decr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    /// The new value, the new CAS, and whether memcached would have
    /// rewritten the item in place (the new number is not longer).
    Value(u64, u64, bool),
    /// No live item for the key.
    NotFound,
    /// The value is empty or not a decimal number that fits in 64 bits.
    NonNumeric,
    /// CAS given and it did not match.
    Exists,
    /// The new value could not be stored within the memory limit.
    NoMemory,
}

/// incr/decr request.
#[derive(Debug, Clone, Copy)]
pub struct Arith<'a> {
    /// The key: 1 to 250 bytes.
    pub key: &'a [u8],
    /// `true` for incr, `false` for decr.
    pub incr: bool,
    /// Amount to add or subtract. incr wraps at 2^64; decr stops at 0.
    pub delta: u64,
    /// Meta `C`: apply only if the item's CAS equals this (0: no check).
    pub compare_cas: Option<u64>,
}

/// A copy of an item's metadata, handed to readers alongside its value.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// The client's opaque flags.
    pub flags: u32,
    /// The item's version stamp, which is also its CAS.
    pub cas: u64,
    /// Absolute unix seconds; 0 = never.
    pub exptime: u32,
    /// Unix second of the last store or read.
    pub last_access: u32,
    /// Read at least once since it was stored.
    pub fetched: bool,
    /// Marked stale by a meta `I` (invalidate).
    pub stale: bool,
    /// A meta get already handed out the recache win token for it.
    pub win_sent: bool,
}

impl Meta {
    fn of(e: &Entry) -> Self {
        Self {
            flags: e.flags(),
            cas: e.cas(),
            exptime: e.exptime(),
            last_access: e.last_access(),
            fetched: e.has(bits::FETCHED),
            stale: e.has(bits::STALE),
            win_sent: e.has(bits::WIN_SENT),
        }
    }
}

/// One key's replicable state: what a primary ships to the other replicas
/// and what they apply, "highest version wins". Absolute expiry, so every
/// replica expires the item at the same second.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyState {
    /// A live item.
    Item {
        /// The item's version stamp (also its CAS).
        version: u64,
        /// The client's opaque flags.
        flags: u32,
        /// Absolute unix seconds; 0 = never.
        exptime: u32,
        /// The item bits that travel with it ([`REPLICATED_BITS`]: stale,
        /// base64 key); access bits stay local.
        bits: u8,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Request-id records ([`dedup`]): replicated with the item so a
        /// retry finds them on any replica.
        #[serde(with = "serde_bytes")]
        dedup: Vec<u8>,
    },
    /// The key was removed (deleted, or absent after a write that removed
    /// it) at this version. Applying it removes older items only.
    Absent {
        /// The version of the removal.
        version: u64,
        /// The records of a delete that carried a request id.
        #[serde(with = "serde_bytes")]
        dedup: Vec<u8>,
    },
}

impl KeyState {
    /// The state an entry stands for: its item, or its absence if it is a
    /// tombstone.
    pub fn of(e: &Entry) -> Self {
        if e.has(bits::TOMBSTONE) {
            return KeyState::Absent {
                version: e.cas(),
                dedup: e.dedup().to_vec(),
            };
        }
        KeyState::Item {
            version: e.cas(),
            flags: e.flags(),
            exptime: e.exptime(),
            bits: e.bits() & REPLICATED_BITS,
            value: e.value().to_vec(),
            dedup: e.dedup().to_vec(),
        }
    }

    /// The absence of a key at `version`, with no records.
    pub fn absent(version: u64) -> Self {
        KeyState::Absent {
            version,
            dedup: Vec::new(),
        }
    }

    /// The same state under another version.
    pub fn with_version(mut self, new: u64) -> Self {
        match &mut self {
            KeyState::Item { version, .. } | KeyState::Absent { version, .. } => *version = new,
        }
        self
    }

    /// The version stamp of the item or of its removal.
    pub fn version(&self) -> u64 {
        match self {
            KeyState::Item { version, .. } | KeyState::Absent { version, .. } => *version,
        }
    }

    /// Bytes of value and request-id records it carries (what a message or
    /// a hint holding it costs beyond the key and a fixed overhead).
    pub fn payload_bytes(&self) -> usize {
        let value = match self {
            KeyState::Item { value, .. } => value.len(),
            KeyState::Absent { .. } => 0,
        };
        value + self.dedup().len()
    }

    /// Its request-id records.
    pub fn dedup(&self) -> &[u8] {
        match self {
            KeyState::Item { dedup, .. } | KeyState::Absent { dedup, .. } => dedup,
        }
    }
}

/// When a replicated state replaces what a replica holds
/// ([`Store::apply_if`]).
#[derive(Debug, Clone, Copy)]
pub enum Condition<'a> {
    /// Highest version wins: blind writes, hints, read repair, refill,
    /// anti-entropy.
    Newest,
    /// The result of a read-modify-write computed on the key's state at
    /// version `base` (0: absent). Taken only if this replica holds nothing
    /// past `base`, or holds one of `replaces` (the same command's earlier,
    /// abandoned attempts); otherwise refused ([`Applied::Older`]) whatever
    /// the versions, because this replica holds a write the result did not
    /// see, and taking it (or letting it lose) would drop one of the two.
    Based {
        /// The version the result was computed on.
        base: u64,
        /// Versions of the command's abandoned attempts.
        replaces: &'a [u64],
    },
    /// A primary abandons its attempt (its state at version `attempt`) for
    /// a state a replica held: taken if this node still holds the attempt,
    /// even if the state is older, and then the attempt's record of request
    /// id `forget` goes, so the command runs again instead of replaying a
    /// result that was never kept. If this node holds another state by now
    /// (a result computed on the attempt, whose effect and record it
    /// carries), highest version wins and every record stays.
    Adopt {
        /// The version of the abandoned attempt.
        attempt: u64,
        /// The request id the attempt recorded, if it created the record.
        forget: Option<&'a [u8]>,
    },
}

/// A read-modify-write attempt being replicated ([`Store::attempt`]).
pub struct Attempt<'s> {
    store: &'s Store,
    key: Vec<u8>,
    version: u64,
}

impl Attempt<'_> {
    /// The attempt's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether a state not computed on the attempt has replaced it on this
    /// node: its effect may not be in what this node holds any more.
    pub fn overrun(&self) -> bool {
        self.store.locked(&self.key, |ctx| {
            let hash = ctx.hash;
            ctx.shard
                .attempts
                .iter()
                .any(|a| a.hash == hash && a.version == self.version && a.overrun)
        })
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let version = self.version;
        self.store.locked(&self.key, |ctx| {
            let hash = ctx.hash;
            ctx.shard
                .attempts
                .retain(|a| !(a.hash == hash && a.version == version));
        });
    }
}

thread_local! {
    /// The key (hash) this thread's primary is claiming an attempt for, and
    /// the version claimed so far (0: none yet) ([`Store::claim_attempt`]).
    static CLAIM: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// Item bits that are part of its replicated state.
pub const REPLICATED_BITS: u8 = bits::STALE | bits::KEY_BINARY;

/// What applying a [`KeyState`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It was newer than the local state and replaced it.
    Newer,
    /// Same version: only the expiry (a replicated `touch`) was taken.
    Same,
    /// The local state is newer; nothing changed.
    Older,
    /// Newer, but there was no memory to hold it.
    NoMemory,
    /// Not held here, and taking it would have evicted something: a repair
    /// ([`Fill::FreeOnly`]) does not fight eviction.
    NoRoom,
    /// Older than the last cluster-wide `flush_all`: dropped.
    Flushed,
    /// Stamped further ahead of this node's clock than the drift bound
    /// allows ([`StoreConfig::clock_drift_max_ms`]): refused, so a clock
    /// that is far off, or a forged message, cannot move this node's clock.
    TooFarAhead,
}

/// Summed store statistics.
#[derive(Debug, Default, Clone, Copy)]
pub struct StoreStats {
    /// The shards' counters, summed.
    pub counters: ShardStats,
    /// Live items (tombstones excluded).
    pub curr_items: u64,
    /// Tombstones held: versions of deletes and, in a cluster, of expiries
    /// (see [`StoreConfig::keep_versions`]); charged to the limit.
    pub tombstones: u64,
    /// Bytes held: item charges plus spare index buckets (see [`charge`]).
    pub bytes: u64,
    /// The memory limit in bytes, rounded down to a multiple of the shard count.
    pub limit_maxbytes: u64,
}

/// How [`Store::apply`] may make room for a key it does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Evict as a client write would: replication, hints, refill.
    Evict,
    /// Only into free memory: anti-entropy. A replica that evicted a key
    /// for lack of memory would otherwise get it back, evict another, get
    /// that back, and so on.
    FreeOnly,
}

/// Store construction options.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Bytes the store may hold in all, index included; split evenly across
    /// shards.
    pub memory_limit_bytes: usize,
    /// The largest item accepted, counted as memcached counts it (`-I`; see
    /// [`item_fits`]).
    pub item_bytes_max: usize,
    /// This node's id in its version stamps: at most [`hlc::NODE_ID_MAX`].
    pub node_id: u16,
    /// Keep anti-entropy trees over this many partitions (`None`: none).
    pub tree_partitions: Option<u32>,
    /// How long a tombstone outlives its delete, from the delete's version.
    pub tombstone_grace_secs: u32,
    /// Request ids: how long a record lasts and how many a key keeps.
    pub dedup: dedup::Policy,
    /// How far ahead of this node's clock a replicated version may be
    /// ([`crate::limits::CLOCK_DRIFT_MAX_MS_DEFAULT`]): later ones are
    /// refused ([`Applied::TooFarAhead`]). Tombstones are kept this much
    /// longer than their grace, so a node whose clock runs ahead by up to
    /// this much does not drop them before the others do.
    pub clock_drift_max_ms: u64,
    /// A cluster member: every removal leaves a tombstone at a version, an
    /// expired item at its own, a client's delete at a fresh one, taken
    /// under the shard lock with the delete. So a replica that missed the
    /// write cannot bring back the value it replaced, and a primary always
    /// has a new version to replicate for its delete. A single node lets
    /// expired and deleted items go, as memcached does.
    pub keep_versions: bool,
    /// Evict live items to make room (memcached's default). `false` is
    /// memcached's `-M`: only expired items and tombstones make room, and
    /// a write that still does not fit is refused (`SERVER_ERROR out of
    /// memory storing object`).
    pub evict_live: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            memory_limit_bytes: crate::limits::MEMORY_LIMIT_MB_DEFAULT << 20,
            item_bytes_max: crate::limits::ITEM_BYTES_MAX_DEFAULT,
            node_id: 0,
            tree_partitions: None,
            tombstone_grace_secs: TOMBSTONE_GRACE_SECS,
            dedup: dedup::Policy {
                window_ms: u64::from(crate::limits::DEDUP_WINDOW_SECS_DEFAULT) * 1000,
                records_max: crate::limits::REQUEST_ID_RECORDS_PER_KEY_DEFAULT,
            },
            clock_drift_max_ms: crate::limits::CLOCK_DRIFT_MAX_MS_DEFAULT,
            keep_versions: false,
            evict_live: true,
        }
    }
}

/// A key and the version of its entry there.
pub type KeyVersion = (Vec<u8>, u64);

/// A key found by [`Store::list_keys`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ListedKey {
    /// Its xxh3-64: the listing's order. Compared first.
    pub hash: u64,
    /// The key.
    pub key: Vec<u8>,
    /// Stored by a meta command with a base64 key: listed in base64.
    pub binary: bool,
}

/// A page of [`Store::list_keys`] being gathered: the `max` smallest keys
/// seen so far, and the smallest hash left out of them.
struct PageBuilder {
    best: std::collections::BinaryHeap<ListedKey>,
    min_out: Option<u64>,
    max: usize,
}

impl PageBuilder {
    /// Takes a key seen into the page if it is among the smallest so far.
    fn offer(&mut self, hash: u64, key: &[u8], binary: bool) {
        let smaller = self
            .best
            .peek()
            .is_none_or(|top| (hash, key) < (top.hash, &top.key[..]));
        if self.best.len() < self.max || smaller {
            self.best.push(ListedKey {
                hash,
                key: key.to_vec(),
                binary,
            });
            if self.best.len() > self.max {
                let out = self.best.pop().expect("over max").hash;
                self.left_out(out);
            }
        } else {
            self.left_out(hash);
        }
    }

    /// Notes a key (or a place, where the walk stopped) the page ends
    /// before.
    fn left_out(&mut self, hash: u64) {
        self.min_out = Some(self.min_out.map_or(hash, |m| m.min(hash)));
    }

    /// Whether the page is full of keys hashed below `hash`, so that no
    /// key at or past it can enter.
    fn settled_below(&self, hash: u64) -> bool {
        self.best.len() == self.max && self.best.peek().is_some_and(|top| top.hash < hash)
    }
}

/// One page of [`Store::list_keys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    /// Keys in hash order.
    pub keys: Vec<ListedKey>,
    /// The hash to continue from; `None`: the range is done.
    pub next: Option<u64>,
}

/// The unix second a version was stamped at.
pub fn version_unix_secs(version: u64) -> u32 {
    let ms = (version >> (hlc::LOGICAL_BITS + hlc::NODE_BITS)) + hlc::EPOCH_UNIX_MS;
    u32::try_from(ms / 1000).unwrap_or(u32::MAX)
}

/// A shard lock padded to its own cache lines so neighbours don't false-share.
#[repr(align(128))]
struct Padded(Mutex<Shard>);

/// The lock-sharded store.
pub struct Store {
    shards: Box<[Padded]>,
    /// log2 of the shard count.
    shard_bits: u32,
    clock: Arc<dyn Clock>,
    /// Version stamps: one clock per node, so every write's stamp is unique.
    hlc: hlc::Hlc,
    item_bytes_max: usize,
    limit_bytes: usize,
    /// Pending `flush_all <delay>`: unix second at which it takes effect, 0 = none.
    flush_at: AtomicU32,
    /// Version of the last cluster-wide `flush_all`; older replicated
    /// states are dropped (0: none).
    flush_barrier: AtomicU64,
    /// Anti-entropy trees, updated by every shard (`None`: not kept).
    trees: Option<Arc<Trees>>,
    /// How long a tombstone lives after its version: the configured grace
    /// plus the drift bound (see [`StoreConfig::clock_drift_max_ms`]).
    tombstone_grace_secs: u32,
    /// The drift bound, in ms.
    clock_drift_max_ms: u64,
    /// See [`StoreConfig::keep_versions`].
    keep_versions: bool,
    /// Versions refused for being too far ahead of this node's clock.
    versions_too_far_ahead: AtomicU64,
    dedup: dedup::Policy,
}

/// Shard count for a memory limit: a power of two, at most [`SHARDS_MAX`],
/// such that every shard can hold a few maximum-size items.
pub fn shard_count(limit_bytes: usize, item_bytes_max: usize) -> usize {
    let per = charge(item_bytes_max) * SHARD_ITEMS_OF_MAX_SIZE;
    let n = (limit_bytes / per.max(1)).clamp(1, SHARDS_MAX);
    if n.is_power_of_two() {
        n
    } else {
        n.next_power_of_two() / 2
    }
}

impl Store {
    /// A store with `config`'s limits, reading time from `clock`.
    ///
    /// # Panics
    /// If `config.node_id` is above [`hlc::NODE_ID_MAX`].
    pub fn new(config: &StoreConfig, clock: Arc<dyn Clock>) -> Self {
        let n = shard_count(config.memory_limit_bytes, config.item_bytes_max);
        let per_shard = config.memory_limit_bytes / n;
        let trees = config.tree_partitions.map(|p| Arc::new(Trees::new(p)));
        let drift_secs =
            u32::try_from(config.clock_drift_max_ms.div_ceil(1000)).unwrap_or(u32::MAX);
        let tombstone_grace_secs = config.tombstone_grace_secs.saturating_add(drift_secs);
        let expiry_grace = config.keep_versions.then_some(tombstone_grace_secs);
        let shard_bits = n.trailing_zeros();
        let shards = (0..n)
            .map(|_| {
                let mut shard = Shard::new(per_shard, trees.clone(), expiry_grace, shard_bits);
                shard.evict_live = config.evict_live;
                Padded(Mutex::new(shard))
            })
            .collect();
        Self {
            shards,
            shard_bits,
            clock,
            hlc: hlc::Hlc::new(config.node_id),
            item_bytes_max: config.item_bytes_max,
            limit_bytes: per_shard * n,
            flush_at: AtomicU32::new(0),
            flush_barrier: AtomicU64::new(0),
            trees,
            tombstone_grace_secs,
            clock_drift_max_ms: config.clock_drift_max_ms,
            keep_versions: config.keep_versions,
            versions_too_far_ahead: AtomicU64::new(0),
            dedup: config.dedup,
        }
    }

    /// Versions refused for being further ahead of this node's clock than
    /// the drift bound (replicated states and flushes).
    pub fn versions_too_far_ahead(&self) -> u64 {
        self.versions_too_far_ahead.load(Ordering::Relaxed)
    }

    /// Whether `version` was stamped further ahead of this node's clock
    /// than the drift bound allows; counts it if so.
    fn too_far_ahead(&self, version: u64) -> bool {
        let ahead = hlc::version_unix_ms(version)
            > self.clock.now_ms().saturating_add(self.clock_drift_max_ms);
        if ahead {
            self.versions_too_far_ahead.fetch_add(1, Ordering::Relaxed);
        }
        ahead
    }

    /// The anti-entropy trees, if this store keeps them.
    pub fn trees(&self) -> Option<&Trees> {
        self.trees.as_deref()
    }

    /// The store's clock, shared (for tasks that outlive a borrow).
    pub fn clock_arc(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// The store's clock.
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// The largest item accepted (see [`item_fits`]).
    pub fn item_bytes_max(&self) -> usize {
        self.item_bytes_max
    }

    /// The memory limit in bytes, rounded down to a multiple of the shard count.
    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    /// Number of lock shards: a power of two, at most [`SHARDS_MAX`].
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    #[inline]
    fn shard_index(&self, hash: u64) -> usize {
        // The top `shard_bits` bits; a shift by 64 would overflow.
        ((hash >> 32) >> (32 - self.shard_bits)) as usize
    }

    #[inline]
    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[self.shard_index(hash)].0
    }

    /// Entries last accessed before this second are flushed (0 = none).
    /// memcached's delayed flush takes effect one second before the delay
    /// runs out (`oldest_live = realtime(delay) - 1`) and removes items last
    /// used at or before that second; `flush_at` stores that second.
    #[inline]
    fn flushed_before(&self, now_secs: u32) -> u32 {
        let at = self.flush_at.load(Ordering::Relaxed);
        if at != 0 && now_secs >= at { at + 1 } else { 0 }
    }

    /// Runs `f` with the shard holding `key` locked and the key's live slot
    /// looked up (expired or flushed entries are removed first).
    ///
    /// # Panics
    /// If the key is longer than 250 bytes: every public operation takes a
    /// key, and passing an invalid one is a programmer error (check with
    /// [`valid_key`]). The protocol layer never passes one.
    #[inline]
    fn locked<R>(&self, key: &[u8], f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
        assert!(
            key.len() <= crate::limits::KEY_BYTES_MAX,
            "key of {} bytes is longer than memcached's 250",
            key.len()
        );
        let hash = key_hash(key);
        let now_ms = self.clock.now_ms();
        let now_secs = u32::try_from(now_ms / 1000).unwrap_or(u32::MAX);
        let flushed_before = self.flushed_before(now_secs);
        let mut shard = self.shard(hash).lock();
        let found = shard.find_live(hash, key, now_secs, flushed_before);
        let mut ctx = Ctx {
            shard: &mut shard,
            store: self,
            hash,
            key,
            found,
            now_ms,
            now_secs,
            record_as: None,
        };
        f(&mut ctx)
    }

    /// Starts loading the index buckets, then the items, of up to
    /// [`PREFETCH_KEYS`] keys, so the lookups that follow overlap their
    /// cache misses instead of taking them one after another (multi-get).
    pub fn prefetch(&self, keys: &[&[u8]]) {
        let mut hashes = [0u64; PREFETCH_KEYS];
        let n = keys.len().min(PREFETCH_KEYS);
        for (h, k) in hashes.iter_mut().zip(&keys[..n]) {
            *h = key_hash(k);
            self.shard(*h).lock().prefetch_bucket(*h);
        }
        for &h in &hashes[..n] {
            self.shard(h).lock().prefetch_item(h);
        }
    }

    /// Looks up `key` for a read, marking it used. `touch` (gat) sets a new
    /// exptime. `f` sees the item under the shard lock (copy what you need).
    pub fn get<R>(&self, key: &[u8], touch: Option<i64>, f: impl FnOnce(&Entry) -> R) -> Option<R> {
        self.locked(key, |ctx| ctx.read(touch, f))
    }

    /// A read as [`Store::get`] makes it, with the version of what it found
    /// taken under the same lock: the live item's version and `f`'s result,
    /// or a tombstone's version and `None` (a delete or an expiry that
    /// outranks older copies elsewhere); `None` when the key has neither.
    pub fn read_versioned<R>(
        &self,
        key: &[u8],
        f: impl FnOnce(&Entry) -> R,
    ) -> Option<(u64, Option<R>)> {
        self.locked(key, |ctx| {
            let read = ctx.read(None, |e| (e.cas(), f(e)));
            match read {
                Some((version, r)) => Some((version, Some(r))),
                None => ctx
                    .entry_slot()
                    .map(|slot| (ctx.shard.get(slot).cas(), None)),
            }
        })
    }

    /// set / add / replace / append / prepend / cas.
    pub fn write(&self, w: &Write<'_>) -> Stored {
        if !item_fits(w.key.len(), w.flags, w.value.len(), self.item_bytes_max) {
            self.reject_write(w.key, w.mode == Mode::Set && w.compare_cas.is_none(), true);
            return Stored::TooLarge;
        }
        self.locked(w.key, |ctx| ctx.write(w))
    }

    /// Records a write refused before its value was read: for its size
    /// (`too_large`) or for lack of memory to buffer it. memcached drops the
    /// old value of a refused `set` (`unlink`), so a stale value does not
    /// outlive a write the client believes replaced it.
    pub fn reject_write(&self, key: &[u8], unlink: bool, too_large: bool) {
        self.locked(key, |ctx| {
            if too_large {
                ctx.shard.stats.store_too_large += 1;
            } else {
                ctx.shard.stats.store_no_memory += 1;
            }
            if unlink {
                ctx.remove();
            }
        });
    }

    /// incr / decr.
    pub fn arith(&self, a: &Arith<'_>) -> Delta {
        self.locked(a.key, |ctx| ctx.arith(a))
    }

    /// delete. `compare_cas` (meta `C`) must match if given.
    pub fn delete(&self, key: &[u8], compare_cas: Option<u64>) -> Result<(), Stored> {
        self.locked(key, |ctx| {
            let Ok(slot) = ctx.found else {
                ctx.shard.stats.delete_misses += 1;
                return Err(Stored::NotFound);
            };
            if let Some(c) = compare_cas {
                if ctx.shard.get(slot).cas() != c {
                    return Err(Stored::Exists);
                }
            }
            ctx.shard.stats.delete_hits += 1;
            ctx.delete();
            Ok(())
        })
    }

    /// touch: sets a new exptime. Returns whether the key was found.
    pub fn touch(&self, key: &[u8], exptime: i64) -> bool {
        self.locked(key, |ctx| {
            ctx.shard.stats.cmd_touch += 1;
            match ctx.found {
                Ok(slot) => {
                    ctx.shard.stats.touch_hits += 1;
                    let now = ctx.now_secs;
                    ctx.shard.touch_access(slot, now);
                    ctx.shard
                        .get_mut(slot)
                        .set_exptime(exptime::absolute(exptime, now));
                    true
                }
                Err(_) => {
                    ctx.shard.stats.touch_misses += 1;
                    false
                }
            }
        })
    }

    /// A copy of the key's live item as replicable state; `None` if absent.
    /// Does not count as a read (no stats, no access bits).
    pub fn snapshot(&self, key: &[u8]) -> Option<KeyState> {
        self.locked(key, |ctx| ctx.item().map(KeyState::of))
    }

    /// The live item's version and absolute expiry, if any: cheap change
    /// detection around a write.
    pub fn version_of(&self, key: &[u8]) -> Option<(u64, u32)> {
        self.locked(key, |ctx| ctx.item().map(|e| (e.cas(), e.exptime())))
    }

    /// The version of the key's live item or of its tombstone: what a read
    /// compares, so a delete outranks older copies on other replicas.
    pub fn version_or_tombstone(&self, key: &[u8]) -> Option<u64> {
        self.locked(key, |ctx| match ctx.found {
            Ok(slot) | Err(Gone::Deleted(slot) | Gone::Expired(Some(slot))) => {
                Some(ctx.shard.get(slot).cas())
            }
            Err(_) => None,
        })
    }

    /// The version and expiry of the key's entry, live item or tombstone:
    /// cheap change detection around a write that may leave either.
    pub fn entry_version(&self, key: &[u8]) -> Option<(u64, u32)> {
        self.locked(key, |ctx| match ctx.found {
            Ok(slot) | Err(Gone::Deleted(slot) | Gone::Expired(Some(slot))) => {
                let e = ctx.shard.get(slot);
                Some((e.cas(), e.exptime()))
            }
            Err(_) => None,
        })
    }

    /// The key's state as a replica holds it, tombstone included: what a
    /// primary catching up needs.
    pub fn replica_state(&self, key: &[u8]) -> Option<KeyState> {
        self.locked(key, |ctx| match ctx.found {
            Ok(slot) | Err(Gone::Deleted(slot) | Gone::Expired(Some(slot))) => {
                Some(KeyState::of(ctx.shard.get(slot)))
            }
            Err(_) => None,
        })
    }

    /// Applies replicated state, highest version wins, making room as a
    /// client write would ([`Fill::Evict`]).
    pub fn apply(&self, key: &[u8], state: &KeyState) -> Applied {
        self.apply_with(key, state, Fill::Evict)
    }

    /// Applies replicated state, highest version wins. An absence leaves a
    /// tombstone until [`Store::tombstone_expiry`], so an older copy
    /// arriving late loses to it; so does an item that is already past its
    /// expiry, in a cluster ([`StoreConfig::keep_versions`]). A state
    /// whose tombstone would be past its grace only removes what it
    /// outranks, on every replica alike. A state older than the last
    /// cluster-wide `flush_all` is dropped, and one stamped further ahead of
    /// this node's clock than the drift bound is refused. The node's clock
    /// moves past the version, so its own next write orders after it.
    ///
    /// Request-id records merge whichever state wins ([`dedup::merge`]): a
    /// record on either copy survives on the result, so a retry finds it
    /// even after a newer write from a primary that never saw it.
    pub fn apply_with(&self, key: &[u8], state: &KeyState, fill: Fill) -> Applied {
        self.apply_if(key, state, fill, Condition::Newest)
    }

    /// Applies replicated state when `condition` allows it (see
    /// [`Condition`]); [`Store::apply_with`] is `Condition::Newest`.
    /// Otherwise as [`Store::apply_with`].
    pub fn apply_if(
        &self,
        key: &[u8],
        state: &KeyState,
        fill: Fill,
        condition: Condition<'_>,
    ) -> Applied {
        if self.too_far_ahead(state.version()) {
            return Applied::TooFarAhead;
        }
        self.hlc.observe(state.version());
        self.locked(key, |ctx| {
            // Checked under the shard lock: a flush that clears this shard
            // has raised the barrier before taking the lock.
            if state.version() < self.flush_barrier.load(Ordering::Relaxed) {
                return Applied::Flushed;
            }
            // Records from a peer are checked, not trusted to decode, and
            // none may claim a time past the drift bound (it would never
            // leave the window, and crowd out real ones).
            let latest_ms = ctx.now_ms.saturating_add(self.clock_drift_max_ms);
            let checked;
            let incoming = if !dedup::well_formed(state.dedup()) {
                &[][..]
            } else if dedup::records(state.dedup()).any(|r| r.at_ms > latest_ms) {
                checked = dedup::not_after(state.dedup(), latest_ms);
                &checked[..]
            } else {
                state.dedup()
            };
            let local = ctx.entry_slot().map(|slot| {
                let e = ctx.shard.get(slot);
                (e.cas(), e.has(bits::TOMBSTONE))
            });
            // At one version an item still alive here outranks the
            // tombstone its own expiry left: that copy was touched to a
            // later expiry (a touch keeps the version, as memcached keeps
            // the CAS) after the one that expired. A tombstone never
            // outranks the live item at its version: expiry is judged by
            // each node's own clock, and a primary that shortens an item's
            // life writes a new version instead.
            let revived = local.is_some_and(|(v, tombstone)| v == state.version() && tombstone)
                && matches!(state, KeyState::Item { exptime, .. } if !exptime::is_expired(*exptime, ctx.now_secs));
            let held = local.map_or(0, |(v, _)| v);
            if let Some((v, tombstone)) = local.filter(|_| !revived) {
                if state.version() == v {
                    if let (false, KeyState::Item { exptime, .. }) = (tombstone, state) {
                        // A replicated touch keeps the version (memcached's
                        // touch keeps the CAS): take the primary's expiry,
                        // unless it is past here (a touch into the past
                        // comes as a new version; this is a stale copy).
                        if let (Ok(slot), false) =
                            (ctx.found, exptime::is_expired(*exptime, ctx.now_secs))
                        {
                            ctx.shard.get_mut(slot).set_exptime(*exptime);
                        }
                    }
                    ctx.absorb_records(incoming);
                    return Applied::Same;
                }
            }
            let take = revived
                || match condition {
                    Condition::Newest => state.version() > held,
                    Condition::Based { base, replaces } => held <= base || replaces.contains(&held),
                    Condition::Adopt { attempt, .. } => held == attempt || state.version() > held,
                };
            if !take {
                match condition {
                    // A late or resent copy: its records still count.
                    Condition::Newest => ctx.absorb_records(incoming),
                    // A result computed without what this replica holds:
                    // refused whole, records too (its primary runs again).
                    Condition::Based { .. } => {}
                    // Not the attempt any more: this node took a state
                    // since (another command's result on the attempt, say),
                    // so the attempt's record, if there, marks an effect
                    // that state holds: it stays, as under `Newest`.
                    Condition::Adopt { .. } => ctx.absorb_records(incoming),
                }
                return Applied::Older;
            }
            let mut local_area = ctx
                .entry_slot()
                .map(|slot| ctx.shard.get(slot).dedup().to_vec())
                .unwrap_or_default();
            // An abandoned attempt that the command's next result replaces
            // never happened: its own records go with it (found in review:
            // a restore after the last conflict kept the id, and the
            // client's retry replayed an increment the key never held).
            // So do those of an attempt this node is replicating, when a
            // state not computed on it replaces it here (a newer write's
            // read repair, a hint, anti-entropy): that state lacks the
            // attempt's effect, and its primary must run the command
            // again rather than find the record and replay.
            let replaces_attempt =
                matches!(condition, Condition::Based { replaces, .. } if replaces.contains(&held));
            let built_on_held = matches!(condition, Condition::Based { base, .. } if base == held);
            let hash = ctx.hash;
            let in_flight = ctx
                .shard
                .attempts
                .iter_mut()
                .find(|a| a.hash == hash && a.version == held);
            let overrun = match in_flight {
                Some(a) if !built_on_held && state.version() != held => {
                    a.overrun = true;
                    true
                }
                _ => false,
            };
            if held != 0 && (replaces_attempt || overrun) {
                local_area = dedup::without_made_at(&local_area, held);
            }
            let (mut area, dropped) = dedup::merge(incoming, &local_area, ctx.now_ms, self.dedup);
            // Only the attempt's own state loses the record: a state taken
            // since may be built on the attempt, its effect included.
            if let Condition::Adopt {
                attempt,
                forget: Some(id),
            } = condition
            {
                if held == attempt {
                    area = dedup::without(&area, id);
                }
            }
            ctx.shard.stats.request_id_records_dropped += dropped as u64;
            let version = state.version();
            let tombstone = |ctx: &Ctx<'_>| {
                let until = self.tombstone_expiry(version);
                let mut item = NewItem::with_dedup(ctx.key, &[], &area, 0, until, version);
                item.entry_mut().set(bits::TOMBSTONE | bits::FETCHED, true);
                item
            };
            let (mut item, mut bits_to_copy) = match state {
                KeyState::Absent { .. } => (tombstone(ctx), None),
                KeyState::Item {
                    flags,
                    exptime,
                    bits: replicated,
                    value,
                    ..
                } => {
                    let item =
                        NewItem::with_dedup(ctx.key, &[value], &area, *flags, *exptime, version);
                    (item, Some(*replicated))
                }
            };
            if bits_to_copy.is_some()
                && self.keep_versions
                && exptime::is_expired(item.entry().exptime(), ctx.now_secs)
            {
                // Expired on arrival: in a cluster its version stays, as a
                // tombstone, like the item's would have on expiring here.
                item = tombstone(ctx);
                bits_to_copy = None;
            }
            if exptime::is_expired(item.entry().exptime(), ctx.now_secs) {
                // Dead on arrival, past any grace: it still outranks what
                // is here.
                ctx.remove_entry();
                return Applied::Newer;
            }
            if local.is_none()
                && fill == Fill::FreeOnly
                && !ctx.shard.has_room_for(item.entry().charge())
            {
                return Applied::NoRoom;
            }
            match ctx.insert_item(item, version) {
                Ok(_) => match bits_to_copy {
                    Some(replicated) => {
                        for bit in [bits::STALE, bits::KEY_BINARY] {
                            ctx.set_bit(bit, replicated & bit != 0);
                        }
                        Applied::Newer
                    }
                    None => {
                        // Invisible to clients: the key reads as absent.
                        if let Ok(slot) = ctx.found {
                            ctx.found = Err(Gone::Deleted(slot));
                        }
                        Applied::Newer
                    }
                },
                Err(_) => Applied::NoMemory,
            }
        })
    }

    /// The unix second at which a tombstone written at `version` goes:
    /// fixed by the delete's own version, so every replica drops it at the
    /// same time however late its copy arrived.
    pub fn tombstone_expiry(&self, version: u64) -> u32 {
        shard::tombstone_until(version, self.tombstone_grace_secs)
    }

    /// A cluster-wide `flush_all` at `version`: replicated states older than
    /// it are dropped from now on, so a copy in flight when the flush ran
    /// cannot refill the cache.
    ///
    /// Returns `false`, and changes nothing, if `version` is further ahead
    /// of this node's clock than the drift bound: a barrier that far ahead
    /// would drop every write for as long.
    #[must_use]
    pub fn set_flush_barrier(&self, version: u64) -> bool {
        if self.too_far_ahead(version) {
            return false;
        }
        self.hlc.observe(version);
        self.flush_barrier.fetch_max(version, Ordering::Relaxed);
        true
    }

    /// A fresh version stamp (for a removal that must replicate).
    pub fn next_version(&self) -> u64 {
        self.hlc.next(self.clock.now_ms())
    }

    /// Runs `command` (a read-modify-write of `key` this node executes as
    /// its primary, on this thread) and marks the version it writes for
    /// the key as an attempt this node is replicating, until the returned
    /// guard drops. The mark is taken under the same lock as the write, so
    /// no state can replace the attempt unseen. A state not computed on the
    /// attempt that replaces it here meanwhile takes none of the attempt's
    /// own records along, and the guard tells ([`Attempt::overrun`]).
    /// `None`: the command wrote no new version of the key.
    pub fn claim_attempt<R>(
        &self,
        key: &[u8],
        command: impl FnOnce() -> R,
    ) -> (R, Option<Attempt<'_>>) {
        /// Ends the claim however `command` ends (a panic too).
        struct Unclaim;
        impl Drop for Unclaim {
            fn drop(&mut self) {
                CLAIM.with(|c| c.set(None));
            }
        }
        let hash = key_hash(key);
        CLAIM.with(|c| c.set(Some((hash, 0))));
        let unclaim = Unclaim;
        let result = command();
        let claimed = CLAIM.with(std::cell::Cell::get);
        drop(unclaim);
        let attempt = claimed
            .filter(|&(_, version)| version != 0)
            .map(|(_, version)| Attempt {
                store: self,
                key: key.to_vec(),
                version,
            });
        (result, attempt)
    }

    /// General single-key access for protocol features that need more than
    /// the operations above (meta commands). `f` runs under the shard lock.
    pub fn with_key<R>(&self, key: &[u8], f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
        self.locked(key, f)
    }

    /// flush_all: with no delay every item goes now; with a delay, items last
    /// used before `now + delay - 1` die at that second (memcached's timing).
    pub fn flush_all(&self, delay_secs: i64) {
        if delay_secs > 0 {
            let at = exptime::absolute(delay_secs, self.clock.now_secs())
                .saturating_sub(1)
                .max(1);
            self.flush_at.store(at, Ordering::Relaxed);
            return;
        }
        self.flush_at.store(0, Ordering::Relaxed);
        for s in self.shards.iter() {
            s.0.lock().clear();
        }
    }

    /// One page of a walk over every entry, tombstones included: the states
    /// of up to `max_items` keys (or about `max_bytes` of values) for which
    /// `want(key)` holds, starting at `cursor` (0 to begin). Returns the
    /// page and the cursor to continue from, `None` at the end. Each shard
    /// is locked for at most [`SCAN_BUCKETS_PER_LOCK`] buckets at a time.
    /// An index that grows or shrinks during a walk can make it skip or
    /// repeat entries; callers apply states, so repeats are harmless.
    pub fn scan_page(
        &self,
        cursor: u64,
        max_items: usize,
        max_bytes: usize,
        want: impl Fn(&[u8]) -> bool,
    ) -> (Vec<(Vec<u8>, KeyState)>, Option<u64>) {
        let now = self.clock.now_secs();
        let flushed_before = self.flushed_before(now);
        let mut shard = (cursor >> 40) as usize;
        let mut bucket = (cursor & ((1 << 40) - 1)) as usize;
        let mut page = Vec::new();
        let mut bytes = 0usize;
        while shard < self.shards.len() {
            let s = self.shards[shard].0.lock();
            let end = s.buckets().min(bucket + SCAN_BUCKETS_PER_LOCK);
            while bucket < end {
                if page.len() >= max_items || bytes >= max_bytes {
                    return (page, Some(((shard as u64) << 40) | bucket as u64));
                }
                if let Some(e) = s.entry_at(bucket) {
                    let live =
                        !exptime::is_expired(e.exptime(), now) && e.last_access() >= flushed_before;
                    if live && want(e.key()) {
                        let state = KeyState::of(e);
                        // Records count too: a page of keys with many of
                        // them must still fit one peer frame.
                        bytes += e.key().len() + state.payload_bytes();
                        page.push((e.key().to_vec(), state));
                    }
                }
                bucket += 1;
            }
            if bucket >= s.buckets() {
                shard += 1;
                bucket = 0;
            } else {
                // Lock held long enough: let writers in, go on next page.
                return (page, Some(((shard as u64) << 40) | bucket as u64));
            }
        }
        (page, None)
    }

    /// One step of a walk that removes every entry (live item or
    /// tombstone) whose key `drop` picks, without a tombstone: the copies a
    /// node no longer replicates once partitions have moved away from it.
    /// Starts at `cursor` (0 to begin), visits at most
    /// [`SCAN_BUCKETS_PER_LOCK`] buckets under one shard lock, and returns
    /// how many it removed and the cursor to go on from (`None`: done).
    /// The hash trees follow each removal.
    pub fn drop_step(&self, cursor: u64, drop: impl Fn(&[u8]) -> bool) -> (usize, Option<u64>) {
        let shard = (cursor >> 40) as usize;
        let bucket = (cursor & ((1 << 40) - 1)) as usize;
        let Some(s) = self.shards.get(shard) else {
            return (0, None);
        };
        let mut s = s.0.lock();
        let end = s.buckets().min(bucket + SCAN_BUCKETS_PER_LOCK);
        let dropped = (bucket..end).filter(|&i| s.drop_at(i, &drop)).count();
        let next = if end >= s.buckets() {
            (shard + 1 < self.shards.len()).then_some((shard as u64 + 1) << 40)
        } else {
            Some(((shard as u64) << 40) | end as u64)
        };
        (dropped, next)
    }

    /// One step of a digest of every entry (live items and tombstones, not
    /// those expired or flushed): for each, `digests[partition]` counts it
    /// and XORs in the xxh3 of its key followed by its version (little
    /// endian). Starts at `cursor` (0 to begin) and visits at most
    /// [`SCAN_BUCKETS_PER_LOCK`] buckets under one shard lock; returns the
    /// cursor to go on from, `None` at the end. Copies nothing: the cost of
    /// a whole walk is the store's size in CPU and `digests` in memory.
    pub fn digest_step(
        &self,
        cursor: u64,
        partitions: u32,
        digests: &mut [(u64, u64)],
    ) -> Option<u64> {
        let now = self.clock.now_secs();
        let flushed_before = self.flushed_before(now);
        let shard = (cursor >> 40) as usize;
        let mut bucket = (cursor & ((1 << 40) - 1)) as usize;
        let s = self.shards.get(shard)?.0.lock();
        let end = s.buckets().min(bucket + SCAN_BUCKETS_PER_LOCK);
        while bucket < end {
            if let Some(e) = s.entry_at(bucket) {
                if !exptime::is_expired(e.exptime(), now) && e.last_access() >= flushed_before {
                    let key = e.key();
                    let mut h = xxhash_rust::xxh3::Xxh3::new();
                    h.update(key);
                    h.update(&e.cas().to_le_bytes());
                    let p = crate::cluster::ring::partition_of_hash(key_hash(key), partitions);
                    let d = &mut digests[p as usize];
                    d.0 += 1;
                    d.1 ^= h.digest();
                }
            }
            bucket += 1;
        }
        if bucket < s.buckets() {
            Some(((shard as u64) << 40) | bucket as u64)
        } else {
            (shard + 1 < self.shards.len()).then(|| (shard as u64 + 1) << 40)
        }
    }

    /// One page of a key listing: the live keys whose hash lies in
    /// `from..=to`, the `max` smallest in (hash, key) order. `next` is where
    /// the range goes on (`None`: this page ends it). Keys that share the
    /// page's last hash start the next page together, so a page boundary
    /// never splits them. Tombstones, expired and flushed items are left
    /// out.
    ///
    /// Walks only what it returns: index buckets are in hash order (see
    /// `index`), so the walk starts at the home bucket of `from` and stops
    /// once no key it has not seen can be among the `max` smallest, or
    /// after [`LIST_BUCKETS_PER_CALL_MAX`] buckets (the page then ends
    /// early, with a `next` past every key seen). Each shard is locked for
    /// at most [`SCAN_BUCKETS_PER_LOCK`] buckets at a time (plus the probe
    /// run it stops in), and the walk holds at most `max` keys.
    ///
    /// # Panics
    /// If `max` is 0 or `from > to`.
    pub fn list_keys(&self, from: u64, to: u64, max: usize) -> KeyPage {
        self.list_keys_walking(from, to, max).0
    }

    /// [`Store::list_keys`], and how many index buckets it walked.
    pub(crate) fn list_keys_walking(&self, from: u64, to: u64, max: usize) -> (KeyPage, usize) {
        assert!(max > 0 && from <= to, "list_keys({from}, {to}, {max})");
        let now = self.clock.now_secs();
        let flushed_before = self.flushed_before(now);
        let mut page = PageBuilder {
            best: std::collections::BinaryHeap::with_capacity(max.min(1024) + 1),
            min_out: None,
            max,
        };
        // Where the walk stopped short of `to`: every key below it was seen.
        let mut frontier: Option<u64> = None;
        let mut walked = 0usize;
        'shards: for shard in self.shard_index(from)..=self.shard_index(to) {
            // The shard's hashes, as a range; a shift by 64 would overflow.
            let floor = ((shard as u64) << 32) << (32 - self.shard_bits);
            let (mut lo, hi) = (
                from.max(floor),
                to.min(floor | (u64::MAX >> self.shard_bits)),
            );
            // One lock at a time; `lo` moves on past the keys seen.
            'locks: loop {
                let s = self.shards[shard].0.lock();
                let index = s.index();
                let buckets = s.buckets();
                if buckets == 0 {
                    break;
                }
                let at = |b: usize| index.floor(b).map_or(u64::MAX, |f| floor | f);
                let last_home = index.home(hi);
                let consider = |page: &mut PageBuilder, hash: u64, e: &shard::Entry| {
                    let live = !e.has(bits::TOMBSTONE)
                        && !exptime::is_expired(e.exptime(), now)
                        && e.last_access() >= flushed_before;
                    if live && (lo..=hi).contains(&hash) {
                        page.offer(hash, e.key(), e.has(bits::KEY_BINARY));
                    }
                };
                let mut b = index.home(lo);
                let mut this_lock = 0;
                while b < buckets {
                    if index.vacant(b) {
                        // No probe crosses an empty bucket: every key whose
                        // home is before it has been seen, and every key not
                        // seen hashes at or past `at(b)`.
                        if b > last_home {
                            continue 'shards;
                        }
                        if page.settled_below(at(b)) {
                            frontier = Some(at(b));
                            break 'shards;
                        }
                        if walked >= LIST_BUCKETS_PER_CALL_MAX {
                            frontier = Some(at(b));
                            break 'shards;
                        }
                        if this_lock >= SCAN_BUCKETS_PER_LOCK {
                            lo = lo.max(at(b));
                            continue 'locks;
                        }
                    } else if let Some(e) = s.entry_at(b) {
                        let hash = key_hash(e.key());
                        // An entry whose home is past it wrapped around the
                        // end: the pass below sees it.
                        if index.home(hash) <= b {
                            consider(&mut page, hash, e);
                        }
                    }
                    b += 1;
                    walked += 1;
                    this_lock += 1;
                }
                // The end of the table: the run that wraps around it.
                for b in (0..buckets).take_while(|&b| !index.vacant(b)) {
                    if let Some(e) = s.entry_at(b) {
                        let hash = key_hash(e.key());
                        if index.home(hash) > b {
                            consider(&mut page, hash, e);
                        }
                    }
                    walked += 1;
                }
                break;
            }
        }
        if let Some(f) = frontier {
            page.left_out(f);
        }
        let mut keys = page.best.into_sorted_vec();
        let Some(out) = page.min_out else {
            return (KeyPage { keys, next: None }, walked);
        };
        let Some(last) = keys.last().map(|k| k.hash) else {
            return (
                KeyPage {
                    keys,
                    next: Some(out),
                },
                walked,
            );
        };
        if out > last {
            // The usual case: the next page starts past this one's last key.
            return (
                KeyPage {
                    keys,
                    next: Some(out),
                },
                walked,
            );
        }
        // A key left out shares the last hash (a 64-bit collision): the
        // keys with that hash start the next page together.
        let first_of_last = keys.partition_point(|k| k.hash < last);
        if first_of_last > 0 {
            keys.truncate(first_of_last);
            return (
                KeyPage {
                    keys,
                    next: Some(last),
                },
                walked,
            );
        }
        // More than `max` keys share one hash: never seen, but go on past
        // it rather than loop.
        let next = last.checked_add(1).filter(|&n| n <= to);
        (KeyPage { keys, next }, walked)
    }

    /// The shards holding partition `p` of `partitions`: its hashes form
    /// one range of the top bits, and so do the shards'.
    pub fn shards_of_partition(&self, p: u32, partitions: u32) -> std::ops::RangeInclusive<usize> {
        let (lo, hi) = crate::cluster::ring::partition_range(p, partitions);
        self.shard_index(lo)..=self.shard_index(hi)
    }

    /// The (key, version) of every entry in the given leaves of the
    /// anti-entropy trees: live items and tombstones, not those expired or
    /// flushed, which every replica leaves out alike (the walk removes
    /// them from the shards it passes through, as the sweep would). Leaves are answered
    /// whole and in the order asked, one list per leaf, as many leaves as
    /// fit in `max_entries` entries (at least one).
    /// Walks only the shards of the partitions asked, each locked for at
    /// most [`SCAN_BUCKETS_PER_LOCK`] buckets at a time.
    ///
    /// # Panics
    /// If the store keeps no trees.
    pub fn leaf_entries(&self, leaves: &[(u32, u16)], max_entries: usize) -> Vec<Vec<KeyVersion>> {
        let partitions = self.trees().expect("a store with trees").partitions();
        let wanted: std::collections::HashMap<(u32, u16), usize> =
            leaves.iter().enumerate().map(|(i, l)| (*l, i)).collect();
        let mut shards: Vec<usize> = leaves
            .iter()
            .flat_map(|(p, _)| self.shards_of_partition(*p, partitions))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let now = self.clock.now_secs();
        let flushed_before = self.flushed_before(now);
        let mut found: Vec<Vec<KeyVersion>> = vec![Vec::new(); leaves.len()];
        for shard in shards {
            let mut bucket = 0;
            loop {
                let mut s = self.shards[shard].0.lock();
                let end = s.buckets().min(bucket + SCAN_BUCKETS_PER_LOCK);
                while bucket < end {
                    // Dead entries go now, on both sides of a comparison
                    // alike, so they stop making the trees differ.
                    if s.reap_at(bucket, now, flushed_before) {
                        bucket += 1;
                        continue;
                    }
                    if let Some(e) = s.entry_at(bucket) {
                        let h = key_hash(e.key());
                        let at = (
                            crate::cluster::ring::partition_of_hash(h, partitions),
                            leaf_of(h),
                        );
                        if let Some(&i) = wanted.get(&at) {
                            found[i].push((e.key().to_vec(), e.cas()));
                        }
                    }
                    bucket += 1;
                }
                if bucket >= s.buckets() {
                    break;
                }
            }
        }
        let mut total = 0;
        let covered = found
            .iter()
            .take_while(|entries| {
                let first = total == 0;
                total += entries.len();
                first || total <= max_entries
            })
            .count();
        found.truncate(covered);
        found
    }

    /// One bounded pass of the background expiry sweep over every shard.
    /// Returns the number of entries reclaimed.
    pub fn sweep(&self, slots_per_shard: usize) -> usize {
        let now = self.clock.now_secs();
        let flushed_before = self.flushed_before(now);
        self.shards
            .iter()
            .map(|s| s.0.lock().sweep(slots_per_shard, now, flushed_before))
            .sum()
    }

    /// Counters and sizes summed over every shard. Shards are read one after
    /// another, so the sum is not one instant's snapshot.
    pub fn stats(&self) -> StoreStats {
        let mut out = StoreStats {
            limit_maxbytes: self.limit_bytes as u64,
            ..Default::default()
        };
        for s in self.shards.iter() {
            let s = s.0.lock();
            out.counters.add(&s.stats);
            out.curr_items += s.live_len() as u64;
            out.tombstones += (s.len() - s.live_len()) as u64;
            out.bytes += s.footprint_bytes() as u64;
        }
        out
    }

    /// Zeroes the counters (`stats reset`).
    pub fn reset_stats(&self) {
        for s in self.shards.iter() {
            s.0.lock().stats = ShardStats::default();
        }
    }

    /// Checks every shard's invariants. For tests.
    ///
    /// # Panics
    /// On a broken invariant.
    pub fn check_invariants(&self) {
        for s in self.shards.iter() {
            s.0.lock().check_invariants();
        }
        // The trees hold exactly the entries in the shards: rebuilt from
        // scratch, every leaf matches. (Only meaningful while no other
        // thread writes.)
        if let Some(trees) = &self.trees {
            let fresh = Trees::new(trees.partitions());
            let shards: Vec<_> = self.shards.iter().map(|s| s.0.lock()).collect();
            for (i, s) in shards.iter().enumerate() {
                for bucket in 0..s.buckets() {
                    if let Some(e) = s.entry_at(bucket) {
                        let h = key_hash(e.key());
                        assert_eq!(self.shard_index(h), i, "entry in the wrong shard");
                        fresh.toggle(h, e.cas());
                    }
                }
            }
            for p in 0..trees.partitions() {
                for leaf in 0..merkle::LEAVES as u16 {
                    let node = merkle::TreeNode {
                        partition: p,
                        level: merkle::DEPTH,
                        index: leaf,
                    };
                    assert_eq!(
                        trees.hash(node),
                        fresh.hash(node),
                        "tree leaf {p}/{leaf} drifted"
                    );
                }
            }
        }
    }
}

/// One key's shard, locked, with the key's live slot looked up.
pub struct Ctx<'a> {
    shard: &'a mut Shard,
    store: &'a Store,
    hash: u64,
    key: &'a [u8],
    found: Result<Slot, Gone>,
    /// The operation's one clock reading, in ms and whole seconds.
    now_ms: u64,
    /// The operation's clock reading in whole unix seconds.
    pub now_secs: u32,
    /// The request id (and, for `ma`, the number) to record on this
    /// operation's write, if it succeeds ([`Ctx::record_as`]).
    record_as: Option<(RequestId, Option<u64>)>,
}

/// A request id, held inline (ids are at most 32 bytes).
#[derive(Debug, Clone, Copy)]
struct RequestId {
    bytes: [u8; crate::limits::REQUEST_ID_BYTES_MAX],
    len: u8,
}

impl RequestId {
    fn new(id: &[u8]) -> Self {
        assert!(dedup::valid_id(id), "request ids are checked by the parser");
        let mut bytes = [0; crate::limits::REQUEST_ID_BYTES_MAX];
        bytes[..id.len()].copy_from_slice(id);
        Self {
            bytes,
            len: id.len() as u8,
        }
    }

    fn get(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Ctx<'_> {
    /// The live item, if any.
    pub fn item(&self) -> Option<&Entry> {
        self.found.ok().map(|s| self.shard.get(s))
    }

    /// The key's entry, live item or tombstone (left by a delete or an
    /// expiry), if any.
    fn entry_slot(&self) -> Option<Slot> {
        match self.found {
            Ok(slot) => Some(slot),
            Err(gone) => gone.entry(),
        }
    }

    /// Whether the key's entry (live item or tombstone) records request
    /// `id` within the window. Not counted as a replay.
    pub fn has_record(&self, id: &[u8]) -> bool {
        self.entry_slot().is_some_and(|slot| {
            dedup::find(
                self.shard.get(slot).dedup(),
                id,
                self.now_ms,
                self.store.dedup,
            )
            .is_some()
        })
    }

    /// Merges `incoming` request-id records into the key's entry (live
    /// item or tombstone), which keeps its version, value and bits: what a
    /// replica does with the records of a state that lost to its own.
    fn absorb_records(&mut self, incoming: &[u8]) {
        let Some(slot) = self.entry_slot() else {
            return;
        };
        if incoming.is_empty() {
            return;
        }
        let e = self.shard.get(slot);
        let (area, dropped) = dedup::merge(e.dedup(), incoming, self.now_ms, self.store.dedup);
        if area == e.dedup() {
            return;
        }
        self.shard.stats.request_id_records_dropped += dropped as u64;
        self.rewrite_records(&area);
    }

    /// Replaces the records of the key's entry (live item or tombstone),
    /// which keeps its version, value and bits.
    fn rewrite_records(&mut self, area: &[u8]) {
        let Some(slot) = self.entry_slot() else {
            return;
        };
        let e = self.shard.get(slot);
        let (cas, entry_bits, last_access) = (e.cas(), e.bits(), e.last_access());
        let tombstone = e.has(bits::TOMBSTONE);
        let mut item =
            NewItem::with_dedup(self.key, &[e.value()], area, e.flags(), e.exptime(), cas);
        // Bits first: the shard counts tombstones by them as it inserts.
        item.entry_mut().set_bits(entry_bits);
        if self.insert_item(item, cas).is_err() {
            return;
        }
        let slot = self.found.expect("just inserted");
        self.shard.get_mut(slot).set_last_access(last_access);
        if tombstone {
            self.found = Err(Gone::Deleted(slot));
        } else {
            // The same item with more records, not a new one.
            self.shard.stats.total_items -= 1;
        }
    }

    /// A client read of the key ([`Store::get`]): counts it, marks the
    /// live item used, applies a `gat` exptime, and runs `f` on it.
    fn read<R>(&mut self, touch: Option<i64>, f: impl FnOnce(&Entry) -> R) -> Option<R> {
        let now = self.now_secs;
        let st = &mut self.shard.stats;
        st.cmd_get += 1;
        if touch.is_some() {
            st.cmd_touch += 1;
        }
        match self.found {
            Ok(slot) => {
                if touch.is_some() {
                    st.touch_hits += 1
                } else {
                    st.get_hits += 1
                }
                self.shard.touch_access(slot, now);
                let e = self.shard.get_mut(slot);
                if let Some(t) = touch {
                    e.set_exptime(exptime::absolute(t, now));
                }
                Some(f(e))
            }
            Err(gone) => {
                if touch.is_some() {
                    st.touch_misses += 1
                } else {
                    st.get_misses += 1
                }
                match gone {
                    Gone::Expired(_) => st.get_expired += 1,
                    Gone::Flushed => st.get_flushed += 1,
                    Gone::Missing | Gone::Deleted(_) => {}
                }
                None
            }
        }
    }

    /// A copy of the live item's metadata, if any.
    pub fn meta(&self) -> Option<Meta> {
        self.item().map(Meta::of)
    }

    /// Marks the live item as read (SIEVE bit, fetched, access time).
    pub fn mark_fetched(&mut self) {
        if let Ok(slot) = self.found {
            self.shard.touch_access(slot, self.now_secs);
        }
    }

    /// Sets the live item's exptime from a client exptime.
    pub fn set_exptime(&mut self, client_exptime: i64) {
        if let Ok(slot) = self.found {
            let now = self.now_secs;
            self.shard
                .get_mut(slot)
                .set_exptime(exptime::absolute(client_exptime, now));
        }
    }

    /// Sets or clears a meta bit on the live item.
    pub fn set_bit(&mut self, bit: u8, on: bool) {
        if let Ok(slot) = self.found {
            self.shard.get_mut(slot).set(bit, on);
        }
    }

    /// Gives the live item a fresh version; returns it.
    pub fn bump_cas(&mut self) -> Option<u64> {
        let slot = self.found.ok()?;
        let v = self.next_version();
        self.shard.set_version(slot, self.hash, v);
        Some(v)
    }

    /// The counters of the key's shard, for callers that count operations the
    /// store does not see whole (meta commands).
    pub fn stats(&mut self) -> &mut ShardStats {
        &mut self.shard.stats
    }

    /// Removes the key's entry, live item or tombstone, if any.
    pub fn remove_entry(&mut self) {
        if let Ok(slot) | Err(Gone::Deleted(slot) | Gone::Expired(Some(slot))) = self.found {
            self.shard.remove(slot);
            self.found = Err(Gone::Missing);
        }
    }

    /// A client's delete of the live item: in a cluster
    /// ([`StoreConfig::keep_versions`]) or with a pending request id, a
    /// tombstone at a fresh version replaces it ([`Ctx::delete_recorded`]);
    /// otherwise it just goes. Returns `false` if there was no memory for
    /// the tombstone (the item is gone all the same).
    pub fn delete(&mut self) -> bool {
        if self.store.keep_versions || self.record_as.is_some() {
            self.delete_recorded()
        } else {
            self.remove();
            true
        }
    }

    /// Removes the live item, if any (a tombstone stays).
    pub fn remove(&mut self) {
        if let Ok(slot) = self.found {
            self.shard.remove(slot);
            self.found = Err(Gone::Missing);
        }
    }

    /// Inserts a new item for this key (replacing any) and makes it the live one.
    pub fn insert(
        &mut self,
        value_parts: &[&[u8]],
        flags: u32,
        exptime_abs: u32,
    ) -> Result<u64, Stored> {
        let cas = self.next_version();
        let area = self.next_dedup(cas, false);
        let item = NewItem::with_dedup(self.key, value_parts, &area, flags, exptime_abs, cas);
        self.insert_item(item, cas)
    }

    /// The outcome recorded for request `id` on this key (live item or
    /// tombstone), if any within the dedup window: the mutation already
    /// ran, and a retry answers with this instead of running it again.
    pub fn recorded(&mut self, id: &[u8]) -> Option<dedup::Outcome> {
        let (Ok(slot) | Err(Gone::Deleted(slot) | Gone::Expired(Some(slot)))) = self.found else {
            return None;
        };
        let outcome = dedup::find(
            self.shard.get(slot).dedup(),
            id,
            self.now_ms,
            self.store.dedup,
        );
        if outcome.is_some() {
            self.shard.stats.request_id_replays += 1;
        }
        outcome
    }

    /// Records request `id` on the write this operation makes, if it makes
    /// one: a store records [`dedup::Outcome::Stored`], an incr/decr the
    /// number it produced; `number` is the value an `ma` creates.
    pub fn record_as(&mut self, id: &[u8], number: Option<u64>) {
        self.record_as = Some((RequestId::new(id), number));
    }

    /// The request-id area of the key's next version: the current entry's
    /// live records plus the pending one, if any (taken).
    fn next_dedup(&mut self, cas: u64, deleted: bool) -> Vec<u8> {
        let old: &[u8] = match self.found {
            Ok(slot) | Err(Gone::Deleted(slot) | Gone::Expired(Some(slot))) => {
                self.shard.get(slot).dedup()
            }
            Err(_) => &[],
        };
        let pending = self.record_as.take();
        if old.is_empty() && pending.is_none() {
            return Vec::new();
        }
        let new = pending.as_ref().map(|(id, number)| dedup::Record {
            id: id.get(),
            at_ms: self.now_ms,
            outcome: match (deleted, number) {
                (true, _) => dedup::Outcome::Deleted,
                (false, Some(number)) => dedup::Outcome::Value {
                    number: *number,
                    cas,
                },
                (false, None) => dedup::Outcome::Stored { cas },
            },
        });
        let (area, dropped) = dedup::carry(old, new, self.now_ms, self.store.dedup);
        self.shard.stats.request_id_records_dropped += dropped as u64;
        area
    }

    /// Deletes the live item, leaving a tombstone that keeps its records
    /// and the pending one: a delete that carries a request id. Returns
    /// `false` if there was no memory for the tombstone (the item is gone
    /// all the same).
    pub fn delete_recorded(&mut self) -> bool {
        let version = self.next_version();
        let area = self.next_dedup(version, true);
        let until = self.store.tombstone_expiry(version);
        let mut item = NewItem::with_dedup(self.key, &[], &area, 0, until, version);
        item.entry_mut().set(bits::TOMBSTONE | bits::FETCHED, true);
        match self.insert_item(item, version) {
            Ok(_) => {
                if let Ok(slot) = self.found {
                    self.found = Err(Gone::Deleted(slot));
                }
                true
            }
            Err(_) => false,
        }
    }

    fn insert_item(&mut self, item: NewItem, cas: u64) -> Result<u64, Stored> {
        // The lookup that made this context already found the key's slot
        // (live or a tombstone), or established that it has none.
        let known = Some(match self.found {
            Ok(slot) | Err(Gone::Deleted(slot) | Gone::Expired(Some(slot))) => Some(slot),
            Err(_) => None,
        });
        match self.shard.insert(self.hash, item, known, self.now_secs) {
            Ok(slot) => {
                self.found = Ok(slot);
                Ok(cas)
            }
            Err(shard::InsertError::NoMemory) => {
                self.shard.stats.store_no_memory += 1;
                self.found = Err(Gone::Missing);
                Err(Stored::NoMemory)
            }
        }
    }

    /// A fresh version stamp from the node's clock; marked as an attempt if
    /// this thread's primary is claiming one for this key
    /// ([`Store::claim_attempt`]).
    fn next_version(&mut self) -> u64 {
        let version = self.store.hlc.next(self.now_ms);
        let hash = self.hash;
        let claimed = CLAIM.with(|c| match c.get() {
            Some((h, earlier)) if h == hash => {
                c.set(Some((h, version)));
                Some(earlier)
            }
            _ => None,
        });
        if let Some(earlier) = claimed {
            let attempts = &mut self.shard.attempts;
            attempts.retain(|a| !(a.hash == hash && a.version == earlier));
            attempts.push(shard::Claimed {
                hash,
                version,
                overrun: false,
            });
        }
        version
    }

    /// The write semantics of memcached's `do_store_item`.
    pub fn write(&mut self, w: &Write<'_>) -> Stored {
        self.shard.stats.cmd_set += 1;
        let now = self.now_secs;
        let Ok(slot) = self.found else {
            if w.compare_cas.is_some() && w.mode == Mode::Set {
                self.shard.stats.cas_misses += 1;
                return Stored::NotFound;
            }
            return match w.mode {
                Mode::Set | Mode::Add => {
                    let exp = exptime::absolute(w.exptime, now);
                    self.insert(&[w.value], w.flags, exp)
                        .map_or_else(|e| e, Stored::Stored)
                }
                Mode::Replace | Mode::Append | Mode::Prepend => Stored::NotStored,
            };
        };
        let old = self.shard.get(slot);
        let (old_cas, old_flags, old_exptime) = (old.cas(), old.flags(), old.exptime());
        let old_bits = old.bits();
        let cas_match = w.compare_cas.map(|c| c == old_cas);
        let stale_ok = w.invalidate && w.compare_cas.is_some_and(|c| c != 0 && c < old_cas);
        match w.mode {
            Mode::Add => {
                // memcached bumps the item in its LRU but does not count this
                // as a fetch.
                self.shard.get_mut(slot).set(bits::VISITED, true);
                Stored::NotStored
            }
            Mode::Set | Mode::Replace => {
                let mut mark_stale = false;
                if w.compare_cas.is_some() {
                    if cas_match == Some(true) {
                        self.shard.stats.cas_hits += 1;
                    } else if stale_ok {
                        self.shard.stats.cas_hits += 1;
                        mark_stale = true;
                    } else {
                        self.shard.stats.cas_badval += 1;
                        return Stored::Exists;
                    }
                }
                let exp = if mark_stale {
                    old_exptime
                } else {
                    exptime::absolute(w.exptime, now)
                };
                match self.insert(&[w.value], w.flags, exp) {
                    Ok(cas) => {
                        if mark_stale {
                            self.set_bit(bits::STALE, true);
                            self.set_bit(bits::WIN_SENT, old_bits & bits::WIN_SENT != 0);
                        }
                        Stored::Stored(cas)
                    }
                    Err(e) => e,
                }
            }
            Mode::Append | Mode::Prepend => {
                // A CAS of 0 means "no check" here (memcached's CAS_NONE).
                if cas_match == Some(false) && w.compare_cas != Some(0) {
                    return Stored::Exists;
                }
                let total = self.shard.get(slot).value().len() + w.value.len();
                if !item_fits(self.key.len(), old_flags, total, self.store.item_bytes_max) {
                    // memcached cannot allocate the combined item: NOT_STORED.
                    return Stored::NotStored;
                }
                let cas = self.next_version();
                let area = self.next_dedup(cas, false);
                // Build the combined value straight from the stored one: one
                // allocation, one copy of each part.
                let old_value = self.shard.get(slot).value();
                let parts: [&[u8]; 2] = if w.mode == Mode::Append {
                    [old_value, w.value]
                } else {
                    [w.value, old_value]
                };
                let item =
                    NewItem::with_dedup(self.key, &parts, &area, old_flags, old_exptime, cas);
                self.insert_item(item, cas)
                    .map_or_else(|e| e, Stored::Stored)
            }
        }
    }

    /// The arithmetic of memcached's `do_add_delta`.
    pub fn arith(&mut self, a: &Arith<'_>) -> Delta {
        let Ok(slot) = self.found else {
            if a.incr {
                self.shard.stats.incr_misses += 1
            } else {
                self.shard.stats.decr_misses += 1
            }
            return Delta::NotFound;
        };
        let e = self.shard.get(slot);
        // memcached refuses an empty value before it compares the CAS.
        if e.value().is_empty() {
            return Delta::NonNumeric;
        }
        if let Some(c) = a.compare_cas {
            if c != 0 && e.cas() != c {
                return Delta::Exists;
            }
        }
        let parsed = crate::protocol::number::parse_value_u64(e.value());
        let (old_len, flags, old_exptime) = (e.value().len(), e.flags(), e.exptime());
        let Some(current) = parsed else {
            return Delta::NonNumeric;
        };
        let new = if a.incr {
            current.wrapping_add(a.delta)
        } else {
            current.saturating_sub(a.delta)
        };
        if a.incr {
            self.shard.stats.incr_hits += 1
        } else {
            self.shard.stats.decr_hits += 1
        }
        let mut buf = Vec::with_capacity(old_len.max(20));
        crate::protocol::put_u64(&mut buf, new);
        let digits_len = buf.len();
        // memcached rewrites a value in place when the new number is not
        // longer, padding with spaces: "100" decremented by 91 reads "9  ".
        if digits_len <= old_len {
            buf.resize(old_len, b' ');
        }
        let in_place = digits_len <= old_len;
        if let Some((_, number)) = &mut self.record_as {
            *number = Some(new);
        }
        let (old_bits, old_access) = {
            let e = self.shard.get(slot);
            (e.bits(), e.last_access())
        };
        match self.insert(&[&buf], flags, old_exptime) {
            Ok(cas) => {
                if in_place {
                    // memcached rewrote the same item: it keeps its state
                    // (fetched, stale, win token, binary key) and access time.
                    let slot = self.found.expect("just inserted");
                    let e = self.shard.get_mut(slot);
                    e.set_bits(old_bits);
                    e.set_last_access(old_access);
                }
                Delta::Value(new, cas, in_place)
            }
            Err(_) => Delta::NoMemory,
        }
    }
}

#[cfg(test)]
mod tests;
