//! One lock's worth of the store: a hash index of items, a SIEVE eviction
//! list threaded through the items, and the byte budget they share.
//!
//! Invariants (checked by `check_invariants` in tests):
//! - every live item is in the index exactly once and in the SIEVE list
//!   exactly once;
//! - `used_bytes` is the sum of [`charge`] over live items and, with the
//!   index's spare buckets, never exceeds `limit_bytes` once an operation
//!   returns.
//!
//! SIEVE (Zhang et al., NSDI '24): new items enter at the head; a hit only
//! sets a `visited` bit; the eviction hand walks from the tail toward the head,
//! clearing visited bits and evicting the first unvisited entry. One-hit
//! wonders leave quickly (scan resistance) without any lock-time reordering on
//! reads.
//!
//! Items are raw allocations owned by the shard (the index and the list hold
//! their addresses): a lookup reads the index bucket and then the item, two
//! cache misses, and the list costs no memory outside the items. All unsafe
//! code of the store is in this file and `index.rs`; an item's address is
//! only dereferenced while the shard (and so the item) is borrowed.

use std::alloc::{Layout, alloc, dealloc};
use std::ptr::NonNull;
use std::sync::Arc;

use super::exptime;
use super::index::Index;
use super::key_hash;
use super::merkle::Trees;

/// Bytes the allocator hands out for a request of `n` bytes, modelled on
/// glibc malloc: an 8-byte header, 16-byte granules, 32 bytes at least.
#[inline]
pub const fn alloc_bytes(n: usize) -> usize {
    let with_header = n + 8;
    let rounded = (with_header + 15) & !15;
    if rounded < 32 { 32 } else { rounded }
}

/// Bytes of index per item: one 8-byte bucket. Spare buckets (the table is
/// at most 3/4 full) are counted as the shard's spare bytes.
const INDEX_BYTES_PER_ENTRY: usize = 8;

/// Everything one item costs: its index bucket and its allocation (header
/// with the list links, key and value). This is what the memory limit counts.
#[inline]
pub const fn charge(key_and_value_bytes: usize) -> usize {
    INDEX_BYTES_PER_ENTRY + alloc_bytes(HEADER_BYTES + key_and_value_bytes)
}

/// Flag bits kept in each item's header byte ([`Entry::bits`]).
pub mod bits {
    /// SIEVE: hit since the hand last passed.
    pub const VISITED: u8 = 1 << 0;
    /// Read at least once since it was stored (for `*_unfetched` stats and `h`).
    pub const FETCHED: u8 = 1 << 1;
    /// Invalidated by a meta `I` flag: served as stale until replaced.
    pub const STALE: u8 = 1 << 2;
    /// A meta get already handed out the recache "win" token.
    pub const WIN_SENT: u8 = 1 << 3;
    /// A cluster delete marker: no value, invisible to clients, kept until
    /// its exptime so a late copy of the deleted item cannot bring it back.
    pub const TOMBSTONE: u8 = 1 << 5;
    /// Stored by a meta command with a base64 (`b`) key: echoed in base64.
    pub const KEY_BINARY: u8 = 1 << 4;
}

/// An item's metadata lives at the front of the same allocation as its key
/// and value, so a lookup that finds the key finds the header and (for small
/// items) the value in the same cache lines. Layout, native-endian:
///
/// ```text
/// 0     8       16      24          28        32      36            40       41     42          44..48 48..
/// | cas | newer | older | value_len | exptime | flags | last_access | keylen | bits | dedup_len | pad  | key | value | dedup |
/// ```
///
/// `newer` and `older` are the SIEVE list links: item addresses, 0 for none.
/// `dedup` is the item's request-id records ([`super::dedup`]), usually
/// empty.
const CAS_AT: usize = 0;
const NEWER_AT: usize = 8;
const OLDER_AT: usize = 16;
const VALUE_LEN_AT: usize = 24;
const EXPTIME_AT: usize = 28;
const FLAGS_AT: usize = 32;
const ACCESS_AT: usize = 36;
const KEY_LEN_AT: usize = 40;
const BITS_AT: usize = 41;
const DEDUP_LEN_AT: usize = 42;
/// Bytes of the header at the front of every item allocation, before the key.
pub const HEADER_BYTES: usize = 48;
const ITEM_ALIGN: usize = 8;

/// One stored item, seen through a reference: header, key and value.
#[repr(transparent)]
pub struct Entry {
    buf: [u8],
}

/// A live item of a shard: valid until that item is removed or replaced.
/// The shard hands these out from lookups and takes them back in calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(NonNull<u8>);

/// The list end or link "none".
const NIL: Option<Slot> = None;

