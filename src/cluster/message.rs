//! What nodes say to each other. Carried by the transport in postcard frames.
//!
//! Client commands travel as their raw protocol bytes: the node that executes
//! one parses it with the same parser and runs it with the same code as a
//! single node, so every memcached rule (meta flags, noreply, CAS, TTLs)
//! holds unchanged in a cluster. What replicas exchange is state, never
//! operations: applying a [`KeyState`] twice, late or out of order is
//! harmless because the highest version wins.

use serde::{Deserialize, Serialize};

use crate::store::merkle::TreeNode;
use crate::store::{KeyState, KeyVersion, ListedKey};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Execute one client command as the key's primary and replicate its
    /// result to `write_quorum` replicas (this one included) before
    /// answering.
    Execute { command: Vec<u8>, write_quorum: u8 },
    /// Read these keys locally (get/gets): per key, its version and the
    /// `VALUE` block a client would get.
    ReadKeys { keys: Vec<Vec<u8>>, with_cas: bool },
    /// Run a meta get that changes nothing, locally: the reply and the
    /// version it saw.
    ReadMeta { command: Vec<u8>, key: Vec<u8> },
    /// The key's state, for a primary that must catch up before a
    /// read-modify-write.
    Fetch { key: Vec<u8> },
    /// Apply replicated state, highest version wins.
    Apply { key: Vec<u8>, state: KeyState },
    /// Hold `state` for `target`, a replica that could not be reached, and
    /// hand it over when it is back (hinted handoff).
    Hint {
        target: u16,
        key: Vec<u8>,
        state: KeyState,
    },
    /// One page of the states this node holds for keys that `for_node`
    /// replicates, from `cursor` (0 to begin): how a node that restarted
    /// empty refills itself.
    Scan { for_node: u16, cursor: u64 },
    /// `flush_all`, relayed to every member. `version` is the coordinator's
    /// stamp for it: replicated states older than an immediate flush are
    /// dropped afterwards.
    FlushAll { delay_secs: i64, version: u64 },
    /// Anti-entropy: the hashes of these tree nodes.
    TreeHashes { nodes: Vec<TreeNode> },
    /// Anti-entropy: the (key, version) entries of these leaves, one list
    /// per leaf, whole leaves only, as many as fit `max_entries` (at least
    /// one leaf).
    LeafEntries {
        leaves: Vec<(u32, u16)>,
        max_entries: u32,
    },
    /// Anti-entropy: the states of these keys, tombstones included; the
    /// answer may stop early to stay within a frame.
    FetchStates { keys: Vec<Vec<u8>> },
    /// Anti-entropy: apply these states, highest version wins, into free
    /// memory only (repair never evicts).
    Repair { states: Vec<(Vec<u8>, KeyState)> },
    /// `lk`: up to `max` live keys with hashes in `from..=to` (one
    /// partition's range or part of it), in hash order.
    ListKeys { from: u64, to: u64, max: u32 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerResponse {
    Executed {
        reply: Vec<u8>,
    },
    /// Per key asked: `(version, VALUE block)` or `None` for a miss.
    Values(Vec<Option<(u64, Vec<u8>)>>),
    /// Version 0: the key was absent.
    MetaRead {
        version: u64,
        reply: Vec<u8>,
    },
    State(Option<KeyState>),
    /// A page of a [`PeerRequest::Scan`] and where to continue (`None`: done).
    Page {
        states: Vec<(Vec<u8>, KeyState)>,
        next: Option<u64>,
    },
    Applied,
    Flushed,
    /// Per tree node asked, its hash.
    Hashes(Vec<u64>),
    /// Per leaf answered (a prefix of those asked), its entries.
    Entries(Vec<Vec<KeyVersion>>),
    /// The states of the first `answered` keys asked (keys held by
    /// neither an item nor a tombstone are left out).
    States {
        states: Vec<(Vec<u8>, KeyState)>,
        answered: u32,
    },
    /// Which of the states sent (by index) found no free memory.
    Repaired {
        no_room: Vec<u32>,
    },
    /// A page of [`PeerRequest::ListKeys`]: the keys, and the hash the
    /// range goes on from (`None`: done).
    Keys {
        keys: Vec<ListedKey>,
        next: Option<u64>,
    },
    /// The request was malformed; nothing was done.
    Refused(String),
}
