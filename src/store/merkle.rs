//! Per-partition hash trees over (key, version): what anti-entropy compares.
//!
//! ```text
//!  level 0            root                      hash of its 8 children
//!  level 1     n0  n1  n2  n3  n4  n5  n6  n7    hash of their 8 leaves each
//!  level 2     64 leaves                         XOR of entry hashes
//! ```
//!
//! Every entry in the store (a live item or a tombstone) adds
//! [`entry_hash`]`(key hash, version)` to one leaf of its key's partition: the
//! leaf is picked by the key hash's low bits, the partition by its top bits
//! (the placement's multiply-shift). A leaf is the XOR of its entries' hashes,
//! so a write updates it in O(1) with no lock beyond the atomic: XOR the old
//! version's hash out and the new one's in. XOR is order-free, so replicas that
//! hold the same (key, version) set have the same leaves however their writes
//! were interleaved, and concurrent updates from different shards commute.
//! Inner nodes are hashes of their children, computed when asked for: a
//! comparison reads 64 leaves per partition, which is cheaper than keeping
//! the inner nodes current on every write.
//!
//! Memory: 8 bytes per leaf, 512 per partition, 512 KiB for 1,024
//! partitions, allocated once.

use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::cluster::ring::partition_of_hash;

/// Children per inner node.
pub const FANOUT: usize = 8;
/// Levels below the root; the last holds the leaves.
pub const DEPTH: u8 = 2;
/// Leaves per partition: `FANOUT ^ DEPTH`.
pub const LEAVES: usize = FANOUT * FANOUT;

const _: () = assert!(LEAVES == FANOUT.pow(DEPTH as u32));
const _: () = assert!(LEAVES.is_power_of_two() && LEAVES <= 1 << 16);

/// The hash an entry adds to its leaf: xxh3 of the version, seeded with the
/// key's xxh3. Two replicas agree on it for the same (key, version) and on
/// nothing else but by a 2^-64 chance.
#[inline]
pub fn entry_hash(key_hash: u64, version: u64) -> u64 {
    xxh3_64_with_seed(&version.to_le_bytes(), key_hash)
}

/// The leaf of a key within its partition: the hash's low bits (the top
/// bits pick the partition).
#[inline]
pub fn leaf_of(key_hash: u64) -> u16 {
    (key_hash & (LEAVES as u64 - 1)) as u16
}

/// One node of one partition's tree: `level` 0 is the root (index 0), level
/// [`DEPTH`] the leaves (index `0..LEAVES`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct TreeNode {
    /// The partition whose tree this is.
    pub partition: u32,
    /// 0 for the root, up to [`DEPTH`] for a leaf.
    pub level: u8,
    /// Position within its level: `0..FANOUT^level`.
    pub index: u16,
}

impl TreeNode {
    /// The root of `partition`'s tree.
    pub fn root(partition: u32) -> Self {
        Self {
            partition,
            level: 0,
            index: 0,
        }
    }

    /// Whether the node is a leaf (at [`DEPTH`]).
    pub fn is_leaf(&self) -> bool {
        self.level == DEPTH
    }

    /// Whether the node exists in a tree of `partitions` partitions.
    pub fn is_valid(&self, partitions: u32) -> bool {
        self.partition < partitions
            && self.level <= DEPTH
            && usize::from(self.index) < FANOUT.pow(u32::from(self.level))
    }

    /// The node's children, in order.
    ///
    /// # Panics
    /// On a leaf: it has none.
    pub fn children(&self) -> impl Iterator<Item = TreeNode> + '_ {
        assert!(!self.is_leaf(), "a leaf has no children");
        (0..FANOUT as u16).map(|i| TreeNode {
            partition: self.partition,
            level: self.level + 1,
            index: self.index * FANOUT as u16 + i,
        })
    }

    /// The leaves under this node: a range of leaf indexes.
    pub fn leaf_range(&self) -> std::ops::Range<u16> {
        let span = FANOUT.pow(u32::from(DEPTH - self.level)) as u16;
        self.index * span..(self.index + 1) * span
    }
}

/// The trees of every partition of one node.
pub struct Trees {
    partitions: u32,
    /// `partitions * LEAVES` leaves, partition-major.
    leaves: Box<[AtomicU64]>,
}

impl Trees {
    /// Empty trees for `partitions` partitions ([`LEAVES`] 8-byte leaves each),
    /// allocated once.
    pub fn new(partitions: u32) -> Self {
        let leaves = (0..partitions as usize * LEAVES)
            .map(|_| AtomicU64::new(0))
            .collect();
        Self { partitions, leaves }
    }