macro_rules! header_field {
    ($(#[doc = $doc:expr])* $vis:vis $get:ident, $set:ident, $ty:ty, $at:expr) => {
        $(#[doc = $doc])*
        #[inline]
        $vis fn $get(&self) -> $ty {
            <$ty>::from_ne_bytes(
                self.buf[$at..$at + std::mem::size_of::<$ty>()]
                    .try_into()
                    .expect("header field"),
            )
        }
        #[doc = concat!("Sets [`Self::", stringify!($get), "`].")]
        #[inline]
        $vis fn $set(&mut self, v: $ty) {
            self.buf[$at..$at + std::mem::size_of::<$ty>()].copy_from_slice(&v.to_ne_bytes());
        }
    };
}

impl Entry {
    header_field!(
        /// The item's version stamp ([`super::hlc`]), which is also its CAS.
        pub cas, set_cas, u64, CAS_AT
    );
    header_field!(
        /// When the item expires: absolute unix seconds, 0 = never
        /// ([`super::exptime`]). For a tombstone, when it may be dropped.
        pub exptime, set_exptime, u32, EXPTIME_AT
    );
    header_field!(
        /// The client's opaque 32-bit flags, returned with the value.
        pub flags, set_flags, u32, FLAGS_AT
    );
    header_field!(
        /// Unix second of the item's last store or read (for `flush_all`,
        /// the meta `l` flag and `me`'s `la`).
        pub last_access, set_last_access, u32, ACCESS_AT
    );
    header_field!(
        /// Address of the next newer item in the SIEVE list, 0 for none.
        newer_raw, set_newer_raw, u64, NEWER_AT
    );
    header_field!(
        /// Address of the next older item in the SIEVE list, 0 for none.
        older_raw, set_older_raw, u64, OLDER_AT
    );

    #[inline]
    fn key_len(&self) -> usize {
        usize::from(self.buf[KEY_LEN_AT])
    }

    /// The item's key: 1 to 250 bytes.
    #[inline]
    pub fn key(&self) -> &[u8] {
        &self.buf[HEADER_BYTES..HEADER_BYTES + self.key_len()]
    }

    #[inline]
    fn value_len(&self) -> usize {
        u32::from_ne_bytes(
            self.buf[VALUE_LEN_AT..VALUE_LEN_AT + 4]
                .try_into()
                .expect("header field"),
        ) as usize
    }

    /// The item's value (empty for a tombstone).
    #[inline]
    pub fn value(&self) -> &[u8] {
        let at = HEADER_BYTES + self.key_len();
        &self.buf[at..at + self.value_len()]
    }

    /// The item's request-id records (empty for most items).
    #[inline]
    pub fn dedup(&self) -> &[u8] {
        &self.buf[HEADER_BYTES + self.key_len() + self.value_len()..]
    }

    /// Bytes this item counts against its shard's budget (see [`charge`]).
    pub fn charge(&self) -> usize {
        charge(self.buf.len() - HEADER_BYTES)
    }

    /// The item's flag bits ([`bits`]).
    #[inline]
    pub fn bits(&self) -> u8 {
        self.buf[BITS_AT]
    }

    /// Replaces all of the item's flag bits ([`bits`]).
    #[inline]
    pub fn set_bits(&mut self, bits: u8) {
        self.buf[BITS_AT] = bits;
    }

    /// Whether `bit` (one of [`bits`]) is set.
    #[inline]
    pub fn has(&self, bit: u8) -> bool {
        self.bits() & bit != 0
    }

    /// Sets (`on`) or clears one of the [`bits`].
    #[inline]
    pub fn set(&mut self, bit: u8, on: bool) {
        let b = self.bits();
        self.set_bits(if on { b | bit } else { b & !bit });
    }

    fn newer(&self) -> Option<Slot> {
        NonNull::new(self.newer_raw() as *mut u8).map(Slot)
    }

    fn older(&self) -> Option<Slot> {
        NonNull::new(self.older_raw() as *mut u8).map(Slot)
    }

    fn set_newer(&mut self, s: Option<Slot>) {
        self.set_newer_raw(s.map_or(0, |s| s.0.as_ptr() as u64));
    }

    fn set_older(&mut self, s: Option<Slot>) {
        self.set_older_raw(s.map_or(0, |s| s.0.as_ptr() as u64));
    }
}

/// Bytes of the item at `p`, from its header.
///
/// # Safety
/// `p` is a live item allocation.
#[inline]
unsafe fn item_len(p: NonNull<u8>) -> usize {
    // SAFETY: the header is initialised at allocation; reads are unaligned-safe.
    unsafe {
        let value_len = p.as_ptr().add(VALUE_LEN_AT).cast::<u32>().read_unaligned();
        let key_len = *p.as_ptr().add(KEY_LEN_AT);
        let dedup_len = p.as_ptr().add(DEDUP_LEN_AT).cast::<u16>().read_unaligned();
        HEADER_BYTES + usize::from(key_len) + value_len as usize + usize::from(dedup_len)
    }
}

fn layout(len: usize) -> Layout {
    Layout::from_size_align(len, ITEM_ALIGN).expect("item size fits a layout")
}

/// An item allocation not (or no longer) in a shard: freed on drop.
pub struct NewItem {
    ptr: NonNull<u8>,
}

// SAFETY: a `NewItem` exclusively owns its allocation, like a `Box<[u8]>`.
unsafe impl Send for NewItem {}

impl NewItem {
    /// A new item with no request-id records. `value_parts` are concatenated
    /// into the value; `exptime` is absolute unix seconds (0 = never) and `cas`
    /// its version stamp.
    ///
    /// # Panics
    /// If the value is 4 GiB or longer.
    pub fn new(key: &[u8], value_parts: &[&[u8]], flags: u32, exptime: u32, cas: u64) -> Self {
        Self::with_dedup(key, value_parts, &[], flags, exptime, cas)
    }

    /// An item that also carries request-id records.
    pub fn with_dedup(
        key: &[u8],
        value_parts: &[&[u8]],
        dedup: &[u8],
        flags: u32,
        exptime: u32,
        cas: u64,
    ) -> Self {
        debug_assert!(key.len() <= crate::limits::KEY_BYTES_MAX);
        assert!(
            dedup.len() <= super::dedup::AREA_BYTES_MAX,
            "dedup area bound"
        );
        let value_len: usize = value_parts.iter().map(|p| p.len()).sum();
        let value_len32 = u32::try_from(value_len).expect("value under 4 GiB");
        let len = HEADER_BYTES + key.len() + value_len + dedup.len();
        // SAFETY: `len` is at least HEADER_BYTES, so the layout is non-zero.
        let raw = unsafe { alloc(layout(len)) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout(len));
        };
        // SAFETY: `ptr` is a fresh allocation of `len` bytes; we initialise
        // every byte before any slice is formed over it.
        unsafe {
            let p = ptr.as_ptr();
            p.write_bytes(0, HEADER_BYTES);
            p.add(VALUE_LEN_AT)
                .cast::<u32>()
                .write_unaligned(value_len32);
            *p.add(KEY_LEN_AT) = key.len() as u8;
            p.add(DEDUP_LEN_AT)
                .cast::<u16>()
                .write_unaligned(dedup.len() as u16);
            let mut at = HEADER_BYTES;
            for part in std::iter::once(&key).chain(value_parts).chain([&dedup]) {
                std::ptr::copy_nonoverlapping(part.as_ptr(), p.add(at), part.len());
                at += part.len();
            }
        }
        let mut item = Self { ptr };
        let e = item.entry_mut();
        e.set_cas(cas);
        e.set_flags(flags);
        e.set_exptime(exptime);
        item
    }

    /// The item, read-only.
    pub fn entry(&self) -> &Entry {
        // SAFETY: we own the allocation; it is initialised.
        unsafe { entry_at(self.ptr) }
    }

    /// The item, for setting header fields before it is inserted.
    pub fn entry_mut(&mut self) -> &mut Entry {
        // SAFETY: we own the allocation exclusively; it is initialised.
        unsafe { entry_at_mut(self.ptr) }
    }

    fn key(&self) -> &[u8] {
        self.entry().key()
    }

    /// Hands the allocation to a shard.
    fn into_raw(self) -> NonNull<u8> {
        let p = self.ptr;
        std::mem::forget(self);
        p
    }

    /// Takes an allocation back from a shard.
    ///
    /// # Safety
    /// `p` is an item allocation that nothing else refers to any more.
    unsafe fn from_raw(p: NonNull<u8>) -> Self {
        Self { ptr: p }
    }
}

impl Drop for NewItem {
    fn drop(&mut self) {
        // SAFETY: we own the allocation; its header gives its layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout(item_len(self.ptr))) }
    }
}

/// # Safety
/// `p` is a live, initialised item allocation, not mutably borrowed
/// elsewhere for the returned lifetime.
#[inline]
unsafe fn entry_at<'a>(p: NonNull<u8>) -> &'a Entry {
    // SAFETY: per the contract; `Entry` is a transparent `[u8]`.
    unsafe {
        let len = item_len(p);
        &*(std::ptr::slice_from_raw_parts(p.as_ptr(), len) as *const Entry)
    }
}

/// # Safety
/// As [`entry_at`], and not borrowed at all elsewhere.
#[inline]
unsafe fn entry_at_mut<'a>(p: NonNull<u8>) -> &'a mut Entry {
    // SAFETY: per the contract; `Entry` is a transparent `[u8]`.
    unsafe {
        let len = item_len(p);
        &mut *(std::ptr::slice_from_raw_parts_mut(p.as_ptr(), len) as *mut Entry)
    }
}

/// Counters kept under the shard lock, so the hot path pays no atomics.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShardStats {
    /// Reads (`get`, `gets`, `mg`) that found the key.
    pub get_hits: u64,
    /// Reads that did not find a live item.
    pub get_misses: u64,
    /// Read misses because the item had expired (also counted in `get_misses`).
    pub get_expired: u64,
    /// Read misses because a `flush_all` had removed the item (also counted in
    /// `get_misses`).
    pub get_flushed: u64,
    /// `touch`/`gat` requests that found the key.
    pub touch_hits: u64,
    /// `touch`/`gat` requests that did not find a live item.
    pub touch_misses: u64,
    /// Deletes that removed a live item.
    pub delete_hits: u64,
    /// Deletes that found no live item.
    pub delete_misses: u64,
    /// `incr` requests that found a number and applied the delta.
    pub incr_hits: u64,
    /// `incr` requests that found no live item.
    pub incr_misses: u64,
    /// `decr` requests that found a number and applied the delta.
    pub decr_hits: u64,
    /// `decr` requests that found no live item.
    pub decr_misses: u64,
    /// Compare-and-swap writes whose CAS matched (or that a meta `I` let store
    /// as stale).
    pub cas_hits: u64,
    /// Compare-and-swap writes that found no item.
    pub cas_misses: u64,
    /// Compare-and-swap writes refused because the CAS did not match.
    pub cas_badval: u64,
    /// Keys looked up by reads, hit or miss (memcached counts per key).
    pub cmd_get: u64,
    /// Writes that reached the store, stored or not.
    pub cmd_set: u64,
    /// `touch`/`gat` requests, hit or miss.
    pub cmd_touch: u64,
    /// Items stored since start or the last `stats reset` (tombstones excluded).
    pub total_items: u64,
    /// Live items removed to make room for a write.
    pub evictions: u64,
    /// Evicted items that were never read after being stored.
    pub evicted_unfetched: u64,
    /// Expired items removed (lazily, by the sweep or by eviction) that were
    /// never read after being stored.
    pub expired_unfetched: u64,
    /// Expired items removed by the background sweep or by the eviction hand.
    pub reclaimed: u64,
    /// Writes refused because the item exceeded the item size limit.
    pub store_too_large: u64,
    /// Writes refused because no room could be made within the memory limit.
    pub store_no_memory: u64,
    /// Mutations answered from a request-id record instead of applied.
    pub request_id_replays: u64,
    /// Live request-id records dropped for the per-key bound.
    pub request_id_records_dropped: u64,
}

