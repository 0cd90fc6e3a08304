//! One lock's worth of the store: a hash index, a slab of entries, a SIEVE
//! eviction list and the byte budget they share.
//!
//! Invariants (checked by `check_invariants` in tests):
//! - every live slab slot is in the index exactly once and in the SIEVE list
//!   exactly once; free slots are in neither;
//! - `used_bytes` is the sum of [`charge`] over live entries and never exceeds
//!   `limit_bytes` once an operation returns.
//!
//! SIEVE (Zhang et al., NSDI '24): new items enter at the head; a hit only
//! sets a `visited` bit; the eviction hand walks from the tail toward the head,
//! clearing visited bits and evicting the first unvisited entry. One-hit
//! wonders leave quickly (scan resistance) without any lock-time reordering on
//! reads.

use hashbrown::HashTable;

use super::exptime;

/// Marks "no slot" in links and the hand.
const NIL: u32 = u32::MAX;

/// Slabs smaller than this are never compacted (not worth the pass).
const COMPACT_SLOTS_MIN: usize = 1024;

/// Bytes the allocator hands out for a request of `n` bytes, modelled on
/// glibc malloc: an 8-byte header, 16-byte granules, 32 bytes at least.
#[inline]
pub const fn alloc_bytes(n: usize) -> usize {
    let with_header = n + 8;
    let rounded = (with_header + 15) & !15;
    if rounded < 32 { 32 } else { rounded }
}

/// Bytes the index spends per entry: a `u32` slot number and a control byte,
/// divided by hashbrown's 7/8 maximum load factor, rounded up.
const INDEX_BYTES_PER_ENTRY: usize = 6;

/// Per-slot bytes outside the item allocation: the slab's pointer and the
/// SIEVE links.
const SLOT_BYTES: usize = std::mem::size_of::<Option<Entry>>() + std::mem::size_of::<Link>();

/// Everything one item costs: its slot, its index entry and its allocation
/// (header, key and value). This is what the memory limit counts.
#[inline]
pub const fn charge(key_and_value_bytes: usize) -> usize {
    SLOT_BYTES + INDEX_BYTES_PER_ENTRY + alloc_bytes(HEADER_BYTES + key_and_value_bytes)
}

pub mod bits {
    /// SIEVE: hit since the hand last passed.
    pub const VISITED: u8 = 1 << 0;
    /// Read at least once since it was stored (for `*_unfetched` stats and `h`).
    pub const FETCHED: u8 = 1 << 1;
    /// Invalidated by a meta `I` flag: served as stale until replaced.
    pub const STALE: u8 = 1 << 2;
    /// A meta get already handed out the recache "win" token.
    pub const WIN_SENT: u8 = 1 << 3;
    /// Stored by a meta command with a base64 (`b`) key: echoed in base64.
    pub const KEY_BINARY: u8 = 1 << 4;
}

/// An item's metadata lives at the front of the same allocation as its key
/// and value, so a lookup that finds the key finds the header and (for small
/// items) the value in the same cache lines. Layout, native-endian:
///
/// ```text
/// 0       8       16        20      24            28       29     30..32  32..
/// | cas   | hash  | exptime | flags | last_access | keylen | bits | pad  | key | value |
/// ```
const CAS_AT: usize = 0;
const HASH_AT: usize = 8;
const EXPTIME_AT: usize = 16;
const FLAGS_AT: usize = 20;
const ACCESS_AT: usize = 24;
const KEY_LEN_AT: usize = 28;
const BITS_AT: usize = 29;
pub const HEADER_BYTES: usize = 32;

/// One stored item: header, key and value in one allocation.
pub struct Entry {
    buf: Box<[u8]>,
}

/// SIEVE list links of a slot: toward the head (newer) and the tail (older).
#[derive(Debug, Clone, Copy)]
struct Link {
    newer: u32,
    older: u32,
}

macro_rules! header_field {
    ($get:ident, $set:ident, $ty:ty, $at:expr) => {
        #[inline]
        pub fn $get(&self) -> $ty {
            <$ty>::from_ne_bytes(
                self.buf[$at..$at + std::mem::size_of::<$ty>()]
                    .try_into()
                    .expect("header field"),
            )
        }
        #[inline]
        pub fn $set(&mut self, v: $ty) {
            self.buf[$at..$at + std::mem::size_of::<$ty>()].copy_from_slice(&v.to_ne_bytes());
        }
    };
}