    /// Number of partitions the trees cover.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Adds the entry (key, version) if absent from the tree, removes it if
    /// present: the store calls this when an entry appears and again when
    /// it goes (replaced, deleted, expired, evicted or flushed).
    #[inline]
    pub fn toggle(&self, key_hash: u64, version: u64) {
        let p = partition_of_hash(key_hash, self.partitions) as usize;
        let at = p * LEAVES + usize::from(leaf_of(key_hash));
        self.leaves[at].fetch_xor(entry_hash(key_hash, version), Ordering::Relaxed);
    }

    /// The hash of `node`. A leaf is its XOR; an inner node hashes its
    /// children's hashes (so equal hashes mean equal subtrees, and a
    /// difference anywhere below shows at the root).
    ///
    /// # Panics
    /// If the node is not in the tree.
    pub fn hash(&self, node: TreeNode) -> u64 {
        assert!(node.is_valid(self.partitions), "no tree node {node:?}");
        let leaves = &self.leaves[node.partition as usize * LEAVES..][..LEAVES];
        let leaf = |i: u16| leaves[usize::from(i)].load(Ordering::Relaxed);
        if node.is_leaf() {
            return leaf(node.index);
        }
        if node.level + 1 == DEPTH {
            let mut bytes = [0u8; FANOUT * 8];
            for (chunk, i) in bytes.chunks_exact_mut(8).zip(node.leaf_range()) {
                chunk.copy_from_slice(&leaf(i).to_le_bytes());
            }
            return xxh3_64(&bytes);
        }
        let mut bytes = [0u8; FANOUT * 8];
        for (chunk, child) in bytes.chunks_exact_mut(8).zip(node.children()) {
            chunk.copy_from_slice(&self.hash(child).to_le_bytes());
        }
        xxh3_64(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_hashes(n: u64) -> Vec<u64> {
        (0..n)
            .map(|i| crate::store::key_hash(format!("key:{i}").as_bytes()))
            .collect()
    }

    #[test]
    fn same_entries_in_any_order_give_the_same_tree() {
        let (a, b) = (Trees::new(16), Trees::new(16));
        let hashes = key_hashes(1000);
        for (i, h) in hashes.iter().enumerate() {
            a.toggle(*h, i as u64);
        }
        for (i, h) in hashes.iter().enumerate().rev() {
            b.toggle(*h, i as u64);
        }
        for p in 0..16 {
            assert_eq!(a.hash(TreeNode::root(p)), b.hash(TreeNode::root(p)));
        }
    }

    #[test]
    fn one_changed_version_shows_along_one_path_only() {
        let (a, b) = (Trees::new(16), Trees::new(16));
        let hashes = key_hashes(1000);
        for (i, h) in hashes.iter().enumerate() {
            a.toggle(*h, i as u64);
            b.toggle(*h, i as u64);
        }
        // b takes a newer version of one key: out with the old, in with the new.
        let h = hashes[7];
        b.toggle(h, 7);
        b.toggle(h, 70_000);
        let p = partition_of_hash(h, 16);
        let leaf = TreeNode {
            partition: p,
            level: DEPTH,
            index: leaf_of(h),
        };
        let mut differing = Vec::new();
        let mut frontier = vec![TreeNode::root(p)];
        while let Some(n) = frontier.pop() {
            if a.hash(n) != b.hash(n) {
                differing.push(n);
                if !n.is_leaf() {
                    frontier.extend(n.children());
                }
            }
        }
        assert_eq!(differing.len(), usize::from(DEPTH) + 1, "{differing:?}");
        assert!(differing.contains(&leaf));
        for q in (0..16).filter(|q| *q != p) {
            assert_eq!(a.hash(TreeNode::root(q)), b.hash(TreeNode::root(q)));
        }
        // Putting it back makes the trees equal again.
        b.toggle(h, 70_000);
        b.toggle(h, 7);
        assert_eq!(a.hash(TreeNode::root(p)), b.hash(TreeNode::root(p)));
    }

    #[test]
    fn an_empty_tree_is_all_zero_leaves_and_node_shapes_are_checked() {
        let t = Trees::new(4);
        let leaf = TreeNode {
            partition: 3,
            level: DEPTH,
            index: LEAVES as u16 - 1,
        };
        assert_eq!(t.hash(leaf), 0);
        assert!(leaf.is_valid(4));
        assert!(
            !TreeNode {
                index: 1,
                ..TreeNode::root(0)
            }
            .is_valid(4)
        );
        assert!(!TreeNode::root(4).is_valid(4));
        assert!(
            !TreeNode {
                level: DEPTH + 1,
                ..TreeNode::root(0)
            }
            .is_valid(4)
        );
        assert_eq!(TreeNode::root(0).leaf_range(), 0..LEAVES as u16);
        let n = TreeNode {
            partition: 0,
            level: 1,
            index: 2,
        };
        assert_eq!(n.leaf_range(), 16..24);
        assert_eq!(
            n.children().map(|c| c.index).collect::<Vec<_>>(),
            (16..24).collect::<Vec<_>>()
        );
    }
}