impl ShardStats {
    /// Adds every counter of `o` to this one (to sum shards).
    pub fn add(&mut self, o: &ShardStats) {
        macro_rules! sum { ($($f:ident),*) => { $( self.$f += o.$f; )* } }
        sum!(
            get_hits,
            get_misses,
            get_expired,
            get_flushed,
            touch_hits,
            touch_misses,
            delete_hits,
            delete_misses,
            incr_hits,
            incr_misses,
            decr_hits,
            decr_misses,
            cas_hits,
            cas_misses,
            cas_badval,
            cmd_get,
            cmd_set,
            cmd_touch,
            total_items,
            evictions,
            evicted_unfetched,
            expired_unfetched,
            reclaimed,
            store_too_large,
            store_no_memory,
            request_id_replays,
            request_id_records_dropped
        );
    }
}

/// Why an item could not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertError {
    /// The item alone is larger than the shard's whole budget.
    NoMemory,
}

/// Why a lookup found nothing usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// No entry for the key, or a tombstone past its grace.
    Missing,
    /// The item had expired. The lookup removed it, or (in a cluster, see
    /// [`Shard::new`]) left a tombstone at its version in this slot.
    Expired(Option<Slot>),
    /// The item was last accessed before a `flush_all` took effect; the lookup
    /// removed it.
    Flushed,
    /// A tombstone: absent for clients, but its version still outranks
    /// older copies (and an insert must replace this slot).
    Deleted(Slot),
}