impl Entry {
    header_field!(cas, set_cas, u64, CAS_AT);
    header_field!(hash, set_hash, u64, HASH_AT);
    header_field!(exptime, set_exptime, u32, EXPTIME_AT);
    header_field!(flags, set_flags, u32, FLAGS_AT);
    header_field!(last_access, set_last_access, u32, ACCESS_AT);

    #[inline]
    fn key_len(&self) -> usize {
        usize::from(self.buf[KEY_LEN_AT])
    }

    #[inline]
    pub fn key(&self) -> &[u8] {
        &self.buf[HEADER_BYTES..HEADER_BYTES + self.key_len()]
    }

    #[inline]
    pub fn value(&self) -> &[u8] {
        &self.buf[HEADER_BYTES + self.key_len()..]
    }

    pub fn charge(&self) -> usize {
        charge(self.buf.len() - HEADER_BYTES)
    }

    #[inline]
    pub fn bits(&self) -> u8 {
        self.buf[BITS_AT]
    }

    #[inline]
    pub fn set_bits(&mut self, bits: u8) {
        self.buf[BITS_AT] = bits;
    }

    #[inline]
    pub fn has(&self, bit: u8) -> bool {
        self.bits() & bit != 0
    }

    #[inline]
    pub fn set(&mut self, bit: u8, on: bool) {
        let b = self.bits();
        self.set_bits(if on { b | bit } else { b & !bit });
    }
}

/// A new item to put in a shard: its allocation, header filled in except
/// for the hash and access time, which the shard sets.
pub struct NewItem {
    entry: Entry,
}

impl NewItem {
    pub fn new(key: &[u8], value_parts: &[&[u8]], flags: u32, exptime: u32, cas: u64) -> Self {
        debug_assert!(key.len() <= crate::limits::KEY_BYTES_MAX);
        let len = HEADER_BYTES + key.len() + value_parts.iter().map(|p| p.len()).sum::<usize>();
        let mut data = Vec::with_capacity(len);
        data.resize(HEADER_BYTES, 0);
        data.extend_from_slice(key);
        for part in value_parts {
            data.extend_from_slice(part);
        }
        data[KEY_LEN_AT] = key.len() as u8;
        let mut entry = Entry {
            buf: data.into_boxed_slice(),
        };
        entry.set_cas(cas);
        entry.set_flags(flags);
        entry.set_exptime(exptime);
        Self { entry }
    }

    fn key(&self) -> &[u8] {
        self.entry.key()
    }
}

/// Counters kept under the shard lock, so the hot path pays no atomics.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShardStats {
    pub get_hits: u64,
    pub get_misses: u64,
    pub get_expired: u64,
    pub get_flushed: u64,
    pub touch_hits: u64,
    pub touch_misses: u64,
    pub delete_hits: u64,
    pub delete_misses: u64,
    pub incr_hits: u64,
    pub incr_misses: u64,
    pub decr_hits: u64,
    pub decr_misses: u64,
    pub cas_hits: u64,
    pub cas_misses: u64,
    pub cas_badval: u64,
    pub cmd_get: u64,
    pub cmd_set: u64,
    pub cmd_touch: u64,
    pub total_items: u64,
    pub evictions: u64,
    pub evicted_unfetched: u64,
    pub expired_unfetched: u64,
    pub reclaimed: u64,
    pub store_too_large: u64,
    pub store_no_memory: u64,
}

impl ShardStats {
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
            store_no_memory
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
    Missing,
    Expired,
    Flushed,
}

pub struct Shard {
    /// key hash → slab slot.
    index: HashTable<u32>,
    /// Entry storage; `None` slots are on `free`.
    slab: Vec<Option<Entry>>,
    /// SIEVE links per slot, kept apart from the entries so the eviction
    /// hand walks a dense array.
    links: Vec<Link>,
    free: Vec<u32>,
    /// SIEVE list ends and hand.
    head: u32,
    tail: u32,
    hand: u32,
    used_bytes: usize,
    limit_bytes: usize,
    /// Cursor of the background expiry sweep.
    sweep_cursor: usize,
    pub stats: ShardStats,
}

