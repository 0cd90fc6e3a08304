//! A shard's hash index: open addressing with linear probing over one array
//! of 8-byte buckets, each holding an item's address and 16 bits of its key
//! hash.
//!
//! Why not hashbrown: a lookup here costs two dependent cache misses, the
//! bucket's line and the item (to compare the key), as in memcached's chained
//! table. hashbrown keeps control bytes and buckets in separate arrays, so a
//! lookup through it is three misses before the key compare, and it gives no
//! way to prefetch a bucket for a multi-get. The profile of a 10-key
//! multi-get spent a third of its time in the lookup.
//!
//! An item's home bucket is picked by the top bits of its key hash below
//! those that pick the shard, so buckets are in hash order, apart from
//! items displaced a few buckets on by probing (and runs that wrap around
//! the end): a key listing walks only the buckets of the range it returns
//! ([`Index::home`], [`Index::floor`]).
//!
//! Buckets are `0` (empty), [`TOMBSTONE`] (removed; probing goes on past it),
//! or `tag << 48 | address`. Items are at least 8-aligned and user-space
//! addresses fit in 48 bits on the 64-bit targets we build for (checked when
//! an item is indexed). The index does not own the items; the shard does.

use std::ptr::NonNull;

/// A removed bucket: probes continue past it, inserts may reuse it.
const TOMBSTONE: u64 = 1;
const ADDRESS_MASK: u64 = (1 << 48) - 1;
/// The table grows (or is rebuilt without tombstones) past this load of
/// live plus removed buckets, in eighths.
const LOAD_EIGHTHS_MAX: usize = 6;
const BUCKETS_MIN: usize = 16;

/// Hash bits kept in a bucket to skip most non-matching items unread. Taken
/// below the bits that pick the shard (top) and the home bucket (next).
#[inline]
fn tag(hash: u64) -> u64 {
    hash & 0xFFFF
}

pub struct Index {
    buckets: Box<[u64]>,
    live: usize,
    tombstones: usize,
    /// Top hash bits that picked the shard, skipped when picking a bucket.
    skip: u32,
    /// `64 - log2(buckets)`: the shift that leaves a home bucket's bits.
    shift: u32,
}

impl Index {
    /// An empty index for a shard picked by the top `skip` bits of a hash.
    pub fn new(skip: u32) -> Self {
        assert!(skip < 32, "{skip} shard bits");
        Self {
            buckets: Box::new([]),
            live: 0,
            tombstones: 0,
            skip,
            shift: 64,
        }
    }

    /// An empty index like this one.
    pub fn emptied(&self) -> Self {
        Self::new(self.skip)
    }

    /// `hash`'s home bucket: the top bits below the shard's. The table must
    /// not be empty.
    #[inline]
    pub fn home(&self, hash: u64) -> usize {
        ((hash << self.skip) >> self.shift) as usize
    }

    /// The least hash bits below the shard's of a key whose home is bucket
    /// `i` (`i` may be one past the last bucket: the shard's end, `None`).
    pub fn floor(&self, i: usize) -> Option<u64> {
        (i < self.buckets.len()).then(|| ((i as u64) << self.shift) >> self.skip)
    }