impl Gone {
    /// The entry that still holds the key's version: a tombstone, left by a
    /// delete or by an expiry. An insert must replace it.
    pub fn entry(self) -> Option<Slot> {
        match self {
            Gone::Deleted(slot) | Gone::Expired(Some(slot)) => Some(slot),
            Gone::Missing | Gone::Expired(None) | Gone::Flushed => None,
        }
    }
}

/// The unix second at which a tombstone for `version` goes, `grace_secs`
/// after the version was stamped: fixed by the version alone, so every
/// replica drops it at the same time however late its copy arrived.
pub fn tombstone_until(version: u64, grace_secs: u32) -> u32 {
    super::version_unix_secs(version)
        .saturating_add(grace_secs)
        .max(1)
}

/// Entries looked at from the oldest for an expired one before a write is
/// refused under `-M`.
const RECLAIM_SCAN_MAX: usize = 64;

/// One lock's worth of the store: items, their index and SIEVE list, and a
/// byte budget (see the module header).
pub struct Shard {
    /// key hash → item. Owns nothing; the shard owns the items.
    index: Index,
    /// SIEVE list ends and hand.
    head: Option<Slot>,
    tail: Option<Slot>,
    hand: Option<Slot>,
    used_bytes: usize,
    limit_bytes: usize,
    /// Entries that are tombstones (counted in the index, not in `curr_items`).
    tombstones: usize,
    /// Cursor of the background expiry sweep, by index bucket.
    sweep_cursor: usize,
    /// The node's anti-entropy trees, told of every entry that comes or
    /// goes (`None`: a single node, or anti-entropy off).
    trees: Option<Arc<Trees>>,
    /// In a cluster: an expired item leaves a tombstone at its version for
    /// this long after the version (see [`tombstone_until`]), so a stale
    /// copy of the value it replaced cannot come back from a replica that
    /// missed it. `None` (a single node): expired items just go, as in
    /// memcached.
    expiry_grace_secs: Option<u32>,
    /// This shard's counters, summed across shards by [`super::Store::stats`].
    pub stats: ShardStats,
    /// Evict live items to make room; `false` (memcached's `-M`): only
    /// expired items and tombstones go, and a write that does not fit is
    /// refused.
    pub evict_live: bool,
    /// Read-modify-write attempts this node is replicating as a primary:
    /// key hash, version, and whether a state not computed on it has
    /// replaced it here since ([`super::Attempt`]).
    pub(super) attempts: Vec<Claimed>,
}