impl Shard {
    pub fn new(limit_bytes: usize) -> Self {
        Self {
            index: HashTable::new(),
            slab: Vec::new(),
            links: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            hand: NIL,
            used_bytes: 0,
            limit_bytes,
            sweep_cursor: 0,
            stats: ShardStats::default(),
        }
    }

    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// Bytes the shard's structures hold beyond what live items are charged
    /// for: unused slab, link and index capacity and the free list. Vectors
    /// and hash tables keep the capacity of the most items they ever held,
    /// so this is counted against the budget too.
    fn spare_bytes(&self) -> usize {
        let structures = self.slab.capacity() * std::mem::size_of::<Option<Entry>>()
            + self.links.capacity() * std::mem::size_of::<Link>()
            + self.free.capacity() * std::mem::size_of::<u32>()
            + self.index.capacity() * INDEX_BYTES_PER_ENTRY;
        structures.saturating_sub(self.index.len() * (SLOT_BYTES + INDEX_BYTES_PER_ENTRY))
    }

    /// Everything this shard holds: live items (with their share of the
    /// structures) plus spare structure capacity. Never above the budget.
    pub fn footprint_bytes(&self) -> usize {
        self.used_bytes + self.spare_bytes()
    }

    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn entry(&self, slot: u32) -> &Entry {
        self.slab[slot as usize].as_ref().expect("live slot")
    }

    fn entry_mut(&mut self, slot: u32) -> &mut Entry {
        self.slab[slot as usize].as_mut().expect("live slot")
    }