    /// Whether bucket `i` is empty (not merely removed): no probe for a key
    /// whose home is at or before it goes past it.
    pub fn vacant(&self, i: usize) -> bool {
        self.buckets[i] == 0
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Buckets allocated (each 8 bytes).
    pub fn capacity(&self) -> usize {
        self.buckets.len()
    }

    #[inline]
    fn mask(&self) -> usize {
        self.buckets.len().wrapping_sub(1)
    }

    /// The address of `hash`'s home bucket, for a prefetch.
    #[inline]
    pub fn home_address(&self, hash: u64) -> Option<*const u64> {
        if self.buckets.is_empty() {
            return None;
        }
        Some(&self.buckets[self.home(hash)] as *const u64)
    }

    /// The item whose key hashes to `hash` and for which `is_key` holds.
    #[inline]
    pub fn find(&self, hash: u64, is_key: impl Fn(NonNull<u8>) -> bool) -> Option<NonNull<u8>> {
        if self.buckets.is_empty() {
            return None;
        }
        let mask = self.mask();
        let want = tag(hash);
        let mut i = self.home(hash);
        loop {
            let b = self.buckets[i];
            if b == 0 {
                return None;
            }
            if b != TOMBSTONE && b >> 48 == want {
                let item = address(b);
                if is_key(item) {
                    return Some(item);
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// The first item whose bucket tag matches `hash`: likely the key's item,
    /// for a prefetch (the bucket is read, not the item).
    #[inline]
    pub fn candidate(&self, hash: u64) -> Option<NonNull<u8>> {
        self.find(hash, |_| true)
    }

    /// The bucket holding exactly `item`.
    fn position(&self, hash: u64, item: NonNull<u8>) -> usize {
        let mask = self.mask();
        let mut i = self.home(hash);
        for _ in 0..self.buckets.len() {
            let b = self.buckets[i];
            assert!(b != 0, "item is not in the index");
            if b != TOMBSTONE && address(b) == item {
                return i;
            }
            i = (i + 1) & mask;
        }
        unreachable!("item is not in the index");
    }

    /// Indexes `item`, whose key is not in the index yet. `rehash` gives the
    /// hash of any indexed item, for when the table is rebuilt.
    pub fn insert(&mut self, hash: u64, item: NonNull<u8>, rehash: impl Fn(NonNull<u8>) -> u64) {
        let bucket = bucket(hash, item);
        if (self.live + self.tombstones + 1) * 8 > self.buckets.len() * LOAD_EIGHTHS_MAX {
            // Mostly tombstones: rebuild at the same size; else double.
            let want = if self.live * 2 < self.buckets.len() * LOAD_EIGHTHS_MAX / 8 {
                self.buckets.len()
            } else {
                self.buckets.len() * 2
            };
            self.rebuild(want.max(BUCKETS_MIN), &rehash);
        }
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            let b = self.buckets[i];
            if b == 0 || b == TOMBSTONE {
                if b == TOMBSTONE {
                    self.tombstones -= 1;
                }
                self.buckets[i] = bucket;
                self.live += 1;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Points the bucket of `old` at `new`, an item with the same key.
    pub fn replace(&mut self, hash: u64, old: NonNull<u8>, new: NonNull<u8>) {
        let i = self.position(hash, old);
        self.buckets[i] = bucket(hash, new);
    }

    /// Removes `item`, which is indexed under `hash`.
    pub fn remove(&mut self, hash: u64, item: NonNull<u8>) {
        let i = self.position(hash, item);
        let mask = self.mask();
        if self.buckets[(i + 1) & mask] == 0 {
            // Nothing probes past this bucket: it can be empty, not a
            // tombstone, and so can the tombstones just before it.
            self.buckets[i] = 0;
            let mut j = i.wrapping_sub(1) & mask;
            while self.buckets[j] == TOMBSTONE {
                self.buckets[j] = 0;
                self.tombstones -= 1;
                j = j.wrapping_sub(1) & mask;
            }
        } else {
            self.buckets[i] = TOMBSTONE;
            self.tombstones += 1;
        }
        self.live -= 1;
    }

    /// Rebuilds into `buckets` buckets (a power of two above the live count),
    /// dropping tombstones.
    fn rebuild(&mut self, buckets: usize, rehash: &impl Fn(NonNull<u8>) -> u64) {
        debug_assert!(buckets.is_power_of_two() && self.live * 8 < buckets * LOAD_EIGHTHS_MAX);
        let old = std::mem::replace(&mut self.buckets, vec![0; buckets].into_boxed_slice());
        self.shift = 64 - buckets.trailing_zeros();
        let mask = buckets - 1;
        for b in old.iter().copied().filter(|&b| b > TOMBSTONE) {
            let hash = rehash(address(b));
            let mut i = self.home(hash);
            while self.buckets[i] != 0 {
                i = (i + 1) & mask;
            }
            self.buckets[i] = b;
        }
        self.tombstones = 0;
    }

    /// The right size for the live count: rebuild smaller when the table is
    /// mostly empty (after a flush or expiry sweep).
    pub fn shrink(&mut self, rehash: &impl Fn(NonNull<u8>) -> u64) {
        if self.live == 0 {
            *self = self.emptied();
            return;
        }
        let fit = (self.live * 8 / LOAD_EIGHTHS_MAX + 1)
            .next_power_of_two()
            .max(BUCKETS_MIN)
            * 2;
        if fit < self.buckets.len() {
            self.rebuild(fit, rehash);
        }
    }

    /// The item in bucket `i`, if there is one: for sweeps, by bucket.
    pub fn at(&self, i: usize) -> Option<NonNull<u8>> {
        let b = self.buckets[i];
        (b > TOMBSTONE).then(|| address(b))
    }

    /// Every indexed item.
    pub fn items(&self) -> impl Iterator<Item = NonNull<u8>> + '_ {
        self.buckets
            .iter()
            .copied()
            .filter(|&b| b > TOMBSTONE)
            .map(address)
    }
}

/// The bucket value for `item` indexed under `hash`.
#[inline]
fn bucket(hash: u64, item: NonNull<u8>) -> u64 {
    let addr = item.as_ptr() as u64;
    assert!(
        addr & !ADDRESS_MASK == 0 && addr > TOMBSTONE,
        "item address {addr:#x} out of range"
    );
    tag(hash) << 48 | addr
}

#[inline]
fn address(bucket: u64) -> NonNull<u8> {
    NonNull::new((bucket & ADDRESS_MASK) as *mut u8).expect("live bucket")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Fake items: leaked 8-aligned boxes whose content is their hash.
    fn item(hash: u64) -> NonNull<u8> {
        NonNull::from(Box::leak(Box::new(hash))).cast()
    }

    fn hash_of(p: NonNull<u8>) -> u64 {
        // SAFETY: every item in these tests is a leaked `Box<u64>`.
        unsafe { *p.cast::<u64>().as_ptr() }
    }

    proptest! {
        /// The index agrees with a HashMap through inserts, removes and
        /// replaces, including heavy collisions (few distinct home bits).
        #[test]
        fn matches_a_map(ops in proptest::collection::vec((0u8..3, 0u64..200), 1..2000), spread in 0u32..3) {
            let mut index = Index::new(spread % 2);
            let mut model: HashMap<u64, NonNull<u8>> = HashMap::new();
            let shape = |k: u64| match spread {
                0 => k.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                1 => k << 20, // same home bucket for all in small tables
                _ => (k % 7) | (k << 32),
            };
            for (op, k) in ops {
                let h = shape(k);
                match (op, model.get(&h).copied()) {
                    (0, None) => {
                        let p = item(h);
                        index.insert(h, p, hash_of);
                        model.insert(h, p);
                    }
                    (1, Some(p)) => {
                        index.remove(h, p);
                        model.remove(&h);
                    }
                    (2, Some(p)) => {
                        let q = item(h);
                        index.replace(h, p, q);
                        model.insert(h, q);
                    }
                    _ => {}
                }
                prop_assert_eq!(index.len(), model.len());
            }
            for (&h, &p) in &model {
                prop_assert_eq!(index.find(h, |q| hash_of(q) == h), Some(p));
            }
            for k in 0..200 {
                let h = shape(k);
                if !model.contains_key(&h) {
                    prop_assert_eq!(index.find(h, |q| hash_of(q) == h), None);
                }
            }
            prop_assert_eq!(index.items().count(), model.len());
            index.shrink(&hash_of);
            for (&h, &p) in &model {
                prop_assert_eq!(index.find(h, |q| hash_of(q) == h), Some(p));
            }
        }
    }
}