/// One entry of [`Shard::attempts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Claimed {
    pub hash: u64,
    pub version: u64,
    pub overrun: bool,
}

// SAFETY: the shard exclusively owns its items (raw allocations reached only
// through it), so moving it or sharing `&Shard` across threads is as safe as
// for a `Vec<Box<[u8]>>`.
unsafe impl Send for Shard {}
unsafe impl Sync for Shard {}

#[inline]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch has no architectural effect and never faults, even
    // for an address that is not mapped.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p.cast::<i8>(), std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The hash an item is indexed under.
fn rehash(p: NonNull<u8>) -> u64 {
    // SAFETY: the index holds only live items of the shard being rebuilt.
    key_hash(unsafe { entry_at(p) }.key())
}

impl Shard {
    /// An empty shard that may hold `limit_bytes` (see [`charge`]), telling
    /// `trees` of every entry that comes or goes (`None`: keep no trees).
    /// `expiry_grace_secs`: keep an expired item's version as a tombstone
    /// this long after the version (a cluster); `None`: don't. The store
    /// picks the shard by the top `shard_bits` bits of a key's hash.
    pub fn new(
        limit_bytes: usize,
        trees: Option<Arc<Trees>>,
        expiry_grace_secs: Option<u32>,
        shard_bits: u32,
    ) -> Self {
        Self {
            index: Index::new(shard_bits),
            head: NIL,
            tail: NIL,
            hand: NIL,
            used_bytes: 0,
            tombstones: 0,
            limit_bytes,
            sweep_cursor: 0,
            attempts: Vec::new(),
            trees,
            expiry_grace_secs,
            stats: ShardStats::default(),
            evict_live: true,
        }
    }

    /// Tells the trees that the entry in `slot` (key hash `hash`) came or
    /// went. Reads nothing when the shard keeps no trees.
    #[inline]
    fn toggle_tree(&self, hash: u64, slot: Slot) {
        if let Some(t) = &self.trees {
            t.toggle(hash, self.get(slot).cas());
        }
    }

    /// Gives the entry `slot` (key hash `hash`) a new version.
    pub fn set_version(&mut self, slot: Slot, hash: u64, version: u64) {
        self.toggle_tree(hash, slot);
        self.get_mut(slot).set_cas(version);
        self.toggle_tree(hash, slot);
    }

    /// Whether an entry costing `cost` bytes fits without evicting anything.
    pub fn has_room_for(&self, cost: usize) -> bool {
        self.footprint_bytes() + cost <= self.limit_bytes
    }

    /// Bytes charged for the entries held, their index buckets included
    /// (spare buckets excluded; see [`Shard::footprint_bytes`]).
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// Bytes of index buckets beyond one per live item. The table keeps a
    /// quarter or more of its buckets free, and the capacity of the most
    /// items it held until a sweep shrinks it, so this counts against the
    /// budget too.
    fn spare_bytes(&self) -> usize {
        (self.index.capacity() - self.index.len()) * INDEX_BYTES_PER_ENTRY
    }

    /// Everything this shard holds: live items (with their index buckets)
    /// plus spare buckets. Never above the budget.
    pub fn footprint_bytes(&self) -> usize {
        self.used_bytes + self.spare_bytes()
    }

    /// This shard's byte budget.
    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    /// Entries held, tombstones and not-yet-reaped expired items included.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Index buckets: the positions a scan walks.
    pub fn buckets(&self) -> usize {
        self.index.capacity()
    }

    /// The shard's index: where a key's home bucket is (for listings).
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The entry in bucket `i`, if any (live, expired or tombstone).
    pub fn entry_at(&self, i: usize) -> Option<&Entry> {
        self.index.at(i).map(|p| self.get(Slot(p)))
    }

    /// Removes the entry in bucket `i` (live item or tombstone) if `drop`
    /// holds for its key: a copy this node no longer replicates, removed
    /// without a tombstone and not counted as an eviction. Other entries
    /// keep their buckets. Returns whether it did.
    pub fn drop_at(&mut self, i: usize, drop: impl Fn(&[u8]) -> bool) -> bool {
        let Some(p) = self.index.at(i) else {
            return false;
        };
        let slot = Slot(p);
        if !drop(self.get(slot).key()) {
            return false;
        }
        self.remove(slot);
        true
    }

