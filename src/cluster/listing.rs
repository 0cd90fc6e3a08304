//! Listing positions and the tokens that carry them (`lk`).
//!
//! A listing walks every key in key-hash order (xxh3-64 of the key, the
//! hash placement uses): partitions are contiguous ranges of that order,
//! so a position is just the next hash to list from, and it means the same
//! on every node. The token is that hash with a keyed hash (BLAKE3, keyed,
//! truncated to 128 bits) over it, hex-encoded: a token this cluster did
//! not issue, or one corrupted on the way, is refused before anything is
//! scanned. Tokens carry no state of the node that issued them, so any
//! node continues any listing.

use std::hash::{BuildHasher, Hasher};

/// Token format version: the first byte of every token.
const VERSION: u8 = 1;
const MAC_BYTES: usize = 16;
/// Bytes of a token before hex: version, position, MAC.
const RAW_BYTES: usize = 1 + 8 + MAC_BYTES;
/// Characters of a token.
pub const TOKEN_CHARS: usize = RAW_BYTES * 2;
const _: () = assert!(TOKEN_CHARS <= crate::limits::LIST_TOKEN_BYTES_MAX);

/// Context string of the key derivation: keys for anything else derived
/// from the same secret differ.
const CONTEXT: &str = "webvac 2026-11 lk listing token v1";

/// The key that authenticates listing tokens.
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// The key for a secret every node shares (the `listing_secret`
    /// setting, or the cluster layout when none is set).
    pub fn from_secret(secret: &[u8]) -> Self {
        Self(blake3::derive_key(CONTEXT, secret))
    }

    /// A key of this process alone (a single node with no secret set):
    /// its tokens are void after a restart, as its data is. Seeded from the
    /// randomly keyed std hasher, which the OS seeds.
    pub fn random() -> Self {
        let mut seed = Vec::with_capacity(32);
        for i in 0..4u64 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(i);
            seed.extend_from_slice(&h.finish().to_le_bytes());
        }
        seed.extend_from_slice(&std::process::id().to_le_bytes());
        Self::from_secret(&seed)
    }

    fn mac(&self, version: u8, from: u64) -> [u8; MAC_BYTES] {
        let mut msg = [0u8; 9];
        msg[0] = version;
        msg[1..].copy_from_slice(&from.to_le_bytes());
        let full = blake3::keyed_hash(&self.0, &msg);
        full.as_bytes()[..MAC_BYTES]
            .try_into()
            .expect("a prefix of 32 bytes")
    }

    /// The token for "continue from hash `from`".
    pub fn encode(&self, from: u64) -> String {
        let mut raw = [0u8; RAW_BYTES];
        raw[0] = VERSION;
        raw[1..9].copy_from_slice(&from.to_le_bytes());
        raw[9..].copy_from_slice(&self.mac(VERSION, from));
        let mut out = String::with_capacity(TOKEN_CHARS);
        for b in raw {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
        out
    }

    /// The position a token stands for: `-` is the start; anything else
    /// must be a token made with this key. `None`: forged, truncated or
    /// corrupt.
    pub fn decode(&self, token: &[u8]) -> Option<u64> {
        if token == crate::protocol::list_keys::START {
            return Some(0);
        }
        if token.len() != TOKEN_CHARS {
            return None;
        }
        let mut raw = [0u8; RAW_BYTES];
        for (i, pair) in token.chunks_exact(2).enumerate() {
            raw[i] = (unhex(pair[0])? << 4) | unhex(pair[1])?;
        }
        if raw[0] != VERSION {
            return None;
        }
        let from = u64::from_le_bytes(raw[1..9].try_into().expect("8 bytes"));
        let expected = self.mac(VERSION, from);
        // Compare in constant time: a forger learns nothing from timing.
        let diff = expected
            .iter()
            .zip(&raw[9..])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        (diff == 0).then_some(from)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn unhex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ring::{partition_of_hash, partition_range};
    use proptest::prelude::*;

    #[test]
    fn tokens_round_trip_and_start_is_zero() {
        let k = TokenKey::from_secret(b"s");
        for from in [0, 1, 12345, u64::MAX] {
            let t = k.encode(from);
            assert_eq!(t.len(), TOKEN_CHARS);
            assert_eq!(k.decode(t.as_bytes()), Some(from));
        }
        assert_eq!(k.decode(b"-"), Some(0));
    }

    #[test]
    fn another_key_truncation_or_case_changes_are_refused() {
        let k = TokenKey::from_secret(b"s");
        let t = k.encode(99);
        assert_eq!(TokenKey::from_secret(b"other").decode(t.as_bytes()), None);
        assert_eq!(k.decode(&t.as_bytes()[..TOKEN_CHARS - 2]), None);
        assert_eq!(k.decode(t.to_uppercase().as_bytes()), None);
        assert_eq!(k.decode(b""), None);
        assert_eq!(k.decode(b"--"), None);
    }

    #[test]
    fn partition_ranges_tile_the_hash_space() {
        for partitions in [1, 2, 3, 7, 1024, 4096] {
            let mut next = 0u64;
            for p in 0..partitions {
                let (lo, hi) = partition_range(p, partitions);
                assert_eq!(lo, next, "{p}/{partitions}");
                assert_eq!(partition_of_hash(lo, partitions), p);
                assert_eq!(partition_of_hash(hi, partitions), p);
                next = hi.wrapping_add(1);
            }
            assert_eq!(next, 0, "the last range ends at u64::MAX");
        }
    }

    proptest! {
        /// Changing any one character of a valid token makes it invalid
        /// (or, for the start token, another valid position is never
        /// reached by accident).
        #[test]
        fn any_corruption_is_refused(from in any::<u64>(), at in 0..TOKEN_CHARS, c in any::<u8>()) {
            let k = TokenKey::from_secret(b"cluster");
            let mut t = k.encode(from).into_bytes();
            prop_assume!(t[at] != c);
            t[at] = c;
            prop_assert_eq!(k.decode(&t), None);
        }
    }
}