    /// The slot holding `key`, dead or alive.
    pub fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let slab = &self.slab;
        self.index
            .find(hash, |&s| {
                slab[s as usize].as_ref().is_some_and(|e| e.key() == key)
            })
            .copied()
    }

    /// The slot holding a live `key`. An expired or flushed entry found on the
    /// way is removed and reported, as memcached's lazy expiry does.
    pub fn find_live(
        &mut self,
        hash: u64,
        key: &[u8],
        now_secs: u32,
        flushed_before: u32,
    ) -> Result<u32, Gone> {
        let slot = self.find(hash, key).ok_or(Gone::Missing)?;
        let e = self.entry(slot);
        let why = if exptime::is_expired(e.exptime(), now_secs) {
            Gone::Expired
        } else if e.last_access() < flushed_before {
            Gone::Flushed
        } else {
            return Ok(slot);
        };
        if why == Gone::Expired && !e.has(bits::FETCHED) {
            self.stats.expired_unfetched += 1;
        }
        self.remove(slot);
        Err(why)
    }

    pub fn get(&self, slot: u32) -> &Entry {
        self.entry(slot)
    }

    pub fn get_mut(&mut self, slot: u32) -> &mut Entry {
        self.entry_mut(slot)
    }

    /// Stores `item` under its key, replacing any entry with that key, and
    /// evicts until the shard is within budget. `known` is the key's slot if
    /// the caller already looked it up (`None`: look it up here). Returns the
    /// item's slot.
    pub fn insert(
        &mut self,
        hash: u64,
        item: NewItem,
        known: Option<Option<u32>>,
        now_secs: u32,
    ) -> Result<u32, InsertError> {
        let existing = match known {
            Some(k) => k,
            None => self.find(hash, item.key()),
        };
        debug_assert_eq!(existing, self.find(hash, item.key()));
        let mut entry = item.entry;
        entry.set_hash(hash);
        entry.set_last_access(now_secs);
        let cost = entry.charge();
        if cost > self.limit_bytes {
            if let Some(old) = existing {
                self.remove(old);
            }
            return Err(InsertError::NoMemory);
        }
        let slot = match existing {
            Some(slot) => {
                // Replace in place: same slot, same index entry, same place
                // in the SIEVE list.
                let old = std::mem::replace(self.entry_mut(slot), entry);
                self.used_bytes = self.used_bytes - old.charge() + cost;
                slot
            }
            None => {
                let slot = match self.free.pop() {
                    Some(s) => {
                        debug_assert!(self.slab[s as usize].is_none());
                        self.slab[s as usize] = Some(entry);
                        s
                    }
                    None => {
                        assert!(self.slab.len() < NIL as usize, "slab index space exhausted");
                        self.slab.push(Some(entry));
                        self.links.push(Link {
                            newer: NIL,
                            older: NIL,
                        });
                        (self.slab.len() - 1) as u32
                    }
                };
                let slab = &self.slab;
                self.index.insert_unique(hash, slot, |&s| {
                    slab[s as usize].as_ref().expect("indexed slot").hash()
                });
                self.link_head(slot);
                self.used_bytes += cost;
                slot
            }
        };
        while self.footprint_bytes() > self.limit_bytes && self.index.len() > 1 {
            self.evict_one(now_secs, slot);
        }
        if self.footprint_bytes() > self.limit_bytes {
            // Only the new item is left and the structures' capacity still
            // crowds it out: refuse it rather than exceed the budget.
            self.remove(slot);
            return Err(InsertError::NoMemory);
        }
        self.stats.total_items += 1;
        Ok(slot)
    }

    /// Removes the entry in `slot` from the index, the list and the budget.
    pub fn remove(&mut self, slot: u32) -> Entry {
        let hash = self.entry(slot).hash();
        match self.index.find_entry(hash, |&s| s == slot) {
            Ok(found) => {
                found.remove();
            }
            Err(_) => unreachable!("live slot {slot} missing from the index"),
        }
        self.unlink(slot);
        let entry = self.slab[slot as usize].take().expect("live slot");
        self.free.push(slot);
        self.used_bytes -= entry.charge();
        entry
    }

    /// Drops every entry. Keeps the counters.
    pub fn clear(&mut self) {
        self.index.clear();
        self.slab.clear();
        self.links.clear();
        self.free.clear();
        self.head = NIL;
        self.tail = NIL;
        self.hand = NIL;
        self.used_bytes = 0;
        self.sweep_cursor = 0;
    }

    /// SIEVE eviction of one entry other than `keep` (the entry being
    /// written). Expired entries met by the hand count as reclaimed, live
    /// ones as evictions.
    ///
    /// # Panics
    /// If nothing but `keep` is left while over budget (an accounting bug:
    /// an item alone never exceeds the budget).
    fn evict_one(&mut self, now_secs: u32, keep: u32) {
        assert!(self.index.len() > 1, "over budget with nothing to evict");
        let mut slot = if self.hand == NIL {
            self.tail
        } else {
            self.hand
        };
        loop {
            let e = self.entry_mut(slot);
            let expired = exptime::is_expired(e.exptime(), now_secs);
            if slot != keep && (!e.has(bits::VISITED) || expired) {
                break;
            }
            e.set(bits::VISITED, false);
            let newer = self.links[slot as usize].newer;
            slot = if newer == NIL { self.tail } else { newer };
        }
        let e = self.entry(slot);
        let unfetched = !e.has(bits::FETCHED);
        if exptime::is_expired(e.exptime(), now_secs) {
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
        self.hand = slot;
        self.remove(slot);
    }

    /// Marks an entry as used: SIEVE visited bit and access time.
    #[inline]
    pub fn touch_access(&mut self, slot: u32, now_secs: u32) {
        let e = self.entry_mut(slot);
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

    fn link_head(&mut self, slot: u32) {
        let old_head = self.head;
        self.links[slot as usize] = Link {
            newer: NIL,
            older: old_head,
        };
        if old_head != NIL {
            self.links[old_head as usize].newer = slot;
        } else {
            self.tail = slot;
        }
        self.head = slot;
    }

    fn unlink(&mut self, slot: u32) {
        let Link { newer, older } = self.links[slot as usize];
        if self.hand == slot {
            self.hand = newer;
        }
        if newer != NIL {
            self.links[newer as usize].older = older;
        } else {
            self.head = older;
        }
        if older != NIL {
            self.links[older as usize].newer = newer;
        } else {
            self.tail = newer;
        }
    }

    /// Removes expired and flushed entries among the next `budget` slab slots.
    /// Returns how many were removed.
    pub fn sweep(&mut self, budget: usize, now_secs: u32, flushed_before: u32) -> usize {
        let mut removed = 0;
        for _ in 0..budget.min(self.slab.len()) {
            if self.sweep_cursor >= self.slab.len() {
                self.sweep_cursor = 0;
            }
            let slot = self.sweep_cursor as u32;
            self.sweep_cursor += 1;
            let Some(e) = self.slab[slot as usize].as_ref() else {
                continue;
            };
            let expired = exptime::is_expired(e.exptime(), now_secs);
            if expired || e.last_access() < flushed_before {
                if expired {
                    self.stats.reclaimed += 1;
                    if !e.has(bits::FETCHED) {
                        self.stats.expired_unfetched += 1;
                    }
                }
                self.remove(slot);
                removed += 1;
            }
        }
        // Give back structure memory the shard no longer needs: when most
        // slab slots are dead, move the live entries together.
        if self.index.is_empty() && self.spare_bytes() > 0 {
            self.clear();
            self.slab = Vec::new();
            self.links = Vec::new();
            self.free = Vec::new();
            self.index = HashTable::new();
        } else if self.slab.len() > COMPACT_SLOTS_MIN && self.index.len() * 2 < self.slab.len() {
            self.compact();
        }
        removed
    }

    /// Renumbers live entries into a dense slab, rebuilds the links and the
    /// index, and releases the spare capacity. O(slots), under the shard
    /// lock; run from the background sweep only when most slots are dead.
    fn compact(&mut self) {
        let live = self.index.len();
        let mut renumber = vec![NIL; self.slab.len()];
        let mut slab = Vec::with_capacity(live);
        let mut links = Vec::with_capacity(live);
        for (old, entry) in std::mem::take(&mut self.slab).into_iter().enumerate() {
            if let Some(e) = entry {
                renumber[old] = slab.len() as u32;
                slab.push(Some(e));
                links.push(self.links[old]);
            }
        }
        let map = |s: u32| if s == NIL { NIL } else { renumber[s as usize] };
        for l in &mut links {
            *l = Link {
                newer: map(l.newer),
                older: map(l.older),
            };
        }
        self.head = map(self.head);
        self.tail = map(self.tail);
        self.hand = map(self.hand);
        let mut index = HashTable::with_capacity(live);
        for (i, e) in slab.iter().enumerate() {
            let hash = e.as_ref().expect("compacted slab is dense").hash();
            index.insert_unique(hash, i as u32, |&s: &u32| {
                slab[s as usize].as_ref().expect("dense").hash()
            });
        }
        self.slab = slab;
        self.links = links;
        self.index = index;
        self.free = Vec::new();
        self.sweep_cursor = 0;
    }

    /// Checks the invariants in the module header.
    ///
    /// # Panics
    /// On the first broken invariant.
    pub fn check_invariants(&self) {
        let live = self.slab.iter().filter(|s| s.is_some()).count();
        assert_eq!(live, self.index.len(), "index and slab disagree");
        assert_eq!(
            live + self.free.len(),
            self.slab.len(),
            "free list and slab disagree"
        );
        let mut walked = 0;
        let mut slot = self.head;
        let mut prev = NIL;
        assert_eq!(self.links.len(), self.slab.len(), "links and slab disagree");
        while slot != NIL {
            let e = self.entry(slot);
            let link = self.links[slot as usize];
            assert_eq!(link.newer, prev, "broken back link at {slot}");
            assert_eq!(
                self.find(e.hash(), e.key()),
                Some(slot),
                "entry not indexed at its slot"
            );
            prev = slot;
            slot = link.older;
            walked += 1;
            assert!(walked <= live, "cycle in the SIEVE list");
        }
        assert_eq!(prev, self.tail);
        assert_eq!(walked, live, "list and slab disagree");
        let used: usize = self.slab.iter().flatten().map(Entry::charge).sum();
        assert_eq!(used, self.used_bytes, "byte accounting drifted");
        assert!(
            self.footprint_bytes() <= self.limit_bytes,
            "over the memory limit"
        );
    }
}