    /// Removes the entry in bucket `i` if it is expired (an item past its
    /// expiry, a tombstone past its grace) or flushed, counting it as the
    /// sweep does. Other entries keep their buckets. Returns whether it did.
    pub fn reap_at(&mut self, i: usize, now_secs: u32, flushed_before: u32) -> bool {
        let Some(p) = self.index.at(i) else {
            return false;
        };
        let slot = Slot(p);
        let e = self.get(slot);
        let expired = exptime::is_expired(e.exptime(), now_secs);
        let (tombstone, fetched) = (e.has(bits::TOMBSTONE), e.has(bits::FETCHED));
        let flushed = e.last_access() < flushed_before;
        if !expired && !flushed {
            return false;
        }
        if expired && !tombstone {
            self.stats.reclaimed += 1;
            if !fetched {
                self.stats.expired_unfetched += 1;
            }
            if !flushed && self.expire_to_tombstone(slot, now_secs).is_some() {
                return false;
            }
        }
        self.remove(slot);
        true
    }

    /// In a cluster, replaces the expired item in `slot` with a tombstone at
    /// its version (keeping its request-id records) until
    /// [`tombstone_until`], in place; returns the tombstone's slot. `None`:
    /// not kept (a single node, or its grace is over too); the caller
    /// removes the item.
    fn expire_to_tombstone(&mut self, slot: Slot, now_secs: u32) -> Option<Slot> {
        let grace = self.expiry_grace_secs?;
        let e = self.get(slot);
        debug_assert!(!e.has(bits::TOMBSTONE));
        let until = tombstone_until(e.cas(), grace);
        if exptime::is_expired(until, now_secs) {
            return None;
        }
        let hash = key_hash(e.key());
        let mut item = NewItem::with_dedup(e.key(), &[], e.dedup(), 0, until, e.cas());
        item.entry_mut().set(bits::TOMBSTONE | bits::FETCHED, true);
        // Smaller than the item it replaces: it cannot need an eviction.
        self.insert(hash, item, Some(Some(slot)), now_secs).ok()
    }

    /// Entries clients can see: every entry but tombstones.
    pub fn live_len(&self) -> usize {
        self.index.len() - self.tombstones
    }

    /// Whether the shard holds no entry at all (tombstones included).
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The item `slot` names.
    pub fn get(&self, slot: Slot) -> &Entry {
        // SAFETY: a `Slot` from this shard names a live item until it is
        // removed or replaced, which takes `&mut self`.
        unsafe { entry_at(slot.0) }
    }

    /// The item `slot` names, for changing its header.
    pub fn get_mut(&mut self, slot: Slot) -> &mut Entry {
        // SAFETY: as `get`; `&mut self` makes the borrow exclusive.
        unsafe { entry_at_mut(slot.0) }
    }

    /// Asks the CPU to start loading `hash`'s index bucket, for a lookup
    /// soon after (multi-get keys are prefetched before they are looked up).
    #[inline]
    pub fn prefetch_bucket(&self, hash: u64) {
        if let Some(p) = self.index.home_address(hash) {
            prefetch(p.cast());
        }
    }

    /// Asks the CPU to start loading the first lines of the item `hash`
    /// probably names. Reads the bucket: prefetch it first.
    #[inline]
    pub fn prefetch_item(&self, hash: u64) {
        if let Some(p) = self.index.candidate(hash) {
            prefetch(p.as_ptr());
            prefetch(p.as_ptr().wrapping_add(64));
        }
    }

    /// The item holding `key`, dead or alive.
    #[inline]
    pub fn find(&self, hash: u64, key: &[u8]) -> Option<Slot> {
        self.index
            // SAFETY: the index holds only live items of this shard.
            .find(hash, |p| unsafe { entry_at(p) }.key() == key)
            .map(Slot)
    }

    /// The live item holding `key`. An expired or flushed entry found on the
    /// way is removed and reported, as memcached's lazy expiry does.
    pub fn find_live(
        &mut self,
        hash: u64,
        key: &[u8],
        now_secs: u32,
        flushed_before: u32,
    ) -> Result<Slot, Gone> {
        let slot = self.find(hash, key).ok_or(Gone::Missing)?;
        let e = self.get(slot);
        let why = if e.has(bits::TOMBSTONE) && exptime::is_expired(e.exptime(), now_secs) {
            // A tombstone past its grace: the key was deleted, not expired.
            Gone::Missing
        } else if exptime::is_expired(e.exptime(), now_secs) {
            Gone::Expired(None)
        } else if e.last_access() < flushed_before {
            Gone::Flushed
        } else if e.has(bits::TOMBSTONE) {
            return Err(Gone::Deleted(slot));
        } else {
            return Ok(slot);
        };
        if why == Gone::Expired(None) {
            let flushed = e.last_access() < flushed_before;
            if !e.has(bits::FETCHED) {
                self.stats.expired_unfetched += 1;
            }
            if let Some(tombstone) = (!flushed)
                .then(|| self.expire_to_tombstone(slot, now_secs))
                .flatten()
            {
                return Err(Gone::Expired(Some(tombstone)));
            }
        }
        self.remove(slot);
        Err(why)
    }

    /// Stores `item` under its key, replacing any entry with that key, and
    /// evicts until the shard is within budget. `known` is the key's item if
    /// the caller already looked it up (`None`: look it up here). Returns the
    /// new item.
    pub fn insert(
        &mut self,
        hash: u64,
        mut item: NewItem,
        known: Option<Option<Slot>>,
        now_secs: u32,
    ) -> Result<Slot, InsertError> {
        let existing = match known {
            Some(k) => k,
            None => self.find(hash, item.key()),
        };
        debug_assert_eq!(existing, self.find(hash, item.key()));
        item.entry_mut().set_last_access(now_secs);
        let cost = item.entry().charge();
        if cost > self.limit_bytes {
            if let Some(old) = existing {
                self.remove(old);
            }
            return Err(InsertError::NoMemory);
        }
        let tombstone = item.entry().has(bits::TOMBSTONE);
        let slot = Slot(item.into_raw());
        match existing {
            Some(old) => {
                if self.get(old).has(bits::TOMBSTONE) {
                    self.tombstones -= 1;
                }
                // Replace in place: same index bucket, same place in the
                // SIEVE list.
                self.index.replace(hash, old.0, slot.0);
                self.toggle_tree(hash, old);
                self.toggle_tree(hash, slot);
                let (newer, older) = {
                    let o = self.get(old);
                    (o.newer(), o.older())
                };
                self.get_mut(slot).set_newer(newer);
                self.get_mut(slot).set_older(older);
                match newer {
                    Some(n) => self.get_mut(n).set_older(Some(slot)),
                    None => self.head = Some(slot),
                }
                match older {
                    Some(o) => self.get_mut(o).set_newer(Some(slot)),
                    None => self.tail = Some(slot),
                }
                if self.hand == Some(old) {
                    self.hand = Some(slot);
                }
                let old_cost = self.get(old).charge();
                self.used_bytes = self.used_bytes - old_cost + cost;
                // SAFETY: `old` is unlinked from the index and the list.
                drop(unsafe { NewItem::from_raw(old.0) });
            }
            None => {
                self.index.insert(hash, slot.0, rehash);
                self.toggle_tree(hash, slot);
                self.link_head(slot);
                self.used_bytes += cost;
            }
        }
        if tombstone {
            self.tombstones += 1;
        }
        while self.footprint_bytes() > self.limit_bytes && self.index.len() > 1 {
            if self.evict_live {
                self.evict_one(now_secs, slot);
            } else if !self.reclaim_one(now_secs, slot) {
                break;
            }
        }
        if self.footprint_bytes() > self.limit_bytes {
            // Only the new item is left and the index's capacity still
            // crowds it out, or live items may not be evicted (`-M`):
            // refuse it rather than exceed the budget. (A refused `set`
            // has replaced the old value, which goes too, as in memcached.)
            self.remove(slot);
            return Err(InsertError::NoMemory);
        }
        if !tombstone {
            self.stats.total_items += 1;
        }
        Ok(slot)
    }

    /// Removes the item `slot` from the index, the list and the budget, and
    /// frees it.
    pub fn remove(&mut self, slot: Slot) {
        if self.get(slot).has(bits::TOMBSTONE) {
            self.tombstones -= 1;
        }
        let hash = key_hash(self.get(slot).key());
        self.index.remove(hash, slot.0);
        self.toggle_tree(hash, slot);
        self.unlink(slot);
        self.used_bytes -= self.get(slot).charge();
        // SAFETY: `slot` is now in neither the index nor the list.
        drop(unsafe { NewItem::from_raw(slot.0) });
    }

    /// Drops every entry. Keeps the counters.
    pub fn clear(&mut self) {
        let items: Vec<NonNull<u8>> = self.index.items().collect();
        self.index = self.index.emptied();
        for p in items {
            if let Some(t) = &self.trees {
                // SAFETY: the index held each live item exactly once.
                let e = unsafe { entry_at(p) };
                t.toggle(key_hash(e.key()), e.cas());
            }
            // SAFETY: the index held each live item exactly once; it is gone.
            drop(unsafe { NewItem::from_raw(p) });
        }
        self.head = NIL;
        self.tail = NIL;
        self.hand = NIL;
        self.used_bytes = 0;
        self.tombstones = 0;
        self.sweep_cursor = 0;
    }

    /// SIEVE eviction of one entry other than `keep` (the entry being
    /// written). Expired entries met by the hand count as reclaimed, live
    /// ones as evictions.
    ///
    /// # Panics
    /// If nothing but `keep` is left while over budget (an accounting bug:
    /// an item alone never exceeds the budget).
    fn evict_one(&mut self, now_secs: u32, keep: Slot) {
        assert!(self.index.len() > 1, "over budget with nothing to evict");
        let mut slot = self.hand.or(self.tail).expect("non-empty list");
        loop {
            let e = self.get_mut(slot);
            let expired = exptime::is_expired(e.exptime(), now_secs);
            if slot != keep && (!e.has(bits::VISITED) || expired) {
                break;
            }
            e.set(bits::VISITED, false);
            slot = e.newer().or(self.tail).expect("non-empty list");
        }
        let e = self.get(slot);
        let unfetched = !e.has(bits::FETCHED);
        if e.has(bits::TOMBSTONE) {
            // Not an item: its removal is no eviction or reclaim.
        } else if exptime::is_expired(e.exptime(), now_secs) {
            self.stats.reclaimed += 1;
            if unfetched {
                self.stats.expired_unfetched += 1;
            }
        } else {
            self.stats.evictions += 1;
            if unfetched {
                self.stats.evicted_unfetched += 1;
            }
        }
        // The hand rests on the victim; removing it moves the hand one step
        // toward the head, where the next eviction resumes.
        self.hand = Some(slot);
        self.remove(slot);
    }

    /// Without evicting live items (memcached's `-M` at the limit): frees
    /// one expired item other than `keep` (in a cluster it leaves its
    /// tombstone, as the sweep does) or a tombstone, looking at most
    /// [`RECLAIM_SCAN_MAX`] entries from the oldest; false if there is none
    /// among them (the expiry sweep finds the rest).
    fn reclaim_one(&mut self, now_secs: u32, keep: Slot) -> bool {
        let mut at = self.tail;
        for _ in 0..RECLAIM_SCAN_MAX {
            let Some(slot) = at else { return false };
            let e = self.get(slot);
            at = e.newer();
            let (tombstone, unfetched) = (e.has(bits::TOMBSTONE), !e.has(bits::FETCHED));
            let expired = exptime::is_expired(e.exptime(), now_secs);
            if slot == keep || !(expired || tombstone) {
                continue;
            }
            if tombstone {
                self.remove(slot);
                return true;
            }
            self.stats.reclaimed += 1;
            if unfetched {
                self.stats.expired_unfetched += 1;
            }
            if self.expire_to_tombstone(slot, now_secs).is_none() {
                self.remove(slot);
            }
            return true;
        }
        false
    }

    /// Marks an entry as used: SIEVE visited bit and access time.
    #[inline]
    pub fn touch_access(&mut self, slot: Slot, now_secs: u32) {
        let e = self.get_mut(slot);
        // Hot keys are read far more often than their state changes: skip
        // the stores (and the dirtied cache line) when nothing would change.
        let want = bits::VISITED | bits::FETCHED;
        if e.bits() & want != want {
            e.set_bits(e.bits() | want);
        }
        if e.last_access() != now_secs {
            e.set_last_access(now_secs);
        }
    }

    fn link_head(&mut self, slot: Slot) {
        let old_head = self.head;
        let e = self.get_mut(slot);
        e.set_newer(NIL);
        e.set_older(old_head);
        match old_head {
            Some(h) => self.get_mut(h).set_newer(Some(slot)),
            None => self.tail = Some(slot),
        }
        self.head = Some(slot);
    }

    fn unlink(&mut self, slot: Slot) {
        let (newer, older) = {
            let e = self.get(slot);
            (e.newer(), e.older())
        };
        if self.hand == Some(slot) {
            self.hand = newer;
        }
        match newer {
            Some(n) => self.get_mut(n).set_older(older),
            None => self.head = older,
        }
        match older {
            Some(o) => self.get_mut(o).set_newer(newer),
            None => self.tail = newer,
        }
    }

    /// Removes expired and flushed entries among the next `budget` index
    /// buckets. Returns how many were removed.
    pub fn sweep(&mut self, budget: usize, now_secs: u32, flushed_before: u32) -> usize {
        let mut removed = 0;
        for _ in 0..budget.min(self.index.capacity()) {
            if self.sweep_cursor >= self.index.capacity() {
                self.sweep_cursor = 0;
            }
            let at = self.sweep_cursor;
            self.sweep_cursor += 1;
            // A removal leaves the other entries where they are (the index
            // marks the bucket), so the walk goes on undisturbed.
            if self.reap_at(at, now_secs, flushed_before) {
                removed += 1;
            }
        }
        // Give back index memory the shard no longer needs.
        if self.index.capacity() > 64 && self.index.len() * 8 < self.index.capacity() {
            self.index.shrink(&rehash);
            self.sweep_cursor = 0;
        }
        removed
    }

    /// Checks the invariants in the module header.
    ///
    /// # Panics
    /// On the first broken invariant.
    pub fn check_invariants(&self) {
        let live = self.index.len();
        assert_eq!(self.index.items().count(), live, "index count drifted");
        let mut walked = 0;
        let mut used = 0;
        let mut slot = self.head;
        let mut prev = NIL;
        while let Some(s) = slot {
            let e = self.get(s);
            assert_eq!(e.newer(), prev, "broken back link");
            assert_eq!(
                self.find(key_hash(e.key()), e.key()),
                Some(s),
                "item not indexed"
            );
            used += e.charge();
            prev = slot;
            slot = e.older();
            walked += 1;
            assert!(walked <= live, "cycle in the SIEVE list");
        }
        assert_eq!(prev, self.tail);
        assert_eq!(walked, live, "list and index disagree");
        assert_eq!(used, self.used_bytes, "byte accounting drifted");
        assert!(
            self.footprint_bytes() <= self.limit_bytes,
            "over the memory limit"
        );
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.clear();
    }
}
